//! Converging one bound `VirtualMachine`: observe its VMM, decide with
//! [`decide`], carry the effects out through [`supervisor`] and
//! [`vmm_client`], report status. No decision is taken here.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt as _;
use kubevmm_crds::contract::{self, ANNOTATION_RESTART_DONE};
use kubevmm_crds::vm::InterfaceStatus;
use kubevmm_crds::VirtualMachine;
use serde_json::json;

use super::ctx::Ctx;
use super::decide::{self, Effect, GuestState, Plan, Seen, Started, Then, VmmSeen};
use super::host::prepare_host;
use super::local::LocalVm;
use super::report::{publish, timed_step, write_status, StartStep};
use super::supervisor::{self, ProcessId, VmDir};
use super::{prepare, vmm_client};

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

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError::Api { what, source }
}

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

/// One pass: observe, [`decide`], carry out the plan (and the plans of
/// its follow-ups); `Ok(None)` when the VM is gone from this node for good.
async fn step(
    vm: &VirtualMachine,
    ctx: &Ctx,
    uid: &str,
    local: &mut LocalVm,
) -> Result<Option<Action>, ReconcileError> {
    let dir = ctx.dir(uid);
    let deleting = vm.metadata.deletion_timestamp.is_some();
    let vmm = observe_vmm(&dir, local).await;
    let seen = Seen {
        deleting,
        strategy: vm.spec.run_strategy,
        paused_wanted: vm.spec.paused,
        restart: contract::pending_restart(vm.annotations()),
        grace: contract::stop_grace(vm.annotations(), vm.spec.termination_grace_period_seconds),
        generation: vm.metadata.generation,
        // Only a VM waiting to start consumes its wake-up.
        image_ready: !deleting && vmm != VmmSeen::Alive && ctx.importer.take_woken(uid),
        vmm,
        live_transitions: vm
            .status
            .as_ref()
            .map_or(&[][..], |s| &s.phase_transition_timestamps[..]),
        created: vm.metadata.creation_timestamp.as_ref().map(|t| t.0),
        now: Instant::now(),
        wall: Timestamp::now(),
    };
    let plan = decide::decide(&seen, local);
    let mut then = plan.then;
    let mut queue: VecDeque<Effect> = plan.effects.into();
    while let Some(effect) = queue.pop_front() {
        if let Some(follow) = execute(ctx, vm, uid, &dir, &seen, local, effect).await? {
            then = follow.then;
            for e in follow.effects.into_iter().rev() {
                queue.push_front(e);
            }
        }
    }
    Ok(match then {
        Then::After(d) => Some(Action::requeue(d)),
        Then::Forget => None,
    })
}

/// Whether the VM's VMM runs, or how it ended (the shim writes its record
/// right after the VMM is reaped).
async fn observe_vmm(dir: &VmDir, local: &LocalVm) -> VmmSeen {
    match local.proc {
        None => VmmSeen::Absent,
        Some(pid) if pid.alive() => VmmSeen::Alive,
        Some(_) => {
            for _ in 0..20 {
                if let Some(rec) = dir.exit_record() {
                    return VmmSeen::Ended(Some(rec));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            VmmSeen::Ended(dir.exit_record())
        }
    }
}

/// Carries out one effect; the plan of its follow-up, for those whose
/// outcome [`decide`] takes back.
async fn execute(
    ctx: &Ctx,
    vm: &VirtualMachine,
    uid: &str,
    dir: &VmDir,
    seen: &Seen<'_>,
    local: &mut LocalVm,
    effect: Effect,
) -> Result<Option<Plan>, ReconcileError> {
    let sock = dir.api_socket();
    let later = || seen.at(Instant::now(), Timestamp::now());
    match effect {
        Effect::Start => {
            let outcome = start(ctx, vm, uid, dir).await;
            return Ok(Some(decide::started(&later(), local, outcome)));
        }
        Effect::Probe(wait) => {
            let answer = tokio::time::timeout(wait, vmm_client::state(&sock))
                .await
                .ok()
                .and_then(Result::ok);
            return Ok(Some(decide::probed(&later(), local, answer)));
        }
        Effect::Steer { from, to } => {
            let path = match to {
                GuestState::Paused => "/vm/pause",
                GuestState::Running => "/vm/resume",
            };
            let now = match vmm_client::request(&sock, "PUT", path).await {
                Ok(_) => to,
                Err(e) => {
                    tracing::warn!(vm = %vm.name_any(), "PUT {path} failed: {e}");
                    from
                }
            };
            return Ok(Some(decide::settled(&later(), local, now)));
        }
        Effect::WatchExit(pid) => watch_exit(ctx, vm, pid),
        Effect::RequestShutdown => {
            if let Err(e) = vmm_client::request(&sock, "PUT", "/vm/shutdown").await {
                tracing::warn!(vm = %vm.name_any(), "ACPI shutdown request failed: {e}");
            }
        }
        Effect::ForceStop => {
            // A VMM that does not answer is killed at the next step.
            let _ = vmm_client::request(&sock, "PUT", "/vm/stop").await;
        }
        Effect::Kill(pid) => supervisor::kill(pid),
        Effect::ForgetSocket => {
            let _ = std::fs::remove_file(&sock);
        }
        Effect::ReadStats => {
            if let Ok(stats) = vmm_client::request(&sock, "GET", "/vm/stats").await {
                let mem = kubevmm_crds::quantity::parse_bytes(&vm.spec.memory.0).unwrap_or(0);
                let ns = vm.namespace().unwrap_or_default();
                ctx.metrics.observe_stats(&ns, &vm.name_any(), mem, &stats);
            }
        }
        Effect::Booted(took) => {
            ctx.metrics.booted(took.as_secs_f64());
            timed_step(ctx, vm, StartStep::VmmStart, took);
        }
        Effect::CountRestart => ctx
            .metrics
            .restarted(&vm.namespace().unwrap_or_default(), &vm.name_any()),
        Effect::Step(step, took) => timed_step(ctx, vm, step, took),
        Effect::Release => {
            release(ctx, uid, dir, vm);
            remove_finalizer(ctx, vm).await?;
        }
        Effect::Event(note) => publish(ctx, vm, &note),
        Effect::WriteStatus => write_status(ctx, vm, local)
            .await
            .map_err(api_err(format!("write status of {}", vm.name_any())))?,
        Effect::MarkRestartHandled(value) => mark_restart_handled(ctx, vm, &value).await?,
    }
    Ok(None)
}

/// Prepares the host and spawns the VMM: what it came to, for
/// [`decide::started`].
async fn start(ctx: &Ctx, vm: &VirtualMachine, uid: &str, dir: &VmDir) -> Started {
    let images = match super::images::boot_images(&ctx.importer, vm).await {
        super::images::BootImages::Ready(images) => images,
        super::images::BootImages::Waiting(msg) => return Started::ImagesImporting(msg),
        super::images::BootImages::Failed(field, f) => {
            return Started::ImagesFailed(format!("{field}: {}: {}", f.reason, f.message))
        }
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
    // Files, cgroups and netlink, synchronous: the runtime hands this
    // worker's other tasks (other VMs' starts and status writes) to another
    // thread meanwhile.
    let prepared = tokio::task::block_in_place(|| prepare_host(ctx, vm, uid, dir, &ctx_node, &cg));
    timed_step(ctx, vm, StartStep::HostPreparation, began.elapsed());
    let (plan, fds) = match prepared {
        Ok(p) => p,
        Err(e) => {
            return Started::PrepareFailed {
                reason: e.reason(),
                message: e.to_string(),
            };
        }
    };
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
        Ok(Ok(pid)) => Started::Spawned {
            pid,
            interfaces: plan
                .interfaces
                .iter()
                .map(|i| InterfaceStatus {
                    name: i.network.clone(),
                    mac: Some(i.mac.clone()),
                    ip_address: None,
                    tap: Some(i.tap.clone()),
                })
                .collect(),
        },
        Ok(Err(e)) => Started::SpawnFailed(e.to_string()),
        Err(e) => Started::SpawnFailed(format!("spawn task failed: {e}")),
    }
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
