//! The node's masquerade network, decided: its settings (agent flags), the
//! subnet checks against what the host already routes, the uplink and the
//! DNS servers handed to guests. Pure and table-tested; `network.rs` sets
//! it up (bridge, NAT, forwarding, DHCP).

use std::net::Ipv4Addr;

use super::netlink::HostNet;

/// Default masquerade subnet: 1022 guest addresses, private, and outside
/// the ranges Docker, Kubernetes' service and pod defaults and libvirt use.
pub const DEFAULT_SUBNET: &str = "10.217.0.0/22";

/// Default masquerade bridge.
pub const DEFAULT_BRIDGE: &str = "kubevmm0";

/// Why the masquerade settings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MasqueradeError {
    /// A malformed `--masquerade-subnet`.
    #[error(
        "--masquerade-subnet {given}: {why}; give a private IPv4 network such as {DEFAULT_SUBNET}"
    )]
    BadSubnet {
        /// What was given.
        given: String,
        /// What is wrong.
        why: String,
    },
    /// A bridge name that is not also a plain nftables identifier (its
    /// tables carry its name).
    #[error("--masquerade-bridge {0:?}: use 1 to 15 letters, digits and '_', starting with a letter (e.g. {DEFAULT_BRIDGE})")]
    BadBridge(String),
    /// An uplink name that is not an interface name.
    #[error(
        "--uplink {0:?}: give an interface name (1 to 15 letters, digits, '_', '.', '-', '@')"
    )]
    BadUplink(String),
    /// The subnet collides with a network the host uses.
    #[error("masquerade subnet {subnet} overlaps {what}; choose another subnet with --masquerade-subnet (chart value nodeVmm.masqueradeSubnet)")]
    Overlap {
        /// The subnet.
        subnet: String,
        /// The host's network it overlaps.
        what: String,
    },
}

/// Checks a masquerade bridge name.
pub fn bridge_name(s: &str) -> Result<String, MasqueradeError> {
    let ok = (1..=15).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(MasqueradeError::BadBridge(s.into()))
    }
}

/// Checks an `--uplink` interface name (it goes into the NAT rule).
pub fn uplink_name(s: &str) -> Result<String, MasqueradeError> {
    let ok = (1..=15).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-@".contains(c));
    if ok {
        Ok(s.to_string())
    } else {
        Err(MasqueradeError::BadUplink(s.into()))
    }
}

/// An IPv4 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// The network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length (16 to 29).
    pub prefix: u8,
}

impl Subnet {
    /// Parses `a.b.c.d/n`: host bits zero, prefix 16 to 29 (at least 6
    /// guests, at most 65534).
    pub fn parse(s: &str) -> Result<Self, MasqueradeError> {
        let bad = |why: &str| MasqueradeError::BadSubnet {
            given: s.into(),
            why: why.into(),
        };
        let (a, p) = s.split_once('/').ok_or_else(|| bad("missing /prefix"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = p.parse().map_err(|_| bad("the prefix is not a number"))?;
        if !(16..=29).contains(&prefix) {
            return Err(bad("the prefix must be 16 to 29"));
        }
        if u32::from(addr) & !mask(prefix) != 0 {
            return Err(bad("host bits are set"));
        }
        if !addr.is_private() {
            return Err(bad("not a private (RFC 1918) network"));
        }
        Ok(Self { addr, prefix })
    }

    /// The gateway: the first host address, on the bridge.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + 1)
    }

    /// Whether two networks share an address.
    pub fn overlaps(self, addr: Ipv4Addr, prefix: u8) -> bool {
        let m = mask(self.prefix.min(prefix));
        u32::from(self.addr) & m == u32::from(addr) & m
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// The host network `subnet` collides with, ignoring the masquerade
/// bridge's own address and route, the default route and host routes of
/// other kinds (0.0.0.0/0 overlaps everything and means nothing here).
pub fn overlap(subnet: Subnet, nets: &[HostNet], bridge: &str) -> Result<(), MasqueradeError> {
    for n in nets {
        if n.prefix == 0 || n.iface.as_deref() == Some(bridge) {
            continue;
        }
        if n.addr.is_loopback() {
            continue;
        }
        if subnet.overlaps(n.addr, n.prefix) {
            return Err(MasqueradeError::Overlap {
                subnet: subnet.to_string(),
                what: format!(
                    "{} {}/{}{}",
                    n.kind,
                    n.addr,
                    n.prefix,
                    n.iface
                        .as_ref()
                        .map(|i| format!(" on {i}"))
                        .unwrap_or_default()
                ),
            });
        }
    }
    Ok(())
}

/// The interface of the default route, the uplink when none is given.
pub fn default_uplink(nets: &[HostNet]) -> Option<String> {
    nets.iter()
        .find(|n| n.kind == "route" && n.prefix == 0)
        .and_then(|n| n.iface.clone())
}

/// The IPv4 name servers of `resolv.conf` text that guests can use: not
/// loopback (a resolver on the node's 127.0.0.x is not reachable from a
/// guest), at most three (the DHCP option's usual limit).
pub fn resolvers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next())?
        })
        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
        .take(3)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(kind: &'static str, a: [u8; 4], prefix: u8, iface: &str) -> HostNet {
        HostNet {
            addr: Ipv4Addr::from(a),
            prefix,
            iface: Some(iface.into()),
            kind,
        }
    }

    #[test]
    fn subnets_are_checked() {
        let ok = Subnet::parse("10.217.0.0/22").expect("default");
        assert_eq!(ok.gateway(), Ipv4Addr::new(10, 217, 0, 1));
        assert!(ok.overlaps(Ipv4Addr::new(10, 217, 3, 254), 32));
        assert!(!ok.overlaps(Ipv4Addr::new(10, 217, 4, 1), 32));
        for (bad, why) in [
            ("10.217.0.0", "missing /prefix"),
            ("10.217.0.300/22", "not an IPv4"),
            ("10.217.0.0/8", "16 to 29"),
            ("10.217.0.0/30", "16 to 29"),
            ("10.217.0.1/22", "host bits"),
            ("8.8.8.0/24", "private"),
        ] {
            let e = Subnet::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn bridge_names_are_plain_identifiers() {
        assert_eq!(bridge_name("kubevmm0").as_deref(), Ok("kubevmm0"));
        for bad in ["", "0br", "br-0", "a.b", "abcdefghijklmnop"] {
            assert!(bridge_name(bad).is_err(), "{bad}");
        }
        assert_eq!(uplink_name("eth0.100").as_deref(), Ok("eth0.100"));
        for bad in ["", "eth0\" accept", "a b", "abcdefghijklmnop"] {
            assert!(uplink_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_subnet_the_host_routes_is_refused_naming_what_it_overlaps() {
        let s = Subnet::parse("10.217.0.0/22").expect("subnet");
        let host = [
            net("route", [0, 0, 0, 0], 0, "eth0"),
            net("route", [192, 0, 2, 0], 24, "eth0"),
            net("address", [127, 0, 0, 1], 8, "lo"),
            net("address", [10, 217, 0, 1], 22, "kubevmm0"),
        ];
        assert_eq!(overlap(s, &host, "kubevmm0"), Ok(()));
        let mut clash = host.to_vec();
        clash.push(net("route", [10, 216, 0, 0], 15, "wg0"));
        let e = overlap(s, &clash, "kubevmm0").unwrap_err().to_string();
        assert!(e.contains("route 10.216.0.0/15 on wg0"), "{e}");
        assert!(e.contains("--masquerade-subnet"), "{e}");
        let mut inside = host.to_vec();
        inside.push(net("address", [10, 217, 2, 7], 32, "dummy0"));
        assert!(overlap(s, &inside, "kubevmm0").is_err());
        assert_eq!(default_uplink(&host).as_deref(), Some("eth0"));
    }

    #[test]
    fn guests_get_the_nodes_reachable_resolvers() {
        let conf = "# generated\nsearch example\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver ::1\nnameserver 1.1.1.1\nnameserver 8.8.8.8\nnameserver 9.9.9.9\n";
        assert_eq!(
            resolvers(conf),
            vec![
                Ipv4Addr::new(10, 255, 255, 53),
                Ipv4Addr::new(1, 1, 1, 1),
                Ipv4Addr::new(8, 8, 8, 8)
            ]
        );
        assert!(resolvers("").is_empty());
    }
}
