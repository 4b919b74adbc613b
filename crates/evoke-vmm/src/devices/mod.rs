//! Device models: the 8250 serial ports, a minimal i8042, one virtio-mmio
//! transport (`mmio`) shared by a virtio-console ([`virtio`]) and a
//! virtio-net device ([`net`]) with its tap backend ([`tap`]), and the
//! bounded output sinks they write to. None of them needs a VM to be tested.

pub mod i8042;
mod iov;
mod mmio;
pub mod net;
mod notify;
pub mod serial;
pub mod sink;
pub mod tap;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line backed by an eventfd registered as a KVM irqfd (or read
/// by a test).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl EventFdTrigger {
    pub fn new() -> Result<Self, std::io::Error> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    pub fn try_clone(&self) -> Result<Self, std::io::Error> {
        Ok(Self(self.0.try_clone()?))
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}
