//! File descriptors the agent opened for a VMM, handed down to it at fixed
//! numbers (3, 4, ...) through the shim. The agent keeps them above
//! [`PARK`] until the child is forked, so installing them at their targets
//! (`dup2` in the child, between fork and exec) never overwrites one that is
//! still to be installed; `dup2` also clears close-on-exec on the target.

use std::os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// First fd number handed to the child.
pub const FIRST: RawFd = 3;
/// Descriptors wait at or above this number in the agent.
const PARK: RawFd = 512;
/// At most this many fds are handed over (devices + kvm + boot + console + api).
pub const MAX: usize = 64;

/// Errors while collecting fds.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// Too many.
    #[error("more than {MAX} descriptors to hand to the VMM")]
    TooMany,
    /// fcntl failed.
    #[error("cannot move a descriptor for the VMM: {0}")]
    Dup(std::io::Error),
}

/// The fds for one VMM, in target order.
#[derive(Debug, Default)]
pub struct Handoff {
    fds: Vec<OwnedFd>,
}

impl Handoff {
    /// Adds `fd`; returns the number the VMM will see it as.
    pub fn add(&mut self, fd: &OwnedFd) -> Result<i32, HandoffError> {
        if self.fds.len() >= MAX {
            return Err(HandoffError::TooMany);
        }
        // SAFETY: F_DUPFD_CLOEXEC duplicates an fd we own to a new number ≥ PARK.
        let parked = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, PARK) };
        if parked < 0 {
            return Err(HandoffError::Dup(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor from fcntl, owned by nobody else.
        self.fds.push(unsafe { OwnedFd::from_raw_fd(parked) });
        Ok(FIRST + self.fds.len() as i32 - 1)
    }

    /// How many fds are handed over.
    pub fn count(&self) -> usize {
        self.fds.len()
    }

    /// Makes `cmd`'s child receive the fds at `FIRST..FIRST + len`.
    pub fn install(&self, cmd: &mut Command) {
        let sources = self.sources();
        // SAFETY: the closure runs in the forked child before exec and only
        // calls dup2, which is async-signal-safe; `sources` was built before
        // the fork and is only read.
        unsafe {
            cmd.pre_exec(move || place(&sources));
        }
    }

    /// Installs the fds at their numbers in this very process (a forked
    /// child that runs the VMM in-process). Whatever held those numbers is
    /// replaced.
    pub fn install_here(&self) -> std::io::Result<()> {
        place(&self.sources())
    }

    fn sources(&self) -> Vec<RawFd> {
        self.fds.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

/// `dup2(sources[i], FIRST + i)`; async-signal-safe.
fn place(sources: &[RawFd]) -> std::io::Result<()> {
    for (i, &src) in sources.iter().enumerate() {
        // SAFETY: dup2 on descriptors we own; the targets are ours to replace.
        if unsafe { libc::dup2(src, FIRST + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_sees_the_fds_at_their_numbers() {
        let dir = std::env::temp_dir().join(format!("kubevmm-handoff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut h = Handoff::default();
        let mut want = Vec::new();
        for i in 0..5 {
            let p = dir.join(format!("f{i}"));
            std::fs::write(&p, format!("file {i}")).unwrap();
            let f = OwnedFd::from(std::fs::File::open(&p).unwrap());
            want.push((h.add(&f).unwrap(), format!("file {i}")));
        }
        let script = want.iter().fold(String::new(), |mut s, (fd, _)| {
            let _ = std::fmt::Write::write_fmt(&mut s, format_args!("cat <&{fd}; echo; "));
            s
        });
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]);
        h.install(&mut cmd);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            want.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
