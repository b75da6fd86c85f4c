//! The agent's decision core for one VM: from what a pass observed
//! ([`Seen`]) and the agent's record of the VM ([`LocalVm`]), the record's
//! next state and the effects to carry out ([`Plan`]).
//!
//! An effect whose outcome matters hands it back to a pure follow-up here:
//! [`Effect::Start`]'s outcome to [`started`], [`Effect::Probe`]'s answer to
//! [`probed`], [`Effect::Steer`]'s result to [`settled`]. Their plans run
//! before the rest of the pass. No I/O: `reconcile.rs` observes and
//! executes. Every transition is table-tested below.

use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kubevmm_crds::contract::{reason, ConditionStatus};
use kubevmm_crds::events::Note;
use kubevmm_crds::printable::PhaseTransition;
use kubevmm_crds::vm::InterfaceStatus;
use kubevmm_crds::{RunStrategy, VmPhase};

pub use super::lifecycle::GuestState;
use super::lifecycle::{self, AfterExit, Ended, Move, Observed, StartStep, StopAction};
use super::local::{set_failed, set_ready, LocalVm, PausedCond};
use super::supervisor::{ExitRecord, ProcessId};

/// How long the first look at a new VMM waits for its answer: the agent
/// bound the control socket, so a request waits until the VMM serves it,
/// once its vCPUs run, and the first status can say Running at once.
pub const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(1);
/// How long a look at a running VMM waits for its answer.
pub const PROBE_WAIT: Duration = Duration::from_secs(5);
/// How often a running VM is looked at, and its counters read.
pub const OBSERVE_EVERY: Duration = Duration::from_secs(10);
/// An answer younger than this stands for a look: a pass that only follows
/// the agent's own status write asks the VMM nothing.
const ANSWER_FRESH: Duration = Duration::from_secs(2);
/// How soon a VM whose VMM does not answer yet is looked at again.
const STARTING_POLL: Duration = Duration::from_millis(50);
/// How soon a stop is taken to its next step.
const STOP_POLL: Duration = Duration::from_millis(500);
/// How soon a pass follows a start.
const AFTER_START: Duration = Duration::from_millis(100);
/// How often a VM kept down is looked at (a change wakes it sooner).
const HOLD_RECHECK: Duration = Duration::from_secs(30);
/// How often an image import's progress is read into the status.
const IMPORT_POLL: Duration = Duration::from_secs(5);

/// What became of the VM's VMM since the last pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmSeen {
    /// None runs here.
    Absent,
    /// It runs.
    Alive,
    /// It ended; the shim's record of how, when it wrote one.
    Ended(Option<ExitRecord>),
}

/// What a pass observed of one VM.
#[derive(Debug, Clone)]
pub struct Seen<'a> {
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// `spec.runStrategy`.
    pub strategy: RunStrategy,
    /// `spec.paused`.
    pub paused_wanted: bool,
    /// A restart request not handled yet (its annotation value).
    pub restart: Option<&'a str>,
    /// The stop grace period (spec, or the stop request's).
    pub grace: Duration,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The VMM.
    pub vmm: VmmSeen,
    /// An image import the VM waited for just ended.
    pub image_ready: bool,
    /// `status.phaseTransitionTimestamps` as the API server has them.
    pub live_transitions: &'a [PhaseTransition],
    /// `metadata.creationTimestamp`.
    pub created: Option<Timestamp>,
    /// Now, on the monotonic clock.
    pub now: Instant,
    /// Now, on the wall clock.
    pub wall: Timestamp,
}

impl Seen<'_> {
    /// The same observation at a later time (a follow-up after an effect).
    #[must_use]
    pub fn at(&self, now: Instant, wall: Timestamp) -> Self {
        Self {
            now,
            wall,
            ..self.clone()
        }
    }
}

/// A side effect for `reconcile.rs` to carry out, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Prepare the host and spawn the VMM; the outcome goes to [`started`].
    Start,
    /// Ask the VMM what its vCPUs do, waiting up to this long; the answer
    /// (none on timeout) goes to [`probed`].
    Probe(Duration),
    /// Pause or resume the vCPUs; what they then do goes to [`settled`]
    /// (`to` when the VMM did it, else `from`).
    Steer {
        /// What they do now.
        from: GuestState,
        /// What the spec wants.
        to: GuestState,
    },
    /// Watch the VMM process and wake the VM when it ends.
    WatchExit(ProcessId),
    /// Ask the guest to power off (ACPI).
    RequestShutdown,
    /// Stop the vCPUs and the VMM now.
    ForceStop,
    /// SIGKILL the VMM.
    Kill(ProcessId),
    /// Remove an ended VMM's control socket.
    ForgetSocket,
    /// Read the VMM's counters into the metrics.
    ReadStats,
    /// The vCPUs run this long after the spawn (boot metric, start step).
    Booted(Duration),
    /// The guest was started again: count it in the metrics.
    CountRestart,
    /// A start step took this long (an Event past the threshold).
    Step(StartStep, Duration),
    /// Release the VM's host resources, then its finalizer.
    Release,
    /// Publish an Event about the VM.
    Event(Note),
    /// Write the agent's part of the status.
    WriteStatus,
    /// Record the restart request (this annotation value) as handled.
    MarkRestartHandled(String),
}

/// When the VM is looked at again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// After this long (or sooner, on a change).
    After(Duration),
    /// Never: it is gone from this node.
    Forget,
}

/// The effects of a pass, and when the next one is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// In order.
    pub effects: Vec<Effect>,
    /// The next pass.
    pub then: Then,
}

impl Plan {
    fn after(effects: Vec<Effect>, d: Duration) -> Self {
        Self {
            effects,
            then: Then::After(d),
        }
    }
}

/// What starting the VM came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// An image it boots from is being imported (the message says how far).
    ImagesImporting(String),
    /// An image it boots from failed to import.
    ImagesFailed(String),
    /// Its disks, network or cgroups could not be prepared.
    PrepareFailed {
        /// Condition reason.
        reason: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The VMM could not be spawned.
    SpawnFailed(String),
    /// The VMM runs.
    Spawned {
        /// Its process.
        pid: ProcessId,
        /// Its interfaces.
        interfaces: Vec<InterfaceStatus>,
    },
}

/// An agent Event: folded into one series only when its note repeats.
fn event(warning: bool, reason: &str, note: impl Into<String>) -> Effect {
    Effect::Event(Note::new(warning, reason, note).folded_by_note())
}

/// The pass for one VM: the record's next state (in `local`) and the effects.
pub fn decide(seen: &Seen<'_>, local: &mut LocalVm) -> Plan {
    let mut effects = Vec::new();
    // A new spec deserves a prompt new attempt.
    if local.generation != seen.generation {
        local.generation = seen.generation;
        if local.prepare_failures > 0 {
            local.prepare_failures = 0;
            local.next_start = None;
            local.held = None;
        }
    }
    if let VmmSeen::Ended(record) = &seen.vmm {
        vmm_ended(seen, local, record.as_ref(), &mut effects);
    }
    // A request this agent handled is not handled twice while the watch
    // still shows the VM from before its mark; the mark is written again
    // (the same value: a no-op once it landed) in case it failed.
    let (restart, unmarked) = match seen.restart {
        Some(r) if local.restart_handled.as_deref() == Some(r) => (None, Some(r)),
        r => (r, None),
    };
    let observed = Observed {
        deleting: seen.deleting,
        vmm_running: seen.vmm == VmmSeen::Alive,
        strategy: seen.strategy,
        restart_requested: restart.is_some(),
        ever_ran: local.ever_ran,
        held: local.held,
        next_start: local.next_start,
        image_ready: seen.image_ready,
        now: seen.now,
    };
    let then = match lifecycle::next_move(&observed) {
        Move::StopForDeletion | Move::Stop => {
            stop(seen, local, &mut effects);
            STOP_POLL
        }
        Move::Release => {
            effects.push(Effect::Release);
            effects.push(event(
                false,
                "Deleted",
                "the guest is stopped and its resources released",
            ));
            return Plan {
                effects,
                then: Then::Forget,
            };
        }
        Move::Observe => {
            let age = local
                .last_answer
                .map(|t| seen.now.saturating_duration_since(t));
            let as_wanted = local.paused.is_some_and(|p| p.paused == seen.paused_wanted);
            match age {
                Some(age) if age < ANSWER_FRESH && as_wanted => OBSERVE_EVERY.saturating_sub(age),
                _ => {
                    effects.push(Effect::Probe(PROBE_WAIT));
                    OBSERVE_EVERY
                }
            }
        }
        Move::Start => {
            local.next_start = None;
            effects.push(Effect::Start);
            // The new phase first: a stopped Manual VM whose request looked
            // handled while its phase still read Stopped would be released.
            if let Some(request) = restart {
                local.restart_handled = Some(request.to_string());
                effects.push(Effect::WriteStatus);
                effects.push(Effect::MarkRestartHandled(request.to_string()));
                return Plan::after(effects, AFTER_START);
            }
            AFTER_START
        }
        Move::StartAt(at) => at.saturating_duration_since(seen.now),
        Move::Hold(phase) => {
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
            HOLD_RECHECK
        }
    };
    effects.push(Effect::WriteStatus);
    effects.extend(unmarked.map(|r| Effect::MarkRestartHandled(r.to_string())));
    Plan::after(effects, then)
}

/// The VMM ended: how, from the shim's record, and what follows.
fn vmm_ended(
    seen: &Seen<'_>,
    local: &mut LocalVm,
    record: Option<&ExitRecord>,
    effects: &mut Vec<Effect>,
) {
    local.proc = None;
    let ended = record.map_or_else(
        || Ended::VmmFailure("the VMM vanished without an exit status".into()),
        |r| r.ended(local.stopping.is_some()),
    );
    local.stopping = None;
    let ran_for = local
        .started_at
        .and_then(|t| Duration::try_from(seen.wall.duration_since(t)).ok())
        .unwrap_or(Duration::ZERO);
    let after = lifecycle::after_exit(
        seen.strategy,
        &ended,
        local.restarts.max(0).unsigned_abs(),
        ran_for,
    );
    effects.push(event(ended.is_failure(), ended.reason(), ended.message()));
    effects.push(Effect::ForgetSocket);
    local.after_exit(&ended, after, seen.deleting, seen.now);
}

/// The next step of a stop: ACPI shutdown, force stop after the grace
/// period, SIGKILL when the VMM still does not exit.
fn stop(seen: &Seen<'_>, local: &mut LocalVm, effects: &mut Vec<Effect>) {
    let (action, next) = lifecycle::stop_step(local.stopping, seen.grace, seen.now);
    local.stopping = Some(next);
    match action {
        Some(StopAction::RequestShutdown) => {
            effects.push(Effect::RequestShutdown);
            let note = format!(
                "ACPI shutdown requested; {}s grace period",
                seen.grace.as_secs()
            );
            effects.push(event(false, "Stopping", note));
        }
        Some(StopAction::ForceStop { grace_over }) => {
            effects.push(Effect::ForceStop);
            let note = if grace_over {
                "the guest did not power off within its grace period"
            } else {
                "stopped by force at once (grace period 0)"
            };
            effects.push(event(true, "ForceStopped", note));
        }
        Some(StopAction::Kill) => effects.extend(local.proc.map(Effect::Kill)),
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

/// What follows an attempt to start the VM.
pub fn started(seen: &Seen<'_>, local: &mut LocalVm, outcome: Started) -> Plan {
    let mut effects = Vec::new();
    if !matches!(
        outcome,
        Started::ImagesImporting(_) | Started::ImagesFailed(_)
    ) {
        if let Some(since) = local.importing_since.take() {
            let took = seen.now.saturating_duration_since(since);
            effects.push(Effect::Step(StartStep::ImageImport, took));
        }
    }
    match outcome {
        Started::ImagesImporting(message) => {
            // The import wakes the VM when it ends; the poll refreshes the
            // progress in the message.
            local.importing_since.get_or_insert(seen.now);
            local.next_start = Some(seen.now + IMPORT_POLL);
            local.phase = Some(VmPhase::Scheduled);
            set_ready(
                local,
                ConditionStatus::False,
                reason::IMAGE_IMPORTING,
                message,
            );
            Plan::after(effects, IMPORT_POLL)
        }
        Started::ImagesFailed(message) => {
            local.importing_since = None;
            // Not held: a server error or a full disk may pass.
            let delay = retry_later(seen, local, reason::IMAGE_FAILED, &message);
            effects.push(event(true, reason::IMAGE_FAILED, message));
            Plan::after(effects, delay)
        }
        Started::PrepareFailed { reason, message } => {
            // A missing bridge may appear, a spec edit retries at once:
            // backoff, never a tight loop.
            let delay = retry_later(seen, local, reason, &message);
            local.held = Some(VmPhase::Failed);
            effects.push(event(true, reason, message));
            Plan::after(effects, delay)
        }
        Started::SpawnFailed(why) => {
            local.prepare_failures = 0;
            let ended = Ended::VmmFailure(why);
            let after = lifecycle::after_exit(
                seen.strategy,
                &ended,
                local.restarts.max(0).unsigned_abs(),
                Duration::ZERO,
            );
            let next_in = match after {
                AfterExit::Restart(d) => {
                    local.next_start = Some(seen.now + d);
                    local.phase = Some(VmPhase::Starting);
                    Some(d)
                }
                AfterExit::Stay(_) => {
                    local.held = Some(VmPhase::Failed);
                    local.phase = Some(VmPhase::Failed);
                    None
                }
            };
            set_failed(local, reason::VMM_FAILED, &ended.message(), next_in);
            effects.push(event(true, reason::VMM_FAILED, ended.message()));
            Plan::after(effects, next_in.unwrap_or(OBSERVE_EVERY))
        }
        Started::Spawned { pid, interfaces } => {
            local.prepare_failures = 0;
            if local.ever_ran {
                local.restarts = local.restarts.saturating_add(1);
                effects.push(Effect::CountRestart);
            }
            local.ever_ran = true;
            local.held = None;
            local.proc = Some(pid);
            local.spawned = Some(seen.now);
            local.started_at = Some(seen.wall);
            local.phase = Some(VmPhase::Starting);
            local.note_transition(seen.live_transitions, seen.created, seen.wall);
            local.interfaces = interfaces;
            set_ready(
                local,
                ConditionStatus::False,
                reason::STARTING,
                "the VMM is starting".into(),
            );
            effects.push(Effect::WatchExit(pid));
            effects.push(Effect::Probe(FIRST_ANSWER_WAIT));
            Plan::after(effects, AFTER_START)
        }
    }
}

/// A failed start attempt, retried after the prepare backoff: the delay.
fn retry_later(seen: &Seen<'_>, local: &mut LocalVm, reason: &str, message: &str) -> Duration {
    let delay = lifecycle::backoff(local.prepare_failures);
    local.next_start = Some(seen.now + delay);
    local.prepare_failures = local.prepare_failures.saturating_add(1);
    local.phase = Some(VmPhase::Failed);
    set_failed(local, reason, message, Some(delay));
    delay
}

/// What follows the VMM's answer about its vCPUs (`None`: no answer yet).
pub fn probed(seen: &Seen<'_>, local: &mut LocalVm, answer: Option<GuestState>) -> Plan {
    let Some(state) = answer else {
        // The control socket is not served yet: still starting.
        if !matches!(local.phase, Some(VmPhase::Running | VmPhase::Paused)) {
            local.phase = Some(VmPhase::Starting);
        }
        return Plan::after(Vec::new(), STARTING_POLL);
    };
    let want = if seen.paused_wanted {
        GuestState::Paused
    } else {
        GuestState::Running
    };
    if state == want {
        settled(seen, local, state)
    } else {
        Plan::after(
            vec![Effect::Steer {
                from: state,
                to: want,
            }],
            OBSERVE_EVERY,
        )
    }
}

/// The vCPUs do `state`: phase, `Ready`, `Paused`, the boot figure, and
/// the counters when due.
pub fn settled(seen: &Seen<'_>, local: &mut LocalVm, state: GuestState) -> Plan {
    let mut effects = Vec::new();
    // The first look after a spawn reports Running without reading the
    // counters first (they are all but zero): one round trip less before
    // the status says Running; the next look reads them.
    local.last_answer = Some(seen.now);
    let just_booted = local.spawned.take();
    if let Some(spawned) = just_booted {
        effects.push(Effect::Booted(seen.now.saturating_duration_since(spawned)));
    }
    let paused = state == GuestState::Paused;
    if paused {
        local.phase = Some(VmPhase::Paused);
        set_ready(
            local,
            ConditionStatus::False,
            reason::PAUSED,
            "the vCPUs are paused (spec.paused)".into(),
        );
    } else {
        local.phase = Some(VmPhase::Running);
        set_ready(
            local,
            ConditionStatus::True,
            reason::GUEST_RUNNING,
            "the VMM is up and the vCPUs run".into(),
        );
    }
    let since = match local.paused {
        Some(p) if p.paused == paused => p.since,
        _ => seen.wall,
    };
    local.paused = Some(PausedCond { paused, since });
    let stats_due = local
        .last_stats
        .is_none_or(|t| seen.now.saturating_duration_since(t) >= OBSERVE_EVERY);
    if stats_due && just_booted.is_none() {
        local.last_stats = Some(seen.now);
        effects.push(Effect::ReadStats);
    }
    Plan::after(effects, OBSERVE_EVERY)
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
