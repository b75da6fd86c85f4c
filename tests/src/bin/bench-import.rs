//! `make bench` (image import): `node-vmm image-import` of a file from a
//! loopback HTTP server (the agent's code path: streamed to a partial file,
//! SHA-256 over every byte, format detection, commit into the cache) beside
//! `curl` of the same file from the same server to disk, and `curl` followed
//! by `sha256sum` (what a checksum-verified download costs with standard
//! tools). Goal (DESIGN.md): ≥ 80 % of curl's rate, checksum included.
//! Prints figures, asserts nothing.

// Byte counts shown as MiB/s.
#![allow(clippy::cast_precision_loss)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kubevmm_e2e::bin_path;
use kubevmm_e2e::http_server::{FileServer, Served};

const SIZE: usize = 512 << 20;
const RUNS: usize = 3;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn timed(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

fn rate(d: Duration) -> f64 {
    SIZE as f64 / f64::from(1 << 20) / d.as_secs_f64()
}

fn main() {
    let dir = std::env::temp_dir().join(format!("kubevmm-bench-import-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("image.raw");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let data: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&file, &data).expect("write");
    drop(data);
    let sha = String::from_utf8_lossy(
        &Command::new("sha256sum")
            .arg(&file)
            .output()
            .expect("sha256sum")
            .stdout,
    )
    .split_whitespace()
    .next()
    .unwrap_or_default()
    .to_string();
    let srv = FileServer::start().expect("server");
    srv.serve(
        "image.raw",
        Served {
            file: file.clone(),
            ..Served::default()
        },
    );
    let url = srv.url("image.raw");
    let out: &Path = &dir.join("curl.out");
    let node_vmm = bin_path("node-vmm");

    let (mut curl, mut curl_sha, mut ours) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..RUNS {
        let _ = std::fs::remove_file(out);
        curl.push(timed(
            Command::new("curl").args(["-sf", "-o"]).arg(out).arg(&url),
        ));
        let _ = std::fs::remove_file(out);
        let t = Instant::now();
        timed(Command::new("curl").args(["-sf", "-o"]).arg(out).arg(&url));
        timed(Command::new("sha256sum").arg(out));
        curl_sha.push(t.elapsed());
        let state = dir.join(format!("state-{i}"));
        ours.push(timed(
            Command::new(&node_vmm)
                .args(["image-import", "--sha256", &sha, "--state-dir"])
                .arg(&state)
                .arg(&url),
        ));
        let _ = std::fs::remove_dir_all(&state);
    }
    let (c, cs, o) = (median(curl), median(curl_sha), median(ours));
    println!(
        "image import over http from a loopback server, {} MiB, median of {RUNS}",
        SIZE >> 20
    );
    println!(
        "  curl -o FILE                       {:8.1} MiB/s  ({:.2} s)",
        rate(c),
        c.as_secs_f64()
    );
    println!(
        "  curl -o FILE && sha256sum FILE     {:8.1} MiB/s  ({:.2} s)",
        rate(cs),
        cs.as_secs_f64()
    );
    println!(
        "  node-vmm image-import (sha256)     {:8.1} MiB/s  ({:.2} s)  = {:.0} % of curl (goal >= 80 %)",
        rate(o),
        o.as_secs_f64(),
        100.0 * c.as_secs_f64() / o.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
