//! One `writev` or `readv` straight on guest memory: a frame the guest
//! queued as a chain of descriptors leaves in a single system call over
//! the guest's own buffers, and a frame for the guest lands in its receive
//! buffers the same way, with no copy through a VMM buffer. Under nested
//! virtualisation every byte the VMM copies is emulated work, so a 64 KiB
//! TSO frame copied once more cost as much as the tap's own copy.
#![allow(unsafe_code)] // one writev and one readv over guest memory; see the SAFETY notes

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The most guest buffers one frame may span here. Linux sends a frame as
/// at most 2 + MAX_SKB_FRAGS (17) buffers; a longer chain is refused
/// rather than read in pieces.
pub const MAX_IOVECS: usize = 64;

type Iovecs = ([libc::iovec; MAX_IOVECS], usize);

/// The iovecs of the guest buffers `parts`, in order: a buffer outside
/// guest memory, or more than [`MAX_IOVECS`] pieces, is `InvalidInput`.
fn guest_iovecs(mem: &GuestMemoryMmap, parts: &[(GuestAddress, usize)]) -> io::Result<Iovecs> {
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut iov = [empty; MAX_IOVECS];
    let mut n = 0;
    for &(addr, len) in parts {
        // A buffer may straddle two memory regions: one iovec per piece.
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let slice = slice.map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("guest buffer at {:#x}: {e}", addr.0),
                )
            })?;
            let Some(v) = iov.get_mut(n) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("frame spans more than {MAX_IOVECS} guest buffers"),
                ));
            };
            *v = libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                iov_len: slice.len(),
            };
            n += 1;
        }
    }
    Ok((iov, n))
}

/// Writes the guest buffers `parts` (address, length), in order, as one
/// `writev` to `fd`, and returns how many bytes it took.
pub fn writev_guest(
    fd: BorrowedFd<'_>,
    mem: &GuestMemoryMmap,
    parts: &[(GuestAddress, usize)],
) -> io::Result<usize> {
    let (iov, n) = guest_iovecs(mem, parts)?;
    // SAFETY: every iovec points into a mapping of `mem`, which the borrow
    // keeps mapped until writev returns, and covers only the slice
    // vm-memory checked to lie inside it. writev only reads through them;
    // the guest may change the bytes meanwhile, as a DMA-reading NIC
    // allows, which makes the frame garbage, never the VMM unsound.
    let r = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Reads one `readv` from `fd` into the guest buffers `parts`, in order,
/// and returns how many bytes it gave.
pub fn readv_guest(
    fd: BorrowedFd<'_>,
    mem: &GuestMemoryMmap,
    parts: &[(GuestAddress, usize)],
) -> io::Result<usize> {
    let (iov, n) = guest_iovecs(mem, parts)?;
    // SAFETY: as for writev_guest, every iovec lies inside a mapping of
    // `mem` that stays mapped until readv returns. The kernel writes into
    // guest memory only, which no Rust reference in the VMM covers (all
    // access to it goes through vm-memory's volatile copies).
    let r = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;
    use vm_memory::Bytes;

    #[test]
    fn buffers_in_two_memory_regions_leave_as_one_datagram_in_order() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        mem.write_slice(b"abc", GuestAddress(0x0ffe)).unwrap();
        mem.write_slice(b"xyz", GuestAddress(0x1800)).unwrap();
        let (a, b) = UnixDatagram::pair().unwrap();
        let n = writev_guest(
            a.as_fd(),
            &mem,
            &[(GuestAddress(0x0ffe), 3), (GuestAddress(0x1800), 3)],
        )
        .unwrap();
        assert_eq!(n, 6);
        let mut got = [0u8; 16];
        let m = b.recv(&mut got).unwrap();
        assert_eq!(&got[..m], b"abcxyz");
    }

    #[test]
    fn one_datagram_is_read_across_buffers_in_two_memory_regions() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let (a, b) = UnixDatagram::pair().unwrap();
        b.send(b"abcdefgh").unwrap();
        let parts = [(GuestAddress(0x0ffd), 5), (GuestAddress(0x1800), 16)];
        assert_eq!(readv_guest(a.as_fd(), &mem, &parts).unwrap(), 8);
        let mut got = [0u8; 5];
        mem.read_slice(&mut got, GuestAddress(0x0ffd)).unwrap();
        assert_eq!(&got, b"abcde");
        let mut got = [0u8; 3];
        mem.read_slice(&mut got, GuestAddress(0x1800)).unwrap();
        assert_eq!(&got, b"fgh");
    }

    #[test]
    fn a_buffer_outside_guest_memory_or_too_many_pieces_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let (a, _b) = UnixDatagram::pair().unwrap();
        let e = writev_guest(a.as_fd(), &mem, &[(GuestAddress(0x0f00), 0x200)]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let many = vec![(GuestAddress(0), 1); MAX_IOVECS + 1];
        let e = writev_guest(a.as_fd(), &mem, &many).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
