//! Builds a microVM guest's initramfs: a newc cpio the guest kernel unpacks
//! into its root filesystem. It is made of three concatenated archives, so
//! the expensive parts are built once and reused:
//!
//! 1. the **base** ([`InitramfsBuilder::base`]): `/init` (the static
//!    evoke-guest agent), `/dev/console`, and the guest kernel modules the
//!    agent loads (with their dependencies, from `modules.dep`). Cached in the
//!    cache directory, keyed by the content of the agent and the modules.
//! 2. the **rootfs** ([`InitramfsBuilder::rootfs`]): the image's files under
//!    `/rootfs`, from a directory or from unpacked layers merged in order with
//!    OCI whiteouts applied. Cached when the caller gives a key (an image id).
//! 3. the **spec** ([`spec_part`]): `/evoke/spec.json`, a few hundred bytes.
//!
//! How the VMM uses it (one call per VM):
//! ```no_run
//! # fn demo(spec: &evoke_guest::GuestSpec) -> Result<(), evoke_guest::InitramfsError> {
//! use evoke_guest::initramfs::{GuestBase, InitramfsBuilder, Rootfs, DEFAULT_MODULES};
//! let builder = InitramfsBuilder::new("/var/lib/evoke/vm-cache");
//! let agent = evoke_guest::initramfs::find_agent()?;
//! let base = GuestBase {
//!     agent: &agent,
//!     modules_dir: std::path::Path::new("/lib/modules/6.1.0-56-cloud-amd64"),
//!     modules: DEFAULT_MODULES,
//! };
//! let initrd = builder.build(&base, &Rootfs::Dir("/path/to/rootfs".into()), Some("sha256-of-image"), spec)?;
//! // Either load the parts one after another into guest memory
//! // (initrd.len() bytes in all, via initrd.write_to(&mut writer)) or write one file:
//! initrd.write_file(std::path::Path::new("/tmp/initrd.cpio"))?;
//! # Ok(()) }
//! ```
//! Nothing is compressed: the guest unpacks an uncompressed cpio fastest.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::cpio::{self, CpioWriter, Meta};
use crate::spec::{self, GuestSpec};

/// What the agent loads for a virtio-mmio console channel.
pub const DEFAULT_MODULES: &[&str] = &["virtio_mmio", "virtio_console"];

/// Bumped when the base layout changes, so old cache entries are not reused.
const BASE_FORMAT: &str = "evoke-guest-base-1";

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel module {name} not found in {modules_dir}/modules.dep (is the guest kernel's module tree installed? run scripts/setup)")]
    ModuleNotFound { name: String, modules_dir: PathBuf },
    #[error("the static evoke-guest agent binary was not found (looked at $EVOKE_GUEST_BIN, next to the running binary, and /usr/lib/evoke/evoke-guest); build it with tests/vmhost/build-guest")]
    AgentNotFound,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InitramfsError + 'a {
    move |source| InitramfsError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Where the static agent is: `$EVOKE_GUEST_BIN`, then `evoke-guest` next to
/// the running executable, then `/usr/lib/evoke/evoke-guest`.
pub fn find_agent() -> Result<PathBuf, InitramfsError> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("EVOKE_GUEST_BIN") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("evoke-guest"));
        }
    }
    candidates.push(PathBuf::from("/usr/lib/evoke/evoke-guest"));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or(InitramfsError::AgentNotFound)
}

/// The reusable part's inputs.
#[derive(Debug, Clone, Copy)]
pub struct GuestBase<'a> {
    /// The static evoke-guest binary; becomes `/init`.
    pub agent: &'a Path,
    /// The guest kernel's module tree, `/lib/modules/<version>`.
    pub modules_dir: &'a Path,
    /// Module names (`virtio_mmio` or `virtio-mmio`); dependencies are added.
    pub modules: &'a [&'a str],
}

/// The image's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rootfs {
    /// A directory holding the whole tree.
    Dir(PathBuf),
    /// Unpacked layer directories, lowest first. OCI whiteouts (`.wh.NAME`,
    /// `.wh..wh..opq`) and overlayfs whiteouts (0:0 character devices) in a
    /// layer hide what lower layers hold.
    Layers(Vec<PathBuf>),
}

/// One archive of the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    File(PathBuf),
    Bytes(Vec<u8>),
}

/// A finished initramfs: archives to be placed back to back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initramfs {
    pub parts: Vec<Part>,
}

impl Initramfs {
    /// Total size in bytes.
    pub fn len(&self) -> Result<u64, InitramfsError> {
        let mut total = 0;
        for p in &self.parts {
            total += match p {
                Part::File(f) => fs::metadata(f).map_err(io_err("stat", f))?.len(),
                Part::Bytes(b) => b.len() as u64,
            };
        }
        Ok(total)
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Streams all parts into `w` (for example a slice of guest memory).
    pub fn write_to(&self, w: &mut impl Write) -> Result<u64, InitramfsError> {
        let mut total = 0;
        for p in &self.parts {
            total += match p {
                Part::File(f) => {
                    let mut src = File::open(f).map_err(io_err("open", f))?;
                    io::copy(&mut src, w).map_err(io_err("copy", f))?
                }
                Part::Bytes(b) => {
                    w.write_all(b)
                        .map_err(io_err("write", Path::new("<initramfs>")))?;
                    b.len() as u64
                }
            };
        }
        Ok(total)
    }

    /// Writes the whole initramfs as one file.
    pub fn write_file(&self, path: &Path) -> Result<u64, InitramfsError> {
        let f = File::create(path).map_err(io_err("create", path))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let n = self.write_to(&mut w)?;
        w.flush().map_err(io_err("write", path))?;
        Ok(n)
    }
}

/// The spec archive: `/evoke/spec.json`.
pub fn spec_part(spec: &GuestSpec) -> Vec<u8> {
    let mut w = CpioWriter::new(Vec::new());
    // Writing into a Vec cannot fail for these small, valid entries.
    let _ = w.dir("/evoke", &Meta::root(0o755));
    let _ = w.file(spec::SPEC_PATH, &Meta::root(0o644), &spec.to_json());
    w.finish().unwrap_or_default()
}

/// Resolves module names to paths relative to `modules_dir`, dependencies
/// first, each once, using the kernel's `modules.dep`.
pub fn resolve_modules(modules_dir: &Path, names: &[&str]) -> Result<Vec<String>, InitramfsError> {
    let dep_path = modules_dir.join("modules.dep");
    let text = fs::read_to_string(&dep_path).map_err(io_err("read", &dep_path))?;
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        let name = module_name(module);
        let list = rest.split_whitespace().map(str::to_owned).collect();
        deps.insert(name, (module.to_owned(), list));
    }
    let mut order = Vec::new();
    let mut seen = std::collections::HashSet::new();
    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        seen: &mut std::collections::HashSet<String>,
        order: &mut Vec<String>,
        modules_dir: &Path,
    ) -> Result<(), InitramfsError> {
        let (path, list) = deps
            .get(name)
            .ok_or_else(|| InitramfsError::ModuleNotFound {
                name: name.to_owned(),
                modules_dir: modules_dir.to_path_buf(),
            })?;
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        // modules.dep lists the transitive dependencies; visiting each first
        // (from the end, the way modprobe loads them) yields a valid order.
        for d in list.iter().rev() {
            visit(&module_name(d), deps, seen, order, modules_dir)?;
        }
        order.push(path.clone());
        Ok(())
    }
    for n in names {
        visit(
            &n.replace('-', "_"),
            &deps,
            &mut seen,
            &mut order,
            modules_dir,
        )?;
    }
    Ok(order)
}

/// `kernel/drivers/virtio/virtio-mmio.ko.xz` → `virtio_mmio`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// (path, size, mtime seconds, mtime nanoseconds) of one input file.
type InputStamp = (PathBuf, u64, i64, i64);

/// Builds initramfs parts and keeps the reusable ones in a cache directory.
#[derive(Debug)]
pub struct InitramfsBuilder {
    cache_dir: PathBuf,
    /// (input paths, sizes, mtimes) → cached base, so repeated VMs in one
    /// process skip re-hashing the agent and modules.
    memo: Mutex<HashMap<Vec<InputStamp>, PathBuf>>,
}

impl InitramfsBuilder {
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        InitramfsBuilder {
            cache_dir: cache_dir.into(),
            memo: Mutex::new(HashMap::new()),
        }
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// All three parts for one VM.
    pub fn build(
        &self,
        base: &GuestBase<'_>,
        rootfs: &Rootfs,
        rootfs_key: Option<&str>,
        spec: &GuestSpec,
    ) -> Result<Initramfs, InitramfsError> {
        Ok(Initramfs {
            parts: vec![
                Part::File(self.base(base)?),
                self.rootfs(rootfs, rootfs_key)?,
                Part::Bytes(spec_part(spec)),
            ],
        })
    }

    /// The base archive (agent + modules), from the cache when its inputs'
    /// content is unchanged.
    pub fn base(&self, base: &GuestBase<'_>) -> Result<PathBuf, InitramfsError> {
        let modules = resolve_modules(base.modules_dir, base.modules)?;
        let mut inputs = vec![base.agent.to_path_buf()];
        inputs.extend(modules.iter().map(|m| base.modules_dir.join(m)));
        let mut stamp = Vec::with_capacity(inputs.len());
        for p in &inputs {
            let md = fs::metadata(p).map_err(io_err("stat", p))?;
            stamp.push((p.clone(), md.len(), md.mtime(), md.mtime_nsec()));
        }
        if let Some(hit) = self.memo.lock().ok().and_then(|m| m.get(&stamp).cloned()) {
            if hit.is_file() {
                return Ok(hit);
            }
        }

        let mut h = Sha256::new();
        h.update(BASE_FORMAT);
        for (i, p) in inputs.iter().enumerate() {
            let bytes = fs::read(p).map_err(io_err("read", p))?;
            h.update((i as u64).to_le_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(&bytes);
        }
        let key = hex::encode(&h.finalize()[..12]);
        let path = self.cache_dir.join(format!("base-{key}.cpio"));
        if !path.is_file() {
            tracing::debug!(path = %path.display(), modules = modules.len(), "building guest initramfs base");
            self.write_atomically(&path, |w| write_base(w, base, &modules))?;
        }
        if let Ok(mut m) = self.memo.lock() {
            m.insert(stamp, path.clone());
        }
        Ok(path)
    }

    /// The rootfs archive. With a key it is cached as `rootfs-KEY.cpio`
    /// (the key must identify the content, e.g. an image id); without one it
    /// is built in memory.
    pub fn rootfs(&self, rootfs: &Rootfs, key: Option<&str>) -> Result<Part, InitramfsError> {
        let layers: Vec<PathBuf> = match rootfs {
            Rootfs::Dir(d) => vec![d.clone()],
            Rootfs::Layers(l) => l.clone(),
        };
        let tree = merge_layers(&layers)?;
        match key {
            Some(key) => {
                let safe: String = key
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let path = self.cache_dir.join(format!("rootfs-{safe}.cpio"));
                if !path.is_file() {
                    self.write_atomically(&path, |w| write_tree(w, &tree))?;
                }
                Ok(Part::File(path))
            }
            None => {
                let mut buf = Vec::new();
                write_tree(&mut buf, &tree)?;
                Ok(Part::Bytes(buf))
            }
        }
    }

    fn write_atomically(
        &self,
        path: &Path,
        fill: impl FnOnce(&mut BufWriter<File>) -> Result<(), InitramfsError>,
    ) -> Result<(), InitramfsError> {
        fs::create_dir_all(&self.cache_dir).map_err(io_err("create directory", &self.cache_dir))?;
        let tmp = self.cache_dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            path.file_name().and_then(|n| n.to_str()).unwrap_or("part")
        ));
        let f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let res = fill(&mut w).and_then(|()| w.flush().map_err(io_err("write", &tmp)));
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))
    }
}

fn write_base(
    w: &mut impl Write,
    base: &GuestBase<'_>,
    modules: &[String],
) -> Result<(), InitramfsError> {
    let wr = Path::new("<initramfs base>");
    let mut c = CpioWriter::new(w);
    let dir = Meta::root(0o755);
    for d in [
        "/dev",
        "/proc",
        "/sys",
        "/tmp",
        "/run",
        "/evoke",
        spec::MODULES_DIR,
    ] {
        c.dir(d, &dir).map_err(io_err("write", wr))?;
    }
    c.special(
        "/dev/console",
        &Meta {
            rdev_major: 5,
            rdev_minor: 1,
            ..Meta::root(cpio::S_IFCHR | 0o600)
        },
    )
    .map_err(io_err("write", wr))?;
    add_file(&mut c, "/init", base.agent, 0o755)?;
    let mut list = String::new();
    for m in modules {
        let file = m.rsplit('/').next().unwrap_or(m);
        add_file(
            &mut c,
            &format!("{}/{file}", spec::MODULES_DIR),
            &base.modules_dir.join(m),
            0o644,
        )?;
        list.push_str(file);
        list.push('\n');
    }
    c.file(spec::MODULES_LIST, &Meta::root(0o644), list.as_bytes())
        .map_err(io_err("write", wr))?;
    c.finish().map_err(io_err("write", wr))?;
    Ok(())
}

fn add_file(
    c: &mut CpioWriter<impl Write>,
    name: &str,
    src: &Path,
    mode: u32,
) -> Result<(), InitramfsError> {
    let mut f = File::open(src).map_err(io_err("open", src))?;
    let len = f.metadata().map_err(io_err("stat", src))?.len();
    c.file_from(name, &Meta::root(mode), len, &mut f)
        .map_err(io_err("archive", src))
}

/// One entry of the merged tree: where it comes from and its metadata.
#[derive(Debug, Clone)]
struct Entry {
    src: PathBuf,
    md: fs::Metadata,
}

/// Merges layer directories into one tree keyed by relative path (parents
/// sort before children, so the map's order is a valid archive order).
fn merge_layers(layers: &[PathBuf]) -> Result<BTreeMap<String, Entry>, InitramfsError> {
    let mut tree: BTreeMap<String, Entry> = BTreeMap::new();
    for layer in layers {
        let md = fs::metadata(layer).map_err(io_err("stat", layer))?;
        if !md.is_dir() {
            return Err(InitramfsError::Io {
                op: "use as rootfs",
                path: layer.clone(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        walk(layer, "", &mut tree)?;
    }
    Ok(tree)
}

fn remove_subtree(tree: &mut BTreeMap<String, Entry>, rel: &str, keep_self: bool) {
    let prefix = format!("{rel}/");
    // Every key that starts with `rel` sorts contiguously from `rel` on.
    let doomed: Vec<String> = tree
        .range(rel.to_owned()..)
        .take_while(|(k, _)| k.starts_with(rel))
        .filter(|(k, _)| (k.as_str() == rel && !keep_self) || k.starts_with(&prefix))
        .map(|(k, _)| k.clone())
        .collect();
    for k in doomed {
        tree.remove(&k);
    }
}

fn walk(dir: &Path, rel: &str, tree: &mut BTreeMap<String, Entry>) -> Result<(), InitramfsError> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(io_err("read directory", dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_err("read directory", dir))?;
    names.sort();
    // An opaque marker hides the lower layers' content of this directory.
    if names.iter().any(|n| n == ".wh..wh..opq") && !rel.is_empty() {
        remove_subtree(tree, rel, true);
    }
    for name in names {
        let Some(name) = name.to_str().map(str::to_owned) else {
            tracing::warn!(dir = %dir.display(), "skipping a file name that is not UTF-8");
            continue;
        };
        let child_rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let src = dir.join(&name);
        if name == ".wh..wh..opq" {
            continue;
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let hidden_rel = if rel.is_empty() {
                hidden.to_owned()
            } else {
                format!("{rel}/{hidden}")
            };
            remove_subtree(tree, &hidden_rel, false);
            continue;
        }
        let md = fs::symlink_metadata(&src).map_err(io_err("stat", &src))?;
        let ft = md.file_type();
        if ft.is_char_device() && md.rdev() == 0 {
            // overlayfs-style whiteout
            remove_subtree(tree, &child_rel, false);
            continue;
        }
        if ft.is_socket() {
            continue;
        }
        if !ft.is_dir() {
            // A file replacing a directory hides everything under it.
            remove_subtree(tree, &child_rel, false);
        } else if tree.get(&child_rel).is_some_and(|e| !e.md.is_dir()) {
            tree.remove(&child_rel);
        }
        tree.insert(
            child_rel.clone(),
            Entry {
                src: src.clone(),
                md: md.clone(),
            },
        );
        if ft.is_dir() {
            walk(&src, &child_rel, tree)?;
        }
    }
    Ok(())
}

fn write_tree(w: &mut impl Write, tree: &BTreeMap<String, Entry>) -> Result<(), InitramfsError> {
    let wr = Path::new("<initramfs rootfs>");
    let mut c = CpioWriter::new(w);
    c.dir(spec::ROOTFS_DIR, &Meta::root(0o755))
        .map_err(io_err("write", wr))?;
    for (rel, e) in tree {
        let name = format!("{}/{rel}", spec::ROOTFS_DIR);
        let md = &e.md;
        let meta = Meta {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            mtime: u32::try_from(md.mtime().max(0)).unwrap_or(u32::MAX),
            rdev_major: 0,
            rdev_minor: 0,
        };
        let ft = md.file_type();
        if ft.is_dir() {
            c.dir(&name, &meta).map_err(io_err("archive", &e.src))?;
        } else if ft.is_file() {
            let mut f = File::open(&e.src).map_err(io_err("open", &e.src))?;
            c.file_from(&name, &meta, md.len(), &mut f)
                .map_err(io_err("archive", &e.src))?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&e.src).map_err(io_err("read link", &e.src))?;
            let target = target.to_str().ok_or_else(|| InitramfsError::Io {
                op: "archive",
                path: e.src.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, "symlink target is not UTF-8"),
            })?;
            c.symlink(&name, &meta, target)
                .map_err(io_err("archive", &e.src))?;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            let rdev = md.rdev();
            let meta = Meta {
                rdev_major: libc::major(rdev),
                rdev_minor: libc::minor(rdev),
                ..meta
            };
            c.special(&name, &meta).map_err(io_err("archive", &e.src))?;
        }
    }
    c.finish().map_err(io_err("write", wr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Parses concatenated newc archives into (name, mode, data).
    fn parse(mut a: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let hex = |b: &[u8]| u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
        let mut out = Vec::new();
        let mut off = 0usize;
        let total = a.len();
        while off < total {
            assert_eq!(&a[..6], b"070701", "bad magic at {off}");
            let mode = hex(&a[14..22]);
            let size = hex(&a[54..62]) as usize;
            let namesize = hex(&a[94..102]) as usize;
            let name = String::from_utf8(a[110..110 + namesize - 1].to_vec()).unwrap();
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = a[data_at..data_at + size].to_vec();
            let next = (data_at + size).next_multiple_of(4);
            a = &a[next..];
            off += next;
            if name != "TRAILER!!!" {
                out.push((name, mode, data));
            }
        }
        out
    }

    fn fake_modules(dir: &Path) {
        let k = dir.join("kernel/drivers/virtio");
        fs::create_dir_all(&k).unwrap();
        for m in ["virtio", "virtio_ring", "virtio_mmio", "virtio_console"] {
            fs::write(k.join(format!("{m}.ko")), format!("module {m}")).unwrap();
        }
        fs::write(
            dir.join("modules.dep"),
            "kernel/drivers/virtio/virtio.ko:\n\
             kernel/drivers/virtio/virtio_ring.ko:\n\
             kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
             kernel/drivers/virtio/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
    }

    #[test]
    fn modules_resolve_dependencies_first_and_once() {
        let d = tempfile::tempdir().unwrap();
        fake_modules(d.path());
        let order = resolve_modules(d.path(), &["virtio-mmio", "virtio_console"]).unwrap();
        let names: Vec<_> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            ["virtio", "virtio_ring", "virtio_mmio", "virtio_console"]
        );
    }

    #[test]
    fn unknown_module_is_named_in_the_error() {
        let d = tempfile::tempdir().unwrap();
        fake_modules(d.path());
        let err = resolve_modules(d.path(), &["vhost_vsock"]).unwrap_err();
        assert!(err.to_string().contains("vhost_vsock"), "{err}");
    }

    #[test]
    fn base_holds_init_and_modules_and_is_reused_while_content_is_unchanged() {
        let d = tempfile::tempdir().unwrap();
        fake_modules(d.path());
        let agent = d.path().join("agent");
        fs::write(&agent, b"\x7fELF agent v1").unwrap();
        let cache = d.path().join("cache");
        let base = GuestBase {
            agent: &agent,
            modules_dir: d.path(),
            modules: DEFAULT_MODULES,
        };
        let first = InitramfsBuilder::new(&cache).base(&base).unwrap();
        let entries = parse(&fs::read(&first).unwrap());
        let init = entries.iter().find(|e| e.0 == "init").unwrap();
        assert_eq!(init.2, b"\x7fELF agent v1");
        assert_eq!(init.1, cpio::S_IFREG | 0o755);
        let list = entries
            .iter()
            .find(|e| e.0 == "evoke/modules.list")
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&list.2),
            "virtio.ko\nvirtio_ring.ko\nvirtio_mmio.ko\nvirtio_console.ko\n"
        );
        assert!(entries
            .iter()
            .any(|e| e.0 == "dev/console" && e.1 == cpio::S_IFCHR | 0o600));

        // A second builder (another process) finds the same cached file.
        assert_eq!(InitramfsBuilder::new(&cache).base(&base).unwrap(), first);
        // New agent content gives a new base.
        fs::write(&agent, b"\x7fELF agent v2").unwrap();
        let second = InitramfsBuilder::new(&cache).base(&base).unwrap();
        assert_ne!(second, first);
    }

    #[test]
    fn layers_merge_in_order_with_whiteouts_and_opaque_dirs() {
        let d = tempfile::tempdir().unwrap();
        let (l1, l2) = (d.path().join("l1"), d.path().join("l2"));
        fs::create_dir_all(l1.join("etc/conf.d")).unwrap();
        fs::create_dir_all(l1.join("opt/keep")).unwrap();
        fs::write(l1.join("etc/passwd"), "root:x:0:0").unwrap();
        fs::write(l1.join("etc/conf.d/a"), "a").unwrap();
        fs::write(l1.join("etc/gone"), "x").unwrap();
        fs::write(l1.join("opt/keep/old"), "old").unwrap();
        fs::create_dir_all(l2.join("etc")).unwrap();
        fs::create_dir_all(l2.join("opt/keep")).unwrap();
        fs::write(l2.join("etc/passwd"), "root:x:0:0:new").unwrap();
        fs::write(l2.join("etc/.wh.gone"), "").unwrap();
        fs::write(l2.join("etc/.wh.conf.d"), "").unwrap();
        fs::write(l2.join("opt/keep/.wh..wh..opq"), "").unwrap();
        fs::write(l2.join("opt/keep/new"), "new").unwrap();
        symlink("passwd", l2.join("etc/pw")).unwrap();

        let part = InitramfsBuilder::new(d.path().join("c"))
            .rootfs(&Rootfs::Layers(vec![l1, l2]), None)
            .unwrap();
        let Part::Bytes(bytes) = part else {
            panic!("expected bytes without a key")
        };
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "rootfs",
                "rootfs/etc",
                "rootfs/etc/passwd",
                "rootfs/etc/pw",
                "rootfs/opt",
                "rootfs/opt/keep",
                "rootfs/opt/keep/new"
            ]
        );
        assert_eq!(entries[2].2, b"root:x:0:0:new");
        assert_eq!(entries[3].1 & 0o170000, cpio::S_IFLNK);
        assert_eq!(entries[3].2, b"passwd");
    }

    #[test]
    fn keyed_rootfs_is_cached_and_full_build_concatenates_three_archives() {
        let d = tempfile::tempdir().unwrap();
        fake_modules(d.path());
        let agent = d.path().join("agent");
        fs::write(&agent, b"agent").unwrap();
        let root = d.path().join("root");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/sh"), b"shell").unwrap();
        let b = InitramfsBuilder::new(d.path().join("cache"));
        let base = GuestBase {
            agent: &agent,
            modules_dir: d.path(),
            modules: &["virtio_console"],
        };
        let spec = GuestSpec {
            argv: vec!["/bin/sh".into()],
            ..GuestSpec::default()
        };
        let initrd = b
            .build(&base, &Rootfs::Dir(root.clone()), Some("sha256:abc"), &spec)
            .unwrap();
        assert_eq!(initrd.parts.len(), 3);
        assert!(matches!(&initrd.parts[1], Part::File(p) if p.ends_with("rootfs-sha256_abc.cpio")));
        let out = d.path().join("initrd");
        let n = initrd.write_file(&out).unwrap();
        assert_eq!(n, initrd.len().unwrap());
        let entries = parse(&fs::read(&out).unwrap());
        assert!(entries
            .iter()
            .any(|e| e.0 == "rootfs/bin/sh" && e.2 == b"shell"));
        let spec_entry = entries.iter().find(|e| e.0 == "evoke/spec.json").unwrap();
        assert_eq!(GuestSpec::from_json(&spec_entry.2).unwrap(), spec);
    }

    #[test]
    fn missing_rootfs_directory_is_named_in_the_error() {
        let d = tempfile::tempdir().unwrap();
        let err = InitramfsBuilder::new(d.path())
            .rootfs(&Rootfs::Dir(d.path().join("nope")), None)
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
