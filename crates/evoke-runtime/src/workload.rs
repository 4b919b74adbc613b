//! The contract every tier implements: [`WorkloadRuntime`].
//!
//! A workload is one main process (plus any processes `exec`ed into it) run
//! from a [`WorkloadSpec`]. The process tier runs it as a plain host process,
//! the container tier in namespaces over an overlayfs rootfs, the microvm tier
//! inside a KVM guest. The node agent and `evoke run` only ever talk to this
//! trait, and pick a tier at run time after asking [`WorkloadRuntime::available`].
//!
//! Lifecycle (see [`WorkloadState`]):
//! `create` → Created → `start` → Running → (process ends) → Exited → `remove`.
//! `signal` is allowed while Running; `remove` needs Exited or Created unless
//! `force` is set, in which case the tier kills the workload first.
//!
//! All methods block; async callers wrap them in `spawn_blocking`.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// What to run. Built by `evoke run` from flags or by the node agent from a
/// pod's container; each tier turns it into its own form (OCI spec, VM config).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Unique id among this tier's workloads (`[A-Za-z0-9_.-]`, see [`validate_id`]).
    pub id: String,
    /// Image reference (`name[:tag]` or an id prefix). Optional for the process tier.
    pub image: Option<String>,
    /// Replaces the image's Entrypoint when set (Kubernetes `command`).
    pub command: Option<Vec<String>>,
    /// Replaces the image's Cmd when set (Kubernetes `args`, `docker run IMAGE ARGS…`).
    pub args: Option<Vec<String>>,
    /// Extra environment, applied over the image's Env (later entries win).
    pub env: Vec<(String, String)>,
    /// Working directory; the image's WorkingDir (or `/`) when unset.
    pub workdir: Option<String>,
    /// Identity of the process; the image's User (or root) when unset.
    pub user: Option<User>,
    /// Give the main process a pseudo-terminal.
    pub tty: bool,
    /// Keep stdin open for the main process.
    pub stdin: bool,
    pub resources: Resources,
    pub mounts: Vec<Mount>,
    /// UTS hostname; tiers default to the id (shortened) when unset.
    pub hostname: Option<String>,
    /// Join this network namespace (e.g. `/var/run/netns/pod-x`) instead of a new one.
    pub network_namespace: Option<PathBuf>,
    /// Join this IPC namespace (pods share one between their containers).
    pub ipc_namespace: Option<PathBuf>,
    /// The microvm tier's network: a tap device the guest's virtio-net is
    /// backed by, and the address the guest configures. Other tiers join
    /// [`WorkloadSpec::network_namespace`] instead and ignore this.
    #[serde(default)]
    pub guest_network: Option<GuestNetwork>,
    /// Where the tier writes the main process's stdout and stderr when no
    /// stdio fds are given to `create`.
    pub log_path: Option<PathBuf>,
    /// Free-form metadata kept with the workload (pod uid, container name…).
    pub labels: BTreeMap<String, String>,
}

/// A VM guest's network interface: the host end is an existing tap device
/// (made by the pod network or by hand), the guest end is `eth0` with this
/// address, a default route through `gateway` and this resolv.conf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// The tap device, in the network namespace the VMM runs in.
    pub tap: String,
    pub address: std::net::Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<std::net::Ipv4Addr>,
    /// The guest's `/etc/resolv.conf`; `None` keeps the image's.
    #[serde(default)]
    pub resolv_conf: Option<String>,
}

impl std::str::FromStr for GuestNetwork {
    type Err = RuntimeError;
    /// Parses `TAP,ADDRESS/PREFIX[,GATEWAY]` (the `evoke run --guest-net` form).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            RuntimeError::InvalidSpec(format!(
                "guest network {s:?} is not TAP,ADDRESS/PREFIX[,GATEWAY]: {why}"
            ))
        };
        let mut parts = s.split(',');
        let tap = parts
            .next()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad("no tap"))?;
        if tap.len() >= 16 || tap.contains('/') {
            return Err(bad("the tap name is not an interface name"));
        }
        let (addr, prefix) = parts
            .next()
            .and_then(|a| a.split_once('/'))
            .ok_or_else(|| bad("no ADDRESS/PREFIX"))?;
        let address = addr.parse().map_err(|_| bad("bad address"))?;
        let prefix_len: u8 = prefix.parse().map_err(|_| bad("bad prefix length"))?;
        if prefix_len > 32 {
            return Err(bad("prefix length over 32"));
        }
        let gateway = match parts.next() {
            Some(g) => Some(g.parse().map_err(|_| bad("bad gateway"))?),
            None => None,
        };
        if parts.next().is_some() {
            return Err(bad("too many fields"));
        }
        Ok(GuestNetwork {
            tap: tap.to_string(),
            address,
            prefix_len,
            gateway,
            resolv_conf: None,
        })
    }
}

/// The uid/gid the process runs as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for User {
    type Err = RuntimeError;
    /// Parses numeric `UID[:GID]`. Without a GID it is 0: Docker takes it from
    /// the image's /etc/passwd and falls back to 0, and we do no lookup here.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || RuntimeError::InvalidSpec(format!("user {s:?} is not UID[:GID]"));
        let (u, g) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let uid = u.parse().map_err(|_| bad())?;
        let gid = match g {
            Some(g) => g.parse().map_err(|_| bad())?,
            None => 0,
        };
        Ok(User { uid, gid })
    }
}

/// Resource limits. `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// Memory limit in bytes (swap is limited to the same amount).
    pub memory_bytes: Option<u64>,
    pub cpu: Option<CpuLimit>,
    /// Maximum number of processes/threads.
    pub pids_limit: Option<i64>,
}

/// A CFS bandwidth limit: `quota_us` of CPU time per `period_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuLimit {
    pub quota_us: u64,
    pub period_us: u64,
}

impl CpuLimit {
    /// The default CFS period, as Docker and the kubelet use.
    pub const DEFAULT_PERIOD_US: u64 = 100_000;

    /// Kubernetes millicores (`500m` = half a CPU).
    pub fn from_millicores(millis: u64) -> Self {
        // The kernel refuses quotas under 1 ms.
        let quota = (millis * Self::DEFAULT_PERIOD_US / 1000).max(1000);
        CpuLimit {
            quota_us: quota,
            period_us: Self::DEFAULT_PERIOD_US,
        }
    }

    /// Docker's `--cpus 0.5`.
    pub fn from_cpus(cpus: f64) -> Result<Self, RuntimeError> {
        if !cpus.is_finite() || cpus <= 0.0 || cpus > 1024.0 {
            return Err(RuntimeError::InvalidSpec(format!(
                "cpus {cpus} must be a positive number of CPUs"
            )));
        }
        Ok(Self::from_millicores((cpus * 1000.0).round() as u64))
    }

    /// The limit in millicores.
    pub fn millicores(&self) -> u64 {
        self.quota_us * 1000 / self.period_us.max(1)
    }
}

/// A host path bound into the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub host_path: PathBuf,
    pub container_path: PathBuf,
    pub read_only: bool,
}

/// Standard streams handed to a process. `None` means `/dev/null` for stdin
/// and the workload's log for stdout/stderr. With `tty` set in the spec, the
/// tier makes the terminal inside the workload and copies between it and
/// `stdin`/`stdout` (the caller puts its own terminal in raw mode).
#[derive(Debug, Default)]
pub struct Stdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// A further process run inside a running workload.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Program and arguments; must not be empty.
    pub command: Vec<String>,
    /// Added to the workload's environment.
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<User>,
    pub tty: bool,
    /// Kill the process once it has run this long (an exec probe's
    /// `timeoutSeconds`); `exec` then fails with an error of kind
    /// `TimedOut`. `None` waits for as long as it runs.
    #[serde(default)]
    pub timeout: Option<Duration>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub cols: u16,
    pub rows: u16,
}

/// Where a workload is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum WorkloadState {
    /// Set up (rootfs, cgroup, namespaces or VM) but the user's process has not begun.
    Created,
    /// The main process runs; `pid` is as seen from the host (for the microvm
    /// tier, the VMM's pid).
    Running { pid: u32 },
    /// The main process has ended; the workload keeps its logs until removed.
    Exited(ExitInfo),
}

impl WorkloadState {
    /// A short word for tables and messages.
    pub fn word(&self) -> &'static str {
        match self {
            WorkloadState::Created => "created",
            WorkloadState::Running { .. } => "running",
            WorkloadState::Exited(_) => "exited",
        }
    }
}

/// How the main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Shell-style code: the exit status, or 128 + signal when killed.
    pub code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it (code is then 137).
    pub oom_killed: bool,
    pub finished_at: SystemTime,
}

impl ExitInfo {
    /// A normal exit with `code`.
    pub fn exited(code: i32) -> Self {
        ExitInfo {
            code,
            signal: None,
            oom_killed: false,
            finished_at: SystemTime::now(),
        }
    }

    /// Killed by `signal` (code 128 + signal).
    pub fn signaled(signal: i32, oom_killed: bool) -> Self {
        ExitInfo {
            code: 128 + signal,
            signal: Some(signal),
            oom_killed,
            finished_at: SystemTime::now(),
        }
    }

    /// Docker's word for the ending: `OOMKilled`, `Error` or `Completed`.
    pub fn reason(&self) -> &'static str {
        if self.oom_killed {
            "OOMKilled"
        } else if self.code != 0 {
            "Error"
        } else {
            "Completed"
        }
    }
}

/// A workload as `state` and `list` report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    pub id: String,
    pub image: Option<String>,
    pub state: WorkloadState,
    pub created_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub labels: BTreeMap<String, String>,
    /// Where the main process's output is kept, when the tier keeps it.
    pub log_path: Option<PathBuf>,
}

/// Errors every tier returns. Tier-specific failures go in [`RuntimeError::Tier`].
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The one "no such image" error all tiers use, so callers can match on it.
    #[error("image not found: {0}")]
    ImageNotFound(String),
    #[error("no such workload: {0}")]
    NotFound(String),
    #[error("workload already exists: {0}")]
    AlreadyExists(String),
    #[error("workload {id} is {state}; cannot {action}")]
    InvalidState {
        id: String,
        state: &'static str,
        action: &'static str,
    },
    #[error("invalid workload spec: {0}")]
    InvalidSpec(String),
    /// The tier cannot run on this host; `reason` says why and what to do.
    #[error("the {tier} tier is unavailable here: {reason}")]
    Unavailable { tier: String, reason: String },
    // The cause is part of the message and deliberately not a `source`:
    // callers print errors with their chain (`{:#}`) and would repeat it.
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    /// A failure inside a tier's backend (engine, VMM), with its message.
    #[error("{tier} tier: {error}")]
    Tier {
        tier: String,
        error: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl RuntimeError {
    /// An IO error with the path or action it happened on.
    pub fn io(what: impl Into<String>, error: std::io::Error) -> Self {
        RuntimeError::Io {
            what: what.into(),
            error,
        }
    }

    /// Wrap a backend error.
    pub fn tier(
        tier: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        RuntimeError::Tier {
            tier: tier.into(),
            error: source.into(),
        }
    }
}

/// Ids become directory names and cgroup names, so keep them tame.
pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::InvalidSpec(format!(
            "id {id:?} must be 1-128 characters of [A-Za-z0-9_.-] and not start with '.'"
        )))
    }
}

/// One way to run workloads: the process, container or microvm tier.
///
/// Implementations keep their state on disk where they can, so that a new
/// process (a second `evoke` command, a restarted agent) sees the same
/// workloads through `state` and `list`.
pub trait WorkloadRuntime: Send + Sync {
    /// The tier's name as `runtimeClassName` and `--tier` spell it.
    fn name(&self) -> &str;

    /// Whether this tier can run here; the error says why not and what to do
    /// (checked at run time, like Cloud Hypervisor's `is_available`).
    fn available(&self) -> Result<(), RuntimeError>;

    /// Prepare the workload without starting its process. `stdio` becomes the
    /// main process's streams; unset streams go to `spec.log_path`.
    fn create(&self, spec: &WorkloadSpec, stdio: Stdio) -> Result<WorkloadStatus, RuntimeError>;

    /// Start the main process of a Created workload. Returns once it runs
    /// (for the microvm tier: once the guest agent reported it started).
    fn start(&self, id: &str) -> Result<(), RuntimeError>;

    /// Whether `start` mostly waits for something other than this host's
    /// CPU (a guest's boot) rather than doing CPU-bound set-up: a caller
    /// that bounds concurrent starts to spare the CPU should not hold a
    /// place through that wait. The status's `started_at` is then the
    /// time the process really began.
    fn start_waits_for_guest(&self) -> bool {
        false
    }

    /// The workload's current state.
    fn state(&self, id: &str) -> Result<WorkloadStatus, RuntimeError>;

    /// All workloads of this tier, in no particular order.
    fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError>;

    /// Send `signal` (e.g. `libc::SIGTERM`) to the main process.
    fn signal(&self, id: &str, signal: i32) -> Result<(), RuntimeError>;

    /// Block until the main process ends, or `timeout` passes (`Ok(None)`).
    ///
    /// The default polls `state`; tiers that are the parent of the process
    /// should do better.
    fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<Option<ExitInfo>, RuntimeError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            if let WorkloadState::Exited(info) = self.state(id)?.state {
                return Ok(Some(info));
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run another process inside a Running workload and wait for it; returns
    /// its shell-style exit code.
    fn exec(&self, id: &str, spec: &ExecSpec, stdio: Stdio) -> Result<i32, RuntimeError>;

    /// [`exec`](Self::exec) on a terminal (`spec.tty`) whose size follows
    /// `sizes`: each size is applied as it arrives, the first as soon as the
    /// terminal exists (`kubectl exec -t` sends it at once and on every
    /// resize). Tiers whose terminal cannot be resized keep its default size.
    fn exec_with_resize(
        &self,
        id: &str,
        spec: &ExecSpec,
        stdio: Stdio,
        sizes: std::sync::mpsc::Receiver<TtySize>,
    ) -> Result<i32, RuntimeError> {
        drop(sizes);
        self.exec(id, spec, stdio)
    }

    /// A new writer to the main process's stdin, for a workload created
    /// with [`WorkloadSpec::stdin`] and no stdin of the caller's (what
    /// `kubectl attach -i` writes to). Closing it does not close the
    /// process's stdin: another writer may come later. Tiers that keep no
    /// stdin open refuse.
    fn open_stdin(&self, id: &str) -> Result<OwnedFd, RuntimeError> {
        Err(RuntimeError::InvalidSpec(format!(
            "the {} tier keeps no stdin open for workload {id}",
            self.name()
        )))
    }

    /// Delete the workload and everything the tier made for it. Without
    /// `force`, a Running workload is an error; with it, it is killed first.
    fn remove(&self, id: &str, force: bool) -> Result<(), RuntimeError>;

    /// SIGTERM, then SIGKILL after `grace`; returns how it ended.
    fn stop(&self, id: &str, grace: Duration) -> Result<ExitInfo, RuntimeError> {
        if let WorkloadState::Exited(info) = self.state(id)?.state {
            return Ok(info);
        }
        self.signal(id, 15)?;
        if let Some(info) = self.wait(id, Some(grace))? {
            return Ok(info);
        }
        self.signal(id, 9)?;
        self.wait(id, Some(Duration::from_secs(30)))?
            .ok_or(RuntimeError::InvalidState {
                id: id.to_string(),
                state: "running",
                action: "stop it: it survived SIGKILL for 30 s",
            })
    }
}

#[cfg(test)]
mod guest_network_tests {
    use super::*;

    #[test]
    fn guest_network_parses_tap_address_prefix_and_optional_gateway() {
        let n: GuestNetwork = "tp1,10.42.0.7/24,10.42.0.1".parse().unwrap();
        assert_eq!(n.tap, "tp1");
        assert_eq!(n.address, std::net::Ipv4Addr::new(10, 42, 0, 7));
        assert_eq!(n.prefix_len, 24);
        assert_eq!(n.gateway, Some(std::net::Ipv4Addr::new(10, 42, 0, 1)));
        let n: GuestNetwork = "tp1,192.168.9.2/30".parse().unwrap();
        assert_eq!(n.gateway, None);
    }

    #[test]
    fn malformed_guest_networks_are_rejected_with_the_input_named() {
        for bad in [
            "",
            "tp1",
            "tp1,10.0.0.1",
            "tp1,10.0.0.1/33",
            "tp1,10.0.0.x/24",
            "a-very-long-tap-name,10.0.0.1/24",
            "tp1,10.0.0.1/24,gw",
            "tp1,10.0.0.1/24,10.0.0.2,extra",
        ] {
            let err = bad.parse::<GuestNetwork>().unwrap_err().to_string();
            assert!(err.contains("guest network"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_spec_saved_before_guest_networks_existed_still_loads() {
        let mut v = serde_json::to_value(WorkloadSpec::default()).unwrap();
        v.as_object_mut().unwrap().remove("guest_network");
        let spec: WorkloadSpec = serde_json::from_value(v).unwrap();
        assert_eq!(spec.guest_network, None);
    }
}
