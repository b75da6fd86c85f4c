//! What a person reads first: `status.printableStatus` (the STATUS column of
//! `kubectl get vm`), the bounded list of phase transitions and the record
//! of a repeated failure. Both writers of a VM's status (the operator and
//! node-vmm) derive these with the pure functions here from the status they
//! are about to apply merged over the live one, so for the same object they
//! always agree and never undo each other's writes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{Timestamp, Unit};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contract::{condition, reason, ConditionStatus};
use crate::vm::{VirtualMachineStatus, VmPhase};

/// The one-word state of a VM for people, as `KubeVirt`'s `printableStatus`:
/// the phase refined by the conditions that explain it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum PrintableStatus {
    /// Accepted, waiting to be placed on a node.
    Pending,
    /// No hypervisor node can take it now (condition `Scheduled=False`,
    /// reason `Unschedulable`, says what is short).
    ErrorUnschedulable,
    /// The spec cannot be run as written (reason `InvalidSpec` says which field).
    InvalidSpec,
    /// An image it boots from or clones is being imported on its node.
    Importing,
    /// Placed; disks, network and the VMM are being set up.
    Starting,
    /// The guest or its VMM failed and a restart is waiting for its backoff
    /// (the `Ready` message gives the count and the next start time).
    CrashLoopBackOff,
    /// The VMM is up and the vCPUs execute.
    Running,
    /// The VMM is up and the vCPUs are paused.
    Paused,
    /// The guest is being shut down.
    Stopping,
    /// Not running, by request.
    Stopped,
    /// The guest powered off by itself and is not restarted.
    Succeeded,
    /// The guest, its VMM or its preparation failed.
    Failed,
    /// Its node stopped heartbeating: the guest's fate is unknown.
    NodeLost,
    /// Deleted; the guest is being stopped and its resources released.
    Terminating,
}

impl PrintableStatus {
    /// Every value, in the order of the table in docs/api.md.
    pub const ALL: [PrintableStatus; 14] = [
        Self::Pending,
        Self::ErrorUnschedulable,
        Self::InvalidSpec,
        Self::Importing,
        Self::Starting,
        Self::CrashLoopBackOff,
        Self::Running,
        Self::Paused,
        Self::Stopping,
        Self::Stopped,
        Self::Succeeded,
        Self::Failed,
        Self::NodeLost,
        Self::Terminating,
    ];

    /// The word as written in `status.printableStatus`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::ErrorUnschedulable => "ErrorUnschedulable",
            Self::InvalidSpec => "InvalidSpec",
            Self::Importing => "Importing",
            Self::Starting => "Starting",
            Self::CrashLoopBackOff => "CrashLoopBackOff",
            Self::Running => "Running",
            Self::Paused => "Paused",
            Self::Stopping => "Stopping",
            Self::Stopped => "Stopped",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::NodeLost => "NodeLost",
            Self::Terminating => "Terminating",
        }
    }

    /// The status word for a VM that ended with `phase` (standalone
    /// `node-vmm run`, where no conditions exist).
    pub fn of_phase(phase: VmPhase) -> Self {
        printable_status(
            false,
            &VirtualMachineStatus {
                phase: Some(phase),
                ..VirtualMachineStatus::default()
            },
        )
    }
}

impl std::fmt::Display for PrintableStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The status word of a VM: `deleting` when it has a deletion timestamp,
/// `status` as it will be once the caller's write is applied.
pub fn printable_status(deleting: bool, status: &VirtualMachineStatus) -> PrintableStatus {
    use PrintableStatus as P;
    if deleting {
        return P::Terminating;
    }
    let cond = |ty| find(&status.conditions, ty);
    if cond(condition::NODE_LOST).is_some_and(|c| ConditionStatus::of(c) == ConditionStatus::True) {
        return P::NodeLost;
    }
    let ready_reason = cond(condition::READY)
        .filter(|c| ConditionStatus::of(c) == ConditionStatus::False)
        .map(|c| c.reason.as_str());
    let sched_reason = cond(condition::SCHEDULED)
        .filter(|c| ConditionStatus::of(c) == ConditionStatus::False)
        .map(|c| c.reason.as_str());
    let invalid =
        ready_reason == Some(reason::INVALID_SPEC) || sched_reason == Some(reason::INVALID_SPEC);
    match status.phase {
        None | Some(VmPhase::Pending) => match sched_reason {
            _ if invalid => P::InvalidSpec,
            Some(reason::UNSCHEDULABLE) => P::ErrorUnschedulable,
            _ => P::Pending,
        },
        Some(VmPhase::Scheduled | VmPhase::Starting) => match ready_reason {
            Some(reason::IMAGE_IMPORTING) => P::Importing,
            Some(reason::GUEST_CRASHED | reason::VMM_FAILED) => P::CrashLoopBackOff,
            _ => P::Starting,
        },
        Some(VmPhase::Running) => P::Running,
        Some(VmPhase::Paused) => P::Paused,
        Some(VmPhase::Stopping) => P::Stopping,
        Some(VmPhase::Stopped) => P::Stopped,
        Some(VmPhase::Succeeded) => P::Succeeded,
        Some(VmPhase::Failed) if invalid => P::InvalidSpec,
        Some(VmPhase::Failed) => P::Failed,
    }
}

/// Most entries kept in `status.phaseTransitionTimestamps` (the newest).
pub const MAX_PHASE_TRANSITIONS: usize = 16;

/// When a VM entered a phase.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTransition {
    /// The phase entered.
    pub phase: VmPhase,
    /// When.
    pub phase_transition_timestamp: Time,
}

/// `list` after a write that sets `phase` at `now`: a new entry when the
/// phase differs from the newest one, the oldest dropped beyond
/// [`MAX_PHASE_TRANSITIONS`]. An empty list starts with `Pending` at
/// `created` (the VM's creation time), so the first entry says when the
/// wait began.
pub fn record_transition(
    list: &[PhaseTransition],
    phase: Option<VmPhase>,
    created: Option<Timestamp>,
    now: Timestamp,
) -> Vec<PhaseTransition> {
    let mut out = list.to_vec();
    let Some(phase) = phase else { return out };
    if out.is_empty() && phase != VmPhase::Pending {
        if let Some(created) = created {
            out.push(PhaseTransition {
                phase: VmPhase::Pending,
                phase_transition_timestamp: Time(created),
            });
        }
    }
    if out.last().is_none_or(|t| t.phase != phase) {
        out.push(PhaseTransition {
            phase,
            phase_transition_timestamp: Time(now),
        });
    }
    let excess = out.len().saturating_sub(MAX_PHASE_TRANSITIONS);
    out.drain(..excess);
    out
}

/// The latest failure of a VM's runs or of its preparation, once, with how
/// often it happened in a row (as an Event's count), instead of a message
/// repeated per occurrence.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailureRecord {
    /// Machine-readable reason, e.g. `GuestCrashed`.
    pub reason: String,
    /// What happened, once.
    pub message: String,
    /// How many times in a row this same failure happened.
    pub count: i32,
    /// The first of those times.
    pub first_timestamp: Time,
    /// The latest of those times.
    pub last_timestamp: Time,
}

impl FailureRecord {
    /// The record after a failure `reason`/`message` at `now`: the count goes
    /// up when it repeats the previous one, else it starts again at 1.
    pub fn after(previous: Option<&Self>, reason: &str, message: &str, now: Timestamp) -> Self {
        match previous {
            Some(p) if p.reason == reason && p.message == message => Self {
                count: p.count.saturating_add(1),
                last_timestamp: Time(now),
                ..p.clone()
            },
            _ => Self {
                reason: reason.into(),
                message: message.into(),
                count: 1,
                first_timestamp: Time(now),
                last_timestamp: Time(now),
            },
        }
    }

    /// The message for a condition: the failure once, with its count when it
    /// repeated.
    pub fn summary(&self) -> String {
        if self.count > 1 {
            format!(
                "{} ({} times in a row since {}, last at {})",
                self.message,
                self.count,
                self.first_timestamp
                    .0
                    .round(Unit::Second)
                    .unwrap_or(self.first_timestamp.0),
                self.last_timestamp
                    .0
                    .round(Unit::Second)
                    .unwrap_or(self.last_timestamp.0)
            )
        } else {
            self.message.clone()
        }
    }
}

#[cfg(test)]
#[path = "printable_tests.rs"]
mod tests;
