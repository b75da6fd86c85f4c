//! virtio-blk on a raw or qcow2 image (`backend`): read, write, flush (data
//! and metadata durable before the request completes), discard,
//! write-zeroes, get-id, read-only.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk as vb;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::log_limit::LogLimiter;
use super::{Interrupt, VirtioDevice, VirtioError, TYPE_BLOCK};
use crate::config::{take_handed, DiskConfig};
use backend::{Backend, BackendError};

pub mod backend;
pub mod request;
#[cfg(test)]
pub(super) mod tests;

use request::{
    Disk, Kind, Request, SectorRange, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, SECTOR_SHIFT, SECTOR_SIZE, SEG_MAX, S_IOERR,
    S_OK,
};

const QUEUE_SIZE: u16 = 256;

const F_SEG_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
const F_RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
const F_BLK_SIZE: u64 = 1 << vb::VIRTIO_BLK_F_BLK_SIZE;
const F_FLUSH: u64 = 1 << vb::VIRTIO_BLK_F_FLUSH;
const F_DISCARD: u64 = 1 << vb::VIRTIO_BLK_F_DISCARD;
const F_WRITE_ZEROES: u64 = 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;

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
    #[error(transparent)]
    Backend(#[from] BackendError),
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
    pub write_zeroes_ops: AtomicU64,
    pub errors: AtomicU64,
    /// Chains that were not a valid request (answered `IOERR`, or returned
    /// unanswered when they had no status byte).
    pub malformed: AtomicU64,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
}

pub struct Block {
    backend: Backend,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    active: Option<Active>,
    pub counters: Arc<BlockCounters>,
    log: LogLimiter,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("format", &self.backend)
            .field("sectors", &self.sectors)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// Opens the disk's image: its `fd` (taken over) or else its `path`,
    /// read-only when the disk is, plus its handed-over backing chain.
    ///
    /// # Safety contract
    /// `VmConfig::validate` checked that `disk.fd` and `disk.backing_fds` are
    /// descriptors above stderr; each is taken over exactly once, here.
    pub fn open(disk: &DiskConfig) -> Result<Self, BlockError> {
        let id = disk.id.as_str();
        let path = &disk.path;
        let file = match disk.fd {
            // SAFETY: the parent passed this descriptor to us for this disk;
            // we become its only owner.
            Some(fd) => unsafe { take_handed(fd) },
            None => OpenOptions::new()
                .read(true)
                .write(!disk.read_only)
                .open(path)
                .map_err(|source| BlockError::Open {
                    id: id.into(),
                    path: path.clone(),
                    source,
                })?,
        };
        let backing: Vec<File> = disk
            .backing_fds
            .iter()
            // SAFETY: as above, one backing file each, handed over for this disk.
            .map(|&fd| unsafe { take_handed(fd) })
            .collect();
        let backend = Backend::open(id, file, backing, disk.read_only, disk.format)?;
        let size = backend.size().map_err(|source| BlockError::Size {
            id: id.into(),
            path: path.clone(),
            source,
        })?;
        let serial = disk.serial.as_deref();
        let mut idb = [0u8; ID_BYTES];
        let serial = serial.unwrap_or(id).as_bytes();
        let n = serial.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&serial[..n]);
        Ok(Self {
            backend,
            sectors: size >> SECTOR_SHIFT,
            read_only: disk.read_only,
            id: idb,
            active: None,
            counters: Arc::new(BlockCounters::default()),
            log: LogLimiter::default(),
        })
    }

    /// `struct virtio_blk_config` up to `unused1` (virtio 1.2 section
    /// 5.2.4); the offsets are checked against `virtio_bindings` in the tests.
    fn block_config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_WRITE_ZEROES_SEG.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap: with FLAG_UNMAP, holes are punched
        c
    }

    fn disk(&self) -> Disk {
        Disk {
            sectors: self.sectors,
            read_only: self.read_only,
        }
    }

    /// Executes one checked request; returns (status, bytes written into
    /// guest buffers).
    fn execute(&mut self, mem: &GuestMemoryMmap, req: &Request) -> (u8, u32) {
        let c = &self.counters;
        match &req.kind {
            &Kind::In { offset, len } | &Kind::Out { offset, len } => {
                let to_guest = matches!(req.kind, Kind::In { .. });
                let mut off = offset;
                for seg in &req.data {
                    if self
                        .backend
                        .transfer(mem, seg.addr, seg.len, off, to_guest)
                        .is_err()
                    {
                        c.errors.fetch_add(1, Ordering::Relaxed);
                        return (S_IOERR, 0);
                    }
                    off += u64::from(seg.len);
                }
                if to_guest {
                    c.read_ops.fetch_add(1, Ordering::Relaxed);
                    c.read_bytes.fetch_add(len, Ordering::Relaxed);
                    // The data fits in one chain, below 2^32 bytes.
                    (S_OK, u32::try_from(len).unwrap_or(u32::MAX))
                } else {
                    c.write_ops.fetch_add(1, Ordering::Relaxed);
                    c.write_bytes.fetch_add(len, Ordering::Relaxed);
                    (S_OK, 0)
                }
            }
            Kind::Flush => {
                c.flush_ops.fetch_add(1, Ordering::Relaxed);
                // The flushed data must be on stable storage before the guest
                // sees the request complete.
                if let Ok(()) = self.backend.flush() {
                    (S_OK, 0)
                } else {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    (S_IOERR, 0)
                }
            }
            Kind::GetId(buf) => {
                let n = (buf.len as usize).min(ID_BYTES);
                match mem.write_slice(&self.id[..n], buf.addr) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            Kind::Discard(ranges) => {
                c.discard_ops.fetch_add(1, Ordering::Relaxed);
                self.zero_ranges(ranges, |b, off, len, _| b.discard(off, len))
            }
            Kind::WriteZeroes(ranges) => {
                c.write_zeroes_ops.fetch_add(1, Ordering::Relaxed);
                self.zero_ranges(ranges, Backend::write_zeroes)
            }
        }
    }

    /// Runs `op` (byte offset, byte length, unmap) over checked ranges.
    fn zero_ranges(
        &mut self,
        ranges: &[SectorRange],
        op: impl Fn(&mut Backend, u64, u64, bool) -> std::io::Result<()>,
    ) -> (u8, u32) {
        for r in ranges {
            let (off, len) = (
                r.sector << SECTOR_SHIFT,
                u64::from(r.sectors) << SECTOR_SHIFT,
            );
            if op(&mut self.backend, off, len, r.unmap).is_err() {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                return (S_IOERR, 0);
            }
        }
        (S_OK, 0)
    }
}

impl Block {
    /// Parses and executes one chain; returns the used length: the bytes
    /// written into guest buffers, status byte included.
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    ) -> u32 {
        let parsed = match request::parse(mem, chain, self.disk()) {
            Ok(p) => p,
            Err(e) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                self.log
                    .warn(format_args!("virtio-blk: chain returned unanswered: {e}"));
                return 0;
            }
        };
        let (status, len) = match &parsed.request {
            Ok(req) => self.execute(mem, req),
            Err(e) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                self.log
                    .warn(format_args!("virtio-blk: request refused: {e}"));
                (e.status(), 0)
            }
        };
        // A failed status write means the guest gave us a bad buffer; there
        // is nothing more we can report.
        match mem.write_obj(status, parsed.status) {
            Ok(()) => len.saturating_add(1),
            Err(_) => len,
        }
    }
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
            f |= F_DISCARD | F_WRITE_ZEROES;
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
            let len = self.serve(&active.mem, chain);
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

    fn shutdown(&mut self) {
        if let Err(e) = self.backend.write_back() {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            self.log.warn(format_args!(
                "virtio-blk: cannot write back cached metadata: {e}"
            ));
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("malformed", c.malformed.load(Ordering::Relaxed)),
            ("read_bytes", c.read_bytes.load(Ordering::Relaxed)),
            ("write_bytes", c.write_bytes.load(Ordering::Relaxed)),
            ("read_ops", c.read_ops.load(Ordering::Relaxed)),
            ("write_ops", c.write_ops.load(Ordering::Relaxed)),
            ("flush_ops", c.flush_ops.load(Ordering::Relaxed)),
            ("discard_ops", c.discard_ops.load(Ordering::Relaxed)),
            (
                "write_zeroes_ops",
                c.write_zeroes_ops.load(Ordering::Relaxed),
            ),
            ("errors", c.errors.load(Ordering::Relaxed)),
        ]
    }
}
