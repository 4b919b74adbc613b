//! The container side of `create` and `exec`: code that runs in the forked
//! children. The intermediate child joins namespaces and clones the init
//! into new ones; the init sets up the root file system, drops privileges,
//! reports "ready", waits for `start`, and execs the workload.
//!
//! Nothing here may return into the caller's code: every path ends in
//! `execve` or `_exit`. Errors go back to the parent over the status pipe.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::stat::{makedev, mknod, Mode};
use nix::unistd::{Gid, Uid};

use crate::plan::{MountPlan, Plan, ProcessPlan};
use crate::sys;

/// A message from a child to the parent over the status pipe.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Msg {
    /// The intermediate child cloned the init; this is its host pid.
    Pid(i32),
    /// The init is set up and waits for `start`.
    Ready,
    /// Set-up failed.
    Error(String),
}

impl Msg {
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Msg::Pid(p) => {
                let mut v = vec![b'P'];
                v.extend_from_slice(&p.to_le_bytes());
                v
            }
            Msg::Ready => vec![b'R'],
            Msg::Error(e) => {
                let mut v = vec![b'E'];
                v.extend_from_slice(&(e.len() as u32).to_le_bytes());
                v.extend_from_slice(e.as_bytes());
                v
            }
        }
    }

    /// Reads one message; `None` at end of file (the writer died).
    pub(crate) fn read(r: &mut impl Read) -> std::io::Result<Option<Msg>> {
        let mut tag = [0u8; 1];
        if r.read(&mut tag)? == 0 {
            return Ok(None);
        }
        let mut n = [0u8; 4];
        Ok(Some(match tag[0] {
            b'P' => {
                r.read_exact(&mut n)?;
                Msg::Pid(i32::from_le_bytes(n))
            }
            b'R' => Msg::Ready,
            _ => {
                r.read_exact(&mut n)?;
                let mut buf = vec![0u8; u32::from_le_bytes(n).min(1 << 16) as usize];
                r.read_exact(&mut buf)?;
                Msg::Error(String::from_utf8_lossy(&buf).into_owned())
            }
        }))
    }
}

/// The status pipe's write end, moved out of [`ChildFds`] once by the child.
pub(crate) struct StatusFd(pub Option<OwnedFd>);

impl StatusFd {
    fn take_status(&mut self) -> OwnedFd {
        self.0
            .take()
            .expect("the status pipe is taken once, first thing in the child")
    }
}

/// The descriptors a child gets from the parent.
pub(crate) struct ChildFds {
    /// Read end: one byte per "go ahead" from the parent.
    pub go: OwnedFd,
    /// Write end for [`Msg`]s.
    pub status: StatusFd,
    /// The exec fifo, opened read-write; `None` for `exec`.
    pub fifo: Option<OwnedFd>,
    /// stdin, stdout, stderr to install; `None` keeps the inherited one.
    pub stdio: [Option<OwnedFd>; 3],
    /// A connected console socket, for `terminal: true`.
    pub console: Option<OwnedFd>,
    /// Namespaces to join, opened by the parent.
    pub join: Vec<(OwnedFd, CloneFlags)>,
    /// The cgroup to enter (the intermediate child places itself).
    pub placement: Option<crate::cgroups::Placement>,
}

/// Enters the v1 cgroups, as the still single-threaded intermediate child
/// and before it joins any namespace; the clones inherit them.
fn enter_cgroup(placement: Option<&crate::cgroups::Placement>) -> R<()> {
    match placement {
        Some(p) => ctx(p.enter_self(), || "enter the cgroup".into()),
        None => Ok(()),
    }
}

/// Clones the next process as a sibling with namespace flags `ns`, straight
/// into the v2 cgroup if there is one. Returns whether the child must still
/// unshare its cgroup namespace (see [`sys::clone_sibling_into`]).
fn clone_placed(
    ns: CloneFlags,
    placement: Option<&crate::cgroups::Placement>,
) -> R<(sys::Forked, bool)> {
    if let Some(p) = placement {
        if let Some(dir) = p.clone_into() {
            let cgroupns = ns.contains(CloneFlags::CLONE_NEWCGROUP);
            let rest = ns - CloneFlags::CLONE_NEWCGROUP;
            let f = ctx(sys::clone_sibling_into(rest.bits(), dir.as_fd()), || {
                format!("clone3({rest:?}) into the cgroup")
            })?;
            return Ok((f, cgroupns));
        }
    }
    let f = ctx(sys::clone_sibling(ns.bits()), || format!("clone({ns:?})"))?;
    Ok((f, false))
}

type R<T> = std::result::Result<T, String>;

fn ctx<T, E: std::fmt::Display>(r: Result<T, E>, what: impl FnOnce() -> String) -> R<T> {
    r.map_err(|e| format!("{}: {e}", what()))
}

/// The options of a read-only bind: what runc gives /sys and the paths it
/// makes read-only.
const READ_ONLY: MsFlags = MsFlags::MS_RDONLY
    .union(MsFlags::MS_NOSUID)
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Binds `src` on `dest` (recursively with `rec` = MS_REC), then applies
/// `options` by a remount: a bind mount takes no options of its own. Errors
/// name the mount by `name`, the path inside the container.
fn bind_remount(src: &Path, dest: &Path, rec: MsFlags, options: MsFlags, name: &Path) -> R<()> {
    ctx(
        mount(
            Some(src),
            dest,
            None::<&str>,
            MsFlags::MS_BIND | rec,
            None::<&str>,
        ),
        || format!("bind {} on {}", src.display(), name.display()),
    )?;
    if options.is_empty() {
        return Ok(());
    }
    ctx(
        mount(
            None::<&str>,
            dest,
            None::<&str>,
            options | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
            None::<&str>,
        ),
        || format!("remount {}", name.display()),
    )
}

fn send(fd: &OwnedFd, m: &Msg) {
    // If the parent is gone there is no one left to tell.
    let bytes = m.encode();
    let mut done = 0;
    while done < bytes.len() {
        match nix::unistd::write(fd, &bytes[done..]) {
            Ok(n) if n > 0 => done += n,
            Err(nix::Error::EINTR) => {}
            _ => return,
        }
    }
}

fn wait_go(fd: &OwnedFd) -> R<()> {
    let mut b = [0u8; 1];
    match nix::unistd::read(fd, &mut b) {
        Ok(1) => Ok(()),
        Ok(_) => Err("parent went away".into()),
        Err(e) => Err(format!("read sync pipe: {e}")),
    }
}

/// The intermediate child: joins namespaces, clones the init into the new
/// ones (as a sibling, so the caller is its parent), reports its pid, exits.
/// The init's errors travel the same way: it shares this code path.
pub(crate) fn intermediate(plan: &Plan, mut fds: ChildFds) -> ! {
    let status = fds.status.take_status();
    match intermediate_inner(plan, fds, &status) {
        Ok(()) => sys::exit_now(0),
        Err(e) => {
            send(&status, &Msg::Error(e));
            sys::exit_now(1)
        }
    }
}

fn intermediate_inner(plan: &Plan, mut fds: ChildFds, status: &OwnedFd) -> R<()> {
    // Not dumpable: no process in the container may open /proc/PID/exe of
    // ours or ptrace us while we still run the host binary.
    ctx(nix::sys::prctl::set_dumpable(false), || {
        "prctl(PR_SET_DUMPABLE)".into()
    })?;
    wait_go(&fds.go)?;
    enter_cgroup(fds.placement.as_ref())?;
    // The user namespace first, so that the others are owned by it.
    fds.join
        .sort_by_key(|(_, f)| !f.contains(CloneFlags::CLONE_NEWUSER));
    for (fd, flag) in &fds.join {
        ctx(nix::sched::setns(fd, *flag), || format!("setns {flag:?}"))?;
    }
    let joined_ipc = fds
        .join
        .iter()
        .any(|(_, f)| f.contains(CloneFlags::CLONE_NEWIPC));
    drop(std::mem::take(&mut fds.join));
    if joined_ipc
        && plan
            .new_ns
            .contains(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
    {
        mqueue_of_joined_ipc(&plan.rootfs)?;
    }
    let placement = fds.placement.take();
    match clone_placed(plan.new_ns, placement.as_ref())? {
        (sys::Forked::Parent(pid), _) => {
            send(status, &Msg::Pid(pid.as_raw()));
            Ok(())
        }
        (sys::Forked::Child, unshare_cgroupns) => {
            drop(placement);
            match container_init(plan, fds, status, unshare_cgroupns)? {}
        }
    }
}

/// Where the intermediate mounts the mqueue of a joined IPC namespace for
/// the init to bind: beside the rootfs, in the bundle.
fn joined_mqueue_dir(rootfs: &Path) -> PathBuf {
    rootfs.parent().unwrap_or(rootfs).join("mqueue")
}

/// A container in a new user namespace that joins an IPC namespace of the
/// host's user namespace (a pod's, shared by its containers) may not mount
/// that namespace's mqueue: only its owner's root may. So the intermediate,
/// still root there, mounts it on [`joined_mqueue_dir`] in a mount
/// namespace of its own (private: nothing reaches the host; the directory
/// stays empty there), which the init's is copied from; the init then
/// binds it on /dev/mqueue (see `mount_one`).
fn mqueue_of_joined_ipc(rootfs: &Path) -> R<()> {
    let dir = joined_mqueue_dir(rootfs);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("mkdir {}: {e}", dir.display())),
    }
    ctx(nix::sched::unshare(CloneFlags::CLONE_NEWNS), || {
        "unshare(CLONE_NEWNS) for the pod's mqueue".into()
    })?;
    ctx(
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
        || "make / private for the pod's mqueue".into(),
    )?;
    ctx(
        mount(
            Some("mqueue"),
            &dir,
            Some("mqueue"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
        || format!("mount the pod's mqueue on {}", dir.display()),
    )
}

/// The container's init when a single-threaded caller clones it itself,
/// with no intermediate process (see `spawn::Way::Direct`): it does the
/// intermediate's part first (not dumpable, into the cgroup, into the
/// namespaces to join, which exclude pid and user there) and goes on as the
/// init. The caller cloned it without CLONE_NEWCGROUP: the namespace is
/// made once the process is in its cgroup, so that it is rooted there.
pub(crate) fn direct_init(plan: &Plan, mut fds: ChildFds, unshare_cgroupns: bool) -> ! {
    let status = fds.status.take_status();
    let r = (|| -> R<std::convert::Infallible> {
        ctx(nix::sys::prctl::set_dumpable(false), || {
            "prctl(PR_SET_DUMPABLE)".into()
        })?;
        enter_cgroup(fds.placement.as_ref())?;
        drop(fds.placement.take());
        for (fd, flag) in &fds.join {
            ctx(nix::sched::setns(fd, *flag), || format!("setns {flag:?}"))?;
        }
        drop(std::mem::take(&mut fds.join));
        container_init(plan, fds, &status, unshare_cgroupns)
    })();
    let e = match r {
        Err(e) => e,
        Ok(never) => match never {},
    };
    send(&status, &Msg::Error(e));
    sys::exit_now(1)
}

/// The container's pid 1 until it execs the workload.
fn container_init(
    plan: &Plan,
    fds: ChildFds,
    status: &OwnedFd,
    unshare_cgroupns: bool,
) -> R<std::convert::Infallible> {
    let ChildFds {
        go,
        fifo,
        mut stdio,
        console,
        ..
    } = fds;
    wait_go(&go)?;
    drop(go);
    if unshare_cgroupns {
        // Now that we are in our cgroup, root the namespace here.
        ctx(nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP), || {
            "unshare(CLONE_NEWCGROUP)".into()
        })?;
    }
    if plan.new_ns.contains(CloneFlags::CLONE_NEWUSER) {
        // Become root of the new user namespace for the set-up.
        ctx(
            nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)),
            || "setresgid(0)".into(),
        )?;
        ctx(
            nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)),
            || "setresuid(0)".into(),
        )?;
    }
    install_stdio(&mut stdio)?;
    setup_rootfs(plan)?;
    if let Some(h) = &plan.hostname {
        ctx(nix::unistd::sethostname(h), || format!("sethostname {h}"))?;
    }
    for (k, v) in &plan.sysctl {
        let p = PathBuf::from("/proc/sys").join(k.replace('.', "/"));
        ctx(fs::write(&p, v), || format!("sysctl {k}"))?;
    }
    protect_paths(plan)?;
    if plan.readonly_root {
        ctx(
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            ),
            || "remount / read-only".into(),
        )?;
    }
    if plan.process.terminal {
        let console =
            console.ok_or("process.terminal is true but no --console-socket was given")?;
        setup_terminal(&console, plan.process.console_size)?;
    } else {
        drop(console);
        ctx(nix::unistd::setsid(), || "setsid".into())?;
    }
    exec_process(&plan.process, status, fifo)
}

fn install_stdio(stdio: &mut [Option<OwnedFd>; 3]) -> R<()> {
    for (target, fd) in stdio.iter_mut().enumerate() {
        if let Some(fd) = fd.take() {
            dup_onto(&fd, target)?;
            if fd.as_raw_fd() == target as RawFd {
                // Already in place: keep it open past the drop.
                let _ = std::os::fd::IntoRawFd::into_raw_fd(fd);
            }
        }
    }
    Ok(())
}

fn dup_onto(fd: &OwnedFd, target: usize) -> R<()> {
    if fd.as_raw_fd() == target as RawFd {
        return Ok(());
    }
    let r = match target {
        0 => nix::unistd::dup2_stdin(fd),
        1 => nix::unistd::dup2_stdout(fd),
        _ => nix::unistd::dup2_stderr(fd),
    };
    ctx(r, || format!("dup2 onto fd {target}"))
}

/// Resolves `unsafe_path` inside `root` the way the kernel would after a
/// chroot to `root`: symlinks (absolute or relative) never lead out.
pub(crate) fn secure_join(root: &Path, unsafe_path: &Path) -> R<PathBuf> {
    let mut todo: Vec<std::ffi::OsString> = unsafe_path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut cur = PathBuf::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let cand = cur.join(&c);
        let full = root.join(&cand);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(format!(
                        "too many symlinks resolving {}",
                        unsafe_path.display()
                    ));
                }
                let target = ctx(fs::read_link(&full), || {
                    format!("readlink {}", full.display())
                })?;
                if target.is_absolute() {
                    cur = PathBuf::new();
                }
                for t in target.components().rev() {
                    match t {
                        Component::Normal(n) => todo.push(n.to_os_string()),
                        Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => cur = cand,
        }
    }
    Ok(root.join(cur))
}

fn setup_rootfs(plan: &Plan) -> R<()> {
    let root = &plan.rootfs;
    ctx(
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            plan.root_propagation,
            None::<&str>,
        ),
        || "make / private".into(),
    )?;
    ctx(
        mount(
            Some(root),
            root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
        || format!("bind rootfs {}", root.display()),
    )?;
    for m in &plan.mounts {
        mount_one(root, m)?;
    }
    make_devices(plan)?;
    pivot(root, plan.no_pivot)
}

fn mount_one(root: &Path, m: &MountPlan) -> R<()> {
    let dest = secure_join(root, &m.dest)?;
    let special = matches!(m.fstype.as_deref(), Some("proc") | Some("sysfs"));
    if special && dest != root.join(m.dest.strip_prefix("/").unwrap_or(&m.dest)) {
        return Err(format!(
            "mount destination {} for {} goes through a symlink in the rootfs",
            m.dest.display(),
            m.fstype.as_deref().unwrap_or_default()
        ));
    }
    if special {
        if let Ok(md) = fs::symlink_metadata(&dest) {
            if !md.is_dir() {
                return Err(format!(
                    "mount destination {} is not a directory",
                    m.dest.display()
                ));
            }
        }
    }
    let src_is_file = m.bind
        && m.source
            .as_ref()
            .and_then(|s| fs::metadata(s).ok())
            .is_some_and(|md| !md.is_dir());
    if fs::symlink_metadata(&dest).is_err() {
        if src_is_file {
            if let Some(parent) = dest.parent() {
                ctx(fs::create_dir_all(parent), || {
                    format!("mkdir {}", parent.display())
                })?;
            }
            ctx(fs::write(&dest, b""), || {
                format!("create {}", dest.display())
            })?;
        } else {
            ctx(fs::create_dir_all(&dest), || {
                format!("mkdir {}", dest.display())
            })?;
        }
    }
    if m.bind {
        let src = m
            .source
            .as_ref()
            .ok_or_else(|| format!("bind mount on {} has no source", m.dest.display()))?;
        bind_remount(
            src,
            &dest,
            m.flags & MsFlags::MS_REC,
            m.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC),
            &m.dest,
        )?;
    } else {
        let src = m.source.clone().unwrap_or_else(|| PathBuf::from("none"));
        let r = mount(
            Some(&src),
            &dest,
            m.fstype.as_deref(),
            m.flags,
            m.data.as_deref(),
        );
        match (r, m.fstype.as_deref()) {
            (Ok(()), _) => {}
            // Without a new network namespace sysfs cannot be mounted
            // fresh; bind the host's, read-only, as runc does.
            (Err(nix::Error::EPERM), Some("sysfs")) => {
                bind_remount(
                    Path::new("/sys"),
                    &dest,
                    MsFlags::MS_REC,
                    READ_ONLY,
                    &m.dest,
                )?;
            }
            // In a user namespace that does not own the IPC namespace
            // (a pod's): bind the mqueue the intermediate mounted for that
            // namespace (`mqueue_of_joined_ipc`), as runc binds the host's
            // when this mount is refused. Only a real mqueue: never an
            // empty directory, nor the host's queues.
            (Err(nix::Error::EPERM), Some("mqueue")) => {
                // The mqueue filesystem's magic number (linux/magic.h).
                const MQUEUE_MAGIC: u32 = 0x1980_0202;
                let src = joined_mqueue_dir(root);
                let is_mqueue = nix::sys::statfs::statfs(&src).is_ok_and(|f| {
                    u32::try_from(f.filesystem_type().0).is_ok_and(|m| m == MQUEUE_MAGIC)
                });
                if !is_mqueue {
                    return Err(format!(
                        "mount mqueue on {}: not permitted in this user namespace, and no mqueue of the joined IPC namespace to bind",
                        m.dest.display()
                    ));
                }
                bind_remount(
                    &src,
                    &dest,
                    MsFlags::empty(),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                    &m.dest,
                )?;
            }
            (Err(e), t) => {
                return Err(format!(
                    "mount {} on {}: {e}",
                    t.unwrap_or("?"),
                    m.dest.display()
                ));
            }
        }
    }
    if !m.propagation.is_empty() {
        ctx(
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                m.propagation,
                None::<&str>,
            ),
            || format!("set propagation of {}", m.dest.display()),
        )?;
    }
    if m.fstype.as_deref() == Some("proc") {
        ensure_procfs(&dest)?;
    }
    Ok(())
}

/// Refuses a /proc that is not a real procfs (CVE-2019-16884).
fn ensure_procfs(p: &Path) -> R<()> {
    let st = ctx(nix::sys::statfs::statfs(p), || {
        format!("statfs {}", p.display())
    })?;
    if st.filesystem_type() != nix::sys::statfs::PROC_SUPER_MAGIC {
        return Err(format!("{} is not a procfs", p.display()));
    }
    Ok(())
}

fn make_devices(plan: &Plan) -> R<()> {
    let root = &plan.rootfs;
    let dev = root.join("dev");
    // Only a /dev we mounted ourselves (a tmpfs) gets nodes and links.
    if !plan.mounts.iter().any(|m| m.dest == Path::new("/dev")) {
        return Ok(());
    }
    let in_userns = plan.new_ns.contains(CloneFlags::CLONE_NEWUSER);
    for d in &plan.devices {
        let path = secure_join(root, &d.path)?;
        if fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        if let Some(parent) = path.parent() {
            ctx(fs::create_dir_all(parent), || {
                format!("mkdir {}", parent.display())
            })?;
        }
        let r = if in_userns {
            Err(nix::Error::EPERM)
        } else {
            mknod(
                &path,
                d.kind,
                Mode::from_bits_truncate(d.mode),
                makedev(d.major, d.minor),
            )
        };
        match r {
            Ok(()) => {
                ctx(
                    nix::unistd::chown(
                        &path,
                        Some(Uid::from_raw(d.uid)),
                        Some(Gid::from_raw(d.gid)),
                    ),
                    || format!("chown {}", d.path.display()),
                )?;
            }
            // In a user namespace mknod is not allowed: bind the host node.
            Err(nix::Error::EPERM) => {
                ctx(fs::write(&path, b""), || {
                    format!("create {}", d.path.display())
                })?;
                ctx(
                    mount(
                        Some(&d.path),
                        &path,
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    ),
                    || format!("bind device {}", d.path.display()),
                )?;
            }
            Err(e) => return Err(format!("mknod {}: {e}", d.path.display())),
        }
    }
    let links: &[(&str, &str)] = &[
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ];
    for (name, target) in links {
        let p = dev.join(name);
        if fs::symlink_metadata(&p).is_err() {
            ctx(std::os::unix::fs::symlink(target, &p), || {
                format!("symlink /dev/{name}")
            })?;
        }
    }
    if dev.join("pts").is_dir() && fs::symlink_metadata(dev.join("ptmx")).is_err() {
        ctx(
            std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx")),
            || "symlink /dev/ptmx".into(),
        )?;
    }
    Ok(())
}

/// Makes `root` (a bind mount of itself, see `setup_rootfs`) the root.
///
/// pivot_root moves the host's root away and detaches it. It refuses (EINVAL)
/// when the current root is the mount namespace's first mount, as when the
/// host runs from its initramfs. Then the rootfs is moved over `/` and
/// entered by chroot instead (runc's `--no-pivot`), which hides as much
/// there: `..` from the container's root leads to the namespace's root,
/// whose topmost mount is the container's root again. Anywhere else (say a
/// chroot into a mount whose parent is shared) the move would leave the
/// host's file system above the container, within reach of a process
/// allowed to chroot, so a refusal there is an error unless the caller
/// asked for `no_pivot`, knowing that.
fn pivot(root: &Path, no_pivot: bool) -> R<()> {
    ctx(nix::unistd::chdir(root), || {
        format!("chdir {}", root.display())
    })?;
    if no_pivot {
        return move_root();
    }
    // pivot_root(".", ".") stacks the old root on the new one; unmounting
    // "." then drops it, without needing a directory in the rootfs.
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {}
        Err(nix::errno::Errno::EINVAL) => {
            let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            if root_is_first_mount(&info) {
                return move_root();
            }
            return Err("pivot_root: EINVAL: the current root is neither a mount \
                 whose parent is private nor the mount namespace's first mount; \
                 run from another root, or pass --no-pivot"
                .into());
        }
        Err(e) => return Err(format!("pivot_root: {e}")),
    }
    ctx(
        mount(
            None::<&str>,
            ".",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        ),
        || "make old root a slave".into(),
    )?;
    ctx(umount2(".", MntFlags::MNT_DETACH), || {
        "detach old root".into()
    })?;
    ctx(nix::unistd::chdir("/"), || "chdir /".into())
}

/// Whether mountinfo `text` shows the current root as the mount
/// namespace's first mount: the mount at `/` is its own parent.
pub(crate) fn root_is_first_mount(text: &str) -> bool {
    text.lines().any(|l| {
        let mut f = l.split(' ');
        match (f.next(), f.next(), f.next(), f.next(), f.next()) {
            (Some(id), Some(parent), _, _, Some("/")) => id == parent,
            _ => false,
        }
    })
}

/// The rootfs (the current directory, a mount) moved over `/` and entered
/// by chroot: the root without pivot_root (see [`pivot`]).
fn move_root() -> R<()> {
    ctx(
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>),
        || "move the rootfs over / (no pivot_root)".into(),
    )?;
    ctx(nix::unistd::chroot("."), || "chroot into the rootfs".into())?;
    ctx(nix::unistd::chdir("/"), || "chdir /".into())
}

/// Masked and read-only paths, after checking /proc is the real procfs.
fn protect_paths(plan: &Plan) -> R<()> {
    let touches_proc = plan
        .masked
        .iter()
        .chain(&plan.readonly_paths)
        .any(|p| p.starts_with("/proc"));
    if touches_proc {
        ensure_procfs(Path::new("/proc"))?;
    }
    for p in &plan.masked {
        let Ok(md) = fs::symlink_metadata(p) else {
            continue;
        };
        let r = if md.is_dir() {
            mount(
                Some("tmpfs"),
                p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None::<&str>,
            )
        } else {
            mount(
                Some("/dev/null"),
                p,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        };
        ctx(r, || format!("mask {}", p.display()))?;
    }
    for p in &plan.readonly_paths {
        if fs::symlink_metadata(p).is_err() {
            continue;
        }
        bind_remount(p, p, MsFlags::MS_REC, READ_ONLY, p)?;
    }
    Ok(())
}

fn setup_terminal(console: &OwnedFd, size: Option<(u16, u16)>) -> R<()> {
    use nix::fcntl::OFlag;
    let master = ctx(
        nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC),
        || "open /dev/ptmx".into(),
    )?;
    ctx(nix::pty::grantpt(&master), || "grantpt".into())?;
    ctx(nix::pty::unlockpt(&master), || "unlockpt".into())?;
    let name = ctx(nix::pty::ptsname_r(&master), || "ptsname".into())?;
    let slave = ctx(
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&name),
        || format!("open {name}"),
    )?;
    if let Some((rows, cols)) = size {
        ctx(sys::set_winsize(&master, rows, cols), || {
            "TIOCSWINSZ".into()
        })?;
    }
    let iov = [std::io::IoSlice::new(b"/dev/ptmx")];
    let fds = [master.as_raw_fd()];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    ctx(
        nix::sys::socket::sendmsg::<()>(
            console.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        ),
        || "send pty master to the console socket".into(),
    )?;
    ctx(nix::unistd::setsid(), || "setsid".into())?;
    let slave = OwnedFd::from(slave);
    for target in 0..3 {
        dup_onto(&slave, target)?;
    }
    ctx(sys::set_controlling_tty(), || "TIOCSCTTY".into())
}

fn apply_creds(p: &ProcessPlan) -> R<()> {
    for (res, soft, hard) in &p.rlimits {
        ctx(nix::sys::resource::setrlimit(*res, *soft, *hard), || {
            format!("setrlimit {res:?}")
        })?;
    }
    if let Some(adj) = p.oom_score_adj {
        ctx(
            fs::write("/proc/self/oom_score_adj", adj.to_string()),
            || "write oom_score_adj".into(),
        )?;
    }
    if let Some(c) = &p.caps {
        for cap in caps::all() {
            if !c.bounding.contains(&cap) {
                // Caps unknown to this kernel give EINVAL; nothing to drop.
                match caps::drop(None, caps::CapSet::Bounding, cap) {
                    Ok(()) => {}
                    Err(e) if caps::has_cap(None, caps::CapSet::Bounding, cap).unwrap_or(false) => {
                        return Err(format!("drop {cap} from the bounding set: {e}"))
                    }
                    Err(_) => {}
                }
            }
        }
    }
    ctx(nix::sys::prctl::set_keepcaps(true), || {
        "prctl(PR_SET_KEEPCAPS)".into()
    })?;
    let groups: Vec<Gid> = p.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    ctx(nix::unistd::setgroups(&groups), || "setgroups".into())?;
    let gid = Gid::from_raw(p.gid);
    ctx(nix::unistd::setresgid(gid, gid, gid), || {
        format!("setresgid {}", p.gid)
    })?;
    let uid = Uid::from_raw(p.uid);
    ctx(nix::unistd::setresuid(uid, uid, uid), || {
        format!("setresuid {}", p.uid)
    })?;
    ctx(nix::sys::prctl::set_keepcaps(false), || {
        "prctl(PR_SET_KEEPCAPS)".into()
    })?;
    if let Some(c) = &p.caps {
        // Effective first: it must stay a subset of the permitted set.
        ctx(
            caps::set(None, caps::CapSet::Effective, &c.effective),
            || "set effective caps".into(),
        )?;
        ctx(
            caps::set(None, caps::CapSet::Permitted, &c.permitted),
            || "set permitted caps".into(),
        )?;
        ctx(
            caps::set(None, caps::CapSet::Inheritable, &c.inheritable),
            || "set inheritable caps".into(),
        )?;
        ctx(caps::clear(None, caps::CapSet::Ambient), || {
            "clear ambient caps".into()
        })?;
        for cap in &c.ambient {
            ctx(caps::raise(None, caps::CapSet::Ambient, *cap), || {
                format!("raise ambient {cap}")
            })?;
        }
    }
    Ok(())
}

/// Finds the program like execvp, but with the container's PATH.
fn find_program(p: &ProcessPlan) -> R<CString> {
    let arg0 = p.args[0]
        .to_str()
        .map_err(|_| "process.args[0] is not UTF-8".to_string())?;
    if arg0.contains('/') {
        let md = ctx(fs::metadata(arg0), || format!("exec {arg0:?}"))?;
        if !md.is_file() {
            return Err(format!("exec {arg0:?}: not a regular file"));
        }
        ctx(
            nix::unistd::access(arg0, nix::unistd::AccessFlags::X_OK),
            || format!("exec {arg0:?}"),
        )?;
        return Ok(p.args[0].clone());
    }
    for dir in p.path_env.split(':').filter(|d| !d.is_empty()) {
        let cand = Path::new(dir).join(arg0);
        if let Ok(md) = fs::metadata(&cand) {
            if md.is_file() && nix::unistd::access(&cand, nix::unistd::AccessFlags::X_OK).is_ok() {
                return CString::new(cand.into_os_string().into_encoded_bytes())
                    .map_err(|_| "program path contains NUL".to_string());
            }
        }
    }
    Err(format!("executable file {arg0:?} not found in $PATH"))
}

/// Refuses to exec the runtime's own binary, directly or as the
/// interpreter of a `#!` script (CVE-2019-5736: a container that gets the
/// host binary as its process could later write to it via /proc/PID/exe).
fn check_not_self(p: &ProcessPlan, prog: &Path) -> R<()> {
    let Some((dev, ino)) = p.self_exe else {
        return Ok(());
    };
    let mut cur = prog.to_path_buf();
    // The kernel follows at most 4 levels of interpreters.
    for _ in 0..6 {
        let Ok(md) = fs::metadata(&cur) else {
            return Ok(());
        };
        if md.dev() == dev && md.ino() == ino {
            return Err(format!(
                "refusing to exec {}: it is the container runtime's own binary",
                prog.display()
            ));
        }
        let mut head = [0u8; 256];
        let n = match fs::File::open(&cur) {
            Ok(mut f) => f.read(&mut head).unwrap_or(0),
            Err(_) => return Ok(()),
        };
        if n < 2 || &head[..2] != b"#!" {
            return Ok(());
        }
        let line = &head[2..n];
        let line = line.split(|b| *b == b'\n').next().unwrap_or_default();
        let interp = String::from_utf8_lossy(line);
        let Some(interp) = interp.split_whitespace().next() else {
            return Ok(());
        };
        cur = PathBuf::from(interp);
    }
    Ok(())
}

/// Last steps, shared by the init and `exec`: credentials, descriptor
/// clean-up, cwd, "ready", wait for start, seccomp, execve.
pub(crate) fn exec_process(
    p: &ProcessPlan,
    status: &OwnedFd,
    fifo: Option<OwnedFd>,
) -> R<std::convert::Infallible> {
    apply_creds(p)?;
    // CVE-2024-21626: no descriptor of the runtime may survive into the
    // container, and none may be reachable as /proc/self/fd/N for the
    // chdir below. Keep only stdio, the status pipe and the fifo.
    let mut keep: Vec<u32> = vec![status.as_raw_fd() as u32];
    if let Some(f) = &fifo {
        keep.push(f.as_raw_fd() as u32);
    }
    keep.sort_unstable();
    let mut first = 3u32;
    for k in &keep {
        if *k >= first {
            ctx(sys::close_range(first, k - 1), || "close_range".into())?;
            first = k + 1;
        }
    }
    ctx(sys::close_range(first, u32::MAX), || "close_range".into())?;
    ctx(nix::unistd::chdir(&p.cwd), || {
        format!("chdir to cwd {}", p.cwd.display())
    })?;
    let cwd = ctx(nix::unistd::getcwd(), || "getcwd".into())?;
    if !cwd.is_absolute() || cwd.starts_with("(unreachable)") {
        return Err(format!(
            "cwd {} is outside the container root",
            p.cwd.display()
        ));
    }
    let prog = find_program(p)?;
    check_not_self(p, Path::new(std::ffi::OsStr::from_bytes(prog.as_bytes())))?;
    // The workload is exec'd from a sealed trampoline, never from this
    // clone of the runtime's binary (CVE-2019-5736; see trampoline.rs).
    let trampoline = crate::trampoline::Trampoline::new(p.exec_by_fd)?;
    send(status, &Msg::Ready);
    if let Some(fifo) = fifo {
        let mut b = [0u8; 1];
        loop {
            match nix::unistd::read(fifo.as_fd(), &mut b) {
                Ok(1) => break,
                Ok(_) => sys::exit_now(0),
                Err(nix::Error::EINTR) => continue,
                Err(_) => sys::exit_now(1),
            }
        }
        drop(fifo);
    }
    let fail = |what: String| -> ! {
        let _ = std::io::stderr().write_all(format!("evoke: {what}\n").as_bytes());
        sys::exit_now(127)
    };
    // Rust's runtime ignores SIGPIPE in every evoke process, and an ignored
    // signal stays ignored across execve: the workload must start with the
    // default (`yes | head` ends), as under Docker.
    let _ = sys::default_sigpipe();
    if p.no_new_privs {
        if let Err(e) = nix::sys::prctl::set_no_new_privs() {
            fail(format!("prctl(PR_SET_NO_NEW_PRIVS): {e}"));
        }
    }
    if let Some(prog) = &p.seccomp {
        if let Err(e) = crate::seccomp::install(prog) {
            fail(e);
        }
    }
    let e = trampoline.exec(&prog, &p.args, &p.env);
    fail(format!(
        "exec {} through the trampoline: {e}",
        prog.to_string_lossy()
    ))
}

/// The intermediate child of `exec`: joins the container's namespaces and
/// clones the process that will exec there.
pub(crate) fn exec_intermediate(p: &ProcessPlan, mut fds: ChildFds) -> ! {
    let status = fds.status.take_status();
    match exec_intermediate_inner(p, fds, &status) {
        Ok(()) => sys::exit_now(0),
        Err(e) => {
            send(&status, &Msg::Error(e));
            sys::exit_now(1)
        }
    }
}

fn exec_intermediate_inner(p: &ProcessPlan, mut fds: ChildFds, status: &OwnedFd) -> R<()> {
    ctx(nix::sys::prctl::set_dumpable(false), || {
        "prctl(PR_SET_DUMPABLE)".into()
    })?;
    wait_go(&fds.go)?;
    enter_cgroup(fds.placement.as_ref())?;
    // The user namespace last: still root of the host's, we may join what
    // a container in a user namespace shares with its pod (IPC, network),
    // which the container's own root may not (it does not own them).
    fds.join
        .sort_by_key(|(_, f)| f.contains(CloneFlags::CLONE_NEWUSER));
    for (fd, flag) in &fds.join {
        ctx(nix::sched::setns(fd, *flag), || format!("setns {flag:?}"))?;
    }
    drop(std::mem::take(&mut fds.join));
    let placement = fds.placement.take();
    match clone_placed(CloneFlags::empty(), placement.as_ref())? {
        (sys::Forked::Parent(pid), _) => {
            send(status, &Msg::Pid(pid.as_raw()));
            Ok(())
        }
        (sys::Forked::Child, _) => {
            drop(placement);
            let ChildFds {
                go,
                mut stdio,
                console,
                ..
            } = fds;
            wait_go(&go)?;
            drop(go);
            install_stdio(&mut stdio)?;
            if p.terminal {
                let console =
                    console.ok_or("process.terminal is true but no console socket was given")?;
                setup_terminal(&console, p.console_size)?;
            } else {
                drop(console);
            }
            match exec_process(p, status, None)? {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::root_is_first_mount;

    #[test]
    fn only_a_root_mount_that_is_its_own_parent_counts_as_the_namespaces_first_mount() {
        // An initramfs: the rootfs at / is mount 1, its own parent.
        let initramfs = "1 1 0:2 / / rw - rootfs rootfs rw\n\
                         20 1 0:20 / /proc rw,nosuid - proc proc rw\n";
        assert!(root_is_first_mount(initramfs));
        // A host (or a chroot into a mount): / has another parent.
        let host = "25 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    26 25 0:20 / /proc rw - proc proc rw\n";
        assert!(!root_is_first_mount(host));
        // A mount that is its own parent but not at /, and no mountinfo.
        assert!(!root_is_first_mount("7 7 0:2 / /mnt rw - tmpfs t rw\n"));
        assert!(!root_is_first_mount(""));
    }
}
