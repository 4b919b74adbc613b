//! The garbage collector: ownerReferences decide who goes when an owner
//! goes. Background: dependents whose owners are all gone are deleted.
//! Foreground: an owner marked with the `foregroundDeletion` finalizer
//! waits until its dependents are gone, then the finalizer is removed.
//! Orphan: an owner with the `orphan` finalizer has its references removed
//! from its dependents, then the finalizer is removed.
//!
//! An owner missing from the caches is looked up live before anything is
//! deleted, so a cache that lags never kills a healthy dependent.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
    PropagationPolicy,
};
use kube::Client;

use crate::informer::Informer;

pub const FOREGROUND: &str = "foregroundDeletion";
pub const ORPHAN: &str = "orphan";

/// One object as the collector sees it.
#[derive(Debug, Clone)]
pub struct Node {
    pub api_version: String,
    pub kind: String,
    pub meta: ObjectMeta,
}

impl Node {
    fn of<K: kube::Resource<DynamicType = ()>>(o: &K) -> Node {
        Node {
            api_version: K::api_version(&()).into_owned(),
            kind: K::kind(&()).into_owned(),
            meta: o.meta().clone(),
        }
    }
    fn uid(&self) -> &str {
        self.meta.uid.as_deref().unwrap_or("")
    }
    fn owners(&self) -> &[OwnerReference] {
        self.meta.owner_references.as_deref().unwrap_or(&[])
    }
    fn has_finalizer(&self, f: &str) -> bool {
        self.meta.finalizers.iter().flatten().any(|x| x == f)
    }
}

/// What the collector should do now.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Dependents to delete (background), by index, whose owners all look gone.
    pub maybe_orphaned: Vec<usize>,
    /// Dependents of foreground-deleted owners to delete (foreground, too).
    pub delete_foreground: Vec<usize>,
    /// (dependent index, owner uid) references to drop for orphaning owners.
    pub drop_refs: Vec<(usize, String)>,
    /// (owner index, finalizer) to remove: nothing blocks any more.
    pub remove_finalizer: Vec<(usize, &'static str)>,
}

/// The pure graph decision over everything cached.
pub fn plan(objs: &[Node]) -> Plan {
    let mut out = Plan::default();
    let by_uid: HashMap<&str, usize> = objs.iter().enumerate().map(|(i, o)| (o.uid(), i)).collect();
    let mut dependents: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, o) in objs.iter().enumerate() {
        for r in o.owners() {
            dependents.entry(r.uid.as_str()).or_default().push(i);
        }
    }
    for (i, o) in objs.iter().enumerate() {
        if o.owners().is_empty() || o.meta.deletion_timestamp.is_some() {
            continue;
        }
        if o.owners()
            .iter()
            .all(|r| !by_uid.contains_key(r.uid.as_str()))
        {
            out.maybe_orphaned.push(i);
        }
    }
    for (i, owner) in objs.iter().enumerate() {
        if owner.meta.deletion_timestamp.is_none() {
            continue;
        }
        let deps = dependents.get(owner.uid()).cloned().unwrap_or_default();
        if owner.has_finalizer(ORPHAN) {
            for d in &deps {
                out.drop_refs.push((*d, owner.uid().to_string()));
            }
            if deps.is_empty() {
                out.remove_finalizer.push((i, ORPHAN));
            }
        } else if owner.has_finalizer(FOREGROUND) {
            let blocking: Vec<usize> =
                deps.iter()
                    .copied()
                    .filter(|d| {
                        objs[*d].owners().iter().any(|r| {
                            r.uid == owner.uid() && r.block_owner_deletion.unwrap_or(false)
                        })
                    })
                    .collect();
            for d in &deps {
                if objs[*d].meta.deletion_timestamp.is_none() {
                    out.delete_foreground.push(*d);
                }
            }
            if blocking.is_empty() {
                out.remove_finalizer.push((i, FOREGROUND));
            }
        }
    }
    out.delete_foreground.sort();
    out.delete_foreground.dedup();
    out
}

/// The API resource of an owner reference's kind.
fn api_resource(api_version: &str, kind: &str) -> ApiResource {
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let lower = kind.to_ascii_lowercase();
    let plural = match lower.as_str() {
        "endpoints" => lower.clone(),
        s if s.ends_with('s') => format!("{s}es"),
        s if s.ends_with('y') => format!("{}ies", &s[..s.len() - 1]),
        s => format!("{s}s"),
    };
    ApiResource::from_gvk_with_plural(&gvk, &plural)
}

/// The running collector over Deployments, ReplicaSets and Pods.
pub struct GarbageCollector {
    client: Client,
    pods: Informer<Pod>,
    sets: Informer<ReplicaSet>,
    deployments: Informer<Deployment>,
}

impl GarbageCollector {
    pub fn new(
        client: Client,
        pods: Informer<Pod>,
        sets: Informer<ReplicaSet>,
        deployments: Informer<Deployment>,
    ) -> Self {
        GarbageCollector {
            client,
            pods,
            sets,
            deployments,
        }
    }

    pub async fn run(self: Arc<Self>) {
        self.pods.ready().await;
        self.sets.ready().await;
        self.deployments.ready().await;
        let triggers = vec![
            self.pods.subscribe(),
            self.sets.subscribe(),
            self.deployments.subscribe(),
        ];
        let me = self.clone();
        crate::informer::run_loop(
            "garbage-collector",
            triggers,
            Duration::from_secs(30),
            Duration::from_millis(500),
            move || {
                let me = me.clone();
                async move { me.collect().await }
            },
        )
        .await;
    }

    fn dyn_api(&self, n: &Node) -> Api<DynamicObject> {
        let ar = api_resource(&n.api_version, &n.kind);
        match n.meta.namespace.as_deref() {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        }
    }

    /// Whether an owner really is gone (404, or a new object with another uid).
    async fn owner_gone(&self, dep: &Node, r: &OwnerReference) -> bool {
        let ar = api_resource(&r.api_version, &r.kind);
        let api: Api<DynamicObject> = match dep.meta.namespace.as_deref() {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        };
        match api.get_opt(&r.name).await {
            Ok(None) => true,
            Ok(Some(o)) => o.metadata.uid.as_deref() != Some(r.uid.as_str()),
            Err(e) => {
                tracing::debug!(owner = %r.name, error = %e, "owner lookup failed; keeping dependent");
                false
            }
        }
    }

    async fn collect(&self) {
        let mut objs: Vec<Node> = Vec::new();
        objs.extend(
            self.deployments
                .store
                .state()
                .iter()
                .map(|o| Node::of(o.as_ref())),
        );
        objs.extend(self.sets.store.state().iter().map(|o| Node::of(o.as_ref())));
        // Pods own nothing here; only those with owners can be collected.
        objs.extend(
            self.pods
                .store
                .state()
                .iter()
                .filter(|p| {
                    p.metadata
                        .owner_references
                        .as_ref()
                        .is_some_and(|o| !o.is_empty())
                })
                .map(|o| Node::of(o.as_ref())),
        );
        let p = plan(&objs);
        for i in &p.maybe_orphaned {
            let dep = &objs[*i];
            let mut gone = true;
            for r in dep.owners() {
                if !self.owner_gone(dep, r).await {
                    gone = false;
                    break;
                }
            }
            if gone {
                tracing::info!(kind = %dep.kind, name = ?dep.meta.name, "deleting dependent whose owner is gone");
                let dp = DeleteParams {
                    propagation_policy: Some(PropagationPolicy::Background),
                    ..Default::default()
                };
                let _ = self
                    .dyn_api(dep)
                    .delete(dep.meta.name.as_deref().unwrap_or(""), &dp)
                    .await;
            }
        }
        for i in &p.delete_foreground {
            let dep = &objs[*i];
            let dp = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Foreground),
                ..Default::default()
            };
            let _ = self
                .dyn_api(dep)
                .delete(dep.meta.name.as_deref().unwrap_or(""), &dp)
                .await;
        }
        let mut dropped: HashMap<usize, HashSet<String>> = HashMap::new();
        for (d, uid) in &p.drop_refs {
            dropped.entry(*d).or_default().insert(uid.clone());
        }
        for (d, uids) in dropped {
            let dep = &objs[d];
            let keep: Vec<&OwnerReference> = dep
                .owners()
                .iter()
                .filter(|r| !uids.contains(&r.uid))
                .collect();
            let patch = serde_json::json!({"metadata": {"ownerReferences": keep, "resourceVersion": dep.meta.resource_version}});
            if let Err(e) = self
                .dyn_api(dep)
                .patch(
                    dep.meta.name.as_deref().unwrap_or(""),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                tracing::debug!(error = %e, "could not orphan dependent");
            }
        }
        for (i, f) in &p.remove_finalizer {
            let owner = &objs[*i];
            let fins: Vec<&String> = owner
                .meta
                .finalizers
                .iter()
                .flatten()
                .filter(|x| x.as_str() != *f)
                .collect();
            let patch = serde_json::json!({"metadata": {"finalizers": fins, "resourceVersion": owner.meta.resource_version}});
            match self
                .dyn_api(owner)
                .patch(
                    owner.meta.name.as_deref().unwrap_or(""),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(kind = %owner.kind, name = ?owner.meta.name, finalizer = f, "dependents handled; finalizer removed")
                }
                Err(e) => tracing::debug!(error = %e, "could not remove finalizer"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(
        kind: &str,
        uid: &str,
        owners: serde_json::Value,
        deleting: bool,
        finalizers: &[&str],
    ) -> Node {
        let mut meta = json!({"name": uid, "namespace": "ns", "uid": uid, "ownerReferences": owners, "finalizers": finalizers});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        Node {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            meta: serde_json::from_value(meta).unwrap(),
        }
    }
    fn owned_by(uid: &str, block: bool) -> serde_json::Value {
        json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": uid, "uid": uid, "controller": true, "blockOwnerDeletion": block}])
    }

    #[test]
    fn dependents_of_a_vanished_owner_are_candidates_for_background_deletion() {
        let objs = vec![
            node("Pod", "p1", owned_by("rs-gone", true), false, &[]),
            node("Pod", "p2", json!([]), false, &[]),
        ];
        assert_eq!(plan(&objs).maybe_orphaned, vec![0]);
    }

    #[test]
    fn foreground_owner_waits_for_blocking_dependents_then_drops_its_finalizer() {
        let objs = vec![
            node("ReplicaSet", "rs", json!([]), true, &[FOREGROUND]),
            node("Pod", "p1", owned_by("rs", true), false, &[]),
        ];
        let p = plan(&objs);
        assert_eq!(p.delete_foreground, vec![1]);
        assert!(p.remove_finalizer.is_empty());
        let objs = vec![node("ReplicaSet", "rs", json!([]), true, &[FOREGROUND])];
        assert_eq!(plan(&objs).remove_finalizer, vec![(0, FOREGROUND)]);
    }

    #[test]
    fn orphaning_owner_releases_dependents_then_drops_its_finalizer() {
        let objs = vec![
            node("ReplicaSet", "rs", json!([]), true, &[ORPHAN]),
            node("Pod", "p1", owned_by("rs", true), false, &[]),
        ];
        let p = plan(&objs);
        assert_eq!(p.drop_refs, vec![(1, "rs".to_string())]);
        assert!(p.delete_foreground.is_empty() && p.maybe_orphaned.is_empty());
        let objs = vec![node("ReplicaSet", "rs", json!([]), true, &[ORPHAN])];
        assert_eq!(plan(&objs).remove_finalizer, vec![(0, ORPHAN)]);
    }

    #[test]
    fn owner_kinds_map_to_their_plural_resources() {
        assert_eq!(api_resource("apps/v1", "ReplicaSet").plural, "replicasets");
        assert_eq!(api_resource("v1", "Endpoints").plural, "endpoints");
        assert_eq!(
            api_resource("networking.k8s.io/v1", "IngressClass").plural,
            "ingressclasses"
        );
        assert_eq!(api_resource("v1", "Pod").group, "");
    }
}
