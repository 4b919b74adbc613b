//! The `microvm` tier: [`WorkloadRuntime`] on top of the VMM.
//!
//! `create` resolves the image, turns image config plus spec into the
//! guest agent's [`GuestSpec`], builds the guest initramfs (cached agent and
//! modules, the image rootfs, the spec) with evoke-guest's builder, extracts
//! (once) the kernel's uncompressed vmlinux to boot it through PVH, and
//! writes the VMM process's config. `start` launches `evoke vmm --config`
//! (one process per VM, in its own cgroup) and a supervisor thread that
//! reads the agent's frames from the VMM's stdout: workload stdout/stderr go
//! to the caller's fds as they arrive, the exit frame becomes the workload's
//! exit status. The caller's stdin (`-i`) goes in as Stdin frames; signals
//! reach the workload as Signal frames, from this process or, for a signal
//! sent to the VMM by another (`evoke stop`), through the VMM's relay. State lives in `DATA_DIR/microvm/<id>/state.json`, so other
//! processes see it. `exec` (from any process: `evoke exec`, the node
//! agent for `kubectl exec`) connects to the VMM's `exec.sock` there and
//! runs the command inside the guest as an exec session on the agent
//! channel ([`crate::agent_mux`]).
//!
//! Lifecycle: Created (initramfs and config written; still Created while
//! the guest boots, with the VMM's pid in the record) → Running (the guest
//! agent reported the workload's process started; `pid` is the VMM's,
//! `started_at` when that report arrived) → Exited (exit frame, or the
//! VMM ended without one: guest panic or kill). `start` returns only once
//! the workload runs in the guest, or fails when the guest reports that it
//! could not start it, ends first, or does not get there within the boot
//! timeout ([`BOOT_TIMEOUT_ENV`], [`MicroVmTier::with_boot_timeout`]), as
//! Kata reports a container running only once it started inside the guest.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio as ProcStdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use evoke_guest::initramfs::{find_agent, GuestBase, InitramfsBuilder, Part, DEFAULT_MODULES};
use evoke_guest::net::NetConfig;
use evoke_guest::proto::Frame;
use evoke_guest::spec::{Channel, ExecRequest, GuestSpec, Shutdown};
use evoke_guest::Rootfs;
use evoke_runtime::image::ImageStore;
use evoke_runtime::workload::validate_id;
use evoke_runtime::{
    ExecSpec, ExitInfo, RuntimeError, Stdio, TtySize, WorkloadRuntime, WorkloadSpec, WorkloadState,
    WorkloadStatus,
};

use crate::agent_mux;
use crate::cgroup::{self, VmmCgroup};
use crate::runner::ProcessConfig;
use crate::vm::{AgentDevice, NetDeviceConfig, Payload, VmConfig};

const TIER: &str = "microvm";
/// The VMM's exec socket in the VM's state directory (see
/// [`crate::agent_mux`]).
pub const EXEC_SOCKET: &str = "exec.sock";
/// How long `start` waits for the guest to report the workload started.
/// A stock kernel reaches the workload in well under a second on real KVM;
/// nested under QEMU TCG (the test host) on a loaded machine it can take
/// tens of seconds.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Environment variable (whole seconds) that overrides
/// [`DEFAULT_BOOT_TIMEOUT`] for every tier this process makes.
pub const BOOT_TIMEOUT_ENV: &str = "EVOKE_MICROVM_BOOT_TIMEOUT";
/// Guest RAM when the workload sets no memory limit.
pub const DEFAULT_MEM_MIB: u64 = 512;
/// The smallest guest the stock kernel and an initramfs fit in.
pub const MIN_MEM_MIB: u64 = 128;
/// The guest kernel's command line: serial console, reset on reboot and on
/// panic (both end the VMM), no PCI probing, the i8042 only for its reset
/// line, and a quiet boot (every console byte is a VM exit) that still
/// shows errors and panics in the console log. `cryptomgr.notests` skips the
/// crypto self-tests each algorithm runs as it registers, about a sixth of
/// the stock kernel's time to init in the test host (as Kata's guests do).
pub const GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd quiet cryptomgr.notests rdinit=/init";

fn tier_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> RuntimeError {
    RuntimeError::tier(TIER, e)
}

/// The microvm tier. Cheap to share: state is on disk plus the handles of
/// VMs this process started.
pub struct MicroVmTier {
    data_dir: PathBuf,
    root: PathBuf,
    /// The binary that has the hidden `vmm` subcommand (evoke itself).
    vmm_exe: PathBuf,
    kernel: Option<PathBuf>,
    boot_timeout: Duration,
    pending: Mutex<HashMap<String, Stdio>>,
    running: Mutex<HashMap<String, Arc<Mutex<Option<ChildStdin>>>>>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    spec: WorkloadSpec,
    status: WorkloadStatus,
    /// The VMM's pid while the guest boots (state still Created), so a
    /// forced remove can end it.
    #[serde(default)]
    booting_pid: Option<u32>,
}

impl MicroVmTier {
    /// A tier keeping its state under `data_dir/microvm`, starting VMMs with
    /// `vmm_exe vmm --config FILE`.
    pub fn new(data_dir: &Path, vmm_exe: PathBuf) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            root: data_dir.join(TIER),
            vmm_exe,
            kernel: None,
            boot_timeout: boot_timeout_from_env(),
            pending: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Wait this long (instead of [`DEFAULT_BOOT_TIMEOUT`] or
    /// [`BOOT_TIMEOUT_ENV`]) for a started guest to run the workload.
    pub fn with_boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    /// Use this guest kernel instead of `/boot/vmlinuz-*-cloud-amd64`.
    pub fn with_kernel(mut self, kernel: PathBuf) -> Self {
        self.kernel = Some(kernel);
        self
    }

    /// `evoke vmm`: the one binary. Its VMM path skips clap and drops its
    /// start-up pages, so it stays under Firecracker's 5 MiB overhead
    /// (bench/microvm); the small `evoke-vmm` binary is not needed.
    fn vmm_command(&self) -> Command {
        let mut c = Command::new(&self.vmm_exe);
        c.arg("vmm");
        c
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn kernel(&self) -> Result<PathBuf, RuntimeError> {
        match &self.kernel {
            Some(k) if k.exists() => Ok(k.clone()),
            Some(k) => Err(tier_err(crate::VmmError::KernelMissing { path: k.clone() })),
            None => crate::boot::default_kernel().map_err(tier_err),
        }
    }

    fn read_record(&self, id: &str) -> Result<Record, RuntimeError> {
        let path = self.dir(id).join("state.json");
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RuntimeError::NotFound(id.to_string()))
            }
            Err(e) => return Err(RuntimeError::io(path.display().to_string(), e)),
        };
        serde_json::from_slice(&text)
            .map_err(|e| tier_err(format!("workload state {} is damaged: {e}", path.display())))
    }

    fn write_record(&self, rec: &Record) -> Result<(), RuntimeError> {
        write_record_at(&self.dir(&rec.status.id), rec)
    }
}

/// [`BOOT_TIMEOUT_ENV`] when set to a whole number of seconds (at least 1),
/// else [`DEFAULT_BOOT_TIMEOUT`].
fn boot_timeout_from_env() -> Duration {
    let Ok(v) = std::env::var(BOOT_TIMEOUT_ENV) else {
        return DEFAULT_BOOT_TIMEOUT;
    };
    match v.trim().parse::<u64>() {
        Ok(secs) if secs > 0 => Duration::from_secs(secs),
        _ => {
            tracing::warn!(value = %v, "{BOOT_TIMEOUT_ENV} is not a positive number of seconds; using the default");
            DEFAULT_BOOT_TIMEOUT
        }
    }
}

fn write_record_at(dir: &Path, rec: &Record) -> Result<(), RuntimeError> {
    let path = dir.join("state.json");
    let tmp = dir.join("state.json.tmp");
    let bytes = serde_json::to_vec_pretty(rec).map_err(tier_err)?;
    fs::write(&tmp, bytes).map_err(|e| RuntimeError::io(tmp.display().to_string(), e))?;
    fs::rename(&tmp, &path).map_err(|e| RuntimeError::io(path.display().to_string(), e))
}

/// Docker's rules: `command` replaces the Entrypoint and drops the image's
/// Cmd; `args` replaces the Cmd; env entries override the image's by key.
pub fn guest_spec(
    spec: &WorkloadSpec,
    config: Option<&oci_config::Config>,
) -> Result<GuestSpec, RuntimeError> {
    let entrypoint = match &spec.command {
        Some(c) => c.clone(),
        None => config
            .and_then(|c| c.entrypoint().clone())
            .unwrap_or_default(),
    };
    let cmd = match (&spec.args, &spec.command) {
        (Some(a), _) => a.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => config.and_then(|c| c.cmd().clone()).unwrap_or_default(),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        return Err(RuntimeError::InvalidSpec(format!(
            "workload {} has no command and its image has no Entrypoint or Cmd",
            spec.id
        )));
    }
    let mut env: Vec<String> = config
        .and_then(|c| c.env().clone())
        .unwrap_or_else(|| GuestSpec::default().env);
    for (k, v) in &spec.env {
        env.retain(|e| e.split_once('=').map_or(e != k, |(ek, _)| ek != k));
        env.push(format!("{k}={v}"));
    }
    let workdir = spec
        .workdir
        .clone()
        .or_else(|| config.and_then(|c| c.working_dir().clone()))
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    let user = match spec.user {
        Some(u) => u,
        None => match config.and_then(|c| c.user().clone()).filter(|u| !u.is_empty()) {
            Some(u) => u.parse().map_err(|_| {
                RuntimeError::InvalidSpec(format!(
                    "image user {u:?} is not numeric UID[:GID]; the microvm tier does no name lookup"
                ))
            })?,
            None => Default::default(),
        },
    };
    Ok(GuestSpec {
        argv,
        env,
        workdir,
        uid: user.uid,
        gid: user.gid,
        hostname: Some(
            spec.hostname
                .clone()
                .unwrap_or_else(|| spec.id.chars().take(12).collect()),
        ),
        channel: Channel::VirtioConsole,
        shutdown: Shutdown::Reboot,
        stdin: spec.stdin,
        network: spec.guest_network.as_ref().map(|n| NetConfig {
            interface: "eth0".into(),
            address: n.address,
            prefix_len: n.prefix_len,
            gateway: n.gateway,
            resolv_conf: n.resolv_conf.clone(),
        }),
    })
}

/// The oci-spec image config type, named once.
pub mod oci_config {
    pub use oci_spec::image::Config;
}

/// Guest size from the workload's limits: memory as given (at least
/// [`MIN_MEM_MIB`]), one vCPU per started CPU of quota.
pub fn vm_size(spec: &WorkloadSpec) -> (u64, u8) {
    let mem = spec
        .resources
        .memory_bytes
        .map_or(DEFAULT_MEM_MIB, |b| (b >> 20).max(MIN_MEM_MIB));
    let vcpus = spec
        .resources
        .cpu
        .map_or(1, |c| c.millicores().div_ceil(1000).clamp(1, 64) as u8);
    (mem, vcpus)
}

/// The virtio-net device behind the workload's guest network, if any; its
/// MAC is the one the guest derives from its address.
fn net_devices(spec: &WorkloadSpec) -> Vec<NetDeviceConfig> {
    spec.guest_network
        .iter()
        .map(|n| NetDeviceConfig {
            tap: n.tap.clone(),
            mac: evoke_guest::net::mac_for(n.address),
        })
        .collect()
}

/// The tap must exist before the VM starts: the VMM opens it by name, and
/// an error here is clearer than a VM that ends at once.
fn check_guest_network(spec: &WorkloadSpec) -> Result<(), RuntimeError> {
    match &spec.guest_network {
        Some(n) if nix::net::if_::if_nametoindex(n.tap.as_str()).is_err() => {
            Err(RuntimeError::InvalidSpec(format!(
                "tap {} for workload {} does not exist in this network namespace",
                n.tap, spec.id
            )))
        }
        _ => Ok(()),
    }
}

/// Modules for the guest to load: virtio_net (and what it depends on) only
/// when the VM has a network, as loading it costs boot time.
fn guest_modules(spec: &WorkloadSpec) -> &'static [&'static str] {
    if spec.guest_network.is_some() {
        NET_MODULES
    } else {
        DEFAULT_MODULES
    }
}

/// [`DEFAULT_MODULES`] plus virtio_net.
const NET_MODULES: &[&str] = &["virtio_mmio", "virtio_console", "virtio_net"];

fn modules_dir_for(kernel: &Path) -> PathBuf {
    let name = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let version = name
        .strip_prefix("vmlinuz-")
        .or_else(|| name.strip_prefix("vmlinux-"))
        .unwrap_or(name);
    PathBuf::from("/lib/modules").join(version)
}

impl WorkloadRuntime for MicroVmTier {
    fn name(&self) -> &str {
        TIER
    }

    fn start_waits_for_guest(&self) -> bool {
        true
    }

    fn available(&self) -> Result<(), RuntimeError> {
        let unavailable = |reason: String| RuntimeError::Unavailable {
            tier: TIER.into(),
            reason,
        };
        crate::kvm_check::check_linux_guest_support().map_err(|e| unavailable(e.to_string()))?;
        self.kernel().map_err(|e| unavailable(e.to_string()))?;
        find_agent().map_err(|e| unavailable(e.to_string()))?;
        Ok(())
    }

    fn create(&self, spec: &WorkloadSpec, stdio: Stdio) -> Result<WorkloadStatus, RuntimeError> {
        validate_id(&spec.id)?;
        let dir = self.dir(&spec.id);
        if dir.exists() {
            return Err(RuntimeError::AlreadyExists(spec.id.clone()));
        }
        let image_ref = spec
            .image
            .as_deref()
            .ok_or_else(|| RuntimeError::InvalidSpec("the microvm tier needs an image".into()))?;
        check_guest_network(spec)?;
        let store = ImageStore::open(&self.data_dir)?;
        let image = store.resolve(image_ref)?;
        let gspec = guest_spec(spec, image.config.config().as_ref())?;
        let kernel = self.kernel()?;
        let agent = find_agent().map_err(tier_err)?;
        let modules_dir = modules_dir_for(&kernel);

        fs::create_dir_all(&dir).map_err(|e| RuntimeError::io(dir.display().to_string(), e))?;
        let result = (|| {
            let builder = InitramfsBuilder::new(self.root.join(".cache"));
            let base = GuestBase {
                agent: &agent,
                modules_dir: &modules_dir,
                modules: guest_modules(spec),
            };
            let initramfs = builder
                .build(
                    &base,
                    &Rootfs::Layers(image.layer_dirs.clone()),
                    Some(&image.id),
                    &gspec,
                )
                .map_err(tier_err)?;
            let mut parts = Vec::new();
            for (i, part) in initramfs.parts.into_iter().enumerate() {
                match part {
                    Part::File(p) => parts.push(p),
                    Part::Bytes(b) => {
                        let p = dir.join(format!("initrd-{i}.cpio"));
                        fs::write(&p, b)
                            .map_err(|e| RuntimeError::io(p.display().to_string(), e))?;
                        parts.push(p);
                    }
                }
            }
            let (mem_mib, vcpus) = vm_size(spec);
            // Boot the uncompressed kernel through PVH when it can be had:
            // the guest then skips decompressing itself.
            let boot_kernel = match crate::vmlinux::cached(&kernel, &self.root.join(".cache")) {
                Ok(v) => v,
                Err(e) => {
                    tracing::info!(error = %e, "booting the bzimage instead of a pvh vmlinux");
                    kernel.clone()
                }
            };
            let cfg = ProcessConfig {
                vm: VmConfig {
                    mem_mib,
                    vcpus,
                    payload: Payload::Linux {
                        kernel: boot_kernel,
                        initrd: parts,
                        cmdline: GUEST_CMDLINE.into(),
                        protocol: Default::default(),
                    },
                    agent_device: AgentDevice::VirtioConsole,
                    seccomp: true,
                    net: net_devices(spec),
                },
                cgroup: Some(cgroup::spec_for(
                    &format!("evoke-{}", spec.id),
                    mem_mib << 20,
                    vcpus,
                )),
                console_cap: 4 << 20,
                // `evoke stop`/`kill` from any process signal the VMM,
                // which hands the signal to the workload in the guest.
                forward_signals: true,
                exec_socket: Some(dir.join(EXEC_SOCKET)),
            };
            let cfg_path = dir.join("vmm.json");
            let bytes = serde_json::to_vec_pretty(&cfg).map_err(tier_err)?;
            fs::write(&cfg_path, bytes)
                .map_err(|e| RuntimeError::io(cfg_path.display().to_string(), e))?;
            let status = WorkloadStatus {
                id: spec.id.clone(),
                image: Some(image_ref.to_string()),
                state: WorkloadState::Created,
                created_at: SystemTime::now(),
                started_at: None,
                labels: spec.labels.clone(),
                log_path: Some(
                    spec.log_path
                        .clone()
                        .unwrap_or_else(|| dir.join("output.log")),
                ),
            };
            self.write_record(&Record {
                spec: spec.clone(),
                status: status.clone(),
                booting_pid: None,
            })?;
            Ok(status)
        })();
        match result {
            Ok(status) => {
                lock(&self.pending).insert(spec.id.clone(), stdio);
                Ok(status)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let mut rec = self.read_record(id)?;
        if rec.status.state != WorkloadState::Created || rec.booting_pid.is_some() {
            return Err(RuntimeError::InvalidState {
                id: id.into(),
                state: match rec.booting_pid {
                    Some(_) => "booting",
                    None => rec.status.state.word(),
                },
                action: "start",
            });
        }
        let stdio = lock(&self.pending).remove(id).unwrap_or_default();
        let dir = self.dir(id);
        let out: Box<dyn Write + Send> = match stdio.stdout {
            Some(fd) => Box::new(File::from(fd)),
            None => Box::new(open_log(&dir, &rec.spec)?),
        };
        let err: Box<dyn Write + Send> = match stdio.stderr {
            Some(fd) => Box::new(File::from(fd)),
            None => Box::new(open_log(&dir, &rec.spec)?),
        };
        let console_path = dir.join("console.log");
        let console = File::create(&console_path)
            .map_err(|e| RuntimeError::io(console_path.display().to_string(), e))?;
        let mut child = self
            .vmm_command()
            .arg("--config")
            .arg(dir.join("vmm.json"))
            .stdin(ProcStdio::piped())
            .stdout(ProcStdio::piped())
            .stderr(ProcStdio::from(console))
            .spawn()
            .map_err(|e| RuntimeError::io(format!("starting {}", self.vmm_exe.display()), e))?;
        let pid = child.id();
        let agent_out = child.stdout.take();
        let stdin = Arc::new(Mutex::new(child.stdin.take()));
        // Created until the guest says the workload runs; the pid lets a
        // forced remove end a VM that is still booting.
        rec.booting_pid = Some(pid);
        self.write_record(&rec)?;
        lock(&self.running).insert(id.to_string(), stdin.clone());
        if let (Some(fd), true) = (stdio.stdin, rec.spec.stdin) {
            let sink = stdin.clone();
            std::thread::Builder::new()
                .name(format!("microvm-in-{id}"))
                .spawn(move || forward_stdin(File::from(fd), &sink))
                .map_err(|e| RuntimeError::io("starting the microvm stdin thread", e))?;
        }
        let (boot_tx, boot_rx) = std::sync::mpsc::channel();
        let sup = Supervisor {
            dir: dir.clone(),
            rec,
            child,
            out,
            err,
            stdin,
            boot: Some(boot_tx),
        };
        std::thread::Builder::new()
            .name(format!("microvm-{id}"))
            .spawn(move || sup.run(agent_out))
            .map_err(|e| RuntimeError::io("starting the microvm supervisor thread", e))?;
        let t = std::time::Instant::now();
        match boot_rx.recv_timeout(self.boot_timeout) {
            Ok(Boot::Started) => {
                tracing::debug!(%id, took_ms = t.elapsed().as_millis() as u64, "microvm workload started in the guest");
                Ok(())
            }
            Ok(Boot::Failed(why)) => Err(tier_err(format!(
                "microvm {id}: the guest did not start the workload: {why}"
            ))),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // End the VM, and let the supervisor record the exit before
                // the caller removes the workload.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = boot_rx.recv_timeout(Duration::from_secs(10));
                let console = fs::read(dir.join("console.log")).unwrap_or_default();
                let console = String::from_utf8_lossy(&console);
                Err(tier_err(format!(
                    "microvm {id}: the guest did not start the workload within {:?} (the VM was killed; {BOOT_TIMEOUT_ENV} sets the limit in seconds); last console lines:\n{}",
                    self.boot_timeout,
                    console_tail(&console)
                )))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(tier_err(format!(
                "microvm {id}: its supervisor ended before the guest reported the workload started"
            ))),
        }
    }

    fn state(&self, id: &str) -> Result<WorkloadStatus, RuntimeError> {
        Ok(self.read_record(id)?.status)
    }

    fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RuntimeError::io(self.root.display().to_string(), e)),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if let Ok(rec) = self.read_record(&name) {
                out.push(rec.status);
            }
        }
        Ok(out)
    }

    fn signal(&self, id: &str, signal: i32) -> Result<(), RuntimeError> {
        let rec = self.read_record(id)?;
        let WorkloadState::Running { pid } = rec.status.state else {
            return Err(RuntimeError::InvalidState {
                id: id.into(),
                state: rec.status.state.word(),
                action: "signal",
            });
        };
        let stdin = lock(&self.running).get(id).cloned();
        let delivered = match (signal, stdin) {
            // SIGKILL cannot be caught by the workload: end the whole VM.
            (libc::SIGKILL, _) | (_, None) => false,
            (sig, Some(stdin)) => match lock(&stdin).as_mut() {
                Some(w) => Frame::Signal(sig).write_to(w).is_ok(),
                None => false,
            },
        };
        if !delivered {
            let sig = nix::sys::signal::Signal::try_from(signal)
                .map_err(|_| RuntimeError::InvalidSpec(format!("bad signal {signal}")))?;
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
                .map_err(|e| RuntimeError::io(format!("signalling vmm {pid}"), e.into()))?;
        }
        Ok(())
    }

    fn exec(&self, id: &str, spec: &ExecSpec, stdio: Stdio) -> Result<i32, RuntimeError> {
        self.exec_in_vm(id, spec, stdio, None)
    }

    fn exec_with_resize(
        &self,
        id: &str,
        spec: &ExecSpec,
        stdio: Stdio,
        sizes: std::sync::mpsc::Receiver<TtySize>,
    ) -> Result<i32, RuntimeError> {
        self.exec_in_vm(id, spec, stdio, Some(sizes))
    }

    fn remove(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let rec = self.read_record(id)?;
        if let WorkloadState::Running { .. } = rec.status.state {
            if !force {
                return Err(RuntimeError::InvalidState {
                    id: id.into(),
                    state: "running",
                    action: "remove",
                });
            }
            self.signal(id, libc::SIGKILL)?;
            self.wait(id, Some(Duration::from_secs(10)))?;
        } else if let (WorkloadState::Created, Some(pid)) = (&rec.status.state, rec.booting_pid) {
            // A guest still booting: end its VMM. When this process
            // supervises it, wait for the supervisor to record the exit, so
            // it writes nothing into the directory removed below.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            if lock(&self.running).contains_key(id) {
                self.wait(id, Some(Duration::from_secs(10)))?;
            }
        }
        lock(&self.running).remove(id);
        lock(&self.pending).remove(id);
        let cg = VmmCgroup::existing(&format!("evoke-{id}"), Path::new("/sys/fs/cgroup"));
        for _ in 0..50 {
            if cg.remove().is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let dir = self.dir(id);
        fs::remove_dir_all(&dir).map_err(|e| RuntimeError::io(dir.display().to_string(), e))
    }
}

impl MicroVmTier {
    /// Runs `spec` in the running VM `id` as an exec session through its
    /// VMM's exec socket: the caller's stdin goes in (when given), output
    /// comes out on the caller's fds, terminal sizes follow `sizes`, and the
    /// command's exit code is returned. A VM that ends first is an error.
    fn exec_in_vm(
        &self,
        id: &str,
        spec: &ExecSpec,
        stdio: Stdio,
        sizes: Option<std::sync::mpsc::Receiver<TtySize>>,
    ) -> Result<i32, RuntimeError> {
        let rec = self.read_record(id)?;
        if !matches!(rec.status.state, WorkloadState::Running { .. }) {
            return Err(RuntimeError::InvalidState {
                id: id.into(),
                state: rec.status.state.word(),
                action: "exec in",
            });
        }
        if spec.command.is_empty() {
            return Err(RuntimeError::InvalidSpec(format!(
                "exec in microvm {id} needs a command"
            )));
        }
        let path = self.dir(id).join(EXEC_SOCKET);
        let conn = agent_mux::connect_exec_socket(&path).map_err(|e| {
            tier_err(format!(
                "microvm {id} takes no exec sessions at {}: {e} (has its VM ended?)",
                path.display()
            ))
        })?;
        // The first size: what the caller sent already, or, for `evoke exec
        // -t` (no size messages), the size of the terminal it writes to.
        let first = sizes.as_ref().and_then(|s| s.try_recv().ok()).or_else(|| {
            let out = stdio.stdout.as_ref().filter(|_| spec.tty)?;
            agent_mux::terminal_size(out.as_fd()).map(|(cols, rows)| TtySize { cols, rows })
        });
        let request = ExecRequest {
            argv: spec.command.clone(),
            env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            workdir: spec.workdir.clone(),
            user: spec.user.map(|u| (u.uid, u.gid)),
            tty: spec.tty,
            stdin: stdio.stdin.is_some(),
            cols: first.map_or(0, |s| s.cols),
            rows: first.map_or(0, |s| s.rows),
        };
        let sock_err =
            |e: std::io::Error| RuntimeError::io(format!("exec socket {}", path.display()), e);
        let writer = Arc::new(Mutex::new(conn.try_clone().map_err(sock_err)?));
        send_exec_frame(
            &writer,
            &Frame::ExecStart {
                session: 0,
                request,
            },
        )
        .map_err(|e| tier_err(format!("exec in microvm {id}: {e}")))?;
        if let Some(fd) = stdio.stdin {
            let w = writer.clone();
            std::thread::Builder::new()
                .name(format!("vm-exec-in-{}", short(id)))
                .spawn(move || exec_stdin(File::from(fd), &w))
                .map_err(|e| RuntimeError::io("starting the exec stdin thread", e))?;
        }
        if let Some(sizes) = sizes {
            let w = writer.clone();
            std::thread::Builder::new()
                .name(format!("vm-exec-tty-{}", short(id)))
                .spawn(move || {
                    for s in sizes {
                        let f = Frame::ExecResize {
                            session: 0,
                            cols: s.cols,
                            rows: s.rows,
                        };
                        if send_exec_frame(&w, &f).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| RuntimeError::io("starting the exec resize thread", e))?;
        }
        // A deadline (an exec probe's timeoutSeconds): past it the command
        // is killed in the guest and the answer is a TimedOut error, as in
        // the container tier.
        let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        if let Some(t) = spec.timeout {
            let (w, flag) = (writer.clone(), timed_out.clone());
            std::thread::Builder::new()
                .name(format!("vm-exec-timer-{}", short(id)))
                .spawn(move || {
                    if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(t)
                    {
                        flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        let kill = Frame::ExecSignal {
                            session: 0,
                            signal: libc::SIGKILL,
                        };
                        let _ = send_exec_frame(&w, &kill);
                    }
                })
                .map_err(|e| RuntimeError::io("starting the exec timer thread", e))?;
        }
        let mut out: Option<File> = stdio.stdout.map(File::from);
        let mut err: Option<File> = stdio.stderr.map(File::from);
        let result = read_exec_frames(&conn, &mut out, &mut err);
        drop(done_tx);
        // The stdin and resize threads see their next write fail.
        let _ = conn.shutdown(std::net::Shutdown::Both);
        if timed_out.load(std::sync::atomic::Ordering::SeqCst) {
            let t = spec.timeout.unwrap_or_default();
            return Err(RuntimeError::io(
                format!("exec {:?} in microvm {id}", spec.command[0]),
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("still running after {t:?}: killed"),
                ),
            ));
        }
        match result {
            Ok(code) => Ok(code),
            Err(why) => Err(tier_err(format!("exec in microvm {id}: {why}"))),
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn send_exec_frame(w: &Mutex<UnixStream>, f: &Frame) -> Result<(), evoke_guest::ProtoError> {
    f.write_to(&mut *lock(w))
}

/// The caller's stdin as [`Frame::ExecStdin`] frames, an empty one at its
/// end. The VMM reads the socket only while the session's window has room,
/// so a command that does not read blocks this thread, not the VM.
fn exec_stdin(mut input: File, w: &Mutex<UnixStream>) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let f = Frame::ExecStdin {
            session: 0,
            data: buf[..n].to_vec(),
        };
        if send_exec_frame(w, &f).is_err() || n == 0 {
            return;
        }
    }
}

/// Copies a session's output to the caller's fds until its exit frame;
/// returns the exit code, or why there is none.
fn read_exec_frames(
    conn: &UnixStream,
    out: &mut Option<File>,
    err: &mut Option<File>,
) -> Result<i32, String> {
    let mut reader = std::io::BufReader::new(conn);
    let mut error: Option<String> = None;
    loop {
        match Frame::read_from(&mut reader) {
            Ok(Some(Frame::ExecStdout { data, .. })) => {
                if let Some(o) = out.as_mut() {
                    let _ = o.write_all(&data);
                }
            }
            Ok(Some(Frame::ExecStderr { data, .. })) => {
                // On a terminal stderr has no stream of its own.
                if let Some(e) = err.as_mut().or(out.as_mut()) {
                    let _ = e.write_all(&data);
                }
            }
            Ok(Some(Frame::ExecError { message, .. })) => error = Some(message),
            Ok(Some(Frame::ExecExit { status, .. })) => {
                // A command that could not start: said on its stderr, as
                // `docker exec` does, with its exit code (126/127).
                if let (Some(m), Some(e)) = (&error, err.as_mut().or(out.as_mut())) {
                    let _ = writeln!(e, "evoke: microvm: {m}");
                }
                return Ok(status.code);
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(error
                    .unwrap_or_else(|| "the VMM closed the session without an exit status".into()))
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Sends the caller's stdin to the workload as [`Frame::Stdin`] frames, and
/// an empty one at its end. Ends early when the VM is gone (the supervisor
/// has dropped the VMM's stdin, or writing to it fails).
fn forward_stdin(mut input: File, sink: &Mutex<Option<ChildStdin>>) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let mut guard = lock(sink);
        let Some(w) = guard.as_mut() else { return };
        if Frame::Stdin(buf[..n].to_vec()).write_to(w).is_err() || n == 0 {
            return;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn open_log(dir: &Path, spec: &WorkloadSpec) -> Result<File, RuntimeError> {
    let path = spec
        .log_path
        .clone()
        .unwrap_or_else(|| dir.join("output.log"));
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| RuntimeError::io(path.display().to_string(), e))
}

/// What the supervisor tells a `start` waiting for the guest.
#[derive(Debug)]
enum Boot {
    /// The workload runs; the record says Running.
    Started,
    /// The VM ended (the record says Exited) before the workload ran; why.
    Failed(String),
}

/// How far the guest's clock is ahead of this host's (negative: behind),
/// from the guest's time of the start and the report's arrival; `None`
/// when the guest's clock is unset.
fn guest_clock_skew(unix_nanos: u64, arrived: SystemTime) -> Option<f64> {
    let guest = UNIX_EPOCH + Duration::from_nanos(unix_nanos);
    (unix_nanos != 0).then(|| match guest.duration_since(arrived) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(behind) => -behind.duration().as_secs_f64(),
    })
}

/// Owns a running VM's process and its streams until the VM ends.
struct Supervisor {
    dir: PathBuf,
    rec: Record,
    child: Child,
    out: Box<dyn Write + Send>,
    err: Box<dyn Write + Send>,
    stdin: Arc<Mutex<Option<ChildStdin>>>,
    /// A `start` waiting for [`Frame::Started`]; `None` once told, or when
    /// nobody waits (the workload then counts as started already).
    boot: Option<std::sync::mpsc::Sender<Boot>>,
}

impl Supervisor {
    /// The guest reports the workload running: record it, then release
    /// the waiting `start`. The start time is the report's arrival, on this
    /// host's clock, as Kata's shim stamps a container started when the
    /// agent answers: a guest's clock can be seconds off (nested under TCG
    /// it was 2-3 s behind), and the channel adds only its latency.
    fn started(&mut self, unix_nanos: u64) {
        let Some(tx) = self.boot.take() else { return };
        let at = SystemTime::now();
        if let Some(skew) = guest_clock_skew(unix_nanos, at) {
            tracing::debug!(id = %self.rec.status.id, skew_secs = skew, "guest clock against the host's at the workload's start");
        }
        self.rec.status.state = WorkloadState::Running {
            pid: self.child.id(),
        };
        self.rec.status.started_at = Some(at);
        self.rec.booting_pid = None;
        if let Err(e) = write_record_at(&self.dir, &self.rec) {
            tracing::error!(error = %e, "cannot record microvm start");
        }
        let _ = tx.send(Boot::Started);
    }

    fn run(mut self, agent_out: Option<impl Read>) {
        let mut exit: Option<ExitInfo> = None;
        // Why the agent could not start the workload, while `start` waits.
        let mut start_error: Option<String> = None;
        if let Some(mut r) = agent_out {
            loop {
                match Frame::read_from(&mut r) {
                    Ok(Some(Frame::Started { unix_nanos })) => self.started(unix_nanos),
                    Ok(Some(Frame::Error(msg))) if self.boot.is_some() => {
                        exit.get_or_insert(ExitInfo::exited(127));
                        start_error = Some(msg);
                    }
                    Ok(Some(Frame::Stdout(b))) => {
                        let _ = self.out.write_all(&b).and_then(|_| self.out.flush());
                    }
                    Ok(Some(Frame::Stderr(b))) => {
                        let _ = self.err.write_all(&b).and_then(|_| self.err.flush());
                    }
                    Ok(Some(Frame::Exit(s))) => {
                        exit = Some(ExitInfo {
                            code: s.code,
                            signal: (s.signal != 0).then_some(s.signal),
                            oom_killed: s.oom_killed,
                            finished_at: SystemTime::now(),
                        });
                    }
                    Ok(Some(Frame::Error(msg))) => {
                        let _ = writeln!(self.err, "evoke: microvm: {msg}");
                        exit.get_or_insert(ExitInfo::exited(127));
                    }
                    // Ready, and frames for exec sessions (the VMM routes
                    // those to their callers).
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "agent channel broke");
                        break;
                    }
                }
            }
        }
        // Closing stdin lets the VMM's input thread finish.
        lock(&self.stdin).take();
        let status = self.child.wait();
        let info = match exit {
            Some(i) => i,
            None => {
                use std::os::unix::process::ExitStatusExt;
                let console = fs::read(self.dir.join("console.log")).unwrap_or_default();
                let console = String::from_utf8_lossy(&console);
                let tail = console_tail(&console);
                let (info, why) = match status.as_ref().ok().and_then(|s| s.signal()) {
                    Some(sig) => (
                        ExitInfo::signaled(sig, false),
                        format!("the vmm was killed by signal {sig}"),
                    ),
                    None => {
                        let why = match kernel_panic(&console) {
                            Some(line) => format!("the guest kernel panicked: {line}"),
                            None => "kernel panic or crash?".to_string(),
                        };
                        (
                            ExitInfo::exited(1),
                            format!("the guest ended without reporting an exit status ({why}); last console lines:\n{tail}"),
                        )
                    }
                };
                // A waiting `start` reports it; once started, the
                // workload's stderr does.
                match self.boot.is_some() {
                    true => start_error = Some(why),
                    false => {
                        let _ = writeln!(self.err, "evoke: microvm: {why}");
                    }
                }
                info
            }
        };
        self.rec.status.state = WorkloadState::Exited(info);
        self.rec.booting_pid = None;
        if let Err(e) = write_record_at(&self.dir, &self.rec) {
            tracing::error!(error = %e, "cannot record microvm exit");
        }
        if let Some(tx) = self.boot.take() {
            let why = start_error
                .unwrap_or_else(|| "the guest reported an exit before the workload started".into());
            let _ = tx.send(Boot::Failed(why));
        }
    }
}

fn console_tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The guest kernel's last panic line (`Kernel panic - not syncing: ...`),
/// without the console timestamp. The panic's stack trace follows it, so it
/// is often not among the last console lines.
fn kernel_panic(console: &str) -> Option<&str> {
    console.lines().rev().find_map(|l| {
        l.find("Kernel panic - not syncing")
            .map(|i| l[i..].trim_end())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use evoke_runtime::{CpuLimit, Resources, User};

    fn image_config(json: &str) -> oci_config::Config {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn image_entrypoint_cmd_env_and_workdir_become_the_guest_spec() {
        let cfg = image_config(
            r#"{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"Env":["PATH=/bin","A=1"],"WorkingDir":"/srv","User":"5:6"}"#,
        );
        let spec = WorkloadSpec {
            id: "vm1".into(),
            env: vec![("A".into(), "2".into()), ("B".into(), "3".into())],
            ..Default::default()
        };
        let g = guest_spec(&spec, Some(&cfg)).unwrap();
        assert_eq!(g.argv, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(g.env, ["PATH=/bin", "A=2", "B=3"]);
        assert_eq!(g.workdir, "/srv");
        assert_eq!((g.uid, g.gid), (5, 6));
        assert_eq!(g.channel, Channel::VirtioConsole);
    }

    #[test]
    fn a_command_override_drops_the_image_cmd_and_args_replace_it() {
        let cfg = image_config(r#"{"Entrypoint":["/e"],"Cmd":["c"]}"#);
        let mut spec = WorkloadSpec {
            id: "vm2".into(),
            command: Some(vec!["/bin/true".into()]),
            user: Some(User { uid: 1, gid: 2 }),
            workdir: Some("/tmp".into()),
            ..Default::default()
        };
        let g = guest_spec(&spec, Some(&cfg)).unwrap();
        assert_eq!(g.argv, ["/bin/true"]);
        assert_eq!((g.uid, g.gid, g.workdir.as_str()), (1, 2, "/tmp"));
        spec.command = None;
        spec.args = Some(vec!["x".into()]);
        assert_eq!(guest_spec(&spec, Some(&cfg)).unwrap().argv, ["/e", "x"]);
        let empty = WorkloadSpec {
            id: "vm3".into(),
            ..Default::default()
        };
        assert!(guest_spec(&empty, None).is_err());
    }

    #[test]
    fn memory_and_cpus_size_the_vm() {
        let mut spec = WorkloadSpec::default();
        assert_eq!(vm_size(&spec), (DEFAULT_MEM_MIB, 1));
        spec.resources = Resources {
            memory_bytes: Some(256 << 20),
            cpu: Some(CpuLimit::from_cpus(1.5).unwrap()),
            pids_limit: None,
        };
        assert_eq!(vm_size(&spec), (256, 2));
        spec.resources.memory_bytes = Some(1 << 20);
        assert_eq!(vm_size(&spec).0, MIN_MEM_MIB);
    }

    #[test]
    fn a_missing_image_is_the_shared_image_not_found_error() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz-test");
        fs::write(&kernel, b"not a kernel").unwrap();
        let tier = MicroVmTier::new(dir.path(), PathBuf::from("/bin/false")).with_kernel(kernel);
        let spec = WorkloadSpec {
            id: "vm4".into(),
            image: Some("no-such-image:latest".into()),
            ..Default::default()
        };
        let err = tier.create(&spec, Stdio::default()).unwrap_err();
        assert!(matches!(err, RuntimeError::ImageNotFound(_)), "{err}");
        assert!(!dir.path().join("microvm/vm4").exists());
        assert!(matches!(tier.state("vm4"), Err(RuntimeError::NotFound(_))));
    }

    #[test]
    fn a_missing_kernel_names_the_setup_command() {
        let dir = tempfile::tempdir().unwrap();
        let tier = MicroVmTier::new(dir.path(), PathBuf::from("/bin/false"))
            .with_kernel(dir.path().join("vmlinuz-gone"));
        let err = tier.kernel().unwrap_err().to_string();
        assert!(err.contains("scripts/setup"), "{err}");
    }

    #[test]
    fn a_guest_network_adds_virtio_net_and_a_nic_whose_mac_follows_the_address() {
        let mut spec = WorkloadSpec {
            id: "vmnet".into(),
            ..Default::default()
        };
        assert_eq!(guest_modules(&spec), DEFAULT_MODULES);
        assert!(net_devices(&spec).is_empty());
        spec.guest_network = Some("lo,10.42.0.9/24,10.42.0.1".parse().unwrap());
        assert!(guest_modules(&spec).starts_with(DEFAULT_MODULES));
        assert!(guest_modules(&spec).contains(&"virtio_net"));
        let nics = net_devices(&spec);
        assert_eq!(nics.len(), 1);
        assert_eq!(nics[0].tap, "lo");
        assert_eq!(nics[0].mac, [0x02, 0x65, 10, 42, 0, 9]);
        let g = guest_spec(
            &WorkloadSpec {
                command: Some(vec!["true".into()]),
                ..spec.clone()
            },
            None,
        )
        .unwrap();
        let net = g.network.unwrap();
        assert_eq!((net.interface.as_str(), net.prefix_len), ("eth0", 24));
        // "lo" exists everywhere; a missing tap is refused before any work.
        assert!(check_guest_network(&spec).is_ok());
        spec.guest_network = Some("evk-gone0,10.42.0.9/24".parse().unwrap());
        let err = check_guest_network(&spec).unwrap_err().to_string();
        assert!(err.contains("evk-gone0"), "{err}");
    }

    #[test]
    fn modules_come_from_the_kernel_version_in_its_file_name() {
        assert_eq!(
            modules_dir_for(Path::new("/boot/vmlinuz-6.1.0-56-cloud-amd64")),
            PathBuf::from("/lib/modules/6.1.0-56-cloud-amd64")
        );
    }

    /// Runs a supervisor over `sh -c SCRIPT` as the "VMM", with `frames`
    /// available to the script as the file $1, telling `boot` about the
    /// start; returns stdout, stderr, the recorded exit and start time.
    fn supervise_with(
        frames: &[Frame],
        script: &str,
        boot: Option<std::sync::mpsc::Sender<Boot>>,
    ) -> (Vec<u8>, Vec<u8>, ExitInfo, Option<SystemTime>) {
        use crate::devices::sink::TailBuffer;
        let dir = tempfile::tempdir().unwrap();
        let wire = dir.path().join("frames");
        let mut bytes = Vec::new();
        for f in frames {
            f.write_to(&mut bytes).unwrap();
        }
        fs::write(&wire, bytes).unwrap();
        fs::write(
            dir.path().join("console.log"),
            b"line 1\n[    2.5] Kernel panic - not syncing: sysrq triggered crash\n",
        )
        .unwrap();
        let mut child = Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(&wire)
            .stdin(ProcStdio::piped())
            .stdout(ProcStdio::piped())
            .spawn()
            .unwrap();
        let agent_out = child.stdout.take();
        let (out, err) = (TailBuffer::new(1 << 16), TailBuffer::new(1 << 16));
        let spec = WorkloadSpec {
            id: "sup".into(),
            ..Default::default()
        };
        let rec = Record {
            status: WorkloadStatus {
                id: "sup".into(),
                image: None,
                state: WorkloadState::Running { pid: child.id() },
                created_at: SystemTime::now(),
                started_at: None,
                labels: Default::default(),
                log_path: None,
            },
            spec,
            booting_pid: None,
        };
        let sup = Supervisor {
            dir: dir.path().to_path_buf(),
            rec,
            stdin: Arc::new(Mutex::new(child.stdin.take())),
            child,
            out: Box::new(out.clone()),
            err: Box::new(err.clone()),
            boot,
        };
        sup.run(agent_out);
        let text = fs::read(dir.path().join("state.json")).unwrap();
        let rec: Record = serde_json::from_slice(&text).unwrap();
        let WorkloadState::Exited(info) = rec.status.state else {
            panic!("not exited: {:?}", rec.status.state)
        };
        (out.contents(), err.contents(), info, rec.status.started_at)
    }

    /// [`supervise_with`] with nobody waiting for the start.
    fn supervise(frames: &[Frame], script: &str) -> (Vec<u8>, Vec<u8>, ExitInfo) {
        let (out, err, info, _) = supervise_with(frames, script, None);
        (out, err, info)
    }

    #[test]
    fn agent_frames_become_the_workloads_output_and_exit_status() {
        let frames = [
            Frame::Ready,
            Frame::Stdout(b"out\n".to_vec()),
            Frame::Stderr(b"err\n".to_vec()),
            Frame::Exit(evoke_guest::proto::ExitStatus {
                code: 42,
                signal: 0,
                oom_killed: false,
            }),
        ];
        let (out, err, info) = supervise(&frames, "cat \"$1\"");
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
        assert_eq!((info.code, info.signal), (42, None));
    }

    #[test]
    fn a_guest_that_ends_without_an_exit_frame_fails_with_the_console_tail() {
        let (out, err, info) = supervise(&[Frame::Stdout(b"going down\n".to_vec())], "cat \"$1\"");
        assert_eq!(out, b"going down\n");
        let err = String::from_utf8_lossy(&err);
        assert!(err.contains("without reporting an exit status"), "{err}");
        assert!(
            err.contains(
                "the guest kernel panicked: Kernel panic - not syncing: sysrq triggered crash"
            ),
            "{err}"
        );
        assert!(err.contains("Kernel panic"), "{err}");
        assert_eq!(info.code, 1);
    }

    #[test]
    fn the_panic_line_is_found_even_when_a_long_stack_trace_follows_it() {
        let mut console = String::from("boot\n[    3.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n");
        for i in 0..40 {
            console.push_str(&format!("[    3.1]  trace line {i}\n"));
        }
        assert_eq!(
            kernel_panic(&console),
            Some("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100")
        );
        assert!(!console_tail(&console).contains("Kernel panic"));
        assert_eq!(kernel_panic("just a log\n"), None);
    }

    #[test]
    fn the_callers_stdin_reaches_the_vmm_as_stdin_frames_ending_with_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        fs::write(&input, b"line one\nline two\n").unwrap();
        let mut vmm = Command::new("cat")
            .stdin(ProcStdio::piped())
            .stdout(ProcStdio::piped())
            .spawn()
            .unwrap();
        let sink = Mutex::new(vmm.stdin.take());
        forward_stdin(File::open(&input).unwrap(), &sink);
        sink.lock().unwrap().take();
        let out = vmm.wait_with_output().unwrap().stdout;
        let mut r = out.as_slice();
        let mut got = Vec::new();
        while let Some(f) = Frame::read_from(&mut r).unwrap() {
            got.push(f);
        }
        assert_eq!(
            got,
            [
                Frame::Stdin(b"line one\nline two\n".to_vec()),
                Frame::Stdin(Vec::new())
            ]
        );
    }

    #[test]
    fn a_killed_vmm_ends_the_workload_with_128_plus_the_signal() {
        let (_out, err, info) = supervise(&[], "kill -9 $$");
        assert_eq!((info.code, info.signal), (137, Some(9)));
        assert!(String::from_utf8_lossy(&err).contains("killed by signal 9"));
    }

    #[test]
    fn an_agent_error_frame_is_reported_as_exit_127() {
        let (_out, err, info) =
            supervise(&[Frame::Error("no such file: /bin/x".into())], "cat \"$1\"");
        assert_eq!(info.code, 127);
        assert!(String::from_utf8_lossy(&err).contains("no such file: /bin/x"));
    }

    /// A tier with one workload record in `state`, in a temp dir.
    fn tier_with(state: WorkloadState) -> (tempfile::TempDir, MicroVmTier, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let tier = MicroVmTier::new(dir.path(), PathBuf::from("/bin/false"));
        let vm_dir = tier.dir("vmx");
        fs::create_dir_all(&vm_dir).unwrap();
        let rec = Record {
            spec: WorkloadSpec {
                id: "vmx".into(),
                ..Default::default()
            },
            status: WorkloadStatus {
                id: "vmx".into(),
                image: None,
                state,
                created_at: SystemTime::now(),
                started_at: None,
                labels: Default::default(),
                log_path: None,
            },
            booting_pid: None,
        };
        write_record_at(&vm_dir, &rec).unwrap();
        (dir, tier, vm_dir)
    }

    fn exec_of(argv: &[&str]) -> ExecSpec {
        ExecSpec {
            command: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn exec_into_a_microvm_that_is_not_running_is_refused_with_its_state() {
        let (_d, tier, _) = tier_with(WorkloadState::Exited(ExitInfo::exited(0)));
        let err = tier
            .exec("vmx", &exec_of(&["true"]), Stdio::default())
            .unwrap_err();
        assert!(matches!(err, RuntimeError::InvalidState { .. }), "{err}");
    }

    #[test]
    fn exec_into_a_running_record_whose_vmm_is_gone_names_the_socket() {
        let (_d, tier, _) = tier_with(WorkloadState::Running { pid: 1 });
        let err = tier
            .exec("vmx", &exec_of(&["true"]), Stdio::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(EXEC_SOCKET), "{err}");
        assert!(err.contains("has its VM ended"), "{err}");
    }

    /// A running microVM's exec side without a VM: the VMM's agent mux on
    /// the exec socket in `vm_dir`, and both ends of the agent channel for
    /// a fake guest.
    struct FakeVm {
        guest_in: File,
        guest_out: crate::agent_mux::GuestOutput<File>,
        mux_thread: std::thread::JoinHandle<()>,
        _host_w: File,
        _main_r: File,
    }

    fn fake_vm(vm_dir: &Path) -> FakeVm {
        use crate::agent_mux::{bind_exec_socket, GuestOutput, Mailbox, Mux};
        use std::sync::atomic::AtomicBool;
        let pipe = || {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
            (File::from(r), File::from(w))
        };
        let (host_r, host_w) = pipe();
        let (guest_in, to_guest) = pipe();
        let (main_r, main_w) = pipe();
        let spoke = Arc::new(AtomicBool::new(true));
        let mailbox = Mailbox::new().unwrap();
        let sigfd = nix::sys::signalfd::SignalFd::with_flags(
            &nix::sys::signal::SigSet::empty(),
            nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
        )
        .unwrap();
        let mux = Mux {
            input: host_r,
            sigfd,
            out: to_guest,
            spoke: spoke.clone(),
            mailbox: mailbox.clone(),
            listener: Some(bind_exec_socket(&vm_dir.join(EXEC_SOCKET)).unwrap()),
        };
        FakeVm {
            guest_in,
            guest_out: GuestOutput::new(main_w, mailbox, spoke),
            mux_thread: std::thread::spawn(move || mux.run()),
            _host_w: host_w,
            _main_r: main_r,
        }
    }

    #[test]
    fn exec_runs_through_the_vmms_exec_socket_with_stdin_output_and_the_exit_code() {
        let (_d, tier, vm_dir) = tier_with(WorkloadState::Running { pid: 1 });
        let FakeVm {
            mut guest_in,
            mut guest_out,
            mux_thread,
            _host_w,
            _main_r,
        } = fake_vm(&vm_dir);
        // The guest: echoes the command line, then its stdin on stderr,
        // and exits 5 at the end of stdin; then the VM ends.
        let guest = std::thread::spawn(move || loop {
            let reply = match Frame::read_from(&mut guest_in).unwrap() {
                Some(Frame::ExecStart { session, request }) => vec![Frame::ExecStdout {
                    session,
                    data: format!("ran {}\n", request.argv.join(" ")).into_bytes(),
                }],
                Some(Frame::ExecStdin { session, data }) if data.is_empty() => {
                    vec![Frame::ExecExit {
                        session,
                        status: evoke_guest::proto::ExitStatus {
                            code: 5,
                            signal: 0,
                            oom_killed: false,
                        },
                    }]
                }
                Some(Frame::ExecStdin { session, data }) => vec![
                    Frame::StdinAck {
                        session,
                        bytes: data.len() as u32,
                    },
                    Frame::ExecStderr { session, data },
                ],
                Some(_) => vec![],
                None => panic!("the mux closed the guest's input"),
            };
            let done = matches!(reply.last(), Some(Frame::ExecExit { .. }));
            for f in reply {
                f.write_to(&mut guest_out).unwrap();
            }
            if done {
                return guest_in;
            }
        });
        let files = tempfile::tempdir().unwrap();
        let input = files.path().join("in");
        fs::write(&input, b"typed").unwrap();
        let (out_path, err_path) = (files.path().join("out"), files.path().join("err"));
        let stdio = Stdio {
            stdin: Some(File::open(&input).unwrap().into()),
            stdout: Some(File::create(&out_path).unwrap().into()),
            stderr: Some(File::create(&err_path).unwrap().into()),
        };
        let code = tier
            .exec("vmx", &exec_of(&["sh", "-c", "x"]), stdio)
            .unwrap();
        assert_eq!(code, 5);
        assert_eq!(fs::read(&out_path).unwrap(), b"ran sh -c x\n");
        assert_eq!(fs::read(&err_path).unwrap(), b"typed");
        // The VM ends (its input closes): the mux stops.
        drop(guest.join().unwrap_or_else(|_| panic!("fake guest failed")));
        mux_thread.join().unwrap();
    }
    #[test]
    fn an_exec_past_its_timeout_is_killed_in_the_guest_and_reported_as_timed_out() {
        let (_d, tier, vm_dir) = tier_with(WorkloadState::Running { pid: 1 });
        let FakeVm {
            mut guest_in,
            mut guest_out,
            mux_thread,
            _host_w,
            _main_r,
        } = fake_vm(&vm_dir);
        // The guest: the command never ends by itself; it dies of the
        // signal the host sends, which the guest reports as 128 + 9.
        let guest = std::thread::spawn(move || loop {
            match Frame::read_from(&mut guest_in).unwrap() {
                Some(Frame::ExecSignal { session, signal }) => {
                    let exit = Frame::ExecExit {
                        session,
                        status: evoke_guest::proto::ExitStatus {
                            code: 128 + signal,
                            signal,
                            oom_killed: false,
                        },
                    };
                    exit.write_to(&mut guest_out).unwrap();
                    return (guest_in, signal);
                }
                Some(_) => {}
                None => panic!("the mux closed the guest's input"),
            }
        });
        let spec = ExecSpec {
            timeout: Some(Duration::from_millis(300)),
            ..exec_of(&["sleep", "3600"])
        };
        let started = std::time::Instant::now();
        let err = tier.exec("vmx", &spec, Stdio::default()).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the exec outlived its timeout by far"
        );
        let text = err.to_string();
        assert!(text.contains("still running after"), "{text}");
        let (guest_in, signal) = guest.join().unwrap_or_else(|_| panic!("fake guest failed"));
        assert_eq!(signal, libc::SIGKILL);
        drop(guest_in);
        mux_thread.join().unwrap();
    }

    #[test]
    fn the_guests_clock_skew_is_measured_both_ways_and_an_unset_clock_has_none() {
        let arrived = UNIX_EPOCH + Duration::from_secs(1_000);
        let nanos = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        let behind = arrived - Duration::from_millis(2_500);
        assert_eq!(guest_clock_skew(nanos(behind), arrived), Some(-2.5));
        let ahead = arrived + Duration::from_secs(1);
        assert_eq!(guest_clock_skew(nanos(ahead), arrived), Some(1.0));
        assert_eq!(guest_clock_skew(0, arrived), None);
    }

    #[test]
    fn a_waiting_start_is_released_by_the_started_frame_whose_arrival_is_the_start_time() {
        // A guest clock 10 s behind is not taken for the start time.
        let guest_time = SystemTime::now() - Duration::from_secs(10);
        let nanos = guest_time.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        let before = SystemTime::now();
        let frames = [
            Frame::Ready,
            Frame::Started { unix_nanos: nanos },
            Frame::Stdout(b"up\n".to_vec()),
            Frame::Exit(evoke_guest::proto::ExitStatus {
                code: 0,
                signal: 0,
                oom_killed: false,
            }),
        ];
        let (tx, rx) = std::sync::mpsc::channel();
        let (out, _err, info, started) = supervise_with(&frames, "cat \"$1\"", Some(tx));
        assert!(matches!(rx.try_recv(), Ok(Boot::Started)));
        assert_eq!(out, b"up\n");
        assert_eq!(info.code, 0);
        let started = started.expect("a started workload has a start time");
        assert!(
            started >= before && started <= SystemTime::now(),
            "{started:?} is not the frame's arrival"
        );
    }

    #[test]
    fn a_workload_the_guest_cannot_start_fails_the_waiting_start_with_the_agents_message() {
        let frames = [
            Frame::Ready,
            Frame::Error("exec /nope in the image: No such file or directory".into()),
            Frame::Exit(evoke_guest::proto::ExitStatus {
                code: 127,
                signal: 0,
                oom_killed: false,
            }),
        ];
        let (tx, rx) = std::sync::mpsc::channel();
        let (_out, err, info, started) = supervise_with(&frames, "cat \"$1\"", Some(tx));
        match rx.try_recv() {
            Ok(Boot::Failed(why)) => assert!(why.contains("exec /nope in the image"), "{why}"),
            other => panic!("start not failed: {other:?}"),
        }
        assert_eq!(info.code, 127);
        assert_eq!(started, None, "a workload that never ran has no start time");
        // The start error carries the message; it is not said twice.
        assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
    }

    #[test]
    fn a_guest_that_ends_before_starting_the_workload_fails_the_waiting_start_with_the_panic() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (_out, _err, info, _) = supervise_with(&[Frame::Ready], "cat \"$1\"", Some(tx));
        match rx.try_recv() {
            Ok(Boot::Failed(why)) => assert!(why.contains("the guest kernel panicked"), "{why}"),
            other => panic!("start not failed: {other:?}"),
        }
        assert_eq!(info.code, 1);
    }

    /// A tier whose "VMM" is the sh script `body` (it gets the frames file
    /// as $FRAMES), with one Created workload "vmx" and a boot timeout.
    fn tier_with_fake_vmm(
        body: &str,
        frames: &[Frame],
        boot_timeout: Duration,
    ) -> (tempfile::TempDir, MicroVmTier) {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _, vm_dir) = tier_with(WorkloadState::Created);
        let wire = dir.path().join("frames");
        let mut bytes = Vec::new();
        for f in frames {
            f.write_to(&mut bytes).unwrap();
        }
        fs::write(&wire, bytes).unwrap();
        let vmm = dir.path().join("fake-vmm");
        fs::write(
            &vmm,
            format!("#!/bin/sh\nFRAMES={}\n{body}\n", wire.display()),
        )
        .unwrap();
        fs::set_permissions(&vmm, fs::Permissions::from_mode(0o755)).unwrap();
        let tier = MicroVmTier::new(dir.path(), vmm).with_boot_timeout(boot_timeout);
        assert!(vm_dir.exists());
        (dir, tier)
    }

    /// Polls the workload's state until `done` holds, for at most 10 s.
    fn state_until(tier: &MicroVmTier, done: impl Fn(&WorkloadState) -> bool) -> WorkloadState {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = tier.state("vmx").unwrap().state;
            if done(&s) || std::time::Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn start_returns_only_once_the_guest_reports_the_workload_started_and_then_it_is_running() {
        let frames = [Frame::Ready, Frame::Started { unix_nanos: 0 }];
        // The guest "boots" for 300 ms, then reports the start and runs on.
        let (_d, tier) = tier_with_fake_vmm(
            "sleep 0.3; cat \"$FRAMES\"; exec sleep 30",
            &frames,
            Duration::from_secs(30),
        );
        let before = SystemTime::now();
        tier.start("vmx").unwrap();
        let status = tier.state("vmx").unwrap();
        assert!(
            matches!(status.state, WorkloadState::Running { .. }),
            "{:?}",
            status.state
        );
        let started = status.started_at.expect("start time");
        assert!(
            started >= before + Duration::from_millis(300),
            "startedAt {started:?} is before the guest's start"
        );
        tier.remove("vmx", true).unwrap();
    }

    #[test]
    fn a_guest_that_does_not_start_the_workload_within_the_boot_timeout_is_killed_and_start_fails()
    {
        let (_d, tier) =
            tier_with_fake_vmm("exec sleep 60", &[Frame::Ready], Duration::from_millis(300));
        let t = std::time::Instant::now();
        let err = tier.start("vmx").unwrap_err().to_string();
        assert!(
            err.contains("did not start the workload within 300ms"),
            "{err}"
        );
        assert!(err.contains(BOOT_TIMEOUT_ENV), "{err}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
        let state = state_until(&tier, |s| matches!(s, WorkloadState::Exited(_)));
        let WorkloadState::Exited(info) = state else {
            panic!("not exited: {state:?}")
        };
        assert_eq!(info.signal, Some(libc::SIGKILL));
        tier.remove("vmx", false).unwrap();
    }

    #[test]
    fn a_booting_vm_is_not_running_and_a_forced_remove_ends_it() {
        let (_d, tier) =
            tier_with_fake_vmm("exec sleep 60", &[Frame::Ready], Duration::from_secs(30));
        let tier = Arc::new(tier);
        let t = tier.clone();
        let start = std::thread::spawn(move || t.start("vmx"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(pid) = tier.read_record("vmx").unwrap().booting_pid {
                break pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the vmm never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(tier.state("vmx").unwrap().state, WorkloadState::Created);
        let err = tier.exec("vmx", &exec_of(&["true"]), Stdio::default());
        assert!(
            matches!(err, Err(RuntimeError::InvalidState { .. })),
            "{err:?}"
        );
        tier.remove("vmx", true).unwrap();
        let err = start.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("killed by signal 9"), "{err}");
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err(),
            "the booting vmm {pid} is still there"
        );
        assert!(matches!(tier.state("vmx"), Err(RuntimeError::NotFound(_))));
    }
}
