//! Services in nftables, in the style of kube-proxy's nftables mode.
//!
//! One table `ip evoke`. Packets to a ClusterIP (prerouting and output) are
//! looked up in the verdict map `services` keyed by address . protocol .
//! port, NodePorts in `nodeports` (for local addresses only); each entry goes
//! to the Service port's chain, which picks an endpoint chain with `numgen
//! random mod N`, and the endpoint chain DNATs. Connections from outside the
//! pod CIDR and hairpin connections (a pod reaching itself) are marked and
//! masqueraded in postrouting. sessionAffinity ClientIP keeps a dynamic set
//! with a timeout per endpoint, checked before the random pick.
//!
//! Changes are incremental: [`Proxy::apply`] compares a Service's new rules
//! with the ones it programmed last and sends one `nft -f` transaction that
//! rewrites only that Service's chains, sets and map entries.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tracing::debug;

use crate::ipam::Ipv4Net;
use crate::{netns, NetError};

/// The nftables table all rules live in.
pub const TABLE: &str = "evoke";
/// The packet mark that asks postrouting to masquerade.
const MASQ_MARK: u32 = 0x4000;

/// A transport protocol of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP
    Tcp,
    /// UDP
    Udp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    /// Parses a Kubernetes protocol name (`TCP`, `UDP`).
    pub fn from_k8s(s: &str) -> Result<Self, NetError> {
        match s {
            "TCP" | "" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            other => Err(NetError::BadInput(format!(
                "unsupported service protocol {other:?}"
            ))),
        }
    }
}

/// A ready endpoint of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// The pod IP.
    pub ip: Ipv4Addr,
    /// The target port.
    pub port: u16,
}

/// One port of a Service with its ready endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The port on the ClusterIP.
    pub port: u16,
    /// The NodePort, if the Service is of type NodePort.
    pub node_port: Option<u16>,
    /// Ready endpoints only: unready pods are out of the rotation.
    pub endpoints: Vec<Endpoint>,
}

/// What the proxy programs for one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRules {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The ClusterIP; `None` for a headless Service, which gets no rules.
    pub cluster_ip: Option<Ipv4Addr>,
    /// The ports.
    pub ports: Vec<ServicePort>,
    /// sessionAffinity ClientIP timeout in seconds, if enabled.
    pub affinity_timeout: Option<u32>,
}

impl ServiceRules {
    fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }

    fn validate(&self) -> Result<(), NetError> {
        // Namespaces and Service names are DNS labels; anything else could
        // break out of an nft identifier.
        for part in [&self.namespace, &self.name] {
            let ok = !part.is_empty()
                && part.len() <= 63
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return Err(NetError::BadInput(format!(
                    "service name part {part:?} is not a DNS label"
                )));
            }
        }
        Ok(())
    }
}

fn port_chain(s: &ServiceRules, p: &ServicePort) -> String {
    format!(
        "svc.{}.{}.{}.{}",
        s.namespace,
        s.name,
        p.protocol.as_str(),
        p.port
    )
}

fn ep_chain(s: &ServiceRules, p: &ServicePort, i: usize) -> String {
    format!(
        "ep.{}.{}.{}.{}.{i}",
        s.namespace,
        s.name,
        p.protocol.as_str(),
        p.port
    )
}

fn aff_set(s: &ServiceRules, p: &ServicePort, i: usize) -> String {
    format!(
        "aff.{}.{}.{}.{}.{i}",
        s.namespace,
        s.name,
        p.protocol.as_str(),
        p.port
    )
}

/// The table, maps and base chains, written from scratch.
pub fn base_ruleset(pod_cidr: Ipv4Net) -> String {
    format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tmap services {{ type ipv4_addr . inet_proto . inet_service : verdict; }}\n\
         \tmap nodeports {{ type inet_proto . inet_service : verdict; }}\n\
         \tchain dispatch {{\n\
         \t\tip daddr . meta l4proto . th dport vmap @services\n\
         \t\tfib daddr type local meta l4proto . th dport vmap @nodeports\n\
         \t}}\n\
         \tchain prerouting {{ type nat hook prerouting priority -100; policy accept; jump dispatch; }}\n\
         \tchain output {{ type nat hook output priority -100; policy accept; jump dispatch; }}\n\
         \tchain postrouting {{ type nat hook postrouting priority 100; policy accept; meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} masquerade; }}\n\
         \tchain mark-masq {{ meta mark set meta mark | {MASQ_MARK:#x}; }}\n\
         \tset pod-cidr {{ type ipv4_addr; flags interval; elements = {{ {pod_cidr} }}; }}\n\
         }}\n"
    )
}

/// The names a Service's rules use, to delete what a new version drops.
#[derive(Debug, Default)]
struct Objects {
    chains: Vec<String>,
    sets: Vec<String>,
    elements: Vec<String>,
    nodeports: Vec<String>,
}

fn objects(s: &ServiceRules) -> Objects {
    let mut o = Objects::default();
    let Some(ip) = s.cluster_ip else { return o };
    for p in &s.ports {
        o.chains.push(port_chain(s, p));
        for i in 0..p.endpoints.len() {
            o.chains.push(ep_chain(s, p, i));
            if s.affinity_timeout.is_some() {
                o.sets.push(aff_set(s, p, i));
            }
        }
        o.elements
            .push(format!("{ip} . {} . {}", p.protocol.as_str(), p.port));
        if let Some(np) = p.node_port {
            o.nodeports.push(format!("{} . {np}", p.protocol.as_str()));
        }
    }
    o
}

/// The nft script that takes a Service from `old` (what was programmed;
/// `None` if nothing) to `new` (`None` deletes it), as one transaction.
pub fn service_update(old: Option<&ServiceRules>, new: Option<&ServiceRules>) -> String {
    let mut out = String::new();
    let t = TABLE;
    let old_o = old.map(objects).unwrap_or_default();
    let new_o = new.map(objects).unwrap_or_default();
    // 1. Unhook the old map entries that the new version no longer has; the
    //    rest are replaced in place below.
    for e in &old_o.elements {
        if !new_o.elements.contains(e) {
            let _ = writeln!(out, "delete element ip {t} services {{ {e} }}");
        }
    }
    for e in &old_o.nodeports {
        if !new_o.nodeports.contains(e) {
            let _ = writeln!(out, "delete element ip {t} nodeports {{ {e} }}");
        }
    }
    // 2. Empty every old chain so that no rule references what is deleted.
    for c in &old_o.chains {
        let _ = writeln!(out, "flush chain ip {t} {c}");
    }
    // 3. Write the new version: sets, endpoint chains, port chains, entries.
    if let (Some(s), Some(ip)) = (new, new.and_then(|s| s.cluster_ip)) {
        for p in &s.ports {
            let n = p.endpoints.len();
            for (i, ep) in p.endpoints.iter().enumerate() {
                let chain = ep_chain(s, p, i);
                let _ = writeln!(out, "add chain ip {t} {chain}");
                if !old_o.chains.contains(&chain) {
                    let _ = writeln!(out, "flush chain ip {t} {chain}");
                }
                // Hairpin: a pod reaching itself through the Service.
                let _ = writeln!(
                    out,
                    "add rule ip {t} {chain} ip saddr {} jump mark-masq",
                    ep.ip
                );
                if let Some(timeout) = s.affinity_timeout {
                    let set = aff_set(s, p, i);
                    let _ = writeln!(
                        out,
                        "add set ip {t} {set} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}"
                    );
                    let _ = writeln!(out, "add rule ip {t} {chain} update @{set} {{ ip saddr }}");
                }
                let _ = writeln!(
                    out,
                    "add rule ip {t} {chain} meta l4proto {} dnat to {}:{}",
                    p.protocol.as_str(),
                    ep.ip,
                    ep.port
                );
            }
            let chain = port_chain(s, p);
            let _ = writeln!(out, "add chain ip {t} {chain}");
            if !old_o.chains.contains(&chain) {
                let _ = writeln!(out, "flush chain ip {t} {chain}");
            }
            // Off-cluster clients are masqueraded so replies come back here.
            let _ = writeln!(
                out,
                "add rule ip {t} {chain} ip saddr != @pod-cidr jump mark-masq"
            );
            if s.affinity_timeout.is_some() {
                for i in 0..n {
                    let _ = writeln!(
                        out,
                        "add rule ip {t} {chain} ip saddr @{} goto {}",
                        aff_set(s, p, i),
                        ep_chain(s, p, i)
                    );
                }
            }
            if n == 0 {
                // No ready endpoint: refuse rather than let the packet wander.
                let _ = writeln!(out, "add rule ip {t} {chain} drop");
            } else {
                let arms: Vec<String> = (0..n)
                    .map(|i| format!("{i} : goto {}", ep_chain(s, p, i)))
                    .collect();
                let _ = writeln!(
                    out,
                    "add rule ip {t} {chain} numgen random mod {n} vmap {{ {} }}",
                    arms.join(", ")
                );
            }
            let key = format!("{ip} . {} . {}", p.protocol.as_str(), p.port);
            if !old_o.elements.contains(&key) {
                let _ = writeln!(
                    out,
                    "add element ip {t} services {{ {key} : goto {chain} }}"
                );
            }
            if let Some(np) = p.node_port {
                let key = format!("{} . {np}", p.protocol.as_str());
                if !old_o.nodeports.contains(&key) {
                    let _ = writeln!(
                        out,
                        "add element ip {t} nodeports {{ {key} : goto {chain} }}"
                    );
                }
            }
        }
    }
    // 4. Delete the old chains and sets the new version does not use.
    for c in old_o
        .chains
        .iter()
        .filter(|c| !new_o.chains.contains(c))
        .rev()
    {
        let _ = writeln!(out, "delete chain ip {t} {c}");
    }
    for set in old_o.sets.iter().filter(|s| !new_o.sets.contains(s)) {
        let _ = writeln!(out, "delete set ip {t} {set}");
    }
    out
}

/// Runs `nft -f -` with `script` (in the namespace at `ns`, if given).
pub fn run_nft(ns: Option<&Path>, script: &str) -> Result<(), NetError> {
    let script = script.to_string();
    netns::run_in(ns, move || -> Result<(), NetError> {
        // A child forked from this thread inherits its network namespace.
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| NetError::Nft(format!("cannot run nft: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(|e| NetError::Nft(format!("writing the script: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| NetError::Nft(format!("waiting for nft: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(NetError::Nft(format!(
                "{}; script:\n{script}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    })?
}

/// Programs Services into the table, one transaction per change, and
/// remembers what it programmed so the next change is a diff.
#[derive(Debug)]
pub struct Proxy {
    netns: Option<PathBuf>,
    programmed: BTreeMap<(String, String), ServiceRules>,
}

impl Proxy {
    /// Creates the table from scratch (dropping leftovers of an earlier run)
    /// in the namespace at `netns` (`None`: the caller's).
    pub fn new(netns: Option<PathBuf>, pod_cidr: Ipv4Net) -> Result<Self, NetError> {
        run_nft(netns.as_deref(), &base_ruleset(pod_cidr))?;
        Ok(Self {
            netns,
            programmed: BTreeMap::new(),
        })
    }

    /// Brings a Service's rules to `rules`; unchanged rules cost nothing.
    pub fn apply(&mut self, rules: ServiceRules) -> Result<(), NetError> {
        rules.validate()?;
        let key = rules.key();
        let old = self.programmed.get(&key);
        if old == Some(&rules) {
            return Ok(());
        }
        let script = service_update(old, Some(&rules));
        if !script.is_empty() {
            run_nft(self.netns.as_deref(), &script)?;
        }
        debug!(service = %format!("{}/{}", key.0, key.1), "service rules updated");
        self.programmed.insert(key, rules);
        Ok(())
    }

    /// Brings many Services to their rules in one `nft` transaction (a
    /// resync after a restart programs a thousand Services in one process
    /// start instead of a thousand). If the transaction fails, each Service
    /// is applied alone, so that one bad Service holds up no other; the
    /// errors are returned with the Service they belong to.
    pub fn apply_all(&mut self, all: Vec<ServiceRules>) -> Vec<((String, String), NetError)> {
        let mut errors = Vec::new();
        let mut changed = Vec::new();
        for rules in all {
            match rules.validate() {
                Err(e) => errors.push((rules.key(), e)),
                Ok(()) if self.programmed.get(&rules.key()) == Some(&rules) => {}
                Ok(()) => changed.push(rules),
            }
        }
        if changed.is_empty() {
            return errors;
        }
        let script: String = changed
            .iter()
            .map(|r| service_update(self.programmed.get(&r.key()), Some(r)))
            .collect();
        let batch = if script.is_empty() {
            Ok(())
        } else {
            run_nft(self.netns.as_deref(), &script)
        };
        match batch {
            Ok(()) => {
                debug!(
                    services = changed.len(),
                    "service rules updated in one transaction"
                );
                for r in changed {
                    self.programmed.insert(r.key(), r);
                }
            }
            Err(e) => {
                debug!(error = %e, "batched service update failed; applying one by one");
                for r in changed {
                    let key = r.key();
                    if let Err(e) = self.apply(r) {
                        errors.push((key, e));
                    }
                }
            }
        }
        errors
    }

    /// Removes a Service's rules; an unknown Service is a no-op.
    pub fn remove(&mut self, namespace: &str, name: &str) -> Result<(), NetError> {
        let key = (namespace.to_string(), name.to_string());
        if let Some(old) = self.programmed.get(&key) {
            let script = service_update(Some(old), None);
            if !script.is_empty() {
                run_nft(self.netns.as_deref(), &script)?;
            }
            self.programmed.remove(&key);
        }
        Ok(())
    }

    /// The Services programmed now.
    pub fn services(&self) -> impl Iterator<Item = &ServiceRules> {
        self.programmed.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(eps: &[&str], affinity: Option<u32>) -> ServiceRules {
        ServiceRules {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ip: Some(Ipv4Addr::new(10, 43, 0, 50)),
            ports: vec![ServicePort {
                protocol: Protocol::Tcp,
                port: 80,
                node_port: Some(30080),
                endpoints: eps
                    .iter()
                    .map(|ip| Endpoint {
                        ip: ip.parse().expect("ip"),
                        port: 8080,
                    })
                    .collect(),
            }],
            affinity_timeout: affinity,
        }
    }

    #[test]
    fn a_new_service_gets_endpoint_chains_a_random_pick_and_map_entries() {
        let s = svc(&["10.42.0.2", "10.42.0.3"], None);
        let script = service_update(None, Some(&s));
        assert!(script.contains("dnat to 10.42.0.2:8080"), "{script}");
        assert!(script.contains("dnat to 10.42.0.3:8080"), "{script}");
        assert!(script.contains("numgen random mod 2 vmap"), "{script}");
        assert!(script.contains(
            "add element ip evoke services { 10.43.0.50 . tcp . 80 : goto svc.default.web.tcp.80 }"
        ));
        assert!(script.contains(
            "add element ip evoke nodeports { tcp . 30080 : goto svc.default.web.tcp.80 }"
        ));
        assert!(!script.contains("delete"), "{script}");
    }

    #[test]
    fn losing_an_endpoint_touches_only_that_service_and_deletes_its_chain() {
        let old = svc(&["10.42.0.2", "10.42.0.3"], None);
        let new = svc(&["10.42.0.2"], None);
        let script = service_update(Some(&old), Some(&new));
        assert!(
            script.contains("delete chain ip evoke ep.default.web.tcp.80.1"),
            "{script}"
        );
        assert!(!script.contains("10.42.0.3"), "{script}");
        assert!(
            !script.contains("add element"),
            "map entry kept in place: {script}"
        );
        assert!(script
            .lines()
            .all(|l| l.contains("default.web") || l.contains("mark-masq") || l.is_empty()));
    }

    #[test]
    fn headless_and_deleted_services_have_no_rules() {
        let mut headless = svc(&["10.42.0.2"], None);
        headless.cluster_ip = None;
        assert!(service_update(None, Some(&headless)).is_empty());
        let old = svc(&["10.42.0.2"], Some(60));
        let script = service_update(Some(&old), None);
        assert!(
            script.contains("delete element ip evoke services"),
            "{script}"
        );
        assert!(
            script.contains("delete element ip evoke nodeports"),
            "{script}"
        );
        assert!(
            script.contains("delete chain ip evoke svc.default.web.tcp.80"),
            "{script}"
        );
        assert!(
            script.contains("delete set ip evoke aff.default.web.tcp.80.0"),
            "{script}"
        );
        assert!(!script.contains("add "), "{script}");
    }

    #[test]
    fn client_ip_affinity_checks_remembered_clients_before_the_random_pick() {
        let s = svc(&["10.42.0.2", "10.42.0.3"], Some(10800));
        let script = service_update(None, Some(&s));
        let aff = script
            .find("ip saddr @aff.default.web.tcp.80.1 goto")
            .expect("affinity rule");
        let pick = script.find("numgen random").expect("random pick");
        assert!(aff < pick, "{script}");
        assert!(script.contains("timeout 10800s"), "{script}");
        assert!(
            script.contains("update @aff.default.web.tcp.80.0 { ip saddr }"),
            "{script}"
        );
    }

    #[test]
    fn names_that_are_not_dns_labels_are_refused() {
        let mut s = svc(&[], None);
        s.name = "web; flush ruleset".into();
        assert!(matches!(s.validate(), Err(NetError::BadInput(_))));
    }
}
