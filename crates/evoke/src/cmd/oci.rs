//! `evoke oci …`: the OCI runtime command line, a drop-in for runc and crun.
//! Each subcommand maps to one call of the evoke-container library.
//!
//! runc's global `--log FILE` is taken by evoke's global `--log FILTER`; a
//! path given there is accepted and ignored (errors go to stderr, which
//! containerd also reads).

use std::path::PathBuf;

use anyhow::Context;
use evoke_container as engine;

use crate::Global;

/// `evoke oci …` parsed on its own (see `main`): the same arguments as
/// the `oci` subcommand of the full command line, global options included.
#[derive(clap::Parser, Debug)]
#[command(
    name = "evoke oci",
    version,
    about = "OCI runtime commands, a drop-in for runc and crun."
)]
struct OciCli {
    #[command(flatten)]
    global: Global,
    #[command(flatten)]
    args: OciArgs,
}

/// Entry point for `evoke oci …`, called before the full command line is
/// built.
pub fn main_fast() -> anyhow::Result<u8> {
    use clap::Parser;
    let argv = std::env::args_os().skip(2);
    let cli =
        OciCli::parse_from(std::iter::once(std::ffi::OsString::from("evoke oci")).chain(argv));
    if matches!(cli.args.command, OciCommand::Exec(_)) {
        // The exec'd process is a clone of this one, visible to the
        // container's processes until its last exec (CVE-2019-5736). For
        // create and run, `create` decides (see `reexec_when_shared`).
        engine::selfexe::protect()?;
    }
    crate::init_logging(&cli.global.log);
    main(&cli.global, cli.args)
}

#[derive(clap::Args, Debug)]
pub struct OciArgs {
    /// Directory for container state (runc's --root).
    #[arg(long, default_value = "/run/evoke/oci")]
    pub root: PathBuf,
    /// Log format (accepted for runc compatibility; logs are tracing's).
    #[arg(long, value_name = "text|json")]
    pub log_format: Option<String>,
    /// Accepted for runc compatibility and ignored: cgroups are managed
    /// through the file system.
    #[arg(long)]
    pub systemd_cgroup: bool,
    #[command(subcommand)]
    pub command: OciCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum OciCommand {
    /// Create a container; its process waits for `start`.
    Create(CreateArgs),
    /// Start a created container's process.
    Start { id: String },
    /// Print a container's state as JSON.
    State { id: String },
    /// Send a signal (name or number, default SIGTERM) to a container.
    Kill {
        /// Accepted for runc compatibility: the whole container is signalled
        /// through its init.
        #[arg(short, long)]
        all: bool,
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete a container's processes, cgroup and state.
    Delete {
        /// Kill a running container first.
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// Create and start a container; without --detach wait for it, delete
    /// it, and exit with its exit code.
    Run(RunArgs),
    /// Run another process in a running container.
    Exec(ExecArgs),
    /// List containers.
    List,
    /// Write a config.json with Docker's defaults (like `runc spec`).
    Spec {
        /// The bundle directory to write config.json into.
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        /// The root file system, relative to the bundle.
        #[arg(long, default_value = "rootfs")]
        rootfs: String,
        /// The process's args (default: sh).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The bundle directory, holding config.json.
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Write the container process's pid here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket to receive the pty master when process.terminal is set.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility and ignored.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility and ignored.
    #[arg(long)]
    pub no_new_keyring: bool,
    pub id: String,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Return once started instead of waiting.
    #[arg(short, long)]
    pub detach: bool,
}

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// A process.json (the OCI `process` object); else config.json's
    /// process with ARGS as its args.
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Return the pid at once instead of waiting.
    #[arg(short, long)]
    pub detach: bool,
    /// Write the process's pid here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    pub id: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

fn create_opts(a: &CreateArgs) -> engine::CreateOptions {
    engine::CreateOptions {
        console_socket: a.console_socket.clone(),
        pid_file: a.pid_file.clone(),
        reexec_when_shared: true,
        ..Default::default()
    }
}

pub fn main(_g: &Global, a: OciArgs) -> anyhow::Result<u8> {
    let root = a.root.as_path();
    match a.command {
        OciCommand::Create(c) => {
            engine::create(root, &c.id, &c.bundle, create_opts(&c))?;
            Ok(0)
        }
        OciCommand::Start { id } => {
            engine::start(root, &id)?;
            Ok(0)
        }
        OciCommand::State { id } => {
            let s = engine::state(root, &id)?;
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(0)
        }
        OciCommand::Kill { id, signal, .. } => {
            engine::kill(root, &id, engine::parse_signal(&signal)?)?;
            Ok(0)
        }
        OciCommand::Delete { force, id } => {
            engine::delete(root, &id, force)?;
            Ok(0)
        }
        OciCommand::List => {
            println!("{:<24} {:<8} {:<10} BUNDLE", "ID", "PID", "STATUS");
            for s in engine::list(root)? {
                println!(
                    "{:<24} {:<8} {:<10} {}",
                    s.id,
                    s.pid,
                    s.status,
                    s.bundle.display()
                );
            }
            Ok(0)
        }
        OciCommand::Run(r) => run(root, r),
        OciCommand::Spec {
            bundle,
            rootfs,
            args,
        } => {
            let args = if args.is_empty() {
                vec!["sh".to_string()]
            } else {
                args
            };
            let spec = engine::spec::default_spec(&args, &rootfs);
            let path = bundle.join("config.json");
            let text = serde_json::to_string_pretty(&spec)?;
            std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
            Ok(0)
        }
        OciCommand::Exec(e) => exec(root, e),
    }
}

fn run(root: &std::path::Path, r: RunArgs) -> anyhow::Result<u8> {
    let id = r.create.id.clone();
    engine::create(root, &id, &r.create.bundle, create_opts(&r.create))?;
    if let Err(e) = engine::start(root, &id) {
        let _ = engine::delete(root, &id, true);
        return Err(e.into());
    }
    if r.detach {
        return Ok(0);
    }
    engine::forward_signals(root, &id);
    let status = engine::wait(root, &id);
    let deleted = engine::delete(root, &id, true);
    let status = status?;
    deleted?;
    if status.oom_killed {
        eprintln!("evoke: container {id} was OOM-killed");
    }
    Ok(exit_code(status.code))
}

fn exit_code(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(255)
}

fn exec(root: &std::path::Path, e: ExecArgs) -> anyhow::Result<u8> {
    let process: engine::oci_spec::runtime::Process = match &e.process {
        Some(p) => {
            let text = std::fs::read(p).with_context(|| format!("read {}", p.display()))?;
            serde_json::from_slice(&text).with_context(|| format!("parse {}", p.display()))?
        }
        None => {
            let st = engine::state(root, &e.id)?;
            let cfg = st.bundle.join("config.json");
            let spec = engine::oci_spec::runtime::Spec::load(&cfg)
                .with_context(|| format!("load {}", cfg.display()))?;
            let mut p = spec.process().clone().unwrap_or_default();
            if e.args.is_empty() {
                anyhow::bail!("exec needs a command or --process");
            }
            p.set_args(Some(e.args.clone()));
            p.set_terminal(Some(false));
            p
        }
    };
    let pid = engine::exec(root, &e.id, &process, engine::ExecOptions::default())?;
    if let Some(pf) = &e.pid_file {
        std::fs::write(pf, pid.to_string()).with_context(|| format!("write {}", pf.display()))?;
    }
    if e.detach {
        return Ok(0);
    }
    Ok(exit_code(engine::wait_pid(pid)?.code))
}
