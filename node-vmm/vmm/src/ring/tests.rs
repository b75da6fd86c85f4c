use super::*;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use proptest::prelude::*;

/// A new ring file: one handle for the writer, one for readers. The name
/// is gone at once; the handles keep the file.
fn files() -> (File, File) {
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "kubevmm-ring-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let w = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let r = File::open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    (w, r)
}

/// Stream byte `i` of the test streams: depends on `i` through all its
/// bits, so a byte read from the wrong position (overwritten) shows.
fn byte(i: u64) -> u8 {
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 56) as u8 ^ (h >> 24) as u8
}

fn stream(from: u64, len: u64) -> Vec<u8> {
    (from..from + len).map(byte).collect()
}

/// Appends the next `len` bytes of the test stream.
fn extend(w: &mut RingWriter, len: u64) {
    let t = w.total();
    w.append(&stream(t, len)).unwrap();
}

fn reader(r: &File) -> RingReader {
    RingReader::from_file(r.try_clone().unwrap()).unwrap()
}

/// Everything `read_from` promises, against the test stream.
fn check_chunk(c: &Chunk, offset: u64, total: u64, capacity: u64) {
    assert!(c.next <= total, "next {} past total {total}", c.next);
    assert!(c.bytes.len() as u64 <= capacity);
    assert_eq!(c.start(), offset + c.skipped, "start = offset + skipped");
    assert_eq!(c.bytes, stream(c.start(), c.bytes.len() as u64), "bytes");
}

#[test]
fn a_new_ring_is_empty_and_reads_back_what_was_written() {
    let (w, r) = files();
    let mut w = RingWriter::create(w, 100).unwrap();
    let r = reader(&r);
    assert_eq!(r.read_from(0, usize::MAX).unwrap(), Chunk::default());
    w.append(b"hello\n").unwrap();
    let c = r.read_from(0, usize::MAX).unwrap();
    assert_eq!(
        (c.bytes.as_slice(), c.next, c.skipped),
        (&b"hello\n"[..], 6, 0)
    );
    let c = r.read_from(2, 3).unwrap();
    assert_eq!((c.bytes.as_slice(), c.next), (&b"llo"[..], 5));
    assert_eq!(r.read_from(6, 10).unwrap().bytes, b"");
    assert!(matches!(
        r.read_from(7, 10),
        Err(RingError::OffsetAhead {
            offset: 7,
            total: 6
        })
    ));
}

#[test]
fn the_ring_keeps_the_newest_bytes_across_the_wrap() {
    let (w, r) = files();
    let mut w = RingWriter::create(w, 64).unwrap();
    let r = reader(&r);
    extend(&mut w, 50);
    extend(&mut w, 50);
    let c = r.read_from(0, usize::MAX).unwrap();
    assert_eq!((c.start(), c.next, c.skipped), (36, 100, 36));
    assert_eq!(c.bytes, stream(36, 64));
    // One write longer than the ring keeps its newest bytes.
    extend(&mut w, 1000);
    let c = r.read_from(90, usize::MAX).unwrap();
    assert_eq!((c.start(), c.next, c.skipped), (1036, 1100, 946));
    assert_eq!(c.bytes, stream(1036, 64));
    assert_eq!(
        r.file.metadata().unwrap().len(),
        HEADER_LEN + 64,
        "never grows"
    );
}

#[test]
fn tail_lines_returns_the_last_lines_and_where_to_follow_from() {
    let (w, r) = files();
    let mut w = RingWriter::create(w, 64).unwrap();
    let r = reader(&r);
    assert_eq!(r.tail_lines(3).unwrap().bytes, b"");
    w.append(b"one\ntwo\nthree\n").unwrap();
    let c = r.tail_lines(2).unwrap();
    assert_eq!((c.bytes.as_slice(), c.next), (&b"two\nthree\n"[..], 14));
    assert_eq!(r.tail_lines(10).unwrap().bytes, b"one\ntwo\nthree\n");
    assert_eq!(r.tail_lines(0).unwrap().bytes, b"");
    w.append(b"par").unwrap();
    assert_eq!(r.tail_lines(1).unwrap().bytes, b"par");
    assert_eq!(r.tail_lines(2).unwrap().bytes, b"three\npar");
    // Past the wrap, the oldest line is cut, never made up.
    for i in 0..20 {
        w.append(format!("line {i:02}\n").as_bytes()).unwrap();
    }
    let c = r.tail_lines(100).unwrap();
    assert_eq!(c.bytes.len(), 64);
    assert!(c.bytes.ends_with(b"line 18\nline 19\n"));
    assert_eq!(r.tail_lines(1).unwrap().bytes, b"line 19\n");
}

#[test]
fn a_new_writer_continues_the_stream_and_adopts_an_unfinished_write() {
    let (w, r) = files();
    let mut first = RingWriter::create(w.try_clone().unwrap(), 128).unwrap();
    extend(&mut first, 100);
    let id = first.header.id;
    drop(first);
    let (mut again, how) = RingWriter::open_or_create(w.try_clone().unwrap(), 128).unwrap();
    assert!(matches!(how, Opened::Attached), "{how:?}");
    assert_eq!(again.total(), 100);
    extend(&mut again, 100);
    let c = reader(&r).read_from(0, usize::MAX).unwrap();
    assert_eq!((c.start(), c.next), (72, 200));
    check_chunk(&c, 0, 200, 128);
    // A writer killed between announcing a write and finishing it.
    again.header.writing = 210;
    again.store_counters().unwrap();
    drop(again);
    let again = RingWriter::open(w).unwrap();
    assert_eq!(
        (again.total(), again.header.writing, again.header.id),
        (210, 210, id)
    );
    let c = reader(&r).read_from(0, usize::MAX).unwrap();
    assert_eq!(c.next, 210);
}

#[test]
fn a_ring_of_another_capacity_is_resized_keeping_its_newest_bytes_and_total() {
    let (w, r) = files();
    let mut big = RingWriter::create(w.try_clone().unwrap(), 256).unwrap();
    extend(&mut big, 300);
    let old_reader = reader(&r);
    drop(big);
    let (mut small, how) = RingWriter::open_or_create(w.try_clone().unwrap(), 100).unwrap();
    assert!(matches!(how, Opened::Resized { from: 256 }), "{how:?}");
    assert_eq!(r.metadata().unwrap().len(), HEADER_LEN + 100);
    extend(&mut small, 10);
    // Same ring id: a reader's offsets stay valid.
    let c = old_reader.read_from(250, usize::MAX).unwrap();
    assert_eq!((c.start(), c.next), (250, 310));
    check_chunk(&c, 250, 310, 100);
    drop(small);
    let (grown, _) = RingWriter::open_or_create(w, 1000).unwrap();
    assert_eq!(grown.total(), 310);
    let c = old_reader.read_from(0, usize::MAX).unwrap();
    assert_eq!((c.start(), c.next), (210, 310), "what the small ring held");
    check_chunk(&c, 0, 310, 1000);
}

#[test]
fn anything_else_is_replaced_by_a_new_ring() {
    let (w, r) = files();
    w.write_all_at(
        b"an old plain console log, one that is longer than the header of a ring\n",
        0,
    )
    .unwrap();
    let (mut ring, how) = RingWriter::open_or_create(w, 64).unwrap();
    assert!(matches!(how, Opened::Replaced(RingError::Magic)), "{how:?}");
    assert_eq!(ring.total(), 0);
    ring.append(b"fresh").unwrap();
    assert_eq!(reader(&r).read_from(0, 100).unwrap().bytes, b"fresh");
}

#[test]
fn a_reader_of_a_recreated_ring_is_told_so() {
    let (w, r) = files();
    let mut ring = RingWriter::create(w.try_clone().unwrap(), 64).unwrap();
    ring.append(b"first life").unwrap();
    let old = reader(&r);
    let mut ring = RingWriter::create(w, 64).unwrap();
    ring.append(b"second life, longer").unwrap();
    assert!(matches!(old.read_from(3, 10), Err(RingError::Recreated)));
    assert_eq!(reader(&r).read_from(0, 6).unwrap().bytes, b"second");
}

#[test]
fn a_file_opened_for_appending_is_written_in_place() {
    let (w, r) = files();
    drop(w);
    let path = format!("/proc/self/fd/{}", r.as_raw_fd());
    let w = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut ring = RingWriter::create(w, 64).unwrap();
    extend(&mut ring, 200);
    assert_eq!(r.metadata().unwrap().len(), HEADER_LEN + 64);
    let c = reader(&r).read_from(0, usize::MAX).unwrap();
    check_chunk(&c, 0, 200, 64);
}

#[test]
fn bad_capacities_are_refused() {
    for cap in [0, 1, MIN_CAPACITY - 1, MAX_CAPACITY + 1, u64::MAX] {
        let (w, _) = files();
        assert!(matches!(RingWriter::create(w, cap), Err(RingError::Capacity(c)) if c == cap));
    }
}

#[test]
fn a_write_in_progress_hides_the_bytes_it_overwrites() {
    let (w, r) = files();
    let mut ring = RingWriter::create(w, 64).unwrap();
    extend(&mut ring, 100);
    // The writer announced 10 more bytes and stored 4 of them, which went
    // over stream bytes 36..40.
    ring.header.writing = 110;
    ring.store_counters().unwrap();
    write_stream(&ring.file, 64, 100, &stream(100, 4)).unwrap();
    let c = reader(&r).read_from(0, usize::MAX).unwrap();
    assert_eq!((c.start(), c.next, c.skipped), (46, 100, 46));
    check_chunk(&c, 0, 100, 64);
}

#[test]
fn bytes_overwritten_during_the_copy_are_dropped() {
    let (w, r) = files();
    let mut ring = RingWriter::create(w, 64).unwrap();
    extend(&mut ring, 64);
    let r = reader(&r);
    // The copy sees 0..64; meanwhile 20 bytes replace 0..20.
    let c = r
        .read_from_with(0, usize::MAX, || extend(&mut ring, 20))
        .unwrap();
    assert_eq!((c.start(), c.next, c.skipped), (20, 64, 20));
    check_chunk(&c, 0, 84, 64);
    // Everything copied was overwritten: nothing returned, and the next
    // read goes on from the oldest byte still held.
    let c = r.read_from_with(70, 5, || extend(&mut ring, 200)).unwrap();
    assert_eq!((c.bytes.len(), c.next, c.skipped), (0, 220, 150));
    assert_eq!(r.read_from(c.next, 100).unwrap().bytes, stream(220, 64));
}

/// A header with the given fields (`raw` fields let tests break it).
fn raw_header(magic: [u8; 8], version: u32, len: u32, fields: [u64; 5]) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[..8].copy_from_slice(&magic);
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b[12..16].copy_from_slice(&len.to_le_bytes());
    for (i, f) in fields.iter().enumerate() {
        b[16 + 8 * i..24 + 8 * i].copy_from_slice(&f.to_le_bytes());
    }
    b
}

/// A header, and what reading it must say.
type Case = ([u8; 64], fn(&RingError) -> bool);

#[test]
fn corrupt_headers_are_named() {
    let ok = [64, 7, 10, 10, 0];
    let cases: Vec<Case> = vec![
        (raw_header(*b"KVMMRINX", 1, 64, ok), |e| {
            matches!(e, RingError::Magic)
        }),
        (raw_header(MAGIC, 2, 64, ok), |e| {
            matches!(e, RingError::Version(2))
        }),
        (raw_header(MAGIC, 1, 63, ok), |e| {
            matches!(e, RingError::HeaderLen(63))
        }),
        (raw_header(MAGIC, 1, 64, [u64::MAX, 7, 0, 0, 0]), |e| {
            matches!(e, RingError::Capacity(u64::MAX))
        }),
        (raw_header(MAGIC, 1, 64, [64, 7, 11, 10, 0]), |e| {
            matches!(e, RingError::Counters { .. })
        }),
        (raw_header(MAGIC, 1, 64, [64, 7, 10, 10, 11]), |e| {
            matches!(e, RingError::Counters { .. })
        }),
        (
            raw_header(MAGIC, 1, 64, [1 << 20, 7, 0, 0, 0]),
            |e| matches!(e, RingError::Truncated { need, .. } if *need == HEADER_LEN + (1 << 20)),
        ),
    ];
    for (header, is) in cases {
        let (w, r) = files();
        w.set_len(128).unwrap();
        w.write_all_at(&header, 0).unwrap();
        let err = RingReader::from_file(r).unwrap_err();
        assert!(is(&err), "{err}");
    }
    let (w, r) = files();
    w.write_all_at(b"short", 0).unwrap();
    assert!(matches!(
        RingReader::from_file(r),
        Err(RingError::Truncated { len: 5, .. })
    ));
    // Truncated after it was opened: an error, not a panic or short data.
    let (w, r) = files();
    let mut ring = RingWriter::create(w.try_clone().unwrap(), 1024).unwrap();
    extend(&mut ring, 900);
    let r = reader(&r);
    w.set_len(200).unwrap();
    assert!(matches!(
        r.read_from(0, usize::MAX),
        Err(RingError::Truncated { len: 200, .. })
    ));
}

/// A reader racing a writer on a small ring only ever returns the bytes
/// of the stream at their positions.
#[test]
fn concurrent_readers_never_see_overwritten_bytes() {
    let (w, r) = files();
    let mut ring = RingWriter::create(w, 64).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                extend(&mut ring, 1 + n % 37);
                n += 1;
            }
            ring.total()
        })
    };
    let r = reader(&r);
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(700);
    let (mut offset, mut reads, mut lost) = (0u64, 0u64, 0u64);
    while std::time::Instant::now() < deadline {
        let c = r.read_from(offset, 48).unwrap();
        let total = r.total().unwrap();
        check_chunk(&c, offset, total, 64);
        lost += c.skipped;
        offset = c.next;
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let total = writer.join().unwrap();
    assert!(reads > 100 && total > 1000, "{reads} reads, {total} bytes");
    assert!(lost > 0, "the writer outran the reader at least once");
}

/// A write: its length.
fn writes() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(prop_oneof![0u64..8, 0u64..300, Just(64u64)], 0..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// After any writes, a read from every offset returns exactly the
    /// stream bytes the ring still holds from there.
    #[test]
    fn reads_from_every_offset_match_the_model(
        capacity in 64u64..200,
        writes in writes(),
        max in prop_oneof![Just(usize::MAX), 0usize..100],
    ) {
        let (w, r) = files();
        let mut ring = RingWriter::create(w, capacity).unwrap();
        for len in &writes {
            extend(&mut ring, *len);
        }
        let total = ring.total();
        prop_assert_eq!(total, writes.iter().sum::<u64>());
        let r = reader(&r);
        let oldest = total.saturating_sub(capacity);
        for offset in 0..=total {
            let c = r.read_from(offset, max).unwrap();
            let start = offset.max(oldest);
            let len = (total - start).min(max as u64);
            prop_assert_eq!((c.start(), c.next, c.skipped), (start, start + len, start - offset));
            prop_assert_eq!(&c.bytes, &stream(start, len));
        }
        let ahead = r.read_from(total + 1, max);
        let ahead_refused = matches!(ahead, Err(RingError::OffsetAhead { .. }));
        prop_assert!(ahead_refused);
    }

    /// Whatever is written while a read copies, it returns only bytes
    /// that are still the stream's at their positions, and accounts for
    /// every byte it leaves out.
    #[test]
    fn overwrites_during_a_read_are_detected(
        capacity in 64u64..200,
        before in writes(),
        during in writes(),
        offset_at in any::<prop::sample::Index>(),
        max in prop_oneof![Just(usize::MAX), 0usize..100],
    ) {
        let (w, r) = files();
        let mut ring = RingWriter::create(w, capacity).unwrap();
        for len in &before {
            extend(&mut ring, *len);
        }
        let offset = offset_at.index(ring.total() as usize + 1) as u64;
        let r = reader(&r);
        let c = r
            .read_from_with(offset, max, || {
                for len in &during {
                    extend(&mut ring, *len);
                }
            })
            .unwrap();
        let total = ring.total();
        check_chunk(&c, offset, total, capacity);
        prop_assert!(c.bytes.is_empty() || c.start() >= total.saturating_sub(capacity));
        // Nothing is left out that is still there.
        if !c.bytes.is_empty() {
            prop_assert_eq!(c.start(), offset.max(total.saturating_sub(capacity)));
        }
    }

    /// Any header and any file length: an error or bounded data, never a
    /// panic or a huge allocation; a writer replaces what it cannot use.
    #[test]
    fn hostile_headers_give_errors_not_panics(
        magic_ok in any::<bool>(),
        version in prop_oneof![Just(1u32), any::<u32>()],
        header_len in prop_oneof![Just(64u32), any::<u32>()],
        capacity in prop_oneof![64u64..300, Just(0u64), Just(MAX_CAPACITY), any::<u64>()],
        written in prop_oneof![0u64..1000, any::<u64>(), Just(u64::MAX)],
        extra in prop_oneof![0u64..1000, any::<u64>(), Just(u64::MAX)],
        base in prop_oneof![0u64..1000, any::<u64>()],
        file_len in 0u64..600,
        offset in prop_oneof![0u64..1000, any::<u64>()],
    ) {
        let (w, r) = files();
        let magic = if magic_ok { MAGIC } else { *b"KVMMRINX" };
        let writing = written.saturating_add(extra);
        let header = raw_header(magic, version, header_len, [capacity, 9, written, writing, base]);
        w.set_len(file_len.max(64)).unwrap();
        w.write_all_at(&header, 0).unwrap();
        if let Ok(reader) = RingReader::from_file(r) {
            for c in [reader.read_from(offset, usize::MAX), reader.tail_lines(5)]
                .into_iter()
                .flatten()
            {
                prop_assert!(c.bytes.len() as u64 <= capacity);
                prop_assert!(c.next <= written);
            }
        }
        // (A total near 2^64 cannot grow: that write fails, nothing panics.)
        let (mut ring, _) = RingWriter::open_or_create(w, 64).unwrap();
        let _ = ring.append(b"still works");
    }
}
