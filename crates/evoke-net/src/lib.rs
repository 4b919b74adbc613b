//! Pod network: IPAM, bridge + veth (or tap, for microVMs) pod attachment, Services in
//! nftables, cluster DNS.
//!
//! Start reading at [`ipam`] (node subnets, pod IPs, ClusterIPs), then
//! [`podnet::PodNetwork`] (namespaces, bridge, veth, routes over [`rtnl`], a
//! blocking route-netlink client that sends requests in batches; [`pool`]
//! keeps a few pod sandboxes ready so a new pod's network is a hand-over),
//! [`nft`] (the ServiceProxy's rules), [`dns`] (cluster DNS answers) and
//! [`node::BridgeNetwork`] (the node agent's network seam); [`proxy::ServiceProxy`]
//! watches Services and EndpointSlices and drives both. [`cluster`] is how
//! `evoke server` and `evoke agent` put it all together.

pub mod cluster;
pub mod dns;
pub mod ipam;
pub mod k8s;
pub mod netns;
pub mod nft;
pub mod node;
pub mod podnet;
pub mod pool;
pub mod proxy;
pub mod rtnl;
mod tap;

use std::path::{Path, PathBuf};

pub use ipam::{ClusterIpAllocator, Ipv4Net, PodIpam};
pub use podnet::{PodNetConfig, PodNetwork};

/// Errors of the pod network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A malformed CIDR.
    #[error("bad cidr {0:?}")]
    BadCidr(String),
    /// Bad input from the caller.
    #[error("bad input: {0}")]
    BadInput(String),
    /// No free address left.
    #[error("no free address left in {0}")]
    Exhausted(String),
    /// An address asked for is held already.
    #[error("address {0} is already allocated")]
    InUse(String),
    /// A state file that cannot be read back.
    #[error("corrupt network state {0}")]
    Corrupt(String),
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// the file involved
        path: PathBuf,
        /// the cause
        source: std::io::Error,
    },
    /// A namespace operation failed.
    #[error("network namespace {path}: {op}: {source}")]
    Netns {
        /// the namespace file
        path: PathBuf,
        /// what was being done
        op: &'static str,
        /// the cause
        source: nix::Error,
    },
    /// A netlink request failed.
    #[error("netlink {op} {target}: {message}")]
    Netlink {
        /// what was being done
        op: &'static str,
        /// the link or address involved
        target: String,
        /// the kernel's or library's answer
        message: String,
    },
    /// The nft binary failed.
    #[error("nft: {0}")]
    Nft(String),
}

impl NetError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn netlink(
        op: &'static str,
        target: impl Into<String>,
        e: impl std::fmt::Display,
    ) -> Self {
        Self::Netlink {
            op,
            target: target.into(),
            message: e.to_string(),
        }
    }
}
