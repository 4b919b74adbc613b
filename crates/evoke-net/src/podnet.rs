//! Container-tier pod attachment: a bridge on the node, and per pod a network
//! namespace joined to it by a veth pair, all through route netlink.
//!
//! Layout per pod: `<netns_dir>/evoke-<uid>` holds the namespace; inside it
//! `lo` is up and `eth0` has the pod IP/24 with a default route via the
//! bridge address (the subnet's .1). The host end is `ve<hash>`, enslaved to
//! the bridge. Teardown deletes the host end (which destroys its peer),
//! unpins the namespace and releases the address; each step tolerates the
//! thing already being gone, so teardown is idempotent.
//!
//! Attaching a pod is two `sendmsg` calls ([`crate::rtnl`]): one on the
//! node's side creates the veth pair with its host end already on the
//! bridge and up and its peer already named `eth0` inside the pod's
//! namespace (IFLA_NET_NS_FD), sets hairpin and reads the peer's index; one
//! on the pod's side sets `lo` and `eth0` up, adds the address and the
//! default route. Everything is blocking and runs on the caller's thread:
//! pods attach in parallel, each with its own sockets, and only the
//! kernel's RTNL lock orders them.
//!
//! With a pool ([`PodNetwork::start_pool`], see [`crate::pool`]) a new pod
//! takes a sandbox made beforehand instead: an IPAM update, one netlink
//! request (the host veth takes the pod's name) and a bind mount pinning
//! the namespace under the pod's name.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::link::{InfoData, InfoPortKind, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::packet_route::RouteNetlinkMessage as Msg;
use rtnetlink::{
    AddressMessageBuilder, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};
use tracing::{debug, info, warn};

use crate::ipam::{Ipv4Net, PodIpam};
use crate::pool::{self, Pool, Sandbox, KEY_PREFIX};
use crate::rtnl::{self, Rtnl, CHANGE, CREATE, REPLACE};
use crate::{netns, NetError};

/// Where and how pods are attached.
#[derive(Debug, Clone)]
pub struct PodNetConfig {
    /// The node's data directory; IPAM state lives in `<data_dir>/net/`.
    pub data_dir: PathBuf,
    /// This node's pod subnet (a /24 of the cluster pod CIDR).
    pub subnet: Ipv4Net,
    /// The bridge name (`evoke0`).
    pub bridge: String,
    /// Directory holding the pod namespace files (`/run/netns`).
    pub netns_dir: PathBuf,
    /// The namespace the bridge lives in; `None` is the caller's own. Tests
    /// and multi-node setups on one machine point this at a node namespace.
    pub node_netns: Option<PathBuf>,
    /// The Service CIDR, routed to the bridge so that Service addresses
    /// reach the nat hooks even on a node without a default route.
    pub service_cidr: Option<Ipv4Net>,
}

impl PodNetConfig {
    /// Defaults for a node: bridge `evoke0`, namespaces in `/run/netns`.
    pub fn new(data_dir: impl Into<PathBuf>, subnet: Ipv4Net) -> Self {
        Self {
            data_dir: data_dir.into(),
            subnet,
            bridge: "evoke0".into(),
            netns_dir: PathBuf::from("/run/netns"),
            node_netns: None,
            service_cidr: None,
        }
    }
}

/// What a pod got from [`PodNetwork::setup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAttachment {
    /// The pod IP (goes to status.podIP).
    pub ip: Ipv4Addr,
    /// The pod's network namespace file, for the container tier to join.
    pub netns: PathBuf,
    /// The host end of the veth pair.
    pub host_veth: String,
    /// The default gateway (the bridge address).
    pub gateway: Ipv4Addr,
}

/// How many idle node-side sockets are kept for reuse.
const IDLE_SOCKETS: usize = 8;

/// The pod network of one node.
pub struct PodNetwork {
    cfg: PodNetConfig,
    ipam: PodIpam,
    bridge_index: u32,
    /// Idle sockets in the node's namespace: each attach takes one (or
    /// opens one), so concurrent attaches never wait for each other here.
    idle: Mutex<Vec<Rtnl>>,
    /// Pre-made sandboxes (empty unless [`PodNetwork::start_pool`] ran).
    pool: Arc<Pool>,
}

/// A node-side socket lent out by [`PodNetwork::node`]; it goes back to
/// the pool when dropped.
struct Lent<'a> {
    pool: &'a Mutex<Vec<Rtnl>>,
    sock: Option<Rtnl>,
}

impl std::ops::Deref for Lent<'_> {
    type Target = Rtnl;
    fn deref(&self) -> &Rtnl {
        self.sock.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Lent<'_> {
    fn deref_mut(&mut self) -> &mut Rtnl {
        self.sock.as_mut().expect("present until dropped")
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let mut idle = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_SOCKETS {
            idle.extend(self.sock.take());
        }
    }
}

/// A route-netlink socket in the namespace at `ns` (`None`: the caller's).
fn open(ns: Option<&Path>) -> Result<Rtnl, NetError> {
    let what = || ns.map(|p| p.display().to_string()).unwrap_or_default();
    match ns {
        None => Rtnl::open(),
        Some(p) => netns::run_in(Some(p), Rtnl::open)?,
    }
    .map_err(|e| NetError::netlink("connect", what(), e))
}

/// The answer to one request, or the error naming `op` and `target`;
/// errors listed in `ok` count as success (the thing exists, or is gone).
fn answer(
    a: rtnl::Answer,
    op: &'static str,
    target: impl Into<String>,
    ok: &[i32],
) -> Result<Option<Msg>, NetError> {
    match a {
        Ok(m) => Ok(m),
        Err(e) if ok.contains(&e) => Ok(None),
        Err(e) => Err(NetError::netlink(op, target, rtnl::describe(e))),
    }
}

fn io_err<'a>(op: &'static str, target: &'a str) -> impl FnOnce(std::io::Error) -> NetError + 'a {
    move |e| NetError::netlink(op, target, e)
}

fn link_by_name(sock: &mut Rtnl, name: &str) -> Result<Option<LinkMessage>, NetError> {
    sock.link(name)
        .map_err(io_err("get link", name))?
        .map_err(|e| NetError::netlink("get link", name, rtnl::describe(e)))
}

fn addr_msg(index: u32, ip: Ipv4Addr, prefix: u8) -> Msg {
    let m: AddressMessage = AddressMessageBuilder::<Ipv4Addr>::new()
        .index(index)
        .address(ip, prefix)
        .build();
    Msg::NewAddress(m)
}

fn up(index: u32) -> Msg {
    Msg::SetLink(LinkUnspec::new_with_index(index).up().build())
}

/// Sets `lo` up in the namespace at `ns` (a namespace starts with it down).
pub fn loopback_up(ns: &Path) -> Result<(), NetError> {
    let mut sock = open(Some(ns))?;
    lo_up(&mut sock, ns)
}

/// `lo` is interface 1 in every namespace (LOOPBACK_IFINDEX).
pub(crate) fn lo_up(sock: &mut Rtnl, ns: &Path) -> Result<(), NetError> {
    let a = sock
        .request(up(1), CHANGE)
        .map_err(io_err("set up", "lo"))?;
    answer(a, "set up", format!("lo in {}", ns.display()), &[]).map(|_| ())
}

/// A stable interface name for pod `uid` (IFNAMSIZ allows 15 characters).
pub fn veth_name(prefix: &str, uid: &str) -> String {
    // FNV-1a: short, stable across runs and builds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{prefix}{:012x}", h & 0xffff_ffff_ffff)
}

/// The host end of pod `uid`'s veth: `ve<hash>`; a pooled sandbox's is
/// `vq<hash of its key>` until a pod takes it, so the node's `ve` links
/// are its pods'.
fn host_veth(uid: &str) -> String {
    match uid.starts_with(KEY_PREFIX) {
        true => veth_name("vq", uid),
        false => veth_name("ve", uid),
    }
}

fn check_uid(uid: &str) -> Result<(), NetError> {
    if uid.is_empty() || uid.contains('/') {
        return Err(NetError::BadInput(format!("pod uid {uid:?}")));
    }
    Ok(())
}

impl PodNetwork {
    /// Opens IPAM and makes sure the bridge exists, is up and holds the
    /// subnet's gateway address.
    pub fn new(cfg: PodNetConfig) -> Result<Self, NetError> {
        let ipam = PodIpam::open(&cfg.data_dir, cfg.subnet)?;
        let mut node = open(cfg.node_netns.as_deref())?;
        let bridge = match link_by_name(&mut node, &cfg.bridge)? {
            Some(l) => l,
            None => {
                let add = LinkBridge::new(&cfg.bridge).build();
                let a = node
                    .request(Msg::NewLink(add), CREATE)
                    .map_err(io_err("add bridge", &cfg.bridge))?;
                answer(a, "add bridge", &cfg.bridge, &[libc::EEXIST])?;
                link_by_name(&mut node, &cfg.bridge)?.ok_or_else(|| {
                    NetError::netlink("add bridge", &cfg.bridge, "gone after creation")
                })?
            }
        };
        let bridge_index = bridge.header.index;
        let gw = cfg.subnet.gateway();
        let mut reqs = vec![
            (addr_msg(bridge_index, gw, cfg.subnet.prefix()), CREATE),
            (up(bridge_index), CHANGE),
        ];
        // A bridge whose address was never set takes the lowest of its
        // ports' addresses, so it changed as pods (and pooled sandboxes)
        // came and went, and every pod's ARP entry for its gateway went
        // stale: seconds of lost packets to the gateway, the cluster DNS
        // and every Service. Setting the address it has pins it.
        let mac = bridge.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(mac.clone()),
            _ => None,
        });
        let pin = mac.is_some();
        if let Some(mac) = mac {
            reqs.push((
                Msg::SetLink(
                    LinkUnspec::new_with_index(bridge_index)
                        .address(mac)
                        .build(),
                ),
                CHANGE,
            ));
        }
        if let Some(svc) = cfg.service_cidr {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(svc.network(), svc.prefix())
                .output_interface(bridge_index)
                .scope(RouteScope::Link)
                .build();
            reqs.push((Msg::NewRoute(route), CREATE));
        }
        let answers = node.batch(reqs).map_err(io_err("set up", &cfg.bridge))?;
        let mut answers = answers.into_iter();
        let mut next = || answers.next().unwrap_or(Err(libc::EIO));
        answer(
            next(),
            "add address",
            format!("{gw}/{} on {}", cfg.subnet.prefix(), cfg.bridge),
            &[libc::EEXIST],
        )?;
        answer(next(), "set up", &cfg.bridge, &[])?;
        if pin {
            answer(next(), "pin the address of", &cfg.bridge, &[])?;
        }
        if let Some(svc) = cfg.service_cidr {
            answer(
                next(),
                "add service route",
                svc.to_string(),
                &[libc::EEXIST],
            )?;
        }
        // Pods on other nodes and NodePort clients are routed through here.
        netns::run_in(cfg.node_netns.as_deref(), || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1")
        })?
        .map_err(|e| NetError::io(Path::new("/proc/sys/net/ipv4/ip_forward"), e))?;
        info!(bridge = %cfg.bridge, subnet = %cfg.subnet, "pod network ready");
        let net = Self {
            cfg,
            ipam,
            bridge_index,
            idle: Mutex::new(vec![node]),
            pool: Arc::default(),
        };
        net.reclaim_pool();
        Ok(net)
    }

    /// Tears down pooled sandboxes an earlier run left (a killed process
    /// cannot tear its pool down): IPAM still holds their keys.
    fn reclaim_pool(&self) {
        let keys: Vec<String> = self
            .ipam
            .allocations()
            .into_keys()
            .filter(|k| k.starts_with(KEY_PREFIX))
            .collect();
        for key in &keys {
            if let Err(e) = self.teardown(key) {
                warn!(%key, error = %e, "cannot reclaim a pooled pod sandbox");
            }
        }
        if !keys.is_empty() {
            info!(
                count = keys.len(),
                "reclaimed pooled pod sandboxes of an earlier run"
            );
        }
    }

    /// Keeps `size` pod sandboxes ready (0: none), refilled on a thread of
    /// its own once no pod set-up or teardown has run for `idle`; see
    /// [`crate::pool`]. They are torn down when the network is dropped.
    pub fn start_pool(self: &Arc<Self>, size: usize, idle: Duration) {
        pool::start(self, size, idle);
    }

    /// How many pre-made sandboxes are ready now.
    pub fn pooled(&self) -> usize {
        self.pool.ready()
    }

    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Makes one sandbox for the pool: a namespace held by an fd (nothing
    /// pinned, so a killed process leaves nothing behind), its veth on the
    /// bridge and eth0 configured with an address IPAM reserves in memory.
    pub(crate) fn make_pooled(&self) -> Result<Sandbox, NetError> {
        use std::hash::{BuildHasher, Hasher};
        // A random key (std's hasher keys are random per process and per
        // call): pool names must not collide across nodes sharing a host.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let key = format!("{KEY_PREFIX}{:016x}", h.finish());
        if self.ipam.get(&key).is_some() {
            return Err(NetError::InUse(key));
        }
        let ip = self.ipam.reserve(&key)?;
        let made = netns::create_held(Rtnl::open).and_then(|(ns, sock)| {
            let mut pod = sock.map_err(|e| NetError::netlink("connect", &key, e))?;
            let mut node = self.node()?;
            let host = self.wire(&mut node, &host_veth(&key), ns.as_fd(), &mut pod, ip)?;
            Ok((ns, host))
        });
        match made {
            Ok((ns, host)) => Ok(Sandbox { key, ns, host }),
            Err(e) => {
                let _ = self.teardown(&key);
                Err(e)
            }
        }
    }

    /// A socket in the node's namespace, lent until dropped.
    fn node(&self) -> Result<Lent<'_>, NetError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let sock = match idle {
            Some(s) => s,
            None => open(self.cfg.node_netns.as_deref())?,
        };
        Ok(Lent {
            pool: &self.idle,
            sock: Some(sock),
        })
    }

    /// Makes `ip` a local address of the node, held /32 on the bridge: the
    /// cluster DNS address, which every node serves itself.
    pub fn add_bridge_address(&self, ip: Ipv4Addr) -> Result<(), NetError> {
        let a = self
            .node()?
            .request(addr_msg(self.bridge_index, ip, 32), CREATE)
            .map_err(io_err("add address", &self.cfg.bridge))?;
        answer(
            a,
            "add address",
            format!("{ip}/32 on {}", self.cfg.bridge),
            &[libc::EEXIST],
        )
        .map(|_| ())
    }

    /// Routes `dst` (another node's pod subnet) via `via` (that node's
    /// address), replacing an older route to `dst`: flannel's host-gw.
    pub fn route_via(&self, dst: Ipv4Net, via: Ipv4Addr) -> Result<(), NetError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix())
            .gateway(via)
            .build();
        let target = format!("{dst} via {via}");
        let a = self
            .node()?
            .request(Msg::NewRoute(route), REPLACE)
            .map_err(io_err("add route", &target))?;
        answer(a, "add route", target, &[]).map(|_| ())
    }

    /// Removes the route to `dst` (a node that left); a missing one is fine.
    pub fn delete_route(&self, dst: Ipv4Net) -> Result<(), NetError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix())
            .build();
        let target = dst.to_string();
        let a = self
            .node()?
            .request(Msg::DelRoute(route), CHANGE)
            .map_err(io_err("delete route", &target))?;
        answer(a, "delete route", target, &[libc::ESRCH]).map(|_| ())
    }

    /// The address allocator of this node.
    pub fn ipam(&self) -> &PodIpam {
        &self.ipam
    }

    /// The namespace file of pod `uid`.
    pub fn netns_path(&self, uid: &str) -> PathBuf {
        self.cfg.netns_dir.join(format!("evoke-{uid}"))
    }

    /// Gives pod `uid` a namespace, an address and a veth on the bridge:
    /// a pre-made sandbox when the pool has one and the pod has nothing yet.
    /// Calling it again for a set-up pod keeps what is intact and rebuilds
    /// a missing veth, keeping the IP either way.
    pub fn setup(&self, uid: &str) -> Result<PodAttachment, NetError> {
        check_uid(uid)?;
        let _busy = self.pool.busy();
        if !uid.starts_with(KEY_PREFIX) && self.ipam.get(uid).is_none() {
            if let Some(sandbox) = self.pool.take() {
                match self.hand_over(&sandbox, uid) {
                    Ok(a) => {
                        debug!(pod = uid, key = %sandbox.key, ip = %a.ip, "pod took a pre-made sandbox");
                        return Ok(a);
                    }
                    Err(e) => {
                        warn!(pod = uid, key = %sandbox.key, error = %e, "cannot hand a pooled sandbox over; setting up the pod's own");
                        let _ = self.teardown(&sandbox.key);
                    }
                }
            }
        }
        self.attach_uid(uid)
    }

    /// Gives the pooled sandbox `key` (its namespace `ns`) to pod `uid`.
    /// The address is the pod's first, persisted: a crash after that step
    /// leaves a pod whose own set-up rebuilds namespace and veth around the
    /// same address (the pooled namespace and its veth die with the process).
    fn hand_over(&self, sandbox: &Sandbox, uid: &str) -> Result<PodAttachment, NetError> {
        let (key, ns) = (sandbox.key.as_str(), sandbox.ns.as_fd());
        let (host, pooled) = (host_veth(uid), host_veth(key));
        let to = self.netns_path(uid);
        if netns::is_netns(&to) {
            return Err(NetError::BadInput(format!(
                "pod {uid} has a namespace already"
            )));
        }
        let ip = self.ipam.rename(key, uid)?;
        let made = (|| {
            // The host end takes the pod's veth name (a veth may be renamed
            // while up on current kernels; older ones want it down first).
            let rename = |up: bool| {
                let mut m = LinkUnspec::new_with_index(sandbox.host);
                if up {
                    m = m.up();
                }
                let mut msg = m.build();
                msg.attributes.push(LinkAttribute::IfName(host.clone()));
                msg
            };
            let mut node = self.node()?;
            let a = node
                .request(Msg::SetLink(rename(false)), CHANGE)
                .map_err(io_err("rename", &pooled))?;
            if a == Err(libc::EBUSY) {
                let down = LinkUnspec::new_with_index(sandbox.host).down().build();
                let answers = node
                    .batch(vec![
                        (Msg::SetLink(down), CHANGE),
                        (Msg::SetLink(rename(true)), CHANGE),
                    ])
                    .map_err(io_err("rename", &pooled))?;
                for a in answers {
                    answer(a, "rename", format!("{pooled} to {host}"), &[])?;
                }
            } else {
                answer(a, "rename", format!("{pooled} to {host}"), &[])?;
            }
            drop(node);
            netns::pin(ns, &to)
        })();
        match made {
            Ok(()) => Ok(PodAttachment {
                ip,
                netns: to,
                host_veth: host,
                gateway: self.cfg.subnet.gateway(),
            }),
            Err(e) => {
                let _ = self.teardown(uid);
                Err(e)
            }
        }
    }

    /// [`PodNetwork::setup`] without the pool.
    fn attach_uid(&self, uid: &str) -> Result<PodAttachment, NetError> {
        let ip = self.ipam.allocate(uid)?;
        let host = host_veth(uid);
        let ns_path = self.netns_path(uid);
        let mut node = self.node()?;
        let existing = link_by_name(&mut node, &host)?;
        let made = match existing {
            // Set up earlier (before an agent restart) and still there: kept
            // as it is, so its containers' connections survive the restart.
            Some(link) if netns::is_netns(&ns_path) => {
                self.reattach(&mut node, &host, link.header.index)
            }
            stale => self.attach(&mut node, uid, ip, stale.map(|l| l.header.index)),
        };
        drop(node);
        match made {
            Ok(()) => {
                debug!(pod = uid, %ip, veth = %host, "pod attached");
                Ok(PodAttachment {
                    ip,
                    netns: ns_path,
                    host_veth: host,
                    gateway: self.cfg.subnet.gateway(),
                })
            }
            Err(e) => {
                // Leave nothing half-made behind.
                let _ = self.teardown(uid);
                Err(e)
            }
        }
    }

    /// Puts a kept host veth back on the bridge, up.
    fn reattach(&self, node: &mut Rtnl, host: &str, index: u32) -> Result<(), NetError> {
        let set = LinkUnspec::new_with_index(index)
            .controller(self.bridge_index)
            .up()
            .build();
        let a = node
            .request(Msg::SetLink(set), CHANGE)
            .map_err(io_err("attach to bridge", host))?;
        answer(a, "attach to bridge", host, &[]).map(|_| ())
    }

    fn attach(
        &self,
        node: &mut Rtnl,
        uid: &str,
        ip: Ipv4Addr,
        stale_host: Option<u32>,
    ) -> Result<(), NetError> {
        let ns_path = self.netns_path(uid);
        let host = host_veth(uid);
        if let Some(index) = stale_host {
            let del = LinkUnspec::new_with_index(index).build();
            let a = node
                .request(Msg::DelLink(del), CHANGE)
                .map_err(io_err("delete link", &host))?;
            answer(a, "delete link", &host, &[libc::ENODEV])?;
        }
        // The pod's socket is made inside the namespace by the thread that
        // creates it; a namespace kept from an earlier attempt gets one
        // from a thread that joins it.
        let mut pod = if netns::is_netns(&ns_path) {
            open(Some(&ns_path))?
        } else {
            netns::create_then(&ns_path, Rtnl::open)?
                .map_err(|e| NetError::netlink("connect", ns_path.display().to_string(), e))?
        };
        let ns_file = std::fs::File::open(&ns_path).map_err(|e| NetError::io(&ns_path, e))?;
        self.wire(node, &host, ns_file.as_fd(), &mut pod, ip)
            .map(|_| ())
    }

    /// Joins the namespace `ns` (whose route-netlink socket is `pod`) to the
    /// bridge through the veth `host`, and gives its eth0 `ip`; returns the
    /// host end's index.
    fn wire(
        &self,
        node: &mut Rtnl,
        host: &str,
        ns: BorrowedFd<'_>,
        pod: &mut Rtnl,
        ip: Ipv4Addr,
    ) -> Result<u32, NetError> {
        // Node side, one sendmsg: the pair (host end on the bridge and up,
        // peer born as eth0 in the pod's namespace), hairpin on the bridge
        // port (a pod reaching itself through a Service address needs the
        // DNAT-ed packet to leave through the port it came in on), and the
        // host end read back for the peer's index.
        let peer = LinkUnspec::new_with_name("eth0")
            .append_extra_attribute(LinkAttribute::NetNsFd(ns.as_raw_fd()))
            .build();
        let pair = LinkVeth::new(host, "eth0")
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .controller(self.bridge_index)
            .up()
            .build();
        let hairpin = LinkMessageBuilder::<LinkBridgePort>::default()
            .name(host.to_string())
            .set_port_kind(InfoPortKind::Bridge)
            .hairpin(true)
            .build();
        let get = LinkUnspec::new_with_name(host).build();
        let answers = node
            .batch(vec![
                (Msg::NewLink(pair), CREATE),
                (Msg::NewLink(hairpin), CHANGE),
                (Msg::GetLink(get), CHANGE),
            ])
            .map_err(io_err("add veth", host))?;
        let mut answers = answers.into_iter();
        let mut next = || answers.next().unwrap_or(Err(libc::EIO));
        answer(next(), "add veth", host, &[])?;
        answer(next(), "set hairpin", host, &[])?;
        let (host_index, eth0) = match answer(next(), "get link", host, &[])? {
            Some(Msg::NewLink(l)) => (rtnl::index_of(&l), rtnl::peer_index(&l)),
            _ => return Err(NetError::netlink("get link", host, "no answer")),
        };

        // Pod side, one sendmsg.
        let gateway = self.cfg.subnet.gateway();
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(eth0)
            .build();
        let answers = pod
            .batch(vec![
                (up(1), CHANGE),
                (up(eth0), CHANGE),
                (addr_msg(eth0, ip, self.cfg.subnet.prefix()), CREATE),
                (Msg::NewRoute(route), CREATE),
            ])
            .map_err(io_err("configure", "eth0"))?;
        let mut answers = answers.into_iter();
        let mut next = || answers.next().unwrap_or(Err(libc::EIO));
        answer(next(), "set up", "lo", &[])?;
        answer(next(), "set up", "eth0", &[])?;
        answer(
            next(),
            "add address",
            format!("{ip}/{} on eth0", self.cfg.subnet.prefix()),
            &[libc::EEXIST],
        )?;
        answer(
            next(),
            "add default route",
            format!("via {gateway}"),
            &[libc::EEXIST],
        )?;
        Ok(host_index)
    }

    /// Creates the tap of microVM pod `uid` on the bridge and allocates its
    /// IP (the guest configures it on its virtio-net). Returns the tap name
    /// and the address; idempotent.
    pub fn create_tap(&self, uid: &str) -> Result<(String, Ipv4Addr), NetError> {
        check_uid(uid)?;
        let ip = self.ipam.allocate(uid)?;
        let name = veth_name("tp", uid);
        let made = netns::run_in(self.cfg.node_netns.as_deref(), || {
            crate::tap::create_persistent(&name)
        })
        .and_then(|r| r);
        if let Err(e) = made {
            let _ = self.ipam.release(uid);
            return Err(e);
        }
        let set = LinkUnspec::new_with_name(&name)
            .controller(self.bridge_index)
            .up()
            .build();
        let a = self
            .node()?
            .request(Msg::SetLink(set), CHANGE)
            .map_err(io_err("attach to bridge", &name))?;
        answer(a, "attach to bridge", &name, &[])?;
        Ok((name, ip))
    }

    /// Releases everything pod `uid` held: veth, namespace, address.
    /// Idempotent: a pod with nothing left is not an error.
    pub fn teardown(&self, uid: &str) -> Result<(), NetError> {
        check_uid(uid)?;
        let _busy = self.pool.busy();
        // The host end (its peer goes with it), a peer left on the node by
        // an older agent whose move into the namespace failed, and a tap:
        // one sendmsg, each gone or never made is fine.
        let names = [host_veth(uid), veth_name("vp", uid), veth_name("tp", uid)];
        let reqs = names
            .iter()
            .map(|n| (Msg::DelLink(LinkUnspec::new_with_name(n).build()), CHANGE))
            .collect();
        let answers = self
            .node()?
            .batch(reqs)
            .map_err(io_err("delete link", &names[0]))?;
        for (a, n) in answers.into_iter().zip(names.iter()) {
            answer(a, "delete link", n.as_str(), &[libc::ENODEV])?;
        }
        netns::remove(&self.netns_path(uid))?;
        self.ipam.release(uid)?;
        debug!(pod = uid, "pod detached");
        Ok(())
    }
}

impl PodNetwork {
    /// Stops the pool and tears its sandboxes down; when this returns no
    /// pooled sandbox is left (pods' sandboxes stay: their workloads are
    /// adopted by the next run). Dropping the network does the same, but
    /// the refill thread may hold the last handle for a moment, and then
    /// the teardown happens on that thread after the drop.
    pub fn stop_pool(&self) {
        let ready = self.pool.stop();
        let keys: Vec<String> = ready.into_iter().map(|s| s.key).collect();
        for key in &keys {
            if let Err(e) = self.teardown(key) {
                warn!(%key, error = %e, "cannot tear a pooled pod sandbox down");
            }
        }
        if !keys.is_empty() {
            debug!(count = keys.len(), "pooled pod sandboxes torn down");
        }
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.stop_pool();
    }
}
