//! The clients of a socket console (the node agent, for `kubectl vm
//! console` sessions): up to [`MAX_CLIENTS`] at once, each sees all guest
//! output from when it attached, each may type.
//!
//! The guest must never wait for a client. Output is queued per client on
//! the vCPU thread (memory only, under a short lock) and sent by the event
//! loop from non-blocking sockets; a client whose queue passes
//! [`MAX_PENDING`] is disconnected (it may attach again and catch up from
//! the console ring, which has all output). A client that goes away is
//! removed at once, with its queue and its epoll registration.
//!
//! A client that closes its sending side (EOF) is taken as detached.

use std::collections::VecDeque;
use std::io::{self, Read as _};
use std::os::fd::{AsRawFd as _, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Clients attached at once; more are turned away.
pub const MAX_CLIENTS: usize = 16;
/// Output queued for one client before it is disconnected as too slow.
pub const MAX_PENDING: usize = 4 << 20;
/// A drained queue keeps at most this much memory.
const KEEP_CAPACITY: usize = 64 << 10;

/// Where the event loop wants a client's events: `base | id`.
#[derive(Debug, Clone, Copy)]
pub struct Registry<'a> {
    pub epoll: &'a Epoll,
    pub base: u64,
}

impl Registry<'_> {
    fn ctl(&self, op: ControlOperation, c: &Client) -> io::Result<()> {
        let mut events = EventSet::IN;
        if c.watching_out {
            events |= EventSet::OUT;
        }
        self.epoll.ctl(
            op,
            c.stream.as_raw_fd(),
            EpollEvent::new(events, self.base | u64::from(c.id)),
        )
    }
}

#[derive(Debug)]
struct Client {
    id: u32,
    stream: UnixStream,
    pending: VecDeque<u8>,
    /// Fell more than `MAX_PENDING` behind: to be disconnected.
    overflowed: bool,
    /// Epoll also reports when it can take more (its queue did not fit).
    watching_out: bool,
}

/// `sendmsg` of both parts of a queue, without `SIGPIPE` for a peer that is gone.
fn send(fd: RawFd, pending: &VecDeque<u8>) -> io::Result<usize> {
    let (a, b) = pending.as_slices();
    let mut iov = [
        libc::iovec {
            iov_base: a.as_ptr() as *mut libc::c_void,
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        },
    ];
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    // SAFETY: the iovecs point into `pending`, which outlives the call and
    // which the kernel only reads.
    let n = unsafe { libc::sendmsg(fd, &raw const msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Client {
    /// Sends what it can of the queue; false when the client must go.
    fn flush(&mut self, reg: Registry<'_>) -> bool {
        if self.overflowed {
            return false;
        }
        while !self.pending.is_empty() {
            match send(self.stream.as_raw_fd(), &self.pending) {
                Ok(0) => return false,
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
        if self.pending.is_empty() && self.pending.capacity() > KEEP_CAPACITY {
            self.pending = VecDeque::new();
        }
        let want_out = !self.pending.is_empty();
        if want_out != self.watching_out {
            self.watching_out = want_out;
            if reg.ctl(ControlOperation::Modify, self).is_err() {
                return false;
            }
        }
        true
    }
}

#[derive(Debug, Default)]
struct Clients {
    list: Vec<Client>,
    next_id: u32,
    /// Clients disconnected for falling `MAX_PENDING` behind, ever.
    too_slow: u64,
}

#[derive(Debug)]
struct Shared {
    clients: Mutex<Clients>,
    /// Written when a queue goes from empty to not empty.
    wake: EventFd,
}

/// The console's clients, shared by the serial device (which queues
/// output) and the event loop (which accepts, reads input and sends).
#[derive(Debug, Clone)]
pub struct Console(Arc<Shared>);

impl Console {
    pub fn new() -> io::Result<Self> {
        Ok(Self(Arc::new(Shared {
            clients: Mutex::new(Clients::default()),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Clients> {
        self.0
            .clients
            .lock()
            .expect("console clients lock poisoned")
    }

    /// The eventfd the event loop watches to send queued output.
    pub fn wake_fd(&self) -> RawFd {
        self.0.wake.as_raw_fd()
    }

    /// Clients attached now.
    pub fn clients(&self) -> usize {
        self.lock().list.len()
    }

    /// Clients disconnected so far for falling too far behind.
    pub fn too_slow(&self) -> u64 {
        self.lock().too_slow
    }

    /// Queues guest output for every client (never blocks on one).
    pub fn broadcast(&self, bytes: &[u8]) {
        let mut wake = false;
        let mut clients = self.lock();
        let mut too_slow = 0;
        for c in clients.list.iter_mut().filter(|c| !c.overflowed) {
            if c.pending.len() + bytes.len() > MAX_PENDING {
                c.overflowed = true;
                c.pending = VecDeque::new();
                too_slow += 1;
                wake = true;
            } else {
                wake |= c.pending.is_empty();
                c.pending.extend(bytes);
            }
        }
        clients.too_slow += too_slow;
        drop(clients);
        if wake {
            // A full counter already means "wake up".
            let _ = self.0.wake.write(1);
        }
    }

    /// Accepts every waiting connection (up to `MAX_CLIENTS` in all).
    pub fn accept(&self, listener: &UnixListener, reg: Registry<'_>) {
        loop {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                // WouldBlock: all taken; anything else: try again at the
                // next readiness.
                Err(_) => return,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let mut clients = self.lock();
            if clients.list.len() >= MAX_CLIENTS {
                drop(clients);
                let msg = VecDeque::from(b"kubevmm: too many console clients\r\n".to_vec());
                let _ = send(stream.as_raw_fd(), &msg);
                continue;
            }
            // Ids wrap after 2^32 connections; skip one still in use.
            let mut id = clients.next_id;
            while clients.list.iter().any(|c| c.id == id) {
                id = id.wrapping_add(1);
            }
            clients.next_id = id.wrapping_add(1);
            let client = Client {
                id,
                stream,
                pending: VecDeque::new(),
                overflowed: false,
                watching_out: false,
            };
            if reg.ctl(ControlOperation::Add, &client).is_ok() {
                clients.list.push(client);
            }
        }
    }

    /// Removes client `i` of the list: out of epoll, then closed.
    fn remove(clients: &mut Clients, i: usize, reg: Registry<'_>) {
        let c = clients.list.swap_remove(i);
        let _ = reg.epoll.ctl(
            ControlOperation::Delete,
            c.stream.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    /// Sends queued output to every client (after a wake-up, and before
    /// the VMM exits); drops the clients that are gone or too slow.
    pub fn service(&self, reg: Registry<'_>) {
        let _ = self.0.wake.read();
        let mut clients = self.lock();
        let mut i = 0;
        while i < clients.list.len() {
            if clients.list[i].flush(reg) {
                i += 1;
            } else {
                Self::remove(&mut clients, i, reg);
            }
        }
    }

    /// Handles epoll `events` for client `id`: sends its queue when it can
    /// take more, and reads up to `input.len()` bytes it typed. Returns how
    /// many were read; a client at its end, or failing, is removed.
    pub fn ready(&self, id: u32, events: EventSet, input: &mut [u8], reg: Registry<'_>) -> usize {
        let mut clients = self.lock();
        let Some(i) = clients.list.iter().position(|c| c.id == id) else {
            // Removed earlier in the same batch of events.
            return 0;
        };
        if events.contains(EventSet::OUT) && !clients.list[i].flush(reg) {
            Self::remove(&mut clients, i, reg);
            return 0;
        }
        if !events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            return 0;
        }
        match clients.list[i].stream.read(input) {
            Ok(n) if n > 0 => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Ok(_) | Err(_) => {
                Self::remove(&mut clients, i, reg);
                0
            }
        }
    }
}

#[cfg(test)]
mod tests;
