//! `evoke image import|build-dir|ls|rm`.

use crate::Global;

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Import an OCI image layout or a `docker save` archive.
    Import { file: std::path::PathBuf },
    /// Turn a directory into a one-layer image.
    BuildDir {
        dir: std::path::PathBuf,
        #[arg(long)]
        tag: String,
    },
    /// List images.
    Ls,
    /// Remove images.
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
}

pub fn main(_g: &Global, _c: ImageCommand) -> anyhow::Result<u8> {
    anyhow::bail!("image commands are not wired yet")
}
