//! The copy engine (like dm's kcopyd): runs a large copy as pieces, with a bounded number in
//! flight, progress and cancel. Each piece is one `Copy` bio that travels down the stack and is
//! offloaded or emulated layer by layer. Overlapping ranges behave as a memmove: the pieces are
//! cut no longer than the distance between source and destination and run one at a time, from
//! the end when the destination is above the source, from the start otherwise.

use crate::bio::Op;
use crate::buf::DataBuf;
use crate::reactor::{Completion, Request};
use crate::runtime::{Frontend, FrontendCx};
use crate::status::Status;
use crate::{DevId, Sector};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Copy engine knobs.
#[derive(Clone, Copy, Debug)]
pub struct CopyOpts {
    /// Sectors per piece (each piece is one bio).
    pub piece_sectors: u32,
    /// Pieces in flight at once.
    pub max_inflight: usize,
    /// Emulate every piece (no offload anywhere).
    pub emulate: bool,
}

impl Default for CopyOpts {
    fn default() -> Self {
        // 16 MiB pieces, 8 in flight.
        CopyOpts {
            piece_sectors: 16 << 11,
            max_inflight: 8,
            emulate: false,
        }
    }
}

/// One copy job.
#[derive(Debug)]
pub struct CopyJob {
    vol: DevId,
    src: Sector,
    dst: Sector,
    len: Sector,
    piece: Sector,
    max_inflight: usize,
    backward: bool,
    /// Sectors handed out so far, counted in job order.
    issued: Sector,
    inflight: usize,
    done: Sector,
    status: Status,
    cancelled: bool,
    emulate: bool,
    /// High bits of the tags of this job's bios.
    tag_base: u64,
}

impl CopyJob {
    pub fn new(
        vol: DevId,
        src: Sector,
        dst: Sector,
        len: Sector,
        opts: CopyOpts,
        tag_base: u64,
    ) -> CopyJob {
        let overlap = src < dst + len && dst < src + len && src != dst;
        let (piece, max_inflight) = if overlap {
            (src.abs_diff(dst).min(opts.piece_sectors as Sector), 1)
        } else {
            (
                opts.piece_sectors.max(1) as Sector,
                opts.max_inflight.max(1),
            )
        };
        CopyJob {
            vol,
            src,
            dst,
            len: if src == dst { 0 } else { len },
            piece,
            max_inflight,
            backward: overlap && dst > src,
            issued: 0,
            inflight: 0,
            done: 0,
            status: Status::Ok,
            cancelled: false,
            emulate: opts.emulate,
            tag_base,
        }
    }

    /// Starts pieces up to the in-flight bound with `submit`. Returns how many started.
    pub fn start(&mut self, submit: &mut dyn FnMut(&Request) -> Result<(), Status>) -> usize {
        let mut n = 0;
        while self.inflight < self.max_inflight
            && self.issued < self.len
            && !self.cancelled
            && self.status.is_ok()
        {
            let sectors = (self.len - self.issued).min(self.piece);
            let off = if self.backward {
                self.len - self.issued - sectors
            } else {
                self.issued
            };
            let mut req = Request::new(
                Op::Copy,
                self.vol,
                self.dst + off,
                sectors as u32,
                DataBuf::EMPTY,
                self.tag_base | off,
            );
            req.copy_src = self.src + off;
            if self.emulate {
                req.flags = crate::bio::BioFlags::NO_OFFLOAD;
            }
            match submit(&req) {
                Ok(()) => {
                    self.issued += sectors;
                    self.inflight += 1;
                    n += 1;
                }
                Err(Status::Again) => break,
                Err(s) => {
                    self.status = s;
                    break;
                }
            }
        }
        n
    }

    /// True if `user_data` is one of this job's pieces.
    pub fn owns(&self, user_data: u64) -> bool {
        user_data & !0xffff_ffff_ffff == self.tag_base & !0xffff_ffff_ffff
    }

    /// Length of the piece that starts at job offset `off`.
    fn piece_len(&self, off: Sector) -> Sector {
        if self.backward {
            // Pieces end at len, len - piece, ...; only the lowest one (at 0) can be short.
            let rem = self.len % self.piece;
            if off == 0 && rem != 0 {
                rem
            } else {
                self.piece
            }
        } else {
            self.piece.min(self.len - off)
        }
    }

    /// A piece finished.
    pub fn complete(&mut self, c: Completion) {
        self.inflight -= 1;
        if c.status.is_ok() {
            self.done += self.piece_len(c.user_data & 0xffff_ffff_ffff);
        } else if self.status.is_ok() {
            self.status = c.status;
        }
    }

    pub fn cancel(&mut self) {
        self.cancelled = true;
    }

    /// Sectors copied so far and in all.
    pub fn progress(&self) -> (Sector, Sector) {
        (self.done, self.len)
    }

    pub fn is_done(&self) -> bool {
        self.inflight == 0 && (self.issued == self.len || self.cancelled || !self.status.is_ok())
    }

    /// The outcome: the first error, or `Shutdown` for a cancelled job.
    pub fn status(&self) -> Status {
        if !self.status.is_ok() {
            self.status
        } else if self.cancelled && self.done < self.len {
            Status::Shutdown
        } else {
            Status::Ok
        }
    }
}

/// A copy job's progress, shared with whoever watches it (the control socket).
#[derive(Debug, Default)]
pub struct CopyProgress {
    pub done_sectors: AtomicU64,
    pub total_sectors: AtomicU64,
    /// `Status as u8` once finished.
    pub status: AtomicU8,
    pub finished: AtomicBool,
    pub cancel: AtomicBool,
}

/// A copy job living on a reactor thread.
pub struct CopyFrontend {
    job: CopyJob,
    progress: Arc<CopyProgress>,
}

impl CopyFrontend {
    pub fn new(job: CopyJob, progress: Arc<CopyProgress>) -> CopyFrontend {
        progress.total_sectors.store(job.len, Ordering::Relaxed);
        CopyFrontend { job, progress }
    }
}

impl Frontend for CopyFrontend {
    fn poll(&mut self, cx: &mut FrontendCx<'_>) -> usize {
        if self.progress.cancel.load(Ordering::Relaxed) {
            self.job.cancel();
        }
        self.job.start(&mut |r| cx.submit(r))
    }

    fn complete(&mut self, _cx: &mut FrontendCx<'_>, c: Completion) {
        self.job.complete(c);
        self.progress
            .done_sectors
            .store(self.job.done, Ordering::Relaxed);
        if self.job.is_done() {
            self.progress
                .status
                .store(self.job.status() as u8, Ordering::Relaxed);
            self.progress.finished.store(true, Ordering::Release);
        }
    }

    fn finished(&self) -> bool {
        let done = self.job.is_done();
        if done && !self.progress.finished.load(Ordering::Relaxed) {
            // An empty or refused job finishes without a completion.
            self.progress
                .status
                .store(self.job.status() as u8, Ordering::Relaxed);
            self.progress.finished.store(true, Ordering::Release);
        }
        done
    }
}
