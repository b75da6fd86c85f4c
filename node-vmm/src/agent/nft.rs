//! The agent's packet rules, in nftables tables of its own, named after
//! the masquerade bridge (`ip kubevmm0` and `bridge kubevmm0`; nothing else
//! on the node is touched), applied with Debian's `nft` as one atomic
//! transaction.
//!
//! - `ip kubevmm0`: NAT of the masquerade subnet to the uplink (`masquerade`
//!   in `postrouting`) and forwarding between the bridge and the uplink.
//! - `bridge kubevmm0`: anti-spoofing. A `prerouting` chain sends each
//!   guest's frames, by tap, to a chain of its own (`nic_<tap>`) that drops
//!   any frame not from the NIC's MAC and, on masquerade, any IPv4 or ARP
//!   not from its leased address (DHCP from 0.0.0.0 excepted), counting
//!   the drops in a named counter `spoof_<tap>` (read for metrics).
//!
//! [`render`] is pure: from the desired rules and the per-NIC chains that
//! exist now, the script that makes the tables exactly that. Chains and
//! counters of NICs still present are flushed and refilled, never
//! recreated, so counters survive other VMs coming and going, and running
//! it twice changes nothing (no duplicate rules). [`apply`] runs it.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// Why the rules could not be read or applied.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` is missing or failed.
    #[error("nft: {0}")]
    Nft(String),
}

/// NAT of the masquerade subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nat {
    /// The masquerade bridge.
    pub bridge: String,
    /// Its subnet.
    pub subnet: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
    /// The interface to masquerade to; `None`: any but the bridge.
    pub uplink: Option<String>,
}

/// What one guest NIC may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicGuard {
    /// Its tap.
    pub tap: String,
    /// Its MAC (`52:54:00:..`).
    pub mac: String,
    /// Its address on masquerade (`None` on an administrator's bridge:
    /// MAC only).
    pub ip: Option<Ipv4Addr>,
}

/// The whole desired state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rules {
    /// The name of both tables: the masquerade bridge's, so two agents on
    /// one host (dev clusters, tests) never touch each other's rules.
    pub table: String,
    /// NAT, when a masquerade network is in use.
    pub nat: Option<Nat>,
    /// Every guest NIC on the node.
    pub nics: Vec<NicGuard>,
}

fn chain(tap: &str) -> String {
    format!("nic_{tap}")
}

/// The name of the drop counter of `tap`.
pub fn counter(tap: &str) -> String {
    format!("spoof_{tap}")
}

/// The script that turns the tables into `rules`, given the `nic_` chains
/// that exist now (from [`existing_nic_chains`]).
pub fn render(rules: &Rules, existing: &[String]) -> String {
    let mut s = String::new();
    let t = &rules.table;
    // NAT and forwarding (the table goes when no masquerade is in use).
    let _ = writeln!(s, "add table ip {t}");
    match &rules.nat {
        Some(n) => {
            let net = format!("{}/{}", n.subnet, n.prefix);
            let _ = writeln!(
                s,
                "add chain ip {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}"
            );
            let _ = writeln!(s, "flush chain ip {t} postrouting");
            let out = n.uplink.as_ref().map_or_else(
                || format!("oifname != \"{}\"", n.bridge),
                |u| format!("oifname \"{u}\""),
            );
            let _ = writeln!(
                s,
                "add rule ip {t} postrouting ip saddr {net} ip daddr != {net} {out} masquerade"
            );
            let _ = writeln!(
                s,
                "add chain ip {t} forward {{ type filter hook forward priority filter; policy accept; }}"
            );
            let _ = writeln!(s, "flush chain ip {t} forward");
            let _ = writeln!(
                s,
                "add rule ip {t} forward ct state established,related accept"
            );
            let _ = writeln!(
                s,
                "add rule ip {t} forward iifname \"{}\" ip saddr {net} accept",
                n.bridge
            );
        }
        None => {
            let _ = writeln!(s, "delete table ip {t}");
        }
    }
    // Anti-spoofing.
    let _ = writeln!(s, "add table bridge {t}");
    let _ = writeln!(s, "add map bridge {t} nics {{ type ifname : verdict; }}");
    let _ = writeln!(
        s,
        "add chain bridge {t} prerouting {{ type filter hook prerouting priority -200; policy accept; }}"
    );
    let _ = writeln!(s, "flush chain bridge {t} prerouting");
    let _ = writeln!(s, "add rule bridge {t} prerouting iifname vmap @nics");
    let _ = writeln!(s, "flush map bridge {t} nics");
    for n in &rules.nics {
        let (c, k) = (chain(&n.tap), counter(&n.tap));
        let _ = writeln!(s, "add counter bridge {t} {k}");
        let _ = writeln!(s, "add chain bridge {t} {c}");
        let _ = writeln!(s, "flush chain bridge {t} {c}");
        let drop = format!("counter name \"{k}\" drop");
        let _ = writeln!(s, "add rule bridge {t} {c} ether saddr != {} {drop}", n.mac);
        if let Some(ip) = n.ip {
            let _ = writeln!(
                s,
                "add rule bridge {t} {c} ether type arp arp saddr ether != {} {drop}",
                n.mac
            );
            let _ = writeln!(
                s,
                "add rule bridge {t} {c} ether type arp arp saddr ip != {{ {ip}, 0.0.0.0 }} {drop}"
            );
            // DHCP names the client in the packet too (chaddr, 28 bytes
            // into BOOTP): a guest may not speak DHCP for another MAC.
            let _ = writeln!(
                s,
                "add rule bridge {t} {c} ether type ip udp dport 67 @th,288,48 != 0x{} {drop}",
                n.mac.replace(':', "")
            );
            let _ = writeln!(
                s,
                "add rule bridge {t} {c} ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept"
            );
            let _ = writeln!(
                s,
                "add rule bridge {t} {c} ether type ip ip saddr != {ip} {drop}"
            );
            // No IPv6 on masquerade (docs/networking.md): not forwarded.
            let _ = writeln!(s, "add rule bridge {t} {c} ether type ip6 drop");
        }
        let _ = writeln!(
            s,
            "add element bridge {t} nics {{ \"{}\" : jump {c} }}",
            n.tap
        );
    }
    for old in existing {
        let Some(tap) = old.strip_prefix("nic_") else {
            continue;
        };
        if rules.nics.iter().all(|n| n.tap != tap) {
            let _ = writeln!(s, "delete chain bridge {t} {old}");
            let _ = writeln!(s, "delete counter bridge {t} {}", counter(tap));
        }
    }
    s
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            NftError::Nft(format!(
                "cannot run nft ({e}); install Debian's nftables package on the node"
            ))
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| NftError::Nft(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NftError::Nft(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NftError::Nft(format!(
            "`nft {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The objects of our bridge table (chains, counters, ...), from `nft -j`.
fn objects(table: &str) -> Vec<serde_json::Value> {
    let Ok(out) = nft(&["-j", "list", "table", "bridge", table], None) else {
        return Vec::new(); // no table yet
    };
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v.get("nftables").and_then(|a| a.as_array().cloned()))
        .unwrap_or_default()
}

/// The per-NIC chains in our bridge table now.
pub fn existing_nic_chains(table: &str) -> Vec<String> {
    objects(table)
        .iter()
        .filter_map(|o| o.pointer("/chain/name").and_then(|n| n.as_str()))
        .filter(|n| n.starts_with("nic_"))
        .map(String::from)
        .collect()
}

/// Packets dropped per tap by the anti-spoofing rules.
pub fn spoof_drops(table: &str) -> Vec<(String, u64)> {
    objects(table)
        .iter()
        .filter_map(|o| {
            let name = o.pointer("/counter/name")?.as_str()?;
            let tap = name.strip_prefix("spoof_")?;
            Some((tap.to_string(), o.pointer("/counter/packets")?.as_u64()?))
        })
        .collect()
}

/// Makes the tables `rules`, atomically.
pub fn apply(rules: &Rules) -> Result<(), NftError> {
    let script = render(rules, &existing_nic_chains(&rules.table));
    nft(&["-f", "-"], Some(&script)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(tap: &str, ip: Option<[u8; 4]>) -> NicGuard {
        NicGuard {
            tap: tap.into(),
            mac: "52:54:00:aa:bb:cc".into(),
            ip: ip.map(Ipv4Addr::from),
        }
    }

    fn nat(uplink: Option<&str>) -> Nat {
        Nat {
            bridge: "kubevmm0".into(),
            subnet: Ipv4Addr::new(10, 200, 0, 0),
            prefix: 22,
            uplink: uplink.map(String::from),
        }
    }

    #[test]
    fn renders_nat_and_a_chain_per_nic() {
        let rules = Rules {
            table: "kubevmm0".into(),
            nat: Some(nat(Some("eth0"))),
            nics: vec![nic("kvt1n0", Some([10, 200, 0, 5])), nic("kvt2n0", None)],
        };
        let s = render(&rules, &["nic_kvt1n0".into(), "nic_gone".into()]);
        for want in [
            "add rule ip kubevmm0 postrouting ip saddr 10.200.0.0/22 ip daddr != 10.200.0.0/22 oifname \"eth0\" masquerade",
            "add rule bridge kubevmm0 nic_kvt1n0 ether saddr != 52:54:00:aa:bb:cc counter name \"spoof_kvt1n0\" drop",
            "add rule bridge kubevmm0 nic_kvt1n0 ether type ip ip saddr != 10.200.0.5 counter name \"spoof_kvt1n0\" drop",
            "arp saddr ip != { 10.200.0.5, 0.0.0.0 }",
            "ether type ip udp dport 67 @th,288,48 != 0x525400aabbcc counter name \"spoof_kvt1n0\" drop",
            "add element bridge kubevmm0 nics { \"kvt2n0\" : jump nic_kvt2n0 }",
            "delete chain bridge kubevmm0 nic_gone",
            "delete counter bridge kubevmm0 spoof_gone",
        ] {
            assert!(s.contains(want), "{want}\nnot in\n{s}");
        }
        // A bridge NIC is held to its MAC only.
        assert!(!s.contains("nic_kvt2n0 ether type ip"), "{s}");
        // NICs still present are refilled, never deleted: counters survive.
        assert!(
            !s.contains("delete chain bridge kubevmm0 nic_kvt1n0"),
            "{s}"
        );
        assert!(s.contains("flush chain bridge kubevmm0 nic_kvt1n0"), "{s}");
        // Every base chain is flushed before it is filled: no duplicates.
        for base in [
            "ip kubevmm0 postrouting",
            "ip kubevmm0 forward",
            "bridge kubevmm0 prerouting",
        ] {
            let flush = s.find(&format!("flush chain {base}")).expect(base);
            let add = s.find(&format!("add rule {base}")).expect(base);
            assert!(flush < add, "{base}");
        }
    }

    #[test]
    fn without_an_uplink_anything_but_the_bridge_is_masqueraded() {
        let s = render(
            &Rules {
                table: "kubevmm0".into(),
                nat: Some(nat(None)),
                nics: vec![],
            },
            &[],
        );
        assert!(s.contains("oifname != \"kubevmm0\" masquerade"), "{s}");
    }

    #[test]
    fn no_masquerade_removes_the_nat_table() {
        let s = render(
            &Rules {
                table: "kubevmm0".into(),
                ..Rules::default()
            },
            &[],
        );
        assert!(
            s.contains("add table ip kubevmm0\ndelete table ip kubevmm0"),
            "{s}"
        );
    }

    #[test]
    fn the_kernel_accepts_the_rendered_rules() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "nftables tests need root");
        let rules = Rules {
            table: "kubevmm0".into(),
            nat: Some(nat(Some("lo"))),
            nics: vec![nic("kvtt1n0", Some([10, 200, 0, 9])), nic("kvtt2n0", None)],
        };
        let check = nft(&["-c", "-f", "-"], Some(&render(&rules, &[])));
        assert!(check.is_ok(), "{check:?}");
    }
}
