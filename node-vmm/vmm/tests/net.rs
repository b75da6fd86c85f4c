//! virtio-net against a host tap inside a network namespace made by the
//! test. Frames go both ways: the host kernel ARPs for the guest and sends
//! it UDP datagrams (host → guest); the guest answers the ARP and echoes
//! each datagram with IP and UDP checksums it computed itself (guest → host),
//! which the host kernel verifies before the test's socket sees the echo.
//!
//! Why an earlier version of this test never saw the host learn the guest's
//! MAC: the `demo` guest powered off right after answering ARP, the VMM
//! closed the tap, the tap lost carrier and the kernel flushed every
//! neighbour entry of the device (`neigh_carrier_down`). The reply itself was
//! fine. Here the guest stays up until told to quit, and the neighbour entry
//! is checked while it runs.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use kubevmm_vmm::config::NetConfig;
use kubevmm_vmm::exit::code;

const GUEST_MAC: &str = "52:54:00:12:34:56";
const GUEST: &str = "10.0.2.15:7";

/// Sends `msg` to the guest until its echo comes back (the first datagrams
/// wait for ARP or are dropped while the guest boots). Late echoes of
/// earlier messages are skipped; anything else is reported on timeout.
fn echo(sock: &UdpSocket, msg: &str, deadline: Instant, dir: &std::path::Path) {
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let want = format!("echo: {msg}");
    let mut others = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        assert!(
            Instant::now() < deadline,
            "no echo of {msg:?} from the guest (other replies: {others:?}); serial:\n{}",
            serial_log(dir)
        );
        sock.send_to(msg.as_bytes(), GUEST).unwrap();
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    assert_eq!(from, GUEST.parse::<SocketAddr>().unwrap());
                    let got = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if got == want {
                        return;
                    }
                    others.push(got);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("recv from the guest: {e}"),
            }
        }
    }
}

fn nic(tap: &str) -> NetConfig {
    NetConfig {
        id: "lan".into(),
        tap: Some(tap.into()),
        fd: None,
        mac: GUEST_MAC.into(),
    }
}

#[test]
fn net_exchanges_frames_with_a_host_tap() {
    let dir = scratch("net");
    let ns = Netns::new("net");
    let mut c = config("netecho", &dir);
    c.nets.push(nic("tap0"));
    let vmm = spawn_with(ns.vmm_command(), &c, &dir, "vm.json");
    wait_for("the guest's NIC", || {
        serial_log(&dir).contains("netecho: NIC up").then_some(())
    });

    // A second VMM on the same tap is refused with a clear message.
    let dir2 = scratch("net-busy");
    let mut c2 = config("hello", &dir2);
    c2.nets.push(nic("tap0"));
    let busy = wait(spawn_with(ns.vmm_command(), &c2, &dir2, "vm.json"), &dir2);
    assert_eq!(busy.code, Some(code::VMM_ERROR), "{busy:?}");
    assert!(busy.stderr.contains("tap0 is busy"), "{busy:?}");

    let sock = ns.udp_socket();
    let deadline = Instant::now() + HANG_GUARD;
    let nonce = format!("hello {}", std::process::id());
    echo(&sock, &nonce, deadline, &dir);

    // The host learnt the guest's MAC from its ARP reply (checked while the
    // guest still holds the tap: losing carrier flushes the entry).
    let neigh = ip(&["-n", &ns.0, "neigh", "show", "10.0.2.15", "dev", "tap0"]);
    assert!(
        neigh.contains(GUEST_MAC) && !neigh.contains("INCOMPLETE"),
        "neighbour entry: {neigh}"
    );
    let link = ip(&["-n", &ns.0, "-s", "-j", "link", "show", "tap0"]);
    let link: serde_json::Value = serde_json::from_str(&link).unwrap();
    let stats = &link[0]["stats64"];
    assert!(stats["rx"]["packets"].as_u64().unwrap() >= 2, "{stats}");
    assert!(stats["tx"]["packets"].as_u64().unwrap() >= 2, "{stats}");

    // A bigger datagram, then quit: the guest powers off after echoing it.
    let big = "x".repeat(1200);
    echo(&sock, &big, deadline, &dir);
    echo(&sock, "quit", deadline, &dir);
    let out = wait(vmm, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    assert!(out.serial.contains("netecho: ARP reply sent"), "{out:?}");
    assert!(
        out.serial.contains(&format!("netecho: got \"{nonce}\"")),
        "{out:?}"
    );
    assert!(out.serial.contains("netecho: done"), "{out:?}");
}

#[test]
fn demo_guest_reads_its_disk_and_answers_arp() {
    let dir = scratch("demo");
    let ns = Netns::new("demo");
    let disk = dir.join("disk.img");
    let mut sector = b"hello from the demo disk".to_vec();
    sector.resize(4096, 0);
    std::fs::write(&disk, &sector).unwrap();
    let mut c = config("demo", &dir);
    // "wait": stay up after answering ARP until the ACPI power button.
    c.cmdline = "arp wait".into();
    c.api_socket = Some(dir.join("api.sock"));
    c.disks.push(kubevmm_vmm::config::DiskConfig {
        id: "root".into(),
        path: disk,
        read_only: true,
        serial: None,
        fd: None,
        backing_fds: Vec::new(),
        format: None,
    });
    c.nets.push(nic("tap0"));
    let vmm = spawn_with(ns.vmm_command(), &c, &dir, "vm.json");
    wait_for("the guest's NIC", || {
        serial_log(&dir).contains("NIC up").then_some(())
    });
    let sock = ns.udp_socket();
    wait_for("the guest's ARP reply", || {
        // Any datagram makes the host kernel ARP for the guest.
        let _ = sock.send_to(b"ping", GUEST);
        let neigh = ip(&["-n", &ns.0, "neigh", "show", "10.0.2.15", "dev", "tap0"]);
        if neigh.contains(GUEST_MAC) {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(300));
        None
    });
    wait_for("the guest to wait for ACPI", || {
        serial_log(&dir)
            .contains("waiting for ACPI shutdown")
            .then_some(())
    });
    let (status, _) = api(&dir.join("api.sock"), "PUT", "/vm/shutdown");
    assert_eq!(status, 200);
    let out = wait(vmm, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    assert!(
        out.serial
            .contains("demo: disk says: hello from the demo disk"),
        "{out:?}"
    );
    assert!(out.serial.contains("demo: ARP answered"), "{out:?}");
}
