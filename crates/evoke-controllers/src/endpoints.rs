//! Endpoints and EndpointSlices from each Service's selector and its pods'
//! readiness. Services without a selector are left to their owners.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};

use crate::informer::Informer;
use crate::util::{controller_ref, is_ready, map_selector_matches};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

/// The name of the slice evoke keeps for a Service.
pub fn slice_name(svc: &str) -> String {
    format!("{svc}-evoke")
}

fn target_port(svc_port: &k8s_openapi::api::core::v1::ServicePort, pod: &Pod) -> Option<i32> {
    match svc_port.target_port.as_ref() {
        None => Some(svc_port.port),
        Some(IntOrString::Int(p)) => Some(*p),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

fn pod_ref(p: &Pod) -> ObjectReference {
    ObjectReference {
        kind: Some("Pod".into()),
        name: p.metadata.name.clone(),
        namespace: p.metadata.namespace.clone(),
        uid: p.metadata.uid.clone(),
        ..Default::default()
    }
}

/// The pods backing a service: matching, addressed, not terminal.
fn backing<'a>(svc: &Service, pods: &'a [Arc<Pod>]) -> Vec<&'a Pod> {
    let Some(sel) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return Vec::new();
    };
    let mut v: Vec<&Pod> = pods
        .iter()
        .map(|p| p.as_ref())
        .filter(|p| p.namespace() == svc.namespace() && map_selector_matches(sel, p.labels()))
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .is_some_and(|ip| !ip.is_empty())
        })
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded") | Some("Failed")
            )
        })
        .collect();
    v.sort_by_key(|p| p.name_any());
    v
}

/// The DNS hostname of `p` behind `svc`: its spec.hostname when its
/// spec.subdomain names the Service (`<hostname>.<svc>.<ns>.svc...`).
fn dns_hostname(svc: &Service, p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    let hostname = spec.hostname.clone().filter(|h| !h.is_empty())?;
    (spec.subdomain.as_deref() == Some(svc.name_any().as_str())).then_some(hostname)
}

/// A service port resolved for one pod: name, target port, protocol.
type ResolvedPort = (Option<String>, i32, Option<String>);

/// The Endpoints object for a Service (subsets grouped by resolved ports).
pub fn endpoints_for(svc: &Service, pods: &[Arc<Pod>]) -> Endpoints {
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let mut groups: BTreeMap<Vec<ResolvedPort>, (Vec<EndpointAddress>, Vec<EndpointAddress>)> =
        BTreeMap::new();
    for p in backing(svc, pods) {
        let resolved: Vec<ResolvedPort> = ports
            .iter()
            .filter_map(|sp| {
                target_port(sp, p).map(|tp| (sp.name.clone(), tp, sp.protocol.clone()))
            })
            .collect();
        if resolved.is_empty() && !ports.is_empty() {
            continue;
        }
        let addr = EndpointAddress {
            ip: p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .unwrap_or_default(),
            node_name: p.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(pod_ref(p)),
            hostname: dns_hostname(svc, p),
        };
        let entry = groups.entry(resolved).or_default();
        if is_ready(p) && p.metadata.deletion_timestamp.is_none() {
            entry.0.push(addr);
        } else {
            entry.1.push(addr);
        }
    }
    let subsets: Vec<EndpointSubset> = groups
        .into_iter()
        .map(|(ports, (ready, not_ready))| EndpointSubset {
            addresses: (!ready.is_empty()).then_some(ready),
            not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
            ports: Some(
                ports
                    .into_iter()
                    .map(|(name, port, protocol)| EndpointPort {
                        name,
                        port,
                        protocol,
                        app_protocol: None,
                    })
                    .collect(),
            ),
        })
        .collect();
    Endpoints {
        metadata: ObjectMeta {
            name: svc.metadata.name.clone(),
            namespace: svc.metadata.namespace.clone(),
            labels: svc.metadata.labels.clone(),
            ..Default::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    }
}

/// The EndpointSlice for a Service.
pub fn slice_for(svc: &Service, pods: &[Arc<Pod>]) -> EndpointSlice {
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let backing = backing(svc, pods);
    let slice_ports: Vec<SlicePort> = ports
        .iter()
        .map(|sp| SlicePort {
            name: sp.name.clone(),
            port: backing.first().and_then(|p| target_port(sp, p)).or(
                match sp.target_port.as_ref() {
                    Some(IntOrString::Int(p)) => Some(*p),
                    None => Some(sp.port),
                    _ => None,
                },
            ),
            protocol: sp.protocol.clone(),
            app_protocol: None,
        })
        .collect();
    let endpoints: Vec<Endpoint> = backing
        .iter()
        .map(|p| {
            let terminating = p.metadata.deletion_timestamp.is_some();
            let ready = is_ready(p);
            Endpoint {
                addresses: vec![p
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.clone())
                    .unwrap_or_default()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready && !terminating),
                    serving: Some(ready),
                    terminating: Some(terminating),
                }),
                node_name: p.spec.as_ref().and_then(|s| s.node_name.clone()),
                target_ref: Some(pod_ref(p)),
                hostname: dns_hostname(svc, p),
                ..Default::default()
            }
        })
        .collect();
    let name = svc.name_any();
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(&name)),
            namespace: svc.namespace(),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_string(), name.clone()),
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
            ])),
            owner_references: Some(vec![controller_ref(svc)]),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(slice_ports),
    }
}

pub struct EndpointsController {
    client: Client,
    services: Informer<Service>,
    pods: Informer<Pod>,
    endpoints: Informer<Endpoints>,
    slices: Informer<EndpointSlice>,
}

impl EndpointsController {
    pub fn new(
        client: Client,
        services: Informer<Service>,
        pods: Informer<Pod>,
        endpoints: Informer<Endpoints>,
        slices: Informer<EndpointSlice>,
    ) -> Self {
        EndpointsController {
            client,
            services,
            pods,
            endpoints,
            slices,
        }
    }

    pub async fn run(self: Arc<Self>) {
        self.services.ready().await;
        self.pods.ready().await;
        self.endpoints.ready().await;
        self.slices.ready().await;
        let triggers = vec![self.services.subscribe(), self.pods.subscribe()];
        let me = self.clone();
        crate::informer::run_loop(
            "endpoints",
            triggers,
            Duration::from_secs(30),
            Duration::from_millis(50),
            move || {
                let me = me.clone();
                async move { me.reconcile().await }
            },
        )
        .await;
    }

    async fn reconcile(&self) {
        let pods = self.pods.store.state();
        let services = self.services.store.state();
        let mut live: HashSet<(String, String)> = HashSet::new();
        for svc in &services {
            let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
            live.insert((ns.clone(), name.clone()));
            if svc
                .spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .is_none_or(|s| s.is_empty())
            {
                continue;
            }
            let want = endpoints_for(svc, &pods);
            let cur =
                self.endpoints.store.state().into_iter().find(|e| {
                    e.namespace().as_deref() == Some(ns.as_str()) && e.name_any() == name
                });
            let api: Api<Endpoints> = Api::namespaced(self.client.clone(), &ns);
            match cur {
                None => {
                    if let Err(e) = api.create(&PostParams::default(), &want).await {
                        tracing::debug!(service = %name, error = %e, "could not create endpoints");
                    }
                }
                Some(cur) if cur.subsets != want.subsets => {
                    let mut next = (*cur).clone();
                    next.subsets = want.subsets.clone();
                    if let Err(e) = api.replace(&name, &PostParams::default(), &next).await {
                        tracing::debug!(service = %name, error = %e, "could not update endpoints");
                    }
                }
                Some(_) => {}
            }
            let want = slice_for(svc, &pods);
            let sname = slice_name(&name);
            let cur =
                self.slices.store.state().into_iter().find(|e| {
                    e.namespace().as_deref() == Some(ns.as_str()) && e.name_any() == sname
                });
            let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &ns);
            match cur {
                None => {
                    if let Err(e) = api.create(&PostParams::default(), &want).await {
                        tracing::debug!(service = %name, error = %e, "could not create endpoint slice");
                    }
                }
                Some(cur) if cur.endpoints != want.endpoints || cur.ports != want.ports => {
                    let mut next = (*cur).clone();
                    next.endpoints = want.endpoints.clone();
                    next.ports = want.ports.clone();
                    if let Err(e) = api.replace(&sname, &PostParams::default(), &next).await {
                        tracing::debug!(service = %name, error = %e, "could not update endpoint slice");
                    }
                }
                Some(_) => {}
            }
        }
        // Slices we manage whose Service is gone.
        for s in self.slices.store.state() {
            let managed = s.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY);
            let svc = s
                .labels()
                .get(SERVICE_NAME_LABEL)
                .cloned()
                .unwrap_or_default();
            let ns = s.namespace().unwrap_or_default();
            if managed && !live.contains(&(ns.clone(), svc)) {
                let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &ns);
                let _ = api.delete(&s.name_any(), &DeleteParams::default()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc() -> Service {
        serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "default", "uid": "s1"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}))
        .unwrap()
    }
    fn pod(name: &str, ip: &str, ready: bool) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default", "uid": name, "labels": {"app": "web"}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}}))
            .unwrap(),
        )
    }

    #[test]
    fn ready_and_unready_pods_split_into_addresses_with_named_target_ports() {
        let pods = vec![pod("a", "10.42.0.2", true), pod("b", "10.42.0.3", false)];
        let ep = endpoints_for(&svc(), &pods);
        let subsets = ep.subsets.unwrap();
        assert_eq!(subsets.len(), 1);
        assert_eq!(subsets[0].addresses.as_ref().unwrap()[0].ip, "10.42.0.2");
        assert_eq!(
            subsets[0].not_ready_addresses.as_ref().unwrap()[0].ip,
            "10.42.0.3"
        );
        assert_eq!(subsets[0].ports.as_ref().unwrap()[0].port, 8080);
    }

    #[test]
    fn slice_lists_every_backing_pod_with_conditions_and_service_label() {
        let pods = vec![pod("a", "10.42.0.2", true), pod("b", "10.42.0.3", false)];
        let s = slice_for(&svc(), &pods);
        assert_eq!(
            s.metadata.labels.as_ref().unwrap()[SERVICE_NAME_LABEL],
            "web"
        );
        assert_eq!(s.endpoints.len(), 2);
        assert_eq!(
            s.endpoints[0].conditions.as_ref().unwrap().ready,
            Some(true)
        );
        assert_eq!(
            s.endpoints[1].conditions.as_ref().unwrap().ready,
            Some(false)
        );
        assert_eq!(s.ports.unwrap()[0].port, Some(8080));
    }

    #[test]
    fn pods_without_ip_or_not_matching_are_left_out() {
        let mut other = (*pod("c", "10.42.0.4", true)).clone();
        other.metadata.labels = Some(BTreeMap::from([("app".to_string(), "db".to_string())]));
        let pods = vec![pod("a", "", true), Arc::new(other)];
        assert!(endpoints_for(&svc(), &pods).subsets.is_none());
    }

    #[test]
    fn pods_whose_subdomain_names_the_service_carry_their_hostname() {
        let mut named = (*pod("a", "10.42.0.2", true)).clone();
        let spec = named.spec.as_mut().unwrap();
        spec.hostname = Some("web-0".into());
        spec.subdomain = Some("web".into());
        let mut elsewhere = (*pod("b", "10.42.0.3", true)).clone();
        let spec = elsewhere.spec.as_mut().unwrap();
        spec.hostname = Some("web-1".into());
        spec.subdomain = Some("other".into());
        let pods = vec![Arc::new(named), Arc::new(elsewhere)];
        let slice = slice_for(&svc(), &pods);
        let hosts: Vec<Option<String>> =
            slice.endpoints.iter().map(|e| e.hostname.clone()).collect();
        assert_eq!(hosts, vec![Some("web-0".to_string()), None]);
        let ep = endpoints_for(&svc(), &pods);
        let addrs = ep.subsets.unwrap()[0].addresses.clone().unwrap();
        assert_eq!(addrs[0].hostname.as_deref(), Some("web-0"));
        assert_eq!(addrs[1].hostname, None);
    }
}
