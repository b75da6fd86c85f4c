//! Converging one bound `VirtualMachine`: observe its VMM, decide with
//! [`lifecycle`], act through [`supervisor`] and [`vmm_client`], report status.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt as _};
use kubevmm_crds::contract::{self, reason, ConditionStatus, ANNOTATION_RESTART_DONE};
use kubevmm_crds::vm::InterfaceStatus;
use kubevmm_crds::{VirtualMachine, VmPhase};
use serde_json::json;

use super::host::prepare_host;
use super::lifecycle::{self, AfterExit, Ended, Move, Observed, StopAction};
pub use super::local::{set_failed, set_ready, LocalVm, ReadyCond};
use super::report::{event, note_transition, timed_step, write_status, StartStep};
use super::supervisor::{self, ProcessId, VmDir};
use super::{prepare, vmm_client, AgentConfig};

/// Errors of one reconcile; the VM is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// An API call failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// kube-rs error.
        source: kube::Error,
    },
    /// The object lacks a namespace or uid (not from the API server).
    #[error("VirtualMachine without namespace or uid")]
    Incomplete,
}

/// Shared agent state.
pub struct Ctx {
    /// API client.
    pub client: Client,
    /// Event recorder.
    pub recorder: Recorder,
    /// Imports the images VMs boot from.
    pub importer: Arc<super::images::Importer>,
    /// The masquerade network.
    pub network: Arc<super::network::Network>,
    /// This binary (runs the shim).
    pub node_vmm: PathBuf,
    /// Settings.
    pub cfg: AgentConfig,
    /// Metrics.
    pub metrics: Arc<super::metrics::Metrics>,
    /// Per-VM state, by uid.
    pub vms: Mutex<HashMap<String, LocalVm>>,
    /// Wakes the controller for a VM whose VMM ended.
    pub trigger: UnboundedSender<ObjectRef<VirtualMachine>>,
    /// The VMs whose VMM is alive here, by uid. Kept apart from `vms`, whose
    /// entry is taken out while its VM reconciles (a heartbeat then would
    /// count one VM short and write that).
    pub running: Mutex<std::collections::HashSet<String>>,
    /// Signalled when a VMM starts or ends here, so `HypervisorNode`'s
    /// running-VM count follows at once rather than at the next heartbeat.
    pub running_changed: tokio::sync::Notify,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, LocalVm>> {
        self.vms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// VMMs alive on this node.
    pub fn running_count(&self) -> i32 {
        i32::try_from(self.running_set().len()).unwrap_or(i32::MAX)
    }

    fn running_set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records whether VM `uid`'s VMM is alive; wakes the heartbeat when
    /// that changes the count.
    pub(super) fn set_running(&self, uid: &str, alive: bool) {
        let changed = {
            let mut running = self.running_set();
            if alive {
                running.insert(uid.to_string())
            } else {
                running.remove(uid)
            }
        };
        if changed {
            self.running_changed.notify_one();
        }
    }

    pub(super) fn dir(&self, uid: &str) -> VmDir {
        VmDir(self.cfg.state_dir.join("vms").join(uid))
    }
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Api { what, source }
}

/// How long a reconcile that spawned a VMM waits for its first answer.
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Controller error policy: retry after a pause (signature fixed by kube-runtime).
#[allow(clippy::needless_pass_by_value)]
pub fn error_policy(vm: Arc<VirtualMachine>, err: &ReconcileError, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(vm = %vm.name_any(), "reconcile failed: {err}");
    Action::requeue(Duration::from_secs(5))
}

/// Reconciles one VM bound to this node.
pub async fn reconcile(vm: Arc<VirtualMachine>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let uid = vm.uid().ok_or(ReconcileError::Incomplete)?;
    if let super::binding::Binding::NotHere(why) =
        super::binding::bound_here(&vm, &ctx.cfg.node_name)
    {
        tracing::info!(vm = %vm.name_any(), "not bound to this node by the operator, left alone: {why}");
        return Ok(Action::await_change());
    }
    let mut local = ctx.lock().remove(&uid).unwrap_or_default();
    if !local.loaded {
        adopt(&vm, &ctx, &uid, &mut local);
    }
    let result = step(&vm, &ctx, &uid, &mut local).await;
    ctx.set_running(&uid, local.proc.is_some());
    match &result {
        Ok(Some(_)) | Err(_) => {
            ctx.lock().insert(uid, local);
        }
        Ok(None) => {}
    }
    result.map(|a| a.unwrap_or_else(Action::await_change))
}

/// First sight of a VM by this agent process: take over a VMM that is
/// already running (agent restart), and the counters from status.
fn adopt(vm: &VirtualMachine, ctx: &Ctx, uid: &str, local: &mut LocalVm) {
    local.take_over(vm.status.clone().unwrap_or_default());
    let dir = ctx.dir(uid);
    if let Some(pid) = dir.vmm_pid().filter(ProcessId::alive) {
        tracing::info!(vm = %vm.name_any(), pid = pid.pid, "re-adopted running VMM");
        local.proc = Some(pid);
        local.ever_ran = true;
        watch_exit(ctx, vm, pid);
    } else if dir.vmm_pid().is_some() {
        // It ended while no agent watched: handle that exit now.
        local.proc = dir.vmm_pid();
    }
}

fn watch_exit(ctx: &Ctx, vm: &VirtualMachine, pid: ProcessId) {
    let trigger = ctx.trigger.clone();
    let obj = ObjectRef::from_obj(vm);
    tokio::spawn(async move {
        supervisor::wait_exit(pid).await;
        let _ = trigger.unbounded_send(obj);
    });
}

/// One pass; `Ok(None)` when the VM is gone from this node for good.
async fn step(
    vm: &VirtualMachine,
    ctx: &Ctx,
    uid: &str,
    local: &mut LocalVm,
) -> Result<Option<Action>, ReconcileError> {
    let dir = ctx.dir(uid);
    let spec = &vm.spec;
    let restart = contract::pending_restart(vm.annotations()).map(str::to_string);
    let deleting = vm.metadata.deletion_timestamp.is_some();
    let mut requeue = Duration::from_secs(30);

    // A new spec deserves a prompt new attempt.
    if local.generation != vm.metadata.generation {
        local.generation = vm.metadata.generation;
        if local.prepare_failures > 0 {
            local.prepare_failures = 0;
            local.next_start = None;
            local.held = None;
        }
    }

    // 1. Did the VMM end?
    if local.proc.is_some_and(|p| !p.alive()) {
        handle_exit(ctx, vm, &dir, local, deleting).await;
    }

    // 2. What this pass does (lifecycle::next_move), then doing it.
    let observed = Observed {
        deleting,
        vmm_running: local.proc.is_some(),
        strategy: spec.run_strategy,
        restart_requested: restart.is_some(),
        ever_ran: local.ever_ran,
        held: local.held,
        next_start: local.next_start,
        // Only a VM waiting to start consumes its wake-up.
        image_ready: !deleting && local.proc.is_none() && ctx.importer.take_woken(uid),
        now: Instant::now(),
    };
    match (lifecycle::next_move(&observed), local.proc) {
        (Move::StopForDeletion, Some(pid)) => {
            stop_step(ctx, vm, &dir, local, pid).await;
            write_status(ctx, vm, local).await?;
            return Ok(Some(Action::requeue(Duration::from_millis(500))));
        }
        (Move::Release, _) => {
            release(ctx, uid, &dir, vm);
            remove_finalizer(ctx, vm).await?;
            event(
                ctx,
                vm,
                false,
                "Deleted",
                "the guest is stopped and its resources released".into(),
            )
            .await;
            return Ok(None);
        }
        (Move::Stop, Some(pid)) => {
            stop_step(ctx, vm, &dir, local, pid).await;
            requeue = Duration::from_millis(500);
        }
        (Move::Observe, _) => requeue = observe_running(ctx, vm, &dir, local).await,
        (Move::Start, _) => {
            start(ctx, vm, uid, &dir, local).await;
            requeue = Duration::from_millis(100);
            if local.proc.is_some() {
                // The agent bound the control socket: a request waits until
                // the VMM serves it, once its vCPUs run. So the first status
                // says Running, with no polling interval before it.
                if let Ok(next) =
                    tokio::time::timeout(FIRST_ANSWER_WAIT, observe_running(ctx, vm, &dir, local))
                        .await
                {
                    requeue = next;
                }
            }
            // The new phase first: a stopped Manual VM whose request looked
            // handled while its phase still read Stopped would be released.
            if let Some(done) = &restart {
                write_status(ctx, vm, local).await?;
                mark_restart_handled(ctx, vm, done).await?;
            }
        }
        (Move::StartAt(at), _) => requeue = at.saturating_duration_since(observed.now),
        (Move::Hold(phase), _) => {
            local.next_start = None;
            local.held = Some(phase);
            local.phase = Some(phase);
            if local
                .ready
                .as_ref()
                .is_none_or(|r| r.status != ConditionStatus::False)
            {
                set_ready(
                    local,
                    ConditionStatus::False,
                    reason::STOPPED,
                    "the guest is not running".into(),
                );
            }
        }
        // A stop without a VMM: next_move never asks for one.
        (Move::StopForDeletion | Move::Stop, None) => {}
    }
    write_status(ctx, vm, local).await?;
    Ok(Some(Action::requeue(requeue)))
}

/// The VMM ended: learn how from the shim's record and decide what follows.
async fn handle_exit(
    ctx: &Ctx,
    vm: &VirtualMachine,
    dir: &VmDir,
    local: &mut LocalVm,
    deleting: bool,
) {
    let spec = &vm.spec;
    local.proc = None;
    // The shim writes the record right after the VMM is reaped.
    let mut rec = dir.exit_record();
    for _ in 0..20 {
        if rec.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        rec = dir.exit_record();
    }
    let ended = rec.map_or_else(
        || Ended::VmmFailure("the VMM vanished without an exit status".into()),
        |r| r.ended(local.stopping.is_some()),
    );
    local.stopping = None;
    let ran_for = local
        .started_at
        .and_then(|t| Duration::try_from(Timestamp::now().duration_since(t)).ok())
        .unwrap_or(Duration::ZERO);
    let after = lifecycle::after_exit(
        spec.run_strategy,
        &ended,
        local.restarts.max(0) as u32,
        ran_for,
    );
    event(ctx, vm, ended.is_failure(), ended.reason(), ended.message()).await;
    local.after_exit(&ended, after, deleting, Instant::now());
    let _ = std::fs::remove_file(dir.api_socket());
}

/// The cached files of the VM's boot images; `None` while one imports
/// (status says so, the import wakes the VM) or when one failed.
async fn boot_images(
    ctx: &Ctx,
    vm: &VirtualMachine,
    local: &mut LocalVm,
) -> Option<std::collections::BTreeMap<String, super::images::CachedImage>> {
    match super::images::boot_images(&ctx.importer, vm).await {
        super::images::BootImages::Ready(images) => {
            if let Some(since) = local.importing_since.take() {
                timed_step(ctx, vm, StartStep::ImageImport, since.elapsed()).await;
            }
            Some(images)
        }
        super::images::BootImages::Waiting(msg) => {
            // The import wakes this VM when it ends; the poll (one GET of
            // each image) refreshes the progress in the message.
            local.importing_since.get_or_insert_with(Instant::now);
            local.next_start = Some(Instant::now() + Duration::from_secs(5));
            local.phase = Some(VmPhase::Scheduled);
            set_ready(local, ConditionStatus::False, reason::IMAGE_IMPORTING, msg);
            None
        }
        super::images::BootImages::Failed(field, f) => {
            let msg = format!("{field}: {}: {}", f.reason, f.message);
            let delay = lifecycle::backoff(local.prepare_failures);
            local.importing_since = None;
            local.next_start = Some(Instant::now() + delay);
            local.prepare_failures = local.prepare_failures.saturating_add(1);
            local.phase = Some(VmPhase::Failed);
            // Not held: a server error or a full disk may pass; retried with backoff.
            set_failed(local, reason::IMAGE_FAILED, &msg, Some(delay));
            event(ctx, vm, true, reason::IMAGE_FAILED, msg).await;
            None
        }
    }
}

/// Prepares and starts the VMM; failures become status, not errors.
async fn start(ctx: &Ctx, vm: &VirtualMachine, uid: &str, dir: &VmDir, local: &mut LocalVm) {
    local.next_start = None;
    let Some(images) = boot_images(ctx, vm, local).await else {
        return;
    };
    let ctx_node = prepare::NodeContext {
        allowed_dirs: ctx.cfg.allowed_dirs.clone(),
        allowed_bridges: ctx.cfg.allowed_bridges.clone(),
        max_empty_disk: ctx.cfg.max_empty_disk,
        images,
        masquerade_bridge: Some(ctx.network.settings.bridge.clone()),
    };
    let cg = ctx.cgroups(uid, Some(vm));
    let began = Instant::now();
    let prepared = prepare_host(ctx, vm, uid, dir, &ctx_node, &cg);
    timed_step(ctx, vm, StartStep::HostPreparation, began.elapsed()).await;
    let (plan, fds) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let reason = match e {
                prepare::PrepareError::Host { .. } => reason::HOST_SETUP_FAILED,
                prepare::PrepareError::NoSpace { .. } => reason::INSUFFICIENT_SPACE,
                prepare::PrepareError::Network { reason, .. } => reason,
                _ => reason::INVALID_SPEC,
            };
            // Retried with backoff (a missing bridge may appear; a spec
            // edit triggers a reconcile at once), never in a tight loop.
            let delay = lifecycle::backoff(local.prepare_failures);
            local.next_start = Some(Instant::now() + delay);
            local.prepare_failures = local.prepare_failures.saturating_add(1);
            local.held = Some(VmPhase::Failed);
            local.phase = Some(VmPhase::Failed);
            set_failed(local, reason, &e.to_string(), Some(delay));
            event(ctx, vm, true, reason, e.to_string()).await;
            return;
        }
    };
    local.prepare_failures = 0;
    let owner = json!({"namespace": vm.namespace(), "name": vm.name_any(), "uid": uid});
    let _ = supervisor::write_atomic(&dir.owner_file(), owner.to_string().as_bytes());
    let (node_vmm, vmm, d) = (
        ctx.node_vmm.clone(),
        ctx.cfg.vmm_binary.clone(),
        dir.clone(),
    );
    let cg: Vec<PathBuf> = cg.into_iter().map(|c| c.path).collect();
    let spawned =
        tokio::task::spawn_blocking(move || supervisor::spawn(&node_vmm, &vmm, &d, &cg, &fds))
            .await;
    match spawned {
        Ok(Ok(pid)) => {
            if local.ever_ran {
                local.restarts += 1;
                ctx.metrics
                    .restarted(&vm.namespace().unwrap_or_default(), &vm.name_any());
            }
            local.ever_ran = true;
            local.held = None;
            local.proc = Some(pid);
            local.spawned = Some(Instant::now());
            local.started_at = Some(Timestamp::now());
            local.phase = Some(VmPhase::Starting);
            note_transition(vm, local);
            local.interfaces = plan
                .interfaces
                .iter()
                .map(|i| InterfaceStatus {
                    name: i.network.clone(),
                    mac: Some(i.mac.clone()),
                    ip_address: None,
                    tap: Some(i.tap.clone()),
                })
                .collect();
            set_ready(
                local,
                ConditionStatus::False,
                reason::STARTING,
                "the VMM is starting".into(),
            );
            watch_exit(ctx, vm, pid);
        }
        Ok(Err(e)) => spawn_failed(ctx, vm, local, e.to_string()).await,
        Err(e) => spawn_failed(ctx, vm, local, format!("spawn task failed: {e}")).await,
    }
}

/// The VMM could not be spawned: a VMM failure, restarted as the run
/// strategy says.
async fn spawn_failed(ctx: &Ctx, vm: &VirtualMachine, local: &mut LocalVm, why: String) {
    let ended = Ended::VmmFailure(why);
    let after = lifecycle::after_exit(
        vm.spec.run_strategy,
        &ended,
        local.restarts.max(0) as u32,
        Duration::ZERO,
    );
    let next_in = match after {
        AfterExit::Restart(d) => {
            local.next_start = Some(Instant::now() + d);
            Some(d)
        }
        AfterExit::Stay(_) => {
            local.held = Some(VmPhase::Failed);
            None
        }
    };
    local.phase = Some(if next_in.is_some() {
        VmPhase::Starting
    } else {
        VmPhase::Failed
    });
    set_failed(local, reason::VMM_FAILED, &ended.message(), next_in);
    event(ctx, vm, true, reason::VMM_FAILED, ended.message()).await;
}

/// Reads the VMM's state; applies `spec.paused`; polls stats for metrics.
async fn observe_running(
    ctx: &Ctx,
    vm: &VirtualMachine,
    dir: &VmDir,
    local: &mut LocalVm,
) -> Duration {
    let sock = dir.api_socket();
    let Ok(mut state) = vmm_client::state(&sock).await else {
        // The control socket is not up yet: still starting.
        if local.phase != Some(VmPhase::Running) && local.phase != Some(VmPhase::Paused) {
            local.phase = Some(VmPhase::Starting);
        }
        return Duration::from_millis(50);
    };
    if vm.spec.paused && state == "running" {
        if vmm_client::request(&sock, "PUT", "/vm/pause").await.is_ok() {
            state = "paused".into();
        }
    } else if !vm.spec.paused
        && state == "paused"
        && vmm_client::request(&sock, "PUT", "/vm/resume")
            .await
            .is_ok()
    {
        state = "running".into();
    }
    let paused = state == "paused";
    if let Some(spawned) = local.spawned.take() {
        ctx.metrics.booted(spawned.elapsed().as_secs_f64());
        timed_step(ctx, vm, StartStep::VmmStart, spawned.elapsed()).await;
    }
    local.phase = Some(if paused {
        VmPhase::Paused
    } else {
        VmPhase::Running
    });
    if paused {
        set_ready(
            local,
            ConditionStatus::False,
            reason::PAUSED,
            "the vCPUs are paused (spec.paused)".into(),
        );
    } else {
        set_ready(
            local,
            ConditionStatus::True,
            reason::GUEST_RUNNING,
            "the VMM is up and the vCPUs run".into(),
        );
    }
    let since = match local.paused {
        Some((was, t)) if was == paused => t,
        _ => Timestamp::now(),
    };
    local.paused = Some((paused, since));
    if local
        .last_stats
        .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
    {
        if let Ok(stats) = vmm_client::request(&sock, "GET", "/vm/stats").await {
            let mem = kubevmm_crds::quantity::parse_bytes(&vm.spec.memory.0).unwrap_or(0);
            ctx.metrics.observe_stats(
                &vm.namespace().unwrap_or_default(),
                &vm.name_any(),
                mem,
                &stats,
            );
            local.last_stats = Some(Instant::now());
        }
    }
    Duration::from_secs(10)
}

/// Graceful stop: ACPI shutdown, then after the grace period a force stop,
/// then SIGKILL.
async fn stop_step(
    ctx: &Ctx,
    vm: &VirtualMachine,
    dir: &VmDir,
    local: &mut LocalVm,
    pid: ProcessId,
) {
    let sock = dir.api_socket();
    let grace = contract::stop_grace(vm.annotations(), vm.spec.termination_grace_period_seconds);
    let (action, next) = lifecycle::stop_step(local.stopping, grace, Instant::now());
    local.stopping = Some(next);
    match action {
        Some(StopAction::RequestShutdown) => {
            if let Err(e) = vmm_client::request(&sock, "PUT", "/vm/shutdown").await {
                tracing::warn!(vm = %vm.name_any(), "ACPI shutdown request failed: {e}");
            }
            let note = format!("ACPI shutdown requested; {}s grace period", grace.as_secs());
            event(ctx, vm, false, "Stopping", note).await;
        }
        Some(StopAction::ForceStop { grace_over }) => {
            let _ = vmm_client::request(&sock, "PUT", "/vm/stop").await;
            let note = if grace_over {
                "the guest did not power off within its grace period"
            } else {
                "stopped by force at once (grace period 0)"
            };
            event(ctx, vm, true, "ForceStopped", note.into()).await;
        }
        Some(StopAction::Kill) => supervisor::kill(pid),
        None => {}
    }
    local.phase = Some(VmPhase::Stopping);
    set_ready(
        local,
        ConditionStatus::False,
        reason::STOPPING,
        "the guest is shutting down".into(),
    );
}

/// Releases taps, cgroup, metrics series, the state directory and, the VM
/// being deleted, its disks.
fn release(ctx: &Ctx, uid: &str, dir: &VmDir, vm: &VirtualMachine) {
    debug_assert_eq!(dir.0, ctx.dir(uid).0);
    ctx.remove_host_state(uid, vm.spec.networks.len());
    let _ = std::fs::remove_dir_all(ctx.disk_dir(uid).0);
    ctx.network.forget_vm(uid);
    ctx.sync_rules();
    ctx.metrics
        .forget(&vm.namespace().unwrap_or_default(), &vm.name_any());
}

async fn remove_finalizer(ctx: &Ctx, vm: &VirtualMachine) -> Result<(), ReconcileError> {
    let Some(patch) =
        contract::finalizer_removal(vm.finalizers(), vm.resource_version().as_deref())
    else {
        return Ok(());
    };
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    match api
        .patch(
            &vm.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(api_err(format!("remove finalizer of {}", vm.name_any()))(e)),
    }
}

async fn mark_restart_handled(
    ctx: &Ctx,
    vm: &VirtualMachine,
    value: &str,
) -> Result<(), ReconcileError> {
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    let patch = json!({"metadata": {"annotations": {ANNOTATION_RESTART_DONE: value}}});
    api.patch(
        &vm.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(api_err("record the handled restart request"))?;
    Ok(())
}
