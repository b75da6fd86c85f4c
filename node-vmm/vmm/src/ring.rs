//! A file-backed byte ring: a VM's serial console as a file of fixed size
//! that one writer (the VMM) appends to and any number of readers (the node
//! agent, `node-vmm console-log`) read by stream offset while it is being
//! written. The file outlives both: a reader that comes late still finds the
//! newest `capacity` bytes, a reader that follows resumes where it stopped,
//! and a guest that prints forever never grows the file.
//!
//! # Layout (version 1, integers little-endian)
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0      | 8    | magic `KVMMRING` |
//! | 8      | 4    | version, 1 |
//! | 12     | 4    | header length, 64: where the data starts |
//! | 16     | 8    | capacity: data bytes |
//! | 24     | 8    | id: random, new whenever the ring is (re-)created |
//! | 32     | 8    | written: stream bytes ever written, all of them complete |
//! | 40     | 8    | writing: end of the write in progress (`written` when idle) |
//! | 48     | 8    | base: the oldest stream byte stored since the ring was laid out |
//! | 56     | 8    | zero |
//!
//! followed by `capacity` data bytes. Stream byte `i` lives at data offset
//! `i % capacity`, so the ring holds stream bytes
//! `[max(base, written - capacity), written)`. `base` is 0 for a new ring;
//! a ring resized to a larger capacity keeps its total and starts holding
//! from the oldest byte it kept.
//!
//! # Concurrency
//!
//! A write of stream bytes `[t, e)` overwrites the bytes `capacity` before
//! them. The writer stores `writing = e`, then the data, then `written = e`:
//! a reader never sees a `written` whose bytes are not there, and can tell
//! which bytes may be being overwritten. A reader reads the header, copies
//! `[start, written)`, reads the header again and drops every copied byte
//! below the second `writing - capacity`: those may have been overwritten
//! while it copied. (Storing only `written`, after the data, would not do:
//! until it moves, a reader cannot see that the oldest bytes are changing.)
//!
//! Writer and readers use plain `pwrite`/`pread` on the same file, which go
//! through the page cache; on x86-64, the only target, a reader that sees a
//! header value also sees the data stored before it. A header read that
//! races a header write may be torn: readers read it until two reads agree.
//!
//! There is one writer at a time (the VMM of the VM; each incarnation
//! re-attaches with [`RingWriter::open_or_create`] and keeps the total).
//! Nothing in the file is trusted by readers: a corrupt or hostile header
//! gives an error, never a panic or an allocation beyond the capacity
//! bound.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

/// The first eight bytes of every ring.
pub const MAGIC: [u8; 8] = *b"KVMMRING";
/// The layout version this code reads and writes.
pub const VERSION: u32 = 1;
/// Header bytes before the data.
pub const HEADER_LEN: u64 = 64;
/// Smallest capacity a ring may have.
pub const MIN_CAPACITY: u64 = 64;
/// Largest capacity a ring may have (bounds every read's allocation).
pub const MAX_CAPACITY: u64 = 256 << 20;
/// Where `written` and `writing` are, together.
const COUNTERS_AT: u64 = 32;
/// Header reads before a reader gives up on a header that keeps changing.
/// A writer appending in a tight loop changes it every few microseconds;
/// past the first tries the reader yields between pairs, so this bounds
/// the wait to a few milliseconds of a writer that never pauses.
const HEADER_TRIES: usize = 4096;
/// Tries before the reader starts yielding the CPU between them.
const HEADER_SPINS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("cannot open console ring {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("console ring I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("not a console ring (bad magic)")]
    Magic,
    #[error("console ring version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("console ring header length {0} is not {HEADER_LEN}")]
    HeaderLen(u32),
    #[error("console ring capacity {0} is outside {MIN_CAPACITY}..={MAX_CAPACITY} bytes")]
    Capacity(u64),
    #[error("console ring counters are inconsistent (base {base}, written {written}, writing {writing})")]
    Counters {
        base: u64,
        written: u64,
        writing: u64,
    },
    #[error("console ring is truncated: {len} bytes, its header needs {need}")]
    Truncated { len: u64, need: u64 },
    #[error("the console ring was re-created; read it again from its start")]
    Recreated,
    #[error("offset {offset} is past the end of the console ring ({total} bytes written)")]
    OffsetAhead { offset: u64, total: u64 },
    #[error("the console ring header kept changing while being read")]
    Unstable,
}

/// The header fields that vary between rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    capacity: u64,
    id: u64,
    written: u64,
    writing: u64,
    base: u64,
}

fn u32_at(b: &[u8; HEADER_LEN as usize], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8; HEADER_LEN as usize], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn check_capacity(capacity: u64) -> Result<u64, RingError> {
    if (MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
        Ok(capacity)
    } else {
        Err(RingError::Capacity(capacity))
    }
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.capacity.to_le_bytes());
        b[24..32].copy_from_slice(&self.id.to_le_bytes());
        b[32..48].copy_from_slice(&self.counters());
        b[48..56].copy_from_slice(&self.base.to_le_bytes());
        b
    }

    fn counters(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.written.to_le_bytes());
        c[8..].copy_from_slice(&self.writing.to_le_bytes());
        c
    }

    /// Parses and checks a header: every field a reader relies on is
    /// within bounds afterwards.
    fn decode(b: &[u8; HEADER_LEN as usize]) -> Result<Self, RingError> {
        if b[..8] != MAGIC {
            return Err(RingError::Magic);
        }
        match u32_at(b, 8) {
            VERSION => {}
            v => return Err(RingError::Version(v)),
        }
        match u32_at(b, 12) {
            len if u64::from(len) == HEADER_LEN => {}
            len => return Err(RingError::HeaderLen(len)),
        }
        let h = Self {
            capacity: check_capacity(u64_at(b, 16))?,
            id: u64_at(b, 24),
            written: u64_at(b, 32),
            writing: u64_at(b, 40),
            base: u64_at(b, 48),
        };
        if h.base > h.written || h.written > h.writing {
            return Err(RingError::Counters {
                base: h.base,
                written: h.written,
                writing: h.writing,
            });
        }
        Ok(h)
    }

    /// The oldest stream byte held that no write may be changing.
    fn oldest_valid(&self) -> u64 {
        self.writing.saturating_sub(self.capacity).max(self.base)
    }

    /// Bytes the file must have.
    fn file_len(&self) -> u64 {
        HEADER_LEN + self.capacity
    }
}

/// An I/O error, with a short read of the file reported as truncation.
fn io_err(file: &File, need: u64) -> impl FnOnce(io::Error) -> RingError + '_ {
    move |e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            RingError::Truncated {
                len: file.metadata().map_or(0, |m| m.len()),
                need,
            }
        } else {
            RingError::Io(e)
        }
    }
}

/// Reads the header until two reads agree (a read racing the writer's
/// header write may be torn), then checks it.
fn stable_header(file: &File) -> Result<Header, RingError> {
    let read = || -> Result<[u8; HEADER_LEN as usize], RingError> {
        let mut b = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut b, 0)
            .map_err(io_err(file, HEADER_LEN))?;
        Ok(b)
    };
    let mut last = read()?;
    for attempt in 0..HEADER_TRIES {
        let now = read()?;
        if now == last {
            return Header::decode(&now);
        }
        if attempt >= HEADER_SPINS {
            // Let the writer finish its update, then read a fresh pair.
            std::thread::yield_now();
            last = read()?;
        } else {
            last = now;
        }
    }
    Err(RingError::Unstable)
}

/// Fails unless the file is long enough for `h`'s data.
fn check_len(file: &File, h: &Header) -> Result<(), RingError> {
    let len = file.metadata()?.len();
    if len < h.file_len() {
        return Err(RingError::Truncated {
            len,
            need: h.file_len(),
        });
    }
    Ok(())
}

/// The data file offsets of `len` (≤ capacity) stream bytes from `pos`:
/// the part up to the end of the data area, then the rest from its start.
fn spans(capacity: u64, pos: u64, len: usize) -> [(u64, std::ops::Range<usize>); 2] {
    debug_assert!(len as u64 <= capacity);
    let at = pos % capacity;
    let first = (len as u64).min(capacity - at) as usize;
    [(HEADER_LEN + at, 0..first), (HEADER_LEN, first..len)]
}

/// Copies stream bytes `[pos, pos + buf.len())` out of the ring.
fn read_stream(file: &File, h: &Header, pos: u64, buf: &mut [u8]) -> Result<(), RingError> {
    for (at, range) in spans(h.capacity, pos, buf.len()) {
        if !range.is_empty() {
            file.read_exact_at(&mut buf[range], at)
                .map_err(io_err(file, h.file_len()))?;
        }
    }
    Ok(())
}

/// Stores `bytes` (≤ capacity) as stream bytes from `pos`.
fn write_stream(file: &File, capacity: u64, pos: u64, bytes: &[u8]) -> io::Result<()> {
    for (at, range) in spans(capacity, pos, bytes.len()) {
        if !range.is_empty() {
            file.write_all_at(&bytes[range], at)?;
        }
    }
    Ok(())
}

/// A random ring id (the clock and pid if the kernel has no randomness).
fn new_id() -> u64 {
    let mut id = [0u8; 8];
    // SAFETY: getrandom writes at most `id.len()` bytes into our buffer.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), libc::GRND_NONBLOCK) };
    if n == id.len() as isize {
        return u64::from_le_bytes(id);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    now ^ u64::from(std::process::id()).rotate_left(32)
}

/// Clears `O_APPEND`, under which Linux `pwrite` ignores its offset.
fn in_place(file: &File) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFL) on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_APPEND != 0 {
        // SAFETY: as above, with F_SETFL and an integer.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_APPEND) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reserves the file's blocks, so writing the ring never needs free space.
fn preallocate(file: &File, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    // File systems without fallocate keep a sparse file; that is all.
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS) => Ok(()),
        _ => Err(e),
    }
}

/// How [`RingWriter::open_or_create`] found the file.
#[derive(Debug)]
pub enum Opened {
    /// It was empty: a new ring.
    Created,
    /// A ring of this capacity: writes continue its stream.
    Attached,
    /// A ring of another capacity: resized, its newest bytes and its total kept.
    Resized { from: u64 },
    /// Not a usable ring: replaced by a new, empty one.
    Replaced(RingError),
}

/// The one writer of a ring.
#[derive(Debug)]
pub struct RingWriter {
    file: File,
    header: Header,
}

impl RingWriter {
    /// Makes `file` a new, empty ring of `capacity` data bytes, whatever it
    /// held before. `file` must be open for reading and writing; a writer
    /// clears `O_APPEND` on it (`pwrite` would ignore its offsets).
    pub fn create(file: File, capacity: u64) -> Result<Self, RingError> {
        let header = Header {
            capacity: check_capacity(capacity)?,
            id: new_id(),
            written: 0,
            writing: 0,
            base: 0,
        };
        Self::init(file, header, &[])
    }

    /// Lays out the file for `header` with `tail` as the stream bytes just
    /// before `header.written`. The header is stored last, and the old one
    /// is wiped first: a crash half-way leaves no valid header over
    /// mismatched data.
    fn init(file: File, header: Header, tail: &[u8]) -> Result<Self, RingError> {
        in_place(&file)?;
        file.write_all_at(&[0u8; HEADER_LEN as usize], 0)?;
        file.set_len(header.file_len())?;
        preallocate(&file, header.file_len())?;
        write_stream(
            &file,
            header.capacity,
            header.written - tail.len() as u64,
            tail,
        )?;
        file.write_all_at(&header.encode(), 0)?;
        Ok(Self { file, header })
    }

    /// Continues the ring in `file`. A write its last writer did not finish
    /// is taken as done: its bytes may be stale, the stream goes on after it.
    pub fn open(file: File) -> Result<Self, RingError> {
        let h = stable_header(&file)?;
        check_len(&file, &h)?;
        Self::attach(file, h)
    }

    fn attach(file: File, h: Header) -> Result<Self, RingError> {
        in_place(&file)?;
        let w = Self {
            file,
            header: Header {
                written: h.writing,
                ..h
            },
        };
        if h.written != h.writing {
            w.store_counters()?;
        }
        Ok(w)
    }

    /// What the VMM does with its console file: a new ring if the file is
    /// empty, the same ring if it holds one of `capacity`, the same stream
    /// in a ring of the new size if it holds one of another, and a new ring
    /// in place of anything else (it says which).
    pub fn open_or_create(file: File, capacity: u64) -> Result<(Self, Opened), RingError> {
        check_capacity(capacity)?;
        if file.metadata()?.len() == 0 {
            return Ok((Self::create(file, capacity)?, Opened::Created));
        }
        match stable_header(&file).and_then(|h| check_len(&file, &h).map(|()| h)) {
            Ok(h) if h.capacity == capacity => Ok((Self::attach(file, h)?, Opened::Attached)),
            Ok(h) => {
                let from = h.capacity;
                Ok((Self::resize(file, h, capacity)?, Opened::Resized { from }))
            }
            Err(RingError::Io(e)) => Err(RingError::Io(e)),
            Err(e) => Ok((Self::create(file, capacity)?, Opened::Replaced(e))),
        }
    }

    /// Moves the newest bytes of `old` into a ring of `capacity`; the id
    /// and the total stay, so readers' offsets stay valid.
    fn resize(file: File, old: Header, capacity: u64) -> Result<Self, RingError> {
        let total = old.writing;
        let keep = total.min(old.capacity).min(capacity);
        let mut tail = vec![0u8; keep as usize];
        read_stream(&file, &old, total - keep, &mut tail)?;
        let header = Header {
            capacity,
            written: total,
            writing: total,
            base: total - keep,
            ..old
        };
        Self::init(file, header, &tail)
    }

    /// Data bytes.
    pub fn capacity(&self) -> u64 {
        self.header.capacity
    }

    /// Stream bytes ever written.
    pub fn total(&self) -> u64 {
        self.header.written
    }

    fn store_counters(&self) -> io::Result<()> {
        self.file.write_all_at(&self.header.counters(), COUNTERS_AT)
    }

    /// Appends `buf` to the stream (only its newest `capacity` bytes can be
    /// kept). Once the write is announced, the total moves past `buf` even
    /// if storing the data fails: the stream never goes back, and readers
    /// are never handed bytes that were being overwritten.
    pub fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let start = self.header.written;
        let end = start
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::other("console ring total overflows"))?;
        let keep = &buf[buf.len().saturating_sub(self.header.capacity as usize)..];
        self.header.writing = end;
        if let Err(e) = self.store_counters() {
            self.header.writing = start;
            return Err(e);
        }
        let data = write_stream(
            &self.file,
            self.header.capacity,
            end - keep.len() as u64,
            keep,
        );
        self.header.written = end;
        let commit = self.store_counters();
        data.and(commit)
    }
}

impl io::Write for RingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.append(buf).map(|()| buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes read from a ring.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Chunk {
    /// Stream bytes `[next - bytes.len(), next)`.
    pub bytes: Vec<u8>,
    /// Where the next read continues.
    pub next: u64,
    /// Bytes between the offset asked for and the first one returned that
    /// the ring no longer holds (overwritten by newer output).
    pub skipped: u64,
}

impl Chunk {
    /// The stream offset of `bytes[0]`.
    pub fn start(&self) -> u64 {
        self.next - self.bytes.len() as u64
    }
}

/// A reader of a ring; any number may read while the writer writes.
#[derive(Debug)]
pub struct RingReader {
    file: File,
    id: u64,
}

impl RingReader {
    /// Opens the ring at `path` for reading.
    pub fn open(path: &Path) -> Result<Self, RingError> {
        let file = File::open(path).map_err(|source| RingError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::from_file(file)
    }

    /// A reader of the ring in an open file.
    pub fn from_file(file: File) -> Result<Self, RingError> {
        let h = stable_header(&file)?;
        check_len(&file, &h)?;
        Ok(Self { file, id: h.id })
    }

    /// The current header; the ring must still be the one opened.
    fn header(&self) -> Result<Header, RingError> {
        let h = stable_header(&self.file)?;
        if h.id != self.id {
            return Err(RingError::Recreated);
        }
        Ok(h)
    }

    /// Data bytes.
    pub fn capacity(&self) -> Result<u64, RingError> {
        Ok(self.header()?.capacity)
    }

    /// Stream bytes ever written.
    pub fn total(&self) -> Result<u64, RingError> {
        Ok(self.header()?.written)
    }

    /// Up to `max` stream bytes from `offset` on, of those the ring still
    /// holds: bytes that were overwritten are counted in `skipped` instead.
    /// An offset past the total is an error (the ring is not the one the
    /// offset came from, or it was never written that far).
    pub fn read_from(&self, offset: u64, max: usize) -> Result<Chunk, RingError> {
        self.read_from_with(offset, max, || {})
    }

    /// `read_from`, running `during_copy` between the copy and the second
    /// header read (tests write there to overwrite what is being copied).
    fn read_from_with(
        &self,
        offset: u64,
        max: usize,
        during_copy: impl FnOnce(),
    ) -> Result<Chunk, RingError> {
        let before = self.header()?;
        if offset > before.written {
            return Err(RingError::OffsetAhead {
                offset,
                total: before.written,
            });
        }
        // `start` is at or after `writing - capacity` (or at `written`
        // when a write longer than the ring is under way), `end` at or
        // before `written`: at most `capacity` (≤ MAX_CAPACITY) bytes.
        let start = offset.max(before.oldest_valid()).min(before.written);
        let end = before.written.min(start.saturating_add(max as u64));
        let mut bytes = vec![0u8; (end - start) as usize];
        read_stream(&self.file, &before, start, &mut bytes)?;
        during_copy();
        let after = self.header()?;
        if after.capacity != before.capacity {
            return Err(RingError::Recreated);
        }
        let valid = after.oldest_valid();
        if valid <= start {
            return Ok(Chunk {
                bytes,
                next: end,
                skipped: start - offset,
            });
        }
        // The writer overwrote the oldest part of what was copied.
        let lost = (valid - start).min(end - start);
        bytes.drain(..lost as usize);
        let next = if bytes.is_empty() {
            valid.min(after.written).max(start)
        } else {
            end
        };
        Ok(Chunk {
            skipped: next - bytes.len() as u64 - offset,
            bytes,
            next,
        })
    }

    /// The last `n` lines the ring holds (the oldest possibly cut by the
    /// wrap; an unfinished last line counts as a line), and where to
    /// continue from to follow the output.
    pub fn tail_lines(&self, n: usize) -> Result<Chunk, RingError> {
        let all = self.read_from(0, usize::MAX)?;
        let body = all.bytes.strip_suffix(b"\n").unwrap_or(&all.bytes);
        let from = if n == 0 {
            all.bytes.len()
        } else {
            body.iter()
                .enumerate()
                .rev()
                .filter(|(_, b)| **b == b'\n')
                .nth(n - 1)
                .map_or(0, |(i, _)| i + 1)
        };
        Ok(Chunk {
            bytes: all.bytes[from..].to_vec(),
            next: all.next,
            skipped: 0,
        })
    }
}

#[cfg(test)]
mod tests;
