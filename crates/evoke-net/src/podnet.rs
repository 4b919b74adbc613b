//! Container-tier pod attachment: a bridge on the node, and per pod a network
//! namespace joined to it by a veth pair, all through rtnetlink.
//!
//! Layout per pod: `<netns_dir>/evoke-<uid>` holds the namespace; inside it
//! `lo` is up and `eth0` has the pod IP/24 with a default route via the
//! bridge address (the subnet's .1). The host end is `ve<hash>`, enslaved to
//! the bridge. Teardown deletes the host end (which destroys its peer),
//! unpins the namespace and releases the address; each step tolerates the
//! thing already being gone, so teardown is idempotent.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tracing::{debug, info};

use crate::ipam::{Ipv4Net, PodIpam};
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

/// The pod network of one node.
pub struct PodNetwork {
    cfg: PodNetConfig,
    ipam: PodIpam,
    node: Handle,
    bridge_index: u32,
}

/// Opens a route-netlink connection whose socket lives in the namespace at
/// `ns` (the socket stays bound to the namespace it was created in).
async fn connect(ns: Option<&Path>) -> Result<Handle, NetError> {
    let rt = tokio::runtime::Handle::current();
    let (conn, handle, _) = netns::run_in(ns, move || {
        let _guard = rt.enter();
        rtnetlink::new_connection()
    })?
    .map_err(|e| {
        NetError::netlink(
            "connect",
            ns.map(|p| p.display().to_string()).unwrap_or_default(),
            e,
        )
    })?;
    // The connection task ends once every handle is dropped.
    tokio::spawn(conn);
    Ok(handle)
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, NetError> {
    match h
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if is_errno(&e, nix::libc::ENODEV) => Ok(None),
        Err(e) => Err(NetError::netlink("get link", name, e)),
    }
}

async fn add_addr(
    h: &Handle,
    index: u32,
    ip: Ipv4Addr,
    prefix: u8,
    what: &str,
) -> Result<(), NetError> {
    match h
        .address()
        .add(index, IpAddr::V4(ip), prefix)
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if is_errno(&e, nix::libc::EEXIST) => Ok(()),
        Err(e) => Err(NetError::netlink(
            "add address",
            format!("{ip}/{prefix} on {what}"),
            e,
        )),
    }
}

/// Sets `lo` up in the namespace at `ns` (a namespace starts with it down).
pub async fn loopback_up(ns: &Path) -> Result<(), NetError> {
    let h = connect(Some(ns)).await?;
    let lo = link_by_name(&h, "lo")
        .await?
        .ok_or_else(|| NetError::netlink("get link", "lo", "missing in the namespace"))?;
    h.link()
        .set(LinkUnspec::new_with_index(lo.header.index).up().build())
        .execute()
        .await
        .map_err(|e| NetError::netlink("set up", format!("lo in {}", ns.display()), e))
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

impl PodNetwork {
    /// Opens IPAM and makes sure the bridge exists, is up and holds the
    /// subnet's gateway address.
    pub async fn new(cfg: PodNetConfig) -> Result<Self, NetError> {
        let ipam = PodIpam::open(&cfg.data_dir, cfg.subnet)?;
        let node = connect(cfg.node_netns.as_deref()).await?;
        let bridge_index = match link_by_name(&node, &cfg.bridge).await? {
            Some(l) => l.header.index,
            None => {
                match node
                    .link()
                    .add(LinkBridge::new(&cfg.bridge).build())
                    .execute()
                    .await
                {
                    Ok(()) => {}
                    Err(e) if is_errno(&e, nix::libc::EEXIST) => {}
                    Err(e) => return Err(NetError::netlink("add bridge", &cfg.bridge, e)),
                }
                link_by_name(&node, &cfg.bridge)
                    .await?
                    .ok_or_else(|| {
                        NetError::netlink("add bridge", &cfg.bridge, "gone after creation")
                    })?
                    .header
                    .index
            }
        };
        add_addr(
            &node,
            bridge_index,
            cfg.subnet.gateway(),
            cfg.subnet.prefix(),
            &cfg.bridge,
        )
        .await?;
        node.link()
            .set(LinkUnspec::new_with_index(bridge_index).up().build())
            .execute()
            .await
            .map_err(|e| NetError::netlink("set up", &cfg.bridge, e))?;
        if let Some(svc) = cfg.service_cidr {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(svc.network(), svc.prefix())
                .output_interface(bridge_index)
                .scope(RouteScope::Link)
                .build();
            match node.route().add(route).execute().await {
                Ok(()) => {}
                Err(e) if is_errno(&e, nix::libc::EEXIST) => {}
                Err(e) => return Err(NetError::netlink("add service route", svc.to_string(), e)),
            }
        }
        // Pods on other nodes and NodePort clients are routed through here.
        netns::run_in(cfg.node_netns.as_deref(), || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1")
        })?
        .map_err(|e| NetError::io(Path::new("/proc/sys/net/ipv4/ip_forward"), e))?;
        info!(bridge = %cfg.bridge, subnet = %cfg.subnet, "pod network ready");
        Ok(Self {
            cfg,
            ipam,
            node,
            bridge_index,
        })
    }

    /// Makes `ip` a local address of the node, held /32 on the bridge: the
    /// cluster DNS address, which every node serves itself.
    pub async fn add_bridge_address(&self, ip: Ipv4Addr) -> Result<(), NetError> {
        add_addr(&self.node, self.bridge_index, ip, 32, &self.cfg.bridge).await
    }

    /// Routes `dst` (another node's pod subnet) via `via` (that node's
    /// address), replacing an older route to `dst`: flannel's host-gw.
    pub async fn route_via(&self, dst: Ipv4Net, via: Ipv4Addr) -> Result<(), NetError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix())
            .gateway(via)
            .build();
        self.node
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|e| NetError::netlink("add route", format!("{dst} via {via}"), e))
    }

    /// Removes the route to `dst` (a node that left); a missing one is fine.
    pub async fn delete_route(&self, dst: Ipv4Net) -> Result<(), NetError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix())
            .build();
        match self.node.route().del(route).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, nix::libc::ESRCH) => Ok(()),
            Err(e) => Err(NetError::netlink("delete route", dst.to_string(), e)),
        }
    }

    /// The address allocator of this node.
    pub fn ipam(&self) -> &PodIpam {
        &self.ipam
    }

    /// The namespace file of pod `uid`.
    pub fn netns_path(&self, uid: &str) -> PathBuf {
        self.cfg.netns_dir.join(format!("evoke-{uid}"))
    }

    /// Gives pod `uid` a namespace, an address and a veth on the bridge.
    /// Calling it again for a set-up pod keeps what is intact and rebuilds
    /// a missing veth, keeping the IP either way.
    pub async fn setup(&self, uid: &str) -> Result<PodAttachment, NetError> {
        if uid.is_empty() || uid.contains('/') {
            return Err(NetError::BadInput(format!("pod uid {uid:?}")));
        }
        let ip = self.ipam.allocate(uid)?;
        if let Some(a) = self.intact(uid, ip).await? {
            return Ok(a);
        }
        match self.attach(uid, ip).await {
            Ok(a) => Ok(a),
            Err(e) => {
                // Leave nothing half-made behind.
                let _ = self.teardown(uid).await;
                Err(e)
            }
        }
    }

    /// The attachment of a pod set up earlier (before an agent restart)
    /// whose namespace and host veth are still there: it is kept as it is,
    /// so its containers' connections survive the restart.
    async fn intact(&self, uid: &str, ip: Ipv4Addr) -> Result<Option<PodAttachment>, NetError> {
        let ns_path = self.netns_path(uid);
        let host = veth_name("ve", uid);
        if !netns::is_netns(&ns_path) {
            return Ok(None);
        }
        let Some(link) = link_by_name(&self.node, &host).await? else {
            return Ok(None);
        };
        self.node
            .link()
            .set(
                LinkUnspec::new_with_index(link.header.index)
                    .controller(self.bridge_index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| NetError::netlink("attach to bridge", &host, e))?;
        debug!(pod = uid, %ip, veth = %host, "pod attachment kept");
        Ok(Some(PodAttachment {
            ip,
            netns: ns_path,
            host_veth: host,
            gateway: self.cfg.subnet.gateway(),
        }))
    }

    async fn attach(&self, uid: &str, ip: Ipv4Addr) -> Result<PodAttachment, NetError> {
        let ns_path = self.netns_path(uid);
        netns::create(&ns_path)?;
        let host = veth_name("ve", uid);
        let peer = veth_name("vp", uid);
        self.delete_link(&host).await?;
        self.node
            .link()
            .add(LinkVeth::new(&host, &peer).build())
            .execute()
            .await
            .map_err(|e| NetError::netlink("add veth", &host, e))?;
        let peer_index = link_by_name(&self.node, &peer)
            .await?
            .ok_or_else(|| NetError::netlink("add veth", &peer, "peer missing"))?
            .header
            .index;
        let ns_file = std::fs::File::open(&ns_path).map_err(|e| NetError::io(&ns_path, e))?;
        self.node
            .link()
            .set(
                LinkUnspec::new_with_index(peer_index)
                    .setns_by_fd(ns_file.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| NetError::netlink("move to pod namespace", &peer, e))?;
        drop(ns_file);
        let host_index = link_by_name(&self.node, &host)
            .await?
            .ok_or_else(|| NetError::netlink("add veth", &host, "host end missing"))?
            .header
            .index;
        self.node
            .link()
            .set(
                LinkUnspec::new_with_index(host_index)
                    .controller(self.bridge_index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| NetError::netlink("attach to bridge", &host, e))?;
        // Hairpin lets a pod reach itself through a Service address: the
        // DNAT-ed packet has to leave through the port it came in on.
        self.node
            .link()
            .set_port(LinkBridgePort::new(host_index).hairpin(true).build())
            .execute()
            .await
            .map_err(|e| NetError::netlink("set hairpin", &host, e))?;

        let pod = connect(Some(&ns_path)).await?;
        let lo = link_by_name(&pod, "lo")
            .await?
            .ok_or_else(|| NetError::netlink("get link", "lo", "missing in pod namespace"))?;
        pod.link()
            .set(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .map_err(|e| NetError::netlink("set up", "lo", e))?;
        let eth = link_by_name(&pod, &peer)
            .await?
            .ok_or_else(|| NetError::netlink("get link", &peer, "not in pod namespace"))?;
        let eth_index = eth.header.index;
        pod.link()
            .set(LinkUnspec::new_with_index(eth_index).name("eth0").build())
            .execute()
            .await
            .map_err(|e| NetError::netlink("rename to eth0", &peer, e))?;
        add_addr(&pod, eth_index, ip, self.cfg.subnet.prefix(), "eth0").await?;
        pod.link()
            .set(LinkUnspec::new_with_index(eth_index).up().build())
            .execute()
            .await
            .map_err(|e| NetError::netlink("set up", "eth0", e))?;
        let gateway = self.cfg.subnet.gateway();
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .output_interface(eth_index)
            .build();
        match pod.route().add(route).execute().await {
            Ok(()) => {}
            Err(e) if is_errno(&e, nix::libc::EEXIST) => {}
            Err(e) => {
                return Err(NetError::netlink(
                    "add default route",
                    format!("via {gateway}"),
                    e,
                ))
            }
        }
        debug!(pod = uid, %ip, veth = %host, "pod attached");
        Ok(PodAttachment {
            ip,
            netns: ns_path,
            host_veth: host,
            gateway,
        })
    }

    async fn delete_link(&self, name: &str) -> Result<(), NetError> {
        if let Some(link) = link_by_name(&self.node, name).await? {
            match self.node.link().del(link.header.index).execute().await {
                Ok(()) => {}
                Err(e) if is_errno(&e, nix::libc::ENODEV) => {}
                Err(e) => return Err(NetError::netlink("delete link", name, e)),
            }
        }
        Ok(())
    }

    /// Creates the tap of microVM pod `uid` on the bridge and allocates its
    /// IP (the guest configures it on its virtio-net). Returns the tap name
    /// and the address; idempotent.
    pub async fn create_tap(&self, uid: &str) -> Result<(String, Ipv4Addr), NetError> {
        if uid.is_empty() || uid.contains('/') {
            return Err(NetError::BadInput(format!("pod uid {uid:?}")));
        }
        let ip = self.ipam.allocate(uid)?;
        let name = veth_name("tp", uid);
        let made = netns::run_in(self.cfg.node_netns.as_deref(), || {
            crate::tap::create_persistent(&name)
        })
        .and_then(|r| r);
        let index = match made {
            Ok(()) => {
                link_by_name(&self.node, &name)
                    .await?
                    .ok_or_else(|| {
                        NetError::netlink("create tap", &name, "missing after creation")
                    })?
                    .header
                    .index
            }
            Err(e) => {
                let _ = self.ipam.release(uid);
                return Err(e);
            }
        };
        self.node
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .controller(self.bridge_index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| NetError::netlink("attach to bridge", &name, e))?;
        Ok((name, ip))
    }

    /// Releases everything pod `uid` held: veth, namespace, address.
    /// Idempotent: a pod with nothing left is not an error.
    pub async fn teardown(&self, uid: &str) -> Result<(), NetError> {
        if uid.is_empty() || uid.contains('/') {
            return Err(NetError::BadInput(format!("pod uid {uid:?}")));
        }
        self.delete_link(&veth_name("ve", uid)).await?;
        // A veth whose move into the namespace failed is still on the node.
        self.delete_link(&veth_name("vp", uid)).await?;
        self.delete_link(&veth_name("tp", uid)).await?;
        netns::remove(&self.netns_path(uid))?;
        self.ipam.release(uid)?;
        debug!(pod = uid, "pod detached");
        Ok(())
    }
}
