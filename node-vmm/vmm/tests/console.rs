//! The serial console as a unix socket several clients attach to at once:
//! each sees the guest's output, each may type; with our `echo` guest.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use kubevmm_vmm::config::{SerialConfig, SerialMode};
use kubevmm_vmm::exit::code;

/// A console client that collects what it reads.
struct Client {
    stream: UnixStream,
    seen: String,
}

impl Client {
    fn attach(sock: &Path) -> Self {
        let stream = wait_for("the console socket", || UnixStream::connect(sock).ok());
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Self {
            stream,
            seen: String::new(),
        }
    }

    fn type_line(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
    }

    /// Reads until `want` has been seen (or the hang guard fires).
    fn expect(&mut self, want: &str) {
        let mut buf = [0u8; 256];
        wait_for(&format!("{want:?} on the console"), || {
            if let Ok(n) = self.stream.read(&mut buf) {
                self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            self.seen.contains(want).then_some(())
        });
    }
}

/// The `echo` guest with its console on a socket and a log beside it.
fn echo_guest(tag: &str) -> (PathBuf, PathBuf, Vmm) {
    let dir = scratch(tag);
    let sock = dir.join("console.sock");
    let mut c = config("echo", &dir);
    c.serial = SerialConfig {
        mode: SerialMode::Socket,
        path: Some(sock.clone()),
        log: Some(dir.join("serial.log")),
        ..SerialConfig::default()
    };
    let child = spawn(&c, &dir);
    (dir, sock, child)
}

#[test]
fn two_clients_share_the_console_and_a_typed_command_powers_the_guest_off() {
    let (dir, sock, child) = echo_guest("console-socket");
    let mut a = Client::attach(&sock);
    let mut b = Client::attach(&sock);
    // The log has everything from the start, attached or not.
    wait_for("the guest's banner in the log", || {
        serial_log(&dir).contains("echo guest ready").then_some(())
    });

    a.type_line("hello from a");
    a.expect("echo: hello from a");
    b.expect("echo: hello from a");
    b.type_line("and from b");
    a.expect("echo: and from b");
    b.expect("echo: and from b");

    // A third client that comes and goes changes nothing for the others.
    drop(Client::attach(&sock));
    b.type_line("poweroff");
    a.expect("powering off");
    let out = wait(child, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
    let log = serial_log(&dir);
    for line in [
        "echo guest ready",
        "echo: hello from a",
        "echo: and from b",
        "powering off",
    ] {
        assert!(log.contains(line), "{line:?} in the log:\n{log}");
    }
}

#[test]
fn a_line_longer_than_the_guests_buffer_is_cut_not_overflowed() {
    let (dir, sock, child) = echo_guest("console-long");
    let mut a = Client::attach(&sock);
    wait_for("the banner", || {
        serial_log(&dir).contains("echo guest ready").then_some(())
    });
    // 60 bytes at a time: what the UART's FIFO holds between two ticks.
    for _ in 0..4 {
        a.stream.write_all(&[b'x'; 60]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    a.type_line("");
    // Exactly the buffer's 120 bytes, then the end of the line.
    a.expect(&format!("echo: {}\r", "x".repeat(120)));
    a.type_line("poweroff");
    let out = wait(child, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
}

/// Byte `i` of the uartirq guest's pattern.
fn uart_pattern(n: usize) -> String {
    (0..n)
        .map(|i| {
            if i % 64 == 63 {
                '\n'
            } else {
                char::from(b'A' + (i % 26) as u8)
            }
        })
        .collect()
}

/// Console writes wait in KVM's queue only while the guest does not wait
/// on them: a driver that sends on THR-empty interrupts gets an exit (and
/// its interrupt) for every byte, a polling one does not; both outputs
/// arrive whole and in order.
#[test]
fn interrupt_driven_and_polled_output_both_arrive_and_only_polled_writes_are_queued() {
    let dir = scratch("uartirq");
    let sock = dir.join("api.sock");
    let mut c = config("uartirq", &dir);
    c.api_socket = Some(sock.clone());
    let vmm = spawn(&c, &dir);
    wait_for("the polled part", || {
        serial_log(&dir).contains("uartirq: polled").then_some(())
    });
    let (status, stats) = api(&sock, "GET", "/vm/stats");
    assert_eq!(status, 200);
    let io_out = stats["vcpus"][0]["exits"]["io_out"].as_u64().unwrap();
    let log = serial_log(&dir);
    let irq_part = format!(
        "uartirq: interrupt-driven\r\n{}uartirq: ",
        uart_pattern(512)
    );
    assert!(log.contains(&irq_part), "interrupt-driven part: {log}");
    let counts = log.split("uartirq: ").nth(2).unwrap_or_default();
    let irqs: usize = counts
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no interrupt count in {counts:?}"));
    assert!(
        counts.starts_with(&format!("{irqs} interrupts for 512 bytes\r\n")),
        "{counts:?}"
    );
    // One interrupt per FIFO's worth (16 bytes), give or take the first.
    assert!((31..=40).contains(&irqs), "{irqs} interrupts");
    let polled = format!("{}uartirq: polled 4096 bytes", uart_pattern(4096));
    assert!(log.contains(&polled), "polled part: {log}");
    // Every interrupt-driven byte exited (IER and the rest add a few); the
    // 4096 polled bytes did not, when KVM can queue them.
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    if kvm.check_extension(kvm_ioctls::Cap::CoalescedPio) {
        assert!((512..1000).contains(&io_out), "{io_out} port writes exited");
    } else {
        assert!(io_out > 4096 + 512, "{io_out} port writes exited");
    }
    let (status, _) = api(&sock, "PUT", "/vm/shutdown");
    assert_eq!(status, 200);
    let out = wait(vmm, &dir);
    assert_eq!(out.code, Some(code::POWER_OFF), "{out:?}");
}
