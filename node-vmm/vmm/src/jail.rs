//! The VMM confines itself before it reads any guest input, the way
//! Firecracker's jailer does, but in-process (the binary stays dynamically
//! linked: the loader ran before the chroot):
//!
//! 1. its own mount and IPC namespaces (the caller started it in a new PID
//!    namespace, so it is PID 1 there and sees no other process);
//! 2. `chroot` into an empty per-VM directory; nothing of the host's file
//!    system is reachable by path afterwards;
//! 3. no core dumps (`RLIMIT_CORE` 0, not dumpable: guest RAM never reaches
//!    a core file and no other process of the uid may ptrace it);
//! 4. every capability dropped from the bounding set, then an unprivileged
//!    uid/gid with no supplementary groups (which clears the permitted and
//!    effective sets), and `no_new_privs`.
//!
//! Everything the VMM uses afterwards was opened by its parent and handed
//! over as file descriptors (`config::HandedFds`). [`enter`] must run while
//! the process has one thread. [`verify`] reads back what the kernel says.

use std::path::{Path, PathBuf};

use crate::config::JailConfig;

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {step} failed: {source} (the VMM must start as root to jail itself)")]
    Sys {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("jail: chroot directory {path}: {source}")]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("jail: still privileged after dropping privileges: {0}")]
    StillPrivileged(String),
}

fn check(step: &'static str, rc: libc::c_int) -> Result<(), JailError> {
    if rc < 0 {
        Err(JailError::Sys {
            step,
            source: std::io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

/// Highest capability number to drop from the bounding set (reads the
/// kernel's value; 40 when unknown, and EINVAL past the last is ignored).
fn last_cap() -> libc::c_int {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Confines the calling process as described in the module docs.
pub fn enter(jail: &JailConfig) -> Result<(), JailError> {
    let root = Path::new(&jail.root);
    let meta = std::fs::metadata(root).map_err(|source| JailError::Root {
        path: root.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(JailError::Root {
            path: root.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
        });
    }
    let last = last_cap();
    let c_root = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).map_err(|_| {
        JailError::Root {
            path: root.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        }
    })?;
    // SAFETY: unshare takes flags only; the process is single-threaded here
    // (the caller's contract), as CLONE_NEWNS requires for a clean switch.
    check("unshare(mount, IPC)", unsafe {
        libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC)
    })?;
    // SAFETY: chroot and chdir read a NUL-terminated path we own.
    check("chroot", unsafe { libc::chroot(c_root.as_ptr()) })?;
    // SAFETY: as above, a static NUL-terminated string.
    check("chdir(/)", unsafe { libc::chdir(c"/".as_ptr()) })?;
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass.
    check("setrlimit(RLIMIT_CORE)", unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &raw const no_core)
    })?;
    // SAFETY: prctl with integer arguments only.
    check("prctl(PR_SET_DUMPABLE)", unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0)
    })?;
    for cap in 0..=last {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            check("prctl(PR_CAPBSET_DROP)", rc)?;
        }
    }
    // SAFETY: prctl with integer arguments only.
    check("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })?;
    // SAFETY: an empty group list.
    check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integer arguments only.
    check("setresgid", unsafe {
        libc::setresgid(jail.gid, jail.gid, jail.gid)
    })?;
    // SAFETY: integer arguments only. Leaving uid 0 for all three ids
    // clears the permitted, effective and ambient capability sets.
    check("setresuid", unsafe {
        libc::setresuid(jail.uid, jail.uid, jail.uid)
    })?;
    // SAFETY: prctl with integer arguments only.
    check("prctl(PR_SET_NO_NEW_PRIVS)", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    verify(jail.uid)
}

/// `capget` header, version 3.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `capget` data: version 3 uses two of these (64 capability bits).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Checks the kernel's view: the wanted uid, no effective or permitted
/// capability, `no_new_privs` set.
pub fn verify(uid: u32) -> Result<(), JailError> {
    let mut r = 0;
    let mut e = 0;
    let mut s = 0;
    // SAFETY: getresuid writes three u32s we own.
    check("getresuid", unsafe {
        libc::getresuid(&raw mut r, &raw mut e, &raw mut s)
    })?;
    if [r, e, s] != [uid; 3] {
        return Err(JailError::StillPrivileged(format!(
            "uids {r}/{e}/{s}, wanted {uid}"
        )));
    }
    let mut hdr = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a v3 header writes two `CapData` structs, which we provide.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut hdr, data.as_mut_ptr()) };
    check("capget", rc as libc::c_int)?;
    if data.iter().any(|d| d.effective != 0 || d.permitted != 0) {
        return Err(JailError::StillPrivileged(
            "capabilities remain in the effective or permitted set".into(),
        ));
    }
    // SAFETY: prctl with integer arguments only.
    let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    if nnp != 1 {
        return Err(JailError::StillPrivileged("no_new_privs is not set".into()));
    }
    Ok(())
}
