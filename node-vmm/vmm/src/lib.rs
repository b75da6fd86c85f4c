//! kubevmm VMM: one process per KVM guest, on the rust-vmm crates.
//!
//! `Vm::build` turns a [`config::VmConfig`] into a machine, [`run`] boots it
//! and returns why it stopped. The binary `kubevmm-vmm` wraps this.

pub mod api;
pub mod arch;
pub mod boot;
pub mod boot_trace;
pub mod coalesced;
pub mod config;
pub mod console;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod host_check;
pub mod image;
pub mod jail;
pub mod ring;
pub mod rss;
pub mod seccomp;
#[cfg(test)]
mod test_vm;
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
    let api =
        match config.fds.api {
            // SAFETY: the parent handed this listening socket over for the API;
            // `validate` checked it, and it is taken only here.
            Some(fd) => Some(listener_from(unsafe { config::take_handed(fd) }).map_err(
                |source| RunError::Socket {
                    path: config.api_socket.clone().unwrap_or_default(),
                    source,
                },
            )?),
            None => config.api_socket.as_ref().map(bind).transpose()?,
        };
    let console = match (config.serial.mode, config.fds.console) {
        // SAFETY: the parent handed this listening socket over for the
        // console; `validate` checked it, and it is taken only here.
        (config::SerialMode::Socket, Some(fd)) => Some(
            listener_from(unsafe { config::take_handed(fd) }).map_err(|source| {
                RunError::Socket {
                    path: config.serial.path.clone().unwrap_or_default(),
                    source,
                }
            })?,
        ),
        (config::SerialMode::Socket, None) => config.serial.path.as_ref().map(bind).transpose()?,
        _ => None,
    };
    let endpoints = event_loop::Endpoints { api, console };
    // Stats read smaps through an fd opened now: no open after the filter.
    rss::preopen();
    let filters = if config.seccomp {
        Some(seccomp::Filters::build()?)
    } else {
        None
    };
    boot_trace::mark(boot_trace::Step::Seccomp);
    let mut machine = vm::Vm::build(config)?;
    // Stamped as the vCPU threads are started, not after: once started, a
    // vCPU may run and print before this thread is scheduled again, and
    // the report (printed at the first output) would miss this step.
    boot_trace::mark(boot_trace::Step::Threads);
    machine.start_vcpus(filters.clone())?;
    if let Some(f) = &filters {
        f.apply()?;
    }
    // Sockets bound by path stay behind (the filter allows no unlink): the
    // next bind, or whoever started the VMM, removes them.
    let reason = event_loop::run(&machine, &endpoints, started);
    machine.shutdown_devices();
    Ok(reason?)
}

/// A handed-over listening unix socket, non-blocking.
fn listener_from(file: std::fs::File) -> std::io::Result<std::os::unix::net::UnixListener> {
    let l = std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(file));
    l.set_nonblocking(true)?;
    Ok(l)
}
