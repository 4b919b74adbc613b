//! A workload created with `stdin: true` and no stdin of the caller's
//! keeps its stdin open: writers come and go ([`WorkloadRuntime::open_stdin`],
//! what `kubectl attach -i` uses) and the process never reads end-of-file
//! in between.

// Helpers outside #[test] fns unwrap too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::time::{Duration, Instant};

use evoke_container::testutil::{require_root_and_busybox, unique_id};
use evoke_container::tier::ContainerTier;
use evoke_runtime::image::ImportOptions;
use evoke_runtime::{Stdio, WorkloadRuntime, WorkloadSpec, WorkloadState};

fn wait_for_log(log: &std::path::Path, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {want:?} in the log: {text:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_kept_open_stdin_takes_one_writer_after_another_without_eof() {
    if !require_root_and_busybox("stdin kept open") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("rootfs");
    evoke_runtime::testing::busybox_rootfs(&root).unwrap();
    let tier = ContainerTier::new(&tmp.path().join("data")).unwrap();
    tier.images()
        .build_dir(&root, "busybox", &ImportOptions::default())
        .unwrap();
    let id = unique_id("stdin");
    let log = tmp.path().join("out.log");
    let spec = WorkloadSpec {
        id: id.clone(),
        image: Some("busybox".into()),
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            "while read l; do echo got:$l; done; echo eof".into(),
        ]),
        stdin: true,
        log_path: Some(log.clone()),
        ..WorkloadSpec::default()
    };
    tier.create(&spec, Stdio::default()).unwrap();
    tier.start(&id).unwrap();
    for word in ["first", "second"] {
        let mut w = std::fs::File::from(tier.open_stdin(&id).unwrap());
        writeln!(w, "{word}").unwrap();
        drop(w);
        wait_for_log(&log, &format!("got:{word}"));
    }
    // The writers went away, yet the loop still reads: no end-of-file.
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("eof"), "{text}");
    assert!(matches!(
        tier.state(&id).unwrap().state,
        WorkloadState::Running { .. }
    ));
    tier.remove(&id, true).unwrap();

    // Without `stdin`, there is nothing to attach to.
    let plain = unique_id("nostdin");
    let spec = WorkloadSpec {
        id: plain.clone(),
        image: Some("busybox".into()),
        command: Some(vec!["sleep".into(), "60".into()]),
        ..WorkloadSpec::default()
    };
    tier.create(&spec, Stdio::default()).unwrap();
    let err = tier.open_stdin(&plain).unwrap_err().to_string();
    assert!(err.contains(&plain) && err.contains("stdin"), "{err}");
    tier.remove(&plain, true).unwrap();
}
