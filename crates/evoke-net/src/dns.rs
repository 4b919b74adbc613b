//! Cluster DNS: A records for Services and for the pods behind headless
//! Services, served over UDP (and TCP for answers too large for a
//! datagram) with hickory-proto doing the wire format.
//!
//! Names: `<svc>.<ns>.svc.cluster.local` answers the ClusterIP (for a
//! headless Service, every ready pod IP; for an ExternalName one, a CNAME),
//! and `<hostname>.<svc>.<ns>.svc.cluster.local` answers one pod of a
//! headless Service. Short forms
//! (`web`, `web.default`, `kubernetes.default`) resolve on the client through
//! the search path [`resolv_conf`] writes. Names outside the cluster domain
//! are refused: evoke forwards nothing anywhere.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::{debug, warn};

use crate::NetError;

/// The default cluster domain (`--cluster-domain`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// TTL of every answer: short, Services change.
const TTL: u32 = 5;

/// The resolv.conf of a pod in `namespace`, with the cluster DNS at `dns`
/// serving `domain`.
pub fn resolv_conf(namespace: &str, dns: Ipv4Addr, domain: &str) -> String {
    format!(
        "nameserver {dns}\nsearch {namespace}.svc.{domain} svc.{domain} {domain}\noptions ndots:5\n"
    )
}

/// A pod's DNS settings: `spec.dnsPolicy` and `spec.dnsConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodDns {
    /// ClusterFirst (also the default), ClusterFirstWithHostNet, Default or None.
    pub policy: Option<String>,
    /// dnsConfig.nameservers
    pub nameservers: Vec<String>,
    /// dnsConfig.searches
    pub searches: Vec<String>,
    /// dnsConfig.options as (name, value)
    pub options: Vec<(String, Option<String>)>,
}

/// The resolv.conf of a pod in `namespace` with settings `dns`, as the
/// kubelet writes it: ClusterFirst (the default) points at the cluster DNS
/// with the cluster search path; `Default` takes the node's `node_conf`;
/// `None` starts empty. dnsConfig then adds nameservers (three at most) and
/// search domains (32 at most), and its options override by name.
pub fn pod_resolv_conf(
    namespace: &str,
    dns: Ipv4Addr,
    domain: &str,
    pod: &PodDns,
    node_conf: &str,
) -> String {
    let mut servers: Vec<String> = Vec::new();
    let mut search: Vec<String> = Vec::new();
    let mut options: Vec<(String, Option<String>)> = Vec::new();
    let parse_option = |o: &str| match o.split_once(':') {
        Some((n, v)) => (n.to_string(), Some(v.to_string())),
        None => (o.to_string(), None),
    };
    match pod.policy.as_deref() {
        Some("None") => {}
        Some("Default") => {
            for line in node_conf.lines() {
                let mut words = line.split_whitespace();
                match words.next() {
                    Some("nameserver") => servers.extend(words.next().map(str::to_string)),
                    Some("search") | Some("domain") => search.extend(words.map(str::to_string)),
                    Some("options") => options.extend(words.map(parse_option)),
                    _ => {}
                }
            }
        }
        _ => {
            servers.push(dns.to_string());
            search = vec![
                format!("{namespace}.svc.{domain}"),
                format!("svc.{domain}"),
                domain.to_string(),
            ];
            options.push(("ndots".into(), Some("5".into())));
        }
    }
    for n in &pod.nameservers {
        if !servers.contains(n) {
            servers.push(n.clone());
        }
    }
    servers.truncate(3);
    for d in &pod.searches {
        if !search.contains(d) {
            search.push(d.clone());
        }
    }
    search.truncate(32);
    for (name, value) in &pod.options {
        match options.iter_mut().find(|(n, _)| n == name) {
            Some(o) => o.1 = value.clone(),
            None => options.push((name.clone(), value.clone())),
        }
    }
    let mut out = String::new();
    for s in &servers {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    if !options.is_empty() {
        let opts: Vec<String> = options
            .iter()
            .map(|(n, v)| match v {
                Some(v) => format!("{n}:{v}"),
                None => n.clone(),
            })
            .collect();
        out.push_str(&format!("options {}\n", opts.join(" ")));
    }
    out
}

/// What DNS knows of one Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRecord {
    /// The ClusterIP; `None` for a headless Service.
    pub cluster_ip: Option<Ipv4Addr>,
    /// Ready endpoints: (pod hostname if any, pod IP).
    pub endpoints: Vec<(Option<String>, Ipv4Addr)>,
    /// An ExternalName Service's target: the name answers with a CNAME.
    pub external_name: Option<String>,
}

/// The answer to one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Addresses for the name (possibly none: the name exists, no A data).
    Addresses(Vec<Ipv4Addr>),
    /// An ExternalName Service: a CNAME to this name.
    Alias(String),
    /// The name is in the cluster domain but does not exist.
    NxDomain,
    /// Not a name this server is authoritative for.
    Refused,
}

/// The Services DNS answers for, keyed by (namespace, name), under one
/// cluster domain.
#[derive(Debug, Clone)]
pub struct Records {
    domain: String,
    services: BTreeMap<(String, String), ServiceRecord>,
}

impl Default for Records {
    fn default() -> Self {
        Self::new(CLUSTER_DOMAIN)
    }
}

impl Records {
    /// No Services yet, answering under `domain` (e.g. `cluster.local`).
    pub fn new(domain: &str) -> Self {
        Self {
            domain: domain.trim_matches('.').to_ascii_lowercase(),
            services: BTreeMap::new(),
        }
    }

    /// Adds or replaces a Service.
    pub fn upsert(&mut self, namespace: &str, name: &str, rec: ServiceRecord) {
        self.services
            .insert((namespace.to_string(), name.to_string()), rec);
    }

    /// Removes a Service.
    pub fn remove(&mut self, namespace: &str, name: &str) {
        self.services
            .remove(&(namespace.to_string(), name.to_string()));
    }

    /// Looks a (fully qualified) name up.
    pub fn lookup(&self, name: &str) -> Answer {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let Some(rest) = name.strip_suffix(self.domain.as_str()) else {
            return Answer::Refused;
        };
        if !(rest.is_empty() || rest.ends_with('.')) {
            // `xcluster.local` is not under `cluster.local`.
            return Answer::Refused;
        }
        let Some(rest) = rest.strip_suffix(".svc.") else {
            return if rest.is_empty() || rest == "svc." {
                Answer::Addresses(Vec::new())
            } else {
                Answer::NxDomain
            };
        };
        let labels: Vec<&str> = rest.split('.').collect();
        match labels.as_slice() {
            [svc, ns] => match self.services.get(&(ns.to_string(), svc.to_string())) {
                Some(ServiceRecord {
                    external_name: Some(target),
                    ..
                }) => Answer::Alias(target.trim_end_matches('.').to_string()),
                Some(ServiceRecord {
                    cluster_ip: Some(ip),
                    ..
                }) => Answer::Addresses(vec![*ip]),
                Some(rec) => Answer::Addresses(rec.endpoints.iter().map(|(_, ip)| *ip).collect()),
                None => Answer::NxDomain,
            },
            [host, svc, ns] => {
                let pod = self
                    .services
                    .get(&(ns.to_string(), svc.to_string()))
                    .filter(|rec| rec.cluster_ip.is_none())
                    .and_then(|rec| {
                        rec.endpoints
                            .iter()
                            .find(|(h, _)| h.as_deref() == Some(*host))
                            .map(|(_, ip)| *ip)
                    });
                pod.map_or(Answer::NxDomain, |ip| Answer::Addresses(vec![ip]))
            }
            _ => Answer::NxDomain,
        }
    }
}

/// Builds the response to a wire-format DNS request, with no size limit
/// (DNS over TCP).
pub fn respond(records: &Records, request: &[u8]) -> Result<Vec<u8>, NetError> {
    build(records, request)?
        .0
        .to_vec()
        .map_err(|e| NetError::BadInput(format!("dns response: {e}")))
}

/// Builds the response to a DNS request over UDP: one that does not fit
/// the client's payload size (512 bytes, or what its EDNS record offers)
/// goes back truncated, with no answers and TC set, so the client asks
/// again over TCP (a headless Service with many pods).
pub fn respond_udp(records: &Records, request: &[u8]) -> Result<Vec<u8>, NetError> {
    let (mut resp, max) = build(records, request)?;
    let encode = |m: &Message| {
        m.to_vec()
            .map_err(|e| NetError::BadInput(format!("dns response: {e}")))
    };
    let bytes = encode(&resp)?;
    if bytes.len() <= usize::from(max) {
        return Ok(bytes);
    }
    resp.answers.clear();
    resp.metadata.truncation = true;
    encode(&resp)
}

fn build(records: &Records, request: &[u8]) -> Result<(Message, u16), NetError> {
    let req =
        Message::from_vec(request).map_err(|e| NetError::BadInput(format!("dns request: {e}")))?;
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.authoritative = true;
    if req.metadata.message_type != MessageType::Query
        || req.metadata.op_code != OpCode::Query
        || req.queries.len() != 1
    {
        resp.metadata.response_code = ResponseCode::NotImp;
    } else {
        let q = req.queries[0].clone();
        let wants_a = q.query_type() == RecordType::A || q.query_type() == RecordType::ANY;
        match records.lookup(&q.name().to_ascii()) {
            Answer::Addresses(ips) => {
                if wants_a {
                    for ip in ips {
                        resp.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::A(A(ip))));
                    }
                }
            }
            Answer::Alias(target) => {
                let name = Name::from_ascii(format!("{target}."))
                    .map_err(|e| NetError::BadInput(format!("externalName {target:?}: {e}")))?;
                resp.add_answer(Record::from_rdata(
                    q.name().clone(),
                    TTL,
                    RData::CNAME(CNAME(name.clone())),
                ));
                // A target inside the cluster is answered here too; any
                // other is the client's to resolve (evoke forwards nothing).
                if let (true, Answer::Addresses(ips)) = (wants_a, records.lookup(&target)) {
                    for ip in ips {
                        resp.add_answer(Record::from_rdata(name.clone(), TTL, RData::A(A(ip))));
                    }
                }
            }
            Answer::NxDomain => resp.metadata.response_code = ResponseCode::NXDomain,
            Answer::Refused => {
                resp.metadata.authoritative = false;
                resp.metadata.response_code = ResponseCode::Refused;
            }
        }
        resp.add_query(q);
    }
    Ok((resp, req.max_payload()))
}

/// A DNS server over shared [`Records`], on UDP and on TCP at the same
/// address (clients retry over TCP when a UDP answer comes back truncated).
pub struct DnsServer {
    socket: UdpSocket,
    listener: TcpListener,
    records: Arc<RwLock<Records>>,
}

impl DnsServer {
    /// Binds the server (port 0 picks a free port, the same for both).
    pub async fn bind(addr: SocketAddr, records: Arc<RwLock<Records>>) -> Result<Self, NetError> {
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(|e| NetError::io(std::path::Path::new(&format!("udp {addr}")), e))?;
        let bound = socket
            .local_addr()
            .map_err(|e| NetError::io(std::path::Path::new("dns socket"), e))?;
        let listener = TcpListener::bind(bound)
            .await
            .map_err(|e| NetError::io(std::path::Path::new(&format!("tcp {bound}")), e))?;
        Ok(Self {
            socket,
            listener,
            records,
        })
    }

    /// Binds the server and serves it on a thread of its own, with a
    /// runtime of its own, for the life of the process. Pods' lookups then
    /// never wait behind the node's other work: a busy or blocked worker of
    /// the main runtime (a burst of pod starts on a loaded machine) would
    /// otherwise hold up both the receive task and the reactor that wakes
    /// it, and glibc clients give up on a name after two 5 s timeouts.
    pub fn serve_on_own_thread(
        addr: SocketAddr,
        records: Arc<RwLock<Records>>,
    ) -> Result<SocketAddr, NetError> {
        let io = |what: String| move |e| NetError::io(std::path::Path::new(&what), e);
        let udp = std::net::UdpSocket::bind(addr).map_err(io(format!("udp {addr}")))?;
        let bound = udp.local_addr().map_err(io("dns socket".into()))?;
        let tcp = std::net::TcpListener::bind(bound).map_err(io(format!("tcp {bound}")))?;
        udp.set_nonblocking(true).map_err(io("dns socket".into()))?;
        tcp.set_nonblocking(true).map_err(io("dns socket".into()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("dns runtime".into()))?;
        std::thread::Builder::new()
            .name("evoke-dns".into())
            .spawn(move || {
                runtime.block_on(async move {
                    // Registered with this thread's reactor, not the caller's.
                    let (socket, listener) = match (
                        UdpSocket::from_std(udp),
                        TcpListener::from_std(tcp),
                    ) {
                        (Ok(u), Ok(t)) => (u, t),
                        (Err(e), _) | (_, Err(e)) => {
                            warn!(error = %e, "cluster DNS sockets; pods will not resolve names");
                            return;
                        }
                    };
                    Self {
                        socket,
                        listener,
                        records,
                    }
                    .serve()
                    .await
                })
            })
            .map_err(io("dns thread".into()))?;
        Ok(bound)
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.socket
            .local_addr()
            .map_err(|e| NetError::io(std::path::Path::new("dns socket"), e))
    }

    /// Serves until the task is dropped. A malformed request is logged and
    /// dropped; it never stops the server.
    pub async fn serve(self) {
        let Self {
            socket,
            listener,
            records,
        } = self;
        let tcp_records = records.clone();
        let tcp = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, peer)) => {
                        tokio::spawn(serve_tcp(conn, peer, tcp_records.clone()));
                    }
                    Err(e) => {
                        warn!(error = %e, "dns accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        // The TCP side ends with this task.
        let _abort_tcp = AbortOnDrop(tcp);
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, peer) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "dns receive failed");
                    continue;
                }
            };
            let reply = {
                let records = records.read().unwrap_or_else(|p| p.into_inner());
                respond_udp(&records, &buf[..n])
            };
            match reply {
                Ok(bytes) => {
                    if let Err(e) = socket.send_to(&bytes, peer).await {
                        debug!(%peer, error = %e, "dns reply not sent");
                    }
                }
                Err(e) => debug!(%peer, error = %e, "dns request dropped"),
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One TCP client: two-byte length-prefixed requests, answered in order,
/// until it closes or goes quiet for 10 s.
async fn serve_tcp(mut conn: TcpStream, peer: SocketAddr, records: Arc<RwLock<Records>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let idle = std::time::Duration::from_secs(10);
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, conn.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut req = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if !matches!(
            tokio::time::timeout(idle, conn.read_exact(&mut req)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let reply = {
            let records = records.read().unwrap_or_else(|p| p.into_inner());
            respond(&records, &req)
        };
        let bytes = match reply {
            Ok(b) => b,
            Err(e) => {
                debug!(%peer, error = %e, "dns request dropped");
                return;
            }
        };
        let Ok(n) = u16::try_from(bytes.len()) else {
            debug!(%peer, "dns answer too large for TCP");
            return;
        };
        if conn.write_all(&n.to_be_bytes()).await.is_err() || conn.write_all(&bytes).await.is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn records() -> Records {
        let mut r = Records::default();
        r.upsert(
            "default",
            "kubernetes",
            ServiceRecord {
                cluster_ip: Some(crate::ipam::KUBERNETES_SERVICE_IP),
                endpoints: vec![],
                external_name: None,
            },
        );
        r.upsert(
            "shop",
            "web",
            ServiceRecord {
                cluster_ip: Some(Ipv4Addr::new(10, 43, 0, 20)),
                endpoints: vec![(None, Ipv4Addr::new(10, 42, 0, 5))],
                external_name: None,
            },
        );
        r.upsert(
            "shop",
            "db",
            ServiceRecord {
                cluster_ip: None,
                endpoints: vec![
                    (Some("db-0".into()), Ipv4Addr::new(10, 42, 0, 7)),
                    (Some("db-1".into()), Ipv4Addr::new(10, 42, 1, 8)),
                ],
                external_name: None,
            },
        );
        r
    }

    #[test]
    fn services_resolve_to_cluster_ips_and_headless_ones_to_their_pods() {
        let r = records();
        assert_eq!(
            r.lookup("kubernetes.default.svc.cluster.local."),
            Answer::Addresses(vec![Ipv4Addr::new(10, 43, 0, 1)])
        );
        assert_eq!(
            r.lookup("WEB.shop.svc.cluster.local"),
            Answer::Addresses(vec![Ipv4Addr::new(10, 43, 0, 20)])
        );
        assert_eq!(
            r.lookup("db.shop.svc.cluster.local."),
            Answer::Addresses(vec![
                Ipv4Addr::new(10, 42, 0, 7),
                Ipv4Addr::new(10, 42, 1, 8)
            ])
        );
        assert_eq!(
            r.lookup("db-1.db.shop.svc.cluster.local."),
            Answer::Addresses(vec![Ipv4Addr::new(10, 42, 1, 8)])
        );
        assert_eq!(r.lookup("nope.shop.svc.cluster.local."), Answer::NxDomain);
        assert_eq!(r.lookup("web.shop.cluster.local."), Answer::NxDomain);
        assert_eq!(r.lookup("example.com."), Answer::Refused);
        assert_eq!(r.lookup("web.shop.svc.xcluster.local."), Answer::Refused);
    }

    #[test]
    fn dns_policy_and_config_shape_the_pods_resolv_conf() {
        let dns = crate::ipam::DNS_SERVICE_IP;
        let cluster_first = pod_resolv_conf("shop", dns, CLUSTER_DOMAIN, &PodDns::default(), "");
        assert_eq!(cluster_first, resolv_conf("shop", dns, CLUSTER_DOMAIN));
        let node = "# generated\nnameserver 192.0.2.53\nsearch corp.example\noptions edns0\n";
        let default = PodDns {
            policy: Some("Default".into()),
            ..PodDns::default()
        };
        assert_eq!(
            pod_resolv_conf("shop", dns, CLUSTER_DOMAIN, &default, node),
            "nameserver 192.0.2.53\nsearch corp.example\noptions edns0\n"
        );
        let none = PodDns {
            policy: Some("None".into()),
            nameservers: vec!["192.0.2.1".into()],
            searches: vec!["a.example".into()],
            options: vec![("ndots".into(), Some("2".into())), ("edns0".into(), None)],
        };
        assert_eq!(
            pod_resolv_conf("shop", dns, CLUSTER_DOMAIN, &none, node),
            "nameserver 192.0.2.1\nsearch a.example\noptions ndots:2 edns0\n"
        );
        let merged = PodDns {
            policy: None,
            nameservers: vec!["192.0.2.1".into(), "192.0.2.2".into(), "192.0.2.3".into()],
            searches: vec!["svc.cluster.local".into(), "b.example".into()],
            options: vec![("ndots".into(), Some("1".into()))],
        };
        assert_eq!(
            pod_resolv_conf("shop", dns, CLUSTER_DOMAIN, &merged, node),
            "nameserver 10.43.0.10\nnameserver 192.0.2.1\nnameserver 192.0.2.2\n\
             search shop.svc.cluster.local svc.cluster.local cluster.local b.example\n\
             options ndots:1\n"
        );
    }

    #[test]
    fn another_cluster_domain_answers_only_under_itself() {
        let mut r = Records::new("corp.internal.");
        r.upsert(
            "shop",
            "web",
            ServiceRecord {
                cluster_ip: Some(Ipv4Addr::new(10, 43, 0, 20)),
                endpoints: vec![],
                external_name: None,
            },
        );
        assert_eq!(
            r.lookup("web.shop.svc.corp.internal."),
            Answer::Addresses(vec![Ipv4Addr::new(10, 43, 0, 20)])
        );
        assert_eq!(r.lookup("web.shop.svc.cluster.local."), Answer::Refused);
        assert!(
            resolv_conf("shop", crate::ipam::DNS_SERVICE_IP, "corp.internal")
                .contains("search shop.svc.corp.internal svc.corp.internal corp.internal\n")
        );
    }

    #[test]
    fn the_search_path_turns_short_names_into_service_names() {
        let conf = resolv_conf("shop", crate::ipam::DNS_SERVICE_IP, CLUSTER_DOMAIN);
        assert!(conf.contains("nameserver 10.43.0.10\n"));
        assert!(conf.contains("search shop.svc.cluster.local svc.cluster.local cluster.local\n"));
        assert!(conf.contains("options ndots:5"));
        // What a resolver does with it: append each search domain in turn.
        let r = records();
        let search = [
            "shop.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
        ];
        let first_hit = |short: &str| {
            search
                .iter()
                .find_map(|d| match r.lookup(&format!("{short}.{d}")) {
                    Answer::Addresses(a) if !a.is_empty() => Some(a),
                    _ => None,
                })
        };
        assert_eq!(first_hit("web"), Some(vec![Ipv4Addr::new(10, 43, 0, 20)]));
        assert_eq!(
            first_hit("kubernetes.default"),
            Some(vec![Ipv4Addr::new(10, 43, 0, 1)])
        );
        assert_eq!(
            first_hit("web.shop"),
            Some(vec![Ipv4Addr::new(10, 43, 0, 20)])
        );
    }

    #[test]
    fn garbage_requests_are_errors_not_panics() {
        let r = records();
        assert!(respond(&r, b"").is_err());
        assert!(respond(&r, &[0xff; 7]).is_err());
    }

    #[test]
    fn the_server_on_its_own_thread_answers_while_the_callers_runtime_is_blocked() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let records = Arc::new(RwLock::new(records()));
        rt.block_on(async {
            let addr = DnsServer::serve_on_own_thread(
                "127.0.0.1:0".parse().expect("addr"),
                records.clone(),
            )
            .expect("serve");
            // This runtime's only worker is now stuck in blocking code: a
            // server driven by it could not answer.
            let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("client");
            client
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .expect("timeout");
            let mut m = Message::query();
            m.add_query(Query::query(
                Name::from_ascii("web.shop.svc.cluster.local.").expect("name"),
                RecordType::A,
            ));
            client
                .send_to(&m.to_vec().expect("encode"), addr)
                .expect("send");
            let mut buf = [0u8; 512];
            let n = client.recv(&mut buf).expect("an answer within 5 s");
            let resp = Message::from_vec(&buf[..n]).expect("decode");
            assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
            assert_eq!(resp.answers.len(), 1);
        });
    }

    #[tokio::test]
    async fn the_server_answers_a_queries_over_udp() {
        let records = Arc::new(RwLock::new(records()));
        let server = DnsServer::bind("127.0.0.1:0".parse().expect("addr"), records.clone())
            .await
            .expect("bind");
        let addr = server.local_addr().expect("addr");
        let task = tokio::spawn(server.serve());
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        let ask = |name: &str| {
            let mut m = Message::query();
            m.metadata.recursion_desired = true;
            m.add_query(Query::query(
                Name::from_ascii(name).expect("name"),
                RecordType::A,
            ));
            m.to_vec().expect("encode")
        };
        let mut buf = vec![0u8; 4096];
        for (name, want_code, want) in [
            (
                "web.shop.svc.cluster.local.",
                ResponseCode::NoError,
                vec![Ipv4Addr::new(10, 43, 0, 20)],
            ),
            (
                "gone.shop.svc.cluster.local.",
                ResponseCode::NXDomain,
                vec![],
            ),
        ] {
            client.send_to(&ask(name), addr).await.expect("send");
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), client.recv(&mut buf))
                .await
                .expect("answer in time")
                .expect("recv");
            let resp = Message::from_vec(&buf[..n]).expect("decode");
            assert_eq!(resp.metadata.response_code, want_code, "{name}");
            let got: Vec<Ipv4Addr> = resp
                .answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect();
            assert_eq!(got, want, "{name}");
        }
        // A Service removed from the records stops resolving.
        records.write().expect("lock").remove("shop", "web");
        client
            .send_to(&ask("web.shop.svc.cluster.local."), addr)
            .await
            .expect("send");
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), client.recv(&mut buf))
            .await
            .expect("answer in time")
            .expect("recv");
        let resp = Message::from_vec(&buf[..n]).expect("decode");
        assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain);
        task.abort();
    }

    #[tokio::test]
    async fn an_answer_too_large_for_udp_is_truncated_and_whole_over_tcp() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut r = records();
        r.upsert(
            "shop",
            "big",
            ServiceRecord {
                cluster_ip: None,
                endpoints: (0..60u8)
                    .map(|i| (None, Ipv4Addr::new(10, 42, 9, i + 1)))
                    .collect(),
                external_name: None,
            },
        );
        let server = DnsServer::bind(
            "127.0.0.1:0".parse().expect("addr"),
            Arc::new(RwLock::new(r)),
        )
        .await
        .expect("bind");
        let addr = server.local_addr().expect("addr");
        let task = tokio::spawn(server.serve());
        let mut m = Message::query();
        m.add_query(Query::query(
            Name::from_ascii("big.shop.svc.cluster.local.").expect("name"),
            RecordType::A,
        ));
        let ask = m.to_vec().expect("encode");
        let a_records = |resp: &Message| {
            resp.answers
                .iter()
                .filter(|r| matches!(r.data, RData::A(_)))
                .count()
        };

        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        udp.send_to(&ask, addr).await.expect("send");
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), udp.recv(&mut buf))
            .await
            .expect("answer in time")
            .expect("recv");
        assert!(n <= 512, "a UDP answer fits 512 bytes: {n}");
        let resp = Message::from_vec(&buf[..n]).expect("decode");
        assert!(resp.metadata.truncation, "TC set");
        assert_eq!(a_records(&resp), 0);

        let mut tcp = TcpStream::connect(addr).await.expect("tcp");
        let len = u16::try_from(ask.len()).expect("len");
        tcp.write_all(&len.to_be_bytes()).await.expect("len");
        tcp.write_all(&ask).await.expect("query");
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len).await.expect("answer length");
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tcp.read_exact(&mut body).await.expect("answer");
        let resp = Message::from_vec(&body).expect("decode");
        assert!(!resp.metadata.truncation);
        assert_eq!(a_records(&resp), 60, "every pod over TCP");
        task.abort();
    }

    #[test]
    fn external_name_services_answer_a_cname_and_chase_it_inside_the_cluster() {
        let mut r = records();
        for (name, target) in [
            ("alias", "web.shop.svc.cluster.local"),
            ("out", "db.example.com."),
        ] {
            r.upsert(
                "shop",
                name,
                ServiceRecord {
                    cluster_ip: None,
                    endpoints: vec![],
                    external_name: Some(target.into()),
                },
            );
        }
        assert_eq!(
            r.lookup("out.shop.svc.cluster.local."),
            Answer::Alias("db.example.com".into())
        );
        let ask = |name: &str| {
            let mut m = Message::query();
            m.add_query(Query::query(
                Name::from_ascii(name).expect("name"),
                RecordType::A,
            ));
            let resp = respond(&r, &m.to_vec().expect("encode")).expect("respond");
            Message::from_vec(&resp).expect("decode")
        };
        let resp = ask("alias.shop.svc.cluster.local.");
        let data: Vec<String> = resp.answers.iter().map(|a| a.data.to_string()).collect();
        assert_eq!(
            data,
            vec![
                "web.shop.svc.cluster.local.".to_string(),
                "10.43.0.20".to_string()
            ]
        );
        let resp = ask("out.shop.svc.cluster.local.");
        let data: Vec<String> = resp.answers.iter().map(|a| a.data.to_string()).collect();
        assert_eq!(data, vec!["db.example.com.".to_string()]);
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    }
}
