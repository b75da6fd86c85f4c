//! kube-apiserver's own request counters, for the benchmarks: how many
//! requests of each kind a step cost.

use std::collections::BTreeMap;

use crate::ControlPlane;

/// `apiserver_request_total` summed over codes, by (verb, resource, subresource).
pub type Requests = BTreeMap<(String, String, String), u64>;

/// The counters now (through `kubectl get --raw /metrics`).
pub fn apiserver_requests(cp: &ControlPlane) -> Requests {
    let out = cp
        .kubectl()
        .args(["get", "--raw", "/metrics"])
        .output()
        .expect("kubectl get --raw /metrics");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut by = Requests::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let n = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        *by.entry((label("verb"), label("resource"), label("subresource")))
            .or_default() += n;
    }
    by
}

/// How many requests of one kind were made between `before` and `after`.
pub fn delta(after: &Requests, before: &Requests, verb: &str, resource: &str, sub: &str) -> u64 {
    let key = (verb.to_string(), resource.to_string(), sub.to_string());
    after
        .get(&key)
        .copied()
        .unwrap_or(0)
        .saturating_sub(before.get(&key).copied().unwrap_or(0))
}

/// The writes (every verb but GET, LIST and WATCH) between `before` and
/// `after`, by (verb, resource, subresource), busiest first.
pub fn writes_between(after: &Requests, before: &Requests) -> Vec<((String, String, String), u64)> {
    let mut v: Vec<_> = after
        .iter()
        .filter(|((verb, _, _), _)| !matches!(verb.as_str(), "GET" | "LIST" | "WATCH"))
        .map(|(k, n)| {
            (
                k.clone(),
                n.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}
