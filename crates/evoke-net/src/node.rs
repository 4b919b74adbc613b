//! The node agent's network seam: [`BridgeNetwork`] implements
//! `evoke_node::network::PodNetwork` with the bridge, veth and IPAM of
//! [`PodNetwork`].
//!
//! The agent calls the seam synchronously from `spawn_blocking` threads, and
//! netlink handles need the runtime their connection task runs on; so this
//! keeps a small runtime of its own and enters it from a fresh thread (a
//! blocking thread of the agent's runtime may not block on another runtime).

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
