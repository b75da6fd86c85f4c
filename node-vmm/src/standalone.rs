//! `node-vmm run FILE.yaml`: boot one `VirtualMachine` manifest on this host
//! with no cluster (DESIGN.md decision 5). The manifest is checked with the
//! CRD's rules, turned into a VMM config by the same code the node agent
//! uses (`agent::prepare`), and run in a child process with the console on
//! the terminal, jailed like the agent's VMMs when run as root. Paths are
//! used as given (no allow-list); empty disks are fresh for every run, in a
//! private directory.

use std::path::{Path, PathBuf};

use kubevmm_crds::VirtualMachine;
use kubevmm_vmm::config::{SerialConfig, SerialMode};
use kubevmm_vmm::VmConfig;

use crate::agent::handoff::Handoff;
use crate::agent::prepare::{self, NodeContext, PrepareError};
use crate::agent::supervisor::VmDir;

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("cannot read manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {path} is not a valid VirtualMachine: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("manifest {path}: kind is {kind:?}, expected VirtualMachine")]
    Kind { path: PathBuf, kind: String },
    #[error("manifest is invalid: {0}")]
    Invalid(String),
    #[error("{0} (standalone mode)")]
    Prepare(#[from] PrepareError),
    #[error("{0} (standalone mode)")]
    Host(String),
}

/// Reads and parses a manifest file.
pub fn load_manifest(path: &Path) -> Result<VirtualMachine, StandaloneError> {
    let text = std::fs::read_to_string(path).map_err(|source| StandaloneError::Read {
        path: path.to_owned(),
        source,
    })?;
    let raw: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|source| StandaloneError::Parse {
            path: path.to_owned(),
            source,
        })?;
    let kind = raw
        .get("kind")
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or_default();
    if kind != "VirtualMachine" {
        return Err(StandaloneError::Kind {
            path: path.to_owned(),
            kind: kind.to_owned(),
        });
    }
    serde_yaml::from_value(raw).map_err(|source| StandaloneError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// A stable pseudo-uid for a standalone VM (names its taps and state).
fn local_uid(name: &str) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// A private state directory: `mkdtemp` (unpredictable name, mode 0700).
fn private_dir() -> Result<VmDir, StandaloneError> {
    let template = std::env::temp_dir().join("kubevmm-standalone-XXXXXX");
    let mut bytes = template.into_os_string().into_encoded_bytes();
    bytes.push(0);
    // SAFETY: mkdtemp rewrites the XXXXXX of the NUL-terminated buffer we own.
    let p = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(StandaloneError::Host(format!(
            "cannot create a private directory in {}: {}",
            std::env::temp_dir().display(),
            std::io::Error::last_os_error()
        )));
    }
    bytes.pop();
    // SAFETY: the bytes came from an OsString and mkdtemp only replaced ASCII.
    let path = PathBuf::from(unsafe { std::ffi::OsString::from_encoded_bytes_unchecked(bytes) });
    Ok(VmDir(path))
}

/// What `run` needs to start the VMM: the config naming fds, the fds, and
/// the state to release afterwards.
#[derive(Debug)]
pub struct Prepared {
    /// The VMM config.
    pub config: VmConfig,
    /// The descriptors it names.
    pub fds: Handoff,
    /// The plan (taps to release).
    pub plan: prepare::Plan,
    /// The private state directory.
    pub dir: VmDir,
}

/// Validates the manifest and builds its VMM config; creates empty disks
/// (fresh, in a private directory) and taps, and opens everything the VMM
/// uses. With `jail_id`, the VMM runs confined as that uid.
pub fn prepare(
    vm: &VirtualMachine,
    console_log: Option<&Path>,
    jail_id: Option<u32>,
) -> Result<Prepared, StandaloneError> {
    kubevmm_crds::validation::validate_vm_spec(&vm.spec)
        .map_err(|e| StandaloneError::Invalid(e.to_string()))?;
    let name = vm.metadata.name.clone().unwrap_or_else(|| "vm".into());
    let uid = local_uid(&name);
    let dir = private_dir()?;
    // Standalone: the person running it owns the machine; paths are used
    // as given (still opened without magic links), any bridge may be named.
    let ctx = NodeContext {
        allowed_dirs: vec![PathBuf::from("/")],
        allowed_bridges: vm
            .spec
            .networks
            .iter()
            .filter_map(|n| n.bridge.as_ref().map(|b| b.name.clone()))
            .collect(),
        max_empty_disk: u64::MAX,
        // No cluster, no VirtualMachineImages: boot images are refused by name.
        images: std::collections::BTreeMap::new(),
        masquerade_bridge: None,
    };
    let mut plan = prepare::plan(
        &vm.spec,
        prepare::VmId {
            uid: &uid,
            name: &name,
            namespace: "",
        },
        &dir,
        // Standalone disks are as temporary as the rest of the run.
        &crate::agent::disks::DiskDir(dir.0.join("disks")),
        &ctx,
    )?;
    // The console is the terminal: no ring, no socket for `realize` to
    // open. A --console-log copy is plain text, opened below.
    plan.config.serial = SerialConfig {
        mode: SerialMode::Stdout,
        ..SerialConfig::default()
    };
    let (mut config, mut fds) = prepare::realize(&plan, &dir, &ctx, jail_id)?;
    if vm.spec.boot.cmdline.is_none() {
        config.cmdline = "console=ttyS0".into();
    }
    config.serial.log = console_log.map(Path::to_owned);
    config.api_socket = None;
    config.fds.api = None;
    if let Some(log) = console_log {
        let f: std::os::fd::OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(log)
            .map_err(|e| StandaloneError::Host(format!("--console-log {}: {e}", log.display())))?
            .into();
        config.fds.serial_log = Some(
            fds.add(&f)
                .map_err(|e| StandaloneError::Host(e.to_string()))?,
        );
    }
    Ok(Prepared {
        config,
        fds,
        plan,
        dir,
    })
}

/// In the forked child: the fds at their numbers, the jail, the machine.
fn child(p: &Prepared) -> i32 {
    // SAFETY: prctl with constant arguments: the VMM dies with `node-vmm run`
    // (Ctrl-C), which a PID-namespace init would otherwise ignore.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if let Err(e) = p.fds.install_here() {
        eprintln!("node-vmm: cannot hand descriptors to the VMM: {e}");
        return kubevmm_vmm::exit::code::VMM_ERROR;
    }
    if let Some(jail) = &p.config.jail {
        kubevmm_vmm::rss::preopen();
        if let Err(e) = kubevmm_vmm::jail::enter(jail) {
            eprintln!("node-vmm: {e}");
            return kubevmm_vmm::exit::code::VMM_ERROR;
        }
    }
    match kubevmm_vmm::run(p.config.clone()) {
        Ok(reason) => {
            if reason != kubevmm_vmm::ExitReason::PowerOff {
                eprintln!("node-vmm: {}", reason.describe());
            }
            reason.code()
        }
        Err(e) => {
            eprintln!("node-vmm: {e}");
            kubevmm_vmm::exit::code::VMM_ERROR
        }
    }
}

/// Runs the VM until the guest stops; returns the VMM exit code. As root,
/// the VMM is jailed (own PID, mount and IPC namespaces, chroot, an
/// unprivileged uid, no capabilities); otherwise it says so and runs as the
/// calling user.
pub fn run(manifest: &Path, console_log: Option<&Path>) -> Result<i32, StandaloneError> {
    // Paths are used as given and must be absolute, exactly as in a cluster.
    let vm = load_manifest(manifest)?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let uid = local_uid(vm.metadata.name.as_deref().unwrap_or("vm"));
    let jail_id = root.then(|| {
        crate::agent::jail_ids::pick(
            &uid,
            &std::collections::HashSet::new(),
            crate::agent::jail_ids::Range::default(),
        )
        .unwrap_or(crate::agent::jail_ids::DEFAULT_BASE)
    });
    if !root {
        eprintln!("node-vmm: not running as root: the VMM is not jailed (no uid change, namespaces, chroot); run as root to jail it");
    }
    let prepared = prepare(&vm, console_log, jail_id)?;
    // SAFETY: unshare takes flags only; `node-vmm run` is single-threaded.
    if root && unsafe { libc::unshare(libc::CLONE_NEWPID) } < 0 {
        eprintln!(
            "node-vmm: no PID namespace for the VMM: {}",
            std::io::Error::last_os_error()
        );
    }
    let name = vm.metadata.name.clone().unwrap_or_else(|| "vm".into());
    eprintln!(
        "node-vmm: {name}: {}",
        kubevmm_crds::PrintableStatus::Starting
    );
    // SAFETY: this process has one thread, so the child may run anything.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        std::process::exit(child(&prepared));
    }
    let code = if pid < 0 {
        eprintln!("node-vmm: fork failed: {}", std::io::Error::last_os_error());
        kubevmm_vmm::exit::code::VMM_ERROR
    } else {
        drop(prepared.fds);
        interrupt_handlers();
        let mut status = 0;
        // SAFETY: waits for our own child, writing into a local.
        while unsafe { libc::waitpid(pid, &raw mut status, 0) } < 0 {
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
            if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
                // The jailed VMM is a PID-namespace init: only SIGKILL stops it.
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let exited = libc::WIFEXITED(status);
        let record = crate::agent::supervisor::ExitRecord {
            code: exited.then(|| libc::WEXITSTATUS(status)),
            signal: (!exited).then(|| libc::WTERMSIG(status)),
            message: String::new(),
        };
        let stopped = INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst);
        eprintln!("node-vmm: {name}: {}", final_status(&record, stopped));
        if exited {
            libc::WEXITSTATUS(status)
        } else {
            eprintln!(
                "node-vmm: the VMM was killed by signal {}",
                libc::WTERMSIG(status)
            );
            kubevmm_vmm::exit::code::VMM_ERROR
        }
    };
    crate::agent::taps::release_taps(&uid, prepared.plan.taps.len());
    let _ = std::fs::remove_dir_all(&prepared.dir.0);
    Ok(code)
}

/// The status word a cluster would show for a run that ended so (a
/// standalone run is `runStrategy: Once`): `Succeeded` after a power-off,
/// `Stopped` after Ctrl-C, `Failed` after a crash.
fn final_status(
    record: &crate::agent::supervisor::ExitRecord,
    stopped: bool,
) -> kubevmm_crds::PrintableStatus {
    use crate::agent::lifecycle::{after_exit, AfterExit};
    let phase = match after_exit(
        kubevmm_crds::RunStrategy::Once,
        &record.ended(stopped),
        0,
        std::time::Duration::ZERO,
    ) {
        AfterExit::Stay(phase) => phase,
        AfterExit::Restart(_) => kubevmm_crds::VmPhase::Starting,
    };
    kubevmm_crds::PrintableStatus::of_phase(phase)
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// SIGINT/SIGTERM interrupt the parent's wait (no `SA_RESTART`), so it can stop
/// the VMM and still release the taps and the private directory.
fn interrupt_handlers() {
    // SAFETY: a zeroed sigaction with a handler that only stores an atomic,
    // installed for two signals; no other thread exists.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&raw mut sa.sa_mask);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            libc::sigaction(sig, &raw const sa, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::final_status;
    use crate::agent::supervisor::ExitRecord;
    use kubevmm_crds::PrintableStatus;
    use kubevmm_vmm::exit::code;

    #[test]
    fn a_run_ends_in_the_words_a_cluster_shows() {
        let rec = |code, signal| ExitRecord {
            code,
            signal,
            message: String::new(),
        };
        let cases = [
            (
                rec(Some(code::POWER_OFF), None),
                false,
                PrintableStatus::Succeeded,
            ),
            (
                rec(Some(code::GUEST_CRASH), None),
                false,
                PrintableStatus::Failed,
            ),
            (
                rec(Some(code::VMM_ERROR), None),
                false,
                PrintableStatus::Failed,
            ),
            (rec(None, Some(9)), true, PrintableStatus::Stopped),
        ];
        for (r, stopped, want) in cases {
            assert_eq!(final_status(&r, stopped), want, "{:?}", r.code);
        }
    }
}
