//! The WorkloadRuntime trait shared by the tiers, and the OCI image store.
