//! `HypervisorNode`: a Kubernetes node that runs guests, as node-vmm sees it.
//!
//! Cluster-scoped and named after the Kubernetes node. node-vmm owns the
//! status; administrators own `spec.cordoned`.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Administrator intent for a hypervisor node.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "kubevmm.io",
    version = "v1alpha1",
    kind = "HypervisorNode",
    plural = "hypervisornodes",
    singular = "hypervisornode",
    shortname = "hvnode",
    shortname = "hvn",
    category = "kubevmm",
    status = "HypervisorNodeStatus",
    printcolumn = r#"{"name":"KVM","type":"string","jsonPath":".status.kvm.kind"}"#,
    printcolumn = r#"{"name":"CPUs","type":"integer","jsonPath":".status.allocatable.cpus"}"#,
    printcolumn = r#"{"name":"Memory","type":"string","jsonPath":".status.allocatable.memory"}"#,
    printcolumn = r#"{"name":"VMs","type":"integer","jsonPath":".status.runningVms"}"#,
    printcolumn = r#"{"name":"Cordoned","type":"boolean","jsonPath":".spec.cordoned"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct HypervisorNodeSpec {
    /// true stops new VM placements on this node; running VMs stay.
    #[serde(default)]
    pub cordoned: bool,
}

/// What KVM this node offers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KvmInfo {
    /// Whether /dev/kvm opened and has every capability the VMM needs.
    pub available: bool,
    /// `hardware` (VT-x/AMD-V), `software` (e.g. `kvm_pvm`) or `none`.
    pub kind: String,
    /// The KVM module serving /dev/kvm (`kvm_intel`, `kvm_amd`, `kvm_pvm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// `KVM_GET_API_VERSION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<i32>,
    /// Required capabilities that are missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_capabilities: Vec<String>,
}

/// vCPUs and memory.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeResources {
    /// vCPUs.
    pub cpus: u32,
    /// Memory as a quantity.
    pub memory: Quantity,
}

/// What node-vmm reports about its node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HypervisorNodeStatus {
    /// KVM availability and kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm: Option<KvmInfo>,
    /// Host CPU model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    /// Host vCPUs and memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<NodeResources>,
    /// What guests may use after the reserve, before overcommit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<NodeResources>,
    /// Guests whose VMM runs on this node now.
    #[serde(default)]
    pub running_vms: i32,
    /// node-vmm version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// `address:port` of node-vmm's access server (console, logs and
    /// port-forward streams over mutual TLS), dialled by the operator only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262))]
    pub access_endpoint: Option<String>,
    /// Last time node-vmm wrote this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Ready and similar conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
