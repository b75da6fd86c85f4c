//! virtio devices on the real /dev/kvm: virtio-blk (read, write, flush,
//! discard, write-zeroes, read-only, serial) and virtio-rng.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use kubevmm_vmm::config::DiskConfig;
use kubevmm_vmm::exit::code;

/// 1 MiB of pseudo-random bytes.
fn disk_bytes() -> Vec<u8> {
    let mut x = 0x1234_5678u32;
    (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A 1 MiB disk of `disk_bytes`; returns (path, crc32 of 64 KiB).
fn make_disk(dir: &std::path::Path) -> (std::path::PathBuf, u32) {
    let bytes = disk_bytes();
    let path = dir.join("disk.img");
    std::fs::write(&path, &bytes).unwrap();
    (path, crc32(&bytes[..64 * 1024]))
}

fn disk(path: &std::path::Path, read_only: bool) -> DiskConfig {
    DiskConfig {
        id: "data".into(),
        path: path.to_owned(),
        read_only,
        serial: Some("KVMM-SERIAL-0001".into()),
        fd: None,
        backing_fds: Vec::new(),
        format: None,
    }
}

#[test]
fn blk_reads_writes_flushes_discards_and_writes_zeroes() {
    let dir = scratch("blk");
    let (path, crc) = make_disk(&dir);
    let mut c = config("blk", &dir);
    c.disks.push(disk(&path, false));
    let out = run(&c, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    assert!(out.serial.contains("capacity 2048 sectors"), "{out:?}");
    assert!(
        out.serial.contains(&format!("disk crc32 {crc:#018x}")),
        "crc {crc:#x}: {out:?}"
    );
    assert!(
        out.serial.contains("disk serial KVMM-SERIAL-0001"),
        "{out:?}"
    );
    assert!(out.serial.contains("discard ok"), "{out:?}");
    assert!(out.serial.contains("write-zeroes ok"), "{out:?}");
    assert!(out.serial.contains("blk test passed"), "{out:?}");
    // The host sees the guest's write at sector 200, the discarded zeroes
    // and the written ones (sectors 320..327 and 1024..1279), and the
    // bytes between them untouched.
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 1 << 20, "the disk changed size");
    for (from, to) in [(320 * 512, 328 * 512), (1024 * 512, 1280 * 512)] {
        assert!(
            bytes[from..to].iter().all(|&b| b == 0),
            "zeroed range {from}..{to} not zero"
        );
    }
    let original = disk_bytes();
    assert_eq!(bytes[308 * 512..320 * 512], original[308 * 512..320 * 512]);
    assert_eq!(bytes[1280 * 512..], original[1280 * 512..]);
    let f = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 200 * 512).unwrap();
    for (i, b) in buf.iter().enumerate() {
        assert_eq!(
            *b,
            0x5au8.wrapping_add((i as u8).wrapping_mul(7)),
            "byte {i}"
        );
    }
    f.read_exact_at(&mut buf, 300 * 512).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "discarded range not zero");
}

#[test]
fn blk_read_only_refuses_writes() {
    let dir = scratch("blk-ro");
    let (path, crc) = make_disk(&dir);
    let before = std::fs::read(&path).unwrap();
    let mut c = config("blk", &dir);
    c.cmdline = "ro".into();
    c.disks.push(disk(&path, true));
    let out = run(&c, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    assert!(
        out.serial.contains(&format!("disk crc32 {crc:#018x}")),
        "{out:?}"
    );
    assert!(out.serial.contains("read-only write refused"), "{out:?}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "read-only disk changed"
    );
}

/// The flushed write is in the file after a SIGKILL. This alone would pass
/// without any fdatasync (the page cache survives the VMM); the order of
/// fdatasync and completion is proven by
/// `flush_reaches_the_disk_before_the_guest_sees_it_complete`.
#[test]
fn flushed_write_survives_kill_9() {
    let dir = scratch("blk-kill");
    let (path, _) = make_disk(&dir);
    let mut c = config("blk", &dir);
    c.cmdline = "hold".into();
    c.disks.push(disk(&path, false));
    let mut child = spawn(&c, &dir);
    wait_for("the guest's flush", || {
        serial_log(&dir).contains("flushed").then_some(())
    });
    // SIGKILL: no chance for the VMM to write anything after the flush completed.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "VMM should have died from SIGKILL");
    let f = std::fs::File::open(&path).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 200 * 512).unwrap();
    assert!(
        buf.iter()
            .enumerate()
            .all(|(i, &b)| b == 0x5au8.wrapping_add((i as u8).wrapping_mul(7))),
        "flushed write lost"
    );
}

/// The VMM's syscalls under strace, one per line (`-f -y`: every thread,
/// file descriptors with their paths).
fn strace_lines(trace: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(trace)
        .unwrap_or_else(|e| panic!("no strace output at {}: {e}", trace.display()))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Index of the line whose write to serial.log starts `text` (the console
/// is written a byte or a few at a time).
fn serial_write_line(lines: &[String], text: &str) -> Option<usize> {
    let mut stream = String::new();
    let mut owner = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(rest) = l.split_once("serial.log>, \"").map(|x| x.1) else {
            continue;
        };
        if !l.contains("write(") {
            continue;
        }
        let Some(end) = rest.find("\", ") else {
            continue;
        };
        for c in rest[..end].chars() {
            stream.push(c);
            owner.push(i);
        }
    }
    stream.find(text).map(|at| owner[at])
}

/// A FLUSH must reach the disk (fdatasync) before the guest sees it
/// complete. Ordered by tracing the VMM: the guest prints "flushed" only
/// after the used ring says so, so the fdatasync of the disk must return
/// before the first byte of "flushed" is written to the console. (Killing
/// the VMM, as above, cannot tell: the page cache survives a SIGKILL.)
#[test]
fn flush_reaches_the_disk_before_the_guest_sees_it_complete() {
    let which = std::process::Command::new("strace").arg("-V").output();
    assert!(
        which.is_ok_and(|o| o.status.success()),
        "strace is missing: run hack/install-deps.sh (apt-get install strace)"
    );
    let dir = scratch("blk-flush-order");
    let (path, _) = make_disk(&dir);
    let trace = dir.join("strace.log");
    let mut c = config("blk", &dir);
    c.disks.push(disk(&path, false));
    let mut cmd = std::process::Command::new("strace");
    cmd.args([
        "-f",
        "-y",
        "-qq",
        "-e",
        "trace=fdatasync,fsync,pwrite64,write",
        "-o",
    ])
    .arg(&trace)
    .arg(vmm_bin());
    let out = wait(spawn_with(cmd, &c, &dir, "vm.json"), &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    assert!(out.serial.contains("flushed"), "{out:?}");
    let lines = strace_lines(&trace);
    let disk_name = "disk.img>";
    // The guest's write: 4 KiB at sector 200.
    let write = lines
        .iter()
        .position(|l| {
            l.contains("pwrite64(") && l.contains(disk_name) && l.contains(", 4096, 102400")
        })
        .unwrap_or_else(|| {
            panic!(
                "no pwrite64 of sector 200 in the trace:\n{}",
                lines.join("\n")
            )
        });
    // The flush: fdatasync of the disk, returned 0 (possibly resumed on a
    // later line when another thread's syscall came in between).
    let synced = lines
        .iter()
        .skip(write)
        .position(|l| {
            (l.contains("fdatasync(") && l.contains(disk_name) && l.ends_with("= 0"))
                || (l.contains("<... fdatasync resumed>") && l.ends_with("= 0"))
        })
        .map_or_else(
            || {
                panic!(
                    "no fdatasync of the disk after its write:\n{}",
                    lines.join("\n")
                )
            },
            |i| write + i,
        );
    let flushed = serial_write_line(&lines, "flushed").unwrap_or_else(|| {
        panic!(
            "no \"flushed\" on the console in the trace:\n{}",
            lines.join("\n")
        )
    });
    assert!(
        write < synced && synced < flushed,
        "pwrite64 at line {write}, fdatasync returned at line {synced}, \"flushed\" at line {flushed}:\n{}",
        lines[write.min(synced).min(flushed)..=write.max(synced).max(flushed)].join("\n")
    );
}

#[test]
fn rng_returns_random_bytes() {
    let dir = scratch("rng");
    let mut c = config("rng", &dir);
    c.rng = true;
    let out = run(&c, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    assert!(out.serial.contains("rng test passed"), "{out:?}");
}
