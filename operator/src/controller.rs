//! The control loop: while this replica leads, passes of
//! [`crate::reconcile`] over watch-fed caches ([`crate::cache`]), after
//! every change (coalesced), when a Lease is due to expire or a failed
//! VM's backoff ends, on resync, and after a failed pass with exponential
//! backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::cache::Caches;
use crate::reconcile::{self, Context, PassReport, ReconcileError};

/// Runs until leadership can no longer be observed (the elector stopped).
///
/// Errors of single VMs do not slow the loop down: those VMs back off on
/// their own (see `retry`), and watch events keep triggering passes for
/// the others.
pub async fn run(ctx: Context, notify: Arc<Notify>, resync: Duration) {
    let mut leader_rx = ctx.leadership.subscribe();
    // Followers keep caches too: `/readyz` says they could take over.
    let mut caches = Caches::start(&ctx.client, &ctx.settings, &notify, &ctx.metrics);
    let mut fresh = false;
    let mut backoff = Duration::ZERO;
    loop {
        if !*leader_rx.borrow() {
            // Observations made before losing leadership may be arbitrarily
            // old by the time it comes back: start over with a first look.
            ctx.heartbeats().reset();
            ctx.forget_writes();
            fresh = false;
            if leader_rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        if !fresh {
            // A new term decides from caches that listed after it began:
            // they hold every write of the previous leader.
            caches = Caches::start(&ctx.client, &ctx.settings, &notify, &ctx.metrics);
            fresh = true;
            tokio::select! {
                () = caches.synced() => {}
                _ = leader_rx.changed() => continue,
            }
        }
        // No waiting before a pass: bursts coalesce on their own, since
        // the events that arrive while a pass runs leave one permit, for
        // one more pass (a fixed delay here was 50 ms of every VM's
        // apply → Running).
        let started = Instant::now();
        let outcome = reconcile::reconcile_all(&ctx, &caches).await;
        ctx.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        let wake = match outcome {
            Ok(report) => {
                backoff = Duration::ZERO;
                account(&ctx, &report);
                report.wake_in.map_or(resync, |w| w.min(resync))
            }
            Err(e) => {
                count(&ctx, "error", Some(&e));
                tracing::warn!(error = %e, "reconcile pass failed");
                backoff = next_backoff(backoff);
                backoff.min(resync)
            }
        };
        tokio::select! {
            () = notify.notified(), if backoff.is_zero() => {}
            () = tokio::time::sleep(wake) => {}
            _ = leader_rx.changed() => {}
        }
    }
}

/// Counts a pass's outcome and logs the VMs that failed.
fn account(ctx: &Context, report: &PassReport) {
    if report.errors.is_empty() {
        count(ctx, "success", None);
        return;
    }
    count(ctx, "error", None);
    for e in &report.errors {
        ctx.metrics
            .reconcile_errors_total
            .with_label_values(&[e.kind()])
            .inc();
        tracing::warn!(error = %e, "reconcile; this VM is retried with backoff");
    }
}

fn count(ctx: &Context, result: &str, error: Option<&ReconcileError>) {
    ctx.metrics
        .reconcile_total
        .with_label_values(&[result])
        .inc();
    if let Some(e) = error {
        ctx.metrics
            .reconcile_errors_total
            .with_label_values(&[e.kind()])
            .inc();
    }
}

/// Backoff after a failed pass: 200 ms, doubling, at most 30 s.
fn next_backoff(d: Duration) -> Duration {
    if d.is_zero() {
        Duration::from_millis(200)
    } else {
        (d * 2).min(Duration::from_secs(30))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_backoff_doubles_up_to_30_s() {
        let ms = Duration::from_millis;
        // previous | next
        let table = [
            (ms(0), ms(200)),
            (ms(200), ms(400)),
            (ms(16_000), ms(30_000)),
            (ms(30_000), ms(30_000)),
        ];
        for (prev, next) in table {
            assert_eq!(next_backoff(prev), next, "after {prev:?}");
        }
    }
}
