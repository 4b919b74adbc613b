//! The VMM process's own cgroup: memory capped at guest RAM plus overhead,
//! CPU time capped at one CPU per vCPU, so a spinning or ballooning guest
//! cannot take the host with it. Works on cgroup v2 (unified) and on v1
//! hierarchies (`memory`, `cpu`), as found on hybrid hosts.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::VmmError;

/// What the VMM's cgroup allows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CgroupSpec {
    /// Leaf name, unique per VM (e.g. the workload id).
    pub name: String,
    pub memory_bytes: u64,
    /// CFS quota per 100 ms period; `vcpus * 100_000` caps at `vcpus` CPUs.
    pub cpu_quota_us: u64,
}

/// The VMM's memory budget beyond guest RAM: its own heap and threads,
/// KVM's per-VM structures and page tables.
pub const VMM_OVERHEAD_BYTES: u64 = 64 << 20;

const PERIOD_US: u64 = 100_000;
const PARENT: &str = "evoke-vmm";

/// A created cgroup (one directory on v2, one per controller on v1).
#[derive(Debug, Clone)]
pub struct VmmCgroup {
    dirs: Vec<PathBuf>,
}

fn write(path: &Path, value: &str) -> Result<(), VmmError> {
    fs::write(path, value).map_err(|source| VmmError::Cgroup {
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), VmmError> {
    fs::create_dir_all(path).map_err(|source| VmmError::Cgroup {
        path: path.to_path_buf(),
        source,
    })
}

impl VmmCgroup {
    /// Creates the cgroup under `root` (normally `/sys/fs/cgroup`) and sets
    /// its limits.
    pub fn create(spec: &CgroupSpec, root: &Path) -> Result<Self, VmmError> {
        if spec.name.is_empty() || spec.name.contains('/') || spec.name.starts_with('.') {
            return Err(VmmError::Config(format!("bad cgroup name {:?}", spec.name)));
        }
        if root.join("cgroup.controllers").exists() {
            // v2: enable the controllers for our subtree, then set limits.
            let parent = root.join(PARENT);
            mkdir(&parent)?;
            write(&root.join("cgroup.subtree_control"), "+memory +cpu")?;
            write(&parent.join("cgroup.subtree_control"), "+memory +cpu")?;
            let dir = parent.join(&spec.name);
            mkdir(&dir)?;
            write(&dir.join("memory.max"), &spec.memory_bytes.to_string())?;
            // Not every kernel has swap accounting; the cap above still holds.
            let _ = fs::write(dir.join("memory.swap.max"), "0");
            write(
                &dir.join("cpu.max"),
                &format!("{} {PERIOD_US}", spec.cpu_quota_us),
            )?;
            return Ok(Self { dirs: vec![dir] });
        }
        let mem = root.join("memory");
        let cpu = root.join("cpu");
        if !mem.is_dir() || !cpu.is_dir() {
            return Err(VmmError::Cgroup {
                path: root.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no cgroup v2 controllers and no v1 memory and cpu hierarchies mounted",
                ),
            });
        }
        let mem_dir = mem.join(PARENT).join(&spec.name);
        let cpu_dir = cpu.join(PARENT).join(&spec.name);
        mkdir(&mem_dir)?;
        mkdir(&cpu_dir)?;
        let cg = Self {
            dirs: vec![mem_dir.clone(), cpu_dir.clone()],
        };
        write(
            &mem_dir.join("memory.limit_in_bytes"),
            &spec.memory_bytes.to_string(),
        )?;
        let _ = fs::write(
            mem_dir.join("memory.memsw.limit_in_bytes"),
            spec.memory_bytes.to_string(),
        );
        write(&cpu_dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
        write(
            &cpu_dir.join("cpu.cfs_quota_us"),
            &spec.cpu_quota_us.to_string(),
        )?;
        Ok(cg)
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), VmmError> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The cgroup's directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Removes the cgroup; it must have no processes left.
    pub fn remove(&self) -> Result<(), VmmError> {
        for d in &self.dirs {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(VmmError::Cgroup {
                        path: d.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Finds the cgroup of an earlier `create` with the same name (to remove
    /// it from another process).
    pub fn existing(name: &str, root: &Path) -> Self {
        let dirs = if root.join("cgroup.controllers").exists() {
            vec![root.join(PARENT).join(name)]
        } else {
            vec![
                root.join("memory").join(PARENT).join(name),
                root.join("cpu").join(PARENT).join(name),
            ]
        };
        Self { dirs }
    }
}

/// The spec for a VM of `mem_bytes` guest RAM and `vcpus` vCPUs.
pub fn spec_for(name: &str, mem_bytes: u64, vcpus: u8) -> CgroupSpec {
    CgroupSpec {
        name: name.to_string(),
        memory_bytes: mem_bytes + VMM_OVERHEAD_BYTES,
        cpu_quota_us: u64::from(vcpus.max(1)) * PERIOD_US,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_cgroups() -> bool {
        let ok = nix::unistd::geteuid().is_root()
            && (Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
                || Path::new("/sys/fs/cgroup/memory").is_dir());
        if !ok && std::env::var_os("CI").is_some() {
            panic!("CI runs as root with cgroups mounted; this host has neither");
        }
        if !ok {
            eprintln!("skipping: needs root and a cgroup hierarchy");
        }
        ok
    }

    #[test]
    fn a_process_placed_in_the_vmm_cgroup_is_capped_in_memory_and_cpu() {
        if !real_cgroups() {
            return;
        }
        let name = format!("test-{}-{}", std::process::id(), line!());
        let spec = spec_for(&name, 128 << 20, 2);
        let cg = VmmCgroup::create(&spec, Path::new("/sys/fs/cgroup")).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        cg.add_pid(child.id()).unwrap();
        let membership = fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        let mem_limit = cg
            .dirs()
            .iter()
            .find_map(|d| {
                fs::read_to_string(d.join("memory.max"))
                    .or_else(|_| fs::read_to_string(d.join("memory.limit_in_bytes")))
                    .ok()
            })
            .unwrap();
        let quota = cg
            .dirs()
            .iter()
            .find_map(|d| {
                fs::read_to_string(d.join("cpu.max"))
                    .or_else(|_| fs::read_to_string(d.join("cpu.cfs_quota_us")))
                    .ok()
            })
            .unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        // The kernel needs a moment to drop the dead task from the cgroup.
        let mut removed = Err(VmmError::Setup("not tried"));
        for _ in 0..100 {
            removed = cg.remove();
            if removed.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(membership.contains(&name), "{membership}");
        assert_eq!(
            mem_limit.trim(),
            ((128u64 << 20) + VMM_OVERHEAD_BYTES).to_string()
        );
        assert!(quota.starts_with("200000"), "{quota}");
        removed.unwrap();
        assert!(cg.dirs().iter().all(|d| !d.exists()));
    }

    #[test]
    fn names_that_could_escape_the_parent_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../x", ".hidden"] {
            let spec = spec_for(bad, 1 << 20, 1);
            assert!(VmmCgroup::create(&spec, dir.path()).is_err(), "{bad:?}");
        }
    }
}
