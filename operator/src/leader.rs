//! Leader election through a `coordination.k8s.io/v1` Lease, with optimistic
//! concurrency on `resourceVersion` (the scheme of client-go's
//! `leaderelection`).
//!
//! - The holder renews every `renew_interval` (5 s). It considers itself
//!   leader only until `renew_deadline` (10 s) after the start of its last
//!   successful renewal, which is shorter than the lease duration (15 s): a
//!   holder cut off from the API server stops reconciling before anyone else
//!   may take over.
//! - A candidate takes over when the Lease record has not changed for a
//!   whole `leaseDurationSeconds`, measured on the candidate's own monotonic
//!   clock from when it *observed* the last change (no clock-skew
//!   assumptions), or when the holder released it (empty holder).
//! - Every write is a compare-and-swap on `resourceVersion`; of two
//!   candidates racing for the same record, the API server lets one win.
//! - On SIGTERM the holder releases the Lease so a standby takes over at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Leader-election failures (all retried; none ends the process).
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// Reading or writing the Lease failed.
    #[error("leader Lease {namespace}/{name}: {source}")]
    Api {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// The client error.
        source: kube::Error,
    },
}

/// Timing and identity of the election.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Lease name (`kubevmm-operator`).
    pub lease_name: String,
    /// Lease namespace (`kubevmm-system`).
    pub namespace: String,
    /// This replica's identity (`--id`).
    pub identity: String,
    /// `leaseDurationSeconds` written into the Lease.
    pub lease_duration: Duration,
    /// How often the holder renews.
    pub renew_interval: Duration,
    /// How long after the start of its last successful renewal the holder
    /// still acts as leader.
    pub renew_deadline: Duration,
    /// How often a standby retries.
    pub retry_interval: Duration,
}

impl LeaderConfig {
    /// Defaults derived from a lease duration: renew every third of it,
    /// deadline two thirds, standby retry every 2 s (at most).
    pub fn new(lease_name: String, namespace: String, identity: String, lease: Duration) -> Self {
        Self {
            lease_name,
            namespace,
            identity,
            lease_duration: lease,
            renew_interval: lease / 3,
            renew_deadline: lease * 2 / 3,
            retry_interval: (lease / 7).min(Duration::from_secs(2)),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    valid_until: Option<Instant>,
}

/// Whether this replica may act as leader right now; cheap to clone.
#[derive(Debug, Clone)]
pub struct Leadership {
    state: Arc<Mutex<State>>,
    rx: watch::Receiver<bool>,
}

impl Leadership {
    /// True while the last successful renewal is within the renew deadline.
    pub fn is_leader(&self) -> bool {
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.valid_until.is_some_and(|t| Instant::now() < t)
    }

    /// A receiver that changes whenever leadership is gained or lost.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }
}

/// The election loop of one replica.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaderConfig,
    state: Arc<Mutex<State>>,
    tx: watch::Sender<bool>,
    metrics: Metrics,
    /// The Lease's resourceVersion when we last saw it change, and when.
    observed: Option<(String, Instant)>,
}

impl Elector {
    /// A new elector and the handle the reconciler checks.
    pub fn new(client: kube::Client, cfg: LeaderConfig, metrics: Metrics) -> (Self, Leadership) {
        let (tx, rx) = watch::channel(false);
        let state = Arc::new(Mutex::new(State::default()));
        let api = Api::namespaced(client, &cfg.namespace);
        (
            Self {
                api,
                cfg,
                state: state.clone(),
                tx,
                metrics,
                observed: None,
            },
            Leadership { state, rx },
        )
    }

    fn err(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            namespace: self.cfg.namespace.clone(),
            name: self.cfg.lease_name.clone(),
            source,
        }
    }

    fn set_leader(&self, valid_until: Option<Instant>) {
        let was = *self.tx.borrow();
        let now = valid_until.is_some();
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .valid_until = valid_until;
        if was != now {
            if now {
                tracing::info!(identity = %self.cfg.identity, lease = %self.cfg.lease_name, "became leader");
            } else {
                tracing::warn!(identity = %self.cfg.identity, lease = %self.cfg.lease_name, "lost leadership; reconciling stops");
            }
            self.tx.send_replace(now);
            self.metrics.leader.set(i64::from(now));
        }
    }

    /// Runs until `shutdown` turns true, then releases the Lease if held.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let started = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => self.set_leader(Some(started + self.cfg.renew_deadline)),
                Ok(false) => self.set_leader(None),
                Err(e) => {
                    tracing::warn!(error = %e, "leader election attempt failed");
                    // Keep acting until the deadline of the last good renewal.
                    let expired = self
                        .state
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .valid_until
                        .is_none_or(|t| Instant::now() >= t);
                    if expired {
                        self.set_leader(None);
                    }
                }
            }
            let pause = if *self.tx.borrow() {
                self.cfg.renew_interval
            } else {
                self.cfg.retry_interval
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
        }
        let held = *self.tx.borrow();
        self.set_leader(None);
        if held {
            match self.release().await {
                Ok(()) => tracing::info!("released the leader Lease"),
                Err(e) => tracing::warn!(error = %e, "cannot release the leader Lease"),
            }
        }
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.cfg.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One attempt: `Ok(true)` when we hold the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaderError> {
        let now = MicroTime(Timestamp::now());
        let existing = self
            .api
            .get_opt(&self.cfg.lease_name)
            .await
            .map_err(|e| self.err(e))?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.lease_name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_status(&e, 409) => Ok(false),
                Err(e) => Err(self.err(e)),
            };
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        if holder.as_deref() != Some(self.cfg.identity.as_str()) {
            match &self.observed {
                Some((seen, _)) if *seen == rv => {}
                _ => self.observed = Some((rv, Instant::now())),
            }
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.cfg.lease_duration, Duration::from_secs);
            let unchanged_for = self
                .observed
                .as_ref()
                .map_or(Duration::ZERO, |(_, t)| t.elapsed());
            if holder.is_some() && unchanged_for < duration {
                return Ok(false);
            }
            tracing::info!(
                previous = holder.as_deref().unwrap_or("<none>"),
                "taking over the leader Lease"
            );
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(self.cfg.identity.clone());
        spec.lease_duration_seconds = Some(self.lease_seconds());
        spec.renew_time = Some(now);
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn release(&self) -> Result<(), LeaderError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.cfg.lease_name)
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        self.api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
            .map_err(|e| self.err(e))
    }
}

/// Whether a client error is an API status with this HTTP code.
pub fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}
