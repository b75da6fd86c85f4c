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
use std::collections::BTreeMap;

use kubevmm_crds::contract::reason;
use kubevmm_crds::image::ImageFormat;
use kubevmm_crds::vm::BootSource;
use kubevmm_crds::VirtualMachineSpec;
use kubevmm_vmm::config::{DiskConfig, JailConfig, SerialConfig, SerialFileFormat, SerialMode};
use kubevmm_vmm::VmConfig;

use super::disks::{DiskDir, Owner};
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
    /// Too little free space for a new empty disk.
    #[error("{field}: {need} bytes needed for the new disk but only {free} free in {dir}; free space on the node or ask for a smaller disk")]
    NoSpace {
        /// The field.
        field: String,
        /// Bytes the disk may grow to.
        need: u64,
        /// Bytes free.
        free: u64,
        /// The disk directory.
        dir: String,
    },
    /// The masquerade network cannot serve this NIC (its subnet collides
    /// with the host's, the address pool is exhausted, the MAC is taken).
    #[error("{field}: {what}")]
    Network {
        /// The field.
        field: String,
        /// The condition reason.
        reason: &'static str,
        /// What is wrong, and what to do.
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

impl PrepareError {
    /// The `Ready` condition reason that names this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Host { .. } => reason::HOST_SETUP_FAILED,
            Self::NoSpace { .. } => reason::INSUFFICIENT_SPACE,
            Self::Network { reason, .. } => reason,
            Self::Unsupported { .. }
            | Self::Path(_)
            | Self::BridgeNotAllowed { .. }
            | Self::Invalid { .. } => reason::INVALID_SPEC,
        }
    }
}

/// A sparse file to create (once) for an `emptyDisk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseFile {
    /// The spec field (`spec.disks[i].emptyDisk.size`), for errors.
    pub field: String,
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

/// The VM's node-local disks directory, made (with its owner record)
/// before any disk in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDisks {
    /// The directory.
    pub dir: DiskDir,
    /// The VM they belong to.
    pub owner: Owner,
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
    /// The agent's own file in the VM's state or disk directory.
    State(PathBuf),
    /// A VM's copy-on-write disk: a qcow2 overlay in the VM's disk
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
    /// Where the emptyDisk files and overlays live, when there are any.
    pub local_disks: Option<LocalDisks>,
    /// Empty disks to create if missing.
    pub sparse_files: Vec<SparseFile>,
    /// Seed images to write at every start.
    pub seeds: Vec<Seed>,
    /// Taps to create.
    pub taps: Vec<Tap>,
    /// For `status.interfaces`.
    pub interfaces: Vec<nics::Interface>,
    /// Addresses to reserve on the masquerade network, one per NIC there.
    pub leases: Vec<nics::LeaseRequest>,
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
    /// The masquerade bridge (`None`: masquerade is not offered, as in
    /// `node-vmm run`).
    pub masquerade_bridge: Option<String>,
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
    /// `metadata.namespace`.
    pub namespace: &'a str,
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
    disk_dir: &DiskDir,
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
            let path = disk_dir.0.join(format!("disk-{}.img", d.name));
            sparse_files.push(SparseFile {
                field: format!("{field}.emptyDisk.size"),
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
            let path = disk_dir.0.join(format!("disk-{}.qcow2", d.name));
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

/// Builds the plan for `spec` (pure).
pub fn plan(
    spec: &VirtualMachineSpec,
    vm: VmId<'_>,
    dir: &VmDir,
    disk_dir: &DiskDir,
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
    let disks = disks(spec, vm, dir, disk_dir, ctx)?;
    let nics::Nics {
        configs: nets,
        taps,
        interfaces,
        leases,
    } = nics::networks(spec, vm.uid, ctx)?;
    let config = VmConfig {
        cpus,
        memory,
        kernel,
        initrd,
        cmdline: spec.boot.cmdline.clone().unwrap_or_default(),
        disks: disks.configs,
        nets,
        rng: true,
        // The console: a socket any number of clients attach to, and a
        // bounded ring that keeps the newest output for those who come late.
        serial: SerialConfig {
            mode: SerialMode::Socket,
            path: Some(dir.console_socket()),
            log: Some(dir.console_ring()),
            file_format: SerialFileFormat::Ring,
            ..SerialConfig::default()
        },
        api_socket: Some(dir.api_socket()),
        on_reboot: kubevmm_vmm::config::OnReboot::Exit,
        seccomp: true,
        fds: kubevmm_vmm::config::HandedFds::default(),
        jail: None,
        // The guest's product_uuid is the VM's UID (an API server UID is
        // always a UUID; anything else leaves the SMBIOS UUID unset).
        uuid: uuid::Uuid::parse_str(vm.uid).ok(),
    };
    Ok(Plan {
        config,
        opens: Opens {
            kernel: kernel_src,
            initrd: initrd_src,
            disks: disks.opens,
        },
        local_disks: spec
            .disks
            .iter()
            .any(kubevmm_crds::vm::Disk::is_node_local)
            .then(|| LocalDisks {
                dir: disk_dir.clone(),
                owner: Owner {
                    namespace: vm.namespace.into(),
                    name: vm.name.into(),
                    uid: vm.uid.into(),
                },
            }),
        sparse_files: disks.sparse_files,
        seeds: disks.seeds,
        taps,
        interfaces,
        leases,
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
    if let Some(l) = &plan.local_disks {
        super::disks::create(&l.dir, &l.owner)
            .map_err(|e| host("disk directory".into())(e.to_string()))?;
    }
    for f in &plan.sparse_files {
        super::opener::sparse_file(f)?;
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

mod nics;

#[cfg(test)]
mod tests;
