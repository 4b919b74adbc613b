//! One file per subcommand. Each parses its flags and drives a library crate.

pub mod agent;
pub mod containers;
pub mod image;
pub mod net;
pub mod oci;
pub mod run;
pub mod server;
pub mod vmm;
