//! `evoke run --tier microvm`, end to end through the binary, inside the
//! vmhost test host (real nested KVM). One test-host boot per test; each
//! `evoke run` there boots a guest, so checks are batched into few runs.

mod vmhost;

use vmhost::{run_in_test_host, test_host_ready};

/// Shell prelude: a busybox image tagged `bb` in the test host's store.
const IMAGE: &str = r#"
fail() { echo "CHECK FAILED: $*"; exit 1; }
# The pids of VMM processes (busybox here has no pgrep).
vmm_pids() {
  for d in /proc/[0-9]*; do
    case "$( { tr '\0' ' ' <"$d/cmdline"; } 2>/dev/null)" in *"evoke vmm"*) echo "${d#/proc/}" ;; esac
  done
}
mkdir -p /tmp/img/bin /tmp/img/etc
cp /bin/busybox /tmp/img/bin/busybox
for a in sh echo cat grep pwd sed env sleep true; do ln -sf busybox /tmp/img/bin/$a; done
evoke image build-dir /tmp/img --tag bb || fail "evoke image build-dir"
"#;

#[test]
fn microvm_run_gives_output_exit_code_env_workdir_memory_cpus_and_127_for_a_missing_command() {
    if !test_host_ready() {
        return;
    }
    let script = format!(
        r#"{IMAGE}
evoke run --rm --tier microvm --memory 256m -e GREETING=hello -w /srv bb \
  sh -c 'echo "$GREETING from $(pwd)"; echo to-stderr >&2; grep MemTotal /proc/meminfo; exit 42' \
  >/tmp/out 2>/tmp/err
rc=$?
cat /tmp/out; cat /tmp/err
[ "$rc" = 42 ] || fail "exit code: got $rc, want 42"
grep -qx "hello from /srv" /tmp/out || fail "env or workdir not applied"
grep -qx "to-stderr" /tmp/err || fail "stderr not forwarded"
mem=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /tmp/out)
[ -n "$mem" ] && [ "$mem" -gt 180000 ] && [ "$mem" -le 262144 ] || fail "MemTotal $mem kB does not match --memory 256m"

evoke run --rm --tier microvm --memory 512m --cpus 2 bb \
  sh -c 'grep MemTotal /proc/meminfo; echo "cpus $(grep -c ^processor /proc/cpuinfo)"' >/tmp/out2 || fail "second run"
cat /tmp/out2
mem2=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /tmp/out2)
[ -n "$mem2" ] && [ "$mem2" -gt 400000 ] && [ "$mem2" -le 524288 ] || fail "MemTotal $mem2 kB does not match --memory 512m"
grep -qx "cpus 2" /tmp/out2 || fail "--cpus 2 did not give the guest 2 CPUs"

# A command the image lacks: exit 127 and a line naming it, as docker run.
evoke run --rm --tier microvm bb /no/such-command >/tmp/m.out 2>/tmp/m.err
rc=$?
cat /tmp/m.out /tmp/m.err
[ "$rc" = 127 ] || fail "a missing command: got exit $rc, want 127"
grep -q "/no/such-command" /tmp/m.err || fail "the error does not name the missing command"
echo ALL-CHECKS-PASSED
"#
    );
    let (code, out) = run_in_test_host(&script);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ALL-CHECKS-PASSED"), "{out}");
}

#[test]
fn microvm_guest_panic_and_a_killed_vmm_end_the_run_with_a_clear_failure() {
    if !test_host_ready() {
        return;
    }
    // Output goes through the guest agent, so bytes written in the very
    // instant of a panic can be lost with the guest, as on a real machine;
    // output written a moment before must arrive.
    let script = format!(
        r#"{IMAGE}
evoke run --rm --tier microvm bb sh -c 'echo going down; sleep 1; echo c > /proc/sysrq-trigger' >/tmp/p.out 2>/tmp/p.err
rc=$?
cat /tmp/p.out /tmp/p.err
[ "$rc" != 0 ] || fail "a guest panic reported success"
grep -q "going down" /tmp/p.out || fail "output before the panic was lost"
[ -s /tmp/p.err ] || fail "no message for a panicked guest"
grep -q "the guest kernel panicked: Kernel panic - not syncing" /tmp/p.err || fail "the kernel's panic line is not in the error"

evoke run --rm --tier microvm bb sh -c 'echo started; sleep 600' >/tmp/k.out 2>/tmp/k.err &
run=$!
i=0
while ! grep -q started /tmp/k.out 2>/dev/null; do
  i=$((i + 1)); [ "$i" -lt 600 ] || fail "workload did not start"; sleep 0.2
done
vmm=$(vmm_pids | head -n1)
[ -n "$vmm" ] || fail "no VMM process found"
kill -9 "$vmm"
i=0
while kill -0 "$run" 2>/dev/null; do
  i=$((i + 1)); [ "$i" -lt 150 ] || fail "evoke run did not end after its VMM was killed"; sleep 0.2
done
wait "$run"
rc=$?
cat /tmp/k.err
[ "$rc" != 0 ] || fail "a killed VMM reported success"
[ -s /tmp/k.err ] || fail "no message for a killed VMM"
left=$(vmm_pids)
[ -z "$left" ] || fail "VMM processes left behind: $left"
echo ALL-CHECKS-PASSED
"#
    );
    let (code, out) = run_in_test_host(&script);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ALL-CHECKS-PASSED"), "{out}");
}

/// Every step is bounded well inside the test host's 300 s, so a stuck
/// step fails with its own message and the VMs' console tails, not the
/// whole run's timeout (a first try once ran into it under CI's load).
#[test]
fn microvm_stop_signals_the_workload_in_the_guest_and_run_i_forwards_stdin() {
    if !test_host_ready() {
        return;
    }
    let script = format!(
        r#"{IMAGE}
consoles() {{
  for f in /var/lib/evoke/microvm/*/console.log; do [ -f "$f" ] && {{ echo "--- $f ---"; tail -n 15 "$f"; }}; done
  dmesg | tail -n 20
}}
printf 'one\ntwo\n' | timeout 120 evoke run -i --rm --tier microvm bb sh -c 'while read l; do echo "got $l"; done; echo eof' >/tmp/i.out 2>/tmp/i.err
rc=$?
cat /tmp/i.out /tmp/i.err
[ "$rc" = 0 ] || {{ consoles; fail "evoke run -i: exit $rc (143: still running after 120 s)"; }}
grep -qx "got two" /tmp/i.out || fail "stdin did not reach the workload"
grep -qx "eof" /tmp/i.out || fail "the end of stdin did not reach the workload"

# `run -d` returns once the workload runs in the guest.
id=$(timeout 120 evoke run -d --tier microvm bb sh -c 'trap "echo got TERM; exit 7" TERM; echo ready; while :; do sleep 1; done') || {{ consoles; fail "evoke run -d"; }}
evoke ps -a | grep "$(echo "$id" | cut -c1-12)" | grep -q Up || {{ evoke ps -a; fail "evoke run -d returned before the workload ran"; }}
end=$(($(date +%s) + 60))
until evoke logs "$id" 2>/dev/null | grep -q ready; do
  [ "$(date +%s)" -lt "$end" ] || {{ consoles; fail "the workload wrote nothing within 60 s of running"; }}
  sleep 0.2
done
timeout 120 evoke stop -t 60 "$id" || {{ consoles; fail "evoke stop"; }}
evoke logs "$id"
evoke logs "$id" | grep -q "got TERM" || fail "SIGTERM did not reach the workload in the guest"
short=$(echo "$id" | cut -c1-12)
evoke ps -a | grep "$short"
evoke ps -a | grep "$short" | grep -q "Exited (7)" || fail "the workload's own exit code after SIGTERM was not kept"
evoke rm "$id" || fail "evoke rm"
left=$(vmm_pids)
[ -z "$left" ] || fail "VMM processes left behind: $left"
echo ALL-CHECKS-PASSED
"#
    );
    let (code, out) = run_in_test_host(&script);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ALL-CHECKS-PASSED"), "{out}");
}

#[test]
fn microvm_honours_the_images_entrypoint_cmd_env_and_workdir_and_their_overrides() {
    if !test_host_ready() {
        return;
    }
    let (code, out) = run_in_test_host(IMAGE_CONFIG_SCRIPT);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ALL-CHECKS-PASSED"), "{out}");
}

/// Imports a docker-save archive (built with busybox tar and sha256sum)
/// whose config sets Entrypoint, Cmd, Env and WorkingDir, then runs it.
const IMAGE_CONFIG_SCRIPT: &str = r##"
fail() { echo "CHECK FAILED: $*"; exit 1; }
# A docker-save archive whose config sets Entrypoint, Cmd, Env and WorkingDir.
mkdir -p /tmp/cfg/rootfs/bin /tmp/cfg/rootfs/data
cp /bin/busybox /tmp/cfg/rootfs/bin/busybox
for a in sh echo pwd cat; do ln -sf busybox /tmp/cfg/rootfs/bin/$a; done
cd /tmp/cfg/rootfs && tar -cf ../layer.tar . && cd /tmp/cfg || fail "layer tar"
lsha=$(sha256sum layer.tar | cut -d' ' -f1)
cat >config.json <<JSON
{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo \"\$IMGVAR in \$(pwd)\"; exit 5"],"Env":["PATH=/bin","IMGVAR=from-image"],"WorkingDir":"/data"},"rootfs":{"type":"layers","diff_ids":["sha256:$lsha"]}}
JSON
csha=$(sha256sum config.json | cut -d' ' -f1)
mv config.json "$csha.json"
printf '[{"Config":"%s.json","RepoTags":["cfg:latest"],"Layers":["layer.tar"]}]' "$csha" >manifest.json
tar -cf /tmp/cfg.tar manifest.json "$csha.json" layer.tar || fail "archive"
evoke image import /tmp/cfg.tar || fail "evoke image import"
evoke run --rm --tier microvm cfg >/tmp/c1.out 2>/tmp/c1.err
rc=$?
cat /tmp/c1.out /tmp/c1.err
[ "$rc" = 5 ] || fail "image Cmd exit code: got $rc, want 5"
grep -qx "from-image in /data" /tmp/c1.out || fail "image Entrypoint, Cmd, Env or WorkingDir not honoured"
evoke run --rm --tier microvm -e IMGVAR=overridden -w / cfg >/tmp/c2.out 2>/tmp/c2.err
cat /tmp/c2.out /tmp/c2.err
grep -qx "overridden in /" /tmp/c2.out || fail "-e and -w do not override the image's Env and WorkingDir"
evoke run --rm --tier microvm cfg 'echo replaced cmd' >/tmp/c3.out 2>/tmp/c3.err
rc=$?
cat /tmp/c3.out /tmp/c3.err
[ "$rc" = 0 ] && grep -qx "replaced cmd" /tmp/c3.out || fail "arguments do not replace the image's Cmd"
echo ALL-CHECKS-PASSED
"##;
