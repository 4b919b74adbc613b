//! `evoke ps|logs|exec|stop|kill|rm`: manage containers made by `evoke run`.

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

pub fn ps(_g: &Global, _a: PsArgs) -> anyhow::Result<u8> {
    anyhow::bail!("ps is not wired yet")
}
pub fn logs(_g: &Global, _a: LogsArgs) -> anyhow::Result<u8> {
    anyhow::bail!("logs is not wired yet")
}
pub fn exec(_g: &Global, _a: ExecArgs) -> anyhow::Result<u8> {
    anyhow::bail!("exec is not wired yet")
}
pub fn stop(_g: &Global, _a: StopArgs) -> anyhow::Result<u8> {
    anyhow::bail!("stop is not wired yet")
}
pub fn kill(_g: &Global, _a: KillArgs) -> anyhow::Result<u8> {
    anyhow::bail!("kill is not wired yet")
}
pub fn rm(_g: &Global, _a: RmArgs) -> anyhow::Result<u8> {
    anyhow::bail!("rm is not wired yet")
}
