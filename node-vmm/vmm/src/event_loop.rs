//! The VMM's main thread: one epoll loop for queue notifications, tap
//! readiness, console clients (accepting them, their input, sending them
//! the output queued for them), the control API, and the exit signal.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::SerialMode;
use crate::console::Registry;
use crate::exit::ExitReason;
use crate::vm::Vm;

const TOKEN_EXIT: u64 = 1;
const TOKEN_STDIN: u64 = 2;
const TOKEN_API: u64 = 3;
const TOKEN_CONSOLE: u64 = 4;
const TOKEN_CONSOLE_OUTPUT: u64 = 5;
const TOKEN_SERIAL_DRAIN: u64 = 6;
const QUEUE_BASE: u64 = 1 << 32;
const BACKEND_BASE: u64 = 2 << 32;
const CONSOLE_CLIENT_BASE: u64 = 3 << 32;

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("event loop setup failed: {0}")]
    Epoll(std::io::Error),
}

fn add(epoll: &Epoll, fd: RawFd, token: u64, events: EventSet) -> Result<(), EventLoopError> {
    epoll
        .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        .map_err(EventLoopError::Epoll)
}

/// Sockets the loop serves besides the devices.
#[derive(Debug, Default)]
pub struct Endpoints {
    pub api: Option<UnixListener>,
    pub console: Option<UnixListener>,
}

/// Runs until an exit is requested; returns why.
pub fn run(vm: &Vm, endpoints: &Endpoints, started: Instant) -> Result<ExitReason, EventLoopError> {
    let epoll = Epoll::new().map_err(EventLoopError::Epoll)?;
    register(&epoll, vm, endpoints)?;
    let state = LoopState {
        vm,
        epoll: &epoll,
        endpoints,
        started,
    };
    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(EventLoopError::Epoll(e)),
        };
        for ev in &events[..n] {
            if let Some(reason) = state.dispatch(ev.data(), ev.event_set()) {
                // The guest's last words (a panic message, "powering
                // off") reach the clients that can take them now.
                if let Some(q) = &vm.serial_queue {
                    q.drain();
                }
                vm.console.service(state.registry());
                return Ok(reason);
            }
        }
    }
}

fn register(epoll: &Epoll, vm: &Vm, endpoints: &Endpoints) -> Result<(), EventLoopError> {
    add(
        epoll,
        vm.exit.eventfd().as_raw_fd(),
        TOKEN_EXIT,
        EventSet::IN,
    )?;
    let stdin_console = vm.config.serial.mode == SerialMode::Stdout
        // SAFETY: isatty only inspects the descriptor.
        && unsafe { libc::isatty(0) } == 1;
    if stdin_console {
        add(epoll, 0, TOKEN_STDIN, EventSet::IN)?;
    }
    if let Some(l) = &endpoints.api {
        add(epoll, l.as_raw_fd(), TOKEN_API, EventSet::IN)?;
    }
    if let Some(l) = &endpoints.console {
        add(epoll, l.as_raw_fd(), TOKEN_CONSOLE, EventSet::IN)?;
        add(
            epoll,
            vm.console.wake_fd(),
            TOKEN_CONSOLE_OUTPUT,
            EventSet::IN,
        )?;
    }
    if let Some(q) = &vm.serial_queue {
        add(epoll, q.timer_fd(), TOKEN_SERIAL_DRAIN, EventSet::IN)?;
    }
    for (d, slot) in vm.virtio.iter().enumerate() {
        for (q, evt) in slot.queue_events.iter().enumerate() {
            add(
                epoll,
                evt.as_raw_fd(),
                QUEUE_BASE | ((d as u64) << 16) | q as u64,
                EventSet::IN,
            )?;
        }
        let fds = slot
            .transport
            .lock()
            .expect("device lock poisoned")
            .device()
            .backend_fds();
        for (i, fd) in fds.into_iter().enumerate() {
            // Edge-triggered: a device that has no guest buffers leaves data
            // queued and resumes when the guest notifies its queue.
            add(
                epoll,
                fd,
                BACKEND_BASE | ((d as u64) << 16) | i as u64,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            )?;
        }
    }
    Ok(())
}

struct LoopState<'a> {
    vm: &'a Vm,
    epoll: &'a Epoll,
    endpoints: &'a Endpoints,
    started: Instant,
}

impl LoopState<'_> {
    fn registry(&self) -> Registry<'_> {
        Registry {
            epoll: self.epoll,
            base: CONSOLE_CLIENT_BASE,
        }
    }

    fn dispatch(&self, token: u64, events: EventSet) -> Option<ExitReason> {
        let vm = self.vm;
        match token {
            TOKEN_EXIT => {
                let _ = vm.exit.eventfd().read();
                return vm.exit.reason();
            }
            TOKEN_STDIN => {
                let mut buf = [0u8; 64];
                // SAFETY: reads into our own buffer from fd 0.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, 0, EpollEvent::default());
                } else {
                    vm.serial
                        .lock()
                        .expect("serial lock poisoned")
                        .enqueue_input(&buf[..n as usize]);
                }
            }
            TOKEN_API => {
                if let Some(l) = &self.endpoints.api {
                    while let Ok((stream, _)) = l.accept() {
                        crate::api::serve(vm, stream, self.started);
                    }
                }
            }
            TOKEN_CONSOLE => {
                if let Some(l) = &self.endpoints.console {
                    vm.console.accept(l, self.registry());
                }
            }
            TOKEN_CONSOLE_OUTPUT => vm.console.service(self.registry()),
            TOKEN_SERIAL_DRAIN => {
                if let Some(q) = &vm.serial_queue {
                    q.on_timer();
                }
            }
            t if t & !0xffff_ffff == CONSOLE_CLIENT_BASE => {
                // At most what the UART's receive FIFO holds at a time.
                let mut buf = [0u8; 64];
                let n = vm
                    .console
                    .ready(t as u32, events, &mut buf, self.registry());
                if n > 0 {
                    vm.serial
                        .lock()
                        .expect("serial lock poisoned")
                        .enqueue_input(&buf[..n]);
                }
            }
            t if t & !0xffff_ffff == QUEUE_BASE || t & !0xffff_ffff == BACKEND_BASE => {
                let d = ((t >> 16) & 0xffff) as usize;
                let i = (t & 0xffff) as usize;
                if let Some(slot) = vm.virtio.get(d) {
                    let mut transport = slot.transport.lock().expect("device lock poisoned");
                    if t & !0xffff_ffff == QUEUE_BASE {
                        let _ = slot.queue_events[i].read();
                        transport.device_mut().process_queue(i);
                    } else {
                        transport.device_mut().process_backend(i);
                    }
                }
            }
            _ => {}
        }
        None
    }
}
