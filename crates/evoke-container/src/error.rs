//! The one error type of the engine. Every variant names the thing involved
//! (a container id, a path, a cgroup) so that a CLI user can act on it.

use std::path::PathBuf;

/// Everything that can go wrong while running a container.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A container id that is empty, too long or contains a path separator.
    #[error("invalid container id {0:?}: use 1-1024 characters from [A-Za-z0-9_.+-] and not '.' or '..'")]
    InvalidId(String),
    /// `create` for an id that already has state.
    #[error("container {0} already exists")]
    Exists(String),
    /// An id with no state under the state root.
    #[error("container {0} does not exist")]
    NotFound(String),
    /// An operation that the container's status forbids, e.g. start when running.
    #[error("container {id} is {status}: cannot {op}")]
    BadStatus {
        id: String,
        status: crate::Status,
        op: &'static str,
    },
    /// config.json could not be read or parsed.
    #[error("cannot load {path}: {source}")]
    Spec {
        path: PathBuf,
        source: oci_spec::OciSpecError,
    },
    /// A config that parses but that the engine cannot honour.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A file-system operation on a named path failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        source: nix::Error,
    },
    /// The container's init process reported a failure while setting up.
    #[error("container {id} init failed: {msg}")]
    Init { id: String, msg: String },
    /// A cgroup operation failed.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroups::CgroupError),
    /// The seccomp profile could not be compiled.
    #[error("seccomp profile: {0}")]
    Seccomp(String),
    /// The binary could not be re-executed from a protected copy.
    #[error(transparent)]
    SelfExe(#[from] crate::selfexe::SelfExeError),
    /// A signal name or number that is not a signal.
    #[error("unknown signal {0:?}")]
    BadSignal(String),
    /// state.json could not be (de)serialized.
    #[error("state of container {id}: {source}")]
    State {
        id: String,
        source: serde_json::Error,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
    pub(crate) fn sys(op: &'static str, source: nix::Error) -> Self {
        Error::Sys { op, source }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
