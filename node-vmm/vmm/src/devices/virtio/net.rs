//! virtio-net on a tap device with the virtio-net header (`IFF_VNET_HDR`), so
//! checksum and TSO offloads pass straight between guest and host.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_net as vn;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::log_limit::LogLimiter;
use super::{Interrupt, VirtioDevice, VirtioError, TYPE_NET};
use crate::config::{parse_mac, NetConfig};

pub mod frame;
#[cfg(test)]
pub(super) mod tests;

use frame::{RxBuffer, MAX_FRAME, VNET_HDR_LEN};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

const F_CSUM: u64 = 1 << vn::VIRTIO_NET_F_CSUM;
const F_GUEST_CSUM: u64 = 1 << vn::VIRTIO_NET_F_GUEST_CSUM;
const F_MAC: u64 = 1 << vn::VIRTIO_NET_F_MAC;
const F_GUEST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_GUEST_TSO4;
const F_GUEST_TSO6: u64 = 1 << vn::VIRTIO_NET_F_GUEST_TSO6;
const F_HOST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_HOST_TSO4;
const F_HOST_TSO6: u64 = 1 << vn::VIRTIO_NET_F_HOST_TSO6;
const F_STATUS: u64 = 1 << vn::VIRTIO_NET_F_STATUS;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network {id}: cannot open /dev/net/tun: {source}")]
    OpenTun { id: String, source: std::io::Error },
    #[error("network {id}: tap {tap} is busy (another process has it open)")]
    TapBusy { id: String, tap: String },
    #[error("network {id}: cannot attach to tap {tap}: {source}")]
    Attach {
        id: String,
        tap: String,
        source: std::io::Error,
    },
    #[error("network {id}: tap name {tap:?} is too long")]
    TapName { id: String, tap: String },
    #[error("network {id}: bad MAC address {mac}")]
    Mac { id: String, mac: String },
}

#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_bytes: AtomicU64,
    pub rx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    /// Frames from the tap that did not fit the guest's buffers or were
    /// too short to carry a virtio-net header.
    pub rx_dropped: AtomicU64,
    /// RX chains returned unused (a device-readable or too small buffer).
    pub rx_malformed: AtomicU64,
    /// TX chains not sent: too long, too short, device-writable, unreadable.
    pub tx_dropped: AtomicU64,
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
}

pub struct Net {
    tap: File,
    /// Whether `tap` is a tap (offloads are set on it) rather than a
    /// datagram socket standing in for one in tests.
    is_tap: bool,
    mac: [u8; 6],
    active: Option<Active>,
    pub counters: Arc<NetCounters>,
    /// One TX frame, never more than `MAX_FRAME` bytes.
    tx_frame: Vec<u8>,
    /// One RX frame as read from the tap, `MAX_FRAME` bytes.
    rx_frame: Vec<u8>,
    rx_bufs: Vec<RxBuffer>,
    log: LogLimiter,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .finish_non_exhaustive()
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<()> {
    // SAFETY: TUNSETOFFLOAD/TUNSETVNETHDRSZ take an integer or a pointer to
    // one; the caller passes values matching each request.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens tap `name` with a virtio-net header and non-blocking I/O.
pub fn open_tap(id: &str, name: &str) -> Result<File, NetError> {
    if name.len() >= 16 {
        return Err(NetError::TapName {
            id: id.into(),
            tap: name.into(),
        });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|source| NetError::OpenTun {
            id: id.into(),
            source,
        })?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` lays out.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &raw mut req) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Err(NetError::TapBusy {
                id: id.into(),
                tap: name.into(),
            });
        }
        return Err(NetError::Attach {
            id: id.into(),
            tap: name.into(),
            source: e,
        });
    }
    Ok(file)
}

impl Net {
    pub fn open(cfg: &NetConfig) -> Result<Self, NetError> {
        let tap_name = cfg.tap.clone().unwrap_or_default();
        let tap = match (cfg.fd, &cfg.tap) {
            // SAFETY: the parent handed us this tap fd for our exclusive use.
            (Some(fd), _) => unsafe { File::from_raw_fd(fd) },
            (None, Some(name)) => open_tap(&cfg.id, name)?,
            (None, None) => {
                return Err(NetError::Attach {
                    id: cfg.id.clone(),
                    tap: String::new(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                })
            }
        };
        let hdr = VNET_HDR_LEN as libc::c_int;
        ioctl_int(
            tap.as_raw_fd(),
            TUNSETVNETHDRSZ,
            &raw const hdr as libc::c_ulong,
        )
        .map_err(|source| NetError::Attach {
            id: cfg.id.clone(),
            tap: tap_name.clone(),
            source,
        })?;
        if cfg.fd.is_some() {
            // SAFETY: F_SETFL on our own fd.
            unsafe {
                let fl = libc::fcntl(tap.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(tap.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
        let mac = parse_mac(&cfg.mac).ok_or_else(|| NetError::Mac {
            id: cfg.id.clone(),
            mac: cfg.mac.clone(),
        })?;
        Ok(Self::with_backend(tap, true, mac))
    }

    /// The device on an open tap (or, with `is_tap` false, a datagram
    /// socket that carries the same frames).
    pub fn with_backend(tap: File, is_tap: bool, mac: [u8; 6]) -> Self {
        Self {
            tap,
            is_tap,
            mac,
            active: None,
            counters: Arc::new(NetCounters::default()),
            tx_frame: Vec::with_capacity(MAX_FRAME),
            rx_frame: vec![0; MAX_FRAME],
            rx_bufs: Vec::new(),
            log: LogLimiter::default(),
        }
    }

    /// Bytes held for frames: (TX buffer capacity, RX buffer length, RX
    /// buffer list length), to check they stay bounded.
    #[cfg(test)]
    pub(crate) fn buffer_sizes(&self) -> (usize, usize, usize) {
        (
            self.tx_frame.capacity(),
            self.rx_frame.len(),
            self.rx_bufs.capacity(),
        )
    }

    fn process_tx(&mut self) {
        let Self {
            active: Some(a),
            tap,
            tx_frame,
            counters,
            log,
            ..
        } = self
        else {
            return;
        };
        let mut used = false;
        while let Some(chain) = a.tx.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            match frame::gather_tx(&a.mem, chain, tx_frame) {
                // If the tap is down or full the frame is dropped, as on a wire.
                Ok(()) => {
                    if let Ok(n) = tap.write(tx_frame) {
                        counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                        counters
                            .tx_bytes
                            .fetch_add(n.saturating_sub(VNET_HDR_LEN) as u64, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    log.warn(format_args!("virtio-net: TX frame dropped: {e}"));
                }
            }
            if a.tx.add_used(&a.mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        if used && a.tx.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used();
        }
    }

    fn process_rx(&mut self) {
        let Self {
            active: Some(a),
            tap,
            rx_frame,
            rx_bufs,
            counters,
            log,
            ..
        } = self
        else {
            return;
        };
        let mut used = false;
        // Only read a frame when a guest buffer is waiting for it.
        while let Some(chain) = a.rx.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let written = if let Err(e) = frame::rx_buffers(chain, rx_bufs) {
                counters.rx_malformed.fetch_add(1, Ordering::Relaxed);
                log.warn(format_args!("virtio-net: RX buffer returned unused: {e}"));
                0
            } else {
                let n = match tap.read(rx_frame) {
                    Ok(n) if n >= VNET_HDR_LEN => n,
                    Ok(n) if n > 0 => {
                        // No room for the header: not a frame. The buffer
                        // waits for the next one.
                        counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                        a.rx.go_to_previous_position();
                        continue;
                    }
                    _ => {
                        a.rx.go_to_previous_position();
                        break;
                    }
                };
                // num_buffers = 1 (no mergeable buffers).
                rx_frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                let written = frame::scatter_rx(&a.mem, rx_bufs, &rx_frame[..n]);
                if written < n {
                    counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    counters
                        .rx_bytes
                        .fetch_add((n - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                }
                written as u32
            };
            if a.rx.add_used(&a.mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        if used && a.rx.needs_notification(&a.mem).unwrap_or(true) {
            a.interrupt.signal_used();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_CSUM
            | F_GUEST_CSUM
            | F_MAC
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_STATUS
    }

    fn config_space(&self) -> Vec<u8> {
        // mac[6], status u16 (link up).
        let mut config = self.mac.to_vec();
        config.extend_from_slice(&1u16.to_le_bytes());
        config
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Interrupt,
        acked: u64,
    ) -> Result<(), VirtioError> {
        if queues.len() != 2 || !queues.iter().all(QueueT::ready) {
            return Err(VirtioError::BadQueue(
                queues.iter().position(|q| !q.ready()).unwrap_or(0),
            ));
        }
        let mut offload = 0;
        if acked & F_GUEST_CSUM != 0 {
            offload |= TUN_F_CSUM;
            if acked & F_GUEST_TSO4 != 0 {
                offload |= TUN_F_TSO4;
            }
            if acked & F_GUEST_TSO6 != 0 {
                offload |= TUN_F_TSO6;
            }
        }
        if self.is_tap {
            ioctl_int(
                self.tap.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(offload),
            )?;
        }
        let tx = queues.pop().expect("two queues");
        let rx = queues.pop().expect("two queues");
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
        });
        // Frames may already be waiting on the tap.
        self.process_rx();
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX => self.process_rx(),
            TX => self.process_tx(),
            _ => {}
        }
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.tap.as_raw_fd()]
    }

    fn process_backend(&mut self, _fd_index: usize) {
        self.process_rx();
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("rx_bytes", c.rx_bytes.load(Ordering::Relaxed)),
            ("rx_frames", c.rx_frames.load(Ordering::Relaxed)),
            ("tx_bytes", c.tx_bytes.load(Ordering::Relaxed)),
            ("tx_frames", c.tx_frames.load(Ordering::Relaxed)),
            ("rx_dropped", c.rx_dropped.load(Ordering::Relaxed)),
            ("rx_malformed", c.rx_malformed.load(Ordering::Relaxed)),
            ("tx_dropped", c.tx_dropped.load(Ordering::Relaxed)),
        ]
    }
}
