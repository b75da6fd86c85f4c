use super::*;

use std::io::Write as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const BASE: u64 = 7 << 32;

/// A console with a listening socket, and the epoll the loop would use.
struct Fixture {
    console: Console,
    listener: UnixListener,
    path: std::path::PathBuf,
    epoll: Epoll,
}

impl Fixture {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "kubevmm-console-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let listener = crate::vm::bind_unix(&path).unwrap();
        Self {
            console: Console::new().unwrap(),
            listener,
            path,
            epoll: Epoll::new().unwrap(),
        }
    }

    fn reg(&self) -> Registry<'_> {
        Registry {
            epoll: &self.epoll,
            base: BASE,
        }
    }

    fn attach(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        self.console.accept(&self.listener, self.reg());
        s
    }

    /// Events epoll has for clients now: (id, events).
    fn events(&self) -> Vec<(u32, EventSet)> {
        let mut evs = vec![EpollEvent::default(); 32];
        let n = self.epoll.wait(0, &mut evs).unwrap();
        evs[..n]
            .iter()
            .map(|e| ((e.data() & 0xffff_ffff) as u32, e.event_set()))
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn every_client_gets_all_output_and_any_may_type() {
    let f = Fixture::new();
    let mut a = f.attach();
    let mut b = f.attach();
    assert_eq!(f.console.clients(), 2);
    f.console.broadcast(b"hello ");
    f.console.broadcast(b"world\n");
    f.console.service(f.reg());
    assert_eq!(read_exactly(&mut a, 12), b"hello world\n");
    assert_eq!(read_exactly(&mut b, 12), b"hello world\n");
    b.write_all(b"ls\n").unwrap();
    let mut input = [0u8; 64];
    assert_eq!(f.console.ready(1, EventSet::IN, &mut input, f.reg()), 3);
    assert_eq!(&input[..3], b"ls\n");
    // Nothing typed by the other: nothing read, still attached.
    assert_eq!(f.console.ready(0, EventSet::IN, &mut input, f.reg()), 0);
    assert_eq!(f.console.clients(), 2);
}

#[test]
fn a_client_that_leaves_is_removed_and_leaves_no_slot() {
    let f = Fixture::new();
    let mut stay = f.attach();
    drop(f.attach());
    let mut input = [0u8; 64];
    assert_eq!(f.console.ready(1, EventSet::IN, &mut input, f.reg()), 0);
    assert_eq!(f.console.clients(), 1);
    // Coming and going many times keeps one entry per attached client.
    for _ in 0..100 {
        let gone = f.attach();
        drop(gone);
        f.console.broadcast(b"x");
        f.console.service(f.reg());
    }
    assert_eq!(f.console.clients(), 1);
    assert_eq!(read_exactly(&mut stay, 100), vec![b'x'; 100]);
    // An event for a removed client is ignored.
    assert_eq!(f.console.ready(1, EventSet::IN, &mut input, f.reg()), 0);
}

#[test]
fn a_slow_client_is_disconnected_and_never_holds_up_the_others() {
    let f = Fixture::new();
    let mut fast = f.attach();
    let mut slow = f.attach();
    let chunk = vec![b'o'; 64 << 10];
    let chunks = MAX_PENDING / chunk.len() + 64;
    let reader = std::thread::spawn(move || {
        let mut got = 0;
        let mut buf = vec![0u8; 1 << 16];
        while got < chunks * (64 << 10) {
            let n = fast.read(&mut buf).unwrap();
            assert!(n > 0, "the fast client was cut off after {got} bytes");
            got += n;
        }
        got
    });
    let fast_pending = || {
        let clients = f.console.lock();
        clients
            .list
            .iter()
            .find(|c| c.id == 0)
            .map(|c| c.pending.len())
    };
    for _ in 0..chunks {
        f.console.broadcast(&chunk);
        f.console.service(f.reg());
        // The fast client's socket fills too: it is sent to when it can
        // take more, as the event loop would on its OUT event. It keeps up
        // (the test waits for it), the slow one does not.
        while fast_pending().expect("the fast client is attached") > MAX_PENDING / 2 {
            for (id, ev) in f.events() {
                f.console.ready(id, ev, &mut [0u8; 8], f.reg());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // Drain the rest for the fast client.
    while !reader.is_finished() {
        for (id, ev) in f.events() {
            f.console.ready(id, ev, &mut [0u8; 8], f.reg());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(reader.join().unwrap(), chunks * (64 << 10));
    assert_eq!(f.console.clients(), 1, "the slow client is gone");
    assert_eq!(f.console.too_slow(), 1);
    // It got what fit in its socket, then the end of the stream.
    let mut rest = Vec::new();
    slow.read_to_end(&mut rest).unwrap();
    assert!(!rest.is_empty() && rest.len() < MAX_PENDING + chunk.len());
}

#[test]
fn clients_past_the_limit_are_turned_away() {
    let f = Fixture::new();
    let attached: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| f.attach()).collect();
    let mut extra = f.attach();
    assert_eq!(f.console.clients(), MAX_CLIENTS);
    let mut said = String::new();
    extra.read_to_string(&mut said).unwrap();
    assert_eq!(said, "kubevmm: too many console clients\r\n");
    drop(attached);
}

#[test]
fn a_client_is_watched_for_room_only_while_output_waits() {
    let f = Fixture::new();
    let mut c = f.attach();
    assert!(f.events().is_empty(), "no events for an idle client");
    // More than its socket holds: the rest waits for room.
    f.console.broadcast(&vec![b'z'; 4 << 20]);
    f.console.service(f.reg());
    assert!(f.console.lock().list[0].watching_out);
    let mut got = 0;
    while got < 4 << 20 {
        got += c.read(&mut vec![0u8; 1 << 20]).unwrap();
        for (id, ev) in f.events() {
            assert!(ev.contains(EventSet::OUT), "{ev:?}");
            f.console.ready(id, ev, &mut [0u8; 8], f.reg());
        }
    }
    assert!(!f.console.lock().list[0].watching_out);
    assert!(f.events().is_empty(), "no busy loop once drained");
}
