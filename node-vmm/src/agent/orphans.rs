//! The agent's sweep, every 10 s: VMMs, taps and cgroups of VMs no longer
//! bound to this node; their run state and disks once the API server says
//! they are no longer needed ([`super::retention`]); cgroups that outlived
//! their state directory; and the per-phase VM counts for metrics.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kube::api::{Api, ListParams};
use kube::ResourceExt;
use kubevmm_crds::contract::LABEL_NODE;
use kubevmm_crds::VirtualMachine;

use super::ctx::Ctx;
use super::disks::Owner;
use super::retention::{self, Found, Lookup, Verdict};
use super::supervisor::{self, ProcessId};
use super::{cgroups, vmm_client};

/// Stops and removes VMMs whose VM is no longer bound to this node (deleted
/// without us, unbound by the operator after the node was fenced, released
/// when its guest stopped, ...).
///
/// Each pass reads the VMs labelled for this node with its own LIST (served
/// from the API server's watch cache) rather than the controller's store: a
/// pass must never run on a store that has not finished its first list (it
/// would take every VM for gone), and the store's ready signal is not
/// raised for a controller-owned reflector. A failed LIST skips the pass.
pub async fn collect_orphans(ctx: Arc<Ctx>) {
    let api: Api<VirtualMachine> = Api::all(ctx.client.clone());
    let lp = ListParams::default()
        .labels(&format!("{LABEL_NODE}={}", ctx.cfg.node_name))
        .match_any();
    let node = ctx.cfg.node_name.as_str();
    // When each unbound VM was last looked up (at most every 30 s).
    let mut checked: HashMap<String, Instant> = HashMap::new();
    let mut unowned_before: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let vms = match api.list(&lp).await {
            Ok(l) => l.items,
            Err(e) => {
                tracing::warn!("orphan sweep skipped: cannot list this node's VMs: {e}");
                continue;
            }
        };
        let bound: std::collections::HashSet<String> =
            vms.iter().filter_map(ResourceExt::uid).collect();
        let mut lookups = Lookups::new(&ctx.client, &mut checked);
        for (uid, path) in entries(&ctx.cfg.state_dir.join("vms")) {
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
            ctx.release_runtime(&uid, super::taps::MAX_TAPS);
            ctx.lock().remove(&uid);
            ctx.set_running(&uid, false);
            let owner = super::disks::DiskDir(path.clone()).owner();
            if let Some(lookup) = lookups.get(&uid, owner.as_ref()).await {
                let v = retention::run_state(owner.as_ref(), &lookup, node, age(&path));
                if remove(&uid, &path, v, "run state") {
                    // Deleted, re-created or moved: its addresses here go too.
                    ctx.network.forget_vm(&uid);
                }
            }
        }
        for (uid, path) in entries(&super::disks::root(&ctx.cfg.state_dir)) {
            if bound.contains(&uid) {
                continue;
            }
            let owner = super::disks::DiskDir(path.clone()).owner();
            if let Some(lookup) = lookups.get(&uid, owner.as_ref()).await {
                let v = retention::disks(owner.as_ref(), &lookup, node, age(&path));
                remove(&uid, &path, v, "disks");
            }
        }
        checked.retain(|uid, _| !bound.contains(uid));
        // Addresses of VMs with nothing left on the node, two passes in a
        // row (a VM bound after this pass's list is not mistaken for one).
        let unowned: HashSet<String> = ctx
            .network
            .owner_uids()
            .into_iter()
            .filter(|uid| {
                !bound.contains(uid) && !ctx.dir(uid).0.exists() && !ctx.disk_dir(uid).0.exists()
            })
            .collect();
        ctx.network
            .forget_unowned(|uid| !(unowned.contains(uid) && unowned_before.contains(uid)));
        unowned_before = unowned;
        // The masquerade network as it should be (a deleted bridge made
        // again, the DHCP server restarted), and the rules for the taps
        // present now (gone VMs' chains removed).
        if ctx.network.in_use() {
            if let Err(e) = ctx.network.ensure() {
                tracing::warn!("masquerade network: {e}");
            }
        }
        ctx.sync_rules();
        // cgroups of this node's VMs that outlived their state directory
        // (busy at release).
        for uid in cgroups::vm_uids(&ctx.cfg.cgroups, node) {
            if !bound.contains(&uid) && !ctx.dir(&uid).0.exists() {
                cgroups::remove(&ctx.cgroups(&uid, None));
            }
        }
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for vm in &vms {
            if let Some(p) = vm.status.as_ref().and_then(|s| s.phase) {
                *counts.entry(p.as_str()).or_default() += 1;
            }
        }
        ctx.metrics.set_phases(&counts);
    }
}

/// How often one unbound VM is looked up.
const LOOKUP_EVERY: Duration = Duration::from_secs(30);

/// `(uid, path)` of each directory in `dir`.
fn entries(dir: &Path) -> Vec<(String, PathBuf)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect()
}

/// How long ago `path` was last modified.
fn age(path: &Path) -> Duration {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default()
}

/// Applies `verdict` to `path`; whether it was removed.
fn remove(uid: &str, path: &Path, verdict: Verdict, what: &str) -> bool {
    let Verdict::Remove(why) = verdict else {
        return false;
    };
    match std::fs::remove_dir_all(path) {
        Ok(()) => {
            tracing::info!(uid, why, "removed the VM's {what}");
            true
        }
        Err(e) => {
            tracing::warn!(uid, why, "cannot remove the VM's {what}: {e}");
            false
        }
    }
}

/// One pass's lookups of unbound VMs: one GET per VM, each VM at most once
/// per [`LOOKUP_EVERY`] (a stopped VM's directories are rarely due).
struct Lookups<'a> {
    client: &'a kube::Client,
    checked: &'a mut HashMap<String, Instant>,
    seen: HashMap<String, Lookup>,
}

impl<'a> Lookups<'a> {
    fn new(client: &'a kube::Client, checked: &'a mut HashMap<String, Instant>) -> Self {
        Self {
            client,
            checked,
            seen: HashMap::new(),
        }
    }

    /// What the API server says of `uid`'s VM, or `None` when it is not
    /// due this pass.
    async fn get(&mut self, uid: &str, owner: Option<&Owner>) -> Option<Lookup> {
        if let Some(l) = self.seen.get(uid) {
            return Some(l.clone());
        }
        let now = Instant::now();
        if self
            .checked
            .get(uid)
            .is_some_and(|t| now.duration_since(*t) < LOOKUP_EVERY)
        {
            return None;
        }
        self.checked.insert(uid.to_string(), now);
        let lookup = match owner {
            None => Lookup::Unknown,
            Some(o) => {
                let api: Api<VirtualMachine> = Api::namespaced(self.client.clone(), &o.namespace);
                match api.get_opt(&o.name).await {
                    Ok(None) => Lookup::Missing,
                    Ok(Some(vm)) => {
                        let status = vm.status.unwrap_or_default();
                        Lookup::Found(Found {
                            uid: vm.metadata.uid.unwrap_or_default(),
                            node_name: status.node_name,
                            disk_node: status.disk_node,
                        })
                    }
                    Err(_) => Lookup::Unknown,
                }
            }
        };
        self.seen.insert(uid.to_string(), lookup.clone());
        Some(lookup)
    }
}
