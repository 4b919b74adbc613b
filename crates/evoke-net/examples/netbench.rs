//! Network benchmark (run by bench/network/run as root): wrk against a pod,
//! through a ClusterIP and directly to the pod IP, from the node namespace,
//! with two kinds of server in the pod: busybox httpd (a new connection, so a new
//! conntrack entry and NAT binding, per request) and a small keep-alive
//! HTTP/1.1 server (connections reused: the per-packet cost only). Then the
//! time for one Service change to reach the table with 1,000 Services
//! programmed. Everything lives in namespaces this program creates.

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

/// A keep-alive HTTP/1.1 server on `listener`: one thread per connection,
/// a fixed 19-byte body for every request.
fn serve_keep_alive(listener: std::net::TcpListener) {
    use std::io::{Read, Write};
    const RESPONSE: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Length: 19\r\nContent-Type: text/plain\r\n\r\nhello from the pod\n";
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let mut buf = vec![0u8; 8192];
            let mut pending = Vec::new();
            loop {
                let n = match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                pending.extend_from_slice(&buf[..n]);
                // wrk sends GETs without bodies: one response per header block.
                while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    pending.drain(..end + 4);
                    if conn.write_all(RESPONSE).is_err() {
                        return;
                    }
                }
            }
        });
    }
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
    let net = PodNetwork::new(cfg).expect("pod network");
    let pod = net.setup("bench-pod").expect("pod");
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("index.html"), "hello from the pod\n").expect("index");
    // Each path gets its own server port. With one port, the conntrack
    // entries a run leaves behind (TIME_WAIT, 120 s) share their reply
    // tuple (pod:port -> client:port) with the next path's connections, and
    // every such clash costs the NAT-ed path a port remap or a dropped SYN:
    // that, not the rules, was most of the gap measured before.
    // Ports: httpd direct 8080, via ClusterIP 8082, static DNAT 8083;
    // keep-alive direct 8081, ClusterIP 8084, static DNAT 8085.
    let mut httpds = Vec::new();
    for port in ["8080", "8082", "8083"] {
        httpds.push(
            Command::new("nsenter")
                .arg(format!("--net={}", pod.netns.display()))
                .args(["busybox", "httpd", "-f", "-p", port, "-h"])
                .arg(&www)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("httpd"),
        );
    }
    for port in [8081u16, 8084, 8085] {
        // The socket belongs to the namespace it was made in.
        let listener = netns::run_in(Some(&pod.netns), || {
            std::net::TcpListener::bind(("0.0.0.0", port))
        })
        .expect("enter the pod namespace")
        .expect("bind the keep-alive server");
        std::thread::spawn(move || serve_keep_alive(listener));
    }
    std::thread::sleep(Duration::from_millis(300));

    let mut proxy =
        Proxy::new(Some(node.clone()), "10.42.0.0/16".parse().expect("cidr")).expect("proxy");
    let vip = Ipv4Addr::new(10, 43, 0, 50);
    let mut web = svc("web", vip, &[pod.ip]);
    web.ports[0].endpoints[0].port = 8082;
    web.ports.push(ServicePort {
        protocol: Protocol::Tcp,
        port: 81,
        node_port: None,
        endpoints: vec![Endpoint {
            ip: pod.ip,
            port: 8084,
        }],
    });
    proxy.apply(web).expect("service");

    // The floor: one hand-written DNAT rule for another address, so that
    // the cost of NAT itself can be told from the cost of evoke's rules.
    let floor_vip = Ipv4Addr::new(10, 43, 0, 51);
    let floor = format!(
        "table ip floor {{\n\
         \tchain pre {{ type nat hook prerouting priority -101; ip daddr {floor_vip} tcp dport 80 dnat to {ip}:8083; ip daddr {floor_vip} tcp dport 81 dnat to {ip}:8085; }}\n\
         \tchain out {{ type nat hook output priority -101; ip daddr {floor_vip} tcp dport 80 dnat to {ip}:8083; ip daddr {floor_vip} tcp dport 81 dnat to {ip}:8085; }}\n\
         }}\n",
        ip = pod.ip
    );
    evoke_net::nft::run_nft(Some(&node), &floor).expect("floor table");
    // A second pod as the client: pod to pod is bridged, pod to ClusterIP
    // is routed through the node (the prerouting hook).
    let client = net.setup("bench-client").expect("client pod");

    for (who, from) in [("node", node.clone()), ("pod", client.netns.clone())] {
        for (what, direct_url, via_url, floor_url) in [
            (
                "busybox httpd, a connection per request",
                format!("http://{}:8080/", pod.ip),
                format!("http://{vip}/"),
                format!("http://{floor_vip}/"),
            ),
            (
                "keep-alive server, reused connections",
                format!("http://{}:8081/", pod.ip),
                format!("http://{vip}:81/"),
                format!("http://{floor_vip}:81/"),
            ),
        ] {
            // Interleaved twice: the machine is shared, load drifts.
            let (mut d, mut v, mut f) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..2 {
                d.push(wrk(&from, &direct_url, secs));
                v.push(wrk(&from, &via_url, secs));
                f.push(wrk(&from, &floor_url, secs));
            }
            let mean = |r: &[(f64, String)]| r.iter().map(|x| x.0).sum::<f64>() / r.len() as f64;
            let p99s = |r: &[(f64, String)]| {
                r.iter()
                    .map(|x| x.1.clone())
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let (direct, via) = (mean(&d), mean(&v));
            println!("client in the {who}, {what}:");
            println!("  direct pod IP : {direct:>10.0} req/s  p99 {}", p99s(&d));
            println!("  via ClusterIP : {via:>10.0} req/s  p99 {}", p99s(&v));
            if direct > 0.0 {
                println!("  ratio ClusterIP/direct: {:.3}", via / direct);
            }
            let floor = mean(&f);
            println!(
                "  one static DNAT rule: {floor:>10.0} req/s  p99 {}",
                p99s(&f)
            );
            if direct > 0.0 && floor > 0.0 {
                println!(
                    "  ratio static DNAT/direct: {:.3}, ClusterIP/static DNAT: {:.3}",
                    floor / direct,
                    via / floor
                );
            }
        }
    }

    let all: Vec<ServiceRules> = (0..1000u32)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 43, 1, 0)) + i);
            svc(&format!("s{i}"), ip, &[pod.ip])
        })
        .collect();
    let start = Instant::now();
    let errors = proxy.apply_all(all);
    assert!(errors.is_empty(), "{errors:?}");
    println!(
        "program 1000 Services in one transaction (a resync): {:?}",
        start.elapsed()
    );
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

    for mut h in httpds {
        let _ = h.kill();
        let _ = h.wait();
    }
    net.teardown("bench-pod").expect("teardown");
    net.teardown("bench-client").expect("teardown");
    let _ = netns::remove(&node);
}
