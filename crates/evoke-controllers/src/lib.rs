//! Level-triggered reconcilers, the kube-controller-manager's job:
//! [`replicaset`], [`deployment`], [`gc`] (ownerReferences), [`namespace`]
//! deletion, [`nodelifecycle`] (heartbeats, NoExecute taints, eviction) and
//! [`endpoints`] (Endpoints and EndpointSlices from Services).
//!
//! Every controller reads shared watch caches ([`informer`]) and, on any
//! change or a periodic resync, looks at the whole picture again: it never
//! acts on "what changed", so a missed event or a restart cannot confuse
//! it. Each one splits a pure `plan` (unit-tested with k8s-openapi values)
//! from the code that applies it. Start at [`run`].

pub mod deployment;
pub mod informer;
pub mod replicaset;
pub mod util;

use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client};

use informer::Informer;

/// Runs every controller until the process ends.
pub async fn run(client: Client) {
    let pods: Informer<Pod> = Informer::spawn(Api::all(client.clone()), watcher::Config::default());
    let sets: Informer<ReplicaSet> =
        Informer::spawn(Api::all(client.clone()), watcher::Config::default());
    let deployments: Informer<Deployment> =
        Informer::spawn(Api::all(client.clone()), watcher::Config::default());
    let rs = Arc::new(replicaset::ReplicaSetController::new(
        client.clone(),
        pods.clone(),
        sets.clone(),
    ));
    let dc = Arc::new(deployment::DeploymentController::new(
        client.clone(),
        deployments.clone(),
        sets.clone(),
        pods.clone(),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(rs.run());
    tasks.spawn(dc.run());
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "a controller stopped");
        }
    }
}
