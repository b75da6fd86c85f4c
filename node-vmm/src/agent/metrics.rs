//! node-vmm's Prometheus metrics (names and labels in docs/metrics.md).
//!
//! Per-VM counters come from each VMM's `GET /vm/stats`; the VMM's counters
//! restart from zero with the VMM, so they are folded into monotonic
//! Prometheus counters by adding the increase since the last poll.
//!
//! Prometheus sample values are `f64`; counts above 2^52 losing precision
//! there is inherent to the format.
#![allow(clippy::cast_precision_loss)]

use std::collections::HashMap;
use std::sync::Mutex;

use kubevmm_crds::VmPhase;
use prometheus::{
    CounterVec, Encoder as _, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use serde_json::Value;

/// Errors building the registry (only on programming mistakes: bad names).
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The prometheus crate refused a metric.
    #[error("metrics registry: {0}")]
    Prometheus(#[from] prometheus::Error),
}

/// A renderer of families outside the registry.
struct Extra(std::sync::OnceLock<Box<dyn Fn() -> String + Send + Sync>>);

impl std::fmt::Debug for Extra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Extra(set)"
        } else {
            "Extra(none)"
        })
    }
}

impl std::ops::Deref for Extra {
    type Target = std::sync::OnceLock<Box<dyn Fn() -> String + Send + Sync>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// All node-vmm metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    extra: Extra,
    vms: IntGaugeVec,
    transitions: HistogramVec,
    boot: HistogramVec,
    vcpu_seconds: CounterVec,
    exits: IntCounterVec,
    memory: GaugeVec,
    overhead: GaugeVec,
    disk_bytes: IntCounterVec,
    disk_ops: IntCounterVec,
    disk_errors: IntCounterVec,
    net_bytes: IntCounterVec,
    net_frames: IntCounterVec,
    net_dropped: IntCounterVec,
    restarts: IntCounterVec,
    image_bytes: IntCounterVec,
    image_duration: HistogramVec,
    image_failures: IntCounterVec,
    image_cache: prometheus::IntGauge,
    last: Mutex<HashMap<String, f64>>,
    /// Label values used per VM (`ns/name`), per family, so they can be removed.
    series: Mutex<HashMap<String, Vec<Series>>>,
}

/// One series of a VM: its family and label values.
type Series = (Family, Vec<String>);

/// The per-VM counter families with extra labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Vcpu,
    Exits,
    DiskBytes,
    DiskOps,
    DiskErrors,
    NetBytes,
    NetFrames,
    NetDropped,
}

const VM: [&str; 2] = ["namespace", "name"];

impl Metrics {
    /// Registers every metric (one declaration each, hence long).
    #[allow(clippy::too_many_lines)]
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let lbl = |extra: &[&'static str]| -> Vec<&'static str> {
            VM.iter().chain(extra).copied().collect()
        };
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        let buckets = vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
        let m = Self {
            vms: reg!(IntGaugeVec::new(
                Opts::new("kubevmm_node_vms", "VMs on this node by phase"),
                &["phase"]
            )?),
            transitions: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "kubevmm_vm_phase_transition_seconds",
                    "Time from VM creation to reaching a phase, per phase"
                )
                .buckets(buckets.clone()),
                &["phase"]
            )?),
            boot: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "kubevmm_vm_boot_duration_seconds",
                    "Time from starting the VMM to its vCPUs running"
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
                ]),
                &[]
            )?),
            vcpu_seconds: reg!(CounterVec::new(
                Opts::new(
                    "kubevmm_vm_vcpu_seconds_total",
                    "Time vCPUs spent in KVM_RUN"
                ),
                &lbl(&["vcpu"])
            )?),
            exits: reg!(IntCounterVec::new(
                Opts::new("kubevmm_vm_exits_total", "vCPU exits to the VMM by reason"),
                &lbl(&["reason"])
            )?),
            memory: reg!(GaugeVec::new(
                Opts::new("kubevmm_vm_memory_bytes", "Guest RAM"),
                &lbl(&[])
            )?),
            overhead: reg!(GaugeVec::new(
                Opts::new(
                    "kubevmm_vm_vmm_overhead_bytes",
                    "VMM resident memory not backing guest RAM"
                ),
                &lbl(&[])
            )?),
            disk_bytes: reg!(IntCounterVec::new(
                Opts::new(
                    "kubevmm_vm_disk_bytes_total",
                    "virtio-blk bytes by operation"
                ),
                &lbl(&["disk", "op"])
            )?),
            disk_ops: reg!(IntCounterVec::new(
                Opts::new(
                    "kubevmm_vm_disk_ops_total",
                    "virtio-blk requests by operation"
                ),
                &lbl(&["disk", "op"])
            )?),
            disk_errors: reg!(IntCounterVec::new(
                Opts::new(
                    "kubevmm_vm_disk_errors_total",
                    "virtio-blk requests that failed"
                ),
                &lbl(&["disk"])
            )?),
            net_bytes: reg!(IntCounterVec::new(
                Opts::new(
                    "kubevmm_vm_net_bytes_total",
                    "virtio-net bytes by direction"
                ),
                &lbl(&["interface", "direction"])
            )?),
            net_frames: reg!(IntCounterVec::new(
                Opts::new(
                    "kubevmm_vm_net_frames_total",
                    "virtio-net frames by direction"
                ),
                &lbl(&["interface", "direction"])
            )?),
            net_dropped: reg!(IntCounterVec::new(
                Opts::new(
                    "kubevmm_vm_net_dropped_total",
                    "Frames from the tap dropped for lack of guest buffers"
                ),
                &lbl(&["interface"])
            )?),
            restarts: reg!(IntCounterVec::new(
                Opts::new("kubevmm_vm_restarts_total", "Guest restarts by node-vmm"),
                &lbl(&[])
            )?),
            image_bytes: reg!(IntCounterVec::new(
                Opts::new(
                    "kubevmm_image_import_bytes_total",
                    "Image bytes downloaded or copied into the node's cache"
                ),
                &["source"]
            )?),
            image_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "kubevmm_image_import_duration_seconds",
                    "Time to import an image (fetch, verify, detect, commit)"
                )
                .buckets(vec![
                    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0
                ]),
                &["source"]
            )?),
            image_failures: reg!(IntCounterVec::new(
                Opts::new(
                    "kubevmm_image_import_failures_total",
                    "Image imports that failed, by condition reason"
                ),
                &["reason"]
            )?),
            image_cache: reg!(prometheus::IntGauge::with_opts(Opts::new(
                "kubevmm_image_cache_bytes",
                "Bytes of verified images in the node's image cache"
            ))?),
            last: Mutex::new(HashMap::new()),
            series: Mutex::new(HashMap::new()),
            registry,
            extra: Extra(std::sync::OnceLock::new()),
        };
        // The histograms exist, empty, from the start: a rate over them is
        // then defined (0) and the first boot after a scrape shows as an
        // increase, instead of the series appearing with it already counted.
        m.boot.with_label_values(&[] as &[&str]);
        for phase in [
            VmPhase::Scheduled,
            VmPhase::Starting,
            VmPhase::Running,
            VmPhase::Paused,
            VmPhase::Stopped,
            VmPhase::Succeeded,
            VmPhase::Failed,
        ] {
            m.transitions.with_label_values(&[phase.as_str()]);
        }
        Ok(m)
    }

    /// Text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        let mut text = String::from_utf8(buf).unwrap_or_default();
        if let Some(extra) = self.extra.get() {
            text.push_str(&extra());
        }
        text
    }

    /// Families rendered at scrape time from outside the registry (the
    /// network's, [`super::netmetrics`]); set once.
    pub fn set_extra(&self, f: Box<dyn Fn() -> String + Send + Sync>) {
        let _ = self.extra.set(f);
    }

    /// Sets the per-phase VM gauge.
    pub fn set_phases(&self, counts: &HashMap<&'static str, i64>) {
        for phase in kubevmm_crds::VmPhase::ALL.map(kubevmm_crds::VmPhase::as_str) {
            self.vms
                .with_label_values(&[phase])
                .set(counts.get(phase).copied().unwrap_or(0));
        }
    }

    /// Image bytes fetched (`source`: `http` or `path`).
    pub fn image_bytes(&self, source: &str, bytes: u64) {
        self.image_bytes.with_label_values(&[source]).inc_by(bytes);
    }

    /// A finished import and how long it took.
    pub fn image_imported(&self, source: &str, seconds: f64) {
        self.image_duration
            .with_label_values(&[source])
            .observe(seconds);
    }

    /// A failed import.
    pub fn image_failed(&self, reason: &str) {
        self.image_failures.with_label_values(&[reason]).inc();
    }

    /// The cache's size now.
    pub fn image_cache(&self, bytes: u64) {
        self.image_cache
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Records that a VM reached `phase` `seconds` after its creation.
    pub fn transition(&self, phase: &str, seconds: f64) {
        self.transitions
            .with_label_values(&[phase])
            .observe(seconds.max(0.0));
    }

    /// Records a VMM start-to-running duration.
    pub fn booted(&self, seconds: f64) {
        self.boot.with_label_values(&[] as &[&str]).observe(seconds);
    }

    /// Counts a restart.
    pub fn restarted(&self, ns: &str, name: &str) {
        self.restarts.with_label_values(&[ns, name]).inc();
    }

    /// Increase of a VMM counter since the last poll (handles VMM restarts).
    fn delta(&self, key: String, now: f64) -> f64 {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let prev = last.insert(key, now).unwrap_or(0.0);
        if now >= prev {
            now - prev
        } else {
            now
        }
    }

    fn note(&self, ns: &str, name: &str, fam: Family, labels: &[&str]) {
        let mut series = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = series.entry(format!("{ns}/{name}")).or_default();
        let labels: Vec<String> = labels.iter().map(ToString::to_string).collect();
        if !list.iter().any(|(f, l)| *f == fam && *l == labels) {
            list.push((fam, labels));
        }
    }

    /// Folds one `GET /vm/stats` answer of VM `ns/name` into the metrics.
    pub fn observe_stats(&self, ns: &str, name: &str, memory: u64, stats: &Value) {
        let key = |parts: &[&str]| format!("{ns}/{name}/{}", parts.join("/"));
        self.memory
            .with_label_values(&[ns, name])
            .set(memory as f64);
        if let Some(o) = stats.get("vmm_overhead_rss_bytes").and_then(Value::as_u64) {
            self.overhead.with_label_values(&[ns, name]).set(o as f64);
        }
        for v in stats
            .get("vcpus")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let idx = v
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                .to_string();
            let secs = v.get("run_ns").and_then(Value::as_u64).unwrap_or(0) as f64 / 1e9;
            let d = self.delta(key(&["vcpu", &idx]), secs);
            self.vcpu_seconds
                .with_label_values(&[ns, name, &idx])
                .inc_by(d);
            self.note(ns, name, Family::Vcpu, &[ns, name, &idx]);
            for (reason, count) in v
                .get("exits")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let c = count.as_u64().unwrap_or(0) as f64;
                let d = self.delta(key(&["exit", &idx, reason]), c);
                self.exits
                    .with_label_values(&[ns, name, reason])
                    .inc_by(d as u64);
                self.note(ns, name, Family::Exits, &[ns, name, reason]);
            }
        }
        for dev in stats
            .get("devices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let id = dev.get("id").and_then(Value::as_str).unwrap_or("?");
            let kind = dev.get("kind").and_then(Value::as_str).unwrap_or("?");
            for (counter, value) in dev
                .get("counters")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let d = self.delta(key(&[id, counter]), value.as_u64().unwrap_or(0) as f64) as u64;
                let (first, rest) = counter.split_once('_').unwrap_or((counter.as_str(), ""));
                let (fam, labels): (Family, Vec<&str>) = match (kind, first, rest) {
                    ("disk", op, "bytes") => (Family::DiskBytes, vec![ns, name, id, op]),
                    ("disk", op, "ops") => (Family::DiskOps, vec![ns, name, id, op]),
                    ("disk", "errors", _) => (Family::DiskErrors, vec![ns, name, id]),
                    ("net", dir, "bytes") => (Family::NetBytes, vec![ns, name, id, dir]),
                    ("net", dir, "frames") => (Family::NetFrames, vec![ns, name, id, dir]),
                    ("net", "rx", "dropped") => (Family::NetDropped, vec![ns, name, id]),
                    _ => continue,
                };
                if let Some(family) = self.int_family(fam) {
                    family.with_label_values(&labels).inc_by(d);
                }
                self.note(ns, name, fam, &labels);
            }
        }
    }

    /// Drops every series of a VM that left this node.
    pub fn forget(&self, ns: &str, name: &str) {
        let prefix = format!("{ns}/{name}/");
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|k, _| !k.starts_with(&prefix));
        let labels = HashMap::from([("namespace", ns), ("name", name)]);
        let _ = self.memory.remove(&labels);
        let _ = self.overhead.remove(&labels);
        let _ = self.restarts.remove(&labels);
        let used = self
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&format!("{ns}/{name}"))
            .unwrap_or_default();
        for (fam, values) in used {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            let _ = match self.int_family(fam) {
                Some(family) => family.remove_label_values(&values),
                None => self.vcpu_seconds.remove_label_values(&values),
            };
        }
    }

    /// The integer counter family, `None` for the `f64` vCPU seconds.
    fn int_family(&self, fam: Family) -> Option<&IntCounterVec> {
        Some(match fam {
            Family::Vcpu => return None,
            Family::Exits => &self.exits,
            Family::DiskBytes => &self.disk_bytes,
            Family::DiskOps => &self.disk_ops,
            Family::DiskErrors => &self.disk_errors,
            Family::NetBytes => &self.net_bytes,
            Family::NetFrames => &self.net_frames,
            Family::NetDropped => &self.net_dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_import_metrics_are_exported() {
        let m = Metrics::new().unwrap();
        m.image_bytes("http", 4096);
        m.image_imported("http", 0.2);
        m.image_failed("ChecksumMismatch");
        m.image_cache(8192);
        let text = m.render();
        for line in [
            "kubevmm_image_import_bytes_total{source=\"http\"} 4096",
            "kubevmm_image_import_duration_seconds_count{source=\"http\"} 1",
            "kubevmm_image_import_failures_total{reason=\"ChecksumMismatch\"} 1",
            "kubevmm_image_cache_bytes 8192",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn folds_stats_into_counters_across_vmm_restarts() {
        let m = Metrics::new().expect("registry");
        let stats = |run_ns: u64, rd: u64| {
            serde_json::json!({
                "vcpus": [{"index": 0, "run_ns": run_ns, "exits": {"io_out": 10}}],
                "devices": [{"id": "root", "kind": "disk", "counters": {"read_bytes": rd, "read_ops": 1, "errors": 0}},
                            {"id": "lan", "kind": "net", "counters": {"rx_bytes": 5, "tx_frames": 2, "rx_dropped": 0}}],
                "vmm_overhead_rss_bytes": 3_000_000u64
            })
        };
        m.observe_stats("ns", "vm", 1 << 27, &stats(2_000_000_000, 4096));
        m.observe_stats("ns", "vm", 1 << 27, &stats(3_000_000_000, 8192));
        // VMM restarted: counters start again from zero.
        m.observe_stats("ns", "vm", 1 << 27, &stats(500_000_000, 1024));
        let text = m.render();
        assert!(
            text.contains(
                "kubevmm_vm_vcpu_seconds_total{name=\"vm\",namespace=\"ns\",vcpu=\"0\"} 3.5"
            ),
            "{text}"
        );
        assert!(text.contains("kubevmm_vm_disk_bytes_total{disk=\"root\",name=\"vm\",namespace=\"ns\",op=\"read\"} 9216"), "{text}");
        assert!(text.contains("kubevmm_vm_net_frames_total{direction=\"tx\",interface=\"lan\",name=\"vm\",namespace=\"ns\"} 2"), "{text}");
        m.forget("ns", "vm");
        assert!(!m.render().contains("name=\"vm\""));
    }
}
