//! The pod network as `evoke server` and `evoke agent` run it, k3s style.
//!
//! The server hands every Node a /24 of the cluster CIDR in
//! `spec.podCIDR` ([`run_pod_cidr_allocator`], the job of kube's node IPAM
//! controller). Each node agent runs a [`NodeNetwork`]: it waits for its
//! Node's podCIDR, then brings up the bridge, serves cluster DNS on the
//! cluster DNS address, programs Services through the
//! [`ServiceProxy`](crate::proxy::ServiceProxy) and routes the other nodes'
//! pod subnets via their node addresses (flannel's host-gw). Until the
//! subnet is known, pod setup waits, as a kubelet waits for its CNI.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use evoke_node::network::{PodNet, PodNetwork as NodePodNetwork};
use evoke_node::NodeError;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::dns::{pod_resolv_conf, resolv_conf, DnsServer, PodDns, Records};
use crate::ipam::{allocate_node_subnet, Ipv4Net};
use crate::nft::Proxy;
use crate::node::BridgeNetwork;
use crate::podnet::PodNetConfig;
use crate::proxy::ServiceProxy;
use crate::NetError;

/// How long pod setup waits for the node's network to come up before it
/// reports the pod's network as not ready (the agent retries later).
const SETUP_WAIT: Duration = Duration::from_secs(60);

/// Pre-made pod sandboxes kept ready by default (`--pod-sandbox-pool`; 0
/// disables the pool). A few cover pods that arrive one by one; a burst
/// empties the pool after its first pods whatever its size.
pub const DEFAULT_SANDBOX_POOL: usize = 4;

/// How long no pod set-up or teardown must have run before the pool makes
/// a sandbox: at Kubernetes' density-test pace of 10 pods/s the pool
/// refills in the gaps between pods.
const POOL_IDLE: Duration = Duration::from_millis(50);

/// What a node's network needs to know about the cluster.
#[derive(Debug, Clone)]
pub struct ClusterNetConfig {
    /// The node's data directory (IPAM state, pod resolv.conf files).
    pub data_dir: PathBuf,
    /// The Node this agent registers.
    pub node_name: String,
    /// `--cluster-cidr`: every pod address is in it (10.42.0.0/16).
    pub cluster_cidr: Ipv4Net,
    /// `--service-cidr`: every ClusterIP is in it (10.43.0.0/16).
    pub service_cidr: Ipv4Net,
    /// `--cluster-dns`: where pods send DNS queries (10.43.0.10).
    pub cluster_dns: Ipv4Addr,
    /// `--cluster-domain` (cluster.local).
    pub cluster_domain: String,
    /// `--pod-sandbox-pool`: pre-made pod sandboxes kept ready.
    pub sandbox_pool: usize,
}

/// Where the node's network is in its start-up.
enum State {
    /// The Node has no podCIDR yet, or the bridge is being made.
    Waiting,
    /// Pods can be attached.
    Ready(Arc<BridgeNetwork>),
    /// Bringing the network up failed; pods report this.
    Failed(String),
}

/// A node's pod network: the bridge once its subnet is known, cluster DNS
/// and the ServiceProxy. Implements the node agent's network seam.
pub struct NodeNetwork {
    cfg: ClusterNetConfig,
    state: Mutex<State>,
    changed: Condvar,
}

impl NodeNetwork {
    /// A network waiting for [`NodeNetwork::run`] to bring it up.
    pub fn new(cfg: ClusterNetConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            state: Mutex::new(State::Waiting),
            changed: Condvar::new(),
        })
    }

    fn set(&self, s: State) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
        self.changed.notify_all();
    }

    /// Waits (bounded) for the bridge; called from blocking threads.
    fn bridge(&self) -> Result<Arc<BridgeNetwork>, NodeError> {
        let guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, SETUP_WAIT, |s| matches!(s, State::Waiting))
            .unwrap_or_else(|p| p.into_inner());
        match &*guard {
            State::Ready(b) => Ok(b.clone()),
            State::Failed(m) => Err(NodeError::Network(m.clone())),
            State::Waiting => Err(NodeError::Network(format!(
                "node {} has no podCIDR yet: the pod network is not ready",
                self.cfg.node_name
            ))),
        }
    }

    fn resolv_path(&self, pod_uid: &str) -> PathBuf {
        self.cfg
            .data_dir
            .join("net")
            .join("resolv")
            .join(format!("{pod_uid}.conf"))
    }

    /// A veth pod with the resolv.conf its DNS settings ask for.
    fn attach(
        &self,
        pod_uid: &str,
        namespace: &str,
        name: &str,
        dns: &PodDns,
    ) -> Result<PodNet, NodeError> {
        let bridge = self.bridge()?;
        let mut net = bridge.setup(pod_uid, namespace, name)?;
        let node_conf = if dns.policy.as_deref() == Some("Default") {
            std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
        } else {
            String::new()
        };
        let conf = pod_resolv_conf(
            namespace,
            self.cfg.cluster_dns,
            &self.cfg.cluster_domain,
            dns,
            &node_conf,
        );
        let path = self.resolv_path(pod_uid);
        let io = |e| NodeError::Io {
            path: path.clone(),
            source: e,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        std::fs::write(&path, conf).map_err(io)?;
        net.mounts.push(evoke_runtime::Mount {
            host_path: path.clone(),
            container_path: PathBuf::from("/etc/resolv.conf"),
            read_only: true,
        });
        Ok(net)
    }

    /// Brings the network up and keeps Services, DNS and routes to the other
    /// nodes level with the API. Returns only if start-up fails.
    pub async fn run(self: Arc<Self>, client: Client) -> Result<(), NetError> {
        match self.bring_up(client.clone()).await {
            Ok(bridge) => {
                self.set(State::Ready(bridge.clone()));
                route_other_nodes(client, self.cfg.node_name.clone(), bridge).await;
                Ok(())
            }
            Err(e) => {
                self.set(State::Failed(format!("pod network: {e}")));
                Err(e)
            }
        }
    }

    async fn bring_up(&self, client: Client) -> Result<Arc<BridgeNetwork>, NetError> {
        let subnet = wait_for_pod_cidr(&client, &self.cfg.node_name).await?;
        if !self.cfg.cluster_cidr.contains(subnet.network()) {
            warn!(%subnet, cluster_cidr = %self.cfg.cluster_cidr, "the node's podCIDR is outside --cluster-cidr");
        }
        let mut pcfg = PodNetConfig::new(&self.cfg.data_dir, subnet);
        pcfg.service_cidr = Some(self.cfg.service_cidr);
        let bridge = blocking(move || BridgeNetwork::new(pcfg)).await?;
        bridge.start_pool(self.cfg.sandbox_pool, POOL_IDLE);
        let bridge = Arc::new(bridge);
        let dns_ip = self.cfg.cluster_dns;
        let b = bridge.clone();
        blocking(move || b.add_bridge_address(dns_ip)).await?;

        let records = Arc::new(RwLock::new(Records::new(&self.cfg.cluster_domain)));
        // A DNS server that cannot bind (another one holds port 53 on every
        // address) costs the pods their names, not their network.
        if let Err(e) =
            DnsServer::serve_on_own_thread(SocketAddr::from((dns_ip, 53)), records.clone())
        {
            tracing::error!(error = %e, dns = %dns_ip, "cluster DNS not served; pods will not resolve names");
        }
        let cluster = self.cfg.cluster_cidr;
        let proxy = blocking(move || Proxy::new(None, cluster)).await?;
        tokio::spawn(
            ServiceProxy::new(proxy, records)
                .serve_locally(dns_ip)
                .run(client),
        );
        info!(node = %self.cfg.node_name, %subnet, dns = %dns_ip, sandbox_pool = self.cfg.sandbox_pool, "node network up: bridge, cluster DNS and service proxy");
        Ok(bridge)
    }
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, NetError> + Send + 'static,
) -> Result<R, NetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NetError::BadInput(format!("network set-up thread: {e}")))?
}

impl NodePodNetwork for NodeNetwork {
    fn setup(&self, pod_uid: &str, namespace: &str, name: &str) -> Result<PodNet, NodeError> {
        self.attach(pod_uid, namespace, name, &PodDns::default())
    }

    fn setup_pod(&self, pod: &k8s_openapi::api::core::v1::Pod) -> Result<PodNet, NodeError> {
        let spec = pod.spec.as_ref();
        let config = spec.and_then(|s| s.dns_config.as_ref());
        let dns = PodDns {
            policy: spec.and_then(|s| s.dns_policy.clone()),
            nameservers: config
                .and_then(|c| c.nameservers.clone())
                .unwrap_or_default(),
            searches: config.and_then(|c| c.searches.clone()).unwrap_or_default(),
            options: config
                .and_then(|c| c.options.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|o| Some((o.name.clone()?, o.value.clone())))
                .collect(),
        };
        self.attach(
            pod.metadata.uid.as_deref().unwrap_or_default(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default(),
            &dns,
        )
    }

    fn setup_vm(
        &self,
        pod_uid: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<evoke_runtime::GuestNetwork>, NodeError> {
        let mut net = self.bridge()?.setup_vm(pod_uid, namespace, name)?;
        if let Some(n) = &mut net {
            n.resolv_conf = Some(resolv_conf(
                namespace,
                self.cfg.cluster_dns,
                &self.cfg.cluster_domain,
            ));
        }
        Ok(net)
    }

    fn teardown(&self, pod_uid: &str) -> Result<(), NodeError> {
        if pod_uid.is_empty() || pod_uid.contains('/') {
            return Err(NodeError::Network(format!("bad pod uid {pod_uid:?}")));
        }
        let path = self.resolv_path(pod_uid);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(NodeError::Io { path, source }),
        }
        self.bridge()?.teardown(pod_uid)
    }
}

/// Polls the Node until the server has given it a podCIDR (the agent
/// registers the Node concurrently, so it may not exist yet).
async fn wait_for_pod_cidr(client: &Client, node: &str) -> Result<Ipv4Net, NetError> {
    let api: Api<Node> = Api::all(client.clone());
    let mut said = false;
    loop {
        match api.get_opt(node).await {
            Ok(Some(n)) => {
                if let Some(cidr) = n.spec.and_then(|s| s.pod_cidr) {
                    return cidr.parse();
                }
            }
            Ok(None) => {}
            Err(e) => warn!(%node, error = %e, "reading the node for its podCIDR"),
        }
        if !said {
            info!(%node, "waiting for the server to assign this node's podCIDR");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn internal_ip(n: &Node) -> Option<Ipv4Addr> {
    n.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")?
        .address
        .parse()
        .ok()
}

/// The routes to change so that every other node's podCIDR goes via its
/// InternalIP, given the routes made so far: (to add or move, to delete).
pub fn plan_routes(
    me: &str,
    nodes: &[Node],
    routed: &HashMap<Ipv4Net, Ipv4Addr>,
) -> (Vec<(Ipv4Net, Ipv4Addr)>, Vec<Ipv4Net>) {
    let mut want: HashMap<Ipv4Net, Ipv4Addr> = HashMap::new();
    for n in nodes {
        if n.metadata.name.as_deref() == Some(me) {
            continue;
        }
        let cidr = n
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.as_deref())
            .and_then(|c| c.parse::<Ipv4Net>().ok());
        if let (Some(cidr), Some(via)) = (cidr, internal_ip(n)) {
            want.insert(cidr, via);
        }
    }
    let mut add: Vec<(Ipv4Net, Ipv4Addr)> = want
        .iter()
        .filter(|(c, v)| routed.get(c) != Some(v))
        .map(|(c, v)| (*c, *v))
        .collect();
    add.sort();
    let mut remove: Vec<Ipv4Net> = routed
        .keys()
        .filter(|c| !want.contains_key(c))
        .copied()
        .collect();
    remove.sort();
    (add, remove)
}

/// Routes every other node's podCIDR via its InternalIP, following Node
/// changes (flannel's host-gw backend: nodes share one L2/L3 network); a
/// node that leaves loses its route.
async fn route_other_nodes(client: Client, me: String, bridge: Arc<BridgeNetwork>) {
    let (store, writer) = reflector::store::<Node>();
    let events = reflector(
        writer,
        watcher(Api::<Node>::all(client), watcher::Config::default()),
    )
    .default_backoff();
    let mut events = std::pin::pin!(events);
    let mut routed: HashMap<Ipv4Net, Ipv4Addr> = HashMap::new();
    // Every event, including the end of a (re)list when the store fills.
    while events.next().await.is_some() {
        let nodes: Vec<Node> = store.state().iter().map(|n| (**n).clone()).collect();
        let (add, remove) = plan_routes(&me, &nodes, &routed);
        for (cidr, via) in add {
            let b = bridge.clone();
            match blocking(move || b.route_via(cidr, via)).await {
                Ok(()) => {
                    info!(%cidr, %via, "route to another node's pods");
                    routed.insert(cidr, via);
                }
                Err(e) => warn!(%cidr, %via, error = %e, "cannot route another node's pods"),
            }
        }
        for cidr in remove {
            let b = bridge.clone();
            match blocking(move || b.delete_route(cidr)).await {
                Ok(()) => {
                    info!(%cidr, "route to a node that left removed");
                    routed.remove(&cidr);
                }
                Err(e) => warn!(%cidr, error = %e, "cannot remove a route"),
            }
        }
    }
}

/// The `kube-dns` Service in kube-system at the cluster DNS address, as
/// k3s has it: it names the DNS in `kubectl get svc -A` and keeps its
/// address from being handed to another Service. Every node answers on the
/// address itself (see [`ServiceProxy::serve_locally`]). Retries while the
/// API settles; an existing Service is left as it is.
pub async fn ensure_dns_service(client: Client, dns: Ipv4Addr) {
    let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client, "kube-system");
    let svc: k8s_openapi::api::core::v1::Service = match serde_json::from_value(serde_json::json!({
        "metadata": {"name": "kube-dns", "namespace": "kube-system",
            "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}},
        "spec": {"clusterIP": dns.to_string(), "clusterIPs": [dns.to_string()],
            "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                      {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]},
    })) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "kube-dns service object");
            return;
        }
    };
    for attempt in 0..30 {
        match api.create(&kube::api::PostParams::default(), &svc).await {
            Ok(_) => {
                info!(%dns, "created the kube-dns service");
                return;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => return,
            Err(e) if attempt == 29 => warn!(error = %e, "cannot create the kube-dns service"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// The subnets to give Nodes without one, given all Nodes and what this
/// allocator handed out already (its patches may not be in `nodes` yet).
pub fn plan_pod_cidrs(
    cluster: Ipv4Net,
    nodes: &[Node],
    assigned: &BTreeMap<String, Ipv4Net>,
) -> Result<Vec<(String, Ipv4Net)>, NetError> {
    let mut taken: Vec<Ipv4Net> = assigned.values().copied().collect();
    let mut missing = Vec::new();
    for n in nodes {
        let name = n.metadata.name.clone().unwrap_or_default();
        match n.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()) {
            Some(c) => {
                if let Ok(net) = c.parse::<Ipv4Net>() {
                    taken.push(net);
                }
            }
            None if !assigned.contains_key(&name) && !name.is_empty() => missing.push(name),
            None => {}
        }
    }
    missing.sort();
    let mut out = Vec::new();
    for name in missing {
        let net = allocate_node_subnet(cluster, &taken)?;
        taken.push(net);
        out.push((name, net));
    }
    Ok(out)
}

/// The server's node IPAM: gives every Node without one a /24 of
/// `cluster` in spec.podCIDR(s). Runs until the watch ends.
pub async fn run_pod_cidr_allocator(client: Client, cluster: Ipv4Net) {
    let api: Api<Node> = Api::all(client);
    let (store, writer) = reflector::store::<Node>();
    let events =
        reflector(writer, watcher(api.clone(), watcher::Config::default())).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut assigned: BTreeMap<String, Ipv4Net> = BTreeMap::new();
    // Every event, including the end of a (re)list when the store fills.
    while events.next().await.is_some() {
        let nodes: Vec<Node> = store.state().iter().map(|n| (**n).clone()).collect();
        // Forget nodes that are gone, so their subnets can be reused.
        assigned.retain(|name, _| {
            nodes
                .iter()
                .any(|n| n.metadata.name.as_deref() == Some(name.as_str()))
        });
        let plan = match plan_pod_cidrs(cluster, &nodes, &assigned) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot give nodes a podCIDR");
                continue;
            }
        };
        for (name, net) in plan {
            let patch = serde_json::json!({"spec": {"podCIDR": net.to_string(), "podCIDRs": [net.to_string()]}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    info!(node = %name, pod_cidr = %net, "node podCIDR assigned");
                    assigned.insert(name, net);
                }
                Err(e) => warn!(node = %name, error = %e, "cannot set the node's podCIDR"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: Option<&str>) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": cidr.map(|c| serde_json::json!({"podCIDR": c})).unwrap_or_default(),
        }))
        .expect("node")
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("cidr")
    }

    #[test]
    fn nodes_without_a_pod_cidr_get_the_next_free_slash_24() {
        let nodes = [
            node("b", None),
            node("a", Some("10.42.0.0/24")),
            node("c", None),
        ];
        let plan = plan_pod_cidrs(net("10.42.0.0/16"), &nodes, &BTreeMap::new()).expect("plan");
        assert_eq!(
            plan,
            vec![
                ("b".to_string(), net("10.42.1.0/24")),
                ("c".to_string(), net("10.42.2.0/24")),
            ]
        );
    }

    #[test]
    fn a_subnet_handed_out_but_not_yet_seen_is_neither_reassigned_nor_reused() {
        let nodes = [node("a", None), node("b", None)];
        let assigned = BTreeMap::from([("a".to_string(), net("10.42.0.0/24"))]);
        let plan = plan_pod_cidrs(net("10.42.0.0/16"), &nodes, &assigned).expect("plan");
        assert_eq!(plan, vec![("b".to_string(), net("10.42.1.0/24"))]);
    }

    #[test]
    fn a_full_cluster_cidr_is_an_error() {
        let nodes = [node("a", Some("10.42.0.0/24")), node("b", None)];
        assert!(plan_pod_cidrs(net("10.42.0.0/24"), &nodes, &BTreeMap::new()).is_err());
    }

    fn node_at(name: &str, cidr: &str, ip: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
        }))
        .expect("node")
    }

    #[test]
    fn other_nodes_subnets_are_routed_via_their_address_and_unrouted_when_they_leave() {
        let nodes = [
            node_at("me", "10.42.0.0/24", "192.168.1.1"),
            node_at("b", "10.42.1.0/24", "192.168.1.2"),
            node_at("c", "10.42.2.0/24", "192.168.1.3"),
        ];
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
        let (add, remove) = plan_routes("me", &nodes, &HashMap::new());
        assert_eq!(
            add,
            vec![
                (net("10.42.1.0/24"), ip("192.168.1.2")),
                (net("10.42.2.0/24"), ip("192.168.1.3")),
            ]
        );
        assert!(remove.is_empty());
        // c left, b moved to another address.
        let routed: HashMap<Ipv4Net, Ipv4Addr> = add.into_iter().collect();
        let nodes = [
            node_at("me", "10.42.0.0/24", "192.168.1.1"),
            node_at("b", "10.42.1.0/24", "192.168.1.9"),
        ];
        let (add, remove) = plan_routes("me", &nodes, &routed);
        assert_eq!(add, vec![(net("10.42.1.0/24"), ip("192.168.1.9"))]);
        assert_eq!(remove, vec![net("10.42.2.0/24")]);
    }
}
