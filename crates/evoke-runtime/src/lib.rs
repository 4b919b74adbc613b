//! The contract shared by evoke's tiers, and the OCI image store.
//!
//! Start reading at [`workload::WorkloadRuntime`]: the trait the process,
//! container and microvm tiers implement and the node agent and `evoke run`
//! call. [`fake::FakeRuntime`] is its test double. The image store is
//! [`image::ImageStore`].

pub mod fake;
pub mod image;
pub mod monitor;
pub mod testing;
pub mod workload;

pub use fake::{FakeCall, FakeRuntime};
pub use workload::{
    CpuLimit, ExecSpec, ExitInfo, GuestNetwork, Mount, Resources, RuntimeError, Stdio, TtySize,
    User, WorkloadRuntime, WorkloadSpec, WorkloadState, WorkloadStatus,
};
