//! The node agent's network seam: [`BridgeNetwork`] implements
//! `evoke_node::network::PodNetwork` with the bridge, veth and IPAM of
//! [`PodNetwork`]; [`LoopbackNetwork`] gives each pod a namespace with
//! loopback only (`--flannel-backend none`).
//!
//! The agent calls the seam synchronously from `spawn_blocking` threads;
//! the pod network is blocking netlink, so each call does its work on the
//! calling thread, and concurrent pods attach side by side.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use evoke_node::network::{PodNet, PodNetwork as NodePodNetwork};
use evoke_node::NodeError;

use crate::podnet::{PodNetConfig, PodNetwork};
use crate::NetError;

/// Bridge networking for the node agent.
pub struct BridgeNetwork {
    net: Arc<PodNetwork>,
}

impl BridgeNetwork {
    /// Sets up the bridge and IPAM of `cfg`.
    pub fn new(cfg: PodNetConfig) -> Result<Self, NetError> {
        Ok(Self {
            net: Arc::new(PodNetwork::new(cfg)?),
        })
    }

    /// Keeps `size` pod sandboxes ready (see [`PodNetwork::start_pool`]).
    pub fn start_pool(&self, size: usize, idle: Duration) {
        self.net.start_pool(size, idle);
    }

    /// Makes `ip` a local address of the node (see
    /// [`PodNetwork::add_bridge_address`]).
    pub fn add_bridge_address(&self, ip: std::net::Ipv4Addr) -> Result<(), NetError> {
        self.net.add_bridge_address(ip)
    }

    /// Routes another node's pod subnet (see [`PodNetwork::route_via`]).
    pub fn route_via(&self, dst: crate::Ipv4Net, via: std::net::Ipv4Addr) -> Result<(), NetError> {
        self.net.route_via(dst, via)
    }

    /// Removes the route to a node that left (see [`PodNetwork::delete_route`]).
    pub fn delete_route(&self, dst: crate::Ipv4Net) -> Result<(), NetError> {
        self.net.delete_route(dst)
    }

    /// The pod network behind the seam.
    pub fn pod_network(&self) -> &PodNetwork {
        &self.net
    }
}

impl NodePodNetwork for BridgeNetwork {
    fn setup(&self, pod_uid: &str, _namespace: &str, _name: &str) -> Result<PodNet, NodeError> {
        let a = self
            .net
            .setup(pod_uid)
            .map_err(|e| NodeError::Network(format!("pod {pod_uid}: {e}")))?;
        Ok(PodNet {
            netns: Some(a.netns),
            ip: Some(a.ip.to_string()),
            mounts: Vec::new(),
        })
    }

    fn teardown(&self, pod_uid: &str) -> Result<(), NodeError> {
        self.net
            .teardown(pod_uid)
            .map_err(|e| NodeError::Network(format!("pod {pod_uid}: {e}")))
    }

    /// A tap on the bridge and an address from the node's subnet, for the
    /// guest's eth0 (its gateway is the bridge, as for veth pods).
    fn setup_vm(
        &self,
        pod_uid: &str,
        _namespace: &str,
        _name: &str,
    ) -> Result<Option<evoke_runtime::GuestNetwork>, NodeError> {
        let (tap, ip) = self
            .net
            .create_tap(pod_uid)
            .map_err(|e| NodeError::Network(format!("pod {pod_uid}: {e}")))?;
        let subnet = self.net.ipam().subnet();
        Ok(Some(evoke_runtime::GuestNetwork {
            tap,
            address: ip,
            prefix_len: subnet.prefix(),
            gateway: Some(subnet.gateway()),
            resolv_conf: None,
        }))
    }
}

/// A network namespace per pod with only `lo`, up: the containers of a pod
/// share it, and nothing leaves it (`--flannel-backend none`). Made with
/// netlink and a bind mount, like the bridge network's, not with `ip`.
pub struct LoopbackNetwork {
    netns_dir: PathBuf,
}

impl LoopbackNetwork {
    /// Namespaces under `netns_dir` (`/run/netns` on a node).
    pub fn new(netns_dir: impl Into<PathBuf>) -> Self {
        Self {
            netns_dir: netns_dir.into(),
        }
    }

    /// The namespace file of pod `uid`.
    pub fn netns_path(&self, uid: &str) -> PathBuf {
        self.netns_dir.join(format!("evoke-{uid}"))
    }
}

impl NodePodNetwork for LoopbackNetwork {
    fn setup(&self, pod_uid: &str, _namespace: &str, _name: &str) -> Result<PodNet, NodeError> {
        if pod_uid.is_empty() || pod_uid.contains('/') {
            return Err(NodeError::Network(format!("bad pod uid {pod_uid:?}")));
        }
        let path = self.netns_path(pod_uid);
        // The thread that makes the namespace sets its `lo` up from inside.
        let made = if crate::netns::is_netns(&path) {
            crate::podnet::loopback_up(&path)
        } else {
            crate::netns::create_then(&path, || -> Result<(), NetError> {
                let mut sock = crate::rtnl::Rtnl::open()
                    .map_err(|e| NetError::netlink("connect", path.display().to_string(), e))?;
                crate::podnet::lo_up(&mut sock, &path)
            })
            .and_then(|r| r)
        };
        if let Err(e) = made {
            let _ = crate::netns::remove(&path);
            return Err(NodeError::Network(format!("pod {pod_uid}: {e}")));
        }
        Ok(PodNet {
            netns: Some(path),
            ip: None,
            mounts: Vec::new(),
        })
    }

    fn teardown(&self, pod_uid: &str) -> Result<(), NodeError> {
        if pod_uid.is_empty() || pod_uid.contains('/') {
            return Err(NodeError::Network(format!("bad pod uid {pod_uid:?}")));
        }
        crate::netns::remove(&self.netns_path(pod_uid))
            .map_err(|e| NodeError::Network(format!("pod {pod_uid}: {e}")))
    }
}
