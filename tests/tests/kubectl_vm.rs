//! `kubectl vm` as a user runs it: the real binary, on the private control
//! plane, with the operator and node-vmm booting our guests. Every verb is
//! checked by what happens to the guest, not by the patch it sends.
mod agent_env;
mod support;

use std::process::Command;

use agent_env::Env;
use kubevmm_e2e::{bin_path, run_with_input, wait_for, Outcome};
use serde_json::Value;

/// `kubectl-vm ARGS` as the cluster admin, in the test's namespace.
fn vm_cli(env: &Env, args: &[&str]) -> Outcome {
    run_with_input(
        Command::new(bin_path("kubectl-vm"))
            .arg("--kubeconfig")
            .arg(env.cp.kubeconfig())
            .args(["-n", &env.ns])
            .args(args),
        "",
    )
}

/// `kubectl-vm ARGS` that must succeed; its stdout.
fn ok(env: &Env, args: &[&str]) -> String {
    let out = vm_cli(env, args);
    assert!(
        out.success,
        "kubectl vm {args:?} failed:\n{}\n{}",
        out.stdout, out.stderr
    );
    out.stdout
}

/// `kubectl-vm ARGS` that must fail with `want` in its error.
fn refused(env: &Env, args: &[&str], want: &str) {
    let out = vm_cli(env, args);
    assert!(
        !out.success,
        "kubectl vm {args:?} should fail: {}",
        out.stdout
    );
    assert!(
        out.stderr.contains(want),
        "kubectl vm {args:?}: want {want:?} in:\n{}",
        out.stderr
    );
}

fn field(env: &Env, name: &str, pointer: &str) -> Value {
    env.vm(name)
        .and_then(|v| v.pointer(pointer).cloned())
        .unwrap_or(Value::Null)
}

fn wait_status(env: &Env, name: &str, want: &str, seconds: u64) {
    wait_for(
        seconds,
        &format!("{name} to show STATUS {want}"),
        || (field(env, name, "/status/printableStatus") == want).then_some(()),
        || env.describe(name),
    );
}

#[test]
fn every_power_verb_moves_the_guest() {
    let env = Env::new("kvm-power");
    env.apply("web", "idle", "");
    wait_status(&env, "web", "Running", 60);

    // list and info say what kubectl get and describe say.
    let list = ok(&env, &["list", "-o", "wide"]);
    let header = list.lines().next().unwrap_or_default();
    assert!(
        header
            .split_whitespace()
            .eq(["NAME", "STATUS", "READY", "RESTARTS", "NODE", "IP", "AGE", "VCPUS", "MEMORY"]),
        "{list}"
    );
    let web = list
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_default();
    assert!(
        web.contains(" Running ") && web.contains(&env.node),
        "{list}"
    );
    let info = ok(&env, &["info", "web"]);
    for want in [
        "Status:         Running".to_string(),
        format!("Node:           {}", env.node),
        "Started".to_string(),
    ] {
        assert!(info.contains(&want), "missing {want:?}:\n{info}");
    }
    let ready = info.lines().find(|l| l.trim_start().starts_with("Ready "));
    assert!(ready.is_some_and(|l| l.contains(" True ")), "{info}");

    // pause / resume.
    assert!(ok(&env, &["pause", "web"]).contains("pause requested"));
    wait_status(&env, "web", "Paused", 30);
    refused(&env, &["pause", "web"], "is already paused");
    ok(&env, &["resume", "web"]);
    wait_status(&env, "web", "Running", 30);
    refused(&env, &["resume", "web"], "is not paused");

    // restart: a new VMM, the restart counted.
    let pid = env.vmm_pid(&env.uid("web"));
    ok(&env, &["restart", "web"]);
    wait_for(
        60,
        "web to run again in a new VMM after restart",
        || {
            let running = field(&env, "web", "/status/printableStatus") == "Running";
            let new = env.vmm_pid(&env.uid("web")).is_some_and(|p| Some(p) != pid);
            (running && new).then_some(())
        },
        || env.describe("web"),
    );

    // stop with a grace period: ACPI, the guest powers off, it stays down.
    ok(&env, &["stop", "web", "--grace-period", "20"]);
    wait_status(&env, "web", "Stopped", 60);
    assert_eq!(field(&env, "web", "/spec/runStrategy"), "Halted");
    let ready = env.condition("web", "Ready").unwrap_or_default();
    assert_eq!(ready["reason"], "ShutDown", "{ready}");
    let events = env.events_mentioning("web", "20s grace period");
    assert!(events.contains("20s grace period"), "{events}");
    refused(
        &env,
        &["stop", "web"],
        "is already stopped (status Stopped)",
    );
    refused(
        &env,
        &["restart", "web"],
        "is not running (status Stopped): use `kubectl vm start web`",
    );

    // start restores the strategy stop replaced.
    assert!(ok(&env, &["start", "web"]).contains("start requested"));
    wait_status(&env, "web", "Running", 60);
    assert_eq!(field(&env, "web", "/spec/runStrategy"), "Always");
    refused(
        &env,
        &["start", "web"],
        "is already running (status Running)",
    );

    // stop --force: no ACPI, at once.
    ok(&env, &["stop", "web", "--force"]);
    wait_status(&env, "web", "Stopped", 30);
    let ready = env.condition("web", "Ready").unwrap_or_default();
    assert_eq!(ready["reason"], "Stopped", "{ready}");
    let forced = "stopped by force at once (grace period 0)";
    let events = env.events_mentioning("web", forced);
    assert!(events.contains(forced), "{events}");
    refused(
        &env,
        &["stop", "web", "--force", "--grace-period", "5"],
        "--force stops at once",
    );
}

#[test]
fn start_runs_a_finished_manual_vm_again() {
    let env = Env::new("kvm-manual");
    // hello prints and powers off: a Manual VM ends Stopped after one run.
    env.apply("once", "hello", "  runStrategy: Manual\n");
    wait_status(&env, "once", "Stopped", 60);
    // Runs counted by their Starting transitions (startedAt has whole
    // seconds: two short runs may share one).
    let runs = || {
        field(&env, "once", "/status/phaseTransitionTimestamps")
            .as_array()
            .map_or(0, |t| t.iter().filter(|p| p["phase"] == "Starting").count())
    };
    let first = runs();
    assert_eq!(first, 1, "{}", env.describe("once"));
    refused(&env, &["stop", "once"], "is already stopped");

    ok(&env, &["start", "once"]);
    wait_for(
        60,
        "the Manual VM to run again and stop again",
        || {
            let stopped = field(&env, "once", "/status/printableStatus") == "Stopped";
            (runs() == 2 && stopped).then_some(())
        },
        || env.describe("once"),
    );
    assert_eq!(field(&env, "once", "/spec/runStrategy"), "Manual");
}

#[test]
fn create_prints_what_the_api_server_accepts_and_errors_say_what_to_do() {
    let env = Env::new("kvm-create");
    let kernel = env.guests.join("idle.elf");
    let kernel = kernel.to_str().unwrap_or_default();
    let yaml = ok(
        &env,
        &[
            "create",
            "made",
            "--kernel",
            kernel,
            "--memory",
            "64Mi",
            "--network",
            "none",
            "--disk",
            "name=scratch,size=16Mi",
            "--ssh-key",
            "ssh-ed25519 AAAAC3Nz test@host",
            "--dry-run=client",
            "-o",
            "yaml",
        ],
    );
    assert!(
        yaml.contains("kind: VirtualMachine") && yaml.contains("ssh_authorized_keys"),
        "{yaml}"
    );
    // Pinned to the test's node, as every VM of these tests.
    let pinned = yaml.replace(
        "spec:\n",
        &format!(
            "spec:\n  nodeSelector:\n    kubevmm.io/test-node: {}\n",
            env.node
        ),
    );
    let applied = run_with_input(
        env.cp.kubectl().args(["apply", "-n", &env.ns, "-f", "-"]),
        &pinned,
    );
    assert!(
        applied.success,
        "the API server refused the dry run's output: {}\n{pinned}",
        applied.stderr
    );
    wait_status(&env, "made", "Running", 90);

    bad_input_is_refused(&env, kernel);

    // Versions: ours, the API server's, the node's agent.
    let v = ok(&env, &["version"]);
    assert!(
        v.contains("Client Version: kubectl-vm ") && v.contains("Server Version: Kubernetes v1."),
        "{v}"
    );
    assert!(v.contains(&format!("on node {}", env.node)), "{v}");

    // A user who may read VMs but not change them is told which verb is missing.
    env.kubectl(&[
        "create",
        "role",
        "vm-reader",
        "--verb=get,list,watch",
        "--resource=virtualmachines.kubevmm.io",
    ]);
    let kc = support::bound_sa_kubeconfig(env.cp, &env.ns, "reader", "role/vm-reader");
    let as_reader = |args: &[&str]| {
        run_with_input(
            Command::new(bin_path("kubectl-vm"))
                .arg("--kubeconfig")
                .arg(&kc)
                .args(["-n", &env.ns])
                .args(args),
            "",
        )
    };
    let listed = as_reader(&["list"]);
    assert!(
        listed.success && listed.stdout.contains("made"),
        "{}",
        listed.stderr
    );
    let stop = as_reader(&["stop", "made"]);
    assert!(!stop.success);
    assert!(
        stop.stderr.contains(&format!(
            "forbidden: you may not patch virtualmachines.kubevmm.io in namespace {}",
            env.ns
        )),
        "{}",
        stop.stderr
    );
}

/// Bad flags are refused before anything is sent, naming the flag; a name
/// taken or unknown says so.
fn bad_input_is_refused(env: &Env, kernel: &str) {
    refused(
        env,
        &["create", "bad", "--kernel", kernel, "--memory", "12Mi"],
        "spec.memory must be at least 64Mi",
    );
    refused(
        env,
        &[
            "create",
            "bad",
            "--kernel",
            kernel,
            "--disk",
            "size=1Gi,image=x",
        ],
        "--disk \"size=1Gi,image=x\"",
    );
    refused(
        env,
        &[
            "create",
            "made",
            "--kernel",
            kernel,
            "--memory",
            "64Mi",
            "--network",
            "none",
        ],
        "already exists",
    );
    refused(
        env,
        &["info", "nosuch"],
        &format!("VirtualMachine nosuch not found in namespace {}", env.ns),
    );
}
