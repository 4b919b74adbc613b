//! What the scheduler knows about nodes: each node with the sum of the
//! requests of the pods bound (or assumed bound) to it.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Node, Pod};

use crate::resources::{pod_requests, Resources};

/// One node and what is already placed on it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node: Node,
    pub allocatable: Resources,
    /// Sum of the requests of non-terminal pods bound or assumed here.
    pub requested: Resources,
    /// Sum of the requests as the scorer sees them (zero requests count as
    /// 100m CPU and 200 MiB, so empty pods still spread).
    pub requested_nonzero: Resources,
}

impl NodeInfo {
    pub fn new(node: Node) -> NodeInfo {
        let allocatable =
            Resources::from_list(node.status.as_ref().and_then(|s| s.allocatable.as_ref()));
        NodeInfo {
            node,
            allocatable,
            requested: Resources::default(),
            requested_nonzero: Resources::default(),
        }
    }
    pub fn name(&self) -> &str {
        self.node.metadata.name.as_deref().unwrap_or("")
    }
}

/// Default request the scorer assumes for a container that asks for nothing.
pub const DEFAULT_CPU_MILLI: i64 = 100;
pub const DEFAULT_MEMORY: i64 = 200 << 20;

/// The requests used for scoring: at least the defaults.
pub fn nonzero(r: &Resources) -> Resources {
    Resources {
        cpu_milli: if r.cpu_milli == 0 {
            DEFAULT_CPU_MILLI
        } else {
            r.cpu_milli
        },
        memory: if r.memory == 0 {
            DEFAULT_MEMORY
        } else {
            r.memory
        },
        pods: r.pods,
    }
}

/// Nodes by name plus the placement of every known pod by uid.
#[derive(Debug, Default)]
pub struct NodeCache {
    nodes: HashMap<String, NodeInfo>,
    /// pod uid -> (node name, requests). Includes assumed pods.
    placed: HashMap<String, (String, Resources)>,
}

/// A pod that is done no longer holds resources.
pub fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

impl NodeCache {
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
    pub fn get(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    /// Adds or updates a node, keeping what is placed on it.
    pub fn upsert_node(&mut self, node: Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut info = NodeInfo::new(node);
        for (n, r) in self.placed.values() {
            if *n == name {
                info.requested.add(r);
                info.requested_nonzero.add(&nonzero(r));
            }
        }
        self.nodes.insert(name, info);
    }

    pub fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    /// Places a pod on a node (its observed binding or our assumption).
    pub fn place(&mut self, uid: &str, node: &str, req: Resources) {
        self.forget(uid);
        if let Some(info) = self.nodes.get_mut(node) {
            info.requested.add(&req);
            info.requested_nonzero.add(&nonzero(&req));
        }
        self.placed.insert(uid.to_string(), (node.to_string(), req));
    }

    /// Removes a pod's placement (deleted, terminal, or a failed bind).
    pub fn forget(&mut self, uid: &str) {
        if let Some((node, req)) = self.placed.remove(uid) {
            if let Some(info) = self.nodes.get_mut(&node) {
                info.requested.sub(&req);
                info.requested_nonzero.sub(&nonzero(&req));
            }
        }
    }

    pub fn is_placed(&self, uid: &str) -> bool {
        self.placed.contains_key(uid)
    }

    /// Brings the cache in line with one observed pod.
    pub fn observe_pod(&mut self, pod: &Pod) {
        let uid = pod.metadata.uid.as_deref().unwrap_or("");
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or("");
        if uid.is_empty() || node.is_empty() {
            return;
        }
        if is_terminal(pod) {
            self.forget(uid);
        } else if self.placed.get(uid).map(|(n, _)| n.as_str()) != Some(node) {
            self.place(uid, node, pod_requests(pod));
        }
    }
}

impl NodeCache {
    /// Drops placements of pods for which `keep(uid)` is false (after a relist).
    pub fn retain_pods(&mut self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self.placed.keys().filter(|u| !keep(u)).cloned().collect();
        for uid in gone {
            self.forget(&uid);
        }
    }
}
