//! Node agent: pod workers, probes, status, logs and exec streams.
