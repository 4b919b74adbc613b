//! `evoke agent` joins a second node to `evoke server`, through the built
//! binary and the real kubectl: the node registers with this machine's
//! capacity, heartbeats its Lease and turns Ready; a pod pinned to it runs
//! there and `kubectl logs` and `exec` reach it through the API server; the
//! join secret only admits a node; a node's certificate (CN
//! system:node:NAME) writes only its own Node, Lease and pods' status, and
//! an expired or foreign one gets nowhere; node endpoints are TLS and admit
//! only the API server; a second machine claiming a joined name is refused;
//! a deleted Node is registered again; a killed agent's node turns
//! NotReady; a wrong token stops the agent with one line, and a server with
//! the wrong CA never sees the secret.
//!
//! Needs root, kubectl and busybox-static; under CI=true a missing one is
//! a failure, elsewhere the test prints why it skips.

mod common;
mod join_support;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use join_support::{
    build_image, prerequisites, start_agent, wait_for, PodCleanup, Server, NO_POD_NETWORK,
};
use serde_json::Value;

/// Runs `cmd` to completion within `secs` (killed after that).
fn output_within(mut cmd: Command, secs: u64) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    (out, started.elapsed())
}

#[test]
fn an_agent_joined_with_the_token_registers_a_ready_node_heartbeats_and_runs_its_pods() {
    if !prerequisites(&[]) {
        return;
    }
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    build_image(b.path(), "busybox:1", "n2\n");
    let server = Server::start(a.path(), None, &[], NO_POD_NETWORK);
    let agent = start_agent(
        &server.url,
        &server.token(),
        b.path(),
        "n2",
        None,
        &["--node-label", "evoke.test/pool=joined"],
        NO_POD_NETWORK,
    );
    let _cleanup = PodCleanup {
        server: &server,
        agents_data: vec![a.path().into(), b.path().into()],
    };
    let diag = || format!("{}\n{}", server.proc.log_tail(), agent.log_tail());
    wait_for(
        "node n2 Ready",
        30,
        || server.node_condition("n2", "Ready").as_deref() == Some("True"),
        diag,
    );

    // Both nodes are listed (the server's own agent registers on its own
    // schedule); the joined one carries its label.
    let names = || -> Vec<String> {
        server.json(&["get", "nodes"])["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["metadata"]["name"].as_str().map(String::from))
            .collect()
    };
    wait_for(
        "kubectl get nodes to list both nodes",
        30,
        || names().len() == 2,
        diag,
    );
    assert!(names().iter().any(|n| n == "n2"), "{:?}", names());
    let n2 = server.json(&["get", "node", "n2"]);
    assert_eq!(n2["metadata"]["labels"]["evoke.test/pool"], "joined");

    // Real capacity: this machine's CPUs and MemTotal.
    let cpus = std::thread::available_parallelism().expect("cpus").get();
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("MemTotal");
    assert_eq!(n2["status"]["capacity"]["cpu"], cpus.to_string());
    assert_eq!(n2["status"]["capacity"]["memory"], format!("{mem_kib}Ki"));
    assert_eq!(n2["status"]["allocatable"]["cpu"], cpus.to_string());

    // The API server can reach the node: its address is the one it used to
    // reach the server, and its endpoint port is reported.
    let addrs = n2["status"]["addresses"].as_array().expect("addresses");
    assert!(
        addrs
            .iter()
            .any(|x| x["type"] == "InternalIP" && x["address"] == "127.0.0.1"),
        "{addrs:?}"
    );
    assert!(
        n2["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
            .as_u64()
            .is_some_and(|p| p > 0),
        "{n2}"
    );

    // The Lease is held by n2 and renewed.
    let lease = |s: &Server| -> Value { s.json(&["get", "lease", "-n", "kube-node-lease", "n2"]) };
    let first = lease(&server);
    assert_eq!(first["spec"]["holderIdentity"], "n2");
    let renewed = first["spec"]["renewTime"].clone();
    wait_for(
        "the n2 Lease to be renewed",
        25,
        || lease(&server)["spec"]["renewTime"] != renewed,
        diag,
    );

    // A pod pinned to n2 runs on the agent, and its log comes through the
    // API server from the agent's endpoint.
    server.ok_with(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1
kind: Pod
metadata: {name: pinned}
spec:
  nodeSelector: {kubernetes.io/hostname: n2}
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1
    command: [/bin/busybox, sh, -c, 'echo hello from $(cat /www/index.html); exec sleep 3600']
",
        ),
    );
    wait_for(
        "pod pinned Running on n2",
        40,
        || {
            let p = server.json(&["get", "pod", "pinned"]);
            p["status"]["phase"] == "Running" && p["spec"]["nodeName"] == "n2"
        },
        diag,
    );
    assert!(
        std::fs::read_dir(b.path().join("pods")).is_ok_and(|mut d| d.next().is_some()),
        "the pod's directory is in the agent's data dir"
    );
    wait_for(
        "kubectl logs of the pod on n2",
        20,
        || {
            let out = server.kubectl(&["logs", "pinned"], None);
            String::from_utf8_lossy(&out.stdout).contains("hello from n2")
        },
        diag,
    );

    // exec reaches the joined node's endpoint the same way.
    let out = server.ok(&["exec", "pinned", "--", "cat", "/www/index.html"]);
    assert_eq!(out, "n2\n");

    // The join secret is a bootstrap credential only: it reads nothing.
    let secret = server
        .token()
        .rsplit(':')
        .next()
        .expect("secret")
        .to_string();
    let with_secret = kubeconfig(a.path(), &server, "secret", &format!("token: '{secret}'"));
    let out = kubectl_as(&with_secret, a.path(), &["get", "pods", "-o", "name"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Forbidden"),
        "the join secret read pods: {err}"
    );

    // A node's certificate (CN system:node:n2, as a join issues it) reads,
    // writes its own pods' status, but cannot create workloads, reach into
    // pods, list secrets, or touch another node or that node's pods.
    let ca = Ca::of(&server);
    let as_n2 = ca.kubeconfig(a.path(), &server, "system:node:n2", Validity::Now);
    let as_n3 = ca.kubeconfig(a.path(), &server, "system:node:n3", Validity::Now);
    // A node reads its own pods: by name, or listed with the field
    // selector that scopes them to it (as the kubelet watches them).
    for args in [
        &[
            "get",
            "pods",
            "-o",
            "name",
            "--field-selector",
            "spec.nodeName=n2",
        ][..],
        &["get", "pod", "pinned", "-o", "name"],
    ] {
        let out = kubectl_as(&as_n2, a.path(), args);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("pod/pinned"),
            "a node reads its pods ({args:?}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // NodeRestriction: a node labels itself, but not under
    // node-restriction.kubernetes.io/ or with a role, and does not change
    // its taints; an admin's protected label it may not remove.
    let out = kubectl_as(
        &as_n2,
        a.path(),
        &["label", "node", "n2", "evoke.test/self=yes"],
    );
    assert!(
        out.status.success(),
        "n2 sets an ordinary label on itself: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.ok(&[
        "label",
        "node",
        "n2",
        "node-restriction.kubernetes.io/pool=secure",
    ]);
    let status_patch = [
        "patch",
        "pod",
        "pinned",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"message":"from n2"}}"#,
    ];
    let out = kubectl_as(&as_n2, a.path(), &status_patch);
    assert!(
        out.status.success(),
        "n2 writes its own pod's status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server_node = names()
        .into_iter()
        .find(|n| n != "n2")
        .expect("the server's node");
    for (who, args) in [
        (
            &as_n2,
            vec![
                "label",
                "node",
                "n2",
                "--overwrite",
                "node-restriction.kubernetes.io/pool=mine",
            ],
        ),
        (
            &as_n2,
            vec![
                "label",
                "node",
                "n2",
                "node-restriction.kubernetes.io/pool-",
            ],
        ),
        (
            &as_n2,
            vec![
                "label",
                "node",
                "n2",
                "node-role.kubernetes.io/control-plane=true",
            ],
        ),
        (
            &as_n2,
            vec!["taint", "node", "n2", "evoke.test/t=x:NoSchedule"],
        ),
        (&as_n2, vec!["get", "pods", "-A"]),
        (
            &as_n2,
            vec!["get", "pods", "--field-selector", "spec.nodeName=elsewhere"],
        ),
        (&as_n2, vec!["get", "deployments,replicasets"]),
        (&as_n2, vec!["get", "namespaces"]),
        (&as_n2, vec!["get", "events"]),
        (&as_n3, vec!["get", "pod", "pinned"]),
        (&as_n2, vec!["run", "intruder", "--image", "busybox:1"]),
        (&as_n2, vec!["logs", "pinned"]),
        (&as_n2, vec!["exec", "pinned", "--", "true"]),
        (&as_n2, vec!["delete", "node", "n2"]),
        (&as_n2, vec!["get", "secrets", "-A"]),
        (&as_n2, vec!["label", "node", server_node.as_str(), "x=y"]),
        (&as_n3, status_patch.to_vec()),
        (&as_n3, vec!["delete", "pod", "pinned", "--wait=false"]),
    ] {
        let out = kubectl_as(who, a.path(), &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Forbidden"),
            "kubectl {args:?} as {}: {err}",
            who.display()
        );
    }
    // An expired node certificate, or one from another CA, gets nowhere.
    for (what, kc) in [
        (
            "expired",
            ca.kubeconfig(a.path(), &server, "system:node:n2", Validity::Expired),
        ),
        (
            "another ca",
            Ca::stranger().kubeconfig(a.path(), &server, "system:node:n2", Validity::Now),
        ),
    ] {
        let out = kubectl_as(&kc, a.path(), &["get", "pods", "-o", "name"]);
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Node endpoints speak TLS only and admit only the API server: n2's
    // certificate does not open the server node's endpoint.
    let node_status = server.json(&["get", "node", &server_node])["status"].clone();
    let port = node_status["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .expect("the server node's endpoint port") as u16;
    let ip: std::net::IpAddr = node_status["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str()?.parse().ok())
        .expect("the server node's address");
    let endpoint = std::net::SocketAddr::from((ip, port));
    let n2_cert = ca.issue("system:node:n2", "system:nodes", Validity::Now);
    let answer = endpoint_get(endpoint, &ca, Some(&n2_cert), "/containerLogs/default/x/c");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let answer = endpoint_get(endpoint, &ca, None, "/containerLogs/default/x/c");
    assert!(
        answer.starts_with("ERROR"),
        "without a certificate: {answer}"
    );
    let mut plain = std::net::TcpStream::connect(endpoint).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf);
    assert!(
        !String::from_utf8_lossy(&buf).contains("200 OK"),
        "plain HTTP was answered"
    );

    // Another machine claiming the name n2 (its own node password) is
    // refused with one line.
    let c = tempfile::tempdir().expect("tempdir");
    let (out, took) = agent_output_named(&server.url, &server.token(), c.path(), "n2");
    assert_one_line_failure(
        &out,
        took,
        "already registered with a different node password",
    );

    // A deleted Node comes back: its agent registers it again.
    server.ok(&["delete", "node", "n2", "--wait=false"]);
    wait_for(
        "node n2 registered again",
        40,
        || server.node_condition("n2", "Ready").as_deref() == Some("True"),
        diag,
    );
}

/// A kubeconfig for `server` in `dir` whose user entry is `user` (YAML).
fn kubeconfig(dir: &Path, server: &Server, name: &str, user: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {{server: '{}', certificate-authority: '{}'}}
users:
- name: u
  user: {{{user}}}
contexts:
- name: c
  context: {{cluster: c, user: u}}
current-context: c
",
            server.url,
            server.data_dir.join("server/tls/server-ca.crt").display()
        ),
    )
    .expect("kubeconfig");
    path
}

fn kubectl_as(kubeconfig: &Path, home: &Path, args: &[&str]) -> Output {
    Command::new(join_support::KUBECTL)
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", home)
        .args(["--request-timeout", "20s"])
        .args(args)
        .output()
        .expect("kubectl")
}

#[derive(Clone, Copy)]
enum Validity {
    Now,
    Expired,
    /// From a minute ago until this many seconds from now.
    Seconds(u64),
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A CA that signs client certificates: the server's own (its key from the
/// data dir) or a stranger's.
struct Ca {
    cert_pem: String,
    key: rcgen::KeyPair,
    params: Option<rcgen::CertificateParams>,
}

/// A client certificate and key, as PEM.
struct ClientCert {
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn of(server: &Server) -> Ca {
        let dir = server.data_dir.join("server/tls");
        let cert_pem = std::fs::read_to_string(dir.join("server-ca.crt")).expect("ca cert");
        let key_pem = std::fs::read_to_string(dir.join("server-ca.key")).expect("ca key");
        Ca {
            cert_pem,
            key: rcgen::KeyPair::from_pem(&key_pem).expect("ca key pem"),
            params: None,
        }
    }

    fn stranger() -> Ca {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "stranger-ca");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert_pem = params.self_signed(&key).expect("ca").pem();
        Ca {
            cert_pem,
            key,
            params: Some(params),
        }
    }

    fn issue(&self, cn: &str, org: &str, validity: Validity) -> ClientCert {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, org);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        match validity {
            Validity::Now => {}
            Validity::Expired => {
                p.not_before = rcgen::date_time_ymd(2019, 1, 1);
                p.not_after = rcgen::date_time_ymd(2020, 1, 1);
            }
            Validity::Seconds(secs) => {
                let epoch = rcgen::date_time_ymd(1970, 1, 1);
                p.not_before = epoch + Duration::from_secs(unix_now() - 60);
                p.not_after = epoch + Duration::from_secs(unix_now() + secs);
            }
        }
        let cert = match &self.params {
            Some(params) => p.signed_by(&key, &rcgen::Issuer::from_params(params, &self.key)),
            None => p.signed_by(
                &key,
                &rcgen::Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).expect("issuer"),
            ),
        }
        .expect("signed");
        ClientCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A kubeconfig authenticating with a certificate for `cn` in
    /// system:nodes.
    fn kubeconfig(
        &self,
        dir: &Path,
        server: &Server,
        cn: &str,
        validity: Validity,
    ) -> std::path::PathBuf {
        let c = self.issue(cn, "system:nodes", validity);
        let stem = format!(
            "{}-{}-{}",
            cn.replace(':', "-"),
            match validity {
                Validity::Now => "now".to_string(),
                Validity::Expired => "expired".to_string(),
                Validity::Seconds(s) => format!("for{s}s"),
            },
            self.params.is_some()
        );
        let (cert, key) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&cert, &c.cert_pem).expect("cert");
        std::fs::write(&key, &c.key_pem).expect("key");
        kubeconfig(
            dir,
            server,
            &stem,
            &format!(
                "client-certificate: '{}', client-key: '{}'",
                cert.display(),
                key.display()
            ),
        )
    }
}

/// A GET over TLS straight to the node endpoint at `addr`, trusting `ca`,
/// as `who`: the raw answer, or "ERROR ..." when TLS fails.
fn endpoint_get(
    addr: std::net::SocketAddr,
    ca: &Ca,
    who: Option<&ClientCert>,
    path: &str,
) -> String {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("ca der"))
        .expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let cfg = match who {
        Some(c) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).expect("cert der")],
                PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).expect("key der"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    let conn = rustls::ClientConnection::new(Arc::new(cfg), ServerName::from(addr.ip()))
        .expect("connection");
    let tcp = std::net::TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if let Err(e) = tls.write_all(req.as_bytes()) {
        return format!("ERROR {e}");
    }
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) if !out.is_empty() => String::from_utf8_lossy(&out).into_owned(),
        Ok(_) => "ERROR no answer".into(),
        Err(e) => format!("ERROR {e}"),
    }
}

/// The certificate the node endpoint at `addr` serves (the handshake made
/// as the API server's kubelet client, signed by `ca`): its not-after, in
/// seconds since the epoch.
fn endpoint_cert_not_after(addr: std::net::SocketAddr, ca: &Ca) -> i64 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let me = ca.issue(
        "evoke-apiserver-kubelet-client",
        "system:masters",
        Validity::Now,
    );
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("ca der"))
        .expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_slice(me.cert_pem.as_bytes()).expect("cert der")],
        PrivateKeyDer::from_pem_slice(me.key_pem.as_bytes()).expect("key der"),
    )
    .expect("client auth");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), ServerName::from(addr.ip()))
        .expect("connection");
    let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .expect("handshake with the node endpoint");
    }
    let der = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("the endpoint's certificate")
        .to_vec();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
    cert.validity().not_after.timestamp()
}

/// Sends `GET path` on an open TLS connection and reads one response
/// (headers and a Content-Length body); returns its status line.
fn get_on(
    tls: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
    path: &str,
) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    tls.write_all(req.as_bytes()).expect("request");
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tls.read(&mut byte).expect("response");
        assert!(
            n == 1,
            "the connection closed: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("a content-length");
    let mut body = vec![0u8; len];
    tls.read_exact(&mut body).expect("body");
    head.lines().next().unwrap_or_default().to_string()
}

#[test]
fn node_certificates_are_renewed_before_they_expire_and_the_node_works_on_after_the_first_run_out()
{
    if !prerequisites(&[]) {
        return;
    }
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    build_image(b.path(), "busybox:1", "renewed\n");
    // Node certificates live 20 s here; agents renew at 70-90% of that.
    let server = Server::start(
        a.path(),
        None,
        &["--disable-agent", "--cluster-signing-duration", "20s"],
        NO_POD_NETWORK,
    );
    let agent = start_agent(
        &server.url,
        &server.token(),
        b.path(),
        "short",
        None,
        &[],
        NO_POD_NETWORK,
    );
    let _cleanup = PodCleanup {
        server: &server,
        agents_data: vec![b.path().into()],
    };
    let diag = || format!("{}\n{}", server.proc.log_tail(), agent.log_tail());
    wait_for(
        "node short Ready",
        30,
        || server.node_condition("short", "Ready").as_deref() == Some("True"),
        diag,
    );
    let ca = Ca::of(&server);
    let n = server.json(&["get", "node", "short"]);
    let port = n["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .expect("endpoint port") as u16;
    let endpoint = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let first_until = endpoint_cert_not_after(endpoint, &ca);
    assert!(
        first_until <= unix_now() as i64 + 21,
        "the endpoint's certificate lives 20 s, until {first_until}"
    );
    server.ok_with(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1
kind: Pod
metadata: {name: lasting}
spec:
  nodeName: short
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1
    command: [/bin/busybox, sh, -c, 'echo up; exec sleep 3600']
",
        ),
    );
    // Past the end of the certificates the agent joined with, renewed
    // before that.
    let renewals = || {
        std::fs::read_to_string(&agent.log)
            .unwrap_or_default()
            .matches("renewed node certificates")
            .count()
    };
    wait_for(
        "a renewal, and the first certificates' end",
        40,
        || renewals() >= 1 && unix_now() as i64 > first_until + 1,
        diag,
    );
    // The endpoint serves a renewed certificate...
    let now_until = endpoint_cert_not_after(endpoint, &ca);
    assert!(now_until > first_until, "{now_until} <= {first_until}");
    // ...the node still heartbeats with its renewed client certificate...
    let renew_time = |s: &Server| -> String {
        s.json(&["get", "lease", "-n", "kube-node-lease", "short"])["spec"]["renewTime"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let before = renew_time(&server);
    wait_for(
        "the Lease renewed after the first certificate expired",
        20,
        || renew_time(&server) != before,
        diag,
    );
    assert_eq!(
        server.node_condition("short", "Ready").as_deref(),
        Some("True")
    );
    // ...runs its pod and answers logs and exec through the API server.
    wait_for(
        "pod lasting Running",
        30,
        || server.json(&["get", "pod", "lasting"])["status"]["phase"] == "Running",
        diag,
    );
    wait_for(
        "kubectl logs through the renewed endpoint certificate",
        20,
        || {
            String::from_utf8_lossy(&server.kubectl(&["logs", "lasting"], None).stdout)
                .contains("up")
        },
        diag,
    );
    assert_eq!(
        server.ok(&["exec", "lasting", "--", "cat", "/www/index.html"]),
        "renewed\n"
    );
    // Renewed in time, not joined again after the certificate ran out.
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert!(
        !log.contains("expired before it was renewed"),
        "{}",
        agent.log_tail()
    );

    // Why renewal matters: a certificate is checked on every request, not
    // only at the handshake, so a connection opened before it expired is
    // refused after (401) even though it stays open.
    let short = ca.issue("system:node:short", "system:nodes", Validity::Seconds(4));
    let issued_until = unix_now() + 4;
    let mut tls = {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("ca der"))
            .expect("root");
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(short.cert_pem.as_bytes()).expect("der")],
            PrivateKeyDer::from_pem_slice(short.key_pem.as_bytes()).expect("key"),
        )
        .expect("client auth");
        let addr = server.url.trim_start_matches("https://").to_string();
        let tcp = std::net::TcpStream::connect(&addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("tls");
        rustls::StreamOwned::new(conn, tcp)
    };
    let status = get_on(&mut tls, "/version");
    assert!(status.contains(" 200 "), "{status}");
    while unix_now() <= issued_until + 1 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = get_on(&mut tls, "/version");
    assert!(
        status.contains(" 401 "),
        "an expired certificate on an open connection: {status}"
    );
}

#[test]
fn a_killed_agent_leaves_its_node_not_ready_after_the_grace_period() {
    if !prerequisites(&[]) {
        return;
    }
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let server = Server::start(a.path(), None, &["--disable-agent"], NO_POD_NETWORK);
    // This agent reads its token from a file, off the command line.
    let token_file = b.path().join("token");
    std::fs::write(&token_file, format!("{}\n", server.token())).expect("token file");
    let token_arg = token_file.to_str().expect("utf-8 path");
    let mut agent = start_agent(
        &server.url,
        "",
        b.path(),
        "gone",
        None,
        &["--token-file", token_arg],
        NO_POD_NETWORK,
    );
    let diag = || server.proc.log_tail();
    wait_for(
        "node gone Ready",
        30,
        || server.node_condition("gone", "Ready").as_deref() == Some("True"),
        diag,
    );
    agent.kill();
    let killed = Instant::now();
    // 40 s Lease + 50 s grace after the last renewal (at most 10 s ago),
    // plus the lifecycle controller's own period.
    wait_for(
        "node gone NotReady",
        75,
        || {
            server
                .node_condition("gone", "Ready")
                .is_some_and(|s| s != "True")
        },
        diag,
    );
    assert!(
        killed.elapsed() >= Duration::from_secs(35),
        "turned NotReady {:?} after the kill; the grace period is 50 s since the last heartbeat",
        killed.elapsed()
    );
}

#[test]
fn an_agent_started_before_its_server_waits_for_it_and_joins() {
    if !prerequisites(&[]) {
        return;
    }
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
        .to_string();
    let flags = ["--disable-agent", "--https-listen-port", port.as_str()];
    // A first start makes the CA and the join token; then the server is down.
    let first = Server::start(a.path(), None, &flags, NO_POD_NETWORK);
    let (url, token) = (first.url.clone(), first.token());
    drop(first);
    let agent_dir = b.path().to_path_buf();
    let joining = std::thread::spawn(move || {
        start_agent(&url, &token, &agent_dir, "early", None, &[], NO_POD_NETWORK)
    });
    std::thread::sleep(Duration::from_secs(2));
    let server = Server::start(a.path(), None, &flags, NO_POD_NETWORK);
    let agent = joining
        .join()
        .expect("the agent joined once the server was up");
    wait_for(
        "node early Ready",
        30,
        || server.node_condition("early", "Ready").as_deref() == Some("True"),
        || format!("{}\n{}", server.proc.log_tail(), agent.log_tail()),
    );
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert!(log.contains("waiting for the server"), "{log}");
}

/// A TLS server with its own self-signed certificate (not the CA the
/// token names) that records every plaintext byte it receives.
fn recording_tls_server() -> (u16, Arc<Mutex<Vec<u8>>>) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let pem = cert.pem();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        )
        .expect("server config");
    let cfg = Arc::new(cfg);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (cfg, rec, pem) = (cfg.clone(), rec.clone(), pem.clone());
            std::thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut buf = [0u8; 4096];
                let mut req = Vec::new();
                while let Ok(n) = tls.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                    rec.lock().expect("record").extend_from_slice(&buf[..n]);
                    if req.windows(4).any(|w| w == b"\r\n\r\n") {
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{pem}",
                            pem.len()
                        );
                        let _ = tls.write_all(resp.as_bytes());
                        tls.conn.send_close_notify();
                        let _ = tls.flush();
                        break;
                    }
                }
            });
        }
    });
    (port, seen)
}

fn agent_output(server_url: &str, token: &str, data_dir: &Path) -> (Output, Duration) {
    agent_output_named(server_url, token, data_dir, "intruder")
}

fn agent_output_named(
    server_url: &str,
    token: &str,
    data_dir: &Path,
    name: &str,
) -> (Output, Duration) {
    let mut cmd = join_support::evoke(None, data_dir);
    cmd.args(["agent", "--server", server_url, "--token", token])
        .args(["--node-name", name])
        .env("EVOKE_LOG", "warn")
        .envs(NO_POD_NETWORK.iter().copied());
    output_within(cmd, 40)
}

fn assert_one_line_failure(out: &Output, took: Duration, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {stderr}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("evoke: "), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} in {stderr}");
}

#[test]
fn a_wrong_secret_or_ca_hash_stops_the_agent_with_one_line_and_no_secret_reaches_the_wrong_server()
{
    if !prerequisites(&[]) {
        return;
    }
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let server = Server::start(a.path(), None, &["--disable-agent"], NO_POD_NETWORK);
    let token = server.token();

    // The right CA but a wrong secret: the server refuses it.
    let (prefix, _) = token.rsplit_once(':').expect("user:secret");
    let (out, took) = agent_output(&server.url, &format!("{prefix}:wrong"), b.path());
    assert_one_line_failure(&out, took, "refused the token's secret");

    // A node name the API would refuse is refused before any connection.
    let mut cmd = join_support::evoke(None, b.path());
    cmd.args(["agent", "--server", &server.url, "--token", &token])
        .args(["--node-name", "Not_A_Name"])
        .env("EVOKE_LOG", "warn");
    let (out, took) = output_within(cmd, 40);
    assert_one_line_failure(&out, took, "set --node-name");

    // A label NodeRestriction would refuse at registration is refused at
    // once, as the kubelet refuses such --node-labels.
    let mut cmd = join_support::evoke(None, b.path());
    cmd.args(["agent", "--server", &server.url, "--token", &token])
        .args(["--node-label", "node-role.kubernetes.io/worker=true"])
        .env("EVOKE_LOG", "warn");
    let (out, took) = output_within(cmd, 40);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a usage error: {stderr}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(
        stderr.contains("is a label a node may not set on itself"),
        "{stderr}"
    );

    // A malformed token never leaves the machine.
    let (out, took) = agent_output(&server.url, "not-a-token", b.path());
    assert_one_line_failure(&out, took, "K10");

    // A server whose CA is not the one the token pins: the agent stops
    // before it sends the secret.
    let (port, seen) = recording_tls_server();
    let (out, took) = agent_output(&format!("https://127.0.0.1:{port}"), &token, b.path());
    assert_one_line_failure(&out, took, "refusing to send credentials");
    let seen = String::from_utf8_lossy(&seen.lock().expect("record")).to_ascii_lowercase();
    let secret = token
        .rsplit(':')
        .next()
        .expect("secret")
        .to_ascii_lowercase();
    assert!(
        !seen.contains(&secret),
        "the secret reached the wrong server"
    );
    assert!(!seen.contains("authorization"), "{seen}");

    // And no node was registered by any of these attempts.
    let nodes = server.json(&["get", "nodes"]);
    assert_eq!(nodes["items"].as_array().map(Vec::len), Some(0), "{nodes}");
}
