//! What a virtio-blk disk reads and writes: a raw file (plain `pread`/
//! `pwrite` into guest memory, the fast path) or a qcow2 image with its
//! backing chain (through `imago`, synchronously on the device thread).
//!
//! The format comes from the bytes ([`crate::image::detect`]). Backing files
//! are never opened by the name in a qcow2 header: the caller hands them
//! over, in chain order (the disk's backing file first, the base last). A
//! backing file's format is the one its child's header records (`raw` or
//! `qcow2`), probed only when the header records none.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, StorageOpenOptions};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::image::{self, ImageFormat};

type ImagoFile = imago::file::File;
type Image = FormatAccess<ImagoFile>;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("disk {id}: {source}")]
    Probe {
        id: String,
        source: image::ImageError,
    },
    #[error("disk {id}: cannot get its size: {source}")]
    Size { id: String, source: std::io::Error },
    #[error("disk {id}: cannot open {what} as {format}: {source}")]
    Open {
        id: String,
        what: String,
        format: &'static str,
        source: std::io::Error,
    },
    #[error(
        "disk {id}: {what} names backing file {name:?} but no backing fd was handed over for it"
    )]
    BackingMissing {
        id: String,
        what: String,
        name: String,
    },
    #[error("disk {id}: {extra} backing fd(s) handed over beyond the end of the chain")]
    BackingUnused { id: String, extra: usize },
    #[error(
        "disk {id}: {what} records backing format {format:?}; only raw and qcow2 are supported"
    )]
    BackingFormat {
        id: String,
        what: String,
        format: String,
    },
    #[error("disk {id}: {what} needs an external data file, which is not supported")]
    DataFile { id: String, what: String },
}

/// The bytes behind one disk.
pub enum Backend {
    Raw(File),
    Qcow2(Box<Image>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.format().name())
    }
}

/// Which file of a chain a message is about.
fn layer_name(depth: usize) -> String {
    if depth == 0 {
        "the image".into()
    } else {
        format!("backing file {depth}")
    }
}

impl Backend {
    /// Opens disk `id` from `file` (format `pinned`, else from its bytes)
    /// and, for a qcow2 with a backing file, `backing` in chain order.
    /// Read-only disks and every backing file are opened for reading only.
    pub fn open(
        id: &str,
        file: File,
        backing: Vec<File>,
        read_only: bool,
        pinned: Option<ImageFormat>,
    ) -> Result<Self, BackendError> {
        let probe = |source| BackendError::Probe {
            id: id.into(),
            source,
        };
        let format = match pinned {
            Some(f) => f,
            None => image::detect(&file).map_err(probe)?,
        };
        match format {
            ImageFormat::Raw => {
                if !backing.is_empty() {
                    return Err(BackendError::BackingUnused {
                        id: id.into(),
                        extra: backing.len(),
                    });
                }
                Ok(Backend::Raw(file))
            }
            ImageFormat::Qcow2 => {
                let mut chain = backing.into_iter();
                let img = open_qcow2(id, 0, file, !read_only, &mut chain)?;
                let extra = chain.len();
                if extra > 0 {
                    return Err(BackendError::BackingUnused {
                        id: id.into(),
                        extra,
                    });
                }
                Ok(Backend::Qcow2(Box::new(img)))
            }
        }
    }

    pub fn format(&self) -> ImageFormat {
        match self {
            Backend::Raw(_) => ImageFormat::Raw,
            Backend::Qcow2(_) => ImageFormat::Qcow2,
        }
    }

    /// Bytes the guest sees.
    pub fn size(&self) -> std::io::Result<u64> {
        match self {
            Backend::Raw(f) => image::file_size(f),
            Backend::Qcow2(img) => Ok(img.size()),
        }
    }

    /// Moves `len` bytes between guest memory at `addr` and the disk at
    /// byte `off` (a range the request parser checked against the disk).
    pub fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: u32,
        off: u64,
        to_guest: bool,
    ) -> std::io::Result<()> {
        // Nothing to move; imago's vectors also (debug-)assert that a
        // vector of one empty buffer is not empty.
        if len == 0 {
            return Ok(());
        }
        let slice = mem
            .get_slice(addr, len as usize)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        match self {
            Backend::Raw(f) => raw_transfer(f, &slice, off, to_guest),
            Backend::Qcow2(img) => {
                if to_guest {
                    let (v, _guard) = IoVectorMut::from_volatile_slice_one(&slice);
                    img.readv(v, off)
                } else {
                    let (v, _guard) = IoVector::from_volatile_slice_one(&slice);
                    img.writev(v, off)
                }
            }
        }
    }

    /// Makes every completed write durable: data and, for qcow2, the
    /// metadata that maps it (cached tables written back, then fsync).
    pub fn flush(&self) -> std::io::Result<()> {
        match self {
            Backend::Raw(f) => f.sync_data(),
            Backend::Qcow2(img) => {
                img.flush()?;
                img.sync()
            }
        }
    }

    /// Writes what the VMM holds in memory (qcow2 tables) to the file, so
    /// that a VMM that exits leaves an image with every completed write in
    /// it (durable against a host crash only after a guest flush).
    pub fn write_back(&self) -> std::io::Result<()> {
        match self {
            Backend::Raw(_) => Ok(()),
            Backend::Qcow2(img) => img.flush(),
        }
    }

    /// Drops `len` bytes at `off`; they read back as zeroes (raw: a punched
    /// hole; qcow2: zero clusters, their host clusters freed).
    pub fn discard(&mut self, off: u64, len: u64) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self {
            Backend::Raw(f) => fallocate(f, PUNCH_HOLE, off, len),
            Backend::Qcow2(img) => img.discard_to_zero(off, len),
        }
    }

    /// Makes `len` bytes at `off` read back as zeroes. With `unmap` their
    /// space may be given back (raw: a punched hole; qcow2: zero clusters,
    /// host clusters freed); without, it stays allocated (raw: a zeroed
    /// range; qcow2: zero clusters keeping their host clusters). Where the
    /// file system or image cannot do either, zeroes are written.
    pub fn write_zeroes(&mut self, off: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self {
            Backend::Raw(f) => {
                let modes: &[libc::c_int] = if unmap {
                    &[PUNCH_HOLE, ZERO_RANGE]
                } else {
                    &[ZERO_RANGE]
                };
                for &mode in modes {
                    match fallocate(f, mode, off, len) {
                        Err(e) if cannot_allocate(&e) => {}
                        done => return done,
                    }
                }
                write_zero_bytes(len, |buf, at| f.write_all_at(buf, off + at))
            }
            Backend::Qcow2(img) => {
                let done = if unmap {
                    img.discard_to_zero(off, len)
                } else {
                    img.write_zeroes(off, len)
                };
                match done {
                    // Zero clusters need qcow2 v3.
                    Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                        write_zero_bytes(len, |buf, at| img.write(buf, off + at))
                    }
                    done => done,
                }
            }
        }
    }
}

/// `fallocate` modes of discard and write-zeroes on a raw file; neither
/// ever changes the file's size.
const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

fn fallocate(f: &File, mode: libc::c_int, off: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: fallocate on our own open descriptor; no memory involved.
    if unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The file system (tmpfs has no zero ranges, some have neither mode) or
/// the device (a block device wants its logical block size) refused the
/// mode: writing zeroes still works.
fn cannot_allocate(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS | libc::ENODEV)
    )
}

/// Writes `len` zero bytes through `write(buffer, offset from the start)`,
/// from one static buffer.
fn write_zero_bytes(
    len: u64,
    mut write: impl FnMut(&[u8], u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZEROES.len() as u64) as usize;
        write(&ZEROES[..n], done)?;
        done += n as u64;
    }
    Ok(())
}

/// `pread`/`pwrite` straight into or out of guest memory.
fn raw_transfer(
    file: &File,
    slice: &vm_memory::VolatileSlice<'_, ()>,
    off: u64,
    to_guest: bool,
) -> std::io::Result<()> {
    let len = slice.len();
    let guard = slice.ptr_guard_mut();
    let ptr = guard.as_ptr();
    let mut done = 0usize;
    while done < len {
        let remaining = len - done;
        let at = (off + done as u64) as libc::off_t;
        // SAFETY: `ptr..ptr+len` is a valid mapping of guest memory
        // returned by get_slice, and the guard keeps it alive; the guest
        // may race on the bytes, which is harmless for plain data copies.
        let n = unsafe {
            if to_guest {
                libc::pread(file.as_raw_fd(), ptr.add(done).cast(), remaining, at)
            } else {
                libc::pwrite(file.as_raw_fd(), ptr.add(done).cast(), remaining, at)
            }
        };
        match n {
            n if n > 0 => done += n as usize,
            0 if to_guest => {
                // The file ends early (it shrank under us): zeroes, a page
                // at a time rather than a guest-sized allocation.
                const ZEROES: [u8; 4096] = [0; 4096];
                while done < len {
                    let n = (len - done).min(ZEROES.len());
                    slice
                        .subslice(done, n)
                        .and_then(|s| vm_memory::Bytes::write_slice(&s, &ZEROES[..n], 0))
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    done += n;
                }
            }
            0 => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn storage(file: File, writable: bool) -> std::io::Result<ImagoFile> {
    ImagoFile::from_open_file(file, StorageOpenOptions::new().write(writable))
}

/// Opens layer `depth` of disk `id` as qcow2, its backing chain from `chain`.
fn open_qcow2(
    id: &str,
    depth: usize,
    file: File,
    writable: bool,
    chain: &mut std::vec::IntoIter<File>,
) -> Result<Image, BackendError> {
    let what = layer_name(depth);
    let open_err = |source| BackendError::Open {
        id: id.into(),
        what: what.clone(),
        format: "qcow2",
        source,
    };
    let mut q = storage(file, writable)
        .and_then(|s| Qcow2::<ImagoFile>::open_image(s, writable))
        .map_err(open_err)?;
    if q.requires_external_data_file() {
        return Err(BackendError::DataFile {
            id: id.into(),
            what,
        });
    }
    q.set_data_file(None);
    let backing = match q.implicit_backing_file().cloned() {
        None => None,
        Some(name) => {
            let Some(next) = chain.next() else {
                return Err(BackendError::BackingMissing {
                    id: id.into(),
                    what,
                    name,
                });
            };
            let format = match q.implicit_backing_format().map(String::as_str) {
                None => image::detect(&next).map_err(|source| BackendError::Probe {
                    id: id.into(),
                    source,
                })?,
                Some("raw") => ImageFormat::Raw,
                Some("qcow2") => ImageFormat::Qcow2,
                Some(other) => {
                    return Err(BackendError::BackingFormat {
                        id: id.into(),
                        what,
                        format: other.into(),
                    })
                }
            };
            Some(match format {
                ImageFormat::Qcow2 => open_qcow2(id, depth + 1, next, false, chain)?,
                ImageFormat::Raw => {
                    let raw = storage(next, false)
                        .and_then(|s| {
                            Raw::builder(s)
                                .write(false)
                                .open(DenyImplicitOpenGate::default())
                        })
                        .map_err(|source| BackendError::Open {
                            id: id.into(),
                            what: layer_name(depth + 1),
                            format: "raw",
                            source,
                        })?;
                    FormatAccess::new(raw)
                }
            })
        }
    };
    q.set_backing(backing);
    Ok(FormatAccess::new(q))
}

#[cfg(test)]
mod tests {
    use imago::FormatCreateBuilder;
    use vm_memory::Bytes;

    use super::*;
    use crate::devices::virtio::test_util::{guest_memory, BUF};

    const SIZE: u64 = 1 << 20;

    fn file(dir: &std::path::Path, name: &str) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(name))
            .unwrap()
    }

    /// A raw base whose bytes are their offset's low byte, and a qcow2
    /// overlay over it.
    fn chain(tag: &str) -> (File, File) {
        let dir =
            std::env::temp_dir().join(format!("kubevmm-backend-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = file(&dir, "base.raw");
        let bytes: Vec<u8> = (0..SIZE).map(|i| i as u8).collect();
        base.write_all_at(&bytes, 0).unwrap();
        let top = file(&dir, "top.qcow2");
        image::create_overlay(&top, &base, "base.raw").unwrap();
        // The open files are all the tests use.
        let _ = std::fs::remove_dir_all(&dir);
        (top, base)
    }

    fn read(b: &Backend, mem: &GuestMemoryMmap, off: u64, len: u32) -> Vec<u8> {
        b.transfer(mem, GuestAddress(BUF), len, off, true).unwrap();
        let mut v = vec![0u8; len as usize];
        mem.read_slice(&mut v, GuestAddress(BUF)).unwrap();
        v
    }

    #[test]
    fn an_overlay_reads_its_base_and_keeps_its_writes() {
        let mem = guest_memory();
        let (top, base) = chain("rw");
        let keep = top.try_clone().unwrap();
        let mut b = Backend::open("d", top, vec![base.try_clone().unwrap()], false, None).unwrap();
        assert_eq!(b.format(), ImageFormat::Qcow2);
        assert_eq!(b.size().unwrap(), SIZE);
        let want: Vec<u8> = (70_000..70_000 + 8192u64).map(|i| i as u8).collect();
        assert_eq!(read(&b, &mem, 70_000, 8192), want);
        mem.write_slice(&[0xab; 4096], GuestAddress(BUF)).unwrap();
        b.transfer(&mem, GuestAddress(BUF), 4096, 65_536 + 512, false)
            .unwrap();
        b.discard(4096, 4096).unwrap();
        b.flush().unwrap();
        drop(b);
        let b = Backend::open("d", keep, vec![base.try_clone().unwrap()], true, None).unwrap();
        assert_eq!(read(&b, &mem, 65_536 + 512, 4096), [0xab; 4096]);
        // The rest of the copied-up cluster still has the base's bytes.
        let head: Vec<u8> = (65_536..66_048u64).map(|i| i as u8).collect();
        assert_eq!(read(&b, &mem, 65_536, 512), head);
        assert_eq!(read(&b, &mem, 4096, 4096), [0; 4096]);
        let mut raw = vec![0u8; SIZE as usize];
        base.read_exact_at(&mut raw, 0).unwrap();
        assert!(
            raw.iter().enumerate().all(|(i, &x)| x == i as u8),
            "base written"
        );
    }

    /// A guest may post empty data buffers: on qcow2 they must not reach
    /// imago, whose vectors (debug-)assert against an empty buffer.
    #[test]
    fn an_empty_buffer_moves_nothing() {
        let mem = guest_memory();
        let (top, base) = chain("empty");
        let b = Backend::open("d", top, vec![base], false, None).unwrap();
        for to_guest in [true, false] {
            b.transfer(&mem, GuestAddress(BUF), 0, 4096, to_guest)
                .unwrap();
        }
    }

    /// The base's bytes at `off..off + len`.
    fn base_at(off: u64, len: u64) -> Vec<u8> {
        (off..off + len).map(|i| i as u8).collect()
    }

    #[test]
    fn write_zeroes_on_an_overlay_hide_the_base_and_survive_reopening() {
        let mem = guest_memory();
        let (top, base) = chain("zeroes");
        let keep = top.try_clone().unwrap();
        let mut b = Backend::open("d", top, vec![base.try_clone().unwrap()], false, None).unwrap();
        // Whole clusters kept allocated, whole clusters given back, and
        // sectors inside clusters of the base (written as zeroes).
        let ranges = [
            (65_536u64, 65_536u64, false),
            (196_608, 131_072, true),
            (400_384, 1024, false),
            (460_800, 2048, true),
            (500_000, 0, true),
        ];
        for &(off, len, unmap) in &ranges {
            b.write_zeroes(off, len, unmap).unwrap();
        }
        b.flush().unwrap();
        drop(b);
        let b = Backend::open("d", keep, vec![base.try_clone().unwrap()], true, None).unwrap();
        for &(off, len, _) in &ranges {
            let len = len as u32;
            assert_eq!(
                read(&b, &mem, off, len),
                vec![0; len as usize],
                "{off}+{len}"
            );
            // The sectors around each range still read the base.
            assert_eq!(read(&b, &mem, off - 512, 512), base_at(off - 512, 512));
            let end = off + u64::from(len);
            assert_eq!(read(&b, &mem, end, 512), base_at(end, 512), "after {off}");
        }
        let mut raw = vec![0u8; SIZE as usize];
        base.read_exact_at(&mut raw, 0).unwrap();
        assert_eq!(raw, base_at(0, SIZE), "base written");
    }

    /// A standalone qcow2 of `SIZE` whose first cluster holds data, its
    /// header turned into version 2 (which has no zero clusters).
    fn qcow2_v2() -> File {
        let dir = std::env::temp_dir().join(format!("kubevmm-backend-{}-v2", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = file(&dir, "v2.qcow2");
        let _ = std::fs::remove_dir_all(&dir);
        let storage = storage(f.try_clone().unwrap(), true).unwrap();
        Qcow2::<ImagoFile>::create_builder(storage)
            .size(SIZE)
            .create()
            .unwrap();
        // Version 3 fields at their defaults: the same header as version 2.
        f.write_all_at(&2u32.to_be_bytes(), 4).unwrap();
        f
    }

    #[test]
    fn write_zeroes_on_a_qcow2_v2_writes_zeroes() {
        let mem = guest_memory();
        let img = qcow2_v2();
        let keep = img.try_clone().unwrap();
        let mut b = Backend::open("d", img, Vec::new(), false, None).unwrap();
        mem.write_slice(&[0x5a; 8192], GuestAddress(BUF)).unwrap();
        b.transfer(&mem, GuestAddress(BUF), 8192, 0, false).unwrap();
        b.write_zeroes(512, 1024, false).unwrap();
        b.write_zeroes(4096, 2048, true).unwrap();
        b.flush().unwrap();
        drop(b);
        let b = Backend::open("d", keep, Vec::new(), true, None).unwrap();
        let mut want = vec![0x5a; 8192];
        want[512..1536].fill(0);
        want[4096..6144].fill(0);
        assert_eq!(read(&b, &mem, 0, 8192), want);
    }

    /// 512-byte blocks allocated to `f`.
    fn blocks(f: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks()
    }

    #[test]
    fn write_zeroes_on_a_raw_file_unmap_only_when_asked() {
        let dir = std::env::temp_dir().join(format!("kubevmm-backend-{}-raw", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = file(&dir, "disk.raw");
        let probe = file(&dir, "probe");
        let _ = std::fs::remove_dir_all(&dir);
        f.write_all_at(&base_at(0, SIZE), 0).unwrap();
        f.sync_all().unwrap();
        // Whether this file system punches holes at all.
        probe.write_all_at(&vec![1; 1 << 16], 0).unwrap();
        probe.sync_all().unwrap();
        let punches = fallocate(&probe, PUNCH_HOLE, 0, 1 << 16).is_ok();
        let mut b = Backend::Raw(f.try_clone().unwrap());
        let before = blocks(&f);
        b.write_zeroes(65_536, 262_144, false).unwrap();
        assert!(blocks(&f) >= before, "kept allocated");
        b.write_zeroes(524_288, 262_144, true).unwrap();
        b.write_zeroes(1000 * 512, 3 * 512, true).unwrap();
        b.write_zeroes(1010 * 512, 1, false).unwrap();
        if punches {
            assert!(blocks(&f) < before, "a hole was punched");
        }
        let mut want = base_at(0, SIZE);
        want[65_536..327_680].fill(0);
        want[524_288..786_432].fill(0);
        want[512_000..513_536].fill(0);
        want[517_120] = 0;
        let mut got = vec![0u8; SIZE as usize];
        f.read_exact_at(&mut got, 0).unwrap();
        assert!(got == want, "zeroed ranges, nothing else");
        assert_eq!(f.metadata().unwrap().len(), SIZE, "size unchanged");
    }

    #[test]
    fn writing_zeroes_covers_the_range_in_buffer_sized_steps() {
        let mut seen = Vec::new();
        write_zero_bytes(200_000, |buf, at| {
            assert!(buf.iter().all(|&b| b == 0));
            seen.push((at, buf.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (0, 65_536),
                (65_536, 65_536),
                (131_072, 65_536),
                (196_608, 3392)
            ]
        );
        write_zero_bytes(0, |_, _| panic!("nothing to write")).unwrap();
    }

    #[test]
    fn a_chain_must_be_handed_over_exactly() {
        let (top, base) = chain("exact");
        let keep = top.try_clone().unwrap();
        let err = Backend::open("d", top, Vec::new(), false, None).unwrap_err();
        assert!(
            matches!(&err, BackendError::BackingMissing { name, .. } if name == "base.raw"),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("disk d: the image names backing file"),
            "{err}"
        );
        let extra = base.try_clone().unwrap();
        let err = Backend::open(
            "d",
            keep,
            vec![base.try_clone().unwrap(), extra],
            false,
            None,
        )
        .unwrap_err();
        assert!(
            matches!(err, BackendError::BackingUnused { extra: 1, .. }),
            "{err}"
        );
        let err =
            Backend::open("d", base.try_clone().unwrap(), vec![base], true, None).unwrap_err();
        assert!(
            matches!(err, BackendError::BackingUnused { extra: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_qcow2_is_refused_naming_the_disk() {
        let (top, _) = chain("corrupt");
        // Version 1 does not exist.
        top.write_all_at(&[0, 0, 0, 1], 4).unwrap();
        let err = Backend::open("root", top, Vec::new(), true, None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("disk root: cannot open the image as qcow2"),
            "{err}"
        );
    }

    #[test]
    fn a_pinned_raw_disk_is_raw_whatever_its_bytes() {
        // A guest wrote a qcow2 header into its raw disk: with the format
        // pinned, it stays the raw bytes the guest wrote.
        let (top, _) = chain("pinned");
        let len = top.metadata().unwrap().len();
        let b = Backend::open("d", top, Vec::new(), true, Some(ImageFormat::Raw)).unwrap();
        assert_eq!(b.format(), ImageFormat::Raw);
        assert_eq!(b.size().unwrap(), len);
    }
}
