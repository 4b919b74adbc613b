//! `evoke-vmm`: the VMM process as a small binary of its own. `evoke vmm`
//! does the same, but maps the whole evoke binary; this one keeps the VMM's
//! memory overhead small. The microvm tier uses it when it sits next to the
//! evoke binary.
//!
//! `evoke-vmm [vmm] --config FILE` (a runner::ProcessConfig as JSON), or
//! `evoke-vmm [vmm] [--kernel] KERNEL [--initrd CPIO]... [--cmdline S] [--memory MIB]
//! [--cpus N] [--agent-device virtio-console|serial] [--boot-protocol
//! auto|linux64|pvh] [--no-seccomp]`. Serial console on stderr, agent channel
//! on stdin/stdout; exits 0 when the guest resets or powers off.

use std::path::PathBuf;
use std::process::ExitCode;

use evoke_vmm::runner::{exit_code, run_process, ProcessConfig};
use evoke_vmm::vm::{AgentDevice, Payload, VmConfig};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    // `evoke-vmm vmm ...` takes the same arguments as `evoke vmm ...`, so a
    // script written for one runs the other.
    if args.peek().is_some_and(|a| a == "vmm") {
        args.next();
    }
    let mut kernel = None;
    let mut initrd = Vec::new();
    let mut cmdline = String::from(
        "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd",
    );
    let mut mem_mib = 256;
    let mut vcpus = 1;
    let mut agent_device = AgentDevice::VirtioConsole;
    let mut protocol = Default::default();
    let mut seccomp = true;
    let mut config_file: Option<PathBuf> = None;
    let usage = || {
        eprintln!("usage: evoke-vmm --config FILE | evoke-vmm KERNEL [--initrd CPIO]... [--cmdline S] [--memory MIB] [--cpus N] [--agent-device D] [--boot-protocol P] [--no-seccomp]");
        ExitCode::from(2)
    };
    while let Some(a) = args.next() {
        let mut value = || args.next();
        match a.as_str() {
            "--initrd" => match value() {
                Some(v) => initrd.push(PathBuf::from(v)),
                None => return usage(),
            },
            "--cmdline" => match value() {
                Some(v) => cmdline = v,
                None => return usage(),
            },
            "--memory" => match value().and_then(|v| v.parse().ok()) {
                Some(v) => mem_mib = v,
                None => return usage(),
            },
            "--cpus" => match value().and_then(|v| v.parse().ok()) {
                Some(v) => vcpus = v,
                None => return usage(),
            },
            "--agent-device" => match value().and_then(|v| serde_json::from_value(v.into()).ok()) {
                Some(v) => agent_device = v,
                None => return usage(),
            },
            "--boot-protocol" => {
                match value().and_then(|v| serde_json::from_value(v.into()).ok()) {
                    Some(v) => protocol = v,
                    None => return usage(),
                }
            }
            "--no-seccomp" => seccomp = false,
            "--kernel" => match value() {
                Some(v) => kernel = Some(PathBuf::from(v)),
                None => return usage(),
            },
            "--config" => match value() {
                Some(v) => config_file = Some(PathBuf::from(v)),
                None => return usage(),
            },
            k if !k.starts_with('-') && kernel.is_none() => kernel = Some(PathBuf::from(k)),
            _ => return usage(),
        }
    }
    let cfg = if let Some(path) = config_file {
        let parsed = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<ProcessConfig>(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(c) => c,
            Err(e) => {
                eprintln!("evoke-vmm: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    } else {
        let Some(kernel) = kernel else {
            return usage();
        };
        ProcessConfig {
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
        }
    };
    match run_process(&cfg) {
        Ok(reason) => {
            if let evoke_vmm::ExitReason::VcpuError(msg) = &reason {
                eprintln!("evoke-vmm: {msg}");
            }
            ExitCode::from(exit_code(&reason))
        }
        Err(e) => {
            eprintln!("evoke-vmm: {e}");
            ExitCode::from(1)
        }
    }
}
