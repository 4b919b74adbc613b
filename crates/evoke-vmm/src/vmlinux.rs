//! Extracting the uncompressed ELF vmlinux from a bzImage, so the VMM can
//! enter it through PVH and skip the guest-side self-decompression.
//!
//! Debian compresses its kernels with LZ4 in the legacy frame format (a
//! magic number, then blocks of `u32` size + LZ4 block data), followed by the
//! 4-byte uncompressed size the kernel build appends. The setup header's
//! `payload_offset`/`payload_length` say where that stream is. Other
//! compressions are reported as unsupported; callers then boot the bzImage.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::VmmError;

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

/// Decompresses a legacy-format LZ4 stream, stopping at the kernel's
/// trailing size field; returns the data.
pub fn lz4_legacy(src: &[u8]) -> Result<Vec<u8>, &'static str> {
    if le32(src, 0) != Some(LZ4_LEGACY_MAGIC) {
        return Err("not an lz4 legacy stream");
    }
    let mut out = Vec::new();
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
        let before = out.len();
        lz4_block(block, &mut out)?;
        if out.len() - before > LZ4_LEGACY_BLOCK_MAX {
            return Err("lz4 block larger than 8 MiB");
        }
        i += 4 + size;
    }
    Ok(out)
}

/// Extracts the ELF vmlinux from `bzimage`.
pub fn extract(bzimage: &Path) -> Result<Vec<u8>, VmmError> {
    let img = fs::read(bzimage).map_err(|source| VmmError::Io {
        path: bzimage.to_path_buf(),
        source,
    })?;
    if le32(&img, 0x202) != Some(0x5372_6448) {
        return Err(bad(bzimage, "not a bzimage (no HdrS header)"));
    }
    let setup_sects = match img.get(0x1f1) {
        Some(0) | None => 4,
        Some(n) => usize::from(*n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let off = le32(&img, 0x248).ok_or_else(|| bad(bzimage, "no payload offset"))? as usize;
    let len = le32(&img, 0x24c).ok_or_else(|| bad(bzimage, "no payload length"))? as usize;
    let payload = img
        .get(pm_start + off..pm_start + off + len)
        .ok_or_else(|| bad(bzimage, "payload outside the file"))?;
    let expect = le32(payload, len.saturating_sub(4)).unwrap_or(0) as usize;
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
