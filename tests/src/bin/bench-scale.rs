//! `make bench-scale`: the real operator placing thousands of VMs on 100
//! simulated nodes of a real control plane.
//!
//! The nodes are simulated the way Kubernetes' kubemark simulates kubelets:
//! no KVM, but the agent's own code for what the operator sees of a node —
//! `NodeReporter` registers each `HypervisorNode` (with a simulated
//! capacity), writes its status and renews its heartbeat Lease, and each
//! VM bound to a simulated node is reported Running with the agent's status
//! body (`status_body::body`, its `Ready` condition and phase transitions),
//! applied under the agent's field manager.
//!
//! For each size (default 500 and 5,000 VMs of 1 vCPU / 64 MiB): create
//! them (16 at a time), wait until all are Running; print the time, apply
//! → Scheduled p50/p95, the API requests the operator made per VM by verb
//! (kube-apiserver's `apiserver_request_total`, minus the requests this
//! program made itself, which it counts), the operator's CPU seconds and
//! peak RSS. Then 10 nodes stop heartbeating: time until their VMs are
//! marked `NodeLost`, then (fenced, as a fencing agent would) until all
//! run again elsewhere.
//!
//! Usage: `bench-scale [SIZE ...]` (release build; `make bench-scale`).

// Counts and sizes become figures to print.
#![allow(clippy::cast_precision_loss)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use kubevmm_crds::contract::{self, condition, ConditionStatus};
use kubevmm_crds::{HypervisorNode, HypervisorNodeSpec, VirtualMachine, VmPhase};
use kubevmm_e2e::apiserver::{apiserver_requests, delta};
use kubevmm_e2e::{free_port, node_sim, operator_command, ControlPlane, Daemon};
use node_vmm::agent::node::{NodeReporter, Reserve, DEFAULT_LEASE_SECONDS};
use serde_json::json;

const NODES: usize = 100;
const LOST: usize = 10;
const CREATE_AT_ONCE: usize = 16;
const WRITE_AT_ONCE: usize = 32;
/// Each simulated node: 32 vCPUs (×10 overcommit), 128 GiB.
const NODE_CPUS: u32 = 32;
const NODE_MEMORY: u64 = 128 << 30;
const DEADLINE: Duration = Duration::from_secs(1200);
/// Label that scopes one size's nodes to its operator.
const LABEL: &str = "kubevmm.io/bench-scale";

/// What the simulated agents and the observer share.
struct World {
    api: Api<VirtualMachine>,
    /// Nodes whose heartbeat goes on.
    beating: Mutex<BTreeSet<String>>,
    /// Status writes in flight or done: (VM, node, restart count).
    reported: Mutex<BTreeSet<(String, String, i32)>>,
    /// Status applies this program sent.
    status_writes: AtomicU64,
    /// When each VM was created, was first seen bound, and is Running on
    /// which node (as the watch sees them).
    created: Mutex<BTreeMap<String, Instant>>,
    scheduled: Mutex<BTreeMap<String, Instant>>,
    running_on: Mutex<BTreeMap<String, String>>,
    node_lost: Mutex<BTreeSet<String>>,
    writers: tokio::sync::Semaphore,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl World {
    /// The watch's view of one VM: record its steps, and play its node's
    /// agent when it is bound to a simulated node that still beats.
    fn observe(self: &Arc<Self>, vm: &VirtualMachine) {
        let name = vm.name_any();
        let status = vm.status.clone().unwrap_or_default();
        let label = vm.labels().get(contract::LABEL_NODE).cloned();
        if status.node_name.is_some() {
            lock(&self.scheduled)
                .entry(name.clone())
                .or_insert_with(Instant::now);
        }
        let lost = status.conditions.iter().any(|c| {
            c.type_ == condition::NODE_LOST && ConditionStatus::of(c) == ConditionStatus::True
        });
        if lost {
            lock(&self.node_lost).insert(name.clone());
        }
        if status.phase == Some(VmPhase::Running) {
            if let Some(n) = &status.node_name {
                lock(&self.running_on).insert(name.clone(), n.clone());
            }
            return;
        }
        lock(&self.running_on).remove(&name);
        let Some(node) = label.filter(|l| status.node_name.as_ref() == Some(l)) else {
            return;
        };
        if vm.metadata.deletion_timestamp.is_some() || !lock(&self.beating).contains(&node) {
            return;
        }
        let key = (name, node, status.restart_count);
        if !lock(&self.reported).insert(key.clone()) {
            return;
        }
        let world = self.clone();
        let vm = vm.clone();
        tokio::spawn(async move {
            let Ok(_permit) = world.writers.acquire().await else {
                return;
            };
            if let Err(e) = world.report_running(&vm).await {
                eprintln!(
                    "bench-scale: status of {}: {e}; retried on its next event",
                    key.0
                );
                lock(&world.reported).remove(&key);
            }
        });
    }

    /// The agent's status write for a guest that came up.
    async fn report_running(&self, vm: &VirtualMachine) -> Result<(), kube::Error> {
        // A failed apply reached the API server too: counted either way.
        let sent = node_sim::report_running(&self.api, vm).await;
        if !matches!(sent, Ok(false)) {
            self.status_writes.fetch_add(1, Ordering::Relaxed);
        }
        sent.map(|_| ())
    }
}

/// CPU seconds (user + system) and peak RSS in MiB of a process.
fn cpu_and_peak_rss(pid: i32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th fields of the line.
    let after = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    (ticks as f64 / hz, hwm_kib / 1024.0)
}

fn pct(v: &[Duration], p: usize) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) * p / 100).min(v.len() - 1)]
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Waits until `progress` reports (have, want) with have >= want, printing
/// `what` and the progress every 10 s; panics past `DEADLINE`.
async fn until(what: &str, mut progress: impl FnMut() -> (usize, usize)) -> Duration {
    let start = Instant::now();
    let mut said = Instant::now();
    loop {
        let (have, want) = progress();
        if have >= want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "bench-scale: {what}: {have}/{want} after {}",
            secs(start.elapsed())
        );
        if said.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "bench-scale: {what}: {have}/{want} after {}",
                secs(start.elapsed())
            );
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One size's figures.
struct Figures {
    vms: usize,
    create: Duration,
    all_scheduled: Duration,
    all_running: Duration,
    scheduled_p50: Duration,
    scheduled_p95: Duration,
    operator_writes: BTreeMap<&'static str, u64>,
    reads: BTreeMap<&'static str, u64>,
    cpu: f64,
    rss: f64,
    lost_marked: Duration,
    replaced: Duration,
    replaced_vms: usize,
}

#[allow(clippy::too_many_lines)] // one scenario, step by step
async fn run_size(cp: &ControlPlane, client: &kube::Client, vms: usize) -> Figures {
    let ns = cp.namespace(&format!("scale{vms}"));
    let world = Arc::new(World {
        api: Api::namespaced(client.clone(), &ns),
        beating: Mutex::default(),
        reported: Mutex::default(),
        status_writes: AtomicU64::new(0),
        created: Mutex::default(),
        scheduled: Mutex::default(),
        running_on: Mutex::default(),
        node_lost: Mutex::default(),
        writers: tokio::sync::Semaphore::new(WRITE_AT_ONCE),
    });

    // The nodes: labelled for this size's operator, then registered and
    // kept alive by the agent's own reporter.
    let hv_api: Api<HypervisorNode> = Api::all(client.clone());
    let mut reporters = BTreeMap::new();
    for i in 0..NODES {
        let name = format!("{ns}-n{i:03}");
        let mut hv = HypervisorNode::new(&name, HypervisorNodeSpec::default());
        hv.metadata.labels = Some([(LABEL.to_string(), ns.clone())].into());
        hv_api
            .create(&PostParams::default(), &hv)
            .await
            .expect("create HypervisorNode");
        let r = NodeReporter::new(
            client.clone(),
            name.clone(),
            Reserve { cpus: 0, memory: 0 },
            DEFAULT_LEASE_SECONDS,
        )
        .with_capacity(NODE_CPUS, NODE_MEMORY);
        r.register().await.expect("register");
        r.heartbeat(0, &[]).await.expect("first heartbeat");
        lock(&world.beating).insert(name.clone());
        reporters.insert(name, r);
    }
    let beat = reporters
        .values()
        .next()
        .map_or(Duration::from_secs(10), NodeReporter::interval);
    let heartbeats = {
        let world = world.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(beat).await;
                let beating = lock(&world.beating).clone();
                let running: BTreeMap<String, i32> = {
                    let mut m = BTreeMap::new();
                    for n in lock(&world.running_on).values() {
                        *m.entry(n.clone()).or_insert(0) += 1;
                    }
                    m
                };
                let beats = reporters
                    .iter()
                    .filter(|(n, _)| beating.contains(*n))
                    .map(|(n, r)| r.heartbeat(running.get(n).copied().unwrap_or(0), &[]));
                for e in futures::future::join_all(beats)
                    .await
                    .into_iter()
                    .filter_map(Result::err)
                {
                    eprintln!("bench-scale: heartbeat: {e}");
                }
            }
        })
    };
    let observer = {
        let world = world.clone();
        tokio::spawn(async move {
            let stream = watcher(world.api.clone(), watcher::Config::default())
                .default_backoff()
                .applied_objects();
            let mut stream = std::pin::pin!(stream);
            while let Some(vm) = stream.next().await {
                match vm {
                    Ok(vm) => world.observe(&vm),
                    Err(e) => eprintln!("bench-scale: watch: {e}"),
                }
            }
        })
    };

    let port = free_port().expect("port");
    let mut op_cmd = operator_command(cp, &ns, &format!("op-{ns}"), port);
    op_cmd.args([
        "--node-selector",
        &format!("{LABEL}={ns}"),
        "--log-level",
        "warn",
    ]);
    let operator = Daemon::start(op_cmd, cp.dir().join(format!("operator-{ns}.log")));
    until("operator ready", || {
        let ready = kubevmm_e2e::http_get_ok(&format!("127.0.0.1:{port}"), "/readyz").is_some();
        (usize::from(ready), 1)
    })
    .await;

    // A starting operator takes a node for placeable once it has seen its
    // Lease renewed (its own clock, never the agent's): one interval.
    tokio::time::sleep(beat + Duration::from_secs(2)).await;

    let before = apiserver_requests(cp);
    let (cpu0, _) = cpu_and_peak_rss(operator.pid());
    let start = Instant::now();
    futures::stream::iter(0..vms)
        .map(|i| {
            let world = world.clone();
            async move {
                let name = format!("vm-{i:05}");
                let vm: VirtualMachine = serde_json::from_value(json!({
                    "apiVersion": kubevmm_crds::API_VERSION, "kind": "VirtualMachine",
                    "metadata": {"name": name},
                    "spec": {"cpus": 1, "memory": "64Mi", "runStrategy": "Always",
                             "boot": {"kernel": {"path": "/var/lib/kubevmm/boot/vmlinux"}}}
                }))
                .expect("manifest");
                lock(&world.created).insert(name, Instant::now());
                world
                    .api
                    .create(&PostParams::default(), &vm)
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(CREATE_AT_ONCE)
        .try_collect::<Vec<()>>()
        .await
        .expect("create VirtualMachine");
    let create = start.elapsed();
    until(&format!("{vms} VMs Running"), || {
        (lock(&world.running_on).len(), vms)
    })
    .await;
    let all_running = start.elapsed();
    let after = apiserver_requests(cp);
    let (cpu1, rss) = cpu_and_peak_rss(operator.pid());

    let mut to_scheduled: Vec<Duration> = {
        let created = lock(&world.created);
        lock(&world.scheduled)
            .iter()
            .filter_map(|(n, t)| Some(t.saturating_duration_since(*created.get(n)?)))
            .collect()
    };
    to_scheduled.sort();
    let all_scheduled = lock(&world.scheduled)
        .values()
        .max()
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(start));
    let sim = world.status_writes.load(Ordering::Relaxed);
    let d = |verb, resource, sub| delta(&after, &before, verb, resource, sub);
    let vm = "virtualmachines";
    let operator_writes = BTreeMap::from([
        (
            "PATCH virtualmachines (finalizer, label)",
            d("PATCH", vm, ""),
        ),
        (
            "APPLY virtualmachines/status",
            d("APPLY", vm, "status").saturating_sub(sim),
        ),
        (
            "POST/PATCH events",
            d("POST", "events", "") + d("PATCH", "events", ""),
        ),
    ]);
    // The observer's watch is this program's one LIST and its WATCHes.
    let reads = BTreeMap::from([
        ("LIST virtualmachines", d("LIST", vm, "").saturating_sub(1)),
        ("GET virtualmachines", d("GET", vm, "")),
        ("LIST hypervisornodes", d("LIST", "hypervisornodes", "")),
        ("LIST leases", d("LIST", "leases", "")),
    ]);

    // Ten nodes stop heartbeating.
    let lost: Vec<String> = {
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for n in lock(&world.running_on).values() {
            *per_node.entry(n.clone()).or_default() += 1;
        }
        per_node.into_keys().take(LOST).collect()
    };
    let victims: BTreeSet<String> = lock(&world.running_on)
        .iter()
        .filter(|(_, n)| lost.contains(n))
        .map(|(v, _)| v.clone())
        .collect();
    lock(&world.beating).retain(|n| !lost.contains(n));
    let lost_marked = until("VMs of silent nodes marked NodeLost", || {
        let marked = lock(&world.node_lost);
        (
            victims.iter().filter(|v| marked.contains(*v)).count(),
            victims.len(),
        )
    })
    .await;
    // Fenced, as a fencing agent does once the machines are off.
    for n in &lost {
        hv_api
            .patch(
                n,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {contract::ANNOTATION_FENCED: "true"}}}),
                ),
            )
            .await
            .expect("fence");
    }
    let replaced = until("VMs of fenced nodes Running elsewhere", || {
        let on = lock(&world.running_on);
        let back = victims
            .iter()
            .filter(|v| on.get(*v).is_some_and(|n| !lost.contains(n)))
            .count();
        (back, victims.len())
    })
    .await;

    heartbeats.abort();
    observer.abort();
    drop(operator);
    Figures {
        vms,
        create,
        all_scheduled,
        all_running,
        scheduled_p50: pct(&to_scheduled, 50),
        scheduled_p95: pct(&to_scheduled, 95),
        operator_writes,
        reads,
        cpu: cpu1 - cpu0,
        rss,
        lost_marked,
        replaced,
        replaced_vms: victims.len(),
    }
}

fn print(figures: &[Figures]) {
    println!("kubevmm operator at scale: {NODES} simulated nodes (agent's own status and heartbeat code), real control plane, 2-core machine");
    println!("anchor: main 5627895 (../shared/measurements/operator-scale.md): 5,000 VMs all bound at 128.8 s, 3.00 writes/VM, RSS 302 MiB; KubeVirt perf lane ~2 pod PATCHes per VMI");
    println!();
    println!(
        "| | {} |",
        figures
            .iter()
            .map(|f| format!("{} VMs", f.vms))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("| --- |{}", " --- |".repeat(figures.len()));
    let row = |what: &str, f: &dyn Fn(&Figures) -> String| {
        println!(
            "| {what} | {} |",
            figures.iter().map(f).collect::<Vec<_>>().join(" | ")
        );
    };
    row("creating them took", &|f| secs(f.create));
    row("all bound, from the first create", &|f| {
        secs(f.all_scheduled)
    });
    row("all Running, from the first create (goal <= 60 s)", &|f| {
        secs(f.all_running)
    });
    row("all Running after the last create", &|f| {
        secs(f.all_running.saturating_sub(f.create))
    });
    row("apply -> Scheduled p50 / p95", &|f| {
        format!("{} / {}", secs(f.scheduled_p50), secs(f.scheduled_p95))
    });
    let per_vm = |n: u64, f: &Figures| format!("{:.2}", n as f64 / f.vms as f64);
    let writes_total = |f: &Figures| f.operator_writes.values().sum::<u64>();
    row("operator writes per VM (goal <= 3)", &|f| {
        per_vm(writes_total(f), f)
    });
    for key in figures
        .first()
        .map(|f| f.operator_writes.keys().copied().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        row(&format!("  {key}, per VM"), &|f| {
            per_vm(f.operator_writes[key], f)
        });
    }
    for key in figures
        .first()
        .map(|f| f.reads.keys().copied().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        row(&format!("operator {key}, total"), &|f| {
            f.reads[key].to_string()
        });
    }
    row("operator CPU seconds", &|f| format!("{:.1}", f.cpu));
    row("operator peak RSS (goal <= 200 MiB)", &|f| {
        format!("{:.0} MiB", f.rss)
    });
    row("operator peak RSS per VM", &|f| {
        format!("{:.1} KiB", f.rss * 1024.0 / f.vms as f64)
    });
    row(
        &format!("{LOST} nodes silent -> their VMs NodeLost"),
        &|f| format!("{} ({} VMs)", secs(f.lost_marked), f.replaced_vms),
    );
    row("fenced -> all Running elsewhere", &|f| secs(f.replaced));
    if let [small, .., big] = figures {
        let growth = |a: f64, b: f64| {
            if a > 0.0 {
                format!("{:.1}x", b / a)
            } else {
                "-".into()
            }
        };
        println!();
        println!(
            "growth {} -> {} VMs ({:.0}x): all Running {}, operator CPU {}, peak RSS {}",
            small.vms,
            big.vms,
            big.vms as f64 / small.vms as f64,
            growth(
                small.all_running.as_secs_f64(),
                big.all_running.as_secs_f64()
            ),
            growth(small.cpu, big.cpu),
            growth(small.rss, big.rss),
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| panic!("bench-scale: {a:?} is not a number of VMs"))
        })
        .collect();
    let sizes = if sizes.is_empty() {
        vec![500, 5000]
    } else {
        sizes
    };
    let cp = ControlPlane::shared();
    let client = cp.client().await.expect("client");
    let mut figures = Vec::new();
    for vms in sizes {
        eprintln!("bench-scale: {vms} VMs on {NODES} nodes");
        figures.push(run_size(cp, &client, vms).await);
    }
    print(&figures);
}
