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
//!
//! It is also linked statically against glibc when the static archives are
//! installed (libc6-dev and gcc provide them). Loading libc, libm and
//! libgcc_s, resolving their symbols and the copy-on-write faults of their
//! relocations cost each start about 0.25 ms on this host (~70 of its ~150
//! page faults), three starts per container. Name lookups still work:
//! static glibc reads /etc/hosts and DNS itself, and loads other NSS modules
//! only when nsswitch.conf names them. `EVOKE_DYNAMIC_LINK=1` keeps the
//! dynamic link.
//!
//! rustc's own switch for this, `-C target-feature=+crt-static`, cannot be
//! given to one binary through cargo (only to every crate, proc macros
//! included, which it breaks). So the link arguments here do its job: the
//! driver gets `-static`, and a directory searched before the system's holds
//! static stand-ins named after the libraries rustc asks for (`-lgcc_s`
//! becomes libgcc_eh + libgcc, `-lc`/`-lm`/... glibc's archives).
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=EVOKE_DYNAMIC_LINK");
    println!("cargo:rustc-link-arg-bins=-no-pie");
    match static_libs() {
        Ok(dir) => {
            println!("cargo:rustc-link-arg-bins=-static");
            println!("cargo:rustc-link-arg-bins=-L{}", dir.display());
        }
        Err(why) => {
            if !why.is_empty() {
                println!("cargo:warning=evoke is linked dynamically: {why}");
            }
            // Keeps the few relocations a dynamic link has compact.
            println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
        }
    }
}

/// A directory of static archives under the names rustc links glibc and
/// libgcc by, or why there is none (empty when not wanted).
fn static_libs() -> Result<PathBuf, String> {
    if std::env::var("EVOKE_DYNAMIC_LINK").is_ok_and(|v| v == "1") {
        return Err(String::new());
    }
    let target = std::env::var("TARGET").unwrap_or_default();
    if !(target.ends_with("-linux-gnu") && target.starts_with("x86_64")) {
        return Err(format!("no static glibc link for target {target}"));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let dir = out.join("static-glibc");
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    for lib in ["c", "m", "dl", "rt", "pthread", "util"] {
        let archive = find(&cc, &format!("lib{lib}.a"))?;
        link(&archive, &dir.join(format!("lib{lib}.a")))?;
    }
    // libgcc_s's unwinder, statically: libgcc_eh, which needs libgcc.
    let (eh, gcc) = (find(&cc, "libgcc_eh.a")?, find(&cc, "libgcc.a")?);
    let script = format!("GROUP ( {} {} )\n", eh.display(), gcc.display());
    let path = dir.join("libgcc_s.a");
    std::fs::write(&path, script).map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(dir)
}

/// The full path of `file` as the C compiler finds it.
fn find(cc: &str, file: &str) -> Result<PathBuf, String> {
    let out = Command::new(cc)
        .arg(format!("-print-file-name={file}"))
        .output()
        .map_err(|e| format!("run {cc}: {e}"))?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    // Without a match the compiler prints the bare name back.
    if path.is_absolute() && path.is_file() {
        Ok(path)
    } else {
        Err(format!("{file} not found by {cc} (install libc6-dev)"))
    }
}

fn link(target: &Path, at: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(target, at)
        .map_err(|e| format!("symlink {} -> {}: {e}", at.display(), target.display()))
}
