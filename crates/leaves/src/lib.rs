//! Leaf devices.

pub mod file;
pub mod mem;
pub mod null;
mod region;

pub use file::FileLeaf;
pub use mem::MemLeaf;
pub use null::NullLeaf;

/// Page size used for sparse RAM bookkeeping.
pub const PAGE_BYTES: usize = 4096;
