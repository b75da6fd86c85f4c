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
