//! The `evoke` binary. It parses the command line, sets up logging and hands
//! each subcommand to the library crate that does the work. Nothing else
//! lives here: start reading at [`Command`], then the file in `cmd/` named
//! after the subcommand.

mod cmd;
mod memory;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "evoke",
    version,
    about = "Run a workload as a process, a container, a microVM or a function, behind the Kubernetes API."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand shares, so the server, the agent and the image
/// commands see one image store.
#[derive(clap::Args, Debug, Clone)]
pub struct Global {
    /// Where evoke keeps its state: the store, images, containers, certificates.
    #[arg(
        long,
        global = true,
        env = "EVOKE_DATA_DIR",
        default_value = "/var/lib/evoke"
    )]
    pub data_dir: PathBuf,
    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `evoke_store=debug`.
    #[arg(long, global = true, env = "EVOKE_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the control plane (and, unless --disable-agent, a node agent).
    Server(cmd::server::ServerArgs),
    /// Join a node to a server.
    Agent(cmd::agent::AgentArgs),
    /// Run a command in a new container, microVM or process.
    Run(cmd::run::RunArgs),
    /// List containers.
    Ps(cmd::containers::PsArgs),
    /// Print a container's output.
    Logs(cmd::containers::LogsArgs),
    /// Run a command in a running container.
    Exec(cmd::containers::ExecArgs),
    /// Stop containers: SIGTERM, then SIGKILL after a grace period.
    Stop(cmd::containers::StopArgs),
    /// Send a signal to containers.
    Kill(cmd::containers::KillArgs),
    /// Remove containers.
    Rm(cmd::containers::RmArgs),
    /// Manage images.
    #[command(subcommand)]
    Image(cmd::image::ImageCommand),
    /// OCI runtime commands, a drop-in for runc and crun.
    Oci(cmd::oci::OciArgs),
    /// The microVM monitor process (started by the microvm tier).
    #[command(hide = true)]
    Vmm(cmd::vmm::VmmArgs),
}

fn main() -> ExitCode {
    // The microVM monitor (one process per VM) skips clap and the full
    // logging setup to stay small in memory; see cmd/vmm.rs.
    if let Some(code) = cmd::vmm::fast_path() {
        return code;
    }
    // `evoke oci …` runs several times per container (create, start,
    // delete), so it gets a parser of its own: building the whole command
    // tree costs more than the command itself.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new("oci")) {
        return report(cmd::oci::main_fast());
    }
    let cli = Cli::parse();
    if matches!(cli.command, Command::Exec(_)) {
        // The exec'd process is a clone of this one inside a running
        // container, whose processes can see it (CVE-2019-5736): run from a
        // copy of the binary that nobody can write. `run` needs no copy: its
        // container gets a pid namespace of its own (the tier joins none),
        // where the init is alone until its last exec, which goes through
        // the sealed trampoline, as for `evoke oci create`.
        if let Err(e) = evoke_container::selfexe::protect() {
            return report(Err(e.into()));
        }
    }
    init_logging(&cli.global.log);
    let result = match cli.command {
        Command::Server(a) => cmd::server::main(&cli.global, a),
        Command::Agent(a) => cmd::agent::main(&cli.global, a),
        Command::Run(a) => cmd::run::main(&cli.global, a),
        Command::Ps(a) => cmd::containers::ps(&cli.global, a),
        Command::Logs(a) => cmd::containers::logs(&cli.global, a),
        Command::Exec(a) => cmd::containers::exec(&cli.global, a),
        Command::Stop(a) => cmd::containers::stop(&cli.global, a),
        Command::Kill(a) => cmd::containers::kill(&cli.global, a),
        Command::Rm(a) => cmd::containers::rm(&cli.global, a),
        Command::Image(c) => cmd::image::main(&cli.global, c),
        Command::Oci(a) => cmd::oci::main(&cli.global, a),
        Command::Vmm(a) => cmd::vmm::main(&cli.global, a),
    };
    report(result)
}

/// The process exit code for a command's result; errors are printed.
fn report(result: anyhow::Result<u8>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line, with the chain of causes, as a CLI user expects.
            eprintln!("evoke: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Structured logs go to stderr so that stdout stays the workload's. A bare
/// level (the default `info`) skips building an EnvFilter, which short
/// commands would otherwise pay for on every start.
pub(crate) fn init_logging(filter: &str) {
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    if let Ok(level) = filter.parse::<tracing_subscriber::filter::LevelFilter>() {
        builder.with_max_level(level).init();
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    builder.with_env_filter(filter).init();
}
