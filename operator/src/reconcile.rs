//! The reconciler: one pass reads every `VirtualMachine`, `HypervisorNode`
//! and heartbeat Lease, decides (with [`crate::scheduling`]) what the
//! operator's part of each VM should be, and writes only the differences.
//!
//! A pass is global rather than per object because placement is: every
//! binding changes the free capacity the next one sees. It reads watch-fed
//! caches ([`crate::cache`]), seen through the ledger of the operator's own
//! writes ([`crate::ledger`]), so a pass always sees the bindings the
//! previous one wrote even before their watch events arrive; every write
//! carries the `resourceVersion` it was decided on, so a stale decision (or
//! a second replica that still believes it leads) fails with a conflict
//! instead of overwriting, and the VM is decided again after its next
//! watch event.
//!
//! The binding is `status.nodeName` as written by the operator (its field
//! manager owns that field); the `kubevmm.io/node` label is derived from it
//! and corrected when it differs, so a label the operator did not write
//! binds nothing (an admission policy refuses it in the first place).
//!
//! Node liveness comes from [`crate::heartbeat`] (the operator's monotonic
//! clock, never the agents' wall clocks). A VM whose writes fail is retried
//! on its own with backoff ([`crate::retry`]); the others go on.
//!
//! What the operator owns on a VM (see docs/architecture.md, "The contract"):
//! the finalizer, the `kubevmm.io/node` label, and in the status (server-side
//! apply, field manager `kubevmm-operator`, force) `nodeName`, the
//! `Scheduled` and `NodeLost` conditions, `Ready=Unknown` while the node is
//! lost, and `phase`/`restartCount` at the moments it decides them (binding,
//! unschedulable, re-placement, release). Owned fields it does not decide in
//! a pass are re-applied with their current value, so nothing the operator
//! once wrote disappears by omission.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::ResourceExt;
use kubevmm_crds::contract::{self, condition, reason, ConditionStatus};
use kubevmm_crds::events::{EventSink, Note};
use kubevmm_crds::quantity::parse_bytes;
use kubevmm_crds::{HypervisorNode, RunStrategy, VirtualMachine, VmPhase};
use serde_json::{json, Value};

use crate::cache::{strip_foreign_managed_fields, vm_resource, Caches};
use crate::heartbeat::{HeartbeatClock, LeaseRecord, Liveness};
use crate::leader::{is_status, Leadership};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::retry::{self, Retries};
use crate::scheduling::{self, BoundVm, NodeInfo, Overcommit, Request};
pub use crate::settings::Settings;

mod decide;
mod nodes;
mod plan;
mod status;
mod writes;
use decide::{decide, object_ref, owned_by_operator};
use nodes::{
    deleted_node_state, gone_reason, hidden_node_state, lease_record, lease_wake, node_state,
    unknown_bindings, NodeState,
};
use plan::plan;
use status::status_apply;
use writes::{writes, Write};

/// How many VMs a pass writes at once.
const WRITES_AT_ONCE: usize = 16;

/// What can fail in a pass. Every error is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Reading a node outside `--node-selector` failed.
    #[error("cannot read {what}: {source}")]
    List {
        /// What was read.
        what: &'static str,
        /// The client error.
        source: kube::Error,
    },
    /// A write to one VM failed.
    #[error("{action} {namespace}/{name}: {source}")]
    Write {
        /// What the operator tried to do.
        action: &'static str,
        /// VM namespace.
        namespace: String,
        /// VM name.
        name: String,
        /// The client error.
        source: Box<kube::Error>,
    },
    /// Leadership was lost in the middle of a pass; the rest is skipped.
    #[error("no longer the leader; stopping the pass")]
    NotLeader,
}

impl ReconcileError {
    /// Label value for `kubevmm_operator_reconcile_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::List { .. } => "list",
            Self::Write { source, .. } if is_status(source.as_ref(), 409) => "conflict",
            Self::Write { .. } => "write",
            Self::NotLeader => "not_leader",
        }
    }

    /// How the VM's backoff counts this error: a conflict (a stale
    /// decision, decided again at once after the next watch event) or an
    /// error (reported in a `ReconcileFailed` Event when new).
    pub fn retry_failure(&self) -> retry::Failure {
        match self {
            Self::Write { source, .. } if is_status(source.as_ref(), 409) => {
                retry::Failure::Conflict
            }
            _ => retry::Failure::Error,
        }
    }
}

/// Everything a pass needs.
pub struct Context {
    /// API client.
    pub client: kube::Client,
    /// Settings.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Metrics,
    /// Whether we may write.
    pub leadership: Leadership,
    /// Event publisher (in the background: no pass waits for an Event).
    pub events: EventSink,
    /// When each heartbeat Lease was last seen to change (operator clock).
    pub heartbeats: Mutex<HeartbeatClock>,
    /// VMs whose writes failed, and when to try them again.
    pub retries: Mutex<Retries>,
    /// The operator's writes its caches have not shown yet.
    pub ledger: Mutex<Ledger>,
}

impl Context {
    /// The heartbeat observations (a poisoned lock still holds valid data).
    pub fn heartbeats(&self) -> std::sync::MutexGuard<'_, HeartbeatClock> {
        self.heartbeats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn retries(&self) -> std::sync::MutexGuard<'_, Retries> {
        self.retries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets the operator's own writes (a new term starts from caches
    /// that listed after them).
    pub fn forget_writes(&self) {
        *self.ledger() = Ledger::default();
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Outcome of a pass.
#[derive(Debug, Default)]
pub struct PassReport {
    /// Errors on individual VMs (the pass went on with the others; each is
    /// retried on its own with backoff).
    pub errors: Vec<ReconcileError>,
    /// When the next pass is due even if nothing changes (a heartbeat Lease
    /// that will expire, a VM whose backoff ends).
    pub wake_in: Option<Duration>,
}

/// Which fields the operator's field manager owns now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // one flag per field, not a state machine
struct Owned {
    /// `status.nodeName`: the binding, when the operator wrote it.
    node_name: bool,
    /// `status.diskNode`: honoured only when the operator wrote it.
    disk_node: bool,
    /// The `kubevmm.io/node` label.
    label: bool,
    phase: bool,
    restart_count: bool,
    conditions: BTreeSet<String>,
}

/// A condition the operator wants, without its transition time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Want {
    status: ConditionStatus,
    reason: String,
    message: String,
}

impl Want {
    fn new(status: ConditionStatus, reason: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// What a pass does with the guest-cleanup finalizer of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FinalizerChange {
    /// Leave it as it is.
    Keep,
    /// Add it (a VM the operator sees for the first time).
    Add,
    /// Remove it: the VM is being deleted and no guest of it can run.
    Remove,
}

/// The status fields a pass decided for one VM (the rest of the
/// operator's part is re-applied as it is, see [`status::status_apply`]).
#[derive(Debug, Default)]
struct StatusChange {
    phase: Option<VmPhase>,
    restart_count: Option<i32>,
    conditions: BTreeMap<&'static str, Want>,
    /// Operator-owned condition types to drop.
    drop: BTreeSet<&'static str>,
}

/// Whether a VM looks for a node in this pass, and what came of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// It does not (bound and staying, released, down, being deleted).
    NotWanted,
    /// It does: [`plan`] places it.
    Wanted,
    /// It was bound to a node in this pass; `first` when this is its first
    /// binding (the scheduling-latency histogram counts those).
    Placed { first: bool },
    /// Its spec cannot be placed, or no node fits; `report` is the reason
    /// counted in the scheduling-failure metric when this pass first says so.
    Refused { report: Option<&'static str> },
}

/// What one pass decided for one VM.
#[derive(Debug)]
#[allow(clippy::struct_excessive_bools)] // independent decisions, not a state machine
struct Work {
    /// The object as read (shared with the cache until written).
    obj: Arc<DynamicObject>,
    vm: Option<VirtualMachine>,
    name: String,
    namespace: String,
    owned: Owned,
    /// Node it is bound to when the pass is done (label and nodeName).
    bind: Option<String>,
    /// The node holding its node-local disks (`status.diskNode`).
    disk_node: Option<String>,
    /// What happens to the guest-cleanup finalizer.
    finalizer: FinalizerChange,
    /// The VM's demand (counted on its node while it is bound).
    request: Option<Request>,
    /// The status fields decided in this pass.
    status: StatusChange,
    /// Whether it looks for a node in this pass, and what came of it.
    placement: Placement,
    events: Vec<Note>,
}

impl Work {
    fn current_status(&self) -> kubevmm_crds::VirtualMachineStatus {
        self.vm
            .as_ref()
            .and_then(|v| v.status.clone())
            .unwrap_or_default()
    }

    fn current_condition(&self, ty: &str) -> Option<Condition> {
        self.current_status()
            .conditions
            .into_iter()
            .find(|c| c.type_ == ty)
    }

    fn label(&self) -> Option<String> {
        self.obj.labels().get(contract::LABEL_NODE).cloned()
    }

    /// The node the operator bound the VM to: `status.nodeName`, if the
    /// operator's field manager wrote it (a value from anyone else binds
    /// nothing).
    fn binding(&self) -> Option<String> {
        binding_of(&self.obj, &self.owned)
    }

    /// The VM's uid (namespace/name when absent, for objects not from the API).
    fn uid(&self) -> String {
        self.obj
            .metadata
            .uid
            .clone()
            .unwrap_or_else(|| format!("{}/{}", self.namespace, self.name))
    }

    fn phase_now(&self) -> Option<VmPhase> {
        self.current_status().phase
    }
}

fn binding_of(obj: &DynamicObject, owned: &Owned) -> Option<String> {
    if !owned.node_name {
        return None;
    }
    obj.data
        .pointer("/status/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(String::from)
}

/// Runs one pass over the caches. `Err` only when the pass must stop (no
/// longer the leader, a node outside the selector unreadable); per-VM
/// failures are in the report.
#[allow(clippy::too_many_lines)] // read, decide, place, write: one straight sequence
pub async fn reconcile_all(ctx: &Context, caches: &Caches) -> Result<PassReport, ReconcileError> {
    let client = ctx.client.clone();
    let now = Timestamp::now();
    let ar = vm_resource();
    let node_api: Api<HypervisorNode> = Api::all(client.clone());
    let nodes = caches.nodes.state();
    let leases = caches.leases.state();
    // The VMs as the cache has them, or as the operator's own writes left
    // them when the cache is behind.
    let vms: Vec<Arc<DynamicObject>> = {
        let cached = caches.vms.state();
        let present: BTreeSet<String> = cached
            .iter()
            .filter_map(|o| o.metadata.uid.clone())
            .collect();
        let mut ledger = ctx.ledger();
        ledger.retain(&present);
        cached.into_iter().map(|o| ledger.view(o)).collect()
    };

    // Heartbeats: record what changed, on the operator's clock.
    let mono = Instant::now();
    let records: BTreeMap<String, LeaseRecord> = leases
        .iter()
        .filter_map(|l| Some((l.name_any(), lease_record(l)?)))
        .collect();
    let liveness: BTreeMap<String, Liveness> = {
        let mut clock = ctx.heartbeats();
        clock.record(&records, mono);
        records
            .keys()
            .map(|l| (l.clone(), clock.liveness(l, mono)))
            .collect()
    };
    let heartbeats = |node: &str| {
        liveness
            .get(&contract::node_lease_name(node))
            .copied()
            .unwrap_or(Liveness::NoLease)
    };
    let mut states: BTreeMap<String, NodeState> = nodes
        .iter()
        .map(|n| (n.name_any(), node_state(n, heartbeats(&n.name_any()))))
        .collect();

    let mut report = PassReport::default();

    let missing = unknown_bindings(&vms, &states);
    for name in missing {
        let found = if ctx.settings.node_selector.is_some() {
            node_api
                .get_opt(&name)
                .await
                .map_err(|source| ReconcileError::List {
                    what: "HypervisorNodes",
                    source,
                })?
        } else {
            None
        };
        let state = match found {
            Some(n) => hidden_node_state(&n, heartbeats(&name)),
            None => deleted_node_state(&name, heartbeats(&name)),
        };
        states.insert(name, state);
    }

    // VMs by phase, as read.
    ctx.metrics.vms.reset();
    for o in &vms {
        let phase = o
            .data
            .get("status")
            .and_then(|s| s.get("phase"))
            .and_then(Value::as_str)
            .unwrap_or("Unset");
        ctx.metrics.vms.with_label_values(&[phase]).inc();
    }

    let works = plan(vms, &states, ctx.settings.overcommit);

    let mut wake = lease_wake(&states, mono);

    let present: BTreeSet<String> = works.iter().map(Work::uid).collect();
    ctx.retries().retain(&present);
    // A VM whose last write failed waits for its backoff; the others go on.
    let mut due = Vec::with_capacity(works.len());
    for w in works {
        match ctx.retries().wait(&w.uid(), Instant::now()) {
            Some(d) => wake = Some(wake.map_or(d, |w| w.min(d))),
            None => due.push(w),
        }
    }
    // Writes of different VMs are independent (each VM's own stay in
    // order): up to WRITES_AT_ONCE VMs at a time, as kube-scheduler binds
    // in parallel. Placement was decided above, in order, for all of them.
    let outcomes: Vec<(String, ObjectReference, Result<(), ReconcileError>)> =
        futures::stream::iter(due)
            .map(|w| {
                // Writes go to the VM's own namespace (a cluster-wide Api has
                // no namespace in its URLs and cannot patch namespaced objects).
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), &w.namespace, &ar);
                async move {
                    let uid = w.uid();
                    let reference = object_ref(&w);
                    (uid, reference, execute(ctx, &api, w, now).await)
                }
            })
            .buffer_unordered(WRITES_AT_ONCE)
            .collect()
            .await;
    let mut not_leader = false;
    for (uid, reference, result) in outcomes {
        match result {
            Ok(()) => ctx.retries().succeeded(&uid),
            Err(ReconcileError::NotLeader) => not_leader = true,
            Err(e) => {
                let kind = e.retry_failure();
                let report_it = ctx
                    .retries()
                    .failed(&uid, kind, e.to_string(), Instant::now());
                if let Some(d) = ctx.retries().wait(&uid, Instant::now()) {
                    wake = Some(wake.map_or(d, |w| w.min(d)));
                }
                if report_it && kind == retry::Failure::Error {
                    ctx.events.send(
                        reference,
                        Note::warning(
                            "ReconcileFailed",
                            format!("{e}; retrying this VM with backoff"),
                        ),
                    );
                }
                report.errors.push(e);
            }
        }
    }
    if not_leader {
        return Err(ReconcileError::NotLeader);
    }
    report.wake_in = wake;
    Ok(report)
}

/// Carries out one VM's [`writes`], in order. Each is conditional on the
/// resourceVersion the decision was made on (and chained); a failed one
/// stops the rest, retried with this VM's backoff.
async fn execute(
    ctx: &Context,
    api: &Api<DynamicObject>,
    mut w: Work,
    now: Timestamp,
) -> Result<(), ReconcileError> {
    let reference = object_ref(&w);
    for write in writes(&w, now) {
        if !matches!(write, Write::Event(_)) && !ctx.leadership.is_leader() {
            return Err(ReconcileError::NotLeader);
        }
        let rv = w.obj.metadata.resource_version.clone();
        let written = write_one(ctx, api, &mut w, write, &reference).await?;
        // The next write is conditional on this one's version, and the
        // ledger keeps it until the cache shows it.
        if let Some(mut out) = written {
            Arc::make_mut(&mut w.obj)
                .metadata
                .resource_version
                .clone_from(&out.metadata.resource_version);
            strip_foreign_managed_fields(&mut out);
            ctx.ledger().record(rv, out);
        }
    }
    Ok(())
}

/// One write of [`execute`]; the object the API server returned, if any.
async fn write_one(
    ctx: &Context,
    api: &Api<DynamicObject>,
    w: &mut Work,
    write: Write,
    reference: &ObjectReference,
) -> Result<Option<DynamicObject>, ReconcileError> {
    let werr = |action: &'static str, w: &Work, source: kube::Error| ReconcileError::Write {
        action,
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        source: Box::new(source),
    };
    let vm = format!("{}/{}", w.namespace, w.name);
    let rv = w.obj.metadata.resource_version.clone();
    let merge = |meta: Value| {
        let mut m = meta;
        m["resourceVersion"] = json!(rv);
        Patch::Merge(json!({ "metadata": m }))
    };
    let with_finalizer = || {
        let mut fins = w.obj.finalizers().to_vec();
        fins.push(contract::FINALIZER.to_string());
        fins
    };
    let written = match write {
        Write::AddFinalizer => {
            let patch = merge(json!({ "finalizers": with_finalizer() }));
            let out = api
                .patch(&w.name, &PatchParams::default(), &patch)
                .await
                .map_err(|e| werr("add finalizer to", w, e))?;
            Arc::make_mut(&mut w.obj)
                .metadata
                .finalizers
                .clone_from(&out.metadata.finalizers);
            Some(out)
        }
        Write::ApplyStatus(mut body) => {
            body["metadata"]["resourceVersion"] = json!(rv);
            let pp = PatchParams::apply(contract::MANAGER_OPERATOR).force();
            let out = api
                .patch_status(&w.name, &pp, &Patch::Apply(body))
                .await
                .map_err(|e| werr("update status of", w, e))?;
            if let Placement::Refused {
                report: Some(reason),
            } = w.placement
            {
                ctx.metrics
                    .scheduling_failures_total
                    .with_label_values(&[reason])
                    .inc();
            }
            Some(out)
        }
        Write::Label {
            node,
            with_finalizer: fin,
        } => {
            let mut meta = json!({ "labels": { contract::LABEL_NODE: node } });
            if fin {
                meta["finalizers"] = json!(with_finalizer());
            }
            // Under the operator's field manager: a label it wrote is
            // told apart from one somebody else set.
            let pp = PatchParams {
                field_manager: Some(contract::MANAGER_OPERATOR.into()),
                ..PatchParams::default()
            };
            let out = api
                .patch(&w.name, &pp, &merge(meta))
                .await
                .map_err(|e| werr("set the node label of", w, e))?;
            if let Some(node) = &node {
                tracing::info!(%vm, %node, "bound");
            } else {
                tracing::info!(%vm, "unbound");
            }
            if w.placement == (Placement::Placed { first: true }) {
                if let Some(created) = &w.obj.metadata.creation_timestamp {
                    let secs = Timestamp::now().duration_since(created.0).as_secs_f64();
                    ctx.metrics.scheduling_duration.observe(secs.max(0.0));
                }
            }
            Some(out)
        }
        Write::RemoveFinalizer => {
            let patch =
                contract::finalizer_removal(w.obj.finalizers(), rv.as_deref()).map(Patch::Merge);
            if let Some(patch) = patch {
                match api.patch(&w.name, &PatchParams::default(), &patch).await {
                    Ok(_) => {}
                    Err(e) if is_status(&e, 404) => {}
                    Err(e) => return Err(werr("remove the finalizer of", w, e)),
                }
                tracing::info!(%vm, "finalizer removed");
            }
            None
        }
        Write::Event(note) => {
            ctx.events.send(reference.clone(), note);
            None
        }
    };
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflict_is_told_apart_from_other_errors() {
        let write = |code: u16| ReconcileError::Write {
            action: "update status of",
            namespace: "ns".into(),
            name: "vm".into(),
            source: Box::new(kube::Error::Api(
                kube::core::Status {
                    code,
                    ..kube::core::Status::failure("x", "y")
                }
                .boxed(),
            )),
        };
        let table = [
            (write(409), "conflict", retry::Failure::Conflict),
            (write(422), "write", retry::Failure::Error),
            (write(500), "write", retry::Failure::Error),
            (
                ReconcileError::NotLeader,
                "not_leader",
                retry::Failure::Error,
            ),
        ];
        for (err, kind, failure) in table {
            assert_eq!(err.kind(), kind, "{err}");
            assert_eq!(err.retry_failure(), failure, "{err}");
        }
    }
}
