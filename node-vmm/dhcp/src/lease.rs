//! The lease table: one entry per MAC, persisted as JSON.
//!
//! An entry is either *reserved* (it has an owner, `ns/name/net`, set by the
//! agent through [`Leases::reserve`]) or *dynamic* (created by a DISCOVER from
//! an unknown MAC). A reserved entry keeps its address until the agent
//! forgets it; its [`LeaseState`] only tells what the client did with it. A
//! dynamic entry holds its address until it is *reclaimable* (an offer not
//! taken within [`OFFER_HOLD`], a lease ended more than [`EXPIRY_GRACE`] ago)
//! and another MAC needs that address; the entry is then removed.
//!
//! Every address handed out comes from one function (`Leases::allocate`),
//! which skips addresses held by any other entry that is not reclaimable and
//! addresses in DECLINE quarantine, so no two MACs ever hold one address.
//! Dynamic leases may hold at most half the pool by default
//! ([`Leases::set_max_dynamic`]).
//!
//! Reserved addresses are taken from the bottom of the pool, dynamic ones
//! from the top, so the two kinds rarely meet.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{is_dns_name, Config, DhcpError};

/// A MAC address (the DHCP `chaddr` of an Ethernet client).
pub type Mac = [u8; 6];

/// How long an OFFER holds an address for a dynamic client that has not
/// requested it yet.
pub const OFFER_HOLD: Duration = Duration::from_secs(60);
/// How long after a dynamic lease ends its address is still kept for the
/// same client (clocks drift; a client may be late to renew).
pub const EXPIRY_GRACE: Duration = Duration::from_secs(60);
/// How long a declined address (someone else answers ARP for it) is not
/// handed out again.
pub const DECLINE_QUARANTINE: Duration = Duration::from_secs(600);

/// The version of the file format written by [`Leases::save`].
const FILE_VERSION: u32 = 1;

/// What the client did with an entry's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Reserved by the agent; not (or no longer) acknowledged to the client.
    Reserved,
    /// Offered to the client (DISCOVER answered), not yet requested.
    Offered,
    /// Acknowledged to the client until `expires`.
    Bound,
    /// The client declined the address: it is quarantined, and the MAC gets
    /// another address the next time it asks (a reserved MAC: a new stable
    /// one, at its next DISCOVER or [`Leases::reserve`]).
    Declined,
}

/// One entry of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The address held by this MAC.
    pub ip: Ipv4Addr,
    /// `ns/name/net` for a reservation; `None` for a dynamic lease.
    pub owner: Option<String>,
    /// The host name sent in option 12 (reservations only).
    pub hostname: Option<String>,
    /// What the client did with the address.
    pub state: LeaseState,
    /// When the offer, lease or quarantine ends; `None` for a reservation
    /// that is not offered or bound.
    pub expires: Option<SystemTime>,
}

impl Lease {
    /// Whether this is a reservation (it has an owner).
    pub fn is_reserved(&self) -> bool {
        self.owner.is_some()
    }

    /// Whether another MAC may take this entry's address: never for a
    /// reservation; for a dynamic entry once its offer or quarantine ended,
    /// or its lease ended more than [`EXPIRY_GRACE`] ago.
    pub fn reclaimable(&self, now: SystemTime) -> bool {
        if self.is_reserved() {
            return false;
        }
        let Some(expires) = self.expires else {
            return true;
        };
        let end = match self.state {
            LeaseState::Bound => add(expires, EXPIRY_GRACE),
            _ => expires,
        };
        now >= end
    }
}

/// An entry of the lease file that [`Leases::load`] did not take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// The MAC as written in the file.
    pub mac: String,
    /// The address as written in the file.
    pub ip: Ipv4Addr,
    /// The owner, if it was a reservation.
    pub owner: Option<String>,
    /// Why it was dropped.
    pub why: String,
}

/// The lease table of one bridge.
#[derive(Debug)]
pub struct Leases {
    path: PathBuf,
    cfg: Config,
    entries: BTreeMap<Mac, Lease>,
    /// Declined addresses and the end of their quarantine.
    quarantine: BTreeMap<Ipv4Addr, SystemTime>,
    dropped: Vec<Dropped>,
    /// Most dynamic leases held at once.
    max_dynamic: usize,
}

/// `t + d`, or `t` if that overflows `SystemTime` (never panics).
pub(crate) fn add(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d).unwrap_or(t)
}

fn to_unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn from_unix(secs: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// `52:54:00:12:34:56`.
pub fn format_mac(mac: &Mac) -> String {
    let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

/// Parses `52:54:00:12:34:56` (or with `-`), case-insensitive.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[derive(Serialize, Deserialize)]
struct FileTable {
    version: u32,
    /// Informational: the subnet the table was written for.
    subnet: String,
    leases: Vec<FileLease>,
    #[serde(default)]
    declined: Vec<FileDeclined>,
}

#[derive(Serialize, Deserialize)]
struct FileLease {
    mac: String,
    ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hostname: Option<String>,
    state: LeaseState,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct FileDeclined {
    ip: Ipv4Addr,
    /// Unix seconds.
    until: u64,
}

impl Leases {
    /// An empty table that [`save`](Self::save)s to `path`.
    pub fn empty(path: &Path, cfg: &Config) -> Self {
        Self {
            path: path.to_path_buf(),
            cfg: cfg.clone(),
            entries: BTreeMap::new(),
            quarantine: BTreeMap::new(),
            dropped: Vec::new(),
            max_dynamic: usize::try_from(cfg.pool_size().div_ceil(2)).unwrap_or(usize::MAX),
        }
    }

    /// Limits how many dynamic leases (unknown MACs) may hold an address at
    /// once; by default half the pool (rounded up), so that a guest
    /// inventing MACs cannot take the addresses new VMs need. A DISCOVER
    /// past the limit fails with [`DhcpError::DynamicLimit`].
    pub fn set_max_dynamic(&mut self, limit: usize) {
        self.max_dynamic = limit;
    }

    /// The limit set by [`set_max_dynamic`](Self::set_max_dynamic).
    pub fn max_dynamic(&self) -> usize {
        self.max_dynamic
    }

    /// Reads the table saved at `path`; a missing file is an empty table.
    /// Entries that do not fit `cfg` (outside the subnet, on the gateway, a
    /// second holder of one address, a bad MAC) are left out and listed in
    /// [`dropped`](Self::dropped). A file that is not a lease table is an
    /// error ([`DhcpError::Corrupt`]), so that reservations are never lost
    /// silently.
    pub fn load(path: &Path, cfg: &Config) -> Result<Self, DhcpError> {
        cfg.validate()?;
        let mut table = Self::empty(path, cfg);
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(table),
            Err(source) => {
                return Err(DhcpError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let file: FileTable = serde_json::from_slice(&bytes).map_err(|e| DhcpError::Corrupt {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        if file.version != FILE_VERSION {
            return Err(DhcpError::Corrupt {
                path: path.to_path_buf(),
                why: format!("version {} (this build reads {FILE_VERSION})", file.version),
            });
        }
        // Reservations first: when two entries claim one address, the
        // reservation keeps it.
        let (reserved, dynamic): (Vec<_>, Vec<_>) =
            file.leases.into_iter().partition(|l| l.owner.is_some());
        let mut holders: HashMap<Ipv4Addr, Mac> = HashMap::new();
        for entry in reserved.into_iter().chain(dynamic) {
            match table.admit(&entry, &holders) {
                Ok((mac, lease)) => {
                    holders.insert(lease.ip, mac);
                    table.entries.insert(mac, lease);
                }
                Err(why) => table.dropped.push(Dropped {
                    mac: entry.mac,
                    ip: entry.ip,
                    owner: entry.owner,
                    why,
                }),
            }
        }
        for d in file.declined {
            if let (true, Some(until)) = (cfg.in_pool(d.ip), from_unix(d.until)) {
                table.quarantine.insert(d.ip, until);
            }
        }
        Ok(table)
    }

    /// Checks one entry of the file against the configuration.
    fn admit(
        &self,
        e: &FileLease,
        holders: &HashMap<Ipv4Addr, Mac>,
    ) -> Result<(Mac, Lease), String> {
        let mac = parse_mac(&e.mac).ok_or_else(|| "not a MAC address".to_string())?;
        if self.entries.contains_key(&mac) {
            return Err("a second entry for this MAC".into());
        }
        if !self.cfg.contains(e.ip) {
            return Err(format!("outside {}", self.cfg.cidr()));
        }
        if !self.cfg.in_pool(e.ip) {
            return Err(format!(
                "the gateway, network or broadcast address of {}",
                self.cfg.cidr()
            ));
        }
        if let Some(other) = holders.get(&e.ip) {
            return Err(format!("address already held by {}", format_mac(other)));
        }
        if e.owner.as_deref() == Some("") {
            return Err("empty owner".into());
        }
        if e.owner.is_none() && e.state == LeaseState::Reserved {
            return Err("a reservation without an owner".into());
        }
        let expires = match e.expires {
            Some(secs) => Some(from_unix(secs).ok_or_else(|| "expiry out of range".to_string())?),
            None => None,
        };
        Ok((
            mac,
            Lease {
                ip: e.ip,
                owner: e.owner.clone(),
                hostname: e.hostname.clone().filter(|h| is_dns_name(h)),
                state: e.state,
                expires,
            },
        ))
    }

    /// The entries [`load`](Self::load) left out, for the caller to log.
    pub fn dropped(&self) -> &[Dropped] {
        &self.dropped
    }

    /// The file this table is saved to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configuration the table was loaded for.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Writes the table atomically: a temporary file beside `path`, fsync,
    /// rename over `path`, fsync of the directory (created if missing).
    pub fn save(&self) -> Result<(), DhcpError> {
        let file = FileTable {
            version: FILE_VERSION,
            subnet: self.cfg.cidr(),
            leases: self
                .entries
                .iter()
                .map(|(mac, l)| FileLease {
                    mac: format_mac(mac),
                    ip: l.ip,
                    owner: l.owner.clone(),
                    hostname: l.hostname.clone(),
                    state: l.state,
                    expires: l.expires.map(to_unix),
                })
                .collect(),
            declined: self
                .quarantine
                .iter()
                .map(|(ip, until)| FileDeclined {
                    ip: *ip,
                    until: to_unix(*until),
                })
                .collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(|e| DhcpError::Corrupt {
            path: self.path.clone(),
            why: e.to_string(),
        })?;
        bytes.push(b'\n');
        write_atomic(&self.path, &bytes)
    }

    /// Reserves an address for a VM NIC and returns it: the address this MAC
    /// already holds if any (a dynamic lease becomes a reservation, keeping
    /// its address), otherwise the lowest free one. The same MAC gets the
    /// same address for as long as it stays reserved, unless its client
    /// DECLINEs it. `hostname` (empty for none) is sent in option 12.
    pub fn reserve(
        &mut self,
        mac: Mac,
        owner: &str,
        hostname: &str,
    ) -> Result<Ipv4Addr, DhcpError> {
        self.reserve_at(mac, owner, hostname, SystemTime::now())
    }

    /// [`reserve`](Self::reserve) at a given time (which decides what is
    /// reclaimable).
    pub fn reserve_at(
        &mut self,
        mac: Mac,
        owner: &str,
        hostname: &str,
        now: SystemTime,
    ) -> Result<Ipv4Addr, DhcpError> {
        if owner.is_empty() {
            return Err(DhcpError::InvalidOwner);
        }
        let hostname = match hostname {
            "" => None,
            h if is_dns_name(h) => Some(h.to_string()),
            h => return Err(DhcpError::InvalidHostname(h.to_string())),
        };
        if let Some(lease) = self.entries.get(&mac) {
            if let Some(other) = lease.owner.as_deref().filter(|o| *o != owner) {
                return Err(DhcpError::MacInUse {
                    owner: other.to_string(),
                });
            }
        }
        let needs_address = self
            .entries
            .get(&mac)
            .is_none_or(|l| l.state == LeaseState::Declined);
        let ip = if needs_address {
            let ip = self.allocate(mac, None, false, now)?;
            self.entries.insert(
                mac,
                Lease {
                    ip,
                    owner: None,
                    hostname: None,
                    state: LeaseState::Reserved,
                    expires: None,
                },
            );
            ip
        } else {
            self.entries[&mac].ip
        };
        if let Some(lease) = self.entries.get_mut(&mac) {
            lease.owner = Some(owner.to_string());
            lease.hostname = hostname;
        }
        Ok(ip)
    }

    /// Forgets a MAC (its VM NIC is gone): its address is free again.
    pub fn forget(&mut self, mac: Mac) {
        self.entries.remove(&mac);
    }

    /// Forgets every reservation whose owner is `prefix` or starts with it
    /// as a path: `ns/vm` matches `ns/vm` and `ns/vm/net0`, not `ns/vm2/net0`.
    pub fn forget_owner_prefix(&mut self, prefix: &str) {
        self.entries.retain(|_, l| {
            !l.owner
                .as_deref()
                .is_some_and(|owner| owner_has_prefix(owner, prefix))
        });
    }

    /// Keeps the reservations whose owner `keep` accepts (and every dynamic
    /// entry); returns how many reservations were forgotten. For the agent's
    /// resync after a restart.
    pub fn retain_reserved(&mut self, mut keep: impl FnMut(&Mac, &str) -> bool) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|mac, l| l.owner.as_deref().is_none_or(|o| keep(mac, o)));
        before - self.entries.len()
    }

    /// The entry of a MAC.
    pub fn get(&self, mac: Mac) -> Option<&Lease> {
        self.entries.get(&mac)
    }

    /// The address acknowledged to this MAC whose lease has not ended, for
    /// status.
    pub fn bound(&self, mac: Mac) -> Option<Ipv4Addr> {
        self.bound_at(mac, SystemTime::now())
    }

    /// [`bound`](Self::bound) at a given time.
    pub fn bound_at(&self, mac: Mac, now: SystemTime) -> Option<Ipv4Addr> {
        self.entries
            .get(&mac)
            .filter(|l| l.state == LeaseState::Bound && l.expires.is_some_and(|e| e > now))
            .map(|l| l.ip)
    }

    /// Every entry, by MAC.
    pub fn entries(&self) -> impl Iterator<Item = (&Mac, &Lease)> {
        self.entries.iter()
    }

    /// Declined addresses and the end of their quarantine.
    pub fn quarantined(&self) -> impl Iterator<Item = (Ipv4Addr, SystemTime)> + '_ {
        self.quarantine.iter().map(|(ip, t)| (*ip, *t))
    }

    /// The MAC whose entry holds `ip`, if any.
    pub fn holder(&self, ip: Ipv4Addr) -> Option<Mac> {
        self.entries
            .iter()
            .find(|(_, l)| l.ip == ip)
            .map(|(mac, _)| *mac)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Tidies up at `now`: removes reclaimable dynamic entries and ended
    /// quarantines, and turns reservations whose offer ended, or whose lease
    /// ended more than [`EXPIRY_GRACE`] ago, back to Reserved. Returns
    /// whether anything changed.
    pub fn purge(&mut self, now: SystemTime) -> bool {
        let before = (self.entries.len(), self.quarantine.len());
        self.entries.retain(|_, l| !l.reclaimable(now));
        self.quarantine.retain(|_, until| *until > now);
        let mut changed = before != (self.entries.len(), self.quarantine.len());
        for lease in self.entries.values_mut().filter(|l| l.is_reserved()) {
            let ended = match (lease.state, lease.expires) {
                (LeaseState::Offered, Some(end)) => now >= end,
                (LeaseState::Bound, Some(end)) => now >= add(end, EXPIRY_GRACE),
                _ => false,
            };
            if ended {
                lease.state = LeaseState::Reserved;
                lease.expires = None;
                changed = true;
            }
        }
        changed
    }

    /// Picks a free address for `mac` (not held by any other entry that is
    /// not reclaimable, not quarantined): `prefer` if it is free, else the
    /// lowest free address (`from_top`: the highest). The reclaimable entry
    /// that held the chosen address, if any, is removed. Does not touch
    /// `mac`'s own entry.
    fn allocate(
        &mut self,
        mac: Mac,
        prefer: Option<Ipv4Addr>,
        from_top: bool,
        now: SystemTime,
    ) -> Result<Ipv4Addr, DhcpError> {
        self.quarantine.retain(|_, until| *until > now);
        let held: HashMap<Ipv4Addr, (Mac, bool)> = self
            .entries
            .iter()
            .filter(|(m, _)| **m != mac)
            .map(|(m, l)| (l.ip, (*m, l.reclaimable(now))))
            .collect();
        let free = |ip: &Ipv4Addr| {
            self.cfg.in_pool(*ip)
                && !self.quarantine.contains_key(ip)
                && held.get(ip).is_none_or(|(_, reclaimable)| *reclaimable)
        };
        let chosen = match prefer.filter(free) {
            Some(ip) => Some(ip),
            None if from_top => self.cfg.pool().rev().find(free),
            None => self.cfg.pool().find(free),
        };
        let Some(ip) = chosen else {
            return Err(DhcpError::PoolExhausted {
                subnet: self.cfg.cidr(),
            });
        };
        if let Some((previous, _)) = held.get(&ip) {
            self.entries.remove(previous);
        }
        Ok(ip)
    }

    /// DISCOVER: the address to offer `mac`, marked Offered until
    /// `now + OFFER_HOLD`. A MAC that holds an address (not declined) gets it
    /// again; otherwise a reserved MAC gets a new stable address from the
    /// bottom of the pool, an unknown one (within the dynamic limit)
    /// `requested` if free or one from the top.
    pub(crate) fn offer(
        &mut self,
        mac: Mac,
        requested: Option<Ipv4Addr>,
        now: SystemTime,
    ) -> Result<Ipv4Addr, DhcpError> {
        let current = self.entries.get(&mac);
        let reserved = current.is_some_and(Lease::is_reserved);
        let ip = match current {
            Some(l) if l.state != LeaseState::Declined => l.ip,
            _ => {
                if !reserved {
                    let dynamic = self
                        .entries
                        .iter()
                        .filter(|(m, l)| **m != mac && !l.is_reserved() && !l.reclaimable(now))
                        .count();
                    if dynamic >= self.max_dynamic {
                        return Err(DhcpError::DynamicLimit {
                            subnet: self.cfg.cidr(),
                            limit: self.max_dynamic,
                        });
                    }
                }
                self.allocate(mac, requested.filter(|_| !reserved), !reserved, now)?
            }
        };
        let lease = self.entries.entry(mac).or_insert_with(|| Lease {
            ip,
            owner: None,
            hostname: None,
            state: LeaseState::Offered,
            expires: None,
        });
        lease.ip = ip;
        lease.state = LeaseState::Offered;
        lease.expires = Some(add(now, OFFER_HOLD));
        Ok(ip)
    }

    /// The client chose another server: a pending offer is withdrawn.
    pub(crate) fn withdraw_offer(&mut self, mac: Mac) -> bool {
        match self.entries.get_mut(&mac) {
            Some(l) if l.state == LeaseState::Offered && l.is_reserved() => {
                l.state = LeaseState::Reserved;
                l.expires = None;
                true
            }
            Some(l) if l.state == LeaseState::Offered => {
                self.entries.remove(&mac);
                true
            }
            _ => false,
        }
    }

    /// The address `mac` may be acknowledged: its entry's, unless declined.
    pub(crate) fn address_of(&self, mac: Mac) -> Option<Ipv4Addr> {
        self.entries
            .get(&mac)
            .filter(|l| l.state != LeaseState::Declined)
            .map(|l| l.ip)
    }

    /// ACK: `mac`'s address is bound until `now + lease`. Returns whether it
    /// was not bound before (a new binding, not a renewal).
    pub(crate) fn bind(&mut self, mac: Mac, now: SystemTime, lease: Duration) -> bool {
        let Some(l) = self.entries.get_mut(&mac) else {
            return false;
        };
        let renewal = l.state == LeaseState::Bound && l.expires.is_some_and(|e| e > now);
        l.state = LeaseState::Bound;
        l.expires = Some(add(now, lease));
        !renewal
    }

    /// RELEASE of `ip` by `mac`: a reservation goes back to Reserved, a
    /// dynamic entry is removed. Returns whether `mac` held `ip`.
    pub(crate) fn release(&mut self, mac: Mac, ip: Ipv4Addr) -> bool {
        match self.entries.get_mut(&mac) {
            Some(l) if l.ip == ip && l.state != LeaseState::Declined => {
                if l.is_reserved() {
                    l.state = LeaseState::Reserved;
                    l.expires = None;
                } else {
                    self.entries.remove(&mac);
                }
                true
            }
            _ => false,
        }
    }

    /// DECLINE of `ip` by `mac`: the address is quarantined until
    /// `now + DECLINE_QUARANTINE` and the entry marked Declined. Returns
    /// whether `mac` held `ip`.
    pub(crate) fn decline(&mut self, mac: Mac, ip: Ipv4Addr, now: SystemTime) -> bool {
        match self.entries.get_mut(&mac) {
            Some(l) if l.ip == ip && l.state != LeaseState::Declined => {
                let until = add(now, DECLINE_QUARANTINE);
                l.state = LeaseState::Declined;
                l.expires = Some(until);
                self.quarantine.insert(ip, until);
                true
            }
            _ => false,
        }
    }
}

/// Whether `owner` is `prefix` or below it as a `/`-separated path.
fn owner_has_prefix(owner: &str, prefix: &str) -> bool {
    match owner.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DhcpError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let io = |source| DhcpError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        io(std::io::Error::other(
            "the lease file path has no file name",
        ))
    })?;
    fs::create_dir_all(dir).map_err(io)?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io(e));
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

#[cfg(test)]
mod tests;
