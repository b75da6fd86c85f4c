//! The operator's settings that shape what it watches and decides.

use crate::scheduling::Overcommit;

/// Operator settings that shape decisions.
#[derive(Debug, Clone)]
pub struct Settings {
    /// vCPU and memory overcommit.
    pub overcommit: Overcommit,
    /// Only VMs in this namespace (all when `None`).
    pub namespace: Option<String>,
    /// Only `HypervisorNode`s matching this label selector (all when `None`).
    pub node_selector: Option<String>,
}
