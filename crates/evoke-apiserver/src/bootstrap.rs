//! Objects every cluster has from its first start (the namespaces
//! default, kube-system, kube-public and kube-node-lease, and the
//! `kubernetes` Service in default), and the join of a node ([`join`]):
//! the join secret plus a node password buy a node its certificates.

use evoke_store::{Backend, StoreError};
use evoke_types::registry;
use evoke_types::status::ApiError;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::StartError;
use crate::respond::{self, Reply};
use crate::{object, tls, State};

/// Where node Leases live.
pub(crate) const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// A node password's hash is kept in kube-system as the Secret
/// `<node>` + this suffix (k3s keeps `<node>.node-password.k3s`). Deleting
/// it lets another machine take the name.
const PASSWORD_SECRET_SUFFIX: &str = ".node-password.evoke";
/// A join names at most this many addresses for the serving certificate.
const MAX_ADDRESSES: usize = 16;

/// What a joining agent sends to [`crate::auth::JOIN_PATH`] (JSON):
/// `nodeName`, `nodePassword` (its identity: the first join of a name
/// records it, and later joins of that name must present it), `addresses`
/// (IPs for its serving certificate), and two PEM certificate requests,
/// `clientCsr` and `servingCsr`. The answer holds `clientCertificate`,
/// `servingCertificate` and `caCertificate`.
struct JoinRequest {
    node: String,
    password: String,
    addresses: Vec<String>,
    client_csr: String,
    serving_csr: String,
}

impl JoinRequest {
    /// A join: every field is required.
    fn parse(body: &[u8]) -> Result<JoinRequest, ApiError> {
        Self::parse_with(body, true)
    }

    /// `need_password`: a join proves the node with its password; a
    /// renewal with its current certificate, so it sends none.
    fn parse_with(body: &[u8], need_password: bool) -> Result<JoinRequest, ApiError> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("join request: {e}")))?;
        let field = |name: &str| -> Result<String, ApiError> {
            v[name]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(String::from)
                .ok_or_else(|| ApiError::bad_request(format!("join request: {name} is required")))
        };
        let node = field("nodeName")?;
        if let Some(why) = evoke_types::validate::dns_subdomain(&node) {
            return Err(ApiError::bad_request(format!(
                "join request: node name {node:?}: {why}"
            )));
        }
        let password = if need_password {
            field("nodePassword")?
        } else {
            String::new()
        };
        if password.len() > 1024 {
            return Err(ApiError::bad_request(
                "join request: nodePassword is longer than 1024 bytes",
            ));
        }
        let mut addresses = Vec::new();
        for a in v["addresses"].as_array().into_iter().flatten() {
            let ip: std::net::IpAddr =
                a.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                    ApiError::bad_request(format!("join request: address {a} is not an IP address"))
                })?;
            addresses.push(ip.to_string());
        }
        if addresses.len() > MAX_ADDRESSES {
            return Err(ApiError::bad_request(format!(
                "join request: more than {MAX_ADDRESSES} addresses"
            )));
        }
        Ok(JoinRequest {
            node,
            password,
            addresses,
            client_csr: field("clientCsr")?,
            serving_csr: field("servingCsr")?,
        })
    }
}

fn password_hash(password: &str) -> String {
    Sha256::digest(password.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks `password` against the one recorded for `node`, recording it
/// when the name is new. Err(403) when the name is held by another
/// password: a second machine claiming a node's name is refused.
async fn check_node_password(
    store: &dyn Backend,
    node: &str,
    password: &str,
) -> Result<(), ApiError> {
    use base64::Engine;
    let secrets = registry::by_plural("", "v1", "secrets")
        .ok_or_else(|| ApiError::new(500, "InternalError", "secrets are not in the registry"))?;
    let name = format!("{node}{PASSWORD_SECRET_SUFFIX}");
    let key = object::key(secrets, Some("kube-system"), &name);
    let hash = password_hash(password);
    let store_err = |e| crate::error::store_to_api(e, "secrets", &name);
    // Two tries: a first join of a name may race another one.
    for _ in 0..2 {
        if let Some(kv) = store.get(&key).await.map_err(store_err)? {
            let stored = object::from_kv(&kv)?;
            let recorded = stored["data"]["hash"]
                .as_str()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .unwrap_or_default();
            return if constant_time_eq(&recorded, hash.as_bytes()) {
                Ok(())
            } else {
                Err(ApiError::new(
                    403,
                    "Forbidden",
                    format!(
                        "node {node} is already registered with a different node password; \
                         delete secret kube-system/{name} to let another machine take this name"
                    ),
                ))
            };
        }
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": "kube-system",
                "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": object::now(),
                "labels": {"evoke.io/node-password": "true"}},
            "type": "evoke.io/node-password",
            "immutable": true,
            "data": {"hash": base64::engine::general_purpose::STANDARD.encode(&hash)},
        });
        match store.create(&key, object::to_bytes(&secret)).await {
            Ok(_) => {
                tracing::info!(%node, "recorded the password of a new node");
                return Ok(());
            }
            Err(StoreError::AlreadyExists(_)) => continue,
            Err(e) => return Err(store_err(e)),
        }
    }
    Err(ApiError::conflict("secrets", &name))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /v1-evoke/node-credentials`, with the join secret as bearer:
/// checks the node password and signs the node's client and serving
/// certificates (see [`JoinRequest`]).
pub(crate) async fn join(state: &State, body: &[u8]) -> Reply {
    let result = async {
        let req = JoinRequest::parse(body)?;
        check_node_password(state.store.as_ref(), &req.node, &req.password).await?;
        let issued = issue_node_certificates(state, &req, "join request")?;
        tracing::info!(node = %req.node, addresses = ?req.addresses, "issued node certificates");
        Ok::<_, ApiError>(issued)
    }
    .await;
    match result {
        Ok(v) => respond::json(200, &v),
        Err(e) => {
            tracing::info!(error = %e.message, "join refused");
            respond::error(&e)
        }
    }
}

/// `POST /v1-evoke/node-credentials` by node `node` itself (its current,
/// still valid client certificate authenticated it): signs fresh client
/// and serving certificates, as a kubelet's certificate rotation gets them.
/// The request names the node, which must be the caller; the password is
/// not needed, the certificate proves who it is.
pub(crate) async fn renew(state: &State, node: &str, body: &[u8]) -> Reply {
    let result = (|| {
        let req = JoinRequest::parse_with(body, false)?;
        if req.node != node {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "node {node} may not renew the certificates of node {}",
                    req.node
                ),
            ));
        }
        let issued = issue_node_certificates(state, &req, "renewal request")?;
        tracing::info!(%node, addresses = ?req.addresses, "renewed node certificates");
        Ok::<_, ApiError>(issued)
    })();
    match result {
        Ok(v) => respond::json(200, &v),
        Err(e) => {
            tracing::info!(%node, error = %e.message, "renewal refused");
            respond::error(&e)
        }
    }
}

/// Signs the node's client and serving certificates from `req`'s CSRs and
/// answers them with the cluster CA, for a join and for a renewal alike.
fn issue_node_certificates(
    state: &State,
    req: &JoinRequest,
    what: &str,
) -> Result<serde_json::Value, ApiError> {
    let certs = tls::sign_node_certificates(
        &state.credentials,
        &req.node,
        &req.addresses,
        &req.client_csr,
        &req.serving_csr,
    )
    .map_err(|e| ApiError::bad_request(format!("{what}: {e}")))?;
    Ok(json!({
        "clientCertificate": certs.client_cert_pem,
        "servingCertificate": certs.serving_cert_pem,
        "caCertificate": state.credentials.ca_cert_pem,
    }))
}

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
    for name in [
        "default",
        "kube-system",
        "kube-public",
        NODE_LEASE_NAMESPACE,
    ] {
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn join_as(state: &State, node: &str, password: &str) -> (u16, Value) {
        let (_, client_csr) = tls::key_and_request().expect("csr");
        let (_, serving_csr) = tls::key_and_request().expect("csr");
        let body = json!({"nodeName": node, "nodePassword": password,
            "addresses": ["10.0.0.7"], "clientCsr": client_csr, "servingCsr": serving_csr});
        let reply = join(state, body.to_string().as_bytes()).await;
        let code = reply.status().as_u16();
        let bytes = reply.into_body().collect().await.expect("body").to_bytes();
        (code, serde_json::from_slice(&bytes).expect("json"))
    }

    fn der(pem: &str) -> Vec<u8> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("a certificate")
            .expect("pem")
            .to_vec()
    }

    #[tokio::test]
    async fn a_join_issues_the_node_its_identity_and_an_endpoint_certificate_for_its_addresses() {
        let state = State::for_tests(std::sync::Arc::new(
            evoke_store::memory::MemoryBackend::new(),
        ));
        let (code, answer) = join_as(&state, "n2", "pw-1").await;
        assert_eq!(code, 200, "{answer}");
        let client = tls::subject(&der(answer["clientCertificate"].as_str().expect("client")))
            .expect("subject");
        assert_eq!(
            crate::auth::certificate_identity(&client),
            Some(crate::auth::Identity::Node("n2".into()))
        );
        let serving = der(answer["servingCertificate"].as_str().expect("serving"));
        let (_, cert) = x509_parser::parse_x509_certificate(&serving).expect("x509");
        let sans = format!("{:?}", cert.subject_alternative_name().expect("san"));
        assert!(
            sans.contains(r#"DNSName("n2")"#) && sans.contains("IPAddress([10, 0, 0, 7])"),
            "{sans}"
        );
    }

    #[tokio::test]
    async fn a_second_machine_claiming_a_joined_name_with_another_password_is_refused() {
        let state = State::for_tests(std::sync::Arc::new(
            evoke_store::memory::MemoryBackend::new(),
        ));
        assert_eq!(join_as(&state, "n2", "pw-1").await.0, 200);
        // The same machine again (a restart) is welcome.
        assert_eq!(join_as(&state, "n2", "pw-1").await.0, 200);
        let (code, status) = join_as(&state, "n2", "pw-2").await;
        assert_eq!(code, 403);
        let msg = status["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("node n2 is already registered with a different node password"),
            "{msg}"
        );
        // Another name is another node.
        assert_eq!(join_as(&state, "n3", "pw-2").await.0, 200);
    }

    #[tokio::test]
    async fn malformed_join_requests_are_refused_with_a_reason() {
        let state = State::for_tests(std::sync::Arc::new(
            evoke_store::memory::MemoryBackend::new(),
        ));
        for (body, needle) in [
            ("not json", "join request"),
            (
                r#"{"nodeName": "Bad_Name", "nodePassword": "p", "clientCsr": "x", "servingCsr": "y"}"#,
                "node name",
            ),
            (
                r#"{"nodeName": "n", "clientCsr": "x", "servingCsr": "y"}"#,
                "nodePassword is required",
            ),
            (
                r#"{"nodeName": "n", "nodePassword": "p", "addresses": ["nope"], "clientCsr": "x", "servingCsr": "y"}"#,
                "not an IP address",
            ),
            (
                r#"{"nodeName": "n", "nodePassword": "p", "clientCsr": "x", "servingCsr": "y"}"#,
                "certificate request",
            ),
        ] {
            let reply = join(&state, body.as_bytes()).await;
            assert_eq!(reply.status().as_u16(), 400, "{body}");
            let bytes = reply.into_body().collect().await.expect("body").to_bytes();
            let msg = String::from_utf8_lossy(&bytes);
            assert!(msg.contains(needle), "{body}: {msg}");
        }
    }

    #[tokio::test]
    async fn a_node_renews_only_its_own_certificates_and_needs_no_password_for_it() {
        let mut state = State::for_tests(std::sync::Arc::new(
            evoke_store::memory::MemoryBackend::new(),
        ));
        state.credentials.node_cert_lifetime = std::time::Duration::from_secs(60);
        let (_, client_csr) = tls::key_and_request().expect("csr");
        let (_, serving_csr) = tls::key_and_request().expect("csr");
        let body = |node: &str| {
            json!({"nodeName": node, "addresses": ["10.0.0.7"],
                "clientCsr": client_csr, "servingCsr": serving_csr})
            .to_string()
        };
        let reply = renew(&state, "n2", body("n2").as_bytes()).await;
        assert_eq!(reply.status().as_u16(), 200);
        let bytes = reply.into_body().collect().await.expect("body").to_bytes();
        let answer: Value = serde_json::from_slice(&bytes).expect("json");
        let client = der(answer["clientCertificate"].as_str().expect("client"));
        assert_eq!(
            crate::auth::certificate_identity(&tls::subject(&client).expect("subject")),
            Some(crate::auth::Identity::Node("n2".into()))
        );
        // Valid for the configured minute (backdated by a quarter of it).
        let (_, cert) = x509_parser::parse_x509_certificate(&client).expect("x509");
        let v = cert.validity();
        let life = v.not_after.timestamp() - v.not_before.timestamp();
        assert_eq!(life, 75, "{v:?}");
        assert!((v.not_after.timestamp() - tls::unix_now() - 60).abs() <= 2);
        let reply = renew(&state, "n2", body("n3").as_bytes()).await;
        assert_eq!(reply.status().as_u16(), 403);
    }
}
