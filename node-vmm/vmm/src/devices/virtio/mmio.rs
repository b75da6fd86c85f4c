//! virtio-mmio transport, register layout of virtio 1.2 section 4.2.2.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_config as vc;
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::log_limit::LogLimiter;
use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_4b4b; // "KKVM"

const STATUS_ACKNOWLEDGE: u32 = vc::VIRTIO_CONFIG_S_ACKNOWLEDGE;
const STATUS_DRIVER: u32 = vc::VIRTIO_CONFIG_S_DRIVER;
const STATUS_DRIVER_OK: u32 = vc::VIRTIO_CONFIG_S_DRIVER_OK;
const STATUS_FEATURES_OK: u32 = vc::VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_NEEDS_RESET: u32 = vc::VIRTIO_CONFIG_S_NEEDS_RESET;
const STATUS_FAILED: u32 = vc::VIRTIO_CONFIG_S_FAILED;

pub const QUEUE_NOTIFY_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

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
    log: LogLimiter,
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
            log: LogLimiter::default(),
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

    /// A driver write to `Status` (virtio 1.2 sections 2.1 and 3.1.1): 0
    /// resets; otherwise bits are only ever added, in the order the spec
    /// gives, and a device in `DEVICE_NEEDS_RESET` accepts nothing but a reset.
    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if self.status & STATUS_NEEDS_RESET != 0 {
            // Only a reset brings the device back; the driver may say it gave up.
            self.status |= value & STATUS_FAILED;
            return;
        }
        if value & self.status != self.status {
            self.refuse(
                value,
                "a status write may not clear bits (only a reset does)",
            );
            return;
        }
        let driver = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
        if value & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) != 0 && value & driver != driver {
            self.refuse(
                value,
                "FEATURES_OK or DRIVER_OK without ACKNOWLEDGE and DRIVER",
            );
            return;
        }
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Refuse a feature set we did not offer, or a legacy driver.
            let ok = self.driver_features & !self.offered_features() == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                self.status = value & !(STATUS_FEATURES_OK | STATUS_DRIVER_OK);
                return;
            }
        }
        if value & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK == 0 {
            self.refuse(value, "DRIVER_OK without FEATURES_OK");
            return;
        }
        self.status = value;
        if value & STATUS_DRIVER_OK != 0 && value & STATUS_FAILED == 0 && !self.activated {
            self.activate();
        }
    }

    /// A status write we do not follow: the device needs a reset.
    fn refuse(&mut self, value: u32, why: &str) {
        self.log.warn(format_args!(
            "virtio device type {}: status {value:#x} refused: {why}",
            self.device.device_type()
        ));
        self.status |= STATUS_NEEDS_RESET;
    }

    fn activate(&mut self) {
        // Every queue the device has must be set up: ready, a valid size, and
        // rings inside guest memory.
        if let Some(bad) = self
            .queues
            .iter()
            .position(|q| !q.ready() || !q.is_valid(&self.mem))
        {
            self.log.warn(format_args!(
                "virtio device type {}: queue {bad} is not ready or invalid",
                self.device.device_type()
            ));
            self.status |= STATUS_NEEDS_RESET;
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
                self.log.warn(format_args!(
                    "virtio device type {}: activation failed: {e}",
                    self.device.device_type()
                ));
                self.status |= STATUS_NEEDS_RESET;
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
        // Offsets past u32 match no register.
        match u32::try_from(offset).unwrap_or(u32::MAX) {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            reg::VIRTIO_MMIO_VERSION => VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => max_size(self),
            reg::VIRTIO_MMIO_QUEUE_READY => u32::from(
                self.activated
                    || self
                        .queues
                        .get(self.queue_sel as usize)
                        .is_some_and(QueueT::ready),
            ),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            reg::VIRTIO_MMIO_STATUS => self.status,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let driver_ready =
            self.status & STATUS_DRIVER != 0 && self.status & STATUS_ACKNOWLEDGE != 0;
        // Offsets past u32 match no register.
        match u32::try_from(offset).unwrap_or(u32::MAX) {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES
                if driver_ready && self.status & STATUS_FEATURES_OK == 0 =>
            {
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
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            reg::VIRTIO_MMIO_QUEUE_NUM => {
                // A size that does not fit 16 bits is invalid, not truncated;
                // the queue keeps its size (and checks the new one) otherwise.
                if let (Some(q), Ok(size)) = (self.selected_queue(), u16::try_from(v)) {
                    if !q.ready() {
                        q.set_size(size);
                    }
                }
            }
            reg::VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            // QueueNotify: a notify that reaches us matched no
            // ioeventfd (unknown queue) and is ignored like other writes.
            reg::VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            reg::VIRTIO_MMIO_STATUS => self.set_status(v),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.with_queue(|q| q.set_desc_table_address(Some(v), None));
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.with_queue(|q| q.set_desc_table_address(None, Some(v)));
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.with_queue(|q| q.set_avail_ring_address(Some(v), None));
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(v)));
            }
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.with_queue(|q| q.set_used_ring_address(Some(v), None));
            }
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(v)));
            }
            _ => {}
        }
    }

    /// Changes the selected queue's ring addresses, which the driver may
    /// only do while the queue is not ready.
    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    /// A device with two queues that counts its activations.
    struct Probe {
        activations: Arc<AtomicU32>,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            99
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            0
        }
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            _: Vec<Queue>,
            _: Interrupt,
            _: u64,
        ) -> Result<(), super::super::VirtioError> {
            self.activations.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn process_queue(&mut self, _: usize) {}
        fn reset(&mut self) {}
        fn counters(&self) -> Vec<(&'static str, u64)> {
            Vec::new()
        }
    }

    const MEM: u64 = 0x10_0000;

    fn transport() -> (MmioTransport, Arc<AtomicU32>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let activations = Arc::new(AtomicU32::new(0));
        let dev = Probe {
            activations: activations.clone(),
        };
        let irq = Interrupt::new(EventFd::new(0).unwrap());
        (MmioTransport::new(Box::new(dev), mem, irq), activations)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Queue `index` at `base` (desc, avail, used one page apart) with `size`.
    fn setup_queue(t: &mut MmioTransport, index: u32, base: u64, size: u32) {
        w(t, 0x030, index);
        w(t, 0x038, size);
        for (off, addr) in [
            (0x080, base),
            (0x090, base + 0x1000),
            (0x0a0, base + 0x2000),
        ] {
            w(t, off, addr as u32);
            w(t, off + 4, (addr >> 32) as u32);
        }
        w(t, 0x044, 1);
    }

    fn negotiate(t: &mut MmioTransport) {
        w(t, 0x070, 0);
        w(t, 0x070, STATUS_ACKNOWLEDGE);
        w(t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, 0x024, 1);
        w(t, 0x020, 1); // VERSION_1
        w(
            t,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn a_well_behaved_driver_activates_the_device() {
        let (mut t, n) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000, 16);
        setup_queue(&mut t, 1, 0x2_0000, 8);
        w(&mut t, 0x070, ALL_OK);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert_eq!(r(&mut t, 0x070), ALL_OK);
    }

    #[test]
    fn driver_ok_without_features_ok_is_refused() {
        let (mut t, n) = transport();
        w(&mut t, 0x070, STATUS_ACKNOWLEDGE);
        w(&mut t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        setup_queue(&mut t, 0, 0x1_0000, 16);
        setup_queue(&mut t, 1, 0x2_0000, 16);
        w(
            &mut t,
            0x070,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert_eq!(n.load(Ordering::SeqCst), 0, "activated without FEATURES_OK");
        assert_ne!(r(&mut t, 0x070) & STATUS_NEEDS_RESET, 0);
        // Nothing but a reset gets it going again.
        w(&mut t, 0x070, ALL_OK);
        assert_eq!(n.load(Ordering::SeqCst), 0);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000, 16);
        setup_queue(&mut t, 1, 0x2_0000, 16);
        w(&mut t, 0x070, ALL_OK);
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn driver_ok_straight_from_reset_is_refused() {
        let (mut t, n) = transport();
        setup_queue(&mut t, 0, 0x1_0000, 16);
        setup_queue(&mut t, 1, 0x2_0000, 16);
        w(&mut t, 0x070, STATUS_DRIVER_OK);
        w(&mut t, 0x070, STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(n.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn queues_outside_memory_or_missing_are_not_activated() {
        for (base1, ready1) in [
            (MEM - 0x1000, true),
            (0xffff_ffff_ffff_0000, true),
            (0x2_0000, false),
        ] {
            let (mut t, n) = transport();
            negotiate(&mut t);
            setup_queue(&mut t, 0, 0x1_0000, 16);
            setup_queue(&mut t, 1, base1, 16);
            if !ready1 {
                w(&mut t, 0x044, 0);
            }
            w(&mut t, 0x070, ALL_OK);
            assert_eq!(n.load(Ordering::SeqCst), 0, "queue 1 at {base1:#x}");
            assert_ne!(r(&mut t, 0x070) & STATUS_NEEDS_RESET, 0);
        }
    }

    #[test]
    fn queue_sizes_are_checked_not_truncated() {
        let (mut t, _) = transport();
        w(&mut t, 0x030, 0);
        // 0x1_0008 would truncate to 8; 3 is not a power of two; 32 > max.
        for bad in [0x1_0008, 3, 32, 0] {
            w(&mut t, 0x038, bad);
            assert_eq!(t.queues[0].size(), 16, "size {bad:#x} accepted");
        }
        w(&mut t, 0x038, 8);
        assert_eq!(t.queues[0].size(), 8);
    }

    #[test]
    fn a_ready_queue_keeps_its_addresses() {
        let (mut t, _) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000, 16);
        w(&mut t, 0x080, 0x5_0000);
        w(&mut t, 0x038, 4);
        assert_eq!(t.queues[0].desc_table(), 0x1_0000);
        assert_eq!(t.queues[0].size(), 16);
    }

    #[test]
    fn status_bits_cannot_be_cleared_without_reset() {
        let (mut t, n) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000, 16);
        setup_queue(&mut t, 1, 0x2_0000, 16);
        w(&mut t, 0x070, STATUS_ACKNOWLEDGE | STATUS_DRIVER_OK);
        assert_eq!(n.load(Ordering::SeqCst), 0);
        assert_ne!(r(&mut t, 0x070) & STATUS_NEEDS_RESET, 0);
    }
}
