//! `make bench` (hack/bench-net.sh): virtio-net through a host tap, our
//! VMM beside QEMU's microvm, printed as markdown rows.
//!
//! Usage: `bench_net VMM_BIN NETECHO_ELF WORK_DIR [TAG] [RUNS]` (as root).
//!
//! A network namespace `kvnb<TAG>v` (TAG defaults to our pid) holds a tap
//! `tap0` (`vnet_hdr`) with 10.0.2.1/24 and a UDP socket on it. Each VMM in
//! turn boots the test guest `netecho` on that tap, 64 MiB, one vCPU; the
//! guest answers ARP for 10.0.2.15 and, with `swap` on its command line,
//! echoes every UDP datagram to port 7 in place: it swaps the addresses
//! and ports (the checksums stay right) and sends its receive buffer back,
//! the same few instructions for every size. (Its usual echo computes
//! checksums and copies byte by byte, which software KVM runs about a
//! thousand times slower than the host would: that would measure the
//! emulated guest, not the NIC path.)
//! QEMU runs `-M microvm -bios qboot.rom -accel kvm` with the same PVH
//! guest as `-kernel`, `-netdev tap,ifname=tap0,script=no,downscript=no`
//! and `-device virtio-net-device` (virtio-mmio version 2). Per boot:
//!
//! * 20000 datagrams of 64 bytes and 5000 of 1400 bytes, at most 32
//!   outstanding (a new one is sent for each echo back): echoes per second
//!   (each one frame to the guest and one back) and MB/s of payload echoed.
//!   The guest's driver posts one receive buffer at a time and polls, so
//!   the window does not make the guest work in parallel: it keeps frames
//!   queued on the tap so the guest and its VMM never wait for the host;
//! * 2000 datagrams of 64 bytes one at a time (window 1): the round trip.
//!
//! Each datagram carries a sequence number and an epoch; if no echo comes
//! for 200 ms, whatever is outstanding is counted lost, the epoch moves on
//! (later echoes of it are ignored) and the window is refilled.
//! RUNS boots of each (default 3), alternating; median [min-max].
//! Nothing is asserted; the figures go in docs/testing.md.

// Counts and rates far below 2^52: nothing that shows is lost.
#![allow(clippy::cast_precision_loss)]

mod bench_common;
use bench_common::{io, qemu_microvm, BenchError};
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kubevmm_vmm::config::{NetConfig, SerialConfig, SerialMode};
use kubevmm_vmm::VmConfig;

const GUEST: &str = "10.0.2.15:7";
const GUEST_MAC: &str = "52:54:00:12:34:56";
const TAP: &str = "tap0";
/// No echo for this long: what is outstanding is lost.
const LOSS_WAIT: Duration = Duration::from_millis(200);
/// The windowed runs: (datagram size, count).
const WINDOWED: [(usize, u32); 2] = [(64, 20_000), (1400, 5000)];
const WINDOW: u32 = 32;
const PINGS: u32 = 2000;
const PING_SIZE: usize = 64;
/// The epoch of the datagrams in flight; never reused, so a late echo is
/// never counted in a later run.
static EPOCH: AtomicU32 = AtomicU32::new(0);

fn run_cmd(args: &[&str]) -> Result<(), BenchError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(io(format!("run {args:?}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BenchError::Bad(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The namespace with the tap; deleted (with the tap) on drop.
#[derive(Debug)]
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Result<Self, BenchError> {
        let ns = Self(format!("kvnb{tag}v"));
        let _ = Command::new("ip")
            .args(["netns", "del", &ns.0])
            .stderr(Stdio::null())
            .status();
        run_cmd(&["ip", "netns", "add", &ns.0])?;
        let n = ns.0.as_str();
        run_cmd(&[
            "ip", "-n", n, "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr",
        ])?;
        run_cmd(&["ip", "-n", n, "addr", "add", "10.0.2.1/24", "dev", TAP])?;
        run_cmd(&["ip", "-n", n, "link", "set", TAP, "up"])?;
        run_cmd(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `program` run inside the namespace (`ip netns exec` execs it in
    /// place: the child's pid is the program's).
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }

    /// A UDP socket on 10.0.2.1 in the namespace (made by a thread that
    /// entered it; a socket stays in the namespace it was made in).
    fn udp_socket(&self) -> Result<UdpSocket, BenchError> {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).map_err(io(format!("open {path}")))?;
            // SAFETY: setns(2) on a namespace descriptor we just opened; it
            // moves only this short-lived thread into that namespace.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io("setns")(std::io::Error::last_os_error()));
            }
            UdpSocket::bind("10.0.2.1:0").map_err(io("bind 10.0.2.1:0"))
        })
        .join()
        .map_err(|_| BenchError::Bad("the namespace thread panicked".into()))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A VMM process, killed when dropped; its stdout (the guest's serial
/// console) read by a thread, line by line.
struct Vm {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Vm {
    fn spawn(mut cmd: Command) -> Result<Self, BenchError> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io(format!("start {:?}", cmd.get_program())))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Bad("no stdout".into()))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    fn wait_for(&mut self, needle: &str) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return Ok(());
                    }
                }
                Err(_) => {
                    return Err(BenchError::Bad(format!(
                        "no {needle:?} from the guest; serial:\n{}",
                        self.seen.join("\n")
                    )))
                }
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Echoes of one windowed run.
#[derive(Debug, Clone, Copy)]
struct Flow {
    echoes: u32,
    lost: u32,
    secs: f64,
}

/// Sends `count` datagrams of `size` bytes to the guest, at most `window`
/// outstanding, and counts the echoes.
fn flow(sock: &UdpSocket, size: usize, count: u32, window: u32) -> Result<Flow, BenchError> {
    sock.set_read_timeout(Some(LOSS_WAIT))
        .map_err(io("set_read_timeout"))?;
    let mut msg = vec![b'x'; size];
    let mut buf = vec![0u8; 2048];
    let (mut sent, mut echoes, mut lost, mut outstanding) = (0u32, 0u32, 0u32, 0);
    let mut epoch = EPOCH.fetch_add(1, Ordering::Relaxed) + 1;
    let t0 = Instant::now();
    loop {
        while outstanding < window && sent < count {
            msg[..4].copy_from_slice(&sent.to_le_bytes());
            msg[4..8].copy_from_slice(&epoch.to_le_bytes());
            sock.send_to(&msg, GUEST).map_err(io("send"))?;
            sent += 1;
            outstanding += 1;
        }
        if outstanding == 0 {
            break;
        }
        match sock.recv(&mut buf) {
            // Our datagram back, of this epoch.
            Ok(n) if n == size && buf[4..8] == epoch.to_le_bytes() => {
                echoes += 1;
                outstanding -= 1;
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                lost += outstanding;
                outstanding = 0;
                epoch = EPOCH.fetch_add(1, Ordering::Relaxed) + 1;
            }
            Err(e) => return Err(io("receive")(e)),
        }
    }
    Ok(Flow {
        echoes,
        lost,
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// Round trips of `PINGS` datagrams sent one at a time, in µs (lost ones
/// left out).
fn pings(sock: &UdpSocket) -> Result<(Vec<f64>, u32), BenchError> {
    let mut rtts = Vec::with_capacity(PINGS as usize);
    let mut lost = 0;
    for _ in 0..PINGS {
        let t0 = Instant::now();
        let f = flow(sock, PING_SIZE, 1, 1)?;
        if f.echoes == 1 {
            rtts.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        lost += f.lost;
    }
    Ok((rtts, lost))
}

/// What one boot measured.
struct Boot {
    flows: Vec<Flow>,
    rtt_p50_us: f64,
    ping_lost: u32,
}

/// Boots `cmd`, waits for its NIC and a first echo, then measures.
fn boot(cmd: Command, sock: &UdpSocket) -> Result<Boot, BenchError> {
    let mut vm = Vm::spawn(cmd)?;
    vm.wait_for("netecho: NIC up")?;
    // The first datagrams wait for ARP: until one comes back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while flow(sock, 16, 1, 1)?.echoes == 0 {
        if Instant::now() > deadline {
            return Err(BenchError::Bad("no echo from the guest within 30 s".into()));
        }
    }
    let flows = WINDOWED
        .iter()
        .map(|&(size, count)| flow(sock, size, count, WINDOW))
        .collect::<Result<Vec<_>, _>>()?;
    let (mut rtts, ping_lost) = pings(sock)?;
    drop(vm);
    Ok(Boot {
        flows,
        rtt_p50_us: median(&mut rtts),
        ping_lost,
    })
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

fn ours(vmm: &Path, guest: &Path, work: &Path, ns: &Netns) -> Result<Command, BenchError> {
    let mut c = VmConfig::new(guest, 64 << 20);
    c.cmdline = "swap".into();
    c.serial = SerialConfig {
        mode: SerialMode::Stdout,
        path: None,
        log: None,
        ..SerialConfig::default()
    };
    c.nets.push(NetConfig {
        id: "net0".into(),
        tap: Some(TAP.into()),
        fd: None,
        mac: GUEST_MAC.into(),
    });
    let path = work.join("netecho.json");
    let json = serde_json::to_vec(&c).map_err(|e| BenchError::Bad(e.to_string()))?;
    std::fs::write(&path, json).map_err(io(format!("write {}", path.display())))?;
    let mut cmd = ns.command(vmm);
    cmd.arg("--config").arg(path);
    Ok(cmd)
}

fn qemu(guest: &Path, ns: &Netns) -> Command {
    let mut cmd = ns.command("qemu-system-x86_64");
    qemu_microvm(&mut cmd, "64M")
        .args([
            "-global",
            "virtio-mmio.force-legacy=false",
            "-netdev",
            &format!("tap,id=n0,ifname={TAP},script=no,downscript=no"),
            "-device",
            &format!("virtio-net-device,netdev=n0,mac={GUEST_MAC}"),
            "-kernel",
        ])
        .arg(guest)
        .args(["-append", "swap qemu"]);
    cmd
}

/// `median [min-max]` of `v`, formatted with `f`.
fn spread(v: &mut [f64], f: impl Fn(f64) -> String) -> (f64, String) {
    let m = median(v);
    let (lo, hi) = (v[0], v[v.len() - 1]);
    (m, format!("{} [{}-{}]", f(m), f(lo), f(hi)))
}

/// One table cell for windowed run `i` over `boots`, and its median rate.
fn flow_cell(boots: &[Boot], i: usize) -> (f64, String) {
    let size = WINDOWED[i].0 as f64;
    let mut rates: Vec<f64> = boots
        .iter()
        .map(|b| f64::from(b.flows[i].echoes) / b.flows[i].secs)
        .collect();
    let (m, rate) = spread(&mut rates, |r| format!("{r:.0}"));
    let mut mbs: Vec<f64> = rates.iter().map(|r| r * size / 1e6).collect();
    let (_, mb) = spread(&mut mbs, |r| format!("{r:.2}"));
    let lost: u32 = boots.iter().map(|b| b.flows[i].lost).sum();
    let lost = if lost == 0 {
        String::new()
    } else {
        format!(", {lost} lost")
    };
    (m, format!("{rate} echoes/s, {mb} MB/s{lost}"))
}

fn rtt_cell(boots: &[Boot]) -> (f64, String) {
    let mut v: Vec<f64> = boots.iter().map(|b| b.rtt_p50_us).collect();
    let (m, s) = spread(&mut v, |r| format!("{r:.0}"));
    let lost: u32 = boots.iter().map(|b| b.ping_lost).sum();
    let lost = if lost == 0 {
        String::new()
    } else {
        format!(", {lost} lost")
    };
    (m, format!("{s} µs{lost}"))
}

fn run() -> Result<(), BenchError> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err(BenchError::Bad(
            "usage: bench_net VMM_BIN NETECHO_ELF WORK_DIR [TAG] [RUNS]".into(),
        ));
    }
    let (vmm, guest, work) = (
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
        PathBuf::from(&args[3]),
    );
    let tag = args
        .get(4)
        .cloned()
        .unwrap_or_else(|| std::process::id().to_string());
    let runs: usize = args.get(5).and_then(|r| r.parse().ok()).unwrap_or(3);
    std::fs::create_dir_all(&work).map_err(io("create work dir"))?;
    let ns = Netns::new(&tag)?;
    let sock = ns.udp_socket()?;
    let (mut our_boots, mut qemu_boots) = (Vec::new(), Vec::new());
    let mut qemu_error = None;
    for _ in 0..runs.max(1) {
        our_boots.push(boot(ours(&vmm, &guest, &work, &ns)?, &sock)?);
        if qemu_error.is_none() {
            match boot(qemu(&guest, &ns), &sock) {
                Ok(b) => qemu_boots.push(b),
                Err(e) => qemu_error = Some(e),
            }
        }
    }
    drop(ns);

    println!("| what | ours | anchor | target | ratio |");
    println!("| --- | --- | --- | --- | --- |");
    let anchor = |cell: &str| format!("QEMU microvm virtio-net-device, same tap and guest: {cell}");
    for (i, (size, count)) in WINDOWED.iter().enumerate() {
        let (ours_rate, ours_cell) = flow_cell(&our_boots, i);
        let (anchor_cell, ratio) = if let Some(e) = &qemu_error {
            (format!("QEMU failed: {e}"), "-".into())
        } else {
            let (q, cell) = flow_cell(&qemu_boots, i);
            (anchor(&cell), format!("{:.2}× QEMU", ours_rate / q))
        };
        println!(
            "| virtio-net UDP echo through a tap, {count} datagrams of {size} B, window {WINDOW}, median [min-max] of {runs} boots | {ours_cell} | {anchor_cell} | ahead of QEMU | {ratio} |"
        );
    }
    let (ours_rtt, ours_cell) = rtt_cell(&our_boots);
    let (anchor_cell, ratio) = if let Some(e) = &qemu_error {
        (format!("QEMU failed: {e}"), "-".into())
    } else {
        let (q, cell) = rtt_cell(&qemu_boots);
        (anchor(&cell), format!("{:.2}× QEMU", ours_rtt / q))
    };
    println!(
        "| virtio-net UDP echo round trip (ping-pong, window 1), {PINGS} datagrams of {PING_SIZE} B, p50 per boot, median [min-max] of {runs} boots | {ours_cell} | {anchor_cell} | - | {ratio} |"
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench_net: {e}");
        std::process::exit(1);
    }
}
