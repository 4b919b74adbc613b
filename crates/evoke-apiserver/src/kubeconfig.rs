//! The admin kubeconfig: the server URL, our CA, and the admin client
//! certificate, as k3s writes it. The bearer token is kept out of it: the
//! certificate is enough, and the token file stays the one place it lives.

use std::path::Path;

use base64::Engine;

use crate::error::StartError;
use crate::tls::{write_private, Credentials};

/// The kubeconfig text for `server_url`.
pub fn render(server_url: &str, creds: &Credentials) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "default",
            "cluster": {
                "server": server_url,
                "certificate-authority-data": b64(&creds.ca_cert_pem),
            },
        }],
        "users": [{
            "name": "default",
            "user": {
                "client-certificate-data": b64(&creds.client_cert_pem),
                "client-key-data": b64(&creds.client_key_pem),
            },
        }],
        "contexts": [{
            "name": "default",
            "context": {"cluster": "default", "user": "default"},
        }],
        "current-context": "default",
        "preferences": {},
    });
    // serde_yaml cannot fail on a tree of plain JSON values.
    serde_yaml::to_string(&doc).unwrap_or_else(|_| doc.to_string())
}

/// Writes the kubeconfig to `path` with `mode`, creating parent dirs.
pub fn write(
    path: &Path,
    server_url: &str,
    creds: &Credentials,
    mode: u32,
) -> Result<(), StartError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| StartError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    write_private(path, render(server_url, creds).as_bytes(), mode)
}
