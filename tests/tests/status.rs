//! What `kubectl get vm` and `describe` say, reached for real: one node,
//! our guests, the operator and node-vmm on the private control plane, and
//! every status word a person reads checked in `kubectl get vm -o wide`.
mod agent_env;

use agent_env::Env;
use kubevmm_e2e::wait_for;
use serde_json::Value;

/// The STATUS column of every VM, from `kubectl get vm -o wide`, with the
/// whole listing for messages.
fn listing(env: &Env) -> (Vec<(String, Vec<String>)>, String) {
    let out = env.kubectl(&["get", "vm", "-o", "wide"]);
    let rows = out
        .lines()
        .skip(1)
        .map(|l| {
            let mut cells = l.split_whitespace().map(str::to_string);
            let name = cells.next().unwrap_or_default();
            (name, cells.collect())
        })
        .collect();
    (rows, out)
}

fn printable(env: &Env, name: &str) -> Option<String> {
    env.vm(name)?
        .pointer("/status/printableStatus")?
        .as_str()
        .map(str::to_string)
}

fn wait_printable(env: &Env, name: &str, want: &str, seconds: u64) {
    wait_for(
        seconds,
        &format!("{name} to show STATUS {want}"),
        || (printable(env, name).as_deref() == Some(want)).then_some(()),
        || env.describe(name),
    );
}

fn patch(env: &Env, name: &str, body: &str) {
    env.kubectl(&["patch", "vm", name, "--type", "merge", "-p", body]);
}

#[test]
fn every_status_a_person_reads_in_one_listing() {
    // Room for all of them on one vCPU (as KubeVirt's cpuAllocationRatio),
    // and every start step reported as slow.
    let env = Env::with_args(
        "status",
        &["--slow-start-step-ms", "0"],
        &["--cpu-overcommit", "20"],
    );
    env.apply("running", "idle", "");
    env.apply("paused", "idle", "  paused: true\n");
    env.apply("halted", "idle", "  runStrategy: Halted\n");
    env.apply("done", "hello", "  runStrategy: Once\n");
    env.apply("crashy", "crash", "  runStrategy: Always\n");
    env.apply("broken", "crash", "  runStrategy: Once\n");
    env.apply_kernel(
        "invalid",
        std::path::Path::new("/etc/hostname"),
        "  runStrategy: Once\n",
    );
    env.apply_sized("big", &env.guests.join("idle.elf"), 64, "");

    wait_printable(&env, "running", "Running", 60);
    wait_printable(&env, "paused", "Paused", 60);
    wait_printable(&env, "halted", "Stopped", 60);
    wait_printable(&env, "done", "Succeeded", 60);
    wait_printable(&env, "broken", "Failed", 60);
    wait_printable(&env, "invalid", "InvalidSpec", 60);
    wait_printable(&env, "big", "ErrorUnschedulable", 60);
    // A crash loop is named as such, with the restarts counting.
    wait_for(
        120,
        "crashy: CrashLoopBackOff after 2 restarts",
        || {
            let vm = env.vm("crashy")?;
            let restarts = vm.pointer("/status/restartCount")?.as_i64()?;
            (restarts >= 2 && printable(&env, "crashy").as_deref() == Some("CrashLoopBackOff"))
                .then_some(())
        },
        || env.describe("crashy"),
    );

    columns_read_at_a_glance(&env);
    a_repeated_crash_is_counted(&env);
    start_is_explained(&env);
    transitions_stay_bounded(&env);
    deleting_shows_terminating(&env);
    // Node loss: the paused guest's node stops heartbeating.
    env.agent.signal(libc::SIGSTOP);
    wait_printable(&env, "paused", "NodeLost", 60);
    let (rows, out) = listing(&env);
    println!("{out}");
    assert!(
        rows.iter()
            .any(|(n, c)| n == "paused" && c[0] == "NodeLost"),
        "{out}"
    );
    env.agent.signal(libc::SIGCONT);
    wait_printable(&env, "paused", "Paused", 60);
}

/// The columns, as a person sees them.
fn columns_read_at_a_glance(env: &Env) {
    // The crash loop restarts its guest now and then (Starting for a moment):
    // take a listing where every VM shows its lasting status.
    let (rows, out) = wait_for(
        60,
        "a listing with every VM in its lasting status",
        || {
            let (rows, out) = listing(env);
            let crashing = rows.iter().any(|(n, c)| {
                n == "crashy" && c.first().map(String::as_str) == Some("CrashLoopBackOff")
            });
            crashing.then_some((rows, out))
        },
        || listing(env).1,
    );
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "STATUS", "READY", "RESTARTS", "NODE", "IP", "AGE", "VCPUS", "MEMORY"],
        "{out}"
    );
    let row = |name: &str| -> Vec<String> {
        rows.iter()
            .find(|(n, _)| n == name)
            .map_or_else(|| panic!("{name} not listed:\n{out}"), |(_, c)| c.clone())
    };
    for (name, status) in [
        ("running", "Running"),
        ("paused", "Paused"),
        ("halted", "Stopped"),
        ("done", "Succeeded"),
        ("crashy", "CrashLoopBackOff"),
        ("broken", "Failed"),
        ("invalid", "InvalidSpec"),
        ("big", "ErrorUnschedulable"),
    ] {
        assert_eq!(row(name)[0], status, "{name}:\n{out}");
    }
    let running = row("running");
    assert_eq!(
        &running[..4],
        ["Running", "True", "0", env.node.as_str()],
        "{out}"
    );
    assert_eq!(
        &running[running.len() - 2..],
        ["1", "64Mi"],
        "-o wide: vCPUs and memory\n{out}"
    );
    let crashy = row("crashy");
    assert_eq!(crashy[1], "False", "{out}");
    assert!(
        crashy[2].parse::<i64>().is_ok_and(|n| n >= 2),
        "RESTARTS counts: {out}"
    );
    let big = row("big");
    assert_eq!(&big[big.len() - 2..], ["64", "64Mi"], "{out}");
    println!("{out}");
}

/// A repeated crash is one message with a count, not copies.
fn a_repeated_crash_is_counted(env: &Env) {
    // Read between two restarts, as a person running describe would.
    let ready = env.wait_ready_reason("crashy", "GuestCrashed", 60);
    let msg = ready["message"].as_str().unwrap_or_default();
    assert_eq!(ready["reason"], "GuestCrashed", "{ready}");
    assert_eq!(msg.matches("the guest crashed").count(), 1, "{msg}");
    assert!(
        msg.contains("times in a row since") && msg.contains("next start at"),
        "{msg}"
    );
    assert!(!msg.contains(" | "), "no concatenated copies: {msg}");
    let vm = env.vm("crashy").expect("crashy");
    let failure = &vm["status"]["lastFailure"];
    assert_eq!(failure["reason"], "GuestCrashed", "{failure}");
    assert!(
        failure["count"].as_i64().is_some_and(|n| n >= 2),
        "{failure}"
    );
    let once = failure["message"].as_str().unwrap_or_default();
    assert_eq!(once.matches("triple fault").count(), 1, "{failure}");
    assert_eq!(
        once.matches("crashed").count(),
        1,
        "the cause once: {failure}"
    );
    assert_eq!(msg.matches("triple fault").count(), 1, "{msg}");
}

/// Where start time went: transitions from creation, slow steps as Events.
fn start_is_explained(env: &Env) {
    let vm = env.vm("running").expect("running");
    let phases: Vec<&str> = vm["status"]["phaseTransitionTimestamps"]
        .as_array()
        .expect("transitions")
        .iter()
        .filter_map(|t| t["phase"].as_str())
        .collect();
    assert_eq!(phases.first(), Some(&"Pending"), "{phases:?}");
    assert!(
        phases.contains(&"Scheduled") && phases.contains(&"Starting"),
        "{phases:?}"
    );
    assert_eq!(phases.last(), Some(&"Running"), "{phases:?}");
    let events = env.events_mentioning("running", "start step VMM start");
    assert!(
        events.contains("SlowStartStep")
            && events.contains("start step disk and network preparation took"),
        "{events}"
    );
    assert!(events.contains("start step VMM start"), "{events}");
}

/// The list stays bounded however often the phase changes.
fn transitions_stay_bounded(env: &Env) {
    // 4 entries so far (Pending, Scheduled, Starting, Paused), 14 more.
    for i in 0..14 {
        let paused = i % 2 == 1;
        patch(
            env,
            "paused",
            &format!(r#"{{"spec":{{"paused":{paused}}}}}"#),
        );
        env.wait_phase("paused", if paused { "Paused" } else { "Running" }, 60);
    }
    let vm = env.vm("paused").expect("paused");
    let list = vm["status"]["phaseTransitionTimestamps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(list.len(), 16, "bounded to the newest 16: {list:?}");
    assert_eq!(
        list.last().map(|t| t["phase"].clone()),
        Some(Value::from("Paused")),
        "{list:?}"
    );
}

/// Deleting: Terminating while something else still holds the object.
fn deleting_shows_terminating(env: &Env) {
    patch(
        env,
        "running",
        r#"{"metadata":{"finalizers":["kubevmm.io/guest-cleanup","example.com/hold"]}}"#,
    );
    env.kubectl(&["delete", "vm", "running", "--wait=false"]);
    wait_printable(env, "running", "Terminating", 60);
    wait_for(
        60,
        "node-vmm to let go of the deleted VM",
        || {
            let vm = env.vm("running")?;
            let fins = vm.pointer("/metadata/finalizers")?.as_array()?.clone();
            (fins.len() == 1).then_some(())
        },
        || env.describe("running"),
    );
    assert_eq!(printable(env, "running").as_deref(), Some("Terminating"));
    patch(env, "running", r#"{"metadata":{"finalizers":[]}}"#);
}

fn running_vms(env: &Env) -> Option<i64> {
    let out = env.kubectl(&[
        "get",
        "hvnode",
        &env.node,
        "-o",
        "jsonpath={.status.runningVms}",
    ]);
    out.trim().parse().ok()
}

#[test]
fn the_node_counts_its_running_vms_as_they_change_not_at_the_next_heartbeat() {
    // Heartbeats every 20 s; the count must follow within 10 s.
    let env = Env::with_args("nodecount", &["--lease-seconds", "60"], &[]);
    env.apply("one", "idle", "");
    env.wait_phase("one", "Running", 90);
    wait_for(
        10,
        "runningVms 1 soon after the VMM started",
        || (running_vms(&env) == Some(1)).then_some(()),
        || env.describe("one"),
    );
    env.kubectl(&["delete", "vm", "one", "--wait=true", "--timeout=60s"]);
    wait_for(
        10,
        "runningVms 0 soon after the VMM ended",
        || (running_vms(&env) == Some(0)).then_some(()),
        || env.describe("one"),
    );
}
