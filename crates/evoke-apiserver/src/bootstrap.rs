//! Objects every cluster has from its first start: the namespaces
//! default, kube-system, kube-public and kube-node-lease, and the
//! `kubernetes` Service in default.

use evoke_store::{Backend, StoreError};
use evoke_types::registry;
use serde_json::json;

use crate::error::StartError;
use crate::object;

/// The ClusterIP of the `kubernetes` Service: the first of 10.43.0.0/16.
const KUBERNETES_SERVICE_IP: &str = "10.43.0.1";

async fn create_if_missing(
    store: &dyn Backend,
    key: String,
    obj: serde_json::Value,
) -> Result<(), StartError> {
    match store.create(&key, object::to_bytes(&obj)).await {
        Ok(_) | Err(StoreError::AlreadyExists(_)) => Ok(()),
        Err(source) => Err(StartError::Bootstrap { key, source }),
    }
}

pub(crate) async fn ensure_defaults(store: &dyn Backend) -> Result<(), StartError> {
    let now = object::now();
    let (Some(ns), Some(svc)) = (
        registry::by_plural("", "v1", "namespaces"),
        registry::by_plural("", "v1", "services"),
    ) else {
        return Ok(());
    };
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": now,
                "labels": {"kubernetes.io/metadata.name": name}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        });
        create_if_missing(store, object::key(ns, None, name), obj).await?;
    }
    let kubernetes = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default", "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": now, "generation": 1,
            "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {
            "type": "ClusterIP", "clusterIP": KUBERNETES_SERVICE_IP, "clusterIPs": [KUBERNETES_SERVICE_IP],
            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}],
            "sessionAffinity": "None", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    });
    create_if_missing(
        store,
        object::key(svc, Some("default"), "kubernetes"),
        kubernetes,
    )
    .await
}
