//! evoke's Linux container engine, and the library behind `evoke oci`.
//!
//! A container goes through the OCI lifecycle [`create`] → [`start`] →
//! (runs, [`kill`]) → stopped → [`delete`]; [`state`] reports where it is
//! and [`wait`] collects its exit status (for the process that created it).
//! Start reading at [`create`]: it turns the bundle's config.json into a
//! [`plan::Plan`](crate) in the caller, starts the container's init (how:
//! [`spawn`]; a multi-threaded caller never forks itself), and lets
//! `init.rs` set up namespaces, the root file system, cgroups,
//! capabilities and seccomp in the child, which then waits on its start
//! pipe until [`start`]. A container's state is one file,
//! `STATE_ROOT/ID.json` (see `Record`).
//!
//! Modules: [`spec`] (Docker's defaults as an OCI spec), [`cgroups`] (the
//! [`cgroups::CgroupManager`] trait with v1 and v2), [`devices`] (device
//! rules as a BPF program for v2), `seccomp` (OCI
//! profile → BPF), [`spawn`] (starting the init without copying the
//! caller), `init` (the child side), `sys` (the raw syscalls),
//! [`execproc`] (who reaps an exec'd process, and why it must be reaped),
//! [`userns`] (id maps and idmapped image layers for `--userns`),
//! `trampoline` (the workload's last exec, from a sealed memfd and never
//! from the runtime's binary: CVE-2019-5736).

pub mod cgroups;
pub mod devices;
mod error;
pub mod execproc;
mod init;
mod plan;
pub mod seccomp;
pub mod selfexe;
pub mod spawn;
pub mod spec;
mod sys;
pub mod testutil;
pub mod tier;
mod trampoline;
pub mod userns;

use std::collections::HashMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

pub use error::{Error, Result};
pub use oci_spec;

use cgroups::{CgroupManager, CgroupPaths, Resources};
use init::{ChildFds, Msg};

/// The OCI version we report in `state`.
pub const OCI_VERSION: &str = "1.0.2";

/// A container's status, as the OCI runtime spec names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `create` is running; the init is being set up.
    Creating,
    /// The init is set up and waits for `start`.
    Created,
    /// The workload has been exec'd and runs.
    Running,
    /// The workload has exited; only `delete` remains.
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
        })
    }
}

/// The OCI state of a container, what `evoke oci state` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub oci_version: String,
    pub id: String,
    pub status: Status,
    /// Host pid of the container's init (0 once stopped).
    pub pid: i32,
    pub bundle: PathBuf,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// What a container's state file (`STATE_ROOT/ID.json`) holds.
///
/// The layout is flat on purpose: one file per container, written once by
/// [`create`] and removed by [`delete`]. There is no directory per
/// container and no exec fifo on disk: `start` reaches the init's start
/// pipe through `/proc/PID/fd/N` (see [`StartPipe`]). Every inode that
/// `create` allocates and `delete` frees costs ext4 journal and bitmap
/// work on the hot path; this way a container costs one, and a deleted
/// container's file is reused by the next (see `claim_state_file`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    pid: i32,
    /// The init's start time in clock ticks (/proc/PID/stat field 22), to
    /// tell it from a later process that reuses the pid.
    start_time: u64,
    /// Where the init waits for `start`. None in a record of the old
    /// layout (see [`LEGACY_STATE`]).
    #[serde(default)]
    start_pipe: Option<StartPipe>,
    bundle: PathBuf,
    rootfs: PathBuf,
    cgroup: Option<CgroupPaths>,
    #[serde(default)]
    annotations: HashMap<String, String>,
    /// Unix time of creation.
    created: u64,
    /// Set for a container of the old layout: its state directory.
    #[serde(skip)]
    legacy_dir: Option<PathBuf>,
}

/// The state file of a container made by an evoke before the flat layout:
/// `STATE_ROOT/ID/state.json`, with an exec fifo `STATE_ROOT/ID/exec.fifo`
/// that exists until `start`. Such containers (still running after an
/// upgrade) are listed and can be started, signalled and deleted; new ones
/// are never made this way.
const LEGACY_STATE: &str = "state.json";
const LEGACY_FIFO: &str = "exec.fifo";

/// How a container's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, or 128 + signal for a killed process (as shells report).
    pub code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// The kernel's OOM killer killed a process of the container.
    pub oom_killed: bool,
}

/// Options for [`create`].
#[derive(Debug, Default)]
pub struct CreateOptions {
    /// The init's stdin; `None` inherits the caller's.
    pub stdin: Option<OwnedFd>,
    /// The init's stdout; `None` inherits the caller's.
    pub stdout: Option<OwnedFd>,
    /// The init's stderr; `None` inherits the caller's.
    pub stderr: Option<OwnedFd>,
    /// A unix socket to send the pty master to when `process.terminal`.
    pub console_socket: Option<PathBuf>,
    /// A file to write the init's pid to.
    pub pid_file: Option<PathBuf>,
    /// The cgroup hierarchy to use; `None` takes what [`cgroups::detect`]
    /// finds. (A hybrid host is driven through v1 unless told otherwise.)
    pub hierarchy: Option<cgroups::Hierarchy>,
    /// The caller is a short command-line process that [`create`] may
    /// re-execute from a protected copy of its binary
    /// ([`selfexe::protect`]) when other processes could see the init
    /// before `start`: when the container gets no pid namespace of its
    /// own. With a new pid namespace the init is alone in it and not
    /// dumpable, and its last exec goes through the trampoline
    /// (`trampoline.rs`), so no copy is needed (it cost one more start of
    /// the binary per container).
    pub reexec_when_shared: bool,
    /// Enter the rootfs without pivot_root: move it over `/` and chroot
    /// into it (runc's `--no-pivot`). Without this, pivot_root is used, and
    /// the move is the fallback only where pivot_root refuses and the move
    /// hides as much: when the current root is the mount namespace's first
    /// mount (an initramfs). See `init::pivot`.
    pub no_pivot: bool,
}

/// Options for [`exec`].
#[derive(Debug, Default)]
pub struct ExecOptions {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub console_socket: Option<PathBuf>,
}

fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId(id.to_string()))
    }
}

/// The suffix of a state file: `STATE_ROOT/ID.json`.
const STATE_SUFFIX: &str = ".json";

fn state_file(state_root: &Path, id: &str) -> Result<PathBuf> {
    validate_id(id)?;
    Ok(state_root.join(format!("{id}{STATE_SUFFIX}")))
}

/// Reads a container's record. An empty state file belongs to a `create`
/// that has claimed the id but not finished (or died half-way): such a
/// container does not exist yet, as for `runc`.
fn load_record(state_root: &Path, id: &str) -> Result<(PathBuf, Record)> {
    let path = state_file(state_root, id)?;
    let text = match fs::read(&path) {
        Ok(t) if t.is_empty() => return Err(Error::NotFound(id.to_string())),
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return load_legacy(state_root, id),
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    let rec: Record = serde_json::from_slice(&text).map_err(|source| Error::State {
        id: id.to_string(),
        source,
    })?;
    if rec.id != id {
        // A spare just claimed by `create` and not yet truncated: the
        // record is a deleted container's (see `claim_state_file`).
        return Err(Error::NotFound(id.to_string()));
    }
    Ok((path, rec))
}

/// Reads a record of the old layout (see [`LEGACY_STATE`]); the path
/// returned is the container's state directory.
fn load_legacy(state_root: &Path, id: &str) -> Result<(PathBuf, Record)> {
    let dir = state_root.join(id);
    let path = dir.join(LEGACY_STATE);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::NotFound(id.to_string())),
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    let mut rec: Record = serde_json::from_slice(&text).map_err(|source| Error::State {
        id: id.to_string(),
        source,
    })?;
    rec.legacy_dir = Some(dir.clone());
    Ok((dir, rec))
}

/// How many spare state files a state root keeps (see [`claim_state_file`]).
const SPARES: usize = 4;

fn spare_path(state_root: &Path, n: usize) -> PathBuf {
    state_root.join(format!(".spare{n}"))
}

/// Claims `path` (`STATE_ROOT/ID.json`) for a new container and returns it
/// open for writing, empty.
///
/// A deleted container's state file is not unlinked but renamed to one of
/// a few spare names ([`release_state_file`]), and a new container takes a
/// spare by renaming it to its own name (RENAME_NOREPLACE, so the id is
/// claimed atomically, as O_EXCL did). A rename allocates no inode: on
/// ext4 every new inode is searched for past the inodes freed in the last
/// minute, which under a stream of containers (and the other runtimes'
/// files) made allocation a tenth of the lifecycle's CPU. A spare renamed
/// into place still holds another container's record until it is
/// truncated; [`load_record`] treats a record whose id is not the file's
/// as a container still being created.
fn claim_state_file(state_root: &Path, path: &Path, id: &str) -> Result<fs::File> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    let open = || {
        fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
    };
    for n in 0..SPARES {
        let spare = spare_path(state_root, n);
        match renameat2(
            AT_FDCWD,
            &spare,
            AT_FDCWD,
            path,
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => {
                let f = open().map_err(|e| Error::io("open", path, e))?;
                f.set_len(0).map_err(|e| Error::io("truncate", path, e))?;
                return Ok(f);
            }
            Err(nix::Error::EEXIST) => return Err(Error::Exists(id.into())),
            // Taken by another create, or never made: try the next one.
            Err(nix::Error::ENOENT) => continue,
            // A file system without RENAME_NOREPLACE: no spares.
            Err(_) => break,
        }
    }
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(Error::Exists(id.into())),
        Err(e) => Err(Error::io("create", path, e)),
    }
}

/// Removes a container's state file `path`: keeps it as a spare for the
/// next [`claim_state_file`] when a spare name is free, else unlinks it.
fn release_state_file(state_root: &Path, path: &Path) -> Result<()> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    for n in 0..SPARES {
        let spare = spare_path(state_root, n);
        match renameat2(
            AT_FDCWD,
            path,
            AT_FDCWD,
            &spare,
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => return Ok(()),
            Err(nix::Error::EEXIST) => continue,
            Err(nix::Error::ENOENT) => {
                return Err(Error::io("remove", path, ErrorKind::NotFound.into()))
            }
            Err(_) => break,
        }
    }
    fs::remove_file(path).map_err(|e| Error::io("remove", path, e))
}

/// Fills the state file that `create` claimed (empty, opened O_EXCL). One
/// write of a few hundred bytes into a new file, so no temporary file and
/// rename (a second inode) are needed: readers see either an empty file
/// (not created yet) or the whole record.
fn save_record(file: &mut fs::File, path: &Path, rec: &Record) -> Result<()> {
    let text = serde_json::to_vec(rec).map_err(|source| Error::State {
        id: rec.id.clone(),
        source,
    })?;
    file.write_all(&text)
        .map_err(|e| Error::io("write", path, e))
}

/// The pipe on which a created container's init waits for `start`: its
/// descriptor number in the init and the pipe's inode. `start` opens
/// `/proc/PID/fd/FD` for writing, which reaches that very pipe, and writes
/// one byte. The init holds the only descriptor of it (opened read-write,
/// so that its read blocks instead of seeing end-of-file) and closes it
/// before it execs the workload; until then `readlink /proc/PID/fd/FD`
/// shows `pipe:[INODE]`, which is how [`status_of`] tells "created" from
/// "running" (with the byte still in the pipe it is "running": started,
/// about to exec). Reaching it takes the same rights as ptrace-reading the init
/// (root on the host; the init is not dumpable).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct StartPipe {
    fd: i32,
    inode: u64,
}

impl StartPipe {
    fn proc_path(&self, pid: i32) -> String {
        format!("/proc/{pid}/fd/{}", self.fd)
    }

    /// Whether the init with `pid` still holds the pipe (has not started).
    fn held_by(&self, pid: i32) -> bool {
        fs::read_link(self.proc_path(pid))
            .is_ok_and(|l| l.as_os_str().as_encoded_bytes() == self.link().as_bytes())
    }

    /// Whether a byte of `start`'s waits in the pipe (the init takes one of
    /// two): the container is started. (A reader opened through /proc sees the
    /// pipe's contents without taking them.)
    fn pending(&self, pid: i32) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let Ok(f) = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(self.proc_path(pid))
        else {
            return false;
        };
        let ours = f
            .metadata()
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == self.inode);
        let mut pfd = [PollFd::new(std::os::fd::AsFd::as_fd(&f), PollFlags::POLLIN)];
        ours && poll(&mut pfd, PollTimeout::ZERO).is_ok_and(|n| n > 0)
            && pfd[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN))
    }

    fn link(&self) -> String {
        format!("pipe:[{}]", self.inode)
    }
}

/// Makes the start pipe: one descriptor, readable and writable, on a fresh
/// pipe (a pipe's /proc link reopened O_RDWR), plus its description.
fn start_pipe() -> Result<(OwnedFd, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (r, _w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe2", e))?;
    let path = format!("/proc/self/fd/{}", r.as_raw_fd());
    let rw = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    let inode = rw
        .metadata()
        .map_err(|e| Error::io("stat", &path, e))?
        .ino();
    Ok((rw.into(), inode))
}

/// (state char, start time) of a live process, from /proc/PID/stat.
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume
    // after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

fn status_of(rec: &Record) -> Status {
    match proc_stat(rec.pid) {
        Some((state, start)) if start == rec.start_time && state != 'Z' && state != 'X' => {
            let waiting = match (&rec.start_pipe, &rec.legacy_dir) {
                (Some(pipe), _) => pipe.held_by(rec.pid) && !pipe.pending(rec.pid),
                (None, Some(dir)) => dir.join(LEGACY_FIFO).exists(),
                (None, None) => false,
            };
            if waiting {
                Status::Created
            } else {
                Status::Running
            }
        }
        _ => Status::Stopped,
    }
}

fn to_state(rec: &Record) -> State {
    let status = status_of(rec);
    State {
        oci_version: OCI_VERSION.to_string(),
        id: rec.id.clone(),
        status,
        pid: if status == Status::Stopped {
            0
        } else {
            rec.pid
        },
        bundle: rec.bundle.clone(),
        annotations: rec.annotations.clone(),
    }
}

/// Everything [`create`] must undo when it fails half-way.
struct Cleanup {
    /// The claimed state file.
    file: Option<PathBuf>,
    cgroup: Option<Box<dyn CgroupManager>>,
    pid: Option<Pid>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
        if let Some(cg) = self.cgroup.take() {
            if let Err(e) = cg.remove() {
                tracing::warn!(error = %e, "removing cgroup after a failed create");
            }
        }
        if let Some(file) = self.file.take() {
            let _ = fs::remove_file(file);
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn write_id_map(pid: Pid, file: &str, maps: &[(u32, u32, u32)]) -> Result<()> {
    let path = PathBuf::from(format!("/proc/{pid}/{file}"));
    let text: String = maps
        .iter()
        .map(|(c, h, n)| format!("{c} {h} {n}\n"))
        .collect();
    fs::write(&path, text).map_err(|e| Error::io("write", path, e))
}

/// Creates container `id` from the bundle at `bundle` (which holds
/// config.json) and returns once its init is set up and waits for
/// [`start`]. The caller becomes the parent of the init, so it may
/// [`wait`] for it. State goes to `state_root/ID.json`.
pub fn create(state_root: &Path, id: &str, bundle: &Path, opts: CreateOptions) -> Result<State> {
    let path = state_file(state_root, id)?;
    let bundle = bundle
        .canonicalize()
        .map_err(|e| Error::io("resolve bundle", bundle, e))?;
    let config = bundle.join("config.json");
    let spec = oci_spec::runtime::Spec::load(&config).map_err(|source| Error::Spec {
        path: config.clone(),
        source,
    })?;
    let mut plan = plan::plan(&spec, &bundle)?;
    plan.no_pivot = opts.no_pivot;
    if opts.reexec_when_shared && !plan.new_ns.contains(nix::sched::CloneFlags::CLONE_NEWPID) {
        // Returns only when already protected (or on error).
        selfexe::protect()?;
    }

    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(state_root)
        .map_err(|e| Error::io("mkdir", state_root, e))?;
    // Claim the id: the empty state file is filled in once the init runs.
    let mut file = claim_state_file(state_root, &path, id)?;
    let mut cleanup = Cleanup {
        file: Some(path.clone()),
        cgroup: None,
        pid: None,
    };

    let linux = spec.linux().clone().unwrap_or_default();
    let cg_path = linux
        .cgroups_path()
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("evoke/{id}"));
    let hierarchy = match opts.hierarchy.clone() {
        Some(h) => h,
        None => cgroups::detect()?,
    };
    let cg = hierarchy.create(&cg_path)?;
    cleanup.cgroup = Some(cg);
    let cg = cleanup.cgroup.as_ref().expect("set just above");
    if let Some(r) = linux.resources() {
        cg.set(&Resources::from_oci(r))?;
    }

    let (fifo, pipe_inode) = start_pipe()?;
    let start_pipe = StartPipe {
        fd: fifo.as_raw_fd(),
        inode: pipe_inode,
    };
    let console = match &opts.console_socket {
        Some(p) => Some(OwnedFd::from(
            std::os::unix::net::UnixStream::connect(p)
                .map_err(|e| Error::io("connect console socket", p, e))?,
        )),
        None => None,
    };
    let mut join = Vec::new();
    for (p, flag) in &plan.join_ns {
        let f = fs::File::open(p).map_err(|e| Error::io("open namespace", p, e))?;
        join.push((OwnedFd::from(f), *flag));
    }
    let (go_r, go_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe2", e))?;
    let (st_r, st_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe2", e))?;

    let started = Instant::now();
    let fds = ChildFds {
        go: go_r,
        status: init::StatusFd(Some(st_w)),
        fifo: Some(fifo),
        stdio: [opts.stdin, opts.stdout, opts.stderr],
        console,
        join,
        placement: Some(cg.placement()?),
    };
    let init_err = |msg: String| Error::Init {
        id: id.to_string(),
        msg,
    };
    // How the init comes to be: see `spawn` (a multi-threaded caller such
    // as the node agent does not fork).
    let way = spawn::choose(&plan);
    let (init_pid, mut go, mut status) = if way == spawn::Way::Direct {
        use nix::sched::CloneFlags;
        let cgroupns = plan.new_ns.contains(CloneFlags::CLONE_NEWCGROUP);
        let flags = (plan.new_ns - CloneFlags::CLONE_NEWCGROUP).bits();
        let forked = match fds
            .placement
            .as_ref()
            .and_then(cgroups::Placement::clone_into)
        {
            Some(dir) => sys::clone_child_into(flags, std::os::fd::AsFd::as_fd(dir)),
            None => sys::clone_child(flags),
        }
        .map_err(|e| Error::sys("clone the container init", e))?;
        let pid = match forked {
            sys::Forked::Child => init::direct_init(&plan, fds, cgroupns),
            sys::Forked::Parent(pid) => {
                drop(fds);
                pid
            }
        };
        cleanup.pid = Some(pid);
        (pid, fs::File::from(go_w), fs::File::from(st_r))
    } else {
        let child = if way == spawn::Way::Helper {
            spawn::spawn_helper(id, bundle.clone(), plan.no_pivot, &fds)?
        } else {
            match sys::fork().map_err(|e| Error::sys("fork", e))? {
                sys::Forked::Child => init::intermediate(&plan, fds),
                sys::Forked::Parent(pid) => pid,
            }
        };
        drop(fds);
        let mut go = fs::File::from(go_w);
        let mut status = fs::File::from(st_r);
        // The intermediate child enters the cgroup itself before it clones
        // the init, so the init starts inside it and its cgroup namespace is
        // rooted there (see `cgroups::Placement` for why the child does it).
        let _ = go.write_all(b"1");
        let first = Msg::read(&mut status).map_err(|e| init_err(format!("read status: {e}")));
        let _ = nix::sys::wait::waitpid(child, None);
        let init_pid = match first? {
            Some(Msg::Pid(p)) => Pid::from_raw(p),
            Some(Msg::Error(e)) => return Err(init_err(e)),
            _ => return Err(init_err("intermediate process died".into())),
        };
        cleanup.pid = Some(init_pid);
        (init_pid, go, status)
    };
    if plan.new_ns.contains(nix::sched::CloneFlags::CLONE_NEWUSER) {
        fs::write(format!("/proc/{init_pid}/setgroups"), "allow").ok();
        write_id_map(init_pid, "uid_map", &plan.uid_mappings)?;
        write_id_map(init_pid, "gid_map", &plan.gid_mappings)?;
    }
    let _ = go.write_all(b"2");
    drop(go);
    match Msg::read(&mut status).map_err(|e| init_err(format!("read status: {e}")))? {
        Some(Msg::Ready) => {}
        Some(Msg::Error(e)) => return Err(init_err(e)),
        _ => return Err(init_err("init died during set-up".into())),
    }
    let (_, start_time) =
        proc_stat(init_pid.as_raw()).ok_or_else(|| init_err("init vanished".into()))?;
    let rec = Record {
        id: id.to_string(),
        pid: init_pid.as_raw(),
        start_time,
        start_pipe: Some(start_pipe),
        bundle: bundle.clone(),
        rootfs: plan.rootfs.clone(),
        cgroup: Some(cg.paths()),
        annotations: spec.annotations().clone().unwrap_or_default(),
        created: now_secs(),
        legacy_dir: None,
    };
    save_record(&mut file, &path, &rec)?;
    if let Some(pf) = &opts.pid_file {
        write_pid_file(pf, init_pid.as_raw())?;
    }
    tracing::debug!(id, pid = init_pid.as_raw(), elapsed = ?started.elapsed(), "container created");
    // Success: keep everything.
    cleanup.pid = None;
    cleanup.cgroup = None;
    cleanup.file = None;
    Ok(to_state(&rec))
}

fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    // Written in place, before `create` returns, which is when callers
    // (containerd, conmon) read it; a temporary file plus rename would cost
    // another inode allocation per container.
    fs::write(path, pid.to_string()).map_err(|e| Error::io("write", path, e))
}

/// Starts a created container: its init execs the workload.
pub fn start(state_root: &Path, id: &str) -> Result<()> {
    let (_, rec) = load_record(state_root, id)?;
    let status = status_of(&rec);
    if status != Status::Created {
        return Err(Error::BadStatus {
            id: id.into(),
            status,
            op: "start",
        });
    }
    let Some(pipe) = rec.start_pipe else {
        return start_legacy(&rec);
    };
    let pipe_path = pipe.proc_path(rec.pid);
    // Non-blocking: the init holds the pipe open for reading.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&pipe_path)
        .map_err(|e| Error::io("open start pipe", &pipe_path, e))?;
    // The status check and the open are not atomic: make sure the
    // descriptor reached is still the init's start pipe.
    let st = f.metadata().map_err(|e| Error::io("stat", &pipe_path, e))?;
    if std::os::unix::fs::MetadataExt::ino(&st) != pipe.inode {
        return Err(Error::BadStatus {
            id: id.into(),
            status: Status::Running,
            op: "start",
        });
    }
    // Two bytes: the init takes one, and the other stays in the pipe until
    // the init closes it just before the exec, so from this write on the
    // container reads as "running" ([`StartPipe::pending`]) with no gap
    // between the init's read and its close (one byte left such a gap, in
    // which `state` said "created" again). No need to wait for the init:
    // as with runc, `start` returns once the container is started, and
    // waiting cost a wake-up of this process after the init's.
    f.write_all(b"00")
        .map_err(|e| Error::io("write", &pipe_path, e))?;
    Ok(())
}

/// `start` for a container of the old layout: one byte into its exec
/// fifo, which the init holds open for reading, then the fifo goes.
fn start_legacy(rec: &Record) -> Result<()> {
    let Some(dir) = &rec.legacy_dir else {
        return Err(Error::NotFound(rec.id.clone()));
    };
    let fifo = dir.join(LEGACY_FIFO);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&fifo)
        .map_err(|e| Error::io("open", &fifo, e))?;
    f.write_all(b"0")
        .map_err(|e| Error::io("write", &fifo, e))?;
    fs::remove_file(&fifo).map_err(|e| Error::io("remove", &fifo, e))
}

/// The container's OCI state.
pub fn state(state_root: &Path, id: &str) -> Result<State> {
    let (_, rec) = load_record(state_root, id)?;
    Ok(to_state(&rec))
}

/// Every container under `state_root`, sorted by id.
pub fn list(state_root: &Path) -> Result<Vec<State>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(state_root) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io("read dir", state_root, e)),
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // ID.json, or a directory ID of the old layout.
        let id = match name.strip_suffix(STATE_SUFFIX) {
            Some(id) => id,
            None if e.file_type().is_ok_and(|t| t.is_dir()) => name.as_str(),
            None => continue,
        };
        if let Ok(s) = state(state_root, id) {
            out.push(s);
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Parses a signal given as a name (`TERM`, `SIGTERM`) or a number.
pub fn parse_signal(s: &str) -> Result<Signal> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| Error::BadSignal(s.to_string()));
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse().map_err(|_| Error::BadSignal(s.to_string()))
}

/// Sends `signal` to the container's init.
pub fn kill(state_root: &Path, id: &str, signal: Signal) -> Result<()> {
    let (_, rec) = load_record(state_root, id)?;
    let status = status_of(&rec);
    if status == Status::Stopped {
        return Err(Error::BadStatus {
            id: id.into(),
            status,
            op: "kill",
        });
    }
    nix::sys::signal::kill(Pid::from_raw(rec.pid), signal).map_err(|e| Error::sys("kill", e))
}

/// Deletes a container: its processes (a created one is killed; a running
/// one only with `force`), its cgroup and its state.
pub fn delete(state_root: &Path, id: &str, force: bool) -> Result<()> {
    let (path, rec) = load_record(state_root, id)?;
    let status = status_of(&rec);
    if status == Status::Running && !force {
        return Err(Error::BadStatus {
            id: id.into(),
            status,
            op: "delete (use --force)",
        });
    }
    let cg = rec.cgroup.as_ref().map(CgroupPaths::open);
    if status != Status::Stopped {
        let _ = nix::sys::signal::kill(Pid::from_raw(rec.pid), Signal::SIGKILL);
        if let Some(cg) = &cg {
            cg.kill_all()?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while status_of(&rec) != Status::Stopped && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    if let Some(cg) = &cg {
        cg.remove()?;
    }
    if rec.legacy_dir.is_some() {
        return fs::remove_dir_all(&path).map_err(|e| Error::io("remove", &path, e));
    }
    release_state_file(state_root, &path)
}

/// Waits for the container's init to exit and reports how. Only the
/// process that called [`create`] (its parent) can collect the exit code;
/// others get code -1 once the process is gone.
pub fn wait(state_root: &Path, id: &str) -> Result<ExitStatus> {
    use nix::sys::wait::{waitpid, WaitStatus};
    let (_, rec) = load_record(state_root, id)?;
    let pid = Pid::from_raw(rec.pid);
    let mut out = ExitStatus {
        code: -1,
        signal: None,
        oom_killed: false,
    };
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, c)) => {
                out.code = c;
                break;
            }
            Ok(WaitStatus::Signaled(_, s, _)) => {
                out.code = 128 + s as i32;
                out.signal = Some(s as i32);
                break;
            }
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(nix::Error::ECHILD) => {
                while status_of(&rec) != Status::Stopped {
                    std::thread::sleep(Duration::from_millis(5));
                }
                break;
            }
            Err(e) => return Err(Error::sys("waitpid", e)),
        }
    }
    if let Some(cg) = rec.cgroup.as_ref().map(CgroupPaths::open) {
        if cg.oom_kills()? > 0 {
            out.oom_killed = true;
            if out.signal == Some(Signal::SIGKILL as i32) || out.code == -1 {
                out.code = 137;
            }
        }
    }
    Ok(out)
}

/// Runs another process in a running container (like `runc exec`): it
/// joins the init's namespaces and cgroup and gets the container's seccomp
/// profile. Returns its host pid; the caller is its parent.
pub fn exec(
    state_root: &Path,
    id: &str,
    process: &oci_spec::runtime::Process,
    opts: ExecOptions,
) -> Result<Pid> {
    let (_, rec) = load_record(state_root, id)?;
    let status = status_of(&rec);
    if status != Status::Running {
        return Err(Error::BadStatus {
            id: id.into(),
            status,
            op: "exec",
        });
    }
    let config = rec.bundle.join("config.json");
    let spec = oci_spec::runtime::Spec::load(&config).map_err(|source| Error::Spec {
        path: config.clone(),
        source,
    })?;
    let linux = spec.linux().clone().unwrap_or_default();
    let mut pplan = plan::process_plan(process, linux.seccomp().as_ref())?;
    pplan.oom_score_adj = None;
    // Join every namespace the init has that differs from ours, user first.
    let mut join = Vec::new();
    use nix::sched::CloneFlags as F;
    for (name, flag) in [
        ("user", F::CLONE_NEWUSER),
        ("ipc", F::CLONE_NEWIPC),
        ("uts", F::CLONE_NEWUTS),
        ("net", F::CLONE_NEWNET),
        ("pid", F::CLONE_NEWPID),
        ("cgroup", F::CLONE_NEWCGROUP),
        ("mnt", F::CLONE_NEWNS),
    ] {
        let theirs = format!("/proc/{}/ns/{name}", rec.pid);
        let ours = format!("/proc/self/ns/{name}");
        if fs::read_link(&theirs).ok() == fs::read_link(&ours).ok() {
            continue;
        }
        let f = fs::File::open(&theirs).map_err(|e| Error::io("open namespace", &theirs, e))?;
        join.push((OwnedFd::from(f), flag));
    }
    let console = match &opts.console_socket {
        Some(p) => Some(OwnedFd::from(
            std::os::unix::net::UnixStream::connect(p)
                .map_err(|e| Error::io("connect console socket", p, e))?,
        )),
        None => None,
    };
    let (go_r, go_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe2", e))?;
    let (st_r, st_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe2", e))?;
    let placement = match rec.cgroup.as_ref().map(CgroupPaths::open) {
        Some(cg) => Some(cg.placement()?),
        None => None,
    };
    let fds = ChildFds {
        go: go_r,
        status: init::StatusFd(Some(st_w)),
        fifo: None,
        stdio: [opts.stdin, opts.stdout, opts.stderr],
        console,
        join,
        placement,
    };
    let child = match sys::fork().map_err(|e| Error::sys("fork", e))? {
        sys::Forked::Child => init::exec_intermediate(&pplan, fds),
        sys::Forked::Parent(pid) => pid,
    };
    drop(fds);
    let err = |msg: String| Error::Init {
        id: id.to_string(),
        msg,
    };
    let mut go = fs::File::from(go_w);
    let mut st = fs::File::from(st_r);
    let _ = go.write_all(b"12");
    drop(go);
    // The intermediate reports the pid and the process reports Ready on the
    // same pipe, in either order: both were released by "12" above, and the
    // process can be scheduled before its parent returns from clone.
    let (mut pid, mut ready) = (None, false);
    let outcome = loop {
        match Msg::read(&mut st) {
            Ok(Some(Msg::Pid(p))) => pid = Some(Pid::from_raw(p)),
            Ok(Some(Msg::Ready)) => ready = true,
            Ok(Some(Msg::Error(e))) => break Err(err(e)),
            Ok(None) => {
                break Err(err(match pid {
                    None => "exec intermediate process died".into(),
                    Some(_) => "exec process died during set-up".into(),
                }))
            }
            Err(e) => break Err(err(format!("read status: {e}"))),
        }
        if let (Some(p), true) = (pid, ready) {
            break Ok(p);
        }
    };
    let _ = nix::sys::wait::waitpid(child, None);
    if outcome.is_err() {
        // The process can fail (a missing program, a bad cwd) and report it
        // before the intermediate has reported its pid: "12" released both
        // at once. It is our child all the same, now a zombie in the
        // container's pid namespace, and the kernel's teardown of that
        // namespace waits until it is reaped: the container's init would
        // hang on SIGKILL. So read on to the end of the pipe (both writers
        // are exiting) to learn the pid, and reap it.
        if pid.is_none() {
            while let Ok(Some(m)) = Msg::read(&mut st) {
                if let Msg::Pid(p) = m {
                    pid = Some(Pid::from_raw(p));
                }
            }
        }
        if let Some(p) = pid {
            // Still ours (unreaped), so the pid cannot have been reused.
            let _ = nix::sys::signal::kill(p, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(p, None);
        }
    }
    outcome
}

/// [`exec`], with the process held by an [`execproc::ExecChild`], which
/// reaps it on every path (see that module for why that matters).
pub fn exec_child(
    state_root: &Path,
    id: &str,
    process: &oci_spec::runtime::Process,
    opts: ExecOptions,
) -> Result<execproc::ExecChild> {
    exec(state_root, id, process, opts).map(execproc::ExecChild::adopt)
}

/// Waits for a process started by [`exec`] (the caller is its parent).
pub fn wait_pid(pid: Pid) -> Result<ExitStatus> {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, c)) => {
                return Ok(ExitStatus {
                    code: c,
                    signal: None,
                    oom_killed: false,
                })
            }
            Ok(WaitStatus::Signaled(_, s, _)) => {
                return Ok(ExitStatus {
                    code: 128 + s as i32,
                    signal: Some(s as i32),
                    oom_killed: false,
                })
            }
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(Error::sys("waitpid", e)),
        }
    }
}

/// Passes SIGINT, SIGTERM and SIGHUP that reach the calling process on to
/// the container's init, from a background thread: the container runs in
/// its own session, so a terminal's signals do not reach it. Call it after
/// [`create`]: the signals are blocked in the calling thread (and threads it
/// starts later), and the container's process must not inherit that mask.
pub fn forward_signals(state_root: &Path, id: &str) {
    use nix::sys::signal::SigSet;
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        return;
    }
    let root = state_root.to_path_buf();
    let id = id.to_string();
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            if kill(&root, &id, sig).is_err() {
                break;
            }
        }
    });
}

/// Memory the container's cgroup uses now, in bytes.
pub fn memory_usage(state_root: &Path, id: &str) -> Result<u64> {
    let (_, rec) = load_record(state_root, id)?;
    match rec.cgroup.as_ref().map(CgroupPaths::open) {
        Some(cg) => Ok(cg.memory_usage()?),
        None => Ok(0),
    }
}

#[allow(dead_code)]
fn raw(fd: &OwnedFd) -> i32 {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_separators_or_dots_are_rejected() {
        for bad in ["", ".", "..", "a/b", "a b", "x\0"] {
            assert!(
                matches!(validate_id(bad), Err(Error::InvalidId(_))),
                "{bad:?}"
            );
        }
        validate_id("web-1_a.b+c").unwrap();
    }

    #[test]
    fn signals_parse_from_names_and_numbers() {
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("TERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("sigint").unwrap(), Signal::SIGINT);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("999").is_err());
    }

    #[test]
    fn state_of_unknown_container_is_not_found() {
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(state(t.path(), "nope"), Err(Error::NotFound(_))));
    }

    #[test]
    fn status_messages_round_trip_through_the_pipe_encoding() {
        for m in [
            Msg::Pid(42),
            Msg::Ready,
            Msg::Error("mount /proc: EPERM".into()),
        ] {
            let bytes = m.encode();
            let back = Msg::read(&mut &bytes[..]).unwrap().unwrap();
            assert_eq!(back, m);
        }
        assert_eq!(Msg::read(&mut &b""[..]).unwrap(), None);
    }
}
