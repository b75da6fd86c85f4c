//! Why the VMM stops, and the process exit code for each reason.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Exit codes of `kubevmm-vmm` (documented in docs/vmm.md).
pub mod code {
    /// The guest powered off (ACPI S5).
    pub const POWER_OFF: i32 = 0;
    /// Bad configuration or a VMM failure (missing file, no /dev/kvm, ...).
    pub const VMM_ERROR: i32 = 1;
    /// The guest crashed: triple fault, emulation failure, guest panic.
    pub const GUEST_CRASH: i32 = 2;
    /// The guest rebooted and `on_reboot` is `exit`.
    pub const REBOOT: i32 = 3;
    /// Stopped by the control API (`force stop`).
    pub const STOPPED: i32 = 4;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    PowerOff,
    Reboot,
    Crash(String),
    Stopped,
    Error(String),
}

impl ExitReason {
    pub fn code(&self) -> i32 {
        match self {
            ExitReason::PowerOff => code::POWER_OFF,
            ExitReason::Reboot => code::REBOOT,
            ExitReason::Crash(_) => code::GUEST_CRASH,
            ExitReason::Stopped => code::STOPPED,
            ExitReason::Error(_) => code::VMM_ERROR,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ExitReason::PowerOff => "guest powered off".into(),
            ExitReason::Reboot => "guest requested a reboot".into(),
            ExitReason::Crash(why) => format!("guest crashed: {why}"),
            ExitReason::Stopped => "stopped through the control API".into(),
            ExitReason::Error(why) => format!("VMM error: {why}"),
        }
    }
}

/// Shared by vCPUs and devices: the first reason recorded wins and wakes the
/// main loop through an eventfd.
#[derive(Debug, Clone)]
pub struct ExitSignal {
    inner: Arc<(Mutex<Option<ExitReason>>, EventFd)>,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new((Mutex::new(None), EventFd::new(libc::EFD_NONBLOCK)?)),
        })
    }

    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.inner.0.lock().expect("exit lock poisoned");
        if slot.is_none() {
            *slot = Some(reason);
            // A failed eventfd write only means the counter is saturated: already signalled.
            let _ = self.inner.1.write(1);
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.inner.0.lock().expect("exit lock poisoned").clone()
    }

    pub fn take(&self) -> Option<ExitReason> {
        self.inner.0.lock().expect("exit lock poisoned").take()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.inner.1
    }
}
