//! The last exec of a container's process goes through a tiny trampoline
//! (the CVE-2019-5736 defence without re-executing evoke).
//!
//! A container's init, and every `exec`'d process, is a clone of the evoke
//! process that made it, so until it execs the workload its
//! `/proc/self/exe` is the host's evoke binary. If the workload is a
//! `#!/proc/self/exe` script (or a binfmt_misc entry points there), the
//! kernel resolves that interpreter in the execing process and runs the
//! host binary inside the container; a process there could then keep a
//! handle on it and write to it once it is no longer busy. runc and evoke
//! used to close that hole by re-executing the runtime from a protected
//! copy before creating anything ([`crate::selfexe::protect`]): one more
//! start of a 44 MB binary for every `evoke oci create`.
//!
//! Here the process instead execs, as its very last step, a static ELF of a
//! few hundred bytes written into a sealed memfd, and that program execs
//! the workload. So at the moment the workload's path (and any interpreter
//! named in it) is resolved, `/proc/self/exe` is the sealed memfd: a
//! `#!/proc/self/exe` workload gets the trampoline again, never evoke. The
//! trampoline needs no loader, no libc and no page of evoke's memory; it
//! costs one exec of a 1-page program.
//!
//! The program, given `argv = [PATH, ARG0, ARG1, …]` and the environment,
//! calls `execve(PATH, [ARG0, ARG1, …], envp)`. If that fails it writes
//! one line to stderr and exits with 127, as a shell does.
//!
//! How the trampoline itself is exec'd: with `execveat(memfd, "",
//! AT_EMPTY_PATH)` when the container's seccomp profile allows that call
//! ([`execveat_allowed`]), else with `execve("/proc/self/fd/N")` once that
//! path is checked to lead to the memfd. A process that can do neither is
//! refused, rather than exec'd from the unprotected binary.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction};

/// Where the program is loaded (any page-aligned address above
/// vm.mmap_min_addr; the process has nothing else mapped).
const BASE: u64 = 0x40_0000;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// Two program headers: the loadable segment and PT_GNU_STACK.
const CODE_OFFSET: usize = EHDR_SIZE + 2 * PHDR_SIZE;
const FAIL_MSG: &[u8] = b"evoke: exec of the container process failed\n";

/// The trampoline's machine code (x86-64), followed by [`FAIL_MSG`].
///
/// At the entry point the stack holds argc, then argv[0..argc], a NULL,
/// then envp: the kernel's initial process stack.
fn code() -> Vec<u8> {
    let mut c: Vec<u8> = vec![
        0x48, 0x8b, 0x04, 0x24, // mov rax, [rsp]                argc
        // Fewer than two arguments (no path, or no argv[0] for it): fail.
        // This also ends the loop a `#!/proc/self/exe` workload would make.
        0x48, 0x83, 0xf8, 0x02, // cmp rax, 2
        0x72, 0x16, // jb fail (22 bytes on)
        0x48, 0x8b, 0x7c, 0x24, 0x08, // mov rdi, [rsp+8]        path = argv[0]
        0x48, 0x8d, 0x74, 0x24, 0x10, // lea rsi, [rsp+16]       argv = &argv[1]
        0x48, 0x8d, 0x54, 0xc4, 0x10, // lea rdx, [rsp+rax*8+16] envp
        0xb8, 0x3b, 0x00, 0x00, 0x00, // mov eax, 59 (execve)
        0x0f, 0x05, // syscall
        // fail: reached when execve failed.
        0xbf, 0x02, 0x00, 0x00, 0x00, // mov edi, 2 (stderr)
        0x48, 0x8d, 0x35, // lea rsi, [rip+disp32]          the message
    ];
    let disp_at = c.len();
    c.extend_from_slice(&[0; 4]);
    let after_lea = c.len();
    c.push(0xba); // mov edx, imm32                          its length
    c.extend_from_slice(&(FAIL_MSG.len() as u32).to_le_bytes());
    c.extend_from_slice(&[
        0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1 (write)
        0x0f, 0x05, // syscall
        0xbf, 0x7f, 0x00, 0x00, 0x00, // mov edi, 127
        0xb8, 0xe7, 0x00, 0x00, 0x00, // mov eax, 231 (exit_group)
        0x0f, 0x05, // syscall
    ]);
    let disp = (c.len() - after_lea) as u32;
    c[disp_at..disp_at + 4].copy_from_slice(&disp.to_le_bytes());
    c.extend_from_slice(FAIL_MSG);
    c
}

/// The whole ELF file: header, two program headers, code.
pub(crate) fn image() -> Vec<u8> {
    let code = code();
    let size = (CODE_OFFSET + code.len()) as u64;
    let mut f = Vec::with_capacity(size as usize);
    // e_ident: magic, 64-bit, little-endian, version 1, System V ABI.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&(BASE + CODE_OFFSET as u64).to_le_bytes()); // e_entry
    f.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes()); // e_ehsize
    f.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes()); // e_phentsize
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
    let phdr = |f: &mut Vec<u8>, kind: u32, flags: u32, vaddr: u64, len: u64, align: u64| {
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&flags.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes()); // p_offset
        f.extend_from_slice(&vaddr.to_le_bytes()); // p_vaddr
        f.extend_from_slice(&vaddr.to_le_bytes()); // p_paddr
        f.extend_from_slice(&len.to_le_bytes()); // p_filesz
        f.extend_from_slice(&len.to_le_bytes()); // p_memsz
        f.extend_from_slice(&align.to_le_bytes());
    };
    // PT_LOAD of the whole file, read + execute.
    phdr(&mut f, 1, 0x5, BASE, size, 0x1000);
    // PT_GNU_STACK: a stack that is not executable.
    phdr(&mut f, 0x6474_e551, 0x6, 0, 0, 0x10);
    f.extend_from_slice(&code);
    f
}

/// Whether a process under `profile` may call `execveat` (with any
/// arguments): the default action lets it through and no rule stops it,
/// or an argument-free rule allows it and none stops it. A conservative
/// reading of the profile: anything else counts as "no".
pub(crate) fn execveat_allowed(profile: Option<&LinuxSeccomp>) -> bool {
    let Some(p) = profile else {
        return true;
    };
    let lets_through = |a: LinuxSeccompAction| {
        matches!(
            a,
            LinuxSeccompAction::ScmpActAllow | LinuxSeccompAction::ScmpActLog
        )
    };
    let mut allowed = lets_through(p.default_action());
    for sc in p.syscalls().iter().flatten() {
        if !sc.names().iter().any(|n| n == "execveat") {
            continue;
        }
        let unconditional = sc.args().as_ref().is_none_or(|a| a.is_empty());
        if !lets_through(sc.action()) {
            return false;
        }
        if unconditional {
            allowed = true;
        }
    }
    allowed
}

/// A trampoline in a sealed memfd, ready to exec.
pub(crate) struct Trampoline {
    fd: OwnedFd,
    /// `/proc/self/fd/N`, checked to lead to `fd`, when execveat is not
    /// allowed.
    proc_path: Option<CString>,
}

impl Trampoline {
    /// Writes the program into a new sealed memfd. With `by_fd` false,
    /// also checks that `/proc/self/fd/N` leads to it (a /proc that is no
    /// procfs, or a mount over it, would send the exec elsewhere).
    pub(crate) fn new(by_fd: bool) -> Result<Self, String> {
        let name = c"evoke-exec";
        let base = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
        // MFD_EXEC (Linux 6.3) says so to a kernel with vm.memfd_noexec=1;
        // older kernels reject the flag, and their memfds are executable.
        let fd = match memfd_create(name, base | MFdFlags::from_bits_retain(libc::MFD_EXEC)) {
            Err(nix::Error::EINVAL) => memfd_create(name, base),
            r => r,
        }
        .map_err(|e| format!("memfd_create for the exec trampoline: {e}"))?;
        let mut file = File::from(fd);
        file.write_all(&image())
            .map_err(|e| format!("write the exec trampoline: {e}"))?;
        let seals = SealFlag::F_SEAL_SEAL
            | SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_WRITE;
        nix::fcntl::fcntl(&file, FcntlArg::F_ADD_SEALS(seals))
            .map_err(|e| format!("seal the exec trampoline: {e}"))?;
        let fd = OwnedFd::from(file);
        let proc_path = if by_fd {
            None
        } else {
            let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
            let ours = nix::sys::stat::fstat(fd.as_fd())
                .map_err(|e| format!("stat the exec trampoline: {e}"))?;
            match nix::sys::stat::stat(path.as_str()) {
                Ok(st) if st.st_dev == ours.st_dev && st.st_ino == ours.st_ino => {}
                _ => {
                    return Err(format!(
                        "the seccomp profile denies execveat and {path} does not lead to \
                         the exec trampoline: refusing to exec from the runtime's binary"
                    ))
                }
            }
            Some(CString::new(path).map_err(|e| e.to_string())?)
        };
        Ok(Trampoline { fd, proc_path })
    }

    /// Execs `prog` with `args` and `env` through the trampoline. Returns
    /// only on failure.
    pub(crate) fn exec(&self, prog: &CStr, args: &[CString], env: &[CString]) -> nix::Error {
        let mut argv: Vec<&CStr> = Vec::with_capacity(args.len() + 1);
        argv.push(prog);
        argv.extend(args.iter().map(CString::as_c_str));
        match &self.proc_path {
            None => nix::unistd::execveat(
                self.fd.as_fd(),
                c"",
                &argv,
                env,
                nix::fcntl::AtFlags::AT_EMPTY_PATH,
            ),
            Some(path) => nix::unistd::execve(path, &argv, env),
        }
        .unwrap_err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    fn installed() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trampoline");
        std::fs::write(&path, image()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        (dir, path)
    }

    #[test]
    fn the_trampoline_execs_its_first_argument_with_the_rest_as_argv_and_the_same_env() {
        let (_d, t) = installed();
        // As the init calls it: argv[0] is the path to exec.
        let out = Command::new(&t)
            .arg0("/bin/sh")
            .args([
                "my-name",
                "-c",
                "echo \"$0 $1 $TRAMPOLINE_TEST\"; exit 7",
                "zero",
                "one",
            ])
            .env("TRAMPOLINE_TEST", "kept")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(7), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "zero one kept\n");
    }

    #[test]
    fn a_failed_exec_in_the_trampoline_says_so_and_exits_127() {
        let (_d, t) = installed();
        let out = Command::new(&t)
            .arg0("/nonexistent/prog")
            .arg("prog")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(127), "{out:?}");
        assert_eq!(out.stderr, FAIL_MSG);
    }

    #[test]
    fn a_self_exe_script_run_through_the_trampoline_never_reaches_the_test_binary() {
        // `#!/proc/self/exe` resolved by the trampoline's exec names the
        // trampoline itself (argv: /proc/self/exe SCRIPT), which execs
        // itself once more with SCRIPT alone, and that one fails.
        let (d, t) = installed();
        let script = d.path().join("evil");
        std::fs::write(&script, "#!/proc/self/exe\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new(&t).arg0(&script).arg("evil").output().unwrap();
        assert_eq!(out.status.code(), Some(127), "{out:?}");
        assert_eq!(out.stderr, FAIL_MSG);
    }

    #[test]
    fn execveat_is_allowed_unless_the_profile_stops_it() {
        let prof = |v: serde_json::Value| -> LinuxSeccomp { serde_json::from_value(v).unwrap() };
        assert!(execveat_allowed(None));
        assert!(execveat_allowed(Some(&crate::spec::default_seccomp())));
        assert!(!execveat_allowed(Some(&prof(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["execve", "write"], "action": "SCMP_ACT_ALLOW"}]
        })))));
        assert!(execveat_allowed(Some(&prof(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["execve", "execveat"], "action": "SCMP_ACT_ALLOW"}]
        })))));
        assert!(!execveat_allowed(Some(&prof(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["execveat"], "action": "SCMP_ACT_KILL"}]
        })))));
    }
}
