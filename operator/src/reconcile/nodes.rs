//! The nodes a pass places onto and judges (pure): each `HypervisorNode`
//! with its heartbeat as a [`NodeState`], a deleted or hidden one to which
//! VMs are still bound, and whether a node is confirmed gone. Table-tested
//! below.

#[allow(clippy::wildcard_imports)] // the parent's types and helpers
use super::*;

/// The state of one node a VM may be bound to.
#[derive(Debug, Clone)]
pub(super) struct NodeState {
    pub(super) info: NodeInfo,
    /// Its heartbeat, on the operator's clock.
    pub(super) liveness: Liveness,
    /// Annotated `kubevmm.io/fenced=true`: its guests are certainly dead.
    pub(super) fenced: bool,
    /// Its `HypervisorNode` no longer exists (VMs may still be bound to it).
    pub(super) deleted: bool,
}

/// Why the bound node is confirmed gone (its guests are dead), if it is.
///
/// Only fencing confirms it. A deleted `HypervisorNode` does not: deleting
/// the object stops no VMM, so its VMs are treated as on a lost node (kept
/// bound, `NodeLost` once the heartbeat expires) until it is fenced —
/// recreate it with the annotation.
pub(super) fn gone_reason(node: &str, state: Option<&NodeState>) -> Option<String> {
    state.filter(|s| s.fenced).map(|s| {
        let deleted = if s.deleted { " (after deletion)" } else { "" };
        format!(
            "HypervisorNode {node} is fenced{deleted} ({}=true)",
            contract::ANNOTATION_FENCED
        )
    })
}

/// The Lease of a node as the heartbeat clock records it; `None` without `renewTime`.
pub(super) fn lease_record(lease: &Lease) -> Option<LeaseRecord> {
    let spec = lease.spec.as_ref()?;
    Some(LeaseRecord {
        renew_time: spec.renew_time.as_ref()?.0,
        duration: Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
        ),
    })
}

/// A node whose `HypervisorNode` is gone but to which VMs are still bound.
pub(super) fn deleted_node_state(name: &str, liveness: Liveness) -> NodeState {
    NodeState {
        info: NodeInfo {
            name: name.to_string(),
            cordoned: true,
            ..NodeInfo::default()
        },
        liveness,
        fenced: false,
        deleted: true,
    }
}

pub(super) fn node_state(node: &HypervisorNode, liveness: Liveness) -> NodeState {
    let status = node.status.clone().unwrap_or_default();
    let alloc = status.allocatable.unwrap_or_default();
    let allocatable_memory = if alloc.memory.0.is_empty() {
        0
    } else {
        parse_bytes(&alloc.memory.0).unwrap_or_else(|e| {
            tracing::warn!(node = %node.name_any(), error = %e, "HypervisorNode allocatable memory unusable; treating as 0");
            0
        })
    };
    NodeState {
        info: NodeInfo {
            name: node.name_any(),
            labels: node.labels().clone(),
            cordoned: node.spec.cordoned,
            ready: liveness.is_alive(),
            kvm_available: status.kvm.is_some_and(|k| k.available),
            allocatable_cpus: alloc.cpus,
            allocatable_memory,
        },
        liveness,
        fenced: node
            .annotations()
            .get(contract::ANNOTATION_FENCED)
            .is_some_and(|v| v == "true"),
        deleted: false,
    }
}

/// A node outside `--node-selector` to which VMs are bound: judged by its
/// heartbeat like any other, never placed onto.
pub(super) fn hidden_node_state(node: &HypervisorNode, liveness: Liveness) -> NodeState {
    let mut s = node_state(node, liveness);
    s.info.cordoned = true;
    s
}

/// The nodes VMs are bound to that `states` does not hold: outside
/// `--node-selector` (looked up, so a node is never taken for deleted just
/// because the selector hides it), or deleted.
pub(super) fn unknown_bindings(
    vms: &[Arc<DynamicObject>],
    states: &BTreeMap<String, NodeState>,
) -> BTreeSet<String> {
    vms.iter()
        .filter_map(|o| binding_of(o, &owned_by_operator(o)))
        .filter(|n| !states.contains_key(n))
        .collect()
}

/// How long past a Lease's expiry the pass that judges it runs.
const LEASE_WAKE_SLACK: Duration = Duration::from_millis(100);

/// When a pass is due for the heartbeats alone: just after the earliest
/// Lease expiry still ahead (a bound VM's node may turn lost, an
/// unconfirmed node placeable or lost).
pub(super) fn lease_wake(states: &BTreeMap<String, NodeState>, now: Instant) -> Option<Duration> {
    states
        .values()
        .filter_map(|s| s.liveness.deadline())
        .filter(|d| *d > now)
        .min()
        .map(|d| d.duration_since(now) + LEASE_WAKE_SLACK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::decide::tests::bound_vm;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    #[allow(clippy::needless_pass_by_value)] // table values
    fn hv(annotations: &[(&str, &str)], status: serde_json::Value) -> HypervisorNode {
        let mut n: HypervisorNode = serde_json::from_value(json!({
            "apiVersion": kubevmm_crds::API_VERSION, "kind": "HypervisorNode",
            "metadata": {"name": "n1", "labels": {"zone": "a"}},
            "spec": {},
            "status": status,
        }))
        .expect("node");
        n.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        );
        n
    }

    #[test]
    #[allow(clippy::type_complexity)] // table rows are tuples by design
    fn a_node_as_placement_and_health_see_it() {
        let alive = Liveness::Alive {
            expires_at: Instant::now() + Duration::from_secs(30),
        };
        let full = json!({"allocatable": {"cpus": 8, "memory": "4Gi"}, "kvm": {"available": true, "kind": "kvm_pvm"}});
        // (what, annotations, status, liveness | ready, kvm, cpus, memory, fenced)
        #[rustfmt::skip]
        let table: [(&str, &[(&str, &str)], serde_json::Value, Liveness, bool, bool, u32, u64, bool); 5] = [
            ("heartbeating, with KVM", &[], full.clone(), alive, true, true, 8, 4 << 30, false),
            ("no heartbeat Lease: not ready", &[], full.clone(), Liveness::NoLease, false, true, 8, 4 << 30, false),
            ("fenced", &[(contract::ANNOTATION_FENCED, "true")], full.clone(), alive, true, true, 8, 4 << 30, true),
            ("fenced only when it says true", &[(contract::ANNOTATION_FENCED, "yes")], full, alive, true, true, 8, 4 << 30, false),
            ("no status yet: nothing to place onto", &[], json!({}), alive, true, false, 0, 0, false),
        ];
        for (what, ann, status, liveness, ready, kvm, cpus, memory, fenced) in table {
            let s = node_state(&hv(ann, status), liveness);
            assert_eq!(s.info.ready, ready, "{what}");
            assert_eq!(s.info.kvm_available, kvm, "{what}");
            assert_eq!(s.info.allocatable_cpus, cpus, "{what}");
            assert_eq!(s.info.allocatable_memory, memory, "{what}");
            assert_eq!(s.fenced, fenced, "{what}");
            assert_eq!(gone_reason("n1", Some(&s)).is_some(), fenced, "{what}");
            assert!(!s.deleted && !s.info.cordoned, "{what}");
            assert_eq!(
                s.info.labels.get("zone").map(String::as_str),
                Some("a"),
                "{what}"
            );
            assert!(
                hidden_node_state(&hv(&[], json!({})), liveness)
                    .info
                    .cordoned,
                "{what}"
            );
        }
        let gone = deleted_node_state("n2", Liveness::NoLease);
        assert!(gone.deleted && gone.info.cordoned && !gone.fenced);
        assert_eq!(
            gone_reason("n2", Some(&gone)),
            None,
            "deleting the object stops no VMM"
        );
        assert_eq!(gone_reason("n3", None), None);
    }

    #[test]
    fn a_lease_is_recorded_only_with_a_renewal() {
        let lease = |renew: Option<&str>, secs: Option<i32>| Lease {
            spec: Some(LeaseSpec {
                renew_time: renew.map(|t| MicroTime(t.parse().expect("time"))),
                lease_duration_seconds: secs,
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        };
        let t = "2026-12-06T12:00:00Z";
        let rec = lease_record(&lease(Some(t), Some(40))).expect("record");
        assert_eq!(rec.duration, Duration::from_secs(40));
        assert_eq!(lease_record(&lease(None, Some(40))), None);
        assert_eq!(
            lease_record(&lease(Some(t), Some(-5))).map(|r| r.duration),
            Some(Duration::ZERO)
        );
        assert_eq!(lease_record(&Lease::default()), None);
    }

    #[test]
    fn only_bindings_to_nodes_not_held_are_looked_up() {
        let states: BTreeMap<String, NodeState> =
            [("a".to_string(), deleted_node_state("a", Liveness::NoLease))].into();
        let vms = vec![
            Arc::new(bound_vm("a", "Always")),
            Arc::new(bound_vm("b", "Always")),
            Arc::new(bound_vm("b", "Once")),
        ];
        assert_eq!(
            unknown_bindings(&vms, &states),
            BTreeSet::from(["b".to_string()])
        );
    }

    #[test]
    fn the_pass_wakes_just_after_the_next_lease_expiry() {
        let now = Instant::now();
        let at = |s: u64| now + Duration::from_secs(s);
        let state = |liveness| deleted_node_state("n", liveness);
        let expired = Liveness::Expired {
            silent_for: Duration::from_secs(50),
            duration: Duration::from_secs(40),
            last_renew: Timestamp::UNIX_EPOCH,
        };
        // (what, livenesses | wake)
        #[rustfmt::skip]
        let table: [(&str, Vec<Liveness>, Option<Duration>); 5] = [
            ("no nodes", vec![], None),
            ("the earliest of two alive", vec![Liveness::Alive { expires_at: at(30) }, Liveness::Alive { expires_at: at(5) }], Some(Duration::from_millis(5100))),
            ("an unconfirmed node counts", vec![Liveness::Unconfirmed { expires_at: at(7) }, Liveness::Alive { expires_at: at(9) }], Some(Duration::from_millis(7100))),
            ("expired and lease-less nodes have nothing ahead", vec![expired, Liveness::NoLease], None),
            ("a deadline already past is not waited for", vec![Liveness::Alive { expires_at: now }, Liveness::Alive { expires_at: at(2) }], Some(Duration::from_millis(2100))),
        ];
        for (what, livenesses, want) in table {
            let states: BTreeMap<String, NodeState> = livenesses
                .into_iter()
                .enumerate()
                .map(|(i, l)| (format!("n{i}"), state(l)))
                .collect();
            assert_eq!(lease_wake(&states, now), want, "{what}");
        }
    }
}
