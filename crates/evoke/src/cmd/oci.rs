//! `evoke oci …`: the OCI runtime command line, a drop-in for runc and crun.
//! Each subcommand maps to one call of the evoke-container library.
//!
//! runc's global `--log FILE` is taken by evoke's global `--log FILTER`; a
//! path given there is accepted and ignored (errors go to stderr, which
//! containerd also reads).

use std::ffi::OsString;
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
    let argv: Vec<OsString> = std::env::args_os().skip(2).collect();
    if let Some((global, args)) = hot::parse(&argv) {
        hot::init_logging(&global.log);
        return main(&global, args);
    }
    let cli = OciCli::parse_from(std::iter::once(OsString::from("evoke oci")).chain(argv));
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
    /// Enter the rootfs by moving it over / and chroot instead of
    /// pivot_root (as runc's --no-pivot). Without it, pivot_root is used,
    /// and the move is taken only where pivot_root refuses an initramfs root.
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
        no_pivot: a.no_pivot,
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

/// The commands a container manager runs for every container (`create`,
/// `start`, `state`, `kill`, `delete`), parsed without clap, and logging
/// without tracing-subscriber's registry.
///
/// Each of those is a fresh process, so start-up is most of its cost:
/// building clap's command tree and the subscriber's span registry touched
/// about a hundred pages more than the command itself needs. Only plain,
/// fully understood command lines take this path; anything else (help,
/// `--version`, an unknown flag, other subcommands) goes to clap, which
/// then prints its usual messages.
mod hot {
    use std::ffi::OsString;
    use std::path::PathBuf;

    use super::{CreateArgs, OciArgs, OciCommand};
    use crate::Global;

    /// `--name VALUE` or `--name=VALUE` at `args[*i]` (advancing `*i` past
    /// the value); None when `args[*i]` is not that option.
    fn value(args: &[&str], i: &mut usize, names: &[&str]) -> Option<Option<String>> {
        let a = args[*i];
        for n in names {
            if a == *n {
                *i += 1;
                return Some(args.get(*i).map(|v| v.to_string()));
            }
            if let Some(v) = a.strip_prefix(n).and_then(|r| r.strip_prefix('=')) {
                return Some(Some(v.to_string()));
            }
        }
        None
    }

    /// The parsed command line, or None to leave it to clap.
    pub(super) fn parse(argv: &[OsString]) -> Option<(Global, OciArgs)> {
        let args: Vec<&str> = argv.iter().map(|a| a.to_str()).collect::<Option<_>>()?;
        let mut g = Global {
            data_dir: std::env::var_os("EVOKE_DATA_DIR")
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from("/var/lib/evoke"), PathBuf::from),
            log: std::env::var("EVOKE_LOG")
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "info".into()),
        };
        let mut root = PathBuf::from("/run/evoke/oci");
        let mut log_format = None;
        let mut systemd_cgroup = false;
        let mut i = 0;
        // Global options, up to the subcommand.
        loop {
            let a = *args.get(i)?;
            if !a.starts_with('-') {
                break;
            }
            if let Some(v) = value(&args, &mut i, &["--root"]) {
                root = PathBuf::from(v?);
            } else if let Some(v) = value(&args, &mut i, &["--log"]) {
                g.log = v?;
            } else if let Some(v) = value(&args, &mut i, &["--log-format"]) {
                log_format = Some(v?);
            } else if let Some(v) = value(&args, &mut i, &["--data-dir"]) {
                g.data_dir = PathBuf::from(v?);
            } else if a == "--systemd-cgroup" {
                systemd_cgroup = true;
            } else {
                return None;
            }
            i += 1;
        }
        let sub = args[i];
        let rest = &args[i + 1..];
        let command = match sub {
            "create" => OciCommand::Create(create(rest)?),
            "start" | "state" => {
                let [id] = rest else { return None };
                if id.starts_with('-') {
                    return None;
                }
                let id = id.to_string();
                if sub == "start" {
                    OciCommand::Start { id }
                } else {
                    OciCommand::State { id }
                }
            }
            "delete" => {
                let (flags, pos) = split(rest, &["-f", "--force"])?;
                let [id] = pos.as_slice() else { return None };
                OciCommand::Delete {
                    force: !flags.is_empty(),
                    id: id.to_string(),
                }
            }
            "kill" => {
                let (flags, pos) = split(rest, &["-a", "--all"])?;
                let (id, signal) = match pos.as_slice() {
                    [id] => (id, "SIGTERM"),
                    [id, sig] => (id, *sig),
                    _ => return None,
                };
                OciCommand::Kill {
                    all: !flags.is_empty(),
                    id: id.to_string(),
                    signal: signal.to_string(),
                }
            }
            _ => return None,
        };
        let args = OciArgs {
            root,
            log_format,
            systemd_cgroup,
            command,
        };
        Some((g, args))
    }

    /// Splits `rest` into the flags named in `known` and positionals; None
    /// on any other option.
    fn split<'a>(rest: &[&'a str], known: &[&str]) -> Option<(Vec<&'a str>, Vec<&'a str>)> {
        let (mut flags, mut pos) = (Vec::new(), Vec::new());
        for a in rest {
            if known.contains(a) {
                flags.push(*a);
            } else if a.starts_with('-') {
                return None;
            } else {
                pos.push(*a);
            }
        }
        Some((flags, pos))
    }

    fn create(rest: &[&str]) -> Option<CreateArgs> {
        let mut c = CreateArgs {
            bundle: PathBuf::from("."),
            pid_file: None,
            console_socket: None,
            no_pivot: false,
            no_new_keyring: false,
            id: String::new(),
        };
        let mut id = None;
        let mut i = 0;
        while i < rest.len() {
            let a = rest[i];
            if let Some(v) = value(rest, &mut i, &["--bundle", "-b"]) {
                c.bundle = PathBuf::from(v?);
            } else if let Some(v) = value(rest, &mut i, &["--pid-file"]) {
                c.pid_file = Some(PathBuf::from(v?));
            } else if let Some(v) = value(rest, &mut i, &["--console-socket"]) {
                c.console_socket = Some(PathBuf::from(v?));
            } else if a == "--no-pivot" {
                c.no_pivot = true;
            } else if a == "--no-new-keyring" {
                c.no_new_keyring = true;
            } else if a.starts_with('-') || id.is_some() {
                return None;
            } else {
                id = Some(a.to_string());
            }
            i += 1;
        }
        c.id = id?;
        Some(c)
    }

    /// Logs to stderr at the level `filter` names (a bare level; anything
    /// else, such as runc's `--log FILE`, means `info`). Spans are ignored:
    /// these commands open none that a reader needs.
    pub(super) fn init_logging(filter: &str) {
        let max = filter
            .parse::<tracing::level_filters::LevelFilter>()
            .unwrap_or(tracing::level_filters::LevelFilter::INFO);
        let _ = tracing::subscriber::set_global_default(StderrLog { max });
    }

    struct StderrLog {
        max: tracing::level_filters::LevelFilter,
    }

    /// An event's message and fields as `message k=v …`.
    struct Line(String);

    impl tracing::field::Visit for Line {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            use std::fmt::Write;
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            if field.name() == "message" {
                let _ = write!(self.0, "{value:?}");
            } else {
                let _ = write!(self.0, "{}={value:?}", field.name());
            }
        }
    }

    impl tracing::Subscriber for StderrLog {
        fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
            self.max >= *meta.level()
        }
        fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
            Some(self.max)
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            let mut line = Line(String::new());
            event.record(&mut line);
            let m = event.metadata();
            eprintln!("{:>5} {}: {}", m.level(), m.target(), line.0);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn p(s: &str) -> Option<(Global, OciArgs)> {
            let v: Vec<OsString> = s.split_whitespace().map(OsString::from).collect();
            parse(&v)
        }

        #[test]
        fn the_per_container_commands_parse_without_clap() {
            let (_, a) = p("--root /r create --bundle /b --pid-file /p c1").unwrap();
            assert_eq!(a.root, PathBuf::from("/r"));
            let OciCommand::Create(c) = a.command else {
                panic!("not create")
            };
            assert_eq!(c.bundle, PathBuf::from("/b"));
            assert_eq!(c.pid_file, Some(PathBuf::from("/p")));
            assert_eq!(c.id, "c1");
            let (_, a) = p("--root=/r create -b /b --console-socket=/s c2").unwrap();
            let OciCommand::Create(c) = a.command else {
                panic!("not create")
            };
            assert_eq!(
                (c.bundle, c.console_socket, c.id.as_str()),
                (PathBuf::from("/b"), Some(PathBuf::from("/s")), "c2")
            );
            let (g, a) = p("--log debug --log-format json --root /r start c1").unwrap();
            assert_eq!(g.log, "debug");
            assert_eq!(a.log_format.as_deref(), Some("json"));
            assert!(matches!(a.command, OciCommand::Start { id } if id == "c1"));
            let (_, a) = p("--root /r delete --force c1").unwrap();
            assert!(matches!(a.command, OciCommand::Delete { force: true, id } if id == "c1"));
            let (_, a) = p("kill -a c1 KILL").unwrap();
            assert_eq!(a.root, PathBuf::from("/run/evoke/oci"));
            assert!(
                matches!(a.command, OciCommand::Kill { all: true, id, signal } if id == "c1" && signal == "KILL")
            );
        }

        #[test]
        fn anything_unusual_is_left_to_clap() {
            for s in [
                "",
                "--help",
                "--version",
                "--root",
                "--root /r",
                "--root /r start",
                "--root /r start a b",
                "--root /r start --help",
                "--root /r create",
                "--root /r create --bundle",
                "--root /r create --weird x c1",
                "--root /r create c1 c2",
                "--root /r delete -x c1",
                "--root /r kill c1 TERM extra",
                "--root /r run c1",
                "--root /r spec",
                "--bogus create c1",
            ] {
                assert!(p(s).is_none(), "{s:?} was taken by the hand parser");
            }
        }
    }
}
