//! virtio-rng: fills guest buffers from the host's getrandom(2).

use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{Interrupt, VirtioDevice, VirtioError, TYPE_RNG};

const QUEUE_SIZE: u16 = 64;
/// Largest single buffer we fill, to bound the work per request.
const MAX_CHUNK: u32 = 64 * 1024;

#[derive(Debug, Default)]
pub struct Rng {
    active: Option<(GuestMemoryMmap, Queue, Interrupt)>,
    bytes: AtomicU64,
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }
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
            let mut written = 0u32;
            for d in chain.filter(virtio_queue::desc::split::Descriptor::is_write_only) {
                let len = d.len().min(MAX_CHUNK);
                let mut buf = vec![0u8; len as usize];
                if !fill_random(&mut buf) || mem.write_slice(&buf, d.addr()).is_err() {
                    break;
                }
                written += len;
            }
            self.bytes.fetch_add(u64::from(written), Ordering::Relaxed);
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
        vec![("bytes", self.bytes.load(Ordering::Relaxed))]
    }
}
