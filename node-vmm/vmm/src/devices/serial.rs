//! 8250 UART (COM1) on vm-superio, with output to stdout, a file (text or
//! console ring), the clients of a console socket or nowhere, plus an
//! optional copy to a log file; its interrupt wired through an irqfd.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::BusDevice;
use crate::coalesced::{QueuedWrite, Ring, Zone};
use crate::config::SerialFileFormat;
use crate::console::Console;
use crate::ring::{Opened, RingError, RingWriter};

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot open serial file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("serial file {path}: {source}")]
    Ring { path: PathBuf, source: RingError },
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

/// An append-only file that never grows past `limit` bytes: when a write
/// would pass it, the file keeps only its newest `limit / 2` bytes. Work per
/// trim is bounded by the limit, and trims happen at most once per
/// `limit / 2` bytes written, so the cost stays linear in the output.
#[derive(Debug)]
pub struct CappedFile {
    file: File,
    limit: u64,
    size: u64,
}

impl CappedFile {
    pub fn new(file: File, limit: u64) -> Self {
        let size = file.metadata().map_or(0, |m| m.len());
        Self {
            file,
            limit: limit.max(2),
            size,
        }
    }

    /// Keeps the newest half of the file (truncate, then append it back).
    fn trim(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        let keep = (self.limit / 2).min(self.size);
        let mut tail = vec![0u8; keep as usize];
        let n = self.file.read_at(&mut tail, self.size - keep)?;
        tail.truncate(n);
        self.file.set_len(0)?;
        self.file.write_all(&tail)?;
        self.size = tail.len() as u64;
        Ok(())
    }
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // Never more than half the limit at once, so a trim always makes room.
        let take = buf.len().min((self.limit / 2) as usize).max(1);
        if self.size + take as u64 > self.limit {
            self.trim()?;
        }
        let n = self.file.write(&buf[..take])?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A serial output or log file, in either format.
#[derive(Debug)]
pub enum SerialFile {
    Text(CappedFile),
    Ring(RingWriter),
}

impl SerialFile {
    /// Opens (creating) the file at `path`: a text file for appending (and
    /// reading, for trims), a ring for reading and writing in place.
    pub fn open(path: &Path, format: SerialFileFormat, limit: u64) -> Result<Self, SerialError> {
        let mut options = OpenOptions::new();
        options.create(true).read(true);
        match format {
            SerialFileFormat::Text => options.append(true),
            SerialFileFormat::Ring => options.write(true),
        };
        let file = options.open(path).map_err(|source| SerialError::File {
            path: path.to_owned(),
            source,
        })?;
        Self::from_file(file, path, format, limit)
    }

    /// A file the parent opened and handed over (`name` is for messages).
    /// A ring that held something else, or was corrupt, is started anew,
    /// and the VMM says so on stderr.
    pub fn from_file(
        file: File,
        name: &Path,
        format: SerialFileFormat,
        limit: u64,
    ) -> Result<Self, SerialError> {
        match format {
            SerialFileFormat::Text => Ok(Self::Text(CappedFile::new(file, limit))),
            SerialFileFormat::Ring => {
                let (ring, how) = RingWriter::open_or_create(file, limit).map_err(|source| {
                    SerialError::Ring {
                        path: name.to_owned(),
                        source,
                    }
                })?;
                if let Opened::Replaced(why) = how {
                    eprintln!(
                        "kubevmm-vmm: serial file {}: {why}; started a new console ring",
                        name.display()
                    );
                }
                Ok(Self::Ring(ring))
            }
        }
    }
}

impl Write for SerialFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialFile::Text(f) => f.write(buf),
            SerialFile::Ring(r) => r.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialFile::Text(f) => f.flush(),
            SerialFile::Ring(r) => r.flush(),
        }
    }
}

/// Where guest output goes.
#[derive(Debug)]
pub enum SerialSink {
    Stdout,
    File(SerialFile),
    /// Queued for every client of the console socket.
    Socket(Console),
    Null,
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialSink::Stdout => io::stdout().lock().write(buf),
            SerialSink::File(f) => f.write(buf),
            SerialSink::Socket(console) => {
                console.broadcast(buf);
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
    pub log: Option<SerialFile>,
    /// While replaying queued writes: their bytes, written out at once.
    held: Option<Vec<u8>>,
    /// The last `held` buffer, kept for the next replay.
    spare: Vec<u8>,
}

impl Tee {
    pub fn new(sink: SerialSink, log: Option<SerialFile>) -> Self {
        Self {
            sink,
            log,
            held: None,
            spare: Vec::new(),
        }
    }

    fn hold(&mut self) {
        let mut buf = std::mem::take(&mut self.spare);
        buf.clear();
        self.held = Some(buf);
    }

    /// Writes what was held, in one piece.
    fn release(&mut self) {
        if let Some(bytes) = self.held.take() {
            if !bytes.is_empty() {
                let _ = self.pass(&bytes);
                let _ = self.sink.flush();
            }
            self.spare = bytes;
        }
    }

    fn pass(&mut self, buf: &[u8]) -> io::Result<usize> {
        crate::boot_trace::mark(crate::boot_trace::Step::FirstOutput);
        // The log first: whatever a console client is sent is in the log
        // already.
        if let Some(log) = &mut self.log {
            // A full or broken log must not take the console down.
            let _ = log.write_all(buf);
        }
        self.sink.write_all(buf).map(|()| buf.len())
    }
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.held {
            Some(held) => {
                held.extend_from_slice(buf);
                Ok(buf.len())
            }
            None => self.pass(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.held.is_some() {
            return Ok(());
        }
        self.sink.flush()
    }
}

/// COM1 as a bus device.
#[derive(Debug)]
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, Tee>,
    /// Bytes written by the guest (stats).
    pub tx_bytes: u64,
    /// Coalesced writes to the transmit register, when KVM offers them.
    zone: Option<Zone>,
    zone_failed: bool,
}

impl SerialDevice {
    pub fn new(sink: SerialSink, log: Option<SerialFile>) -> Result<(Self, EventFd), SerialError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let irq = evt.try_clone().map_err(SerialError::EventFd)?;
        Ok((
            Self {
                uart: Serial::new(IrqTrigger(irq), Tee::new(sink, log)),
                tx_bytes: 0,
                zone: None,
                zone_failed: false,
            },
            evt,
        ))
    }

    /// Lets KVM queue the guest's writes to the transmit register (see
    /// `coalesced`) while nothing the guest waits for depends on them.
    pub fn coalesce(&mut self, zone: Zone) {
        self.zone = Some(zone);
        self.update_zone();
    }

    /// Coalescing is safe while a transmit-register write has no effect
    /// the guest can wait for: no THR-empty interrupt enabled, and not in
    /// loopback (where the byte comes back as input, with an interrupt).
    fn update_zone(&mut self) {
        let Some(zone) = &mut self.zone else { return };
        let st = self.uart.state();
        let want = coalescing_safe(st.interrupt_enable, st.modem_control);
        if let Err(e) = zone.set(want) {
            // The drain timer still moves queued bytes, only later.
            if !self.zone_failed {
                eprintln!("kubevmm-vmm: serial: {e}");
                self.zone_failed = true;
            }
        }
    }

    /// Replays writes KVM queued, oldest first, as if each had exited.
    pub fn replay(&mut self, port: u64, writes: &[QueuedWrite]) {
        self.uart.writer_mut().hold();
        for w in writes {
            if let Some(offset) = w.addr.checked_sub(port).filter(|o| *o < 8) {
                self.write(offset, w.data());
            }
        }
        self.uart.writer_mut().release();
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
            // IER, MCR: whether the guest now waits on its writes.
            if offset == 1 || offset == 4 {
                self.update_zone();
            }
        }
    }
}

/// KVM's queue of writes to COM1's transmit register (see `coalesced`)
/// and the device they are for. Drained by each vCPU whenever it exits,
/// and by the event loop every `DRAIN_EVERY`, so bytes a guest writes
/// before it halts do not wait for its next exit.
#[derive(Debug)]
pub struct SerialQueue {
    consumer: Mutex<(Ring, Vec<QueuedWrite>)>,
    serial: Arc<Mutex<SerialDevice>>,
    port: u64,
    timer: Mutex<TimerFd>,
    failed: AtomicBool,
}

/// How long queued console bytes wait at most for a vCPU exit.
pub const DRAIN_EVERY: Duration = Duration::from_millis(20);

impl SerialQueue {
    /// Starts coalescing writes to `port` (COM1) into `ring`; the timer
    /// is created here, before the seccomp filter.
    pub fn start(
        ring: Ring,
        zone: Zone,
        serial: Arc<Mutex<SerialDevice>>,
        port: u16,
    ) -> io::Result<Self> {
        let mut timer = TimerFd::new().map_err(io::Error::from)?;
        timer
            .reset(DRAIN_EVERY, Some(DRAIN_EVERY))
            .map_err(io::Error::from)?;
        serial.lock().expect("serial lock poisoned").coalesce(zone);
        Ok(Self {
            consumer: Mutex::new((ring, Vec::new())),
            serial,
            port: u64::from(port),
            timer: Mutex::new(timer),
            failed: AtomicBool::new(false),
        })
    }

    /// Replays every queued write on the device, oldest first. Holding the
    /// queue while replaying keeps concurrent drains in order.
    pub fn drain(&self) {
        let mut guard = self
            .consumer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (ring, writes) = &mut *guard;
        writes.clear();
        if let Err(e) = ring.drain_into(writes) {
            if !self.failed.swap(true, Ordering::Relaxed) {
                eprintln!("kubevmm-vmm: serial: {e}");
            }
        }
        if !writes.is_empty() {
            self.serial
                .lock()
                .expect("serial lock poisoned")
                .replay(self.port, writes);
        }
    }

    /// The drain timer's fd, for the event loop.
    pub fn timer_fd(&self) -> std::os::fd::RawFd {
        self.timer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_raw_fd()
    }

    /// The timer fired: acknowledge it and drain.
    pub fn on_timer(&self) {
        let _ = self
            .timer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .wait();
        self.drain();
    }
}

const IER_THR_EMPTY: u8 = 0x02;
const MCR_LOOP: u8 = 0x10;

/// Whether writes to the transmit register may wait in KVM's queue, given
/// the interrupt enable and modem control registers.
fn coalescing_safe(ier: u8, mcr: u8) -> bool {
    ier & IER_THR_EMPTY == 0 && mcr & MCR_LOOP == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescing_only_while_the_guest_waits_on_no_write() {
        // (IER, MCR) → safe
        let table = [
            (0x00, 0x00, true),  // polling driver, interrupts off
            (0x01, 0x0b, true),  // receive interrupts only (Linux console)
            (0x02, 0x00, false), // THR-empty interrupt: the guest waits on it
            (0x03, 0x0b, false),
            (0x00, 0x10, false), // loopback: the byte comes back as input
            (0x01, 0x1b, false),
        ];
        for (ier, mcr, safe) in table {
            assert_eq!(coalescing_safe(ier, mcr), safe, "IER {ier:#x} MCR {mcr:#x}");
        }
    }

    #[test]
    fn replayed_writes_reach_the_sink_in_one_piece_and_in_order() {
        let path = std::env::temp_dir().join(format!("kubevmm-replay-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let file = SerialFile::open(&path, SerialFileFormat::Text, 1 << 20).unwrap();
        let (mut dev, _irq) = SerialDevice::new(SerialSink::File(file), None).unwrap();
        dev.write(0, b"a");
        let queued: Vec<QueuedWrite> = b"bcd"
            .iter()
            .map(|&b| QueuedWrite::for_test(0x3f8, &[b]))
            .chain([QueuedWrite::for_test(0x500, b"x")]) // not ours: ignored
            .collect();
        dev.replay(0x3f8, &queued);
        dev.write(0, b"e");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "abcde");
        assert_eq!(dev.tx_bytes, 5);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn capped_file_keeps_the_newest_output_within_the_limit() {
        let dir = std::env::temp_dir().join(format!("kubevmm-capped-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let SerialFile::Text(mut f) = SerialFile::open(&dir, SerialFileFormat::Text, 100).unwrap()
        else {
            panic!("a text file");
        };
        for i in 0..1000u32 {
            f.write_all(format!("line {i:04}\n").as_bytes()).unwrap();
            let len = std::fs::metadata(&dir).unwrap().len();
            assert!(len <= 100, "file grew to {len} bytes");
        }
        let text = std::fs::read_to_string(&dir).unwrap();
        assert!(text.ends_with("line 0999\n"), "{text}");
        // One huge write is also bounded.
        f.write_all(&vec![b'x'; 10_000]).unwrap();
        assert!(std::fs::metadata(&dir).unwrap().len() <= 100);
        let _ = std::fs::remove_file(&dir);
    }
}
