//! One connection of the I/O thread: a non-blocking stream, the frames read
//! so far, the bytes waiting to be written, and whether a client request is
//! being answered elsewhere (on the core or the query thread).

use std::io::{self, Write};

use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};
use picloud_proto::FrameReader;
use serde::Serialize;

use super::Caller;

/// A Unix or TCP stream.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Who is at the other end.
#[derive(Debug, Clone)]
pub(crate) enum Peer {
    /// Handshake not done yet.
    Pending,
    /// A client, identified by the kernel (`SO_PEERCRED`).
    Client(Caller),
    /// A node agent (the core thread knows its node by the connection).
    Agent,
}

/// A connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: Stream,
    pub(crate) reader: FrameReader,
    pub(crate) peer: Peer,
    /// Peer credentials, for Unix sockets.
    pub(crate) cred: Option<(u32, u32)>,
    out: Vec<u8>,
    written: usize,
    /// Close once everything queued is written.
    pub(crate) closing: bool,
    /// Client requests handed on whose replies have not come back. While
    /// there are any, the next frame waits, so that replies leave in request
    /// order and a query sees the effects of every earlier request of its
    /// connection; except that pipelined submissions (`SubmitReserved`)
    /// follow one another, up to [`MAX_SUBMISSIONS_IN_FLIGHT`]: they all go
    /// to the core, which answers them in order, and one journal sync then
    /// covers a whole run of them.
    pub(crate) in_flight: u32,
    /// Every request in flight is a pipelined submission.
    pub(crate) submissions_in_flight: bool,
    /// The core thread has heard of this connection (and must hear of its end).
    pub(crate) known_to_core: bool,
    /// Whether WRITABLE interest is registered.
    want_write: bool,
}

/// Most pipelined submissions of one connection in flight at once (as many
/// as a client writes before it reads their replies).
pub(crate) const MAX_SUBMISSIONS_IN_FLIGHT: u32 = picloud_proto::client::MAX_OUTSTANDING as u32;

impl Conn {
    /// Whether the next frame may be handed on now, as far as the requests
    /// in flight go (a closing connection takes none at all).
    pub(crate) fn may_take_frame(&self) -> bool {
        self.in_flight == 0
            || (self.submissions_in_flight
                && self.in_flight < MAX_SUBMISSIONS_IN_FLIGHT
                && self
                    .reader
                    .peek_payload()
                    .is_some_and(picloud_proto::ClientRequest::is_reserved_submission))
    }

    /// Notes a request handed on.
    pub(crate) fn request_sent(&mut self, reserved_submission: bool) {
        self.submissions_in_flight =
            reserved_submission && (self.in_flight == 0 || self.submissions_in_flight);
        self.in_flight += 1;
    }

    /// Notes `n` replies back.
    pub(crate) fn replies_back(&mut self, n: u32) {
        self.in_flight = self.in_flight.saturating_sub(n);
    }

    pub(crate) fn new(stream: Stream, cred: Option<(u32, u32)>) -> Self {
        Conn {
            stream,
            reader: FrameReader::new(),
            peer: Peer::Pending,
            cred,
            out: Vec::new(),
            written: 0,
            closing: false,
            in_flight: 0,
            submissions_in_flight: false,
            known_to_core: false,
            want_write: false,
        }
    }

    pub(crate) fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(self.stream.source(), token, Interest::READABLE)
    }

    pub(crate) fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(self.stream.source());
    }

    /// Queues one message.
    pub(crate) fn send<T: Serialize>(&mut self, msg: &T) {
        picloud_proto::frame::encode_into(msg, &mut self.out);
    }

    /// Queues bytes of whole frames encoded elsewhere.
    pub(crate) fn push_bytes(&mut self, bytes: Vec<u8>) {
        if self.out.is_empty() {
            self.out = bytes;
        } else {
            self.out.extend_from_slice(&bytes);
        }
    }

    pub(crate) fn has_output(&self) -> bool {
        self.written < self.out.len()
    }

    /// Writes what the socket takes now. Returns `Err` when the peer is gone.
    pub(crate) fn flush(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
        }
        let want = self.has_output();
        if want != self.want_write {
            let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            registry.reregister(self.stream.source(), token, interest)?;
            self.want_write = want;
        }
        Ok(())
    }
}
