//! Link settings for the evoke binary only (dependencies are unaffected, so
//! their builds stay cached).
//!
//! The binary is linked as a fixed-address executable (`-no-pie`). As a
//! position-independent executable it carried ~43k relative relocations
//! over ~900 KiB of read-only-after-relocation data: the dynamic loader
//! wrote to every one of those pages at each start, and the copy-on-write
//! faults (about 225 of the 356 page faults of `evoke oci --version`) were
//! most of the start-up cost of the short commands a container manager
//! runs several times per container (`evoke oci create|start|delete`), and
//! private memory in every long-lived evoke process (the VMM, monitors).
//! The cost: the executable's own image is not randomised (shared libraries,
//! stack, heap and mmap still are), as with Go-built runtimes (runc, k3s).
//! `-z pack-relative-relocs` keeps the few relocations left compact.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg-bins=-no-pie");
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
