//! Bio-based targets. Each module is one table target type, with dmsetup's arguments.

pub mod crypt;
pub mod delay;
pub mod dust;
pub mod error;
pub mod flakey;
pub mod linear;
pub mod multipath;
pub mod raid;
pub mod snapshot;
pub mod striped;
pub mod zero;

use stackbd_core::TargetRegistry;

/// Registers every target type this crate provides.
pub fn register_all(r: &mut TargetRegistry) {
    r.register("delay", delay::Delay::ctor);
    r.register("linear", linear::Linear::ctor);
    r.register("multipath", multipath::Multipath::ctor);
    r.register("striped", striped::Striped::ctor);
    r.register("zero", zero::Zero::ctor);
    r.register("error", error::Error::ctor);
    r.register("flakey", flakey::Flakey::ctor);
    r.register("dust", dust::Dust::ctor);
    r.register("crypt", crypt::Crypt::ctor);
    r.register("snapshot-origin", snapshot::Origin::ctor);
    r.register("snapshot", snapshot::Snapshot::ctor);
    r.register("snapshot-merge", snapshot::Merge::ctor);
    r.register("raid", raid::Raid::ctor);
}

/// A registry with every built-in target.
pub fn registry() -> TargetRegistry {
    let mut r = TargetRegistry::new();
    register_all(&mut r);
    r
}
