//! Allocation for new Services: a ClusterIP from the service CIDR
//! (`--service-cidr`, 10.43.0.0/16 as k3s by default) and node ports from 30000-32767, unless the
//! client asked for specific ones, which must then be free. Callers hold
//! [`crate::State::service_lock`] from allocation until the Service is
//! stored, so two creates never get the same address.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use evoke_types::registry::Resource;
use evoke_types::status::{ApiError, Cause};
use serde_json::Value;

use super::read::{read_page, Filter};
use crate::State;

/// Addresses below this are for fixed services: .1 the API, .10 DNS.
const FIRST_DYNAMIC: u32 = 16;
const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

fn invalid(name: &str, field: &str, message: String) -> ApiError {
    ApiError::invalid(
        "Service",
        name,
        vec![Cause {
            reason: "FieldValueInvalid".into(),
            message,
            field: field.into(),
        }],
    )
}

/// Fills spec.clusterIP(s) and node ports of `svc`, a Service about to be
/// created, given what the stored Services use.
pub(crate) async fn allocate(
    state: &State,
    res: &Resource,
    svc: &mut Value,
) -> Result<(), ApiError> {
    let name = svc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let spec_type = svc["spec"]["type"]
        .as_str()
        .unwrap_or("ClusterIP")
        .to_string();
    if spec_type == "ExternalName" {
        return Ok(());
    }
    let existing = read_page(state, res, None, &Filter::everything(), None, None).await?;
    let mut used_ips = HashSet::new();
    let mut used_ports = HashSet::new();
    for s in &existing.items {
        if let Some(ip) = s["spec"]["clusterIP"]
            .as_str()
            .and_then(|i| i.parse::<Ipv4Addr>().ok())
        {
            used_ips.insert(ip);
        }
        for p in s["spec"]["ports"].as_array().into_iter().flatten() {
            if let Some(n) = p["nodePort"].as_u64() {
                used_ports.insert(n);
            }
        }
    }
    let spec = &mut svc["spec"];
    match spec["clusterIP"].as_str().unwrap_or_default() {
        "None" => {}
        "" => {
            let cidr = state.service_cidr;
            let ip = (u64::from(FIRST_DYNAMIC)..cidr.size() - 1)
                .map(|off| Ipv4Addr::from(cidr.base() + off as u32))
                .find(|ip| !used_ips.contains(ip))
                .ok_or_else(|| {
                    ApiError::new(
                        500,
                        "InternalError",
                        format!("the service CIDR {cidr} is full"),
                    )
                })?;
            spec["clusterIP"] = ip.to_string().into();
            spec["clusterIPs"] = serde_json::json!([ip.to_string()]);
        }
        given => {
            let ip: Ipv4Addr = given.parse().map_err(|_| {
                invalid(
                    &name,
                    "spec.clusterIP",
                    format!("Invalid value: {given:?}: must be a valid IP address"),
                )
            })?;
            if !state.service_cidr.contains(ip) {
                let cidr = state.service_cidr;
                return Err(invalid(&name, "spec.clusterIP", format!(
                    "Invalid value: {given:?}: failed to allocate IP {given}: the provided IP ({given}) is not in the valid range. The range of valid IPs is {cidr}"
                )));
            }
            if used_ips.contains(&ip) {
                return Err(invalid(&name, "spec.clusterIP", format!(
                    "Invalid value: {given:?}: failed to allocate IP {given}: provided IP is already allocated"
                )));
            }
            spec["clusterIPs"] = serde_json::json!([given]);
        }
    }
    if spec_type == "NodePort" || spec_type == "LoadBalancer" {
        let mut next = NODE_PORTS.clone().map(u64::from);
        if let Some(ports) = spec["ports"].as_array_mut() {
            for (i, p) in ports.iter_mut().enumerate() {
                match p["nodePort"].as_u64().filter(|n| *n != 0) {
                    Some(n) => {
                        let field = format!("spec.ports[{i}].nodePort");
                        if !NODE_PORTS.contains(&u16::try_from(n).unwrap_or(0)) {
                            return Err(invalid(&name, &field, format!(
                                "Invalid value: {n}: provided port is not in the valid range. The range of valid ports is 30000-32767"
                            )));
                        }
                        if !used_ports.insert(n) {
                            return Err(invalid(
                                &name,
                                &field,
                                format!("Invalid value: {n}: provided port is already allocated"),
                            ));
                        }
                    }
                    None => {
                        let n = next.find(|n| !used_ports.contains(n)).ok_or_else(|| {
                            ApiError::new(500, "InternalError", "no free node port in 30000-32767")
                        })?;
                        used_ports.insert(n);
                        p["nodePort"] = n.into();
                    }
                }
            }
        }
    }
    Ok(())
}
