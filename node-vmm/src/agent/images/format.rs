//! Image formats, detected from the bytes, never from the name (DESIGN.md,
//! "Storage"). Pure: [`detect`] takes the first bytes of a file and its
//! length and says `raw` or `qcow2` (with the qcow2 header validated and the
//! virtual size read), or why the file cannot be used. Every field of a
//! qcow2 header that the rest of the system relies on is bounded here, so
//! a hostile header is refused before anything else opens the file.

use kubevmm_crds::image::ImageFormat;

/// How many leading bytes [`detect`] wants (a qcow2 header fits in the
/// smallest cluster; the backing file name must lie within it too).
pub const PROBE_LEN: usize = 64 * 1024;

/// `QFI\xfb`.
const QCOW_MAGIC: u32 = 0x5146_49fb;
/// Size of a version 2 header; version 3 adds 32 bytes (104).
const V2_HEADER: u32 = 72;
const V3_HEADER: u32 = 104;
/// Bounds from the qcow2 specification (QEMU refuses outside them too).
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on the backing file name.
const MAX_BACKING_NAME: u32 = 1023;
/// Largest virtual size we accept: 64 PiB (QEMU's own limit is 2^61 bytes
/// on paper; this keeps every offset computation far from overflow).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;

/// Incompatible feature bits we can use (the qcow2 crate of the VMM reads
/// them): 0 dirty (refcounts are rebuilt on open, data is intact), 3
/// compression type (zlib or zstd clusters).
const SUPPORTED_INCOMPATIBLE: u64 = 1 << 0 | 1 << 3;

/// Names of the incompatible feature bits the specification defines.
fn incompatible_name(bit: u32) -> &'static str {
    match bit {
        0 => "dirty",
        1 => "corrupt",
        2 => "external data file",
        3 => "compression type",
        4 => "extended L2 entries",
        _ => "unknown",
    }
}

/// What [`detect`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatInfo {
    /// The format.
    pub format: ImageFormat,
    /// Size the guest sees: the file length for raw, the header's size for qcow2.
    pub virtual_size: u64,
    /// qcow2 version (2 or 3); 0 for raw.
    pub version: u32,
    /// log2 of the qcow2 cluster size; 0 for raw.
    pub cluster_bits: u32,
    /// The backing file a qcow2 names, if any.
    pub backing_file: Option<String>,
}

/// Why a file is not a usable image; `reason` is the condition reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// A qcow2 whose header is inconsistent or truncated.
    #[error("corrupt qcow2 header: {0}")]
    Corrupt(String),
    /// A valid file in a format or variant we do not run.
    #[error("unsupported image: {0}")]
    Unsupported(String),
}

impl FormatError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            FormatError::Corrupt(_) => "CorruptImage",
            FormatError::Unsupported(_) => "UnsupportedImage",
        }
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// Formats we recognise only to refuse them by name (they would otherwise
/// be taken for raw disks and hand the guest a container format).
fn foreign(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        Some("vmdk")
    } else if at(0, b"vhdxfile") {
        Some("vhdx")
    } else if at(0, b"conectix") {
        Some("vpc (vhd)")
    } else if at(0x40, &[0x7f, 0x10, 0xda, 0xbe]) {
        Some("vdi")
    } else if at(0, b"QED\0") {
        Some("qed")
    } else {
        None
    }
}

/// Detects the format of a file from its first bytes (`head`, up to
/// [`PROBE_LEN`]) and its length, validating a qcow2 header.
pub fn detect(head: &[u8], file_len: u64) -> Result<FormatInfo, FormatError> {
    if head.len() >= 4 && be32(head, 0) == QCOW_MAGIC {
        return qcow2(head, file_len);
    }
    if let Some(name) = foreign(head) {
        return Err(FormatError::Unsupported(format!(
            "{name} images are not supported; convert it to raw or qcow2 (qemu-img convert -O qcow2)"
        )));
    }
    Ok(FormatInfo {
        format: ImageFormat::Raw,
        virtual_size: file_len,
        version: 0,
        cluster_bits: 0,
        backing_file: None,
    })
}

/// The version 3 fields: incompatible features, refcount order, header length.
fn v3_header_len(h: &[u8], cluster: u64) -> Result<u32, FormatError> {
    if h.len() < V3_HEADER as usize {
        return Err(FormatError::Corrupt(format!(
            "{} bytes is too short for a version 3 header",
            h.len()
        )));
    }
    let unknown = be64(h, 72) & !SUPPORTED_INCOMPATIBLE;
    if unknown != 0 {
        let bit = unknown.trailing_zeros();
        return Err(FormatError::Unsupported(format!(
            "incompatible feature bit {bit} ({}) is set; this node cannot use the image",
            incompatible_name(bit)
        )));
    }
    let header_len = be32(h, 100);
    if header_len < V3_HEADER || header_len % 8 != 0 || u64::from(header_len) > cluster {
        return Err(FormatError::Corrupt(format!(
            "header_length {header_len} must be a multiple of 8 between {V3_HEADER} and the cluster size {cluster}"
        )));
    }
    let order = be32(h, 96);
    if order > 6 {
        return Err(FormatError::Corrupt(format!(
            "refcount_order {order} is above 6"
        )));
    }
    Ok(header_len)
}

/// The backing file name of a qcow2, which must lie in the header cluster.
fn backing_file(
    h: &[u8],
    backing_offset: u64,
    backing_size: u32,
    header_len: u32,
    cluster: u64,
) -> Result<Option<String>, FormatError> {
    if backing_offset == 0 {
        if backing_size != 0 {
            return Err(FormatError::Corrupt(format!(
                "backing_file_size {backing_size} without a backing_file_offset"
            )));
        }
        Ok(None)
    } else {
        if backing_size == 0 || backing_size > MAX_BACKING_NAME {
            return Err(FormatError::Corrupt(format!(
                "backing_file_size {backing_size} is outside 1..={MAX_BACKING_NAME}"
            )));
        }
        let end = backing_offset + u64::from(backing_size);
        if backing_offset < u64::from(header_len) || end > cluster || end > h.len() as u64 {
            return Err(FormatError::Corrupt(format!(
                "backing file name at {backing_offset}..{end} is not inside the header cluster"
            )));
        }
        let name = &h[backing_offset as usize..end as usize];
        let name = std::str::from_utf8(name)
            .map_err(|_| FormatError::Corrupt("backing file name is not UTF-8".into()))?;
        Ok(Some(name.to_string()))
    }
}

/// Validates a qcow2 header (magic already matched).
fn qcow2(h: &[u8], file_len: u64) -> Result<FormatInfo, FormatError> {
    let corrupt = |s: String| Err(FormatError::Corrupt(s));
    let unsupported = |s: String| Err(FormatError::Unsupported(s));
    if h.len() < 8 {
        return corrupt(format!("{} bytes is too short for a header", h.len()));
    }
    let version = be32(h, 4);
    if !(2..=3).contains(&version) {
        return unsupported(format!(
            "qcow2 version {version}; only versions 2 and 3 are supported"
        ));
    }
    if h.len() < V2_HEADER as usize {
        return corrupt(format!(
            "{} bytes is too short for a version {version} header",
            h.len()
        ));
    }
    let backing_offset = be64(h, 8);
    let backing_size = be32(h, 16);
    let cluster_bits = be32(h, 20);
    let size = be64(h, 24);
    let crypt = be32(h, 32);
    let l1_size = be32(h, 36);
    let l1_offset = be64(h, 40);
    let refcount_offset = be64(h, 48);
    let refcount_clusters = be32(h, 56);
    let snapshots = be32(h, 60);
    let snapshots_offset = be64(h, 64);

    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return corrupt(format!(
            "cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
        ));
    }
    let cluster = 1u64 << cluster_bits;
    let header_len = if version == 3 {
        v3_header_len(h, cluster)?
    } else {
        V2_HEADER
    };
    if crypt != 0 {
        return unsupported(format!(
            "encrypted qcow2 (crypt_method {crypt}); import an unencrypted image"
        ));
    }
    if size > MAX_VIRTUAL_SIZE {
        return unsupported(format!(
            "virtual size {size} bytes is above the {MAX_VIRTUAL_SIZE}-byte limit"
        ));
    }
    // Each L1 entry maps an L2 table of cluster/8 entries of one cluster each.
    let per_l1 = cluster * (cluster / 8);
    let l1_needed = size.div_ceil(per_l1);
    if u64::from(l1_size) < l1_needed {
        return corrupt(format!(
            "l1_size {l1_size} cannot map the virtual size {size} (needs {l1_needed})"
        ));
    }
    let aligned = |off: u64| off % cluster == 0;
    let inside = |off: u64, len: u64| off.checked_add(len).is_some_and(|end| end <= file_len);
    if l1_size > 0
        && (!aligned(l1_offset) || l1_offset == 0 || !inside(l1_offset, u64::from(l1_size) * 8))
    {
        return corrupt(format!(
            "L1 table at {l1_offset} ({l1_size} entries) is unaligned or beyond the end of the file ({file_len} bytes)"
        ));
    }
    if refcount_clusters == 0
        || !aligned(refcount_offset)
        || refcount_offset == 0
        || !inside(refcount_offset, u64::from(refcount_clusters) * cluster)
    {
        return corrupt(format!(
            "refcount table at {refcount_offset} ({refcount_clusters} clusters) is unaligned, empty or beyond the end of the file"
        ));
    }
    if snapshots > 0
        && (snapshots_offset % 8 != 0 || !inside(snapshots_offset, 0) || snapshots_offset == 0)
    {
        return corrupt(format!("snapshot table at {snapshots_offset} is invalid"));
    }
    let backing_file = backing_file(h, backing_offset, backing_size, header_len, cluster)?;
    Ok(FormatInfo {
        format: ImageFormat::Qcow2,
        virtual_size: size,
        version,
        cluster_bits,
        backing_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A valid v3 header of a 1 GiB image with 64 KiB clusters, padded to
    /// one cluster; the L1 table at cluster 3, refcount table at cluster 1.
    fn v3() -> Vec<u8> {
        let mut h = vec![0u8; 65536];
        let put32 =
            |h: &mut Vec<u8>, at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
        put32(&mut h, 0, QCOW_MAGIC);
        put32(&mut h, 4, 3);
        put32(&mut h, 20, 16);
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        put32(&mut h, 36, 2);
        h[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        h[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
        put32(&mut h, 56, 1);
        put32(&mut h, 96, 4);
        put32(&mut h, 100, 112);
        h
    }

    const LEN: u64 = 4 << 16;

    fn set32(mut h: Vec<u8>, at: usize, v: u32) -> Vec<u8> {
        h[at..at + 4].copy_from_slice(&v.to_be_bytes());
        h
    }

    fn set64(mut h: Vec<u8>, at: usize, v: u64) -> Vec<u8> {
        h[at..at + 8].copy_from_slice(&v.to_be_bytes());
        h
    }

    #[test]
    fn detects_raw_and_qcow2() {
        let raw = detect(b"\x7fELF\x02\x01\x01", 4096).unwrap();
        assert_eq!((raw.format, raw.virtual_size), (ImageFormat::Raw, 4096));
        assert_eq!(detect(&[], 0).unwrap().format, ImageFormat::Raw);
        let q = detect(&v3(), LEN).unwrap();
        assert_eq!(q.format, ImageFormat::Qcow2);
        assert_eq!(
            (q.virtual_size, q.version, q.cluster_bits),
            (1 << 30, 3, 16)
        );
        assert_eq!(q.backing_file, None);
        // Version 2: no v3 fields are read.
        let v2 = set32(set32(v3(), 4, 2), 72, 0xffff_ffff);
        assert_eq!(detect(&v2, LEN).unwrap().version, 2);
        let mut back = set32(set64(v3(), 8, 512), 16, 8);
        back[512..520].copy_from_slice(b"base.img");
        assert_eq!(
            detect(&back, LEN).unwrap().backing_file.as_deref(),
            Some("base.img")
        );
    }

    #[test]
    #[allow(clippy::too_many_lines)] // one table
    fn refuses_bad_headers_naming_the_field() {
        let cases: Vec<(&str, Vec<u8>, u64, &str)> = vec![
            (
                "truncated",
                v3()[..50].to_vec(),
                LEN,
                "too short for a version 3 header",
            ),
            (
                "v3 truncated",
                v3()[..90].to_vec(),
                LEN,
                "too short for a version 3 header",
            ),
            ("version 1", set32(v3(), 4, 1), LEN, "qcow2 version 1"),
            ("version 4", set32(v3(), 4, 4), LEN, "qcow2 version 4"),
            (
                "cluster 8",
                set32(v3(), 20, 8),
                LEN,
                "cluster_bits 8 is outside 9..=21",
            ),
            ("cluster 22", set32(v3(), 20, 22), LEN, "cluster_bits 22"),
            (
                "feature bit 5",
                set64(v3(), 72, 1 << 5),
                LEN,
                "incompatible feature bit 5 (unknown)",
            ),
            (
                "corrupt bit",
                set64(v3(), 72, 1 << 1 | 1),
                LEN,
                "incompatible feature bit 1 (corrupt)",
            ),
            (
                "external data",
                set64(v3(), 72, 1 << 2),
                LEN,
                "incompatible feature bit 2 (external data file)",
            ),
            (
                "bit 63",
                set64(v3(), 72, 1 << 63),
                LEN,
                "incompatible feature bit 63",
            ),
            (
                "header len",
                set32(v3(), 100, 100),
                LEN,
                "header_length 100",
            ),
            (
                "header len odd",
                set32(v3(), 100, 113),
                LEN,
                "header_length 113",
            ),
            (
                "refcount order",
                set32(v3(), 96, 7),
                LEN,
                "refcount_order 7",
            ),
            ("encrypted", set32(v3(), 32, 1), LEN, "encrypted qcow2"),
            ("huge", set64(v3(), 24, u64::MAX), LEN, "virtual size"),
            (
                "l1 small",
                set64(v3(), 24, 1 << 40),
                LEN,
                "l1_size 2 cannot map",
            ),
            ("l1 beyond", v3(), 3 << 16, "L1 table at 196608"),
            ("l1 unaligned", set64(v3(), 40, 100), LEN, "L1 table at 100"),
            ("no refcounts", set32(v3(), 56, 0), LEN, "refcount table"),
            (
                "backing size w/o offset",
                set32(v3(), 16, 4),
                LEN,
                "backing_file_size 4 without",
            ),
            (
                "backing too long",
                set32(set64(v3(), 8, 512), 16, 4096),
                LEN,
                "backing_file_size 4096",
            ),
            (
                "backing in header",
                set32(set64(v3(), 8, 64), 16, 4),
                LEN,
                "backing file name at 64..68",
            ),
            (
                "backing past cluster",
                set32(set64(v3(), 8, 65530), 16, 10),
                LEN,
                "not inside the header cluster",
            ),
        ];
        for (what, h, len, want) in cases {
            let e = detect(&h, len).unwrap_err();
            assert!(e.to_string().contains(want), "{what}: {e}");
        }
        let e = detect(&set64(v3(), 72, 1 << 5), LEN).unwrap_err();
        assert_eq!(e.reason(), "UnsupportedImage");
        assert_eq!(
            detect(&set32(v3(), 20, 30), LEN).unwrap_err().reason(),
            "CorruptImage"
        );
    }

    #[test]
    fn refuses_foreign_formats_by_name() {
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        for (head, name) in [
            (b"KDMV\x01\0\0\0".to_vec(), "vmdk"),
            (b"vhdxfile".to_vec(), "vhdx"),
            (b"conectix".to_vec(), "vpc"),
            (b"QED\0".to_vec(), "qed"),
            (vdi, "vdi"),
        ] {
            let e = detect(&head, 1 << 20).unwrap_err();
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    /// Headers written by the real `qemu-img` (skipped where it is missing).
    #[test]
    fn accepts_what_qemu_img_writes_and_names_what_it_refuses() {
        let dir = std::env::temp_dir().join(format!("kubevmm-fmt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mk = |name: &str, opts: &[&str]| {
            let p = dir.join(name);
            let ok = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .args(opts)
                .arg(&p)
                .arg("3G")
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| {
                let b = std::fs::read(&p).unwrap();
                detect(&b[..b.len().min(PROBE_LEN)], b.len() as u64)
            })
        };
        let Some(v3) = mk("v3.qcow2", &[]) else {
            eprintln!("qemu-img not found: skipped");
            return;
        };
        assert_eq!(v3.unwrap().virtual_size, 3 << 30);
        let v2 = mk("v2.qcow2", &["-o", "compat=0.10"]).unwrap().unwrap();
        assert_eq!((v2.version, v2.virtual_size), (2, 3 << 30));
        let small = mk("c512.qcow2", &["-o", "cluster_size=512"])
            .unwrap()
            .unwrap();
        assert_eq!(small.cluster_bits, 9);
        let zstd = mk("zstd.qcow2", &["-o", "compression_type=zstd"]).unwrap();
        assert!(zstd.is_ok(), "{zstd:?}");
        let l2 = mk("l2.qcow2", &["-o", "extended_l2=on"])
            .unwrap()
            .unwrap_err();
        assert!(
            l2.to_string()
                .contains("incompatible feature bit 4 (extended L2 entries)"),
            "{l2}"
        );
        let base = dir.join("v3.qcow2").display().to_string();
        let child = mk("child.qcow2", &["-F", "qcow2", "-b", &base])
            .unwrap()
            .unwrap();
        assert_eq!(child.backing_file.as_deref(), Some(base.as_str()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    proptest! {
        #[test]
        fn random_headers_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..300), v in 0u32..5, bits in 0u32..40, len in any::<u64>()) {
            // Half the cases carry the magic and a plausible version, so the
            // qcow2 path is explored beyond the first check.
            if bytes.len() >= 24 && v > 0 {
                bytes[0..4].copy_from_slice(&QCOW_MAGIC.to_be_bytes());
                bytes[4..8].copy_from_slice(&v.to_be_bytes());
                bytes[20..24].copy_from_slice(&bits.to_be_bytes());
            }
            if let Ok(info) = detect(&bytes, len) {
                prop_assert!(info.virtual_size <= MAX_VIRTUAL_SIZE || info.format == ImageFormat::Raw);
            }
        }

        #[test]
        fn mutated_valid_headers_never_panic(at in 0usize..112, byte in any::<u8>(), len in 0u64..(1 << 20)) {
            let mut h = v3();
            h[at] = byte;
            let _ = detect(&h, len);
        }
    }
}
