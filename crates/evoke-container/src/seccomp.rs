//! Compiles an OCI `linux.seccomp` profile into BPF with seccompiler.
//!
//! seccompiler builds one filter with one "match" and one "mismatch"
//! action, while an OCI profile gives every rule its own action. The kernel
//! runs every installed filter and keeps the most restrictive answer, so a
//! profile becomes a stack: one filter that allows the allow-listed calls
//! and answers the rest with the default action, plus one filter per other
//! action that answers its calls with that action and allows the rest.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use seccompiler::BpfProgram;
use serde_json::{json, Value};

use crate::{Error, Result};

/// Compiled filters, to install in order with [`install`].
#[derive(Debug, Clone, Default)]
pub struct Program {
    pub(crate) filters: Vec<BpfProgram>,
}

fn action_json(action: LinuxSeccompAction, errno: Option<u32>) -> Result<Value> {
    use LinuxSeccompAction as A;
    Ok(match action {
        A::ScmpActAllow => json!("allow"),
        A::ScmpActErrno => json!({"errno": errno.unwrap_or(libc::EPERM as u32)}),
        A::ScmpActKill | A::ScmpActKillThread => json!("kill_thread"),
        A::ScmpActKillProcess => json!("kill_process"),
        A::ScmpActTrap => json!("trap"),
        A::ScmpActLog => json!("log"),
        A::ScmpActTrace => json!({"trace": errno.unwrap_or(0)}),
        A::ScmpActNotify => {
            return Err(Error::Seccomp(
                "SCMP_ACT_NOTIFY needs a listener, which evoke does not support".into(),
            ))
        }
    })
}

fn op_json(op: LinuxSeccompOperator, value: u64) -> Value {
    use LinuxSeccompOperator as O;
    match op {
        O::ScmpCmpNe => json!("ne"),
        O::ScmpCmpLt => json!("lt"),
        O::ScmpCmpLe => json!("le"),
        O::ScmpCmpEq => json!("eq"),
        O::ScmpCmpGe => json!("ge"),
        O::ScmpCmpGt => json!("gt"),
        // libseccomp: (arg & value) == valueTwo.
        O::ScmpCmpMaskedEq => json!({"masked_eq": value}),
    }
}

/// Compiles `profile` for x86_64. Syscall names the table does not know
/// (newer or other-arch calls) are skipped, as libseccomp does.
pub fn compile(profile: &LinuxSeccomp) -> Result<Program> {
    let default = action_json(profile.default_action(), profile.default_errno_ret())?;
    // action (as JSON text) -> rules
    let mut groups: BTreeMap<String, (Value, Vec<Value>)> = BTreeMap::new();
    for sc in profile.syscalls().iter().flatten() {
        let action = action_json(sc.action(), sc.errno_ret())?;
        if action == default {
            continue;
        }
        let mut args = Vec::new();
        for a in sc.args().iter().flatten() {
            let (val, mask) = match a.op() {
                LinuxSeccompOperator::ScmpCmpMaskedEq => (a.value_two().unwrap_or(0), a.value()),
                _ => (a.value(), 0),
            };
            args.push(json!({"index": a.index(), "type": "qword", "op": op_json(a.op(), mask), "val": val}));
        }
        let entry = groups
            .entry(action.to_string())
            .or_insert_with(|| (action.clone(), Vec::new()));
        for name in sc.names() {
            let mut rule = json!({"syscall": name});
            if !args.is_empty() {
                rule["args"] = Value::Array(args.clone());
            }
            entry.1.push(rule);
        }
    }
    let allow = json!("allow");
    let mut filters = Vec::new();
    if default != allow {
        let rules = groups
            .remove(&allow.to_string())
            .map(|g| g.1)
            .unwrap_or_default();
        filters.push(compile_one(default.clone(), allow.clone(), rules)?);
    }
    for (_, (action, rules)) in groups {
        filters.push(compile_one(allow.clone(), action, rules)?);
    }
    Ok(Program {
        filters: filters.into_iter().flatten().collect(),
    })
}

/// One seccompiler filter; drops unknown syscall names and retries.
fn compile_one(
    mismatch: Value,
    matched: Value,
    mut rules: Vec<Value>,
) -> Result<Option<BpfProgram>> {
    loop {
        let doc =
            json!({"f": {"mismatch_action": mismatch, "match_action": matched, "filter": rules}});
        let text = doc.to_string();
        match seccompiler::compile_from_json(text.as_bytes(), seccompiler::TargetArch::x86_64) {
            Ok(mut map) => return Ok(map.remove("f")),
            Err(e) => {
                // seccompiler does not export its frontend error type, so
                // the unknown name is read back from the message.
                let msg = e.to_string();
                let Some(name) = unknown_syscall(&msg) else {
                    return Err(Error::Seccomp(msg));
                };
                tracing::debug!(syscall = %name, "seccomp: syscall unknown on x86_64, skipped");
                let before = rules.len();
                rules.retain(|r| r["syscall"] != name);
                if rules.len() == before {
                    return Err(Error::Seccomp(msg));
                }
            }
        }
    }
}

fn unknown_syscall(msg: &str) -> Option<&str> {
    let rest = msg.split("Invalid syscall name: ").nth(1)?;
    rest.split(" for given arch").next()
}

/// Installs the filters in the calling thread. Sets no_new_privs first
/// (seccompiler does), which lets an unprivileged process load them.
pub fn install(p: &Program) -> std::result::Result<(), String> {
    for f in &p.filters {
        seccompiler::apply_filter(f).map_err(|e| format!("install seccomp filter: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profile_compiles_to_two_filters_after_skipping_unknown_names() {
        let p = compile(&crate::spec::default_seccomp()).unwrap();
        // EPERM group and ENOSYS group; the default is allow.
        assert_eq!(p.filters.len(), 2);
        assert!(p.filters.iter().all(|f| !f.is_empty()));
    }

    #[test]
    fn notify_action_is_a_clear_error() {
        let prof: LinuxSeccomp = serde_json::from_value(json!({
            "defaultAction": "SCMP_ACT_NOTIFY"
        }))
        .unwrap();
        let err = compile(&prof).unwrap_err().to_string();
        assert!(err.contains("SCMP_ACT_NOTIFY"), "{err}");
    }
}
