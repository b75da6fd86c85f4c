//! This node as the cluster sees it: the `HypervisorNode` object (KVM,
//! CPU model, capacity, allocatable, running VMs, version, heartbeat) and
//! the heartbeat Lease in `kubevmm-system`.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use kubevmm_crds::contract::{node_lease_name, ConditionStatus, LEASE_NAMESPACE, MANAGER_NODE};
use kubevmm_crds::node::{KvmInfo, NodeResources};
use kubevmm_crds::quantity::format_bytes;
use kubevmm_crds::{HypervisorNode, HypervisorNodeSpec, HypervisorNodeStatus};
use kubevmm_vmm::host_check::{self, KvmReport};

/// Default validity of the heartbeat Lease (as the kubelet's); renewed every third of it.
pub const DEFAULT_LEASE_SECONDS: i32 = 40;

/// Errors talking about this node to the API server.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// An API call failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// kube-rs error.
        source: kube::Error,
    },
}

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Api { what, source }
}

/// What is held back from guests.
#[derive(Debug, Clone, Copy)]
pub struct Reserve {
    /// vCPUs kept for the host.
    pub cpus: u32,
    /// Bytes kept for the host.
    pub memory: u64,
}

/// Host capacity: online CPUs and total memory.
///
/// The host's, not the agent's: `available_parallelism` would apply the
/// agent pod's own CPU limit (its cgroup quota), and guests do not run in
/// the agent's cgroup.
pub fn capacity() -> (u32, u64) {
    // SAFETY: sysconf has no memory effects; it returns -1 on error.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let cpus = u32::try_from(online).ok().filter(|n| *n > 0).unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    (cpus, mem_kib * 1024)
}

/// Builds the status node-vmm reports (pure apart from the inputs).
pub fn build_status(
    kvm: &KvmReport,
    cpu_model: Option<String>,
    capacity: (u32, u64),
    reserve: Reserve,
    running_vms: i32,
    now: Timestamp,
) -> HypervisorNodeStatus {
    let (cpus, mem) = capacity;
    // Memory is reported in whole MiB so the quantity stays readable.
    let alloc_mem = (mem.saturating_sub(reserve.memory) >> 20) << 20;
    HypervisorNodeStatus {
        kvm: Some(KvmInfo {
            available: kvm.usable(),
            kind: kvm.kind.as_str().into(),
            module: kvm.module.clone(),
            api_version: kvm.api_version,
            missing_capabilities: kvm.missing.iter().map(|(n, _)| (*n).to_string()).collect(),
        }),
        cpu_model,
        capacity: Some(NodeResources {
            cpus,
            memory: Quantity(format_bytes((mem >> 20) << 20)),
        }),
        allocatable: Some(NodeResources {
            cpus: cpus.saturating_sub(reserve.cpus),
            memory: Quantity(format_bytes(alloc_mem)),
        }),
        running_vms,
        agent_version: Some(env!("CARGO_PKG_VERSION").into()),
        access_endpoint: None,
        last_heartbeat_time: Some(Time(now)),
        conditions: Vec::new(),
    }
}

/// A condition of the node as the agent sees it now (e.g. whether its
/// masquerade network can be set up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCondition {
    /// Condition type.
    pub type_: &'static str,
    /// `True` when fine.
    pub ok: bool,
    /// Reason.
    pub reason: &'static str,
    /// What the administrator should know.
    pub message: String,
}

/// Registers the node and keeps its status and Lease current.
#[derive(Clone)]
pub struct NodeReporter {
    client: Client,
    name: String,
    reserve: Reserve,
    lease_seconds: i32,
    /// `status.accessEndpoint`: where the operator reaches the access server.
    access_endpoint: Option<String>,
    /// Capacity reported instead of this host's (simulated nodes).
    capacity: Option<(u32, u64)>,
    /// When each condition last changed (type -> (ok, time)).
    since: std::sync::Arc<std::sync::Mutex<BTreeMap<&'static str, (bool, Timestamp)>>>,
}

impl std::fmt::Debug for NodeReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeReporter")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl NodeReporter {
    /// A reporter for node `name`.
    pub fn new(client: Client, name: String, reserve: Reserve, lease_seconds: i32) -> Self {
        Self {
            client,
            name,
            reserve,
            lease_seconds,
            access_endpoint: None,
            capacity: None,
            since: std::sync::Arc::default(),
        }
    }

    /// Advertises the access server at `endpoint` (`address:port`).
    #[must_use]
    pub fn with_access_endpoint(mut self, endpoint: Option<String>) -> Self {
        self.access_endpoint = endpoint;
        self
    }

    /// Reports `cpus` and `memory` bytes as capacity instead of this
    /// host's: a simulated node (`bench-scale` runs 100 of them on one
    /// host, as Kubernetes' kubemark runs hollow kubelets).
    #[must_use]
    pub fn with_capacity(mut self, cpus: u32, memory: u64) -> Self {
        self.capacity = Some((cpus, memory));
        self
    }

    /// How often to renew: a third of the Lease, at least every second.
    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs((self.lease_seconds / 3).max(1) as u64)
    }

    /// Creates the `HypervisorNode` (with the Kubernetes Node's labels when
    /// that Node exists) and the Lease namespace if missing.
    ///
    /// An existing `HypervisorNode` is left as it is: after registration its
    /// `spec.cordoned`, labels and annotations belong to the administrator,
    /// and the chart's node-restriction policy refuses the agent any write
    /// but its status (relabel it with `kubectl label hvnode`; delete it to
    /// have the agent register it afresh from its Node's labels).
    pub async fn register(&self) -> Result<(), NodeError> {
        let ns_api: Api<Namespace> = Api::all(self.client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(LEASE_NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match ns_api.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            // 409: it exists. 403: this agent may not create namespaces (the
            // chart creates it); a missing namespace then shows in the Lease write.
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 403 => {}
            Err(e) => return Err(api(format!("create namespace {LEASE_NAMESPACE}"))(e)),
        }
        let hv_api = Api::<HypervisorNode>::all(self.client.clone());
        let what = || format!("register HypervisorNode {}", self.name);
        if hv_api
            .get_opt(&self.name)
            .await
            .map_err(api(what()))?
            .is_some()
        {
            return Ok(());
        }
        let labels: BTreeMap<String, String> = match Api::<Node>::all(self.client.clone())
            .get_opt(&self.name)
            .await
        {
            Ok(Some(n)) => n.metadata.labels.unwrap_or_default(),
            _ => BTreeMap::new(),
        };
        let mut hv = HypervisorNode::new(&self.name, HypervisorNodeSpec::default());
        hv.metadata.labels = Some(labels);
        let pp = PostParams {
            field_manager: Some(MANAGER_NODE.into()),
            ..PostParams::default()
        };
        match hv_api.create(&pp, &hv).await {
            Ok(_) => Ok(()),
            // Registered concurrently (a previous agent process): fine.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(api(what())(e)),
        }
    }

    /// Renews the Lease and writes the status with `running_vms`
    /// (registering again if the `HypervisorNode` was deleted).
    pub async fn heartbeat(
        &self,
        running_vms: i32,
        conditions: &[NodeCondition],
    ) -> Result<(), NodeError> {
        let now = Timestamp::now();
        // The Lease says this agent is alive: renewed whatever becomes of
        // the status write (the operator must not take a node whose
        // HypervisorNode was deleted for dead while its guests run).
        let lease = self.renew_lease(now).await;
        let status = match self.write_status(running_vms, conditions, now).await {
            // Deleted under us: register again, as a kubelet re-creates its Node.
            Err(NodeError::Api {
                source: kube::Error::Api(s),
                ..
            }) if s.code == 404 => {
                tracing::warn!(node = %self.name, "HypervisorNode was deleted; registering again");
                match self.register().await {
                    Ok(()) => self.write_status(running_vms, conditions, now).await,
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        lease.and(status)
    }

    /// Writes the status only (the running-VM count changed between heartbeats).
    pub async fn update_status(
        &self,
        running_vms: i32,
        conditions: &[NodeCondition],
    ) -> Result<(), NodeError> {
        self.write_status(running_vms, conditions, Timestamp::now())
            .await
    }

    async fn write_status(
        &self,
        running_vms: i32,
        conditions: &[NodeCondition],
        now: Timestamp,
    ) -> Result<(), NodeError> {
        let mut status = build_status(
            &host_check::probe(),
            host_check::cpu_model(),
            self.capacity.unwrap_or_else(capacity),
            self.reserve,
            running_vms,
            now,
        );
        status.access_endpoint.clone_from(&self.access_endpoint);
        {
            let mut since = self
                .since
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            status.conditions = conditions
                .iter()
                .map(|c| {
                    let t = since.entry(c.type_).or_insert((c.ok, now));
                    if t.0 != c.ok {
                        *t = (c.ok, now);
                    }
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                        type_: c.type_.into(),
                        status: ConditionStatus::from_bool(c.ok).as_str().into(),
                        reason: c.reason.into(),
                        message: c.message.clone(),
                        last_transition_time: Time(t.1),
                        observed_generation: None,
                    }
                })
                .collect();
        }
        let body = serde_json::json!({
            "apiVersion": kubevmm_crds::API_VERSION,
            "kind": "HypervisorNode",
            "status": status,
        });
        Api::<HypervisorNode>::all(self.client.clone())
            .patch_status(
                &self.name,
                &PatchParams::apply(MANAGER_NODE).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(api(format!("update HypervisorNode {} status", self.name)))?;
        Ok(())
    }

    async fn renew_lease(&self, now: Timestamp) -> Result<(), NodeError> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(node_lease_name(&self.name)),
                namespace: Some(LEASE_NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.name.clone()),
                lease_duration_seconds: Some(self.lease_seconds),
                renew_time: Some(MicroTime(now)),
                ..LeaseSpec::default()
            }),
        };
        Api::<Lease>::namespaced(self.client.clone(), LEASE_NAMESPACE)
            .patch(
                &node_lease_name(&self.name),
                &PatchParams::apply(MANAGER_NODE).force(),
                &Patch::Apply(&lease),
            )
            .await
            .map_err(api(format!("renew Lease {}", node_lease_name(&self.name))))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubevmm_vmm::host_check::KvmKind;

    #[test]
    fn allocatable_subtracts_the_reserve() {
        let kvm = KvmReport {
            kind: KvmKind::Software,
            module: Some("kvm_pvm".into()),
            api_version: Some(12),
            present: vec![],
            missing: vec![],
            problem: None,
        };
        let s = build_status(
            &kvm,
            None,
            (8, 16 << 30),
            Reserve {
                cpus: 1,
                memory: 1 << 30,
            },
            3,
            Timestamp::UNIX_EPOCH,
        );
        let a = s.allocatable.expect("allocatable");
        assert_eq!(a.cpus, 7);
        assert_eq!(a.memory.0, "15Gi");
        assert_eq!(s.capacity.expect("capacity").memory.0, "16Gi");
        assert_eq!(s.kvm.expect("kvm").kind, "software");
        assert_eq!(s.running_vms, 3);
    }
}
