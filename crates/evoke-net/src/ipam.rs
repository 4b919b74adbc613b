//! Address management: a node's /24 slice of the pod CIDR, pod IPs inside it,
//! and Service ClusterIPs.
//!
//! Pod allocations are keyed by pod uid and persisted to `<data-dir>/net/`
//! with a write-to-temp-then-rename, so a restarted agent hands the same pod
//! the same address and never reuses one still in use.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::NetError;

/// The default cluster pod CIDR (as in k3s).
pub const DEFAULT_POD_CIDR: &str = "10.42.0.0/16";
/// The default Service CIDR (as in k3s).
pub const DEFAULT_SERVICE_CIDR: &str = "10.43.0.0/16";
/// The ClusterIP of the `kubernetes` Service in `default`.
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 1);
/// The ClusterIP of the cluster DNS Service.
pub const DNS_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 10);

/// An IPv4 network in CIDR form; the address is normalised to the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Net {
    /// A network from an address and a prefix length (0..=32).
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, NetError> {
        if prefix > 32 {
            return Err(NetError::BadCidr(format!("{addr}/{prefix}")));
        }
        let mask = Self::mask_of(prefix);
        Ok(Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    fn mask_of(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Number of addresses in the network.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// The address at `offset` from the network address, if inside.
    pub fn nth(&self, offset: u64) -> Option<Ipv4Addr> {
        (offset < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + offset as u32))
    }

    /// Whether `ip` lies inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_of(self.prefix) == u32::from(self.addr)
    }

    /// The broadcast (last) address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !Self::mask_of(self.prefix))
    }

    /// The gateway of a pod subnet: its first host address (the bridge).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + 1)
    }
}

impl FromStr for Ipv4Net {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::BadCidr(s.to_string());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        Self::new(addr, prefix)
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Picks a free /24 node subnet in the cluster pod CIDR, given the subnets
/// other nodes already hold (their Node.spec.podCIDR).
pub fn allocate_node_subnet(cluster: Ipv4Net, taken: &[Ipv4Net]) -> Result<Ipv4Net, NetError> {
    if cluster.prefix() > 24 {
        return Err(NetError::BadCidr(format!(
            "{cluster} is smaller than a /24 node subnet"
        )));
    }
    let count = 1u64 << (24 - u32::from(cluster.prefix()));
    for i in 0..count {
        let base = Ipv4Addr::from(u32::from(cluster.network()) + ((i as u32) << 8));
        let candidate = Ipv4Net::new(base, 24)?;
        if !taken.iter().any(|t| overlaps(*t, candidate)) {
            return Ok(candidate);
        }
    }
    Err(NetError::Exhausted(cluster.to_string()))
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PodIpState {
    subnet: String,
    /// pod uid -> address
    pods: BTreeMap<String, Ipv4Addr>,
    /// Addresses held in memory only ([`PodIpam::reserve`]): key -> address.
    #[serde(skip)]
    reserved: BTreeMap<String, Ipv4Addr>,
}

/// Pod IPs of one node subnet, keyed by pod uid and persisted to a file.
///
/// The subnet's network address, the gateway (.1, the bridge) and the
/// broadcast address are never handed out.
#[derive(Debug)]
pub struct PodIpam {
    subnet: Ipv4Net,
    path: PathBuf,
    state: Mutex<PodIpState>,
}

impl PodIpam {
    /// Opens (or creates) the allocation file `<data_dir>/net/ipam.json` for
    /// `subnet`. A file written for another subnet is an error, so a node
    /// never silently hands out addresses from two ranges.
    pub fn open(data_dir: &Path, subnet: Ipv4Net) -> Result<Self, NetError> {
        let dir = data_dir.join("net");
        std::fs::create_dir_all(&dir).map_err(|e| NetError::io(&dir, e))?;
        let path = dir.join("ipam.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                let st: PodIpState = serde_json::from_slice(&bytes)
                    .map_err(|e| NetError::Corrupt(format!("{}: {e}", path.display())))?;
                if st.subnet != subnet.to_string() {
                    return Err(NetError::Corrupt(format!(
                        "{}: holds subnet {} but this node has {subnet}",
                        path.display(),
                        st.subnet
                    )));
                }
                st
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PodIpState {
                subnet: subnet.to_string(),
                ..Default::default()
            },
            Err(e) => return Err(NetError::io(&path, e)),
        };
        Ok(Self {
            subnet,
            path,
            state: Mutex::new(state),
        })
    }

    /// The node subnet.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The address of pod `uid`: the one it already has, or the lowest free.
    pub fn allocate(&self, uid: &str) -> Result<Ipv4Addr, NetError> {
        if uid.is_empty() {
            return Err(NetError::BadInput("empty pod uid".into()));
        }
        let mut st = self.lock();
        if let Some(ip) = st.pods.get(uid) {
            return Ok(*ip);
        }
        let ip = self.lowest_free(&st)?;
        st.pods.insert(uid.to_string(), ip);
        if let Err(e) = self.persist(&st) {
            st.pods.remove(uid);
            return Err(e);
        }
        Ok(ip)
    }

    fn lowest_free(&self, st: &PodIpState) -> Result<Ipv4Addr, NetError> {
        let used: BTreeSet<Ipv4Addr> = st
            .pods
            .values()
            .chain(st.reserved.values())
            .copied()
            .collect();
        (2..self.subnet.size().saturating_sub(1))
            .filter_map(|i| self.subnet.nth(i))
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| NetError::Exhausted(self.subnet.to_string()))
    }

    /// Holds the lowest free address under `key` in memory only (for a
    /// pre-made sandbox whose namespace dies with this process, so after a
    /// crash there is nothing to give back); [`PodIpam::rename`] makes it a
    /// pod's, [`PodIpam::release`] frees it.
    pub fn reserve(&self, key: &str) -> Result<Ipv4Addr, NetError> {
        let mut st = self.lock();
        if st.pods.contains_key(key) || st.reserved.contains_key(key) {
            return Err(NetError::InUse(format!("key {key}")));
        }
        let ip = self.lowest_free(&st)?;
        st.reserved.insert(key.to_string(), ip);
        Ok(ip)
    }

    /// Releases the address of pod `uid` (or reservation `uid`); releasing
    /// an unknown uid is a no-op.
    pub fn release(&self, uid: &str) -> Result<Option<Ipv4Addr>, NetError> {
        let mut st = self.lock();
        if let Some(ip) = st.reserved.remove(uid) {
            return Ok(Some(ip));
        }
        let Some(ip) = st.pods.remove(uid) else {
            return Ok(None);
        };
        if let Err(e) = self.persist(&st) {
            st.pods.insert(uid.to_string(), ip);
            return Err(e);
        }
        Ok(Some(ip))
    }

    /// Gives the address reserved under `key` to pod `to` (a pre-made
    /// sandbox handed to the pod that claims it), persisted; returns it.
    /// `to` must hold none yet.
    pub fn rename(&self, key: &str, to: &str) -> Result<Ipv4Addr, NetError> {
        if to.is_empty() {
            return Err(NetError::BadInput("empty pod uid".into()));
        }
        let mut st = self.lock();
        if let Some(ip) = st.pods.get(to) {
            return Err(NetError::InUse(format!("{ip} (held by {to})")));
        }
        let ip = st
            .reserved
            .remove(key)
            .ok_or_else(|| NetError::BadInput(format!("no address is reserved for {key}")))?;
        st.pods.insert(to.to_string(), ip);
        if let Err(e) = self.persist(&st) {
            st.pods.remove(to);
            st.reserved.insert(key.to_string(), ip);
            return Err(e);
        }
        Ok(ip)
    }

    /// How many addresses are still free (neither held nor reserved).
    pub fn free(&self) -> usize {
        // The network, gateway and broadcast addresses are never handed out.
        let usable = self.subnet.size().saturating_sub(3) as usize;
        let st = self.lock();
        usable.saturating_sub(st.pods.len() + st.reserved.len())
    }

    /// The address pod `uid` holds, if any.
    pub fn get(&self, uid: &str) -> Option<Ipv4Addr> {
        self.lock().pods.get(uid).copied()
    }

    /// All persisted allocations, pod uid -> address (not reservations).
    pub fn allocations(&self) -> BTreeMap<String, Ipv4Addr> {
        self.lock().pods.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PodIpState> {
        // A panic while holding the lock leaves consistent data (every
        // mutation is undone on error), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, st: &PodIpState) -> Result<(), NetError> {
        let bytes = serde_json::to_vec_pretty(st)
            .map_err(|e| NetError::Corrupt(format!("{}: {e}", self.path.display())))?;
        write_atomic(&self.path, &bytes)
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// crash of the agent leaves either the old or the new content.
///
/// No fsync: the allocations describe pod namespaces, which live in /run
/// and do not outlive the machine, so the file only has to survive the
/// process, and the page cache does that. An fsync per pod start was a
/// journal commit per pod under the allocator's lock, which a burst of pods
/// queued behind (each one waits for every disk write on the machine).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), NetError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| NetError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| NetError::io(path, e))
}

/// Service ClusterIPs from the Service CIDR. Pure: the API server feeds it
/// the ClusterIPs Services already hold (on start-up) and asks for new ones.
///
/// `.1` is reserved for the `kubernetes` Service and `.10` for cluster DNS;
/// both are handed out only when asked for by address.
#[derive(Debug, Clone)]
pub struct ClusterIpAllocator {
    cidr: Ipv4Net,
    used: BTreeSet<Ipv4Addr>,
}

impl ClusterIpAllocator {
    /// An allocator over `cidr` (normally [`DEFAULT_SERVICE_CIDR`]).
    pub fn new(cidr: Ipv4Net) -> Self {
        Self {
            cidr,
            used: BTreeSet::new(),
        }
    }

    /// Takes a specific address (an existing Service's, or one a Service
    /// spec asks for). Taking one already held is an error.
    pub fn allocate_specific(&mut self, ip: Ipv4Addr) -> Result<(), NetError> {
        if !self.cidr.contains(ip) || ip == self.cidr.network() || ip == self.cidr.broadcast() {
            return Err(NetError::BadInput(format!(
                "clusterIP {ip} is not a usable address of {}",
                self.cidr
            )));
        }
        if !self.used.insert(ip) {
            return Err(NetError::InUse(ip.to_string()));
        }
        Ok(())
    }

    /// The lowest free address that is not reserved.
    pub fn allocate_next(&mut self) -> Result<Ipv4Addr, NetError> {
        let reserved = [self.cidr.nth(1), self.cidr.nth(10)];
        let ip = (2..self.cidr.size().saturating_sub(1))
            .filter_map(|i| self.cidr.nth(i))
            .find(|ip| !reserved.contains(&Some(*ip)) && !self.used.contains(ip))
            .ok_or_else(|| NetError::Exhausted(self.cidr.to_string()))?;
        self.used.insert(ip);
        Ok(ip)
    }

    /// Returns an address to the pool; unknown addresses are ignored.
    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&ip);
    }

    /// Whether `ip` is held.
    pub fn is_used(&self, ip: Ipv4Addr) -> bool {
        self.used.contains(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test cidr")
    }

    #[test]
    fn cidr_parses_normalises_and_rejects_garbage() {
        assert_eq!(net("10.42.3.7/24").to_string(), "10.42.3.0/24");
        assert_eq!(net("10.42.3.0/24").gateway(), Ipv4Addr::new(10, 42, 3, 1));
        assert_eq!(
            net("10.42.3.0/24").broadcast(),
            Ipv4Addr::new(10, 42, 3, 255)
        );
        for bad in ["10.42.0.0", "10.42.0.0/33", "x/8", "10.42.0.0/-1"] {
            assert!(bad.parse::<Ipv4Net>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn node_subnets_are_distinct_slash24s_of_the_pod_cidr() {
        let cluster = net(DEFAULT_POD_CIDR);
        let a = allocate_node_subnet(cluster, &[]).expect("first");
        assert_eq!(a, net("10.42.0.0/24"));
        let b = allocate_node_subnet(cluster, &[a]).expect("second");
        assert_eq!(b, net("10.42.1.0/24"));
        let c = allocate_node_subnet(cluster, &[b]).expect("gap reused");
        assert_eq!(c, a);
        let small = net("10.42.0.0/23");
        let full = [net("10.42.0.0/24"), net("10.42.1.0/24")];
        assert!(matches!(
            allocate_node_subnet(small, &full),
            Err(NetError::Exhausted(_))
        ));
    }

    #[test]
    fn pod_ips_are_idempotent_per_uid_and_skip_network_gateway_broadcast() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ipam = PodIpam::open(dir.path(), net("10.42.5.0/24")).expect("open");
        let a = ipam.allocate("pod-a").expect("a");
        assert_eq!(a, Ipv4Addr::new(10, 42, 5, 2));
        assert_eq!(ipam.allocate("pod-a").expect("again"), a);
        let b = ipam.allocate("pod-b").expect("b");
        assert_eq!(b, Ipv4Addr::new(10, 42, 5, 3));
        assert_eq!(ipam.release("pod-a").expect("release"), Some(a));
        assert_eq!(ipam.release("pod-a").expect("release twice"), None);
        assert_eq!(ipam.allocate("pod-c").expect("c reuses a"), a);
        assert!(ipam.allocate("").is_err());
    }

    #[test]
    fn pod_ips_survive_a_restart_and_a_full_subnet_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let subnet = net("10.42.9.0/29"); // .2 ..= .6 usable
        {
            let ipam = PodIpam::open(dir.path(), subnet).expect("open");
            for i in 0..5 {
                ipam.allocate(&format!("p{i}")).expect("alloc");
            }
            assert!(matches!(ipam.allocate("p5"), Err(NetError::Exhausted(_))));
        }
        let ipam = PodIpam::open(dir.path(), subnet).expect("reopen");
        assert_eq!(ipam.get("p0"), Some(Ipv4Addr::new(10, 42, 9, 2)));
        assert_eq!(ipam.allocations().len(), 5);
        assert!(matches!(
            PodIpam::open(dir.path(), net("10.42.8.0/24")),
            Err(NetError::Corrupt(_))
        ));
        std::fs::write(dir.path().join("net/ipam.json"), b"{not json").expect("write");
        assert!(matches!(
            PodIpam::open(dir.path(), subnet),
            Err(NetError::Corrupt(_))
        ));
    }

    #[test]
    fn a_reserved_address_moves_to_a_pod_persisted_and_never_onto_a_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let subnet = net("10.42.6.0/29"); // .2 ..= .6 usable
        let ipam = PodIpam::open(dir.path(), subnet).expect("open");
        assert_eq!(ipam.free(), 5);
        let pooled = ipam.reserve("pool-1").expect("pool");
        assert!(
            ipam.allocations().is_empty(),
            "a reservation is not an allocation"
        );
        assert!(
            PodIpam::open(dir.path(), subnet)
                .expect("reopen")
                .allocations()
                .is_empty(),
            "nor persisted"
        );
        ipam.allocate("pod-b").expect("b");
        assert_ne!(
            ipam.get("pod-b"),
            Some(pooled),
            "a reserved address is not handed out"
        );
        assert_eq!(ipam.free(), 3);
        assert_eq!(ipam.rename("pool-1", "pod-a").expect("moved"), pooled);
        assert_eq!(ipam.get("pod-a"), Some(pooled));
        assert_eq!(ipam.get("pool-1"), None);
        assert_eq!(ipam.free(), 3);
        assert!(matches!(
            ipam.rename("pod-a", "pod-b"),
            Err(NetError::InUse(_))
        ));
        assert!(ipam.rename("pool-9", "pod-c").is_err(), "nothing held");
        assert_eq!(ipam.get("pod-a"), Some(pooled), "a refused move keeps it");
        let reopened = PodIpam::open(dir.path(), subnet).expect("reopen");
        assert_eq!(reopened.get("pod-a"), Some(pooled));
        assert_eq!(reopened.get("pool-1"), None);
    }

    #[test]
    fn cluster_ips_reserve_kubernetes_and_dns_addresses() {
        let mut alloc = ClusterIpAllocator::new(net(DEFAULT_SERVICE_CIDR));
        alloc
            .allocate_specific(KUBERNETES_SERVICE_IP)
            .expect("kubernetes");
        assert!(matches!(
            alloc.allocate_specific(KUBERNETES_SERVICE_IP),
            Err(NetError::InUse(_))
        ));
        let ips: Vec<_> = (0..9)
            .map(|_| alloc.allocate_next().expect("next"))
            .collect();
        assert!(!ips.contains(&DNS_SERVICE_IP));
        assert!(!ips.contains(&KUBERNETES_SERVICE_IP));
        assert_eq!(ips[0], Ipv4Addr::new(10, 43, 0, 2));
        assert_eq!(ips[8], Ipv4Addr::new(10, 43, 0, 11));
        alloc
            .allocate_specific(DNS_SERVICE_IP)
            .expect("dns by address");
        alloc.release(ips[0]);
        assert_eq!(alloc.allocate_next().expect("reuse"), ips[0]);
        assert!(alloc
            .allocate_specific(Ipv4Addr::new(10, 44, 0, 1))
            .is_err());
        assert!(alloc
            .allocate_specific(Ipv4Addr::new(10, 43, 0, 0))
            .is_err());
    }
}
