//! `VirtualMachine`: a KVM guest the user wants to exist.
//!
//! Field names are fixed by DESIGN.md ("API"). Every rule the API server
//! enforces is declared here, next to the field it guards, either as an
//! `OpenAPI` constraint or as a CEL rule (`x-kubernetes-validations`); the
//! same rules are checked client-side by [`crate::validation`] for standalone
//! mode, and a test keeps both in agreement.

// CloudInit mirrors cloud-init's userData/metaData/networkData names; the
// derive re-emits the struct, so the allow has to sit on the module.
#![allow(clippy::struct_field_names)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::printable::{FailureRecord, PhaseTransition, PrintableStatus};

/// CEL: a string that is an absolute path with no `..` component.
pub(crate) const ABSOLUTE_PATH_RULE: &str =
    "self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')";
/// CEL: an RFC 1123 DNS label.
pub(crate) const DNS_LABEL_RULE: &str = "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";
/// CEL: an RFC 1123 DNS subdomain (object names).
pub(crate) const DNS_SUBDOMAIN_RULE: &str =
    "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')";
/// CEL: cloud-init user-data of a kind cloud-init runs: first line
/// `#cloud-config`, a `#!` script, or MIME multipart starting with
/// `Content-Type: multipart/` (after `MIME-Version: 1.0` at most). Prefix
/// tests only: a regex over 64 KiB in each of 32 disks is beyond the CEL
/// cost budget. Mirrored by [`crate::validation::user_data_kind`].
pub(crate) const USER_DATA_RULE: &str = "self.startsWith('#!') || self == '#cloud-config' || self.startsWith('#cloud-config\\n') || self.startsWith('#cloud-config\\r\\n') || self.startsWith('Content-Type: multipart/') || self.startsWith('MIME-Version: 1.0\\nContent-Type: multipart/') || self.startsWith('MIME-Version: 1.0\\r\\nContent-Type: multipart/')";
/// The message of [`USER_DATA_RULE`].
pub(crate) const USER_DATA_MESSAGE: &str = "cloudInit.userData must be a #cloud-config document (first line #cloud-config), a #! script or MIME multipart (starting with Content-Type: multipart/..., after MIME-Version: 1.0 at most)";

/// What the VM should do when it is not running, as in `KubeVirt`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RunStrategy {
    /// Keep the guest running: restart it whenever it stops (with backoff).
    #[default]
    Always,
    /// Restart only when the guest fails; a clean power-off ends in Succeeded.
    RerunOnFailure,
    /// Start once on creation; afterwards only explicit start/stop requests.
    Manual,
    /// Keep the guest stopped.
    Halted,
    /// Run the guest once; never restart it.
    Once,
}

/// The desired state of a `VirtualMachine`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubevmm.io",
    version = "v1alpha1",
    kind = "VirtualMachine",
    plural = "virtualmachines",
    singular = "virtualmachine",
    shortname = "vm",
    shortname = "vms",
    category = "kubevmm",
    namespaced,
    status = "VirtualMachineStatus",
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.printableStatus","description":"What the VM is doing, for people (docs/api.md)"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type=='Ready')].status"}"#,
    printcolumn = r#"{"name":"Restarts","type":"integer","jsonPath":".status.restartCount"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.nodeName"}"#,
    printcolumn = r#"{"name":"IP","type":"string","jsonPath":".status.interfaces[0].ipAddress"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"vCPUs","type":"integer","jsonPath":".spec.cpus","priority":1}"#,
    printcolumn = r#"{"name":"Memory","type":"string","jsonPath":".spec.memory","priority":1}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("self.disks.all(d, self.disks.exists_one(e, e.name == d.name))").message("disk names must be unique").field_path(".disks"))]
#[x_kube(validation = Rule::new("self.networks.all(n, self.networks.exists_one(e, e.name == n.name))").message("network names must be unique").field_path(".networks"))]
pub struct VirtualMachineSpec {
    /// When the guest runs: `Always` (default), `RerunOnFailure`, `Manual`, `Halted` or `Once`.
    #[serde(default)]
    pub run_strategy: RunStrategy,

    /// Number of vCPUs, 1 to 256.
    #[serde(default = "default_cpus")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 256").message("spec.cpus must be between 1 and 256"))]
    pub cpus: u32,

    /// Guest RAM as a Kubernetes quantity string (e.g. 512Mi, 2Gi), at least 64Mi.
    #[x_kube(validation = Rule::new("isQuantity(self)").message("spec.memory must be a Kubernetes quantity such as 512Mi or 2Gi"))]
    #[x_kube(validation = Rule::new("!isQuantity(self) || quantity(self).compareTo(quantity('64Mi')) >= 0").message("spec.memory must be at least 64Mi"))]
    #[x_kube(validation = Rule::new("!isQuantity(self) || quantity(self).compareTo(quantity('16Ti')) <= 0").message("spec.memory must be at most 16Ti"))]
    #[serde(deserialize_with = "crate::quantity::string_only")]
    #[schemars(schema_with = "crate::quantity::string_schema")]
    pub memory: Quantity,

    /// true pauses the vCPUs of a running guest; false resumes them.
    #[serde(default)]
    pub paused: bool,

    /// Direct Linux boot: kernel, optional initrd and command line.
    pub boot: Boot,

    /// Block devices, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub disks: Vec<Disk>,

    /// Network interfaces, in the order the guest sees them.
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub networks: Vec<Network>,

    /// Only hypervisor nodes whose labels match all of these may run the VM.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Seconds the guest gets to power off after an ACPI shutdown request
    /// before it is stopped by force.
    #[serde(default = "default_grace")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 3600").message("spec.terminationGracePeriodSeconds must be between 0 and 3600"))]
    pub termination_grace_period_seconds: i64,
}

fn default_cpus() -> u32 {
    1
}

fn default_grace() -> i64 {
    30
}

/// Direct-boot configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Boot {
    /// The kernel: an uncompressed vmlinux (PVH entry) or a bzImage.
    pub kernel: BootSource,
    /// An optional initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<BootSource>,
    /// The kernel command line, at most 2048 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub cmdline: Option<String>,
}

/// Where a kernel or initrd comes from: a `VirtualMachineImage` or a node path.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.image) != has(self.path)").message("exactly one of image or path must be set"))]
pub struct BootSource {
    /// Name of a `VirtualMachineImage` in the VM's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(DNS_SUBDOMAIN_RULE).message("image must be a VirtualMachineImage name (lowercase RFC 1123 subdomain)"))]
    pub image: Option<String>,
    /// An absolute path on the node (allow-listed directories only in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new(ABSOLUTE_PATH_RULE).message("path must be absolute and must not contain '..'"))]
    pub path: Option<String>,
}

/// A block device of the guest. Exactly one source must be set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("[has(self.image), has(self.emptyDisk), has(self.cloudInit), has(self.hostDisk)].filter(x, x).size() == 1").message("each disk needs exactly one source: image, emptyDisk, cloudInit or hostDisk"))]
pub struct Disk {
    /// Disk name: a DNS label, unique within the VM; also the virtio serial.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new(DNS_LABEL_RULE).message("disk name must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit"))]
    pub name: String,
    /// A copy-on-write clone of a `VirtualMachineImage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageDisk>,
    /// A new, empty (sparse) disk of the given size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_disk: Option<EmptyDisk>,
    /// A `NoCloud` cloud-init seed disk generated by node-vmm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    /// An existing file on the node (allow-listed directories only in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_disk: Option<HostDisk>,
    /// Expose the disk read-only to the guest.
    #[serde(default)]
    pub read_only: bool,
}

/// A disk cloned from a `VirtualMachineImage`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageDisk {
    /// Name of a `VirtualMachineImage` in the VM's namespace.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(DNS_SUBDOMAIN_RULE).message("image name must be a VirtualMachineImage name (lowercase RFC 1123 subdomain)"))]
    pub name: String,
}

/// A blank disk.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmptyDisk {
    /// Size as a Kubernetes quantity, greater than zero (e.g. 1Gi).
    #[x_kube(validation = Rule::new("isQuantity(self)").message("emptyDisk.size must be a Kubernetes quantity such as 1Gi"))]
    #[x_kube(validation = Rule::new("!isQuantity(self) || quantity(self).isGreaterThan(quantity('0'))").message("emptyDisk.size must be greater than zero"))]
    #[serde(deserialize_with = "crate::quantity::string_only")]
    #[schemars(schema_with = "crate::quantity::string_schema")]
    pub size: Quantity,
}

/// Cloud-init `NoCloud` data (field names follow cloud-init's own).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.userData) || has(self.networkData) || has(self.metaData)").message("cloudInit needs at least one of userData, metaData or networkData"))]
pub struct CloudInit {
    /// user-data, at most 64 KiB: a `#cloud-config` document, a `#!` script
    /// or MIME multipart (`Content-Type: multipart/...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    #[x_kube(validation = Rule::new(USER_DATA_RULE).message(USER_DATA_MESSAGE))]
    pub user_data: Option<String>,
    /// Extra meta-data merged over the generated instance-id and hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub meta_data: Option<String>,
    /// network-config (version 1 or 2), at most 64 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub network_data: Option<String>,
}

/// A file that already exists on the node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostDisk {
    /// Absolute path of a raw disk image on the node.
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new(ABSOLUTE_PATH_RULE).message("hostDisk.path must be absolute and must not contain '..'"))]
    pub path: String,
}

/// A network interface of the guest. Exactly one binding must be set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.masquerade) != has(self.bridge)").message("each network needs exactly one binding: masquerade or bridge"))]
pub struct Network {
    /// Interface name: a DNS label, unique within the VM.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new(DNS_LABEL_RULE).message("network name must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit"))]
    pub name: String,
    /// NAT behind the node bridge, with an address from node-vmm's DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade: Option<Masquerade>,
    /// A tap on an existing host bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<BridgeBinding>,
    /// Fixed guest MAC (unicast, e.g. 52:54:00:12:34:56); generated when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 17))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-fA-F][02468aAcCeE](:[0-9a-fA-F]{2}){5}$')").message("macAddress must be a unicast MAC such as 52:54:00:12:34:56 (six hex pairs separated by ':', lowest bit of the first octet clear)"))]
    pub mac_address: Option<String>,
}

/// Masquerade (NAT) binding; has no settings yet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct Masquerade {}

/// Bridge binding: a tap device attached to an existing host bridge.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BridgeBinding {
    /// Name of the host bridge, e.g. br0.
    #[schemars(length(min = 1, max = 15))]
    #[x_kube(validation = Rule::new("self.matches('^[a-zA-Z0-9_.-]{1,15}$')").message("bridge.name must be a Linux interface name: 1 to 15 of letters, digits, '_', '.', '-'"))]
    pub name: String,
}

/// Lifecycle phase of a `VirtualMachine`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum VmPhase {
    /// Accepted, not yet placed on a node.
    Pending,
    /// Bound to a node; node-vmm has not started it yet.
    Scheduled,
    /// node-vmm is preparing disks and network, or the VMM is starting.
    Starting,
    /// The VMM is up and the guest's vCPUs execute.
    Running,
    /// The VMM is up and the vCPUs are paused.
    Paused,
    /// A shutdown was requested; the guest is powering off.
    Stopping,
    /// Not running, by request (runStrategy Halted or Manual).
    Stopped,
    /// The guest powered off by itself and will not be restarted.
    Succeeded,
    /// The guest or its VMM failed and will not be restarted.
    Failed,
}

impl Disk {
    /// Whether the disk is a node-local file made for this VM (an
    /// `emptyDisk` or an `image` overlay): it keeps guest data, so the VM
    /// stays with the node that holds it (`status.diskNode`).
    pub fn is_node_local(&self) -> bool {
        self.empty_disk.is_some() || self.image.is_some()
    }
}

impl VmPhase {
    /// Every phase, in lifecycle order.
    pub const ALL: [VmPhase; 9] = [
        Self::Pending,
        Self::Scheduled,
        Self::Starting,
        Self::Running,
        Self::Paused,
        Self::Stopping,
        Self::Stopped,
        Self::Succeeded,
        Self::Failed,
    ];

    /// The phase as written in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Scheduled => "Scheduled",
            Self::Starting => "Starting",
            Self::Running => "Running",
            Self::Paused => "Paused",
            Self::Stopping => "Stopping",
            Self::Stopped => "Stopped",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }
}

/// A guest network interface as observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStatus {
    /// The `spec.networks[].name` this interface belongs to.
    pub name: String,
    /// The guest MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The guest's IPv4 address, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    /// The host-side tap device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
}

/// The observed state of a `VirtualMachine`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    /// Lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VmPhase>,
    /// The phase refined by the conditions, for people: the STATUS column
    /// (`Running`, `CrashLoopBackOff`, `ErrorUnschedulable`, ...; see
    /// [`crate::printable::printable_status`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub printable_status: Option<PrintableStatus>,
    /// When the VM entered each of its latest phases, oldest first (at most
    /// [`crate::printable::MAX_PHASE_TRANSITIONS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub phase_transition_timestamps: Vec<PhaseTransition>,
    /// The latest failure of a run or of its preparation, with how many
    /// times in a row it happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<FailureRecord>,
    /// The hypervisor node the VM is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The node that holds the VM's node-local disks (`emptyDisk` files and
    /// `image` overlays), set by the operator when it first binds a VM that
    /// has any. The VM starts only there until it is deleted (its disks go
    /// with it) or this field is removed (the disks are given up and made
    /// anew on the next node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_node: Option<String>,
    /// Guest network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<InterfaceStatus>,
    /// Ready, Scheduled, Paused, `NodeLost`, ... with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// When the current guest run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// How many times the guest was restarted.
    #[serde(default)]
    pub restart_count: i32,
    /// The generation of the spec this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
