//! The host side of a VM's life that the reconciler calls: readying its
//! cgroups, user id and files before a start ([`prepare_host`]), and removing
//! everything it had on this node ([`Ctx::remove_host_state`]).

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

    /// Removes everything the VM has on this host: taps, cgroups (killing
    /// what is left in them), the state directory. Written once, used by
    /// release and by the orphan sweep.
    pub(super) fn remove_host_state(&self, uid: &str, taps: usize) {
        super::taps::release_taps(uid, taps);
        let left = cgroups::remove(&self.cgroups(uid, None));
        if !left.is_empty() {
            tracing::warn!(uid, ?left, "cgroups still busy; the orphan sweep retries");
        }
        let _ = std::fs::remove_dir_all(self.dir(uid).0);
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
    let name = vm.metadata.name.as_deref().unwrap_or_default();
    let plan = prepare::plan(&vm.spec, prepare::VmId { uid, name }, dir, node)?;
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
    Ok((plan, fds))
}
