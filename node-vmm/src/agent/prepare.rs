//! From a `VirtualMachine` spec to what the VMM needs on this node: the
//! desired [`VmConfig`], the host resources to create (sparse disks, tap
//! devices) and the files to open for it. [`plan`] is pure (unit-tested);
//! [`realize`] does the I/O: it opens every file, tap and device the guest
//! uses (user-named paths beneath the allow-list, see [`hostfs`]) and
//! returns them as a [`Handoff`] for the jailed VMM.

use std::path::PathBuf;

use super::handoff::{Handoff, HandoffError};
use super::hostfs::{self, HostFsError};
use super::images::CachedImage;
use super::seed::{self, SeedFile};
use super::taps::{stable_mac, tap_name};
use std::collections::BTreeMap;

use kubevmm_crds::image::ImageFormat;
use kubevmm_crds::vm::BootSource;
use kubevmm_crds::VirtualMachineSpec;
use kubevmm_vmm::config::{DiskConfig, JailConfig, NetConfig, SerialConfig, SerialMode};
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
    /// A user-named node path that cannot be used (outside the allow-list,
    /// escaping it, not a file, locked by another VM).
    #[error(transparent)]
    Path(#[from] HostFsError),
    /// A bridge the administrator did not allow.
    #[error("{field}: bridge {bridge} is not in the allowed bridges ({allowed}); use masquerade or ask the administrator to allow the bridge (--allowed-bridge)")]
    BridgeNotAllowed {
        /// The field.
        field: String,
        /// The bridge.
        bridge: String,
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

/// A cloud-init seed image the agent writes (again) before every start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// Where, in the VM's state directory.
    pub path: PathBuf,
    /// The files of the volume.
    pub files: Vec<SeedFile>,
    /// The FAT volume id.
    pub volume_id: u32,
}

/// A tap device to create on a host bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    /// Tap name (≤ 15 bytes).
    pub name: String,
    /// The bridge to attach it to.
    pub bridge: String,
}

/// A file the agent opens for the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    /// Named by the user: opened beneath the allow-list.
    User {
        /// The spec field, for errors.
        field: String,
        /// The path as written.
        path: String,
    },
    /// The agent's own file in the VM's state directory.
    State(PathBuf),
    /// A VM's copy-on-write disk: a qcow2 overlay in the VM's state
    /// directory (created at the first start) over a cached image, which is
    /// only ever read.
    Overlay {
        /// The overlay file.
        overlay: PathBuf,
        /// The cached image it is backed by.
        base: PathBuf,
    },
}

/// What `realize` opens, in the order of the config's items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opens {
    /// The kernel.
    pub kernel: FileSource,
    /// The initrd.
    pub initrd: Option<FileSource>,
    /// One per `config.disks` entry.
    pub disks: Vec<FileSource>,
}

/// Everything needed to start the guest.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The VMM config (paths; `realize` adds the fds and the jail).
    pub config: VmConfig,
    /// The files to open.
    pub opens: Opens,
    /// Empty disks to create if missing.
    pub sparse_files: Vec<SparseFile>,
    /// Seed images to write at every start.
    pub seeds: Vec<Seed>,
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
    /// Host bridges `bridge` networks may name.
    pub allowed_bridges: Vec<String>,
    /// Largest `emptyDisk` this node creates, in bytes.
    pub max_empty_disk: u64,
    /// The `VirtualMachineImage`s the spec names, resolved to cached files.
    pub images: BTreeMap<String, CachedImage>,
}

/// A user path, checked against the allow-list by text (a fast, clear
/// refusal; `realize` opens it beneath the directory, which is the check
/// that counts).
fn user_file(
    ctx: &NodeContext,
    field: &str,
    path: &str,
) -> Result<(PathBuf, FileSource), PrepareError> {
    hostfs::locate(&ctx.allowed_dirs, field, path)?;
    Ok((
        PathBuf::from(path),
        FileSource::User {
            field: field.into(),
            path: path.into(),
        },
    ))
}

fn boot(
    ctx: &NodeContext,
    src: &BootSource,
    field: &str,
) -> Result<(PathBuf, FileSource), PrepareError> {
    match (&src.path, &src.image) {
        (Some(p), _) => user_file(ctx, &format!("{field}.path"), p),
        (None, Some(name)) => match ctx.images.get(name) {
            Some(img) if img.format == ImageFormat::Raw => {
                Ok((img.path.clone(), FileSource::State(img.path.clone())))
            }
            Some(img) => Err(PrepareError::Invalid {
                field: format!("{field}.image"),
                what: format!(
                    "VirtualMachineImage {name} is a {} disk image; a kernel or initrd must be a raw file",
                    super::images::format_name(img.format)
                ),
            }),
            None => Err(PrepareError::Unsupported {
                field: format!("{field}.image"),
                what: format!("VirtualMachineImage {name} is not in this node's image cache yet"),
            }),
        },
        (None, None) => Err(PrepareError::Invalid {
            field: field.into(),
            what: "needs image or path".into(),
        }),
    }
}

/// The VM a plan is for.
#[derive(Debug, Clone, Copy)]
pub struct VmId<'a> {
    /// `metadata.uid`.
    pub uid: &'a str,
    /// `metadata.name`.
    pub name: &'a str,
}

/// Disk configs, what to open for them, the empty disks to create and the
/// seeds to write.
struct Disks {
    configs: Vec<DiskConfig>,
    opens: Vec<FileSource>,
    sparse_files: Vec<SparseFile>,
    seeds: Vec<Seed>,
}

fn disks(
    spec: &VirtualMachineSpec,
    vm: VmId<'_>,
    dir: &VmDir,
    ctx: &NodeContext,
) -> Result<Disks, PrepareError> {
    let mut sparse_files = Vec::new();
    let mut seeds = Vec::new();
    let mut disks = Vec::new();
    let mut opens = Vec::new();
    for (i, d) in spec.disks.iter().enumerate() {
        let field = format!("spec.disks[{i}]");
        let mut read_only = d.read_only;
        let path = if let Some(h) = &d.host_disk {
            let (path, src) = user_file(ctx, &format!("{field}.hostDisk.path"), &h.path)?;
            opens.push(src);
            path
        } else if let Some(e) = &d.empty_disk {
            let size = kubevmm_crds::quantity::parse_bytes(&e.size.0).map_err(|err| {
                PrepareError::Invalid {
                    field: format!("{field}.emptyDisk.size"),
                    what: err.to_string(),
                }
            })?;
            if size > ctx.max_empty_disk {
                return Err(PrepareError::Invalid {
                    field: format!("{field}.emptyDisk.size"),
                    what: format!(
                        "{size} bytes is more than this node allows for an empty disk ({} bytes, --max-empty-disk)",
                        ctx.max_empty_disk
                    ),
                });
            }
            let path = dir.0.join(format!("disk-{}.img", d.name));
            sparse_files.push(SparseFile {
                path: path.clone(),
                size,
            });
            opens.push(FileSource::State(path.clone()));
            path
        } else if let Some(image) = &d.image {
            let Some(cached) = ctx.images.get(&image.name) else {
                return Err(PrepareError::Unsupported {
                    field: format!("{field}.image.name"),
                    what: format!(
                        "VirtualMachineImage {} is not in this node's image cache yet",
                        image.name
                    ),
                });
            };
            let path = dir.0.join(format!("disk-{}.qcow2", d.name));
            opens.push(FileSource::Overlay {
                overlay: path.clone(),
                base: cached.path.clone(),
            });
            path
        } else if let Some(ci) = &d.cloud_init {
            let field = format!("{field}.cloudInit");
            let files = seed::files(vm.uid, vm.name, ci, &field).map_err(|e| match e {
                seed::SeedError::MetaData { field, why } => PrepareError::Invalid {
                    field,
                    what: format!("meta-data must be a YAML mapping of keys to values: {why}"),
                },
                seed::SeedError::Image(e) => PrepareError::Host {
                    what: format!("seed disk {field}"),
                    why: e.to_string(),
                },
            })?;
            let path = dir.0.join(format!("seed-{}.img", d.name));
            seeds.push(Seed {
                path: path.clone(),
                files,
                volume_id: seed::volume_id(vm.uid),
            });
            opens.push(FileSource::State(path.clone()));
            // Generated from the spec at every start: never the guest's to write.
            read_only = true;
            path
        } else {
            return Err(PrepareError::Invalid {
                field,
                what: "each disk needs exactly one source: image, emptyDisk, cloudInit or hostDisk"
                    .into(),
            });
        };
        disks.push(DiskConfig {
            id: d.name.clone(),
            path,
            read_only,
            serial: Some(d.name.clone()),
            fd: None,
            backing_fds: Vec::new(),
            // Disks the agent made have a known format: never probed.
            format: if d.image.is_some() {
                Some(kubevmm_vmm::image::ImageFormat::Qcow2)
            } else {
                (d.empty_disk.is_some() || d.cloud_init.is_some())
                    .then_some(kubevmm_vmm::image::ImageFormat::Raw)
            },
        });
    }
    Ok(Disks {
        configs: disks,
        opens,
        sparse_files,
        seeds,
    })
}

/// NIC configs, taps to create, and `(network, MAC, tap)` for status.
type Nics = (Vec<NetConfig>, Vec<Tap>, Vec<(String, String, String)>);

/// Builds the NICs of `spec`.
fn networks(spec: &VirtualMachineSpec, uid: &str, ctx: &NodeContext) -> Result<Nics, PrepareError> {
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
        if !ctx.allowed_bridges.contains(&bridge.name) {
            return Err(PrepareError::BridgeNotAllowed {
                field: format!("spec.networks[{i}].bridge.name"),
                bridge: bridge.name.clone(),
                allowed: if ctx.allowed_bridges.is_empty() {
                    "none".into()
                } else {
                    ctx.allowed_bridges.join(", ")
                },
            });
        }
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
    vm: VmId<'_>,
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
    let (kernel, kernel_src) = boot(ctx, &spec.boot.kernel, "spec.boot.kernel")?;
    let (initrd, initrd_src) = spec
        .boot
        .initrd
        .as_ref()
        .map(|i| boot(ctx, i, "spec.boot.initrd"))
        .transpose()?
        .unzip();
    let disks = disks(spec, vm, dir, ctx)?;
    let (nets, taps, interfaces) = networks(spec, vm.uid, ctx)?;
    let config = VmConfig {
        cpus,
        memory,
        kernel,
        initrd,
        cmdline: spec.boot.cmdline.clone().unwrap_or_default(),
        disks: disks.configs,
        nets,
        rng: true,
        serial: SerialConfig {
            mode: SerialMode::File,
            path: Some(dir.console_log()),
            ..SerialConfig::default()
        },
        api_socket: Some(dir.api_socket()),
        on_reboot: kubevmm_vmm::config::OnReboot::Exit,
        seccomp: true,
        fds: kubevmm_vmm::config::HandedFds::default(),
        jail: None,
    };
    Ok(Plan {
        config,
        opens: Opens {
            kernel: kernel_src,
            initrd: initrd_src,
            disks: disks.opens,
        },
        sparse_files: disks.sparse_files,
        seeds: disks.seeds,
        taps,
        interfaces,
    })
}

/// Creates what the plan needs on the host (empty disks, taps), opens every
/// file and device the guest uses, and writes the VMM config that names
/// them by fd. With `jail_id`, the VMM confines itself as that uid/gid in
/// `dir/root`. The returned [`Handoff`] holds the fds (and the disk locks).
pub fn realize(
    plan: &Plan,
    dir: &VmDir,
    ctx: &NodeContext,
    jail_id: Option<u32>,
) -> Result<(VmConfig, Handoff), PrepareError> {
    let host = |what: String| move |why: String| PrepareError::Host { what, why };
    super::opener::state_dir(dir)
        .map_err(|e| host(format!("state directory {}", dir.0.display()))(e.to_string()))?;
    for f in &plan.sparse_files {
        super::opener::sparse_file(&f.path, f.size)
            .map_err(|e| host(format!("empty disk {}", f.path.display()))(e.to_string()))?;
    }
    for s in &plan.seeds {
        let image = seed::image(&s.files, s.volume_id)
            .map_err(|e| host(format!("seed disk {}", s.path.display()))(e.to_string()))?;
        super::opener::seed_file(&s.path, &image)
            .map_err(|e| host(format!("seed disk {}", s.path.display()))(e.to_string()))?;
    }
    super::taps::create(&plan.taps)?;
    let (mut config, handoff) = super::opener::open_all(plan, dir, &ctx.allowed_dirs)?;
    config.jail = jail_id.map(|id| JailConfig {
        uid: id,
        gid: id,
        root: dir.jail_root(),
    });
    let json =
        serde_json::to_vec_pretty(&config).map_err(|e| host("VMM config".into())(e.to_string()))?;
    super::supervisor::write_atomic(&dir.config(), &json)
        .map_err(|e| host("VMM config".into())(e.to_string()))?;
    Ok((config, handoff))
}

impl From<HandoffError> for PrepareError {
    fn from(e: HandoffError) -> Self {
        PrepareError::Host {
            what: "descriptors for the VMM".into(),
            why: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn spec(yaml: &str) -> VirtualMachineSpec {
        serde_yaml::from_str(yaml).expect("spec")
    }

    fn id(uid: &str) -> VmId<'_> {
        VmId { uid, name: "vm-1" }
    }

    fn ctx() -> NodeContext {
        NodeContext {
            allowed_dirs: vec![PathBuf::from("/var/lib/kubevmm")],
            allowed_bridges: vec!["br0".into()],
            max_empty_disk: 1 << 40,
            images: BTreeMap::from([
                (
                    "k".to_string(),
                    CachedImage {
                        path: PathBuf::from("/state/images/sha256-aa"),
                        format: ImageFormat::Raw,
                    },
                ),
                (
                    "disk".to_string(),
                    CachedImage {
                        path: PathBuf::from("/state/images/sha256-bb"),
                        format: ImageFormat::Qcow2,
                    },
                ),
            ]),
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
        let p = plan(&s, id("0a1b2c3d-4e5f"), &dir, &ctx()).expect("plan");
        assert_eq!(p.config.cpus, 2);
        assert_eq!(p.config.memory, 128 << 20);
        assert_eq!(p.config.disks.len(), 2);
        assert!(p.config.disks[0].read_only);
        assert_eq!(p.config.disks[0].format, None, "a user's file is probed");
        assert_eq!(
            p.config.disks[1].format,
            Some(kubevmm_vmm::image::ImageFormat::Raw),
            "an empty disk is raw whatever the guest writes into it"
        );
        assert_eq!(
            p.sparse_files,
            vec![SparseFile {
                path: PathBuf::from("/run/vm1/disk-scratch.img"),
                size: 1 << 30
            }]
        );
        assert_eq!(
            p.opens.disks,
            vec![
                FileSource::User {
                    field: "spec.disks[0].hostDisk.path".into(),
                    path: "/var/lib/kubevmm/disks/d.img".into()
                },
                FileSource::State(PathBuf::from("/run/vm1/disk-scratch.img")),
            ]
        );
        assert_eq!(p.taps[0].bridge, "br0");
        assert!(p.taps[0].name.len() <= 15);
        assert_eq!(p.interfaces[0].1, stable_mac("0a1b2c3d-4e5f", "lan"));
    }

    #[test]
    fn refuses_paths_outside_the_allow_list() {
        let s = spec("memory: 128Mi\nboot: {kernel: {path: /etc/shadow}}\n");
        let e = plan(&s, id("u"), &VmDir(PathBuf::from("/x")), &ctx()).unwrap_err();
        assert!(e
            .to_string()
            .contains("spec.boot.kernel.path: /etc/shadow is outside the allowed directories"));
    }

    #[test]
    fn refuses_bridges_and_empty_disks_beyond_the_node_limits() {
        let base = "memory: 128Mi\nboot: {kernel: {path: /var/lib/kubevmm/k}}\n";
        let cases = [
            (
                "networks: [{name: lan, bridge: {name: br1}}]\n",
                "spec.networks[0].bridge.name: bridge br1 is not in the allowed bridges (br0)",
            ),
            (
                "disks: [{name: big, emptyDisk: {size: 2Ti}}]\n",
                "spec.disks[0].emptyDisk.size: 2199023255552 bytes is more than this node allows",
            ),
        ];
        for (extra, want) in cases {
            let s = spec(&format!("{base}{extra}"));
            let e = plan(&s, id("u"), &VmDir(PathBuf::from("/x")), &ctx()).unwrap_err();
            assert!(e.to_string().starts_with(want), "{e}");
        }
    }

    #[test]
    fn names_unsupported_fields() {
        let s = spec("memory: 128Mi\nboot: {kernel: {path: /var/lib/kubevmm/k}}\nnetworks: [{name: default, masquerade: {}}]\n");
        let e = plan(&s, id("u"), &VmDir(PathBuf::from("/x")), &ctx()).unwrap_err();
        assert!(e.to_string().starts_with("spec.networks[0].masquerade"));
    }

    #[test]
    fn cloud_init_disks_are_generated_read_only_seeds() {
        let base = "memory: 128Mi\nboot: {kernel: {path: /var/lib/kubevmm/k}}\n";
        let cases = [
            ("readOnly: false", "user-data", "#cloud-config\n"),
            ("readOnly: true", "user-data", "#cloud-config\n"),
        ];
        for (ro, file, contents) in cases {
            let s = spec(&format!(
                "{base}disks: [{{name: root, emptyDisk: {{size: 1Gi}}}}, {{name: seed, {ro}, cloudInit: {{userData: \"#cloud-config\\n\", networkData: \"version: 2\\n\"}}}}]\n"
            ));
            let dir = VmDir(PathBuf::from("/run/vm1"));
            let p = plan(&s, id("0a1b2c3d"), &dir, &ctx()).expect("plan");
            let path = PathBuf::from("/run/vm1/seed-seed.img");
            assert!(
                p.config.disks[1].read_only,
                "{ro}: the guest never writes its seed"
            );
            assert!(!p.config.disks[0].read_only);
            assert_eq!(p.config.disks[1].path, path);
            assert_eq!(p.opens.disks[1], FileSource::State(path.clone()));
            assert_eq!(p.seeds.len(), 1);
            assert_eq!(p.seeds[0].path, path);
            assert_eq!(p.seeds[0].volume_id, seed::volume_id("0a1b2c3d"));
            let names: Vec<&str> = p.seeds[0].files.iter().map(|f| f.name).collect();
            assert_eq!(names, ["user-data", "meta-data", "network-config"]);
            assert_eq!(p.seeds[0].files[0].name, file);
            assert_eq!(p.seeds[0].files[0].contents, contents);
            assert_eq!(
                p.seeds[0].files[1].contents,
                "instance-id: 0a1b2c3d\nlocal-hostname: vm-1\n"
            );
        }
    }

    #[test]
    fn image_disks_are_qcow2_overlays_of_the_cached_image() {
        let s = spec(
            "memory: 128Mi\nboot: {kernel: {path: /var/lib/kubevmm/k}}\n\
             disks: [{name: root, image: {name: disk}}, {name: other, image: {name: missing}}]\n",
        );
        let e = plan(&s, id("u"), &VmDir(PathBuf::from("/x")), &ctx()).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "spec.disks[1].image.name: VirtualMachineImage missing is not in this node's image cache yet"
            ),
            "{e}"
        );
        let s = spec(
            "memory: 128Mi\nboot: {kernel: {path: /var/lib/kubevmm/k}}\ndisks: [{name: root, image: {name: disk}}]\n",
        );
        let p = plan(&s, id("u"), &VmDir(PathBuf::from("/run/vm1")), &ctx()).expect("plan");
        let overlay = PathBuf::from("/run/vm1/disk-root.qcow2");
        assert_eq!(p.config.disks[0].path, overlay);
        assert_eq!(
            p.config.disks[0].format,
            Some(kubevmm_vmm::image::ImageFormat::Qcow2),
            "the overlay the agent made is never probed"
        );
        assert_eq!(
            p.opens.disks[0],
            FileSource::Overlay {
                overlay,
                base: PathBuf::from("/state/images/sha256-bb"),
            }
        );
    }

    #[test]
    fn boot_images_resolve_to_raw_cached_files() {
        let s = spec("memory: 128Mi\nboot: {kernel: {image: k}, initrd: {image: k}}\n");
        let p = plan(&s, id("u"), &VmDir(PathBuf::from("/x")), &ctx()).expect("plan");
        let cached = PathBuf::from("/state/images/sha256-aa");
        assert_eq!(p.config.kernel, cached);
        assert_eq!(p.opens.kernel, FileSource::State(cached.clone()));
        assert_eq!(p.opens.initrd, Some(FileSource::State(cached)));
        let cases = [
            (
                "boot: {kernel: {image: disk}}",
                "spec.boot.kernel.image: VirtualMachineImage disk is a qcow2 disk image; a kernel or initrd must be a raw file",
            ),
            (
                "boot: {kernel: {image: k}, initrd: {image: disk}}",
                "spec.boot.initrd.image: VirtualMachineImage disk is a qcow2",
            ),
            (
                "boot: {kernel: {image: other}}",
                "spec.boot.kernel.image: VirtualMachineImage other is not in this node's image cache",
            ),
        ];
        for (boot, want) in cases {
            let s = spec(&format!("memory: 128Mi\n{boot}\n"));
            let e = plan(&s, id("u"), &VmDir(PathBuf::from("/x")), &ctx()).unwrap_err();
            assert!(e.to_string().starts_with(want), "{e}");
        }
    }

    #[test]
    fn cloud_init_meta_data_that_is_not_a_mapping_is_refused() {
        let s = spec(
            "memory: 128Mi\nboot: {kernel: {path: /var/lib/kubevmm/k}}\n\
             disks: [{name: seed, cloudInit: {metaData: \"- a\\n\"}}]\n",
        );
        let e = plan(&s, id("u"), &VmDir(PathBuf::from("/x")), &ctx()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("spec.disks[0].cloudInit.metaData: meta-data must be a YAML mapping"),
            "{e}"
        );
    }

    #[test]
    fn the_examples_prepare_their_seed_disks() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("read");
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).expect("yaml");
                if v.get("kind").and_then(serde_yaml::Value::as_str) != Some("VirtualMachine") {
                    continue;
                }
                let vm: kubevmm_crds::VirtualMachine =
                    serde_yaml::from_value(v).expect("a VirtualMachine");
                let cloud_init = vm.spec.disks.iter().any(|d| d.cloud_init.is_some());
                let ctx = NodeContext {
                    allowed_dirs: vec![PathBuf::from("/")],
                    ..ctx()
                };
                match plan(&vm.spec, id("u"), &VmDir(PathBuf::from("/x")), &ctx) {
                    Ok(p) => seeds += p.seeds.len(),
                    Err(e) => {
                        let text = e.to_string();
                        assert!(!text.contains("cloudInit"), "{}: {text}", path.display());
                        // Images and masquerade are other work; the seed is not.
                        assert!(
                            matches!(e, PrepareError::Unsupported { .. }),
                            "{}: {e}",
                            path.display()
                        );
                        if cloud_init {
                            let mut only_seeds = vm.spec.clone();
                            only_seeds.disks.retain(|d| d.cloud_init.is_some());
                            only_seeds.networks.clear();
                            only_seeds.boot.kernel.image = None;
                            only_seeds.boot.kernel.path = Some("/k".into());
                            only_seeds.boot.initrd = None;
                            let p = plan(&only_seeds, id("u"), &VmDir(PathBuf::from("/x")), &ctx)
                                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                            seeds += p.seeds.len();
                        }
                    }
                }
            }
        }
        assert!(seeds > 0, "no example has a cloudInit disk");
    }

    #[test]
    fn macs_are_stable_unicast_and_local() {
        let m = stable_mac("uid", "lan");
        assert_eq!(m, stable_mac("uid", "lan"));
        assert_ne!(m, stable_mac("uid", "wan"));
        assert!(m.starts_with("52:54:00:"));
    }
}
