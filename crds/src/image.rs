//! `VirtualMachineImage`: a kernel, initrd or disk image that VMs refer to.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::vm::ABSOLUTE_PATH_RULE;

/// Where an image comes from.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubevmm.io",
    version = "v1alpha1",
    kind = "VirtualMachineImage",
    plural = "virtualmachineimages",
    singular = "virtualmachineimage",
    shortname = "vmimage",
    shortname = "vmimg",
    category = "kubevmm",
    namespaced,
    status = "VirtualMachineImageStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Format","type":"string","jsonPath":".status.format"}"#,
    printcolumn = r#"{"name":"Size","type":"string","jsonPath":".status.virtualSize"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualMachineImageSpec {
    /// The one place the image is imported from.
    pub source: ImageSource,
}

/// Exactly one of `http` or `path`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.http) != has(self.path)").message("source needs exactly one of http or path"))]
pub struct ImageSource {
    /// Download over HTTP(S).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// An allow-listed path on the nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new(ABSOLUTE_PATH_RULE).message("source.path must be absolute and must not contain '..'"))]
    pub path: Option<String>,
}

/// An HTTP(S) download.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSource {
    /// http:// or https:// URL.
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/]+')").message("source.http.url must be an http:// or https:// URL"))]
    pub url: String,
    /// Expected SHA-256 of the downloaded bytes, 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-fA-F]{64}$')").message("source.http.sha256 must be 64 hex digits"))]
    pub sha256: Option<String>,
}

/// Import phase.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ImagePhase {
    /// Not yet looked at.
    Pending,
    /// Being downloaded or copied.
    Importing,
    /// Usable by VMs.
    Ready,
    /// The import failed; see conditions.
    Failed,
}

/// Image content format, detected from the bytes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// A raw disk or a kernel/initrd file.
    Raw,
    /// `QEMU` copy-on-write v2/v3.
    Qcow2,
}

/// Observed state of an image.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineImageStatus {
    /// Import phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ImagePhase>,
    /// Detected format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
    /// Size the guest sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<Quantity>,
    /// Per-node readiness and errors: one condition `<node>/Ready` per node
    /// that imported (or tried to import) the image, with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Per-node import state, one entry per node, each written only by that
    /// node's agent (server-side apply field manager `node-vmm-<node>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeImageStatus>,
}

/// The import of an image on one node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeImageStatus {
    /// The node.
    pub node: String,
    /// Import phase on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ImagePhase>,
    /// Bytes downloaded or copied so far.
    #[serde(default)]
    pub bytes_done: i64,
    /// Bytes expected (0 while unknown).
    #[serde(default)]
    pub bytes_total: i64,
    /// Why the phase is what it is (`Imported`, `Importing`, or the failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable progress or error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// SHA-256 of the cached bytes once Ready (`sha256:<hex>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// The condition type of `node`'s import in `status.conditions`.
pub fn node_condition(node: &str) -> String {
    format!("{node}/Ready")
}

/// The image-wide phase from the per-node entries: Failed if any node
/// failed, Importing while any node is not done, Ready when every node
/// that imports it has it, Pending when no node has tried.
pub fn aggregate_phase(nodes: &[NodeImageStatus]) -> ImagePhase {
    let any = |p: ImagePhase| nodes.iter().any(|n| n.phase == Some(p));
    if nodes.is_empty() {
        ImagePhase::Pending
    } else if any(ImagePhase::Failed) {
        ImagePhase::Failed
    } else if nodes.iter().all(|n| n.phase == Some(ImagePhase::Ready)) {
        ImagePhase::Ready
    } else {
        ImagePhase::Importing
    }
}
