//! Pod volumes on the host: emptyDir, configMap, secret, hostPath, and the
//! configMap/secret/downwardAPI parts of projected volumes.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{KeyToPath, Pod};
use kube::ResourceExt;

use crate::spec::Refs;
use crate::NodeError;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_items(
    dir: &Path,
    data: &[(String, Vec<u8>)],
    items: Option<&Vec<KeyToPath>>,
    mode: u32,
) -> Result<(), NodeError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut files: Vec<(String, &[u8], u32)> = Vec::new();
    match items {
        Some(items) => {
            for it in items {
                if let Some((_, v)) = data.iter().find(|(k, _)| *k == it.key) {
                    files.push((
                        it.path.clone(),
                        v,
                        it.mode.map(|m| m as u32).unwrap_or(mode),
                    ));
                }
            }
        }
        None => files.extend(data.iter().map(|(k, v)| (k.clone(), v.as_slice(), mode))),
    }
    for (rel, bytes, m) in files {
        if rel.starts_with('/')
            || Path::new(&rel)
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(NodeError::Io {
                path: dir.join(&rel),
                source: std::io::Error::other(
                    "volume item path must be relative and stay inside the volume",
                ),
            });
        }
        let p = dir.join(&rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        fs::write(&p, bytes).map_err(io(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(m & 0o777)).map_err(io(&p))?;
    }
    Ok(())
}

fn cm_data(refs: &Refs, name: &str) -> Option<Vec<(String, Vec<u8>)>> {
    let cm = refs.config_maps.get(name)?;
    let mut v: Vec<(String, Vec<u8>)> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    v.extend(
        cm.binary_data
            .iter()
            .flatten()
            .map(|(k, b)| (k.clone(), b.0.clone())),
    );
    Some(v)
}

fn secret_data(refs: &Refs, name: &str) -> Option<Vec<(String, Vec<u8>)>> {
    let s = refs.secrets.get(name)?;
    let mut v: Vec<(String, Vec<u8>)> = s
        .data
        .iter()
        .flatten()
        .map(|(k, b)| (k.clone(), b.0.clone()))
        .collect();
    v.extend(
        s.string_data
            .iter()
            .flatten()
            .map(|(k, s)| (k.clone(), s.clone().into_bytes())),
    );
    Some(v)
}

/// Creates every volume of `pod` under `pod_dir/volumes` and returns the
/// host directory of each by name.
pub fn prepare(
    pod: &Pod,
    refs: &Refs,
    pod_dir: &Path,
) -> Result<HashMap<String, PathBuf>, NodeError> {
    let mut out = HashMap::new();
    let base = pod_dir.join("volumes");
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
    {
        let dir = base.join(&v.name);
        let missing = |what: &str, name: &str| NodeError::Config {
            pod: pod.name_any(),
            container: String::new(),
            reason: format!("volume {:?}: {what} {name:?} not found", v.name),
        };
        if v.empty_dir.is_some() {
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).map_err(io(&dir))?;
        } else if let Some(cm) = v.config_map.as_ref() {
            match cm_data(refs, &cm.name) {
                Some(d) => write_items(
                    &dir,
                    &d,
                    cm.items.as_ref(),
                    cm.default_mode.unwrap_or(0o644) as u32,
                )?,
                None if cm.optional.unwrap_or(false) => {
                    fs::create_dir_all(&dir).map_err(io(&dir))?
                }
                None => return Err(missing("configmap", &cm.name)),
            }
        } else if let Some(s) = v.secret.as_ref() {
            let name = s.secret_name.clone().unwrap_or_default();
            match secret_data(refs, &name) {
                Some(d) => write_items(
                    &dir,
                    &d,
                    s.items.as_ref(),
                    s.default_mode.unwrap_or(0o644) as u32,
                )?,
                None if s.optional.unwrap_or(false) => {
                    fs::create_dir_all(&dir).map_err(io(&dir))?
                }
                None => return Err(missing("secret", &name)),
            }
        } else if let Some(hp) = v.host_path.as_ref() {
            let p = PathBuf::from(&hp.path);
            match hp.type_.as_deref().unwrap_or("") {
                "DirectoryOrCreate" => fs::create_dir_all(&p).map_err(io(&p))?,
                "FileOrCreate" if !p.exists() => {
                    if let Some(parent) = p.parent() {
                        fs::create_dir_all(parent).map_err(io(parent))?;
                    }
                    fs::write(&p, b"").map_err(io(&p))?;
                }
                "Directory" if !p.is_dir() => return Err(missing("hostPath directory", &hp.path)),
                "File" if !p.is_file() => return Err(missing("hostPath file", &hp.path)),
                _ => {}
            }
            out.insert(v.name.clone(), p);
            continue;
        } else if let Some(pr) = v.projected.as_ref() {
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            let mode = pr.default_mode.unwrap_or(0o644) as u32;
            for src in pr.sources.iter().flatten() {
                if let Some(cm) = src.config_map.as_ref() {
                    if let Some(d) = cm_data(refs, &cm.name) {
                        write_items(&dir, &d, cm.items.as_ref(), mode)?;
                    }
                }
                if let Some(s) = src.secret.as_ref() {
                    if let Some(d) = secret_data(refs, &s.name) {
                        write_items(&dir, &d, s.items.as_ref(), mode)?;
                    }
                }
                if let Some(da) = src.downward_api.as_ref() {
                    for it in da.items.iter().flatten() {
                        let val = match it.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                            Some("metadata.name") => pod.name_any(),
                            Some("metadata.namespace") => pod.namespace().unwrap_or_default(),
                            Some("metadata.uid") => pod.uid().unwrap_or_default(),
                            Some("metadata.labels") => pod
                                .labels()
                                .iter()
                                .map(|(k, v)| format!("{k}=\"{v}\"\n"))
                                .collect(),
                            Some("metadata.annotations") => pod
                                .annotations()
                                .iter()
                                .map(|(k, v)| format!("{k}=\"{v}\"\n"))
                                .collect(),
                            _ => String::new(),
                        };
                        write_items(&dir, &[(it.path.clone(), val.into_bytes())], None, mode)?;
                    }
                }
            }
            // serviceAccountToken sources: evoke issues no per-pod tokens; the
            // namespace file still helps in-cluster clients find their namespace.
            if pr
                .sources
                .iter()
                .flatten()
                .any(|s| s.service_account_token.is_some())
            {
                write_items(
                    &dir,
                    &[(
                        "namespace".into(),
                        pod.namespace().unwrap_or_default().into_bytes(),
                    )],
                    None,
                    mode,
                )?;
            }
        } else {
            // Other kinds (PVCs, CSI…) are not served on this node: give an
            // empty directory so the pod still starts, and say so in the log.
            tracing::warn!(pod = %pod.name_any(), volume = %v.name, "unsupported volume type; using an empty directory");
            fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        out.insert(v.name.clone(), dir);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use serde_json::json;

    #[test]
    fn config_map_secret_empty_dir_and_host_path_volumes_are_materialised() {
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().join("host/dir");
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": [], "volumes": [
                {"name": "scratch", "emptyDir": {}},
                {"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "a", "path": "sub/a.txt"}]}},
                {"name": "sec", "secret": {"secretName": "sec", "defaultMode": 0o400}},
                {"name": "host", "hostPath": {"path": host.to_str().unwrap(), "type": "DirectoryOrCreate"}}
            ]}}))
        .unwrap();
        let cm: ConfigMap = serde_json::from_value(
            json!({"metadata": {"name": "cfg"}, "data": {"a": "1", "b": "2"}}),
        )
        .unwrap();
        let s: Secret =
            serde_json::from_value(json!({"metadata": {"name": "sec"}, "data": {"pw": "aGk="}}))
                .unwrap();
        let refs = Refs {
            config_maps: [("cfg".into(), cm)].into(),
            secrets: [("sec".into(), s)].into(),
        };
        let dirs = prepare(&pod, &refs, &tmp.path().join("pod")).unwrap();
        assert!(dirs["scratch"].is_dir());
        assert_eq!(
            fs::read_to_string(dirs["cfg"].join("sub/a.txt")).unwrap(),
            "1"
        );
        assert!(!dirs["cfg"].join("b").exists());
        let pw = dirs["sec"].join("pw");
        assert_eq!(fs::read_to_string(&pw).unwrap(), "hi");
        assert_eq!(
            fs::metadata(&pw).unwrap().permissions().mode() & 0o777,
            0o400
        );
        assert_eq!(dirs["host"], host);
        assert!(host.is_dir());
    }

    #[test]
    fn missing_required_config_map_volume_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"},
            "spec": {"containers": [], "volumes": [{"name": "cfg", "configMap": {"name": "absent"}}]}}))
        .unwrap();
        let err = prepare(&pod, &Refs::default(), tmp.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("configmap \"absent\" not found"), "{err}");
    }
}
