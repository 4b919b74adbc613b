//! `evoke exec` into a running microVM, end to end through the binary,
//! inside the vmhost test host (real nested KVM): exec sessions ride the
//! agent channel next to the workload (see evoke_vmm::agent_mux and the
//! guest agent's exec sessions). One test-host boot; the checks are batched.

mod vmhost;

use vmhost::{run_in_test_host, test_host_ready};

const SCRIPT: &str = r#"
fail() {
  echo "CHECK FAILED: $*"
  for f in /var/lib/evoke/microvm/*/console.log; do [ -f "$f" ] && { echo "--- $f ---"; tail -n 15 "$f"; }; done
  exit 1
}
mkdir -p /tmp/img/bin /tmp/img/etc
cp /bin/busybox /tmp/img/bin/busybox
for a in sh echo cat grep pwd sed env sleep true seq wc head tail stty id; do ln -sf busybox /tmp/img/bin/$a; done
evoke image build-dir /tmp/img --tag bb || fail "evoke image build-dir"

# A workload that keeps writing while the execs run.
id=$(evoke run -d --tier microvm bb sh -c 'i=0; while :; do echo "tick $i"; i=$((i + 1)); sleep 0.1; done') || fail "evoke run -d"
i=0
until evoke logs "$id" 2>/dev/null | grep -q "tick 1"; do
  i=$((i + 1)); [ "$i" -lt 600 ] || fail "workload did not start"; sleep 0.2
done

# Output, stderr and the exit code.
evoke exec "$id" sh -c 'echo hello from exec; echo to-stderr >&2; exit 3' >/tmp/e1.out 2>/tmp/e1.err
rc=$?
cat /tmp/e1.out /tmp/e1.err
[ "$rc" = 3 ] || fail "exec exit code: got $rc, want 3"
grep -qx "hello from exec" /tmp/e1.out || fail "exec stdout"
grep -qx "to-stderr" /tmp/e1.err || fail "exec stderr"

# The workload's environment, plus -e and -w.
evoke exec -e EXTRA=added -w /tmp "$id" sh -c 'echo "$EXTRA $(pwd) $PATH"' >/tmp/e2.out || fail "exec with -e -w"
cat /tmp/e2.out
grep -q "^added /tmp /" /tmp/e2.out || fail "-e or -w not applied, or no PATH from the workload"

# A missing command: 127 and a message.
evoke exec "$id" /no/such/program >/tmp/e3.out 2>/tmp/e3.err
rc=$?
cat /tmp/e3.err
[ "$rc" = 127 ] || fail "missing command: got $rc, want 127"
grep -q "/no/such/program" /tmp/e3.err || fail "no message naming the missing command"

# Stdin, its end, and a megabyte through the windows both ways.
printf 'one\ntwo\n' | evoke exec -i "$id" sh -c 'while read l; do echo "got $l"; done; echo eof' >/tmp/e4.out || fail "exec -i"
cat /tmp/e4.out
grep -qx "got two" /tmp/e4.out || fail "stdin did not reach the exec"
grep -qx "eof" /tmp/e4.out || fail "the end of stdin did not reach the exec"
n=$(head -c 1000000 /dev/zero | evoke exec -i "$id" sh -c 'cat | wc -c') || fail "exec -i of 1 MB"
[ "$n" = 1000000 ] || fail "1 MB of stdin arrived as $n bytes"
n=$(evoke exec "$id" sh -c 'head -c 3000000 /dev/zero' | wc -c) || fail "exec of 3 MB output"
[ "$n" = 3000000 ] || fail "3 MB of output arrived as $n bytes"

# Two execs at once, each writing a lot, while the workload writes too.
before=$(evoke logs "$id" | grep -c tick)
evoke exec "$id" sh -c 'for i in $(seq 1 3000); do echo "a $i"; done' >/tmp/c1 2>&1 &
p1=$!
evoke exec "$id" sh -c 'for i in $(seq 1 3000); do echo "b $i"; done' >/tmp/c2 2>&1 &
p2=$!
wait $p1 || fail "first concurrent exec failed"
wait $p2 || fail "second concurrent exec failed"
[ "$(wc -l </tmp/c1)" = 3000 ] && [ "$(tail -n1 /tmp/c1)" = "a 3000" ] || fail "first concurrent exec's output is incomplete"
[ "$(wc -l </tmp/c2)" = 3000 ] && [ "$(tail -n1 /tmp/c2)" = "b 3000" ] || fail "second concurrent exec's output is incomplete"
grep -q "^b" /tmp/c1 && fail "the sessions' output got mixed"
sleep 1
after=$(evoke logs "$id" | grep -c tick)
echo "workload ticks: $before before the concurrent execs, $after after"
[ "$after" -gt "$before" ] || fail "the workload stopped writing while execs ran"

# A terminal.
evoke exec -t "$id" sh -c '[ -t 0 ] && [ -t 1 ] && echo on-a-tty; echo "TERM=$TERM"' >/tmp/t.out || fail "exec -t"
cat /tmp/t.out
grep -q "on-a-tty" /tmp/t.out || fail "exec -t is not on a terminal"
grep -q "TERM=xterm" /tmp/t.out || fail "exec -t has no TERM"

evoke stop -t 5 "$id" >/dev/null || fail "evoke stop"
evoke exec "$id" true 2>/tmp/e5.err && fail "exec into a stopped microVM succeeded"
cat /tmp/e5.err
grep -q "not running" /tmp/e5.err || fail "exec into a stopped microVM: no clear error"
evoke rm "$id" >/dev/null || fail "evoke rm"

# An exec into a VM that shuts down while the exec runs.
id2=$(evoke run -d --tier microvm bb sh -c 'echo up; sleep 4') || fail "evoke run -d (short)"
i=0
until evoke logs "$id2" 2>/dev/null | grep -q up; do
  i=$((i + 1)); [ "$i" -lt 600 ] || fail "short workload did not start"; sleep 0.2
done
start=$(date +%s)
evoke exec "$id2" sleep 120 >/tmp/e6.out 2>/tmp/e6.err
rc=$?
took=$(( $(date +%s) - start ))
cat /tmp/e6.err
[ "$rc" != 0 ] || fail "an exec whose VM shut down reported success"
[ "$took" -lt 60 ] || fail "the exec waited ${took}s after its VM ended"
grep -q "ended before the command did" /tmp/e6.err || fail "no clear error for an exec whose VM ended"
evoke rm -f "$id2" >/dev/null
echo ALL-CHECKS-PASSED
"#;

#[test]
fn microvm_exec_runs_commands_next_to_the_workload_with_output_exit_codes_stdin_tty_and_concurrency(
) {
    if !test_host_ready() {
        return;
    }
    let (code, out) = run_in_test_host(SCRIPT);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ALL-CHECKS-PASSED"), "{out}");
}
