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
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| NodeError::Token(format!("kubeconfig: {e}")))?;
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
/// (CN `system:node:NAME`), and its endpoint's serving certificate.
pub struct NodeCredentials {
    pub client: kube::Client,
    pub endpoint: crate::server::EndpointTls,
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
    use base64::Engine;
    let fail = |reason: String| NodeError::Join {
        server: server.to_string(),
        reason,
    };
    let (client_key, client_req) = key_and_request()?;
    let (serving_key, serving_req) = key_and_request()?;
    let body = serde_json::json!({
        "nodeName": node,
        "nodePassword": password,
        "addresses": addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "clientCsr": client_req,
        "servingCsr": serving_req,
    });
    let req = http::Request::post(JOIN_PATH)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body.to_string().into_bytes())
        .map_err(|e| fail(format!("join request: {e}")))?;
    let answer: serde_json::Value =
        match tokio::time::timeout(timeout, bootstrap.request(req)).await {
            Ok(Ok(v)) => v,
            Ok(Err(kube::Error::Api(e))) if e.code == 401 => {
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
    let (client_cert, serving_cert) = (pem("clientCertificate")?, pem("servingCertificate")?);
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let client = client_as(
        server,
        ca_pem,
        serde_json::json!({
            "client-certificate-data": b64(&client_cert),
            "client-key-data": b64(&client_key),
        }),
    )
    .await?;
    tracing::info!(%server, %node, "joined with a node certificate");
    Ok(NodeCredentials {
        client,
        endpoint: crate::server::EndpointTls {
            ca_pem: ca_pem.to_string(),
            cert_pem: serving_cert,
            key_pem: serving_key,
        },
    })
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
