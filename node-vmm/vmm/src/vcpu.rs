//! vCPU threads: run loop, exit dispatch, pause/resume and statistics.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
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
///
/// Every vCPU is either running, parked at the gate, or stopped for good
/// (its machine is going down, or its thread ended): `pause_all` waits
/// until each one is parked or stopped, so it neither returns early nor
/// waits forever for a vCPU that will never come back.
#[derive(Debug, Default)]
pub struct PauseGate {
    want_paused: AtomicBool,
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct GateState {
    parked: usize,
    stopped: usize,
}

impl GateState {
    fn settled(self) -> usize {
        self.parked + self.stopped
    }
}

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // The state is two counters that stay consistent whatever panicked.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn park_if_requested(&self) {
        if !self.want_paused.load(Ordering::SeqCst) {
            return;
        }
        let mut state = self.lock();
        state.parked += 1;
        self.cv.notify_all();
        while self.want_paused.load(Ordering::SeqCst) {
            state = self
                .cv
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.parked -= 1;
        self.cv.notify_all();
    }

    /// This vCPU will not run again.
    fn stop(&self) {
        self.lock().stopped += 1;
        self.cv.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.want_paused.load(Ordering::SeqCst)
    }
}

/// Counts its vCPU as stopped when dropped: on every way out of the run
/// loop, a panic included.
struct StopOnDrop<'a>(&'a PauseGate);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

thread_local! {
    /// This vCPU thread's `kvm_run`, for the kick handler; null elsewhere.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Publishes this thread's `kvm_run` to the kick handler until dropped.
struct KickTarget;

impl KickTarget {
    fn set(run: *mut kvm_run) -> Self {
        KVM_RUN.with(|p| p.set(run));
        Self
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }
}

/// Sets or clears `immediate_exit` of this thread's vCPU, if it has one.
fn set_immediate_exit(value: u8) {
    // A const-initialized thread-local without destructor: a plain TLS
    // access, safe in a signal handler.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` is this thread's vCPU mapping, published by
        // `KickTarget` for exactly as long as the VcpuFd that owns it lives
        // on this thread; a volatile byte write races with nothing but the
        // kernel's read at KVM_RUN entry, which is what it is for.
        unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, value) };
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
    /// Console writes KVM queued instead of exiting: replayed at every
    /// exit, before the exit itself, so the device sees them in order.
    pub serial_queue: Option<Arc<crate::devices::serial::SerialQueue>>,
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

/// The kick: a signal that interrupts `KVM_RUN`, and sets `immediate_exit`
/// so that a kick landing just before `KVM_RUN` is not lost either: that
/// `KVM_RUN` returns at once with EINTR and the loop sees the request.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    set_immediate_exit(1);
}

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

/// Stops all vCPUs between two `KVM_RUN`s and waits until each is parked
/// (or stopped for good, and so will not run either).
pub fn pause_all(gate: &PauseGate, vcpus: &[VcpuHandle]) {
    gate.want_paused.store(true, Ordering::SeqCst);
    let mut state = gate.lock();
    while state.settled() < vcpus.len() {
        // One kick is enough (immediate_exit covers the window before
        // KVM_RUN); repeating it costs nothing and survives a lost signal.
        for v in vcpus {
            v.kick();
        }
        state = gate
            .cv
            .wait_timeout(state, Duration::from_millis(10))
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}

pub fn resume_all(gate: &PauseGate) {
    let _state = gate.lock();
    gate.want_paused.store(false, Ordering::SeqCst);
    gate.cv.notify_all();
}

/// Installs the thread's seccomp filter; false (the machine asked to stop)
/// when that failed.
fn apply_filters(index: u8, ctx: &VcpuContext) -> bool {
    match ctx.filters.as_ref().map(crate::seccomp::Filters::apply) {
        Some(Err(e)) => {
            ctx.exit
                .request(ExitReason::Error(format!("vCPU {index}: {e}")));
            false
        }
        _ => true,
    }
}

/// Bookkeeping after each `KVM_RUN`: its time, and the console writes KVM
/// queued meanwhile, replayed before the exit is handled so that devices
/// see every write in the guest's order.
fn after_run(ctx: &VcpuContext, stats: &VcpuStats, start: Instant) {
    let elapsed = start.elapsed().as_nanos() as u64;
    stats.run_ns.fetch_add(elapsed, Ordering::Relaxed);
    if let Some(q) = &ctx.serial_queue {
        q.drain();
    }
}

fn run(index: u8, mut vcpu: VcpuFd, ctx: &VcpuContext, stats: &VcpuStats) {
    let stopped = StopOnDrop(&ctx.gate);
    if !apply_filters(index, ctx) {
        return;
    }
    let kick_target = KickTarget::set(std::ptr::from_mut(vcpu.get_kvm_run()));
    if index == 0 {
        crate::boot_trace::mark(crate::boot_trace::Step::FirstRun);
    }
    loop {
        ctx.gate.park_if_requested();
        if ctx.exit.reason().is_some() {
            break;
        }
        let start = Instant::now();
        let result = vcpu.run();
        // Cleared before the loop looks at the pause request again: a kick
        // after this point finds the request already visible.
        set_immediate_exit(0);
        after_run(ctx, stats, start);
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
    // The machine is going down; the main thread ends the process. This
    // vCPU no longer holds up a pause, and the thread stays (with its
    // VcpuFd) rather than unmapping and closing under the seccomp filter.
    drop(stopped);
    drop(kick_target);
    loop {
        std::thread::park();
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

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::devices::BusDevice;
    use crate::test_vm::TestVm;

    /// Port 0x99: any write asks the machine to power off.
    struct PowerOffPort(ExitSignal);

    impl BusDevice for PowerOffPort {
        fn read(&mut self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: &[u8]) {
            self.0.request(ExitReason::PowerOff);
        }
    }

    /// A VM of `codes.len()` vCPUs, vCPU i running `codes[i]` in 32-bit
    /// protected mode, started.
    struct Machine {
        _vm: TestVm,
        gate: Arc<PauseGate>,
        exit: ExitSignal,
        vcpus: Vec<VcpuHandle>,
    }

    /// `mov al, 1; out 0x99, al; jmp $`: asks for power-off, then spins.
    const POWER_OFF: &[u8] = &[0xb0, 0x01, 0xe6, 0x99, 0xeb, 0xfe];
    /// `jmp $`
    const SPIN: &[u8] = &[0xeb, 0xfe];

    fn machine(codes: &[&[u8]]) -> Machine {
        let t = TestVm::new();
        let exit = ExitSignal::new().unwrap();
        let mut pio = Bus::default();
        pio.insert(0x99, 1, Arc::new(Mutex::new(PowerOffPort(exit.clone()))))
            .unwrap();
        let gate = Arc::new(PauseGate::default());
        let ctx = VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::default()),
            mem: t.mem.clone(),
            exit: exit.clone(),
            gate: gate.clone(),
            filters: None,
            serial_queue: None,
        };
        install_kick_handler().unwrap();
        let vcpus = codes
            .iter()
            .enumerate()
            .map(|(i, code)| {
                VcpuHandle::spawn(i as u8, t.vcpu(i as u8, code), ctx.clone()).unwrap()
            })
            .collect();
        Machine {
            _vm: t,
            gate,
            exit,
            vcpus,
        }
    }

    /// Runs `pause_all` on a helper thread; true when it returned in time.
    fn pause_returns(m: &Arc<Machine>, within: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        let m = m.clone();
        std::thread::spawn(move || {
            pause_all(&m.gate, &m.vcpus);
            let _ = tx.send(());
        });
        rx.recv_timeout(within).is_ok()
    }

    fn run_ns(m: &Machine) -> Vec<u64> {
        m.vcpus
            .iter()
            .map(|v| v.stats.run_ns.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn pause_returns_when_a_vcpu_has_stopped_for_power_off() {
        let m = Arc::new(machine(&[POWER_OFF, SPIN]));
        let start = Instant::now();
        while m.exit.reason().is_none() {
            assert!(start.elapsed() < Duration::from_secs(30), "no power-off");
            std::thread::sleep(Duration::from_millis(5));
        }
        // vCPU 0 saw the exit request and stopped; pausing must not wait
        // for it to park.
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            pause_returns(&m, Duration::from_secs(10)),
            "pause hung on a vCPU stopped for exit"
        );
        // vCPU 1 parked, or (exiting KVM_RUN for the kick) saw the exit
        // request first and stopped too.
        let state = *m.gate.lock();
        assert!(state.settled() == 2 && state.stopped >= 1, "{state:?}");
        resume_all(&m.gate);
    }

    #[test]
    fn pause_parks_every_vcpu_every_time() {
        let m = machine(&[SPIN, SPIN]);
        for _ in 0..50 {
            pause_all(&m.gate, &m.vcpus);
            assert_eq!(
                *m.gate.lock(),
                GateState {
                    parked: 2,
                    stopped: 0
                }
            );
            let before = run_ns(&m);
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(run_ns(&m), before, "a vCPU ran while paused");
            resume_all(&m.gate);
        }
        // And resumed, they run.
        let before = run_ns(&m);
        std::thread::sleep(Duration::from_millis(50));
        pause_all(&m.gate, &m.vcpus);
        assert!(run_ns(&m).iter().zip(&before).all(|(a, b)| a > b));
        resume_all(&m.gate);
    }
}
