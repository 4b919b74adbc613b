//! The node agent's network seam: [`BridgeNetwork`] implements
//! `evoke_node::network::PodNetwork` with the bridge, veth and IPAM of
//! [`PodNetwork`]; [`LoopbackNetwork`] gives each pod a namespace with
//! loopback only (`--flannel-backend none`).
//!
//! The agent calls the seam synchronously from `spawn_blocking` threads, and
//! netlink handles need the runtime their connection task runs on; so this
//! keeps a small runtime of its own and enters it from a fresh thread (a
//! blocking thread of the agent's runtime may not block on another runtime).

use std::path::PathBuf;
use std::sync::Arc;

use evoke_node::network::{PodNet, PodNetwork as NodePodNetwork};
use evoke_node::NodeError;

use crate::podnet::{PodNetConfig, PodNetwork};
use crate::NetError;

/// Bridge networking for the node agent.
pub struct BridgeNetwork {
    rt: Option<tokio::runtime::Runtime>,
    net: Arc<PodNetwork>,
}

fn on_fresh_thread<R: Send>(f: impl FnOnce() -> Result<R, NetError> + Send) -> Result<R, NetError> {
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|_| Err(NetError::BadInput("network thread panicked".into())))
    })
}

impl BridgeNetwork {
    /// Sets up the bridge and IPAM of `cfg`.
    pub fn new(cfg: PodNetConfig) -> Result<Self, NetError> {
        on_fresh_thread(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("evoke-net")
                .enable_all()
                .build()
                .map_err(|e| NetError::io(std::path::Path::new("tokio runtime"), e))?;
            let net = rt.block_on(PodNetwork::new(cfg))?;
            Ok(Self {
                rt: Some(rt),
                net: Arc::new(net),
            })
        })
    }

    /// Makes `ip` a local address of the node (see
    /// [`PodNetwork::add_bridge_address`]).
    pub fn add_bridge_address(&self, ip: std::net::Ipv4Addr) -> Result<(), NetError> {
        self.block(move |net| Box::pin(async move { net.add_bridge_address(ip).await }))
    }

    /// Routes another node's pod subnet (see [`PodNetwork::route_via`]).
    pub fn route_via(&self, dst: crate::Ipv4Net, via: std::net::Ipv4Addr) -> Result<(), NetError> {
        self.block(move |net| Box::pin(async move { net.route_via(dst, via).await }))
    }

    /// Removes the route to a node that left (see [`PodNetwork::delete_route`]).
    pub fn delete_route(&self, dst: crate::Ipv4Net) -> Result<(), NetError> {
        self.block(move |net| Box::pin(async move { net.delete_route(dst).await }))
    }

    /// The pod network behind the seam.
    pub fn pod_network(&self) -> &PodNetwork {
        &self.net
    }

    fn block<R: Send>(
        &self,
        f: impl FnOnce(
                Arc<PodNetwork>,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<R, NetError>> + Send>,
            > + Send,
    ) -> Result<R, NetError> {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| NetError::BadInput("network runtime shut down".into()))?;
        let net = self.net.clone();
        on_fresh_thread(move || rt.block_on(f(net)))
    }
}

impl Drop for BridgeNetwork {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's context panics; this does not.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl NodePodNetwork for BridgeNetwork {
    fn setup(&self, pod_uid: &str, _namespace: &str, _name: &str) -> Result<PodNet, NodeError> {
        let uid = pod_uid.to_string();
        let a = self
            .block(move |net| Box::pin(async move { net.setup(&uid).await }))
            .map_err(|e| NodeError::Network(format!("pod {pod_uid}: {e}")))?;
        Ok(PodNet {
            netns: Some(a.netns),
            ip: Some(a.ip.to_string()),
            mounts: Vec::new(),
        })
    }

    fn teardown(&self, pod_uid: &str) -> Result<(), NodeError> {
        let uid = pod_uid.to_string();
        self.block(move |net| Box::pin(async move { net.teardown(&uid).await }))
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
        let uid = pod_uid.to_string();
        let (tap, ip) = self
            .block(move |net| Box::pin(async move { net.create_tap(&uid).await }))
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
        let made = crate::netns::create(&path).and_then(|()| {
            // One netlink request: a throwaway single-thread runtime on a
            // fresh thread costs less than keeping one, and cannot be
            // shared wrongly between concurrent pod workers.
            on_fresh_thread(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| NetError::io(std::path::Path::new("tokio runtime"), e))?
                    .block_on(crate::podnet::loopback_up(&path))
            })
        });
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
