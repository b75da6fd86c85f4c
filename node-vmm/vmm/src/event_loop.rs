//! The VMM's main thread: one epoll loop for queue notifications, tap
//! readiness, console input, the control API, and the exit signal.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::SerialMode;
use crate::exit::ExitReason;
use crate::vm::Vm;

const TOKEN_EXIT: u64 = 1;
const TOKEN_STDIN: u64 = 2;
const TOKEN_API: u64 = 3;
const TOKEN_CONSOLE: u64 = 4;
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
    let mut state = LoopState {
        vm,
        epoll: &epoll,
        endpoints,
        started,
        console_clients: Vec::new(),
    };
    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(EventLoopError::Epoll(e)),
        };
        for ev in &events[..n] {
            if let Some(reason) = state.dispatch(ev.data()) {
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
    console_clients: Vec<Option<UnixStream>>,
}

impl LoopState<'_> {
    fn dispatch(&mut self, token: u64) -> Option<ExitReason> {
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
            TOKEN_CONSOLE => self.accept_console(),
            t if t & !0xffff_ffff == CONSOLE_CLIENT_BASE => {
                self.console_input((t & 0xffff_ffff) as usize);
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

    fn accept_console(&mut self) {
        let Some(l) = &self.endpoints.console else {
            return;
        };
        while let Ok((stream, _)) = l.accept() {
            let Ok(writer) = stream.try_clone() else {
                continue;
            };
            let _ = stream.set_nonblocking(true);
            let idx = self.console_clients.len() as u64;
            if add(
                self.epoll,
                stream.as_raw_fd(),
                CONSOLE_CLIENT_BASE | idx,
                EventSet::IN,
            )
            .is_ok()
            {
                self.vm
                    .console_clients
                    .0
                    .lock()
                    .expect("console lock poisoned")
                    .push(writer);
                self.console_clients.push(Some(stream));
            }
        }
    }

    fn console_input(&mut self, idx: usize) {
        let Some(Some(stream)) = self.console_clients.get_mut(idx) else {
            return;
        };
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    stream.as_raw_fd(),
                    EpollEvent::default(),
                );
                self.console_clients[idx] = None;
            }
            Ok(n) => {
                self.vm
                    .serial
                    .lock()
                    .expect("serial lock poisoned")
                    .enqueue_input(&buf[..n]);
            }
        }
    }
}
