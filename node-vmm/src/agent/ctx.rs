//! The node agent's shared state: the API client and Event sender, settings,
//! metrics, the images and network it serves VMs from, and its record of
//! each VM on the node.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::channel::mpsc::UnboundedSender;
use kube::runtime::reflector::ObjectRef;
use kube::Client;
use kubevmm_crds::events::EventSink;
use kubevmm_crds::VirtualMachine;

use super::local::LocalVm;
use super::supervisor::VmDir;
use super::AgentConfig;

/// Shared agent state.
pub struct Ctx {
    /// API client.
    pub client: Client,
    /// Events, sent in the background.
    pub events: EventSink,
    /// Imports the images VMs boot from.
    pub importer: Arc<super::images::Importer>,
    /// The masquerade network.
    pub network: Arc<super::network::Network>,
    /// This binary (runs the shim).
    pub node_vmm: PathBuf,
    /// Settings.
    pub cfg: AgentConfig,
    /// Metrics.
    pub metrics: Arc<super::metrics::Metrics>,
    /// Per-VM state, by uid.
    pub vms: Mutex<HashMap<String, LocalVm>>,
    /// Wakes the controller for a VM whose VMM ended.
    pub trigger: UnboundedSender<ObjectRef<VirtualMachine>>,
    /// The VMs whose VMM is alive here, by uid. Kept apart from `vms`, whose
    /// entry is taken out while its VM reconciles (a heartbeat then would
    /// count one VM short and write that).
    pub running: Mutex<HashSet<String>>,
    /// Signalled when a VMM starts or ends here, so `HypervisorNode`'s
    /// running-VM count follows at once rather than at the next heartbeat.
    pub running_changed: tokio::sync::Notify,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, LocalVm>> {
        self.vms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// VMMs alive on this node.
    pub fn running_count(&self) -> i32 {
        i32::try_from(self.running_set().len()).unwrap_or(i32::MAX)
    }

    fn running_set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records whether VM `uid`'s VMM is alive; wakes the heartbeat when
    /// that changes the count.
    pub(super) fn set_running(&self, uid: &str, alive: bool) {
        let changed = {
            let mut running = self.running_set();
            if alive {
                running.insert(uid.to_string())
            } else {
                running.remove(uid)
            }
        };
        if changed {
            self.running_changed.notify_one();
        }
    }

    pub(super) fn dir(&self, uid: &str) -> VmDir {
        VmDir(self.cfg.state_dir.join("vms").join(uid))
    }
}
