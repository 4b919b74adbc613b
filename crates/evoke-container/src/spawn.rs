//! How [`create`](crate::create) starts the container's first process
//! without copying the caller's address space.
//!
//! A `fork` of a big, multi-threaded caller (the node agent inside
//! `evoke server`) copies its page tables and write-protects every private
//! page it has, so that the server's own threads then take copy-on-write
//! faults on memory they touch; the child later throws the copy away on
//! exec or exit. Profiles of a pod burst put about a fifth of the server's
//! CPU there. So a multi-threaded caller does what `posix_spawn` does: a
//! `clone(CLONE_VM | CLONE_VFORK)` child on a small stack of its own runs
//! in the caller's memory, while the calling thread is suspended, and
//! execs this very binary (`/proc/self/exe`) at once. The fresh process
//! sees [`HELPER_ENV`] in its environment and, from an `.init_array`
//! constructor (before `main`, in any binary that links this crate: evoke
//! itself, tests, examples), becomes the intermediate process of `init.rs`,
//! reading what it needs from a bootstrap pipe. Its clone, the container's
//! init, is then a copy of a small process.
//!
//! Single-threaded callers (`evoke oci create`, a few MB) need none of
//! this: they clone the init themselves ([`Way::Direct`], no intermediate
//! process at all), or fork the intermediate when a user namespace is
//! involved ([`Way::Fork`]).
//!
//! Why the child is safe: between `clone` and `execve` it shares all memory
//! with the caller, so it may only make async-signal-safe calls and touch
//! nothing but its argument block: it resets caught signals to their
//! default (a handler of the caller must not run on the child's stack),
//! clears close-on-exec on the descriptors it passes on, restores the
//! caller's signal mask and execs. Everything it needs (paths, argv, envp,
//! the list of descriptors) is built before the clone. All signals are
//! blocked in the calling thread around the clone, so no handler runs in
//! the child before it has reset them. An exec failure is reported back
//! through the shared argument block, as `posix_spawn` does.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sched::CloneFlags;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cgroups::Placement;
use crate::init::{ChildFds, Msg, StatusFd};
use crate::{Error, Result};

/// Set (to the bootstrap pipe's descriptor number) only in the environment
/// of the helper exec.
pub const HELPER_ENV: &str = "_EVOKE_CONTAINER_INIT";

/// `direct`, `fork` or `exec`: overrides the choice of [`Way`] (for
/// benchmarks and tests that compare them).
pub const SPAWN_ENV: &str = "EVOKE_CONTAINER_SPAWN";

/// How [`crate::create`] starts the container's init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Way {
    /// A single-threaded caller clones the init itself: no intermediate
    /// process. Not when a user namespace is made or a pid or user
    /// namespace joined: those must be entered before the init is cloned.
    Direct,
    /// `fork` an intermediate process, which joins namespaces, enters the
    /// cgroup and clones the init as our child.
    Fork,
    /// A fresh exec of this binary as the intermediate (see the module doc):
    /// the default for multi-threaded callers.
    Helper,
}

/// Picks the [`Way`] for `plan`; [`SPAWN_ENV`] (`direct`, `fork`, `exec`)
/// overrides the choice by thread count where the way is safe.
pub(crate) fn choose(plan: &crate::plan::Plan) -> Way {
    let single = threads() == 1;
    let direct_ok = single
        && !plan.new_ns.contains(CloneFlags::CLONE_NEWUSER)
        && plan
            .join_ns
            .iter()
            .all(|(_, f)| !f.intersects(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWPID));
    match std::env::var(SPAWN_ENV).as_deref() {
        Ok("fork") => Way::Fork,
        Ok("exec") => Way::Helper,
        _ if direct_ok => Way::Direct,
        _ if single => Way::Fork,
        _ => Way::Helper,
    }
}

/// This process's thread count (/proc/self/stat field 20).
fn threads() -> u32 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0;
    };
    s.rfind(')')
        .and_then(|i| s[i + 2..].split(' ').nth(17))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// What the helper reads from its bootstrap pipe: the bundle (it plans the
/// container again from config.json: cheaper than shipping the plan) and
/// the numbers of the descriptors it inherited, by role.
#[derive(Debug, Serialize, Deserialize)]
struct Boot {
    bundle: PathBuf,
    go: RawFd,
    status: RawFd,
    fifo: Option<RawFd>,
    stdio: [Option<RawFd>; 3],
    console: Option<RawFd>,
    /// (descriptor, CloneFlags bits) of each namespace to join.
    join: Vec<(RawFd, c_int)>,
    placement: Option<BootPlacement>,
    /// [`crate::CreateOptions::no_pivot`] (not in config.json).
    #[serde(default)]
    no_pivot: bool,
}

#[derive(Debug, Serialize, Deserialize)]
enum BootPlacement {
    V1Tasks(Vec<RawFd>),
    V2Dir(RawFd),
}

impl Boot {
    fn new(bundle: PathBuf, no_pivot: bool, fds: &ChildFds) -> Self {
        let raw = |f: &Option<OwnedFd>| f.as_ref().map(AsRawFd::as_raw_fd);
        Boot {
            bundle,
            no_pivot,
            go: fds.go.as_raw_fd(),
            status: fds.status.0.as_ref().map_or(-1, AsRawFd::as_raw_fd),
            fifo: raw(&fds.fifo),
            stdio: [raw(&fds.stdio[0]), raw(&fds.stdio[1]), raw(&fds.stdio[2])],
            console: raw(&fds.console),
            join: fds
                .join
                .iter()
                .map(|(f, flag)| (f.as_raw_fd(), flag.bits()))
                .collect(),
            placement: fds.placement.as_ref().map(|p| match p {
                Placement::V1Tasks(v) => {
                    BootPlacement::V1Tasks(v.iter().map(AsRawFd::as_raw_fd).collect())
                }
                Placement::V2Dir(f) => BootPlacement::V2Dir(f.as_raw_fd()),
            }),
        }
    }

    /// Every descriptor the helper must inherit.
    fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.go, self.status];
        v.extend(self.fifo);
        v.extend(self.stdio.iter().flatten());
        v.extend(self.console);
        v.extend(self.join.iter().map(|(f, _)| *f));
        match &self.placement {
            Some(BootPlacement::V1Tasks(t)) => v.extend(t),
            Some(BootPlacement::V2Dir(f)) => v.push(*f),
            None => {}
        }
        v
    }
}

/// What the vfork child reads (and, on failure, writes) in shared memory.
#[repr(C)]
struct ChildArgs {
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    keep: *const RawFd,
    keep_len: usize,
    /// Signals with a handler, to be reset to SIG_DFL.
    reset: *const c_int,
    reset_len: usize,
    mask: libc::sigset_t,
    /// errno of a failed execve, set by the child.
    err: c_int,
}

/// The child's stack: small, as the child makes a handful of system calls.
const STACK_SIZE: usize = 64 * 1024;

/// Starts the intermediate process as a fresh exec of this binary (see the
/// module doc) and returns its pid; it is our child, to be reaped.
pub(crate) fn spawn_helper(
    id: &str,
    bundle: PathBuf,
    no_pivot: bool,
    fds: &ChildFds,
) -> Result<Pid> {
    // Keep the constructor (and so its object file) in every binary that
    // can get here: a binary without it would run its own `main` instead.
    std::hint::black_box(&HOOK);
    let boot = Boot::new(bundle, no_pivot, fds);
    let text = serde_json::to_vec(&boot).map_err(|e| Error::Init {
        id: id.to_string(),
        msg: format!("encode the helper's bootstrap: {e}"),
    })?;
    let (br, bw) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::sys("pipe2", e))?;
    // A few hundred bytes: the pipe's buffer takes them before any reader.
    std::fs::File::from(bw)
        .write_all(&text)
        .map_err(|e| Error::io("write", "the helper's bootstrap pipe", e))?;
    let mut keep = boot.fds();
    keep.push(br.as_raw_fd());

    let cstr = |s: String| CString::new(s).expect("no NUL in a number or fixed name");
    let path = cstr("/proc/self/exe".into());
    let argv0 = cstr("evoke-container-init".into());
    let env0 = cstr(format!("{HELPER_ENV}={}", br.as_raw_fd()));
    let argv = [argv0.as_ptr(), std::ptr::null()];
    let envp = [env0.as_ptr(), std::ptr::null()];
    let reset = handled_signals();
    let mut stack = vec![0u8; STACK_SIZE];

    let all = nix::sys::signal::SigSet::all();
    let mut old = nix::sys::signal::SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&all),
        Some(&mut old),
    )
    .map_err(|e| Error::sys("pthread_sigmask", e))?;
    let mut args = ChildArgs {
        path: path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        keep: keep.as_ptr(),
        keep_len: keep.len(),
        reset: reset.as_ptr(),
        reset_len: reset.len(),
        mask: *old.as_ref(),
        err: 0,
    };
    // The stack grows down: pass its top, 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + STACK_SIZE) & !15;
    // SAFETY: `child` runs on `stack` (ours, alive until clone returns: with
    // CLONE_VFORK the call returns only once the child has exec'd or
    // exited) and only reads `args` and the strings and arrays it points
    // to, all alive until then; see the module doc for what it does.
    let rc = unsafe {
        libc::clone(
            child,
            top as *mut c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut args as *mut ChildArgs as *mut c_void,
        )
    };
    let clone_err = nix::Error::last();
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&old),
        None,
    );
    drop(br);
    if rc == -1 {
        return Err(Error::sys("clone(CLONE_VM|CLONE_VFORK)", clone_err));
    }
    let pid = Pid::from_raw(rc);
    if args.err != 0 {
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(Error::sys(
            "exec /proc/self/exe as the container helper",
            nix::Error::from_raw(args.err),
        ));
    }
    Ok(pid)
}

/// The signals this process catches (handler neither SIG_DFL nor SIG_IGN).
/// Dispositions are per process, so the list cannot go stale between here
/// and the clone except by another thread installing a handler, whose
/// signal is blocked in the child until it execs, where exec resets it.
fn handled_signals() -> Vec<c_int> {
    let mut v = Vec::new();
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: a query only (NULL new action) into a zeroed sigaction,
        // which is a valid value of that plain C struct.
        let caught = unsafe {
            let mut cur: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut cur) == 0
                && cur.sa_sigaction != libc::SIG_DFL
                && cur.sa_sigaction != libc::SIG_IGN
        };
        if caught {
            v.push(sig);
        }
    }
    v
}

/// The vfork child. Only async-signal-safe calls; see the module doc.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive and not touched by
    // the parent while we run (its thread is suspended by CLONE_VFORK).
    let a = unsafe { &mut *(arg as *mut ChildArgs) };
    // SAFETY: sigaction, fcntl, sigprocmask, execve and _exit are
    // async-signal-safe system call wrappers; every pointer comes from the
    // parent's live `ChildArgs`, and the zeroed sigaction is a valid value.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for i in 0..a.reset_len {
            libc::sigaction(*a.reset.add(i), &dfl, std::ptr::null_mut());
        }
        for i in 0..a.keep_len {
            libc::fcntl(*a.keep.add(i), libc::F_SETFD, 0);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &a.mask, std::ptr::null_mut());
        libc::execve(a.path, a.argv, a.envp);
        a.err = *libc::__errno_location();
        libc::_exit(127)
    }
}

/// Runs before `main` in every process of a binary that links this crate.
type Ctor = extern "C" fn(c_int, *const *const c_char, *const *const c_char);

#[used]
#[link_section = ".init_array"]
static HOOK: Ctor = hook;

/// Becomes the helper when [`HELPER_ENV`] is set; returns at once otherwise.
extern "C" fn hook(_argc: c_int, _argv: *const *const c_char, envp: *const *const c_char) {
    let prefix = HELPER_ENV.as_bytes();
    let mut p = envp;
    if p.is_null() {
        return;
    }
    loop {
        // SAFETY: glibc passes the NULL-terminated environment array of
        // NUL-terminated strings to .init_array functions.
        let e = unsafe { *p };
        if e.is_null() {
            return;
        }
        // SAFETY: as above, `e` is a NUL-terminated string.
        let bytes = unsafe { CStr::from_ptr(e) }.to_bytes();
        if let Some(rest) = bytes
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix(b"="))
        {
            if let Some(fd) = std::str::from_utf8(rest).ok().and_then(|s| s.parse().ok()) {
                helper_main(fd);
            }
            return;
        }
        // SAFETY: not past the terminating NULL, checked above.
        p = unsafe { p.add(1) };
    }
}

/// The helper: reads its bootstrap, plans the container from the bundle and
/// runs the intermediate process's part (`init::intermediate`), which
/// never returns.
fn helper_main(boot_fd: RawFd) -> ! {
    // SAFETY: our parent passed this descriptor for exactly this use.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(boot_fd) });
    let mut text = Vec::new();
    let boot: Boot = match f
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_slice(&text).map_err(|e| e.to_string()))
    {
        Ok(b) => b,
        Err(e) => {
            let _ =
                std::io::stderr().write_all(format!("evoke: helper bootstrap: {e}\n").as_bytes());
            crate::sys::exit_now(1)
        }
    };
    drop(f);
    // SAFETY (all `own` calls): each number names a descriptor our parent
    // passed on for the role it is listed under, once.
    let own = |fd: RawFd| unsafe { OwnedFd::from_raw_fd(fd) };
    let status = own(boot.status);
    let config = boot.bundle.join("config.json");
    let plan = match oci_spec::runtime::Spec::load(&config)
        .map_err(|e| format!("load {}: {e}", config.display()))
        .and_then(|spec| crate::plan::plan(&spec, &boot.bundle).map_err(|e| e.to_string()))
    {
        Ok(plan) => crate::plan::Plan {
            no_pivot: boot.no_pivot,
            ..plan
        },
        Err(e) => {
            let _ = nix::unistd::write(&status, &Msg::Error(e).encode());
            crate::sys::exit_now(1)
        }
    };
    let fds = ChildFds {
        go: own(boot.go),
        status: StatusFd(Some(status)),
        fifo: boot.fifo.map(own),
        stdio: boot.stdio.map(|f| f.map(own)),
        console: boot.console.map(own),
        join: boot
            .join
            .iter()
            .map(|(f, bits)| (own(*f), CloneFlags::from_bits_truncate(*bits)))
            .collect(),
        placement: boot.placement.map(|p| match p {
            BootPlacement::V1Tasks(v) => Placement::V1Tasks(v.into_iter().map(own).collect()),
            BootPlacement::V2Dir(f) => Placement::V2Dir(own(f)),
        }),
    };
    crate::init::intermediate(&plan, fds)
}
