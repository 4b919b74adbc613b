//! Pod network in namespaces the tests create: a node namespace holds the
//! bridge, pods get their own namespaces. Needs root; CI=true makes a missing
//! privilege a failure rather than a skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evoke_net::{netns, Ipv4Net, PodIpam, PodNetConfig, PodNetwork};

fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("pod network tests need root (network namespaces, netlink) and CI=true");
    }
    eprintln!("skipping: pod network tests need root");
    false
}

struct Node {
    _dir: tempfile::TempDir,
    ns: PathBuf,
    cfg: PodNetConfig,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.cfg.netns_dir) {
            for e in entries.flatten() {
                let _ = netns::remove(&e.path());
            }
        }
        let _ = netns::remove(&self.ns);
    }
}

fn node(subnet: &str) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let ns = dir.path().join("node.net");
    netns::create(&ns).expect("node namespace");
    let mut cfg = PodNetConfig::new(
        dir.path().join("data"),
        subnet.parse::<Ipv4Net>().expect("subnet"),
    );
    cfg.netns_dir = dir.path().join("netns");
    cfg.node_netns = Some(ns.clone());
    Node { _dir: dir, ns, cfg }
}

/// Runs a command inside the namespace at `ns` and returns (success, stdout).
fn run_in(ns: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(args)
        .output()
        .expect("nsenter runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn links(ns: &Path) -> Vec<String> {
    let (ok, out) = run_in(ns, &["ip", "-o", "link", "show"]);
    assert!(ok, "ip link in {}", ns.display());
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

#[test]
fn pods_get_an_address_a_route_and_reach_each_other_and_the_node() {
    if !privileged() {
        return;
    }
    let n = node("10.42.7.0/24");
    let net = PodNetwork::new(n.cfg.clone()).expect("pod network");
    let a = net.setup("pod-a").expect("setup a");
    let b = net.setup("pod-b").expect("setup b");
    assert_eq!(a.ip.to_string(), "10.42.7.2");
    assert_eq!(b.ip.to_string(), "10.42.7.3");
    // Setting up again keeps the address.
    assert_eq!(net.setup("pod-a").expect("setup a again").ip, a.ip);

    let (ok, addr) = run_in(&a.netns, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(ok && addr.contains("10.42.7.2/24"), "eth0 address: {addr}");
    let (ok, route) = run_in(&a.netns, &["ip", "route", "show", "default"]);
    assert!(
        ok && route.contains("via 10.42.7.1 dev eth0"),
        "default route: {route}"
    );
    let (_, lo) = run_in(&a.netns, &["ip", "-o", "link", "show", "lo"]);
    assert!(lo.contains("UP") || lo.contains("LOWER_UP"), "lo up: {lo}");
    // The host end: on the bridge, up, with hairpin (a pod reaching itself
    // through a Service address).
    let (_, host) = run_in(&n.ns, &["ip", "-d", "-o", "link", "show", &a.host_veth]);
    assert!(
        host.contains("master evoke0") && host.contains(",UP") && host.contains("hairpin on"),
        "host veth: {host}"
    );

    let ping = |ns: &Path, ip: &str| run_in(ns, &["busybox", "ping", "-c", "1", "-W", "3", ip]).0;
    assert!(ping(&a.netns, "10.42.7.3"), "pod a reaches pod b");
    assert!(ping(&b.netns, "10.42.7.2"), "pod b reaches pod a");
    assert!(ping(&n.ns, "10.42.7.2"), "node reaches pod a");
    assert!(ping(&a.netns, "10.42.7.1"), "pod a reaches the bridge");

    net.teardown("pod-a").expect("teardown a");
    net.teardown("pod-a").expect("teardown is idempotent");
    assert!(!a.netns.exists(), "namespace file removed");
    assert!(!links(&n.ns).contains(&a.host_veth), "host veth removed");
    assert!(ping(&b.netns, "10.42.7.1"), "pod b unaffected");
    assert_eq!(net.ipam().allocations().len(), 1);
    net.teardown("pod-b").expect("teardown b");
}

#[test]
fn addresses_survive_a_restart_of_the_pod_network() {
    if !privileged() {
        return;
    }
    let n = node("10.42.8.0/24");
    let ip = {
        let net = PodNetwork::new(n.cfg.clone()).expect("pod network");
        net.setup("keep").expect("setup").ip
    };
    let net = PodNetwork::new(n.cfg.clone()).expect("restarted");
    assert_eq!(net.ipam().get("keep"), Some(ip));
    let other = net.setup("other").expect("setup other");
    assert_ne!(other.ip, ip);
    net.teardown("keep").expect("teardown");
    net.teardown("other").expect("teardown");
}

/// Waits (bounded) until the pool holds `n` ready sandboxes.
fn wait_pooled(net: &PodNetwork, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while net.pooled() < n {
        assert!(
            Instant::now() < deadline,
            "the pool did not refill to {n} in 20 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The namespace files left in `dir`.
fn netns_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Cycles create/delete and checks nothing is left behind, without and then
/// with a pool of pre-made sandboxes (every other pod takes one from a full
/// pool, the others race its refill thread), and that dropping the network
/// tears the pool down. The count is kept where the test stays well under a
/// minute on a loaded 2-core machine; the `EVOKE_NET_CYCLES` variable raises
/// it (the issue asks for 1,000).
#[test]
fn create_delete_cycles_leak_no_addresses_veths_or_namespaces() {
    if !privileged() {
        return;
    }
    let cycles: usize = std::env::var("EVOKE_NET_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let n = node("10.42.9.0/24");
    let net = PodNetwork::new(n.cfg.clone()).expect("pod network");
    let baseline = links(&n.ns);
    let start = Instant::now();
    for i in 0..cycles {
        let uid = format!("cycle-{i}");
        let a = net.setup(&uid).expect("setup");
        // Every pod gets the lowest address back: the previous one was freed.
        assert_eq!(a.ip.to_string(), "10.42.9.2", "cycle {i}");
        net.teardown(&uid).expect("teardown");
    }
    eprintln!("{cycles} cycles in {:?}", start.elapsed());
    assert!(net.ipam().allocations().is_empty(), "addresses leaked");
    assert_eq!(links(&n.ns), baseline, "links leaked");
    let left = netns_files(&n.cfg.netns_dir);
    assert!(left.is_empty(), "namespaces leaked: {left:?}");

    let net = Arc::new(net);
    net.start_pool(2, Duration::ZERO);
    let start = Instant::now();
    for i in 0..cycles {
        if i % 2 == 0 {
            wait_pooled(&net, 2);
        }
        let uid = format!("pooled-{i}");
        let a = net.setup(&uid).expect("setup");
        assert!(netns::is_netns(&a.netns), "cycle {i}: a namespace");
        assert_eq!(net.ipam().get(&uid), Some(a.ip), "cycle {i}");
        net.teardown(&uid).expect("teardown");
    }
    eprintln!("{cycles} cycles with a pool in {:?}", start.elapsed());
    // Not a plain drop: the refill thread may hold the last handle then,
    // and tear the pool down after this thread looked.
    net.stop_pool();
    drop(net);
    let ipam = PodIpam::open(&n.cfg.data_dir, n.cfg.subnet).expect("ipam");
    assert!(
        ipam.allocations().is_empty(),
        "addresses leaked: {:?}",
        ipam.allocations()
    );
    assert_eq!(links(&n.ns), baseline, "links leaked");
    let left = netns_files(&n.cfg.netns_dir);
    assert!(left.is_empty(), "namespaces leaked: {left:?}");
}

/// A new pod takes a pre-made sandbox: its namespace is pinned under the
/// pod's name, eth0 has the address IPAM now gives the pod, and the host
/// veth answers to the pod's veth name on the bridge, so that a repeated
/// set-up (an agent restart) keeps the very veth and teardown finds it.
#[test]
fn a_new_pod_takes_a_pooled_sandbox_that_works_like_its_own_and_the_pool_refills() {
    if !privileged() {
        return;
    }
    let n = node("10.42.14.0/24");
    let net = Arc::new(PodNetwork::new(n.cfg.clone()).expect("pod network"));
    let baseline = links(&n.ns);
    net.start_pool(2, Duration::ZERO);
    wait_pooled(&net, 2);
    let a = net.setup("pod-a").expect("setup a");
    assert_eq!(a.ip.to_string(), "10.42.14.2", "the oldest pooled sandbox");
    assert_eq!(a.netns, n.cfg.netns_dir.join("evoke-pod-a"));
    assert!(netns::is_netns(&a.netns));
    let (ok, addr) = run_in(&a.netns, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(ok && addr.contains("10.42.14.2/24"), "eth0 address: {addr}");
    let (_, route) = run_in(&a.netns, &["ip", "route", "show", "default"]);
    assert!(route.contains("via 10.42.14.1 dev eth0"), "{route}");
    let (ok, host) = run_in(
        &n.ns,
        &["ip", "-d", "-o", "link", "show", "dev", &a.host_veth],
    );
    assert!(ok, "the host veth answers to the pod's name");
    assert!(
        host.contains("master evoke0") && host.contains(",UP") && host.contains("hairpin on"),
        "host veth: {host}"
    );
    let index = host.split(':').next().unwrap_or_default().to_string();
    assert!(
        links(&n.ns).iter().filter(|l| l.starts_with("ve")).count() == 1,
        "pooled veths are not named like pods' (vq, not ve)"
    );

    wait_pooled(&net, 2);
    let again = net.setup("pod-a").expect("set up again");
    assert_eq!((again.ip, &again.netns), (a.ip, &a.netns));
    let (_, host) = run_in(&n.ns, &["ip", "-o", "link", "show", "dev", &a.host_veth]);
    assert!(
        host.starts_with(&format!("{index}:")),
        "the same veth: {host}"
    );
    assert_eq!(net.pooled(), 2, "an existing pod takes no sandbox");

    let b = net.setup("pod-b").expect("setup b");
    let ping = |ns: &Path, ip: &str| run_in(ns, &["busybox", "ping", "-c", "1", "-W", "3", ip]).0;
    assert!(ping(&a.netns, &b.ip.to_string()), "pod a reaches pod b");
    assert!(ping(&n.ns, &a.ip.to_string()), "the node reaches pod a");

    net.teardown("pod-a").expect("teardown a");
    net.teardown("pod-b").expect("teardown b");
    assert!(!a.netns.exists() && !b.netns.exists(), "namespaces removed");
    assert!(!links(&n.ns).contains(&a.host_veth));
    wait_pooled(&net, 2);
    net.stop_pool();
    assert_eq!(
        links(&n.ns),
        baseline,
        "stopping the pool tears its sandboxes down"
    );
    drop(net);
    assert!(netns_files(&n.cfg.netns_dir).is_empty());
    let ipam = PodIpam::open(&n.cfg.data_dir, n.cfg.subnet).expect("ipam");
    assert!(ipam.allocations().is_empty(), "{:?}", ipam.allocations());
}

/// IPAM entries under pool keys (persisted by an older version, or left by
/// a crash) are released at start with whatever such a key still names (a
/// pinned namespace, a veth); pods are left alone.
#[test]
fn pooled_sandboxes_a_killed_node_left_are_reclaimed_when_the_network_starts() {
    if !privileged() {
        return;
    }
    let n = node("10.42.15.0/24");
    let net = PodNetwork::new(n.cfg.clone()).expect("pod network");
    let baseline = links(&n.ns);
    // What an older version's kill -9 left: addresses persisted under pool
    // keys, a veth and a pinned namespace.
    net.ipam()
        .allocate("pool-00000000000000aa")
        .expect("an address");
    net.setup("pool-00000000000000bb").expect("pinned sandbox");
    let pod = net.setup("pod-kept").expect("a pod");
    drop(net);
    assert_eq!(netns_files(&n.cfg.netns_dir).len(), 2);

    let net = PodNetwork::new(n.cfg.clone()).expect("restarted");
    let held: Vec<String> = net.ipam().allocations().into_keys().collect();
    assert_eq!(held, vec!["pod-kept".to_string()]);
    assert_eq!(netns_files(&n.cfg.netns_dir), vec![pod.netns.clone()]);
    let mut expected = baseline.clone();
    expected.push(pod.host_veth.clone());
    expected.sort();
    let mut now = links(&n.ns);
    now.sort();
    assert_eq!(now, expected, "only the pod's veth is left");
    net.teardown("pod-kept").expect("teardown");
}

/// The agent calls its network seam from `spawn_blocking` threads, many
/// at once in a burst of pods: each attach must work from there, alone or
/// beside others, give every pod its own address and a configured eth0,
/// and leave nothing behind once torn down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_network_attaches_many_pods_at_once_from_blocking_threads() {
    use evoke_node::network::PodNetwork as _;
    if !privileged() {
        return;
    }
    let n = node("10.42.12.0/24");
    let cfg = n.cfg.clone();
    let seam = std::sync::Arc::new(
        tokio::task::spawn_blocking(move || evoke_net::node::BridgeNetwork::new(cfg))
            .await
            .expect("join")
            .expect("bridge network"),
    );
    let baseline = links(&n.ns);
    let uids: Vec<String> = (0..16).map(|i| format!("burst-pod-{i}")).collect();
    let setups: Vec<_> = uids
        .iter()
        .map(|uid| {
            let (s, uid) = (seam.clone(), uid.clone());
            tokio::task::spawn_blocking(move || s.setup(&uid, "default", "web"))
        })
        .collect();
    let mut nets = Vec::new();
    for t in setups {
        nets.push(t.await.expect("join").expect("setup"));
    }
    let mut ips: Vec<String> = nets.iter().filter_map(|n| n.ip.clone()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), uids.len(), "every pod has its own address");
    for net in &nets {
        let ns = net.netns.clone().expect("a namespace");
        let ip = net.ip.clone().expect("an address");
        let (ok, addr) = run_in(&ns, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        assert!(ok && addr.contains(&format!("{ip}/24")), "{addr}");
        let (_, eth0) = run_in(&ns, &["ip", "-o", "link", "show", "eth0"]);
        assert!(eth0.contains(",UP"), "eth0 up: {eth0}");
        let (_, route) = run_in(&ns, &["ip", "route", "show", "default"]);
        assert!(route.contains("via 10.42.12.1 dev eth0"), "{route}");
    }
    assert!(
        run_in(
            &nets[0].netns.clone().expect("ns"),
            &[
                "busybox",
                "ping",
                "-c",
                "1",
                "-W",
                "3",
                nets[15].ip.as_deref().expect("ip")
            ]
        )
        .0,
        "the first pod of the burst reaches the last"
    );
    let teardowns: Vec<_> = uids
        .iter()
        .map(|uid| {
            let (s, uid) = (seam.clone(), uid.clone());
            tokio::task::spawn_blocking(move || s.teardown(&uid))
        })
        .collect();
    for t in teardowns {
        t.await.expect("join").expect("teardown");
    }
    assert_eq!(links(&n.ns), baseline, "no veth left");
    assert!(
        seam.pod_network().ipam().allocations().is_empty(),
        "no address left"
    );
    for net in &nets {
        assert!(
            !net.netns.clone().expect("ns").exists(),
            "namespace removed"
        );
    }
}

#[test]
fn microvm_pods_get_a_tap_on_the_bridge_that_teardown_removes() {
    if !privileged() {
        return;
    }
    let n = node("10.42.13.0/24");
    let net = PodNetwork::new(n.cfg.clone()).expect("pod network");
    let (tap, ip) = net.create_tap("vm-pod").expect("tap");
    assert_eq!(ip.to_string(), "10.42.13.2");
    assert_eq!(net.create_tap("vm-pod").expect("again").0, tap);
    let (ok, out) = run_in(&n.ns, &["ip", "-o", "link", "show", &tap]);
    assert!(ok && out.contains("master evoke0"), "{out}");
    net.teardown("vm-pod").expect("teardown");
    assert!(!links(&n.ns).contains(&tap), "tap removed");
    assert!(net.ipam().allocations().is_empty());
}

/// What the node agent relies on after a restart and for other nodes: an
/// intact pod keeps its very veth (its connections survive), the bridge
/// holds the cluster DNS address, and other nodes' subnets are routed and
/// unrouted.
#[test]
fn an_intact_pod_keeps_its_veth_and_the_node_holds_dns_address_and_routes() {
    if !privileged() {
        return;
    }
    let n = node("10.42.11.0/24");
    let net = PodNetwork::new(n.cfg.clone()).expect("pod network");
    let a = net.setup("pod-keep").expect("setup");
    let index = |name: &str| {
        let (ok, out) = run_in(&n.ns, &["ip", "-o", "link", "show", "dev", name]);
        assert!(ok, "link {name}");
        out.split(':').next().unwrap_or_default().to_string()
    };
    let before = index(&a.host_veth);
    let restarted = PodNetwork::new(n.cfg.clone()).expect("restarted");
    let again = restarted.setup("pod-keep").expect("setup again");
    assert_eq!(again.ip, a.ip);
    assert_eq!(index(&a.host_veth), before, "the same veth, not a new one");

    restarted
        .add_bridge_address("10.43.0.10".parse().expect("ip"))
        .expect("dns address");
    restarted
        .add_bridge_address("10.43.0.10".parse().expect("ip"))
        .expect("adding it again is fine");
    let (_, addrs) = run_in(&n.ns, &["ip", "-4", "-o", "addr", "show", "dev", "evoke0"]);
    assert!(addrs.contains("10.43.0.10/32"), "{addrs}");

    let other: Ipv4Net = "10.42.12.0/24".parse().expect("cidr");
    restarted
        .route_via(other, "10.42.11.200".parse().expect("ip"))
        .expect("route");
    restarted
        .route_via(other, "10.42.11.201".parse().expect("ip"))
        .expect("a moved node's route is replaced");
    let (_, routes) = run_in(&n.ns, &["ip", "route", "show", "10.42.12.0/24"]);
    assert!(routes.contains("via 10.42.11.201"), "{routes}");
    restarted.delete_route(other).expect("unroute");
    restarted
        .delete_route(other)
        .expect("a missing route is fine");
    let (_, routes) = run_in(&n.ns, &["ip", "route", "show", "10.42.12.0/24"]);
    assert!(routes.trim().is_empty(), "{routes}");
    restarted.teardown("pod-keep").expect("teardown");
}

/// `--flannel-backend none`: a namespace per pod with `lo` up and nothing
/// else, made and removed without the `ip` tool; setup is idempotent.
#[test]
fn loopback_pods_get_a_namespace_with_only_lo_up() {
    use evoke_node::network::PodNetwork as _;
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let net = evoke_net::node::LoopbackNetwork::new(dir.path().join("netns"));
    let got = net.setup("lo-pod", "default", "p").expect("setup");
    let ns = got.netns.clone().expect("a namespace");
    assert!(netns::is_netns(&ns));
    assert_eq!(got.ip, None);
    assert_eq!(links(&ns), vec!["lo".to_string()]);
    let (_, lo) = run_in(&ns, &["ip", "-o", "link", "show", "lo"]);
    assert!(
        lo.contains(",UP") || lo.contains("<LOOPBACK,UP"),
        "lo up: {lo}"
    );
    let (ok, _) = run_in(&ns, &["busybox", "ping", "-c", "1", "-W", "2", "127.0.0.1"]);
    assert!(ok, "loopback answers");
    assert_eq!(net.setup("lo-pod", "default", "p").expect("again"), got);
    net.teardown("lo-pod").expect("teardown");
    net.teardown("lo-pod").expect("teardown is idempotent");
    assert!(!ns.exists());
}

/// A node killed with -9 cannot tear its pool down: nothing of the pool may
/// outlive the process. Runs the pool in a child process (this very test,
/// re-executed), kills it once the pool is full and checks the node.
#[test]
fn a_pool_leaves_nothing_behind_when_its_process_is_killed() {
    use std::io::BufRead;
    const CHILD: &str = "EVOKE_POOL_TEST_CHILD";
    if let Ok(dir) = std::env::var(CHILD) {
        // The child: a pool of 3 in the parent's node namespace.
        let cfg: PodNetConfig = {
            let dir = PathBuf::from(dir);
            let mut cfg =
                PodNetConfig::new(dir.join("data"), "10.42.16.0/24".parse().expect("subnet"));
            cfg.netns_dir = dir.join("netns");
            cfg.node_netns = Some(dir.join("node.net"));
            cfg
        };
        let net = Arc::new(PodNetwork::new(cfg).expect("pod network"));
        net.start_pool(3, Duration::ZERO);
        wait_pooled(&net, 3);
        println!("pool ready");
        std::thread::sleep(Duration::from_secs(120));
        return;
    }
    if !privileged() {
        return;
    }
    let n = node("10.42.16.0/24");
    let dir = n.ns.parent().expect("dir").to_path_buf();
    // The bridge first, so that the baseline has it.
    drop(PodNetwork::new(n.cfg.clone()).expect("pod network"));
    let baseline = links(&n.ns);
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_pool_leaves_nothing_behind_when_its_process_is_killed",
            "--nocapture",
        ])
        .env(CHILD, &dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("child");
    let out = child.stdout.take().expect("stdout");
    let ready = std::io::BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("pool ready"));
    let full = links(&n.ns).len();
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    assert!(ready, "the child's pool filled");
    assert_eq!(full, baseline.len() + 3, "3 pooled veths while it ran");
    let deadline = Instant::now() + Duration::from_secs(20);
    while links(&n.ns) != baseline {
        assert!(
            Instant::now() < deadline,
            "pooled veths outlived their process: {:?}",
            links(&n.ns)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(netns_files(&n.cfg.netns_dir).is_empty(), "nothing pinned");
    let net = PodNetwork::new(n.cfg.clone()).expect("restarted");
    assert!(net.ipam().allocations().is_empty(), "no address held");
    assert_eq!(
        net.setup("pod-after").expect("setup").ip.to_string(),
        "10.42.16.2"
    );
    net.teardown("pod-after").expect("teardown");
}

/// The bridge's MAC address, as `ip` prints it.
fn bridge_mac(ns: &Path) -> String {
    let (ok, out) = run_in(ns, &["ip", "-o", "link", "show", "evoke0"]);
    assert!(ok, "bridge: {out}");
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("the bridge has a MAC")
        .to_string()
}

#[test]
fn the_bridge_keeps_its_mac_when_ports_with_lower_ones_join_so_pods_arp_entries_stay_valid() {
    if !privileged() {
        return;
    }
    let n = node("10.42.8.0/24");
    let net = PodNetwork::new(n.cfg.clone()).expect("pod network");
    let before = bridge_mac(&n.ns);
    let pod = net.setup("pod-a").expect("setup");
    // A port whose MAC is lower than any other: an unpinned bridge takes it.
    for args in [
        &[
            "ip", "link", "add", "lowmac", "type", "veth", "peer", "name", "lowmac-p",
        ][..],
        &[
            "ip",
            "link",
            "set",
            "lowmac",
            "address",
            "00:00:00:00:00:01",
        ],
        &["ip", "link", "set", "lowmac", "master", "evoke0"],
    ] {
        let (ok, out) = run_in(&n.ns, args);
        assert!(ok, "{args:?}: {out}");
    }
    assert_eq!(bridge_mac(&n.ns), before, "the bridge's MAC moved");
    // A restart of the pod network (an existing bridge) keeps it too.
    drop(net);
    let net = PodNetwork::new(n.cfg.clone()).expect("pod network again");
    assert_eq!(bridge_mac(&n.ns), before);
    let (ok, _) = run_in(
        &pod.netns,
        &["busybox", "ping", "-c", "1", "-W", "3", "10.42.8.1"],
    );
    assert!(ok, "the pod reaches its gateway");
    net.teardown("pod-a").expect("teardown");
}
