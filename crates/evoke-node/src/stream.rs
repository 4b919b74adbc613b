//! `exec` on the node endpoint: the kubelet's streaming side of
//! `kubectl exec`, over the WebSocket remote-command protocol that kubectl
//! 1.30+ speaks (`v5.channel.k8s.io`, also `v4.channel.k8s.io`).
//!
//! Every WebSocket message is binary and starts with a channel byte:
//! 0 stdin (client → node), 1 stdout, 2 stderr, 3 the final status as a
//! `metav1.Status` JSON, 4 terminal resize JSON (client → node). Version 5
//! adds 255: `[255, n]` closes channel `n`, which is how kubectl says that
//! its stdin reached EOF. The session ends after the status on channel 3,
//! with a normal WebSocket close; kubectl exits with the code carried in
//! the status (`NonZeroExitCode` with an `ExitCode` cause).
//!
//! The command runs through the pod's tier ([`WorkloadRuntime::exec`]):
//! setns into the container with the container's env, user and cwd, as
//! `evoke exec` does. Output is read from pipes and framed here.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use evoke_runtime::{ExecSpec, Stdio, TtySize, WorkloadRuntime};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The subprotocols served, most preferred first.
pub const PROTOCOLS: [&str; 2] = [V5, V4];
pub const V5: &str = "v5.channel.k8s.io";
pub const V4: &str = "v4.channel.k8s.io";

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
/// v5: `[CLOSE, channel]` closes that channel.
pub const CLOSE: u8 = 255;

/// How long output may keep flowing after the command ended (a background
/// child can hold the pipe open forever).
const DRAIN: Duration = Duration::from_secs(2);

/// What `kubectl exec` asks for, from the query string
/// (`command=sh&command=-c&command=...&stdin=true&tty=true`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// Go's strconv.ParseBool, as the kubelet reads these flags.
fn flag(v: &str) -> bool {
    matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

impl ExecRequest {
    /// Parses the query; an exec without a command is an error.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut r = ExecRequest::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "command" => r.command.push(v.into_owned()),
                "stdin" | "input" => r.stdin = flag(&v),
                "stdout" | "output" => r.stdout = flag(&v),
                "stderr" | "error" => r.stderr = flag(&v),
                "tty" => r.tty = flag(&v),
                _ => {}
            }
        }
        if r.command.is_empty() {
            return Err("you must specify at least one command for the container".into());
        }
        // With a terminal, stderr is the terminal too.
        if r.tty {
            r.stderr = false;
        }
        Ok(r)
    }
}

/// The `metav1.Status` sent on channel 3 when the command ends.
pub fn status_for(outcome: &Result<i32, String>) -> serde_json::Value {
    match outcome {
        Ok(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Ok(code) => {
            // kubectl parses the cause as an 8-bit number.
            let code = (*code).clamp(0, 255);
            serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: exit status {code}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            })
        }
        Err(msg) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": msg,
            "reason": "InternalError",
            "code": 500,
        }),
    }
}

/// A resize message: `{"Width": cols, "Height": rows}` (client-go's
/// TerminalSize, JSON-encoded with a trailing newline).
pub fn parse_size(json: &[u8]) -> Option<TtySize> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Size {
        width: u16,
        height: u16,
    }
    let s: Size = serde_json::from_slice(json).ok()?;
    Some(TtySize {
        cols: s.width,
        rows: s.height,
    })
}

/// `[channel] + data`, the frame of every message.
fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::Binary(Bytes::from(v))
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

fn dev_null() -> std::io::Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
}

/// Copies a pipe to the socket as `channel` frames until EOF.
fn pump_out(fd: OwnedFd, channel: u8, out: mpsc::Sender<Message>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
            return;
        };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.send(frame(channel, &buf[..n])).await.is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// Runs `req` in workload `id` of `tier` and speaks the protocol on
/// `socket` until the command ends or the client goes away.
pub async fn session(
    socket: WebSocket,
    protocol: String,
    tier: Arc<dyn WorkloadRuntime>,
    id: String,
    req: ExecRequest,
) {
    let (mut sink, mut incoming) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(16);
    // One writer owns the sink; pumps and the status go through it.
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            let closing = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || closing {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let setup = (|| -> std::io::Result<_> {
        let (stdin_r, stdin_w) = match req.stdin {
            true => {
                let (r, w) = pipe()?;
                (Some(r), Some(w))
            }
            false => (None, None),
        };
        let (stdout_r, stdout_w) = match req.stdout {
            true => {
                let (r, w) = pipe()?;
                (Some(r), w)
            }
            false => (None, dev_null()?),
        };
        let (stderr_r, stderr_w) = match (req.stderr, req.tty) {
            (true, false) => {
                let (r, w) = pipe()?;
                (Some(r), Some(w))
            }
            (false, false) => (None, Some(dev_null()?)),
            // The terminal carries stderr; the tier ignores this stream.
            (_, true) => (None, None),
        };
        Ok((stdin_w, [stdout_r, stderr_r], {
            Stdio {
                stdin: stdin_r,
                stdout: Some(stdout_w),
                stderr: stderr_w,
            }
        }))
    })();
    let (stdin_w, readers, stdio) = match setup {
        Ok(x) => x,
        Err(e) => {
            finish(&out_tx, &Err(format!("exec setup: {e}"))).await;
            drop(out_tx);
            let _ = writer.await;
            return;
        }
    };
    let pumps: Vec<_> = readers
        .into_iter()
        .zip([STDOUT, STDERR])
        .filter_map(|(fd, ch)| fd.map(|fd| pump_out(fd, ch, out_tx.clone())))
        .collect();

    let spec = ExecSpec {
        command: req.command.clone(),
        tty: req.tty,
        ..Default::default()
    };
    let exec_id = id.clone();
    // Sizes from channel 4 go to the tier, which owns the terminal.
    let (sizes_tx, sizes) = std::sync::mpsc::channel::<TtySize>();
    let mut run = tokio::task::spawn_blocking(move || match spec.tty {
        true => tier.exec_with_resize(&exec_id, &spec, stdio, sizes),
        false => tier.exec(&exec_id, &spec, stdio),
    });
    tracing::info!(workload = %id, command = ?req.command, tty = req.tty, %protocol, "exec started");

    let mut stdin = stdin_w.and_then(|w| tokio::net::unix::pipe::Sender::from_owned_fd(w).ok());
    let outcome: Result<i32, String> = loop {
        tokio::select! {
            done = &mut run => {
                break match done {
                    Ok(Ok(code)) => Ok(code),
                    Ok(Err(e)) => Err(format!("error executing command in container: {e}")),
                    Err(e) => Err(format!("error executing command in container: {e}")),
                };
            }
            msg = incoming.next() => match msg {
                Some(Ok(Message::Binary(b))) => match b.first() {
                    Some(&STDIN) => {
                        if let Some(w) = stdin.as_mut() {
                            if w.write_all(&b[1..]).await.is_err() {
                                stdin = None;
                            }
                        }
                    }
                    Some(&CLOSE) if b.get(1) == Some(&STDIN) => stdin = None,
                    Some(&RESIZE) => match parse_size(&b[1..]) {
                        Some(size) => {
                            let _ = sizes_tx.send(size);
                        }
                        None => tracing::debug!(workload = %id, "bad terminal size ignored"),
                    },
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    // The client left: close stdin so the command sees EOF,
                    // then let it finish on its own.
                    drop(stdin.take());
                    drop(pumps);
                    drop(out_tx);
                    let _ = writer.await;
                    let _ = run.await;
                    tracing::info!(workload = %id, "exec client went away");
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    };
    drop(stdin);
    // All output written before the exit goes out before the status.
    for p in pumps {
        let _ = tokio::time::timeout(DRAIN, p).await;
    }
    tracing::info!(workload = %id, outcome = ?outcome, "exec ended");
    finish(&out_tx, &outcome).await;
    drop(out_tx);
    let _ = writer.await;
}

/// Write ends of the stdin of containers with `stdinOnce: true`, by
/// workload id, until their first attach takes them (then None).
type StdinOnce = std::sync::Mutex<std::collections::HashMap<String, Option<OwnedFd>>>;

fn stdin_once() -> &'static StdinOnce {
    static WRITERS: std::sync::OnceLock<StdinOnce> = std::sync::OnceLock::new();
    WRITERS.get_or_init(Default::default)
}

/// The stdin of workload `id`, a container with `stdin` and `stdinOnce`:
/// the read end of a pipe whose write end the node keeps for the
/// container's first attach (`kubectl run -i`, `kubectl attach -i`). When
/// that attach ends, the process reads end-of-file, as the kubelet closes
/// such a stdin; until then it waits for input. Earlier attempts of the
/// same container (the id's prefix) are forgotten. The write end lives in
/// the agent: an agent restart closes it too.
pub fn stdin_once_reader(id: &str) -> Result<OwnedFd, crate::NodeError> {
    let (reader, writer) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| crate::NodeError::Io {
            path: format!("stdin pipe of workload {id}").into(),
            source: e.into(),
        })?;
    let container = id.rsplit_once('_').map_or(id, |(c, _)| c);
    let mut writers = stdin_once().lock().unwrap_or_else(|e| e.into_inner());
    // Forget earlier attempts of this container, writers whose process is
    // gone (a pod deleted without an attach), and, past a bound, the marks
    // of stdins already closed.
    writers.retain(|k, w| {
        k.rsplit_once('_').map_or(k.as_str(), |(c, _)| c) != container
            && w.as_ref().is_none_or(|w| !reader_gone(w))
    });
    if writers.len() > MAX_STDIN_ONCE {
        writers.retain(|_, w| w.is_some());
    }
    writers.insert(id.to_string(), Some(writer));
    Ok(reader)
}

/// How many stdinOnce entries are kept before the marks of closed ones go.
const MAX_STDIN_ONCE: usize = 4096;

/// Whether nobody reads the pipe `w` writes to any more (POLLERR).
fn reader_gone(w: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(w.as_fd(), PollFlags::POLLOUT)];
    poll(&mut fds, PollTimeout::ZERO).is_ok()
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLERR))
}

/// What an attach with stdin gets for workload `id`.
pub(crate) enum OnceStdin {
    /// Not a stdinOnce container: use its kept-open stdin.
    NotOnce,
    /// The first attach: the only writer; dropping it closes the stdin.
    First(OwnedFd),
    /// A stdinOnce container whose first attach has come and gone.
    Closed,
}

/// Takes the stdinOnce writer of workload `id` (see [`stdin_once_reader`]).
pub(crate) fn take_stdin_once(id: &str) -> OnceStdin {
    let mut writers = stdin_once().lock().unwrap_or_else(|e| e.into_inner());
    match writers.get_mut(id) {
        None => OnceStdin::NotOnce,
        Some(w) => w.take().map_or(OnceStdin::Closed, OnceStdin::First),
    }
}

/// `kubectl attach`: the main process's output from now on (stdout and
/// stderr share the container's log, so both arrive on channel 1), until
/// the process ends or the client leaves. With `stdin` (`attach -i`, a
/// writer from [`WorkloadRuntime::open_stdin`]), channel 0 goes to the
/// process's stdin until the client closes it.
pub async fn attach_session(
    socket: WebSocket,
    tier: Arc<dyn WorkloadRuntime>,
    id: String,
    log: std::path::PathBuf,
    stdin: Option<OwnedFd>,
) {
    let (mut sink, mut incoming) = socket.split();
    // A writer of the process's kept-open stdin; dropping it (the client
    // closed its stdin or left) is no EOF for the process, unless it is
    // a stdinOnce container's only writer.
    let mut stdin = stdin.and_then(|w| tokio::net::unix::pipe::Sender::from_owned_fd(w).ok());
    let mut offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    tracing::info!(workload = %id, "attach started");
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let (t, w) = (tier.clone(), id.clone());
                let running = tokio::task::spawn_blocking(move || {
                    matches!(t.state(&w).map(|s| s.state), Ok(evoke_runtime::WorkloadState::Running { .. }))
                })
                .await
                .unwrap_or(false);
                let mut buf = Vec::new();
                if let Ok(mut f) = tokio::fs::File::open(&log).await {
                    use tokio::io::AsyncSeekExt;
                    if f.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                        let _ = f.read_to_end(&mut buf).await;
                    }
                }
                if !buf.is_empty() {
                    offset += buf.len() as u64;
                    if sink.send(frame(STDOUT, &buf)).await.is_err() {
                        return;
                    }
                }
                if !running {
                    break;
                }
            }
            msg = incoming.next() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    tracing::info!(workload = %id, "attach client went away");
                    return;
                }
                Some(Ok(Message::Binary(b))) => match b.first() {
                    Some(&STDIN) => {
                        if let Some(w) = stdin.as_mut() {
                            if w.write_all(&b[1..]).await.is_err() {
                                stdin = None;
                            }
                        }
                    }
                    Some(&CLOSE) if b.get(1) == Some(&STDIN) => stdin = None,
                    _ => {}
                },
                Some(Ok(_)) => {}
            },
        }
    }
    drop(stdin);
    tracing::info!(workload = %id, "attach ended: the process exited");
    let status = status_for(&Ok(0)).to_string();
    let _ = sink.send(frame(ERROR, status.as_bytes())).await;
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: "".into(),
        })))
        .await;
    let _ = sink.close().await;
}

/// The status on channel 3, then a normal close.
async fn finish(out: &mpsc::Sender<Message>, outcome: &Result<i32, String>) {
    let status = status_for(outcome).to_string();
    let _ = out.send(frame(ERROR, status.as_bytes())).await;
    let _ = out
        .send(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: "".into(),
        })))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stdin_once_writer_goes_to_the_first_attach_only_and_is_forgotten_with_its_reader() {
        let id = format!("uid-{}_c_0", std::process::id());
        let reader = stdin_once_reader(&id).expect("pipe");
        let OnceStdin::First(writer) = take_stdin_once(&id) else {
            panic!("the first attach gets the writer");
        };
        assert!(matches!(take_stdin_once(&id), OnceStdin::Closed));
        assert!(matches!(take_stdin_once("no-such_c_0"), OnceStdin::NotOnce));
        // Dropping the only writer is end-of-file for the process.
        drop(writer);
        let mut buf = [0u8; 1];
        assert_eq!(nix::unistd::read(&reader, &mut buf).expect("read"), 0);
        // A next attempt replaces the container's entry; a writer whose
        // reader is gone is forgotten at the next insert.
        let next = format!("uid-{}_c_1", std::process::id());
        let other = format!("uid-{}_d_0", std::process::id());
        drop(stdin_once_reader(&next).expect("pipe"));
        assert!(matches!(take_stdin_once(&id), OnceStdin::NotOnce));
        let _keep = stdin_once_reader(&other).expect("pipe");
        assert!(matches!(take_stdin_once(&next), OnceStdin::NotOnce));
        assert!(matches!(take_stdin_once(&other), OnceStdin::First(_)));
    }

    #[test]
    fn exec_query_keeps_repeated_commands_in_order_and_tty_takes_stderr() {
        let r = ExecRequest::parse(
            "command=sh&command=-c&command=echo+hi%3B+exit+3&container=c&stdin=true&stdout=true&stderr=true&tty=true",
        )
        .expect("parse");
        assert_eq!(r.command, ["sh", "-c", "echo hi; exit 3"]);
        assert!(r.stdin && r.stdout && r.tty && !r.stderr);
        let e = ExecRequest::parse("stdout=1").expect_err("no command");
        assert!(e.contains("at least one command"), "{e}");
    }

    #[test]
    fn resize_messages_are_client_go_terminal_sizes() {
        assert_eq!(
            parse_size(b"{\"Width\":101,\"Height\":33}\n"),
            Some(TtySize {
                cols: 101,
                rows: 33
            })
        );
        assert_eq!(parse_size(b"{\"Width\":-1}"), None);
    }

    #[test]
    fn status_carries_the_exit_code_as_kubectl_reads_it() {
        assert_eq!(status_for(&Ok(0))["status"], "Success");
        let s = status_for(&Ok(3));
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        assert_eq!(
            status_for(&Ok(300))["details"]["causes"][0]["message"],
            "255"
        );
        let e = status_for(&Err("no such file".into()));
        assert_eq!(
            (e["status"].as_str(), e["message"].as_str()),
            (Some("Failure"), Some("no such file"))
        );
    }
}
