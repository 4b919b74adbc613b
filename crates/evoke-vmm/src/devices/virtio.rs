//! virtio-mmio (version 2) transport and a virtio-console device behind it:
//! the agent channel between the guest and the host.
//!
//! Why virtio-console over vsock: it needs nothing on the host (no
//! vhost-vsock module, no AF_VSOCK listener, no CID allocation): the guest's
//! `/dev/hvc0` is a byte stream the VMM connects to any host fd, and the
//! whole path is testable in-process. A second UART ([`crate::layout::COM2_PORT`])
//! can carry the same stream for kernels without virtio drivers.
//!
//! Guest → host bytes (transmitq) are written to the output sink while the
//! guest's vCPU waits, so a slow reader slows the guest instead of growing a
//! buffer. Host → guest bytes (receiveq) are offered by
//! [`MmioTransport::offer_input`] and taken only as far as the guest has
//! posted buffers.

use std::io::{Read, Write};
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::EventFdTrigger;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4556_4b45; // "EKVE"
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_ID_CONSOLE: u32 = 3;
const QUEUE_MAX: u16 = 256;
const INT_USED_RING: u32 = 1;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 0x80;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

const RX: usize = 0;
const TX: usize = 1;

/// A virtio-console (single port, no multiport) on a virtio-mmio window.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    queues: [Queue; 2],
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    irq: EventFdTrigger,
    out: Box<dyn Write + Send>,
    /// Bytes written by the guest so far (for tests and metrics).
    pub tx_bytes: u64,
}

impl MmioTransport {
    pub fn new_console(
        mem: GuestMemoryMmap,
        irq: EventFdTrigger,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, virtio_queue::Error> {
        Ok(Self {
            mem,
            queues: [Queue::new(QUEUE_MAX)?, Queue::new(QUEUE_MAX)?],
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            irq,
            out,
            tx_bytes: 0,
        })
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            // Console config (cols, rows, max ports, emerg_wr): none of the
            // features that give them meaning are offered.
            data.fill(0);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => VIRTIO_ID_CONSOLE,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG || data.len() != 4 {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.set_addr(|q, v| q.set_desc_table_address(Some(v), None), v),
            reg::QUEUE_DESC_HIGH => {
                self.set_addr(|q, v| q.set_desc_table_address(None, Some(v)), v)
            }
            reg::QUEUE_DRIVER_LOW => {
                self.set_addr(|q, v| q.set_avail_ring_address(Some(v), None), v)
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.set_addr(|q, v| q.set_avail_ring_address(None, Some(v)), v)
            }
            reg::QUEUE_DEVICE_LOW => {
                self.set_addr(|q, v| q.set_used_ring_address(Some(v), None), v)
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.set_addr(|q, v| q.set_used_ring_address(None, Some(v)), v)
            }
            // A notify on the receive queue means new buffers: the input
            // path retries on its own.
            reg::QUEUE_NOTIFY if v as usize == TX => self.process_tx(),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => {
                if v == 0 {
                    self.reset();
                } else {
                    self.status = v;
                    if self.driver_ok() && self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                        tracing::warn!("virtio-console driver did not accept VIRTIO_F_VERSION_1");
                    }
                }
            }
            _ => {}
        }
    }

    fn set_addr(&mut self, f: impl FnOnce(&mut Queue, u32), v: u32) {
        // Queue addresses may change only while the driver sets up.
        if self.driver_ok() {
            return;
        }
        if let Some(q) = self.selected() {
            f(q, v);
        }
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.interrupt_status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }

    fn signal_used(&mut self) {
        self.interrupt_status |= INT_USED_RING;
        if let Err(e) = vm_superio::Trigger::trigger(&self.irq) {
            tracing::warn!(error = %e, "virtio-console interrupt failed");
        }
    }

    fn queue_usable(&self, i: usize) -> bool {
        self.driver_ok() && self.queues[i].is_valid(&self.mem)
    }

    /// Moves everything the guest has queued for transmission to the sink.
    pub fn process_tx(&mut self) {
        if !self.queue_usable(TX) {
            return;
        }
        let mem = self.mem.clone();
        let mut used = false;
        let mut buf = Vec::new();
        while let Some(chain) = self.queues[TX].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            buf.clear();
            for desc in chain.readable() {
                let start = buf.len();
                buf.resize(start + desc.len() as usize, 0);
                if mem.read_slice(&mut buf[start..], desc.addr()).is_err() {
                    tracing::warn!("virtio-console tx descriptor outside guest memory");
                    buf.truncate(start);
                    break;
                }
            }
            if let Err(e) = self.out.write_all(&buf).and_then(|_| self.out.flush()) {
                tracing::debug!(error = %e, "agent channel reader is gone; dropping guest output");
            }
            self.tx_bytes += buf.len() as u64;
            if self.queues[TX].add_used(&mem, head, 0).is_err() {
                tracing::warn!("virtio-console cannot return a tx buffer");
            }
            used = true;
        }
        if used {
            self.signal_used();
        }
    }

    /// Copies host bytes into receive buffers the guest has posted and
    /// returns how many were taken (0 when the guest has none yet).
    pub fn offer_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || !self.queue_usable(RX) {
            return 0;
        }
        let mem = self.mem.clone();
        let mut taken = 0;
        while taken < bytes.len() {
            let Some(chain) = self.queues[RX].pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain.writable() {
                let n = (desc.len() as usize).min(bytes.len() - taken - written);
                if n == 0 {
                    break;
                }
                let src = &bytes[taken + written..taken + written + n];
                if mem.write_slice(src, desc.addr()).is_err() {
                    break;
                }
                written += n;
            }
            if self.queues[RX]
                .add_used(&mem, head, written as u32)
                .is_err()
            {
                break;
            }
            taken += written;
        }
        if taken > 0 {
            std::sync::atomic::fence(Ordering::Release);
            self.signal_used();
        }
        taken
    }
}

/// Reads from a host fd and feeds the guest until EOF, for use on its own
/// thread. `offer` returns how many bytes the guest accepted.
pub fn pump_input(
    mut input: impl Read,
    mut offer: impl FnMut(&[u8]) -> usize,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut done = 0;
        while done < n {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let k = offer(&buf[done..n]);
            if k == 0 {
                // The guest has no buffers posted yet: back off briefly.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            done += k;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::sink::TailBuffer;
    use vm_memory::GuestAddress;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const DATA: u64 = 0x4000;

    fn w32(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn r32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Does what the Linux virtio-mmio driver does at probe time, for queue
    /// `q` at (DESC, AVAIL, USED) + q * 0x10000.
    fn driver_setup(t: &mut MmioTransport) {
        w32(t, reg::STATUS, 0);
        w32(t, reg::STATUS, 1 | 2);
        w32(t, reg::DEVICE_FEATURES_SEL, 1);
        let hi = r32(t, reg::DEVICE_FEATURES);
        assert_eq!(hi & 1, 1, "VIRTIO_F_VERSION_1 offered");
        w32(t, reg::DRIVER_FEATURES_SEL, 1);
        w32(t, reg::DRIVER_FEATURES, 1);
        w32(t, reg::STATUS, 1 | 2 | 8);
        for q in 0..2u32 {
            let base = u64::from(q) * 0x10000;
            w32(t, reg::QUEUE_SEL, q);
            assert_eq!(r32(t, reg::QUEUE_NUM_MAX), u32::from(QUEUE_MAX));
            w32(t, reg::QUEUE_NUM, 16);
            w32(t, reg::QUEUE_DESC_LOW, (DESC + base) as u32);
            w32(t, reg::QUEUE_DESC_HIGH, 0);
            w32(t, reg::QUEUE_DRIVER_LOW, (AVAIL + base) as u32);
            w32(t, reg::QUEUE_DRIVER_HIGH, 0);
            w32(t, reg::QUEUE_DEVICE_LOW, (USED + base) as u32);
            w32(t, reg::QUEUE_DEVICE_HIGH, 0);
            w32(t, reg::QUEUE_READY, 1);
        }
        w32(t, reg::STATUS, 1 | 2 | 8 | 4);
    }

    /// Posts a one-descriptor chain on queue `q` (`write`: device-writable).
    fn post(mem: &GuestMemoryMmap, q: u64, slot: u16, addr: u64, len: u32, write: bool) {
        let base = q * 0x10000;
        let d = DESC + base + u64::from(slot) * 16;
        mem.write_obj(addr, GuestAddress(d)).unwrap();
        mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        mem.write_obj(if write { 2u16 } else { 0 }, GuestAddress(d + 12))
            .unwrap();
        let idx: u16 = mem.read_obj(GuestAddress(AVAIL + base + 2)).unwrap();
        mem.write_obj(
            slot,
            GuestAddress(AVAIL + base + 4 + 2 * u64::from(idx % 16)),
        )
        .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + base + 2))
            .unwrap();
    }

    fn setup() -> (GuestMemoryMmap, MmioTransport, TailBuffer, EventFdTrigger) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let tail = TailBuffer::new(1 << 16);
        let irq = EventFdTrigger::new().unwrap();
        let probe = irq.try_clone().unwrap();
        let t = MmioTransport::new_console(mem.clone(), irq, Box::new(tail.clone())).unwrap();
        (mem, t, tail, probe)
    }

    #[test]
    fn identifies_as_a_version_2_virtio_console() {
        let (_m, mut t, _tail, _irq) = setup();
        assert_eq!(r32(&mut t, reg::MAGIC), MMIO_MAGIC);
        assert_eq!(r32(&mut t, reg::VERSION), 2);
        assert_eq!(r32(&mut t, reg::DEVICE_ID), VIRTIO_ID_CONSOLE);
    }

    #[test]
    fn guest_transmit_buffers_reach_the_sink_and_raise_the_interrupt() {
        let (mem, mut t, tail, irq) = setup();
        driver_setup(&mut t);
        mem.write_slice(b"hello ", GuestAddress(DATA)).unwrap();
        mem.write_slice(b"host", GuestAddress(DATA + 0x100))
            .unwrap();
        post(&mem, TX as u64, 0, DATA, 6, false);
        post(&mem, TX as u64, 1, DATA + 0x100, 4, false);
        w32(&mut t, reg::QUEUE_NOTIFY, TX as u32);
        assert_eq!(tail.contents(), b"hello host");
        assert_eq!(irq.0.read().unwrap(), 1);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), INT_USED_RING);
        w32(&mut t, reg::INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(r32(&mut t, reg::INTERRUPT_STATUS), 0);
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 0x10000 + 2)).unwrap();
        assert_eq!(used_idx, 2);
    }

    #[test]
    fn host_input_fills_posted_receive_buffers_and_waits_for_more() {
        let (mem, mut t, _tail, irq) = setup();
        assert_eq!(t.offer_input(b"early"), 0, "no driver yet");
        driver_setup(&mut t);
        assert_eq!(t.offer_input(b"abc"), 0, "no buffers yet");
        post(&mem, RX as u64, 0, DATA, 4, true);
        assert_eq!(t.offer_input(b"abcdefgh"), 4);
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(&got, b"abcd");
        let used_len: u32 = mem.read_obj(GuestAddress(USED + 4 + 4)).unwrap();
        assert_eq!(used_len, 4);
        assert_eq!(irq.0.read().unwrap(), 1);
        assert_eq!(t.offer_input(b"efgh"), 0);
    }

    #[test]
    fn status_zero_resets_the_device() {
        let (_mem, mut t, _tail, _irq) = setup();
        driver_setup(&mut t);
        w32(&mut t, reg::STATUS, 0);
        assert_eq!(r32(&mut t, reg::STATUS), 0);
        w32(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r32(&mut t, reg::QUEUE_READY), 0);
    }
}
