//! `evoke agent`: join this machine to a server as a node; and the
//! orchestration components `evoke server` starts in its own process
//! (scheduler, controllers and, unless --disable-agent, a node agent).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use evoke_container::tier::{ContainerTier, ProcessTier};
use evoke_node::network::PodNetwork;
use evoke_node::token::JoinToken;
use evoke_runtime::WorkloadRuntime;
use evoke_vmm::tier::MicroVmTier;

use crate::cmd::net::{self, NetArgs};
use crate::Global;

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The server's URL, e.g. https://127.0.0.1:6443.
    #[arg(long)]
    pub server: String,
    /// The join token (`<data-dir>/server/node-token` on the server).
    /// Other users can read a command line; prefer --token-file or the
    /// environment.
    #[arg(
        long,
        env = "EVOKE_TOKEN",
        required_unless_present = "token_file",
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// A file holding the join token.
    #[arg(long, env = "EVOKE_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// This node's name (default: the hostname).
    #[arg(long)]
    pub node_name: Option<String>,
    #[command(flatten)]
    pub net: NetArgs,
    /// The address the API server and other nodes reach this node at
    /// (default: this machine's address on the route to the server).
    #[arg(long)]
    pub node_ip: Option<std::net::IpAddr>,
    /// Extra node labels, KEY=VALUE; repeatable.
    #[arg(long = "node-label", value_parser = parse_label)]
    pub node_labels: Vec<(String, String)>,
}

/// `KEY=VALUE`, with a key a node may set on itself: as the kubelet
/// refuses `--node-labels` that NodeRestriction would refuse at
/// registration (an admin sets those: `kubectl label node`).
fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, _)) if evoke_apiserver::node_may_not_set_label(k) => Err(format!(
            "{k:?} is a label a node may not set on itself (NodeRestriction: \
             node-restriction.kubernetes.io/ and kubernetes.io or k8s.io labels other than the \
             kubelet's); set it with kubectl label node"
        )),
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// This machine's host name, lower-cased as a Node name must be (k3s does
/// the same).
/// This node's name: the flag, else the hostname. A name the API would
/// refuse on every registration attempt (a host whose hostname is unset
/// reads as "(none)") is a one-line error now, not a node that never shows up.
pub fn node_name(flag: Option<&str>) -> anyhow::Result<String> {
    let name = flag.map_or_else(hostname, str::to_string);
    if let Some(why) = evoke_types::validate::dns_subdomain(&name) {
        anyhow::bail!("node name {name:?}: {why}; set --node-name");
    }
    Ok(name)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "evoke-node".into())
}

/// The tiers this build offers; one that cannot start is left out with a
/// warning, and pods asking for it get a condition and an event saying so.
fn tiers(data_dir: &Path) -> Vec<Arc<dyn WorkloadRuntime>> {
    let mut v: Vec<Arc<dyn WorkloadRuntime>> = Vec::new();
    match ContainerTier::new(data_dir) {
        Ok(t) => v.push(Arc::new(t)),
        Err(e) => tracing::warn!(error = %e, "container tier unavailable"),
    }
    match ProcessTier::new(data_dir) {
        Ok(t) => v.push(Arc::new(t)),
        Err(e) => tracing::warn!(error = %e, "process tier unavailable"),
    }
    // The microvm tier is always listed: on a host whose KVM cannot boot
    // Linux guests its availability check says why, and pods show that.
    match std::env::current_exe() {
        Ok(exe) => v.push(Arc::new(MicroVmTier::new(data_dir, exe))),
        Err(e) => tracing::warn!(error = %e, "microvm tier: cannot find the evoke binary"),
    }
    v
}

fn agent_config(
    data_dir: &Path,
    node_name: String,
    host_ip: String,
    labels: BTreeMap<String, String>,
    endpoint_tls: evoke_node::server::EndpointTls,
    network: Arc<dyn PodNetwork>,
) -> evoke_node::AgentConfig {
    evoke_node::AgentConfig {
        node_name,
        host_ip,
        data_dir: data_dir.to_path_buf(),
        tiers: tiers(data_dir),
        default_tier: "container".into(),
        network,
        labels,
        // Port 0: several agents (tests, a server plus agents) share a host.
        listen: "0.0.0.0:0".into(),
        endpoint_tls,
    }
}

/// How long the agent waits for the server to prove the token's secret.
const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// How long an agent started before its server waits for it to come up.
const JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Joins `--server` as a node (waiting up to a minute for a server that is
/// not up yet): parse the token, pin the server's CA to the token's hash
/// (no secret is sent before that), trade the secret and this node's
/// password for the node's certificates (see [`evoke_node::token::join`]),
/// then run the node agent as that node. Only the node password is kept
/// on disk (`<data-dir>/agent/node-password`); the secret and the keys
/// stay in memory.
pub fn main(global: &Global, args: AgentArgs) -> anyhow::Result<u8> {
    args.net.validate()?;
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => JoinToken::parse(t).context("--token")?,
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--token-file {}", path.display()))?;
            JoinToken::parse(&text).with_context(|| format!("--token-file {}", path.display()))?
        }
        (None, None) => anyhow::bail!("--token or --token-file is required"),
    };
    let host_ip = match args.node_ip {
        Some(ip) => ip,
        None => evoke_node::token::source_address_to(&args.server)
            .with_context(|| format!("finding this node's address towards {}", args.server))?,
    };
    let name = node_name(args.node_name.as_deref())?;
    let labels: BTreeMap<String, String> = args.node_labels.iter().cloned().collect();
    // A long-running daemon, like the server (see crate::memory); before
    // the runtime's threads exist.
    crate::memory::tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let password = evoke_node::token::node_password(&global.data_dir)?;
    runtime.block_on(async {
        let joining = || format!("joining {}", args.server);
        let (bootstrap, ca_pem) =
            evoke_node::token::client_when_up(&args.server, &token, JOIN_WAIT)
                .await
                .with_context(joining)?;
        let creds = evoke_node::token::join(
            &bootstrap,
            &args.server,
            &ca_pem,
            &name,
            &[host_ip],
            &password,
            JOIN_TIMEOUT,
        )
        .await?;
        let client = creds.client;
        tokio::spawn(creds.renewal.run());
        // Tests and scripts read this line.
        println!(
            "evoke agent joined {} as node {name} at {host_ip}",
            args.server
        );
        tokio::spawn(crate::memory::scavenge());
        let network = net::pod_network(&args.net, &global.data_dir, &name, client.clone());
        let agent = evoke_node::Agent::new(
            client,
            agent_config(
                &global.data_dir,
                name,
                host_ip.to_string(),
                labels,
                creds.endpoint,
                network,
            ),
        );
        agent.run().await.context("node agent")?;
        Ok(0)
    })
}

/// The node `evoke server` runs in its own process (none with
/// `--disable-agent`).
pub struct LocalNode {
    pub name: String,
    pub ip: String,
}

/// Starts the scheduler, the controllers and (given `local_node`) the
/// in-process node agent against the server whose admin kubeconfig is at
/// `kubeconfig`; writes the join token (the CA's hash and the node token) for
/// other nodes next to it. The in-process agent joins its own server as
/// any agent does (join token, node password, certificates), so it acts
/// with a node's rights and its endpoint is TLS like any other.
pub async fn start_orchestration(
    global: &Global,
    kubeconfig: &Path,
    ca_pem: &str,
    node_token: &str,
    net_args: &NetArgs,
    local_node: Option<LocalNode>,
) -> anyhow::Result<()> {
    let token = JoinToken::for_server(ca_pem, node_token).context("making the join token")?;
    let token_path = global.data_dir.join("server").join("node-token");
    write_private(&token_path, &format!("{token}\n"))
        .with_context(|| format!("writing {}", token_path.display()))?;
    let client = evoke_node::token::client_from_kubeconfig(kubeconfig)
        .await
        .context("orchestration client")?;
    let rc_client = client.clone();
    tokio::spawn(async move {
        // The API may still be settling; keep trying until the classes exist.
        for attempt in 0..30 {
            match evoke_node::runtimeclass::ensure(rc_client.clone()).await {
                Ok(()) => return,
                Err(e) if attempt == 29 => {
                    tracing::error!(error = %e, "could not create runtime classes")
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
            }
        }
    });
    let sched = evoke_scheduler::Scheduler::new(client.clone());
    tokio::spawn(async move {
        if let Err(e) = sched.run().await {
            tracing::error!(error = %e, "scheduler stopped");
        }
    });
    tokio::spawn(evoke_controllers::run(client.clone()));
    net::start_server_side(net_args, client.clone());
    let disable_agent = local_node.is_none();
    if let Some(LocalNode {
        name: node_name,
        ip: node_ip,
    }) = local_node
    {
        // A node may not give itself role labels (NodeRestriction); the
        // control plane labels its own node, as k3s's server does.
        tokio::spawn(evoke_node::token::keep_node_labels(
            client.clone(),
            node_name.clone(),
            BTreeMap::from([
                (
                    "node-role.kubernetes.io/control-plane".into(),
                    "true".into(),
                ),
                ("node-role.kubernetes.io/master".into(), "true".into()),
            ]),
        ));
        let labels = BTreeMap::new();
        let network = net::pod_network(net_args, &global.data_dir, &node_name, client.clone());
        let server_url = server_url(kubeconfig)?;
        let password = evoke_node::token::node_password(&global.data_dir)?;
        let data_dir = global.data_dir.clone();
        tokio::spawn(async move {
            let join = || async {
                let (bootstrap, ca_pem) =
                    evoke_node::token::client_when_up(&server_url, &token, JOIN_WAIT).await?;
                let ip: std::net::IpAddr = node_ip.parse().map_err(|e| {
                    evoke_node::NodeError::Token(format!("node address {node_ip:?}: {e}"))
                })?;
                evoke_node::token::join(
                    &bootstrap,
                    &server_url,
                    &ca_pem,
                    &node_name,
                    &[ip],
                    &password,
                    JOIN_TIMEOUT,
                )
                .await
            };
            // The API is up already; a refusal (the name taken by another
            // machine) or a busy store is retried, and said, every 30 s.
            let creds = loop {
                match join().await {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::error!(error = %e, "the in-process node agent could not join; retrying in 30 s");
                        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    }
                }
            };
            tokio::spawn(creds.renewal.run());
            let agent = evoke_node::Agent::new(
                creds.client,
                agent_config(
                    &data_dir,
                    node_name,
                    node_ip,
                    labels,
                    creds.endpoint,
                    network,
                ),
            );
            if let Err(e) = agent.run().await {
                tracing::error!(error = %e, "node agent stopped");
            }
        });
    }
    tracing::info!(disable_agent, "orchestration started");
    Ok(())
}

/// The server URL in a kubeconfig (the admin one the server wrote).
fn server_url(kubeconfig: &Path) -> anyhow::Result<String> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    kc.clusters
        .iter()
        .find_map(|c| c.cluster.as_ref()?.server.clone())
        .with_context(|| format!("{} names no server", kubeconfig.display()))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, text.as_bytes())
}
