//! The virtio-mmio (version 2) transport shared by every virtio device:
//! identification, feature negotiation, queue setup, interrupt status and
//! device status with reset. A device embeds a [`Transport`], forwards the
//! guest's window accesses to it and acts on the [`Event`]s it returns;
//! only the device id, the offered features, the config space and what a
//! queue notify means differ between devices.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::EventFdTrigger;

pub(crate) const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
pub(crate) const MMIO_VERSION: u32 = 2;
pub(crate) const VENDOR_ID: u32 = 0x4556_4b45; // "EKVE"
pub(crate) const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub(crate) const QUEUE_MAX: u16 = 256;
pub(crate) const INT_USED_RING: u32 = 1;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 0x80;

/// Register offsets of the virtio-mmio version 2 window.
pub(crate) mod reg {
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

/// What a guest write asks of the device behind the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// The driver notified queue `n` (new buffers to look at).
    Notify(u32),
    /// The driver has just set DRIVER_OK: features are final.
    DriverOk,
    /// The driver wrote status 0; the transport is already reset.
    /// `was_ok`: the driver had been up before.
    Reset { was_ok: bool },
}

/// The register state and queues of one virtio-mmio window.
pub(crate) struct Transport {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    /// Device name for logs ("virtio-net").
    name: &'static str,
    device_id: u32,
    device_features: u64,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    irq: EventFdTrigger,
}

impl Transport {
    pub fn new(
        mem: GuestMemoryMmap,
        irq: EventFdTrigger,
        name: &'static str,
        device_id: u32,
        device_features: u64,
        queues: usize,
    ) -> Result<Self, virtio_queue::Error> {
        Ok(Self {
            mem,
            queues: (0..queues)
                .map(|_| Queue::new(QUEUE_MAX))
                .collect::<Result<_, _>>()?,
            name,
            device_id,
            device_features,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            irq,
        })
    }

    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// The features the driver accepted (final once [`Event::DriverOk`]).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    pub fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    /// The driver is up and queue `i` is set up consistently.
    pub fn queue_usable(&self, i: usize) -> bool {
        self.driver_ok() && self.queues.get(i).is_some_and(|q| q.is_valid(&self.mem))
    }

    /// A guest read of `data.len()` bytes at `offset` in the window; reads
    /// of the config space go to `config` with the offset inside it.
    pub fn read(&mut self, offset: u64, data: &mut [u8], config: impl FnOnce(u64, &mut [u8])) {
        if offset >= reg::CONFIG {
            config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
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

    /// A guest write at `offset` in the window. The config space is
    /// read-only for every device here, so such writes are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<Event> {
        if offset >= reg::CONFIG || data.len() != 4 {
            return None;
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
            reg::QUEUE_NOTIFY => return Some(Event::Notify(v)),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => {
                let was_ok = self.driver_ok();
                if v == 0 {
                    self.reset();
                    return Some(Event::Reset { was_ok });
                }
                self.status = v;
                if self.driver_ok() && !was_ok {
                    if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                        tracing::warn!(
                            device = self.name,
                            "driver did not accept VIRTIO_F_VERSION_1"
                        );
                    }
                    return Some(Event::DriverOk);
                }
            }
            _ => {}
        }
        None
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

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used(&mut self) {
        self.interrupt_status |= INT_USED_RING;
        if let Err(e) = vm_superio::Trigger::trigger(&self.irq) {
            tracing::warn!(error = %e, device = self.name, "virtio interrupt failed");
        }
    }
}

/// Guest-side helpers for device tests: what the Linux virtio-mmio driver
/// does, on any device's window.
#[cfg(test)]
pub(crate) mod testing {
    use super::reg;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// Where [`probe`] puts queue 0; queue `q` sits `q * 0x10000` above.
    pub(crate) const DESC: u64 = 0x1000;
    pub(crate) const AVAIL: u64 = 0x2000;
    pub(crate) const USED: u64 = 0x3000;

    /// A device's window as the tests drive it.
    pub(crate) trait Window {
        fn read(&mut self, offset: u64, data: &mut [u8]);
        fn write(&mut self, offset: u64, data: &[u8]);
    }

    /// Implements [`Window`] for a device type with inherent
    /// `read`/`write` methods.
    macro_rules! window {
        ($t:ty) => {
            impl $crate::devices::mmio::testing::Window for $t {
                fn read(&mut self, offset: u64, data: &mut [u8]) {
                    <$t>::read(self, offset, data)
                }
                fn write(&mut self, offset: u64, data: &[u8]) {
                    <$t>::write(self, offset, data)
                }
            }
        };
    }
    pub(crate) use window;

    pub(crate) fn w32(t: &mut impl Window, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    pub(crate) fn r32(t: &mut impl Window, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Brings the driver up as Linux does at probe time: reset,
    /// ACKNOWLEDGE | DRIVER, accept `features`, FEATURES_OK, set up both
    /// queues (16 entries each, at DESC/AVAIL/USED + q * 0x10000), then
    /// DRIVER_OK.
    pub(crate) fn probe(t: &mut impl Window, features: u64) {
        w32(t, reg::STATUS, 0);
        w32(t, reg::STATUS, 1 | 2);
        w32(t, reg::DRIVER_FEATURES_SEL, 0);
        w32(t, reg::DRIVER_FEATURES, features as u32);
        w32(t, reg::DRIVER_FEATURES_SEL, 1);
        w32(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w32(t, reg::STATUS, 1 | 2 | 8);
        for q in 0..2u32 {
            let base = u64::from(q) * 0x10000;
            w32(t, reg::QUEUE_SEL, q);
            assert_eq!(r32(t, reg::QUEUE_NUM_MAX), u32::from(super::QUEUE_MAX));
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

    /// Posts a chain of `(addr, len)` descriptors on queue `q`, starting at
    /// descriptor `slot` (`write`: device-writable).
    pub(crate) fn post(mem: &GuestMemoryMmap, q: u64, slot: u16, bufs: &[(u64, u32)], write: bool) {
        let base = q * 0x10000;
        for (i, (addr, len)) in bufs.iter().enumerate() {
            let idx = slot + i as u16;
            let d = DESC + base + u64::from(idx) * 16;
            let mut flags = if write { 2u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= 1;
            }
            mem.write_obj(*addr, GuestAddress(d)).unwrap();
            mem.write_obj(*len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(idx + 1, GuestAddress(d + 14)).unwrap();
        }
        let avail_idx: u16 = mem.read_obj(GuestAddress(AVAIL + base + 2)).unwrap();
        mem.write_obj(
            slot,
            GuestAddress(AVAIL + base + 4 + 2 * u64::from(avail_idx % 16)),
        )
        .unwrap();
        mem.write_obj(avail_idx.wrapping_add(1), GuestAddress(AVAIL + base + 2))
            .unwrap();
    }
}
