//! Pod networking seam. The agent asks a [`PodNetwork`] for each pod's
//! network namespace and IP; evoke-net plugs its bridge and IPAM in here.
//! [`LoopbackNetwork`], the default, gives each pod its own namespace with
//! only loopback (containers of a pod share it, as Kubernetes requires), and
//! [`HostNetwork`] runs pods in the host's network (the process tier).

use std::path::PathBuf;
use std::process::Command;

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

/// A named namespace per pod (`ip netns add`), with loopback up.
pub struct LoopbackNetwork;

/// The netns name of a pod: short, stable across restarts.
pub fn netns_name(pod_uid: &str) -> String {
    let short: String = pod_uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(20)
        .collect();
    format!("evoke-{short}")
}

fn ip(args: &[&str]) -> Result<(), NodeError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NodeError::Io {
            path: PathBuf::from("ip"),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NodeError::Network(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// `ip netns add` mounts /var/run/netns on first use; concurrent first
/// calls can trip over each other, so this process makes them one at a
/// time and retries once (another process may have raced us).
static NETNS_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl PodNetwork for LoopbackNetwork {
    fn setup(&self, pod_uid: &str, _: &str, _: &str) -> Result<PodNet, NodeError> {
        let name = netns_name(pod_uid);
        let path = PathBuf::from("/var/run/netns").join(&name);
        if !path.exists() {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = ip(&["netns", "add", &name]) {
                if !path.exists() {
                    tracing::debug!(error = %e, "ip netns add failed; retrying once");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    let _ = std::fs::remove_file(&path);
                    ip(&["netns", "add", &name])?;
                }
            }
        }
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(PodNet {
            netns: Some(path),
            ip: None,
            mounts: Vec::new(),
        })
    }
    fn teardown(&self, pod_uid: &str) -> Result<(), NodeError> {
        let name = netns_name(pod_uid);
        if PathBuf::from("/var/run/netns").join(&name).exists() {
            ip(&["netns", "delete", &name])?;
        }
        Ok(())
    }
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

    #[test]
    fn loopback_network_creates_and_removes_a_namespace() {
        let root = nix::unistd::geteuid().is_root();
        let has_ip = std::process::Command::new("ip").arg("-V").output().is_ok();
        if !root || !has_ip {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("this test needs root and iproute2 (ip) under CI");
            }
            eprintln!("skipping: needs root and iproute2");
            return;
        }
        let uid = format!("test-{}-{}", std::process::id(), rand::random::<u32>());
        let net = LoopbackNetwork.setup(&uid, "ns", "p").unwrap();
        let path = net.netns.clone().unwrap();
        assert!(path.exists());
        // Idempotent.
        assert_eq!(LoopbackNetwork.setup(&uid, "ns", "p").unwrap(), net);
        LoopbackNetwork.teardown(&uid).unwrap();
        assert!(!path.exists());
    }
}
