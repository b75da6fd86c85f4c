//! The host side of a VM's life that the reconciler calls: readying its
//! cgroups, user id and files before a start ([`prepare_host`]), and releasing
//! what it had on this node ([`Ctx::release_runtime`], [`Ctx::remove_host_state`]).

use kubevmm_crds::VirtualMachine;

use super::handoff::Handoff;
use super::prepare::{self, NodeContext, Plan, PrepareError};
use super::reconcile::Ctx;
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
        cgroups::plan(&self.cfg.cgroups, uid, limits)
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
    let (_, fds) = prepare::realize(&plan, dir, node, jail)?;
    record_images(vm, dir, &plan, node);
    Ok((plan, fds))
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
