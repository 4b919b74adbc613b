//! virtio-net on virtio-mmio (version 2): one receive and one transmit
//! queue, a fixed MAC (`VIRTIO_NET_F_MAC`), checksum and TSO offloads both
//! ways, `VIRTIO_RING_F_EVENT_IDX`, no control queue and no mergeable
//! receive buffers (with TSO the Linux driver then posts 64 KiB receive
//! chains). The host end is a [`NetBackend`], a tap in production.
//!
//! Both queues are served by the device's own thread ([`run_rx_loop`]). It
//! polls the backend and one [`NotifyFd`] per queue. The VMM registers
//! those as KVM ioeventfds on the QueueNotify register (datamatch: the
//! queue index, see [`NetDevice::ioeventfds`]), so a guest's notify only
//! signals the fd inside the kernel and costs no exit to the VMM's user
//! space, the dearest event under nested virtualisation. A notify that
//! does reach [`NetDevice::write`] (no ioeventfd) is served the same way.
//!
//! Transmit: every chain the guest queued (header and frame) is written to
//! the backend as one frame, straight from guest memory (one `writev`).
//! Receive: each frame from the backend is read straight into the next
//! posted buffer (one `readv`) when that buffer takes the largest frame
//! (the driver posts 64 KiB chains once it accepted TSO); into a device
//! buffer and copied from there otherwise, so a frame is never truncated. When the guest has no
//! buffers left the frame waits, and the loop stops polling the backend
//! until the guest posts more, so a busy host cannot spin the thread.
//!
//! Notifications are kept to what is needed, both ways. The device asks
//! for receive notifies only when it ran out of buffers, and turns transmit
//! notifies off while it drains the queue. It interrupts the guest only
//! when the driver asked: past `used_event` with EVENT_IDX, otherwise
//! unless `VRING_AVAIL_F_NO_INTERRUPT` is set. Each interrupt costs the
//! guest two register accesses that exit to the VMM (status and ack).
//!
//! Frames carry a 12-byte `virtio_net_hdr` both ways, the layout of virtio
//! 1.0 and of the tap (see [`super::tap`]), so checksum and segmentation
//! requests pass through untouched; the device only sets `num_buffers` to 1
//! on receive. The tap is told which offloads it may use only once the
//! driver has accepted them.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::iov;
use super::mmio::{reg, Event, Transport, VIRTIO_F_VERSION_1};
use super::notify::NotifyFd;
use super::tap::{NetBackend, VNET_HDR_LEN};
use super::EventFdTrigger;

const VIRTIO_ID_NET: u32 = 1;
const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// `virtq_avail.flags`: the driver does not want interrupts (without
/// EVENT_IDX).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Checksum and TSO offloads both ways: the header carries them between
/// the guest and the tap unchanged, so the device does no work for them,
/// and TCP moves in 64 KiB segments instead of 1500-byte frames. EVENT_IDX
/// lets both sides say precisely when they want the next notification.
const DEVICE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_RING_F_EVENT_IDX;
/// The tap's TUNSETOFFLOAD flags.
const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;
/// The largest frame with its header a tap hands over (64 KiB + header);
/// without offloads frames are MTU-sized, but a read must never truncate.
const MAX_FRAME: usize = 65_562;
/// How long the receive loop waits after a backend error before it looks
/// at the backend again.
const FAILED_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

const RX: usize = 0;
const TX: usize = 1;

/// Frame counters, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames from the host dropped: the driver was not ready, or a frame did
    /// not fit the guest's buffer.
    pub rx_dropped: u64,
    /// Frames from the guest dropped: the backend was full or failed.
    pub tx_dropped: u64,
    /// Interrupts sent to the guest, and those the driver's suppression
    /// saved.
    pub irqs: u64,
    pub irqs_suppressed: u64,
    /// Bytes sent for the guest (headers included), and the drains of the
    /// transmit queue that sent anything.
    pub tx_bytes: u64,
    pub tx_batches: u64,
    /// Drains that found frames on the transmit queue on the loop's idle
    /// look, with no notify taken: a notify lost, or one that raced the
    /// poll's timeout.
    pub tx_unannounced: u64,
}

/// What the receive path needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// The backend has nothing more: wait for it.
    Idle,
    /// A frame waits for the guest to post buffers: wait for a notify.
    NeedBuffers,
    /// The backend failed (a tap deleted under the VM, say): back off
    /// rather than spin on an fd that stays readable with an error.
    Failed,
}

/// What one direct read into a guest buffer came to.
enum Direct {
    /// A frame went into the guest's buffer (or the buffer went back empty).
    Delivered,
    /// Nothing consumed worth a buffer (a runt, a signal): try again.
    Again,
    /// The backend has nothing: the buffer stays the next one.
    Empty,
    Failed,
    /// The guest has posted no buffer.
    NoBuffers,
    /// The next buffer may be too small for a frame: copy instead.
    SmallBuffers,
}

/// A virtio-net device on a virtio-mmio window.
pub struct NetDevice {
    t: Transport,
    mac: [u8; 6],
    backend: Box<dyn NetBackend>,
    /// Signalled when the guest posts receive buffers (its queue notify,
    /// through KVM or [`NetDevice::write`]) or the driver comes up.
    rx_kick: Arc<NotifyFd>,
    /// Signalled when the guest queues frames to send.
    tx_kick: Arc<NotifyFd>,
    /// The frame read from the backend that no guest buffer has taken yet,
    /// and its length in `rx_buf`.
    rx_pending: Option<usize>,
    rx_buf: Vec<u8>,
    /// The guest buffers of the frame being sent, and a buffer for
    /// backends that cannot write from guest memory.
    tx_parts: Vec<(GuestAddress, usize)>,
    /// The guest buffers of the receive chain being filled.
    rx_parts: Vec<(GuestAddress, usize)>,
    tx_buf: Vec<u8>,
    pub stats: NetStats,
}

impl NetDevice {
    pub fn new(
        mem: GuestMemoryMmap,
        irq: EventFdTrigger,
        mac: [u8; 6],
        backend: Box<dyn NetBackend>,
    ) -> Result<Self, io::Error> {
        let t = Transport::new(mem, irq, "virtio-net", VIRTIO_ID_NET, DEVICE_FEATURES, 2)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self {
            t,
            mac,
            backend,
            rx_kick: Arc::new(NotifyFd::new()?),
            tx_kick: Arc::new(NotifyFd::new()?),
            rx_pending: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_parts: Vec::with_capacity(iov::MAX_IOVECS),
            rx_parts: Vec::with_capacity(iov::MAX_IOVECS),
            tx_buf: Vec::new(),
            stats: NetStats::default(),
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The queue notifies the VMM should turn into KVM ioeventfds: the
    /// offset of the QueueNotify register in the window, the value written
    /// (the queue index, a 4-byte datamatch) and the fd to signal.
    pub fn ioeventfds(&self) -> [(u64, u32, &EventFd); 2] {
        [
            (reg::QUEUE_NOTIFY, RX as u32, self.rx_kick.eventfd()),
            (reg::QUEUE_NOTIFY, TX as u32, self.tx_kick.eventfd()),
        ]
    }

    /// What the backend may send the guest: the receive offloads the
    /// driver accepted (TSO needs checksum offload too).
    fn tun_offload(&self) -> u32 {
        let f = self.t.driver_features() & self.t.device_features();
        if f & VIRTIO_NET_F_GUEST_CSUM == 0 {
            return 0;
        }
        let mut t = TUN_F_CSUM;
        if f & VIRTIO_NET_F_GUEST_TSO4 != 0 {
            t |= TUN_F_TSO4;
        }
        if f & VIRTIO_NET_F_GUEST_TSO6 != 0 {
            t |= TUN_F_TSO6;
        }
        t
    }

    fn apply_offload(&mut self, flags: u32) {
        if let Err(e) = self.backend.set_offload(flags) {
            // The tap keeps sending plain frames: slower, still correct.
            tracing::warn!(error = %e, flags, "virtio-net: cannot set the tap's offloads");
        }
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Config space: the MAC, read a byte at a time by Linux.
        let mac = self.mac;
        self.t.read(offset, data, |start, data| {
            for (i, b) in data.iter_mut().enumerate() {
                *b = mac.get(start as usize + i).copied().unwrap_or(0);
            }
        });
    }

    /// A guest write at `offset` in the window. The MAC is read-only
    /// (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        match self.t.write(offset, data) {
            // The same fds KVM signals when the ioeventfds are registered:
            // the device's thread serves both queues.
            Some(Event::Notify(q)) if q as usize == TX => self.tx_kick.signal(),
            Some(Event::Notify(q)) if q as usize == RX => self.rx_kick.signal(),
            Some(Event::DriverOk) => {
                let event_idx = self.t.driver_features() & VIRTIO_RING_F_EVENT_IDX != 0;
                for q in &mut self.t.queues {
                    q.set_event_idx(event_idx);
                }
                let flags = self.tun_offload();
                self.apply_offload(flags);
                self.rx_kick.signal();
            }
            Some(Event::Reset { was_ok }) => {
                if was_ok {
                    // The next driver may accept less.
                    self.apply_offload(0);
                }
                self.rx_pending = None;
            }
            _ => {}
        }
    }

    /// Interrupts the guest for new used buffers on queue `q`, unless the
    /// driver said it does not want one now.
    fn signal_used(&mut self, q: usize) {
        let mem = &self.t.mem;
        let queue = &mut self.t.queues[q];
        let wanted = if queue.event_idx_enabled() {
            queue.needs_notification(mem).unwrap_or(true)
        } else {
            // The used index must be visible before the flag is read, or
            // an interrupt the driver re-enabled meanwhile could be lost.
            std::sync::atomic::fence(Ordering::SeqCst);
            mem.read_obj::<u16>(GuestAddress(queue.avail_ring()))
                .map_or(true, |f| u16::from_le(f) & VRING_AVAIL_F_NO_INTERRUPT == 0)
        };
        if wanted {
            self.stats.irqs += 1;
            self.t.signal_used();
        } else {
            self.stats.irqs_suppressed += 1;
        }
    }

    /// Sends every frame the guest has queued to the backend; whether
    /// there was any.
    pub fn process_tx(&mut self) -> bool {
        if !self.t.queue_usable(TX) {
            return false;
        }
        let mem = self.t.mem.clone();
        let mut used = false;
        loop {
            // No notifies while the queue is drained; asked for again
            // below, with a last look for frames queued in between.
            let _ = self.t.queues[TX].disable_notification(&mem);
            while let Some(chain) = self.t.queues[TX].pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                // The frame's pieces (header and data) go to the backend
                // as they lie in guest memory: one writev, no copy.
                self.tx_parts.clear();
                let mut len = 0usize;
                for desc in chain.readable() {
                    self.tx_parts.push((desc.addr(), desc.len() as usize));
                    len += desc.len() as usize;
                }
                if len > VNET_HDR_LEN && len <= MAX_FRAME {
                    match self
                        .backend
                        .send_guest(&mem, &self.tx_parts, &mut self.tx_buf)
                    {
                        Ok(()) => {
                            self.stats.tx_frames += 1;
                            self.stats.tx_bytes += len as u64;
                        }
                        Err(e) => {
                            self.stats.tx_dropped += 1;
                            if e.kind() != io::ErrorKind::WouldBlock {
                                tracing::debug!(error = %e, "virtio-net: backend refused a frame");
                            }
                        }
                    }
                } else {
                    self.stats.tx_dropped += 1;
                }
                if self.t.queues[TX].add_used(&mem, head, 0).is_err() {
                    tracing::warn!("virtio-net cannot return a tx buffer");
                }
                used = true;
            }
            match self.t.queues[TX].enable_notification(&mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if used {
            self.stats.tx_batches += 1;
            self.signal_used(TX);
        }
        used
    }

    /// Reads the backend's next frame straight into the guest's next
    /// receive buffer (one readv, no copy), if that buffer takes the
    /// largest frame; the driver posts such buffers once it accepted TSO.
    fn recv_into_guest(&mut self, mem: &GuestMemoryMmap) -> Direct {
        let Some(chain) = self.t.queues[RX].pop_descriptor_chain(mem) else {
            return Direct::NoBuffers;
        };
        let head = chain.head_index();
        self.rx_parts.clear();
        let mut cap = 0usize;
        for desc in chain.writable() {
            self.rx_parts.push((desc.addr(), desc.len() as usize));
            cap += desc.len() as usize;
        }
        if cap < MAX_FRAME || self.rx_parts.len() > iov::MAX_IOVECS {
            // A frame could be truncated: the copying path checks each.
            self.t.queues[RX].go_to_previous_position();
            return Direct::SmallBuffers;
        }
        let n = match self
            .backend
            .recv_guest(mem, &self.rx_parts, &mut self.rx_buf)
        {
            Ok(n) => n,
            Err(e) => {
                // The buffer was not used: it stays the next one.
                self.t.queues[RX].go_to_previous_position();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Direct::Empty,
                    io::ErrorKind::Interrupted => Direct::Again,
                    _ => {
                        tracing::debug!(error = %e, "virtio-net: backend read failed");
                        Direct::Failed
                    }
                };
            }
        };
        if n <= VNET_HDR_LEN {
            self.t.queues[RX].go_to_previous_position();
            return Direct::Again;
        }
        // num_buffers: one buffer per frame (no mergeable buffers). The
        // tap skips those two bytes of its 12-byte header, so they hold
        // whatever the guest's buffer held.
        let mut at = 10usize;
        let mut ok = false;
        for &(addr, len) in &self.rx_parts {
            if at < len {
                ok = at + 2 <= len
                    && mem
                        .write_slice(&1u16.to_le_bytes(), GuestAddress(addr.0 + at as u64))
                        .is_ok();
                break;
            }
            at -= len;
        }
        let written = if ok {
            self.stats.rx_frames += 1;
            n
        } else {
            // A header split inside num_buffers: no driver does that.
            self.stats.rx_dropped += 1;
            0
        };
        if self.t.queues[RX]
            .add_used(mem, head, written as u32)
            .is_err()
        {
            tracing::warn!("virtio-net cannot return an rx buffer");
        }
        Direct::Delivered
    }

    /// Moves frames from the backend into the guest's receive buffers until
    /// the backend is empty or the guest has no buffers left.
    pub fn process_rx(&mut self) -> RxState {
        let mem = self.t.mem.clone();
        let mut used = false;
        if self.t.queue_usable(RX) {
            // While buffers last the guest need not say it posted more.
            let _ = self.t.queues[RX].disable_notification(&mem);
        }
        let state = loop {
            if self.rx_pending.is_none() && self.t.queue_usable(RX) {
                match self.recv_into_guest(&mem) {
                    Direct::Delivered => {
                        used = true;
                        continue;
                    }
                    Direct::Again => continue,
                    Direct::Empty => break RxState::Idle,
                    Direct::Failed => break RxState::Failed,
                    // Out of buffers, or too small ones: the copying path
                    // below holds a frame until buffers come.
                    Direct::NoBuffers | Direct::SmallBuffers => {}
                }
            }
            let len = match self.rx_pending.take() {
                Some(n) => n,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxState::Idle,
                    Err(e) => {
                        tracing::debug!(error = %e, "virtio-net: backend read failed");
                        break RxState::Failed;
                    }
                },
            };
            if len <= VNET_HDR_LEN {
                continue;
            }
            if !self.t.queue_usable(RX) {
                // No driver yet: a NIC that is down drops what arrives.
                self.stats.rx_dropped += 1;
                continue;
            }
            let Some(chain) = self.t.queues[RX].pop_descriptor_chain(&mem) else {
                self.rx_pending = Some(len);
                // Out of buffers: ask for a notify when the guest posts
                // more, unless it already has.
                match self.t.queues[RX].enable_notification(&mem) {
                    Ok(true) => continue,
                    _ => break RxState::NeedBuffers,
                }
            };
            let head = chain.head_index();
            // num_buffers: one buffer per frame (no mergeable buffers).
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let mut written = 0usize;
            for desc in chain.writable() {
                let n = (desc.len() as usize).min(len - written);
                if n == 0 {
                    break;
                }
                if mem
                    .write_slice(&self.rx_buf[written..written + n], desc.addr())
                    .is_err()
                {
                    break;
                }
                written += n;
            }
            if written < len {
                // The guest's buffer was too small or bad: drop the frame
                // rather than hand over a truncated one.
                self.stats.rx_dropped += 1;
                written = 0;
            } else {
                self.stats.rx_frames += 1;
            }
            if self.t.queues[RX]
                .add_used(&mem, head, written as u32)
                .is_err()
            {
                tracing::warn!("virtio-net cannot return an rx buffer");
            }
            used = true;
        };
        if used {
            self.signal_used(RX);
        }
        state
    }
}

/// The loop of one device, for the VMM's net thread: serves both queues
/// and the backend until `stop` says so (asked at least every 50 ms). The
/// fds come from [`NetDevice::wakers`], taken before the thread is
/// confined (a confined thread may not duplicate fds).
pub fn run_rx_loop(dev: &Mutex<NetDevice>, wakers: &Wakers, stop: &dyn Fn() -> bool) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut want_backend = true;
    while !stop() {
        let mut fds = vec![
            PollFd::new(wakers.rx.as_fd(), PollFlags::POLLIN),
            PollFd::new(wakers.tx.as_fd(), PollFlags::POLLIN),
        ];
        if want_backend {
            fds.push(PollFd::new(wakers.backend.as_fd(), PollFlags::POLLIN));
        }
        let timed_out = match poll(&mut fds, PollTimeout::from(50u8)) {
            Ok(0) => true,
            Ok(_) => false,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "virtio-net: poll failed; stopping the device thread");
                return;
            }
        };
        // Take the kicks before looking at the queues, so a notify that
        // lands during processing wakes the next poll.
        let tx = wakers.tx.take();
        let _ = wakers.rx.take();
        let mut d = lock(dev);
        if tx {
            d.process_tx();
        } else if timed_out {
            // A quiet spell: look at the transmit queue anyway, so a notify
            // lost to a race costs at most one period, not a stalled
            // connection (and gets counted).
            if d.process_tx() {
                d.stats.tx_unannounced += 1;
            }
            if d.rx_pending.is_none() && want_backend {
                continue;
            }
        }
        match d.process_rx() {
            RxState::Idle => want_backend = true,
            RxState::NeedBuffers => want_backend = false,
            RxState::Failed => {
                want_backend = true;
                drop(d);
                std::thread::sleep(FAILED_BACKOFF);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// What the device thread polls.
pub struct Wakers {
    rx: Arc<NotifyFd>,
    tx: Arc<NotifyFd>,
    /// A duplicate of the backend's fd.
    backend: OwnedFd,
}

impl NetDevice {
    /// What the device thread polls: both queues' notify fds and a
    /// duplicate of the backend's fd.
    pub fn wakers(&self) -> io::Result<Wakers> {
        Ok(Wakers {
            rx: self.rx_kick.clone(),
            tx: self.tx_kick.clone(),
            backend: self.backend.fd().try_clone_to_owned()?,
        })
    }
}

/// The device thread's stack: it polls and copies, nothing deep (the
/// default 2 MiB would only count against the VMM's overhead).
const RX_THREAD_STACK: usize = 128 << 10;

/// Starts [`run_rx_loop`] for `dev` on its own thread, under `filter`.
pub fn spawn_rx_thread(
    name: String,
    dev: Arc<Mutex<NetDevice>>,
    stop: impl Fn() -> bool + Send + 'static,
    filter: Option<Arc<seccompiler::BpfProgram>>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let wakers = lock(&dev).wakers()?;
    let body = move || {
        if let Some(f) = filter {
            if let Err(e) = crate::seccomp::apply(&f) {
                tracing::error!(error = %e, "virtio-net thread not confined; not starting it");
                return;
            }
        }
        run_rx_loop(&dev, &wakers, &stop);
        let stats = lock(&dev).stats;
        tracing::debug!(?stats, "virtio-net device thread stopped");
    };
    std::thread::Builder::new()
        .name(name)
        .stack_size(RX_THREAD_STACK)
        .spawn(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::mmio::testing::{post, probe, r32, w32, window, USED};
    use crate::devices::mmio::{reg, INT_USED_RING, MMIO_MAGIC};
    use std::os::fd::BorrowedFd;
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;
    use vm_memory::GuestAddress;

    const DATA: u64 = 0x40000;

    window!(NetDevice);

    /// What the Linux virtio-mmio driver does at probe time, accepting
    /// VERSION_1 and the MAC.
    fn driver_setup(t: &mut NetDevice) {
        w32(t, reg::DEVICE_FEATURES_SEL, 0);
        let lo = r32(t, reg::DEVICE_FEATURES);
        assert_ne!(lo & (1 << 5), 0, "VIRTIO_NET_F_MAC offered");
        w32(t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r32(t, reg::DEVICE_FEATURES) & 1, 1, "VERSION_1 offered");
        probe(t, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
    }

    fn used_idx(mem: &GuestMemoryMmap, q: u64) -> u16 {
        mem.read_obj(GuestAddress(USED + q * 0x10000 + 2)).unwrap()
    }

    fn setup() -> (GuestMemoryMmap, NetDevice, UnixDatagram, EventFdTrigger) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = EventFdTrigger::new().unwrap();
        let probe = irq.try_clone().unwrap();
        let (ours, host) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let mac = [0x02, 0x65, 10, 0, 0, 2];
        let dev = NetDevice::new(mem.clone(), irq, mac, Box::new(ours)).unwrap();
        (mem, dev, host, probe)
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&[0x02, 0x65, 10, 0, 0, 9]);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn identifies_as_a_virtio_net_device_with_its_mac_in_config_space() {
        let (_m, mut d, _h, _irq) = setup();
        assert_eq!(r32(&mut d, reg::MAGIC), MMIO_MAGIC);
        assert_eq!(r32(&mut d, reg::VERSION), 2);
        assert_eq!(r32(&mut d, reg::DEVICE_ID), VIRTIO_ID_NET);
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            let mut one = [0u8; 1];
            d.read(reg::CONFIG + i as u64, &mut one);
            *b = one[0];
        }
        assert_eq!(mac, [0x02, 0x65, 10, 0, 0, 2]);
    }

    #[test]
    fn guest_frames_split_over_descriptors_leave_as_one_backend_frame() {
        let (mem, mut d, host, irq) = setup();
        driver_setup(&mut d);
        let f = frame(b"hello host");
        // Header in one descriptor, frame in the next, as a driver may do.
        mem.write_slice(&f[..VNET_HDR_LEN], GuestAddress(DATA))
            .unwrap();
        mem.write_slice(&f[VNET_HDR_LEN..], GuestAddress(DATA + 0x1000))
            .unwrap();
        post(
            &mem,
            TX as u64,
            0,
            &[
                (DATA, VNET_HDR_LEN as u32),
                (DATA + 0x1000, (f.len() - VNET_HDR_LEN) as u32),
            ],
            false,
        );
        w32(&mut d, reg::QUEUE_NOTIFY, TX as u32);
        assert!(
            d.tx_kick.take(),
            "a transmit notify kicks the device thread"
        );
        d.process_tx();
        let mut got = [0u8; 2048];
        let n = host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        assert_eq!(used_idx(&mem, TX as u64), 1);
        assert_eq!(irq.0.read().unwrap(), 1);
        assert_eq!(r32(&mut d, reg::INTERRUPT_STATUS), INT_USED_RING);
        assert_eq!(d.stats.tx_frames, 1);
    }

    #[test]
    fn a_tso_frame_over_many_descriptors_leaves_whole_with_its_gso_header() {
        let (mem, mut d, host, _irq) = setup();
        driver_setup(&mut d);
        // virtio_net_hdr: NEEDS_CSUM, GSO TCPv4, hdr_len 54, gso_size 1448,
        // csum_start 34, csum_offset 16: what Linux queues for TSO.
        let mut f = vec![1u8, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0];
        f.extend((0..60_000u32).map(|i| (i % 251) as u8));
        let pieces = [(0, VNET_HDR_LEN), (VNET_HDR_LEN, 54), (66, 30_000)];
        let mut bufs = Vec::new();
        for (i, &(at, len)) in pieces.iter().enumerate() {
            let addr = DATA + i as u64 * 0x10000;
            mem.write_slice(&f[at..at + len], GuestAddress(addr))
                .unwrap();
            bufs.push((addr, len as u32));
        }
        let rest = 66 + 30_000;
        mem.write_slice(&f[rest..], GuestAddress(DATA + 0x30000))
            .unwrap();
        bufs.push((DATA + 0x30000, (f.len() - rest) as u32));
        post(&mem, TX as u64, 0, &bufs, false);
        d.process_tx();
        let mut got = vec![0u8; 70_000];
        let n = host.recv(&mut got).expect("one frame out");
        assert_eq!(n, f.len());
        assert!(got[..n] == f[..], "header and payload unchanged, in order");
        assert_eq!((d.stats.tx_frames, d.stats.tx_dropped), (1, 0));
        assert!(host.recv(&mut got).is_err(), "exactly one frame");
    }

    #[test]
    fn a_large_frame_is_read_straight_into_a_64k_receive_chain() {
        let (mem, mut d, host, irq) = setup();
        driver_setup(&mut d);
        // As Linux posts them with TSO: the header alone, then pages.
        let bufs = [
            (DATA, VNET_HDR_LEN as u32),
            (DATA + 0x1000, 0x8000),
            (DATA + 0x10000, 0x8000),
            (DATA + 0x20000, 0x1000),
        ];
        assert!(bufs.iter().map(|b| b.1 as usize).sum::<usize>() >= MAX_FRAME);
        // Stale bytes where num_buffers goes: the tap does not write them.
        mem.write_slice(&[0xee; VNET_HDR_LEN], GuestAddress(DATA))
            .unwrap();
        post(&mem, RX as u64, 0, &bufs, true);
        let mut f = frame(&[]);
        f[0] = 1; // NEEDS_CSUM, as the host sends with offloads
        f.extend((0..40_000u32).map(|i| (i % 253) as u8));
        host.send(&f).unwrap();
        assert_eq!(d.process_rx(), RxState::Idle);
        let len: u32 = mem.read_obj(GuestAddress(USED + 4 + 4)).unwrap();
        assert_eq!(len as usize, f.len());
        let mut hdr = [0u8; VNET_HDR_LEN];
        mem.read_slice(&mut hdr, GuestAddress(DATA)).unwrap();
        assert_eq!(&hdr[..10], &f[..10], "the header as the host sent it");
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
        let mut got = vec![0u8; f.len() - VNET_HDR_LEN];
        mem.read_slice(&mut got[..0x8000], GuestAddress(DATA + 0x1000))
            .unwrap();
        mem.read_slice(&mut got[0x8000..], GuestAddress(DATA + 0x10000))
            .unwrap();
        assert!(got == f[VNET_HDR_LEN..], "the frame spread over the chain");
        assert_eq!((d.stats.rx_frames, d.stats.rx_dropped), (1, 0));
        assert_eq!(irq.0.read().unwrap(), 1);
    }

    #[test]
    fn host_frames_fill_posted_buffers_with_num_buffers_set_to_one() {
        let (mem, mut d, host, irq) = setup();
        driver_setup(&mut d);
        post(&mem, RX as u64, 0, &[(DATA, 2048)], true);
        let f = frame(b"to the guest");
        host.send(&f).unwrap();
        assert_eq!(d.process_rx(), RxState::Idle);
        let len: u32 = mem.read_obj(GuestAddress(USED + 4 + 4)).unwrap();
        assert_eq!(len as usize, f.len());
        let mut got = vec![0u8; f.len()];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
        assert_eq!(irq.0.read().unwrap(), 1);
        assert_eq!(d.stats.rx_frames, 1);
    }

    #[test]
    fn a_frame_waits_for_buffers_and_the_notify_that_posts_them_wakes_the_loop() {
        let (mem, mut d, host, _irq) = setup();
        driver_setup(&mut d);
        let kick = d.rx_kick.clone();
        let _ = kick.take();
        host.send(&frame(b"early")).unwrap();
        assert_eq!(d.process_rx(), RxState::NeedBuffers);
        assert_eq!(used_idx(&mem, RX as u64), 0);
        post(&mem, RX as u64, 0, &[(DATA, 2048)], true);
        w32(&mut d, reg::QUEUE_NOTIFY, RX as u32);
        assert!(kick.take(), "a receive notify kicks the device thread");
        assert_eq!(d.process_rx(), RxState::Idle);
        assert_eq!(used_idx(&mem, RX as u64), 1);
        assert_eq!(d.stats.rx_frames, 1);
    }

    #[test]
    fn frames_before_the_driver_is_up_or_too_big_for_the_buffer_are_dropped() {
        let (mem, mut d, host, _irq) = setup();
        host.send(&frame(b"nobody listens")).unwrap();
        assert_eq!(d.process_rx(), RxState::Idle);
        assert_eq!(d.stats.rx_dropped, 1);
        driver_setup(&mut d);
        post(&mem, RX as u64, 0, &[(DATA, 16)], true);
        host.send(&frame(&[7u8; 100])).unwrap();
        assert_eq!(d.process_rx(), RxState::Idle);
        assert_eq!(d.stats.rx_dropped, 2);
        let len: u32 = mem.read_obj(GuestAddress(USED + 4 + 4)).unwrap();
        assert_eq!(len, 0, "the buffer is returned empty, not truncated");
    }

    #[test]
    fn the_rx_loop_delivers_frames_and_stops_when_asked() {
        let (mem, mut d, host, irq) = setup();
        driver_setup(&mut d);
        post(&mem, RX as u64, 0, &[(DATA, 2048)], true);
        let dev = Arc::new(Mutex::new(d));
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let t = spawn_rx_thread(
            "net-test".into(),
            dev.clone(),
            move || s2.load(Ordering::SeqCst),
            None,
        )
        .unwrap();
        host.send(&frame(b"through the thread")).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lock(&dev).stats.rx_frames == 0 {
            assert!(std::time::Instant::now() < deadline, "frame not delivered");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(irq.0.read().unwrap(), 1);
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
    }

    /// Records the offloads it is told to use.
    struct Recording(UnixDatagram, Arc<Mutex<Vec<u32>>>);

    impl NetBackend for Recording {
        fn send(&mut self, f: &[u8]) -> io::Result<()> {
            self.0.send(f).map(|_| ())
        }
        fn recv(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.0.recv(b)
        }
        fn fd(&self) -> BorrowedFd<'_> {
            self.0.as_fd()
        }
        fn set_offload(&mut self, flags: u32) -> io::Result<()> {
            self.1.lock().unwrap().push(flags);
            Ok(())
        }
    }

    #[test]
    fn the_tap_gets_the_offloads_the_driver_accepted_and_loses_them_on_reset() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (ours, _host) = UnixDatagram::pair().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut d = NetDevice::new(
            mem,
            EventFdTrigger::new().unwrap(),
            [2, 0x65, 0, 0, 0, 1],
            Box::new(Recording(ours, seen.clone())),
        )
        .unwrap();
        w32(&mut d, reg::DEVICE_FEATURES_SEL, 0);
        let offered = r32(&mut d, reg::DEVICE_FEATURES);
        for bit in [0, 1, 7, 8, 11, 12] {
            assert_ne!(offered & (1 << bit), 0, "feature bit {bit} offered");
        }
        // A driver taking MAC only: the tap stays without offloads.
        driver_setup(&mut d);
        // One taking checksums and TSO over IPv4.
        w32(&mut d, reg::STATUS, 0);
        w32(&mut d, reg::STATUS, 1 | 2);
        w32(&mut d, reg::DRIVER_FEATURES_SEL, 0);
        w32(&mut d, reg::DRIVER_FEATURES, (1 << 5) | (1 << 1) | (1 << 7));
        w32(&mut d, reg::DRIVER_FEATURES_SEL, 1);
        w32(&mut d, reg::DRIVER_FEATURES, 1);
        w32(&mut d, reg::STATUS, 1 | 2 | 8 | 4);
        w32(&mut d, reg::STATUS, 0);
        assert_eq!(
            *seen.lock().unwrap(),
            [0, 0, TUN_F_CSUM | TUN_F_TSO4, 0],
            "set at DRIVER_OK, cleared at each reset of a live driver"
        );
    }

    /// A backend whose reads fail, like a tap deleted under a running VM.
    struct Broken(std::fs::File);

    impl NetBackend for Broken {
        fn send(&mut self, _: &[u8]) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        fn recv(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::EBADFD))
        }
        fn fd(&self) -> BorrowedFd<'_> {
            self.0.as_fd()
        }
    }

    #[test]
    fn a_failing_backend_is_reported_and_its_frames_count_as_dropped() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let backend = Broken(std::fs::File::open("/dev/null").unwrap());
        let mut d = NetDevice::new(
            mem.clone(),
            EventFdTrigger::new().unwrap(),
            [2, 0x65, 0, 0, 0, 1],
            Box::new(backend),
        )
        .unwrap();
        driver_setup(&mut d);
        assert_eq!(d.process_rx(), RxState::Failed);
        // The same with a buffer to read straight into.
        post(&mem, RX as u64, 0, &[(DATA + 0x20000, 0x11000)], true);
        assert_eq!(d.process_rx(), RxState::Failed);
        assert_eq!(used_idx(&mem, RX as u64), 0, "the buffer stays posted");
        let f = frame(b"lost");
        mem.write_slice(&f, GuestAddress(DATA)).unwrap();
        post(&mem, TX as u64, 0, &[(DATA, f.len() as u32)], false);
        w32(&mut d, reg::QUEUE_NOTIFY, TX as u32);
        d.process_tx();
        assert_eq!(d.stats.tx_dropped, 1);
        assert_eq!(used_idx(&mem, TX as u64), 1, "the buffer still goes back");
    }

    /// Ring fields past the 16 entries [`probe`] sets up on queue `q`.
    fn used_event_addr(q: usize) -> GuestAddress {
        GuestAddress(crate::devices::mmio::testing::AVAIL + q as u64 * 0x10000 + 4 + 2 * 16)
    }
    fn avail_event_addr(q: usize) -> GuestAddress {
        GuestAddress(USED + q as u64 * 0x10000 + 4 + 8 * 16)
    }
    fn used_flags(mem: &GuestMemoryMmap, q: usize) -> u16 {
        mem.read_obj(GuestAddress(USED + q as u64 * 0x10000))
            .unwrap()
    }

    fn send_from_guest(mem: &GuestMemoryMmap, d: &mut NetDevice, slot: u16) {
        let f = frame(b"ack");
        let at = DATA + u64::from(slot) * 0x1000;
        mem.write_slice(&f, GuestAddress(at)).unwrap();
        post(mem, TX as u64, slot, &[(at, f.len() as u32)], false);
        d.process_tx();
    }

    #[test]
    fn with_event_idx_the_guest_is_interrupted_only_once_used_event_is_passed() {
        let (mem, mut d, host, irq) = setup();
        w32(&mut d, reg::DEVICE_FEATURES_SEL, 0);
        assert_ne!(
            r32(&mut d, reg::DEVICE_FEATURES) & (1 << 29),
            0,
            "EVENT_IDX offered"
        );
        probe(
            &mut d,
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_RING_F_EVENT_IDX,
        );
        // The driver wants an interrupt once used entry 1 is written.
        mem.write_obj(1u16, used_event_addr(TX)).unwrap();
        send_from_guest(&mem, &mut d, 0);
        assert_eq!(used_idx(&mem, TX as u64), 1);
        assert!(irq.0.read().is_err(), "no interrupt before used_event");
        send_from_guest(&mem, &mut d, 1);
        assert_eq!(
            irq.0.read().unwrap(),
            1,
            "interrupt once used_event is passed"
        );
        assert_eq!((d.stats.irqs, d.stats.irqs_suppressed), (1, 1));
        let mut got = [0u8; 256];
        assert!(host.recv(&mut got).is_ok() && host.recv(&mut got).is_ok());
        // Transmit notifies are asked for from the next frame on.
        let avail_event: u16 = mem.read_obj(avail_event_addr(TX)).unwrap();
        assert_eq!(avail_event, 2);
    }

    #[test]
    fn without_event_idx_the_no_interrupt_flag_holds_interrupts_back() {
        let (mem, mut d, host, irq) = setup();
        driver_setup(&mut d);
        let avail_flags = GuestAddress(crate::devices::mmio::testing::AVAIL);
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT, avail_flags)
            .unwrap();
        post(&mem, RX as u64, 0, &[(DATA, 2048)], true);
        host.send(&frame(b"quiet")).unwrap();
        assert_eq!(d.process_rx(), RxState::Idle);
        assert_eq!(d.stats.rx_frames, 1);
        assert!(irq.0.read().is_err(), "the driver said no interrupts");
        mem.write_obj(0u16, avail_flags).unwrap();
        post(&mem, RX as u64, 1, &[(DATA + 0x1000, 2048)], true);
        host.send(&frame(b"loud")).unwrap();
        assert_eq!(d.process_rx(), RxState::Idle);
        assert_eq!(irq.0.read().unwrap(), 1);
        assert_eq!((d.stats.irqs, d.stats.irqs_suppressed), (1, 1));
    }

    #[test]
    fn receive_notifies_are_asked_for_only_once_the_buffers_run_out() {
        // Without EVENT_IDX: the used ring's NO_NOTIFY flag.
        let (mem, mut d, host, _irq) = setup();
        driver_setup(&mut d);
        post(&mem, RX as u64, 0, &[(DATA, 2048)], true);
        assert_eq!(d.process_rx(), RxState::Idle);
        assert_eq!(used_flags(&mem, RX), 1, "buffers left: no notifies");
        host.send(&frame(b"one")).unwrap();
        host.send(&frame(b"two")).unwrap();
        assert_eq!(d.process_rx(), RxState::NeedBuffers);
        assert_eq!(used_flags(&mem, RX), 0, "out of buffers: notifies on");
        // With EVENT_IDX: avail_event names the next buffer.
        let (mem, mut d, host, _irq) = setup();
        probe(
            &mut d,
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_RING_F_EVENT_IDX,
        );
        post(&mem, RX as u64, 0, &[(DATA, 2048)], true);
        host.send(&frame(b"one")).unwrap();
        host.send(&frame(b"two")).unwrap();
        assert_eq!(d.process_rx(), RxState::NeedBuffers);
        let avail_event: u16 = mem.read_obj(avail_event_addr(RX)).unwrap();
        assert_eq!(avail_event, 1);
        // Buffers posted before the device looked again are found at once.
        post(&mem, RX as u64, 1, &[(DATA + 0x1000, 2048)], true);
        assert_eq!(d.process_rx(), RxState::Idle);
        assert_eq!(d.stats.rx_frames, 2);
    }

    #[test]
    fn queue_notifies_signalled_on_the_ioeventfds_are_served_by_the_device_thread() {
        let (mem, mut d, host, irq) = setup();
        driver_setup(&mut d);
        let [(rx_at, rx_q, _), (tx_at, tx_q, _)] = d.ioeventfds();
        assert_eq!((rx_at, tx_at), (reg::QUEUE_NOTIFY, reg::QUEUE_NOTIFY));
        assert_eq!((rx_q, tx_q), (RX as u32, TX as u32));
        let f = frame(b"via the ioeventfd");
        mem.write_slice(&f, GuestAddress(DATA)).unwrap();
        post(&mem, TX as u64, 0, &[(DATA, f.len() as u32)], false);
        let tx_fd = d.ioeventfds()[1].2.try_clone().unwrap();
        let dev = Arc::new(Mutex::new(d));
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let t = spawn_rx_thread(
            "net-test-tx".into(),
            dev.clone(),
            move || s2.load(Ordering::SeqCst),
            None,
        )
        .unwrap();
        // What KVM does when the guest writes 1 to QueueNotify.
        tx_fd.write(1).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.set_nonblocking(false).unwrap();
        let mut got = [0u8; 256];
        let n = host
            .recv(&mut got)
            .expect("frame sent by the device thread");
        assert_eq!(&got[..n], &f[..]);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while irq.0.read().is_err() {
            assert!(std::time::Instant::now() < deadline, "no tx interrupt");
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
        assert_eq!(used_idx(&mem, TX as u64), 1);
    }

    #[test]
    fn a_frame_queued_without_a_notify_still_leaves_within_the_idle_period() {
        let (mem, mut d, host, _irq) = setup();
        driver_setup(&mut d);
        let f = frame(b"no kick");
        mem.write_slice(&f, GuestAddress(DATA)).unwrap();
        post(&mem, TX as u64, 0, &[(DATA, f.len() as u32)], false);
        let dev = Arc::new(Mutex::new(d));
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let t = spawn_rx_thread(
            "net-test-lost".into(),
            dev.clone(),
            move || s2.load(Ordering::SeqCst),
            None,
        )
        .unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        host.set_nonblocking(false).unwrap();
        let mut got = [0u8; 256];
        let n = host
            .recv(&mut got)
            .expect("the frame leaves without a notify");
        assert_eq!(&got[..n], &f[..]);
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
        assert_eq!(lock(&dev).stats.tx_unannounced, 1, "and is counted");
    }

    #[test]
    fn status_zero_resets_the_queues_and_forgets_a_waiting_frame() {
        let (_mem, mut d, host, _irq) = setup();
        driver_setup(&mut d);
        host.send(&frame(b"x")).unwrap();
        assert_eq!(d.process_rx(), RxState::NeedBuffers);
        w32(&mut d, reg::STATUS, 0);
        assert_eq!(r32(&mut d, reg::STATUS), 0);
        w32(&mut d, reg::QUEUE_SEL, 0);
        assert_eq!(r32(&mut d, reg::QUEUE_READY), 0);
        assert!(d.rx_pending.is_none());
    }
}
