//! Whether a `VirtualMachine` is bound to this node, i.e. whether this
//! agent may run it (DESIGN.md, "Security model": only the operator binds).
//!
//! The agent's watch selects VMs by the label `kubevmm.io/node=<node>`, but
//! a label is only a hint: the binding is `status.nodeName`, written by the
//! operator's field manager after checking cordon, `nodeSelector` and
//! capacity. The chart's admission policy lets nobody but the operator set
//! either; this check keeps the agent honest where the policy is missing
//! (disabled, or a cluster without it) and while a binding is half-written
//! (the operator writes `status.nodeName` first, then the label). A VM that
//! is not bound here is left alone: not started, no status written.

use std::fmt;

use kube::ResourceExt as _;
use kubevmm_crds::contract::{LABEL_NODE, MANAGER_OPERATOR};
use kubevmm_crds::VirtualMachine;

/// The verdict for one VM on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// Label and `status.nodeName` name this node, and the operator wrote
    /// `status.nodeName`: run it.
    Here,
    /// Not bound here: leave it alone.
    NotHere(NotBound),
}

/// Why a VM is not bound to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotBound {
    /// The label names another node, or none.
    Label(Option<String>),
    /// No `status.nodeName`: the operator has not bound it (a label alone
    /// binds nothing).
    NoNodeName,
    /// `status.nodeName` names another node (the VM is being moved).
    OtherNode(String),
    /// `status.nodeName` names this node but the operator's field manager
    /// does not own it: somebody else wrote it.
    NotByOperator,
}

impl fmt::Display for NotBound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Label(Some(n)) => write!(f, "its label {LABEL_NODE} names node {n}"),
            Self::Label(None) => write!(f, "it has no {LABEL_NODE} label"),
            Self::NoNodeName => write!(
                f,
                "it has no status.nodeName: the operator has not bound it, and the label alone binds nothing"
            ),
            Self::OtherNode(n) => write!(f, "its status.nodeName names node {n}"),
            Self::NotByOperator => write!(
                f,
                "its status.nodeName was not written by the operator (field manager {MANAGER_OPERATOR})"
            ),
        }
    }
}

/// Whether the operator's field manager owns `status.nodeName`.
fn node_name_by_operator(vm: &VirtualMachine) -> bool {
    vm.managed_fields().iter().any(|e| {
        e.manager.as_deref() == Some(MANAGER_OPERATOR)
            && e.subresource.as_deref() == Some("status")
            && e.fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:status")?.get("f:nodeName"))
                .is_some()
    })
}

/// Decides whether `vm` is bound to `node` (pure).
pub fn bound_here(vm: &VirtualMachine, node: &str) -> Binding {
    let label = vm.labels().get(LABEL_NODE);
    if label.map(String::as_str) != Some(node) {
        return Binding::NotHere(NotBound::Label(label.cloned()));
    }
    match vm.status.as_ref().and_then(|s| s.node_name.as_deref()) {
        None | Some("") => Binding::NotHere(NotBound::NoNodeName),
        Some(n) if n != node => Binding::NotHere(NotBound::OtherNode(n.to_string())),
        Some(_) if !node_name_by_operator(vm) => Binding::NotHere(NotBound::NotByOperator),
        Some(_) => Binding::Here,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
    use serde_json::json;

    /// A VM with the given label, status.nodeName and the field manager
    /// owning status.nodeName.
    fn vm(label: Option<&str>, node_name: Option<&str>, writer: Option<&str>) -> VirtualMachine {
        let mut v: VirtualMachine = serde_json::from_value(json!({
            "apiVersion": "kubevmm.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "vm", "namespace": "ns", "uid": "u"},
            "spec": {"cpus": 1, "memory": "64Mi", "boot": {"kernel": {"path": "/k"}}},
            "status": {"nodeName": node_name},
        }))
        .expect("vm");
        if let Some(l) = label {
            v.labels_mut().insert(LABEL_NODE.into(), l.into());
        }
        if let Some(w) = writer {
            v.metadata.managed_fields = Some(vec![
                // The agent's own status fields never include nodeName.
                ManagedFieldsEntry {
                    manager: Some("node-vmm".into()),
                    subresource: Some("status".into()),
                    fields_v1: Some(FieldsV1(json!({"f:status": {"f:phase": {}}}))),
                    ..ManagedFieldsEntry::default()
                },
                ManagedFieldsEntry {
                    manager: Some(w.into()),
                    operation: Some("Apply".into()),
                    subresource: Some("status".into()),
                    fields_v1: Some(FieldsV1(json!({"f:status": {"f:nodeName": {}}}))),
                    ..ManagedFieldsEntry::default()
                },
            ]);
        }
        v
    }

    /// label | status.nodeName | who wrote nodeName | verdict on node "a"
    type Case<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>, Binding);

    #[test]
    fn only_an_operator_written_binding_to_this_node_runs() {
        let op = Some(MANAGER_OPERATOR);
        let table: &[Case] = &[
            (Some("a"), Some("a"), op, Binding::Here),
            // The attack: a user sets the label; no binding from the operator.
            (
                Some("a"),
                None,
                None,
                Binding::NotHere(NotBound::NoNodeName),
            ),
            (
                Some("a"),
                Some(""),
                op,
                Binding::NotHere(NotBound::NoNodeName),
            ),
            // ...or writes status.nodeName too (no admission policy).
            (
                Some("a"),
                Some("a"),
                Some("kubectl-patch"),
                Binding::NotHere(NotBound::NotByOperator),
            ),
            (
                Some("a"),
                Some("a"),
                None,
                Binding::NotHere(NotBound::NotByOperator),
            ),
            // Moving elsewhere: status written, label not yet.
            (
                Some("a"),
                Some("b"),
                op,
                Binding::NotHere(NotBound::OtherNode("b".into())),
            ),
            (
                Some("b"),
                Some("a"),
                op,
                Binding::NotHere(NotBound::Label(Some("b".into()))),
            ),
            (None, Some("a"), op, Binding::NotHere(NotBound::Label(None))),
        ];
        for (label, node_name, writer, want) in table {
            assert_eq!(
                bound_here(&vm(*label, *node_name, *writer), "a"),
                *want,
                "label {label:?}, nodeName {node_name:?} by {writer:?}"
            );
        }
    }

    #[test]
    fn reasons_read_well() {
        assert_eq!(
            NotBound::NoNodeName.to_string(),
            "it has no status.nodeName: the operator has not bound it, and the label alone binds nothing"
        );
        assert_eq!(
            NotBound::OtherNode("b".into()).to_string(),
            "its status.nodeName names node b"
        );
    }
}
