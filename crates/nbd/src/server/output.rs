//! The connection's output: a FIFO of segments, each either control bytes (greeting, option
//! replies, reply headers, error and block-status replies), kept in one byte buffer, or a
//! reference to the data of a read held in its slot's buffer. The socket side turns the
//! segments into `IoSlice`s, so read data goes to the socket straight from the buffer the
//! I/O filled: no copy.

use std::collections::VecDeque;

/// Once this many consumed bytes sit at the front of the control buffer, and they are at
/// least half of it, they are dropped (a `memmove` of what is left, no allocation).
const COMPACT_AT: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seg {
    /// The next `n` control bytes (control segments follow each other in the buffer).
    Ctrl(usize),
    /// Bytes `pos..end` of slot `slot`'s buffer.
    Data { slot: u32, pos: usize, end: usize },
}

/// A piece of pending output, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Piece<'a> {
    Ctrl(&'a [u8]),
    /// Bytes `pos..end` of `slot`'s buffer.
    Data {
        slot: u32,
        pos: usize,
        end: usize,
    },
}

#[derive(Debug, Default)]
pub(super) struct OutQueue {
    ctrl: Vec<u8>,
    /// Control bytes before this index have been consumed.
    ctrl_head: usize,
    segs: VecDeque<Seg>,
    /// Pending bytes, control and data.
    len: usize,
}

impl OutQueue {
    pub(super) fn with_capacity(ctrl: usize, segs: usize) -> Self {
        Self {
            ctrl: Vec::with_capacity(ctrl),
            ctrl_head: 0,
            segs: VecDeque::with_capacity(segs),
            len: 0,
        }
    }

    /// Makes room for `segs` segments without reallocating later.
    pub(super) fn reserve_segments(&mut self, segs: usize) {
        self.segs.reserve(segs.saturating_sub(self.segs.len()));
    }

    /// Pending bytes.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pending control bytes (what back-pressure bounds).
    pub(super) fn ctrl_pending(&self) -> usize {
        self.ctrl.len() - self.ctrl_head
    }

    /// Appends control bytes written by `write` (which must only append).
    pub(super) fn ctrl_with<R>(&mut self, write: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let before = self.ctrl.len();
        let r = write(&mut self.ctrl);
        let n = self.ctrl.len().saturating_sub(before);
        if n > 0 {
            self.len += n;
            match self.segs.back_mut() {
                Some(Seg::Ctrl(last)) => *last += n,
                _ => self.segs.push_back(Seg::Ctrl(n)),
            }
        }
        r
    }

    /// Appends `len` bytes of `slot`'s buffer.
    pub(super) fn data(&mut self, slot: u32, len: usize) {
        if len > 0 {
            self.len += len;
            self.segs.push_back(Seg::Data {
                slot,
                pos: 0,
                end: len,
            });
        }
    }

    /// Calls `f` on each pending piece in order until it returns `false`.
    pub(super) fn pieces<'a>(&'a self, mut f: impl FnMut(Piece<'a>) -> bool) {
        let mut at = self.ctrl_head;
        for seg in &self.segs {
            let piece = match *seg {
                Seg::Ctrl(n) => {
                    let p = Piece::Ctrl(&self.ctrl[at..at + n]);
                    at += n;
                    p
                }
                Seg::Data { slot, pos, end } => Piece::Data { slot, pos, end },
            };
            if !f(piece) {
                return;
            }
        }
    }

    /// Marks `n` bytes (clamped to what is pending) as sent; `done(slot)` is called for
    /// each data segment sent in full, in order.
    pub(super) fn consume(&mut self, n: usize, mut done: impl FnMut(u32)) {
        let mut n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let Some(seg) = self.segs.front_mut() else {
                break;
            };
            match seg {
                Seg::Ctrl(left) => {
                    let k = n.min(*left);
                    *left -= k;
                    self.ctrl_head += k;
                    n -= k;
                    if *left == 0 {
                        self.segs.pop_front();
                    }
                }
                Seg::Data { slot, pos, end } => {
                    let k = n.min(*end - *pos);
                    *pos += k;
                    n -= k;
                    if pos == end {
                        let slot = *slot;
                        self.segs.pop_front();
                        done(slot);
                    }
                }
            }
        }
        if self.ctrl_head == self.ctrl.len() {
            self.ctrl.clear();
            self.ctrl_head = 0;
        } else if self.ctrl_head >= COMPACT_AT && self.ctrl_head * 2 >= self.ctrl.len() {
            self.ctrl.drain(..self.ctrl_head);
            self.ctrl_head = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(q: &OutQueue) -> Vec<Piece<'_>> {
        let mut v = Vec::new();
        q.pieces(|p| {
            v.push(p);
            true
        });
        v
    }

    #[test]
    fn control_bytes_coalesce_and_data_stays_separate() {
        let mut q = OutQueue::with_capacity(16, 4);
        q.ctrl_with(|v| v.extend_from_slice(b"ab"));
        q.ctrl_with(|v| v.extend_from_slice(b"cd"));
        q.data(3, 5);
        q.ctrl_with(|v| v.extend_from_slice(b"e"));
        q.data(1, 0); // empty: ignored
        q.ctrl_with(|_| ()); // nothing written: ignored
        assert_eq!(q.len(), 10);
        assert_eq!(
            collect(&q),
            [
                Piece::Ctrl(b"abcd"),
                Piece::Data {
                    slot: 3,
                    pos: 0,
                    end: 5
                },
                Piece::Ctrl(b"e"),
            ]
        );
        assert_eq!(q.ctrl_pending(), 5);
    }

    #[test]
    fn partial_consumption_and_slot_release() {
        let mut q = OutQueue::with_capacity(16, 4);
        q.ctrl_with(|v| v.extend_from_slice(b"abc"));
        q.data(7, 4);
        q.ctrl_with(|v| v.extend_from_slice(b"xy"));
        let mut freed = Vec::new();
        q.consume(2, |s| freed.push(s));
        assert_eq!(collect(&q)[0], Piece::Ctrl(b"c"));
        q.consume(3, |s| freed.push(s));
        assert_eq!(
            collect(&q)[0],
            Piece::Data {
                slot: 7,
                pos: 2,
                end: 4
            }
        );
        assert!(freed.is_empty());
        q.consume(3, |s| freed.push(s));
        assert_eq!(freed, [7]);
        assert_eq!(collect(&q), [Piece::Ctrl(b"y")]);
        // Over-consuming is clamped.
        q.consume(100, |s| freed.push(s));
        assert!(q.is_empty());
        assert_eq!(q.ctrl_pending(), 0);
        assert!(collect(&q).is_empty());
    }

    #[test]
    fn control_buffer_is_compacted_without_losing_bytes() {
        let mut q = OutQueue::with_capacity(0, 0);
        let mut expected = Vec::new();
        let mut got = Vec::new();
        for i in 0..50_000u32 {
            let b = i.to_be_bytes();
            q.ctrl_with(|v| v.extend_from_slice(&b));
            expected.extend_from_slice(&b);
            if i % 3 == 0 {
                // Send a bit less than what was queued, so the buffer never empties.
                let n = q.len().saturating_sub(5);
                q.pieces(|p| {
                    if let Piece::Ctrl(c) = p {
                        got.extend_from_slice(&c[..n]);
                    }
                    false
                });
                q.consume(n, |_| unreachable!());
            }
        }
        q.pieces(|p| {
            if let Piece::Ctrl(c) = p {
                got.extend_from_slice(c);
            }
            true
        });
        assert_eq!(got, expected);
        assert!(q.ctrl.len() < 2 * COMPACT_AT + 64, "{}", q.ctrl.len());
    }
}
