//! Watch-fed caches of what a pass reads: `VirtualMachine`s,
//! `HypervisorNode`s and the nodes' heartbeat Leases (kube-rs reflectors).
//!
//! A pass reads these instead of listing: its cost no longer includes
//! three LISTs (52 ms of a 53 ms pass on a 2-core machine, growing with
//! the cluster). Every change pokes the control loop; `/readyz` answers
//! once all three have listed.
//!
//! Each set of caches starts with a quorum LIST (`ListSemantic::MostRecent`,
//! kube-rs' default), and the control loop starts a fresh set whenever this
//! replica becomes the leader: a pass never decides from a cache that may
//! predate the previous leader's last writes. Within a term the operator's
//! own writes reach its decisions through [`crate::ledger`], even before
//! their watch events.
//!
//! The VM cache keeps only the operator's own `managedFields` entries (what
//! the pass needs to know which fields it owns): they are most of an
//! object's size, and with 5,000 VMs most of the operator's memory.

use std::sync::{Arc, Mutex, PoisonError};

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Resource;
use kubevmm_crds::contract;
use kubevmm_crds::{HypervisorNode, VirtualMachine};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::settings::Settings;

/// The three caches, and the tasks that fill them (stopped on drop).
pub struct Caches {
    /// `VirtualMachine`s (in `--namespace`, or all).
    pub vms: Store<DynamicObject>,
    /// `HypervisorNode`s (matching `--node-selector`, or all).
    pub nodes: Store<HypervisorNode>,
    /// Heartbeat Leases in kubevmm-system.
    pub leases: Store<Lease>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches")
            .field("vms", &self.vms.len())
            .field("nodes", &self.nodes.len())
            .field("leases", &self.leases.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Caches {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Keeps only the operator's own `managedFields` entries.
pub fn strip_foreign_managed_fields(obj: &mut DynamicObject) {
    if let Some(entries) = obj.meta_mut().managed_fields.as_mut() {
        entries.retain(|e| e.manager.as_deref() == Some(contract::MANAGER_OPERATOR));
    }
}

/// The `VirtualMachine` resource, for dynamic (schema-free) reads and writes.
pub fn vm_resource() -> ApiResource {
    ApiResource::erase::<VirtualMachine>(&())
}

impl Caches {
    /// Starts the three watches. Each event pokes `notify`; `/readyz`
    /// turns ready once all three have listed.
    pub fn start(
        client: &kube::Client,
        settings: &Settings,
        notify: &Arc<Notify>,
        metrics: &Metrics,
    ) -> Self {
        let ar = vm_resource();
        let vm_api: Api<DynamicObject> = match &settings.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        let mut node_cfg = watcher::Config::default();
        if let Some(sel) = &settings.node_selector {
            node_cfg = node_cfg.labels(sel);
        }
        let vm_writer = Writer::new(ar);
        let vms = vm_writer.as_reader();
        let node_writer = Writer::<HypervisorNode>::default();
        let nodes = node_writer.as_reader();
        let lease_writer = Writer::<Lease>::default();
        let leases = lease_writer.as_reader();
        let synced = Arc::new(Mutex::new([false; 3]));
        let watch = Watch {
            notify: notify.clone(),
            metrics: metrics.clone(),
            synced,
        };
        let tasks = vec![
            watch.spawn(
                0,
                reflector::reflector(
                    vm_writer,
                    watcher(vm_api, watcher::Config::default())
                        .default_backoff()
                        .modify(strip_foreign_managed_fields),
                ),
            ),
            watch.spawn(
                1,
                reflector::reflector(
                    node_writer,
                    watcher(Api::all(client.clone()), node_cfg).default_backoff(),
                ),
            ),
            watch.spawn(
                2,
                reflector::reflector(
                    lease_writer,
                    watcher(
                        Api::namespaced(client.clone(), contract::LEASE_NAMESPACE),
                        watcher::Config::default(),
                    )
                    .default_backoff(),
                ),
            ),
        ];
        Self {
            vms,
            nodes,
            leases,
            tasks,
        }
    }

    /// Waits until all three caches have listed.
    pub async fn synced(&self) {
        // The writers live as long as `self` (their tasks are aborted on
        // drop only), so these cannot fail while we wait.
        let _ = tokio::join!(
            self.vms.wait_until_ready(),
            self.nodes.wait_until_ready(),
            self.leases.wait_until_ready()
        );
    }
}

/// What each watch task shares.
#[derive(Clone)]
struct Watch {
    notify: Arc<Notify>,
    metrics: Metrics,
    synced: Arc<Mutex<[bool; 3]>>,
}

impl Watch {
    fn spawn<K, S>(&self, index: usize, stream: S) -> JoinHandle<()>
    where
        K: Send + 'static,
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    {
        let w = self.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    Ok(ev) => {
                        if matches!(ev, watcher::Event::InitDone) {
                            let mut s = w.synced.lock().unwrap_or_else(PoisonError::into_inner);
                            s[index] = true;
                            if s.iter().all(|x| *x) {
                                w.metrics.set_ready(true);
                            }
                        }
                        // The initial list pokes once, when it is complete.
                        if !matches!(ev, watcher::Event::Init | watcher::Event::InitApply(_)) {
                            w.notify.notify_one();
                        }
                    }
                    Err(e) => {
                        w.metrics
                            .reconcile_errors_total
                            .with_label_values(&["watch"])
                            .inc();
                        tracing::warn!(error = %e, "watch failed; retrying with backoff");
                    }
                }
            }
        })
    }
}
