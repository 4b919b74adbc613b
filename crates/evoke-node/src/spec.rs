//! From a pod's container to a [`WorkloadSpec`]: command and args with
//! `$(VAR)` expansion, env (literal, valueFrom, envFrom), resources and
//! volume mounts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use evoke_runtime::{CpuLimit, Mount, Resources, WorkloadSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::ResourceExt;

use crate::NodeError;

/// Config data the pod refers to, fetched before its containers start.
#[derive(Debug, Default, Clone)]
pub struct Refs {
    pub config_maps: HashMap<String, ConfigMap>,
    pub secrets: HashMap<String, Secret>,
}

impl Refs {
    fn config_map(&self, name: &str, key: &str) -> Option<String> {
        let cm = self.config_maps.get(name)?;
        cm.data
            .as_ref()
            .and_then(|d| d.get(key).cloned())
            .or_else(|| {
                cm.binary_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            })
    }
    fn secret(&self, name: &str, key: &str) -> Option<String> {
        let s = self.secrets.get(name)?;
        s.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .or_else(|| s.string_data.as_ref().and_then(|d| d.get(key).cloned()))
    }
}

/// A referenced object's name and whether it is optional.
pub type Named = (String, bool);

/// The names of ConfigMaps and Secrets a pod needs (env and volumes), with
/// whether each is optional.
pub fn referenced(pod: &Pod) -> (Vec<Named>, Vec<Named>) {
    let mut cms = Vec::new();
    let mut secrets = Vec::new();
    let Some(spec) = pod.spec.as_ref() else {
        return (cms, secrets);
    };
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
    {
        for e in c.env.iter().flatten() {
            if let Some(vf) = e.value_from.as_ref() {
                if let Some(r) = vf.config_map_key_ref.as_ref() {
                    cms.push((r.name.clone(), r.optional.unwrap_or(false)));
                }
                if let Some(r) = vf.secret_key_ref.as_ref() {
                    secrets.push((r.name.clone(), r.optional.unwrap_or(false)));
                }
            }
        }
        for ef in c.env_from.iter().flatten() {
            if let Some(r) = ef.config_map_ref.as_ref() {
                cms.push((r.name.clone(), r.optional.unwrap_or(false)));
            }
            if let Some(r) = ef.secret_ref.as_ref() {
                secrets.push((r.name.clone(), r.optional.unwrap_or(false)));
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = v.config_map.as_ref() {
            cms.push((cm.name.clone(), cm.optional.unwrap_or(false)));
        }
        if let Some(s) = v.secret.as_ref() {
            secrets.push((
                s.secret_name.clone().unwrap_or_default(),
                s.optional.unwrap_or(false),
            ));
        }
    }
    cms.sort();
    cms.dedup();
    secrets.sort();
    secrets.dedup();
    (cms, secrets)
}

/// Values of `fieldRef` paths.
fn field_ref(pod: &Pod, path: &str, host_ip: &str, pod_ip: &str) -> Option<String> {
    let spec = pod.spec.as_ref();
    let sub = |prefix: &str, map: &BTreeMap<String, String>| {
        let k = path.strip_prefix(prefix)?.strip_suffix("']")?;
        map.get(k).cloned()
    };
    match path {
        "metadata.name" => Some(pod.name_any()),
        "metadata.namespace" => pod.namespace(),
        "metadata.uid" => pod.uid(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.hostIP" => Some(host_ip.to_string()),
        "status.podIP" | "status.podIPs" => Some(pod_ip.to_string()),
        p if p.starts_with("metadata.labels['") => sub("metadata.labels['", pod.labels()),
        p if p.starts_with("metadata.annotations['") => {
            sub("metadata.annotations['", pod.annotations())
        }
        _ => None,
    }
}

/// Expands `$(NAME)` from `env`; `$$` escapes; unknown names stay as written.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment, in order: envFrom, then env (later wins).
pub fn environment(
    pod: &Pod,
    c: &Container,
    refs: &Refs,
    host_ip: &str,
    pod_ip: &str,
) -> Result<Vec<(String, String)>, NodeError> {
    let mut env: Vec<(String, String)> = Vec::new();
    let missing = |what: String| NodeError::Config {
        pod: pod.name_any(),
        container: c.name.clone(),
        reason: what,
    };
    for ef in c.env_from.iter().flatten() {
        let prefix = ef.prefix.clone().unwrap_or_default();
        if let Some(r) = ef.config_map_ref.as_ref() {
            match refs.config_maps.get(&r.name) {
                Some(cm) => {
                    for (k, v) in cm.data.iter().flatten() {
                        env.push((format!("{prefix}{k}"), v.clone()));
                    }
                }
                None if r.optional.unwrap_or(false) => {}
                None => return Err(missing(format!("configmap {:?} not found", r.name))),
            }
        }
        if let Some(r) = ef.secret_ref.as_ref() {
            match refs.secrets.get(&r.name) {
                Some(s) => {
                    for (k, v) in s.data.iter().flatten() {
                        env.push((
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v.0).into_owned(),
                        ));
                    }
                }
                None if r.optional.unwrap_or(false) => {}
                None => return Err(missing(format!("secret {:?} not found", r.name))),
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = e.value.as_ref() {
            Some(expand(v, &env))
        } else if let Some(vf) = e.value_from.as_ref() {
            if let Some(r) = vf.config_map_key_ref.as_ref() {
                match refs.config_map(&r.name, &r.key) {
                    Some(v) => Some(v),
                    None if r.optional.unwrap_or(false) => None,
                    None => {
                        return Err(missing(format!(
                            "key {:?} of configmap {:?} not found",
                            r.key, r.name
                        )))
                    }
                }
            } else if let Some(r) = vf.secret_key_ref.as_ref() {
                match refs.secret(&r.name, &r.key) {
                    Some(v) => Some(v),
                    None if r.optional.unwrap_or(false) => None,
                    None => {
                        return Err(missing(format!(
                            "key {:?} of secret {:?} not found",
                            r.key, r.name
                        )))
                    }
                }
            } else if let Some(f) = vf.field_ref.as_ref() {
                field_ref(pod, &f.field_path, host_ip, pod_ip)
            } else if let Some(r) = vf.resource_field_ref.as_ref() {
                resource_field(c, &r.resource)
            } else {
                None
            }
        } else {
            Some(String::new())
        };
        if let Some(v) = value {
            env.retain(|(k, _)| k != &e.name);
            env.push((e.name.clone(), v));
        }
    }
    Ok(env)
}

fn resource_field(c: &Container, resource: &str) -> Option<String> {
    let (kind, name) = resource.split_once('.')?;
    let res = c.resources.as_ref()?;
    let list = if kind == "limits" {
        res.limits.as_ref()
    } else {
        res.requests.as_ref()
    }?;
    let q = list.get(name)?;
    Some(if name == "cpu" {
        // Rounded up to whole cores, as the downward API does with divisor 1.
        let m = evoke_scheduler::resources::cpu_milli(q);
        ((m + 999) / 1000).to_string()
    } else {
        evoke_scheduler::resources::value(q).to_string()
    })
}

/// Limits mapped onto the tier: memory bytes and a CFS quota.
pub fn resources(c: &Container) -> Resources {
    let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
    let mut r = Resources::default();
    if let Some(l) = limits {
        if let Some(m) = l.get("memory") {
            let v = evoke_scheduler::resources::value(m);
            if v > 0 {
                r.memory_bytes = Some(v as u64);
            }
        }
        if let Some(cpu) = l.get("cpu") {
            let m = evoke_scheduler::resources::cpu_milli(cpu);
            if m > 0 {
                r.cpu = Some(CpuLimit::from_millicores(m as u64));
            }
        }
    }
    r
}

/// Mounts for a container, given where each pod volume lives on the host.
pub fn mounts(
    pod: &Pod,
    c: &Container,
    volume_dirs: &HashMap<String, PathBuf>,
) -> Result<Vec<Mount>, NodeError> {
    let mut out = Vec::new();
    for vm in c.volume_mounts.iter().flatten() {
        let Some(dir) = volume_dirs.get(&vm.name) else {
            return Err(NodeError::Config {
                pod: pod.name_any(),
                container: c.name.clone(),
                reason: format!("volume {:?} is not defined or not supported", vm.name),
            });
        };
        let mut host_path = dir.clone();
        if let Some(sp) = vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
            if Path::new(sp)
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
                || sp.starts_with('/')
            {
                return Err(NodeError::Config {
                    pod: pod.name_any(),
                    container: c.name.clone(),
                    reason: format!("subPath {sp:?} must be relative and stay inside the volume"),
                });
            }
            host_path = host_path.join(sp);
        }
        out.push(Mount {
            host_path,
            container_path: PathBuf::from(&vm.mount_path),
            read_only: vm.read_only.unwrap_or(false),
        });
    }
    Ok(out)
}

/// The id a container's workload gets: unique per pod, container and
/// restart, and recognisable after an agent restart.
pub fn workload_id(pod_uid: &str, container: &str, attempt: i32) -> String {
    let clean: String = container
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{pod_uid}_{clean}_{attempt}")
}

/// Labels the agent keeps on each workload to find it again.
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_CONTAINER: &str = "io.kubernetes.container.name";
pub const LABEL_ATTEMPT: &str = "io.kubernetes.container.restartCount";
/// Asks the container tier for a user namespace with a block of ids shared
/// by the pod's containers (`pod:UID`, for a pod with `hostUsers: false`);
/// evoke-container's `tier::USERNS_LABEL` (the two must agree).
pub const LABEL_USER_NAMESPACE: &str = "evoke.io/user-namespace";

/// Everything about one container start, except the namespaces.
#[allow(clippy::too_many_arguments)]
pub fn workload_spec(
    pod: &Pod,
    c: &Container,
    attempt: i32,
    refs: &Refs,
    volume_dirs: &HashMap<String, PathBuf>,
    host_ip: &str,
    pod_ip: &str,
    log_path: PathBuf,
) -> Result<WorkloadSpec, NodeError> {
    let uid = pod.uid().unwrap_or_default();
    let env = environment(pod, c, refs, host_ip, pod_ip)?;
    let command = c
        .command
        .as_ref()
        .map(|v| v.iter().map(|s| expand(s, &env)).collect());
    let args = c
        .args
        .as_ref()
        .map(|v| v.iter().map(|s| expand(s, &env)).collect());
    let user = c
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_user)
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.security_context.as_ref())
                .and_then(|s| s.run_as_user)
        })
        .map(|uid| evoke_runtime::User {
            uid: uid as u32,
            gid: c
                .security_context
                .as_ref()
                .and_then(|s| s.run_as_group)
                .or_else(|| {
                    pod.spec
                        .as_ref()
                        .and_then(|s| s.security_context.as_ref())
                        .and_then(|s| s.run_as_group)
                })
                .unwrap_or(0) as u32,
        });
    let mut labels = BTreeMap::from([
        (LABEL_POD_UID.to_string(), uid.clone()),
        (LABEL_POD_NAME.to_string(), pod.name_any()),
        (
            LABEL_POD_NAMESPACE.to_string(),
            pod.namespace().unwrap_or_default(),
        ),
        (LABEL_CONTAINER.to_string(), c.name.clone()),
        (LABEL_ATTEMPT.to_string(), attempt.to_string()),
    ]);
    // hostUsers: false: user namespaces with one id block for the pod.
    if pod.spec.as_ref().and_then(|s| s.host_users) == Some(false) {
        labels.insert(LABEL_USER_NAMESPACE.to_string(), format!("pod:{uid}"));
    }
    let hostname = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .unwrap_or_else(|| pod.name_any());
    Ok(WorkloadSpec {
        id: workload_id(&uid, &c.name, attempt),
        image: c.image.clone(),
        command,
        args,
        env,
        workdir: c.working_dir.clone(),
        user,
        tty: c.tty.unwrap_or(false),
        stdin: c.stdin.unwrap_or(false),
        resources: resources(c),
        mounts: mounts(pod, c, volume_dirs)?,
        hostname: Some(hostname.chars().take(63).collect()),
        network_namespace: None,
        ipc_namespace: None,
        guest_network: None,
        log_path: Some(log_path),
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "prod", "uid": "1234", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{
                "name": "c", "image": "busybox",
                "command": ["sh", "-c"], "args": ["echo $(GREETING) $$(HOME)"],
                "env": [
                    {"name": "GREETING", "value": "hello-$(NAME)"},
                    {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "k"}}},
                    {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "pw"}}},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}
                ],
                "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
                "resources": {"limits": {"memory": "64Mi", "cpu": "500m"}},
                "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "data", "mountPath": "/sub", "subPath": "x", "readOnly": true}]
            }]}
        }))
        .unwrap()
    }
    fn refs() -> Refs {
        let cm: ConfigMap = serde_json::from_value(
            json!({"metadata": {"name": "cfg"}, "data": {"k": "v", "NAME": "world"}}),
        )
        .unwrap();
        let s: Secret = serde_json::from_value(
            json!({"metadata": {"name": "sec"}, "data": {"pw": "czNjcmV0"}}),
        )
        .unwrap();
        Refs {
            config_maps: [("cfg".to_string(), cm)].into(),
            secrets: [("sec".to_string(), s)].into(),
        }
    }

    #[test]
    fn env_resolves_literals_config_maps_secrets_and_field_refs() {
        let p = pod();
        let c = &p.spec.as_ref().unwrap().containers[0];
        let env: HashMap<String, String> = environment(&p, c, &refs(), "10.0.0.1", "10.42.0.5")
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(env["FROM_CM"], "v");
        assert_eq!(env["FROM_SECRET"], "s3cret");
        assert_eq!(env["POD"], "web");
        assert_eq!(env["APP"], "web");
        assert_eq!(env["NODE_IP"], "10.0.0.1");
        assert_eq!(env["CFG_k"], "v");
        // $(VAR) expands from earlier entries (envFrom comes first).
        assert_eq!(env["GREETING"], "hello-$(NAME)");
    }

    #[test]
    fn missing_required_config_map_is_a_clear_error() {
        let p = pod();
        let c = &p.spec.as_ref().unwrap().containers[0];
        let err = environment(&p, c, &Refs::default(), "", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("configmap \"cfg\" not found"), "{err}");
    }

    #[test]
    fn dollar_paren_expansion_and_escape() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("$(A)-$$(A)-$(B)-$", &env), "1-$(A)-$(B)-$");
    }

    #[test]
    fn workload_spec_carries_limits_mounts_args_and_labels() {
        let p = pod();
        let c = &p.spec.as_ref().unwrap().containers[0];
        let dirs: HashMap<String, PathBuf> = [(
            "data".to_string(),
            PathBuf::from("/var/lib/evoke/pods/1234/volumes/data"),
        )]
        .into();
        let w = workload_spec(
            &p,
            c,
            2,
            &refs(),
            &dirs,
            "10.0.0.1",
            "",
            PathBuf::from("/tmp/log"),
        )
        .unwrap();
        assert_eq!(w.id, "1234_c_2");
        assert_eq!(w.resources.memory_bytes, Some(64 << 20));
        assert_eq!(w.resources.cpu.map(|c| c.millicores()), Some(500));
        assert_eq!(w.args, Some(vec!["echo hello-$(NAME) $(HOME)".to_string()]));
        assert_eq!(
            w.mounts[1].host_path,
            PathBuf::from("/var/lib/evoke/pods/1234/volumes/data/x")
        );
        assert!(w.mounts[1].read_only);
        assert_eq!(w.labels[LABEL_ATTEMPT], "2");
    }

    #[test]
    fn subpath_cannot_escape_the_volume() {
        let mut p = pod();
        p.spec.as_mut().unwrap().containers[0]
            .volume_mounts
            .as_mut()
            .unwrap()[1]
            .sub_path = Some("../../etc".into());
        let c = &p.spec.as_ref().unwrap().containers[0];
        let dirs: HashMap<String, PathBuf> = [("data".to_string(), PathBuf::from("/v"))].into();
        assert!(mounts(&p, c, &dirs).is_err());
    }
}
