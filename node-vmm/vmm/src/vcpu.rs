//! vCPU threads: run loop, exit dispatch, pause/resume and statistics.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::Bus;
use crate::exit::{ExitReason, ExitSignal};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("cannot start vCPU thread {0}: {1}")]
    Spawn(u8, std::io::Error),
}

/// Exit counters, by reason.
pub const EXIT_KINDS: [&str; 8] = [
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "interrupted",
    "shutdown",
    "internal_error",
    "other",
];

/// Per-vCPU counters, readable from the API thread.
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// Nanoseconds spent inside `KVM_RUN`.
    pub run_ns: AtomicU64,
    pub exits: [AtomicU64; EXIT_KINDS.len()],
}

impl VcpuStats {
    fn count(&self, kind: usize) {
        self.exits[kind].fetch_add(1, Ordering::Relaxed);
    }
}

/// Pause gate shared by all vCPUs.
#[derive(Debug, Default)]
pub struct PauseGate {
    want_paused: AtomicBool,
    parked: Mutex<usize>,
    cv: Condvar,
}

impl PauseGate {
    fn park_if_requested(&self) {
        if !self.want_paused.load(Ordering::Acquire) {
            return;
        }
        let mut parked = self.parked.lock().expect("pause lock poisoned");
        *parked += 1;
        self.cv.notify_all();
        while self.want_paused.load(Ordering::Acquire) {
            parked = self.cv.wait(parked).expect("pause lock poisoned");
        }
        *parked -= 1;
        self.cv.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.want_paused.load(Ordering::Acquire)
    }
}

/// Shared state every vCPU thread needs.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    pub exit: ExitSignal,
    pub gate: Arc<PauseGate>,
    /// seccomp filter each vCPU thread installs before its first `KVM_RUN`.
    pub filters: Option<crate::seccomp::Filters>,
}

impl std::fmt::Debug for VcpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuContext").finish_non_exhaustive()
    }
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    pub index: u8,
    pub stats: Arc<VcpuStats>,
    thread: JoinHandle<()>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler for the signal that kicks vCPUs out of `KVM_RUN`.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(VcpuError::Signal)
}

impl VcpuHandle {
    pub fn spawn(index: u8, vcpu: VcpuFd, ctx: VcpuContext) -> Result<Self, VcpuError> {
        let stats = Arc::new(VcpuStats::default());
        let s = stats.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || run(index, vcpu, &ctx, &s))
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(Self {
            index,
            stats,
            thread,
        })
    }

    fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the pthread id belongs to a live thread we own (the handle
        // keeps it joinable), and SIGRTMIN has a no-op handler installed.
        unsafe {
            libc::pthread_kill(self.thread.as_pthread_t(), SIGRTMIN());
        }
    }
}

/// Stops all vCPUs between two `KVM_RUN`s and waits until they are parked.
pub fn pause_all(gate: &PauseGate, vcpus: &[VcpuHandle]) {
    gate.want_paused.store(true, Ordering::Release);
    let mut parked = gate.parked.lock().expect("pause lock poisoned");
    while *parked < vcpus.len() {
        // A kick that lands outside KVM_RUN is lost, so repeat until parked.
        for v in vcpus {
            v.kick();
        }
        parked = gate
            .cv
            .wait_timeout(parked, Duration::from_millis(2))
            .expect("pause lock poisoned")
            .0;
    }
}

pub fn resume_all(gate: &PauseGate) {
    let _parked = gate.parked.lock().expect("pause lock poisoned");
    gate.want_paused.store(false, Ordering::Release);
    gate.cv.notify_all();
}

fn run(index: u8, mut vcpu: VcpuFd, ctx: &VcpuContext, stats: &VcpuStats) {
    if let Some(f) = &ctx.filters {
        if let Err(e) = f.apply() {
            ctx.exit
                .request(ExitReason::Error(format!("vCPU {index}: {e}")));
            return;
        }
    }
    loop {
        ctx.gate.park_if_requested();
        if ctx.exit.reason().is_some() {
            // The machine is going down; the main thread ends the process.
            std::thread::park();
            continue;
        }
        let start = Instant::now();
        let result = vcpu.run();
        let elapsed = start.elapsed().as_nanos() as u64;
        stats.run_ns.fetch_add(elapsed, Ordering::Relaxed);
        let outcome = match result {
            Ok(VcpuExit::IoOut(port, data)) => {
                stats.count(1);
                ctx.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                stats.count(0);
                if !ctx.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                stats.count(2);
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                stats.count(3);
                ctx.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Intr) => {
                stats.count(4);
                None
            }
            Ok(VcpuExit::Shutdown) => {
                stats.count(5);
                Some(ExitReason::Crash(format!(
                    "triple fault on vCPU {index} (KVM_EXIT_SHUTDOWN){}",
                    where_(&vcpu, &ctx.mem)
                )))
            }
            Ok(VcpuExit::InternalError) => {
                stats.count(6);
                Some(ExitReason::Crash(internal_error(
                    index, &mut vcpu, &ctx.mem,
                )))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                stats.count(7);
                Some(ExitReason::Crash(format!(
                    "KVM could not enter vCPU {index} (hardware reason {reason:#x}, cpu {cpu})"
                )))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                stats.count(7);
                Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reboot,
                    _ => ExitReason::Crash(format!("system event {kind} on vCPU {index}")),
                })
            }
            Ok(VcpuExit::Hlt) => {
                stats.count(7);
                None
            }
            Ok(other) => {
                stats.count(7);
                Some(ExitReason::Crash(format!(
                    "unexpected exit {other:?} on vCPU {index}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                stats.count(4);
                None
            }
            Err(e) => Some(ExitReason::Error(format!(
                "KVM_RUN failed on vCPU {index}: {e}"
            ))),
        };
        if let Some(reason) = outcome {
            ctx.exit.request(reason);
        }
    }
}

/// " at rip 0x..: bytes" for crash reports, best effort.
fn where_(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> String {
    let Ok(regs) = vcpu.get_regs() else {
        return String::new();
    };
    let mut s = format!(" at rip {:#x}", regs.rip);
    let sregs = vcpu.get_sregs().ok();
    let paging = sregs.is_some_and(|s| s.cr0 & 0x8000_0000 != 0);
    let linear = regs.rip + sregs.map_or(0, |s| s.cs.base);
    let phys = if paging {
        vcpu.translate_gva(linear)
            .ok()
            .filter(|t| t.valid != 0)
            .map(|t| t.physical_address)
    } else {
        Some(linear)
    };
    if let Some(pa) = phys {
        let mut code = [0u8; 8];
        if mem.read_slice(&mut code, GuestAddress(pa)).is_ok() {
            let _ = write!(s, ", code bytes {code:02x?}");
        }
    }
    s
}

fn internal_error(index: u8, vcpu: &mut VcpuFd, mem: &GuestMemoryMmap) -> String {
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member is the
    // active one of the kvm_run exit union.
    let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
    let what = match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => {
            "instruction emulation failed (an instruction KVM cannot emulate)"
        }
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        _ => "KVM internal error",
    };
    format!(
        "{what} on vCPU {index} (suberror {suberror}){}",
        where_(vcpu, mem)
    )
}
