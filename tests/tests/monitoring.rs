//! Monitoring: the real `/metrics` of a running `kubevmm-operator` and a
//! running `node-vmm agent` (with one `idle` guest, so the per-VM series
//! exist) pass `promtool check metrics`; the chart's alert rules pass
//! `promtool check rules`; and every metric the rules and the Grafana
//! dashboard use is one the binaries export.
//!
//! `promtool` is built from the Go module proxy by `hack/helm-build.sh`
//! into `~/.cache/kubevmm/promtool-<version>/`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use kubevmm_e2e::{
    bin_path, build_guests, free_port, kill_guests, repo_root, run_with_input, wait_for,
    ControlPlane, Daemon,
};
use serde_json::Value;

/// `$KUBEVMM_PROMTOOL`, else the one `hack/helm-build.sh` built.
fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBEVMM_PROMTOOL") {
        return PathBuf::from(p);
    }
    let script = repo_root().join("hack/helm-build.sh");
    let text = std::fs::read_to_string(&script).expect("read hack/helm-build.sh");
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("PROMTOOL_VERSION="))
        .and_then(|v| v.split_whitespace().next())
        .expect("PROMTOOL_VERSION= in hack/helm-build.sh");
    let home = std::env::var_os("HOME").expect("HOME");
    let path = Path::new(&home)
        .join(".cache/kubevmm")
        .join(format!("promtool-{version}"))
        .join("promtool");
    assert!(
        path.is_file(),
        "{} is missing: run hack/helm-build.sh (hack/install-deps.sh and make test do)",
        path.display()
    );
    path
}

/// The body of `GET http://<addr>/metrics`.
fn scrape(addr: &str) -> Option<String> {
    kubevmm_e2e::http_get_ok(addr, "/metrics")
}

/// The metric family names in an exposition (`# TYPE name kind`).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// `kubevmm_*` names in a rule file or dashboard, with histogram suffixes
/// removed.
fn used_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(off) = text[i..].find("kubevmm_") {
        let start = i + off;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(base.to_string());
        i = end;
    }
    out
}

fn promtool_check_metrics(what: &str, text: &str) {
    let o = run_with_input(Command::new(promtool()).args(["check", "metrics"]), text);
    assert!(
        o.success,
        "promtool check metrics found problems in the {what}'s /metrics:\n{}{}",
        o.stdout, o.stderr
    );
}

/// Every exported `kubevmm_*` family is in docs/metrics.md, and so is every
/// metric the rules and the dashboard query.
fn check_documented(op_metrics: &str, agent_metrics: &str, rules: &Path) {
    // Every kubevmm_* metric exported is documented (docs/metrics.md), and
    // every one the rules and the dashboard query is documented too (some,
    // like disk and network series, exist only for VMs with disks/NICs).
    let exported: BTreeSet<String> = families(op_metrics)
        .union(&families(agent_metrics))
        .filter(|n| n.starts_with("kubevmm_"))
        .cloned()
        .collect();
    let documented = used_metrics(
        &std::fs::read_to_string(repo_root().join("docs/metrics.md"))
            .expect("read docs/metrics.md"),
    );
    let undocumented: Vec<&String> = exported.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in docs/metrics.md: {undocumented:?}"
    );
    let dashboard = repo_root().join("charts/kubevmm/dashboards/kubevmm.json");
    let dash_text = std::fs::read_to_string(&dashboard).expect("read dashboard");
    let _: Value = serde_json::from_str(&dash_text).expect("the dashboard is JSON");
    let mut used = used_metrics(&dash_text);
    used.extend(used_metrics(
        &std::fs::read_to_string(rules).expect("read rules"),
    ));
    let unknown: Vec<&String> = used.difference(&documented).collect();
    assert!(
        unknown.is_empty(),
        "rules/dashboard use metrics that are not documented (or not exported): {unknown:?}"
    );
}

struct Guests {
    state: PathBuf,
}

impl Drop for Guests {
    fn drop(&mut self) {
        // Never leave a VMM behind (the agent is already dead).
        kill_guests(&self.state);
    }
}

/// Starts a node agent for `node` and an operator scoped to `ns` and that
/// node; returns their metrics addresses and the daemons.
fn start_daemons(
    cp: &ControlPlane,
    ns: &str,
    node: &str,
    state: &Path,
    guests: &Path,
) -> (String, String, Daemon, Daemon) {
    let agent_addr = format!("127.0.0.1:{}", free_port().expect("port"));
    let mut cmd = Command::new(bin_path("node-vmm"));
    cmd.env("KUBECONFIG", cp.kubeconfig())
        .args(["agent", "--node-name", node, "--state-dir"])
        .arg(state)
        .arg("--allowed-dir")
        .arg(guests)
        .args(["--reserved-cpus", "1", "--metrics-addr", &agent_addr]);
    let agent = Daemon::start(cmd, state.join("agent.log"));
    let kubectl_ok = |args: &[&str]| {
        cp.kubectl()
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    wait_for(
        60,
        "the agent to register its HypervisorNode",
        || kubectl_ok(&["get", "hvnode", node]).then_some(()),
        || agent.output(),
    );
    assert!(kubectl_ok(&[
        "label",
        "hvnode",
        node,
        &format!("kubevmm.io/test-node={node}")
    ]));
    let op_port = free_port().expect("port");
    let op_addr = format!("127.0.0.1:{op_port}");
    let mut op = kubevmm_e2e::operator_command(cp, ns, &format!("op-{node}"), op_port);
    op.arg("--node-selector")
        .arg(format!("kubevmm.io/test-node={node}"));
    let operator = Daemon::start(op, state.join("operator.log"));

    (agent_addr, op_addr, agent, operator)
}

#[test]
fn metrics_of_running_binaries_pass_promtool_and_cover_rules_and_dashboard() {
    let r = kubevmm_vmm::host_check::probe();
    assert!(
        r.usable(),
        "this test boots a real guest and needs /dev/kvm: {:?}",
        r.problem
    );
    let promtool = promtool();
    let cp = ControlPlane::shared();
    let guests = build_guests();
    let ns = cp.namespace("mon");
    let node = format!("node-{ns}");
    let state = std::env::temp_dir().join(format!("kubevmm-e2e-{node}"));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).expect("state dir");
    let cleanup = Guests {
        state: state.clone(),
    };

    let (agent_addr, op_addr, mut agent, operator) = start_daemons(cp, &ns, &node, &state, &guests);
    let manifest = format!(
        "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: idle\nspec:\n  cpus: 1\n  memory: 64Mi\n  \
         nodeSelector: {{kubevmm.io/test-node: {node}}}\n  boot:\n    kernel: {{path: {kernel}}}\n",
        kernel = guests.join("idle.elf").display(),
    );
    let o = run_with_input(
        cp.kubectl().args(["apply", "-n", &ns, "-f", "-"]),
        &manifest,
    );
    assert!(o.success, "apply refused: {}", o.stderr);
    let phase = || {
        cp.kubectl()
            .args([
                "get",
                "vm",
                "idle",
                "-n",
                &ns,
                "-o",
                "jsonpath={.status.phase}",
            ])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    wait_for(
        90,
        "the idle VM to be Running",
        || (phase().as_deref() == Some("Running")).then_some(()),
        || {
            format!(
                "phase {:?}\n{}\n{}",
                phase(),
                agent.output(),
                operator.output()
            )
        },
    );

    // The per-VM series appear once the VM runs; the operator has counted it.
    let agent_metrics = wait_for(
        30,
        "per-VM series on node-vmm's /metrics",
        || scrape(&agent_addr).filter(|m| m.contains("kubevmm_vm_memory_bytes{")),
        || scrape(&agent_addr).unwrap_or_default(),
    );
    let op_metrics = wait_for(
        30,
        "the operator's /metrics to count the Running VM",
        || scrape(&op_addr).filter(|m| m.contains("kubevmm_operator_vms{phase=\"Running\"} 1")),
        || scrape(&op_addr).unwrap_or_default(),
    );
    promtool_check_metrics("operator", &op_metrics);
    promtool_check_metrics("node-vmm agent", &agent_metrics);

    // The alert rules are valid and the chart ships exactly this file.
    let rules = repo_root().join("charts/kubevmm/rules/kubevmm.rules.yaml");
    let o = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("run promtool");
    assert!(
        o.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    check_documented(&op_metrics, &agent_metrics, &rules);

    // Stop the guest through the API, then tear down.
    let _ = cp
        .kubectl()
        .args(["delete", "vm", "idle", "-n", &ns, "--wait=false"])
        .output();
    agent.kill();
    drop(operator);
    drop(cleanup);
}
