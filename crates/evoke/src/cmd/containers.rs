//! `evoke ps|logs|exec|stop|kill|rm`: manage containers made by `evoke run`.
//! Containers are found across all tiers by name, full id or unique id
//! prefix, as Docker does.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use evoke_container::tier::ContainerTier;
use evoke_runtime::image::human_duration;
use evoke_runtime::{ExecSpec, Stdio, TtySize, WorkloadRuntime, WorkloadState, WorkloadStatus};

use crate::cmd::run::{display_name, tiers, COMMAND_LABEL, NAME_LABEL};
use crate::Global;

#[derive(clap::Args, Debug)]
pub struct PsArgs {
    /// Show all containers, not only running ones.
    #[arg(short = 'a', long)]
    pub all: bool,
    /// Print only ids.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// Follow the output.
    #[arg(short = 'f', long)]
    pub follow: bool,
    pub container: String,
}

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    #[arg(short = 'i', long)]
    pub interactive: bool,
    #[arg(short = 't', long)]
    pub tty: bool,
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// UID[:GID] to run as (default: the container's user).
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    pub container: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct StopArgs {
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(short = 't', long, default_value_t = 10)]
    pub time: u64,
    #[arg(required = true)]
    pub containers: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct KillArgs {
    #[arg(short = 's', long, default_value = "KILL")]
    pub signal: String,
    #[arg(required = true)]
    pub containers: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    /// Kill a running container first.
    #[arg(short = 'f', long)]
    pub force: bool,
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// Every workload of every tier, with its tier.
fn all(g: &Global) -> anyhow::Result<Vec<(Arc<dyn WorkloadRuntime>, WorkloadStatus)>> {
    let mut out = Vec::new();
    for t in tiers(&g.data_dir)? {
        for s in t.list()? {
            out.push((t.clone(), s));
        }
    }
    Ok(out)
}

/// Find one container by name, id or unique id prefix.
fn find(g: &Global, needle: &str) -> anyhow::Result<(Arc<dyn WorkloadRuntime>, WorkloadStatus)> {
    let every = all(g)?;
    if let Some(hit) = every.iter().find(|(_, s)| {
        s.id == needle || s.labels.get(NAME_LABEL).map(String::as_str) == Some(needle)
    }) {
        return Ok(hit.clone());
    }
    let mut hits = every
        .into_iter()
        .filter(|(_, s)| !needle.is_empty() && s.id.starts_with(needle));
    match (hits.next(), hits.next()) {
        (Some(h), None) => Ok(h),
        (Some(_), Some(_)) => bail!("container id prefix {needle:?} is ambiguous"),
        _ => bail!("no such container: {needle}"),
    }
}

fn ago(t: SystemTime) -> String {
    human_duration(
        SystemTime::now()
            .duration_since(t)
            .unwrap_or_default()
            .as_secs(),
    )
}

fn status_text(s: &WorkloadStatus) -> String {
    match &s.state {
        WorkloadState::Created => "Created".into(),
        WorkloadState::Running { .. } => {
            format!("Up {}", ago(s.started_at.unwrap_or(s.created_at)))
        }
        WorkloadState::Exited(info) => {
            let mut t = format!("Exited ({}) {} ago", info.code, ago(info.finished_at));
            if info.oom_killed {
                t.push_str(" (OOMKilled)");
            }
            t
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

pub fn ps(g: &Global, a: PsArgs) -> anyhow::Result<u8> {
    let mut rows: Vec<_> = all(g)?
        .into_iter()
        .map(|(_, s)| s)
        .filter(|s| a.all || matches!(s.state, WorkloadState::Running { .. }))
        .collect();
    rows.sort_by_key(|s| std::cmp::Reverse(s.created_at));
    let mut out = std::io::stdout().lock();
    if a.quiet {
        for s in rows {
            writeln!(out, "{}", &s.id[..s.id.len().min(12)])?;
        }
        return Ok(0);
    }
    writeln!(
        out,
        "{:<14}{:<20}{:<24}{:<24}{:<40}{:<8}NAMES",
        "CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS"
    )?;
    for s in rows {
        let cmd = s.labels.get(COMMAND_LABEL).cloned().unwrap_or_default();
        writeln!(
            out,
            "{:<14}{:<20}{:<24}{:<24}{:<40}{:<8}{}",
            &s.id[..s.id.len().min(12)],
            truncate(s.image.as_deref().unwrap_or(""), 19),
            truncate(&format!("\"{cmd}\""), 23),
            format!("{} ago", ago(s.created_at)),
            status_text(&s),
            "",
            display_name(&s),
        )?;
    }
    Ok(0)
}

pub fn logs(g: &Global, a: LogsArgs) -> anyhow::Result<u8> {
    let (rt, s) = find(g, &a.container)?;
    let path = s
        .log_path
        .clone()
        .with_context(|| format!("container {} keeps no log", a.container))?;
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !a.follow => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("open log {}", path.display())),
    };
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("read {}", path.display()))?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        if !a.follow {
            break;
        }
        out.flush()?;
        let ended = !matches!(
            rt.state(&s.id).map(|s| s.state),
            Ok(WorkloadState::Running { .. } | WorkloadState::Created)
        );
        if ended {
            // One last pass for what was written just before the end.
            std::io::copy(&mut f, &mut out)?;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    out.flush()?;
    Ok(0)
}

pub fn exec(g: &Global, a: ExecArgs) -> anyhow::Result<u8> {
    let (rt, s) = find(g, &a.container)?;
    if !matches!(s.state, WorkloadState::Running { .. }) {
        bail!("container {} is not running", a.container);
    }
    let env = a
        .env
        .iter()
        .filter_map(|e| match e.split_once('=') {
            Some((k, v)) => Some((k.to_string(), v.to_string())),
            None => std::env::var(e).ok().map(|v| (e.clone(), v)),
        })
        .collect();
    let spec = ExecSpec {
        command: a.command.clone(),
        env,
        workdir: a.workdir.clone(),
        user: match a.user.as_deref() {
            None => None,
            // Names (and uid:group) are looked up in the container's own
            // /etc/passwd and /etc/group, as `docker exec -u` does.
            Some(u) if rt.name() == ContainerTier::NAME => {
                let rootfs = g
                    .data_dir
                    .join("containers")
                    .join(&s.id)
                    .join("bundle/rootfs");
                Some(evoke_container::tier::resolve_user(&rootfs, u)?)
            }
            Some(u) => Some(u.parse()?),
        },
        tty: a.tty,
        timeout: None,
    };
    let dup =
        |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().context("dup a standard stream");
    use std::os::fd::AsFd;
    let raw = a.tty.then(crate::cmd::run::tty::RawMode::enter);
    let stdio = Stdio {
        stdin: if a.interactive {
            Some(dup(std::io::stdin().as_fd())?)
        } else {
            None
        },
        stdout: Some(dup(std::io::stdout().as_fd())?),
        stderr: Some(dup(std::io::stderr().as_fd())?),
    };
    let code = if a.tty {
        // The terminal's size now and after every resize, until exec ends
        // and drops the receiver.
        let (tx, sizes) = std::sync::mpsc::channel();
        let (stdin, stdout) = (std::io::stdin(), std::io::stdout());
        let term = [stdin.as_fd(), stdout.as_fd()]
            .into_iter()
            .find(|fd| rustix::termios::isatty(fd));
        if let Some(term) = term {
            follow_window_size(dup(term)?, tx)?;
        }
        rt.exec_with_resize(&s.id, &spec, stdio, sizes)?
    } else {
        rt.exec(&s.id, &spec, stdio)?
    };
    drop(raw);
    Ok(u8::try_from(code).unwrap_or(255))
}

/// The size of terminal `fd`; `None` when it is no terminal or reports
/// no size (0x0, as a pty nobody sized).
fn terminal_size(fd: impl std::os::fd::AsFd) -> Option<TtySize> {
    let ws = rustix::termios::tcgetwinsize(fd).ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then_some(TtySize {
        cols: ws.ws_col,
        rows: ws.ws_row,
    })
}

/// Sends terminal `term`'s size to `sizes` at once and again on every
/// SIGWINCH, from a thread that ends at the first signal after the
/// receiver went away (or with the process).
fn follow_window_size(
    term: std::os::fd::OwnedFd,
    sizes: std::sync::mpsc::Sender<TtySize>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("a runtime for SIGWINCH")?;
    // Registered before the first size is read, so no resize in between is lost.
    let mut winch = {
        let _in_rt = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            .context("listening for SIGWINCH")?
    };
    if let Some(size) = terminal_size(&term) {
        let _ = sizes.send(size);
    }
    std::thread::Builder::new()
        .name("winch".into())
        .spawn(move || {
            rt.block_on(async move {
                while winch.recv().await.is_some() {
                    let Some(size) = terminal_size(&term) else {
                        continue;
                    };
                    tracing::debug!(cols = size.cols, rows = size.rows, "terminal resized");
                    if sizes.send(size).is_err() {
                        break;
                    }
                }
            })
        })
        .context("spawning the SIGWINCH thread")?;
    Ok(())
}

pub fn stop(g: &Global, a: StopArgs) -> anyhow::Result<u8> {
    for c in &a.containers {
        let (rt, s) = find(g, c)?;
        if matches!(s.state, WorkloadState::Running { .. }) {
            rt.stop(&s.id, Duration::from_secs(a.time))?;
        }
        println!("{c}");
    }
    Ok(0)
}

pub fn kill(g: &Global, a: KillArgs) -> anyhow::Result<u8> {
    let sig = evoke_container::parse_signal(&a.signal)?;
    for c in &a.containers {
        let (rt, s) = find(g, c)?;
        if !matches!(s.state, WorkloadState::Running { .. }) {
            bail!("container {c} is not running");
        }
        rt.signal(&s.id, sig as i32)?;
        println!("{c}");
    }
    Ok(0)
}

pub fn rm(g: &Global, a: RmArgs) -> anyhow::Result<u8> {
    for c in &a.containers {
        let (rt, s) = find(g, c)?;
        if matches!(s.state, WorkloadState::Running { .. }) && !a.force {
            bail!("cannot remove running container {c}: stop it first or use rm -f");
        }
        rt.remove(&s.id, a.force)?;
        println!("{c}");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn winsize(cols: u16, rows: u16) -> rustix::termios::Winsize {
        rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }
    }

    #[test]
    fn exec_t_sends_the_terminal_size_at_once_and_after_each_sigwinch() {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        rustix::termios::tcsetwinsize(&pty.master, winsize(101, 33)).expect("size the pty");
        let (tx, sizes) = std::sync::mpsc::channel();
        let term = pty.slave.try_clone().expect("dup the pty");
        follow_window_size(term, tx).expect("follow the size");
        let wait = Duration::from_secs(10);
        assert_eq!(
            sizes.recv_timeout(wait).expect("the first size"),
            TtySize {
                cols: 101,
                rows: 33
            }
        );
        // A resize, then the signal a terminal sends its foreground group.
        rustix::termios::tcsetwinsize(&pty.master, winsize(120, 40)).expect("resize the pty");
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGWINCH).expect("raise SIGWINCH");
        assert_eq!(
            sizes.recv_timeout(wait).expect("the size after SIGWINCH"),
            TtySize {
                cols: 120,
                rows: 40
            }
        );
    }

    #[test]
    fn a_file_that_is_no_terminal_has_no_size() {
        let f = tempfile::tempfile().expect("a temp file");
        assert_eq!(terminal_size(&f), None);
        let pty = nix::pty::openpty(None, None).expect("openpty");
        rustix::termios::tcsetwinsize(&pty.master, winsize(0, 0)).expect("unsize the pty");
        assert_eq!(terminal_size(&pty.slave), None);
    }
}
