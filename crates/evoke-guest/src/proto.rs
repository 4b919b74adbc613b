//! The agent channel's wire format. Each frame is a kind byte, a payload
//! length (u32, little-endian) and the payload. The channel is a byte stream
//! (a virtio-console port or a UART in raw mode), so frames carry their own
//! boundaries.
//!
//! Guest → host: [`Frame::Ready`] once the agent has its channel, then
//! [`Frame::Stdout`]/[`Frame::Stderr`] as the workload writes, then exactly
//! one [`Frame::Exit`] (or [`Frame::Error`] when the agent could not start
//! the workload). Host → guest: [`Frame::Signal`] forwards a signal to the
//! workload's process group.

use std::io::{self, Read, Write};

/// Payloads larger than this are refused: a confused or hostile peer cannot
/// make the reader allocate without bound.
pub const MAX_PAYLOAD: usize = 1 << 20;

const READY: u8 = 1;
const STDOUT: u8 = 2;
const STDERR: u8 = 3;
const EXIT: u8 = 4;
const ERROR: u8 = 5;
const SIGNAL: u8 = 16;
const STDIN: u8 = 17;

/// Bytes in a frame header: the kind and the payload length.
pub const HEADER_LEN: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("agent channel i/o: {0}")]
    Io(#[from] io::Error),
    #[error("agent channel frame of kind {kind} has payload of {len} bytes (limit {MAX_PAYLOAD})")]
    TooLarge { kind: u8, len: usize },
    #[error("agent channel frame of unknown kind {0}")]
    UnknownKind(u8),
    #[error("agent channel frame of kind {kind} has a malformed payload of {len} bytes")]
    Malformed { kind: u8, len: usize },
}

/// How the workload ended, as the guest saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Shell-style: the exit status, or 128 + signal.
    pub code: i32,
    /// The signal that ended it, 0 if none.
    pub signal: i32,
    /// The guest kernel's OOM killer ended it.
    pub oom_killed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The agent is up and the channel works.
    Ready,
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
    /// The agent failed before or while starting the workload (message).
    Error(String),
    /// Host → guest: deliver this signal to the workload.
    Signal(i32),
    /// Host → guest: bytes for the workload's stdin; empty means end of input.
    Stdin(Vec<u8>),
}

/// The length of the first whole frame at the start of `buf`, header
/// included: `Ok(None)` while more bytes are needed, an error when the
/// header announces a payload over [`MAX_PAYLOAD`]. Lets a relay pass frames
/// on whole without decoding them.
pub fn whole_frame_len(buf: &[u8]) -> Result<Option<usize>, ProtoError> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge { kind: head[0], len });
    }
    Ok((buf.len() >= HEADER_LEN + len).then_some(HEADER_LEN + len))
}

impl Frame {
    /// Writes the frame in one `write_all` so frames from one writer never
    /// interleave on the byte stream.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), ProtoError> {
        let (kind, payload): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            Frame::Ready => (READY, (&[][..]).into()),
            Frame::Stdout(b) => (STDOUT, b.as_slice().into()),
            Frame::Stderr(b) => (STDERR, b.as_slice().into()),
            Frame::Exit(s) => {
                let mut p = Vec::with_capacity(9);
                p.extend_from_slice(&s.code.to_le_bytes());
                p.extend_from_slice(&s.signal.to_le_bytes());
                p.push(u8::from(s.oom_killed));
                (EXIT, p.into())
            }
            Frame::Error(m) => (ERROR, m.as_bytes().into()),
            Frame::Signal(s) => (SIGNAL, s.to_le_bytes().to_vec().into()),
            Frame::Stdin(b) => (STDIN, b.as_slice().into()),
        };
        if payload.len() > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge {
                kind,
                len: payload.len(),
            });
        }
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.push(kind);
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&payload);
        w.write_all(&buf)?;
        w.flush()?;
        Ok(())
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream (between frames).
    pub fn read_from(r: &mut impl Read) -> Result<Option<Frame>, ProtoError> {
        let mut head = [0u8; 5];
        let mut got = 0;
        while got < head.len() {
            match r.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let kind = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge { kind, len });
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        let malformed = || ProtoError::Malformed { kind, len };
        let i32_at = |p: &[u8], at: usize| -> Option<i32> {
            Some(i32::from_le_bytes(p.get(at..at + 4)?.try_into().ok()?))
        };
        Ok(Some(match kind {
            READY => Frame::Ready,
            STDOUT => Frame::Stdout(payload),
            STDERR => Frame::Stderr(payload),
            EXIT => {
                if len != 9 {
                    return Err(malformed());
                }
                Frame::Exit(ExitStatus {
                    code: i32_at(&payload, 0).ok_or_else(malformed)?,
                    signal: i32_at(&payload, 4).ok_or_else(malformed)?,
                    oom_killed: payload[8] != 0,
                })
            }
            ERROR => Frame::Error(String::from_utf8_lossy(&payload).into_owned()),
            SIGNAL => Frame::Signal(
                i32_at(&payload, 0)
                    .filter(|_| len == 4)
                    .ok_or_else(malformed)?,
            ),
            STDIN => Frame::Stdin(payload),
            other => return Err(ProtoError::UnknownKind(other)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_kind_round_trips_on_one_stream() {
        let frames = vec![
            Frame::Ready,
            Frame::Stdout(b"hello\n".to_vec()),
            Frame::Stderr(Vec::new()),
            Frame::Signal(15),
            Frame::Stdin(b"input".to_vec()),
            Frame::Stdin(Vec::new()),
            Frame::Error("no such file: /bin/x".into()),
            Frame::Exit(ExitStatus {
                code: 137,
                signal: 9,
                oom_killed: true,
            }),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.write_to(&mut wire).unwrap();
        }
        let mut r = wire.as_slice();
        let mut back = Vec::new();
        while let Some(f) = Frame::read_from(&mut r).unwrap() {
            back.push(f);
        }
        assert_eq!(back, frames);
    }

    #[test]
    fn whole_frame_len_waits_for_the_payload_and_refuses_oversized_headers() {
        let mut wire = Vec::new();
        Frame::Stdin(b"abc".to_vec()).write_to(&mut wire).unwrap();
        Frame::Signal(2).write_to(&mut wire).unwrap();
        assert_eq!(whole_frame_len(&wire[..4]).unwrap(), None);
        assert_eq!(whole_frame_len(&wire[..7]).unwrap(), None);
        assert_eq!(whole_frame_len(&wire).unwrap(), Some(8));
        assert_eq!(whole_frame_len(&wire[8..]).unwrap(), Some(9));
        let mut big = vec![STDOUT];
        big.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(whole_frame_len(&big).is_err());
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut wire = vec![STDOUT];
        wire.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = Frame::read_from(&mut wire.as_slice()).unwrap_err();
        assert!(matches!(err, ProtoError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn truncated_frame_is_an_error_not_a_clean_end() {
        let mut wire = Vec::new();
        Frame::Stdout(b"abc".to_vec()).write_to(&mut wire).unwrap();
        wire.truncate(6);
        assert!(Frame::read_from(&mut wire.as_slice()).is_err());
        assert!(Frame::read_from(&mut &wire[..2]).is_err());
    }

    #[test]
    fn unknown_kind_and_bad_exit_payload_are_errors() {
        let mut wire = vec![99u8, 0, 0, 0, 0];
        assert!(matches!(
            Frame::read_from(&mut wire.as_slice()),
            Err(ProtoError::UnknownKind(99))
        ));
        wire = vec![EXIT, 1, 0, 0, 0, 7];
        assert!(matches!(
            Frame::read_from(&mut wire.as_slice()),
            Err(ProtoError::Malformed { .. })
        ));
    }
}
