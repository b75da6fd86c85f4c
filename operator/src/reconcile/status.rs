//! The operator's part of a VM's status (pure): the fields it decided, the
//! owned fields it did not decide (re-applied with their current value so
//! nothing disappears by omission), and the fields every writer derives
//! from the merged status: `printableStatus` and the phase transitions.

#[allow(clippy::wildcard_imports)] // the parent's types and helpers
use super::*;
use kubevmm_crds::printable::{printable_status, record_transition};

/// The operator's status, complete, or `None` when it is what is there.
pub(super) fn status_apply(w: &Work, now: Timestamp) -> Option<Value> {
    let current = w.current_status();
    // The status as it will be once this apply lands.
    let mut merged = current.clone();
    let mut changed = current.node_name != w.bind;
    let mut status = serde_json::Map::new();
    if let Some(n) = &w.bind {
        status.insert("nodeName".into(), json!(n));
    }
    merged.node_name.clone_from(&w.bind);
    let disk_node = decide::disk_node(w);
    changed |= current.disk_node != disk_node;
    if let Some(n) = &disk_node {
        status.insert("diskNode".into(), json!(n));
    }
    merged.disk_node = disk_node;
    let phase = match w.status.phase {
        Some(p) => {
            changed |= current.phase != Some(p);
            Some(p)
        }
        None if w.owned.phase => current.phase,
        None => None,
    };
    if let Some(p) = phase {
        status.insert("phase".into(), json!(p.as_str()));
        merged.phase = Some(p);
    }
    match w.status.restart_count {
        Some(r) => {
            changed |= current.restart_count != r;
            status.insert("restartCount".into(), json!(r));
        }
        None if w.owned.restart_count => {
            status.insert("restartCount".into(), json!(current.restart_count));
        }
        None => {}
    }
    let conditions = conditions_apply(w, &mut merged, &mut changed, now);
    if !conditions.is_empty() {
        status.insert("conditions".into(), Value::Array(conditions));
    }
    // Derived over the merged status, exactly as node-vmm derives them, so
    // the two writers agree on the same object. Not for a VM about to go.
    if w.finalizer != FinalizerChange::Remove {
        let deleting = w.obj.metadata.deletion_timestamp.is_some();
        let printable = printable_status(deleting, &merged);
        changed |= current.printable_status != Some(printable);
        status.insert("printableStatus".into(), json!(printable));
        let created = w.obj.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let transitions = record_transition(
            &current.phase_transition_timestamps,
            w.status.phase,
            created,
            now,
        );
        if !transitions.is_empty() {
            status.insert("phaseTransitionTimestamps".into(), json!(transitions));
        }
    }
    changed.then(|| {
        json!({
            "apiVersion": kubevmm_crds::API_VERSION,
            "kind": "VirtualMachine",
            "metadata": {
                "name": w.name,
                "namespace": w.namespace,
                "resourceVersion": w.obj.metadata.resource_version,
            },
            "status": status,
        })
    })
}

/// The operator's conditions for the apply: the decided ones (with their
/// transition time kept while their status holds), the owned ones it did
/// not decide as they are, the dropped ones left out; `merged` and
/// `changed` follow.
fn conditions_apply(
    w: &Work,
    merged: &mut kubevmm_crds::VirtualMachineStatus,
    changed: &mut bool,
    now: Timestamp,
) -> Vec<Value> {
    let generation = w.obj.metadata.generation;
    let mut conditions = Vec::new();
    let mut types: BTreeSet<String> = w.owned.conditions.clone();
    types.extend(w.status.conditions.keys().map(|k| (*k).to_string()));
    for ty in types {
        let existing = w.current_condition(&ty);
        merged.conditions.retain(|c| c.type_ != ty);
        if let Some(want) = w.status.conditions.get(ty.as_str()) {
            let same = existing.as_ref().is_some_and(|c| {
                c.status == want.status.as_str()
                    && c.reason == want.reason
                    && c.message == want.message
            });
            *changed |= !same;
            let transition = existing
                .as_ref()
                .filter(|c| c.status == want.status.as_str())
                .map_or(Time(now), |c| c.last_transition_time.clone());
            let c = Condition {
                type_: ty,
                status: want.status.as_str().into(),
                reason: want.reason.clone(),
                message: want.message.clone(),
                last_transition_time: transition,
                observed_generation: generation,
            };
            conditions.push(serde_json::to_value(&c).unwrap_or(Value::Null));
            merged.conditions.push(c);
        } else if w.status.drop.contains(ty.as_str()) {
            // Owned but no longer wanted: omitting it removes it.
            *changed |= existing.is_some();
        } else if let Some(c) = existing {
            conditions.push(serde_json::to_value(&c).unwrap_or(Value::Null));
            merged.conditions.push(c);
        }
    }
    conditions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::decide::tests::bound_vm;

    fn alive(node: &str) -> BTreeMap<String, NodeState> {
        BTreeMap::from([(
            node.to_string(),
            NodeState {
                deleted: false,
                ..deleted_node_state(
                    node,
                    Liveness::Alive {
                        expires_at: Instant::now() + Duration::from_secs(9),
                    },
                )
            },
        )])
    }

    fn ready_running() -> Value {
        json!([{"type": "Ready", "status": "True", "reason": "GuestRunning", "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z"},
               {"type": "Scheduled", "status": "True", "reason": "Scheduled", "message": "bound to node a",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}])
    }

    #[test]
    fn the_status_word_is_written_only_when_it_is_not_already_right() {
        // node-vmm wrote Running and the word: nothing to do.
        let mut obj = bound_vm("a", "Always");
        obj.data["status"]["conditions"] = ready_running();
        obj.data["status"]["printableStatus"] = json!("Running");
        let w = decide(Arc::new(obj.clone()), &alive("a"));
        assert_eq!(status_apply(&w, Timestamp::UNIX_EPOCH), None);

        // The word is missing or stale (an older agent): the operator fills it in.
        obj.data["status"]["printableStatus"] = json!("Starting");
        let w = decide(Arc::new(obj), &alive("a"));
        let body = status_apply(&w, Timestamp::UNIX_EPOCH).expect("a write");
        assert_eq!(body["status"]["printableStatus"], "Running", "{body}");
    }

    #[test]
    fn a_lost_node_shows_node_lost_and_a_deleted_vm_terminating() {
        let mut obj = bound_vm("a", "Always");
        obj.data["status"]["conditions"] = ready_running();
        obj.data["status"]["printableStatus"] = json!("Running");
        let lost = BTreeMap::from([(
            "a".to_string(),
            NodeState {
                deleted: false,
                ..deleted_node_state(
                    "a",
                    Liveness::Expired {
                        silent_for: Duration::from_secs(50),
                        duration: Duration::from_secs(40),
                        last_renew: Timestamp::UNIX_EPOCH,
                    },
                )
            },
        )]);
        let w = decide(Arc::new(obj.clone()), &lost);
        let body = status_apply(&w, Timestamp::UNIX_EPOCH).expect("a write");
        assert_eq!(body["status"]["printableStatus"], "NodeLost", "{body}");

        obj.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        let w = decide(Arc::new(obj), &alive("a"));
        let body = status_apply(&w, Timestamp::UNIX_EPOCH).expect("a write");
        assert_eq!(body["status"]["printableStatus"], "Terminating", "{body}");
    }

    #[test]
    fn binding_records_the_wait_and_the_placement() {
        let mut obj = bound_vm("a", "Always");
        obj.metadata.creation_timestamp = Some(Time(Timestamp::from_second(100).unwrap()));
        obj.data["status"] = json!({});
        obj.metadata.labels = None;
        obj.metadata.managed_fields = None;
        let mut w = decide(Arc::new(obj), &alive("a"));
        // What the pass does on a successful placement.
        w.bind = Some("a".into());
        w.status.phase = Some(VmPhase::Scheduled);
        let now = Timestamp::from_second(101).unwrap();
        let body = status_apply(&w, now).expect("a write");
        assert_eq!(body["status"]["printableStatus"], "Starting", "{body}");
        let t = &body["status"]["phaseTransitionTimestamps"];
        assert_eq!(t[0]["phase"], "Pending", "{t}");
        assert_eq!(
            t[0]["phaseTransitionTimestamp"], "1970-01-01T00:01:40Z",
            "{t}"
        );
        assert_eq!(t[1]["phase"], "Scheduled", "{t}");
        assert_eq!(
            t[1]["phaseTransitionTimestamp"], "1970-01-01T00:01:41Z",
            "{t}"
        );
    }
}
