//! The operator tests' world: the real `kubevmm-operator` binary against
//! the shared private control plane, with the test playing the node side
//! (`HypervisorNode`s with status, renewed heartbeat Leases).
#![allow(dead_code, unused_imports)] // each test binary uses its own subset

pub use std::collections::{BTreeMap, BTreeSet};
pub use std::io::{Read, Write};
pub use std::path::PathBuf;
pub use std::process::{Child, Command, Stdio};
pub use std::sync::{Arc, Mutex};
pub use std::time::{Duration, Instant};

pub use k8s_openapi::api::coordination::v1::Lease;
pub use k8s_openapi::api::core::v1::Namespace;
pub use k8s_openapi::api::events::v1::Event;
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
pub use k8s_openapi::jiff::Timestamp;
pub use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
pub use kube::ResourceExt;
pub use kubevmm_crds::contract;
pub use kubevmm_crds::{HypervisorNode, VirtualMachine, VmPhase};
pub use kubevmm_e2e::{bin_path, ControlPlane, Daemon};
pub use serde_json::json;

pub const DEADLINE: Duration = Duration::from_secs(90);
pub const GI: u64 = 1 << 30;

/// One running operator process, killed (SIGKILL) when dropped.
pub struct Operator {
    pub daemon: Daemon,
    pub id: String,
    pub metrics_port: u16,
}

impl Operator {
    pub fn start(cp: &ControlPlane, ns: &str, id: &str) -> Self {
        let port = kubevmm_e2e::free_port().expect("free port");
        let mut cmd =
            kubevmm_e2e::operator_command(cp, ns, &format!("kubevmm-operator-{ns}"), port);
        cmd.args([
            "--id",
            id,
            "--node-selector",
            &format!("kubevmm.io/test={ns}"),
            "--log-level",
            "info",
            // These tests count capacity one vCPU to one vCPU.
            "--cpu-overcommit",
            "1",
        ]);
        let log = cp.dir().join(format!("operator-{ns}-{id}.log"));
        Self {
            daemon: Daemon::start(cmd, log),
            id: id.to_string(),
            metrics_port: port,
        }
    }

    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// GET a path on the metrics address; `None` while it does not answer.
    pub fn http_get(&self, path: &str) -> Option<String> {
        kubevmm_e2e::http_get(&format!("127.0.0.1:{}", self.metrics_port), path)
    }

    pub fn log_tail(&self) -> String {
        kubevmm_e2e::tail(&self.daemon.output())
    }
}

/// Value of the `kubevmm_operator_leader` gauge, `None` while unreachable.
pub fn leader_gauge(op: &Operator) -> Option<i64> {
    op.http_get("/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix("kubevmm_operator_leader "))
        .and_then(|v| v.trim().parse().ok())
}

/// Sum of the samples of a metric whose series start with `prefix` (e.g.
/// `kubevmm_operator_reconcile_total{`), `None` while unreachable.
pub fn metric_sum(op: &Operator, prefix: &str) -> Option<u64> {
    let text = op.http_get("/metrics")?;
    Some(
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .sum(),
    )
}

/// Completed reconcile passes (success and error) of this operator.
pub fn passes(op: &Operator) -> Option<u64> {
    metric_sum(op, "kubevmm_operator_reconcile_total{")
}

/// Waits until `op` has completed two more passes than now: at least one
/// of them started after this call, so whatever the test wrote before has
/// been seen by a full pass.
pub async fn await_full_pass(op: &Operator, others: &[&Operator]) {
    let start = wait_for("the pass counter", others, || async {
        passes(op).ok_or_else(|| "no /metrics".to_string())
    })
    .await;
    wait_for("two more reconcile passes", others, || async {
        match passes(op) {
            Some(n) if n >= start + 2 => Ok(()),
            other => Err(format!("passes {other:?}, started at {start}")),
        }
    })
    .await;
}

/// The node side of one test: `HypervisorNode`s and their heartbeats.
pub struct Nodes {
    pub ns: String,
    pub client: kube::Client,
    /// Nodes whose Lease is renewed.
    pub beating: Arc<Mutex<BTreeSet<String>>>,
}

impl Nodes {
    pub async fn new(client: kube::Client, ns: &str) -> Self {
        let nsapi: Api<Namespace> = Api::all(client.clone());
        let _ = nsapi
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": contract::LEASE_NAMESPACE}}))
                    .expect("namespace"),
            )
            .await;
        let beating: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let leases: Api<Lease> = Api::namespaced(client.clone(), contract::LEASE_NAMESPACE);
        let b = beating.clone();
        tokio::spawn(async move {
            loop {
                let names: Vec<String> = b.lock().expect("lock").iter().cloned().collect();
                for n in names {
                    let patch = json!({"spec": {"renewTime": MicroTime(Timestamp::now())}});
                    let _ = leases
                        .patch(
                            &contract::node_lease_name(&n),
                            &PatchParams::default(),
                            &Patch::Merge(patch),
                        )
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Self {
            ns: ns.to_string(),
            client,
            beating,
        }
    }

    /// Creates a ready node (name prefixed with the namespace) and starts its heartbeat.
    pub async fn add(
        &self,
        short: &str,
        cpus: u32,
        memory: u64,
        labels: &[(&str, &str)],
    ) -> String {
        let name = format!("{}-{short}", self.ns);
        let mut l: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        l.insert("kubevmm.io/test".into(), self.ns.clone());
        let api: Api<HypervisorNode> = Api::all(self.client.clone());
        let node: HypervisorNode = serde_json::from_value(json!({
            "apiVersion": "kubevmm.io/v1alpha1", "kind": "HypervisorNode",
            "metadata": {"name": name, "labels": l}, "spec": {}
        }))
        .expect("node");
        api.create(&PostParams::default(), &node)
            .await
            .expect("create HypervisorNode");
        let status = json!({
            "apiVersion": "kubevmm.io/v1alpha1", "kind": "HypervisorNode",
            "metadata": {"name": name},
            "status": {
                "kvm": {"available": true, "kind": "software", "module": "kvm_pvm"},
                "capacity": {"cpus": cpus, "memory": memory.to_string()},
                "allocatable": {"cpus": cpus, "memory": memory.to_string()},
                "runningVms": 0,
                "agentVersion": "test",
            }
        });
        api.patch_status(
            &name,
            &PatchParams::apply(contract::MANAGER_NODE).force(),
            &Patch::Apply(status),
        )
        .await
        .expect("node status");
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), contract::LEASE_NAMESPACE);
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": contract::node_lease_name(&name), "namespace": contract::LEASE_NAMESPACE},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 3, "renewTime": MicroTime(Timestamp::now())}
        }))
        .expect("lease");
        leases
            .create(&PostParams::default(), &lease)
            .await
            .expect("create heartbeat Lease");
        self.beating.lock().expect("lock").insert(name.clone());
        name
    }

    pub fn stop_heartbeat(&self, node: &str) {
        self.beating.lock().expect("lock").remove(node);
    }

    pub fn resume_heartbeat(&self, node: &str) {
        self.beating.lock().expect("lock").insert(node.to_string());
    }
}

pub async fn setup(prefix: &str) -> (&'static ControlPlane, kube::Client, String, Nodes) {
    let cp = tokio::task::spawn_blocking(ControlPlane::shared)
        .await
        .expect("control plane");
    let client = cp.client().await.expect("client");
    let ns = {
        let p = prefix.to_string();
        tokio::task::spawn_blocking(move || ControlPlane::shared().namespace(&p))
            .await
            .expect("namespace")
    };
    let nodes = Nodes::new(client.clone(), &ns).await;
    (cp, client, ns, nodes)
}

pub async fn create_vm(
    client: &kube::Client,
    ns: &str,
    name: &str,
    cpus: u32,
    memory: &str,
    extra: serde_json::Value,
) {
    let mut spec = json!({
        "cpus": cpus, "memory": memory,
        "boot": {"kernel": {"path": "/var/lib/kubevmm/boot/vmlinux"}}
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    let vm: VirtualMachine = serde_json::from_value(json!({
        "apiVersion": "kubevmm.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": ns}, "spec": spec
    }))
    .expect("vm");
    Api::<VirtualMachine>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &vm)
        .await
        .expect("create VirtualMachine");
}

pub async fn get_vm(client: &kube::Client, ns: &str, name: &str) -> Option<VirtualMachine> {
    Api::<VirtualMachine>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .expect("get VirtualMachine")
}

/// Polls `check` until it returns `Some`, or panics after the deadline with
/// the last state it saw.
pub async fn wait_for<T, F, Fut>(what: &str, ops: &[&Operator], mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < DEADLINE {
        match check().await {
            Ok(v) => return v,
            Err(state) => last = state,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs: Vec<String> = ops
        .iter()
        .map(|o| format!("--- operator {} log tail:\n{}", o.id, o.log_tail()))
        .collect();
    panic!(
        "timed out waiting for {what}; last seen: {last}\n{}",
        logs.join("\n")
    );
}

pub fn cond(vm: &VirtualMachine, ty: &str) -> Option<(String, String, String)> {
    vm.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == ty)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub fn describe(vm: &VirtualMachine) -> String {
    summary(vm, true)
}

/// What a pass decides for the VM: `describe` without the conditions'
/// messages (a Pending VM's message names each node's state at the time,
/// which moves with heartbeats even when nothing is placed differently).
pub fn placement(vm: &VirtualMachine) -> String {
    summary(vm, false)
}

fn summary(vm: &VirtualMachine, messages: bool) -> String {
    let s = vm.status.clone().unwrap_or_default();
    format!(
        "{}: label={:?} nodeName={:?} phase={:?} restarts={} conditions={:?} finalizers={:?}",
        vm.name_any(),
        vm.labels().get(contract::LABEL_NODE),
        s.node_name,
        s.phase,
        s.restart_count,
        s.conditions
            .iter()
            .map(|c| {
                let head = format!("{}={} {}", c.type_, c.status, c.reason);
                if messages {
                    format!("{head} {:?}", c.message)
                } else {
                    head
                }
            })
            .collect::<Vec<_>>(),
        vm.finalizers()
    )
}

/// Waits until the VM is bound (label and nodeName agree, phase Scheduled,
/// Scheduled=True) and returns the node.
pub async fn wait_bound(client: &kube::Client, ns: &str, name: &str, ops: &[&Operator]) -> String {
    wait_for(&format!("{name} to be bound"), ops, || async {
        let Some(vm) = get_vm(client, ns, name).await else {
            return Err("absent".into());
        };
        let label = vm.labels().get(contract::LABEL_NODE).cloned();
        let status = vm.status.clone().unwrap_or_default();
        match (&label, &status.node_name) {
            (Some(l), Some(n))
                if l == n
                    && status.phase == Some(VmPhase::Scheduled)
                    && cond(&vm, contract::condition::SCHEDULED).is_some_and(|c| c.0 == "True") =>
            {
                Ok(l.clone())
            }
            _ => Err(describe(&vm)),
        }
    })
    .await
}

/// Waits until the VM is Pending and unschedulable; returns the message.
pub async fn wait_unschedulable(
    client: &kube::Client,
    ns: &str,
    name: &str,
    ops: &[&Operator],
    must_contain: &[&str],
) -> String {
    wait_for(&format!("{name} to be unschedulable"), ops, || async {
        let vm = get_vm(client, ns, name).await.ok_or("absent")?;
        let status = vm.status.clone().unwrap_or_default();
        match cond(&vm, contract::condition::SCHEDULED) {
            Some((s, r, m))
                if s == "False"
                    && r == "Unschedulable"
                    && status.phase == Some(VmPhase::Pending)
                    && vm.labels().get(contract::LABEL_NODE).is_none()
                    && must_contain.iter().all(|x| m.contains(x)) =>
            {
                Ok(m)
            }
            _ => Err(describe(&vm)),
        }
    })
    .await
}

/// Plays node-vmm reporting the VM's guest Running (its own status code).
pub async fn node_reports_running(client: &kube::Client, ns: &str, name: &str) {
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
    let vm = api.get(name).await.expect("get VirtualMachine");
    kubevmm_e2e::node_sim::report_running(&api, &vm)
        .await
        .expect("node-vmm's status apply");
}

/// Plays node-vmm finishing a deletion: removes the finalizer.
pub async fn node_releases(client: &kube::Client, ns: &str, name: &str) {
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
    let Some(vm) = api.get_opt(name).await.expect("get") else {
        return;
    };
    let fins: Vec<String> = vm
        .finalizers()
        .iter()
        .filter(|f| *f != contract::FINALIZER)
        .cloned()
        .collect();
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": fins}})),
    )
    .await
    .expect("remove finalizer as node-vmm");
}
