//! evoke's KVM microVM monitor, built on the rust-vmm crates.
//!
//! Start reading at [`vm::VmConfig`] and [`vm::Vm::run`]: a config names the
//! payload (kernel, initramfs parts, command line), memory, vCPUs and which
//! device carries the agent channel; `run` creates the VM, loads the kernel
//! ([`boot`]: bzImage, or ELF vmlinux via PVH or the 64-bit protocol),
//! describes the machine ([`acpi`]: MADT for the vCPUs, DSDT for the UARTs and
//! virtio-mmio devices; the zero page or PVH start info), starts one thread
//! per vCPU ([`arch`] sets CPUID, MSRs, LAPIC and registers) and dispatches
//! port and MMIO exits to the [`devices`] (8250 UARTs, i8042, virtio-mmio
//! console) until the guest resets or powers off, or the host stops it.
//!
//! Around it: [`seccomp`] confines every VMM thread, [`cgroup`] the VMM
//! process; [`runner`] is the VMM process, [`agent_mux`] its end of the agent
//! channel (the main workload, signals and exec sessions), and [`cli`] its command line
//! (`evoke vmm`, or the small `evoke-vmm` binary in `src/bin`); [`tier`] is the `microvm`
//! WorkloadRuntime on top; [`vmlinux`] extracts the uncompressed kernel for
//! PVH; [`residency`] lets go of start-up pages once the VM is set up;
//! [`kvm_check`] says early, in one line, why a host cannot run guests.

pub mod acpi;
pub mod agent_mux;
pub mod arch;
pub mod boot;
pub mod cgroup;
pub mod cli;
pub mod devices;
pub mod error;
pub mod kvm_check;
pub mod layout;
pub mod residency;
pub mod runner;
pub mod seccomp;
mod sys;
pub mod tier;
pub mod vm;
pub mod vmlinux;

pub use error::VmmError;
pub use vm::{ExitReason, Vm, VmConfig};
