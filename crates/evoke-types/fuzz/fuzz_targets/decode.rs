//! Any body, under any content type, decodes or errors; a decoded object
//! then survives defaulting, validation and table printing.
#![no_main]

use evoke_types::registry::RESOURCES;
use libfuzzer_sys::fuzz_target;

const TYPES: &[Option<&str>] = &[
    None,
    Some("application/json"),
    Some("application/yaml"),
    Some("application/apply-patch+yaml"),
    Some("application/vnd.kubernetes.protobuf"),
];

fuzz_target!(|data: &[u8]| {
    let Some((sel, body)) = data.split_first() else {
        return;
    };
    let ct = TYPES[usize::from(*sel) % TYPES.len()];
    if let Ok(mut obj) = evoke_types::decode::decode(body, ct) {
        let res = &RESOURCES[usize::from(*sel / 8) % RESOURCES.len()];
        let _ = evoke_types::validate::validate(res, &obj, Some(&obj));
        evoke_types::defaults::default_object(res, &mut obj);
        let _ = evoke_types::validate::validate(res, &obj, None);
        let _ =
            evoke_types::table::to_table(res, std::slice::from_ref(&obj), serde_json::json!({}));
        evoke_types::managed_fields::record_update(
            res,
            None,
            &mut obj,
            "fuzz",
            "2024-01-01T00:00:00Z",
        );
    }
});
