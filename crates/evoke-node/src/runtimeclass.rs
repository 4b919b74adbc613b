//! The RuntimeClasses every evoke cluster has from its first start, one
//! per tier; `handler` is the tier's name.

use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::Client;

use crate::NodeError;

pub const TIERS: [&str; 3] = ["process", "container", "microvm"];

/// Creates the tier RuntimeClasses that are missing; existing ones stay.
pub async fn ensure(client: Client) -> Result<(), NodeError> {
    let api: Api<RuntimeClass> = Api::all(client);
    for t in TIERS {
        let rc = RuntimeClass {
            metadata: ObjectMeta {
                name: Some(t.into()),
                ..Default::default()
            },
            handler: t.into(),
            overhead: None,
            scheduling: None,
        };
        match api.create(&PostParams::default(), &rc).await {
            Ok(_) => tracing::info!(runtimeclass = t, "created runtime class"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => {
                return Err(NodeError::Api {
                    what: format!("creating runtimeclass {t}"),
                    source: e,
                })
            }
        }
    }
    Ok(())
}
