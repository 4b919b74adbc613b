//! Certificates, k3s style: a CA made on first start and kept in
//! `<data-dir>/server/tls`, a serving certificate signed by it, an admin
//! client certificate (CN admin, O system:masters), an admin bearer token
//! and the node token (the secret of the join token, which authenticates
//! nodes with a node's rights only; see `auth.rs`).
//! A restart reuses the CA, the client certificate and the tokens, so old
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
    /// The admin bearer token clients may use instead of a certificate.
    pub token: String,
    /// The node token: joined agents authenticate with it (it is the
    /// secret of the join token), and the API server presents it to the
    /// nodes' endpoints. It grants a node's rights, not an admin's.
    pub node_token: String,
}

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

    let (client_cert_pem, client_key_pem) =
        match (read_opt(&files.client_cert)?, read_opt(&files.client_key)?) {
            (Some(c), Some(k)) => (c, k),
            _ => {
                let key = KeyPair::generate().map_err(cert_err("client key"))?;
                let mut params =
                    CertificateParams::new(Vec::<String>::new()).map_err(cert_err("client"))?;
                params.distinguished_name.push(DnType::CommonName, "admin");
                params
                    .distinguished_name
                    .push(DnType::OrganizationName, "system:masters");
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                let cert = params
                    .signed_by(&key, &issuer)
                    .map_err(cert_err("client"))?;
                write_private(&files.client_key, key.serialize_pem().as_bytes(), 0o600)?;
                write_private(&files.client_cert, cert.pem().as_bytes(), 0o644)?;
                (cert.pem(), key.serialize_pem())
            }
        };

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
        token,
        node_token,
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
    let tls_err = |what: &'static str| {
        move |e: rustls::Error| StartError::Certificate {
            what,
            reason: e.to_string(),
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in parse_certs(&creds.ca_cert_pem, "ca")? {
        roots.add(c).map_err(tls_err("ca"))?;
    }
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
    let key = rustls_pemfile::private_key(&mut creds.serving_key_pem.as_bytes())
        .ok()
        .flatten()
        .ok_or(StartError::Certificate {
            what: "serving key",
            reason: "no private key in pem".into(),
        })?;
    let key: PrivateKeyDer<'static> = key;
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
