//! The real thing: `serve()` on the host end of a veth pair, busybox
//! `udhcpc` in a network namespace on the other end. Needs root (network
//! namespaces, veth, port 67) and fails, saying so, without it.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kubevmm_dhcp::{serve, Config, Event, LeaseState, Leases, Mac, MessageType, Stats};

const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 251, 77, 0);
const GW: Ipv4Addr = Ipv4Addr::new(10, 251, 77, 1);
const VM_MAC: Mac = [0x52, 0x54, 0x00, 0x77, 0x00, 0x01];
const ADMIN_MAC: Mac = [0x52, 0x54, 0x00, 0x77, 0x00, 0x99];

/// Prints every event as one line: `EV <event>|ip=..|subnet=..|...`, and
/// configures the address like a real client so renewals (unicast) work.
const SCRIPT: &str = r#"#!/bin/sh
echo "EV $1|ip=$ip|subnet=$subnet|mask=$mask|router=$router|dns=$dns|hostname=$hostname|domain=$domain|lease=$lease|mtu=$mtu|serverid=$serverid"
case "$1" in
  deconfig) ip -4 addr flush dev "$interface" ;;
  bound|renew) ip -4 addr replace "$ip/${mask:-24}" dev "$interface" ;;
esac
exit 0
"#;

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace with one end of a veth pair; the other end on the host with
/// the gateway address. Removed on drop.
struct Net {
    ns: String,
    host_if: String,
    ns_if: String,
    dir: PathBuf,
}

impl Net {
    fn new() -> Self {
        let id = std::process::id();
        let net = Self {
            ns: format!("kvdhcp-test-{id}"),
            host_if: format!("kvdh{id}"),
            ns_if: format!("kvdc{id}"),
            dir: std::env::temp_dir().join(format!("kubevmm-dhcp-netns-{id}")),
        };
        let _ = std::fs::remove_dir_all(&net.dir);
        std::fs::create_dir_all(&net.dir).unwrap();
        let script = net.dir.join("script.sh");
        std::fs::write(&script, SCRIPT).unwrap();
        sh(&["chmod", "755", script.to_str().unwrap()]);
        sh(&["ip", "netns", "add", &net.ns]);
        sh(&[
            "ip",
            "link",
            "add",
            &net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &net.ns_if,
        ]);
        sh(&["ip", "link", "set", &net.ns_if, "netns", &net.ns]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{GW}/24"),
            "dev",
            &net.host_if,
        ]);
        sh(&["ip", "link", "set", &net.host_if, "up"]);
        net.exec(&["ip", "link", "set", "lo", "up"]);
        net.set_mac(VM_MAC);
        net
    }

    fn exec(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", &self.ns];
        full.extend_from_slice(args);
        sh(&full);
    }

    fn set_mac(&self, mac: Mac) {
        self.exec(&["ip", "link", "set", &self.ns_if, "down"]);
        self.exec(&[
            "ip",
            "link",
            "set",
            &self.ns_if,
            "address",
            &kubevmm_dhcp::format_mac(&mac),
        ]);
        self.exec(&["ip", "link", "set", &self.ns_if, "up"]);
    }

    /// `udhcpc` in the namespace with our script; extra flags appended.
    /// `ip netns exec` execs busybox in place, so the child's pid is
    /// udhcpc's (for signals).
    fn udhcpc(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "busybox", "udhcpc"])
            .args(["-f", "-n", "-t", "5", "-T", "1", "-i", &self.ns_if, "-s"])
            .arg(self.dir.join("script.sh"))
            .args(extra);
        cmd
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `EV` line of the script, as a map.
#[derive(Debug)]
struct Ev {
    event: String,
    vars: std::collections::HashMap<String, String>,
}

impl Ev {
    fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("EV ")?;
        let mut parts = rest.split('|');
        let event = parts.next()?.to_string();
        let vars = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Self { event, vars })
    }

    fn var(&self, key: &str) -> &str {
        self.vars.get(key).map_or("", String::as_str)
    }
}

/// The `bound` event of a udhcpc that ran to the end.
fn bound_of(out: &std::process::Output) -> Ev {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(Ev::parse)
        .find(|e| e.event == "bound")
        .unwrap_or_else(|| {
            panic!(
                "udhcpc got no lease:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// The script's lines of a running udhcpc, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_ev(rx: &mpsc::Receiver<String>, want: &str) -> Ev {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {want:?} event from udhcpc within 30s"));
        if let Some(ev) = Ev::parse(&line) {
            if ev.event == want {
                return ev;
            }
        }
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    sh(&["kill", &format!("-{sig}"), &child.id().to_string()]);
}

/// Runs a udhcpc that exits by itself (`-q`/`-n`), killed after 60 s.
fn run_bounded(mut cmd: Command) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (done, waited) = mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        if waited.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    });
    let output = child.wait_with_output().unwrap();
    let _ = done.send(());
    let _ = killer.join();
    output
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn recv_event(
    rt: &tokio::runtime::Runtime,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Event {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), rx.recv()).await })
        .expect("an event from the server within 10s")
        .expect("the server is running")
}

fn check_options(ev: &Ev, ip: Ipv4Addr, hostname: &str) {
    assert_eq!(ev.var("ip"), ip.to_string(), "{ev:?}");
    assert_eq!(ev.var("subnet"), "255.255.255.0", "{ev:?}");
    assert_eq!(ev.var("router"), GW.to_string(), "{ev:?}");
    assert_eq!(ev.var("dns"), "10.251.77.1 10.251.77.53", "{ev:?}");
    assert_eq!(ev.var("hostname"), hostname, "{ev:?}");
    assert_eq!(ev.var("domain"), "vms.test", "{ev:?}");
    assert_eq!(ev.var("lease"), "600", "{ev:?}");
    assert_eq!(ev.var("mtu"), "1400", "{ev:?}");
    assert_eq!(ev.var("serverid"), GW.to_string(), "{ev:?}");
}

#[test]
#[allow(clippy::too_many_lines)]
fn udhcpc_in_a_namespace_gets_a_stable_address_and_every_option() {
    assert!(
        is_root(),
        "this test needs root: it creates a network namespace and a veth pair \
         and binds UDP port 67 (run the tests as root, as CI does)"
    );
    let net = Net::new();
    let cfg = Config::new(
        SUBNET,
        24,
        GW,
        vec![GW, Ipv4Addr::new(10, 251, 77, 53)],
        Duration::from_secs(600),
        Some(1400),
        Some("vms.test".into()),
    )
    .unwrap();
    let path = net.dir.join("state").join("leases.json");
    let mut table = Leases::load(&path, &cfg).unwrap();
    let stable = table
        .reserve(VM_MAC, "default/web-1/net0", "web-1")
        .unwrap();
    assert_eq!(stable, Ipv4Addr::new(10, 251, 77, 2));
    table.save().unwrap();
    let leases = Arc::new(Mutex::new(table));
    let stats = Arc::new(Stats::default());
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.spawn(serve(
        &net.host_if,
        cfg.clone(),
        Arc::clone(&leases),
        tx,
        Arc::clone(&stats),
    ));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !server.is_finished(),
        "serve() stopped: {:?}",
        rt.block_on(server)
    );

    // 1. Obtain a lease and quit (-q; busybox sends no RELEASE then).
    let out = run_bounded(net.udhcpc(&["-q"]));
    let bound = bound_of(&out);
    check_options(&bound, stable, "web-1");
    assert_eq!(
        recv_event(&rt, &mut events),
        Event::Bound {
            mac: VM_MAC,
            ip: stable
        }
    );
    let on_disk = Leases::load(&path, &cfg).unwrap();
    assert_eq!(
        on_disk.get(VM_MAC).unwrap().state,
        LeaseState::Bound,
        "saved"
    );

    // 2. Again, staying up: the same address; renew (unicast), release.
    let mut child = net
        .udhcpc(&[])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut child);
    let bound = next_ev(&lines, "bound");
    check_options(&bound, stable, "web-1");
    assert_eq!(
        recv_event(&rt, &mut events),
        Event::Bound {
            mac: VM_MAC,
            ip: stable
        }
    );
    assert_eq!(lock(&leases).bound(VM_MAC), Some(stable));
    let acks = stats.sent(MessageType::Ack);
    signal(&child, libc::SIGUSR1);
    let renew = next_ev(&lines, "renew");
    check_options(&renew, stable, "web-1");
    // The server counts a reply once sent, which may be after the client
    // has it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stats.sent(MessageType::Ack) == acks && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        stats.sent(MessageType::Ack),
        acks + 1,
        "the renewal was ACKed"
    );
    signal(&child, libc::SIGUSR2);
    next_ev(&lines, "deconfig");
    assert_eq!(
        recv_event(&rt, &mut events),
        Event::Released {
            mac: VM_MAC,
            ip: stable
        }
    );
    let _ = child.kill();
    let _ = child.wait();
    // Saved after the release: the reservation is back to Reserved on disk.
    let on_disk = Leases::load(&path, &cfg).unwrap();
    let lease = on_disk.get(VM_MAC).unwrap();
    assert_eq!((lease.ip, lease.state), (stable, LeaseState::Reserved));
    assert_eq!(lease.owner.as_deref(), Some("default/web-1/net0"));
    assert_eq!(lock(&leases).bound(VM_MAC), None);

    // 3. After the release: the same address for the same MAC.
    let out = run_bounded(net.udhcpc(&["-q"]));
    check_options(&bound_of(&out), stable, "web-1");
    assert_eq!(
        recv_event(&rt, &mut events),
        Event::Bound {
            mac: VM_MAC,
            ip: stable
        }
    );

    // 4. An unknown MAC (an admin's veth): a dynamic lease from the top.
    net.set_mac(ADMIN_MAC);
    let out = run_bounded(net.udhcpc(&["-q"]));
    let bound = bound_of(&out);
    assert_eq!(bound.var("ip"), "10.251.77.254");
    assert_eq!(
        bound.var("hostname"),
        "",
        "no host name for unknown clients"
    );
    let dynamic = Ipv4Addr::new(10, 251, 77, 254);
    assert_eq!(
        recv_event(&rt, &mut events),
        Event::Bound {
            mac: ADMIN_MAC,
            ip: dynamic
        }
    );
    let on_disk = Leases::load(&path, &cfg).unwrap();
    assert_eq!(
        on_disk.get(ADMIN_MAC).map(|l| (l.ip, l.owner.clone())),
        Some((dynamic, None))
    );

    assert!(stats.received(MessageType::Discover) >= 3);
    assert!(stats.received(MessageType::Request) >= 4);
    assert!(stats.received(MessageType::Release) >= 1);
    assert!(stats.sent(MessageType::Offer) >= 3);
    assert_eq!(stats.drops.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(
        stats.save_errors.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    server.abort();
    drop(rt);
}

fn lock(leases: &Mutex<Leases>) -> std::sync::MutexGuard<'_, Leases> {
    leases.lock().unwrap()
}
