//! The calls on guest memory that need `unsafe`: mapping it at huge-page
//! aligned host addresses, handing it to KVM, and asking for transparent huge
//! pages behind it.
#![allow(unsafe_code)]

use std::ptr::NonNull;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, MmapRegion,
};

use crate::error::VmmError;

/// The alignment of guest RAM in the VMM's address space: one huge page.
///
/// KVM maps guest memory with 2 MiB pages in the guest's nested page tables
/// only where the host address and the guest-physical address are congruent
/// modulo 2 MiB, and it checks that once per memory slot: one misaligned
/// base disables large pages for the whole slot. A plain `mmap` returns 4 KiB
/// aligned addresses, so the guest would then run on 4 KiB nested pages
/// (a fault per 4 KiB it first touches, and TLB misses that walk two page
/// tables), whatever transparent huge pages the host backs it with.
pub const GUEST_RAM_ALIGN: usize = 2 << 20;

/// Guest RAM: anonymous mappings whose host addresses are
/// [`GUEST_RAM_ALIGN`] aligned, unmapped on drop.
///
/// vm-memory does not align its own mappings, so [`GuestRam`] maps them and
/// hands vm-memory unowned views ([`GuestRam::memory`]). Every
/// [`GuestMemoryMmap`] made from it must be gone before it drops;
/// [`crate::vm::Vm`] keeps it as its last field, after the memory, the
/// devices and the vCPUs that refer to it.
pub struct GuestRam {
    maps: Vec<(NonNull<libc::c_void>, usize)>,
    memory: GuestMemoryMmap,
}

// SAFETY: the raw pointers name mappings this value owns; nothing reads
// through them except via `memory`, which is itself Send + Sync.
unsafe impl Send for GuestRam {}
// SAFETY: as above; `&GuestRam` only gives out `&GuestMemoryMmap`.
unsafe impl Sync for GuestRam {}

const RAM_PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
const RAM_FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

impl GuestRam {
    /// Maps `(guest address, size)` regions (sorted, not overlapping, page
    /// multiples).
    pub fn new(regions: &[(u64, u64)]) -> Result<GuestRam, VmmError> {
        let mut ram = GuestRam {
            maps: Vec::with_capacity(regions.len()),
            memory: GuestMemoryMmap::new(),
        };
        let mut views = Vec::with_capacity(regions.len());
        for &(start, len) in regions {
            let size = usize::try_from(len).map_err(|_| VmmError::Memory {
                size: len,
                reason: "larger than the address space".into(),
            })?;
            let (mapping, mapped, addr) = map_aligned(size).map_err(|e| VmmError::Memory {
                size: len,
                reason: e.to_string(),
            })?;
            ram.maps.push((mapping, mapped));
            // SAFETY: `addr..addr+size` is a live private anonymous mapping
            // with exactly these protections and flags, owned by `ram`, which
            // unmaps it only when dropped (see the type's contract).
            let region = unsafe {
                MmapRegion::build_raw(addr.as_ptr().cast::<u8>(), size, RAM_PROT, RAM_FLAGS)
            }
            .map_err(|e| VmmError::Memory {
                size: len,
                reason: e.to_string(),
            })?;
            let region = GuestRegionMmap::new(region, GuestAddress(start)).ok_or_else(|| {
                VmmError::Memory {
                    size: len,
                    reason: format!("region at {start:#x} overflows the guest address space"),
                }
            })?;
            views.push(region);
        }
        ram.memory = GuestMemoryMmap::from_regions(views).map_err(|e| VmmError::Memory {
            size: regions.iter().map(|r| r.1).sum(),
            reason: e.to_string(),
        })?;
        Ok(ram)
    }

    /// The guest memory over these mappings.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // Views first, then the mappings under them.
        self.memory = GuestMemoryMmap::new();
        for (addr, size) in self.maps.drain(..) {
            // SAFETY: a mapping this value made and nothing else unmaps;
            // the type's contract says no view of it outlives `self`.
            unsafe { libc::munmap(addr.as_ptr(), size) };
        }
    }
}

/// An inaccessible gap kept mapped just below each region of guest RAM.
///
/// New mappings are placed right below existing ones. Right below the
/// aligned RAM, a thread's 2 MiB stack would itself be 2 MiB aligned, and a
/// host with transparent huge pages set to `always` backs such a range with
/// one huge page at its first touch: 2 MiB of VMM overhead per thread. The
/// gap puts whatever comes next off that alignment.
const GUARD: usize = 64 << 10;

/// An anonymous read-write mapping of `size` bytes at a
/// [`GUEST_RAM_ALIGN`]-aligned address, with [`GUARD`] inaccessible bytes
/// below it: map more than needed, then unmap the unaligned head and the
/// tail. Returns (the mapping with its guard, its length, the RAM).
fn map_aligned(
    size: usize,
) -> std::io::Result<(NonNull<libc::c_void>, usize, NonNull<libc::c_void>)> {
    let enomem = || std::io::Error::from_raw_os_error(libc::ENOMEM);
    let total = size
        .checked_add(GUEST_RAM_ALIGN + GUARD)
        .ok_or_else(enomem)?;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks; it
    // touches no existing memory.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), total, RAM_PROT, RAM_FLAGS, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = raw as usize;
    let aligned = (base + GUARD).next_multiple_of(GUEST_RAM_ALIGN);
    let keep = aligned - GUARD;
    let head = keep - base;
    let tail = total - head - GUARD - size;
    // SAFETY: every range lies inside the mapping made above; what stays
    // mapped is `keep..aligned+size`, the guard and the RAM.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
        if libc::mprotect(keep as *mut libc::c_void, GUARD, libc::PROT_NONE) != 0 {
            let e = std::io::Error::last_os_error();
            libc::munmap(keep as *mut libc::c_void, GUARD + size);
            return Err(e);
        }
    }
    let ptr = |a: usize| NonNull::new(a as *mut libc::c_void).ok_or_else(enomem);
    Ok((ptr(keep)?, GUARD + size, ptr(aligned)?))
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn guest_ram_sits_at_huge_page_aligned_host_addresses_and_is_usable() {
        let ram = GuestRam::new(&[(0, 6 << 20), (64 << 20, 2 << 20)]).unwrap();
        let mem = ram.memory();
        assert_eq!(mem.num_regions(), 2);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for region in mem.iter() {
            let host = region.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            assert_eq!(host % GUEST_RAM_ALIGN, 0, "{host:#x}");
            // Below it, the inaccessible guard (possibly merged with a
            // neighbouring inaccessible mapping).
            let guarded = maps.lines().any(|l| {
                let mut w = l.split_whitespace();
                let (range, perms) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
                let Some((a, b)) = range.split_once('-') else {
                    return false;
                };
                let (a, b) = (
                    usize::from_str_radix(a, 16).unwrap_or(usize::MAX),
                    usize::from_str_radix(b, 16).unwrap_or(0),
                );
                perms == "---p" && a <= host - GUARD && b >= host
            });
            assert!(guarded, "no guard below {host:#x} in\n{maps}");
        }
        mem.write_obj(0x1234_5678u32, GuestAddress((6 << 20) - 4))
            .unwrap();
        mem.write_obj(7u8, GuestAddress(64 << 20)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((6 << 20) - 4)).unwrap(),
            0x1234_5678
        );
        assert!(mem.write_obj(1u8, GuestAddress(6 << 20)).is_err(), "a hole");
    }
}
