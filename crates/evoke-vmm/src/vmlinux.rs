//! Unpacking the uncompressed ELF vmlinux inside a bzImage, so the VMM can
//! enter it through PVH and skip the guest-side self-decompression: either
//! straight into guest memory ([`load_payload`], what `evoke vmm` does with
//! a bzImage) or into a cached file ([`cached`], what the microvm tier boots).
//!
//! Debian compresses its kernels with LZ4 in the legacy frame format (a
//! magic number, then blocks of `u32` size + LZ4 block data, each block
//! independent of the others), followed by the 4-byte uncompressed size the
//! kernel build appends. The setup header's `payload_offset`/`payload_length`
//! say where that stream is. Other compressions are reported as unsupported;
//! callers then boot the bzImage, which decompresses itself.

use std::fs;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::VmmError;
use crate::layout::HIGH_MEMORY_START;

const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
const LZ4_LEGACY_BLOCK_MAX: usize = 8 << 20;

fn bad(path: &Path, reason: impl Into<String>) -> VmmError {
    VmmError::KernelLoad {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Decompresses one LZ4 block, appending to `out`.
pub fn lz4_block(src: &[u8], out: &mut Vec<u8>) -> Result<(), &'static str> {
    let mut i = 0usize;
    let ext = |i: &mut usize, mut n: usize| -> Result<usize, &'static str> {
        loop {
            let b = *src.get(*i).ok_or("truncated length")?;
            *i += 1;
            n += usize::from(b);
            if b != 255 {
                return Ok(n);
            }
        }
    };
    loop {
        let token = *src.get(i).ok_or("truncated token")?;
        i += 1;
        let mut lit = usize::from(token >> 4);
        if lit == 15 {
            lit = ext(&mut i, lit)?;
        }
        let lits = src.get(i..i + lit).ok_or("literals past the end")?;
        out.extend_from_slice(lits);
        i += lit;
        if i == src.len() {
            return Ok(());
        }
        let off = usize::from(u16::from_le_bytes([
            *src.get(i).ok_or("truncated offset")?,
            *src.get(i + 1).ok_or("truncated offset")?,
        ]));
        i += 2;
        if off == 0 || off > out.len() {
            return Err("match offset out of range");
        }
        let mut len = usize::from(token & 15);
        if len == 15 {
            len = ext(&mut i, len)?;
        }
        len += 4;
        let start = out.len() - off;
        if off >= len {
            out.extend_from_within(start..start + len);
        } else {
            // Overlapping copy: a repeating pattern.
            out.reserve(len);
            for k in 0..len {
                let b = out[start + k];
                out.push(b);
            }
        }
    }
}

/// A failure while streaming a payload: the decoder's, or the sink's.
#[derive(Debug)]
pub enum StreamError<E> {
    Lz4(&'static str),
    Sink(E),
}

/// Decompresses a legacy-format LZ4 stream block by block, stopping at the
/// kernel's trailing size field: `sink` gets each block's output with its
/// offset in the decompressed data, in order, through one reused buffer
/// (so at most one 8 MiB block is held, never the whole output). Returns the
/// decompressed length.
pub fn lz4_legacy_each<E>(
    src: &[u8],
    mut sink: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<u64, StreamError<E>> {
    if le32(src, 0) != Some(LZ4_LEGACY_MAGIC) {
        return Err(StreamError::Lz4("not an lz4 legacy stream"));
    }
    // Room for one block plus the decoder's overshoot, allocated once: the
    // decoder never grows it, so nothing is reallocated or left behind.
    let mut out = Vec::with_capacity(LZ4_LEGACY_BLOCK_MAX + (64 << 10));
    let mut done = 0u64;
    let mut i = 4;
    while let Some(size) = le32(src, i) {
        if size == LZ4_LEGACY_MAGIC {
            i += 4;
            continue;
        }
        let size = size as usize;
        let Some(block) = src.get(i + 4..i + 4 + size) else {
            // What is left is the appended uncompressed size, not a block.
            break;
        };
        out.clear();
        lz4_block(block, &mut out).map_err(StreamError::Lz4)?;
        if out.len() > LZ4_LEGACY_BLOCK_MAX {
            return Err(StreamError::Lz4("lz4 block larger than 8 MiB"));
        }
        sink(done, &out).map_err(StreamError::Sink)?;
        done += out.len() as u64;
        i += 4 + size;
    }
    Ok(done)
}

/// Decompresses a legacy-format LZ4 stream, stopping at the kernel's
/// trailing size field; returns the data.
pub fn lz4_legacy(src: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut all = Vec::new();
    lz4_legacy_each(src, |_, block| {
        all.extend_from_slice(block);
        Ok::<(), ()>(())
    })
    .map_err(|e| match e {
        StreamError::Lz4(e) => e,
        StreamError::Sink(()) => "unreachable sink error",
    })?;
    Ok(all)
}

/// The compressed payload inside a bzImage: (its bytes, the uncompressed
/// size the kernel build appended).
fn payload<'a>(img: &'a [u8], bzimage: &Path) -> Result<(&'a [u8], u64), VmmError> {
    if le32(img, 0x202) != Some(0x5372_6448) {
        return Err(bad(bzimage, "not a bzimage (no HdrS header)"));
    }
    let setup_sects = match img.get(0x1f1) {
        Some(0) | None => 4,
        Some(n) => usize::from(*n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let off = le32(img, 0x248).ok_or_else(|| bad(bzimage, "no payload offset"))? as usize;
    let len = le32(img, 0x24c).ok_or_else(|| bad(bzimage, "no payload length"))? as usize;
    let payload = img
        .get(pm_start + off..pm_start + off + len)
        .ok_or_else(|| bad(bzimage, "payload outside the file"))?;
    let expect = le32(payload, len.saturating_sub(4)).unwrap_or(0);
    Ok((payload, u64::from(expect)))
}

/// Extracts the ELF vmlinux from `bzimage`.
pub fn extract(bzimage: &Path) -> Result<Vec<u8>, VmmError> {
    let img = fs::read(bzimage).map_err(|source| VmmError::Io {
        path: bzimage.to_path_buf(),
        source,
    })?;
    let (payload, expect) = payload(&img, bzimage)?;
    let expect = expect as usize;
    let elf = lz4_legacy(payload).map_err(|e| {
        bad(
            bzimage,
            format!("payload is not lz4 this loader reads: {e}"),
        )
    })?;
    if elf.len() != expect || !elf.starts_with(b"\x7fELF") {
        return Err(bad(
            bzimage,
            format!(
                "decompressed payload is {} bytes, header says {expect}",
                elf.len()
            ),
        ));
    }
    Ok(elf)
}

/// Where [`load_payload`] put the kernel and how to enter it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadLoad {
    /// The ELF entry (64-bit boot protocol).
    pub entry: u64,
    /// The PVH entry from the Xen ELF note, when the kernel has one.
    pub pvh_entry: Option<u64>,
    /// The end of the highest segment in guest-physical memory.
    pub kernel_end: u64,
}

/// One ELF program header the loader uses.
#[derive(Debug, Clone, Copy)]
struct Segment {
    offset: u64,
    filesz: u64,
    paddr: u64,
    memsz: u64,
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const ELF_PHDR_SIZE: usize = 56;
const ELF_MAX_PHDRS: usize = 64;

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The loadable and note segments of a 64-bit x86 ELF whose header and
/// program headers lie in `head`, and its entry.
fn elf_segments(head: &[u8]) -> Result<(u64, Vec<Segment>, Vec<Segment>), &'static str> {
    if !head.starts_with(b"\x7fELF\x02\x01") {
        return Err("the payload is not a 64-bit little-endian elf");
    }
    if le16(head, 18) != Some(EM_X86_64) {
        return Err("the payload is not an x86-64 elf");
    }
    let entry = le64(head, 24).ok_or("truncated elf header")?;
    let phoff = le64(head, 32).ok_or("truncated elf header")? as usize;
    let phentsize = usize::from(le16(head, 54).ok_or("truncated elf header")?);
    let phnum = usize::from(le16(head, 56).ok_or("truncated elf header")?);
    if phentsize != ELF_PHDR_SIZE || phnum > ELF_MAX_PHDRS {
        return Err("unexpected elf program header table");
    }
    let (mut loads, mut notes) = (Vec::new(), Vec::new());
    for k in 0..phnum {
        let at = phoff
            .checked_add(k * ELF_PHDR_SIZE)
            .ok_or("elf program header offset overflows")?;
        let ph = head
            .get(at..at + ELF_PHDR_SIZE)
            .ok_or("elf program headers lie outside the first block")?;
        let field = |o| le64(ph, o).ok_or("truncated elf program header");
        let seg = Segment {
            offset: field(8)?,
            paddr: field(24)?,
            filesz: field(32)?,
            memsz: field(40)?,
        };
        if seg.offset.checked_add(seg.filesz).is_none()
            || seg.paddr.checked_add(seg.memsz.max(seg.filesz)).is_none()
        {
            return Err("elf segment overflows");
        }
        match le32(ph, 0) {
            Some(PT_LOAD) if seg.filesz > 0 => loads.push(seg),
            Some(PT_NOTE) => notes.push(seg),
            _ => {}
        }
    }
    Ok((entry, loads, notes))
}

/// The PVH entry point from the Xen notes in `notes`, if any.
fn pvh_entry(notes: &[u8]) -> Option<u64> {
    let mut i = 0usize;
    let pad = |n: usize| n.div_ceil(4) * 4;
    while i + 12 <= notes.len() {
        let namesz = le32(notes, i)? as usize;
        let descsz = le32(notes, i + 4)? as usize;
        let kind = le32(notes, i + 8)?;
        let name = notes.get(i + 12..i + 12 + namesz)?;
        let desc_at = i + 12 + pad(namesz);
        let desc = notes.get(desc_at..desc_at + descsz)?;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" {
            return match descsz {
                4 => le32(desc, 0).map(u64::from),
                8 => le64(desc, 0),
                _ => None,
            };
        }
        i = desc_at + pad(descsz);
    }
    None
}

/// Unpacks the ELF vmlinux inside `bzimage` straight into guest memory, at
/// its segments' physical addresses, as the blocks come out of the
/// decompressor: no file, no whole-kernel buffer. `Ok(None)` when the
/// payload is not compressed in a format this loader reads (the caller then
/// lets the bzImage decompress itself in the guest).
pub fn load_payload(
    mem: &GuestMemoryMmap,
    bzimage: &Path,
) -> Result<Option<PayloadLoad>, VmmError> {
    let img = fs::read(bzimage).map_err(|source| VmmError::Io {
        path: bzimage.to_path_buf(),
        source,
    })?;
    let (payload, expect) = payload(&img, bzimage)?;
    if le32(payload, 0) != Some(LZ4_LEGACY_MAGIC) {
        return Ok(None);
    }
    struct Scatter {
        entry: u64,
        loads: Vec<Segment>,
        notes: Vec<(Segment, Vec<u8>)>,
    }
    let mut elf: Option<Scatter> = None;
    let copy = |seg: &Segment, at: u64, block: &[u8]| -> Option<(usize, usize, u64)> {
        let end = at + block.len() as u64;
        let lo = seg.offset.max(at);
        let hi = (seg.offset + seg.filesz).min(end);
        (lo < hi).then(|| ((lo - at) as usize, (hi - at) as usize, lo - seg.offset))
    };
    let total = lz4_legacy_each(payload, |at, block| -> Result<(), String> {
        if elf.is_none() {
            let (entry, loads, notes) = elf_segments(block)?;
            if let Some(low) = loads.iter().find(|s| s.paddr < HIGH_MEMORY_START) {
                return Err(format!(
                    "segment at {:#x} lies below 1 MiB, where the boot data goes",
                    low.paddr
                ));
            }
            let notes = notes
                .into_iter()
                .map(|n| (n, Vec::with_capacity(n.filesz.min(1 << 20) as usize)))
                .collect();
            elf = Some(Scatter {
                entry,
                loads,
                notes,
            });
        }
        let Some(elf) = elf.as_mut() else {
            return Err("no elf header".into());
        };
        for seg in &elf.loads {
            if let Some((a, b, into)) = copy(seg, at, block) {
                mem.write_slice(&block[a..b], GuestAddress(seg.paddr + into))
                    .map_err(|_| {
                        format!(
                            "segment at {:#x} ({} bytes) lies outside guest memory",
                            seg.paddr, seg.memsz
                        )
                    })?;
            }
        }
        for (seg, buf) in &mut elf.notes {
            if let Some((a, b, _)) = copy(seg, at, block) {
                if buf.len() < 1 << 20 {
                    buf.extend_from_slice(&block[a..b]);
                }
            }
        }
        Ok(())
    })
    .map_err(|e| match e {
        StreamError::Lz4(e) => bad(
            bzimage,
            format!("payload is not lz4 this loader reads: {e}"),
        ),
        StreamError::Sink(e) => bad(bzimage, e),
    })?;
    let elf = elf.ok_or_else(|| bad(bzimage, "empty payload"))?;
    if total != expect {
        return Err(bad(
            bzimage,
            format!("decompressed payload is {total} bytes, header says {expect}"),
        ));
    }
    if let Some(seg) = elf.loads.iter().find(|s| s.offset + s.filesz > total) {
        return Err(bad(
            bzimage,
            format!("payload ends inside the segment at {:#x}", seg.paddr),
        ));
    }
    Ok(Some(PayloadLoad {
        entry: elf.entry,
        pvh_entry: elf.notes.iter().find_map(|(_, b)| pvh_entry(b)),
        kernel_end: elf
            .loads
            .iter()
            .map(|s| s.paddr.saturating_add(s.memsz))
            .max()
            .unwrap_or(0),
    }))
}

/// The vmlinux for `bzimage`, extracted once into `cache_dir` (keyed by the
/// kernel's name, size and mtime) and reused afterwards.
pub fn cached(bzimage: &Path, cache_dir: &Path) -> Result<PathBuf, VmmError> {
    let meta = fs::metadata(bzimage).map_err(|source| VmmError::Io {
        path: bzimage.to_path_buf(),
        source,
    })?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let name = bzimage
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("kernel");
    let out = cache_dir.join(format!("{name}-{}-{mtime}.vmlinux", meta.len()));
    if out.is_file() {
        return Ok(out);
    }
    let elf = extract(bzimage)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmmError::Io { path, source }
    };
    fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, elf).map_err(io(&tmp))?;
    fs::rename(&tmp, &out).map_err(io(&out))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lz4_blocks_with_literals_matches_and_overlaps_decode() {
        // "abcabcabcabcX": literals "abc", then a match of 9 at offset 3
        // (overlapping), then the last literal "X".
        let block = [0x35, b'a', b'b', b'c', 3, 0, 0x10, b'X'];
        let mut out = Vec::new();
        lz4_block(&block, &mut out).unwrap();
        assert_eq!(out, b"abcabcabcabcX");
        let mut out = Vec::new();
        assert!(
            lz4_block(&[0x05, 9, 0], &mut out).is_err(),
            "offset before the start"
        );
    }

    #[test]
    fn the_pvh_entry_is_read_from_the_xen_note_among_others() {
        let note = |name: &[u8], kind: u32, desc: &[u8]| {
            let mut n = Vec::new();
            n.extend_from_slice(&(name.len() as u32).to_le_bytes());
            n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            n.extend_from_slice(&kind.to_le_bytes());
            n.extend_from_slice(name);
            n.resize(n.len().div_ceil(4) * 4, 0);
            n.extend_from_slice(desc);
            n.resize(n.len().div_ceil(4) * 4, 0);
            n
        };
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(b"Xen\0", 6, b"linux\0"));
        assert_eq!(pvh_entry(&notes), None);
        notes.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0100_0abcu32.to_le_bytes(),
        ));
        assert_eq!(pvh_entry(&notes), Some(0x0100_0abc));
        // Truncated notes end the search instead of reading past the end.
        assert_eq!(pvh_entry(&notes[..notes.len() - 2]), None);
    }

    #[test]
    fn a_payload_that_is_not_an_x86_64_elf_is_refused_with_a_reason() {
        assert!(elf_segments(b"MZ not an elf").is_err());
        let mut head = vec![0u8; 64];
        head[..6].copy_from_slice(b"\x7fELF\x02\x01");
        head[18] = 40; // EM_ARM
        assert_eq!(
            elf_segments(&head).unwrap_err(),
            "the payload is not an x86-64 elf"
        );
        head[18] = 62;
        head[54] = 56; // phentsize
        head[56] = 1; // one program header, beyond the data
        head[32] = 64; // phoff
        assert!(elf_segments(&head).unwrap_err().contains("outside"));
    }

    #[test]
    fn a_bzimage_whose_payload_is_not_lz4_is_left_to_decompress_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinuz-gzip");
        let mut img = vec![0u8; 0x1000];
        img[0x1f1] = 1; // one setup sector: the payload area starts at 1 KiB
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes()); // payload offset
        img[0x24c..0x250].copy_from_slice(&64u32.to_le_bytes()); // payload length
        img[0x410..0x412].copy_from_slice(&[0x1f, 0x8b]); // gzip magic
        std::fs::write(&path, &img).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        assert_eq!(load_payload(&mem, &path).unwrap(), None);
    }

    #[test]
    fn debian_bzimage_yields_its_elf_vmlinux() {
        let kernel = match crate::boot::default_kernel() {
            Ok(k) => k,
            Err(e) if std::env::var_os("CI").is_some() => panic!("CI runs scripts/setup: {e}"),
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let path = cached(&kernel, dir.path()).unwrap();
        let elf = fs::read(&path).unwrap();
        assert!(elf.starts_with(b"\x7fELF\x02"), "64-bit ELF");
        assert!(elf.len() > fs::metadata(&kernel).unwrap().len() as usize);
        assert_eq!(cached(&kernel, dir.path()).unwrap(), path, "reused");
    }
}
