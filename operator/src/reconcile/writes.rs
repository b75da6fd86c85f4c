//! The writes one VM's decisions need, in their required order (pure):
//! finalizer, status, node label (with the finalizer when the VM is bound
//! in this pass), finalizer removal, then Events. `execute` in the parent
//! carries them out, each conditional on the resourceVersion the previous
//! one left. Table-tested below.

#[allow(clippy::wildcard_imports)] // the parent's types and helpers
use super::*;

/// One write of a pass for one VM.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Write {
    /// Add the guest-cleanup finalizer on its own (the VM is not bound in
    /// this pass).
    AddFinalizer,
    /// Server-side apply of the operator's part of the status (the body;
    /// its `resourceVersion` is set when it is sent).
    ApplyStatus(Value),
    /// Set the node label to `node` (remove it: `None`), adding the
    /// finalizer in the same write when `with_finalizer`: no agent runs a
    /// VM before its label, so nothing needs the finalizer before then, and
    /// the label never exists without it.
    Label {
        /// The node, or none.
        node: Option<String>,
        /// The finalizer comes with it.
        with_finalizer: bool,
    },
    /// Remove the guest-cleanup finalizer: no guest of the VM can run.
    RemoveFinalizer,
    /// Publish an Event about the VM.
    Event(Note),
}

/// The writes `w` needs, in order.
pub(super) fn writes(w: &Work, now: Timestamp) -> Vec<Write> {
    let mut out = Vec::new();
    let adding = w.finalizer == FinalizerChange::Add;
    let relabel = w.label() != w.bind;
    let with_finalizer = adding && relabel && w.bind.is_some();
    if adding && !with_finalizer {
        out.push(Write::AddFinalizer);
    }
    if let Some(body) = status_apply(w, now) {
        out.push(Write::ApplyStatus(body));
    }
    if relabel {
        out.push(Write::Label {
            node: w.bind.clone(),
            with_finalizer,
        });
    }
    let has_finalizer = w.obj.finalizers().iter().any(|f| f == contract::FINALIZER);
    if w.finalizer == FinalizerChange::Remove && has_finalizer {
        out.push(Write::RemoveFinalizer);
    }
    out.extend(w.events.iter().cloned().map(Write::Event));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::decide::tests::bound_vm;

    fn node(name: &str, fenced: bool) -> (String, NodeState) {
        let state = NodeState {
            info: NodeInfo {
                name: name.into(),
                ready: true,
                kvm_available: true,
                allocatable_cpus: 4,
                allocatable_memory: 8 << 30,
                ..NodeInfo::default()
            },
            liveness: Liveness::Alive {
                expires_at: Instant::now() + Duration::from_secs(30),
            },
            fenced,
            deleted: false,
        };
        (name.into(), state)
    }

    fn new_vm(cpus: u32) -> DynamicObject {
        let mut obj = DynamicObject::new("vm", &vm_resource()).within("ns");
        obj.metadata.uid = Some("uid-vm".into());
        obj.data =
            json!({"spec": {"cpus": cpus, "memory": "64Mi", "boot": {"kernel": {"path": "/k"}}}});
        obj
    }

    fn deleting(mut obj: DynamicObject) -> DynamicObject {
        obj.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        obj
    }

    /// A VM bound to node `a` whose status already says all the operator
    /// would write.
    fn steady() -> DynamicObject {
        let mut o = bound_vm("a", "Always");
        o.data["status"]["printableStatus"] = json!("Running");
        o.data["status"]["conditions"] = json!([{
            "type": "Scheduled", "status": "True", "reason": "Scheduled",
            "message": "bound to node a", "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]);
        o
    }

    /// The writes as short names (Events by reason, labels by node).
    fn names(writes: &[Write]) -> Vec<String> {
        writes
            .iter()
            .map(|w| match w {
                Write::AddFinalizer => "AddFinalizer".into(),
                Write::ApplyStatus(_) => "ApplyStatus".into(),
                Write::Label {
                    node,
                    with_finalizer,
                } => format!(
                    "Label:{}{}",
                    node.as_deref().unwrap_or("-"),
                    if *with_finalizer { "+finalizer" } else { "" }
                ),
                Write::RemoveFinalizer => "RemoveFinalizer".into(),
                Write::Event(n) => format!("Event:{}", n.reason),
            })
            .collect()
    }

    #[test]
    fn the_writes_of_each_outcome_in_order() {
        let halted = {
            let mut o = bound_vm("a", "Always");
            o.data["spec"]["runStrategy"] = json!("Halted");
            o.data["status"]["phase"] = json!("Stopped");
            o
        };
        let foreign_label = {
            let mut o = steady();
            o.labels_mut()
                .insert(contract::LABEL_NODE.into(), "b".into());
            o
        };
        let other_finalizer = {
            let mut o = deleting(new_vm(1));
            o.metadata.finalizers = Some(vec!["example.com/backup".into()]);
            o
        };
        // (what, object, node a fenced, writes)
        #[rustfmt::skip]
        let table: Vec<(&str, DynamicObject, bool, &[&str])> = vec![
            ("a new VM that fits: bound, its finalizer with the label", new_vm(1), false,
             &["ApplyStatus", "Label:a+finalizer", "Event:Scheduled"]),
            ("a new VM that fits nowhere: finalizer alone, Pending", new_vm(64), false,
             &["AddFinalizer", "ApplyStatus", "Event:FailedScheduling"]),
            ("bound, Scheduled not yet said: the status only", bound_vm("a", "Always"), false, &["ApplyStatus"]),
            ("bound and running as written: nothing", steady(), false, &[]),
            ("set to Halted and stopped: released, label removed", halted, false,
             &["ApplyStatus", "Label:-", "Event:Released"]),
            ("a label somebody else set: corrected", foreign_label, false,
             &["Label:a", "Event:NodeLabelIgnored"]),
            ("deleted, its node up: node-vmm lets go; the status says Terminating", deleting(steady()), false, &["ApplyStatus"]),
            ("deleted, its node fenced: finalizer removed", deleting(bound_vm("a", "Always")), true,
             &["RemoveFinalizer", "Event:FinalizerRemoved"]),
            ("deleted, held by another's finalizer only: says so, ours not added", other_finalizer, false, &["ApplyStatus"]),
        ];
        let overcommit = Overcommit::new(1.0, 1.0).expect("overcommit");
        let now = Timestamp::UNIX_EPOCH;
        for (what, obj, fenced, want) in table {
            let states: BTreeMap<_, _> = [node("a", fenced)].into();
            let works = plan(vec![Arc::new(obj)], &states, overcommit);
            let got = names(&writes(&works[0], now));
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn a_status_apply_carries_the_decided_fields() {
        let states: BTreeMap<_, _> = [node("a", false)].into();
        let overcommit = Overcommit::new(1.0, 1.0).expect("overcommit");
        let works = plan(vec![Arc::new(new_vm(1))], &states, overcommit);
        let body = writes(&works[0], Timestamp::UNIX_EPOCH)
            .into_iter()
            .find_map(|w| match w {
                Write::ApplyStatus(b) => Some(b),
                _ => None,
            })
            .expect("a status apply");
        assert_eq!(body["status"]["nodeName"], "a");
        assert_eq!(body["status"]["phase"], "Scheduled");
    }
}
