//! virtio-blk against malformed chains, through the virtqueue mock: every
//! chain is completed, bad ones get `IOERR` (`UNSUPP` for unknown types and
//! flags) when they have a status byte, nothing panics, and the disk never
//! changes size or takes a bad write. Write-zeroes zeroes exactly its range.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::{
    FLAG_UNMAP, MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, SEG_MAX, S_IOERR, S_OK, S_UNSUPP,
};
use super::Block;
use crate::devices::virtio::test_util::{
    guest_memory, interrupt, Driver, BUF, INDIRECT, MEM_SIZE, TABLES, WRITE,
};
use crate::devices::virtio::VirtioDevice;

pub const SECTORS: u64 = 64;
const HDR: u64 = BUF;
const STATUS: u64 = BUF + 0x100;
const DATA: u64 = BUF + 0x1000;

/// A memfd disk of `SECTORS` sectors whose bytes are their offset's low byte.
pub fn memfd_disk(read_only: bool) -> (Block, File) {
    // SAFETY: memfd_create with a NUL-terminated name; we own the new fd.
    let fd = unsafe { libc::memfd_create(c"kubevmm-test-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is ours and open.
    let file = unsafe { File::from_raw_fd(fd) };
    let bytes: Vec<u8> = (0..SECTORS * 512).map(|i| i as u8).collect();
    file.write_all_at(&bytes, 0).unwrap();
    let check = file.try_clone().unwrap();
    let blk = Block::open(&crate::config::DiskConfig {
        id: "t".into(),
        path: "/memfd".into(),
        read_only,
        serial: Some("SERIAL-1".into()),
        fd: Some(file.as_raw_fd()),
        backing_fds: Vec::new(),
        format: None,
    })
    .unwrap();
    // The device owns `fd` now.
    std::mem::forget(file);
    (blk, check)
}

/// The driver of `blk`'s queue (16 entries at 0), the device activated on it.
pub fn driver<'a>(mem: &'a GuestMemoryMmap, blk: &mut Block) -> Driver<'a> {
    let d = Driver::new(mem, 0, 16);
    blk.activate(mem.clone(), vec![d.queue()], interrupt(), 0)
        .unwrap();
    d
}

pub struct Fixture {
    pub mem: GuestMemoryMmap,
    pub blk: Block,
    pub file: File,
}

impl Fixture {
    pub fn new(read_only: bool) -> Self {
        let (blk, file) = memfd_disk(read_only);
        Self {
            mem: guest_memory(),
            blk,
            file,
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn disk_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.file.metadata().unwrap().len() as usize];
        self.file.read_exact_at(&mut v, 0).unwrap();
        v
    }
}

fn original() -> Vec<u8> {
    (0..SECTORS * 512).map(|i| i as u8).collect()
}

/// Posts header, data, status as one chain and runs the device.
fn request(
    kind: u32,
    sector: u64,
    data: &[(u64, u32, u16)],
    ro: bool,
) -> (Fixture, Vec<(u32, u32)>) {
    let mut fx = Fixture::new(ro);
    fx.header(kind, sector);
    let mut chain = vec![(HDR, 16, 0)];
    chain.extend_from_slice(data);
    chain.push((STATUS, 1, WRITE));
    let used = {
        let mut d = driver(&fx.mem, &mut fx.blk);
        d.chain(0, &chain);
        fx.blk.process_queue(0);
        d.used()
    };
    (fx, used)
}

#[test]
fn a_valid_read_and_write() {
    let (fx, used) = request(0, 2, &[(DATA, 1024, WRITE)], false);
    assert_eq!(fx.status(), S_OK);
    assert_eq!(used, [(0, 1025)]);
    let mut got = vec![0u8; 1024];
    fx.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, original()[1024..2048]);

    let (fx, used) = request(1, SECTORS - 1, &[(DATA, 512, 0)], false);
    assert_eq!((fx.status(), used), (S_OK, vec![(0, 1)]));
    assert_eq!(fx.disk_bytes()[(SECTORS as usize - 1) * 512..], [0u8; 512]);
}

#[test]
fn reads_and_writes_past_the_end_or_overflowing_fail_cleanly() {
    for (kind, flags) in [(0u32, WRITE), (1, 0)] {
        for (sector, len) in [
            (SECTORS, 512),
            (SECTORS - 1, 1024),
            (u64::MAX, 512),
            (u64::MAX >> 9, 512),
            (1 << 55, 512),
            (0, 0xffff_fe00),
            (0, u32::MAX),
        ] {
            let (fx, used) = request(kind, sector, &[(DATA, len, flags)], false);
            if len > u32::MAX - 17 {
                // The chain would pass 4 GiB: it ends before its data.
                assert_eq!((fx.status(), used), (0xff, vec![(0, 0)]));
            } else {
                assert_eq!(
                    fx.status(),
                    S_IOERR,
                    "type {kind} sector {sector} len {len}"
                );
                assert_eq!(used, [(0, 1)]);
            }
            assert_eq!(fx.disk_bytes(), original(), "disk changed");
        }
    }
}

#[test]
fn zero_and_partial_sector_lengths() {
    let (fx, used) = request(0, 0, &[(DATA, 0, WRITE)], false);
    assert_eq!((fx.status(), used), (S_OK, vec![(0, 1)]));
    let (fx, _) = request(1, 0, &[(DATA, 100, 0)], false);
    assert_eq!(fx.status(), S_IOERR);
    assert_eq!(fx.disk_bytes(), original());
}

#[test]
fn data_in_the_wrong_direction_is_refused() {
    // A read into a device-readable buffer: the buffer stays as it was.
    let (fx, _) = request(0, 0, &[(DATA, 512, 0)], false);
    assert_eq!(fx.status(), S_IOERR);
    assert_eq!(fx.mem.read_obj::<u64>(GuestAddress(DATA)).unwrap(), 0);
    // A write from a device-writable buffer, and mixed directions.
    let (fx, _) = request(1, 0, &[(DATA, 512, WRITE)], false);
    assert_eq!(fx.status(), S_IOERR);
    let (fx, _) = request(1, 0, &[(DATA, 512, 0), (DATA, 512, WRITE)], false);
    assert_eq!(fx.status(), S_IOERR);
    assert_eq!(fx.disk_bytes(), original());
    let (fx, _) = request(8, 0, &[(DATA, 20, 0)], false);
    assert_eq!(fx.status(), S_IOERR);
}

#[test]
fn read_only_disk_refuses_writes_discards_and_write_zeroes() {
    let (fx, _) = request(1, 0, &[(DATA, 512, 0)], true);
    assert_eq!(fx.status(), S_IOERR);
    for kind in [11, 13] {
        let (fx, _) = ranged(kind, (0, 8, 0), 16, true);
        assert_eq!(fx.status(), S_IOERR, "type {kind}");
        assert_eq!(fx.disk_bytes(), original());
    }
}

#[test]
fn bad_status_descriptors_leave_the_request_unanswered() {
    // Read-only status, empty status, and a chain with nothing but a header.
    for chain in [
        vec![(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, 0)],
        vec![(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 0, WRITE)],
        vec![(HDR, 16, 0)],
    ] {
        let mut fx = Fixture::new(false);
        fx.header(0, 0);
        let used = {
            let mut d = driver(&fx.mem, &mut fx.blk);
            d.chain(0, &chain);
            fx.blk.process_queue(0);
            d.used()
        };
        assert_eq!(used, [(0, 0)], "{chain:x?}");
        assert_eq!(fx.status(), 0xff, "status written into {chain:x?}");
        assert_eq!(fx.mem.read_obj::<u64>(GuestAddress(DATA)).unwrap(), 0);
        assert_eq!(fx.blk.counters.malformed.load(Ordering::Relaxed), 1);
    }
}

#[test]
fn bad_headers_get_ioerr() {
    for chain in [
        vec![(HDR, 8, 0), (STATUS, 1, WRITE)],
        vec![(HDR, 16, WRITE), (STATUS, 1, WRITE)],
        vec![(MEM_SIZE - 8, 16, 0), (STATUS, 1, WRITE)],
        vec![(u64::MAX - 4, 16, 0), (STATUS, 1, WRITE)],
    ] {
        let mut fx = Fixture::new(false);
        fx.header(4, 0);
        {
            let mut d = driver(&fx.mem, &mut fx.blk);
            d.chain(0, &chain);
            fx.blk.process_queue(0);
            assert_eq!(d.used(), [(0, 1)]);
        }
        assert_eq!(fx.status(), S_IOERR, "{chain:x?}");
    }
}

#[test]
fn unsupported_types_and_status_outside_memory() {
    let (fx, _) = request(0x1234, 0, &[], false);
    assert_eq!(fx.status(), S_UNSUPP);
    let mut fx = Fixture::new(false);
    fx.header(4, 0);
    let mut d = driver(&fx.mem, &mut fx.blk);
    d.chain(0, &[(HDR, 16, 0), (MEM_SIZE + 0x1000, 1, WRITE)]);
    fx.blk.process_queue(0);
    assert_eq!(d.used(), [(0, 0)]);
}

/// A discard (11) or write-zeroes (13) request whose data is one
/// device-readable buffer of `len` bytes at `DATA` holding the segment
/// (sector, sectors, flags); the device run on it.
fn ranged(kind: u32, seg: (u64, u32, u32), len: u32, ro: bool) -> (Fixture, Vec<(u32, u32)>) {
    let mut fx = Fixture::new(ro);
    fx.header(kind, 0);
    fx.mem.write_obj(seg.0, GuestAddress(DATA)).unwrap();
    fx.mem.write_obj(seg.1, GuestAddress(DATA + 8)).unwrap();
    fx.mem.write_obj(seg.2, GuestAddress(DATA + 12)).unwrap();
    let used = {
        let mut d = driver(&fx.mem, &mut fx.blk);
        d.chain(0, &[(HDR, 16, 0), (DATA, len, 0), (STATUS, 1, WRITE)]);
        fx.blk.process_queue(0);
        d.used()
    };
    (fx, used)
}

#[test]
fn write_zeroes_zero_the_range_and_nothing_else() {
    // Unmapped: a punched hole. Kept allocated: the memfd has no zero
    // ranges (tmpfs), so zeroes are written.
    for flags in [0, FLAG_UNMAP] {
        for (sector, n) in [
            (1u64, 2u32),
            (0, 1),
            (SECTORS - 3, 3),
            (0, SECTORS as u32),
            (7, 0),
        ] {
            let (fx, used) = ranged(13, (sector, n, flags), 16, false);
            assert_eq!((fx.status(), used), (S_OK, vec![(0, 1)]), "{sector}+{n}");
            let mut want = original();
            let (a, b) = (sector as usize * 512, (sector as usize + n as usize) * 512);
            want[a..b].fill(0);
            assert_eq!(fx.disk_bytes(), want, "{sector}+{n} flags {flags}");
            let c = &fx.blk.counters;
            assert_eq!(c.write_zeroes_ops.load(Ordering::Relaxed), 1);
            assert_eq!(c.errors.load(Ordering::Relaxed), 0);
        }
    }
}

#[test]
fn write_zeroes_segments_are_checked() {
    for (seg, len, status) in [
        ((0u64, 1u32, 0u32), 32u32, S_IOERR), // two segments, one allowed
        ((0, 1, 0), 8, S_IOERR),              // a partial segment
        ((0, 1, 0), 0xffff_ffe0, S_IOERR),    // millions of segments
        ((SECTORS, 1, 0), 16, S_IOERR),
        ((SECTORS - 1, 2, FLAG_UNMAP), 16, S_IOERR),
        ((u64::MAX, 2, 0), 16, S_IOERR),
        ((0, u32::MAX, 0), 16, S_IOERR),
        ((0, MAX_WRITE_ZEROES_SECTORS + 1, 0), 16, S_IOERR),
        ((0, 1, 2), 16, S_UNSUPP), // an unknown flag
        ((0, 1, FLAG_UNMAP | 0x100), 16, S_UNSUPP),
    ] {
        let (fx, used) = ranged(13, seg, len, false);
        assert_eq!(used.len(), 1);
        assert_eq!(fx.status(), status, "{seg:?} in {len} bytes");
        assert_eq!(fx.disk_bytes(), original());
        assert_eq!(fx.blk.counters.malformed.load(Ordering::Relaxed), 1);
    }
    // An unmap flag on a discard is unsupported too.
    let (fx, _) = ranged(11, (0, 1, FLAG_UNMAP), 16, false);
    assert_eq!(fx.status(), S_UNSUPP);
    assert_eq!(fx.disk_bytes(), original());
}

#[test]
fn write_zeroes_is_offered_and_described_where_the_spec_puts_it() {
    use std::mem::offset_of;
    use virtio_bindings::virtio_blk::{self as vb, virtio_blk_config as Cfg};
    let (rw, _) = memfd_disk(false);
    let (ro, _) = memfd_disk(true);
    let zeroes = 1u64 << vb::VIRTIO_BLK_F_WRITE_ZEROES;
    let discard = 1u64 << vb::VIRTIO_BLK_F_DISCARD;
    assert_eq!(rw.features() & (zeroes | discard), zeroes | discard);
    assert_eq!(ro.features() & (zeroes | discard), 0);
    assert_ne!(ro.features() & (1 << vb::VIRTIO_BLK_F_RO), 0);
    let c = rw.config_space();
    let u32_at = |at: usize| u32::from_le_bytes(c[at..at + 4].try_into().unwrap());
    assert_eq!(c.len(), offset_of!(Cfg, unused1) + 3);
    assert_eq!(
        u32_at(offset_of!(Cfg, max_write_zeroes_sectors)),
        MAX_WRITE_ZEROES_SECTORS
    );
    assert_eq!(u32_at(offset_of!(Cfg, max_write_zeroes_seg)), 1);
    assert_eq!(c[offset_of!(Cfg, write_zeroes_may_unmap)], 1);
    assert_eq!(
        u32_at(offset_of!(Cfg, max_discard_sectors)),
        MAX_DISCARD_SECTORS
    );
    assert_eq!(u32_at(offset_of!(Cfg, max_discard_seg)), 1);
    assert_eq!(u32_at(offset_of!(Cfg, discard_sector_alignment)), 1);
    assert_eq!(u32_at(offset_of!(Cfg, seg_max)), SEG_MAX);
    assert_eq!(u32_at(offset_of!(Cfg, blk_size)), 512);
    assert_eq!(
        u64::from_le_bytes(c[..8].try_into().unwrap()),
        SECTORS,
        "capacity"
    );
    assert_eq!(vb::VIRTIO_BLK_T_WRITE_ZEROES, 13);
    assert_eq!(vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, FLAG_UNMAP);
}

#[test]
fn discard_segments_are_checked() {
    let seg = |fx: &Fixture, sector: u64, n: u32| {
        fx.mem.write_obj(sector, GuestAddress(DATA)).unwrap();
        fx.mem.write_obj(n, GuestAddress(DATA + 8)).unwrap();
        fx.mem.write_obj(0u32, GuestAddress(DATA + 12)).unwrap();
    };
    for (sector, n, len) in [
        (0u64, 1u32, 32u32), // two segments, one allowed
        (0, 1, 8),           // a partial segment
        (0, 1, 0xffff_ffe0), // millions of segments
        (SECTORS, 1, 16),
        (u64::MAX, 2, 16),
        (0, u32::MAX, 16),
    ] {
        let mut fx = Fixture::new(false);
        fx.header(11, 0);
        seg(&fx, sector, n);
        {
            let mut d = driver(&fx.mem, &mut fx.blk);
            d.chain(0, &[(HDR, 16, 0), (DATA, len, 0), (STATUS, 1, WRITE)]);
            fx.blk.process_queue(0);
            assert_eq!(d.used().len(), 1);
        }
        assert_eq!(fx.status(), S_IOERR, "sector {sector} n {n} len {len}");
        assert_eq!(fx.disk_bytes(), original());
    }
    let mut fx = Fixture::new(false);
    fx.header(11, 0);
    seg(&fx, 1, 2);
    {
        let mut d = driver(&fx.mem, &mut fx.blk);
        d.chain(0, &[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, WRITE)]);
        fx.blk.process_queue(0);
    }
    assert_eq!(fx.status(), S_OK);
    assert_eq!(fx.disk_bytes()[512..1536], [0u8; 1024]);
}

#[test]
fn descriptor_loops_end() {
    let mut fx = Fixture::new(false);
    fx.header(0, 0);
    let used = {
        let d = driver(&fx.mem, &mut fx.blk);
        // 0 -> 1 -> 2 -> 1 -> 2 ...: the chain ends at the queue size.
        d.set(0, HDR, 16, 1, 1);
        d.set(1, DATA, 512, 1 | WRITE, 2);
        d.set(2, STATUS, 1, 1 | WRITE, 1);
        let mut d = d;
        d.make_available(0);
        fx.blk.process_queue(0);
        d.used()
    };
    assert_eq!(used.len(), 1);
    // The chain ends on descriptor 1 (the last of 16), which becomes the
    // status byte; the data between mixes 512- and 1-byte buffers, no
    // whole number of sectors: refused there.
    assert_eq!(fx.mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), S_IOERR);
    assert_eq!(fx.status(), 0xff);
}

#[test]
fn indirect_tables_out_of_range_or_malformed() {
    for (addr, len) in [
        (MEM_SIZE + 0x1000, 48), // outside memory
        (MEM_SIZE - 16, 48),     // runs off the end
        (TABLES, 40),            // not a multiple of 16
        (TABLES, 0),             // empty
        (u64::MAX - 15, 48),     // address overflow
    ] {
        let mut fx = Fixture::new(false);
        fx.header(0, 0);
        let used = {
            let mut d = driver(&fx.mem, &mut fx.blk);
            d.write_table(
                TABLES,
                &[
                    (HDR, 16, 1, 1),
                    (DATA, 512, 1 | WRITE, 2),
                    (STATUS, 1, WRITE, 0),
                ],
            );
            d.set(0, addr, len, INDIRECT, 0);
            d.make_available(0);
            fx.blk.process_queue(0);
            d.used()
        };
        assert_eq!(used, [(0, 0)], "table {addr:#x}+{len}");
        assert_eq!(fx.status(), 0xff);
    }
}

#[test]
fn an_indirect_table_works_and_a_nested_one_does_not() {
    let mut fx = Fixture::new(false);
    fx.header(0, 1);
    {
        let mut d = driver(&fx.mem, &mut fx.blk);
        d.write_table(
            TABLES,
            &[
                (HDR, 16, 1, 1),
                (DATA, 512, 1 | WRITE, 2),
                (STATUS, 1, WRITE, 0),
            ],
        );
        d.set(0, TABLES, 48, INDIRECT, 0);
        d.make_available(0);
        fx.blk.process_queue(0);
        assert_eq!(d.used(), [(0, 513)]);
    }
    assert_eq!(fx.status(), S_OK);

    let mut fx = Fixture::new(false);
    fx.header(0, 1);
    let mut d = driver(&fx.mem, &mut fx.blk);
    d.write_table(
        TABLES,
        &[(HDR, 16, 1, 1), (TABLES + 0x100, 48, INDIRECT, 0)],
    );
    d.set(0, TABLES, 32, INDIRECT, 0);
    d.make_available(0);
    fx.blk.process_queue(0);
    assert_eq!(d.used(), [(0, 0)]);
}

#[test]
fn more_segments_than_seg_max_are_refused() {
    let mut fx = Fixture::new(false);
    fx.header(0, 0);
    let n = SEG_MAX as usize + 10;
    let mut table = vec![(HDR, 16, 1, 1)];
    for i in 0..n {
        table.push((DATA, 0, 1 | WRITE, (i + 2) as u16));
    }
    table.push((STATUS, 1, WRITE, 0));
    {
        let mut d = driver(&fx.mem, &mut fx.blk);
        d.write_table(TABLES, &table);
        d.set(0, TABLES, 16 * table.len() as u32, INDIRECT, 0);
        d.make_available(0);
        fx.blk.process_queue(0);
        assert_eq!(d.used(), [(0, 1)]);
    }
    assert_eq!(fx.status(), S_IOERR);
}

#[test]
fn get_id_fills_at_most_the_serial() {
    // A buffer claiming 4 GiB gets the 20 bytes of the serial.
    let (fx, used) = request(8, 0, &[(DATA, 0xffff_0000, WRITE)], false);
    assert_eq!((fx.status(), used), (S_OK, vec![(0, 21)]));
    let (fx, used) = request(8, 0, &[(DATA, 64, WRITE)], false);
    assert_eq!((fx.status(), used), (S_OK, vec![(0, 21)]));
    let mut id = [0u8; 8];
    fx.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"SERIAL-1");
}
