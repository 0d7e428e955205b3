//! `snapshot <origin> <COW device> <P|PO|N> <chunksize> [<#feature args> discard_zeroes_cow
//! discard_passdown_origin]`: reads of copied chunks come from the COW device, the others from
//! the origin; a write allocates a chunk on the COW device (the origin's chunk copied there
//! first), then goes there.
//!
//! The instance holds its [`Store`]; built on the control plane (refused while a
//! `snapshot-origin` over the same origin runs unsuspended, as dm requires), attached to the
//! origin's entry at once and detached when dropped.

use super::format;
use super::registry::OriginEntry;
use super::store::{untag, Lookup, Persistence, Store, K_COPY};
use stackbd_core::target::parse_num;
use stackbd_core::target::TargetEnv;
use stackbd_core::{
    ArgError, Bio, CtorCx, DevId, DevRef, Endio, Limits, MapResult, Op, ReactorInit, Sector,
    Status, Target, TargetCx,
};
use std::any::Any;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const USAGE: &str = "<origin> <COW device> <P|PO|N> <chunksize> [<#feature args> <arg>...]";

/// A `snapshot` table line. Shared by every reactor; see the module docs.
#[derive(Debug)]
pub struct Snapshot {
    origin: DevRef,
    cow: DevRef,
    store: Arc<Store>,
    discard_zeroes_cow: bool,
    discard_passdown_origin: bool,
    /// Owner id of this instance's doorbells in the origin's entry.
    owner: u64,
}

/// A `snapshot` or `snapshot-merge` line, parsed and its devices resolved. Control plane.
pub(crate) struct Parsed {
    pub(crate) origin: DevRef,
    pub(crate) origin_sectors: u64,
    pub(crate) cow: DevRef,
    pub(crate) cow_sectors: u64,
    pub(crate) kind: Persistence,
    pub(crate) chunk: u32,
    pub(crate) discard_zeroes_cow: bool,
    pub(crate) discard_passdown_origin: bool,
}

/// Parses `<origin> <COW device> <P|PO|N> <chunksize> [<#feature args> <arg>...]`.
pub(crate) fn parse(cx: &CtorCx<'_>, args: &[&str]) -> Result<Parsed, ArgError> {
    if args.len() < 4 {
        return Err(ArgError::new(
            "arguments",
            format!(
                "expected at least 4 arguments ({USAGE}), got {}",
                args.len()
            ),
        ));
    }
    let kind = match args[2] {
        "P" | "p" => Persistence::Persistent,
        "PO" | "po" => Persistence::PersistentOverflow,
        "N" | "n" => Persistence::Transient,
        k => {
            return Err(ArgError::new(
                "persistent?",
                format!("'{k}' is not P, PO or N"),
            ))
        }
    };
    let chunk: u32 = parse_num("chunksize", args[3])?;
    format::check_chunk_sectors(chunk).map_err(|e| ArgError::new("chunksize", e.to_string()))?;
    let (mut zeroes, mut passdown) = (false, false);
    if args.len() > 4 {
        let n: usize = parse_num("#feature args", args[4])?;
        if args.len() != 5 + n {
            return Err(ArgError::new(
                "#feature args",
                format!("says {n}, but {} follow", args.len() - 5),
            ));
        }
        for f in &args[5..] {
            match *f {
                "discard_zeroes_cow" => zeroes = true,
                "discard_passdown_origin" => passdown = true,
                f => return Err(ArgError::new("feature", format!("unknown feature '{f}'"))),
            }
        }
        if passdown && !zeroes {
            return Err(ArgError::new(
                "feature",
                "discard_passdown_origin needs discard_zeroes_cow",
            ));
        }
    }
    let (origin, oinfo) = cx.device("origin", args[0], 0, cx.len)?;
    let (cow, cinfo) = cx.device("COW device", args[1], 0, 0)?;
    if cow.id == origin.id {
        return Err(ArgError::new("COW device", "is the origin itself"));
    }
    Ok(Parsed {
        origin,
        origin_sectors: oinfo.size,
        cow,
        cow_sectors: cinfo.size,
        kind,
        chunk,
        discard_zeroes_cow: zeroes,
        discard_passdown_origin: passdown,
    })
}

impl Snapshot {
    /// Builds the target. Control plane; allocates the exception table.
    pub fn ctor(cx: &CtorCx<'_>, args: &[&str]) -> Result<Box<dyn Target>, ArgError> {
        let Parsed {
            origin,
            origin_sectors,
            cow,
            cow_sectors,
            kind,
            chunk,
            discard_zeroes_cow: zeroes,
            discard_passdown_origin: passdown,
        } = parse(cx, args)?;
        let entry = OriginEntry::get(cx.namespace(), origin.id);
        if entry.merging.load(Ordering::Acquire) > 0 {
            return Err(ArgError::new(
                "origin",
                format!("'{origin}' is being merged into: wait for the merge to finish"),
            ));
        }
        if entry.origins.load(Ordering::Acquire) > 0 && entry.suspended.load(Ordering::Acquire) == 0
        {
            return Err(ArgError::new(
                "origin",
                format!(
                    "'{origin}' is in use by a snapshot-origin that is not suspended: suspend it \
                     before loading a snapshot table"
                ),
            ));
        }
        let store = Store::new(
            entry.clone(),
            origin.id,
            origin_sectors,
            cow.id,
            cow_sectors,
            kind,
            chunk,
        )
        .map_err(|e| ArgError::new("COW device", e))?;
        let store = Arc::new(store);
        entry.add(store.clone());
        tracing::info!(origin = %origin, cow = %cow, kind = kind.as_str(), chunk, "snapshot attached");
        Ok(Box::new(Snapshot {
            origin,
            cow,
            store,
            discard_zeroes_cow: zeroes,
            discard_passdown_origin: passdown,
            owner: OriginEntry::new_owner(),
        }))
    }

    fn to_cow(&self, bio: &mut Bio, n: u64, off: u64) -> MapResult {
        bio.dev = self.cow.id;
        bio.sector = n * self.store.chunk_sectors() as u64 + off;
        MapResult::Remapped
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.store.entry.remove(self.store.id);
        self.store.entry.remove_bells(self.owner);
        tracing::info!(origin = %self.origin, cow = %self.cow, "snapshot detached");
    }
}

impl Target for Snapshot {
    fn kind(&self) -> &'static str {
        "snapshot"
    }

    fn map(&self, bio: &mut Bio, cx: &mut TargetCx<'_>) -> MapResult {
        let s = &*self.store;
        if !s.is_ready() {
            s.ensure_loaded(cx);
            if !s.is_ready() {
                return MapResult::Park { key: 0 };
            }
        }
        if !s.is_valid() {
            return MapResult::Done(Status::IoError);
        }
        if bio.op == Op::Flush {
            bio.dev = self.cow.id;
            return MapResult::Remapped;
        }
        let cs = s.chunk_sectors() as u64;
        let (c, off) = (bio.sector / cs, bio.sector % cs);
        match (bio.op, s.lookup(c)) {
            (_, Lookup::Wait) => MapResult::Park { key: 0 },
            (Op::Read, Lookup::None) => {
                // Counted until it completes: an origin write to the chunk waits for it.
                let bucket = s.read_started(c);
                cx.push(bio, &(bucket as u64));
                bio.dev = self.origin.id;
                MapResult::Remapped
            }
            (Op::Discard, Lookup::Cow(n)) if self.discard_zeroes_cow => self.to_cow(bio, n, off),
            (Op::Discard, _) => MapResult::Done(Status::Ok),
            (Op::Copy, _) => MapResult::Done(Status::NotSupported),
            (_, Lookup::Cow(n)) => self.to_cow(bio, n, off),
            (_, Lookup::None) => {
                if s.is_overflowed() {
                    return MapResult::Done(Status::IoError);
                }
                if !s.claim(c) {
                    return MapResult::Park { key: 0 };
                }
                match s.alloc() {
                    Some(n) => {
                        s.start_copy(cx, c, n);
                        MapResult::Park { key: 0 }
                    }
                    None => {
                        s.unclaim(c);
                        if s.kind == Persistence::PersistentOverflow {
                            s.overflow();
                        } else {
                            s.invalidate(cx, "the COW device is full");
                        }
                        MapResult::Done(Status::IoError)
                    }
                }
            }
        }
    }

    fn end_io(&self, bio: &mut Bio, _cx: &mut TargetCx<'_>) -> Endio {
        let bucket: u64 = bio.popped_ctx();
        self.store.read_done(bucket as u32);
        Endio::Done
    }

    fn frame_bytes(&self) -> usize {
        8
    }

    fn max_io_len(&self, offset: Sector) -> Sector {
        let cs = self.store.chunk_sectors() as u64;
        cs - offset % cs
    }

    fn flush_devices(&self) -> Vec<DevId> {
        vec![self.cow.id]
    }

    fn reactor_state(&self, init: &ReactorInit) -> Option<Box<dyn Any + Send>> {
        self.store.entry.add_bell(self.owner, init.doorbell.clone());
        None
    }

    fn child_done(&self, cx: &mut TargetCx<'_>, tag: u64, status: Status) {
        let (kind, _, v) = untag(tag);
        self.store.child_done(cx, kind, v, status);
    }

    fn copy_done(&self, cx: &mut TargetCx<'_>, tag: u64, status: Status) {
        self.store.copy_done(cx, untag(tag).2, status);
    }

    fn timer(&self, cx: &mut TargetCx<'_>, token: u64) {
        let (kind, _, v) = untag(token);
        if kind == K_COPY {
            self.store.retry_ready(cx, v);
        }
    }

    fn wake(&self, cx: &mut TargetCx<'_>) {
        cx.unpark_where(|_| true);
        // Rung at `activate` too: the store loads as soon as the table is live.
        self.store.ensure_loaded(cx);
    }

    fn activate(&self, _env: &TargetEnv) {
        self.store.entry.ring();
    }

    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits {
        child(self.origin.id)
    }

    fn devices(&self) -> Vec<DevId> {
        vec![self.origin.id, self.cow.id]
    }

    fn args(&self) -> String {
        let mut a = format!(
            "{} {} {} {}",
            self.origin,
            self.cow,
            self.store.kind.as_str(),
            self.store.chunk_sectors()
        );
        let n = self.discard_zeroes_cow as u8 + self.discard_passdown_origin as u8;
        if n > 0 {
            a.push_str(&format!(" {n}"));
            if self.discard_zeroes_cow {
                a.push_str(" discard_zeroes_cow");
            }
            if self.discard_passdown_origin {
                a.push_str(" discard_passdown_origin");
            }
        }
        a
    }

    fn status(&self) -> String {
        self.store.status()
    }
}
