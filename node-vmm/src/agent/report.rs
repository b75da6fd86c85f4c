//! What the agent tells about a VM: its part of the status (built by
//! [`super::status_body`]), Events, and the `SlowStartStep` Event for a
//! start step that took longer than the configured threshold
//! ([`super::lifecycle::slow_step_note`] decides).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource as _, ResourceExt as _};
use kubevmm_crds::contract::{condition, reason, ConditionStatus, MANAGER_NODE};
use kubevmm_crds::events::Note;
use kubevmm_crds::{VirtualMachine, VmPhase};

use super::ctx::Ctx;
use super::lifecycle::slow_step_note;
pub use super::lifecycle::StartStep;
use super::local::LocalVm;
use super::status_body::{self, condition_json, live_matches, AgentPart};

/// Publishes `note` about `vm`; a failure is logged, never fatal.
pub fn publish(ctx: &Ctx, vm: &VirtualMachine, note: &Note) {
    ctx.events.send(vm.object_ref(&()), note.clone());
}

/// Records an Event about `vm`, folded into one series only when its note
/// repeats (see [`Note::folded_by_note`]).
pub fn event(ctx: &Ctx, vm: &VirtualMachine, warning: bool, reason: &str, note: String) {
    publish(ctx, vm, &Note::new(warning, reason, note).folded_by_note());
}

/// Publishes `SlowStartStep` when `step` took longer than the threshold.
pub fn timed_step(ctx: &Ctx, vm: &VirtualMachine, step: StartStep, took: Duration) {
    if let Some(note) = slow_step_note(step, took, ctx.cfg.slow_start_step) {
        tracing::info!(vm = %vm.name_any(), "{note}");
        publish(
            ctx,
            vm,
            &Note::normal("SlowStartStep", note).with_action(step.action()),
        );
    }
}

/// [`LocalVm::note_transition`] against the live status, now.
pub fn note_transition(vm: &VirtualMachine, local: &mut LocalVm) {
    let live = vm
        .status
        .as_ref()
        .map_or(&[][..], |s| &s.phase_transition_timestamps[..]);
    let created = vm.metadata.creation_timestamp.as_ref().map(|t| t.0);
    local.note_transition(live, created, Timestamp::now());
}

/// Writes this agent's part of the status when it differs from the live one.
pub async fn write_status(
    ctx: &Ctx,
    vm: &VirtualMachine,
    local: &mut LocalVm,
) -> Result<(), kube::Error> {
    let generation = vm.metadata.generation;
    for i in &mut local.interfaces {
        let bound = i.mac.as_deref().and_then(|m| ctx.network.bound_ip(m));
        i.ip_address = bound.map(|ip| ip.to_string()).or(i.ip_address.take());
    }
    let live = vm.status.as_ref();
    let created = vm.metadata.creation_timestamp.as_ref().map(|t| t.0);
    note_transition(vm, local);
    let mut conditions = Vec::new();
    if let Some(r) = &local.ready {
        conditions.push(condition_json(
            condition::READY,
            r.status.as_str(),
            &r.reason,
            &r.message,
            r.since,
            generation,
        ));
    }
    if let Some(p) = local.paused {
        conditions.push(condition_json(
            condition::PAUSED,
            ConditionStatus::from_bool(p.paused).as_str(),
            if p.paused {
                reason::PAUSED_BY_USER
            } else {
                reason::NOT_PAUSED
            },
            "spec.paused",
            p.since,
            generation,
        ));
    }
    let body = status_body::body(
        vm,
        &AgentPart {
            phase: local.phase,
            interfaces: &local.interfaces,
            started_at: local.started_at,
            restart_count: local.restarts,
            conditions,
            transitions: &local.transitions,
            last_failure: local.failure.as_ref(),
        },
    );
    if live_matches(vm, &body) {
        return Ok(());
    }
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    api.patch_status(
        &vm.name_any(),
        &PatchParams::apply(MANAGER_NODE).force(),
        &Patch::Apply(&body),
    )
    .await?;
    if let Some(phase) = local
        .phase
        .filter(|p| Some(*p) != live.and_then(|s| s.phase))
    {
        let age = created.map_or(0.0, |t| Timestamp::now().duration_since(t).as_secs_f64());
        let name = phase.as_str();
        ctx.metrics.transition(name, age);
        event(
            ctx,
            vm,
            phase == VmPhase::Failed,
            name,
            format!("phase {name} on node {}", ctx.cfg.node_name),
        );
    }
    Ok(())
}
