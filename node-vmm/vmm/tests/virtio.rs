//! virtio devices on the real /dev/kvm: virtio-blk (read, write, flush,
//! discard, read-only, serial) and virtio-rng.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use kubevmm_vmm::config::DiskConfig;
use kubevmm_vmm::exit::code;

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// A 1 MiB disk with pseudo-random content; returns (path, crc32 of 64 KiB).
fn make_disk(dir: &std::path::Path) -> (std::path::PathBuf, u32) {
    let mut x = 0x1234_5678u32;
    let bytes: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
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
    }
}

#[test]
fn blk_reads_writes_flushes_and_discards() {
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
    assert!(out.serial.contains("blk test passed"), "{out:?}");
    // The host sees the guest's write at sector 200 and the discarded zeroes.
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

#[test]
fn rng_returns_random_bytes() {
    let dir = scratch("rng");
    let mut c = config("rng", &dir);
    c.rng = true;
    let out = run(&c, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    assert!(out.serial.contains("rng test passed"), "{out:?}");
}
