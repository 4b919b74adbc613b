//! Where things live in guest-physical memory and I/O space. One table, so
//! boot code, ACPI and devices agree.

/// GDT used to enter 64-bit mode (4 entries of 8 bytes).
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info` and its memory map.
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack for the boot CPU; grows down from here.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity page tables for the low 4 GiB: PML4, PDPT and four PDs of 2 MiB
/// pages (0xb000..0xf000).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Start of the EBDA: RAM below it is usable by the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area, where Linux scans for the RSDP.
pub const ACPI_RSDP_ADDR: u64 = 0xe0000;
/// Kernels load at 1 MiB (the 64-bit boot protocol's default).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// The 32-bit hole for MMIO (devices, IOAPIC, LAPIC): guest RAM skips it.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices: one 4 KiB window each from here, IRQs from
/// [`VIRTIO_IRQ_BASE`].
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map (Intel),
/// placed just below the LAPIC/IOAPIC area, inside the MMIO gap.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// COM1: the console (`console=ttyS0`), IRQ 4.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// COM2: an optional second UART (`/dev/ttyS1`), IRQ 3.
pub const COM2_PORT: u16 = 0x2f8;
pub const COM2_IRQ: u32 = 3;
/// i8042 keyboard controller: data at 0x60, command/status at 0x64. A write
/// of 0xfe to 0x64 is the guest's reset request (`reboot=k`).
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_CMD_PORT: u16 = 0x64;
/// A write-only port evoke's guest init may write to mark milestones (for
/// benchmarks): the VMM logs the value and the time since it started.
pub const BOOT_MARK_PORT: u16 = 0x440;

/// The RAM regions for `mem_size` bytes of guest memory: below the MMIO gap,
/// then the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_get_one_region_and_large_ones_skip_the_mmio_gap() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        let big = ram_regions(4 << 30);
        assert_eq!(big[0], (0, MMIO_GAP_START));
        assert_eq!(big[1].0, MMIO_GAP_END);
        assert_eq!(big[0].1 + big[1].1, 4 << 30);
    }
}
