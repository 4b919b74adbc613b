//! evoke's Kubernetes API server: REST over HTTPS with the semantics of
//! kube-apiserver, on any [`evoke_store::Backend`].
//!
//! Start reading at [`Server::start`]; then `http.rs` (TLS accept loop and
//! authentication), `route.rs` (URL → resource), `handlers/` (one file per
//! verb family) and `watch.rs`. Which kinds exist comes from
//! [`evoke_types::registry::RESOURCES`]; how objects are decoded, validated,
//! patched and printed comes from `evoke_types` (see `compat.rs`).

// ApiError carries a whole Status (message, details, causes); it is built
// once per failed request, so its size does not matter here.
#![allow(clippy::result_large_err)]

pub mod error;
pub mod kubeconfig;
pub mod tls;

mod auth;
mod bootstrap;
mod compat;
mod discovery;
mod handlers;
mod http;
mod object;
mod respond;
mod route;
mod selector;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use evoke_store::Backend;
use tokio::sync::watch as signal;

pub use auth::node_may_not_set_label;
pub use error::StartError;
pub use tls::Credentials;

/// How to run the API server.
#[derive(Debug, Clone)]
pub struct Config {
    /// evoke's data dir; certificates go to `<data_dir>/server/tls`.
    pub data_dir: PathBuf,
    /// Address to listen on, e.g. `127.0.0.1` or `0.0.0.0`.
    pub bind_address: String,
    /// HTTPS port; 0 picks a free one.
    pub port: u16,
    /// A fixed admin bearer token; None keeps (or makes) the stored one.
    pub token: Option<String>,
    /// A fixed node token (the join secret, `evoke server --token`); None
    /// keeps (or makes) the stored one.
    pub node_token: Option<String>,
    /// Where to write the admin kubeconfig; None is
    /// `<data_dir>/server/cred/admin.kubeconfig`.
    pub kubeconfig_path: Option<PathBuf>,
    /// File mode of the kubeconfig.
    pub kubeconfig_mode: u32,
    /// How often a quiet watch with `allowWatchBookmarks` gets a BOOKMARK.
    pub bookmark_interval: std::time::Duration,
    /// ClusterIPs come from here (`--service-cidr`); the `kubernetes`
    /// Service takes its first address.
    pub service_cidr: ServiceCidr,
    /// How long node certificates are valid (`--cluster-signing-duration`).
    pub node_cert_lifetime: std::time::Duration,
}

/// The Service CIDR: an IPv4 network of at least 16 addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceCidr {
    base: u32,
    prefix: u8,
}

impl ServiceCidr {
    /// `base/prefix`; the host bits of `base` are cleared. A network
    /// smaller than /28 is refused: the first 16 addresses are reserved.
    pub fn new(base: std::net::Ipv4Addr, prefix: u8) -> Option<Self> {
        if prefix > 28 {
            return None;
        }
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        };
        Some(Self {
            base: u32::from(base) & mask,
            prefix,
        })
    }

    pub(crate) fn base(&self) -> u32 {
        self.base
    }

    pub(crate) fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: std::net::Ipv4Addr) -> bool {
        let n = u32::from(ip);
        n >= self.base && u64::from(n - self.base) < self.size()
    }

    /// The `kubernetes` Service's address: the first of the range.
    pub fn first(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::from(self.base + 1)
    }
}

impl Default for ServiceCidr {
    /// 10.43.0.0/16, as k3s.
    fn default() -> Self {
        Self {
            base: u32::from_be_bytes([10, 43, 0, 0]),
            prefix: 16,
        }
    }
}

impl std::fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", std::net::Ipv4Addr::from(self.base), self.prefix)
    }
}

impl Config {
    /// A config for `data_dir` with the defaults of `evoke server`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            bind_address: "127.0.0.1".into(),
            port: 6443,
            token: None,
            node_token: None,
            kubeconfig_path: None,
            kubeconfig_mode: 0o600,
            bookmark_interval: watch::BOOKMARK_EVERY,
            service_cidr: ServiceCidr::default(),
            node_cert_lifetime: tls::NODE_CERT_LIFETIME,
        }
    }
}

/// Shared state of every request.
pub(crate) struct State {
    pub store: Arc<dyn Backend>,
    pub token: String,
    /// The join secret: it only buys a node its certificates.
    pub node_token: String,
    /// The CA (to sign joining nodes' certificates) and the rest.
    pub credentials: Credentials,
    /// How the API server dials node endpoints (logs, exec): TLS verified
    /// against the cluster CA, with its kubelet-client certificate.
    pub kubelet_tls: Arc<rustls::ClientConfig>,
    /// The cluster CA, served without authentication at `/cacerts` (as
    /// k3s does) so agents can pin it against their join token's hash.
    pub ca_pem: String,
    /// `https://host:port`, for discovery's serverAddressByClientCIDRs.
    pub server_address: String,
    pub bookmark_interval: std::time::Duration,
    /// Held from a Service's address allocation until it is stored.
    pub service_lock: tokio::sync::Mutex<()>,
    /// Where ClusterIPs come from.
    pub service_cidr: ServiceCidr,
}

#[cfg(test)]
impl State {
    /// A state over `store` with fresh credentials, for unit tests.
    pub(crate) fn for_tests(store: Arc<dyn Backend>) -> State {
        let dir = tempfile::tempdir().expect("tempdir");
        let creds = tls::load_or_create(dir.path(), &["127.0.0.1".into()], None, None)
            .expect("credentials");
        State {
            store,
            token: creds.token.clone(),
            node_token: creds.node_token.clone(),
            kubelet_tls: Arc::new(tls::kubelet_client_config(&creds).expect("kubelet tls")),
            ca_pem: creds.ca_cert_pem.clone(),
            credentials: creds,
            server_address: "127.0.0.1:6443".into(),
            bookmark_interval: watch::BOOKMARK_EVERY,
            service_lock: tokio::sync::Mutex::new(()),
            service_cidr: ServiceCidr::default(),
        }
    }
}

/// Entry point: see [`Server::start`].
pub struct Server;

/// A started API server. Dropping it does not stop it; call
/// [`RunningServer::shutdown`].
pub struct RunningServer {
    /// The address actually bound (the real port when 0 was asked).
    pub addr: SocketAddr,
    /// Path of the admin kubeconfig written at start.
    pub kubeconfig: PathBuf,
    pub credentials: Credentials,
    stop: signal::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Generates or loads certificates, binds the port, writes the
    /// kubeconfig, creates the default namespaces and starts serving. When
    /// this returns, the server answers requests.
    pub async fn start(
        config: Config,
        store: Arc<dyn Backend>,
    ) -> Result<RunningServer, StartError> {
        let server_dir = config.data_dir.join("server");
        let bind = format!("{}:{}", config.bind_address, config.port);
        let listener = tokio::net::TcpListener::bind(&bind)
            .await
            .map_err(|source| StartError::Listen {
                addr: bind.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: bind.clone(),
            source,
        })?;

        let mut sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        // Agents on other machines dial this machine's address: cover it,
        // or the bound address when it is a specific one.
        let reachable = if addr.ip().is_unspecified() {
            bootstrap::host_ip()
        } else {
            addr.ip().to_string()
        };
        if !sans.contains(&reachable) {
            sans.push(reachable);
        }
        // Pods reach the API through the `kubernetes` Service: its address
        // and names, as kube-apiserver's certificate carries them.
        sans.push(config.service_cidr.first().to_string());
        sans.extend(
            [
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ]
            .map(String::from),
        );
        if let Ok(h) = hostname() {
            if !h.is_empty() && !sans.contains(&h) {
                sans.push(h);
            }
        }
        let mut creds = tls::load_or_create(
            &server_dir.join("tls"),
            &sans,
            config.token.as_deref(),
            config.node_token.as_deref(),
        )?;
        creds.node_cert_lifetime = config.node_cert_lifetime.max(tls::MIN_NODE_CERT_LIFETIME);
        let tls_config = tls::server_config(&creds)?;
        let kubelet_tls = Arc::new(tls::kubelet_client_config(&creds)?);

        // Clients on this machine reach a wildcard bind through loopback.
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            addr.ip().to_string()
        };
        let server_url = format!("https://{host}:{}", addr.port());
        let kubeconfig = config
            .kubeconfig_path
            .clone()
            .unwrap_or_else(|| server_dir.join("cred").join("admin.kubeconfig"));
        kubeconfig::write(&kubeconfig, &server_url, &creds, config.kubeconfig_mode)?;

        bootstrap::ensure_defaults(store.as_ref(), config.service_cidr.first()).await?;
        bootstrap::advertise(store.as_ref(), addr).await?;

        let state = Arc::new(State {
            store,
            token: creds.token.clone(),
            node_token: creds.node_token.clone(),
            credentials: creds.clone(),
            kubelet_tls,
            ca_pem: creds.ca_cert_pem.clone(),
            server_address: format!("{host}:{}", addr.port()),
            service_lock: tokio::sync::Mutex::new(()),
            service_cidr: config.service_cidr,
            bookmark_interval: config.bookmark_interval,
        });
        let (stop, stopped) = signal::channel(false);
        let task = tokio::spawn(http::serve(listener, Arc::new(tls_config), state, stopped));
        tracing::info!(%addr, kubeconfig = %kubeconfig.display(), "api server listening");
        Ok(RunningServer {
            addr,
            kubeconfig,
            credentials: creds,
            stop,
            task,
        })
    }
}

impl RunningServer {
    /// Stops accepting connections and waits for the accept loop to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Waits until the server stops on its own (it normally never does).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

fn hostname() -> std::io::Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string())
}
