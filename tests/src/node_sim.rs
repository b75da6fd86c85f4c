//! Playing node-vmm towards the API: a guest reported Running with the
//! agent's own status code (`node_vmm::agent::status_body`: its part of the
//! status, its `Ready` condition, the phase transitions), applied under its
//! field manager. For the operator tests and `bench-scale`, whose nodes
//! have no KVM.

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use kubevmm_crds::contract::{self, condition, reason, ConditionStatus};
use kubevmm_crds::printable::record_transition;
use kubevmm_crds::{VirtualMachine, VmPhase};
use node_vmm::agent::status_body::{body, condition_json, live_matches, AgentPart};

/// Applies what node-vmm applies once `vm`'s guest runs; `Ok(false)` when
/// the live status already says so (node-vmm writes nothing then).
pub async fn report_running(
    api: &Api<VirtualMachine>,
    vm: &VirtualMachine,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let status = vm.status.clone().unwrap_or_default();
    let created = vm.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let transitions = record_transition(
        &status.phase_transition_timestamps,
        Some(VmPhase::Running),
        created,
        now,
    );
    let part = AgentPart {
        phase: Some(VmPhase::Running),
        interfaces: &[],
        started_at: Some(now),
        restart_count: status.restart_count,
        conditions: vec![condition_json(
            condition::READY,
            ConditionStatus::True.as_str(),
            reason::GUEST_RUNNING,
            "the VMM is up and the vCPUs run",
            now,
            vm.metadata.generation,
        )],
        transitions: &transitions,
        last_failure: None,
    };
    let b = body(vm, &part);
    if live_matches(vm, &b) {
        return Ok(false);
    }
    api.patch_status(
        &vm.name_any(),
        &PatchParams::apply(contract::MANAGER_NODE).force(),
        &Patch::Apply(&b),
    )
    .await?;
    Ok(true)
}
