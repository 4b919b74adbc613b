//! Loading a Linux kernel, its initramfs and command line into guest memory
//! and describing the machine to it: the zero page (64-bit boot protocol) or
//! `hvm_start_info` (PVH).
//!
//! Two kernel formats: a bzImage (entered at its 64-bit entry point, load
//! address + 0x200, after its decompressor runs inside the guest), and an
//! uncompressed ELF vmlinux (no decompression: entered at the ELF entry via
//! the 64-bit boot protocol, or at the PVH entry from its Xen ELF note).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::EntryMode;
use crate::error::VmmError;
use crate::layout::*;
use crate::vmlinux;

/// How to enter the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootProtocol {
    /// PVH for an ELF kernel with a PVH note, otherwise the 64-bit protocol.
    #[default]
    Auto,
    /// Linux's 64-bit boot protocol (zero page in `rsi`).
    Linux64,
    /// PVH (ELF kernels only): 32-bit entry, `hvm_start_info` in `ebx`.
    Pvh,
}

/// Where the kernel landed and how to start it.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub entry: u64,
    pub mode: EntryMode,
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const PVH_START_MAGIC: u32 = 0x336e_c578;

/// The memory map both protocols describe: low RAM below the EBDA, the BIOS
/// area (ACPI tables) reserved, then RAM from 1 MiB, skipping the MMIO gap.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_regions(mem_size) {
        if start == 0 {
            map.push((HIGH_MEMORY_START, len - HIGH_MEMORY_START, E820_RAM));
        } else {
            map.push((start, len, E820_RAM));
        }
    }
    map
}

fn open(path: &Path) -> Result<File, VmmError> {
    File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            VmmError::KernelMissing {
                path: path.to_path_buf(),
            }
        } else {
            VmmError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn is_elf(f: &mut File, path: &Path) -> Result<bool, VmmError> {
    let mut magic = [0u8; 4];
    let io = |source| VmmError::Io {
        path: path.to_path_buf(),
        source,
    };
    f.read_exact(&mut magic).map_err(io)?;
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    Ok(&magic == b"\x7fELF")
}

/// Everything `load` needs besides guest memory.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    /// Initramfs parts (newc cpio archives), placed back to back.
    pub initrd: &'a [PathBuf],
    pub cmdline: &'a str,
    pub protocol: BootProtocol,
    pub mem_size: u64,
    pub rsdp: u64,
}

/// Loads kernel, initramfs and command line and writes the boot structures.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec<'_>) -> Result<BootEntry, VmmError> {
    let mut kf = open(spec.kernel)?;
    let kernel_err = |e: linux_loader::loader::Error| VmmError::KernelLoad {
        path: spec.kernel.to_path_buf(),
        reason: e.to_string(),
    };
    let elf = is_elf(&mut kf, spec.kernel)?;
    let start = GuestAddress(HIGH_MEMORY_START);
    let (result, entry) = if elf {
        let r = Elf::load(mem, None, &mut kf, Some(start)).map_err(kernel_err)?;
        let pvh = match (spec.protocol, r.pvh_boot_cap) {
            (BootProtocol::Linux64, _) => None,
            (_, PvhBootCapability::PvhEntryPresent(a)) => Some(a.0),
            (BootProtocol::Pvh, _) => {
                return Err(VmmError::KernelLoad {
                    path: spec.kernel.to_path_buf(),
                    reason: "pvh requested but the kernel has no pvh entry note".into(),
                })
            }
            _ => None,
        };
        let entry = match pvh {
            Some(e) => BootEntry {
                entry: e,
                mode: EntryMode::Protected32,
            },
            None => BootEntry {
                entry: r.kernel_load.0,
                mode: EntryMode::Long64,
            },
        };
        (r, entry)
    } else if let Some(p) = unpack_bzimage(mem, spec)? {
        let entry = match p.pvh_entry {
            Some(e) => BootEntry {
                entry: e,
                mode: EntryMode::Protected32,
            },
            None => BootEntry {
                entry: p.entry,
                mode: EntryMode::Long64,
            },
        };
        let r = KernelLoaderResult {
            kernel_load: GuestAddress(p.entry),
            kernel_end: p.kernel_end,
            ..Default::default()
        };
        (r, entry)
    } else {
        if spec.protocol == BootProtocol::Pvh {
            return Err(VmmError::KernelLoad {
                path: spec.kernel.to_path_buf(),
                reason: "pvh needs an elf vmlinux with a pvh note, or a bzimage whose lz4 payload is one".into(),
            });
        }
        let r = BzImage::load(mem, None, &mut kf, Some(start)).map_err(kernel_err)?;
        let entry = BootEntry {
            entry: r.kernel_load.0 + 0x200,
            mode: EntryMode::Long64,
        };
        (r, entry)
    };

    tracing::debug!(kernel = %spec.kernel.display(), elf, "kernel loaded");
    let cmdline = spec.cmdline.as_bytes();
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(VmmError::Config(format!(
            "kernel command line is {} bytes, the limit is {}",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    let memerr = |_| VmmError::Setup("cannot write boot data into guest memory");
    mem.write_slice(cmdline, GuestAddress(CMDLINE_ADDR))
        .map_err(memerr)?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_ADDR + cmdline.len() as u64))
        .map_err(memerr)?;

    let hdr = result.setup_header;
    let initrd_max = hdr.map(|h| h.initrd_addr_max).filter(|m| *m != 0);
    let initrd = if spec.initrd.is_empty() {
        None
    } else {
        Some(load_initrd(
            mem,
            spec.initrd,
            spec.mem_size,
            result.kernel_end,
            initrd_max,
        )?)
    };

    if entry.mode == EntryMode::Protected32 {
        write_pvh_info(mem, spec, initrd)?;
    } else {
        write_zero_page(mem, spec, hdr, cmdline.len(), initrd)?;
    }
    Ok(entry)
}

/// A bzImage under [`BootProtocol::Auto`] or [`BootProtocol::Pvh`]: its
/// ELF payload unpacked by the VMM into guest memory (see
/// [`vmlinux::load_payload`]), entered through PVH when it has the note.
/// The guest then skips its self-decompression, which under nested paging
/// costs it far more than the host's LZ4 pass. `None` when the payload's
/// compression is not one the loader reads, or for [`BootProtocol::Linux64`]
/// with a bzImage, which keeps the classic path (the guest decompresses).
fn unpack_bzimage(
    mem: &GuestMemoryMmap,
    spec: &BootSpec<'_>,
) -> Result<Option<vmlinux::PayloadLoad>, VmmError> {
    if spec.protocol == BootProtocol::Linux64 {
        return Ok(None);
    }
    let loaded = vmlinux::load_payload(mem, spec.kernel)?;
    if let Some(p) = &loaded {
        if spec.protocol == BootProtocol::Pvh && p.pvh_entry.is_none() {
            return Err(VmmError::KernelLoad {
                path: spec.kernel.to_path_buf(),
                reason: "pvh requested but the kernel has no pvh entry note".into(),
            });
        }
        tracing::debug!(
            kernel = %spec.kernel.display(),
            pvh = p.pvh_entry.is_some(),
            "bzimage payload unpacked into guest memory"
        );
    }
    Ok(loaded)
}

/// Places the initramfs parts at the top of low memory, page aligned, below
/// the kernel's limit, each part 4-byte aligned (as the kernel's cpio
/// unpacker expects of concatenated archives); returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    parts: &[PathBuf],
    mem_size: u64,
    kernel_end: u64,
    initrd_max: Option<u32>,
) -> Result<(u64, u64), VmmError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmmError::Io { path, source }
    };
    let mut files = Vec::with_capacity(parts.len());
    let mut size = 0u64;
    for p in parts {
        let f = File::open(p).map_err(io(p))?;
        let len = f.metadata().map_err(io(p))?.len();
        size = (size + 3) & !3;
        files.push((p, f, size, len));
        size += len;
    }
    let low_top = mem_size.min(MMIO_GAP_START);
    let limit = initrd_max.map_or(low_top, |m| low_top.min(u64::from(m) + 1));
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or_else(|| {
            VmmError::Config(format!(
                "initramfs of {size} bytes does not fit in {} MiB of guest memory next to the kernel",
                mem_size >> 20
            ))
        })?;
    for (p, mut f, off, len) in files {
        mem.read_exact_volatile_from(GuestAddress(addr + off), &mut f, len as usize)
            .map_err(|e| VmmError::Io {
                path: p.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
    }
    Ok((addr, size))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    spec: &BootSpec<'_>,
    hdr: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), VmmError> {
    let mut params = boot_params::default();
    if let Some(h) = hdr {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = 0xff; // undefined loader
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = spec.rsdp;
    let map = e820_map(spec.mem_size);
    for (i, (addr, size, ty)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *ty,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|_| VmmError::Setup("cannot write the zero page into guest memory"))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    spec: &BootSpec<'_>,
    initrd: Option<(u64, u64)>,
) -> Result<(), VmmError> {
    let memerr = |_| VmmError::Setup("cannot write pvh start info into guest memory");
    let map = e820_map(spec.mem_size);
    for (i, (addr, size, ty)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *ty,
            reserved: 0,
        };
        mem.write_obj(e, GuestAddress(PVH_MEMMAP_ADDR + i as u64 * 24))
            .map_err(memerr)?;
    }
    let modlist_addr = PVH_MEMMAP_ADDR + map.len() as u64 * 24;
    let mut info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: spec.rsdp,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(modlist_addr))
            .map_err(memerr)?;
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(memerr)
}

/// The guest kernel evoke uses when none is given: Debian's
/// linux-image-cloud-amd64, which `scripts/setup` installs.
pub fn default_kernel() -> Result<PathBuf, VmmError> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    found.sort();
    found.pop().ok_or_else(|| VmmError::KernelMissing {
        path: PathBuf::from("/boot/vmlinuz-*-cloud-amd64"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_the_bios_area_and_skips_the_mmio_gap() {
        let m = e820_map(512 << 20);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert_eq!(m[1].2, E820_RESERVED);
        assert_eq!(
            m[2],
            (HIGH_MEMORY_START, (512 << 20) - HIGH_MEMORY_START, E820_RAM)
        );
        let big = e820_map(4 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(big[3].0, MMIO_GAP_END);
    }

    #[test]
    fn missing_kernel_names_the_setup_script() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let spec = BootSpec {
            kernel: &dir.path().join("vmlinuz-nope"),
            initrd: &[],
            cmdline: "",
            protocol: BootProtocol::Auto,
            mem_size: 4 << 20,
            rsdp: 0,
        };
        let err = load(&mem, &spec).unwrap_err().to_string();
        assert!(err.contains("scripts/setup"), "{err}");
        assert!(err.contains("vmlinuz-nope"), "{err}");
    }

    #[test]
    fn debian_bzimage_under_linux64_loads_with_zero_page_cmdline_initrd_and_e820() {
        let kernel = match default_kernel() {
            Ok(k) => k,
            Err(e) if std::env::var_os("CI").is_some() => panic!("CI runs scripts/setup: {e}"),
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        let mem_size = 128u64 << 20;
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.cpio"), dir.path().join("b.cpio"));
        std::fs::write(&a, b"first").unwrap();
        std::fs::write(&b, b"second").unwrap();
        let parts = [a, b];
        let spec = BootSpec {
            kernel: &kernel,
            initrd: &parts,
            cmdline: "console=ttyS0 quiet",
            protocol: BootProtocol::Linux64,
            mem_size,
            rsdp: ACPI_RSDP_ADDR,
        };
        let entry = load(&mem, &spec).unwrap();
        assert_eq!(entry.mode, EntryMode::Long64);
        assert_eq!(entry.entry, HIGH_MEMORY_START + 0x200);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ params.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ params.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
        assert_eq!({ params.hdr.cmd_line_ptr } as u64, CMDLINE_ADDR);
        assert_eq!({ params.acpi_rsdp_addr }, ACPI_RSDP_ADDR);
        assert_eq!(params.e820_entries, 3);
        let mut cmdline = [0u8; 19];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cmdline, b"console=ttyS0 quiet");
        // Parts are 4-byte aligned back to back: "first", 3 bytes of
        // padding, "second".
        let (addr, size) = ({ params.hdr.ramdisk_image }, { params.hdr.ramdisk_size });
        assert_eq!(size, 14);
        assert_eq!(addr % 4096, 0);
        let mut got = [0u8; 14];
        mem.read_slice(&mut got, GuestAddress(u64::from(addr)))
            .unwrap();
        assert_eq!(&got[..5], b"first");
        assert_eq!(&got[8..], b"second");
    }

    #[test]
    fn debian_bzimage_by_default_is_unpacked_by_the_vmm_exactly_as_its_vmlinux_loads() {
        let kernel = match default_kernel() {
            Ok(k) => k,
            Err(e) if std::env::var_os("CI").is_some() => panic!("CI runs scripts/setup: {e}"),
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        let mem_size = 128u64 << 20;
        let new_mem =
            || GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
        let spec = |k| BootSpec {
            kernel: k,
            initrd: &[],
            cmdline: "console=ttyS0",
            protocol: BootProtocol::Auto,
            mem_size,
            rsdp: ACPI_RSDP_ADDR,
        };
        // The bzImage, unpacked by the VMM.
        let unpacked = new_mem();
        let entry = load(&unpacked, &spec(&kernel)).unwrap();
        assert_eq!(entry.mode, EntryMode::Protected32, "entered through pvh");
        // The same kernel's vmlinux, extracted to a file and loaded as an ELF.
        let dir = tempfile::tempdir().unwrap();
        let vmlinux = vmlinux::cached(&kernel, dir.path()).unwrap();
        let elf = new_mem();
        let elf_entry = load(&elf, &spec(&vmlinux)).unwrap();
        assert_eq!((entry.entry, entry.mode), (elf_entry.entry, elf_entry.mode));
        // Guest memory holds the same bytes, boot data and kernel alike.
        let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        let mut at = 0u64;
        while at < mem_size {
            unpacked.read_slice(&mut a, GuestAddress(at)).unwrap();
            elf.read_slice(&mut b, GuestAddress(at)).unwrap();
            assert!(a == b, "guest memory differs in the MiB at {at:#x}");
            at += 1 << 20;
        }
        // The classic path stays available, and pvh still refuses what it
        // cannot enter.
        let linux64 = BootSpec {
            protocol: BootProtocol::Linux64,
            ..spec(&kernel)
        };
        assert_eq!(load(&new_mem(), &linux64).unwrap().mode, EntryMode::Long64);
    }

    #[test]
    fn pvh_needs_an_elf_kernel_or_a_bzimage() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinuz-fake");
        std::fs::write(&k, vec![0u8; 4096]).unwrap();
        let spec = BootSpec {
            kernel: &k,
            initrd: &[],
            cmdline: "",
            protocol: BootProtocol::Pvh,
            mem_size: 4 << 20,
            rsdp: 0,
        };
        let err = load(&mem, &spec).unwrap_err().to_string();
        assert!(err.contains("not a bzimage"), "{err}");
    }
}
