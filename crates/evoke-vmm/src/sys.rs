//! The calls on guest memory that need `unsafe`: handing it to KVM, and
//! asking for transparent huge pages behind it.
#![allow(unsafe_code)]

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::error::VmmError;

/// Registers every region of `mem` as a KVM memory slot.
///
/// The caller must keep `mem` mapped for as long as `vm` (and its vCPUs)
/// live; [`crate::vm::Vm`] guarantees this by dropping the VM fd first.
pub fn register_guest_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| VmmError::Memory {
                size: region.len(),
                reason: e.to_string(),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host..host+len` is a live anonymous mapping owned by
        // `mem`, which outlives the VM fd (see the function's contract), and
        // slots do not overlap because the regions do not.
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| VmmError::Kvm {
            op: "KVM_SET_USER_MEMORY_REGION",
            source,
        })?;
    }
    Ok(())
}

/// Asks the kernel to back guest memory with transparent huge pages where it
/// can (Debian's default THP mode is `madvise`, so without this every 4 KiB
/// of guest RAM the guest first touches is a fault of its own). Booting
/// touches tens of MiB (the kernel decompressing itself, the page tables
/// and memmap), and each fault is an exit to the host: 2 MiB at a time cuts
/// them 512-fold. QEMU does the same for its guest RAM. Failure is only
/// logged: small pages work, just slower.
pub fn advise_huge_pages(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        // SAFETY: `host..host+len` is a live anonymous mapping owned by
        // `mem`; MADV_HUGEPAGE only changes how the kernel backs it, never
        // its contents.
        let rc = unsafe {
            libc::madvise(
                host.cast::<libc::c_void>(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            tracing::debug!(error = %e, "madvise(MADV_HUGEPAGE) on guest memory");
        }
    }
}
