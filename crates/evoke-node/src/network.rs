//! Pod networking seam. The agent asks a [`PodNetwork`] for each pod's
//! network namespace and IP; evoke-net plugs its implementations in here
//! (the bridge with IPAM, and a loopback-only namespace per pod), and
//! [`HostNetwork`] runs pods in the host's network (the process tier).

use std::path::PathBuf;

use crate::NodeError;

/// What the network set up for one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodNet {
    /// The namespace the pod's containers join; None is the host's.
    pub netns: Option<PathBuf>,
    /// The pod's IP; None when the pod has no address of its own.
    pub ip: Option<String>,
    /// Files the network gives every container of the pod, e.g. the
    /// cluster DNS `/etc/resolv.conf`; they win over the tier's defaults.
    pub mounts: Vec<evoke_runtime::Mount>,
}

/// Gives pods a network. Both calls must be idempotent: the agent repeats
/// them after a restart.
pub trait PodNetwork: Send + Sync {
    fn setup(&self, pod_uid: &str, namespace: &str, name: &str) -> Result<PodNet, NodeError>;
    fn teardown(&self, pod_uid: &str) -> Result<(), NodeError>;

    /// [`PodNetwork::setup`] for a network that reads the pod's spec (its
    /// dnsPolicy and dnsConfig). The agent calls this one.
    fn setup_pod(&self, pod: &k8s_openapi::api::core::v1::Pod) -> Result<PodNet, NodeError> {
        self.setup(
            pod.metadata.uid.as_deref().unwrap_or_default(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default(),
        )
    }

    /// The network of a microVM pod, in place of [`PodNetwork::setup`]: a
    /// tap on the pod network and the address, gateway and resolv.conf the
    /// guest gives its eth0 (the microvm tier backs a virtio-net with the
    /// tap). `None`: this network has nothing for VMs and the VM runs with
    /// no network device. [`PodNetwork::teardown`] releases it.
    fn setup_vm(
        &self,
        _pod_uid: &str,
        _namespace: &str,
        _name: &str,
    ) -> Result<Option<evoke_runtime::GuestNetwork>, NodeError> {
        Ok(None)
    }
}

/// The host's network: no namespace, the pod IP is the node IP.
pub struct HostNetwork {
    pub host_ip: String,
}

impl PodNetwork for HostNetwork {
    fn setup(&self, _: &str, _: &str, _: &str) -> Result<PodNet, NodeError> {
        Ok(PodNet {
            netns: None,
            ip: Some(self.host_ip.clone()),
            mounts: Vec::new(),
        })
    }
    fn teardown(&self, _: &str) -> Result<(), NodeError> {
        Ok(())
    }
}

/// A short name for pod `pod_uid`, stable across restarts (the pod's IPC
/// namespace file is named after it).
pub fn netns_name(pod_uid: &str) -> String {
    let short: String = pod_uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(20)
        .collect();
    format!("evoke-{short}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_names_are_short_and_stable() {
        let n = netns_name("6f1c2a9e-1111-2222-3333-444455556666");
        assert_eq!(n, netns_name("6f1c2a9e-1111-2222-3333-444455556666"));
        assert!(n.len() <= 26);
        assert!(n.starts_with("evoke-"));
    }
}
