//! Snapshots in dm's syntax and on-disk format: `snapshot-origin`, `snapshot` and
//! `snapshot-merge`.
//!
//! - [`format`]: the persistent COW layout as bytes (pure).
//! - [`store`]: one snapshot's exception table, allocation and commit; `load.rs` its load.
//! - [`registry`]: how a snapshot and its origin find each other (per engine, per device).
//! - [`origin`], [`snap`], [`merge`]: the targets.

pub mod format;
mod load;
pub mod merge;
pub mod origin;
pub mod registry;
pub mod snap;
pub mod store;

pub use merge::Merge;
pub use origin::Origin;
pub use snap::Snapshot;
