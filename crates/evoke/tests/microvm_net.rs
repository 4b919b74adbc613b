//! A microVM's network, end to end through the binary, inside the vmhost
//! test host (real nested KVM): `evoke run --tier microvm --guest-net` backs
//! the guest's eth0 with a tap through evoke's virtio-net, and traffic flows
//! both ways between the guest and a server on the host side of the tap.

mod vmhost;

use vmhost::{run_in_test_host, test_host_ready};

#[test]
fn a_microvm_on_a_tap_reaches_the_host_and_serves_the_host() {
    if !test_host_ready() {
        return;
    }
    let script = r#"
fail() { echo "CHECK FAILED: $*"; exit 1; }
mkdir -p /tmp/img/bin /tmp/img/etc /tmp/img/www
cp /bin/busybox /tmp/img/bin/busybox
for a in sh echo cat grep ip wget httpd sleep ping; do ln -sf busybox /tmp/img/bin/$a; done
evoke image build-dir /tmp/img --tag bb || fail "evoke image build-dir"

# The host end: a tap with the guest's gateway address, and a web server.
tunctl -t evktap0 >/dev/null || fail "tunctl"
ip addr add 10.77.0.1/24 dev evktap0 || fail "address on the tap"
ip link set evktap0 up || fail "tap up"
mkdir -p /tmp/www
echo hello-from-the-host >/tmp/www/index.html
httpd -p 10.77.0.1:8080 -h /tmp/www || fail "host httpd"

# The guest serves a page, fetches the host's, then waits for the host to
# fetch the guest's page (the host then publishes /go).
evoke run --rm --tier microvm --guest-net evktap0,10.77.0.2/24,10.77.0.1 bb sh -c '
  ip -4 addr show dev eth0 | grep -q "inet 10.77.0.2/24" || { echo "eth0 not configured"; ip addr; exit 3; }
  ip route | grep -q "default via 10.77.0.1" || { echo "no default route"; ip route; exit 4; }
  echo hello-from-the-guest >/www/index.html
  httpd -p 80 -h /www
  wget -q -O - http://10.77.0.1:8080/index.html || exit 5
  i=0
  until wget -q -O /dev/null http://10.77.0.1:8080/go 2>/dev/null; do
    i=$((i + 1)); [ "$i" -lt 600 ] || exit 6; sleep 0.2
  done
  echo guest-done' >/tmp/g.out 2>/tmp/g.err &
run=$!

i=0
until wget -q -O /tmp/from-guest http://10.77.0.2/index.html 2>/dev/null; do
  i=$((i + 1))
  kill -0 "$run" 2>/dev/null || { cat /tmp/g.out /tmp/g.err; fail "the guest ended before serving"; }
  [ "$i" -lt 900 ] || fail "the guest's web server never answered"
  sleep 0.2
done
echo go >/tmp/www/go
wait "$run"
rc=$?
cat /tmp/g.out /tmp/g.err
[ "$rc" = 0 ] || fail "guest workload exit $rc"
grep -qx hello-from-the-host /tmp/g.out || fail "the guest did not get the host's page"
grep -qx guest-done /tmp/g.out || fail "the guest did not finish"
grep -qx hello-from-the-guest /tmp/from-guest || fail "the host did not get the guest's page"

# A tap that does not exist is a clear error, not a VM without a network.
evoke run --rm --tier microvm --guest-net nosuchtap0,10.77.0.3/24 bb true >/tmp/n.out 2>&1 && fail "a missing tap was accepted"
cat /tmp/n.out
grep -q nosuchtap0 /tmp/n.out || fail "the error does not name the tap"
echo ALL-CHECKS-PASSED
"#;
    let (code, out) = run_in_test_host(script);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ALL-CHECKS-PASSED"), "{out}");
}
