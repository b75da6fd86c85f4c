//! A virtio-blk request as the guest posted it: a pure parse of one
//! descriptor chain into a typed request, every guest-chosen number checked
//! (virtio 1.2 section 5.2.6). The device does the I/O.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

pub const SECTOR_SHIFT: u64 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Data descriptors in one request (`seg_max` in the config space).
pub const SEG_MAX: u32 = 126;
/// Segments in one discard request (`max_discard_seg`).
pub const MAX_DISCARD_SEG: u32 = 1;
/// Sectors in one discard segment (`max_discard_sectors`).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> SECTOR_SHIFT;
pub const ID_BYTES: usize = 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const HEADER_LEN: u32 = 16;
const DISCARD_SEGMENT_LEN: u32 = 16;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the descriptor chain is empty or has no status descriptor")]
    TooShort,
    #[error("the request header is device-writable or shorter than {HEADER_LEN} bytes")]
    BadHeader,
    #[error("the status descriptor is device-readable or empty")]
    BadStatus,
    #[error("cannot read the request header from guest memory")]
    HeaderMemory,
    #[error("more than {SEG_MAX} data descriptors")]
    TooManySegments,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("a data descriptor has the wrong direction for this request type")]
    WrongDirection,
    #[error("{0} data bytes are not a whole number of sectors")]
    PartialSector(u64),
    #[error("{len} bytes at sector {sector} end past the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("GET_ID needs a device-writable buffer")]
    NoIdBuffer,
    #[error("a discard request of {0} bytes is not 1 to {MAX_DISCARD_SEG} segments")]
    BadDiscard(u64),
    #[error("cannot read a discard segment from guest memory")]
    DiscardMemory,
}

impl RequestError {
    /// The status the guest gets back.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// One guest buffer of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A range of sectors to discard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardRange {
    pub sector: u64,
    pub sectors: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Read `len` bytes from byte `offset` into the segments.
    In {
        offset: u64,
        len: u64,
    },
    /// Write the segments at byte `offset`.
    Out {
        offset: u64,
        len: u64,
    },
    Flush,
    /// The serial into a buffer of `len` bytes.
    GetId(Segment),
    Discard(Vec<DiscardRange>),
}

/// A request checked against the disk: every range lies inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    /// The data buffers, at most `SEG_MAX`, each with the direction `kind` needs.
    pub data: Vec<Segment>,
}

/// What the guest posted: its status byte's address (where any outcome is
/// reported) and the request, or why it cannot be served.
#[derive(Debug)]
pub struct Parsed {
    pub status: GuestAddress,
    pub request: Result<Request, RequestError>,
}

/// The disk a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Disk {
    pub sectors: u64,
    pub read_only: bool,
}

/// Parses one chain: header first, status byte last, data between. An
/// `Err` means there is no status byte to report anything in; the chain is
/// then returned to the guest unanswered.
pub fn parse<M: GuestMemory>(
    mem: &M,
    mut chain: impl Iterator<Item = Descriptor>,
    disk: Disk,
) -> Result<Parsed, RequestError> {
    let head = chain.next().ok_or(RequestError::TooShort)?;
    // Keep at most SEG_MAX data descriptors and the last one seen; walking
    // the rest is bounded by the chain itself (queue size or table length).
    let mut data = Vec::new();
    let mut last = None;
    let mut too_many = false;
    for d in chain {
        if let Some(prev) = last.replace(d) {
            if data.len() < SEG_MAX as usize {
                data.push(prev);
            } else {
                too_many = true;
            }
        }
    }
    let status = last.ok_or(RequestError::TooShort)?;
    if !status.is_write_only() || status.len() == 0 {
        return Err(RequestError::BadStatus);
    }
    let request = if head.is_write_only() || head.len() < HEADER_LEN {
        Err(RequestError::BadHeader)
    } else if too_many {
        Err(RequestError::TooManySegments)
    } else {
        read_header(mem, head.addr())
            .and_then(|(kind, sector)| check(mem, kind, sector, &data, disk))
    };
    Ok(Parsed {
        status: status.addr(),
        request,
    })
}

fn read_header<M: GuestMemory>(mem: &M, at: GuestAddress) -> Result<(u32, u64), RequestError> {
    let kind: u32 = mem.read_obj(at).map_err(|_| RequestError::HeaderMemory)?;
    let sector: u64 = at
        .checked_add(8)
        .and_then(|a| mem.read_obj(a).ok())
        .ok_or(RequestError::HeaderMemory)?;
    Ok((kind, sector))
}

/// The data descriptors, all in the direction `device_writes` says.
fn segments(data: &[Descriptor], device_writes: bool) -> Result<Vec<Segment>, RequestError> {
    data.iter()
        .map(|d| {
            if d.is_write_only() == device_writes {
                Ok(Segment {
                    addr: d.addr(),
                    len: d.len(),
                })
            } else {
                Err(RequestError::WrongDirection)
            }
        })
        .collect()
}

/// Byte offset and length of a read or write, inside the disk.
fn io_range(sector: u64, data: &[Segment], disk: Disk) -> Result<(u64, u64), RequestError> {
    // At most SEG_MAX lengths below 2^32 each: no overflow in u64.
    let len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::PartialSector(len));
    }
    let out_of_range = RequestError::OutOfRange {
        sector,
        len,
        capacity: disk.sectors,
    };
    let end = sector
        .checked_add(len >> SECTOR_SHIFT)
        .ok_or_else(|| out_of_range.clone())?;
    if end > disk.sectors {
        return Err(out_of_range);
    }
    // sector <= disk.sectors, which came from a file size: no overflow.
    Ok((sector << SECTOR_SHIFT, len))
}

fn check<M: GuestMemory>(
    mem: &M,
    kind: u32,
    sector: u64,
    data: &[Descriptor],
    disk: Disk,
) -> Result<Request, RequestError> {
    let (kind, data) = match kind {
        T_IN => {
            let data = segments(data, true)?;
            let (offset, len) = io_range(sector, &data, disk)?;
            (Kind::In { offset, len }, data)
        }
        T_OUT => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let data = segments(data, false)?;
            let (offset, len) = io_range(sector, &data, disk)?;
            (Kind::Out { offset, len }, data)
        }
        // A flush carries no data; any buffers are ignored.
        T_FLUSH => (Kind::Flush, Vec::new()),
        T_GET_ID => {
            let first = data.first().ok_or(RequestError::NoIdBuffer)?;
            let buf = segments(std::slice::from_ref(first), true)
                .map_err(|_| RequestError::NoIdBuffer)?[0];
            (Kind::GetId(buf), Vec::new())
        }
        T_DISCARD => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let data = segments(data, false)?;
            (Kind::Discard(discard_ranges(mem, &data, disk)?), Vec::new())
        }
        other => return Err(RequestError::Unsupported(other)),
    };
    Ok(Request { kind, data })
}

/// Reads the discard segments (sector u64, sectors u32, flags u32 each).
fn discard_ranges<M: GuestMemory>(
    mem: &M,
    data: &[Segment],
    disk: Disk,
) -> Result<Vec<DiscardRange>, RequestError> {
    let len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
    let count = len / u64::from(DISCARD_SEGMENT_LEN);
    if len % u64::from(DISCARD_SEGMENT_LEN) != 0 || count == 0 || count > u64::from(MAX_DISCARD_SEG)
    {
        return Err(RequestError::BadDiscard(len));
    }
    // With one segment allowed, it must lie in one descriptor.
    let seg = data
        .iter()
        .find(|s| s.len > 0)
        .filter(|s| s.len == DISCARD_SEGMENT_LEN)
        .ok_or(RequestError::BadDiscard(len))?;
    let sector: u64 = mem
        .read_obj(seg.addr)
        .map_err(|_| RequestError::DiscardMemory)?;
    let sectors: u32 = seg
        .addr
        .checked_add(8)
        .and_then(|a| mem.read_obj(a).ok())
        .ok_or(RequestError::DiscardMemory)?;
    let out_of_range = RequestError::OutOfRange {
        sector,
        len: u64::from(sectors) << SECTOR_SHIFT,
        capacity: disk.sectors,
    };
    if sectors > MAX_DISCARD_SECTORS {
        return Err(out_of_range);
    }
    match sector.checked_add(u64::from(sectors)) {
        Some(end) if end <= disk.sectors => Ok(vec![DiscardRange { sector, sectors }]),
        _ => Err(out_of_range),
    }
}
