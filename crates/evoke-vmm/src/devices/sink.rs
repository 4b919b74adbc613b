//! Where guest output goes. Every sink is bounded: a guest that floods its
//! console cannot make the VMM hold more than a fixed amount in memory, and
//! a log file stops growing at its cap.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// Passes through the first `cap` bytes, then drops the rest (noting once
/// that it did).
pub struct CappedWriter<W: Write> {
    inner: W,
    remaining: u64,
    dropped: u64,
}

impl<W: Write> CappedWriter<W> {
    pub fn new(inner: W, cap: u64) -> Self {
        Self {
            inner,
            remaining: cap,
            dropped: 0,
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = (buf.len() as u64).min(self.remaining) as usize;
        if take > 0 {
            self.inner.write_all(&buf[..take])?;
            self.remaining -= take as u64;
        }
        if take < buf.len() {
            if self.dropped == 0 {
                tracing::warn!("guest console output reached its cap; dropping the rest");
            }
            self.dropped += (buf.len() - take) as u64;
        }
        // Report everything as written: the guest must not stall on a full log.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Keeps the last `cap` bytes written, e.g. the tail of a kernel log to show
/// when a guest panics. Clones share the buffer.
#[derive(Clone)]
pub struct TailBuffer {
    inner: Arc<Mutex<VecDeque<u8>>>,
    cap: usize,
}

impl TailBuffer {
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(VecDeque::with_capacity(cap.min(64 << 10)))),
            cap,
        }
    }

    /// A copy of what is held now.
    pub fn contents(&self) -> Vec<u8> {
        match self.inner.lock() {
            Ok(g) => g.iter().copied().collect(),
            Err(p) => p.into_inner().iter().copied().collect(),
        }
    }
}

impl Write for TailBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("console tail buffer poisoned"))?;
        let keep = &buf[buf.len().saturating_sub(self.cap)..];
        let overflow = (g.len() + keep.len()).saturating_sub(self.cap);
        let n = overflow.min(g.len());
        g.drain(..n);
        g.extend(keep);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes to two sinks (e.g. a capped log file and a tail buffer).
pub struct Tee<A: Write, B: Write>(pub A, pub B);

impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        self.1.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_writer_stops_growing_at_its_cap_but_never_blocks_the_guest() {
        let mut w = CappedWriter::new(Vec::new(), 10);
        for _ in 0..1000 {
            assert_eq!(w.write(b"0123456789abcdef").unwrap(), 16);
        }
        assert_eq!(w.inner.len(), 10);
        assert_eq!(w.dropped(), 16_000 - 10);
    }

    #[test]
    fn tail_buffer_keeps_only_the_last_bytes() {
        let mut t = TailBuffer::new(8);
        for i in 0..100u8 {
            t.write_all(&[i; 3]).unwrap();
        }
        t.write_all(b"0123456789").unwrap();
        assert_eq!(t.contents(), b"23456789");
        let mut t2 = t.clone();
        t2.write_all(b"x").unwrap();
        assert_eq!(t.contents(), b"3456789x");
    }
}
