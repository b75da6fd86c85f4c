//! The control API on a unix socket, against a running guest.

mod common;

use std::time::Duration;

use common::*;
use kubevmm_vmm::exit::code;

fn ticks(dir: &std::path::Path) -> usize {
    serial_log(dir).matches("tick ").count()
}

#[test]
fn acpi_shutdown_over_api_powers_guest_off() {
    let dir = scratch("api-shutdown");
    let sock = dir.join("api.sock");
    let mut c = config("counter", &dir);
    c.api_socket = Some(sock.clone());
    let child = spawn(&c, &dir);
    wait_for("ticks", || (ticks(&dir) > 2).then_some(()));
    let (status, body) = api(&sock, "GET", "/vm");
    assert_eq!(status, 200);
    assert_eq!(body["state"], "running");
    let (status, _) = api(&sock, "PUT", "/vm/shutdown");
    assert_eq!(status, 200);
    let out = wait(child, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    assert!(out.serial.contains("power button pressed"), "{out:?}");
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let dir = scratch("api-pause");
    let sock = dir.join("api.sock");
    let mut c = config("counter", &dir);
    c.api_socket = Some(sock.clone());
    let child = spawn(&c, &dir);
    wait_for("ticks", || (ticks(&dir) > 2).then_some(()));
    let (status, body) = api(&sock, "PUT", "/vm/pause");
    assert_eq!(status, 200);
    assert_eq!(body["state"], "paused");
    let paused_at = ticks(&dir);
    // While paused, no vCPU runs: the tick count must not move.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ticks(&dir), paused_at, "guest kept running while paused");
    let (_, stats_paused) = api(&sock, "GET", "/vm/stats");
    let (status, body) = api(&sock, "PUT", "/vm/resume");
    assert_eq!(status, 200);
    assert_eq!(body["state"], "running");
    wait_for("ticks after resume", || {
        (ticks(&dir) > paused_at + 2).then_some(())
    });

    let (status, stats) = api(&sock, "GET", "/vm/stats");
    assert_eq!(status, 200);
    // The guest polls the UART and PM1_STS (port reads exit; its
    // console writes may be queued by KVM instead, see `coalesced`).
    let io_in = |s: &serde_json::Value| s["vcpus"][0]["exits"]["io_in"].as_u64().unwrap();
    assert!(io_in(&stats) > io_in(&stats_paused));
    let tx = |s: &serde_json::Value| s["serial_tx_bytes"].as_u64().unwrap();
    assert!(tx(&stats) > tx(&stats_paused));
    assert!(stats["vcpus"][0]["run_ns"].as_u64().unwrap() > 0);
    assert!(stats["serial_tx_bytes"].as_u64().unwrap() > 0);
    let overhead = stats["vmm_overhead_rss_bytes"].as_u64().unwrap();
    assert!(overhead > 0 && overhead < stats["vmm_rss_bytes"].as_u64().unwrap() + 1);

    let (status, _) = api(&sock, "GET", "/nope");
    assert_eq!(status, 404);
    let (status, _) = api(&sock, "PUT", "/vm/stop");
    assert_eq!(status, 200);
    let out = wait(child, &dir);
    assert_eq!(out.code, Some(code::STOPPED), "{out:?}");
}
