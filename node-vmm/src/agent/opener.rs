//! The I/O half of `prepare::realize`: the VM's state directory and empty
//! disks, created without following symlinks, and every descriptor the
//! jailed VMM needs: `/dev/kvm`, kernel and initrd, disks (locked), taps,
//! the console ring and socket, and the control socket.

use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use kubevmm_vmm::config::{SerialFileFormat, SerialMode};
use kubevmm_vmm::VmConfig;

use super::handoff::Handoff;
use super::hostfs::{self, Access};
use super::prepare::{FileSource, Plan, PrepareError, SparseFile};
use super::supervisor::VmDir;

/// Creates the VM's directory (0700) and the empty jail root inside it.
pub fn state_dir(dir: &VmDir) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir.0)?;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o700))?;
    let root = dir.jail_root();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o555)
        .create(&root)?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o555))
}

/// Creates the sparse file of an empty disk unless it exists; never
/// follows a symlink. A new disk needs as much free space as it may grow
/// to (as `KubeVirt`'s `hostDisk` `DiskOrCreate`), so a guest filling it never
/// meets a full node file system; an existing one is kept as it is.
pub fn sparse_file(f: &SparseFile) -> Result<(), PrepareError> {
    let err = |e: std::io::Error| PrepareError::Host {
        what: format!("empty disk {}", f.path.display()),
        why: e.to_string(),
    };
    if std::fs::symlink_metadata(&f.path).is_ok() {
        return Ok(());
    }
    let dir = f.path.parent().unwrap_or(Path::new("/"));
    let free = super::images::store::free_space(dir).map_err(err)?;
    if free < f.size {
        return Err(PrepareError::NoSpace {
            field: f.field.clone(),
            need: f.size,
            free,
            dir: dir.display().to_string(),
        });
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&f.path)
    {
        Ok(file) => file.set_len(f.size).map_err(|e| {
            let _ = std::fs::remove_file(&f.path);
            err(e)
        }),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Writes a seed image at `path`, replacing what was there: written to a
/// new temporary file (0600, never following a symlink), synced, then
/// renamed over `path`, so a VMM never sees half an image and a symlink
/// planted at `path` is replaced, not followed.
pub fn seed_file(path: &Path, image: &[u8]) -> Result<(), super::supervisor::SupervisorError> {
    super::supervisor::write_atomic(path, image)
}

fn host(what: String) -> impl FnOnce(std::io::Error) -> PrepareError {
    move |e| PrepareError::Host {
        what,
        why: e.to_string(),
    }
}

/// The overlay of an `image` disk, created over `base` on first use (new
/// file, 0600, never through a symlink), opened read-write and locked; and
/// the base, opened read-only with a shared lock (never written).
fn open_overlay(
    overlay: &Path,
    base: &Path,
    access: Access,
) -> Result<(OwnedFd, OwnedFd), PrepareError> {
    let base_fd: OwnedFd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(base)
        .map_err(host(format!("cached image {}", base.display())))?
        .into();
    let b = base.display().to_string();
    hostfs::lock(&base_fd, Access::DiskReadOnly, &b, &b)?;
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(overlay)
    {
        Ok(f) => {
            let base_file = File::from(base_fd.try_clone().map_err(host(b.clone()))?);
            // The absolute path, so `qemu-img info --backing-chain` on the
            // node finds the base; the VMM itself uses only the fd.
            if let Err(e) = kubevmm_vmm::image::create_overlay(&f, &base_file, &b) {
                let _ = std::fs::remove_file(overlay);
                return Err(PrepareError::Host {
                    what: format!("overlay {}", overlay.display()),
                    why: e.to_string(),
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(host(format!("overlay {}", overlay.display()))(e)),
    }
    let fd = open_source(&FileSource::State(overlay.to_path_buf()), &[], access)?;
    Ok((fd, base_fd))
}

/// Opens one planned file.
fn open_source(
    src: &FileSource,
    allowed: &[std::path::PathBuf],
    access: Access,
) -> Result<OwnedFd, PrepareError> {
    match src {
        FileSource::Overlay { overlay, .. } => {
            open_source(&FileSource::State(overlay.clone()), allowed, access)
        }
        FileSource::User { field, path } => {
            Ok(hostfs::open_user_path(allowed, field, path, access)?)
        }
        FileSource::State(path) => {
            let fd: OwnedFd = OpenOptions::new()
                .read(true)
                .write(access == Access::DiskReadWrite)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(host(format!("disk {}", path.display())))?
                .into();
            let p = path.display().to_string();
            hostfs::lock(&fd, access, &p, &p)?;
            Ok(fd)
        }
    }
}

/// Opens everything of `plan` and returns the config naming the fds.
pub fn open_all(
    plan: &Plan,
    dir: &VmDir,
    allowed: &[std::path::PathBuf],
) -> Result<(VmConfig, Handoff), PrepareError> {
    let mut config = plan.config.clone();
    let mut h = Handoff::default();
    let kvm: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(host("/dev/kvm".into()))?
        .into();
    config.fds.kvm = Some(h.add(&kvm)?);
    config.fds.kernel = Some(h.add(&open_source(&plan.opens.kernel, allowed, Access::Boot)?)?);
    if let Some(i) = &plan.opens.initrd {
        config.fds.initrd = Some(h.add(&open_source(i, allowed, Access::Boot)?)?);
    }
    for (disk, src) in config.disks.iter_mut().zip(&plan.opens.disks) {
        let access = if disk.read_only {
            Access::DiskReadOnly
        } else {
            Access::DiskReadWrite
        };
        let vms = dir.0.parent().unwrap_or(&dir.0);
        let own = dir.0.file_name().unwrap_or_default().to_string_lossy();
        let named = |e| match e {
            PrepareError::Path(e) => PrepareError::Path(super::holders::name_holder(e, vms, &own)),
            other => other,
        };
        if let FileSource::Overlay { overlay, base } = src {
            let (fd, base_fd) = open_overlay(overlay, base, access).map_err(named)?;
            disk.fd = Some(h.add(&fd)?);
            disk.backing_fds = vec![h.add(&base_fd)?];
            continue;
        }
        let fd = open_source(src, allowed, access).map_err(named)?;
        disk.fd = Some(h.add(&fd)?);
    }
    for net in &mut config.nets {
        let Some(tap) = net.tap.take() else { continue };
        let file: File =
            kubevmm_vmm::devices::virtio::net::open_tap(&net.id, &tap).map_err(|e| {
                PrepareError::Host {
                    what: format!("tap {tap}"),
                    why: e.to_string(),
                }
            })?;
        net.fd = Some(h.add(&OwnedFd::from(file))?);
    }
    if let Some(log) = &config.serial.log {
        config.fds.serial_log = Some(h.add(&console_file(log, config.serial.file_format)?)?);
    }
    if let (SerialMode::Socket, Some(sock)) = (config.serial.mode, &config.serial.path) {
        config.fds.console = Some(h.add(&private_socket(sock, "console socket")?)?);
    }
    let sock = dir.api_socket();
    config.fds.api = Some(h.add(&private_socket(&sock, "API socket")?)?);
    Ok((config, h))
}

/// The console file, never through a symlink, created the first time and
/// kept across runs: a ring (laid out by the VMM, whose next run continues
/// its stream) for reading and writing in place, a text file for appending.
fn console_file(path: &Path, format: SerialFileFormat) -> Result<OwnedFd, PrepareError> {
    let mut options = OpenOptions::new();
    options.read(true).create(true).mode(0o600);
    match format {
        SerialFileFormat::Ring => options.write(true).truncate(false),
        SerialFileFormat::Text => options.append(true),
    };
    Ok(options
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(host(format!("console {}", path.display())))?
        .into())
}

/// A listening unix socket at `path` (replacing a stale one) that only
/// root may connect to.
fn private_socket(path: &Path, what: &str) -> Result<OwnedFd, PrepareError> {
    let err = || host(format!("{what} {}", path.display()));
    let listener = kubevmm_vmm::vm::bind_unix(&path.to_path_buf()).map_err(err())?;
    // The state directory (0700) already keeps others out; the socket's
    // own mode says the same.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err())?;
    Ok(OwnedFd::from(listener))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_ring_is_written_in_place_and_the_sockets_are_private() {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::FileTypeExt as _;
        let dir = std::env::temp_dir().join(format!("kubevmm-console-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ring = dir.join("console.ring");
        let fd = console_file(&ring, SerialFileFormat::Ring).unwrap();
        // SAFETY: F_GETFL on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDWR);
        assert_eq!(flags & libc::O_APPEND, 0, "pwrite must keep its offsets");
        let meta = std::fs::metadata(&ring).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Kept as it is for the next run.
        std::fs::write(&ring, b"kept").unwrap();
        drop(console_file(&ring, SerialFileFormat::Ring).unwrap());
        assert_eq!(std::fs::read(&ring).unwrap(), b"kept");
        let link = dir.join("link.ring");
        std::os::unix::fs::symlink(&ring, &link).unwrap();
        assert!(console_file(&link, SerialFileFormat::Ring).is_err());
        let sock = dir.join("console.sock");
        std::fs::write(&sock, b"stale").unwrap();
        let _listener = private_socket(&sock, "console socket").unwrap();
        let meta = std::fs::metadata(&sock).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn seed_files_replace_symlinks_and_are_private() {
        let dir = std::env::temp_dir().join(format!("kubevmm-seedfile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let seed = dir.join("seed-s.img");
        std::os::unix::fs::symlink(&victim, &seed).unwrap();
        seed_file(&seed, b"image one").unwrap();
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            b"precious",
            "symlink followed"
        );
        let meta = std::fs::symlink_metadata(&seed).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        seed_file(&seed, b"image two").unwrap();
        assert_eq!(std::fs::read(&seed).unwrap(), b"image two");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 2, "no temporary file left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
