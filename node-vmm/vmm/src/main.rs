//! `kubevmm-vmm`: runs one KVM guest described by a JSON `VmConfig`.
//!
//! Exit codes: 0 guest powered off, 1 VMM/config error, 2 guest crashed,
//! 3 guest rebooted (`on_reboot` = exit), 4 stopped through the API.

use std::path::PathBuf;
use std::process::ExitCode;

use kubevmm_vmm::boot_trace::{self, Step};
use kubevmm_vmm::config::OnReboot;
use kubevmm_vmm::exit::code;
use kubevmm_vmm::{ExitReason, VmConfig};

const USAGE: &str = "usage: kubevmm-vmm --config FILE.json [--api-sock PATH] [--trace-boot]";

struct Args {
    config: PathBuf,
    api: Option<PathBuf>,
    /// Report when each start-up step ended (`boot_trace`).
    trace_boot: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut config = None;
    let mut api = None;
    let mut trace_boot = false;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--config") => config = args.next().map(PathBuf::from),
            Some("--api-sock") => api = args.next().map(PathBuf::from),
            Some("--trace-boot") => trace_boot = true,
            Some("--help" | "-h") => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {a:?}\n{USAGE}")),
        }
    }
    Ok(Args {
        config: config.ok_or(USAGE)?,
        api,
        trace_boot,
    })
}

fn main() -> ExitCode {
    let main_ns = boot_trace::monotonic_ns();
    let Args {
        config: config_path,
        api,
        trace_boot,
    } = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("kubevmm-vmm: {msg}");
            return ExitCode::from(code::VMM_ERROR as u8);
        }
    };
    if trace_boot {
        boot_trace::enable(main_ns);
    }
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
    if let Err(e) = config.validate() {
        eprintln!("kubevmm-vmm: {e}");
        return ExitCode::from(code::VMM_ERROR as u8);
    }
    boot_trace::mark(Step::Config);
    if let Some(jail) = &config.jail {
        // Before any thread and any guest input: see `jail`.
        kubevmm_vmm::rss::preopen();
        if let Err(e) = kubevmm_vmm::jail::enter(jail) {
            eprintln!("kubevmm-vmm: {e}");
            return ExitCode::from(code::VMM_ERROR as u8);
        }
    }
    if config.on_reboot == OnReboot::Restart {
        return ExitCode::from(supervise(&config) as u8);
    }
    ExitCode::from(run_once(config) as u8)
}

/// Runs the machine in this process; returns the exit code.
fn run_once(config: VmConfig) -> i32 {
    let reason = match kubevmm_vmm::run(config) {
        Ok(r) => r,
        Err(e) => ExitReason::Error(e.to_string()),
    };
    if reason != ExitReason::PowerOff {
        eprintln!("kubevmm-vmm: {}", reason.describe());
    }
    reason.code()
}

/// `on_reboot = restart`: this process stays a small unfiltered supervisor
/// (same pid for the caller) and boots each incarnation of the machine in a
/// forked child, which installs its own seccomp filter. A guest reboot
/// starts a fresh machine; any other outcome ends the supervisor with the
/// child's exit code.
fn supervise(config: &VmConfig) -> i32 {
    loop {
        // SAFETY: no other threads exist yet in this process, so the child
        // may run arbitrary code after fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            eprintln!(
                "kubevmm-vmm: fork failed: {}",
                std::io::Error::last_os_error()
            );
            return code::VMM_ERROR;
        }
        if pid == 0 {
            // SAFETY: prctl with constant arguments; the machine dies with its supervisor.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            std::process::exit(run_once(config.clone()));
        }
        let mut status = 0;
        // SAFETY: waits for our own child, writing into a local.
        while unsafe { libc::waitpid(pid, &raw mut status, 0) } < 0 {
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return code::VMM_ERROR;
            }
        }
        let rc = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            eprintln!(
                "kubevmm-vmm: machine process killed by signal {}",
                libc::WTERMSIG(status)
            );
            code::VMM_ERROR
        };
        if rc != code::REBOOT {
            return rc;
        }
        eprintln!("kubevmm-vmm: guest rebooted, restarting");
    }
}
