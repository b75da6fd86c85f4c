//! virtio-net buffers as the guest posted them (virtio 1.2 section 5.1.6):
//! a TX chain gathered into one bounded frame, an RX chain turned into the
//! list of buffers a received frame may fill. Pure functions of the chain
//! and guest memory; the device does the tap I/O.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// `virtio_net_hdr_v1`: flags, `gso_type`, `hdr_len`, `gso_size`, `csum_start`,
/// `csum_offset`, `num_buffers`.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame a tap hands us with TSO on (64 KiB of IP packet plus the
/// Ethernet and VLAN headers), plus the virtio-net header. No TX frame is
/// larger, so neither is any buffer the device allocates for one.
pub const MAX_FRAME: usize = 65_562 + VNET_HDR_LEN;
/// RX buffers kept for one frame; more would only be 1-byte buffers.
pub const MAX_RX_BUFFERS: usize = 1024;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("TX chain longer than {MAX_FRAME} bytes")]
    TxTooLong,
    #[error("TX frame of {0} bytes has nothing after the virtio-net header")]
    TxTooShort(usize),
    #[error("TX chain has a device-writable descriptor")]
    TxWritable,
    #[error("cannot read the TX frame from guest memory")]
    TxMemory,
    #[error("RX chain has a device-readable descriptor")]
    RxReadable,
    #[error("RX chain has room for {0} bytes, less than the virtio-net header")]
    RxTooSmall(usize),
}

/// Gathers one TX chain into `frame`, which never grows past `MAX_FRAME`:
/// lengths are checked before anything is allocated or read.
pub fn gather_tx<M: GuestMemory>(
    mem: &M,
    chain: impl Iterator<Item = Descriptor>,
    frame: &mut Vec<u8>,
) -> Result<(), FrameError> {
    frame.clear();
    for d in chain {
        if d.is_write_only() {
            return Err(FrameError::TxWritable);
        }
        let start = frame.len();
        let len = d.len() as usize;
        if len > MAX_FRAME - start {
            return Err(FrameError::TxTooLong);
        }
        frame.resize(start + len, 0);
        mem.read_slice(&mut frame[start..], d.addr())
            .map_err(|_| FrameError::TxMemory)?;
    }
    if frame.len() <= VNET_HDR_LEN {
        return Err(FrameError::TxTooShort(frame.len()));
    }
    Ok(())
}

/// One device-writable RX buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxBuffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The buffers of one RX chain, into `out`: all device-writable, enough of
/// them for `MAX_FRAME` bytes (or `MAX_RX_BUFFERS`), the rest left unused.
pub fn rx_buffers(
    chain: impl Iterator<Item = Descriptor>,
    out: &mut Vec<RxBuffer>,
) -> Result<(), FrameError> {
    out.clear();
    let mut room = 0usize;
    for d in chain {
        if !d.is_write_only() {
            return Err(FrameError::RxReadable);
        }
        if d.len() > 0 && room < MAX_FRAME && out.len() < MAX_RX_BUFFERS {
            out.push(RxBuffer {
                addr: d.addr(),
                len: d.len(),
            });
            room += d.len() as usize;
        }
    }
    if room < VNET_HDR_LEN {
        return Err(FrameError::RxTooSmall(room));
    }
    Ok(())
}

/// Copies `frame` into `bufs`; returns the bytes written, short when the
/// buffers are too small or one of them is not guest memory.
pub fn scatter_rx<M: GuestMemory>(mem: &M, bufs: &[RxBuffer], frame: &[u8]) -> usize {
    let mut off = 0usize;
    for b in bufs {
        if off >= frame.len() {
            break;
        }
        let len = (b.len as usize).min(frame.len() - off);
        if b.addr.checked_add(len as u64).is_none()
            || mem.write_slice(&frame[off..off + len], b.addr).is_err()
        {
            break;
        }
        off += len;
    }
    off
}
