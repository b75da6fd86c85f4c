//! `kubectl apply` → a running KVM guest, and its whole lifecycle, with the
//! real parts: a private kube-apiserver, the `kubevmm-operator` binary, the
//! `node-vmm agent` binary and real guests on `/dev/kvm` (our `counter` and
//! `crash` test guests). Each test gets its own namespace, node, agent and
//! operator (scoped to that namespace and node), so tests cannot see each
//! other's VMs.
mod agent_env;

use agent_env::{alive, start_agent, Env};
use kubevmm_e2e::wait_for;
use serde_json::Value;

#[test]
fn apply_boots_the_guest_and_reports_running() {
    let env = Env::new("apply");
    env.apply("web", "counter", "");
    env.wait_phase("web", "Running", 60);
    let vm = env.vm("web").expect("vm");
    assert_eq!(
        vm.pointer("/status/nodeName").and_then(Value::as_str),
        Some(env.node.as_str())
    );
    assert_eq!(
        env.condition("web", "Ready").expect("Ready")["status"],
        "True"
    );
    assert_eq!(
        vm.pointer("/status/observedGeneration")
            .and_then(Value::as_i64),
        vm.pointer("/metadata/generation").and_then(Value::as_i64)
    );
    let uid = env.uid("web");
    wait_for(
        30,
        "the guest's marker on its console",
        || env.console(&uid).contains("counter running").then_some(()),
        || env.console(&uid),
    );
    wait_for(
        30,
        "heartbeat ticks",
        || env.console(&uid).contains("tick 3").then_some(()),
        || env.console(&uid),
    );
    let row = env.kubectl(&["get", "vm", "web", "--no-headers"]);
    assert!(
        row.contains("Running") && row.contains(&env.node),
        "kubectl get vm: {row}"
    );
    wait_for(
        30,
        "HypervisorNode to count the running VM",
        || {
            let out = env
                .cp
                .kubectl()
                .args([
                    "get",
                    "hvnode",
                    &env.node,
                    "-o",
                    "jsonpath={.status.runningVms}",
                ])
                .output()
                .ok()?;
            (String::from_utf8_lossy(&out.stdout) == "1").then_some(())
        },
        String::new,
    );
}

#[test]
fn halted_stops_the_guest_and_its_vmm() {
    let env = Env::new("halted");
    env.apply("h", "counter", "");
    env.wait_phase("h", "Running", 60);
    let uid = env.uid("h");
    let pid = env.vmm_pid(&uid).expect("vmm pid");
    env.kubectl(&[
        "patch",
        "vm",
        "h",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"runStrategy":"Halted"}}"#,
    ]);
    env.wait_phase("h", "Stopped", 60);
    wait_for(
        10,
        "the VMM process to exit",
        || (!alive(pid)).then_some(()),
        String::new,
    );
    assert!(
        env.console(&uid).contains("power button pressed"),
        "Halted shuts the guest down through ACPI"
    );
    env.kubectl(&[
        "patch",
        "vm",
        "h",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"runStrategy":"Always"}}"#,
    ]);
    env.wait_phase("h", "Running", 60);
}

#[test]
fn pause_and_unpause() {
    let env = Env::new("pause");
    env.apply("p", "counter", "");
    env.wait_phase("p", "Running", 60);
    let uid = env.uid("p");
    wait_for(
        30,
        "ticks",
        || env.console(&uid).contains("tick 2").then_some(()),
        || env.console(&uid),
    );
    env.kubectl(&[
        "patch",
        "vm",
        "p",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"paused":true}}"#,
    ]);
    env.wait_phase("p", "Paused", 30);
    assert_eq!(
        env.condition("p", "Paused").expect("Paused condition")["status"],
        "True"
    );
    let frozen = env.console(&uid);
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(env.console(&uid), frozen, "a paused guest prints nothing");
    env.kubectl(&[
        "patch",
        "vm",
        "p",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"paused":false}}"#,
    ]);
    env.wait_phase("p", "Running", 30);
    wait_for(
        30,
        "the guest to go on ticking",
        || (env.console(&uid).len() > frozen.len()).then_some(()),
        String::new,
    );
}

#[test]
fn delete_shuts_the_guest_down_and_releases_everything() {
    let env = Env::new("delete");
    env.apply("d", "counter", "");
    env.wait_phase("d", "Running", 60);
    let uid = env.uid("d");
    let pid = env.vmm_pid(&uid).expect("vmm pid");
    let finalizers = env.vm("d").expect("vm")["metadata"]["finalizers"].to_string();
    assert!(
        finalizers.contains("kubevmm.io/guest-cleanup"),
        "finalizer set: {finalizers}"
    );
    env.kubectl(&["delete", "vm", "d", "--wait=true", "--timeout=60s"]);
    assert!(
        env.vm("d").is_none(),
        "VM gone after its finalizer was removed"
    );
    assert!(!alive(pid), "VMM process gone");
    assert!(
        !env.vm_dir(&uid).exists(),
        "state directory, socket and console removed"
    );
    let events = env.events_mentioning("d", "ShutDown");
    assert!(
        events.contains("ShutDown"),
        "graceful ACPI shutdown, not a force stop:\n{events}"
    );
    assert!(!events.contains("ForceStopped"), "{events}");
}

#[test]
fn vm_that_fits_nowhere_waits_then_runs_when_room_appears() {
    // The agent reserves 1 of the 2 host CPUs: at 1:1, room for one 1-vCPU guest.
    let env = Env::with_args("fit", &[], &["--cpu-overcommit", "1"]);
    env.apply("first", "counter", "");
    env.wait_phase("first", "Running", 60);
    env.apply("second", "counter", "");
    wait_for(
        30,
        "second to be Unschedulable",
        || {
            let c = env.condition("second", "Scheduled")?;
            (c["status"] == "False" && c["reason"] == "Unschedulable").then_some(())
        },
        || env.describe("second"),
    );
    assert_eq!(env.phase("second").as_deref(), Some("Pending"));
    let msg = env.condition("second", "Scheduled").expect("Scheduled")["message"].to_string();
    assert!(
        msg.contains("vCPU"),
        "the reason names what is short: {msg}"
    );
    env.kubectl(&["delete", "vm", "first", "--wait=true", "--timeout=60s"]);
    env.wait_phase("second", "Running", 60);
}

#[test]
fn guests_survive_a_killed_agent_and_are_readopted() {
    let mut env = Env::new("adopt");
    env.apply("a", "counter", "");
    env.wait_phase("a", "Running", 60);
    let uid = env.uid("a");
    let pid = env.vmm_pid(&uid).expect("vmm pid");
    let agent_pid = env.agent.pid();
    let parent = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("vmm stat");
    let ppid: i32 = parent[parent.rfind(')').expect("stat")..]
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .expect("ppid");
    assert_ne!(ppid, agent_pid, "the VMM is not the agent's child");
    let cgroup2 = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            .unwrap_or_default()
    };
    let vmm_cgroup = cgroup2(pid);
    assert!(
        vmm_cgroup.ends_with(&format!("kubevmm/{}/vm-{uid}", env.node))
            && vmm_cgroup != cgroup2(agent_pid),
        "the VMM sits in its own cgroup, outside the agent's: {vmm_cgroup:?}"
    );
    env.agent.kill();
    let before = env.console(&uid).len();
    wait_for(
        30,
        "the guest to keep running without an agent",
        || (alive(pid) && env.console(&uid).len() > before).then_some(()),
        String::new,
    );
    env.agent = start_agent(env.cp, &env.node, &env.state, &env.guests, "agent2.log");
    wait_for(
        30,
        "the new agent to re-adopt the VMM",
        || env.agent.output().contains("re-adopted").then_some(()),
        || env.agent.output(),
    );
    assert_eq!(env.phase("a").as_deref(), Some("Running"));
    assert_eq!(env.vmm_pid(&uid), Some(pid), "same VMM, not a restart");
    // The re-adopted VMM is fully controlled: pause it.
    env.kubectl(&[
        "patch",
        "vm",
        "a",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"paused":true}}"#,
    ]);
    env.wait_phase("a", "Paused", 30);
}

#[test]
fn crashing_guest_fails_once_and_restarts_always() {
    let env = Env::new("crash");
    env.apply("once", "crash", "  runStrategy: Once\n");
    env.wait_phase("once", "Failed", 60);
    let ready = env.condition("once", "Ready").expect("Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "GuestCrashed", "{ready}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        env.phase("once").as_deref(),
        Some("Failed"),
        "a crashed Once VM stays Failed"
    );
    env.kubectl(&["delete", "vm", "once", "--wait=true", "--timeout=60s"]);

    env.apply("always", "crash", "  runStrategy: Always\n");
    wait_for(
        60,
        "restarts with backoff",
        || {
            let n = env
                .vm("always")?
                .pointer("/status/restartCount")?
                .as_i64()?;
            (n >= 2).then_some(())
        },
        || env.describe("always"),
    );
    let events = env.events_mentioning("always", "GuestCrashed");
    assert!(events.contains("GuestCrashed"), "{events}");
}

#[test]
fn manual_vm_restarts_on_request() {
    let env = Env::new("manual");
    env.apply(
        "m",
        "counter",
        "  runStrategy: Manual\n  terminationGracePeriodSeconds: 30\n",
    );
    env.wait_phase("m", "Running", 60);
    let uid = env.uid("m");
    let pid = env.vmm_pid(&uid).expect("pid");
    env.kubectl(&["annotate", "vm", "m", "kubevmm.io/restart-requested=1"]);
    wait_for(
        60,
        "the restart to be carried out",
        || {
            let vm = env.vm("m")?;
            let handled = vm
                .pointer("/metadata/annotations/kubevmm.io~1restart-handled")?
                .as_str()?
                == "1";
            let restarted = vm.pointer("/status/restartCount")?.as_i64()? == 1;
            (handled && restarted && env.phase("m").as_deref() == Some("Running")).then_some(())
        },
        || env.describe("m"),
    );
    assert_ne!(env.vmm_pid(&uid), Some(pid), "a new VMM process");
}

#[test]
fn a_node_that_stops_heartbeating_is_marked_lost() {
    let env = Env::new("lost");
    env.apply("l", "counter", "");
    env.wait_phase("l", "Running", 60);
    env.agent.signal(libc::SIGSTOP);
    wait_for(
        60,
        "NodeLost on the VM",
        || {
            let c = env.condition("l", "NodeLost")?;
            (c["status"] == "True").then_some(())
        },
        || env.describe("l"),
    );
    assert_ne!(
        env.condition("l", "Ready").expect("Ready")["status"],
        "True",
        "a lost VM is not reported Ready"
    );
    env.agent.signal(libc::SIGCONT);
    wait_for(
        60,
        "NodeLost to clear",
        || {
            let c = env.condition("l", "NodeLost");
            c.is_none_or(|c| c["status"] != "True").then_some(())
        },
        || env.describe("l"),
    );
}

#[test]
fn node_paths_outside_the_allow_list_fail_with_a_reason() {
    let env = Env::new("allow");
    // Once: a failed VM under Always stays bound (node-vmm retries it) and
    // keeps its vCPU, which this one-vCPU node needs for `inside` below.
    env.apply_kernel(
        "outside",
        std::path::Path::new("/etc/hostname"),
        "  runStrategy: Once\n",
    );
    env.wait_phase("outside", "Failed", 60);
    let ready = env.condition("outside", "Ready").expect("Ready");
    assert_eq!(ready["reason"], "InvalidSpec", "{ready}");
    let msg = ready["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("spec.boot.kernel.path") && msg.contains("outside the allowed directories"),
        "{msg}"
    );
    // The agent keeps serving other VMs: no crash, no crash loop.
    env.apply("inside", "counter", "");
    env.wait_phase("inside", "Running", 60);
}

#[test]
fn a_new_users_five_small_vms_all_run_on_a_two_core_node() {
    // The defaults a new user meets: the operator's vCPU overcommit (10, as
    // KubeVirt's cpuAllocationRatio) on a node with one vCPU allocatable.
    let env = Env::new("defaults");
    let names = ["a", "b", "c", "d", "e"];
    for name in names {
        env.apply(name, "idle", "");
    }
    for name in names {
        env.wait_phase(name, "Running", 90);
    }
}
