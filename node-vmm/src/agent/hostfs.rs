//! User-named host paths are opened, not compared (DESIGN.md, "Security
//! model"). A `hostDisk` or boot `path` is split into an allow-listed
//! directory and the rest ([`locate`], pure), the directory is opened, and
//! the rest is resolved by the kernel with `openat2(RESOLVE_BENEATH)`: no
//! `..`, absolute symlink or bind-mount trick leaves the directory, and magic
//! links (`/proc/self/fd/N`) are refused. What was opened is what the VMM
//! gets, as an fd. The agent's own state must lie outside every allowed
//! directory ([`check_layout`]), so no user path can name another VM's files.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};

/// Why a user-named path cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostFsError {
    /// The path is not under any allowed directory.
    #[error("{field}: {path} is outside the allowed directories ({allowed}); put the file there or ask the administrator to allow its directory")]
    NotAllowed {
        /// The field.
        field: String,
        /// The path.
        path: String,
        /// The allow-list.
        allowed: String,
    },
    /// The kernel refused to resolve it beneath the allowed directory.
    #[error("{field}: {path} resolves outside the allowed directory {dir} (a symlink or '..' leads out of it); use a regular file inside the directory")]
    Escapes {
        /// The field.
        field: String,
        /// The path.
        path: String,
        /// The allowed directory.
        dir: String,
    },
    /// It is not a file the VMM can use.
    #[error("{field}: {path} is {what}; it must be a regular file{blk}")]
    NotAFile {
        /// The field.
        field: String,
        /// The path.
        path: String,
        /// What it is.
        what: &'static str,
        /// ", or a block device" for disks.
        blk: &'static str,
    },
    /// Any other open error (missing file, permissions).
    #[error("{field}: cannot open {path}: {why}")]
    Open {
        /// The field.
        field: String,
        /// The path.
        path: String,
        /// The OS error.
        why: String,
    },
    /// Another VM (or the VM's previous VMM) holds the file.
    #[error("{field}: {path} is in use by {holder} ({how} lock held); a disk is used by one VM at a time unless every user has it read-only")]
    Locked {
        /// The field.
        field: String,
        /// The path.
        path: String,
        /// Who holds it: "VM NAMESPACE/NAME" when known, else "another VMM".
        holder: String,
        /// "exclusive" or "shared".
        how: &'static str,
    },
    /// The node's directory layout is unsafe.
    #[error("state directory {state} overlaps allowed directory {allowed}: a VM could name another VM's files; put the state outside every --allowed-dir")]
    Layout {
        /// The state directory.
        state: String,
        /// The allowed directory.
        allowed: String,
    },
}

/// `path` lexically normalized: `.` dropped; `None` when it is relative or
/// has a `..` (the API refuses those, so this is a second line).
fn normal(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => out.push(p),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The allowed directory that contains `path` (the longest one) and the
/// path relative to it. Pure; the kernel does the real check when opening.
pub fn locate<'a>(
    allowed: &'a [PathBuf],
    field: &str,
    path: &str,
) -> Result<(&'a Path, PathBuf), HostFsError> {
    let not_allowed = || HostFsError::NotAllowed {
        field: field.into(),
        path: path.into(),
        allowed: allowed
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let p = normal(Path::new(path)).ok_or_else(not_allowed)?;
    allowed
        .iter()
        .filter_map(|d| {
            let d_norm = normal(d)?;
            let rel = p.strip_prefix(&d_norm).ok()?;
            (!rel.as_os_str().is_empty()).then(|| (d.as_path(), rel.to_path_buf(), d_norm))
        })
        .max_by_key(|(_, _, d)| d.components().count())
        .map(|(d, rel, _)| (d, rel))
        .ok_or_else(not_allowed)
}

/// Whether one of two normalized paths contains the other.
fn overlaps(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The state directory must not overlap any allowed directory (compared
/// after resolving symlinks, by the caller, where the directories exist).
pub fn check_layout(state: &Path, allowed: &[PathBuf]) -> Result<(), HostFsError> {
    let s = normal(state).unwrap_or_else(|| state.to_path_buf());
    for a in allowed {
        let n = normal(a).unwrap_or_else(|| a.clone());
        if overlaps(&s, &n) {
            return Err(HostFsError::Layout {
                state: state.display().to_string(),
                allowed: a.display().to_string(),
            });
        }
    }
    Ok(())
}

/// How a file is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Kernel, initrd: read only, a regular file.
    Boot,
    /// A disk the guest only reads (shared lock).
    DiskReadOnly,
    /// A disk the guest writes (exclusive lock).
    DiskReadWrite,
}

impl Access {
    fn flags(self) -> libc::c_int {
        match self {
            Access::Boot | Access::DiskReadOnly => libc::O_RDONLY,
            Access::DiskReadWrite => libc::O_RDWR,
        }
    }
}

fn os_err(field: &str, path: &str, e: &std::io::Error) -> HostFsError {
    HostFsError::Open {
        field: field.into(),
        path: path.into(),
        why: e.to_string(),
    }
}

/// `openat2(dir, rel, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
fn openat2_beneath(dir: &OwnedFd, rel: &Path, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let c = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is plain data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the NUL-terminated path and the open_how struct
    // (whose size we pass) and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from openat2, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens a directory (an administrator's allow-list entry: symlinks in
/// the entry itself are the administrator's choice and are followed).
fn open_dir(dir: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open reads a NUL-terminated path and returns a new fd or -1.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The file type of an open fd.
fn kind(fd: &OwnedFd) -> std::io::Result<libc::mode_t> {
    // SAFETY: fstat writes a stat struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open; `st` is a valid out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &raw mut st) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.st_mode & libc::S_IFMT)
}

/// Takes the disk lock: shared for read-only users, exclusive for a writer.
/// The lock belongs to the open file description, so it is held for as
/// long as the VMM keeps the fd it is handed.
pub fn lock(fd: &OwnedFd, access: Access, field: &str, path: &str) -> Result<(), HostFsError> {
    let (op, how) = match access {
        Access::DiskReadWrite => (libc::LOCK_EX, "exclusive"),
        Access::DiskReadOnly | Access::Boot => (libc::LOCK_SH, "shared"),
    };
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(fd.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(HostFsError::Locked {
            field: field.into(),
            path: path.into(),
            holder: "another VMM".into(),
            how: if how == "exclusive" {
                "a shared or exclusive"
            } else {
                "an exclusive"
            },
        })
    } else {
        Err(os_err(field, path, &e))
    }
}

/// Opens user-named `path` (field `field`) beneath the allow-list, checks
/// its type and, for disks, takes the disk lock.
pub fn open_user_path(
    allowed: &[PathBuf],
    field: &str,
    path: &str,
    access: Access,
) -> Result<OwnedFd, HostFsError> {
    let (dir, rel) = locate(allowed, field, path)?;
    let dir_fd = open_dir(dir).map_err(|e| os_err(field, &dir.display().to_string(), &e))?;
    let fd =
        openat2_beneath(&dir_fd, &rel, access.flags()).map_err(|e| match e.raw_os_error() {
            Some(libc::EXDEV | libc::ELOOP) => HostFsError::Escapes {
                field: field.into(),
                path: path.into(),
                dir: dir.display().to_string(),
            },
            _ => os_err(field, path, &e),
        })?;
    let mode = kind(&fd).map_err(|e| os_err(field, path, &e))?;
    let disk = access != Access::Boot;
    let ok = mode == libc::S_IFREG || (disk && mode == libc::S_IFBLK);
    if !ok {
        return Err(HostFsError::NotAFile {
            field: field.into(),
            path: path.into(),
            what: match mode {
                libc::S_IFDIR => "a directory",
                libc::S_IFCHR => "a character device",
                libc::S_IFBLK => "a block device",
                libc::S_IFIFO => "a FIFO",
                libc::S_IFSOCK => "a socket",
                _ => "not a regular file",
            },
            blk: if disk { ", or a block device" } else { "" },
        });
    }
    if disk {
        lock(&fd, access, field, path)?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(d: &[&str]) -> Vec<PathBuf> {
        d.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn locate_picks_the_longest_allowed_prefix() {
        let allowed = dirs(&["/var/lib/kubevmm", "/var/lib/kubevmm/disks", "/srv"]);
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            (
                "/var/lib/kubevmm/disks/a.img",
                Some(("/var/lib/kubevmm/disks", "a.img")),
            ),
            (
                "/var/lib/kubevmm/boot/k",
                Some(("/var/lib/kubevmm", "boot/k")),
            ),
            ("/srv/./x/y", Some(("/srv", "x/y"))),
            ("/srv", None),    // the directory itself is no file
            ("/srvx/a", None), // prefix by text, not by component
            ("/etc/shadow", None),
            ("/var/lib/kubevmm/../x", None), // '..' refused outright
            ("relative/a", None),
        ];
        for (path, want) in cases {
            let got = locate(&allowed, "f", path)
                .ok()
                .map(|(d, r)| (d.to_path_buf(), r));
            let want = want.map(|(d, r)| (PathBuf::from(d), PathBuf::from(r)));
            assert_eq!(got, want, "{path}");
        }
        let e = locate(&allowed, "spec.boot.kernel.path", "/etc/shadow").unwrap_err();
        assert!(e.to_string().starts_with("spec.boot.kernel.path: /etc/shadow is outside the allowed directories (/var/lib/kubevmm, "), "{e}");
    }

    #[test]
    fn state_must_not_overlap_allowed_dirs() {
        let cases: &[(&str, &[&str], bool)] = &[
            ("/var/lib/kubevmm-node", &["/var/lib/kubevmm"], true),
            ("/var/lib/kubevmm/run", &["/var/lib/kubevmm"], false),
            ("/var/lib", &["/var/lib/kubevmm"], false),
            (
                "/var/lib/kubevmm/run",
                &["/var/lib/kubevmm/disks", "/var/lib/kubevmm/boot"],
                true,
            ),
            ("/x", &["/"], false),
        ];
        for (state, allowed, ok) in cases {
            assert_eq!(
                check_layout(Path::new(state), &dirs(allowed)).is_ok(),
                *ok,
                "{state} vs {allowed:?}"
            );
        }
    }

    #[test]
    fn opens_beneath_and_refuses_escapes() {
        let base = std::env::temp_dir().join(format!("kubevmm-hostfs-{}", std::process::id()));
        let allowed = base.join("allowed");
        let outside = base.join("secret");
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(allowed.join("sub")).unwrap();
        std::fs::write(&outside, b"secret").unwrap();
        std::fs::write(allowed.join("sub/disk.img"), b"disk").unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("../secret", allowed.join("rel-link")).unwrap();
        std::os::unix::fs::symlink("sub/disk.img", allowed.join("inner-link")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root/etc/passwd", allowed.join("magic")).unwrap();
        let list = vec![allowed.clone()];
        let p = |name: &str| allowed.join(name).display().to_string();

        let fd = open_user_path(&list, "f", &p("sub/disk.img"), Access::DiskReadOnly).unwrap();
        assert_eq!(kind(&fd).unwrap(), libc::S_IFREG);
        open_user_path(&list, "f", &p("inner-link"), Access::Boot).unwrap();
        for name in ["abs-link", "rel-link", "magic"] {
            let e = open_user_path(&list, "f", &p(name), Access::Boot).unwrap_err();
            assert!(matches!(e, HostFsError::Escapes { .. }), "{name}: {e}");
        }
        let e = open_user_path(&list, "f", &p("sub"), Access::Boot).unwrap_err();
        assert!(
            matches!(
                e,
                HostFsError::NotAFile {
                    what: "a directory",
                    ..
                }
            ),
            "{e}"
        );
        let e = open_user_path(&list, "f", &p("missing"), Access::Boot).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn disk_locks_exclude_a_second_writer() {
        let base = std::env::temp_dir().join(format!("kubevmm-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("d.img"), b"d").unwrap();
        let list = vec![base.clone()];
        let path = base.join("d.img").display().to_string();
        let ro1 = open_user_path(&list, "a", &path, Access::DiskReadOnly).unwrap();
        let ro2 = open_user_path(&list, "b", &path, Access::DiskReadOnly).unwrap();
        let e = open_user_path(&list, "c", &path, Access::DiskReadWrite).unwrap_err();
        assert!(matches!(e, HostFsError::Locked { .. }), "{e}");
        drop(ro1);
        drop(ro2);
        let rw = open_user_path(&list, "c", &path, Access::DiskReadWrite).unwrap();
        let e = open_user_path(&list, "d", &path, Access::DiskReadOnly).unwrap_err();
        assert!(e.to_string().contains("in use by another VMM"), "{e}");
        drop(rw);
        let _ = std::fs::remove_dir_all(&base);
    }
}
