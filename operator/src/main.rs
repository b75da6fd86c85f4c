//! `kubevmm-operator`: places `VirtualMachine`s onto `HypervisorNode`s,
//! manages the guest-cleanup finalizer, marks VMs of nodes that stopped
//! heartbeating and re-places them once their node is confirmed gone.
//! Leader-elected: any number of replicas, one acts.

mod access;
mod cache;
mod controller;
mod heartbeat;
mod leader;
mod ledger;
mod metrics;
mod reconcile;
mod retry;
mod scheduling;
mod settings;
mod telemetry;
mod uninstall;

use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use kubevmm_crds::contract;
use kubevmm_crds::events::{EventSink, FailureHook};
use tokio::sync::{watch, Notify};

use crate::leader::{Elector, LeaderConfig};
use crate::metrics::Metrics;
use crate::reconcile::{Context, Settings};
use crate::scheduling::Overcommit;

/// kubevmm operator: schedules `VirtualMachine`s onto `HypervisorNode`s.
#[derive(Debug, Parser)]
#[command(name = "kubevmm-operator", version, about)]
struct Flags {
    /// Identity in the leader-election Lease [default: <hostname>-<pid>].
    #[arg(long)]
    id: Option<String>,
    /// Kubeconfig file [default: $KUBECONFIG, ~/.kube/config, or in-cluster].
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:8080")]
    metrics_addr: String,
    /// vCPU overcommit ratio (allocatable vCPUs × ratio may be bound); 10
    /// as `KubeVirt`'s `cpuAllocationRatio`: idle guests cost little CPU.
    #[arg(long, default_value_t = 10.0)]
    cpu_overcommit: f64,
    /// Memory overcommit ratio (allocatable memory × ratio may be bound).
    #[arg(long, default_value_t = 1.0)]
    memory_overcommit: f64,
    /// Only manage `VirtualMachine`s in this namespace [default: all].
    #[arg(long)]
    namespace: Option<String>,
    /// Only place onto `HypervisorNode`s matching this label selector, e.g. `pool=a`.
    #[arg(long)]
    node_selector: Option<String>,
    /// Name of the leader-election Lease in kubevmm-system.
    #[arg(long, default_value = contract::OPERATOR_LEASE)]
    leader_lease: String,
    /// Leader Lease duration in seconds (renewal every third of it).
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Full pass at least this often even when nothing changes, in seconds.
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
    /// Serve the subresource API (console, logs, port-forward) on this
    /// address, e.g. `0.0.0.0:8443`; kube-apiserver dials it, so not a
    /// loopback address for a host process. Needs the five flags below.
    #[arg(long, value_name = "ADDR:PORT")]
    access_listen: Option<String>,
    /// Serving certificate of the subresource API (PEM).
    #[arg(long, value_name = "FILE", requires = "access_listen")]
    access_cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "access_listen")]
    access_key: Option<std::path::PathBuf>,
    /// Client certificate presented to node-vmm's access servers (PEM).
    #[arg(long, value_name = "FILE", requires = "access_listen")]
    node_client_cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "access_listen")]
    node_client_key: Option<std::path::PathBuf>,
    /// CA of node-vmm's serving certificates (PEM).
    #[arg(long, value_name = "FILE", requires = "access_listen")]
    node_ca: Option<std::path::PathBuf>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// One-shot commands (without one, the operator runs).
#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// The chart's pre-delete hook: refuse, or delete the `VirtualMachine`s
    /// and wait until their guests stopped (`uninstall.rs`).
    Uninstall {
        /// `BlockIfVMsExist` or `DeleteVMs`.
        #[arg(long, value_enum, default_value = "BlockIfVMsExist")]
        strategy: uninstall::Strategy,
        /// Give up (and fail the uninstall) after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_seconds: u64,
    },
}

/// Startup failures (the process exits 1 with the message).
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Scheduling(#[from] scheduling::SchedulingError),
    #[error("--lease-duration-seconds must be at least 3, got {0}")]
    LeaseDuration(u64),
    #[error("cannot load the kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("cannot create namespace {ns}: {source}")]
    Namespace {
        ns: &'static str,
        source: kube::Error,
    },
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Access(#[from] access::AccessError),
    #[error("--access-listen needs {0} too")]
    AccessFlag(&'static str),
    #[error(transparent)]
    Uninstall(#[from] uninstall::UninstallError),
}

/// The subresource API's settings, when `--access-listen` is given.
fn access_config(flags: &Flags) -> Result<Option<access::AccessConfig>, MainError> {
    let Some(listen) = flags.access_listen.clone() else {
        return Ok(None);
    };
    let need = |v: &Option<std::path::PathBuf>, name| v.clone().ok_or(MainError::AccessFlag(name));
    Ok(Some(access::AccessConfig {
        listen,
        serving_cert: need(&flags.access_cert, "--access-cert")?,
        serving_key: need(&flags.access_key, "--access-key")?,
        nodes: kubevmm_access::tls::Files {
            cert: need(&flags.node_client_cert, "--node-client-cert")?,
            key: need(&flags.node_client_key, "--node-client-key")?,
            ca: need(&flags.node_ca, "--node-ca")?,
        },
    }))
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into());
    format!("{host}-{}", std::process::id())
}

async fn client(flags: &Flags) -> Result<kube::Client, MainError> {
    let err = |e: &dyn std::fmt::Display| MainError::Kubeconfig(e.to_string());
    match &flags.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            let cfg = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|e| err(&e))?;
            kube::Client::try_from(cfg).map_err(|e| err(&e))
        }
        None => kube::Client::try_default().await.map_err(|e| err(&e)),
    }
}

async fn ensure_namespace(client: &kube::Client) -> Result<(), MainError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(contract::LEASE_NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {
            tracing::info!(namespace = contract::LEASE_NAMESPACE, "created namespace");
            Ok(())
        }
        Err(e) if leader::is_status(&e, 409) => Ok(()),
        // Without the right to create namespaces it may still exist: the
        // Lease calls will say so if it does not.
        Err(e) if leader::is_status(&e, 403) => {
            tracing::warn!(error = %e, "cannot create namespace {}; assuming it exists", contract::LEASE_NAMESPACE);
            Ok(())
        }
        Err(source) => Err(MainError::Namespace {
            ns: contract::LEASE_NAMESPACE,
            source,
        }),
    }
}

async fn run(flags: Flags) -> Result<(), MainError> {
    telemetry::init(telemetry::parse_level(&flags.log_level)?)?;
    let overcommit = Overcommit::new(flags.cpu_overcommit, flags.memory_overcommit)?;
    if flags.lease_duration_seconds < 3 {
        return Err(MainError::LeaseDuration(flags.lease_duration_seconds));
    }
    let identity = flags.id.clone().unwrap_or_else(default_identity);
    let metrics = Metrics::new()?;
    let server = metrics.clone().serve(&flags.metrics_addr).await?;
    tokio::spawn(server);
    let client = client(&flags).await?;
    tracing::info!(%identity, metrics = %flags.metrics_addr, cpu_overcommit = overcommit.cpu, memory_overcommit = overcommit.memory, "kubevmm-operator starting");
    ensure_namespace(&client).await?;
    // Every replica serves the subresource API, leader or not.
    if let Some(cfg) = access_config(&flags)? {
        tokio::spawn(access::start(client.clone(), cfg).await?);
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (elector, leadership) = Elector::new(
        client.clone(),
        LeaderConfig::new(
            flags.leader_lease.clone(),
            contract::LEASE_NAMESPACE.into(),
            identity.clone(),
            Duration::from_secs(flags.lease_duration_seconds),
        ),
        metrics.clone(),
    );
    let election = tokio::spawn(elector.run(shutdown_rx));

    let notify = std::sync::Arc::new(Notify::new());
    let ctx = Context {
        events: EventSink::start(
            Recorder::new(
                client.clone(),
                Reporter {
                    controller: contract::MANAGER_OPERATOR.into(),
                    instance: Some(identity),
                },
            ),
            event_failed(metrics.clone()),
        ),
        client,
        settings: Settings {
            overcommit,
            namespace: flags.namespace.clone(),
            node_selector: flags.node_selector.clone(),
        },
        metrics,
        leadership,
        heartbeats: std::sync::Mutex::default(),
        retries: std::sync::Mutex::default(),
        ledger: std::sync::Mutex::default(),
    };
    let events = ctx.events.clone();
    let control = tokio::spawn(controller::run(
        ctx,
        notify,
        Duration::from_secs(flags.resync_seconds.max(1)),
    ));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(MainError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    control.abort();
    shutdown_tx.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), events.flush()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), election).await;
    Ok(())
}

/// An Event that could not be sent is counted and logged, never fatal.
fn event_failed(metrics: Metrics) -> FailureHook {
    Box::new(move |about, note, e| {
        metrics
            .reconcile_errors_total
            .with_label_values(&["event"])
            .inc();
        let vm = format!(
            "{}/{}",
            about.namespace.as_deref().unwrap_or_default(),
            about.name.as_deref().unwrap_or_default()
        );
        tracing::warn!(%vm, reason = %note.reason, error = %e, "cannot publish Event");
    })
}

fn main() {
    let flags = Flags::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kubevmm-operator: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = match flags.command {
        Some(Cmd::Uninstall {
            strategy,
            timeout_seconds,
        }) => rt.block_on(async {
            let client = client(&flags).await?;
            uninstall::run(client, strategy, Duration::from_secs(timeout_seconds)).await?;
            Ok(())
        }),
        None => rt.block_on(run(flags)),
    };
    if let Err(e) = result {
        eprintln!("kubevmm-operator: {e}");
        std::process::exit(1);
    }
}
