//! The microVM test host (`tests/vmhost/run`) and the guest agent, end to end.
//!
//! Each test boots the test host once (Debian's kernel under QEMU TCG with
//! nested SVM) and batches its checks into one script, because a boot costs
//! tens of seconds. The agent is exercised under QEMU's `-M microvm
//! -enable-kvm`, a known-good VMM, with the same virtio-console channel that
//! evoke's VMM offers; the `microvm_run*` tests drive evoke's own tier.

mod vmhost;

use vmhost::{run_in_test_host, run_script_in_test_host, test_host_ready, GUEST_QEMU};

#[test]
fn test_host_reports_the_scripts_exit_status_and_streams_its_output() {
    if !test_host_ready() {
        return;
    }
    let (code, out) = run_in_test_host(
        "echo first line from the test host\n\
         echo to stderr >&2\n\
         exit 7\n",
    );
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("first line from the test host"), "{out}");
    assert!(out.contains("to stderr"), "{out}");
    // A failing script is reported, never booted again.
    assert!(!out.contains("booting again"), "{out}");
}

#[test]
fn a_test_host_that_stops_its_heartbeat_counts_as_frozen_and_is_booted_again_once() {
    if !test_host_ready() {
        return;
    }
    // The first boot stops the init's heartbeat and hangs, as a frozen
    // kernel would; the run notices the silence, kills that boot and boots
    // again, and the second boot's status is the run's.
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("script.sh");
    std::fs::write(
        &script,
        r#"
try=$(sed -n 's/.*vmhost\.try=\([0-9]*\).*/\1/p' /proc/cmdline)
echo "script started on boot $try"
if [ "$try" = 1 ]; then
  kill -STOP "$(cat /run/vmhost-heartbeat.pid)" || exit 90
  sleep 600
fi
echo "script finished on boot $try"
exit 5
"#,
    )
    .expect("write script");
    let (code, out) = run_script_in_test_host(
        &script,
        None,
        300,
        &[("VMHOST_HEARTBEAT", "15"), ("VMHOST_BOOT_TRIES", "2")],
    );
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("script finished on boot 2"), "{out}");
    // The frozen boot's output is dropped, the freeze reported.
    assert!(!out.contains("script started on boot 1"), "{out}");
    assert!(out.contains("the test host froze: no heartbeat"), "{out}");
    assert!(out.contains("booting again (try 2 of 2)"), "{out}");
}

#[test]
fn agent_runs_the_workload_under_nested_kvm_and_a_guest_panic_is_a_clear_failure() {
    if !test_host_ready() {
        return;
    }
    let script = format!(
        r#"
fail() {{ echo "CHECK FAILED: $*"; exit 1; }}
dmesg | grep -q "Nested Virtualization enabled" || fail "kvm_amd has no nested virtualisation"
[ -c /dev/kvm ] || fail "/dev/kvm missing"
evoke --help >/dev/null || fail "evoke does not run in the test host"
{GUEST_QEMU}
mkimg /tmp/img
evoke-guest mkinitramfs -o /tmp/ok.cpio --rootfs /tmp/img --channel virtio-console \
  -e HELLO=world -w /work -- /bin/sh -c 'echo "out $HELLO $(pwd)"; echo err >&2; grep MemTotal /proc/meminfo; exit 3' \
  || fail "mkinitramfs"
guest_qemu /tmp/ok.cpio /tmp/ok.agent 192 || fail "qemu microvm failed"
evoke-guest decode /tmp/ok.agent >/tmp/ok.out 2>/tmp/ok.err
rc=$?
cat /tmp/ok.out /tmp/ok.err
[ "$rc" = 3 ] || fail "workload exit code: got $rc, want 3"
grep -qx "out world /work" /tmp/ok.out || fail "env or workdir not applied"
grep -qx "err" /tmp/ok.err || fail "stderr not forwarded"
mem=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /tmp/ok.out)
[ "$mem" -gt 120000 ] && [ "$mem" -le 196608 ] || fail "MemTotal $mem kB does not match -m 192"

evoke-guest mkinitramfs -o /tmp/panic.cpio --rootfs /tmp/img --channel virtio-console \
  -- /bin/sh -c 'echo about to panic; echo c > /proc/sysrq-trigger' || fail "mkinitramfs"
guest_qemu /tmp/panic.cpio /tmp/panic.agent 128 || fail "qemu did not end after the guest panicked"
evoke-guest decode /tmp/panic.agent >/tmp/panic.out 2>/tmp/panic.err
rc=$?
cat /tmp/panic.out /tmp/panic.err
[ "$rc" != 0 ] || fail "a panicked guest decoded as success"
grep -q "without reporting an exit status" /tmp/panic.err || fail "no clear message for a panicked guest"
echo ALL-CHECKS-PASSED
"#
    );
    let (code, out) = run_in_test_host(&script);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ALL-CHECKS-PASSED"), "{out}");
    assert!(out.contains("about to panic"), "{out}");
}
