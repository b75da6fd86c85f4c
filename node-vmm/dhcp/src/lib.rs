//! The DHCP server (IPv4) that `node-vmm` runs on its masquerade bridge (`kubevmm0`).
//!
//! Every VM NIC attached to the bridge gets a *stable* address: the agent
//! [reserves](Leases::reserve) one per NIC MAC when it starts the VM, and the
//! server hands exactly that address to that MAC for as long as the
//! reservation lives, across VM reboots and agent restarts. Anything else
//! that speaks DHCP on the bridge (an admin's veth, a debug container) gets a
//! *dynamic* lease from the rest of the pool, which ends `lease_time` (plus a
//! grace, [`EXPIRY_GRACE`]) after its last renewal and is then reusable.
//!
//! # Layout
//!
//! * [`Config`] (this file): the subnet, the gateway (which is also the
//!   server identifier and the router handed out), DNS, lease time, MTU and
//!   domain. Validated once in [`Config::new`].
//! * [`lease`]: the lease table ([`Leases`]), one entry per MAC, persisted as
//!   JSON (temp file, fsync, rename). It alone decides which address a MAC
//!   gets, and guarantees that no two MACs ever hold one address.
//! * [`server`]: [`handle`], a *pure* function from a received datagram (and
//!   the current time) to a reply, an event for the agent and a changed
//!   table. It implements the RFC 2131 server state machine: DISCOVER →
//!   OFFER; REQUEST in SELECTING, INIT-REBOOT, RENEWING and REBINDING →
//!   ACK or NAK; RELEASE; DECLINE (the address is quarantined for
//!   [`DECLINE_QUARANTINE`] and the MAC gets another one); INFORM. All the
//!   protocol tests drive this function directly.
//! * [`socket`]: [`serve`], the only I/O: a UDP socket on `0.0.0.0:67` bound
//!   to the bridge (`SO_BINDTODEVICE`), a receive loop that feeds [`handle`],
//!   sends the reply, saves the table after every change and publishes
//!   [`Event`]s and [`Stats`].
//!
//! # Robustness
//!
//! Datagrams come from guests, so nothing read from the wire is trusted.
//! Before `dhcproto` sees a packet, [`server`] checks the fixed header
//! (`op`, `htype`, `hlen`, magic cookie) and walks the options itself with
//! every length bounded by the datagram, keeping only the few options a
//! server needs, each with its exact length; the decoder then only runs on
//! that sanitized copy. Malformed packets are reported as
//! [`DhcpError::Malformed`] (counted as drops by [`serve`]), never a panic;
//! BOOTREPLYs, non-Ethernet hardware and `hlen != 6` are ignored. A proptest
//! feeds arbitrary bytes to [`handle`].
//!
//! # Persistence
//!
//! [`Leases::save`] writes the whole table (it is small: one entry per NIC on
//! this node) to `<path>.tmp.<pid>`, fsyncs it, renames it over `<path>` and
//! fsyncs the directory, so a crash leaves either the old or the new table.
//! [`Leases::load`] drops entries that no longer fit the configuration (the
//! bridge subnet changed) and lists them in [`Leases::dropped`] for the
//! caller to log.

pub mod lease;
pub mod server;
pub mod socket;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use dhcproto::v4::MessageType;
pub use lease::{
    format_mac, parse_mac, Dropped, Lease, LeaseState, Leases, Mac, DECLINE_QUARANTINE,
    EXPIRY_GRACE, OFFER_HOLD,
};
pub use server::{handle, Event, Outcome, Reply, MAX_PACKET};
pub use socket::serve;

/// Every error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// The configuration is unusable (see [`Config::new`]).
    #[error("invalid DHCP configuration: {0}")]
    InvalidConfig(String),
    /// [`handle`] was given a configuration for another network than the one
    /// the lease table was loaded for.
    #[error("the lease table is for {table}, the configuration for {config}")]
    ConfigMismatch { table: String, config: String },
    /// The MAC is already reserved by another owner.
    #[error("MAC address already reserved by {owner}")]
    MacInUse { owner: String },
    /// No address of the subnet is free.
    #[error("no free address left in {subnet}")]
    PoolExhausted { subnet: String },
    /// A DISCOVER from an unknown MAC while dynamic leases already hold
    /// their share of the pool ([`Leases::set_max_dynamic`]).
    #[error("dynamic leases of {subnet} at their limit of {limit}")]
    DynamicLimit { subnet: String, limit: usize },
    /// A reservation's owner is empty.
    #[error("a reservation needs a non-empty owner")]
    InvalidOwner,
    /// A reservation's host name is not a DNS name (letters, digits, `-` and
    /// `.`, at most 253 bytes).
    #[error("invalid host name {0:?}")]
    InvalidHostname(String),
    /// A datagram that is not a well-formed DHCP message.
    #[error("malformed DHCP packet: {why}")]
    Malformed { why: &'static str },
    /// The reply could not be encoded (a bug, not an input problem).
    #[error("encoding a DHCP reply: {0}")]
    Encode(String),
    /// Reading or writing the lease file.
    #[error("lease file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The lease file is not a lease table this version understands.
    #[error("lease file {path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    /// The interface name cannot be bound to.
    #[error("invalid interface name {0:?}")]
    InvalidInterface(String),
    /// Setting up or using the server socket.
    #[error("DHCP socket on {iface}: {what}: {source}")]
    Socket {
        iface: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The network the server hands addresses out of, and the options it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The network address (no host bits set).
    pub subnet: Ipv4Addr,
    /// The prefix length, 8 to 30.
    pub prefix_len: u8,
    /// The bridge's own address: the router handed out and the server
    /// identifier. Never leased.
    pub gateway: Ipv4Addr,
    /// DNS servers (option 6; omitted when empty). At most 63.
    pub dns: Vec<Ipv4Addr>,
    /// Lease time (option 51); T1 is half of it, T2 seven eighths.
    pub lease_time: Duration,
    /// Interface MTU (option 26), if set; at least 68.
    pub mtu: Option<u16>,
    /// Domain name (option 15), if set.
    pub domain: Option<String>,
}

/// Longest lease accepted: `u32::MAX` seconds means "infinite" on the wire.
const MAX_LEASE_SECS: u64 = u32::MAX as u64 - 1;
/// Shortest lease accepted.
const MIN_LEASE_SECS: u64 = 10;
/// Most DNS servers: one option of 255 bytes.
const MAX_DNS: usize = 63;

impl Config {
    /// A validated configuration: `prefix_len` in 8..=30, `subnet` without
    /// host bits, `gateway` inside the subnet and neither its network nor its
    /// broadcast address, a lease time from 10 s to `u32::MAX - 1` s, an MTU
    /// of at least 68, at most 63 DNS servers and a domain that is a DNS
    /// name.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        subnet: Ipv4Addr,
        prefix_len: u8,
        gateway: Ipv4Addr,
        dns: Vec<Ipv4Addr>,
        lease_time: Duration,
        mtu: Option<u16>,
        domain: Option<String>,
    ) -> Result<Self, DhcpError> {
        let cfg = Self {
            subnet,
            prefix_len,
            gateway,
            dns,
            lease_time,
            mtu,
            domain,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what [`Config::new`] checks; for configurations built as
    /// struct literals.
    pub fn validate(&self) -> Result<(), DhcpError> {
        let bad = |why: String| Err(DhcpError::InvalidConfig(why));
        if !(8..=30).contains(&self.prefix_len) {
            return bad(format!(
                "prefix length /{} is not in 8..=30",
                self.prefix_len
            ));
        }
        if u32::from(self.subnet) & !self.mask_bits() != 0 {
            return bad(format!(
                "{}/{} has host bits set (the network is {}/{})",
                self.subnet,
                self.prefix_len,
                Ipv4Addr::from(u32::from(self.subnet) & self.mask_bits()),
                self.prefix_len
            ));
        }
        if !self.contains(self.gateway) {
            return bad(format!(
                "gateway {} is outside {}",
                self.gateway,
                self.cidr()
            ));
        }
        if self.gateway == self.subnet || self.gateway == self.broadcast() {
            return bad(format!(
                "gateway {} is the network or broadcast address of {}",
                self.gateway,
                self.cidr()
            ));
        }
        let secs = self.lease_time.as_secs();
        if !(MIN_LEASE_SECS..=MAX_LEASE_SECS).contains(&secs) {
            return bad(format!(
                "lease time {secs}s is not in {MIN_LEASE_SECS}..={MAX_LEASE_SECS} seconds"
            ));
        }
        if let Some(mtu) = self.mtu {
            if mtu < 68 {
                return bad(format!("MTU {mtu} is below the IPv4 minimum of 68"));
            }
        }
        if self.dns.len() > MAX_DNS {
            return bad(format!("{} DNS servers, at most {MAX_DNS}", self.dns.len()));
        }
        if let Some(domain) = &self.domain {
            if !is_dns_name(domain) {
                return bad(format!("domain {domain:?} is not a DNS name"));
            }
        }
        Ok(())
    }

    /// The netmask as a `u32` (robust against an invalid prefix length).
    fn mask_bits(&self) -> u32 {
        match self.prefix_len {
            0 => 0,
            n @ 1..=32 => u32::MAX << (32 - u32::from(n)),
            _ => u32::MAX,
        }
    }

    /// The netmask (option 1).
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    /// The subnet's broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet) | !self.mask_bits())
    }

    /// Whether `ip` is inside the subnet (network and broadcast included).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == u32::from(self.subnet) & self.mask_bits()
    }

    /// Whether `ip` may be leased: a host address of the subnet other than
    /// the gateway.
    pub fn in_pool(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.subnet && ip != self.broadcast() && ip != self.gateway
    }

    /// The subnet as `a.b.c.d/len`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.subnet, self.prefix_len)
    }

    /// The addresses that may be leased, lowest first: every host address of
    /// the subnet except the gateway.
    pub fn pool(&self) -> impl DoubleEndedIterator<Item = Ipv4Addr> + Clone + '_ {
        let first = u32::from(self.subnet).saturating_add(1);
        let last = u32::from(self.broadcast()).saturating_sub(1);
        (first..=last)
            .map(Ipv4Addr::from)
            .filter(move |ip| *ip != self.gateway)
    }

    /// How many addresses [`pool`](Self::pool) yields.
    pub fn pool_size(&self) -> u64 {
        let hosts = (1u64 << (32 - u32::from(self.prefix_len.clamp(1, 32)))).saturating_sub(2);
        hosts.saturating_sub(u64::from(self.in_pool_gateway()))
    }

    fn in_pool_gateway(&self) -> bool {
        self.contains(self.gateway)
            && self.gateway != self.subnet
            && self.gateway != self.broadcast()
    }

    /// Lease time in seconds, as sent in option 51.
    pub fn lease_secs(&self) -> u32 {
        u32::try_from(self.lease_time.as_secs().min(MAX_LEASE_SECS)).unwrap_or(u32::MAX - 1)
    }
}

/// Whether `name` is a DNS name: 1 to 253 bytes of ASCII letters, digits, `-`
/// and `.`, no empty label, no label over 63 bytes.
pub(crate) fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Counters of what [`serve`] saw and did, for the agent's metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages received, indexed by DHCP message type (1..=8; 0 = any other
    /// type, or none).
    received: [AtomicU64; 9],
    /// Messages sent, indexed like `received` (OFFER = 2, ACK = 5, NAK = 6).
    sent: [AtomicU64; 9],
    /// NAKs decided (sent or not).
    pub naks: AtomicU64,
    /// Malformed datagrams dropped.
    pub drops: AtomicU64,
    /// Well-formed datagrams ignored (BOOTREPLY, other hardware, another
    /// server's REQUEST, ...).
    pub ignored: AtomicU64,
    /// DISCOVERs that found no free address (or hit the dynamic limit).
    pub pool_exhausted: AtomicU64,
    /// Replies the socket failed to send.
    pub send_errors: AtomicU64,
    /// Lease table saves that failed.
    pub save_errors: AtomicU64,
}

/// Index into [`Stats`]' per-type arrays.
fn type_index(kind: MessageType) -> usize {
    match u8::from(kind) {
        n @ 1..=8 => usize::from(n),
        _ => 0,
    }
}

impl Stats {
    /// Counts a received message of this type.
    pub fn count_received(&self, kind: Option<MessageType>) {
        let i = kind.map_or(0, type_index);
        self.received[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a sent message of this type.
    pub fn count_sent(&self, kind: MessageType) {
        self.sent[type_index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    /// Messages received of this type (any type other than 1..=8 counts as
    /// one kind).
    pub fn received(&self, kind: MessageType) -> u64 {
        self.received[type_index(kind)].load(Ordering::Relaxed)
    }

    /// Messages sent of this type.
    pub fn sent(&self, kind: MessageType) -> u64 {
        self.sent[type_index(kind)].load(Ordering::Relaxed)
    }

    /// Every counter as `(name, value)`, for exporting: `received_<type>`,
    /// `sent_<type>`, then the plain counters.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        const NAMES: [&str; 9] = [
            "other", "discover", "offer", "request", "decline", "ack", "nak", "release", "inform",
        ];
        let mut out = Vec::with_capacity(24);
        for (i, name) in NAMES.iter().enumerate() {
            out.push((
                format!("received_{name}"),
                self.received[i].load(Ordering::Relaxed),
            ));
        }
        for (i, name) in NAMES.iter().enumerate() {
            out.push((format!("sent_{name}"), self.sent[i].load(Ordering::Relaxed)));
        }
        for (name, counter) in [
            ("naks", &self.naks),
            ("drops", &self.drops),
            ("ignored", &self.ignored),
            ("pool_exhausted", &self.pool_exhausted),
            ("send_errors", &self.send_errors),
            ("save_errors", &self.save_errors),
        ] {
            out.push((name.to_string(), counter.load(Ordering::Relaxed)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(subnet: [u8; 4], prefix: u8, gw: [u8; 4]) -> Result<Config, DhcpError> {
        Config::new(
            subnet.into(),
            prefix,
            gw.into(),
            vec![],
            Duration::from_secs(3600),
            None,
            None,
        )
    }

    #[test]
    fn config_validation() {
        assert!(cfg([10, 0, 0, 0], 24, [10, 0, 0, 1]).is_ok());
        assert!(cfg([10, 0, 0, 0], 7, [10, 0, 0, 1]).is_err());
        assert!(cfg([10, 0, 0, 0], 31, [10, 0, 0, 1]).is_err());
        assert!(cfg([10, 0, 0, 1], 24, [10, 0, 0, 2]).is_err(), "host bits");
        assert!(cfg([10, 0, 0, 0], 24, [10, 0, 1, 1]).is_err(), "outside");
        assert!(cfg([10, 0, 0, 0], 24, [10, 0, 0, 0]).is_err(), "network");
        assert!(
            cfg([10, 0, 0, 0], 24, [10, 0, 0, 255]).is_err(),
            "broadcast"
        );
        let mut c = cfg([10, 0, 0, 0], 24, [10, 0, 0, 1]).unwrap();
        c.mtu = Some(67);
        assert!(c.validate().is_err());
        c.mtu = Some(1500);
        c.domain = Some("bad domain".into());
        assert!(c.validate().is_err());
        c.domain = Some("cluster.local".into());
        c.lease_time = Duration::from_secs(5);
        assert!(c.validate().is_err());
        c.lease_time = Duration::from_secs(60);
        c.dns = vec![Ipv4Addr::LOCALHOST; 64];
        assert!(c.validate().is_err());
        c.dns.truncate(63);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn pool_skips_gateway_network_broadcast() {
        let c = cfg([192, 168, 5, 0], 29, [192, 168, 5, 3]).unwrap();
        let pool: Vec<_> = c.pool().collect();
        assert_eq!(
            pool,
            [1, 2, 4, 5, 6]
                .map(|h| Ipv4Addr::new(192, 168, 5, h))
                .to_vec()
        );
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 248));
        assert_eq!(c.broadcast(), Ipv4Addr::new(192, 168, 5, 7));
        assert!(c.in_pool(Ipv4Addr::new(192, 168, 5, 6)));
        assert!(!c.in_pool(Ipv4Addr::new(192, 168, 5, 3)));
        assert_eq!(c.cidr(), "192.168.5.0/29");
        assert_eq!(c.pool_size(), 5);
        let big = cfg([10, 0, 0, 0], 8, [10, 0, 0, 1]).unwrap();
        assert_eq!(big.pool_size(), (1 << 24) - 3);
        assert_eq!(
            big.pool().next_back(),
            Some(Ipv4Addr::new(10, 255, 255, 254))
        );
    }

    #[test]
    fn stats_snapshot_names() {
        let s = Stats::default();
        s.count_received(Some(MessageType::Discover));
        s.count_received(Some(MessageType::Unknown(42)));
        s.count_sent(MessageType::Offer);
        assert_eq!(s.received(MessageType::Discover), 1);
        assert_eq!(s.sent(MessageType::Offer), 1);
        let snap = s.snapshot();
        assert!(snap.contains(&("received_other".into(), 1)));
        assert!(snap.contains(&("sent_offer".into(), 1)));
    }
}
