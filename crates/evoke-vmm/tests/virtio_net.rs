//! The VMM's virtio-net device with a real tap, driven by a tiny 64-bit
//! guest written here as machine code: it sets both queues up the way the
//! Linux driver does, transmits one frame, posts one receive buffer and
//! waits until the host's traffic fills it. Runs on any KVM, PVM included,
//! inside a network namespace the test creates.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use evoke_vmm::devices::sink::TailBuffer;
use evoke_vmm::vm::{AgentDevice, NetDeviceConfig, Payload, RawMode, VmIo};
use evoke_vmm::{ExitReason, Vm, VmConfig};

const LOAD: u64 = 0x10_0000;
/// The console takes the first virtio-mmio window; the net device the next.
const NET_MMIO: u64 = 0xd000_1000;
const RX_DESC: u64 = 0x1000;
const RX_AVAIL: u64 = 0x2000;
const RX_USED: u64 = 0x3000;
const TX_DESC: u64 = 0x4000;
const TX_AVAIL: u64 = 0x5000;
const TX_USED: u64 = 0x6000;
const RX_BUF: u64 = 0x7000;
const TX_BUF: u64 = 0x8000;

/// Under CI, missing root, KVM or /dev/net/tun fail the test; elsewhere it
/// is skipped with the reason.
fn ready() -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    if let Err(e) = evoke_vmm::kvm_check::open_kvm() {
        missing.push(format!("kvm ({e})"));
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun".into());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("this test needs {}", missing.join(", "));
    assert!(std::env::var_os("CI").is_none(), "{msg}");
    eprintln!("skipped: {msg}");
    false
}

fn config(net: Vec<NetDeviceConfig>, code: Vec<u8>) -> VmConfig {
    VmConfig {
        mem_mib: 32,
        vcpus: 1,
        payload: Payload::Raw {
            code,
            addr: LOAD,
            mode: RawMode::Long64,
        },
        agent_device: AgentDevice::VirtioConsole,
        seccomp: true,
        net,
    }
}

fn io(serial: TailBuffer) -> VmIo {
    VmIo {
        serial_out: Box::new(serial),
        agent_out: Box::new(std::io::sink()),
        agent_in: None,
    }
}

/// `mov dword [rbx + off], val`
fn mmio_write(code: &mut Vec<u8>, off: u32, val: u32) {
    code.extend_from_slice(&[0xc7, 0x83]);
    code.extend_from_slice(&off.to_le_bytes());
    code.extend_from_slice(&val.to_le_bytes());
}

fn put(image: &mut [u8], at: u64, bytes: &[u8]) {
    image[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
}

/// One descriptor (at table slot 0) and an avail ring offering it.
fn offer(image: &mut [u8], desc: u64, avail: u64, buf: u64, len: u32, device_writes: bool) {
    let mut d = Vec::new();
    d.extend_from_slice(&(LOAD + buf).to_le_bytes());
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&(if device_writes { 2u16 } else { 0 }).to_le_bytes());
    d.extend_from_slice(&0u16.to_le_bytes());
    put(image, desc, &d);
    // flags 0, idx 1, ring[0] = 0
    put(image, avail, &[0, 0, 1, 0, 0, 0]);
}

/// The guest: driver set-up, transmit `frame`, wait for a received frame,
/// print `R` on COM1, reset.
fn guest(frame: &[u8]) -> Vec<u8> {
    let mut code = vec![0x48, 0xbb]; // mov rbx, imm64
    code.extend_from_slice(&NET_MMIO.to_le_bytes());
    for (off, val) in [
        (0x70, 0),
        (0x70, 1 | 2),
        (0x24, 1),
        (0x20, 1),
        (0x70, 1 | 2 | 8),
    ] {
        mmio_write(&mut code, off, val);
    }
    for (q, desc, avail, used) in [
        (0, RX_DESC, RX_AVAIL, RX_USED),
        (1, TX_DESC, TX_AVAIL, TX_USED),
    ] {
        mmio_write(&mut code, 0x30, q);
        mmio_write(&mut code, 0x38, 16);
        mmio_write(&mut code, 0x80, (LOAD + desc) as u32);
        mmio_write(&mut code, 0x84, 0);
        mmio_write(&mut code, 0x90, (LOAD + avail) as u32);
        mmio_write(&mut code, 0x94, 0);
        mmio_write(&mut code, 0xa0, (LOAD + used) as u32);
        mmio_write(&mut code, 0xa4, 0);
        mmio_write(&mut code, 0x44, 1);
    }
    mmio_write(&mut code, 0x70, 1 | 2 | 8 | 4);
    mmio_write(&mut code, 0x50, 1); // notify tx
    mmio_write(&mut code, 0x50, 0); // notify rx: a buffer is posted
    code.extend_from_slice(&[0x48, 0xb9]); // mov rcx, imm64: the rx used idx
    code.extend_from_slice(&(LOAD + RX_USED + 2).to_le_bytes());
    code.extend_from_slice(&[0x0f, 0xb7, 0x01]); // movzx eax, word [rcx]
    code.extend_from_slice(&[0x85, 0xc0]); // test eax, eax
    code.extend_from_slice(&[0x74, 0xf9]); // jz back to the movzx
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend_from_slice(&[0xb0, b'R', 0xee]); // mov al, 'R'; out dx, al
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // i8042 reset
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    assert!(code.len() < RX_DESC as usize);

    let mut image = vec![0u8; TX_BUF as usize + frame.len()];
    put(&mut image, 0, &code);
    offer(&mut image, RX_DESC, RX_AVAIL, RX_BUF, 2048, true);
    offer(
        &mut image,
        TX_DESC,
        TX_AVAIL,
        TX_BUF,
        frame.len() as u32,
        false,
    );
    put(&mut image, TX_BUF, frame);
    image
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The RX packet count of `dev` from `ip -s link show`.
fn rx_packets(dev: &str) -> u64 {
    let text = ip(&["-s", "link", "show", dev]);
    text.lines()
        .skip_while(|l| !l.trim_start().starts_with("RX:"))
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_missing_tap_fails_vm_setup_with_the_taps_name() {
    if !ready() {
        return;
    }
    let cfg = config(
        vec![NetDeviceConfig {
            tap: "evk-missing9".into(),
            mac: [2, 0x65, 0, 0, 0, 1],
        }],
        vec![0xf4],
    );
    let err = Vm::new(&cfg, io(TailBuffer::new(16)))
        .err()
        .expect("setup fails");
    let msg = err.to_string();
    assert!(msg.contains("evk-missing9"), "{msg}");
}

#[test]
fn a_guest_frame_reaches_the_tap_and_host_traffic_reaches_the_guest() {
    if !ready() {
        return;
    }
    // A broadcast frame of a local experimental ethertype: the host counts
    // it as received on the tap and drops it.
    let mut frame = vec![0u8; 12]; // virtio_net_hdr
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x02, 0x65, 10, 99, 0, 2]);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(b"evoke virtio-net test frame, padded to the minimum size..");
    let image = guest(&frame);

    let t = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        ip(&["tuntap", "add", "dev", "vnt0", "mode", "tap", "vnet_hdr"]);
        ip(&["addr", "add", "10.99.0.1/24", "dev", "vnt0"]);
        ip(&["link", "set", "vnt0", "up"]);
        let tail = TailBuffer::new(64);
        let cfg = config(
            vec![NetDeviceConfig {
                tap: "vnt0".into(),
                mac: [0x02, 0x65, 10, 99, 0, 2],
            }],
            image,
        );
        let vm = Vm::new(&cfg, io(tail.clone())).expect("vm with a tap");
        let stop = vm.stop_handle();
        // The run loop seccomp-filters its thread, so it gets its own; it
        // inherits this thread's network namespace.
        let run = std::thread::spawn(move || vm.run());
        let start = Instant::now();
        // A UDP broadcast on the tap's subnet leaves through the tap at
        // once (no ARP): traffic for the guest's receive queue. Repeat it
        // until the guest has its buffer posted and reports.
        let udp = std::net::UdpSocket::bind("10.99.0.1:0").expect("udp socket");
        udp.set_broadcast(true).expect("SO_BROADCAST");
        while !run.is_finished() && start.elapsed() < Duration::from_secs(20) {
            let _ = udp.send_to(b"to the guest", "10.99.0.255:9");
            std::thread::sleep(Duration::from_millis(20));
        }
        if !run.is_finished() {
            stop.stop();
        }
        let reason = run.join().expect("run thread").expect("vm run");
        (reason, tail.contents(), rx_packets("vnt0"))
    });
    let (reason, serial, rx) = t.join().expect("netns thread");
    assert_eq!(
        String::from_utf8_lossy(&serial),
        "R",
        "the guest saw no received frame (exit {reason:?})"
    );
    assert_eq!(reason, ExitReason::Reset);
    assert!(rx >= 1, "the guest's frame did not reach the tap (rx {rx})");
}
