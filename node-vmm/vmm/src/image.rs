//! Disk image files: the format read from the bytes (never from the name),
//! the virtual size, and qcow2 overlay creation for the node agent.
//!
//! The agent calls [`create_overlay`] to make a VM's copy-on-write disk over
//! a cached base image, then hands both files to the VMM as fds
//! (`DiskConfig::fd` and `DiskConfig::backing_fds`). Nothing here opens a
//! path: every file is one the caller opened.

use std::fs::File;
use std::os::unix::fs::FileExt;

use imago::qcow2::Qcow2;
use imago::{FormatCreateBuilder, StorageOpenOptions};

/// First four bytes of every qcow2 file.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Offset of the virtual size (big-endian u64) in a qcow2 header.
const QCOW2_SIZE_OFFSET: u64 = 24;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read the image header: {0}")]
    Header(std::io::Error),
    #[error("cannot get the file size: {0}")]
    Size(std::io::Error),
    #[error("backing file name {0:?} must be 1 to 1023 bytes with no NUL")]
    BackingName(String),
    #[error("the backing file is empty: an overlay needs a size")]
    EmptyBacking,
    #[error("cannot empty the overlay file: {0}")]
    Truncate(std::io::Error),
    #[error("cannot write the qcow2 overlay: {0}")]
    Create(std::io::Error),
    #[error("cannot make the overlay durable: {0}")]
    Sync(std::io::Error),
}

/// A disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name qemu-img and the qcow2 backing-format extension use.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// The format from a file's first bytes: qcow2 when they hold its magic,
    /// raw otherwise.
    pub fn from_head(head: &[u8]) -> Self {
        if head.starts_with(&QCOW2_MAGIC) {
            ImageFormat::Qcow2
        } else {
            ImageFormat::Raw
        }
    }
}

/// Reads up to `buf.len()` bytes at `offset`; returns how many there were
/// (fewer only at the end of the file).
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The format of an open file, from its bytes. A file shorter than the magic
/// is raw.
pub fn detect(file: &File) -> Result<ImageFormat, ImageError> {
    let mut head = [0u8; 4];
    let n = read_at_most(file, &mut head, 0).map_err(ImageError::Header)?;
    Ok(ImageFormat::from_head(&head[..n]))
}

/// Bytes of a file or block device (whose metadata says 0).
pub fn file_size(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut f = file;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))
}

/// The size the guest sees: the file's size for raw, the header's for qcow2.
pub fn virtual_size(file: &File) -> Result<(ImageFormat, u64), ImageError> {
    match detect(file)? {
        ImageFormat::Raw => Ok((ImageFormat::Raw, file_size(file).map_err(ImageError::Size)?)),
        ImageFormat::Qcow2 => {
            let mut b = [0u8; 8];
            let n = read_at_most(file, &mut b, QCOW2_SIZE_OFFSET).map_err(ImageError::Header)?;
            if n < b.len() {
                return Err(ImageError::Header(std::io::Error::from(
                    std::io::ErrorKind::UnexpectedEof,
                )));
            }
            Ok((ImageFormat::Qcow2, u64::from_be_bytes(b)))
        }
    }
}

/// Makes `overlay` (a file open for reading and writing; its old contents
/// are dropped) a
/// qcow2 v3 image of the base's virtual size whose backing file is
/// `backing`, recorded as `backing_name` with the base's format (detected
/// from its bytes). `backing_name` is what `qemu-img` follows (relative
/// names resolve against the overlay's directory); the VMM never opens it,
/// it is handed the backing file as an fd. The overlay is synced before
/// this returns. Returns the virtual size.
pub fn create_overlay(
    overlay: &File,
    backing: &File,
    backing_name: &str,
) -> Result<u64, ImageError> {
    // The qcow2 header limits the backing file name to 1023 bytes.
    if backing_name.is_empty() || backing_name.len() > 1023 || backing_name.contains('\0') {
        return Err(ImageError::BackingName(backing_name.into()));
    }
    let (format, size) = virtual_size(backing)?;
    if size == 0 {
        return Err(ImageError::EmptyBacking);
    }
    overlay.set_len(0).map_err(ImageError::Truncate)?;
    let storage = overlay
        .try_clone()
        .and_then(|f| imago::file::File::from_open_file(f, StorageOpenOptions::new().write(true)))
        .map_err(ImageError::Create)?;
    Qcow2::<imago::file::File>::create_builder(storage)
        .backing(backing_name.into(), format.name().into())
        .size(size)
        .create()
        .map_err(ImageError::Create)?;
    overlay.sync_all().map_err(ImageError::Sync)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> File {
        let dir = std::env::temp_dir().join(format!(
            "kubevmm-image-{}-{tag}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(tag))
            .unwrap();
        // The open file is all the tests use.
        let _ = std::fs::remove_dir_all(&dir);
        f
    }

    #[test]
    fn format_comes_from_the_magic_only() {
        assert_eq!(
            ImageFormat::from_head(b"QFI\xfb\0\0\0\x03"),
            ImageFormat::Qcow2
        );
        assert_eq!(ImageFormat::from_head(b"QFI\xfa"), ImageFormat::Raw);
        assert_eq!(ImageFormat::from_head(b"QFI"), ImageFormat::Raw);
        assert_eq!(ImageFormat::from_head(b""), ImageFormat::Raw);
        let f = temp("short.qcow2");
        f.write_all_at(b"QF", 0).unwrap();
        assert_eq!(
            detect(&f).unwrap(),
            ImageFormat::Raw,
            "the name does not count"
        );
    }

    #[test]
    fn virtual_size_reads_the_qcow2_header() {
        let f = temp("hdr");
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&QCOW2_MAGIC);
        h[24..32].copy_from_slice(&(5u64 << 30).to_be_bytes());
        f.write_all_at(&h, 0).unwrap();
        assert_eq!(virtual_size(&f).unwrap(), (ImageFormat::Qcow2, 5 << 30));
        f.set_len(20).unwrap();
        assert!(matches!(virtual_size(&f), Err(ImageError::Header(_))));
        let raw = temp("raw");
        raw.set_len(3 << 20).unwrap();
        assert_eq!(virtual_size(&raw).unwrap(), (ImageFormat::Raw, 3 << 20));
    }

    /// Big-endian field of `len` bytes at `at`.
    fn be(b: &[u8], at: usize, len: usize) -> u64 {
        b[at..at + len]
            .iter()
            .fold(0, |v, &x| (v << 8) | u64::from(x))
    }

    #[test]
    fn create_overlay_writes_a_v3_header_naming_the_base() {
        let base = temp("base.raw");
        base.set_len(7 << 20).unwrap();
        let overlay = temp("overlay.qcow2");
        overlay.write_all_at(b"stale contents", 0).unwrap();
        assert_eq!(
            create_overlay(&overlay, &base, "base.raw").unwrap(),
            7 << 20
        );
        let mut h = vec![0u8; 4096];
        let n = read_at_most(&overlay, &mut h, 0).unwrap();
        assert!(n >= 104, "header of {n} bytes");
        assert_eq!(&h[..4], &QCOW2_MAGIC);
        assert_eq!(be(&h, 4, 4), 3, "version");
        assert_eq!(be(&h, 24, 8), 7 << 20, "size");
        let (off, len) = (be(&h, 8, 8) as usize, be(&h, 16, 4) as usize);
        assert_eq!(&h[off..off + len], b"base.raw");
        assert_eq!(be(&h, 72, 8) & 1, 0, "not dirty");
        // The backing format extension (0xe2792aca) says raw.
        let ext = h
            .windows(4)
            .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
            .unwrap();
        let flen = be(&h, ext + 4, 4) as usize;
        assert_eq!(&h[ext + 8..ext + 8 + flen], b"raw");
        assert_eq!(
            virtual_size(&overlay).unwrap(),
            (ImageFormat::Qcow2, 7 << 20)
        );

        // A qcow2 base: its virtual size, format qcow2.
        let top = temp("top.qcow2");
        assert_eq!(
            create_overlay(&top, &overlay, "overlay.qcow2").unwrap(),
            7 << 20
        );
        let n = read_at_most(&top, &mut h, 0).unwrap();
        let ext = h[..n]
            .windows(4)
            .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
            .unwrap();
        assert_eq!(&h[ext + 8..ext + 13], b"qcow2");
    }

    #[test]
    fn create_overlay_refuses_bad_names_and_empty_bases() {
        let base = temp("empty.raw");
        let overlay = temp("o.qcow2");
        assert!(matches!(
            create_overlay(&overlay, &base, "b"),
            Err(ImageError::EmptyBacking)
        ));
        base.set_len(1 << 20).unwrap();
        for name in [String::new(), "a\0b".into(), "x".repeat(1024)] {
            assert!(matches!(
                create_overlay(&overlay, &base, &name),
                Err(ImageError::BackingName(_))
            ));
        }
    }
}
