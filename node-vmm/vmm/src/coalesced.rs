//! KVM's coalesced I/O: guest writes to a registered port range are queued
//! by the kernel in a page shared with us (the "ring") instead of each one
//! stopping the vCPU and returning to userspace. We use it for the serial
//! port's transmit register: on software KVM an exit costs ~45 µs, and a
//! guest writing its console paid one per byte.
//!
//! The kernel is the only producer; we are the consumer. Queued writes
//! take effect when someone drains the ring, so every path that could see
//! the device's state drains first: a vCPU on every exit, the event loop
//! on a short timer, and the machine once more on its way out. When the
//! ring is full the kernel stops queueing and the write exits as usual,
//! after the queued ones are drained: order is kept.
//!
//! Everything read from the shared page is bounded before use: the ring's
//! indices against its slot count, an entry's length against its data.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{IoEventAddress, VmFd};

#[derive(Debug, thiserror::Error)]
pub enum CoalescedError {
    #[error("cannot map KVM's coalesced I/O ring: {0}")]
    Map(std::io::Error),
    #[error(
        "KVM's coalesced I/O ring is inconsistent (first {first}, last {last}, {slots} slots)"
    )]
    Indices { first: u32, last: u32, slots: u32 },
    #[error("cannot {verb} coalesced writes to port {port:#x}: {source}")]
    Zone {
        verb: &'static str,
        port: u16,
        source: kvm_ioctls::Error,
    },
}

/// One queued guest write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedWrite {
    /// The port (or guest-physical address, for MMIO zones).
    pub addr: u64,
    pub pio: bool,
    len: u8,
    data: [u8; 8],
}

impl QueuedWrite {
    #[cfg(test)]
    pub fn for_test(addr: u64, bytes: &[u8]) -> Self {
        let mut data = [0u8; 8];
        data[..bytes.len()].copy_from_slice(bytes);
        Self {
            addr,
            pio: true,
            len: bytes.len() as u8,
            data,
        }
    }

    /// The bytes written (1, 2, 4 or 8 of them).
    pub fn data(&self) -> &[u8] {
        &self.data[..usize::from(self.len)]
    }
}

/// Where the ring's page lives.
#[derive(Debug)]
enum Backing {
    /// `mmap`ed from a vCPU fd: unmapped on drop.
    Mapped,
    /// Memory the caller owns (tests).
    #[cfg(test)]
    Borrowed,
}

/// The consumer end of KVM's coalesced I/O ring.
#[derive(Debug)]
pub struct Ring {
    page: NonNull<kvm_coalesced_mmio_ring>,
    page_size: usize,
    slots: u32,
    backing: Backing,
}

// SAFETY: the ring is a page of shared memory whose indices are accessed
// atomically; the one consumer is serialized by whoever holds the `Ring`
// (`&mut self` to pop), and the kernel producer synchronizes through the
// same atomics.
unsafe impl Send for Ring {}
// SAFETY: as above; shared references only read the page size.
unsafe impl Sync for Ring {}

/// How many entries fit in a ring page (`KVM_COALESCED_MMIO_MAX`).
pub fn slots_in(page_size: usize) -> u32 {
    let header = std::mem::size_of::<kvm_coalesced_mmio_ring>();
    let entry = std::mem::size_of::<kvm_coalesced_mmio>();
    u32::try_from(page_size.saturating_sub(header) / entry).unwrap_or(u32::MAX)
}

fn page_size() -> usize {
    // SAFETY: sysconf with a constant name has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096)
}

impl Ring {
    /// Maps the VM's ring through one of its vCPU fds (any one: the page
    /// is the VM's).
    pub fn map(vcpu: &impl std::os::fd::AsRawFd) -> Result<Self, CoalescedError> {
        let page_size = page_size();
        let offset = i64::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * page_size as i64;
        // SAFETY: a fresh shared mapping of one page of a vCPU fd at the
        // offset KVM documents for the ring; no existing memory is touched,
        // and the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(CoalescedError::Map(std::io::Error::last_os_error()));
        }
        let page = NonNull::new(p.cast::<kvm_coalesced_mmio_ring>())
            .ok_or_else(|| CoalescedError::Map(std::io::Error::other("mmap returned null")))?;
        Ok(Self {
            page,
            page_size,
            slots: slots_in(page_size),
            backing: Backing::Mapped,
        })
    }

    /// A ring over memory the caller owns and keeps alive, page-aligned.
    ///
    /// # Safety
    /// `page` must point to `page_size` bytes, aligned to 8, valid for as
    /// long as the ring.
    #[cfg(test)]
    unsafe fn borrowed(page: NonNull<kvm_coalesced_mmio_ring>, page_size: usize) -> Self {
        Self {
            page,
            page_size,
            slots: slots_in(page_size),
            backing: Backing::Borrowed,
        }
    }

    fn first(&self) -> &AtomicU32 {
        // SAFETY: the ring header's `first` index, in a page that is
        // mapped and lives as long as `self`; a u32 and an AtomicU32 have
        // the same layout, and the kernel reads it atomically too.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.page.as_ptr()).first)) }
    }

    fn last(&self) -> &AtomicU32 {
        // SAFETY: as for `first`, the header's `last` index, which the
        // kernel moves after it has written an entry.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.page.as_ptr()).last)) }
    }

    /// Takes the oldest queued write, if any.
    pub fn pop(&mut self) -> Result<Option<QueuedWrite>, CoalescedError> {
        let first = self.first().load(Ordering::Relaxed);
        let last = self.last().load(Ordering::Acquire);
        if first >= self.slots || last >= self.slots {
            return Err(CoalescedError::Indices {
                first,
                last,
                slots: self.slots,
            });
        }
        if first == last {
            return Ok(None);
        }
        // SAFETY: `first < slots`, and `slots` entries fit in the page
        // after the header, so the entry is inside the mapping; the kernel
        // finished writing it before it moved `last` past it (the Acquire
        // load above).
        let entry = unsafe {
            let entries = std::ptr::addr_of!((*self.page.as_ptr()).coalesced_mmio)
                .cast::<kvm_coalesced_mmio>();
            std::ptr::read_volatile(entries.add(first as usize))
        };
        self.first()
            .store((first + 1) % self.slots, Ordering::Release);
        let len = entry.len.min(8) as u8;
        Ok(Some(QueuedWrite {
            addr: entry.phys_addr,
            // SAFETY: both members of the union are a u32.
            pio: unsafe { entry.__bindgen_anon_1.pio } != 0,
            len,
            data: entry.data,
        }))
    }

    /// Takes every queued write, oldest first, into `out`.
    pub fn drain_into(&mut self, out: &mut Vec<QueuedWrite>) -> Result<(), CoalescedError> {
        // At most one ring's worth: the producer cannot outrun a bounded loop.
        for _ in 0..self.slots {
            match self.pop()? {
                Some(w) => out.push(w),
                None => break,
            }
        }
        Ok(())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        match self.backing {
            // SAFETY: unmaps the page this ring mapped, once.
            Backing::Mapped => unsafe {
                libc::munmap(self.page.as_ptr().cast(), self.page_size);
            },
            #[cfg(test)]
            Backing::Borrowed => {}
        }
    }
}

/// Whether writes to one port are coalesced, switched on and off as the
/// device needs: a device whose guest waits for an interrupt caused by
/// the write must see that write at once.
#[derive(Debug)]
pub struct Zone {
    vm: Arc<VmFd>,
    port: u16,
    on: bool,
}

impl Zone {
    /// Starts coalescing single-byte writes to `port`.
    pub fn register(vm: Arc<VmFd>, port: u16) -> Result<Self, CoalescedError> {
        let mut z = Self {
            vm,
            port,
            on: false,
        };
        z.set(true)?;
        Ok(z)
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    pub fn set(&mut self, on: bool) -> Result<(), CoalescedError> {
        if on == self.on {
            return Ok(());
        }
        let addr = IoEventAddress::Pio(u64::from(self.port));
        let (verb, r) = if on {
            ("register", self.vm.register_coalesced_mmio(addr, 1))
        } else {
            ("unregister", self.vm.unregister_coalesced_mmio(addr, 1))
        };
        r.map_err(|source| CoalescedError::Zone {
            verb,
            port: self.port,
            source,
        })?;
        self.on = on;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    /// A ring page we produce into, standing in for the kernel.
    struct FakeKernel {
        page: Box<[u64; PAGE / 8]>,
    }

    impl FakeKernel {
        fn new() -> Self {
            Self {
                page: Box::new([0; PAGE / 8]),
            }
        }

        fn ring(&mut self) -> Ring {
            let p = NonNull::new(self.page.as_mut_ptr().cast::<kvm_coalesced_mmio_ring>()).unwrap();
            // SAFETY: the boxed page outlives the ring in every test.
            unsafe { Ring::borrowed(p, PAGE) }
        }

        fn indices(&self) -> (u32, u32) {
            let w = self.page[0];
            (w as u32, (w >> 32) as u32)
        }

        fn set_indices(&mut self, first: u32, last: u32) {
            self.page[0] = u64::from(first) | (u64::from(last) << 32);
        }

        /// Queues a write the way KVM does: entry at `last`, then `last`+1.
        fn push(&mut self, port: u64, data: &[u8]) -> bool {
            let (first, last) = self.indices();
            let slots = slots_in(PAGE);
            if (last + 1) % slots == first {
                return false;
            }
            let at = 1 + last as usize * 3; // header 8 bytes, entry 24
            self.page[at] = port;
            self.page[at + 1] = data.len() as u64 | (1 << 32);
            let mut d = [0u8; 8];
            d[..data.len()].copy_from_slice(data);
            self.page[at + 2] = u64::from_le_bytes(d);
            self.set_indices(first, (last + 1) % slots);
            true
        }
    }

    /// Guest writes to port 0x3f8 on a real VM, with the zone on and off.
    mod on_kvm {
        use kvm_ioctls::VcpuExit;

        use super::super::*;
        use crate::test_vm::TestVm;

        /// `mov dx, 0x3f8; mov al, 'a'; out dx, al; mov al, 'b'; out dx, al;
        /// mov al, 1; out 0x99, al; jmp $`
        const CODE: &[u8] = &[
            0x66, 0xba, 0xf8, 0x03, 0xb0, b'a', 0xee, 0xb0, b'b', 0xee, 0xb0, 0x01, 0xe6, 0x99,
            0xeb, 0xfe,
        ];

        /// The first exit's port and bytes, and what the ring held then.
        fn first_exit(coalesce: bool) -> ((u16, Vec<u8>), Vec<QueuedWrite>) {
            let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
            assert!(kvm.check_extension(kvm_ioctls::Cap::CoalescedPio));
            let t = TestVm::new();
            let vm = t.vm.clone();
            let mut vcpu = t.vcpu(0, CODE);
            let mut ring = Ring::map(&vcpu).unwrap();
            let mut zone = Zone::register(vm.clone(), 0x3f8).unwrap();
            zone.set(coalesce).unwrap();
            assert_eq!(zone.is_on(), coalesce);
            let exit = match vcpu.run().unwrap() {
                VcpuExit::IoOut(port, data) => (port, data.to_vec()),
                other => panic!("unexpected exit {other:?}"),
            };
            let mut queued = Vec::new();
            ring.drain_into(&mut queued).unwrap();
            (exit, queued)
        }

        #[test]
        fn coalesced_writes_wait_in_the_ring_in_order() {
            let (exit, queued) = first_exit(true);
            assert_eq!(exit, (0x99, vec![1]), "the first write that exits");
            let bytes: Vec<&[u8]> = queued.iter().map(QueuedWrite::data).collect();
            assert_eq!(bytes, [b"a", b"b"]);
            assert!(queued.iter().all(|w| w.pio && w.addr == 0x3f8));
        }

        #[test]
        fn with_the_zone_off_each_write_exits() {
            let (exit, queued) = first_exit(false);
            assert_eq!(exit, (0x3f8, vec![b'a']));
            assert!(queued.is_empty());
        }
    }

    #[test]
    fn a_page_holds_what_kvm_says() {
        // KVM_COALESCED_MMIO_MAX on 4 KiB pages: (4096 - 8) / 24.
        assert_eq!(slots_in(4096), 170);
        assert_eq!(std::mem::size_of::<kvm_coalesced_mmio>(), 24);
    }

    #[test]
    fn writes_come_out_in_order_and_the_ring_wraps() {
        let mut k = FakeKernel::new();
        let slots = slots_in(PAGE);
        // Start near the end so the queue wraps around.
        k.set_indices(slots - 2, slots - 2);
        let mut ring = k.ring();
        let mut out = Vec::new();
        for round in 0..3u8 {
            for b in 0..5u8 {
                assert!(k.push(0x3f8, &[round * 10 + b]));
            }
            ring.drain_into(&mut out).unwrap();
        }
        let bytes: Vec<u8> = out.iter().flat_map(|w| w.data().to_vec()).collect();
        assert_eq!(
            bytes,
            [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 20, 21, 22, 23, 24]
        );
        assert!(out.iter().all(|w| w.pio && w.addr == 0x3f8));
        assert_eq!(ring.pop().unwrap(), None);
        let (first, last) = k.indices();
        assert_eq!(first, last);
    }

    #[test]
    fn a_full_ring_is_drained_whole() {
        let mut k = FakeKernel::new();
        let mut ring = k.ring();
        let mut n = 0u32;
        while k.push(0x3f8, &[n as u8]) {
            n += 1;
        }
        assert_eq!(n, slots_in(PAGE) - 1, "one slot stays free, as in KVM");
        let mut out = Vec::new();
        ring.drain_into(&mut out).unwrap();
        assert_eq!(out.len() as u32, n);
        assert!(k.push(0x3f8, b"x"), "room again");
    }

    #[test]
    fn lengths_and_indices_from_the_page_are_bounded() {
        let mut k = FakeKernel::new();
        let mut ring = k.ring();
        assert!(k.push(0x3f8, b"ab"));
        k.page[2] = 4096 | (1 << 32); // a length no entry can hold
        let w = ring.pop().unwrap().unwrap();
        assert_eq!(w.data().len(), 8);
        k.set_indices(0, 5000);
        assert!(matches!(ring.pop(), Err(CoalescedError::Indices { .. })));
        k.set_indices(9999, 0);
        assert!(matches!(ring.pop(), Err(CoalescedError::Indices { .. })));
    }
}
