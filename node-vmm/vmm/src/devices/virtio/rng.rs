//! virtio-rng: fills guest buffers from the host's getrandom(2).

use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap};

use super::{Interrupt, VirtioDevice, VirtioError, TYPE_RNG};

#[cfg(test)]
pub(super) mod tests;

const QUEUE_SIZE: u16 = 64;
/// Random bytes given for one request, however many buffers or bytes the
/// chain offers: the work per request is bounded, not the guest's choice.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug)]
pub struct Rng {
    active: Option<(GuestMemoryMmap, Queue, Interrupt)>,
    bytes: AtomicU64,
    /// Requests (chains) answered.
    requests: AtomicU64,
    /// One request's bytes, `MAX_REQUEST` long.
    buf: Vec<u8>,
}

impl Default for Rng {
    fn default() -> Self {
        Self {
            active: None,
            bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            buf: vec![0; MAX_REQUEST],
        }
    }
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }

    /// The request buffer's capacity, to check it stays bounded.
    #[cfg(test)]
    pub(crate) fn buffer_size(&self) -> usize {
        self.buf.capacity()
    }
}

/// Fills the device-writable buffers of one chain, `MAX_REQUEST` bytes at
/// most in all; device-readable ones are skipped. Returns the bytes written.
fn fill_chain<M: GuestMemory>(
    mem: &M,
    chain: impl Iterator<Item = Descriptor>,
    buf: &mut [u8],
) -> u32 {
    let mut written = 0usize;
    for d in chain.filter(Descriptor::is_write_only) {
        let len = (d.len() as usize).min(buf.len() - written);
        if len == 0 {
            if written == buf.len() {
                break;
            }
            continue;
        }
        let chunk = &mut buf[written..written + len];
        if !fill_random(chunk) || mem.write_slice(chunk, d.addr()).is_err() {
            break;
        }
        written += len;
    }
    // At most MAX_REQUEST.
    written as u32
}

fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most buf.len()-done bytes into our own buffer.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Interrupt,
        _acked_features: u64,
    ) -> Result<(), VirtioError> {
        let q = queues
            .pop()
            .filter(QueueT::ready)
            .ok_or(VirtioError::BadQueue(0))?;
        self.active = Some((mem, q, interrupt));
        Ok(())
    }

    fn process_queue(&mut self, _index: usize) {
        let Some((mem, queue, interrupt)) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let written = fill_chain(&*mem, chain, &mut self.buf);
            self.bytes.fetch_add(u64::from(written), Ordering::Relaxed);
            self.requests.fetch_add(1, Ordering::Relaxed);
            if queue.add_used(&*mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        if used && queue.needs_notification(&*mem).unwrap_or(true) {
            interrupt.signal_used();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("bytes", self.bytes.load(Ordering::Relaxed)),
            ("requests", self.requests.load(Ordering::Relaxed)),
        ]
    }
}
