//! The pure half of a pass for one VM: from the object and the nodes'
//! states to the work to do ([`decide`], node health, the status to apply,
//! the Event reference). No I/O; table-tested below.

#[allow(clippy::wildcard_imports)] // the parent's types and helpers
use super::*;

/// Which fields of `obj` the operator's field manager owns now.
pub(super) fn owned_by_operator(obj: &DynamicObject) -> Owned {
    let mut owned = Owned::default();
    for entry in obj.metadata.managed_fields.iter().flatten() {
        if entry.manager.as_deref() != Some(contract::MANAGER_OPERATOR) {
            continue;
        }
        let fields = entry.fields_v1.as_ref().map(|f| &f.0);
        if entry.subresource.as_deref() != Some("status") {
            owned.label |= fields
                .and_then(|f| {
                    f.get("f:metadata")?
                        .get("f:labels")?
                        .get(format!("f:{}", contract::LABEL_NODE))
                })
                .is_some();
            continue;
        }
        let Some(status) = fields.and_then(|f| f.get("f:status")) else {
            continue;
        };
        owned.node_name |= status.get("f:nodeName").is_some();
        owned.disk_node |= status.get("f:diskNode").is_some();
        owned.phase |= status.get("f:phase").is_some();
        owned.restart_count |= status.get("f:restartCount").is_some();
        if let Some(conds) = status.get("f:conditions").and_then(Value::as_object) {
            for key in conds.keys() {
                let ty = key
                    .strip_prefix("k:")
                    .and_then(|k| serde_json::from_str::<Value>(k).ok())
                    .and_then(|k| k.get("type").and_then(Value::as_str).map(String::from));
                if let Some(ty) = ty {
                    owned.conditions.insert(ty);
                }
            }
        }
    }
    owned
}

/// Decides everything but placement for one VM.
#[allow(clippy::too_many_lines)]
pub(super) fn decide(obj: Arc<DynamicObject>, states: &BTreeMap<String, NodeState>) -> Work {
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_default();
    let owned = owned_by_operator(&obj);
    let parsed = serde_json::to_value(&*obj)
        .and_then(serde_json::from_value::<VirtualMachine>)
        .map_err(|e| e.to_string());
    let mut w = Work {
        vm: parsed.as_ref().ok().cloned(),
        obj,
        name,
        namespace,
        owned,
        bind: None,
        disk_node: None,
        finalizer: FinalizerChange::Keep,
        request: None,
        status: StatusChange::default(),
        placement: Placement::NotWanted,
        events: Vec::new(),
    };
    // The binding is what the operator wrote, never the label alone.
    let bound = w.binding();
    w.bind.clone_from(&bound);
    if let Some(l) = w.label().filter(|l| Some(l) != bound.as_ref()) {
        if !w.owned.label {
            w.events.push(Note::warning(
                "NodeLabelIgnored",
                format!(
                    "label {}={l} was not set by the operator and binds nothing; it is corrected",
                    contract::LABEL_NODE
                ),
            ));
        }
    }
    let deleting = w.obj.metadata.deletion_timestamp.is_some();
    let has_finalizer = w.obj.finalizers().iter().any(|f| f == contract::FINALIZER);

    if deleting {
        if has_finalizer {
            match &bound {
                None => w.finalizer = FinalizerChange::Remove,
                Some(node) => {
                    if let Some(why) = gone_reason(node, states.get(node)) {
                        w.finalizer = FinalizerChange::Remove;
                        w.events.push(Note::normal(
                            "FinalizerRemoved",
                            format!("{why}: its guest is gone, deletion completes"),
                        ));
                    }
                }
            }
        }
        if let Some(node) = &bound {
            if w.finalizer != FinalizerChange::Remove {
                node_health(&mut w, node, states.get(node));
            }
        }
        // Keep counting it on its node until node-vmm lets go.
        w.request = w.vm.as_ref().and_then(|v| request_of(v).ok());
        return w;
    }
    if !has_finalizer {
        w.finalizer = FinalizerChange::Add;
    }

    let vm = match parsed {
        Ok(vm) => vm,
        Err(e) => {
            w.status.conditions.insert(
                condition::SCHEDULED,
                Want::new(
                    ConditionStatus::False,
                    reason::INVALID_SPEC,
                    format!("the operator cannot read this VirtualMachine: {e}"),
                ),
            );
            if w.bind.is_none() {
                w.status.phase = Some(VmPhase::Pending);
            }
            w.placement = Placement::Refused {
                report: Some(crate::scheduling::reason::INVALID_SPEC),
            };
            return w;
        }
    };
    w.disk_node = w
        .owned
        .disk_node
        .then(|| w.current_status().disk_node)
        .flatten();
    let request = request_of(&vm).map(|r| Request {
        disk_node: w.disk_node.clone(),
        ..r
    });
    w.request = request.as_ref().ok().cloned();
    let phase = w.phase_now();
    let strategy = vm.spec.run_strategy;
    let start_requested = contract::pending_restart(vm.annotations()).is_some();

    if let Some(node) = &bound {
        if let Some(why) = gone_reason(node, states.get(node)) {
            w.bind = None;
            if scheduling::wants_to_run(strategy, phase, start_requested)
                && matches!(strategy, RunStrategy::Always | RunStrategy::RerunOnFailure)
            {
                w.status.phase = Some(VmPhase::Pending);
                w.status.restart_count = Some(w.current_status().restart_count.saturating_add(1));
                w.status.conditions.insert(
                    condition::NODE_LOST,
                    Want::new(
                        ConditionStatus::False,
                        reason::RESCHEDULED,
                        format!("{why}; the guest is gone and the VM is placed anew"),
                    ),
                );
                // Stated, not dropped: see `operator_ready`.
                w.status.conditions.insert(
                    condition::READY,
                    Want::new(
                        ConditionStatus::False,
                        reason::RESCHEDULED,
                        format!("{why}; the guest is gone, waiting for its next node to start it"),
                    ),
                );
                w.events.push(Note::warning(
                    "Rescheduled",
                    match &w.disk_node {
                        Some(d) => format!("{why}; its disks are on {d}: it starts again there"),
                        None => format!("{why}; placing the VM on another node"),
                    },
                ));
                if request.is_ok() {
                    w.placement = Placement::Wanted;
                }
            } else {
                if !scheduling::is_terminal(phase) {
                    w.status.phase = Some(if strategy == RunStrategy::Halted {
                        VmPhase::Stopped
                    } else {
                        VmPhase::Failed
                    });
                }
                w.status.conditions.insert(
                    condition::NODE_LOST,
                    Want::new(
                        ConditionStatus::True,
                        reason::NODE_GONE,
                        format!("{why}; the guest is gone"),
                    ),
                );
                w.status.conditions.insert(
                    condition::READY,
                    Want::new(
                        ConditionStatus::False,
                        reason::NODE_GONE,
                        format!("{why}; the guest is gone"),
                    ),
                );
                w.status.conditions.insert(
                    condition::SCHEDULED,
                    Want::new(
                        ConditionStatus::False,
                        reason::NODE_GONE,
                        format!(
                            "{why}; runStrategy {strategy:?} does not restart the VM elsewhere"
                        ),
                    ),
                );
                w.events.push(Note::warning(
                    "NodeGone",
                    format!("{why}; runStrategy {strategy:?}: not restarted elsewhere"),
                ));
            }
        } else if scheduling::is_terminal(phase)
            && !scheduling::wants_to_run(strategy, phase, start_requested)
        {
            w.bind = None;
            let p = phase.map_or("unknown", VmPhase::as_str);
            w.status.conditions.insert(
                condition::SCHEDULED,
                Want::new(
                    ConditionStatus::False,
                    reason::RELEASED,
                    format!("released from node {node}: phase {p}, runStrategy {strategy:?}"),
                ),
            );
            w.events.push(Note::normal(
                "Released",
                format!("guest {p} on node {node}; binding released"),
            ));
        } else {
            node_health(&mut w, node, states.get(node));
            let keep = w.current_condition(condition::SCHEDULED).filter(|c| {
                ConditionStatus::of(c) == ConditionStatus::True
                    && c.message.ends_with(&format!("node {node}"))
            });
            if keep.is_none() {
                w.status.conditions.insert(
                    condition::SCHEDULED,
                    Want::new(
                        ConditionStatus::True,
                        reason::SCHEDULED,
                        format!("bound to node {node}"),
                    ),
                );
            }
            if matches!(phase, None | Some(VmPhase::Pending)) {
                w.status.phase = Some(VmPhase::Scheduled);
            }
        }
        return w;
    }

    // Unbound.
    if !scheduling::wants_to_run(strategy, phase, start_requested) {
        // Keep saying why it was let go (Released, NodeGone) while it stays down.
        let explained = w.current_condition(condition::SCHEDULED).is_some_and(|c| {
            ConditionStatus::of(&c) == ConditionStatus::False
                && (c.reason == reason::RELEASED || c.reason == reason::NODE_GONE)
        });
        if explained {
            if strategy == RunStrategy::Halted && !scheduling::is_terminal(phase) {
                w.status.phase = Some(VmPhase::Stopped);
            }
        } else if strategy == RunStrategy::Halted {
            if !scheduling::is_terminal(phase) {
                w.status.phase = Some(VmPhase::Stopped);
            }
            w.status.conditions.insert(
                condition::SCHEDULED,
                Want::new(
                    ConditionStatus::False,
                    reason::HALTED,
                    "runStrategy Halted: not placed on a node",
                ),
            );
        } else if w.current_condition(condition::SCHEDULED).is_none() {
            w.status.conditions.insert(
                condition::SCHEDULED,
                Want::new(
                    ConditionStatus::False,
                    reason::FINISHED,
                    format!(
                        "phase {}, runStrategy {strategy:?}: not placed again",
                        phase.map_or("unknown", VmPhase::as_str)
                    ),
                ),
            );
        }
        return w;
    }
    match request {
        Ok(_) => w.placement = Placement::Wanted,
        Err(msg) => {
            w.status.phase = Some(VmPhase::Pending);
            w.status.conditions.insert(
                condition::SCHEDULED,
                Want::new(ConditionStatus::False, reason::INVALID_SPEC, msg),
            );
            w.placement = Placement::Refused {
                report: Some(crate::scheduling::reason::INVALID_SPEC),
            };
        }
    }
    w
}

/// `NodeLost` / `Ready=Unknown` while the node's heartbeat is stale; cleared when fresh.
///
/// Staleness is the operator's own observation (see [`crate::heartbeat`]);
/// a node the operator has only just started watching is left as it is
/// until its Lease renews or a whole Lease duration passes. A deleted
/// `HypervisorNode` is judged by its Lease like any other: its agent may
/// still run the guests.
pub(super) fn node_health(w: &mut Work, node: &str, state: Option<&NodeState>) {
    let Some(state) = state else { return };
    if matches!(state.liveness, Liveness::Unconfirmed { .. }) {
        return;
    }
    let current = w.current_condition(condition::NODE_LOST);
    if state.liveness.is_lost() {
        let deleted = if state.deleted {
            format!(
                " (its HypervisorNode was deleted; the VM stays bound until the node is fenced: \
                 recreate HypervisorNode {node} annotated {}=true)",
                contract::ANNOTATION_FENCED
            )
        } else {
            String::new()
        };
        let message = match state.liveness {
            Liveness::Expired {
                silent_for,
                duration,
                last_renew,
            } => format!(
                "node {node} stopped heartbeating: last heartbeat at {} (node clock), \
                 no renewal seen for {}s, Lease duration {}s{deleted}",
                fmt_time(last_renew),
                silent_for.as_secs(),
                duration.as_secs()
            ),
            _ => format!(
                "node {node} has no heartbeat Lease {}/{}{deleted}",
                contract::LEASE_NAMESPACE,
                contract::node_lease_name(node)
            ),
        };
        // Keep the first message (with the time of the last heartbeat) while lost.
        let want = match current {
            Some(c)
                if ConditionStatus::of(&c) == ConditionStatus::True
                    && c.reason == reason::HEARTBEAT_EXPIRED =>
            {
                Want::new(ConditionStatus::True, reason::HEARTBEAT_EXPIRED, c.message)
            }
            _ => {
                w.events.push(Note::warning("NodeLost", message.clone()));
                Want::new(ConditionStatus::True, reason::HEARTBEAT_EXPIRED, message)
            }
        };
        w.status.conditions.insert(condition::NODE_LOST, want);
        w.status.conditions.insert(
            condition::READY,
            Want::new(
                ConditionStatus::Unknown,
                reason::NODE_LOST,
                format!("node {node} is not heartbeating; the guest's state is unknown"),
            ),
        );
    } else {
        if current
            .as_ref()
            .is_some_and(|c| ConditionStatus::of(c) == ConditionStatus::True)
        {
            w.status.conditions.insert(
                condition::NODE_LOST,
                Want::new(
                    ConditionStatus::False,
                    reason::HEARTBEAT_RESUMED,
                    format!("node {node} is heartbeating again"),
                ),
            );
            w.events.push(Note::normal(
                "NodeRecovered",
                format!("node {node} is heartbeating again"),
            ));
        }
        if !operator_ready(w.current_condition(condition::READY).as_ref()) {
            w.status.drop.insert(condition::READY);
        }
    }
}

/// Whether `Ready` still holds what the operator wrote while the node was
/// lost or gone (`NodeLost`, `Rescheduled`, `NodeGone`) rather than the
/// agent's own.
///
/// The operator takes `Ready`'s fields from node-vmm (a forced apply) to
/// say a guest's state is unknown or gone; node-vmm keeps co-owning the
/// entry's `type`. Dropping the condition while its fields are still the
/// operator's would leave an entry with only a `type`, which the API
/// server refuses: the operator keeps re-applying its value until the
/// node's agent writes its own (which takes the fields back), and only
/// then lets go.
pub(super) fn operator_ready(ready: Option<&Condition>) -> bool {
    ready.is_some_and(|c| {
        [reason::NODE_LOST, reason::RESCHEDULED, reason::NODE_GONE].contains(&c.reason.as_str())
    })
}

pub(super) fn fmt_time(t: Timestamp) -> String {
    serde_json::to_value(Time(t))
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(|| t.to_string())
}

/// The VM's demand, or why it cannot be read.
pub(super) fn request_of(vm: &VirtualMachine) -> Result<Request, String> {
    let memory = parse_bytes(&vm.spec.memory.0).map_err(|e| format!("spec.memory: {e}"))?;
    Ok(Request {
        cpus: vm.spec.cpus,
        memory,
        node_selector: vm.spec.node_selector.clone(),
        disk_node: None,
    })
}

/// `status.diskNode` after this pass: kept once set; the node the VM is
/// bound to when it has node-local disks (`emptyDisk`, `image`) and none
/// holds them yet.
pub(super) fn disk_node(w: &Work) -> Option<String> {
    let local = w.vm.as_ref().is_some_and(|v| {
        v.spec
            .disks
            .iter()
            .any(kubevmm_crds::vm::Disk::is_node_local)
    });
    w.disk_node
        .clone()
        .or_else(|| w.bind.clone().filter(|_| local))
}

pub(super) fn object_ref(w: &Work) -> ObjectReference {
    ObjectReference {
        api_version: Some(format!("{}/{}", kubevmm_crds::GROUP, kubevmm_crds::VERSION)),
        kind: Some("VirtualMachine".into()),
        name: Some(w.name.clone()),
        namespace: Some(w.namespace.clone()),
        uid: w.obj.metadata.uid.clone(),
        resource_version: w.obj.metadata.resource_version.clone(),
        field_path: None,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    #[test]
    fn reads_owned_status_fields() {
        let mut obj = DynamicObject::new("vm", &vm_resource());
        obj.metadata.managed_fields = Some(vec![
            ManagedFieldsEntry {
                manager: Some("kubevmm-operator".into()),
                operation: Some("Apply".into()),
                subresource: Some("status".into()),
                fields_v1: Some(FieldsV1(json!({"f:status": {
                    "f:phase": {}, "f:nodeName": {},
                    "f:conditions": {"k:{\"type\":\"Scheduled\"}": {".": {}}, "k:{\"type\":\"NodeLost\"}": {}}
                }}))),
                ..ManagedFieldsEntry::default()
            },
            ManagedFieldsEntry {
                manager: Some("node-vmm".into()),
                operation: Some("Apply".into()),
                subresource: Some("status".into()),
                fields_v1: Some(FieldsV1(json!({"f:status": {
                    "f:restartCount": {}, "f:conditions": {"k:{\"type\":\"Ready\"}": {}}
                }}))),
                ..ManagedFieldsEntry::default()
            },
        ]);
        let owned = owned_by_operator(&obj);
        assert!(owned.phase);
        assert!(!owned.restart_count);
        assert_eq!(
            owned.conditions.into_iter().collect::<Vec<_>>(),
            vec!["NodeLost".to_string(), "Scheduled".to_string()]
        );
    }

    #[test]
    fn the_finalizer_is_added_once_and_removed_when_no_guest_can_run() {
        let node = |fenced: bool| NodeState {
            deleted: false,
            fenced,
            ..deleted_node_state(
                "a",
                Liveness::Alive {
                    expires_at: Instant::now() + Duration::from_secs(9),
                },
            )
        };
        let deleting = |mut o: DynamicObject| {
            o.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
            o
        };
        let fresh = || {
            let mut o = bound_vm("a", "Always");
            o.metadata.finalizers = None;
            o.metadata.managed_fields = None;
            o.metadata.labels = None;
            o.data["status"] = json!({});
            o
        };
        // object, node a fenced | change
        let table = [
            ("new VM", fresh(), false, FinalizerChange::Add),
            (
                "bound, running",
                bound_vm("a", "Always"),
                false,
                FinalizerChange::Keep,
            ),
            (
                "deleted, never bound",
                deleting(fresh()),
                false,
                FinalizerChange::Keep,
            ),
            (
                "deleted, unbound, with finalizer",
                {
                    let mut o = deleting(fresh());
                    o.metadata.finalizers = Some(vec![contract::FINALIZER.into()]);
                    o
                },
                false,
                FinalizerChange::Remove,
            ),
            (
                "deleted, its node up: node-vmm lets go",
                deleting(bound_vm("a", "Always")),
                false,
                FinalizerChange::Keep,
            ),
            (
                "deleted, its node fenced",
                deleting(bound_vm("a", "Always")),
                true,
                FinalizerChange::Remove,
            ),
        ];
        for (what, obj, fenced, want) in table {
            let states = BTreeMap::from([("a".to_string(), node(fenced))]);
            assert_eq!(decide(Arc::new(obj), &states).finalizer, want, "{what}");
        }
    }

    #[test]
    fn ready_is_let_go_only_once_the_agent_wrote_its_own() {
        let ready = |status: &str, reason: &str| Condition {
            type_: condition::READY.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
            observed_generation: None,
        };
        // Ready now | still the operator's
        let table = [
            (None, false),
            (Some(ready("Unknown", reason::NODE_LOST)), true),
            (Some(ready("False", reason::RESCHEDULED)), true),
            (Some(ready("False", reason::NODE_GONE)), true),
            (Some(ready("True", reason::GUEST_RUNNING)), false),
            (Some(ready("False", reason::STARTING)), false),
        ];
        for (c, ours) in table {
            assert_eq!(operator_ready(c.as_ref()), ours, "{c:?}");
        }
    }

    #[test]
    fn unparseable_memory_is_a_condition_not_a_crash() {
        let mut obj = DynamicObject::new("bad", &vm_resource()).within("ns");
        obj.data = json!({"spec": {"memory": "lots", "boot": {"kernel": {"path": "/k"}}}});
        let w = decide(Arc::new(obj), &BTreeMap::new());
        assert_ne!(w.placement, Placement::Wanted);
        assert_eq!(w.status.phase, Some(VmPhase::Pending));
        let c = &w.status.conditions[condition::SCHEDULED];
        assert_eq!(c.reason, "InvalidSpec");
        assert!(c.message.contains("spec.memory"), "{}", c.message);
        assert_eq!(w.finalizer, FinalizerChange::Add);
    }

    /// A VM bound to `node` by the operator (status.nodeName it owns).
    /// A VM bound by the operator to `node`, phase Running.
    pub(in crate::reconcile) fn bound_vm(node: &str, strategy: &str) -> DynamicObject {
        let mut obj = DynamicObject::new("vm", &vm_resource()).within("ns");
        obj.metadata.finalizers = Some(vec![contract::FINALIZER.into()]);
        obj.metadata.labels = Some([(contract::LABEL_NODE.to_string(), node.to_string())].into());
        obj.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some(contract::MANAGER_OPERATOR.into()),
            operation: Some("Apply".into()),
            subresource: Some("status".into()),
            fields_v1: Some(FieldsV1(
                json!({"f:status": {"f:nodeName": {}, "f:phase": {}}}),
            )),
            ..ManagedFieldsEntry::default()
        }]);
        obj.data = json!({
            "spec": {"runStrategy": strategy, "cpus": 1, "memory": "64Mi", "boot": {"kernel": {"path": "/k"}}},
            "status": {"nodeName": node, "phase": "Running"},
        });
        obj
    }

    #[test]
    fn a_deleted_node_is_lost_not_gone_until_fenced() {
        let t0 = Instant::now();
        let expired = Liveness::Expired {
            silent_for: Duration::from_secs(50),
            duration: Duration::from_secs(40),
            last_renew: Timestamp::UNIX_EPOCH,
        };
        let alive = Liveness::Alive {
            expires_at: t0 + Duration::from_secs(10),
        };
        let fenced = |mut s: NodeState| {
            s.fenced = true;
            s
        };
        // node state | re-placed? | NodeLost
        let table: Vec<(NodeState, bool, Option<&str>)> = vec![
            (deleted_node_state("a", alive), false, None),
            (deleted_node_state("a", expired), false, Some("True")),
            (
                deleted_node_state("a", Liveness::NoLease),
                false,
                Some("True"),
            ),
            (
                fenced(deleted_node_state("a", expired)),
                true,
                Some("False"),
            ),
        ];
        for (state, moved, lost) in table {
            let liveness = state.liveness;
            let states = BTreeMap::from([("a".to_string(), state)]);
            let w = decide(Arc::new(bound_vm("a", "Always")), &states);
            assert_eq!(w.bind.is_none(), moved, "{liveness:?}");
            assert_eq!(w.placement == Placement::Wanted, moved, "{liveness:?}");
            assert_eq!(
                w.status
                    .conditions
                    .get(condition::NODE_LOST)
                    .map(|c| c.status.as_str()),
                lost,
                "{liveness:?}"
            );
            if lost == Some("True") {
                let msg = &w.status.conditions[condition::NODE_LOST].message;
                assert!(msg.contains("HypervisorNode was deleted"), "{msg}");
            }
        }
    }

    #[test]
    fn an_unconfirmed_heartbeat_changes_nothing() {
        let t0 = Instant::now();
        let mut state = deleted_node_state("a", Liveness::Unconfirmed { expires_at: t0 });
        state.deleted = false;
        let states = BTreeMap::from([("a".to_string(), state)]);
        let w = decide(Arc::new(bound_vm("a", "Always")), &states);
        assert_eq!(w.bind.as_deref(), Some("a"));
        assert!(!w.status.conditions.contains_key(condition::NODE_LOST));
        assert!(!w.status.conditions.contains_key(condition::READY));
        assert!(!w.status.drop.contains(condition::READY));
    }

    #[test]
    fn the_node_holding_local_disks_is_recorded_and_kept() {
        let alive = || {
            BTreeMap::from([(
                "a".to_string(),
                NodeState {
                    deleted: false,
                    ..deleted_node_state(
                        "a",
                        Liveness::Alive {
                            expires_at: Instant::now() + Duration::from_secs(9),
                        },
                    )
                },
            )])
        };
        let disks = json!([{"name": "d", "emptyDisk": {"size": "1Gi"}}]);
        let seed = json!([{"name": "s", "cloudInit": {"userData": "#cloud-config"}}]);
        // disks | diskNode now (owned?) | strategy | diskNode after | pinned request
        let table = [
            (disks.clone(), None, "Always", Some("a"), None),
            (seed.clone(), None, "Always", None, None),
            // Released (Halted): the disks stay on a; so does diskNode.
            (
                disks.clone(),
                Some(("a", true)),
                "Halted",
                Some("a"),
                Some("a"),
            ),
            // Written by someone else: not honoured, recorded anew.
            (disks.clone(), Some(("b", false)), "Always", Some("a"), None),
        ];
        for (d, now, strategy, after, pinned) in table {
            let mut obj = bound_vm("a", strategy);
            obj.data["spec"]["disks"] = d;
            obj.data["status"]["phase"] = json!("Stopped");
            if let Some((n, owned)) = now {
                obj.data["status"]["diskNode"] = json!(n);
                if owned {
                    let f = obj.metadata.managed_fields.as_mut().unwrap();
                    f[0].fields_v1 = Some(FieldsV1(
                        json!({"f:status": {"f:nodeName": {}, "f:phase": {}, "f:diskNode": {}}}),
                    ));
                }
            }
            let w = decide(Arc::new(obj), &alive());
            assert_eq!(disk_node(&w).as_deref(), after, "{now:?} {strategy}");
            assert_eq!(
                w.request.as_ref().and_then(|r| r.disk_node.as_deref()),
                pinned,
                "{now:?} {strategy}"
            );
            let applied =
                super::super::status::status_apply(&w, Timestamp::UNIX_EPOCH).unwrap_or_default();
            assert_eq!(
                applied.pointer("/status/diskNode").and_then(Value::as_str),
                after.filter(|_| !applied.is_null()),
                "{now:?} {strategy}"
            );
        }
    }

    #[test]
    fn a_label_without_an_operator_binding_is_not_a_binding() {
        let mut obj = bound_vm("a", "Always");
        obj.metadata.managed_fields = None; // status.nodeName written by someone else
        let states = BTreeMap::from([(
            "a".to_string(),
            deleted_node_state(
                "a",
                Liveness::Alive {
                    expires_at: Instant::now() + Duration::from_secs(9),
                },
            ),
        )]);
        let w = decide(Arc::new(obj), &states);
        assert_eq!(w.bind, None);
        assert_eq!(
            w.placement,
            Placement::Wanted,
            "placed by the scheduler like any unbound VM"
        );
        assert!(w.events.iter().any(|e| e.reason == "NodeLabelIgnored"));
    }
}
