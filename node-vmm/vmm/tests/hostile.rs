//! A hostile guest against its own VMM (tests/guests/hostile.c): a TX
//! descriptor of ~4 GiB, an rng request of 16 MiB, 2000 log-worthy
//! activations. The VMM must stay small, log little, answer its API, and a
//! VM beside it must run on (DESIGN.md, "Security model").

mod common;

use common::*;
use kubevmm_vmm::config::NetConfig;
use kubevmm_vmm::exit::code;

/// The VMM's own peak: guest RAM the guest touched (a few MiB of 64), the
/// VMM's code, heap and buffers. Before the TX bound this was over 4 GiB.
const MAX_VMM_HWM_KIB: u64 = 256 << 10;
/// Guest-triggered log lines: the rate limiter allows ten a minute per
/// device, the attack triggers thousands.
const MAX_LOG_LINES: usize = 40;

fn ticks(dir: &std::path::Path) -> usize {
    serial_log(dir).matches("tick ").count()
}

/// A field of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn hostile_guest_cannot_grow_its_vmm_flood_its_log_or_stop_a_neighbour() {
    let ndir = scratch("neighbour");
    let neighbour = spawn(&config("counter", &ndir), &ndir);
    wait_for("the neighbour's ticks", || (ticks(&ndir) > 2).then_some(()));

    let ns = Netns::new("hostile");
    let dir = scratch("hostile");
    let sock = dir.join("api.sock");
    let mut c = config("hostile", &dir);
    c.api_socket = Some(sock.clone());
    c.rng = true;
    c.nets.push(NetConfig {
        id: "lan".into(),
        tap: Some("tap0".into()),
        fd: None,
        mac: "52:54:00:12:34:56".into(),
    });
    let child = spawn_with(ns.vmm_command(), &c, &dir, "vm.json");
    // `ip netns exec` execs the VMM in place: the child is the VMM.
    let pid = child.id();
    wait_for("the hostile guest to finish", || {
        let serial = serial_log(&dir);
        assert!(!serial.contains("FAIL"), "{serial}");
        serial.contains("hostile done").then_some(())
    });
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(
        exe.ends_with("kubevmm-vmm"),
        "pid {pid} is {}",
        exe.display()
    );
    let hwm = status_kib(pid, "VmHWM");
    let rss = status_kib(pid, "VmRSS");

    let (status, stats) = api(&sock, "GET", "/vm/stats");
    assert_eq!(status, 200, "the VMM's API still answers");
    let counters = |kind: &str| {
        stats["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["kind"] == kind)
            .unwrap()["counters"]
            .clone()
    };
    let net = counters("net");
    let rng = counters("rng");

    // The neighbour kept running through all of it.
    let seen = ticks(&ndir);
    wait_for("the neighbour to tick on", || {
        (ticks(&ndir) > seen + 2).then_some(())
    });

    let (status, _) = api(&sock, "PUT", "/vm/stop");
    assert_eq!(status, 200);
    let out = wait(child, &dir);
    assert_eq!(out.code, Some(code::STOPPED), "{out:?}");
    drop(neighbour);

    assert!(
        hwm < MAX_VMM_HWM_KIB,
        "VMM peak RSS {hwm} KiB (now {rss} KiB) after the hostile guest; stderr:\n{}",
        out.stderr
    );
    assert_eq!(net["tx_dropped"], 3, "{net}");
    assert_eq!(net["tx_frames"], 0, "{net}");
    let got: u64 = out
        .serial
        .split("rng request of 16 MiB got ")
        .nth(1)
        .and_then(|s| s.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no rng line: {out:?}"));
    assert!(got <= 64 * 1024, "one rng request got {got} bytes");
    assert_eq!(rng["bytes"], got, "{rng}");
    let lines = out.stderr.lines().count();
    assert!(
        lines <= MAX_LOG_LINES,
        "{lines} log lines from the hostile guest:\n{}",
        out.stderr
    );
    assert!(out.serial.contains("2000 activations"), "{out:?}");
}
