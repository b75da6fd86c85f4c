//! The server socket and loop: [`serve`].
//!
//! One UDP socket on `0.0.0.0:67` per bridge, bound to the bridge with
//! `SO_BINDTODEVICE` (so it only sees, and only broadcasts on, that
//! interface; several servers on several bridges can coexist thanks to
//! `SO_REUSEADDR`), with `SO_BROADCAST` for replies to
//! `255.255.255.255:68`.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::net::UdpSocket;
use tokio::sync::mpsc::UnboundedSender;

use crate::server::{describe, handle, Event, Outcome};
use crate::{Config, DhcpError, Leases, MessageType, Stats};

/// Receive buffer: larger than any datagram [`handle`] accepts, so that an
/// oversized one is seen whole and refused rather than truncated.
const RECV_BUFFER: usize = 65_536;
/// How often ended offers, leases and quarantines are tidied up
/// ([`Leases::purge`]).
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// Linux `IFNAMSIZ`, including the terminating NUL.
const IFNAMSIZ: usize = 16;

/// Locks the table even if a panicking holder poisoned the lock: the table
/// itself is never left half-updated by this crate.
pub(crate) fn lock(leases: &Mutex<Leases>) -> MutexGuard<'_, Leases> {
    leases
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn sock_err<'a>(iface: &'a str, what: &'static str) -> impl FnOnce(io::Error) -> DhcpError + 'a {
    move |source| DhcpError::Socket {
        iface: iface.to_string(),
        what,
        source,
    }
}

fn set_int_opt(fd: &OwnedFd, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is an open socket owned by the caller; the option value
    // is a c_int on the stack whose size is passed along, as setsockopt(2)
    // expects for SOL_SOCKET boolean options.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A non-blocking UDP socket bound to `iface` and `0.0.0.0:port`, with
/// broadcast allowed: the server's (port 67), and a test client's (68).
pub fn bind_socket(iface: &str, port: u16) -> Result<std::net::UdpSocket, DhcpError> {
    if iface.is_empty() || iface.len() >= IFNAMSIZ || iface.bytes().any(|b| b == 0 || b == b'/') {
        return Err(DhcpError::InvalidInterface(iface.to_string()));
    }
    // SAFETY: socket(2) with constant arguments; it returns a new descriptor
    // or -1, and takes no pointers.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_UDP,
        )
    };
    if raw < 0 {
        return Err(sock_err(iface, "socket")(io::Error::last_os_error()));
    }
    // SAFETY: `raw` was just returned by socket(2), is valid and owned by
    // nothing else; OwnedFd closes it on every path from here.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int_opt(&fd, libc::SO_REUSEADDR, 1).map_err(sock_err(iface, "SO_REUSEADDR"))?;
    set_int_opt(&fd, libc::SO_BROADCAST, 1).map_err(sock_err(iface, "SO_BROADCAST"))?;
    // SAFETY: the pointer and length describe `iface`'s bytes, which outlive
    // the call; the kernel copies at most that many bytes (the name was
    // checked above to be shorter than IFNAMSIZ and to contain no NUL).
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            iface.as_ptr().cast(),
            iface.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(sock_err(iface, "SO_BINDTODEVICE")(
            io::Error::last_os_error(),
        ));
    }
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(Ipv4Addr::UNSPECIFIED).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `addr` is a fully initialized sockaddr_in on the stack and the
    // length passed is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(sock_err(iface, "bind 0.0.0.0:67")(
            io::Error::last_os_error(),
        ));
    }
    Ok(std::net::UdpSocket::from(fd))
}

/// Runs the DHCP server on `iface` until the task is dropped or aborted
/// (the loop is cancel-safe: it holds no lock across an await).
///
/// Every datagram goes through [`handle`]; its reply is sent, its event
/// published on `events` (ignored if the receiver is gone), and the lease
/// table saved (under the lock, on a blocking thread) whenever it changed.
/// Every minute, ended offers, leases and quarantines are tidied up
/// ([`Leases::purge`]) and the table saved if that changed it.
/// The agent shares `leases` to [`reserve`](Leases::reserve) and
/// [`forget`](Leases::forget) NICs while this runs (it saves after its own
/// changes).
///
/// `iface` is copied: the future is `'static` and can be spawned.
///
/// Returns an error only when the socket cannot be set up (an invalid
/// configuration, no such interface, not permitted) or fails for good;
/// nothing a client sends stops or panics the loop.
pub fn serve(
    iface: &str,
    cfg: Config,
    leases: Arc<Mutex<Leases>>,
    events: UnboundedSender<Event>,
    metrics: Arc<Stats>,
) -> impl Future<Output = Result<(), DhcpError>> + Send + 'static {
    let iface = iface.to_string();
    run(iface, cfg, leases, events, metrics)
}

async fn run(
    iface: String,
    cfg: Config,
    leases: Arc<Mutex<Leases>>,
    events: UnboundedSender<Event>,
    metrics: Arc<Stats>,
) -> Result<(), DhcpError> {
    let iface = iface.as_str();
    cfg.validate()?;
    let socket = bind_socket(iface, 67)?;
    let socket = UdpSocket::from_std(socket).map_err(sock_err(iface, "registering with tokio"))?;
    tracing::info!(iface, subnet = %cfg.cidr(), "DHCP server listening");
    let mut buf = vec![0u8; RECV_BUFFER];
    let mut consecutive_errors = 0u32;
    let mut tidy = tokio::time::interval(PURGE_EVERY);
    tidy.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buf) => received,
            _ = tidy.tick() => {
                let purged = lock(&leases).purge(SystemTime::now());
                if purged {
                    save(&leases, &metrics).await;
                }
                continue;
            }
        };
        let (len, from) = match received {
            Ok(got) => {
                consecutive_errors = 0;
                got
            }
            Err(e) => {
                // Transient errors (the bridge going down and up, ENOBUFS):
                // wait and retry; give up after a long run of them.
                consecutive_errors += 1;
                if consecutive_errors > 1000 {
                    return Err(sock_err(iface, "receiving")(e));
                }
                tracing::warn!(iface, error = %e, "DHCP receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let packet = &buf[..len];
        let result = {
            let mut table = lock(&leases);
            handle(&cfg, &mut table, packet, SystemTime::now())
        };
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                count_error(&metrics, &e);
                tracing::debug!(iface, %from, error = %e, "DHCP packet dropped");
                continue;
            }
        };
        record(&metrics, &outcome);
        if let Some(why) = outcome.ignored {
            tracing::debug!(iface, %from, why, request = %describe(packet), "DHCP packet ignored");
        }
        if outcome.changed {
            save(&leases, &metrics).await;
        }
        if let Some(reply) = &outcome.reply {
            match socket
                .send_to(&reply.bytes, SocketAddr::V4(reply.dest))
                .await
            {
                Ok(_) => metrics.count_sent(reply.kind),
                Err(e) => {
                    metrics
                        .send_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(iface, dest = %reply.dest, error = %e, "DHCP reply not sent");
                }
            }
        }
        if let Some(event) = outcome.event {
            let _ = events.send(event);
        }
    }
}

/// Counts a [`handle`] error in `stats`.
pub fn count_error(stats: &Stats, e: &DhcpError) {
    use std::sync::atomic::Ordering::Relaxed;
    if let DhcpError::PoolExhausted { .. } = e {
        stats.count_received(Some(MessageType::Discover));
        stats.pool_exhausted.fetch_add(1, Relaxed);
    } else {
        // Malformed, or a configuration error: either way the packet is lost.
        stats.count_received(None);
        stats.drops.fetch_add(1, Relaxed);
    }
}

/// Counts a [`handle`] outcome in `stats` (what was received, NAKs,
/// ignored packets; replies are counted when sent).
pub fn record(stats: &Stats, outcome: &Outcome) {
    use std::sync::atomic::Ordering::Relaxed;
    stats.count_received(outcome.received);
    if outcome.ignored.is_some() {
        stats.ignored.fetch_add(1, Relaxed);
    }
    if matches!(outcome.event, Some(Event::Nak { .. })) {
        stats.naks.fetch_add(1, Relaxed);
    }
}

/// Saves the table on a blocking thread; failures are counted and logged,
/// the server goes on (the table in memory is still right).
async fn save(leases: &Arc<Mutex<Leases>>, metrics: &Stats) {
    let leases = Arc::clone(leases);
    let saved = tokio::task::spawn_blocking(move || lock(&leases).save()).await;
    let error = match saved {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(join) => join.to_string(),
    };
    metrics
        .save_errors
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(error, "saving the DHCP lease table failed");
}
