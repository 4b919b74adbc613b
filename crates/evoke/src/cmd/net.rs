//! Pod network flags shared by `evoke server` and `evoke agent` (named as
//! k3s names them), and the choice of network they make.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use evoke_net::cluster::{ClusterNetConfig, NodeNetwork};
use evoke_net::node::LoopbackNetwork;
use evoke_net::Ipv4Net;
use evoke_node::network::PodNetwork;

/// How pods are networked.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A bridge per node, a veth per pod and routes between the nodes'
    /// pod subnets (flannel's host-gw); Services and DNS on every node.
    HostGw,
    /// No pod network: each pod gets a namespace with loopback only, and no
    /// Service proxy or DNS runs (k3s's `--flannel-backend none`).
    None,
}

#[derive(clap::Args, Debug, Clone)]
pub struct NetArgs {
    /// The pod network backend.
    #[arg(
        long,
        value_enum,
        default_value = "host-gw",
        env = "EVOKE_FLANNEL_BACKEND"
    )]
    pub flannel_backend: Backend,
    /// Pod addresses; each node gets a /24 of it.
    #[arg(long, default_value = evoke_net::ipam::DEFAULT_POD_CIDR)]
    pub cluster_cidr: Ipv4Net,
    /// Service ClusterIPs.
    #[arg(long, default_value = evoke_net::ipam::DEFAULT_SERVICE_CIDR)]
    pub service_cidr: Ipv4Net,
    /// The cluster DNS address written to every pod's resolv.conf; each
    /// node serves DNS on it.
    #[arg(long, default_value = "10.43.0.10")]
    pub cluster_dns: Ipv4Addr,
    /// The cluster's DNS domain.
    #[arg(long, default_value = evoke_net::dns::CLUSTER_DOMAIN)]
    pub cluster_domain: String,
    /// Pod sandboxes (network namespace, veth on the bridge, address) kept
    /// ready so a new pod's network is a hand-over; 0 disables the pool.
    #[arg(long, default_value_t = evoke_net::cluster::DEFAULT_SANDBOX_POOL, env = "EVOKE_POD_SANDBOX_POOL")]
    pub pod_sandbox_pool: usize,
}

impl NetArgs {
    /// Checks the flags agree with each other.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.service_cidr.contains(self.cluster_dns) {
            anyhow::bail!(
                "--cluster-dns {} is outside --service-cidr {}",
                self.cluster_dns,
                self.service_cidr
            );
        }
        if self.service_cidr.prefix() > 28 {
            anyhow::bail!(
                "--service-cidr {} is too small: it needs at least 16 addresses",
                self.service_cidr
            );
        }
        if self.service_cidr.nth(1) == Some(self.cluster_dns) {
            anyhow::bail!(
                "--cluster-dns {} is the kubernetes Service's address (the first of --service-cidr)",
                self.cluster_dns
            );
        }
        if self.cluster_cidr.contains(self.service_cidr.network())
            || self.service_cidr.contains(self.cluster_cidr.network())
        {
            anyhow::bail!(
                "--cluster-cidr {} and --service-cidr {} overlap",
                self.cluster_cidr,
                self.service_cidr
            );
        }
        if self.cluster_cidr.prefix() > 24 {
            anyhow::bail!(
                "--cluster-cidr {} is smaller than one /24 node subnet",
                self.cluster_cidr
            );
        }
        Ok(())
    }
}

/// `--service-cidr` for the API server's ClusterIP allocator.
pub fn service_cidr(args: &NetArgs) -> anyhow::Result<evoke_apiserver::ServiceCidr> {
    evoke_apiserver::ServiceCidr::new(args.service_cidr.network(), args.service_cidr.prefix())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--service-cidr {} is too small: it needs at least 16 addresses",
                args.service_cidr
            )
        })
}

/// The pod network of node `node_name`. With the host-gw backend this
/// spawns its bring-up (wait for the podCIDR, bridge, DNS, proxy, routes)
/// on the current runtime; pods wait for it.
pub fn pod_network(
    args: &NetArgs,
    data_dir: &Path,
    node_name: &str,
    client: kube::Client,
) -> Arc<dyn PodNetwork> {
    match args.flannel_backend {
        Backend::None => Arc::new(LoopbackNetwork::new("/run/netns")),
        Backend::HostGw => {
            let net = NodeNetwork::new(ClusterNetConfig {
                data_dir: data_dir.to_path_buf(),
                node_name: node_name.to_string(),
                cluster_cidr: args.cluster_cidr,
                service_cidr: args.service_cidr,
                cluster_dns: args.cluster_dns,
                cluster_domain: args.cluster_domain.clone(),
                sandbox_pool: args.pod_sandbox_pool,
            });
            let run = net.clone();
            tokio::spawn(async move {
                if let Err(e) = run.run(client).await {
                    tracing::error!(error = %e, "pod network did not come up");
                }
            });
            net
        }
    }
}

/// The server's share: node podCIDRs out of `--cluster-cidr` (with every
/// backend, so that Nodes carry their subnet either way) and, with a pod
/// network, the `kube-dns` Service at `--cluster-dns`.
pub fn start_server_side(args: &NetArgs, client: kube::Client) {
    tokio::spawn(evoke_net::cluster::run_pod_cidr_allocator(
        client.clone(),
        args.cluster_cidr,
    ));
    if args.flannel_backend == Backend::HostGw {
        tokio::spawn(evoke_net::cluster::ensure_dns_service(
            client,
            args.cluster_dns,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cluster: &str, service: &str, dns: &str) -> NetArgs {
        NetArgs {
            flannel_backend: Backend::HostGw,
            cluster_cidr: cluster.parse().expect("cidr"),
            service_cidr: service.parse().expect("cidr"),
            cluster_dns: dns.parse().expect("ip"),
            cluster_domain: "cluster.local".into(),
            pod_sandbox_pool: 4,
        }
    }

    #[test]
    fn k3s_defaults_are_valid_and_inconsistent_flags_are_refused_with_their_names() {
        assert!(args("10.42.0.0/16", "10.43.0.0/16", "10.43.0.10")
            .validate()
            .is_ok());
        let refused = |a: NetArgs, flag: &str| {
            let e = a.validate().expect_err("refused").to_string();
            assert!(e.contains(flag), "{e}");
        };
        refused(
            args("10.42.0.0/16", "10.43.0.0/16", "10.99.0.10"),
            "--cluster-dns",
        );
        refused(
            args("10.42.0.0/16", "10.43.0.0/16", "10.43.0.1"),
            "kubernetes",
        );
        refused(args("10.0.0.0/8", "10.43.0.0/16", "10.43.0.10"), "overlap");
        refused(
            args("10.42.0.0/25", "10.43.0.0/16", "10.43.0.10"),
            "--cluster-cidr",
        );
        refused(
            args("10.42.0.0/16", "10.43.0.0/29", "10.43.0.2"),
            "--service-cidr",
        );
        assert_eq!(
            service_cidr(&args("10.42.0.0/16", "10.96.0.0/12", "10.96.0.10"))
                .expect("cidr")
                .first(),
            std::net::Ipv4Addr::new(10, 96, 0, 1)
        );
    }
}
