//! The node agent, the kubelet's job in evoke: it registers this machine
//! as a Node, renews its Lease, and runs the pods bound to it through the
//! tier their RuntimeClass names (process, container or microvm) via
//! [`evoke_runtime::WorkloadRuntime`].
//!
//! Start at [`agent::Agent::run`]; each pod is a [`worker::Worker`] (its
//! lifecycle, restarts and probes). Pure pieces: [`spec`] (pod → workload),
//! [`status`] (records → pod status), [`backoff`], [`probe`], [`volumes`],
//! [`node`] (the Node object), [`token`] (join tokens) and [`network`] (the
//! pod network seam).

pub mod agent;
pub mod backoff;
pub mod ipc;
pub mod logtimes;
pub mod network;
pub mod node;
pub mod portforward;
pub mod probe;
pub mod runtimeclass;
pub mod server;
pub mod spec;
pub mod spread;
pub mod status;
pub mod stream;
pub mod token;
pub mod volumes;
pub mod worker;

pub use agent::{detect_host_ip, Agent, AgentConfig};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("pod {pod} container {container:?}: {reason}")]
    Config {
        pod: String,
        container: String,
        reason: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod network: {0}")]
    Network(String),
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("the pod watch ended")]
    WatchEnded,
    #[error("join token: {0}")]
    Token(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("joining {server}: {reason}")]
    Join { server: String, reason: String },
}
