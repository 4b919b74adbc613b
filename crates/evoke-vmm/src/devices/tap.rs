//! The host end of a virtio-net device: an existing tap interface opened
//! through `/dev/net/tun`.
//!
//! The tap is opened with `IFF_VNET_HDR` and a 12-byte header
//! (`TUNSETVNETHDRSZ`), the size of a virtio 1.0 `virtio_net_hdr`, so frames
//! pass between the guest's queues and the tap unchanged, header included.
//! Offloads start off (`TUNSETOFFLOAD 0`): the host stack then hands the tap
//! only complete, checksummed frames, which any guest can take. Once the
//! guest driver has accepted checksum and TSO offloads the device widens
//! them ([`NetBackend::set_offload`]), so the host can pass 64 KiB TCP
//! segments instead of MTU-sized frames. The fd is non-blocking: a full tap drops
//! a transmitted frame (as a NIC would) instead of stalling a vCPU.
#![allow(unsafe_code)] // three ioctls on /dev/net/tun; each block has a SAFETY note

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::iov;
use crate::error::VmmError;

nix::ioctl_write_ptr_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_write_ptr_bad!(tun_set_vnet_hdr_sz, libc::TUNSETVNETHDRSZ, libc::c_int);
nix::ioctl_write_int_bad!(tun_set_offload, libc::TUNSETOFFLOAD);

/// Bytes of `virtio_net_hdr` in front of every frame (virtio 1.0 layout,
/// with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Where a virtio-net device sends and receives frames (each one with its
/// [`VNET_HDR_LEN`]-byte header). Implemented by [`Tap`], and by a datagram
/// socket in tests.
pub trait NetBackend: Send {
    /// Sends one frame; `WouldBlock` when the backend is full.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Sends one frame made of the guest buffers `parts`, in order. This
    /// default gathers them into `scratch` and calls [`NetBackend::send`];
    /// fd-backed backends write them straight from guest memory
    /// ([`super::iov::writev_guest`]).
    fn send_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        parts: &[(GuestAddress, usize)],
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        scratch.clear();
        for &(addr, len) in parts {
            let start = scratch.len();
            scratch.resize(start + len, 0);
            mem.read_slice(&mut scratch[start..], addr)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        }
        self.send(scratch)
    }
    /// Receives one frame into `buf`; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Receives one frame into the guest buffers `parts`, in order, and
    /// returns its length. This default receives into `scratch` and copies;
    /// fd-backed backends read straight into guest memory
    /// ([`super::iov::readv_guest`]). A frame longer than the buffers is
    /// truncated, so callers offer buffers that take the largest frame.
    fn recv_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        parts: &[(GuestAddress, usize)],
        scratch: &mut Vec<u8>,
    ) -> io::Result<usize> {
        let cap: usize = parts.iter().map(|p| p.1).sum();
        scratch.resize(cap, 0);
        let n = self.recv(scratch)?;
        let mut at = 0;
        for &(addr, len) in parts {
            let k = len.min(n - at);
            if k == 0 {
                break;
            }
            mem.write_slice(&scratch[at..at + k], addr)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            at += k;
        }
        Ok(n)
    }
    /// The fd to poll for readability.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Which offloaded frames the backend may hand over (`TUN_F_*`: partial
    /// checksums, TSO): what the guest driver accepted.
    fn set_offload(&mut self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the existing tap `name` in this process's network namespace.
    /// The tap must already exist (the pod network or `ip tuntap` made it),
    /// so a typo cannot silently create a tap nothing is connected to.
    pub fn open(name: &str) -> Result<Tap, VmmError> {
        let fail = |what: &str, e: io::Error| VmmError::Tap {
            name: name.to_string(),
            reason: format!("{what}: {e}"),
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(fail(
                "bad name",
                io::Error::from(io::ErrorKind::InvalidInput),
            ));
        }
        if nix::net::if_::if_nametoindex(name).is_err() {
            return Err(VmmError::Tap {
                name: name.to_string(),
                reason: "no such interface in this network namespace (create it first, e.g. ip tuntap add NAME mode tap)".into(),
            });
        }
        let dev = Path::new("/dev/net/tun");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(dev)
            .map_err(|e| fail("open /dev/net/tun", e))?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        let raw = file.as_raw_fd();
        // SAFETY: `raw` is an open /dev/net/tun fd and `req` a valid ifreq
        // that outlives the call.
        unsafe { tun_set_iff(raw, &req) }.map_err(|e| fail("TUNSETIFF", e.into()))?;
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: the fd is attached to a tap; the argument points to an int
        // that outlives the call.
        unsafe { tun_set_vnet_hdr_sz(raw, &hdr) }.map_err(|e| fail("TUNSETVNETHDRSZ", e.into()))?;
        // SAFETY: the fd is attached to a tap; the argument is a flag word.
        unsafe { tun_set_offload(raw, 0) }.map_err(|e| fail("TUNSETOFFLOAD", e.into()))?;
        tracing::debug!(tap = name, "tap opened");
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // A tap takes a whole frame per write, or none of it.
        self.file.write(frame).map(|_| ())
    }

    fn send_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        parts: &[(GuestAddress, usize)],
        _scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        iov::writev_guest(self.file.as_fd(), mem, parts).map(|_| ())
    }

    fn recv_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        parts: &[(GuestAddress, usize)],
        _scratch: &mut Vec<u8>,
    ) -> io::Result<usize> {
        iov::readv_guest(self.file.as_fd(), mem, parts)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()> {
        // SAFETY: the fd is attached to a tap; the argument is a flag word.
        unsafe { tun_set_offload(self.file.as_raw_fd(), tun_flags as libc::c_int) }
            .map(|_| ())
            .map_err(io::Error::from)
    }
}

impl NetBackend for std::os::unix::net::UnixDatagram {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        std::os::unix::net::UnixDatagram::send(self, frame).map(|_| ())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        std::os::unix::net::UnixDatagram::recv(self, buf)
    }

    fn send_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        parts: &[(GuestAddress, usize)],
        _scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        // A connected datagram socket takes a writev as one datagram.
        iov::writev_guest(self.as_fd(), mem, parts).map(|_| ())
    }

    fn recv_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        parts: &[(GuestAddress, usize)],
        _scratch: &mut Vec<u8>,
    ) -> io::Result<usize> {
        iov::readv_guest(self.as_fd(), mem, parts)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tap_is_an_error_that_names_it() {
        let err = Tap::open("evk-no-such0").unwrap_err().to_string();
        assert!(err.contains("evk-no-such0"), "{err}");
        assert!(err.contains("no such interface"), "{err}");
        let err = Tap::open("").unwrap_err().to_string();
        assert!(err.contains("bad name"), "{err}");
    }

    /// Opens a tap made by `ip tuntap` in a fresh network namespace, sends
    /// a frame out through it, once from a buffer and once gathered from
    /// guest memory, and sees the interface count both.
    #[test]
    fn an_existing_tap_opens_with_a_vnet_header_and_carries_frames() {
        if !nix::unistd::geteuid().is_root() || !Path::new("/dev/net/tun").exists() {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "this test needs root and /dev/net/tun under CI"
            );
            eprintln!("skipped: needs root and /dev/net/tun");
            return;
        }
        let t = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            let ip = |args: &[&str]| {
                let st = std::process::Command::new("ip").args(args).status();
                assert!(st.is_ok_and(|s| s.success()), "ip {args:?}");
            };
            ip(&["tuntap", "add", "dev", "vtap0", "mode", "tap", "vnet_hdr"]);
            ip(&["link", "set", "vtap0", "up"]);
            let mut tap = Tap::open("vtap0").unwrap();
            assert_eq!(tap.name(), "vtap0");
            // Reads do not block: once the frames the kernel itself may
            // already have sent on the fresh link (IPv6 router solicitation,
            // MLD; more likely on a slow, busy machine) are read, the tap
            // says WouldBlock.
            let mut buf = [0u8; 2048];
            let mut kernel_frames = 0;
            let idle = loop {
                match tap.recv(&mut buf) {
                    Ok(_) if kernel_frames < 64 => kernel_frames += 1,
                    Ok(_) => panic!("the tap never ran dry"),
                    Err(e) => break e,
                }
            };
            assert_eq!(idle.kind(), io::ErrorKind::WouldBlock);
            // A broadcast ARP request, as the guest would send it.
            let mut frame = vec![0u8; VNET_HDR_LEN];
            frame.extend_from_slice(&[0xff; 6]);
            frame.extend_from_slice(&[0x02, 0x65, 10, 0, 0, 2]);
            frame.extend_from_slice(&[0x08, 0x06]);
            frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
            frame.extend_from_slice(&[0x02, 0x65, 10, 0, 0, 2, 10, 0, 0, 2]);
            frame.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 1]);
            tap.send(&frame).unwrap();
            // The same frame again, written from "guest memory" in two
            // pieces: one writev, one more frame on the interface.
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
            mem.write_slice(&frame[..20], GuestAddress(0x100)).unwrap();
            mem.write_slice(&frame[20..], GuestAddress(0x1000)).unwrap();
            let parts = [
                (GuestAddress(0x100), 20),
                (GuestAddress(0x1000), frame.len() - 20),
            ];
            tap.send_guest(&mem, &parts, &mut Vec::new()).unwrap();
            // sysfs shows the namespace it was mounted in; ask ip instead.
            let out = std::process::Command::new("ip")
                .args(["-s", "link", "show", "vtap0"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        });
        let stats = t.join().expect("netns thread");
        // `ip -s link` prints the RX counters on the line after "RX:".
        let rx_line = stats
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("RX:"))
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let packets: u64 = rx_line
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        assert_eq!(packets, 2, "{stats}");
    }
}
