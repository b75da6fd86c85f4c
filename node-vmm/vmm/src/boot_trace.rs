//! `kubevmm-vmm --trace-boot`: when each start-up step ended, so that
//! `make bench` can say where the time to the first guest output goes
//! (docs/testing.md, "Where start-up time goes").
//!
//! Each step is stamped once, with `CLOCK_MONOTONIC` (the clock a parent's
//! `Instant` reads, so it can add the process start it alone can see). The
//! report goes to stderr once the guest's first byte of output is out.
//! Off, a mark is one relaxed load.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The steps, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `main` entered: the process is loaded and Rust's runtime is up.
    Main,
    /// Configuration read and checked.
    Config,
    /// Seccomp filters compiled (applied later).
    Seccomp,
    /// `/dev/kvm` opened and its capabilities checked.
    Kvm,
    /// `KVM_CREATE_VM`, TSS and identity map.
    VmCreated,
    /// In-kernel irqchip, GSI routing and PIT.
    Irqchip,
    /// Guest RAM mapped and registered as memory slots.
    Memory,
    /// Legacy and virtio devices.
    Devices,
    /// ACPI, MP and SMBIOS tables written, kernel (and initrd) loaded.
    Kernel,
    /// vCPUs created and their registers, CPUID and MSRs set.
    Vcpus,
    /// vCPU threads spawned (the main thread then applies its filter
    /// while they apply theirs).
    Threads,
    /// The boot vCPU, its filter applied, enters `KVM_RUN` the first time.
    FirstRun,
    /// The guest's first byte of serial output reached the sink.
    FirstOutput,
}

impl Step {
    pub const ALL: [Step; 13] = [
        Step::Main,
        Step::Config,
        Step::Seccomp,
        Step::Kvm,
        Step::VmCreated,
        Step::Irqchip,
        Step::Memory,
        Step::Devices,
        Step::Kernel,
        Step::Vcpus,
        Step::Threads,
        Step::FirstRun,
        Step::FirstOutput,
    ];

    /// The name in the report (and in the bench's table).
    pub fn name(self) -> &'static str {
        match self {
            Step::Main => "main",
            Step::Config => "config",
            Step::Seccomp => "seccomp_build",
            Step::Kvm => "kvm_open",
            Step::VmCreated => "create_vm",
            Step::Irqchip => "irqchip_pit",
            Step::Memory => "memory_slots",
            Step::Devices => "devices",
            Step::Kernel => "tables_kernel",
            Step::Vcpus => "vcpus",
            Step::Threads => "vcpu_threads",
            Step::FirstRun => "first_kvm_run",
            Step::FirstOutput => "first_output",
        }
    }

    pub fn from_name(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.name() == name)
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static MARKS: [AtomicU64; Step::ALL.len()] = [const { AtomicU64::new(0) }; Step::ALL.len()];

/// `CLOCK_MONOTONIC` in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Starts tracing; `main_ns` is when `main` was entered.
pub fn enable(main_ns: u64) {
    ENABLED.store(true, Ordering::Relaxed);
    MARKS[Step::Main as usize].store(main_ns, Ordering::Relaxed);
}

/// Stamps `step` if tracing is on and it is not stamped yet. The first
/// output also writes the report.
pub fn mark(step: Step) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let first = MARKS[step as usize]
        .compare_exchange(0, monotonic_ns(), Ordering::Relaxed, Ordering::Relaxed)
        .is_ok();
    if first && step == Step::FirstOutput {
        let marks: Vec<u64> = MARKS.iter().map(|m| m.load(Ordering::Relaxed)).collect();
        eprint!("{}", report(&marks));
    }
}

/// One line per stamped step: its name, its absolute time, the time since
/// `main` and since the step before, in microseconds.
pub fn report(marks: &[u64]) -> String {
    let main = marks.first().copied().unwrap_or(0);
    let mut prev = main;
    let mut out = String::new();
    for (step, &at) in Step::ALL.iter().zip(marks) {
        if at == 0 {
            continue;
        }
        let _ = writeln!(
            out,
            "boot-trace: {} monotonic_ns={} since_main_us={} step_us={}",
            step.name(),
            at,
            at.saturating_sub(main) / 1000,
            at.saturating_sub(prev) / 1000,
        );
        prev = at;
    }
    out
}

/// A report line parsed back: (step, monotonic ns).
pub fn parse_line(line: &str) -> Option<(Step, u64)> {
    let rest = line.trim().strip_prefix("boot-trace: ")?;
    let mut words = rest.split_whitespace();
    let step = Step::from_name(words.next()?)?;
    let ns = words
        .find_map(|w| w.strip_prefix("monotonic_ns="))?
        .parse()
        .ok()?;
    Some((step, ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_skips_unstamped_steps_and_times_each_from_the_one_before() {
        let mut marks = vec![0u64; Step::ALL.len()];
        marks[Step::Main as usize] = 1_000_000;
        marks[Step::Config as usize] = 1_250_000;
        marks[Step::Memory as usize] = 8_250_000;
        let r = report(&marks);
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            "boot-trace: main monotonic_ns=1000000 since_main_us=0 step_us=0"
        );
        assert!(lines[1].ends_with("config monotonic_ns=1250000 since_main_us=250 step_us=250"));
        assert!(lines[2].ends_with("since_main_us=7250 step_us=7000"));
    }

    #[test]
    fn lines_parse_back_and_names_are_unique() {
        for s in Step::ALL {
            assert_eq!(Step::from_name(s.name()), Some(s));
            let line = format!(
                "boot-trace: {} monotonic_ns=42 since_main_us=0 step_us=0",
                s.name()
            );
            assert_eq!(parse_line(&line), Some((s, 42)));
        }
        assert_eq!(parse_line("boot-trace: nosuch monotonic_ns=1"), None);
        assert_eq!(parse_line("kubevmm-vmm: something else"), None);
        assert_eq!(parse_line("boot-trace: main monotonic_ns=x"), None);
    }
}
