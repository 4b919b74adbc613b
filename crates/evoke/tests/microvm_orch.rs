//! A microVM Deployment, end to end, inside the vmhost test host (real
//! nested KVM): `evoke server` with its node agent and the bridge pod
//! network, the real kubectl, a Deployment with `runtimeClassName: microvm`
//! whose pods are busybox httpd VMs on taps, reached by pod IP and through
//! a ClusterIP Service (nftables), entered with `kubectl exec`, then deleted
//! with nothing left behind. A pod is Running only once its workload runs in
//! the guest: the first exec right after Running works, startedAt is not
//! before the workload's own start, and a pod whose image lacks its command
//! shows why and never runs.

#[allow(dead_code)] // only the script-file runner is used here
mod vmhost;

use std::path::{Path, PathBuf};
use std::process::Command;

use vmhost::{run_script_in_test_host, test_host_ready};

/// kubectl on PATH (resolved through symlinks: it is copied into the test
/// host). Under CI a missing kubectl fails the test.
fn kubectl() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("kubectl"))
            .find(|k| k.is_file())
    });
    match found.and_then(|k| std::fs::canonicalize(k).ok()) {
        Some(k) => Some(k),
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "this test needs kubectl on PATH"
            );
            eprintln!("skipped: no kubectl on PATH");
            None
        }
    }
}

/// Copies `exe` and its shared libraries (from ldd) into `extra/lib`, with a
/// wrapper `extra/bin/NAME` that runs it with that library path.
fn with_libs(exe: &Path, name: &str, extra: &Path) {
    let lib = extra.join("lib");
    std::fs::create_dir_all(&lib).expect("extra/lib");
    std::fs::create_dir_all(extra.join("bin")).expect("extra/bin");
    std::fs::copy(exe, lib.join(format!("{name}.real"))).expect("copy binary");
    let ldd = Command::new("ldd").arg(exe).output().expect("ldd");
    for l in String::from_utf8_lossy(&ldd.stdout).lines() {
        if let Some(path) = l.split_whitespace().find(|w| w.starts_with('/')) {
            let p = Path::new(path);
            if let Some(file) = p.file_name() {
                std::fs::copy(p, lib.join(file)).expect("copy library");
            }
        }
    }
    let wrapper = extra.join("bin").join(name);
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nLD_LIBRARY_PATH=/vmhost/extra/lib exec /vmhost/extra/lib/{name}.real \"$@\"\n"),
    )
    .expect("wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

const SCRIPT: &str = r#"
fail() {
  echo "CHECK FAILED: $*"
  echo "--- pods ---"; kubectl get pods -o wide 2>&1
  echo "--- events ---"; kubectl get events 2>&1 | tail -n 20
  echo "--- server log tail ---"; tail -n 40 /tmp/server.log | cut -c1-400
  for f in /var/lib/evoke/microvm/*/console.log; do [ -f "$f" ] && { echo "--- $f ---"; tail -n 15 "$f"; }; done
  for p in $(kubectl get pods -o name); do echo "--- logs $p ---"; kubectl logs "$p" 2>&1 | tail -n 20; done
  echo "--- links ---"; ip addr; brctl show; ip neigh
  for t in /sys/class/net/tp*; do [ -e "$t" ] && echo "$t $(cat $t/operstate) rx $(cat $t/statistics/rx_packets) tx $(cat $t/statistics/tx_packets)"; done
  exit 1
}
export PATH=/vmhost/extra/bin:$PATH
# (busybox 1.35's `wget -T` crashes; `timeout` bounds each request instead.)
command -v kubectl >/dev/null || fail "no kubectl in the test host"
command -v nft >/dev/null || fail "no nft in the test host"

mkdir -p /tmp/img/bin /tmp/img/www
cp /bin/busybox /tmp/img/bin/busybox
for a in sh cat echo hostname httpd ip; do ln -sf busybox /tmp/img/bin/$a; done
echo hello-from-a-microvm-pod >/tmp/img/www/index.html
evoke image build-dir /tmp/img --tag bb || fail "evoke image build-dir"

# The node is named after the host; the test host's kernel default is "(none)".
hostname vmhost
evoke server --https-listen-port 6443 >/tmp/server.out 2>/tmp/server.log &
i=0
until grep -q "evoke server ready" /tmp/server.out; do
  i=$((i + 1)); [ "$i" -lt 900 ] || fail "evoke server did not become ready"; sleep 0.2
done
export KUBECONFIG=$(sed -n 's/.*kubeconfig=\([^ ]*\).*/\1/p' /tmp/server.out | head -n1)
[ -n "$KUBECONFIG" ] || fail "no kubeconfig in the ready line: $(cat /tmp/server.out)"

cat >/tmp/app.yaml <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: vmweb}
spec:
  replicas: 2
  selector: {matchLabels: {app: vmweb}}
  template:
    metadata: {labels: {app: vmweb}}
    spec:
      runtimeClassName: microvm
      terminationGracePeriodSeconds: 2
      containers:
      - name: httpd
        image: bb
        command: [/bin/sh, -c, 'cat /proc/uptime >/www/up0; cat /etc/resolv.conf; ip addr show dev eth0; hostname >/www/name; exec httpd -f -p 8080 -h /www']
        resources: {limits: {memory: 160Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: vmnocmd}
spec:
  runtimeClassName: microvm
  containers:
  - name: c
    image: bb
    command: [/bin/no-such-command]
    resources: {limits: {memory: 128Mi}}
---
apiVersion: v1
kind: Service
metadata: {name: vmweb}
spec:
  selector: {app: vmweb}
  ports: [{port: 80, targetPort: 8080}]
EOF
i=0
until kubectl apply -f /tmp/app.yaml; do
  i=$((i + 1)); [ "$i" -lt 30 ] || fail "kubectl apply"; sleep 2
done

# Both pods Running with a pod IP from the node's subnet.
i=0
while :; do
  running=$(kubectl get pods -l app=vmweb -o jsonpath='{range .items[*]}{.status.phase} {.status.podIP}{"\n"}{end}' | grep -c '^Running 10\.42\.')
  ran=$(kubectl get pod vmnocmd -o jsonpath='{.status.containerStatuses[0].state.running.startedAt}')
  [ -z "$ran" ] || fail "the pod without its command is reported running since $ran"
  [ "$running" = 2 ] && break
  i=$((i + 1)); [ "$i" -lt 150 ] || fail "the microvm pods did not reach Running with pod IPs"
  if [ $((i % 10)) = 0 ]; then
    kubectl get nodes,pods -o wide
    kubectl get events 2>&1 | tail -n 5
    grep -iE "warn|error" /tmp/server.log | tail -n 5 | cut -c1-300
  fi
  sleep 1
done
# Running means the workload runs in the guest: the first exec right after
# works (no retry), and startedAt is not before the workload's own start,
# as the guest's uptime tells it: now - (uptime now - uptime at its start),
# with 2 s of slack for startedAt's whole seconds and the guest's clock rate.
# (Before, startedAt was the VMM's spawn, 5-10 s earlier here.)
for pod in $(kubectl get pods -l app=vmweb -o jsonpath='{.items[*].metadata.name}'); do
  now=$(date +%s)
  kubectl exec "$pod" -- cat /proc/uptime /www/up0 >/tmp/up 2>&1 || fail "the first exec into Running pod $pod failed: $(cat /tmp/up)"
  ts=$(kubectl get pod "$pod" -o jsonpath='{.status.containerStatuses[0].state.running.startedAt}')
  started=$(date -u -D '%Y-%m-%dT%H:%M:%SZ' -d "$ts" +%s) || fail "startedAt $ts of $pod does not parse"
  est=$(awk -v now="$now" 'NR == 1 { u1 = $1 } NR == 2 { u0 = $1 } END { printf "%d", now - (u1 - u0) - 2 }' /tmp/up)
  echo "$pod: startedAt $ts ($started), workload started about $est + 2 (uptimes: $(tr '\n' ' ' </tmp/up))"
  [ "$started" -ge "$est" ] || fail "startedAt $ts of $pod is before its workload started (about $((est + 2)))"
done

kubectl get pods -o wide
ips=$(kubectl get pods -l app=vmweb -o jsonpath='{range .items[*]}{.status.podIP} {end}')

# Each pod answers on its own IP (httpd listens a moment after the
# workload's shell started: a few tries).
for ip in $ips; do
  i=0
  until timeout 5 wget -q -O /tmp/direct http://$ip:8080/index.html 2>/dev/null; do
    i=$((i + 1)); [ "$i" -lt 10 ] || fail "pod $ip did not answer on its IP"; sleep 1
  done
  grep -qx hello-from-a-microvm-pod /tmp/direct || fail "pod $ip served: $(cat /tmp/direct)"
  echo "pod $ip answers"
done

# The ClusterIP spreads over both VMs (each serves its own hostname).
cip=$(kubectl get svc vmweb -o jsonpath='{.spec.clusterIP}')
case "$cip" in 10.43.*) ;; *) fail "ClusterIP $cip" ;; esac
: >/tmp/names
i=0
while [ "$(sort -u /tmp/names | wc -l)" -lt 2 ]; do
  timeout 5 wget -q -O - http://$cip/name 2>/dev/null >>/tmp/names
  i=$((i + 1)); [ "$i" -lt 200 ] || fail "ClusterIP $cip reached $(sort -u /tmp/names | wc -l) of 2 pods: $(sort -u /tmp/names)"
done
echo "ClusterIP $cip reached: $(sort -u /tmp/names | tr '\n' ' ')"

# The guests got the cluster DNS resolv.conf.
pod=$(kubectl get pods -l app=vmweb -o jsonpath='{.items[0].metadata.name}')
kubectl logs "$pod" | grep -q "nameserver 10.43.0.10" || fail "resolv.conf in the guest: $(kubectl logs $pod)"

# kubectl exec runs next to the workload in the VM: output, exit code, stdin.
kubectl exec "$pod" -- sh -c 'echo "exec in $(hostname)"; cat /www/name; exit 3' >/tmp/kx.out 2>/tmp/kx.err
rc=$?
cat /tmp/kx.out /tmp/kx.err
[ "$rc" = 3 ] || fail "kubectl exec into a microvm pod: exit code $rc, want 3"
grep -q "^exec in " /tmp/kx.out || fail "kubectl exec into a microvm pod: no output"
echo piped-in | kubectl exec -i "$pod" -- cat >/tmp/kx2.out 2>&1 || fail "kubectl exec -i: $(cat /tmp/kx2.out)"
grep -qx piped-in /tmp/kx2.out || fail "kubectl exec -i: stdin did not come back: $(cat /tmp/kx2.out)"

# The pod whose image lacks its command: a waiting reason that says so, and
# it never ran.
i=0
while :; do
  st=$(kubectl get pod vmnocmd -o jsonpath='{.status.phase} {.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}')
  ran=$(kubectl get pod vmnocmd -o jsonpath='{.status.containerStatuses[0].state.running.startedAt}')
  [ -z "$ran" ] || fail "the pod without its command is reported running since $ran: $st"
  case "$st" in
    Running*) fail "the pod without its command is in phase Running: $st" ;;
    *RunContainerError:*no-such-command*) break ;;
  esac
  i=$((i + 1)); [ "$i" -lt 90 ] || fail "the pod without its command did not show why: $st"; sleep 1
done
echo "vmnocmd: $st"
kubectl get events 2>&1 | grep vmnocmd | grep -q "no-such-command" || fail "no event names the missing command"
kubectl delete pod vmnocmd --wait=false || fail "kubectl delete pod"

# Deleting the Deployment ends the VMs and releases their taps.
kubectl delete deployment vmweb --wait=false || fail "kubectl delete"
i=0
while kubectl get pods -o name | grep -q .; do
  i=$((i + 1)); [ "$i" -lt 120 ] || fail "the pods were not deleted"; sleep 1
done
i=0
while ls /sys/class/net | grep -q '^tp'; do
  i=$((i + 1)); [ "$i" -lt 30 ] || fail "taps left behind: $(ls /sys/class/net)"; sleep 1
done
echo ALL-CHECKS-PASSED
"#;

#[test]
fn a_microvm_deployment_runs_and_serves_by_pod_ip_and_cluster_ip() {
    if !test_host_ready() {
        return;
    }
    let Some(kubectl) = kubectl() else { return };
    let nft = Path::new("/usr/sbin/nft");
    assert!(
        nft.exists(),
        "this test needs nft (scripts/setup installs nftables)"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let extra = dir.path().join("extra");
    std::fs::create_dir_all(extra.join("bin")).expect("extra/bin");
    std::fs::copy(&kubectl, extra.join("bin/kubectl")).expect("copy kubectl");
    with_libs(nft, "nft", &extra);
    let script = dir.path().join("script.sh");
    std::fs::write(&script, SCRIPT).expect("write script");
    let (code, text) = run_script_in_test_host(&script, Some(&extra), 600, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("ALL-CHECKS-PASSED"), "{text}");
}
