//! A test DHCP client: builds requests with `dhcproto` and reads replies
//! byte by byte (to see the option order).

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};
use kubevmm_dhcp::{Config, Leases, Mac};

pub const GW: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

pub fn cfg() -> Config {
    Config::new(
        Ipv4Addr::new(10, 77, 0, 0),
        24,
        GW,
        vec![Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(9, 9, 9, 9)],
        Duration::from_secs(3600),
        Some(1400),
        Some("vms.example".into()),
    )
    .unwrap()
}

/// A configuration with a tiny pool: `prefix` 29 has 5 leasable addresses.
pub fn small_cfg(prefix: u8) -> Config {
    Config::new(
        Ipv4Addr::new(10, 77, 0, 0),
        prefix,
        GW,
        vec![],
        Duration::from_secs(100),
        None,
        None,
    )
    .unwrap()
}

pub fn table(cfg: &Config) -> Leases {
    Leases::empty(Path::new("/nonexistent/leases.json"), cfg)
}

pub fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

pub fn mac(n: u8) -> Mac {
    [0x52, 0x54, 0x00, 0x00, 0x00, n]
}

/// A client message under construction.
pub struct Req {
    pub msg: Message,
}

impl Req {
    pub fn new(kind: MessageType, mac: Mac) -> Self {
        let mut msg = Message::new_with_id(
            0x1234_5678,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        msg.opts_mut().insert(DhcpOption::MessageType(kind));
        Self { msg }
    }

    pub fn requested(mut self, ip: Ipv4Addr) -> Self {
        self.msg
            .opts_mut()
            .insert(DhcpOption::RequestedIpAddress(ip));
        self
    }

    pub fn server(mut self, ip: Ipv4Addr) -> Self {
        self.msg.opts_mut().insert(DhcpOption::ServerIdentifier(ip));
        self
    }

    pub fn ciaddr(mut self, ip: Ipv4Addr) -> Self {
        self.msg.set_ciaddr(ip);
        self
    }

    pub fn giaddr(mut self, ip: Ipv4Addr) -> Self {
        self.msg.set_giaddr(ip);
        self
    }

    pub fn broadcast_flag(mut self) -> Self {
        self.msg.set_flags(Flags::default().set_broadcast());
        self
    }

    pub fn prl(mut self, codes: &[u8]) -> Self {
        self.msg.opts_mut().insert(DhcpOption::ParameterRequestList(
            codes.iter().map(|c| OptionCode::from(*c)).collect(),
        ));
        self
    }

    pub fn htype(mut self, htype: HType) -> Self {
        self.msg.set_htype(htype);
        self
    }

    pub fn opcode(mut self, op: Opcode) -> Self {
        self.msg.set_opcode(op);
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.msg.to_vec().unwrap()
    }
}

/// A decoded reply and its option codes in wire order.
#[derive(Debug)]
pub struct Got {
    pub msg: Message,
    pub order: Vec<u8>,
}

impl Got {
    pub fn parse(bytes: &[u8]) -> Self {
        let msg = Message::decode(&mut dhcproto::Decoder::new(bytes)).unwrap();
        let mut order = Vec::new();
        let mut i = 240;
        while i < bytes.len() && bytes[i] != 255 {
            if bytes[i] == 0 {
                i += 1;
                continue;
            }
            order.push(bytes[i]);
            i += 2 + usize::from(bytes[i + 1]);
        }
        assert!(i < bytes.len(), "no End option");
        Self { msg, order }
    }

    pub fn kind(&self) -> MessageType {
        self.msg.opts().msg_type().unwrap()
    }

    pub fn opt(&self, code: u8) -> Option<&DhcpOption> {
        self.msg.opts().get(OptionCode::from(code))
    }
}
