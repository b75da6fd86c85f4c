//! From a `VirtualMachine` spec to what the VMM needs on this node: the
//! desired [`VmConfig`] and the host resources to create (sparse disks, tap
//! devices). [`plan`] is pure (unit-tested); [`realize`] does the I/O.

use std::path::{Path, PathBuf};
use std::process::Command;

use kubevmm_crds::vm::BootSource;
use kubevmm_crds::VirtualMachineSpec;
use kubevmm_vmm::config::{DiskConfig, NetConfig, SerialConfig, SerialMode};
use kubevmm_vmm::VmConfig;

use super::supervisor::VmDir;

/// Why a VM cannot be prepared on this node; each names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    /// The spec asks for something this node does not offer yet.
    #[error("{field}: {what}")]
    Unsupported {
        /// The offending field.
        field: String,
        /// What is missing, and what to use instead.
        what: String,
    },
    /// A node path outside the allow-list.
    #[error("{field}: {path} is outside the allowed directories ({allowed}); put the file there or ask the administrator to allow its directory")]
    NotAllowed {
        /// The field.
        field: String,
        /// The path.
        path: String,
        /// The allow-list.
        allowed: String,
    },
    /// A value the VMM cannot take.
    #[error("{field}: {what}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        what: String,
    },
    /// Creating a disk or tap failed.
    #[error("{what}: {why}")]
    Host {
        /// What was being created.
        what: String,
        /// The error.
        why: String,
    },
}

/// A sparse file to create (once) for an `emptyDisk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseFile {
    /// Where.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
}

/// A tap device to create on a host bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    /// Tap name (≤ 15 bytes).
    pub name: String,
    /// The bridge to attach it to.
    pub bridge: String,
}

/// Everything needed to start the guest.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The VMM config.
    pub config: VmConfig,
    /// Empty disks to create if missing.
    pub sparse_files: Vec<SparseFile>,
    /// Taps to create.
    pub taps: Vec<Tap>,
    /// (network name, MAC, tap) for `status.interfaces`.
    pub interfaces: Vec<(String, String, String)>,
}

/// Node facts the plan depends on.
#[derive(Debug, Clone)]
pub struct NodeContext {
    /// Directories `hostDisk` and boot `path` sources may use.
    pub allowed_dirs: Vec<PathBuf>,
}

fn allowed(ctx: &NodeContext, field: &str, path: &str) -> Result<PathBuf, PrepareError> {
    let p = Path::new(path);
    // The CRD already refuses relative paths and '..'.
    if ctx.allowed_dirs.iter().any(|d| p.starts_with(d)) {
        Ok(p.to_path_buf())
    } else {
        Err(PrepareError::NotAllowed {
            field: field.into(),
            path: path.into(),
            allowed: ctx
                .allowed_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

fn boot(ctx: &NodeContext, src: &BootSource, field: &str) -> Result<PathBuf, PrepareError> {
    match (&src.path, &src.image) {
        (Some(p), _) => allowed(ctx, &format!("{field}.path"), p),
        (None, _) => Err(PrepareError::Unsupported {
            field: format!("{field}.image"),
            what: "VirtualMachineImage boot sources are not imported by node-vmm yet; use {path: FILE} in an allowed directory".into(),
        }),
    }
}

/// A stable locally administered MAC for a VM's interface (52:54:00 prefix).
pub fn stable_mac(uid: &str, network: &str) -> String {
    let h = uid
        .bytes()
        .chain([0])
        .chain(network.bytes())
        .fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (h >> 16) as u8,
        (h >> 8) as u8,
        h as u8
    )
}

/// Tap name for interface `index` of the VM with `uid` (unique per node, ≤ 15 bytes).
pub fn tap_name(uid: &str, index: usize) -> String {
    let short: String = uid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect();
    format!("kvt{short}n{index}")
}

/// Disk configs and the empty disks to create.
fn disks(
    spec: &VirtualMachineSpec,
    dir: &VmDir,
    ctx: &NodeContext,
) -> Result<(Vec<DiskConfig>, Vec<SparseFile>), PrepareError> {
    let mut sparse_files = Vec::new();
    let mut disks = Vec::new();
    for (i, d) in spec.disks.iter().enumerate() {
        let field = format!("spec.disks[{i}]");
        let path = if let Some(h) = &d.host_disk {
            allowed(ctx, &format!("{field}.hostDisk.path"), &h.path)?
        } else if let Some(e) = &d.empty_disk {
            let size = kubevmm_crds::quantity::parse_bytes(&e.size.0).map_err(|err| {
                PrepareError::Invalid {
                    field: format!("{field}.emptyDisk.size"),
                    what: err.to_string(),
                }
            })?;
            let path = dir.0.join(format!("disk-{}.img", d.name));
            sparse_files.push(SparseFile {
                path: path.clone(),
                size,
            });
            path
        } else if d.image.is_some() {
            return Err(PrepareError::Unsupported {
                field: format!("{field}.image"),
                what: "VirtualMachineImage disks are not imported by node-vmm yet; use hostDisk or emptyDisk".into(),
            });
        } else {
            return Err(PrepareError::Unsupported {
                field: format!("{field}.cloudInit"),
                what: "cloud-init seed disks are not generated by node-vmm yet; use a prepared hostDisk".into(),
            });
        };
        disks.push(DiskConfig {
            id: d.name.clone(),
            path,
            read_only: d.read_only,
            serial: Some(d.name.clone()),
            fd: None,
        });
    }
    Ok((disks, sparse_files))
}

/// NIC configs, taps to create, and `(network, MAC, tap)` for status.
type Nics = (Vec<NetConfig>, Vec<Tap>, Vec<(String, String, String)>);

/// Builds the NICs of `spec`.
fn networks(spec: &VirtualMachineSpec, uid: &str) -> Result<Nics, PrepareError> {
    let mut nets = Vec::new();
    let mut taps = Vec::new();
    let mut interfaces = Vec::new();
    for (i, n) in spec.networks.iter().enumerate() {
        let Some(bridge) = &n.bridge else {
            return Err(PrepareError::Unsupported {
                field: format!("spec.networks[{i}].masquerade"),
                what: "masquerade networking is not provided by node-vmm yet; use bridge: {name: BRIDGE}".into(),
            });
        };
        let mac = n
            .mac_address
            .clone()
            .unwrap_or_else(|| stable_mac(uid, &n.name));
        let tap = tap_name(uid, i);
        taps.push(Tap {
            name: tap.clone(),
            bridge: bridge.name.clone(),
        });
        interfaces.push((n.name.clone(), mac.clone(), tap.clone()));
        nets.push(NetConfig {
            id: n.name.clone(),
            tap: Some(tap),
            fd: None,
            mac,
        });
    }
    Ok((nets, taps, interfaces))
}

/// Builds the plan for `spec` (pure).
pub fn plan(
    spec: &VirtualMachineSpec,
    uid: &str,
    dir: &VmDir,
    ctx: &NodeContext,
) -> Result<Plan, PrepareError> {
    let memory =
        kubevmm_crds::quantity::parse_bytes(&spec.memory.0).map_err(|e| PrepareError::Invalid {
            field: "spec.memory".into(),
            what: e.to_string(),
        })?;
    let cpus = u8::try_from(spec.cpus)
        .ok()
        .filter(|c| *c <= kubevmm_vmm::config::MAX_CPUS)
        .ok_or_else(|| PrepareError::Invalid {
            field: "spec.cpus".into(),
            what: format!(
                "{} vCPUs; this VMM runs at most {}",
                spec.cpus,
                kubevmm_vmm::config::MAX_CPUS
            ),
        })?;
    let kernel = boot(ctx, &spec.boot.kernel, "spec.boot.kernel")?;
    let initrd = spec
        .boot
        .initrd
        .as_ref()
        .map(|i| boot(ctx, i, "spec.boot.initrd"))
        .transpose()?;
    let (disks, sparse_files) = disks(spec, dir, ctx)?;
    let (nets, taps, interfaces) = networks(spec, uid)?;
    let config = VmConfig {
        cpus,
        memory,
        kernel,
        initrd,
        cmdline: spec.boot.cmdline.clone().unwrap_or_default(),
        disks,
        nets,
        rng: true,
        serial: SerialConfig {
            mode: SerialMode::File,
            path: Some(dir.console_log()),
            log: None,
        },
        api_socket: Some(dir.api_socket()),
        on_reboot: kubevmm_vmm::config::OnReboot::Exit,
        seccomp: true,
    };
    Ok(Plan {
        config,
        sparse_files,
        taps,
        interfaces,
    })
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Creates what the plan needs on the host and writes the VMM config.
pub fn realize(plan: &Plan, dir: &VmDir) -> Result<(), PrepareError> {
    let host = |what: String| move |why: String| PrepareError::Host { what, why };
    std::fs::create_dir_all(&dir.0)
        .map_err(|e| host(format!("state directory {}", dir.0.display()))(e.to_string()))?;
    for f in &plan.sparse_files {
        if !f.path.exists() {
            let file = std::fs::File::create(&f.path)
                .and_then(|file| file.set_len(f.size).map(|()| file))
                .map_err(|e| host(format!("empty disk {}", f.path.display()))(e.to_string()))?;
            drop(file);
        }
    }
    for t in &plan.taps {
        if !Path::new("/sys/class/net")
            .join(&t.bridge)
            .join("bridge")
            .exists()
        {
            return Err(PrepareError::Host {
                what: format!("tap {} on bridge {}", t.name, t.bridge),
                why: format!("bridge {} does not exist on this node", t.bridge),
            });
        }
        let _ = ip(&["link", "del", &t.name]);
        ip(&["tuntap", "add", "dev", &t.name, "mode", "tap", "vnet_hdr"])
            .and_then(|()| ip(&["link", "set", &t.name, "master", &t.bridge]))
            .and_then(|()| ip(&["link", "set", &t.name, "up"]))
            .map_err(host(format!("tap {}", t.name)))?;
    }
    let json = serde_json::to_vec_pretty(&plan.config)
        .map_err(|e| host("VMM config".into())(e.to_string()))?;
    super::supervisor::write_atomic(&dir.config(), &json)
        .map_err(|e| host("VMM config".into())(e.to_string()))
}

/// Removes the taps of a plan (best effort; used when the VM goes away).
pub fn release_taps(uid: &str, count: usize) {
    for i in 0..count.max(16) {
        let name = tap_name(uid, i);
        if Path::new("/sys/class/net").join(&name).exists() {
            let _ = ip(&["link", "del", &name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> VirtualMachineSpec {
        serde_yaml::from_str(yaml).expect("spec")
    }

    fn ctx() -> NodeContext {
        NodeContext {
            allowed_dirs: vec![PathBuf::from("/var/lib/kubevmm")],
        }
    }

    #[test]
    fn builds_config_with_disks_and_bridge() {
        let s = spec(
            "memory: 128Mi\ncpus: 2\nboot: {kernel: {path: /var/lib/kubevmm/boot/k.elf}, cmdline: x}\n\
             disks: [{name: data, hostDisk: {path: /var/lib/kubevmm/disks/d.img}, readOnly: true}, {name: scratch, emptyDisk: {size: 1Gi}}]\n\
             networks: [{name: lan, bridge: {name: br0}}]\n",
        );
        let dir = VmDir(PathBuf::from("/run/vm1"));
        let p = plan(&s, "0a1b2c3d-4e5f", &dir, &ctx()).expect("plan");
        assert_eq!(p.config.cpus, 2);
        assert_eq!(p.config.memory, 128 << 20);
        assert_eq!(p.config.disks.len(), 2);
        assert!(p.config.disks[0].read_only);
        assert_eq!(
            p.sparse_files,
            vec![SparseFile {
                path: PathBuf::from("/run/vm1/disk-scratch.img"),
                size: 1 << 30
            }]
        );
        assert_eq!(p.taps[0].bridge, "br0");
        assert!(p.taps[0].name.len() <= 15);
        assert_eq!(p.interfaces[0].1, stable_mac("0a1b2c3d-4e5f", "lan"));
    }

    #[test]
    fn refuses_paths_outside_the_allow_list() {
        let s = spec("memory: 128Mi\nboot: {kernel: {path: /etc/shadow}}\n");
        let e = plan(&s, "u", &VmDir(PathBuf::from("/x")), &ctx()).unwrap_err();
        assert!(e
            .to_string()
            .contains("spec.boot.kernel.path: /etc/shadow is outside the allowed directories"));
    }

    #[test]
    fn names_unsupported_fields() {
        let s = spec("memory: 128Mi\nboot: {kernel: {path: /var/lib/kubevmm/k}}\nnetworks: [{name: default, masquerade: {}}]\n");
        let e = plan(&s, "u", &VmDir(PathBuf::from("/x")), &ctx()).unwrap_err();
        assert!(e.to_string().starts_with("spec.networks[0].masquerade"));
    }

    #[test]
    fn macs_are_stable_unicast_and_local() {
        let m = stable_mac("uid", "lan");
        assert_eq!(m, stable_mac("uid", "lan"));
        assert_ne!(m, stable_mac("uid", "wan"));
        assert!(m.starts_with("52:54:00:"));
    }
}
