//! kubectl's typed commands send protobuf bodies; evoke must read them as
//! kube-apiserver does.

mod common;

use common::{require_kubectl, start_server};

#[test]
fn kubectl_create_generators_send_protobuf_and_are_understood() {
    if !require_kubectl() {
        return;
    }
    let s = start_server();
    s.ok(&[
        "create",
        "configmap",
        "settings",
        "--from-literal=mode=fast",
    ]);
    assert_eq!(
        s.ok(&["get", "cm", "settings", "-o", "jsonpath={.data.mode}"]),
        "fast"
    );

    s.ok(&[
        "create",
        "secret",
        "generic",
        "token",
        "--from-literal=key=s3cret",
    ]);
    // "s3cret" in base64.
    assert_eq!(
        s.ok(&["get", "secret", "token", "-o", "jsonpath={.data.key}"]),
        "czNjcmV0"
    );

    s.ok(&["create", "namespace", "team-a"]);
    s.ok(&[
        "-n",
        "team-a",
        "create",
        "deployment",
        "web",
        "--image=busybox",
        "--replicas=0",
        "--",
        "httpd",
        "-f",
    ]);
    let spec = s.ok(&[
        "-n",
        "team-a",
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].command}",
    ]);
    assert_eq!(spec, "0 busybox [\"httpd\",\"-f\"]");

    s.ok(&["create", "service", "clusterip", "api", "--tcp=80:8080"]);
    assert_eq!(
        s.ok(&[
            "get",
            "svc",
            "api",
            "-o",
            "jsonpath={.spec.ports[0].port}/{.spec.ports[0].targetPort}"
        ]),
        "80/8080"
    );
}
