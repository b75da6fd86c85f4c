//! Small legacy ports: pvpanic (guest panic notification) and the POST
//! diagnostic port, which accepts and ignores writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// pvpanic: reads return the supported events, a write reports a panic.
#[derive(Debug)]
pub struct PvPanic {
    exit: ExitSignal,
}

const PVPANIC_PANICKED: u8 = 1;
const PVPANIC_CRASH_LOADED: u8 = 2;

impl PvPanic {
    pub fn new(exit: ExitSignal) -> Self {
        Self { exit }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        match data.first() {
            Some(&v) if v & PVPANIC_PANICKED != 0 => self
                .exit
                .request(ExitReason::Crash("guest reported a panic (pvpanic)".into())),
            _ => {}
        }
    }
}

/// Port 0x80: counts writes, nothing else.
#[derive(Debug, Default)]
pub struct PostPort {
    pub writes: Arc<AtomicU64>,
}

impl BusDevice for PostPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
}
