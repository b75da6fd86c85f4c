//! Emulated devices and the buses vCPU exits are dispatched on.

pub mod acpi_pm;
pub mod i8042;
pub mod legacy;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

/// A device on the port I/O or MMIO bus. `offset` is relative to the base
/// the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
#[error("device range {base:#x}+{len:#x} overlaps another device")]
pub struct BusOverlap {
    pub base: u64,
    pub len: u64,
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// An address space of devices, searched by address.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| (e.base, e.len)))
            .finish()
    }
}

impl Bus {
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusOverlap> {
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < base + len)
        {
            return Err(BusOverlap { base, len });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(idx.checked_sub(1)?)?;
        (addr < e.base + e.len).then(|| (e, addr - e.base))
    }

    /// Returns false when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                e.device
                    .lock()
                    .expect("device lock poisoned")
                    .read(off, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                e.device
                    .lock()
                    .expect("device lock poisoned")
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_by_range_and_overlap_check() {
        let mut bus = Bus::default();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Echo(1)))).unwrap();
        bus.insert(0x20, 4, Arc::new(Mutex::new(Echo(5)))).unwrap();
        assert!(bus.insert(0x12, 8, Arc::new(Mutex::new(Echo(0)))).is_err());
        let mut b = [0u8];
        assert!(bus.read(0x11, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.read(0x20, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x14, &mut b));
        assert!(!bus.read(0x0f, &mut b));
        assert!(bus.write(0x23, &[9]));
        assert!(bus.read(0x20, &mut b));
        assert_eq!(b[0], 9);
    }
}
