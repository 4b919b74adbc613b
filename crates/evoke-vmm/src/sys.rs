//! The one KVM call that needs `unsafe`: handing guest memory to KVM.
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
