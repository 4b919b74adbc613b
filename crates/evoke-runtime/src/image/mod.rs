//! The image store: content-addressed blobs, layers unpacked once and shared,
//! and an index of images with their tags.
//!
//! Layout under `DATA_DIR/images/`:
//! - `blobs/sha256/<hex>`: manifests, configs and layer blobs, by digest;
//! - `layers/<diff-id-hex>/`: each layer unpacked once, whiteouts already in
//!   overlayfs form, used directly as an overlay lowerdir;
//! - `index.json`: the images (manifest digest) and their tags;
//! - `tmp/`: staging for imports, renamed into place only when all is verified,
//!   so a failed import leaves the store as it was.
//!
//! Start at [`ImageStore`]: [`ImageStore::import`], [`ImageStore::build_dir`],
//! [`ImageStore::resolve`], [`ImageStore::list`], [`ImageStore::remove`].

mod archive;
mod build;
mod digest;
mod unpack;

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::image::{ImageConfiguration, ImageManifest};
use serde::{Deserialize, Serialize};

pub use build::DEFAULT_PATH;
pub use digest::sha256_hex;

/// Everything that can go wrong with images. Messages name the image, file or digest.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image not found: {0}")]
    NotFound(String),
    // The cause is in the message, not a `source`, so `{:#}` prints it once.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    /// The archive is damaged, truncated or inconsistent.
    #[error("corrupt image archive {file}: {reason}")]
    Corrupt { file: PathBuf, reason: String },
    #[error("unsupported image archive {file}: {reason}")]
    Unsupported { file: PathBuf, reason: String },
    #[error("image reference {0:?} matches more than one image; use more of the id")]
    Ambiguous(String),
    #[error("invalid image reference {0:?}")]
    InvalidReference(String),
    #[error("image store {path} is damaged: {reason}")]
    Store { path: PathBuf, reason: String },
}

impl ImageError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: io::Error) -> Self {
        ImageError::Io {
            path: path.into(),
            error,
        }
    }
}

impl From<ImageError> for crate::RuntimeError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::NotFound(r) => crate::RuntimeError::ImageNotFound(r),
            other => crate::RuntimeError::tier("image store", other),
        }
    }
}

pub type Result<T> = std::result::Result<T, ImageError>;

/// One image as stored in `index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct IndexEntry {
    /// `sha256:<hex>` of the manifest blob.
    manifest: String,
    /// Full references, `name:tag`.
    tags: Vec<String>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Index {
    images: Vec<IndexEntry>,
}

/// A resolved image, ready to run.
#[derive(Debug, Clone)]
pub struct Image {
    /// The config digest (`sha256:<hex>`), Docker's "IMAGE ID".
    pub id: String,
    pub manifest_digest: String,
    pub tags: Vec<String>,
    pub config: ImageConfiguration,
    /// Unpacked layer directories, bottom layer first.
    pub layer_dirs: Vec<PathBuf>,
    /// Sum of the layer blob sizes.
    pub size: u64,
}

impl Image {
    /// The first 12 hex digits of the id, as `docker images` shows it.
    pub fn short_id(&self) -> &str {
        let hex = self.id.strip_prefix("sha256:").unwrap_or(&self.id);
        &hex[..hex.len().min(12)]
    }
}

/// Normalise `busybox` to `busybox:latest`; keep digests and ids as they are.
pub fn normalize_reference(reference: &str) -> Result<String> {
    if reference.is_empty()
        || reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ImageError::InvalidReference(reference.to_string()));
    }
    if reference.contains('@') {
        return Ok(reference.to_string());
    }
    // Docker Hub names are shown short, as `docker images` does.
    let reference = reference
        .strip_prefix("docker.io/library/")
        .or_else(|| reference.strip_prefix("docker.io/"))
        .unwrap_or(reference);
    let last = reference.rsplit('/').next().unwrap_or(reference);
    if last.contains(':') {
        Ok(reference.to_string())
    } else {
        Ok(format!("{reference}:latest"))
    }
}

/// Split `repo:tag` for display (`<none>` for untagged).
pub fn split_reference(reference: &str) -> (&str, &str) {
    let slash = reference.rfind('/').map(|i| i + 1).unwrap_or(0);
    match reference[slash..].rfind(':') {
        Some(i) => (&reference[..slash + i], &reference[slash + i + 1..]),
        None => (reference, "<none>"),
    }
}

/// Options for [`ImageStore::import`] and [`ImageStore::build_dir`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Draw per-layer progress bars on stderr (hidden when it is not a terminal).
    pub progress: bool,
}

/// The image store rooted at `DATA_DIR/images`.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// Open (creating if needed) the store under `data_dir/images`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let root = data_dir.join("images");
        for d in [
            root.join("blobs/sha256"),
            root.join("layers"),
            root.join("tmp"),
        ] {
            fs::create_dir_all(&d).map_err(|e| ImageError::io(&d, e))?;
        }
        Ok(ImageStore { root })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.root.join("blobs/sha256").join(hex)
    }

    pub(crate) fn layer_path(&self, diff_id: &str) -> PathBuf {
        let hex = diff_id.strip_prefix("sha256:").unwrap_or(diff_id);
        self.root.join("layers").join(hex)
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    /// Take the store's lock; imports and removals hold it while they change
    /// the index, blobs or layers.
    fn lock(&self) -> Result<nix::fcntl::Flock<fs::File>> {
        let path = self.root.join("lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ImageError::io(&path, e))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| ImageError::io(&path, e.into()))
    }

    fn read_index(&self) -> Result<Index> {
        let path = self.index_path();
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ImageError::Store {
                path: path.clone(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(ImageError::io(&path, e)),
        }
    }

    fn write_index(&self, index: &Index) -> Result<()> {
        let path = self.index_path();
        let tmp = self.root.join("index.json.tmp");
        let bytes = serde_json::to_vec_pretty(index).map_err(|e| ImageError::Store {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        fs::write(&tmp, bytes).map_err(|e| ImageError::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| ImageError::io(&path, e))
    }

    fn read_manifest(&self, digest: &str) -> Result<ImageManifest> {
        let path = self.blob_path(digest);
        let bytes = fs::read(&path).map_err(|e| ImageError::io(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Store {
            path,
            reason: format!("manifest: {e}"),
        })
    }

    fn read_config(&self, digest: &str) -> Result<ImageConfiguration> {
        let path = self.blob_path(digest);
        let bytes = fs::read(&path).map_err(|e| ImageError::io(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Store {
            path,
            reason: format!("config: {e}"),
        })
    }

    fn load(&self, entry: &IndexEntry) -> Result<Image> {
        let manifest = self.read_manifest(&entry.manifest)?;
        let id = manifest.config().digest().to_string();
        let config = self.read_config(&id)?;
        let layer_dirs = config
            .rootfs()
            .diff_ids()
            .iter()
            .map(|d| self.layer_path(d))
            .collect();
        let size = manifest.layers().iter().map(|l| l.size()).sum();
        Ok(Image {
            id,
            manifest_digest: entry.manifest.clone(),
            tags: entry.tags.clone(),
            config,
            layer_dirs,
            size,
        })
    }

    /// All images, newest first.
    pub fn list(&self) -> Result<Vec<Image>> {
        let index = self.read_index()?;
        let mut out = index
            .images
            .iter()
            .map(|e| self.load(e))
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| b.config.created().cmp(a.config.created()));
        Ok(out)
    }

    /// Find an image by `name[:tag]`, `name@sha256:…` (manifest digest),
    /// `sha256:…` or a unique prefix of its id (≥ 4 hex digits, as Docker).
    pub fn resolve(&self, reference: &str) -> Result<Image> {
        let index = self.read_index()?;
        self.resolve_in(&index, reference)
            .and_then(|e| self.load(&index.images[e]))
    }

    fn resolve_in(&self, index: &Index, reference: &str) -> Result<usize> {
        let full = normalize_reference(reference)?;
        for (i, e) in index.images.iter().enumerate() {
            if e.tags.contains(&full) {
                return Ok(i);
            }
        }
        if let Some((_, digest)) = reference.split_once('@') {
            if let Some(i) = index.images.iter().position(|e| e.manifest == digest) {
                return Ok(i);
            }
        }
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hex = hex.to_ascii_lowercase();
            let mut found = BTreeSet::new();
            for (i, e) in index.images.iter().enumerate() {
                let m = self.read_manifest(&e.manifest)?;
                let id = m.config().digest().digest().to_string();
                let mhex = e.manifest.strip_prefix("sha256:").unwrap_or(&e.manifest);
                if id.starts_with(&hex) || mhex.starts_with(&hex) {
                    found.insert(i);
                }
            }
            match found.len() {
                0 => {}
                1 => return Ok(*found.iter().next().expect("one element")),
                _ => return Err(ImageError::Ambiguous(reference.to_string())),
            }
        }
        Err(ImageError::NotFound(reference.to_string()))
    }

    /// Remove a tag, or a whole image when given its id. An image left with
    /// no tags is deleted, with the blobs and layers no other image uses.
    /// Returns the ids of images deleted.
    pub fn remove(&self, reference: &str) -> Result<Vec<String>> {
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let i = self.resolve_in(&index, reference)?;
        let full = normalize_reference(reference)?;
        let entry = &mut index.images[i];
        let by_tag = entry.tags.iter().position(|t| *t == full);
        match by_tag {
            Some(t) if entry.tags.len() > 1 => {
                entry.tags.remove(t);
                self.write_index(&index)?;
                return Ok(Vec::new());
            }
            _ => {}
        }
        let removed = index.images.remove(i);
        self.write_index(&index)?;
        let gone = self.load(&removed)?;
        self.collect_garbage(&index)?;
        Ok(vec![gone.id])
    }

    /// Delete blobs and layers that no image in `index` references.
    fn collect_garbage(&self, index: &Index) -> Result<()> {
        let mut keep_blobs = BTreeSet::new();
        let mut keep_layers = BTreeSet::new();
        for e in &index.images {
            let m = self.read_manifest(&e.manifest)?;
            keep_blobs.insert(hex_of(&e.manifest));
            keep_blobs.insert(m.config().digest().digest().to_string());
            for l in m.layers() {
                keep_blobs.insert(l.digest().digest().to_string());
            }
            let c = self.read_config(m.config().digest().as_ref())?;
            for d in c.rootfs().diff_ids() {
                keep_layers.insert(hex_of(d));
            }
        }
        for (dir, keep) in [
            (self.root.join("blobs/sha256"), &keep_blobs),
            (self.root.join("layers"), &keep_layers),
        ] {
            let rd = fs::read_dir(&dir).map_err(|e| ImageError::io(&dir, e))?;
            for ent in rd {
                let ent = ent.map_err(|e| ImageError::io(&dir, e))?;
                let name = ent.file_name().to_string_lossy().into_owned();
                if keep.contains(&name) {
                    continue;
                }
                let p = ent.path();
                tracing::debug!(path = %p.display(), "removing unreferenced image data");
                let r = if p.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                r.map_err(|e| ImageError::io(&p, e))?;
            }
        }
        Ok(())
    }

    /// Record `manifest` under `tags` in the index (moving tags off other images).
    fn add_to_index(&self, manifest: &str, tags: &[String]) -> Result<()> {
        let mut index = self.read_index()?;
        for e in index.images.iter_mut() {
            e.tags.retain(|t| !tags.contains(t));
        }
        match index.images.iter_mut().find(|e| e.manifest == manifest) {
            Some(e) => {
                for t in tags {
                    if !e.tags.contains(t) {
                        e.tags.push(t.clone());
                    }
                }
            }
            None => index.images.push(IndexEntry {
                manifest: manifest.to_string(),
                tags: tags.to_vec(),
            }),
        }
        self.write_index(&index)
    }
}

fn hex_of(digest: &str) -> String {
    digest.strip_prefix("sha256:").unwrap_or(digest).to_string()
}

/// `12 seconds ago`, `3 hours ago`: Docker's CREATED column.
pub fn human_age(created: Option<&str>) -> String {
    let Some(c) = created.and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok()) else {
        return "N/A".to_string();
    };
    let secs = (chrono::Utc::now() - c.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    human_duration(secs as u64) + " ago"
}

/// `About a minute`, `5 hours`, like Docker's units.HumanDuration.
pub fn human_duration(secs: u64) -> String {
    match secs {
        0 => "Less than a second".into(),
        1 => "1 second".into(),
        s if s < 60 => format!("{s} seconds"),
        s if s < 120 => "About a minute".into(),
        s if s < 3600 => format!("{} minutes", s / 60),
        s if s < 7200 => "About an hour".into(),
        s if s < 48 * 3600 => format!("{} hours", s / 3600),
        s if s < 14 * 86400 => format!("{} days", s / 86400),
        s if s < 60 * 86400 => format!("{} weeks", s / (7 * 86400)),
        s if s < 365 * 86400 => format!("{} months", s / (30 * 86400)),
        s => format!("{} years", s / (365 * 86400)),
    }
}

/// `1.2MB`, `56kB`: Docker's SIZE column (decimal units).
pub fn human_size(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
            + units[u]
    }
}

#[cfg(test)]
mod tests;
