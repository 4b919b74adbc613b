//! The schemas of the served kinds, generated once from k8s-openapi's
//! schemars impls, plus the list semantics Kubernetes declares with
//! `patchStrategy`/`patchMergeKey`/`listType` tags in its Go types.
//!
//! [`LIST_RULES`] is the one table of those semantics. It is written into the
//! generated schemas as `x-kubernetes-*` extensions, which is what
//! [`crate::openapi`] serves, and [`crate::patch`] and [`crate::apply`] read
//! the same extensions back through [`Schema`]. So kubectl, strategic merge
//! and server-side apply always agree on how a list merges.

use std::sync::OnceLock;

use k8s_openapi::schemars::generate::SchemaSettings;
use serde_json::{Map, Value};

use crate::registry::Resource;

/// How one list (or map) field of one definition merges.
#[derive(Debug, Clone, Copy)]
pub struct ListRule {
    /// Definition name, e.g. `io.k8s.api.core.v1.PodSpec`.
    pub def: &'static str,
    pub field: &'static str,
    /// `x-kubernetes-patch-strategy`: "merge", "retainKeys" or "merge,retainKeys".
    pub strategy: &'static str,
    /// `x-kubernetes-patch-merge-key`.
    pub merge_key: &'static str,
    /// `x-kubernetes-list-type`: "map", "set", "atomic" (or "" for none).
    pub list_type: &'static str,
    /// `x-kubernetes-list-map-keys` when `list_type` is "map".
    pub map_keys: &'static [&'static str],
}

const fn keyed(
    def: &'static str,
    field: &'static str,
    strategy: &'static str,
    key: &'static str,
    map_keys: &'static [&'static str],
) -> ListRule {
    ListRule {
        def,
        field,
        strategy,
        merge_key: key,
        list_type: "map",
        map_keys,
    }
}

const fn typed(
    def: &'static str,
    field: &'static str,
    strategy: &'static str,
    list_type: &'static str,
) -> ListRule {
    ListRule {
        def,
        field,
        strategy,
        merge_key: "",
        list_type,
        map_keys: &[],
    }
}

/// The list semantics of the served kinds, as declared in Kubernetes' Go
/// types. A list not named here is atomic: a patch replaces it whole.
pub const LIST_RULES: &[ListRule] = &[
    keyed(
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "ownerReferences",
        "merge",
        "uid",
        &["uid"],
    ),
    typed(
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "finalizers",
        "merge",
        "set",
    ),
    typed(
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "managedFields",
        "",
        "atomic",
    ),
    keyed(
        "io.k8s.api.core.v1.PodSpec",
        "containers",
        "merge",
        "name",
        &["name"],
    ),
    keyed(
        "io.k8s.api.core.v1.PodSpec",
        "initContainers",
        "merge",
        "name",
        &["name"],
    ),
    keyed(
        "io.k8s.api.core.v1.PodSpec",
        "ephemeralContainers",
        "merge",
        "name",
        &["name"],
    ),
    keyed(
        "io.k8s.api.core.v1.PodSpec",
        "volumes",
        "merge,retainKeys",
        "name",
        &["name"],
    ),
    keyed(
        "io.k8s.api.core.v1.PodSpec",
        "imagePullSecrets",
        "merge",
        "name",
        &["name"],
    ),
    keyed(
        "io.k8s.api.core.v1.PodSpec",
        "hostAliases",
        "merge",
        "ip",
        &["ip"],
    ),
    keyed(
        "io.k8s.api.core.v1.PodSpec",
        "topologySpreadConstraints",
        "merge",
        "topologyKey",
        &["topologyKey", "whenUnsatisfiable"],
    ),
    keyed(
        "io.k8s.api.core.v1.PodSpec",
        "resourceClaims",
        "merge,retainKeys",
        "name",
        &["name"],
    ),
    keyed(
        "io.k8s.api.core.v1.PodSpec",
        "schedulingGates",
        "merge",
        "name",
        &["name"],
    ),
    typed("io.k8s.api.core.v1.PodSpec", "tolerations", "", "atomic"),
    typed("io.k8s.api.core.v1.PodSpec", "readinessGates", "", "atomic"),
    keyed(
        "io.k8s.api.core.v1.Container",
        "ports",
        "merge",
        "containerPort",
        &["containerPort", "protocol"],
    ),
    keyed(
        "io.k8s.api.core.v1.Container",
        "env",
        "merge",
        "name",
        &["name"],
    ),
    keyed(
        "io.k8s.api.core.v1.Container",
        "volumeMounts",
        "merge",
        "mountPath",
        &["mountPath"],
    ),
    keyed(
        "io.k8s.api.core.v1.Container",
        "volumeDevices",
        "merge",
        "devicePath",
        &["devicePath"],
    ),
    typed("io.k8s.api.core.v1.Container", "envFrom", "", "atomic"),
    typed("io.k8s.api.core.v1.Container", "resizePolicy", "", "atomic"),
    keyed(
        "io.k8s.api.core.v1.EphemeralContainer",
        "ports",
        "merge",
        "containerPort",
        &["containerPort", "protocol"],
    ),
    keyed(
        "io.k8s.api.core.v1.EphemeralContainer",
        "env",
        "merge",
        "name",
        &["name"],
    ),
    keyed(
        "io.k8s.api.core.v1.EphemeralContainer",
        "volumeMounts",
        "merge",
        "mountPath",
        &["mountPath"],
    ),
    keyed(
        "io.k8s.api.core.v1.EphemeralContainer",
        "volumeDevices",
        "merge",
        "devicePath",
        &["devicePath"],
    ),
    keyed(
        "io.k8s.api.core.v1.ResourceRequirements",
        "claims",
        "",
        "name",
        &["name"],
    ),
    keyed(
        "io.k8s.api.core.v1.PodStatus",
        "conditions",
        "merge",
        "type",
        &["type"],
    ),
    keyed(
        "io.k8s.api.core.v1.PodStatus",
        "podIPs",
        "merge",
        "ip",
        &["ip"],
    ),
    keyed(
        "io.k8s.api.core.v1.PodStatus",
        "hostIPs",
        "merge",
        "ip",
        &["ip"],
    ),
    typed(
        "io.k8s.api.core.v1.PodStatus",
        "containerStatuses",
        "",
        "atomic",
    ),
    typed(
        "io.k8s.api.core.v1.PodStatus",
        "initContainerStatuses",
        "",
        "atomic",
    ),
    keyed(
        "io.k8s.api.core.v1.ServiceSpec",
        "ports",
        "merge",
        "port",
        &["port", "protocol"],
    ),
    typed("io.k8s.api.core.v1.ServiceSpec", "clusterIPs", "", "atomic"),
    typed(
        "io.k8s.api.core.v1.ServiceSpec",
        "externalIPs",
        "",
        "atomic",
    ),
    typed("io.k8s.api.core.v1.ServiceSpec", "ipFamilies", "", "atomic"),
    keyed(
        "io.k8s.api.core.v1.ServiceStatus",
        "conditions",
        "merge",
        "type",
        &["type"],
    ),
    typed("io.k8s.api.core.v1.NodeSpec", "podCIDRs", "merge", "set"),
    typed("io.k8s.api.core.v1.NodeSpec", "taints", "", "atomic"),
    keyed(
        "io.k8s.api.core.v1.NodeStatus",
        "conditions",
        "merge",
        "type",
        &["type"],
    ),
    keyed(
        "io.k8s.api.core.v1.NodeStatus",
        "addresses",
        "merge",
        "type",
        &["type"],
    ),
    typed("io.k8s.api.core.v1.NodeStatus", "images", "", "atomic"),
    typed(
        "io.k8s.api.core.v1.NodeStatus",
        "volumesInUse",
        "",
        "atomic",
    ),
    typed(
        "io.k8s.api.core.v1.NodeStatus",
        "volumesAttached",
        "",
        "atomic",
    ),
    keyed(
        "io.k8s.api.core.v1.NamespaceStatus",
        "conditions",
        "merge",
        "type",
        &["type"],
    ),
    keyed(
        "io.k8s.api.core.v1.ServiceAccount",
        "secrets",
        "merge",
        "name",
        &["name"],
    ),
    typed(
        "io.k8s.api.core.v1.ServiceAccount",
        "imagePullSecrets",
        "",
        "atomic",
    ),
    typed("io.k8s.api.core.v1.Endpoints", "subsets", "", "atomic"),
    typed(
        "io.k8s.api.core.v1.EndpointSubset",
        "addresses",
        "",
        "atomic",
    ),
    typed(
        "io.k8s.api.core.v1.EndpointSubset",
        "notReadyAddresses",
        "",
        "atomic",
    ),
    typed("io.k8s.api.core.v1.EndpointSubset", "ports", "", "atomic"),
    keyed(
        "io.k8s.api.apps.v1.DeploymentStatus",
        "conditions",
        "merge",
        "type",
        &["type"],
    ),
    keyed(
        "io.k8s.api.apps.v1.ReplicaSetStatus",
        "conditions",
        "merge",
        "type",
        &["type"],
    ),
    typed(
        "io.k8s.api.discovery.v1.EndpointSlice",
        "endpoints",
        "",
        "atomic",
    ),
    typed(
        "io.k8s.api.discovery.v1.EndpointSlice",
        "ports",
        "",
        "atomic",
    ),
    typed(
        "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector",
        "matchExpressions",
        "",
        "atomic",
    ),
];

/// Non-list fields with a patch strategy (`retainKeys` unions).
pub const FIELD_STRATEGIES: &[(&str, &str, &str)] = &[
    (
        "io.k8s.api.apps.v1.DeploymentSpec",
        "strategy",
        "retainKeys",
    ),
    (
        "io.k8s.api.core.v1.ServiceSpec",
        "sessionAffinityConfig",
        "",
    ),
];

/// The definition name of a served kind, e.g. `io.k8s.api.apps.v1.Deployment`.
pub fn def_name(res: &Resource) -> String {
    format!("{}{}", def_prefix(res.group, res.version), res.kind)
}

/// `io.k8s.api.<group>.<version>.` for an API group.
pub fn def_prefix(group: &str, version: &str) -> String {
    let short = if group.is_empty() {
        "core"
    } else {
        group.split('.').next().unwrap_or(group)
    };
    format!("io.k8s.api.{short}.{version}.")
}

/// Every definition reachable from the served kinds, their lists, Status and
/// Scale, keyed by name, with `$ref`s as `#/definitions/<name>` and the
/// `x-kubernetes-*` extensions of [`LIST_RULES`] and kinds filled in.
pub fn definitions() -> &'static Map<String, Value> {
    static DEFS: OnceLock<Map<String, Value>> = OnceLock::new();
    DEFS.get_or_init(generate)
}

fn generate() -> Map<String, Value> {
    use k8s_openapi::api::{apps, coordination, core, discovery, node};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;

    let mut gen = SchemaSettings::draft07()
        .with(|s| {
            s.definitions_path = "#/definitions/".into();
            s.meta_schema = None;
        })
        .into_generator();
    macro_rules! add {
        ($($t:ty),* $(,)?) => { $( let _ = gen.subschema_for::<$t>(); )* };
    }
    add!(
        core::v1::Namespace,
        core::v1::Node,
        core::v1::Pod,
        core::v1::Binding,
        core::v1::Service,
        core::v1::Endpoints,
        core::v1::ConfigMap,
        core::v1::Secret,
        core::v1::Event,
        core::v1::ServiceAccount,
        apps::v1::Deployment,
        apps::v1::ReplicaSet,
        node::v1::RuntimeClass,
        coordination::v1::Lease,
        discovery::v1::EndpointSlice,
        k8s_openapi::api::autoscaling::v1::Scale,
        k8s_openapi::api::policy::v1::Eviction,
        meta::Status,
        meta::DeleteOptions,
        meta::WatchEvent<serde_json::Value>,
        meta::APIResourceList,
        meta::ListMeta,
    );
    let mut defs = gen.take_definitions(true);
    // k8s-openapi has one generic List<T> without a schema; kube publishes
    // one `<Kind>List` definition per kind.
    for res in crate::registry::RESOURCES {
        let item = def_name(res);
        if !defs.contains_key(&item) {
            continue;
        }
        defs.insert(
            format!("{item}List"),
            serde_json::json!({
                "description": format!("{}List is a list of {} objects.", res.kind, res.kind),
                "type": "object",
                "properties": {
                    "apiVersion": {"description": "APIVersion defines the versioned schema of this representation of an object.", "type": "string"},
                    "items": {"description": format!("List of {}.", res.plural), "type": "array", "items": {"$ref": format!("#/definitions/{item}")}},
                    "kind": {"description": "Kind is a string value representing the REST resource this object represents.", "type": "string"},
                    "metadata": {"description": "Standard list metadata.", "$ref": "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta"},
                },
                "required": ["items"],
            }),
        );
    }
    annotate(&mut defs);
    defs
}

/// Writes the extensions kube-apiserver publishes into the generated schemas.
fn annotate(defs: &mut Map<String, Value>) {
    for rule in LIST_RULES {
        let Some(prop) = defs
            .get_mut(rule.def)
            .and_then(|d| d.get_mut("properties"))
            .and_then(|p| p.get_mut(rule.field))
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        if !rule.strategy.is_empty() {
            prop.insert("x-kubernetes-patch-strategy".into(), rule.strategy.into());
        }
        if !rule.merge_key.is_empty() && !rule.strategy.is_empty() {
            prop.insert("x-kubernetes-patch-merge-key".into(), rule.merge_key.into());
        }
        if !rule.list_type.is_empty() {
            prop.insert("x-kubernetes-list-type".into(), rule.list_type.into());
        }
        if !rule.map_keys.is_empty() {
            prop.insert("x-kubernetes-list-map-keys".into(), rule.map_keys.into());
        }
    }
    for (def, field, strategy) in FIELD_STRATEGIES {
        if strategy.is_empty() {
            continue;
        }
        if let Some(prop) = defs
            .get_mut(*def)
            .and_then(|d| d.get_mut("properties"))
            .and_then(|p| p.get_mut(*field))
            .and_then(Value::as_object_mut)
        {
            prop.insert("x-kubernetes-patch-strategy".into(), (*strategy).into());
        }
    }
    // Maps are granular for apply; kube marks a few atomic. Every served kind
    // and its list carry their group/version/kind.
    for res in crate::registry::RESOURCES {
        for suffix in ["", "List"] {
            let name = format!("{}{suffix}", def_name(res));
            if let Some(d) = defs.get_mut(&name).and_then(Value::as_object_mut) {
                d.insert(
                    "x-kubernetes-group-version-kind".into(),
                    serde_json::json!([{"group": res.group, "kind": format!("{}{suffix}", res.kind), "version": res.version}]),
                );
            }
        }
    }
    let extra: &[(&str, &str, &str, &str)] = &[
        (
            "io.k8s.apimachinery.pkg.apis.meta.v1.Status",
            "",
            "v1",
            "Status",
        ),
        (
            "io.k8s.api.autoscaling.v1.Scale",
            "autoscaling",
            "v1",
            "Scale",
        ),
        ("io.k8s.api.policy.v1.Eviction", "policy", "v1", "Eviction"),
        (
            "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions",
            "",
            "v1",
            "DeleteOptions",
        ),
        (
            "io.k8s.apimachinery.pkg.apis.meta.v1.APIResourceList",
            "",
            "v1",
            "APIResourceList",
        ),
    ];
    for (name, group, version, kind) in extra {
        if let Some(d) = defs.get_mut(*name).and_then(Value::as_object_mut) {
            d.insert(
                "x-kubernetes-group-version-kind".into(),
                serde_json::json!([{"group": group, "kind": kind, "version": version}]),
            );
        }
    }
}

/// A position in a schema while walking an object alongside it. An unknown
/// position (`Schema(None)`) behaves as "no special rules": maps merge, lists
/// are atomic.
#[derive(Debug, Clone, Copy, Default)]
pub struct Schema(Option<&'static Value>);

/// How a list field merges, read from a schema's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind<'a> {
    /// Replaced whole.
    Atomic,
    /// A set of scalars merged by value.
    Set,
    /// Items keyed by these fields.
    Map(&'a [Value]),
}

impl Schema {
    /// The schema of a served kind's objects.
    pub fn for_resource(res: &Resource) -> Schema {
        Schema(definitions().get(&def_name(res)))
    }

    /// The named definition.
    pub fn named(name: &str) -> Schema {
        Schema(definitions().get(name))
    }

    pub fn unknown() -> Schema {
        Schema(None)
    }

    pub fn is_known(&self) -> bool {
        self.0.is_some()
    }

    /// Follows `$ref` and one-element `allOf` to the schema that has the
    /// properties. Bounded, so a cyclic document cannot loop.
    fn resolved(&self) -> Option<&'static Map<String, Value>> {
        let mut cur = self.0?;
        for _ in 0..8 {
            let obj = cur.as_object()?;
            if let Some(Value::String(r)) = obj.get("$ref") {
                cur = definitions().get(r.strip_prefix("#/definitions/")?)?;
                continue;
            }
            if let Some(Value::Array(all)) = obj.get("allOf") {
                if let [one] = all.as_slice() {
                    cur = one;
                    continue;
                }
            }
            return Some(obj);
        }
        None
    }

    /// The schema of property `name` (its own extensions included).
    pub fn property(&self, name: &str) -> Schema {
        Schema(
            self.resolved()
                .and_then(|o| o.get("properties"))
                .and_then(|p| p.get(name)),
        )
    }

    /// The schema of a list's items.
    pub fn items(&self) -> Schema {
        Schema(self.resolved().and_then(|o| o.get("items")))
    }

    /// The schema of a map's values.
    pub fn values(&self) -> Schema {
        Schema(
            self.resolved()
                .and_then(|o| o.get("additionalProperties"))
                .filter(|v| v.is_object()),
        )
    }

    fn ext(&self, key: &str) -> Option<&'static Value> {
        self.0.and_then(|v| v.get(key))
    }

    /// `x-kubernetes-patch-strategy` split on commas.
    pub fn patch_strategies(&self) -> Vec<&'static str> {
        match self.ext("x-kubernetes-patch-strategy") {
            Some(Value::String(s)) => s.split(',').map(str::trim).collect(),
            _ => Vec::new(),
        }
    }

    pub fn merge_key(&self) -> Option<&'static str> {
        self.ext("x-kubernetes-patch-merge-key")
            .and_then(Value::as_str)
    }

    /// How this list merges under server-side apply.
    pub fn list_kind(&self) -> ListKind<'static> {
        match self.ext("x-kubernetes-list-type").and_then(Value::as_str) {
            Some("set") => ListKind::Set,
            Some("map") => match self.ext("x-kubernetes-list-map-keys") {
                Some(Value::Array(keys)) if !keys.is_empty() => ListKind::Map(keys),
                _ => ListKind::Atomic,
            },
            _ => ListKind::Atomic,
        }
    }

    /// The JSON type the schema declares (`object`, `array`, `string`, ...),
    /// if it declares one.
    pub fn type_name(&self) -> Option<&'static str> {
        self.resolved()
            .and_then(|o| o.get("type"))
            .and_then(Value::as_str)
    }

    /// True when the schema is a struct with declared properties, so keys
    /// outside them are unknown fields.
    pub fn has_properties(&self) -> bool {
        self.resolved()
            .and_then(|o| o.get("properties"))
            .is_some_and(Value::is_object)
    }

    /// True when the schema is a free-form map (`additionalProperties`), such
    /// as labels or a ConfigMap's data.
    pub fn is_map(&self) -> bool {
        self.values().is_known()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::by_kind;

    #[test]
    fn every_served_kind_has_a_schema_with_its_group_version_kind() {
        for res in crate::registry::RESOURCES {
            let name = def_name(res);
            let def = definitions()
                .get(&name)
                .unwrap_or_else(|| panic!("no definition {name}"));
            let gvk = &def["x-kubernetes-group-version-kind"][0];
            assert_eq!(gvk["kind"], res.kind, "{name}");
            assert_eq!(gvk["group"], res.group, "{name}");
        }
    }

    #[test]
    fn every_list_rule_names_a_real_field() {
        for rule in LIST_RULES {
            let prop = definitions()
                .get(rule.def)
                .and_then(|d| d.get("properties"))
                .and_then(|p| p.get(rule.field));
            assert!(prop.is_some(), "{}.{} does not exist", rule.def, rule.field);
        }
    }

    #[test]
    fn pod_containers_merge_by_name_and_their_ports_by_container_port() {
        let pod = Schema::for_resource(by_kind("v1", "Pod").expect("pod"));
        let containers = pod.property("spec").property("containers");
        assert_eq!(containers.merge_key(), Some("name"));
        assert_eq!(containers.patch_strategies(), vec!["merge"]);
        let ports = containers.items().property("ports");
        assert_eq!(ports.merge_key(), Some("containerPort"));
        assert!(matches!(ports.list_kind(), ListKind::Map(k) if k.len() == 2));
        let svc = Schema::for_resource(by_kind("v1", "Service").expect("svc"));
        assert_eq!(
            svc.property("spec").property("ports").merge_key(),
            Some("port")
        );
        assert!(pod.property("metadata").property("labels").is_map());
        assert!(!pod.property("nope").is_known());
    }
}
