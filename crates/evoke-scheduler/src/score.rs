//! Scores: of the nodes a pod fits on, which is best? Higher is better,
//! each plugin in 0..=100, as in kube-scheduler.

use k8s_openapi::api::core::v1::Pod;

use crate::cache::{nonzero, NodeInfo};
use crate::resources::Resources;

fn fraction(used: i64, cap: i64) -> f64 {
    if cap <= 0 {
        return 1.0;
    }
    (used as f64 / cap as f64).clamp(0.0, 1.0)
}

/// LeastAllocated: prefer the node with the most free CPU and memory after
/// placing the pod.
pub fn least_allocated(req: &Resources, info: &NodeInfo) -> f64 {
    let r = nonzero(req);
    let cpu = 1.0
        - fraction(
            info.requested_nonzero.cpu_milli + r.cpu_milli,
            info.allocatable.cpu_milli,
        );
    let mem = 1.0
        - fraction(
            info.requested_nonzero.memory + r.memory,
            info.allocatable.memory,
        );
    (cpu + mem) / 2.0 * 100.0
}

/// BalancedAllocation: prefer nodes whose CPU and memory use stay alike.
pub fn balanced(req: &Resources, info: &NodeInfo) -> f64 {
    let r = nonzero(req);
    let cpu = fraction(
        info.requested_nonzero.cpu_milli + r.cpu_milli,
        info.allocatable.cpu_milli,
    );
    let mem = fraction(
        info.requested_nonzero.memory + r.memory,
        info.allocatable.memory,
    );
    (1.0 - (cpu - mem).abs()) * 100.0
}

/// PreferNoSchedule taints the pod does not tolerate cost points.
pub fn taint_penalty(pod: &Pod, info: &NodeInfo) -> f64 {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or(&[]);
    let n = info
        .node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or(&[])
        .iter()
        .filter(|t| t.effect == "PreferNoSchedule")
        .filter(|t| {
            !tolerations
                .iter()
                .any(|tol| crate::predicates::tolerates(tol, t))
        })
        .count();
    n as f64 * 50.0
}

/// The total score of a feasible node.
pub fn score(pod: &Pod, req: &Resources, info: &NodeInfo) -> f64 {
    least_allocated(req, info) + balanced(req, info) - taint_penalty(pod, info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(cpu: &str, mem: &str, used_cpu: i64, used_mem: i64) -> NodeInfo {
        let mut i = NodeInfo::new(
            serde_json::from_value(json!({"metadata": {"name": "n"},
                "status": {"allocatable": {"cpu": cpu, "memory": mem, "pods": "110"}}}))
            .expect("valid node"),
        );
        i.requested_nonzero = Resources {
            cpu_milli: used_cpu,
            memory: used_mem,
            pods: 0,
        };
        i
    }

    #[test]
    fn emptier_node_scores_higher_on_least_allocated() {
        let req = Resources {
            cpu_milli: 500,
            memory: 256 << 20,
            pods: 1,
        };
        let empty = info("4", "8Gi", 0, 0);
        let busy = info("4", "8Gi", 3000, 6 << 30);
        assert!(least_allocated(&req, &empty) > least_allocated(&req, &busy));
    }

    #[test]
    fn balanced_prefers_equal_cpu_and_memory_fractions() {
        let req = Resources {
            cpu_milli: 1000,
            memory: 1 << 30,
            pods: 1,
        };
        let lopsided = info("4", "4Gi", 2000, 0);
        let even = info("4", "4Gi", 1000, 1 << 30);
        assert!(balanced(&req, &even) > balanced(&req, &lopsided));
    }

    #[test]
    fn zero_request_pods_still_count_toward_spreading() {
        let req = Resources {
            cpu_milli: 0,
            memory: 0,
            pods: 1,
        };
        let a = info("1", "1Gi", 0, 0);
        let b = info("1", "1Gi", 500, 500 << 20);
        assert!(least_allocated(&req, &a) > least_allocated(&req, &b));
    }
}
