//! `evoke run`: run a command from an image, like `docker run`.
//!
//! The flags become a [`WorkloadSpec`] for the tier named by `--tier`. In the
//! foreground this process creates, starts and waits for the workload (it
//! is the parent, so it sees the exit code and OOM kill). With `-d` a
//! detached monitor process does that instead ([`evoke_runtime::monitor`]).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use evoke_container::tier::{ContainerTier, ProcessTier};
use evoke_runtime::{
    CpuLimit, Resources, Stdio, User, WorkloadRuntime, WorkloadSpec, WorkloadState, WorkloadStatus,
};

use crate::Global;

/// Label keys evoke's CLI keeps on workloads.
pub const NAME_LABEL: &str = "evoke.name";
pub const COMMAND_LABEL: &str = "evoke.command";

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Which stage to run at: process, container or microvm.
    #[arg(long, default_value = "container")]
    pub tier: String,
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Run in the background and print the container's id.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Keep stdin open.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Allocate a pseudo-terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// The container's name.
    #[arg(long)]
    pub name: Option<String>,
    /// Set an environment variable (K=V).
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// UID[:GID] to run as.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Memory limit, e.g. 64m or 1g.
    #[arg(long)]
    pub memory: Option<String>,
    /// CPU limit, e.g. 0.5.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[arg(long)]
    pub pids_limit: Option<i64>,
    /// Run in a new user namespace: `--userns` (or `=auto`) maps the
    /// container's ids 0-65535 to a free block of the subordinate range
    /// (user `evoke` in /etc/subuid and /etc/subgid), `--userns=HOSTID:COUNT`
    /// to exactly those host ids. Its root is then unprivileged on the host.
    #[arg(long, value_name = "auto|HOSTID:COUNT", num_args = 0..=1, require_equals = true, default_missing_value = "auto")]
    pub userns: Option<String>,
    /// microvm tier only: give the guest an eth0 on an existing tap device,
    /// TAP,ADDRESS/PREFIX[,GATEWAY] (pods get theirs from the pod network).
    #[arg(long, value_name = "TAP,ADDR/PREFIX[,GW]")]
    pub guest_net: Option<String>,
    /// The image. With `--tier process`, an absolute path instead runs that
    /// host program with no image: `evoke run --tier process -- /bin/echo hi`.
    pub image: String,
    /// Command and arguments (default: the image's Entrypoint and Cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Every tier this binary has, in `ps` order.
pub fn tiers(data_dir: &Path) -> anyhow::Result<Vec<Arc<dyn WorkloadRuntime>>> {
    Ok(vec![
        Arc::new(ContainerTier::new(data_dir)?),
        Arc::new(ProcessTier::new(data_dir)?),
        tier(data_dir, "microvm")?,
    ])
}

/// The tier called `name`.
pub fn tier(data_dir: &Path, name: &str) -> anyhow::Result<Arc<dyn WorkloadRuntime>> {
    match name {
        "container" => Ok(Arc::new(ContainerTier::new(data_dir)?)),
        "process" => Ok(Arc::new(ProcessTier::new(data_dir)?)),
        "microvm" => Ok(Arc::new(evoke_vmm::tier::MicroVmTier::new(
            data_dir,
            evoke_container::selfexe::original_exe()
                .context("locating the evoke binary for the vmm")?,
        ))),
        other => bail!("unknown tier {other:?}: use process, container or microvm"),
    }
}

/// A fresh 64-hex-digit id, like Docker's.
pub fn new_id() -> anyhow::Result<String> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("read /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `64m`, `1g`, `512k`, `100` (bytes), as Docker's --memory.
pub fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .with_context(|| format!("invalid size {s:?} (use e.g. 64m or 1g)"))?;
    if !(n.is_finite() && n > 0.0) {
        bail!("invalid size {s:?}: must be positive");
    }
    Ok((n * mult as f64) as u64)
}

/// `-e K=V`, or `-e K` to pass this process's value (skipped when unset).
fn parse_env(vars: &[String]) -> Vec<(String, String)> {
    vars.iter()
        .filter_map(|e| match e.split_once('=') {
            Some((k, v)) => Some((k.to_string(), v.to_string())),
            None => std::env::var(e).ok().map(|v| (e.clone(), v)),
        })
        .collect()
}

fn dup(fd: impl AsFd) -> anyhow::Result<OwnedFd> {
    fd.as_fd()
        .try_clone_to_owned()
        .context("dup a standard stream")
}

/// The name a workload is known by (its label, else its short id).
pub fn display_name(s: &WorkloadStatus) -> String {
    s.labels
        .get(NAME_LABEL)
        .cloned()
        .unwrap_or_else(|| s.id.chars().take(12).collect())
}

pub fn main(global: &Global, args: RunArgs) -> anyhow::Result<u8> {
    if args.guest_net.is_some() && args.tier != "microvm" {
        bail!("--guest-net is for --tier microvm; other tiers get their network from a namespace");
    }
    let rt = match &args.userns {
        None => tier(&global.data_dir, &args.tier)?,
        Some(mode) if args.tier == "container" => {
            let mode: evoke_container::userns::UsernsMode = mode.parse()?;
            Arc::new(ContainerTier::new(&global.data_dir)?.with_user_namespace(mode))
        }
        Some(_) => bail!(
            "--userns is for the container tier; --tier {} has no user namespace",
            args.tier
        ),
    };
    rt.available()?;
    let id = new_id()?;
    let name = match &args.name {
        Some(n) => {
            if n.is_empty()
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            {
                bail!("invalid container name {n:?}: use [a-zA-Z0-9_.-]");
            }
            for t in tiers(&global.data_dir)? {
                if t.list()?
                    .iter()
                    .any(|s| s.labels.get(NAME_LABEL) == Some(n))
                {
                    bail!("the container name {n:?} is already in use");
                }
            }
            n.clone()
        }
        None => id[..12].to_string(),
    };
    // The process tier runs host programs; an absolute path there is the
    // program, not an image reference (image names never start with '/').
    let (image, command) = if args.tier == "process" && args.image.starts_with('/') {
        let mut cmd = vec![args.image.clone()];
        cmd.extend(args.command.iter().cloned());
        (None, Some(cmd))
    } else {
        (Some(args.image.clone()), None)
    };
    let mut labels = BTreeMap::new();
    labels.insert(NAME_LABEL.to_string(), name.clone());
    let shown = command.as_ref().unwrap_or(&args.command);
    labels.insert(COMMAND_LABEL.to_string(), shown.join(" "));
    let cpu = match args.cpus {
        Some(c) => Some(CpuLimit::from_cpus(c)?),
        None => None,
    };
    let spec = WorkloadSpec {
        id: id.clone(),
        args: (image.is_some() && !args.command.is_empty()).then(|| args.command.clone()),
        image,
        command,
        env: parse_env(&args.env),
        workdir: args.workdir.clone(),
        user: args.user.as_deref().map(str::parse::<User>).transpose()?,
        tty: args.tty,
        stdin: args.interactive,
        resources: Resources {
            memory_bytes: args.memory.as_deref().map(parse_bytes).transpose()?,
            cpu,
            pids_limit: args.pids_limit,
        },
        labels,
        guest_network: args
            .guest_net
            .as_deref()
            .map(str::parse::<evoke_runtime::GuestNetwork>)
            .transpose()?,
        ..WorkloadSpec::default()
    };

    if args.detach {
        evoke_runtime::monitor::spawn_detached(rt.as_ref(), &spec, args.rm)?;
        println!("{id}");
        return Ok(0);
    }

    // With -t the tier makes the terminal inside the container and copies
    // between it and these streams; this terminal goes raw meanwhile.
    let raw = args.tty.then(tty::RawMode::enter);
    let stdio = Stdio {
        stdin: if args.interactive {
            Some(dup(std::io::stdin())?)
        } else {
            None
        },
        stdout: Some(dup(std::io::stdout())?),
        stderr: Some(dup(std::io::stderr())?),
    };
    rt.create(&spec, stdio)?;
    if let Err(e) = rt.start(&id) {
        // A workload that ended while starting (a microVM guest that could
        // not exec the command records 127) exits with its code, as
        // `docker run` does for a missing command; the error says why.
        let ended = match rt.state(&id).map(|s| s.state) {
            Ok(WorkloadState::Exited(info)) => Some(info.code),
            _ => None,
        };
        let _ = rt.remove(&id, true);
        return match ended {
            Some(code) => {
                eprintln!("evoke: {e}");
                Ok(u8::try_from(code).unwrap_or(255))
            }
            None => Err(e.into()),
        };
    }
    forward_signals(rt.clone(), &id);
    let info = rt.wait(&id, None)?.context("the workload did not end")?;
    drop(raw);
    if info.oom_killed {
        eprintln!(
            "evoke: container {name} was OOMKilled (exit code {})",
            info.code
        );
    }
    if args.rm {
        rt.remove(&id, true)?;
    }
    let _ = std::io::stdout().flush();
    Ok(u8::try_from(info.code).unwrap_or(255))
}

/// SIGINT, SIGTERM and SIGHUP to this process go to the workload instead,
/// as with `docker run` (the workload is in its own session).
fn forward_signals(rt: Arc<dyn WorkloadRuntime>, id: &str) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    // Block in this thread (inherited by the thread below); the workload was
    // created already, so it does not inherit the mask.
    if set.thread_block().is_err() {
        return;
    }
    let id = id.to_string();
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            if rt.signal(&id, sig as i32).is_err() {
                break;
            }
        }
    });
}

/// This terminal in raw mode while a `-t` workload runs.
pub mod tty {
    use std::os::fd::AsFd;

    use nix::sys::termios;

    /// Restores the terminal's settings on drop.
    pub struct RawMode {
        saved: Option<termios::Termios>,
    }

    impl RawMode {
        /// Raw mode on stdin if it is a terminal; a no-op otherwise.
        pub fn enter() -> RawMode {
            let stdin = std::io::stdin();
            let saved = termios::tcgetattr(stdin.as_fd()).ok();
            if let Some(t) = &saved {
                let mut raw = t.clone();
                termios::cfmakeraw(&mut raw);
                let _ = termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw);
            }
            RawMode { saved }
        }
    }

    impl Drop for RawMode {
        fn drop(&mut self) {
            if let Some(t) = &self.saved {
                let _ = termios::tcsetattr(std::io::stdin().as_fd(), termios::SetArg::TCSANOW, t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse_like_docker() {
        assert_eq!(parse_bytes("64m").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1g").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("512k").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert_eq!(parse_bytes("64MB").unwrap(), 64 << 20);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-1m").is_err());
    }

    #[test]
    fn env_without_value_comes_from_this_process() {
        std::env::set_var("EVOKE_TEST_PASSTHROUGH", "yes");
        let env = parse_env(&[
            "A=1".into(),
            "EVOKE_TEST_PASSTHROUGH".into(),
            "UNSET_X_Y".into(),
        ]);
        assert_eq!(
            env,
            vec![
                ("A".into(), "1".into()),
                ("EVOKE_TEST_PASSTHROUGH".into(), "yes".into())
            ]
        );
    }
}
