//! Pure lifecycle decisions of the node agent: given the VM's spec and what
//! happened to its VMM, what should happen next and which phase to report.
//! No I/O here, so every rule is unit-tested.

use std::time::{Duration, Instant};

use kubevmm_crds::contract::reason;
use kubevmm_crds::{RunStrategy, VmPhase};

/// First restart delay of the capped exponential backoff.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest restart delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// A guest that reboots sooner than this after starting is in a reboot loop:
/// its next start backs off like a crash instead of following at once.
pub const REBOOT_LOOP_WINDOW: Duration = Duration::from_secs(10);

/// How a VMM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The guest powered off (ACPI S5): a clean exit.
    PowerOff,
    /// The guest asked for a reboot and the VMM exited for us to restart it.
    Reboot,
    /// The guest crashed (triple fault, unemulated instruction, panic).
    Crash(String),
    /// The VMM failed or vanished (config error, killed, missing files).
    VmmFailure(String),
    /// We asked for an ACPI shutdown and the guest powered off.
    ShutDownByUs,
    /// We stopped it by force (grace period over, or no control socket).
    StoppedByUs,
}

impl Ended {
    /// Whether the run counts as a failure for `RerunOnFailure`/`Once`.
    pub fn is_failure(&self) -> bool {
        matches!(self, Self::Crash(_) | Self::VmmFailure(_))
    }

    /// Condition reason for `Ready=False` after this ending.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::PowerOff => reason::GUEST_POWERED_OFF,
            Self::Reboot => reason::GUEST_REBOOTED,
            Self::Crash(_) => reason::GUEST_CRASHED,
            Self::VmmFailure(_) => reason::VMM_FAILED,
            Self::ShutDownByUs => reason::SHUT_DOWN,
            Self::StoppedByUs => reason::STOPPED,
        }
    }

    /// Human message for conditions and events.
    pub fn message(&self) -> String {
        match self {
            Self::PowerOff => "the guest powered off".into(),
            Self::Reboot => "the guest rebooted".into(),
            Self::Crash(why) => {
                // The VMM says it in its own words ("kubevmm-vmm: guest
                // crashed: triple fault ..."): keep only the cause.
                let why = why.strip_prefix("kubevmm-vmm: ").unwrap_or(why);
                let why = why.strip_prefix("guest crashed: ").unwrap_or(why);
                format!("the guest crashed: {why}")
            }
            Self::VmmFailure(why) => format!("the VMM failed: {why}"),
            Self::ShutDownByUs => "the guest powered off after an ACPI shutdown request".into(),
            Self::StoppedByUs => "the guest was stopped by force".into(),
        }
    }
}

/// What to do after a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Start the guest again after this delay.
    Restart(Duration),
    /// Stay down, reporting this terminal phase.
    Stay(VmPhase),
}

/// Backoff before restart number `restarts` (0-based): 1s, 2s, 4s, … 60s.
pub fn backoff(restarts: u32) -> Duration {
    BACKOFF_BASE
        .checked_mul(1u32.checked_shl(restarts.min(16)).unwrap_or(u32::MAX))
        .map_or(BACKOFF_CAP, |d| d.min(BACKOFF_CAP))
}

/// Decides what follows the end of a run, per `runStrategy`.
///
/// `restarts` is how many times the guest was restarted already (for the
/// backoff), `ran_for` how long the run that ended lasted. A reboot is
/// honoured at once (the guest asked for it), except under `Halted` and in
/// a reboot loop (a run shorter than [`REBOOT_LOOP_WINDOW`]), which backs off.
pub fn after_exit(
    strategy: RunStrategy,
    ended: &Ended,
    restarts: u32,
    ran_for: Duration,
) -> AfterExit {
    use AfterExit::{Restart, Stay};
    match (strategy, ended) {
        (RunStrategy::Halted, _) | (_, Ended::StoppedByUs | Ended::ShutDownByUs) => {
            Stay(VmPhase::Stopped)
        }
        (_, Ended::Reboot) if ran_for < REBOOT_LOOP_WINDOW => Restart(backoff(restarts)),
        (_, Ended::Reboot) => Restart(Duration::ZERO),
        (RunStrategy::Always, _) => Restart(backoff(restarts)),
        (RunStrategy::RerunOnFailure, e) if e.is_failure() => Restart(backoff(restarts)),
        (RunStrategy::RerunOnFailure | RunStrategy::Once, Ended::PowerOff) => {
            Stay(VmPhase::Succeeded)
        }
        (RunStrategy::Manual, Ended::PowerOff) => Stay(VmPhase::Stopped),
        (_, _) => Stay(VmPhase::Failed),
    }
}

/// Whether a VM whose guest is not running should be started now.
///
/// `held` is the phase the last run left it in when no restart followed
/// (`Stopped`, `Succeeded`, `Failed`); `ever_ran` whether it ran before.
pub fn should_start(
    strategy: RunStrategy,
    ever_ran: bool,
    held: Option<VmPhase>,
    restart_requested: bool,
) -> bool {
    match (strategy, held) {
        (RunStrategy::Halted, _) => false,
        _ if restart_requested => true,
        // Always runs whatever ended the last run; RerunOnFailure after a
        // Halted stop, or when it never ran.
        (RunStrategy::RerunOnFailure, Some(VmPhase::Stopped) | None) | (RunStrategy::Always, _) => {
            true
        }
        (_, Some(_)) => false,
        (RunStrategy::Manual | RunStrategy::Once, None) => !ever_ran,
    }
}

/// How long a force-stopped VMM gets to exit before SIGKILL.
pub const FORCE_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How far a stop has gone: ACPI shutdown → force stop → SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The ACPI shutdown was requested at `since`; the grace period runs
    /// from there (it is read anew on every pass, so a shorter one asked
    /// for meanwhile, e.g. `kubectl vm stop --force`, takes effect).
    Graceful { since: Instant },
    /// The VMM was told to stop the vCPUs; SIGKILL at `deadline`.
    Forced { deadline: Instant },
}

/// What a stop pass does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAction {
    /// Ask the guest to power off (ACPI).
    RequestShutdown,
    /// Stop the vCPUs and the VMM now; `grace_over` tells whether the
    /// grace period ran out (else it was zero).
    ForceStop { grace_over: bool },
    /// The VMM did not exit after the force stop: SIGKILL.
    Kill,
}

/// The next step of a stop with grace period `grace`: the action to take
/// now, if any, and how far the stop has then gone.
pub fn stop_step(
    current: Option<Stop>,
    grace: Duration,
    now: Instant,
) -> (Option<StopAction>, Stop) {
    let forced = Stop::Forced {
        deadline: now + FORCE_STOP_TIMEOUT,
    };
    match current {
        None if grace.is_zero() => (Some(StopAction::ForceStop { grace_over: false }), forced),
        None => (
            Some(StopAction::RequestShutdown),
            Stop::Graceful { since: now },
        ),
        Some(Stop::Graceful { since }) if now >= since + grace => (
            Some(StopAction::ForceStop {
                grace_over: !grace.is_zero(),
            }),
            forced,
        ),
        Some(Stop::Forced { deadline }) if now >= deadline => {
            (Some(StopAction::Kill), Stop::Forced { deadline })
        }
        Some(s) => (None, s),
    }
}

/// What a reconcile pass saw of one VM: its spec and request, and the
/// agent's own record of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)] // independent observations, not a state machine
pub struct Observed {
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// A VMM of this VM runs on the node.
    pub vmm_running: bool,
    /// `spec.runStrategy`.
    pub strategy: RunStrategy,
    /// A restart was requested (`kubectl vm restart`/`start`) and not yet handled.
    pub restart_requested: bool,
    /// The VM ran on this node before.
    pub ever_ran: bool,
    /// The phase its last run left it in, when no restart followed.
    pub held: Option<VmPhase>,
    /// No start before this instant (restart backoff, image poll).
    pub next_start: Option<Instant>,
    /// An image import it waited for just ended.
    pub image_ready: bool,
    /// Now, on the agent's monotonic clock.
    pub now: Instant,
}

/// What a reconcile pass does with one VM (the executor in `reconcile.rs`
/// carries it out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// Being deleted while its VMM runs: the next stop step (ACPI → force → SIGKILL).
    StopForDeletion,
    /// Being deleted and stopped: release its host resources and the finalizer.
    Release,
    /// `Halted`, or a restart asked for: the next stop step.
    Stop,
    /// Running as it should: watch the VMM (stats, pause, interfaces).
    Observe,
    /// Start it now.
    Start,
    /// Start it once the backoff ends.
    StartAt(Instant),
    /// Keep it down, in this phase.
    Hold(VmPhase),
}

/// The pass's move for a VM (pure).
pub fn next_move(o: &Observed) -> Move {
    if o.deleting {
        return if o.vmm_running {
            Move::StopForDeletion
        } else {
            Move::Release
        };
    }
    if o.vmm_running {
        return if o.strategy == RunStrategy::Halted || o.restart_requested {
            Move::Stop
        } else {
            Move::Observe
        };
    }
    if !should_start(o.strategy, o.ever_ran, o.held, o.restart_requested) {
        return Move::Hold(o.held.unwrap_or(VmPhase::Stopped));
    }
    match o.next_start {
        Some(at) if !o.image_ready && o.now < at => Move::StartAt(at),
        _ => Move::Start,
    }
}

/// What a VMM says its vCPUs do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestState {
    /// They run.
    Running,
    /// They are paused.
    Paused,
}

/// A step of starting a VM whose duration is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartStep {
    /// Waiting for the images the VM needs to be imported on this node.
    ImageImport,
    /// Disks, seeds, taps, addresses and cgroups.
    HostPreparation,
    /// From spawning the VMM to its vCPUs running.
    VmmStart,
}

impl StartStep {
    /// The Event's action (one series per step).
    pub fn action(self) -> &'static str {
        match self {
            Self::ImageImport => "ImageImport",
            Self::HostPreparation => "HostPreparation",
            Self::VmmStart => "VmmStart",
        }
    }

    /// The step as people read it in the Event.
    pub fn describe(self) -> &'static str {
        match self {
            Self::ImageImport => "image import",
            Self::HostPreparation => "disk and network preparation",
            Self::VmmStart => "VMM start (spawn to running vCPUs)",
        }
    }
}

/// The note of a `SlowStartStep` Event, or `None` within the threshold.
pub fn slow_step_note(step: StartStep, took: Duration, threshold: Duration) -> Option<String> {
    (took > threshold).then(|| {
        format!(
            "start step {} took {:.3}s (threshold {:.3}s)",
            step.describe(),
            took.as_secs_f64(),
            threshold.as_secs_f64()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run long enough not to count as a reboot loop.
    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn a_crash_message_names_the_cause_once() {
        let vmm = Ended::Crash("kubevmm-vmm: guest crashed: triple fault on vCPU 0".into());
        assert_eq!(vmm.message(), "the guest crashed: triple fault on vCPU 0");
        let other = Ended::Crash("guest panic requested".into());
        assert_eq!(other.message(), "the guest crashed: guest panic requested");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(32));
        assert_eq!(backoff(6), BACKOFF_CAP);
        assert_eq!(backoff(1000), BACKOFF_CAP);
    }

    #[test]
    fn strategies() {
        let crash = Ended::Crash("triple fault".into());
        assert_eq!(
            after_exit(RunStrategy::Always, &Ended::PowerOff, 0, LONG),
            AfterExit::Restart(backoff(0))
        );
        assert_eq!(
            after_exit(RunStrategy::Always, &crash, 3, LONG),
            AfterExit::Restart(backoff(3))
        );
        assert_eq!(
            after_exit(RunStrategy::RerunOnFailure, &crash, 0, LONG),
            AfterExit::Restart(backoff(0))
        );
        assert_eq!(
            after_exit(RunStrategy::RerunOnFailure, &Ended::PowerOff, 0, LONG),
            AfterExit::Stay(VmPhase::Succeeded)
        );
        assert_eq!(
            after_exit(RunStrategy::Once, &crash, 0, LONG),
            AfterExit::Stay(VmPhase::Failed)
        );
        assert_eq!(
            after_exit(RunStrategy::Once, &Ended::PowerOff, 0, LONG),
            AfterExit::Stay(VmPhase::Succeeded)
        );
        assert_eq!(
            after_exit(RunStrategy::Manual, &Ended::PowerOff, 0, LONG),
            AfterExit::Stay(VmPhase::Stopped)
        );
        assert_eq!(
            after_exit(RunStrategy::Manual, &crash, 0, LONG),
            AfterExit::Stay(VmPhase::Failed)
        );
        assert_eq!(
            after_exit(RunStrategy::Halted, &crash, 0, LONG),
            AfterExit::Stay(VmPhase::Stopped)
        );
        assert_eq!(
            after_exit(RunStrategy::Always, &Ended::StoppedByUs, 0, LONG),
            AfterExit::Stay(VmPhase::Stopped)
        );
        assert_eq!(
            after_exit(RunStrategy::Once, &Ended::Reboot, 0, LONG),
            AfterExit::Restart(Duration::ZERO)
        );
        // A reboot loop backs off like a crash.
        assert_eq!(
            after_exit(
                RunStrategy::Always,
                &Ended::Reboot,
                3,
                Duration::from_secs(1)
            ),
            AfterExit::Restart(Duration::from_secs(8))
        );
        assert_eq!(
            after_exit(
                RunStrategy::Halted,
                &Ended::Reboot,
                3,
                Duration::from_secs(1)
            ),
            AfterExit::Stay(VmPhase::Stopped)
        );
    }

    #[test]
    fn starting() {
        assert!(should_start(RunStrategy::Always, true, None, false));
        assert!(should_start(
            RunStrategy::Always,
            true,
            Some(VmPhase::Stopped),
            false
        ));
        assert!(!should_start(RunStrategy::Halted, false, None, true));
        assert!(should_start(RunStrategy::Manual, false, None, false));
        assert!(!should_start(
            RunStrategy::Manual,
            true,
            Some(VmPhase::Stopped),
            false
        ));
        assert!(should_start(
            RunStrategy::Manual,
            true,
            Some(VmPhase::Stopped),
            true
        ));
        assert!(!should_start(
            RunStrategy::Once,
            true,
            Some(VmPhase::Succeeded),
            false
        ));
        assert!(!should_start(
            RunStrategy::RerunOnFailure,
            true,
            Some(VmPhase::Succeeded),
            false
        ));
        assert!(should_start(
            RunStrategy::RerunOnFailure,
            true,
            Some(VmPhase::Stopped),
            false
        ));
    }

    #[test]
    fn a_stop_escalates_from_acpi_to_force_to_kill() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let g30 = Duration::from_secs(30);
        let graceful = Stop::Graceful { since: t0 };
        let forced_at = |n: u64| Stop::Forced {
            deadline: s(n) + FORCE_STOP_TIMEOUT,
        };
        let cases = [
            // (now, current, grace) -> (action, next)
            (t0, None, g30, Some(StopAction::RequestShutdown), graceful),
            (s(10), Some(graceful), g30, None, graceful),
            (
                s(30),
                Some(graceful),
                g30,
                Some(StopAction::ForceStop { grace_over: true }),
                forced_at(30),
            ),
            // `stop --force` during a graceful stop: at once.
            (
                s(3),
                Some(graceful),
                Duration::ZERO,
                Some(StopAction::ForceStop { grace_over: false }),
                forced_at(3),
            ),
            // A shorter grace asked for meanwhile counts from the start.
            (
                s(12),
                Some(graceful),
                Duration::from_secs(10),
                Some(StopAction::ForceStop { grace_over: true }),
                forced_at(12),
            ),
            (
                t0,
                None,
                Duration::ZERO,
                Some(StopAction::ForceStop { grace_over: false }),
                forced_at(0),
            ),
            (s(33), Some(forced_at(30)), g30, None, forced_at(30)),
            (
                s(35),
                Some(forced_at(30)),
                g30,
                Some(StopAction::Kill),
                forced_at(30),
            ),
        ];
        for (i, (now, current, grace, action, next)) in cases.into_iter().enumerate() {
            assert_eq!(stop_step(current, grace, now), (action, next), "case {i}");
        }
    }

    #[test]
    fn the_move_of_every_pass() {
        use RunStrategy::{Always, Halted, Manual, Once, RerunOnFailure};
        let now = Instant::now();
        let later = now + Duration::from_secs(4);
        let base = Observed {
            deleting: false,
            vmm_running: false,
            strategy: RunStrategy::Always,
            restart_requested: false,
            ever_ran: false,
            held: None,
            next_start: None,
            image_ready: false,
            now,
        };
        // (what differs from `base`, the move)
        #[rustfmt::skip]
        let table: Vec<(&str, Observed, Move)> = vec![
            ("new Always VM", base, Move::Start),
            ("deleting, VMM up", Observed { deleting: true, vmm_running: true, ..base }, Move::StopForDeletion),
            ("deleting, VMM gone", Observed { deleting: true, ..base }, Move::Release),
            ("deleting wins over a restart", Observed { deleting: true, restart_requested: true, ..base }, Move::Release),
            ("running", Observed { vmm_running: true, ..base }, Move::Observe),
            ("running, set to Halted", Observed { vmm_running: true, strategy: Halted, ..base }, Move::Stop),
            ("running, restart asked", Observed { vmm_running: true, restart_requested: true, ..base }, Move::Stop),
            ("crashed, in backoff", Observed { ever_ran: true, next_start: Some(later), ..base }, Move::StartAt(later)),
            ("backoff over", Observed { ever_ran: true, next_start: Some(now), ..base }, Move::Start),
            ("image ready before the poll", Observed { next_start: Some(later), image_ready: true, ..base }, Move::Start),
            ("Halted, down", Observed { strategy: Halted, ever_ran: true, ..base }, Move::Hold(VmPhase::Stopped)),
            ("Once, succeeded", Observed { strategy: Once, ever_ran: true, held: Some(VmPhase::Succeeded), ..base }, Move::Hold(VmPhase::Succeeded)),
            ("Manual, powered off", Observed { strategy: Manual, ever_ran: true, held: Some(VmPhase::Stopped), ..base }, Move::Hold(VmPhase::Stopped)),
            ("Manual, start asked", Observed { strategy: Manual, ever_ran: true, held: Some(VmPhase::Stopped), restart_requested: true, ..base }, Move::Start),
            ("RerunOnFailure, failed", Observed { strategy: RerunOnFailure, ever_ran: true, next_start: Some(later), ..base }, Move::StartAt(later)),
            ("RerunOnFailure, succeeded", Observed { strategy: RerunOnFailure, ever_ran: true, held: Some(VmPhase::Succeeded), ..base }, Move::Hold(VmPhase::Succeeded)),
            ("Always after a Failed run", Observed { strategy: Always, ever_ran: true, held: Some(VmPhase::Failed), ..base }, Move::Start),
        ];
        for (what, o, want) in table {
            assert_eq!(next_move(&o), want, "{what}");
        }
    }

    #[test]
    fn only_steps_over_the_threshold_are_reported() {
        let t = Duration::from_secs(2);
        assert_eq!(
            slow_step_note(StartStep::HostPreparation, Duration::from_millis(1999), t),
            None
        );
        assert_eq!(slow_step_note(StartStep::VmmStart, t, t), None);
        assert_eq!(
            slow_step_note(StartStep::ImageImport, Duration::from_millis(12_345), t).as_deref(),
            Some("start step image import took 12.345s (threshold 2.000s)")
        );
    }
}
