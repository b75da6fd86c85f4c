//! The status body the agent writes (pure): conditions, and whether the
//! live status already says it all (then nothing is written).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kubevmm_crds::VirtualMachine;

/// A condition of the agent's status.
pub fn condition_json(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    since: Timestamp,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(since),
        observed_generation: generation,
    }
}

/// Whether the live status already holds everything in `body` (another
/// writer, or a lost update, makes it differ: then the agent writes again).
pub fn live_matches(vm: &VirtualMachine, body: &serde_json::Value) -> bool {
    let live = serde_json::to_value(vm.status.clone().unwrap_or_default()).unwrap_or_default();
    let want = &body["status"];
    let empty = |v: &serde_json::Value| v.is_null() || v.as_array().is_some_and(Vec::is_empty);
    let scalars = [
        "phase",
        "interfaces",
        "startedAt",
        "restartCount",
        "observedGeneration",
    ]
    .iter()
    .all(|k| live[k] == want[k] || (empty(&live[k]) && empty(&want[k])));
    let conditions = want["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|w| {
            live["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|l| {
                    ["type", "status", "reason", "message", "observedGeneration"]
                        .iter()
                        .all(|k| l[k] == w[k])
                })
        });
    scalars && conditions
}
