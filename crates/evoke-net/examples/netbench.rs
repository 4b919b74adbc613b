//! Network benchmark (run by bench/network/run as root): wrk against a
//! busybox httpd pod, through a ClusterIP and directly to the pod IP, from
//! the node namespace; then the time for one Service change to reach the
//! table with 1,000 Services programmed. Everything lives in namespaces this
//! program creates.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use evoke_net::nft::{Endpoint, Protocol, Proxy, ServicePort, ServiceRules};
use evoke_net::{netns, Ipv4Net, PodNetConfig, PodNetwork};

fn svc(name: &str, ip: Ipv4Addr, eps: &[Ipv4Addr]) -> ServiceRules {
    ServiceRules {
        namespace: "bench".into(),
        name: name.into(),
        cluster_ip: Some(ip),
        ports: vec![ServicePort {
            protocol: Protocol::Tcp,
            port: 80,
            node_port: None,
            endpoints: eps
                .iter()
                .map(|ip| Endpoint {
                    ip: *ip,
                    port: 8080,
                })
                .collect(),
        }],
        affinity_timeout: None,
    }
}

/// Runs wrk from the node namespace; returns (req/s, p99 text).
fn wrk(ns: &std::path::Path, url: &str, secs: u32) -> (f64, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args([
            "wrk",
            "-t1",
            "-c16",
            &format!("-d{secs}s"),
            "--latency",
            url,
        ])
        .output()
        .expect("wrk runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let p99 = text
        .lines()
        .find(|l| l.trim_start().starts_with("99%"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?")
        .to_string();
    (rps, p99)
}

#[tokio::main]
async fn main() {
    let secs: u32 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().expect("tempdir");
    let node = dir.path().join("node.net");
    netns::create(&node).expect("node namespace");
    let mut cfg = PodNetConfig::new(
        dir.path().join("data"),
        "10.42.20.0/24".parse::<Ipv4Net>().expect("subnet"),
    );
    cfg.netns_dir = dir.path().join("netns");
    cfg.node_netns = Some(node.clone());
    cfg.service_cidr = Some("10.43.0.0/16".parse().expect("cidr"));
    let net = PodNetwork::new(cfg).await.expect("pod network");
    let pod = net.setup("bench-pod").await.expect("pod");
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("index.html"), "hello from the pod\n").expect("index");
    let mut httpd = Command::new("nsenter")
        .arg(format!("--net={}", pod.netns.display()))
        .args(["busybox", "httpd", "-f", "-p", "8080", "-h"])
        .arg(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("httpd");
    std::thread::sleep(Duration::from_millis(300));

    let mut proxy =
        Proxy::new(Some(node.clone()), "10.42.0.0/16".parse().expect("cidr")).expect("proxy");
    let vip = Ipv4Addr::new(10, 43, 0, 50);
    proxy.apply(svc("web", vip, &[pod.ip])).expect("service");

    let (direct, direct_p99) = wrk(&node, &format!("http://{}:8080/", pod.ip), secs);
    let (via, via_p99) = wrk(&node, &format!("http://{vip}/"), secs);
    println!("direct pod IP : {direct:>10.0} req/s  p99 {direct_p99}");
    println!("via ClusterIP : {via:>10.0} req/s  p99 {via_p99}");
    if direct > 0.0 {
        println!("ratio ClusterIP/direct: {:.3}", via / direct);
    }

    let start = Instant::now();
    for i in 0..1000u32 {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 43, 1, 0)) + i);
        proxy
            .apply(svc(&format!("s{i}"), ip, &[pod.ip]))
            .expect("service");
    }
    println!("program 1000 Services one by one: {:?}", start.elapsed());
    let mut times = Vec::new();
    for round in 0..20u32 {
        let eps: Vec<Ipv4Addr> = (0..=(round % 3))
            .map(|k| Ipv4Addr::new(10, 42, 20, 100 + k as u8))
            .collect();
        let t = Instant::now();
        proxy
            .apply(svc("s500", Ipv4Addr::new(10, 43, 2, 244), &eps))
            .expect("update");
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "one Service change with 1000 Services: median {:?}, max {:?} (20 changes)",
        times[times.len() / 2],
        times[times.len() - 1]
    );

    let _ = httpd.kill();
    let _ = httpd.wait();
    net.teardown("bench-pod").await.expect("teardown");
    let _ = netns::remove(&node);
}
