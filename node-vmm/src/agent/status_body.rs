//! The status body the agent writes (pure): its part of the status, the
//! status word derived over the merged status, and whether the live status
//! already says it all (then nothing is written).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kubevmm_crds::printable::{printable_status, FailureRecord, PhaseTransition};
use kubevmm_crds::vm::InterfaceStatus;
use kubevmm_crds::{VirtualMachine, VmPhase};
use serde_json::{json, Value};

/// A condition of the agent's status.
pub fn condition_json(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    since: Timestamp,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(since),
        observed_generation: generation,
    }
}

/// What node-vmm owns of a bound VM's status.
#[derive(Debug, Clone, Default)]
pub struct AgentPart<'a> {
    /// `phase`.
    pub phase: Option<VmPhase>,
    /// `interfaces`.
    pub interfaces: &'a [InterfaceStatus],
    /// `startedAt`.
    pub started_at: Option<Timestamp>,
    /// `restartCount`.
    pub restart_count: i32,
    /// `Ready` and `Paused`.
    pub conditions: Vec<Condition>,
    /// `phaseTransitionTimestamps`.
    pub transitions: &'a [PhaseTransition],
    /// `lastFailure`.
    pub last_failure: Option<&'a FailureRecord>,
}

/// The server-side-apply body for `part`, with `printableStatus` derived
/// from `part` merged over the live status of `vm` (the operator's
/// conditions included), as the operator derives it from the same object.
pub fn body(vm: &VirtualMachine, part: &AgentPart) -> Value {
    let mut merged = vm.status.clone().unwrap_or_default();
    merged.phase = part.phase;
    merged
        .conditions
        .retain(|c| !part.conditions.iter().any(|p| p.type_ == c.type_));
    merged.conditions.extend(part.conditions.iter().cloned());
    let printable = printable_status(vm.metadata.deletion_timestamp.is_some(), &merged);
    let mut body = json!({
        "apiVersion": kubevmm_crds::API_VERSION,
        "kind": "VirtualMachine",
        "status": {
            "phase": part.phase,
            "printableStatus": printable,
            "phaseTransitionTimestamps": part.transitions,
            "interfaces": part.interfaces,
            "startedAt": part.started_at.map(Time),
            "restartCount": part.restart_count,
            "observedGeneration": vm.metadata.generation,
            "conditions": part.conditions,
        }
    });
    // Absent rather than null: no failure yet.
    if let Some(f) = part.last_failure {
        body["status"]["lastFailure"] = json!(f);
    }
    body
}

/// Of the agent's own list of transitions and the live one, the one that
/// knows the latest change: the operator writes entries while the VM is not
/// bound here (placement, release), the agent while it is, and a stale
/// cache must not roll the agent's own entries back.
pub fn newest_transitions(
    local: &[PhaseTransition],
    live: &[PhaseTransition],
) -> Vec<PhaseTransition> {
    let last = |l: &[PhaseTransition]| l.last().map(|t| t.phase_transition_timestamp.0);
    if last(live) > last(local) {
        live.to_vec()
    } else {
        local.to_vec()
    }
}

/// Whether the live status already holds everything in `body` (another
/// writer, or a lost update, makes it differ: then the agent writes again).
pub fn live_matches(vm: &VirtualMachine, body: &Value) -> bool {
    let live = serde_json::to_value(vm.status.clone().unwrap_or_default()).unwrap_or_default();
    let want = &body["status"];
    let empty = |v: &Value| v.is_null() || v.as_array().is_some_and(Vec::is_empty);
    let scalars = [
        "phase",
        "printableStatus",
        "phaseTransitionTimestamps",
        "lastFailure",
        "interfaces",
        "startedAt",
        "restartCount",
        "observedGeneration",
    ]
    .iter()
    .all(|k| live[k] == want[k] || (empty(&live[k]) && empty(&want[k])));
    let conditions = want["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|w| {
            live["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|l| {
                    ["type", "status", "reason", "message", "observedGeneration"]
                        .iter()
                        .all(|k| l[k] == w[k])
                })
        });
    scalars && conditions
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubevmm_crds::contract::condition;
    use kubevmm_crds::PrintableStatus;

    fn vm(status: &Value, deleting: bool) -> VirtualMachine {
        let mut v: VirtualMachine = serde_json::from_value(json!({
            "apiVersion": "kubevmm.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "v", "namespace": "n", "generation": 2},
            "spec": {"memory": "64Mi", "boot": {"kernel": {"path": "/k"}}},
            "status": status.clone(),
        }))
        .unwrap();
        if deleting {
            v.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        }
        v
    }

    fn ready(status: &str, reason: &str) -> Condition {
        condition_json(
            condition::READY,
            status,
            reason,
            "m",
            Timestamp::UNIX_EPOCH,
            Some(2),
        )
    }

    #[test]
    fn the_status_word_sees_the_operators_conditions_too() {
        let lost = json!({"phase": "Running", "conditions": [
            {"type": "NodeLost", "status": "True", "reason": "HeartbeatExpired", "message": "",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        let cases = [
            (
                json!({}),
                false,
                Some(VmPhase::Running),
                ready("True", "GuestRunning"),
                PrintableStatus::Running,
            ),
            (
                json!({}),
                false,
                Some(VmPhase::Starting),
                ready("False", "GuestCrashed"),
                PrintableStatus::CrashLoopBackOff,
            ),
            (
                lost,
                false,
                Some(VmPhase::Running),
                ready("True", "GuestRunning"),
                PrintableStatus::NodeLost,
            ),
            (
                json!({}),
                true,
                Some(VmPhase::Stopping),
                ready("False", "Stopping"),
                PrintableStatus::Terminating,
            ),
        ];
        for (live, deleting, phase, cond, want) in cases {
            let part = AgentPart {
                phase,
                conditions: vec![cond],
                ..AgentPart::default()
            };
            let b = body(&vm(&live, deleting), &part);
            assert_eq!(b["status"]["printableStatus"], want.as_str(), "{b}");
        }
    }

    #[test]
    fn a_write_is_skipped_only_when_live_says_it_all() {
        let part = AgentPart {
            phase: Some(VmPhase::Running),
            conditions: vec![ready("True", "GuestRunning")],
            ..AgentPart::default()
        };
        let empty = vm(&json!({}), false);
        let b = body(&empty, &part);
        assert!(!live_matches(&empty, &b));
        let written = vm(&b["status"], false);
        assert!(live_matches(&written, &body(&written, &part)));
        // The word changes under the agent (the operator's NodeLost): write again.
        let mut lost = b["status"].clone();
        lost["printableStatus"] = json!("NodeLost");
        assert!(!live_matches(&vm(&lost, false), &b));
    }

    #[test]
    fn the_newest_list_of_transitions_wins() {
        let t = |phase, s| PhaseTransition {
            phase,
            phase_transition_timestamp: Time(Timestamp::from_second(s).unwrap()),
        };
        let local = vec![t(VmPhase::Scheduled, 1), t(VmPhase::Running, 3)];
        let stale = vec![t(VmPhase::Scheduled, 1)];
        let newer = vec![
            t(VmPhase::Scheduled, 1),
            t(VmPhase::Running, 3),
            t(VmPhase::Scheduled, 9),
        ];
        assert_eq!(newest_transitions(&local, &stale), local);
        assert_eq!(newest_transitions(&local, &newer), newer);
        assert_eq!(newest_transitions(&[], &stale), stale);
    }
}
