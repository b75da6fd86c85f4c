//! The test harness itself: what every VMM test relies on.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A child that writes far more than a pipe buffer (64 KiB) to stdout and
/// stderr is collected whole; reading only after exit would deadlock it.
#[test]
fn wait_collects_output_past_the_pipe_buffer() {
    let dir = scratch("harness");
    let child = Command::new("sh")
        .args([
            "-c",
            "head -c 300000 /dev/zero | tr '\\0' o; head -c 200000 /dev/zero | tr '\\0' e >&2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_within(Vmm::new(child), &dir, Duration::from_secs(20));
    assert_eq!(out.code, Some(0));
    assert_eq!(out.stdout.len(), 300_000);
    assert_eq!(out.stderr.len(), 200_000);
}

/// The pipes are drained from the start, not only once the test waits: a
/// child that writes a lot and then waits for the test (as a VMM whose guest
/// logs before the test looks at it) must not block on a full pipe.
#[test]
fn output_is_drained_before_the_test_waits() {
    let dir = scratch("harness-early");
    let done = dir.join("done");
    let script = format!(
        "head -c 300000 /dev/zero | tr '\\0' e >&2; touch {}; exec sleep 30",
        done.display()
    );
    let child = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut vmm = Vmm::new(child);
    wait_for("the child to finish writing", || {
        done.exists().then_some(())
    });
    vmm.kill().unwrap();
    let out = wait_within(vmm, &dir, Duration::from_secs(20));
    assert_eq!(out.stderr.len(), 300_000);
}
