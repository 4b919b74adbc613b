//! Node lifecycle: a node whose Lease (and Ready heartbeat) is older than
//! 50 s becomes Ready=Unknown with the `node.kubernetes.io/unreachable`
//! NoExecute taint; a node reporting Ready=False gets
//! `node.kubernetes.io/not-ready`. Pods that do not tolerate a NoExecute
//! taint are evicted: at once, or after their tolerationSeconds (300 s by
//! default for these two taints, as the DefaultTolerationSeconds admission
//! plugin gives every pod).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::informer::Informer;
use crate::util::now;

pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
/// Without a heartbeat for this long a node is unreachable.
pub const GRACE_SECS: i64 = 50;
/// The default toleration of the two node-health taints.
pub const DEFAULT_TOLERATION_SECS: i64 = 300;

/// A node's health as the controller judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Heartbeats arrive and Ready is True.
    Ready,
    /// Heartbeats arrive but the agent says Ready=False.
    NotReady,
    /// No heartbeat within the grace period.
    Unreachable,
}

fn ready_condition(n: &Node) -> Option<&NodeCondition> {
    n.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

/// Judges a node from its Ready condition and its Lease's renewTime.
pub fn health(n: &Node, lease_renew: Option<Timestamp>, now: Timestamp) -> Health {
    let cond = ready_condition(n);
    let heartbeat = cond
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0);
    let last = match (heartbeat, lease_renew) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    // A node that never reported is judged from its creation.
    let last = last.or_else(|| n.metadata.creation_timestamp.as_ref().map(|t| t.0));
    match last {
        Some(t) if now.as_second() - t.as_second() <= GRACE_SECS => {
            match cond.map(|c| c.status.as_str()) {
                Some("True") => Health::Ready,
                Some("False") => Health::NotReady,
                _ => Health::Unreachable,
            }
        }
        _ => Health::Unreachable,
    }
}

/// The node's taints with the health taints set for `h`; None if no change.
pub fn taints_for(n: &Node, h: Health, now: &Time) -> Option<Vec<Taint>> {
    let current: Vec<Taint> = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let want_key = match h {
        Health::Ready => None,
        Health::NotReady => Some(TAINT_NOT_READY),
        Health::Unreachable => Some(TAINT_UNREACHABLE),
    };
    let mut out: Vec<Taint> = current
        .iter()
        .filter(|t| {
            !((t.key == TAINT_UNREACHABLE || t.key == TAINT_NOT_READY)
                && t.effect == "NoExecute"
                && Some(t.key.as_str()) != want_key)
        })
        .cloned()
        .collect();
    if let Some(k) = want_key {
        if !out.iter().any(|t| t.key == k && t.effect == "NoExecute") {
            out.push(Taint {
                key: k.into(),
                effect: "NoExecute".into(),
                time_added: Some(now.clone()),
                value: None,
            });
        }
    }
    (out != current).then_some(out)
}

/// When a pod must leave a node with these taints: None = may stay;
/// Some(t) = evict at or after t.
pub fn eviction_time(pod: &Pod, taints: &[Taint]) -> Option<Timestamp> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or(&[]);
    let mut due: Option<Timestamp> = None;
    for t in taints.iter().filter(|t| t.effect == "NoExecute") {
        let added = t
            .time_added
            .as_ref()
            .map(|x| x.0)
            .unwrap_or(Timestamp::UNIX_EPOCH);
        let matching: Vec<_> = tolerations
            .iter()
            .filter(|tol| evoke_scheduler::predicates::tolerates(tol, t))
            .collect();
        let secs = if matching.is_empty() {
            if t.key == TAINT_UNREACHABLE || t.key == TAINT_NOT_READY {
                Some(DEFAULT_TOLERATION_SECS)
            } else {
                Some(0)
            }
        } else if matching.iter().any(|m| m.toleration_seconds.is_none()) {
            None
        } else {
            matching.iter().filter_map(|m| m.toleration_seconds).min()
        };
        if let Some(s) = secs {
            let at = Timestamp::from_second(added.as_second() + s.max(0)).unwrap_or(added);
            due = Some(due.map_or(at, |d| d.min(at)));
        }
    }
    due
}

pub struct NodeLifecycleController {
    client: Client,
    nodes: Informer<Node>,
    leases: Informer<Lease>,
    pods: Informer<Pod>,
}

impl NodeLifecycleController {
    pub fn new(
        client: Client,
        nodes: Informer<Node>,
        leases: Informer<Lease>,
        pods: Informer<Pod>,
    ) -> Self {
        NodeLifecycleController {
            client,
            nodes,
            leases,
            pods,
        }
    }

    pub async fn run(self: Arc<Self>) {
        self.nodes.ready().await;
        self.leases.ready().await;
        self.pods.ready().await;
        let triggers = vec![self.nodes.subscribe()];
        let me = self.clone();
        crate::informer::run_loop(
            "node-lifecycle",
            triggers,
            Duration::from_secs(5),
            Duration::from_millis(500),
            move || {
                let me = me.clone();
                async move { me.reconcile().await }
            },
        )
        .await;
    }

    async fn reconcile(&self) {
        let renew: HashMap<String, Timestamp> = self
            .leases
            .store
            .state()
            .iter()
            .filter(|l| l.namespace().as_deref() == Some("kube-node-lease"))
            .filter_map(|l| Some((l.name_any(), l.spec.as_ref()?.renew_time.as_ref()?.0)))
            .collect();
        let now_ts = Timestamp::now();
        let now_t = now();
        let nodes_api: Api<Node> = Api::all(self.client.clone());
        let pods = self.pods.store.state();
        for n in self.nodes.store.state() {
            let name = n.name_any();
            let h = health(&n, renew.get(&name).copied(), now_ts);
            if h == Health::Unreachable && ready_condition(&n).is_none_or(|c| c.status != "Unknown")
            {
                tracing::warn!(node = %name, "node stopped posting status; marking it Unknown");
                let conds: Vec<NodeCondition> = n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|mut c| {
                        c.status = "Unknown".into();
                        c.reason = Some("NodeStatusUnknown".into());
                        c.message = Some("Kubelet stopped posting node status.".into());
                        c.last_transition_time = Some(now_t.clone());
                        c
                    })
                    .collect();
                let patch = serde_json::json!({"status": {"conditions": conds}});
                let _ = nodes_api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
                // Pods there can no longer be trusted to serve.
                for p in pods.iter().filter(|p| {
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
                }) {
                    self.mark_not_ready(p).await;
                }
            }
            if let Some(taints) = taints_for(&n, h, &now_t) {
                let patch = serde_json::json!({"spec": {"taints": taints}});
                match nodes_api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => tracing::info!(node = %name, health = ?h, "node taints updated"),
                    Err(e) => {
                        tracing::warn!(node = %name, error = %e, "could not update node taints")
                    }
                }
            }
            let taints: Vec<Taint> = n
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default();
            if !taints.iter().any(|t| t.effect == "NoExecute") {
                continue;
            }
            for p in pods.iter().filter(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
            }) {
                if p.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                if let Some(at) = eviction_time(p, &taints) {
                    if at <= now_ts {
                        let api: Api<Pod> = Api::namespaced(
                            self.client.clone(),
                            &p.namespace().unwrap_or_default(),
                        );
                        tracing::warn!(pod = %p.name_any(), node = %name, "evicting pod from tainted node");
                        let _ = api.delete(&p.name_any(), &DeleteParams::default()).await;
                    }
                }
            }
        }
    }

    async fn mark_not_ready(&self, p: &Pod) {
        let mut conds = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let mut changed = false;
        for c in conds
            .iter_mut()
            .filter(|c| c.type_ == "Ready" && c.status != "False")
        {
            c.status = "False".into();
            c.reason = Some("NodeNotReady".into());
            c.last_transition_time = Some(now());
            changed = true;
        }
        if changed {
            let api: Api<Pod> =
                Api::namespaced(self.client.clone(), &p.namespace().unwrap_or_default());
            let patch = serde_json::json!({"status": {"conditions": conds}});
            let _ = api
                .patch_status(
                    &p.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }
    fn node(ready: &str, heartbeat: i64) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "n"}, "status": {"conditions": [
            {"type": "Ready", "status": ready, "lastHeartbeatTime": ts(heartbeat).to_string()}]}}))
        .unwrap()
    }

    #[test]
    fn node_is_unreachable_after_fifty_seconds_without_heartbeat() {
        let n = node("True", 1000);
        assert_eq!(health(&n, None, ts(1040)), Health::Ready);
        assert_eq!(health(&n, None, ts(1051)), Health::Unreachable);
        // A fresh lease keeps it alive even if the condition is older.
        assert_eq!(health(&n, Some(ts(1045)), ts(1060)), Health::Ready);
        assert_eq!(
            health(&node("False", 1000), None, ts(1001)),
            Health::NotReady
        );
    }

    #[test]
    fn health_taints_are_added_swapped_and_removed() {
        let t = Time(ts(5000));
        let n = node("True", 1000);
        let taints = taints_for(&n, Health::Unreachable, &t).unwrap();
        assert_eq!(taints.len(), 1);
        assert_eq!(
            (taints[0].key.as_str(), taints[0].effect.as_str()),
            (TAINT_UNREACHABLE, "NoExecute")
        );
        let mut tainted = n.clone();
        tainted.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(taints),
            ..Default::default()
        });
        assert_eq!(taints_for(&tainted, Health::Unreachable, &t), None);
        assert_eq!(taints_for(&tainted, Health::Ready, &t), Some(vec![]));
        let swapped = taints_for(&tainted, Health::NotReady, &t).unwrap();
        assert_eq!(swapped[0].key, TAINT_NOT_READY);
    }

    #[test]
    fn pods_are_evicted_after_default_300s_or_their_own_toleration() {
        let taint = Taint {
            key: TAINT_UNREACHABLE.into(),
            effect: "NoExecute".into(),
            time_added: Some(Time(ts(1000))),
            value: None,
        };
        let plain: Pod = serde_json::from_value(json!({"spec": {"containers": []}})).unwrap();
        assert_eq!(
            eviction_time(&plain, std::slice::from_ref(&taint)),
            Some(ts(1300))
        );
        let short: Pod = serde_json::from_value(json!({"spec": {"containers": [], "tolerations": [
            {"key": TAINT_UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 10}]}}))
        .unwrap();
        assert_eq!(
            eviction_time(&short, std::slice::from_ref(&taint)),
            Some(ts(1010))
        );
        let forever: Pod = serde_json::from_value(
            json!({"spec": {"containers": [], "tolerations": [{"operator": "Exists"}]}}),
        )
        .unwrap();
        assert_eq!(eviction_time(&forever, std::slice::from_ref(&taint)), None);
        let other = Taint {
            key: "dedicated".into(),
            effect: "NoExecute".into(),
            time_added: Some(Time(ts(1000))),
            value: None,
        };
        assert_eq!(eviction_time(&plain, &[other]), Some(ts(1000)));
    }
}
