//! Server-side apply of any configuration over any live object: a result
//! or an error; every value applied is in the result; and applying the same
//! configuration again by the same manager never conflicts.
#![no_main]

use evoke_types::apply::server_side_apply;
use evoke_types::managed_fields;
use evoke_types::registry::RESOURCES;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((sel, rest)) = data.split_first() else {
        return;
    };
    let res = &RESOURCES[usize::from(*sel) % RESOURCES.len()];
    let force = sel & 0x80 != 0;
    let (live, applied) = match rest.iter().position(|b| *b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&b""[..], rest),
    };
    let live: Option<Value> = serde_json::from_slice(live).ok();
    let Ok(mut applied) = evoke_types::decode::parse(applied, Some("application/apply-patch+yaml"))
    else {
        return;
    };
    if let Some(o) = applied.as_object_mut() {
        o.insert("apiVersion".into(), res.api_version().into());
        o.insert("kind".into(), res.kind.into());
    }
    let now = "2024-01-01T00:00:00Z";
    if let Ok(out) = server_side_apply(res, live.as_ref(), &applied, "fuzz", force, now) {
        assert!(out.is_object());
        for path in managed_fields::field_set(res, &applied, true) {
            if path.iter().any(|pe| pe.starts_with("i:")) {
                continue;
            }
            let want = managed_fields::get(&applied, &path);
            if want.is_some_and(|v| !v.is_null() && !v.is_object() && !v.is_array()) {
                assert_eq!(
                    managed_fields::get(&out, &path),
                    want,
                    "applied value lost at {path:?}"
                );
            }
        }
        let again = server_side_apply(res, Some(&out), &applied, "fuzz", false, now);
        assert!(
            again.as_ref().map_or_else(|e| e.code != 409, |_| true),
            "re-applying the same configuration conflicted: {again:?}"
        );
    }
});
