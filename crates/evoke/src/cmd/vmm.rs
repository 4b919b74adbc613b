//! `evoke vmm` (hidden): the microVM monitor process. The microvm tier starts
//! one per VM with `--config`; the flags serve benchmarks and debugging.

use std::path::PathBuf;

use anyhow::Context;
use evoke_vmm::boot::BootProtocol;
use evoke_vmm::runner::{self, ProcessConfig};
use evoke_vmm::vm::{AgentDevice, Payload, VmConfig};

use crate::Global;

#[derive(clap::Args, Debug)]
pub struct VmmArgs {
    /// A ProcessConfig as JSON (written by the microvm tier); other flags are ignored.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Guest kernel: bzImage or ELF vmlinux (default /boot/vmlinuz-*-cloud-amd64).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs part (newc cpio); repeat to concatenate.
    #[arg(long)]
    pub initrd: Vec<PathBuf>,
    #[arg(
        long,
        default_value = "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
    )]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// virtio-console or serial (COM2).
    #[arg(long, default_value = "virtio-console")]
    pub agent_device: String,
    /// auto, linux64 or pvh.
    #[arg(long, default_value = "auto")]
    pub boot_protocol: String,
    /// Run without the seccomp filter (debugging only).
    #[arg(long)]
    pub no_seccomp: bool,
}

pub fn main(_global: &Global, args: VmmArgs) -> anyhow::Result<u8> {
    let cfg: ProcessConfig = match &args.config {
        Some(path) => {
            let text =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => {
            let kernel = match args.kernel {
                Some(k) => k,
                None => evoke_vmm::boot::default_kernel()?,
            };
            let protocol: BootProtocol =
                serde_json::from_value(serde_json::Value::String(args.boot_protocol.clone()))
                    .with_context(|| format!("unknown boot protocol {:?}", args.boot_protocol))?;
            let agent_device: AgentDevice =
                serde_json::from_value(serde_json::Value::String(args.agent_device.clone()))
                    .with_context(|| format!("unknown agent device {:?}", args.agent_device))?;
            ProcessConfig {
                vm: VmConfig {
                    mem_mib: args.memory,
                    vcpus: args.cpus,
                    payload: Payload::Linux {
                        kernel,
                        initrd: args.initrd,
                        cmdline: args.cmdline,
                        protocol,
                    },
                    agent_device,
                    seccomp: !args.no_seccomp,
                    net: Vec::new(),
                },
                cgroup: None,
                console_cap: 16 << 20,
            }
        }
    };
    let reason = runner::run_process(&cfg)?;
    if let evoke_vmm::ExitReason::VcpuError(msg) = &reason {
        eprintln!("evoke vmm: {msg}");
    }
    Ok(runner::exit_code(&reason))
}
