//! Every link, address and route operation of the agent, over netlink
//! through the `rtnetlink` crate, behind one synchronous API: bridges (the
//! masquerade bridge with its gateway address), taps on bridges, link
//! removal, and the host's IPv4 addresses and routes (for subnet checks and
//! the default uplink). No `ip` command lines.
//!
//! rtnetlink is asynchronous; the agent's preparation is synchronous code
//! (called from async tasks and from `node-vmm run`). So one worker thread
//! owns a current-thread Tokio runtime and the netlink connection, and each
//! call sends it a job and waits for the answer (netlink round trips are
//! tens of microseconds).
//!
//! Taps are made with the tun driver's ioctls (`TUNSETIFF` + `TUNSETPERSIST`:
//! netlink cannot create a tap), then attached and brought up over netlink.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::sync::OnceLock;

use futures::TryStreamExt as _;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

/// Why a netlink operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The worker thread or its netlink socket could not be started.
    #[error("netlink is unavailable: {0}")]
    Unavailable(String),
    /// An operation the kernel refused.
    #[error("{what}: {why}")]
    Op {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        why: String,
    },
}

type Job = Box<dyn FnOnce(Handle) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

static WORKER: OnceLock<Result<UnboundedSender<Job>, String>> = OnceLock::new();

fn worker() -> Result<&'static UnboundedSender<Job>, NetlinkError> {
    WORKER
        .get_or_init(|| {
            let (tx, mut rx) = unbounded_channel::<Job>();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
            std::thread::Builder::new()
                .name("netlink".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_io()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let handle = match rtnetlink::new_connection() {
                            Ok((conn, handle, _)) => {
                                tokio::spawn(conn);
                                handle
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e.to_string()));
                                return;
                            }
                        };
                        let _ = ready_tx.send(Ok(()));
                        while let Some(job) = rx.recv().await {
                            job(handle.clone()).await;
                        }
                    });
                })
                .map_err(|e| e.to_string())?;
            ready_rx
                .recv()
                .map_err(|_| "the netlink thread ended".to_string())??;
            Ok(tx)
        })
        .as_ref()
        .map_err(|e| NetlinkError::Unavailable(e.clone()))
}

/// Runs `f` on the netlink worker and waits for its result.
fn run<T, F, Fut>(what: impl Into<String>, f: F) -> Result<T, NetlinkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, rtnetlink::Error>> + Send + 'static,
{
    let what = what.into();
    let (tx, rx) = std::sync::mpsc::channel();
    worker()?
        .send(Box::new(move |h| {
            Box::pin(async move {
                let _ = tx.send(f(h).await);
            })
        }))
        .map_err(|_| NetlinkError::Unavailable("the netlink thread ended".into()))?;
    rx.recv()
        .map_err(|_| NetlinkError::Unavailable("the netlink thread ended".into()))?
        .map_err(|e| NetlinkError::Op {
            what,
            why: e.to_string(),
        })
}

/// The index of link `name`, if it exists.
pub fn index(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `name` exists and is a bridge.
pub fn is_bridge(name: &str) -> bool {
    std::path::Path::new("/sys/class/net")
        .join(name)
        .join("bridge")
        .exists()
}

/// The name of the link with index `idx`.
pub fn name_of(idx: u32) -> Option<String> {
    std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find(|e| index(&e.file_name().to_string_lossy()) == Some(idx))
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// What [`ensure_bridge`] had to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BridgeChanges {
    /// The bridge was created.
    pub created: bool,
    /// The gateway address was added.
    pub address_added: bool,
}

/// Makes bridge `name` exist, be up, and carry `gateway/prefix`;
/// idempotent.
pub fn ensure_bridge(
    name: &str,
    gateway: Ipv4Addr,
    prefix: u8,
) -> Result<BridgeChanges, NetlinkError> {
    let mut changes = BridgeChanges::default();
    if index(name).is_none() {
        let n = name.to_string();
        run(format!("create bridge {name}"), move |h| async move {
            h.link().add(LinkBridge::new(&n).build()).execute().await
        })?;
        changes.created = true;
    } else if !is_bridge(name) {
        return Err(NetlinkError::Op {
            what: format!("bridge {name}"),
            why: "a link of that name exists and is not a bridge".into(),
        });
    }
    let idx = index(name).ok_or_else(|| NetlinkError::Op {
        what: format!("bridge {name}"),
        why: "it vanished right after creation".into(),
    })?;
    run(format!("bring bridge {name} up"), move |h| async move {
        h.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
    })?;
    let has = run(format!("addresses of {name}"), move |h| async move {
        let addrs: Vec<_> = h
            .address()
            .get()
            .set_link_index_filter(idx)
            .execute()
            .try_collect()
            .await?;
        Ok(addrs.iter().any(|a| {
            a.header.prefix_len == prefix
                && a.attributes.iter().any(
                    |at| matches!(at, AddressAttribute::Local(IpAddr::V4(ip)) if *ip == gateway),
                )
        }))
    })?;
    if !has {
        run(
            format!("add {gateway}/{prefix} to {name}"),
            move |h| async move {
                h.address()
                    .add(idx, IpAddr::V4(gateway), prefix)
                    .execute()
                    .await
            },
        )?;
        changes.address_added = true;
    }
    Ok(changes)
}

/// Creates tap `name` (replacing a stale one) with virtio-net headers,
/// attached to `bridge` and up.
pub fn create_tap(name: &str, bridge: &str) -> Result<(), NetlinkError> {
    if !is_bridge(bridge) {
        return Err(NetlinkError::Op {
            what: format!("tap {name} on bridge {bridge}"),
            why: format!("bridge {bridge} does not exist on this node"),
        });
    }
    delete_link(name)?;
    persistent_tap(name).map_err(|e| NetlinkError::Op {
        what: format!("create tap {name}"),
        why: e.to_string(),
    })?;
    attach(name, bridge)
}

/// Attaches existing link `name` to `bridge` and brings it up.
pub fn attach(name: &str, bridge: &str) -> Result<(), NetlinkError> {
    let (Some(idx), Some(br)) = (index(name), index(bridge)) else {
        return Err(NetlinkError::Op {
            what: format!("attach {name} to {bridge}"),
            why: "no such link".into(),
        });
    };
    run(format!("attach {name} to {bridge}"), move |h| async move {
        h.link()
            .set(LinkUnspec::new_with_index(idx).controller(br).up().build())
            .execute()
            .await
    })
}

/// Removes link `name`; `false` when there was none.
pub fn delete_link(name: &str) -> Result<bool, NetlinkError> {
    let Some(idx) = index(name) else {
        return Ok(false);
    };
    run(format!("delete link {name}"), move |h| async move {
        h.link().del(idx).execute().await
    })?;
    Ok(true)
}

/// An IPv4 network the host already uses: an address's subnet or a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNet {
    /// Network address (as given; not necessarily masked).
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// The interface, when known.
    pub iface: Option<String>,
    /// `route` or `address`.
    pub kind: &'static str,
}

/// The host's IPv4 addresses and main-table routes.
pub fn host_networks() -> Result<Vec<HostNet>, NetlinkError> {
    let (routes, addrs) = run("list IPv4 routes and addresses", |h| async move {
        let routes: Vec<_> = h
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await?;
        let addrs: Vec<_> = h.address().get().execute().try_collect().await?;
        Ok((routes, addrs))
    })?;
    let mut nets = Vec::new();
    for r in routes {
        // Only the main table (254): local and broadcast routes are covered by addresses.
        if r.header.table != 254 {
            continue;
        }
        let mut dst = Ipv4Addr::UNSPECIFIED;
        let mut oif = None;
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        nets.push(HostNet {
            addr: dst,
            prefix: r.header.destination_prefix_length,
            iface: oif.and_then(name_of),
            kind: "route",
        });
    }
    for a in addrs {
        for at in &a.attributes {
            if let AddressAttribute::Local(IpAddr::V4(ip)) = at {
                nets.push(HostNet {
                    addr: *ip,
                    prefix: a.header.prefix_len,
                    iface: name_of(a.header.index),
                    kind: "address",
                });
            }
        }
    }
    Ok(nets)
}

/// Creates a persistent tap device `name` with `IFF_VNET_HDR`.
fn persistent_tap(name: &str) -> std::io::Result<()> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("tap name {name:?} must be 1 to 15 bytes"),
        ));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` lays out
    // (name, flags, padding to the kernel's 40 bytes); the fd is ours.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &raw mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes an integer argument by value.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root and a kernel with bridges and taps (the agent's own needs);
    /// the test fails loudly otherwise.
    fn require_root() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "netlink tests need root");
    }

    #[test]
    fn a_bridge_with_its_gateway_and_a_tap_on_it_are_made_once_and_removed() {
        require_root();
        let (br, tap) = (
            format!("kvtbr{}", std::process::id() % 100_000),
            format!("kvttp{}", std::process::id() % 100_000),
        );
        let gw = Ipv4Addr::new(10, 254, 77, 1);
        let first = ensure_bridge(&br, gw, 24).expect("bridge");
        assert_eq!(
            first,
            BridgeChanges {
                created: true,
                address_added: true
            }
        );
        assert_eq!(
            ensure_bridge(&br, gw, 24).expect("again"),
            BridgeChanges::default(),
            "idempotent"
        );
        let nets = host_networks().expect("networks");
        assert!(
            nets.iter()
                .any(|n| n.addr == gw && n.prefix == 24 && n.iface.as_deref() == Some(&*br)),
            "{nets:?}"
        );
        create_tap(&tap, &br).expect("tap");
        create_tap(&tap, &br).expect("a stale tap is replaced");
        let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).expect("master");
        assert!(master.ends_with(&br), "{master:?}");
        let flags =
            std::fs::read_to_string(format!("/sys/class/net/{tap}/tun_flags")).expect("tun");
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).expect("hex");
        assert_eq!(flags & 0x4002, 0x4002, "tap with vnet headers: {flags:#x}");
        assert!(create_tap("kvtx", "no-such-br").is_err());
        assert!(delete_link(&tap).expect("delete"));
        assert!(!delete_link(&tap).expect("absent"));
        assert!(delete_link(&br).expect("delete bridge"));
    }
}
