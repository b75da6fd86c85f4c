//! Table tests of the agent's decision core: every transition of a VM on
//! its node, one pass (or one follow-up) at a time.

#![allow(clippy::type_complexity)] // table rows are tuples by design

use super::*;
use kubevmm_crds::VirtualMachineStatus;
use kubevmm_vmm::exit::code;

const PID: ProcessId = ProcessId {
    pid: 4242,
    start_time: 7,
};
const CRASHED: &[&str] = &["Event:GuestCrashed", "ForgetSocket", "WriteStatus"];
const GRACE: Duration = Duration::from_secs(60);

fn wall() -> Timestamp {
    "2026-12-06T12:00:00Z".parse().expect("time")
}

fn seen(vmm: VmmSeen, now: Instant) -> Seen<'static> {
    Seen {
        deleting: false,
        strategy: RunStrategy::Always,
        paused_wanted: false,
        restart: None,
        grace: GRACE,
        generation: Some(1),
        vmm,
        image_ready: false,
        live_transitions: &[],
        created: None,
        now,
        wall: wall(),
    }
}

fn exit(c: i32) -> VmmSeen {
    VmmSeen::Ended(Some(ExitRecord {
        code: Some(c),
        signal: None,
        message: "kubevmm-vmm: guest crashed: triple fault".into(),
    }))
}

/// A VM whose VMM runs, as the agent left it after a spawn long ago.
fn running() -> LocalVm {
    LocalVm {
        proc: Some(PID),
        ever_ran: true,
        loaded: true,
        generation: Some(1),
        phase: Some(VmPhase::Running),
        started_at: Some(wall() - k8s_openapi::jiff::SignedDuration::from_hours(1)),
        ..LocalVm::default()
    }
}

/// A running VM whose VMM last answered at `at`, running as wanted.
fn answered(at: Instant) -> LocalVm {
    LocalVm {
        last_answer: Some(at),
        paused: Some(PausedCond {
            paused: false,
            since: wall(),
        }),
        ..running()
    }
}

fn fresh() -> LocalVm {
    LocalVm {
        loaded: true,
        generation: Some(1),
        ..LocalVm::default()
    }
}

/// The effects as short names (Events by reason), for tables.
fn names(plan: &Plan) -> Vec<String> {
    plan.effects
        .iter()
        .map(|e| match e {
            Effect::Event(n) => format!("Event:{}", n.reason),
            Effect::Probe(d) => format!("Probe({})", d.as_millis()),
            Effect::Steer { to, .. } => format!("Steer:{to:?}"),
            Effect::Step(s, _) => format!("Step:{}", s.action()),
            Effect::MarkRestartHandled(v) => format!("MarkRestartHandled:{v}"),
            Effect::Kill(_) => "Kill".into(),
            Effect::WatchExit(_) => "WatchExit".into(),
            Effect::Booted(_) => "Booted".into(),
            other => format!("{other:?}"),
        })
        .collect()
}

fn ready_reason(local: &LocalVm) -> Option<&str> {
    local.ready.as_ref().map(|r| r.reason.as_str())
}

struct Row {
    what: &'static str,
    local: LocalVm,
    seen: Seen<'static>,
    effects: &'static [&'static str],
    phase: Option<VmPhase>,
    then: Then,
}

#[test]
#[allow(clippy::too_many_lines)] // one table
fn every_pass_of_a_vm() {
    use RunStrategy::{Halted, Manual, Once, RerunOnFailure};
    let now = Instant::now();
    let base = |vmm| seen(vmm, now);
    let ms = |m| Then::After(Duration::from_millis(m));
    let secs = |s| Then::After(Duration::from_secs(s));
    let held = |phase| LocalVm {
        held: Some(phase),
        phase: Some(phase),
        ever_ran: true,
        ..fresh()
    };
    let table = vec![
        Row {
            what: "a new Always VM starts",
            local: fresh(),
            seen: base(VmmSeen::Absent),
            effects: &["Start", "WriteStatus"],
            phase: None,
            then: ms(100),
        },
        Row {
            what: "a running VM is looked at",
            local: running(),
            seen: base(VmmSeen::Alive),
            effects: &["Probe(5000)", "WriteStatus"],
            phase: Some(VmPhase::Running),
            then: secs(10),
        },
        Row {
            what: "a VM whose VMM answered a moment ago is not asked again (the pass after the agent's own write)",
            local: answered(now.checked_sub(Duration::from_millis(500)).expect("uptime")),
            seen: base(VmmSeen::Alive),
            effects: &["WriteStatus"],
            phase: Some(VmPhase::Running),
            then: ms(9500),
        },
        Row {
            what: "... unless a pause is asked for meanwhile",
            local: answered(now.checked_sub(Duration::from_millis(500)).expect("uptime")),
            seen: Seen {
                paused_wanted: true,
                ..base(VmmSeen::Alive)
            },
            effects: &["Probe(5000)", "WriteStatus"],
            phase: Some(VmPhase::Running),
            then: secs(10),
        },
        Row {
            what: "an answer older than 2 s is asked for again",
            local: answered(now.checked_sub(Duration::from_secs(3)).expect("uptime")),
            seen: base(VmmSeen::Alive),
            effects: &["Probe(5000)", "WriteStatus"],
            phase: Some(VmPhase::Running),
            then: secs(10),
        },
        Row {
            what: "Halted while running: ACPI shutdown",
            local: running(),
            seen: Seen {
                strategy: Halted,
                ..base(VmmSeen::Alive)
            },
            effects: &["RequestShutdown", "Event:Stopping", "WriteStatus"],
            phase: Some(VmPhase::Stopping),
            then: ms(500),
        },
        Row {
            what: "deleted while running: ACPI shutdown",
            local: running(),
            seen: Seen {
                deleting: true,
                ..base(VmmSeen::Alive)
            },
            effects: &["RequestShutdown", "Event:Stopping", "WriteStatus"],
            phase: Some(VmPhase::Stopping),
            then: ms(500),
        },
        Row {
            what: "deleted and down: released",
            local: held(VmPhase::Stopped),
            seen: Seen {
                deleting: true,
                ..base(VmmSeen::Absent)
            },
            effects: &["Release", "Event:Deleted"],
            phase: Some(VmPhase::Stopped),
            then: Then::Forget,
        },
        Row {
            what: "deleted as it crashed: released, not restarted",
            local: running(),
            seen: Seen {
                deleting: true,
                ..base(exit(code::GUEST_CRASH))
            },
            effects: &[
                "Event:GuestCrashed",
                "ForgetSocket",
                "Release",
                "Event:Deleted",
            ],
            phase: Some(VmPhase::Running),
            then: Then::Forget,
        },
        Row {
            what: "Always crashed: restart after 1s",
            local: running(),
            seen: base(exit(code::GUEST_CRASH)),
            effects: CRASHED,
            phase: Some(VmPhase::Starting),
            then: secs(1),
        },
        Row {
            what: "RerunOnFailure crashed: restart after 1s",
            local: running(),
            seen: Seen {
                strategy: RerunOnFailure,
                ..base(exit(code::GUEST_CRASH))
            },
            effects: CRASHED,
            phase: Some(VmPhase::Starting),
            then: secs(1),
        },
        Row {
            what: "Once crashed: Failed",
            local: running(),
            seen: Seen {
                strategy: Once,
                ..base(exit(code::GUEST_CRASH))
            },
            effects: CRASHED,
            phase: Some(VmPhase::Failed),
            then: secs(30),
        },
        Row {
            what: "Manual crashed: Failed",
            local: running(),
            seen: Seen {
                strategy: Manual,
                ..base(exit(code::GUEST_CRASH))
            },
            effects: CRASHED,
            phase: Some(VmPhase::Failed),
            then: secs(30),
        },
        Row {
            what: "Once powered off: Succeeded",
            local: running(),
            seen: Seen {
                strategy: Once,
                ..base(exit(code::POWER_OFF))
            },
            effects: &["Event:GuestPoweredOff", "ForgetSocket", "WriteStatus"],
            phase: Some(VmPhase::Succeeded),
            then: secs(30),
        },
        Row {
            what: "Manual powered off: Stopped",
            local: running(),
            seen: Seen {
                strategy: Manual,
                ..base(exit(code::POWER_OFF))
            },
            effects: &["Event:GuestPoweredOff", "ForgetSocket", "WriteStatus"],
            phase: Some(VmPhase::Stopped),
            then: secs(30),
        },
        Row {
            what: "a reboot after a long run: started again at once",
            local: running(),
            seen: base(exit(code::REBOOT)),
            effects: &[
                "Event:GuestRebooted",
                "ForgetSocket",
                "Start",
                "WriteStatus",
            ],
            phase: Some(VmPhase::Starting),
            then: ms(100),
        },
        Row {
            what: "the VMM vanished without a record",
            local: running(),
            seen: base(VmmSeen::Ended(None)),
            effects: &["Event:VmmFailed", "ForgetSocket", "WriteStatus"],
            phase: Some(VmPhase::Starting),
            then: secs(1),
        },
        Row {
            what: "restart asked while running: the stop first",
            local: running(),
            seen: Seen {
                restart: Some("r1"),
                ..base(VmmSeen::Alive)
            },
            effects: &["RequestShutdown", "Event:Stopping", "WriteStatus"],
            phase: Some(VmPhase::Stopping),
            then: ms(500),
        },
        Row {
            what: "start asked of a stopped Manual VM: the phase, then the request handled",
            local: held(VmPhase::Stopped),
            seen: Seen {
                strategy: Manual,
                restart: Some("r2"),
                ..base(VmmSeen::Absent)
            },
            effects: &["Start", "WriteStatus", "MarkRestartHandled:r2"],
            phase: Some(VmPhase::Stopped),
            then: ms(100),
        },
        Row {
            what: "a request handled here, shown unmarked by a lagging watch: not run twice, marked again",
            local: LocalVm {
                restart_handled: Some("r2".into()),
                ..held(VmPhase::Stopped)
            },
            seen: Seen {
                strategy: Manual,
                restart: Some("r2"),
                ..base(VmmSeen::Absent)
            },
            effects: &["WriteStatus", "MarkRestartHandled:r2"],
            phase: Some(VmPhase::Stopped),
            then: secs(30),
        },
        Row {
            what: "a newer request after one handled here: started",
            local: LocalVm {
                restart_handled: Some("r2".into()),
                ..held(VmPhase::Stopped)
            },
            seen: Seen {
                strategy: Manual,
                restart: Some("r3"),
                ..base(VmmSeen::Absent)
            },
            effects: &["Start", "WriteStatus", "MarkRestartHandled:r3"],
            phase: Some(VmPhase::Stopped),
            then: ms(100),
        },
        Row {
            what: "Manual, powered off: held",
            local: held(VmPhase::Stopped),
            seen: Seen {
                strategy: Manual,
                ..base(VmmSeen::Absent)
            },
            effects: &["WriteStatus"],
            phase: Some(VmPhase::Stopped),
            then: secs(30),
        },
        Row {
            what: "Halted and down: held Stopped",
            local: fresh(),
            seen: Seen {
                strategy: Halted,
                ..base(VmmSeen::Absent)
            },
            effects: &["WriteStatus"],
            phase: Some(VmPhase::Stopped),
            then: secs(30),
        },
        Row {
            what: "in backoff: waits",
            local: LocalVm {
                next_start: Some(now + Duration::from_secs(8)),
                ever_ran: true,
                ..fresh()
            },
            seen: base(VmmSeen::Absent),
            effects: &["WriteStatus"],
            phase: None,
            then: secs(8),
        },
        Row {
            what: "in the import poll, the image is ready: starts at once",
            local: LocalVm {
                next_start: Some(now + Duration::from_secs(5)),
                ..fresh()
            },
            seen: Seen {
                image_ready: true,
                ..base(VmmSeen::Absent)
            },
            effects: &["Start", "WriteStatus"],
            phase: None,
            then: ms(100),
        },
        Row {
            what: "a new spec after failed preparations: starts at once",
            local: LocalVm {
                next_start: Some(now + Duration::from_secs(30)),
                prepare_failures: 4,
                held: Some(VmPhase::Failed),
                ..fresh()
            },
            seen: Seen {
                generation: Some(2),
                ..base(VmmSeen::Absent)
            },
            effects: &["Start", "WriteStatus"],
            phase: None,
            then: ms(100),
        },
    ];
    for row in table {
        let mut local = row.local;
        let plan = decide(&row.seen, &mut local);
        assert_eq!(names(&plan), row.effects, "{}", row.what);
        assert_eq!(local.phase, row.phase, "{}", row.what);
        assert_eq!(plan.then, row.then, "{}", row.what);
        if matches!(row.seen.vmm, VmmSeen::Ended(_)) {
            assert_eq!(local.proc, None, "{}: the ended VMM is forgotten", row.what);
        }
    }
}

#[test]
fn a_crash_is_reported_with_its_cause_and_counted_as_a_failure() {
    let now = Instant::now();
    let mut local = running();
    decide(&seen(exit(code::GUEST_CRASH), now), &mut local);
    let ready = local.ready.as_ref().expect("ready");
    assert_eq!(ready.status, ConditionStatus::False);
    assert_eq!(ready.reason, reason::GUEST_CRASHED);
    assert!(
        ready.message.contains("the guest crashed: triple fault"),
        "{}",
        ready.message
    );
    assert_eq!(local.failure.as_ref().map(|f| f.count), Some(1));
    assert_eq!(local.next_start, Some(now + Duration::from_secs(1)));
}

#[test]
fn a_stop_escalates_from_acpi_to_force_to_kill_and_ends_stopped() {
    let t0 = Instant::now();
    let halted = |now| Seen {
        strategy: RunStrategy::Halted,
        ..seen(VmmSeen::Alive, now)
    };
    let mut local = running();
    // (when, effects)
    let steps: [(Instant, &[&str]); 5] = [
        (t0, &["RequestShutdown", "Event:Stopping", "WriteStatus"]),
        (t0 + Duration::from_secs(30), &["WriteStatus"]),
        (
            t0 + GRACE,
            &["ForceStop", "Event:ForceStopped", "WriteStatus"],
        ),
        (t0 + GRACE + Duration::from_secs(1), &["WriteStatus"]),
        (
            t0 + GRACE + lifecycle::FORCE_STOP_TIMEOUT,
            &["Kill", "WriteStatus"],
        ),
    ];
    for (i, (now, want)) in steps.into_iter().enumerate() {
        let plan = decide(&halted(now), &mut local);
        assert_eq!(names(&plan), want, "step {i}");
        assert_eq!(local.phase, Some(VmPhase::Stopping), "step {i}");
        assert_eq!(ready_reason(&local), Some(reason::STOPPING), "step {i}");
    }
    assert!(names(&decide(&halted(t0 + GRACE * 2), &mut local)).contains(&"Kill".to_string()));
    // The VMM ends: stopped by us, held Stopped, not started again.
    let end = Seen {
        strategy: RunStrategy::Halted,
        ..seen(exit(code::GUEST_CRASH + 2), t0 + GRACE * 2)
    };
    let plan = decide(&end, &mut local);
    assert_eq!(
        names(&plan),
        ["Event:Stopped", "ForgetSocket", "WriteStatus"]
    );
    assert_eq!(local.phase, Some(VmPhase::Stopped));
    assert_eq!(local.stopping, None);
}

#[test]
fn a_zero_grace_period_stops_by_force_at_once() {
    let mut local = running();
    let s = Seen {
        grace: Duration::ZERO,
        strategy: RunStrategy::Halted,
        ..seen(VmmSeen::Alive, Instant::now())
    };
    let plan = decide(&s, &mut local);
    assert_eq!(
        names(&plan),
        ["ForceStop", "Event:ForceStopped", "WriteStatus"]
    );
    let Some(Effect::Event(note)) = plan.effects.get(1) else {
        panic!("no event: {plan:?}");
    };
    assert!(note.note.contains("grace period 0"), "{}", note.note);
    assert!(note.warning);
}

#[test]
#[allow(clippy::too_many_lines)] // one table
fn what_each_start_outcome_leaves() {
    use RunStrategy::{Always, Once};
    let now = Instant::now();
    let importing = LocalVm {
        importing_since: Some(now.checked_sub(Duration::from_secs(3)).unwrap_or(now)),
        ..fresh()
    };
    let spawned = || Started::Spawned {
        pid: PID,
        interfaces: Vec::new(),
    };
    // (what, strategy, record before, outcome, effects, phase, held, Ready reason, then)
    #[rustfmt::skip]
    let table: Vec<(&str, RunStrategy, LocalVm, Started, &[&str], Option<VmPhase>, Option<VmPhase>, &str, Then)> = vec![
        ("first start", Always, fresh(), spawned(),
         &["WatchExit", "Probe(1000)"], Some(VmPhase::Starting), None, reason::STARTING, Then::After(AFTER_START)),
        ("a restart is counted", Always, LocalVm { ever_ran: true, ..fresh() }, spawned(),
         &["CountRestart", "WatchExit", "Probe(1000)"], Some(VmPhase::Starting), None, reason::STARTING, Then::After(AFTER_START)),
        ("after an import, its duration", Always, importing.clone(), spawned(),
         &["Step:ImageImport", "WatchExit", "Probe(1000)"], Some(VmPhase::Starting), None, reason::STARTING, Then::After(AFTER_START)),
        ("an image imports", Always, fresh(), Started::ImagesImporting("42%".into()),
         &[], Some(VmPhase::Scheduled), None, reason::IMAGE_IMPORTING, Then::After(IMPORT_POLL)),
        ("an image failed: retried, not held", Always, importing.clone(), Started::ImagesFailed("404".into()),
         &["Event:ImageFailed"], Some(VmPhase::Failed), None, reason::IMAGE_FAILED, Then::After(Duration::from_secs(1))),
        ("preparation failed: held Failed, retried", Always, fresh(),
         Started::PrepareFailed { reason: reason::HOST_SETUP_FAILED, message: "no bridge br9".into() },
         &["Event:HostSetupFailed"], Some(VmPhase::Failed), Some(VmPhase::Failed), reason::HOST_SETUP_FAILED, Then::After(Duration::from_secs(1))),
        ("spawn failed under Always: restarted", Always, fresh(), Started::SpawnFailed("ENOENT".into()),
         &["Event:VmmFailed"], Some(VmPhase::Starting), None, reason::VMM_FAILED, Then::After(Duration::from_secs(1))),
        ("spawn failed under Once: Failed", Once, fresh(), Started::SpawnFailed("ENOENT".into()),
         &["Event:VmmFailed"], Some(VmPhase::Failed), Some(VmPhase::Failed), reason::VMM_FAILED, Then::After(OBSERVE_EVERY)),
    ];
    for (what, strategy, mut local, outcome, effects, phase, held, ready, then) in table {
        let s = Seen {
            strategy,
            ..seen(VmmSeen::Absent, now)
        };
        let was_ever_ran = local.ever_ran;
        let spawned_now = matches!(outcome, Started::Spawned { .. });
        let plan = started(&s, &mut local, outcome);
        assert_eq!(names(&plan), effects, "{what}");
        assert_eq!(local.phase, phase, "{what}");
        assert_eq!(local.held, held, "{what}");
        assert_eq!(ready_reason(&local), Some(ready), "{what}");
        assert_eq!(plan.then, then, "{what}");
        if spawned_now {
            assert_eq!(local.proc, Some(PID), "{what}");
            assert!(local.ever_ran, "{what}");
            assert_eq!(local.restarts, i32::from(was_ever_ran), "{what}");
            assert_eq!(local.started_at, Some(wall()), "{what}");
            assert!(
                local
                    .transitions
                    .iter()
                    .any(|t| t.phase == VmPhase::Starting),
                "{what}: Starting is recorded though it may never be written alone"
            );
        }
    }
}

#[test]
fn repeated_preparation_failures_back_off() {
    let now = Instant::now();
    let mut local = fresh();
    let mut delays = Vec::new();
    for _ in 0..4 {
        let plan = started(
            &seen(VmmSeen::Absent, now),
            &mut local,
            Started::PrepareFailed {
                reason: reason::INVALID_SPEC,
                message: "spec.disks[0]: not allowed".into(),
            },
        );
        delays.push(plan.then);
    }
    let secs = |s| Then::After(Duration::from_secs(s));
    assert_eq!(delays, [secs(1), secs(2), secs(4), secs(8)]);
    assert_eq!(local.failure.as_ref().map(|f| f.count), Some(4));
}

#[test]
fn pause_and_resume_follow_the_spec() {
    use GuestState::{Paused, Running};
    let now = Instant::now();
    // (what, spec.paused, phase before, answer, effects, phase after, Ready status)
    #[rustfmt::skip]
    let table: [(&str, bool, Option<VmPhase>, Option<GuestState>, &[&str], Option<VmPhase>); 7] = [
        ("no answer yet: starting", false, Some(VmPhase::Starting), None, &[], Some(VmPhase::Starting)),
        ("no answer from a running VM: phase kept", false, Some(VmPhase::Running), None, &[], Some(VmPhase::Running)),
        ("no answer from a paused VM: phase kept", true, Some(VmPhase::Paused), None, &[], Some(VmPhase::Paused)),
        ("runs as wanted", false, Some(VmPhase::Starting), Some(Running), &["ReadStats"], Some(VmPhase::Running)),
        ("paused as wanted", true, Some(VmPhase::Running), Some(Paused), &["ReadStats"], Some(VmPhase::Paused)),
        ("runs, pause wanted: steered", true, Some(VmPhase::Running), Some(Running), &["Steer:Paused"], Some(VmPhase::Running)),
        ("paused, run wanted: steered", false, Some(VmPhase::Paused), Some(Paused), &["Steer:Running"], Some(VmPhase::Paused)),
    ];
    for (what, paused_wanted, phase, answer, effects, after) in table {
        let s = Seen {
            paused_wanted,
            ..seen(VmmSeen::Alive, now)
        };
        let mut local = LocalVm { phase, ..running() };
        let plan = probed(&s, &mut local, answer);
        assert_eq!(names(&plan), effects, "{what}");
        assert_eq!(local.phase, after, "{what}");
    }
}

#[test]
fn settling_reports_the_vcpus_state_and_the_boot_once() {
    let t0 = Instant::now();
    let mut local = LocalVm {
        spawned: Some(t0),
        ..running()
    };
    let plan = settled(
        &seen(VmmSeen::Alive, t0 + Duration::from_millis(8)),
        &mut local,
        GuestState::Running,
    );
    assert_eq!(plan.effects[0], Effect::Booted(Duration::from_millis(8)));
    assert_eq!(
        names(&plan),
        ["Booted"],
        "Running is said before the counters are read"
    );
    assert_eq!(
        local.ready.as_ref().map(|r| r.status),
        Some(ConditionStatus::True)
    );
    assert_eq!(local.paused.map(|p| p.paused), Some(false));
    // Paused a second later: the boot not counted again, the counters read.
    let later = seen(VmmSeen::Alive, t0 + Duration::from_secs(1));
    let plan = settled(&later, &mut local, GuestState::Paused);
    assert_eq!(names(&plan), ["ReadStats"]);
    assert_eq!(local.phase, Some(VmPhase::Paused));
    assert_eq!(ready_reason(&local), Some(reason::PAUSED));
    assert_eq!(
        local.paused,
        Some(PausedCond {
            paused: true,
            since: wall()
        })
    );
    // Not again within ten seconds; then again.
    let soon = seen(VmmSeen::Alive, t0 + Duration::from_secs(2));
    assert!(settled(&soon, &mut local, GuestState::Paused)
        .effects
        .is_empty());
    let plan = settled(
        &seen(VmmSeen::Alive, t0 + Duration::from_secs(1) + OBSERVE_EVERY),
        &mut local,
        GuestState::Paused,
    );
    assert_eq!(names(&plan), ["ReadStats"]);
}

#[test]
fn an_agent_restart_takes_over_what_the_status_says() {
    let now = Instant::now();
    let status = |phase: &str| -> VirtualMachineStatus {
        serde_json::from_value(serde_json::json!({
            "phase": phase, "restartCount": 2, "startedAt": "2026-12-06T11:00:00Z",
        }))
        .expect("status")
    };
    // (what, strategy, phase in status, VMM found, effects, phase after)
    #[rustfmt::skip]
    let table: [(&str, RunStrategy, &str, VmmSeen, &[&str], VmPhase); 4] = [
        ("its VMM still runs: looked at, not started", RunStrategy::Always, "Running", VmmSeen::Alive, &["Probe(5000)", "WriteStatus"], VmPhase::Running),
        ("its VMM ended while no agent watched", RunStrategy::Always, "Running", exit(code::GUEST_CRASH), &["Event:GuestCrashed", "ForgetSocket", "WriteStatus"], VmPhase::Starting),
        ("a Manual VM that was stopped stays stopped", RunStrategy::Manual, "Stopped", VmmSeen::Absent, &["WriteStatus"], VmPhase::Stopped),
        ("a Once VM that succeeded is not run again", RunStrategy::Once, "Succeeded", VmmSeen::Absent, &["WriteStatus"], VmPhase::Succeeded),
    ];
    for (what, strategy, phase, vmm, effects, after) in table {
        let mut local = LocalVm::default();
        local.take_over(status(phase));
        if vmm != VmmSeen::Absent {
            local.proc = Some(PID);
        }
        let s = Seen {
            strategy,
            ..seen(vmm, now)
        };
        let plan = decide(&s, &mut local);
        assert_eq!(names(&plan), effects, "{what}");
        assert_eq!(local.phase, Some(after), "{what}");
        assert_eq!(local.restarts, 2, "{what}: the count goes on");
    }
}
