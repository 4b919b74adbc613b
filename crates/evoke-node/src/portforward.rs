//! `kubectl port-forward` on the node endpoint.
//!
//! kubectl 1.31+ tunnels SPDY/3.1 through a WebSocket (subprotocol
//! `SPDY/3.1+portforward.k8s.io`): the binary messages carry a plain SPDY
//! byte stream. For every local connection kubectl opens two SPDY streams
//! with the headers `streamType` (`error` or `data`), `port` and
//! `requestID`; once both of a request exist, the node connects to that
//! port on the pod's loopback and copies bytes between the data stream
//! and the connection. A failure is written as text on the error stream,
//! which kubectl prints; a clean end is a FIN on both streams.
//!
//! Only the part of SPDY/3 that kubectl uses is spoken: SYN_STREAM (a
//! SYN_REPLY accepts it), DATA with FIN, RST_STREAM, PING (echoed),
//! SETTINGS, WINDOW_UPDATE and GOAWAY (ignored: the Go client keeps no
//! flow-control windows). Header blocks are one zlib stream per direction
//! with SPDY's preset dictionary.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The WebSocket subprotocol kubectl asks for.
pub const PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

const VERSION: u32 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 1;

/// Opens a TCP connection to `port` inside the pod.
pub type Connector = Arc<dyn Fn(u16) -> std::io::Result<std::net::TcpStream> + Send + Sync>;

/// The header names of SPDY/3's zlib dictionary, each stored with a
/// 32-bit length in front, followed by [`DICTIONARY_TAIL`] (the SPDY/3
/// specification, section 2.6.10.1).
const DICTIONARY_WORDS: [&str; 65] = [
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

/// SPDY/3's preset dictionary for header compression.
pub fn dictionary() -> Vec<u8> {
    let mut d = Vec::with_capacity(1423);
    for w in DICTIONARY_WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(DICTIONARY_TAIL.as_bytes());
    d
}

/// One SPDY frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        fin: bool,
        data: Vec<u8>,
    },
    Control {
        kind: u16,
        flags: u8,
        payload: Vec<u8>,
    },
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Takes one whole frame off the front of `buf`, if it holds one.
pub fn next_frame(buf: &mut Vec<u8>) -> Option<Frame> {
    if buf.len() < 8 {
        return None;
    }
    let first = be32(&buf[..4]);
    let second = be32(&buf[4..8]);
    let flags = (second >> 24) as u8;
    let len = (second & 0x00ff_ffff) as usize;
    if buf.len() < 8 + len {
        return None;
    }
    let payload: Vec<u8> = buf.drain(..8 + len).skip(8).collect();
    Some(if first & 0x8000_0000 != 0 {
        Frame::Control {
            kind: (first & 0xffff) as u16,
            flags,
            payload,
        }
    } else {
        Frame::Data {
            stream: first & 0x7fff_ffff,
            fin: flags & FLAG_FIN != 0,
            data: payload,
        }
    })
}

/// A frame's bytes.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let (first, flags, body) = match frame {
        Frame::Data { stream, fin, data } => {
            (stream & 0x7fff_ffff, if *fin { FLAG_FIN } else { 0 }, data)
        }
        Frame::Control {
            kind,
            flags,
            payload,
        } => (
            0x8000_0000 | (VERSION << 16) | *kind as u32,
            *flags,
            payload,
        ),
    };
    let mut v = Vec::with_capacity(8 + body.len());
    v.extend_from_slice(&first.to_be_bytes());
    v.extend_from_slice(&(((flags as u32) << 24) | body.len() as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// The name/value block inside SYN_STREAM and SYN_REPLY, before zlib.
fn parse_headers(raw: &[u8]) -> Result<HashMap<String, String>, String> {
    let bad = || "malformed header block".to_string();
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let s = raw.get(at..at + n).ok_or_else(bad)?;
        at += n;
        Ok(s)
    };
    let count = be32(take(4)?);
    let mut h = HashMap::new();
    for _ in 0..count {
        let n = be32(take(4)?) as usize;
        let name = String::from_utf8_lossy(take(n)?).to_ascii_lowercase();
        let n = be32(take(4)?) as usize;
        let value = String::from_utf8_lossy(take(n)?).into_owned();
        h.insert(name, value);
    }
    Ok(h)
}

fn header_block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut v = (headers.len() as u32).to_be_bytes().to_vec();
    for (k, val) in headers {
        v.extend_from_slice(&(k.len() as u32).to_be_bytes());
        v.extend_from_slice(k.as_bytes());
        v.extend_from_slice(&(val.len() as u32).to_be_bytes());
        v.extend_from_slice(val.as_bytes());
    }
    v
}

/// Header compression for one direction each: a single zlib stream with
/// the SPDY dictionary, flushed at the end of every block.
pub struct HeaderCodec {
    inflate: Decompress,
    deflate: Compress,
    dict: Vec<u8>,
    dict_set: bool,
}

impl Default for HeaderCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderCodec {
    pub fn new() -> Self {
        HeaderCodec {
            inflate: Decompress::new(true),
            deflate: Compress::new(Compression::default(), true),
            dict: dictionary(),
            dict_set: false,
        }
    }

    /// Inflates one compressed header block and parses it.
    pub fn decode(&mut self, mut block: &[u8]) -> Result<HashMap<String, String>, String> {
        let mut out = Vec::with_capacity(1024);
        loop {
            if out.capacity() - out.len() < 256 {
                out.reserve(4096);
            }
            let (before, produced) = (self.inflate.total_in(), out.len());
            let res = self
                .inflate
                .decompress_vec(block, &mut out, FlushDecompress::Sync);
            let used = (self.inflate.total_in() - before) as usize;
            block = &block[used..];
            match res {
                Ok(_) => {
                    let stuck = used == 0 && out.len() == produced;
                    if block.is_empty() && (out.capacity() > out.len() || stuck) {
                        break;
                    }
                    if stuck && out.capacity() > out.len() {
                        return Err("header block: the zlib stream stopped early".into());
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(&self.dict)
                        .map_err(|e| format!("header dictionary: {e}"))?;
                }
                Err(e) => return Err(format!("header block: {e}")),
            }
        }
        parse_headers(&out)
    }

    /// Compresses a header block.
    pub fn encode(&mut self, headers: &[(&str, &str)]) -> Result<Vec<u8>, String> {
        if !self.dict_set {
            self.deflate
                .set_dictionary(&self.dict)
                .map_err(|e| format!("header dictionary: {e}"))?;
            self.dict_set = true;
        }
        let raw = header_block(headers);
        let mut input = &raw[..];
        let mut out = Vec::with_capacity(256);
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(1024);
            }
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| format!("header block: {e}"))?;
            input = &input[(self.deflate.total_in() - before) as usize..];
            if input.is_empty() && out.capacity() > out.len() {
                return Ok(out);
            }
        }
    }
}

fn syn_reply(codec: &mut HeaderCodec, stream: u32) -> Result<Vec<u8>, String> {
    let mut payload = stream.to_be_bytes().to_vec();
    payload.extend(codec.encode(&[])?);
    Ok(encode(&Frame::Control {
        kind: SYN_REPLY,
        flags: 0,
        payload,
    }))
}

fn data(stream: u32, fin: bool, bytes: &[u8]) -> Vec<u8> {
    encode(&Frame::Data {
        stream,
        fin,
        data: bytes.to_vec(),
    })
}

/// The two streams of one forwarded connection.
#[derive(Default)]
struct Request {
    port: u16,
    data: Option<u32>,
    error: Option<u32>,
    /// Bytes from kubectl for the pod connection; `None` is its FIN.
    to_pod: Option<mpsc::UnboundedSender<Option<Vec<u8>>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Serves one port-forward session on `socket` for the pod reached by
/// `connect`, allowing only `ports` (any port when empty).
pub async fn session(socket: WebSocket, connect: Connector, ports: Vec<u16>) {
    let (mut sink, mut incoming) = socket.split();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(b) = out_rx.recv().await {
            if sink.send(Message::Binary(Bytes::from(b))).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut codec = HeaderCodec::new();
    let mut buf = Vec::new();
    let mut requests: HashMap<String, Request> = HashMap::new();
    // stream id -> request id
    let mut streams: HashMap<u32, String> = HashMap::new();
    'session: while let Some(Ok(msg)) = incoming.next().await {
        match msg {
            Message::Binary(b) => buf.extend_from_slice(&b),
            Message::Close(_) => break,
            _ => continue,
        }
        while let Some(frame) = next_frame(&mut buf) {
            match frame {
                Frame::Control {
                    kind: SYN_STREAM,
                    payload,
                    ..
                } if payload.len() >= 10 => {
                    let id = be32(&payload[..4]) & 0x7fff_ffff;
                    let headers = match codec.decode(&payload[10..]) {
                        Ok(h) => h,
                        Err(e) => {
                            tracing::warn!(error = %e, "port-forward: bad SYN_STREAM; ending the session");
                            break 'session;
                        }
                    };
                    match syn_reply(&mut codec, id) {
                        Ok(f) => {
                            let _ = out_tx.send(f);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "port-forward: cannot answer a stream");
                            break 'session;
                        }
                    }
                    let req_id = headers.get("requestid").cloned().unwrap_or_default();
                    let port: u16 = headers
                        .get("port")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                    streams.insert(id, req_id.clone());
                    let r = requests.entry(req_id.clone()).or_default();
                    r.port = port;
                    match headers.get("streamtype").map(String::as_str) {
                        Some("data") => r.data = Some(id),
                        Some("error") => r.error = Some(id),
                        _ => {}
                    }
                    if let (Some(d), Some(e), None) = (r.data, r.error, r.task.as_ref()) {
                        let (tx, rx) = mpsc::unbounded_channel();
                        r.to_pod = Some(tx);
                        r.task = Some(tokio::spawn(forward(
                            connect.clone(),
                            port,
                            port != 0 && (ports.is_empty() || ports.contains(&port)),
                            d,
                            e,
                            rx,
                            out_tx.clone(),
                        )));
                    }
                }
                Frame::Data { stream, fin, data } => {
                    let Some(r) = streams.get(&stream).and_then(|q| requests.get_mut(q)) else {
                        continue;
                    };
                    if r.data != Some(stream) {
                        // kubectl only closes its side of the error stream.
                        continue;
                    }
                    if let Some(tx) = r.to_pod.as_ref() {
                        if !data.is_empty() {
                            let _ = tx.send(Some(data));
                        }
                        if fin {
                            let _ = tx.send(None);
                            r.to_pod = None;
                        }
                    }
                }
                Frame::Control {
                    kind: RST_STREAM,
                    payload,
                    ..
                } if payload.len() >= 4 => {
                    let id = be32(&payload[..4]) & 0x7fff_ffff;
                    if let Some(q) = streams.remove(&id) {
                        // kubectl resets the data stream when it is done
                        // with a connection (or gives up on it): stop
                        // forwarding, and end the error stream it still
                        // reads unless that already happened.
                        if let Some(r) = requests.remove(&q) {
                            if let Some(t) = r.task {
                                if !t.is_finished() {
                                    t.abort();
                                    if let Some(e) = r.error {
                                        let _ = out_tx.send(data(e, true, &[]));
                                    }
                                }
                            }
                        }
                    }
                }
                Frame::Control {
                    kind: PING,
                    flags,
                    payload,
                } => {
                    let _ = out_tx.send(encode(&Frame::Control {
                        kind: PING,
                        flags,
                        payload,
                    }));
                }
                Frame::Control { kind: GOAWAY, .. } => break 'session,
                // SETTINGS, WINDOW_UPDATE, HEADERS: nothing to do.
                Frame::Control { .. } => {}
            }
        }
    }
    for (_, r) in requests {
        if let Some(t) = r.task {
            t.abort();
        }
    }
    drop(out_tx);
    let _ = writer.await;
}

/// One forwarded connection: connect, then copy both ways; errors go to
/// kubectl as text on the error stream.
async fn forward(
    connect: Connector,
    port: u16,
    allowed: bool,
    data_id: u32,
    error_id: u32,
    mut from_client: mpsc::UnboundedReceiver<Option<Vec<u8>>>,
    out: mpsc::UnboundedSender<Vec<u8>>,
) {
    let fail = |msg: String| {
        let _ = out.send(data(error_id, true, msg.as_bytes()));
        let _ = out.send(data(data_id, true, &[]));
    };
    if !allowed {
        fail(format!(
            "port {port} was not asked for in this port-forward request"
        ));
        return;
    }
    let std_tcp = match tokio::task::spawn_blocking(move || connect(port)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(format!("error forwarding port {port} to pod: {e}")),
        Err(e) => return fail(format!("error forwarding port {port} to pod: {e}")),
    };
    let tcp = match std_tcp
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(std_tcp))
    {
        Ok(t) => t,
        Err(e) => return fail(format!("error forwarding port {port} to pod: {e}")),
    };
    let (mut rd, mut wr) = tcp.into_split();
    // Client to pod runs on its own: it ends with kubectl's FIN, or when
    // the session drops the sender (the streams were reset).
    tokio::spawn(async move {
        while let Some(Some(chunk)) = from_client.recv().await {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut b = vec![0u8; 32 * 1024];
    loop {
        match rd.read(&mut b).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.send(data(data_id, false, &b[..n])).is_err() {
                    return;
                }
            }
        }
    }
    // The pod closed: FIN on the data stream, and a FIN with no text on
    // the error stream (no error), which kubectl waits for before it
    // closes the local connection.
    let _ = out.send(data(data_id, true, &[]));
    let _ = out.send(data(error_id, true, &[]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        // Its Adler-32, which zlib streams carry as the dictionary id.
        let (mut a, mut b) = (1u32, 0u32);
        for x in &d {
            a = (a + *x as u32) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!((b << 16) | a, 0xe3c6_a7c2);
    }

    #[test]
    fn header_blocks_round_trip_through_one_zlib_stream_each_way() {
        let mut client = HeaderCodec::new();
        let mut server = HeaderCodec::new();
        for id in ["0", "1", "2"] {
            let block = client
                .encode(&[("streamtype", "data"), ("port", "8080"), ("requestid", id)])
                .expect("encode");
            let h = server.decode(&block).expect("decode");
            assert_eq!(h["streamtype"], "data");
            assert_eq!(h["port"], "8080");
            assert_eq!(h["requestid"], id);
        }
    }

    #[test]
    fn frames_are_split_from_a_byte_stream_in_any_chunks() {
        let a = encode(&Frame::Data {
            stream: 3,
            fin: true,
            data: b"hello".to_vec(),
        });
        let b = encode(&Frame::Control {
            kind: PING,
            flags: 0,
            payload: 7u32.to_be_bytes().to_vec(),
        });
        let all = [a, b].concat();
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for chunk in all.chunks(3) {
            buf.extend_from_slice(chunk);
            while let Some(f) = next_frame(&mut buf) {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            vec![
                Frame::Data {
                    stream: 3,
                    fin: true,
                    data: b"hello".to_vec()
                },
                Frame::Control {
                    kind: PING,
                    flags: 0,
                    payload: 7u32.to_be_bytes().to_vec()
                }
            ]
        );
        assert!(buf.is_empty());
    }

    fn syn_stream(codec: &mut HeaderCodec, id: u32, kind: &str, port: u16, req: &str) -> Vec<u8> {
        let mut payload = id.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let port = port.to_string();
        payload.extend(
            codec
                .encode(&[("streamtype", kind), ("port", &port), ("requestid", req)])
                .expect("encode"),
        );
        encode(&Frame::Control {
            kind: SYN_STREAM,
            flags: 0,
            payload,
        })
    }

    /// A session served by axum on a free port, forwarding to `allowed`.
    async fn serve_session(allowed: u16) -> u16 {
        use axum::extract::ws::WebSocketUpgrade;
        let connect: Connector = Arc::new(|port| std::net::TcpStream::connect(("127.0.0.1", port)));
        let app = axum::Router::new().route(
            "/pf",
            axum::routing::get(move |ws: WebSocketUpgrade| async move {
                ws.protocols([PROTOCOL])
                    .on_upgrade(move |socket| session(socket, connect, vec![allowed]))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        port
    }

    #[tokio::test]
    async fn a_forwarded_connection_carries_bytes_both_ways_and_ends_with_fins() {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::Message as WsMessage;
        // The "pod": an echo server.
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut c, _) = echo.accept().await.unwrap();
            let mut all = Vec::new();
            c.read_to_end(&mut all).await.unwrap();
            c.write_all(&all).await.unwrap();
        });
        let port = serve_session(echo_port).await;
        let mut req = format!("ws://127.0.0.1:{port}/pf")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("sec-websocket-protocol", PROTOCOL.parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let mut codec = HeaderCodec::new();
        let mut send = Vec::new();
        send.extend(syn_stream(&mut codec, 1, "error", echo_port, "0"));
        send.extend(syn_stream(&mut codec, 3, "data", echo_port, "0"));
        send.extend(data(3, true, b"ping\n"));
        // A port the request did not name is refused on its error stream.
        send.extend(syn_stream(&mut codec, 5, "error", 1, "1"));
        send.extend(syn_stream(&mut codec, 7, "data", 1, "1"));
        // Frames may be split anywhere across messages.
        for chunk in send.chunks(7) {
            ws.send(WsMessage::binary(chunk.to_vec())).await.unwrap();
        }
        let mut buf = Vec::new();
        let mut replies = 0;
        let mut got: HashMap<u32, (Vec<u8>, bool)> = HashMap::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !(replies == 4
            && got.get(&1).is_some_and(|g| g.1)
            && got.get(&3).is_some_and(|g| g.1)
            && got.get(&5).is_some_and(|g| g.1))
        {
            let m = tokio::time::timeout_at(deadline, ws.next())
                .await
                .expect("frames before the deadline")
                .expect("open")
                .expect("message");
            if let WsMessage::Binary(b) = m {
                buf.extend_from_slice(&b);
            }
            while let Some(f) = next_frame(&mut buf) {
                match f {
                    Frame::Control {
                        kind: SYN_REPLY,
                        payload,
                        ..
                    } => {
                        codec.decode(&payload[4..]).expect("reply headers");
                        replies += 1;
                    }
                    Frame::Data { stream, fin, data } => {
                        let e = got.entry(stream).or_default();
                        e.0.extend(data);
                        e.1 |= fin;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(got[&3].0, b"ping\n");
        assert_eq!(got[&1].0, b"", "no error for the forwarded port");
        let refused = String::from_utf8_lossy(&got[&5].0);
        assert!(refused.contains("port 1 was not asked for"), "{refused}");
    }
}
