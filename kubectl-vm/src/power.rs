//! `start`, `stop`, `restart`, `pause`, `resume`: what each verb changes on
//! a VM, decided by one pure function from the VM as read; the caller sends
//! the merge patch with the VM's resourceVersion, so a concurrent change is
//! a conflict, never a lost update.
//!
//! The verbs speak the API node-vmm and the operator already honour
//! (docs/api.md, "Power verbs"): `stop` sets `runStrategy: Halted` and
//! remembers the strategy it replaced, `start` restores it (and, for
//! `Manual` and `Once`, adds a start request), `restart` sets the restart
//! annotation, `pause`/`resume` set `spec.paused`.

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kubevmm_crds::contract::{
    pending_restart, ANNOTATION_RESTART, ANNOTATION_STOP_GRACE, ANNOTATION_STRATEGY_BEFORE_STOP,
};
use kubevmm_crds::printable::printable_status;
use kubevmm_crds::{PrintableStatus, RunStrategy, VirtualMachine, VmPhase};
use serde_json::{json, Map, Value};

/// A power verb with its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Run the guest.
    Start,
    /// Shut the guest down: ACPI, then by force after `grace` seconds
    /// (`None`: the VM's `terminationGracePeriodSeconds`; `Some(0)`: at once).
    Stop {
        /// The grace period of this stop.
        grace: Option<u32>,
    },
    /// Shut down gracefully and start again.
    Restart,
    /// Pause the vCPUs.
    Pause,
    /// Resume paused vCPUs.
    Resume,
}

/// Why a verb does not apply to the VM as it is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PowerError {
    /// The VM is being deleted.
    #[error("VirtualMachine {0} is being deleted")]
    Deleting(String),
    /// `start` of a VM that runs or is starting.
    #[error("VirtualMachine {name} is already running (status {status})")]
    AlreadyRunning {
        /// The VM.
        name: String,
        /// Its STATUS word.
        status: &'static str,
    },
    /// `start` of an `Always` VM that node-vmm restarts by itself.
    #[error(
        "VirtualMachine {name} has runStrategy Always: node-vmm starts it again by itself \
         (status {status}; `kubectl vm info {name}` says when)"
    )]
    RestartsByItself {
        /// The VM.
        name: String,
        /// Its STATUS word.
        status: &'static str,
    },
    /// `stop` of a VM that is already stopped.
    #[error("VirtualMachine {name} is already stopped (status {status})")]
    AlreadyStopped {
        /// The VM.
        name: String,
        /// Its STATUS word.
        status: &'static str,
    },
    /// `stop` of a VM whose stop is under way, without a shorter grace period.
    #[error(
        "VirtualMachine {name} is stopping already (status {status}); \
         `kubectl vm stop --force {name}` stops it at once"
    )]
    AlreadyStopping {
        /// The VM.
        name: String,
        /// Its STATUS word.
        status: &'static str,
    },
    /// `restart`, `pause` or `resume` of a VM whose guest does not run.
    #[error(
        "VirtualMachine {name} is not running (status {status}): use `kubectl vm start {name}`"
    )]
    NotRunning {
        /// The VM.
        name: String,
        /// Its STATUS word.
        status: &'static str,
    },
    /// `pause` of a paused VM.
    #[error("VirtualMachine {0} is already paused")]
    AlreadyPaused(String),
    /// `resume` of a VM that is not paused.
    #[error("VirtualMachine {0} is not paused")]
    NotPaused(String),
    /// A restart request is still being carried out.
    #[error("VirtualMachine {0} has a restart under way; wait for it to run again")]
    RestartPending(String),
}

/// Where the guest is, as the verbs see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Placed or starting, or its VMM runs (vCPUs running or paused).
    Up,
    /// Shutting down.
    Stopping,
    /// Not running and not about to.
    Down,
}

fn run_of(vm: &VirtualMachine) -> Run {
    match vm.status.as_ref().and_then(|s| s.phase) {
        Some(VmPhase::Stopping) => Run::Stopping,
        Some(VmPhase::Stopped | VmPhase::Succeeded | VmPhase::Failed) => Run::Down,
        None | Some(VmPhase::Pending) if vm.spec.run_strategy == RunStrategy::Halted => Run::Down,
        _ => Run::Up,
    }
}

/// Whether node-vmm starts a guest that is down again by itself.
fn reruns(vm: &VirtualMachine) -> bool {
    match vm.spec.run_strategy {
        RunStrategy::Always => true,
        RunStrategy::RerunOnFailure => {
            vm.status.as_ref().and_then(|s| s.phase) != Some(VmPhase::Succeeded)
        }
        _ => false,
    }
}

fn status_word(vm: &VirtualMachine) -> PrintableStatus {
    let status = vm.status.clone().unwrap_or_default();
    status
        .printable_status
        .unwrap_or_else(|| printable_status(vm.metadata.deletion_timestamp.is_some(), &status))
}

/// The runStrategy `start` restores: the one `stop` replaced, `Always` when
/// unknown (or when it was `Halted` itself).
fn restored_strategy(vm: &VirtualMachine) -> RunStrategy {
    vm.annotations()
        .get(ANNOTATION_STRATEGY_BEFORE_STOP)
        .and_then(|s| serde_json::from_value(Value::String(s.clone())).ok())
        .filter(|s| *s != RunStrategy::Halted)
        .unwrap_or(RunStrategy::Always)
}

fn strategy_name(s: RunStrategy) -> Value {
    serde_json::to_value(s).unwrap_or(Value::Null)
}

/// The merge patch that carries out `verb` on `vm` at `now`, with the VM's
/// resourceVersion as a precondition.
pub fn plan(verb: Verb, vm: &VirtualMachine, now: Timestamp) -> Result<Value, PowerError> {
    let name = vm.name_any();
    if vm.metadata.deletion_timestamp.is_some() {
        return Err(PowerError::Deleting(name));
    }
    let status = status_word(vm).as_str();
    let run = run_of(vm);
    let strategy = vm.spec.run_strategy;
    let mut annotations = Map::new();
    let mut spec = Map::new();
    match verb {
        Verb::Start => {
            if strategy == RunStrategy::Halted {
                let restore = restored_strategy(vm);
                spec.insert("runStrategy".into(), strategy_name(restore));
                if matches!(restore, RunStrategy::Manual | RunStrategy::Once) {
                    annotations.insert(ANNOTATION_RESTART.into(), json!(now.to_string()));
                }
            } else if run == Run::Up || run == Run::Stopping {
                return Err(PowerError::AlreadyRunning { name, status });
            } else if strategy == RunStrategy::Always {
                return Err(PowerError::RestartsByItself { name, status });
            } else {
                annotations.insert(ANNOTATION_RESTART.into(), json!(now.to_string()));
            }
            annotations.insert(ANNOTATION_STRATEGY_BEFORE_STOP.into(), Value::Null);
            annotations.insert(ANNOTATION_STOP_GRACE.into(), Value::Null);
        }
        Verb::Stop { grace } => {
            if strategy == RunStrategy::Halted {
                if run == Run::Down {
                    return Err(PowerError::AlreadyStopped { name, status });
                }
                if grace.is_none() {
                    return Err(PowerError::AlreadyStopping { name, status });
                }
            } else {
                if run == Run::Down && !reruns(vm) {
                    return Err(PowerError::AlreadyStopped { name, status });
                }
                spec.insert("runStrategy".into(), strategy_name(RunStrategy::Halted));
                annotations.insert(
                    ANNOTATION_STRATEGY_BEFORE_STOP.into(),
                    strategy_name(strategy),
                );
            }
            annotations.insert(
                ANNOTATION_STOP_GRACE.into(),
                grace.map_or(Value::Null, |g| json!(g.to_string())),
            );
        }
        Verb::Restart => {
            if run != Run::Up || strategy == RunStrategy::Halted {
                return Err(PowerError::NotRunning { name, status });
            }
            if pending_restart(vm.annotations()).is_some() {
                return Err(PowerError::RestartPending(name));
            }
            annotations.insert(ANNOTATION_RESTART.into(), json!(now.to_string()));
        }
        Verb::Pause | Verb::Resume => {
            let pause = verb == Verb::Pause;
            match (pause, vm.spec.paused) {
                (true, true) => return Err(PowerError::AlreadyPaused(name)),
                (false, false) => return Err(PowerError::NotPaused(name)),
                _ if pause && run != Run::Up => {
                    return Err(PowerError::NotRunning { name, status })
                }
                _ => {}
            }
            spec.insert("paused".into(), json!(pause));
        }
    }
    let mut metadata = Map::new();
    metadata.insert("resourceVersion".into(), json!(vm.resource_version()));
    if !annotations.is_empty() {
        metadata.insert("annotations".into(), Value::Object(annotations));
    }
    let mut patch = Map::new();
    patch.insert("metadata".into(), Value::Object(metadata));
    if !spec.is_empty() {
        patch.insert("spec".into(), Value::Object(spec));
    }
    Ok(Value::Object(patch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubevmm_crds::contract::ANNOTATION_RESTART_DONE;

    fn vm(
        strategy: &str,
        phase: Option<&str>,
        paused: bool,
        annotations: &[(&str, &str)],
    ) -> VirtualMachine {
        let mut v: VirtualMachine = serde_json::from_value(json!({
            "apiVersion": "kubevmm.io/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": "vm1", "namespace": "ns", "resourceVersion": "7"},
            "spec": {"runStrategy": strategy, "memory": "64Mi", "paused": paused,
                     "boot": {"kernel": {"path": "/k"}}},
        }))
        .unwrap();
        if let Some(p) = phase {
            v.status = Some(serde_json::from_value(json!({"phase": p})).unwrap());
        }
        v.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        );
        v
    }

    const NOW: &str = "2026-12-05T10:00:00Z";

    fn run(verb: Verb, v: &VirtualMachine) -> Result<Value, PowerError> {
        plan(verb, v, NOW.parse().unwrap())
    }

    #[test]
    fn start_restores_what_stop_replaced() {
        type Case<'a> = (&'a str, Option<&'a str>, &'a [(&'a str, &'a str)], Value);
        let cases: &[Case] = &[
            // Halted by `stop` from RerunOnFailure: that strategy again.
            (
                "Halted",
                Some("Stopped"),
                &[(ANNOTATION_STRATEGY_BEFORE_STOP, "RerunOnFailure")],
                json!({"runStrategy": "RerunOnFailure"}),
            ),
            // Halted by hand: Always, as KubeVirt's virtctl start.
            (
                "Halted",
                Some("Stopped"),
                &[],
                json!({"runStrategy": "Always"}),
            ),
            (
                "Halted",
                None,
                &[(ANNOTATION_STRATEGY_BEFORE_STOP, "Halted")],
                json!({"runStrategy": "Always"}),
            ),
        ];
        for (strategy, phase, ann, spec) in cases {
            let p = run(Verb::Start, &vm(strategy, *phase, false, ann)).unwrap();
            assert_eq!(&p["spec"], spec, "{strategy} {phase:?} {ann:?}");
            assert_eq!(p["metadata"]["resourceVersion"], "7");
            assert_eq!(
                p["metadata"]["annotations"][ANNOTATION_STRATEGY_BEFORE_STOP],
                Value::Null
            );
            assert!(p["metadata"]["annotations"]
                .get(ANNOTATION_RESTART)
                .is_none());
        }
        // Manual and Once need a start request besides the strategy.
        let p = run(
            Verb::Start,
            &vm(
                "Halted",
                Some("Stopped"),
                false,
                &[(ANNOTATION_STRATEGY_BEFORE_STOP, "Manual")],
            ),
        )
        .unwrap();
        assert_eq!(p["spec"]["runStrategy"], "Manual");
        assert_eq!(p["metadata"]["annotations"][ANNOTATION_RESTART], NOW);
    }

    #[test]
    fn start_of_a_stopped_manual_vm_is_a_start_request() {
        for (strategy, phase) in [
            ("Manual", "Stopped"),
            ("Once", "Succeeded"),
            ("RerunOnFailure", "Succeeded"),
        ] {
            let p = run(Verb::Start, &vm(strategy, Some(phase), false, &[])).unwrap();
            assert!(p.get("spec").is_none(), "{strategy}: {p}");
            assert_eq!(p["metadata"]["annotations"][ANNOTATION_RESTART], NOW);
        }
    }

    #[test]
    fn start_refuses_what_already_runs() {
        let cases = [
            (
                "Always",
                Some("Running"),
                "already running (status Running)",
            ),
            (
                "Manual",
                Some("Starting"),
                "already running (status Starting)",
            ),
            ("Always", None, "already running (status Pending)"),
            (
                "Always",
                Some("Failed"),
                "starts it again by itself (status Failed",
            ),
        ];
        for (strategy, phase, want) in cases {
            let e = run(Verb::Start, &vm(strategy, phase, false, &[])).unwrap_err();
            assert!(e.to_string().contains(want), "{strategy} {phase:?}: {e}");
        }
    }

    #[test]
    fn stop_halts_and_remembers_with_the_grace_asked_for() {
        let p = run(
            Verb::Stop { grace: None },
            &vm("RerunOnFailure", Some("Running"), false, &[]),
        )
        .unwrap();
        assert_eq!(p["spec"]["runStrategy"], "Halted");
        let a = &p["metadata"]["annotations"];
        assert_eq!(a[ANNOTATION_STRATEGY_BEFORE_STOP], "RerunOnFailure");
        assert_eq!(a[ANNOTATION_STOP_GRACE], Value::Null);

        let p = run(
            Verb::Stop { grace: Some(0) },
            &vm("Always", Some("Running"), false, &[]),
        )
        .unwrap();
        assert_eq!(p["metadata"]["annotations"][ANNOTATION_STOP_GRACE], "0");

        // `stop --force` while a graceful stop is under way: only the grace.
        let p = run(
            Verb::Stop { grace: Some(0) },
            &vm("Halted", Some("Stopping"), false, &[]),
        )
        .unwrap();
        assert!(p.get("spec").is_none());
        assert_eq!(p["metadata"]["annotations"][ANNOTATION_STOP_GRACE], "0");
        assert!(p["metadata"]["annotations"]
            .get(ANNOTATION_STRATEGY_BEFORE_STOP)
            .is_none());
    }

    #[test]
    fn stop_refuses_what_is_stopped() {
        for (strategy, phase) in [
            ("Halted", Some("Stopped")),
            ("Halted", None),
            ("Once", Some("Succeeded")),
            ("Manual", Some("Stopped")),
            ("RerunOnFailure", Some("Succeeded")),
        ] {
            let e = run(Verb::Stop { grace: None }, &vm(strategy, phase, false, &[])).unwrap_err();
            assert!(
                matches!(e, PowerError::AlreadyStopped { .. }),
                "{strategy} {phase:?}: {e}"
            );
        }
        let e = run(
            Verb::Stop { grace: None },
            &vm("Halted", Some("Running"), false, &[]),
        )
        .unwrap_err();
        assert!(matches!(e, PowerError::AlreadyStopping { .. }), "{e}");
        // A crash loop is stopped for good.
        for (strategy, phase) in [("Always", "Failed"), ("RerunOnFailure", "Failed")] {
            let p = run(
                Verb::Stop { grace: None },
                &vm(strategy, Some(phase), false, &[]),
            )
            .unwrap();
            assert_eq!(p["spec"]["runStrategy"], "Halted", "{strategy} {phase}");
        }
    }

    #[test]
    fn restart_pause_and_resume_need_a_running_guest() {
        let up = vm("Always", Some("Running"), false, &[]);
        let p = run(Verb::Restart, &up).unwrap();
        assert_eq!(p["metadata"]["annotations"][ANNOTATION_RESTART], NOW);
        assert_eq!(run(Verb::Pause, &up).unwrap()["spec"]["paused"], true);
        assert_eq!(
            run(Verb::Resume, &up),
            Err(PowerError::NotPaused("vm1".into()))
        );

        let paused = vm("Always", Some("Paused"), true, &[]);
        assert_eq!(run(Verb::Resume, &paused).unwrap()["spec"]["paused"], false);
        assert_eq!(
            run(Verb::Pause, &paused),
            Err(PowerError::AlreadyPaused("vm1".into()))
        );

        let down = vm("Halted", Some("Stopped"), false, &[]);
        for verb in [Verb::Restart, Verb::Pause] {
            let e = run(verb, &down).unwrap_err();
            assert_eq!(
                e.to_string(),
                "VirtualMachine vm1 is not running (status Stopped): use `kubectl vm start vm1`"
            );
        }
        let pending = vm(
            "Always",
            Some("Running"),
            false,
            &[(ANNOTATION_RESTART, "t1")],
        );
        assert_eq!(
            run(Verb::Restart, &pending),
            Err(PowerError::RestartPending("vm1".into()))
        );
        let handled = vm(
            "Always",
            Some("Running"),
            false,
            &[(ANNOTATION_RESTART, "t1"), (ANNOTATION_RESTART_DONE, "t1")],
        );
        assert!(run(Verb::Restart, &handled).is_ok());
    }

    #[test]
    fn nothing_applies_to_a_vm_being_deleted() {
        let mut v = vm("Always", Some("Running"), false, &[]);
        v.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            NOW.parse().unwrap(),
        ));
        for verb in [
            Verb::Start,
            Verb::Stop { grace: None },
            Verb::Restart,
            Verb::Pause,
        ] {
            assert_eq!(run(verb, &v), Err(PowerError::Deleting("vm1".into())));
        }
    }
}
