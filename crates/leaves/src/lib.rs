//! Leaf devices.

pub mod file;
pub mod mem;
pub mod nbd_client;
pub mod null;
pub mod powercut;
mod region;
pub mod registry;

pub use file::FileLeaf;
pub use mem::MemLeaf;
pub use nbd_client::NbdLeaf;
pub use null::NullLeaf;
pub use powercut::{PowerCutLeaf, PowerCutOptions, PowerCutStats};

/// Page size used for sparse RAM bookkeeping.
pub const PAGE_BYTES: usize = 4096;
