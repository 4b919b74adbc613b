//! The ServiceProxy: watches Services and EndpointSlices and keeps the
//! nftables rules and the DNS records level with them.
//!
//! Level-triggered: every change resyncs from the reflector stores;
//! [`Proxy::apply`] turns an unchanged Service into no work and a changed
//! one into one transaction, so a resync costs only what changed.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client};
use tracing::warn;

use crate::dns::Records;
use crate::k8s::{service_record, service_rules};
use crate::nft::Proxy;
use crate::NetError;

/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Rules and DNS records driven by the API.
pub struct ServiceProxy {
    proxy: Proxy,
    records: Arc<RwLock<Records>>,
    /// ClusterIPs every node serves itself (the cluster DNS): named in DNS,
    /// never DNAT-ed.
    local: BTreeSet<Ipv4Addr>,
    /// The Services that have DNS records.
    named: BTreeSet<(String, String)>,
}

impl ServiceProxy {
    /// A proxy programming `proxy` and publishing names into `records`.
    pub fn new(proxy: Proxy, records: Arc<RwLock<Records>>) -> Self {
        Self {
            proxy,
            records,
            local: BTreeSet::new(),
            named: BTreeSet::new(),
        }
    }

    /// Leaves a Service with ClusterIP `ip` out of the rules: the node
    /// answers on that address itself (the `kube-dns` Service at the
    /// cluster DNS address, which has no endpoints to DNAT to).
    pub fn serve_locally(mut self, ip: Ipv4Addr) -> Self {
        self.local.insert(ip);
        self
    }

    /// Brings rules and records level with `services` and `slices`. A
    /// Service that cannot be programmed is logged and skipped; the others
    /// still are. Returns the first such error after the whole pass.
    pub fn sync(&mut self, services: &[Service], slices: &[EndpointSlice]) -> Result<(), NetError> {
        let mut first_err = None;
        let mut present = BTreeSet::new();
        let mut to_apply = Vec::new();
        for svc in services {
            let ns = svc
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let Some(name) = svc.metadata.name.clone() else {
                continue;
            };
            let own: Vec<EndpointSlice> = slices
                .iter()
                .filter(|s| {
                    s.metadata.namespace.as_deref().unwrap_or("default") == ns
                        && s.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(SERVICE_NAME_LABEL))
                            == Some(&name)
                })
                .cloned()
                .collect();
            let result = service_rules(svc, &own).and_then(|rules| {
                let record = service_record(svc, &rules, &own);
                self.records
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .upsert(&ns, &name, record);
                self.named.insert((ns.clone(), name.clone()));
                if rules.cluster_ip.is_some_and(|ip| self.local.contains(&ip)) {
                    self.proxy.remove(&ns, &name)
                } else {
                    to_apply.push(rules);
                    Ok(())
                }
            });
            if let Err(e) = result {
                warn!(service = %format!("{ns}/{name}"), error = %e, "service not programmed");
                first_err.get_or_insert(e);
            }
            present.insert((ns, name));
        }
        // Every changed Service in one transaction.
        for ((ns, name), e) in self.proxy.apply_all(to_apply) {
            warn!(service = %format!("{ns}/{name}"), error = %e, "service not programmed");
            first_err.get_or_insert(e);
        }
        let mut gone: BTreeSet<(String, String)> = self
            .proxy
            .services()
            .map(|s| (s.namespace.clone(), s.name.clone()))
            .filter(|k| !present.contains(k))
            .collect();
        gone.extend(self.named.difference(&present).cloned());
        for (ns, name) in gone {
            self.records
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&ns, &name);
            self.named.remove(&(ns.clone(), name.clone()));
            if let Err(e) = self.proxy.remove(&ns, &name) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Watches the API and resyncs on every change until the watch ends.
    /// Syncs start once both initial lists are in: the reflector stores
    /// fill at a list's end (`InitDone`), and a sync against a half-listed
    /// state would program Services without their endpoints.
    pub async fn run(self, client: Client) {
        let (svc_store, svc_writer) = reflector::store::<Service>();
        let (eps_store, eps_writer) = reflector::store::<EndpointSlice>();
        let svc_events = reflector(
            svc_writer,
            watcher(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .map(|e| (Kind::Services, is_init_done(&e)));
        let eps_events = reflector(
            eps_writer,
            watcher(
                Api::<EndpointSlice>::all(client),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .map(|e| (Kind::Slices, is_init_done(&e)));
        let mut events = std::pin::pin!(futures::stream::select(svc_events, eps_events));
        let (mut svc_listed, mut eps_listed) = (false, false);
        // The proxy moves to a blocking thread for each sync: it runs `nft`
        // and waits for it, which must not hold up the runtime's workers.
        let mut me = Some(self);
        while let Some((kind, listed)) = events.next().await {
            match kind {
                Kind::Services => svc_listed |= listed,
                Kind::Slices => eps_listed |= listed,
            }
            if !(svc_listed && eps_listed) {
                continue;
            }
            let services: Vec<Service> = svc_store.state().iter().map(|s| (**s).clone()).collect();
            let slices: Vec<EndpointSlice> =
                eps_store.state().iter().map(|s| (**s).clone()).collect();
            let Some(mut sp) = me.take() else { return };
            let synced = tokio::task::spawn_blocking(move || {
                let r = sp.sync(&services, &slices);
                (sp, r)
            })
            .await;
            match synced {
                Ok((sp, r)) => {
                    if let Err(e) = r {
                        warn!(error = %e, "service proxy sync incomplete");
                    }
                    me = Some(sp);
                }
                Err(e) => {
                    warn!(error = %e, "service proxy sync thread failed; the proxy stops");
                    return;
                }
            }
        }
    }
}

/// Which watch an event came from.
#[derive(Clone, Copy)]
enum Kind {
    Services,
    Slices,
}

/// Whether a watch event completes a (re)list, i.e. its store is full.
pub(crate) fn is_init_done<K, E>(e: &Result<watcher::Event<K>, E>) -> bool {
    matches!(e, Ok(watcher::Event::InitDone))
}
