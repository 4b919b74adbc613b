//! Objects every cluster has from its first start: the namespaces
//! default, kube-system, kube-public and kube-node-lease, and the
//! `kubernetes` Service in default.

use evoke_store::{Backend, StoreError};
use evoke_types::registry;
use serde_json::json;

use crate::error::StartError;
use crate::object;

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

/// The `default` ServiceAccount every namespace has (kube's service
/// account controller makes it; here the API server does, on namespace
/// creation and at start).
pub(crate) fn default_service_account(namespace: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "default", "namespace": namespace, "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": object::now()},
    })
}

/// Writes `obj` at `key`, replacing what is there (used for the API
/// server's own Endpoints, whose address changes between starts).
async fn put(store: &dyn Backend, key: String, obj: serde_json::Value) -> Result<(), StartError> {
    let bytes = object::to_bytes(&obj);
    let result = match store.get(&key).await {
        Ok(Some(kv)) => store.update(&key, kv.mod_revision, bytes).await.map(|_| ()),
        Ok(None) => store.create(&key, bytes).await.map(|_| ()),
        Err(e) => Err(e),
    };
    result.map_err(|source| StartError::Bootstrap { key, source })
}

/// The address pods reach this machine at: the source address of the
/// default route (a UDP connect sends nothing), or loopback.
pub(crate) fn host_ip() -> String {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".into())
}

/// Endpoints and EndpointSlice of the `kubernetes` Service: this server.
pub(crate) async fn advertise(
    store: &dyn Backend,
    bind: std::net::SocketAddr,
) -> Result<(), StartError> {
    let (Some(eps), Some(slices)) = (
        registry::by_plural("", "v1", "endpoints"),
        registry::by_plural("discovery.k8s.io", "v1", "endpointslices"),
    ) else {
        return Ok(());
    };
    let ip = if bind.ip().is_unspecified() || bind.ip().is_loopback() {
        host_ip()
    } else {
        bind.ip().to_string()
    };
    let port = bind.port();
    let now = object::now();
    let endpoints = json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "kubernetes", "namespace": "default", "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": now, "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": [{"addresses": [{"ip": ip}], "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}],
    });
    put(
        store,
        object::key(eps, Some("default"), "kubernetes"),
        endpoints,
    )
    .await?;
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default", "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": now,
            "labels": {"kubernetes.io/service-name": "kubernetes", "endpointslice.kubernetes.io/managed-by": "evoke-apiserver"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    });
    put(
        store,
        object::key(slices, Some("default"), "kubernetes"),
        slice,
    )
    .await
}

/// The namespaces and ServiceAccounts every cluster has, and the
/// `kubernetes` Service at `kubernetes_ip` (the first Service address).
pub(crate) async fn ensure_defaults(
    store: &dyn Backend,
    kubernetes_ip: std::net::Ipv4Addr,
) -> Result<(), StartError> {
    let kubernetes_ip = kubernetes_ip.to_string();
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
        if let Some(sa) = registry::by_plural("", "v1", "serviceaccounts") {
            let key = object::key(sa, Some(name), "default");
            create_if_missing(store, key, default_service_account(name)).await?;
        }
    }
    let kubernetes = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default", "uid": uuid::Uuid::new_v4().to_string(),
            "creationTimestamp": now, "generation": 1,
            "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {
            "type": "ClusterIP", "clusterIP": kubernetes_ip, "clusterIPs": [kubernetes_ip],
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
