//! Loading a store from its COW device, as child I/O of whichever target touched it first:
//! read the header (format the device if it was never used), then every metadata area until
//! the table ends, filling the exception words. Runs with the store's token held, on one
//! reactor; bios that need the store wait parked and are rung when it is ready.

use super::format::{self, AreaEnd, Header};
use super::store::{
    CommitState, Store, DONE, K_FORMAT_HDR, K_LOAD_AREA, K_LOAD_HDR, LOADING, READY, UNLOADED,
};
use stackbd_core::{Op, Status, TargetCx};
use std::sync::atomic::Ordering;

impl Store {
    /// Starts loading if nobody has. Reactor thread.
    pub(crate) fn ensure_loaded(&self, cx: &mut TargetCx<'_>) {
        if self.state.load(Ordering::Acquire) != UNLOADED {
            return;
        }
        if self
            .state
            .compare_exchange(UNLOADED, LOADING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        // Loading holds the token: no commit starts before the store is ready, so it is free.
        self.token.store(true, Ordering::Release);
        let Some(b) = cx.bounce(self.geo.chunk_bytes()) else {
            self.load_failed(cx, "no bounce buffer for the COW header");
            return;
        };
        self.cs_mut().buf = Some(b.id());
        self.read_chunk(cx, K_LOAD_HDR, 0, b.data(), 0);
    }

    pub(super) fn load_failed(&self, cx: &mut TargetCx<'_>, why: &str) {
        tracing::error!(store = self.id, "loading the COW device failed: {why}");
        self.valid.store(false, Ordering::Release);
        self.finish_load(cx);
    }

    pub(super) fn finish_load(&self, cx: &mut TargetCx<'_>) {
        {
            let mut cs = self.cs_mut();
            if let Some(b) = cs.buf.take() {
                cx.release(b);
            }
        }
        self.state.store(READY, Ordering::Release);
        self.token.store(false, Ordering::Release);
        tracing::info!(
            store = self.id,
            valid = self.is_valid(),
            allocated = self.next_free.load(Ordering::Relaxed),
            "snapshot store loaded"
        );
        self.entry.ring();
        self.try_commit(cx);
    }

    pub(super) fn header_read(&self, cx: &mut TargetCx<'_>, status: Status) {
        if !status.is_ok() {
            return self.load_failed(cx, "reading the COW header failed");
        }
        let b = self.cs_mut().buf.expect("load buffer");
        let d = cx.bounce_data(b);
        let mut h = [0u8; 16];
        d.read_into(0, &mut h);
        match format::decode_header(&h) {
            Err(e) => self.load_failed(cx, &e.to_string()),
            Ok(Header::Fresh) => {
                format::encode_header(&mut h, true, self.geo.chunk_sectors);
                d.fill_zero();
                d.write_from(0, &h);
                self.chunk_io(cx, Op::Write, K_FORMAT_HDR, 0, d, 0);
            }
            Ok(Header::Store { chunk_sectors, .. }) if chunk_sectors != self.geo.chunk_sectors => {
                self.load_failed(
                    cx,
                    &format!(
                        "the COW header says chunk size {chunk_sectors}, the table {}",
                        self.geo.chunk_sectors
                    ),
                )
            }
            Ok(Header::Store { valid: false, .. }) => {
                self.cs_mut().invalid_written = true;
                self.load_failed(cx, "the COW header says the snapshot is invalid")
            }
            Ok(Header::Store { valid: true, .. }) => match self.geo.area_chunk(0) {
                Ok(a) => self.read_chunk(cx, K_LOAD_AREA, a, d, 0),
                Err(e) => self.load_failed(cx, &e.to_string()),
            },
        }
    }

    pub(super) fn area_read(&self, cx: &mut TargetCx<'_>, k: u64, status: Status) {
        if !status.is_ok() {
            return self.load_failed(cx, "reading a COW metadata area failed");
        }
        let b = self.cs_mut().buf.expect("load buffer");
        let d = cx.bounce_data(b);
        let mut max_new = 0u64;
        let mut cs = self.cs_mut();
        let CommitState { area, order, .. } = &mut *cs;
        d.read_into(0, area);
        let end = format::decode_area(&self.geo, k, area, self.origin_chunks, |e| {
            self.map[e.old as usize].store(e.new | DONE, Ordering::Release);
            max_new = max_new.max(e.new);
            if self.merge {
                order.push((e.old, e.new));
            }
        });
        if self.merge {
            // Status shows what is left to merge from the moment the table is known.
            self.remaining.store(order.len() as u64, Ordering::Release);
        }
        drop(cs);
        self.next_free.fetch_max(max_new + 1, Ordering::AcqRel);
        match end {
            Err(e) => self.load_failed(cx, &e.to_string()),
            Ok(AreaEnd::Full) => {
                let next = self.geo.area_chunk(k + 1);
                match next {
                    Ok(a) if a < self.geo.cow_chunks => {
                        self.area_index.store(k + 1, Ordering::Release);
                        self.read_chunk(cx, K_LOAD_AREA, a, d, k + 1)
                    }
                    // The last area is full and the device ends: nothing more to write.
                    _ => {
                        let mut cs = self.cs_mut();
                        cs.area_index = k + 1;
                        cs.used = 0;
                        cs.area.fill(0);
                        drop(cs);
                        self.finish_load(cx)
                    }
                }
            }
            Ok(AreaEnd::Partial { used }) => {
                let mut cs = self.cs_mut();
                cs.area_index = k;
                cs.used = used;
                drop(cs);
                self.area_index.store(k, Ordering::Release);
                self.finish_load(cx)
            }
        }
    }
}
