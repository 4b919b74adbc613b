//! evoke's object model. It knows which kinds the API serves
//! ([`registry`]), how an error is told to a Kubernetes client
//! ([`status`]), and, as it grows, how objects are validated, defaulted,
//! patched, applied and printed as tables. It does no IO, so every rule here
//! is testable with plain values. Start reading at [`registry::RESOURCES`].

pub mod registry;
pub mod status;
