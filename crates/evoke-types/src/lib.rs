//! evoke's object model, with no IO, so every rule is testable with plain
//! values. It knows which kinds the API serves ([`registry`]), how an error
//! is told to a Kubernetes client ([`status`]), how a request body becomes an
//! object ([`decode`], with [`protobuf`] for kubectl's typed commands), and
//! how objects are defaulted ([`defaults`]),
//! validated ([`validate`]), patched ([`patch`]), applied server-side
//! ([`apply`], [`managed_fields`]), printed as tables ([`table`]) and
//! described to kubectl ([`openapi`]).
//!
//! Start reading at [`registry::RESOURCES`], then [`schema`]: the schemas
//! and list-merge rules that openapi, patch and apply share.

// Every fallible function returns an ApiError: it is the Status sent to the
// client, so it carries the message, reason, details and causes. It is
// returned once per request, so its size does not matter.
#![allow(clippy::result_large_err)]

pub mod apply;
pub mod decode;
pub mod defaults;
pub mod managed_fields;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod schema;
pub mod status;
pub mod table;
pub mod validate;
