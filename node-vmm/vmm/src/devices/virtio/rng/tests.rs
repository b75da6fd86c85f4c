//! virtio-rng against malformed and oversized chains, through the virtqueue
//! mock: one request never gets more than `MAX_REQUEST` bytes.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Rng, MAX_REQUEST};
use crate::devices::virtio::test_util::{
    guest_memory, interrupt, Driver, BUF, INDIRECT, MEM_SIZE, TABLES, WRITE,
};
use crate::devices::virtio::VirtioDevice;

pub fn driver<'a>(mem: &'a GuestMemoryMmap, rng: &mut Rng) -> Driver<'a> {
    let d = Driver::new(mem, 0, 16);
    rng.activate(mem.clone(), vec![d.queue()], interrupt(), 0)
        .unwrap();
    d
}

fn run(chain: &[(u64, u32, u16)]) -> (GuestMemoryMmap, Rng, Vec<(u32, u32)>) {
    let mem = guest_memory();
    let mut rng = Rng::new();
    let used = {
        let mut d = driver(&mem, &mut rng);
        d.chain(0, chain);
        rng.process_queue(0);
        d.used()
    };
    (mem, rng, used)
}

fn bytes(rng: &Rng) -> u64 {
    rng.counters()[0].1
}

#[test]
fn a_buffer_gets_random_bytes() {
    let (mem, rng, used) = run(&[(BUF, 64, WRITE)]);
    assert_eq!(used, [(0, 64)]);
    let mut got = [0u8; 64];
    mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    let zeros = got.iter().fold(0, |n, &b| n + usize::from(b == 0));
    assert!(zeros < 16, "{got:?}");
    assert_eq!(bytes(&rng), 64);
}

#[test]
fn a_4_gib_buffer_gets_one_request_worth() {
    let (_, rng, used) = run(&[(BUF, u32::MAX, WRITE)]);
    assert_eq!(used, [(0, MAX_REQUEST as u32)]);
    assert_eq!(bytes(&rng), MAX_REQUEST as u64);
}

#[test]
fn a_long_indirect_chain_gets_one_request_worth() {
    // 4096 buffers of 64 KiB (256 MiB) in one request.
    let mem = guest_memory();
    let mut rng = Rng::new();
    let mut d = driver(&mem, &mut rng);
    let table: Vec<_> = (0..4096u16)
        .map(|i| (BUF, 64 << 10, 1 | WRITE, i + 1))
        .collect();
    d.write_table(TABLES, &table);
    d.set(0, TABLES, 16 * 4096, INDIRECT, 0);
    d.make_available(0);
    rng.process_queue(0);
    assert_eq!(d.used(), [(0, MAX_REQUEST as u32)]);
    assert_eq!(bytes(&rng), MAX_REQUEST as u64);
}

#[test]
fn device_readable_empty_and_outside_buffers_get_nothing() {
    for chain in [
        vec![(BUF, 64, 0)],
        vec![(BUF, 0, WRITE)],
        vec![(MEM_SIZE - 8, 64, WRITE)],
        vec![(u64::MAX - 8, 64, WRITE)],
    ] {
        let (mem, _, used) = run(&chain);
        assert_eq!(used, [(0, 0)], "{chain:x?}");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(BUF)).unwrap(), 0);
    }
    // A readable buffer between writable ones is skipped, not written.
    let (mem, _, used) = run(&[(BUF, 8, WRITE), (BUF + 8, 8, 0), (BUF + 16, 8, WRITE)]);
    assert_eq!(used, [(0, 16)]);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(BUF + 8)).unwrap(), 0);
}

#[test]
fn descriptor_loops_and_bad_indirect_tables_end() {
    let mem = guest_memory();
    let mut rng = Rng::new();
    let mut d = driver(&mem, &mut rng);
    d.set(0, BUF, 1 << 10, 1 | WRITE, 0);
    d.make_available(0);
    d.set(1, MEM_SIZE + 0x1000, 64, INDIRECT, 0);
    d.make_available(1);
    d.set(2, TABLES, 24, INDIRECT, 0);
    d.make_available(2);
    rng.process_queue(0);
    // The loop ends at the queue size: 16 KiB.
    assert_eq!(d.used(), [(0, 16 << 10), (1, 0), (2, 0)]);
}
