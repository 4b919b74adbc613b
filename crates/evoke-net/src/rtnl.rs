//! A blocking route-netlink client for the pod attach path.
//!
//! Why not rtnetlink's async `Handle`: attaching a pod took about fifteen
//! request/answer round trips, each hopping between the caller's thread, a
//! connection task and a runtime shared by every pod, so a burst of pods
//! queued behind one another. The kernel answers a route-netlink request
//! inside the `sendmsg` call that carries it, so a plain socket per caller
//! gets its answer without any wake-up, and several requests can travel in
//! one `sendmsg` ([`Rtnl::batch`]): the kernel runs them in order and acks
//! each one. The messages themselves are built with rtnetlink's builders.
//!
//! A socket stays bound to the network namespace it was created in, so a
//! socket made on a thread inside a pod's namespace configures that pod
//! from any thread later.

use std::io;

use rtnetlink::packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLM_F_ACK};
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Flags for a request that creates something new (`ip ... add`).
pub const CREATE: u16 = NLM_F_CREATE | NLM_F_EXCL;
/// Flags for a request that creates or replaces (`ip ... replace`).
pub const REPLACE: u16 = NLM_F_CREATE | NLM_F_REPLACE;
/// Flags for a request that changes or reads something that exists.
pub const CHANGE: u16 = 0;

/// What the kernel said to one request of a batch: an answer message (for
/// a get) or a plain ack, or the errno it failed with.
pub type Answer = Result<Option<RouteNetlinkMessage>, i32>;

/// The largest datagram the kernel sends for the requests made here (a link
/// message with all its attributes is a few KiB).
const RECV_BUF: usize = 64 * 1024;

/// A route-netlink socket of one namespace.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Sends `reqs` in one `sendmsg` and returns the kernel's answer to each,
    /// in order. A failed request does not stop the ones after it (each
    /// answer says how it went); only a socket error fails the whole call.
    pub fn batch(&mut self, reqs: Vec<(RouteNetlinkMessage, u16)>) -> io::Result<Vec<Answer>> {
        let first = self.seq.wrapping_add(1);
        let n = reqs.len();
        let mut out: Vec<u8> = Vec::new();
        for (i, (msg, flags)) in reqs.into_iter().enumerate() {
            let mut nl = NetlinkMessage::from(msg);
            nl.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
            nl.header.sequence_number = first.wrapping_add(i as u32);
            nl.finalize();
            let at = out.len();
            out.resize(at + nl.buffer_len(), 0);
            nl.serialize(&mut out[at..]);
            // Messages in one datagram start on 4-byte boundaries.
            out.resize(out.len().next_multiple_of(4), 0);
        }
        self.seq = first.wrapping_add(n as u32);
        if n == 0 {
            return Ok(Vec::new());
        }
        self.sock.send(&out, 0)?;

        let mut replies: Vec<Option<RouteNetlinkMessage>> = (0..n).map(|_| None).collect();
        let mut answers: Vec<Option<Answer>> = (0..n).map(|_| None).collect();
        while answers.iter().any(Option::is_none) {
            self.buf.clear();
            self.buf.reserve(RECV_BUF);
            let got = self.sock.recv(&mut self.buf, 0)?;
            let data = &self.buf[..got.min(self.buf.len())];
            let mut off = 0;
            while off < data.len() {
                let len = NetlinkBuffer::new_checked(&data[off..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
                    .length() as usize;
                if len == 0 || off + len > data.len() {
                    break;
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..off + len])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                off += len.next_multiple_of(4);
                let i = msg.header.sequence_number.wrapping_sub(first) as usize;
                if i >= n {
                    continue; // not ours: a stale answer of an earlier call
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => replies[i] = Some(m),
                    NetlinkPayload::Error(e) => {
                        answers[i] = Some(match e.code {
                            None => Ok(replies[i].take()),
                            Some(code) => Err(-code.get()),
                        });
                    }
                    // Done, Noop, Overrun: nothing a request here waits for.
                    _ => {}
                }
            }
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// One request; its answer.
    pub fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<Answer> {
        Ok(self
            .batch(vec![(msg, flags)])?
            .pop()
            .unwrap_or(Err(libc::EIO)))
    }

    /// The link named `name`, if it exists.
    pub fn link(&mut self, name: &str) -> io::Result<Result<Option<LinkMessage>, i32>> {
        let get = rtnetlink::LinkUnspec::new_with_name(name).build();
        Ok(
            match self.request(RouteNetlinkMessage::GetLink(get), CHANGE)? {
                Ok(Some(RouteNetlinkMessage::NewLink(l))) => Ok(Some(l)),
                Ok(_) => Err(libc::EIO),
                Err(e) if e == libc::ENODEV => Ok(None),
                Err(e) => Err(e),
            },
        )
    }
}

/// The kernel's words for `errno`.
pub fn describe(errno: i32) -> String {
    io::Error::from_raw_os_error(errno).to_string()
}

/// The interface index a link message names.
pub fn index_of(l: &LinkMessage) -> u32 {
    l.header.index
}

/// A veth's IFLA_LINK: the index of its peer, in the peer's namespace. The
/// kernel leaves it out when it equals the link's own index.
pub fn peer_index(l: &LinkMessage) -> u32 {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Link(i) => Some(*i),
            _ => None,
        })
        .unwrap_or(l.header.index)
}
