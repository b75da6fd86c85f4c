//! The host side of a VM's life that the reconciler calls: readying its
//! cgroups, user id and files before a start ([`prepare_host`]), and releasing
//! what it had on this node ([`Ctx::release_runtime`], [`Ctx::remove_host_state`]).

use kubevmm_crds::contract::reason;
use kubevmm_crds::VirtualMachine;

use super::ctx::Ctx;
use super::handoff::Handoff;
use super::prepare::{self, NodeContext, Plan, PrepareError};
use super::supervisor::VmDir;
use super::{cgroups, jail_ids};

impl Ctx {
    /// The VM's cgroup directories, with limits when `vm` is given.
    pub(super) fn cgroups(&self, uid: &str, vm: Option<&VirtualMachine>) -> Vec<cgroups::Dir> {
        let limits = vm.and_then(|vm| {
            let memory = kubevmm_crds::quantity::parse_bytes(&vm.spec.memory.0).ok()?;
            Some(cgroups::limits(
                vm.spec.cpus,
                memory,
                self.cfg.vmm_memory_overhead,
            ))
        });
        cgroups::plan(&self.cfg.cgroups, &self.cfg.node_name, uid, limits)
    }

    /// Releases what the VM runs with on this host: taps and cgroups
    /// (killing what is left in them). Written once, used by release and by
    /// the orphan sweep; idempotent.
    pub(super) fn release_runtime(&self, uid: &str, taps: usize) {
        super::taps::release_taps(uid, taps);
        let left = cgroups::remove(&self.cgroups(uid, None));
        if !left.is_empty() {
            tracing::warn!(uid, ?left, "cgroups still busy; the orphan sweep retries");
        }
    }

    /// Everything the VM has on this host but its disks: [`Self::release_runtime`]
    /// and the run state directory.
    pub(super) fn remove_host_state(&self, uid: &str, taps: usize) {
        self.release_runtime(uid, taps);
        let _ = std::fs::remove_dir_all(self.dir(uid).0);
    }

    /// Applies the NAT and anti-spoofing rules for the taps on the node
    /// now (after a VM's taps are made or removed, and from the sweep).
    pub(super) fn sync_rules(&self) {
        if let Err(e) = self.network.sync_rules() {
            tracing::warn!("network rules not applied: {e}");
        }
    }

    /// The VM's node-local disks directory.
    pub(super) fn disk_dir(&self, uid: &str) -> super::disks::DiskDir {
        super::disks::DiskDir::of(&self.cfg.state_dir, uid)
    }
}

/// Plans the VM, readies its cgroups (empty: no stale VMM may run beside a
/// new one; limits written), picks its VMM uid and opens what it uses.
pub(super) fn prepare_host(
    ctx: &Ctx,
    vm: &VirtualMachine,
    uid: &str,
    dir: &VmDir,
    node: &NodeContext,
    cg: &[cgroups::Dir],
) -> Result<(Plan, Handoff), PrepareError> {
    let id = prepare::VmId {
        uid,
        name: vm.metadata.name.as_deref().unwrap_or_default(),
        namespace: vm.metadata.namespace.as_deref().unwrap_or_default(),
    };
    let plan = prepare::plan(&vm.spec, id, dir, &ctx.disk_dir(uid), node)?;
    let stale = cgroups::live_pids(cg);
    if !stale.is_empty() {
        tracing::warn!(
            uid,
            ?stale,
            "stopping VMM processes left in the VM's cgroup before starting it"
        );
        cgroups::remove(cg);
    }
    cgroups::create(cg).map_err(|e| PrepareError::Host {
        what: "VM cgroup".into(),
        why: e.to_string(),
    })?;
    let jail = ctx
        .cfg
        .jail
        .map(|r| jail_ids::assign(&ctx.cfg.state_dir.join("vms"), uid, r))
        .transpose()
        .map_err(|e| PrepareError::Host {
            what: "VMM user id".into(),
            why: e.to_string(),
        })?;
    reserve_addresses(ctx, vm, uid, &plan)?;
    let (_, fds) = prepare::realize(&plan, dir, node, jail)?;
    record_images(vm, dir, &plan, node);
    ctx.sync_rules();
    Ok((plan, fds))
}

/// Sets the masquerade network up (first use, or re-made) and reserves the
/// stable address of each masquerade NIC of the plan.
fn reserve_addresses(
    ctx: &Ctx,
    vm: &VirtualMachine,
    uid: &str,
    plan: &Plan,
) -> Result<(), PrepareError> {
    use super::network::NetworkError;
    use kubevmm_dhcp::DhcpError;
    let Some(first) = plan.leases.first() else {
        return Ok(());
    };
    let net = &ctx.network;
    net.ensure().map_err(|e| PrepareError::Network {
        field: format!("{}.masquerade", first.field),
        reason: match e {
            NetworkError::Masquerade(_) => reason::SUBNET_OVERLAP,
            _ => reason::MASQUERADE_UNAVAILABLE,
        },
        what: e.to_string(),
    })?;
    let (ns, name) = (
        vm.metadata.namespace.as_deref().unwrap_or_default(),
        vm.metadata.name.as_deref().unwrap_or_default(),
    );
    for l in &plan.leases {
        let owner = super::network::owner(ns, name, uid, &l.network);
        net.reserve(&l.mac, &owner, name)
            .map_err(|e| PrepareError::Network {
                field: l.field.clone(),
                reason: match e {
                    DhcpError::PoolExhausted { .. } => reason::ADDRESS_POOL_EXHAUSTED,
                    DhcpError::MacInUse { .. } => reason::MAC_ADDRESS_IN_USE,
                    _ => reason::MASQUERADE_UNAVAILABLE,
                },
                what: match e {
                    DhcpError::PoolExhausted { subnet } => format!(
                        "no free address left in the masquerade subnet {subnet}; \
                         delete VMs or give the node a larger --masquerade-subnet"
                    ),
                    DhcpError::MacInUse { owner } => format!(
                        "MAC {} is already used by {owner} on this node; \
                         remove macAddress to get a generated one",
                        l.mac
                    ),
                    e => e.to_string(),
                },
            })?;
    }
    Ok(())
}

/// Records the cached images the VM uses, so the image cache keeps them:
/// all of them in its state directory (while it runs here), the bases of
/// its overlays also in its disk directory (as long as the overlays exist).
fn record_images(vm: &VirtualMachine, dir: &VmDir, plan: &Plan, node: &NodeContext) {
    let record = |d: &std::path::Path, images: &std::collections::BTreeMap<String, _>| {
        if let Err(e) = super::images::record_use(d, images) {
            tracing::warn!(vm = ?vm.metadata.name, "cannot record the images it uses: {e}");
        }
    };
    record(&dir.0, &node.images);
    if let Some(l) = &plan.local_disks {
        let bases = node
            .images
            .iter()
            .filter(|(name, _)| {
                vm.spec
                    .disks
                    .iter()
                    .any(|d| d.image.as_ref().is_some_and(|i| i.name == **name))
            })
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        record(&l.dir.0, &bases);
    }
}
