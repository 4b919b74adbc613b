//! The VMM process's command line, shared by `evoke vmm` and the small
//! `evoke-vmm` binary so the two take the same arguments.
//!
//! It is parsed by hand, not with clap: the VMM is started once per microVM
//! and its memory overhead is benchmarked, and building the evoke binary's
//! whole clap command tree touches (and so maps) megabytes of code the VMM
//! never needs again.
//!
//! ```text
//! vmm --config FILE                 a runner::ProcessConfig as JSON (the tier)
//! vmm [--kernel] KERNEL [--initrd CPIO]... [--cmdline S] [--memory MIB]
//!     [--cpus N] [--agent-device virtio-console|serial]
//!     [--boot-protocol auto|linux64|pvh] [--no-seccomp]
//! ```
//! Serial console on stderr, agent channel on stdin/stdout; the exit code is
//! [`runner::exit_code`]'s, 2 for a bad command line.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::boot::BootProtocol;
use crate::runner::{self, ProcessConfig};
use crate::vm::{AgentDevice, Payload, VmConfig};

/// The kernel command line when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd cryptomgr.notests";

/// How the command line asks to run the VMM.
#[derive(Debug)]
pub enum Invocation {
    /// Read a [`ProcessConfig`] from this JSON file.
    ConfigFile(PathBuf),
    /// Everything given as flags.
    Flags(Box<ProcessConfig>),
    /// `--help`.
    Help,
}

/// A command line the VMM cannot use.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("{flag} needs a value")]
    MissingValue { flag: String },
    #[error("{flag}: bad value {value:?}")]
    BadValue { flag: String, value: String },
    #[error("unknown argument {0:?}")]
    Unknown(String),
    #[error("no kernel given: pass KERNEL, --kernel KERNEL or --config FILE")]
    NoKernel,
    #[error("argument {0:?} is not valid utf-8")]
    NotUtf8(String),
}

/// The usage text.
pub const USAGE: &str = "usage: vmm --config FILE\n       vmm [--kernel] KERNEL [--initrd CPIO]... [--cmdline S] [--memory MIB] [--cpus N]\n           [--agent-device virtio-console|serial] [--boot-protocol auto|linux64|pvh] [--no-seccomp]";

fn kebab_enum<T: serde::de::DeserializeOwned>(flag: &str, v: &str) -> Result<T, UsageError> {
    serde_json::from_value(serde_json::Value::String(v.to_string())).map_err(|_| {
        UsageError::BadValue {
            flag: flag.into(),
            value: v.into(),
        }
    })
}

/// Parses the arguments after the program name (and after `vmm`, if the
/// caller is the evoke binary). `default_kernel` supplies the kernel when
/// none is named.
pub fn parse(
    args: impl IntoIterator<Item = OsString>,
    default_kernel: impl FnOnce() -> Option<PathBuf>,
) -> Result<Invocation, UsageError> {
    let mut args = args.into_iter().map(|a| {
        a.into_string()
            .map_err(|a| UsageError::NotUtf8(a.to_string_lossy().into_owned()))
    });
    let mut kernel = None;
    let mut initrd = Vec::new();
    let mut cmdline = DEFAULT_CMDLINE.to_string();
    let mut mem_mib = 256;
    let mut vcpus = 1;
    let mut agent_device = AgentDevice::VirtioConsole;
    let mut protocol = BootProtocol::default();
    let mut seccomp = true;
    while let Some(a) = args.next() {
        let a = a?;
        let mut value = || -> Result<String, UsageError> {
            args.next()
                .unwrap_or_else(|| Err(UsageError::MissingValue { flag: a.clone() }))
        };
        let number = |v: String| -> Result<u64, UsageError> {
            v.parse().map_err(|_| UsageError::BadValue {
                flag: a.clone(),
                value: v,
            })
        };
        match a.as_str() {
            "-h" | "--help" => return Ok(Invocation::Help),
            "--config" => return Ok(Invocation::ConfigFile(value()?.into())),
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initrd" => initrd.push(PathBuf::from(value()?)),
            "--cmdline" => cmdline = value()?,
            "--memory" => mem_mib = number(value()?)?,
            "--cpus" => {
                let v = value()?;
                vcpus = u8::try_from(number(v.clone())?).map_err(|_| UsageError::BadValue {
                    flag: a.clone(),
                    value: v,
                })?
            }
            "--agent-device" => agent_device = kebab_enum(&a, &value()?)?,
            "--boot-protocol" => protocol = kebab_enum(&a, &value()?)?,
            "--no-seccomp" => seccomp = false,
            k if !k.starts_with('-') && kernel.is_none() => kernel = Some(PathBuf::from(k)),
            _ => return Err(UsageError::Unknown(a)),
        }
    }
    let kernel = kernel.or_else(default_kernel).ok_or(UsageError::NoKernel)?;
    Ok(Invocation::Flags(Box::new(ProcessConfig {
        vm: VmConfig {
            mem_mib,
            vcpus,
            payload: Payload::Linux {
                kernel,
                initrd,
                cmdline,
                protocol,
            },
            agent_device,
            seccomp,
            net: Vec::new(),
        },
        cgroup: None,
        console_cap: 16 << 20,
        forward_signals: false,
        exec_socket: None,
    })))
}

/// Runs the VMM process for `args` (the arguments after the program name and
/// its `vmm`); `prog` prefixes messages. Returns the process exit code.
pub fn main(prog: &str, args: impl IntoIterator<Item = OsString>) -> u8 {
    let invocation = parse(args, || crate::boot::default_kernel().ok());
    let cfg = match invocation {
        Ok(Invocation::Help) => {
            println!("{USAGE}");
            return 0;
        }
        Ok(Invocation::Flags(cfg)) => *cfg,
        Ok(Invocation::ConfigFile(path)) => {
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<ProcessConfig>(&b).map_err(|e| e.to_string())
                });
            match parsed {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{prog}: vmm config {}: {e}", path.display());
                    return 2;
                }
            }
        }
        Err(e) => {
            eprintln!("{prog}: {e}\n{USAGE}");
            return 2;
        }
    };
    match runner::run_process(&cfg) {
        Ok(reason) => {
            if let crate::ExitReason::VcpuError(msg) = &reason {
                eprintln!("{prog}: {msg}");
            }
            runner::exit_code(&reason)
        }
        Err(e) => {
            eprintln!("{prog}: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn args(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    #[test]
    fn flags_become_a_process_config() {
        let inv = parse(
            args(&[
                "/k",
                "--initrd",
                "a.cpio",
                "--initrd",
                "b.cpio",
                "--memory",
                "128",
                "--cpus",
                "2",
                "--boot-protocol",
                "pvh",
                "--agent-device",
                "serial",
                "--no-seccomp",
                "--cmdline",
                "quiet",
            ]),
            || None,
        )
        .unwrap();
        let Invocation::Flags(cfg) = inv else {
            panic!("{inv:?}")
        };
        assert_eq!((cfg.vm.mem_mib, cfg.vm.vcpus), (128, 2));
        assert_eq!(cfg.vm.agent_device, AgentDevice::Serial);
        assert!(!cfg.vm.seccomp);
        let Payload::Linux {
            kernel,
            initrd,
            cmdline,
            protocol,
        } = cfg.vm.payload
        else {
            panic!("not linux")
        };
        assert_eq!(kernel, PathBuf::from("/k"));
        assert_eq!(initrd, [PathBuf::from("a.cpio"), PathBuf::from("b.cpio")]);
        assert_eq!(cmdline, "quiet");
        assert_eq!(protocol, BootProtocol::Pvh);
    }

    #[test]
    fn config_help_and_the_default_kernel() {
        assert!(matches!(
            parse(args(&["--config", "/c.json"]), || None),
            Ok(Invocation::ConfigFile(p)) if p == Path::new("/c.json")
        ));
        assert!(matches!(
            parse(args(&["--help"]), || None),
            Ok(Invocation::Help)
        ));
        let Ok(Invocation::Flags(cfg)) = parse(args(&[]), || Some("/boot/k".into())) else {
            panic!("default kernel not used")
        };
        assert!(
            matches!(cfg.vm.payload, Payload::Linux { kernel, .. } if kernel == Path::new("/boot/k"))
        );
    }

    #[test]
    fn bad_command_lines_name_the_flag_or_argument() {
        let err = |a: &[&str]| parse(args(a), || None).unwrap_err().to_string();
        assert_eq!(err(&[]), UsageError::NoKernel.to_string());
        assert!(err(&["/k", "--memory"]).contains("--memory needs a value"));
        assert!(err(&["/k", "--memory", "lots"]).contains("--memory: bad value \"lots\""));
        assert!(err(&["/k", "--cpus", "300"]).contains("--cpus"));
        assert!(err(&["/k", "--boot-protocol", "bios"]).contains("--boot-protocol"));
        assert!(err(&["/k", "--frobnicate"]).contains("--frobnicate"));
        assert!(err(&["/k", "/other"]).contains("/other"));
    }
}
