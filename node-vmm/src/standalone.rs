//! `node-vmm run FILE.yaml`: boot one `VirtualMachine` manifest on this host
//! with no cluster (DESIGN.md decision 5). The manifest is turned into a
//! `VmConfig` and run by the same VMM library the node agent uses, in this
//! process; the console is the terminal.

use std::path::{Path, PathBuf};
use std::process::Command;

use kubevmm_crds::vm::{BootSource, Disk, Network};
use kubevmm_crds::VirtualMachine;
use kubevmm_vmm::config::{DiskConfig, NetConfig, SerialConfig, SerialMode};
use kubevmm_vmm::VmConfig;

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
    #[error("spec.{field}: {what} is not available in standalone mode; use {instead}")]
    Unsupported {
        field: String,
        what: &'static str,
        instead: &'static str,
    },
    #[error("spec.memory {0:?} is not a valid quantity: {1}")]
    Memory(String, String),
    #[error("spec.cpus {0} is more than the VMM supports")]
    Cpus(u32),
    #[error("spec.disks[{name}].emptyDisk: {what}")]
    EmptyDisk { name: String, what: String },
    #[error("spec.networks[{name}]: {what}")]
    Network { name: String, what: String },
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

fn boot_path(src: &BootSource, field: &str) -> Result<PathBuf, StandaloneError> {
    match (&src.path, &src.image) {
        (Some(p), _) => Ok(PathBuf::from(p)),
        (None, _) => Err(StandaloneError::Unsupported {
            field: field.into(),
            what: "an image reference",
            instead: "{path: FILE}",
        }),
    }
}

/// Where standalone mode keeps per-VM files (empty disks).
fn state_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kubevmm-standalone-{name}"))
}

fn disk_config(vm_name: &str, d: &Disk) -> Result<DiskConfig, StandaloneError> {
    let path = if let Some(h) = &d.host_disk {
        PathBuf::from(&h.path)
    } else if let Some(e) = &d.empty_disk {
        let size = kubevmm_crds::quantity::parse_bytes(&e.size.0).map_err(|err| {
            StandaloneError::EmptyDisk {
                name: d.name.clone(),
                what: err.to_string(),
            }
        })?;
        let dir = state_dir(vm_name);
        let io = |err: std::io::Error| StandaloneError::EmptyDisk {
            name: d.name.clone(),
            what: format!("cannot create its file in {}: {err}", dir.display()),
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let path = dir.join(format!("{}.img", d.name));
        // A fresh sparse file each run: an empty disk holds no data across boots.
        let f = std::fs::File::create(&path).map_err(io)?;
        f.set_len(size).map_err(io)?;
        path
    } else if d.image.is_some() {
        return Err(StandaloneError::Unsupported {
            field: format!("disks[{}].image", d.name),
            what: "a VirtualMachineImage disk",
            instead: "hostDisk: {path: FILE}",
        });
    } else {
        return Err(StandaloneError::Unsupported {
            field: format!("disks[{}].cloudInit", d.name),
            what: "a cloud-init disk",
            instead: "hostDisk with a prepared seed image",
        });
    };
    Ok(DiskConfig {
        id: d.name.clone(),
        path,
        read_only: d.read_only,
        serial: Some(d.name.clone()),
        fd: None,
    })
}

fn run_ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Creates tap `tap` on bridge `bridge` (replacing a leftover one).
fn bridge_tap(tap: &str, bridge: &str) -> Result<(), String> {
    if !Path::new("/sys/class/net")
        .join(bridge)
        .join("bridge")
        .exists()
    {
        return Err(format!("bridge {bridge} does not exist on this host"));
    }
    let _ = run_ip(&["link", "del", tap]);
    run_ip(&["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"])?;
    run_ip(&["link", "set", tap, "master", bridge])?;
    run_ip(&["link", "set", tap, "up"])
}

fn net_config(vm_name: &str, index: usize, n: &Network) -> Result<NetConfig, StandaloneError> {
    let err = |what: String| StandaloneError::Network {
        name: n.name.clone(),
        what,
    };
    let Some(bridge) = &n.bridge else {
        return Err(StandaloneError::Unsupported {
            field: format!("networks[{}].masquerade", n.name),
            what: "masquerade networking (it needs the node agent's DHCP and NAT)",
            instead: "bridge: {name: BRIDGE}",
        });
    };
    // Tap names are limited to 15 bytes.
    let mut tap: String = format!(
        "kv{}",
        vm_name
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
    );
    tap.truncate(12);
    let tap = format!("{tap}{index}");
    bridge_tap(&tap, &bridge.name).map_err(err)?;
    let mac = n.mac_address.clone().unwrap_or_else(|| {
        // Stable per VM and interface: 52:54:00 plus a hash of the name.
        let h = vm_name
            .bytes()
            .chain(n.name.bytes())
            .fold(0x811c_9dc5u32, |h, b| {
                (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
            });
        format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            (h >> 16) as u8,
            (h >> 8) as u8,
            h as u8
        )
    });
    Ok(NetConfig {
        id: n.name.clone(),
        tap: Some(tap),
        fd: None,
        mac,
    })
}

/// Turns a manifest into the VMM config.
pub fn vm_config(
    vm: &VirtualMachine,
    console_log: Option<&Path>,
) -> Result<VmConfig, StandaloneError> {
    kubevmm_crds::validation::validate_vm_spec(&vm.spec)
        .map_err(|e| StandaloneError::Invalid(e.to_string()))?;
    let name = vm.metadata.name.clone().unwrap_or_else(|| "vm".into());
    let spec = &vm.spec;
    let memory = kubevmm_crds::quantity::parse_bytes(&spec.memory.0)
        .map_err(|e| StandaloneError::Memory(spec.memory.0.clone(), e.to_string()))?;
    let cpus = u8::try_from(spec.cpus).map_err(|_| StandaloneError::Cpus(spec.cpus))?;
    let mut config = VmConfig::new(boot_path(&spec.boot.kernel, "boot.kernel")?, memory);
    config.cpus = cpus;
    config.initrd = spec
        .boot
        .initrd
        .as_ref()
        .map(|i| boot_path(i, "boot.initrd"))
        .transpose()?;
    config.cmdline = spec
        .boot
        .cmdline
        .clone()
        .unwrap_or_else(|| "console=ttyS0".into());
    config.disks = spec
        .disks
        .iter()
        .map(|d| disk_config(&name, d))
        .collect::<Result<_, _>>()?;
    config.nets = spec
        .networks
        .iter()
        .enumerate()
        .map(|(i, n)| net_config(&name, i, n))
        .collect::<Result<_, _>>()?;
    config.rng = true;
    config.serial = SerialConfig {
        mode: SerialMode::Stdout,
        path: None,
        log: console_log.map(Path::to_owned),
    };
    Ok(config)
}

/// `node-vmm run`: returns the process exit code (0 when the guest powered off).
pub fn run(manifest: &Path, console_log: Option<&Path>) -> Result<i32, StandaloneError> {
    // Paths are used as given and must be absolute, exactly as in a cluster.
    let vm = load_manifest(manifest)?;
    let config = vm_config(&vm, console_log)?;
    let taps: Vec<String> = config.nets.iter().filter_map(|n| n.tap.clone()).collect();
    let result = kubevmm_vmm::run(config);
    for tap in &taps {
        // Best effort: a leftover tap is replaced at the next run.
        let _ = run_ip(&["link", "del", tap]);
    }
    let reason = result?;
    if reason != kubevmm_vmm::ExitReason::PowerOff {
        eprintln!("node-vmm: {}", reason.describe());
    }
    Ok(reason.code())
}
