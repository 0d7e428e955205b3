//! Per-connection request slots and their data buffers.
//!
//! A slot holds one accepted request from the moment its header is taken until its reply
//! has left the output queue. Each slot owns one buffer, allocated the first time the slot
//! serves a read or write and kept afterwards; it grows (one fresh allocation) only when a
//! request needs more than it has. The sum of all buffers is capped: to grow one, buffers
//! of idle slots are released first (largest first), and if that is not enough the request
//! waits until slots in use come back. The cap is never below one largest request, so a
//! request can always run once the others are done.

use super::IoKind;

/// Smallest buffer handed out: small reads and writes share one size class.
const MIN_BUF: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SlotState {
    Free,
    /// A write whose payload is still arriving.
    Receiving,
    /// Waiting for [`ServerConn::next_io`](super::ServerConn::next_io).
    Ready,
    /// Handed to the daemon; waiting for a completion.
    Running,
    /// Its read data is in the output queue.
    Sending,
}

#[derive(Debug)]
pub(super) struct Slot {
    pub(super) state: SlotState,
    pub(super) kind: IoKind,
    pub(super) fua: bool,
    pub(super) cookie: u64,
    pub(super) offset: u64,
    pub(super) length: u32,
    pub(super) buf: Vec<u8>,
}

impl Slot {
    fn new() -> Self {
        Self {
            state: SlotState::Free,
            kind: IoKind::Flush,
            fua: false,
            cookie: 0,
            offset: 0,
            length: 0,
            buf: Vec::new(),
        }
    }

    /// Whether this request moves data through the buffer.
    pub(super) fn has_data(&self) -> bool {
        matches!(self.kind, IoKind::Read | IoKind::Write)
    }

    /// The request's part of the buffer (empty for commands without data).
    pub(super) fn data(&self) -> &[u8] {
        if self.has_data() {
            self.buf.get(..self.length as usize).unwrap_or(&[])
        } else {
            &[]
        }
    }

    pub(super) fn data_mut(&mut self) -> &mut [u8] {
        if self.has_data() {
            self.buf.get_mut(..self.length as usize).unwrap_or(&mut [])
        } else {
            &mut []
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Slots {
    slots: Vec<Slot>,
    /// Indices of free slots (a stack: the most recently freed is the warmest).
    free: Vec<u32>,
    /// Sum of the capacities of all buffers.
    buf_bytes: usize,
    /// Most buffer memory the connection may hold.
    buf_cap: usize,
    /// Largest request length; buffers are rounded up to a power of two but not past it.
    max_len: usize,
}

impl Slots {
    /// Creates `count` free slots with no buffers yet.
    pub(super) fn init(&mut self, count: u32, buf_cap: usize, max_len: usize) {
        self.slots = (0..count).map(|_| Slot::new()).collect();
        self.free = (0..count).rev().collect();
        self.buf_bytes = 0;
        self.max_len = max_len;
        self.buf_cap = buf_cap.max(alloc_len(max_len, max_len));
    }

    /// Slots not free.
    pub(super) fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Bytes held in buffers.
    pub(super) fn buffer_bytes(&self) -> usize {
        self.buf_bytes
    }

    pub(super) fn get(&self, slot: u32) -> Option<&Slot> {
        self.slots.get(slot as usize)
    }

    pub(super) fn get_mut(&mut self, slot: u32) -> Option<&mut Slot> {
        self.slots.get_mut(slot as usize)
    }

    /// The slot if it is in `state`.
    pub(super) fn in_state(&mut self, slot: u32, state: SlotState) -> Option<&mut Slot> {
        self.get_mut(slot).filter(|s| s.state == state)
    }

    /// Takes a free slot whose buffer holds at least `need` bytes, growing one if needed.
    /// `None` when no slot is free or the buffer cap cannot make room yet.
    pub(super) fn acquire(&mut self, need: usize) -> Option<u32> {
        if self.free.is_empty() {
            return None;
        }
        // Usable size (equal to the capacity: buffers are made with `vec![0; n]`).
        let cap_of = |slots: &[Slot], s: u32| slots[s as usize].buf.len();
        let pick = if need == 0 {
            // Prefer a slot without a buffer, then the smallest, to keep big ones for data.
            self.free
                .iter()
                .enumerate()
                .min_by_key(|&(_, &s)| cap_of(&self.slots, s))
                .map(|(i, _)| i)
        } else {
            // Best fit: the smallest buffer that is big enough, else the biggest one.
            let fits = self
                .free
                .iter()
                .enumerate()
                .filter(|&(_, &s)| cap_of(&self.slots, s) >= need)
                .min_by_key(|&(_, &s)| cap_of(&self.slots, s));
            fits.or_else(|| {
                self.free
                    .iter()
                    .enumerate()
                    .max_by_key(|&(_, &s)| cap_of(&self.slots, s))
            })
            .map(|(i, _)| i)
        }?;
        let slot = self.free[pick];
        let have = cap_of(&self.slots, slot);
        if have < need {
            let want = alloc_len(need, self.max_len);
            let held = self.slots[slot as usize].buf.capacity();
            while self.buf_bytes - held + want > self.buf_cap {
                // Release the biggest idle buffer other than the one being grown.
                let victim = self
                    .free
                    .iter()
                    .copied()
                    .filter(|&s| s != slot && cap_of(&self.slots, s) > 0)
                    .max_by_key(|&s| cap_of(&self.slots, s))?;
                let v = &mut self.slots[victim as usize].buf;
                self.buf_bytes -= v.capacity();
                *v = Vec::new();
            }
            let buf = &mut self.slots[slot as usize].buf;
            self.buf_bytes -= buf.capacity();
            // A fresh zeroed buffer: the old contents need not be kept.
            *buf = vec![0; want];
            self.buf_bytes += buf.capacity();
        }
        self.free.swap_remove(pick);
        Some(slot)
    }

    /// Returns a slot in use to the free list (its buffer is kept).
    pub(super) fn release(&mut self, slot: u32) {
        if let Some(s) = self.slots.get_mut(slot as usize) {
            if s.state != SlotState::Free {
                s.state = SlotState::Free;
                self.free.push(slot);
            }
        }
    }
}

/// Buffer size for a request of `need` bytes: the next power of two (at least 4 KiB), but
/// not beyond the largest request, so a few sizes serve every request.
fn alloc_len(need: usize, max_len: usize) -> usize {
    need.max(MIN_BUF)
        .checked_next_power_of_two()
        .unwrap_or(need)
        .min(max_len.max(need))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(slots: &mut Slots, need: usize) -> Option<u32> {
        let s = slots.acquire(need)?;
        slots.get_mut(s).unwrap().state = SlotState::Running;
        Some(s)
    }

    #[test]
    fn alloc_sizes() {
        assert_eq!(alloc_len(0, 1 << 25), 4096);
        assert_eq!(alloc_len(512, 1 << 25), 4096);
        assert_eq!(alloc_len(4097, 1 << 25), 8192);
        assert_eq!(alloc_len(1 << 25, 1 << 25), 1 << 25);
        // Not past the largest request, even when that is not a power of two.
        assert_eq!(alloc_len(3 << 20, 3 << 20), 3 << 20);
        assert_eq!(alloc_len(5000, 6000), 6000);
    }

    #[test]
    fn buffers_are_reused_and_grow_only_when_needed() {
        let mut s = Slots::default();
        s.init(2, 1 << 20, 1 << 20);
        let a = take(&mut s, 4096).unwrap();
        let ptr = s.get(a).unwrap().buf.as_ptr();
        s.release(a);
        // Same slot, same buffer.
        let b = take(&mut s, 1000).unwrap();
        assert_eq!(b, a);
        assert_eq!(s.get(b).unwrap().buf.as_ptr(), ptr);
        assert_eq!(s.buffer_bytes(), 4096);
        // A bigger request grows it.
        s.release(b);
        let c = take(&mut s, 10_000).unwrap();
        assert_eq!(s.get(c).unwrap().buf.capacity(), 16_384);
        assert_eq!(s.buffer_bytes(), 16_384);
        // Commands without data prefer the slot without a buffer.
        let d = take(&mut s, 0).unwrap();
        assert_ne!(d, c);
        assert_eq!(s.get(d).unwrap().buf.capacity(), 0);
        assert!(take(&mut s, 0).is_none(), "only two slots");
        assert_eq!(s.in_use(), 2);
    }

    #[test]
    fn cap_releases_idle_buffers_then_waits() {
        const K: usize = 1024;
        let mut s = Slots::default();
        s.init(3, 64 * K, 64 * K);
        let a = take(&mut s, 16 * K).unwrap();
        let b = take(&mut s, 16 * K).unwrap();
        s.release(a);
        s.release(b);
        assert_eq!(s.buffer_bytes(), 32 * K);
        // Growing one idle buffer to 64 KiB releases the other idle one.
        let c = take(&mut s, 64 * K).unwrap();
        assert_eq!(s.buffer_bytes(), 64 * K);
        assert_eq!(s.get(c).unwrap().buf.capacity(), 64 * K);
        // All the memory is in use: the next request with data has to wait...
        assert!(s.acquire(4096).is_none());
        assert_eq!(s.in_use(), 1);
        // ...until the big one is idle and can be given up.
        s.release(c);
        let d = take(&mut s, 4096).unwrap();
        assert_eq!(d, c, "best fit reuses the big idle buffer");
        let e = take(&mut s, 4096);
        assert!(e.is_none(), "64 KiB in use, nothing idle to release");
        // The cap never drops below one largest request.
        let mut t = Slots::default();
        t.init(1, 0, 1 << 20);
        assert!(take(&mut t, 1 << 20).is_some());
    }

    #[test]
    fn release_is_idempotent_and_bounds_checked() {
        let mut s = Slots::default();
        s.init(1, 1 << 20, 1 << 20);
        let a = take(&mut s, 0).unwrap();
        s.release(a);
        s.release(a);
        s.release(99);
        assert_eq!(s.in_use(), 0);
        assert!(s.get(99).is_none());
        assert!(take(&mut s, 0).is_some());
        assert!(take(&mut s, 0).is_none());
    }
}
