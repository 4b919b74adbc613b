//! Certificates, k3s style: a CA made on first start and kept in
//! `<data-dir>/server/tls`, a serving certificate signed by it, an admin
//! client certificate (CN admin, O system:masters), the API server's client
//! certificate for node endpoints (CN [`KUBELET_CLIENT_CN`], as
//! kube-apiserver's `--kubelet-client-certificate`), an admin bearer token
//! and the node token (the join secret: it only admits a node, see
//! `bootstrap.rs`).
//!
//! A joining node gets two certificates signed by the CA
//! ([`sign_node_certificates`]): a client certificate (CN
//! `system:node:NAME`, O `system:nodes`) that is its identity towards the
//! API, and a serving certificate for its endpoint (SANs: its name and
//! addresses), which the API server verifies when it connects for logs and
//! exec.
//!
//! A restart reuses the CA, the client certificates and the tokens, so old
//! kubeconfigs keep working; the serving certificate is re-issued every start
//! because the bind address or hostname may have changed.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::error::StartError;

/// The credentials of one control plane, as PEM text.
#[derive(Clone)]
pub struct Credentials {
    pub ca_cert_pem: String,
    pub serving_cert_pem: String,
    pub serving_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    /// The CA's private key: it signs the certificates of joining nodes.
    pub ca_key_pem: String,
    /// What the API server presents to node endpoints (CN
    /// [`KUBELET_CLIENT_CN`]).
    pub kubelet_client_cert_pem: String,
    pub kubelet_client_key_pem: String,
    /// The admin bearer token clients may use instead of a certificate.
    pub token: String,
    /// The node token, the secret of the join token: a bootstrap secret
    /// that only gets a node its certificates (see `bootstrap.rs`).
    pub node_token: String,
    /// How long the certificates a node gets at join or renewal are valid
    /// (kube-controller-manager's `--cluster-signing-duration`; a year by
    /// default). Agents renew theirs before they run out.
    pub node_cert_lifetime: std::time::Duration,
}

/// The common name of the API server's client certificate for node
/// endpoints. evoke-node's `server.rs` admits only this name (the two
/// constants must agree): a node's own certificate, signed by the same CA,
/// does not open another node's endpoint.
pub const KUBELET_CLIENT_CN: &str = "evoke-apiserver-kubelet-client";
/// A node's client certificate is `system:node:<name>`...
pub const NODE_CN_PREFIX: &str = "system:node:";
/// ...in this group, as the kubelet's is.
pub const NODES_GROUP: &str = "system:nodes";
/// Admins' group.
pub const MASTERS_GROUP: &str = "system:masters";
/// How long a node's certificates are valid unless told otherwise; an
/// agent gets fresh ones each time it starts, and renews them while it runs.
pub const NODE_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
/// The shortest lifetime a node certificate may be given: renewal needs a
/// few seconds of it.
pub const MIN_NODE_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10);

impl std::fmt::Debug for Credentials {
    // Keys and the token are secrets: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |source| StartError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn cert_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> StartError {
    move |e| StartError::Certificate {
        what,
        reason: e.to_string(),
    }
}

/// Writes `data` to `path` with `mode`, replacing it atomically.
pub(crate) fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), StartError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    // The mode given to open() is filtered by the umask; set it exactly.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn read_opt(path: &Path) -> Result<Option<String>, StartError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StartError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

struct Files {
    ca_cert: PathBuf,
    ca_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    kubelet_cert: PathBuf,
    kubelet_key: PathBuf,
    token: PathBuf,
    node_token: PathBuf,
}

impl Files {
    fn new(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("server-ca.crt"),
            ca_key: dir.join("server-ca.key"),
            client_cert: dir.join("client-admin.crt"),
            client_key: dir.join("client-admin.key"),
            kubelet_cert: dir.join("client-kubelet.crt"),
            kubelet_key: dir.join("client-kubelet.key"),
            token: dir.join("token"),
            node_token: dir.join("node-token"),
        }
    }
}

/// Loads the credentials under `dir`, creating what is missing. `sans` are
/// the names and addresses the serving certificate must cover. A `token`
/// or `node_token` given on the command line replaces the stored one.
pub fn load_or_create(
    dir: &Path,
    sans: &[String],
    token: Option<&str>,
    node_token: Option<&str>,
) -> Result<Credentials, StartError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    let files = Files::new(dir);

    let (ca_cert_pem, ca_key) = match (read_opt(&files.ca_cert)?, read_opt(&files.ca_key)?) {
        (Some(cert), Some(key)) => {
            let key = KeyPair::from_pem(&key).map_err(cert_err("stored ca key"))?;
            (cert, key)
        }
        _ => {
            let key = KeyPair::generate().map_err(cert_err("ca key"))?;
            let mut params =
                CertificateParams::new(Vec::<String>::new()).map_err(cert_err("ca"))?;
            params.distinguished_name.push(
                DnType::CommonName,
                format!("evoke-server-ca@{}", now_secs()),
            );
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = params.self_signed(&key).map_err(cert_err("ca"))?;
            write_private(&files.ca_key, key.serialize_pem().as_bytes(), 0o600)?;
            write_private(&files.ca_cert, cert.pem().as_bytes(), 0o644)?;
            tracing::info!(path = %files.ca_cert.display(), "generated cluster ca");
            (cert.pem(), key)
        }
    };
    let issuer =
        Issuer::from_ca_cert_pem(&ca_cert_pem, &ca_key).map_err(cert_err("stored ca cert"))?;

    let (client_cert_pem, client_key_pem) = client_cert(
        &issuer,
        (&files.client_cert, &files.client_key),
        "admin",
        MASTERS_GROUP,
    )?;
    let (kubelet_client_cert_pem, kubelet_client_key_pem) = client_cert(
        &issuer,
        (&files.kubelet_cert, &files.kubelet_key),
        KUBELET_CLIENT_CN,
        MASTERS_GROUP,
    )?;

    let token = secret(&files.token, token)?;
    let node_token = secret(&files.node_token, node_token)?;
    if node_token == token {
        // The join token would then be an admin credential.
        return Err(StartError::Certificate {
            what: "node token",
            reason: "it must differ from the admin token".into(),
        });
    }

    let serving_key = KeyPair::generate().map_err(cert_err("serving key"))?;
    let mut params = CertificateParams::new(sans.to_vec()).map_err(cert_err("serving"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "evoke-apiserver");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let serving = params
        .signed_by(&serving_key, &issuer)
        .map_err(cert_err("serving"))?;

    Ok(Credentials {
        ca_cert_pem,
        serving_cert_pem: serving.pem(),
        serving_key_pem: serving_key.serialize_pem(),
        client_cert_pem,
        client_key_pem,
        ca_key_pem: ca_key.serialize_pem(),
        kubelet_client_cert_pem,
        kubelet_client_key_pem,
        token,
        node_token,
        node_cert_lifetime: NODE_CERT_LIFETIME,
    })
}

/// The client certificate stored at `files` (cert, key), or a new one for
/// `cn` in group `org`, signed by `issuer` and stored.
fn client_cert(
    issuer: &Issuer<'_, &KeyPair>,
    files: (&Path, &Path),
    cn: &str,
    org: &str,
) -> Result<(String, String), StartError> {
    if let (Some(c), Some(k)) = (read_opt(files.0)?, read_opt(files.1)?) {
        return Ok((c, k));
    }
    let key = KeyPair::generate().map_err(cert_err("client key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("client"))?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, org);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, issuer).map_err(cert_err("client"))?;
    write_private(files.1, key.serialize_pem().as_bytes(), 0o600)?;
    write_private(files.0, cert.pem().as_bytes(), 0o644)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The two certificates a joining node gets, as PEM.
#[derive(Debug, Clone)]
pub struct NodeCertificates {
    /// CN `system:node:<name>`, O `system:nodes`: its API identity.
    pub client_cert_pem: String,
    /// For its endpoint: SANs are its name and addresses.
    pub serving_cert_pem: String,
}

/// Valid from now for `lifetime`, backdated a little (at most 5 minutes,
/// as Kubernetes' signer does) because clocks differ.
fn valid_for(params: &mut CertificateParams, lifetime: std::time::Duration) {
    let now = rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(now_secs());
    let backdate = (lifetime / 4).min(std::time::Duration::from_secs(300));
    params.not_before = now - backdate;
    params.not_after = now + lifetime;
}

/// Signs a joining node's two certificate requests. Only the requests'
/// public keys (and their proof of possession) are used: the names come
/// from `node` and `addresses`, which the caller has checked, never from
/// the requests.
pub fn sign_node_certificates(
    creds: &Credentials,
    node: &str,
    addresses: &[String],
    client_csr_pem: &str,
    serving_csr_pem: &str,
) -> Result<NodeCertificates, StartError> {
    let ca_key = KeyPair::from_pem(&creds.ca_key_pem).map_err(cert_err("stored ca key"))?;
    let issuer =
        Issuer::from_ca_cert_pem(&creds.ca_cert_pem, ca_key).map_err(cert_err("stored ca cert"))?;
    let csr = |pem: &str, what: &'static str| {
        rcgen::CertificateSigningRequestParams::from_pem(pem).map_err(cert_err(what))
    };
    let client_req = csr(client_csr_pem, "client certificate request")?;
    let serving_req = csr(serving_csr_pem, "serving certificate request")?;

    let mut client = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("client"))?;
    client
        .distinguished_name
        .push(DnType::CommonName, format!("{NODE_CN_PREFIX}{node}"));
    client
        .distinguished_name
        .push(DnType::OrganizationName, NODES_GROUP);
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    valid_for(&mut client, creds.node_cert_lifetime);
    let client = client
        .signed_by(&client_req.public_key, &issuer)
        .map_err(cert_err("node client"))?;

    let mut sans = vec![node.to_string()];
    sans.extend(addresses.iter().filter(|a| *a != node).cloned());
    let mut serving = CertificateParams::new(sans).map_err(cert_err("node serving"))?;
    serving.distinguished_name.push(DnType::CommonName, node);
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    serving.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    valid_for(&mut serving, creds.node_cert_lifetime);
    let serving = serving
        .signed_by(&serving_req.public_key, &issuer)
        .map_err(cert_err("node serving"))?;
    Ok(NodeCertificates {
        client_cert_pem: client.pem(),
        serving_cert_pem: serving.pem(),
    })
}

/// A key pair and a certificate request for it, as PEM (the request's
/// subject is left empty: the signer names the certificate).
pub fn key_and_request() -> Result<(String, String), StartError> {
    let key = KeyPair::generate().map_err(cert_err("node key"))?;
    let req = CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .map_err(cert_err("certificate request"))?;
    let pem = req.pem().map_err(cert_err("certificate request"))?;
    Ok((key.serialize_pem(), pem))
}

/// A node's full credentials made here, keys included: for tests and
/// tools that stand in for a joining agent. Returns the certificates and
/// the client and serving keys.
pub fn issue_node_credentials(
    creds: &Credentials,
    node: &str,
    addresses: &[String],
) -> Result<(NodeCertificates, String, String), StartError> {
    let (client_key, client_req) = key_and_request()?;
    let (serving_key, serving_req) = key_and_request()?;
    let certs = sign_node_certificates(creds, node, addresses, &client_req, &serving_req)?;
    Ok((certs, client_key, serving_key))
}

/// The subject of a certificate: its common name and organizations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subject {
    pub cn: String,
    pub orgs: Vec<String>,
}

/// When a DER certificate stops being valid, in seconds since the epoch.
pub(crate) fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Seconds since the epoch, now.
pub(crate) fn unix_now() -> i64 {
    i64::try_from(now_secs()).unwrap_or(i64::MAX)
}

/// The subject of a DER certificate (rustls has verified it already).
pub(crate) fn subject(der: &[u8]) -> Option<Subject> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert.subject();
    let cn = name
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())?
        .to_string();
    let orgs = name
        .iter_organization()
        .filter_map(|a| a.as_str().ok().map(String::from))
        .collect();
    Some(Subject { cn, orgs })
}

/// The TLS client the API server dials node endpoints with: it trusts
/// only the cluster CA (a node's serving certificate is verified against
/// the address it is dialled at) and presents the kubelet-client
/// certificate.
pub fn kubelet_client_config(creds: &Credentials) -> Result<rustls::ClientConfig, StartError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = ca_roots(creds)?;
    let chain = parse_certs(&creds.kubelet_client_cert_pem, "kubelet client")?;
    let key = private_key(&creds.kubelet_client_key_pem, "kubelet client key")?;
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err("protocol versions"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err("kubelet client"))
}

fn private_key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, StartError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .ok()
        .flatten()
        .ok_or(StartError::Certificate {
            what,
            reason: "no private key in pem".into(),
        })
}

/// The secret stored at `path`: `given` replaces it; else the stored one;
/// else a new random one, stored.
fn secret(path: &Path, given: Option<&str>) -> Result<String, StartError> {
    match given {
        Some(t) if !t.is_empty() => {
            write_private(path, t.as_bytes(), 0o600)?;
            Ok(t.to_string())
        }
        _ => match read_opt(path)? {
            Some(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
            _ => {
                let t = random_token();
                write_private(path, t.as_bytes(), 0o600)?;
                Ok(t)
            }
        },
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// 32 random bytes as hex: a token nobody guesses.
fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Maps a rustls error to a start error naming what was being set up.
fn tls_err(what: &'static str) -> impl Fn(rustls::Error) -> StartError {
    move |e| StartError::Certificate {
        what,
        reason: e.to_string(),
    }
}

/// A root store holding only the cluster CA.
fn ca_roots(creds: &Credentials) -> Result<rustls::RootCertStore, StartError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in parse_certs(&creds.ca_cert_pem, "ca")? {
        roots.add(c).map_err(tls_err("ca"))?;
    }
    Ok(roots)
}

fn parse_certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, StartError> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StartError::Certificate {
            what,
            reason: e.to_string(),
        })
}

/// The rustls configuration: our serving certificate, and client
/// certificates verified against our CA but optional, so that bearer
/// tokens work on the same port.
pub fn server_config(creds: &Credentials) -> Result<rustls::ServerConfig, StartError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = ca_roots(creds)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| StartError::Certificate {
            what: "client verifier",
            reason: e.to_string(),
        })?;
    // The CA travels with the chain, so a joining agent can check it
    // against the hash in its token before it sends any secret.
    let mut chain = parse_certs(&creds.serving_cert_pem, "serving")?;
    chain.extend(parse_certs(&creds.ca_cert_pem, "ca")?);
    let key = private_key(&creds.serving_key_pem, "serving key")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err("protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(tls_err("serving"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_load_reuses_ca_client_cert_and_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let a = load_or_create(dir.path(), &sans, None, None).expect("first");
        let b = load_or_create(dir.path(), &sans, None, None).expect("second");
        assert_eq!(a.ca_cert_pem, b.ca_cert_pem);
        assert_eq!(a.client_cert_pem, b.client_cert_pem);
        assert_eq!(a.token, b.token);
        assert_eq!(a.token.len(), 64);
        assert_eq!(a.node_token, b.node_token);
        assert_eq!(a.node_token.len(), 64);
        assert_ne!(
            a.node_token, a.token,
            "the join secret is not the admin token"
        );
        let mode = fs::metadata(dir.path().join("server-ca.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        server_config(&b).expect("rustls accepts the generated certificates");
    }

    #[test]
    fn token_from_the_command_line_replaces_the_stored_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sans = vec!["127.0.0.1".to_string()];
        load_or_create(dir.path(), &sans, None, None).expect("first");
        let b = load_or_create(dir.path(), &sans, Some("s3cret"), Some("n0de")).expect("second");
        assert_eq!(b.token, "s3cret");
        assert_eq!(b.node_token, "n0de");
        let c = load_or_create(dir.path(), &sans, None, None).expect("third");
        assert_eq!(c.token, "s3cret");
        assert_eq!(c.node_token, "n0de");
        assert!(load_or_create(dir.path(), &sans, None, Some("s3cret")).is_err());
    }
}
