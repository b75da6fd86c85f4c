//! Where a stream of a VM is served: the decision, pure. The VM and its
//! node as read in, the node-vmm endpoint and the VM's uid out, or the
//! reason the stream cannot be had (in words for the user).

use kube::ResourceExt as _;
use kubevmm_access::node_api::Stream;
use kubevmm_crds::contract::{condition, ConditionStatus};
use kubevmm_crds::printable::printable_status;
use kubevmm_crds::{HypervisorNode, VirtualMachine, VmPhase};

use super::routes::Reject;

/// The node-vmm to ask and what to ask it for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTarget {
    /// The node's name.
    pub node: String,
    /// `address:port` of its access server.
    pub endpoint: String,
    /// The VM's uid.
    pub uid: String,
}

/// Decides where `stream` of `vm` is served, given the VM's node as read.
pub fn node_target(
    vm: &VirtualMachine,
    node: Option<&HypervisorNode>,
    stream: &Stream,
) -> Result<NodeTarget, Reject> {
    let name = vm.name_any();
    let status = vm.status.clone().unwrap_or_default();
    let word = status
        .printable_status
        .unwrap_or_else(|| printable_status(vm.metadata.deletion_timestamp.is_some(), &status));
    let not_running = || {
        Reject::new(
            409,
            "Conflict",
            format!(
                "VirtualMachine {name} is not running (status {}): `kubectl vm start {name}` starts it",
                word.as_str()
            ),
        )
    };
    let Some(node_name) = status.node_name.clone() else {
        return Err(match stream {
            Stream::Logs { .. } => Reject::new(
                409,
                "Conflict",
                format!(
                    "VirtualMachine {name} has no console output: it is not on a node (status {})",
                    word.as_str()
                ),
            ),
            _ => not_running(),
        });
    };
    let live = matches!(
        status.phase,
        Some(VmPhase::Starting | VmPhase::Running | VmPhase::Paused | VmPhase::Stopping)
    );
    let needs_guest = stream.upgrades() || *stream == Stream::Stats;
    if needs_guest && !live {
        return Err(not_running());
    }
    let lost = status.conditions.iter().find(|c| {
        c.type_ == condition::NODE_LOST && ConditionStatus::of(c) == ConditionStatus::True
    });
    if let Some(c) = lost {
        return Err(Reject::new(
            503,
            "ServiceUnavailable",
            format!(
                "the node {node_name} of VirtualMachine {name} is lost ({}): its guest cannot be reached",
                c.message
            ),
        ));
    }
    let endpoint = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.access_endpoint.clone())
        .filter(|e| !e.is_empty())
        .ok_or_else(|| {
            Reject::new(
                503,
                "ServiceUnavailable",
                format!(
                    "node {node_name} does not offer console access: its node-vmm runs without \
                     --access-listen (or HypervisorNode {node_name} is gone)"
                ),
            )
        })?;
    let uid = vm.uid().ok_or_else(|| {
        Reject::new(
            500,
            "InternalError",
            format!("VirtualMachine {name} has no uid"),
        )
    })?;
    Ok(NodeTarget {
        node: node_name,
        endpoint,
        uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vm(status: &serde_json::Value) -> VirtualMachine {
        serde_json::from_value(json!({
            "apiVersion": "kubevmm.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "web", "namespace": "dev", "uid": "u-1"},
            "spec": {"memory": "64Mi", "boot": {"kernel": {"path": "/k"}}},
            "status": status,
        }))
        .unwrap()
    }

    fn node(endpoint: Option<&str>) -> HypervisorNode {
        serde_json::from_value(json!({
            "apiVersion": "kubevmm.io/v1alpha1", "kind": "HypervisorNode",
            "metadata": {"name": "n1"}, "spec": {},
            "status": {"accessEndpoint": endpoint},
        }))
        .unwrap()
    }

    #[test]
    fn streams_go_to_the_node_of_a_live_vm_or_say_why_not() {
        let console = Stream::Console;
        let logs = Stream::Logs {
            tail_lines: None,
            follow: false,
        };
        let running = vm(&json!({"phase": "Running", "nodeName": "n1"}));
        let n = node(Some("192.0.2.2:10260"));
        assert_eq!(
            node_target(&running, Some(&n), &console),
            Ok(NodeTarget {
                node: "n1".into(),
                endpoint: "192.0.2.2:10260".into(),
                uid: "u-1".into()
            })
        );
        let stopped =
            vm(&json!({"phase": "Stopped", "nodeName": "n1", "printableStatus": "Stopped"}));
        let e = node_target(&stopped, Some(&n), &console).unwrap_err();
        assert_eq!(e.code, 409);
        assert_eq!(
            e.message,
            "VirtualMachine web is not running (status Stopped): `kubectl vm start web` starts it"
        );
        // Logs of a stopped VM still on its node: served from the ring.
        assert!(node_target(&stopped, Some(&n), &logs).is_ok());
        let pending = vm(&json!({"phase": "Pending"}));
        assert_eq!(
            node_target(&pending, Some(&n), &logs).unwrap_err().code,
            409
        );
        assert_eq!(node_target(&pending, None, &console).unwrap_err().code, 409);

        let lost = vm(
            &json!({"phase": "Running", "nodeName": "n1", "conditions": [{
            "type": "NodeLost", "status": "True", "reason": "HeartbeatExpired",
            "message": "no heartbeat for 40s", "lastTransitionTime": "2026-12-05T10:00:00Z"}]}),
        );
        let e = node_target(&lost, Some(&n), &console).unwrap_err();
        assert_eq!(e.code, 503);
        assert!(e.message.contains("is lost (no heartbeat for 40s)"), "{e}");

        let e = node_target(&running, Some(&node(None)), &console).unwrap_err();
        assert!(e.message.contains("without --access-listen"), "{e}");
        assert_eq!(node_target(&running, None, &console).unwrap_err().code, 503);
    }
}
