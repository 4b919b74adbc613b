//! `exec -t`: the command sees the caller's terminal size from its first
//! look at the terminal (the size travels as `process.consoleSize` and is
//! set on the pty before the command runs), and later sizes follow.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use evoke_container::testutil::{require_root_and_busybox, unique_id};
use evoke_container::tier::ContainerTier;
use evoke_runtime::image::ImportOptions;
use evoke_runtime::{ExecSpec, Stdio, TtySize, WorkloadRuntime, WorkloadSpec};

fn tier_with_busybox(tmp: &Path) -> ContainerTier {
    let root = tmp.join("rootfs");
    evoke_runtime::testing::busybox_rootfs(&root).unwrap();
    let tier = ContainerTier::new(&tmp.join("data")).unwrap();
    tier.images()
        .build_dir(&root, "busybox", &ImportOptions::default())
        .unwrap();
    tier
}

struct Removed<'a>(&'a ContainerTier, String);

impl Drop for Removed<'_> {
    fn drop(&mut self) {
        let _ = self.0.remove(&self.1, true);
    }
}

#[test]
fn an_exec_with_a_terminal_sees_the_callers_size_at_its_first_look() {
    if !require_root_and_busybox("an_exec_with_a_terminal_sees_the_callers_size_at_its_first_look")
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tier = tier_with_busybox(tmp.path());
    let id = unique_id("tty");
    let spec = WorkloadSpec {
        id: id.clone(),
        image: Some("busybox".into()),
        command: Some(vec!["sleep".into(), "60".into()]),
        ..WorkloadSpec::default()
    };
    tier.create(&spec, Stdio::default()).unwrap();
    let _removed = Removed(&tier, id.clone());
    tier.start(&id).unwrap();

    // Several rounds: the old race showed 0x0 about one time in three.
    for round in 0..5u16 {
        let (tx, rx) = std::sync::mpsc::channel();
        let size = TtySize {
            rows: 20 + round,
            cols: 90 + round,
        };
        tx.send(size).unwrap();
        let (mut out_r, out_w) = std::io::pipe().unwrap();
        let (in_r, in_w) = std::io::pipe().unwrap();
        let exec = ExecSpec {
            command: vec!["stty".into(), "size".into()],
            tty: true,
            ..ExecSpec::default()
        };
        let stdio = Stdio {
            stdin: Some(OwnedFd::from(in_r)),
            stdout: Some(OwnedFd::from(out_w)),
            stderr: None,
        };
        let code = tier.exec_with_resize(&id, &exec, stdio, rx).unwrap();
        drop(in_w);
        drop(tx);
        let mut out = String::new();
        out_r.read_to_string(&mut out).unwrap();
        assert_eq!(code, 0, "round {round}: stty size failed: {out:?}");
        assert_eq!(
            out.trim(),
            format!("{} {}", size.rows, size.cols),
            "round {round}: the command saw another size"
        );
    }
}
