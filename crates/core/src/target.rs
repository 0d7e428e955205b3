//! Targets: the pieces of a table that map bios onto underlying devices.

use crate::bio::{Bio, BioId, FrameFallback, FrameKind};
use crate::limits::Limits;
use crate::status::Status;
use crate::{DevId, Sector};
use bytemuck::Pod;
use std::collections::BTreeMap;
use std::fmt;

/// What `Target::map` did with a bio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapResult {
    /// The target set `bio.dev` and `bio.sector`; the core passes it down.
    Remapped,
    /// The target kept the bio (queued it) and will resubmit or complete it itself.
    Submitted,
    /// Complete the bio now with this status (the core defers it to the completion queue).
    Done(Status),
    /// The target cannot map it now (no usable path) and left it unchanged: the core keeps it on
    /// the volume's requeue list and calls `map` again after `REQUEUE_DELAY` (or sooner, when a
    /// reactor turn finds the list due). Used by `queue_if_no_path`.
    Requeue,
}

/// How long a bio a target asked to requeue waits before `map` is tried again.
pub const REQUEUE_DELAY: std::time::Duration = std::time::Duration::from_millis(5);

/// What a target's `end_io` did with a completing bio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endio {
    /// Go on completing upward.
    Done,
    /// The target keeps the bio (retry, requeue, failover) and will resubmit it.
    Keep,
    /// Map this bio again through the same target at once (failover after a path error). The
    /// target must have put `bio.sector` back to the target-relative sector `map` saw (from its
    /// frame); the core resets `bio.dev`, the status and the data window.
    Requeue,
}

/// What a target may do while mapping: push its frame.
pub struct MapCx<'a> {
    pub(crate) vol: DevId,
    pub(crate) target: u16,
    pub(crate) id: BioId,
    pub(crate) fallback: &'a mut FrameFallback,
}

impl MapCx<'_> {
    /// The bio being mapped, for targets that keep it.
    pub fn bio_id(&self) -> BioId {
        self.id
    }

    /// Pushes this target's frame; its `end_io` will run when the bio completes and can read the
    /// context with `Bio::popped_ctx`.
    pub fn push<T: Pod>(&mut self, bio: &mut Bio, ctx: &T) {
        bio.frames.push(
            FrameKind::Target {
                target: self.target,
            },
            self.vol,
            ctx,
            self.fallback,
        );
    }
}

/// What a target may do when a bio it pushed a frame on completes.
pub struct EndioCx<'a> {
    pub(crate) id: BioId,
    pub(crate) resubmit: &'a mut std::collections::VecDeque<BioId>,
}

impl EndioCx<'_> {
    pub fn bio_id(&self) -> BioId {
        self.id
    }

    /// Sends a kept bio down again (after remapping it); use with `Endio::Keep`.
    pub fn resubmit(&mut self, id: BioId) {
        self.resubmit.push_back(id);
    }
}

/// A reference to an underlying device, resolved when the table was built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevRef {
    pub id: DevId,
    pub name: String,
}

impl fmt::Display for DevRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// A device mapper target instance (one table line).
pub trait Target: Send + Sync + fmt::Debug + 'static {
    /// The target type, as written in tables (`linear`, `striped`, ...).
    fn kind(&self) -> &'static str;

    /// Maps a bio. On entry `bio.sector` is relative to the start of this target, and the bio
    /// neither crosses the end of the target nor a boundary reported by `max_io_len`.
    fn map(&self, bio: &mut Bio, cx: &mut MapCx<'_>) -> MapResult;

    /// Sectors from `offset` (relative to the target start) to the next point a bio must be
    /// split at, e.g. the end of a stripe chunk. `Sector::MAX` when there is none.
    fn max_io_len(&self, _offset: Sector) -> Sector {
        Sector::MAX
    }

    /// The device each of this target's flush bios goes to (`bio.map_index` says which one is
    /// being mapped). Empty: flushes skip this target. The table sends one flush per distinct
    /// device, so a device under many targets is flushed once.
    fn flush_devices(&self) -> Vec<DevId> {
        Vec::new()
    }

    /// Runs when a bio on which this target pushed a frame completes.
    fn end_io(&self, _bio: &mut Bio, _cx: &mut EndioCx<'_>) -> Endio {
        Endio::Done
    }

    /// Bytes of frame context this target pushes per bio (0 for pure remappers).
    fn frame_bytes(&self) -> usize {
        0
    }

    /// This target's limits: its own hints stacked with the devices under it.
    fn limits(&self, child: &dyn Fn(DevId) -> Limits) -> Limits;

    /// Where `[offset, offset + len)` (relative to the target) lies, for block status: on a
    /// device (possibly only a leading part of the range), or reading as zeros, or plain data.
    fn extent(&self, _offset: Sector, len: Sector) -> TargetExtent {
        TargetExtent::Data { len }
    }

    /// The devices this target uses.
    fn devices(&self) -> Vec<DevId>;

    /// The arguments as a table line prints them (canonical form).
    fn args(&self) -> String;

    /// `dmsetup status` text for this target.
    fn status(&self) -> String {
        String::new()
    }

    /// A `dmsetup message`; returns the reply text.
    fn message(&self, argv: &[&str]) -> Result<String, String> {
        Err(format!(
            "{} target does not accept messages (got '{}')",
            self.kind(),
            argv.join(" ")
        ))
    }

    /// Called before the volume is suspended (`noflush` keeps I/O queued inside the target).
    fn presuspend(&self, _noflush: bool) {}

    /// Called when the volume resumes (after a suspend, with this table live).
    fn resume(&self) {}

    /// True for a request-based target (multipath with `queue_mode rq`): the volume gets a
    /// request queue that merges and sorts bios, and the target maps whole requests. Every
    /// device under a request-based table must be a leaf.
    fn request_based(&self) -> bool {
        false
    }

    /// The table became live on a volume (create, resume with a new table). Targets with
    /// background work (a path checker) start it here; `env` names the volume and carries its
    /// event counter, which the target raises on state changes (`dmsetup wait` wakes).
    fn activate(&self, _env: &TargetEnv) {}

    /// The table stopped being live (replaced by a reload, or the volume removed): stop any
    /// background work started by `activate`. May be called without `activate`.
    fn deactivate(&self) {}
}

/// What a target gets when its table goes live.
#[derive(Clone, Debug)]
pub struct TargetEnv {
    /// The volume's name, for logs.
    pub volume: String,
    /// The volume's event counter.
    pub events: std::sync::Arc<crate::engine::Events>,
}

/// Answer of [`Target::extent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetExtent {
    /// The first `len` sectors lie on `dev` from `sector`.
    Dev {
        dev: DevId,
        sector: Sector,
        len: Sector,
    },
    /// `len` sectors that read as zeros and hold nothing (the `zero` target).
    Zero { len: Sector },
    /// `len` sectors of data with nothing below to ask.
    Data { len: Sector },
}

/// A constructor argument was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgError {
    /// The field, as dm-target documentation names it (`chunk_size`, `device`, `#stripes`...).
    pub field: String,
    pub reason: String,
}

impl ArgError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> ArgError {
        ArgError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Device facts a constructor needs.
#[derive(Clone, Debug)]
pub struct DevInfo {
    pub id: DevId,
    pub size: Sector,
    pub limits: Limits,
    /// The leaf itself when the device is a leaf (None for volumes): a path checker probes it
    /// with `Leaf::probe`, and request-based targets accept only leaves.
    pub leaf: Option<std::sync::Arc<dyn crate::leaf::Leaf>>,
}

/// Resolves device names while a table is built.
pub trait DeviceLookup {
    fn lookup(&self, name: &str) -> Option<DevInfo>;
    fn lookup_id(&self, id: DevId) -> Option<DevInfo>;
    /// True if `from` is `to` or depends on it through tables: mapping onto `from` from
    /// volume `to` would make a cycle.
    fn reaches(&self, from: DevId, to: DevId) -> bool;
}

/// What a target constructor gets.
pub struct CtorCx<'a> {
    pub start: Sector,
    pub len: Sector,
    /// The volume being loaded (None while checking a table outside any volume).
    pub(crate) this: Option<(DevId, &'a str)>,
    pub(crate) lookup: &'a dyn DeviceLookup,
}

impl<'a> CtorCx<'a> {
    pub fn new(
        start: Sector,
        len: Sector,
        this: Option<(DevId, &'a str)>,
        lookup: &'a dyn DeviceLookup,
    ) -> Self {
        CtorCx {
            start,
            len,
            this,
            lookup,
        }
    }

    /// Resolves device `name` (argument `field`) and checks that `[offset, offset + len)` lies on it.
    pub fn device(
        &self,
        field: &str,
        name: &str,
        offset: Sector,
        len: Sector,
    ) -> Result<(DevRef, DevInfo), ArgError> {
        if let Some((_, my_name)) = self.this {
            if name == my_name {
                return Err(ArgError::new(
                    field,
                    format!("volume '{my_name}' would stack on itself"),
                ));
            }
        }
        let info = self
            .lookup
            .lookup(name)
            .ok_or_else(|| ArgError::new(field, format!("unknown device '{name}'")))?;
        if let Some((me, my_name)) = self.this {
            if self.lookup.reaches(info.id, me) {
                return Err(ArgError::new(
                    field,
                    format!("volume '{my_name}' would stack on itself through '{name}'"),
                ));
            }
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| ArgError::new(field, "range overflows"))?;
        if end > info.size {
            return Err(ArgError::new(
                field,
                format!(
                    "range {offset}+{len} passes the end of device '{name}' ({} sectors)",
                    info.size
                ),
            ));
        }
        let lbs = info.limits.logical_block_sectors() as u64;
        if !offset.is_multiple_of(lbs) {
            return Err(ArgError::new(
                field,
                format!(
                    "offset {offset} is not a multiple of '{name}' logical block ({lbs} sectors)"
                ),
            ));
        }
        Ok((
            DevRef {
                id: info.id,
                name: name.to_string(),
            },
            info,
        ))
    }
}

/// Parses an unsigned number argument.
pub fn parse_num<T: std::str::FromStr>(field: &str, s: &str) -> Result<T, ArgError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ArgError::new(
            field,
            format!("'{s}' is not a non-negative integer"),
        ));
    }
    s.parse()
        .map_err(|_| ArgError::new(field, format!("'{s}' is out of range")))
}

/// Checks an argument count.
pub fn expect_args(args: &[&str], n: usize, usage: &str) -> Result<(), ArgError> {
    if args.len() != n {
        return Err(ArgError::new(
            "arguments",
            format!("expected {n} arguments ({usage}), got {}", args.len()),
        ));
    }
    Ok(())
}

/// A target constructor.
pub type CtorFn = fn(&CtorCx<'_>, &[&str]) -> Result<Box<dyn Target>, ArgError>;

/// The known target types.
#[derive(Default, Clone)]
pub struct TargetRegistry {
    ctors: BTreeMap<&'static str, CtorFn>,
}

impl TargetRegistry {
    pub fn new() -> TargetRegistry {
        TargetRegistry::default()
    }

    pub fn register(&mut self, kind: &'static str, ctor: CtorFn) {
        self.ctors.insert(kind, ctor);
    }

    pub fn get(&self, kind: &str) -> Option<CtorFn> {
        self.ctors.get(kind).copied()
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.ctors.keys().copied()
    }
}
