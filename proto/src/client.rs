//! A blocking client connection to the server, shared by the CLI and the C ABI.

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::frame::{FrameError, read_frame, write_frame};
use crate::msg::{ClientRequest, Hello, JobSpec, MAX_RESERVED, ProtoError, Role, ServerReply};

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl ServerAddr {
    /// Parses `--server` values: a `host:port` is TCP, anything else a socket path
    /// (a directory means its `server.sock`).
    pub fn parse(s: &str) -> Self {
        let p = Path::new(s);
        if p.is_dir() {
            return ServerAddr::Unix(p.join(crate::SOCKET_NAME));
        }
        let looks_tcp =
            !s.contains('/') && s.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok());
        if looks_tcp { ServerAddr::Tcp(s.to_string()) } else { ServerAddr::Unix(p.to_path_buf()) }
    }

    /// The server socket of a state directory.
    pub fn of_state_dir(dir: &Path) -> Self {
        ServerAddr::Unix(dir.join(crate::SOCKET_NAME))
    }
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Unix(p) => write!(f, "{}", p.display()),
            ServerAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// The state directory: `$PICLOUD_DIR`, else `~/.picloud`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PICLOUD_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".picloud")
}

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the address.
    #[error("no picloud server is running at {addr} (start one with `picloud up`, or set PICLOUD_DIR)")]
    NotRunning {
        /// Where we looked.
        addr: ServerAddr,
    },
    /// Connecting failed for another reason.
    #[error("cannot connect to the picloud server at {addr}: {source}")]
    Connect {
        /// Where we tried.
        addr: ServerAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server refused the request or the handshake.
    #[error("{0}")]
    Server(ProtoError),
    /// The connection broke.
    #[error("lost the connection to the picloud server: {0}")]
    Frame(#[from] FrameError),
    /// The server answered something unexpected.
    #[error("unexpected reply from the server: {0}")]
    Unexpected(String),
}

trait Stream: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> Stream for T {}

/// A connected, handshaken client.
pub struct Client {
    reader: BufReader<Box<dyn std::io::Read + Send>>,
    writer: BufWriter<Box<dyn Stream>>,
    server_name: String,
    /// Where it connected, to connect again.
    addr: ServerAddr,
    /// The socket (owned by `reader`), to look whether the server hung up.
    fd: RawFd,
    /// Sequence numbers the server set aside for this connection, not used yet.
    reserved: Range<u64>,
    /// How many numbers the next reservation asks for.
    next_block: u32,
    /// Pipelined submissions whose replies are not read yet, in order,
    /// with their frames to send again on a new connection.
    outstanding: VecDeque<Pipelined>,
    /// Their size on the wire.
    outstanding_bytes: usize,
    /// Replies to pipelined submissions, read but not taken.
    answered: Vec<(u64, Result<(), ProtoError>)>,
    /// Pipelined submissions whose connection broke before their replies
    /// came and that could not be sent again (the client gave up
    /// reconnecting), not taken yet.
    lost: Vec<u64>,
    /// Set while pipelined submissions wait for their replies; shared, so
    /// that other threads can see it without this client (see
    /// [`Client::unconfirmed_flag`]).
    unconfirmed: Arc<AtomicBool>,
}

/// A pipelined submission waiting for its reply.
struct Pipelined {
    seq: u64,
    frame: Vec<u8>,
}

/// Pipelined submissions a client writes before it reads their replies, so
/// that replies never pile up in the socket while the client is writing.
pub const MAX_OUTSTANDING: usize = 256;

/// Bytes of pipelined submissions a client writes before it reads their
/// replies, so that a few large ones do not pile up in the server.
pub const MAX_OUTSTANDING_BYTES: usize = 8 << 20;

/// Numbers asked for by a connection's first reservation; each next one asks
/// for twice as many, up to [`LARGEST_BLOCK`].
const FIRST_BLOCK: u32 = 16;

/// Most numbers one reservation of [`Client::reserve_seq`] asks for.
const LARGEST_BLOCK: u32 = 4096;

/// How long [`Client::request_reconnecting`] tries to reach a server that
/// went away (a restart) before it gives up.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(30);

/// First pause between two attempts to reconnect; it doubles up to
/// [`RECONNECT_MAX_PAUSE`].
pub const RECONNECT_FIRST_PAUSE: Duration = Duration::from_millis(50);

/// Longest pause between two attempts to reconnect.
pub const RECONNECT_MAX_PAUSE: Duration = Duration::from_secs(2);

impl ClientError {
    /// Whether the server went away without a word (it crashed, or is
    /// restarting after one) rather than refused: a request that changes
    /// nothing may be sent again once it is back. A server that said it is
    /// shutting down (`ErrorKind::ShuttingDown`, a deliberate stop) did not
    /// go away in this sense: its error is final.
    pub fn server_went_away(&self) -> bool {
        match self {
            // A reply that cannot be read would be the same after a reconnection.
            ClientError::Frame(FrameError::TooLarge { .. } | FrameError::Malformed(_)) => false,
            ClientError::NotRunning { .. } | ClientError::Frame(_) => true,
            ClientError::Connect { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::TimedOut
            ),
            ClientError::Server(_) => false,
            ClientError::Unexpected(_) => false,
        }
    }
}

impl Client {
    /// Connects to `addr` and performs the handshake.
    pub fn connect(addr: &ServerAddr) -> Result<Self, ClientError> {
        let connect_err = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning { addr: addr.clone() }
            }
            _ => ClientError::Connect { addr: addr.clone(), source },
        };
        let (r, w, fd): (Box<dyn std::io::Read + Send>, Box<dyn Stream>, RawFd) = match addr {
            ServerAddr::Unix(p) => {
                let s = UnixStream::connect(p).map_err(connect_err)?;
                let r = s.try_clone().map_err(connect_err)?;
                let fd = r.as_raw_fd();
                (Box::new(r), Box::new(s), fd)
            }
            ServerAddr::Tcp(a) => {
                let s = TcpStream::connect(a).map_err(connect_err)?;
                s.set_nodelay(true).ok();
                let r = s.try_clone().map_err(connect_err)?;
                let fd = r.as_raw_fd();
                (Box::new(r), Box::new(s), fd)
            }
        };
        let mut client = Client {
            reader: BufReader::new(r),
            writer: BufWriter::new(w),
            server_name: String::new(),
            addr: addr.clone(),
            fd,
            reserved: 0..0,
            next_block: FIRST_BLOCK,
            outstanding: VecDeque::new(),
            outstanding_bytes: 0,
            answered: Vec::new(),
            lost: Vec::new(),
            unconfirmed: Arc::default(),
        };
        write_frame(&mut client.writer, &Hello::new(Role::Client))?;
        client.writer.flush().map_err(FrameError::Io)?;
        match read_frame::<ServerReply>(&mut client.reader)? {
            ServerReply::Welcome { server_name, .. } => client.server_name = server_name,
            ServerReply::Error(e) => return Err(ClientError::Server(e)),
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        }
        Ok(client)
    }

    /// Connects to the server of the default state directory.
    pub fn connect_default() -> Result<Self, ClientError> {
        Self::connect(&ServerAddr::of_state_dir(&default_state_dir()))
    }

    /// The server's name (suffix of job ids).
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// Sends a request that changes nothing (a query, a wait) and returns
    /// its reply; if the server went away ([`ClientError::server_went_away`]),
    /// connects again ([`Client::reconnect`]) for at most `window` after the
    /// failure and sends it again. A wait's timeout counts from the first
    /// call: the request is rebuilt by `req` with the time left (`None` when
    /// there is no deadline).
    ///
    /// Never use it for a plain submission (`Submit`): one whose reply was
    /// lost may have been accepted, and sending it again would queue it
    /// twice. Pipelined submissions are safe: the server takes each
    /// reserved number once.
    pub fn request_reconnecting(
        &mut self,
        window: Duration,
        deadline: Option<Instant>,
        mut req: impl FnMut(Option<Duration>) -> ClientRequest,
    ) -> Result<ServerReply, ClientError> {
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let err = match self.request(&req(left)) {
                Err(e) if e.server_went_away() => e,
                other => return other,
            };
            self.reconnect(window, err)?;
        }
    }

    /// Connects again after the server went away (`err`), pausing 50 ms,
    /// then twice as long each time up to 2 s, for at most `window`. What
    /// the old connection learnt stays; its reservation goes. Pipelined
    /// submissions still unanswered are written again on the new connection
    /// (under their numbers: the server queues each once, and answers one
    /// it had queued before as submitted), to leave with the next request;
    /// they stay unconfirmed meanwhile. When it gives up, they are reported
    /// lost ([`Client::take_lost`]): the server may or may not have queued
    /// them.
    fn reconnect(&mut self, window: Duration, err: ClientError) -> Result<(), ClientError> {
        let give_up = Instant::now() + window;
        let mut pause = RECONNECT_FIRST_PAUSE;
        let mut last = err;
        loop {
            let now = Instant::now();
            if now >= give_up {
                self.give_up_outstanding();
                return Err(last);
            }
            std::thread::sleep(pause.min(give_up - now));
            pause = (pause * 2).min(RECONNECT_MAX_PAUSE);
            match Client::connect(&self.addr) {
                Ok(mut fresh) => {
                    fresh.answered = std::mem::take(&mut self.answered);
                    fresh.lost = std::mem::take(&mut self.lost);
                    fresh.unconfirmed = self.unconfirmed.clone();
                    fresh.outstanding = std::mem::take(&mut self.outstanding);
                    fresh.outstanding_bytes = self.outstanding_bytes;
                    *self = fresh;
                    let mut again = Ok(());
                    for p in &self.outstanding {
                        again = self.writer.write_all(&p.frame);
                        if again.is_err() {
                            break;
                        }
                    }
                    match again.map_err(|e| ClientError::Frame(FrameError::Io(e))) {
                        Ok(()) => return Ok(()),
                        Err(e) if e.server_went_away() => last = e,
                        Err(e) => {
                            self.give_up_outstanding();
                            return Err(e);
                        }
                    }
                }
                Err(e) if e.server_went_away() => last = e,
                Err(e) => {
                    self.give_up_outstanding();
                    return Err(e);
                }
            }
        }
    }

    /// Reports every unanswered pipelined submission lost.
    fn give_up_outstanding(&mut self) {
        self.lost.extend(self.outstanding.drain(..).map(|p| p.seq));
        self.outstanding_bytes = 0;
        self.unconfirmed.store(false, Ordering::Release);
    }

    /// Whether the server closed this connection (it stopped or crashed
    /// since the connection last heard from it), looked at without waiting.
    fn peer_hung_up(&self) -> bool {
        use nix::sys::socket::{MsgFlags, recv};
        let mut byte = [0u8; 1];
        match recv(self.fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Ok(0) => true,
            // Something to read (the next read has it), or nothing yet.
            Ok(_) | Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
            Err(_) => true,
        }
    }

    /// Sends one request and returns its reply; a [`ServerReply::Error`] becomes
    /// [`ClientError::Server`]. Pipelined submissions not sent yet go first,
    /// in the same write, and their replies are read before this one's (see
    /// [`Client::take_answered`]).
    pub fn request(&mut self, req: &ClientRequest) -> Result<ServerReply, ClientError> {
        write_frame(&mut self.writer, req)?;
        self.send_buffered()?;
        self.read_outstanding()?;
        match read_frame::<ServerReply>(&mut self.reader)? {
            ServerReply::Error(e) => Err(ClientError::Server(e)),
            reply => Ok(reply),
        }
    }

    /// The next sequence number of this connection's reservation, asking the
    /// server for a new block when it is used up (blocks grow from 16 to
    /// 4096 numbers as a client keeps submitting). A connection that has
    /// nothing unanswered first looks whether the server hung up (a restart
    /// since its last request): then it connects again and reserves anew,
    /// so that a job is never named by a number of a connection nobody
    /// will use again.
    pub fn reserve_seq(&mut self) -> Result<u64, ClientError> {
        if !self.reserved.is_empty() && self.outstanding.is_empty() && self.peer_hung_up() {
            self.reserved = 0..0;
        }
        if self.reserved.is_empty() {
            let count = self.next_block.min(MAX_RESERVED);
            match self.request_reconnecting(RECONNECT_WINDOW, None, |_| ClientRequest::Reserve { count })? {
                ServerReply::Reserved { first, count } if count > 0 => {
                    self.reserved = first..first.saturating_add(u64::from(count));
                }
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
            self.next_block = (self.next_block * 2).min(LARGEST_BLOCK);
        }
        let seq = self.reserved.start;
        self.reserved.start += 1;
        Ok(seq)
    }

    /// Writes a submission under `seq` (from [`Client::reserve_seq`])
    /// without waiting for its reply. It reaches the server when the write
    /// buffer fills, at the next [`Client::request`] or at
    /// [`Client::flush_pipelined`]; its reply is read then and kept for
    /// [`Client::take_answered`]. When [`MAX_OUTSTANDING`] submissions or
    /// [`MAX_OUTSTANDING_BYTES`] wait for replies, those are read first: an
    /// error then means this submission was not written. If the server went
    /// away, the client connects again and sends the unanswered submissions
    /// again, this one included ([`Client::reconnect`]).
    pub fn submit_pipelined(&mut self, seq: u64, spec: JobSpec) -> Result<(), ClientError> {
        if self.outstanding.len() >= MAX_OUTSTANDING || self.outstanding_bytes >= MAX_OUTSTANDING_BYTES {
            self.flush_pipelined()?;
        }
        let frame = crate::frame::encode(&ClientRequest::SubmitReserved { seq, spec: Box::new(spec) });
        let written = self.writer.write_all(&frame);
        self.outstanding_bytes = self.outstanding_bytes.saturating_add(frame.len());
        self.outstanding.push_back(Pipelined { seq, frame });
        self.unconfirmed.store(true, Ordering::Release);
        match written.map_err(|e| ClientError::Frame(FrameError::Io(e))) {
            Ok(()) => Ok(()),
            Err(e) if e.server_went_away() => self.reconnect(RECONNECT_WINDOW, e),
            Err(e) => Err(e),
        }
    }

    /// Submits a job and waits until the server has queued it (or refused
    /// it), returning its sequence number. Unlike a plain `Submit`, it is
    /// safe across a server that went away: the job is named by a number of
    /// this connection's reservation ([`Client::reserve_seq`]), so the
    /// client connects again and sends it again ([`Client::reconnect`]), and
    /// the server queues it once however often it arrives. Pipelined
    /// submissions made before it are sent and answered first.
    ///
    /// When the server does not come back within [`RECONNECT_WINDOW`], it
    /// fails with the connection's error: the job may or may not have been
    /// queued (under a number the caller never learns). Its outcome is
    /// never reported as a pipelined submission's ([`Client::take_lost`],
    /// [`Client::take_answered`]).
    pub fn submit_reserved(&mut self, spec: JobSpec) -> Result<u64, ClientError> {
        let seq = self.reserve_seq()?;
        let sent = self.submit_pipelined(seq, spec).and_then(|()| self.flush_pipelined());
        self.lost.retain(|&s| s != seq);
        let answer = self.answered.iter().rposition(|(s, _)| *s == seq).map(|at| self.answered.remove(at).1);
        match (answer, sent) {
            (Some(Ok(())), _) => Ok(seq),
            (Some(Err(e)), _) => Err(ClientError::Server(e)),
            (None, Err(e)) => Err(e),
            (None, Ok(())) => Err(ClientError::Unexpected(format!("no reply to the submission of {seq}"))),
        }
    }

    /// Sends the pipelined submissions not sent yet and reads every reply
    /// still owed; if the server went away meanwhile, connects again and
    /// sends the unanswered ones again ([`Client::reconnect`]).
    pub fn flush_pipelined(&mut self) -> Result<(), ClientError> {
        while !self.outstanding.is_empty() {
            let err = match self.send_buffered().and_then(|()| self.read_outstanding()) {
                Ok(()) => return Ok(()),
                Err(e) if e.server_went_away() => e,
                Err(e) => return Err(e),
            };
            self.reconnect(RECONNECT_WINDOW, err)?;
        }
        Ok(())
    }

    /// Writes the pipelined submissions still in the buffer to the socket,
    /// without reading their replies.
    pub fn send_buffered(&mut self) -> Result<(), ClientError> {
        Ok(self.writer.flush().map_err(FrameError::Io)?)
    }

    /// A flag that is set while pipelined submissions wait for their
    /// replies, and cleared once every reply owed has been read (which any
    /// request does before it waits for its own reply): another thread can
    /// tell, without the client, whether the server has queued everything
    /// this client submitted. It stays this client's across reconnections.
    pub fn unconfirmed_flag(&self) -> Arc<AtomicBool> {
        self.unconfirmed.clone()
    }

    /// The pipelined submissions whose replies have been read: each
    /// sequence number, and whether the server queued it or why not.
    pub fn take_answered(&mut self) -> Vec<(u64, Result<(), ProtoError>)> {
        std::mem::take(&mut self.answered)
    }

    /// The pipelined submissions whose connection broke before the server
    /// confirmed them and that could not be sent again (the client gave up
    /// connecting again): the server may or may not have queued them.
    pub fn take_lost(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.lost)
    }

    fn read_outstanding(&mut self) -> Result<(), ClientError> {
        while let Some(seq) = self.outstanding.front().map(|p| p.seq) {
            let outcome = match read_frame::<ServerReply>(&mut self.reader)? {
                ServerReply::Submitted { seq: got, .. } if got == seq => Ok(()),
                ServerReply::Error(e) => Err(e),
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            };
            self.outstanding.pop_front();
            self.answered.push((seq, outcome));
        }
        self.outstanding_bytes = 0;
        self.unconfirmed.store(false, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Pipelined submissions against a scripted server on a Unix socket.

    use std::os::unix::net::{UnixListener, UnixStream};

    use super::*;
    use crate::msg::{ErrorKind, JobCommand};

    /// A listener in a fresh directory, and its address.
    fn listener(name: &str) -> (UnixListener, ServerAddr) {
        let path =
            std::env::temp_dir().join(format!("picloud-client-test-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        (UnixListener::bind(&path).unwrap(), ServerAddr::Unix(path))
    }

    /// Accepts one client and answers its handshake.
    fn accept(l: &UnixListener) -> UnixStream {
        let (mut s, _) = l.accept().unwrap();
        let _: Hello = read_frame(&mut s).unwrap();
        write_frame(&mut s, &ServerReply::Welcome { server_name: "srv".into(), version: 0 }).unwrap();
        s
    }

    fn spec() -> JobSpec {
        JobSpec::new("job", JobCommand::Argv(vec!["true".into()]), "/tmp")
    }

    fn submitted(seq: u64) -> ServerReply {
        ServerReply::Submitted { seq, id: format!("{seq}.srv") }
    }

    #[test]
    fn replies_to_pipelined_submissions_are_read_before_the_next_reply() {
        let (l, addr) = listener("pairs");
        let server = std::thread::spawn(move || {
            let mut s = accept(&l);
            let ClientRequest::Reserve { count } = read_frame(&mut s).unwrap() else { panic!("no reserve") };
            write_frame(&mut s, &ServerReply::Reserved { first: 10, count }).unwrap();
            for want in [10, 11] {
                let ClientRequest::SubmitReserved { seq, .. } = read_frame(&mut s).unwrap() else { panic!() };
                assert_eq!(seq, want);
            }
            let ClientRequest::Nodes = read_frame(&mut s).unwrap() else { panic!("no query") };
            write_frame(&mut s, &submitted(10)).unwrap();
            write_frame(&mut s, &ServerReply::Error(ProtoError::new(ErrorKind::Invalid, "no node"))).unwrap();
            write_frame(&mut s, &ServerReply::Nodes(Vec::new())).unwrap();
        });
        let mut c = Client::connect(&addr).unwrap();
        let unconfirmed = c.unconfirmed_flag();
        for want in [10, 11] {
            let seq = c.reserve_seq().unwrap();
            assert_eq!(seq, want);
            c.submit_pipelined(seq, spec()).unwrap();
        }
        assert!(unconfirmed.load(Ordering::Acquire));
        assert_eq!(c.request(&ClientRequest::Nodes).unwrap(), ServerReply::Nodes(Vec::new()));
        assert!(!unconfirmed.load(Ordering::Acquire));
        let answered = c.take_answered();
        assert_eq!(answered.len(), 2);
        assert_eq!(answered[0], (10, Ok(())));
        assert!(matches!(&answered[1], (11, Err(e)) if e.message == "no node"));
        server.join().unwrap();
    }

    /// Serves one client a reservation, reads its pipelined submission and
    /// the request after it, and hangs up without a reply: a crash.
    fn take_a_submission_and_crash(l: &UnixListener) {
        let mut s = accept(l);
        let ClientRequest::Reserve { count } = read_frame(&mut s).unwrap() else { panic!() };
        write_frame(&mut s, &ServerReply::Reserved { first: 1, count }).unwrap();
        let _: ClientRequest = read_frame(&mut s).unwrap();
        let _: ClientRequest = read_frame(&mut s).unwrap();
    }

    /// Reads a submission under `want` and the request after it, and
    /// answers both.
    fn take_again(s: &mut UnixStream, want: u64) {
        let ClientRequest::SubmitReserved { seq, .. } = read_frame(s).unwrap() else {
            panic!("not sent again")
        };
        assert_eq!(seq, want);
        let ClientRequest::Nodes = read_frame(s).unwrap() else { panic!("no query") };
        write_frame(s, &submitted(seq)).unwrap();
        write_frame(s, &ServerReply::Nodes(Vec::new())).unwrap();
    }

    #[test]
    fn unanswered_submissions_are_sent_again_once_the_server_is_back() {
        let (l, addr) = listener("again");
        let ServerAddr::Unix(path) = addr.clone() else { unreachable!() };
        let (go, gone) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            take_a_submission_and_crash(&l);
            // Not listening either, until the test says so.
            drop(l);
            let _ = std::fs::remove_file(&path);
            gone.recv().unwrap();
            let l = UnixListener::bind(&path).unwrap();
            take_again(&mut accept(&l), 1);
        });
        let mut c = Client::connect(&addr).unwrap();
        let seq = c.reserve_seq().unwrap();
        c.submit_pipelined(seq, spec()).unwrap();
        let flag = c.unconfirmed_flag();
        let waiter = std::thread::spawn(move || {
            let reply = c.request_reconnecting(RECONNECT_WINDOW, None, |_| ClientRequest::Nodes);
            (c, reply)
        });
        // While it tries to connect again, the submission is still owed a reply.
        std::thread::sleep(Duration::from_millis(300));
        let unconfirmed_meanwhile = flag.load(Ordering::Acquire);
        go.send(()).unwrap();
        let (mut c, reply) = waiter.join().unwrap();
        assert!(unconfirmed_meanwhile, "a flush from another thread would think it confirmed");
        assert_eq!(reply.unwrap(), ServerReply::Nodes(Vec::new()));
        assert_eq!(c.take_answered(), vec![(seq, Ok(()))]);
        assert!(c.take_lost().is_empty());
        assert!(!flag.load(Ordering::Acquire));
        server.join().unwrap();
    }

    #[test]
    fn submissions_are_reported_lost_when_the_server_does_not_come_back() {
        let (l, addr) = listener("lost");
        let server = std::thread::spawn(move || {
            take_a_submission_and_crash(&l);
            drop(l);
        });
        let mut c = Client::connect(&addr).unwrap();
        let seq = c.reserve_seq().unwrap();
        c.submit_pipelined(seq, spec()).unwrap();
        // Nothing listens at the path once it has crashed.
        let err =
            c.request_reconnecting(Duration::from_millis(200), None, |_| ClientRequest::Nodes).unwrap_err();
        server.join().unwrap();
        assert!(err.server_went_away(), "{err}");
        assert_eq!(c.take_lost(), vec![seq]);
        assert!(c.take_answered().is_empty());
        assert!(!c.unconfirmed_flag().load(Ordering::Acquire));
    }

    #[test]
    fn a_waited_submission_that_could_not_be_sent_again_is_its_callers_alone() {
        let (l, addr) = listener("waitedlost");
        let (crashed, told) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            reserve_then_hang_up(&l, &crashed);
            // The next server refuses the client.
            let (mut s, _) = l.accept().unwrap();
            let _: Hello = read_frame(&mut s).unwrap();
            write_frame(&mut s, &ServerReply::Error(ProtoError::new(ErrorKind::Invalid, "go away"))).unwrap();
        });
        let mut c = Client::connect(&addr).unwrap();
        let first = c.reserve_seq().unwrap();
        c.submit_pipelined(first, spec()).unwrap();
        told.recv().unwrap();
        // Larger than the write buffer: its write fails on the dead
        // connection, before any flush.
        let big = JobSpec::new("job", JobCommand::Argv(vec!["x".repeat(256 << 10)]), "/tmp");
        let err = c.submit_reserved(big).unwrap_err();
        assert!(matches!(&err, ClientError::Server(e) if e.message == "go away"), "{err:?}");
        // The pipelined one is reported lost; the waited one failed here.
        assert_eq!(c.take_lost(), vec![first]);
        assert!(c.take_answered().is_empty());
        server.join().unwrap();
    }

    /// Reads a `Reserve` and answers it with numbers from `first` on.
    fn answer_reserve(s: &mut UnixStream, first: u64) {
        let ClientRequest::Reserve { count } = read_frame(s).unwrap() else { panic!("no reserve") };
        write_frame(s, &ServerReply::Reserved { first, count }).unwrap();
    }

    /// Serves one client a reservation from 1 on, then goes away without a
    /// word before anything else, and says so on `crashed`.
    fn reserve_then_hang_up(l: &UnixListener, crashed: &std::sync::mpsc::Sender<()>) {
        answer_reserve(&mut accept(l), 1);
        crashed.send(()).unwrap();
    }

    #[test]
    fn a_waited_submission_is_sent_again_after_a_crash_and_gets_its_own_reply() {
        let (l, addr) = listener("waited");
        let server = std::thread::spawn(move || {
            let mut s = accept(&l);
            answer_reserve(&mut s, 1);
            for want in [1, 2] {
                let ClientRequest::SubmitReserved { seq, .. } = read_frame(&mut s).unwrap() else { panic!() };
                assert_eq!(seq, want);
            }
            drop(s); // crashed before it answered either
            let mut s = accept(&l);
            for want in [1, 2] {
                let ClientRequest::SubmitReserved { seq, .. } = read_frame(&mut s).unwrap() else { panic!() };
                assert_eq!(seq, want, "sent again under the same numbers, in order");
            }
            write_frame(&mut s, &submitted(1)).unwrap();
            write_frame(&mut s, &ServerReply::Error(ProtoError::new(ErrorKind::Invalid, "no node"))).unwrap();
        });
        let mut c = Client::connect(&addr).unwrap();
        let first = c.reserve_seq().unwrap();
        c.submit_pipelined(first, spec()).unwrap();
        let refused = c.submit_reserved(spec()).unwrap_err();
        assert!(matches!(&refused, ClientError::Server(e) if e.message == "no node"), "{refused:?}");
        // The pipelined one's reply is kept for its owner; the waited one's
        // went to its caller only.
        assert_eq!(c.take_answered(), vec![(1, Ok(()))]);
        assert!(c.take_lost().is_empty());
        server.join().unwrap();
    }

    #[test]
    fn a_flush_after_the_server_went_away_sends_the_submission_to_the_next_one() {
        let (l, addr) = listener("flush");
        let (crashed, told) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            reserve_then_hang_up(&l, &crashed);
            let mut s = accept(&l);
            let ClientRequest::SubmitReserved { seq, .. } = read_frame(&mut s).unwrap() else { panic!() };
            write_frame(&mut s, &submitted(seq)).unwrap();
            seq
        });
        let mut c = Client::connect(&addr).unwrap();
        let first = c.reserve_seq().unwrap();
        told.recv().unwrap();
        // The submission was named while a reply was owed (so the hang-up
        // was not looked for): it goes out on the dead connection first.
        c.outstanding.push_back(Pipelined { seq: 0, frame: Vec::new() });
        let seq = c.reserve_seq().unwrap();
        c.outstanding.clear();
        assert_eq!(seq, first + 1, "named from the old reservation");
        c.submit_pipelined(seq, spec()).unwrap();
        c.flush_pipelined().unwrap();
        assert_eq!(c.take_answered(), vec![(seq, Ok(()))]);
        assert_eq!(server.join().unwrap(), seq);
    }

    #[test]
    fn a_connection_the_server_hung_up_names_no_job_from_its_reservation() {
        let (l, addr) = listener("idle");
        let (crashed, told) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            reserve_then_hang_up(&l, &crashed);
            // The restarted server: numbers go on after the old reservation.
            answer_reserve(&mut accept(&l), 100);
        });
        let mut c = Client::connect(&addr).unwrap();
        assert_eq!(c.reserve_seq().unwrap(), 1);
        told.recv().unwrap();
        assert_eq!(c.reserve_seq().unwrap(), 100, "a number of the dead connection");
        server.join().unwrap();
    }

    #[test]
    fn a_full_pipeline_is_read_before_the_next_submission_is_written() {
        let (l, addr) = listener("full");
        let server = std::thread::spawn(move || {
            // Replies in order, as the server gives them: to every submission
            // not answered yet, then to the request that follows them.
            let mut s = accept(&l);
            let (mut next_free, mut last_seq, mut answered, mut read, mut full) =
                (1u64, 0u64, 0u64, 0usize, 0);
            loop {
                match read_frame::<ClientRequest>(&mut s) {
                    Ok(ClientRequest::SubmitReserved { seq, .. }) => {
                        read += 1;
                        last_seq = seq;
                        // The client writes no more than the limit unanswered.
                        let waiting = (seq - answered) as usize;
                        assert!(waiting <= MAX_OUTSTANDING, "{waiting} submissions without replies");
                        if waiting == MAX_OUTSTANDING {
                            full += 1;
                            for n in answered + 1..=seq {
                                write_frame(&mut s, &submitted(n)).unwrap();
                            }
                            answered = seq;
                        }
                    }
                    Ok(ClientRequest::Reserve { count }) => {
                        for n in answered + 1..=last_seq {
                            write_frame(&mut s, &submitted(n)).unwrap();
                        }
                        answered = last_seq;
                        write_frame(&mut s, &ServerReply::Reserved { first: next_free, count }).unwrap();
                        next_free += u64::from(count);
                    }
                    Ok(other) => panic!("{other:?}"),
                    Err(_) => return (read, full),
                }
            }
        });
        let mut c = Client::connect(&addr).unwrap();
        // Reservations read the replies owed too; enough submissions that
        // the pipeline fills between two of them.
        for _ in 0..1000 {
            let seq = c.reserve_seq().unwrap();
            c.submit_pipelined(seq, spec()).unwrap();
        }
        assert!(c.take_answered().iter().all(|(_, r)| r.is_ok()));
        drop(c);
        let (read, full) = server.join().unwrap();
        assert_eq!(read, 1000, "every submission arrives");
        assert!(full >= 1, "the pipeline never filled");
    }
}
