//! What the agent knows about each container, and the pod status it
//! writes from that: phase, conditions and containerStatuses.

use std::time::SystemTime;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use evoke_runtime::ExitInfo;

/// A container's lifecycle as the agent tracks it.
#[derive(Debug, Clone, PartialEq)]
pub enum CState {
    /// Not running: before the first start, or between restarts.
    Waiting {
        reason: String,
        message: Option<String>,
    },
    /// The workload `id` runs since `started`.
    Running { id: String, started: SystemTime },
    /// Ended and will not be restarted (or not yet decided).
    Terminated(Ended),
}

/// One ending of a container.
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    pub id: String,
    pub exit: ExitInfo,
    pub started: Option<SystemTime>,
}

impl Ended {
    fn to_state(&self) -> ContainerStateTerminated {
        ContainerStateTerminated {
            container_id: Some(format!("evoke://{}", self.id)),
            exit_code: self.exit.code,
            signal: self.exit.signal,
            reason: Some(self.exit.reason().to_string()),
            message: None,
            started_at: self.started.map(time),
            finished_at: Some(time(self.exit.finished_at)),
        }
    }
}

/// Everything the agent tracks about one container.
#[derive(Debug, Clone)]
pub struct ContainerRecord {
    pub name: String,
    pub image: String,
    pub restart_count: i32,
    pub state: CState,
    pub last: Option<Ended>,
    /// Readiness verdict (true when there is no readiness probe and it runs).
    pub ready: bool,
    /// Startup verdict (true when there is no startup probe and it runs).
    pub started: bool,
}

impl ContainerRecord {
    pub fn new(name: &str, image: &str) -> ContainerRecord {
        ContainerRecord {
            name: name.into(),
            image: image.into(),
            restart_count: 0,
            state: CState::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last: None,
            ready: false,
            started: false,
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self.state, CState::Running { .. })
    }

    pub fn status(&self) -> ContainerStatus {
        let state = match &self.state {
            CState::Waiting { reason, message } => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..Default::default()
            },
            CState::Running { started, .. } => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(time(*started)),
                }),
                ..Default::default()
            },
            CState::Terminated(e) => ContainerState {
                terminated: Some(e.to_state()),
                ..Default::default()
            },
        };
        let container_id = match &self.state {
            CState::Running { id, .. } => Some(format!("evoke://{id}")),
            CState::Terminated(e) => Some(format!("evoke://{}", e.id)),
            CState::Waiting { .. } => self.last.as_ref().map(|l| format!("evoke://{}", l.id)),
        };
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: String::new(),
            container_id,
            ready: self.ready && self.is_running(),
            started: Some(self.started && self.is_running()),
            restart_count: self.restart_count,
            state: Some(state),
            last_state: Some(
                self.last
                    .as_ref()
                    .map(|l| ContainerState {
                        terminated: Some(l.to_state()),
                        ..Default::default()
                    })
                    .unwrap_or_default(),
            ),
            ..Default::default()
        }
    }
}

/// SystemTime as an API timestamp (whole seconds).
pub fn time(t: SystemTime) -> Time {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Time(
        k8s_openapi::jiff::Timestamp::from_second(secs)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// The pod-level facts besides the containers.
#[derive(Debug, Clone, Default)]
pub struct PodFacts {
    pub host_ip: String,
    pub pod_ip: Option<String>,
    pub start_time: Option<SystemTime>,
    /// The sandbox (volumes, network, tier) is set up.
    pub sandbox_ready: bool,
    /// Why the sandbox is not ready (e.g. the tier is unavailable).
    pub sandbox_error: Option<(String, String)>,
    /// The pod is finished for good: Some("Succeeded") or Some("Failed").
    pub final_phase: Option<&'static str>,
    pub restart_policy: String,
}

fn cond(
    type_: &str,
    ok: bool,
    reason: Option<&str>,
    message: Option<&str>,
    prev: Option<&PodStatus>,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let old = prev
        .and_then(|p| p.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == type_));
    let ltt = match old {
        Some(o) if o.status == status => o.last_transition_time.clone(),
        _ => Some(time(SystemTime::now())),
    };
    PodCondition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.map(str::to_string),
        message: message.map(str::to_string),
        last_transition_time: ltt,
        ..Default::default()
    }
}

/// Phase per Kubernetes: Pending until every container has been started
/// once; Running while any runs or will restart; then Succeeded or Failed.
pub fn phase(facts: &PodFacts, init: &[ContainerRecord], main: &[ContainerRecord]) -> &'static str {
    if let Some(p) = facts.final_phase {
        return p;
    }
    let init_done = init
        .iter()
        .all(|c| matches!(&c.state, CState::Terminated(e) if e.exit.code == 0));
    if !facts.sandbox_ready || !init_done {
        return "Pending";
    }
    let ever_started =
        |c: &ContainerRecord| !matches!(c.state, CState::Waiting { .. }) || c.last.is_some();
    if !main.iter().all(ever_started) {
        return "Pending";
    }
    let all_terminated = main
        .iter()
        .all(|c| matches!(c.state, CState::Terminated(_)));
    if all_terminated && !main.is_empty() {
        let all_ok = main
            .iter()
            .all(|c| matches!(&c.state, CState::Terminated(e) if e.exit.code == 0));
        return if all_ok { "Succeeded" } else { "Failed" };
    }
    "Running"
}

/// The whole status the agent writes.
pub fn pod_status(
    facts: &PodFacts,
    init: &[ContainerRecord],
    main: &[ContainerRecord],
    prev: Option<&PodStatus>,
) -> PodStatus {
    let phase = phase(facts, init, main);
    let initialized = init
        .iter()
        .all(|c| matches!(&c.state, CState::Terminated(e) if e.exit.code == 0));
    let not_ready: Vec<&str> = main
        .iter()
        .filter(|c| !(c.ready && c.is_running()))
        .map(|c| c.name.as_str())
        .collect();
    let containers_ready = not_ready.is_empty() && !main.is_empty();
    let nr_msg = format!("containers with unready status: [{}]", not_ready.join(" "));
    let uninit: Vec<&str> = init
        .iter()
        .filter(|c| !matches!(&c.state, CState::Terminated(e) if e.exit.code == 0))
        .map(|c| c.name.as_str())
        .collect();
    let init_msg = format!("containers with incomplete status: [{}]", uninit.join(" "));
    let (sb_reason, sb_msg) = match &facts.sandbox_error {
        Some((r, m)) => (Some(r.as_str()), Some(m.as_str())),
        None => (None, None),
    };
    let mut conditions = vec![
        cond(
            "PodReadyToStartContainers",
            facts.sandbox_ready,
            sb_reason,
            sb_msg,
            prev,
        ),
        cond(
            "Initialized",
            initialized,
            (!initialized).then_some("ContainersNotInitialized"),
            (!initialized).then_some(init_msg.as_str()),
            prev,
        ),
        cond(
            "Ready",
            containers_ready,
            (!containers_ready).then_some("ContainersNotReady"),
            (!containers_ready).then_some(nr_msg.as_str()),
            prev,
        ),
        cond(
            "ContainersReady",
            containers_ready,
            (!containers_ready).then_some("ContainersNotReady"),
            (!containers_ready).then_some(nr_msg.as_str()),
            prev,
        ),
        cond("PodScheduled", true, None, None, prev),
    ];
    if phase == "Succeeded" || phase == "Failed" {
        for c in conditions
            .iter_mut()
            .filter(|c| c.type_ == "Ready" || c.type_ == "ContainersReady")
        {
            c.reason = Some("PodCompleted".into());
        }
    }
    let reason = facts.sandbox_error.as_ref().map(|(r, _)| r.clone());
    let message = facts.sandbox_error.as_ref().map(|(_, m)| m.clone());
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        container_statuses: Some(main.iter().map(ContainerRecord::status).collect()),
        init_container_statuses: (!init.is_empty())
            .then(|| init.iter().map(ContainerRecord::status).collect()),
        host_ip: Some(facts.host_ip.clone()),
        host_ips: Some(vec![HostIP {
            ip: facts.host_ip.clone(),
        }]),
        pod_ip: facts.pod_ip.clone(),
        pod_ips: facts.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        start_time: facts.start_time.map(time),
        qos_class: prev.and_then(|p| p.qos_class.clone()),
        reason,
        message,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(name: &str) -> ContainerRecord {
        let mut c = ContainerRecord::new(name, "img");
        c.state = CState::Running {
            id: format!("{name}_0"),
            started: SystemTime::now(),
        };
        c.ready = true;
        c.started = true;
        c
    }
    fn ended(name: &str, code: i32, oom: bool) -> ContainerRecord {
        let mut c = ContainerRecord::new(name, "img");
        let exit = if oom {
            ExitInfo::signaled(9, true)
        } else {
            ExitInfo::exited(code)
        };
        c.state = CState::Terminated(Ended {
            id: format!("{name}_0"),
            exit,
            started: None,
        });
        c
    }
    fn facts() -> PodFacts {
        PodFacts {
            host_ip: "10.0.0.1".into(),
            sandbox_ready: true,
            restart_policy: "Always".into(),
            ..Default::default()
        }
    }

    #[test]
    fn pod_with_all_containers_running_and_ready_is_running_and_ready() {
        let s = pod_status(&facts(), &[], &[running("a"), running("b")], None);
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let ready = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
    }

    #[test]
    fn unfinished_init_container_keeps_the_pod_pending() {
        let mut init = ContainerRecord::new("init", "img");
        init.state = CState::Running {
            id: "i".into(),
            started: SystemTime::now(),
        };
        let s = pod_status(&facts(), &[init], &[ContainerRecord::new("a", "img")], None);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let c = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Initialized")
            .unwrap();
        assert_eq!(c.status, "False");
    }

    #[test]
    fn terminated_containers_give_succeeded_or_failed() {
        assert_eq!(phase(&facts(), &[], &[ended("a", 0, false)]), "Succeeded");
        assert_eq!(
            phase(&facts(), &[], &[ended("a", 0, false), ended("b", 1, false)]),
            "Failed"
        );
    }

    #[test]
    fn oom_kill_is_reported_in_last_state_with_exit_code_137() {
        let mut c = running("a");
        if let CState::Terminated(e) = ended("a", 0, true).state {
            c.last = Some(e);
        }
        c.restart_count = 1;
        let st = c.status();
        let t = st.last_state.unwrap().terminated.unwrap();
        assert_eq!((t.reason.as_deref(), t.exit_code), (Some("OOMKilled"), 137));
        assert_eq!(st.restart_count, 1);
    }

    #[test]
    fn unavailable_tier_shows_as_condition_and_reason() {
        let mut f = facts();
        f.sandbox_ready = false;
        f.sandbox_error = Some((
            "RuntimeUnavailable".into(),
            "the microvm tier is unavailable here: no VT-x".into(),
        ));
        let s = pod_status(&f, &[], &[ContainerRecord::new("a", "img")], None);
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let c = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "PodReadyToStartContainers")
            .unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref()),
            ("False", Some("RuntimeUnavailable"))
        );
    }
}
