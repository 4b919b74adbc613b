//! The guest's network: `lo` up always, and, when the host gave the VM a
//! virtio-net device, `eth0` with the pod's address, a default route and a
//! resolv.conf for the workload.
//!
//! The settings travel in the [`crate::GuestSpec`] (field `network`); the
//! host picks the device's MAC with [`mac_for`], so the guest needs nothing
//! but the interface name. Configuration uses the classic `SIOCSIF*` and
//! `SIOCADDRT` ioctls on a datagram socket: a handful of syscalls, no netlink
//! message building, nothing to add to a static init. The functions act on
//! the calling thread's network namespace, so host tests run them inside a
//! namespace they create.
#![allow(unsafe_code)] // ioctls on an AF_INET socket; each block has a SAFETY note

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The guest's network interface as the host describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The interface the virtio-net device appears as.
    #[serde(default = "default_interface")]
    pub interface: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// Written to the workload's `/etc/resolv.conf` when set.
    #[serde(default)]
    pub resolv_conf: Option<String>,
}

fn default_interface() -> String {
    "eth0".into()
}

/// Why the network could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network interface {0} did not appear within {1:?} (is virtio_net loaded and a virtio-net device described to the guest?)")]
    NoInterface(String, Duration),
    #[error("{op} on {interface}: {source}")]
    Ioctl {
        op: &'static str,
        interface: String,
        source: io::Error,
    },
    #[error("bad network config: {0}")]
    Config(String),
    #[error("write {path}: {source}")]
    Write { path: String, source: io::Error },
}

/// A locally administered unicast MAC derived from the guest address, so
/// host and guest agree on it without passing it around, and neighbours see
/// a stable MAC for a given pod IP.
pub fn mac_for(address: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = address.octets();
    [0x02, 0x65, a, b, c, d]
}

/// The netmask for a prefix length (0..=32).
pub fn netmask(prefix_len: u8) -> Result<Ipv4Addr, NetError> {
    if prefix_len > 32 {
        return Err(NetError::Config(format!(
            "prefix length {prefix_len} over 32"
        )));
    }
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    Ok(Ipv4Addr::from(bits))
}

/// `struct rtentry` as the kernel reads it for SIOCADDRT
/// (include/uapi/linux/route.h); the libc crate has it only for musl.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

const RTF_UP: libc::c_ushort = 0x0001;
const RTF_GATEWAY: libc::c_ushort = 0x0002;

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain-data structs;
    // the kernel reads a sockaddr as a sockaddr_in when the family says so.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ptr<T>(v: &mut T) -> *mut libc::c_void {
    (v as *mut T).cast()
}

/// A datagram socket to issue interface ioctls on.
struct Ctl {
    fd: OwnedFd,
}

impl Ctl {
    fn new() -> io::Result<Ctl> {
        // SAFETY: plain socket(2); the result is checked and owned at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Ctl {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ifreq(name: &str) -> Result<libc::ifreq, NetError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(NetError::Config(format!("interface name {name:?}")));
        }
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        Ok(req)
    }

    fn ioctl(
        &self,
        op: &'static str,
        interface: &str,
        request: libc::c_ulong,
        arg: *mut libc::c_void,
    ) -> Result<(), NetError> {
        // SAFETY: `arg` points to a live, correctly sized struct for
        // `request` (ifreq or rtentry), owned by the caller for the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), request, arg) };
        if rc < 0 {
            return Err(NetError::Ioctl {
                op,
                interface: interface.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn set_up(&self, name: &str) -> Result<(), NetError> {
        let mut req = Self::ifreq(name)?;
        self.ioctl("SIOCGIFFLAGS", name, libc::SIOCGIFFLAGS, ptr(&mut req))?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ioctl("SIOCSIFFLAGS", name, libc::SIOCSIFFLAGS, ptr(&mut req))
    }

    fn set_addr(
        &self,
        name: &str,
        op: &'static str,
        request: libc::c_ulong,
        ip: Ipv4Addr,
    ) -> Result<(), NetError> {
        let mut req = Self::ifreq(name)?;
        req.ifr_ifru.ifru_addr = sockaddr_in(ip);
        self.ioctl(op, name, request, ptr(&mut req))
    }

    fn add_default_route(&self, name: &str, gateway: Ipv4Addr) -> Result<(), NetError> {
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_in(gateway),
            rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_flags: RTF_UP | RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        match self.ioctl("SIOCADDRT", name, libc::SIOCADDRT, ptr(&mut rt)) {
            Err(NetError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            other => other,
        }
    }
}

/// Brings `lo` up: workloads expect 127.0.0.1 to work.
pub fn bring_up_loopback() -> Result<(), NetError> {
    let ctl = Ctl::new().map_err(|source| NetError::Ioctl {
        op: "socket",
        interface: "lo".into(),
        source,
    })?;
    ctl.set_up("lo")
}

/// Waits up to `patience` for the interface, then gives it the address,
/// brings it up and adds the default route. Idempotent.
pub fn configure(cfg: &NetConfig, patience: Duration) -> Result<(), NetError> {
    let mask = netmask(cfg.prefix_len)?;
    let name = cfg.interface.as_str();
    Ctl::ifreq(name)?;
    // The device registers while virtio_net probes, normally inside the
    // module load; the index lookup asks the namespace itself (sysfs shows
    // the namespace it was mounted in).
    let start = Instant::now();
    while nix::net::if_::if_nametoindex(name).is_err() {
        if start.elapsed() > patience {
            return Err(NetError::NoInterface(name.to_string(), patience));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let ctl = Ctl::new().map_err(|source| NetError::Ioctl {
        op: "socket",
        interface: name.to_string(),
        source,
    })?;
    ctl.set_addr(name, "SIOCSIFADDR", libc::SIOCSIFADDR, cfg.address)?;
    ctl.set_addr(name, "SIOCSIFNETMASK", libc::SIOCSIFNETMASK, mask)?;
    ctl.set_up(name)?;
    if let Some(gw) = cfg.gateway {
        ctl.add_default_route(name, gw)?;
    }
    Ok(())
}

/// Writes `cfg.resolv_conf` (if any) to `<root>/etc/resolv.conf`.
pub fn write_resolv_conf(cfg: &NetConfig, root: &Path) -> Result<(), NetError> {
    let Some(text) = &cfg.resolv_conf else {
        return Ok(());
    };
    let etc = root.join("etc");
    let path = etc.join("resolv.conf");
    let werr = |source| NetError::Write {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&etc).map_err(werr)?;
    // A symlink (to systemd-resolved's file, say) would point outside the
    // guest's view; replace it with the file.
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, text).map_err(|source| NetError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks_follow_the_prefix_length() {
        assert_eq!(netmask(24).unwrap(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32).unwrap(), Ipv4Addr::BROADCAST);
        assert_eq!(netmask(0).unwrap(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(30).unwrap(), Ipv4Addr::new(255, 255, 255, 252));
        assert!(netmask(33).is_err());
    }

    #[test]
    fn the_mac_is_locally_administered_unicast_and_carries_the_address() {
        let mac = mac_for(Ipv4Addr::new(10, 42, 0, 7));
        assert_eq!(mac[0] & 1, 0, "unicast");
        assert_eq!(mac[0] & 2, 2, "locally administered");
        assert_eq!(&mac[2..], &[10, 42, 0, 7]);
    }

    #[test]
    fn net_config_defaults_the_interface_to_eth0() {
        let c: NetConfig =
            serde_json::from_str(r#"{"address":"10.0.0.2","prefix_len":24}"#).unwrap();
        assert_eq!(c.interface, "eth0");
        assert_eq!(c.gateway, None);
    }

    #[test]
    fn resolv_conf_replaces_a_symlink_in_the_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/nowhere", dir.path().join("etc/resolv.conf")).unwrap();
        let cfg = NetConfig {
            interface: "eth0".into(),
            address: Ipv4Addr::new(10, 0, 0, 2),
            prefix_len: 24,
            gateway: None,
            resolv_conf: Some("nameserver 10.43.0.10\n".into()),
        };
        write_resolv_conf(&cfg, dir.path()).unwrap();
        let p = dir.path().join("etc/resolv.conf");
        assert!(!p.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(
            std::fs::read_to_string(p).unwrap(),
            "nameserver 10.43.0.10\n"
        );
    }

    /// Runs `f` on a thread inside a fresh network namespace (root only).
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "this test needs root (unshare of a network namespace) under CI"
            );
            eprintln!("skipped: needs root");
            return None;
        }
        let t = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            f()
        });
        Some(t.join().expect("netns thread"))
    }

    #[test]
    fn an_interface_gets_its_address_route_and_comes_up() {
        let res = in_new_netns(|| {
            bring_up_loopback().unwrap();
            let lo_ok = {
                let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                a.send_to(b"ping", a.local_addr().unwrap()).is_ok()
            };
            // A veth end stands in for eth0; the child `ip` runs in
            // this thread's namespace.
            let made = std::process::Command::new("ip")
                .args([
                    "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
                ])
                .status()
                .is_ok_and(|s| s.success());
            assert!(made, "ip link add (iproute2) failed");
            std::process::Command::new("ip")
                .args(["link", "set", "peer0", "up"])
                .status()
                .unwrap();
            let cfg = NetConfig {
                interface: "eth0".into(),
                address: Ipv4Addr::new(10, 9, 0, 2),
                prefix_len: 24,
                gateway: Some(Ipv4Addr::new(10, 9, 0, 1)),
                resolv_conf: None,
            };
            configure(&cfg, Duration::from_millis(100)).unwrap();
            // Idempotent: a second run changes nothing and does not fail.
            configure(&cfg, Duration::from_millis(100)).unwrap();
            let show = |args: &[&str]| {
                let out = std::process::Command::new("ip")
                    .args(args)
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            let addr = show(&["-4", "addr", "show", "dev", "eth0"]);
            let route = show(&["-4", "route"]);
            let missing = NetConfig {
                interface: "eth9".into(),
                ..cfg
            };
            let err = configure(&missing, Duration::from_millis(10)).unwrap_err();
            (lo_ok, addr, route, err)
        });
        if let Some((lo_ok, addr, route, err)) = res {
            assert!(lo_ok, "loopback is not usable");
            assert!(addr.contains("inet 10.9.0.2/24"), "{addr}");
            assert!(addr.contains("UP"), "{addr}");
            assert!(route.contains("default via 10.9.0.1 dev eth0"), "{route}");
            assert!(matches!(err, NetError::NoInterface(..)), "{err}");
        }
    }
}
