//! The scheduler server: one process per cluster, owning the queue.
//!
//! It listens on a Unix socket in the state directory (and optionally TCP),
//! runs a single mio event loop that decodes frames, turns requests and agent
//! reports into core [`Event`]s, and carries out the core's [`Decision`]s by
//! queueing messages to agents. One lock file per state directory guarantees a
//! single server.
//!
//! Each loop iteration:
//! 1. waits for readiness (or the next deadline of a `wait` request);
//! 2. reads every ready connection and handles each complete frame;
//! 3. answers `wait` requests whose jobs have all ended, or whose time is up;
//! 4. sends each agent the tasks started for it, one frame per agent;
//! 5. writes out what every connection has queued, closing those marked so.

mod conn;
mod jobs;

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, UnixListener};
use mio::{Events, Interest, Poll, Token, Waker};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{SigSet, Signal};
use picloud_proto::{
    AgentMsg, ClientRequest, Dependency, ErrorKind, Hello, JobInfo, JobRef, JobSpec, NodeInfo, NodeStatus,
    ProtoError, RefOutcome, Role, ServerReply, ServerStatus, StartTask, StatRequest, TaskEnd, TaskId,
    ToAgent,
};
use tracing::{debug, info, warn};

use crate::core::{Core, Decision, Event, NodeId, Request};
use conn::{Conn, Peer, Stream};
use jobs::JobRecord;
pub use jobs::{EXIT_CANCELLED, EXIT_NEVER_RAN};

const UNIX_LISTENER: Token = Token(0);
const TCP_LISTENER: Token = Token(1);
const WAKER: Token = Token(2);
const FIRST_CONN: usize = 3;

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
    #[error("{what} {path}: {source}")]
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
    #[error("event loop: {0}")]
    Poll(#[from] std::io::Error),
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A running node agent as the server sees it.
#[derive(Debug)]
struct AgentNode {
    name: String,
    info: NodeInfo,
    token: Option<Token>,
    running: HashSet<TaskId>,
    /// Tasks started since the last flush.
    pending_starts: Vec<StartTask>,
}

/// A client waiting for jobs to end.
#[derive(Debug)]
struct Waiter {
    token: Token,
    refs: Vec<JobRef>,
    deadline: Option<Instant>,
}

/// The server's whole state, owned by the event loop thread.
struct Server {
    config: ServerConfig,
    registry: mio::Registry,
    core: Core,
    jobs: HashMap<u64, JobRecord>,
    next_seq: u64,
    nodes: HashMap<NodeId, AgentNode>,
    next_node: u32,
    conns: HashMap<Token, Conn>,
    waiters: Vec<Waiter>,
    started: Instant,
    decisions: Vec<Decision>,
    /// Something ended since waiters were last checked.
    ended_since_check: bool,
    stopping: bool,
    last_purge: Instant,
    /// The user whose request is being applied, named in cancel comments.
    acting_user: String,
}

/// Runs a server until SIGTERM or SIGINT (or a client's shutdown request).
///
/// Blocks SIGTERM and SIGINT in the calling thread (and threads it starts) and
/// takes them with `sigwait` on a thread of its own.
pub fn run(config: ServerConfig) -> Result<(), ServerError> {
    let dir = config.state_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| ServerError::Setup {
        what: "cannot create the state directory",
        path: dir.clone(),
        source,
    })?;
    let _lock = lock_state_dir(&dir)?;
    let sock_path = dir.join(picloud_proto::SOCKET_NAME);
    let _ = std::fs::remove_file(&sock_path);
    let setup = |what, source| ServerError::Setup { what, path: sock_path.clone(), source };
    let mut unix = UnixListener::bind(&sock_path).map_err(|e| setup("cannot listen on", e))?;
    // Every local user may connect; who they are comes from SO_PEERCRED.
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| setup("cannot set permissions of", e))?;

    let mut poll = Poll::new()?;
    poll.registry().register(&mut unix, UNIX_LISTENER, Interest::READABLE)?;
    let mut tcp = match config.tcp {
        Some(addr) => {
            let mut l = TcpListener::bind(addr).map_err(|source| ServerError::Setup {
                what: "cannot listen on TCP address",
                path: PathBuf::from(addr.to_string()),
                source,
            })?;
            poll.registry().register(&mut l, TCP_LISTENER, Interest::READABLE)?;
            Some(l)
        }
        None => None,
    };

    let stop = Arc::new(AtomicBool::new(false));
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    spawn_signal_thread(stop.clone(), waker);

    info!(socket = %sock_path.display(), name = %config.name, "picloud server listening");
    let mut server = Server {
        registry: poll.registry().try_clone()?,
        config,
        core: Core::new(),
        jobs: HashMap::new(),
        next_seq: 1,
        nodes: HashMap::new(),
        next_node: 0,
        conns: HashMap::new(),
        waiters: Vec::new(),
        started: Instant::now(),
        decisions: Vec::new(),
        ended_since_check: false,
        stopping: false,
        last_purge: Instant::now(),
        acting_user: String::new(),
    };
    let mut next_token = FIRST_CONN;
    let mut events = Events::with_capacity(1024);
    loop {
        let timeout = server.next_timeout();
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for event in &events {
            match event.token() {
                UNIX_LISTENER => loop {
                    match unix.accept() {
                        Ok((stream, _)) => {
                            let cred = nix::sys::socket::getsockopt(
                                &stream,
                                nix::sys::socket::sockopt::PeerCredentials,
                            )
                            .ok()
                            .map(|c| (c.uid(), c.gid()));
                            server.add_conn(Token(next_token), Stream::Unix(stream), cred);
                            next_token += 1;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            warn!("accept failed: {e}");
                            break;
                        }
                    }
                },
                TCP_LISTENER => loop {
                    let Some(l) = tcp.as_mut() else { break };
                    match l.accept() {
                        Ok((stream, _)) => {
                            stream.set_nodelay(true).ok();
                            server.add_conn(Token(next_token), Stream::Tcp(stream), None);
                            next_token += 1;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            warn!("accept failed: {e}");
                            break;
                        }
                    }
                },
                WAKER => {}
                token => server.on_readable(token),
            }
        }
        if stop.load(Ordering::Acquire) {
            server.stopping = true;
        }
        server.tick();
        server.flush_all();
        if server.stopping {
            server.shut_down();
            break;
        }
    }
    let _ = std::fs::remove_file(&sock_path);
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

/// Blocks SIGTERM/SIGINT here and waits for them on a thread of its own.
fn spawn_signal_thread(stop: Arc<AtomicBool>, waker: Arc<Waker>) {
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
            // Release pairs with the Acquire load in the event loop.
            stop.store(true, Ordering::Release);
            let _ = waker.wake();
        })
        .expect("spawning the signal thread");
}

impl Server {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn next_timeout(&self) -> Option<Duration> {
        let purge = Duration::from_secs(10);
        let now = Instant::now();
        let mut t = purge.saturating_sub(now - self.last_purge);
        for w in &self.waiters {
            if let Some(d) = w.deadline {
                t = t.min(d.saturating_duration_since(now));
            }
        }
        Some(t)
    }

    fn add_conn(&mut self, token: Token, stream: Stream, cred: Option<(u32, u32)>) {
        let mut conn = Conn::new(stream, cred);
        if let Err(e) = conn.register(&self.registry, token) {
            warn!("cannot register a connection: {e}");
            return;
        }
        self.conns.insert(token, conn);
    }

    fn on_readable(&mut self, token: Token) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        let open = match conn.reader.read_from(&mut conn.stream) {
            Ok(open) => open,
            Err(e) => {
                debug!("read error on {token:?}: {e}");
                false
            }
        };
        loop {
            let Some(conn) = self.conns.get_mut(&token) else { return };
            if conn.closing {
                break;
            }
            let payload = match conn.reader.next_payload() {
                Ok(Some(p)) => p.to_vec(),
                Ok(None) => break,
                Err(e) => {
                    self.refuse(token, ErrorKind::Malformed, e.to_string());
                    break;
                }
            };
            self.on_frame(token, &payload);
        }
        if !open {
            self.close(token);
        }
    }

    /// Sends an error and closes the connection once it is written.
    fn refuse(&mut self, token: Token, kind: ErrorKind, message: String) {
        let Some(conn) = self.conns.get_mut(&token) else { return };
        warn!(?token, "closing connection: {message}");
        conn.send(&ServerReply::Error(ProtoError::new(kind, message)));
        conn.closing = true;
    }

    fn on_frame(&mut self, token: Token, payload: &[u8]) {
        let peer = self.conns[&token].peer.clone();
        match peer {
            Peer::Pending => match picloud_proto::frame::decode::<Hello>(payload) {
                Ok(hello) => self.on_hello(token, hello),
                Err(e) => self.refuse(token, ErrorKind::Malformed, format!("bad handshake: {e}")),
            },
            Peer::Client { uid, gid, user } => match picloud_proto::frame::decode::<ClientRequest>(payload) {
                Ok(req) => self.on_request(token, uid, gid, &user, req),
                Err(e) => self.refuse(token, ErrorKind::Malformed, e.to_string()),
            },
            Peer::Agent(node) => match picloud_proto::frame::decode::<AgentMsg>(payload) {
                Ok(msg) => self.on_agent(node, msg),
                Err(e) => {
                    warn!("malformed frame from agent {node:?}: {e}");
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
        match hello.role {
            Role::Client => {
                let Some((uid, gid)) = self.conns[&token].cred else {
                    return self.refuse(
                        token,
                        ErrorKind::PermissionDenied,
                        "clients must connect through the server's Unix socket (TCP is for agents)".into(),
                    );
                };
                let user = user_name(uid);
                let name = self.config.name.clone();
                let conn = self.conns.get_mut(&token).expect("present");
                conn.peer = Peer::Client { uid, gid, user };
                conn.send(&ServerReply::Welcome {
                    server_name: name,
                    version: picloud_proto::PROTOCOL_VERSION,
                });
            }
            Role::Agent(info) => {
                let node = NodeId(self.next_node);
                self.next_node += 1;
                info!(node = %info.hostname, cores = info.cores.len(), "agent joined");
                let shape = crate::core::NodeShape::from_info(&info);
                let name = self.config.name.clone();
                let conn = self.conns.get_mut(&token).expect("present");
                conn.peer = Peer::Agent(node);
                conn.send(&ToAgent::Welcome { server_name: name });
                self.nodes.insert(
                    node,
                    AgentNode {
                        name: info.hostname.clone(),
                        info,
                        token: Some(token),
                        running: HashSet::new(),
                        pending_starts: Vec::new(),
                    },
                );
                self.apply(Event::NodeJoined { node, shape });
            }
        }
    }

    fn reply(&mut self, token: Token, reply: &ServerReply) {
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.send(reply);
        }
    }

    fn error(&mut self, token: Token, kind: ErrorKind, message: impl Into<String>) {
        self.reply(token, &ServerReply::Error(ProtoError::new(kind, message)));
    }

    fn on_request(&mut self, token: Token, uid: u32, gid: u32, user: &str, req: ClientRequest) {
        match req {
            ClientRequest::Submit(spec) => match self.submit(*spec, uid, gid, user) {
                Ok((seq, id)) => self.reply(token, &ServerReply::Submitted { seq, id }),
                Err(e) => self.reply(token, &ServerReply::Error(e)),
            },
            ClientRequest::Stat(req) => {
                let reply = self.stat(&req);
                self.reply(token, &reply);
            }
            ClientRequest::Cancel(refs) => {
                let outcomes = refs.iter().map(|r| (*r, self.cancel(*r, uid, user))).collect();
                self.reply(token, &ServerReply::Cancelled(outcomes));
            }
            ClientRequest::Release(refs) => {
                let outcomes = refs.iter().map(|r| (*r, self.release(*r, uid))).collect();
                self.reply(token, &ServerReply::Released(outcomes));
            }
            ClientRequest::Wait { jobs, timeout_ms } => {
                let unknown: Vec<String> =
                    jobs.iter().filter(|r| !self.exists(r)).map(|r| r.to_string()).collect();
                if !unknown.is_empty() {
                    return self.error(
                        token,
                        ErrorKind::UnknownJob,
                        format!("Unknown Job Id {}", unknown.join(", ")),
                    );
                }
                let deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
                self.waiters.push(Waiter { token, refs: jobs, deadline });
                self.ended_since_check = true;
            }
            ClientRequest::Nodes => {
                let mut nodes: Vec<NodeStatus> = self
                    .nodes
                    .values()
                    .map(|n| NodeStatus {
                        name: n.name.clone(),
                        state: if n.token.is_some() { "up" } else { "down" }.to_string(),
                        info: n.info.clone(),
                        used_pus: {
                            let mut pus: Vec<u32> = n
                                .running
                                .iter()
                                .filter_map(|t| self.jobs.get(&t.seq)?.tasks.get(&t.index))
                                .flat_map(|r| r.cpus.iter().copied())
                                .collect();
                            pus.sort_unstable();
                            pus
                        },
                        running: {
                            let mut ids: Vec<String> =
                                n.running.iter().map(|t| t.display_with(&self.config.name)).collect();
                            ids.sort();
                            ids
                        },
                    })
                    .collect();
                nodes.sort_by(|a, b| a.name.cmp(&b.name));
                self.reply(token, &ServerReply::Nodes(nodes));
            }
            ClientRequest::ServerStatus => {
                let status = self.status();
                self.reply(token, &ServerReply::ServerStatus(status));
            }
            ClientRequest::Shutdown => {
                let owner = nix::unistd::getuid().as_raw();
                if uid != 0 && uid != owner {
                    return self.error(
                        token,
                        ErrorKind::PermissionDenied,
                        "only the server's owner or root may stop it",
                    );
                }
                self.reply(token, &ServerReply::Ok);
                self.stopping = true;
            }
        }
    }

    fn exists(&self, r: &JobRef) -> bool {
        match (self.jobs.get(&r.seq()), r) {
            (None, _) => false,
            (Some(job), JobRef::Task(_, i)) => job.has_task(*i),
            (Some(job), JobRef::Array(_)) => job.is_array(),
            (Some(_), JobRef::Job(_)) => true,
        }
    }

    fn submit(&mut self, spec: JobSpec, uid: u32, gid: u32, user: &str) -> Result<(u64, String), ProtoError> {
        let invalid = |m: String| ProtoError::new(ErrorKind::Invalid, m);
        if spec.resources.ncpus == 0 {
            return Err(invalid("ncpus must be at least 1".into()));
        }
        if matches!(&spec.command, picloud_proto::JobCommand::Argv(a) if a.is_empty()) {
            return Err(invalid("no command given".into()));
        }
        let request = Request {
            user: uid,
            resources: crate::core::ResourceRequest {
                chunks: 1,
                cores: spec.resources.ncpus,
                mem: spec.resources.mem.unwrap_or(0),
                gpus: 0,
                placement: crate::core::Placement::Compact,
            },
            walltime: spec.resources.walltime.map(|s| s * 1000),
            priority: spec.priority,
            array: spec.array.clone(),
            depend: spec.depend.iter().map(|d: &Dependency| (d.kind, d.on)).collect(),
            hold: spec.hold,
        };
        self.core.check_fits(&request).map_err(invalid)?;
        for d in &spec.depend {
            if !self.exists(&d.on) {
                return Err(ProtoError::new(
                    ErrorKind::UnknownJob,
                    format!("dependency on Unknown Job Id {}.{}", d.on, self.config.name),
                ));
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let record = JobRecord::new(seq, spec, user.to_string(), uid, gid, unix_now());
        let id = record.id(&self.config.name);
        debug!(%id, %user, "submitted");
        self.jobs.insert(seq, record);
        self.apply(Event::Submit { seq, request });
        Ok((seq, id))
    }

    fn may_control(&self, job: &JobRecord, uid: u32) -> bool {
        uid == 0 || uid == job.uid || uid == nix::unistd::getuid().as_raw()
    }

    fn cancel(&mut self, r: JobRef, uid: u32, user: &str) -> RefOutcome {
        if !self.exists(&r) {
            return RefOutcome::Unknown;
        }
        let job = &self.jobs[&r.seq()];
        if !self.may_control(job, uid) {
            return RefOutcome::PermissionDenied;
        }
        if job.ref_ended(&r, &self.core) {
            return RefOutcome::AlreadyFinished;
        }
        self.acting_user = user.to_string();
        self.apply(Event::Cancel(r));
        RefOutcome::Done
    }

    fn release(&mut self, r: JobRef, uid: u32) -> RefOutcome {
        if !self.exists(&r) {
            return RefOutcome::Unknown;
        }
        let job = &self.jobs[&r.seq()];
        if !self.may_control(job, uid) {
            return RefOutcome::PermissionDenied;
        }
        if job.finished_at.is_some() {
            return RefOutcome::AlreadyFinished;
        }
        if self.core.phase(r.seq()) != crate::core::Phase::Held {
            return RefOutcome::NotApplicable;
        }
        self.apply(Event::Release(r));
        RefOutcome::Done
    }

    fn on_agent(&mut self, node: NodeId, msg: AgentMsg) {
        match msg {
            AgentMsg::Started(_) => {}
            AgentMsg::Finished(ends) => {
                for end in ends {
                    self.task_finished(node, &end);
                }
            }
        }
    }

    fn task_finished(&mut self, node: NodeId, end: &TaskEnd) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.running.remove(&end.task);
        }
        let now = unix_now();
        let Some(job) = self.jobs.get_mut(&end.task.seq) else { return };
        let Some(success) = job.finish(end, now) else { return };
        self.ended_since_check = true;
        self.forget_if_done(end.task.seq);
        self.apply(Event::TaskFinished { task: end.task, success });
    }

    /// Feeds one event to the core and carries out its decisions.
    fn apply(&mut self, event: Event) {
        let mut decisions = std::mem::take(&mut self.decisions);
        self.core.apply(event, self.now_ms(), &mut decisions);
        for d in decisions.drain(..) {
            self.carry_out(d);
        }
        self.decisions = decisions;
    }

    fn carry_out(&mut self, d: Decision) {
        let server = self.config.name.clone();
        match d {
            Decision::Start { task, allocation } => {
                // Jobs are single-node (qsub refuses more chunks).
                let Some(first) = allocation.nodes.first() else { return };
                let (node, cpus) = (first.node, first.pus.clone());
                let Some(job) = self.jobs.get_mut(&task.seq) else { return };
                let Some(agent) = self.nodes.get_mut(&node) else { return };
                let Some(token) = agent.token else { return };
                if !job.defined_on.contains(&node) {
                    job.defined_on.push(node);
                    let def = picloud_proto::JobDefinition {
                        seq: job.seq,
                        spec: job.spec.clone(),
                        user: job.user.clone(),
                        uid: job.uid,
                        gid: job.gid,
                    };
                    // Flush earlier starts first so the agent sees them in order.
                    if !agent.pending_starts.is_empty() {
                        let starts = std::mem::take(&mut agent.pending_starts);
                        if let Some(conn) = self.conns.get_mut(&token) {
                            conn.send(&ToAgent::Start(starts));
                        }
                    }
                    if let Some(conn) = self.conns.get_mut(&token) {
                        conn.send(&ToAgent::Define(Box::new(def)));
                    }
                }
                let (stdout_path, stderr_path) = job.output_paths(task.index);
                job.start(task.index, node, cpus.clone(), unix_now());
                agent.running.insert(task);
                agent.pending_starts.push(StartTask {
                    task,
                    job_id: task.display_with(&server),
                    cpus,
                    stdout_path,
                    stderr_path,
                });
            }
            Decision::Kill { task, nodes } => {
                let by = self.acting_user.clone();
                if let Some(rec) = self.jobs.get_mut(&task.seq).and_then(|j| j.tasks.get_mut(&task.index)) {
                    rec.cancelled_by = Some(by.clone());
                }
                for node in nodes {
                    let token = self.nodes.get(&node).and_then(|n| n.token);
                    if let Some(conn) = token.and_then(|t| self.conns.get_mut(&t)) {
                        conn.send(&ToAgent::Kill { task, reason: format!("Job deleted by {by}") });
                    }
                }
            }
            Decision::End { seq, index, reason } => {
                let node_name = self
                    .jobs
                    .get(&seq)
                    .and_then(|j| j.tasks.get(&index))
                    .and_then(|t| t.node)
                    .and_then(|n| self.nodes.get(&n))
                    .map(|n| n.name.clone())
                    .unwrap_or_default();
                let by = self.acting_user.clone();
                if let Some(job) = self.jobs.get_mut(&seq) {
                    job.end(index, &reason, &by, &node_name, unix_now());
                    self.ended_since_check = true;
                    self.forget_if_done(seq);
                }
            }
        }
    }

    /// Once a job has ended, its agents may drop its definition.
    fn forget_if_done(&mut self, seq: u64) {
        let Some(job) = self.jobs.get_mut(&seq) else { return };
        if job.finished_at.is_none() {
            return;
        }
        for node in std::mem::take(&mut job.defined_on) {
            let token = self.nodes.get(&node).and_then(|n| n.token);
            if let Some(conn) = token.and_then(|t| self.conns.get_mut(&t)) {
                conn.send(&ToAgent::Forget { seq });
            }
        }
    }

    fn node_name_fn(&self) -> impl Fn(NodeId) -> String + '_ {
        move |n| self.nodes.get(&n).map(|n| n.name.clone()).unwrap_or_else(|| "?".into())
    }

    fn infos_of(&self, r: &JobRef) -> Vec<JobInfo> {
        let Some(job) = self.jobs.get(&r.seq()) else { return Vec::new() };
        let name = self.node_name_fn();
        match *r {
            JobRef::Task(_, i) => vec![job.task_info(i, &self.config.name, &self.core, &name)],
            _ => vec![job.info(&self.config.name, &self.core, &name)],
        }
    }

    fn stat(&self, req: &StatRequest) -> ServerReply {
        let name = self.node_name_fn();
        let mut jobs = Vec::new();
        let mut unknown = Vec::new();
        let wanted: Vec<&JobRecord> = if req.jobs.is_empty() {
            let mut all: Vec<&JobRecord> = self
                .jobs
                .values()
                .filter(|j| req.include_finished || j.finished_at.is_none())
                .filter(|j| req.user.as_ref().is_none_or(|u| *u == j.user))
                .collect();
            all.sort_by_key(|j| j.seq);
            all
        } else {
            for r in &req.jobs {
                if !self.exists(r) {
                    unknown.push(*r);
                } else if let JobRef::Task(..) = r {
                    jobs.extend(self.infos_of(r));
                }
            }
            let mut seqs: Vec<u64> = req
                .jobs
                .iter()
                .filter(|r| self.exists(r) && !matches!(r, JobRef::Task(..)))
                .map(|r| r.seq())
                .collect();
            seqs.dedup();
            seqs.iter().filter_map(|s| self.jobs.get(s)).collect()
        };
        for job in wanted {
            jobs.push(job.info(&self.config.name, &self.core, &name));
            if req.expand_arrays {
                if let Some(array) = &job.spec.array {
                    for i in array.iter() {
                        jobs.push(job.task_info(i, &self.config.name, &self.core, &name));
                    }
                }
            }
        }
        ServerReply::Jobs { jobs, unknown }
    }

    fn status(&self) -> ServerStatus {
        let mut s = ServerStatus {
            name: self.config.name.clone(),
            version: picloud_proto::PROTOCOL_VERSION,
            queued: 0,
            running: 0,
            held: 0,
            finished: 0,
            nodes_up: self.nodes.values().filter(|n| n.token.is_some()).count() as u32,
            keep_finished_secs: self.config.keep_finished.as_secs(),
            state_dir: self.config.state_dir.display().to_string(),
        };
        for job in self.jobs.values() {
            if job.finished_at.is_some() {
                s.finished += 1;
                continue;
            }
            s.running += job.running;
            match self.core.phase(job.seq) {
                crate::core::Phase::Held | crate::core::Phase::WaitingDependencies => s.held += 1,
                _ => s.queued += job.total - job.ended - job.running,
            }
        }
        s
    }

    /// Periodic work: waits that completed or timed out, and forgetting old jobs.
    fn tick(&mut self) {
        let now = Instant::now();
        if self.ended_since_check || self.waiters.iter().any(|w| w.deadline.is_some_and(|d| d <= now)) {
            self.ended_since_check = false;
            let waiters = std::mem::take(&mut self.waiters);
            for w in waiters {
                let done =
                    w.refs.iter().all(|r| self.jobs.get(&r.seq()).is_none_or(|j| j.ref_ended(r, &self.core)));
                if done {
                    let jobs = w.refs.iter().flat_map(|r| self.infos_of(r)).collect();
                    self.reply(w.token, &ServerReply::Jobs { jobs, unknown: Vec::new() });
                } else if w.deadline.is_some_and(|d| d <= now) {
                    self.error(w.token, ErrorKind::Timeout, "timed out waiting for the jobs to end");
                } else {
                    self.waiters.push(w);
                }
            }
        }
        if now - self.last_purge >= Duration::from_secs(10) {
            self.last_purge = now;
            let keep = self.config.keep_finished.as_secs();
            let cutoff = unix_now().saturating_sub(keep);
            let old: Vec<u64> = self
                .jobs
                .values()
                .filter(|j| j.finished_at.is_some_and(|t| t <= cutoff))
                .map(|j| j.seq)
                .collect();
            for seq in old {
                self.jobs.remove(&seq);
                self.core.forget(seq);
            }
        }
    }

    /// Sends batched starts to agents and writes every connection's output.
    fn flush_all(&mut self) {
        for agent in self.nodes.values_mut() {
            if agent.pending_starts.is_empty() {
                continue;
            }
            let starts = std::mem::take(&mut agent.pending_starts);
            if let Some(conn) = agent.token.and_then(|t| self.conns.get_mut(&t)) {
                conn.send(&ToAgent::Start(starts));
            }
        }
        let mut dead = Vec::new();
        for (&token, conn) in self.conns.iter_mut() {
            if conn.has_output() {
                if let Err(e) = conn.flush(&self.registry, token) {
                    debug!("write to {token:?} failed: {e}");
                    dead.push(token);
                    continue;
                }
            }
            if conn.closing && !conn.has_output() {
                dead.push(token);
            }
        }
        for token in dead {
            self.close(token);
        }
    }

    fn close(&mut self, token: Token) {
        let Some(mut conn) = self.conns.remove(&token) else { return };
        conn.deregister(&self.registry);
        self.waiters.retain(|w| w.token != token);
        if let Peer::Agent(node) = conn.peer {
            if let Some(n) = self.nodes.get_mut(&node) {
                warn!(node = %n.name, "agent disconnected");
                n.token = None;
                n.running.clear();
            }
            self.apply(Event::NodeLost(node));
        }
    }

    fn shut_down(&mut self) {
        for agent in self.nodes.values() {
            if let Some(conn) = agent.token.and_then(|t| self.conns.get_mut(&t)) {
                conn.send(&ToAgent::Shutdown);
            }
        }
        for w in std::mem::take(&mut self.waiters) {
            self.error(w.token, ErrorKind::ShuttingDown, "the picloud server is shutting down");
        }
        // Best effort: give peers their last messages.
        let deadline = Instant::now() + Duration::from_secs(2);
        let registry = self.registry.try_clone().ok();
        while Instant::now() < deadline && self.conns.values().any(Conn::has_output) {
            for (&token, conn) in self.conns.iter_mut() {
                if let Some(r) = &registry {
                    let _ = conn.flush(r, token);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
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
