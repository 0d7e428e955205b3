//! `raid`: dm-raid's target, raid1 level (mirrored legs with dm-raid's superblock and the MD
//! write-intent bitmap on each leg's metadata device).

pub mod bitmap;
pub mod superblock;
