//! The Deployment controller: one ReplicaSet per pod template, rolled from
//! old to new by RollingUpdate (maxSurge / maxUnavailable) or Recreate,
//! with revision annotations so that `kubectl rollout history|undo` work,
//! and status conditions so that `kubectl rollout status` finishes.
//!
//! The decision is the pure [`plan`]; [`DeploymentController`] applies it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};

use crate::informer::Informer;
use crate::util::{controller_of, controller_ref, is_active, now};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
pub const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";
pub const HASH_LABEL: &str = "pod-template-hash";

/// A short, name-safe hash of a pod template (FNV-1a over its JSON).
pub fn template_hash(t: &PodTemplateSpec) -> String {
    let bytes = serde_json::to_vec(t).unwrap_or_default();
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    // Consonants and digits only, so the hash never spells a word.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut s = String::new();
    for _ in 0..10 {
        s.push(ALPHABET[(h % ALPHABET.len() as u64) as usize] as char);
        h /= ALPHABET.len() as u64;
    }
    s
}

/// The RS's template without the label the controller added.
fn stripped_template(rs: &ReplicaSet) -> Option<PodTemplateSpec> {
    let mut t = rs.spec.as_ref()?.template.clone()?;
    if let Some(l) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        l.remove(HASH_LABEL);
    }
    Some(t)
}

fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}
fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}
fn available(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}
fn ready(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}
fn status_replicas(rs: &ReplicaSet) -> i32 {
    rs.status.as_ref().map(|s| s.replicas).unwrap_or(0)
}

/// Resolves an int-or-percent against `total`; percentages round up for
/// surge and down for unavailability, as Kubernetes does.
pub fn resolve(v: Option<&IntOrString>, default_percent: i32, total: i32, round_up: bool) -> i32 {
    let pct = |p: i32| {
        let x = i64::from(p) * i64::from(total);
        (if round_up { (x + 99) / 100 } else { x / 100 }) as i32
    };
    match v {
        None => pct(default_percent),
        Some(IntOrString::Int(i)) => *i,
        Some(IntOrString::String(s)) => match s.trim_end_matches('%').parse::<i32>() {
            Ok(p) if s.ends_with('%') => pct(p),
            Ok(i) => i,
            Err(_) => pct(default_percent),
        },
    }
}

/// A change to an existing ReplicaSet.
#[derive(Debug, Default, PartialEq)]
pub struct RsUpdate {
    pub name: String,
    pub replicas: Option<i32>,
    pub annotations: BTreeMap<String, String>,
}

/// What one reconcile of a Deployment should do.
#[derive(Debug, Default)]
pub struct Plan {
    pub create: Option<ReplicaSet>,
    pub update: Vec<RsUpdate>,
    pub delete: Vec<String>,
    /// The revision annotation the Deployment should carry.
    pub revision: Option<String>,
    pub status: DeploymentStatus,
}

/// Decides, from the cache, what to do for `d`. `sets` are the
/// ReplicaSets it controls; `pods_of_old` counts live pods of old sets
/// (Recreate waits for zero).
pub fn plan(d: &Deployment, sets: &[Arc<ReplicaSet>], pods_of_old: usize) -> Plan {
    let mut out = Plan::default();
    let spec = d.spec.clone().unwrap_or_default();
    let desired = spec.replicas.unwrap_or(1).max(0);
    let paused = spec.paused.unwrap_or(false);
    let template = spec.template.clone();
    let hash = template_hash(&template);
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let ru = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let mut max_surge = if recreate {
        0
    } else {
        resolve(ru.and_then(|r| r.max_surge.as_ref()), 25, desired, true)
    };
    let max_unavailable = if recreate {
        desired
    } else {
        resolve(
            ru.and_then(|r| r.max_unavailable.as_ref()),
            25,
            desired,
            false,
        )
    };
    if !recreate && max_surge == 0 && max_unavailable == 0 {
        max_surge = 1;
    }

    let new_rs = sets
        .iter()
        .find(|rs| rs.labels().get(HASH_LABEL) == Some(&hash))
        .or_else(|| {
            sets.iter()
                .find(|rs| stripped_template(rs).as_ref() == Some(&template))
        })
        .cloned();
    let olds: Vec<Arc<ReplicaSet>> = sets
        .iter()
        .filter(|rs| {
            new_rs
                .as_ref()
                .is_none_or(|n| n.metadata.uid != rs.metadata.uid)
        })
        .cloned()
        .collect();
    let max_old_rev = olds.iter().map(|r| revision_of(r)).max().unwrap_or(0);
    let change_cause = d.annotations().get(CHANGE_CAUSE).cloned();

    // Replica counts after this plan, by RS name, for the status.
    let mut target: HashMap<String, i32> = sets
        .iter()
        .map(|r| (r.name_any(), spec_replicas(r)))
        .collect();
    let old_total: i32 = olds.iter().map(|r| spec_replicas(r)).sum();

    let mut new_name = new_rs.as_ref().map(|r| r.name_any());
    match &new_rs {
        None if !paused => {
            let replicas = if recreate {
                if old_total > 0 || pods_of_old > 0 {
                    0
                } else {
                    desired
                }
            } else {
                (desired + max_surge - old_total).clamp(0, desired)
            };
            let rs = new_replicaset(
                d,
                &template,
                &hash,
                replicas,
                max_old_rev + 1,
                desired,
                max_surge,
                change_cause.as_deref(),
            );
            target.insert(rs.name_any(), replicas);
            new_name = Some(rs.name_any());
            out.revision = Some((max_old_rev + 1).to_string());
            out.create = Some(rs);
        }
        None => {}
        Some(n) => {
            let mut upd = RsUpdate {
                name: n.name_any(),
                ..Default::default()
            };
            let rev = revision_of(n);
            let rev = if rev <= max_old_rev {
                // An old template came back (rollout undo): it becomes the newest revision.
                upd.annotations
                    .insert(REVISION.into(), (max_old_rev + 1).to_string());
                max_old_rev + 1
            } else {
                rev
            };
            out.revision = Some(rev.to_string());
            if let Some(c) = change_cause.as_ref() {
                if n.annotations().get(CHANGE_CAUSE) != Some(c) {
                    upd.annotations.insert(CHANGE_CAUSE.into(), c.clone());
                }
            }
            for (k, v) in [
                (DESIRED_REPLICAS, desired),
                (MAX_REPLICAS, desired + max_surge),
            ] {
                if n.annotations().get(k) != Some(&v.to_string()) {
                    upd.annotations.insert(k.into(), v.to_string());
                }
            }
            let cur = spec_replicas(n);
            let want = if paused {
                // Paused: only follow scaling when no rollout is in progress.
                if old_total == 0 {
                    desired
                } else {
                    cur
                }
            } else if recreate {
                if old_total > 0 || pods_of_old > 0 {
                    0
                } else {
                    desired
                }
            } else if cur > desired {
                desired
            } else {
                let room = desired + max_surge - (old_total + cur);
                (cur + room.max(0)).min(desired)
            };
            if want != cur {
                upd.replicas = Some(want);
                target.insert(n.name_any(), want);
            }
            if upd.replicas.is_some() || !upd.annotations.is_empty() {
                out.update.push(upd);
            }
        }
    }

    let new_scaled_up = out.create.is_some()
        || out.update.iter().any(|u| {
            Some(&u.name) == new_name.as_ref()
                && u.replicas
                    .is_some_and(|r| new_rs.as_ref().is_some_and(|n| r > spec_replicas(n)))
        });
    // Scale old sets down.
    if !paused && old_total > 0 {
        if recreate || new_rs.is_none() && desired == 0 {
            for o in olds.iter().filter(|o| spec_replicas(o) > 0) {
                out.update.push(RsUpdate {
                    name: o.name_any(),
                    replicas: Some(0),
                    ..Default::default()
                });
                target.insert(o.name_any(), 0);
            }
        } else if !new_scaled_up {
            let new_available = new_rs.as_ref().map(|n| available(n)).unwrap_or(0);
            let old_available: i32 = olds
                .iter()
                .map(|o| available(o).min(spec_replicas(o)))
                .sum();
            // Available pods that may go while keeping desired - maxUnavailable.
            let mut budget = (old_available + new_available - (desired - max_unavailable)).max(0);
            // Oldest revisions go first; unavailable replicas cost nothing.
            let mut olds_sorted = olds.clone();
            olds_sorted.sort_by_key(|r| revision_of(r));
            for o in olds_sorted {
                let cur = spec_replicas(&o);
                if cur == 0 {
                    continue;
                }
                let avail_o = available(&o).min(cur);
                let healthy_down = budget.min(avail_o);
                let down = ((cur - avail_o) + healthy_down).min(cur);
                if down > 0 {
                    budget -= healthy_down;
                    out.update.push(RsUpdate {
                        name: o.name_any(),
                        replicas: Some(cur - down),
                        ..Default::default()
                    });
                    target.insert(o.name_any(), cur - down);
                }
            }
        }
    }

    // Clean up history beyond revisionHistoryLimit.
    let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let mut dead: Vec<&Arc<ReplicaSet>> = olds
        .iter()
        .filter(|o| target.get(&o.name_any()).copied().unwrap_or(0) == 0 && status_replicas(o) == 0)
        .collect();
    if dead.len() > limit {
        dead.sort_by_key(|r| revision_of(r));
        out.delete = dead[..dead.len() - limit]
            .iter()
            .map(|r| r.name_any())
            .collect();
    }

    // Status, as seen through the ReplicaSets' own status.
    let replicas: i32 = sets.iter().map(|r| status_replicas(r)).sum();
    let updated = new_rs.as_ref().map(|r| status_replicas(r)).unwrap_or(0);
    let ready_n: i32 = sets.iter().map(|r| ready(r)).sum();
    let avail: i32 = sets.iter().map(|r| available(r)).sum();
    let prev = d.status.clone().unwrap_or_default();
    let complete =
        updated == desired && replicas == desired && avail == desired && new_rs.is_some();
    let mut conditions = Vec::new();
    let available_ok = avail >= desired - max_unavailable;
    conditions.push(condition(
        &prev,
        "Available",
        if available_ok { "True" } else { "False" },
        if available_ok {
            "MinimumReplicasAvailable"
        } else {
            "MinimumReplicasUnavailable"
        },
        if available_ok {
            "Deployment has minimum availability."
        } else {
            "Deployment does not have minimum availability."
        },
    ));
    let rs_name = new_name.clone().unwrap_or_default();
    let (p_status, p_reason, p_msg) = if paused {
        (
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused".to_string(),
        )
    } else if complete {
        (
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
        )
    } else if out.create.is_some() {
        (
            "True",
            "NewReplicaSetCreated",
            format!("Created new replica set \"{rs_name}\""),
        )
    } else {
        (
            "True",
            "ReplicaSetUpdated",
            format!("ReplicaSet \"{rs_name}\" is progressing."),
        )
    };
    conditions.push(condition(&prev, "Progressing", p_status, p_reason, &p_msg));
    out.status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(replicas),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready_n),
        available_replicas: Some(avail),
        unavailable_replicas: Some((desired - avail).max(0)),
        conditions: Some(conditions),
        collision_count: prev.collision_count,
        terminating_replicas: None,
    };
    out
}

fn condition(
    prev: &DeploymentStatus,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
) -> DeploymentCondition {
    let old = prev.conditions.iter().flatten().find(|c| c.type_ == type_);
    let t = now();
    let same_status = old.is_some_and(|o| o.status == status);
    let same = old.is_some_and(|o| {
        o.status == status
            && o.reason.as_deref() == Some(reason)
            && o.message.as_deref() == Some(message)
    });
    DeploymentCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_transition_time: if same_status {
            old.and_then(|o| o.last_transition_time.clone())
        } else {
            Some(t.clone())
        },
        last_update_time: if same {
            old.and_then(|o| o.last_update_time.clone())
        } else {
            Some(t)
        },
    }
}

#[allow(clippy::too_many_arguments)]
fn new_replicaset(
    d: &Deployment,
    template: &PodTemplateSpec,
    hash: &str,
    replicas: i32,
    revision: i64,
    desired: i32,
    max_surge: i32,
    change_cause: Option<&str>,
) -> ReplicaSet {
    let mut t = template.clone();
    let meta = t.metadata.get_or_insert_with(Default::default);
    meta.labels
        .get_or_insert_with(Default::default)
        .insert(HASH_LABEL.into(), hash.into());
    let mut selector: LabelSelector = d
        .spec
        .as_ref()
        .map(|s| s.selector.clone())
        .unwrap_or_default();
    selector
        .match_labels
        .get_or_insert_with(Default::default)
        .insert(HASH_LABEL.into(), hash.into());
    let mut annotations = BTreeMap::from([
        (REVISION.to_string(), revision.to_string()),
        (DESIRED_REPLICAS.to_string(), desired.to_string()),
        (MAX_REPLICAS.to_string(), (desired + max_surge).to_string()),
    ]);
    if let Some(c) = change_cause {
        annotations.insert(CHANGE_CAUSE.into(), c.into());
    }
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{}-{hash}", d.name_any())),
            namespace: d.namespace(),
            labels: meta.labels.clone(),
            annotations: Some(annotations),
            owner_references: Some(vec![controller_ref(d)]),
            ..Default::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: d.spec.as_ref().and_then(|s| s.min_ready_seconds),
            selector,
            template: Some(t),
        }),
        status: None,
    }
}

/// The running controller.
pub struct DeploymentController {
    client: Client,
    deployments: Informer<Deployment>,
    sets: Informer<ReplicaSet>,
    pods: Informer<Pod>,
}

impl DeploymentController {
    pub fn new(
        client: Client,
        deployments: Informer<Deployment>,
        sets: Informer<ReplicaSet>,
        pods: Informer<Pod>,
    ) -> Self {
        DeploymentController {
            client,
            deployments,
            sets,
            pods,
        }
    }

    pub async fn run(self: Arc<Self>) {
        self.deployments.ready().await;
        self.sets.ready().await;
        self.pods.ready().await;
        let triggers = vec![self.deployments.subscribe(), self.sets.subscribe()];
        let me = self.clone();
        crate::informer::run_loop(
            "deployment",
            triggers,
            Duration::from_secs(10),
            Duration::from_millis(5),
            move || {
                let me = me.clone();
                async move {
                    for d in me.deployments.store.state() {
                        me.reconcile(&d).await;
                    }
                }
            },
        )
        .await;
    }

    async fn reconcile(&self, d: &Deployment) {
        if d.metadata.deletion_timestamp.is_some() {
            return;
        }
        let uid = d.uid().unwrap_or_default();
        let ns = d.namespace().unwrap_or_default();
        let name = d.name_any();
        let sets: Vec<Arc<ReplicaSet>> = self
            .sets
            .store
            .state()
            .into_iter()
            .filter(|rs| {
                rs.namespace() == d.namespace()
                    && controller_of(rs.as_ref()).is_some_and(|o| o.uid == uid)
            })
            .collect();
        let hash = template_hash(&d.spec.clone().unwrap_or_default().template);
        let old_uids: Vec<String> = sets
            .iter()
            .filter(|rs| rs.labels().get(HASH_LABEL) != Some(&hash))
            .filter_map(|rs| rs.uid())
            .collect();
        let pods_of_old = self
            .pods
            .store
            .state()
            .iter()
            .filter(|p| p.namespace() == d.namespace())
            .filter(|p| controller_of(p.as_ref()).is_some_and(|o| old_uids.contains(&o.uid)))
            .filter(|p| is_active(p) || p.metadata.deletion_timestamp.is_some())
            .count();
        let plan = plan(d, &sets, pods_of_old);
        let rs_api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), &ns);
        if let Some(rs) = &plan.create {
            match rs_api.create(&PostParams::default(), rs).await {
                Ok(_) => {
                    tracing::info!(deployment = %format!("{ns}/{name}"), replicaset = %rs.name_any(), "created replica set")
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => {
                    tracing::warn!(deployment = %name, error = %e, "could not create replica set")
                }
            }
        }
        for u in &plan.update {
            let mut patch = serde_json::json!({});
            if let Some(r) = u.replicas {
                patch["spec"] = serde_json::json!({"replicas": r});
                tracing::info!(deployment = %name, replicaset = %u.name, replicas = r, "scaling replica set");
            }
            if !u.annotations.is_empty() {
                patch["metadata"] = serde_json::json!({"annotations": u.annotations});
            }
            if let Err(e) = rs_api
                .patch(&u.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::warn!(deployment = %name, replicaset = %u.name, error = %e, "could not update replica set");
            }
        }
        for n in &plan.delete {
            if let Err(e) = rs_api.delete(n, &DeleteParams::default()).await {
                tracing::debug!(replicaset = %n, error = %e, "could not delete old replica set");
            }
        }
        let d_api: Api<Deployment> = Api::namespaced(self.client.clone(), &ns);
        if let Some(rev) = &plan.revision {
            if d.annotations().get(REVISION) != Some(rev) {
                let patch = serde_json::json!({"metadata": {"annotations": {REVISION: rev}}});
                if let Err(e) = d_api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    tracing::debug!(deployment = %name, error = %e, "could not set revision");
                }
            }
        }
        if d.status.as_ref() != Some(&plan.status) {
            let patch = serde_json::json!({ "status": plan.status });
            if let Err(e) = d_api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::debug!(deployment = %name, error = %e, "could not update status");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deploy(replicas: i32, image: &str, strategy: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "d-1", "generation": 1},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}}, "strategy": strategy,
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": image}]}}}
        }))
        .unwrap()
    }
    /// A ReplicaSet as the controller would have made it, with status.
    fn rs_for(d: &Deployment, spec: i32, avail: i32, rev: i64) -> Arc<ReplicaSet> {
        let t = d.spec.as_ref().unwrap().template.clone();
        let mut rs = new_replicaset(d, &t, &template_hash(&t), spec, rev, spec, 0, None);
        rs.metadata.uid = Some(format!("rs-{rev}"));
        rs.status = Some(k8s_openapi::api::apps::v1::ReplicaSetStatus {
            replicas: spec,
            ready_replicas: Some(avail),
            available_replicas: Some(avail),
            ..Default::default()
        });
        Arc::new(rs)
    }

    #[test]
    fn first_sync_creates_a_replicaset_at_revision_one() {
        let d = deploy(3, "busybox:1", json!({}));
        let p = plan(&d, &[], 0);
        let rs = p.create.expect("creates a replica set");
        assert_eq!(rs.spec.as_ref().unwrap().replicas, Some(3));
        assert_eq!(
            rs.annotations().get(REVISION).map(String::as_str),
            Some("1")
        );
        assert!(rs.name_any().starts_with("web-"));
        assert_eq!(p.revision.as_deref(), Some("1"));
        let sel = &rs.spec.as_ref().unwrap().selector;
        assert!(sel.match_labels.as_ref().unwrap().contains_key(HASH_LABEL));
    }

    #[test]
    fn percentages_round_surge_up_and_unavailable_down() {
        assert_eq!(resolve(None, 25, 3, true), 1);
        assert_eq!(resolve(None, 25, 3, false), 0);
        assert_eq!(
            resolve(Some(&IntOrString::String("50%".into())), 25, 5, true),
            3
        );
        assert_eq!(resolve(Some(&IntOrString::Int(2)), 25, 5, false), 2);
    }

    #[test]
    fn rolling_update_surges_new_then_scales_old_down_within_budget() {
        let old_d = deploy(
            4,
            "busybox:1",
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 1}}),
        );
        let old = rs_for(&old_d, 4, 4, 1);
        let d = deploy(
            4,
            "busybox:2",
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 1}}),
        );
        // Step 1: the new RS is created with the surge only.
        let p = plan(&d, std::slice::from_ref(&old), 0);
        let new = p.create.expect("new RS");
        assert_eq!(new.spec.as_ref().unwrap().replicas, Some(1));
        assert_eq!(
            new.annotations().get(REVISION).map(String::as_str),
            Some("2")
        );
        // Step 2: new exists with 1 (not yet available): old may drop by
        // total(5) - minAvailable(3) - newUnavailable(1) = 1.
        let mut new_rs = new.clone();
        new_rs.metadata.uid = Some("rs-2".into());
        new_rs.status = Some(Default::default());
        let p = plan(&d, &[old.clone(), Arc::new(new_rs.clone())], 0);
        assert_eq!(
            p.update,
            vec![RsUpdate {
                name: old.name_any(),
                replicas: Some(3),
                ..Default::default()
            }]
        );
        // Status is not complete while old pods remain.
        assert_eq!(p.status.updated_replicas, Some(0));
        let prog = p
            .status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Progressing")
            .unwrap();
        assert_eq!(prog.reason.as_deref(), Some("ReplicaSetUpdated"));
    }

    #[test]
    fn completed_rollout_reports_new_replicaset_available() {
        let d = deploy(2, "busybox:1", json!({}));
        let rs = rs_for(&d, 2, 2, 1);
        let p = plan(&d, &[rs], 0);
        assert!(p.create.is_none());
        assert!(p.update.iter().all(|u| u.replicas.is_none()));
        let s = p.status;
        assert_eq!(
            (s.replicas, s.updated_replicas, s.available_replicas),
            (Some(2), Some(2), Some(2))
        );
        let prog = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Progressing")
            .unwrap();
        assert_eq!(prog.reason.as_deref(), Some("NewReplicaSetAvailable"));
    }

    #[test]
    fn scaling_changes_only_the_new_replicaset() {
        let d1 = deploy(3, "busybox:1", json!({}));
        let rs = rs_for(&d1, 3, 3, 1);
        let d = deploy(5, "busybox:1", json!({}));
        let p = plan(&d, std::slice::from_ref(&rs), 0);
        assert!(p
            .update
            .iter()
            .any(|u| u.name == rs.name_any() && u.replicas == Some(5)));
        let d = deploy(1, "busybox:1", json!({}));
        let p = plan(&d, std::slice::from_ref(&rs), 0);
        assert!(p
            .update
            .iter()
            .any(|u| u.name == rs.name_any() && u.replicas == Some(1)));
    }

    #[test]
    fn recreate_scales_old_to_zero_and_waits_for_its_pods() {
        let s = json!({"type": "Recreate"});
        let old = rs_for(&deploy(2, "busybox:1", s.clone()), 2, 2, 1);
        let d = deploy(2, "busybox:2", s);
        let p = plan(&d, std::slice::from_ref(&old), 2);
        assert_eq!(
            p.create.as_ref().unwrap().spec.as_ref().unwrap().replicas,
            Some(0)
        );
        assert!(p
            .update
            .iter()
            .any(|u| u.name == old.name_any() && u.replicas == Some(0)));
    }

    #[test]
    fn undo_to_an_old_template_reuses_its_replicaset_as_newest_revision() {
        let d1 = deploy(2, "busybox:1", json!({}));
        let rs1 = rs_for(&d1, 0, 0, 1);
        let rs2 = rs_for(&deploy(2, "busybox:2", json!({})), 2, 2, 2);
        // kubectl rollout undo copies rs1's template (minus the hash label) back.
        let p = plan(&d1, &[rs1.clone(), rs2.clone()], 0);
        assert!(p.create.is_none());
        let u = p
            .update
            .iter()
            .find(|u| u.name == rs1.name_any())
            .expect("rs1 updated");
        assert_eq!(u.annotations.get(REVISION).map(String::as_str), Some("3"));
        assert!(u.replicas.unwrap() > 0);
        assert_eq!(p.revision.as_deref(), Some("3"));
    }

    #[test]
    fn history_beyond_the_limit_is_deleted_oldest_first() {
        let mut d = deploy(1, "busybox:9", json!({}));
        d.spec.as_mut().unwrap().revision_history_limit = Some(1);
        let olds: Vec<Arc<ReplicaSet>> = (1..=3)
            .map(|i| rs_for(&deploy(1, &format!("busybox:{i}"), json!({})), 0, 0, i))
            .collect();
        let mut all = olds.clone();
        all.push(rs_for(&d, 1, 1, 4));
        let p = plan(&d, &all, 0);
        assert_eq!(p.delete, vec![olds[0].name_any(), olds[1].name_any()]);
    }

    #[test]
    fn paused_deployment_does_not_roll() {
        let old = rs_for(&deploy(2, "busybox:1", json!({})), 2, 2, 1);
        let mut d = deploy(2, "busybox:2", json!({}));
        d.spec.as_mut().unwrap().paused = Some(true);
        let p = plan(&d, &[old], 0);
        assert!(p.create.is_none());
        assert!(p.update.is_empty());
    }
}
