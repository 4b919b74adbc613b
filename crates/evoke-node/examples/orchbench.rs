//! Load generator for bench/orchestration (not a test).
//!
//! `orchbench startup KUBECONFIG TIER PODS IMAGE [RATE]`: creates PODS pods
//! in the tier, RATE per second (0, the default, is a burst: 10 at a time,
//! as fast as the API takes them), and measures each one from its create
//! call to the watch event that shows it Running and ready; prints
//! p50/p99/max in ms. With `keep` the pods stay (to measure memory).
//! Env ORCHBENCH_MEMORY_LIMIT sets each pod's memory limit;
//! ORCHBENCH_EXEC_READY=1 gives each pod an exec readiness probe.
//!
//! `orchbench scheduler KUBECONFIG NODES PODS`: against a server without an
//! agent, creates NODES hollow nodes (Node objects with a Lease, nothing
//! behind them), then PODS pods 32 at a time, and measures from the first
//! create to the last binding seen through a watch; prints pods/s.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::ResourceExt;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn pod(name: &str, ns: &str, tier: &str, image: &str) -> Res<Pod> {
    let mut v = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"bench": "orch"}},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "c", "image": image, "command": ["/bin/busybox", "sleep", "3600"],
            "resources": {"requests": {"cpu": "10m", "memory": "8Mi"}}}]}
    });
    if tier != "container" {
        v["spec"]["runtimeClassName"] = serde_json::json!(tier);
    }
    // ORCHBENCH_MEMORY_LIMIT (e.g. 128Mi) sizes each pod; the microvm tier
    // gives a VM 512 MiB without a limit, too much for the test host.
    if let Ok(limit) = std::env::var("ORCHBENCH_MEMORY_LIMIT") {
        v["spec"]["containers"][0]["resources"]["limits"] = serde_json::json!({"memory": limit});
    }
    // ORCHBENCH_EXEC_READY=1: Ready only once an exec probe has run inside
    // the workload (for a microVM, once its guest is up), probed every 1 s.
    if std::env::var_os("ORCHBENCH_EXEC_READY").is_some() {
        v["spec"]["containers"][0]["readinessProbe"] = serde_json::json!({
            "exec": {"command": ["/bin/busybox", "true"]}, "periodSeconds": 1});
    }
    Ok(serde_json::from_value(v)?)
}

/// What the watch showed of a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Bound,
    Running,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn is_running(p: &Pod) -> bool {
    let st = p.status.as_ref();
    st.and_then(|s| s.phase.as_deref()) == Some("Running")
        && st
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn ensure_ns(client: &kube::Client, ns: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).expect("namespace");
    let _ = api.create(&PostParams::default(), &obj).await;
}

async fn startup(
    client: kube::Client,
    tier: &str,
    n: usize,
    image: &str,
    rate: f64,
    keep: bool,
) -> Res<()> {
    let ns = format!("bench-{tier}");
    ensure_ns(&client, &ns).await;
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Stage, Instant)>();
    let watch_api = api.clone();
    tokio::spawn(async move {
        let mut s = watcher(watch_api, watcher::Config::default().labels("bench=orch")).boxed();
        while let Ok(Some(ev)) = s.try_next().await {
            if let Event::Apply(p) | Event::InitApply(p) = ev {
                let now = Instant::now();
                if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                    let _ = tx.send((p.name_any(), Stage::Bound, now));
                }
                if is_running(&p) {
                    let _ = tx.send((p.name_any(), Stage::Running, now));
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut created: HashMap<String, Instant> = HashMap::new();
    let names: Vec<String> = (0..n).map(|i| format!("p{i:04}")).collect();
    let t_start = Instant::now();
    let results: Vec<Res<(String, Instant)>> =
        futures::stream::iter(names.clone().into_iter().enumerate())
            .map(|(i, name)| {
                let api = api.clone();
                let tier = tier.to_string();
                let image = image.to_string();
                async move {
                    if rate > 0.0 {
                        let at = t_start + Duration::from_secs_f64(i as f64 / rate);
                        tokio::time::sleep_until(at.into()).await;
                    }
                    let p = pod(&name, &ns_of(&api), &tier, &image)?;
                    let t = Instant::now();
                    api.create(&PostParams::default(), &p).await?;
                    Ok((name, t))
                }
            })
            .buffer_unordered(if rate > 0.0 { n.max(1) } else { 10 })
            .collect()
            .await;
    for r in results {
        let (name, t) = r?;
        created.insert(name, t);
    }
    let mut latencies: BTreeMap<String, f64> = BTreeMap::new();
    let mut bound: HashMap<String, Instant> = HashMap::new();
    // Where the time goes: creation -> bound, bound -> Running.
    let (mut to_bind, mut to_run): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1000.0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while latencies.len() < n && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some((name, stage, t))) => {
                let Some(c) = created.get(&name).copied() else {
                    continue;
                };
                if !bound.contains_key(&name) {
                    bound.insert(name.clone(), t);
                    to_bind.push(ms(c, t));
                }
                if stage == Stage::Running && !latencies.contains_key(&name) {
                    to_run.push(ms(bound[&name], t));
                    latencies.insert(name, ms(c, t));
                }
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let mut v: Vec<f64> = latencies.values().copied().collect();
    v.sort_by(|a, b| a.total_cmp(b));
    to_bind.sort_by(|a, b| a.total_cmp(b));
    to_run.sort_by(|a, b| a.total_cmp(b));
    let creating = created
        .values()
        .max()
        .map(|l| ms(t_start, *l))
        .unwrap_or(0.0);
    println!(
        "startup tier={tier} pods={n} rate={} running={} p50_ms={:.0} p99_ms={:.0} max_ms={:.0}",
        if rate > 0.0 {
            format!("{rate}/s")
        } else {
            "burst".into()
        },
        v.len(),
        percentile(&v, 50.0),
        percentile(&v, 99.0),
        v.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "  stages tier={tier}: creates_issued_over_ms={creating:.0} created->bound p50_ms={:.0} p99_ms={:.0}; bound->running p50_ms={:.0} p99_ms={:.0}",
        percentile(&to_bind, 50.0),
        percentile(&to_bind, 99.0),
        percentile(&to_run, 50.0),
        percentile(&to_run, 99.0),
    );
    if keep {
        return Ok(());
    }
    // Clean up, so the next tier starts from an idle node.
    let lp = kube::api::ListParams::default().labels("bench=orch");
    for p in api.list(&lp).await?.items {
        let _ = api.delete(&p.name_any(), &DeleteParams::default()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !api.list(&lp).await?.items.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

fn ns_of(api: &Api<Pod>) -> String {
    api.namespace().unwrap_or("default").to_string()
}

fn hollow_node(name: &str) -> Res<Node> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "evoke.dev/hollow": "true"}},
        "status": {
            "capacity": {"cpu": "4", "memory": "16Gi", "pods": "110"},
            "allocatable": {"cpu": "4", "memory": "16Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "lastHeartbeatTime": now, "lastTransitionTime": now}]
        }
    }))?)
}

async fn scheduler(client: kube::Client, nodes: usize, n: usize) -> Res<()> {
    let ns = "bench-sched";
    ensure_ns(&client, ns).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    // Watch bindings first.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let watch_api = pods.clone();
    tokio::spawn(async move {
        let mut bound = std::collections::HashSet::new();
        let mut s = watcher(watch_api, watcher::Config::default()).boxed();
        while let Ok(Some(ev)) = s.try_next().await {
            if let Event::Apply(p) | Event::InitApply(p) = ev {
                if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
                    && bound.insert(p.name_any())
                {
                    let _ = tx.send(Instant::now());
                }
            }
        }
    });
    // Hollow nodes first, as kube-scheduler's SchedulingBasic sets them up.
    let node_api: Api<Node> = Api::all(client.clone());
    let made: Vec<Res<()>> = futures::stream::iter(0..nodes)
        .map(|i| {
            let api = node_api.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &hollow_node(&format!("hollow-{i:03}"))?,
                )
                .await?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in made {
        r?;
    }
    // Hollow nodes only heartbeat: one Lease each, renewed while we wait.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    ensure_ns(&client, "kube-node-lease").await;
    for i in 0..nodes {
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("hollow-{i:03}"), "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": format!("hollow-{i:03}"), "leaseDurationSeconds": 40,
                     "renewTime": k8s_openapi::jiff::Timestamp::now().to_string()}
        }))?;
        let _ = leases.create(&PostParams::default(), &lease).await;
    }
    // Let the scheduler's node cache fill, then measure creation to binding.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = Instant::now();
    let created: Vec<Res<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let api = pods.clone();
            async move {
                let p = pod(&format!("s{i:05}"), ns, "container", "busybox:1")?;
                api.create(&PostParams::default(), &p).await?;
                Ok(())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for r in created {
        r?;
    }
    let create_secs = t0.elapsed().as_secs_f64();
    let mut last = t0;
    let mut count = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while count < n && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(t)) => {
                count += 1;
                last = t;
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let secs = last.duration_since(t0).as_secs_f64();
    println!(
        "scheduler nodes={nodes} pods={n} bound={count} seconds={secs:.3} pods_per_s={:.0} (from the first create to the last binding; creating took {create_secs:.2}s)",
        count as f64 / secs.max(1e-9)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: orchbench startup KUBECONFIG TIER PODS IMAGE [RATE [keep]] | orchbench scheduler KUBECONFIG NODES PODS";
    let cmd = args.get(1).ok_or(usage)?;
    let kubeconfig = args.get(2).ok_or(usage)?;
    let client =
        evoke_node::token::client_from_kubeconfig(std::path::Path::new(kubeconfig)).await?;
    match cmd.as_str() {
        "startup" => {
            let tier = args.get(3).ok_or(usage)?;
            let n: usize = args.get(4).ok_or(usage)?.parse()?;
            let image = args.get(5).ok_or(usage)?;
            let rate: f64 = args.get(6).map(|r| r.parse()).transpose()?.unwrap_or(0.0);
            let keep = args.get(7).is_some_and(|k| k == "keep");
            startup(client, tier, n, image, rate, keep).await
        }
        "scheduler" => {
            let nodes: usize = args.get(3).ok_or(usage)?.parse()?;
            let n: usize = args.get(4).ok_or(usage)?.parse()?;
            scheduler(client, nodes, n).await
        }
        _ => Err(usage.into()),
    }
}
