//! The container and process tiers: [`WorkloadRuntime`] over this crate's
//! engine.
//!
//! [`ContainerTier`] turns a [`WorkloadSpec`] and an image into an OCI
//! bundle: an overlayfs rootfs (the image's layers as lowerdirs, a fresh
//! upper and work dir per container) and a config.json built from
//! [`crate::spec::default_spec`], the image config (Entrypoint, Cmd, Env,
//! WorkingDir, User) and the spec. Then it drives [`crate::create`] and
//! friends. [`ProcessTier`] runs the command as a plain host process, limited
//! only by a cgroup.
//!
//! Each workload lives in `DATA_DIR/containers/<id>/`: `workload.json` (the
//! spec and times), `exit.json` (how it ended, written by whoever waited for
//! it), `container.log`, and for containers `bundle/`, `upper/`, `work/`.
//! The engine's own state is under `DATA_DIR/engine/`.

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use evoke_runtime::image::ImageStore;
use evoke_runtime::workload::validate_id;
use evoke_runtime::{
    ExecSpec, ExitInfo, RuntimeError, Stdio, TtySize, User, WorkloadRuntime, WorkloadSpec,
    WorkloadState, WorkloadStatus,
};
use serde::{Deserialize, Serialize};

use crate::cgroups::{CgroupPaths, Resources};
use crate::Status;

/// What a tier keeps about a workload in `workload.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: WorkloadSpec,
    /// The image id (config digest) the rootfs was made from.
    image_id: Option<String>,
    created_at: SystemTime,
    started_at: Option<SystemTime>,
    log_path: PathBuf,
    /// Process tier: the host pid and its start time (to spot pid reuse).
    #[serde(default)]
    pid: Option<(i32, u64)>,
    #[serde(default)]
    cgroup: Option<CgroupPaths>,
}

fn tier_err(tier: &str, e: impl std::error::Error + Send + Sync + 'static) -> RuntimeError {
    RuntimeError::tier(tier, e)
}

fn io_err(what: impl std::fmt::Display, path: &Path, e: std::io::Error) -> RuntimeError {
    RuntimeError::io(format!("{what} {}", path.display()), e)
}

/// Where workloads of both tiers keep their files.
#[derive(Debug, Clone)]
struct Dirs {
    containers: PathBuf,
}

impl Dirs {
    fn new(root: PathBuf) -> Self {
        Dirs { containers: root }
    }

    fn dir(&self, id: &str) -> Result<PathBuf, RuntimeError> {
        validate_id(id)?;
        Ok(self.containers.join(id))
    }

    fn load(&self, id: &str) -> Result<(PathBuf, Record), RuntimeError> {
        let dir = self.dir(id)?;
        let path = dir.join("workload.json");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(RuntimeError::NotFound(id.to_string()))
            }
            Err(e) => return Err(io_err("read", &path, e)),
        };
        let rec = serde_json::from_slice(&bytes).map_err(|e| {
            RuntimeError::io(
                format!("parse {}", path.display()),
                std::io::Error::new(ErrorKind::InvalidData, e),
            )
        })?;
        Ok((dir, rec))
    }

    fn save(&self, dir: &Path, rec: &Record) -> Result<(), RuntimeError> {
        write_json(&dir.join("workload.json"), rec)
    }

    fn exit_info(&self, dir: &Path) -> Option<ExitInfo> {
        fs::read(dir.join("exit.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    fn ids(&self) -> Result<Vec<String>, RuntimeError> {
        let rd = match fs::read_dir(&self.containers) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &self.containers, e)),
        };
        Ok(rd
            .flatten()
            .filter(|e| e.path().join("workload.json").is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    }

    /// Make the workload's directory; fails if the id is taken.
    fn make(&self, id: &str) -> Result<PathBuf, RuntimeError> {
        let dir = self.dir(id)?;
        fs::create_dir_all(&self.containers).map_err(|e| io_err("create", &self.containers, e))?;
        match fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                Err(RuntimeError::AlreadyExists(id.to_string()))
            }
            Err(e) => Err(io_err("create", &dir, e)),
        }
    }
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), RuntimeError> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec_pretty(v)
        .map_err(|e| RuntimeError::io(path.display().to_string(), e.into()))?;
    fs::write(&tmp, bytes).map_err(|e| io_err("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err("rename", path, e))
}

/// Opens the log for appending (stdout and stderr share it, as `docker logs`).
fn open_log(path: &Path) -> Result<OwnedFd, RuntimeError> {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| io_err("open log", path, e))?;
    Ok(OwnedFd::from(f))
}

/// Fill unset streams: stdin from /dev/null, stdout and stderr to the log.
fn complete_stdio(stdio: Stdio, log: &Path) -> Result<[OwnedFd; 3], RuntimeError> {
    let stdin = match stdio.stdin {
        Some(fd) => fd,
        None => OwnedFd::from(
            fs::File::open("/dev/null").map_err(|e| io_err("open", Path::new("/dev/null"), e))?,
        ),
    };
    let stdout = match stdio.stdout {
        Some(fd) => fd,
        None => open_log(log)?,
    };
    let stderr = match stdio.stderr {
        Some(fd) => fd,
        None => open_log(log)?,
    };
    Ok([stdin, stdout, stderr])
}

/// The workload's command: Kubernetes/Docker rules for Entrypoint and Cmd.
fn command_line(
    spec: &WorkloadSpec,
    entrypoint: Option<&Vec<String>>,
    cmd: Option<&Vec<String>>,
) -> Result<Vec<String>, RuntimeError> {
    let mut args: Vec<String> = match &spec.command {
        Some(c) => c.clone(),
        None => entrypoint.cloned().unwrap_or_default(),
    };
    match &spec.args {
        Some(a) => args.extend(a.iter().cloned()),
        // An explicit command drops the image's Cmd, as in Kubernetes.
        None if spec.command.is_none() => args.extend(cmd.cloned().unwrap_or_default()),
        None => {}
    }
    if args.is_empty() {
        return Err(RuntimeError::InvalidSpec(format!(
            "workload {}: no command given and the image has neither Entrypoint nor Cmd",
            spec.id
        )));
    }
    Ok(args)
}

/// Image env, then the spec's, later keys replacing earlier ones.
fn merge_env(image: &[String], extra: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut put = |kv: String| {
        let key = kv.split('=').next().unwrap_or("").to_string();
        out.retain(|e| e.split('=').next() != Some(key.as_str()));
        out.push(kv);
    };
    for e in image {
        put(e.clone());
    }
    for (k, v) in extra {
        put(format!("{k}={v}"));
    }
    if !out.iter().any(|e| e.starts_with("PATH=")) {
        out.insert(0, evoke_runtime::image::DEFAULT_PATH.to_string());
    }
    out
}

/// Resolve an image's `User` (`name`, `uid`, `name:group`, `uid:gid`)
/// against the rootfs's /etc/passwd and /etc/group.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<User, RuntimeError> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        file.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && f[0] == name)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        })
    };
    let (uid, mut gid) = match u.parse::<u32>() {
        Ok(uid) => (
            uid,
            passwd
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 4 && f[2] == u)
                        .then(|| f[3].parse().ok())
                        .flatten()
                })
                .unwrap_or(0),
        ),
        Err(_) => lookup(&passwd, u).ok_or_else(|| {
            RuntimeError::InvalidSpec(format!("user {u:?} is not in the image's /etc/passwd"))
        })?,
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let group = fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
                group
                    .lines()
                    .find_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.len() >= 3 && f[0] == g)
                            .then(|| f[2].parse().ok())
                            .flatten()
                    })
                    .ok_or_else(|| {
                        RuntimeError::InvalidSpec(format!(
                            "group {g:?} is not in the image's /etc/group"
                        ))
                    })?
            }
        };
    }
    Ok(User { uid, gid })
}

/// Write the container's /etc/hostname, /etc/hosts and /etc/resolv.conf
/// into its directory, and make sure the rootfs has files to bind them on.
/// Returns (name, host path) pairs; none when the image has no /etc.
fn etc_files(
    dir: &Path,
    rootfs: &Path,
    hostname: &str,
) -> Result<Vec<(&'static str, PathBuf)>, RuntimeError> {
    let etc = rootfs.join("etc");
    if !fs::symlink_metadata(&etc).is_ok_and(|m| m.is_dir()) {
        return Ok(Vec::new());
    }
    // Docker drops loopback resolvers: they mean nothing in a new netns.
    let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let resolv: String = host_resolv
        .lines()
        .filter(|l| !(l.starts_with("nameserver 127.") || l.starts_with("nameserver ::1")))
        .map(|l| format!("{l}\n"))
        .collect();
    let files = [
        ("hostname", format!("{hostname}\n")),
        (
            "hosts",
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
            ),
        ),
        ("resolv.conf", resolv),
    ];
    let mut out = Vec::new();
    for (name, content) in files {
        let source = dir.join(name);
        fs::write(&source, content).map_err(|e| io_err("write", &source, e))?;
        let target = etc.join(name);
        match fs::symlink_metadata(&target) {
            Ok(m) if m.is_file() => {}
            // A symlink or a directory there: leave the image's choice alone.
            Ok(_) => continue,
            Err(_) => {
                fs::write(&target, "").map_err(|e| io_err("create", &target, e))?;
            }
        }
        out.push((name, source));
    }
    Ok(out)
}

/// Set `lo` up in the network namespace of `pid`, from a short-lived thread
/// (setns affects only the calling thread) with one rtnetlink request.
fn loopback_up(pid: i32) -> std::io::Result<()> {
    let ns = fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::spawn(move || -> std::io::Result<()> {
        use nix::sys::socket::{
            self, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
        };
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let sock = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        // nlmsghdr (RTM_NEWLINK, request + ack) then ifinfomsg: index 1 is
        // always lo in a new namespace; set IFF_UP in flags and change.
        let mut msg = Vec::with_capacity(32);
        msg.extend_from_slice(&32u32.to_ne_bytes());
        msg.extend_from_slice(&(libc::RTM_NEWLINK).to_ne_bytes());
        msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        msg.extend_from_slice(&1i32.to_ne_bytes());
        msg.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        msg.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        socket::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            &msg,
            &NetlinkAddr::new(0, 0),
            socket::MsgFlags::empty(),
        )?;
        // The ack is an NLMSG_ERROR whose error field is 0 on success.
        let mut buf = [0u8; 256];
        let n = socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            &mut buf,
            socket::MsgFlags::empty(),
        )?;
        if n >= 20 {
            let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            if err != 0 {
                return Err(std::io::Error::from_raw_os_error(-err));
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| std::io::Error::other("the loopback thread panicked"))?
}

/// Remove a workload's directory. A monitor that saw the kill may write
/// exit.json into it at the same moment, so retry a few times.
fn remove_dir_retry(dir: &Path) -> Result<(), RuntimeError> {
    let mut tries = 0;
    loop {
        match fs::remove_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(_) if tries < 5 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io_err("remove", dir, e)),
        }
    }
}

fn pid_start_time(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // A zombie still counts: its parent (a waiter) is about to reap it and
    // record the exit code; reporting it gone now would lose that code.
    fields.get(19)?.parse().ok()
}

fn to_exit(s: crate::ExitStatus) -> ExitInfo {
    ExitInfo {
        code: s.code,
        signal: s.signal,
        oom_killed: s.oom_killed,
        finished_at: SystemTime::now(),
    }
}

/// Unknown ending: the parent that could have seen it is gone.
fn lost_exit() -> ExitInfo {
    ExitInfo {
        code: -1,
        signal: None,
        oom_killed: false,
        finished_at: SystemTime::now(),
    }
}

/// Gives `path` to the container's root (as the host sees it).
fn chown_to_root_of(path: &Path, map: &crate::userns::IdMap) -> Result<(), RuntimeError> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(map.uid)),
        Some(nix::unistd::Gid::from_raw(map.gid)),
    )
    .map_err(|e| io_err("chown", path, e.into()))
}

/// The fifo behind a kept-open stdin (`WorkloadSpec::stdin` with no stdin
/// of the caller's), in the workload's directory.
const STDIN_FIFO: &str = "stdin";

/// Makes the workload's stdin fifo and opens it for the process. Opened
/// read-write, so the process never reads end-of-file when a writer
/// ([`WorkloadRuntime::open_stdin`]) goes away: the next one may attach.
fn stdin_fifo(dir: &Path) -> Result<OwnedFd, RuntimeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(STDIN_FIFO);
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| io_err("mkfifo", &path, e.into()))?;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| io_err("open", &path, e))?;
    Ok(OwnedFd::from(f))
}

/// Where a container with a user namespace keeps its id map.
const IDMAP_FILE: &str = "idmap.json";

/// A workload label asking for a user namespace with a free block of ids:
/// `auto` for this workload alone, any other value names a group (the node
/// agent gives a pod's uid) whose workloads share one block. How the node
/// agent runs a pod with `hostUsers: false` when the tier itself was not
/// made [`ContainerTier::with_user_namespace`].
pub const USERNS_LABEL: &str = "evoke.io/user-namespace";

/// Where a container records the group its id block belongs to.
const USERNS_GROUP_FILE: &str = "userns-group";

/// The container tier: OCI images in namespaces, over overlayfs.
#[derive(Debug, Clone)]
pub struct ContainerTier {
    dirs: Dirs,
    engine_root: PathBuf,
    images: ImageStore,
    /// New containers get a user namespace (`evoke run --userns`).
    userns: Option<crate::userns::UsernsMode>,
}

impl ContainerTier {
    pub const NAME: &'static str = "container";

    /// The tier keeping its state under `data_dir` (shared with the image store).
    pub fn new(data_dir: &Path) -> Result<Self, RuntimeError> {
        Ok(ContainerTier {
            dirs: Dirs::new(data_dir.join("containers")),
            engine_root: data_dir.join("engine"),
            images: ImageStore::open(data_dir)?,
            userns: None,
        })
    }

    /// Containers this tier creates from now on run in a user namespace
    /// mapped as `mode` says (see [`crate::userns`]). Other calls (exec,
    /// stop, remove) need no such setting: they follow each container's
    /// own bundle.
    pub fn with_user_namespace(mut self, mode: crate::userns::UsernsMode) -> Self {
        self.userns = Some(mode);
        self
    }

    /// Picks and records the id map of the container in `dir` (its
    /// `idmap.json`), under a lock so that concurrent creates in auto mode
    /// never get the same block. Containers of one `group` (a pod's) share
    /// the block of the first of them that still exists, as Kubernetes maps
    /// a whole pod to one range.
    fn claim_ids(
        &self,
        mode: crate::userns::UsernsMode,
        group: Option<&str>,
        dir: &Path,
    ) -> Result<crate::userns::IdMap, RuntimeError> {
        let lock_path = self.dirs.containers.join(".userns.lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err("open", &lock_path, e))?;
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io_err("lock", &lock_path, e.into()))?;
        // Every directory counts, also those of containers still being
        // created (their workload.json is written after this).
        let dirs: Vec<PathBuf> = fs::read_dir(&self.dirs.containers)
            .map_err(|e| io_err("read", &self.dirs.containers, e))?
            .flatten()
            .map(|e| e.path())
            .collect();
        let map_of = |d: &Path| -> Option<crate::userns::IdMap> {
            serde_json::from_slice(&fs::read(d.join(IDMAP_FILE)).ok()?).ok()
        };
        let same_group = group.and_then(|g| {
            dirs.iter()
                .filter(|d| fs::read_to_string(d.join(USERNS_GROUP_FILE)).is_ok_and(|s| s == g))
                .find_map(|d| map_of(d))
        });
        let map = match same_group {
            Some(map) => map,
            None => {
                let taken: Vec<crate::userns::IdMap> =
                    dirs.iter().filter_map(|d| map_of(d)).collect();
                crate::userns::choose(mode, &taken).map_err(|e| tier_err(Self::NAME, e))?
            }
        };
        if let Some(g) = group {
            let path = dir.join(USERNS_GROUP_FILE);
            fs::write(&path, g).map_err(|e| io_err("write", &path, e))?;
        }
        write_json(&dir.join(IDMAP_FILE), &map)?;
        Ok(map)
    }

    /// The lowerdirs for a container with a user namespace: each layer
    /// through an idmapped mount under `dir/lower/N`, so the image's files,
    /// owned by host root, belong to the container's root.
    fn idmapped_layers(
        &self,
        dir: &Path,
        layers: &[PathBuf],
        map: &crate::userns::IdMap,
    ) -> Result<Vec<PathBuf>, RuntimeError> {
        let err = |e| tier_err(Self::NAME, e);
        let ns = crate::userns::make_userns(map).map_err(err)?;
        let mut out = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            let target = dir.join("lower").join(i.to_string());
            fs::create_dir_all(&target).map_err(|e| io_err("create", &target, e))?;
            crate::userns::idmapped_bind(layer, &target, &ns).map_err(err)?;
            out.push(target);
        }
        Ok(out)
    }

    /// The image store this tier reads.
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    fn err(e: crate::Error) -> RuntimeError {
        match e {
            crate::Error::NotFound(id) => RuntimeError::NotFound(id),
            other => tier_err(Self::NAME, other),
        }
    }

    /// Mount the overlay rootfs and write `bundle/config.json`.
    fn prepare(&self, dir: &Path, spec: &WorkloadSpec) -> Result<(String, PathBuf), RuntimeError> {
        let image_ref = spec.image.as_deref().ok_or_else(|| {
            RuntimeError::InvalidSpec(format!(
                "workload {}: the container tier needs an image",
                spec.id
            ))
        })?;
        let image = self.images.resolve(image_ref)?;
        let bundle = dir.join("bundle");
        let rootfs = bundle.join("rootfs");
        let upper = dir.join("upper");
        let work = dir.join("work");
        for d in [&rootfs, &upper, &work] {
            fs::create_dir_all(d).map_err(|e| io_err("create", d, e))?;
        }
        let asked = spec.labels.get(USERNS_LABEL).map(String::as_str);
        let (mode, group) = match (self.userns, asked) {
            (Some(mode), _) => (Some(mode), None),
            (None, Some("auto")) => (Some(crate::userns::UsernsMode::Auto), None),
            (None, Some(group)) => (Some(crate::userns::UsernsMode::Auto), Some(group)),
            (None, None) => (None, None),
        };
        let idmap = match mode {
            Some(mode) => Some(self.claim_ids(mode, group, dir)?),
            None => None,
        };
        let layer_dirs = match &idmap {
            Some(map) => {
                crate::userns::check_reachable(&rootfs, map.uid, map.gid)
                    .map_err(|e| tier_err(Self::NAME, e))?;
                // The container's root owns its writable layer.
                chown_to_root_of(&upper, map)?;
                self.idmapped_layers(dir, &image.layer_dirs, map)?
            }
            None => image.layer_dirs.clone(),
        };
        // overlayfs lists the top layer first.
        let lower: Vec<String> = layer_dirs
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        if lower.is_empty() {
            return Err(RuntimeError::InvalidSpec(format!(
                "image {image_ref} has no layers"
            )));
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|e| io_err("mount overlay on", &rootfs, e.into()))?;

        let cfg = image.config.config().clone().unwrap_or_default();
        let args = command_line(spec, cfg.entrypoint().as_ref(), cfg.cmd().as_ref())?;
        let mut oci = crate::spec::default_spec(&args, "rootfs");
        let hostname = spec
            .hostname
            .clone()
            .unwrap_or_else(|| spec.id.chars().take(12).collect());
        let mut extra_env = vec![("HOSTNAME".to_string(), hostname.clone())];
        if spec.tty {
            extra_env.push(("TERM".into(), "xterm".into()));
        }
        extra_env.extend(spec.env.iter().cloned());
        let env = merge_env(cfg.env().as_deref().unwrap_or(&[]), &extra_env);
        let cwd = spec
            .workdir
            .clone()
            .or_else(|| cfg.working_dir().clone().filter(|w| !w.is_empty()))
            .unwrap_or_else(|| "/".to_string());
        if !cwd.starts_with('/') {
            return Err(RuntimeError::InvalidSpec(format!(
                "workdir {cwd:?} must be absolute"
            )));
        }
        // Docker makes a missing working directory.
        let cwd_host = rootfs.join(cwd.trim_start_matches('/'));
        if !cwd_host.exists() {
            fs::create_dir_all(&cwd_host).map_err(|e| io_err("create workdir", &cwd_host, e))?;
            if let Some(map) = &idmap {
                chown_to_root_of(&cwd_host, map)?;
            }
        }
        let user = match (&spec.user, cfg.user().as_deref()) {
            (Some(u), _) => *u,
            (None, Some(u)) if !u.is_empty() => resolve_user(&rootfs, u)?,
            _ => User::default(),
        };

        let mut v =
            serde_json::to_value(&oci).map_err(|e| RuntimeError::io("encode spec", e.into()))?;
        let p = &mut v["process"];
        p["env"] = serde_json::json!(env);
        p["cwd"] = serde_json::json!(cwd);
        p["user"] = serde_json::json!({"uid": user.uid, "gid": user.gid});
        // With a tty the engine makes the pty inside the container and
        // hands us its master (see `console`).
        p["terminal"] = serde_json::json!(spec.tty);
        v["hostname"] = serde_json::json!(hostname);
        let mounts = v["mounts"]
            .as_array_mut()
            .expect("the default spec has mounts");
        // /etc/hostname, /etc/hosts and /etc/resolv.conf as Docker gives
        // them; the spec's own mounts come later and win.
        for (name, source) in etc_files(dir, &rootfs, &hostname)? {
            if let Some(map) = &idmap {
                // The container's root may edit them, as it could without
                // a user namespace.
                chown_to_root_of(&source, map)?;
            }
            mounts.push(serde_json::json!({
                "destination": format!("/etc/{name}"), "type": "bind",
                "source": source, "options": ["rbind", "rprivate"],
            }));
        }
        for m in &spec.mounts {
            let mut options = vec!["rbind", "rprivate"];
            if m.read_only {
                options.push("ro");
            }
            mounts.push(serde_json::json!({
                "destination": m.container_path, "type": "bind",
                "source": m.host_path, "options": options,
            }));
        }
        let linux = &mut v["linux"];
        let r = &spec.resources;
        let mut res = linux["resources"].clone();
        if let Some(m) = r.memory_bytes {
            res["memory"] = serde_json::json!({"limit": m, "swap": m});
        }
        if let Some(c) = r.cpu {
            res["cpu"] = serde_json::json!({"quota": c.quota_us, "period": c.period_us});
        }
        if let Some(p) = r.pids_limit {
            res["pids"] = serde_json::json!({"limit": p});
        }
        linux["resources"] = res;
        linux["cgroupsPath"] = serde_json::json!(format!("evoke/{}", spec.id));
        if let Some(map) = &idmap {
            let ids = |host: u32| serde_json::json!([{"containerID": 0, "hostID": host, "size": map.count}]);
            linux["uidMappings"] = ids(map.uid);
            linux["gidMappings"] = ids(map.gid);
            if let Some(ns) = linux["namespaces"].as_array_mut() {
                ns.push(serde_json::json!({"type": "user"}));
            }
        }
        if let Some(ns) = linux["namespaces"].as_array_mut() {
            for n in ns.iter_mut() {
                let path = match n["type"].as_str() {
                    Some("network") => spec.network_namespace.as_ref(),
                    Some("ipc") => spec.ipc_namespace.as_ref(),
                    _ => None,
                };
                if let Some(p) = path {
                    n["path"] = serde_json::json!(p);
                }
            }
        }
        oci = serde_json::from_value(v).map_err(|e| {
            RuntimeError::InvalidSpec(format!("workload {}: building the OCI spec: {e}", spec.id))
        })?;
        let config = bundle.join("config.json");
        oci.save(&config)
            .map_err(|e| io_err("write", &config, std::io::Error::other(e.to_string())))?;
        Ok((image.id, bundle))
    }

    fn unmount(&self, dir: &Path) {
        // The overlay first, then the idmapped layers under it (if any).
        let mut mounts = vec![dir.join("bundle/rootfs")];
        if let Ok(rd) = fs::read_dir(dir.join("lower")) {
            mounts.extend(rd.flatten().map(|e| e.path()));
        }
        for m in mounts {
            match nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
                Err(e) => tracing::warn!(path = %m.display(), error = %e, "unmounting"),
            }
        }
    }

    fn status_of(&self, id: &str) -> Result<WorkloadStatus, RuntimeError> {
        let (dir, rec) = self.dirs.load(id)?;
        let state = match self.dirs.exit_info(&dir) {
            Some(info) => WorkloadState::Exited(info),
            None => match crate::state(&self.engine_root, id) {
                Ok(s) => match s.status {
                    Status::Creating | Status::Created => WorkloadState::Created,
                    Status::Running => WorkloadState::Running { pid: s.pid as u32 },
                    Status::Stopped => WorkloadState::Exited(lost_exit()),
                },
                Err(crate::Error::NotFound(_)) if rec.started_at.is_none() => {
                    WorkloadState::Created
                }
                Err(crate::Error::NotFound(_)) => WorkloadState::Exited(lost_exit()),
                Err(e) => return Err(Self::err(e)),
            },
        };
        Ok(status(&rec, state))
    }
}

fn status(rec: &Record, state: WorkloadState) -> WorkloadStatus {
    WorkloadStatus {
        id: rec.spec.id.clone(),
        image: rec.spec.image.clone(),
        state,
        created_at: rec.created_at,
        started_at: rec.started_at,
        labels: rec.spec.labels.clone(),
        log_path: Some(rec.log_path.clone()),
    }
}

/// Turn an [`ExecSpec`] into the OCI process to run, starting from the
/// container's own (capabilities, no_new_privs, rlimits, env).
fn exec_process(
    bundle: &Path,
    spec: &ExecSpec,
    size: Option<TtySize>,
) -> Result<oci_spec::runtime::Process, RuntimeError> {
    if spec.command.is_empty() {
        return Err(RuntimeError::InvalidSpec("exec needs a command".into()));
    }
    let config = bundle.join("config.json");
    let oci = oci_spec::runtime::Spec::load(&config)
        .map_err(|e| io_err("read", &config, std::io::Error::other(e.to_string())))?;
    let base = oci.process().clone().unwrap_or_default();
    let mut v =
        serde_json::to_value(&base).map_err(|e| RuntimeError::io("encode process", e.into()))?;
    let env: Vec<String> = base.env().clone().unwrap_or_default();
    v["args"] = serde_json::json!(spec.command);
    v["env"] = serde_json::json!(merge_env(&env, &spec.env));
    v["terminal"] = serde_json::json!(spec.tty);
    if let (true, Some(s)) = (spec.tty, size) {
        v["consoleSize"] = serde_json::json!({"height": s.rows, "width": s.cols});
    }
    if let Some(w) = &spec.workdir {
        v["cwd"] = serde_json::json!(w);
    }
    if let Some(u) = spec.user {
        v["user"] = serde_json::json!({"uid": u.uid, "gid": u.gid});
    }
    serde_json::from_value(v).map_err(|e| RuntimeError::InvalidSpec(format!("exec process: {e}")))
}

impl ContainerTier {
    /// `exec`, with the terminal's size following `sizes` when given.
    fn exec_sized(
        &self,
        id: &str,
        spec: &ExecSpec,
        stdio: Stdio,
        sizes: Option<std::sync::mpsc::Receiver<TtySize>>,
    ) -> Result<i32, RuntimeError> {
        let (dir, rec) = self.dirs.load(id)?;
        // The caller's first size, if it is already on its way, becomes the
        // terminal's size before the command runs; later ones follow.
        let first = match (&sizes, spec.tty) {
            (Some(rx), true) => rx.recv_timeout(Duration::from_millis(20)).ok(),
            _ => None,
        };
        let process = exec_process(&dir.join("bundle"), spec, first)?;
        let [stdin, stdout, stderr] = complete_stdio(stdio, &rec.log_path)?;
        let console = match spec.tty {
            true => Some(console::ConsoleSocket::bind(id)?),
            false => None,
        };
        let (io, pump_io) = match console {
            Some(_) => ([None, None, None], Some((stdin, stdout))),
            None => ([Some(stdin), Some(stdout), Some(stderr)], None),
        };
        let [i, o, e] = io;
        // Held from here on, so that every way out of this function (an
        // error receiving the terminal, a timeout) kills and reaps the
        // process: see `crate::execproc` for why none may stay a zombie.
        let child = crate::exec_child(
            &self.engine_root,
            id,
            &process,
            crate::ExecOptions {
                stdin: i,
                stdout: o,
                stderr: e,
                console_socket: console.as_ref().map(|c| c.path.clone()),
            },
        )
        .map_err(Self::err)?;
        let pump = match (&console, pump_io) {
            (Some(c), Some((input, output))) => {
                let master = c.receive()?;
                if let Some(sizes) = sizes {
                    console::follow_sizes(&master, sizes);
                }
                Some(console::pump(master, input, output))
            }
            _ => None,
        };
        let code = finish_exec(child, spec, id)?;
        if let Some(p) = pump {
            let _ = p.join();
        }
        Ok(code)
    }
}

/// Waits for an exec'd process, for at most `spec.timeout`, and returns its
/// shell-style exit code. At the timeout the process is killed and reaped
/// and the answer is an error of kind `TimedOut`.
fn finish_exec(
    child: crate::execproc::ExecChild,
    spec: &ExecSpec,
    id: &str,
) -> Result<i32, RuntimeError> {
    let what = || {
        format!(
            "exec {:?} in workload {id}",
            spec.command.first().map(String::as_str).unwrap_or_default()
        )
    };
    let err = |e: crate::Error| RuntimeError::io(what(), std::io::Error::other(e.to_string()));
    match spec.timeout {
        None => Ok(child.wait().map_err(err)?.code),
        Some(t) => match child.wait_timeout(t).map_err(err)? {
            Some(st) => Ok(st.code),
            None => Err(RuntimeError::io(
                what(),
                std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("still running after {t:?}: killed"),
                ),
            )),
        },
    }
}

impl WorkloadRuntime for ContainerTier {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn available(&self) -> Result<(), RuntimeError> {
        let unavailable = |reason: String| RuntimeError::Unavailable {
            tier: Self::NAME.into(),
            reason,
        };
        if !nix::unistd::geteuid().is_root() {
            return Err(unavailable(
                "containers need root (run evoke as root)".into(),
            ));
        }
        let fs = fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !fs.lines().any(|l| l.trim_end().ends_with("overlay")) {
            return Err(unavailable(
                "the kernel has no overlayfs (try `modprobe overlay`)".into(),
            ));
        }
        crate::cgroups::detect().map_err(|e| unavailable(format!("no usable cgroups: {e}")))?;
        Ok(())
    }

    fn create(&self, spec: &WorkloadSpec, stdio: Stdio) -> Result<WorkloadStatus, RuntimeError> {
        let dir = self.dirs.make(&spec.id)?;
        let result = (|| {
            let log_path = spec
                .log_path
                .clone()
                .unwrap_or_else(|| dir.join("container.log"));
            let (image_id, bundle) = self.prepare(&dir, spec)?;
            let rec = Record {
                spec: spec.clone(),
                image_id: Some(image_id),
                created_at: SystemTime::now(),
                started_at: None,
                log_path: log_path.clone(),
                pid: None,
                cgroup: None,
            };
            self.dirs.save(&dir, &rec)?;
            let mut stdio = stdio;
            if spec.stdin && stdio.stdin.is_none() {
                stdio.stdin = Some(stdin_fifo(&dir)?);
            }
            let [stdin, stdout, stderr] = complete_stdio(stdio, &log_path)?;
            let console = match spec.tty {
                true => Some(console::ConsoleSocket::bind(&spec.id)?),
                false => None,
            };
            let (io, pump_io) = match console {
                // The pty carries all three streams; ours feed the pump.
                Some(_) => ([None, None, None], Some((stdin, stdout))),
                None => ([Some(stdin), Some(stdout), Some(stderr)], None),
            };
            let [i, o, e] = io;
            crate::create(
                &self.engine_root,
                &spec.id,
                &bundle,
                crate::CreateOptions {
                    stdin: i,
                    stdout: o,
                    stderr: e,
                    console_socket: console.as_ref().map(|c| c.path.clone()),
                    pid_file: None,
                    hierarchy: None,
                    reexec_when_shared: false,
                    no_pivot: false,
                },
            )
            .map_err(Self::err)?;
            if spec.network_namespace.is_none() {
                // A fresh network namespace starts with lo down; Docker brings
                // it up so that localhost works inside.
                let pid = crate::state(&self.engine_root, &spec.id)
                    .map_err(Self::err)?
                    .pid;
                loopback_up(pid).map_err(|e| {
                    RuntimeError::io(format!("bring up lo of workload {}", spec.id), e)
                })?;
            }
            if let (Some(c), Some((input, output))) = (&console, pump_io) {
                let master = c.receive()?;
                PUMPS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(spec.id.clone(), console::pump(master, input, output));
            }
            Ok(status(&rec, WorkloadState::Created))
        })();
        if result.is_err() {
            self.unmount(&dir);
            let _ = fs::remove_dir_all(&dir);
        }
        result
    }

    fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let (dir, mut rec) = self.dirs.load(id)?;
        crate::start(&self.engine_root, id).map_err(Self::err)?;
        rec.started_at = Some(SystemTime::now());
        self.dirs.save(&dir, &rec)
    }

    fn state(&self, id: &str) -> Result<WorkloadStatus, RuntimeError> {
        self.status_of(id)
    }

    fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        statuses(self.dirs.ids()?, |id| self.status_of(id))
    }

    fn signal(&self, id: &str, signal: i32) -> Result<(), RuntimeError> {
        self.dirs.load(id)?;
        let sig = to_signal(signal)?;
        crate::kill(&self.engine_root, id, sig).map_err(Self::err)
    }

    fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<Option<ExitInfo>, RuntimeError> {
        let (dir, _) = self.dirs.load(id)?;
        if let Some(info) = self.dirs.exit_info(&dir) {
            return Ok(Some(info));
        }
        if timeout.is_none() {
            // The engine reaps the init when we are its parent. Otherwise it
            // polls until the process is gone and reports code -1; the real
            // parent (a monitor) then writes exit.json, so look for it.
            let s = match crate::wait(&self.engine_root, id) {
                Ok(s) => s,
                Err(crate::Error::NotFound(_)) => crate::ExitStatus {
                    code: -1,
                    signal: None,
                    oom_killed: false,
                },
                Err(e) => return Err(Self::err(e)),
            };
            if s.code != -1 {
                let info = to_exit(s);
                write_json(&dir.join("exit.json"), &info)?;
                // Like Docker, an exited container keeps its upper dir but
                // not a mounted rootfs; `rm` removes the rest.
                self.unmount(&dir);
                let pump = PUMPS.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
                if let Some(p) = pump {
                    let _ = p.join();
                }
                return Ok(Some(info));
            }
            let until = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < until {
                if let Some(info) = self.dirs.exit_info(&dir) {
                    return Ok(Some(info));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            return Ok(Some(lost_exit()));
        }
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let WorkloadState::Exited(info) = self.status_of(id)?.state {
                return Ok(Some(info));
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn exec(&self, id: &str, spec: &ExecSpec, stdio: Stdio) -> Result<i32, RuntimeError> {
        self.exec_sized(id, spec, stdio, None)
    }

    fn exec_with_resize(
        &self,
        id: &str,
        spec: &ExecSpec,
        stdio: Stdio,
        sizes: std::sync::mpsc::Receiver<TtySize>,
    ) -> Result<i32, RuntimeError> {
        self.exec_sized(id, spec, stdio, Some(sizes))
    }

    fn open_stdin(&self, id: &str) -> Result<OwnedFd, RuntimeError> {
        use std::os::unix::fs::OpenOptionsExt;
        let (dir, _) = self.dirs.load(id)?;
        let path = dir.join(STDIN_FIFO);
        if !path.exists() {
            return Err(RuntimeError::InvalidSpec(format!(
                "workload {id} was not created with its stdin kept open"
            )));
        }
        // Non-blocking, so that a fifo nobody reads any more (the process
        // is gone) is an error (ENXIO) rather than a hang.
        let f = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| io_err("open stdin of workload", &path, e))?;
        let fd = OwnedFd::from(f);
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| io_err("fcntl", &path, e.into()))?;
        let blocking = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(blocking))
            .map_err(|e| io_err("fcntl", &path, e.into()))?;
        Ok(fd)
    }

    fn remove(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let (dir, _) = self.dirs.load(id)?;
        if let WorkloadState::Running { .. } = self.status_of(id)?.state {
            if !force {
                return Err(RuntimeError::InvalidState {
                    id: id.to_string(),
                    state: "running",
                    action: "remove it (stop it first or force)",
                });
            }
        }
        match crate::delete(&self.engine_root, id, true) {
            Ok(()) | Err(crate::Error::NotFound(_)) => {}
            Err(e) => return Err(Self::err(e)),
        }
        self.unmount(&dir);
        remove_dir_retry(&dir)
    }
}

/// The process tier: the command runs on the host as a plain process, in a
/// cgroup for its limits. No image rootfs; an image, if named, only supplies
/// defaults for the command, env and working directory.
#[derive(Debug, Clone)]
pub struct ProcessTier {
    dirs: Dirs,
    images: ImageStore,
}

impl ProcessTier {
    pub const NAME: &'static str = "process";

    pub fn new(data_dir: &Path) -> Result<Self, RuntimeError> {
        Ok(ProcessTier {
            dirs: Dirs::new(data_dir.join("processes")),
            images: ImageStore::open(data_dir)?,
        })
    }

    fn status_of(&self, id: &str) -> Result<WorkloadStatus, RuntimeError> {
        let (dir, rec) = self.dirs.load(id)?;
        let state = match (self.dirs.exit_info(&dir), rec.pid) {
            (Some(info), _) => WorkloadState::Exited(info),
            (None, None) => WorkloadState::Created,
            (None, Some((pid, start))) if pid_start_time(pid) == Some(start) => {
                WorkloadState::Running { pid: pid as u32 }
            }
            (None, Some(_)) => WorkloadState::Exited(lost_exit()),
        };
        Ok(status(&rec, state))
    }

    fn cgroup(&self, rec: &Record) -> Option<Box<dyn crate::cgroups::CgroupManager>> {
        rec.cgroup.as_ref().map(CgroupPaths::open)
    }

    /// Turn a reaped child's status into the workload's exit record.
    fn record_exit(
        &self,
        dir: &Path,
        rec: &Record,
        st: std::process::ExitStatus,
    ) -> Result<ExitInfo, RuntimeError> {
        use std::os::unix::process::ExitStatusExt;
        let oom = self
            .cgroup(rec)
            .and_then(|cg| cg.oom_kills().ok())
            .is_some_and(|n| n > 0);
        let info = match (st.code(), st.signal()) {
            (Some(c), _) => ExitInfo::exited(c),
            (None, Some(s)) => ExitInfo::signaled(s, oom),
            _ => lost_exit(),
        };
        write_json(&dir.join("exit.json"), &info)?;
        Ok(info)
    }
}

/// Pids still waiting to be reaped by this process, by workload id; the
/// process tier's `start` spawns children that `wait` must reap.
static CHILDREN: std::sync::Mutex<BTreeMap<String, std::process::Child>> =
    std::sync::Mutex::new(BTreeMap::new());

impl WorkloadRuntime for ProcessTier {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn available(&self) -> Result<(), RuntimeError> {
        crate::cgroups::detect().map_err(|e| RuntimeError::Unavailable {
            tier: Self::NAME.into(),
            reason: format!("no usable cgroups: {e}"),
        })?;
        Ok(())
    }

    fn create(&self, spec: &WorkloadSpec, stdio: Stdio) -> Result<WorkloadStatus, RuntimeError> {
        if spec.labels.contains_key(USERNS_LABEL) {
            return Err(RuntimeError::InvalidSpec(format!(
                "workload {}: the process tier runs in the host's user namespace; \
                 a user namespace of its own (hostUsers: false) needs the container tier",
                spec.id
            )));
        }
        // Resolve the image first, so a bad reference leaves nothing behind.
        let image = match &spec.image {
            Some(r) => Some(self.images.resolve(r)?),
            None => None,
        };
        let dir = self.dirs.make(&spec.id)?;
        let result = (|| {
            let cfg = image
                .as_ref()
                .and_then(|i| i.config.config().clone())
                .unwrap_or_default();
            let args = command_line(spec, cfg.entrypoint().as_ref(), cfg.cmd().as_ref())?;
            let log_path = spec
                .log_path
                .clone()
                .unwrap_or_else(|| dir.join("container.log"));
            let hierarchy = crate::cgroups::detect().map_err(|e| tier_err(Self::NAME, e))?;
            let cg = hierarchy
                .create(&format!("evoke/{}", spec.id))
                .map_err(|e| tier_err(Self::NAME, e))?;
            let r = &spec.resources;
            cg.set(&Resources {
                memory_limit: r.memory_bytes.map(|m| m as i64),
                memory_swap: r.memory_bytes.map(|m| m as i64),
                cpu_quota: r.cpu.map(|c| c.quota_us as i64),
                cpu_period: r.cpu.map(|c| c.period_us),
                pids_limit: r.pids_limit,
                ..Resources::default()
            })
            .map_err(|e| tier_err(Self::NAME, e))?;
            let mut stored = spec.clone();
            // Keep the resolved command so `start` (maybe in another process) has it.
            stored.command = Some(args);
            stored.args = Some(Vec::new());
            let env_image = cfg.env().clone().unwrap_or_default();
            stored.env = merge_env(&env_image, &spec.env)
                .into_iter()
                .filter_map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect();
            if stored.workdir.is_none() {
                stored.workdir = cfg.working_dir().clone().filter(|w| !w.is_empty());
            }
            let rec = Record {
                spec: stored,
                image_id: image.as_ref().map(|i| i.id.clone()),
                created_at: SystemTime::now(),
                started_at: None,
                log_path,
                pid: None,
                cgroup: Some(cg.paths()),
            };
            self.dirs.save(&dir, &rec)?;
            let [stdin, stdout, stderr] = complete_stdio(stdio, &rec.log_path)?;
            // The streams wait in the directory's "pending" slot until start.
            PENDING_STDIO
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(spec.id.clone(), [stdin, stdout, stderr]);
            Ok(status(&rec, WorkloadState::Created))
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&dir);
        }
        result
    }

    fn start(&self, id: &str) -> Result<(), RuntimeError> {
        use std::os::unix::process::CommandExt;
        let (dir, mut rec) = self.dirs.load(id)?;
        if rec.pid.is_some() {
            return Err(RuntimeError::InvalidState {
                id: id.into(),
                state: "running",
                action: "start it again",
            });
        }
        let stdio = PENDING_STDIO
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let [stdin, stdout, stderr] = match stdio {
            Some(s) => s,
            None => complete_stdio(Stdio::default(), &rec.log_path)?,
        };
        let args = rec.spec.command.clone().unwrap_or_default();
        let (prog, rest) = args
            .split_first()
            .ok_or_else(|| RuntimeError::InvalidSpec(format!("workload {id} has no command")))?;
        let mut cmd = std::process::Command::new(prog);
        cmd.args(rest)
            .env_clear()
            .envs(rec.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        if let Some(w) = &rec.spec.workdir {
            cmd.current_dir(w);
        }
        if let Some(u) = rec.spec.user {
            cmd.uid(u.uid).gid(u.gid);
        }
        let procs = match &rec.cgroup {
            Some(p) => spawn::open_procs(p)?,
            None => Vec::new(),
        };
        let child = spawn::spawn_in_cgroup(&mut cmd, &procs)
            .map_err(|e| RuntimeError::io(format!("start {prog}"), e))?;
        let pid = child.id() as i32;
        rec.pid = Some((pid, pid_start_time(pid).unwrap_or(0)));
        rec.started_at = Some(SystemTime::now());
        self.dirs.save(&dir, &rec)?;
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), child);
        Ok(())
    }

    fn state(&self, id: &str) -> Result<WorkloadStatus, RuntimeError> {
        self.status_of(id)
    }

    fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        statuses(self.dirs.ids()?, |id| self.status_of(id))
    }

    fn signal(&self, id: &str, signal: i32) -> Result<(), RuntimeError> {
        match self.status_of(id)?.state {
            WorkloadState::Running { pid } => {
                let sig = to_signal(signal)?;
                // The whole process group, as a container's pid namespace would.
                nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), sig)
                    .map_err(|e| RuntimeError::io(format!("signal workload {id}"), e.into()))
            }
            other => Err(RuntimeError::InvalidState {
                id: id.into(),
                state: other.word(),
                action: "signal it",
            }),
        }
    }

    fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<Option<ExitInfo>, RuntimeError> {
        let (dir, rec) = self.dirs.load(id)?;
        if let Some(info) = self.dirs.exit_info(&dir) {
            return Ok(Some(info));
        }
        // Without a timeout, a child of ours is reaped by blocking on it.
        if timeout.is_none() {
            let child = CHILDREN
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            if let Some(mut child) = child {
                let st = child
                    .wait()
                    .map_err(|e| RuntimeError::io(format!("wait for workload {id}"), e))?;
                return self.record_exit(&dir, &rec, st).map(Some);
            }
        }
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let Some(info) = self.dirs.exit_info(&dir) {
                return Ok(Some(info));
            }
            // Our own child: reap it if it is done. Otherwise (another
            // process or thread is its waiter) watch its state.
            let reaped = {
                let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
                match children.get_mut(id).map(|c| c.try_wait()) {
                    Some(Ok(Some(st))) => {
                        children.remove(id);
                        Some(Some(st))
                    }
                    Some(_) => Some(None),
                    None => None,
                }
            };
            match reaped {
                Some(Some(st)) => return self.record_exit(&dir, &rec, st).map(Some),
                Some(None) => {}
                None => {
                    if let WorkloadState::Exited(info) = self.status_of(id)?.state {
                        return Ok(Some(info));
                    }
                }
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn exec(&self, id: &str, spec: &ExecSpec, stdio: Stdio) -> Result<i32, RuntimeError> {
        let (_, rec) = self.dirs.load(id)?;
        let (prog, rest) = spec
            .command
            .split_first()
            .ok_or_else(|| RuntimeError::InvalidSpec("exec needs a command".into()))?;
        let [stdin, stdout, stderr] = complete_stdio(stdio, &rec.log_path)?;
        let mut cmd = std::process::Command::new(prog);
        cmd.args(rest)
            .env_clear()
            .envs(rec.spec.env.iter().map(|(k, v)| (k, v)))
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr);
        if let Some(w) = spec.workdir.as_ref().or(rec.spec.workdir.as_ref()) {
            cmd.current_dir(w);
        }
        let procs = match &rec.cgroup {
            Some(p) => spawn::open_procs(p)?,
            None => Vec::new(),
        };
        let child = spawn::spawn_in_cgroup(&mut cmd, &procs)
            .map_err(|e| RuntimeError::io(format!("exec {prog}"), e))?;
        // std's Child neither waits nor kills on drop: the handle takes over.
        let child =
            crate::execproc::ExecChild::adopt(nix::unistd::Pid::from_raw(child.id() as i32));
        finish_exec(child, spec, id)
    }

    fn remove(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let (dir, rec) = self.dirs.load(id)?;
        if let WorkloadState::Running { .. } = self.status_of(id)?.state {
            if !force {
                return Err(RuntimeError::InvalidState {
                    id: id.to_string(),
                    state: "running",
                    action: "remove it (stop it first or force)",
                });
            }
        }
        if let Some(cg) = self.cgroup(&rec) {
            cg.kill_all().map_err(|e| tier_err(Self::NAME, e))?;
            cg.remove().map_err(|e| tier_err(Self::NAME, e))?;
        }
        if let Some(mut child) = CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
        {
            let _ = child.wait();
        }
        remove_dir_retry(&dir)
    }
}

/// Output copies of tty workloads this process started, joined by `wait`.
static PUMPS: std::sync::Mutex<BTreeMap<String, std::thread::JoinHandle<()>>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Streams given to `create`, held until `start` spawns the process.
static PENDING_STDIO: std::sync::Mutex<BTreeMap<String, [OwnedFd; 3]>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Spawning a host process straight into its cgroup.
mod spawn {
    #![allow(unsafe_code)]

    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    use std::path::PathBuf;

    use evoke_runtime::RuntimeError;

    use crate::cgroups::CgroupPaths;

    /// Open the file of every hierarchy of the cgroup that the child writes
    /// itself into: v1's `tasks` (a single-threaded writer of "0" skips the
    /// kernel's global threadgroup lock, see `cgroups::Placement`), v2's
    /// `cgroup.procs`.
    pub(super) fn open_procs(paths: &CgroupPaths) -> Result<Vec<File>, RuntimeError> {
        let files: Vec<PathBuf> = match paths {
            CgroupPaths::V1(dirs) => dirs.values().map(|d| d.join("tasks")).collect(),
            CgroupPaths::V2(dir) => vec![dir.join("cgroup.procs")],
        };
        files
            .iter()
            .map(|f| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(f)
                    .map_err(|e| RuntimeError::io(format!("open {}", f.display()), e))
            })
            .collect()
    }

    /// Spawn `cmd` so that it joins the cgroup before it execs: the child
    /// writes "0" (itself) to each file of [`open_procs`], so it cannot fork out of
    /// its limits first, and no wrapper process or second exec is needed.
    pub(super) fn spawn_in_cgroup(
        cmd: &mut std::process::Command,
        procs: &[File],
    ) -> std::io::Result<std::process::Child> {
        let fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: the closure runs in the forked child before exec and only
        // calls write(2), which is async-signal-safe; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.spawn()
    }
}

/// Terminals for `tty` workloads: the engine makes the pty inside the
/// container (its own devpts, so `tty` and job control work) and sends the
/// master side over a unix socket; we copy between it and the caller's
/// streams.
mod console {
    #![allow(unsafe_code)]

    use std::fs::File;
    use std::io::{IoSliceMut, Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::thread::JoinHandle;

    use evoke_runtime::RuntimeError;

    /// A listening console socket; removed on drop.
    pub(super) struct ConsoleSocket {
        listener: UnixListener,
        pub(super) path: PathBuf,
    }

    impl ConsoleSocket {
        /// A socket in the temp dir: unix socket paths are limited to 108
        /// bytes, which a data dir path plus a 64-digit id can exceed.
        pub(super) fn bind(id: &str) -> Result<Self, RuntimeError> {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let short: String = id.chars().take(12).collect();
            let path = std::env::temp_dir()
                .join(format!("evoke-tty-{short}-{}-{n}.sock", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).map_err(|e| {
                RuntimeError::io(format!("bind console socket {}", path.display()), e)
            })?;
            Ok(ConsoleSocket { listener, path })
        }

        /// The pty master the engine sent (it connected during create/exec).
        pub(super) fn receive(&self) -> Result<OwnedFd, RuntimeError> {
            let err = |e: std::io::Error| {
                RuntimeError::io(format!("receive pty from {}", self.path.display()), e)
            };
            self.listener.set_nonblocking(true).map_err(err)?;
            let (stream, _) = self.listener.accept().map_err(err)?;
            let mut buf = [0u8; 64];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let msg = nix::sys::socket::recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(|e| err(e.into()))?;
            for c in msg.cmsgs().map_err(|e| err(e.into()))? {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                    if let Some(&fd) = fds.first() {
                        // SAFETY: the kernel just installed this descriptor
                        // in our table for us; nothing else owns it.
                        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            Err(err(std::io::Error::other("no descriptor in the message")))
        }
    }

    impl Drop for ConsoleSocket {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, libc::winsize);

    /// Applies each size from `sizes` to the terminal `master` until the
    /// sender goes away (the session ended).
    pub(super) fn follow_sizes(
        master: &OwnedFd,
        sizes: std::sync::mpsc::Receiver<evoke_runtime::TtySize>,
    ) {
        let Ok(fd) = master.try_clone() else { return };
        std::thread::spawn(move || {
            for s in sizes {
                let ws = libc::winsize {
                    ws_row: s.rows,
                    ws_col: s.cols,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                // SAFETY: `fd` is an open pty master we own and `ws` is a
                // valid winsize; TIOCSWINSZ only reads it.
                if let Err(e) = unsafe { set_winsize(fd.as_raw_fd(), &ws) } {
                    tracing::debug!(error = %e, "terminal resize failed");
                }
            }
        });
    }

    /// Copy `input` to the pty and the pty to `output` until the workload
    /// closes its side. Join the returned handle to be sure all output is out.
    pub(super) fn pump(master: OwnedFd, input: OwnedFd, output: OwnedFd) -> JoinHandle<()> {
        let mut reader = File::from(master);
        if let Ok(mut writer) = reader.try_clone() {
            std::thread::spawn(move || {
                let mut input = File::from(input);
                let mut buf = [0u8; 4096];
                // EOF on input does not end the session: the workload may
                // still be writing.
                while let Ok(n) = input.read(&mut buf) {
                    if n == 0 || writer.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
        std::thread::spawn(move || {
            let mut output = File::from(output);
            let mut buf = [0u8; 4096];
            // EIO once every process holding the replica side has gone.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || output.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        })
    }
}

/// The statuses of `ids`, skipping workloads removed while listing.
fn statuses(
    ids: Vec<String>,
    status_of: impl Fn(&str) -> Result<WorkloadStatus, RuntimeError>,
) -> Result<Vec<WorkloadStatus>, RuntimeError> {
    let mut out = Vec::new();
    for id in ids {
        match status_of(&id) {
            Ok(s) => out.push(s),
            Err(RuntimeError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// A signal number from the runtime API as a nix signal.
fn to_signal(signal: i32) -> Result<nix::sys::signal::Signal, RuntimeError> {
    nix::sys::signal::Signal::try_from(signal)
        .map_err(|_| RuntimeError::InvalidSpec(format!("signal {signal} is not a signal")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: Option<&[&str]>, args: Option<&[&str]>) -> WorkloadSpec {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        WorkloadSpec {
            id: "t".into(),
            command: command.map(v),
            args: args.map(v),
            ..WorkloadSpec::default()
        }
    }

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn args_replace_cmd_and_keep_the_entrypoint() {
        let ep = strings(&["/bin/echo"]);
        let cmd = strings(&["default"]);
        let line = command_line(&spec(None, Some(&["x"])), Some(&ep), Some(&cmd)).unwrap();
        assert_eq!(line, strings(&["/bin/echo", "x"]));
        let line = command_line(&spec(None, None), Some(&ep), Some(&cmd)).unwrap();
        assert_eq!(line, strings(&["/bin/echo", "default"]));
    }

    #[test]
    fn a_command_replaces_entrypoint_and_drops_cmd() {
        let ep = strings(&["/bin/echo"]);
        let cmd = strings(&["default"]);
        let line = command_line(&spec(Some(&["/bin/true"]), None), Some(&ep), Some(&cmd)).unwrap();
        assert_eq!(line, strings(&["/bin/true"]));
    }

    #[test]
    fn no_command_anywhere_is_an_error_naming_the_workload() {
        let err = command_line(&spec(None, None), None, None).unwrap_err();
        assert!(err.to_string().contains("workload t"), "{err}");
    }

    #[test]
    fn spec_env_overrides_image_env_and_path_is_always_set() {
        let env = merge_env(
            &strings(&["A=image", "B=image"]),
            &[("B".into(), "flag".into()), ("C".into(), "x=y".into())],
        );
        assert_eq!(env[0], evoke_runtime::image::DEFAULT_PATH);
        assert_eq!(&env[1..], &strings(&["A=image", "B=flag", "C=x=y"])[..]);
    }

    #[test]
    fn image_user_names_are_looked_up_in_the_rootfs() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("etc")).unwrap();
        fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(t.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let u = |s| resolve_user(t.path(), s).unwrap();
        assert_eq!(
            u("app"),
            User {
                uid: 1000,
                gid: 1001
            }
        );
        assert_eq!(
            u("1000"),
            User {
                uid: 1000,
                gid: 1001
            }
        );
        assert_eq!(u("app:staff"), User { uid: 1000, gid: 50 });
        assert_eq!(u("42:7"), User { uid: 42, gid: 7 });
        assert!(resolve_user(t.path(), "ghost").is_err());
        assert!(resolve_user(t.path(), "app:ghosts").is_err());
    }
}
