//! Property tests: `handle()` never panics on any input, and after any
//! sequence of reservations, forgets, DHCP messages and time passing, no two
//! MACs hold one address and reservations only move when declined.

mod common;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use common::{at, mac, small_cfg, table, Got, Req, GW};
use dhcproto::v4::MessageType as M;
use kubevmm_dhcp::{handle, Config, Event, LeaseState, Leases, Mac};
use proptest::prelude::*;

/// A DHCP-looking datagram: a BOOTREQUEST header (sometimes bent), the
/// magic cookie, then options of the codes a server reads (and others),
/// with lengths that are sometimes wrong.
fn dhcpish() -> impl Strategy<Value = Vec<u8>> {
    let header = (
        prop_oneof![Just(1u8), any::<u8>()],
        prop_oneof![Just(1u8), any::<u8>()],
        prop_oneof![Just(6u8), any::<u8>()],
        prop::collection::vec(any::<u8>(), 233),
    );
    let code = prop_oneof![
        Just(53u8),
        Just(50),
        Just(54),
        Just(55),
        Just(12),
        Just(0),
        Just(255),
        any::<u8>()
    ];
    let option = (
        code,
        prop::collection::vec(any::<u8>(), 0..12),
        any::<bool>(),
    );
    (header, prop::collection::vec(option, 0..12), any::<bool>()).prop_map(
        |((op, htype, hlen, rest), options, cut)| {
            let mut p = vec![op, htype, hlen];
            p.extend_from_slice(&rest);
            p.extend_from_slice(&[99, 130, 83, 99]);
            for (code, value, honest) in options {
                p.push(code);
                let len = if honest {
                    value.len() as u8
                } else {
                    value.len() as u8 * 3
                };
                p.push(len);
                p.extend_from_slice(&value);
            }
            if cut && p.len() > 241 {
                p.pop();
            }
            p
        },
    )
}

#[derive(Debug, Clone)]
enum Op {
    Reserve(u8, u8),
    Forget(u8),
    ForgetPrefix(u8),
    Discover(u8, Option<u8>),
    Select(u8),
    InitReboot(u8, u8),
    Renew(u8, u8),
    Release(u8),
    Decline(u8),
    Inform(u8),
    Advance(u16),
    Purge,
    SaveLoad,
    Raw(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    let m = 0u8..8;
    let host = 0u8..20;
    prop_oneof![
        3 => (m.clone(), 0u8..3).prop_map(|(m, o)| Op::Reserve(m, o)),
        1 => m.clone().prop_map(Op::Forget),
        1 => (0u8..3).prop_map(Op::ForgetPrefix),
        4 => (m.clone(), prop::option::of(host.clone())).prop_map(|(m, h)| Op::Discover(m, h)),
        4 => m.clone().prop_map(Op::Select),
        2 => (m.clone(), host.clone()).prop_map(|(m, h)| Op::InitReboot(m, h)),
        2 => (m.clone(), host).prop_map(|(m, h)| Op::Renew(m, h)),
        2 => m.clone().prop_map(Op::Release),
        1 => m.clone().prop_map(Op::Decline),
        1 => m.prop_map(Op::Inform),
        2 => any::<u16>().prop_map(Op::Advance),
        1 => Just(Op::Purge),
        1 => Just(Op::SaveLoad),
        1 => dhcpish().prop_map(Op::Raw),
    ]
}

fn owner(m: u8, o: u8) -> String {
    format!("ns{o}/vm{m}/net0")
}

struct World {
    cfg: Config,
    t: Leases,
    now: u64,
    /// Where each reservation must stay (until its client declines it).
    stable: HashMap<Mac, Ipv4Addr>,
    path: PathBuf,
}

impl World {
    fn host(&self, h: u8) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cfg.subnet) + u32::from(h))
    }

    /// The address `m` currently holds, or some address.
    fn its(&self, m: Mac) -> Ipv4Addr {
        self.t.get(m).map_or(self.host(3), |l| l.ip)
    }

    fn send(&mut self, req: &Req) -> Result<(), TestCaseError> {
        self.send_bytes(&req.bytes())
    }

    fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), TestCaseError> {
        let Ok(out) = handle(&self.cfg, &mut self.t, bytes, at(self.now)) else {
            return Ok(());
        };
        if let Some(Event::Declined { mac, .. }) = out.event {
            self.stable.remove(&mac);
        }
        if let Some(reply) = &out.reply {
            let got = Got::parse(&reply.bytes);
            let yiaddr = got.msg.yiaddr();
            if !yiaddr.is_unspecified() {
                let m: Mac = got.msg.chaddr().try_into().unwrap();
                prop_assert_eq!(self.t.get(m).map(|l| l.ip), Some(yiaddr));
                prop_assert!(self.cfg.in_pool(yiaddr));
            }
        }
        Ok(())
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Reserve(m, o) => {
                match self.t.reserve_at(mac(m), &owner(m, o), "vm", at(self.now)) {
                    Ok(ip) => {
                        if let Some(before) = self.stable.insert(mac(m), ip) {
                            prop_assert_eq!(before, ip, "a reservation moved");
                        }
                    }
                    Err(kubevmm_dhcp::DhcpError::MacInUse { owner: other }) => {
                        prop_assert_ne!(other, owner(m, o));
                    }
                    Err(kubevmm_dhcp::DhcpError::PoolExhausted { subnet }) => {
                        prop_assert_eq!(subnet, self.cfg.cidr());
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
            Op::Forget(m) => {
                self.t.forget(mac(m));
                self.stable.remove(&mac(m));
            }
            Op::ForgetPrefix(o) => {
                self.t.forget_owner_prefix(&format!("ns{o}"));
                self.stable
                    .retain(|m, _| self.t.get(*m).is_some_and(kubevmm_dhcp::Lease::is_reserved));
            }
            Op::Discover(m, h) => {
                let mut req = Req::new(M::Discover, mac(m));
                if let Some(h) = h {
                    req = req.requested(self.host(h));
                }
                self.send(&req)?;
            }
            Op::Select(m) => {
                let ip = self.its(mac(m));
                self.send(&Req::new(M::Request, mac(m)).server(GW).requested(ip))?;
            }
            Op::InitReboot(m, h) => {
                let ip = if h % 2 == 0 {
                    self.its(mac(m))
                } else {
                    self.host(h)
                };
                self.send(&Req::new(M::Request, mac(m)).requested(ip))?;
            }
            Op::Renew(m, h) => {
                let ip = if h % 2 == 0 {
                    self.its(mac(m))
                } else {
                    self.host(h)
                };
                self.send(&Req::new(M::Request, mac(m)).ciaddr(ip))?;
            }
            Op::Release(m) => {
                let ip = self.its(mac(m));
                self.send(&Req::new(M::Release, mac(m)).ciaddr(ip).server(GW))?;
            }
            Op::Decline(m) => {
                let ip = self.its(mac(m));
                self.send(&Req::new(M::Decline, mac(m)).requested(ip).server(GW))?;
            }
            Op::Inform(m) => {
                let ip = self.its(mac(m));
                self.send(&Req::new(M::Inform, mac(m)).ciaddr(ip))?;
            }
            Op::Advance(secs) => self.now += u64::from(secs),
            Op::Purge => {
                self.t.purge(at(self.now));
            }
            Op::SaveLoad => {
                self.t
                    .save()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let back = Leases::load(&self.path, &self.cfg)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(back.dropped().is_empty());
                prop_assert_eq!(
                    back.entries().collect::<Vec<_>>(),
                    self.t.entries().collect::<Vec<_>>()
                );
                self.t = back;
            }
            Op::Raw(bytes) => self.send_bytes(&bytes)?,
        }
        self.check()
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let mut holders: HashMap<Ipv4Addr, Mac> = HashMap::new();
        for (m, lease) in self.t.entries() {
            prop_assert!(self.cfg.in_pool(lease.ip), "{} outside the pool", lease.ip);
            if let Some(other) = holders.insert(lease.ip, *m) {
                return Err(TestCaseError::fail(format!(
                    "{} held by {other:?} and {m:?}",
                    lease.ip
                )));
            }
        }
        for (m, ip) in &self.stable {
            let lease = self.t.get(*m);
            prop_assert!(
                lease.is_some_and(kubevmm_dhcp::Lease::is_reserved),
                "reservation of {m:?} lost"
            );
            let lease = lease.unwrap();
            if lease.state != LeaseState::Declined {
                prop_assert_eq!(lease.ip, *ip, "reservation of {:?} moved", m);
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..700)) {
        let c = small_cfg(24);
        let mut t = table(&c);
        t.reserve(mac(1), "ns/vm/net0", "vm").unwrap();
        let _ = handle(&c, &mut t, &bytes, at(0));
    }

    #[test]
    fn dhcp_shaped_bytes_never_panic(bytes in dhcpish()) {
        let c = common::cfg();
        let mut t = table(&c);
        t.reserve(mac(1), "ns/vm/net0", "vm").unwrap();
        if let Ok(out) = handle(&c, &mut t, &bytes, at(0)) {
            if let Some(reply) = out.reply {
                let got = Got::parse(&reply.bytes);
                prop_assert!(got.order.len() >= 2);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn no_two_macs_share_an_address(prefix in 28u8..=29, ops in prop::collection::vec(op(), 1..60)) {
        let dir = std::env::temp_dir().join(format!("kubevmm-dhcp-prop-{}", std::process::id()));
        let path = dir.join(format!("leases-{prefix}.json"));
        let _ = std::fs::remove_file(&path);
        let mut cfg = small_cfg(prefix);
        cfg.lease_time = Duration::from_secs(600);
        let t = Leases::empty(&path, &cfg);
        let mut world = World { cfg, t, now: 0, stable: HashMap::new(), path };
        let result = ops.into_iter().try_for_each(|op| world.apply(op));
        let _ = std::fs::remove_dir_all(&dir);
        result?;
    }
}
