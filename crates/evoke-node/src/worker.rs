//! One pod's worker: sets up the sandbox (tier, volumes, network), runs
//! init containers one by one, then the containers, restarts them per
//! restartPolicy with CrashLoopBackOff, runs probes, writes the status, and
//! on deletion stops everything gracefully and removes the pod object.
//!
//! The loop is level-triggered: each turn [`Worker::sync`] looks at the
//! records and does the next due step; messages (exits, probe verdicts)
//! and pod updates only update records and wake it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use evoke_runtime::{
    ExecSpec, ExitInfo, RuntimeError, Stdio, WorkloadRuntime, WorkloadState, WorkloadStatus,
};
use evoke_scheduler::events::{reference, EventType};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, PodStatus, Probe, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::ResourceExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::agent::Ctx;
use crate::backoff::Backoff;
use crate::network::PodNet;
use crate::probe::{self, ProbeState, Target, Timing};
use crate::spec::{self, Refs, LABEL_ATTEMPT, LABEL_CONTAINER, LABEL_POD_UID};
use crate::status::{pod_status, CState, ContainerRecord, Ended, PodFacts};
use crate::volumes;
use crate::NodeError;

mod sys;

/// Which probe sent a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    fn word(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "Liveness",
            ProbeKind::Readiness => "Readiness",
            ProbeKind::Startup => "Startup",
        }
    }
}

/// What the worker's helpers tell it.
#[derive(Debug)]
pub enum Msg {
    Exited {
        id: String,
        exit: ExitInfo,
    },
    Probe {
        id: String,
        kind: ProbeKind,
        ok: bool,
    },
}

/// While stopping, how often the tier is asked whether a container is gone.
const STOP_POLL: Duration = Duration::from_millis(500);

/// What [`Worker::try_setup`] made on the blocking pool.
struct Sandbox {
    volume_dirs: HashMap<String, PathBuf>,
    net: PodNet,
    guest: Option<evoke_runtime::GuestNetwork>,
    ipc: Option<PathBuf>,
    /// How long volumes, network and IPC took.
    took: [Duration; 3],
}

/// How long to wait before retrying a sandbox that could not be set up.
const SETUP_RETRY: Duration = Duration::from_secs(20);

/// Where one pod's start-up time went, from the agent seeing the pod to
/// the status write that says it runs; logged once at debug level as `pod
/// start-up` (bench/orchestration reads it with `EVOKE_LOG=evoke_node=debug`).
struct StartTrace {
    seen: Instant,
    /// Waiting for a place in the start queue.
    queued: Duration,
    /// Reading referenced ConfigMaps and Secrets.
    refs: Duration,
    volumes: Duration,
    net: Duration,
    ipc: Duration,
    /// The tier's `create` and `start` of the containers, summed.
    create: Duration,
    start: Duration,
    /// Status writes before the one that reports the pod running.
    patches: u32,
    done: bool,
}

impl StartTrace {
    fn new() -> Self {
        Self {
            seen: Instant::now(),
            queued: Duration::ZERO,
            refs: Duration::ZERO,
            volumes: Duration::ZERO,
            net: Duration::ZERO,
            ipc: Duration::ZERO,
            create: Duration::ZERO,
            start: Duration::ZERO,
            patches: 0,
            done: false,
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

pub struct Worker {
    ctx: Arc<Ctx>,
    pod: Arc<Pod>,
    updates: watch::Receiver<Option<Arc<Pod>>>,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    tier: Option<Arc<dyn WorkloadRuntime>>,
    facts: PodFacts,
    init: Vec<ContainerRecord>,
    main: Vec<ContainerRecord>,
    backoffs: HashMap<String, Backoff>,
    not_before: HashMap<String, Instant>,
    probes: HashMap<String, Vec<JoinHandle<()>>>,
    volume_dirs: HashMap<String, PathBuf>,
    refs: Option<Refs>,
    net: PodNet,
    /// A microVM pod's network (tap, address): see `PodNetwork::setup_vm`.
    guest_net: Option<evoke_runtime::GuestNetwork>,
    ipc: Option<PathBuf>,
    adopted: Vec<WorkloadStatus>,
    last_written: Option<PodStatus>,
    setup_retry_at: Option<Instant>,
    warned: Option<String>,
    trace: StartTrace,
}

fn policy(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".into())
}

impl Worker {
    pub fn new(
        ctx: Arc<Ctx>,
        pod: Arc<Pod>,
        updates: watch::Receiver<Option<Arc<Pod>>>,
        adopted: Vec<WorkloadStatus>,
    ) -> Worker {
        let (tx, rx) = mpsc::unbounded_channel();
        let spec = pod.spec.clone().unwrap_or_default();
        let rec = |c: &Container| ContainerRecord::new(&c.name, c.image.as_deref().unwrap_or(""));
        let init: Vec<ContainerRecord> = spec.init_containers.iter().flatten().map(rec).collect();
        let mut main: Vec<ContainerRecord> = spec.containers.iter().map(rec).collect();
        // Restart counts survive an agent restart through the pod's status.
        for cs in pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
        {
            if let Some(r) = main.iter_mut().find(|r| r.name == cs.name) {
                r.restart_count = cs.restart_count;
            }
        }
        let facts = PodFacts {
            host_ip: ctx.host_ip.clone(),
            restart_policy: policy(&pod),
            start_time: Some(SystemTime::now()),
            ..Default::default()
        };
        Worker {
            ctx,
            pod,
            updates,
            tx,
            rx,
            tier: None,
            facts,
            init,
            main,
            backoffs: HashMap::new(),
            not_before: HashMap::new(),
            probes: HashMap::new(),
            volume_dirs: HashMap::new(),
            refs: None,
            net: PodNet::default(),
            guest_net: None,
            ipc: None,
            adopted,
            last_written: None,
            setup_retry_at: None,
            warned: None,
            trace: StartTrace::new(),
        }
    }

    fn key(&self) -> String {
        format!(
            "{}/{}",
            self.pod.namespace().unwrap_or_default(),
            self.pod.name_any()
        )
    }

    fn event(&self, type_: EventType, reason: &str, message: &str) {
        self.ctx
            .recorder
            .publish(&reference(self.pod.as_ref()), type_, reason, message);
    }

    fn pod_dir(&self) -> PathBuf {
        self.ctx
            .data_dir
            .join("pods")
            .join(self.pod.uid().unwrap_or_default())
    }

    /// Runs until the pod is deleted and cleaned up.
    pub async fn run(mut self) {
        loop {
            let deleted = self.updates.borrow().is_none();
            if deleted || self.pod.metadata.deletion_timestamp.is_some() {
                self.terminate(!deleted).await;
                return;
            }
            self.sync().await;
            self.write_status().await;
            let wake = self
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
            tokio::select! {
                r = self.updates.changed() => {
                    if r.is_err() {
                        // The agent dropped us: it is shutting down; leave workloads running.
                        return;
                    }
                    if let Some(p) = self.updates.borrow().clone() {
                        self.pod = p;
                    }
                }
                Some(m) = self.rx.recv() => self.handle(m).await,
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut t: Option<Instant> = self.setup_retry_at;
        for d in self.not_before.values() {
            t = Some(t.map_or(*d, |x| x.min(*d)));
        }
        t
    }

    /// Sets up the sandbox once: tier, config, volumes, network.
    async fn setup(&mut self) -> bool {
        if self.facts.sandbox_ready {
            return true;
        }
        if self.setup_retry_at.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        match self.try_setup().await {
            Ok(()) => {
                self.facts.sandbox_ready = true;
                self.facts.sandbox_error = None;
                self.setup_retry_at = None;
                self.adopt();
                true
            }
            Err((reason, message)) => {
                if self.warned.as_deref() != Some(&message) {
                    tracing::warn!(pod = %self.key(), %reason, %message, "pod sandbox not ready");
                    // The kubelet's event reasons for each kind of failure.
                    let (event, text) = match reason.as_str() {
                        "FailedMount" => ("FailedMount", message.clone()),
                        "CreateContainerConfigError" => ("Failed", format!("Error: {message}")),
                        _ => ("FailedCreatePodSandBox", message.clone()),
                    };
                    self.event(EventType::Warning, event, &text);
                    self.warned = Some(message.clone());
                }
                for c in self.init.iter_mut().chain(self.main.iter_mut()) {
                    if matches!(c.state, CState::Waiting { .. }) {
                        c.state = CState::Waiting {
                            reason: reason.clone(),
                            message: Some(message.clone()),
                        };
                    }
                }
                self.facts.sandbox_error = Some((reason, message));
                self.setup_retry_at = Some(Instant::now() + SETUP_RETRY);
                false
            }
        }
    }

    async fn try_setup(&mut self) -> Result<(), (String, String)> {
        let class = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.runtime_class_name.clone())
            .unwrap_or_else(|| self.ctx.default_tier.clone());
        let Some(tier) = self.ctx.tiers.get(&class).cloned() else {
            return Err((
                "RuntimeClassNotFound".into(),
                format!(
                    "node {} has no {class:?} tier; it offers: {}",
                    self.ctx.node_name,
                    self.ctx.tier_names().join(", ")
                ),
            ));
        };
        if let Err(e) = self.ctx.tier_available(&tier).await {
            return Err(("RuntimeUnavailable".into(), e.to_string()));
        }
        let tier_name = tier.name().to_string();
        self.tier = Some(tier);
        let t = Instant::now();
        let refs = self
            .fetch_refs()
            .await
            .map_err(|m| ("CreateContainerConfigError".to_string(), m))?;
        self.trace.refs += t.elapsed();
        let host_network = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
            || class == "process";
        let microvm = tier_name == "microvm";
        // Containers of a pod share IPC, except on the host (process tier).
        let share_ipc =
            !host_network && self.pod.spec.as_ref().and_then(|s| s.host_ipc) != Some(true);
        // Volumes, network and IPC namespace in one trip to the blocking
        // pool: each is a handful of syscalls, and in a burst of pods the
        // hops between the pool and the runtime cost as much as the steps.
        let (pod, dir, network) = (self.pod.clone(), self.pod_dir(), self.ctx.network.clone());
        let (host_ip, vrefs) = (self.ctx.host_ip.clone(), refs.clone());
        let sandbox = tokio::task::spawn_blocking(move || -> Result<Sandbox, (String, String)> {
            let fail =
                |reason: &'static str| move |e: NodeError| (reason.to_string(), e.to_string());
            let t = Instant::now();
            let volume_dirs = volumes::prepare(&pod, &vrefs, &dir).map_err(fail("FailedMount"))?;
            let t_volumes = t.elapsed();
            let t = Instant::now();
            let uid = pod.uid().unwrap_or_default();
            let (net, guest) = if host_network {
                let net = PodNet {
                    netns: None,
                    ip: Some(host_ip),
                    mounts: Vec::new(),
                };
                (net, None)
            } else if microvm {
                // A VM joins the pod network through a tap and its own
                // eth0, not a namespace.
                let guest = network
                    .setup_vm(&uid, &pod.namespace().unwrap_or_default(), &pod.name_any())
                    .map_err(fail("NetworkNotReady"))?;
                let net = PodNet {
                    netns: None,
                    ip: guest.as_ref().map(|g| g.address.to_string()),
                    mounts: Vec::new(),
                };
                (net, guest)
            } else {
                (
                    network.setup_pod(&pod).map_err(fail("NetworkNotReady"))?,
                    None,
                )
            };
            let t_net = t.elapsed();
            let t = Instant::now();
            let ipc = match share_ipc {
                true => Some(crate::ipc::setup(&uid).map_err(fail("IpcNotReady"))?),
                false => None,
            };
            Ok(Sandbox {
                volume_dirs,
                net,
                guest,
                ipc,
                took: [t_volumes, t_net, t.elapsed()],
            })
        })
        .await
        .map_err(|e| ("FailedCreatePodSandBox".to_string(), e.to_string()))??;
        self.volume_dirs = sandbox.volume_dirs;
        [self.trace.volumes, self.trace.net, self.trace.ipc] = sandbox.took;
        self.refs = Some(refs);
        self.net = sandbox.net;
        self.guest_net = sandbox.guest;
        self.ipc = sandbox.ipc;
        self.facts.pod_ip = self.net.ip.clone();
        Ok(())
    }

    async fn fetch_refs(&self) -> Result<Refs, String> {
        let (cms, secrets) = spec::referenced(&self.pod);
        let ns = self.pod.namespace().unwrap_or_default();
        let mut refs = Refs::default();
        let cm_api: Api<ConfigMap> = Api::namespaced(self.ctx.client.clone(), &ns);
        for (name, optional) in cms {
            match cm_api.get_opt(&name).await {
                Ok(Some(cm)) => {
                    refs.config_maps.insert(name, cm);
                }
                Ok(None) if optional => {}
                Ok(None) => return Err(format!("configmap \"{name}\" not found")),
                Err(e) => return Err(format!("reading configmap \"{name}\": {e}")),
            }
        }
        let s_api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &ns);
        for (name, optional) in secrets {
            match s_api.get_opt(&name).await {
                Ok(Some(s)) => {
                    refs.secrets.insert(name, s);
                }
                Ok(None) if optional => {}
                Ok(None) => return Err(format!("secret \"{name}\" not found")),
                Err(e) => return Err(format!("reading secret \"{name}\": {e}")),
            }
        }
        Ok(refs)
    }

    /// Takes over workloads a previous agent started for this pod.
    fn adopt(&mut self) {
        let adopted = std::mem::take(&mut self.adopted);
        // The newest attempt of each container wins.
        let mut newest: HashMap<String, (i32, WorkloadStatus)> = HashMap::new();
        for w in adopted {
            let (Some(c), Some(a)) = (
                w.labels.get(LABEL_CONTAINER).cloned(),
                w.labels
                    .get(LABEL_ATTEMPT)
                    .and_then(|a| a.parse::<i32>().ok()),
            ) else {
                continue;
            };
            if newest.get(&c).is_none_or(|(b, _)| a > *b) {
                newest.insert(c, (a, w));
            }
        }
        for (cname, (attempt, w)) in newest {
            let is_init = self.init.iter().any(|r| r.name == cname);
            let Some(rec) = self.record(&cname, is_init) else {
                continue;
            };
            rec.restart_count = rec.restart_count.max(attempt);
            let started = w.started_at.unwrap_or(w.created_at);
            match w.state {
                WorkloadState::Running { .. } => {
                    rec.state = CState::Running {
                        id: w.id.clone(),
                        started,
                    };
                    let c = self.container(&cname, is_init);
                    // Readiness is re-established by the probes, if any.
                    let probed = c.as_ref().is_some_and(|c| c.readiness_probe.is_some());
                    if let Some(rec) = self.record(&cname, is_init) {
                        rec.ready = !probed;
                        rec.started = true;
                    }
                    tracing::info!(pod = %self.key(), container = %cname, id = %w.id, "adopted running workload");
                    self.spawn_waiter(w.id.clone());
                    if let (Some(c), false) = (c, is_init) {
                        self.spawn_probes(&c, &w.id, true);
                    }
                }
                WorkloadState::Exited(exit) => {
                    rec.state = CState::Running {
                        id: w.id.clone(),
                        started,
                    };
                    let _ = self.tx.send(Msg::Exited {
                        id: w.id.clone(),
                        exit,
                    });
                }
                WorkloadState::Created => {}
            }
        }
    }

    fn container(&self, name: &str, init: bool) -> Option<Container> {
        let spec = self.pod.spec.as_ref()?;
        if init {
            spec.init_containers
                .as_ref()?
                .iter()
                .find(|c| c.name == name)
                .cloned()
        } else {
            spec.containers.iter().find(|c| c.name == name).cloned()
        }
    }

    /// The next due step, if any.
    async fn sync(&mut self) {
        if self.facts.final_phase.is_some() {
            return;
        }
        // One place in the start queue for the sandbox and the containers
        // together, so a pod that got in finishes before the next begins
        // (separate places let a burst's sandboxes all go before any start).
        let work = !self.facts.sandbox_ready
            || self
                .init
                .iter()
                .chain(self.main.iter())
                .any(|c| matches!(c.state, CState::Waiting { .. }));
        let slots = self.ctx.start_slots.clone();
        let t = Instant::now();
        let mut slot = match work {
            true => slots.acquire_owned().await.ok(),
            false => None,
        };
        self.trace.queued += t.elapsed();
        if !self.setup().await {
            return;
        }
        let now = Instant::now();
        // Init containers, one at a time, in order.
        for i in 0..self.init.len() {
            match &self.init[i].state {
                CState::Terminated(e) if e.exit.code == 0 => continue,
                CState::Running { .. } | CState::Terminated(_) => return,
                CState::Waiting { .. } => {
                    if self
                        .not_before
                        .get(&self.init[i].name)
                        .is_some_and(|t| now < *t)
                    {
                        return;
                    }
                    let name = self.init[i].name.clone();
                    self.start(&name, true, &mut slot).await;
                    return;
                }
            }
        }
        for i in 0..self.main.len() {
            if let CState::Waiting { .. } = self.main[i].state {
                if self
                    .not_before
                    .get(&self.main[i].name)
                    .is_some_and(|t| now < *t)
                {
                    continue;
                }
                let name = self.main[i].name.clone();
                self.start(&name, false, &mut slot).await;
            }
        }
    }

    fn record(&mut self, name: &str, init: bool) -> Option<&mut ContainerRecord> {
        let list = if init { &mut self.init } else { &mut self.main };
        list.iter_mut().find(|r| r.name == name)
    }

    fn find_by_id(&mut self, id: &str) -> Option<(&mut ContainerRecord, bool)> {
        let n_init = self.init.len();
        self.init
            .iter_mut()
            .chain(self.main.iter_mut())
            .enumerate()
            .find(|(_, r)| matches!(&r.state, CState::Running { id: x, .. } if x == id))
            .map(|(i, r)| (r, i < n_init))
    }

    /// Creates and starts container `name`. `slot` is the pod's place in
    /// the start queue; a tier whose start waits for a guest's boot gives it
    /// up once the workload is created, so one booting VM does not hold
    /// back other pods' starts.
    async fn start(
        &mut self,
        name: &str,
        init: bool,
        slot: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let Some(tier) = self.tier.clone() else {
            return;
        };
        let Some(c) = self.container(name, init) else {
            return;
        };
        let Some(rec) = self.record(name, init) else {
            return;
        };
        let attempt = if rec.last.is_some() {
            rec.restart_count + 1
        } else {
            rec.restart_count
        };
        let pod_ip = self.facts.pod_ip.clone().unwrap_or_default();
        let log = self
            .pod_dir()
            .join("logs")
            .join(name)
            .join(format!("{attempt}.log"));
        let spec = spec::workload_spec(
            &self.pod,
            &c,
            attempt,
            self.refs.as_ref().unwrap_or(&Refs::default()),
            &self.volume_dirs,
            &self.ctx.host_ip,
            &pod_ip,
            log.clone(),
        );
        let mut spec = match spec {
            Ok(s) => s,
            Err(e) => {
                self.fail_start(name, init, "CreateContainerConfigError", &e.to_string());
                return;
            }
        };
        spec.network_namespace = self.net.netns.clone();
        spec.mounts.extend(self.net.mounts.iter().cloned());
        spec.guest_network = self.guest_net.clone();
        spec.ipc_namespace = self.ipc.clone();
        let id = spec.id.clone();
        let pod_uid = self.pod.uid().unwrap_or_default();
        // stdinOnce: a stdin the first attach closes (see stream.rs).
        let stdin_once = !init && c.stdin == Some(true) && c.stdin_once == Some(true);
        let waits = tier.start_waits_for_guest();
        let boot_slot = if waits { slot.take() } else { None };
        type Started = ([Duration; 2], Option<SystemTime>);
        let res = tokio::task::spawn_blocking(move || -> Result<Started, RuntimeError> {
            if let Some(parent) = log.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| RuntimeError::io(parent.display().to_string(), e))?;
            }
            // A leftover of the same attempt (a crash between create and
            // start) would collide; older attempts beyond the previous one go too.
            let _ = tier.remove(&spec.id, true);
            if attempt >= 2 {
                let _ = tier.remove(
                    &spec::workload_id(&pod_uid, &spec.labels[LABEL_CONTAINER], attempt - 2),
                    true,
                );
            }
            let mut stdio = Stdio::default();
            if stdin_once {
                stdio.stdin = Some(
                    crate::stream::stdin_once_reader(&spec.id)
                        .map_err(|e| RuntimeError::InvalidSpec(e.to_string()))?,
                );
            }
            let t = Instant::now();
            tier.create(&spec, stdio)?;
            let created = t.elapsed();
            drop(boot_slot);
            let t = Instant::now();
            tier.start(&spec.id)?;
            let took = t.elapsed();
            // Such a tier knows when the process really began (a microVM:
            // the guest's report), later than `start` was called.
            let started_at = match waits {
                true => tier.state(&spec.id).ok().and_then(|s| s.started_at),
                false => None,
            };
            Ok(([created, took], started_at))
        })
        .await
        .unwrap_or_else(|e| Err(RuntimeError::InvalidSpec(format!("start panicked: {e}"))));
        match res {
            Ok(([created, started], started_at)) => {
                self.trace.create += created;
                self.trace.start += started;
                let image = c.image.clone().unwrap_or_default();
                if let Some(rec) = self.record(name, init) {
                    rec.restart_count = attempt;
                    rec.state = CState::Running {
                        id: id.clone(),
                        started: started_at.unwrap_or_else(SystemTime::now),
                    };
                    rec.ready = c.readiness_probe.is_none();
                    rec.started = c.startup_probe.is_none();
                }
                self.event(
                    EventType::Normal,
                    "Pulled",
                    &format!("Container image \"{image}\" already present on machine"),
                );
                self.event(
                    EventType::Normal,
                    "Created",
                    &format!("Created container {name}"),
                );
                self.event(
                    EventType::Normal,
                    "Started",
                    &format!("Started container {name}"),
                );
                tracing::info!(pod = %self.key(), container = %name, %id, "container started");
                self.spawn_waiter(id.clone());
                if !init {
                    self.spawn_probes(&c, &id, c.startup_probe.is_none());
                }
            }
            Err(e) => {
                if let RuntimeError::ImageNotFound(image) = &e {
                    // The image puller's own event, before the start failure.
                    self.event(
                        EventType::Warning,
                        "ErrImageNeverPull",
                        &format!(
                            "Container image \"{image}\" is not present with pull policy of Never"
                        ),
                    );
                }
                let reason = match e {
                    RuntimeError::ImageNotFound(_) => "ErrImageNeverPull",
                    RuntimeError::Unavailable { .. } => "RuntimeUnavailable",
                    _ => "RunContainerError",
                };
                self.fail_start(name, init, reason, &e.to_string());
            }
        }
    }

    /// A start failed before the process ran: wait with back-off and retry.
    fn fail_start(&mut self, name: &str, init: bool, reason: &str, message: &str) {
        tracing::warn!(pod = %self.key(), container = %name, %reason, %message, "container could not start");
        self.event(EventType::Warning, "Failed", &format!("Error: {message}"));
        let delay = self
            .backoffs
            .entry(name.to_string())
            .or_default()
            .next(Duration::ZERO)
            .max(Duration::from_secs(1));
        self.not_before
            .insert(name.to_string(), Instant::now() + delay);
        if let Some(rec) = self.record(name, init) {
            rec.state = CState::Waiting {
                reason: reason.into(),
                message: Some(message.into()),
            };
        }
    }

    /// Learns how the workload `id` ends and tells the worker. The exit is
    /// awaited on a pidfd in the reactor, so a running container costs no
    /// thread; only once the process is gone does a blocking thread call
    /// the tier's `wait`, which then reaps at once and reads the exit code
    /// and OOM kill. Where no pidfd can be had (no pid from the tier, an
    /// old kernel) it falls back to a thread parked in `wait`.
    fn spawn_waiter(&self, id: String) {
        let Some(tier) = self.tier.clone() else {
            return;
        };
        let tx = self.tx.clone();
        let reaps = self.ctx.reap_slots.clone();
        tokio::spawn(async move {
            let (t, i) = (tier.clone(), id.clone());
            let pid = match tokio::task::spawn_blocking(move || t.state(&i)).await {
                Ok(Ok(WorkloadStatus {
                    state: WorkloadState::Running { pid },
                    ..
                })) => i32::try_from(pid).ok().filter(|p| *p > 0),
                _ => None,
            };
            // Whether the process is known to be gone, so `wait` is quick.
            let mut ended = false;
            if let Some(pid) = pid {
                match sys::pidfd_open(pid) {
                    Ok(fd) => match sys::exited(fd).await {
                        Ok(()) => ended = true,
                        Err(e) => {
                            tracing::debug!(%id, pid, error = %e, "pidfd wait failed; waiting in a thread")
                        }
                    },
                    // Gone already: `wait` below answers at once.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => ended = true,
                    Err(e) => {
                        tracing::debug!(%id, pid, error = %e, "no pidfd; waiting in a thread")
                    }
                }
            }
            // Only quick reaps queue; a thread parked in `wait` must not
            // hold a place.
            let _reap = match ended {
                true => Some(reaps.acquire().await),
                false => None,
            };
            let exit = tokio::task::spawn_blocking(move || {
                wait_blocking(tier.as_ref(), &id, &tx).map(|e| (id, e, tx))
            })
            .await;
            if let Ok(Some((id, exit, tx))) = exit {
                let _ = tx.send(Msg::Exited { id, exit });
            }
        });
    }

    fn probe_target(&self) -> Target {
        Target {
            netns: self.net.netns.clone(),
            default_host: if self.net.netns.is_some() {
                "127.0.0.1".into()
            } else {
                self.facts
                    .pod_ip
                    .clone()
                    .unwrap_or_else(|| "127.0.0.1".into())
            },
        }
    }

    /// Starts the probe loops of a running container. Liveness and
    /// readiness wait for the startup probe when there is one.
    fn spawn_probes(&mut self, c: &Container, id: &str, started: bool) {
        let mut handles = Vec::new();
        let mut kinds: Vec<(ProbeKind, Probe)> = Vec::new();
        if !started {
            if let Some(p) = c.startup_probe.clone() {
                kinds.push((ProbeKind::Startup, p));
            }
        } else {
            if let Some(p) = c.liveness_probe.clone() {
                kinds.push((ProbeKind::Liveness, p));
            }
            if let Some(p) = c.readiness_probe.clone() {
                kinds.push((ProbeKind::Readiness, p));
            }
        }
        for (kind, p) in kinds {
            let tier = self.tier.clone();
            let tx = self.tx.clone();
            let id = id.to_string();
            let target = self.probe_target();
            let container = c.clone();
            handles.push(tokio::spawn(async move {
                let timing = Timing::of(&p);
                let mut state = ProbeState::new(timing);
                tokio::time::sleep(timing.initial_delay).await;
                loop {
                    let ok =
                        run_check(&p, &container, tier.clone(), &id, &target, timing.timeout).await;
                    if let Some(v) = state.observe(ok) {
                        if tx
                            .send(Msg::Probe {
                                id: id.clone(),
                                kind,
                                ok: v,
                            })
                            .is_err()
                        {
                            return;
                        }
                        if kind == ProbeKind::Startup && v {
                            return;
                        }
                    }
                    tokio::time::sleep(timing.period).await;
                }
            }));
        }
        self.probes
            .entry(id.to_string())
            .or_default()
            .extend(handles);
    }

    fn stop_probes(&mut self, id: &str) {
        for h in self.probes.remove(id).into_iter().flatten() {
            h.abort();
        }
    }

    async fn handle(&mut self, m: Msg) {
        match m {
            Msg::Exited { id, exit } => self.exited(&id, exit),
            Msg::Probe { id, kind, ok } => self.probed(&id, kind, ok).await,
        }
    }

    fn exited(&mut self, id: &str, exit: ExitInfo) {
        self.stop_probes(id);
        let restart_policy = self.facts.restart_policy.clone();
        let pod_name = self.pod.name_any();
        let pod_ns = self.pod.namespace().unwrap_or_default();
        let pod_uid = self.pod.uid().unwrap_or_default();
        let ctx = self.ctx.clone();
        let Some((rec, is_init)) = self.find_by_id(id) else {
            return;
        };
        let started = match &rec.state {
            CState::Running { started, .. } => Some(*started),
            _ => None,
        };
        let ended = Ended {
            id: id.to_string(),
            exit,
            started,
        };
        rec.ready = false;
        rec.started = false;
        let name = rec.name.clone();
        let restart = if is_init {
            exit.code != 0 && restart_policy != "Never"
        } else {
            match restart_policy.as_str() {
                "Never" => false,
                "OnFailure" => exit.code != 0,
                _ => true,
            }
        };
        tracing::info!(pod = %format!("{pod_ns}/{pod_name}"), container = %name, code = exit.code, reason = exit.reason(), restart, "container exited");
        if exit.oom_killed {
            // As the kubelet's OOM watcher: a SystemOOM event on the Node;
            // the pod shows it as the container's OOMKilled reason.
            let node = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(ctx.node_name.clone()),
                uid: Some(ctx.node_name.clone()),
                ..Default::default()
            };
            ctx.recorder.publish(
                &node,
                EventType::Warning,
                "SystemOOM",
                &format!(
                    "System OOM encountered, victim container: {name}, pod: {pod_ns}/{pod_name}"
                ),
            );
        }
        if is_init && exit.code == 0 {
            rec.state = CState::Terminated(ended);
            return;
        }
        if restart {
            let ran = started.and_then(|s| s.elapsed().ok()).unwrap_or_default();
            rec.last = Some(ended);
            let delay = self.backoffs.entry(name.clone()).or_default().next(ran);
            let rec = self
                .record(&name, is_init)
                .expect("record exists: found above");
            if delay.is_zero() {
                rec.state = CState::Waiting {
                    reason: "ContainerCreating".into(),
                    message: None,
                };
            } else {
                rec.state = CState::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some(format!(
                        "back-off {}s restarting failed container={name} pod={pod_name}_{pod_ns}({pod_uid})",
                        delay.as_secs()
                    )),
                };
                self.event(EventType::Warning, "BackOff", &format!("Back-off restarting failed container {name} in pod {pod_name}_{pod_ns}({pod_uid})"));
            }
            self.not_before.insert(name, Instant::now() + delay);
        } else {
            rec.state = CState::Terminated(ended);
            if is_init {
                // An init container failed for good: so does the pod.
                self.facts.final_phase = Some("Failed");
            }
        }
    }

    async fn probed(&mut self, id: &str, kind: ProbeKind, ok: bool) {
        let Some((rec, _)) = self.find_by_id(id) else {
            return;
        };
        let name = rec.name.clone();
        match (kind, ok) {
            (ProbeKind::Readiness, v) => {
                rec.ready = v;
                if !v {
                    self.event(
                        EventType::Warning,
                        "Unhealthy",
                        &format!("Readiness probe failed for container {name}"),
                    );
                }
            }
            (ProbeKind::Startup, true) => {
                rec.started = true;
                if let Some(c) = self.container(&name, false) {
                    self.spawn_probes(&c, id, true);
                }
            }
            (ProbeKind::Liveness, true) => {}
            (ProbeKind::Liveness, false) | (ProbeKind::Startup, false) => {
                self.event(
                    EventType::Warning,
                    "Unhealthy",
                    &format!("{} probe failed for container {name}", kind.word()),
                );
                self.event(
                    EventType::Normal,
                    "Killing",
                    &format!(
                        "Container {name} failed {} probe, will be restarted",
                        kind.word().to_lowercase()
                    ),
                );
                self.stop_probes(id);
                let grace = self.grace();
                if let Some(tier) = self.tier.clone() {
                    let id = id.to_string();
                    // The waiter reports the exit; the restart follows the policy.
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = tier.stop(&id, grace) {
                            tracing::warn!(%id, error = %e, "could not stop unhealthy container");
                        }
                    });
                }
            }
        }
    }

    fn grace(&self) -> Duration {
        let secs = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0);
        Duration::from_secs(secs as u64)
    }

    async fn write_status(&mut self) {
        let status = pod_status(
            &self.facts,
            &self.init,
            &self.main,
            self.pod.status.as_ref(),
        );
        if self.last_written.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(
            self.ctx.client.clone(),
            &self.pod.namespace().unwrap_or_default(),
        );
        let patch = serde_json::json!({ "status": status });
        let t = Instant::now();
        match api
            .patch_status(
                &self.pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(p) => {
                self.pod = Arc::new(p);
                if !self.trace.done {
                    if status.phase.as_deref() == Some("Running") {
                        self.trace.done = true;
                        let tr = &self.trace;
                        tracing::debug!(
                            pod = %self.key(),
                            total_ms = ms(tr.seen.elapsed()),
                            queued_ms = ms(tr.queued),
                            refs_ms = ms(tr.refs),
                            volumes_ms = ms(tr.volumes),
                            net_ms = ms(tr.net),
                            ipc_ms = ms(tr.ipc),
                            create_ms = ms(tr.create),
                            start_ms = ms(tr.start),
                            patch_ms = ms(t.elapsed()),
                            earlier_patches = tr.patches,
                            "pod start-up"
                        );
                    } else {
                        self.trace.patches += 1;
                    }
                }
                self.last_written = Some(status);
            }
            Err(e) => tracing::debug!(pod = %self.key(), error = %e, "could not write pod status"),
        }
    }

    /// Graceful termination, then cleanup, then (if the object still
    /// exists) the final delete with grace 0.
    async fn terminate(&mut self, object_exists: bool) {
        let grace = self.grace();
        let ids: Vec<String> = self.probes.keys().cloned().collect();
        for id in ids {
            self.stop_probes(&id);
        }
        let running: Vec<(String, String)> = self
            .init
            .iter()
            .chain(self.main.iter())
            .filter_map(|r| match &r.state {
                CState::Running { id, .. } => Some((r.name.clone(), id.clone())),
                _ => None,
            })
            .collect();
        let tier = match self.tier.clone() {
            Some(t) => Some(t),
            None => {
                let class = self
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.runtime_class_name.clone())
                    .unwrap_or_else(|| self.ctx.default_tier.clone());
                self.ctx.tiers.get(&class).cloned()
            }
        };
        if let Some(tier) = tier.clone() {
            for (name, _) in &running {
                self.event(
                    EventType::Normal,
                    "Killing",
                    &format!("Stopping container {name}"),
                );
            }
            // SIGTERM, then SIGKILL after the grace period. The exits come
            // from the containers' waiters (pidfds), so no thread is parked
            // per container for the grace period: deleting 100 pods at once
            // used to start 100 blocking threads, whose stacks and malloc
            // arenas stayed resident long after.
            let mut left: HashSet<String> = running.into_iter().map(|(_, id)| id).collect();
            for (signal, limit) in [
                (libc::SIGTERM, grace),
                (libc::SIGKILL, Duration::from_secs(30)),
            ] {
                if left.is_empty() {
                    break;
                }
                let (t, targets): (_, Vec<String>) = (tier.clone(), left.iter().cloned().collect());
                let _ = tokio::task::spawn_blocking(move || {
                    for id in targets {
                        if let Err(e) = t.signal(&id, signal) {
                            tracing::debug!(%id, signal, error = %e, "could not signal container");
                        }
                    }
                })
                .await;
                let deadline = tokio::time::Instant::now() + limit;
                while !left.is_empty() && tokio::time::Instant::now() < deadline {
                    let slice = deadline.min(tokio::time::Instant::now() + STOP_POLL);
                    match tokio::time::timeout_at(slice, self.rx.recv()).await {
                        Ok(Some(Msg::Exited { id, .. })) => {
                            left.remove(&id);
                        }
                        Ok(Some(Msg::Probe { .. })) => {}
                        Ok(None) => break,
                        // A workload this agent did not start (adopted after
                        // a restart) cannot be reaped here, and its waiter
                        // learns the end late: ask the tier now and then.
                        Err(_) => {
                            let (t, ids): (_, Vec<String>) =
                                (tier.clone(), left.iter().cloned().collect());
                            let gone = tokio::task::spawn_blocking(move || {
                                ids.into_iter()
                                    .filter(|id| {
                                        !matches!(
                                            t.state(id).map(|s| s.state),
                                            Ok(WorkloadState::Running { .. })
                                        )
                                    })
                                    .collect::<Vec<_>>()
                            })
                            .await
                            .unwrap_or_default();
                            for id in gone {
                                left.remove(&id);
                            }
                        }
                    }
                }
            }
            if !left.is_empty() {
                tracing::warn!(pod = %self.key(), containers = ?left, "containers survived SIGKILL for 30 s; removing them by force");
            }
            let uid = self.pod.uid().unwrap_or_default();
            let slots = self.ctx.start_slots.clone();
            let _slot = slots.acquire().await;
            let _ = tokio::task::spawn_blocking(move || remove_pod_workloads(tier.as_ref(), &uid))
                .await;
        }
        let (network, uid) = (self.ctx.network.clone(), self.pod.uid().unwrap_or_default());
        let dir = self.pod_dir();
        // Teardown shares the start queue: a mass deletion then runs in a
        // few threads instead of one per pod.
        let slots = self.ctx.start_slots.clone();
        let _slot = slots.acquire().await;
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = network.teardown(&uid) {
                tracing::warn!(pod_uid = %uid, error = %e, "network teardown failed");
            }
            crate::ipc::teardown(&uid);
            let _ = std::fs::remove_dir_all(&dir);
        })
        .await;
        if object_exists {
            let api: Api<Pod> = Api::namespaced(
                self.ctx.client.clone(),
                &self.pod.namespace().unwrap_or_default(),
            );
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: self.pod.uid(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(&self.pod.name_any(), &dp).await {
                Ok(_) => tracing::info!(pod = %self.key(), "pod terminated and removed"),
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => {
                    tracing::warn!(pod = %self.key(), error = %e, "could not remove terminated pod")
                }
            }
        }
    }
}

/// The tier's `wait` without a timeout: the tier reaps the process when
/// this agent is its parent, the only way to learn a true exit code and OOM
/// kill. None when the worker went away while the tier kept failing.
fn wait_blocking(
    tier: &dyn WorkloadRuntime,
    id: &str,
    tx: &mpsc::UnboundedSender<Msg>,
) -> Option<ExitInfo> {
    loop {
        match tier.wait(id, None) {
            Ok(Some(exit)) => return Some(exit),
            Ok(None) => {
                if tx.is_closed() {
                    return None;
                }
            }
            Err(RuntimeError::NotFound(_)) => return Some(ExitInfo::signaled(9, false)),
            Err(e) => {
                tracing::warn!(%id, error = %e, "waiting for workload failed");
                std::thread::sleep(Duration::from_secs(1));
                if tx.is_closed() {
                    return None;
                }
            }
        }
    }
}

/// Removes every workload of a pod from a tier.
pub fn remove_pod_workloads(tier: &dyn WorkloadRuntime, pod_uid: &str) {
    match tier.list() {
        Ok(list) => {
            for w in list
                .into_iter()
                .filter(|w| w.labels.get(LABEL_POD_UID).map(String::as_str) == Some(pod_uid))
            {
                if let Err(e) = tier.remove(&w.id, true) {
                    tracing::warn!(id = %w.id, error = %e, "could not remove workload");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not list workloads"),
    }
}

async fn run_check(
    p: &Probe,
    c: &Container,
    tier: Option<Arc<dyn WorkloadRuntime>>,
    id: &str,
    target: &Target,
    timeout: Duration,
) -> bool {
    if let Some(exec) = p.exec.as_ref() {
        let Some(tier) = tier else { return false };
        let spec = ExecSpec {
            command: exec.command.clone().unwrap_or_default(),
            // The tier kills the command at the probe's timeout (as the
            // kubelet's runtime does) instead of leaving it running, and
            // a blocking thread waiting for it, after the probe gave up.
            timeout: Some(timeout),
            ..Default::default()
        };
        let id = id.to_string();
        let run = tokio::task::spawn_blocking(move || tier.exec(&id, &spec, Stdio::default()));
        return matches!(tokio::time::timeout(timeout, run).await, Ok(Ok(Ok(0))));
    }
    if let Some(h) = p.http_get.as_ref() {
        let Some(port) = probe::resolve_port(&h.port, c) else {
            return false;
        };
        let (target, host, path) = (
            target.clone(),
            h.host.clone(),
            h.path.clone().unwrap_or_else(|| "/".into()),
        );
        let headers: Vec<(String, String)> = h
            .http_headers
            .iter()
            .flatten()
            .map(|x| (x.name.clone(), x.value.clone()))
            .collect();
        return tokio::task::spawn_blocking(move || {
            probe::http_check(&target, host.as_deref(), port, &path, &headers, timeout)
        })
        .await
        .unwrap_or(false);
    }
    if let Some(t) = p.tcp_socket.as_ref() {
        let Some(port) = probe::resolve_port(&t.port, c) else {
            return false;
        };
        let (target, host) = (target.clone(), t.host.clone());
        return tokio::task::spawn_blocking(move || {
            probe::tcp_check(&target, host.as_deref(), port, timeout)
        })
        .await
        .unwrap_or(false);
    }
    // A probe with no handler (e.g. grpc, unsupported) passes, so it cannot
    // kill a container for a reason evoke cannot check.
    true
}
