//! The core thread: the one owner of the scheduling [`Core`], the job table
//! and the agents' bookkeeping. It shares nothing mutable with any other
//! thread: work arrives as [`Inbound`] messages, results leave as
//! [`Outbound`] messages and as published [`Snapshot`]s.
//!
//! Each batch:
//! 1. blocks on the inbound channel until a message arrives or the next
//!    deadline (a `wait` timeout, the periodic purge) passes;
//! 2. takes that message and whatever else is queued, at most [`MAX_BATCH`],
//!    and applies each: requests are checked, core events applied, decisions
//!    carried out into the job table and into per-connection output buffers
//!    (a job's `Define` once per agent, its tasks' `Start`s gathered per agent);
//! 3. copies the queue phase of every job the batch touched (and of the jobs
//!    depending on those) from the core into the job records;
//! 4. answers the `wait`s whose jobs have all ended or whose time is up, and
//!    every `PURGE_EVERY` (ten seconds) forgets the jobs finished longer ago
//!    than `keep_finished`;
//! 5. appends each agent's gathered starts as one `Start` frame;
//! 6. publishes a new [`Snapshot`] if anything changed (an O(1) clone of the
//!    persistent maps, see `jobs.rs`);
//! 7. only then hands every connection's output to the I/O thread, one
//!    message per connection tagged with the snapshot version, and wakes it
//!    once.
//!
//! Step 7 after step 6 is what makes a reply a promise about snapshots: a
//! client told "submitted" will find its job in any query it sends next.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use picloud_proto::{
    AgentMsg, ClientRequest, Dependency, ErrorKind, JobDefinition, JobRef, JobSpec, NodeInfo, ProtoError,
    RefOutcome, ServerReply, StartTask, TaskEnd, ToAgent,
};
use serde::Serialize;
use tracing::{debug, info, warn};

use super::jobs::{JobRecord, JobTable};
use super::snapshot::{NodeMap, NodeView, ServerFacts, Snapshot, Snapshots, View};
use super::{Caller, ConnId, Inbound, Outbound, ServerConfig};
use crate::core::{Core, Decision, Event, NodeId, Phase, Request};

/// Most messages applied in one batch before its results are published and
/// sent, so that a flood of input cannot hold back every reply.
pub const MAX_BATCH: usize = 4096;

/// How often finished jobs past `keep_finished` are forgotten.
const PURGE_EVERY: Duration = Duration::from_secs(10);

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The core thread's link to one agent.
#[derive(Debug)]
struct AgentLink {
    /// Its connection, while it is up.
    conn: Option<ConnId>,
    /// Tasks started this batch, sent as one `Start` at its end.
    pending_starts: Vec<StartTask>,
}

/// A client waiting for jobs to end.
#[derive(Debug)]
struct Waiter {
    conn: ConnId,
    refs: Vec<JobRef>,
    deadline: Option<Instant>,
}

/// Frames for one connection, gathered during a batch.
#[derive(Debug, Default)]
struct OutBuf {
    bytes: Vec<u8>,
    answers: u32,
}

/// Sends [`Outbound::Stopped`] when the core thread ends, however it ends
/// (a panic included), so that the I/O thread never waits for a dead core.
/// Rather than abort on a panic, the server then stops as it does on
/// SIGTERM, and `run` returns [`ServerError::CoreFailed`](super::ServerError).
struct StoppedGuard {
    out: Sender<Outbound>,
    wake: Arc<dyn Fn() + Send + Sync>,
}

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        let _ = self.out.send(Outbound::Stopped);
        (self.wake)();
    }
}

/// The scheduling state and the loop that owns it (see the module doc).
///
/// `run` drives it on the server's core thread; benches and tests drive it
/// in-process through the same channels, playing the I/O thread themselves.
pub struct CoreLoop {
    facts: Arc<ServerFacts>,
    keep_finished: Duration,
    owner_uid: u32,
    core: Core,
    jobs: JobTable,
    next_seq: u64,
    nodes: NodeMap,
    nodes_changed: bool,
    links: HashMap<NodeId, AgentLink>,
    agent_conns: HashMap<ConnId, NodeId>,
    next_node: u32,
    /// Agents holding each job's definition.
    defined_on: HashMap<u64, Vec<NodeId>>,
    /// Jobs that may wait on a job (its dependents, by the job depended on),
    /// kept while they are held or waiting.
    dependents: HashMap<u64, Vec<u64>>,
    /// Jobs this batch changed, whose queue phase is copied at its end.
    touched: Vec<u64>,
    /// Agents with starts gathered this batch.
    starting: Vec<NodeId>,
    waiters: Vec<Waiter>,
    /// Something ended since waiters were last checked.
    ended_since_check: bool,
    started: Instant,
    last_purge: Instant,
    decisions: Vec<Decision>,
    /// The user whose request is being applied, named in cancel comments.
    acting_user: String,
    stopping: bool,
    outbox: HashMap<ConnId, OutBuf>,
    out: Sender<Outbound>,
    wake: Arc<dyn Fn() + Send + Sync>,
    snapshots: Snapshots,
    version: u64,
}

impl CoreLoop {
    /// A core loop with no jobs and no nodes. It sends what it produces to
    /// `out` and calls `wake` once after each batch that sent something (the
    /// server wakes its I/O thread's poll there).
    pub fn new(
        config: &ServerConfig,
        out: Sender<Outbound>,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        let facts = Arc::new(ServerFacts {
            name: config.name.clone(),
            state_dir: config.state_dir.display().to_string(),
            keep_finished_secs: config.keep_finished.as_secs(),
        });
        let jobs = JobTable::default();
        let nodes = NodeMap::new();
        let first = Snapshot::new(0, facts.clone(), jobs.map().clone(), nodes.clone(), jobs.counts());
        CoreLoop {
            snapshots: Snapshots::new(first),
            facts,
            keep_finished: config.keep_finished,
            owner_uid: nix::unistd::getuid().as_raw(),
            core: Core::with_config(config.core.clone()),
            jobs,
            next_seq: 1,
            nodes,
            nodes_changed: false,
            links: HashMap::new(),
            agent_conns: HashMap::new(),
            next_node: 0,
            defined_on: HashMap::new(),
            dependents: HashMap::new(),
            touched: Vec::new(),
            starting: Vec::new(),
            waiters: Vec::new(),
            ended_since_check: false,
            started: Instant::now(),
            last_purge: Instant::now(),
            decisions: Vec::new(),
            acting_user: String::new(),
            stopping: false,
            outbox: HashMap::new(),
            out,
            wake: Arc::new(wake),
            version: 0,
        }
    }

    /// Where this loop publishes its snapshots, for query threads.
    pub fn snapshots(&self) -> Snapshots {
        self.snapshots.clone()
    }

    /// Runs batches (see the module doc) until [`Inbound::Stop`], a client's
    /// `Shutdown`, or every sender of `inbox` is gone. Then tells the agents
    /// to shut down, fails pending waits, and sends [`Outbound::Stopped`].
    pub fn run(mut self, inbox: Receiver<Inbound>) {
        let _stopped = StoppedGuard { out: self.out.clone(), wake: self.wake.clone() };
        loop {
            match inbox.recv_deadline(self.next_deadline()) {
                Ok(msg) => {
                    self.handle(msg);
                    for msg in inbox.try_iter().take(MAX_BATCH - 1) {
                        self.handle(msg);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.stopping = true,
            }
            self.end_batch();
            if self.stopping {
                self.shut_down();
                return;
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let mut t = self.last_purge + PURGE_EVERY;
        for d in self.waiters.iter().filter_map(|w| w.deadline) {
            t = t.min(d);
        }
        t
    }

    /// Applies one message (step 2).
    fn handle(&mut self, msg: Inbound) {
        match msg {
            Inbound::Request { conn, caller, request } => self.on_request(conn, &caller, request),
            Inbound::AgentJoined { conn, info } => self.agent_joined(conn, info),
            Inbound::Agent { conn, msg } => {
                if let Some(&node) = self.agent_conns.get(&conn) {
                    self.on_agent(node, msg);
                }
            }
            Inbound::Closed(conn) => self.closed(conn),
            Inbound::Stop => self.stopping = true,
        }
    }

    /// Steps 3 to 7.
    fn end_batch(&mut self) {
        self.refresh_phases();
        self.tick();
        self.flush_starts();
        self.publish();
        self.send_outbox();
    }

    fn view(&self) -> View<'_> {
        View { facts: &self.facts, jobs: self.jobs.map(), nodes: &self.nodes, counts: self.jobs.counts() }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    // ---- output

    fn send<T: Serialize>(&mut self, conn: ConnId, msg: &T) {
        picloud_proto::frame::encode_into(msg, &mut self.outbox.entry(conn).or_default().bytes);
    }

    /// Sends the reply to a request of `conn`.
    fn reply(&mut self, conn: ConnId, reply: &ServerReply) {
        let buf = self.outbox.entry(conn).or_default();
        picloud_proto::frame::encode_into(reply, &mut buf.bytes);
        buf.answers += 1;
    }

    fn error(&mut self, conn: ConnId, kind: ErrorKind, message: impl Into<String>) {
        self.reply(conn, &ServerReply::Error(ProtoError::new(kind, message)));
    }

    fn send_to_node<T: Serialize>(&mut self, node: NodeId, msg: &T) {
        if let Some(conn) = self.links.get(&node).and_then(|l| l.conn) {
            self.send(conn, msg);
        }
    }

    /// Step 5.
    fn flush_starts(&mut self) {
        for node in std::mem::take(&mut self.starting) {
            let Some(link) = self.links.get_mut(&node) else { continue };
            if link.pending_starts.is_empty() {
                continue;
            }
            let starts = std::mem::take(&mut link.pending_starts);
            self.send_to_node(node, &ToAgent::Start(starts));
        }
    }

    /// Step 6.
    fn publish(&mut self) {
        let jobs_changed = self.jobs.take_changed();
        if !jobs_changed && !std::mem::take(&mut self.nodes_changed) {
            return;
        }
        self.version += 1;
        self.snapshots.store(Snapshot::new(
            self.version,
            self.facts.clone(),
            self.jobs.map().clone(),
            self.nodes.clone(),
            self.jobs.counts(),
        ));
    }

    /// Step 7.
    fn send_outbox(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        for (conn, buf) in self.outbox.drain() {
            let msg = Outbound::Send { conn, bytes: buf.bytes, answers: buf.answers, version: self.version };
            if self.out.send(msg).is_err() {
                // The I/O side is gone; there is nobody left to tell.
                self.stopping = true;
            }
        }
        (self.wake)();
    }

    // ---- requests

    fn on_request(&mut self, conn: ConnId, caller: &Caller, req: ClientRequest) {
        match req {
            ClientRequest::Submit(spec) => match self.submit(*spec, caller) {
                Ok((seq, id)) => self.reply(conn, &ServerReply::Submitted { seq, id }),
                Err(e) => self.reply(conn, &ServerReply::Error(e)),
            },
            ClientRequest::Cancel(refs) => {
                let outcomes = refs.iter().map(|r| (*r, self.cancel(*r, caller))).collect();
                self.reply(conn, &ServerReply::Cancelled(outcomes));
            }
            ClientRequest::Release(refs) => {
                let outcomes = refs.iter().map(|r| (*r, self.release(*r, caller.uid))).collect();
                self.reply(conn, &ServerReply::Released(outcomes));
            }
            ClientRequest::Wait { jobs, timeout_ms } => {
                let view = self.view();
                let unknown: Vec<String> =
                    jobs.iter().filter(|r| !view.exists(r)).map(|r| r.to_string()).collect();
                if !unknown.is_empty() {
                    return self.error(
                        conn,
                        ErrorKind::UnknownJob,
                        format!("Unknown Job Id {}", unknown.join(", ")),
                    );
                }
                let deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
                self.waiters.push(Waiter { conn, refs: jobs, deadline });
                self.ended_since_check = true;
            }
            ClientRequest::Shutdown => {
                if caller.uid != 0 && caller.uid != self.owner_uid {
                    return self.error(
                        conn,
                        ErrorKind::PermissionDenied,
                        "only the server's owner or root may stop it",
                    );
                }
                self.reply(conn, &ServerReply::Ok);
                self.stopping = true;
            }
            // Queries normally go to the query thread; answered here they
            // read the same state, as it will be published at the batch's end.
            query @ (ClientRequest::Stat(_)
            | ClientRequest::Results(_)
            | ClientRequest::Nodes
            | ClientRequest::ServerStatus) => {
                let reply = self.view().answer_as(&query, caller.uid).expect("a query");
                self.reply(conn, &reply);
            }
        }
    }

    fn submit(&mut self, spec: JobSpec, caller: &Caller) -> Result<(u64, String), ProtoError> {
        let invalid = |m: String| ProtoError::new(ErrorKind::Invalid, m);
        if spec.resources.ncpus == 0 {
            return Err(invalid("ncpus must be at least 1".into()));
        }
        match &spec.command {
            picloud_proto::JobCommand::Argv(a) if a.is_empty() => {
                return Err(invalid("no command given".into()));
            }
            picloud_proto::JobCommand::Python(call) => {
                let tasks = spec.array.as_ref().map_or(1, |a| a.len());
                if call.args.len() as u64 != tasks {
                    return Err(invalid(format!(
                        "a Python call of {tasks} task(s) needs as many argument sets, not {}",
                        call.args.len()
                    )));
                }
                if spec.array.as_ref().is_some_and(|a| a.iter().last() != Some(tasks as u32 - 1)) {
                    return Err(invalid("the tasks of a Python map are numbered 0 to n-1".into()));
                }
            }
            _ => {}
        }
        let (gpus, placement) = gpus_and_placement(&spec.resources.other).map_err(invalid)?;
        let request = Request {
            user: caller.uid,
            resources: crate::core::ResourceRequest {
                chunks: 1,
                cores: spec.resources.ncpus,
                mem: spec.resources.mem.unwrap_or(0),
                gpus,
                placement,
            },
            walltime: spec.resources.walltime.map(|s| s * 1000),
            priority: spec.priority,
            array: spec.array.clone(),
            depend: spec.depend.iter().map(|d: &Dependency| (d.kind, d.on)).collect(),
            hold: spec.hold,
        };
        self.core.check_fits(&request).map_err(invalid)?;
        let view = self.view();
        if let Some(d) = spec.depend.iter().find(|d| !view.exists(&d.on)) {
            return Err(ProtoError::new(
                ErrorKind::UnknownJob,
                format!("dependency on Unknown Job Id {}.{}", d.on, self.facts.name),
            ));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        for d in &spec.depend {
            let deps = self.dependents.entry(d.on.seq()).or_default();
            if !deps.contains(&seq) {
                deps.push(seq);
            }
        }
        let record = JobRecord::new(seq, spec, caller.user.clone(), caller.uid, caller.gid, unix_now());
        let id = record.id(&self.facts.name);
        debug!(%id, user = %caller.user, "submitted");
        self.jobs.insert(record);
        self.touched.push(seq);
        self.apply(Event::Submit { seq, request });
        // At once, for queries the core thread answers later in this batch.
        self.refresh_phase(seq);
        Ok((seq, id))
    }

    fn may_control(&self, job: &JobRecord, uid: u32) -> bool {
        uid == 0 || uid == job.uid || uid == self.owner_uid
    }

    fn cancel(&mut self, r: JobRef, caller: &Caller) -> RefOutcome {
        if !self.view().exists(&r) {
            return RefOutcome::Unknown;
        }
        let job = self.jobs.get(r.seq()).expect("exists");
        if !self.may_control(job, caller.uid) {
            return RefOutcome::PermissionDenied;
        }
        if job.ref_ended(&r) {
            return RefOutcome::AlreadyFinished;
        }
        self.acting_user = caller.user.to_string();
        self.apply(Event::Cancel(r));
        RefOutcome::Done
    }

    fn release(&mut self, r: JobRef, uid: u32) -> RefOutcome {
        if !self.view().exists(&r) {
            return RefOutcome::Unknown;
        }
        let job = self.jobs.get(r.seq()).expect("exists");
        if !self.may_control(job, uid) {
            return RefOutcome::PermissionDenied;
        }
        if job.finished_at.is_some() {
            return RefOutcome::AlreadyFinished;
        }
        if self.core.phase(r.seq()) != Phase::Held {
            return RefOutcome::NotApplicable;
        }
        self.touched.push(r.seq());
        self.apply(Event::Release(r));
        RefOutcome::Done
    }

    // ---- agents

    fn node_mut(&mut self, node: NodeId) -> Option<&mut NodeView> {
        self.nodes_changed = true;
        self.nodes.get_mut(&node).map(Arc::make_mut)
    }

    fn agent_joined(&mut self, conn: ConnId, info: NodeInfo) {
        let node = NodeId(self.next_node);
        self.next_node += 1;
        info!(node = %info.hostname, cores = info.cores.len(), "agent joined");
        let shape = crate::core::NodeShape::from_info(&info);
        let view = NodeView {
            name: info.hostname.clone(),
            info: Arc::new(info),
            up: true,
            running: imbl::OrdSet::new(),
        };
        self.nodes.insert(node, Arc::new(view));
        self.nodes_changed = true;
        self.links.insert(node, AgentLink { conn: Some(conn), pending_starts: Vec::new() });
        self.agent_conns.insert(conn, node);
        self.apply(Event::NodeJoined { node, shape });
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
        if self.nodes.get(&node).is_some_and(|n| n.running.contains(&end.task)) {
            if let Some(n) = self.node_mut(node) {
                n.running.remove(&end.task);
            }
        }
        let task = end.task;
        if !self.jobs.get(task.seq).is_some_and(|j| j.is_running(task.index)) {
            return;
        }
        let now = unix_now();
        let Some(Some(success)) = self.jobs.update(task.seq, |j| j.finish(end, now)) else { return };
        self.ended_since_check = true;
        self.touched.push(task.seq);
        self.forget_if_done(task.seq);
        self.apply(Event::TaskFinished { task, success });
    }

    fn closed(&mut self, conn: ConnId) {
        self.waiters.retain(|w| w.conn != conn);
        self.outbox.remove(&conn);
        let Some(node) = self.agent_conns.remove(&conn) else { return };
        if let Some(link) = self.links.get_mut(&node) {
            link.conn = None;
            link.pending_starts.clear();
        }
        if let Some(n) = self.node_mut(node) {
            warn!(node = %n.name, "agent disconnected");
            n.up = false;
            n.running = imbl::OrdSet::new();
        }
        self.apply(Event::NodeLost(node));
    }

    // ---- the core and its decisions

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
        match d {
            Decision::Start { task, allocation } => {
                // Jobs are single-node (qsub refuses more chunks).
                let Some(first) = allocation.nodes.first() else { return };
                let (node, cpus, gpus) = (first.node, first.pus.clone(), first.gpus.clone());
                let Some(conn) = self.links.get(&node).and_then(|l| l.conn) else { return };
                let Some(job) = self.jobs.get(task.seq) else { return };
                let defined = self.defined_on.entry(task.seq).or_default();
                if !defined.contains(&node) {
                    defined.push(node);
                    let def = JobDefinition {
                        seq: job.seq,
                        spec: (*job.spec).clone(),
                        user: job.user.to_string(),
                        uid: job.uid,
                        gid: job.gid,
                    };
                    // Earlier starts first, so that the agent sees them in order.
                    let link = self.links.get_mut(&node).expect("has a connection");
                    if !link.pending_starts.is_empty() {
                        let starts = std::mem::take(&mut link.pending_starts);
                        self.send(conn, &ToAgent::Start(starts));
                    }
                    self.send(conn, &ToAgent::Define(Box::new(def)));
                }
                let job = self.jobs.get(task.seq).expect("checked above");
                let (stdout_path, stderr_path) = job.output_paths(task.index);
                let job_id = task.display_with(&self.facts.name);
                let now = unix_now();
                self.jobs.update(task.seq, |j| j.start(task.index, node, cpus.clone(), now));
                self.touched.push(task.seq);
                if let Some(n) = self.node_mut(node) {
                    n.running.insert(task);
                }
                let link = self.links.get_mut(&node).expect("has a connection");
                if link.pending_starts.is_empty() {
                    self.starting.push(node);
                }
                link.pending_starts.push(StartTask { task, job_id, cpus, gpus, stdout_path, stderr_path });
            }
            Decision::Kill { task, nodes } => {
                let by = self.acting_user.clone();
                if self.jobs.get(task.seq).is_some_and(|j| j.tasks.contains_key(&task.index)) {
                    self.jobs.update(task.seq, |j| j.mark_cancelled(task.index, &by));
                }
                for node in nodes {
                    self.send_to_node(node, &ToAgent::Kill { task, reason: format!("Job deleted by {by}") });
                }
            }
            Decision::End { seq, index, reason } => {
                let node_name = self
                    .jobs
                    .get(seq)
                    .and_then(|j| j.tasks.get(&index))
                    .and_then(|t| t.node)
                    .and_then(|n| self.nodes.get(&n))
                    .map(|n| n.name.clone())
                    .unwrap_or_default();
                let by = self.acting_user.clone();
                let now = unix_now();
                if self.jobs.update(seq, |j| j.end(index, &reason, &by, &node_name, now)).is_some() {
                    self.ended_since_check = true;
                    self.touched.push(seq);
                    self.forget_if_done(seq);
                }
            }
        }
    }

    /// Once a job has ended, its agents may drop its definition.
    fn forget_if_done(&mut self, seq: u64) {
        if self.jobs.get(seq).is_none_or(|j| j.finished_at.is_none()) {
            return;
        }
        for node in self.defined_on.remove(&seq).unwrap_or_default() {
            self.send_to_node(node, &ToAgent::Forget { seq });
        }
    }

    // ---- end of a batch

    /// Step 3: copies the core's phase of touched jobs and their dependents.
    fn refresh_phases(&mut self) {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        for &seq in &touched {
            self.refresh_phase(seq);
            let Some(mut deps) = self.dependents.remove(&seq) else { continue };
            deps.retain(|&d| matches!(self.refresh_phase(d), Phase::Held | Phase::WaitingDependencies));
            if !deps.is_empty() {
                self.dependents.insert(seq, deps);
            }
        }
        touched.clear();
        self.touched = touched;
    }

    fn refresh_phase(&mut self, seq: u64) -> Phase {
        let phase = self.core.phase(seq);
        if self.jobs.get(seq).is_some_and(|j| j.phase != phase) {
            self.jobs.update(seq, |j| j.phase = phase);
        }
        phase
    }

    /// Step 4: waits that completed or timed out, and forgetting old jobs.
    fn tick(&mut self) {
        let now = Instant::now();
        if self.ended_since_check || self.waiters.iter().any(|w| w.deadline.is_some_and(|d| d <= now)) {
            self.ended_since_check = false;
            for w in std::mem::take(&mut self.waiters) {
                let done = w.refs.iter().all(|r| self.jobs.get(r.seq()).is_none_or(|j| j.ref_ended(r)));
                if done {
                    let view = self.view();
                    let jobs = w.refs.iter().flat_map(|r| view.infos_of(r)).collect();
                    self.reply(w.conn, &ServerReply::Jobs { jobs, unknown: Vec::new() });
                } else if w.deadline.is_some_and(|d| d <= now) {
                    self.error(w.conn, ErrorKind::Timeout, "timed out waiting for the jobs to end");
                } else {
                    self.waiters.push(w);
                }
            }
        }
        if now - self.last_purge >= PURGE_EVERY {
            self.last_purge = now;
            let cutoff = unix_now().saturating_sub(self.keep_finished.as_secs());
            let (purged, python) = self.jobs.purge(cutoff);
            for &seq in &purged {
                self.core.forget(seq);
                self.dependents.remove(&seq);
                self.defined_on.remove(&seq);
            }
            if !python.is_empty() {
                // Agents may hold results of these jobs (shared memory).
                let agents: Vec<NodeId> =
                    self.links.iter().filter(|(_, l)| l.conn.is_some()).map(|(&n, _)| n).collect();
                for node in agents {
                    self.send_to_node(node, &ToAgent::Purged(python.clone()));
                }
            }
        }
    }

    fn shut_down(&mut self) {
        let agents: Vec<NodeId> =
            self.links.iter().filter(|(_, l)| l.conn.is_some()).map(|(&n, _)| n).collect();
        for node in agents {
            self.send_to_node(node, &ToAgent::Shutdown);
        }
        for w in std::mem::take(&mut self.waiters) {
            self.error(w.conn, ErrorKind::ShuttingDown, "the picloud server is shutting down");
        }
        self.send_outbox();
    }
}

/// A [`CoreLoop`] running on a thread of its own, driven in-process through
/// its channels, for benches and tests that play the I/O thread (and agents)
/// themselves. Dropping it stops the thread and waits for it.
pub struct CoreThread {
    /// Messages to the core thread.
    pub to_core: Sender<Inbound>,
    /// Messages from the core thread; `wake` is a no-op, so receive blocking.
    pub from_core: Receiver<Outbound>,
    snapshots: Snapshots,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CoreThread {
    /// Starts a core thread with no jobs and no nodes.
    pub fn spawn(config: &ServerConfig) -> Self {
        let (to_core, inbox) = crossbeam_channel::unbounded();
        let (out, from_core) = crossbeam_channel::unbounded();
        let core = CoreLoop::new(config, out, || {});
        let snapshots = core.snapshots();
        let thread = std::thread::Builder::new()
            .name("core".into())
            .spawn(move || core.run(inbox))
            .expect("spawning the core thread");
        CoreThread { to_core, from_core, snapshots, thread: Some(thread) }
    }

    /// Where the core thread publishes its snapshots.
    pub fn snapshots(&self) -> &Snapshots {
        &self.snapshots
    }
}

impl Drop for CoreThread {
    fn drop(&mut self) {
        let _ = self.to_core.send(Inbound::Stop);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() && !std::thread::panicking() {
                panic!("the core thread panicked");
            }
        }
    }
}

/// The GPUs (`-l ngpus=N`) and placement (`-l place=...`) a job asks for.
///
/// `place` takes PBS's words, read for a single node: `pack` (the default)
/// and `free` mean compact placement, `scatter` spreads the job's cores over
/// the node's NUMA nodes, and `excl` or `exclhost` (alone or after a colon,
/// as in `scatter:excl`) gives the job a whole node.
fn gpus_and_placement(other: &[(String, String)]) -> Result<(u32, crate::core::Placement), String> {
    use crate::core::Placement;
    let value =
        |name: &str| other.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    let gpus = match value("ngpus") {
        None => 0,
        Some(v) => v.trim().parse().map_err(|_| format!("ngpus={v}: expected a number of GPUs"))?,
    };
    let mut placement = Placement::Compact;
    if let Some(v) = value("place") {
        for word in v.split(':') {
            match word.trim().to_ascii_lowercase().as_str() {
                "pack" | "free" | "shared" => {}
                "scatter" | "vscatter" => {
                    if placement != Placement::Exclusive {
                        placement = Placement::Scatter;
                    }
                }
                "excl" | "exclhost" => placement = Placement::Exclusive,
                other => {
                    return Err(format!(
                        "place={v}: unknown placement '{other}' (expected pack, scatter or excl)"
                    ));
                }
            }
        }
    }
    Ok((gpus, placement))
}

#[cfg(test)]
mod tests;
