//! An eventfd that serves both as a KVM ioeventfd (`KVM_IOEVENTFD` takes
//! vmm-sys-util's [`EventFd`]) and as something `poll` can wait on
//! ([`AsFd`]), so a device thread sleeps on the very fd the guest's queue
//! notify signals in the kernel.
#![allow(unsafe_code)] // one fd borrow; see the SAFETY note

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use vmm_sys_util::eventfd::EventFd;

/// A non-blocking, close-on-exec eventfd.
#[derive(Debug)]
pub struct NotifyFd(EventFd);

impl NotifyFd {
    pub fn new() -> io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?))
    }

    /// The eventfd, for `VmFd::register_ioevent`.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }

    /// Adds one to the counter; failing means it is saturated, and a
    /// waiter wakes anyway.
    pub fn signal(&self) {
        let _ = self.0.write(1);
    }

    /// Takes the counter: whether it was signalled since the last take.
    pub fn take(&self) -> bool {
        self.0.read().is_ok()
    }
}

impl AsFd for NotifyFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the EventFd owns this fd and closes it only when dropped,
        // which cannot happen while the returned borrow (tied to &self) lives.
        unsafe { BorrowedFd::borrow_raw(self.0.as_raw_fd()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_taken_once_and_wakes_a_poll_on_the_same_fd() {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let n = NotifyFd::new().unwrap();
        assert!(!n.take(), "a fresh fd is not signalled");
        n.signal();
        n.signal();
        let mut fds = [PollFd::new(n.as_fd(), PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::ZERO).unwrap(), 1);
        assert!(n.take());
        assert!(!n.take(), "two signals are taken at once");
        // The KVM side writes through the same EventFd.
        n.eventfd().write(1).unwrap();
        assert!(n.take());
    }
}
