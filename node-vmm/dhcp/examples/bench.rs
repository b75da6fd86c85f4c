//! `make bench` (hack/bench-net.sh): the DHCP server's DISCOVER → ACK for
//! 100 clients, printed as markdown rows beside busybox `udhcpd`.
//!
//! Usage: `dhcp-bench WORK_DIR [TAG]` (as root: a network namespace, a veth
//! pair, UDP port 67). `TAG` names what is created (`kvnb<TAG>d` for the
//! namespace, `kvnbh<TAG>`/`kvnbc<TAG>` for the veth ends) so that the
//! calling script can remove them if this process is killed; it defaults to
//! our pid.
//!
//! 1. The pure path: [`handle`] on an encoded DISCOVER, then on the REQUEST
//!    for the offered address, for 100 MACs reserved first with
//!    [`Leases::reserve`] (as the agent does for VM NICs); a warm-up round,
//!    then ten measured rounds; the median exchange and the median round.
//! 2. The real path: [`serve`] on the host end of a veth pair (lease table
//!    in `WORK_DIR`, saved durably after every change, as the agent runs
//!    it), and a client on the other end, in a network namespace: a UDP
//!    socket made by a thread that entered the namespace, bound to the
//!    interface and port 68, which broadcasts each client's DISCOVER and
//!    REQUEST (its own `chaddr`, the broadcast flag set so that every server
//!    broadcasts its replies) and waits for the OFFER and the ACK. The 100
//!    clients go one after another; p50 and p95 DISCOVER → ACK and the time
//!    for all 100. Then the same with the table on tmpfs (`/dev/shm`): the
//!    server without the disk's fsync latency, which swings with whatever
//!    else the machine's disk is doing.
//! 3. The anchor: the same client against busybox `udhcpd` on the same veth,
//!    the same 100 MACs as `static_lease`s (so it does not ARP-probe the
//!    addresses it offers, as it does for dynamic ones).
//!
//! Nothing here is asserted; the figures go in docs/testing.md and
//! docs/networking.md.

// Durations in µs and counts far below 2^52: nothing that shows is lost.
#![allow(clippy::cast_precision_loss)]

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use kubevmm_dhcp::{format_mac, handle, serve, Config, DhcpError, Leases, Mac, Stats};

const CLIENTS: usize = 100;
/// Measured rounds of the pure path (after one warm-up round).
const PURE_ROUNDS: usize = 10;
const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 251, 78, 0);
const GW: Ipv4Addr = Ipv4Addr::new(10, 251, 78, 1);
/// What busybox udhcpc asks for (subnet, router, DNS, host name, domain,
/// broadcast, NTP... minus the ones neither server has) plus MTU and lease.
const PRL: [u8; 8] = [1, 3, 6, 12, 15, 26, 28, 51];
/// A client's wait for one reply before it sends its message again.
const REPLY_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Bad(String),
    #[error(transparent)]
    Dhcp(#[from] DhcpError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// A child process killed when dropped.
#[derive(Debug)]
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_cmd(args: &[&str]) -> Result<(), BenchError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(io(format!("run {args:?}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BenchError::Bad(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A network namespace holding one end of a veth pair; the other end on
/// the host with the gateway address. Removed on drop (deleting the
/// namespace deletes its end, and so the pair).
#[derive(Debug)]
struct Net {
    ns: String,
    host_if: String,
    ns_if: String,
}

impl Net {
    fn new(tag: &str) -> Result<Self, BenchError> {
        let net = Self {
            ns: format!("kvnb{tag}d"),
            host_if: format!("kvnbh{tag}"),
            ns_if: format!("kvnbc{tag}"),
        };
        if net.host_if.len() > 15 {
            return Err(BenchError::Bad(format!("tag {tag:?} is too long")));
        }
        // Leftovers of a killed run with the same tag.
        net.remove();
        run_cmd(&["ip", "netns", "add", &net.ns])?;
        let (h, c, ns) = (&net.host_if, &net.ns_if, &net.ns);
        run_cmd(&["ip", "link", "add", h, "type", "veth", "peer", "name", c])?;
        run_cmd(&["ip", "link", "set", c, "netns", ns])?;
        run_cmd(&["ip", "addr", "add", &format!("{GW}/24"), "dev", h])?;
        run_cmd(&["ip", "link", "set", h, "up"])?;
        run_cmd(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        run_cmd(&["ip", "-n", ns, "link", "set", c, "up"])?;
        Ok(net)
    }

    fn remove(&self) {
        for args in [["netns", "del", &self.ns], ["link", "del", &self.host_if]] {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        }
    }

    /// The client socket, made in the namespace: UDP `0.0.0.0:68` bound to
    /// the namespace's end, allowed to broadcast.
    fn client_socket(&self) -> Result<UdpSocket, BenchError> {
        let path = format!("/var/run/netns/{}", self.ns);
        let iface = self.ns_if.clone();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).map_err(io(format!("open {path}")))?;
            // SAFETY: setns(2) on a namespace descriptor we just opened; it
            // moves only this short-lived thread into that namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io("setns")(std::io::Error::last_os_error()));
            }
            client_socket_here(&iface)
        })
        .join()
        .map_err(|_| BenchError::Bad("the namespace thread panicked".into()))?
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.remove();
    }
}

/// UDP `0.0.0.0:68` bound to `iface`, in this thread's network namespace
/// (the server's own socket set-up, blocking).
fn client_socket_here(iface: &str) -> Result<UdpSocket, BenchError> {
    let sock = kubevmm_dhcp::socket::bind_socket(iface, 68)
        .map_err(|e| io("client socket")(std::io::Error::other(e.to_string())))?;
    sock.set_nonblocking(false).map_err(io("blocking mode"))?;
    Ok(sock)
}

fn config() -> Result<Config, BenchError> {
    Ok(Config::new(
        SUBNET,
        24,
        GW,
        vec![GW],
        Duration::from_secs(3600),
        Some(1500),
        Some("vms.bench".into()),
    )?)
}

fn mac(i: usize) -> Mac {
    let [hi, lo] = (i as u16).to_be_bytes();
    [0x52, 0x54, 0x00, 0x4e, hi, lo]
}

fn xid(i: usize) -> u32 {
    0x6b76_0000 | i as u32
}

/// A client message: DISCOVER, or the REQUEST (SELECTING) for `offer`
/// (address, server identifier); the broadcast flag set.
fn client_msg(
    kind: MessageType,
    mac: Mac,
    xid: u32,
    offer: Option<(Ipv4Addr, Ipv4Addr)>,
) -> Result<Vec<u8>, BenchError> {
    let u = Ipv4Addr::UNSPECIFIED;
    let mut msg = Message::new_with_id(xid, u, u, u, u, &mac);
    msg.set_flags(Flags::default().set_broadcast());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    if let Some((ip, server)) = offer {
        opts.insert(DhcpOption::RequestedIpAddress(ip));
        opts.insert(DhcpOption::ServerIdentifier(server));
    }
    opts.insert(DhcpOption::ParameterRequestList(
        PRL.iter().map(|c| OptionCode::from(*c)).collect(),
    ));
    msg.to_vec()
        .map_err(|e| BenchError::Bad(format!("encoding a {kind:?}: {e}")))
}

/// Reserves the MACs of clients `0..n` in `table`; their addresses.
fn reserve_all(table: &mut Leases, n: usize) -> Result<Vec<Ipv4Addr>, BenchError> {
    (0..n)
        .map(|i| Ok(table.reserve(mac(i), &format!("bench/vm-{i}/net0"), &format!("vm-{i}"))?))
        .collect()
}

struct Pure {
    /// Every exchange of every measured round.
    exchanges: Vec<Duration>,
    /// Each measured round of 100.
    rounds: Vec<Duration>,
}

/// The pure path: `handle()` on DISCOVER then REQUEST, encoded beforehand.
fn pure(work: &Path) -> Result<Pure, BenchError> {
    let cfg = config()?;
    let mut out = Pure {
        exchanges: Vec::with_capacity(CLIENTS * PURE_ROUNDS),
        rounds: Vec::with_capacity(PURE_ROUNDS),
    };
    for round in 0..=PURE_ROUNDS {
        let mut table = Leases::empty(&work.join("pure-leases.json"), &cfg);
        let ips = reserve_all(&mut table, CLIENTS)?;
        let msgs = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                Ok((
                    client_msg(MessageType::Discover, mac(i), xid(i), None)?,
                    client_msg(MessageType::Request, mac(i), xid(i), Some((*ip, GW)))?,
                ))
            })
            .collect::<Result<Vec<_>, BenchError>>()?;
        let mut times = Vec::with_capacity(CLIENTS);
        let all = Instant::now();
        for (discover, request) in &msgs {
            let t0 = Instant::now();
            let now = SystemTime::now();
            let offer = handle(&cfg, &mut table, discover, now)?;
            expect_reply(offer.reply.as_ref().map(|r| r.kind), MessageType::Offer)?;
            let ack = handle(&cfg, &mut table, request, now)?;
            expect_reply(ack.reply.as_ref().map(|r| r.kind), MessageType::Ack)?;
            times.push(t0.elapsed());
        }
        let all = all.elapsed();
        if round > 0 {
            out.exchanges.extend(times);
            out.rounds.push(all);
        }
    }
    Ok(out)
}

fn expect_reply(got: Option<MessageType>, want: MessageType) -> Result<(), BenchError> {
    if got == Some(want) {
        Ok(())
    } else {
        Err(BenchError::Bad(format!("expected a {want:?}, got {got:?}")))
    }
}

/// The client side of the real path, on the namespace's socket.
struct Client {
    sock: UdpSocket,
    /// Messages sent again after [`REPLY_WAIT`] without an answer.
    retransmits: usize,
}

impl Client {
    /// Sends `bytes` (broadcast, to port 67) until the `want` reply to
    /// `xid` arrives, `tries` times at most.
    fn ask(
        &mut self,
        bytes: &[u8],
        xid: u32,
        want: MessageType,
        tries: usize,
    ) -> Result<Message, BenchError> {
        let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
        let mut buf = [0u8; 1500];
        for attempt in 0..tries {
            if attempt > 0 {
                self.retransmits += 1;
            }
            self.sock.send_to(bytes, to).map_err(io("send"))?;
            let deadline = Instant::now() + REPLY_WAIT;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                self.sock
                    .set_read_timeout(Some(left))
                    .map_err(io("set_read_timeout"))?;
                let n = match self.sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    Err(e) => return Err(io("receive")(e)),
                };
                let Ok(msg) = Message::decode(&mut Decoder::new(&buf[..n])) else {
                    continue;
                };
                if msg.xid() != xid {
                    continue;
                }
                match msg.opts().msg_type() {
                    Some(t) if t == want => return Ok(msg),
                    Some(MessageType::Nak) => {
                        return Err(BenchError::Bad(format!("NAK for xid {xid:#x}")))
                    }
                    _ => {}
                }
            }
        }
        Err(BenchError::Bad(format!(
            "no {want:?} for xid {xid:#x} after {tries} tries"
        )))
    }

    /// One client's DISCOVER → OFFER → REQUEST → ACK; its duration.
    fn exchange(&mut self, i: usize, tries: usize) -> Result<Duration, BenchError> {
        let t0 = Instant::now();
        let discover = client_msg(MessageType::Discover, mac(i), xid(i), None)?;
        let offer = self.ask(&discover, xid(i), MessageType::Offer, tries)?;
        let server = match offer.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => *ip,
            _ => return Err(BenchError::Bad("an OFFER without server id".into())),
        };
        let request = client_msg(
            MessageType::Request,
            mac(i),
            xid(i),
            Some((offer.yiaddr(), server)),
        )?;
        self.ask(&request, xid(i), MessageType::Ack, tries)?;
        Ok(t0.elapsed())
    }

    /// A warm-up exchange (client `CLIENTS`, not measured; patient while
    /// the server starts), then clients `0..CLIENTS` one after another.
    fn run_all(&mut self) -> Result<Real, BenchError> {
        self.exchange(CLIENTS, 10)?;
        self.retransmits = 0;
        let all = Instant::now();
        let exchanges = (0..CLIENTS)
            .map(|i| self.exchange(i, 3))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Real {
            exchanges,
            total: all.elapsed(),
            retransmits: self.retransmits,
        })
    }
}

struct Real {
    exchanges: Vec<Duration>,
    total: Duration,
    retransmits: usize,
}

/// Our server on the host end, the clients in the namespace.
/// Our server on the host end, the clients in the namespace; the lease
/// table saved in `dir`.
fn ours(net: &Net, client: &mut Client, dir: &Path) -> Result<Real, BenchError> {
    let cfg = config()?;
    let path = dir.join("leases.json");
    let _ = std::fs::remove_file(&path);
    let mut table = Leases::load(&path, &cfg)?;
    reserve_all(&mut table, CLIENTS + 1)?;
    table.save()?;
    let leases = Arc::new(Mutex::new(table));
    let (tx, _events) = tokio::sync::mpsc::unbounded_channel();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(io("tokio runtime"))?;
    let server = rt.spawn(serve(
        &net.host_if,
        cfg,
        leases,
        tx,
        Arc::new(Stats::default()),
    ));
    let result = client.run_all();
    if server.is_finished() {
        let why = rt
            .block_on(server)
            .map_or_else(|e| e.to_string(), |r| format!("{r:?}"));
        return Err(BenchError::Bad(format!("serve() stopped: {why}")));
    }
    server.abort();
    drop(rt);
    result
}

/// busybox udhcpd on the host end, the same MACs as static leases.
fn udhcpd(net: &Net, client: &mut Client, work: &Path) -> Result<Real, BenchError> {
    let mut conf = format!(
        "start {}\nend {}\ninterface {}\nlease_file {}\npidfile {}\n\
         opt subnet 255.255.255.0\nopt router {GW}\nopt dns {GW}\nopt domain vms.bench\n\
         opt mtu 1500\nopt lease 3600\n",
        Ipv4Addr::new(10, 251, 78, 2),
        Ipv4Addr::new(10, 251, 78, 254),
        net.host_if,
        work.join("udhcpd.leases").display(),
        work.join("udhcpd.pid").display(),
    );
    for i in 0..=CLIENTS {
        let ip = Ipv4Addr::new(10, 251, 78, 2 + i as u8);
        let _ = writeln!(conf, "static_lease {} {ip}", format_mac(&mac(i)));
    }
    let path = work.join("udhcpd.conf");
    std::fs::write(&path, conf).map_err(io(format!("write {}", path.display())))?;
    std::fs::write(work.join("udhcpd.leases"), b"").map_err(io("write udhcpd.leases"))?;
    let child = Command::new("busybox")
        .args(["udhcpd", "-f", "-a", "100"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("start busybox udhcpd"))?;
    let mut server = Proc(child);
    let result = client.run_all();
    if let Ok(Some(status)) = server.0.try_wait() {
        return Err(BenchError::Bad(format!("udhcpd exited: {status}")));
    }
    drop(server);
    result
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `p`-th percentile (nearest rank) of `v`, sorted in place.
fn percentile(v: &mut [Duration], p: usize) -> Duration {
    v.sort_unstable();
    let rank = (v.len() * p).div_ceil(100).max(1);
    v[rank - 1]
}

/// p50, p95 and the total of a real-path run, in ms.
fn real_cell(r: &mut Real) -> String {
    let p50 = ms(percentile(&mut r.exchanges, 50));
    let p95 = ms(percentile(&mut r.exchanges, 95));
    let again = if r.retransmits == 0 {
        String::new()
    } else {
        format!(" ({} retransmits)", r.retransmits)
    };
    format!(
        "p50 {p50:.2} ms, p95 {p95:.2} ms, all {CLIENTS} in {:.0} ms{again}",
        ms(r.total)
    )
}

fn run() -> Result<(), BenchError> {
    let args: Vec<String> = std::env::args().collect();
    let Some(work) = args.get(1).map(PathBuf::from) else {
        return Err(BenchError::Bad("usage: dhcp-bench WORK_DIR [TAG]".into()));
    };
    let tag = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| std::process::id().to_string());
    std::fs::create_dir_all(&work).map_err(io("create work dir"))?;
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(BenchError::Bad(
            "needs root (a network namespace, a veth pair, UDP port 67)".into(),
        ));
    }

    let mut p = pure(&work)?;
    let net = Net::new(&tag)?;
    let mut client = Client {
        sock: net.client_socket()?,
        retransmits: 0,
    };
    let mut disk = ours(&net, &mut client, &work)?;
    // The same with the table on tmpfs: the server without the disk's
    // fsync latency (which swings with the machine's other work).
    let shm = PathBuf::from(format!("/dev/shm/kubevmm-dhcp-bench-{tag}"));
    let mut tmpfs = if Path::new("/dev/shm").is_dir() {
        let got = std::fs::create_dir_all(&shm)
            .map_err(io(format!("create {}", shm.display())))
            .and_then(|()| ours(&net, &mut client, &shm));
        let _ = std::fs::remove_dir_all(&shm);
        Some(got?)
    } else {
        None
    };
    let anchor = match Command::new("busybox").arg("udhcpd").arg("--help").output() {
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("Usage: udhcpd") => {
            Some(udhcpd(&net, &mut client, &work))
        }
        _ => None,
    };
    drop(net);

    let median = us(percentile(&mut p.exchanges, 50));
    let round = ms(percentile(&mut p.rounds, 50));
    let (round_min, round_max) = (ms(p.rounds[0]), ms(p.rounds[p.rounds.len() - 1]));
    println!("| what | ours | anchor | target | ratio |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| DHCP DISCOVER → ACK, pure `handle()` ({CLIENTS} reserved MACs, encoded beforehand), median of {PURE_ROUNDS} rounds | {median:.1} µs per exchange, {round:.2} ms per {CLIENTS} [{round_min:.2}-{round_max:.2}] | - | - | - |"
    );
    let mut anchor = match anchor {
        Some(Ok(a)) => Ok(a),
        Some(Err(e)) => Err(format!("busybox udhcpd failed: {e}")),
        None => Err("no anchor on this machine (no busybox udhcpd)".into()),
    };
    let anchor_cell = match &mut anchor {
        Ok(a) => format!("busybox udhcpd (static leases) {}", real_cell(a)),
        Err(e) => e.clone(),
    };
    let mut row = |what: &str, ours: &mut Real| {
        let ratio = match &mut anchor {
            Ok(a) => format!(
                "{:.2}× udhcpd (p50), {:.2}× (all {CLIENTS})",
                percentile(&mut ours.exchanges, 50).as_secs_f64()
                    / percentile(&mut a.exchanges, 50).as_secs_f64(),
                ours.total.as_secs_f64() / a.total.as_secs_f64()
            ),
            Err(_) => "-".into(),
        };
        println!(
            "| DHCP DISCOVER → ACK over a veth, `serve()`, lease table {what}, {CLIENTS} clients one after another | {} | {anchor_cell} | - | {ratio} |",
            real_cell(ours)
        );
    };
    row(
        "on disk, fsync after each change (as the agent runs it)",
        &mut disk,
    );
    if let Some(t) = &mut tmpfs {
        row("on tmpfs (/dev/shm)", t);
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("dhcp bench: {e}");
        std::process::exit(1);
    }
}
