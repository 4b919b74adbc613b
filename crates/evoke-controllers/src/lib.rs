//! Level-triggered reconcilers: replicaset, deployment, gc, endpoints, namespace, node lifecycle.
