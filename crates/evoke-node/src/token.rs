//! Join tokens, k3s style: `K10<sha256 of the server CA (DER), hex>::<user>:<secret>`.
//!
//! Before an agent sends its secret anywhere, it fetches the server's CA
//! certificate over an unverified TLS connection (from the handshake's
//! certificate chain, else from `GET /cacerts`), hashes it and compares it
//! with the hash in the token. Only a server holding that exact CA passes;
//! the agent then trusts only that CA.
//!
//! The secret is a bootstrap credential only ([`join`]): with it, and with
//! its node password (its identity, kept in `<data-dir>/agent`), the agent
//! asks for two certificates on fresh keys: a client certificate that is
//! its identity towards the API (`system:node:NAME`), and a serving
//! certificate for its endpoint. A name already joined with another
//! password is refused.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::NodeError;

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Hex sha256 of the CA certificate's DER bytes.
    pub ca_hash: String,
    pub user: String,
    pub secret: String,
}

impl std::fmt::Debug for JoinToken {
    // The secret never goes to a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_hash", &self.ca_hash)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl JoinToken {
    /// Parses `K10<hash>::<user>:<secret>`.
    pub fn parse(s: &str) -> Result<JoinToken, NodeError> {
        let bad = |why: &str| {
            NodeError::Token(format!("{why}; expected K10<ca sha256>::<user>:<secret>"))
        };
        let rest = s
            .trim()
            .strip_prefix("K10")
            .ok_or_else(|| bad("missing K10 prefix"))?;
        let (hash, creds) = rest.split_once("::").ok_or_else(|| bad("missing '::'"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("the CA hash is not 64 hex digits"));
        }
        let (user, secret) = creds
            .split_once(':')
            .ok_or_else(|| bad("missing ':' between user and secret"))?;
        if user.is_empty() || secret.is_empty() {
            return Err(bad("empty user or secret"));
        }
        Ok(JoinToken {
            ca_hash: hash.to_ascii_lowercase(),
            user: user.into(),
            secret: secret.into(),
        })
    }

    /// The join token for a server whose CA is `ca_pem` and node token
    /// `secret` (a node's credential, not an admin's).
    pub fn for_server(ca_pem: &str, secret: &str) -> Result<JoinToken, NodeError> {
        Ok(JoinToken {
            ca_hash: ca_hash_pem(ca_pem)?,
            user: "server".into(),
            secret: secret.into(),
        })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "K10{}::{}:{}", self.ca_hash, self.user, self.secret)
    }
}

/// Hex sha256 of DER bytes.
pub fn ca_hash_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Hex sha256 of the first certificate in a PEM text.
pub fn ca_hash_pem(pem: &str) -> Result<String, NodeError> {
    let der = first_cert(pem)?;
    Ok(ca_hash_der(&der))
}

fn first_cert(pem: &str) -> Result<Vec<u8>, NodeError> {
    let mut r = pem.as_bytes();
    let first = rustls_pemfile::certs(&mut r).next();
    match first {
        Some(Ok(c)) => Ok(c.as_ref().to_vec()),
        _ => Err(NodeError::Token("no certificate in the PEM text".into())),
    }
}

/// Accepts any certificate and remembers the chain. Used only to fetch the
/// CA, before any secret is sent.
#[derive(Debug)]
struct Recording {
    chain: Mutex<Vec<Vec<u8>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = vec![end_entity.as_ref().to_vec()];
        chain.extend(intermediates.iter().map(|c| c.as_ref().to_vec()));
        *self.chain.lock().unwrap_or_else(|e| e.into_inner()) = chain;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Splits `https://host:port[/...]` into host and port.
pub fn host_port(server: &str) -> Result<(String, u16), NodeError> {
    let rest = server
        .strip_prefix("https://")
        .ok_or_else(|| NodeError::Token(format!("server {server:?} must be an https:// URL")))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || p.parse::<u16>().is_ok() => (
            h.to_string(),
            p.parse()
                .map_err(|_| NodeError::Token(format!("bad port in {server:?}")))?,
        ),
        _ => (authority.to_string(), 443),
    };
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    ))
}

/// Fetches the server's CA certificate and checks it against the token.
/// Returns the CA as DER. No secret leaves this machine here.
pub async fn fetch_verified_ca(server: &str, token: &JoinToken) -> Result<Vec<u8>, NodeError> {
    let (host, port) = host_port(server)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Recording {
        chain: Mutex::new(Vec::new()),
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| NodeError::Token(format!("tls setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let io_err = |source| NodeError::Io {
        path: format!("{host}:{port}").into(),
        source,
    };
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(io_err)?;
    let name = ServerName::try_from(host.clone())
        .map_err(|e| NodeError::Token(format!("server name {host:?}: {e}")))?;
    let mut tls = connector.connect(name, tcp).await.map_err(io_err)?;
    let chain = verifier
        .chain
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    // The CA may come with the chain...
    if let Some(ca) = chain
        .iter()
        .skip(1)
        .find(|c| ca_hash_der(c) == token.ca_hash)
    {
        return Ok(ca.clone());
    }
    // ...or from /cacerts, which needs no credentials.
    let req = format!("GET /cacerts HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.map_err(io_err)?;
    let mut body = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tls.read_to_end(&mut body),
    )
    .await;
    let text = String::from_utf8_lossy(&body);
    let pem = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let mut r = pem.as_bytes();
    for c in rustls_pemfile::certs(&mut r).flatten() {
        if ca_hash_der(c.as_ref()) == token.ca_hash {
            return Ok(c.as_ref().to_vec());
        }
    }
    Err(NodeError::Token(format!(
        "server {server} did not present a CA matching the token's hash {}; refusing to send credentials",
        token.ca_hash
    )))
}

/// A kube client for `server` that trusts only `ca_pem` and authenticates
/// as `user` (a kubeconfig `user` entry: a token, or client certificate
/// data).
async fn client_as(
    server: &str,
    ca_pem: &str,
    user: serde_json::Value,
) -> Result<kube::Client, NodeError> {
    let cfg = kube_config(server, ca_pem, user).await?;
    kube::Client::try_from(cfg).map_err(|e| NodeError::Api {
        what: format!("connecting to {server}"),
        source: e,
    })
}

/// A bootstrap client for `server`: it trusts only the CA the token pins
/// (fetched and checked first) and authenticates with the token's secret,
/// which the server accepts for [`join`] only. Returns it and the CA as
/// PEM.
pub async fn client(server: &str, token: &JoinToken) -> Result<(kube::Client, String), NodeError> {
    use base64::Engine;
    let ca = fetch_verified_ca(server, token).await?;
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::engine::general_purpose::STANDARD.encode(&ca)
    );
    let client = client_as(server, &pem, serde_json::json!({"token": token.secret})).await?;
    Ok((client, pem))
}

/// [`client`], waiting up to `within` for a server that is not up yet (an
/// agent may start before its server): a refused or dropped connection is
/// retried every second; a CA that does not match, or any other error,
/// ends the wait at once.
pub async fn client_when_up(
    server: &str,
    token: &JoinToken,
    within: std::time::Duration,
) -> Result<(kube::Client, String), NodeError> {
    let deadline = tokio::time::Instant::now() + within;
    let mut logged = false;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let attempt = tokio::time::timeout(left, client(server, token)).await;
        match attempt {
            Ok(Err(NodeError::Io { path, source })) => {
                if tokio::time::Instant::now() + std::time::Duration::from_secs(1) >= deadline {
                    return Err(NodeError::Io { path, source });
                }
                if !logged {
                    tracing::info!(%server, error = %source, "waiting for the server");
                    logged = true;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Ok(other) => return other,
            Err(_) => {
                return Err(NodeError::Token(format!(
                    "server {server} did not answer within {}s",
                    within.as_secs()
                )))
            }
        }
    }
}

/// Where the server trades the join secret for a node's certificates
/// (evoke-apiserver's `auth::JOIN_PATH`).
pub const JOIN_PATH: &str = "/v1-evoke/node-credentials";

/// What joining gives a node: a client that authenticates as the node
/// (CN `system:node:NAME`), its endpoint's serving certificate, and what
/// renews both while the agent runs.
pub struct NodeCredentials {
    pub client: kube::Client,
    pub endpoint: crate::server::EndpointTls,
    /// Spawn [`Renewal::run`] to renew the certificates before they expire.
    pub renewal: Renewal,
}

/// This node's password, its identity when it joins: read from
/// `<data_dir>/agent/node-password`, made (random, mode 0600) on first
/// use. Another machine joining with this node's name but not this
/// password is refused.
pub fn node_password(data_dir: &std::path::Path) -> Result<String, NodeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = data_dir.join("agent");
    let path = dir.join("node-password");
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| NodeError::Io { path, source }
    };
    match std::fs::read_to_string(&path) {
        Ok(p) if !p.trim().is_empty() => return Ok(p.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&path)(e)),
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let password = hex::encode(rand::random::<[u8; 32]>());
    let tmp = dir.join("node-password.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    std::io::Write::write_all(&mut f, password.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(password)
}

/// A fresh key and a certificate request for it, as PEM.
fn key_and_request() -> Result<(String, String), NodeError> {
    let bad = |e: rcgen::Error| NodeError::Tls(format!("certificate request: {e}"));
    let key = rcgen::KeyPair::generate().map_err(bad)?;
    let req = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .map_err(bad)?;
    Ok((key.serialize_pem(), req.pem().map_err(bad)?))
}

/// Certificates the server issued, with the keys made here.
struct Issued {
    client_cert: String,
    client_key: String,
    serving_cert: String,
    serving_key: String,
}

/// Asks `server` (through `api`) for a node's two certificates on fresh
/// keys. With `password` it is a join (`api` carries the join secret);
/// without, a renewal (`api` authenticates with the node's current
/// certificate, which is proof enough).
async fn request_certificates(
    api: &kube::Client,
    server: &str,
    node: &str,
    addresses: &[std::net::IpAddr],
    password: Option<&str>,
    timeout: std::time::Duration,
) -> Result<Issued, NodeError> {
    let fail = |reason: String| NodeError::Join {
        server: server.to_string(),
        reason,
    };
    let (client_key, client_req) = key_and_request()?;
    let (serving_key, serving_req) = key_and_request()?;
    let mut body = serde_json::json!({
        "nodeName": node,
        "addresses": addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "clientCsr": client_req,
        "servingCsr": serving_req,
    });
    if let Some(p) = password {
        body["nodePassword"] = p.into();
    }
    let req = http::Request::post(JOIN_PATH)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body.to_string().into_bytes())
        .map_err(|e| fail(format!("join request: {e}")))?;
    let answer: serde_json::Value = match tokio::time::timeout(timeout, api.request(req)).await {
        Ok(Ok(v)) => v,
        Ok(Err(kube::Error::Api(e))) if e.code == 401 && password.is_some() => {
            return Err(fail(format!(
                "the server refused the token's secret ({} {}); check --token",
                e.code, e.reason
            )))
        }
        Ok(Err(kube::Error::Api(e))) => {
            return Err(fail(format!(
                "the server refused node {node}: {}",
                e.message
            )))
        }
        Ok(Err(e)) => return Err(fail(e.to_string())),
        Err(_) => {
            return Err(fail(format!(
                "the server did not answer within {}s",
                timeout.as_secs()
            )))
        }
    };
    let pem = |field: &str| {
        answer[field]
            .as_str()
            .map(String::from)
            .ok_or_else(|| fail(format!("the answer has no {field}")))
    };
    Ok(Issued {
        client_cert: pem("clientCertificate")?,
        client_key,
        serving_cert: pem("servingCertificate")?,
        serving_key,
    })
}

/// The kube config of a client for `server` that trusts only `ca_pem` and
/// authenticates as `user` (a kubeconfig `user` entry).
async fn kube_config(
    server: &str,
    ca_pem: &str,
    user: serde_json::Value,
) -> Result<kube::Config, NodeError> {
    use base64::Engine;
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "evoke",
        "clusters": [{"name": "evoke", "cluster": {"server": server,
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(ca_pem)}}],
        "users": [{"name": "agent", "user": user}],
        "contexts": [{"name": "evoke", "context": {"cluster": "evoke", "user": "agent"}}],
    });
    let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig.to_string())
        .map_err(|e| NodeError::Token(format!("kubeconfig: {e}")))?;
    kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| NodeError::Token(format!("kubeconfig: {e}")))
}

/// The kube config of a node's client certificate and key.
async fn cert_config(
    server: &str,
    ca_pem: &str,
    cert: &str,
    key: &str,
) -> Result<kube::Config, NodeError> {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    kube_config(
        server,
        ca_pem,
        serde_json::json!({"client-certificate-data": b64(cert), "client-key-data": b64(key)}),
    )
    .await
}

/// A pool of HTTPS connections that present one client certificate.
type Connections = tower::util::BoxCloneService<
    http::Request<kube::client::Body>,
    http::Response<hyper::body::Incoming>,
    hyper_util::client::legacy::Error,
>;

/// The connections of `cfg` (its CA and client certificate).
fn connections(cfg: &kube::Config) -> Result<Connections, NodeError> {
    use kube::client::ConfigExt;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(std::time::Duration::from_secs(30)));
    let https = cfg
        .rustls_https_connector_with_connector(http)
        .map_err(|e| NodeError::Tls(format!("node client: {e}")))?;
    let client: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    Ok(tower::util::BoxCloneService::new(client))
}

/// The connections a node's client sends its requests through. A renewal
/// swaps in a new pool presenting the new certificate; requests under way
/// (a watch) finish on the old one, whose connections close when the last
/// of them ends, as the kubelet drops its connections when it rotates its
/// certificate (the API server checks a certificate's validity on every
/// request, so a kept-alive connection with the old one would fail once it
/// expires).
#[derive(Clone)]
struct Swappable(Arc<Mutex<Connections>>);

impl tower::Service<http::Request<kube::client::Body>> for Swappable {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // A hyper client is always ready; readiness is checked per call.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        use tower::ServiceExt;
        let pool = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Box::pin(pool.oneshot(req))
    }
}

/// A kube client for `cfg`'s server whose connections come from `pool`.
fn swappable_client(cfg: &kube::Config, pool: Swappable) -> kube::Client {
    use kube::client::ConfigExt;
    let service = tower::ServiceBuilder::new()
        .layer(cfg.base_uri_layer())
        .service(pool);
    kube::Client::new(service, cfg.default_namespace.clone())
}

/// Joins as `node`: sends the node password, the `addresses` the serving
/// certificate must cover and two certificate requests on fresh keys, with
/// the bootstrap client (the join secret), and returns the node's own
/// client and endpoint certificate. A refused secret or password, or a
/// server that does not answer within `timeout`, is a one-line error.
pub async fn join(
    bootstrap: &kube::Client,
    server: &str,
    ca_pem: &str,
    node: &str,
    addresses: &[std::net::IpAddr],
    password: &str,
    timeout: std::time::Duration,
) -> Result<NodeCredentials, NodeError> {
    let issued =
        request_certificates(bootstrap, server, node, addresses, Some(password), timeout).await?;
    let cfg = cert_config(server, ca_pem, &issued.client_cert, &issued.client_key).await?;
    let pool = Swappable(Arc::new(Mutex::new(connections(&cfg)?)));
    let client = swappable_client(&cfg, pool.clone());
    let endpoint =
        crate::server::EndpointTls::new(ca_pem, &issued.serving_cert, &issued.serving_key)?;
    tracing::info!(%server, %node, "joined with a node certificate");
    Ok(NodeCredentials {
        client: client.clone(),
        endpoint: endpoint.clone(),
        renewal: Renewal {
            server: server.to_string(),
            ca_pem: ca_pem.to_string(),
            node: node.to_string(),
            addresses: addresses.to_vec(),
            client,
            bootstrap: bootstrap.clone(),
            password: password.to_string(),
            pool,
            endpoint,
            client_cert: issued.client_cert,
        },
    })
}

/// Renews a node's client and serving certificates before they expire, as
/// the kubelet rotates its certificates: at a random point between 70% and
/// 90% of their life, asking with the current client certificate. A failed
/// attempt is retried (every tenth of the time left, between 1 s and 30 s).
/// If the certificate ran out all the same (the server was away), the node
/// joins again with its join secret and node password.
pub struct Renewal {
    server: String,
    ca_pem: String,
    node: String,
    addresses: Vec<std::net::IpAddr>,
    /// The node's client, through `pool`.
    client: kube::Client,
    /// The join secret's client, for when the certificate has expired.
    bootstrap: kube::Client,
    password: String,
    pool: Swappable,
    endpoint: crate::server::EndpointTls,
    /// The client certificate in use, PEM.
    client_cert: String,
}

/// How long a renewal request may take.
const RENEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// `(not before, not after)` of the first certificate in a PEM text, in
/// seconds since the epoch.
fn validity(pem: &str) -> Result<(i64, i64), NodeError> {
    let der = first_cert(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| NodeError::Tls(format!("node certificate: {e}")))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// When to renew a certificate valid from `not_before` to `not_after`:
/// at `fraction` of its life (seconds since the epoch).
fn renew_at(not_before: i64, not_after: i64, fraction: f64) -> f64 {
    not_before as f64 + (not_after - not_before) as f64 * fraction
}

impl Renewal {
    /// Renews for as long as the agent runs.
    pub async fn run(mut self) {
        loop {
            let (not_before, not_after) = match validity(&self.client_cert) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(node = %self.node, error = %e, "cannot read the node certificate; not renewing it");
                    return;
                }
            };
            let at = renew_at(not_before, not_after, 0.7 + 0.2 * rand::random::<f64>());
            // In steps, so a clock that jumps (a suspended machine) is noticed.
            loop {
                let left = at - unix_now();
                if left <= 0.0 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_secs_f64(left.min(600.0))).await;
            }
            loop {
                match self.renew_once(not_after).await {
                    Ok(()) => break,
                    Err(e) => {
                        let left = not_after as f64 - unix_now();
                        let wait = (left / 10.0).clamp(1.0, 30.0);
                        tracing::warn!(node = %self.node, error = %e, retry_in_s = wait, "node certificate renewal failed");
                        tokio::time::sleep(std::time::Duration::from_secs_f64(wait)).await;
                    }
                }
            }
        }
    }

    /// One renewal: new certificates from the server, the serving one in
    /// place for new endpoint connections, the client one for new API
    /// connections.
    async fn renew_once(&mut self, not_after: i64) -> Result<(), NodeError> {
        let expired = unix_now() >= not_after as f64;
        let (api, password) = if expired {
            tracing::warn!(node = %self.node, "the node certificate expired before it was renewed; joining again");
            (&self.bootstrap, Some(self.password.as_str()))
        } else {
            (&self.client, None)
        };
        let issued = request_certificates(
            api,
            &self.server,
            &self.node,
            &self.addresses,
            password,
            RENEW_TIMEOUT,
        )
        .await?;
        self.endpoint
            .replace(&issued.serving_cert, &issued.serving_key)?;
        let cfg = cert_config(
            &self.server,
            &self.ca_pem,
            &issued.client_cert,
            &issued.client_key,
        )
        .await?;
        let pool = connections(&cfg)?;
        *self.pool.0.lock().unwrap_or_else(|e| e.into_inner()) = pool;
        let (_, until) = validity(&issued.client_cert)?;
        self.client_cert = issued.client_cert;
        tracing::info!(node = %self.node, valid_until = until, "renewed node certificates");
        Ok(())
    }
}

/// Keeps `labels` on Node `name` with an admin's `client`: whenever the
/// Node exists without them (its first registration, or again after it was
/// deleted), they are added. For labels a node may not set on itself
/// (NodeRestriction), such as the control plane's role labels, which k3s's
/// server also sets rather than its agent.
pub async fn keep_node_labels(
    client: kube::Client,
    name: String,
    labels: std::collections::BTreeMap<String, String>,
) {
    use futures::TryStreamExt;
    use kube::runtime::{watcher, WatchStreamExt};
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher::watcher(nodes.clone(), cfg)
        .default_backoff()
        .applied_objects());
    loop {
        let node = match events.try_next().await {
            Ok(Some(n)) => n,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(node = %name, error = %e, "watching a node to label it");
                continue;
            }
        };
        let have = node.metadata.labels.unwrap_or_default();
        if labels.iter().all(|(k, v)| have.get(k) == Some(v)) {
            continue;
        }
        let patch = serde_json::json!({"metadata": {"labels": labels}});
        let params = kube::api::PatchParams::default();
        if let Err(e) = nodes
            .patch(&name, &params, &kube::api::Patch::Merge(&patch))
            .await
        {
            tracing::warn!(node = %name, error = %e, "could not label the node");
        }
    }
}

/// The local address this machine uses to reach `server`: the address a
/// joining node reports as its InternalIP unless told otherwise, so the
/// API server (and other nodes) reach it the way it reached them. A UDP
/// connect picks the route without sending anything.
pub fn source_address_to(server: &str) -> Result<std::net::IpAddr, NodeError> {
    use std::net::ToSocketAddrs;
    let (host, port) = host_port(server)?;
    let io_err = |source| NodeError::Io {
        path: format!("{host}:{port}").into(),
        source,
    };
    let target = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(io_err)?
        .next()
        .ok_or_else(|| NodeError::Token(format!("server host {host:?} has no address")))?;
    let any: std::net::SocketAddr = if target.is_ipv6() {
        "[::]:0".parse()
    } else {
        "0.0.0.0:0".parse()
    }
    .map_err(|e| NodeError::Token(format!("unspecified address: {e}")))?;
    let sock = std::net::UdpSocket::bind(any).map_err(io_err)?;
    sock.connect(target).map_err(io_err)?;
    Ok(sock.local_addr().map_err(io_err)?.ip())
}

/// A kube client from a kubeconfig file (the in-process agent and the
/// control-plane components use the admin kubeconfig the server wrote).
pub async fn client_from_kubeconfig(path: &std::path::Path) -> Result<kube::Client, NodeError> {
    let kc = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| NodeError::Token(format!("kubeconfig {}: {e}", path.display())))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| NodeError::Token(format!("kubeconfig {}: {e}", path.display())))?;
    kube::Client::try_from(cfg).map_err(|e| NodeError::Api {
        what: format!("client from {}", path.display()),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_hides_its_secret_in_debug() {
        let t = JoinToken {
            ca_hash: "a".repeat(64),
            user: "server".into(),
            secret: "s3cret".into(),
        };
        let s = t.to_string();
        assert!(s.starts_with("K10aaaa"));
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn malformed_tokens_are_rejected_with_a_reason() {
        for bad in [
            "",
            "abc",
            "K10abc::server:x",
            &format!("K10{}server:x", "a".repeat(64)),
            &format!("K10{}::server:", "a".repeat(64)),
        ] {
            let e = JoinToken::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected K10"), "{bad}: {e}");
        }
    }

    #[test]
    fn server_urls_split_into_host_and_port() {
        assert_eq!(
            host_port("https://127.0.0.1:6443").unwrap(),
            ("127.0.0.1".into(), 6443)
        );
        assert_eq!(
            host_port("https://example.com").unwrap(),
            ("example.com".into(), 443)
        );
        assert!(host_port("http://x:1").is_err());
    }

    #[test]
    fn a_node_reaching_its_server_over_loopback_reports_a_loopback_address() {
        assert_eq!(
            source_address_to("https://127.0.0.1:6443").unwrap(),
            std::net::IpAddr::from([127, 0, 0, 1])
        );
        assert!(source_address_to("ftp://127.0.0.1").is_err());
    }

    #[tokio::test]
    async fn agent_refuses_a_server_whose_ca_does_not_match_the_token() {
        // A TLS server with a self-signed certificate that is not the CA in the token.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(der.clone())],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let pem = cert.pem();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let pem = pem.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(s).await {
                        let mut buf = [0u8; 1024];
                        let _ = tls.read(&mut buf).await;
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{pem}",
                            pem.len()
                        );
                        let _ = tls.write_all(resp.as_bytes()).await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        let server = format!("https://127.0.0.1:{port}");
        let wrong = JoinToken {
            ca_hash: "0".repeat(64),
            user: "server".into(),
            secret: "x".into(),
        };
        let err = fetch_verified_ca(&server, &wrong)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("refusing to send credentials"), "{err}");
        // The right hash (served via /cacerts) is accepted.
        let right = JoinToken {
            ca_hash: ca_hash_der(&der),
            user: "server".into(),
            secret: "x".into(),
        };
        assert_eq!(fetch_verified_ca(&server, &right).await.unwrap(), der);
    }
}
