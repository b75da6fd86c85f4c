//! Minimal i8042 keyboard controller: enough for the guest to probe it and to
//! reset the machine with command 0xfe (also the FADT reset register).

use super::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

const CMD_RESET_CPU: u8 = 0xfe;
const STATUS_SYSTEM_FLAG: u8 = 0x04;

/// Ports 0x60 (data) to 0x64 (status/command), inserted as a 5-byte range.
#[derive(Debug)]
pub struct I8042 {
    exit: ExitSignal,
    command_byte: u8,
    pending_read_command: bool,
}

impl I8042 {
    pub const LEN: u64 = 5;

    pub fn new(exit: ExitSignal) -> Self {
        Self {
            exit,
            command_byte: 0,
            pending_read_command: false,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 if self.pending_read_command => {
                self.pending_read_command = false;
                self.command_byte
            }
            // Status: output buffer full only after a read-command request.
            4 => STATUS_SYSTEM_FLAG | u8::from(self.pending_read_command),
            _ => 0,
        };
        data.fill(0);
        if let Some(d) = data.first_mut() {
            *d = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 4 {
            match v {
                CMD_RESET_CPU => self.exit.request(ExitReason::Reboot),
                0x20 => self.pending_read_command = true,
                _ => {}
            }
        }
    }
}
