//! `evoke image build-dir DIR --tag NAME`: a directory becomes a one-layer
//! image, with no registry and no Dockerfile.

use std::fs;
use std::io::BufWriter;
use std::path::Path;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, HistoryBuilder, ImageConfigurationBuilder,
    ImageManifestBuilder, MediaType, Os, RootFsBuilder,
};

use super::archive::{parse_digest, PreparedImage, PreparedLayer};
use super::digest::{sha256_hex, HashingWriter};
use super::{normalize_reference, Image, ImageError, ImageStore, ImportOptions, Result};

/// The PATH Docker gives images that set none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ImageStore {
    /// Make an image of `dir`'s contents (one uncompressed layer, Cmd
    /// `["/bin/sh"]`, Docker's default PATH) and tag it `tag`.
    pub fn build_dir(&self, dir: &Path, tag: &str, opts: &ImportOptions) -> Result<Image> {
        let tag = normalize_reference(tag)?;
        if tag.contains('@') {
            return Err(ImageError::InvalidReference(tag));
        }
        let meta = fs::metadata(dir).map_err(|e| ImageError::io(dir, e))?;
        if !meta.is_dir() {
            return Err(ImageError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            ));
        }
        let staging = self.staging("build-")?;
        let layer_path = staging.path().join("layer.tar");
        let f = fs::File::create(&layer_path).map_err(|e| ImageError::io(&layer_path, e))?;
        let mut builder = tar::Builder::new(HashingWriter::new(BufWriter::new(f)));
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Complete);
        builder
            .append_dir_all(".", dir)
            .map_err(|e| ImageError::io(dir, e))?;
        let hashing = builder
            .into_inner()
            .map_err(|e| ImageError::io(&layer_path, e))?;
        let (_, diff_id, size) = hashing
            .finish()
            .map_err(|e| ImageError::io(&layer_path, e))?;

        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let bad = |e: oci_spec::OciSpecError| ImageError::Store {
            path: dir.to_path_buf(),
            reason: format!("building image config: {e}"),
        };
        let config = ImageConfigurationBuilder::default()
            .created(now.clone())
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .config(
                ConfigBuilder::default()
                    .env(vec![DEFAULT_PATH.to_string()])
                    .cmd(vec!["/bin/sh".to_string()])
                    .build()
                    .map_err(bad)?,
            )
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![diff_id.clone()])
                    .build()
                    .map_err(bad)?,
            )
            .history(vec![HistoryBuilder::default()
                .created(now)
                .created_by(format!("evoke image build-dir {}", dir.display()))
                .build()
                .map_err(bad)?])
            .build()
            .map_err(bad)?;
        let config_bytes = serde_json::to_vec(&config).map_err(|e| ImageError::Store {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config_bytes.len() as u64,
                parse_digest(dir, &sha256_hex(&config_bytes))?,
            ))
            .layers(vec![Descriptor::new(
                MediaType::ImageLayer,
                size,
                parse_digest(dir, &diff_id)?,
            )])
            .build()
            .map_err(bad)?;
        let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| ImageError::Store {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let image = PreparedImage {
            manifest_bytes,
            config_bytes,
            config,
            layers: vec![PreparedLayer {
                digest: diff_id,
                path: layer_path,
                size,
            }],
            tags: vec![tag],
        };
        let mut out = self.commit(dir, vec![image], staging.path(), opts)?;
        out.pop()
            .ok_or_else(|| ImageError::NotFound(dir.display().to_string()))
    }
}
