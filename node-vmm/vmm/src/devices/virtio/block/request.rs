//! A virtio-blk request as the guest posted it: a pure parse of one
//! descriptor chain into a typed request, every guest-chosen number checked
//! (virtio 1.2 section 5.2.6). The device does the I/O.
//!
//! Discard and write-zeroes carry their sector ranges as data: segments of
//! 16 bytes (`sector` u64, `num_sectors` u32, `flags` u32, little endian),
//! one per request here (`max_discard_seg` = `max_write_zeroes_seg` = 1).

use virtio_bindings::virtio_blk as vb;
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
/// Segments in one write-zeroes request (`max_write_zeroes_seg`).
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;
/// Sectors in one write-zeroes segment (`max_write_zeroes_sectors`): 1 GiB,
/// which bounds the slow path (zeroes written where the file system cannot
/// allocate zero ranges) of one request.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << (30 - SECTOR_SHIFT);
/// The zeroed range may be deallocated.
pub const FLAG_UNMAP: u32 = vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;

// `sector_ranges` reads the one segment a request may carry.
const _: () = assert!(MAX_DISCARD_SEG == 1 && MAX_WRITE_ZEROES_SEG == 1);

const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
const T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
const T_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;
const HEADER_LEN: u32 = 16;
const RANGE_SEGMENT_LEN: u32 = 16;

/// The requests whose data is a list of sector ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOp {
    Discard,
    WriteZeroes,
}

impl RangeOp {
    pub fn max_segments(self) -> u32 {
        match self {
            RangeOp::Discard => MAX_DISCARD_SEG,
            RangeOp::WriteZeroes => MAX_WRITE_ZEROES_SEG,
        }
    }

    pub fn max_sectors(self) -> u32 {
        match self {
            RangeOp::Discard => MAX_DISCARD_SECTORS,
            RangeOp::WriteZeroes => MAX_WRITE_ZEROES_SECTORS,
        }
    }

    /// The flag bits a segment may carry: unmap only on write-zeroes (virtio
    /// 1.2 section 5.2.6.2: an unmap flag on a discard is unsupported too).
    pub fn known_flags(self) -> u32 {
        match self {
            RangeOp::Discard => 0,
            RangeOp::WriteZeroes => FLAG_UNMAP,
        }
    }
}

impl std::fmt::Display for RangeOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RangeOp::Discard => "discard",
            RangeOp::WriteZeroes => "write-zeroes",
        })
    }
}

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
    #[error(
        "a {op} request of {len} bytes is not 1 to {max} segments of {RANGE_SEGMENT_LEN} bytes in one buffer",
        max = .op.max_segments()
    )]
    BadRanges { op: RangeOp, len: u64 },
    #[error("cannot read a {0} segment from guest memory")]
    RangeMemory(RangeOp),
    #[error("{op} flags {flags:#x} have bits outside {known:#x}", known = .op.known_flags())]
    UnknownFlags { op: RangeOp, flags: u32 },
    #[error("a {op} segment of {sectors} sectors is over the limit of {max}", max = .op.max_sectors())]
    TooManySectors { op: RangeOp, sectors: u32 },
}

impl RequestError {
    /// The status the guest gets back: `UNSUPP` for an unknown type and
    /// for unknown discard or write-zeroes flags (virtio 1.2 section
    /// 5.2.6.2), `IOERR` for everything else.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnknownFlags { .. } => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

// The status byte's values (they fit in its u8).
pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// One guest buffer of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A range of sectors to discard or zero, inside the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub sectors: u32,
    /// Write-zeroes only: the range may be deallocated (it reads back as
    /// zeroes either way).
    pub unmap: bool,
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
    Discard(Vec<SectorRange>),
    WriteZeroes(Vec<SectorRange>),
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
        T_DISCARD | T_WRITE_ZEROES => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let data = segments(data, false)?;
            let kind = if kind == T_DISCARD {
                Kind::Discard(sector_ranges(mem, &data, disk, RangeOp::Discard)?)
            } else {
                Kind::WriteZeroes(sector_ranges(mem, &data, disk, RangeOp::WriteZeroes)?)
            };
            (kind, Vec::new())
        }
        other => return Err(RequestError::Unsupported(other)),
    };
    Ok(Request { kind, data })
}

/// Reads the segments of a discard or write-zeroes request (sector u64,
/// sectors u32, flags u32 each): a whole number of them, at most
/// `op.max_segments()`, in one buffer; flags known to `op`; each range at
/// most `op.max_sectors()` long and inside the disk.
fn sector_ranges<M: GuestMemory>(
    mem: &M,
    data: &[Segment],
    disk: Disk,
    op: RangeOp,
) -> Result<Vec<SectorRange>, RequestError> {
    // At most SEG_MAX lengths below 2^32 each: no overflow in u64.
    let len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
    let bad = RequestError::BadRanges { op, len };
    let count = len / u64::from(RANGE_SEGMENT_LEN);
    if len % u64::from(RANGE_SEGMENT_LEN) != 0 || count == 0 || count > u64::from(op.max_segments())
    {
        return Err(bad);
    }
    // With one segment allowed, it must lie in one descriptor.
    let seg = data
        .iter()
        .find(|s| s.len > 0)
        .filter(|s| s.len == RANGE_SEGMENT_LEN)
        .ok_or(bad)?;
    let field = |at: u64| {
        seg.addr
            .checked_add(at)
            .ok_or(RequestError::RangeMemory(op))
    };
    let memory = |_| RequestError::RangeMemory(op);
    let sector: u64 = mem.read_obj(seg.addr).map_err(memory)?;
    let sectors: u32 = mem.read_obj(field(8)?).map_err(memory)?;
    let flags: u32 = mem.read_obj(field(12)?).map_err(memory)?;
    if flags & !op.known_flags() != 0 {
        return Err(RequestError::UnknownFlags { op, flags });
    }
    if sectors > op.max_sectors() {
        return Err(RequestError::TooManySectors { op, sectors });
    }
    match sector.checked_add(u64::from(sectors)) {
        Some(end) if end <= disk.sectors => Ok(vec![SectorRange {
            sector,
            sectors,
            unmap: flags & FLAG_UNMAP != 0,
        }]),
        _ => Err(RequestError::OutOfRange {
            sector,
            len: u64::from(sectors) << SECTOR_SHIFT,
            capacity: disk.sectors,
        }),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const MEM: u64 = 1 << 20;
    const HDR: u64 = 0x1000;
    const SEG: u64 = 0x2000;
    const STATUS: u64 = 0x3000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    /// Larger than any range a segment can name.
    const BIG: u64 = 1 << 40;
    const RW: Disk = Disk {
        sectors: BIG,
        read_only: false,
    };

    /// What a parse returns.
    type Outcome = Result<Request, RequestError>;
    /// Data descriptors: (address, length, flags).
    type Buffers = [(u64, u32, u16)];

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    /// Parses a `kind` request whose data descriptors are `data` (address,
    /// length, flags), with (sector, sectors, flags) stored at `SEG`.
    fn parse_with(kind: u32, seg: (u64, u32, u32), data: &Buffers, disk: Disk) -> Outcome {
        let m = mem();
        m.write_obj(kind, GuestAddress(HDR)).unwrap();
        m.write_obj(seg.0, GuestAddress(SEG)).unwrap();
        m.write_obj(seg.1, GuestAddress(SEG + 8)).unwrap();
        m.write_obj(seg.2, GuestAddress(SEG + 12)).unwrap();
        let mut chain = vec![Descriptor::new(HDR, 16, NEXT, 1)];
        for (i, &(addr, len, flags)) in data.iter().enumerate() {
            chain.push(Descriptor::new(addr, len, flags | NEXT, i as u16 + 2));
        }
        chain.push(Descriptor::new(STATUS, 1, WRITE, 0));
        let parsed = parse(&m, chain.into_iter(), disk).unwrap();
        assert_eq!(parsed.status, GuestAddress(STATUS));
        parsed.request
    }

    /// A request with one 16-byte segment in one device-readable buffer.
    fn ranged(kind: u32, seg: (u64, u32, u32), disk: Disk) -> Outcome {
        parse_with(kind, seg, &[(SEG, 16, 0)], disk)
    }

    fn zeroes(sector: u64, sectors: u32, unmap: bool) -> Request {
        Request {
            kind: Kind::WriteZeroes(vec![SectorRange {
                sector,
                sectors,
                unmap,
            }]),
            data: Vec::new(),
        }
    }

    #[test]
    fn write_zeroes_segments() {
        use RangeOp::WriteZeroes as Wz;
        let max = MAX_WRITE_ZEROES_SECTORS;
        let small = Disk {
            sectors: 64,
            read_only: false,
        };
        let range = |sector, sectors: u32, capacity| RequestError::OutOfRange {
            sector,
            len: u64::from(sectors) << SECTOR_SHIFT,
            capacity,
        };
        let cases: &[((u64, u32, u32), Disk, Outcome)] = &[
            ((0, 8, 0), RW, Ok(zeroes(0, 8, false))),
            ((0, 8, FLAG_UNMAP), RW, Ok(zeroes(0, 8, true))),
            ((5, 0, 0), RW, Ok(zeroes(5, 0, false))),
            ((56, 8, 0), small, Ok(zeroes(56, 8, false))),
            ((64, 0, 0), small, Ok(zeroes(64, 0, false))),
            ((57, 8, 0), small, Err(range(57, 8, 64))),
            ((65, 0, 0), small, Err(range(65, 0, 64))),
            ((u64::MAX, 1, 0), RW, Err(range(u64::MAX, 1, BIG))),
            ((u64::MAX - 7, 8, 0), RW, Err(range(u64::MAX - 7, 8, BIG))),
            (
                (BIG - u64::from(max), max, 0),
                RW,
                Ok(zeroes(BIG - u64::from(max), max, false)),
            ),
            (
                (0, max + 1, 0),
                RW,
                Err(RequestError::TooManySectors {
                    op: Wz,
                    sectors: max + 1,
                }),
            ),
            (
                (0, u32::MAX, FLAG_UNMAP),
                RW,
                Err(RequestError::TooManySectors {
                    op: Wz,
                    sectors: u32::MAX,
                }),
            ),
            (
                (0, 8, 2),
                RW,
                Err(RequestError::UnknownFlags { op: Wz, flags: 2 }),
            ),
            (
                (0, 8, 0x8000_0001),
                RW,
                Err(RequestError::UnknownFlags {
                    op: Wz,
                    flags: 0x8000_0001,
                }),
            ),
            // Flags are checked before the range: unsupported wins.
            (
                (u64::MAX, u32::MAX, 4),
                small,
                Err(RequestError::UnknownFlags { op: Wz, flags: 4 }),
            ),
            (
                (0, 8, 0),
                Disk {
                    sectors: BIG,
                    read_only: true,
                },
                Err(RequestError::ReadOnly),
            ),
        ];
        for (seg, disk, want) in cases {
            assert_eq!(
                &ranged(T_WRITE_ZEROES, *seg, *disk),
                want,
                "{seg:x?} on {disk:?}"
            );
        }
    }

    #[test]
    fn write_zeroes_buffers() {
        use RangeOp::WriteZeroes as Wz;
        let seg = (0, 8, 0);
        let bad = |len| Err(RequestError::BadRanges { op: Wz, len });
        let cases: &[(&Buffers, Outcome)] = &[
            (&[], bad(0)),
            (&[(SEG, 0, 0)], bad(0)),
            (&[(SEG, 8, 0)], bad(8)),
            (&[(SEG, 17, 0)], bad(17)),
            // Two segments where one is allowed.
            (&[(SEG, 32, 0)], bad(32)),
            (&[(SEG, 0xffff_fff0, 0)], bad(0xffff_fff0)),
            // One segment split over two buffers.
            (&[(SEG, 8, 0), (SEG + 8, 8, 0)], bad(16)),
            // Empty buffers around the segment are fine.
            (
                &[(SEG, 0, 0), (SEG, 16, 0), (SEG, 0, 0)],
                Ok(zeroes(0, 8, false)),
            ),
            (&[(SEG, 16, WRITE)], Err(RequestError::WrongDirection)),
            (&[(MEM - 8, 16, 0)], Err(RequestError::RangeMemory(Wz))),
            (&[(MEM - 14, 16, 0)], Err(RequestError::RangeMemory(Wz))),
            (&[(MEM + 0x1000, 16, 0)], Err(RequestError::RangeMemory(Wz))),
            (&[(u64::MAX - 9, 16, 0)], Err(RequestError::RangeMemory(Wz))),
        ];
        for (data, want) in cases {
            assert_eq!(
                &parse_with(T_WRITE_ZEROES, seg, data, RW),
                want,
                "{data:x?}"
            );
        }
    }

    #[test]
    fn discard_takes_no_flags() {
        use RangeOp::Discard;
        assert_eq!(
            ranged(T_DISCARD, (3, 4, 0), RW),
            Ok(Request {
                kind: Kind::Discard(vec![SectorRange {
                    sector: 3,
                    sectors: 4,
                    unmap: false
                }]),
                data: Vec::new(),
            })
        );
        for flags in [FLAG_UNMAP, 2, u32::MAX] {
            assert_eq!(
                ranged(T_DISCARD, (3, 4, flags), RW),
                Err(RequestError::UnknownFlags { op: Discard, flags })
            );
        }
    }

    #[test]
    fn statuses() {
        let op = RangeOp::WriteZeroes;
        for (e, status) in [
            (RequestError::Unsupported(99), S_UNSUPP),
            (RequestError::UnknownFlags { op, flags: 2 }, S_UNSUPP),
            (RequestError::TooManySectors { op, sectors: 1 }, S_IOERR),
            (RequestError::BadRanges { op, len: 1 }, S_IOERR),
            (RequestError::RangeMemory(op), S_IOERR),
            (RequestError::ReadOnly, S_IOERR),
        ] {
            assert_eq!(e.status(), status, "{e}");
        }
        assert_eq!(
            RequestError::UnknownFlags { op, flags: 6 }.to_string(),
            "write-zeroes flags 0x6 have bits outside 0x1"
        );
    }

    /// What a discard or write-zeroes request of one buffer of `len` bytes
    /// holding (sector, sectors, flags) must parse to, worked out in u128.
    fn model(
        kind: u32,
        (sector, sectors, flags): (u64, u32, u32),
        len: u32,
        disk: Disk,
    ) -> Result<Kind, RequestError> {
        let op = if kind == T_DISCARD {
            RangeOp::Discard
        } else {
            RangeOp::WriteZeroes
        };
        let known = u32::from(kind == T_WRITE_ZEROES);
        let max = if kind == T_DISCARD {
            u32::MAX / 512
        } else {
            1 << 21
        };
        if disk.read_only {
            return Err(RequestError::ReadOnly);
        }
        if len != 16 {
            return Err(RequestError::BadRanges {
                op,
                len: len.into(),
            });
        }
        if flags & !known != 0 {
            return Err(RequestError::UnknownFlags { op, flags });
        }
        if sectors > max {
            return Err(RequestError::TooManySectors { op, sectors });
        }
        if u128::from(sector) + u128::from(sectors) > u128::from(disk.sectors) {
            return Err(RequestError::OutOfRange {
                sector,
                len: u64::from(sectors) * 512,
                capacity: disk.sectors,
            });
        }
        let r = vec![SectorRange {
            sector,
            sectors,
            unmap: flags == 1,
        }];
        Ok(if kind == T_DISCARD {
            Kind::Discard(r)
        } else {
            Kind::WriteZeroes(r)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever segment the guest writes, the parse is the model's:
        /// ranges inside the disk and under the limit, known flags only.
        #[test]
        fn ranged_requests_match_the_model(
            kind in prop_oneof![Just(T_DISCARD), Just(T_WRITE_ZEROES)],
            capacity in prop_oneof![0u64..4096, Just(u64::MAX), any::<u64>()],
            sector in prop_oneof![0u64..4096, (0u64..4096).prop_map(|s| u64::MAX - s), any::<u64>()],
            sectors in prop_oneof![
                0u32..4096,
                ((1u32 << 21) - 2..(1 << 21) + 2),
                ((u32::MAX >> 9) - 2..(u32::MAX >> 9) + 2),
                any::<u32>()
            ],
            flags in prop_oneof![0u32..4, any::<u32>()],
            len in prop_oneof![Just(16u32), 0u32..64, any::<u32>()],
            read_only in any::<bool>(),
        ) {
            let disk = Disk { sectors: capacity, read_only };
            let seg = (sector, sectors, flags);
            let got = parse_with(kind, seg, &[(SEG, len, 0)], disk);
            let want = model(kind, seg, len, disk);
            prop_assert_eq!(got.map(|r| r.kind), want);
        }
    }
}
