//! Kernel loading: ELF vmlinux (PVH entry when the kernel has the note, else a
//! 64-bit entry) and bzImage through the Linux boot protocol, plus initrd and
//! command line.

pub mod bzimage;
pub mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};

use crate::arch::layout;
use crate::arch::regs::EntryMode;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an x86-64 ELF vmlinux nor a bzImage")]
    KernelFormat { path: PathBuf },
    #[error("kernel {path} is corrupt or does not fit in guest RAM: {source}")]
    KernelLoad {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} is {size} bytes; only {room} bytes of guest RAM are free for it above the kernel (raise memory)")]
    InitrdTooBig { path: PathBuf, size: u64, room: u64 },
    #[error("kernel command line is {0} bytes, the limit is {max}", max = layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("cannot write boot data to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What the boot code needs to know about the machine.
#[derive(Debug, Clone)]
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    /// The kernel as a handed-over fd (then `kernel` only names it).
    pub kernel_fd: Option<i32>,
    pub initrd: Option<&'a Path>,
    /// The initrd as a handed-over fd.
    pub initrd_fd: Option<i32>,
    pub cmdline: &'a str,
    pub mem_size: u64,
    pub rsdp_addr: u64,
}

#[derive(Debug, Clone, Copy)]
struct Initrd {
    addr: u64,
    size: u64,
}

enum KernelKind {
    Elf,
    BzImage,
}

fn detect(file: &mut File, path: &Path) -> Result<KernelKind, BootError> {
    let open_err = |source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    };
    let mut head = [0u8; 0x206];
    let n = read_up_to(file, &mut head).map_err(open_err)?;
    file.seek(SeekFrom::Start(0)).map_err(open_err)?;
    if n >= 4 && &head[..4] == b"\x7fELF" {
        return Ok(KernelKind::Elf);
    }
    if n >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(KernelKind::BzImage);
    }
    Err(BootError::KernelFormat {
        path: path.to_owned(),
    })
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads kernel, initrd and command line; returns how the BSP must enter.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<EntryMode, BootError> {
    if spec.cmdline.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(spec.cmdline.len()));
    }
    let path = spec.kernel;
    let mut file = open(path, spec.kernel_fd).map_err(|source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    })?;
    let kind = detect(&mut file, path)?;
    let load_err = |source| BootError::KernelLoad {
        path: path.to_owned(),
        source,
    };
    let result = match kind {
        KernelKind::Elf => Elf::load(
            mem,
            None,
            &mut file,
            Some(GuestAddress(layout::HIMEM_START)),
        ),
        KernelKind::BzImage => BzImage::load(
            mem,
            None,
            &mut file,
            Some(GuestAddress(layout::HIMEM_START)),
        ),
    }
    .map_err(load_err)?;

    let mut cmdline = spec.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(layout::CMDLINE_START))?;

    let low_ram_end = spec.mem_size.min(layout::MMIO_HOLE_START);
    let initrd_limit = result.setup_header.map_or(low_ram_end, |h| {
        low_ram_end.min(u64::from(h.initrd_addr_max) + 1)
    });
    let initrd = match spec.initrd {
        Some(p) => Some(load_initrd(
            mem,
            p,
            spec.initrd_fd,
            result.kernel_end,
            initrd_limit,
        )?),
        None => None,
    };

    match (kind, result.pvh_boot_cap) {
        (KernelKind::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            pvh::write_start_info(mem, spec, initrd.map(|i| (i.addr, i.size)))?;
            Ok(EntryMode::Pvh {
                entry: entry.0,
                start_info: layout::PVH_INFO_START,
            })
        }
        (KernelKind::Elf, _) => {
            bzimage::write_boot_params(mem, spec, None, initrd.map(|i| (i.addr, i.size)))?;
            Ok(EntryMode::Long {
                entry: read_elf_entry(&mut file).map_err(|source| BootError::KernelOpen {
                    path: path.to_owned(),
                    source,
                })?,
                boot_params: layout::ZERO_PAGE_START,
            })
        }
        (KernelKind::BzImage, _) => {
            bzimage::write_boot_params(
                mem,
                spec,
                result.setup_header,
                initrd.map(|i| (i.addr, i.size)),
            )?;
            // The 64-bit entry point is 0x200 past the protected-mode code.
            Ok(EntryMode::Long {
                entry: result.kernel_load.0 + 0x200,
                boot_params: layout::ZERO_PAGE_START,
            })
        }
    }
}

fn read_elf_entry(file: &mut File) -> std::io::Result<u64> {
    let mut hdr = [0u8; 32];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut hdr)?;
    Ok(u64::from_le_bytes(hdr[24..32].try_into().expect("8 bytes")))
}

/// The handed-over fd when there is one, else the file at `path`.
fn open(path: &Path, fd: Option<i32>) -> std::io::Result<File> {
    match fd {
        // SAFETY: the parent handed this fd over for this file; the machine
        // is built once per process, so it is taken once.
        Some(fd) => Ok(unsafe { crate::config::take_handed(fd) }),
        None => File::open(path),
    }
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    fd: Option<i32>,
    kernel_end: u64,
    limit: u64,
) -> Result<Initrd, BootError> {
    let read_err = |source| BootError::InitrdRead {
        path: path.to_owned(),
        source,
    };
    let mut file = open(path, fd).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let lowest = kernel_end.max(layout::HIMEM_START).div_ceil(4096) * 4096;
    let room = limit.saturating_sub(lowest);
    if size > room {
        return Err(BootError::InitrdTooBig {
            path: path.to_owned(),
            size,
            room,
        });
    }
    let addr = (limit - size) & !0xfff;
    let mut slice = mem.get_slice(GuestAddress(addr), size as usize)?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| BootError::InitrdRead {
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(Initrd { addr, size })
}
