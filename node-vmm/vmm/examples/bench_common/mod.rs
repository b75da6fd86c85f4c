//! What the VMM's bench examples share: QEMU microvm's command line, the
//! anchor they all compare with, and a child process killed on drop.

// Each example uses the part it needs.
#![allow(dead_code)]

use std::process::{Child, Command};

/// QEMU microvm as every bench runs it: qboot, KVM, the host's CPU without
/// the arch-capabilities MSR (software KVM lacks it), no default devices,
/// the serial port on stdio, `mem` of RAM. The caller adds devices,
/// `-kernel` and `-append`.
pub fn qemu_microvm<'c>(cmd: &'c mut Command, mem: &str) -> &'c mut Command {
    cmd.args([
        "-M",
        "microvm",
        "-bios",
        "/usr/share/qemu/qboot.rom",
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-m",
        mem,
    ])
}

/// A child process, killed and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
