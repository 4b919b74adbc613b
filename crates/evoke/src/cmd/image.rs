//! `evoke image import|build-dir|ls|rm`.

use std::io::{IsTerminal, Write};

use anyhow::{bail, Context};
use evoke_runtime::image::{human_age, human_size, split_reference, ImageStore, ImportOptions};

use crate::cmd::run::tiers;
use crate::Global;

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Import an OCI image layout or a `docker save` archive (`-` reads stdin).
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

pub fn main(g: &Global, c: ImageCommand) -> anyhow::Result<u8> {
    let store = ImageStore::open(&g.data_dir)?;
    let opts = ImportOptions {
        progress: std::io::stderr().is_terminal(),
    };
    match c {
        ImageCommand::Import { file } => {
            // `docker save IMG | evoke image import -`: spool stdin to a file
            // in the store's tmp dir (removed below), then import that.
            let spooled = (file.as_os_str() == "-").then(|| {
                store
                    .root()
                    .join("tmp")
                    .join(format!("stdin-{}.tar", std::process::id()))
            });
            if let Some(path) = &spooled {
                let mut f = std::fs::File::create(path)
                    .with_context(|| format!("create {}", path.display()))?;
                std::io::copy(&mut std::io::stdin().lock(), &mut f).context("read stdin")?;
            }
            let file = spooled.clone().unwrap_or(file);
            let imported = store.import(&file, &opts);
            if let Some(path) = &spooled {
                let _ = std::fs::remove_file(path);
            }
            for img in imported? {
                let names = if img.tags.is_empty() {
                    img.id.clone()
                } else {
                    img.tags.join(", ")
                };
                println!("Loaded image: {names}");
            }
        }
        ImageCommand::BuildDir { dir, tag } => {
            let img = store.build_dir(&dir, &tag, &opts)?;
            println!("{}", img.id);
        }
        ImageCommand::Ls => {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:<40}{:<12}{:<16}{:<24}SIZE",
                "REPOSITORY", "TAG", "IMAGE ID", "CREATED"
            )?;
            for img in store.list()? {
                let created = human_age(img.config.created().as_deref());
                let size = human_size(img.size);
                let refs: Vec<(String, String)> = if img.tags.is_empty() {
                    vec![("<none>".into(), "<none>".into())]
                } else {
                    img.tags
                        .iter()
                        .map(|t| {
                            let (r, t) = split_reference(t);
                            (r.to_string(), t.to_string())
                        })
                        .collect()
                };
                for (repo, tag) in refs {
                    writeln!(
                        out,
                        "{:<40}{:<12}{:<16}{:<24}{}",
                        repo,
                        tag,
                        img.short_id(),
                        created,
                        size
                    )?;
                }
            }
        }
        ImageCommand::Rm { images } => {
            for r in images {
                let img = store.resolve(&r)?;
                // Like Docker: an image a container uses stays.
                for t in tiers(&g.data_dir)? {
                    for s in t.list()? {
                        let uses = s
                            .image
                            .as_deref()
                            .and_then(|i| store.resolve(i).ok())
                            .is_some_and(|i| i.id == img.id);
                        if uses && img.tags.len() <= 1 {
                            bail!(
                                "image {r} is in use by container {}: remove the container first",
                                &s.id[..12.min(s.id.len())]
                            );
                        }
                    }
                }
                let deleted = store.remove(&r)?;
                println!("Untagged: {r}");
                for d in deleted {
                    println!("Deleted: {d}");
                }
            }
        }
    }
    Ok(0)
}
