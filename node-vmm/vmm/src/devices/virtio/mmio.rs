//! virtio-mmio transport, register layout of virtio 1.2 section 4.2.2.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_4b4b; // "KKVM"

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// A virtio device behind its mmio registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("type", &self.device.device_type())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, interrupt: Interrupt) -> Self {
        let queues = Self::fresh_queues(device.as_ref());
        Self {
            device,
            mem,
            interrupt,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&s| Queue::new(s).expect("queue sizes are powers of two"))
            .collect()
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Refuse a feature set we did not offer, or a legacy driver.
            let ok = self.driver_features & !self.offered_features() == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                self.status = value & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if value & STATUS_DRIVER_OK != 0 && value & STATUS_FAILED == 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if let Some(bad) = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem))
        {
            eprintln!(
                "kubevmm-vmm: virtio device type {}: queue {bad} is invalid",
                self.device.device_type()
            );
            self.status |= STATUS_FAILED;
            return;
        }
        let queues = std::mem::replace(&mut self.queues, Self::fresh_queues(self.device.as_ref()));
        match self.device.activate(
            self.mem.clone(),
            queues,
            self.interrupt.clone(),
            self.driver_features,
        ) {
            Ok(()) => self.activated = true,
            Err(e) => {
                eprintln!("kubevmm-vmm: virtio device activation failed: {e}");
                self.status |= STATUS_FAILED;
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let max_size = |t: &Self| {
            t.device
                .queue_max_sizes()
                .get(t.queue_sel as usize)
                .copied()
                .map_or(0, u32::from)
        };
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            0x034 => max_size(self),
            0x044 => u32::from(
                self.activated
                    || self
                        .queues
                        .get(self.queue_sel as usize)
                        .is_some_and(QueueT::ready),
            ),
            0x060 => self.interrupt.status.load(Ordering::SeqCst),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let driver_ready =
            self.status & STATUS_DRIVER != 0 && self.status & STATUS_ACKNOWLEDGE != 0;
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 if driver_ready && self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v);
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32);
                    }
                    _ => {}
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x044 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            // 0x050 QueueNotify: a notify that reaches us matched no
            // ioeventfd (unknown queue) and is ignored like other writes.
            0x064 => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            0x070 => self.set_status(v),
            0x080 => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x084 => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x090 => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x094 => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0x0a0 => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0x0a4 => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let v = if data.len() == 4 {
            self.read_reg(offset)
        } else {
            0
        };
        let bytes = v.to_le_bytes();
        for (d, b) in data
            .iter_mut()
            .zip(bytes.iter().chain(std::iter::repeat(&0)))
        {
            *d = *b;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            self.device.write_config(offset - 0x100, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}
