//! stackbd: the program around the engine. `config` reads the configuration file and builds the
//! stack it describes.

pub mod config;
pub mod crypttab;
pub mod daemon;
pub mod devio;
pub mod luks;
