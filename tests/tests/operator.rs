//! The operator against a real control plane. The test plays the node side
//! (node-vmm): it creates `HypervisorNode`s with status and renews their
//! heartbeat Leases, and runs the real `kubevmm-operator` binary (built
//! beforehand: `cargo build -p kubevmm-operator`, which `make test` does).
//!
//! Each test is isolated in the shared control plane: its own namespace,
//! nodes labelled `kubevmm.io/test=<namespace>`, and operators started with
//! `--namespace`, `--node-selector` and their own leader Lease.
//! Every wait polls the API with a deadline; nothing asserts on timing.

// Scenario tests read best as one story each; node names a/b match the docs.
#![allow(clippy::too_many_lines, clippy::many_single_char_names)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use kubevmm_crds::contract;
use kubevmm_crds::{HypervisorNode, VirtualMachine, VmPhase};
use kubevmm_e2e::ControlPlane;
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(90);
const GI: u64 = 1 << 30;

fn operator_binary() -> PathBuf {
    // target/<profile>/deps/operator-<hash> → target/<profile>/kubevmm-operator
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target dir");
    let bin = dir.join("kubevmm-operator");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p kubevmm-operator` (make test does)",
        bin.display()
    );
    bin
}

/// One running operator process, killed (SIGKILL) when dropped.
struct Operator {
    child: Child,
    id: String,
    metrics_port: u16,
    log: PathBuf,
}

impl Operator {
    fn start(cp: &ControlPlane, ns: &str, id: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = cp.dir().join(format!("operator-{ns}-{id}.log"));
        let out = std::fs::File::create(&log).expect("operator log");
        let child = Command::new(operator_binary())
            .args([
                "--kubeconfig",
                &cp.kubeconfig().display().to_string(),
                "--id",
                id,
                "--namespace",
                ns,
                "--node-selector",
                &format!("kubevmm.io/test={ns}"),
                "--leader-lease",
                &format!("kubevmm-operator-{ns}"),
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
                "--log-level",
                "info",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("start kubevmm-operator");
        Self {
            child,
            id: id.to_string(),
            metrics_port: port,
            log,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// GET a path on the metrics address; `None` while it does not answer.
    fn http_get(&self, path: &str) -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        Some(body)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// Value of the `kubevmm_operator_leader` gauge, `None` while unreachable.
fn leader_gauge(op: &Operator) -> Option<i64> {
    op.http_get("/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix("kubevmm_operator_leader "))
        .and_then(|v| v.trim().parse().ok())
}

/// Sum of the samples of a metric whose series start with `prefix` (e.g.
/// `kubevmm_operator_reconcile_total{`), `None` while unreachable.
fn metric_sum(op: &Operator, prefix: &str) -> Option<u64> {
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
fn passes(op: &Operator) -> Option<u64> {
    metric_sum(op, "kubevmm_operator_reconcile_total{")
}

/// Waits until `op` has completed two more passes than now: at least one
/// of them started after this call, so whatever the test wrote before has
/// been seen by a full pass.
async fn await_full_pass(op: &Operator, others: &[&Operator]) {
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

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The node side of one test: `HypervisorNode`s and their heartbeats.
struct Nodes {
    ns: String,
    client: kube::Client,
    /// Nodes whose Lease is renewed.
    beating: Arc<Mutex<BTreeSet<String>>>,
}

impl Nodes {
    async fn new(client: kube::Client, ns: &str) -> Self {
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
    async fn add(&self, short: &str, cpus: u32, memory: u64, labels: &[(&str, &str)]) -> String {
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

    fn stop_heartbeat(&self, node: &str) {
        self.beating.lock().expect("lock").remove(node);
    }

    fn resume_heartbeat(&self, node: &str) {
        self.beating.lock().expect("lock").insert(node.to_string());
    }
}

async fn setup(prefix: &str) -> (&'static ControlPlane, kube::Client, String, Nodes) {
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

async fn create_vm(
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

async fn get_vm(client: &kube::Client, ns: &str, name: &str) -> Option<VirtualMachine> {
    Api::<VirtualMachine>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .expect("get VirtualMachine")
}

/// Polls `check` until it returns `Some`, or panics after the deadline with
/// the last state it saw.
async fn wait_for<T, F, Fut>(what: &str, ops: &[&Operator], mut check: F) -> T
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

fn cond(vm: &VirtualMachine, ty: &str) -> Option<(String, String, String)> {
    vm.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == ty)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn describe(vm: &VirtualMachine) -> String {
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
            .map(|c| format!("{}={} {} {:?}", c.type_, c.status, c.reason, c.message))
            .collect::<Vec<_>>(),
        vm.finalizers()
    )
}

/// Waits until the VM is bound (label and nodeName agree, phase Scheduled,
/// Scheduled=True) and returns the node.
async fn wait_bound(client: &kube::Client, ns: &str, name: &str, ops: &[&Operator]) -> String {
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
async fn wait_unschedulable(
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

/// Plays node-vmm finishing a deletion: removes the finalizer.
async fn node_releases(client: &kube::Client, ns: &str, name: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_vm_to_the_node_with_room() {
    let (cp, client, ns, nodes) = setup("op-bind").await;
    let small = nodes.add("small", 2, 2 * GI, &[]).await;
    let big = nodes.add("big", 8, 8 * GI, &[]).await;
    let op = Operator::start(cp, &ns, "a");
    create_vm(&client, &ns, "web", 4, "1Gi", json!({})).await;
    let node = wait_bound(&client, &ns, "web", &[&op]).await;
    assert_eq!(node, big, "4 vCPUs only fit on {big}, not {small}");
    let vm = get_vm(&client, &ns, "web").await.expect("vm");
    assert!(
        vm.finalizers().iter().any(|f| f == contract::FINALIZER),
        "{}",
        describe(&vm)
    );
    // A Scheduled Event was published.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    wait_for("a Scheduled Event", &[&op], || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .find(|e| e.reason.as_deref() == Some("Scheduled"))
            .map(|_| ())
            .ok_or_else(|| format!("{} events", list.items.len()))
    })
    .await;
    // Metrics answer.
    let metrics = op.http_get("/metrics").unwrap_or_default();
    assert_eq!(leader_gauge(&op), Some(1), "{metrics}");
    assert!(
        metrics.contains("kubevmm_operator_scheduling_duration_seconds_count 1"),
        "{metrics}"
    );
    assert!(op
        .http_get("/readyz")
        .unwrap_or_default()
        .starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_until_another_vm_is_deleted() {
    let (cp, client, ns, nodes) = setup("op-pending").await;
    let node = nodes.add("only", 2, 2 * GI, &[]).await;
    let op = Operator::start(cp, &ns, "a");
    create_vm(&client, &ns, "first", 2, "1Gi", json!({})).await;
    assert_eq!(wait_bound(&client, &ns, "first", &[&op]).await, node);
    create_vm(&client, &ns, "second", 2, "1Gi", json!({})).await;
    let msg = wait_unschedulable(
        &client,
        &ns,
        "second",
        &[&op],
        &[
            "0/1 nodes can run 2 vCPUs and 1Gi",
            &format!("{node} has 0 vCPUs free"),
        ],
    )
    .await;
    assert_eq!(
        msg,
        format!("0/1 nodes can run 2 vCPUs and 1Gi: {node} has 0 vCPUs free")
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    wait_for("a FailedScheduling Event", &[&op], || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .find(|e| e.reason.as_deref() == Some("FailedScheduling"))
            .map(|_| ())
            .ok_or_else(|| format!("{} events", list.items.len()))
    })
    .await;

    // Delete the first VM; play node-vmm stopping it and releasing the finalizer.
    Api::<VirtualMachine>::namespaced(client.clone(), &ns)
        .delete("first", &DeleteParams::default())
        .await
        .expect("delete first");
    node_releases(&client, &ns, "first").await;
    assert_eq!(wait_bound(&client, &ns, "second", &[&op]).await, node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_selector_and_cordon_are_honoured() {
    let (cp, client, ns, nodes) = setup("op-select").await;
    let cordoned = nodes.add("cordoned", 16, 32 * GI, &[("zone", "x")]).await;
    Api::<HypervisorNode>::all(client.clone())
        .patch(
            &cordoned,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cordoned": true}})),
        )
        .await
        .expect("cordon");
    let zone_x = nodes.add("zonex", 4, 4 * GI, &[("zone", "x")]).await;
    let plain = nodes.add("plain", 8, 8 * GI, &[]).await;
    let op = Operator::start(cp, &ns, "a");

    create_vm(
        &client,
        &ns,
        "in-x",
        1,
        "512Mi",
        json!({"nodeSelector": {"zone": "x"}}),
    )
    .await;
    assert_eq!(wait_bound(&client, &ns, "in-x", &[&op]).await, zone_x);
    create_vm(&client, &ns, "anywhere", 1, "512Mi", json!({})).await;
    assert_eq!(
        wait_bound(&client, &ns, "anywhere", &[&op]).await,
        plain,
        "the cordoned node has the most memory but must not be chosen"
    );
    create_vm(
        &client,
        &ns,
        "in-y",
        1,
        "512Mi",
        json!({"nodeSelector": {"zone": "y"}}),
    )
    .await;
    let msg = wait_unschedulable(&client, &ns, "in-y", &[&op], &[]).await;
    assert!(
        msg.starts_with("0/3 nodes can run 1 vCPU and 512Mi: "),
        "{msg}"
    );
    assert!(msg.contains(&format!("{cordoned} is cordoned")), "{msg}");
    assert!(
        msg.contains(&format!("{zone_x} does not match nodeSelector zone=y")),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_heartbeat_marks_node_lost_and_fencing_replaces_always_vms() {
    let (cp, client, ns, nodes) = setup("op-lost").await;
    let a = nodes.add("a", 4, 8 * GI, &[]).await;
    let op = Operator::start(cp, &ns, "a");
    create_vm(
        &client,
        &ns,
        "keep",
        1,
        "1Gi",
        json!({"runStrategy": "Always"}),
    )
    .await;
    create_vm(
        &client,
        &ns,
        "once",
        1,
        "1Gi",
        json!({"runStrategy": "Once"}),
    )
    .await;
    assert_eq!(wait_bound(&client, &ns, "keep", &[&op]).await, a);
    assert_eq!(wait_bound(&client, &ns, "once", &[&op]).await, a);
    // A second node appears only now, so both VMs are on a.
    let b = nodes.add("b", 4, 4 * GI, &[]).await;

    // a stops heartbeating: NodeLost, Ready=Unknown, phase and binding kept.
    nodes.stop_heartbeat(&a);
    for name in ["keep", "once"] {
        wait_for(&format!("NodeLost on {name}"), &[&op], || async {
            let vm = get_vm(&client, &ns, name).await.ok_or("absent")?;
            let lost = cond(&vm, contract::condition::NODE_LOST);
            let ready = cond(&vm, contract::condition::READY);
            match (lost, ready) {
                (Some((s, r, m)), Some((rs, _, _)))
                    if s == "True"
                        && r == "HeartbeatExpired"
                        && m.contains("last heartbeat at")
                        && rs == "Unknown" =>
                {
                    Ok(())
                }
                _ => Err(describe(&vm)),
            }
        })
        .await;
        let vm = get_vm(&client, &ns, name).await.expect("vm");
        assert_eq!(
            vm.labels().get(contract::LABEL_NODE),
            Some(&a),
            "{}",
            describe(&vm)
        );
        assert_eq!(
            vm.status.as_ref().and_then(|s| s.phase),
            Some(VmPhase::Scheduled),
            "phase is left alone: {}",
            describe(&vm)
        );
    }

    // Heartbeat back: NodeLost cleared.
    nodes.resume_heartbeat(&a);
    wait_for("NodeLost cleared", &[&op], || async {
        let vm = get_vm(&client, &ns, "keep").await.ok_or("absent")?;
        match cond(&vm, contract::condition::NODE_LOST) {
            Some((s, _, _)) if s == "False" && cond(&vm, contract::condition::READY).is_none() => {
                Ok(())
            }
            _ => Err(describe(&vm)),
        }
    })
    .await;

    // Lost again, then fenced: the Always VM moves to b, the Once VM fails.
    nodes.stop_heartbeat(&a);
    wait_for("NodeLost again", &[&op], || async {
        let vm = get_vm(&client, &ns, "keep").await.ok_or("absent")?;
        match cond(&vm, contract::condition::NODE_LOST) {
            Some((s, _, _)) if s == "True" => Ok(()),
            _ => Err(describe(&vm)),
        }
    })
    .await;
    let vm = get_vm(&client, &ns, "keep").await.expect("vm");
    assert_eq!(
        vm.labels().get(contract::LABEL_NODE),
        Some(&a),
        "not moved before fencing"
    );
    Api::<HypervisorNode>::all(client.clone())
        .patch(
            &a,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {contract::ANNOTATION_FENCED: "true"}}}),
            ),
        )
        .await
        .expect("fence");
    wait_for("the Always VM re-placed on b", &[&op], || async {
        let vm = get_vm(&client, &ns, "keep").await.ok_or("absent")?;
        if vm.labels().get(contract::LABEL_NODE) == Some(&b) {
            Ok(())
        } else {
            Err(describe(&vm))
        }
    })
    .await;
    assert_eq!(wait_bound(&client, &ns, "keep", &[&op]).await, b);
    let vm = get_vm(&client, &ns, "keep").await.expect("vm");
    assert_eq!(
        vm.status.as_ref().map(|s| s.restart_count),
        Some(1),
        "{}",
        describe(&vm)
    );
    wait_for("the Once VM failed and released", &[&op], || async {
        let vm = get_vm(&client, &ns, "once").await.ok_or("absent")?;
        let s = vm.status.clone().unwrap_or_default();
        if s.phase == Some(VmPhase::Failed)
            && s.node_name.is_none()
            && vm.labels().get(contract::LABEL_NODE).is_none()
        {
            Ok(())
        } else {
            Err(describe(&vm))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_vm_is_released_and_placed_again_when_asked_to_run() {
    let (cp, client, ns, nodes) = setup("op-release").await;
    let a = nodes.add("a", 2, 2 * GI, &[]).await;
    let op = Operator::start(cp, &ns, "a");
    create_vm(&client, &ns, "vm", 2, "1Gi", json!({})).await;
    assert_eq!(wait_bound(&client, &ns, "vm", &[&op]).await, a);
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    api.patch(
        "vm",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"runStrategy": "Halted"}})),
    )
    .await
    .expect("halt");
    // node-vmm stops the guest and reports it.
    api.patch_status(
        "vm",
        &PatchParams::apply(contract::MANAGER_NODE).force(),
        &Patch::Apply(json!({
            "apiVersion": "kubevmm.io/v1alpha1", "kind": "VirtualMachine",
            "status": {"phase": "Stopped"}
        })),
    )
    .await
    .expect("node-vmm status");
    wait_for("the binding released", &[&op], || async {
        let vm = get_vm(&client, &ns, "vm").await.ok_or("absent")?;
        let s = vm.status.clone().unwrap_or_default();
        match cond(&vm, contract::condition::SCHEDULED) {
            Some((st, r, _))
                if st == "False"
                    && r == "Released"
                    && s.node_name.is_none()
                    && s.phase == Some(VmPhase::Stopped)
                    && vm.labels().get(contract::LABEL_NODE).is_none() =>
            {
                Ok(())
            }
            _ => Err(describe(&vm)),
        }
    })
    .await;
    api.patch(
        "vm",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"runStrategy": "Always"}})),
    )
    .await
    .expect("run again");
    assert_eq!(wait_bound(&client, &ns, "vm", &[&op]).await, a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_unbound_vm_removes_the_finalizer() {
    let (cp, client, ns, _nodes) = setup("op-delete").await;
    let op = Operator::start(cp, &ns, "a");
    create_vm(&client, &ns, "nowhere", 1, "128Mi", json!({})).await;
    wait_unschedulable(
        &client,
        &ns,
        "nowhere",
        &[&op],
        &["no HypervisorNode exists"],
    )
    .await;
    let vm = get_vm(&client, &ns, "nowhere").await.expect("vm");
    assert!(
        vm.finalizers().iter().any(|f| f == contract::FINALIZER),
        "{}",
        describe(&vm)
    );
    Api::<VirtualMachine>::namespaced(client.clone(), &ns)
        .delete("nowhere", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for("the VM to be gone", &[&op], || async {
        match get_vm(&client, &ns, "nowhere").await {
            None => Ok(()),
            Some(vm) => Err(describe(&vm)),
        }
    })
    .await;
}

async fn lease_holder(client: &kube::Client, ns: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), contract::LEASE_NAMESPACE)
        .get_opt(&format!("kubevmm-operator-{ns}"))
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader_and_failover_without_duplicates() {
    let (cp, client, ns, nodes) = setup("op-leader").await;
    // Room for exactly five 1-vCPU VMs in total.
    let n1 = nodes.add("n1", 3, 8 * GI, &[]).await;
    let n2 = nodes.add("n2", 2, 8 * GI, &[]).await;
    let mut one = Operator::start(cp, &ns, "one");
    let mut two = Operator::start(cp, &ns, "two");
    let leader = wait_for("a leader", &[&one, &two], || async {
        lease_holder(&client, &ns)
            .await
            .filter(|h| h == "one" || h == "two")
            .ok_or_else(|| "no holder".to_string())
    })
    .await;
    // Exactly one replica reports itself leader.
    wait_for("leader gauges", &[&one, &two], || async {
        let g = [leader_gauge(&one), leader_gauge(&two)];
        let mut sorted = g;
        sorted.sort_unstable();
        if sorted == [Some(0), Some(1)] {
            Ok(())
        } else {
            Err(format!("{g:?}"))
        }
    })
    .await;
    for i in 0..3 {
        create_vm(&client, &ns, &format!("vm-{i}"), 1, "256Mi", json!({})).await;
    }
    for i in 0..3 {
        wait_bound(&client, &ns, &format!("vm-{i}"), &[&one, &two]).await;
    }
    // SIGKILL the leader; create more VMs than fit while nobody leads.
    let (dead, survivor) = if leader == "one" {
        one.kill();
        (&one, &two)
    } else {
        two.kill();
        (&two, &one)
    };
    for i in 3..6 {
        create_vm(&client, &ns, &format!("vm-{i}"), 1, "256Mi", json!({})).await;
    }
    wait_for(
        "the other replica to take over",
        &[dead, survivor],
        || async {
            lease_holder(&client, &ns)
                .await
                .filter(|h| *h == survivor.id)
                .map(|_| ())
                .ok_or_else(|| "old holder".to_string())
        },
    )
    .await;
    // Converges: five bound, one pending, no node over its capacity, each
    // binding consistent (label == nodeName).
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    wait_for("five bound and one pending", &[dead, survivor], || async {
        let vms = api
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let mut per_node: BTreeMap<String, u32> = BTreeMap::new();
        let mut pending = 0;
        for vm in &vms.items {
            let s = vm.status.clone().unwrap_or_default();
            match (vm.labels().get(contract::LABEL_NODE), &s.node_name) {
                (Some(l), Some(n)) if l == n && s.phase == Some(VmPhase::Scheduled) => {
                    *per_node.entry(l.clone()).or_default() += 1;
                }
                (None, None) if s.phase == Some(VmPhase::Pending) => pending += 1,
                _ => return Err(describe(vm)),
            }
        }
        let ok = per_node.get(&n1) == Some(&3) && per_node.get(&n2) == Some(&2) && pending == 1;
        if ok {
            Ok(())
        } else {
            Err(format!("{per_node:?}, {pending} pending"))
        }
    })
    .await;
    // Stable: a later pass does not move or duplicate anything. Wait for
    // full passes of the survivor in between, or the check proves nothing
    // (node heartbeats trigger passes every 500 ms).
    let list = || async {
        let mut v: Vec<String> = api
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .iter()
            .map(describe)
            .collect();
        v.sort();
        v
    };
    let before = list().await;
    assert_eq!(
        leader_gauge(survivor),
        Some(1),
        "the survivor reports itself leader"
    );
    await_full_pass(survivor, &[dead]).await;
    let after = list().await;
    assert_eq!(before.len(), 6);
    assert_eq!(before, after, "a pass changed a converged state");
}

/// Writes `status.nodeName` of `vm` by server-side apply as field manager
/// `manager` (the operator's, or an impostor's).
async fn apply_node_name(client: &kube::Client, ns: &str, vm: &str, node: &str, manager: &str) {
    Api::<VirtualMachine>::namespaced(client.clone(), ns)
        .patch_status(
            vm,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(json!({
                "apiVersion": "kubevmm.io/v1alpha1", "kind": "VirtualMachine",
                "status": {"nodeName": node, "phase": "Scheduled"}
            })),
        )
        .await
        .expect("write status.nodeName");
}

async fn set_node_label(client: &kube::Client, ns: &str, vm: &str, node: &str) {
    Api::<VirtualMachine>::namespaced(client.clone(), ns)
        .patch(
            vm,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {contract::LABEL_NODE: node}}})),
        )
        .await
        .expect("set the node label");
}

async fn events_with_reason(client: &kube::Client, ns: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

/// Item 2 (operator side): the label alone is not a binding. A VM labelled
/// for a cordoned node by somebody else (no admission policy here), or
/// labelled and given a `status.nodeName` by another field manager, is
/// placed by the scheduler like any other, and its label corrected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_label_the_operator_did_not_write_binds_nothing() {
    let (cp, client, ns, nodes) = setup("op-forged").await;
    let cordoned = nodes.add("cordoned", 16, 32 * GI, &[]).await;
    Api::<HypervisorNode>::all(client.clone())
        .patch(
            &cordoned,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cordoned": true}})),
        )
        .await
        .expect("cordon");
    let open = nodes.add("open", 2, 2 * GI, &[]).await;
    // Self-binding, before any operator runs: the label only...
    create_vm(&client, &ns, "label-only", 1, "256Mi", json!({})).await;
    set_node_label(&client, &ns, "label-only", &cordoned).await;
    // ...and the label plus status.nodeName under another field manager.
    create_vm(&client, &ns, "both", 1, "256Mi", json!({})).await;
    apply_node_name(&client, &ns, "both", &cordoned, "attacker").await;
    set_node_label(&client, &ns, "both", &cordoned).await;

    let op = Operator::start(cp, &ns, "a");
    for vm in ["label-only", "both"] {
        assert_eq!(
            wait_bound(&client, &ns, vm, &[&op]).await,
            open,
            "{vm}: the cordoned node must not be used because of a label"
        );
    }
    wait_for("NodeLabelIgnored Events", &[&op], || async {
        let n = events_with_reason(&client, &ns, "NodeLabelIgnored")
            .await
            .len();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} events"))
        }
    })
    .await;
}

/// Item 2 (agent side): the real node agent runs only VMs whose
/// `status.nodeName` the operator wrote, whatever their label says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_only_vms_the_operator_bound() {
    let (cp, client, ns, _nodes) = setup("op-agent").await;
    let node = format!("{ns}-agent");
    // A kernel path outside the agent's allow-list: a VM the agent takes on
    // is reported Failed (reason InvalidSpec) without needing /dev/kvm.
    let spec = json!({"runStrategy": "Once", "boot": {"kernel": {"path": "/etc/hostname"}}});
    for vm in ["bound", "label-only", "foreign-status"] {
        create_vm(&client, &ns, vm, 1, "64Mi", spec.clone()).await;
    }
    apply_node_name(&client, &ns, "bound", &node, contract::MANAGER_OPERATOR).await;
    set_node_label(&client, &ns, "bound", &node).await;
    set_node_label(&client, &ns, "label-only", &node).await;
    apply_node_name(&client, &ns, "foreign-status", &node, "attacker").await;
    set_node_label(&client, &ns, "foreign-status", &node).await;

    let state = std::env::temp_dir().join(format!("kubevmm-e2e-{ns}"));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).expect("state dir");
    let mut cmd = Command::new(kubevmm_e2e::bin_path("node-vmm"));
    cmd.env("KUBECONFIG", cp.kubeconfig())
        .args(["agent", "--node-name", &node, "--state-dir"])
        .arg(state.join("run"))
        .args(["--lease-seconds", "6", "--metrics-addr"])
        .arg(format!(
            "127.0.0.1:{}",
            kubevmm_e2e::free_port().expect("port")
        ));
    let agent = kubevmm_e2e::Daemon::start(cmd, state.join("agent.log"));

    let start = Instant::now();
    let verdict = |name: &str| {
        agent.output().lines().any(|l| {
            l.contains("not bound to this node by the operator")
                && l.contains(&format!("vm={name}"))
        })
    };
    loop {
        let bound = get_vm(&client, &ns, "bound").await.expect("vm");
        let ran = cond(&bound, contract::condition::READY).is_some_and(|c| c.1 == "InvalidSpec");
        if ran && verdict("label-only") && verdict("foreign-status") {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the agent did not take on the bound VM and refuse the others: {}\n{}",
            describe(&bound),
            agent.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for name in ["label-only", "foreign-status"] {
        let vm = get_vm(&client, &ns, name).await.expect("vm");
        let phase = vm.status.as_ref().and_then(|s| s.phase);
        assert!(
            cond(&vm, contract::condition::READY).is_none()
                && matches!(phase, None | Some(VmPhase::Scheduled)),
            "the agent acted on {name}: {}",
            describe(&vm)
        );
    }
    drop(agent);
    kubevmm_e2e::kill_guests(&state);
    let _ = Api::<HypervisorNode>::all(client.clone())
        .delete(&node, &DeleteParams::default())
        .await;
}

/// Renews `node`'s Lease every 500 ms with `renewTime` = now + `skew`
/// seconds (a node agent whose clock is off), until the returned flag is
/// cleared.
fn skewed_heartbeat(client: &kube::Client, node: &str, skew: i64) -> Arc<Mutex<bool>> {
    let run = Arc::new(Mutex::new(true));
    let leases: Api<Lease> = Api::namespaced(client.clone(), contract::LEASE_NAMESPACE);
    let (name, flag) = (contract::node_lease_name(node), run.clone());
    tokio::spawn(async move {
        while *flag.lock().expect("lock") {
            let t = Timestamp::now()
                .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(skew))
                .expect("time");
            let patch = json!({"spec": {"renewTime": MicroTime(t)}});
            let _ = leases
                .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    run
}

/// Item 11a: liveness is measured on the operator's clock. A node whose
/// clock is an hour behind but which heartbeats is ready; one whose clock
/// is an hour ahead and stopped heartbeating is lost after a Lease duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_liveness_uses_the_operators_clock_not_the_nodes() {
    let (cp, client, ns, nodes) = setup("op-clock").await;
    let a = nodes.add("a", 4, 4 * GI, &[]).await;
    nodes.stop_heartbeat(&a);
    let behind = skewed_heartbeat(&client, &a, -3600);
    let op = Operator::start(cp, &ns, "a");
    create_vm(
        &client,
        &ns,
        "vm",
        1,
        "256Mi",
        json!({"runStrategy": "Always"}),
    )
    .await;
    assert_eq!(
        wait_bound(&client, &ns, "vm", &[&op]).await,
        a,
        "a heartbeating node is ready whatever its clock says"
    );
    // One last renewal stamped an hour ahead, then silence.
    *behind.lock().expect("lock") = false;
    let ahead = skewed_heartbeat(&client, &a, 3600);
    tokio::time::sleep(Duration::from_millis(700)).await;
    *ahead.lock().expect("lock") = false;
    wait_for(
        "NodeLost despite a renewTime in the future",
        &[&op],
        || async {
            let vm = get_vm(&client, &ns, "vm").await.ok_or("absent")?;
            match cond(&vm, contract::condition::NODE_LOST) {
                Some((s, r, m))
                    if s == "True" && r == "HeartbeatExpired" && m.contains("no renewal seen") =>
                {
                    Ok(())
                }
                _ => Err(describe(&vm)),
            }
        },
    )
    .await;
}

/// Item 11c: deleting a `HypervisorNode` is not proof that its guests are
/// dead: its VMs stay bound while it heartbeats, get `NodeLost` when it stops,
/// and move only once the node is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_hypervisornode_does_not_move_its_vms_until_fenced() {
    let (cp, client, ns, nodes) = setup("op-deleted").await;
    let a = nodes.add("a", 4, 8 * GI, &[]).await;
    let op = Operator::start(cp, &ns, "a");
    create_vm(
        &client,
        &ns,
        "keep",
        1,
        "1Gi",
        json!({"runStrategy": "Always"}),
    )
    .await;
    assert_eq!(wait_bound(&client, &ns, "keep", &[&op]).await, a);
    let b = nodes.add("b", 4, 8 * GI, &[]).await;

    let hv: Api<HypervisorNode> = Api::all(client.clone());
    hv.delete(&a, &DeleteParams::default())
        .await
        .expect("delete HypervisorNode a");
    await_full_pass(&op, &[]).await;
    let vm = get_vm(&client, &ns, "keep").await.expect("vm");
    assert_eq!(
        vm.labels().get(contract::LABEL_NODE),
        Some(&a),
        "moved while the old node still heartbeats: {}",
        describe(&vm)
    );
    assert!(
        cond(&vm, contract::condition::NODE_LOST).is_none_or(|c| c.0 != "True"),
        "{}",
        describe(&vm)
    );

    nodes.stop_heartbeat(&a);
    wait_for("NodeLost on the deleted node's VM", &[&op], || async {
        let vm = get_vm(&client, &ns, "keep").await.ok_or("absent")?;
        match cond(&vm, contract::condition::NODE_LOST) {
            Some((s, _, m)) if s == "True" && m.contains("was deleted") => Ok(()),
            _ => Err(describe(&vm)),
        }
    })
    .await;
    await_full_pass(&op, &[]).await;
    let vm = get_vm(&client, &ns, "keep").await.expect("vm");
    assert_eq!(
        vm.labels().get(contract::LABEL_NODE),
        Some(&a),
        "moved before fencing: {}",
        describe(&vm)
    );

    // Fenced: recreate it with the annotation; the VM moves to b.
    let fenced: HypervisorNode = serde_json::from_value(json!({
        "apiVersion": "kubevmm.io/v1alpha1", "kind": "HypervisorNode",
        "metadata": {"name": a, "labels": {"kubevmm.io/test": ns},
                     "annotations": {contract::ANNOTATION_FENCED: "true"}},
        "spec": {}
    }))
    .expect("node");
    hv.create(&PostParams::default(), &fenced)
        .await
        .expect("recreate fenced");
    wait_for("the VM re-placed on b", &[&op], || async {
        let vm = get_vm(&client, &ns, "keep").await.ok_or("absent")?;
        if vm.labels().get(contract::LABEL_NODE) == Some(&b) {
            Ok(())
        } else {
            Err(describe(&vm))
        }
    })
    .await;
    assert_eq!(wait_bound(&client, &ns, "keep", &[&op]).await, b);
    let vm = get_vm(&client, &ns, "keep").await.expect("vm");
    assert_eq!(vm.status.as_ref().map(|s| s.restart_count), Some(1));
}

/// Item 11b: one VM whose writes are refused (here by an admission policy)
/// is retried on its own with backoff and reported; the others are bound as
/// promptly as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_vm_does_not_stall_the_others() {
    let (cp, client, ns, nodes) = setup("op-poison").await;
    let a = nodes.add("a", 8, 8 * GI, &[]).await;
    create_vm(&client, &ns, "poison", 1, "256Mi", json!({})).await;
    let policy = format!(
        "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicy\nmetadata: {{name: poison-{ns}}}\n\
         spec:\n  failurePolicy: Fail\n  matchConstraints:\n    resourceRules:\n    - apiGroups: [kubevmm.io]\n      \
         apiVersions: [\"*\"]\n      operations: [UPDATE]\n      resources: [virtualmachines, virtualmachines/status]\n  \
         matchConditions:\n  - name: poison\n    expression: 'request.namespace == \"{ns}\" && request.name == \"poison\"'\n  \
         validations:\n  - expression: 'false'\n    message: test refuses every write to this VM\n---\n\
         apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicyBinding\nmetadata: {{name: poison-{ns}}}\n\
         spec: {{policyName: poison-{ns}, validationActions: [Deny]}}\n"
    );
    let o = kubevmm_e2e::run_with_input(cp.kubectl().args(["apply", "-f", "-"]), &policy);
    assert!(o.success, "poison policy: {}", o.stderr);
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
    wait_for("the poison policy to be in force", &[], || async {
        match api
            .patch(
                "poison",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"probe": "1"}}})),
            )
            .await
        {
            Err(e) if e.to_string().contains("test refuses") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    let op = Operator::start(cp, &ns, "a");
    // Let the failures pile up: eight failed writes take 25 s of backoff, so
    // a stalled loop would now sleep 25.6 s between passes.
    wait_for("the poison VM to fail eight times", &[&op], || async {
        match metric_sum(
            &op,
            "kubevmm_operator_reconcile_errors_total{kind=\"write\"}",
        ) {
            Some(n) if n >= 8 => Ok(()),
            other => Err(format!("{other:?} write errors")),
        }
    })
    .await;
    let created = Instant::now();
    create_vm(&client, &ns, "good", 1, "256Mi", json!({})).await;
    assert_eq!(wait_bound(&client, &ns, "good", &[&op]).await, a);
    let took = created.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "a healthy VM waited {took:?} behind a failing one\n{}",
        op.log_tail()
    );
    let events = events_with_reason(&client, &ns, "ReconcileFailed").await;
    assert!(
        events.iter().any(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("poison")
                && e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("test refuses"))
        }),
        "no ReconcileFailed Event on the poison VM: {events:?}"
    );
    // Still retried (not given up on), with backoff.
    let before = metric_sum(
        &op,
        "kubevmm_operator_reconcile_errors_total{kind=\"write\"}",
    );
    wait_for("another retry of the poison VM", &[&op], || async {
        let now = metric_sum(
            &op,
            "kubevmm_operator_reconcile_errors_total{kind=\"write\"}",
        );
        if now > before {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    })
    .await;
    let _ = cp
        .kubectl()
        .args([
            "delete",
            "validatingadmissionpolicy,validatingadmissionpolicybinding",
            &format!("poison-{ns}"),
        ])
        .output();
}
