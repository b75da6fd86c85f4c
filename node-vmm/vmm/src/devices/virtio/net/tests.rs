//! virtio-net against malformed chains, through the virtqueue mock, on a
//! datagram socket pair standing in for the tap (one datagram per frame).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::frame::{MAX_FRAME, VNET_HDR_LEN};
use super::Net;
use crate::devices::virtio::test_util::{
    guest_memory, interrupt, Driver, BUF, INDIRECT, MEM_SIZE, TABLES, WRITE,
};
use crate::devices::virtio::VirtioDevice;

/// RX queue rings at 0, TX at `TX_BASE`; 16 entries each.
const TX_BASE: u64 = 0x4000;

pub struct Fixture {
    pub mem: GuestMemoryMmap,
    pub net: Net,
    /// The host side of the "tap".
    pub host: UnixDatagram,
}

impl Fixture {
    pub fn new() -> Self {
        let (dev, host) = UnixDatagram::pair().unwrap();
        dev.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let tap = File::from(OwnedFd::from(dev));
        Self {
            mem: guest_memory(),
            net: Net::with_backend(tap, false, [2, 0, 0, 0, 0, 1]),
            host,
        }
    }

    /// Frames the device sent to the host side.
    pub fn sent(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 2 * MAX_FRAME];
        while let Ok(n) = self.host.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.net
            .counters()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    }
}

/// The RX and TX drivers, the device activated on them.
pub fn drivers<'a>(mem: &'a GuestMemoryMmap, net: &mut Net) -> (Driver<'a>, Driver<'a>) {
    let rx = Driver::new(mem, 0, 16);
    let tx = Driver::new(mem, TX_BASE, 16);
    net.activate(mem.clone(), vec![rx.queue(), tx.queue()], interrupt(), 0)
        .unwrap();
    (rx, tx)
}

fn frame_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7) as u8).collect()
}

/// Posts one TX chain and runs the device; returns (used, frames sent).
fn tx(chain: &[(u64, u32, u16)]) -> (Fixture, Vec<(u32, u32)>, Vec<Vec<u8>>) {
    let mut fx = Fixture::new();
    let used = {
        let (_rx, mut tx) = drivers(&fx.mem, &mut fx.net);
        tx.chain(0, chain);
        fx.net.process_queue(1);
        tx.used()
    };
    let sent = fx.sent();
    (fx, used, sent)
}

#[test]
fn a_tx_frame_goes_out_whole() {
    let mut fx = Fixture::new();
    let bytes = frame_bytes(1514 + VNET_HDR_LEN);
    fx.mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    {
        let (_rx, mut tx) = drivers(&fx.mem, &mut fx.net);
        tx.chain(0, &[(BUF, 12, 0), (BUF + 12, 1514, 0)]);
        fx.net.process_queue(1);
        assert_eq!(tx.used(), [(0, 0)]);
    }
    assert_eq!(fx.sent(), [bytes]);
    assert_eq!(fx.counter("tx_frames"), 1);
}

#[test]
fn a_4_gib_tx_descriptor_is_dropped_without_allocating_it() {
    for len in [u32::MAX, 0xffff_f000, (MAX_FRAME + 1) as u32] {
        let (fx, used, sent) = tx(&[(BUF, len, 0)]);
        assert_eq!(used, [(0, 0)], "the chain is completed");
        assert!(sent.is_empty());
        assert_eq!(fx.counter("tx_dropped"), 1);
        assert_eq!(fx.net.tx_frame.capacity(), MAX_FRAME, "TX buffer grew");
    }
}

#[test]
fn tx_chains_adding_up_past_the_limit_are_dropped() {
    // Two descriptors of 40 KiB, and a loop 0 -> 1 -> 0 of 8 KiB buffers
    // that the queue size (16) ends at 128 KiB.
    let (fx, used, sent) = tx(&[(BUF, 40 << 10, 0), (BUF, 40 << 10, 0)]);
    assert_eq!((used.len(), sent.len()), (1, 0));
    assert_eq!(fx.net.tx_frame.capacity(), MAX_FRAME);

    let mut fx = Fixture::new();
    {
        let (_rx, mut tx) = drivers(&fx.mem, &mut fx.net);
        tx.set(0, BUF, 8 << 10, 1, 1);
        tx.set(1, BUF, 8 << 10, 1, 0);
        tx.make_available(0);
        fx.net.process_queue(1);
        assert_eq!(tx.used(), [(0, 0)]);
    }
    assert!(fx.sent().is_empty());
    assert_eq!(fx.counter("tx_dropped"), 1);
}

#[test]
fn empty_header_only_unreadable_and_writable_tx_chains_are_dropped() {
    for chain in [
        vec![(BUF, 0, 0)],
        vec![(BUF, VNET_HDR_LEN as u32, 0)],
        vec![(MEM_SIZE - 4, 64, 0)],
        vec![(u64::MAX - 8, 64, 0)],
        vec![(BUF, 12, 0), (BUF + 0x100, 64, WRITE)],
    ] {
        let (fx, used, sent) = tx(&chain);
        assert_eq!(used, [(0, 0)], "{chain:x?}");
        assert!(sent.is_empty(), "{chain:x?}");
        assert_eq!(fx.counter("tx_dropped"), 1);
    }
}

#[test]
fn tx_indirect_tables_out_of_range_or_malformed() {
    for (addr, len) in [
        (MEM_SIZE + 0x1000, 32),
        (TABLES, 24),
        (TABLES, 0),
        (u64::MAX - 15, 32),
        (TABLES, 0xffff_fff0),
    ] {
        let mut fx = Fixture::new();
        {
            let (_rx, mut tx) = drivers(&fx.mem, &mut fx.net);
            tx.write_table(TABLES, &[(BUF, 12, 1, 1), (BUF + 12, 64, 0, 0)]);
            tx.set(0, addr, len, INDIRECT, 0);
            tx.make_available(0);
            fx.net.process_queue(1);
            assert_eq!(tx.used(), [(0, 0)], "{addr:#x}+{len}");
        }
        assert_eq!(fx.net.tx_frame.capacity(), MAX_FRAME);
    }
}

/// Posts RX chains, sends `frames` from the host, runs the device.
fn rx(chains: &[&[(u64, u32, u16)]], frames: &[&[u8]]) -> (Fixture, Vec<(u32, u32)>) {
    let mut fx = Fixture::new();
    for f in frames {
        fx.host.send(f).unwrap();
    }
    let used = {
        let (mut rx, _tx) = drivers(&fx.mem, &mut fx.net);
        let mut at = 0;
        for c in chains {
            rx.chain(at, c);
            at += c.len() as u16;
        }
        fx.net.process_queue(0);
        rx.used()
    };
    (fx, used)
}

#[test]
fn an_rx_frame_fills_the_guest_buffer() {
    let f = frame_bytes(100);
    let (fx, used) = rx(&[&[(BUF, 2048, WRITE)]], &[&f]);
    assert_eq!(used, [(0, 100)]);
    let mut got = vec![0u8; 100];
    fx.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(got[..10], f[..10]);
    assert_eq!(got[10..12], [1, 0], "num_buffers");
    assert_eq!(got[12..], f[12..]);
    assert_eq!(fx.counter("rx_bytes"), 88);
}

#[test]
fn rx_frames_shorter_than_the_header_are_dropped_not_underflowed() {
    let good = frame_bytes(60);
    let (fx, used) = rx(&[&[(BUF, 2048, WRITE)]], &[&[1, 2, 3, 4, 5], &good]);
    // The short frame is dropped; the buffer takes the next one.
    assert_eq!(used, [(0, 60)]);
    assert_eq!(fx.counter("rx_dropped"), 1);
    assert_eq!(fx.counter("rx_frames"), 1);
    assert_eq!(fx.counter("rx_bytes"), 48);
}

#[test]
fn rx_chains_with_readable_or_tiny_buffers_are_returned_unused() {
    let f = frame_bytes(60);
    for chain in [
        &[(BUF, 2048, 0)][..],
        &[(BUF, 1024, WRITE), (BUF + 1024, 1024, 0)],
        &[(BUF, 0, WRITE)],
        &[(BUF, 4, WRITE)],
    ] {
        let (fx, used) = rx(&[chain, &[(BUF + 0x1000, 2048, WRITE)]], &[&f]);
        // The bad chain comes back empty, the frame lands in the next one.
        assert_eq!(used, [(0, 0), (chain.len() as u32, 60)], "{chain:x?}");
        assert_eq!(fx.mem.read_obj::<u64>(GuestAddress(BUF)).unwrap(), 0);
        assert_eq!(fx.counter("rx_malformed"), 1);
    }
}

#[test]
fn rx_buffers_claiming_4_gib_or_outside_memory() {
    let f = frame_bytes(60);
    let (fx, used) = rx(&[&[(BUF, u32::MAX, WRITE)]], &[&f]);
    assert_eq!(used, [(0, 60)]);
    assert_eq!(fx.counter("rx_frames"), 1);
    // Past the end of guest memory: nothing written, the frame dropped.
    let (fx, used) = rx(&[&[(MEM_SIZE - 8, 2048, WRITE)]], &[&f]);
    assert_eq!(used, [(0, 0)]);
    assert_eq!(fx.counter("rx_dropped"), 1);
    let (_, used) = rx(&[&[(u64::MAX - 8, 2048, WRITE)]], &[&f]);
    assert_eq!(used, [(0, 0)]);
}

#[test]
fn rx_frames_too_big_for_the_buffers_are_truncated_and_counted() {
    let f = frame_bytes(3000);
    let (fx, used) = rx(&[&[(BUF, 1000, WRITE), (BUF + 0x1000, 1000, WRITE)]], &[&f]);
    assert_eq!(used, [(0, 2000)]);
    assert_eq!(fx.counter("rx_dropped"), 1);
}

#[test]
fn rx_waits_without_frames_and_without_buffers() {
    // No frame: the buffer stays available.
    let (fx, used) = rx(&[&[(BUF, 2048, WRITE)]], &[]);
    assert!(used.is_empty());
    assert_eq!(fx.counter("rx_frames"), 0);
    // No buffer: the frame stays on the tap.
    let (fx, used) = rx(&[], &[&frame_bytes(60)]);
    assert!(used.is_empty());
    assert_eq!(fx.sent().len(), 0);
}

#[test]
fn rx_descriptor_loops_and_bad_indirect_tables() {
    let mut fx = Fixture::new();
    fx.host.send(&frame_bytes(3000)).unwrap();
    fx.host.send(&frame_bytes(60)).unwrap();
    fx.host.send(&frame_bytes(60)).unwrap();
    {
        let (mut rx, _tx) = drivers(&fx.mem, &mut fx.net);
        // 0 -> 0 -> ...: the same 1 KiB buffer until the queue size (16).
        rx.set(0, BUF, 1024, 1 | WRITE, 0);
        rx.make_available(0);
        // Indirect tables outside memory and of a bad length.
        rx.set(1, MEM_SIZE + 0x1000, 32, INDIRECT, 0);
        rx.make_available(1);
        rx.set(2, TABLES, 24, INDIRECT, 0);
        rx.make_available(2);
        rx.set(3, BUF + 0x1000, 2048, WRITE, 0);
        rx.make_available(3);
        fx.net.process_queue(0);
        assert_eq!(rx.used(), [(0, 3000), (1, 0), (2, 0), (3, 60)]);
    }
    assert_eq!(fx.counter("rx_malformed"), 2);
    let (_, _, bufs) = fx.net.buffer_sizes();
    assert!(bufs <= 16);
}
