//! 8250 UART (COM1) on vm-superio, with output to stdout, a file, a unix
//! socket or nowhere, and its interrupt wired through an irqfd.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot open serial log file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("cannot create serial interrupt eventfd: {0}")]
    EventFd(io::Error),
}

/// Raises the UART interrupt by writing its irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Clients attached to a socket console. Writes go to all of them; a client
/// that fails a write is dropped.
#[derive(Debug, Clone, Default)]
pub struct SocketClients(pub Arc<Mutex<Vec<UnixStream>>>);

/// Where guest output goes.
#[derive(Debug)]
pub enum SerialSink {
    Stdout,
    File(File),
    Socket(SocketClients),
    Null,
}

impl SerialSink {
    pub fn file(path: &Path) -> Result<Self, SerialError> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(SerialSink::File)
            .map_err(|source| SerialError::File {
                path: path.to_owned(),
                source,
            })
    }
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialSink::Stdout => io::stdout().lock().write(buf),
            SerialSink::File(f) => f.write(buf),
            SerialSink::Socket(clients) => {
                let mut clients = clients.0.lock().expect("console clients lock poisoned");
                clients.retain_mut(|c| c.write_all(buf).is_ok());
                Ok(buf.len())
            }
            SerialSink::Null => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialSink::Stdout => io::stdout().lock().flush(),
            SerialSink::File(f) => f.flush(),
            SerialSink::Socket(_) | SerialSink::Null => Ok(()),
        }
    }
}

/// A sink plus an optional copy of everything to a log file.
#[derive(Debug)]
pub struct Tee {
    pub sink: SerialSink,
    pub log: Option<File>,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(log) = &mut self.log {
            // A full or broken log must not take the console down.
            let _ = log.write_all(buf);
        }
        self.sink.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

/// COM1 as a bus device.
#[derive(Debug)]
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, Tee>,
    /// Bytes written by the guest (stats).
    pub tx_bytes: u64,
}

impl SerialDevice {
    pub fn new(sink: SerialSink, log: Option<&Path>) -> Result<(Self, EventFd), SerialError> {
        let log = match log {
            Some(path) => match SerialSink::file(path)? {
                SerialSink::File(f) => Some(f),
                _ => None,
            },
            None => None,
        };
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let irq = evt.try_clone().map_err(SerialError::EventFd)?;
        Ok((
            Self {
                uart: Serial::new(IrqTrigger(irq), Tee { sink, log }),
                tx_bytes: 0,
            },
            evt,
        ))
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            if offset == 0 {
                self.tx_bytes += 1;
            }
            // Output errors (closed stdout, full disk) must not stop the guest.
            let _ = self.uart.write(offset as u8, b);
        }
    }
}
