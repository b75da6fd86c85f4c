//! The agent's record of one VM between reconciles, and its pure
//! transitions: taking over what the status says at first sight, the
//! `Ready` condition, failures, and what a VMM's end leaves behind (after
//! [`lifecycle::after_exit`] decided what follows). Table-tested below.

use std::time::{Duration, Instant};

use k8s_openapi::jiff::{SignedDuration, Timestamp, Unit};
use kubevmm_crds::contract::{condition, ConditionStatus};
use kubevmm_crds::printable::{record_transition, FailureRecord, PhaseTransition};
use kubevmm_crds::vm::InterfaceStatus;
use kubevmm_crds::{VirtualMachineStatus, VmPhase};

use super::lifecycle::{AfterExit, Ended, Stop};
use super::supervisor::ProcessId;

/// The agent's `Ready` condition.
#[derive(Debug, Clone)]
pub struct ReadyCond {
    /// True only while the vCPUs run.
    pub status: ConditionStatus,
    /// Why (docs/api.md lists every reason).
    pub reason: String,
    /// What happened, for people.
    pub message: String,
    /// When `status` last changed.
    pub since: Timestamp,
}

/// The agent's `Paused` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PausedCond {
    /// The vCPUs are paused (`spec.paused`).
    pub paused: bool,
    /// When `paused` last changed.
    pub since: Timestamp,
}

/// What the agent knows about one VM between reconciles.
#[derive(Debug, Clone, Default)]
pub struct LocalVm {
    /// The running VMM.
    pub proc: Option<ProcessId>,
    /// When it was spawned (boot-time metric).
    pub(super) spawned: Option<Instant>,
    /// When the current run started.
    pub started_at: Option<Timestamp>,
    /// Phase last reported.
    pub phase: Option<VmPhase>,
    /// Ready condition.
    pub ready: Option<ReadyCond>,
    /// Paused condition.
    pub paused: Option<PausedCond>,
    /// `status.restartCount`.
    pub restarts: i32,
    /// `status.phaseTransitionTimestamps`.
    pub transitions: Vec<PhaseTransition>,
    /// `status.lastFailure`.
    pub failure: Option<FailureRecord>,
    /// Since when the VM waits for an image import.
    pub(super) importing_since: Option<Instant>,
    /// How far a stop requested by the agent has gone.
    pub(super) stopping: Option<Stop>,
    /// No start before this instant (backoff, image poll).
    pub(super) next_start: Option<Instant>,
    /// The phase the last run left it in, when no restart followed.
    pub(super) held: Option<VmPhase>,
    /// Consecutive failures to prepare the VM (backoff between retries).
    pub(super) prepare_failures: u32,
    /// The restart request this agent last handled: the watch may show the
    /// VM without its "handled" mark for a moment after the write.
    pub(super) restart_handled: Option<String>,
    /// The spec generation last acted on.
    pub(super) generation: Option<i64>,
    /// It ran on this node before.
    pub(super) ever_ran: bool,
    /// `status.interfaces`.
    pub interfaces: Vec<InterfaceStatus>,
    /// When the VMM's counters were last read.
    pub(super) last_stats: Option<Instant>,
    /// When the VMM last said what its vCPUs do.
    pub(super) last_answer: Option<Instant>,
    /// Filled from the VM's status (first sight by this agent process).
    pub(super) loaded: bool,
}

/// Sets `Ready`, keeping its transition time while its status holds.
pub fn set_ready(local: &mut LocalVm, status: ConditionStatus, reason: &str, message: String) {
    let since = match &local.ready {
        Some(r) if r.status == status => r.since,
        _ => Timestamp::now(),
    };
    local.ready = Some(ReadyCond {
        status,
        reason: reason.into(),
        message,
        since,
    });
}

/// Records a failure (counted when it repeats the last one) and reports it
/// once in `Ready`, with when the next attempt is due.
pub fn set_failed(local: &mut LocalVm, reason: &str, message: &str, next_in: Option<Duration>) {
    let now = Timestamp::now();
    let rec = FailureRecord::after(local.failure.as_ref(), reason, message, now);
    let mut text = rec.summary();
    if let Some(delay) = next_in {
        let at = SignedDuration::try_from(delay)
            .ok()
            .and_then(|d| now.checked_add(d).ok())
            .and_then(|t| t.round(Unit::Second).ok())
            .unwrap_or(now);
        text = format!("{text}; next start at {at} (in {}s)", delay.as_secs());
    }
    local.failure = Some(rec);
    set_ready(local, ConditionStatus::False, reason, text);
}

impl LocalVm {
    /// First sight of a VM by this agent process: its counters, phase,
    /// conditions and interfaces as the status has them.
    pub fn take_over(&mut self, status: VirtualMachineStatus) {
        self.loaded = true;
        self.restarts = status.restart_count;
        self.started_at = status.started_at.map(|t| t.0);
        self.phase = status.phase;
        self.interfaces = status.interfaces;
        self.transitions = status.phase_transition_timestamps;
        self.failure = status.last_failure;
        self.ever_ran = self.started_at.is_some();
        if let Some(phase @ (VmPhase::Stopped | VmPhase::Succeeded | VmPhase::Failed)) =
            status.phase
        {
            self.held = Some(phase);
        }
        for c in status.conditions {
            if c.type_ == condition::READY {
                self.ready = Some(ReadyCond {
                    status: ConditionStatus::parse(&c.status),
                    reason: c.reason,
                    message: c.message,
                    since: c.last_transition_time.0,
                });
            } else if c.type_ == condition::PAUSED {
                self.paused = Some(PausedCond {
                    paused: ConditionStatus::parse(&c.status) == ConditionStatus::True,
                    since: c.last_transition_time.0,
                });
            }
        }
    }

    /// Records the local phase as a transition at `now` (after the newest
    /// of the local and the live history `live`), for the next status
    /// write: a phase that is never written on its own (Starting, when the
    /// VMM answers at once) still shows in `phaseTransitionTimestamps`.
    pub fn note_transition(
        &mut self,
        live: &[PhaseTransition],
        created: Option<Timestamp>,
        now: Timestamp,
    ) {
        self.transitions = record_transition(
            &super::status_body::newest_transitions(&self.transitions, live),
            self.phase,
            created,
            now,
        );
    }

    /// What the end of a run (`ended`, and `after`, what
    /// [`lifecycle::after_exit`] made of it) leaves: the next start and the
    /// phase to report, or the phase it stays in, and why in `Ready`. A VM
    /// being deleted is not started again.
    pub fn after_exit(&mut self, ended: &Ended, after: AfterExit, deleting: bool, now: Instant) {
        match after {
            AfterExit::Restart(delay) if !deleting => {
                self.next_start = Some(now + delay);
                self.held = None;
                self.phase = Some(VmPhase::Starting);
                if ended.is_failure() {
                    set_failed(self, ended.reason(), &ended.message(), Some(delay));
                } else {
                    set_ready(
                        self,
                        ConditionStatus::False,
                        ended.reason(),
                        format!("{}; next start in {}s", ended.message(), delay.as_secs()),
                    );
                }
            }
            AfterExit::Restart(_) => {}
            AfterExit::Stay(phase) => {
                self.held = Some(phase);
                self.phase = Some(phase);
                if ended.is_failure() {
                    set_failed(self, ended.reason(), &ended.message(), None);
                } else {
                    set_ready(
                        self,
                        ConditionStatus::False,
                        ended.reason(),
                        ended.message(),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::lifecycle;
    use kubevmm_crds::RunStrategy;

    const LONG: Duration = Duration::from_secs(3600);

    /// strategy, how it ended, deleting | phase, held, starts again, Ready
    /// reason, failures recorded.
    type Row = (
        RunStrategy,
        Ended,
        bool,
        Option<VmPhase>,
        Option<VmPhase>,
        bool,
        Option<&'static str>,
        i32,
    );

    #[test]
    fn what_the_end_of_a_run_leaves_under_each_run_strategy() {
        use RunStrategy::{Always, Halted, Manual, Once, RerunOnFailure};
        let crash = Ended::Crash("triple fault".into());
        let now = Instant::now();
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            (Always, crash.clone(), false, Some(VmPhase::Starting), None, true, Some(crash.reason()), 1),
            (Always, Ended::PowerOff, false, Some(VmPhase::Starting), None, true, Some(Ended::PowerOff.reason()), 0),
            (RerunOnFailure, crash.clone(), false, Some(VmPhase::Starting), None, true, Some(crash.reason()), 1),
            (RerunOnFailure, Ended::PowerOff, false, Some(VmPhase::Succeeded), Some(VmPhase::Succeeded), false, Some(Ended::PowerOff.reason()), 0),
            (Once, crash.clone(), false, Some(VmPhase::Failed), Some(VmPhase::Failed), false, Some(crash.reason()), 1),
            (Once, Ended::PowerOff, false, Some(VmPhase::Succeeded), Some(VmPhase::Succeeded), false, Some(Ended::PowerOff.reason()), 0),
            (Manual, Ended::PowerOff, false, Some(VmPhase::Stopped), Some(VmPhase::Stopped), false, Some(Ended::PowerOff.reason()), 0),
            (Manual, crash.clone(), false, Some(VmPhase::Failed), Some(VmPhase::Failed), false, Some(crash.reason()), 1),
            (Halted, Ended::StoppedByUs, false, Some(VmPhase::Stopped), Some(VmPhase::Stopped), false, Some(Ended::StoppedByUs.reason()), 0),
            (Once, Ended::Reboot, false, Some(VmPhase::Starting), None, true, Some(Ended::Reboot.reason()), 0),
            // Being deleted: an Always VM is not scheduled to start again.
            (Always, crash.clone(), true, None, None, false, None, 0),
        ];
        for (strategy, ended, deleting, phase, held, again, ready, failures) in table {
            let mut local = LocalVm::default();
            let after = lifecycle::after_exit(strategy, &ended, 0, LONG);
            local.after_exit(&ended, after, deleting, now);
            let case = format!("{strategy:?} {ended:?} deleting={deleting}");
            assert_eq!(local.phase, phase, "{case}");
            assert_eq!(local.held, held, "{case}");
            assert_eq!(local.next_start.is_some(), again, "{case}");
            assert_eq!(
                local.ready.as_ref().map(|r| r.reason.as_str()),
                ready,
                "{case}"
            );
            if ready.is_some() {
                assert_eq!(
                    local.ready.as_ref().map(|r| r.status),
                    Some(ConditionStatus::False),
                    "{case}"
                );
            }
            assert_eq!(
                local.failure.as_ref().map_or(0, |f| f.count),
                failures,
                "{case}"
            );
        }
    }

    #[test]
    fn a_restart_says_when_the_next_start_is() {
        let mut local = LocalVm::default();
        let ended = Ended::Crash("triple fault".into());
        local.after_exit(
            &ended,
            AfterExit::Restart(Duration::from_secs(4)),
            false,
            Instant::now(),
        );
        let msg = &local.ready.as_ref().expect("ready").message;
        assert!(msg.contains("(in 4s)"), "{msg}");
    }

    #[test]
    fn first_sight_takes_over_the_status() {
        let status: VirtualMachineStatus = serde_json::from_value(serde_json::json!({
            "phase": "Succeeded", "restartCount": 3, "startedAt": "2026-01-01T00:00:00Z",
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "GuestPoweredOff", "message": "m",
                 "lastTransitionTime": "2026-01-01T00:00:01Z"},
                {"type": "Paused", "status": "True", "reason": "PausedByUser", "message": "spec.paused",
                 "lastTransitionTime": "2026-01-01T00:00:02Z"}
            ]
        }))
        .expect("status");
        let mut local = LocalVm::default();
        local.take_over(status);
        assert!(local.loaded && local.ever_ran);
        assert_eq!(local.restarts, 3);
        assert_eq!(local.held, Some(VmPhase::Succeeded));
        assert_eq!(
            local.ready.as_ref().map(|r| r.status),
            Some(ConditionStatus::False)
        );
        assert_eq!(local.paused.map(|p| p.paused), Some(true));
    }
}
