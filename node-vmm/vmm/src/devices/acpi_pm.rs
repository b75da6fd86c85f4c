//! ACPI PM1 event and control registers (fixed hardware): the guest powers
//! off by writing `SLP_TYP=S5` with `SLP_EN`, and the VMM presses the power
//! button by setting `PWRBTN_STS` and raising the SCI.

use std::sync::Arc;

use kvm_ioctls::VmFd;

use super::BusDevice;
use crate::arch::layout;
use crate::exit::{ExitReason, ExitSignal};

const PWRBTN_STS: u16 = 1 << 8;
const WAK_STS: u16 = 1 << 15;
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;

/// `PM1a` event block (4 bytes: status, enable) and control block (2 bytes),
/// inserted as one 8-byte range at `PM1_EVT_PORT`.
#[derive(Debug)]
pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
    vm: Arc<VmFd>,
    exit: ExitSignal,
}

impl AcpiPm {
    pub const LEN: u64 = 8;

    pub fn new(vm: Arc<VmFd>, exit: ExitSignal) -> Self {
        Self {
            status: 0,
            enable: 0,
            // Always in ACPI mode (no SMI_CMD), so SCI_EN reads as set.
            control: SCI_EN,
            vm,
            exit,
        }
    }

    /// Presses the power button (graceful shutdown request).
    pub fn press_power_button(&mut self) {
        self.status |= PWRBTN_STS;
        self.update_sci();
    }

    fn update_sci(&self) {
        let level = self.status & self.enable != 0;
        // The SCI line is level-triggered; failures only lose this edge.
        let _ = self.vm.set_irq_line(layout::SCI_IRQ, level);
    }
}

fn read_reg(reg: u16, byte: u64, data: &mut [u8]) {
    let bytes = reg.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(byte as usize + i).copied().unwrap_or(0);
    }
}

fn merge(reg: u16, byte: u64, data: &[u8]) -> u16 {
    let mut bytes = reg.to_le_bytes();
    for (i, d) in data.iter().enumerate() {
        if let Some(b) = bytes.get_mut(byte as usize + i) {
            *b = *d;
        }
    }
    u16::from_le_bytes(bytes)
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=1 => read_reg(self.status, offset, data),
            2..=3 => read_reg(self.enable, offset - 2, data),
            4..=5 => read_reg(self.control, offset - 4, data),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0..=1 => {
                // Write-one-to-clear.
                let clear = merge(0, offset, data);
                self.status &= !clear;
                self.update_sci();
            }
            2..=3 => {
                self.enable = merge(self.enable, offset - 2, data);
                self.update_sci();
            }
            4..=5 => {
                let value = merge(self.control, offset - 4, data);
                if value & SLP_EN != 0 {
                    let slp_typ = ((value >> 10) & 0x7) as u8;
                    if slp_typ == layout::S5_SLP_TYP {
                        self.exit.request(ExitReason::PowerOff);
                    } else {
                        // Other sleep states are not supported: wake at once.
                        self.status |= WAK_STS;
                    }
                }
                self.control = (value & !SLP_EN) | SCI_EN;
            }
            _ => {}
        }
    }
}
