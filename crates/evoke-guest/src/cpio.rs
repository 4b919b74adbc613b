//! A streaming writer for the "newc" cpio format, the one the Linux kernel
//! unpacks as an initramfs (`init/initramfs.c`). Entries are written in the
//! order given; a directory must come before what it holds. Several finished
//! archives may be concatenated, and the kernel unpacks them in turn, which is
//! how [`crate::initramfs`] reuses cached parts.

use std::io::{self, Read, Write};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFIFO: u32 = 0o010000;

/// Metadata of one entry. `mode` holds the file type bits and permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    /// Device number for character and block devices.
    pub rdev_major: u32,
    pub rdev_minor: u32,
}

impl Meta {
    /// Owned by root, time 0: what the builder uses for its own files.
    pub fn root(mode: u32) -> Self {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            rdev_major: 0,
            rdev_minor: 0,
        }
    }
}

/// Writes entries to `W`; call [`CpioWriter::finish`] to add the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn header(&mut self, name: &str, meta: &Meta, size: u64) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let name = if name.is_empty() { "." } else { name };
        if name.as_bytes().contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry name {name:?} contains a NUL byte"),
            ));
        }
        let size32 = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cpio entry {name} is {size} bytes; newc holds at most 4 GiB per file"),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        let fields = [
            ino,
            meta.mode,
            meta.uid,
            meta.gid,
            1, // nlink: hard links are written as separate copies
            meta.mtime,
            size32,
            0, // devmajor
            0, // devminor
            meta.rdev_major,
            meta.rdev_minor,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut head = Vec::with_capacity(110 + name.len() + 4);
        head.extend_from_slice(MAGIC);
        for f in fields {
            head.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        head.extend_from_slice(name.as_bytes());
        head.push(0);
        while head.len() % 4 != 0 {
            head.push(0);
        }
        self.out.write_all(&head)?;
        self.written += head.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = ((4 - self.written % 4) % 4) as usize;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.written += pad as u64;
        Ok(())
    }

    pub fn dir(&mut self, name: &str, meta: &Meta) -> io::Result<()> {
        let meta = Meta {
            mode: S_IFDIR | (meta.mode & 0o7777),
            ..*meta
        };
        self.header(name, &meta, 0)
    }

    /// A regular file whose content is read from `data`, which must yield
    /// exactly `size` bytes.
    pub fn file_from(
        &mut self,
        name: &str,
        meta: &Meta,
        size: u64,
        data: &mut impl Read,
    ) -> io::Result<()> {
        let meta = Meta {
            mode: S_IFREG | (meta.mode & 0o7777),
            ..*meta
        };
        self.header(name, &meta, size)?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("cpio entry {name}: expected {size} bytes, read {copied} (file changed?)"),
            ));
        }
        self.written += size;
        self.pad()
    }

    pub fn file(&mut self, name: &str, meta: &Meta, data: &[u8]) -> io::Result<()> {
        self.file_from(name, meta, data.len() as u64, &mut &data[..])
    }

    pub fn symlink(&mut self, name: &str, meta: &Meta, target: &str) -> io::Result<()> {
        let meta = Meta {
            mode: S_IFLNK | 0o777,
            ..*meta
        };
        self.header(name, &meta, target.len() as u64)?;
        self.out.write_all(target.as_bytes())?;
        self.written += target.len() as u64;
        self.pad()
    }

    /// A character device, block device or FIFO (type bits in `meta.mode`).
    pub fn special(&mut self, name: &str, meta: &Meta) -> io::Result<()> {
        self.header(name, meta, 0)
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(TRAILER, &Meta::root(0), 0)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/etc", &Meta::root(0o755)).unwrap();
        w.file("etc/hostname", &Meta::root(0o644), b"vm\n").unwrap();
        w.symlink("/etc/link", &Meta::root(0), "hostname").unwrap();
        w.special(
            "/etc/console",
            &Meta {
                rdev_major: 5,
                rdev_minor: 1,
                ..Meta::root(S_IFCHR | 0o600)
            },
        )
        .unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn archive_is_aligned_and_ends_with_the_trailer() {
        let a = sample();
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        let tail = String::from_utf8_lossy(&a[a.len() - 16..]).into_owned();
        assert!(tail.contains("TRAILER!!!"), "{tail:?}");
    }

    #[test]
    fn gnu_cpio_lists_and_extracts_what_was_written() {
        if Command::new("cpio").arg("--version").output().is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "cpio is missing: run scripts/setup"
            );
            eprintln!("skipped: cpio (GNU) not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, sample()).unwrap();
        let out = Command::new("cpio")
            .args(["-t", "-v", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let listing = String::from_utf8_lossy(&out.stdout);
        for want in ["etc/hostname", "etc/link -> hostname", "crw-------"] {
            assert!(listing.contains(want), "missing {want:?} in:\n{listing}");
        }
        let dest = dir.path().join("x");
        std::fs::create_dir(&dest).unwrap();
        let st = Command::new("cpio")
            .args(["-i", "-d", "--quiet", "--no-absolute-filenames", "-F"])
            .arg(&archive)
            .arg("etc/hostname")
            .current_dir(&dest)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(std::fs::read(dest.join("etc/hostname")).unwrap(), b"vm\n");
    }

    #[test]
    fn short_reader_is_an_error() {
        let mut w = CpioWriter::new(Vec::new());
        let err = w
            .file_from("f", &Meta::root(0o644), 10, &mut &b"abc"[..])
            .unwrap_err();
        assert!(err.to_string().contains("expected 10 bytes"), "{err}");
    }
}
