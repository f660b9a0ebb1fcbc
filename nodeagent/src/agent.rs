//! The agent side of the protocol: connect to the server, start the tasks it
//! places on this node, report their ends, and enforce walltime and kills.
//!
//! [`run`] proceeds in steps:
//!
//! 1. discover the topology and clear the calling thread's signal mask, which
//!    the agent's threads and, through them, its jobs inherit; open the
//!    node's shared-memory store and bind `agent.sock`, so that once the
//!    server shows the node up its local clients can reach it;
//! 2. connect, send [`Hello`] with the node's [`NodeInfo`], and read the
//!    server's [`ToAgent::Welcome`] (or its [`ServerReply::Error`]);
//! 3. start two threads that turn outside happenings into events on one
//!    channel: the *reaper* reaps children with their resource usage, the
//!    *signal* thread relays SIGTERM and SIGINT caught by a handler (local
//!    clients of `agent.sock` have threads of their own too);
//! 4. run the main loop, which alone owns all state (job definitions, running
//!    tasks, timers). It handles every event already queued; with none, it
//!    sleeps in `poll` on the server's socket, its Python workers' sockets
//!    and a wake-up socket the helper threads write to, until one of them or
//!    the next timer is due. It reads the server and the workers itself, so
//!    a message costs no switch to another thread. Then it writes at most one
//!    `Started` and one `Finished` frame, so that under load many task ends
//!    share a frame. Starts wait up to [`AgentConfig::started_report_delay`] for an end
//!    to go with, so that a short task costs the server one wake-up;
//! 5. on [`ToAgent::Shutdown`] or a signal, terminate every task's process
//!    group (SIGTERM, then SIGKILL after the grace period), reap them, stop
//!    the threads, remove the spool files, and return.
//!
//! # Losing the server
//!
//! A lost connection does not stop the agent: its tasks keep running, and
//! their ends (Python outcomes included) are kept. It connects again after
//! 50 ms, then after twice as long each time up to 2 s, for ever (a signal
//! still stops it). Once welcomed again it sends the ends it kept
//! (`Finished`) and then every task it runs with its PUs and GPUs
//! (`Running`), which it also sends after its first welcome; the server
//! keeps, adopts or tells it to kill each (`docs/durability.md`). While it
//! has nothing else to say it sends a `Heartbeat` every [`HEARTBEAT`], so
//! that the server can tell a silent node from an idle one.
//!
//! # Reaping
//!
//! The reaper waits for *any* child, so the agent must be the only code in its
//! process that starts and waits for children. It must also never reap a child
//! that [`std::process::Command::spawn`] is still busy with: when exec fails,
//! std reaps the failed child itself and panics if it is already gone. So the
//! reaper first sleeps in `waitid(P_ALL, WEXITED | WNOWAIT)`, which reaps
//! nothing, and then reaps with `wait4(-1, WNOHANG)` while holding the *spawn
//! lock*, which the main loop holds around every spawn. When there is no child
//! at all (`ECHILD`) the reaper blocks on a channel of "spawned" notices; a
//! notice sent before it got there is still queued, so no child is missed.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use picloud_proto::frame::{decode, encode};
use picloud_proto::{
    AgentMsg, FrameError, FrameReader, Hello, JobDefinition, NodeInfo, ResourcesUsed, Role, ServerAddr,
    ServerReply, StartTask, TaskEnd, TaskId, TaskRunning, ToAgent, write_frame,
};
use tracing::{debug, info, warn};

mod local_socket;
mod python;

use crate::cgroup::{Cgroups, Limits, PooledCgroup};
use crate::launcher::{LaunchError, Launcher, SETUP_FAILED, pbs_exit_status};
use crate::topology::{self, TopologyError};

/// How long the server has to answer the agent's hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a write to the server may block before the server counts as lost.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long, past the kill grace period, shutdown waits for killed tasks to be
/// reaped before giving up on them (a process in uninterruptible sleep).
const SHUTDOWN_REAP_WAIT: Duration = Duration::from_secs(5);

/// Most events handled before the main loop writes its frames.
const MAX_BATCH: usize = 4096;

/// How often an agent with nothing else to send says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a start may wait to be reported, by default
/// ([`AgentConfig::started_report_delay`]).
pub const STARTED_REPORT_DELAY: Duration = Duration::from_millis(20);

/// First pause before connecting again to a lost server; it doubles up to
/// [`RECONNECT_MAX_PAUSE`].
const RECONNECT_FIRST_PAUSE: Duration = Duration::from_millis(50);

/// Longest pause between two attempts to connect again.
const RECONNECT_MAX_PAUSE: Duration = Duration::from_secs(2);

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the server listens.
    pub server: ServerAddr,
    /// Directory for job scripts and node files (created if missing).
    pub spool_dir: PathBuf,
    /// Time between SIGTERM and SIGKILL when a task is killed.
    pub kill_grace: Duration,
    /// Node name to announce instead of the host name.
    pub hostname: Option<String>,
    /// Run every task in a cgroup of its own (memory limit, cpuset, a limit on
    /// processes, accounting of peak memory and CPU time, leftover processes
    /// killed when it ends), taken from a pool of cgroups that tasks reuse, when
    /// the machine lets the agent create cgroups.
    pub use_cgroups: bool,
    /// Where to listen for local clients (shared-memory segments); none when `None`.
    pub local_socket: Option<PathBuf>,
    /// Put first on every Python worker's import path: the directory holding
    /// the `picloud` package, when clients' paths may lack it.
    pub python_path: Option<String>,
    /// Shared-memory store settings; `None` disables the store.
    pub shm: Option<crate::shm::StoreConfig>,
    /// How long a task's start may wait to be reported: a task that ends
    /// sooner has its start and its end reported in one write, so that a
    /// short task wakes the server once, not twice. The server learns of a
    /// start from its own decision; the report only says the agent is alive.
    pub started_report_delay: Duration,
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The node's topology could not be discovered.
    #[error(transparent)]
    Topology(#[from] TopologyError),
    /// The spool directory could not be created.
    #[error(transparent)]
    Spool(LaunchError),
    /// SIGTERM and SIGINT could not be blocked.
    #[error("cannot block SIGTERM and SIGINT: {0}")]
    Signals(Errno),
    /// The server could not be reached.
    #[error("cannot connect to the picloud server at {addr}: {error}")]
    Connect {
        /// Where we tried.
        addr: ServerAddr,
        /// The cause.
        error: io::Error,
    },
    /// The handshake broke down.
    #[error("handshake with the picloud server at {addr} failed: {reason}")]
    Handshake {
        /// The server.
        addr: ServerAddr,
        /// What went wrong.
        reason: String,
    },
    /// The server answered the hello with an error.
    #[error("server refused the agent: {0}")]
    Refused(String),
    /// A helper thread could not be started.
    #[error("cannot start the agent's {name} thread: {error}")]
    Thread {
        /// Which thread.
        name: &'static str,
        /// The cause.
        error: io::Error,
    },
}

/// Discovers this node's topology and serves the server until shutdown.
pub fn run(config: AgentConfig) -> Result<(), AgentError> {
    let node = topology::discover()?;
    run_with_node(config, node)
}

/// Open files a node needs per core: a Python worker's socket, its kept-open
/// `/proc` and cgroup files (`agent/python.rs`), and room for a task's.
const FILES_PER_CORE: u64 = 8;

/// Open files the agent needs for itself (server, clients, spool, cgroups).
const AGENT_FILES: u64 = 256;

/// Raises this process's soft limit of open files, within the hard limit,
/// when it is too low for a worker on every core (tasks inherit it). A
/// limit that cannot be raised is logged; probes that cannot open their
/// files then report no CPU time or memory.
fn ensure_open_files(cores: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let need = AGENT_FILES + FILES_PER_CORE * cores as u64;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    if soft >= need {
        return;
    }
    let wanted = need.min(hard);
    match setrlimit(Resource::RLIMIT_NOFILE, wanted, hard) {
        Ok(()) if wanted >= need => info!(from = soft, to = wanted, "raised the limit of open files"),
        Ok(()) => {
            warn!(limit = wanted, need, "the hard limit of open files is below what {cores} cores need")
        }
        Err(e) => warn!(limit = soft, need, "cannot raise the limit of open files: {e}"),
    }
}

/// Serves the server as a node described by `node` (e.g. loaded with
/// [`topology::from_xml_file`]) until shutdown. `config.hostname`, when set,
/// replaces `node.hostname`.
///
/// The agent catches SIGTERM and SIGINT for the whole process while it runs,
/// and clears the calling thread's signal mask so its jobs start with none.
pub fn run_with_node(config: AgentConfig, mut node: NodeInfo) -> Result<(), AgentError> {
    if let Some(name) = &config.hostname {
        node.hostname = name.clone();
    }
    // Step 1.
    clear_signal_mask()?;
    ensure_open_files(node.cores.len());
    let launcher = Launcher::new(&config.spool_dir, &node.hostname).map_err(AgentError::Spool)?;
    let cgroups = if config.use_cgroups {
        let (cgroups, limits) = setup_cgroups();
        node.limits = limits;
        cgroups
    } else {
        node.limits = "none: cgroups disabled (--no-cgroups)".into();
        None
    };

    // The local socket is bound before the server hears of this node, so
    // that a node shown up answers its local clients at once; they wait for
    // the main loop meanwhile.
    let thread_err = |name| move |error| AgentError::Thread { name, error };
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let (wake_tx, wake_rx) = UnixStream::pair().map_err(thread_err("wake-up socket"))?;
    wake_rx.set_nonblocking(true).map_err(thread_err("wake-up socket"))?;
    let events_tx = Events::new(events_tx, wake_tx).map_err(thread_err("wake-up socket"))?;
    let store = config.shm.clone().and_then(|shm| match crate::shm::SegmentStore::open(shm) {
        Ok(store) => Some(store),
        Err(e) => {
            warn!("no shared-memory store on this node: {e}");
            None
        }
    });
    let mut pool = crate::workers::WorkerPool::new(node.cores.len().max(1), config.python_path.clone());
    if let Some(store) = &store {
        pool.set_shm_dir(store.config().dir.clone());
    }
    let _local_socket = match &config.local_socket {
        None => None,
        Some(path) => match local_socket::LocalSocket::start(path, events_tx.clone()) {
            Ok(socket) => Some(socket),
            Err(e) => {
                warn!("local clients cannot reach this agent at {}: {e}", path.display());
                None
            }
        },
    };

    // Step 2.
    let addr = &config.server;
    let connect_err = |error| AgentError::Connect { addr: addr.clone(), error };
    let mut conn = Conn::connect(addr).map_err(connect_err)?;
    conn.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(connect_err)?;
    let (server_name, frames) = handshake(&mut conn, &node, addr)?;
    info!(server = %server_name, %addr, node = %node.hostname, cores = node.cores.len(), "agent connected");

    // Step 3.
    let incoming = Incoming { conn: conn.try_clone().map_err(connect_err)?, frames };
    let (spawned_tx, spawned_rx) = crossbeam_channel::unbounded();
    let spawn_lock = Arc::new(Mutex::new(()));
    let (lock, tx) = (spawn_lock.clone(), events_tx.clone());
    let reaper = std::thread::Builder::new()
        .name("agent-reaper".into())
        .spawn(move || reap_loop(&lock, &spawned_rx, &tx))
        .map_err(thread_err("reaper"));
    let signals = SignalThread::start(events_tx.clone());
    let (reaper, signals) = match (reaper, signals) {
        (Ok(b), Ok(c)) => (b, c),
        (b, c) => {
            // The reaper ends with its channel.
            conn.shutdown();
            let first_err = [b.err(), c.err()].into_iter().flatten().next();
            return Err(first_err.expect("one thread failed to start"));
        }
    };

    // Step 4.
    let writer = BufWriter::with_capacity(64 * 1024, conn);
    let python = python::PythonSide::new(pool, store);
    let mut agent = Agent::new(launcher, writer, config.kill_grace, spawn_lock, spawned_tx, python);
    agent.cgroups = cgroups;
    agent.started_delay = config.started_report_delay;
    agent.link = Some(Link { server: addr.clone(), node: node.clone() });
    agent.incoming = Some(incoming);
    agent.wake = Some(wake_rx);
    // Nothing runs yet: the server may now start tasks here.
    agent.send_running();
    agent.run(&events_rx);
    agent.stop_workers(&events_rx);

    // Step 5.
    agent.link = None;
    let reaped_all = agent.tasks.is_empty();
    agent.launcher.cleanup();
    if let Some(cgroups) = &agent.cgroups {
        cgroups.remove_base();
    }
    agent.writer.get_ref().shutdown();
    drop(agent);
    drop(events_tx);
    signals.stop();
    if reaped_all {
        // Without children and with its notice channel closed, it returns.
        if reaper.join().is_err() {
            warn!("the reaper thread panicked");
        }
    } else {
        warn!("leaving the reaper thread behind: some tasks could not be reaped");
    }
    info!("agent stopped");
    Ok(())
}

// ---------------------------------------------------------------------------
// Connection

/// The stream to the server.
#[derive(Debug)]
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn connect(addr: &ServerAddr) -> io::Result<Self> {
        Ok(match addr {
            ServerAddr::Unix(path) => Conn::Unix(UnixStream::connect(path)?),
            ServerAddr::Tcp(hostport) => {
                let s = TcpStream::connect(hostport)?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
        })
    }

    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(timeout),
            Conn::Tcp(s) => s.set_read_timeout(timeout),
        }
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_write_timeout(timeout),
            Conn::Tcp(s) => s.set_write_timeout(timeout),
        }
    }

    /// Shuts both directions down, waking a thread blocked reading.
    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Unix(s) => s.as_fd(),
            Conn::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// Sends the hello and reads the server's answer. Returns the server's name and
/// the frame reader, which may already hold the frames that followed.
fn handshake(
    conn: &mut Conn,
    node: &NodeInfo,
    addr: &ServerAddr,
) -> Result<(String, FrameReader), AgentError> {
    let fail = |reason: String| AgentError::Handshake { addr: addr.clone(), reason };
    write_frame(conn, &Hello::new(Role::Agent(node.clone()))).map_err(|e| fail(e.to_string()))?;
    conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| fail(e.to_string()))?;
    let mut frames = FrameReader::new();
    let mut buf = [0u8; 16 * 1024];
    let payload = loop {
        if let Some(p) = frames.next_payload().map_err(|e| fail(e.to_string()))? {
            break p.to_vec();
        }
        match conn.read(&mut buf) {
            Ok(0) => return Err(fail("the server closed the connection".into())),
            Ok(n) => frames.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(fail(format!("no answer within {} s", HANDSHAKE_TIMEOUT.as_secs())));
            }
            Err(e) => return Err(fail(e.to_string())),
        }
    };
    conn.set_read_timeout(None).map_err(|e| fail(e.to_string()))?;

    // A refusal is a ServerReply, whose bytes might also decode as some
    // ToAgent: accept a Welcome only if it re-encodes to exactly these bytes.
    if let Ok(msg) = decode::<ToAgent>(&payload) {
        if let (true, ToAgent::Welcome { server_name }) = (encode(&msg)[4..] == payload[..], msg) {
            return Ok((server_name, frames));
        }
    }
    match decode::<ServerReply>(&payload) {
        Ok(ServerReply::Error(e)) => Err(AgentError::Refused(e.message)),
        Ok(other) => Err(fail(format!("unexpected answer to the hello: {other:?}"))),
        Err(e) => Err(fail(format!("unexpected answer to the hello: {e}"))),
    }
}

// ---------------------------------------------------------------------------
// Helper threads

/// What the helper threads tell the main loop.
#[derive(Debug)]
enum Event {
    /// A child was reaped.
    Exited(Exit),
    /// SIGTERM or SIGINT arrived.
    Signal(Signal),
    /// A helper thread panicked.
    ThreadDied(&'static str),
    /// A local client (`agent.sock`) connected, asked, or left.
    Local(python::LocalEvent),
}

/// A reaped child.
#[derive(Debug, Clone, Copy)]
struct Exit {
    pid: i32,
    /// Raw wait status.
    status: i32,
    /// User plus system CPU time, in milliseconds.
    cput_ms: u64,
    /// Peak resident set size, in bytes.
    maxrss: u64,
}

/// The helper threads' end of the main loop's channel: each event also
/// writes a byte to the wake-up socket the main loop polls.
#[derive(Clone)]
struct Events {
    tx: Sender<Event>,
    wake: Arc<UnixStream>,
}

impl Events {
    /// A channel whose receiving end is woken through `wake` (non-blocking:
    /// when it is full, the main loop has a wake-up pending already).
    fn new(tx: Sender<Event>, wake: UnixStream) -> io::Result<Self> {
        wake.set_nonblocking(true)?;
        Ok(Self { tx, wake: Arc::new(wake) })
    }

    /// Queues `event` and wakes the main loop; false once the main loop is gone.
    fn send(&self, event: Event) -> bool {
        if self.tx.send(event).is_err() {
            return false;
        }
        let _ = (&*self.wake).write(&[1]);
        true
    }
}

/// Tells the main loop when the thread holding it unwinds from a panic.
struct PanicNotice<'a> {
    name: &'static str,
    events: &'a Events,
}

impl Drop for PanicNotice<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.events.send(Event::ThreadDied(self.name));
        }
    }
}

/// The reaper thread (see the module documentation).
fn reap_loop(spawn_lock: &Mutex<()>, spawned: &Receiver<()>, events: &Events) {
    let _notice = PanicNotice { name: "reaper", events };
    loop {
        // 1. Sleep until some child has exited, without reaping it.
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => {
                // 2. No child: wait until one is spawned, or the agent stops.
                if spawned.recv().is_err() {
                    return;
                }
                while spawned.try_recv().is_ok() {}
                continue;
            }
            Err(e) => {
                warn!("waitid failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        // 3. Reap every exited child, never while a spawn is in progress.
        let _guard = spawn_lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match wait_any_nohang() {
                Ok(Some(exit)) => {
                    if !events.send(Event::Exited(exit)) {
                        return;
                    }
                }
                Ok(None) | Err(Errno::ECHILD) => break,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    warn!("wait4 failed: {e}");
                    break;
                }
            }
        }
    }
}

/// `wait4(-1, WNOHANG)`: an exited child with its resource usage, if any.
fn wait_any_nohang() -> Result<Option<Exit>, Errno> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a plain C struct of integers, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers refer to live, writable locals of the types wait4 expects.
    let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut usage) };
    match pid {
        -1 => Err(Errno::last()),
        0 => Ok(None),
        pid => {
            let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
            Ok(Some(Exit {
                pid,
                status,
                cput_ms: ms(usage.ru_utime) + ms(usage.ru_stime),
                maxrss: usage.ru_maxrss as u64 * 1024,
            }))
        }
    }
}

/// Gives the calling thread (and the threads and jobs it starts) an empty
/// signal mask. A mask inherited from whoever started the agent would
/// otherwise pass on to every job, since neither fork nor exec resets it.
fn clear_signal_mask() -> Result<(), AgentError> {
    SigSet::empty().thread_set_mask().map_err(AgentError::Signals)
}

/// The thread that turns SIGTERM and SIGINT into events.
///
/// The signals are caught by a handler (signal-hook's self-pipe), not blocked:
/// a blocked mask would be inherited by every job, whereas a caught signal goes
/// back to its default action in a child at exec.
struct SignalThread {
    handle: JoinHandle<()>,
    control: signal_hook::iterator::Handle,
}

impl SignalThread {
    fn start(events: Events) -> Result<Self, AgentError> {
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])
            .map_err(|error| AgentError::Thread { name: "signal", error })?;
        let control = signals.handle();
        let handle = std::thread::Builder::new()
            .name("agent-signals".into())
            .spawn(move || {
                let _notice = PanicNotice { name: "signal", events: &events };
                for raw in signals.forever() {
                    let Ok(sig) = Signal::try_from(raw) else { continue };
                    if !events.send(Event::Signal(sig)) {
                        return;
                    }
                }
            })
            .map_err(|error| AgentError::Thread { name: "signal", error })?;
        Ok(Self { handle, control })
    }

    /// Unregisters the handlers and joins the thread.
    fn stop(self) {
        self.control.close();
        if self.handle.join().is_err() {
            warn!("the signal thread panicked");
        }
    }
}

// ---------------------------------------------------------------------------
// Main loop

/// A job whose tasks may run here.
#[derive(Debug)]
struct Job {
    def: JobDefinition,
    /// Its tasks running now.
    running: usize,
    /// The server said no more tasks will start: drop it with its last task.
    forgotten: bool,
}

/// A running task; its pid is also its process group id.
#[derive(Debug)]
struct Task {
    id: TaskId,
    /// Distinguishes this task from a later one that reuses the pid.
    serial: u64,
    started: Instant,
    walltime_limit: Option<u64>,
    /// Why it is being killed, once it is (its end's comment).
    killing: Option<String>,
    /// Its pooled cgroup, when tasks get one (given back when the task ends).
    cgroup: Option<PooledCgroup>,
    /// Its memory limit in bytes, if any.
    mem_limit: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// The task's walltime limit is reached: terminate it.
    Walltime,
    /// The grace period after SIGTERM is over: SIGKILL.
    Kill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Instant,
    pid: i32,
    serial: u64,
    kind: TimerKind,
}

/// The state the main loop owns.
struct Agent {
    launcher: Launcher,
    writer: BufWriter<Conn>,
    /// Whether frames can still be written.
    server_up: bool,
    kill_grace: Duration,
    jobs: HashMap<u64, Job>,
    /// Running tasks by pid.
    tasks: HashMap<i32, Task>,
    /// Pid of each running task.
    pids: HashMap<TaskId, i32>,
    /// Pending timers; entries of ended tasks are skipped when they come due.
    timers: BinaryHeap<Reverse<Timer>>,
    next_serial: u64,
    /// Tasks started since the last frame.
    started: Vec<TaskId>,
    /// When the oldest of `started` started.
    started_since: Option<Instant>,
    /// [`AgentConfig::started_report_delay`].
    started_delay: Duration,
    /// Tasks ended since the last frame.
    finished: Vec<TaskEnd>,
    spawn_lock: Arc<Mutex<()>>,
    /// "A child was spawned" notices for the reaper.
    spawned: Sender<()>,
    /// Once shutting down: when to stop waiting for tasks to die.
    shutdown_deadline: Option<Instant>,
    /// Where task cgroups are made, when the agent may make them.
    cgroups: Option<Cgroups>,
    /// Python workers and shared-memory segments.
    python: python::PythonSide,
    /// What connecting again needs (`None` in tests and once stopping).
    link: Option<Link>,
    /// The server connection's reading side, while connected.
    incoming: Option<Incoming>,
    /// The wake-up socket's reading end (`None` in tests that feed events).
    wake: Option<UnixStream>,
    /// While the server is lost: when to try connecting again, and the
    /// pause after that attempt.
    reconnect: Option<(Instant, Duration)>,
    /// When a frame was last written (heartbeats fill silences).
    last_write: Instant,
    /// PUs and GPUs of each task started here, for `Running` reports.
    placed: HashMap<TaskId, (Vec<u32>, Vec<u32>)>,
}

/// Where the agent's server is, and who the agent is to it.
struct Link {
    server: ServerAddr,
    node: NodeInfo,
}

/// What the main loop reads the server from.
struct Incoming {
    conn: Conn,
    /// Bytes of frames not yet whole.
    frames: FrameReader,
}

impl Agent {
    fn new(
        launcher: Launcher,
        writer: BufWriter<Conn>,
        kill_grace: Duration,
        spawn_lock: Arc<Mutex<()>>,
        spawned: Sender<()>,
        python: python::PythonSide,
    ) -> Self {
        Self {
            launcher,
            writer,
            server_up: true,
            kill_grace,
            jobs: HashMap::new(),
            tasks: HashMap::new(),
            pids: HashMap::new(),
            timers: BinaryHeap::new(),
            next_serial: 0,
            started: Vec::new(),
            started_since: None,
            started_delay: STARTED_REPORT_DELAY,
            finished: Vec::new(),
            spawn_lock,
            spawned,
            shutdown_deadline: None,
            cgroups: None,
            python,
            link: None,
            incoming: None,
            wake: None,
            reconnect: None,
            last_write: Instant::now(),
            placed: HashMap::new(),
        }
    }

    /// Handles events and timers until shutdown is complete.
    fn run(&mut self, events: &Receiver<Event>) {
        // Frames that came with the welcome.
        self.read_server();
        self.flush();
        loop {
            let deadline = self
                .timers
                .peek()
                .map(|t| t.0.at)
                .into_iter()
                .chain(self.shutdown_deadline)
                .chain(self.reconnect.map(|(at, _)| at))
                .chain(self.heartbeat_due())
                .chain(self.started_since.map(|at| at + self.started_delay))
                .min();
            if self.next_events(events, deadline).is_err() {
                // Every helper thread is gone: no exit can be learnt any more.
                warn!("all event sources are gone; killing the remaining tasks");
                self.kill_all_now();
                self.flush();
                return;
            }
            self.fire_timers(Instant::now());
            self.reconnect_if_due();
            self.flush();
            self.heartbeat();
            if let Some(deadline) = self.shutdown_deadline {
                if self.tasks.is_empty() {
                    return;
                }
                if Instant::now() >= deadline {
                    warn!(tasks = self.tasks.len(), "giving up on tasks that did not die after SIGKILL");
                    return;
                }
            }
        }
    }

    /// Handles the events already queued and whatever the sockets hold; with
    /// none, sleeps until the server, a worker or a helper thread has
    /// something, or until `deadline`, and handles that. Fails once every
    /// sender is gone.
    fn next_events(&mut self, events: &Receiver<Event>, deadline: Option<Instant>) -> Result<(), ()> {
        let queued = self.drain(events)?;
        if self.wake.is_none() {
            // Fed by the channel alone (tests).
            if queued {
                return Ok(());
            }
            let first = match deadline {
                Some(at) => events.recv_deadline(at),
                None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            return match first {
                Ok(event) => {
                    self.handle(event);
                    self.drain(events).map(drop)
                }
                Err(RecvTimeoutError::Timeout) => Ok(()),
                Err(RecvTimeoutError::Disconnected) => Err(()),
            };
        }
        // With events handled already, the sockets are only looked at, so
        // that a busy channel cannot starve them.
        self.poll_sockets(if queued { Some(Instant::now()) } else { deadline });
        self.drain(events).map(drop)
    }

    /// Handles up to [`MAX_BATCH`] queued events; says whether there were any.
    fn drain(&mut self, events: &Receiver<Event>) -> Result<bool, ()> {
        let mut any = false;
        for _ in 0..MAX_BATCH {
            match events.try_recv() {
                Ok(event) => {
                    self.handle(event);
                    any = true;
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return Err(()),
            }
        }
        Ok(any)
    }

    /// Sleeps in `poll` on the wake-up socket, the server's and the
    /// workers' until one is readable or `deadline` passes, then reads them.
    fn poll_sockets(&mut self, deadline: Option<Instant>) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(at) => {
                // Rounded up, so that the loop does not spin before `at`.
                let ms = at.saturating_duration_since(Instant::now()).as_micros().div_ceil(1000);
                PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::NONE)
            }
        };
        let (wake_ready, server_ready, workers_ready) = {
            let Some(wake) = &self.wake else { return };
            let mut fds = vec![PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
            let server = self.incoming.as_ref().map(|i| {
                fds.push(PollFd::new(i.conn.as_fd(), PollFlags::POLLIN));
                fds.len() - 1
            });
            let mut workers = Vec::new();
            for (id, fd) in self.python.pool.readable() {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
                workers.push(id);
            }
            match poll(&mut fds, timeout) {
                Ok(0) => return,
                Ok(_) => {}
                Err(Errno::EINTR) => return,
                Err(e) => {
                    // Not expected; the next turn tries again.
                    warn!("poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    return;
                }
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            let first_worker = fds.len() - workers.len();
            let workers_ready: Vec<_> = workers
                .into_iter()
                .zip(&fds[first_worker..])
                .filter(|(_, fd)| ready(fd))
                .map(|(id, _)| id)
                .collect();
            (ready(&fds[0]), server.is_some_and(|i| ready(&fds[i])), workers_ready)
        };
        if wake_ready {
            let mut buf = [0u8; 256];
            let wake = self.wake.as_ref().expect("polled above");
            while matches!((&*wake).read(&mut buf), Ok(n) if n > 0) {}
        }
        if server_ready {
            self.read_server();
        }
        for id in workers_ready {
            for event in self.python.pool.read(id) {
                self.on_worker(event);
            }
        }
    }

    /// Reads what the server has sent, without blocking, and handles every
    /// whole message; a closed or broken connection counts as the server lost.
    fn read_server(&mut self) {
        let Some(incoming) = &mut self.incoming else { return };
        let frames = &mut incoming.frames;
        let mut gone = match crate::workers::read_available(incoming.conn.as_fd(), |bytes| frames.push(bytes))
        {
            Ok(false) => None,
            Ok(true) if frames.has_partial() => Some(Some(FrameError::Truncated.to_string())),
            Ok(true) => Some(None),
            Err(e) => Some(Some(io::Error::from(e).to_string())),
        };
        let mut messages = Vec::new();
        loop {
            match incoming.frames.next_payload() {
                Ok(Some(payload)) => match decode::<ToAgent>(payload) {
                    Ok(msg) => messages.push(msg),
                    Err(e) => {
                        gone = Some(Some(format!("undecodable message from the server: {e}")));
                        break;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    gone = Some(Some(e.to_string()));
                    break;
                }
            }
        }
        for msg in messages {
            self.on_message(msg);
        }
        if let Some(reason) = gone {
            match &reason {
                None => info!("the server closed the connection"),
                Some(e) => warn!("lost the connection to the server: {e}"),
            }
            self.server_lost();
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Exited(exit) => self.on_exit(exit),
            Event::Signal(sig) => {
                if self.shutdown_deadline.is_some() {
                    info!("{sig} again: killing every task now");
                    self.kill_all_now();
                } else {
                    info!("received {sig}");
                    self.begin_shutdown(&format!("node agent received {sig}"));
                }
            }
            Event::ThreadDied(name) => {
                warn!("the agent's {name} thread panicked");
                self.begin_shutdown(&format!("node agent failed (its {name} thread panicked)"));
            }
            Event::Local(event) => self.on_local(event),
        }
    }

    fn on_message(&mut self, msg: ToAgent) {
        match msg {
            ToAgent::Welcome { .. } => warn!("ignoring a second welcome from the server"),
            ToAgent::Define(def) => {
                let seq = def.seq;
                match self.jobs.entry(seq) {
                    Entry::Occupied(mut e) => {
                        let job = e.get_mut();
                        job.def = *def;
                        job.forgotten = false;
                    }
                    Entry::Vacant(e) => {
                        e.insert(Job { def: *def, running: 0, forgotten: false });
                        self.define_python(seq);
                    }
                }
            }
            ToAgent::Start(starts) => {
                let before = self.tasks.len();
                for start in &starts {
                    self.placed.insert(start.task, (start.cpus.clone(), start.gpus.clone()));
                    self.start_task(start);
                }
                if self.tasks.len() > before {
                    // The reaper may be waiting for a first child.
                    let _ = self.spawned.send(());
                }
            }
            ToAgent::Kill { task, reason } => match self.pids.get(&task) {
                Some(&pid) => self.terminate(pid, reason),
                None => debug!(?task, "kill for a task not running here"),
            },
            ToAgent::Forget { seq } => {
                if let Some(job) = self.jobs.get_mut(&seq) {
                    job.forgotten = true;
                    if job.running == 0 {
                        self.jobs.remove(&seq);
                        self.launcher.forget(seq);
                        self.forget_python(seq);
                    }
                }
            }
            ToAgent::Purged(seqs) => self.purge_results(&seqs),
            ToAgent::Shutdown => {
                info!("the server asked the agent to shut down");
                self.begin_shutdown("the server is shutting down");
            }
        }
    }

    fn start_task(&mut self, start: &StartTask) {
        let fail = |exit_status: i32, comment: String| TaskEnd {
            task: start.task,
            exit_status,
            comment: Some(comment),
            used: ResourcesUsed::default(),
            outcome: None,
        };
        if self.shutdown_deadline.is_some() {
            self.finished.push(fail(SETUP_FAILED, "node agent is shutting down".into()));
            return;
        }
        if self.pids.contains_key(&start.task) {
            warn!(task = ?start.task, "asked to start a task that is already running");
            return;
        }
        let Some(job) = self.jobs.get_mut(&start.task.seq) else {
            let comment = format!("the node agent has no definition of job {}", start.task.seq);
            self.finished.push(fail(SETUP_FAILED, comment));
            return;
        };
        if matches!(job.def.spec.command, picloud_proto::JobCommand::Python(_)) {
            return self.start_python_task(start);
        }
        // Whom the job runs as: a root agent starts it as its owner, any other
        // agent only its own user's jobs (it cannot switch users). Checked
        // first, so that a refused task costs no cgroup.
        if let Err(e) = self.launcher.owner_of(&job.def) {
            self.finished.push(fail(e.exit_status(), e.to_string()));
            return;
        }
        let mem_limit = job.def.spec.resources.mem;
        // Every task gets a cgroup, from the pool: one made earlier for the same
        // cpus, whose spawner thread (v1) sits in it pinned to them, so that no
        // cgroup is made, moved into or removed per task (see `cgroup`).
        let cgroup = match &self.cgroups {
            None => None,
            Some(cgroups) => {
                let limits = Limits {
                    memory: mem_limit,
                    // No swap beyond the limit: a job over its memory is killed, not swapped.
                    memory_and_swap: mem_limit,
                    cpus: start.cpus.clone(),
                    pids: cgroups.job_pids_max(),
                    ..Limits::default()
                };
                match cgroups.acquire(&limits) {
                    Ok(cgroup) => Some(cgroup),
                    Err(e) => {
                        self.finished
                            .push(fail(SETUP_FAILED, format!("cannot create the task's cgroup: {e}")));
                        return;
                    }
                }
            }
        };
        // The spawn lock is held for the whole spawn, also while a spawner
        // thread does it: the reaper must not reap a child std is still busy with.
        let spawned = {
            let _guard = self.spawn_lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.launcher.spawn(&job.def, start, cgroup.as_ref())
        };
        match spawned {
            Ok(child) => {
                // The reaper reaps it; dropping the handle neither waits nor kills.
                let pid = child.id() as i32;
                drop(child);
                let walltime_limit = job.def.spec.resources.walltime;
                job.running += 1;
                self.track(pid, start.task, walltime_limit, cgroup, mem_limit);
                debug!(task = %start.job_id, pid, cpus = ?start.cpus, "task started");
            }
            Err(e) => {
                debug!(task = %start.job_id, "task failed to start: {e}");
                if let (Some(cgroups), Some(cgroup)) = (&self.cgroups, cgroup) {
                    cgroups.release(cgroup);
                }
                self.finished.push(fail(e.exit_status(), e.to_string()));
            }
        }
    }

    /// Records a started task (of job `task.seq`, whose running count the
    /// caller raised) as process `pid`, with its walltime timer.
    fn track(
        &mut self,
        pid: i32,
        task: TaskId,
        walltime_limit: Option<u64>,
        cgroup: Option<PooledCgroup>,
        mem_limit: Option<u64>,
    ) {
        let serial = self.next_serial;
        self.next_serial += 1;
        let now = Instant::now();
        // A limit too far away to be represented never comes due.
        if let Some(at) = walltime_limit.and_then(|l| now.checked_add(Duration::from_secs(l))) {
            self.timers.push(Reverse(Timer { at, pid, serial, kind: TimerKind::Walltime }));
        }
        let entry = Task { id: task, serial, started: now, walltime_limit, killing: None, cgroup, mem_limit };
        self.tasks.insert(pid, entry);
        self.pids.insert(task, pid);
        self.started.push(task);
        self.started_since.get_or_insert(now);
    }

    fn on_exit(&mut self, exit: Exit) {
        if self.python_exit(exit.pid, exit.status) {
            return;
        }
        let Some(task) = self.tasks.remove(&exit.pid) else {
            debug!(pid = exit.pid, "reaped a child that is no task");
            return;
        };
        self.pids.remove(&task.id);
        // The leader is gone: take whatever it left running in its group with it.
        let _ = killpg(Pid::from_raw(exit.pid), Signal::SIGKILL);
        let exit_status = pbs_exit_status(exit.status);
        debug!(task = ?task.id, pid = exit.pid, exit_status, "task ended");
        let mut used = ResourcesUsed {
            cput_ms: exit.cput_ms,
            walltime_ms: task.started.elapsed().as_millis() as u64,
            mem: exit.maxrss,
        };
        let mut comment = task.killing;
        if let (Some(cgroups), Some(cgroup)) = (&self.cgroups, task.cgroup) {
            // Whatever left the process group dies with the task; then the
            // cgroup, which counted every process of the task and only the
            // task, says what it used, and goes back to the pool.
            let usage = cgroups.release(cgroup);
            used.mem = usage.peak_memory.unwrap_or(used.mem);
            used.cput_ms = usage.cpu_ns.map_or(used.cput_ms, |ns| ns / 1_000_000);
            if usage.oom_kills > 0 && comment.is_none() {
                let limit = task.mem_limit.map(human_bytes).unwrap_or_else(|| "the node".into());
                comment =
                    Some(format!("job exceeded its memory limit of {limit}; peak {}", human_bytes(used.mem)));
            }
        }
        self.finished.push(TaskEnd { task: task.id, exit_status, comment, used, outcome: None });
        let seq = task.id.seq;
        if let Some(job) = self.jobs.get_mut(&seq) {
            job.running -= 1;
            if job.forgotten && job.running == 0 {
                self.jobs.remove(&seq);
                self.launcher.forget(seq);
            }
        }
    }

    /// SIGTERM to the task's process group now, SIGKILL after the grace period.
    fn terminate(&mut self, pid: i32, reason: String) {
        let Some(task) = self.tasks.get_mut(&pid) else { return };
        if task.killing.is_some() {
            return;
        }
        debug!(task = ?task.id, pid, "terminating: {reason}");
        task.killing = Some(reason);
        let group = Pid::from_raw(pid);
        let _ = killpg(group, Signal::SIGTERM);
        // A stopped job would not see the SIGTERM until continued.
        let _ = killpg(group, Signal::SIGCONT);
        if let Some(at) = Instant::now().checked_add(self.kill_grace) {
            self.timers.push(Reverse(Timer { at, pid, serial: task.serial, kind: TimerKind::Kill }));
        }
    }

    fn kill_all_now(&mut self) {
        for &pid in self.tasks.keys() {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse(timer)) = self.timers.peek() {
            if timer.at > now {
                break;
            }
            self.timers.pop();
            let Some(task) = self.tasks.get(&timer.pid).filter(|t| t.serial == timer.serial) else {
                continue;
            };
            match timer.kind {
                TimerKind::Walltime if task.killing.is_none() => {
                    let used = task.started.elapsed();
                    // Rounded up: the job ran past its limit.
                    let used_secs = used.as_secs() + u64::from(used.subsec_nanos() > 0);
                    let reason = format!(
                        "job killed: walltime {} exceeded limit {}",
                        hhmmss(used_secs),
                        hhmmss(task.walltime_limit.unwrap_or(0))
                    );
                    self.terminate(timer.pid, reason);
                }
                TimerKind::Walltime => {}
                TimerKind::Kill => {
                    debug!(task = ?task.id, pid = timer.pid, "grace period over: SIGKILL");
                    let _ = killpg(Pid::from_raw(timer.pid), Signal::SIGKILL);
                }
            }
        }
    }

    fn begin_shutdown(&mut self, why: &str) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        info!(tasks = self.tasks.len(), "shutting down: {why}");
        let wait = self.kill_grace.saturating_add(SHUTDOWN_REAP_WAIT);
        let now = Instant::now();
        // An unrepresentable deadline (absurd grace): a day is as good as forever.
        self.shutdown_deadline = Some(now.checked_add(wait).unwrap_or(now + Duration::from_secs(86_400)));
        let pids: Vec<i32> = self.tasks.keys().copied().collect();
        for pid in pids {
            self.terminate(pid, format!("job killed: {why}"));
        }
        self.python.pool.retire_all();
    }

    /// Writes what happened since the last call: one `Started` and one
    /// `Finished` frame at most. While the server is away, ends are kept
    /// for the next connection (and starts forgotten: `Running` says them).
    fn flush(&mut self) {
        for end in &self.finished {
            self.placed.remove(&end.task);
        }
        if !self.server_up {
            self.started.clear();
            self.started_since = None;
            return;
        }
        let starts_due = self.started_since.is_some_and(|at| at.elapsed() >= self.started_delay);
        if self.finished.is_empty() && !starts_due {
            return;
        }
        let mut result = Ok(());
        if !self.started.is_empty() {
            self.started_since = None;
            result = write_frame(&mut self.writer, &AgentMsg::Started(std::mem::take(&mut self.started)));
        }
        if result.is_ok() && !self.finished.is_empty() {
            result = write_frame(&mut self.writer, &AgentMsg::Finished(self.finished.clone()));
        }
        let result = result.and_then(|()| self.writer.flush().map_err(FrameError::Io));
        match result {
            Ok(()) => {
                self.finished.clear();
                self.last_write = Instant::now();
            }
            Err(e) => {
                // The ends stay: sent again once connected (the server
                // ignores an end it already has).
                warn!("cannot write to the server: {e}");
                self.started.clear();
                self.server_lost();
            }
        }
    }

    /// The connection is gone: tasks go on, and the agent connects again
    /// (see the module doc) unless it is stopping.
    fn server_lost(&mut self) {
        if !self.server_up {
            return;
        }
        self.server_up = false;
        self.incoming = None;
        self.writer.get_ref().shutdown();
        if self.link.is_none() {
            self.begin_shutdown("the node agent lost its server");
        } else if self.shutdown_deadline.is_none() {
            info!(tasks = self.tasks.len(), "the server is gone: tasks go on; connecting again");
            self.reconnect = Some((Instant::now() + RECONNECT_FIRST_PAUSE, RECONNECT_FIRST_PAUSE));
        }
    }

    /// Tries to connect again when it is time to, and on success sends the
    /// kept ends and what runs here.
    fn reconnect_if_due(&mut self) {
        let Some((at, pause)) = self.reconnect else { return };
        if self.shutdown_deadline.is_some() {
            self.reconnect = None;
            return;
        }
        if Instant::now() < at {
            return;
        }
        let Some(link) = &self.link else { return };
        let attempt = Conn::connect(&link.server)
            .and_then(|conn| {
                conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
                let reader_conn = conn.try_clone()?;
                Ok((conn, reader_conn))
            })
            .map_err(|e| e.to_string())
            .and_then(|(mut conn, reader_conn)| {
                let (name, frames) =
                    handshake(&mut conn, &link.node, &link.server).map_err(|e| e.to_string())?;
                Ok((conn, reader_conn, name, frames))
            });
        match attempt {
            Ok((conn, reader_conn, server_name, frames)) => {
                self.incoming = Some(Incoming { conn: reader_conn, frames });
                info!(server = %server_name, tasks = self.tasks.len(), ends = self.finished.len(), "connected again");
                self.writer = BufWriter::with_capacity(64 * 1024, conn);
                self.server_up = true;
                self.reconnect = None;
                // The kept ends first, then what runs: the server settles
                // the ends before it compares what it expects here.
                self.flush();
                self.send_running();
                // Frames that came with the welcome.
                self.read_server();
            }
            Err(e) => {
                debug!("cannot connect again yet: {e}");
                self.reconnect = Some((Instant::now() + pause, (pause * 2).min(RECONNECT_MAX_PAUSE)));
            }
        }
    }

    /// Sends every task running here (after each welcome).
    fn send_running(&mut self) {
        if !self.server_up {
            return;
        }
        let running: Vec<TaskRunning> = self
            .pids
            .keys()
            .map(|&task| {
                let (cpus, gpus) = self.placed.get(&task).cloned().unwrap_or_default();
                TaskRunning { task, cpus, gpus }
            })
            .collect();
        let result = write_frame(&mut self.writer, &AgentMsg::Running(running))
            .and_then(|()| self.writer.flush().map_err(FrameError::Io));
        match result {
            Ok(()) => self.last_write = Instant::now(),
            Err(e) => {
                warn!("cannot write to the server: {e}");
                self.server_lost();
            }
        }
    }

    /// When the next heartbeat is due, while connected.
    fn heartbeat_due(&self) -> Option<Instant> {
        (self.server_up && self.link.is_some()).then(|| self.last_write + HEARTBEAT)
    }

    /// Sends a heartbeat if nothing was written for [`HEARTBEAT`].
    fn heartbeat(&mut self) {
        if self.heartbeat_due().is_some_and(|at| Instant::now() >= at) {
            let result = write_frame(&mut self.writer, &AgentMsg::Heartbeat)
                .and_then(|()| self.writer.flush().map_err(FrameError::Io));
            match result {
                Ok(()) => self.last_write = Instant::now(),
                Err(e) => {
                    warn!("cannot write to the server: {e}");
                    self.server_lost();
                }
            }
        }
    }
}

/// `HH:MM:SS`, as PBS shows walltimes.
/// `1.0 GiB`, `512.0 MiB`: sizes as a person reads them.
fn human_bytes(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let b = bytes as f64;
    if b >= GIB { format!("{:.1} GiB", b / GIB) } else { format!("{:.1} MiB", b / MIB) }
}

/// Environment variable giving the most processes and threads of one job
/// (`pids.max` of its cgroup): a number, or `max` for no limit beyond the
/// node's; [`DEFAULT_JOB_PIDS_MAX`](crate::cgroup::DEFAULT_JOB_PIDS_MAX) when unset.
const JOB_PIDS_MAX_VAR: &str = "PICLOUD_JOB_PIDS_MAX";

/// The name of an agent's base cgroup is this and its pid.
const AGENT_CGROUP_PREFIX: &str = "picloud-agent-";

/// Finds and prepares where task cgroups go; returns them (or none) and the
/// words for `picloud nodes` saying which limits this node enforces. Clears
/// away what agents killed before they could clean up left beside it.
fn setup_cgroups() -> (Option<Cgroups>, String) {
    let leaf = format!("{AGENT_CGROUP_PREFIX}{}", std::process::id());
    let found = match Cgroups::detect(&leaf) {
        Ok(Some(cgroups)) => cgroups.prepare().map(|()| cgroups),
        Ok(None) => {
            warn!("no cgroup hierarchy is mounted: memory limits will not be enforced");
            return (None, "none: no cgroup hierarchy is mounted".into());
        }
        Err(e) => Err(e),
    };
    match found {
        Ok(mut cgroups) => {
            let swept = cgroups.sweep_stale(AGENT_CGROUP_PREFIX);
            if swept > 0 {
                info!("removed the cgroups that {swept} agents killed earlier left behind");
            }
            match std::env::var(JOB_PIDS_MAX_VAR).as_deref().map(str::trim) {
                Err(_) => {}
                Ok("max") => cgroups = cgroups.with_job_pids_max(None),
                Ok(value) => match value.parse::<u64>() {
                    Ok(n) if n > 0 => cgroups = cgroups.with_job_pids_max(Some(n)),
                    _ => warn!("ignoring {JOB_PIDS_MAX_VAR}={value:?}: not a positive number or `max`"),
                },
            }
            let words = cgroups.describe();
            let pids = cgroups.job_pids_max().map_or("no".to_string(), |n| n.to_string());
            info!("every task runs in a pooled cgroup of its own ({pids} processes at most): {words}");
            (Some(cgroups), words)
        }
        Err(e) => {
            warn!("cannot create cgroups, so memory limits will not be enforced: {e}");
            (None, format!("none: {e}"))
        }
    }
}

fn hhmmss(secs: u64) -> String {
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walltime_format() {
        assert_eq!(hhmmss(0), "00:00:00");
        assert_eq!(hhmmss(3), "00:00:03");
        assert_eq!(hhmmss(3661), "01:01:01");
        assert_eq!(hhmmss(100 * 3600), "100:00:00");
    }

    #[test]
    fn timers_come_due_in_time_order() {
        let now = Instant::now();
        let mut heap = BinaryHeap::new();
        for (secs, pid) in [(3, 1), (1, 2), (2, 3)] {
            let at = now + Duration::from_secs(secs);
            heap.push(Reverse(Timer { at, pid, serial: 0, kind: TimerKind::Kill }));
        }
        let order: Vec<i32> = std::iter::from_fn(|| heap.pop().map(|t| t.0.pid)).collect();
        assert_eq!(order, vec![2, 3, 1]);
    }
}
