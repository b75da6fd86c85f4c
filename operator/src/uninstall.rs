//! `kubevmm-operator uninstall`: the chart's pre-delete hook (docs/deploy.md,
//! "Uninstalling"). `helm uninstall` removes the node agents; a guest still
//! defined then would run on with nothing managing it, and its
//! `VirtualMachine` could never be deleted (the agent's finalizer). So, as
//! `KubeVirt`'s `uninstallStrategy`:
//! - `BlockIfVMsExist` (the default) refuses while any `VirtualMachine`
//!   exists, naming them and the two ways on;
//! - `DeleteVMs` deletes them all and waits until they are gone (the agents,
//!   still running, stop each guest gracefully and let go).
//!
//! [`decide`] is pure (table-tested); [`run`] lists, deletes and waits.

use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, ListParams};
use kube::ResourceExt as _;
use kubevmm_crds::VirtualMachine;

/// What to do with `VirtualMachine`s at uninstall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// Refuse while any exists.
    #[value(name = "BlockIfVMsExist")]
    BlockIfVmsExist,
    /// Delete them all, wait until their guests stopped.
    #[value(name = "DeleteVMs")]
    DeleteVms,
}

/// Errors of the uninstall hook; the message is what `kubectl logs` of the
/// hook's Job shows.
#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    /// Refused by `BlockIfVMsExist`.
    #[error(
        "cannot uninstall kubevmm: {count} VirtualMachine(s) still exist ({names}); \
         delete them (kubectl delete vm --all -A) and run helm uninstall again, or have \
         the uninstall delete them: helm rollback RELEASE, helm upgrade RELEASE \
         --reuse-values --set uninstall.strategy=DeleteVMs, helm uninstall RELEASE"
    )]
    Blocked {
        /// How many.
        count: usize,
        /// `namespace/name`, the first few.
        names: String,
    },
    /// `DeleteVMs` ran out of time.
    #[error(
        "{count} VirtualMachine(s) still exist after {seconds}s ({names}); \
         their guests did not stop: see kubectl describe vm"
    )]
    Timeout {
        /// How many.
        count: usize,
        /// `namespace/name`, the first few.
        names: String,
        /// The deadline.
        seconds: u64,
    },
    /// The API server refused or failed.
    #[error("kube-apiserver: {0}")]
    Api(#[from] kube::Error),
}

/// The step the hook takes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing left: let helm go on.
    Done,
    /// Refuse, naming what exists.
    Refuse,
    /// Delete those not yet being deleted (`namespace`, `name`), then wait.
    Delete(Vec<(String, String)>),
    /// All are being deleted: wait.
    Wait,
}

/// One `VirtualMachine` as the hook sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Whether it has a deletion timestamp already.
    pub deleting: bool,
}

/// The next step under `strategy` with `vms` existing (pure).
pub fn decide(strategy: Strategy, vms: &[Vm]) -> Step {
    if vms.is_empty() {
        return Step::Done;
    }
    match strategy {
        Strategy::BlockIfVmsExist => Step::Refuse,
        Strategy::DeleteVms => {
            let todo: Vec<(String, String)> = vms
                .iter()
                .filter(|v| !v.deleting)
                .map(|v| (v.namespace.clone(), v.name.clone()))
                .collect();
            if todo.is_empty() {
                Step::Wait
            } else {
                Step::Delete(todo)
            }
        }
    }
}

/// `ns/name, ...` of the first five, and how many more.
pub fn names(vms: &[Vm]) -> String {
    let mut s: Vec<String> = vms
        .iter()
        .take(5)
        .map(|v| format!("{}/{}", v.namespace, v.name))
        .collect();
    if vms.len() > 5 {
        s.push(format!("and {} more", vms.len() - 5));
    }
    s.join(", ")
}

async fn list(api: &Api<VirtualMachine>) -> Result<Vec<Vm>, kube::Error> {
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|vm| Vm {
            namespace: vm.namespace().unwrap_or_default(),
            name: vm.name_any(),
            deleting: vm.metadata.deletion_timestamp.is_some(),
        })
        .collect())
}

/// Runs the hook until nothing is left, it refuses, or `timeout` passes.
pub async fn run(
    client: kube::Client,
    strategy: Strategy,
    timeout: Duration,
) -> Result<(), UninstallError> {
    let all: Api<VirtualMachine> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    loop {
        let vms = list(&all).await?;
        match decide(strategy, &vms) {
            Step::Done => {
                println!("no VirtualMachines left: uninstall goes on");
                return Ok(());
            }
            Step::Refuse => {
                return Err(UninstallError::Blocked {
                    count: vms.len(),
                    names: names(&vms),
                })
            }
            Step::Delete(todo) => {
                for (ns, name) in todo {
                    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), &ns);
                    match api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => println!("deleting VirtualMachine {ns}/{name}"),
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Step::Wait => {}
        }
        if Instant::now() >= deadline {
            return Err(UninstallError::Timeout {
                count: vms.len(),
                names: names(&vms),
                seconds: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, deleting: bool) -> Vm {
        Vm {
            namespace: "ns".into(),
            name: name.into(),
            deleting,
        }
    }

    #[test]
    fn steps_per_strategy() {
        use Strategy::{BlockIfVmsExist as Block, DeleteVms as Delete};
        let cases: Vec<(Strategy, Vec<Vm>, Step)> = vec![
            (Block, vec![], Step::Done),
            (Delete, vec![], Step::Done),
            (Block, vec![vm("a", false)], Step::Refuse),
            (Block, vec![vm("a", true)], Step::Refuse),
            (
                Delete,
                vec![vm("a", false), vm("b", true)],
                Step::Delete(vec![("ns".into(), "a".into())]),
            ),
            (Delete, vec![vm("a", true), vm("b", true)], Step::Wait),
        ];
        for (strategy, vms, want) in cases {
            assert_eq!(decide(strategy, &vms), want, "{strategy:?} {vms:?}");
        }
    }

    #[test]
    fn the_refusal_names_the_vms_and_the_ways_on() {
        let vms: Vec<Vm> = (0..7).map(|i| vm(&format!("v{i}"), false)).collect();
        let e = UninstallError::Blocked {
            count: vms.len(),
            names: names(&vms),
        };
        assert_eq!(
            e.to_string(),
            "cannot uninstall kubevmm: 7 VirtualMachine(s) still exist (ns/v0, ns/v1, ns/v2, \
             ns/v3, ns/v4, and 2 more); delete them (kubectl delete vm --all -A) and run helm \
             uninstall again, or have the uninstall delete them: helm rollback RELEASE, helm \
             upgrade RELEASE --reuse-values --set uninstall.strategy=DeleteVMs, helm uninstall \
             RELEASE"
        );
    }
}
