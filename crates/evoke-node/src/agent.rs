//! The agent: registers the Node, keeps its Lease fresh, watches the pods
//! bound to it and gives each one a [`Worker`]. After a restart it finds
//! the workloads the previous run started (by their labels) and hands them
//! to the pods' workers, so nothing runs twice and nothing is lost.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use evoke_runtime::{WorkloadRuntime, WorkloadStatus};
use evoke_scheduler::events::Recorder;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use crate::network::PodNetwork;
use crate::node::{self, Machine, LEASE_NAMESPACE, LEASE_RENEW_SECS};
use crate::spec::LABEL_POD_UID;
use crate::worker::{remove_pod_workloads, Worker};
use crate::NodeError;

/// How to run the agent.
pub struct AgentConfig {
    pub node_name: String,
    /// The address other nodes and the API server reach this node at.
    pub host_ip: String,
    /// Where pod directories (volumes, logs) live: `<data_dir>/pods/<uid>`.
    pub data_dir: PathBuf,
    /// The tiers this node offers, by name; unavailable ones are kept so
    /// that pods asking for them get a clear reason.
    pub tiers: Vec<Arc<dyn WorkloadRuntime>>,
    /// The tier for pods without runtimeClassName.
    pub default_tier: String,
    pub network: Arc<dyn PodNetwork>,
    /// Extra node labels (e.g. the control-plane role).
    pub labels: BTreeMap<String, String>,
    /// Where the node endpoint (logs) listens, e.g. `0.0.0.0:10250`; port
    /// 0 picks a free one. The bound port is reported in the Node.
    pub listen: String,
    /// The node endpoint's serving certificate (issued at join) and the
    /// CA its callers' certificates must come from.
    pub endpoint_tls: crate::server::EndpointTls,
}

/// State shared by the agent and its workers.
pub struct Ctx {
    pub client: Client,
    pub node_name: String,
    pub host_ip: String,
    pub data_dir: PathBuf,
    pub tiers: HashMap<String, Arc<dyn WorkloadRuntime>>,
    pub default_tier: String,
    pub network: Arc<dyn PodNetwork>,
    pub recorder: Recorder,
    /// namespace/name -> uid of the pods this node runs (for the endpoint).
    pub pods: crate::server::PodIndex,
    /// Pod sandboxes and container starts in progress at once. Starting a
    /// container is CPU-bound (clone, mounts, cgroups, exec); a burst of 100
    /// at once on a small node only makes each one slower and parks a
    /// thread per start. A fair (FIFO) queue lets pods finish in arrival
    /// order instead of all at the end.
    pub start_slots: Arc<tokio::sync::Semaphore>,
    /// Reaps in progress at once: when 100 containers end together (a mass
    /// deletion), their exits are collected by a few threads, not 100.
    /// Separate from `start_slots`, since a stop waits on its reap.
    pub reap_slots: Arc<tokio::sync::Semaphore>,
    /// When each tier last answered `available()` with yes: the check reads
    /// /proc/self/mountinfo, which grows with every running container, so a
    /// burst of pods shares one recent answer.
    available: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

/// How long a tier's "available" answer is reused.
const AVAILABLE_TTL: Duration = Duration::from_secs(10);

impl Ctx {
    /// The tier's `available()`, reusing a yes from the last few seconds.
    pub async fn tier_available(
        &self,
        tier: &Arc<dyn WorkloadRuntime>,
    ) -> Result<(), evoke_runtime::RuntimeError> {
        let name = tier.name().to_string();
        let fresh = self
            .available
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .is_some_and(|t| t.elapsed() < AVAILABLE_TTL);
        if fresh {
            return Ok(());
        }
        let t = tier.clone();
        tokio::task::spawn_blocking(move || t.available())
            .await
            .unwrap_or_else(|e| {
                Err(evoke_runtime::RuntimeError::InvalidSpec(format!(
                    "availability check panicked: {e}"
                )))
            })?;
        self.available
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, std::time::Instant::now());
        Ok(())
    }

    pub fn tier_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tiers.keys().cloned().collect();
        v.sort();
        v
    }
}

/// Container starts in flight at once: two per core, so one start's
/// waits (fsync, netlink, exec) overlap another's CPU work.
/// `EVOKE_START_PARALLELISM` overrides it (for measuring).
fn start_parallelism() -> usize {
    std::env::var("EVOKE_START_PARALLELISM")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()) * 2)
}

/// The node agent. Build with [`Agent::new`], then [`Agent::run`].
pub struct Agent {
    ctx: Arc<Ctx>,
    labels: BTreeMap<String, String>,
    listen: String,
    endpoint_tls: crate::server::EndpointTls,
    port: u16,
}

/// A best guess at this machine's address: the source address of the
/// default route, or loopback.
pub fn detect_host_ip() -> String {
    // Connecting a UDP socket sends nothing; it only picks a route.
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "127.0.0.1".into())
}

impl Agent {
    pub fn new(client: Client, cfg: AgentConfig) -> Agent {
        let recorder = Recorder::new(client.clone(), "kubelet", Some(&cfg.node_name));
        let tiers = cfg
            .tiers
            .into_iter()
            .map(|t| (t.name().to_string(), t))
            .collect();
        Agent {
            ctx: Arc::new(Ctx {
                client,
                node_name: cfg.node_name,
                host_ip: cfg.host_ip,
                data_dir: cfg.data_dir,
                tiers,
                default_tier: cfg.default_tier,
                network: cfg.network,
                recorder,
                pods: Default::default(),
                start_slots: Arc::new(tokio::sync::Semaphore::new(start_parallelism())),
                reap_slots: Arc::new(tokio::sync::Semaphore::new(start_parallelism())),
                available: Default::default(),
            }),
            labels: cfg.labels,
            listen: cfg.listen,
            endpoint_tls: cfg.endpoint_tls,
            port: 0,
        }
    }

    /// Creates or refreshes the Node object; returns its uid.
    pub async fn register(&self) -> Result<Option<String>, NodeError> {
        register_node(&self.ctx, &self.labels, self.port).await
    }

    /// Renews the Lease every 10 s and the Ready heartbeat every 40 s; a
    /// Node object deleted meanwhile is registered again (`labels`, `port`),
    /// as the kubelet does.
    async fn heartbeat(
        ctx: Arc<Ctx>,
        mut node_uid: Option<String>,
        labels: BTreeMap<String, String>,
        port: u16,
    ) {
        let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NAMESPACE);
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        let name = ctx.node_name.clone();
        let ns_api: Api<Namespace> = Api::all(ctx.client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(LEASE_NAMESPACE.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let _ = ns_api.create(&PostParams::default(), &ns).await;
        let mut tick = 0u64;
        loop {
            if let Ok(None) = nodes.get_opt(&name).await {
                tracing::warn!(node = %name, "the node object was deleted; registering it again");
                match register_node(&ctx, &labels, port).await {
                    Ok(uid) => node_uid = uid,
                    Err(e) => {
                        tracing::warn!(node = %name, error = %e, "node re-registration failed")
                    }
                }
            }
            let lease = node::lease(&name, node_uid.as_deref());
            let res = match leases.get_opt(&name).await {
                Ok(Some(mut cur)) => {
                    cur.spec = lease.spec.clone();
                    // A re-registered Node has a new uid.
                    cur.metadata.owner_references = lease.metadata.owner_references.clone();
                    leases
                        .replace(&name, &PostParams::default(), &cur)
                        .await
                        .map(|_| ())
                }
                Ok(None) => leases
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                tracing::warn!(node = %name, error = %e, "lease renewal failed");
            }
            // The Ready condition's heartbeat every 40 s, as the kubelet's
            // nodeStatusReportFrequency does when nothing changes.
            if tick.is_multiple_of(4) {
                let now = Time(k8s_openapi::jiff::Timestamp::now());
                let patch = serde_json::json!({"status": {"conditions": node::conditions(&now)}});
                if let Err(e) = nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    tracing::warn!(node = %name, error = %e, "node status heartbeat failed");
                }
            }
            tick += 1;
            tokio::time::sleep(Duration::from_secs(LEASE_RENEW_SECS)).await;
        }
    }

    /// Every workload on this node, grouped by pod uid.
    async fn existing_workloads(&self) -> HashMap<String, Vec<WorkloadStatus>> {
        let mut out: HashMap<String, Vec<WorkloadStatus>> = HashMap::new();
        for tier in self.ctx.tiers.values() {
            let t = tier.clone();
            let list = tokio::task::spawn_blocking(move || {
                if t.available().is_ok() {
                    t.list()
                } else {
                    Ok(Vec::new())
                }
            })
            .await;
            match list {
                Ok(Ok(list)) => {
                    for w in list {
                        if let Some(uid) = w.labels.get(LABEL_POD_UID).cloned() {
                            out.entry(uid).or_default().push(w);
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(tier = %tier.name(), error = %e, "could not list workloads")
                }
                Err(e) => {
                    tracing::warn!(tier = %tier.name(), error = %e, "listing workloads panicked")
                }
            }
        }
        out
    }

    /// Runs forever: registration, heartbeat, pod workers.
    pub async fn run(mut self) -> Result<(), NodeError> {
        // Each pod's directories (its logs, the tiers' per-workload trees)
        // in block groups of their own: see spread.rs.
        for sub in ["pods", "containers", "processes"] {
            let dir = self.ctx.data_dir.join(sub);
            match crate::spread::spread_subdirectories(&dir) {
                Ok(applied) => {
                    tracing::debug!(dir = %dir.display(), applied, "subdirectories spread")
                }
                Err(e) => tracing::warn!(error = %e, "could not mark a pod directory root"),
            }
        }
        self.port = crate::server::serve(
            &self.listen,
            self.ctx.data_dir.clone(),
            &self.endpoint_tls,
            self.ctx.pods.clone(),
            self.ctx.tiers.clone(),
        )
        .await?;
        tracing::info!(port = self.port, "node endpoint listening");
        let node_uid = loop {
            match self.register().await {
                Ok(uid) => break uid,
                Err(e) => {
                    tracing::warn!(error = %e, "node registration failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        };
        tokio::spawn(Self::heartbeat(
            self.ctx.clone(),
            node_uid,
            self.labels.clone(),
            self.port,
        ));
        let mut leftovers = self.existing_workloads().await;
        tracing::info!(node = %self.ctx.node_name, pods_with_workloads = leftovers.len(), "agent watching pods");

        let pods: Api<Pod> = Api::all(self.ctx.client.clone());
        let cfg =
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.ctx.node_name));
        // Each worker keeps its pod for the pod's life: without managedFields
        // (no one here reads them; parsed, they are about a third of a pod).
        let mut events = watcher(pods, cfg)
            .default_backoff()
            .modify(|p: &mut Pod| p.metadata.managed_fields = None)
            .boxed();
        let mut workers: HashMap<String, watch::Sender<Option<Arc<Pod>>>> = HashMap::new();
        let mut relist: Option<HashSet<String>> = None;
        let mut first_list_done = false;
        loop {
            let ev = match events.try_next().await {
                Ok(Some(ev)) => ev,
                Ok(None) => return Err(NodeError::WatchEnded),
                Err(e) => {
                    tracing::warn!(error = %e, "pod watch error; retrying");
                    continue;
                }
            };
            workers.retain(|_, tx| !tx.is_closed());
            match ev {
                Event::Init => relist = Some(HashSet::new()),
                Event::InitApply(p) | Event::Apply(p) => {
                    if p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                        != Some(self.ctx.node_name.as_str())
                    {
                        continue;
                    }
                    let uid = p.uid().unwrap_or_default();
                    if let Some(seen) = relist.as_mut() {
                        seen.insert(uid.clone());
                    }
                    let p = Arc::new(p);
                    match workers.get(&uid) {
                        Some(tx) => {
                            let _ = tx.send(Some(p));
                        }
                        None => {
                            let adopted = leftovers.remove(&uid).unwrap_or_default();
                            let key =
                                format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
                            self.ctx
                                .pods
                                .write()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(key, uid.clone());
                            let (tx, rx) = watch::channel(Some(p.clone()));
                            let w = Worker::new(self.ctx.clone(), p, rx, adopted);
                            tokio::spawn(w.run());
                            workers.insert(uid, tx);
                        }
                    }
                }
                Event::Delete(p) => {
                    let key = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
                    self.ctx
                        .pods
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                    if let Some(tx) = workers.remove(&p.uid().unwrap_or_default()) {
                        let _ = tx.send(None);
                        // Keep the sender alive until the worker has seen it.
                        tokio::spawn(async move { tx.closed().await });
                    }
                }
                Event::InitDone => {
                    let seen = relist.take().unwrap_or_default();
                    // Pods that vanished while the watch was down.
                    for (uid, tx) in workers.iter() {
                        if !seen.contains(uid) {
                            let _ = tx.send(None);
                        }
                    }
                    if !first_list_done {
                        first_list_done = true;
                        // Workloads of pods that no longer exist are removed.
                        for (uid, _) in leftovers.drain() {
                            tracing::info!(pod_uid = %uid, "removing workloads of a pod that no longer exists");
                            for tier in self.ctx.tiers.values() {
                                let (t, u) = (tier.clone(), uid.clone());
                                tokio::task::spawn_blocking(move || {
                                    remove_pod_workloads(t.as_ref(), &u)
                                });
                            }
                            let (n, u) = (self.ctx.network.clone(), uid.clone());
                            tokio::task::spawn_blocking(move || {
                                let _ = n.teardown(&u);
                                crate::ipc::teardown(&u);
                            });
                        }
                    }
                }
            }
        }
    }
}

fn available_tiers(ctx: &Ctx) -> Vec<String> {
    let mut v: Vec<String> = ctx
        .tiers
        .iter()
        .filter(|(_, t)| t.available().is_ok())
        .map(|(n, _)| n.clone())
        .collect();
    v.sort();
    v
}

/// Creates or refreshes the Node object (labels, status with the endpoint
/// `port`); returns its uid.
async fn register_node(
    ctx: &Ctx,
    labels: &BTreeMap<String, String>,
    port: u16,
) -> Result<Option<String>, NodeError> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let machine = Machine::detect();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let status = node::status(
        &machine,
        &ctx.host_ip,
        &hostname,
        &available_tiers(ctx),
        port,
        &now,
    );
    let obj = node::node_object(&ctx.node_name, labels, status.clone());
    let name = &ctx.node_name;
    let created = match api.create(&PostParams::default(), &obj).await {
        Ok(n) => n,
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let labels = obj.metadata.labels.clone();
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({"metadata": {"labels": labels}})),
            )
            .await
            .map_err(|e| NodeError::Api {
                what: format!("updating node {name}"),
                source: e,
            })?
        }
        Err(e) => {
            return Err(NodeError::Api {
                what: format!("registering node {name}"),
                source: e,
            })
        }
    };
    // Status is a subresource: write it separately so it lands either way.
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({ "status": status })),
    )
    .await
    .map_err(|e| NodeError::Api {
        what: format!("writing status of node {name}"),
        source: e,
    })?;
    tracing::info!(node = %name, cpus = machine.cpus, memory = machine.memory_bytes, "node registered");
    Ok(created.uid())
}
