//! Kubernetes REST over HTTPS: authn, discovery, OpenAPI, CRUD, patch, apply, watch, tables.
