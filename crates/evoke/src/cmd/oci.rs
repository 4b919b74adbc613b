//! `evoke oci …`: the OCI runtime command line, a drop-in for runc and crun.

use crate::Global;

#[derive(clap::Args, Debug)]
pub struct OciArgs {
    /// Directory for container state (runc's --root).
    #[arg(long, default_value = "/run/evoke/oci")]
    pub root: std::path::PathBuf,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

pub fn main(_g: &Global, _a: OciArgs) -> anyhow::Result<u8> {
    anyhow::bail!("oci commands are not wired yet")
}
