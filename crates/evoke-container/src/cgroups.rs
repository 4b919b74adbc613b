//! Cgroups behind one trait: [`CgroupManager`], with a v1 ([`V1`]) and a v2
//! ([`V2`]) implementation. [`detect`] says which hierarchy this host offers
//! (from the standard /sys/fs/cgroup layout, else /proc/self/mountinfo);
//! [`Hierarchy::create`] then makes the cgroup for one workload. The process
//! tier uses the same types.
//!
//! Hybrid hosts (v1 controllers plus an empty v2 mount, like this one) are
//! treated as v1: limits live where the controllers are.
//!
//! A new container's process enters its cgroup by itself, through a
//! [`Placement`] opened by the parent: writing another pid to `cgroup.procs`
//! takes the kernel's global threadgroup lock for writing, which waits for
//! an RCU grace period (6–15 ms here, most of a container's creation). A
//! single-threaded process that writes `0` to v1's `tasks` file skips that
//! lock; on v2 the process is cloned straight into the cgroup with
//! `CLONE_INTO_CGROUP`, which takes it only for reading.

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What went wrong with a cgroup, naming its directory or file.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Reading, writing, creating or removing a cgroup file failed.
    #[error("cgroup {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// No usable cgroup hierarchy was found on this host.
    #[error("no cgroup hierarchy found: {0}")]
    NotFound(String),
    /// The cgroup still has processes after they were killed.
    #[error("cgroup {0} still has processes")]
    Busy(PathBuf),
    /// A cgroup path that tries to leave its hierarchy.
    #[error("invalid cgroup path {0:?}")]
    InvalidPath(String),
    /// A device rule that is not `TYPE MAJOR:MINOR ACCESS`.
    #[error("invalid device rule {0:?}")]
    InvalidDeviceRule(String),
}

type Result<T> = std::result::Result<T, CgroupError>;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Limits a workload can have, in the units of the OCI runtime spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Memory limit in bytes.
    pub memory_limit: Option<i64>,
    /// Memory plus swap in bytes; `None` with a memory limit means "no swap"
    /// (swap = limit), as Docker does.
    pub memory_swap: Option<i64>,
    /// Relative CPU weight (v1 cpu.shares, 2..262144).
    pub cpu_shares: Option<u64>,
    /// CPU time in microseconds per period.
    pub cpu_quota: Option<i64>,
    /// CPU period in microseconds.
    pub cpu_period: Option<u64>,
    /// Maximum number of tasks.
    pub pids_limit: Option<i64>,
    /// Device rules in v1's `devices.allow` syntax (`c 1:3 rwm`). When set,
    /// everything else is denied: by the v1 devices controller, or on v2 by
    /// a BPF program (see `devices`).
    pub device_allow: Option<Vec<String>>,
}

impl Resources {
    /// Converts the OCI `linux.resources` section.
    pub fn from_oci(r: &oci_spec::runtime::LinuxResources) -> Self {
        let mut out = Resources::default();
        if let Some(m) = r.memory() {
            out.memory_limit = m.limit().filter(|l| *l > 0);
            out.memory_swap = m.swap().filter(|s| *s != 0);
        }
        if let Some(c) = r.cpu() {
            out.cpu_shares = c.shares();
            out.cpu_quota = c.quota().filter(|q| *q != 0);
            out.cpu_period = c.period();
        }
        if let Some(p) = r.pids() {
            out.pids_limit = Some(p.limit()).filter(|l| *l > 0);
        }
        if let Some(devs) = r.devices() {
            let mut allow = Vec::new();
            for d in devs.iter().filter(|d| d.allow()) {
                let typ = d.typ().map(|t| t.as_str().to_string());
                let major = d.major().map_or("*".to_string(), |m| m.to_string());
                let minor = d.minor().map_or("*".to_string(), |m| m.to_string());
                let access = d.access().clone().unwrap_or_else(|| "rwm".into());
                allow.push(format!(
                    "{} {major}:{minor} {access}",
                    typ.as_deref().unwrap_or("a")
                ));
            }
            if devs.iter().any(|d| !d.allow()) {
                out.device_allow = Some(allow);
            }
        }
        out
    }
}

/// Where a cgroup lives, enough to find it again after the creating process
/// is gone (it is stored in the container's state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupPaths {
    /// One directory per v1 controller, keyed by controller name.
    V1(BTreeMap<String, PathBuf>),
    /// The one directory in the unified hierarchy.
    V2(PathBuf),
}

impl CgroupPaths {
    /// A manager for an existing cgroup.
    pub fn open(&self) -> Box<dyn CgroupManager> {
        match self {
            CgroupPaths::V1(dirs) => Box::new(V1 { dirs: dirs.clone() }),
            CgroupPaths::V2(dir) => Box::new(V2 { dir: dir.clone() }),
        }
    }
}

/// How a new process gets into a cgroup by itself, opened in advance by the
/// parent so that the child only makes system calls (see the module doc).
#[derive(Debug)]
pub enum Placement {
    /// v1: each hierarchy's `tasks` file, open for writing. The child
    /// writes `0` to each while it is single-threaded.
    V1Tasks(Vec<OwnedFd>),
    /// v2: the cgroup directory, for `clone3(CLONE_INTO_CGROUP)`.
    V2Dir(OwnedFd),
}

impl Placement {
    /// Moves the calling thread into the v1 cgroups; the whole process when
    /// it is single-threaded (a freshly forked child). Nothing for v2, whose
    /// placement happens at clone time.
    pub fn enter_self(&self) -> std::result::Result<(), nix::Error> {
        if let Placement::V1Tasks(fds) = self {
            for fd in fds {
                nix::unistd::write(fd, b"0")?;
            }
        }
        Ok(())
    }

    /// The v2 cgroup directory to clone into, if any.
    pub fn clone_into(&self) -> Option<&OwnedFd> {
        match self {
            Placement::V2Dir(fd) => Some(fd),
            Placement::V1Tasks(_) => None,
        }
    }
}

fn open_placement_file(path: &Path, write: bool) -> Result<OwnedFd> {
    let mut o = fs::OpenOptions::new();
    if write {
        o.write(true);
    } else {
        o.read(true).custom_flags(libc::O_DIRECTORY);
    }
    o.open(path).map(OwnedFd::from).map_err(io("open", path))
}

/// One workload's cgroup, whatever the hierarchy.
pub trait CgroupManager: Send + Sync + std::fmt::Debug {
    /// Moves a process (and so its future children) into the cgroup.
    fn add_process(&self, pid: i32) -> Result<()>;
    /// Opens what a new child needs to enter the cgroup by itself; cheaper
    /// than [`CgroupManager::add_process`] (see the module doc).
    fn placement(&self) -> Result<Placement>;
    /// Writes the limits. Unset fields are left as they are.
    fn set(&self, r: &Resources) -> Result<()>;
    /// The processes in the cgroup.
    fn procs(&self) -> Result<Vec<i32>>;
    /// How many times the kernel's OOM killer killed a process in it.
    fn oom_kills(&self) -> Result<u64>;
    /// Current memory use in bytes.
    fn memory_usage(&self) -> Result<u64>;
    /// SIGKILLs every process in the cgroup.
    fn kill_all(&self) -> Result<()>;
    /// Removes the cgroup, killing what is left in it first.
    fn remove(&self) -> Result<()>;
    /// Where it lives, to store and [`CgroupPaths::open`] later.
    fn paths(&self) -> CgroupPaths;
}

/// The cgroup hierarchy this host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// v1: a mount per controller (or group of controllers), keyed by
    /// controller name, with this process's own cgroup in each.
    V1 {
        mounts: BTreeMap<String, PathBuf>,
        own: BTreeMap<String, String>,
    },
    /// v2: one unified mount, and this process's own cgroup in it.
    V2 { mount: PathBuf, own: String },
}

/// The v1 controllers a container gets a cgroup in. Others (cpuset, freezer,
/// blkio...) are left alone: we set no limits there and every extra
/// hierarchy costs a mkdir, a write and an rmdir per container.
pub const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "cpuacct", "pids", "devices"];

/// Finds the cgroup hierarchy, once per process: the first call looks (see
/// [`detect_uncached`]) and later calls get a copy of what it found. The
/// layout of a host does not change under a running process, and the node
/// agent creates a cgroup per container: looking each time cost a read of
/// /proc/self/cgroup and a dozen statfs/stat calls per container. A failure
/// is not remembered, so a later call looks again.
pub fn detect() -> Result<Hierarchy> {
    static FOUND: std::sync::OnceLock<Hierarchy> = std::sync::OnceLock::new();
    if let Some(h) = FOUND.get() {
        return Ok(h.clone());
    }
    let h = detect_uncached()?;
    Ok(FOUND.get_or_init(|| h).clone())
}

/// Finds the cgroup hierarchy: from the standard layout under
/// /sys/fs/cgroup when it is there (a few statfs calls), else from
/// /proc/self/mountinfo, which on a busy host is hundreds of lines.
pub fn detect_uncached() -> Result<Hierarchy> {
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(io("read", Path::new("/proc/self/cgroup")))?;
    if let Some(h) = detect_standard(Path::new("/sys/fs/cgroup"), &own) {
        return Ok(h);
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("read", Path::new("/proc/self/mountinfo")))?;
    detect_from(&mountinfo, &own)
}

/// A file that a hierarchy's root has only when the controller is bound to
/// it (the root pids cgroup has no pids.* file, so any cgroup file does).
fn v1_marker(ctrl: &str) -> &'static str {
    match ctrl {
        "memory" => "memory.limit_in_bytes",
        "cpu" => "cpu.shares",
        "cpuacct" => "cpuacct.usage",
        "devices" => "devices.allow",
        _ => "cgroup.procs",
    }
}

/// The layout systemd and Docker hosts use: a cgroup2 file system at
/// `base`, or a tmpfs there with one v1 mount per controller named after
/// it. `None` when the host looks different; [`detect_from`] then decides.
fn detect_standard(base: &Path, self_cgroup: &str) -> Option<Hierarchy> {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};
    let (own_v1, own_v2) = parse_self_cgroup(self_cgroup);
    let t = statfs(base).ok()?.filesystem_type();
    if t == CGROUP2_SUPER_MAGIC {
        return Some(Hierarchy::V2 {
            mount: base.to_path_buf(),
            own: own_v2,
        });
    }
    let mut mounts = BTreeMap::new();
    for ctrl in V1_CONTROLLERS {
        let dir = base.join(ctrl);
        // statfs follows the cpu -> cpu,cpuacct symlinks of co-mounts.
        match statfs(&dir) {
            Ok(s) if s.filesystem_type() == CGROUP_SUPER_MAGIC => {}
            _ => continue,
        }
        if !dir.join(v1_marker(ctrl)).exists() {
            return None;
        }
        mounts.insert(ctrl.to_string(), dir);
    }
    if mounts.contains_key("memory") || mounts.contains_key("pids") {
        return Some(Hierarchy::V1 {
            mounts,
            own: own_v1,
        });
    }
    None
}

/// This process's v1 cgroups (controller → path) and its v2 cgroup.
fn parse_self_cgroup(self_cgroup: &str) -> (BTreeMap<String, String>, String) {
    let mut own_v1 = BTreeMap::new();
    let mut own_v2 = String::from("/");
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && ctrls.is_empty() {
            own_v2 = path.to_string();
        }
        for c in ctrls.split(',') {
            own_v1.insert(c.to_string(), path.to_string());
        }
    }
    (own_v1, own_v2)
}

/// [`detect`] on given file contents, so that it can be tested.
pub fn detect_from(mountinfo: &str, self_cgroup: &str) -> Result<Hierarchy> {
    let mut v1 = BTreeMap::new();
    let mut v2 = None;
    for line in mountinfo.lines() {
        // id parent maj:min root mountpoint opts [optional...] - fstype source superopts
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let mountpoint = PathBuf::from(left[4]);
        match right[0] {
            "cgroup2" => v2 = v2.or(Some(mountpoint)),
            "cgroup" => {
                for opt in right[2].split(',') {
                    if V1_CONTROLLERS.contains(&opt) {
                        v1.entry(opt.to_string()).or_insert(mountpoint.clone());
                    }
                }
            }
            _ => {}
        }
    }
    let (own_v1, own_v2) = parse_self_cgroup(self_cgroup);
    if v1.contains_key("memory") || v1.contains_key("pids") {
        return Ok(Hierarchy::V1 {
            mounts: v1,
            own: own_v1,
        });
    }
    match v2 {
        Some(mount) => Ok(Hierarchy::V2 { mount, own: own_v2 }),
        None => Err(CgroupError::NotFound(
            "neither v1 memory/pids controllers nor a cgroup2 mount".into(),
        )),
    }
}

/// Joins a cgroup path to a base: absolute paths start at the hierarchy's
/// root, relative ones under this process's own cgroup.
fn resolve(mount: &Path, own: &str, path: &str) -> Result<PathBuf> {
    if path.split('/').any(|c| c == "..") {
        return Err(CgroupError::InvalidPath(path.to_string()));
    }
    let mut dir = mount.to_path_buf();
    if !path.starts_with('/') {
        dir.push(own.trim_start_matches('/'));
    }
    dir.push(path.trim_start_matches('/'));
    Ok(dir)
}

impl Hierarchy {
    /// Creates (or reuses) the cgroup `path` and returns its manager.
    pub fn create(&self, path: &str) -> Result<Box<dyn CgroupManager>> {
        match self {
            Hierarchy::V1 { mounts, own } => {
                let mut dirs = BTreeMap::new();
                for (ctrl, mount) in mounts {
                    let own = own.get(ctrl).map_or("/", String::as_str);
                    dirs.insert(ctrl.clone(), resolve(mount, own, path)?);
                }
                let m = V1 { dirs };
                m.create_dirs()?;
                Ok(Box::new(m))
            }
            Hierarchy::V2 { mount, own } => {
                let dir = resolve(mount, own, path)?;
                let m = V2::create(mount, &dir)?;
                Ok(Box::new(m))
            }
        }
    }
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(io("write", path))
}

fn read_procs(file: &Path) -> Result<Vec<i32>> {
    match fs::read_to_string(file) {
        Ok(s) => Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io("read", file)(e)),
    }
}

/// Reads `key N` out of a flat-keyed file such as memory.events.
fn read_key(file: &Path, key: &str) -> Result<u64> {
    let s = match fs::read_to_string(file) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io("read", file)(e)),
    };
    Ok(s.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0))
}

fn kill_pids(pids: &[i32]) {
    for &pid in pids {
        // The process may be gone already; that is what we want anyway.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// rmdir, retrying briefly: a killed task leaves its cgroup asynchronously.
fn rmdir_retry(dir: &Path, procs: impl Fn() -> Result<Vec<i32>>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                kill_pids(&procs()?);
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(CgroupError::Busy(dir.to_path_buf()))
            }
            Err(e) => return Err(io("rmdir", dir)(e)),
        }
    }
}

/// A cgroup in v1 hierarchies: one directory per controller.
#[derive(Debug, Clone)]
pub struct V1 {
    dirs: BTreeMap<String, PathBuf>,
}

impl V1 {
    /// A manager over given directories (controller name → cgroup dir),
    /// creating them. Tests use it with a fake tree.
    pub fn new(dirs: BTreeMap<String, PathBuf>) -> Result<Self> {
        let m = V1 { dirs };
        m.create_dirs()?;
        Ok(m)
    }

    fn create_dirs(&self) -> Result<()> {
        for dir in self.dirs.values() {
            fs::create_dir_all(dir).map_err(io("mkdir", dir))?;
        }
        Ok(())
    }

    fn file(&self, ctrl: &str, name: &str) -> Option<PathBuf> {
        self.dirs.get(ctrl).map(|d| d.join(name))
    }

    fn any_dir(&self) -> Option<&PathBuf> {
        self.dirs
            .get("pids")
            .or_else(|| self.dirs.get("memory"))
            .or_else(|| self.dirs.values().next())
    }
}

impl CgroupManager for V1 {
    fn add_process(&self, pid: i32) -> Result<()> {
        let pid = pid.to_string();
        for dir in self.dirs.values() {
            write(&dir.join("cgroup.procs"), &pid)?;
        }
        Ok(())
    }

    fn placement(&self) -> Result<Placement> {
        let mut fds = Vec::with_capacity(self.dirs.len());
        for dir in self.dirs.values() {
            fds.push(open_placement_file(&dir.join("tasks"), true)?);
        }
        Ok(Placement::V1Tasks(fds))
    }

    fn set(&self, r: &Resources) -> Result<()> {
        if let (Some(limit), Some(f)) = (r.memory_limit, self.file("memory", "")) {
            let dir = f;
            write(&dir.join("memory.limit_in_bytes"), &limit.to_string())?;
            // memsw exists only with swap accounting; without it there is no
            // swap to limit.
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                let swap = r.memory_swap.unwrap_or(limit);
                write(&memsw, &swap.to_string())?;
            }
        }
        if let Some(dir) = self.dirs.get("cpu") {
            if let Some(s) = r.cpu_shares {
                write(&dir.join("cpu.shares"), &s.to_string())?;
            }
            if let Some(p) = r.cpu_period {
                write(&dir.join("cpu.cfs_period_us"), &p.to_string())?;
            }
            if let Some(q) = r.cpu_quota {
                write(&dir.join("cpu.cfs_quota_us"), &q.to_string())?;
            }
        }
        if let (Some(l), Some(f)) = (r.pids_limit, self.file("pids", "pids.max")) {
            write(&f, &l.to_string())?;
        }
        if let (Some(allow), Some(dir)) = (&r.device_allow, self.dirs.get("devices")) {
            write(&dir.join("devices.deny"), "a")?;
            for rule in allow {
                write(&dir.join("devices.allow"), rule)?;
            }
        }
        Ok(())
    }

    fn procs(&self) -> Result<Vec<i32>> {
        match self.any_dir() {
            Some(d) => read_procs(&d.join("cgroup.procs")),
            None => Ok(Vec::new()),
        }
    }

    fn oom_kills(&self) -> Result<u64> {
        match self.file("memory", "memory.oom_control") {
            Some(f) => read_key(&f, "oom_kill"),
            None => Ok(0),
        }
    }

    fn memory_usage(&self) -> Result<u64> {
        let Some(f) = self.file("memory", "memory.usage_in_bytes") else {
            return Ok(0);
        };
        let s = fs::read_to_string(&f).map_err(io("read", &f))?;
        Ok(s.trim().parse().unwrap_or(0))
    }

    fn kill_all(&self) -> Result<()> {
        // Without a freezer a fork could slip through; repeat until empty.
        for _ in 0..100 {
            let pids = self.procs()?;
            if pids.is_empty() {
                return Ok(());
            }
            kill_pids(&pids);
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn remove(&self) -> Result<()> {
        let pids = self.procs()?;
        if !pids.is_empty() {
            self.kill_all()?;
        }
        for dir in self.dirs.values() {
            rmdir_retry(dir, || read_procs(&dir.join("cgroup.procs")))?;
        }
        Ok(())
    }

    fn paths(&self) -> CgroupPaths {
        CgroupPaths::V1(self.dirs.clone())
    }
}

/// A cgroup in the unified (v2) hierarchy.
#[derive(Debug, Clone)]
pub struct V2 {
    dir: PathBuf,
}

impl V2 {
    /// Creates `dir` under the cgroup2 mount `mount`, enabling the memory,
    /// cpu and pids controllers (those the parent offers) on the way down.
    pub fn create(mount: &Path, dir: &Path) -> Result<Self> {
        let rel = dir
            .strip_prefix(mount)
            .map_err(|_| CgroupError::InvalidPath(dir.display().to_string()))?;
        let mut cur = mount.to_path_buf();
        for comp in rel.components() {
            enable_controllers(&cur)?;
            cur.push(comp);
            match fs::create_dir(&cur) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("mkdir", &cur)(e)),
            }
        }
        Ok(V2 {
            dir: dir.to_path_buf(),
        })
    }

    /// A manager for an existing v2 cgroup directory.
    pub fn open(dir: PathBuf) -> Self {
        V2 { dir }
    }
}

/// Delegates the controllers a parent has to its children. Controllers
/// bound to a v1 hierarchy (hybrid hosts) are simply not offered here.
fn enable_controllers(dir: &Path) -> Result<()> {
    let avail_file = dir.join("cgroup.controllers");
    let avail = fs::read_to_string(&avail_file).unwrap_or_default();
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let want: Vec<String> = ["memory", "cpu", "pids"]
        .iter()
        .filter(|c| avail.split_whitespace().any(|a| a == **c))
        .filter(|c| !enabled.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if want.is_empty() {
        return Ok(());
    }
    write(&dir.join("cgroup.subtree_control"), &want.join(" "))
}

impl CgroupManager for V2 {
    fn add_process(&self, pid: i32) -> Result<()> {
        write(&self.dir.join("cgroup.procs"), &pid.to_string())
    }

    fn placement(&self) -> Result<Placement> {
        Ok(Placement::V2Dir(open_placement_file(&self.dir, false)?))
    }

    fn set(&self, r: &Resources) -> Result<()> {
        if let Some(limit) = r.memory_limit {
            write(&self.dir.join("memory.max"), &limit.to_string())?;
            // v2 limits swap alone; OCI's swap is memory+swap.
            let swap = r.memory_swap.map_or(0, |s| (s - limit).max(0));
            let f = self.dir.join("memory.swap.max");
            if f.exists() {
                write(&f, &swap.to_string())?;
            }
        }
        if r.cpu_quota.is_some() || r.cpu_period.is_some() {
            let quota = r
                .cpu_quota
                .filter(|q| *q > 0)
                .map_or("max".to_string(), |q| q.to_string());
            let period = r.cpu_period.unwrap_or(100_000);
            write(&self.dir.join("cpu.max"), &format!("{quota} {period}"))?;
        }
        if let Some(shares) = r.cpu_shares {
            // The conversion runc and crun use from shares [2, 262144] to
            // weight [1, 10000].
            let shares = shares.clamp(2, 262_144);
            let weight = 1 + ((shares - 2) * 9999) / 262_142;
            write(&self.dir.join("cpu.weight"), &weight.to_string())?;
        }
        if let Some(l) = r.pids_limit {
            write(&self.dir.join("pids.max"), &l.to_string())?;
        }
        if let Some(allow) = &r.device_allow {
            // v2 has no devices controller: the rules become a BPF program.
            crate::devices::attach(&self.dir, &crate::devices::program(allow)?)?;
        }
        Ok(())
    }

    fn procs(&self) -> Result<Vec<i32>> {
        read_procs(&self.dir.join("cgroup.procs"))
    }

    fn oom_kills(&self) -> Result<u64> {
        read_key(&self.dir.join("memory.events"), "oom_kill")
    }

    fn memory_usage(&self) -> Result<u64> {
        let f = self.dir.join("memory.current");
        match fs::read_to_string(&f) {
            Ok(s) => Ok(s.trim().parse().unwrap_or(0)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io("read", &f)(e)),
        }
    }

    fn kill_all(&self) -> Result<()> {
        let kill = self.dir.join("cgroup.kill");
        if kill.exists() && fs::write(&kill, "1").is_ok() {
            return Ok(());
        }
        for _ in 0..100 {
            let pids = self.procs()?;
            if pids.is_empty() {
                break;
            }
            kill_pids(&pids);
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn remove(&self) -> Result<()> {
        if !self.procs()?.is_empty() {
            self.kill_all()?;
        }
        rmdir_retry(&self.dir, || self.procs())
    }

    fn paths(&self) -> CgroupPaths {
        CgroupPaths::V2(self.dir.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
30 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
32 25 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 25 0:29 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_host_is_driven_through_v1_under_own_cgroup() {
        let h = detect_from(HYBRID_MOUNTINFO, "4:memory:/outer\n8:pids:/\n0::/\n").unwrap();
        let Hierarchy::V1 { mounts, own } = &h else {
            panic!("expected v1, got {h:?}")
        };
        assert_eq!(mounts["memory"], Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(own["memory"], "/outer");
        let dir = resolve(&mounts["memory"], &own["memory"], "evoke/c1").unwrap();
        assert_eq!(dir, Path::new("/sys/fs/cgroup/memory/outer/evoke/c1"));
        let abs = resolve(&mounts["memory"], &own["memory"], "/evoke/c1").unwrap();
        assert_eq!(abs, Path::new("/sys/fs/cgroup/memory/evoke/c1"));
    }

    #[test]
    fn pure_v2_host_is_detected_as_v2() {
        let mi = "29 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let h = detect_from(mi, "0::/user.slice\n").unwrap();
        assert_eq!(
            h,
            Hierarchy::V2 {
                mount: "/sys/fs/cgroup".into(),
                own: "/user.slice".into()
            }
        );
    }

    #[test]
    fn standard_layout_detection_agrees_with_mountinfo() {
        let base = Path::new("/sys/fs/cgroup");
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let Some(fast) = detect_standard(base, &own) else {
            eprintln!("skipping: this host does not use the standard cgroup layout");
            return;
        };
        let mi = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let slow = detect_from(&mi, &own).unwrap();
        match (&fast, &slow) {
            (Hierarchy::V1 { mounts: a, own: oa }, Hierarchy::V1 { mounts: b, own: ob }) => {
                assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
                for (ctrl, dir) in a {
                    // Same mount, whether reached through a co-mount symlink.
                    assert_eq!(
                        fs::canonicalize(dir).unwrap(),
                        fs::canonicalize(&b[ctrl]).unwrap()
                    );
                }
                assert_eq!(oa, ob);
            }
            _ => assert_eq!(fast, slow),
        }
    }

    #[test]
    fn cgroup_path_with_dotdot_is_rejected() {
        assert!(resolve(Path::new("/m"), "/", "../../etc").is_err());
    }

    #[test]
    fn v1_limits_are_written_to_controller_files() {
        let t = tempfile::tempdir().unwrap();
        let mut dirs = BTreeMap::new();
        for c in ["memory", "cpu", "pids", "devices"] {
            dirs.insert(c.to_string(), t.path().join(c).join("box"));
        }
        let m = V1::new(dirs).unwrap();
        fs::write(t.path().join("memory/box/memory.memsw.limit_in_bytes"), "").unwrap();
        m.set(&Resources {
            memory_limit: Some(64 << 20),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            pids_limit: Some(20),
            device_allow: Some(vec!["c 1:3 rwm".into()]),
            ..Default::default()
        })
        .unwrap();
        let rd = |p: &str| fs::read_to_string(t.path().join(p)).unwrap();
        assert_eq!(rd("memory/box/memory.limit_in_bytes"), "67108864");
        assert_eq!(rd("memory/box/memory.memsw.limit_in_bytes"), "67108864");
        assert_eq!(rd("cpu/box/cpu.cfs_quota_us"), "50000");
        assert_eq!(rd("pids/box/pids.max"), "20");
        assert_eq!(rd("devices/box/devices.allow"), "c 1:3 rwm");
        fs::write(
            t.path().join("memory/box/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(m.oom_kills().unwrap(), 2);
    }

    #[test]
    fn v2_limits_are_written_to_unified_files() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let dir = t.path().join("evoke/c2");
        let m = V2::create(t.path(), &dir).unwrap();
        assert_eq!(
            fs::read_to_string(t.path().join("cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
        m.set(&Resources {
            memory_limit: Some(1 << 20),
            cpu_quota: Some(50_000),
            cpu_shares: Some(1024),
            pids_limit: Some(5),
            ..Default::default()
        })
        .unwrap();
        let rd = |p: &str| fs::read_to_string(dir.join(p)).unwrap();
        assert_eq!(rd("memory.max"), "1048576");
        assert_eq!(rd("cpu.max"), "50000 100000");
        assert_eq!(rd("cpu.weight"), "39");
        assert_eq!(rd("pids.max"), "5");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(m.oom_kills().unwrap(), 1);
    }
}
