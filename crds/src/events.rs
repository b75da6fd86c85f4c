//! Events about kubevmm objects, built and published the same way by the
//! operator and node-vmm: the note bounded to what the API accepts, the
//! action chosen so the recorder folds only true repeats into one series.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// Longest note an Event carries (`events.k8s.io/v1` refuses more than 1 kB).
pub const NOTE_MAX_CHARS: usize = 1000;

/// An Event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `Warning` rather than `Normal`.
    pub warning: bool,
    /// Why (CamelCase, as condition reasons).
    pub reason: String,
    /// What happened, for people.
    pub note: String,
    /// The recorder folds Events with the same reason and action into one
    /// series that keeps the first note.
    pub action: String,
}

impl Note {
    /// A `Normal` Event whose action is its reason: every Event of this
    /// reason is one series.
    pub fn normal(reason: &str, note: impl Into<String>) -> Self {
        Self {
            warning: false,
            reason: reason.into(),
            note: note.into(),
            action: reason.into(),
        }
    }

    /// A `Warning` Event whose action is its reason.
    pub fn warning(reason: &str, note: impl Into<String>) -> Self {
        Self {
            warning: true,
            ..Self::normal(reason, note)
        }
    }

    /// `Warning` when `warning`, else `Normal`.
    pub fn new(warning: bool, reason: &str, note: impl Into<String>) -> Self {
        Self {
            warning,
            ..Self::normal(reason, note)
        }
    }

    /// The same Event in its own series `action`.
    #[must_use]
    pub fn with_action(self, action: &str) -> Self {
        Self {
            action: action.into(),
            ..self
        }
    }

    /// The same Event in a series of its reason and note: a repeat of the
    /// same message is counted, a different one (a second stop with another
    /// grace period) is shown as written.
    #[must_use]
    pub fn folded_by_note(self) -> Self {
        let action = note_action(&self.reason, &self.note);
        Self { action, ..self }
    }

    /// The Event as the recorder takes it.
    pub fn to_event(&self) -> Event {
        Event {
            type_: if self.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: self.reason.clone(),
            note: Some(self.note.chars().take(NOTE_MAX_CHARS).collect()),
            action: self.action.clone(),
            secondary: None,
        }
    }
}

/// `reason` and a digest of `note` (FNV-1a), as an Event action.
fn note_action(reason: &str, note: &str) -> String {
    let digest = note.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{reason}-{digest:08x}")
}

/// Publishes `note` about the object `about`.
///
/// # Errors
/// The API server refused the Event or could not be reached; callers log
/// it (an Event is never worth failing a reconcile for).
pub async fn publish(
    recorder: &Recorder,
    about: &ObjectReference,
    note: &Note,
) -> Result<(), kube::Error> {
    recorder.publish(&note.to_event(), about).await
}

/// How many Events may wait to be sent; more are dropped, as client-go's
/// recorder drops them when its queue is full: an Event is never worth
/// memory without bound.
pub const QUEUE_LIMIT: usize = 1024;

/// Events wait until none has been queued for this long: they come with
/// the writes that move VMs forward, so a burst of starts is written
/// before its Events.
pub const QUIET: std::time::Duration = std::time::Duration::from_millis(100);
/// ... but never longer than this.
pub const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(2);

/// How much longer the Events waiting since `oldest` (the newest queued at
/// `newest`, `waiting` of them) are held at `now`; `None`: send them now.
pub fn hold(
    now: std::time::Instant,
    oldest: std::time::Instant,
    newest: std::time::Instant,
    waiting: usize,
) -> Option<std::time::Duration> {
    let quiet_for = now.saturating_duration_since(newest);
    let waited = now.saturating_duration_since(oldest);
    if waiting >= QUEUE_LIMIT || quiet_for >= QUIET || waited >= MAX_DELAY {
        return None;
    }
    Some(
        QUIET
            .saturating_sub(quiet_for)
            .min(MAX_DELAY.saturating_sub(waited)),
    )
}

/// The sender's task: takes Events off the queue, holds them while more
/// keep coming ([`hold`]), then sends them in order; a flush sends what
/// waits at once.
async fn send_when_quiet(
    mut jobs: tokio::sync::mpsc::Receiver<Job>,
    recorder: Recorder,
    failed: FailureHook,
) {
    use std::time::Instant;
    let mut waiting: Vec<(ObjectReference, Note)> = Vec::new();
    let (mut oldest, mut newest) = (Instant::now(), Instant::now());
    loop {
        if waiting.is_empty() {
            match jobs.recv().await {
                None => return,
                Some(Job::Publish(event)) => {
                    (oldest, newest) = (Instant::now(), Instant::now());
                    waiting.push(*event);
                }
                Some(Job::Flush(done)) => {
                    let _ = done.send(());
                }
            }
            continue;
        }
        // Something waits: more may come while it is held.
        let flush = match hold(Instant::now(), oldest, newest, waiting.len()) {
            None => None,
            Some(wait) => match tokio::time::timeout(wait, jobs.recv()).await {
                // Held long enough: due at the next look.
                Err(_) => continue,
                Ok(Some(Job::Publish(event))) => {
                    newest = Instant::now();
                    waiting.push(*event);
                    continue;
                }
                Ok(Some(Job::Flush(done))) => Some(done),
                // Every sender is gone: what waits goes out, then the task ends.
                Ok(None) => None,
            },
        };
        for (about, note) in waiting.drain(..) {
            if let Err(e) = publish(&recorder, &about, &note).await {
                failed(&about, &note, &e);
            }
        }
        if let Some(done) = flush {
            let _ = done.send(());
        }
    }
}

/// What a sender does with an Event it could not send (log it, count it).
pub type FailureHook = Box<dyn Fn(&ObjectReference, &Note, &kube::Error) + Send + Sync>;

#[derive(Debug)]
enum Job {
    Publish(Box<(ObjectReference, Note)>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Events sent in the background, one at a time and in order, so that no
/// reconcile waits for them: the writes that move VMs forward go first,
/// and a pass or a start never waits for an Event's round trip.
#[derive(Debug, Clone)]
pub struct EventSink {
    queue: tokio::sync::mpsc::Sender<Job>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl EventSink {
    /// Starts the sender on the current tokio runtime; `failed` hears of
    /// each Event the API server refused or could not be sent.
    pub fn start(recorder: Recorder, failed: FailureHook) -> Self {
        let (queue, jobs) = tokio::sync::mpsc::channel(QUEUE_LIMIT);
        tokio::spawn(send_when_quiet(jobs, recorder, failed));
        Self {
            queue,
            dropped: std::sync::Arc::default(),
        }
    }

    /// Queues `note` about `about`; never waits. Dropped (and counted) when
    /// [`QUEUE_LIMIT`] Events are waiting already.
    pub fn send(&self, about: ObjectReference, note: Note) {
        use std::sync::atomic::Ordering;
        if self
            .queue
            .try_send(Job::Publish(Box::new((about, note))))
            .is_err()
        {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n == 1 || n % 100 == 0 {
                tracing::warn!(
                    "{n} Events dropped: more than {QUEUE_LIMIT} were waiting to be sent"
                );
            }
        }
    }

    /// Waits until every Event queued before this call was sent (or failed),
    /// e.g. before the process exits.
    pub async fn flush(&self) {
        let (done, sent) = tokio::sync::oneshot::channel();
        if self.queue.send(Job::Flush(done)).await.is_ok() {
            let _ = sent.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_wait_for_a_quiet_moment_but_not_long() {
        let t0 = std::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        // oldest, newest, now (ms after t0), waiting | held for
        let table = [
            (0, 0, 0, 1, Some(ms(100))),
            (0, 0, 40, 1, Some(ms(60))),
            (0, 0, 100, 1, None),
            // A burst keeps them waiting...
            (0, 1950, 1990, 20, Some(ms(10))),
            // ... up to MAX_DELAY.
            (0, 1990, 2000, 20, None),
            // A full queue goes out at once.
            (0, 10, 10, QUEUE_LIMIT, None),
        ];
        for (oldest, newest, now, waiting, want) in table {
            assert_eq!(
                hold(t0 + ms(now), t0 + ms(oldest), t0 + ms(newest), waiting),
                want,
                "oldest {oldest} ms, newest {newest} ms, now {now} ms, {waiting} waiting"
            );
        }
    }

    #[test]
    fn events_fold_only_when_their_note_repeats() {
        let a =
            Note::normal("Stopping", "ACPI shutdown requested; 60s grace period").folded_by_note();
        let same =
            Note::normal("Stopping", "ACPI shutdown requested; 60s grace period").folded_by_note();
        let other =
            Note::normal("Stopping", "ACPI shutdown requested; 20s grace period").folded_by_note();
        assert_eq!(a.action, same.action);
        assert_ne!(a.action, other.action);
        assert!(
            a.action.starts_with("Stopping-") && a.action.len() <= 128,
            "{}",
            a.action
        );
    }

    #[test]
    fn the_event_is_what_the_note_says_and_bounded() {
        let table = [
            (
                Note::warning("NodeLost", "x"),
                EventType::Warning,
                "NodeLost",
                1,
            ),
            (
                Note::normal("Released", "y"),
                EventType::Normal,
                "Released",
                1,
            ),
            (
                Note::new(true, "VmmFailed", "z".repeat(5000)),
                EventType::Warning,
                "VmmFailed",
                NOTE_MAX_CHARS,
            ),
            (
                Note::normal("SlowStartStep", "s").with_action("VmmStart"),
                EventType::Normal,
                "VmmStart",
                1,
            ),
        ];
        for (note, ty, action, len) in table {
            let ev = note.to_event();
            assert_eq!(ev.type_, ty, "{note:?}");
            assert_eq!(ev.reason, note.reason);
            assert_eq!(ev.action, action);
            assert_eq!(ev.note.map(|n| n.chars().count()), Some(len));
        }
    }
}
