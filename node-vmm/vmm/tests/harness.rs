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
