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
pub mod endpoints;
pub mod gc;
pub mod informer;
pub mod namespace;
pub mod nodelifecycle;
pub mod replicaset;
pub mod util;

use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
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
    let nodes: Informer<Node> =
        Informer::spawn(Api::all(client.clone()), watcher::Config::default());
    let leases: Informer<Lease> = Informer::spawn(
        Api::namespaced(client.clone(), "kube-node-lease"),
        watcher::Config::default(),
    );
    let namespaces: Informer<Namespace> =
        Informer::spawn(Api::all(client.clone()), watcher::Config::default());
    let services: Informer<Service> =
        Informer::spawn(Api::all(client.clone()), watcher::Config::default());
    let endpoints: Informer<Endpoints> =
        Informer::spawn(Api::all(client.clone()), watcher::Config::default());
    let slices: Informer<EndpointSlice> =
        Informer::spawn(Api::all(client.clone()), watcher::Config::default());
    let gc = Arc::new(gc::GarbageCollector::new(
        client.clone(),
        pods.clone(),
        sets.clone(),
        deployments.clone(),
    ));
    let ns = Arc::new(namespace::NamespaceController::new(
        client.clone(),
        namespaces,
    ));
    let nl = Arc::new(nodelifecycle::NodeLifecycleController::new(
        client.clone(),
        nodes,
        leases,
        pods.clone(),
    ));
    let ep = Arc::new(endpoints::EndpointsController::new(
        client.clone(),
        services,
        pods.clone(),
        endpoints,
        slices,
    ));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(rs.run());
    tasks.spawn(dc.run());
    tasks.spawn(gc.run());
    tasks.spawn(ns.run());
    tasks.spawn(nl.run());
    tasks.spawn(ep.run());
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "a controller stopped");
        }
    }
}
