//! The console as the node agent runs it, with our `echo` guest: the VMM
//! jailed (chroot, an unprivileged uid, no capabilities, seccomp), its
//! output in a console ring and sent to the clients of a listening socket
//! the agent bound and handed over, as it hands over every other file.

mod common;

use std::fs::{File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use kubevmm_vmm::config::{
    HandedFds, JailConfig, SerialConfig, SerialFileFormat, SerialMode, DEFAULT_SERIAL_FILE_LIMIT,
};
use kubevmm_vmm::console::MAX_CLIENTS;
use kubevmm_vmm::exit::code;
use kubevmm_vmm::ring::{RingReader, HEADER_LEN};
use kubevmm_vmm::VmConfig;

const BANNER: &str = "echo guest ready\r\n";

/// A jailed `echo` guest and the files the agent keeps for it.
struct Guest {
    ring: PathBuf,
    console: PathBuf,
    api: PathBuf,
    vmm: Vmm,
}

/// The uid and gid of the jailed VMMs of this test process.
fn jail_id() -> u32 {
    3_900_000 + std::process::id() % 10_000
}

/// A listening socket at `path` (0600), as the agent binds it.
fn listen(path: &Path) -> OwnedFd {
    let l = kubevmm_vmm::vm::bind_unix(&path.to_path_buf()).unwrap();
    std::fs::set_permissions(path, Permissions::from_mode(0o600)).unwrap();
    l.into()
}

/// Boots `echo` jailed, as the agent would: everything handed over as fds,
/// the console ring (of `ring_bytes`) in `dir`, kept across runs.
fn jailed_echo(dir: &Path, ring_bytes: u64) -> Guest {
    let ring = dir.join("console.ring");
    let console = dir.join("console.sock");
    let api = dir.join("api.sock");
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let kvm: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .unwrap()
        .into();
    let kernel: OwnedFd = File::open(guest("echo")).unwrap().into();
    let ring_file: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&ring)
        .unwrap()
        .into();
    let mut c = VmConfig::new(guest("echo"), 64 << 20);
    c.serial = SerialConfig {
        mode: SerialMode::Socket,
        path: Some(console.clone()),
        log: Some(ring.clone()),
        max_file_bytes: ring_bytes,
        file_format: SerialFileFormat::Ring,
    };
    c.api_socket = Some(api.clone());
    c.fds = HandedFds {
        kvm: Some(3),
        kernel: Some(4),
        serial_log: Some(5),
        console: Some(6),
        api: Some(7),
        ..HandedFds::default()
    };
    let id = jail_id();
    c.jail = Some(JailConfig {
        uid: id,
        gid: id,
        root,
    });
    let fds = [kvm, kernel, ring_file, listen(&console), listen(&api)];
    let vmm = spawn_handed(&c, dir, &fds);
    Guest {
        ring,
        console,
        api,
        vmm,
    }
}

impl Guest {
    fn wait_in_ring(&self, what: &str, count: usize) {
        wait_for(&format!("{what:?} ×{count} in the ring"), || {
            (ring_text(&self.ring).matches(what).count() >= count).then_some(())
        });
    }

    fn stats(&self, field: &str) -> u64 {
        api(&self.api, "GET", "/vm/stats").1[field]
            .as_u64()
            .unwrap_or_else(|| panic!("no {field} in the stats"))
    }

    fn wait_clients(&self, n: u64) {
        wait_for(&format!("{n} console clients"), || {
            (self.stats("console_clients") == n).then_some(())
        });
    }
}

/// A console client that keeps what it reads.
struct Client {
    stream: UnixStream,
    seen: Vec<u8>,
}

impl Client {
    fn attach(sock: &Path) -> Self {
        let stream = UnixStream::connect(sock).expect("connect to the console");
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Self {
            stream,
            seen: Vec::new(),
        }
    }

    fn type_line(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
    }

    /// Reads once (up to the socket's timeout); false at the end.
    fn read_some(&mut self) -> bool {
        let mut buf = vec![0u8; 64 << 10];
        match self.stream.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                self.seen.extend_from_slice(&buf[..n]);
                true
            }
            Err(_) => true,
        }
    }

    /// Reads until `want` has been seen at or after byte `from`, within
    /// `guard`; returns where it starts.
    fn expect_within(&mut self, want: &str, from: usize, guard: Duration) -> usize {
        let want = want.as_bytes();
        let start = Instant::now();
        let mut at = from;
        loop {
            if let Some(i) = self.seen[at.min(self.seen.len())..]
                .windows(want.len())
                .position(|w| w == want)
            {
                return at + i;
            }
            at = at.max(self.seen.len().saturating_sub(want.len() - 1));
            assert!(
                start.elapsed() < guard,
                "timed out waiting for {:?} on the console",
                String::from_utf8_lossy(want)
            );
            assert!(
                self.read_some(),
                "the console closed before {:?}",
                String::from_utf8_lossy(want)
            );
        }
    }

    fn expect(&mut self, want: &str) {
        self.expect_within(want, 0, HANG_GUARD);
    }

    /// Reads until the whole "flood done <n> lines" line is in.
    fn expect_flood_done(&mut self, guard: Duration) {
        let at = self.expect_within("flood done", 0, guard);
        self.expect_within("\r\n", at, guard);
    }
}

/// Line `n` of the echo guest's flood.
fn flood_line(n: usize) -> Vec<u8> {
    let mut l = format!("{:08} ", n % 100_000_000).into_bytes();
    l.extend((9..63).map(|i| b'a' + ((n + i) % 26) as u8));
    l.push(b'\n');
    l
}

/// Checks that `seen` holds a whole `flood KIB` (from its first line on,
/// in order, nothing lost or doubled) and the guest's count of its lines.
/// Returns the bytes from the flood's start to the end of "flood done".
fn check_flood(seen: &[u8], kib: usize) -> Vec<u8> {
    let first = flood_line(0);
    let start = seen
        .windows(first.len())
        .position(|w| w == first.as_slice())
        .expect("the flood's first line");
    let len = kib * 1024;
    let flood = &seen[start..start + len];
    for (n, line) in flood.chunks(64).enumerate() {
        assert_eq!(
            line,
            flood_line(n).as_slice(),
            "flood line {n} (byte {})",
            n * 64
        );
    }
    let rest = String::from_utf8_lossy(&seen[start + len..]);
    let done = format!("flood done {} lines\r\n", kib * 16);
    assert!(
        rest.starts_with(&done),
        "{:?} after the flood, not {done:?}",
        &rest[..rest.len().min(40)]
    );
    seen[start..start + len + done.len()].to_vec()
}

#[test]
fn two_clients_share_the_jailed_console_and_the_ring_keeps_everything() {
    let dir = scratch("jailed-console");
    let g = jailed_echo(&dir, DEFAULT_SERIAL_FILE_LIMIT);
    // Nobody attached: the ring has the output all the same.
    g.wait_in_ring(BANNER, 1);
    let status = std::fs::read_to_string(format!("/proc/{}/status", g.vmm.id())).unwrap();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    assert_eq!(
        uid.split_whitespace().next(),
        Some(jail_id().to_string().as_str()),
        "the VMM runs as its jail uid"
    );
    let mut a = Client::attach(&g.console);
    let mut b = Client::attach(&g.console);
    g.wait_clients(2);
    a.type_line("hello from a");
    a.expect("echo: hello from a\r\n");
    b.expect("echo: hello from a\r\n");
    b.type_line("and from b");
    a.expect("echo: and from b\r\n");
    b.expect("echo: and from b\r\n");
    b.type_line("poweroff");
    a.expect("powering off");
    b.expect("powering off");
    let out = wait(g.vmm, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    assert_eq!(
        ring_text(&g.ring),
        format!("{BANNER}echo: hello from a\r\necho: and from b\r\npowering off\r\n")
    );
    assert_eq!(
        std::fs::metadata(&g.ring).unwrap().len(),
        HEADER_LEN + DEFAULT_SERIAL_FILE_LIMIT,
        "a ring has its size from the start, and keeps it"
    );
}

#[test]
fn a_client_that_leaves_mid_output_frees_its_slot_and_the_guest_goes_on() {
    let dir = scratch("jailed-leave");
    let g = jailed_echo(&dir, DEFAULT_SERIAL_FILE_LIMIT);
    g.wait_in_ring(BANNER, 1);
    let mut a = Client::attach(&g.console);
    let mut b = Client::attach(&g.console);
    g.wait_clients(2);
    b.type_line("flood 32");
    while a.seen.len() < 2048 {
        assert!(a.read_some());
    }
    drop(a);
    g.wait_clients(1);
    b.expect_flood_done(HANG_GUARD);
    check_flood(&b.seen, 32);
    // Its slot is free: MAX_CLIENTS may be attached again, and no more.
    let more: Vec<Client> = (1..MAX_CLIENTS)
        .map(|_| Client::attach(&g.console))
        .collect();
    g.wait_clients(MAX_CLIENTS as u64);
    let mut extra = UnixStream::connect(&g.console).unwrap();
    let mut said = String::new();
    extra.read_to_string(&mut said).unwrap();
    assert_eq!(said, "kubevmm: too many console clients\r\n");
    drop(more);
    g.wait_clients(1);
    assert_eq!(g.stats("console_clients_too_slow"), 0);
    let from = b.seen.len();
    b.type_line("still there?");
    b.expect_within("echo: still there?", from, HANG_GUARD);
    b.type_line("poweroff");
    let out = wait(g.vmm, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
}

/// `KUBEVMM_FLOOD_KIB` (default 256; 10240 for the 10 MiB run) of output
/// reach a client that keeps reading complete and in order, while the
/// ring, smaller than the flood, keeps exactly its newest bytes.
#[test]
fn a_flood_reaches_a_reading_client_whole_and_the_ring_keeps_its_tail() {
    let kib: usize = std::env::var("KUBEVMM_FLOOD_KIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let ring_bytes = 128 << 10;
    let dir = scratch("jailed-flood");
    let g = jailed_echo(&dir, ring_bytes);
    g.wait_in_ring(BANNER, 1);
    let mut a = Client::attach(&g.console);
    g.wait_clients(1);
    let started = Instant::now();
    a.type_line(&format!("flood {kib}"));
    // Generous: this is no performance test (software KVM takes ~60 µs
    // per byte).
    let guard = HANG_GUARD + Duration::from_millis(250 * kib as u64);
    a.expect_flood_done(guard);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "flood: {kib} KiB in {secs:.1} s, {:.1} KiB/s through the console socket",
        f64::from(kib as u32) / secs
    );
    let flood = check_flood(&a.seen, kib);
    // The ring: exactly the newest `ring_bytes` of everything written.
    let whole = [BANNER.as_bytes(), &flood].concat();
    let ring = RingReader::open(&g.ring).unwrap();
    assert_eq!(ring.total().unwrap(), whole.len() as u64);
    let held = ring.read_from(0, usize::MAX).unwrap();
    assert_eq!(held.skipped, whole.len() as u64 - ring_bytes);
    assert!(held.bytes == whole[whole.len() - ring_bytes as usize..]);
    assert_eq!(g.stats("console_clients_too_slow"), 0);
    a.type_line("poweroff");
    let out = wait(g.vmm, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
}

/// A VM restarted (or an agent restarted) on the same ring: the next VMM
/// continues the stream, and a reader follows it across both.
#[test]
fn the_next_vmm_continues_the_ring() {
    let dir = scratch("jailed-restart");
    let g = jailed_echo(&dir, 4096);
    g.wait_in_ring(BANNER, 1);
    let follower = RingReader::open(&g.ring).unwrap();
    let first = follower.read_from(0, usize::MAX).unwrap();
    assert_eq!(first.bytes, BANNER.as_bytes());
    let mut a = Client::attach(&g.console);
    g.wait_clients(1);
    a.type_line("poweroff");
    let out = wait(g.vmm, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");

    let g = jailed_echo(&dir, 4096);
    g.wait_in_ring(BANNER, 2);
    let next = follower.read_from(first.next, usize::MAX).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&next.bytes),
        format!("powering off\r\n{BANNER}")
    );
    assert_eq!(next.skipped, 0);
    let mut a = Client::attach(&g.console);
    g.wait_clients(1);
    a.type_line("poweroff");
    let out = wait(g.vmm, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
}
