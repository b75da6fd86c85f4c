//! Prometheus metrics (text exposition) and the `/metrics`, `/healthz` and
//! `/readyz` endpoints, served by a minimal HTTP/1.1 responder on tokio so
//! the operator carries no web framework.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Metrics setup and serving errors.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be created or registered (a programming error).
    #[error("cannot register metric: {0}")]
    Register(#[from] prometheus::Error),
    /// The listen address is taken or invalid.
    #[error("cannot listen on {addr} for /metrics: {source}")]
    Bind {
        /// The address from `--metrics-addr`.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Every metric the operator exports (names in docs/metrics.md).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconcile passes by result (`success`, `error`).
    pub reconcile_total: IntCounterVec,
    /// Failed API writes by kind (`conflict`, `api`, `invalid`, ...).
    pub reconcile_errors_total: IntCounterVec,
    /// Duration of one reconcile pass.
    pub reconcile_duration: Histogram,
    /// VMs by phase, as last listed.
    pub vms: IntGaugeVec,
    /// Creation → first binding.
    pub scheduling_duration: Histogram,
    /// VMs found unschedulable, by reason.
    pub scheduling_failures_total: IntCounterVec,
    /// 1 while this replica holds the leader Lease.
    pub leader: IntGauge,
    ready: Arc<AtomicBool>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let reconcile_total = IntCounterVec::new(
            Opts::new(
                "kubevmm_operator_reconcile_total",
                "Reconcile passes over all VirtualMachines, by result.",
            ),
            &["result"],
        )?;
        let reconcile_errors_total = IntCounterVec::new(
            Opts::new(
                "kubevmm_operator_reconcile_errors_total",
                "Failed reads and writes during reconcile passes, by kind.",
            ),
            &["kind"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "kubevmm_operator_reconcile_duration_seconds",
                "Duration of one reconcile pass.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        let vms = IntGaugeVec::new(
            Opts::new(
                "kubevmm_operator_vms",
                "VirtualMachines by status.phase (Unset before any status).",
            ),
            &["phase"],
        )?;
        let scheduling_duration = Histogram::with_opts(
            HistogramOpts::new(
                "kubevmm_operator_scheduling_duration_seconds",
                "Time from a VirtualMachine's creation to its first binding to a node.",
            )
            .buckets(vec![
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        )?;
        let scheduling_failures_total = IntCounterVec::new(
            Opts::new(
                "kubevmm_operator_scheduling_failures_total",
                "VMs found unschedulable (counted when the Scheduled=False message changes), by reason.",
            ),
            &["reason"],
        )?;
        let leader = IntGauge::new(
            "kubevmm_operator_leader",
            "1 while this replica holds the leader-election Lease, else 0.",
        )?;
        // Known label values start at 0 (an absent series is no rate).
        for result in ["success", "error"] {
            reconcile_total.with_label_values(&[result]);
        }
        for reason in crate::scheduling::UNSCHEDULABLE_REASONS {
            scheduling_failures_total.with_label_values(&[reason]);
        }
        registry.register(Box::new(reconcile_total.clone()))?;
        registry.register(Box::new(reconcile_errors_total.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(vms.clone()))?;
        registry.register(Box::new(scheduling_duration.clone()))?;
        registry.register(Box::new(scheduling_failures_total.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self {
            registry,
            reconcile_total,
            reconcile_errors_total,
            reconcile_duration,
            vms,
            scheduling_duration,
            scheduling_failures_total,
            leader,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Marks the caches synced (`/readyz` answers 200 from now on).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Binds `addr`; the returned future serves until the process ends.
    pub async fn serve(
        self,
        addr: &str,
    ) -> Result<impl std::future::Future<Output = ()>, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        Ok(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let m = self.clone();
                        tokio::spawn(async move { m.answer(stream).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        })
    }

    async fn answer(&self, mut stream: TcpStream) {
        let mut buf = vec![0u8; 4096];
        let mut len = 0;
        // Read until the end of the request head (or the buffer is full).
        loop {
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                stream.read(&mut buf[len..]),
            )
            .await;
            match read {
                Ok(Ok(0) | Err(_)) | Err(_) => break,
                Ok(Ok(n)) => {
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == buf.len() {
                        break;
                    }
                }
            }
        }
        let head = String::from_utf8_lossy(&buf[..len]);
        let path = head
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("/");
        let path = path.split('?').next().unwrap_or(path);
        let (status, ctype, body) = match path {
            "/metrics" => (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                self.render(),
            ),
            "/healthz" | "/livez" => ("200 OK", "text/plain", "ok\n".to_string()),
            "/readyz" => {
                if self.ready.load(Ordering::SeqCst) {
                    ("200 OK", "text/plain", "ok\n".to_string())
                } else {
                    (
                        "503 Service Unavailable",
                        "text/plain",
                        "caches not synced yet\n".to_string(),
                    )
                }
            }
            _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_name() {
        let m = Metrics::new().unwrap();
        m.reconcile_total.with_label_values(&["success"]).inc();
        m.reconcile_errors_total
            .with_label_values(&["conflict"])
            .inc();
        m.reconcile_duration.observe(0.01);
        m.vms.with_label_values(&["Running"]).set(2);
        m.scheduling_duration.observe(0.2);
        m.scheduling_failures_total
            .with_label_values(&["Insufficient"])
            .inc();
        m.leader.set(1);
        let text = m.render();
        for name in [
            "kubevmm_operator_reconcile_total{result=\"success\"} 1",
            "kubevmm_operator_reconcile_errors_total{kind=\"conflict\"} 1",
            "kubevmm_operator_reconcile_duration_seconds_bucket",
            "kubevmm_operator_vms{phase=\"Running\"} 2",
            "kubevmm_operator_scheduling_duration_seconds_count 1",
            "kubevmm_operator_scheduling_failures_total{reason=\"Insufficient\"} 1",
            "kubevmm_operator_leader 1",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
