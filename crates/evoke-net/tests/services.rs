//! Service rules on a real data path: a node namespace with a bridge, two
//! pods serving HTTP with busybox, and the nftables table programmed by the
//! proxy. Needs root, nft and busybox; CI=true turns their absence into a
//! failure.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use evoke_net::nft::{Endpoint, Protocol, Proxy, ServicePort, ServiceRules};
use evoke_net::{netns, Ipv4Net, PodNetConfig, PodNetwork};

fn ready() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let tools = ["nft", "busybox", "nsenter"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    });
    if root && tools {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("service tests need root, nft, busybox and nsenter (root={root}, tools={tools}) and CI=true");
    }
    eprintln!("skipping: service tests need root, nft, busybox and nsenter");
    false
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// busybox httpd in the pod namespace answering `body` on port 8080.
fn serve(ns: &Path, dir: &Path, body: &str) -> Server {
    std::fs::create_dir_all(dir).expect("www dir");
    std::fs::write(dir.join("index.html"), body).expect("index");
    let child = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["busybox", "httpd", "-f", "-p", "8080", "-h"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("httpd");
    Server(child)
}

/// One HTTP GET from inside `ns`; `None` when nothing answers.
fn get(ns: &Path, url: &str) -> Option<String> {
    // busybox wget's own -T timeout crashes the Debian 12 static build, so
    // the bound comes from timeout(1).
    let out = Command::new("timeout")
        .arg("3")
        .arg("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["busybox", "wget", "-q", "-O", "-", url])
        .output()
        .expect("wget runs");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn web(endpoints: &[Ipv4Addr], affinity: Option<u32>) -> ServiceRules {
    ServiceRules {
        namespace: "default".into(),
        name: "web".into(),
        cluster_ip: Some(Ipv4Addr::new(10, 43, 0, 50)),
        ports: vec![ServicePort {
            protocol: Protocol::Tcp,
            port: 80,
            node_port: Some(30080),
            endpoints: endpoints
                .iter()
                .map(|ip| Endpoint {
                    ip: *ip,
                    port: 8080,
                })
                .collect(),
        }],
        affinity_timeout: affinity,
    }
}

struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = netns::remove(p);
        }
    }
}

#[tokio::test]
async fn cluster_ip_balances_over_ready_endpoints_follows_changes_and_stops_when_deleted() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let node_ns = dir.path().join("node.net");
    netns::create(&node_ns).expect("node namespace");
    let mut cfg = PodNetConfig::new(
        dir.path().join("data"),
        "10.42.11.0/24".parse::<Ipv4Net>().expect("subnet"),
    );
    cfg.netns_dir = dir.path().join("netns");
    cfg.node_netns = Some(node_ns.clone());
    cfg.service_cidr = Some("10.43.0.0/16".parse().expect("cidr"));
    let net = PodNetwork::new(cfg).expect("pod network");
    let a = net.setup("svc-a").expect("pod a");
    let b = net.setup("svc-b").expect("pod b");
    let _cleanup = Cleanup(vec![a.netns.clone(), b.netns.clone(), node_ns.clone()]);
    let _sa = serve(&a.netns, &dir.path().join("www-a"), "from-a");
    let _sb = serve(&b.netns, &dir.path().join("www-b"), "from-b");
    // Wait until both servers listen.
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&node_ns, &format!("http://{}:8080/", a.ip)).is_none()
        || get(&node_ns, &format!("http://{}:8080/", b.ip)).is_none()
    {
        assert!(Instant::now() < deadline, "pod servers did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut proxy =
        Proxy::new(Some(node_ns.clone()), "10.42.0.0/16".parse().expect("cidr")).expect("proxy");
    proxy.apply(web(&[a.ip, b.ip], None)).expect("apply");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(get(&node_ns, "http://10.43.0.50/").expect("clusterIP answers from the node"));
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "load spread over both endpoints: {seen:?}");
    for _ in 0..6 {
        // From a pod, including hairpin back to itself.
        let body = get(&a.netns, "http://10.43.0.50/").expect("clusterIP answers from a pod");
        assert!(body == "from-a" || body == "from-b", "{body}");
    }
    let node_port = format!("http://{}:30080/", net.ipam().subnet().gateway());
    assert!(get(&b.netns, &node_port).is_some(), "NodePort answers");

    // b becomes unready: it leaves the rotation.
    proxy.apply(web(&[a.ip], None)).expect("apply one endpoint");
    for _ in 0..10 {
        assert_eq!(
            get(&node_ns, "http://10.43.0.50/").as_deref(),
            Some("from-a")
        );
    }

    // ClientIP affinity: one client keeps its endpoint.
    proxy
        .apply(web(&[a.ip, b.ip], Some(300)))
        .expect("apply affinity");
    let first = get(&node_ns, "http://10.43.0.50/").expect("affinity answer");
    for _ in 0..10 {
        assert_eq!(
            get(&node_ns, "http://10.43.0.50/").as_deref(),
            Some(first.as_str())
        );
    }

    // A headless Service has no rules at all.
    let mut headless = web(&[a.ip], None);
    headless.name = "headless".into();
    headless.cluster_ip = None;
    proxy.apply(headless).expect("apply headless");

    proxy.remove("default", "web").expect("remove");
    assert_eq!(
        get(&node_ns, "http://10.43.0.50/"),
        None,
        "deleted Service stops answering"
    );
    let listing = Command::new("nsenter")
        .arg(format!("--net={}", node_ns.display()))
        .args(["nft", "list", "table", "ip", "evoke"])
        .output()
        .expect("nft list");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        !listing.contains("default.web"),
        "no rules left:\n{listing}"
    );
    assert!(
        !listing.contains("headless"),
        "headless has no rules:\n{listing}"
    );

    net.teardown("svc-a").expect("teardown a");
    net.teardown("svc-b").expect("teardown b");
}

/// Time for a change to one Service to reach the table while 1,000 others
/// are programmed: it must not grow with the number of Services.
#[tokio::test]
async fn one_service_change_among_a_thousand_is_one_small_transaction() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let node_ns = dir.path().join("node.net");
    netns::create(&node_ns).expect("node namespace");
    let _cleanup = Cleanup(vec![node_ns.clone()]);
    let mut proxy =
        Proxy::new(Some(node_ns.clone()), "10.42.0.0/16".parse().expect("cidr")).expect("proxy");
    let start = Instant::now();
    let all: Vec<ServiceRules> = (0..1000u32)
        .map(|i| {
            let mut s = web(&[Ipv4Addr::new(10, 42, 1, 2)], None);
            s.name = format!("s{i}");
            s.cluster_ip = Some(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 43, 1, 0)) + i));
            s.ports[0].node_port = None;
            s
        })
        .collect();
    let errors = proxy.apply_all(all);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(proxy.services().count(), 1000);
    eprintln!(
        "1000 services programmed in one transaction in {:?}",
        start.elapsed()
    );
    let mut s = web(
        &[Ipv4Addr::new(10, 42, 1, 2), Ipv4Addr::new(10, 42, 1, 3)],
        None,
    );
    s.name = "s500".into();
    s.cluster_ip = Some(Ipv4Addr::new(10, 43, 2, 244));
    s.ports[0].node_port = None;
    let script =
        evoke_net::nft::service_update(proxy.services().find(|x| x.name == "s500"), Some(&s));
    assert!(script.lines().count() < 20, "update is small:\n{script}");
    let t = Instant::now();
    proxy.apply(s).expect("update");
    eprintln!("one update with 1000 services: {:?}", t.elapsed());
    let listing = Command::new("nsenter")
        .arg(format!("--net={}", node_ns.display()))
        .args([
            "nft",
            "list",
            "chain",
            "ip",
            "evoke",
            "svc.default.s500.tcp.80",
        ])
        .output()
        .expect("nft list");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("numgen random mod 2"), "{listing}");
}

/// The ServiceProxy's resync: Services and EndpointSlices in, rules and DNS
/// records out; a Service gone from the API loses both.
#[tokio::test]
async fn service_proxy_sync_programs_rules_and_dns_and_drops_deleted_services() {
    use evoke_net::dns::{Answer, Records};
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let node_ns = dir.path().join("node.net");
    netns::create(&node_ns).expect("node namespace");
    let _cleanup = Cleanup(vec![node_ns.clone()]);
    let proxy =
        Proxy::new(Some(node_ns.clone()), "10.42.0.0/16".parse().expect("cidr")).expect("proxy");
    let records = std::sync::Arc::new(std::sync::RwLock::new(Records::default()));
    let mut sp = evoke_net::proxy::ServiceProxy::new(proxy, records.clone());
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"clusterIP": "10.43.0.77", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .expect("service");
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "api-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "api"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["10.42.3.4"], "conditions": {"ready": true}},
                      {"addresses": ["10.42.3.5"], "conditions": {"ready": false}}]
    }))
    .expect("slice");
    sp.sync(&[svc], std::slice::from_ref(&slice)).expect("sync");
    let list = |chain: &str| {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", node_ns.display()))
            .args(["nft", "list", "table", "ip", "evoke"])
            .output()
            .expect("nft list");
        String::from_utf8_lossy(&out.stdout).contains(chain)
    };
    assert!(list("svc.shop.api.tcp.80"));
    assert!(list("10.42.3.4:8080"));
    assert!(!list("10.42.3.5"), "unready endpoint left out");
    assert_eq!(
        records
            .read()
            .expect("lock")
            .lookup("api.shop.svc.cluster.local."),
        Answer::Addresses(vec![Ipv4Addr::new(10, 43, 0, 77)])
    );
    sp.sync(&[], &[slice]).expect("sync after delete");
    assert!(!list("svc.shop.api"), "deleted Service's rules removed");
    assert_eq!(
        records
            .read()
            .expect("lock")
            .lookup("api.shop.svc.cluster.local."),
        Answer::NxDomain
    );
}

/// A Service at an address the node serves itself (kube-dns at the cluster
/// DNS address) is named in DNS but never DNAT-ed: with no endpoints its
/// rules would drop the node's own DNS traffic.
#[tokio::test]
async fn a_locally_served_service_gets_a_name_and_no_rules() {
    use evoke_net::dns::{Answer, Records};
    use k8s_openapi::api::core::v1::Service;
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let node_ns = dir.path().join("node.net");
    netns::create(&node_ns).expect("node namespace");
    let _cleanup = Cleanup(vec![node_ns.clone()]);
    let proxy =
        Proxy::new(Some(node_ns.clone()), "10.42.0.0/16".parse().expect("cidr")).expect("proxy");
    let records = std::sync::Arc::new(std::sync::RwLock::new(Records::default()));
    let dns = Ipv4Addr::new(10, 43, 0, 10);
    let mut sp = evoke_net::proxy::ServiceProxy::new(proxy, records.clone()).serve_locally(dns);
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "kube-dns", "namespace": "kube-system"},
        "spec": {"clusterIP": "10.43.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}
    }))
    .expect("service");
    sp.sync(&[svc], &[]).expect("sync");
    let table = Command::new("nsenter")
        .arg(format!("--net={}", node_ns.display()))
        .args(["nft", "list", "table", "ip", "evoke"])
        .output()
        .expect("nft list");
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.contains("map services"), "{table}");
    assert!(
        !table.contains("10.43.0.10"),
        "no rule for the local address:\n{table}"
    );
    let lookup = |name: &str| records.read().expect("lock").lookup(name);
    assert_eq!(
        lookup("kube-dns.kube-system.svc.cluster.local."),
        Answer::Addresses(vec![dns])
    );
    sp.sync(&[], &[]).expect("sync after delete");
    assert_eq!(
        lookup("kube-dns.kube-system.svc.cluster.local."),
        Answer::NxDomain,
        "a deleted local Service loses its name"
    );
}

/// A resync programs every changed Service in one transaction; when that
/// fails, a bad Service is isolated and the others are still programmed.
#[tokio::test]
async fn a_failed_batch_falls_back_to_one_transaction_per_service() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let node_ns = dir.path().join("node.net");
    netns::create(&node_ns).expect("node namespace");
    let _cleanup = Cleanup(vec![node_ns.clone()]);
    let mut proxy =
        Proxy::new(Some(node_ns.clone()), "10.42.0.0/16".parse().expect("cidr")).expect("proxy");
    let svc = |name: &str, ip: [u8; 4]| {
        let mut s = web(&[Ipv4Addr::new(10, 42, 1, 2)], None);
        s.name = name.into();
        s.cluster_ip = Some(Ipv4Addr::from(ip));
        s.ports[0].node_port = None;
        s
    };
    // "b" claims the address and port "a" has: the map refuses the second.
    let batch = vec![
        svc("a", [10, 43, 5, 1]),
        svc("b", [10, 43, 5, 1]),
        svc("c", [10, 43, 5, 3]),
    ];
    let errors = proxy.apply_all(batch);
    let failed: Vec<&str> = errors.iter().map(|((_, n), _)| n.as_str()).collect();
    assert_eq!(failed, vec!["b"], "{errors:?}");
    let mut programmed: Vec<&str> = proxy.services().map(|s| s.name.as_str()).collect();
    programmed.sort();
    assert_eq!(programmed, vec!["a", "c"]);
    let listing = Command::new("nsenter")
        .arg(format!("--net={}", node_ns.display()))
        .args(["nft", "list", "map", "ip", "evoke", "services"])
        .output()
        .expect("nft list");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("10.43.5.1") && listing.contains("10.43.5.3"),
        "{listing}"
    );
    // Unchanged Services cost nothing the second time.
    assert!(proxy
        .apply_all(vec![svc("a", [10, 43, 5, 1]), svc("c", [10, 43, 5, 3])])
        .is_empty());
}
