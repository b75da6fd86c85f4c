//! Placement of `VirtualMachine`s onto `HypervisorNode`s: a pure function of
//! the cluster state the reconciler read, no I/O, so every rule is unit-tested.
//!
//! A node can take a VM when it is Ready (fresh heartbeat Lease), has usable
//! KVM, is not cordoned, carries every label of the VM's `nodeSelector`, and
//! has the vCPUs and memory free: allocatable × overcommit ratio minus what
//! the VMs already bound to it ask for (see [`holds_capacity`]: a bound VM
//! whose guest ended but will run again keeps its share). Among the nodes that
//! fit, the one with the most free memory wins (spreading guests), ties
//! broken by name so two replicas decide alike.

use std::collections::BTreeMap;

use kubevmm_crds::quantity::format_bytes;
use kubevmm_crds::{RunStrategy, VmPhase};

/// Overcommit ratios for vCPUs and memory (1.0 = none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overcommit {
    /// vCPU ratio.
    pub cpu: f64,
    /// Memory ratio.
    pub memory: f64,
}

impl Default for Overcommit {
    fn default() -> Self {
        Self {
            cpu: 1.0,
            memory: 1.0,
        }
    }
}

/// Why an overcommit ratio was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedulingError {
    /// Ratios must be finite and at least 0.1 (and at most 100).
    #[error("{what} overcommit ratio {value} is out of range: use a number from 0.1 to 100, e.g. 1.0 (none) or 1.5")]
    BadRatio {
        /// `cpu` or `memory`.
        what: &'static str,
        /// The value given.
        value: f64,
    },
}

impl Overcommit {
    /// Checks both ratios.
    pub fn new(cpu: f64, memory: f64) -> Result<Self, SchedulingError> {
        for (what, value) in [("cpu", cpu), ("memory", memory)] {
            if !value.is_finite() || !(0.1..=100.0).contains(&value) {
                return Err(SchedulingError::BadRatio { what, value });
            }
        }
        Ok(Self { cpu, memory })
    }
}

/// A hypervisor node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeInfo {
    /// `HypervisorNode` name (= Kubernetes node name).
    pub name: String,
    /// `metadata.labels` (node-vmm copies its Node's labels there).
    pub labels: BTreeMap<String, String>,
    /// `spec.cordoned`.
    pub cordoned: bool,
    /// Heartbeat Lease fresh (renewTime + leaseDurationSeconds > now).
    pub ready: bool,
    /// `status.kvm.available`.
    pub kvm_available: bool,
    /// `status.allocatable.cpus` (0 when not reported).
    pub allocatable_cpus: u32,
    /// `status.allocatable.memory` in bytes (0 when not reported or unparseable).
    pub allocatable_memory: u64,
}

/// What a VM asks for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request {
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// `spec.nodeSelector`.
    pub node_selector: BTreeMap<String, String>,
    /// `status.diskNode`: the only node that holds the VM's disks.
    pub disk_node: Option<String>,
}

/// vCPUs and bytes already taken on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// vCPUs of non-terminal VMs bound to the node.
    pub cpus: u64,
    /// Memory of non-terminal VMs bound to the node.
    pub memory: u64,
}

impl Usage {
    /// Adds one VM's request.
    pub fn add(&mut self, cpus: u32, memory: u64) {
        self.cpus = self.cpus.saturating_add(u64::from(cpus));
        self.memory = self.memory.saturating_add(memory);
    }
}

/// The `reason` of an [`Unschedulable`] (and of the operator's spec check):
/// the `Scheduled=False` condition's reason and the failure counter's label.
pub mod reason {
    /// No node at all, or none left to consider.
    pub const NO_NODES: &str = "NoNodes";
    /// The node's agent is not ready.
    pub const NOT_READY: &str = "NotReady";
    /// The node has no usable KVM.
    pub const NO_KVM: &str = "NoKvm";
    /// The node is cordoned.
    pub const CORDONED: &str = "Cordoned";
    /// The VM's node selector excludes the node.
    pub const NODE_SELECTOR: &str = "NodeSelector";
    /// Not enough vCPUs or memory left.
    pub const INSUFFICIENT: &str = "Insufficient";
    /// The node holding the VM's disks is gone.
    pub const DISK_NODE_GONE: &str = "DiskNodeGone";
    /// Nodes refused for different reasons.
    pub const MIXED: &str = "Mixed";
    /// The spec cannot be placed at all.
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

/// Every [`reason`]: the operator's failure counter starts at 0 for each, so
/// a rate of "no failures" is 0, not an absent series.
pub const UNSCHEDULABLE_REASONS: [&str; 9] = [
    reason::NO_NODES,
    reason::NOT_READY,
    reason::NO_KVM,
    reason::CORDONED,
    reason::NODE_SELECTOR,
    reason::INSUFFICIENT,
    reason::DISK_NODE_GONE,
    reason::MIXED,
    reason::INVALID_SPEC,
];

/// Why no node can take a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unschedulable {
    /// Human message for the `Scheduled=False` condition and the Event,
    /// e.g. `0/2 nodes can run 4 vCPUs and 2Gi: node-a has 2 vCPUs free, node-b is cordoned`.
    pub message: String,
    /// Short machine reason for metrics: `NoNodes`, `Insufficient`,
    /// `NotReady`, `Cordoned`, `NodeSelector`, `NoKvm` (the most common
    /// per-node reason), or `Mixed`.
    pub reason: &'static str,
}

/// A phase after which the guest is not running and holds no capacity.
pub fn is_terminal(phase: Option<VmPhase>) -> bool {
    matches!(
        phase,
        Some(VmPhase::Stopped | VmPhase::Succeeded | VmPhase::Failed)
    )
}

/// Whether a VM with this run strategy and phase should have a running
/// guest (and so be bound to a node).
///
/// `Always` always runs (node-vmm restarts it with backoff); `RerunOnFailure`
/// runs until it succeeds; `Manual` and `Once` run until their first
/// terminal phase; `Halted` never runs. A pending start or restart request
/// (`kubevmm.io/restart-requested`, e.g. from `kubectl vm start`) makes any
/// strategy but `Halted` run again.
pub fn wants_to_run(strategy: RunStrategy, phase: Option<VmPhase>, start_requested: bool) -> bool {
    match strategy {
        RunStrategy::Halted => false,
        _ if start_requested => true,
        RunStrategy::Always => true,
        RunStrategy::RerunOnFailure => phase != Some(VmPhase::Succeeded),
        RunStrategy::Manual | RunStrategy::Once => !is_terminal(phase),
    }
}

/// A VM bound to a node, for capacity accounting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundVm {
    /// The node it is bound to.
    pub node: String,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Its phase.
    pub phase: Option<VmPhase>,
    /// Its run strategy (`None` when the spec cannot be read).
    pub strategy: Option<RunStrategy>,
    /// Whether a start or restart request is pending.
    pub start_requested: bool,
}

/// Whether a bound VM counts against its node's capacity.
///
/// A running (or starting, stopping, paused...) guest does. A guest in a
/// terminal phase does too when it will run again on the same node: an
/// `Always` VM whose guest `Failed`, or a `RerunOnFailure` one, stays bound
/// while node-vmm restarts it with backoff, so its vCPUs and memory must not
/// be handed to another VM meanwhile. Only a terminal VM that will not run
/// again (it is being released) frees its share; a VM whose strategy is
/// unknown keeps it.
pub fn holds_capacity(
    phase: Option<VmPhase>,
    strategy: Option<RunStrategy>,
    start_requested: bool,
) -> bool {
    !is_terminal(phase) || strategy.is_none_or(|s| wants_to_run(s, phase, start_requested))
}

/// What the bound VMs that hold capacity take on each node.
pub fn usage_by_node<'a>(vms: impl IntoIterator<Item = &'a BoundVm>) -> BTreeMap<String, Usage> {
    let mut used: BTreeMap<String, Usage> = BTreeMap::new();
    for vm in vms {
        if holds_capacity(vm.phase, vm.strategy, vm.start_requested) {
            used.entry(vm.node.clone())
                .or_default()
                .add(vm.cpus, vm.memory);
        }
    }
    used
}

/// Free capacity of `node` given `used`, after overcommit; negative when
/// the node is already overcommitted beyond its ratio.
pub fn free(node: &NodeInfo, used: Usage, oc: Overcommit) -> (i128, i128) {
    (
        scaled(u64::from(node.allocatable_cpus), oc.cpu) - i128::from(used.cpus),
        scaled(node.allocatable_memory, oc.memory) - i128::from(used.memory),
    )
}

#[allow(clippy::cast_precision_loss)]
fn scaled(value: u64, ratio: f64) -> i128 {
    if (ratio - 1.0).abs() < f64::EPSILON {
        return i128::from(value);
    }
    // f64 keeps 53 bits: exact for any realistic vCPU count and to within a
    // few bytes for memory, which is all overcommit needs.
    (value as f64 * ratio).floor() as i128
}

fn vcpus(n: i128) -> String {
    if n == 1 {
        "1 vCPU".to_string()
    } else {
        format!("{n} vCPUs")
    }
}

fn bytes(n: i128) -> String {
    format_bytes(u64::try_from(n.max(0)).unwrap_or(u64::MAX))
}

/// Why one node cannot take the request, or `None` when it can.
fn misfit(
    node: &NodeInfo,
    req: &Request,
    used: Usage,
    oc: Overcommit,
) -> Option<(&'static str, String)> {
    if let Some(d) = req.disk_node.as_ref().filter(|d| **d != node.name) {
        return Some((
            "DiskNode",
            format!("{} does not hold its disks (they are on {d})", node.name),
        ));
    }
    if !node.ready {
        return Some((
            reason::NOT_READY,
            format!("{} is not ready (no fresh heartbeat)", node.name),
        ));
    }
    if !node.kvm_available {
        return Some((reason::NO_KVM, format!("{} has no usable KVM", node.name)));
    }
    if node.cordoned {
        return Some((reason::CORDONED, format!("{} is cordoned", node.name)));
    }
    let mismatched: Vec<String> = req
        .node_selector
        .iter()
        .filter(|(k, v)| node.labels.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !mismatched.is_empty() {
        return Some((
            reason::NODE_SELECTOR,
            format!(
                "{} does not match nodeSelector {}",
                node.name,
                mismatched.join(",")
            ),
        ));
    }
    let (cpu_free, mem_free) = free(node, used, oc);
    let cpu_short = cpu_free < i128::from(req.cpus);
    let mem_short = mem_free < i128::from(req.memory);
    let name = &node.name;
    match (cpu_short, mem_short) {
        (false, false) => None,
        (true, false) => Some((
            reason::INSUFFICIENT,
            format!("{name} has {} free", vcpus(cpu_free.max(0))),
        )),
        (false, true) => Some((
            reason::INSUFFICIENT,
            format!("{name} has {} memory free", bytes(mem_free)),
        )),
        (true, true) => Some((
            reason::INSUFFICIENT,
            format!(
                "{name} has {} and {} memory free",
                vcpus(cpu_free.max(0)),
                bytes(mem_free)
            ),
        )),
    }
}

/// Chooses a node for `req`, or says per node what is short.
///
/// `used` holds, per node name, what the non-terminal VMs bound there take.
pub fn place(
    req: &Request,
    nodes: &[NodeInfo],
    used: &BTreeMap<String, Usage>,
    oc: Overcommit,
) -> Result<String, Unschedulable> {
    let mut sorted: Vec<&NodeInfo> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut best: Option<(&NodeInfo, i128)> = None;
    let mut why: Vec<(&'static str, String)> = Vec::new();
    for node in sorted {
        let u = used.get(&node.name).copied().unwrap_or_default();
        if let Some(w) = misfit(node, req, u, oc) {
            why.push(w);
        } else {
            let (_, mem_free) = free(node, u, oc);
            // Strictly greater: the first (smallest name) wins a tie.
            if best.is_none_or(|(_, m)| mem_free > m) {
                best = Some((node, mem_free));
            }
        }
    }
    if let Some((node, _)) = best {
        return Ok(node.name.clone());
    }
    let asked = format!(
        "{} and {}",
        vcpus(i128::from(req.cpus)),
        bytes(i128::from(req.memory))
    );
    if nodes.is_empty() {
        return Err(Unschedulable {
            message: format!("0/0 nodes can run {asked}: no HypervisorNode exists"),
            reason: reason::NO_NODES,
        });
    }
    if let Some(d) = req
        .disk_node
        .as_ref()
        .filter(|d| nodes.iter().all(|n| n.name != **d))
    {
        return Err(Unschedulable {
            message: format!(
                "its disks (emptyDisk, image overlays) are on node {d}, which is no longer a HypervisorNode: \
                 to start it elsewhere with new, empty disks, remove status.diskNode \
                 (kubectl patch vm NAME --subresource=status --type=merge -p '{{\"status\":{{\"diskNode\":null}}}}')"
            ),
            reason: reason::DISK_NODE_GONE,
        });
    }
    let first = why.first().map_or(reason::NO_NODES, |w| w.0);
    let reason = if why.iter().all(|w| w.0 == first) {
        first
    } else {
        reason::MIXED
    };
    let parts: Vec<String> = why.into_iter().map(|w| w.1).collect();
    Err(Unschedulable {
        message: format!(
            "0/{} nodes can run {asked}: {}",
            nodes.len(),
            parts.join(", ")
        ),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    fn node(name: &str, cpus: u32, mem_gi: u64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: BTreeMap::new(),
            cordoned: false,
            ready: true,
            kvm_available: true,
            allocatable_cpus: cpus,
            allocatable_memory: mem_gi * GI,
        }
    }

    fn req(cpus: u32, mem: u64) -> Request {
        Request {
            cpus,
            memory: mem,
            node_selector: BTreeMap::new(),
            disk_node: None,
        }
    }

    fn used(entries: &[(&str, u64, u64)]) -> BTreeMap<String, Usage> {
        entries
            .iter()
            .map(|(n, c, m)| {
                (
                    (*n).to_string(),
                    Usage {
                        cpus: *c,
                        memory: *m,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn fits_and_spreads_by_free_memory() {
        let nodes = [node("node-a", 8, 8), node("node-b", 8, 16)];
        let none = BTreeMap::new();
        assert_eq!(
            place(&req(2, GI), &nodes, &none, Overcommit::default()),
            Ok("node-b".into())
        );
        // node-b has less free memory once 12Gi are taken there.
        let u = used(&[("node-b", 1, 12 * GI)]);
        assert_eq!(
            place(&req(2, GI), &nodes, &u, Overcommit::default()),
            Ok("node-a".into())
        );
    }

    #[test]
    fn ties_go_to_the_smaller_name() {
        let nodes = [node("node-b", 4, 4), node("node-a", 4, 4)];
        assert_eq!(
            place(&req(1, GI), &nodes, &BTreeMap::new(), Overcommit::default()),
            Ok("node-a".into())
        );
    }

    #[test]
    fn exact_fit_is_a_fit() {
        let nodes = [node("n", 2, 2)];
        assert_eq!(
            place(
                &req(2, 2 * GI),
                &nodes,
                &BTreeMap::new(),
                Overcommit::default()
            ),
            Ok("n".into())
        );
    }

    #[test]
    fn overcommit_scales_allocatable() {
        let nodes = [node("n", 2, 2)];
        let u = used(&[("n", 2, 2 * GI)]);
        assert!(place(&req(1, GI), &nodes, &u, Overcommit::default()).is_err());
        let oc = Overcommit::new(2.0, 1.5).unwrap();
        assert_eq!(place(&req(2, GI), &nodes, &u, oc), Ok("n".into()));
        // 2Gi × 1.5 = 3Gi: 1Gi left, 2Gi does not fit.
        let err = place(&req(1, 2 * GI), &nodes, &u, oc).unwrap_err();
        assert_eq!(
            err.message,
            "0/1 nodes can run 1 vCPU and 2Gi: n has 1Gi memory free"
        );
    }

    #[test]
    fn bad_ratios_are_refused() {
        assert!(Overcommit::new(0.0, 1.0).is_err());
        assert!(Overcommit::new(1.0, f64::NAN).is_err());
        assert!(Overcommit::new(1.0, 1000.0).is_err());
        assert!(Overcommit::new(1.0, 1.0).is_ok());
    }

    #[test]
    fn a_vm_with_node_local_disks_goes_only_to_the_node_that_holds_them() {
        let a = node("node-a", 4, 4);
        let big = node("node-b", 64, 64);
        let mut r = req(1, GI);
        r.disk_node = Some("node-a".into());
        let none = BTreeMap::new();
        let oc = Overcommit::default();
        // node-b has more room but not the disks.
        assert_eq!(
            place(&r, &[a.clone(), big.clone()], &none, oc),
            Ok("node-a".into())
        );
        // Its node down: it waits, it is not moved.
        let down = NodeInfo {
            ready: false,
            ..a.clone()
        };
        let err = place(&r, &[down, big.clone()], &none, oc).unwrap_err();
        assert_eq!(err.reason, "Mixed");
        assert!(
            err.message.contains("node-a is not ready"),
            "{}",
            err.message
        );
        assert!(
            err.message
                .contains("node-b does not hold its disks (they are on node-a)"),
            "{}",
            err.message
        );
        // Its node full: it waits too.
        let err = place(&r, &[a, big.clone()], &used(&[("node-a", 4, 0)]), oc).unwrap_err();
        assert!(
            err.message.contains("node-a has 0 vCPUs free"),
            "{}",
            err.message
        );
        // Its node gone: the condition says how to give the disks up.
        let err = place(&r, &[big], &none, oc).unwrap_err();
        assert_eq!(err.reason, "DiskNodeGone");
        assert!(
            err.message.contains("remove status.diskNode"),
            "{}",
            err.message
        );
    }

    #[test]
    fn node_selector_matches_labels() {
        let mut gpu = node("node-gpu", 4, 4);
        gpu.labels.insert("zone".into(), "a".into());
        gpu.labels.insert("disk".into(), "ssd".into());
        let plain = node("node-plain", 64, 64);
        let mut r = req(1, GI);
        r.node_selector.insert("zone".into(), "a".into());
        let nodes = [gpu, plain];
        assert_eq!(
            place(&r, &nodes, &BTreeMap::new(), Overcommit::default()),
            Ok("node-gpu".into())
        );
        r.node_selector.insert("disk".into(), "hdd".into());
        let err = place(&r, &nodes, &BTreeMap::new(), Overcommit::default()).unwrap_err();
        assert_eq!(err.reason, "NodeSelector");
        assert_eq!(
            err.message,
            "0/2 nodes can run 1 vCPU and 1Gi: node-gpu does not match nodeSelector disk=hdd, \
             node-plain does not match nodeSelector disk=hdd,zone=a"
        );
    }

    #[test]
    fn cordoned_not_ready_and_no_kvm_nodes_are_skipped() {
        let mut a = node("node-a", 8, 8);
        a.cordoned = true;
        let mut b = node("node-b", 8, 8);
        b.ready = false;
        let mut c = node("node-c", 8, 8);
        c.kvm_available = false;
        let nodes = [a, b, c];
        let err = place(&req(1, GI), &nodes, &BTreeMap::new(), Overcommit::default()).unwrap_err();
        assert_eq!(err.reason, "Mixed");
        assert_eq!(
            err.message,
            "0/3 nodes can run 1 vCPU and 1Gi: node-a is cordoned, \
             node-b is not ready (no fresh heartbeat), node-c has no usable KVM"
        );
    }

    #[test]
    fn message_names_what_is_short() {
        let nodes = [node("node-a", 4, 8), node("node-b", 8, 8)];
        let mut b = nodes[1].clone();
        b.cordoned = true;
        let nodes = [nodes[0].clone(), b];
        let u = used(&[("node-a", 2, 7 * GI)]);
        let err = place(&req(4, 2 * GI), &nodes, &u, Overcommit::default()).unwrap_err();
        assert_eq!(
            err.message,
            "0/2 nodes can run 4 vCPUs and 2Gi: node-a has 2 vCPUs and 1Gi memory free, node-b is cordoned"
        );
        let u = used(&[("node-a", 2, 0)]);
        let err = place(&req(4, GI), &nodes[..1], &u, Overcommit::default()).unwrap_err();
        assert_eq!(err.reason, "Insufficient");
        assert_eq!(
            err.message,
            "0/1 nodes can run 4 vCPUs and 1Gi: node-a has 2 vCPUs free"
        );
    }

    #[test]
    fn no_nodes_at_all() {
        let err = place(&req(1, GI), &[], &BTreeMap::new(), Overcommit::default()).unwrap_err();
        assert_eq!(err.reason, "NoNodes");
        assert_eq!(
            err.message,
            "0/0 nodes can run 1 vCPU and 1Gi: no HypervisorNode exists"
        );
    }

    #[test]
    fn overcommitted_node_reports_zero_free() {
        let nodes = [node("n", 2, 1)];
        let u = used(&[("n", 3, 2 * GI)]);
        let err = place(&req(1, GI), &nodes, &u, Overcommit::default()).unwrap_err();
        assert_eq!(
            err.message,
            "0/1 nodes can run 1 vCPU and 1Gi: n has 0 vCPUs and 0 memory free"
        );
    }

    #[test]
    fn which_bound_vms_hold_capacity() {
        use RunStrategy::{Always, Halted, Manual, Once, RerunOnFailure};
        use VmPhase::{Failed, Pending, Running, Scheduled, Stopped, Stopping, Succeeded};
        // phase | strategy | holds
        let table: &[(Option<VmPhase>, Option<RunStrategy>, bool)] = &[
            (Some(Running), Some(Once), true),
            (Some(Scheduled), Some(Manual), true),
            (Some(Stopping), Some(Halted), true),
            (None, Some(Always), true),
            (Some(Pending), None, true),
            // Bound and restarted in place by node-vmm: keeps its share.
            (Some(Failed), Some(Always), true),
            (Some(Stopped), Some(Always), true),
            (Some(Succeeded), Some(Always), true),
            (Some(Failed), Some(RerunOnFailure), true),
            // Unknown strategy: cannot tell whether it runs again.
            (Some(Failed), None, true),
            // Will not run again: released, so it frees its share.
            (Some(Succeeded), Some(RerunOnFailure), false),
            (Some(Failed), Some(Once), false),
            (Some(Stopped), Some(Manual), false),
            (Some(Stopped), Some(Halted), false),
        ];
        for &(phase, strategy, want) in table {
            assert_eq!(
                holds_capacity(phase, strategy, false),
                want,
                "{phase:?} under {strategy:?}"
            );
        }
    }

    #[test]
    fn terminal_vms_that_will_not_run_again_hold_no_capacity() {
        let bound = |node: &str, cpus, phase, strategy| BoundVm {
            node: node.into(),
            cpus,
            memory: GI,
            phase,
            strategy: Some(strategy),
            start_requested: false,
        };
        let vms = [
            bound("n", 2, Some(VmPhase::Running), RunStrategy::Once),
            bound("n", 1, Some(VmPhase::Scheduled), RunStrategy::Once),
            bound("n", 4, Some(VmPhase::Stopped), RunStrategy::Halted),
            bound("n", 4, Some(VmPhase::Succeeded), RunStrategy::Once),
            bound("n", 4, Some(VmPhase::Failed), RunStrategy::Manual),
            bound("m", 1, None, RunStrategy::Always),
        ];
        let used = usage_by_node(&vms);
        assert_eq!(
            used["n"],
            Usage {
                cpus: 3,
                memory: 2 * GI
            }
        );
        assert_eq!(
            used["m"],
            Usage {
                cpus: 1,
                memory: GI
            }
        );
        let nodes = [node("n", 4, 3)];
        assert_eq!(
            place(&req(1, GI), &nodes, &used, Overcommit::default()),
            Ok("n".into())
        );
        assert!(place(&req(2, GI), &nodes, &used, Overcommit::default()).is_err());
    }

    #[test]
    fn a_failed_always_vm_keeps_its_share_while_bound() {
        let failed = BoundVm {
            node: "n".into(),
            cpus: 2,
            memory: 2 * GI,
            phase: Some(VmPhase::Failed),
            strategy: Some(RunStrategy::Always),
            start_requested: false,
        };
        let used = usage_by_node([&failed]);
        assert_eq!(
            used["n"],
            Usage {
                cpus: 2,
                memory: 2 * GI
            }
        );
        let nodes = [node("n", 2, 2)];
        let err = place(&req(1, GI), &nodes, &used, Overcommit::default()).unwrap_err();
        assert_eq!(err.reason, "Insufficient");
    }

    #[test]
    fn run_strategies() {
        use RunStrategy::{Always, Halted, Manual, Once, RerunOnFailure};
        assert!(wants_to_run(Always, Some(VmPhase::Stopped), false));
        assert!(wants_to_run(Always, None, false));
        assert!(!wants_to_run(Halted, None, false));
        assert!(wants_to_run(RerunOnFailure, Some(VmPhase::Failed), false));
        assert!(!wants_to_run(
            RerunOnFailure,
            Some(VmPhase::Succeeded),
            false
        ));
        assert!(wants_to_run(Once, Some(VmPhase::Pending), false));
        assert!(!wants_to_run(Once, Some(VmPhase::Failed), false));
        assert!(!wants_to_run(Manual, Some(VmPhase::Stopped), false));
        // A start request (`kubectl vm start`) runs any strategy but Halted.
        assert!(wants_to_run(Manual, Some(VmPhase::Stopped), true));
        assert!(wants_to_run(Once, Some(VmPhase::Succeeded), true));
        assert!(wants_to_run(RerunOnFailure, Some(VmPhase::Succeeded), true));
        assert!(!wants_to_run(Halted, Some(VmPhase::Stopped), true));
        assert!(holds_capacity(Some(VmPhase::Stopped), Some(Manual), true));
    }

    #[test]
    fn terminal_phases() {
        assert!(is_terminal(Some(VmPhase::Stopped)));
        assert!(is_terminal(Some(VmPhase::Succeeded)));
        assert!(is_terminal(Some(VmPhase::Failed)));
        assert!(!is_terminal(Some(VmPhase::Running)));
        assert!(!is_terminal(Some(VmPhase::Stopping)));
        assert!(!is_terminal(None));
    }
}
