//! The node's masquerade network, made real: the bridge with the gateway
//! address, IP forwarding, the NAT and anti-spoofing rules ([`super::nft`])
//! and the DHCP server ([`kubevmm_dhcp`]) with its lease table, persisted in
//! `<state>/network/leases.json`.
//!
//! Everything is idempotent and derived from what exists: [`Network::ensure`]
//! makes the bridge, address, forwarding and server exist (a deleted bridge
//! is made again, its taps re-attached); [`Network::sync_rules`] renders the
//! rules for the taps present on the node. The agent calls them when a VM
//! starts and from its sweep, so an agent restart re-creates what is
//! missing exactly once.

use kubevmm_crds::contract::reason;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kubevmm_dhcp::{Config as DhcpConfig, DhcpError, Event, Leases, Stats};
use tokio::sync::mpsc::UnboundedSender;

use super::masquerade::{self, MasqueradeError, Subnet};
use super::netlink::{self, NetlinkError};
use super::nft::{self, Nat, NftError, NicGuard, Rules};

/// The masquerade network's settings (agent flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The bridge (`--masquerade-bridge`, default `kubevmm0`).
    pub bridge: String,
    /// Its subnet (`--masquerade-subnet`); the gateway is its first address.
    pub subnet: Subnet,
    /// The interface NAT goes out of (`--uplink`; default: the default
    /// route's).
    pub uplink: Option<String>,
    /// DNS servers for guests (`--dns`; default: the node's reachable
    /// resolvers from /etc/resolv.conf).
    pub dns: Option<Vec<Ipv4Addr>>,
    /// DHCP lease time.
    pub lease_time: Duration,
    /// MTU handed to guests (`--guest-mtu`).
    pub mtu: Option<u16>,
}

/// Why the masquerade network cannot be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// Bad settings, or a subnet the host already uses.
    #[error(transparent)]
    Masquerade(#[from] MasqueradeError),
    /// A link or address operation failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The rules could not be applied.
    #[error(transparent)]
    Nft(#[from] NftError),
    /// The lease table or DHCP settings.
    #[error(transparent)]
    Dhcp(#[from] DhcpError),
    /// IPv4 forwarding could not be turned on.
    #[error("cannot turn on IPv4 forwarding (/proc/sys/net/ipv4/ip_forward): {0}")]
    Forwarding(String),
}

/// The lease owner of a VM NIC: `ns/name/uid/network`.
pub fn owner(namespace: &str, name: &str, uid: &str, network: &str) -> String {
    format!("{namespace}/{name}/{uid}/{network}")
}

/// The masquerade network of this node.
pub struct Network {
    /// Its settings.
    pub settings: Settings,
    /// DHCP counters.
    pub stats: Arc<Stats>,
    dhcp: DhcpConfig,
    leases: Arc<Mutex<Leases>>,
    events: UnboundedSender<Event>,
    rt: tokio::runtime::Handle,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
    forwarding_checked: AtomicBool,
    /// The rules last applied, and when: the same rules are not applied
    /// again (two `nft` runs) on every sweep, only once a minute, which is
    /// also how soon a table flushed by hand comes back.
    applied: Mutex<Option<(Rules, std::time::Instant)>>,
    /// `--uplink`, or the default route's interface at the last check.
    uplink: Mutex<Option<String>>,
    state_dir: PathBuf,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Network {
    /// Loads the lease table; nothing is set up on the host until
    /// [`Network::ensure`].
    pub fn new(
        settings: Settings,
        state_dir: &Path,
        events: UnboundedSender<Event>,
    ) -> Result<Self, NetworkError> {
        let dns = settings.dns.clone().unwrap_or_else(|| {
            masquerade::resolvers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
        });
        let dhcp = DhcpConfig::new(
            settings.subnet.addr,
            settings.subnet.prefix,
            settings.subnet.gateway(),
            dns,
            settings.lease_time,
            settings.mtu,
            None,
        )?;
        let dir = state_dir.join("network");
        std::fs::create_dir_all(&dir).map_err(|e| {
            NetworkError::Dhcp(DhcpError::Io {
                path: dir.clone(),
                source: e,
            })
        })?;
        let leases = Leases::load(&dir.join("leases.json"), &dhcp)?;
        for d in leases.dropped() {
            tracing::warn!(?d, "lease outside the masquerade subnet dropped");
        }
        Ok(Self {
            settings,
            stats: Arc::new(Stats::default()),
            dhcp,
            leases: Arc::new(Mutex::new(leases)),
            events,
            rt: tokio::runtime::Handle::current(),
            server: Mutex::new(None),
            forwarding_checked: AtomicBool::new(false),
            uplink: Mutex::new(None),
            applied: Mutex::new(None),
            state_dir: state_dir.to_path_buf(),
        })
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes the bridge (with its gateway address), forwarding and the DHCP
    /// server exist; refuses a subnet the host already uses.
    pub fn ensure(&self) -> Result<(), NetworkError> {
        let s = &self.settings;
        let nets = netlink::host_networks()?;
        masquerade::overlap(s.subnet, &nets, &s.bridge)?;
        *self
            .uplink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = s
            .uplink
            .clone()
            .or_else(|| masquerade::default_uplink(&nets));
        let made = netlink::ensure_bridge(&s.bridge, s.subnet.gateway(), s.subnet.prefix)?;
        if made.created || made.address_added {
            tracing::info!(
                bridge = s.bridge,
                gateway = %s.subnet.gateway(),
                subnet = %s.subnet,
                "masquerade bridge set up"
            );
        }
        if !self.forwarding_checked.swap(true, Ordering::Relaxed) {
            let path = "/proc/sys/net/ipv4/ip_forward";
            let now = std::fs::read_to_string(path).unwrap_or_default();
            if now.trim() != "1" {
                std::fs::write(path, "1").map_err(|e| NetworkError::Forwarding(e.to_string()))?;
                tracing::info!(
                    "IPv4 forwarding turned on: masquerade guests reach the uplink through NAT"
                );
            }
        }
        let mut server = self
            .server
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if made.created {
            // A socket bound to the bridge that was deleted hears nothing.
            if let Some(old) = server.take() {
                old.abort();
            }
        }
        if server
            .as_ref()
            .is_none_or(tokio::task::JoinHandle::is_finished)
        {
            let (iface, cfg, leases, events, stats) = (
                s.bridge.clone(),
                self.dhcp.clone(),
                self.leases.clone(),
                self.events.clone(),
                self.stats.clone(),
            );
            *server = Some(self.rt.spawn(async move {
                if let Err(e) = kubevmm_dhcp::serve(&iface, cfg, leases, events, stats).await {
                    tracing::warn!(
                        iface,
                        "DHCP server stopped: {e}; restarted by the next sweep"
                    );
                }
            }));
        }
        // Taps of running guests whose bridge was deleted and made again.
        for tap in masquerade_taps(&self.state_dir, &self.leases()) {
            if !std::fs::read_link(format!("/sys/class/net/{tap}/master"))
                .is_ok_and(|m| m.ends_with(&s.bridge))
            {
                netlink::attach(&tap, &s.bridge)?;
                tracing::info!(tap, "tap attached to the masquerade bridge again");
            }
        }
        Ok(())
    }

    /// Whether the masquerade network can be set up here (its subnet free
    /// of the host's routes), for the `HypervisorNode`'s conditions.
    pub fn condition(&self) -> super::node::NodeCondition {
        let s = &self.settings;
        let check = netlink::host_networks()
            .map_err(NetworkError::from)
            .and_then(|nets| Ok(masquerade::overlap(s.subnet, &nets, &s.bridge)?));
        let (ok, reason, message) = match check {
            Ok(()) => (
                true,
                "SubnetFree",
                format!(
                    "bridge {} on {} (gateway {})",
                    s.bridge,
                    s.subnet,
                    s.subnet.gateway()
                ),
            ),
            Err(NetworkError::Masquerade(e)) => (false, reason::SUBNET_OVERLAP, e.to_string()),
            Err(e) => (false, reason::MASQUERADE_UNAVAILABLE, e.to_string()),
        };
        super::node::NodeCondition {
            type_: "MasqueradeReady",
            ok,
            reason,
            message,
        }
    }

    /// The stable address of a masquerade NIC (made once, kept until the VM
    /// is deleted).
    pub fn reserve(&self, mac: &str, owner: &str, hostname: &str) -> Result<Ipv4Addr, DhcpError> {
        let Some(m) = kubevmm_dhcp::lease::parse_mac(mac) else {
            return Err(DhcpError::Malformed {
                why: "not a MAC address",
            });
        };
        let mut leases = self.leases();
        let ip = leases.reserve(m, owner, hostname)?;
        leases.save()?;
        Ok(ip)
    }

    /// The address the guest behind `mac` was given (acknowledged), if any.
    pub fn bound_ip(&self, mac: &str) -> Option<Ipv4Addr> {
        kubevmm_dhcp::lease::parse_mac(mac).and_then(|m| self.leases().bound(m))
    }

    /// Forgets every address of the VM with `uid` (it was deleted).
    pub fn forget_vm(&self, uid: &str) {
        let mut leases = self.leases();
        let needle = format!("/{uid}/");
        if leases.retain_reserved(|_, owner| !owner.contains(&needle)) > 0 {
            if let Err(e) = leases.save() {
                tracing::warn!(uid, "lease table not saved: {e}");
            }
        }
    }

    /// The uids of the VMs holding addresses.
    pub fn owner_uids(&self) -> std::collections::BTreeSet<String> {
        self.leases()
            .entries()
            .filter_map(|(_, l)| l.owner.as_deref()?.split('/').nth(2).map(String::from))
            .collect()
    }

    /// Forgets the addresses of VMs `keep` says nothing on the node needs
    /// any more (no binding, run state or disks here): leases a lost
    /// release or a wiped state directory left behind.
    pub fn forget_unowned(&self, keep: impl Fn(&str) -> bool) {
        let mut leases = self.leases();
        let dropped = leases.retain_reserved(|_, owner| owner.split('/').nth(2).is_none_or(&keep));
        if dropped > 0 {
            tracing::info!(dropped, "addresses of VMs gone from this node forgotten");
            if let Err(e) = leases.save() {
                tracing::warn!("lease table not saved: {e}");
            }
        }
    }

    /// Applies the NAT and anti-spoofing rules for the guest NICs on the
    /// node now.
    pub fn sync_rules(&self) -> Result<(), NetworkError> {
        let nics = guards(&self.state_dir, &self.leases());
        let s = &self.settings;
        let nat = nics.iter().any(|n| n.ip.is_some()).then(|| Nat {
            bridge: s.bridge.clone(),
            subnet: s.subnet.addr,
            prefix: s.subnet.prefix,
            uplink: self
                .uplink
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        });
        let rules = Rules {
            table: s.bridge.clone(),
            nat,
            nics,
        };
        let mut applied = self
            .applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fresh = applied
            .as_ref()
            .is_some_and(|(r, at)| *r == rules && at.elapsed() < Duration::from_secs(60));
        if !fresh {
            *applied = None;
            nft::apply(&rules)?;
            *applied = Some((rules, std::time::Instant::now()));
        }
        Ok(())
    }

    /// The VM whose NIC has `mac`, from its lease's owner.
    pub fn owner_of(
        &self,
        mac: kubevmm_dhcp::Mac,
    ) -> Option<kube::runtime::reflector::ObjectRef<kubevmm_crds::VirtualMachine>> {
        let leases = self.leases();
        let owner = leases.get(mac)?.owner.clone()?;
        let mut parts = owner.split('/');
        let (ns, name) = (parts.next()?, parts.next()?);
        Some(kube::runtime::reflector::ObjectRef::new(name).within(ns))
    }

    /// How many addresses are reserved for VM NICs.
    pub fn reserved(&self) -> usize {
        self.leases()
            .entries()
            .filter(|(_, l)| l.owner.is_some())
            .count()
    }

    /// Whether any VM on the node holds a masquerade address.
    pub fn in_use(&self) -> bool {
        self.leases().entries().any(|(_, l)| l.owner.is_some())
    }
}

/// Every guest NIC with a tap on the node now, from the VMM configs in the
/// run state: held to its MAC, and on masquerade (a reserved address) to its
/// address.
fn guards(state_dir: &Path, leases: &Leases) -> Vec<NicGuard> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(state_dir.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(text) = std::fs::read(entry.path().join("vmm.json")) else {
            continue;
        };
        let Ok(cfg) = serde_json::from_slice::<kubevmm_vmm::VmConfig>(&text) else {
            continue;
        };
        let uid = entry.file_name().to_string_lossy().into_owned();
        for (i, n) in cfg.nets.into_iter().enumerate() {
            // The config names the tap by fd once the agent opened it.
            let tap = n.tap.unwrap_or_else(|| super::taps::tap_name(&uid, i));
            if netlink::index(&tap).is_none() {
                continue;
            }
            let ip = kubevmm_dhcp::lease::parse_mac(&n.mac)
                .and_then(|m| leases.get(m))
                .filter(|l| l.owner.is_some())
                .map(|l| l.ip);
            out.push(NicGuard {
                tap,
                mac: n.mac,
                ip,
            });
        }
    }
    out.sort_by(|a, b| a.tap.cmp(&b.tap));
    out
}

/// Taps of guests on the masquerade network.
fn masquerade_taps(state_dir: &Path, leases: &Leases) -> Vec<String> {
    guards(state_dir, leases)
        .into_iter()
        .filter(|g| g.ip.is_some())
        .map(|g| g.tap)
        .collect()
}
