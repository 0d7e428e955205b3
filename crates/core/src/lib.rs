//! stackbd core: the bio and its frame stack, per-reactor pools, limits stacking, dmsetup
//! tables, targets and leaves as traits, the reactor run loop, and the volume control plane.
//!
//! Read `DESIGN.md` (shared) for the vocabulary; names here follow device-mapper's.

pub mod alloc_count;
pub mod bio;
pub mod buf;
pub mod copy;
pub mod engine;
pub mod events;
pub mod leaf;
pub mod limits;
pub mod reactor;
pub mod rq;
pub mod runtime;
pub mod service;
pub mod status;
pub mod table;
pub mod target;
pub mod volume;

pub use bio::{Bio, BioFlags, BioId, Op};
pub use buf::DataBuf;
pub use engine::{
    CopyReport, Engine, EngineError, SuspendOpts, VolumeHandle, VolumeInfo, Wait,
    MAX_DRAIN_TIMEOUT, MAX_SUSPEND_DEADLINE,
};
pub use leaf::{HealthState, Leaf, LeafChannel, LeafCx, LeafHealth};
pub use limits::Limits;
pub use reactor::{Completion, Reactor, ReactorConfig, Request};
pub use rq::{QueueOpts, Scheduler};
pub use service::{Doorbell, Service, ServiceCx, ServiceHandle};
pub use status::Status;
pub use table::{Table, TableError};
pub use target::{
    ArgError, Bounce, ChildIo, CopyIo, CtorCx, DevRef, Endio, MapResult, ReactorInit, Target,
    TargetCx, TargetRegistry,
};

/// A 512-byte sector number or count.
pub type Sector = u64;

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: usize = 512;

/// Index of a device (leaf or volume) in an engine; reactors index their state by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevId(pub u32);
