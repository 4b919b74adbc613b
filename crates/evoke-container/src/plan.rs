//! Turns an OCI spec into a [`Plan`]: everything the container's init must
//! do, worked out in the parent before the fork. The child then only makes
//! system calls, which keeps it fast and safe to fork from a threaded caller.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;
use nix::sys::resource::Resource;
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

use crate::{seccomp, Error, Result};

/// One mount, with its options already turned into flags.
#[derive(Debug, Clone)]
pub(crate) struct MountPlan {
    pub dest: PathBuf,
    pub source: Option<PathBuf>,
    pub fstype: Option<String>,
    pub flags: MsFlags,
    pub data: Option<String>,
    pub propagation: MsFlags,
    pub bind: bool,
}

/// A device node to create in the container's /dev.
#[derive(Debug, Clone)]
pub(crate) struct DevicePlan {
    pub path: PathBuf,
    pub kind: nix::sys::stat::SFlag,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Capability sets, as caps-crate sets.
#[derive(Debug, Clone)]
pub(crate) struct CapPlan {
    pub bounding: caps::CapsHashSet,
    pub effective: caps::CapsHashSet,
    pub permitted: caps::CapsHashSet,
    pub inheritable: caps::CapsHashSet,
    pub ambient: caps::CapsHashSet,
}

/// The process to exec, for the init as for `exec`.
#[derive(Debug, Clone)]
pub(crate) struct ProcessPlan {
    pub args: Vec<CString>,
    pub env: Vec<CString>,
    pub path_env: String,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub caps: Option<CapPlan>,
    pub no_new_privs: bool,
    pub seccomp: Option<seccomp::Program>,
    pub terminal: bool,
    /// `process.consoleSize` as (rows, columns): the terminal's size before
    /// the command runs, so its first look at the terminal is not 0x0.
    pub console_size: Option<(u16, u16)>,
    pub rlimits: Vec<(Resource, u64, u64)>,
    pub oom_score_adj: Option<i32>,
    /// (st_dev, st_ino) of the running binary: the init refuses to exec it
    /// (CVE-2019-5736).
    pub self_exe: Option<(u64, u64)>,
    /// The seccomp profile lets the process `execveat` the exec trampoline
    /// by its descriptor (else it goes through /proc/self/fd).
    pub exec_by_fd: bool,
}

/// Everything the container init does, in order.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub rootfs: PathBuf,
    pub root_propagation: MsFlags,
    pub readonly_root: bool,
    pub mounts: Vec<MountPlan>,
    pub devices: Vec<DevicePlan>,
    pub masked: Vec<PathBuf>,
    pub readonly_paths: Vec<PathBuf>,
    pub hostname: Option<String>,
    pub sysctl: Vec<(String, String)>,
    pub process: ProcessPlan,
    /// Namespaces to create (clone flags).
    pub new_ns: nix::sched::CloneFlags,
    /// Namespaces to join: (path, type).
    pub join_ns: Vec<(PathBuf, nix::sched::CloneFlags)>,
    pub uid_mappings: Vec<(u32, u32, u32)>,
    pub gid_mappings: Vec<(u32, u32, u32)>,
    /// Enter the rootfs by moving it over `/` and chroot (runc's
    /// `--no-pivot`) instead of pivot_root. Not in config.json: set from
    /// [`crate::CreateOptions::no_pivot`].
    pub no_pivot: bool,
}

fn ns_flag(t: LinuxNamespaceType) -> Option<nix::sched::CloneFlags> {
    use nix::sched::CloneFlags as F;
    Some(match t {
        LinuxNamespaceType::Pid => F::CLONE_NEWPID,
        LinuxNamespaceType::Network => F::CLONE_NEWNET,
        LinuxNamespaceType::Mount => F::CLONE_NEWNS,
        LinuxNamespaceType::Ipc => F::CLONE_NEWIPC,
        LinuxNamespaceType::Uts => F::CLONE_NEWUTS,
        LinuxNamespaceType::User => F::CLONE_NEWUSER,
        LinuxNamespaceType::Cgroup => F::CLONE_NEWCGROUP,
        LinuxNamespaceType::Time => return None,
    })
}

/// Parses mount options into (flags, propagation, data, bind).
pub(crate) fn parse_mount_options(opts: &[String]) -> (MsFlags, MsFlags, Option<String>, bool) {
    let mut flags = MsFlags::empty();
    let mut prop = MsFlags::empty();
    let mut data = Vec::new();
    let mut bind = false;
    for o in opts {
        let (set, clear) = match o.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" => {
                bind = true;
                (MsFlags::MS_BIND, MsFlags::empty())
            }
            "rbind" => {
                bind = true;
                (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty())
            }
            "private" => {
                prop |= MsFlags::MS_PRIVATE;
                continue;
            }
            "rprivate" => {
                prop |= MsFlags::MS_PRIVATE | MsFlags::MS_REC;
                continue;
            }
            "shared" => {
                prop |= MsFlags::MS_SHARED;
                continue;
            }
            "rshared" => {
                prop |= MsFlags::MS_SHARED | MsFlags::MS_REC;
                continue;
            }
            "slave" => {
                prop |= MsFlags::MS_SLAVE;
                continue;
            }
            "rslave" => {
                prop |= MsFlags::MS_SLAVE | MsFlags::MS_REC;
                continue;
            }
            "unbindable" => {
                prop |= MsFlags::MS_UNBINDABLE;
                continue;
            }
            "runbindable" => {
                prop |= MsFlags::MS_UNBINDABLE | MsFlags::MS_REC;
                continue;
            }
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags.insert(set);
        flags.remove(clear);
    }
    let data = (!data.is_empty()).then(|| data.join(","));
    (flags, prop, data, bind)
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InvalidConfig(format!("{what} contains a NUL byte: {s:?}")))
}

fn rlimit_resource(name: &str) -> Option<Resource> {
    Some(match name {
        "RLIMIT_AS" => Resource::RLIMIT_AS,
        "RLIMIT_CORE" => Resource::RLIMIT_CORE,
        "RLIMIT_CPU" => Resource::RLIMIT_CPU,
        "RLIMIT_DATA" => Resource::RLIMIT_DATA,
        "RLIMIT_FSIZE" => Resource::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => Resource::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => Resource::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => Resource::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => Resource::RLIMIT_NICE,
        "RLIMIT_NOFILE" => Resource::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => Resource::RLIMIT_NPROC,
        "RLIMIT_RSS" => Resource::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => Resource::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => Resource::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => Resource::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => Resource::RLIMIT_STACK,
        _ => return None,
    })
}

fn cap_set(set: &Option<oci_spec::runtime::Capabilities>) -> Result<caps::CapsHashSet> {
    let mut out = caps::CapsHashSet::new();
    for c in set.iter().flatten() {
        // oci-spec prints "CAP_FOO"; caps parses the same spelling.
        let name = c.to_string();
        let name = if name.starts_with("CAP_") {
            name
        } else {
            format!("CAP_{name}")
        };
        let cap: caps::Capability = name
            .parse()
            .map_err(|_| Error::InvalidConfig(format!("unknown capability {name}")))?;
        // Capabilities this kernel does not know cannot be held anyway.
        if caps::all().contains(&cap) {
            out.insert(cap);
        }
    }
    Ok(out)
}

fn self_exe() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/exe")
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The exec part of a spec's process, also used by `exec`.
pub(crate) fn process_plan(
    p: &Process,
    seccomp: Option<&oci_spec::runtime::LinuxSeccomp>,
) -> Result<ProcessPlan> {
    let args: Vec<CString> = p
        .args()
        .iter()
        .flatten()
        .map(|a| cstring(a, "process.args"))
        .collect::<Result<_>>()?;
    if args.is_empty() {
        return Err(Error::InvalidConfig(
            "process.args must not be empty".into(),
        ));
    }
    let env_strs: Vec<String> = p.env().clone().unwrap_or_default();
    let env = env_strs
        .iter()
        .map(|e| cstring(e, "process.env"))
        .collect::<Result<_>>()?;
    let path_env = env_strs
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .to_string();
    let cwd = p.cwd().clone();
    if !cwd.is_absolute() {
        return Err(Error::InvalidConfig(format!(
            "process.cwd {} must be absolute",
            cwd.display()
        )));
    }
    let caps = match p.capabilities() {
        Some(c) => Some(CapPlan {
            bounding: cap_set(c.bounding())?,
            effective: cap_set(c.effective())?,
            permitted: cap_set(c.permitted())?,
            inheritable: cap_set(c.inheritable())?,
            ambient: cap_set(c.ambient())?,
        }),
        None => None,
    };
    let mut rlimits = Vec::new();
    for r in p.rlimits().iter().flatten() {
        let name = serde_json::to_value(r.typ())
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let res = rlimit_resource(&name)
            .ok_or_else(|| Error::InvalidConfig(format!("unknown rlimit {name}")))?;
        rlimits.push((res, r.soft(), r.hard()));
    }
    Ok(ProcessPlan {
        args,
        env,
        path_env,
        cwd,
        uid: p.user().uid(),
        gid: p.user().gid(),
        groups: p.user().additional_gids().clone().unwrap_or_default(),
        caps,
        no_new_privs: p.no_new_privileges().unwrap_or(false),
        seccomp: seccomp.map(seccomp::compile).transpose()?,
        terminal: p.terminal().unwrap_or(false),
        console_size: p.console_size().map(|b| {
            let clamp = |v: u64| u16::try_from(v).unwrap_or(u16::MAX);
            (clamp(b.height()), clamp(b.width()))
        }),
        rlimits,
        oom_score_adj: p.oom_score_adj(),
        self_exe: self_exe(),
        exec_by_fd: crate::trampoline::execveat_allowed(seccomp),
    })
}

/// Normalises a container path to an absolute one without `..` escapes.
pub(crate) fn clean_abs(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

const DEFAULT_DEVICES: &[(&str, u64, u64)] = &[
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
];

/// Builds the plan for a bundle's spec.
pub(crate) fn plan(spec: &Spec, bundle: &Path) -> Result<Plan> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| Error::InvalidConfig("root is missing".into()))?;
    let rootfs = bundle.join(root.path());
    let rootfs = rootfs
        .canonicalize()
        .map_err(|e| Error::io("resolve rootfs", &rootfs, e))?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::InvalidConfig("process is missing".into()))?;
    let linux = spec.linux().clone().unwrap_or_default();

    let mut new_ns = nix::sched::CloneFlags::empty();
    let mut join_ns = Vec::new();
    for ns in linux.namespaces().iter().flatten() {
        let Some(flag) = ns_flag(ns.typ()) else {
            return Err(Error::InvalidConfig(
                "time namespaces are not supported".into(),
            ));
        };
        match ns.path() {
            Some(p) => join_ns.push((p.clone(), flag)),
            None => new_ns |= flag,
        }
    }
    if !new_ns.contains(nix::sched::CloneFlags::CLONE_NEWNS) {
        return Err(Error::InvalidConfig(
            "a new mount namespace is required (linux.namespaces must hold {\"type\":\"mount\"})"
                .into(),
        ));
    }

    let mut mounts = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let (flags, propagation, data, bind) =
            parse_mount_options(m.options().as_deref().unwrap_or_default());
        let bind = bind || m.typ().as_deref() == Some("bind");
        let source = m.source().clone().map(|s| {
            if bind && s.is_relative() {
                bundle.join(s)
            } else {
                s
            }
        });
        let dest = m.destination();
        if !dest.is_absolute() {
            return Err(Error::InvalidConfig(format!(
                "mount destination {} must be absolute",
                dest.display()
            )));
        }
        let dest = clean_abs(dest);
        let fstype = m.typ().clone().filter(|t| t != "bind" && !t.is_empty());
        // Only a real procfs may sit on /proc, so masking acts on the real
        // thing (CVE-2019-16884); a few files may be bound over (lxcfs).
        if dest.starts_with("/proc") && fstype.as_deref() != Some("proc") {
            const ALLOWED: &[&str] = &[
                "/proc/cpuinfo",
                "/proc/diskstats",
                "/proc/meminfo",
                "/proc/stat",
                "/proc/swaps",
                "/proc/uptime",
                "/proc/loadavg",
                "/proc/slabinfo",
            ];
            if !(bind && ALLOWED.iter().any(|a| dest == Path::new(a))) {
                return Err(Error::InvalidConfig(format!(
                    "mount of {} over {}: only a proc filesystem may be mounted at /proc",
                    fstype.as_deref().unwrap_or("a bind mount"),
                    dest.display()
                )));
            }
        }
        mounts.push(MountPlan {
            dest,
            source,
            fstype: if bind { None } else { fstype },
            flags,
            data: if bind { None } else { data },
            propagation,
            bind,
        });
    }

    let mut devices: Vec<DevicePlan> = DEFAULT_DEVICES
        .iter()
        .map(|(p, major, minor)| DevicePlan {
            path: PathBuf::from(p),
            kind: nix::sys::stat::SFlag::S_IFCHR,
            major: *major,
            minor: *minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        })
        .collect();
    for d in linux.devices().iter().flatten() {
        use oci_spec::runtime::LinuxDeviceType as T;
        let kind = match d.typ() {
            T::C | T::U => nix::sys::stat::SFlag::S_IFCHR,
            T::B => nix::sys::stat::SFlag::S_IFBLK,
            T::P => nix::sys::stat::SFlag::S_IFIFO,
            T::A => continue,
        };
        let path = clean_abs(d.path());
        devices.retain(|x| x.path != path);
        devices.push(DevicePlan {
            path,
            kind,
            major: d.major() as u64,
            minor: d.minor() as u64,
            mode: d.file_mode().unwrap_or(0o666) & 0o7777,
            uid: d.uid().unwrap_or(0),
            gid: d.gid().unwrap_or(0),
        });
    }

    let root_propagation = match linux.rootfs_propagation().as_deref() {
        None | Some("") | Some("private") | Some("rprivate") => {
            MsFlags::MS_PRIVATE | MsFlags::MS_REC
        }
        Some("slave") | Some("rslave") => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        Some("shared") | Some("rshared") => MsFlags::MS_SHARED | MsFlags::MS_REC,
        Some(other) => {
            return Err(Error::InvalidConfig(format!(
                "unknown rootfsPropagation {other:?}"
            )))
        }
    };
    let maps = |m: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
        m.iter()
            .flatten()
            .map(|x| (x.container_id(), x.host_id(), x.size()))
            .collect::<Vec<_>>()
    };
    let uid_mappings = maps(linux.uid_mappings());
    let gid_mappings = maps(linux.gid_mappings());
    if new_ns.contains(nix::sched::CloneFlags::CLONE_NEWUSER) && uid_mappings.is_empty() {
        return Err(Error::InvalidConfig(
            "a user namespace needs linux.uidMappings and linux.gidMappings".into(),
        ));
    }
    let mut sysctl: Vec<(String, String)> = linux
        .sysctl()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    sysctl.sort();
    for (k, _) in &sysctl {
        if k.contains('/') || k.split('.').any(|c| c == ".." || c.is_empty()) {
            return Err(Error::InvalidConfig(format!("invalid sysctl name {k:?}")));
        }
    }
    let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
    if hostname.is_some() && !new_ns.contains(nix::sched::CloneFlags::CLONE_NEWUTS) {
        return Err(Error::InvalidConfig(
            "hostname is set but there is no new uts namespace".into(),
        ));
    }
    let paths = |v: &Option<Vec<String>>| {
        v.iter()
            .flatten()
            .map(|p| clean_abs(Path::new(p)))
            .collect::<Vec<_>>()
    };
    Ok(Plan {
        rootfs,
        root_propagation,
        readonly_root: root.readonly().unwrap_or(false),
        mounts,
        devices,
        masked: paths(linux.masked_paths()),
        readonly_paths: paths(linux.readonly_paths()),
        hostname,
        sysctl,
        process: process_plan(process, linux.seccomp().as_ref())?,
        new_ns,
        join_ns,
        uid_mappings,
        gid_mappings,
        no_pivot: false,
    })
}

/// Bytes of a path, for error messages that must not allocate much.
#[allow(dead_code)]
pub(crate) fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_become_flags_propagation_and_data() {
        let o: Vec<String> = ["nosuid", "ro", "rbind", "rslave", "mode=755", "size=1k"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (f, p, d, bind) = parse_mount_options(&o);
        assert!(f.contains(
            MsFlags::MS_NOSUID | MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC
        ));
        assert_eq!(p, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        assert_eq!(d.as_deref(), Some("mode=755,size=1k"));
        assert!(bind);
    }

    #[test]
    fn container_paths_cannot_climb_out_with_dotdot() {
        assert_eq!(clean_abs(Path::new("/../../etc/x")), Path::new("/etc/x"));
        assert_eq!(clean_abs(Path::new("/a/./b/../c")), Path::new("/a/c"));
    }

    #[test]
    fn a_tmpfs_over_proc_is_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("rootfs")).unwrap();
        let mut spec = crate::spec::default_spec(&["true".into()], "rootfs");
        let mut mounts = spec.mounts().clone().unwrap();
        let mut fake = mounts[1].clone();
        fake.set_destination("/proc".into());
        mounts.push(fake);
        spec.set_mounts(Some(mounts));
        let err = plan(&spec, t.path()).unwrap_err().to_string();
        assert!(err.contains("only a proc filesystem"), "{err}");
    }
}
