//! virtio-blk on a raw file: read, write, flush (fdatasync before the request
//! completes), discard, get-id, read-only.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{Interrupt, VirtioDevice, VirtioError, TYPE_BLOCK};

const SECTOR_SHIFT: u64 = 9;
const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
const QUEUE_SIZE: u16 = 256;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const ID_BYTES: usize = 20;
const SEG_MAX: u32 = 126;
const MAX_DISCARD_SECTORS: u32 = u32::MAX >> SECTOR_SHIFT;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk {id}: cannot open {path}: {source}")]
    Open {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {id}: cannot get the size of {path}: {source}")]
    Size {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Byte and operation counters of one disk.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub read_ops: AtomicU64,
    pub write_ops: AtomicU64,
    pub flush_ops: AtomicU64,
    pub discard_ops: AtomicU64,
    pub errors: AtomicU64,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
}

pub struct Block {
    file: File,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    active: Option<Active>,
    pub counters: Arc<BlockCounters>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("sectors", &self.sectors)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Request {
    kind: u32,
    sector: u64,
    /// (guest address, length, device-writable) of the data descriptors.
    data: Vec<(GuestAddress, u32, bool)>,
    status: GuestAddress,
}

impl Block {
    /// Opens `path` (or takes the inherited `fd`) as the backing file.
    pub fn open(
        id: &str,
        path: &Path,
        fd: Option<i32>,
        read_only: bool,
        serial: Option<&str>,
    ) -> Result<Self, BlockError> {
        let file = match fd {
            // SAFETY: the parent passed this descriptor to us for this disk;
            // we become its only owner.
            Some(fd) => unsafe { File::from_raw_fd(fd) },
            None => OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(path)
                .map_err(|source| BlockError::Open {
                    id: id.into(),
                    path: path.to_owned(),
                    source,
                })?,
        };
        let size = file_size(&file).map_err(|source| BlockError::Size {
            id: id.into(),
            path: path.to_owned(),
            source,
        })?;
        let mut idb = [0u8; ID_BYTES];
        let serial = serial.unwrap_or(id).as_bytes();
        let n = serial.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&serial[..n]);
        Ok(Self {
            file,
            sectors: size >> SECTOR_SHIFT,
            read_only,
            id: idb,
            active: None,
            counters: Arc::new(BlockCounters::default()),
        })
    }

    fn block_config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c
    }

    fn parse(
        mem: &GuestMemoryMmap,
        chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    ) -> Option<Request> {
        let descs: Vec<_> = chain.collect();
        let (head, rest) = descs.split_first()?;
        let (status, data) = rest.split_last()?;
        if head.is_write_only() || head.len() < 16 || !status.is_write_only() || status.len() < 1 {
            return None;
        }
        let kind: u32 = mem.read_obj(head.addr()).ok()?;
        let sector: u64 = mem.read_obj(head.addr().checked_add(8)?).ok()?;
        Some(Request {
            kind,
            sector,
            data: data
                .iter()
                .map(|d| (d.addr(), d.len(), d.is_write_only()))
                .collect(),
            status: status.addr(),
        })
    }

    /// Executes one request; returns (status, bytes written into guest buffers).
    fn execute(&self, mem: &GuestMemoryMmap, req: &Request) -> (u8, u32) {
        let c = &self.counters;
        let total: u64 = req.data.iter().map(|d| u64::from(d.1)).sum();
        let in_range = |len: u64| {
            req.sector
                .checked_add(len.div_ceil(SECTOR_SIZE))
                .is_some_and(|end| end <= self.sectors)
        };
        match req.kind {
            T_IN => {
                if !in_range(total) || req.data.iter().any(|d| !d.2) {
                    return (S_IOERR, 0);
                }
                let mut off = req.sector << SECTOR_SHIFT;
                for &(addr, len, _) in &req.data {
                    if self.transfer(mem, addr, len, off, true).is_err() {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        return (S_IOERR, 0);
                    }
                    off += u64::from(len);
                }
                c.read_ops.fetch_add(1, Ordering::Relaxed);
                c.read_bytes.fetch_add(total, Ordering::Relaxed);
                (S_OK, total as u32)
            }
            T_OUT => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                if !in_range(total) || req.data.iter().any(|d| d.2) {
                    return (S_IOERR, 0);
                }
                let mut off = req.sector << SECTOR_SHIFT;
                for &(addr, len, _) in &req.data {
                    if self.transfer(mem, addr, len, off, false).is_err() {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        return (S_IOERR, 0);
                    }
                    off += u64::from(len);
                }
                c.write_ops.fetch_add(1, Ordering::Relaxed);
                c.write_bytes.fetch_add(total, Ordering::Relaxed);
                (S_OK, 0)
            }
            T_FLUSH => {
                c.flush_ops.fetch_add(1, Ordering::Relaxed);
                // The flushed data must be on stable storage before the guest
                // sees the request complete.
                if let Ok(()) = self.file.sync_data() {
                    (S_OK, 0)
                } else {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    (S_IOERR, 0)
                }
            }
            T_GET_ID => match req.data.first() {
                Some(&(addr, len, true)) => {
                    let n = (len as usize).min(ID_BYTES);
                    match mem.write_slice(&self.id[..n], addr) {
                        Ok(()) => (S_OK, n as u32),
                        Err(_) => (S_IOERR, 0),
                    }
                }
                _ => (S_IOERR, 0),
            },
            T_DISCARD => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                c.discard_ops.fetch_add(1, Ordering::Relaxed);
                for &(addr, len, _) in &req.data {
                    if self.discard(mem, addr, len).is_err() {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        return (S_IOERR, 0);
                    }
                }
                (S_OK, 0)
            }
            _ => (S_UNSUPP, 0),
        }
    }

    /// Moves `len` bytes between guest memory at `addr` and the file at `off`.
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u32,
        off: u64,
        to_guest: bool,
    ) -> std::io::Result<()> {
        let slice = mem
            .get_slice(addr, len as usize)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let guard = slice.ptr_guard_mut();
        let ptr = guard.as_ptr();
        let mut done = 0usize;
        while done < len as usize {
            let remaining = len as usize - done;
            let at = (off + done as u64) as libc::off_t;
            // SAFETY: `ptr..ptr+len` is a valid mapping of guest memory
            // returned by get_slice, and the guard keeps it alive; the guest
            // may race on the bytes, which is harmless for plain data copies.
            let n = unsafe {
                if to_guest {
                    libc::pread(self.file.as_raw_fd(), ptr.add(done).cast(), remaining, at)
                } else {
                    libc::pwrite(self.file.as_raw_fd(), ptr.add(done).cast(), remaining, at)
                }
            };
            match n {
                n if n > 0 => done += n as usize,
                0 if to_guest => {
                    // Past the end of a sparse file: zeroes.
                    slice
                        .subslice(done, remaining)
                        .map_err(|e| std::io::Error::other(e.to_string()))?
                        .write_slice(&vec![0; remaining], 0)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    done = len as usize;
                }
                0 => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn discard(&self, mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> std::io::Result<()> {
        // Segments: sector u64, num_sectors u32, flags u32.
        for i in 0..u64::from(len) / 16 {
            let at = addr.unchecked_add(i * 16);
            let sector: u64 = mem
                .read_obj(at)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let count: u32 = mem
                .read_obj(at.unchecked_add(8))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            if sector.saturating_add(u64::from(count)) > self.sectors {
                return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
            }
            // SAFETY: fallocate on our own open file descriptor; no memory involved.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (sector << SECTOR_SHIFT) as libc::off_t,
                    (u64::from(count) << SECTOR_SHIFT) as libc::off_t,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

fn file_size(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // Block devices report 0 in metadata; seek to the end instead.
    let mut f = file;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.read_only {
            f |= F_RO;
        } else {
            f |= F_DISCARD;
        }
        f
    }

    fn config_space(&self) -> Vec<u8> {
        self.block_config().to_vec()
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Interrupt,
        _acked_features: u64,
    ) -> Result<(), VirtioError> {
        let queue = queues.pop().ok_or(VirtioError::BadQueue(0))?;
        if !queue.ready() {
            return Err(VirtioError::BadQueue(0));
        }
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, _index: usize) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let (status, len) = match Self::parse(&active.mem, chain) {
                Some(req) => {
                    let (s, n) = self.execute(&active.mem, &req);
                    // A failed status write means the guest gave us a bad buffer;
                    // there is nothing more we can report.
                    let _ = active.mem.write_obj(s, req.status);
                    (s, n + 1)
                }
                None => (S_IOERR, 0),
            };
            let _ = status;
            if active.queue.add_used(&active.mem, head, len).is_err() {
                break;
            }
            used_any = true;
        }
        if used_any && active.queue.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.signal_used();
        }
        self.active = Some(active);
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("read_bytes", c.read_bytes.load(Ordering::Relaxed)),
            ("write_bytes", c.write_bytes.load(Ordering::Relaxed)),
            ("read_ops", c.read_ops.load(Ordering::Relaxed)),
            ("write_ops", c.write_ops.load(Ordering::Relaxed)),
            ("flush_ops", c.flush_ops.load(Ordering::Relaxed)),
            ("discard_ops", c.discard_ops.load(Ordering::Relaxed)),
            ("errors", c.errors.load(Ordering::Relaxed)),
        ]
    }
}
