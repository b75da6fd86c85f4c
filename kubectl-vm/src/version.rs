//! `kubectl vm version`: this client's version beside the API server's and
//! every node-vmm's (from `HypervisorNode.status.agentVersion`), with a
//! warning when they are more than one minor version apart, as kubectl
//! warns about skew.

/// `major.minor` of a version string such as `0.1.0` or `v1.33.4`.
fn major_minor(v: &str) -> Option<(u64, u64)> {
    let mut parts = v.trim().trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((major, minor))
}

/// The warnings for `client` against each `(node, node-vmm version)`:
/// a different major version, or minors more than one apart.
pub fn skew_warnings(client: &str, agents: &[(String, String)]) -> Vec<String> {
    let Some((cmaj, cmin)) = major_minor(client) else {
        return Vec::new();
    };
    agents
        .iter()
        .filter_map(|(node, v)| {
            let (maj, min) = major_minor(v)?;
            (maj != cmaj || cmin.abs_diff(min) > 1).then(|| {
                format!(
                    "warning: kubectl-vm {client} and node-vmm {v} on node {node} are more than one \
                     minor version apart; use a kubectl-vm of the cluster's version"
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_of_more_than_one_minor_is_named_per_node() {
        let agents = vec![
            ("a".to_string(), "0.1.0".to_string()),
            ("b".to_string(), "0.2.3".to_string()),
            ("c".to_string(), "0.3.0".to_string()),
            ("d".to_string(), "1.1.0".to_string()),
            ("e".to_string(), "garbage".to_string()),
        ];
        let w = skew_warnings("0.1.0", &agents);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("node-vmm 0.3.0 on node c"), "{w:?}");
        assert!(w[1].contains("node-vmm 1.1.0 on node d"), "{w:?}");
        assert_eq!(major_minor("v1.33.13"), Some((1, 33)));
        assert_eq!(major_minor("1.34.0-rc.1"), Some((1, 34)));
        assert!(skew_warnings("dev", &agents).is_empty());
    }
}
