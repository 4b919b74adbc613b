//! API server load generator for bench/apiserver/run (not a test).
//!
//! Drives a running `evoke server` through the `kube` client, as any
//! Kubernetes client would, and prints one JSON line of measurements:
//! creates/s, single-object GET latency, LIST of every pod, watch delivery
//! latency to many watchers, and the server's RSS idle and loaded.
//!
//! `cargo run --release -p evoke-store --example apiload -- KUBECONFIG
//! SERVER_PID [PODS] [WATCHERS]`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn pod(ns: &str, name: &str) -> Res<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "bench"}},
        "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]}
    }))?)
}

async fn namespace(client: &kube::Client, name: &str) -> Res<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[tokio::main]
async fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: apiload KUBECONFIG SERVER_PID [PODS] [WATCHERS]".into());
    }
    let kc = Kubeconfig::read_from(&args[1])?;
    let pid: u32 = args[2].parse()?;
    let pods: usize = args
        .get(3)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    let watchers: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(100);
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let client = kube::Client::try_from(config)?;
    let rss_idle = rss_mib(pid);

    namespace(&client, "bench").await?;
    let api: Api<Pod> = Api::namespaced(client.clone(), "bench");

    // Creates: `pods` pods from 32 concurrent clients.
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let api = api.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= pods {
                    return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(());
                }
                api.create(&PostParams::default(), &pod("bench", &format!("p-{i}"))?)
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let create_s = started.elapsed().as_secs_f64();
    eprintln!("created {pods} pods in {create_s:.1} s");

    // Single-object GET, one client, sequential.
    let mut gets = Vec::new();
    for i in 0..2000 {
        let name = format!("p-{}", (i * 7919) % pods);
        let t = Instant::now();
        api.get(&name).await?;
        gets.push(t.elapsed());
    }
    gets.sort();

    // LIST of every pod (raw body: the server's work, not client decoding).
    let mut lists = Vec::new();
    let mut list_bytes = 0;
    for _ in 0..5 {
        let req = http::Request::get("/api/v1/namespaces/bench/pods")
            .header("accept", "application/json")
            .body(Vec::new())?;
        let t = Instant::now();
        let body = client.request_text(req).await?;
        lists.push(t.elapsed());
        list_bytes = body.len();
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let n = v["items"].as_array().map(|a| a.len()).unwrap_or(0);
        if n != pods {
            return Err(format!("list returned {n} pods, expected {pods}").into());
        }
    }
    lists.sort();
    let rss_loaded = rss_mib(pid);

    // Watch delivery: `watchers` watchers, then pods created one by one;
    // latency = event received - create request sent.
    namespace(&client, "bench-watch").await?;
    let wapi: Api<Pod> = Api::namespaced(client.clone(), "bench-watch");
    let rv = wapi
        .list_metadata(&Default::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let lat: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let events = 100;
    let mut wtasks = Vec::new();
    for _ in 0..watchers {
        let stream = wapi
            .watch(&WatchParams::default().timeout(280), &rv)
            .await?;
        let (sent, lat) = (sent.clone(), lat.clone());
        wtasks.push(tokio::spawn(async move {
            let mut stream = stream.boxed();
            let mut seen = 0;
            while let Some(ev) = stream.try_next().await? {
                if let WatchEvent::Added(p) = ev {
                    let now = Instant::now();
                    let name = p.metadata.name.unwrap_or_default();
                    let at = sent.lock().map_err(|_| "lock")?.get(&name).copied();
                    if let Some(at) = at {
                        lat.lock().map_err(|_| "lock")?.push(now - at);
                    }
                    seen += 1;
                    if seen == events {
                        return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(());
                    }
                }
            }
            Err("watch ended early".into())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..events {
        let name = format!("w-{i}");
        let p = pod("bench-watch", &name)?;
        sent.lock()
            .map_err(|_| "lock")?
            .insert(name.clone(), Instant::now());
        wapi.create(&PostParams::default(), &p).await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in wtasks {
        tokio::time::timeout(Duration::from_secs(60), t).await???;
    }
    let mut lat = lat.lock().map_err(|_| "lock")?.clone();
    lat.sort();

    println!(
        "{}",
        json!({
            "pods": pods,
            "creates_per_s": pods as f64 / create_s,
            "get_p50_ms": pct(&gets, 0.5),
            "get_p99_ms": pct(&gets, 0.99),
            "list_all_ms": pct(&lists, 0.5),
            "list_bytes": list_bytes,
            "watchers": watchers,
            "watch_deliveries": lat.len(),
            "watch_p50_ms": pct(&lat, 0.5),
            "watch_p99_ms": pct(&lat, 0.99),
            "rss_idle_mib": rss_idle,
            "rss_loaded_mib": rss_loaded,
        })
    );
    Ok(())
}
