//! `evoke image import`: OCI image-layout tarballs and `docker save` /
//! `podman save` archives.
//!
//! The archive is unpacked into a staging directory under `images/tmp`, every
//! blob is checked against its digest and every layer against its diff_id
//! while it is unpacked, and only then are blobs, layers and tags moved into
//! the store. Any failure drops the staging directory, so the store is left
//! as it was.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use oci_spec::image::{
    Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest, ImageManifestBuilder,
    MediaType,
};
use serde::Deserialize;

use super::digest::{sha256_file, sha256_hex, sniff_reader, Compression, HashingReader};
use super::unpack::unpack_layer;
use super::{normalize_reference, Image, ImageError, ImageStore, ImportOptions, Result};

/// An image whose blobs are staged and verified, ready to be committed.
pub(crate) struct PreparedImage {
    pub manifest_bytes: Vec<u8>,
    pub config_bytes: Vec<u8>,
    pub config: ImageConfiguration,
    /// Layer blobs in staging, bottom first, with their digests.
    pub layers: Vec<PreparedLayer>,
    pub tags: Vec<String>,
}

pub(crate) struct PreparedLayer {
    pub digest: String,
    pub path: PathBuf,
    pub size: u64,
}

fn corrupt(file: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::Corrupt {
        file: file.to_path_buf(),
        reason: reason.into(),
    }
}

impl ImageStore {
    /// Import every image in the archive `file`. Returns them as stored.
    pub fn import(&self, file: &Path, opts: &ImportOptions) -> Result<Vec<Image>> {
        let staging = self.staging("import-")?;
        let extracted = staging.path().join("archive");
        fs::create_dir_all(&extracted).map_err(|e| ImageError::io(&extracted, e))?;
        extract_outer(file, &extracted, opts)?;
        let images = if extracted.join("manifest.json").is_file() {
            read_docker_archive(file, &extracted)?
        } else if extracted.join("index.json").is_file() {
            read_oci_layout(file, &extracted)?
        } else {
            return Err(ImageError::Unsupported {
                file: file.to_path_buf(),
                reason: "neither an OCI image layout (index.json) nor a docker save archive (manifest.json)".into(),
            });
        };
        if images.is_empty() {
            return Err(corrupt(file, "the archive holds no images"));
        }
        self.commit(file, images, staging.path(), opts)
    }

    pub(crate) fn staging(&self, prefix: &str) -> Result<tempfile::TempDir> {
        let tmp = self.root.join("tmp");
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&tmp)
            .map_err(|e| ImageError::io(&tmp, e))
    }

    /// Unpack and verify the layers into `staging/layers`, then move blobs,
    /// layers and tags into the store under the store lock.
    pub(crate) fn commit(
        &self,
        file: &Path,
        images: Vec<PreparedImage>,
        staging: &Path,
        opts: &ImportOptions,
    ) -> Result<Vec<Image>> {
        let _lock = self.lock()?;
        let staged_layers = staging.join("layers");
        fs::create_dir_all(&staged_layers).map_err(|e| ImageError::io(&staged_layers, e))?;
        // Verify everything before touching the store.
        for img in &images {
            let diff_ids = img.config.rootfs().diff_ids();
            if diff_ids.len() != img.layers.len() {
                return Err(corrupt(
                    file,
                    format!(
                        "config lists {} diff_ids but the manifest has {} layers",
                        diff_ids.len(),
                        img.layers.len()
                    ),
                ));
            }
            for (layer, diff_id) in img.layers.iter().zip(diff_ids) {
                Digest::from_str(diff_id)
                    .map_err(|e| corrupt(file, format!("diff_id {diff_id:?}: {e}")))?;
                let hex = diff_id.trim_start_matches("sha256:");
                let target = staged_layers.join(hex);
                // Unpack a layer once; when the store or this import already
                // has it, only check that the blob really is that layer.
                let unpack_to = if self.layer_path(diff_id).is_dir() || target.is_dir() {
                    None
                } else {
                    Some(target)
                };
                let actual = stage_layer(file, layer, unpack_to.as_deref(), opts)?;
                if actual != *diff_id {
                    return Err(corrupt(
                        file,
                        format!(
                            "layer {} unpacks to {actual}, but the config says {diff_id}",
                            layer.digest
                        ),
                    ));
                }
            }
        }
        // Now move it all in. Blobs and layers first, the index last, so the
        // index never names something missing.
        let mut out = Vec::new();
        for img in images {
            let manifest_digest = sha256_hex(&img.manifest_bytes);
            self.put_blob_bytes(&manifest_digest, &img.manifest_bytes)?;
            self.put_blob_bytes(&sha256_hex(&img.config_bytes), &img.config_bytes)?;
            for layer in &img.layers {
                let dst = self.blob_path(&layer.digest);
                if !dst.exists() {
                    fs::rename(&layer.path, &dst).map_err(|e| ImageError::io(&dst, e))?;
                }
            }
            for diff_id in img.config.rootfs().diff_ids() {
                let hex = diff_id.trim_start_matches("sha256:");
                let src = staged_layers.join(hex);
                let dst = self.layer_path(diff_id);
                if src.is_dir() && !dst.exists() {
                    fs::rename(&src, &dst).map_err(|e| ImageError::io(&dst, e))?;
                }
            }
            self.add_to_index(&manifest_digest, &img.tags)?;
            tracing::debug!(manifest = %manifest_digest, tags = ?img.tags, "image stored");
            if !out.contains(&manifest_digest) {
                out.push(manifest_digest);
            }
        }
        let index = self.read_index()?;
        out.iter()
            .map(|m| {
                let e = index
                    .images
                    .iter()
                    .find(|e| e.manifest == *m)
                    .ok_or_else(|| ImageError::NotFound(m.clone()))?;
                self.load(e)
            })
            .collect()
    }

    fn put_blob_bytes(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let dst = self.blob_path(digest);
        if dst.exists() {
            return Ok(());
        }
        let tmp = self.root.join("tmp").join(format!(
            "blob-{}-{}",
            std::process::id(),
            digest.trim_start_matches("sha256:")
        ));
        fs::write(&tmp, bytes).map_err(|e| ImageError::io(&tmp, e))?;
        fs::rename(&tmp, &dst).map_err(|e| ImageError::io(&dst, e))
    }
}

/// Decompress the layer blob, hash the tar stream and, if `dest` is given,
/// unpack it there. Returns the diff_id (`sha256:` of the uncompressed tar).
fn stage_layer(
    file: &Path,
    layer: &PreparedLayer,
    dest: Option<&Path>,
    opts: &ImportOptions,
) -> Result<String> {
    let f = fs::File::open(&layer.path).map_err(|e| ImageError::io(&layer.path, e))?;
    let short = layer.digest.trim_start_matches("sha256:");
    let bar = progress_bar(
        opts,
        layer.size,
        format!("layer {}", &short[..short.len().min(12)]),
    );
    let mut r = BufReader::with_capacity(1 << 16, bar.wrap_read(f));
    let comp = sniff_reader(&mut r).map_err(|e| ImageError::io(&layer.path, e))?;
    let dec = comp
        .decoder(r)
        .map_err(|e| corrupt(file, format!("layer {}: {e}", layer.digest)))?;
    let mut hashing = HashingReader::new(dec);
    if let Some(dest) = dest {
        fs::create_dir_all(dest).map_err(|e| ImageError::io(dest, e))?;
        unpack_layer(&mut hashing, dest, file)?;
    }
    let (diff_id, _) = hashing
        .finish()
        .map_err(|e| corrupt(file, format!("layer {}: {e}", layer.digest)))?;
    bar.finish_and_clear();
    Ok(diff_id)
}

/// A bytes bar on stderr, or a hidden one (indicatif also hides it when
/// stderr is not a terminal).
fn progress_bar(opts: &ImportOptions, total: u64, msg: String) -> indicatif::ProgressBar {
    if !opts.progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:<20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg);
    bar
}

/// Reduce a path inside an archive to its normal components, refusing `..`.
fn archive_rel(file: &Path, p: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            _ => {
                return Err(corrupt(
                    file,
                    format!("entry {} leaves the archive", p.display()),
                ))
            }
        }
    }
    Ok(out)
}

/// Unpack the outer archive (maybe gzip or zstd compressed) into `dest`.
/// Only directories, regular files and links between them are kept.
fn extract_outer(file: &Path, dest: &Path, opts: &ImportOptions) -> Result<()> {
    let f = fs::File::open(file).map_err(|e| ImageError::io(file, e))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = progress_bar(opts, total, "reading archive".into());
    let mut r = BufReader::with_capacity(1 << 16, bar.wrap_read(f));
    let comp = sniff_reader(&mut r).map_err(|e| ImageError::io(file, e))?;
    let dec = comp.decoder(r).map_err(|e| corrupt(file, e.to_string()))?;
    let mut ar = tar::Archive::new(dec);
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut seen_any = false;
    let entries = ar
        .entries()
        .map_err(|e| corrupt(file, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut e = entry.map_err(|e| corrupt(file, format!("reading tar: {e}")))?;
        seen_any = true;
        let path = e
            .path()
            .map_err(|err| corrupt(file, format!("entry path: {err}")))?
            .into_owned();
        let rel = archive_rel(file, &path)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let out = dest.join(&rel);
        let kind = e.header().entry_type();
        if kind.is_dir() {
            fs::create_dir_all(&out).map_err(|err| ImageError::io(&out, err))?;
        } else if kind.is_file() {
            if let Some(parent) = out.parent() {
                fs::create_dir_all(parent).map_err(|err| ImageError::io(parent, err))?;
            }
            let want = e.size();
            let mut w = fs::File::create(&out).map_err(|err| ImageError::io(&out, err))?;
            let got = io::copy(&mut e, &mut w)
                .map_err(|err| corrupt(file, format!("{}: {err}", rel.display())))?;
            if got != want {
                return Err(corrupt(
                    file,
                    format!("{} is truncated ({got} of {want} bytes)", rel.display()),
                ));
            }
        } else if kind.is_symlink() || kind.is_hard_link() {
            let target = e
                .link_name()
                .map_err(|err| corrupt(file, format!("link {}: {err}", rel.display())))?
                .ok_or_else(|| corrupt(file, format!("link {} has no target", rel.display())))?
                .into_owned();
            // Old `docker save` links duplicate layers to each other.
            let resolved = if kind.is_symlink() {
                rel.parent().unwrap_or(Path::new("")).join(target)
            } else {
                target
            };
            links.push((rel, normalize(file, &resolved)?));
        }
    }
    bar.finish_and_clear();
    if !seen_any {
        return Err(corrupt(file, "empty or not a tar archive"));
    }
    for (rel, target) in links {
        let src = dest.join(&target);
        let out = dest.join(&rel);
        if src.is_file() {
            if let Some(parent) = out.parent() {
                fs::create_dir_all(parent).map_err(|err| ImageError::io(parent, err))?;
            }
            fs::hard_link(&src, &out).map_err(|err| ImageError::io(&out, err))?;
        }
    }
    Ok(())
}

/// Resolve `..` lexically, refusing to climb out of the archive.
fn normalize(file: &Path, p: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir if !out.pop() => {
                return Err(corrupt(
                    file,
                    format!("link to {} leaves the archive", p.display()),
                ));
            }
            _ => {}
        }
    }
    Ok(out)
}

fn read_json<T: serde::de::DeserializeOwned>(file: &Path, path: &Path) -> Result<(T, Vec<u8>)> {
    let bytes = fs::read(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => corrupt(
            file,
            format!(
                "{} is missing",
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
        ),
        _ => ImageError::io(path, e),
    })?;
    let v = serde_json::from_slice(&bytes).map_err(|e| {
        corrupt(
            file,
            format!(
                "{}: {e}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
        )
    })?;
    Ok((v, bytes))
}

/// `blobs/sha256/<hex>` of an OCI layout, verified against its descriptor.
fn verified_blob(file: &Path, root: &Path, desc: &Descriptor) -> Result<PathBuf> {
    let digest = desc.digest();
    if digest.algorithm().as_ref() != "sha256" {
        return Err(ImageError::Unsupported {
            file: file.to_path_buf(),
            reason: format!("digest algorithm of {digest} (only sha256)"),
        });
    }
    let path = root.join("blobs/sha256").join(digest.digest());
    if !path.is_file() {
        return Err(corrupt(file, format!("blob {digest} is missing")));
    }
    let (actual, size) = sha256_file(&path).map_err(|e| ImageError::io(&path, e))?;
    if actual != digest.as_ref() {
        return Err(corrupt(file, format!("blob {digest} has digest {actual}")));
    }
    if size != desc.size() {
        return Err(corrupt(
            file,
            format!("blob {digest} is {size} bytes, not {}", desc.size()),
        ));
    }
    Ok(path)
}

fn is_index(mt: &MediaType) -> bool {
    matches!(mt, MediaType::ImageIndex)
        || mt.to_string() == "application/vnd.docker.distribution.manifest.list.v2+json"
}

/// Read every image an OCI image layout's index.json names.
fn read_oci_layout(file: &Path, root: &Path) -> Result<Vec<PreparedImage>> {
    let (index, _): (ImageIndex, _) = read_json(file, &root.join("index.json"))?;
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.split('.').next())
        .unwrap_or("image")
        .to_string();
    let mut out = Vec::new();
    for desc in index.manifests() {
        let tags = oci_tags(desc, &stem)?;
        let manifest_desc = pick_manifest(file, root, desc)?;
        let path = verified_blob(file, root, &manifest_desc)?;
        let (manifest, manifest_bytes): (ImageManifest, _) = read_json(file, &path)?;
        out.push(prepare(file, root, manifest, manifest_bytes, tags, |d| {
            verified_blob(file, root, d)
        })?);
    }
    Ok(out)
}

/// Follow nested indexes down to the linux/amd64 (or only) manifest.
fn pick_manifest(file: &Path, root: &Path, desc: &Descriptor) -> Result<Descriptor> {
    let mut desc = desc.clone();
    for _ in 0..4 {
        if !is_index(desc.media_type()) {
            return Ok(desc);
        }
        let path = verified_blob(file, root, &desc)?;
        let (idx, _): (ImageIndex, _) = read_json(file, &path)?;
        let chosen = idx
            .manifests()
            .iter()
            .find(|m| {
                m.platform().as_ref().is_none_or(|p| {
                    p.os().to_string() == "linux" && p.architecture().to_string() == "amd64"
                })
            })
            .ok_or_else(|| ImageError::Unsupported {
                file: file.to_path_buf(),
                reason: format!("index {} has no linux/amd64 image", desc.digest()),
            })?;
        desc = chosen.clone();
    }
    Err(corrupt(file, "image indexes nested too deeply"))
}

fn oci_tags(desc: &Descriptor, stem: &str) -> Result<Vec<String>> {
    let ann = desc.annotations().clone().unwrap_or_default();
    if let Some(name) = ann.get("io.containerd.image.name") {
        return Ok(vec![normalize_reference(name)?]);
    }
    match ann.get("org.opencontainers.image.ref.name") {
        // A bare tag ("latest"): name the image after the archive file.
        Some(r) if !r.contains(':') && !r.contains('/') => Ok(vec![format!("{stem}:{r}")]),
        Some(r) => Ok(vec![normalize_reference(r)?]),
        None => Ok(Vec::new()),
    }
}

/// Check the config and collect the layer blobs of `manifest`.
fn prepare(
    file: &Path,
    _root: &Path,
    manifest: ImageManifest,
    manifest_bytes: Vec<u8>,
    tags: Vec<String>,
    blob: impl Fn(&Descriptor) -> Result<PathBuf>,
) -> Result<PreparedImage> {
    let config_path = blob(manifest.config())?;
    let (config, config_bytes): (ImageConfiguration, _) = read_json(file, &config_path)?;
    let mut layers = Vec::new();
    for l in manifest.layers() {
        let path = blob(l)?;
        layers.push(PreparedLayer {
            digest: l.digest().to_string(),
            path,
            size: l.size(),
        });
    }
    Ok(PreparedImage {
        manifest_bytes,
        config_bytes,
        config,
        layers,
        tags,
    })
}

/// One image in a `docker save` manifest.json.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A 64-hex-digit digest in a file name like `<hex>.json` or `blobs/sha256/<hex>`.
fn digest_in_name(name: &str) -> Option<String> {
    let base = name.rsplit('/').next()?;
    let hex = base.strip_suffix(".json").unwrap_or(base);
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("sha256:{hex}"))
}

/// Read a `docker save` / `podman save` archive. It has no manifests of its
/// own, so an OCI manifest is made for each image; the layers are checked
/// through the config's diff_ids.
fn read_docker_archive(file: &Path, root: &Path) -> Result<Vec<PreparedImage>> {
    let (entries, _): (Vec<DockerEntry>, _) = read_json(file, &root.join("manifest.json"))?;
    let mut out = Vec::new();
    let mut layer_cache: HashMap<String, (String, u64, Compression)> = HashMap::new();
    for entry in entries {
        let rel = archive_rel(file, Path::new(&entry.config))?;
        let (config, config_bytes): (ImageConfiguration, _) = read_json(file, &root.join(&rel))?;
        let config_digest = sha256_hex(&config_bytes);
        if let Some(named) = digest_in_name(&entry.config) {
            if named != config_digest {
                return Err(corrupt(
                    file,
                    format!("config {} has digest {config_digest}", entry.config),
                ));
            }
        }
        let mut layers = Vec::new();
        let mut descs = Vec::new();
        for l in &entry.layers {
            let rel = archive_rel(file, Path::new(l))?;
            let path = root.join(&rel);
            if !path.is_file() {
                return Err(corrupt(file, format!("layer {l} is missing")));
            }
            let (digest, size, comp) = match layer_cache.get(l) {
                Some(v) => v.clone(),
                None => {
                    let (digest, size) =
                        sha256_file(&path).map_err(|e| ImageError::io(&path, e))?;
                    let mut head = [0u8; 4];
                    let n = fs::File::open(&path)
                        .and_then(|mut f| f.read(&mut head))
                        .map_err(|e| ImageError::io(&path, e))?;
                    let v = (digest, size, Compression::sniff(&head[..n]));
                    layer_cache.insert(l.clone(), v.clone());
                    v
                }
            };
            if let Some(named) = digest_in_name(l) {
                if named != digest {
                    return Err(corrupt(file, format!("layer {l} has digest {digest}")));
                }
            }
            let mt = match comp {
                Compression::None => MediaType::ImageLayer,
                Compression::Gzip => MediaType::ImageLayerGzip,
                Compression::Zstd => MediaType::ImageLayerZstd,
            };
            descs.push(Descriptor::new(mt, size, parse_digest(file, &digest)?));
            layers.push(PreparedLayer { digest, path, size });
        }
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config_bytes.len() as u64,
                parse_digest(file, &config_digest)?,
            ))
            .layers(descs)
            .build()
            .map_err(|e| corrupt(file, format!("manifest: {e}")))?;
        let manifest_bytes =
            serde_json::to_vec(&manifest).map_err(|e| corrupt(file, format!("manifest: {e}")))?;
        let tags = entry
            .repo_tags
            .unwrap_or_default()
            .iter()
            .map(|t| normalize_reference(t))
            .collect::<Result<Vec<_>>>()?;
        out.push(PreparedImage {
            manifest_bytes,
            config_bytes,
            config,
            layers,
            tags,
        });
    }
    Ok(out)
}

pub(crate) fn parse_digest(file: &Path, d: &str) -> Result<Digest> {
    Digest::from_str(d).map_err(|e| corrupt(file, format!("digest {d}: {e}")))
}
