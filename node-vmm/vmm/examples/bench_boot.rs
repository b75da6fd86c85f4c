//! `make bench`, boot path (hack/bench-vmm.sh): where our start-up time goes,
//! step by step (`kubevmm-vmm --trace-boot`), and a stock Linux kernel's
//! early boot under our VMM beside QEMU microvm on the same kernel and
//! command line.
//!
//! Usage: `bench_boot VMM_BIN BENCH_GUEST_ELF WORK_DIR RUNS [VMLINUX LINUX_RUNS]`
//!
//! Nothing is asserted: the figures go in docs/testing.md.

#![allow(clippy::cast_precision_loss)]

mod bench_common;
use bench_common::{io, qemu_microvm, stdout_config, BenchError, Proc};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kubevmm_vmm::boot_trace::{self, Step};
use kubevmm_vmm::VmConfig;

const BENCH_RAM: u64 = 64 << 20;
const LINUX_RAM: u64 = 256 << 20;
const LINUX_CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0";
/// The lines of the early-boot table, in the order the kernel prints them.
const LINUX_BANNER: &str = "Linux version ";
const LINUX_LAST: &str = "ACPI: APIC ";
/// A kernel that has not printed its last line by then is stuck.
const LINUX_DEADLINE: Duration = Duration::from_secs(180);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

fn config_file(work: &Path, name: &str, c: &VmConfig) -> Result<PathBuf, BenchError> {
    let path = work.join(name);
    let json = serde_json::to_vec(c).map_err(|e| BenchError::Bad(e.to_string()))?;
    std::fs::write(&path, json).map_err(io(format!("write {}", path.display())))?;
    Ok(path)
}

/// One traced start: each step's end in ms after the spawn, the spawn
/// itself (fork, exec, loader, Rust runtime) as the time of `main`.
fn traced_start(vmm: &Path, config: &Path) -> Result<Vec<(Step, f64)>, BenchError> {
    let t0 = boot_trace::monotonic_ns();
    let child = Command::new(vmm)
        .arg("--config")
        .arg(config)
        .arg("--trace-boot")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("start {}", vmm.display())))?;
    let mut p = Proc(child);
    let mut err = String::new();
    p.0.stderr
        .as_mut()
        .expect("piped")
        .read_to_string(&mut err)
        .map_err(io("read the VMM's stderr"))?;
    let steps: Vec<(Step, f64)> = err
        .lines()
        .filter_map(boot_trace::parse_line)
        .map(|(s, ns)| (s, ns.saturating_sub(t0) as f64 / 1e6))
        .collect();
    if !steps.iter().any(|(s, _)| *s == Step::FirstOutput) {
        return Err(BenchError::Bad(format!(
            "no boot trace from the VMM: {err}"
        )));
    }
    Ok(steps)
}

/// The start-up breakdown: median end of each step, and its own share.
fn breakdown(vmm: &Path, guest: &Path, work: &Path, runs: usize) -> Result<(), BenchError> {
    let config = config_file(work, "trace.json", &stdout_config(guest, BENCH_RAM, ""))?;
    let mut ends: Vec<Vec<f64>> = vec![Vec::new(); Step::ALL.len()];
    for _ in 0..runs {
        for (step, at) in traced_start(vmm, &config)? {
            ends[step as usize].push(at);
        }
    }
    let ends: Vec<f64> = ends.into_iter().map(median).collect();
    let total = ends[Step::FirstOutput as usize];
    println!();
    println!("VMM start-up, step by step (`kubevmm-vmm --trace-boot`, bench guest, {runs} runs, medians)");
    println!();
    println!("| step | ends at | takes | share |");
    println!("| --- | --- | --- | --- |");
    let mut prev = 0.0;
    for (step, &at) in Step::ALL.iter().zip(&ends) {
        let name = match step {
            Step::Main => "process start: fork, exec, loader, runtime → main",
            _ => step.name(),
        };
        println!(
            "| {name} | {at:.2} ms | {:.2} ms | {:.0} % |",
            at - prev,
            (at - prev) / total * 100.0
        );
        prev = at;
    }
    Ok(())
}

/// Wall time from spawn to each watched line of the child's stdout.
fn line_times(mut cmd: Command, watch: &[&str]) -> Result<Vec<f64>, BenchError> {
    let t0 = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io(format!("start {:?}", cmd.get_program())))?;
    let mut p = Proc(child);
    let out = BufReader::new(p.0.stdout.take().expect("piped"));
    let mut times = Vec::new();
    for line in out.split(b'\n') {
        let line = line.map_err(io("read guest output"))?;
        let line = String::from_utf8_lossy(&line);
        if line.contains(watch[times.len()]) {
            times.push(t0.elapsed().as_secs_f64());
            if times.len() == watch.len() {
                return Ok(times);
            }
        }
        if t0.elapsed() > LINUX_DEADLINE {
            break;
        }
    }
    Err(BenchError::Bad(format!(
        "the kernel did not print {:?} within {LINUX_DEADLINE:?}",
        watch[times.len()]
    )))
}

fn qemu_linux(vmlinux: &Path) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    qemu_microvm(&mut cmd, "256M")
        .arg("-kernel")
        .arg(vmlinux)
        .args(["-append", LINUX_CMDLINE]);
    cmd
}

/// Stock kernel → banner and → its MADT line, ours beside QEMU.
fn linux(vmm: &Path, vmlinux: &Path, work: &Path, runs: usize) -> Result<(), BenchError> {
    let config = config_file(
        work,
        "linux.json",
        &stdout_config(vmlinux, LINUX_RAM, LINUX_CMDLINE),
    )?;
    let watch = [LINUX_BANNER, LINUX_LAST];
    let (mut ours, mut qemu) = (vec![Vec::new(); 2], vec![Vec::new(); 2]);
    for _ in 0..runs {
        let mut cmd = Command::new(vmm);
        cmd.arg("--config").arg(&config);
        for (i, t) in line_times(cmd, &watch)?.into_iter().enumerate() {
            ours[i].push(t);
        }
        for (i, t) in line_times(qemu_linux(vmlinux), &watch)?
            .into_iter()
            .enumerate()
        {
            qemu[i].push(t);
        }
    }
    let ours: Vec<f64> = ours.into_iter().map(median).collect();
    let qemu: Vec<f64> = qemu.into_iter().map(median).collect();
    println!();
    println!(
        "Linux early boot, {} ({LINUX_CMDLINE}, 256 MiB, 1 vCPU), start → line reaches the host, medians of {runs}",
        vmlinux.display()
    );
    println!();
    println!("| to | ours | QEMU microvm | ratio | goal |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| banner (\"{}\") | {:.2} s | {:.2} s | {:.2}× | - |",
        LINUX_BANNER.trim(),
        ours[0],
        qemu[0],
        ours[0] / qemu[0]
    );
    println!(
        "| \"{}\" (the MADT) | {:.2} s | {:.2} s | {:.2}× | faster than QEMU |",
        LINUX_LAST.trim(),
        ours[1],
        qemu[1],
        ours[1] / qemu[1]
    );
    println!(
        "| banner → \"{}\" | {:.2} s | {:.2} s | {:.2}× | - |",
        LINUX_LAST.trim(),
        ours[1] - ours[0],
        qemu[1] - qemu[0],
        (ours[1] - ours[0]) / (qemu[1] - qemu[0])
    );
    Ok(())
}

fn run() -> Result<(), BenchError> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        return Err(BenchError::Bad(
            "usage: bench_boot VMM_BIN BENCH_GUEST_ELF WORK_DIR RUNS [VMLINUX LINUX_RUNS]".into(),
        ));
    }
    let (vmm, guest, work) = (
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
        PathBuf::from(&args[3]),
    );
    let runs = args[4].parse().unwrap_or(10);
    std::fs::create_dir_all(&work).map_err(io("create work dir"))?;
    breakdown(&vmm, &guest, &work, runs)?;
    if let Some(vmlinux) = args.get(5) {
        let linux_runs = args.get(6).and_then(|r| r.parse().ok()).unwrap_or(3);
        linux(&vmm, Path::new(vmlinux), &work, linux_runs)?;
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench_boot: {e}");
        std::process::exit(1);
    }
}
