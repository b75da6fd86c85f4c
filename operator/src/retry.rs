//! Per-VM retry with backoff: one VM whose writes keep failing (a webhook
//! refusing it, a quota, a broken object) must not hold back the others.
//!
//! A pass decides for every VM (placement is global) but writes each VM on
//! its own: a VM whose last write failed is left alone until its backoff
//! expires, then tried again; the other VMs are written as usual, and the
//! pass is not treated as failed (no global backoff, watch events keep
//! triggering passes). A conflict is not a failure of the VM: it means the
//! object changed, the watch will say so, and the next pass decides afresh.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// First delay after a failure.
pub const INITIAL: Duration = Duration::from_millis(200);
/// Longest delay.
pub const MAX: Duration = Duration::from_secs(30);

/// Delay after `failures` consecutive failures (1 → 200 ms, doubling, capped).
pub fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let doublings = failures.saturating_sub(1).min(16);
    INITIAL.saturating_mul(1 << doublings).min(MAX)
}

/// What a failed write means for the VM's next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The object changed under the decision: retry in the next pass.
    Conflict,
    /// Anything else: back off.
    Error,
}

/// The retry state of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Consecutive failures.
    pub failures: u32,
    /// No write before this instant.
    pub not_before: Instant,
    /// The last error, to report a new one once.
    pub last_error: String,
}

/// Whether the failure deserves a Warning Event: the first one, and each
/// time the error changes (not every retry of the same error).
pub fn worth_reporting(prev: Option<&Retry>, error: &str) -> bool {
    prev.is_none_or(|p| p.last_error != error)
}

/// The state after a failed write (pure).
pub fn after_failure(prev: Option<&Retry>, kind: Failure, error: String, now: Instant) -> Retry {
    let failures = prev.map_or(0, |p| p.failures).saturating_add(1);
    let not_before = match kind {
        Failure::Conflict => now,
        Failure::Error => now + backoff(failures),
    };
    Retry {
        failures,
        not_before,
        last_error: error,
    }
}

/// Retry state of every VM with failed writes, by uid.
#[derive(Debug, Default)]
pub struct Retries {
    by_vm: BTreeMap<String, Retry>,
}

impl Retries {
    /// When the VM `uid` may be written again; `None` when it may now.
    pub fn wait(&self, uid: &str, now: Instant) -> Option<Duration> {
        self.by_vm
            .get(uid)
            .map(|r| r.not_before.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Records a failure; returns whether it should be reported.
    pub fn failed(&mut self, uid: &str, kind: Failure, error: String, now: Instant) -> bool {
        let prev = self.by_vm.get(uid);
        let report = worth_reporting(prev, &error);
        let next = after_failure(prev, kind, error, now);
        self.by_vm.insert(uid.to_string(), next);
        report
    }

    /// Records a success.
    pub fn succeeded(&mut self, uid: &str) {
        self.by_vm.remove(uid);
    }

    /// Forgets VMs that no longer exist.
    pub fn retain(&mut self, present: &std::collections::BTreeSet<String>) {
        self.by_vm.retain(|uid, _| present.contains(uid));
    }

    /// Consecutive failures of `uid`.
    #[cfg(test)]
    pub fn failures(&self, uid: &str) -> u32 {
        self.by_vm.get(uid).map_or(0, |r| r.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let ms = |n| Duration::from_millis(n);
        // failures | delay
        let table = [
            (0, ms(0)),
            (1, ms(200)),
            (2, ms(400)),
            (3, ms(800)),
            (8, ms(25_600)),
            (9, MAX),
            (40, MAX),
            (u32::MAX, MAX),
        ];
        for (failures, want) in table {
            assert_eq!(backoff(failures), want, "{failures} failures");
        }
    }

    #[test]
    fn a_failing_vm_waits_and_the_others_do_not() {
        let t0 = Instant::now();
        let mut r = Retries::default();
        assert!(r.failed("bad", Failure::Error, "denied".into(), t0));
        assert_eq!(r.wait("bad", t0), Some(Duration::from_millis(200)));
        assert_eq!(r.wait("good", t0), None);
        assert_eq!(r.wait("bad", t0 + Duration::from_millis(200)), None);
        // The same error again: backed off longer, not reported again.
        assert!(!r.failed("bad", Failure::Error, "denied".into(), t0));
        assert_eq!(r.wait("bad", t0), Some(Duration::from_millis(400)));
        // A different error is reported.
        assert!(r.failed("bad", Failure::Error, "quota".into(), t0));
        assert_eq!(r.failures("bad"), 3);
        // A conflict is retried in the next pass.
        assert!(r.failed("busy", Failure::Conflict, "conflict".into(), t0));
        assert_eq!(r.wait("busy", t0), None);
        r.succeeded("bad");
        assert_eq!(r.wait("bad", t0), None);
        assert_eq!(r.failures("bad"), 0);
        r.retain(&std::collections::BTreeSet::new());
        assert_eq!(r.failures("busy"), 0);
    }
}
