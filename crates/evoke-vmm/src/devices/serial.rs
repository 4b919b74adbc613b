//! An 8250/16550 UART on an I/O port range, from vm-superio, raising its IRQ
//! through an irqfd.

use std::io::Write;

use vm_superio::Serial;

use super::EventFdTrigger;

/// One UART: 8 ports from `base`.
pub struct SerialPort {
    pub base: u16,
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialPort {
    pub fn new(base: u16, irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            base,
            uart: Serial::new(irq, out),
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.base..self.base + 8).contains(&port)
    }

    pub fn read(&mut self, port: u16) -> u8 {
        self.uart.read((port - self.base) as u8)
    }

    pub fn write(&mut self, port: u16, value: u8) {
        if let Err(e) = self.uart.write((port - self.base) as u8, value) {
            // The guest keeps running; its output sink failing is the host's
            // problem to report, once per failure.
            tracing::warn!(port = self.base, error = ?e, "serial output failed");
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the
    /// receive FIFO (the rest must be offered again later).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let n = bytes.len().min(room);
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(port = self.base, error = ?e, "serial input failed");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::sink::TailBuffer;

    #[test]
    fn bytes_written_to_the_data_register_reach_the_sink_and_raise_no_irq_unless_enabled() {
        let tail = TailBuffer::new(64);
        let irq = EventFdTrigger::new().unwrap();
        let irq_probe = irq.try_clone().unwrap();
        let mut s = SerialPort::new(0x3f8, irq, Box::new(tail.clone()));
        for b in b"hello" {
            s.write(0x3f8, *b);
        }
        assert_eq!(tail.contents(), b"hello");
        // Line status register: transmitter empty.
        assert_ne!(s.read(0x3fd) & 0x20, 0);
        assert!(irq_probe.0.read().is_err(), "no interrupt without IER");
        assert!(s.contains(0x3ff) && !s.contains(0x400));
    }

    #[test]
    fn host_input_is_readable_by_the_guest_and_bounded_by_the_fifo() {
        let irq = EventFdTrigger::new().unwrap();
        let mut s = SerialPort::new(0x2f8, irq, Box::new(std::io::sink()));
        let big = vec![b'a'; 1000];
        let n = s.enqueue_input(&big);
        assert!(n > 0 && n < 1000, "fifo takes part of it: {n}");
        assert_ne!(s.read(0x2fd) & 1, 0, "data ready");
        assert_eq!(s.read(0x2f8), b'a');
    }
}
