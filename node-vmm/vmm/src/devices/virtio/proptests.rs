//! Property tests: random descriptor tables, indirect tables, available
//! rings and guest memory, fed to every device. Whatever the guest wrote,
//! no device panics, no buffer grows past its cap, no chain is answered
//! with more than it may hold, and the disk keeps its size.

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::block::tests::{driver as blk_driver, Fixture as BlkFixture};
use super::net::frame::{MAX_FRAME, MAX_RX_BUFFERS};
use super::net::tests::{drivers as net_drivers, Fixture as NetFixture};
use super::rng::tests::driver as rng_driver;
use super::rng::{Rng, MAX_REQUEST};
use super::test_util::{guest_memory, Driver, BUF, MEM_SIZE, TABLES};
use super::VirtioDevice;

/// (address, length, flags, next) of one descriptor.
type Desc = (u64, u32, u16, u16);

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0u64..0x4000).prop_map(|o| BUF + o),
        (0u64..64).prop_map(|o| MEM_SIZE - o),
        (0u64..4).prop_map(|i| TABLES + 0x100 * i),
        any::<u64>(),
        (0u64..64).prop_map(|o| u64::MAX - o),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..2048,
        Just(0),
        Just(u32::MAX),
        Just(0xffff_f000),
        (MAX_FRAME as u32 - 2)..(MAX_FRAME as u32 + 2),
        (0u32..64).prop_map(|n| n * 16),
        any::<u32>(),
    ]
}

fn desc() -> impl Strategy<Value = Desc> {
    // Flags: NEXT, WRITE, INDIRECT in any mix; next may point past the table.
    (addr(), len(), 0u16..8, 0u16..20)
}

/// What a hostile driver controls: its descriptor table, one indirect
/// table, the available ring, and the bytes its buffers point at.
#[derive(Debug, Clone)]
struct Case {
    table: Vec<Desc>,
    indirect: Vec<Desc>,
    heads: Vec<u16>,
    bytes: Vec<u8>,
    /// Block request headers: (type, sector) at BUF + 0x100 * i.
    headers: Vec<(u32, u64)>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec(desc(), 16),
        proptest::collection::vec(desc(), 0..40),
        proptest::collection::vec(0u16..20, 0..=16),
        proptest::collection::vec(any::<u8>(), 0..512),
        proptest::collection::vec(
            (
                prop_oneof![
                    Just(0u32),
                    Just(1),
                    Just(4),
                    Just(8),
                    Just(11),
                    Just(13),
                    any::<u32>()
                ],
                prop_oneof![0u64..80, any::<u64>()],
            ),
            0..4,
        ),
    )
        .prop_map(|(table, indirect, heads, bytes, headers)| Case {
            table,
            indirect,
            heads,
            bytes,
            headers,
        })
}

impl Case {
    fn post(&self, mem: &GuestMemoryMmap, d: &mut Driver<'_>) {
        for (i, &(addr, len, flags, next)) in self.table.iter().enumerate() {
            d.set(i as u16, addr, len, flags, next);
        }
        for i in 0..4 {
            d.write_table(TABLES + 0x100 * i, &self.indirect);
        }
        mem.write_slice(&self.bytes, GuestAddress(BUF + 0x2000))
            .unwrap();
        for (i, &(kind, sector)) in self.headers.iter().enumerate() {
            let at = BUF + 0x100 * i as u64;
            mem.write_obj(kind, GuestAddress(at)).unwrap();
            mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
        }
        for &h in &self.heads {
            d.make_available(h);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn block_survives_any_chain(c in case(), read_only in any::<bool>()) {
        let mut fx = BlkFixture::new(read_only);
        let size = fx.file.metadata().unwrap().len();
        let used = {
            let mut d = blk_driver(&fx.mem, &mut fx.blk);
            c.post(&fx.mem, &mut d);
            fx.blk.process_queue(0);
            d.used()
        };
        prop_assert!(used.len() <= c.heads.len());
        prop_assert_eq!(fx.file.metadata().unwrap().len(), size);
        for (_, len) in used {
            // Data read into the guest plus the status byte: at most the
            // disk's size (32 KiB) and one byte, whatever the chain claimed.
            prop_assert!(u64::from(len) <= size + 1, "used len {}", len);
        }
    }

    #[test]
    fn net_tx_survives_any_chain(c in case()) {
        let mut fx = NetFixture::new();
        let used = {
            let (_rx, mut tx) = net_drivers(&fx.mem, &mut fx.net);
            c.post(&fx.mem, &mut tx);
            fx.net.process_queue(1);
            tx.used()
        };
        prop_assert!(used.len() <= c.heads.len());
        prop_assert!(used.iter().all(|&(_, len)| len == 0));
        for f in fx.sent() {
            prop_assert!(f.len() <= MAX_FRAME);
        }
        let (tx_cap, rx_len, _) = fx.net.buffer_sizes();
        prop_assert_eq!((tx_cap, rx_len), (MAX_FRAME, MAX_FRAME));
    }

    #[test]
    fn net_rx_survives_any_chain(c in case(), frames in proptest::collection::vec(0usize..2000, 0..4)) {
        let mut fx = NetFixture::new();
        for n in &frames {
            fx.host.send(&vec![0x5a; *n]).unwrap();
        }
        let used = {
            let (mut rx, _tx) = net_drivers(&fx.mem, &mut fx.net);
            c.post(&fx.mem, &mut rx);
            fx.net.process_queue(0);
            rx.used()
        };
        prop_assert!(used.len() <= c.heads.len());
        prop_assert!(used.iter().all(|&(_, len)| len as usize <= 2000));
        let (tx_cap, rx_len, bufs) = fx.net.buffer_sizes();
        prop_assert_eq!((tx_cap, rx_len), (MAX_FRAME, MAX_FRAME));
        prop_assert!(bufs <= MAX_RX_BUFFERS);
    }

    #[test]
    fn rng_survives_any_chain(c in case()) {
        let mem = guest_memory();
        let mut rng = Rng::new();
        let used = {
            let mut d = rng_driver(&mem, &mut rng);
            c.post(&mem, &mut d);
            rng.process_queue(0);
            d.used()
        };
        // The used ring is guest memory the chains may point into (a guest
        // may scribble over its own rings), so the device's own counters
        // are what is checked: at most one request per queue entry, at
        // most MAX_REQUEST bytes each.
        let _ = used;
        let counter = |name| rng.counters().iter().find(|(n, _)| *n == name).map_or(0, |c| c.1);
        let (bytes, requests) = (counter("bytes"), counter("requests"));
        prop_assert!(requests <= 16, "{} requests from a 16-entry queue", requests);
        prop_assert!(bytes <= requests * MAX_REQUEST as u64, "{} bytes for {} requests", bytes, requests);
        prop_assert_eq!(rng.buffer_size(), MAX_REQUEST);
    }
}
