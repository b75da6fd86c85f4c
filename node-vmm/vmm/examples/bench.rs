//! `make bench` driver (hack/bench-vmm.sh): our VMM beside its anchors on
//! this machine, printed as a table with the DESIGN.md targets.
//!
//! Usage: `bench VMM_BIN BENCH_GUEST_ELF WORK_DIR [RUNS]`

// Counters (bytes, cycles) are far below 2^52: converting them to f64 for
// the printed figures loses nothing that shows.
#![allow(clippy::cast_precision_loss)]

mod bench_common;
use bench_common::{io, kvm, qemu_microvm, stdout_config, BenchError, Proc};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kubevmm_vmm::config::DiskConfig;
use kubevmm_vmm::VmConfig;

const GUEST_RAM: u64 = 64 << 20;
const DISK_SIZE: usize = 64 << 20;
const CHUNK: usize = 1 << 20;
const IOLOOP_N: u32 = 20_000;
/// The bench guest's `blkrand`: reads, their size, the xorshift64 seed.
const BLKRAND_N: u32 = 4096;
const BLKRAND_LEN: usize = 4096;
const BLKRAND_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

struct Setup {
    vmm: PathBuf,
    guest: PathBuf,
    work: PathBuf,
    runs: usize,
}

impl Setup {
    fn our_config(&self, cmdline: &str) -> VmConfig {
        stdout_config(&self.guest, GUEST_RAM, cmdline)
    }

    fn ours(&self, c: &VmConfig, name: &str) -> Result<Command, BenchError> {
        let path = self.work.join(name);
        let json = serde_json::to_vec(c).map_err(|e| BenchError::Bad(e.to_string()))?;
        std::fs::write(&path, json).map_err(io(format!("write {}", path.display())))?;
        let mut cmd = Command::new(&self.vmm);
        cmd.arg("--config").arg(path);
        Ok(cmd)
    }

    fn qemu(&self, append: &str) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        qemu_microvm(&mut cmd, "64M")
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1", "-kernel"])
            .arg(&self.guest)
            .args(["-append", append]);
        cmd
    }
}

fn spawn(mut cmd: Command) -> Result<Proc, BenchError> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io(format!("start {:?}", cmd.get_program())))?;
    Ok(Proc(child))
}

/// Reads the child's stdout until `needle` appears; returns what was read.
fn read_until(p: &mut Proc, needle: &str) -> Result<String, BenchError> {
    let out = p.0.stdout.as_mut().expect("piped");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = out.read(&mut buf).map_err(io("read guest output"))?;
        if n == 0 {
            return Err(BenchError::Bad(format!(
                "guest output ended before {needle:?}: {}",
                String::from_utf8_lossy(&seen)
            )));
        }
        seen.extend_from_slice(&buf[..n]);
        let s = String::from_utf8_lossy(&seen);
        if s.contains(needle) && s[s.find(needle).unwrap_or(0)..].contains('\n') {
            return Ok(s.into_owned());
        }
    }
}

/// Process start -> first byte of guest serial output, and -> exit.
fn start_times(mut cmd: Command) -> Result<(Duration, Duration), BenchError> {
    let t0 = Instant::now();
    let mut p = spawn(std::mem::replace(&mut cmd, Command::new("true")))?;
    let mut b = [0u8; 1];
    let out = p.0.stdout.as_mut().expect("piped");
    let n = out.read(&mut b).map_err(io("read guest output"))?;
    let first = t0.elapsed();
    if n == 0 {
        return Err(BenchError::Bad("no guest output".into()));
    }
    let mut rest = Vec::new();
    out.read_to_end(&mut rest)
        .map_err(io("read guest output"))?;
    p.0.wait().map_err(io("wait"))?;
    Ok((first, t0.elapsed()))
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    };
    Stats {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fmt_ms(s: &Stats) -> String {
    format!("{:.1} ms [{:.1}-{:.1}]", s.median, s.min, s.max)
}

/// (total RSS, RSS of every mapping except guest RAM) from /proc/PID/smaps,
/// as Firecracker measures overhead. Guest RAM: mappings of the guest's size
/// (QEMU may add up to 2 MiB of alignment).
fn smaps_rss(pid: u32) -> Result<(u64, u64), BenchError> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).map_err(io(path))?;
    let (mut total, mut overhead) = (0u64, 0u64);
    let mut size = 0u64;
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("Size:") => size = f.next().and_then(|v| v.parse().ok()).unwrap_or(0) * 1024,
            Some("Rss:") => {
                let rss: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0) * 1024;
                total += rss;
                if !(GUEST_RAM..=GUEST_RAM + (2 << 20)).contains(&size) {
                    overhead += rss;
                }
            }
            _ => {}
        }
    }
    Ok((total, overhead))
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 20)
}

/// Host TSC frequency (the guest's TSC runs at the host's rate under KVM).
fn tsc_hz() -> f64 {
    // SAFETY: rdtsc has no side effects; x86-64 always has it.
    let c0 = unsafe { core::arch::x86_64::_rdtsc() };
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    let c1 = unsafe { core::arch::x86_64::_rdtsc() };
    (c1 - c0) as f64 / t0.elapsed().as_secs_f64()
}

/// Parses "bench: WHAT ... KEY N" from guest output.
fn field(out: &str, what: &str, key: &str) -> Result<u64, BenchError> {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("bench: {what} ")))
        .ok_or_else(|| BenchError::Bad(format!("no '{what}' result in: {out}")))?;
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == key {
            return it
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| BenchError::Bad(format!("bad {key} in {line}")));
        }
    }
    Err(BenchError::Bad(format!("no {key} in {line}")))
}

/// The same loop as the bench guest's `ioloop` (`out %al,$0x80; dec; jnz`),
/// in real mode on a bare KVM VM with no irqchip: every `out` is a
/// `KVM_EXIT_IO` handled by this loop and nothing else. Returns ns per exit.
fn raw_kvm_exit_io() -> Result<f64, BenchError> {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuExit};
    let kvm_fd = Kvm::new().map_err(kvm("open /dev/kvm"))?;
    let vm = kvm_fd.create_vm().map_err(kvm("create VM"))?;
    let size = 0x1000usize;
    // SAFETY: a fresh private anonymous mapping; checked for failure below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(BenchError::Bad("mmap failed".into()));
    }
    let n = IOLOOP_N.to_le_bytes();
    let code = [
        0x66, 0xb9, n[0], n[1], n[2], n[3], // mov $N, %ecx
        0xe6, 0x80, // 1: out %al, $0x80
        0x66, 0x49, // dec %ecx
        0x75, 0xfa, // jnz 1b
        0xf4, // hlt
    ];
    // SAFETY: `mem` is a writable mapping of `size` >= code.len() bytes.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), mem.cast::<u8>(), code.len()) };
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0x1000,
        memory_size: size as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the mapping outlives the VM (never unmapped in this process).
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm("memory region"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(kvm("create vCPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;
    let mut regs = vcpu.get_regs().map_err(kvm("get regs"))?;
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(kvm("set regs"))?;
    let mut exits = 0u32;
    let t0 = Instant::now();
    loop {
        match vcpu.run().map_err(kvm("run"))? {
            VcpuExit::IoOut(0x80, _) => exits += 1,
            VcpuExit::Hlt => break,
            other => return Err(BenchError::Bad(format!("raw loop: exit {other:?}"))),
        }
    }
    let el = t0.elapsed();
    if exits != IOLOOP_N {
        return Err(BenchError::Bad(format!("raw loop: {exits} exits")));
    }
    Ok(el.as_secs_f64() * 1e9 / f64::from(exits))
}

fn host_read_mib_s(path: &Path) -> Result<f64, BenchError> {
    let mut f = std::fs::File::open(path).map_err(io("open disk"))?;
    let mut buf = vec![0u8; CHUNK];
    let t0 = Instant::now();
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf).map_err(io("read disk"))?;
        if n == 0 {
            break;
        }
        total += n;
    }
    Ok(mib(total as u64) / t0.elapsed().as_secs_f64())
}

/// The byte offsets the bench guest's `blkrand` reads, in its order.
fn blkrand_offsets(size: u64) -> impl Iterator<Item = u64> {
    let blocks = size / BLKRAND_LEN as u64;
    let mut x = BLKRAND_SEED;
    (0..BLKRAND_N).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % blocks * BLKRAND_LEN as u64
    })
}

/// IOPS of the host reading the guest's `blkrand` offsets with pread(2).
fn host_rand_iops(path: &Path) -> Result<f64, BenchError> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(io("open disk"))?;
    let size = f.metadata().map_err(io("stat disk"))?.len();
    let mut buf = vec![0u8; BLKRAND_LEN];
    let t0 = Instant::now();
    for off in blkrand_offsets(size) {
        f.read_exact_at(&mut buf, off).map_err(io("read disk"))?;
    }
    Ok(f64::from(BLKRAND_N) / t0.elapsed().as_secs_f64())
}

/// One guest run with `blkread blkrand`.
struct BlkRun {
    /// MiB/s of the sequential 1 MiB reads.
    seq: f64,
    /// IOPS of the random 4 KiB reads.
    rand: f64,
    /// Per sequential request, in µs: notify → used (the device's time as
    /// the guest sees it), and the rest (the guest's own code).
    device_us: f64,
    guest_us: f64,
}

fn guest_blk(cmd: Command, hz: f64) -> Result<BlkRun, BenchError> {
    let mut p = spawn(cmd)?;
    let out = read_until(&mut p, "bench: blkrand")?;
    drop(p);
    let secs = |what| -> Result<(u64, f64), BenchError> {
        let bytes = field(&out, what, "bytes")?;
        Ok((bytes, field(&out, what, "cycles")? as f64 / hz))
    };
    let (seq_bytes, seq_secs) = secs("blkread")?;
    let (rand_bytes, rand_secs) = secs("blkrand")?;
    let reads = rand_bytes / BLKRAND_LEN as u64;
    let requests = (seq_bytes / CHUNK as u64).max(1) as f64;
    let device_us = field(&out, "blkread", "wait")? as f64 / hz / requests * 1e6;
    Ok(BlkRun {
        seq: mib(seq_bytes) / seq_secs,
        rand: reads as f64 / rand_secs,
        device_us,
        guest_us: seq_secs / requests * 1e6 - device_us,
    })
}

/// Opens `path` read-only for a child to inherit; returns it (keep it
/// open until the child started) and its descriptor number.
fn inherited(path: &Path) -> Result<(std::fs::File, i32), BenchError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(io(format!("open {}", path.display())))?;
    // SAFETY: fcntl on our own open descriptor, clearing FD_CLOEXEC.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
        return Err(io("fcntl")(std::io::Error::last_os_error()));
    }
    let fd = f.as_raw_fd();
    Ok((f, fd))
}

/// virtio-blk reads, warm page cache for all: the host's read(2) of the
/// raw file, our guest on it, our guest on a qcow2 overlay
/// (`create_overlay`, nothing allocated: every read goes through to a
/// fully allocated qcow2 copy of the raw file), and QEMU microvm's
/// virtio-blk-device on the same overlay. Sequential 1 MiB reads in MiB/s
/// and 4 KiB random reads (queue depth 1, the host with pread(2) at the
/// same offsets) in IOPS, three runs each.
struct BlkFigures {
    host: Stats,
    raw: Stats,
    /// The raw runs' request split: device µs, guest µs.
    raw_split: (Stats, Stats),
    overlay: Stats,
    qemu: Result<Stats, BenchError>,
    rand_host: Stats,
    rand_raw: Stats,
    rand_overlay: Stats,
    rand_qemu: Result<Stats, String>,
}

/// Sequential and random figures of three runs, split.
fn split(runs: Vec<BlkRun>) -> (Stats, Stats) {
    let (seq, rand) = runs.into_iter().map(|r| (r.seq, r.rand)).unzip();
    (stats(seq), stats(rand))
}

fn blk_bench(s: &Setup, hz: f64) -> Result<BlkFigures, BenchError> {
    let disk = s.work.join("disk.img");
    let data: Vec<u8> = (0..DISK_SIZE).map(|i| (i / 4096) as u8).collect();
    std::fs::write(&disk, data).map_err(io("write disk"))?;
    let base = s.work.join("base.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&disk)
        .arg(&base)
        .status()
        .map_err(io("run qemu-img"))?;
    if !st.success() {
        return Err(BenchError::Bad(format!("qemu-img convert: {st}")));
    }
    let overlay = s.work.join("overlay.qcow2");
    let ofile = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&overlay)
        .map_err(io("create overlay"))?;
    let bfile = std::fs::File::open(&base).map_err(io("open base"))?;
    kubevmm_vmm::image::create_overlay(&ofile, &bfile, "base.qcow2")
        .map_err(|e| BenchError::Bad(e.to_string()))?;
    for f in [&disk, &base] {
        host_read_mib_s(f)?; // warm the page cache
    }
    let (mut host, mut raw, mut ovl, mut qemu) = (vec![], vec![], vec![], vec![]);
    let mut rand_host = vec![];
    for _ in 0..3 {
        host.push(host_read_mib_s(&disk)?);
        rand_host.push(host_rand_iops(&disk)?);
        let mut c = s.our_config("blkread blkrand");
        c.disks.push(DiskConfig {
            id: "bench".into(),
            path: disk.clone(),
            read_only: true,
            serial: None,
            fd: None,
            backing_fds: Vec::new(),
            format: None,
        });
        raw.push(guest_blk(s.ours(&c, "blk.json")?, hz)?);

        let (_top, top_fd) = inherited(&overlay)?;
        let (_base, base_fd) = inherited(&base)?;
        c.disks[0].path.clone_from(&overlay);
        c.disks[0].fd = Some(top_fd);
        c.disks[0].backing_fds = vec![base_fd];
        ovl.push(guest_blk(s.ours(&c, "blk-qcow2.json")?, hz)?);

        let mut q = s.qemu("blkread blkrand qemu");
        q.arg("-drive")
            .arg(format!(
                "file={},format=qcow2,if=none,id=d0,readonly=on",
                overlay.display()
            ))
            .args([
                "-device",
                "virtio-blk-device,drive=d0",
                "-global",
                "virtio-mmio.force-legacy=false",
            ]);
        qemu.push(guest_blk(q, hz));
    }
    let raw_split = (
        stats(raw.iter().map(|r| r.device_us).collect()),
        stats(raw.iter().map(|r| r.guest_us).collect()),
    );
    let (raw, rand_raw) = split(raw);
    let (overlay, rand_overlay) = split(ovl);
    let (qemu, rand_qemu) = match qemu.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(runs) => {
            let (seq, rand) = split(runs);
            (Ok(seq), Ok(rand))
        }
        Err(e) => {
            let msg = e.to_string();
            (Err(e), Err(msg))
        }
    };
    Ok(BlkFigures {
        host: stats(host),
        raw,
        raw_split,
        overlay,
        qemu,
        rand_host: stats(rand_host),
        rand_raw,
        rand_overlay,
        rand_qemu,
    })
}

fn run() -> Result<(), BenchError> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err(BenchError::Bad(
            "usage: bench VMM_BIN BENCH_GUEST_ELF WORK_DIR [RUNS]".into(),
        ));
    }
    let s = Setup {
        vmm: args[1].clone().into(),
        guest: args[2].clone().into(),
        work: args[3].clone().into(),
        runs: args.get(4).and_then(|r| r.parse().ok()).unwrap_or(10),
    };
    std::fs::create_dir_all(&s.work).map_err(io("create work dir"))?;
    let hz = tsc_hz();
    eprintln!("bench: TSC {:.0} MHz, {} runs each", hz / 1e6, s.runs);

    // 1. Start -> first output, -> exit.
    let (mut of, mut oe, mut qf, mut qe) = (vec![], vec![], vec![], vec![]);
    for _ in 0..s.runs {
        let (f, e) = start_times(s.ours(&s.our_config(""), "hello.json")?)?;
        of.push(ms(f));
        oe.push(ms(e));
        let (f, e) = start_times(s.qemu(""))?;
        qf.push(ms(f));
        qe.push(ms(e));
    }
    let (of, oe, qf, qe) = (stats(of), stats(oe), stats(qf), stats(qe));

    // 2. Memory, guests idle after their first line.
    let mut c = s.our_config("idle");
    let sock = s.work.join("api.sock");
    let _ = std::fs::remove_file(&sock);
    c.api_socket = Some(sock.clone());
    let mut ours = spawn(s.ours(&c, "idle.json")?)?;
    read_until(&mut ours, "bench: hello")?;
    std::thread::sleep(Duration::from_millis(300));
    let (our_total, our_overhead) = smaps_rss(ours.0.id())?;
    let api_overhead = api_overhead(&sock)?;
    drop(ours);
    let mut q = spawn(s.qemu("idle"))?;
    read_until(&mut q, "bench: hello")?;
    std::thread::sleep(Duration::from_millis(300));
    let (q_total, q_overhead) = smaps_rss(q.0.id())?;
    drop(q);

    // 3. I/O-port round trip.
    let mut p = spawn(s.ours(&s.our_config("ioloop"), "ioloop.json")?)?;
    let out = read_until(&mut p, "bench: ioloop")?;
    drop(p);
    let our_io_ns = field(&out, "ioloop", "cycles")? as f64 * 1e9 / hz / f64::from(IOLOOP_N);
    let raw_io_ns = raw_kvm_exit_io()?;

    let blk = blk_bench(&s, hz)?;

    println!("| what | ours | anchor | target | ratio |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| start → first guest output, median [min-max] of {} | {} | QEMU microvm {} | ≤ 1/10 of QEMU, < 50 ms | {:.3}× QEMU |",
        s.runs,
        fmt_ms(&of),
        fmt_ms(&qf),
        of.median / qf.median
    );
    println!(
        "| start → exit (guest powers off) | {} | QEMU microvm {} | - | {:.3}× QEMU |",
        fmt_ms(&oe),
        fmt_ms(&qe),
        oe.median / qe.median
    );
    println!(
        "| VMM memory overhead (RSS minus guest RAM) | {:.2} MiB (API: {:.2} MiB; total RSS {:.2} MiB) | QEMU RSS {:.1} MiB (minus guest RAM {:.1} MiB) | ≤ 5 MiB | {:.3}× QEMU |",
        mib(our_overhead),
        mib(api_overhead),
        mib(our_total),
        mib(q_total),
        mib(q_overhead),
        mib(our_overhead) / mib(q_overhead)
    );
    println!(
        "| I/O-port round trip (out 0x80, {IOLOOP_N} times) | {:.2} µs | raw KVM_EXIT_IO {:.2} µs | ≤ 1.5× raw | {:.2}× raw |",
        our_io_ns / 1e3,
        raw_io_ns / 1e3,
        our_io_ns / raw_io_ns
    );
    print_blk(&blk);
    Ok(())
}

/// The virtio-blk rows of the table.
fn print_blk(blk: &BlkFigures) {
    let (host, guest) = (&blk.host, &blk.raw);
    println!(
        "| virtio-blk 1 MiB sequential reads (64 MiB, warm page cache), median [min-max] of 3 | {:.0} MiB/s [{:.0}-{:.0}] | host read(2) {:.0} MiB/s [{:.0}-{:.0}] | ≥ 50 % of host | {:.1} % of host |",
        guest.median, guest.min, guest.max, host.median, host.min, host.max,
        guest.median / host.median * 100.0
    );
    let (device, guest_own) = &blk.raw_split;
    println!(
        "| virtio-blk, one 1 MiB sequential read: notify → used (the device, as the guest times it) / the guest's own code around it | {:.0} µs / {:.0} µs | host read(2) of 1 MiB {:.0} µs | - | device {:.0} % of the request |",
        device.median,
        guest_own.median,
        1e6 / host.median,
        device.median / (device.median + guest_own.median) * 100.0
    );
    let o = &blk.overlay;
    let qemu = match &blk.qemu {
        Ok(q) => format!(
            "raw {:.0} MiB/s; QEMU microvm virtio-blk-device, same overlay {:.0} MiB/s [{:.0}-{:.0}]",
            guest.median, q.median, q.min, q.max
        ),
        Err(e) => format!("raw {:.0} MiB/s; QEMU failed: {e}", guest.median),
    };
    let vs_qemu = blk
        .qemu
        .as_ref()
        .map(|q| format!(", {:.2}× QEMU", o.median / q.median))
        .unwrap_or_default();
    println!(
        "| virtio-blk 1 MiB sequential reads, qcow2 overlay over a qcow2 base (64 MiB, warm page cache), median [min-max] of 3 | {:.0} MiB/s [{:.0}-{:.0}] | {qemu} | ≥ 80 % of raw, ahead of QEMU | {:.1} % of raw{vs_qemu} |",
        o.median, o.min, o.max,
        o.median / guest.median * 100.0
    );
    print_blk_rand(blk);
}

/// The 4 KiB random-read rows: raw beside the host's pread(2), then the
/// qcow2 overlay beside raw and QEMU on the same overlay.
fn print_blk_rand(blk: &BlkFigures) {
    let (host, raw, o) = (&blk.rand_host, &blk.rand_raw, &blk.rand_overlay);
    let what = |disk: &str| {
        format!("virtio-blk 4 KiB random reads, {disk} ({BLKRAND_N} at queue depth 1, 64 MiB, warm page cache), median [min-max] of 3")
    };
    println!(
        "| {} | {:.0} IOPS [{:.0}-{:.0}] | host pread(2), same offsets {:.0} IOPS [{:.0}-{:.0}] | - | {:.1} % of host |",
        what("raw"),
        raw.median, raw.min, raw.max, host.median, host.min, host.max,
        raw.median / host.median * 100.0
    );
    let qemu = match &blk.rand_qemu {
        Ok(q) => format!(
            "raw {:.0} IOPS; QEMU microvm virtio-blk-device, same overlay {:.0} IOPS [{:.0}-{:.0}]",
            raw.median, q.median, q.min, q.max
        ),
        Err(e) => format!("raw {:.0} IOPS; QEMU failed: {e}", raw.median),
    };
    let vs_qemu = blk
        .rand_qemu
        .as_ref()
        .map(|q| format!(", {:.2}× QEMU", o.median / q.median))
        .unwrap_or_default();
    println!(
        "| {} | {:.0} IOPS [{:.0}-{:.0}] | {qemu} | ≥ 80 % of raw, ahead of QEMU | {:.1} % of raw{vs_qemu} |",
        what("qcow2 overlay over a qcow2 base"),
        o.median, o.min, o.max,
        o.median / raw.median * 100.0
    );
}

/// `vmm_overhead_rss_bytes` from the VMM's own stats API.
fn api_overhead(sock: &Path) -> Result<u64, BenchError> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).map_err(io("connect API"))?;
    s.write_all(b"GET /vm/stats HTTP/1.1\r\nHost: vmm\r\nContent-Length: 0\r\n\r\n")
        .map_err(io("API request"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(io("API response"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| BenchError::Bad(format!("bad API response {resp}")))?;
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| BenchError::Bad(e.to_string()))?;
    v["vmm_overhead_rss_bytes"]
        .as_u64()
        .ok_or_else(|| BenchError::Bad(format!("no vmm_overhead_rss_bytes in {body}")))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}
