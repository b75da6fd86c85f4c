//! `node-vmm agent`: what the `DaemonSet` runs on each hypervisor node.
//!
//! It keeps this node's `HypervisorNode` and heartbeat Lease current,
//! watches only the `VirtualMachine`s bound to this node (label
//! `kubevmm.io/node=<node>`), and converges each: prepares disks and taps,
//! starts a VMM through the shim ([`supervisor`]), pauses, resumes, stops it,
//! restarts it per `runStrategy` ([`lifecycle`]), and writes status with
//! server-side apply as field manager `node-vmm`. VMMs outlive the agent; a
//! restarted agent re-adopts them from its state directory.

pub mod access;
pub mod binding;
pub mod cgroups;
pub mod ctx;
pub mod decide;
pub mod disks;
pub mod favordynmods;
pub mod handoff;
pub mod holders;
pub mod host;
pub mod hostfs;
pub mod images;
pub mod jail_ids;
pub mod lifecycle;
pub mod local;
pub mod masquerade;
pub mod metrics;
pub mod netlink;
pub mod netmetrics;
pub mod network;
pub mod nft;
pub mod node;
pub mod opener;
pub mod orphans;
pub mod prepare;
pub mod reconcile;
pub mod report;
pub mod retention;
pub mod seed;
pub mod server;
pub mod status_body;
pub mod supervisor;
pub mod taps;
pub mod vmm_client;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::Client;
use kubevmm_crds::contract::LABEL_NODE;
use kubevmm_crds::events::EventSink;
use kubevmm_crds::VirtualMachine;

use self::ctx::Ctx;
use self::local::LocalVm;
use self::node::{NodeReporter, Reserve};

/// Agent settings (flags of `node-vmm agent`).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The Kubernetes node name this agent serves.
    pub node_name: String,
    /// Where per-VM directories live (`<state>/vms/<uid>`).
    pub state_dir: PathBuf,
    /// The `kubevmm-vmm` binary.
    pub vmm_binary: PathBuf,
    /// Directories `hostDisk` and boot `path` sources may use.
    pub allowed_dirs: Vec<PathBuf>,
    /// Host bridges `bridge` networks may name.
    pub allowed_bridges: Vec<String>,
    /// Largest `emptyDisk`, in bytes.
    pub max_empty_disk: u64,
    /// The uids/gids VMMs run as (one per VM); `None` runs them unjailed
    /// (only when the agent is not root, which it says at start).
    pub jail: Option<jail_ids::Range>,
    /// Memory a VM's cgroup allows beyond its guest RAM.
    pub vmm_memory_overhead: u64,
    /// Held back from guests.
    pub reserve: Reserve,
    /// Address of the metrics and health endpoint.
    pub metrics_addr: std::net::SocketAddr,
    /// Where per-VM cgroups go (with limits).
    pub cgroups: cgroups::Layout,
    /// Validity of the heartbeat Lease, in seconds.
    pub lease_seconds: i32,
    /// How long a cached image no VM uses is kept.
    pub image_grace: std::time::Duration,
    /// The masquerade network.
    pub masquerade: network::Settings,
    /// Start steps slower than this get a `SlowStartStep` Event.
    pub slow_start_step: std::time::Duration,
    /// The access server (console, logs, port-forward for the operator).
    pub access: Option<access::AccessSettings>,
}

/// Errors that stop the agent (anything per VM is a status condition instead).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No usable kubeconfig or in-cluster config.
    #[error("cannot connect to the API server: {0}; set KUBECONFIG or run in a pod")]
    Client(#[source] kube::Error),
    /// Registration failed.
    #[error(transparent)]
    Node(#[from] node::NodeError),
    /// Metrics registry.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// The metrics port.
    #[error("cannot listen on {addr} for metrics: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The state directory overlaps an allowed directory.
    #[error(transparent)]
    Layout(#[from] hostfs::HostFsError),
    /// The image cache.
    #[error("image cache in {path}: {source}")]
    Images {
        /// The state directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The masquerade network's lease table or settings.
    #[error("masquerade network: {0}")]
    Network(#[from] network::NetworkError),
    /// The access server.
    #[error(transparent)]
    Access(#[from] access::AccessError),
    /// The state directory.
    #[error("state directory {path}: {source}")]
    State {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The image importer of this node (its cache in the state directory).
fn importer(
    cfg: &AgentConfig,
    client: &Client,
    events: &EventSink,
    metrics: &Arc<metrics::Metrics>,
    trigger: futures::channel::mpsc::UnboundedSender<
        kube::runtime::reflector::ObjectRef<VirtualMachine>,
    >,
) -> Result<Arc<images::Importer>, AgentError> {
    Ok(Arc::new(
        images::Importer::new(
            &images::ImporterConfig {
                state_dir: cfg.state_dir.clone(),
                allowed_dirs: cfg.allowed_dirs.clone(),
                node: cfg.node_name.clone(),
                grace: cfg.image_grace,
            },
            client.clone(),
            events.clone(),
            metrics.clone(),
            trigger,
        )
        .map_err(|source| AgentError::Images {
            path: cfg.state_dir.clone(),
            source,
        })?,
    ))
}

/// The masquerade network (its lease table loaded), with its DHCP events
/// turned into reconciles (a guest got its address: into its status now)
/// and its metrics rendered at scrape time.
fn network(
    cfg: &AgentConfig,
    metrics: &Arc<metrics::Metrics>,
    trigger_tx: futures::channel::mpsc::UnboundedSender<
        kube::runtime::reflector::ObjectRef<VirtualMachine>,
    >,
) -> Result<Arc<network::Network>, AgentError> {
    let (dhcp_tx, mut dhcp_rx) = tokio::sync::mpsc::unbounded_channel();
    let network = Arc::new(network::Network::new(
        cfg.masquerade.clone(),
        &cfg.state_dir,
        dhcp_tx,
    )?);
    // A guest got its address: write it into the VM's status now.
    let (net, trigger) = (network.clone(), trigger_tx);
    tokio::spawn(async move {
        while let Some(ev) = dhcp_rx.recv().await {
            tracing::debug!(?ev, "DHCP");
            if let kubevmm_dhcp::Event::Bound { mac, .. } = ev {
                if let Some(vm) = net.owner_of(mac) {
                    let _ = trigger.unbounded_send(vm);
                }
            }
        }
    });
    let (net, dir) = (network.clone(), cfg.state_dir.clone());
    metrics.set_extra(Box::new(move || {
        netmetrics::render(
            &netmetrics::sample(&dir, &net.settings.bridge),
            &net.stats.snapshot(),
            net.reserved(),
        )
    }));
    Ok(network)
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    // No user path may name the agent's own files (compared resolved).
    let resolved = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
    hostfs::check_layout(
        &resolved(&cfg.state_dir),
        &cfg.allowed_dirs.iter().map(resolved).collect::<Vec<_>>(),
    )?;
    hostfs::check_layout(&cfg.state_dir, &cfg.allowed_dirs)?;
    let client = Client::try_default().await.map_err(AgentError::Client)?;
    let vms_dir = cfg.state_dir.join("vms");
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&vms_dir)
            .map_err(|source| AgentError::State {
                path: vms_dir.clone(),
                source,
            })?;
    }
    if let Some(r) = cfg.jail {
        tracing::info!(
            "VMMs are jailed: uids/gids {}..{}, own mount/PID/IPC namespaces, chroot, no capabilities, seccomp",
            r.base,
            r.base + r.count - 1
        );
    } else {
        tracing::warn!("not running as root: VMMs run unjailed as this user");
    }
    tracing::info!(layout = ?cfg.cgroups, "per-VM cgroups");
    let metrics = Arc::new(metrics::Metrics::new()?);
    let reporter = NodeReporter::new(
        client.clone(),
        cfg.node_name.clone(),
        cfg.reserve,
        cfg.lease_seconds,
    )
    .with_access_endpoint(cfg.access.as_ref().map(|a| a.advertise.clone()));
    reporter.register().await?;

    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(|source| AgentError::Listen {
            addr: cfg.metrics_addr,
            source,
        })?;
    tokio::spawn(server::serve(listener, metrics.clone()));

    let (trigger_tx, trigger_rx) = futures::channel::mpsc::unbounded();
    let events = EventSink::start(
        Recorder::new(
            client.clone(),
            Reporter {
                controller: "node-vmm".into(),
                instance: Some(cfg.node_name.clone()),
            },
        ),
        Box::new(|_, note, e| tracing::debug!("event {} not recorded: {e}", note.reason)),
    );
    let importer = importer(&cfg, &client, &events, &metrics, trigger_tx.clone())?;
    tokio::spawn(importer.clone().collect_garbage());
    let network = network(&cfg, &metrics, trigger_tx.clone())?;
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        events: events.clone(),
        importer,
        network,
        node_vmm: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("node-vmm")),
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        vms: Mutex::new(HashMap::<String, LocalVm>::new()),
        trigger: trigger_tx,
        running: Mutex::new(std::collections::HashSet::new()),
        running_changed: tokio::sync::Notify::new(),
    });

    let vm_api: Api<VirtualMachine> = Api::all(client.clone());
    let selector = format!("{LABEL_NODE}={}", cfg.node_name);
    let controller = Controller::new(vm_api, watcher::Config::default().labels(&selector));

    if let Some(settings) = &cfg.access {
        tokio::spawn(access::serve(settings, ctx.clone()).await?);
    }
    tokio::spawn(heartbeat(ctx.clone(), reporter));
    // Garbage collection of VMMs whose VM is no longer bound here.
    tokio::spawn(orphans::collect_orphans(ctx.clone()));

    tracing::info!(node = %cfg.node_name, "node-vmm agent watching VirtualMachines with {selector}");
    controller
        .reconcile_on(trigger_rx)
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!("reconcile: {e}");
            }
        })
        .await;
    // What is left of the Events goes out before the agent exits.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), events.flush()).await;
    Ok(())
}

/// How long the running count may settle before the node status says it.
const COUNT_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Heartbeat: the `HypervisorNode` status and the Lease every third of the
/// Lease; the status also within [`COUNT_SETTLE`] of a change in the
/// number of running VMMs.
async fn heartbeat(hb_ctx: Arc<Ctx>, reporter: NodeReporter) {
    loop {
        let mut written = hb_ctx.running_count();
        let masquerade = hb_ctx.network.condition();
        if let Err(e) = reporter.heartbeat(written, &[masquerade]).await {
            tracing::warn!("heartbeat failed: {e}");
        }
        let next = tokio::time::Instant::now() + reporter.interval();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => break,
                () = hb_ctx.running_changed.notified() => {
                    // A burst of starts is one write, made after it: the
                    // count is for people, and the API server's time goes
                    // to the VMs' own status first.
                    tokio::time::sleep(COUNT_SETTLE).await;
                    let running = hb_ctx.running_count();
                    if running != written {
                        let masquerade = hb_ctx.network.condition();
                        match reporter.update_status(running, &[masquerade]).await {
                            Ok(()) => written = running,
                            Err(e) => tracing::warn!("node status update failed: {e}"),
                        }
                    }
                }
            }
        }
    }
}
