//! The scheduler server: one process per cluster, owning the queue.
//!
//! It listens on a Unix socket in the state directory (and optionally on TCP
//! for agents); one lock file per state directory guarantees a single server.
//! Its work is split over threads that share no lock:
//!
//! ```text
//!             Inbound (crossbeam)                  ArcSwap<Snapshot>
//!  I/O thread ───────────────────► core thread ──────publish──────┐
//!  (mio loop) ◄─────────────────── (Core, jobs,                   ▼
//!      ▲  │     Outbound + waker     agents)              query thread
//!      │  └────── QueryJob ─────────────────────────────────────► │
//!      └──────────────────── Outbound + waker ─────────────────────┘
//! ```
//!
//! 1. The **I/O thread** (`io.rs`, the caller of [`run`]) owns every socket.
//!    It accepts, reads and decodes frames, checks handshakes and refuses bad
//!    input itself, and turns agent reports and client requests into
//!    [`Inbound`] messages for the core thread; `Stat`, `Nodes` and
//!    `ServerStatus` go to the query thread instead. A client has one request
//!    in flight at a time: its next frame waits until the reply is back.
//! 2. The **core thread** ([`CoreLoop`]) owns the scheduling
//!    [`Core`](crate::core::Core), the job table and the agents' bookkeeping.
//!    It blocks on its channel, applies everything queued as one batch,
//!    publishes a [`Snapshot`] if the batch changed anything, and only then
//!    sends the batch's output (replies, and per agent one `Start` frame
//!    with every task it placed there) as [`Outbound`] messages, waking the
//!    I/O thread once. No mutex is taken while it works.
//! 3. The **query thread** (`query.rs`) answers queries from the latest
//!    snapshot, without asking the core thread anything.
//! 4. The **signal thread** waits for SIGTERM or SIGINT and sends
//!    [`Inbound::Stop`]. The core thread then tells the agents to shut down,
//!    fails pending waits, writes a snapshot, and sends
//!    [`Outbound::Stopped`]; the I/O thread writes what it can within two
//!    seconds and returns.
//! 5. The journal's **sync thread** syncs each batch the core thread wrote,
//!    then publishes its snapshot and hands its output to the I/O thread; a
//!    **snapshot thread** now and then saves the whole state (`journal.rs`).
//!
//! Before anything listens, the core thread's state is read back from the
//! journal in the state directory (`journal.rs` for the files, `durable.rs`
//! for what they hold, `core_loop/restore.rs` for the rebuilding); a
//! damaged or newer journal refuses the start and changes nothing. While it
//! runs, the core thread writes every change of a batch to the journal, and
//! the journal's sync thread syncs it before the batch's replies leave
//! (`core_loop.rs`, steps 6 to 8); snapshots bound the journal
//! (docs/durability.md).
//!
//! Snapshots are persistent maps (`imbl`), so publishing costs O(1) and each
//! change O(log n) (see `jobs.rs`). Replies carry the version of the snapshot
//! published before them, and a query never reads an older one than the
//! newest reply the I/O thread has passed on (see `snapshot.rs`): whoever was
//! told "submitted" sees the job in `qstat`.
//!
//! The server has no atomics and no locks of its own. What the threads share
//! is crossbeam's channels (lock-free to send and to receive; a receiver takes
//! a short internal lock only to go to sleep), arc-swap's snapshot cell
//! (lock-free loads; its memory orderings are arc-swap's, and a load that
//! happens after a store sees it or a later one), mio's waker (an eventfd)
//! and immutable `Arc`s.
//!
//! [`CoreLoop`] (and [`CoreThread`], which runs one), [`Inbound`],
//! [`Outbound`] and [`Snapshots`] are public so that benches and tests can
//! drive the core thread in-process through the same channels, playing the
//! I/O thread themselves (`bench/benches/server.rs`).

mod conn;
mod core_loop;
mod durable;
mod io;
mod jobs;
mod journal;
mod query;
mod snapshot;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mio::net::{TcpListener, UnixListener};
use mio::{Interest, Poll, Waker};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{SigSet, Signal};
use picloud_proto::{AgentMsg, ClientRequest, ErrorKind, NodeInfo, ProtoError, ServerReply};
use tracing::{info, warn};

pub use core_loop::{CoreLoop, CoreThread, MAX_BATCH};
pub use journal::{FORMAT_VERSION, FsyncMode, JournalConfig, JournalError, journal_dir};
pub use picloud_proto::{EXIT_CANCELLED, EXIT_NEVER_RAN};
pub use snapshot::{Snapshot, Snapshots};

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// State directory: socket, lock file.
    pub state_dir: PathBuf,
    /// Server name, the suffix of job ids.
    pub name: String,
    /// Also listen for agents on this TCP address.
    pub tcp: Option<SocketAddr>,
    /// How long a finished job stays queryable.
    pub keep_finished: Duration,
    /// The scheduling policy and its parameters.
    pub core: crate::core::CoreConfig,
    /// The journal: whether there is one, and how it syncs.
    pub journal: JournalConfig,
    /// Whether the core has a thread of its own.
    pub threads: ServerThreads,
}

/// Which thread runs the scheduling core.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ServerThreads {
    /// A thread of its own, so that a long scheduling pass never delays the
    /// sockets (a cluster's head node).
    #[default]
    Separate,
    /// The I/O thread, between reading requests and writing replies: no
    /// request crosses a thread on its way to the core and back, which on a
    /// machine with few cores saves more than the overlap gains (`picloud
    /// up`, the cluster of one machine).
    Inline,
}

/// How the core ended.
pub(crate) enum CoreEnd {
    /// It returned.
    Finished(Result<(), JournalError>),
    /// It panicked, saying this.
    Panicked(String),
}

/// Encodes `reply` as a frame onto the end of `out`. A reply over the frame
/// limit, which no client could read, becomes an error saying so.
pub(crate) fn encode_reply_into(reply: &ServerReply, out: &mut Vec<u8>) {
    let start = out.len();
    picloud_proto::frame::encode_into(reply, out);
    let len = out.len() - start - 4;
    if len > picloud_proto::MAX_FRAME_LEN {
        out.truncate(start);
        let message = format!(
            "the reply would take {len} bytes, over the limit of {} bytes of a frame: ask for less at once",
            picloud_proto::MAX_FRAME_LEN
        );
        picloud_proto::frame::encode_into(
            &ServerReply::Error(ProtoError::new(ErrorKind::Invalid, message)),
            out,
        );
    }
}

/// The message of a panic's payload.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another server holds the state directory.
    #[error("another picloud server{} is already running for the state directory {dir}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    AlreadyRunning {
        /// The directory.
        dir: PathBuf,
        /// Its pid, if known.
        pid: Option<u32>,
    },
    /// A file or socket of the state directory could not be set up.
    #[error("{what} {path}")]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The event loop failed.
    #[error("event loop failed")]
    Poll(#[from] std::io::Error),
    /// The core thread panicked; the server stopped.
    #[error("the scheduling thread failed: {0}")]
    CoreFailed(String),
    /// The journal could not be read at start (the message says what to do)
    /// or written while running (the server stopped).
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Names one connection of the I/O thread, in messages to and from the core
/// thread. Never reused while the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub usize);

/// Who sent a client request, as the kernel vouches for it (`SO_PEERCRED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// User name (or the uid in decimal when it has none).
    pub user: Arc<str>,
}

/// A message to the core thread.
#[derive(Debug)]
pub enum Inbound {
    /// A client request. The core thread answers each with exactly one reply
    /// (counted in [`Outbound::Send`]'s `answers`), a `Wait` once its jobs
    /// end, in the order the requests of a connection arrived.
    Request {
        /// The client's connection.
        conn: ConnId,
        /// Who sent it.
        caller: Caller,
        /// The request.
        request: ClientRequest,
    },
    /// An agent completed its handshake (it has been sent its `Welcome`).
    AgentJoined {
        /// The agent's connection.
        conn: ConnId,
        /// Its node.
        info: NodeInfo,
    },
    /// A report from an agent.
    Agent {
        /// The agent's connection.
        conn: ConnId,
        /// The report.
        msg: AgentMsg,
    },
    /// A connection the core thread has heard of is closed.
    Closed(ConnId),
    /// Stop the server (SIGTERM, SIGINT).
    Stop,
}

/// A message to the I/O thread.
#[derive(Debug)]
pub enum Outbound {
    /// Whole frames to write to a connection.
    Send {
        /// The connection.
        conn: ConnId,
        /// Encoded frames, length prefixes included.
        bytes: Vec<u8>,
        /// How many of the frames are replies to client requests (the I/O
        /// thread has at most one request of a connection in flight).
        answers: u32,
        /// The snapshot version published before these frames were sent.
        version: u64,
        /// Close the connection once these frames are written (an agent
        /// the core thread counts as lost).
        close: bool,
    },
    /// The core thread has ended; nothing more will come from it.
    Stopped,
}

/// Runs a server until SIGTERM or SIGINT (or a client's shutdown request).
///
/// Blocks SIGTERM and SIGINT in the calling thread (and the threads it
/// starts) and takes them with `sigwait` on a thread of its own. The calling
/// thread becomes the I/O thread.
pub fn run(config: ServerConfig) -> Result<(), ServerError> {
    let dir = config.state_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| ServerError::Setup {
        what: "cannot create the state directory",
        path: dir.clone(),
        source,
    })?;
    let _lock = lock_state_dir(&dir)?;
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), io::WAKER)?);
    let (to_core, core_inbox) = crossbeam_channel::unbounded();
    // First, so that every thread started after it (the journal's too)
    // inherits the blocked mask.
    spawn_signal_thread(to_core.clone(), waker.clone());
    let (to_io, io_inbox) = crossbeam_channel::unbounded();
    let core_waker = waker.clone();
    // An inline core runs on this thread, which drains what it sends after
    // each batch: only the journal's syncer thread needs to wake it.
    let io_thread = (config.threads == ServerThreads::Inline).then(|| std::thread::current().id());
    // The journal before the sockets: a refused start leaves none behind.
    let core_loop = CoreLoop::open(&config, to_io.clone(), move || {
        if io_thread != Some(std::thread::current().id()) {
            let _ = core_waker.wake();
        }
    })?;
    let sock_path = dir.join(picloud_proto::SOCKET_NAME);
    let _ = std::fs::remove_file(&sock_path);
    let setup = |what, source| ServerError::Setup { what, path: sock_path.clone(), source };
    let mut unix = UnixListener::bind(&sock_path).map_err(|e| setup("cannot listen on", e))?;
    // Every local user may connect; who they are comes from SO_PEERCRED.
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| setup("cannot set permissions of", e))?;

    poll.registry().register(&mut unix, io::UNIX_LISTENER, Interest::READABLE)?;
    let tcp = match config.tcp {
        Some(addr) => {
            let mut l = TcpListener::bind(addr).map_err(|source| ServerError::Setup {
                what: "cannot listen on TCP address",
                path: PathBuf::from(addr.to_string()),
                source,
            })?;
            poll.registry().register(&mut l, io::TCP_LISTENER, Interest::READABLE)?;
            Some(l)
        }
        None => None,
    };

    let (to_query, query_inbox) = crossbeam_channel::unbounded();

    let snapshots = core_loop.snapshots();
    let query_waker = waker.clone();
    let query_thread = std::thread::Builder::new()
        .name("query".into())
        .spawn(move || query::run(query_inbox, snapshots, to_io, query_waker))
        .map_err(ServerError::Poll)?;
    let mut io_loop =
        io::IoLoop::new(poll, (unix, tcp), waker, to_core.clone(), to_query, io_inbox, config.name.clone());
    let core_thread = match config.threads {
        ServerThreads::Separate => Some(
            std::thread::Builder::new()
                .name("core".into())
                .spawn(move || core_loop.run(core_inbox))
                .map_err(ServerError::Poll)?,
        ),
        ServerThreads::Inline => {
            io_loop = io_loop.with_inline_core(core_loop, core_inbox);
            None
        }
    };

    info!(socket = %sock_path.display(), name = %config.name, threads = ?config.threads, "picloud server listening");
    // Returns once the core has stopped (or the loop failed); its end
    // drops the query thread's channel, which ends that thread.
    let result = io_loop.run();
    let _ = to_core.send(Inbound::Stop);
    let core_end = match core_thread {
        Some(thread) => match thread.join() {
            Ok(result) => Some(CoreEnd::Finished(result)),
            Err(panic) => Some(CoreEnd::Panicked(panic_text(&*panic))),
        },
        None => io_loop.take_core_end(),
    };
    drop(io_loop);
    let _ = query_thread.join();
    let _ = std::fs::remove_file(&sock_path);
    match core_end {
        Some(CoreEnd::Panicked(what)) => return Err(ServerError::CoreFailed(what)),
        Some(CoreEnd::Finished(Err(e))) => return Err(ServerError::Journal(e)),
        Some(CoreEnd::Finished(Ok(()))) | None => {}
    }
    result?;
    info!("picloud server stopped");
    Ok(())
}

/// Takes the state directory's lock file, writing our pid into it.
fn lock_state_dir(dir: &std::path::Path) -> Result<Flock<File>, ServerError> {
    let path = dir.join("server.lock");
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(
        |source| ServerError::Setup { what: "cannot open the lock file", path: path.clone(), source },
    )?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0).ok();
            let _ = write!(lock, "{}", std::process::id());
            Ok(lock)
        }
        Err((mut file, _)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            Err(ServerError::AlreadyRunning { dir: dir.to_path_buf(), pid: pid.trim().parse().ok() })
        }
    }
}

/// Blocks SIGTERM/SIGINT here and waits for them on a thread of its own,
/// which asks the core to stop.
fn spawn_signal_thread(to_core: crossbeam_channel::Sender<Inbound>, waker: Arc<Waker>) {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    if let Err(e) = set.thread_block() {
        warn!("cannot block termination signals: {e}");
        return;
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                info!("received {sig}, shutting down");
            }
            let _ = to_core.send(Inbound::Stop);
            // An inline core reads its messages when the I/O thread wakes.
            let _ = waker.wake();
        })
        .expect("spawning the signal thread");
}

#[cfg(test)]
mod tests;
