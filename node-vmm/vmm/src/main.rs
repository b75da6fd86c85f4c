//! `kubevmm-vmm`: runs one KVM guest described by a JSON `VmConfig`.
//!
//! Exit codes: 0 guest powered off, 1 VMM/config error, 2 guest crashed,
//! 3 guest rebooted (`on_reboot` = exit), 4 stopped through the API.

use std::path::PathBuf;
use std::process::ExitCode;

use kubevmm_vmm::config::OnReboot;
use kubevmm_vmm::exit::code;
use kubevmm_vmm::{ExitReason, VmConfig};

const USAGE: &str = "usage: kubevmm-vmm --config FILE.json [--api-sock PATH]";

fn parse_args() -> Result<(PathBuf, Option<PathBuf>), String> {
    let mut config = None;
    let mut api = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--config") => config = args.next().map(PathBuf::from),
            Some("--api-sock") => api = args.next().map(PathBuf::from),
            Some("--help" | "-h") => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {a:?}\n{USAGE}")),
        }
    }
    Ok((config.ok_or(USAGE)?, api))
}

fn main() -> ExitCode {
    let (config_path, api) = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("kubevmm-vmm: {msg}");
            return ExitCode::from(code::VMM_ERROR as u8);
        }
    };
    let mut config = match VmConfig::from_file(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kubevmm-vmm: {e}");
            return ExitCode::from(code::VMM_ERROR as u8);
        }
    };
    if api.is_some() {
        config.api_socket = api;
    }
    let on_reboot = config.on_reboot;
    let reason = match kubevmm_vmm::run(config) {
        Ok(r) => r,
        Err(e) => ExitReason::Error(e.to_string()),
    };
    if reason == ExitReason::Reboot && on_reboot == OnReboot::Restart {
        restart_in_place();
    }
    if reason != ExitReason::PowerOff {
        eprintln!("kubevmm-vmm: {}", reason.describe());
    }
    ExitCode::from(reason.code() as u8)
}

/// Reboot with `on_reboot = restart`: boot a fresh machine in this same
/// process (same pid, same inherited fds) by re-executing ourselves.
fn restart_in_place() -> ! {
    use std::os::unix::process::CommandExt;
    eprintln!("kubevmm-vmm: guest rebooted, restarting in place");
    let err = std::process::Command::new("/proc/self/exe")
        .args(std::env::args_os().skip(1))
        .exec();
    eprintln!("kubevmm-vmm: restart failed: {err}");
    std::process::exit(code::VMM_ERROR);
}
