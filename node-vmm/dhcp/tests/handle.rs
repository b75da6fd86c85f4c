//! Table tests of `handle()`: every message type, the NAK cases, the
//! packets that are ignored or dropped.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};

use common::{at, cfg, mac, small_cfg, table, Got, Req, GW};
use dhcproto::v4::{DhcpOption, HType, MessageType as M, Opcode};
use kubevmm_dhcp::{handle, DhcpError, Event, LeaseState, Outcome, EXPIRY_GRACE, OFFER_HOLD};

const BCAST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::BROADCAST, 68);

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, last)
}

fn run(cfg: &kubevmm_dhcp::Config, t: &mut kubevmm_dhcp::Leases, req: &Req, now: u64) -> Outcome {
    handle(cfg, t, &req.bytes(), at(now)).unwrap()
}

fn reply(out: &Outcome) -> Got {
    Got::parse(&out.reply.as_ref().expect("a reply").bytes)
}

#[test]
fn discover_gets_the_reserved_address_with_every_option_in_prl_order() {
    let c = cfg();
    let mut t = table(&c);
    let stable = t.reserve(mac(1), "ns/web-1/default", "web-1").unwrap();
    assert_eq!(stable, ip(2));
    let req = Req::new(M::Discover, mac(1)).prl(&[3, 1, 6, 15, 12, 26, 42]);
    let out = run(&c, &mut t, &req, 0);
    assert_eq!(out.received, Some(M::Discover));
    assert!(out.changed);
    assert_eq!(out.event, None);
    let r = out.reply.as_ref().unwrap();
    assert_eq!(r.kind, M::Offer);
    assert_eq!(r.dest, BCAST);
    assert!(r.bytes.len() >= 300, "padded to a BOOTP message");
    let got = reply(&out);
    assert_eq!(got.kind(), M::Offer);
    assert_eq!(got.msg.opcode(), Opcode::BootReply);
    assert_eq!(got.msg.xid(), 0x1234_5678);
    assert_eq!(got.msg.chaddr(), mac(1));
    assert_eq!(got.msg.yiaddr(), stable);
    assert_eq!(got.msg.ciaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(got.order, [53, 54, 3, 1, 6, 15, 12, 26, 51, 58, 59]);
    assert_eq!(
        got.opt(1),
        Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
    );
    assert_eq!(got.opt(3), Some(&DhcpOption::Router(vec![GW])));
    assert_eq!(
        got.opt(6),
        Some(&DhcpOption::DomainNameServer(vec![
            GW,
            Ipv4Addr::new(9, 9, 9, 9)
        ]))
    );
    assert_eq!(got.opt(12), Some(&DhcpOption::Hostname("web-1".into())));
    assert_eq!(
        got.opt(15),
        Some(&DhcpOption::DomainName("vms.example".into()))
    );
    assert_eq!(got.opt(26), Some(&DhcpOption::InterfaceMtu(1400)));
    assert_eq!(got.opt(51), Some(&DhcpOption::AddressLeaseTime(3600)));
    assert_eq!(got.opt(58), Some(&DhcpOption::Renewal(1800)));
    assert_eq!(got.opt(59), Some(&DhcpOption::Rebinding(3150)));
    assert_eq!(got.opt(54), Some(&DhcpOption::ServerIdentifier(GW)));
    assert_eq!(t.get(mac(1)).unwrap().state, LeaseState::Offered);
    assert_eq!(
        t.get(mac(1)).unwrap().ip,
        stable,
        "an offer never moves a reservation"
    );
}

#[test]
fn options_left_out_when_not_configured() {
    let c = small_cfg(24);
    let mut t = table(&c);
    // No PRL: every option still sent, by code.
    let out = run(&c, &mut t, &Req::new(M::Discover, mac(9)), 0);
    let got = reply(&out);
    assert_eq!(
        got.order,
        [53, 54, 1, 3, 51, 58, 59],
        "no DNS, host name, domain or MTU"
    );
}

#[test]
fn unknown_macs_get_dynamic_addresses_from_the_top() {
    let c = small_cfg(24);
    let mut t = table(&c);
    let a = reply(&run(&c, &mut t, &Req::new(M::Discover, mac(1)), 0));
    assert_eq!(a.msg.yiaddr(), ip(254));
    let b = reply(&run(&c, &mut t, &Req::new(M::Discover, mac(2)), 0));
    assert_eq!(b.msg.yiaddr(), ip(253));
    // A free requested address is honoured; a held one is not.
    let req = Req::new(M::Discover, mac(3)).requested(ip(100));
    assert_eq!(reply(&run(&c, &mut t, &req, 0)).msg.yiaddr(), ip(100));
    let req = Req::new(M::Discover, mac(4)).requested(ip(254));
    assert_eq!(reply(&run(&c, &mut t, &req, 0)).msg.yiaddr(), ip(252));
    // The gateway is never offered, even when asked for.
    let req = Req::new(M::Discover, mac(5)).requested(GW);
    assert_ne!(reply(&run(&c, &mut t, &req, 0)).msg.yiaddr(), GW);
    // The same MAC asking again gets the same offer.
    let again = reply(&run(&c, &mut t, &Req::new(M::Discover, mac(1)), 1));
    assert_eq!(again.msg.yiaddr(), ip(254));
}

#[test]
fn selecting_request_acks_our_offer_once_bound() {
    let c = cfg();
    let mut t = table(&c);
    let stable = t.reserve(mac(1), "ns/vm/net0", "vm").unwrap();
    run(&c, &mut t, &Req::new(M::Discover, mac(1)), 0);
    let req = Req::new(M::Request, mac(1))
        .server(GW)
        .requested(stable)
        .broadcast_flag();
    let out = run(&c, &mut t, &req, 1);
    let got = reply(&out);
    assert_eq!(got.kind(), M::Ack);
    assert_eq!(got.msg.yiaddr(), stable);
    assert!(got.msg.flags().broadcast(), "flags echoed");
    assert_eq!(out.reply.as_ref().unwrap().dest, BCAST);
    assert_eq!(
        out.event,
        Some(Event::Bound {
            mac: mac(1),
            ip: stable
        })
    );
    assert!(out.changed);
    assert_eq!(t.bound_at(mac(1), at(2)), Some(stable));
    assert_eq!(t.bound_at(mac(1), at(1 + 3600)), None, "lease over");
    // A retransmitted REQUEST is ACKed again, without a second event.
    let out = run(&c, &mut t, &req, 2);
    assert_eq!(reply(&out).kind(), M::Ack);
    assert_eq!(out.event, None);
}

#[test]
fn selecting_request_for_another_server_withdraws_our_offer() {
    let c = cfg();
    let mut t = table(&c);
    t.reserve(mac(1), "ns/vm/net0", "").unwrap();
    run(&c, &mut t, &Req::new(M::Discover, mac(1)), 0);
    run(&c, &mut t, &Req::new(M::Discover, mac(2)), 0);
    for m in [mac(1), mac(2)] {
        let req = Req::new(M::Request, m)
            .server(Ipv4Addr::new(10, 77, 0, 99))
            .requested(ip(2));
        let out = run(&c, &mut t, &req, 1);
        assert_eq!(out.reply, None);
        assert_eq!(out.ignored, Some("the client chose another server"));
        assert!(out.changed);
    }
    assert_eq!(
        t.get(mac(1)).unwrap().state,
        LeaseState::Reserved,
        "reservation kept"
    );
    assert!(t.get(mac(2)).is_none(), "dynamic offer dropped");
}

#[test]
fn selecting_request_naming_no_offer_of_ours_is_ignored() {
    let c = cfg();
    let mut t = table(&c);
    let stable = t.reserve(mac(1), "ns/vm/net0", "").unwrap();
    run(&c, &mut t, &Req::new(M::Discover, mac(1)), 0);
    let cases = [
        (
            Req::new(M::Request, mac(1)).server(GW).requested(ip(77)),
            "names no offer",
        ),
        (
            Req::new(M::Request, mac(1)).server(GW),
            "without a requested",
        ),
        (
            Req::new(M::Request, mac(3)).server(GW).requested(stable),
            "names no offer",
        ),
    ];
    for (req, why) in cases {
        let out = run(&c, &mut t, &req, 1);
        assert_eq!(out.reply, None);
        assert!(out.ignored.unwrap().contains(why), "{:?}", out.ignored);
        assert!(!out.changed);
    }
}

#[test]
fn init_reboot_acks_the_clients_address_and_naks_the_rest() {
    let c = cfg();
    let mut t = table(&c);
    let stable = t.reserve(mac(1), "ns/vm/net0", "").unwrap();
    // The VM reboots: INIT-REBOOT with its stable address, no DISCOVER first.
    let out = run(
        &c,
        &mut t,
        &Req::new(M::Request, mac(1)).requested(stable),
        0,
    );
    assert_eq!(reply(&out).kind(), M::Ack);
    assert_eq!(reply(&out).msg.yiaddr(), stable);
    assert_eq!(
        out.event,
        Some(Event::Bound {
            mac: mac(1),
            ip: stable
        })
    );

    let naks = [
        (
            mac(1),
            ip(50),
            "is not this client's address (10.77.0.2 is)",
        ),
        (
            mac(1),
            Ipv4Addr::new(192, 168, 1, 9),
            "192.168.1.9 is not in 10.77.0.0/24",
        ),
        (mac(7), ip(60), "no lease of 10.77.0.60 for this client"),
    ];
    for (m, asked, why) in naks {
        let out = run(&c, &mut t, &Req::new(M::Request, m).requested(asked), 1);
        let got = reply(&out);
        assert_eq!(got.kind(), M::Nak);
        assert_eq!(got.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(got.opt(54), Some(&DhcpOption::ServerIdentifier(GW)));
        assert_eq!(got.opt(51), None, "no lease options in a NAK");
        assert_eq!(out.reply.as_ref().unwrap().dest, BCAST);
        match &out.event {
            Some(Event::Nak {
                mac: got_mac,
                why: got_why,
            }) => {
                assert_eq!(*got_mac, m);
                assert!(got_why.contains(why), "{got_why}");
                assert_eq!(got.opt(56), Some(&DhcpOption::Message(got_why.clone())));
            }
            other => panic!("{other:?}"),
        }
        assert!(!out.changed);
    }
    assert_eq!(t.get(mac(1)).unwrap().ip, stable, "a NAK changes nothing");
}

#[test]
fn renewing_acks_by_unicast_and_naks_by_broadcast() {
    let c = cfg();
    let mut t = table(&c);
    let stable = t.reserve(mac(1), "ns/vm/net0", "vm").unwrap();
    run(
        &c,
        &mut t,
        &Req::new(M::Request, mac(1)).requested(stable),
        0,
    );
    let out = run(
        &c,
        &mut t,
        &Req::new(M::Request, mac(1)).ciaddr(stable),
        1800,
    );
    let got = reply(&out);
    assert_eq!(got.kind(), M::Ack);
    assert_eq!(got.msg.ciaddr(), stable);
    assert_eq!(got.msg.yiaddr(), stable);
    assert_eq!(
        out.reply.as_ref().unwrap().dest,
        SocketAddrV4::new(stable, 68)
    );
    assert_eq!(out.event, None, "a renewal is not a new binding");
    assert_eq!(
        t.bound_at(mac(1), at(1800 + 3599)),
        Some(stable),
        "lease extended"
    );
    // REBINDING/RENEWING with an address that is not the client's.
    let out = run(
        &c,
        &mut t,
        &Req::new(M::Request, mac(1)).ciaddr(ip(9)),
        1801,
    );
    assert_eq!(reply(&out).kind(), M::Nak);
    assert_eq!(out.reply.as_ref().unwrap().dest, BCAST);
    // A REQUEST with none of server id, requested address, ciaddr.
    let out = run(&c, &mut t, &Req::new(M::Request, mac(1)), 1802);
    assert_eq!(out.reply, None);
    assert!(out.ignored.is_some());
}

#[test]
fn release_frees_dynamic_leases_and_keeps_reservations() {
    let c = cfg();
    let mut t = table(&c);
    let stable = t.reserve(mac(1), "ns/vm/net0", "").unwrap();
    run(
        &c,
        &mut t,
        &Req::new(M::Request, mac(1)).requested(stable),
        0,
    );
    let dynamic = reply(&run(&c, &mut t, &Req::new(M::Discover, mac(2)), 0))
        .msg
        .yiaddr();
    run(
        &c,
        &mut t,
        &Req::new(M::Request, mac(2)).server(GW).requested(dynamic),
        0,
    );
    assert_eq!(t.bound_at(mac(2), at(1)), Some(dynamic));

    // Wrong address, or another server: ignored.
    let out = run(
        &c,
        &mut t,
        &Req::new(M::Release, mac(1)).ciaddr(ip(99)).server(GW),
        1,
    );
    assert!(out.event.is_none() && out.ignored.is_some());
    let other = Ipv4Addr::new(10, 77, 0, 200);
    let out = run(
        &c,
        &mut t,
        &Req::new(M::Release, mac(1)).ciaddr(stable).server(other),
        1,
    );
    assert!(out.event.is_none() && out.ignored.is_some());

    let out = run(
        &c,
        &mut t,
        &Req::new(M::Release, mac(1)).ciaddr(stable).server(GW),
        2,
    );
    assert_eq!(out.reply, None, "no reply to a RELEASE");
    assert_eq!(
        out.event,
        Some(Event::Released {
            mac: mac(1),
            ip: stable
        })
    );
    assert!(out.changed);
    let lease = t.get(mac(1)).unwrap();
    assert_eq!(
        (lease.ip, lease.state, lease.expires),
        (stable, LeaseState::Reserved, None)
    );
    assert_eq!(t.bound_at(mac(1), at(3)), None);

    let out = run(&c, &mut t, &Req::new(M::Release, mac(2)).ciaddr(dynamic), 2);
    assert_eq!(
        out.event,
        Some(Event::Released {
            mac: mac(2),
            ip: dynamic
        })
    );
    assert!(t.get(mac(2)).is_none());
    // The same VM asks again: the same address.
    let again = reply(&run(&c, &mut t, &Req::new(M::Discover, mac(1)), 3));
    assert_eq!(again.msg.yiaddr(), stable);
}

#[test]
fn decline_quarantines_the_address_and_moves_the_mac() {
    let c = cfg();
    let mut t = table(&c);
    let first = t.reserve(mac(1), "ns/vm/net0", "").unwrap();
    run(
        &c,
        &mut t,
        &Req::new(M::Request, mac(1)).requested(first),
        0,
    );
    let out = run(
        &c,
        &mut t,
        &Req::new(M::Decline, mac(1)).requested(first).server(GW),
        1,
    );
    assert_eq!(out.reply, None);
    assert_eq!(
        out.event,
        Some(Event::Declined {
            mac: mac(1),
            ip: first
        })
    );
    assert_eq!(t.get(mac(1)).unwrap().state, LeaseState::Declined);
    assert_eq!(t.bound_at(mac(1), at(2)), None);
    // The MAC can no longer claim the declined address.
    let out = run(
        &c,
        &mut t,
        &Req::new(M::Request, mac(1)).requested(first),
        2,
    );
    assert_eq!(reply(&out).kind(), M::Nak);
    // Next DISCOVER: a new stable address; the declined one is in quarantine.
    let second = reply(&run(&c, &mut t, &Req::new(M::Discover, mac(1)), 3))
        .msg
        .yiaddr();
    assert_ne!(second, first);
    assert_eq!(t.reserve(mac(1), "ns/vm/net0", "").unwrap(), second);
    assert!(t.quarantined().any(|(ip, _)| ip == first));
    let someone = reply(&run(
        &c,
        &mut t,
        &Req::new(M::Discover, mac(2)).requested(first),
        4,
    ));
    assert_ne!(someone.msg.yiaddr(), first, "quarantined");
    // DECLINE without the address, or of another address: ignored.
    let out = run(&c, &mut t, &Req::new(M::Decline, mac(1)), 5);
    assert!(out.event.is_none() && out.ignored.is_some());
    let out = run(
        &c,
        &mut t,
        &Req::new(M::Decline, mac(1)).requested(ip(201)),
        5,
    );
    assert!(out.event.is_none() && out.ignored.is_some());
}

#[test]
fn inform_acks_options_without_an_address_or_lease() {
    let c = cfg();
    let mut t = table(&c);
    let stable = t.reserve(mac(1), "ns/vm/net0", "vm").unwrap();
    let out = run(
        &c,
        &mut t,
        &Req::new(M::Inform, mac(1)).ciaddr(stable).prl(&[6, 3]),
        0,
    );
    let got = reply(&out);
    assert_eq!(got.kind(), M::Ack);
    assert_eq!(got.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(got.msg.ciaddr(), stable);
    assert_eq!(got.order, [53, 54, 6, 3, 1, 12, 15, 26]);
    assert_eq!(
        out.reply.as_ref().unwrap().dest,
        SocketAddrV4::new(stable, 68)
    );
    assert!(!out.changed && out.event.is_none());
    let out = run(
        &c,
        &mut t,
        &Req::new(M::Inform, mac(1)).ciaddr(Ipv4Addr::new(8, 8, 8, 8)),
        0,
    );
    assert!(out.reply.is_none());
}

#[test]
fn relayed_requests_are_answered_to_the_relay() {
    let c = cfg();
    let mut t = table(&c);
    let relay = ip(250);
    let out = run(&c, &mut t, &Req::new(M::Discover, mac(1)).giaddr(relay), 0);
    assert_eq!(
        out.reply.as_ref().unwrap().dest,
        SocketAddrV4::new(relay, 67)
    );
    assert_eq!(reply(&out).msg.giaddr(), relay);
    let out = run(
        &c,
        &mut t,
        &Req::new(M::Request, mac(1)).requested(ip(3)).giaddr(relay),
        0,
    );
    assert_eq!(reply(&out).kind(), M::Nak);
    assert!(
        reply(&out).msg.flags().broadcast(),
        "NAK through a relay: broadcast bit"
    );
    assert_eq!(
        out.reply.as_ref().unwrap().dest,
        SocketAddrV4::new(relay, 67)
    );
    let far = Ipv4Addr::new(172, 16, 0, 1);
    let out = run(&c, &mut t, &Req::new(M::Discover, mac(1)).giaddr(far), 0);
    assert!(out.reply.is_none() && out.ignored.is_some());
}

#[test]
fn not_for_us_is_ignored() {
    let c = cfg();
    let mut t = table(&c);
    let discover = Req::new(M::Discover, mac(1));
    let mut bad_hlen = discover.bytes();
    bad_hlen[2] = 16;
    let mut no_type = discover.bytes();
    no_type.truncate(240);
    no_type.push(255);
    let mut multicast = discover.bytes();
    multicast[28] = 0x01;
    let mut other_op = discover.bytes();
    other_op[0] = 7;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            Req::new(M::Offer, mac(1)).opcode(Opcode::BootReply).bytes(),
            "BOOTREPLY",
        ),
        (other_op, "unknown BOOTP op"),
        (
            Req::new(M::Discover, mac(1))
                .htype(HType::ProteonTokenRing)
                .bytes(),
            "not Ethernet",
        ),
        (bad_hlen, "not 6"),
        (no_type, "without a DHCP message type"),
        (multicast, "not a unicast MAC"),
        (
            Req::new(M::Offer, mac(1)).bytes(),
            "not a message a client sends",
        ),
        (
            Req::new(M::Ack, mac(1)).bytes(),
            "not a message a client sends",
        ),
    ];
    for (bytes, why) in cases {
        let out = handle(&c, &mut t, &bytes, at(0)).unwrap();
        assert_eq!(out.reply, None);
        assert!(
            out.ignored.unwrap().contains(why),
            "{why}: {:?}",
            out.ignored
        );
        assert!(!out.changed);
    }
    assert!(t.is_empty());
}

#[test]
fn malformed_packets_are_errors() {
    let c = cfg();
    let mut t = table(&c);
    let good = Req::new(M::Discover, mac(1)).bytes();
    let mut no_magic = good.clone();
    no_magic[236] = 0;
    let mut overrun = good[..240].to_vec();
    overrun.extend_from_slice(&[53, 1, 1, 12, 200, b'x']);
    let mut no_len = good[..240].to_vec();
    no_len.extend_from_slice(&[53, 1, 1, 12]);
    let mut long_type = good[..240].to_vec();
    long_type.extend_from_slice(&[53, 2, 1, 1, 255]);
    let mut short_requested = good[..240].to_vec();
    short_requested.extend_from_slice(&[53, 1, 1, 50, 3, 10, 77, 0, 255]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..100].to_vec(), "shorter"),
        (vec![1; kubevmm_dhcp::MAX_PACKET + 1], "longer"),
        (no_magic, "magic cookie"),
        (overrun, "runs past the end"),
        (no_len, "without a length"),
        (long_type, "message type option"),
        (short_requested, "requested address option"),
    ];
    for (bytes, why) in cases {
        match handle(&c, &mut t, &bytes, at(0)) {
            Err(DhcpError::Malformed { why: got }) => assert!(got.contains(why), "{got}"),
            other => panic!("{why}: {other:?}"),
        }
    }
    // Duplicate options: the first wins; pads are skipped; no End is fine.
    let mut dup = good[..240].to_vec();
    dup.extend_from_slice(&[0, 0, 53, 1, 1, 53, 1, 3, 50, 4, 10, 77, 0, 7]);
    let out = handle(&c, &mut t, &dup, at(0)).unwrap();
    assert_eq!(out.received, Some(M::Discover));
    assert_eq!(reply(&out).msg.yiaddr(), ip(7));
}

#[test]
fn pool_exhaustion_is_an_error_naming_the_subnet() {
    let c = small_cfg(29); // .2 .. .6 leasable: 5 addresses
    let mut t = table(&c);
    for n in 1..=3 {
        t.reserve(mac(n), &format!("ns/vm{n}/net0"), "").unwrap();
    }
    for n in 4..=5 {
        assert!(run(&c, &mut t, &Req::new(M::Discover, mac(n)), 0)
            .reply
            .is_some());
    }
    match handle(&c, &mut t, &Req::new(M::Discover, mac(6)).bytes(), at(0)) {
        Err(e @ DhcpError::PoolExhausted { .. }) => {
            assert!(e.to_string().contains("10.77.0.0/29"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // Unanswered offers are reclaimed after OFFER_HOLD.
    let later = OFFER_HOLD.as_secs();
    let out = run(&c, &mut t, &Req::new(M::Discover, mac(6)), later);
    assert!(out.reply.is_some());
    // The other unanswered offer goes to a reservation; then nothing is left.
    t.reserve_at(mac(7), "ns/vm7/net0", "", at(later)).unwrap();
    let err = t
        .reserve_at(mac(8), "ns/vm8/net0", "", at(later))
        .unwrap_err();
    assert!(err.to_string().contains("10.77.0.0/29"), "{err}");
}

#[test]
fn an_expired_dynamic_lease_is_reused_only_after_the_grace() {
    let c = small_cfg(30); // a single leasable address: .2
    let mut t = table(&c);
    let first = reply(&run(&c, &mut t, &Req::new(M::Discover, mac(1)), 0))
        .msg
        .yiaddr();
    run(
        &c,
        &mut t,
        &Req::new(M::Request, mac(1)).server(GW).requested(first),
        0,
    );
    let lease = c.lease_time.as_secs();
    let grace = EXPIRY_GRACE.as_secs();
    assert!(handle(
        &c,
        &mut t,
        &Req::new(M::Discover, mac(2)).bytes(),
        at(lease)
    )
    .is_err());
    // Late renewal within the grace still works.
    let out = run(
        &c,
        &mut t,
        &Req::new(M::Request, mac(1)).ciaddr(first),
        lease + grace - 1,
    );
    assert_eq!(reply(&out).kind(), M::Ack);
    let renewed = lease + grace - 1;
    let end = renewed + lease + grace;
    let early = Req::new(M::Discover, mac(2)).bytes();
    assert!(
        handle(&c, &mut t, &early, at(end - 1)).is_err(),
        "still in the grace"
    );
    let out = run(&c, &mut t, &Req::new(M::Discover, mac(2)), end);
    assert_eq!(reply(&out).msg.yiaddr(), first);
    assert!(t.get(mac(1)).is_none(), "the old holder is gone");
    let out = run(&c, &mut t, &Req::new(M::Request, mac(1)).ciaddr(first), end);
    assert_eq!(reply(&out).kind(), M::Nak);
}

#[test]
fn a_configuration_for_another_network_is_refused() {
    let c = cfg();
    let mut t = table(&small_cfg(29));
    let err = handle(&c, &mut t, &Req::new(M::Discover, mac(1)).bytes(), at(0)).unwrap_err();
    assert!(matches!(err, DhcpError::ConfigMismatch { .. }), "{err}");
    let mut bad = cfg();
    bad.prefix_len = 40;
    let mut t = table(&cfg());
    assert!(matches!(
        handle(&bad, &mut t, &[0; 300], at(0)),
        Err(DhcpError::InvalidConfig(_))
    ));
}
