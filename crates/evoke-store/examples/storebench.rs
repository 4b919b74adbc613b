//! Store-level benchmark for bench/apiserver/run (not a test): the same
//! workload on the memory, SQLite and etcd backends, one JSON line each.
//!
//! `cargo run --release -p evoke-store --example storebench -- [KEYS]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use evoke_store::etcd::LocalEtcd;
use evoke_store::{Backend, EtcdBackend, ListOptions, MemoryBackend, SqliteBackend};
use futures::StreamExt;
use serde_json::json;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    ms(v[((v.len() as f64 - 1.0) * p).round() as usize])
}

async fn run(name: &str, b: Arc<dyn Backend>, keys: usize) -> Res<serde_json::Value> {
    let value = vec![b'x'; 1500]; // about a pod's JSON
                                  // Creates from 64 concurrent writers.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..64 {
        let (b, value) = (b.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            for i in (w..keys).step_by(64) {
                b.create(&format!("/registry/pods/bench/p-{i:06}"), value.clone())
                    .await?;
            }
            Ok::<_, evoke_store::StoreError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let creates = keys as f64 / started.elapsed().as_secs_f64();
    // Sequential creates: one writer, so no batching (fsync latency).
    let started = Instant::now();
    for i in 0..200 {
        b.create(&format!("/registry/seq/{i}"), value.clone())
            .await?;
    }
    let seq_create = ms(started.elapsed()) / 200.0;
    let mut gets = Vec::new();
    for i in 0..2000 {
        let t = Instant::now();
        b.get(&format!("/registry/pods/bench/p-{:06}", (i * 7919) % keys))
            .await?;
        gets.push(t.elapsed());
    }
    let t = Instant::now();
    let all = b.list("/registry/pods/", ListOptions::default()).await?;
    let list_all = ms(t.elapsed());
    assert_eq!(all.items.len(), keys);
    // Paged as kubectl does (limit 500 + continue at the first page's revision).
    let t = Instant::now();
    let mut opts = ListOptions {
        limit: Some(500),
        ..Default::default()
    };
    let mut n = 0;
    loop {
        let page = b.list("/registry/pods/", opts.clone()).await?;
        n += page.items.len();
        if !page.more {
            break;
        }
        opts.revision = Some(page.revision);
        opts.start_after = page.items.last().map(|kv| kv.key.clone());
        // Writes between pages push the later pages onto the history path.
        b.create(&format!("/registry/other/{n}"), vec![1]).await?;
    }
    let list_paged = ms(t.elapsed());
    assert_eq!(n, keys);
    // Watch fan-out: 100 watchers, 100 writes 5 ms apart.
    let rev = b.revision().await?;
    let mut lat = Vec::new();
    let mut ws = Vec::new();
    for _ in 0..100 {
        ws.push(b.watch("/registry/w/", rev).await?);
    }
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (b2, sent2) = (b.clone(), sent.clone());
    let writer = tokio::spawn(async move {
        for i in 0..100 {
            sent2.lock().map_err(|_| "lock")?.push(Instant::now());
            // Pod-sized values, so the WAL grows as under the API server.
            b2.create(&format!("/registry/w/{i:03}"), vec![b'x'; 1500])
                .await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    });
    let mut handles = Vec::new();
    for mut w in ws {
        let sent = sent.clone();
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..100 {
                w.next().await.ok_or("watch ended")??;
                let at = sent.lock().map_err(|_| "lock")?[i];
                out.push(at.elapsed());
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(out)
        }));
    }
    writer.await??;
    for h in handles {
        lat.extend(h.await??);
    }
    Ok(json!({
        "backend": name,
        "keys": keys,
        "creates_per_s_64_writers": creates,
        "create_ms_sequential": seq_create,
        "get_p99_ms": pct(&mut gets, 0.99),
        "list_all_ms": list_all,
        "list_paged_500_ms": list_paged,
        "watch_p50_ms": pct(&mut lat, 0.5),
        "watch_p99_ms": pct(&mut lat, 0.99),
        "watch_max_ms": pct(&mut lat, 1.0),
    }))
}

#[tokio::main]
async fn main() -> Res<()> {
    let keys: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    let dir = std::env::temp_dir().join(format!("evoke-storebench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mem: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    println!("{}", run("memory", mem, keys).await?);
    let sqlite: Arc<dyn Backend> = Arc::new(SqliteBackend::open(dir.join("state.db"))?);
    println!("{}", run("sqlite", sqlite, keys).await?);
    let etcd = LocalEtcd::start(Some(&dir.join("etcd"))).await?;
    let b: Arc<dyn Backend> = Arc::new(EtcdBackend::connect(etcd.endpoint(), "/evoke").await?);
    println!("{}", run("etcd", b, keys).await?);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
