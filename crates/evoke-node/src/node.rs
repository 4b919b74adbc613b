//! This machine as a Node object: capacity and allocatable from /proc,
//! addresses, nodeInfo, conditions and the tiers it offers; and its Lease.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeRuntimeHandler,
    NodeRuntimeHandlerFeatures, NodeStatus, NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};

/// The namespace node Leases live in.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// How often the Lease is renewed.
pub const LEASE_RENEW_SECS: u64 = 10;
/// How long a Lease is valid without renewal.
pub const LEASE_DURATION_SECS: i32 = 40;

/// Facts about the machine, read once at start.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub kernel: String,
    pub os_image: String,
    pub machine_id: String,
    pub boot_id: String,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// MemTotal from a /proc/meminfo text, in bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// PRETTY_NAME from an os-release text.
pub fn parse_os_release(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("PRETTY_NAME="))?;
    Some(line["PRETTY_NAME=".len()..].trim_matches('"').to_string())
}

impl Machine {
    pub fn detect() -> Machine {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| parse_meminfo(&t))
            .unwrap_or(0);
        let os_image = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|t| parse_os_release(&t))
            .unwrap_or_else(|| "Linux".into());
        Machine {
            cpus,
            memory_bytes,
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            os_image,
            machine_id: read_trim("/etc/machine-id"),
            boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
        }
    }
}

/// The agent version kubectl shows in `get nodes`.
pub const KUBELET_VERSION: &str = "v1.33.0+evoke";

fn condition(type_: &str, status: &str, reason: &str, message: &str, now: &Time) -> NodeCondition {
    NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    }
}

/// The healthy conditions a running agent reports.
pub fn conditions(now: &Time) -> Vec<NodeCondition> {
    vec![
        condition(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
            now,
        ),
        condition(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure",
            now,
        ),
        condition(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
            now,
        ),
        condition(
            "Ready",
            "True",
            "KubeletReady",
            "kubelet is posting ready status",
            now,
        ),
    ]
}

/// Status of the node; `tiers` are the available tiers' names.
pub fn status(
    m: &Machine,
    host_ip: &str,
    hostname: &str,
    tiers: &[String],
    port: u16,
    now: &Time,
) -> NodeStatus {
    let mut cap = BTreeMap::new();
    cap.insert("cpu".to_string(), Quantity(m.cpus.to_string()));
    cap.insert(
        "memory".to_string(),
        Quantity(format!("{}Ki", m.memory_bytes / 1024)),
    );
    cap.insert("pods".to_string(), Quantity("110".into()));
    NodeStatus {
        allocatable: Some(cap.clone()),
        capacity: Some(cap),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: host_ip.into(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: hostname.into(),
            },
        ]),
        conditions: Some(conditions(now)),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(port),
            }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH
                .replace("x86_64", "amd64")
                .replace("aarch64", "arm64"),
            boot_id: m.boot_id.clone(),
            container_runtime_version: format!("evoke://{}", env!("CARGO_PKG_VERSION")),
            kernel_version: m.kernel.clone(),
            kube_proxy_version: String::new(),
            kubelet_version: KUBELET_VERSION.into(),
            machine_id: m.machine_id.clone(),
            operating_system: "linux".into(),
            os_image: m.os_image.clone(),
            system_uuid: m.machine_id.clone(),
            swap: None,
        }),
        runtime_handlers: Some(
            tiers
                .iter()
                .map(|t| NodeRuntimeHandler {
                    name: Some(t.clone()),
                    features: Some(NodeRuntimeHandlerFeatures {
                        recursive_read_only_mounts: Some(false),
                        user_namespaces: Some(false),
                    }),
                })
                .collect(),
        ),
        ..Default::default()
    }
}

/// The Node object registered at start.
pub fn node_object(name: &str, labels: &BTreeMap<String, String>, status: NodeStatus) -> Node {
    let mut l = labels.clone();
    l.insert("kubernetes.io/hostname".into(), name.into());
    l.insert("kubernetes.io/os".into(), "linux".into());
    l.insert(
        "kubernetes.io/arch".into(),
        std::env::consts::ARCH
            .replace("x86_64", "amd64")
            .replace("aarch64", "arm64"),
    );
    l.insert("beta.kubernetes.io/os".into(), "linux".into());
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(l),
            ..Default::default()
        },
        spec: None,
        status: Some(status),
    }
}

/// The node's Lease, renewed every [`LEASE_RENEW_SECS`].
pub fn lease(node: &str, node_uid: Option<&str>) -> Lease {
    let now = k8s_openapi::jiff::Timestamp::now();
    Lease {
        metadata: ObjectMeta {
            name: Some(node.into()),
            namespace: Some(LEASE_NAMESPACE.into()),
            owner_references: node_uid.map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: node.into(),
                    uid: uid.into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.into()),
            lease_duration_seconds: Some(LEASE_DURATION_SECS),
            renew_time: Some(MicroTime(now)),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_os_release_parse() {
        assert_eq!(
            parse_meminfo("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24576000 * 1024)
        );
        assert_eq!(
            parse_os_release("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n").as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
    }

    #[test]
    fn node_reports_real_capacity_ready_condition_and_tiers() {
        let m = Machine::detect();
        assert!(m.cpus >= 1);
        assert!(m.memory_bytes > 0, "MemTotal read from /proc/meminfo");
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let s = status(
            &m,
            "10.0.0.2",
            "host",
            &["process".into(), "container".into()],
            10250,
            &now,
        );
        let n = node_object("n1", &BTreeMap::new(), s);
        let st = n.status.unwrap();
        assert_eq!(st.capacity.as_ref().unwrap()["cpu"].0, m.cpus.to_string());
        assert!(st
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"));
        assert_eq!(st.runtime_handlers.unwrap().len(), 2);
        assert_eq!(n.metadata.labels.unwrap()["kubernetes.io/hostname"], "n1");
    }
}
