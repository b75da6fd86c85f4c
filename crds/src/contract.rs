//! The contract between the operator and node-vmm, through the API server
//! only (DESIGN.md decision 1): labels, annotations, finalizer, Lease names,
//! field managers and condition types. Both sides import these names; the
//! meaning of each is documented in docs/architecture.md ("The contract").

use std::collections::BTreeMap;
use std::time::Duration;

/// Label the operator sets on a bound `VirtualMachine`: the node that runs it.
/// node-vmm watches only VMs carrying its own node name here.
pub const LABEL_NODE: &str = "kubevmm.io/node";

/// Finalizer the operator adds to every VM; removed once the guest is
/// stopped and its resources are released (by node-vmm when bound, by the
/// operator when unbound or when the node is confirmed gone).
pub const FINALIZER: &str = "kubevmm.io/guest-cleanup";

/// Annotation on a VM: setting a new value (e.g. a timestamp) asks for a
/// restart of the guest (graceful shutdown, then start). The value handled
/// last is recorded in [`ANNOTATION_RESTART_DONE`].
pub const ANNOTATION_RESTART: &str = "kubevmm.io/restart-requested";

/// Annotation node-vmm writes back with the value of
/// [`ANNOTATION_RESTART`] it has carried out.
pub const ANNOTATION_RESTART_DONE: &str = "kubevmm.io/restart-handled";

/// Annotation on a VM: the grace period, in seconds (0 to 3600), of the
/// stop under way or the next one, instead of
/// `spec.terminationGracePeriodSeconds`; `0` stops the guest by force at
/// once. Written by `kubectl vm stop --grace-period N` / `--force`, removed
/// by `kubectl vm start`.
pub const ANNOTATION_STOP_GRACE: &str = "kubevmm.io/stop-grace-period-seconds";

/// Annotation on a VM: the `runStrategy` it had before `kubectl vm stop`
/// set `Halted`, restored by `kubectl vm start`.
pub const ANNOTATION_STRATEGY_BEFORE_STOP: &str = "kubevmm.io/run-strategy-before-stop";

/// The restart (or start) request not yet carried out: the value of
/// [`ANNOTATION_RESTART`] when it differs from [`ANNOTATION_RESTART_DONE`].
/// A pending request also asks a stopped `Manual` or `Once` VM to run
/// again, so the operator places it and node-vmm starts it.
pub fn pending_restart(annotations: &BTreeMap<String, String>) -> Option<&str> {
    let want = annotations.get(ANNOTATION_RESTART)?;
    (annotations.get(ANNOTATION_RESTART_DONE) != Some(want)).then_some(want.as_str())
}

/// The grace period of a stop: [`ANNOTATION_STOP_GRACE`] when it holds a
/// number of seconds from 0 to 3600, else `spec_seconds` (negative counts
/// as 0).
pub fn stop_grace(annotations: &BTreeMap<String, String>, spec_seconds: i64) -> Duration {
    let secs = annotations
        .get(ANNOTATION_STOP_GRACE)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s <= 3600)
        .unwrap_or(spec_seconds.max(0) as u64);
    Duration::from_secs(secs)
}

/// Annotation on a `HypervisorNode`: `"true"` confirms that the node is
/// powered off or isolated (fenced), so its guests are certainly dead and
/// `Always` VMs may be placed elsewhere.
pub const ANNOTATION_FENCED: &str = "kubevmm.io/fenced";

/// The merge patch that takes [`FINALIZER`] off an object with these
/// `finalizers`, conditional on `resource_version`; `None` when it does not
/// carry it. What the operator and node-vmm both send once no guest of a
/// deleted VM can run.
pub fn finalizer_removal(
    finalizers: &[String],
    resource_version: Option<&str>,
) -> Option<serde_json::Value> {
    if !finalizers.iter().any(|f| f == FINALIZER) {
        return None;
    }
    let keep: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
    Some(serde_json::json!({
        "metadata": {"finalizers": keep, "resourceVersion": resource_version}
    }))
}

/// Namespace of the heartbeat and leader-election Leases.
pub const LEASE_NAMESPACE: &str = "kubevmm-system";

/// Name of node `node`'s heartbeat Lease in [`LEASE_NAMESPACE`].
pub fn node_lease_name(node: &str) -> String {
    format!("node-vmm-{node}")
}

/// Name of the operator's leader-election Lease.
pub const OPERATOR_LEASE: &str = "kubevmm-operator";

/// Server-side-apply field manager of the operator.
pub const MANAGER_OPERATOR: &str = "kubevmm-operator";

/// Server-side-apply field manager of node-vmm.
pub const MANAGER_NODE: &str = "node-vmm";

/// Condition types on `VirtualMachine.status.conditions`.
pub mod condition {
    /// Operator: the VM is bound to a node (`True`), or why not (`False`,
    /// reason `Unschedulable`, message naming what is short).
    pub const SCHEDULED: &str = "Scheduled";
    /// node-vmm: the guest runs (`True`), or why not (`False`, with reasons
    /// such as `Starting`, `GuestCrashed`, `VmmFailed`, `Stopped`).
    pub const READY: &str = "Ready";
    /// node-vmm: the vCPUs are paused.
    pub const PAUSED: &str = "Paused";
    /// Operator: the node's heartbeat Lease expired; the guest's fate is unknown.
    pub const NODE_LOST: &str = "NodeLost";
}

/// Condition reasons: the words both binaries write and
/// [`crate::printable::printable_status`] reads; every one is documented in
/// docs/api.md with what to do about it.
pub mod reason {
    /// `Scheduled=True`: bound to a node.
    pub const SCHEDULED: &str = "Scheduled";
    /// `Scheduled=False`: released from its node (terminal, not to run again).
    pub const RELEASED: &str = "Released";
    /// `Scheduled=False`: `runStrategy: Halted`, not placed.
    pub const HALTED: &str = "Halted";
    /// `Scheduled=False`: finished, not placed again.
    pub const FINISHED: &str = "Finished";
    /// `NodeLost=True` / `Scheduled=False`: the node is confirmed gone (fenced).
    pub const NODE_GONE: &str = "NodeGone";
    /// `NodeLost=True`: the node's heartbeat Lease expired.
    pub const HEARTBEAT_EXPIRED: &str = "HeartbeatExpired";
    /// `NodeLost=False`: the heartbeat is back.
    pub const HEARTBEAT_RESUMED: &str = "HeartbeatResumed";
    /// `NodeLost=False`: the VM was placed anew after its node was lost.
    pub const RESCHEDULED: &str = "Rescheduled";
    /// `Ready=Unknown` (operator): the node stopped heartbeating.
    pub const NODE_LOST: &str = "NodeLost";
    /// `Scheduled=False`: no node has room or matches (the message says what is short).
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    /// `Scheduled=False` or `Ready=False`: the spec cannot be run as written.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// `Ready=False`: an image the VM needs is being imported on its node.
    pub const IMAGE_IMPORTING: &str = "ImageImporting";
    /// `Ready=False`: the guest crashed (triple fault, guest panic, ...).
    pub const GUEST_CRASHED: &str = "GuestCrashed";
    /// `Ready=False`: the VMM failed to start or died.
    pub const VMM_FAILED: &str = "VmmFailed";
    /// `Ready=False`: the VMM is starting.
    pub const STARTING: &str = "Starting";
    /// `Ready=True`: the VMM is up and the vCPUs run.
    pub const GUEST_RUNNING: &str = "GuestRunning";
    /// `Ready=False`: the vCPUs are paused (`spec.paused`).
    pub const PAUSED: &str = "Paused";
    /// `Ready=False`: an ACPI shutdown is under way.
    pub const STOPPING: &str = "Stopping";
    /// `Ready=False`: not running, by request, or stopped by force.
    pub const STOPPED: &str = "Stopped";
    /// `Ready=False`: an image could not be imported (retried with backoff).
    pub const IMAGE_FAILED: &str = "ImageFailed";
    /// `Ready=False`: disks, taps or cgroups could not be set up.
    pub const HOST_SETUP_FAILED: &str = "HostSetupFailed";
    /// `Ready=False`: a new `emptyDisk` does not fit on the node.
    pub const INSUFFICIENT_SPACE: &str = "InsufficientSpace";
    /// `Ready=False`: the guest powered off by itself.
    pub const GUEST_POWERED_OFF: &str = "GuestPoweredOff";
    /// `Ready=False`: the guest rebooted (the VMM restarts it).
    pub const GUEST_REBOOTED: &str = "GuestRebooted";
    /// `Ready=False`: the guest powered off after an ACPI shutdown request.
    pub const SHUT_DOWN: &str = "ShutDown";
    /// `Ready=False`: the masquerade subnet collides with a host route.
    pub const SUBNET_OVERLAP: &str = "SubnetOverlap";
    /// `Ready=False`: the masquerade network cannot be set up on the node.
    pub const MASQUERADE_UNAVAILABLE: &str = "MasqueradeUnavailable";
    /// `Ready=False`: the masquerade network has no address left.
    pub const ADDRESS_POOL_EXHAUSTED: &str = "AddressPoolExhausted";
    /// `Ready=False`: another VM on the node has this NIC's MAC address.
    pub const MAC_ADDRESS_IN_USE: &str = "MacAddressInUse";
    /// `Paused=True`: `spec.paused` is true.
    pub const PAUSED_BY_USER: &str = "PausedByUser";
    /// `Paused=False`.
    pub const NOT_PAUSED: &str = "NotPaused";
}

/// The status of a condition, as `metav1.Condition` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    /// `"True"`.
    True,
    /// `"False"`.
    False,
    /// `"Unknown"`.
    Unknown,
}

impl ConditionStatus {
    /// The string in `status.conditions[].status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }

    /// Parses a condition's status; anything else is `Unknown`.
    pub fn parse(s: &str) -> Self {
        match s {
            "True" => Self::True,
            "False" => Self::False,
            _ => Self::Unknown,
        }
    }

    /// The status of condition `c`.
    pub fn of(c: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition) -> Self {
        Self::parse(&c.status)
    }

    /// `True` when `b`, else `False`.
    pub fn from_bool(b: bool) -> Self {
        if b {
            Self::True
        } else {
            Self::False
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Pairs<'a> = &'a [(&'a str, &'a str)];

    fn annotations(pairs: Pairs) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn a_restart_is_pending_until_its_value_is_recorded_as_handled() {
        let cases: &[(Pairs, Option<&str>)] = &[
            (&[], None),
            (&[(ANNOTATION_RESTART, "t1")], Some("t1")),
            (
                &[(ANNOTATION_RESTART, "t1"), (ANNOTATION_RESTART_DONE, "t1")],
                None,
            ),
            (
                &[(ANNOTATION_RESTART, "t2"), (ANNOTATION_RESTART_DONE, "t1")],
                Some("t2"),
            ),
            (&[(ANNOTATION_RESTART_DONE, "t1")], None),
        ];
        for (pairs, want) in cases {
            assert_eq!(pending_restart(&annotations(pairs)), *want, "{pairs:?}");
        }
    }

    #[test]
    fn the_stop_grace_annotation_overrides_the_spec_only_when_valid() {
        let cases: &[(Pairs, i64, u64)] = &[
            (&[], 30, 30),
            (&[], -5, 0),
            (&[(ANNOTATION_STOP_GRACE, "0")], 30, 0),
            (&[(ANNOTATION_STOP_GRACE, "120")], 30, 120),
            (&[(ANNOTATION_STOP_GRACE, " 7 ")], 30, 7),
            (&[(ANNOTATION_STOP_GRACE, "3601")], 30, 30),
            (&[(ANNOTATION_STOP_GRACE, "-1")], 30, 30),
            (&[(ANNOTATION_STOP_GRACE, "soon")], 30, 30),
        ];
        for (pairs, spec, want) in cases {
            assert_eq!(
                stop_grace(&annotations(pairs), *spec),
                Duration::from_secs(*want),
                "{pairs:?} spec {spec}"
            );
        }
    }

    #[test]
    fn finalizer_removal_keeps_the_others_and_the_precondition() {
        let fins = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        // finalizers | patch's finalizers (None: nothing to remove)
        let table: [(&[&str], Option<serde_json::Value>); 3] = [
            (&[], None),
            (&["other"], None),
            (&["a", FINALIZER, "b"], Some(serde_json::json!(["a", "b"]))),
        ];
        for (have, want) in table {
            let patch = finalizer_removal(&fins(have), Some("42"));
            assert_eq!(
                patch.as_ref().map(|p| p["metadata"]["finalizers"].clone()),
                want,
                "{have:?}"
            );
            if let Some(p) = patch {
                assert_eq!(p["metadata"]["resourceVersion"], "42");
            }
        }
    }
}
