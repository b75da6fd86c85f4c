//! virtio devices over the virtio-mmio transport (version 2), with queue
//! notifications on ioeventfds and interrupts on irqfds.

pub mod block;
pub mod log_limit;
pub mod mmio;
pub mod net;
#[cfg(test)]
mod proptests;
pub mod rng;
#[cfg(test)]
mod test_util;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
pub const TYPE_RNG: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

/// Feature bits common to all devices.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// `InterruptStatus` bits.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("queue {0} was not set up validly by the driver")]
    BadQueue(usize),
    #[error("virtio device I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The device's interrupt: status bits the driver reads, plus the irqfd.
#[derive(Debug, Clone)]
pub struct Interrupt {
    pub status: Arc<AtomicU32>,
    pub irqfd: Arc<EventFd>,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            irqfd: Arc::new(irqfd),
        }
    }

    /// Tells the driver that used buffers are available.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        // An overflowing eventfd counter still means "raised".
        let _ = self.irqfd.write(1);
    }
}

/// The device side, driven by the transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// The device-specific configuration space (empty when it has none).
    fn config_space(&self) -> Vec<u8> {
        Vec::new()
    }
    /// A driver read of the configuration space; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o.checked_add(i)?))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// `DRIVER_OK`: start processing the given queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
        acked_features: u64,
    ) -> Result<(), VirtioError>;
    /// The driver notified queue `index` (through its ioeventfd).
    fn process_queue(&mut self, index: usize);
    /// Host-side fds the event loop should watch for this device (e.g. tap).
    fn backend_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// One of `backend_fds` is readable.
    fn process_backend(&mut self, _fd_index: usize) {}
    /// Device reset by the driver: drop queues and stop processing.
    fn reset(&mut self);
    /// The VMM is stopping (any reason but being killed): write back what
    /// the device still holds in memory, such as a qcow2 disk's cached
    /// tables.
    fn shutdown(&mut self) {}
    /// Counters for the stats API, as (name, value).
    fn counters(&self) -> Vec<(&'static str, u64)>;
}
