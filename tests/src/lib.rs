//! Test support for kubevmm's end-to-end tests.
//!
//! Each test binary starts **its own** local control plane (etcd,
//! kube-apiserver with TLS and RBAC, kube-controller-manager, our CRDs) with
//! `hack/cluster.sh` on free loopback ports and a private state directory,
//! and stops it when the binary exits. Tests never talk to a cluster they
//! did not start. Every test gets its own namespace.

pub mod apiserver;
pub mod http_server;
pub mod node_sim;
pub mod pki;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// What can go wrong while preparing a test cluster.
#[derive(Debug, thiserror::Error)]
pub enum SupportError {
    /// A command could not be started at all.
    #[error("cannot run {cmd}: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("{cmd} failed ({status}):\n{stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// No free loopback port.
    #[error("no free TCP port on 127.0.0.1: {0}")]
    Port(std::io::Error),
    /// The kubeconfig could not be loaded by the Rust client.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// Its path.
        path: PathBuf,
        /// What kube-rs said.
        message: String,
    },
}

/// The repository root (parent of `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Test ports come from 20000..32000, below the kernel's ephemeral range
/// (32768..61000 here), where nothing gets a port without asking for that
/// number: a port the kernel hands out for `:0` goes back into its pool
/// when the probe closes and can be taken by any other process (a client's
/// outgoing connection, or another test binary's probe) before our server
/// binds it. The range is cut into blocks; a test process owns a block by
/// holding an exclusive `flock` on its lock file (released when the process
/// ends, even by a crash), so test binaries running at once (make test runs
/// two) never hand out the same port.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;
const PORT_BLOCK: u16 = 200;

/// The port blocks this process owns and where it is in the newest one.
struct PortBlocks {
    /// The blocks' lock files, kept open (and locked) until the process ends.
    held: Vec<std::fs::File>,
    /// The next port to hand out.
    next: u16,
    /// The end of the current block.
    end: u16,
}

static PORTS: Mutex<PortBlocks> = Mutex::new(PortBlocks {
    held: Vec::new(),
    next: 0,
    end: 0,
});

/// Takes a block no other process holds; its first port.
fn take_port_block(held: &mut Vec<std::fs::File>) -> Result<u16, SupportError> {
    use std::os::fd::AsRawFd as _;
    let dir = std::env::temp_dir().join("kubevmm-test-ports");
    std::fs::create_dir_all(&dir).map_err(SupportError::Port)?;
    let blocks = (PORT_RANGE.end - PORT_RANGE.start) / PORT_BLOCK;
    // Start at a block derived from the pid, so processes seldom probe the
    // same lock first.
    let first = u16::try_from(std::process::id() % u32::from(blocks)).unwrap_or(0);
    for i in 0..blocks {
        let block = (first + i) % blocks;
        let start = PORT_RANGE.start + block * PORT_BLOCK;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{start}.lock")))
            .map_err(SupportError::Port)?;
        // SAFETY: flock on a descriptor this function owns; no memory effects.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            held.push(file);
            return Ok(start);
        }
    }
    Err(SupportError::Port(std::io::Error::other(format!(
        "every block of test ports in {PORT_RANGE:?} is held by another process"
    ))))
}

/// A free TCP port on 127.0.0.1 that no other test process is handed (see
/// [`PORT_RANGE`]): the next one of this process's block that nothing
/// listens on.
pub fn free_port() -> Result<u16, SupportError> {
    let mut guard = PORTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let blocks = &mut *guard;
    loop {
        if blocks.next >= blocks.end {
            blocks.next = take_port_block(&mut blocks.held)?;
            blocks.end = blocks.next + PORT_BLOCK;
        }
        let port = blocks.next;
        blocks.next += 1;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

fn run(cmd: &mut Command) -> Result<Output, SupportError> {
    let desc = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SupportError::Spawn {
            cmd: desc.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(SupportError::Failed {
            cmd: desc,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout),
        })
    }
}

/// A private control plane owned by this test process.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    env: ClusterEnv,
    kubeconfig: PathBuf,
}

static SHARED: OnceLock<ControlPlane> = OnceLock::new();
/// Environment selecting a control plane for `hack/cluster.sh`.
type ClusterEnv = Vec<(String, String)>;

static STOP_DIR: Mutex<Option<(PathBuf, ClusterEnv)>> = Mutex::new(None);

extern "C" fn stop_shared_at_exit() {
    let Ok(guard) = STOP_DIR.lock() else { return };
    if let Some((dir, env)) = guard.as_ref() {
        let stopped = Command::new(repo_root().join("hack/cluster.sh"))
            .args(["down", "--purge"])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        // Keep the state (logs) of a control plane that would not stop, for diagnosis.
        if stopped {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl ControlPlane {
    /// The control plane of this test binary, started on first use.
    ///
    /// Panics with the script's output when it cannot start: a test that
    /// needs the API server must fail loudly, never skip.
    pub fn shared() -> &'static ControlPlane {
        SHARED.get_or_init(|| match Self::start() {
            Ok(cp) => cp,
            Err(e) => panic!("cannot start the test control plane: {e}"),
        })
    }

    fn start() -> Result<Self, SupportError> {
        let dir = std::env::temp_dir().join(format!("kubevmm-test-cluster-{}", std::process::id()));
        let env: ClusterEnv = vec![
            ("KUBEVMM_CLUSTER_DIR".into(), dir.display().to_string()),
            ("KUBEVMM_APISERVER_PORT".into(), free_port()?.to_string()),
            ("KUBEVMM_ETCD_PORT".into(), free_port()?.to_string()),
            ("KUBEVMM_ETCD_PEER_PORT".into(), free_port()?.to_string()),
            ("KUBEVMM_KCM_PORT".into(), free_port()?.to_string()),
        ];
        *STOP_DIR.lock().expect("stop lock") = Some((dir.clone(), env.clone()));
        // SAFETY: registers a plain extern "C" function with no captured state;
        // it only reads a static behind a mutex and runs the stop script.
        unsafe {
            libc::atexit(stop_shared_at_exit);
        }
        run(Command::new(repo_root().join("hack/cluster.sh"))
            .arg("up")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str()))))?;
        let kubeconfig = dir.join("admin.kubeconfig");
        Ok(Self {
            dir,
            env,
            kubeconfig,
        })
    }

    /// The admin kubeconfig of this control plane.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The state directory (logs, certificates).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Environment variables that select this control plane for `hack/cluster.sh`.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// A `kubectl` command bound to this control plane.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new("kubectl");
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    /// A kube-rs client for this control plane.
    pub async fn client(&self) -> Result<kube::Client, SupportError> {
        let err = |message: String| SupportError::Kubeconfig {
            path: self.kubeconfig.clone(),
            message,
        };
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .map_err(|e| err(e.to_string()))?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| err(e.to_string()))?;
        kube::Client::try_from(config).map_err(|e| err(e.to_string()))
    }

    /// Creates a fresh namespace for one test (`<prefix>-<pid>-<n>`).
    pub fn namespace(&self, prefix: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        if let Err(e) = run(self.kubectl().args(["create", "namespace", &name])) {
            panic!("cannot create namespace {name}: {e}");
        }
        name
    }
}

/// Result of a command the test expects may fail: exit status and output.
#[derive(Debug)]
pub struct Outcome {
    /// Whether it exited 0.
    pub success: bool,
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
}

/// Runs a command feeding `input` on stdin and returns what happened.
pub fn run_with_input(cmd: &mut Command, input: &str) -> Outcome {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait for command");
    Outcome {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
/// The last 40 lines of a log or an output, for failure messages.
pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Where cargo put this workspace's binaries (`target/debug`), found from
/// the test executable (`target/debug/deps/<test>`), so `CARGO_TARGET_DIR`
/// works too. `make test` builds every binary before running tests.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests live in <target>/<profile>/deps, binaries in <target>/<profile>.
    let parent = exe.parent().expect("executable has a directory");
    let dir = if parent.ends_with("deps") {
        parent.parent().expect("deps has a parent")
    } else {
        parent
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace` (make test does) before the end-to-end tests",
        path.display()
    );
    path
}

/// `node-vmm agent` for node `node` on this control plane, state in `state`,
/// boot files allowed from `allowed`, `reserved_cpus` kept for the host,
/// metrics on a free port (add more flags to the command).
pub fn agent_command(
    cp: &ControlPlane,
    node: &str,
    state: &Path,
    allowed: &Path,
    reserved_cpus: &str,
) -> Command {
    let mut cmd = Command::new(bin_path("node-vmm"));
    cmd.env("KUBECONFIG", cp.kubeconfig())
        .args([
            "agent",
            "--node-name",
            node,
            "--reserved-cpus",
            reserved_cpus,
        ])
        .arg("--state-dir")
        .arg(state)
        .arg("--allowed-dir")
        .arg(allowed)
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{}", free_port().expect("port")));
    cmd
}

/// `kubevmm-operator` on this control plane for the VMs of namespace `ns`,
/// leader Lease `lease`, metrics on `metrics_port` (add more flags).
pub fn operator_command(cp: &ControlPlane, ns: &str, lease: &str, metrics_port: u16) -> Command {
    let mut cmd = Command::new(bin_path("kubevmm-operator"));
    cmd.arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["--namespace", ns, "--leader-lease", lease])
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{metrics_port}"));
    cmd
}

/// The benchmarks' agent: [`agent_command`] with no vCPU reserve.
pub fn bench_agent(cp: &ControlPlane, node: &str, state: &Path, allowed: &Path) -> Command {
    agent_command(cp, node, state, allowed, "0")
}

/// `GET path` from the HTTP server at `addr` (`host:port`): the whole
/// response, head and body; `None` while it does not answer.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    Some(response)
}

/// The body of a `200 OK` answer to `GET path` at `addr`.
pub fn http_get_ok(addr: &str, path: &str) -> Option<String> {
    let response = http_get(addr, path)?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?;
    (status == "200").then(|| body.to_string())
}

/// Builds the freestanding test guests and returns their directory
/// (`tests/guests/build`).
pub fn build_guests() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = repo_root().join("tests/guests");
            if let Err(e) = run(Command::new("make").arg("-s").arg("-C").arg(&dir)) {
                panic!("cannot build the test guests: {e}");
            }
            dir.join("build")
        })
        .clone()
}

/// A daemon started by a test; killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Option<std::process::Child>,
    /// Its combined stdout and stderr.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with its output in `log`.
    pub fn start(mut cmd: Command, log: PathBuf) -> Self {
        let file =
            std::fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = file.try_clone().expect("dup log fd");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Self {
            child: Some(child),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Sends a signal (e.g. `libc::SIGSTOP`).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or panics after
/// `seconds` with `what` and the last value `describe` gives.
pub fn wait_for<T>(
    seconds: u64,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    describe: impl Fn() -> String,
) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {seconds}s waiting for {what}; last state:\n{}",
            describe()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Tears down what a test's node agent left in its state directory `state`
/// (call after killing the agent): kills every VMM recorded there — guests
/// outlive the agent by design, and must not outlive the test — removes
/// their per-VM cgroups, then the directory.
pub fn kill_guests(state: &Path) {
    let Ok(dirs) = std::fs::read_dir(state.join("vms")) else {
        let _ = std::fs::remove_dir_all(state);
        return;
    };
    for d in dirs.flatten() {
        if let Some(pid) = std::fs::read(d.path().join("vmm.pid"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["pid"].as_i64())
        {
            // SAFETY: kill(2) of a VMM this test's agent started.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        // Its taps (persistent: they outlive the VMM), named as the agent
        // names them: `kvt` + the uid's first 8 hex digits + `n<index>`.
        let short: String = d
            .file_name()
            .to_string_lossy()
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(8)
            .collect();
        for tap in std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("kvt{short}n")))
        {
            let _ = Command::new("ip").args(["link", "del", &tap]).output();
        }
        // The VM's cgroups in every hierarchy (`kubevmm/<node>/vm-<uid>`):
        // empty once its processes are gone; retried briefly.
        let leaf = format!("vm-{}", d.file_name().to_string_lossy());
        for node_dir in cgroup_roots()
            .iter()
            .filter_map(|r| std::fs::read_dir(r.join("kubevmm")).ok())
            .flat_map(|entries| entries.flatten().map(|e| e.path()))
        {
            let cg = node_dir.join(&leaf);
            if !cg.exists() {
                continue;
            }
            for _ in 0..20 {
                if std::fs::remove_dir(&cg).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            // This test's node: its directory goes with its last VM.
            let _ = std::fs::remove_dir(&node_dir);
        }
    }
    let _ = std::fs::remove_dir_all(state);
}

/// Every cgroup mount (v2 and each v1 controller), from /proc/self/mounts.
pub fn cgroup_roots() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup2" || f[2] == "cgroup")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

/// CRC-32 (IEEE), as our `blk` test guest prints it for what it read.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd as _;

    #[test]
    fn free_ports_are_distinct_in_range_and_their_blocks_exclusive() {
        // Past one block: the process takes a second one.
        let ports: Vec<u16> = (0..PORT_BLOCK + 10)
            .map(|_| free_port().expect("port"))
            .collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        assert!(ports.iter().all(|p| PORT_RANGE.contains(p)), "{ports:?}");
        // Another open file description (as another process has) cannot
        // lock a block this process holds.
        let block = ports[0] - (ports[0] - PORT_RANGE.start) % PORT_BLOCK;
        let lock = std::env::temp_dir()
            .join("kubevmm-test-ports")
            .join(format!("{block}.lock"));
        let other = std::fs::File::open(&lock).expect("lock file");
        // SAFETY: flock on a descriptor this test owns.
        let r = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(r, -1, "block {block} could be taken twice");
    }
}
