//! `evoke oci run --no-pivot`, and what happens where pivot_root(2) refuses
//! the current root (runc's `--no-pivot` case: an initramfs, or a chroot
//! into a mount whose parent is shared).

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use evoke_container::testutil::{busybox_bundle, require_root_and_busybox, unique_id};

/// What the container prints: its root's entries, then its mount table.
const LOOK: &[&str] = &["sh", "-c", "ls -a /; echo ---; cat /proc/self/mountinfo"];

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The names in the container's `/` as `ls -a` printed them (before `---`).
fn root_entries(stdout: &str) -> Vec<String> {
    let mut v: Vec<String> = stdout
        .lines()
        .take_while(|l| *l != "---")
        .filter(|l| *l != "." && *l != "..")
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn rootfs_entries(rootfs: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(rootfs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn with_no_pivot_the_container_sees_its_rootfs_at_slash_and_no_host_mount() {
    if !require_root_and_busybox("oci --no-pivot") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let bundle = busybox_bundle(&t.path().join("b"), LOOK, |_| {}).unwrap();
    // Beside the rootfs, so visible only from outside it.
    std::fs::write(bundle.join("host-mark"), "host").unwrap();
    let id = unique_id("nopivot");
    let o: Output = Command::new(env!("CARGO_BIN_EXE_evoke"))
        .args(["oci", "--root"])
        .arg(t.path().join("state"))
        .args(["run", "--no-pivot", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let out = text(&o.stdout);
    assert!(
        o.status.success(),
        "run --no-pivot failed: {}\nstdout: {out}\nstderr: {}",
        o.status,
        text(&o.stderr)
    );
    assert_eq!(root_entries(&out), rootfs_entries(&bundle.join("rootfs")));
    let mounts = out.split("---").nth(1).unwrap_or_default();
    assert!(mounts.lines().any(|l| l.contains(" /proc ")), "{mounts}");
    // The host's mounts are out of reach, so the kernel lists none of them:
    // every mount point is the container's (its root mount's source
    // directory, the 4th field, names the bundle: that is no mount point).
    let host = t.path().to_string_lossy().into_owned();
    let points: Vec<&str> = mounts.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    assert_eq!(points.first(), Some(&"/"), "{mounts}");
    assert!(
        points
            .iter()
            .all(|p| !p.contains(&host) && !p.starts_with("/tmp")),
        "host mount points in the container's mountinfo:\n{mounts}"
    );
}

/// Run inside a new mount namespace: a chroot into a tmpfs (private)
/// whose parent tmpfs is shared, where pivot_root(2) says EINVAL. The host's
/// directories are bind-mounted in so that evoke runs there as here.
const REFUSED_PIVOT: &str = r#"
set -e
mount --make-rprivate /
mkdir -p "$WORK/p"
mount -t tmpfs p "$WORK/p"
mount --make-shared "$WORK/p"
mkdir "$WORK/p/x"
mount -t tmpfs x "$WORK/p/x"
mount --make-private "$WORK/p/x"
cd "$WORK/p/x"
for d in bin sbin lib lib64 usr etc proc sys dev; do
  if [ -L "/$d" ]; then cp -P "/$d" "$d"
  elif [ -d "/$d" ]; then mkdir "$d" && mount --rbind "/$d" "$d"
  fi
done
mkdir tmp b
mount --bind "$BUNDLE" b
cp "$EVOKE" evoke
set +e
chroot . /evoke oci --root /tmp/state run --bundle /b "$ID-a" </dev/null >out-a 2>err-a
echo "pivot exit $?"
cat err-a
chroot . /evoke oci --root /tmp/state run --no-pivot --bundle /b "$ID-b" </dev/null
echo "no-pivot exit $?"
"#;

#[test]
fn where_pivot_root_is_refused_create_names_no_pivot_and_no_pivot_starts_the_container() {
    if !require_root_and_busybox("oci refused pivot_root") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let bundle = busybox_bundle(&t.path().join("b"), LOOK, |_| {}).unwrap();
    let o = Command::new("timeout")
        .args(["60", "unshare", "--mount", "sh", "-c", REFUSED_PIVOT])
        .env("WORK", t.path())
        .env("BUNDLE", &bundle)
        .env("EVOKE", env!("CARGO_BIN_EXE_evoke"))
        .env("ID", unique_id("refused"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    let report = format!("stdout:\n{out}\nstderr:\n{err}");
    assert!(
        o.status.success(),
        "the set-up script failed: {}\n{report}",
        o.status
    );
    // pivot_root's refusal is an error that says what to do about it.
    assert!(out.contains("pivot exit 1"), "{report}");
    assert!(
        out.contains("pivot_root: EINVAL") && out.contains("--no-pivot"),
        "{report}"
    );
    // With --no-pivot the container runs, its rootfs at /, the chroot's
    // files (evoke, b, tmp...) out of sight.
    assert!(out.contains("no-pivot exit 0"), "{report}");
    let after = out.split("pivot exit 1").nth(1).unwrap_or_default();
    let listing = after
        .lines()
        .skip_while(|l| *l != ".")
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        root_entries(&listing),
        rootfs_entries(&bundle.join("rootfs")),
        "{report}"
    );
}
