//! Image store tests: archives are made here with the tar crate, so they run
//! with no registry and no docker.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::*;

/// A file or a directory in a test layer.
enum E<'a> {
    File(&'a str, &'a [u8]),
    Dir(&'a str),
}

fn layer_tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = header();
        match e {
            E::File(p, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                b.append_data(&mut h, p, *data).unwrap();
            }
            E::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// A header with the numeric fields every real tar writer fills in.
fn header() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 1).unwrap()
}

fn hex(d: &str) -> &str {
    d.trim_start_matches("sha256:")
}

fn config_json(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "created": "2024-01-02T03:04:05Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "HELLO=world"], "Entrypoint": ["/bin/echo"], "Cmd": ["hi"], "WorkingDir": "/srv", "User": "1000:1000"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap()
}

/// Add a regular file to an outer archive.
fn add(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = header();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, path, data).unwrap();
}

/// An OCI image layout tarball with the given (uncompressed layer, blob) pairs.
fn oci_archive(layers: &[(Vec<u8>, Vec<u8>, &str)], ref_name: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|(raw, _, _)| sha256_hex(raw)).collect();
    let config = config_json(&diff_ids);
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|(_, blob, mt)| {
            serde_json::json!({"mediaType": mt, "digest": sha256_hex(blob), "size": blob.len()})
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_hex(&config), "size": config.len()},
        "layers": layer_descs,
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha256_hex(&manifest), "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": ref_name}
        }]
    }))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    add(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add(&mut b, "index.json", &index);
    for blob in [&config, &manifest] {
        add(
            &mut b,
            &format!("blobs/sha256/{}", hex(&sha256_hex(blob))),
            blob,
        );
    }
    for (_, blob, _) in layers {
        add(
            &mut b,
            &format!("blobs/sha256/{}", hex(&sha256_hex(blob))),
            blob,
        );
    }
    b.into_inner().unwrap()
}

/// A legacy `docker save` archive: `<id>/layer.tar` and `<config-hex>.json`.
fn docker_archive(raw_layers: &[Vec<u8>], tag: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = raw_layers.iter().map(|l| sha256_hex(l)).collect();
    let config = config_json(&diff_ids);
    let config_name = format!("{}.json", hex(&sha256_hex(&config)));
    let layer_names: Vec<String> = diff_ids
        .iter()
        .map(|d| format!("{}/layer.tar", &hex(d)[..16]))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name, "RepoTags": [tag], "Layers": layer_names
    }]))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    add(&mut b, &config_name, &config);
    for (name, raw) in layer_names.iter().zip(raw_layers) {
        add(&mut b, name, raw);
    }
    add(&mut b, "manifest.json", &manifest);
    b.into_inner().unwrap()
}

fn base_layer() -> Vec<u8> {
    layer_tar(&[
        E::Dir("etc/"),
        E::File("etc/os-release", b"NAME=test\n"),
        E::File("etc/gone", b"bye\n"),
        E::Dir("srv/"),
        E::File("srv/old", b"old\n"),
    ])
}

fn top_layer() -> Vec<u8> {
    layer_tar(&[
        E::File("etc/.wh.gone", b""),
        E::Dir("srv/"),
        E::File("srv/.wh..wh..opq", b""),
        E::File("srv/new", b"new\n"),
    ])
}

struct Fixture {
    _tmp: tempfile::TempDir,
    store: ImageStore,
    dir: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("data")).unwrap();
    let dir = tmp.path().to_path_buf();
    Fixture {
        _tmp: tmp,
        store,
        dir,
    }
}

fn write(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, data).unwrap();
    p
}

/// Names in a store directory, to show it did not change.
fn snapshot(store: &ImageStore) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for sub in ["blobs/sha256", "layers", "tmp"] {
        for e in fs::read_dir(store.root().join(sub)).unwrap() {
            out.insert(format!(
                "{sub}/{}",
                e.unwrap().file_name().to_string_lossy()
            ));
        }
    }
    if let Ok(b) = fs::read(store.root().join("index.json")) {
        out.insert(String::from_utf8(b).unwrap());
    }
    out
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whiteouts need root (mknod, trusted.* xattrs); under CI we are root.
fn need_root() -> bool {
    if is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root (whiteouts are device nodes and trusted.* xattrs)");
    }
    eprintln!("skipping: not root");
    false
}

#[test]
fn oci_layout_with_gzip_layers_is_imported_with_overlay_whiteouts() {
    if !need_root() {
        return;
    }
    let f = fixture();
    let (base, top) = (base_layer(), top_layer());
    let gz = oci_archive(
        &[
            (
                base.clone(),
                gzip(&base),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            ),
            (
                top.clone(),
                gzip(&top),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            ),
        ],
        "example.com/app:1.0",
    );
    let file = write(&f.dir, "app.tar", &gz);
    let imported = f.store.import(&file, &ImportOptions::default()).unwrap();
    assert_eq!(imported.len(), 1);
    let img = f.store.resolve("example.com/app:1.0").unwrap();
    assert_eq!(img.tags, vec!["example.com/app:1.0".to_string()]);
    assert_eq!(img.layer_dirs.len(), 2);
    let (lower, upper) = (&img.layer_dirs[0], &img.layer_dirs[1]);
    assert_eq!(
        fs::read(lower.join("etc/os-release")).unwrap(),
        b"NAME=test\n"
    );
    // `.wh.gone` became a 0/0 character device named `gone`.
    let wh = fs::symlink_metadata(upper.join("etc/gone")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert!(!upper.join("etc/.wh.gone").exists());
    // `.wh..wh..opq` became the opaque xattr on srv.
    assert_eq!(
        xattr::get(upper.join("srv"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert!(!upper.join("srv/.wh..wh..opq").exists());
    assert_eq!(fs::read(upper.join("srv/new")).unwrap(), b"new\n");
    let cfg = img.config.config().as_ref().unwrap();
    assert_eq!(
        cfg.entrypoint().as_ref().unwrap(),
        &vec!["/bin/echo".to_string()]
    );
}

#[test]
fn zstd_image_shares_unpacked_layers_with_a_gzip_image() {
    if !need_root() {
        return;
    }
    let f = fixture();
    let (base, top) = (base_layer(), top_layer());
    let a = oci_archive(
        &[(
            base.clone(),
            gzip(&base),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )],
        "a:1",
    );
    let b = oci_archive(
        &[
            (
                base.clone(),
                zstd(&base),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
            (
                top.clone(),
                zstd(&top),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        ],
        "b:1",
    );
    f.store
        .import(&write(&f.dir, "a.tar", &a), &ImportOptions::default())
        .unwrap();
    f.store
        .import(&write(&f.dir, "b.tar", &b), &ImportOptions::default())
        .unwrap();
    let (ia, ib) = (
        f.store.resolve("a:1").unwrap(),
        f.store.resolve("b:1").unwrap(),
    );
    assert_eq!(
        ia.layer_dirs[0], ib.layer_dirs[0],
        "same diff_id, one directory"
    );
    let layers = fs::read_dir(f.store.root().join("layers")).unwrap().count();
    assert_eq!(layers, 2);
    // Removing b keeps the base layer a still uses, and drops b's own.
    f.store.remove("b:1").unwrap();
    assert!(ia.layer_dirs[0].is_dir());
    assert!(!ib.layer_dirs[1].exists());
    assert!(matches!(
        f.store.resolve("b:1"),
        Err(ImageError::NotFound(_))
    ));
    f.store.remove("a:1").unwrap();
    assert_eq!(
        fs::read_dir(f.store.root().join("layers")).unwrap().count(),
        0
    );
    assert_eq!(
        fs::read_dir(f.store.root().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn docker_save_archive_is_imported_with_its_repo_tags() {
    let f = fixture();
    let raw = layer_tar(&[
        E::Dir("bin/"),
        E::File("bin/hello", b"#!/bin/sh\necho hi\n"),
    ]);
    let arch = docker_archive(std::slice::from_ref(&raw), "docker.io/library/hello:2");
    let file = write(&f.dir, "hello.tar", &arch);
    f.store.import(&file, &ImportOptions::default()).unwrap();
    let img = f.store.resolve("hello:2").unwrap();
    assert_eq!(img.tags, vec!["hello:2".to_string()]);
    assert_eq!(
        fs::read(img.layer_dirs[0].join("bin/hello")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    // The same image by id prefix, by full id, and through docker.io naming.
    let short = img.short_id().to_string();
    assert_eq!(f.store.resolve(&short).unwrap().id, img.id);
    assert_eq!(f.store.resolve(&img.id).unwrap().id, img.id);
    assert_eq!(
        f.store.resolve("docker.io/library/hello:2").unwrap().id,
        img.id
    );
}

#[test]
fn gzip_compressed_docker_save_archive_is_accepted() {
    let f = fixture();
    let raw = layer_tar(&[E::File("x", b"x")]);
    let arch = gzip(&docker_archive(&[raw], "zipped:latest"));
    let file = write(&f.dir, "zipped.tar.gz", &arch);
    f.store.import(&file, &ImportOptions::default()).unwrap();
    assert!(f.store.resolve("zipped").is_ok());
}

#[test]
fn corrupt_layer_is_refused_and_the_store_is_unchanged() {
    let f = fixture();
    let good = layer_tar(&[E::File("ok", b"fine")]);
    f.store
        .import(
            &write(&f.dir, "good.tar", &docker_archive(&[good], "good:1")),
            &ImportOptions::default(),
        )
        .unwrap();
    let before = snapshot(&f.store);

    let raw = layer_tar(&[E::File("a", &[b'a'; 5000])]);
    let blob = gzip(&raw);
    let digest = sha256_hex(&blob);
    let mut arch = oci_archive(
        &[(
            raw.clone(),
            blob.clone(),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )],
        "bad:1",
    );
    // Flip one byte of the layer blob inside the archive.
    let pos = arch
        .windows(blob.len())
        .position(|w| w == blob.as_slice())
        .unwrap();
    arch[pos + blob.len() / 2] ^= 0xff;
    let err = f
        .store
        .import(&write(&f.dir, "bad.tar", &arch), &ImportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt image archive"), "{err}");
    assert!(err.contains(&digest), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    assert_eq!(snapshot(&f.store), before);
}

#[test]
fn layer_not_matching_its_diff_id_is_refused() {
    let f = fixture();
    let raw = layer_tar(&[E::File("a", b"a")]);
    let other = layer_tar(&[E::File("b", b"b")]);
    // The config claims `raw`, the archive carries `other`, named as `raw`.
    let mut arch = docker_archive(std::slice::from_ref(&raw), "liar:1");
    let pos = arch
        .windows(raw.len())
        .position(|w| w == raw.as_slice())
        .unwrap();
    arch[pos..pos + other.len()].copy_from_slice(&other);
    let before = snapshot(&f.store);
    let err = f
        .store
        .import(&write(&f.dir, "liar.tar", &arch), &ImportOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("but the config says"), "{err}");
    assert_eq!(snapshot(&f.store), before);
}

#[test]
fn truncated_archive_is_refused_and_the_store_is_unchanged() {
    let f = fixture();
    let raw = layer_tar(&[E::File("big", &[7u8; 20_000])]);
    let arch = oci_archive(
        &[(
            raw.clone(),
            gzip(&raw),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )],
        "t:1",
    );
    for cut in [arch.len() / 3, arch.len() / 2, arch.len() - 1500] {
        let before = snapshot(&f.store);
        let err = f
            .store
            .import(
                &write(&f.dir, "t.tar", &arch[..cut]),
                &ImportOptions::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.tar"), "{err}");
        assert_eq!(snapshot(&f.store), before, "cut at {cut}: {err}");
    }
    // Gzip-compressed and truncated too.
    let gz = gzip(&arch);
    let err = f
        .store
        .import(
            &write(&f.dir, "t.tar.gz", &gz[..gz.len() / 2]),
            &ImportOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("t.tar.gz"), "{err}");
}

#[test]
fn random_bytes_are_not_an_image() {
    let f = fixture();
    let err = f
        .store
        .import(
            &write(&f.dir, "junk", &[1u8; 4096]),
            &ImportOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("junk"), "{err}");
}

#[test]
fn busybox_directory_becomes_a_one_layer_image_with_sane_defaults() {
    if !Path::new(crate::testing::HOST_BUSYBOX).exists() && std::env::var_os("CI").is_none() {
        eprintln!("skipping: no {}", crate::testing::HOST_BUSYBOX);
        return;
    }
    let f = fixture();
    let rootfs = f.dir.join("rootfs");
    crate::testing::busybox_rootfs(&rootfs).unwrap();
    let img = f
        .store
        .build_dir(&rootfs, "busybox", &ImportOptions::default())
        .unwrap();
    assert_eq!(img.tags, vec!["busybox:latest".to_string()]);
    assert_eq!(img.layer_dirs.len(), 1);
    let layer = &img.layer_dirs[0];
    assert!(layer.join("bin/busybox").is_file());
    assert_eq!(
        fs::read_link(layer.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    let cfg = img.config.config().as_ref().unwrap();
    assert_eq!(cfg.cmd().as_ref().unwrap(), &vec!["/bin/sh".to_string()]);
    assert!(cfg.env().as_ref().unwrap()[0].starts_with("PATH=/usr/local/sbin"));
    let listed = f.store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(img.size > 500_000, "busybox is big: {}", img.size);
    // Building again under the same tag moves the tag; the old image is gone
    // from the tag but still listed untagged.
    let again = f
        .store
        .build_dir(&rootfs, "busybox:latest", &ImportOptions::default())
        .unwrap();
    assert_eq!(f.store.resolve("busybox").unwrap().id, again.id);
}

#[test]
fn missing_image_is_not_found_and_maps_to_the_shared_runtime_error() {
    let f = fixture();
    let err = f.store.resolve("nope").unwrap_err();
    assert!(matches!(err, ImageError::NotFound(_)));
    let rt: crate::RuntimeError = err.into();
    assert_eq!(rt.to_string(), "image not found: nope");
}

#[test]
fn references_are_normalised_like_docker() {
    assert_eq!(normalize_reference("busybox").unwrap(), "busybox:latest");
    assert_eq!(
        normalize_reference("docker.io/library/busybox:1").unwrap(),
        "busybox:1"
    );
    assert_eq!(
        normalize_reference("localhost:5000/app").unwrap(),
        "localhost:5000/app:latest"
    );
    assert_eq!(
        split_reference("localhost:5000/app:2"),
        ("localhost:5000/app", "2")
    );
    assert!(normalize_reference("a b").is_err());
    assert_eq!(human_size(1_234_567), "1.235MB");
    assert_eq!(human_size(999), "999B");
    assert_eq!(human_duration(7200), "2 hours");
}

#[test]
fn old_docker_save_links_duplicate_layers_and_both_images_import() {
    let f = fixture();
    let raw = layer_tar(&[E::File("shared", b"same bytes")]);
    let cfg = config_json(&[sha256_hex(&raw)]);
    let cfg_name = format!("{}.json", hex(&sha256_hex(&cfg)));
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": cfg_name, "RepoTags": ["one:1"], "Layers": ["aaa/layer.tar"]},
        {"Config": cfg_name, "RepoTags": ["two:1"], "Layers": ["bbb/layer.tar"]},
    ]))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    add(&mut b, &cfg_name, &cfg);
    add(&mut b, "aaa/layer.tar", &raw);
    // Docker wrote a relative symlink for the second copy.
    let mut h = header();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "bbb/layer.tar", "../aaa/layer.tar")
        .unwrap();
    add(&mut b, "manifest.json", &manifest);
    let file = write(&f.dir, "linked.tar", &b.into_inner().unwrap());
    let imported = f.store.import(&file, &ImportOptions::default()).unwrap();
    assert_eq!(imported.len(), 1, "one image, two tags");
    let img = f.store.resolve("two:1").unwrap();
    assert_eq!(f.store.resolve("one:1").unwrap().id, img.id);
    assert_eq!(
        fs::read(img.layer_dirs[0].join("shared")).unwrap(),
        b"same bytes"
    );
}

#[test]
fn reimporting_an_image_changes_nothing_but_is_accepted() {
    let f = fixture();
    let raw = layer_tar(&[E::File("x", b"x")]);
    let file = write(&f.dir, "r.tar", &docker_archive(&[raw], "again:1"));
    f.store.import(&file, &ImportOptions::default()).unwrap();
    let before = snapshot(&f.store);
    f.store.import(&file, &ImportOptions::default()).unwrap();
    assert_eq!(snapshot(&f.store), before);
}
