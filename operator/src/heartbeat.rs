//! Node liveness from the heartbeat Leases, measured on the operator's own
//! monotonic clock.
//!
//! A node agent renews its Lease `node-vmm-<node>` by writing `renewTime`
//! with *its* wall clock. Comparing that time with the operator's wall clock
//! would make liveness depend on two clocks agreeing: an agent whose clock
//! runs an hour ahead would look alive for an hour after it died, one that
//! lags would look dead while it heartbeats. So, as [`crate::leader`] does
//! for the leader Lease, the operator never does arithmetic across clocks:
//! it records *when it observed* each change of `renewTime` ([`Instant`],
//! monotonic) and calls the node alive for `leaseDurationSeconds` after that
//! observation. `renewTime` is only compared with its own previous value.
//!
//! Right after the operator starts (or becomes leader) it has seen no change
//! yet: a Lease present at that first look is [`Liveness::Unconfirmed`] —
//! neither placeable (it may belong to a node that died long ago) nor lost
//! (it may be fresh) — until it changes under the operator's eyes or a whole
//! Lease duration passes without a change. A Lease that appears later (an
//! agent registering) counts as a change.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

/// One heartbeat Lease as read in a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `spec.renewTime`, the agent's wall clock: compared only with its
    /// own previous value, and shown in messages.
    pub renew_time: Timestamp,
    /// `spec.leaseDurationSeconds`.
    pub duration: Duration,
}

/// What the operator remembers about one Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// The last `renewTime` seen.
    pub renew_time: Timestamp,
    /// When (operator clock) the operator first saw that value.
    pub changed_at: Instant,
    /// Whether that was a change seen happen (not just the first look).
    pub confirmed: bool,
    /// The Lease's duration, as last read.
    pub duration: Duration,
}

/// A node's heartbeat, as the operator's clock sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// A renewal was observed less than a Lease duration ago.
    Alive {
        /// When it expires unless renewed again.
        expires_at: Instant,
    },
    /// Present at the operator's first look and not renewed since, for less
    /// than a Lease duration: neither placeable nor lost yet.
    Unconfirmed {
        /// When it counts as expired unless renewed.
        expires_at: Instant,
    },
    /// No renewal observed for a whole Lease duration.
    Expired {
        /// How long the operator has seen no change.
        silent_for: Duration,
        /// The Lease's duration.
        duration: Duration,
        /// The last `renewTime` (agent clock), for messages.
        last_renew: Timestamp,
    },
    /// The node has no heartbeat Lease (or one without `renewTime`).
    NoLease,
}

impl Liveness {
    /// Placement may use the node.
    pub fn is_alive(self) -> bool {
        matches!(self, Self::Alive { .. })
    }

    /// Its VMs' fate is unknown (`NodeLost`).
    pub fn is_lost(self) -> bool {
        matches!(self, Self::Expired { .. } | Self::NoLease)
    }

    /// When this state changes by itself (expiry), if it can.
    pub fn deadline(self) -> Option<Instant> {
        match self {
            Self::Alive { expires_at } | Self::Unconfirmed { expires_at } => Some(expires_at),
            Self::Expired { .. } | Self::NoLease => None,
        }
    }
}

/// The next observation of a Lease, given the previous one (pure).
///
/// `primed` is true once the clock has completed a pass: a Lease it has
/// never seen is then new, and its appearance is a change seen happen.
pub fn observe(
    prev: Option<&Observation>,
    record: LeaseRecord,
    now: Instant,
    primed: bool,
) -> Observation {
    match prev {
        Some(p) if p.renew_time == record.renew_time => Observation {
            duration: record.duration,
            ..*p
        },
        Some(_) => Observation {
            renew_time: record.renew_time,
            changed_at: now,
            confirmed: true,
            duration: record.duration,
        },
        None => Observation {
            renew_time: record.renew_time,
            changed_at: now,
            confirmed: primed,
            duration: record.duration,
        },
    }
}

/// Liveness from an observation at `now` (pure).
pub fn liveness(obs: Option<&Observation>, now: Instant) -> Liveness {
    let Some(o) = obs else {
        return Liveness::NoLease;
    };
    let silent_for = now.saturating_duration_since(o.changed_at);
    if silent_for < o.duration {
        let expires_at = o.changed_at + o.duration;
        if o.confirmed {
            Liveness::Alive { expires_at }
        } else {
            Liveness::Unconfirmed { expires_at }
        }
    } else {
        Liveness::Expired {
            silent_for,
            duration: o.duration,
            last_renew: o.renew_time,
        }
    }
}

/// The observations of every heartbeat Lease, kept across passes.
#[derive(Debug, Default)]
pub struct HeartbeatClock {
    seen: BTreeMap<String, Observation>,
    primed: bool,
}

impl HeartbeatClock {
    /// Forgets everything: the next pass is a first look again (on gaining
    /// leadership, when observations may be arbitrarily old).
    pub fn reset(&mut self) {
        self.seen.clear();
        self.primed = false;
    }

    /// Records the Leases read in one pass (by Lease name); Leases no
    /// longer present are forgotten.
    pub fn record(&mut self, leases: &BTreeMap<String, LeaseRecord>, now: Instant) {
        let primed = self.primed;
        self.seen = leases
            .iter()
            .map(|(name, rec)| {
                (
                    name.clone(),
                    observe(self.seen.get(name), *rec, now, primed),
                )
            })
            .collect();
        self.primed = true;
    }

    /// Liveness of the Lease `name` at `now`.
    pub fn liveness(&self, name: &str, now: Instant) -> Liveness {
        liveness(self.seen.get(name), now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn rec(renew_secs: i64, duration_secs: u64) -> LeaseRecord {
        LeaseRecord {
            renew_time: Timestamp::from_second(renew_secs).expect("timestamp"),
            duration: Duration::from_secs(duration_secs),
        }
    }

    #[test]
    fn observe_records_when_the_operator_saw_a_change() {
        let t0 = Instant::now();
        let first = observe(None, rec(100, 40), t0, false);
        assert_eq!((first.changed_at, first.confirmed), (t0, false));
        let appeared = observe(None, rec(100, 40), t0, true);
        assert_eq!((appeared.changed_at, appeared.confirmed), (t0, true));
        // Same renewTime later: nothing happened.
        let same = observe(Some(&first), rec(100, 30), t0 + 5 * S, true);
        assert_eq!((same.changed_at, same.confirmed), (t0, false));
        assert_eq!(same.duration, 30 * S, "the duration follows the Lease");
        // A new renewTime, whatever its value (even earlier: the agent's
        // clock may step back), is a renewal seen now.
        for renew in [200, 50] {
            let next = observe(Some(&first), rec(renew, 40), t0 + 7 * S, true);
            assert_eq!((next.changed_at, next.confirmed), (t0 + 7 * S, true));
        }
    }

    #[test]
    fn liveness_table() {
        let t0 = Instant::now();
        let obs = |confirmed, duration_secs| Observation {
            renew_time: Timestamp::from_second(100).expect("timestamp"),
            changed_at: t0,
            confirmed,
            duration: Duration::from_secs(duration_secs),
        };
        let expired = |secs: u64, d: u64| Liveness::Expired {
            silent_for: Duration::from_secs(secs),
            duration: Duration::from_secs(d),
            last_renew: Timestamp::from_second(100).expect("timestamp"),
        };
        // observation | seconds after it | liveness
        let table: &[(Option<Observation>, u64, Liveness)] = &[
            (None, 0, Liveness::NoLease),
            (
                Some(obs(true, 40)),
                0,
                Liveness::Alive {
                    expires_at: t0 + 40 * S,
                },
            ),
            (
                Some(obs(true, 40)),
                39,
                Liveness::Alive {
                    expires_at: t0 + 40 * S,
                },
            ),
            (Some(obs(true, 40)), 40, expired(40, 40)),
            (Some(obs(true, 40)), 3600, expired(3600, 40)),
            (
                Some(obs(false, 40)),
                10,
                Liveness::Unconfirmed {
                    expires_at: t0 + 40 * S,
                },
            ),
            (Some(obs(false, 40)), 40, expired(40, 40)),
            (Some(obs(true, 0)), 0, expired(0, 0)),
        ];
        for (o, after, want) in table {
            assert_eq!(
                liveness(o.as_ref(), t0 + Duration::from_secs(*after)),
                *want,
                "{o:?} after {after}s"
            );
        }
    }

    #[test]
    fn the_agents_wall_clock_does_not_matter() {
        // renewTime an hour in the future or the past: only changes count.
        let t0 = Instant::now();
        let now_wall = Timestamp::now().as_second();
        for skew in [-3600, 0, 3600] {
            let mut clock = HeartbeatClock::default();
            let leases =
                |renew| BTreeMap::from([("l".to_string(), rec(now_wall + skew + renew, 6))]);
            clock.record(&leases(0), t0);
            assert!(matches!(
                clock.liveness("l", t0),
                Liveness::Unconfirmed { .. }
            ));
            clock.record(&leases(2), t0 + 2 * S);
            assert!(clock.liveness("l", t0 + 2 * S).is_alive(), "skew {skew}");
            // The agent stops: lost a Lease duration after the last renewal
            // the operator saw, whatever renewTime says.
            clock.record(&leases(2), t0 + 7 * S);
            assert!(clock.liveness("l", t0 + 7 * S).is_alive(), "skew {skew}");
            clock.record(&leases(2), t0 + 8 * S);
            assert!(clock.liveness("l", t0 + 8 * S).is_lost(), "skew {skew}");
        }
    }

    #[test]
    fn first_look_is_neither_placeable_nor_lost_and_later_leases_are_fresh() {
        let t0 = Instant::now();
        let mut clock = HeartbeatClock::default();
        clock.record(&BTreeMap::from([("old".to_string(), rec(1, 40))]), t0);
        let first = clock.liveness("old", t0 + S);
        assert!(!first.is_alive() && !first.is_lost(), "{first:?}");
        assert_eq!(first.deadline(), Some(t0 + 40 * S));
        // A Lease that appears after the first look: an agent registering.
        clock.record(
            &BTreeMap::from([
                ("old".to_string(), rec(1, 40)),
                ("new".to_string(), rec(5, 40)),
            ]),
            t0 + 2 * S,
        );
        assert!(clock.liveness("new", t0 + 2 * S).is_alive());
        assert!(clock.liveness("old", t0 + 41 * S).is_lost());
        // Forgotten when gone; unknown names have no Lease.
        clock.record(&BTreeMap::new(), t0 + 3 * S);
        assert_eq!(clock.liveness("new", t0 + 3 * S), Liveness::NoLease);
        // After a reset (leadership regained) everything is a first look.
        clock.reset();
        clock.record(
            &BTreeMap::from([("new".to_string(), rec(9, 40))]),
            t0 + 4 * S,
        );
        assert!(matches!(
            clock.liveness("new", t0 + 4 * S),
            Liveness::Unconfirmed { .. }
        ));
    }
}
