//! The I/O thread: one mio event loop over the listeners and every
//! connection. It owns the sockets and nothing of the scheduling state,
//! unless the server runs its core inline (`ServerThreads::Inline`): then
//! this thread also runs the core's batches, between steps 3 and 4, and
//! nothing crosses a thread on a request's way to the core and back.
//!
//! Each iteration:
//! 1. waits for readiness, or for the waker that the core and query threads
//!    ring after queueing output;
//! 2. accepts new connections (taking a Unix client's uid and gid from
//!    `SO_PEERCRED`);
//! 3. reads every ready connection into its frame buffer and takes the
//!    complete frames in order: a handshake is checked and answered here; an
//!    agent's report goes to the core thread; a client request goes to the
//!    query thread (`Stat`, `Nodes`, `ServerStatus`) or to the core thread
//!    (everything else), and the connection takes no further frame until its
//!    reply is back (one request in flight per client), unless both are
//!    pipelined submissions (`conn.rs`);
//! 4. drains the outbound channel: queues each message's frames on its
//!    connection, raises the snapshot *floor* to the message's version, and
//!    frees the connection when the message answers its request, taking its
//!    next buffered frame (back to step 3 for it);
//! 5. writes what each connection has queued, closing those marked so.
//!
//! Bad input (an undecodable frame, an oversized length, a wrong magic or
//! version) gets an error reply, and the connection is closed once it is
//! written; an agent's bad frame closes its connection. Other connections
//! are not affected. A peer that hangs up (seen when reading, or when a
//! write to it fails) has its complete frames still handed on (in order,
//! their replies dropped), then its connection closed.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use mio::net::{TcpListener, UnixListener};
use mio::{Events, Poll, Token, Waker};
use picloud_proto::{AgentMsg, ClientRequest, ErrorKind, Hello, ProtoError, Role, ServerReply, ToAgent};
use tracing::{debug, warn};

use super::conn::{Conn, Peer, Stream};
use super::core_loop::{CoreLoop, StoppedGuard};
use super::query::QueryJob;
use super::{Caller, ConnId, CoreEnd, Inbound, Outbound};

pub(crate) const UNIX_LISTENER: Token = Token(0);
pub(crate) const TCP_LISTENER: Token = Token(1);
pub(crate) const WAKER: Token = Token(2);
const FIRST_CONN: usize = 3;

/// How long a stopping server keeps trying to write its last messages.
const LAST_WORDS: Duration = Duration::from_secs(2);

/// The I/O thread's state.
pub(crate) struct IoLoop {
    poll: Poll,
    unix: UnixListener,
    tcp: Option<TcpListener>,
    /// Held here as well as by the threads that ring it: the waker's eventfd
    /// closes with its last handle, and a wake-up in flight would go with it.
    _waker: Arc<Waker>,
    to_core: Sender<Inbound>,
    to_query: Option<Sender<QueryJob>>,
    from_core: Receiver<Outbound>,
    server_name: String,
    conns: HashMap<Token, Conn>,
    next_token: usize,
    /// The highest snapshot version of any message handed to a connection.
    floor: u64,
    /// Connections with output to write.
    dirty: Vec<Token>,
    /// The core, when this thread runs it.
    inline: Option<InlineCore>,
    /// How the inline core ended.
    core_end: Option<CoreEnd>,
}

/// A core run by the I/O thread, with the channel it reads.
struct InlineCore {
    core: CoreLoop,
    inbox: Receiver<Inbound>,
    /// Sends `Outbound::Stopped` when the core goes, however it goes.
    _stopped: StoppedGuard,
}

impl IoLoop {
    pub(crate) fn new(
        poll: Poll,
        (unix, tcp): (UnixListener, Option<TcpListener>),
        waker: Arc<Waker>,
        to_core: Sender<Inbound>,
        to_query: Sender<QueryJob>,
        from_core: Receiver<Outbound>,
        server_name: String,
    ) -> Self {
        IoLoop {
            poll,
            unix,
            tcp,
            _waker: waker,
            to_core,
            to_query: Some(to_query),
            from_core,
            server_name,
            conns: HashMap::new(),
            next_token: FIRST_CONN,
            floor: 0,
            dirty: Vec::new(),
            inline: None,
            core_end: None,
        }
    }

    /// Makes this thread run `core` too, on the messages of `inbox`.
    pub(crate) fn with_inline_core(mut self, core: CoreLoop, inbox: Receiver<Inbound>) -> Self {
        let stopped = core.stopped_guard();
        self.inline = Some(InlineCore { core, inbox, _stopped: stopped });
        self
    }

    /// How long the poll may sleep: for ever, unless the inline core has
    /// messages waiting (not at all) or a deadline coming.
    fn poll_timeout(&self) -> Option<Duration> {
        let inline = self.inline.as_ref()?;
        if !inline.inbox.is_empty() {
            return Some(Duration::ZERO);
        }
        // Rounded up to whole milliseconds, as epoll waits, so that the loop
        // does not spin just before the deadline.
        let left = inline.core.next_deadline().saturating_duration_since(Instant::now());
        Some(Duration::from_millis(left.as_micros().div_ceil(1000) as u64))
    }

    /// Runs a batch of the inline core, if there is one. A core that ends
    /// (or panics) is dropped, which sends `Outbound::Stopped`.
    fn run_inline_core(&mut self) {
        let Some(inline) = &mut self.inline else { return };
        let turn =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inline.core.run_inline(&inline.inbox)));
        let end = match turn {
            Ok(None) => return,
            Ok(Some(result)) => CoreEnd::Finished(result),
            Err(panic) => CoreEnd::Panicked(super::panic_text(&*panic)),
        };
        self.core_end = Some(end);
        self.inline = None;
    }

    /// How the inline core ended (None without one, or before it ended).
    pub(crate) fn take_core_end(&mut self) -> Option<CoreEnd> {
        self.core_end.take()
    }

    /// Runs until the core thread has stopped, then writes what it can of the
    /// last messages (for at most [`LAST_WORDS`]).
    pub(crate) fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            if let Err(e) = self.poll.poll(&mut events, self.poll_timeout()) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in &events {
                match event.token() {
                    UNIX_LISTENER => self.accept_unix(),
                    TCP_LISTENER => self.accept_tcp(),
                    WAKER => {}
                    token => {
                        self.on_readable(token);
                        self.dirty.push(token);
                    }
                }
            }
            self.run_inline_core();
            let stopped = self.drain_outbound();
            self.flush_dirty();
            if stopped {
                self.last_words();
                return Ok(());
            }
        }
    }

    fn accept_unix(&mut self) {
        loop {
            match self.unix.accept() {
                Ok((stream, _)) => {
                    let cred =
                        nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                            .ok()
                            .map(|c| (c.uid(), c.gid()));
                    self.add_conn(Stream::Unix(stream), cred);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("accept failed: {e}");
                    break;
                }
            }
        }
    }

    fn accept_tcp(&mut self) {
        while let Some(l) = self.tcp.as_mut() {
            match l.accept() {
                Ok((stream, _)) => {
                    stream.set_nodelay(true).ok();
                    self.add_conn(Stream::Tcp(stream), None);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("accept failed: {e}");
                    break;
                }
            }
        }
    }

    fn add_conn(&mut self, stream: Stream, cred: Option<(u32, u32)>) {
        let token = Token(self.next_token);
        self.next_token += 1;
        let mut conn = Conn::new(stream, cred);
        if let Err(e) = conn.register(self.poll.registry(), token) {
            warn!("cannot register a connection: {e}");
            return;
        }
        self.conns.insert(token, conn);
    }

    /// Step 3 for one connection.
    fn on_readable(&mut self, token: Token) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        let open = match conn.reader.read_from(&mut conn.stream) {
            Ok(open) => open,
            Err(e) => {
                debug!("read error on {token:?}: {e}");
                false
            }
        };
        self.pump(token, !open);
        if !open {
            self.close(token);
        }
    }

    /// Hands on the connection's complete frames while it may take one (no
    /// request in flight), or all of them when the peer has hung up.
    fn pump(&mut self, token: Token, hung_up: bool) {
        loop {
            let Some(conn) = self.conns.get_mut(&token) else { return };
            if conn.closing || (!hung_up && !conn.may_take_frame()) {
                return;
            }
            let payload = match conn.reader.next_payload() {
                Ok(Some(p)) => p.to_vec(),
                Ok(None) => return,
                Err(e) => return self.refuse(token, ErrorKind::Malformed, e.to_string()),
            };
            self.on_frame(token, &payload);
        }
    }

    /// Sends an error and closes the connection once it is written.
    fn refuse(&mut self, token: Token, kind: ErrorKind, message: String) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        warn!(?token, "closing connection: {message}");
        conn.send(&ServerReply::Error(ProtoError::new(kind, message)));
        conn.closing = true;
        self.dirty.push(token);
    }

    fn on_frame(&mut self, token: Token, payload: &[u8]) {
        let peer = self.conns[&token].peer.clone();
        match peer {
            Peer::Pending => match picloud_proto::frame::decode::<Hello>(payload) {
                Ok(hello) => self.on_hello(token, hello),
                Err(e) => self.refuse(token, ErrorKind::Malformed, format!("bad handshake: {e}")),
            },
            Peer::Client(caller) => match picloud_proto::frame::decode::<ClientRequest>(payload) {
                Ok(req) => self.on_request(token, caller, req),
                Err(e) => self.refuse(token, ErrorKind::Malformed, e.to_string()),
            },
            Peer::Agent => match picloud_proto::frame::decode::<AgentMsg>(payload) {
                Ok(msg) => self.tell_core(token, Inbound::Agent { conn: ConnId(token.0), msg }),
                Err(e) => {
                    warn!("malformed frame from the agent on {token:?}: {e}");
                    self.close(token);
                }
            },
        }
    }

    fn on_hello(&mut self, token: Token, hello: Hello) {
        if hello.magic != picloud_proto::HELLO_MAGIC {
            return self.refuse(token, ErrorKind::Malformed, "not a picloud peer (bad magic number)".into());
        }
        if hello.version != picloud_proto::PROTOCOL_VERSION {
            return self.refuse(
                token,
                ErrorKind::VersionMismatch,
                format!(
                    "protocol version mismatch: peer speaks {}, this server speaks {}",
                    hello.version,
                    picloud_proto::PROTOCOL_VERSION
                ),
            );
        }
        let conn = self.conns.get_mut(&token).expect("present");
        match hello.role {
            Role::Client => {
                let Some((uid, gid)) = conn.cred else {
                    return self.refuse(
                        token,
                        ErrorKind::PermissionDenied,
                        "clients must connect through the server's Unix socket (TCP is for agents)".into(),
                    );
                };
                conn.peer = Peer::Client(Caller { uid, gid, user: user_name(uid).into() });
                conn.send(&ServerReply::Welcome {
                    server_name: self.server_name.clone(),
                    version: picloud_proto::PROTOCOL_VERSION,
                });
                self.dirty.push(token);
            }
            Role::Agent(info) => {
                conn.peer = Peer::Agent;
                // Queued before anything the core can send the agent.
                conn.send(&ToAgent::Welcome { server_name: self.server_name.clone() });
                self.dirty.push(token);
                self.tell_core(token, Inbound::AgentJoined { conn: ConnId(token.0), info });
            }
        }
    }

    fn on_request(&mut self, token: Token, caller: Caller, request: ClientRequest) {
        let conn = ConnId(token.0);
        if let Some(c) = self.conns.get_mut(&token) {
            c.request_sent(matches!(request, ClientRequest::SubmitReserved { .. }));
        }
        let request = match request {
            ClientRequest::Stat(_)
            | ClientRequest::Results(_)
            | ClientRequest::Nodes
            | ClientRequest::ServerStatus => {
                let Some(to_query) = &self.to_query else {
                    return self.tell_core(token, Inbound::Request { conn, caller, request });
                };
                match to_query.send(QueryJob { conn, request, uid: caller.uid, floor: self.floor }) {
                    Ok(()) => return,
                    Err(e) => {
                        // The query thread is gone (it failed): the core
                        // thread answers queries too.
                        warn!("the query thread has stopped; the core thread answers queries");
                        self.to_query = None;
                        e.into_inner().request
                    }
                }
            }
            request => request,
        };
        self.tell_core(token, Inbound::Request { conn, caller, request });
    }

    fn tell_core(&mut self, token: Token, msg: Inbound) {
        let answerable = matches!(msg, Inbound::Request { .. });
        if let Some(c) = self.conns.get_mut(&token) {
            c.known_to_core = true;
        }
        if self.to_core.send(msg).is_err() && answerable {
            // The core is stopping; say so rather than leave the client waiting.
            if let Some(c) = self.conns.get_mut(&token) {
                c.send(&ServerReply::Error(ProtoError::new(
                    ErrorKind::ShuttingDown,
                    "the picloud server is shutting down",
                )));
                c.replies_back(1);
                self.dirty.push(token);
            }
        }
    }

    /// Step 4. Returns whether the core thread has stopped.
    fn drain_outbound(&mut self) -> bool {
        let mut freed = Vec::new();
        let stopped = loop {
            match self.from_core.try_recv() {
                Ok(Outbound::Send { conn, bytes, answers, version, close }) => {
                    self.floor = self.floor.max(version);
                    let token = Token(conn.0);
                    let Some(c) = self.conns.get_mut(&token) else { continue };
                    c.push_bytes(bytes);
                    c.closing |= close;
                    if answers > 0 {
                        c.replies_back(answers);
                        freed.push(token);
                    }
                    self.dirty.push(token);
                }
                Ok(Outbound::Stopped) | Err(TryRecvError::Disconnected) => break true,
                Err(TryRecvError::Empty) => break false,
            }
        };
        // With the floor raised by the whole drain.
        for token in freed {
            self.pump(token, false);
        }
        stopped
    }

    /// Step 5.
    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for &token in &dirty {
            let Some(conn) = self.conns.get_mut(&token) else { continue };
            if conn.has_output() {
                if let Err(e) = conn.flush(self.poll.registry(), token) {
                    debug!("write to {token:?} failed: {e}");
                    self.hang_up(token);
                    continue;
                }
            }
            if conn.closing && !conn.has_output() {
                self.close(token);
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }

    /// A connection that can no longer be written to (its peer went away):
    /// the complete frames it sent before it went are still handed on, their
    /// replies dropped, as for a peer seen hanging up while reading; then it
    /// is closed.
    fn hang_up(&mut self, token: Token) {
        if let Some(conn) = self.conns.get_mut(&token) {
            // What is left in the socket; an error ends the reading as EOF does.
            let _ = conn.reader.read_from(&mut conn.stream);
        }
        self.pump(token, true);
        self.close(token);
    }

    fn close(&mut self, token: Token) {
        let Some(mut conn) = self.conns.remove(&token) else { return };
        conn.deregister(self.poll.registry());
        if conn.known_to_core {
            let _ = self.to_core.send(Inbound::Closed(ConnId(token.0)));
        }
    }

    /// Best effort: give peers the last messages (agents their `Shutdown`).
    fn last_words(&mut self) {
        let deadline = Instant::now() + LAST_WORDS;
        let mut events = Events::with_capacity(64);
        loop {
            let mut pending = false;
            let tokens: Vec<Token> = self.conns.keys().copied().collect();
            for token in tokens {
                let Some(conn) = self.conns.get_mut(&token) else { continue };
                if conn.has_output() && conn.flush(self.poll.registry(), token).is_err() {
                    self.conns.remove(&token);
                    continue;
                }
                pending |= conn.has_output();
            }
            let now = Instant::now();
            if !pending || now >= deadline {
                break;
            }
            let _ = self.poll.poll(&mut events, Some((deadline - now).min(Duration::from_millis(50))));
        }
        debug!("connections closed");
    }
}

/// The user name of `uid`, or the number when it has none.
fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}
