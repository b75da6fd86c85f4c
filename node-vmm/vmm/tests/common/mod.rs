//! Test harness: builds the guests in tests/guests, runs the VMM binary on
//! the real /dev/kvm, and collects its output.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kubevmm_vmm::config::{SerialConfig, SerialMode};
use kubevmm_vmm::VmConfig;

/// Generous guard against a hung guest; not a performance assertion.
pub const HANG_GUARD: Duration = Duration::from_secs(120);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Fails (never skips) when KVM is missing.
pub fn require_kvm() {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if let Err(e) = f {
        panic!("/dev/kvm is not usable ({e}): the VMM tests need KVM on this machine");
    }
}

/// Builds all guests once per test run and returns the path of `name`.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            let dir = repo_root().join("tests/guests");
            let out = Command::new("make")
                .arg("-s")
                .arg("-C")
                .arg(&dir)
                .output()
                .map_err(|e| format!("cannot run make for the test guests: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "building test guests failed:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(dir.join("build"))
        })
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    let p = dir.join(format!("{name}.elf"));
    assert!(p.is_file(), "guest {name} was not built at {}", p.display());
    p
}

/// Removes scratch directories of test processes that are gone (kept
/// until the next run, for a look after a failure).
fn sweep_stale_scratch() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("kubevmm-vmm-test-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A private scratch directory for one test.
pub fn scratch(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_stale_scratch);
    let dir = std::env::temp_dir().join(format!(
        "kubevmm-vmm-test-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A config booting guest `name` with serial output to a log file in `dir`.
pub fn config(name: &str, dir: &Path) -> VmConfig {
    let mut c = VmConfig::new(guest(name), 64 << 20);
    c.serial = SerialConfig {
        mode: SerialMode::File,
        path: Some(dir.join("serial.log")),
        log: None,
        ..SerialConfig::default()
    };
    c
}

pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kubevmm-vmm")
}

/// A running VMM process, killed and reaped when dropped, so a failing or
/// panicking test never leaves a guest spinning behind it. Its stdout and
/// stderr (when piped) are read from the start by threads of their own: a
/// VMM that writes more than a pipe holds (64 KiB) would otherwise block,
/// and its guest with it, until the test reads.
#[derive(Debug)]
pub struct Vmm {
    child: Option<Child>,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Vmm {
    pub fn new(mut child: Child) -> Self {
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        Self {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    /// Everything the child wrote to stdout and stderr, once it has exited
    /// (or has been killed).
    fn output(&mut self) -> (String, String) {
        let join = |h: Option<std::thread::JoinHandle<String>>| {
            h.map(|h| h.join().unwrap()).unwrap_or_default()
        };
        (join(self.stdout.take()), join(self.stderr.take()))
    }
}

/// Reads a child's pipe to its end on a thread of its own.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        // A read error ends the output; what came before is kept.
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

impl std::ops::Deref for Vmm {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.child.as_ref().expect("child present")
    }
}

impl std::ops::DerefMut for Vmm {
    fn deref_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present")
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes `config` to `dir/name` and starts the VMM on it through `command`
/// (the VMM binary, or a wrapper such as `ip netns exec NS` before it).
pub fn spawn_with(mut command: Command, config: &VmConfig, dir: &Path, name: &str) -> Vmm {
    require_kvm();
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    Vmm::new(
        command
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kubevmm-vmm"),
    )
}

pub fn spawn(config: &VmConfig, dir: &Path) -> Vmm {
    spawn_with(Command::new(vmm_bin()), config, dir, "vm.json")
}

#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub serial: String,
}

pub fn serial_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default()
}

/// Waits for the child (killing it after the hang guard) and collects output.
pub fn wait(child: Vmm, dir: &Path) -> Outcome {
    wait_within(child, dir, HANG_GUARD)
}

/// Like `wait`, with a different guard.
pub fn wait_within(mut child: Vmm, dir: &Path, guard: Duration) -> Outcome {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > guard {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "VMM did not exit within {guard:?}; serial:\n{}",
                serial_log(dir)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = child.output();
    Outcome {
        code: status.code(),
        stdout,
        stderr,
        serial: serial_log(dir),
    }
}

pub fn run(config: &VmConfig, dir: &Path) -> Outcome {
    wait(spawn(config, dir), dir)
}

/// Polls `f` until it returns Some or the hang guard expires.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < HANG_GUARD, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP request on the VMM's API socket; returns (status, JSON body).
pub fn api(sock: &Path, method: &str, path: &str) -> (u16, serde_json::Value) {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect API socket");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: vmm\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).expect("JSON body"))
}

/// Runs `ip ARGS`, failing the test on error; returns stdout.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with tap `tap0` (10.0.2.2/24, up), removed on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Self {
        let ns = Self(format!("kvmm{tag}{}", std::process::id()));
        let _ = Command::new("ip")
            .args(["netns", "del", &ns.0])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &ns.0]);
        ip(&[
            "-n", &ns.0, "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr",
        ]);
        ip(&["-n", &ns.0, "addr", "add", "10.0.2.2/24", "dev", "tap0"]);
        ip(&["-n", &ns.0, "link", "set", "tap0", "up"]);
        ns
    }

    pub fn vmm_command(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, vmm_bin()]);
        c
    }

    /// A UDP socket living in the namespace (made by a thread that entered
    /// it; the socket stays in the namespace it was created in).
    pub fn udp_socket(&self) -> std::net::UdpSocket {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on a valid namespace fd; it only moves this
            // short-lived thread into the namespace.
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::UdpSocket::bind("0.0.0.0:0").expect("bind UDP in the namespace")
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Starts the VMM with `fds` inherited at 3, 4, ... (in that order), as
/// the agent hands them over; `config` names them.
pub fn spawn_handed(config: &VmConfig, dir: &Path, fds: &[std::os::fd::OwnedFd]) -> Vmm {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt as _;
    // Park the sources above the targets, so placing one never closes
    // another still to be placed.
    let parked: Vec<std::os::fd::OwnedFd> = fds
        .iter()
        .map(|fd| {
            // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own.
            let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 512) };
            assert!(n >= 0, "dup: {}", std::io::Error::last_os_error());
            // SAFETY: a fresh descriptor, owned by nobody else.
            unsafe { std::os::fd::FromRawFd::from_raw_fd(n) }
        })
        .collect();
    let sources: Vec<i32> = parked.iter().map(AsRawFd::as_raw_fd).collect();
    let mut command = Command::new(vmm_bin());
    // SAFETY: runs between fork and exec and only calls dup2, which is
    // async-signal-safe, on descriptors this process owns.
    unsafe {
        command.pre_exec(move || {
            for (i, &src) in sources.iter().enumerate() {
                if libc::dup2(src, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let vmm = spawn_with(command, config, dir, "vm.json");
    drop(parked);
    vmm
}

/// Everything a console ring holds, as text.
pub fn ring_text(path: &Path) -> String {
    kubevmm_vmm::ring::RingReader::open(path)
        .and_then(|r| r.read_from(0, usize::MAX))
        .map(|c| String::from_utf8_lossy(&c.bytes).into_owned())
        .unwrap_or_default()
}

/// CRC-32 (IEEE), as the test guests compute it over what they wrote or read.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}
