//! `make bench` (cluster part): `kubectl apply` → phase Running latency for
//! single VMs and for 20 applied at once, and the memory of the agent and
//! the operator with 20 guests, apply → DHCP address in status for a
//! masquerade VM (the `dhcpnet` guest), on a private control plane with the real
//! `kubevmm-operator` and `node-vmm agent` booting the `idle` test guest.
//! Prints our figures beside `KubeVirt`'s published ones (DESIGN.md).

// A benchmark script: one straight sequence of steps, and kibibyte counts
// shown as MiB with one decimal.
#![allow(clippy::too_many_lines, clippy::cast_precision_loss)]

use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::ResourceExt as _;
use kubevmm_crds::contract::LABEL_NODE;
use kubevmm_crds::{VirtualMachine, VirtualMachineImage, VmPhase};
use kubevmm_e2e::apiserver::{apiserver_requests, writes_between};
use kubevmm_e2e::{bench_agent, build_guests, free_port, ControlPlane, Daemon};

const SINGLE_RUNS: usize = 10;
const BURST: usize = 20;
const IP_RUNS: usize = 5;
const BENCH_BRIDGE: &str = "kvmbench0";

fn manifest(name: &str, kernel: &std::path::Path) -> VirtualMachine {
    with_disks(name, kernel, &serde_json::json!([]))
}

fn with_disks(name: &str, kernel: &std::path::Path, disks: &serde_json::Value) -> VirtualMachine {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "kubevmm.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {
            "memory": "64Mi",
            "terminationGracePeriodSeconds": 5,
            "boot": {"kernel": {"path": kernel}},
            "disks": disks,
        }
    }))
    .expect("manifest")
}

/// Imports a 2 GiB qcow2 (a `path:` image) into the node's cache.
async fn cached_image(cp: &ControlPlane, ns: &str, file: &std::path::Path) {
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(file)
        .arg("2G")
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img create");
    let api: Api<VirtualMachineImage> = Api::namespaced(cp.client().await.expect("client"), ns);
    let img: VirtualMachineImage = serde_json::from_value(serde_json::json!({
        "apiVersion": "kubevmm.io/v1alpha1",
        "kind": "VirtualMachineImage",
        "metadata": {"name": "root-2g"},
        "spec": {"source": {"path": file}},
    }))
    .expect("image");
    api.create(&PostParams::default(), &img)
        .await
        .expect("create image");
}

async fn until_running(api: &Api<VirtualMachine>, name: &str, start: Instant) -> Duration {
    loop {
        if let Ok(vm) = api.get(name).await {
            if vm.status.and_then(|s| s.phase) == Some(kubevmm_crds::VmPhase::Running) {
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{name} not Running after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// When a watch showed each step of one VM's start, from its creation.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// The operator's finalizer.
    finalizer: Option<Duration>,
    /// `status.nodeName` and the node label: bound.
    bound: Option<Duration>,
    /// The agent's first status: phase Starting (skipped when the agent's
    /// first status already says Running).
    starting: Option<Duration>,
    running: Option<Duration>,
}

impl Seen {
    fn record(&mut self, vm: &VirtualMachine, at: Duration) {
        let status = vm.status.as_ref();
        let phase = status.and_then(|s| s.phase);
        if self.finalizer.is_none() && !vm.finalizers().is_empty() {
            self.finalizer = Some(at);
        }
        if self.bound.is_none()
            && vm.labels().contains_key(LABEL_NODE)
            && status.and_then(|s| s.node_name.as_ref()).is_some()
        {
            self.bound = Some(at);
        }
        if self.starting.is_none() && phase == Some(VmPhase::Starting) {
            self.starting = Some(at);
        }
        if phase == Some(VmPhase::Running) {
            self.running = Some(at);
        }
    }
}

/// The next VM the watch shows; panics (saying `what`) 120 s after `start`.
async fn next_vm(
    events: &mut (impl futures::Stream<Item = Result<Event<VirtualMachine>, watcher::Error>> + Unpin),
    start: Instant,
    what: impl Fn() -> String,
) -> VirtualMachine {
    loop {
        let left = Duration::from_secs(120).saturating_sub(start.elapsed());
        let ev = tokio::time::timeout(left, events.try_next())
            .await
            .unwrap_or_else(|_| panic!("not Running after 120 s: {}", what()))
            .expect("watch")
            .expect("the watch ended");
        if let Event::Apply(vm) | Event::InitApply(vm) = ev {
            return vm;
        }
    }
}

/// Creates `vm` and follows it through a watch (opened first) until it is
/// Running.
async fn watch_start(api: &Api<VirtualMachine>, vm: &VirtualMachine) -> Seen {
    let name = vm.name_any();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api.clone(), config).boxed();
    while let Some(ev) = events.try_next().await.expect("watch") {
        if matches!(ev, Event::InitDone) {
            break;
        }
    }
    let start = Instant::now();
    api.create(&PostParams::default(), vm)
        .await
        .expect("create");
    let mut seen = Seen::default();
    while seen.running.is_none() {
        let vm = next_vm(&mut events, start, || format!("{name}: {seen:?}")).await;
        seen.record(&vm, start.elapsed());
    }
    seen
}

/// Creates [`BURST`] VMs one after another, as `kubectl apply -f` of a
/// directory does, and follows them all through one watch (opened first)
/// until each is Running: each VM's steps from the first create, and when
/// the last create returned.
async fn burst_start(api: &Api<VirtualMachine>, kernel: &std::path::Path) -> (Vec<Seen>, Duration) {
    let mut events = watcher::watcher(api.clone(), watcher::Config::default()).boxed();
    while let Some(ev) = events.try_next().await.expect("watch") {
        if matches!(ev, Event::InitDone) {
            break;
        }
    }
    let start = Instant::now();
    // The creates run beside the watch, which stamps each event as it comes.
    let creates = {
        let (api, kernel) = (api.clone(), kernel.to_path_buf());
        tokio::spawn(async move {
            for i in 0..BURST {
                api.create(
                    &PostParams::default(),
                    &manifest(&format!("burst-{i}"), &kernel),
                )
                .await
                .expect("create");
            }
            start.elapsed()
        })
    };
    let mut seen = vec![Seen::default(); BURST];
    while seen.iter().any(|s| s.running.is_none()) {
        let vm = next_vm(&mut events, start, || format!("the burst: {seen:?}")).await;
        let index = vm
            .name_any()
            .strip_prefix("burst-")
            .and_then(|i| i.parse::<usize>().ok());
        if let Some(s) = index.and_then(|i| seen.get_mut(i)) {
            s.record(&vm, start.elapsed());
        }
    }
    (seen, creates.await.expect("the creates"))
}

/// CPU time (user + system) of each part of the node and control plane,
/// from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    etcd: Duration,
    apiserver: Duration,
    controller_manager: Duration,
    operator: Duration,
    agent: Duration,
    /// Every VMM of the bench's node, alive now.
    vmms: Duration,
    /// This benchmark (its creates and its watch).
    bench: Duration,
    /// All CPUs of the machine (busy time).
    machine: Duration,
}

/// Time on CPU of all threads of `pid` (`schedstat`, in nanoseconds).
fn cpu_of(pid: i32) -> Duration {
    let nanos: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| {
            std::fs::read_to_string(t.path().join("schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    Duration::from_nanos(nanos)
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

fn machine_busy() -> Duration {
    let ticks = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<u64> = s
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal: busy = all but idle, iowait.
            Some(f.iter().take(8).sum::<u64>() - f.get(3)? - f.get(4)?)
        })
        .unwrap_or(0);
    ticks_to_duration(ticks)
}

impl CpuUse {
    fn now(cp: &ControlPlane, agent: &Daemon, operator: &Daemon, state: &std::path::Path) -> Self {
        let component = |name: &str| {
            std::fs::read_to_string(cp.dir().join("run").join(format!("{name}.pid")))
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .map_or(Duration::ZERO, cpu_of)
        };
        let vmms = std::fs::read_dir(state.join("vms"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|d| {
                let v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(d.path().join("vmm.pid")).ok()?).ok()?;
                Some(cpu_of(i32::try_from(v["pid"].as_i64()?).ok()?))
            })
            .sum();
        Self {
            etcd: component("etcd"),
            apiserver: component("kube-apiserver"),
            controller_manager: component("kube-controller-manager"),
            operator: cpu_of(operator.pid()),
            agent: cpu_of(agent.pid()),
            vmms,
            bench: cpu_of(std::process::id() as i32),
            machine: machine_busy(),
        }
    }

    /// The use since `before` (VMMs started since count whole).
    fn since(&self, before: &Self) -> Self {
        Self {
            etcd: self.etcd.saturating_sub(before.etcd),
            apiserver: self.apiserver.saturating_sub(before.apiserver),
            controller_manager: self
                .controller_manager
                .saturating_sub(before.controller_manager),
            operator: self.operator.saturating_sub(before.operator),
            agent: self.agent.saturating_sub(before.agent),
            vmms: self.vmms,
            bench: self.bench.saturating_sub(before.bench),
            machine: self.machine.saturating_sub(before.machine),
        }
    }
}

/// The burst step by step (from the first create), and where the CPU went.
fn print_burst(
    runs: &[Seen],
    created: Duration,
    cpu: &CpuUse,
    writes: &[((String, String, String), u64)],
) {
    println!();
    println!(
        "{BURST} VMs at once, step by step as one watch sees them (from the first create; the last create returned at {})",
        ms(created)
    );
    println!();
    println!("| step | p50 | p95 | last |");
    println!("| --- | --- | --- | --- |");
    let rows: [(&str, StepOf); 3] = [
        ("operator: bound (status.nodeName, label)", |s| s.bound),
        ("agent: Running (VMM up, vCPUs run)", |s| s.running),
        ("agent: bound → Running, each VM's own", |s| {
            s.running?.checked_sub(s.bound?)
        }),
    ];
    for (what, step) in rows {
        let mut v: Vec<Duration> = runs.iter().filter_map(step).collect();
        v.sort();
        if v.is_empty() {
            continue;
        }
        let (p50, p95, last) = (pct(&v, 50), pct(&v, 95), v[v.len() - 1]);
        println!("| {what} | {} | {} | {} |", ms(p50), ms(p95), ms(last));
    }
    println!();
    println!("CPU time used from the first create to the last Running (2 cores):");
    println!();
    println!("| part | CPU |");
    println!("| --- | --- |");
    for (what, d) in [
        ("kube-apiserver", cpu.apiserver),
        ("etcd", cpu.etcd),
        ("kube-controller-manager", cpu.controller_manager),
        ("operator", cpu.operator),
        ("node-vmm agent", cpu.agent),
        (&*format!("{BURST} VMMs (their whole lives)"), cpu.vmms),
        ("this benchmark (creates, watch)", cpu.bench),
        ("the whole machine", cpu.machine),
    ] {
        println!("| {what} | {} |", ms(d));
    }
    println!();
    println!("API writes meanwhile (kube-apiserver's apiserver_request_total, taken after the last Running):");
    println!();
    println!("| verb | resource | per VM |");
    println!("| --- | --- | --- |");
    for ((verb, resource, sub), n) in writes {
        let resource = if sub.is_empty() {
            resource.clone()
        } else {
            format!("{resource}/{sub}")
        };
        println!("| {verb} | {resource} | {:.2} |", *n as f64 / BURST as f64);
    }
}

/// (passes, mean duration) from the operator's reconcile histogram.
fn pass_times(port: u16) -> Option<(u64, Duration)> {
    let text = kubevmm_e2e::http_get_ok(&format!("127.0.0.1:{port}"), "/metrics")?;
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    let sum = value("kubevmm_operator_reconcile_duration_seconds_sum")?;
    let count = value("kubevmm_operator_reconcile_duration_seconds_count")?;
    (count > 0.0).then(|| (count as u64, Duration::from_secs_f64(sum / count)))
}

/// Reads one step's time out of a run.
type StepOf = fn(&Seen) -> Option<Duration>;

/// Median of the steps seen, and how many runs showed them.
fn step_median(
    runs: &[Seen],
    step: impl Fn(&Seen) -> Option<Duration>,
) -> (Option<Duration>, usize) {
    let mut v: Vec<Duration> = runs.iter().filter_map(step).collect();
    v.sort();
    let n = v.len();
    ((n > 0).then(|| pct(&v, 50)), n)
}

fn print_breakdown(runs: &[Seen]) {
    println!();
    println!(
        "apply → Running, step by step as a watch sees them ({} single VMs, medians)",
        runs.len()
    );
    println!();
    println!("| step | at | seen in |");
    println!("| --- | --- | --- |");
    let rows: [(&str, StepOf); 4] = [
        ("operator: finalizer", |s| s.finalizer),
        ("operator: bound (status.nodeName, label)", |s| s.bound),
        ("agent: first status, Starting", |s| s.starting),
        ("agent: Running (VMM up, vCPUs run)", |s| s.running),
    ];
    for (what, step) in rows {
        let (m, n) = step_median(runs, step);
        let at = m.map_or_else(|| "-".to_string(), ms);
        println!("| {what} | {at} | {n} of {} runs |", runs.len());
    }
}

async fn until_ip(api: &Api<VirtualMachine>, name: &str, start: Instant) -> Duration {
    loop {
        if let Ok(vm) = api.get(name).await {
            let ip = vm
                .status
                .and_then(|s| s.interfaces.first().and_then(|i| i.ip_address.clone()));
            if ip.is_some() {
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{name} has no address after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn until_gone(api: &Api<VirtualMachine>, name: &str) {
    let _ = api.delete(name, &DeleteParams::default()).await;
    let start = Instant::now();
    while api.get_opt(name).await.ok().flatten().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{name} not deleted after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `p`-th percentile (nearest rank) of sorted samples, `p` in percent.
fn pct(sorted: &[Duration], p: usize) -> Duration {
    let i = ((sorted.len() - 1) * p + 50) / 100;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .map(str::to_string)
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cp = ControlPlane::shared();
    let guests = build_guests();
    let kernel = guests.join("idle.elf");
    let ns = cp.namespace("bench");
    let state = std::env::temp_dir().join(format!("kubevmm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&state).expect("state dir");
    let node = format!("bench-{}", std::process::id());
    let mut agent_cmd = bench_agent(cp, &node, &state, &guests);
    agent_cmd
        // A masquerade network of the bench's own; NAT towards loopback
        // only (the guests just take their leases).
        .args([
            "--masquerade-bridge",
            BENCH_BRIDGE,
            "--masquerade-subnet",
            "10.253.0.0/24",
            "--uplink",
            "lo",
        ]);
    let mut agent = Daemon::start(agent_cmd, state.join("agent.log"));
    let op_metrics = free_port().expect("port");
    let mut op_cmd = kubevmm_e2e::operator_command(cp, &ns, &format!("op-{node}"), op_metrics);
    op_cmd.args(["--cpu-overcommit", "20"]);
    let mut operator = Daemon::start(op_cmd, state.join("operator.log"));
    let client = cp.client().await.expect("client");
    let api: Api<VirtualMachine> = Api::namespaced(client, &ns);
    // Wait for the node to be registered and the operator to lead.
    let warm = manifest("warmup", &kernel);
    let t = Instant::now();
    api.create(&PostParams::default(), &warm)
        .await
        .expect("create");
    until_running(&api, "warmup", t).await;
    until_gone(&api, "warmup").await;

    let mut single = Vec::new();
    let mut steps = Vec::new();
    for i in 0..SINGLE_RUNS {
        let name = format!("single-{i}");
        let seen = watch_start(&api, &manifest(&name, &kernel)).await;
        single.extend(seen.running);
        steps.push(seen);
        until_gone(&api, &name).await;
    }
    single.sort();
    let passes = pass_times(op_metrics);

    let requests_before = apiserver_requests(cp);
    let cpu_before = CpuUse::now(cp, &agent, &operator, &state);
    let (burst_seen, created) = burst_start(&api, &kernel).await;
    let cpu = CpuUse::now(cp, &agent, &operator, &state).since(&cpu_before);
    let burst_writes = writes_between(&apiserver_requests(cp), &requests_before);
    let mut burst: Vec<Duration> = burst_seen.iter().filter_map(|s| s.running).collect();
    burst.sort();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agent_rss = rss_kib(agent.pid());
    let operator_rss = rss_kib(operator.pid());
    let mut vmm_rss = 0;
    let mut vmms = 0;
    for d in std::fs::read_dir(state.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(pid) = std::fs::read(d.path().join("vmm.pid"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["pid"].as_i64())
        {
            vmm_rss += rss_kib(pid as i32);
            vmms += 1;
        }
    }
    for i in 0..BURST {
        until_gone(&api, &format!("burst-{i}")).await;
    }

    // A VM whose 2 GiB qcow2 image is already cached: its disk is a fresh
    // overlay per VM. The first VM waits for the import; the rest measure.
    let image_file = guests.join("bench-root-2g.qcow2");
    cached_image(cp, &ns, &image_file).await;
    let disk = serde_json::json!([{"name": "root", "image": {"name": "root-2g"}}]);
    let t = Instant::now();
    api.create(
        &PostParams::default(),
        &with_disks("img-warm", &kernel, &disk),
    )
    .await
    .expect("create");
    until_running(&api, "img-warm", t).await;
    until_gone(&api, "img-warm").await;
    let mut cached = Vec::new();
    for i in 0..SINGLE_RUNS {
        let name = format!("img-{i}");
        let start = Instant::now();
        api.create(&PostParams::default(), &with_disks(&name, &kernel, &disk))
            .await
            .expect("create");
        cached.push(until_running(&api, &name, start).await);
        until_gone(&api, &name).await;
    }
    cached.sort();
    let _ = std::fs::remove_file(&image_file);

    // A masquerade VM: apply -> its DHCP address in status.
    let dhcp_kernel = guests.join("dhcpnet.elf");
    let mut to_ip = Vec::new();
    for i in 0..IP_RUNS {
        let name = format!("net-{i}");
        let mut vm = manifest(&name, &dhcp_kernel);
        vm.spec.networks =
            serde_json::from_value(serde_json::json!([{"name": "default", "masquerade": {}}]))
                .expect("network");
        let start = Instant::now();
        api.create(&PostParams::default(), &vm)
            .await
            .expect("create");
        to_ip.push(until_ip(&api, &name, start).await);
        until_gone(&api, &name).await;
    }
    to_ip.sort();
    for (cmd, args) in [
        ("ip", vec!["link", "del", BENCH_BRIDGE]),
        ("nft", vec!["delete", "table", "ip", BENCH_BRIDGE]),
        ("nft", vec!["delete", "table", "bridge", BENCH_BRIDGE]),
    ] {
        let _ = std::process::Command::new(cmd).args(args).output();
    }
    agent.kill();
    operator.kill();
    let _ = std::fs::remove_dir_all(&state);

    println!("kubevmm cluster benchmarks (idle guest, 64 MiB, 1 vCPU; 2-core node, software KVM)");
    println!(
        "{:<44} {:>28} {:>22} {:>14}",
        "what", "kubevmm", "anchor", "target"
    );
    println!(
        "{:<44} {:>28} {:>22} {:>14}",
        format!("apply -> Running, {SINGLE_RUNS} single VMs p50/p95"),
        format!(
            "{} / {} (min {})",
            ms(pct(&single, 50)),
            ms(pct(&single, 95)),
            ms(single[0])
        ),
        "KubeVirt p50 15-25 s",
        "p50 <= 60 ms"
    );
    println!(
        "{:<44} {:>28} {:>22} {:>14}",
        format!("{BURST} VMs at once -> all Running p50/p95/max"),
        format!(
            "{} / {} / {}",
            ms(pct(&burst, 50)),
            ms(pct(&burst, 95)),
            ms(burst[BURST - 1])
        ),
        "KubeVirt 100 VMIs 20-40 s",
        "p95 <= 400 ms"
    );
    println!(
        "{:<44} {:>28} {:>22} {:>14}",
        "apply -> Running, 2 GiB qcow2 image cached, p50/p95",
        format!("{} / {}", ms(pct(&cached, 50)), ms(pct(&cached, 95))),
        "KubeVirt clone: tens of s",
        "<= 250 ms"
    );
    println!(
        "{:<44} {:>28} {:>22} {:>14}",
        format!("apply -> IP in status (masquerade), {IP_RUNS} VMs p50/p95"),
        format!("{} / {}", ms(pct(&to_ip, 50)), ms(pct(&to_ip, 95))),
        "KubeVirt: tens of s",
        "-"
    );
    println!(
        "{:<44} {:>28} {:>22} {:>14}",
        format!("node-vmm agent RSS with {BURST} guests"),
        format!("{:.1} MiB", agent_rss as f64 / 1024.0),
        "-",
        "-"
    );
    println!(
        "{:<44} {:>28} {:>22} {:>14}",
        "operator RSS",
        format!("{:.1} MiB", operator_rss as f64 / 1024.0),
        "-",
        "-"
    );
    if vmms > 0 {
        println!(
            "{:<44} {:>28} {:>22} {:>14}",
            "VMM RSS per guest (incl. touched guest RAM)",
            format!("{:.1} MiB", vmm_rss as f64 / 1024.0 / f64::from(vmms)),
            "-",
            "-"
        );
    }
    print_breakdown(&steps);
    print_burst(&burst_seen, created, &cpu, &burst_writes);
    if let Some((count, mean)) = passes {
        println!();
        println!(
            "operator passes up to then (read caches, decide, writes): {count}, mean {}",
            ms(mean)
        );
    }
}
