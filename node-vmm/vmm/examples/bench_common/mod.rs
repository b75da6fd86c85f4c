//! What the VMM's bench examples share: QEMU microvm's command line, the
//! anchor they all compare with, and a child process killed on drop.

// Each example uses the part it needs.
#![allow(dead_code)]

use std::process::{Child, Command};

/// One error type for the benches: what failed, in words.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Bad(String),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// Maps an I/O error to `BenchError::Io` saying what was being done.
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BenchError {
    move |source| BenchError::Kvm { what, source }
}

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

/// A one-vCPU machine booting `kernel` with `ram` bytes and `cmdline`, its
/// serial port on the VMM's stdout.
pub fn stdout_config(kernel: &std::path::Path, ram: u64, cmdline: &str) -> kubevmm_vmm::VmConfig {
    let mut c = kubevmm_vmm::VmConfig::new(kernel, ram);
    c.cmdline = cmdline.into();
    c.serial = kubevmm_vmm::config::SerialConfig {
        mode: kubevmm_vmm::config::SerialMode::Stdout,
        path: None,
        log: None,
        ..kubevmm_vmm::config::SerialConfig::default()
    };
    c
}

/// A child process, killed and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
