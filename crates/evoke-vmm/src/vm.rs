//! The VM: configuration, setup and the run loop.
//!
//! Lifecycle: [`Vm::new`] creates everything (KVM VM, guest memory, devices,
//! vCPUs with their boot state) without running guest code; [`Vm::run`]
//! starts one thread per vCPU and blocks until the guest resets, powers off
//! or crashes, or a [`StopHandle`] asks it to stop. It then kicks every vCPU
//! out of `KVM_RUN`, joins all threads and returns the [`ExitReason`].

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::acpi::{self, MmioDevice};
use crate::arch::{self, EntryMode};
use crate::boot::{self, BootProtocol, BootSpec};
use crate::devices::i8042::{I8042Action, I8042};
use crate::devices::net::{self, NetDevice};
use crate::devices::serial::SerialPort;
use crate::devices::tap::Tap;
use crate::devices::virtio::{self, MmioTransport};
use crate::devices::EventFdTrigger;
use crate::error::VmmError;
use crate::kvm_check;
use crate::layout::*;
use crate::seccomp;
use crate::sys::GuestRam;

/// What to boot.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Payload {
    /// A Linux kernel (bzImage or ELF vmlinux), optional initramfs, command line.
    Linux {
        kernel: PathBuf,
        /// Initramfs parts, concatenated in the guest.
        #[serde(default)]
        initrd: Vec<PathBuf>,
        cmdline: String,
        #[serde(default)]
        protocol: BootProtocol,
    },
    /// Flat code loaded at `addr` and entered there in `mode`: for tests and
    /// for probing what a host's KVM can run.
    Raw {
        code: Vec<u8>,
        addr: u64,
        mode: RawMode,
    },
}

/// CPU mode for a [`Payload::Raw`] guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RawMode {
    Real,
    Long64,
}

/// Which device carries the agent channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentDevice {
    /// virtio-console on virtio-mmio (guest `/dev/hvc0`).
    #[default]
    VirtioConsole,
    /// The second UART, COM2 (guest `/dev/ttyS1`).
    Serial,
}

/// The serialisable part of a VM's configuration.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub mem_mib: u64,
    pub vcpus: u8,
    pub payload: Payload,
    #[serde(default)]
    pub agent_device: AgentDevice,
    /// Confine every VMM thread with [`crate::seccomp`] once set up.
    #[serde(default = "yes")]
    pub seccomp: bool,
    /// virtio-net devices, each backed by an existing tap.
    #[serde(default)]
    pub net: Vec<NetDeviceConfig>,
}

/// One virtio-net device: the tap on the host, the MAC the guest sees.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetDeviceConfig {
    pub tap: String,
    pub mac: [u8; 6],
}

fn yes() -> bool {
    true
}

/// Where guest output goes and where guest input comes from.
pub struct VmIo {
    /// COM1 (the kernel console).
    pub serial_out: Box<dyn Write + Send>,
    /// The agent channel's host side: guest → host bytes.
    pub agent_out: Box<dyn Write + Send>,
    /// The agent channel's host side: host → guest bytes (a pipe, socket or
    /// file; polled, so the VMM can stop without waiting for it).
    pub agent_in: Option<File>,
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset: i8042 (`reboot=k`), a triple fault, or a
    /// reset system event. A guest's `reboot` and `panic=-1` end here.
    Reset,
    /// The guest powered off (ACPI/PSCI system event).
    PowerOff,
    /// The guest reported a crash (system event).
    Crash,
    /// The host asked the VM to stop.
    Stopped,
    /// A vCPU failed (KVM internal or entry error).
    VcpuError(String),
}

struct Shared {
    exit: Mutex<Option<ExitReason>>,
    exit_evt: EventFd,
    stop: AtomicBool,
    started: Instant,
}

impl Shared {
    fn finish(&self, reason: ExitReason) {
        let mut g = match self.exit.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.is_none() {
            tracing::debug!(
                ?reason,
                elapsed_ms = self.started.elapsed().as_millis() as u64,
                "vm exit"
            );
            *g = Some(reason);
        }
        drop(g);
        self.stop.store(true, Ordering::SeqCst);
        // The run loop reads it; failure means it is already signalled.
        let _ = self.exit_evt.write(1);
    }
}

/// Asks a running VM to stop; cheap to clone and send to other threads.
#[derive(Clone)]
pub struct StopHandle(Arc<Shared>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.finish(ExitReason::Stopped);
    }
}

/// Devices reached by port and MMIO exits, shared by all vCPU threads.
struct Devices {
    com1: Mutex<SerialPort>,
    com2: Option<Mutex<SerialPort>>,
    i8042: Mutex<I8042>,
    virtio: Vec<(u64, Mutex<MmioTransport>)>,
    /// virtio-net devices; shared with their receive threads.
    net: Vec<(u64, Arc<Mutex<NetDevice>>)>,
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        // A panicking vCPU thread ends the VM anyway; keep serving the rest.
        Err(p) => p.into_inner(),
    }
}

impl Devices {
    fn pio_in(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if lock(&self.com1).contains(port) {
            data[0] = lock(&self.com1).read(port);
        } else if let Some(c) = self.com2.as_ref().filter(|c| lock(c).contains(port)) {
            data[0] = lock(c).read(port);
        } else if port == I8042_DATA_PORT || port == I8042_CMD_PORT {
            data[0] = lock(&self.i8042).read((port - I8042_DATA_PORT) as u8);
        }
    }

    fn pio_out(&self, port: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if lock(&self.com1).contains(port) {
            lock(&self.com1).write(port, v);
        } else if let Some(c) = self.com2.as_ref().filter(|c| lock(c).contains(port)) {
            lock(c).write(port, v);
        } else if port == I8042_DATA_PORT || port == I8042_CMD_PORT {
            if lock(&self.i8042).write((port - I8042_DATA_PORT) as u8, v) == I8042Action::Reset {
                self.shared.finish(ExitReason::Reset);
            }
        } else if port == BOOT_MARK_PORT {
            tracing::info!(
                mark = v,
                elapsed_us = self.shared.started.elapsed().as_micros() as u64,
                "guest boot mark"
            );
        }
    }

    fn virtio_at(&self, addr: u64) -> Option<(&Mutex<MmioTransport>, u64)> {
        self.virtio
            .iter()
            .find(|(base, _)| (*base..*base + VIRTIO_MMIO_SIZE).contains(&addr))
            .map(|(base, dev)| (dev, addr - base))
    }

    fn net_at(&self, addr: u64) -> Option<(&Mutex<NetDevice>, u64)> {
        self.net
            .iter()
            .find(|(base, _)| (*base..*base + VIRTIO_MMIO_SIZE).contains(&addr))
            .map(|(base, dev)| (&**dev, addr - base))
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Some((dev, off)) = self.virtio_at(addr) {
            lock(dev).read(off, data)
        } else if let Some((dev, off)) = self.net_at(addr) {
            lock(dev).read(off, data)
        } else {
            data.fill(0xff)
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((dev, off)) = self.virtio_at(addr) {
            lock(dev).write(off, data);
        } else if let Some((dev, off)) = self.net_at(addr) {
            lock(dev).write(off, data);
        }
    }
}

/// A VM ready to run. Field order matters: vCPU and VM fds drop before the
/// guest memory they map.
pub struct Vm {
    vcpus: Vec<VcpuFd>,
    _vm: VmFd,
    devices: Arc<Devices>,
    shared: Arc<Shared>,
    agent_in: Option<File>,
    seccomp: bool,
    mem: GuestMemoryMmap,
    /// The mappings under `mem` and under the devices' copies of it: last,
    /// so it drops after everything that refers to it.
    _ram: GuestRam,
}

const MAX_VCPUS: u8 = 64;

/// A vCPU thread's stack. Its loop and the device models it calls need a
/// few KiB; std's default of 2 MiB, mapped right below the 2 MiB-aligned
/// guest RAM, is itself aligned, and a host with transparent huge pages set
/// to `always` backs it with one huge page at its first touch: 2 MiB of VMM
/// overhead per vCPU.
const VCPU_STACK: usize = 256 << 10;

/// A debug event per set-up phase, with the time since `Vm::new` began.
fn phase(started: Instant, name: &'static str) {
    tracing::debug!(
        phase = name,
        elapsed_us = started.elapsed().as_micros() as u64,
        "vm setup"
    );
}

impl Vm {
    /// Creates the VM and loads the payload; no guest code runs yet.
    pub fn new(config: &VmConfig, io: VmIo) -> Result<Vm, VmmError> {
        let started = Instant::now();
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "vcpus must be 1..={MAX_VCPUS}, got {}",
                config.vcpus
            )));
        }
        if config.mem_mib < 16 {
            return Err(VmmError::Config(format!(
                "memory must be at least 16 MiB, got {} MiB",
                config.mem_mib
            )));
        }
        let mem_size = config.mem_mib << 20;
        let kvm = kvm_check::open_kvm()?;
        let kerr = |op| move |source| VmmError::Kvm { op, source };
        let vm = kvm.create_vm().map_err(kerr("KVM_CREATE_VM"))?;
        let ram = GuestRam::new(&ram_regions(mem_size))?;
        let mem = ram.memory().clone();
        crate::sys::advise_huge_pages(&mem);
        crate::sys::register_guest_memory(&vm, &mem)?;
        phase(started, "guest memory");
        vm.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kerr("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kerr("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip().map_err(kerr("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kerr("KVM_CREATE_PIT2"))?;

        let sys = |what| move |source| VmmError::Sys { what, source };
        let irq = |gsi: u32| -> Result<EventFdTrigger, VmmError> {
            let t = EventFdTrigger::new().map_err(sys("irq eventfd"))?;
            vm.register_irqfd(&t.0, gsi).map_err(kerr("KVM_IRQFD"))?;
            Ok(t)
        };
        let shared = Arc::new(Shared {
            exit: Mutex::new(None),
            exit_evt: EventFd::new(0).map_err(sys("exit eventfd"))?,
            stop: AtomicBool::new(false),
            started,
        });
        let com1 = SerialPort::new(COM1_PORT, irq(COM1_IRQ)?, io.serial_out);
        let (com2, virtio) = match config.agent_device {
            AgentDevice::Serial => (
                Some(Mutex::new(SerialPort::new(
                    COM2_PORT,
                    irq(COM2_IRQ)?,
                    io.agent_out,
                ))),
                Vec::new(),
            ),
            AgentDevice::VirtioConsole => {
                let dev =
                    MmioTransport::new_console(mem.clone(), irq(VIRTIO_IRQ_BASE)?, io.agent_out)
                        .map_err(|e| VmmError::Config(format!("virtio-console queue: {e}")))?;
                (None, vec![(VIRTIO_MMIO_BASE, Mutex::new(dev))])
            }
        };
        // virtio-net windows and IRQs follow the console's.
        let mut net = Vec::new();
        for (i, n) in config.net.iter().enumerate() {
            let slot = (virtio.len() + i) as u64;
            let tap = Tap::open(&n.tap)?;
            let dev = NetDevice::new(
                mem.clone(),
                irq(VIRTIO_IRQ_BASE + slot as u32)?,
                n.mac,
                Box::new(tap),
            )
            .map_err(sys("virtio-net device"))?;
            let base = VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE;
            // A queue notify then only signals the device's thread, with no
            // exit to this process; without it the notify still works.
            for (offset, queue, fd) in dev.ioeventfds() {
                let addr = IoEventAddress::Mmio(base + offset);
                if let Err(e) = vm.register_ioevent(fd, &addr, queue) {
                    tracing::warn!(error = %e, queue, "virtio-net notify without an ioeventfd");
                }
            }
            net.push((base, Arc::new(Mutex::new(dev))));
        }
        let devices = Arc::new(Devices {
            com1: Mutex::new(com1),
            com2,
            i8042: Mutex::new(I8042::new()),
            virtio,
            net,
            shared: shared.clone(),
        });

        let (entry, mode) = match &config.payload {
            Payload::Linux {
                kernel,
                initrd,
                cmdline,
                protocol,
            } => {
                let mmio: Vec<MmioDevice> = devices
                    .virtio
                    .iter()
                    .map(|(base, _)| *base)
                    .chain(devices.net.iter().map(|(base, _)| *base))
                    .enumerate()
                    .map(|(i, base)| MmioDevice {
                        base,
                        size: VIRTIO_MMIO_SIZE,
                        irq: VIRTIO_IRQ_BASE + i as u32,
                    })
                    .collect();
                let mut serials = vec![acpi::SerialDevice {
                    port: COM1_PORT,
                    irq: COM1_IRQ as u8,
                }];
                if devices.com2.is_some() {
                    serials.push(acpi::SerialDevice {
                        port: COM2_PORT,
                        irq: COM2_IRQ as u8,
                    });
                }
                let rsdp = acpi::write_tables(&mem, config.vcpus, &serials, &mmio)?;
                let spec = BootSpec {
                    kernel,
                    initrd,
                    cmdline,
                    protocol: *protocol,
                    mem_size,
                    rsdp,
                };
                phase(started, "devices and acpi");
                let e = boot::load(&mem, &spec)?;
                phase(started, "kernel and initramfs loaded");
                (e.entry, e.mode)
            }
            Payload::Raw { code, addr, mode } => {
                mem.write_slice(code, GuestAddress(*addr)).map_err(|_| {
                    VmmError::Config("raw payload does not fit in guest memory".into())
                })?;
                let m = match mode {
                    RawMode::Real => EntryMode::Real,
                    RawMode::Long64 => EntryMode::Long64,
                };
                (*addr, m)
            }
        };

        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for i in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(i))
                .map_err(kerr("KVM_CREATE_VCPU"))?;
            let cpuid = arch::guest_cpuid(&kvm, i, config.vcpus)?;
            vcpu.set_cpuid2(&cpuid).map_err(kerr("KVM_SET_CPUID2"))?;
            arch::setup_msrs(&vcpu)?;
            arch::setup_fpu(&vcpu)?;
            arch::setup_lapic(&vcpu)?;
            if i == 0 {
                arch::setup_sregs(&mem, &vcpu, mode)?;
                arch::setup_regs(&vcpu, mode, entry)?;
            }
            vcpus.push(vcpu);
        }
        tracing::debug!(
            setup_us = started.elapsed().as_micros() as u64,
            mem_mib = config.mem_mib,
            vcpus = config.vcpus,
            "vm ready"
        );
        Ok(Vm {
            vcpus,
            _vm: vm,
            devices,
            shared,
            agent_in: io.agent_in,
            seccomp: config.seccomp,
            mem,
            _ram: ram,
        })
    }

    /// A handle to stop the VM from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.shared.clone())
    }

    /// Guest memory (for tests and measurements).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Runs the guest until it exits, then joins every thread it started.
    pub fn run(mut self) -> Result<ExitReason, VmmError> {
        register_signal_handler(SIGRTMIN(), kick_handler).map_err(|e| VmmError::Sys {
            what: "vcpu kick signal handler",
            source: e.into(),
        })?;
        let filter = if self.seccomp {
            Some(Arc::new(seccomp::vmm_filter()?))
        } else {
            None
        };
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut net_threads: Vec<JoinHandle<()>> = Vec::new();
        for (index, vcpu) in self.vcpus.drain(..).enumerate() {
            let devices = self.devices.clone();
            let shared = self.shared.clone();
            let filter = filter.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .stack_size(VCPU_STACK)
                .spawn(move || {
                    if let Some(f) = filter {
                        if let Err(e) = seccomp::apply(&f) {
                            shared.finish(ExitReason::VcpuError(e.to_string()));
                            return;
                        }
                    }
                    // If this thread ends any other way (a panic in a
                    // device model), the VM must still stop, or `run` would
                    // wait for an exit that never comes.
                    let _guard = EndsVm(&shared);
                    run_vcpu(index as u8, vcpu, &devices, &shared);
                })
                .map_err(|source| VmmError::SpawnVcpu {
                    index: index as u8,
                    source,
                })?;
            threads.push(t);
        }
        for (i, (_, dev)) in self.devices.net.iter().enumerate() {
            let shared = self.shared.clone();
            let t = net::spawn_rx_thread(
                format!("net{i}"),
                dev.clone(),
                move || shared.stop.load(Ordering::SeqCst),
                filter.clone(),
            )
            .map_err(|source| VmmError::Sys {
                what: "virtio-net thread",
                source,
            })?;
            net_threads.push(t);
        }
        let input_thread = match self.agent_in.take() {
            Some(input) => {
                let devices = self.devices.clone();
                let shared = self.shared.clone();
                let filter = filter.clone();
                Some(
                    std::thread::Builder::new()
                        .name("agent-in".into())
                        .spawn(move || {
                            if let Some(f) = filter {
                                if seccomp::apply(&f).is_err() {
                                    return;
                                }
                            }
                            pump_agent_input(input, &devices, &shared);
                        })
                        .map_err(|source| VmmError::Sys {
                            what: "agent input thread",
                            source,
                        })?,
                )
            }
            None => None,
        };
        if let Some(f) = &filter {
            seccomp::apply(f)?;
        }
        // Wait for the first exit reason (guest or host).
        while self.shared.exit_evt.read().is_err() {
            if self.shared.stop.load(Ordering::SeqCst) {
                break;
            }
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        // Kick vCPUs out of KVM_RUN until each thread has ended. A kick can
        // land just before a thread enters KVM_RUN, so repeat it.
        for t in threads {
            while !t.is_finished() {
                let _ = t.kill(SIGRTMIN());
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.join().is_err() {
                tracing::error!("a vcpu thread panicked");
            }
        }
        if let Some(t) = input_thread {
            if t.join().is_err() {
                tracing::error!("the agent input thread panicked");
            }
        }
        for t in net_threads {
            if t.join().is_err() {
                tracing::error!("a virtio-net thread panicked");
            }
        }
        let reason = lock(&self.shared.exit)
            .clone()
            .unwrap_or(ExitReason::Stopped);
        Ok(reason)
    }
}

/// Ends the VM when dropped (first reason wins, so a normal exit keeps its
/// own reason).
struct EndsVm<'a>(&'a Shared);

impl Drop for EndsVm<'_> {
    fn drop(&mut self) {
        if !self.0.stop.load(Ordering::SeqCst) {
            self.0.finish(ExitReason::VcpuError(
                "a vcpu thread ended unexpectedly".into(),
            ));
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only interrupts KVM_RUN (EINTR); the loop then checks the stop flag.
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

fn run_vcpu(index: u8, mut vcpu: VcpuFd, devices: &Devices, shared: &Shared) {
    while !shared.stop.load(Ordering::SeqCst) {
        match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => devices.pio_in(port, data),
                VcpuExit::IoOut(port, data) => devices.pio_out(port, data),
                VcpuExit::MmioRead(addr, data) => devices.mmio_read(addr, data),
                VcpuExit::MmioWrite(addr, data) => devices.mmio_write(addr, data),
                VcpuExit::Shutdown => shared.finish(ExitReason::Reset),
                VcpuExit::Hlt => {
                    // With an in-kernel irqchip HLT stays in KVM; an exit
                    // here means the guest stopped for good.
                    shared.finish(ExitReason::PowerOff)
                }
                VcpuExit::SystemEvent(kind, _) => shared.finish(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                    KVM_SYSTEM_EVENT_CRASH => ExitReason::Crash,
                    other => ExitReason::VcpuError(format!("unknown system event {other}")),
                }),
                VcpuExit::Intr => {}
                VcpuExit::InternalError => shared.finish(ExitReason::VcpuError(format!(
                    "vcpu {index}: kvm internal error (the host could not emulate a guest instruction)"
                ))),
                VcpuExit::FailEntry(reason, cpu) => shared.finish(ExitReason::VcpuError(format!(
                    "vcpu {index}: kvm entry failed, hardware reason {reason:#x} on host cpu {cpu}"
                ))),
                other => shared.finish(ExitReason::VcpuError(format!(
                    "vcpu {index}: unexpected exit {other:?}"
                ))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => shared.finish(ExitReason::VcpuError(format!("vcpu {index}: KVM_RUN: {e}"))),
        }
    }
}

fn pump_agent_input(input: File, devices: &Devices, shared: &Shared) {
    // Poll with a timeout so the thread notices a stopped VM even when the
    // host side never closes the input.
    struct Polled<'a> {
        file: File,
        shared: &'a Shared,
    }
    impl Read for Polled<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            loop {
                if self.shared.stop.load(Ordering::SeqCst) {
                    return Ok(0);
                }
                let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(50u8)) {
                    Ok(0) => continue,
                    Ok(_) => return self.file.read(buf),
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    let polled = Polled {
        file: input,
        shared,
    };
    virtio::pump_input(
        polled,
        |bytes| {
            if let Some(c) = &devices.com2 {
                lock(c).enqueue_input(bytes)
            } else if let Some((_, dev)) = devices.virtio.first() {
                lock(dev).offer_input(bytes)
            } else {
                bytes.len()
            }
        },
        &shared.stop,
    );
}
