//! `kubectl vm top`: CPU, memory, disk and network use of running VMs,
//! from node-vmm's figures (the VMM's counters through the subresource
//! `virtualmachines/stats`), sampled twice a second apart. The rates are a
//! pure function of the two samples.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use kubevmm_crds::{VirtualMachine, VmPhase};
use serde_json::Value;

use crate::listing::align;
use crate::subresource::{get_json, uri, Sub, SubresourceError};

/// How long between the two samples.
const INTERVAL: Duration = Duration::from_secs(1);

/// The counters of one sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// Nanoseconds the vCPUs spent running the guest, all vCPUs.
    pub run_ns: u64,
    /// Resident memory of the VMM, guest RAM it touched included.
    pub rss_bytes: u64,
    /// Disk bytes read, all disks.
    pub disk_read: u64,
    /// Disk bytes written, all disks.
    pub disk_write: u64,
    /// Network bytes received by the guest, all NICs.
    pub net_rx: u64,
    /// Network bytes sent by the guest, all NICs.
    pub net_tx: u64,
}

impl Sample {
    /// Reads `GET /vm/stats` (docs/vmm-api.md); missing fields count 0.
    pub fn of(stats: &Value) -> Self {
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let mut s = Sample {
            rss_bytes: n(&stats["vmm_rss_bytes"]),
            ..Sample::default()
        };
        for v in stats["vcpus"].as_array().into_iter().flatten() {
            s.run_ns = s.run_ns.saturating_add(n(&v["run_ns"]));
        }
        for d in stats["devices"].as_array().into_iter().flatten() {
            let c = &d["counters"];
            match d["kind"].as_str() {
                Some("disk") => {
                    s.disk_read = s.disk_read.saturating_add(n(&c["read_bytes"]));
                    s.disk_write = s.disk_write.saturating_add(n(&c["write_bytes"]));
                }
                Some("net") => {
                    s.net_rx = s.net_rx.saturating_add(n(&c["rx_bytes"]));
                    s.net_tx = s.net_tx.saturating_add(n(&c["tx_bytes"]));
                }
                _ => {}
            }
        }
        s
    }
}

/// One line of `top`.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    /// vCPU time per second, in percent of one CPU (200 = two busy vCPUs).
    pub cpu_percent: f64,
    /// Resident memory now.
    pub rss_bytes: u64,
    /// Bytes per second.
    pub disk_read: f64,
    /// Bytes per second.
    pub disk_write: f64,
    /// Bytes per second.
    pub net_rx: f64,
    /// Bytes per second.
    pub net_tx: f64,
}

/// The rates between two samples `dt` apart (a counter that went back, as
/// after a restart of the VMM, counts as 0).
#[allow(clippy::cast_precision_loss)] // rates for people
pub fn usage(before: Sample, after: Sample, dt: Duration) -> Usage {
    let secs = dt.as_secs_f64().max(1e-3);
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    Usage {
        cpu_percent: rate(before.run_ns, after.run_ns) / 1e9 * 100.0,
        rss_bytes: after.rss_bytes,
        disk_read: rate(before.disk_read, after.disk_read),
        disk_write: rate(before.disk_write, after.disk_write),
        net_rx: rate(before.net_rx, after.net_rx),
        net_tx: rate(before.net_tx, after.net_tx),
    }
}

/// Bytes as kubectl top prints memory: `12Mi`; rates with `/s`.
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
fn bytes(b: f64) -> String {
    const UNITS: [&str; 4] = ["", "Ki", "Mi", "Gi"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{}{}", v.round() as u64, UNITS[i])
}

/// The table of `top`: name and usage per VM, sorted by name.
#[allow(clippy::cast_precision_loss)]
pub fn render(rows: &[(String, Usage)]) -> String {
    let mut table = vec![[
        "NAME",
        "CPU",
        "MEMORY",
        "DISK-READ",
        "DISK-WRITE",
        "NET-RX",
        "NET-TX",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect::<Vec<_>>()];
    let mut sorted: Vec<&(String, Usage)> = rows.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, u) in sorted {
        table.push(vec![
            name.clone(),
            format!("{:.0}%", u.cpu_percent),
            bytes(u.rss_bytes as f64),
            format!("{}/s", bytes(u.disk_read)),
            format!("{}/s", bytes(u.disk_write)),
            format!("{}/s", bytes(u.net_rx)),
            format!("{}/s", bytes(u.net_tx)),
        ]);
    }
    align(&table)
}

/// Why `top` has nothing to show.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// The VMs cannot be listed.
    #[error("{0}")]
    List(String),
    /// A stream request failed.
    #[error(transparent)]
    Stats(#[from] SubresourceError),
    /// Nothing runs.
    #[error("no running VirtualMachine in namespace {0}")]
    NothingRuns(String),
}

async fn sample(client: &Client, ns: &str, name: &str) -> Result<Sample, SubresourceError> {
    let u = uri(ns, name, Sub::Stats, &[])?;
    Ok(Sample::of(&get_json(client, &u).await?))
}

/// Runs `top` for `name` (one VM) or every running VM of `ns`.
pub async fn top(client: &Client, ns: &str, name: Option<&str>) -> Result<(), TopError> {
    let names: Vec<String> = if let Some(n) = name {
        vec![n.to_string()]
    } else {
        let api: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| TopError::List(format!("cannot list VirtualMachines in {ns}: {e}")))?;
        list.items
            .iter()
            .filter(|v| {
                matches!(
                    v.status.as_ref().and_then(|s| s.phase),
                    Some(VmPhase::Running | VmPhase::Paused)
                )
            })
            .map(ResourceExt::name_any)
            .collect()
    };
    if names.is_empty() {
        return Err(TopError::NothingRuns(ns.into()));
    }
    let mut first = Vec::new();
    for n in &names {
        first.push((sample(client, ns, n).await?, Timestamp::now()));
    }
    tokio::time::sleep(INTERVAL).await;
    let mut rows = Vec::new();
    for (n, (before, at)) in names.iter().zip(first) {
        let after = sample(client, ns, n).await?;
        let dt = Duration::try_from(Timestamp::now().duration_since(at)).unwrap_or(INTERVAL);
        rows.push((n.clone(), usage(before, after, dt)));
    }
    print!("{}", render(&rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn samples_add_up_vcpus_disks_and_nics() {
        let stats = json!({
            "vcpus": [{"index": 0, "run_ns": 100}, {"index": 1, "run_ns": 50}],
            "devices": [
                {"id": "root", "kind": "disk", "counters": {"read_bytes": 10, "write_bytes": 20}},
                {"id": "data", "kind": "disk", "counters": {"read_bytes": 1, "write_bytes": 2}},
                {"id": "lan", "kind": "net", "counters": {"rx_bytes": 7, "tx_bytes": 8}},
                {"id": "rng", "kind": "rng", "counters": {}}
            ],
            "vmm_rss_bytes": 4096
        });
        assert_eq!(
            Sample::of(&stats),
            Sample {
                run_ns: 150,
                rss_bytes: 4096,
                disk_read: 11,
                disk_write: 22,
                net_rx: 7,
                net_tx: 8
            }
        );
        assert_eq!(Sample::of(&json!({})), Sample::default());
    }

    #[test]
    fn rates_are_per_second_and_never_negative() {
        let before = Sample {
            run_ns: 1_000_000_000,
            disk_read: 0,
            net_tx: 5_000,
            ..Sample::default()
        };
        let after = Sample {
            run_ns: 1_500_000_000,
            rss_bytes: 12 << 20,
            disk_read: 2 << 20,
            net_tx: 1_000,
            ..Sample::default()
        };
        let u = usage(before, after, Duration::from_secs(2));
        assert!((u.cpu_percent - 25.0).abs() < 1e-9, "{u:?}");
        assert!((u.disk_read - f64::from(1 << 20)).abs() < 1e-9);
        assert!(
            u.net_tx.abs() < f64::EPSILON,
            "a counter that went back counts 0"
        );
        let text = render(&[("web".into(), u)]);
        assert_eq!(
            text.lines().nth(1).unwrap(),
            "web    25%   12Mi     1Mi/s       0/s          0/s      0/s"
        );
    }
}
