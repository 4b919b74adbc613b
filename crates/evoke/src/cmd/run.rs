//! `evoke run`: run a command from an image, like `docker run`.

use crate::Global;

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
    /// The image.
    pub image: String,
    /// Command and arguments (default: the image's Entrypoint and Cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

pub fn main(_global: &Global, _args: RunArgs) -> anyhow::Result<u8> {
    anyhow::bail!("run is not wired yet")
}
