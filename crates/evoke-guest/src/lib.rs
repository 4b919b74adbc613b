//! The microVM guest side of evoke, and what the host needs to talk to it.
//!
//! * [`spec`]: the [`GuestSpec`] the host writes into the initramfs at
//!   [`spec::SPEC_PATH`]: the resolved command, environment, working directory,
//!   user, agent channel and how to shut down.
//! * [`net`]: the guest's network (lo, and eth0 on a virtio-net when the
//!   spec has a [`net::NetConfig`]).
//! * [`proto`]: the framed protocol on the agent channel (guest → host: ready,
//!   stdout, stderr, exit, error; host → guest: signal, stdin), with exec
//!   sessions multiplexed on it (start, stdin, resize, signal, output, exit)
//!   under a flow-control window per session. The guest side of exec is
//!   `src/exec.rs`, the host side `evoke_vmm::agent_mux`.
//! * [`initramfs`]: builds the guest's initramfs (a newc cpio, see [`cpio`])
//!   from the agent binary, the guest kernel's modules, an image rootfs and a
//!   spec; the agent+modules part is cached by content.
//! * The binary (`src/main.rs`, built static by `tests/vmhost/build-guest`) is
//!   the guest's `/init` and agent when run as PID 1, and a small host tool
//!   otherwise (`evoke-guest mkinitramfs`, `evoke-guest attach`).
//!
//! Start reading at [`initramfs::InitramfsBuilder`] (host side) or
//! `src/agent.rs` (guest side).
//!
//! Guest kernel facts that shape this (Debian's linux-image-cloud-amd64,
//! 6.1): virtio, virtio_mmio and virtio_console are modules, and
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` is off, so virtio-mmio devices must be
//! described to the guest by ACPI (DSDT, `LNRO0005`) as QEMU's microvm does;
//! `virtio_mmio.device=` on the command line is ignored. A second 8250 UART
//! (ttyS1 at 0x2f8) is found without any tables, which is why
//! [`spec::Channel::Serial`] exists.

pub mod cpio;
pub mod initramfs;
pub mod net;
pub mod proto;
pub mod spec;

pub use initramfs::{Initramfs, InitramfsBuilder, InitramfsError, Rootfs};
pub use proto::{Frame, ProtoError};
pub use spec::{Channel, GuestSpec, Shutdown};
