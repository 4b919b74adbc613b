//! Confinement of the VMM process: a guest that spins cannot use more CPU
//! than its cgroup's quota. The VMM runs in a child process (this test
//! binary re-executed) so the cgroup holds nothing else.

use std::path::Path;
use std::time::{Duration, Instant};

use evoke_vmm::cgroup::{CgroupSpec, VmmCgroup};
use evoke_vmm::vm::{AgentDevice, Payload, RawMode, VmIo};
use evoke_vmm::{ExitReason, Vm, VmConfig};

const CHILD_ENV: &str = "EVOKE_VMM_CONFINEMENT_CHILD";

fn usable() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let kvm = evoke_vmm::kvm_check::open_kvm().is_ok();
    let cg = Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        || Path::new("/sys/fs/cgroup/cpu").is_dir();
    if root && kvm && cg {
        return true;
    }
    let why = format!("needs root ({root}), /dev/kvm ({kvm}) and a cgroup cpu controller ({cg})");
    if std::env::var_os("CI").is_some() {
        panic!("CI must be able to run this: {why}");
    }
    eprintln!("skipping: {why}");
    false
}

/// CPU time (user + system, which includes guest time) of all waited-for
/// children of this process.
fn children_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let d = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    d(u.user_time()) + d(u.system_time())
}

fn spin_for(limit: Duration) {
    // cli; jmp $
    let cfg = VmConfig {
        mem_mib: 32,
        vcpus: 1,
        payload: Payload::Raw {
            code: vec![0xfa, 0xeb, 0xfe],
            addr: 0x1000,
            mode: RawMode::Real,
        },
        agent_device: AgentDevice::VirtioConsole,
        seccomp: true,
        net: Vec::new(),
    };
    let io = VmIo {
        serial_out: Box::new(std::io::sink()),
        agent_out: Box::new(std::io::sink()),
        agent_in: None,
    };
    let vm = Vm::new(&cfg, io).expect("vm");
    let stop = vm.stop_handle();
    let t = std::thread::spawn(move || vm.run());
    std::thread::sleep(limit);
    stop.stop();
    assert_eq!(t.join().expect("join").expect("run"), ExitReason::Stopped);
}

#[test]
fn a_spinning_guest_is_held_to_its_cgroup_cpu_quota() {
    if std::env::var_os(CHILD_ENV).is_some() {
        spin_for(Duration::from_millis(1500));
        return;
    }
    if !usable() {
        return;
    }
    let spec = CgroupSpec {
        name: format!("test-quota-{}", std::process::id()),
        memory_bytes: 256 << 20,
        // 20% of one CPU.
        cpu_quota_us: 20_000,
    };
    let cg = VmmCgroup::create(&spec, Path::new("/sys/fs/cgroup")).expect("cgroup");
    let before = children_cpu();
    let start = Instant::now();
    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "a_spinning_guest_is_held_to_its_cgroup_cpu_quota",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn child");
    cg.add_pid(child.id()).expect("join cgroup");
    let status = child.wait().expect("wait child");
    let wall = start.elapsed();
    let used = children_cpu() - before;
    for _ in 0..100 {
        if cg.remove().is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("used {used:?} wall {wall:?}");
    assert!(status.success(), "child: {status:?}");
    // Unconfined, the spinning vCPU alone would use about `wall`.
    assert!(
        used < wall.mul_f64(0.45),
        "cgroup used {used:?} of cpu in {wall:?} wall time with a 20% quota"
    );
}
