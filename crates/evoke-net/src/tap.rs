//! Persistent tap devices for microVM pods: created in the node's namespace
//! through /dev/net/tun, then attached to the bridge like a veth. The VMM
//! opens the tap by name for its virtio-net device.
#![allow(unsafe_code)] // two ioctls on /dev/net/tun; each block has a SAFETY note

use std::os::fd::AsRawFd;
use std::path::Path;

use crate::NetError;

nix::ioctl_write_ptr_bad!(tun_set_iff, 0x4004_54ca, libc::ifreq);
nix::ioctl_write_int_bad!(tun_set_persist, 0x4004_54cb);

fn ifreq(name: &str) -> Result<libc::ifreq, NetError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(NetError::BadInput(format!("interface name {name:?}")));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    Ok(req)
}

/// Creates (or keeps) the persistent tap `name` in the current thread's
/// network namespace. Run it through `netns::run_in` for another one.
pub(crate) fn create_persistent(name: &str) -> Result<(), NetError> {
    let req = ifreq(name)?;
    let dev = Path::new("/dev/net/tun");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| NetError::io(dev, e))?;
    let fail = |op: &str, e: nix::Error| {
        NetError::netlink("create tap", name.to_string(), format!("{op}: {e}"))
    };
    // SAFETY: the fd is open on /dev/net/tun and `req` a valid ifreq that
    // outlives the call.
    unsafe { tun_set_iff(file.as_raw_fd(), &req) }.map_err(|e| fail("TUNSETIFF", e))?;
    // SAFETY: the fd is a tun fd attached to `name`; the argument is a flag.
    unsafe { tun_set_persist(file.as_raw_fd(), 1) }.map_err(|e| fail("TUNSETPERSIST", e))?;
    Ok(())
}
