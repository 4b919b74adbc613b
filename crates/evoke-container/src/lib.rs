//! Linux container engine and the OCI runtime command surface.
