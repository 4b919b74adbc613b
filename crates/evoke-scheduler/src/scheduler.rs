//! The scheduling loop: watch caches of pods and nodes, a pending queue,
//! one decision at a time, binds in flight concurrently.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;

use crate::cache::{is_terminal, NodeCache};
use crate::events::{reference, EventType, Recorder};
use crate::predicates::{fits, Unfit};
use crate::queue::Queue;
use crate::resources::{pod_requests, Resources};
use crate::score::score;

/// The scheduler name pods get by default.
pub const DEFAULT_SCHEDULER: &str = "default-scheduler";

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("watch of {kind} ended")]
    WatchEnded { kind: &'static str },
}

/// The outcome of one scheduling attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Bind to this node.
    Bind(String),
    /// No node fits; the message says why, per reason and node count.
    Unschedulable(String),
}

/// Filters every node, scores the feasible ones and picks the best; ties go
/// round-robin through `rr` so identical nodes fill evenly.
pub fn pick_node(pod: &Pod, req: &Resources, cache: &NodeCache, rr: &mut usize) -> Decision {
    let mut best: Vec<(&str, f64)> = Vec::new();
    let mut reasons: BTreeMap<Unfit, usize> = BTreeMap::new();
    for info in cache.nodes() {
        match fits(pod, req, info) {
            Ok(()) => {
                let s = score(pod, req, info);
                match best.first() {
                    Some((_, top)) if s < *top - 1e-9 => {}
                    Some((_, top)) if s > *top + 1e-9 => {
                        best.clear();
                        best.push((info.name(), s));
                    }
                    _ => best.push((info.name(), s)),
                }
            }
            Err(u) => *reasons.entry(u).or_default() += 1,
        }
    }
    if best.is_empty() {
        if cache.is_empty() {
            return Decision::Unschedulable("no nodes available to schedule pods".into());
        }
        let detail: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        return Decision::Unschedulable(format!(
            "0/{} nodes are available: {}.",
            cache.len(),
            detail.join(", ")
        ));
    }
    // HashMap order is arbitrary; sort so the round-robin is meaningful.
    best.sort_by(|a, b| a.0.cmp(b.0));
    *rr = rr.wrapping_add(1);
    Decision::Bind(best[*rr % best.len()].0.to_string())
}

fn key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

fn wants_scheduling(pod: &Pod, name: &str) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.node_name.as_deref().unwrap_or("").is_empty()
        && spec.scheduler_name.as_deref().unwrap_or(DEFAULT_SCHEDULER) == name
        && pod.metadata.deletion_timestamp.is_none()
        && !is_terminal(pod)
}

enum BindOutcome {
    Bound {
        key: String,
    },
    Gone {
        key: String,
        uid: String,
    },
    Retry {
        key: String,
        uid: String,
        error: String,
    },
}

/// The scheduler component. Construct with [`Scheduler::new`], then
/// [`Scheduler::run`] until the process ends.
pub struct Scheduler {
    client: Client,
    name: String,
    recorder: Recorder,
    concurrency: usize,
}

impl Scheduler {
    pub fn new(client: Client) -> Scheduler {
        let recorder = Recorder::new(client.clone(), DEFAULT_SCHEDULER, None);
        Scheduler {
            client,
            name: DEFAULT_SCHEDULER.into(),
            recorder,
            concurrency: 128,
        }
    }

    /// Runs forever; returns only if a watch stream ends.
    pub async fn run(self) -> Result<(), SchedulerError> {
        let pods_api: Api<Pod> = Api::all(self.client.clone());
        let nodes_api: Api<Node> = Api::all(self.client.clone());
        let mut pod_events = watcher(pods_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut node_events = watcher(nodes_api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<BindOutcome>();

        let mut cache = NodeCache::default();
        let mut queue = Queue::default();
        let mut pending: HashMap<String, Pod> = HashMap::new();
        let mut inflight: HashSet<String> = HashSet::new();
        let mut rr = 0usize;
        let mut pod_relist: Option<HashSet<String>> = None;
        let mut node_relist: Option<HashSet<String>> = None;
        tracing::info!(scheduler = %self.name, "scheduler started");

        loop {
            let now = Instant::now();
            let room = self.concurrency.saturating_sub(inflight.len());
            if room > 0 && !cache.is_empty() {
                for k in queue.pop_ready(now, room) {
                    let Some(pod) = pending.get(&k) else {
                        queue.remove(&k);
                        continue;
                    };
                    let req = pod_requests(pod);
                    match pick_node(pod, &req, &cache, &mut rr) {
                        Decision::Bind(node) => {
                            let uid = pod.uid().unwrap_or_default();
                            cache.place(&uid, &node, req);
                            inflight.insert(k.clone());
                            self.spawn_bind(pod, k, uid, node, done_tx.clone());
                        }
                        Decision::Unschedulable(msg) => {
                            let wait = queue.backoff(&k, now);
                            tracing::debug!(pod = %k, %msg, ?wait, "unschedulable");
                            self.report_unschedulable(pod, &msg);
                        }
                    }
                }
            }
            let wake = queue
                .next_ready()
                .unwrap_or_else(|| now + Duration::from_secs(3600));
            tokio::select! {
                ev = pod_events.try_next() => match ev {
                    Ok(Some(ev)) => match ev {
                        Event::Init => pod_relist = Some(HashSet::new()),
                        Event::InitApply(p) | Event::Apply(p) => {
                            if let (Some(seen), Some(uid)) = (pod_relist.as_mut(), p.uid()) {
                                seen.insert(uid);
                            }
                            cache.observe_pod(&p);
                            let k = key(&p);
                            if wants_scheduling(&p, &self.name) {
                                if !inflight.contains(&k) {
                                    queue.add(&k);
                                }
                                pending.insert(k, p);
                            } else {
                                pending.remove(&k);
                                if !inflight.contains(&k) {
                                    queue.remove(&k);
                                }
                            }
                        }
                        Event::Delete(p) => {
                            let k = key(&p);
                            cache.forget(&p.uid().unwrap_or_default());
                            pending.remove(&k);
                            queue.remove(&k);
                        }
                        Event::InitDone => {
                            if let Some(seen) = pod_relist.take() {
                                cache.retain_pods(|uid| seen.contains(uid));
                                pending.retain(|_, p| p.uid().is_some_and(|u| seen.contains(&u)));
                            }
                        }
                    },
                    Ok(None) => return Err(SchedulerError::WatchEnded { kind: "pods" }),
                    Err(e) => tracing::warn!(error = %e, "pod watch error; retrying"),
                },
                ev = node_events.try_next() => match ev {
                    Ok(Some(ev)) => {
                        match ev {
                            Event::Init => node_relist = Some(HashSet::new()),
                            Event::InitApply(n) | Event::Apply(n) => {
                                if let Some(seen) = node_relist.as_mut() {
                                    seen.insert(n.name_any());
                                }
                                cache.upsert_node(n);
                            }
                            Event::Delete(n) => cache.remove_node(&n.name_any()),
                            Event::InitDone => {
                                if let Some(seen) = node_relist.take() {
                                    let gone: Vec<String> = cache
                                        .nodes()
                                        .map(|i| i.name().to_string())
                                        .filter(|n| !seen.contains(n))
                                        .collect();
                                    for n in gone {
                                        cache.remove_node(&n);
                                    }
                                }
                            }
                        }
                        queue.retry_all(Instant::now());
                    }
                    Ok(None) => return Err(SchedulerError::WatchEnded { kind: "nodes" }),
                    Err(e) => tracing::warn!(error = %e, "node watch error; retrying"),
                },
                Some(outcome) = done_rx.recv() => match outcome {
                    BindOutcome::Bound { key } => {
                        inflight.remove(&key);
                        queue.remove(&key);
                    }
                    BindOutcome::Gone { key, uid } => {
                        inflight.remove(&key);
                        queue.remove(&key);
                        cache.forget(&uid);
                    }
                    BindOutcome::Retry { key, uid, error } => {
                        tracing::warn!(pod = %key, %error, "bind failed; backing off");
                        inflight.remove(&key);
                        cache.forget(&uid);
                        queue.backoff(&key, Instant::now());
                    }
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    fn spawn_bind(
        &self,
        pod: &Pod,
        key: String,
        uid: String,
        node: String,
        done: mpsc::UnboundedSender<BindOutcome>,
    ) {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let recorder = self.recorder.clone();
        let obj = reference(pod);
        tokio::spawn(async move {
            let binding = Binding {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    uid: Some(uid.clone()),
                    ..Default::default()
                },
                target: ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(node.clone()),
                    ..Default::default()
                },
            };
            let res: Result<serde_json::Value, kube::Error> = api
                .create_subresource("binding", &name, &PostParams::default(), &binding)
                .await;
            let outcome = match res {
                Ok(_) => {
                    recorder.publish(
                        &obj,
                        EventType::Normal,
                        "Scheduled",
                        &format!("Successfully assigned {ns}/{name} to {node}"),
                    );
                    BindOutcome::Bound { key }
                }
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {
                    BindOutcome::Gone { key, uid }
                }
                Err(e) => BindOutcome::Retry {
                    key,
                    uid,
                    error: e.to_string(),
                },
            };
            let _ = done.send(outcome);
        });
    }

    fn report_unschedulable(&self, pod: &Pod, msg: &str) {
        self.recorder
            .publish(&reference(pod), EventType::Warning, "FailedScheduling", msg);
        let already = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
            .is_some_and(|c| c.status == "False" && c.message.as_deref() == Some(msg));
        if already {
            return;
        }
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let name = pod.name_any();
        let patch = serde_json::json!({"status": {
            "phase": "Pending",
            "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": msg, "lastTransitionTime": now_rfc3339(),
            }]
        }});
        tokio::spawn(async move {
            if let Err(e) = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::debug!(pod = %name, error = %e, "could not set PodScheduled=False");
            }
        });
    }
}

/// Now, as the API writes timestamps (RFC 3339, whole seconds, UTC).
pub(crate) fn now_rfc3339() -> String {
    let ts = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(ts.as_second())
        .unwrap_or(ts)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cpu: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name},
            "status": {"allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "110"}}}))
        .expect("valid node")
    }
    fn pod(cpu: &str) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": "default", "uid": "u1"},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu, "memory": "1Mi"}}}]}}),
        )
        .expect("valid pod")
    }

    #[test]
    fn pod_goes_to_the_least_loaded_node() {
        let mut cache = NodeCache::default();
        cache.upsert_node(node("a", "4"));
        cache.upsert_node(node("b", "4"));
        cache.place(
            "other",
            "a",
            Resources {
                cpu_milli: 3000,
                memory: 0,
                pods: 1,
            },
        );
        let p = pod("500m");
        assert_eq!(
            pick_node(&p, &pod_requests(&p), &cache, &mut 0),
            Decision::Bind("b".into())
        );
    }

    #[test]
    fn unschedulable_message_counts_nodes_per_reason() {
        let mut cache = NodeCache::default();
        cache.upsert_node(node("a", "1"));
        cache.upsert_node(node("b", "1"));
        let p = pod("2");
        assert_eq!(
            pick_node(&p, &pod_requests(&p), &cache, &mut 0),
            Decision::Unschedulable("0/2 nodes are available: 2 Insufficient cpu.".into())
        );
        let empty = NodeCache::default();
        assert!(matches!(
            pick_node(&p, &pod_requests(&p), &empty, &mut 0),
            Decision::Unschedulable(_)
        ));
    }

    #[test]
    fn identical_nodes_fill_evenly() {
        let mut cache = NodeCache::default();
        for n in ["a", "b", "c", "d"] {
            cache.upsert_node(node(n, "100"));
        }
        let mut rr = 0;
        let mut counts: HashMap<String, usize> = HashMap::new();
        for i in 0..400 {
            let p = pod("100m");
            let Decision::Bind(n) = pick_node(&p, &pod_requests(&p), &cache, &mut rr) else {
                panic!("must fit")
            };
            cache.place(&format!("u{i}"), &n, pod_requests(&p));
            *counts.entry(n).or_default() += 1;
        }
        assert!(counts.values().all(|c| *c == 100), "{counts:?}");
    }

    #[test]
    fn bound_pod_that_turns_terminal_frees_its_node() {
        let mut cache = NodeCache::default();
        cache.upsert_node(node("a", "1"));
        let mut p = pod("1");
        p.spec.as_mut().expect("spec").node_name = Some("a".into());
        cache.observe_pod(&p);
        let q = pod("1");
        assert!(matches!(
            pick_node(&q, &pod_requests(&q), &cache, &mut 0),
            Decision::Unschedulable(_)
        ));
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        cache.observe_pod(&p);
        assert_eq!(
            pick_node(&q, &pod_requests(&q), &cache, &mut 0),
            Decision::Bind("a".into())
        );
    }

    #[test]
    fn only_unbound_live_pods_for_this_scheduler_are_queued() {
        let mut p = pod("1");
        assert!(wants_scheduling(&p, DEFAULT_SCHEDULER));
        p.spec.as_mut().expect("spec").scheduler_name = Some("other".into());
        assert!(!wants_scheduling(&p, DEFAULT_SCHEDULER));
        let mut p = pod("1");
        p.spec.as_mut().expect("spec").node_name = Some("a".into());
        assert!(!wants_scheduling(&p, DEFAULT_SCHEDULER));
    }
}
