//! The per-test world of the agent end-to-end tests: a namespace, a node,
//! a real `node-vmm agent` and `kubevmm-operator` on the shared private
//! control plane, and helpers to apply VMs and read their state.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::sync::Mutex;

use kubevmm_e2e::{
    build_guests, free_port, kill_guests, run_with_input, wait_for, ControlPlane, Daemon,
};
use serde_json::Value;

/// Our guests busy-poll; on a 2-core machine they run one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub struct Env {
    pub cp: &'static ControlPlane,
    pub ns: String,
    pub node: String,
    pub state: PathBuf,
    pub guests: PathBuf,
    pub agent: Daemon,
    pub operator: Daemon,
    _serial: std::sync::MutexGuard<'static, ()>,
}

pub fn require_kvm() {
    let r = kubevmm_vmm::host_check::probe();
    assert!(
        r.usable(),
        "these tests boot real guests and need /dev/kvm: {:?}",
        r.problem
    );
}

pub fn start_agent(
    cp: &ControlPlane,
    node: &str,
    state: &std::path::Path,
    guests: &std::path::Path,
    log: &str,
) -> Daemon {
    start_agent_with(cp, node, state, guests, log, "1")
}

pub fn start_agent_with(
    cp: &ControlPlane,
    node: &str,
    state: &std::path::Path,
    guests: &std::path::Path,
    log: &str,
    reserved_cpus: &str,
) -> Daemon {
    start_agent_args(cp, node, state, guests, log, reserved_cpus, &[])
}

/// An agent with extra flags.
pub fn start_agent_args(
    cp: &ControlPlane,
    node: &str,
    state: &std::path::Path,
    guests: &std::path::Path,
    log: &str,
    reserved_cpus: &str,
    extra: &[&str],
) -> Daemon {
    start_agent_env(cp, node, state, guests, log, reserved_cpus, extra, &[])
}

/// An agent with extra flags and environment (e.g. `SSL_CERT_FILE`).
#[allow(clippy::too_many_arguments)] // the agent's settings, spelled out
pub fn start_agent_env(
    cp: &ControlPlane,
    node: &str,
    state: &std::path::Path,
    guests: &std::path::Path,
    log: &str,
    reserved_cpus: &str,
    extra: &[&str],
    envs: &[(&str, &std::path::Path)],
) -> Daemon {
    let mut cmd = kubevmm_e2e::agent_command(cp, node, state, guests, reserved_cpus);
    cmd.envs(envs.iter().copied())
        // Short Leases make node loss quick to test, unless a test sets its own.
        .args(
            (!extra.contains(&"--lease-seconds"))
                .then_some(["--lease-seconds", "6"])
                .into_iter()
                .flatten(),
        )
        .args(extra);
    Daemon::start(cmd, state.join(log))
}

impl Env {
    pub fn new(test: &str) -> Self {
        Self::with_args(test, &[], &[])
    }

    /// Like [`Env::new`], with extra agent and operator flags (e.g. an
    /// overcommit so many VMs that never run a guest fit on the node).
    pub fn with_args(test: &str, agent_extra: &[&str], extra: &[&str]) -> Self {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        require_kvm();
        let cp = ControlPlane::shared();
        let guests = build_guests();
        let ns = cp.namespace(test);
        let node = format!("node-{ns}");
        let state = std::env::temp_dir().join(format!("kubevmm-e2e-{node}"));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).expect("state dir");
        let agent = start_agent_args(cp, &node, &state, &guests, "agent.log", "1", agent_extra);
        let kubectl_ok = |args: &[&str]| {
            cp.kubectl()
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        wait_for(
            60,
            "the agent to register its HypervisorNode",
            || kubectl_ok(&["get", "hvnode", &node]).then_some(()),
            || agent.output(),
        );
        assert!(kubectl_ok(&[
            "label",
            "hvnode",
            &node,
            &format!("kubevmm.io/test-node={node}")
        ]));
        let mut op = kubevmm_e2e::operator_command(
            cp,
            &ns,
            &format!("op-{node}"),
            free_port().expect("port"),
        );
        op.args(["--node-selector", &format!("kubevmm.io/test-node={node}")])
            .args(extra);
        let operator = Daemon::start(op, state.join("operator.log"));
        Self {
            cp,
            ns,
            node,
            state,
            guests,
            agent,
            operator,
            _serial: serial,
        }
    }

    pub fn apply(&self, name: &str, guest: &str, extra: &str) {
        self.apply_kernel(name, &self.guests.join(format!("{guest}.elf")), extra);
    }

    pub fn apply_kernel(&self, name: &str, kernel: &std::path::Path, extra: &str) {
        self.apply_sized(name, kernel, 1, extra);
    }

    /// A VM of `cpus` vCPUs booting `kernel`.
    pub fn apply_sized(&self, name: &str, kernel: &std::path::Path, cpus: u32, extra: &str) {
        let manifest = format!(
            "apiVersion: kubevmm.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: {name}\nspec:\n  cpus: {cpus}\n  memory: 64Mi\n  \
             terminationGracePeriodSeconds: 60\n  nodeSelector: {{kubevmm.io/test-node: {node}}}\n  boot:\n    kernel: {{path: {kernel}}}\n{extra}",
            node = self.node,
            kernel = kernel.display(),
        );
        let out = run_with_input(
            self.cp.kubectl().args(["apply", "-n", &self.ns, "-f", "-"]),
            &manifest,
        );
        assert!(out.success, "apply refused: {}", out.stderr);
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self
            .cp
            .kubectl()
            .args(["-n", &self.ns])
            .args(args)
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn vm(&self, name: &str) -> Option<Value> {
        let out = self
            .cp
            .kubectl()
            .args(["-n", &self.ns, "get", "vm", name, "-o", "json"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    pub fn phase(&self, name: &str) -> Option<String> {
        self.vm(name)?
            .pointer("/status/phase")?
            .as_str()
            .map(str::to_string)
    }

    pub fn condition(&self, name: &str, type_: &str) -> Option<Value> {
        let vm = self.vm(name)?;
        vm.pointer("/status/conditions")?
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
    }

    pub fn uid(&self, name: &str) -> String {
        self.vm(name)
            .and_then(|v| v.pointer("/metadata/uid")?.as_str().map(str::to_string))
            .expect("uid")
    }

    pub fn describe(&self, name: &str) -> String {
        let lease = self
            .cp
            .kubectl()
            .args([
                "get",
                "lease",
                "-n",
                "kubevmm-system",
                &format!("node-vmm-{}", self.node),
                "-o",
                "jsonpath={.spec.renewTime}",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!(
            "{}\nnode Lease renewed at {lease}\n--- agent ---\n{}\n--- operator ---\n{}",
            self.vm(name)
                .map(|v| v["status"].to_string())
                .unwrap_or_default(),
            tail(&self.agent.output()),
            tail(&self.operator.output())
        )
    }

    /// Waits until `Ready=False` carries `reason`; returns the condition.
    pub fn wait_ready_reason(&self, name: &str, reason: &str, seconds: u64) -> Value {
        wait_for(
            seconds,
            &format!("{name}: Ready reason {reason}"),
            || {
                self.condition(name, "Ready")
                    .filter(|c| c["reason"] == reason)
            },
            || self.describe(name),
        )
    }

    pub fn wait_phase(&self, name: &str, phase: &str, seconds: u64) {
        wait_for(
            seconds,
            &format!("{name} to be {phase}"),
            || (self.phase(name).as_deref() == Some(phase)).then_some(()),
            || self.describe(name),
        );
    }

    pub fn vm_dir(&self, uid: &str) -> PathBuf {
        self.state.join("vms").join(uid)
    }

    /// The guest's console output the VM's console ring still holds (the
    /// newest 1 MiB), as text.
    pub fn console(&self, uid: &str) -> String {
        kubevmm_vmm::ring::RingReader::open(&self.vm_dir(uid).join("console.ring"))
            .and_then(|r| r.read_from(0, usize::MAX))
            .map(|c| String::from_utf8_lossy(&c.bytes).into_owned())
            .unwrap_or_default()
    }

    pub fn vmm_pid(&self, uid: &str) -> Option<i32> {
        let v: Value =
            serde_json::from_slice(&std::fs::read(self.vm_dir(uid).join("vmm.pid")).ok()?).ok()?;
        v["pid"].as_i64().map(|p| p as i32)
    }

    pub fn events(&self, name: &str) -> String {
        self.kubectl(&[
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "-o",
            "custom-columns=REASON:.reason,NOTE:.note,MESSAGE:.message",
        ])
    }

    /// [`Self::events`] once they mention `needle`, or after 10 s: Events
    /// go out in the background, after the status writes that tests wait
    /// for.
    pub fn events_mentioning(&self, name: &str, needle: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let events = self.events(name);
            if events.contains(needle) || std::time::Instant::now() > deadline {
                return events;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rfind(')').is_some_and(|i| !s[i + 2..].starts_with('Z')))
}

pub use kubevmm_e2e::tail;

impl Drop for Env {
    fn drop(&mut self) {
        // Never leave guests behind: they spin on the CPU.
        self.agent.kill();
        kill_guests(&self.state);
    }
}
