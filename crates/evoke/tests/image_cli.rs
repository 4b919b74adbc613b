//! `evoke image build-dir|import|ls|rm` through the built binary, with
//! archives made here from the host's busybox: a `docker save` archive and
//! an OCI image layout (gzip and zstd layers), a corrupt one, and images run
//! to show their Entrypoint, Cmd, Env, WorkingDir and User are honoured.
// Helpers here are test code too: a failed step should panic.
#![allow(clippy::unwrap_used)]

mod run_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use evoke_runtime::image::sha256_hex;
use run_support::{busybox_rootfs, can_run_containers, text, Env};

fn hex(d: &str) -> &str {
    d.trim_start_matches("sha256:")
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {}", text(&out.stderr));
}

/// The busybox rootfs as an uncompressed layer tar (system tar, as a
/// Dockerfile build would make).
fn busybox_layer(dir: &Path) -> Vec<u8> {
    let root = dir.join("layer-root");
    busybox_rootfs(&root);
    let tar = dir.join("layer.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("--numeric-owner")
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    fs::read(tar).unwrap()
}

fn config(diff_id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "created": "2025-01-01T00:00:00Z",
        "architecture": "amd64", "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "IMG_ENV=from-image"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo $(id -u):$(id -g) $(pwd) $IMG_ENV"],
            "WorkingDir": "/data",
            "User": "nobody"
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}
    }))
    .unwrap()
}

/// Pack `files` (relative paths under `dir`) into `out` with system tar.
fn pack(dir: &Path, files: &[&str], out: &Path) {
    sh(Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .args(files));
}

/// A `docker save` archive, gzip-compressed as a whole.
fn docker_save_archive(work: &Path, tag: &str) -> PathBuf {
    let layer = busybox_layer(work);
    let diff_id = sha256_hex(&layer);
    let cfg = config(&diff_id);
    let d = work.join("docker");
    fs::create_dir_all(d.join("abc")).unwrap();
    let cfg_name = format!("{}.json", hex(&sha256_hex(&cfg)));
    fs::write(d.join(&cfg_name), &cfg).unwrap();
    fs::write(d.join("abc/layer.tar"), &layer).unwrap();
    let manifest =
        serde_json::json!([{"Config": cfg_name, "RepoTags": [tag], "Layers": ["abc/layer.tar"]}]);
    fs::write(d.join("manifest.json"), manifest.to_string()).unwrap();
    let out = work.join("docker-save.tar");
    pack(&d, &[&cfg_name, "abc", "manifest.json"], &out);
    sh(Command::new("gzip").arg("-f").arg(&out));
    work.join("docker-save.tar.gz")
}

/// An OCI image layout tarball whose layer is compressed with `tool`
/// (`gzip` or `zstd`).
fn oci_archive(work: &Path, layer: &[u8], tool: &str, ref_name: &str) -> PathBuf {
    let diff_id = sha256_hex(layer);
    let raw = work.join("oci-layer.tar");
    fs::write(&raw, layer).unwrap();
    let out = Command::new(tool).arg("-c").arg(&raw).output().unwrap();
    assert!(out.status.success());
    let blob = out.stdout;
    let media = if tool == "gzip" {
        "tar+gzip"
    } else {
        "tar+zstd"
    };
    let cfg = config(&diff_id);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256_hex(&cfg), "size": cfg.len()},
        "layers": [{"mediaType": format!("application/vnd.oci.image.layer.v1.{media}"),
                    "digest": sha256_hex(&blob), "size": blob.len()}]
    }))
    .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": sha256_hex(&manifest), "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": ref_name}}]
    });
    let d = work.join(format!("oci-{tool}"));
    fs::create_dir_all(d.join("blobs/sha256")).unwrap();
    for b in [&cfg, &manifest, &blob] {
        fs::write(d.join("blobs/sha256").join(hex(&sha256_hex(b))), b).unwrap();
    }
    fs::write(d.join("index.json"), index.to_string()).unwrap();
    fs::write(d.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let out = work.join(format!("oci-{tool}.tar"));
    pack(&d, &["oci-layout", "index.json", "blobs"], &out);
    out
}

/// Every file name in the image store and the index's bytes.
fn store_snapshot(data: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["images/blobs/sha256", "images/layers", "images/tmp"] {
        for e in fs::read_dir(data.join(sub)).unwrap() {
            out.push(format!(
                "{sub}/{}",
                e.unwrap().file_name().to_string_lossy()
            ));
        }
    }
    out.sort();
    out.push(fs::read_to_string(data.join("images/index.json")).unwrap());
    out
}

#[test]
fn build_dir_image_is_listed_and_removed_with_its_layer() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let ls = env.ok(&["image", "ls"]);
    let header = ls.lines().next().unwrap();
    for col in ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"] {
        assert!(header.contains(col), "{ls}");
    }
    let row = ls.lines().nth(1).expect("one image");
    assert!(
        row.starts_with("busybox ") && row.contains(" latest "),
        "{ls}"
    );
    assert_eq!(
        fs::read_dir(env.data.join("images/layers"))
            .unwrap()
            .count(),
        1
    );
    env.ok(&["image", "rm", "busybox"]);
    assert_eq!(
        env.ok(&["image", "ls"]).lines().count(),
        1,
        "only the header"
    );
    assert_eq!(
        fs::read_dir(env.data.join("images/layers"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        fs::read_dir(env.data.join("images/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn docker_save_archive_imports_and_runs_with_its_config() {
    if !can_run_containers() {
        return;
    }
    let env = Env::new();
    let archive = docker_save_archive(env.tmp.path(), "saved/app:v1");
    let out = env.ok(&["image", "import", archive.to_str().unwrap()]);
    assert!(out.contains("saved/app:v1"), "{out}");
    // Entrypoint + Cmd, Env, WorkingDir and User (nobody, from /etc/passwd).
    let out = env.ok(&["run", "--rm", "saved/app:v1"]);
    assert_eq!(out, "65534:65534 /data from-image\n");
    // Arguments replace Cmd but keep the Entrypoint; -e and -u override.
    let out = env.ok(&[
        "run",
        "--rm",
        "-e",
        "IMG_ENV=flag",
        "-u",
        "0",
        "saved/app:v1",
        "echo $IMG_ENV $(id -u)",
    ]);
    assert_eq!(out, "flag 0\n");
}

#[test]
fn oci_layouts_with_gzip_and_zstd_layers_share_one_unpacked_layer() {
    if !can_run_containers() {
        return;
    }
    let env = Env::new();
    let layer = busybox_layer(env.tmp.path());
    let gz = oci_archive(env.tmp.path(), &layer, "gzip", "oci/gz:1");
    let zst = oci_archive(env.tmp.path(), &layer, "zstd", "oci/zst:1");
    env.ok(&["image", "import", gz.to_str().unwrap()]);
    env.ok(&["image", "import", zst.to_str().unwrap()]);
    let ls = env.ok(&["image", "ls"]);
    assert!(ls.contains("oci/gz") && ls.contains("oci/zst"), "{ls}");
    // Same uncompressed layer, so one directory serves both.
    assert_eq!(
        fs::read_dir(env.data.join("images/layers"))
            .unwrap()
            .count(),
        1
    );
    assert_eq!(
        env.ok(&["run", "--rm", "oci/zst:1"]),
        "65534:65534 /data from-image\n"
    );
    assert_eq!(
        env.ok(&["run", "--rm", "oci/gz:1"]),
        "65534:65534 /data from-image\n"
    );
}

#[test]
fn corrupt_archive_is_refused_in_one_line_and_the_store_is_unchanged() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    let before = store_snapshot(&env.data);
    let layer = busybox_layer(env.tmp.path());
    let good = oci_archive(env.tmp.path(), &layer, "gzip", "bad/one:1");
    let mut bytes = fs::read(&good).unwrap();
    // Flip a byte inside the gzip layer blob (tar padding would not count).
    let at = bytes
        .windows(3)
        .position(|w| w == [0x1f, 0x8b, 0x08])
        .expect("the gzip blob is in the archive")
        + 1000;
    bytes[at] ^= 0x55;
    let bad = env.tmp.path().join("bad.tar");
    fs::write(&bad, &bytes).unwrap();
    let out = env.evoke(&["image", "import", bad.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("bad.tar"), "{err}");
    // Truncated too.
    let cut = env.tmp.path().join("cut.tar");
    fs::write(&cut, &fs::read(&good).unwrap()[..bytes.len() / 2]).unwrap();
    let out = env.evoke(&["image", "import", cut.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(store_snapshot(&env.data), before);
    assert_eq!(
        env.ok(&["image", "ls"]).lines().count(),
        2,
        "still just busybox"
    );
    assert_eq!(
        fs::read_dir(env.data.join("images/tmp")).unwrap().count(),
        0
    );
}

#[test]
fn image_in_use_by_a_container_is_not_removed() {
    if !can_run_containers() {
        return;
    }
    let env = Env::with_busybox();
    env.ok(&["run", "--name", "user", "busybox", "true"]);
    let out = env.evoke(&["image", "rm", "busybox"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("in use by container"),
        "{}",
        text(&out.stderr)
    );
    env.ok(&["rm", "user"]);
    env.ok(&["image", "rm", "busybox"]);
}

#[test]
fn import_reads_an_archive_from_stdin() {
    if !can_run_containers() {
        return;
    }
    let env = Env::new();
    let archive = docker_save_archive(env.tmp.path(), "piped:1");
    let out = env
        .cmd(&["image", "import", "-"])
        .stdin(fs::File::open(&archive).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("piped:1"));
    assert_eq!(
        fs::read_dir(env.data.join("images/tmp")).unwrap().count(),
        0
    );
    assert_eq!(
        env.ok(&["run", "--rm", "piped:1"]),
        "65534:65534 /data from-image\n"
    );
}
