//! The chart where it runs: a kubelet (docs/deploy.md). `hack/deploy.sh up`
//! starts a private control plane, this machine's kubelet node (containerd,
//! runc, the CNI bridge, kube-scheduler, kube-proxy), builds our two images
//! from the workspace's binaries with `images/build.py`, imports them into
//! containerd and installs `charts/kubevmm` with helm: the operator and
//! node-vmm run as pods, and the agent in the `DaemonSet`'s pod boots guests.
//!
//! One kubelet per machine: every step is in one test, in order.
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kubevmm_e2e::{
    bin_path, build_guests, free_port, kill_guests, repo_root, run_with_input, wait_for,
};
use serde_json::Value;
use support::{cached_tool, ok, outcome, tail};

const NS: &str = "kubevmm-system";
const RELEASE: &str = "kubevmm";
const VM_NS: &str = "deploy";
const GUESTS: &str = "/var/lib/kubevmm/guests";

/// A deployed cluster; `hack/deploy.sh down` when dropped.
struct Deployed {
    dir: PathBuf,
    env: Vec<(String, String)>,
    state: PathBuf,
}

impl Deployed {
    fn up() -> Self {
        let dir = std::env::temp_dir().join(format!("kubevmm-deploy-{}", std::process::id()));
        let state = dir.join("node-state");
        std::fs::create_dir_all(&dir).expect("test dir");
        // The agent's host ports and network are the test's own, so a
        // leftover of another run cannot be mistaken for this one.
        let values = dir.join("values.yaml");
        let port = || free_port().expect("port");
        std::fs::write(
            &values,
            format!(
                "nodeVmm:\n  stateDir: {}\n  metricsPort: {}\n  masquerade:\n    bridge: kvdeploy0\n    \
                 subnet: 10.219.0.0/22\naccess:\n  nodePort: {}\n",
                state.display(),
                port(),
                port()
            ),
        )
        .expect("values");
        let bin = bin_path("node-vmm");
        let env: Vec<(String, String)> = vec![
            (
                "KUBEVMM_CLUSTER_DIR".into(),
                dir.join("cluster").display().to_string(),
            ),
            ("KUBEVMM_APISERVER_PORT".into(), port().to_string()),
            ("KUBEVMM_ETCD_PORT".into(), port().to_string()),
            ("KUBEVMM_ETCD_PEER_PORT".into(), port().to_string()),
            ("KUBEVMM_KCM_PORT".into(), port().to_string()),
            // The images are built from the binaries this test run built.
            (
                "KUBEVMM_BIN".into(),
                bin.parent().expect("bin dir").display().to_string(),
            ),
            (
                "KUBEVMM_HELM".into(),
                cached_tool("helm", "HELM_VERSION").display().to_string(),
            ),
            ("KUBEVMM_HELM_VALUES".into(), values.display().to_string()),
            ("KUBEVMM_PROMETHEUS_PORT".into(), port().to_string()),
            (
                "HELM_CONFIG_HOME".into(),
                dir.join("helm/config").display().to_string(),
            ),
            (
                "HELM_CACHE_HOME".into(),
                dir.join("helm/cache").display().to_string(),
            ),
            (
                "HELM_DATA_HOME".into(),
                dir.join("helm/data").display().to_string(),
            ),
        ];
        let d = Self { dir, env, state };
        let t = Instant::now();
        let o = outcome(&mut d.deploy("up"));
        assert!(o.success, "hack/deploy.sh up failed:\n{}", tail(&o.stderr));
        eprintln!(
            "deploy: control plane + kubelet node + images + helm install took {:.1}s",
            t.elapsed().as_secs_f64()
        );
        d
    }

    fn deploy(&self, cmd: &str) -> Command {
        let mut c = Command::new(repo_root().join("hack/deploy.sh"));
        c.arg(cmd).envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// The URL of the Prometheus `hack/deploy.sh up` started.
    fn prometheus(&self) -> String {
        let port = &self
            .env
            .iter()
            .find(|(k, _)| k == "KUBEVMM_PROMETHEUS_PORT")
            .expect("port")
            .1;
        format!("http://127.0.0.1:{port}")
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("cluster/admin.kubeconfig")
    }

    fn kubectl(&self) -> Command {
        let mut c = Command::new("kubectl");
        c.env("KUBECONFIG", self.kubeconfig());
        c
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = ok(self.kubectl().args(args).args(["-o", "json"]));
        serde_json::from_str(&out).expect("kubectl JSON")
    }

    /// The Ready pods of a component (`app.kubernetes.io/name`): name, image.
    fn ready_pods(&self, component: &str) -> Vec<(String, String)> {
        let sel = format!("app.kubernetes.io/name={component}");
        let pods = self.json(&["-n", NS, "get", "pods", "-l", &sel]);
        pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .filter(|p| {
                p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
            .map(|p| {
                (
                    p["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    p["spec"]["containers"][0]["image"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    }

    fn pods_table(&self) -> String {
        outcome(self.kubectl().args(["-n", NS, "get", "pods", "-o", "wide"])).stdout
    }

    /// The one node-vmm pod, once it is Ready and is not `old`.
    fn node_vmm_pod_replacing(&self, old: &str) -> (String, String) {
        wait_for(
            120,
            "a Ready node-vmm pod replacing the old one",
            || {
                let pods = self.ready_pods("node-vmm");
                (pods.len() == 1 && pods[0].0 != old).then(|| pods[0].clone())
            },
            || self.pods_table(),
        )
    }

    fn agent_log(&self, pod: &str) -> String {
        outcome(self.kubectl().args(["-n", NS, "logs", pod])).stdout
    }

    /// The VMM's pid as the agent recorded it (`vms/<uid>/vmm.pid`).
    fn vmm_pid(&self, uid: &str) -> i32 {
        let path = self.state.join("vms").join(uid).join("vmm.pid");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let v: Value = serde_json::from_str(&text).expect("vmm.pid JSON");
        i32::try_from(v["pid"].as_i64().expect("pid")).expect("pid fits")
    }

    fn vm(&self) -> Value {
        self.json(&["-n", VM_NS, "get", "vm", "echo"])
    }

    /// A line typed into the guest's console through kube-apiserver, the
    /// operator's pod and the agent's pod comes back answered (retried
    /// while a rolled operator or agent comes up).
    fn console_answers(&self, line: &str) {
        let want = format!("echo: {line}");
        let last = std::cell::RefCell::new(String::new());
        wait_for(
            90,
            &format!("`kubectl vm console` to answer {line:?}"),
            || {
                let o = run_with_input(
                    Command::new(bin_path("kubectl-vm"))
                        .env("KUBECONFIG", self.kubeconfig())
                        .args(["-n", VM_NS, "console", "echo", "--detach-on-eof"]),
                    &format!("{line}\n"),
                );
                *last.borrow_mut() = format!("{}{}", o.stdout, o.stderr);
                o.stdout.contains(&want).then_some(())
            },
            || last.borrow().clone(),
        );
    }
}

impl Drop for Deployed {
    fn drop(&mut self) {
        let down = outcome(&mut self.deploy("down"));
        kill_guests(&self.state);
        if down.success {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "hack/deploy.sh down failed (state kept in {}):\n{}",
                self.dir.display(),
                tail(&down.stderr)
            );
        }
    }
}

/// Is `pid` alive and a kubevmm-vmm?
fn is_vmm(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| {
        e.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("kubevmm-vmm"))
    })
}

/// Every kubevmm-vmm process whose command line names `state`.
fn vmms_under(state: &Path) -> Vec<i32> {
    let needle = state.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| is_vmm(*pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// The guest outlives its agent: same VMM, same run, still answering, and
/// the new agent says it re-adopted it.
fn guest_survived(d: &Deployed, uid: &str, pid: i32, started: &Value, pod: &str, line: &str) {
    let now = d.vmm_pid(uid);
    if now != pid {
        // Say why: the old VMM's exit record and log, the VM's status, and
        // what the new agent decided.
        let vm_dir = d.state.join("vms").join(uid);
        let read = |f: &str| std::fs::read_to_string(vm_dir.join(f)).unwrap_or_default();
        panic!(
            "the VMM was replaced (pid {pid} -> {now})\nexit.json: {}\nvmm.log:\n{}\nstatus: {}\nnew agent {pod}:\n{}",
            read("exit.json"),
            tail(&read("vmm.log")),
            d.vm()["status"],
            tail(&d.agent_log(pod)),
        );
    }
    assert!(is_vmm(pid), "VMM pid {pid} is gone");
    wait_for(
        60,
        "the new agent to re-adopt the guest",
        || {
            d.agent_log(pod)
                .contains("re-adopted running VMM")
                .then_some(())
        },
        || d.agent_log(pod),
    );
    let vm = d.vm();
    assert_eq!(vm["status"]["printableStatus"], "Running", "{vm}");
    assert_eq!(
        &vm["status"]["startedAt"], started,
        "the guest was restarted"
    );
    d.console_answers(line);
}

/// A VM applied is booted by the agent inside the pod: its uid, start time
/// and VMM pid.
fn boot_echo(d: &Deployed, agent: &str) -> (String, Value, i32) {
    ok(d.kubectl().args(["create", "namespace", VM_NS]));
    let manifest = format!(
        "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: echo, namespace: {VM_NS}}}\n\
         spec:\n  runStrategy: Always\n  cpus: 1\n  memory: 64Mi\n  terminationGracePeriodSeconds: 10\n  \
         boot:\n    kernel: {{path: {GUESTS}/echo.elf}}\n  \
         disks:\n  - name: scratch\n    emptyDisk: {{size: 16Mi}}\n  \
         networks:\n  - name: default\n    masquerade: {{}}\n"
    );
    let o = run_with_input(d.kubectl().args(["apply", "-f", "-"]), &manifest);
    assert!(o.success, "{}", o.stderr);
    let running = wait_for(
        120,
        "VM echo Running",
        || {
            let vm = d.vm();
            (vm["status"]["printableStatus"] == "Running").then_some(vm)
        },
        || format!("{}\n{}", d.vm()["status"], tail(&d.agent_log(agent))),
    );
    let uid = running["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let started = running["status"]["startedAt"].clone();
    let pid = d.vmm_pid(&uid);
    assert!(is_vmm(pid), "no VMM with pid {pid}");
    assert!(
        d.agent_log(agent).contains("echo"),
        "{}",
        d.agent_log(agent)
    );
    (uid, started, pid)
}

/// An instant query to the cluster's Prometheus (`hack/prometheus.sh`):
/// its `data.result`.
fn promql(d: &Deployed, query: &str) -> Vec<Value> {
    let out = outcome(Command::new("curl").args([
        "-fsS",
        "--max-time",
        "10",
        "-G",
        &format!("{}/api/v1/query", d.prometheus()),
        "--data-urlencode",
        &format!("query={query}"),
    ]));
    assert!(out.success, "query {query}: {}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("Prometheus JSON");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The real Prometheus `hack/deploy.sh up` started scrapes the pods the way
/// the chart's `ServiceMonitor`s say: the VM's CPU and memory series carry
/// its own namespace, the operator's scheduling metrics are there, every
/// query of the Grafana dashboard returns data and every alert rule loads.
fn prometheus_sees_everything(d: &Deployed) {
    let series = |q: &str| {
        wait_for(
            90,
            &format!("Prometheus to return {q}"),
            || Some(promql(d, q)).filter(|r| !r.is_empty()),
            || format!("{:?}", promql(d, q)),
        )
    };
    for q in [
        r#"kubevmm_vm_vcpu_seconds_total{namespace="deploy",name="echo"}"#,
        r#"kubevmm_vm_memory_bytes{namespace="deploy",name="echo"}"#,
        "kubevmm_operator_scheduling_duration_seconds_count > 0",
        "kubevmm_operator_leader == 1",
    ] {
        let r = series(q);
        eprintln!("deploy: prometheus: {q} = {}", r[0]["value"][1]);
    }
    let path = repo_root().join("charts/kubevmm/dashboards/kubevmm.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    for (title, expr) in panels.iter().flat_map(|p| {
        p["targets"].as_array().into_iter().flatten().map(move |t| {
            (
                p["title"].clone(),
                t["expr"].as_str().unwrap_or_default().to_string(),
            )
        })
    }) {
        let q = expr.replace("$namespace", "deploy");
        let r = series(&q);
        eprintln!("deploy: dashboard {title}: {q} = {}", r[0]["value"][1]);
    }
    let rules =
        ok(Command::new("curl").args(["-fsS", &format!("{}/api/v1/rules", d.prometheus())]));
    let rules: Value = serde_json::from_str(&rules).expect("rules JSON");
    let all: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert!(all.len() >= 8, "{rules}");
    assert!(all.iter().all(|r| r["health"] == "ok"), "{rules}");
}

/// `helm uninstall` with a VM still defined: refused by default, naming it;
/// with `uninstall.strategy=DeleteVMs` the VM is deleted, its guest stopped
/// by the agent, and nothing is left: no pod, no `DaemonSet`, no VMM.
fn uninstall_leaves_nothing(d: &Deployed, pid: i32) {
    let helm = || {
        let mut c = Command::new(cached_tool("helm", "HELM_VERSION"));
        c.envs(d.env.iter().map(|(k, v)| (k, v)))
            .env("KUBECONFIG", d.kubeconfig());
        c
    };
    let uninstall = [
        "uninstall",
        RELEASE,
        "-n",
        NS,
        "--wait",
        "--timeout",
        "180s",
    ];
    let refused = outcome(helm().args(uninstall));
    assert!(!refused.success, "uninstall with a VM defined went through");
    let why = ok(d
        .kubectl()
        .args(["-n", NS, "logs", &format!("job/{RELEASE}-uninstall")]));
    assert!(
        why.contains("cannot uninstall kubevmm: 1 VirtualMachine(s) still exist (deploy/echo)"),
        "{why}"
    );
    assert!(is_vmm(pid), "a refused uninstall stopped the guest");
    assert_eq!(d.ready_pods("node-vmm").len(), 1, "{}", d.pods_table());

    // The refused uninstall left the release "uninstalling": back to
    // deployed, then the strategy that deletes the VMs.
    ok(helm().args(["rollback", RELEASE, "-n", NS, "--wait"]));
    ok(helm()
        .args([
            "upgrade",
            RELEASE,
            "charts/kubevmm",
            "-n",
            NS,
            "--reuse-values",
            "--set",
            "uninstall.strategy=DeleteVMs",
            "--wait",
        ])
        .current_dir(repo_root()));
    ok(helm().args(uninstall));
    assert!(
        d.json(&["get", "vm", "-A"])["items"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "VMs left after uninstall with DeleteVMs"
    );
    assert!(!is_vmm(pid), "the guest outlived its VM");
    wait_for(
        60,
        "no pods left in kubevmm-system",
        || {
            d.json(&["-n", NS, "get", "pods"])["items"]
                .as_array()
                .is_some_and(Vec::is_empty)
                .then_some(())
        },
        || d.pods_table(),
    );
    assert!(d.json(&["-n", NS, "get", "daemonsets"])["items"]
        .as_array()
        .is_some_and(Vec::is_empty));
    assert!(
        vmms_under(&d.state).is_empty(),
        "VMMs left: {:?}",
        vmms_under(&d.state)
    );
}

#[test]
fn the_chart_runs_on_a_kubelet_and_guests_survive_agent_upgrades() {
    // The guest the pod's agent boots, where the chart lets VMs name files.
    let echo = build_guests().join("echo.elf");
    std::fs::create_dir_all(GUESTS).expect("guest dir");
    std::fs::copy(&echo, Path::new(GUESTS).join("echo.elf")).expect("install echo.elf");

    let d = Deployed::up();

    // The operator (two replicas) and node-vmm run as pods of our images.
    let ops = d.ready_pods("kubevmm-operator");
    assert_eq!(ops.len(), 2, "{}", d.pods_table());
    assert!(
        ops.iter()
            .all(|(_, img)| img == "ghcr.io/kubevmm/operator:0.1.0"),
        "{ops:?}"
    );
    let (agent, img) = d.node_vmm_pod_replacing("");
    assert_eq!(img, "ghcr.io/kubevmm/node-vmm:0.1.0");

    let (uid, started, pid) = boot_echo(&d, &agent);
    d.console_answers("before the upgrade");
    prometheus_sees_everything(&d);

    // helm upgrade to rebuilt images with a new tag rolls the DaemonSet;
    // the guest runs on, re-adopted by the new pod.
    let mut up = d.deploy("upgrade");
    up.env("KUBEVMM_IMAGE_TAG", "0.1.0-rebuilt");
    let o = outcome(&mut up);
    assert!(
        o.success,
        "hack/deploy.sh upgrade failed:\n{}",
        tail(&o.stderr)
    );
    let (upgraded, img) = d.node_vmm_pod_replacing(&agent);
    assert_eq!(img, "ghcr.io/kubevmm/node-vmm:0.1.0-rebuilt");
    eprintln!(
        "deploy: helm upgrade: node-vmm pod {agent} -> {upgraded}, VMM pid {pid} -> {}",
        d.vmm_pid(&uid)
    );
    guest_survived(&d, &uid, pid, &started, &upgraded, "after the upgrade");

    // Deleting the agent's pod does the same.
    ok(d.kubectl()
        .args(["-n", NS, "delete", "pod", &upgraded, "--wait=true"]));
    let (replaced, _) = d.node_vmm_pod_replacing(&upgraded);
    eprintln!(
        "deploy: pod deleted: {upgraded} -> {replaced}, VMM pid {pid} -> {}",
        d.vmm_pid(&uid)
    );
    guest_survived(
        &d,
        &uid,
        pid,
        &started,
        &replaced,
        "after the pod was deleted",
    );

    uninstall_leaves_nothing(&d, pid);
    down_leaves_nothing(&d);
}

/// `hack/deploy.sh down` (`make cluster-down`) leaves nothing behind: no
/// process of the cluster, no shim, no mount, no CNI or guest bridge, no
/// kube-proxy or guest nftables table, no pod cgroup.
fn down_leaves_nothing(d: &Deployed) {
    let o = outcome(&mut d.deploy("down"));
    assert!(
        o.success,
        "hack/deploy.sh down failed:\n{}",
        tail(&o.stderr)
    );
    let dir = d.dir.display().to_string();
    let procs: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&dir) || c.contains("containerd-shim"))
        .collect();
    assert!(procs.is_empty(), "processes left: {procs:#?}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(!mounts.contains(&dir), "mounts left:\n{mounts}");
    for link in ["kubevmm-cni0", "kvdeploy0"] {
        assert!(
            !Path::new("/sys/class/net").join(link).exists(),
            "{link} left"
        );
    }
    let tables = ok(Command::new("nft").args(["list", "tables"]));
    assert!(
        !tables.contains("kvdeploy0") && !tables.contains("kube-proxy"),
        "nftables tables left:\n{tables}"
    );
    assert!(
        !Path::new("/sys/fs/cgroup/memory/kubepods").exists()
            && !Path::new("/sys/fs/cgroup/kubepods").exists(),
        "the kubelet's pod cgroups are left"
    );
}
