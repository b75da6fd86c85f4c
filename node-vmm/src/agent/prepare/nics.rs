//! The NICs of a plan (pure): one tap per `spec.networks[]` entry, on the
//! administrator's allow-listed bridge (`bridge`) or on the node's
//! masquerade bridge (`masquerade`, with an address to reserve), with a
//! stable MAC.

use kubevmm_crds::VirtualMachineSpec;
use kubevmm_vmm::config::NetConfig;

use super::super::taps::{stable_mac, tap_name};
use super::{NodeContext, PrepareError, Tap};

/// One guest interface, for `status.interfaces`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// `spec.networks[].name`.
    pub network: String,
    /// Guest MAC.
    pub mac: String,
    /// Host tap.
    pub tap: String,
    /// On the masquerade network (its address comes from our DHCP).
    pub masquerade: bool,
}

/// An address the agent reserves for a masquerade NIC before the VM
/// starts (stable: keyed by the MAC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    /// `spec.networks[i]`, for errors.
    pub field: String,
    /// `spec.networks[].name`.
    pub network: String,
    /// The NIC's MAC.
    pub mac: String,
}

/// The NICs of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Nics {
    /// VMM configs.
    pub configs: Vec<NetConfig>,
    /// Taps to create.
    pub taps: Vec<Tap>,
    /// For status.
    pub interfaces: Vec<Interface>,
    /// Masquerade addresses to reserve.
    pub leases: Vec<LeaseRequest>,
}

/// Builds the NICs of `spec`.
pub fn networks(
    spec: &VirtualMachineSpec,
    uid: &str,
    ctx: &NodeContext,
) -> Result<Nics, PrepareError> {
    let mut out = Nics::default();
    for (i, n) in spec.networks.iter().enumerate() {
        let masquerade = n.bridge.is_none();
        let bridge = if let Some(b) = &n.bridge {
            if !ctx.allowed_bridges.contains(&b.name) {
                return Err(PrepareError::BridgeNotAllowed {
                    field: format!("spec.networks[{i}].bridge.name"),
                    bridge: b.name.clone(),
                    allowed: if ctx.allowed_bridges.is_empty() {
                        "none".into()
                    } else {
                        ctx.allowed_bridges.join(", ")
                    },
                });
            }
            b.name.clone()
        } else {
            ctx.masquerade_bridge
                .clone()
                .ok_or_else(|| PrepareError::Unsupported {
                    field: format!("spec.networks[{i}].masquerade"),
                    what:
                        "masquerade needs the node agent's bridge, NAT and DHCP (node-vmm agent); \
                           a standalone run can use bridge: {name: BRIDGE}"
                            .into(),
                })?
        };
        let mac = n
            .mac_address
            .clone()
            .unwrap_or_else(|| stable_mac(uid, &n.name));
        // The API server checks it too; the MAC also goes into the node's
        // nftables rules, so nothing but six hex pairs passes here.
        let six_pairs = mac.len() == 17
            && mac.bytes().enumerate().all(|(i, b)| {
                if i % 3 == 2 {
                    b == b':'
                } else {
                    b.is_ascii_hexdigit()
                }
            });
        if !six_pairs {
            return Err(PrepareError::Invalid {
                field: format!("spec.networks[{i}].macAddress"),
                what: format!("{mac:?} is not a MAC address such as 52:54:00:12:34:56"),
            });
        }
        let tap = tap_name(uid, i);
        out.taps.push(Tap {
            name: tap.clone(),
            bridge,
        });
        out.interfaces.push(Interface {
            network: n.name.clone(),
            mac: mac.clone(),
            tap: tap.clone(),
            masquerade,
        });
        if masquerade {
            out.leases.push(LeaseRequest {
                field: format!("spec.networks[{i}]"),
                network: n.name.clone(),
                mac: mac.clone(),
            });
        }
        out.configs.push(NetConfig {
            id: n.name.clone(),
            tap: Some(tap),
            fd: None,
            mac,
        });
    }
    Ok(out)
}
