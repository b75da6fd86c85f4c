//! The protocol: [`handle`] turns one received datagram into a reply, an
//! event and a changed lease table, without any I/O.
//!
//! Screening comes first and is done here, not by the decoder: the fixed
//! header is checked (`op` BOOTREQUEST, `htype` Ethernet, `hlen` 6, the
//! magic cookie), then the options are walked with every length bounded by
//! the datagram. Only the options a server reads are kept (message type 53,
//! requested address 50, server identifier 54, parameter request list 55),
//! each checked for its exact length, first occurrence wins; `dhcproto` then
//! decodes that sanitized copy. Anything that does not pass is either
//! ignored (a well-formed packet not for us) or [`DhcpError::Malformed`].
//!
//! Replies are encoded by `dhcproto` too, but the options are written one by
//! one, in the order of the client's parameter request list (message type
//! and server identifier first), since `dhcproto`'s option map has no order.
//! Replies are padded to the 300 bytes of a BOOTP message.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::SystemTime;

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use crate::lease::{format_mac, LeaseState, Leases, Mac};
use crate::{Config, DhcpError};

/// Longest datagram [`handle`] accepts (a jumbo frame's worth).
pub const MAX_PACKET: usize = 8192;
/// The fixed BOOTP header up to and including the magic cookie.
const HEADER: usize = 240;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// The minimum BOOTP message size; some clients drop shorter replies.
const MIN_REPLY: usize = 300;
const CLIENT_PORT: u16 = 68;
const SERVER_PORT: u16 = 67;

/// A reply to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The encoded DHCP message.
    pub bytes: Vec<u8>,
    /// Where to send it: the relay (`giaddr:67`) if any, else the client's
    /// address (`ciaddr:68`) if it has one (and this is not a NAK), else
    /// `255.255.255.255:68`.
    pub dest: SocketAddrV4,
    /// OFFER, ACK or NAK.
    pub kind: MessageType,
}

/// Something the agent may want to know (for a VM's status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The client was acknowledged an address it did not hold bound before
    /// (renewals of a current lease are not reported).
    Bound { mac: Mac, ip: Ipv4Addr },
    /// The client released its address.
    Released { mac: Mac, ip: Ipv4Addr },
    /// The client declined its address (an address conflict on the bridge).
    Declined { mac: Mac, ip: Ipv4Addr },
    /// The client's REQUEST was refused.
    Nak { mac: Mac, why: String },
}

/// What [`handle`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The reply to send, if any.
    pub reply: Option<Reply>,
    /// An event for the agent, if any.
    pub event: Option<Event>,
    /// The type of the message received, once known.
    pub received: Option<MessageType>,
    /// Whether the lease table changed (and should be saved).
    pub changed: bool,
    /// Why a well-formed packet got no reply, when it got none.
    pub ignored: Option<&'static str>,
}

impl Outcome {
    fn ignore(received: Option<MessageType>, why: &'static str) -> Self {
        Self {
            received,
            ignored: Some(why),
            ..Self::default()
        }
    }
}

/// A request that passed screening.
struct Request {
    msg: Message,
    mac: Mac,
    kind: MessageType,
    requested: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    /// The parameter request list, as option codes.
    prl: Vec<u8>,
}

fn malformed(why: &'static str) -> DhcpError {
    DhcpError::Malformed { why }
}

/// Checks the header and options of `packet` and decodes a sanitized copy.
/// `Ok(Err(why))`: well formed but not for this server.
fn screen(packet: &[u8]) -> Result<Result<Request, &'static str>, DhcpError> {
    if packet.len() < HEADER {
        return Err(malformed("shorter than a DHCP header"));
    }
    if packet.len() > MAX_PACKET {
        return Err(malformed("longer than the largest accepted DHCP message"));
    }
    match packet[0] {
        1 => {}
        2 => return Ok(Err("a BOOTREPLY")),
        _ => return Ok(Err("unknown BOOTP op")),
    }
    if packet[1] != 1 {
        return Ok(Err("hardware type is not Ethernet"));
    }
    if packet[2] != 6 {
        return Ok(Err("hardware address length is not 6"));
    }
    if packet[236..HEADER] != MAGIC {
        return Err(malformed("no DHCP magic cookie"));
    }
    let mut sanitized = Vec::with_capacity(HEADER + 64);
    sanitized.extend_from_slice(&packet[..HEADER]);
    let mut seen = [false; 256];
    let mut i = HEADER;
    while let Some(&code) = packet.get(i) {
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let len = *packet
            .get(i + 1)
            .ok_or_else(|| malformed("option without a length"))?;
        let start = i + 2;
        let end = start + usize::from(len);
        let value = packet
            .get(start..end)
            .ok_or_else(|| malformed("option runs past the end of the packet"))?;
        i = end;
        if std::mem::replace(&mut seen[usize::from(code)], true) {
            continue;
        }
        let keep = match code {
            53 if len != 1 => return Err(malformed("message type option is not 1 byte")),
            50 if len != 4 => return Err(malformed("requested address option is not 4 bytes")),
            54 if len != 4 => return Err(malformed("server identifier option is not 4 bytes")),
            53 | 50 | 54 => true,
            55 => len > 0,
            _ => false,
        };
        if keep {
            sanitized.extend_from_slice(&[code, len]);
            sanitized.extend_from_slice(value);
        }
    }
    if !seen[53] {
        return Ok(Err("a BOOTP request without a DHCP message type"));
    }
    sanitized.push(255);
    let msg = Message::decode(&mut Decoder::new(&sanitized))
        .map_err(|_| malformed("undecodable after screening"))?;
    let Some(kind) = msg.opts().msg_type() else {
        return Err(malformed("message type lost in decoding"));
    };
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&packet[28..34]);
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Ok(Err("chaddr is not a unicast MAC address"));
    }
    let requested = match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    let prl = match msg.opts().get(OptionCode::ParameterRequestList) {
        Some(DhcpOption::ParameterRequestList(codes)) => {
            codes.iter().map(|c| u8::from(*c)).collect()
        }
        _ => Vec::new(),
    };
    Ok(Ok(Request {
        msg,
        mac,
        kind,
        requested,
        server_id,
        prl,
    }))
}

/// Handles one datagram received on the server port: screens and decodes
/// it, runs the RFC 2131 server state machine against `leases` at time
/// `now`, and encodes the reply. Pure: no I/O, the caller sends the reply
/// and saves the table when [`Outcome::changed`].
///
/// Errors: [`DhcpError::Malformed`] (drop and count it),
/// [`DhcpError::PoolExhausted`] (a DISCOVER found no free address), and
/// configuration errors ([`Config::validate`], or `cfg` naming another
/// network than `leases` was loaded for). Never panics.
pub fn handle(
    cfg: &Config,
    leases: &mut Leases,
    packet: &[u8],
    now: SystemTime,
) -> Result<Outcome, DhcpError> {
    cfg.validate()?;
    let table = leases.config();
    if (table.subnet, table.prefix_len, table.gateway) != (cfg.subnet, cfg.prefix_len, cfg.gateway)
    {
        return Err(DhcpError::ConfigMismatch {
            table: format!("{} (gateway {})", table.cidr(), table.gateway),
            config: format!("{} (gateway {})", cfg.cidr(), cfg.gateway),
        });
    }
    let req = match screen(packet)? {
        Ok(req) => req,
        Err(why) => return Ok(Outcome::ignore(None, why)),
    };
    let received = Some(req.kind);
    let giaddr = req.msg.giaddr();
    if !giaddr.is_unspecified() && !cfg.contains(giaddr) {
        return Ok(Outcome::ignore(received, "relayed from another network"));
    }
    let mut out = match req.kind {
        MessageType::Discover => discover(cfg, leases, &req, now)?,
        MessageType::Request => request(cfg, leases, &req, now)?,
        MessageType::Release => release(cfg, leases, &req),
        MessageType::Decline => decline(cfg, leases, &req, now),
        MessageType::Inform => inform(cfg, leases, &req)?,
        _ => Outcome::ignore(None, "not a message a client sends to a server"),
    };
    out.received = received;
    Ok(out)
}

fn discover(
    cfg: &Config,
    leases: &mut Leases,
    req: &Request,
    now: SystemTime,
) -> Result<Outcome, DhcpError> {
    let requested = req.requested.filter(|ip| cfg.in_pool(*ip));
    let ip = leases.offer(req.mac, requested, now)?;
    let reply = answer(cfg, leases, req, MessageType::Offer, ip, true)?;
    Ok(Outcome {
        reply: Some(reply),
        changed: true,
        ..Outcome::default()
    })
}

fn request(
    cfg: &Config,
    leases: &mut Leases,
    req: &Request,
    now: SystemTime,
) -> Result<Outcome, DhcpError> {
    let kind = Some(MessageType::Request);
    let ciaddr = req.msg.ciaddr();
    let mine = leases.address_of(req.mac);
    if let Some(server_id) = req.server_id {
        // SELECTING: the client answers one of the OFFERs it got.
        if server_id != cfg.gateway {
            let changed = leases.withdraw_offer(req.mac);
            return Ok(Outcome {
                changed,
                ..Outcome::ignore(kind, "the client chose another server")
            });
        }
        let Some(requested) = req.requested else {
            return Ok(Outcome::ignore(
                kind,
                "SELECTING without a requested address",
            ));
        };
        let offered = leases.get(req.mac).is_some_and(|l| {
            l.ip == requested && matches!(l.state, LeaseState::Offered | LeaseState::Bound)
        });
        if !offered {
            return Ok(Outcome::ignore(
                kind,
                "the REQUEST names no offer of this server",
            ));
        }
        return ack(cfg, leases, req, requested, now);
    }
    // INIT-REBOOT (requested address, no ciaddr), RENEWING (unicast) or
    // REBINDING (broadcast) (ciaddr): verify the client's idea of its address.
    let (claimed, state) = if !ciaddr.is_unspecified() {
        (ciaddr, "renewing")
    } else if let Some(requested) = req.requested {
        (requested, "init-reboot")
    } else {
        return Ok(Outcome::ignore(
            kind,
            "REQUEST without server id, requested address or ciaddr",
        ));
    };
    if mine == Some(claimed) {
        return ack(cfg, leases, req, claimed, now);
    }
    let why = if !cfg.contains(claimed) {
        format!("{state}: {claimed} is not in {}", cfg.cidr())
    } else if let Some(ip) = mine {
        format!("{state}: {claimed} is not this client's address ({ip} is)")
    } else {
        format!("{state}: no lease of {claimed} for this client")
    };
    nak(cfg, req, why)
}

fn ack(
    cfg: &Config,
    leases: &mut Leases,
    req: &Request,
    ip: Ipv4Addr,
    now: SystemTime,
) -> Result<Outcome, DhcpError> {
    let newly = leases.bind(req.mac, now, cfg.lease_time);
    let reply = answer(cfg, leases, req, MessageType::Ack, ip, true)?;
    Ok(Outcome {
        reply: Some(reply),
        event: newly.then_some(Event::Bound { mac: req.mac, ip }),
        changed: true,
        ..Outcome::default()
    })
}

fn nak(cfg: &Config, req: &Request, why: String) -> Result<Outcome, DhcpError> {
    let mut msg = reply_header(req, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED);
    if !req.msg.giaddr().is_unspecified() {
        // RFC 2131 4.3.2: a NAK through a relay asks it to broadcast.
        msg.set_flags(Flags::default().set_broadcast());
    }
    let options = vec![DhcpOption::Message(why.clone())];
    let bytes = encode(&msg, MessageType::Nak, cfg.gateway, options, &req.prl)?;
    Ok(Outcome {
        reply: Some(Reply {
            bytes,
            dest: destination(req, MessageType::Nak),
            kind: MessageType::Nak,
        }),
        event: Some(Event::Nak { mac: req.mac, why }),
        ..Outcome::default()
    })
}

fn release(cfg: &Config, leases: &mut Leases, req: &Request) -> Outcome {
    let kind = Some(MessageType::Release);
    if req.server_id.is_some_and(|id| id != cfg.gateway) {
        return Outcome::ignore(kind, "RELEASE for another server");
    }
    let ip = req.msg.ciaddr();
    if !leases.release(req.mac, ip) {
        return Outcome::ignore(kind, "RELEASE of an address this client does not hold");
    }
    Outcome {
        event: Some(Event::Released { mac: req.mac, ip }),
        changed: true,
        ..Outcome::default()
    }
}

fn decline(cfg: &Config, leases: &mut Leases, req: &Request, now: SystemTime) -> Outcome {
    let kind = Some(MessageType::Decline);
    if req.server_id.is_some_and(|id| id != cfg.gateway) {
        return Outcome::ignore(kind, "DECLINE for another server");
    }
    let Some(ip) = req.requested else {
        return Outcome::ignore(kind, "DECLINE without the declined address");
    };
    if !leases.decline(req.mac, ip, now) {
        return Outcome::ignore(kind, "DECLINE of an address this client does not hold");
    }
    Outcome {
        event: Some(Event::Declined { mac: req.mac, ip }),
        changed: true,
        ..Outcome::default()
    }
}

fn inform(cfg: &Config, leases: &Leases, req: &Request) -> Result<Outcome, DhcpError> {
    let ciaddr = req.msg.ciaddr();
    if !ciaddr.is_unspecified() && !cfg.contains(ciaddr) {
        return Ok(Outcome::ignore(
            Some(MessageType::Inform),
            "INFORM from another network",
        ));
    }
    // RFC 2131 4.3.5: no yiaddr, no lease time.
    let reply = answer(
        cfg,
        leases,
        req,
        MessageType::Ack,
        Ipv4Addr::UNSPECIFIED,
        false,
    )?;
    Ok(Outcome {
        reply: Some(reply),
        ..Outcome::default()
    })
}

/// An OFFER or ACK with the configured options for `req`'s MAC.
fn answer(
    cfg: &Config,
    leases: &Leases,
    req: &Request,
    kind: MessageType,
    yiaddr: Ipv4Addr,
    with_lease: bool,
) -> Result<Reply, DhcpError> {
    let ciaddr = if kind == MessageType::Offer {
        Ipv4Addr::UNSPECIFIED
    } else {
        req.msg.ciaddr()
    };
    let msg = reply_header(req, ciaddr, yiaddr);
    let hostname = leases.get(req.mac).and_then(|l| l.hostname.as_deref());
    let options = lease_options(cfg, hostname, with_lease);
    Ok(Reply {
        bytes: encode(&msg, kind, cfg.gateway, options, &req.prl)?,
        dest: destination(req, kind),
        kind,
    })
}

/// The options of an OFFER or ACK, other than message type and server id.
fn lease_options(cfg: &Config, hostname: Option<&str>, with_lease: bool) -> Vec<DhcpOption> {
    let mut options = vec![
        DhcpOption::SubnetMask(cfg.netmask()),
        DhcpOption::Router(vec![cfg.gateway]),
    ];
    if !cfg.dns.is_empty() {
        options.push(DhcpOption::DomainNameServer(cfg.dns.clone()));
    }
    if let Some(hostname) = hostname {
        options.push(DhcpOption::Hostname(hostname.to_string()));
    }
    if let Some(domain) = &cfg.domain {
        options.push(DhcpOption::DomainName(domain.clone()));
    }
    if let Some(mtu) = cfg.mtu {
        options.push(DhcpOption::InterfaceMtu(mtu));
    }
    if with_lease {
        let secs = cfg.lease_secs();
        options.push(DhcpOption::AddressLeaseTime(secs));
        options.push(DhcpOption::Renewal(secs / 2));
        options.push(DhcpOption::Rebinding((u64::from(secs) * 7 / 8) as u32));
    }
    options
}

/// A BOOTREPLY header for `req`.
fn reply_header(req: &Request, ciaddr: Ipv4Addr, yiaddr: Ipv4Addr) -> Message {
    let mut msg = Message::new_with_id(
        req.msg.xid(),
        ciaddr,
        yiaddr,
        Ipv4Addr::UNSPECIFIED,
        req.msg.giaddr(),
        &req.mac,
    );
    msg.set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_flags(req.msg.flags());
    msg
}

/// Where a reply goes (RFC 2131 4.1, without unicasting to a client that
/// has no address yet: that needs an ARP entry we cannot add from here).
fn destination(req: &Request, kind: MessageType) -> SocketAddrV4 {
    let giaddr = req.msg.giaddr();
    let ciaddr = req.msg.ciaddr();
    if !giaddr.is_unspecified() {
        SocketAddrV4::new(giaddr, SERVER_PORT)
    } else if kind != MessageType::Nak && !ciaddr.is_unspecified() {
        SocketAddrV4::new(ciaddr, CLIENT_PORT)
    } else {
        SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT)
    }
}

/// Encodes `msg` with the message type and server id first, then `options`
/// in the order of the parameter request list, then the rest by code.
fn encode(
    msg: &Message,
    kind: MessageType,
    server_id: Ipv4Addr,
    mut options: Vec<DhcpOption>,
    prl: &[u8],
) -> Result<Vec<u8>, DhcpError> {
    options.sort_by_key(|opt| {
        let code = u8::from(OptionCode::from(opt));
        let rank = prl.iter().position(|c| *c == code).unwrap_or(usize::MAX);
        (rank, code)
    });
    let mut buf = Vec::with_capacity(576);
    let mut e = Encoder::new(&mut buf);
    let err = |e: dhcproto::error::EncodeError| DhcpError::Encode(e.to_string());
    msg.encode(&mut e).map_err(err)?;
    DhcpOption::MessageType(kind).encode(&mut e).map_err(err)?;
    DhcpOption::ServerIdentifier(server_id)
        .encode(&mut e)
        .map_err(err)?;
    for opt in &options {
        opt.encode(&mut e).map_err(err)?;
    }
    DhcpOption::End.encode(&mut e).map_err(err)?;
    if buf.len() < MIN_REPLY {
        buf.resize(MIN_REPLY, 0);
    }
    Ok(buf)
}

/// A short description of a request, for logs: `DISCOVER from 52:54:..`.
pub fn describe(packet: &[u8]) -> String {
    match screen(packet) {
        Ok(Ok(req)) => format!("{:?} from {}", req.kind, format_mac(&req.mac)),
        Ok(Err(why)) => format!("ignored: {why}"),
        Err(e) => e.to_string(),
    }
}
