//! Pod to node scheduling, the kube-scheduler's job.
//!
//! The scheduler watches pods that have no `spec.nodeName` and whose
//! `schedulerName` is `default-scheduler`, filters the cached nodes
//! ([`predicates`]), scores the survivors ([`score`]) and binds the pod to
//! the best one through the `pods/binding` subresource. Pods that fit
//! nowhere get a `FailedScheduling` event, a `PodScheduled=False` condition
//! and wait in a back-off [`queue`].
//!
//! Start reading at [`Scheduler::run`]; the pure decision is
//! [`pick_node`], which the unit tests exercise with k8s-openapi values.
//! [`resources`] (quantities and pod requests) and [`events`] (core/v1
//! Event recording) are shared with the controllers and the node agent.

pub mod cache;
pub mod events;
pub mod predicates;
pub mod queue;
pub mod resources;
mod scheduler;
pub mod score;

pub use cache::{NodeCache, NodeInfo};
pub use scheduler::{pick_node, Decision, Scheduler, SchedulerError, DEFAULT_SCHEDULER};
