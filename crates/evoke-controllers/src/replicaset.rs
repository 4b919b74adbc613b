//! The ReplicaSet controller: keep `spec.replicas` active pods that match
//! the selector, adopt matching orphans, and report status.
//!
//! Creates and deletes are remembered as *expectations* until the watch
//! cache shows them, so a reconcile that runs before the cache catches up
//! does not create (or delete) the same pods twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};

use crate::informer::Informer;
use crate::util::{
    controller_of, controller_ref, is_active, is_available, is_ready, selector_matches,
};

/// What one reconcile of a ReplicaSet should do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Pods to create from the template.
    pub create: usize,
    /// Names of owned pods to delete, the least valuable first.
    pub delete: Vec<String>,
    /// Names of matching orphan pods to adopt.
    pub adopt: Vec<String>,
    pub status: ReplicaSetStatus,
}

/// Ranks pods for deletion: unscheduled, pending, not ready, most restarted
/// and newest go first (the ReplicaSet keeps the pods that serve best).
fn deletion_rank(p: &Pod) -> (u8, u8, u8, i64, i64) {
    let scheduled = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
    let phase = match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Pending") | None => 0,
        Some("Unknown") => 1,
        _ => 2,
    };
    let restarts: i32 = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0);
    let created = p
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or(0);
    (
        u8::from(scheduled),
        phase,
        u8::from(is_ready(p)),
        -i64::from(restarts),
        -created,
    )
}

/// Decides, from the cache, what to do for `rs`. `pods` are the namespace's
/// pods; `pending_creates` are creates not yet visible; `pending_deletes`
/// are uids whose deletion is not yet visible.
pub fn plan(
    rs: &ReplicaSet,
    pods: &[Arc<Pod>],
    pending_creates: usize,
    pending_deletes: &HashSet<String>,
) -> Plan {
    let uid = rs.uid().unwrap_or_default();
    let spec = rs.spec.as_ref();
    let selector = spec.map(|s| &s.selector);
    let desired = spec.and_then(|s| s.replicas).unwrap_or(1).max(0) as usize;
    let min_ready = spec.and_then(|s| s.min_ready_seconds).unwrap_or(0);
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut out = Plan::default();
    let mut owned: Vec<&Pod> = Vec::new();
    for p in pods {
        let labels = p.labels();
        match controller_of(p.as_ref()) {
            Some(o) if o.uid == uid => {
                if selector_matches(selector, labels) {
                    owned.push(p);
                }
            }
            Some(_) => {}
            None => {
                if selector_matches(selector, labels)
                    && is_active(p)
                    && rs.metadata.deletion_timestamp.is_none()
                {
                    out.adopt.push(p.name_any());
                    owned.push(p);
                }
            }
        }
    }
    let mut active: Vec<&Pod> = owned
        .iter()
        .copied()
        .filter(|p| is_active(p) && !p.uid().is_some_and(|u| pending_deletes.contains(&u)))
        .collect();
    let have = active.len() + pending_creates;
    if rs.metadata.deletion_timestamp.is_none() {
        if have < desired {
            out.create = desired - have;
        } else if active.len() > desired {
            active.sort_by_key(|p| deletion_rank(p));
            out.delete = active[..active.len() - desired]
                .iter()
                .map(|p| p.name_any())
                .collect();
        }
    }
    let all_active: Vec<&Pod> = owned.iter().copied().filter(|p| is_active(p)).collect();
    let template_labels = spec
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    out.status = ReplicaSetStatus {
        replicas: all_active.len() as i32,
        fully_labeled_replicas: Some(
            all_active
                .iter()
                .filter(|p| {
                    template_labels
                        .iter()
                        .all(|(k, v)| p.labels().get(k) == Some(v))
                })
                .count() as i32,
        ),
        ready_replicas: Some(all_active.iter().filter(|p| is_ready(p)).count() as i32),
        available_replicas: Some(
            all_active
                .iter()
                .filter(|p| is_available(p, min_ready, now))
                .count() as i32,
        ),
        observed_generation: rs.metadata.generation,
        conditions: None,
        terminating_replicas: None,
    };
    out
}

/// A new pod from the ReplicaSet's template, owned by it.
pub fn pod_from_template(rs: &ReplicaSet) -> Pod {
    let template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .unwrap_or_default();
    let tmeta = template.metadata.unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", rs.name_any())),
            namespace: rs.namespace(),
            labels: tmeta.labels,
            annotations: tmeta.annotations,
            owner_references: Some(vec![controller_ref(rs)]),
            ..Default::default()
        },
        spec: template.spec,
        status: None,
    }
}

#[derive(Default)]
struct Expectation {
    creates: HashSet<String>,
    deletes: HashSet<String>,
    since: Option<Instant>,
}

/// Expectations older than this are dropped: the cache must have seen them
/// by then, or the write was lost and a new reconcile should decide again.
const EXPECTATION_TTL: Duration = Duration::from_secs(30);

/// The running controller.
pub struct ReplicaSetController {
    client: Client,
    pods: Informer<Pod>,
    sets: Informer<ReplicaSet>,
    expectations: Mutex<HashMap<String, Expectation>>,
}

impl ReplicaSetController {
    pub fn new(
        client: Client,
        pods: Informer<Pod>,
        sets: Informer<ReplicaSet>,
    ) -> ReplicaSetController {
        ReplicaSetController {
            client,
            pods,
            sets,
            expectations: Mutex::new(HashMap::new()),
        }
    }

    pub async fn run(self: Arc<Self>) {
        self.pods.ready().await;
        self.sets.ready().await;
        let triggers = vec![self.pods.subscribe(), self.sets.subscribe()];
        let me = self.clone();
        crate::informer::run_loop(
            "replicaset",
            triggers,
            Duration::from_secs(10),
            Duration::from_millis(5),
            move || {
                let me = me.clone();
                async move { me.reconcile_all().await }
            },
        )
        .await;
    }

    async fn reconcile_all(&self) {
        let mut by_ns: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
        for p in self.pods.store.state() {
            by_ns
                .entry(p.namespace().unwrap_or_default())
                .or_default()
                .push(p);
        }
        let sets = self.sets.store.state();
        let live: HashSet<String> = sets.iter().filter_map(|s| s.uid()).collect();
        self.lock().retain(|uid, _| live.contains(uid));
        let empty = Vec::new();
        futures::stream::iter(sets)
            .for_each_concurrent(16, |rs| {
                let pods = by_ns
                    .get(&rs.namespace().unwrap_or_default())
                    .unwrap_or(&empty);
                async move { self.reconcile(&rs, pods).await }
            })
            .await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Expectation>> {
        self.expectations.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn reconcile(&self, rs: &ReplicaSet, pods: &[Arc<Pod>]) {
        let uid = rs.uid().unwrap_or_default();
        let ns = rs.namespace().unwrap_or_default();
        let name = rs.name_any();
        // Settle expectations against what the cache shows now.
        let (pending_creates, pending_deletes) = {
            let mut exp = self.lock();
            let e = exp.entry(uid.clone()).or_default();
            if e.since.is_some_and(|t| t.elapsed() > EXPECTATION_TTL) {
                *e = Expectation::default();
            }
            e.creates
                .retain(|n| !pods.iter().any(|p| p.metadata.name.as_deref() == Some(n)));
            e.deletes.retain(|u| {
                pods.iter().any(|p| {
                    p.metadata.uid.as_deref() == Some(u) && p.metadata.deletion_timestamp.is_none()
                })
            });
            (e.creates.len(), e.deletes.clone())
        };
        let plan = plan(rs, pods, pending_creates, &pending_deletes);
        let pod_api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        for p in &plan.adopt {
            let patch = serde_json::json!({"metadata": {"ownerReferences": [controller_ref(rs)]}});
            if let Err(e) = pod_api
                .patch(p, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::warn!(replicaset = %name, pod = %p, error = %e, "could not adopt pod");
            }
        }
        if plan.create > 0 {
            tracing::info!(replicaset = %format!("{ns}/{name}"), count = plan.create, "creating pods");
            let template = pod_from_template(rs);
            {
                let mut exp = self.lock();
                exp.entry(uid.clone()).or_default().since = Some(Instant::now());
            }
            let results: Vec<_> = futures::stream::iter(0..plan.create)
                .map(|_| {
                    let api = pod_api.clone();
                    let p = template.clone();
                    async move { api.create(&PostParams::default(), &p).await }
                })
                .buffer_unordered(16)
                .collect()
                .await;
            let mut exp = self.lock();
            let e = exp.entry(uid.clone()).or_default();
            for r in results {
                match r {
                    Ok(p) => {
                        if !self
                            .pods
                            .store
                            .state()
                            .iter()
                            .any(|c| c.metadata.name == p.metadata.name)
                        {
                            e.creates.insert(p.name_any());
                        }
                    }
                    Err(err) => {
                        tracing::warn!(replicaset = %name, error = %err, "could not create pod")
                    }
                }
            }
        }
        for p in &plan.delete {
            if let Some(pu) = pods
                .iter()
                .find(|x| x.metadata.name.as_deref() == Some(p))
                .and_then(|x| x.uid())
            {
                let mut exp = self.lock();
                let e = exp.entry(uid.clone()).or_default();
                e.deletes.insert(pu);
                e.since = Some(Instant::now());
            }
            match pod_api.delete(p, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(replicaset = %name, pod = %p, "deleted surplus pod"),
                Err(e) => {
                    tracing::warn!(replicaset = %name, pod = %p, error = %e, "could not delete pod")
                }
            }
        }
        if rs.status.as_ref() != Some(&plan.status) {
            let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &ns);
            let patch = serde_json::json!({ "status": plan.status });
            if let Err(e) = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::debug!(replicaset = %name, error = %e, "could not update status");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rs(replicas: i32) -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "namespace": "default", "uid": "rs-1", "generation": 2},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}
        }))
        .unwrap()
    }
    fn pod(name: &str, owner: Option<&str>, ready: bool, node: Option<&str>) -> Arc<Pod> {
        let mut v = json!({"metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": if ready {"Running"} else {"Pending"},
                "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}});
        if let Some(o) = owner {
            v["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "uid": o, "controller": true}]);
        }
        if let Some(n) = node {
            v["spec"]["nodeName"] = json!(n);
        }
        Arc::new(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn missing_pods_are_created_counting_pending_creates() {
        let pods = vec![pod("a", Some("rs-1"), true, Some("n"))];
        assert_eq!(plan(&rs(3), &pods, 0, &HashSet::new()).create, 2);
        assert_eq!(plan(&rs(3), &pods, 2, &HashSet::new()).create, 0);
    }

    #[test]
    fn surplus_deletes_unscheduled_and_unready_pods_first() {
        let pods = vec![
            pod("ready", Some("rs-1"), true, Some("n")),
            pod("unready", Some("rs-1"), false, Some("n")),
            pod("unscheduled", Some("rs-1"), false, None),
        ];
        let p = plan(&rs(1), &pods, 0, &HashSet::new());
        assert_eq!(
            p.delete,
            vec!["unscheduled".to_string(), "unready".to_string()]
        );
    }

    #[test]
    fn matching_orphans_are_adopted_and_other_owners_pods_ignored() {
        let pods = vec![
            pod("orphan", None, true, Some("n")),
            pod("theirs", Some("rs-2"), true, Some("n")),
        ];
        let p = plan(&rs(1), &pods, 0, &HashSet::new());
        assert_eq!(p.adopt, vec!["orphan".to_string()]);
        assert_eq!(p.create, 0);
        assert_eq!(p.status.replicas, 1);
    }

    #[test]
    fn status_counts_ready_and_available_and_observed_generation() {
        let pods = vec![
            pod("a", Some("rs-1"), true, Some("n")),
            pod("b", Some("rs-1"), false, Some("n")),
        ];
        let p = plan(&rs(2), &pods, 0, &HashSet::new());
        assert_eq!(p.status.replicas, 2);
        assert_eq!(p.status.ready_replicas, Some(1));
        assert_eq!(p.status.available_replicas, Some(1));
        assert_eq!(p.status.observed_generation, Some(2));
    }

    #[test]
    fn pods_being_deleted_do_not_count_and_are_replaced() {
        let pods = vec![
            pod("a", Some("rs-1"), true, Some("n")),
            pod("b", Some("rs-1"), true, Some("n")),
        ];
        let deleting: HashSet<String> = ["uid-b".to_string()].into();
        assert_eq!(plan(&rs(2), &pods, 0, &deleting).create, 1);
    }

    #[test]
    fn template_pod_is_owned_and_labelled() {
        let p = pod_from_template(&rs(1));
        assert_eq!(p.metadata.generate_name.as_deref(), Some("web-abc-"));
        assert_eq!(p.labels().get("app").map(String::as_str), Some("web"));
        let o = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((o.uid.as_str(), o.controller), ("rs-1", Some(true)));
    }
}
