//! evoke's KVM microVM monitor, built on the rust-vmm crates.
//!
//! Start reading at [`vm::VmConfig`] and [`vm::Vm::run`]: a config names the
//! kernel, initramfs, command line, memory, vCPUs and where the console and
//! the agent channel go; `run` creates the VM, loads the kernel
//! ([`boot`]), describes the machine ([`acpi`], the zero page), starts one
//! thread per vCPU ([`arch`] sets their registers) and dispatches port and
//! MMIO exits to the [`devices`] until the guest resets or powers off.
//! [`seccomp`] confines every VMM thread, [`cgroup`] the VMM process.
//! [`tier`] is the `microvm` WorkloadRuntime on top of all this.
//! [`kvm_check`] says early, in one line, why a host cannot run guests.

pub mod acpi;
pub mod arch;
pub mod boot;
pub mod cgroup;
pub mod devices;
pub mod error;
pub mod kvm_check;
pub mod layout;
pub mod runner;
pub mod seccomp;
mod sys;
pub mod tier;
pub mod vm;
pub mod vmlinux;

pub use error::VmmError;
pub use vm::{ExitReason, Vm, VmConfig};
