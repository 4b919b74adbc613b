//! The VMM's run loop, devices and shutdown, driven by tiny guests written
//! here as machine code. These run on any KVM, including PVM hosts, which
//! cannot boot Linux but do run such guests.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evoke_vmm::devices::sink::{CappedWriter, TailBuffer};
use evoke_vmm::vm::{AgentDevice, Payload, RawMode, VmIo};
use evoke_vmm::{ExitReason, Vm, VmConfig};

/// True when /dev/kvm is usable; under CI a missing KVM is a failure.
fn kvm_available() -> bool {
    match evoke_vmm::kvm_check::open_kvm() {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI needs /dev/kvm: {e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

/// Real mode: print `text` on COM1, then ask the i8042 for a reset.
fn real_mode_hello(text: &[u8]) -> Vec<u8> {
    let mut code = vec![0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text {
        code.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $ (never reached)
    code
}

fn config(payload: Payload, vcpus: u8) -> VmConfig {
    VmConfig {
        mem_mib: 64,
        vcpus,
        payload,
        agent_device: AgentDevice::VirtioConsole,
        seccomp: true,
        net: Vec::new(),
    }
}

fn raw(code: Vec<u8>, mode: RawMode) -> Payload {
    let addr = match mode {
        RawMode::Real => 0x1000,
        RawMode::Long64 => 0x10_0000,
    };
    Payload::Raw { code, addr, mode }
}

fn io(serial: impl Write + Send + 'static) -> VmIo {
    VmIo {
        serial_out: Box::new(serial),
        agent_out: Box::new(std::io::sink()),
        agent_in: None,
    }
}

/// Runs the VM on its own thread (the run loop seccomp-filters the thread
/// it runs on) with a deadline.
fn run_bounded(vm: Vm, limit: Duration) -> ExitReason {
    let stop = vm.stop_handle();
    let t = std::thread::spawn(move || vm.run());
    let start = Instant::now();
    while !t.is_finished() {
        if start.elapsed() > limit {
            stop.stop();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    t.join().expect("run thread").expect("vm run")
}

fn vcpu_threads() -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/task")
        .expect("procfs lists our threads")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::read_to_string(p.join("comm"))
                .map(|c| c.starts_with("vcpu"))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn real_mode_guest_prints_on_the_serial_port_and_its_i8042_reset_ends_the_vm() {
    if !kvm_available() {
        return;
    }
    let tail = TailBuffer::new(1024);
    let vm = Vm::new(
        &config(
            raw(real_mode_hello(b"hello from the guest\n"), RawMode::Real),
            1,
        ),
        io(tail.clone()),
    )
    .unwrap();
    let reason = run_bounded(vm, Duration::from_secs(20));
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(
        String::from_utf8_lossy(&tail.contents()),
        "hello from the guest\n"
    );
}

#[test]
fn shutdown_joins_every_vcpu_thread_of_a_multi_vcpu_vm() {
    if !kvm_available() {
        return;
    }
    let tail = TailBuffer::new(1024);
    let vm = Vm::new(
        &config(raw(real_mode_hello(b"bye"), RawMode::Real), 4),
        io(tail.clone()),
    )
    .unwrap();
    let reason = run_bounded(vm, Duration::from_secs(20));
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(tail.contents(), b"bye");
    assert!(vcpu_threads().is_empty(), "no vcpu thread outlives run()");
}

#[test]
fn a_spinning_guest_runs_under_seccomp_and_stops_when_the_host_asks() {
    if !kvm_available() {
        return;
    }
    // cli; jmp $
    let vm = Vm::new(
        &config(raw(vec![0xfa, 0xeb, 0xfe], RawMode::Real), 2),
        io(std::io::sink()),
    )
    .unwrap();
    let stop = vm.stop_handle();
    let t = std::thread::spawn(move || vm.run());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut filtered = Vec::new();
    while filtered.len() < 2 && Instant::now() < deadline {
        filtered = vcpu_threads()
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(p.join("status"))
                    .map(|s| {
                        s.lines()
                            .any(|l| l.starts_with("Seccomp:") && l.ends_with('2'))
                    })
                    .unwrap_or(false)
            })
            .collect();
        std::thread::sleep(Duration::from_millis(5));
    }
    let asked = Instant::now();
    stop.stop();
    let reason = t.join().unwrap().unwrap();
    assert_eq!(
        filtered.len(),
        2,
        "both vcpu threads run in seccomp filter mode"
    );
    assert_eq!(reason, ExitReason::Stopped);
    assert!(asked.elapsed() < Duration::from_secs(2), "stop is prompt");
    assert!(vcpu_threads().is_empty());
}

#[test]
fn a_flooding_guest_cannot_grow_the_console_log_past_its_cap() {
    if !kvm_available() {
        return;
    }
    // mov dx, 0x3f8; mov al, 'x'; loop: out dx, al; jmp loop
    let code = vec![0xba, 0xf8, 0x03, 0xb0, b'x', 0xee, 0xeb, 0xfd];
    let log = Arc::new(Mutex::new(Vec::new()));
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let capped = CappedWriter::new(Shared(log.clone()), 1000);
    let vm = Vm::new(&config(raw(code, RawMode::Real), 1), io(capped)).unwrap();
    let stop = vm.stop_handle();
    let t = std::thread::spawn(move || vm.run());
    let deadline = Instant::now() + Duration::from_secs(20);
    while log.lock().unwrap().len() < 1000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Keep flooding a while longer: the log must not grow.
    std::thread::sleep(Duration::from_millis(200));
    stop.stop();
    assert_eq!(t.join().unwrap().unwrap(), ExitReason::Stopped);
    assert_eq!(log.lock().unwrap().len(), 1000);
}

#[test]
fn long_mode_guest_reads_the_virtio_mmio_magic_and_a_fault_resets_the_vm() {
    if !kvm_available() {
        return;
    }
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    code.push(0xa1); // mov eax, [moffs64]
    code.extend_from_slice(&0xd000_0000u64.to_le_bytes());
    for _ in 0..4 {
        code.push(0xee); // out dx, al
        code.extend_from_slice(&[0xc1, 0xe8, 0x08]); // shr eax, 8
    }
    code.extend_from_slice(&[0x0f, 0x0b]); // ud2: no IDT, so a triple fault
    let tail = TailBuffer::new(64);
    let vm = Vm::new(&config(raw(code, RawMode::Long64), 1), io(tail.clone())).unwrap();
    let reason = run_bounded(vm, Duration::from_secs(20));
    assert_eq!(String::from_utf8_lossy(&tail.contents()), "virt");
    assert_eq!(reason, ExitReason::Reset);
}

#[test]
fn bad_configs_are_refused_before_touching_kvm() {
    let c = VmConfig {
        vcpus: 0,
        ..config(raw(vec![], RawMode::Real), 1)
    };
    let err = Vm::new(&c, io(std::io::sink())).err().unwrap().to_string();
    assert!(err.contains("vcpus"), "{err}");
    let c = VmConfig {
        mem_mib: 1,
        ..config(raw(vec![], RawMode::Real), 1)
    };
    let err = Vm::new(&c, io(std::io::sink())).err().unwrap().to_string();
    assert!(err.contains("memory"), "{err}");
}
