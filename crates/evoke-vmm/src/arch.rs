//! x86-64 vCPU state at boot: CPUID, MSRs, LAPIC, segment and control
//! registers, page tables and the GDT for entering the kernel in 64-bit mode
//! (or 32-bit protected mode for PVH).

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::VmmError;
use crate::layout::*;

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { op, source }
}

/// The host's supported CPUID, adjusted for one vCPU of a `ncpus` guest:
/// APIC ids, the hypervisor bit, and a topology of `ncpus` cores in one
/// socket with one thread each, whatever the host has.
pub fn guest_cpuid(kvm: &Kvm, cpu: u8, ncpus: u8) -> Result<CpuId, VmmError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    normalize_cpuid(cpuid.as_mut_slice(), cpu, ncpus);
    Ok(cpuid)
}

/// Leaf edits on a CPUID table (split out so it is testable without KVM).
pub fn normalize_cpuid(entries: &mut [kvm_bindings::kvm_cpuid_entry2], cpu: u8, ncpus: u8) {
    let n = u32::from(ncpus.max(1));
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors
                // per package, [15:8] CLFLUSH line size in 8-byte units.
                e.ebx = (u32::from(cpu) << 24) | (n << 16) | (8 << 8) | (e.ebx & 0xff);
                // ECX bit 31: running under a hypervisor.
                e.ecx |= 1 << 31;
                // EDX bit 28 (HTT): the logical count field above is valid.
                if n > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            4 => {
                // Deterministic cache parameters: EAX[31:26] = cores - 1,
                // EAX[25:14] = threads sharing this cache - 1.
                let cache_level = (e.eax >> 5) & 0x7;
                e.eax &= 0x3fff;
                e.eax |= (n - 1) << 26;
                if cache_level >= 3 {
                    e.eax |= (n - 1) << 14;
                }
            }
            6 => {
                // No thermal/power management to offer inside a VM.
                e.eax = 0;
                e.ecx &= !(1 << 3);
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread), level 1 =
                // core (n cores). EDX = x2APIC id.
                let shift_for = |count: u32| 32 - (count.max(1) - 1).leading_zeros();
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = shift_for(n);
                        e.ebx = n;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
                e.edx = u32::from(cpu);
            }
            0x8000_0008 => {
                // AMD: ECX[7:0] = cores - 1.
                e.ecx = (e.ecx & !0xff) | (n - 1);
            }
            0x8000_001e => {
                // AMD extended APIC id and core id; one thread per core,
                // one node.
                e.eax = u32::from(cpu);
                e.ebx = u32::from(cpu);
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

// MSR numbers (Intel SDM vol. 4).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// Boot MSRs: syscall MSRs cleared, fast strings on, MTRRs enabled with
/// write-back as the default type. The TSC is left to KVM, which keeps the
/// vCPUs' TSCs in sync when they are created together (writing it per vCPU
/// made Linux find them unsynchronised).
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), VmmError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_MISC_ENABLE, 1),
        entry(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| VmmError::Setup("msr list too long"))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != entries.len() {
        // Some hosts (PVM among them) refuse a few of these; the kernel
        // copes, so this is worth a note, not a failure.
        tracing::debug!(
            set,
            wanted = entries.len(),
            "not every boot msr was accepted"
        );
    }
    Ok(())
}

/// x87 and SSE control words as after reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), VmmError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    let b = |i: usize| regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *byte as std::os::raw::c_char;
    }
}

/// Local APIC LINT0 = ExtINT (the PIC's output) and LINT1 = NMI, as a PC
/// BIOS leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), VmmError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let with_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        with_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(&mut lapic.regs, APIC_LVT1, with_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

/// GDT entry from flags, base and limit (the classic packing).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let get_base = |e: u64| ((e >> 16) & 0x00ff_ffff) | (((e >> 56) & 0xff) << 24);
    let get_limit = |e: u64| {
        let raw = ((e & 0xffff) | (((e >> 48) & 0xf) << 16)) as u32;
        // With 4 KiB granularity the limit counts pages.
        if (e >> 55) & 1 == 1 {
            (raw << 12) | 0xfff
        } else {
            raw
        }
    };
    kvm_segment {
        base: get_base(entry),
        limit: get_limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// The CPU mode the boot vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode with identity-mapped first GiB (Linux 64-bit boot
    /// protocol). `rsi` points at the zero page.
    Long64,
    /// 32-bit protected mode, paging off (PVH). `ebx` points at start_info.
    Protected32,
    /// Real mode at CS=0 (used by tests for tiny guests).
    Real,
}

/// Writes the GDT, IDT and (for long mode) page tables into guest memory and
/// loads the matching segment and control registers.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd, mode: EntryMode) -> Result<(), VmmError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let memerr = |_| VmmError::Setup("cannot write boot tables into guest memory");
    match mode {
        EntryMode::Real => {
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
        }
        EntryMode::Long64 | EntryMode::Protected32 => {
            let code = if mode == EntryMode::Long64 {
                gdt_entry(0xa09b, 0, 0xfffff) // 64-bit code, L=1
            } else {
                gdt_entry(0xc09b, 0, 0xfffff) // 32-bit code, D=1
            };
            let gdt = [
                gdt_entry(0, 0, 0),
                code,
                gdt_entry(0xc093, 0, 0xfffff), // data
                gdt_entry(0x808b, 0, 0xfffff), // TSS
            ];
            for (i, e) in gdt.iter().enumerate() {
                mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))
                    .map_err(memerr)?;
            }
            mem.write_obj(0u64, GuestAddress(IDT_ADDR))
                .map_err(memerr)?;
            let code_seg = segment_from_gdt(gdt[1], 1);
            let data_seg = segment_from_gdt(gdt[2], 2);
            let tss_seg = segment_from_gdt(gdt[3], 3);
            sregs.gdt.base = GDT_ADDR;
            sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
            sregs.idt.base = IDT_ADDR;
            sregs.idt.limit = 7;
            sregs.cs = code_seg;
            sregs.ds = data_seg;
            sregs.es = data_seg;
            sregs.fs = data_seg;
            sregs.gs = data_seg;
            sregs.ss = data_seg;
            sregs.tr = tss_seg;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            if mode == EntryMode::Long64 {
                write_identity_page_tables(mem)?;
                sregs.cr3 = PML4_ADDR;
                sregs.cr4 |= X86_CR4_PAE;
                sregs.cr0 |= X86_CR0_PG;
                sregs.efer |= EFER_LME | EFER_LMA;
            }
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))
}

/// Identity-maps the low 4 GiB with 2 MiB pages: enough for the kernel's
/// early code (which builds its own tables at once) and for test guests
/// that touch the MMIO gap.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    let memerr = |_| VmmError::Setup("cannot write page tables into guest memory");
    mem.write_obj(PDPT_ADDR | 0x03, GuestAddress(PML4_ADDR))
        .map_err(memerr)?;
    for gib in 0..4u64 {
        let pd = PD_ADDR + gib * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPT_ADDR + gib * 8))
            .map_err(memerr)?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            mem.write_obj(phys | 0x83, GuestAddress(pd + i * 8))
                .map_err(memerr)?;
        }
    }
    Ok(())
}

/// General registers for the entry point: `rip`, a stack, and the boot
/// protocol's pointer register (`rsi` = zero page, or `rbx` = PVH
/// start_info).
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode, entry: u64) -> Result<(), VmmError> {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Long64 => {
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = ZERO_PAGE_ADDR;
        }
        EntryMode::Protected32 => {
            regs.rbx = PVH_INFO_ADDR;
        }
        EntryMode::Real => {
            regs.rsp = 0x7000;
        }
    }
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn gdt_entries_decode_to_the_segments_linux_expects() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code.l, code.db, code.g, code.present), (1, 0, 1, 1));
        assert_eq!(code.selector, 8);
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.type_, data.db, data.s), (3, 1, 1));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn cpuid_gets_apic_id_hypervisor_bit_and_topology_for_the_vcpu_count() {
        let mut leaves = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0000,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        normalize_cpuid(&mut leaves, 3, 4);
        assert_eq!(leaves[0].ebx >> 24, 3);
        assert_eq!((leaves[0].ebx >> 16) & 0xff, 4);
        assert_ne!(leaves[0].ecx & (1 << 31), 0);
        assert_ne!(leaves[0].edx & (1 << 28), 0);
        assert_eq!(leaves[1].ebx, 4);
        assert_eq!(leaves[1].eax, 2);
        assert_eq!(leaves[1].edx, 3);
    }
}
