//! Network metrics, read when Prometheus scrapes: per guest NIC the tap's
//! kernel counters and the anti-spoofing drops, and the DHCP server's
//! counters. [`render`] is pure (tested); [`sample`] reads the node.

use std::fmt::Write as _;
use std::path::Path;

/// One guest NIC's counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NicSample {
    /// VM namespace.
    pub namespace: String,
    /// VM name.
    pub name: String,
    /// `spec.networks[].name`.
    pub interface: String,
    /// Bytes, packets and drops the guest sent (the tap's rx).
    pub from_guest: [u64; 3],
    /// Bytes, packets and drops towards the guest (the tap's tx).
    pub to_guest: [u64; 3],
    /// Frames dropped by the anti-spoofing rules.
    pub spoofed: u64,
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text.
pub fn render(nics: &[NicSample], dhcp: &[(String, u64)], leases: usize) -> String {
    let mut s = String::new();
    let families = [
        (
            "kubevmm_vm_nic_bytes_total",
            "Bytes through a guest NIC's tap by direction",
            0,
        ),
        (
            "kubevmm_vm_nic_packets_total",
            "Packets through a guest NIC's tap by direction",
            1,
        ),
        (
            "kubevmm_vm_nic_dropped_total",
            "Packets the tap dropped by direction",
            2,
        ),
    ];
    for (family, help, i) in families {
        let _ = writeln!(s, "# HELP {family} {help}\n# TYPE {family} counter");
        for n in nics {
            for (dir, v) in [("from_guest", n.from_guest[i]), ("to_guest", n.to_guest[i])] {
                let _ = writeln!(
                    s,
                    "{family}{{namespace=\"{}\",name=\"{}\",interface=\"{}\",direction=\"{dir}\"}} {v}",
                    esc(&n.namespace),
                    esc(&n.name),
                    esc(&n.interface)
                );
            }
        }
    }
    let f = "kubevmm_vm_spoofed_packets_total";
    let _ = writeln!(
        s,
        "# HELP {f} Frames a guest sent from another MAC or address, dropped\n# TYPE {f} counter"
    );
    for n in nics {
        let _ = writeln!(
            s,
            "{f}{{namespace=\"{}\",name=\"{}\",interface=\"{}\"}} {}",
            esc(&n.namespace),
            esc(&n.name),
            esc(&n.interface),
            n.spoofed
        );
    }
    let f = "kubevmm_dhcp_events_total";
    let _ = writeln!(
        s,
        "# HELP {f} DHCP server messages and outcomes (received_<type>, sent_<type>, naks, drops, pool_exhausted, ...)\n# TYPE {f} counter"
    );
    for (event, v) in dhcp {
        let _ = writeln!(s, "{f}{{event=\"{}\"}} {v}", esc(event));
    }
    let f = "kubevmm_dhcp_reserved_addresses";
    let _ = writeln!(
        s,
        "# HELP {f} Masquerade addresses reserved for VM NICs on this node\n# TYPE {f} gauge\n{f} {leases}"
    );
    s
}

fn counter(tap: &str, stat: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{stat}"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The counters of every guest NIC with a tap on the node.
pub fn sample(state_dir: &Path, table: &str) -> Vec<NicSample> {
    let spoofed = super::nft::spoof_drops(table);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(state_dir.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = entry.path();
        let (Ok(cfg), Some(owner)) = (
            std::fs::read(dir.join("vmm.json"))
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    serde_json::from_slice::<kubevmm_vmm::VmConfig>(&t).map_err(|e| e.to_string())
                }),
            super::disks::DiskDir(dir.clone()).owner(),
        ) else {
            continue;
        };
        for (i, n) in cfg.nets.into_iter().enumerate() {
            let tap = n
                .tap
                .unwrap_or_else(|| super::taps::tap_name(&owner.uid, i));
            if super::netlink::index(&tap).is_none() {
                continue;
            }
            let c = |s: &str| counter(&tap, s);
            out.push(NicSample {
                namespace: owner.namespace.clone(),
                name: owner.name.clone(),
                interface: n.id.clone(),
                from_guest: [c("rx_bytes"), c("rx_packets"), c("rx_dropped")],
                to_guest: [c("tx_bytes"), c("tx_packets"), c("tx_dropped")],
                spoofed: spoofed
                    .iter()
                    .find(|(t, _)| *t == tap)
                    .map_or(0, |(_, v)| *v),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_nic_and_dhcp_families() {
        let nic = NicSample {
            namespace: "ns".into(),
            name: "vm\"1".into(),
            interface: "default".into(),
            from_guest: [100, 2, 0],
            to_guest: [300, 4, 1],
            spoofed: 20,
        };
        let text = render(&[nic], &[("received_DISCOVER".into(), 3)], 2);
        for want in [
            "# TYPE kubevmm_vm_nic_bytes_total counter",
            "kubevmm_vm_nic_bytes_total{namespace=\"ns\",name=\"vm\\\"1\",interface=\"default\",direction=\"from_guest\"} 100",
            "kubevmm_vm_nic_dropped_total{namespace=\"ns\",name=\"vm\\\"1\",interface=\"default\",direction=\"to_guest\"} 1",
            "kubevmm_vm_spoofed_packets_total{namespace=\"ns\",name=\"vm\\\"1\",interface=\"default\"} 20",
            "kubevmm_dhcp_events_total{event=\"received_DISCOVER\"} 3",
            "kubevmm_dhcp_reserved_addresses 2",
        ] {
            assert!(text.contains(want), "{want}\nnot in\n{text}");
        }
    }
}
