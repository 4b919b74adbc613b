//! From Kubernetes objects to what the proxy and DNS program: a Service and
//! its EndpointSlices become [`ServiceRules`] and a [`ServiceRecord`].
//! Only ready endpoints count (a missing `ready` condition means ready, as
//! the EndpointSlice API defines), so an unready pod leaves the rotation.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::dns::ServiceRecord;
use crate::nft::{Endpoint, Protocol, ServicePort, ServiceRules};
use crate::NetError;

fn ready_ipv4(slices: &[EndpointSlice]) -> Vec<(Option<String>, Ipv4Addr, &EndpointSlice)> {
    let mut out = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type == "IPv4") {
        for ep in &slice.endpoints {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for a in &ep.addresses {
                if let Ok(ip) = a.parse::<Ipv4Addr>() {
                    out.push((ep.hostname.clone(), ip, slice));
                }
            }
        }
    }
    out
}

/// The proxy rules of `svc` given its EndpointSlices.
pub fn service_rules(svc: &Service, slices: &[EndpointSlice]) -> Result<ServiceRules, NetError> {
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = svc
        .metadata
        .name
        .clone()
        .ok_or_else(|| NetError::BadInput("service without a name".into()))?;
    let spec = svc.spec.clone().unwrap_or_default();
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => None,
        Some(ip) => Some(ip.parse::<Ipv4Addr>().map_err(|_| {
            NetError::BadInput(format!("service {namespace}/{name}: clusterIP {ip:?}"))
        })?),
    };
    let ready = ready_ipv4(slices);
    let mut ports = Vec::new();
    for p in spec.ports.unwrap_or_default() {
        let protocol = Protocol::from_k8s(p.protocol.as_deref().unwrap_or("TCP"))?;
        let port = u16::try_from(p.port).map_err(|_| {
            NetError::BadInput(format!("service {namespace}/{name}: port {}", p.port))
        })?;
        let mut endpoints: Vec<Endpoint> = ready
            .iter()
            .filter_map(|(_, ip, slice)| {
                // The slice port with the Service port's name carries the
                // resolved target port.
                slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|sp| sp.name.as_deref().unwrap_or("") == p.name.as_deref().unwrap_or(""))
                    .and_then(|sp| sp.port)
                    .and_then(|tp| u16::try_from(tp).ok())
                    .map(|tp| Endpoint { ip: *ip, port: tp })
            })
            .collect();
        endpoints.sort();
        endpoints.dedup();
        let node_port = p.node_port.and_then(|np| u16::try_from(np).ok());
        ports.push(ServicePort {
            protocol,
            port,
            node_port,
            endpoints,
        });
    }
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .and_then(|c| c.client_ip)
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(10800)
    });
    Ok(ServiceRules {
        namespace,
        name,
        cluster_ip,
        ports,
        affinity_timeout,
    })
}

/// The DNS record of `svc` (whose rules are `rules`) given its
/// EndpointSlices.
pub fn service_record(
    svc: &Service,
    rules: &ServiceRules,
    slices: &[EndpointSlice],
) -> ServiceRecord {
    let spec = svc.spec.as_ref();
    let external_name = spec
        .filter(|s| s.type_.as_deref() == Some("ExternalName"))
        .and_then(|s| s.external_name.clone())
        .filter(|n| !n.is_empty());
    let mut endpoints: Vec<(Option<String>, Ipv4Addr)> = ready_ipv4(slices)
        .into_iter()
        .map(|(h, ip, _)| (h, ip))
        .collect();
    endpoints.sort();
    endpoints.dedup();
    ServiceRecord {
        cluster_ip: rules.cluster_ip,
        endpoints,
        external_name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(cluster_ip: &str, affinity: bool) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "clusterIP": cluster_ip,
                "type": "NodePort",
                "sessionAffinity": if affinity { "ClientIP" } else { "None" },
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}]
            }
        }))
        .expect("service")
    }

    fn slice() -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "shop"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.42.0.5"], "conditions": {"ready": true}, "hostname": "web-0"},
                {"addresses": ["10.42.0.6"], "conditions": {"ready": false}},
                {"addresses": ["10.42.1.7"]}
            ]
        }))
        .expect("slice")
    }

    #[test]
    fn only_ready_endpoints_enter_the_rules_with_their_target_ports() {
        let r = service_rules(&svc("10.43.0.20", false), &[slice()]).expect("rules");
        assert_eq!(r.cluster_ip, Some(Ipv4Addr::new(10, 43, 0, 20)));
        assert_eq!(r.ports.len(), 1);
        assert_eq!(r.ports[0].node_port, Some(30080));
        let ips: Vec<String> = r.ports[0]
            .endpoints
            .iter()
            .map(|e| format!("{}:{}", e.ip, e.port))
            .collect();
        assert_eq!(ips, ["10.42.0.5:8080", "10.42.1.7:8080"]);
        assert_eq!(r.affinity_timeout, None);
    }

    #[test]
    fn headless_services_have_no_cluster_ip_and_dns_lists_their_ready_pods() {
        let headless = svc("None", true);
        let r = service_rules(&headless, &[slice()]).expect("rules");
        assert_eq!(r.cluster_ip, None);
        assert_eq!(r.affinity_timeout, Some(10800));
        let rec = service_record(&headless, &r, &[slice()]);
        assert_eq!(rec.external_name, None);
        assert_eq!(rec.endpoints.len(), 2);
        assert!(rec
            .endpoints
            .contains(&(Some("web-0".into()), Ipv4Addr::new(10, 42, 0, 5))));
    }

    #[test]
    fn a_bad_cluster_ip_is_an_error() {
        assert!(matches!(
            service_rules(&svc("not-an-ip", false), &[]),
            Err(NetError::BadInput(_))
        ));
    }

    #[test]
    fn an_external_name_service_is_an_alias_in_dns_with_no_rules() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "db.example.com"}
        }))
        .expect("service");
        let r = service_rules(&svc, &[]).expect("rules");
        assert_eq!(r.cluster_ip, None);
        let rec = service_record(&svc, &r, &[]);
        assert_eq!(rec.external_name.as_deref(), Some("db.example.com"));
    }
}
