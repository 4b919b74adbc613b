//! [`FakeRuntime`]: an in-memory [`WorkloadRuntime`] for tests of the node
//! agent and anything else that drives tiers. No processes are run.
//!
//! Workloads move through the real lifecycle. A started workload stays
//! Running until a test calls [`FakeRuntime::finish`] or sends it a signal
//! (which ends it with 128 + signal, like a process with default handlers).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::workload::{
    validate_id, ExecSpec, ExitInfo, RuntimeError, Stdio, WorkloadRuntime, WorkloadSpec,
    WorkloadState, WorkloadStatus,
};

/// A call the fake received, for assertions.
#[derive(Debug, Clone, PartialEq)]
pub enum FakeCall {
    Create(Box<WorkloadSpec>),
    Start(String),
    Signal(String, i32),
    Exec(String, ExecSpec),
    Remove(String, bool),
}

#[derive(Default)]
struct Inner {
    workloads: BTreeMap<String, WorkloadStatus>,
    calls: Vec<FakeCall>,
    next_pid: u32,
    unavailable: Option<String>,
    known_images: Option<Vec<String>>,
    exec_code: i32,
    fail_start: BTreeMap<String, String>,
}

/// An in-memory tier. Cheap to clone-by-`Arc`; all methods take `&self`.
pub struct FakeRuntime {
    name: String,
    inner: Mutex<Inner>,
    changed: std::sync::Condvar,
}

impl FakeRuntime {
    /// A fake tier answering to `name` (e.g. "container").
    pub fn new(name: &str) -> Self {
        FakeRuntime {
            name: name.to_string(),
            inner: Mutex::new(Inner {
                next_pid: 1000,
                ..Inner::default()
            }),
            changed: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not hide the state from the others.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make `available()` fail with `reason`.
    pub fn set_unavailable(&self, reason: &str) {
        self.lock().unavailable = Some(reason.to_string());
    }

    /// Only these images exist; others make `create` fail with ImageNotFound.
    /// By default every image exists.
    pub fn set_images(&self, images: &[&str]) {
        self.lock().known_images = Some(images.iter().map(|s| s.to_string()).collect());
    }

    /// The code every `exec` returns (default 0).
    pub fn set_exec_code(&self, code: i32) {
        self.lock().exec_code = code;
    }

    /// Make `start` of `id` fail with `message` (like a missing binary).
    pub fn fail_start(&self, id: &str, message: &str) {
        self.lock()
            .fail_start
            .insert(id.to_string(), message.to_string());
    }

    /// End a Running workload as if its main process had exited so.
    pub fn finish(&self, id: &str, info: ExitInfo) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        let w = inner
            .workloads
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        w.state = WorkloadState::Exited(info);
        self.changed.notify_all();
        Ok(())
    }

    /// Every call received so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }
}

impl WorkloadRuntime for FakeRuntime {
    fn name(&self) -> &str {
        &self.name
    }

    fn available(&self) -> Result<(), RuntimeError> {
        match &self.lock().unavailable {
            Some(reason) => Err(RuntimeError::Unavailable {
                tier: self.name.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn create(&self, spec: &WorkloadSpec, _stdio: Stdio) -> Result<WorkloadStatus, RuntimeError> {
        validate_id(&spec.id)?;
        let mut inner = self.lock();
        inner.calls.push(FakeCall::Create(Box::new(spec.clone())));
        if let (Some(known), Some(image)) = (&inner.known_images, &spec.image) {
            if !known.contains(image) {
                return Err(RuntimeError::ImageNotFound(image.clone()));
            }
        }
        if inner.workloads.contains_key(&spec.id) {
            return Err(RuntimeError::AlreadyExists(spec.id.clone()));
        }
        let status = WorkloadStatus {
            id: spec.id.clone(),
            image: spec.image.clone(),
            state: WorkloadState::Created,
            created_at: SystemTime::now(),
            started_at: None,
            labels: spec.labels.clone(),
            log_path: spec.log_path.clone(),
        };
        inner.workloads.insert(spec.id.clone(), status.clone());
        Ok(status)
    }

    fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        inner.calls.push(FakeCall::Start(id.to_string()));
        if let Some(msg) = inner.fail_start.get(id).cloned() {
            return Err(RuntimeError::tier(self.name.clone(), msg));
        }
        inner.next_pid += 1;
        let pid = inner.next_pid;
        let w = inner
            .workloads
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        if w.state != WorkloadState::Created {
            return Err(RuntimeError::InvalidState {
                id: id.to_string(),
                state: w.state.word(),
                action: "start it",
            });
        }
        w.state = WorkloadState::Running { pid };
        w.started_at = Some(SystemTime::now());
        self.changed.notify_all();
        Ok(())
    }

    fn state(&self, id: &str) -> Result<WorkloadStatus, RuntimeError> {
        self.lock()
            .workloads
            .get(id)
            .cloned()
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))
    }

    fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        Ok(self.lock().workloads.values().cloned().collect())
    }

    fn signal(&self, id: &str, signal: i32) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        inner.calls.push(FakeCall::Signal(id.to_string(), signal));
        let w = inner
            .workloads
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        match w.state {
            WorkloadState::Running { .. } => {
                // Signal 0 only probes, as kill(2) does.
                if signal != 0 {
                    w.state = WorkloadState::Exited(ExitInfo::signaled(signal, false));
                    self.changed.notify_all();
                }
                Ok(())
            }
            other => Err(RuntimeError::InvalidState {
                id: id.to_string(),
                state: other.word(),
                action: "signal it",
            }),
        }
    }

    fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<Option<ExitInfo>, RuntimeError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut inner = self.lock();
        loop {
            let w = inner
                .workloads
                .get(id)
                .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
            if let WorkloadState::Exited(info) = w.state {
                return Ok(Some(info));
            }
            let wait_for = match deadline {
                Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Ok(None),
                },
                None => Duration::from_secs(3600),
            };
            inner = self
                .changed
                .wait_timeout(inner, wait_for)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn exec(&self, id: &str, spec: &ExecSpec, _stdio: Stdio) -> Result<i32, RuntimeError> {
        let mut inner = self.lock();
        inner
            .calls
            .push(FakeCall::Exec(id.to_string(), spec.clone()));
        if spec.command.is_empty() {
            return Err(RuntimeError::InvalidSpec("exec needs a command".into()));
        }
        let w = inner
            .workloads
            .get(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        if !matches!(w.state, WorkloadState::Running { .. }) {
            return Err(RuntimeError::InvalidState {
                id: id.to_string(),
                state: w.state.word(),
                action: "exec in it",
            });
        }
        Ok(inner.exec_code)
    }

    fn remove(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        inner.calls.push(FakeCall::Remove(id.to_string(), force));
        let w = inner
            .workloads
            .get(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        if matches!(w.state, WorkloadState::Running { .. }) && !force {
            return Err(RuntimeError::InvalidState {
                id: id.to_string(),
                state: "running",
                action: "remove it without force",
            });
        }
        inner.workloads.remove(id);
        self.changed.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> WorkloadSpec {
        WorkloadSpec {
            id: id.into(),
            image: Some("busybox".into()),
            ..WorkloadSpec::default()
        }
    }

    #[test]
    fn workload_goes_created_running_exited_removed() {
        let rt = FakeRuntime::new("container");
        rt.create(&spec("a"), Stdio::default()).unwrap();
        assert_eq!(rt.state("a").unwrap().state, WorkloadState::Created);
        rt.start("a").unwrap();
        assert!(matches!(
            rt.state("a").unwrap().state,
            WorkloadState::Running { .. }
        ));
        rt.finish("a", ExitInfo::exited(3)).unwrap();
        assert_eq!(rt.wait("a", None).unwrap().unwrap().code, 3);
        rt.remove("a", false).unwrap();
        assert!(matches!(rt.state("a"), Err(RuntimeError::NotFound(_))));
    }

    #[test]
    fn stop_ends_a_running_workload_with_sigterm() {
        let rt = FakeRuntime::new("process");
        rt.create(&spec("b"), Stdio::default()).unwrap();
        rt.start("b").unwrap();
        let info = rt.stop("b", Duration::from_secs(1)).unwrap();
        assert_eq!((info.code, info.signal), (143, Some(15)));
        assert!(rt.calls().contains(&FakeCall::Signal("b".into(), 15)));
    }

    #[test]
    fn removing_a_running_workload_needs_force() {
        let rt = FakeRuntime::new("container");
        rt.create(&spec("c"), Stdio::default()).unwrap();
        rt.start("c").unwrap();
        assert!(matches!(
            rt.remove("c", false),
            Err(RuntimeError::InvalidState { .. })
        ));
        rt.remove("c", true).unwrap();
    }

    #[test]
    fn unknown_image_is_the_shared_image_not_found_error() {
        let rt = FakeRuntime::new("container");
        rt.set_images(&["busybox:latest"]);
        let err = rt.create(&spec("d"), Stdio::default()).unwrap_err();
        assert!(matches!(err, RuntimeError::ImageNotFound(ref i) if i == "busybox"));
        assert_eq!(err.to_string(), "image not found: busybox");
    }

    #[test]
    fn unavailable_tier_says_why() {
        let rt = FakeRuntime::new("microvm");
        rt.set_unavailable("no /dev/kvm");
        let err = rt.available().unwrap_err().to_string();
        assert_eq!(err, "the microvm tier is unavailable here: no /dev/kvm");
    }

    #[test]
    fn wait_with_timeout_returns_none_while_running() {
        let rt = FakeRuntime::new("container");
        rt.create(&spec("e"), Stdio::default()).unwrap();
        rt.start("e").unwrap();
        assert_eq!(rt.wait("e", Some(Duration::from_millis(10))).unwrap(), None);
    }

    #[test]
    fn cpu_limits_convert_between_cpus_and_millicores() {
        use crate::workload::CpuLimit;
        let half = CpuLimit::from_cpus(0.5).unwrap();
        assert_eq!((half.quota_us, half.period_us), (50_000, 100_000));
        assert_eq!(half.millicores(), 500);
        assert!(CpuLimit::from_cpus(-1.0).is_err());
        assert_eq!(CpuLimit::from_millicores(1).quota_us, 1000);
    }

    #[test]
    fn user_parses_uid_and_optional_gid() {
        use crate::workload::User;
        assert_eq!(
            "1000:100".parse::<User>().unwrap(),
            User {
                uid: 1000,
                gid: 100
            }
        );
        assert_eq!("7".parse::<User>().unwrap(), User { uid: 7, gid: 0 });
        assert!("root".parse::<User>().is_err());
    }

    #[test]
    fn ids_with_slashes_are_rejected() {
        assert!(validate_id("../x").is_err());
        assert!(validate_id("").is_err());
        assert!(validate_id("web-1_a.b").is_ok());
    }
}
