//! Every patch type, applied to any current object of any kind, yields an
//! object or an error. Input: a selector byte, then the current object as
//! JSON, a 0xFF byte, then the patch body.
#![no_main]

use evoke_types::patch::{apply_patch, PatchType};
use evoke_types::registry::RESOURCES;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const TYPES: &[PatchType] = &[
    PatchType::StrategicMerge,
    PatchType::Merge,
    PatchType::Json,
    PatchType::Apply,
];

fuzz_target!(|data: &[u8]| {
    let Some((sel, rest)) = data.split_first() else {
        return;
    };
    let pt = TYPES[usize::from(*sel) % TYPES.len()];
    let res = &RESOURCES[usize::from(*sel / 4) % RESOURCES.len()];
    let (cur, patch) = match rest.iter().position(|b| *b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&b"{}"[..], rest),
    };
    let current: Value = serde_json::from_slice(cur).unwrap_or_else(|_| serde_json::json!({}));
    if let Ok(out) = apply_patch(res, pt, &current, patch) {
        assert!(out.is_object(), "a patch result is always an object");
    }
});
