//! stackbd test kit: a counting global allocator, a random stack generator with its flat
//! reference model, and helpers shared by the model tests of every leaf kind.

pub use stackbd_core::alloc_count as alloc;
pub mod model;
pub mod rng;
pub mod shadow;
pub mod stackgen;
