//! VMM processes that outlive the agent (DESIGN.md decision 3).
//!
//! The agent never parents a VMM. It starts `node-vmm shim`, which forks
//! away into its own session (its parent becomes init), moves itself into the
//! VM's own cgroup, starts `kubevmm-vmm` as its child, records the VMM's pid
//! and, when the VMM ends, its exit status in the VM's state directory — as
//! conmon does for containers. An agent, new or restarted, finds everything it
//! needs in that directory: it re-adopts running VMMs by pid and start time,
//! and learns how a VMM ended from `exit.json`.

use std::fs;
use std::io::{Read as _, Write as _};
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::handoff::Handoff;
use super::lifecycle::Ended;

/// Errors of process supervision.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A state file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The shim could not be started.
    #[error("cannot start the VMM shim {exe}: {source}")]
    Spawn {
        /// The binary.
        exe: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The shim started but the VMM did not.
    #[error("the VMM did not start: {0}")]
    NoVmm(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SupervisorError + '_ {
    move |source| SupervisorError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A process identity that survives pid reuse: pid plus kernel start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    /// The pid.
    pub pid: i32,
    /// Field 22 of /proc/PID/stat (clock ticks since boot).
    pub start_time: u64,
}

/// Start time of `pid`, from /proc.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after ')' are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl ProcessId {
    /// Identity of a running process.
    pub fn of(pid: i32) -> Option<Self> {
        start_time(pid).map(|start_time| Self { pid, start_time })
    }

    /// Whether this very process still exists (not a reused pid, not a zombie).
    pub fn alive(&self) -> bool {
        let zombie = fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
            .unwrap_or(true);
        !zombie && start_time(self.pid) == Some(self.start_time)
    }
}

/// How the VMM process ended, written by the shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal, when it was killed.
    pub signal: Option<i32>,
    /// Last lines the VMM wrote on stderr (its reason).
    pub message: String,
}

impl ExitRecord {
    /// Maps the record to a lifecycle ending (`stopping` = we asked it to stop).
    pub fn ended(&self, stopping: bool) -> Ended {
        use kubevmm_vmm::exit::code;
        match (self.code, self.signal) {
            (Some(code::POWER_OFF), _) if stopping => Ended::ShutDownByUs,
            (Some(code::POWER_OFF), _) => Ended::PowerOff,
            (Some(code::REBOOT), _) => Ended::Reboot,
            (Some(code::GUEST_CRASH), _) => Ended::Crash(self.message.clone()),
            (_, _) if stopping => Ended::StoppedByUs,
            (Some(c), _) => Ended::VmmFailure(format!("exit code {c}: {}", self.message)),
            (None, Some(sig)) => Ended::VmmFailure(format!("killed by signal {sig}")),
            (None, None) => Ended::VmmFailure("ended without an exit status".into()),
        }
    }
}

/// The files of one VM on this node.
#[derive(Debug, Clone)]
pub struct VmDir(pub PathBuf);

impl VmDir {
    /// VMM config (JSON).
    pub fn config(&self) -> PathBuf {
        self.0.join("vmm.json")
    }
    /// Control socket.
    pub fn api_socket(&self) -> PathBuf {
        self.0.join("api.sock")
    }
    /// Guest serial console output: a console ring (`kubevmm_vmm::ring`)
    /// the VMM writes, kept across VMM and agent restarts.
    pub fn console_ring(&self) -> PathBuf {
        self.0.join("console.ring")
    }
    /// The console's listening socket, bound by the agent (0600) and handed
    /// to the VMM, which serves every client that connects.
    pub fn console_socket(&self) -> PathBuf {
        self.0.join("console.sock")
    }
    /// VMM stderr.
    pub fn vmm_log(&self) -> PathBuf {
        self.0.join("vmm.log")
    }
    /// Pid and start time of the running VMM.
    pub fn pid_file(&self) -> PathBuf {
        self.0.join("vmm.pid")
    }
    /// How the VMM ended.
    pub fn exit_file(&self) -> PathBuf {
        self.0.join("exit.json")
    }
    /// The empty directory the jailed VMM sees as `/`.
    pub fn jail_root(&self) -> PathBuf {
        self.0.join("root")
    }
    /// Which Kubernetes object this directory belongs to.
    pub fn owner_file(&self) -> PathBuf {
        self.0.join("owner.json")
    }

    /// The VMM recorded by the shim, if its pid file exists.
    pub fn vmm_pid(&self) -> Option<ProcessId> {
        serde_json::from_slice(&fs::read(self.pid_file()).ok()?).ok()
    }

    /// The exit record, once the VMM ended.
    pub fn exit_record(&self) -> Option<ExitRecord> {
        serde_json::from_slice(&fs::read(self.exit_file()).ok()?).ok()
    }
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename). The
/// temp file is new (`O_EXCL`, mode 0600, never through a symlink) and named
/// after the target and this process, so two writers never share it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SupervisorError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// Starts the shim for `dir`, handing it `fds`, and waits until the VMM
/// process exists. The shim joins `cgroups` and starts the VMM in a new PID
/// namespace.
pub fn spawn(
    node_vmm: &Path,
    vmm: &Path,
    dir: &VmDir,
    cgroups: &[PathBuf],
    fds: &Handoff,
) -> Result<ProcessId, SupervisorError> {
    for stale in [dir.pid_file(), dir.exit_file()] {
        let _ = fs::remove_file(stale);
    }
    let mut cmd = Command::new(node_vmm);
    cmd.arg("shim")
        .arg("--dir")
        .arg(&dir.0)
        .arg("--vmm")
        .arg(vmm)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for cg in cgroups {
        cmd.arg("--cgroup").arg(cg);
    }
    cmd.arg("--fds").arg(fds.count().to_string());
    fds.install(&mut cmd);
    // The shim's first process returns once its forked half has recorded
    // the VMM's pid, or failed (see `shim_main`): no polling here.
    let status = cmd.status().map_err(|source| SupervisorError::Spawn {
        exe: node_vmm.to_path_buf(),
        source,
    })?;
    if !status.success() {
        return Err(SupervisorError::NoVmm(format!(
            "the shim exited with {status}: no VMM recorded (no fork, or its forked half took over {}s); see {}",
            RECORD_WITHIN.as_secs(),
            dir.vmm_log().display()
        )));
    }
    if let Some(pid) = dir.vmm_pid() {
        return Ok(pid);
    }
    Err(SupervisorError::NoVmm(dir.exit_record().map_or_else(
        || format!("the shim recorded no VMM; see {}", dir.vmm_log().display()),
        |rec| rec.message,
    )))
}

/// Waits until process `id` ends (pidfd; polls /proc where pidfd is missing).
pub async fn wait_exit(id: ProcessId) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
    // no memory is shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, id.pid, 0) };
    if fd >= 0 && id.alive() {
        // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the OwnedFd moves into the AsyncFd, so the descriptor stays
        // open exactly as long as it is registered with the reactor.
        if let Ok(afd) = unsafe { tokio::io::unix::AsyncFd::register(owned) } {
            let _ = afd.readable().await;
            return;
        }
    } else if fd >= 0 {
        // SAFETY: as above; closing it is all we do.
        drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    while id.alive() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Kills process `id` with SIGKILL if it is still the same process.
pub fn kill(id: ProcessId) {
    if id.alive() {
        // SAFETY: plain kill(2) on a pid we verified by start time just now.
        unsafe {
            libc::kill(id.pid, libc::SIGKILL);
        }
    }
}

/// Largest `vmm.log` a new run starts with; older output is dropped.
const VMM_LOG_LIMIT: u64 = 1 << 20;

/// Keeps only the newest quarter of `path` once it has grown past `limit`.
fn trim_log(path: &Path, limit: u64) {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let Ok(mut f) = fs::OpenOptions::new().read(true).write(true).open(path) else {
        return;
    };
    let len = f.metadata().map_or(0, |m| m.len());
    if len <= limit {
        return;
    }
    let keep = limit / 4;
    let mut tail = Vec::new();
    if f.seek(SeekFrom::Start(len - keep)).is_ok()
        && (&mut f).take(keep).read_to_end(&mut tail).is_ok()
    {
        let _ = f.set_len(0);
        let _ = f.seek(SeekFrom::Start(0));
        let _ = f.write_all(b"[node-vmm: older VMM output dropped]\n");
        let _ = f.write_all(&tail);
    }
}

/// The last `n` non-empty lines of `path` written at or after offset
/// `from`, reading at most its last 8 KiB.
fn last_lines(path: &Path, from: u64, n: usize) -> String {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut tail = Vec::new();
    if let Ok(mut f) = fs::File::open(path) {
        let len = f.metadata().map_or(0, |m| m.len());
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192).max(from)));
        let _ = f.take(8192).read_to_end(&mut tail);
    }
    let text = String::from_utf8_lossy(&tail);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Joins the VM's cgroups (outside the agent's: the limits were written by
/// the agent, joining is what puts the shim and its VMM under them) and
/// makes the next child PID 1 of a new PID namespace, where the VMM sees no
/// other process. Returns a note for the log when there is no PID namespace.
fn enter_cgroups_and_pid_ns(cgroups: &[PathBuf]) -> Result<Option<String>, String> {
    for cg in cgroups {
        fs::write(cg.join("cgroup.procs"), b"0")
            .map_err(|e| format!("cannot join cgroup {}: {e}", cg.display()))?;
    }
    // SAFETY: unshare takes flags only; the shim is single-threaded.
    Ok((unsafe { libc::unshare(libc::CLONE_NEWPID) } < 0).then(|| {
        format!(
            "node-vmm shim: no PID namespace for the VMM: {}\n",
            std::io::Error::last_os_error()
        )
    }))
}

/// `node-vmm shim --dir DIR --vmm BIN [--cgroup CG]... --fds N`: see the
/// module docs. Fds `3..3+N` are the VMM's, inherited from the agent.
pub fn shim_main(dir: &Path, vmm: &Path, cgroups: &[PathBuf], fds: usize) -> ExitCode {
    // The forked half says on this pipe (close-on-exec: the VMM never holds
    // it) that the VMM's pid is recorded; its end closing (it failed and
    // exited) says the same of the exit record.
    let Ok((mut recorded, recording)) = cloexec_pipe() else {
        return ExitCode::FAILURE;
    };
    // SAFETY: the shim has started no threads yet, so fork is safe; the
    // parent only waits on the pipe and returns.
    match unsafe { libc::fork() } {
        -1 => ExitCode::FAILURE,
        0 => {
            drop(recorded);
            supervise(dir, vmm, cgroups, fds, recording)
        }
        _ => {
            drop(recording);
            if recorded_within(&recorded, RECORD_WITHIN) {
                let _ = recorded.read(&mut [0u8]);
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// How long the shim's first process waits for its forked half to record
/// the VMM (a fork, cgroup writes and an exec; milliseconds as a rule): a
/// stuck half must not hold the agent's start for ever.
const RECORD_WITHIN: Duration = Duration::from_secs(5);

/// Whether `pipe` has something to read (a byte, or its end closed) within
/// `limit`.
fn recorded_within(pipe: &fs::File, limit: Duration) -> bool {
    use std::os::fd::AsRawFd as _;
    let mut fd = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: poll reads and writes the one pollfd we pass, for the call only.
    unsafe { libc::poll(&raw mut fd, 1, ms) > 0 }
}

/// A pipe whose ends close on exec: (read end, write end).
fn cloexec_pipe() -> std::io::Result<(fs::File, fs::File)> {
    let mut ends = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `ends`, which we own
    // from here on.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just returned by pipe2 and belong to nothing else.
    Ok(unsafe {
        (
            fs::File::from_raw_fd(ends[0]),
            fs::File::from_raw_fd(ends[1]),
        )
    })
}

/// The shim's forked half: joins the VM's cgroups, starts the VMM, records
/// its pid (then says so on `recording`), waits for it and records how it
/// ended.
fn supervise(
    dir: &Path,
    vmm: &Path,
    cgroups: &[PathBuf],
    fds: usize,
    recording: fs::File,
) -> ExitCode {
    // SAFETY: setsid has no memory effects; it detaches from the agent's session.
    unsafe {
        libc::setsid();
    }
    let dir = VmDir(dir.to_path_buf());
    let fail = |message: String| {
        let rec = ExitRecord {
            code: Some(kubevmm_vmm::exit::code::VMM_ERROR),
            signal: None,
            message,
        };
        let _ = write_atomic(
            &dir.exit_file(),
            &serde_json::to_vec(&rec).unwrap_or_default(),
        );
        ExitCode::FAILURE
    };
    let cgroup_note = match enter_cgroups_and_pid_ns(cgroups) {
        Ok(note) => note,
        Err(e) => return fail(e),
    };
    // Each run appends to vmm.log: keep it bounded across restarts.
    trim_log(&dir.vmm_log(), VMM_LOG_LIMIT);
    let log = match fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(dir.vmm_log())
    {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot open {}: {e}", dir.vmm_log().display())),
    };
    // This run's output starts here: an exit message never quotes an
    // earlier run's (a crash loop would repeat the same lines).
    let run_start = log.metadata().map_or(0, |m| m.len());
    if let Some(note) = cgroup_note {
        let _ = (&log).write_all(note.as_bytes());
    }
    let err_log = match log.try_clone() {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot duplicate the log fd: {e}")),
    };
    let mut child = match Command::new(vmm)
        .arg("--config")
        .arg(dir.config())
        .arg("--api-sock")
        .arg(dir.api_socket())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log)
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start {}: {e}", vmm.display())),
    };
    // The VMM holds its own copies now; the shim keeps none (a disk lock
    // must end with the VMM).
    for fd in 0..fds {
        // SAFETY: closes the inherited descriptors 3..3+fds, which nothing
        // in the shim uses.
        unsafe {
            libc::close(super::handoff::FIRST + fd as i32);
        }
    }
    let pid = child.id() as i32;
    let Some(id) = ProcessId::of(pid) else {
        return fail("the VMM exited before it could be recorded".into());
    };
    if let Err(e) = write_atomic(
        &dir.pid_file(),
        &serde_json::to_vec(&id).unwrap_or_default(),
    ) {
        let _ = child.kill();
        return fail(e.to_string());
    }
    let _ = (&recording).write_all(b"1");
    drop(recording);
    let status = child.wait();
    let rec = match status {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt as _;
            ExitRecord {
                code: st.code(),
                signal: st.signal(),
                message: last_lines(&dir.vmm_log(), run_start, 3),
            }
        }
        Err(e) => ExitRecord {
            code: None,
            signal: None,
            message: format!("cannot wait for the VMM: {e}"),
        },
    };
    let _ = write_atomic(
        &dir.exit_file(),
        &serde_json::to_vec(&rec).unwrap_or_default(),
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_identity() {
        let me = ProcessId::of(std::process::id() as i32).expect("self in /proc");
        assert!(me.alive());
        let other = ProcessId {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        assert!(!other.alive(), "a reused pid is not the same process");
    }

    #[test]
    fn exit_message_quotes_only_this_runs_output() {
        let p = std::env::temp_dir().join(format!("kubevmm-lastlines-{}", std::process::id()));
        fs::write(&p, "vmm: triple fault\n").unwrap();
        let start = fs::metadata(&p).unwrap().len();
        assert_eq!(last_lines(&p, start, 3), "", "nothing from this run yet");
        let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"\nvmm: triple fault\n").unwrap();
        assert_eq!(last_lines(&p, start, 3), "vmm: triple fault");
        f.write_all(b"a\nb\nc\nd\n").unwrap();
        assert_eq!(last_lines(&p, 0, 3), "b | c | d");
        let _ = fs::remove_file(&p);
    }

    #[test]
    fn vmm_log_is_trimmed_to_its_newest_part() {
        let p = std::env::temp_dir().join(format!("kubevmm-vmmlog-{}", std::process::id()));
        let text = (0..2000).fold(String::new(), |mut t, i| {
            let _ = std::fmt::Write::write_fmt(&mut t, format_args!("line {i:05}\n"));
            t
        });
        fs::write(&p, &text).unwrap();
        trim_log(&p, 4096);
        let after = fs::read_to_string(&p).unwrap();
        assert!(after.len() < 1100, "{} bytes left", after.len());
        assert!(after.starts_with("[node-vmm: older VMM output dropped]"));
        assert!(after.ends_with("line 01999\n"));
        trim_log(&p, 4096);
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            after,
            "small logs are kept"
        );
        let _ = fs::remove_file(&p);
    }

    #[test]
    fn exit_records_map_to_endings() {
        let rec = |code, signal| ExitRecord {
            code,
            signal,
            message: "why".into(),
        };
        assert_eq!(rec(Some(0), None).ended(false), Ended::PowerOff);
        assert_eq!(rec(Some(0), None).ended(true), Ended::ShutDownByUs);
        assert_eq!(rec(Some(4), None).ended(true), Ended::StoppedByUs);
        assert_eq!(rec(Some(2), None).ended(false), Ended::Crash("why".into()));
        assert_eq!(rec(Some(3), None).ended(false), Ended::Reboot);
        assert!(
            matches!(rec(None, Some(9)).ended(false), Ended::VmmFailure(m) if m.contains("signal 9"))
        );
        assert!(matches!(
            rec(Some(1), None).ended(false),
            Ended::VmmFailure(_)
        ));
    }
}
