//! `make bench`: the console through the API server beside the console
//! socket on the node. One `echo` guest on the private control plane with
//! the subresource API registered; keystroke → echo latency by both paths
//! (p50/p95, goal: through kube-apiserver ≤ 3× the direct attach), and
//! `kubectl vm logs` throughput beside reading the ring on the node.

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kubevmm_e2e::pki::{host_ip, register_api_service, AccessPki};
use kubevmm_e2e::{
    bench_agent, bin_path, build_guests, free_port, run_with_input, wait_for, ControlPlane, Daemon,
};

const SAMPLES: usize = 40;
const FLOOD_KIB: usize = 256;

/// The `p`-th percentile (nearest rank) of sorted samples.
fn pct(sorted: &[Duration], p: usize) -> Duration {
    let i = ((sorted.len() - 1) * p + 50) / 100;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Sends `k<i>` lines and times each until its echo is read.
fn latencies(input: &mut dyn std::io::Write, output: &mut dyn BufRead, tag: &str) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut line = String::new();
    for i in 0..SAMPLES {
        let key = format!("{tag}{i}");
        let t = Instant::now();
        input
            .write_all(format!("{key}\n").as_bytes())
            .expect("type");
        input.flush().expect("flush");
        loop {
            line.clear();
            assert!(
                output.read_line(&mut line).expect("read") > 0,
                "console closed"
            );
            if line.contains(&format!("echo: {key}")) {
                break;
            }
        }
        out.push(t.elapsed());
    }
    out.sort();
    out
}

/// The bench's world: an agent and an operator serving access, the
/// `APIService` registered, one running `echo` guest.
struct World {
    cp: &'static ControlPlane,
    ns: String,
    state: std::path::PathBuf,
    uid: String,
    agent: Daemon,
    operator: Daemon,
}

fn start() -> World {
    let cp = ControlPlane::shared();
    let guests = build_guests();
    let ns = cp.namespace("bench-console");
    let state = std::env::temp_dir().join(format!("kubevmm-bench-console-{}", std::process::id()));
    std::fs::create_dir_all(&state).expect("state dir");
    let node = format!("bench-console-{}", std::process::id());
    let ip = host_ip();
    let (op_port, node_port) = (free_port().expect("port"), free_port().expect("port"));
    let pki = AccessPki::new(&state.join("pki"), &ip);
    let mut agent_cmd = bench_agent(cp, &node, &state, &guests);
    agent_cmd.args(pki.agent_flags(&format!("{ip}:{node_port}")));
    let agent = Daemon::start(agent_cmd, state.join("agent.log"));
    let mut op_cmd =
        kubevmm_e2e::operator_command(cp, &ns, &format!("op-{node}"), free_port().expect("port"));
    op_cmd.args(pki.operator_flags(&format!("{ip}:{op_port}")));
    let operator = Daemon::start(op_cmd, state.join("operator.log"));
    register_api_service(cp, &pki, &ip, op_port, || operator.output());
    let manifest = format!(
        "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: echo, namespace: {ns}}}\n\
         spec:\n  memory: 64Mi\n  boot:\n    kernel: {{path: {}}}\n",
        guests.join("echo.elf").display()
    );
    let out = run_with_input(cp.kubectl().args(["apply", "-f", "-"]), &manifest);
    assert!(out.success, "apply: {}", out.stderr);
    let uid = wait_for(
        90,
        "the echo guest to run",
        || {
            let o = cp
                .kubectl()
                .args(["get", "vm", "echo", "-n", &ns, "-o", "json"])
                .output()
                .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            (v.pointer("/status/phase")? == "Running")
                .then(|| v.pointer("/metadata/uid")?.as_str().map(str::to_string))
                .flatten()
        },
        || agent.output(),
    );
    World {
        cp,
        ns,
        state,
        uid,
        agent,
        operator,
    }
}

fn kubectl_vm(w: &World) -> Command {
    let mut c = Command::new(bin_path("kubectl-vm"));
    c.arg("--kubeconfig")
        .arg(w.cp.kubeconfig())
        .args(["-n", &w.ns]);
    c
}

#[allow(clippy::cast_precision_loss)] // a rate for people
fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1_048_576.0 / d.as_secs_f64()
}

fn main() {
    let w = start();
    let vm_dir = w.state.join("vms").join(&w.uid);
    // Direct: the VMM's console socket on the node.
    let direct = UnixStream::connect(vm_dir.join("console.sock")).expect("console socket");
    let mut direct_in = direct.try_clone().expect("clone");
    let mut direct_out = BufReader::new(direct);
    let direct_lat = latencies(&mut direct_in, &mut direct_out, "d");

    // Through kube-apiserver, the operator and node-vmm: kubectl vm console.
    let mut console = kubectl_vm(&w)
        .args(["console", "echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl-vm console");
    let mut api_in = console.stdin.take().expect("stdin");
    let mut api_out = BufReader::new(console.stdout.take().expect("stdout"));
    // The first lines also open the stream; measured after them.
    let _ = latencies(&mut api_in, &mut api_out, "w");
    let api_lat = latencies(&mut api_in, &mut api_out, "a");
    let _ = console.kill();
    let _ = console.wait();

    // Logs: fill the ring, then read it back both ways.
    direct_in
        .write_all(format!("flood {FLOOD_KIB}\n").as_bytes())
        .expect("flood");
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            direct_out.read_line(&mut line).expect("read") > 0,
            "console closed"
        );
        if line.starts_with("flood done") {
            break;
        }
    }
    let t = Instant::now();
    let logs = kubectl_vm(&w)
        .args(["logs", "echo"])
        .output()
        .expect("kubectl-vm logs");
    let api_logs = t.elapsed();
    assert!(
        logs.status.success(),
        "logs: {}",
        String::from_utf8_lossy(&logs.stderr)
    );
    let t = Instant::now();
    let local = Command::new(bin_path("node-vmm"))
        .arg("console-log")
        .arg(&vm_dir)
        .output()
        .expect("node-vmm console-log");
    let local_logs = t.elapsed();

    println!("\n== console: keystroke -> echo ({SAMPLES} lines; the echo guest polls its UART at 100 Hz) ==");
    println!(
        "direct attach to the VMM console socket   p50 {:>9}  p95 {:>9}",
        ms(pct(&direct_lat, 50)),
        ms(pct(&direct_lat, 95))
    );
    println!(
        "kubectl vm console via kube-apiserver     p50 {:>9}  p95 {:>9}   ({:.2}x direct at p50; goal <= 3x)",
        ms(pct(&api_lat, 50)),
        ms(pct(&api_lat, 95)),
        pct(&api_lat, 50).as_secs_f64() / pct(&direct_lat, 50).as_secs_f64().max(1e-9)
    );
    println!("\n== logs: the console ring after a {FLOOD_KIB} KiB flood ==");
    println!(
        "kubectl vm logs via kube-apiserver        {} bytes in {} = {:.1} MiB/s",
        logs.stdout.len(),
        ms(api_logs),
        mib_per_s(logs.stdout.len(), api_logs)
    );
    println!(
        "node-vmm console-log on the node          {} bytes in {} = {:.1} MiB/s",
        local.stdout.len(),
        ms(local_logs),
        mib_per_s(local.stdout.len(), local_logs)
    );
    let _ =
        w.cp.kubectl()
            .args([
                "delete",
                "vm",
                "echo",
                "-n",
                &w.ns,
                "--wait=true",
                "--timeout=60s",
            ])
            .output();
    let _ =
        w.cp.kubectl()
            .args([
                "delete",
                "apiservice",
                "v1alpha1.subresources.kubevmm.io",
                "--ignore-not-found",
            ])
            .output();
    drop(w.operator);
    drop(w.agent);
}
