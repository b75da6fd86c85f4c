//! The driver's side of a virtqueue for device unit tests, on the
//! `virtio-queue` mock: guest memory, descriptors placed by hand (so tests can
//! build every malformed chain a hostile guest can), the used ring read back.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::Interrupt;

/// Guest RAM of the tests: 16 MiB from 0. Rings live in the first MiB,
/// buffers from `BUF`, indirect tables from `TABLES`.
pub const MEM_SIZE: u64 = 16 << 20;
pub const BUF: u64 = 0x10_0000;
pub const TABLES: u64 = 0x80_0000;

pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

pub fn interrupt() -> Interrupt {
    Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
}

pub fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// One virtqueue as the driver sees it.
///
/// The mock lays its used ring over the tail of the available ring (its
/// `SplitQueueRing::end` counts elements as bytes), so the device is given a
/// used ring of our own, `USED_OFFSET` past the queue's base.
pub struct Driver<'a> {
    pub vq: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    size: u16,
    used_ring: u64,
    posted: u16,
}

const USED_OFFSET: u64 = 0x2000;

impl<'a> Driver<'a> {
    /// A queue of `size` entries whose rings start at `base`.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        assert!(base % 0x1000 == 0 && size <= 256);
        let used_ring = base + USED_OFFSET;
        mem.write_slice(&[0u8; 4 + 8 * 256 + 2], GuestAddress(used_ring))
            .unwrap();
        Self {
            vq: MockSplitQueue::create(mem, GuestAddress(base), size),
            mem,
            size,
            used_ring,
            posted: 0,
        }
    }

    /// The device's view of the queue, ready.
    pub fn queue(&self) -> Queue {
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.set_used_ring_address(
            Some(self.used_ring as u32),
            Some((self.used_ring >> 32) as u32),
        );
        q
    }

    /// Stores descriptor `index` as is: any address, length, flags, next.
    pub fn set(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.vq
            .desc_table()
            .store(index, raw(addr, len, flags, next))
            .unwrap();
    }

    /// Stores `descs` (address, length, flags) at indices `first..`, each
    /// linked to the following one, and makes the chain available.
    pub fn chain(&mut self, first: u16, descs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = first + i as u16;
            let last = i + 1 == descs.len();
            let flags = if last { flags & !NEXT } else { flags | NEXT };
            self.set(index, addr, len, flags, index + 1);
        }
        self.make_available(first);
    }

    /// Puts `head` on the available ring.
    pub fn make_available(&mut self, head: u16) {
        let size = self.size;
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(self.posted % size))
            .unwrap()
            .store(head);
        self.posted = self.posted.wrapping_add(1);
        self.vq.avail().idx().store(self.posted);
    }

    /// Writes an indirect table of `descs` (address, length, flags, next) at
    /// `at` in guest memory.
    pub fn write_table(&self, at: u64, descs: &[(u64, u32, u16, u16)]) {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            self.mem
                .write_obj(
                    raw(addr, len, flags, next),
                    GuestAddress(at + 16 * i as u64),
                )
                .unwrap();
        }
    }

    /// The used ring: (head, length) of every completed chain so far.
    pub fn used(&self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used_ring + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = GuestAddress(self.used_ring + 4 + 8 * u64::from(i % self.size));
                let id: u32 = self.mem.read_obj(at).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at.0 + 4)).unwrap();
                (id, len)
            })
            .collect()
    }
}
