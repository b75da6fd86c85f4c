//! The agent's sweep, every 10 s: VMMs and host state of VMs no longer
//! bound to this node, cgroups that outlived their state directory, and the
//! per-phase VM counts for metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::reflector::Store;
use kube::ResourceExt as _;
use kubevmm_crds::VirtualMachine;

use super::reconcile::Ctx;
use super::supervisor::{self, ProcessId};
use super::{cgroups, vmm_client};

/// Stops and removes VMMs whose VM is no longer bound to this node (deleted
/// without us, unbound by the operator after the node was fenced, ...).
pub async fn collect_orphans(ctx: Arc<Ctx>, store: Store<VirtualMachine>) {
    if store.wait_until_ready().await.is_err() {
        return;
    }
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let bound: std::collections::HashSet<String> =
            store.state().iter().filter_map(|vm| vm.uid()).collect();
        let Ok(entries) = std::fs::read_dir(ctx.cfg.state_dir.join("vms")) else {
            continue;
        };
        for entry in entries.flatten() {
            let uid = entry.file_name().to_string_lossy().into_owned();
            if bound.contains(&uid) {
                continue;
            }
            let dir = ctx.dir(&uid);
            if let Some(pid) = dir.vmm_pid().filter(ProcessId::alive) {
                tracing::warn!(
                    uid,
                    "stopping a VMM whose VirtualMachine is no longer bound to this node"
                );
                let _ = vmm_client::request(&dir.api_socket(), "PUT", "/vm/stop").await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                supervisor::kill(pid);
            }
            ctx.remove_host_state(&uid, super::taps::MAX_TAPS);
            ctx.lock().remove(&uid);
        }
        // cgroups that outlived their state directory (busy at release).
        for uid in cgroups::vm_uids(&ctx.cfg.cgroups) {
            if !bound.contains(&uid) && !ctx.dir(&uid).0.exists() {
                cgroups::remove(&ctx.cgroups(&uid, None));
            }
        }
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for vm in store.state() {
            if let Some(p) = vm.status.as_ref().and_then(|s| s.phase) {
                *counts.entry(p.as_str()).or_default() += 1;
            }
        }
        ctx.metrics.set_phases(&counts);
    }
}
