//! Link settings for the evoke binary only (dependencies are unaffected, so
//! their builds stay cached).
//!
//! `-z pack-relative-relocs` stores the ~43k relative relocations of this
//! position-independent binary as DT_RELR bitmaps (a few KiB) instead of a
//! 1 MiB RELA table that the dynamic loader reads on every start. Short-lived
//! commands (`evoke oci create|start|delete`, the VMM) start faster; ASLR
//! stays. Needs glibc 2.36+ at run time (Debian 12 has 2.36).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
