//! `evoke exec -u`: the exec'd process runs as the given user, a number or
//! a name from the container's own /etc/passwd, as `docker exec -u`.

mod run_support;

use run_support::{can_run_containers, text, Env};

#[test]
fn exec_runs_as_a_uid_or_a_name_from_the_containers_passwd() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let id = env.ok(&["run", "-d", "busybox", "sleep", "60"]);
    let id = id.trim();
    assert_eq!(
        env.ok(&["exec", "-u", "1000:50", id, "id", "-u"]).trim(),
        "1000"
    );
    assert_eq!(
        env.ok(&["exec", "-u", "1000:50", id, "id", "-g"]).trim(),
        "50"
    );
    // busybox's image has nobody (65534) in its /etc/passwd.
    assert_eq!(
        env.ok(&["exec", "--user", "nobody", id, "id", "-u"]).trim(),
        "65534"
    );
    // Without -u: the container's user (root here).
    assert_eq!(env.ok(&["exec", id, "id", "-u"]).trim(), "0");
    let out = env.evoke(&["exec", "-u", "ghost", id, "true"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("\"ghost\"") && err.contains("/etc/passwd"),
        "{err}"
    );
    env.ok(&["rm", "-f", id]);
}
