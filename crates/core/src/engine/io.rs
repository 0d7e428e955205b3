//! The engine's synchronous I/O for the library API and tests: running the inline reactor,
//! one I/O at a time with an interrupt or a polled wait, copies through the copy engine, and
//! the suspend deadlines checked as the reactor turns.

use super::{CopyReport, DevEntry, Engine, EngineError, Reactors, VolumeHandle, Wait};
use crate::bio::{BioFlags, Op};
use crate::buf::DataBuf;
use crate::reactor::{Completion, Request};
use crate::status::Status;
use crate::{DevId, Sector, SECTOR_SIZE};
use std::time::Instant;

impl Engine {
    /// Runs the reactor once, and resumes volumes whose suspend deadline passed.
    pub fn poll(&mut self) -> usize {
        let n = match &mut self.reactors {
            Reactors::Inline(r) => r.poll(),
            Reactors::Threads(_) => 0,
        };
        if self.suspended_count > 0 {
            self.expire_suspends();
        }
        n
    }

    fn expire_suspends(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .devs
            .iter()
            .filter_map(|d| match d {
                DevEntry::Volume(v) if matches!(v.suspended, Some(Some(t)) if t <= now) => {
                    Some(v.name.clone())
                }
                _ => None,
            })
            .collect();
        for name in expired {
            tracing::warn!(volume = %name, "suspend deadline passed; resuming by itself");
            let _ = self.resume(&name);
        }
    }

    /// Starts a top-level I/O; its completion comes back through `reap`.
    pub fn submit(&mut self, req: &Request) -> Result<(), Status> {
        self.reactor_mut().submit(req)
    }

    pub fn reap(&mut self) -> Option<Completion> {
        self.reactor_mut().reap()
    }

    /// Runs one I/O to completion on this thread (interrupt-free: the reactor runs inline).
    pub fn io(&mut self, req: Request) -> Status {
        self.run_io(req, Wait::Interrupt)
    }

    /// Submits one I/O (waiting for room unless `NOWAIT`) and waits for it as `wait` says.
    fn run_io(&mut self, mut req: Request, wait: Wait) -> Status {
        let tag = self.next_tag;
        self.next_tag += 1;
        req.user_data = tag;
        let root = loop {
            match self.reactor_mut().submit_id(&req) {
                Ok(id) => break id,
                Err(Status::Again) if !req.flags.contains(BioFlags::NOWAIT) => {
                    self.poll();
                }
                Err(s) => return s,
            }
        };
        let mut idle: u64 = 0;
        loop {
            if let Some(c) = self.reactor_mut().reap_tag(tag) {
                return c.status;
            }
            if wait == Wait::Polled {
                self.reactor_mut().poll_touched(root);
                continue;
            }
            if self.poll() > 0 {
                continue;
            }
            let r = self.reactor();
            if r.has_async_leaves() || r.requeued() > 0 || r.has_target_work() {
                self.sleep_inline();
                continue;
            }
            // With only synchronous leaves an idle reactor can never finish the I/O: that is a
            // lost bio (a bug), or the I/O is held by a volume this thread suspended.
            idle += 1;
            if idle > 100_000 {
                panic!(
                    "I/O never completed: nothing left to run ({} bios in use, {} held)",
                    r.pool().in_use(),
                    r.stats.held
                );
            }
            std::hint::spin_loop();
        }
    }

    /// Opens a volume for I/O with the given wait. A polled wait on a volume with a leaf that
    /// cannot poll is refused here, up front, rather than spinning on a queue that never
    /// completes by polling.
    pub fn open_volume(&mut self, name: &str, wait: Wait) -> Result<VolumeHandle, EngineError> {
        let info = self.dev_info(name)?;
        if wait == Wait::Polled && !info.limits.poll {
            let culprit = self.unpollable_leaf(info.id).unwrap_or_else(|| "?".into());
            return Err(EngineError::invalid(
                name,
                format!("cannot be polled: leaf '{culprit}' has no polled completion (its limits say poll = no)"),
            ));
        }
        let dev = self.open(name)?;
        Ok(VolumeHandle {
            name: name.to_string(),
            dev,
            wait,
        })
    }

    pub fn close_volume(&mut self, h: VolumeHandle) {
        self.close(h.dev);
    }

    fn unpollable_leaf(&self, id: DevId) -> Option<String> {
        match &self.devs[id.0 as usize] {
            DevEntry::Leaf(l) => (!l.leaf.limits().poll).then(|| l.name.clone()),
            DevEntry::Volume(_) => self
                .lookup()
                .children(id)
                .into_iter()
                .find_map(|c| self.unpollable_leaf(c)),
            DevEntry::Free => None,
        }
    }

    /// Runs one I/O on an open volume, waiting as the handle says.
    pub fn io_wait(&mut self, h: &VolumeHandle, mut req: Request) -> Status {
        req.dev = h.dev;
        self.run_io(req, h.wait)
    }

    /// Sleeps until an asynchronous leaf of the inline reactor has a completion.
    fn sleep_inline(&mut self) {
        let Reactors::Inline(r) = &mut self.reactors else {
            return;
        };
        self.wait_fds.clear();
        if !r.prepare_wait(&mut self.wait_fds) {
            return;
        }
        let nap = r.next_timer().map_or(crate::runtime::SLEEP_MAX, |t| {
            t.min(crate::runtime::SLEEP_MAX)
        });
        if self.wait_fds.is_empty() && r.next_timer().is_none() && !r.has_target_work() {
            return;
        }
        // Doorbells (a target's service thread) wake the sleep too.
        let waker = r.waker().clone();
        self.wait_fds.extend(waker.raw_fd());
        waker.set_sleeping(true);
        if waker.is_rung() {
            waker.set_sleeping(false);
            return;
        }
        let timeout = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: nap.as_nanos() as i64,
        };
        // SAFETY: the fds belong to the inline reactor's leaf channels, alive during the call.
        unsafe {
            crate::runtime::sleep_on(
                &mut self.pfds,
                self.wait_fds.iter().map(|&fd| (fd, false)),
                &timeout,
            )
        };
        waker.set_sleeping(false);
        waker.drain();
    }

    pub fn read(&mut self, h: &VolumeHandle, sector: Sector, buf: &mut [u8]) -> Status {
        // SAFETY: `buf` stays borrowed until `io_wait` returns, after the bio completed.
        let data = unsafe { DataBuf::from_slice(buf) };
        self.io_wait(
            h,
            Request::new(
                Op::Read,
                h.dev,
                sector,
                (buf.len() / SECTOR_SIZE) as u32,
                data,
                0,
            ),
        )
    }

    pub fn write(&mut self, h: &VolumeHandle, sector: Sector, buf: &[u8]) -> Status {
        // SAFETY: as in `read`; a write only reads the buffer.
        let data = unsafe { DataBuf::from_raw(buf.as_ptr() as *mut u8, buf.len()) };
        self.io_wait(
            h,
            Request::new(
                Op::Write,
                h.dev,
                sector,
                (buf.len() / SECTOR_SIZE) as u32,
                data,
                0,
            ),
        )
    }

    /// Callback-style driving for callers that keep their own queue depth: runs the reactor once
    /// and hands every finished I/O (submitted with `submit`) to `f`. Returns how many.
    pub fn drive(&mut self, mut f: impl FnMut(Completion)) -> usize {
        self.poll();
        let mut n = 0;
        while let Some(c) = self.reactor_mut().reap() {
            f(c);
            n += 1;
        }
        n
    }

    /// Copies `len` sectors from `src` to `dst` within a device (overlap behaves as a memmove),
    /// through the copy engine; waits for the end.
    pub fn copy(&mut self, dev: DevId, src: Sector, dst: Sector, len: Sector) -> Status {
        match self.copy_with(
            dev,
            src,
            dst,
            len,
            crate::copy::CopyOpts::default(),
            |_, _| true,
        ) {
            Ok(_) => Status::Ok,
            Err(s) => s,
        }
    }

    /// As `copy`, with the engine's knobs and a progress callback `(done, total)` in sectors;
    /// returning false from it cancels the job (pieces in flight finish, no new ones start).
    /// A range past the end is refused before anything is copied.
    pub fn copy_with(
        &mut self,
        dev: DevId,
        src: Sector,
        dst: Sector,
        len: Sector,
        opts: crate::copy::CopyOpts,
        mut progress: impl FnMut(Sector, Sector) -> bool,
    ) -> Result<CopyReport, Status> {
        let size = match self.devs.get(dev.0 as usize) {
            Some(DevEntry::Volume(v)) => v.active.as_ref().map_or(0, |t| t.size()),
            Some(DevEntry::Leaf(l)) => l.leaf.size(),
            _ => return Err(Status::Invalid),
        };
        if src.checked_add(len).is_none_or(|e| e > size)
            || dst.checked_add(len).is_none_or(|e| e > size)
        {
            return Err(Status::OutOfRange);
        }
        let before = self.reactor().stats;
        // Copy jobs tag their pieces 0b11 in the top bits (sync I/O uses 0b10), then a job number.
        let tag_base = (0xc000 | (self.next_tag & 0x3fff)) << 48;
        self.next_tag += 1;
        let mut job = crate::copy::CopyJob::new(dev, src, dst, len, opts, tag_base);
        loop {
            {
                let r = self.reactor_mut();
                job.start(&mut |req| r.submit(req));
            }
            if job.is_done() {
                break;
            }
            if self.poll() == 0 {
                self.sleep_inline();
            }
            while let Some(c) = self.reactor_mut().reap_if(|c| job.owns(c.user_data)) {
                job.complete(c);
                let (d, t) = job.progress();
                if !progress(d, t) {
                    job.cancel();
                }
            }
        }
        let after = self.reactor().stats;
        let st = job.status();
        if !st.is_ok() {
            return Err(st);
        }
        Ok(CopyReport {
            bytes: len * SECTOR_SIZE as u64,
            offloaded_bytes: after.copy_offloaded_bytes - before.copy_offloaded_bytes,
            kernel_bytes: after.copy_kernel_bytes - before.copy_kernel_bytes,
            emulated_bytes: after.copy_emulated_bytes - before.copy_emulated_bytes,
        })
    }

    pub fn read_at(&mut self, dev: DevId, sector: Sector, buf: &mut [u8]) -> Status {
        // SAFETY: `buf` stays borrowed until `io` returns, and `io` returns only after the bio and
        // all its clones completed.
        let data = unsafe { DataBuf::from_slice(buf) };
        self.io(Request::new(
            Op::Read,
            dev,
            sector,
            (buf.len() / SECTOR_SIZE) as u32,
            data,
            0,
        ))
    }

    pub fn write_at(&mut self, dev: DevId, sector: Sector, buf: &[u8]) -> Status {
        // SAFETY: as in `read_at`; a write only reads the buffer, so the shared borrow suffices.
        let data = unsafe { DataBuf::from_raw(buf.as_ptr() as *mut u8, buf.len()) };
        self.io(Request::new(
            Op::Write,
            dev,
            sector,
            (buf.len() / SECTOR_SIZE) as u32,
            data,
            0,
        ))
    }

    pub fn flush(&mut self, dev: DevId) -> Status {
        self.io(Request::new(Op::Flush, dev, 0, 0, DataBuf::EMPTY, 0))
    }

    pub fn discard(&mut self, dev: DevId, sector: Sector, sectors: u32) -> Status {
        self.io(Request::new(
            Op::Discard,
            dev,
            sector,
            sectors,
            DataBuf::EMPTY,
            0,
        ))
    }

    pub fn write_zeroes(&mut self, dev: DevId, sector: Sector, sectors: u32) -> Status {
        self.io(Request::new(
            Op::WriteZeroes,
            dev,
            sector,
            sectors,
            DataBuf::EMPTY,
            0,
        ))
    }
}
