//! `evoke server`: the control plane, k3s style.

use crate::Global;

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Port for the HTTPS API (0 picks a free one and writes it to the kubeconfig).
    #[arg(long, default_value_t = 6443)]
    pub https_listen_port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_address: String,
    /// Where to write the admin kubeconfig.
    #[arg(long)]
    pub write_kubeconfig: Option<std::path::PathBuf>,
    /// File mode of the kubeconfig, in octal.
    #[arg(long, default_value = "0600")]
    pub write_kubeconfig_mode: String,
    /// Shared secret for joining agents; generated on first start if absent.
    #[arg(long, env = "EVOKE_TOKEN")]
    pub token: Option<String>,
    /// Use etcd (http://HOST:PORT) instead of the embedded SQLite store.
    #[arg(long)]
    pub datastore_endpoint: Option<String>,
    /// Run only the control plane, without a node agent in this process.
    #[arg(long)]
    pub disable_agent: bool,
}

pub fn main(_global: &Global, _args: ServerArgs) -> anyhow::Result<u8> {
    anyhow::bail!("the server is not wired yet")
}
