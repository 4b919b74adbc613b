//! `evoke server`: the control plane, k3s style.

use std::sync::Arc;

use anyhow::Context;
use evoke_store::Backend;

use crate::Global;

#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// Port for the HTTPS API (0 picks a free one and writes it to the kubeconfig).
    #[arg(long, default_value_t = 6443)]
    pub https_listen_port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_address: String,
    /// Where to write the admin kubeconfig.
    #[arg(long)]
    pub write_kubeconfig: Option<std::path::PathBuf>,
    /// File mode of the kubeconfig, in octal.
    #[arg(long, default_value = "0600")]
    pub write_kubeconfig_mode: String,
    /// Shared secret for joining agents (the node token, with a node's rights
    /// only); generated on first start if absent. The join token in
    /// `<data-dir>/server/node-token` carries it with the CA's hash.
    #[arg(long, env = "EVOKE_TOKEN")]
    pub token: Option<String>,
    /// Use etcd (http://HOST:PORT) instead of the embedded SQLite store.
    #[arg(long)]
    pub datastore_endpoint: Option<String>,
    /// Run only the control plane, without a node agent in this process.
    #[arg(long)]
    pub disable_agent: bool,
    #[command(flatten)]
    pub net: crate::cmd::net::NetArgs,
    /// The address other nodes and the API server reach this node's agent
    /// at (default: --bind-address when it names one, else the address of
    /// the default route).
    #[arg(long)]
    pub node_ip: Option<std::net::IpAddr>,
    /// This node's name (default: the hostname).
    #[arg(long)]
    pub node_name: Option<String>,
    /// How long the certificates nodes get are valid, e.g. 8760h (the
    /// default, a year), 30m or 90s (at least 10s); agents renew theirs at
    /// 70-90% of that, as kube-controller-manager's flag of this name and
    /// the kubelet's rotation do.
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    pub cluster_signing_duration: std::time::Duration,
}

/// `90s`, `30m`, `8760h` or a sum of them (`1h30m`).
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration like 8760h, 30m or 90s");
    let mut total = 0u64;
    let mut digits = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    if total < 10 {
        return Err(format!(
            "{s:?} is shorter than 10s; renewal needs a few seconds"
        ));
    }
    Ok(std::time::Duration::from_secs(total))
}

pub fn main(global: &Global, args: ServerArgs) -> anyhow::Result<u8> {
    let mode = u32::from_str_radix(args.write_kubeconfig_mode.trim_start_matches("0o"), 8)
        .with_context(|| {
            format!(
                "--write-kubeconfig-mode {:?} is not an octal file mode",
                args.write_kubeconfig_mode
            )
        })?;
    args.net.validate()?;
    // Only the in-process agent registers a Node under this name.
    let node_name = match args.disable_agent {
        true => None,
        false => Some(crate::cmd::agent::node_name(args.node_name.as_deref())?),
    };
    // Before the runtime's threads exist, so they share the capped arenas.
    crate::memory::tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let code = runtime.block_on(run(global, args, mode, node_name));
    // Blocking tasks (a tier call, a long-poll) must not hold the process
    // after the API has stopped; the node's workloads keep running and are
    // adopted on the next start.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    code
}

/// How long a stopping server waits for open requests (watches never end on
/// their own) and blocking work before it exits anyway.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// SQLite under `<data-dir>/server/db` by default, etcd when an endpoint
/// is given, as k3s does; both compact their history in the background.
async fn open_store(global: &Global, args: &ServerArgs) -> anyhow::Result<Arc<dyn Backend>> {
    let endpoint = args.datastore_endpoint.as_deref();
    evoke_store::open(&global.data_dir, endpoint)
        .await
        .with_context(|| match endpoint {
            Some(e) => format!("connecting to the datastore at {e}"),
            None => format!("opening the store under {}", global.data_dir.display()),
        })
}

/// The in-process node's InternalIP: the flag, else the API server's own
/// specific address (in a network namespace without a default route this is
/// the one address peers can reach), else the default route's source.
fn node_ip(args: &ServerArgs, bound: std::net::IpAddr) -> String {
    match args.node_ip {
        Some(ip) => ip.to_string(),
        None if !bound.is_unspecified() && !bound.is_loopback() => bound.to_string(),
        None => evoke_node::detect_host_ip(),
    }
}

async fn run(
    global: &Global,
    args: ServerArgs,
    mode: u32,
    node_name: Option<String>,
) -> anyhow::Result<u8> {
    let store = open_store(global, &args).await?;
    let config = evoke_apiserver::Config {
        data_dir: global.data_dir.clone(),
        bind_address: args.bind_address.clone(),
        port: args.https_listen_port,
        node_token: args.token.clone(),
        kubeconfig_path: args.write_kubeconfig.clone(),
        kubeconfig_mode: mode,
        service_cidr: crate::cmd::net::service_cidr(&args.net)?,
        node_cert_lifetime: args.cluster_signing_duration,
        ..evoke_apiserver::Config::new(global.data_dir.clone())
    };
    let server = evoke_apiserver::Server::start(config, store.clone())
        .await
        .context("starting the api server")?;
    // Tests and scripts read this line to learn the port and kubeconfig.
    println!(
        "evoke server ready on https://{} kubeconfig={}",
        server.addr,
        server.kubeconfig.display()
    );

    // ---- orchestration: start controllers, the scheduler and (unless
    // --disable-agent) the in-process node agent here, using `store`,
    // `server.addr` and `server.kubeconfig`. ----
    // (orchestration-owned call; the code lives in cmd/agent.rs)
    crate::cmd::agent::start_orchestration(
        global,
        &server.kubeconfig,
        &server.credentials.ca_cert_pem,
        &server.credentials.node_token,
        &args.net,
        node_name.map(|name| crate::cmd::agent::LocalNode {
            name,
            ip: node_ip(&args, server.addr.ip()),
        }),
    )
    .await
    .context("starting orchestration")?;
    tokio::spawn(crate::memory::scavenge());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    if tokio::time::timeout(SHUTDOWN_GRACE, server.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace = ?SHUTDOWN_GRACE,
            "open connections outlived the grace period; closing them"
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn signing_durations_read_as_hours_minutes_and_seconds() {
        assert_eq!(parse_duration("8760h").unwrap().as_secs(), 8760 * 3600);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        for bad in ["", "10", "5s", "1d", "h", "-1h", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
