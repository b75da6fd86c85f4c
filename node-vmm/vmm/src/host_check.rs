//! What this host offers for running guests: `/dev/kvm`, the KVM API
//! version, every capability the VMM relies on, and which kind of KVM this
//! is (hardware VT-x/AMD-V or a software module such as `kvm_pvm`).
//!
//! Used by `node-vmm doctor`, by the node agent to fill `HypervisorNode`
//! status, and by tests that need KVM (they fail with [`KvmReport::problem`]
//! when KVM is missing instead of skipping).

use std::fs;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// The KVM API version every KVM since Linux 2.6.22 reports.
pub const KVM_API_VERSION: i32 = 12;

/// Capabilities the VMM needs, with what it needs each one for.
pub const REQUIRED_CAPS: &[(Cap, &str, &str)] = &[
    (
        Cap::Irqchip,
        "KVM_CAP_IRQCHIP",
        "in-kernel PIC/IOAPIC/LAPIC",
    ),
    (Cap::Pit2, "KVM_CAP_PIT2", "in-kernel i8254 timer"),
    (Cap::Hlt, "KVM_CAP_HLT", "idle vCPUs halt in the kernel"),
    (
        Cap::UserMemory,
        "KVM_CAP_USER_MEMORY",
        "guest RAM from VMM mappings",
    ),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR", "x86 TSS region"),
    (
        Cap::SetIdentityMapAddr,
        "KVM_CAP_SET_IDENTITY_MAP_ADDR",
        "x86 identity map page",
    ),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID", "CPUID normalization"),
    (
        Cap::Irqfd,
        "KVM_CAP_IRQFD",
        "device interrupts through eventfds",
    ),
    (
        Cap::Ioeventfd,
        "KVM_CAP_IOEVENTFD",
        "virtqueue notifications through eventfds",
    ),
    (
        Cap::IrqRouting,
        "KVM_CAP_IRQ_ROUTING",
        "GSI routing for virtio interrupts",
    ),
    (
        Cap::MpState,
        "KVM_CAP_MP_STATE",
        "SMP start-up and pause state",
    ),
    (
        Cap::ImmediateExit,
        "KVM_CAP_IMMEDIATE_EXIT",
        "kicking vCPUs out for pause and stop",
    ),
    (
        Cap::AdjustClock,
        "KVM_CAP_ADJUST_CLOCK",
        "kvmclock across pause/resume",
    ),
];

/// Which implementation serves `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// Intel VT-x or AMD-V: guests run natively; Linux boots to userspace.
    Hardware,
    /// A software KVM such as `kvm_pvm`: the API works but guest kernel code
    /// runs in KVM's instruction emulator; Linux does not reach userspace.
    Software,
    /// No `/dev/kvm`.
    None,
}

impl KvmKind {
    /// `hardware`, `software` or `none`, as in `HypervisorNode` status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hardware => "hardware",
            Self::Software => "software",
            Self::None => "none",
        }
    }
}

/// What was found about KVM on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmReport {
    /// Hardware, software or none.
    pub kind: KvmKind,
    /// The loaded module serving /dev/kvm, when known.
    pub module: Option<String>,
    /// `KVM_GET_API_VERSION`, when /dev/kvm opened.
    pub api_version: Option<i32>,
    /// Capabilities present (name, purpose).
    pub present: Vec<(&'static str, &'static str)>,
    /// Capabilities missing (name, purpose).
    pub missing: Vec<(&'static str, &'static str)>,
    /// Why /dev/kvm is unusable, if it is.
    pub problem: Option<String>,
}

impl KvmReport {
    /// Whether guests can run here.
    pub fn usable(&self) -> bool {
        self.problem.is_none() && self.missing.is_empty()
    }
}

/// The KVM module loaded on this host, from `/sys/module`.
pub fn kvm_module(sys_module: &Path) -> Option<String> {
    ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| sys_module.join(m).exists())
        .map(str::to_string)
}

/// Classifies KVM from the loaded module (pure, for tests).
pub fn classify(module: Option<&str>, dev_kvm_present: bool) -> KvmKind {
    match (dev_kvm_present, module) {
        (false, _) => KvmKind::None,
        (true, Some("kvm_intel" | "kvm_amd")) => KvmKind::Hardware,
        // kvm_pvm, or an unknown provider: assume the slow path and say so.
        (true, _) => KvmKind::Software,
    }
}

/// Probes `/dev/kvm`.
pub fn probe() -> KvmReport {
    let dev = Path::new("/dev/kvm");
    let module = kvm_module(Path::new("/sys/module"));
    let kind = classify(module.as_deref(), dev.exists());
    let mut report = KvmReport {
        kind,
        module,
        api_version: None,
        present: Vec::new(),
        missing: Vec::new(),
        problem: None,
    };
    if !dev.exists() {
        report.problem = Some(
            "/dev/kvm does not exist: load kvm_intel or kvm_amd (enable VT-x/AMD-V in the firmware), \
             or run on a host with nested virtualization"
                .into(),
        );
        return report;
    }
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) if e.errno() == libc::EACCES => {
            report.problem = Some(format!(
                "/dev/kvm exists but cannot be opened ({e}): run as root or add the user to the group owning /dev/kvm"
            ));
            return report;
        }
        Err(e) => {
            report.problem = Some(format!("cannot open /dev/kvm: {e}"));
            return report;
        }
    };
    let version = kvm.get_api_version();
    report.api_version = Some(version);
    if version != KVM_API_VERSION {
        report.problem = Some(format!(
            "KVM API version is {version}, expected {KVM_API_VERSION}"
        ));
    }
    for (cap, name, purpose) in REQUIRED_CAPS {
        if kvm.check_extension(*cap) {
            report.present.push((name, purpose));
        } else {
            report.missing.push((name, purpose));
        }
    }
    report
}

/// Host CPU model name from `/proc/cpuinfo`.
pub fn cpu_model() -> Option<String> {
    let text = fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_modules() {
        assert_eq!(classify(Some("kvm_intel"), true), KvmKind::Hardware);
        assert_eq!(classify(Some("kvm_amd"), true), KvmKind::Hardware);
        assert_eq!(classify(Some("kvm_pvm"), true), KvmKind::Software);
        assert_eq!(classify(None, true), KvmKind::Software);
        assert_eq!(classify(Some("kvm_intel"), false), KvmKind::None);
    }

    #[test]
    fn finds_module_in_sys() {
        let dir = std::env::temp_dir().join(format!("kvm-mod-{}", std::process::id()));
        fs::create_dir_all(dir.join("kvm_amd")).unwrap();
        assert_eq!(kvm_module(&dir).as_deref(), Some("kvm_amd"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
