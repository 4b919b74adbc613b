//! Two nodes, each in its own network namespace made by this test and
//! joined by a veth pair (addresses only inside those namespaces): `evoke
//! server` with its agent in one, `evoke agent` joined over the veth in the
//! other. Each node routes the other's pod subnet via the other's address
//! (flannel's host-gw), so pods on either node reach pods on the other by
//! pod IP, through a ClusterIP Service and by the Service's DNS name; a
//! Service with an endpoint on each node answers from both; and
//! `kubectl logs` reaches the joined node through the API server.
//!
//! Needs root, `ip` (iproute2), `nsenter`, kubectl and busybox-static;
//! under CI=true a missing one is a failure, elsewhere the test prints why
//! it skips.

mod common;
mod join_support;

use join_support::{
    build_image, prerequisites, run, start_agent, wait_for, Netns, PodCleanup, Server,
};
use serde_json::Value;

/// The veth's subnet inside the two test namespaces.
const NODE1_IP: &str = "192.168.77.1";
const NODE2_IP: &str = "192.168.77.2";

/// A busybox httpd pinned to `node`, serving `index` (baked into the
/// image of that node's data dir), labelled app=`name`.
fn server_pod(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: {name}, tier: web}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: busybox:1
    command: [/bin/busybox, httpd, -f, -p, '8080', -h, /www]
    readinessProbe:
      tcpSocket: {{port: 8080}}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  selector: {{app: {name}}}
  ports:
  - {{port: 80, targetPort: 8080}}
"
    )
}

/// A client pinned to `node` that fetches each target once a second and
/// prints `<tag> <last line of the body>`; its log is the test's evidence.
/// Targets are `host port`; a host that is a name is looked up with
/// busybox's own resolver (nslookup, which reads the pod's resolv.conf),
/// since the static busybox's libc lookups (and its wget) need NSS
/// libraries an image of busybox alone lacks. nc speaks HTTP/1.0.
fn client_pod(name: &str, node: &str, targets: &[(&str, String, u16)]) -> String {
    let script: String = targets
        .iter()
        .map(|(tag, host, port)| {
            let addr = if host.parse::<std::net::Ipv4Addr>().is_ok() {
                host.clone()
            } else {
                format!("$(nslookup {host} | awk '/^Address/ {{a=$NF}} END {{print a}}')")
            };
            format!(
                "echo {tag} $(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {addr} {port} | tail -n 1)\n      "
            )
        })
        .collect();
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1
    command:
    - /bin/busybox
    - sh
    - -c
    - |
      while true; do
      {script}sleep 1
      done
"
    )
}

#[test]
fn pods_on_two_nodes_in_their_own_namespaces_reach_each_other_by_pod_ip_service_and_name() {
    if !prerequisites(&["/usr/sbin/ip", "/usr/sbin/sysctl", "/usr/bin/nsenter"]) {
        return;
    }
    let ns1 = Netns::new("a");
    let ns2 = Netns::new("b");
    // One veth, one end in each node's namespace.
    let (v1, v2) = (format!("{}v", ns1.0), format!("{}v", ns2.0));
    run(&[
        "ip", "link", "add", &v1, "netns", &ns1.0, "type", "veth", "peer", "name", &v2, "netns",
        &ns2.0,
    ]);
    ns1.exec(&["ip", "addr", "add", &format!("{NODE1_IP}/24"), "dev", &v1]);
    ns2.exec(&["ip", "addr", "add", &format!("{NODE2_IP}/24"), "dev", &v2]);
    ns1.exec(&["ip", "link", "set", &v1, "up"]);
    ns2.exec(&["ip", "link", "set", &v2, "up"]);

    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    build_image(a.path(), "busybox:1", "hello from n1\n");
    build_image(b.path(), "busybox:1", "hello from n2\n");
    let server = Server::start(a.path(), Some(&ns1.0), &["--bind-address", NODE1_IP], &[]);
    let agent = start_agent(
        &server.url,
        &server.token(),
        b.path(),
        "n2",
        Some(&ns2.0),
        &[],
        &[],
    );
    let _cleanup = PodCleanup {
        server: &server,
        agents_data: vec![a.path().into(), b.path().into()],
    };
    assert!(
        agent.ready.ends_with(&format!("at {NODE2_IP}")),
        "the agent found its address towards the server: {}",
        agent.ready
    );
    let diag = || {
        let pods = server.kubectl(&["get", "pods,svc,nodes", "-o", "wide"], None);
        format!(
            "{}\n{}\n{}\n{}\n{}",
            String::from_utf8_lossy(&pods.stdout),
            ns1.exec(&["ip", "route"]),
            ns2.exec(&["ip", "route"]),
            server.proc.log_tail(),
            agent.log_tail()
        )
    };
    let mut names: Vec<String> = Vec::new();
    wait_for(
        "two Ready nodes",
        40,
        || {
            let nodes = server.json(&["get", "nodes"]);
            names = nodes["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| {
                    n["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
                .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
                .collect();
            names.len() == 2
        },
        diag,
    );
    let n1 = names
        .into_iter()
        .find(|n| n != "n2")
        .expect("the server's own node");
    // Each node reports its address in the namespace and its own /24.
    let internal_ip = |node: &Value| -> String {
        node["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["type"] == "InternalIP")
            .and_then(|x| x["address"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let node1 = server.json(&["get", "node", &n1]);
    let node2 = server.json(&["get", "node", "n2"]);
    assert_eq!(internal_ip(&node1), NODE1_IP);
    assert_eq!(internal_ip(&node2), NODE2_IP);
    let (cidr1, cidr2) = (
        node1["spec"]["podCIDR"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        node2["spec"]["podCIDR"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    );
    assert!(
        !cidr1.is_empty() && !cidr2.is_empty() && cidr1 != cidr2,
        "{cidr1} {cidr2}"
    );

    // An httpd on each node, each behind its own Service.
    server.ok_with(&["apply", "-f", "-"], Some(&server_pod("web1", &n1)));
    server.ok_with(&["apply", "-f", "-"], Some(&server_pod("web2", "n2")));
    let mut ips = (String::new(), String::new());
    wait_for(
        "both httpd pods Running with pod IPs",
        60,
        || {
            let p1 = server.json(&["get", "pod", "web1"]);
            let p2 = server.json(&["get", "pod", "web2"]);
            ips = (
                p1["status"]["podIP"].as_str().unwrap_or_default().into(),
                p2["status"]["podIP"].as_str().unwrap_or_default().into(),
            );
            p1["status"]["phase"] == "Running"
                && p2["status"]["phase"] == "Running"
                && !ips.0.is_empty()
                && !ips.1.is_empty()
        },
        diag,
    );
    let (ip1, ip2) = ips;
    assert_eq!(
        server.json(&["get", "pod", "web2"])["status"]["hostIP"],
        NODE2_IP
    );
    let svc_ip = |name: &str| -> String {
        server.json(&["get", "svc", name])["spec"]["clusterIP"]
            .as_str()
            .expect("clusterIP")
            .to_string()
    };
    let (svc1, svc2) = (svc_ip("web1"), svc_ip("web2"));
    // And one Service over both, one endpoint on each node.
    server.ok_with(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {tier: web}
  ports:
  - {port: 80, targetPort: 8080}
",
        ),
    );
    let both = svc_ip("web");

    // A client on each node fetches the other node's pod by IP, by
    // ClusterIP and by name.
    server.ok_with(
        &["apply", "-f", "-"],
        Some(&client_pod(
            "client1",
            &n1,
            &[
                ("pod", ip2.clone(), 8080),
                ("svc", svc2.clone(), 80),
                ("dns", "web2".into(), 80),
                ("any", both.clone(), 80),
            ],
        )),
    );
    server.ok_with(
        &["apply", "-f", "-"],
        Some(&client_pod(
            "client2",
            "n2",
            &[
                ("pod", ip1.clone(), 8080),
                ("svc", svc1.clone(), 80),
                ("dns", "web1.default.svc.cluster.local".into(), 80),
            ],
        )),
    );
    for (client, other) in [("client1", "n2"), ("client2", "n1")] {
        let mut want: Vec<String> = ["pod", "svc", "dns"]
            .iter()
            .map(|t| format!("{t} hello from {other}"))
            .collect();
        if client == "client1" {
            // The Service over both nodes answers from each of them.
            want.extend(["any hello from n1".into(), "any hello from n2".into()]);
        }
        let last = std::cell::RefCell::new(String::new());
        wait_for(
            &format!("{client} to reach the pod on {other} by IP, Service and name"),
            60,
            || {
                // Through the API server, from the node's endpoint: for
                // client2 this is the joined node across the veth.
                let out = server.kubectl(&["logs", client, "--tail", "200"], None);
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let done = want.iter().all(|w| text.lines().any(|l| l == w));
                *last.borrow_mut() = text;
                done
            },
            || format!("last log of {client}:\n{}\n{}", last.borrow(), diag()),
        );
    }
}
