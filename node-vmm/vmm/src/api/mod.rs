//! The per-VM control API: HTTP/1.1 + JSON on a unix socket
//! (docs/vmm-api.md).

pub mod http;

use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::exit::ExitReason;
use crate::vcpu::EXIT_KINDS;
use crate::vm::{DeviceKind, Vm};

/// Serves one connection: one request, one response.
pub fn serve(vm: &Vm, mut stream: UnixStream, started: std::time::Instant) {
    // A stuck client must not stall the event loop for long.
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let (status, body) = match http::read_request(&mut stream) {
        Ok(req) => route(vm, &req.method, &req.path, started),
        Err(e) => (400, json!({"error": e.to_string()})),
    };
    // The client may have gone away; nothing to do about it.
    let _ = http::write_response(&mut stream, status, &body);
}

fn route(vm: &Vm, method: &str, path: &str, started: std::time::Instant) -> (u16, Value) {
    let action = matches!(method, "PUT" | "POST");
    match (path, method) {
        ("/vm", "GET") => (200, status(vm, started)),
        ("/vm/stats", "GET") => (200, stats(vm)),
        ("/vm/pause", _) if action => {
            vm.pause();
            (200, status(vm, started))
        }
        ("/vm/resume", _) if action => {
            vm.resume();
            (200, status(vm, started))
        }
        ("/vm/shutdown", _) if action => {
            vm.resume();
            vm.request_shutdown();
            (200, json!({"result": "ACPI power button pressed"}))
        }
        ("/vm/stop", _) if action => {
            vm.exit.request(ExitReason::Stopped);
            (200, json!({"result": "stopping"}))
        }
        ("/vm" | "/vm/stats" | "/vm/pause" | "/vm/resume" | "/vm/shutdown" | "/vm/stop", _) => (
            405,
            json!({"error": format!("method {method} not allowed on {path}")}),
        ),
        _ => (404, json!({"error": format!("no such endpoint {path}")})),
    }
}

fn status(vm: &Vm, started: std::time::Instant) -> Value {
    json!({
        "state": if vm.gate.is_paused() { "paused" } else { "running" },
        "cpus": vm.config.cpus,
        "memory": vm.config.memory,
        "uptime_ms": started.elapsed().as_millis() as u64,
        "pid": std::process::id(),
    })
}

fn stats(vm: &Vm) -> Value {
    let vcpus: Vec<Value> = vm
        .vcpus
        .iter()
        .map(|v| {
            let exits: serde_json::Map<String, Value> = EXIT_KINDS
                .iter()
                .zip(&v.stats.exits)
                .map(|(k, c)| ((*k).to_owned(), json!(c.load(Ordering::Relaxed))))
                .collect();
            json!({"index": v.index, "run_ns": v.stats.run_ns.load(Ordering::Relaxed), "exits": exits})
        })
        .collect();
    let devices: Vec<Value> = vm
        .virtio
        .iter()
        .map(|d| {
            let t = d.transport.lock().expect("device lock poisoned");
            let counters: serde_json::Map<String, Value> = t
                .device()
                .counters()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), json!(v)))
                .collect();
            let kind = match d.kind {
                DeviceKind::Disk => "disk",
                DeviceKind::Net => "net",
                DeviceKind::Rng => "rng",
            };
            json!({"id": d.id, "kind": kind, "counters": counters})
        })
        .collect();
    let guest: Vec<(u64, u64)> = vm
        .mem
        .iter()
        .filter_map(|r| {
            let start = vm.mem.get_host_address(r.start_addr()).ok()? as u64;
            Some((start, start + r.len()))
        })
        .collect();
    let rss = crate::rss::read_self().unwrap_or_default();
    let overhead = crate::rss::overhead(&rss, &guest);
    // One lock at a time (a vCPU holds the serial one, then the console's).
    let serial_tx_bytes = vm.serial.lock().expect("serial lock poisoned").tx_bytes;
    json!({
        "vcpus": vcpus,
        "devices": devices,
        "serial_tx_bytes": serial_tx_bytes,
        "console_clients": vm.console.clients(),
        "console_clients_too_slow": vm.console.too_slow(),
        "vmm_rss_bytes": rss.iter().map(|m| m.rss).sum::<u64>(),
        "vmm_overhead_rss_bytes": overhead,
    })
}
