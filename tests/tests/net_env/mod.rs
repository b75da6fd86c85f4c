//! Networks the network tests make (and remove): a masquerade bridge and
//! subnet of their own, an "outside" namespace behind a veth the agent is
//! told is its uplink, and a client namespace on the bridge.

#![allow(dead_code)] // each test file uses its own part

use std::process::Command;

/// Runs a command; its stdout, or a panic with its stderr.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `packets N` of an `nft list` output.
pub fn packets(nft_list: &str) -> u64 {
    nft_list
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

pub fn try_sh(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The test's networks: bridge, subnet, an outside namespace behind a veth
/// uplink, and a client namespace on the bridge; removed on drop.
pub struct Nets {
    pub id: String,
    pub bridge: String,
    pub uplink: String,
    pub outside_ns: String,
    pub client_ns: String,
    pub third: u8,
}

impl Nets {
    /// `tag` tells apart the tests of one run (they run in parallel).
    pub fn new(tag: u8) -> Self {
        let pid = std::process::id() % 10_000;
        let id = format!("{pid}{tag}");
        let third = u8::try_from(pid % 100 * 2 + 20).unwrap_or(20) + tag;
        let n = Self {
            id: id.clone(),
            bridge: format!("kvmb{id}"),
            uplink: format!("kvmu{id}"),
            outside_ns: format!("kvm-out-{id}"),
            client_ns: format!("kvm-cli-{id}"),
            third,
        };
        n.cleanup();
        // Outside: 10.251.T.2 in its namespace, 10.251.T.1 on the uplink.
        sh("ip", &["netns", "add", &n.outside_ns]);
        sh(
            "ip",
            &[
                "link",
                "add",
                &n.uplink,
                "type",
                "veth",
                "peer",
                "name",
                "kvmp0",
                "netns",
                &n.outside_ns,
            ],
        );
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.251.{third}.1/24"),
                "dev",
                &n.uplink,
            ],
        );
        sh("ip", &["link", "set", &n.uplink, "up"]);
        let inside = |args: &[&str]| {
            let mut a = vec!["netns", "exec", &n.outside_ns];
            a.extend_from_slice(args);
            sh("ip", &a);
        };
        inside(&[
            "ip",
            "addr",
            "add",
            &format!("10.251.{third}.2/24"),
            "dev",
            "kvmp0",
        ]);
        inside(&["ip", "link", "set", "kvmp0", "up"]);
        inside(&["ip", "link", "set", "lo", "up"]);
        // The peer counts the echo requests that arrive from the uplink's
        // address: what NAT rewrote the guest's source to.
        inside(&["nft", "add", "table", "ip", "seen"]);
        inside(&[
            "nft",
            "add",
            "chain",
            "ip",
            "seen",
            "input",
            "{ type filter hook input priority 0; policy accept; }",
        ]);
        inside(&[
            "nft",
            "add",
            "rule",
            "ip",
            "seen",
            "input",
            "ip",
            "saddr",
            &format!("10.251.{third}.1"),
            "icmp",
            "type",
            "echo-request",
            "counter",
        ]);
        n
    }

    /// Echo requests the outside peer received from the uplink's address.
    pub fn peer_saw_from_uplink(&self) -> u64 {
        let out = try_sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.outside_ns,
                "nft",
                "list",
                "table",
                "ip",
                "seen",
            ],
        )
        .unwrap_or_default();
        packets(&out)
    }

    pub fn subnet(&self) -> String {
        format!("10.252.{}.0/24", self.third)
    }

    pub fn gateway(&self) -> String {
        format!("10.252.{}.1", self.third)
    }

    pub fn peer(&self) -> String {
        format!("10.251.{}.2", self.third)
    }

    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--masquerade-bridge".into(),
            self.bridge.clone(),
            "--masquerade-subnet".into(),
            self.subnet(),
            "--uplink".into(),
            self.uplink.clone(),
            "--dns".into(),
            "10.251.0.53".into(),
        ]
    }

    pub fn cleanup(&self) {
        let _ = try_sh("ip", &["netns", "del", &self.outside_ns]);
        let _ = try_sh("ip", &["netns", "del", &self.client_ns]);
        let _ = try_sh("ip", &["link", "del", &self.uplink]);
        let _ = try_sh("ip", &["link", "del", &format!("kvmc{}", self.id)]);
        let _ = try_sh("ip", &["link", "del", &self.bridge]);
    }
}

impl Drop for Nets {
    fn drop(&mut self) {
        self.cleanup();
        let _ = try_sh("nft", &["delete", "table", "ip", &self.bridge]);
        let _ = try_sh("nft", &["delete", "table", "bridge", &self.bridge]);
    }
}
