//! kubevmm VMM: one process per KVM guest, on the rust-vmm crates.
//!
//! `Vm::build` turns a [`config::VmConfig`] into a machine, [`run`] boots it
//! and returns why it stopped. The binary `kubevmm-vmm` wraps this.

pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod host_check;
pub mod rss;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use exit::ExitReason;

use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error("cannot create socket {path}: {source}")]
    Socket {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    EventLoop(#[from] event_loop::EventLoopError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
}

/// Builds and runs a VM until the guest stops; returns why it stopped.
pub fn run(config: VmConfig) -> Result<ExitReason, RunError> {
    let started = Instant::now();
    let bind = |path: &std::path::PathBuf| {
        vm::bind_unix(path).map_err(|source| RunError::Socket {
            path: path.clone(),
            source,
        })
    };
    let endpoints = event_loop::Endpoints {
        api: config.api_socket.as_ref().map(bind).transpose()?,
        console: match config.serial.mode {
            config::SerialMode::Socket => config.serial.path.as_ref().map(bind).transpose()?,
            _ => None,
        },
    };
    let filters = if config.seccomp {
        Some(seccomp::Filters::build()?)
    } else {
        None
    };
    let mut machine = vm::Vm::build(config)?;
    machine.start_vcpus(filters.clone())?;
    if let Some(f) = &filters {
        f.apply()?;
    }
    let reason = event_loop::run(&machine, &endpoints, started)?;
    for (path, listener) in [
        (&machine.config.api_socket, &endpoints.api),
        (&machine.config.serial.path, &endpoints.console),
    ] {
        if let (Some(p), Some(_)) = (path, listener) {
            // Best effort: a stale socket is removed again at the next start.
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(reason)
}
