//! Namespace deletion: when a Namespace is terminating, delete everything
//! in it (every namespaced kind discovery lists), and when nothing is
//! left, remove the `kubernetes` finalizer so the API server can let the
//! Namespace go.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::discovery::{verbs, Discovery, Scope};
use kube::{Client, ResourceExt};

use crate::informer::Informer;

pub const FINALIZER: &str = "kubernetes";

/// The Namespace with `kubernetes` removed from spec.finalizers.
pub fn finalized(ns: &Namespace) -> Namespace {
    let mut n = ns.clone();
    if let Some(spec) = n.spec.as_mut() {
        if let Some(f) = spec.finalizers.as_mut() {
            f.retain(|x| x != FINALIZER);
        }
    }
    n
}

pub struct NamespaceController {
    client: Client,
    namespaces: Informer<Namespace>,
}

impl NamespaceController {
    pub fn new(client: Client, namespaces: Informer<Namespace>) -> Self {
        NamespaceController { client, namespaces }
    }

    pub async fn run(self: Arc<Self>) {
        self.namespaces.ready().await;
        let triggers = vec![self.namespaces.subscribe()];
        let me = self.clone();
        crate::informer::run_loop(
            "namespace",
            triggers,
            Duration::from_secs(5),
            Duration::from_millis(500),
            move || {
                let me = me.clone();
                async move {
                    for ns in me.namespaces.store.state() {
                        if ns.metadata.deletion_timestamp.is_some() {
                            me.drain(&ns).await;
                        }
                    }
                }
            },
        )
        .await;
    }

    async fn namespaced_resources(&self) -> Vec<ApiResource> {
        match Discovery::new(self.client.clone()).run().await {
            Ok(d) => d
                .groups()
                .flat_map(|g| g.recommended_resources())
                .filter(|(_, caps)| {
                    caps.scope == Scope::Namespaced
                        && caps.supports_operation(verbs::LIST)
                        && caps.supports_operation(verbs::DELETE)
                })
                .map(|(ar, _)| ar)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "discovery failed");
                Vec::new()
            }
        }
    }

    /// Deletes one round of contents; finalizes once nothing remains.
    async fn drain(&self, ns: &Namespace) {
        let name = ns.name_any();
        let resources = self.namespaced_resources().await;
        if resources.is_empty() {
            return;
        }
        let mut remaining = 0usize;
        for ar in resources {
            let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &name, &ar);
            let Ok(list) = api.list(&ListParams::default()).await else {
                continue;
            };
            for o in list.items {
                remaining += 1;
                if o.metadata.deletion_timestamp.is_none() {
                    let _ = api.delete(&o.name_any(), &DeleteParams::background()).await;
                }
            }
        }
        if remaining > 0 {
            tracing::info!(namespace = %name, remaining, "deleting namespace contents");
            return;
        }
        if ns
            .spec
            .as_ref()
            .and_then(|s| s.finalizers.as_ref())
            .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
        {
            let api: Api<Namespace> = Api::all(self.client.clone());
            let data = finalized(ns);
            match api
                .replace_subresource("finalize", &name, &PostParams::default(), &data)
                .await
            {
                Ok(_) => tracing::info!(namespace = %name, "namespace emptied and finalized"),
                Err(e) => {
                    tracing::warn!(namespace = %name, error = %e, "could not finalize namespace")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finalizing_removes_only_the_kubernetes_finalizer() {
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}, "spec": {"finalizers": ["kubernetes", "other"]}})).unwrap();
        assert_eq!(
            finalized(&ns).spec.unwrap().finalizers.unwrap(),
            vec!["other".to_string()]
        );
    }
}
