//! A virtio-console device on the shared virtio-mmio transport
//! (`super::mmio`): the agent channel between the guest and the host.
//! [`MmioTransport`] is the console's name for historical reasons.
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

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::mmio::{Event, Transport, VIRTIO_F_VERSION_1};
use super::EventFdTrigger;

const VIRTIO_ID_CONSOLE: u32 = 3;

const RX: usize = 0;
const TX: usize = 1;

/// A virtio-console (single port, no multiport) on a virtio-mmio window.
pub struct MmioTransport {
    t: Transport,
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
            t: Transport::new(
                mem,
                irq,
                "virtio-console",
                VIRTIO_ID_CONSOLE,
                VIRTIO_F_VERSION_1,
                2,
            )?,
            out,
            tx_bytes: 0,
        })
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Console config (cols, rows, max ports, emerg_wr): none of the
        // features that give them meaning are offered.
        self.t.read(offset, data, |_, d| d.fill(0));
    }

    /// A guest write at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        // A notify on the receive queue means new buffers: the input path
        // retries on its own.
        if let Some(Event::Notify(q)) = self.t.write(offset, data) {
            if q as usize == TX {
                self.process_tx();
            }
        }
    }

    /// Moves everything the guest has queued for transmission to the sink.
    pub fn process_tx(&mut self) {
        if !self.t.queue_usable(TX) {
            return;
        }
        let mem = self.t.mem.clone();
        let mut used = false;
        let mut buf = Vec::new();
        while let Some(chain) = self.t.queues[TX].pop_descriptor_chain(&mem) {
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
            if self.t.queues[TX].add_used(&mem, head, 0).is_err() {
                tracing::warn!("virtio-console cannot return a tx buffer");
            }
            used = true;
        }
        if used {
            self.t.signal_used();
        }
    }

    /// Copies host bytes into receive buffers the guest has posted and
    /// returns how many were taken (0 when the guest has none yet).
    pub fn offer_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || !self.t.queue_usable(RX) {
            return 0;
        }
        let mem = self.t.mem.clone();
        let mut taken = 0;
        while taken < bytes.len() {
            let Some(chain) = self.t.queues[RX].pop_descriptor_chain(&mem) else {
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
            if self.t.queues[RX]
                .add_used(&mem, head, written as u32)
                .is_err()
            {
                break;
            }
            taken += written;
        }
        if taken > 0 {
            std::sync::atomic::fence(Ordering::Release);
            self.t.signal_used();
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
    use crate::devices::mmio::testing::{post, probe, r32, w32, window, USED};
    use crate::devices::mmio::{reg, INT_USED_RING, MMIO_MAGIC};
    use crate::devices::sink::TailBuffer;
    use vm_memory::GuestAddress;

    const DATA: u64 = 0x4000;

    window!(MmioTransport);

    /// What the Linux virtio-mmio driver does at probe time.
    fn driver_setup(t: &mut MmioTransport) {
        w32(t, reg::DEVICE_FEATURES_SEL, 1);
        let hi = r32(t, reg::DEVICE_FEATURES);
        assert_eq!(hi & 1, 1, "VIRTIO_F_VERSION_1 offered");
        probe(t, VIRTIO_F_VERSION_1);
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
        post(&mem, TX as u64, 0, &[(DATA, 6)], false);
        post(&mem, TX as u64, 1, &[(DATA + 0x100, 4)], false);
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
        post(&mem, RX as u64, 0, &[(DATA, 4)], true);
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
