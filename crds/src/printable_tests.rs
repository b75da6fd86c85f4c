use super::*;
use crate::contract::condition::{NODE_LOST, READY, SCHEDULED};

fn cond(type_: &str, status: &str, reason: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: String::new(),
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
        observed_generation: None,
    }
}

fn status(phase: Option<VmPhase>, conditions: &[(&str, &str, &str)]) -> VirtualMachineStatus {
    VirtualMachineStatus {
        phase,
        conditions: conditions.iter().map(|(t, s, r)| cond(t, s, r)).collect(),
        ..VirtualMachineStatus::default()
    }
}

/// deleting, phase, conditions (type, status, reason), the word.
type Case = (
    bool,
    Option<VmPhase>,
    &'static [(&'static str, &'static str, &'static str)],
    PrintableStatus,
);

#[rustfmt::skip]
const CASES: &[Case] = {
    use PrintableStatus as P;
    use VmPhase::*;
    &[
        (false, None, &[], P::Pending),
        (false, Some(Pending), &[(SCHEDULED, "False", "Unschedulable")], P::ErrorUnschedulable),
        (false, Some(Pending), &[(SCHEDULED, "False", "InvalidSpec")], P::InvalidSpec),
        (false, None, &[(SCHEDULED, "False", "InvalidSpec")], P::InvalidSpec),
        // Re-placed after a node loss: waiting again, not lost.
        (false, Some(Pending), &[(NODE_LOST, "False", "Rescheduled")], P::Pending),
        (false, Some(Scheduled), &[(SCHEDULED, "True", "Scheduled")], P::Starting),
        (false, Some(Scheduled), &[(READY, "False", "ImageImporting")], P::Importing),
        (false, Some(Starting), &[(READY, "False", "Starting")], P::Starting),
        (false, Some(Starting), &[(READY, "False", "GuestCrashed")], P::CrashLoopBackOff),
        (false, Some(Starting), &[(READY, "False", "VmmFailed")], P::CrashLoopBackOff),
        // A reboot under Always is a restart, not a crash loop.
        (false, Some(Starting), &[(READY, "False", "GuestRebooted")], P::Starting),
        (false, Some(Running), &[(READY, "True", "GuestRunning")], P::Running),
        (false, Some(Paused), &[(READY, "False", "Paused")], P::Paused),
        (false, Some(Stopping), &[(READY, "False", "Stopping")], P::Stopping),
        (false, Some(Stopped), &[(READY, "False", "Stopped")], P::Stopped),
        (false, Some(Succeeded), &[(READY, "False", "GuestPoweredOff")], P::Succeeded),
        (false, Some(Failed), &[(READY, "False", "GuestCrashed")], P::Failed),
        (false, Some(Failed), &[(READY, "False", "HostSetupFailed")], P::Failed),
        (false, Some(Failed), &[(READY, "False", "InvalidSpec")], P::InvalidSpec),
        (false, Some(Running), &[(NODE_LOST, "True", "HeartbeatExpired"), (READY, "Unknown", "NodeLost")], P::NodeLost),
        (false, Some(Failed), &[(NODE_LOST, "True", "NodeGone")], P::NodeLost),
        // A stale NodeLost=False (heartbeat back) changes nothing.
        (false, Some(Running), &[(NODE_LOST, "False", "HeartbeatResumed"), (READY, "True", "GuestRunning")], P::Running),
        (true, Some(Running), &[(READY, "True", "GuestRunning")], P::Terminating),
        (true, Some(Stopping), &[(NODE_LOST, "True", "HeartbeatExpired")], P::Terminating),
    ]
};

#[test]
fn each_status_word_comes_from_phase_and_conditions() {
    for (deleting, phase, conds, want) in CASES {
        assert_eq!(
            printable_status(*deleting, &status(*phase, conds)),
            *want,
            "deleting={deleting} phase={phase:?} conditions={conds:?}"
        );
    }
}

#[test]
fn every_word_is_reachable_and_serializes_as_written() {
    for p in PrintableStatus::ALL {
        assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
    }
    assert_eq!(
        PrintableStatus::of_phase(VmPhase::Succeeded),
        PrintableStatus::Succeeded
    );
    assert_eq!(
        PrintableStatus::of_phase(VmPhase::Failed),
        PrintableStatus::Failed
    );
}

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(secs).unwrap()
}

#[test]
fn transitions_start_at_creation_skip_repeats_and_stay_bounded() {
    let list = record_transition(&[], Some(VmPhase::Scheduled), Some(at(100)), at(101));
    assert_eq!(
        list.iter()
            .map(|t| (t.phase, t.phase_transition_timestamp.0))
            .collect::<Vec<_>>(),
        vec![(VmPhase::Pending, at(100)), (VmPhase::Scheduled, at(101))]
    );
    assert_eq!(
        record_transition(&list, Some(VmPhase::Scheduled), None, at(102)),
        list
    );
    assert_eq!(record_transition(&list, None, None, at(102)), list);
    let pending_first = record_transition(&[], Some(VmPhase::Pending), Some(at(100)), at(100));
    assert_eq!(pending_first.len(), 1);

    let mut list = list;
    for i in 0..100 {
        let phase = if i % 2 == 0 {
            VmPhase::Starting
        } else {
            VmPhase::Running
        };
        list = record_transition(&list, Some(phase), None, at(200 + i));
        assert!(list.len() <= MAX_PHASE_TRANSITIONS);
    }
    assert_eq!(list.len(), MAX_PHASE_TRANSITIONS);
    let last = list.last().unwrap();
    assert_eq!(
        (last.phase, last.phase_transition_timestamp.0),
        (VmPhase::Running, at(299))
    );
    assert!(list
        .windows(2)
        .all(|w| w[0].phase_transition_timestamp.0 <= w[1].phase_transition_timestamp.0));
}

#[test]
fn a_repeated_failure_is_counted_not_repeated() {
    let one = FailureRecord::after(
        None,
        "GuestCrashed",
        "the guest crashed: triple fault",
        at(10),
    );
    assert_eq!(one.count, 1);
    assert_eq!(one.summary(), "the guest crashed: triple fault");
    let two = FailureRecord::after(
        Some(&one),
        "GuestCrashed",
        "the guest crashed: triple fault",
        at(20),
    );
    let three = FailureRecord::after(
        Some(&two),
        "GuestCrashed",
        "the guest crashed: triple fault",
        at(40),
    );
    assert_eq!(
        (three.count, three.first_timestamp.0, three.last_timestamp.0),
        (3, at(10), at(40))
    );
    let s = three.summary();
    assert_eq!(s.matches("triple fault").count(), 1, "{s}");
    assert!(
        s.contains("3 times in a row since 1970-01-01T00:00:10Z, last at 1970-01-01T00:00:40Z"),
        "{s}"
    );
    let other = FailureRecord::after(Some(&three), "VmmFailed", "the VMM failed: x", at(50));
    assert_eq!((other.count, other.first_timestamp.0), (1, at(50)));
    let other_message = FailureRecord::after(
        Some(&three),
        "GuestCrashed",
        "the guest crashed: panic",
        at(60),
    );
    assert_eq!(other_message.count, 1);
}
