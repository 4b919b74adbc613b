//! Minimal ACPI tables: RSDP → XSDT → FADT (hardware-reduced, with the DSDT),
//! MADT (one local APIC per vCPU and the IOAPIC).
//!
//! Why ACPI and not an MP table: Debian's cloud kernel is built without
//! `CONFIG_X86_MPPARSE` and without `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, so
//! the only way it learns about secondary CPUs and virtio-mmio devices is
//! ACPI. The DSDT declares each virtio-mmio window as an `LNRO0005` device,
//! which the `virtio_mmio` driver binds to.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::VmmError;
use crate::layout::{ACPI_RSDP_ADDR, IOAPIC_ADDR, LAPIC_ADDR};

const OEM_ID: &[u8; 6] = b"EVOKE ";
const OEM_TABLE_ID: &[u8; 8] = b"EVOKEVM ";

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table: the 36-byte header, then the body.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"EVOK"); // creator id
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// AML PkgLength: the length of the package including the encoding itself.
fn pkg_length(payload_len: usize) -> Vec<u8> {
    // One byte holds up to 63; otherwise 1-3 extra bytes follow, the lead
    // byte keeping only 4 bits.
    for extra in 0..4usize {
        let total = payload_len + 1 + extra;
        let fits = match extra {
            0 => total < 0x40,
            1 => total < 0x1000,
            2 => total < 0x10_0000,
            _ => total < 0x1000_0000,
        };
        if fits {
            if extra == 0 {
                return vec![total as u8];
            }
            let mut v = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    // AML packages are limited to 256 MiB; ours are a few hundred bytes.
    vec![0]
}

fn aml_name_string(name: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08]; // NameOp
    v.extend_from_slice(name);
    v.extend_from_slice(value);
    v
}

fn aml_string(s: &str) -> Vec<u8> {
    let mut v = vec![0x0d]; // StringPrefix
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

fn aml_integer(n: u32) -> Vec<u8> {
    match n {
        0 => vec![0x00],
        1 => vec![0x01],
        n if n <= 0xff => vec![0x0a, n as u8],
        n if n <= 0xffff => {
            let mut v = vec![0x0b];
            v.extend_from_slice(&(n as u16).to_le_bytes());
            v
        }
        n => {
            let mut v = vec![0x0c];
            v.extend_from_slice(&n.to_le_bytes());
            v
        }
    }
}

/// `Buffer` holding a resource template: a fixed 32-bit memory range and an
/// extended, edge-triggered, active-high interrupt.
fn aml_crs(dev: &MmioDevice) -> Vec<u8> {
    let mut res = Vec::new();
    res.push(0x86); // Memory32Fixed
    res.extend_from_slice(&9u16.to_le_bytes());
    res.push(1); // read-write
    res.extend_from_slice(&(dev.base as u32).to_le_bytes());
    res.extend_from_slice(&(dev.size as u32).to_le_bytes());
    res.push(0x89); // Extended Interrupt
    res.extend_from_slice(&6u16.to_le_bytes());
    res.push(0b0000_0011); // consumer, edge, active high, exclusive
    res.push(1);
    res.extend_from_slice(&dev.irq.to_le_bytes());
    res.extend_from_slice(&[0x79, 0]); // End tag
    let mut body = aml_integer(res.len() as u32);
    body.extend_from_slice(&res);
    let mut v = vec![0x11]; // BufferOp
    v.extend_from_slice(&pkg_length(body.len()));
    v.extend_from_slice(&body);
    v
}

fn aml_device(name: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut v = vec![0x5b, 0x82]; // DeviceOp
    let mut inner = name.to_vec();
    inner.extend_from_slice(body);
    v.extend_from_slice(&pkg_length(inner.len()));
    v.extend_from_slice(&inner);
    v
}

/// A legacy 16550 UART as the DSDT describes it.
#[derive(Debug, Clone, Copy)]
pub struct SerialDevice {
    pub port: u16,
    pub irq: u8,
}

/// `Buffer` with an I/O port range and an ISA IRQ (edge, active high).
fn aml_serial_crs(dev: &SerialDevice) -> Vec<u8> {
    let mut res = vec![0x47, 0x01]; // IO, 16-bit decode
    res.extend_from_slice(&dev.port.to_le_bytes());
    res.extend_from_slice(&dev.port.to_le_bytes());
    res.extend_from_slice(&[1, 8]); // alignment, length
    res.push(0x22); // IRQNoFlags
    res.extend_from_slice(&(1u16 << dev.irq).to_le_bytes());
    res.extend_from_slice(&[0x79, 0]);
    let mut body = aml_integer(res.len() as u32);
    body.extend_from_slice(&res);
    let mut v = vec![0x11];
    v.extend_from_slice(&pkg_length(body.len()));
    v.extend_from_slice(&body);
    v
}

/// The DSDT's AML: `Scope(\_SB) { Device(COMn) {...} Device(VRnn) {...} }`.
///
/// The UARTs must be declared: with hardware-reduced ACPI Linux has no
/// legacy PIC and maps no ISA IRQ by itself, so a UART found only by legacy
/// probing could not get its interrupt (its tty fails with EIO). Declared as
/// `PNP0501`, the 8250 PNP driver takes the port with an ACPI-mapped IRQ.
pub fn dsdt_aml(serials: &[SerialDevice], devices: &[MmioDevice]) -> Vec<u8> {
    let mut scope_body = b"\\_SB_".to_vec();
    for (i, dev) in serials.iter().enumerate() {
        let name = [b'C', b'O', b'M', b'1' + i as u8];
        // EisaId("PNP0501")
        let mut body = aml_name_string(b"_HID", &[0x0c, 0x41, 0xd0, 0x05, 0x01]);
        body.extend(aml_name_string(b"_UID", &aml_integer(i as u32)));
        body.extend(aml_name_string(b"_CRS", &aml_serial_crs(dev)));
        scope_body.extend(aml_device(&name, &body));
    }
    for (i, dev) in devices.iter().enumerate() {
        let name = format!("VR{i:02X}");
        let mut name4 = [b'_'; 4];
        name4.copy_from_slice(&name.as_bytes()[..4]);
        let mut body = aml_name_string(b"_HID", &aml_string("LNRO0005"));
        body.extend(aml_name_string(b"_UID", &aml_integer(i as u32)));
        body.extend(aml_name_string(b"_CRS", &aml_crs(dev)));
        scope_body.extend(aml_device(&name4, &body));
    }
    let mut v = vec![0x10]; // ScopeOp
    v.extend_from_slice(&pkg_length(scope_body.len()));
    v.extend_from_slice(&scope_body);
    v
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    // Body offsets are relative to the end of the header (36).
    let mut body = vec![0u8; 276 - 36];
    let put = |b: &mut Vec<u8>, off: usize, bytes: &[u8]| {
        b[off - 36..off - 36 + bytes.len()].copy_from_slice(bytes);
    };
    put(&mut body, 40, &(dsdt_addr as u32).to_le_bytes());
    // IAPC_BOOT_ARCH: no VGA, no CMOS RTC to probe.
    put(&mut body, 109, &((1u16 << 2) | (1 << 5)).to_le_bytes());
    // Flags: HW_REDUCED_ACPI (no PM timer, SCI or fixed hardware needed).
    put(&mut body, 112, &(1u32 << 20).to_le_bytes());
    put(&mut body, 131, &[5]); // FADT minor version (6.5)
    put(&mut body, 140, &dsdt_addr.to_le_bytes()); // X_DSDT
    put(&mut body, 268, b"EVOKEVMM"); // hypervisor vendor identity
    sdt(b"FACP", 6, &body)
}

fn madt(ncpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: 8259s present
    for cpu in 0..ncpus {
        body.extend_from_slice(&[0, 8, cpu, cpu]); // processor local APIC
        body.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    body.extend_from_slice(&[1, 12, 0, 0]); // IO APIC id 0
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    sdt(b"APIC", 6, &body)
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.push(0); // extended checksum
    r.extend_from_slice(&[0, 0, 0]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Writes all tables from [`ACPI_RSDP_ADDR`] on and returns the RSDP's
/// address (for the zero page's `acpi_rsdp_addr`).
pub fn write_tables(
    mem: &GuestMemoryMmap,
    ncpus: u8,
    serials: &[SerialDevice],
    devices: &[MmioDevice],
) -> Result<u64, VmmError> {
    let align = |a: u64| (a + 63) & !63;
    let memerr = |_| VmmError::Setup("cannot write acpi tables into guest memory");
    let xsdt_addr = ACPI_RSDP_ADDR + 64;
    let dsdt = sdt(b"DSDT", 2, &dsdt_aml(serials, devices));
    let madt = madt(ncpus);
    // XSDT with two entries is 36 + 16 bytes.
    let fadt_addr = align(xsdt_addr + 52);
    let fadt_len = 276u64;
    let madt_addr = align(fadt_addr + fadt_len);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&fadt_addr.to_le_bytes());
    xsdt_body.extend_from_slice(&madt_addr.to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &xsdt_body);
    for (addr, table) in [
        (ACPI_RSDP_ADDR, rsdp(xsdt_addr)),
        (xsdt_addr, xsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (dsdt_addr, dsdt),
    ] {
        mem.write_slice(&table, GuestAddress(addr))
            .map_err(memerr)?;
    }
    Ok(ACPI_RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_sums_to_zero_and_has_its_length() {
        let t = madt(4);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t.len(), 36 + 8 + 4 * 8 + 12);
        let f = fadt(0x1234);
        assert_eq!(f.len(), 276);
        assert_eq!(f.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let r = rsdp(0xe0040);
        assert_eq!(r[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(r.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn pkg_length_uses_one_byte_below_64_and_more_above() {
        assert_eq!(pkg_length(10), vec![11]);
        // 100 payload + 2 length bytes = 102 = 0x66: lead 0x46, then 0x06.
        assert_eq!(pkg_length(100), vec![0x46, 0x06]);
    }

    #[test]
    fn dsdt_declares_each_virtio_mmio_window_as_lnro0005_with_its_irq() {
        let aml = dsdt_aml(
            &[SerialDevice {
                port: 0x3f8,
                irq: 4,
            }],
            &[
                MmioDevice {
                    base: 0xd000_0000,
                    size: 0x1000,
                    irq: 5,
                },
                MmioDevice {
                    base: 0xd000_1000,
                    size: 0x1000,
                    irq: 6,
                },
            ],
        );
        let find = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert_eq!(aml[0], 0x10);
        assert!(find(b"\\_SB_"));
        assert!(find(b"VR00") && find(b"VR01"));
        assert!(find(b"LNRO0005\0"));
        assert!(find(&0xd000_1000u32.to_le_bytes()));
        assert!(find(&[0x89, 6, 0, 0b11, 1, 6, 0, 0, 0]));
        assert!(find(b"COM1"));
        assert!(find(&[0x0c, 0x41, 0xd0, 0x05, 0x01]), "EisaId PNP0501");
        assert!(find(&[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8, 0x22, 0x10, 0]));
    }
}
