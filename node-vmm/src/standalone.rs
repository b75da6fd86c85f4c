//! `node-vmm run FILE.yaml`: boot one `VirtualMachine` manifest on this host
//! with no cluster (DESIGN.md decision 5). The manifest is checked with the
//! CRD's rules, turned into a VMM config by the same code the node agent
//! uses (`agent::prepare`), and run in this process with the console on the
//! terminal. Paths are used as given (no allow-list); empty disks are fresh
//! for every run.

use std::path::{Path, PathBuf};

use kubevmm_crds::VirtualMachine;
use kubevmm_vmm::config::{SerialConfig, SerialMode};
use kubevmm_vmm::VmConfig;

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
    #[error(transparent)]
    Vmm(#[from] kubevmm_vmm::RunError),
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

/// Validates the manifest and builds its VMM config; creates empty disks
/// (fresh) and taps. Returns the config and the plan (to release taps).
pub fn vm_config(
    vm: &VirtualMachine,
    console_log: Option<&Path>,
) -> Result<(VmConfig, prepare::Plan), StandaloneError> {
    kubevmm_crds::validation::validate_vm_spec(&vm.spec)
        .map_err(|e| StandaloneError::Invalid(e.to_string()))?;
    let name = vm.metadata.name.clone().unwrap_or_else(|| "vm".into());
    let uid = local_uid(&name);
    let dir = VmDir(std::env::temp_dir().join(format!("kubevmm-standalone-{name}")));
    let ctx = NodeContext {
        allowed_dirs: vec![PathBuf::from("/")],
    };
    let plan = prepare::plan(&vm.spec, &uid, &dir, &ctx)?;
    // An empty disk holds no data across standalone runs.
    for f in &plan.sparse_files {
        let _ = std::fs::remove_file(&f.path);
    }
    prepare::realize(&plan, &dir)?;
    let mut config = plan.config.clone();
    if vm.spec.boot.cmdline.is_none() {
        config.cmdline = "console=ttyS0".into();
    }
    config.serial = SerialConfig {
        mode: SerialMode::Stdout,
        path: None,
        log: console_log.map(Path::to_owned),
    };
    config.api_socket = None;
    Ok((config, plan))
}

/// Runs the VM until the guest stops; returns the VMM exit code.
pub fn run(manifest: &Path, console_log: Option<&Path>) -> Result<i32, StandaloneError> {
    // Paths are used as given and must be absolute, exactly as in a cluster.
    let vm = load_manifest(manifest)?;
    let (config, plan) = vm_config(&vm, console_log)?;
    let result = kubevmm_vmm::run(config);
    prepare::release_taps(
        &local_uid(vm.metadata.name.as_deref().unwrap_or("vm")),
        plan.taps.len(),
    );
    let reason = result?;
    if reason != kubevmm_vmm::ExitReason::PowerOff {
        eprintln!("node-vmm: {}", reason.describe());
    }
    Ok(reason.code())
}
