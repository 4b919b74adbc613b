//! The agent channel's wire format. Each frame is a kind byte, a payload
//! length (u32, little-endian) and the payload. The channel is a byte stream
//! (a virtio-console port or a UART in raw mode), so frames carry their own
//! boundaries.
//!
//! The main workload: guest → host [`Frame::Ready`] once the agent has its
//! channel, [`Frame::Started`] once the workload's process runs (its exec
//! succeeded; the host reports the workload running only then), then
//! [`Frame::Stdout`]/[`Frame::Stderr`] as the workload writes, then exactly
//! one [`Frame::Exit`] (or [`Frame::Error`], and no `Started`, when the agent
//! could not start the workload). Host → guest: [`Frame::Signal`] forwards a
//! signal to the workload's process group, [`Frame::Stdin`] feeds its stdin.
//!
//! Exec sessions are multiplexed on the same channel. Each `Exec*` frame
//! names its session (a u32 the host picks; 0 is the main workload and
//! never an exec). The host opens one with [`Frame::ExecStart`] and feeds it
//! with [`Frame::ExecStdin`], [`Frame::ExecResize`] and [`Frame::ExecSignal`];
//! the guest answers with [`Frame::ExecStdout`]/[`Frame::ExecStderr`] and
//! ends it with one [`Frame::ExecExit`] (after a [`Frame::ExecError`] when the
//! command could not be started).
//!
//! Flow control is a window per session and direction, so that one busy or
//! stuck session cannot hold up the others or grow a buffer without bound:
//! the guest has at most [`OUTPUT_WINDOW`] bytes of a session's output that
//! the host has not acknowledged ([`Frame::OutputAck`], sent as the bytes
//! leave the host for their reader), and the host at most [`STDIN_WINDOW`]
//! bytes of a session's stdin that the guest has not acknowledged
//! ([`Frame::StdinAck`], sent as the bytes enter the command's stdin; the
//! main workload's stdin is session 0).

use std::io::{self, Read, Write};

use crate::spec::ExecRequest;

/// Payloads larger than this are refused: a confused or hostile peer cannot
/// make the reader allocate without bound.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Bytes of one session's output the guest may have in flight (sent, not yet
/// acknowledged by the host).
pub const OUTPUT_WINDOW: usize = 64 << 10;
/// Bytes of one session's stdin the host may have in flight (sent, not yet
/// taken by the command).
pub const STDIN_WINDOW: usize = 64 << 10;

/// The session number of the main workload (its stdin acknowledgements).
pub const MAIN_SESSION: u32 = 0;

const READY: u8 = 1;
const STDOUT: u8 = 2;
const STDERR: u8 = 3;
const EXIT: u8 = 4;
const ERROR: u8 = 5;
const EXEC_STDOUT: u8 = 6;
const EXEC_STDERR: u8 = 7;
const EXEC_EXIT: u8 = 8;
const EXEC_ERROR: u8 = 9;
const STDIN_ACK: u8 = 10;
const STARTED: u8 = 11;
const SIGNAL: u8 = 16;
const STDIN: u8 = 17;
const EXEC_START: u8 = 18;
const EXEC_STDIN: u8 = 19;
const EXEC_RESIZE: u8 = 20;
const EXEC_SIGNAL: u8 = 21;
const OUTPUT_ACK: u8 = 22;

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

impl ExitStatus {
    fn encode(&self, p: &mut Vec<u8>) {
        p.extend_from_slice(&self.code.to_le_bytes());
        p.extend_from_slice(&self.signal.to_le_bytes());
        p.push(u8::from(self.oom_killed));
    }

    fn decode(p: &[u8]) -> Option<Self> {
        (p.len() == 9).then(|| ExitStatus {
            code: i32_at(p, 0).unwrap_or_default(),
            signal: i32_at(p, 4).unwrap_or_default(),
            oom_killed: p[8] != 0,
        })
    }
}

fn i32_at(p: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(p.get(at..at + 4)?.try_into().ok()?))
}

fn u32_at(p: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(p.get(at..at + 4)?.try_into().ok()?))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The agent is up and the channel works.
    Ready,
    /// The workload's process runs (its exec succeeded), at this time of
    /// the guest's clock, in nanoseconds since the Unix epoch (0: unknown).
    Started {
        unix_nanos: u64,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
    /// The agent failed before or while starting the workload (message).
    Error(String),
    /// Host → guest: deliver this signal to the workload.
    Signal(i32),
    /// Host → guest: bytes for the workload's stdin; empty means end of input.
    Stdin(Vec<u8>),
    /// Host → guest: run a command next to the workload as `session`.
    ExecStart {
        session: u32,
        request: ExecRequest,
    },
    /// Host → guest: bytes for the session's stdin; empty means end of input.
    ExecStdin {
        session: u32,
        data: Vec<u8>,
    },
    /// Host → guest: the session's terminal has a new size.
    ExecResize {
        session: u32,
        cols: u16,
        rows: u16,
    },
    /// Host → guest: deliver this signal to the session's process group.
    ExecSignal {
        session: u32,
        signal: i32,
    },
    /// Host → guest: `bytes` more of the session's output reached its reader.
    OutputAck {
        session: u32,
        bytes: u32,
    },
    /// Guest → host: the session's stdout (or its terminal).
    ExecStdout {
        session: u32,
        data: Vec<u8>,
    },
    ExecStderr {
        session: u32,
        data: Vec<u8>,
    },
    /// Guest → host: the session's command ended; the session is over.
    ExecExit {
        session: u32,
        status: ExitStatus,
    },
    /// Guest → host: the session's command could not be started (an
    /// [`Frame::ExecExit`] follows).
    ExecError {
        session: u32,
        message: String,
    },
    /// Guest → host: `bytes` more of the session's stdin were taken (or
    /// dropped because the command no longer reads).
    StdinAck {
        session: u32,
        bytes: u32,
    },
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

/// Whether the whole frame at the start of `buf` belongs to an exec session
/// or is a stdin acknowledgement (what a host relay routes to its sessions
/// rather than to the main workload's reader), judged by its kind alone.
pub fn is_session_frame(buf: &[u8]) -> bool {
    matches!(
        buf.first(),
        Some(&(EXEC_STDOUT | EXEC_STDERR | EXEC_EXIT | EXEC_ERROR | STDIN_ACK))
    )
}

impl Frame {
    /// The exec session the frame belongs to, if any (stdin
    /// acknowledgements name [`MAIN_SESSION`] for the main workload).
    pub fn session(&self) -> Option<u32> {
        match self {
            Frame::ExecStart { session, .. }
            | Frame::ExecStdin { session, .. }
            | Frame::ExecResize { session, .. }
            | Frame::ExecSignal { session, .. }
            | Frame::OutputAck { session, .. }
            | Frame::ExecStdout { session, .. }
            | Frame::ExecStderr { session, .. }
            | Frame::ExecExit { session, .. }
            | Frame::ExecError { session, .. }
            | Frame::StdinAck { session, .. } => Some(*session),
            _ => None,
        }
    }

    /// The frame as bytes on the wire.
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut p = Vec::new();
        let with_session = |p: &mut Vec<u8>, s: &u32| p.extend_from_slice(&s.to_le_bytes());
        let kind = match self {
            Frame::Ready => READY,
            Frame::Started { unix_nanos } => {
                p.extend_from_slice(&unix_nanos.to_le_bytes());
                STARTED
            }
            Frame::Stdout(b) => {
                p.extend_from_slice(b);
                STDOUT
            }
            Frame::Stderr(b) => {
                p.extend_from_slice(b);
                STDERR
            }
            Frame::Exit(s) => {
                s.encode(&mut p);
                EXIT
            }
            Frame::Error(m) => {
                p.extend_from_slice(m.as_bytes());
                ERROR
            }
            Frame::Signal(s) => {
                p.extend_from_slice(&s.to_le_bytes());
                SIGNAL
            }
            Frame::Stdin(b) => {
                p.extend_from_slice(b);
                STDIN
            }
            Frame::ExecStart { session, request } => {
                with_session(&mut p, session);
                p.extend_from_slice(&request.to_json());
                EXEC_START
            }
            Frame::ExecStdin { session, data } => {
                with_session(&mut p, session);
                p.extend_from_slice(data);
                EXEC_STDIN
            }
            Frame::ExecResize {
                session,
                cols,
                rows,
            } => {
                with_session(&mut p, session);
                p.extend_from_slice(&cols.to_le_bytes());
                p.extend_from_slice(&rows.to_le_bytes());
                EXEC_RESIZE
            }
            Frame::ExecSignal { session, signal } => {
                with_session(&mut p, session);
                p.extend_from_slice(&signal.to_le_bytes());
                EXEC_SIGNAL
            }
            Frame::OutputAck { session, bytes } => {
                with_session(&mut p, session);
                p.extend_from_slice(&bytes.to_le_bytes());
                OUTPUT_ACK
            }
            Frame::ExecStdout { session, data } => {
                with_session(&mut p, session);
                p.extend_from_slice(data);
                EXEC_STDOUT
            }
            Frame::ExecStderr { session, data } => {
                with_session(&mut p, session);
                p.extend_from_slice(data);
                EXEC_STDERR
            }
            Frame::ExecExit { session, status } => {
                with_session(&mut p, session);
                status.encode(&mut p);
                EXEC_EXIT
            }
            Frame::ExecError { session, message } => {
                with_session(&mut p, session);
                p.extend_from_slice(message.as_bytes());
                EXEC_ERROR
            }
            Frame::StdinAck { session, bytes } => {
                with_session(&mut p, session);
                p.extend_from_slice(&bytes.to_le_bytes());
                STDIN_ACK
            }
        };
        if p.len() > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge { kind, len: p.len() });
        }
        let mut buf = Vec::with_capacity(HEADER_LEN + p.len());
        buf.push(kind);
        buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
        buf.extend_from_slice(&p);
        Ok(buf)
    }

    /// Writes the frame in one `write_all` so frames from one writer never
    /// interleave on the byte stream.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), ProtoError> {
        let buf = self.encode()?;
        w.write_all(&buf)?;
        w.flush()?;
        Ok(())
    }

    /// Decodes one whole frame (as [`whole_frame_len`] measured it).
    pub fn decode(frame: &[u8]) -> Result<Frame, ProtoError> {
        let Some(len) = whole_frame_len(frame)? else {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        };
        Self::decode_payload(frame[0], frame[HEADER_LEN..len].to_vec())
    }

    fn decode_payload(kind: u8, payload: Vec<u8>) -> Result<Frame, ProtoError> {
        let len = payload.len();
        let malformed = || ProtoError::Malformed { kind, len };
        // Session frames start with the session number.
        let session = || u32_at(&payload, 0).ok_or_else(malformed);
        let rest = || payload.get(4..).unwrap_or_default().to_vec();
        Ok(match kind {
            READY => Frame::Ready,
            STARTED => Frame::Started {
                unix_nanos: payload
                    .as_slice()
                    .try_into()
                    .map(u64::from_le_bytes)
                    .map_err(|_| malformed())?,
            },
            STDOUT => Frame::Stdout(payload),
            STDERR => Frame::Stderr(payload),
            EXIT => Frame::Exit(ExitStatus::decode(&payload).ok_or_else(malformed)?),
            ERROR => Frame::Error(String::from_utf8_lossy(&payload).into_owned()),
            SIGNAL => Frame::Signal(
                i32_at(&payload, 0)
                    .filter(|_| len == 4)
                    .ok_or_else(malformed)?,
            ),
            STDIN => Frame::Stdin(payload),
            EXEC_START => Frame::ExecStart {
                session: session()?,
                request: ExecRequest::from_json(&rest()).map_err(|_| malformed())?,
            },
            EXEC_STDIN => Frame::ExecStdin {
                session: session()?,
                data: rest(),
            },
            EXEC_RESIZE if len == 8 => Frame::ExecResize {
                session: session()?,
                cols: u16::from_le_bytes([payload[4], payload[5]]),
                rows: u16::from_le_bytes([payload[6], payload[7]]),
            },
            EXEC_SIGNAL if len == 8 => Frame::ExecSignal {
                session: session()?,
                signal: i32_at(&payload, 4).ok_or_else(malformed)?,
            },
            OUTPUT_ACK if len == 8 => Frame::OutputAck {
                session: session()?,
                bytes: u32_at(&payload, 4).ok_or_else(malformed)?,
            },
            STDIN_ACK if len == 8 => Frame::StdinAck {
                session: session()?,
                bytes: u32_at(&payload, 4).ok_or_else(malformed)?,
            },
            EXEC_STDOUT => Frame::ExecStdout {
                session: session()?,
                data: rest(),
            },
            EXEC_STDERR => Frame::ExecStderr {
                session: session()?,
                data: rest(),
            },
            EXEC_EXIT => Frame::ExecExit {
                session: session()?,
                status: ExitStatus::decode(&payload[4.min(len)..]).ok_or_else(malformed)?,
            },
            EXEC_ERROR => Frame::ExecError {
                session: session()?,
                message: String::from_utf8_lossy(&rest()).into_owned(),
            },
            EXEC_RESIZE | EXEC_SIGNAL | OUTPUT_ACK | STDIN_ACK => return Err(malformed()),
            other => return Err(ProtoError::UnknownKind(other)),
        })
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream (between frames).
    pub fn read_from(r: &mut impl Read) -> Result<Option<Frame>, ProtoError> {
        let mut head = [0u8; HEADER_LEN];
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
        Self::decode_payload(kind, payload).map(Some)
    }
}

/// Splits a byte stream into frames as its bytes arrive: push what was
/// read, then take whole frames out. Holds at most one partial frame.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
}

impl FrameBuffer {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame's bytes, `Ok(None)` while it is incomplete. On
    /// an error the buffered bytes are dropped (the stream is not frames).
    pub fn next_raw(&mut self) -> Result<Option<Vec<u8>>, ProtoError> {
        match whole_frame_len(&self.buf) {
            Ok(Some(n)) => Ok(Some(self.buf.drain(..n).collect())),
            Ok(None) => Ok(None),
            Err(e) => {
                self.buf.clear();
                Err(e)
            }
        }
    }

    /// The next whole frame, decoded.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        match self.next_raw()? {
            Some(raw) => Frame::decode(&raw).map(Some),
            None => Ok(None),
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_kind_round_trips_on_one_stream() {
        let frames = vec![
            Frame::Ready,
            Frame::Started {
                unix_nanos: 1_764_000_000_123_456_789,
            },
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
            Frame::ExecStart {
                session: 7,
                request: ExecRequest {
                    argv: vec!["sh".into(), "-c".into(), "id".into()],
                    env: vec!["A=1".into()],
                    workdir: Some("/tmp".into()),
                    user: Some((1, 2)),
                    tty: true,
                    stdin: true,
                    cols: 80,
                    rows: 24,
                },
            },
            Frame::ExecStdin {
                session: 7,
                data: b"ls\n".to_vec(),
            },
            Frame::ExecStdin {
                session: 7,
                data: Vec::new(),
            },
            Frame::ExecResize {
                session: 7,
                cols: 132,
                rows: 43,
            },
            Frame::ExecSignal {
                session: 7,
                signal: 2,
            },
            Frame::OutputAck {
                session: 7,
                bytes: 4096,
            },
            Frame::ExecStdout {
                session: u32::MAX,
                data: b"out".to_vec(),
            },
            Frame::ExecStderr {
                session: 1,
                data: Vec::new(),
            },
            Frame::ExecError {
                session: 1,
                message: "exec nope: not found".into(),
            },
            Frame::ExecExit {
                session: 1,
                status: ExitStatus {
                    code: 127,
                    signal: 0,
                    oom_killed: false,
                },
            },
            Frame::StdinAck {
                session: MAIN_SESSION,
                bytes: 3,
            },
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

    #[test]
    fn session_frames_name_their_session_and_are_told_apart_by_kind() {
        let out = Frame::ExecStdout {
            session: 9,
            data: b"x".to_vec(),
        };
        assert_eq!(out.session(), Some(9));
        assert!(is_session_frame(&out.encode().unwrap()));
        let ack = Frame::StdinAck {
            session: MAIN_SESSION,
            bytes: 1,
        };
        assert!(is_session_frame(&ack.encode().unwrap()));
        for main in [
            Frame::Ready,
            Frame::Stdout(b"x".to_vec()),
            Frame::Signal(15),
        ] {
            assert_eq!(main.session(), None);
            assert!(!is_session_frame(&main.encode().unwrap()));
        }
    }

    #[test]
    fn session_frames_too_short_for_their_fields_are_malformed_not_a_panic() {
        for kind in [
            EXEC_START,
            EXEC_STDIN,
            EXEC_RESIZE,
            EXEC_SIGNAL,
            OUTPUT_ACK,
            EXEC_STDOUT,
            EXEC_STDERR,
            EXEC_EXIT,
            EXEC_ERROR,
            STDIN_ACK,
        ] {
            // Variable-length kinds need only the session number.
            let fixed = !matches!(kind, EXEC_STDIN | EXEC_STDOUT | EXEC_STDERR | EXEC_ERROR);
            let lens: &[usize] = if fixed { &[0, 3, 5] } else { &[0, 3] };
            for &len in lens {
                let mut wire = vec![kind];
                wire.extend_from_slice(&(len as u32).to_le_bytes());
                wire.extend(std::iter::repeat_n(1u8, len));
                let res = Frame::decode(&wire);
                assert!(
                    matches!(res, Err(ProtoError::Malformed { .. })),
                    "kind {kind} len {len}: {res:?}"
                );
            }
        }
        // A start whose request has no command is refused too.
        let mut wire = vec![EXEC_START];
        let payload = [&1u32.to_le_bytes()[..], br#"{"argv":[]}"#].concat();
        wire.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        wire.extend_from_slice(&payload);
        assert!(Frame::decode(&wire).is_err());
    }

    #[test]
    fn a_frame_buffer_yields_whole_frames_however_the_bytes_are_split() {
        let frames = [
            Frame::ExecStdout {
                session: 3,
                data: vec![b'a'; 1000],
            },
            Frame::Stdout(b"main".to_vec()),
            Frame::OutputAck {
                session: 3,
                bytes: 1000,
            },
        ];
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().unwrap()).collect();
        for chunk in [1usize, 7, 4096] {
            let mut fb = FrameBuffer::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                fb.push(piece);
                while let Some(f) = fb.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "chunk {chunk}");
            assert!(fb.is_empty());
        }
        let mut bad = FrameBuffer::default();
        bad.push(&[STDOUT, 0xff, 0xff, 0xff, 0xff]);
        assert!(bad.next_raw().is_err());
        assert!(bad.is_empty(), "bytes that are not frames are dropped");
    }
}
