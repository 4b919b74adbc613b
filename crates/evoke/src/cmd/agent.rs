//! `evoke agent`: join this machine to a server as a node.

use crate::Global;

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The server's URL, e.g. https://127.0.0.1:6443.
    #[arg(long)]
    pub server: String,
    /// The join token printed by the server.
    #[arg(long, env = "EVOKE_TOKEN")]
    pub token: String,
    /// This node's name (default: the hostname).
    #[arg(long)]
    pub node_name: Option<String>,
}

pub fn main(_global: &Global, _args: AgentArgs) -> anyhow::Result<u8> {
    anyhow::bail!("the agent is not wired yet")
}
