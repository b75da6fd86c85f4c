//! `kubectl vm list`: the rows and their text, as pure functions of the
//! VMs and the time (the same columns as `kubectl get vm`, stopped VMs too).

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt as _;
use kubevmm_crds::contract::{condition, ConditionStatus};
use kubevmm_crds::printable::printable_status;
use kubevmm_crds::VirtualMachine;

/// One line of the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The VM's namespace.
    pub namespace: String,
    /// The VM's name.
    pub name: String,
    /// `status.printableStatus` (derived the same way when not yet written).
    pub status: String,
    /// The `Ready` condition's status, empty when there is none.
    pub ready: String,
    /// `status.restartCount`.
    pub restarts: i32,
    /// `status.nodeName`.
    pub node: String,
    /// The first interface's address.
    pub ip: String,
    /// Time since creation, as kubectl prints it.
    pub age: String,
    /// `spec.cpus`.
    pub cpus: u32,
    /// `spec.memory`.
    pub memory: String,
}

/// The row of `vm` at time `now`.
pub fn row(vm: &VirtualMachine, now: Timestamp) -> Row {
    let status = vm.status.clone().unwrap_or_default();
    let word = status
        .printable_status
        .unwrap_or_else(|| printable_status(vm.metadata.deletion_timestamp.is_some(), &status));
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
        .map(|c| ConditionStatus::of(c).as_str().to_string())
        .unwrap_or_default();
    let age = vm.metadata.creation_timestamp.as_ref().map_or_else(
        || "<unknown>".into(),
        |t| human_duration(now.duration_since(t.0)),
    );
    Row {
        namespace: vm.namespace().unwrap_or_default(),
        name: vm.name_any(),
        status: word.as_str().into(),
        ready,
        restarts: status.restart_count,
        node: status.node_name.unwrap_or_default(),
        ip: status
            .interfaces
            .first()
            .and_then(|i| i.ip_address.clone())
            .unwrap_or_default(),
        age,
        cpus: vm.spec.cpus,
        memory: vm.spec.memory.0.clone(),
    }
}

/// Which columns to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Columns {
    /// A NAMESPACE column first (`-A`).
    pub namespace: bool,
    /// VCPUS and MEMORY at the end (`-o wide`).
    pub wide: bool,
}

/// The listing as kubectl prints tables: a header, columns padded to the
/// widest cell and three spaces apart, rows sorted by namespace and name.
pub fn render(rows: &[Row], columns: Columns) -> String {
    let mut header = vec!["NAME", "STATUS", "READY", "RESTARTS", "NODE", "IP", "AGE"];
    if columns.namespace {
        header.insert(0, "NAMESPACE");
    }
    if columns.wide {
        header.extend(["VCPUS", "MEMORY"]);
    }
    let mut sorted: Vec<&Row> = rows.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_string()).collect()];
    for r in sorted {
        let mut cells = vec![
            r.name.clone(),
            r.status.clone(),
            r.ready.clone(),
            r.restarts.to_string(),
            r.node.clone(),
            r.ip.clone(),
            r.age.clone(),
        ];
        if columns.namespace {
            cells.insert(0, r.namespace.clone());
        }
        if columns.wide {
            cells.extend([r.cpus.to_string(), r.memory.clone()]);
        }
        table.push(cells);
    }
    align(&table)
}

/// Pads every column but the last to its widest cell plus three spaces.
pub fn align(table: &[Vec<String>]) -> String {
    let columns = table.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            table
                .iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in table {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < r.len() {
                let pad = widths[c] - cell.chars().count() + 3;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A duration as kubectl's AGE column prints it (apimachinery's
/// `HumanDuration`): `45s`, `3m12s`, `47m`, `5h10m`, `2d3h`, `400d`, `3y20d`.
pub fn human_duration(d: SignedDuration) -> String {
    let secs = d.as_secs();
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    let (minutes, hours, days) = (secs / 60, secs / 3600, secs / 86_400);
    let two = |big: i64, unit: &str, small: i64, small_unit: &str| {
        if small == 0 {
            format!("{big}{unit}")
        } else {
            format!("{big}{unit}{small}{small_unit}")
        }
    };
    if secs < 120 {
        format!("{secs}s")
    } else if minutes < 10 {
        two(minutes, "m", secs % 60, "s")
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        two(hours, "h", minutes % 60, "m")
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        two(days, "d", hours % 24, "h")
    } else if hours < 24 * 365 * 2 {
        format!("{days}d")
    } else if hours < 24 * 365 * 8 {
        two(days / 365, "y", days % 365, "d")
    } else {
        format!("{}y", days / 365)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubevmm_crds::vm::InterfaceStatus;
    use kubevmm_crds::PrintableStatus;

    pub(crate) fn vm(yaml: &str) -> VirtualMachine {
        serde_yaml::from_str(yaml).expect("test VM")
    }

    const BASE: &str = "
apiVersion: kubevmm.io/v1alpha1
kind: VirtualMachine
metadata: {name: web, namespace: prod, creationTimestamp: '2026-12-05T10:00:00Z'}
spec:
  cpus: 2
  memory: 256Mi
  boot: {kernel: {path: /k}}
";

    #[test]
    fn ages_read_like_kubectl() {
        let table = [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (192, "3m12s"),
            (600, "10m"),
            (10_799, "179m"),
            (10_800, "3h"),
            (18_600, "5h10m"),
            (28_800, "8h"),
            (172_799, "47h"),
            (172_800, "2d"),
            (183_600, "2d3h"),
            (691_200, "8d"),
            (34_560_000, "400d"),
            (63_072_000 + 20 * 86_400, "2y20d"),
            (9 * 31_536_000, "9y"),
        ];
        for (secs, want) in table {
            assert_eq!(
                human_duration(SignedDuration::from_secs(secs)),
                want,
                "{secs}s"
            );
        }
    }

    #[test]
    fn a_row_shows_the_status_word_or_derives_it() {
        let now: Timestamp = "2026-12-05T10:05:00Z".parse().unwrap();
        let fresh = row(&vm(BASE), now);
        assert_eq!(fresh.status, "Pending");
        assert_eq!((fresh.ready.as_str(), fresh.age.as_str()), ("", "5m"));

        let mut running = vm(BASE);
        let mut st = kubevmm_crds::VirtualMachineStatus {
            printable_status: Some(PrintableStatus::CrashLoopBackOff),
            node_name: Some("n1".into()),
            restart_count: 3,
            ..Default::default()
        };
        st.interfaces.push(InterfaceStatus {
            name: "default".into(),
            ip_address: Some("10.0.0.2".into()),
            ..Default::default()
        });
        running.status = Some(st);
        let r = row(&running, now);
        assert_eq!(
            (
                r.status.as_str(),
                r.node.as_str(),
                r.ip.as_str(),
                r.restarts
            ),
            ("CrashLoopBackOff", "n1", "10.0.0.2", 3)
        );
    }

    #[test]
    fn the_table_is_sorted_and_aligned_with_optional_columns() {
        let now: Timestamp = "2026-12-05T10:00:30Z".parse().unwrap();
        let mut b = row(&vm(BASE), now);
        b.name = "b-long-name".into();
        let mut a = row(&vm(BASE), now);
        a.namespace = "dev".into();
        let narrow = render(
            &[b.clone(), a.clone()],
            Columns {
                namespace: false,
                wide: false,
            },
        );
        assert_eq!(
            narrow,
            "NAME          STATUS    READY   RESTARTS   NODE   IP   AGE\n\
             web           Pending           0                      30s\n\
             b-long-name   Pending           0                      30s\n"
        );
        let wide = render(
            &[b, a],
            Columns {
                namespace: true,
                wide: true,
            },
        );
        let lines: Vec<&str> = wide.lines().collect();
        assert_eq!(
            lines[0],
            "NAMESPACE   NAME          STATUS    READY   RESTARTS   NODE   IP   AGE   VCPUS   MEMORY"
        );
        assert!(lines[1].starts_with("dev         web "), "{wide}");
        assert!(lines[2].ends_with("30s   2       256Mi"), "{wide}");
    }
}
