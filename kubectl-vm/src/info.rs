//! `kubectl vm info`: one VM for people, as `virsh dominfo` and `kubectl
//! describe` print it, from the VM and its Events (pure text rendering).

use std::fmt::Write as _;

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kubevmm_crds::vm::{BootSource, Disk, Network};
use kubevmm_crds::VirtualMachine;

use crate::listing::{align, human_duration, row};

fn source(s: &BootSource) -> String {
    match (&s.image, &s.path) {
        (Some(i), _) => format!("image {i}"),
        (_, Some(p)) => format!("path {p}"),
        _ => "-".into(),
    }
}

fn disk_source(d: &Disk) -> String {
    let what = if let Some(i) = &d.image {
        format!("image {} (copy-on-write clone)", i.name)
    } else if let Some(e) = &d.empty_disk {
        format!("emptyDisk {}", e.size.0)
    } else if d.cloud_init.is_some() {
        "cloudInit seed".into()
    } else if let Some(h) = &d.host_disk {
        format!("hostDisk {}", h.path)
    } else {
        "-".into()
    };
    if d.read_only {
        format!("{what}, read-only")
    } else {
        what
    }
}

fn binding(n: &Network) -> String {
    match (&n.masquerade, &n.bridge) {
        (Some(_), _) => "masquerade".into(),
        (_, Some(b)) => format!("bridge {}", b.name),
        _ => "-".into(),
    }
}

fn ago(t: Timestamp, now: Timestamp) -> String {
    format!("{} ago", human_duration(now.duration_since(t)))
}

/// The text of `kubectl vm info` for `vm` and its `events` at `now`.
pub fn render(vm: &VirtualMachine, events: &[Event], now: Timestamp) -> String {
    let status = vm.status.clone().unwrap_or_default();
    let mut out = align(&summary(vm, now));
    section(&mut out, "Disks", &disks(&vm.spec.disks));
    section(&mut out, "Networks", &networks(vm));
    let mut conds = vec![header(&["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"])];
    for c in &status.conditions {
        conds.push(vec![
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            human_duration(now.duration_since(c.last_transition_time.0)),
            c.message.clone(),
        ]);
    }
    section(&mut out, "Conditions", &conds);
    if let Some(f) = &status.last_failure {
        let _ = writeln!(
            out,
            "Last failure:\n  {} ({}): {}",
            f.reason,
            f.count,
            f.summary()
        );
    }
    if !status.phase_transition_timestamps.is_empty() {
        let steps: Vec<String> = status
            .phase_transition_timestamps
            .iter()
            .map(|t| format!("{:?} {}", t.phase, ago(t.phase_transition_timestamp.0, now)))
            .collect();
        let _ = writeln!(out, "Phases:\n  {}", steps.join(" -> "));
    }
    section(&mut out, "Events", &event_rows(events, now));
    out
}

fn header(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_string()).collect()
}

/// A titled, indented table; `<none>` when it has only its header.
fn section(out: &mut String, title: &str, table: &[Vec<String>]) {
    let _ = writeln!(out, "{title}:");
    if table.len() <= 1 {
        out.push_str("  <none>\n");
        return;
    }
    for line in align(table).lines() {
        let _ = writeln!(out, "  {line}");
    }
}

fn summary(vm: &VirtualMachine, now: Timestamp) -> Vec<Vec<String>> {
    let r = row(vm, now);
    let spec = &vm.spec;
    let started = vm.status.as_ref().and_then(|s| s.started_at.as_ref());
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let mut head: Vec<Vec<String>> = vec![
        vec!["Name:".into(), r.name.clone()],
        vec!["Namespace:".into(), r.namespace.clone()],
        vec!["Status:".into(), r.status.clone()],
        vec!["Node:".into(), dash(&r.node)],
        vec!["IP:".into(), dash(&r.ip)],
        vec![
            "Started:".into(),
            started.map_or("-".into(), |t| format!("{} ({})", t.0, ago(t.0, now))),
        ],
        vec!["Restarts:".into(), r.restarts.to_string()],
        vec!["Run strategy:".into(), format!("{:?}", spec.run_strategy)],
        vec!["vCPUs:".into(), spec.cpus.to_string()],
        vec!["Memory:".into(), spec.memory.0.clone()],
        vec!["Paused:".into(), spec.paused.to_string()],
        vec!["Kernel:".into(), source(&spec.boot.kernel)],
    ];
    if let Some(i) = &spec.boot.initrd {
        head.push(vec!["Initrd:".into(), source(i)]);
    }
    head.push(vec![
        "Command line:".into(),
        spec.boot.cmdline.clone().unwrap_or_else(|| "-".into()),
    ]);
    head.push(vec![
        "Grace period:".into(),
        format!("{}s", spec.termination_grace_period_seconds),
    ]);
    head
}

fn disks(list: &[Disk]) -> Vec<Vec<String>> {
    let mut rows = vec![header(&["NAME", "DEVICE", "SOURCE"])];
    for (i, d) in list.iter().enumerate() {
        let dev = u8::try_from(i)
            .ok()
            .filter(|i| *i < 26)
            .map_or("-".into(), |i| format!("vd{}", char::from(b'a' + i)));
        rows.push(vec![d.name.clone(), dev, disk_source(d)]);
    }
    rows
}

fn networks(vm: &VirtualMachine) -> Vec<Vec<String>> {
    let seen_all = vm
        .status
        .as_ref()
        .map(|s| s.interfaces.as_slice())
        .unwrap_or_default();
    let mut rows = vec![header(&["NAME", "BINDING", "MAC", "IP", "TAP"])];
    for n in &vm.spec.networks {
        let seen = seen_all.iter().find(|i| i.name == n.name);
        let field = |f: Option<&String>| f.map_or("-".to_string(), Clone::clone);
        rows.push(vec![
            n.name.clone(),
            binding(n),
            field(seen.and_then(|s| s.mac.as_ref()).or(n.mac_address.as_ref())),
            field(seen.and_then(|s| s.ip_address.as_ref())),
            field(seen.and_then(|s| s.tap.as_ref())),
        ]);
    }
    rows
}

/// The newest ten Events, oldest first.
fn event_rows(events: &[Event], now: Timestamp) -> Vec<Vec<String>> {
    let mut rows = vec![header(&["TYPE", "REASON", "AGE", "FROM", "MESSAGE"])];
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| event_time(e));
    let skip = sorted.len().saturating_sub(10);
    for e in sorted.into_iter().skip(skip) {
        rows.push(vec![
            e.type_.clone().unwrap_or_default(),
            e.reason.clone().unwrap_or_default(),
            event_time(e).map_or("-".into(), |t| human_duration(now.duration_since(t))),
            e.reporting_component
                .clone()
                .filter(|c| !c.is_empty())
                .or_else(|| e.source.as_ref().and_then(|s| s.component.clone()))
                .unwrap_or_default(),
            e.message.clone().unwrap_or_default().replace('\n', " "),
        ]);
    }
    rows
}

/// When an Event last happened, whichever API wrote it.
fn event_time(e: &Event) -> Option<Timestamp> {
    e.series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn info_names_every_part_of_the_vm() {
        let vm: VirtualMachine = serde_json::from_value(json!({
            "apiVersion": "kubevmm.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "web", "namespace": "dev", "creationTimestamp": "2026-12-05T10:00:00Z"},
            "spec": {"cpus": 2, "memory": "512Mi", "boot": {"kernel": {"image": "debian-6.1"}, "cmdline": "console=ttyS0"},
                     "disks": [{"name": "root", "image": {"name": "debian-12"}},
                               {"name": "data", "hostDisk": {"path": "/srv/d.img"}, "readOnly": true}],
                     "networks": [{"name": "default", "masquerade": {}}]},
            "status": {"phase": "Running", "printableStatus": "Running", "nodeName": "n1", "restartCount": 1,
                       "interfaces": [{"name": "default", "mac": "52:54:00:00:00:01", "ipAddress": "10.0.0.2", "tap": "kvm0"}],
                       "conditions": [{"type": "Ready", "status": "True", "reason": "GuestRunning",
                                       "message": "the guest runs", "lastTransitionTime": "2026-12-05T10:00:10Z"}],
                       "phaseTransitionTimestamps": [{"phase": "Pending", "phaseTransitionTimestamp": "2026-12-05T10:00:00Z"},
                                                     {"phase": "Running", "phaseTransitionTimestamp": "2026-12-05T10:00:01Z"}]}
        }))
        .unwrap();
        let ev: Event = serde_json::from_value(json!({
            "metadata": {"name": "e1", "namespace": "dev"},
            "involvedObject": {"name": "web"},
            "type": "Normal", "reason": "Started", "message": "VMM pid 42 started",
            "lastTimestamp": "2026-12-05T10:00:01Z", "source": {"component": "node-vmm"}
        }))
        .unwrap();
        let now: Timestamp = "2026-12-05T10:01:00Z".parse().unwrap();
        let text = render(&vm, &[ev], now);
        for want in [
            "Name:           web",
            "Status:         Running",
            "Node:           n1",
            "IP:             10.0.0.2",
            "Kernel:         image debian-6.1",
            "root   vda      image debian-12 (copy-on-write clone)",
            "data   vdb      hostDisk /srv/d.img, read-only",
            "default   masquerade   52:54:00:00:00:01   10.0.0.2   kvm0",
            "Ready   True     GuestRunning   50s     the guest runs",
            "Pending 60s ago -> Running 59s ago",
            "Normal   Started   59s   node-vmm   VMM pid 42 started",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
