//! `node-vmm doctor`: what this machine has and lacks for running guests.
//!
//! Each check yields a [`Finding`]; gathering facts (I/O) is kept apart from
//! judging them (pure functions, unit-tested). The exit status is non-zero
//! when guests cannot run at all.

use std::fmt::Write as _;
use std::fs;

use kubevmm_vmm::host_check::{self, KvmKind, KvmReport};

/// Smallest guest the VMM accepts; less free memory than this means no guest fits.
const MIN_GUEST_BYTES: u64 = 64 << 20;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Present and usable.
    Ok,
    /// Works, with a limitation the user should know about.
    Warn,
    /// Guests cannot run until this is fixed.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Severity.
    pub level: Level,
    /// What was checked.
    pub item: String,
    /// What was found, and what to do if it is not ok.
    pub detail: String,
}

fn finding(level: Level, item: &str, detail: impl Into<String>) -> Finding {
    Finding {
        level,
        item: item.to_string(),
        detail: detail.into(),
    }
}

/// Judges the KVM probe.
pub fn judge_kvm(r: &KvmReport) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(problem) = &r.problem {
        out.push(finding(Level::Fail, "/dev/kvm", problem.clone()));
        return out;
    }
    out.push(finding(
        Level::Ok,
        "/dev/kvm",
        format!(
            "opened; KVM API version {}",
            r.api_version.unwrap_or_default()
        ),
    ));
    let module = r.module.as_deref().unwrap_or("unknown module");
    out.push(match r.kind {
        KvmKind::Hardware => finding(
            Level::Ok,
            "KVM kind",
            format!("hardware virtualization ({module}): guests run natively; stock Linux boots to userspace"),
        ),
        KvmKind::Software => finding(
            Level::Warn,
            "KVM kind",
            format!(
                "software KVM ({module}), no VT-x/AMD-V: guest kernel code runs in KVM's instruction \
                 emulator (~1.3M instructions/s) and some instructions are not emulated; small test \
                 guests run, Linux guests do not reach userspace, full-Linux tests are not run"
            ),
        ),
        KvmKind::None => finding(Level::Fail, "KVM kind", "no KVM"),
    });
    for (name, purpose) in &r.present {
        out.push(finding(Level::Ok, name, *purpose));
    }
    for (name, purpose) in &r.missing {
        out.push(finding(
            Level::Fail,
            name,
            format!("missing, needed for {purpose}: upgrade the host kernel"),
        ));
    }
    out
}

/// Judges `/dev/net/tun` access (`Ok(())` when it opened).
pub fn judge_tun(open: Result<(), std::io::Error>) -> Finding {
    match open {
        Ok(()) => finding(
            Level::Ok,
            "/dev/net/tun",
            "opened: tap networking available",
        ),
        Err(e) => finding(
            Level::Warn,
            "/dev/net/tun",
            format!("cannot open ({e}): guests get no network; run `modprobe tun` and run as root"),
        ),
    }
}

/// The controllers per-VM limits need (memory, pids, CPU quota).
const LIMIT_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Judges where per-VM limits go, from the text of `/proc/self/mounts` and
/// of the cgroup2 root's `cgroup.controllers`, as the agent decides it
/// (`agent::cgroups::Layout::detect`): cgroup v2 when it has the three
/// controllers, else the v1 hierarchies that have them.
pub fn judge_cgroup(mounts: &str, v2_controllers: &str) -> Finding {
    let mut v2_at = None;
    let mut v1: Vec<&str> = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match (f.get(1), f.get(2), f.get(3)) {
            (Some(dir), Some(&"cgroup2"), _) => v2_at = Some(*dir),
            (Some(_), Some(&"cgroup"), Some(opts)) => v1.extend(opts.split(',')),
            _ => {}
        }
    }
    let in_v2: Vec<&str> = v2_controllers.split_whitespace().collect();
    if let Some(dir) = v2_at.filter(|_| LIMIT_CONTROLLERS.iter().all(|c| in_v2.contains(c))) {
        return finding(
            Level::Ok,
            "cgroup",
            format!("v2 at {dir}: per-VM memory, pids and CPU limits there"),
        );
    }
    let missing: Vec<&str> = LIMIT_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !v1.contains(c))
        .collect();
    let v2_note = v2_at.map_or_else(String::new, |dir| {
        format!(" (v2 at {dir} lacks some of memory, pids, cpu)")
    });
    if let (Some(dir), 3) = (v2_at, missing.len()) {
        return finding(
            Level::Warn,
            "cgroup",
            format!(
                "v2 at {dir} offers only \"{}\" and no v1 hierarchy has memory, pids or cpu: \
                 per-VM limits are not applied",
                in_v2.join(" ")
            ),
        );
    }
    match missing.len() {
        0 => finding(
            Level::Ok,
            "cgroup",
            format!("v1 memory, pids and cpu hierarchies: per-VM limits there{v2_note}"),
        ),
        3 if v1.is_empty() && v2_at.is_none() => finding(
            Level::Warn,
            "cgroup",
            "no cgroup filesystem mounted: per-VM limits are not applied",
        ),
        _ => finding(
            Level::Warn,
            "cgroup",
            format!(
                "no {} controller mounted{v2_note}: per-VM {} limits are not applied",
                missing.join(", "),
                missing.join(", ")
            ),
        ),
    }
}

/// Judges how fast a VMM can be moved into its cgroups, from the text of
/// `/proc/self/mountinfo` (see `agent::favordynmods`).
pub fn judge_cgroup_moves(mountinfo: &str) -> Finding {
    use crate::agent::favordynmods::{parse_mountinfo, plan, Plan};
    let item = "cgroup moves";
    match plan(&parse_mountinfo(mountinfo)) {
        Plan::AlreadyOn(at) => finding(
            Level::Ok,
            item,
            format!("fast: favordynmods is on ({})", at.display()),
        ),
        Plan::Reconfigure { mount, .. } => finding(
            Level::Warn,
            item,
            format!(
                "each VM start waits for an RCU grace period (5-16 ms here and there); \
                 the agent turns favordynmods on at {} when it starts, or run \
                 `mount -o remount,favordynmods {}` yourself",
                mount.display(),
                mount.display()
            ),
        ),
        Plan::NoCgroup2 => finding(
            Level::Warn,
            item,
            "each VM start waits for an RCU grace period; no cgroup2 mount to set favordynmods on: \
             boot with cgroup_favordynmods=true",
        ),
    }
}

/// Judges `MemAvailable` from the text of `/proc/meminfo`.
pub fn judge_memory(meminfo: &str) -> Finding {
    let avail_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok());
    match avail_kib {
        None => finding(
            Level::Warn,
            "memory",
            "cannot read MemAvailable from /proc/meminfo",
        ),
        Some(kib) if kib * 1024 < MIN_GUEST_BYTES => finding(
            Level::Fail,
            "memory",
            format!(
                "{} MiB available: not enough for the smallest guest (64 MiB)",
                kib / 1024
            ),
        ),
        Some(kib) => finding(
            Level::Ok,
            "memory",
            format!(
                "{}.{} GiB available for guests",
                kib >> 20,
                ((kib & ((1 << 20) - 1)) * 10) >> 20
            ),
        ),
    }
}

/// Gathers every finding on this host.
pub fn examine() -> Vec<Finding> {
    let mut out = judge_kvm(&host_check::probe());
    if let Some(model) = host_check::cpu_model() {
        out.insert(0, finding(Level::Ok, "CPU", model));
    }
    out.push(judge_tun(
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map(drop),
    ));
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let v2_controllers = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2"))
                .then(|| f.get(1).copied())
                .flatten()
        })
        .and_then(|dir| fs::read_to_string(format!("{dir}/cgroup.controllers")).ok())
        .unwrap_or_default();
    out.push(judge_cgroup(&mounts, &v2_controllers));
    out.push(judge_cgroup_moves(
        &fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
    ));
    out.push(judge_memory(
        &fs::read_to_string("/proc/meminfo").unwrap_or_default(),
    ));
    out
}

/// Renders the report and the verdict.
pub fn render(findings: &[Finding]) -> String {
    let mut s = String::from("node-vmm doctor\n");
    for f in findings {
        let tag = match f.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        let _ = writeln!(s, "  {tag}  {:<30} {}", f.item, f.detail);
    }
    let worst = findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok);
    let software = findings
        .iter()
        .any(|f| f.item == "KVM kind" && f.level == Level::Warn);
    let verdict = match (worst, software) {
        (Level::Fail, _) => "guests cannot run here: fix the FAIL lines above",
        (_, true) => "guests can run here (software KVM: our test guests only; Linux will not reach userspace)",
        _ => "guests can run here",
    };
    let _ = writeln!(s, "result: {verdict}");
    s
}

/// Whether the findings allow guests to run.
pub fn can_run(findings: &[Finding]) -> bool {
    findings.iter().all(|f| f.level != Level::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_kvm_fails_with_advice() {
        let r = KvmReport {
            kind: KvmKind::None,
            module: None,
            api_version: None,
            present: vec![],
            missing: vec![],
            problem: Some("/dev/kvm does not exist: load kvm_intel".into()),
        };
        let f = judge_kvm(&r);
        assert_eq!(f[0].level, Level::Fail);
        assert!(!can_run(&f));
        assert!(render(&f).contains("guests cannot run here"));
    }

    #[test]
    fn software_kvm_is_a_warning() {
        let r = KvmReport {
            kind: KvmKind::Software,
            module: Some("kvm_pvm".into()),
            api_version: Some(12),
            present: vec![("KVM_CAP_IRQCHIP", "x")],
            missing: vec![],
            problem: None,
        };
        let f = judge_kvm(&r);
        assert!(can_run(&f));
        assert!(render(&f).contains("software KVM"));
    }

    #[test]
    fn missing_capability_fails() {
        let r = KvmReport {
            kind: KvmKind::Hardware,
            module: Some("kvm_intel".into()),
            api_version: Some(12),
            present: vec![],
            missing: vec![("KVM_CAP_IRQFD", "device interrupts")],
            problem: None,
        };
        assert!(!can_run(&judge_kvm(&r)));
    }

    #[test]
    fn cgroup_layouts() {
        let v2 = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        let hybrid = "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
                      cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,pids 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        let no_pids = hybrid.replace("rw,nosuid,pids", "rw,freezer");
        // mounts, v2 controllers | level, detail contains
        let table = [
            (
                v2,
                "cpuset cpu io memory pids",
                Level::Ok,
                "v2 at /sys/fs/cgroup: per-VM",
            ),
            (v2, "cpu io", Level::Warn, "offers only \"cpu io\""),
            (hybrid, "", Level::Ok, "v1 memory, pids and cpu hierarchies"),
            (&no_pids, "", Level::Warn, "no pids controller mounted"),
            ("", "", Level::Warn, "no cgroup filesystem mounted"),
        ];
        for (mounts, controllers, level, detail) in table {
            let f = judge_cgroup(mounts, controllers);
            assert_eq!(f.level, level, "{mounts}: {f:?}");
            assert!(f.detail.contains(detail), "{mounts}: {f:?}");
        }
    }

    #[test]
    fn cgroup_moves() {
        let v2 = "9 1 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        // mountinfo | level | detail contains
        let table = [
            (
                v2.to_string(),
                Level::Warn,
                "remount,favordynmods /sys/fs/cgroup",
            ),
            (
                v2.replace("nsdelegate", "nsdelegate,favordynmods"),
                Level::Ok,
                "fast",
            ),
            (
                "3 1 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n".into(),
                Level::Warn,
                "cgroup_favordynmods=true",
            ),
        ];
        for (text, level, detail) in table {
            let f = judge_cgroup_moves(&text);
            assert_eq!(f.level, level, "{text}: {f:?}");
            assert!(f.detail.contains(detail), "{text}: {f:?}");
        }
    }

    #[test]
    fn memory_thresholds() {
        assert_eq!(
            judge_memory("MemAvailable:   24000000 kB\n").level,
            Level::Ok
        );
        assert_eq!(judge_memory("MemAvailable:   1000 kB\n").level, Level::Fail);
        assert_eq!(judge_memory("").level, Level::Warn);
    }
}
