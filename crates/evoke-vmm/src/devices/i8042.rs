//! Just enough of an i8042 keyboard controller for Linux: it reads and
//! writes the controller configuration byte (CTR) at boot, and a write of
//! 0xfe to the command port is the guest's reset request (`reboot=k`).
//!
//! Why not a bare reset line: a controller whose status never shows data
//! makes Linux's i8042 probe wait for the CTR until it times out, which cost
//! about 1.5 s of every boot. No keyboard is attached: keyboard commands get
//! no answer, which the driver handles asynchronously.

use std::collections::VecDeque;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_RESET_CPU: u8 = 0xfe;

/// The data port is at offset 0, the command/status port at offset 4.
pub const DATA: u8 = 0;
pub const COMMAND: u8 = 4;

/// What a guest write asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum I8042Action {
    None,
    Reset,
}

#[derive(Debug)]
pub struct I8042 {
    ctr: u8,
    out: VecDeque<u8>,
    awaiting_ctr: bool,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    pub fn new() -> Self {
        Self {
            // Keyboard interrupt on, system flag, translation on.
            ctr: 0x45,
            out: VecDeque::new(),
            awaiting_ctr: false,
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        match offset {
            DATA => self.out.pop_front().unwrap_or(0),
            COMMAND => {
                let full = if self.out.is_empty() {
                    0
                } else {
                    STATUS_OUTPUT_FULL
                };
                full | STATUS_SYSTEM_FLAG
            }
            _ => 0xff,
        }
    }

    pub fn write(&mut self, offset: u8, value: u8) -> I8042Action {
        match offset {
            COMMAND => {
                self.awaiting_ctr = false;
                match value {
                    CMD_RESET_CPU => return I8042Action::Reset,
                    CMD_READ_CTR => self.respond(self.ctr),
                    CMD_WRITE_CTR => self.awaiting_ctr = true,
                    CMD_SELF_TEST => self.respond(0x55),
                    CMD_TEST_KBD => self.respond(0x00),
                    // No mouse port: a failing interface test says so.
                    CMD_TEST_AUX => self.respond(0xff),
                    CMD_DISABLE_AUX | CMD_ENABLE_AUX | CMD_DISABLE_KBD | CMD_ENABLE_KBD => {}
                    _ => {}
                }
            }
            DATA if self.awaiting_ctr => {
                self.ctr = value;
                self.awaiting_ctr = false;
            }
            // A byte for the (absent) keyboard: no answer.
            _ => {}
        }
        I8042Action::None
    }

    fn respond(&mut self, byte: u8) {
        // One byte is all the real controller buffers.
        self.out.clear();
        self.out.push_back(byte);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_can_read_and_write_the_controller_configuration_byte() {
        let mut k = I8042::new();
        assert_eq!(k.read(COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(k.write(COMMAND, CMD_READ_CTR), I8042Action::None);
        assert_ne!(k.read(COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(k.read(DATA), 0x45);
        assert_eq!(k.read(COMMAND) & STATUS_OUTPUT_FULL, 0);
        k.write(COMMAND, CMD_WRITE_CTR);
        k.write(DATA, 0x20);
        k.write(COMMAND, CMD_READ_CTR);
        assert_eq!(k.read(DATA), 0x20);
    }

    #[test]
    fn the_input_buffer_is_always_ready_and_0xfe_asks_for_a_reset() {
        let mut k = I8042::new();
        // Bit 1 (input buffer full) clear: the kernel's reboot loop does not wait.
        assert_eq!(k.read(COMMAND) & 0x02, 0);
        assert_eq!(k.write(DATA, 0xff), I8042Action::None);
        assert_eq!(
            k.read(COMMAND) & STATUS_OUTPUT_FULL,
            0,
            "no keyboard answers"
        );
        assert_eq!(k.write(COMMAND, CMD_RESET_CPU), I8042Action::Reset);
    }
}
