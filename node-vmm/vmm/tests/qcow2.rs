//! virtio-blk on qcow2 images on the real /dev/kvm, checked against what
//! `qemu-img` (what users trust) says of the same files: the blk test guest
//! reads 64 KiB at eight places spanning compressed, allocated and
//! unallocated clusters and prints their CRC32, which must equal the CRC32
//! of the same bytes in `qemu-img convert -O raw`; its flushed writes
//! survive SIGKILL; its discards and write-zeroes read back as zeroes;
//! `qemu-img check` stays clean; backing files never change.

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use kubevmm_vmm::config::DiskConfig;
use kubevmm_vmm::exit::code;
use kubevmm_vmm::image::create_overlay;

const MIB: usize = 1 << 20;
/// Image size: the guest's eight regions and room past them.
const SIZE: usize = 9 * MIB;
const REGIONS: usize = 8;
const REGION_LEN: usize = 64 * 1024;
const REGION_SKEW: usize = 12 * 1024;

/// Runs a tool, failing the test with its output on error; returns stdout.
fn tool(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The base's bytes, per MiB: compressible text-like data (compressed
/// clusters once `convert -c` ran), pseudo-random data (stored as normal
/// clusters: it does not compress) and zeroes (holes).
fn base_bytes() -> Vec<u8> {
    let mut x = 0x9e37_79b9u32;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    };
    let mut v = vec![0u8; SIZE];
    for (mib, chunk) in v.chunks_mut(MIB).enumerate() {
        match mib {
            1 | 7 => chunk.iter_mut().for_each(|b| *b = rnd()),
            2 | 5 => {}
            4 => chunk[..MIB / 2].iter_mut().for_each(|b| *b = rnd()),
            _ => {
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = b"kubevmm qcow2 test pattern "[i % 27] ^ (mib as u8) ^ ((i >> 12) as u8);
                }
            }
        }
    }
    v
}

/// `base.raw` and `comp.qcow2` (`qemu-img convert -c` of it) in `dir`.
fn make_images(dir: &Path) -> (PathBuf, PathBuf) {
    let raw = dir.join("base.raw");
    std::fs::write(&raw, base_bytes()).unwrap();
    let comp = dir.join("comp.qcow2");
    tool(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&comp),
        ],
    );
    (raw, comp)
}

/// The image has compressed clusters, normal data clusters and holes (so
/// the guest's regions really cover all three).
fn assert_mixed_layout(image: &Path) {
    let map: serde_json::Value =
        serde_json::from_str(&tool("qemu-img", &["map", "--output=json", s(image)])).unwrap();
    let entries = map.as_array().unwrap();
    let has = |f: &dyn Fn(&serde_json::Value) -> bool| entries.iter().any(f);
    // A compressed extent has no host offset to map to (qemu-img 8 also
    // says `"compressed": true`; 7.2 only leaves the offset out).
    let compressed = |e: &serde_json::Value| {
        e["data"] == true && (e["compressed"] == true || e.get("offset").is_none())
    };
    assert!(has(&compressed), "no compressed cluster: {map}");
    assert!(
        has(&|e| e["data"] == true && !compressed(e)),
        "no plain data cluster: {map}"
    );
    assert!(has(&|e| e["data"] == false), "no hole: {map}");
}

/// The guest's view as `qemu-img convert -O raw` gives it.
fn host_view(image: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("host-view.raw");
    tool("qemu-img", &["convert", "-O", "raw", s(image), s(&out)]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// The lines the guest must print for `view`.
fn region_lines(view: &[u8]) -> Vec<String> {
    (0..REGIONS)
        .map(|i| {
            let at = i * MIB + REGION_SKEW;
            let crc = crc32(&view[at..at + REGION_LEN]);
            format!("region {i} crc32 {crc:#018x}")
        })
        .collect()
}

fn assert_regions(serial: &str, view: &[u8]) {
    for line in region_lines(view) {
        assert!(serial.contains(&line), "want {line:?} in:\n{serial}");
    }
}

/// Byte ranges the blk guest zeroes with `WRITE_ZEROES`: sectors inside a
/// cluster, and two whole 64 KiB clusters.
const ZEROED: [(usize, usize); 2] = [(320 * 512, 328 * 512), (1024 * 512, 1280 * 512)];

/// The guest's write at sector 200 (and, unless it was killed first, the
/// discarded zeroes at sector 300 and the written ones) as qemu-img sees
/// them.
fn assert_guest_writes(image: &Path, dir: &Path, discarded: bool) {
    let view = host_view(image, dir);
    for (i, b) in view[200 * 512..200 * 512 + 4096].iter().enumerate() {
        assert_eq!(
            *b,
            0x5au8.wrapping_add((i as u8).wrapping_mul(7)),
            "byte {i} of the guest's write"
        );
    }
    if discarded {
        assert!(
            view[300 * 512..308 * 512].iter().all(|&b| b == 0),
            "discarded range not zero"
        );
        for (from, to) in ZEROED {
            assert!(
                view[from..to].iter().all(|&b| b == 0),
                "zeroed range {from}..{to} not zero"
            );
        }
    }
}

/// The guest said its discard and write-zeroes read back as zeroes.
fn assert_zeroes_ok(out: &Outcome) {
    assert!(out.serial.contains("discard ok"), "{out:?}");
    assert!(out.serial.contains("write-zeroes ok"), "{out:?}");
    assert!(out.serial.contains("blk test passed"), "{out:?}");
}

/// qemu-img maps the guest's zeroed whole clusters as zeroes of the
/// overlay itself (depth 0), not as the backing file's data.
fn assert_zero_clusters_in_top(image: &Path) {
    let map: serde_json::Value =
        serde_json::from_str(&tool("qemu-img", &["map", "--output=json", s(image)])).unwrap();
    let (from, to) = (ZEROED[1].0 as u64, ZEROED[1].1 as u64);
    let mut covered = 0;
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (a, b) = (start.max(from), (start + len).min(to));
        if a < b {
            assert!(
                e["zero"] == true && e["data"] == false && e["depth"] == 0,
                "zeroed clusters {from}..{to} mapped as {e}"
            );
            covered += b - a;
        }
    }
    assert_eq!(covered, to - from, "{map}");
}

fn assert_check_clean(image: &Path) {
    let out = tool("qemu-img", &["check", s(image)]);
    assert!(out.contains("No errors were found"), "{out}");
    assert!(!out.contains("leaked"), "{out}");
}

fn sha256(p: &Path) -> String {
    tool("sha256sum", &[s(p)])
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// A new, empty file opened for reading and writing (what `create_overlay`
/// needs).
fn create_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(p)
        .unwrap()
}

/// Opens `p` and lets children inherit the descriptor; returns the file
/// (keep it until the VMM started) and its number.
fn inherited(p: &Path, write: bool) -> (File, i32) {
    let f = OpenOptions::new().read(true).write(write).open(p).unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on our own open descriptor, clearing FD_CLOEXEC.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    (f, fd)
}

fn disk(path: &Path, read_only: bool) -> DiskConfig {
    DiskConfig {
        id: "data".into(),
        path: path.to_owned(),
        read_only,
        serial: Some("KVMM-QCOW2".into()),
        fd: None,
        backing_fds: Vec::new(),
        format: None,
    }
}

/// Boots the blk guest with `cmdline` on `d`; expects it to pass.
fn run_blk(dir: &Path, cmdline: &str, d: DiskConfig) -> Outcome {
    let mut c = config("blk", dir);
    c.cmdline = cmdline.into();
    c.disks.push(d);
    let out = run(&c, dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    assert!(
        out.serial
            .contains(&format!("capacity {} sectors", SIZE / 512)),
        "{out:?}"
    );
    out
}

#[test]
fn raw_and_compressed_qcow2_read_like_qemu_img_and_keep_writes() {
    let dir = scratch("qcow2-rw");
    let (raw, comp) = make_images(&dir);
    assert_mixed_layout(&comp);
    let expected = host_view(&comp, &dir);
    assert_eq!(expected, base_bytes(), "qemu-img's view of the base");
    for image in [&raw, &comp] {
        let out = run_blk(&dir, "regions", disk(image, false));
        assert_regions(&out.serial, &expected);
        assert_zeroes_ok(&out);
        assert_guest_writes(image, &dir, true);
    }
    assert_check_clean(&comp);
    // The write landed in a compressed cluster: still clean, and the rest
    // of that cluster kept its bytes.
    let after = host_view(&comp, &dir);
    assert_eq!(after[..200 * 512], expected[..200 * 512]);
    assert_eq!(after[MIB..], expected[MIB..]);
}

/// A read-only disk is opened read-only: an `O_RDONLY` fd of a qcow2 is
/// enough, the guest is refused writes and the file does not change.
#[test]
fn a_read_only_qcow2_needs_no_write_access_and_never_changes() {
    let dir = scratch("qcow2-ro");
    let (_, comp) = make_images(&dir);
    let before = sha256(&comp);
    let expected = host_view(&comp, &dir);
    let (_keep, fd) = inherited(&comp, false);
    let mut d = disk(Path::new("/nonexistent"), true);
    d.fd = Some(fd);
    let out = run_blk(&dir, "ro regions", d);
    assert_regions(&out.serial, &expected);
    assert!(out.serial.contains("read-only write refused"), "{out:?}");
    assert_eq!(sha256(&comp), before);
}

/// A three-file chain handed over as fds only (the VMM is given paths that
/// do not exist): overlay from `create_overlay` -> overlay from `qemu-img
/// create` with clusters of its own -> compressed base. The guest reads
/// what qemu-img reads; its flushed write survives SIGKILL, `qemu-img
/// check` is clean, and neither backing file changes.
#[test]
fn flushed_write_to_an_overlay_chain_survives_kill_9() {
    let dir = scratch("qcow2-chain");
    let (_, comp) = make_images(&dir);
    let mid = dir.join("mid.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "comp.qcow2",
            "-F",
            "qcow2",
            s(&mid),
        ],
    );
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x77 3M 128k",
            "-c",
            "write -z 6M 64k",
            s(&mid),
        ],
    );
    let top = dir.join("top.qcow2");
    let size = create_overlay(&create_rw(&top), &File::open(&mid).unwrap(), "mid.qcow2").unwrap();
    assert_eq!(size, SIZE as u64);
    let info = tool("qemu-img", &["info", "--backing-chain", s(&top)]);
    assert!(info.contains("backing file: mid.qcow2"), "{info}");
    assert!(info.contains("backing file format: qcow2"), "{info}");
    assert_eq!(info.matches("image: ").count(), 3, "{info}");
    let expected = host_view(&top, &dir);
    assert_ne!(
        expected,
        base_bytes(),
        "the middle overlay has its own data"
    );
    let shas = (sha256(&mid), sha256(&comp));

    let (_t, top_fd) = inherited(&top, true);
    let (_m, mid_fd) = inherited(&mid, false);
    let (_b, base_fd) = inherited(&comp, false);
    let mut d = disk(Path::new("/nonexistent/top.qcow2"), false);
    d.fd = Some(top_fd);
    d.backing_fds = vec![mid_fd, base_fd];
    let mut c = config("blk", &dir);
    c.cmdline = "regions hold".into();
    c.disks.push(d);
    let mut child = spawn(&c, &dir);
    wait_for("the guest's flush", || {
        serial_log(&dir).contains("flushed").then_some(())
    });
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().code(), None, "killed by SIGKILL");
    assert_regions(&serial_log(&dir), &expected);
    assert_check_clean(&top);
    assert_guest_writes(&top, &dir, false);
    assert_eq!(
        (sha256(&mid), sha256(&comp)),
        shas,
        "a backing file changed"
    );
}

/// `create_overlay` over a raw base: the guest's whole blk test (write into
/// a cluster of the base, flush, discard) through a path, qemu-img agrees.
#[test]
fn an_overlay_from_create_overlay_over_raw_works_like_the_base() {
    let dir = scratch("qcow2-overlay");
    let (raw, _) = make_images(&dir);
    let sha = sha256(&raw);
    let top = dir.join("vm.qcow2");
    create_overlay(&create_rw(&top), &File::open(&raw).unwrap(), "base.raw").unwrap();
    let info = tool("qemu-img", &["info", "--backing-chain", s(&top)]);
    assert!(info.contains("backing file format: raw"), "{info}");
    assert_check_clean(&top);
    let (_b, base_fd) = inherited(&raw, false);
    let mut d = disk(&top, false);
    d.backing_fds = vec![base_fd];
    let out = run_blk(&dir, "regions", d);
    assert_regions(&out.serial, &base_bytes());
    assert_zeroes_ok(&out);
    assert_guest_writes(&top, &dir, true);
    assert_zero_clusters_in_top(&top);
    assert_check_clean(&top);
    assert_eq!(sha256(&raw), sha, "the base changed");
}

/// The VMM never opens a name found in a qcow2 header: without a backing
/// fd the disk is refused, naming it; a surplus fd is refused too.
#[test]
fn backing_files_must_be_handed_over_exactly() {
    let dir = scratch("qcow2-nobacking");
    let (raw, _) = make_images(&dir);
    let top = dir.join("vm.qcow2");
    create_overlay(&create_rw(&top), &File::open(&raw).unwrap(), "base.raw").unwrap();
    let mut c = config("blk", &dir);
    c.disks.push(disk(&top, false));
    let out = run(&c, &dir);
    assert_eq!(out.code, Some(code::VMM_ERROR), "{out:?}");
    assert!(
        out.stderr.contains("disk data")
            && out.stderr.contains("names backing file \"base.raw\"")
            && out.stderr.contains("no backing fd"),
        "{out:?}"
    );
    let (_b, fd) = inherited(&raw, false);
    let (_c, extra) = inherited(&raw, false);
    c.disks[0].backing_fds = vec![fd, extra];
    let out = run(&c, &dir);
    assert_eq!(out.code, Some(code::VMM_ERROR), "{out:?}");
    assert!(
        out.stderr
            .contains("disk data: 1 backing fd(s) handed over beyond"),
        "{out:?}"
    );
    // The base file is only ever read.
    assert_eq!(std::fs::read(&raw).unwrap(), base_bytes());
    let f = File::open(&top).unwrap();
    let mut magic = [0u8; 4];
    f.read_exact_at(&mut magic, 0).unwrap();
    assert_eq!(&magic, b"QFI\xfb");
}
