//! The node's HTTPS endpoint, the kubelet's API for the API server:
//! - `GET /containerLogs/{namespace}/{pod}/{container}` with the query
//!   parameters kubectl's `logs` passes through (`follow`, `previous`,
//!   `tailLines`, `limitBytes`, `timestamps`, `sinceSeconds`, `sinceTime`;
//!   when lines were written comes from [`crate::logtimes`]);
//! - `GET /exec/{namespace}/{pod}/{container}?command=...`, a WebSocket
//!   remote-command session ([`crate::stream`]);
//! - `GET /attach/{namespace}/{pod}/{container}`, the main process's
//!   output from now on, in the same protocol (and, with `stdin=true`, its
//!   kept-open stdin);
//! - `GET /portForward/{namespace}/{pod}?ports=...`, SPDY tunnelled in a
//!   WebSocket to the pod's loopback ([`crate::portforward`]).
//!
//! The API server proxies `pods/log` and `pods/exec` here, at the node's
//! InternalIP and `status.daemonEndpoints.kubeletEndpoint.port`. TLS only
//! ([`EndpointTls`]): the node presents the serving certificate the cluster
//! CA issued it at join, and the caller must present a client certificate
//! from the same CA whose common name is [`APISERVER_CLIENT_CN`], which
//! only the API server holds. Other nodes' certificates (same CA) are
//! answered 403; certificates from elsewhere, expired ones or none at all
//! do not get through the handshake.
//!
//! Logs live at `<data_dir>/pods/<uid>/logs/<container>/<attempt>.log`;
//! the current attempt is the highest number, `previous` the one before.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path as UrlPath, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use evoke_runtime::{WorkloadRuntime, WorkloadState};
use futures::StreamExt;

use crate::spec::{LABEL_ATTEMPT, LABEL_CONTAINER, LABEL_POD_UID};
use crate::stream::{self, ExecRequest};

/// namespace/name -> uid of the pods this node runs.
pub type PodIndex = Arc<RwLock<HashMap<String, String>>>;

/// The tiers by name, to find and exec into a pod's workloads.
pub type Tiers = HashMap<String, Arc<dyn WorkloadRuntime>>;

#[derive(Clone)]
struct App {
    data_dir: PathBuf,
    pods: PodIndex,
    tiers: Arc<Tiers>,
}

/// The common name of the API server's client certificate for node
/// endpoints (evoke-apiserver's `tls::KUBELET_CLIENT_CN`; the two must
/// agree).
pub const APISERVER_CLIENT_CN: &str = "evoke-apiserver-kubelet-client";

/// The endpoint's TLS material: the serving certificate and key the
/// cluster CA issued this node (at join, then at each renewal), and that
/// CA, which callers' client certificates must chain to. Clones share it:
/// [`EndpointTls::replace`] puts a renewed certificate in place for every
/// connection accepted from then on, without a restart.
#[derive(Clone)]
pub struct EndpointTls {
    ca_pem: String,
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for EndpointTls {
    // The key is a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointTls").finish_non_exhaustive()
    }
}

impl EndpointTls {
    /// The endpoint's TLS from PEM texts; Err when they do not parse.
    pub fn new(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, crate::NodeError> {
        let config = server_config(ca_pem, cert_pem, key_pem)?;
        Ok(EndpointTls {
            ca_pem: ca_pem.to_string(),
            current: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    /// Serves `cert_pem` and `key_pem` (a renewed certificate) from now on.
    /// Connections already open keep the one they started with.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), crate::NodeError> {
        let config = Arc::new(server_config(&self.ca_pem, cert_pem, key_pem)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// The configuration for the next connection.
    fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The rustls configuration: our certificate, and a client certificate
/// from the CA required.
fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ServerConfig, crate::NodeError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        crate::NodeError::Tls(format!("node endpoint {what}: {e}"))
    };
    let certs = |pem: &str, what: &str| {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(what, &e))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, "ca")? {
        roots.add(c).map_err(|e| bad("ca", &e))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| bad("client verifier", &e))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .ok()
        .flatten()
        .ok_or_else(|| bad("key", &"no private key in the pem text"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocols", &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem, "certificate")?, key)
        .map_err(|e| bad("certificate", &e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(String::from)
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogQuery {
    #[serde(default)]
    pub follow: bool,
    #[serde(default)]
    pub previous: bool,
    pub tail_lines: Option<usize>,
    /// Stop after this many bytes (`kubectl logs --limit-bytes`).
    pub limit_bytes: Option<u64>,
    /// Each line prefixed with when it was written (`--timestamps`).
    #[serde(default)]
    pub timestamps: bool,
    /// Only lines written in the last this many seconds (`--since`).
    pub since_seconds: Option<u64>,
    /// Only lines written at or after this RFC 3339 time (`--since-time`).
    pub since_time: Option<String>,
}

impl LogQuery {
    /// The earliest time a line may have, from `sinceTime` or
    /// `sinceSeconds`; Err is the message of a 400.
    fn since(&self) -> Result<Option<std::time::SystemTime>, String> {
        if let Some(t) = &self.since_time {
            let ts: k8s_openapi::jiff::Timestamp = t
                .parse()
                .map_err(|e| format!("sinceTime {t:?} is not an RFC 3339 time: {e}"))?;
            return Ok(Some(ts.into()));
        }
        Ok(self.since_seconds.map(|s| {
            std::time::SystemTime::now()
                .checked_sub(Duration::from_secs(s))
                .unwrap_or(std::time::UNIX_EPOCH)
        }))
    }
}

/// `text` (the log's bytes from offset `base`) with each line prefixed by
/// its time. `mid_line`: `text` continues a line already sent.
fn with_timestamps(log: &Path, text: &[u8], base: u64, mid_line: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 8);
    for (i, (start, end, t)) in crate::logtimes::lines(log, text, base)
        .into_iter()
        .enumerate()
    {
        if !(i == 0 && mid_line) {
            out.extend_from_slice(crate::logtimes::prefix(t).as_bytes());
        }
        out.extend_from_slice(&text[start..end]);
    }
    out
}

/// The attempts with a log file, ascending.
pub fn attempts(dir: &Path) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix(".log")
                .and_then(|n| n.parse().ok())
        })
        .collect();
    v.sort_unstable();
    v
}

/// The last `n` lines of `text`.
pub fn tail(text: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &text[text.len()..];
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &text[i + 1..];
            }
        }
    }
    text
}

fn error(code: StatusCode, msg: String) -> Response {
    (code, msg).into_response()
}

impl App {
    fn pod_uid(&self, ns: &str, pod: &str) -> Result<String, Box<Response>> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&format!("{ns}/{pod}"))
            .cloned()
            .ok_or_else(|| {
                Box::new(error(
                    StatusCode::NOT_FOUND,
                    format!("pod {ns}/{pod} is not on this node\n"),
                ))
            })
    }

    /// The running workload of `container` in pod `uid`: its tier and id
    /// (the newest attempt, found by the labels the agent sets).
    async fn running_workload(
        &self,
        uid: &str,
        pod: &str,
        container: &str,
    ) -> Result<(Arc<dyn WorkloadRuntime>, String), Box<Response>> {
        self.running(uid, Some(container.to_string()))
            .await
            .map(|(t, w)| (t, w.id))
            .ok_or_else(|| {
                Box::new(error(
                    StatusCode::BAD_REQUEST,
                    format!("container {container} in pod {pod} is not running\n"),
                ))
            })
    }

    /// The newest running workload of pod `uid` (of `container`, or of
    /// any of its containers), with its tier.
    async fn running(
        &self,
        uid: &str,
        container: Option<String>,
    ) -> Option<(Arc<dyn WorkloadRuntime>, evoke_runtime::WorkloadStatus)> {
        let tiers: Vec<Arc<dyn WorkloadRuntime>> = self.tiers.values().cloned().collect();
        let uid_s = uid.to_string();
        tokio::task::spawn_blocking(move || {
            let mut best: Option<(u64, Arc<dyn WorkloadRuntime>, evoke_runtime::WorkloadStatus)> =
                None;
            for tier in tiers {
                let Ok(list) = tier.list() else { continue };
                for w in list {
                    let ours = w.labels.get(LABEL_POD_UID) == Some(&uid_s)
                        && container
                            .as_ref()
                            .is_none_or(|c| w.labels.get(LABEL_CONTAINER) == Some(c));
                    if !ours || !matches!(w.state, WorkloadState::Running { .. }) {
                        continue;
                    }
                    let attempt = w
                        .labels
                        .get(LABEL_ATTEMPT)
                        .and_then(|a| a.parse().ok())
                        .unwrap_or(0);
                    if best.as_ref().is_none_or(|b| attempt >= b.0) {
                        best = Some((attempt, tier.clone(), w));
                    }
                }
            }
            best.map(|(_, t, w)| (t, w))
        })
        .await
        .ok()
        .flatten()
    }
}

/// `GET /exec/{ns}/{pod}/{container}?command=...`: a WebSocket upgrade
/// into a remote-command session (see [`crate::stream`]).
async fn exec(
    State(app): State<App>,
    UrlPath((ns, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let req = match ExecRequest::parse(query.as_deref().unwrap_or_default()) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let uid = match app.pod_uid(&ns, &pod) {
        Ok(uid) => uid,
        Err(r) => return *r,
    };
    let (tier, id) = match app.running_workload(&uid, &pod, &container).await {
        Ok(x) => x,
        Err(r) => return *r,
    };
    // The API server checks for 426 before it falls back to SPDY.
    let (ws, protocol) = match accept_upgrade(ws, &stream::PROTOCOLS, "exec") {
        Ok(x) => x,
        Err(r) => return *r,
    };
    ws.on_upgrade(move |socket| stream::session(socket, protocol, tier, id, req))
}

/// Accepts kubectl's WebSocket upgrade for `what` with one of `protocols`:
/// the upgrade and the subprotocol it chose, or the error response to send
/// instead (426 without an upgrade, so the API server can tell).
fn accept_upgrade(
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    protocols: &[&'static str],
    what: &str,
) -> Result<(WebSocketUpgrade, String), Box<Response>> {
    let ws = ws
        .map_err(|e| {
            Box::new(error(
                StatusCode::UPGRADE_REQUIRED,
                format!("{what} needs a WebSocket upgrade: {e}\n"),
            ))
        })?
        .protocols(protocols.to_vec());
    let protocol = ws
        .selected_protocol()
        .and_then(|p| p.to_str().ok())
        .map(String::from)
        .ok_or_else(|| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "{what} needs one of the subprotocols {}\n",
                    protocols.join(", ")
                ),
            ))
        })?;
    Ok((ws, protocol))
}

/// `GET /portForward/{ns}/{pod}[?ports=P[,P]]`: SPDY tunnelled in a
/// WebSocket (see [`crate::portforward`]) to the pod's loopback. kubectl
/// names the ports only in its stream headers; `ports`, when given,
/// limits them.
async fn port_forward(
    State(app): State<App>,
    UrlPath((ns, pod)): UrlPath<(String, String)>,
    RawQuery(query): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let mut ports = Vec::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if k == "ports" || k == "port" {
            for p in v.split(',').filter(|p| !p.is_empty()) {
                match p.trim().parse::<u16>() {
                    Ok(n) if n > 0 => ports.push(n),
                    _ => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            format!("invalid port {p:?}: ports are 1-65535\n"),
                        )
                    }
                }
            }
        }
    }
    let uid = match app.pod_uid(&ns, &pod) {
        Ok(uid) => uid,
        Err(r) => return *r,
    };
    let Some((tier, w)) = app.running(&uid, None).await else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("pod {pod} has no running container to forward to\n"),
        );
    };
    let WorkloadState::Running { pid } = w.state else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("pod {pod} has no running container to forward to\n"),
        );
    };
    if tier.name() == "microvm" {
        return error(
            StatusCode::BAD_REQUEST,
            format!("port-forward into microvm pod {pod} is not supported\n"),
        );
    }
    let ws = match accept_upgrade(ws, &[crate::portforward::PROTOCOL], "port-forward") {
        Ok((ws, _)) => ws,
        Err(r) => return *r,
    };
    let connect: crate::portforward::Connector =
        Arc::new(move |port| connect_in_netns_of(pid, port));
    tracing::info!(pod = %format!("{ns}/{pod}"), ?ports, "port-forward started");
    ws.on_upgrade(move |socket| crate::portforward::session(socket, connect, ports))
}

/// A TCP connection to 127.0.0.1:`port` in the network namespace of
/// process `pid`: made on a short-lived thread that joins the namespace,
/// so no pooled thread changes namespace. The socket stays in the pod's
/// namespace after the thread ends.
fn connect_in_netns_of(pid: u32, port: u16) -> std::io::Result<std::net::TcpStream> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| std::io::Error::other(format!("joining the pod's network: {e}")))?;
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(5),
        )
    })
    .join()
    .map_err(|_| std::io::Error::other("the connecting thread panicked"))?
}

/// `GET /attach/{ns}/{pod}/{container}`: the main process's output from
/// now on, as a WebSocket remote-command session. With `stdin=true`
/// (`kubectl attach -i`, `kubectl run -i`), the client's stdin goes to the
/// container's, which must have been created with `stdin: true`; it stays
/// open between attachments, unless the container has `stdinOnce: true`:
/// then the first attach's end (the client closed its stdin, or left)
/// closes it, and later attaches may not write to it
/// ([`stream::stdin_once_reader`]).
async fn attach(
    State(app): State<App>,
    UrlPath((ns, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let wants_stdin = form_urlencoded::parse(query.unwrap_or_default().as_bytes()).any(|(k, v)| {
        k == "stdin" && matches!(v.as_ref(), "1" | "t" | "T" | "true" | "True" | "TRUE")
    });
    let uid = match app.pod_uid(&ns, &pod) {
        Ok(uid) => uid,
        Err(r) => return *r,
    };
    let (tier, id) = match app.running_workload(&uid, &pod, &container).await {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let (t, w) = (tier.clone(), id.clone());
    let log = tokio::task::spawn_blocking(move || t.state(&w).ok().and_then(|s| s.log_path))
        .await
        .ok()
        .flatten();
    let Some(log) = log else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("container {container} in pod {pod} keeps no output to attach to\n"),
        );
    };
    // Opened before the upgrade, so that a container without a kept-open
    // stdin is a clear error for kubectl rather than a silent session.
    let once = if wants_stdin {
        stream::take_stdin_once(&id)
    } else {
        stream::OnceStdin::NotOnce
    };
    let stdin = if let stream::OnceStdin::First(w) = once {
        Some(w)
    } else if let stream::OnceStdin::Closed = once {
        return error(
            StatusCode::BAD_REQUEST,
            format!("the stdin of container {container} in pod {pod} was closed when its first attach ended (stdinOnce)\n"),
        );
    } else if wants_stdin {
        let (t, w) = (tier.clone(), id.clone());
        match tokio::task::spawn_blocking(move || t.open_stdin(&w)).await {
            Ok(Ok(fd)) => Some(fd),
            Ok(Err(e)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot attach to the stdin of container {container} in pod {pod} (it needs stdin: true in the pod spec): {e}\n"),
                );
            }
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("opening the stdin of container {container} in pod {pod}: {e}\n"),
                );
            }
        }
    } else {
        None
    };
    let ws = match accept_upgrade(ws, &stream::PROTOCOLS, "attach") {
        Ok((ws, _)) => ws,
        Err(r) => return *r,
    };
    ws.on_upgrade(move |socket| stream::attach_session(socket, tier, id, log, stdin))
}

async fn logs(
    State(app): State<App>,
    UrlPath((ns, pod, container)): UrlPath<(String, String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    let uid = match app.pod_uid(&ns, &pod) {
        Ok(uid) => uid,
        Err(r) => return *r,
    };
    let dir = app
        .data_dir
        .join("pods")
        .join(&uid)
        .join("logs")
        .join(&container);
    let all = attempts(&dir);
    let pick = if q.previous {
        all.len().checked_sub(2).map(|i| all[i])
    } else {
        all.last().copied()
    };
    let Some(attempt) = pick else {
        let what = if q.previous {
            "previous terminated container"
        } else {
            "container"
        };
        return error(
            StatusCode::BAD_REQUEST,
            format!("{what} \"{container}\" in pod \"{pod}\" not found\n"),
        );
    };
    let since = match q.since() {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let path = dir.join(format!("{attempt}.log"));
    let text = std::fs::read(&path).unwrap_or_default();
    // --since drops the lines written before it, then --tail counts.
    let from = match since {
        Some(cutoff) => crate::logtimes::lines(&path, &text, 0)
            .into_iter()
            .find(|(_, _, t)| *t >= cutoff)
            .map_or(text.len(), |(start, _, _)| start),
        None => 0,
    };
    let start = match q.tail_lines {
        Some(n) => text.len() - tail(&text[from..], n).len(),
        None => from,
    };
    let mut first = if q.timestamps {
        with_timestamps(&path, &text[start..], start as u64, false)
    } else {
        text[start..].to_vec()
    };
    if let Some(limit) = q.limit_bytes {
        first.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    if !q.follow || q.previous {
        return (StatusCode::OK, first).into_response();
    }
    // Follow: send what exists, then what is appended, until a newer
    // attempt starts or the pod leaves this node.
    let offset = text.len() as u64;
    let mid_line = !text.is_empty() && !text.ends_with(b"\n");
    let state = (
        Some(first),
        path,
        offset,
        dir,
        attempt,
        app.pods.clone(),
        (format!("{ns}/{pod}"), q.timestamps, mid_line),
    );
    let stream = futures::stream::unfold(
        state,
        |(first, path, offset, dir, attempt, pods, key)| async move {
            if let Some(f) = first {
                return Some((
                    Ok::<_, std::io::Error>(f),
                    (None, path, offset, dir, attempt, pods, key),
                ));
            }
            let (name, timestamps, mid_line) = key;
            loop {
                let mut buf = Vec::new();
                if let Ok(mut f) = std::fs::File::open(&path) {
                    if f.seek(SeekFrom::Start(offset)).is_ok() {
                        let _ = f.read_to_end(&mut buf);
                    }
                }
                if !buf.is_empty() {
                    let next = offset + buf.len() as u64;
                    let ends_mid_line = !buf.ends_with(b"\n");
                    let out = if timestamps {
                        with_timestamps(&path, &buf, offset, mid_line)
                    } else {
                        buf
                    };
                    let key = (name, timestamps, ends_mid_line);
                    return Some((Ok(out), (None, path, next, dir, attempt, pods, key)));
                }
                let gone = !pods
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&name);
                if gone || attempts(&dir).last().is_some_and(|a| *a > attempt) {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    );
    // --limit-bytes ends the stream as soon as that much went out.
    let stream = futures::stream::unfold(
        (stream.boxed(), q.limit_bytes),
        |(mut inner, left)| async move {
            if left == Some(0) {
                return None;
            }
            let mut chunk = inner.next().await?;
            let left = match (left, chunk.as_mut()) {
                (Some(n), Ok(b)) => {
                    b.truncate(usize::try_from(n).unwrap_or(usize::MAX));
                    Some(n - b.len() as u64)
                }
                (left, _) => left,
            };
            Some((chunk, (inner, left)))
        },
    );
    Response::builder()
        .header("content-type", "text/plain")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn healthz() -> &'static str {
    "ok"
}

/// Binds `addr` (port 0 picks one) and serves HTTPS with `tls` in the
/// background; returns the bound port.
pub async fn serve(
    addr: &str,
    data_dir: PathBuf,
    tls: &EndpointTls,
    pods: PodIndex,
    tiers: Tiers,
) -> Result<u16, crate::NodeError> {
    let tls = tls.clone();
    crate::logtimes::Stamper::new(data_dir.clone(), pods.clone()).spawn();
    let app = App {
        data_dir,
        pods,
        tiers: Arc::new(tiers),
    };
    let router = Router::new()
        .route("/containerLogs/{ns}/{pod}/{container}", get(logs))
        .route("/exec/{ns}/{pod}/{container}", get(exec))
        .route("/attach/{ns}/{pod}/{container}", get(attach))
        .route("/portForward/{ns}/{pod}", get(port_forward))
        .route("/healthz", get(healthz))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| crate::NodeError::Io {
            path: addr.into(),
            source,
        })?;
    let port = listener
        .local_addr()
        .map_err(|source| crate::NodeError::Io {
            path: addr.into(),
            source,
        })?
        .port();
    // Callers with a valid certificate that is not the API server's (another
    // node's) get this instead of the endpoint.
    let forbidden = Router::new().fallback(|| async {
        error(
            StatusCode::FORBIDDEN,
            format!(
                "forbidden: only the API server ({APISERVER_CLIENT_CN}) may use this endpoint\n"
            ),
        )
    });
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "node endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            // The certificate in place now (renewals replace it).
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let (router, forbidden) = (router.clone(), forbidden.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "node endpoint: tls handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
                let cn = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| common_name(c.as_ref()));
                let service = if cn.as_deref() == Some(APISERVER_CLIENT_CN) {
                    router
                } else {
                    tracing::info!(%peer, client = ?cn, "node endpoint: caller is not the api server");
                    forbidden
                };
                let service = hyper_util::service::TowerToHyperService::new(service);
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                if let Err(e) = builder
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), service)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "node endpoint connection ended with an error");
                }
            });
        }
    });
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn tail_returns_the_last_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 1), b"c");
        assert_eq!(tail(b"a\n", 5), b"a\n");
        assert_eq!(tail(b"a\n", 0), b"");
    }

    /// A test cluster CA, the endpoint's certificate for 127.0.0.1, and
    /// client certificates on demand.
    struct Pki {
        ca: rcgen::CertificateParams,
        ca_key: rcgen::KeyPair,
        ca_pem: String,
    }

    /// A client's TLS identity: its certificate and key as PEM.
    struct Caller {
        cert_pem: String,
        key_pem: String,
    }

    impl Pki {
        fn new() -> Pki {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.distinguished_name
                .push(rcgen::DnType::CommonName, "test-ca");
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
            Pki { ca, ca_key, ca_pem }
        }

        fn sign(&self, mut params: rcgen::CertificateParams, cn: &str) -> Caller {
            let key = rcgen::KeyPair::generate().unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let issuer = rcgen::Issuer::from_params(&self.ca, &self.ca_key);
            Caller {
                cert_pem: params.signed_by(&key, &issuer).unwrap().pem(),
                key_pem: key.serialize_pem(),
            }
        }

        /// The endpoint's own TLS material.
        fn endpoint(&self) -> EndpointTls {
            let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            let c = self.sign(p, "n1");
            EndpointTls::new(&self.ca_pem, &c.cert_pem, &c.key_pem).unwrap()
        }

        /// A client certificate named `cn`; `expired` ended in 2020.
        fn client(&self, cn: &str, expired: bool) -> Caller {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            if expired {
                p.not_before = rcgen::date_time_ymd(2019, 1, 1);
                p.not_after = rcgen::date_time_ymd(2020, 1, 1);
            }
            self.sign(p, cn)
        }

        fn apiserver(&self) -> Caller {
            self.client(APISERVER_CLIENT_CN, false)
        }
    }

    /// A TLS connection to the endpoint on `port` as `who` (no client
    /// certificate when None), trusting `ca_pem`.
    async fn connect(
        port: u16,
        ca_pem: &str,
        who: Option<&Caller>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let cfg = match who {
            Some(c) => builder
                .with_client_auth_cert(
                    rustls_pemfile::certs(&mut c.cert_pem.as_bytes())
                        .collect::<Result<Vec<_>, _>>()
                        .unwrap(),
                    rustls_pemfile::private_key(&mut c.key_pem.as_bytes())
                        .unwrap()
                        .unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(
                rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                tcp,
            )
            .await
    }

    /// A GET over TLS as `who`: the raw response, or "ERROR ..." when the
    /// TLS handshake or the connection fails.
    async fn get_as(port: u16, ca_pem: &str, who: Option<&Caller>, path: &str) -> String {
        let mut s = match connect(port, ca_pem, who).await {
            Ok(s) => s,
            Err(e) => return format!("ERROR {e}"),
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if let Err(e) = s.write_all(req.as_bytes()).await {
            return format!("ERROR {e}");
        }
        let mut out = Vec::new();
        match s.read_to_end(&mut out).await {
            Ok(_) if !out.is_empty() => String::from_utf8_lossy(&out).into_owned(),
            Ok(_) => "ERROR no answer".into(),
            Err(e) => format!("ERROR {e}"),
        }
    }

    #[tokio::test]
    async fn logs_current_previous_and_tail_for_the_api_server() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pods/u1/logs/c");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("0.log"), "first run\n").unwrap();
        std::fs::write(dir.join("1.log"), "one\ntwo\nthree\n").unwrap();
        let pods: PodIndex = Arc::new(RwLock::new(HashMap::from([(
            "ns/p".to_string(),
            "u1".to_string(),
        )])));
        let pki = Pki::new();
        let port = serve(
            "127.0.0.1:0",
            tmp.path().to_path_buf(),
            &pki.endpoint(),
            pods,
            Tiers::new(),
        )
        .await
        .unwrap();
        let api = pki.apiserver();
        let get = |path: &'static str| get_as(port, &pki.ca_pem, Some(&api), path);
        assert!(get("/containerLogs/ns/p/c")
            .await
            .ends_with("one\ntwo\nthree\n"));
        assert!(get("/containerLogs/ns/p/c?previous=true")
            .await
            .ends_with("first run\n"));
        assert!(get("/containerLogs/ns/p/c?tailLines=1")
            .await
            .ends_with("\r\n\r\nthree\n"));
        assert!(get("/containerLogs/ns/p/c?limitBytes=5")
            .await
            .ends_with("\r\n\r\none\nt"));
        assert!(get("/containerLogs/ns/other/c")
            .await
            .starts_with("HTTP/1.1 404"));
    }

    #[tokio::test]
    async fn logs_carry_timestamps_and_since_drops_older_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pods/u1/logs/c");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("0.log");
        std::fs::write(&log, "old\nnew\n").unwrap();
        // "old" was written in 2020, "new" at 2030-01-01.
        let t2020 = 1_577_836_800_000_000_000u128;
        let t2030 = 1_893_456_000_000_000_000u128;
        std::fs::write(
            crate::logtimes::times_path(&log),
            format!("4 {t2020}\n8 {t2030}\n"),
        )
        .unwrap();
        let pods: PodIndex = Arc::new(RwLock::new(HashMap::from([(
            "ns/p".to_string(),
            "u1".to_string(),
        )])));
        let pki = Pki::new();
        let port = serve(
            "127.0.0.1:0",
            tmp.path().to_path_buf(),
            &pki.endpoint(),
            pods,
            Tiers::new(),
        )
        .await
        .unwrap();
        let api = pki.apiserver();
        let get = |path: &'static str| get_as(port, &pki.ca_pem, Some(&api), path);
        let body = |r: String| {
            r.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap()
        };
        assert_eq!(
            body(get("/containerLogs/ns/p/c?timestamps=true").await),
            "2020-01-01T00:00:00.000000000Z old\n2030-01-01T00:00:00.000000000Z new\n"
        );
        assert_eq!(
            body(get("/containerLogs/ns/p/c?sinceTime=2025-01-01T00:00:00Z").await),
            "new\n"
        );
        assert_eq!(
            body(
                get("/containerLogs/ns/p/c?sinceTime=2025-01-01T01:00:00%2B01:00&timestamps=true")
                    .await
            ),
            "2030-01-01T00:00:00.000000000Z new\n"
        );
        // A day ago is after 2020 and before 2030.
        assert_eq!(
            body(get("/containerLogs/ns/p/c?sinceSeconds=86400").await),
            "new\n"
        );
        assert!(get("/containerLogs/ns/p/c?sinceTime=yesterday")
            .await
            .starts_with("HTTP/1.1 400"));
    }

    #[tokio::test]
    async fn only_the_api_servers_valid_certificate_from_the_cluster_ca_opens_the_endpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pods/u1/logs/c");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("0.log"), "secret output\n").unwrap();
        let pods: PodIndex = Arc::new(RwLock::new(HashMap::from([(
            "ns/p".to_string(),
            "u1".to_string(),
        )])));
        let pki = Pki::new();
        let port = serve(
            "127.0.0.1:0",
            tmp.path().to_path_buf(),
            &pki.endpoint(),
            pods,
            Tiers::new(),
        )
        .await
        .unwrap();
        let path = "/containerLogs/ns/p/c";
        let as_ = |who: Option<Caller>| {
            let ca = pki.ca_pem.clone();
            async move { get_as(port, &ca, who.as_ref(), path).await }
        };
        assert!(as_(Some(pki.apiserver()))
            .await
            .ends_with("secret output\n"));
        // Plain HTTP gets nothing.
        let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        plain
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut out)).await;
        assert!(!String::from_utf8_lossy(&out).contains("secret output"));
        // No certificate, an expired one, or one from another CA: the
        // handshake fails.
        let other = Pki::new();
        for (what, who) in [
            ("no certificate", None),
            ("expired", Some(pki.client(APISERVER_CLIENT_CN, true))),
            ("another ca", Some(other.apiserver())),
        ] {
            let out = as_(who).await;
            assert!(out.starts_with("ERROR"), "{what}: {out}");
        }
        // Another node's valid certificate from the same CA: 403.
        let out = as_(Some(pki.client("system:node:n2", false))).await;
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        assert!(!out.contains("secret output"));
    }

    /// A tier double whose one workload is the host: exec runs the command
    /// as a host process on the given streams, so the protocol is tested
    /// without root.
    struct HostTier;

    fn host_status() -> evoke_runtime::WorkloadStatus {
        evoke_runtime::WorkloadStatus {
            id: "w1".into(),
            image: None,
            state: WorkloadState::Running { pid: 1 },
            created_at: std::time::SystemTime::now(),
            started_at: None,
            labels: [
                (LABEL_POD_UID.to_string(), "u1".to_string()),
                (LABEL_CONTAINER.to_string(), "c".to_string()),
                (LABEL_ATTEMPT.to_string(), "0".to_string()),
            ]
            .into(),
            log_path: None,
        }
    }

    impl WorkloadRuntime for HostTier {
        fn name(&self) -> &str {
            "host"
        }
        fn available(&self) -> Result<(), evoke_runtime::RuntimeError> {
            Ok(())
        }
        fn create(
            &self,
            spec: &evoke_runtime::WorkloadSpec,
            _: evoke_runtime::Stdio,
        ) -> Result<evoke_runtime::WorkloadStatus, evoke_runtime::RuntimeError> {
            Err(evoke_runtime::RuntimeError::AlreadyExists(spec.id.clone()))
        }
        fn start(&self, _: &str) -> Result<(), evoke_runtime::RuntimeError> {
            Ok(())
        }
        fn state(
            &self,
            _: &str,
        ) -> Result<evoke_runtime::WorkloadStatus, evoke_runtime::RuntimeError> {
            Ok(host_status())
        }
        fn list(&self) -> Result<Vec<evoke_runtime::WorkloadStatus>, evoke_runtime::RuntimeError> {
            Ok(vec![host_status()])
        }
        fn signal(&self, _: &str, _: i32) -> Result<(), evoke_runtime::RuntimeError> {
            Ok(())
        }
        fn exec(
            &self,
            _: &str,
            spec: &evoke_runtime::ExecSpec,
            stdio: evoke_runtime::Stdio,
        ) -> Result<i32, evoke_runtime::RuntimeError> {
            let io = |fd: Option<std::os::fd::OwnedFd>| match fd {
                Some(fd) => std::process::Stdio::from(fd),
                None => std::process::Stdio::null(),
            };
            let st = std::process::Command::new(&spec.command[0])
                .args(&spec.command[1..])
                .stdin(io(stdio.stdin))
                .stdout(io(stdio.stdout))
                .stderr(io(stdio.stderr))
                .status()
                .map_err(|e| evoke_runtime::RuntimeError::io("exec", e))?;
            Ok(st.code().unwrap_or(255))
        }
        fn remove(&self, _: &str, _: bool) -> Result<(), evoke_runtime::RuntimeError> {
            Ok(())
        }
    }

    /// An endpoint with pod ns/p (container c) on the host tier; its PKI.
    async fn exec_endpoint() -> (tempfile::TempDir, u16, Pki) {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let pods: PodIndex = Arc::new(RwLock::new(HashMap::from([(
            "ns/p".to_string(),
            "u1".to_string(),
        )])));
        let tiers = Tiers::from([(
            "host".to_string(),
            Arc::new(HostTier) as Arc<dyn WorkloadRuntime>,
        )]);
        let port = serve(
            "127.0.0.1:0",
            tmp.path().to_path_buf(),
            &pki.endpoint(),
            pods,
            tiers,
        )
        .await
        .unwrap();
        (tmp, port, pki)
    }

    /// A WebSocket session at `path` as the API server.
    async fn ws_connect(
        port: u16,
        pki: &Pki,
        path: &str,
    ) -> Result<
        (
            tokio_tungstenite::WebSocketStream<
                tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
            >,
            tokio_tungstenite::tungstenite::handshake::client::Response,
        ),
        tokio_tungstenite::tungstenite::Error,
    > {
        let tls = connect(port, &pki.ca_pem, Some(&pki.apiserver()))
            .await
            .unwrap();
        tokio_tungstenite::client_async(ws_request(port, path), tls).await
    }

    fn ws_request(
        port: u16,
        path: &str,
    ) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("wss://127.0.0.1:{port}{path}")
            .into_client_request()
            .unwrap();
        let h = req.headers_mut();
        h.insert(
            "sec-websocket-protocol",
            "v5.channel.k8s.io, v4.channel.k8s.io".parse().unwrap(),
        );
        req
    }

    #[tokio::test]
    async fn exec_streams_stdin_stdout_and_stderr_and_ends_with_the_exit_status() {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let (_tmp, port, pki) = exec_endpoint().await;
        let path = "/exec/ns/p/c?command=sh&command=-c&command=cat%3B+echo+oops+%3E%262%3B+exit+3&stdin=true&stdout=true&stderr=true";
        let (mut ws, resp) = ws_connect(port, &pki, path).await.unwrap();
        assert_eq!(
            resp.headers()["sec-websocket-protocol"],
            "v5.channel.k8s.io"
        );
        ws.send(Message::binary(b"\x00hello ".to_vec()))
            .await
            .unwrap();
        ws.send(Message::binary(b"\x00world\n".to_vec()))
            .await
            .unwrap();
        // v5: stdin reached EOF.
        ws.send(Message::binary(vec![255, 0])).await.unwrap();
        let mut channels: HashMap<u8, Vec<u8>> = HashMap::new();
        let mut order = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let m = tokio::time::timeout_at(deadline, ws.next())
                .await
                .expect("the session ends");
            match m {
                Some(Ok(Message::Binary(b))) => {
                    order.push(b[0]);
                    channels.entry(b[0]).or_default().extend(&b[1..]);
                }
                Some(Ok(Message::Close(f))) => {
                    assert_eq!(f.map(|f| u16::from(f.code)), Some(1000));
                    break;
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => break,
            }
        }
        assert_eq!(channels[&1], b"hello world\n");
        assert_eq!(channels[&2], b"oops\n");
        // The status comes last, after all output.
        assert_eq!(order.last(), Some(&3));
        let status: serde_json::Value = serde_json::from_slice(&channels[&3]).unwrap();
        assert_eq!(status["reason"], "NonZeroExitCode");
        assert_eq!(status["details"]["causes"][0]["message"], "3");
    }

    #[tokio::test]
    async fn exec_needs_a_known_pod_a_running_container_and_a_command() {
        let (_tmp, port, pki) = exec_endpoint().await;
        let pki = &pki;
        let refused = |path: &'static str| async move {
            match ws_connect(port, pki, path).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => (
                    r.status().as_u16(),
                    String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned(),
                ),
                other => panic!("{path} was not refused: {:?}", other.map(|(_, r)| r)),
            }
        };
        let (code, msg) = refused("/exec/ns/other/c?command=true").await;
        assert_eq!(
            (code, msg.trim()),
            (404, "pod ns/other is not on this node")
        );
        let (code, msg) = refused("/exec/ns/p/nosuch?command=true").await;
        assert_eq!(
            (code, msg.trim()),
            (400, "container nosuch in pod p is not running")
        );
        let (code, msg) = refused("/exec/ns/p/c?stdout=true").await;
        assert_eq!(code, 400);
        assert!(msg.contains("at least one command"), "{msg}");
        // Another node may not exec here.
        let node = pki.client("system:node:n2", false);
        assert!(
            get_as(port, &pki.ca_pem, Some(&node), "/exec/ns/p/c?command=true")
                .await
                .starts_with("HTTP/1.1 403")
        );
        // Checks pass but no upgrade: the API server's probe before it
        // refuses SPDY.
        let api = pki.apiserver();
        assert!(
            get_as(port, &pki.ca_pem, Some(&api), "/exec/ns/p/c?command=true")
                .await
                .starts_with("HTTP/1.1 426")
        );
    }
}
