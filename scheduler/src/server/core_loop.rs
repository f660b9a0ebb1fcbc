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
//! 5. appends each agent's gathered starts as one `Start` frame, and hands
//!    agents their output at once unless it must wait for the sync (below);
//! 6. writes the batch's changes to the journal with one `pwrite`
//!    (`journal.rs`);
//! 7. builds a new [`Snapshot`] if anything changed (an O(1) clone of the
//!    persistent maps, see `jobs.rs`), and gathers every connection's output
//!    into one message per connection, tagged with the snapshot's version;
//! 8. hands both to the journal's syncer thread, which syncs the journal
//!    once for every batch written since its last sync (group commit), then
//!    publishes the snapshot, sends the messages to the I/O thread and wakes
//!    it, batch after batch in order (without a journal, or with
//!    `--fsync never`, this happens at once);
//! 9. starts a snapshot of the state on a thread of its own when the
//!    journal's segment is due for one (`run`).
//!
//! Publishing before sending is what makes a reply a promise about
//! snapshots: a client told "submitted" will find its job in any query it
//! sends next. Syncing before both makes it a promise about crashes: what a
//! reply or a query tells is on disk first, so a server killed at any moment
//! restarts (`restore.rs`) with every job it acknowledged. The core thread
//! does not wait for the sync: it goes on with the next batch.
//!
//! Agents are not told anything a client could learn from, so their
//! output need not wait for the sync: tasks start while it runs, and an
//! array's throughput does not pay a sync per task. Two exceptions: a job
//! whose submission is not synced yet must not run before it could survive
//! a crash, so an agent's output that starts (or defines) such a job waits
//! for the sync, as does the rest of that agent's output until it has left
//! (an agent hears everything in order). Which jobs those are is kept per
//! job, by the batch that submitted it: a job under a reserved sequence
//! number (`Reserve`, `SubmitReserved`) may come after jobs of higher
//! numbers, so numbers say nothing of what is synced. After a crash, a
//! task started without a durable `Started` is simply queued again
//! (`restore.rs`).
//!
//! Every change of the job table goes through [`CoreLoop::record`], which
//! appends it to the journal's open batch and applies it (`durable.rs`).
//! Before a request that changes state is applied, room for what it will
//! write is reserved in the journal: on a full disk the request is refused
//! with an error and nothing is changed. A failed journal write stops the
//! server without sending anything of its batch (the next start cuts the
//! partial batch).

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use picloud_proto::{
    AgentMsg, ClientRequest, Dependency, ErrorKind, JobDefinition, JobRef, JobSpec, MAX_RESERVED, ProtoError,
    RefOutcome, ServerReply, StartTask, TaskEnd, TaskRunning, ToAgent, WaitReply, WaitUntil,
};
use serde::Serialize;
use tracing::{debug, info, warn};

use super::durable::{self, Change};
use super::jobs::{JobRecord, JobTable};
use super::journal::{self, Journal, JournalError, SyncTicket, Syncer};
use super::snapshot::{NodeMap, NodeView, ServerFacts, Snapshot, Snapshots, View, results_refused};
use super::{Caller, ConnId, Inbound, Outbound, ServerConfig};
use crate::core::{Core, Decision, Event, NodeId, NodeShape, Phase, Request};

mod nodes;
mod reservations;
mod restore;

pub(crate) use reservations::Reservation;
use reservations::{Claim, Reservations};

/// The number of a batch whose output the syncer released.
type Released = u64;

/// A change as the core thread records it: task ends are borrowed.
type LiveChange<'a> = Change<&'a TaskEnd>;

/// Journal space a request may use beyond its own record (the starts and
/// ends it causes), reserved before it is accepted.
const REQUEST_SLACK: u64 = 64 << 10;

/// Most messages applied in one batch before its results are published and
/// sent, so that a flood of input cannot hold back every reply.
pub const MAX_BATCH: usize = 4096;

/// How often finished jobs past `keep_finished` are forgotten.
const PURGE_EVERY: Duration = Duration::from_secs(10);

/// How often fair-share usage is recorded while tasks run: a crash loses at
/// most this much of it.
const USAGE_EVERY: Duration = Duration::from_secs(60);

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn unix_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The core thread's link to one agent.
#[derive(Debug)]
struct AgentLink {
    /// Its connection, while it is up.
    conn: Option<ConnId>,
    /// Tasks started this batch, sent as one `Start` at its end.
    pending_starts: Vec<StartTask>,
    /// When the agent was last heard from (any message).
    last_heard: Instant,
    /// The node's shape while its agent has not yet reported what it runs
    /// (`AgentMsg::Running`): the core knows the node only after that.
    joining: Option<NodeShape>,
    /// Set when the connection of a joined agent closed: its tasks are kept
    /// while it may come back, until `last_heard` + the node timeout.
    away: bool,
}

/// Most bytes of outcomes a wait's reply carries; larger ones are replaced
/// by the jobs' states (see [`WaitReply::Results`]).
const RESULTS_IN_A_WAIT: usize = picloud_proto::MAX_FRAME_LEN - (1 << 20);

/// A client waiting for jobs to end.
#[derive(Debug)]
struct Waiter {
    conn: ConnId,
    refs: Vec<JobRef>,
    deadline: Option<Instant>,
    until: WaitUntil,
    reply: WaitReply,
    /// The waiting user, to whom results are given.
    uid: u32,
    /// For a wait for all: `refs[..ended]` are known to have ended (a job
    /// that has ended stays ended), so each check starts at the first that
    /// had not, rather than looking at every job of a long list again.
    ended: usize,
}

/// Frames for one connection, gathered during a batch.
#[derive(Debug, Default)]
struct OutBuf {
    bytes: Vec<u8>,
    answers: u32,
    /// Close the connection once they are written.
    close: bool,
}

/// Sends [`Outbound::Stopped`] when the core thread ends, however it ends
/// (a panic included), so that the I/O thread never waits for a dead core.
/// Rather than abort on a panic, the server then stops as it does on
/// SIGTERM, and `run` returns [`ServerError::CoreFailed`](super::ServerError).
pub(crate) struct StoppedGuard {
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
    /// When fair-share usage was last recorded.
    last_usage: Instant,
    /// A task started since then, or ran when it was recorded: usage grew.
    usage_grew: bool,
    decisions: Vec<Decision>,
    /// The user whose request is being applied, named in cancel comments.
    acting_user: String,
    stopping: bool,
    outbox: HashMap<ConnId, OutBuf>,
    out: Sender<Outbound>,
    wake: Arc<dyn Fn() + Send + Sync>,
    snapshots: Snapshots,
    version: u64,
    /// The journal, when the server keeps one.
    journal: Option<Journal>,
    /// The last snapshot written, by number.
    last_snapshot: Option<u64>,
    /// A snapshot being written: its number and thread.
    snapshotting: Option<(u64, std::thread::JoinHandle<Result<u64, JournalError>>)>,
    /// The journal had no room when last asked.
    journal_full: bool,
    /// Why the core thread stopped, if the journal failed.
    failed: Option<JournalError>,
    /// Node numbers by host name: an agent of a known host gets its number
    /// back.
    names: HashMap<String, NodeId>,
    /// After a restart, until when agents may confirm the tasks that the
    /// journal shows running (`nodes.rs`).
    grace_until: Option<Instant>,
    /// The thread that syncs the journal and then releases each batch's
    /// output (with `--fsync always`).
    syncer: Option<Syncer>,
    /// Batches ended so far.
    batch_no: u64,
    /// Released batches, from the syncer.
    synced: (Sender<Released>, Receiver<Released>),
    /// Jobs submitted (with a journal) whose batch is not released yet, as
    /// (that batch's number, sequence number), in submission order; with
    /// reserved numbers that need not be sequence order.
    unsynced: VecDeque<(u64, u64)>,
    /// The sequence numbers of `unsynced`: a job's tasks may start only
    /// once its submission is on disk (see the module doc).
    unsynced_seqs: HashSet<u64>,
    /// Sequence numbers reserved for clients, of open connections and of
    /// closed ones (`reservations.rs`).
    reservations: Reservations,
    /// Agents with output waiting for a sync, and the last batch it is in.
    pending_agents: HashMap<ConnId, u64>,
    /// Agents' connections whose output this batch must wait for the sync.
    hold_for_commit: Vec<ConnId>,
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
            last_usage: Instant::now(),
            usage_grew: false,
            decisions: Vec::new(),
            acting_user: String::new(),
            stopping: false,
            outbox: HashMap::new(),
            out,
            wake: Arc::new(wake),
            version: 0,
            journal: None,
            last_snapshot: None,
            snapshotting: None,
            journal_full: false,
            failed: None,
            names: HashMap::new(),
            grace_until: None,
            syncer: None,
            batch_no: 0,
            synced: crossbeam_channel::unbounded(),
            unsynced: VecDeque::new(),
            unsynced_seqs: HashSet::new(),
            reservations: Reservations::default(),
            pending_agents: HashMap::new(),
            hold_for_commit: Vec::new(),
        }
    }

    /// A core loop that keeps its state in the journal of
    /// `config.state_dir` (unless `config.journal` disables it): reads the
    /// last snapshot and the journal after it, rebuilds the jobs and the
    /// queue (`restore.rs`), and records what the restart itself changed.
    /// Refuses (changing nothing) a damaged or newer journal.
    pub fn open(
        config: &ServerConfig,
        out: Sender<Outbound>,
        wake: impl Fn() + Send + Sync + 'static,
    ) -> Result<Self, JournalError> {
        let mut core_loop = CoreLoop::new(config, out, wake);
        if !config.journal.enabled {
            return Ok(core_loop);
        }
        let t0 = Instant::now();
        let (recovered, journal) = journal::open(&config.state_dir, &config.journal)?;
        let replayed = durable::replay(&recovered)?;
        // Changes of this version must not go into a segment whose header
        // says an older one: an older picloud would fail on them instead
        // of refusing the directory.
        let older = recovered.last_segment_version().is_some_and(|v| v < journal::FORMAT_VERSION);
        core_loop.last_snapshot = recovered.snapshot_number;
        if let Some((path, offset, bytes)) = &recovered.cut {
            warn!(file = %path.display(), offset, bytes, "cut a torn batch at the end of the journal");
        }
        drop(recovered);
        if config.journal.fsync == journal::FsyncMode::Always {
            let syncer = Syncer::spawn().map_err(|source| JournalError::Io {
                what: "start the journal's sync thread for",
                path: journal.path().to_path_buf(),
                source,
            })?;
            core_loop.syncer = Some(syncer);
        }
        core_loop.journal = Some(journal);
        let (jobs, changes) = (replayed.jobs.map().len(), replayed.changes);
        core_loop.restore(replayed);
        core_loop.end_batch();
        core_loop.sync_barrier();
        if older {
            info!("the journal was written by an older picloud: starting a new segment with a snapshot");
            core_loop.snapshot(false);
        }
        if let Some(e) = core_loop.failed.take() {
            return Err(e);
        }
        info!(jobs, changes, elapsed_ms = t0.elapsed().as_millis() as u64, "state restored from the journal");
        Ok(core_loop)
    }

    /// Where this loop publishes its snapshots, for query threads.
    pub fn snapshots(&self) -> Snapshots {
        self.snapshots.clone()
    }

    /// Runs batches (see the module doc) until [`Inbound::Stop`], a client's
    /// `Shutdown`, or every sender of `inbox` is gone. Then tells the agents
    /// to shut down, fails pending waits, writes a snapshot, and sends
    /// [`Outbound::Stopped`]. Fails if the journal could not be written
    /// (the server then stops at once).
    pub fn run(mut self, inbox: Receiver<Inbound>) -> Result<(), JournalError> {
        let _stopped = self.stopped_guard();
        loop {
            match inbox.recv_deadline(self.next_deadline()) {
                Ok(msg) => self.take_batch(msg, &inbox),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.stopping = true,
            }
            if let Some(result) = self.finish_batch() {
                return result;
            }
        }
    }

    /// One batch, run by the I/O thread itself (`ServerThreads::Inline`):
    /// the messages `inbox` holds, if it holds any or a deadline has passed
    /// (else nothing). Returns the core's end once it has stopped; the
    /// caller then drops the [`CoreLoop::stopped_guard`] it holds.
    pub(crate) fn run_inline(&mut self, inbox: &Receiver<Inbound>) -> Option<Result<(), JournalError>> {
        match inbox.try_recv() {
            Ok(msg) => self.take_batch(msg, inbox),
            Err(TryRecvError::Empty) if Instant::now() < self.next_deadline() => return None,
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => self.stopping = true,
        }
        self.finish_batch()
    }

    /// Sends [`Outbound::Stopped`] when dropped.
    pub(crate) fn stopped_guard(&self) -> StoppedGuard {
        StoppedGuard { out: self.out.clone(), wake: self.wake.clone() }
    }

    /// Steps 1 and 2: `first` and what else is queued, up to [`MAX_BATCH`].
    fn take_batch(&mut self, first: Inbound, inbox: &Receiver<Inbound>) {
        self.handle(first);
        for msg in inbox.try_iter().take(MAX_BATCH - 1) {
            self.handle(msg);
        }
    }

    /// Steps 3 to 9, and the stop once asked for: returns the core's end
    /// then.
    fn finish_batch(&mut self) -> Option<Result<(), JournalError>> {
        self.end_batch();
        self.snapshot_if_due();
        if !self.stopping {
            return None;
        }
        self.shut_down();
        Some(match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        })
    }

    /// When the next wait times out or the next periodic work is due.
    pub(crate) fn next_deadline(&self) -> Instant {
        let mut t = (self.last_purge + PURGE_EVERY).min(self.last_usage + USAGE_EVERY);
        for d in self.waiters.iter().filter_map(|w| w.deadline) {
            t = t.min(d);
        }
        if let Some(d) = self.next_node_deadline() {
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

    /// Steps 3 to 8.
    fn end_batch(&mut self) {
        self.take_synced();
        self.check_nodes();
        self.refresh_phases();
        self.tick();
        self.flush_starts();
        self.send_to_agents_early();
        let Some(ticket) = self.commit() else { return };
        let snapshot = self.publishable();
        self.release_batch(snapshot, ticket);
    }

    /// Notes the batches the syncer has released.
    fn take_synced(&mut self) {
        for batch in self.synced.1.try_iter() {
            self.pending_agents.retain(|_, b| *b > batch);
            while let Some(&(b, seq)) = self.unsynced.front() {
                if b > batch {
                    break;
                }
                self.unsynced.pop_front();
                self.unsynced_seqs.remove(&seq);
            }
        }
    }

    /// Waits until every batch handed to the syncer is synced and released
    /// (before a new segment, at a stop; tests, to see a batch's output).
    pub(crate) fn sync_barrier(&mut self) {
        if let Some(s) = &self.syncer {
            if let Err(e) = s.barrier() {
                self.fail(e);
            }
        }
        self.take_synced();
    }

    /// Steps 7 and 8: publishes the batch's snapshot and sends its output,
    /// once its changes are synced (by the syncer, in batch order, or here
    /// when nothing needs a sync and no syncer runs).
    fn release_batch(&mut self, snapshot: Option<Snapshot>, ticket: Option<SyncTicket>) {
        self.batch_no += 1;
        let batch = self.batch_no;
        let version = self.version;
        let mut msgs = Vec::with_capacity(self.outbox.len());
        for (conn, buf) in self.outbox.drain() {
            if self.agent_conns.contains_key(&conn) {
                self.pending_agents.insert(conn, batch);
            }
            msgs.push(Outbound::Send {
                conn,
                bytes: buf.bytes,
                answers: buf.answers,
                version,
                close: buf.close,
            });
        }
        let (snapshots, out, wake) = (self.snapshots.clone(), self.out.clone(), self.wake.clone());
        let synced = self.synced.0.clone();
        let release = move || {
            if let Some(snap) = snapshot {
                snapshots.store(snap);
            }
            if !msgs.is_empty() {
                for m in msgs {
                    // A closed I/O side stops the core thread through its inbox.
                    let _ = out.send(m);
                }
                wake();
            }
            let _ = synced.send(batch);
        };
        match (&self.syncer, ticket) {
            (Some(s), ticket) => s.after_sync(ticket, Box::new(release)),
            (None, Some(ticket)) => match ticket.sync() {
                Ok(()) => release(),
                Err(e) => self.fail(e),
            },
            (None, None) => release(),
        }
    }

    /// Step 5, the end: hands agents their output before the sync, unless
    /// it must wait for it (see the module doc).
    fn send_to_agents_early(&mut self) {
        let hold = std::mem::take(&mut self.hold_for_commit);
        if self.journal.is_none() {
            return;
        }
        // Output of an agent with output still waiting for a sync waits
        // too, so that an agent hears everything in order.
        let early: Vec<ConnId> = self
            .outbox
            .keys()
            .filter(|c| {
                self.agent_conns.contains_key(c) && !hold.contains(c) && !self.pending_agents.contains_key(c)
            })
            .copied()
            .collect();
        for conn in &early {
            let buf = self.outbox.remove(conn).expect("listed");
            debug_assert_eq!(buf.answers, 0, "agents get no replies");
            // Version 0: agents read no snapshots, and a version not yet
            // published must not raise the I/O thread's floor.
            let msg =
                Outbound::Send { conn: *conn, bytes: buf.bytes, answers: 0, version: 0, close: buf.close };
            if self.out.send(msg).is_err() {
                self.stopping = true;
            }
        }
        if !early.is_empty() {
            (self.wake)();
        }
    }

    // ---- the journal

    /// Records a change of the job table: appends it to the journal's open
    /// batch and carries it out.
    fn record<E: Borrow<TaskEnd> + Serialize>(&mut self, change: Change<E>) -> durable::Applied {
        self.journal_only(&change);
        durable::apply(&mut self.jobs, &change)
    }

    /// Appends a change already carried out to the journal's open batch.
    fn journal_only<E: Borrow<TaskEnd> + Serialize>(&mut self, change: &Change<E>) {
        if let Some(j) = &mut self.journal {
            j.append(|buf| durable::encode(change, buf));
        }
    }

    /// Reserves journal room for `bytes` more; the error says why a request
    /// that needs it is refused.
    fn room(&mut self, bytes: u64) -> Result<(), ProtoError> {
        let Some(j) = &mut self.journal else { return Ok(()) };
        match j.reserve(bytes) {
            Ok(()) => {
                if std::mem::take(&mut self.journal_full) {
                    info!(file = %j.path().display(), "the journal has room again");
                }
                Ok(())
            }
            Err(e) => {
                if !self.journal_full {
                    tracing::error!(file = %j.path().display(), "no room in the journal ({e}): refusing changes");
                }
                self.journal_full = true;
                Err(ProtoError::new(
                    ErrorKind::Invalid,
                    format!(
                        "the server cannot record this request: no room for its journal {} ({e}). Nothing was \
                         changed; an administrator must free space on that file system",
                        j.path().display()
                    ),
                ))
            }
        }
    }

    /// Step 6: writes the batch's changes; the sync is the syncer's (see
    /// `release`). `None` on failure (of this write or an earlier sync):
    /// nothing of the batch may leave, and the loop stops.
    fn commit(&mut self) -> Option<Option<SyncTicket>> {
        if let Some(e) = self.syncer.as_ref().and_then(Syncer::failure) {
            self.fail(e);
            return None;
        }
        let Some(j) = &mut self.journal else { return Some(None) };
        match j.commit() {
            Ok(ticket) => Some(ticket),
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    /// The journal failed: drops the batch's output and stops.
    fn fail(&mut self, e: JournalError) {
        tracing::error!("{e}; stopping the server (the journal holds every change acknowledged so far)");
        self.outbox.clear();
        if self.failed.is_none() {
            self.failed = Some(e);
        }
        self.stopping = true;
    }

    /// The state a snapshot saves, borrowing the job map.
    fn saved_nodes(&self) -> Vec<(NodeId, String)> {
        self.nodes.iter().map(|(&n, v)| (n, v.name.clone())).collect()
    }

    /// Step 9: reaps a finished snapshot thread, and starts one when the
    /// journal's segment is due for a snapshot.
    fn snapshot_if_due(&mut self) {
        if self.snapshotting.as_ref().is_some_and(|(_, t)| t.is_finished()) {
            self.reap_snapshot();
        }
        // Never after a failed write: the state is ahead of the disk.
        let due = self.failed.is_none() && self.journal.as_ref().is_some_and(|j| j.snapshot_due());
        if due && self.snapshotting.is_none() {
            self.snapshot(true);
        }
    }

    /// Waits for the snapshot thread, if any, and notes its outcome.
    fn reap_snapshot(&mut self) {
        let Some((n, thread)) = self.snapshotting.take() else { return };
        match thread.join() {
            Ok(Ok(bytes)) => {
                debug!(snapshot = n, bytes, "snapshot written");
                self.last_snapshot = Some(n);
            }
            Ok(Err(e)) => warn!("snapshot {n} failed, the journal keeps growing until one succeeds: {e}"),
            Err(_) => warn!("the snapshot thread panicked"),
        }
    }

    /// Starts a new journal segment and writes the state as of its start
    /// as a snapshot, on a thread of its own or (`background` false) here.
    /// Then removes what the snapshot before it made unnecessary: a
    /// snapshot and the segments after it stay as a fallback.
    fn snapshot(&mut self, background: bool) {
        // Only the last segment may end unsynced.
        self.sync_barrier();
        if self.failed.is_some() {
            return;
        }
        let Some(j) = &mut self.journal else { return };
        let n = match j.rotate() {
            Ok(n) => n,
            Err(e) => {
                warn!("cannot start a new journal segment, the current one keeps growing: {e}");
                return;
            }
        };
        // The reservations still alive go into the new segment, which the
        // snapshot does not hold, and reach the disk before it is written.
        let mut reserved = false;
        for r in self.reservations.all() {
            let &Reservation { first, next, end, uid } = r;
            j.append(|buf| durable::encode(&LiveChange::ReservedFor { first, next, end, uid }, buf));
            reserved = true;
        }
        // So does the fair-share usage.
        let users = self.core.usages(self.started.elapsed().as_millis() as u64);
        if !users.is_empty() {
            let usage = LiveChange::Usage { time_ms: unix_now_ms(), users };
            j.append(|buf| durable::encode(&usage, buf));
            reserved = true;
        }
        if reserved {
            if let Err(e) = j.commit().and_then(|t| t.map_or(Ok(()), |t| t.sync())) {
                self.fail(e);
                return;
            }
        }
        let Some(j) = &mut self.journal else { return };
        let dir = j.dir().to_path_buf();
        let fsync = j.config().fsync;
        let keep_from = self.last_snapshot.unwrap_or(1);
        let (next_seq, next_node, nodes) = (self.next_seq, self.next_node, self.saved_nodes());
        let jobs = self.jobs.map().clone();
        let write = move || {
            let reruns = durable::reruns_of(&jobs);
            let state = durable::SavedStateRef { next_seq, next_node, nodes, jobs: &jobs, reruns };
            let bytes = journal::write_snapshot(&dir, n, fsync, |w| bincode::serialize_into(w, &state))?;
            journal::prune(&dir, keep_from)?;
            Ok(bytes)
        };
        if background {
            match std::thread::Builder::new().name("snapshot".into()).spawn(write) {
                Ok(t) => self.snapshotting = Some((n, t)),
                Err(e) => warn!("cannot start the snapshot thread: {e}"),
            }
        } else {
            match write() {
                Ok(bytes) => {
                    debug!(snapshot = n, bytes, "snapshot written");
                    self.last_snapshot = Some(n);
                }
                Err(e) => warn!("snapshot {n} failed: {e}"),
            }
        }
    }

    fn view(&self) -> View<'_> {
        View { facts: &self.facts, jobs: self.jobs.map(), nodes: &self.nodes, counts: self.jobs.counts() }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Records every user's fair-share usage as of now (`Change::Usage`).
    fn record_usage(&mut self) {
        let users = self.core.usages(self.now_ms());
        if !users.is_empty() {
            self.journal_only(&LiveChange::Usage { time_ms: unix_now_ms(), users });
        }
    }

    // ---- output

    /// Closes an agent's connection once its output is written.
    fn close(&mut self, conn: ConnId) {
        self.outbox.entry(conn).or_default().close = true;
    }

    fn send<T: Serialize>(&mut self, conn: ConnId, msg: &T) {
        picloud_proto::frame::encode_into(msg, &mut self.outbox.entry(conn).or_default().bytes);
    }

    /// Sends the reply to a request of `conn`.
    fn reply(&mut self, conn: ConnId, reply: &ServerReply) {
        let buf = self.outbox.entry(conn).or_default();
        super::encode_reply_into(reply, &mut buf.bytes);
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

    /// Step 7, the first half: the snapshot to publish, if anything changed.
    fn publishable(&mut self) -> Option<Snapshot> {
        let jobs_changed = self.jobs.take_changed();
        if !jobs_changed && !std::mem::take(&mut self.nodes_changed) {
            return None;
        }
        self.version += 1;
        Some(Snapshot::new(
            self.version,
            self.facts.clone(),
            self.jobs.map().clone(),
            self.nodes.clone(),
            self.jobs.counts(),
        ))
    }

    /// Sends the outbox at once (at a stop, once nothing waits for a sync).
    fn send_outbox(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        for (conn, buf) in self.outbox.drain() {
            let msg = Outbound::Send {
                conn,
                bytes: buf.bytes,
                answers: buf.answers,
                version: self.version,
                close: buf.close,
            };
            if self.out.send(msg).is_err() {
                // The I/O side is gone; there is nobody left to tell.
                self.stopping = true;
            }
        }
        (self.wake)();
    }

    // ---- requests

    fn on_request(&mut self, conn: ConnId, caller: &Caller, req: ClientRequest) {
        let room = match &req {
            ClientRequest::Submit(spec) | ClientRequest::SubmitReserved { spec, .. } => {
                durable::encoded_size(spec) + REQUEST_SLACK
            }
            ClientRequest::Cancel(refs) | ClientRequest::Release(refs) => {
                REQUEST_SLACK * refs.len().max(1) as u64
            }
            ClientRequest::Reserve { .. } => REQUEST_SLACK,
            _ => 0,
        };
        // Agents' reports must always find room: requests leave them some.
        let reserve = self.journal.as_ref().map_or(0, |j| j.config().preallocate / 4);
        if room > 0 {
            if let Err(e) = self.room(room + reserve) {
                return self.reply(conn, &ServerReply::Error(e));
            }
        }
        match req {
            ClientRequest::Submit(spec) => match self.submit(*spec, caller, None) {
                Ok((seq, id)) => self.reply(conn, &ServerReply::Submitted { seq, id }),
                Err(e) => self.reply(conn, &ServerReply::Error(e)),
            },
            ClientRequest::Reserve { count } => {
                if count == 0 || count > MAX_RESERVED {
                    return self.error(
                        conn,
                        ErrorKind::Invalid,
                        format!("cannot reserve {count} job numbers: ask for 1 to {MAX_RESERVED}"),
                    );
                }
                let first = self.next_seq;
                self.next_seq += u64::from(count);
                // On disk before the reply, so that a restart never gives
                // these numbers to other jobs: the client may already have
                // named jobs by them (its connection's use of them ends with
                // the connection).
                let r = Reservation { first, next: first, end: self.next_seq, uid: caller.uid };
                self.journal_only(&LiveChange::ReservedFor { first, next: first, end: r.end, uid: r.uid });
                self.reservations.reserve(conn, r);
                self.reply(conn, &ServerReply::Reserved { first, count });
            }
            ClientRequest::SubmitReserved { seq, spec } => {
                match self.submit_reserved(conn, caller, seq, *spec) {
                    Ok((seq, id)) => self.reply(conn, &ServerReply::Submitted { seq, id }),
                    Err(e) => self.reply(conn, &ServerReply::Error(e)),
                }
            }
            ClientRequest::Cancel(refs) => {
                let outcomes = refs.iter().map(|r| (*r, self.cancel(*r, caller))).collect();
                self.reply(conn, &ServerReply::Cancelled(outcomes));
            }
            ClientRequest::Release(refs) => {
                let outcomes = refs.iter().map(|r| (*r, self.release(*r, caller.uid))).collect();
                self.reply(conn, &ServerReply::Released(outcomes));
            }
            ClientRequest::Wait { jobs, timeout_ms, until, reply } => {
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
                if until == WaitUntil::Any && jobs.is_empty() {
                    return self.error(conn, ErrorKind::Invalid, "a wait for any of no job would never end");
                }
                if reply == WaitReply::Results {
                    // Refused now rather than after the wait.
                    let refusal = jobs
                        .iter()
                        .filter_map(|r| self.jobs.get(r.seq()))
                        .find_map(|j| results_refused(j, caller.uid, &self.facts.name));
                    if let Some(refusal) = refusal {
                        return self.reply(conn, &ServerReply::Error(refusal));
                    }
                }
                let deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
                self.waiters.push(Waiter {
                    conn,
                    refs: jobs,
                    deadline,
                    until,
                    reply,
                    uid: caller.uid,
                    ended: 0,
                });
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

    /// Queues a job under `seq`, a number reserved for `conn` or for a
    /// closed connection of the caller (`reservations.rs`). A job the caller
    /// submitted under that number before, on a connection now closed, is
    /// answered as submitted, changing nothing.
    fn submit_reserved(
        &mut self,
        conn: ConnId,
        caller: &Caller,
        seq: u64,
        spec: JobSpec,
    ) -> Result<(u64, String), ProtoError> {
        let claim = self
            .reservations
            .claim(conn, caller.uid, seq)
            .map_err(|why| ProtoError::new(ErrorKind::Invalid, why))?;
        if let Claim::Orphan { again, .. } = claim {
            match self.jobs.get(seq) {
                Some(job) if job.uid == caller.uid => {
                    debug!(seq, "a submission sent again after a reconnection: queued already");
                    return Ok((seq, job.id(&self.facts.name)));
                }
                Some(_) => {
                    return Err(ProtoError::new(
                        ErrorKind::PermissionDenied,
                        format!("job number {seq} belongs to another user's job"),
                    ));
                }
                None if again => {
                    return Err(ProtoError::new(
                        ErrorKind::Invalid,
                        format!(
                            "job number {seq} was sent again after a reconnection, but its first submission was \
                             refused or its job has ended and been forgotten; it is not queued again"
                        ),
                    ));
                }
                None => {}
            }
        }
        let submitted = self.submit(spec, caller, Some(seq))?;
        self.reservations.used(conn, claim, seq);
        Ok(submitted)
    }

    /// Queues a job, under the next sequence number or (`SubmitReserved`)
    /// under `reserved`, which the caller checked. Nothing is changed
    /// unless it succeeds.
    fn submit(
        &mut self,
        spec: JobSpec,
        caller: &Caller,
        reserved: Option<u64>,
    ) -> Result<(u64, String), ProtoError> {
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
        let request = request_of(&spec, caller.uid).map_err(invalid)?;
        self.core.check_fits(&request).map_err(invalid)?;
        let view = self.view();
        if let Some(d) = spec.depend.iter().find(|d| !view.exists(&d.on)) {
            return Err(ProtoError::new(
                ErrorKind::UnknownJob,
                format!("dependency on Unknown Job Id {}.{}", d.on, self.facts.name),
            ));
        }
        let seq = match reserved {
            Some(seq) => seq,
            None => {
                self.next_seq += 1;
                self.next_seq - 1
            }
        };
        debug_assert!(self.jobs.get(seq).is_none(), "sequence number {seq} used twice");
        for d in &spec.depend {
            let deps = self.dependents.entry(d.on.seq()).or_default();
            if !deps.contains(&seq) {
                deps.push(seq);
            }
        }
        self.record(LiveChange::Submitted {
            seq,
            spec: Arc::new(spec),
            user: caller.user.clone(),
            uid: caller.uid,
            gid: caller.gid,
            ctime: unix_now(),
        });
        if self.journal.is_some() {
            // Its tasks wait for the sync of this batch (`carry_out`).
            self.unsynced.push_back((self.batch_no + 1, seq));
            self.unsynced_seqs.insert(seq);
        }
        let id = self.jobs.get(seq).expect("just recorded").id(&self.facts.name);
        debug!(%id, user = %caller.user, "submitted");
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
        self.record(LiveChange::Released { seq: r.seq() });
        self.apply(Event::Release(r));
        RefOutcome::Done
    }

    // ---- agents

    fn node_mut(&mut self, node: NodeId) -> Option<&mut NodeView> {
        self.nodes_changed = true;
        self.nodes.get_mut(&node).map(Arc::make_mut)
    }

    fn on_agent(&mut self, node: NodeId, msg: AgentMsg) {
        if let Some(link) = self.links.get_mut(&node) {
            link.last_heard = Instant::now();
        }
        if let AgentMsg::Finished(ends) = &msg {
            // Reports cannot be refused: they take from the room that
            // requests leave free.
            let bytes = ends.iter().map(|e| durable::encoded_size(e) + 64).sum::<u64>();
            if let Err(e) = self.room(bytes) {
                warn!("{}", e.message);
            }
        }
        match msg {
            AgentMsg::Started(_) | AgentMsg::Heartbeat => {}
            AgentMsg::Finished(ends) => {
                for end in ends {
                    self.task_finished(node, &end);
                }
            }
            AgentMsg::Running(tasks) => self.reconcile(node, tasks),
        }
    }

    fn task_finished(&mut self, node: NodeId, end: &TaskEnd) {
        let task = end.task;
        let Some(job) = self.jobs.get(task.seq) else { return };
        let here = job.tasks.get(&task.index).is_some_and(|t| !t.is_finished() && t.node == Some(node));
        if !here {
            // Not running here as far as the table knows: a report the
            // agent kept while the server was away. It is taken if the task
            // is still waiting to start (its start was not on disk when the
            // server died, or it was queued again after its node was lost).
            if job.is_running(task.index) || !self.core.adoptable(task) {
                debug!(?task, "ignoring the end of a task that does not run there");
                return;
            }
            self.adopt(node, &TaskRunning { task, cpus: Vec::new(), gpus: Vec::new() });
            if !self.core.is_running(task) {
                return;
            }
        }
        if let Some(n) = self.node_mut(node) {
            n.running.remove(&task);
        }
        let Some(success) = self.record(LiveChange::Finished { end, time: unix_now() }) else { return };
        self.ended_since_check = true;
        self.touched.push(task.seq);
        self.forget_if_done(task.seq);
        self.apply(Event::TaskFinished { task, success });
    }

    fn closed(&mut self, conn: ConnId) {
        // Its numbers are never given to another job; its client may still
        // send submissions named by them, on a new connection.
        self.reservations.closed(conn, Instant::now());
        self.waiters.retain(|w| w.conn != conn);
        self.outbox.remove(&conn);
        let Some(node) = self.agent_conns.remove(&conn) else { return };
        if let Some(n) = self.nodes.get(&node) {
            warn!(node = %n.name, "agent disconnected");
        }
        self.node_away(node);
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
                if self.unsynced_seqs.contains(&task.seq) && !self.hold_for_commit.contains(&conn) {
                    self.hold_for_commit.push(conn);
                }
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
                self.record(LiveChange::Started { task, node, cpus: cpus.clone(), time: unix_now() });
                self.touched.push(task.seq);
                self.usage_grew = true;
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
                    self.record(LiveChange::KillSent { task, by: by.clone() });
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
                let change = LiveChange::Ended {
                    seq,
                    index,
                    reason: (&reason).into(),
                    by,
                    node_name,
                    time: unix_now(),
                };
                if self.jobs.get(seq).is_some() && self.record(change).is_some() {
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
            for mut w in std::mem::take(&mut self.waiters) {
                // A job forgotten meanwhile has ended too.
                let ended = |r: &JobRef| self.jobs.get(r.seq()).is_none_or(|j| j.ref_ended(r));
                let done = match w.until {
                    WaitUntil::All => {
                        w.ended += w.refs[w.ended..].iter().take_while(|r| ended(r)).count();
                        w.ended == w.refs.len()
                    }
                    WaitUntil::Any => w.refs.iter().any(ended),
                };
                if done {
                    let view = self.view();
                    let reply = match w.reply {
                        WaitReply::States => {
                            let jobs = w.refs.iter().flat_map(|r| view.infos_of(r)).collect();
                            ServerReply::Jobs { jobs, unknown: Vec::new() }
                        }
                        WaitReply::Results => {
                            let refs: Vec<JobRef> = w.refs.iter().copied().filter(ended).collect();
                            let results = view.results(&refs, w.uid);
                            // Outcomes too large for one frame stay behind:
                            // the states say the jobs ended, and the client
                            // fetches their results one job at a time.
                            let size = bincode::serialized_size(&results).unwrap_or(u64::MAX);
                            if size > RESULTS_IN_A_WAIT as u64 {
                                let jobs = w.refs.iter().flat_map(|r| view.infos_of(r)).collect();
                                ServerReply::Jobs { jobs, unknown: Vec::new() }
                            } else {
                                results
                            }
                        }
                    };
                    self.reply(w.conn, &reply);
                } else if w.deadline.is_some_and(|d| d <= now) {
                    self.error(w.conn, ErrorKind::Timeout, "timed out waiting for the jobs to end");
                } else {
                    self.waiters.push(w);
                }
            }
        }
        // Usage is recorded while it grows, and once after it stopped.
        if now - self.last_usage >= USAGE_EVERY && self.room(REQUEST_SLACK).is_ok() {
            let runs = self.core.running_tasks() > 0;
            if runs || self.usage_grew {
                self.record_usage();
            }
            self.last_usage = now;
            self.usage_grew = runs;
        }
        // Forgetting can wait while the journal has no room for it.
        if now - self.last_purge >= PURGE_EVERY && self.room(REQUEST_SLACK).is_ok() {
            self.last_purge = now;
            let cutoff = unix_now().saturating_sub(self.keep_finished.as_secs());
            let (purged, python) = self.jobs.purge(cutoff);
            if !purged.is_empty() {
                self.journal_only(&LiveChange::Purged { seqs: purged.clone() });
            }
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
                    // Segments are freed once the purge is on disk.
                    if let Some(conn) = self.links.get(&node).and_then(|l| l.conn) {
                        if !self.hold_for_commit.contains(&conn) {
                            self.hold_for_commit.push(conn);
                        }
                    }
                    self.send_to_node(node, &ToAgent::Purged(python.clone()));
                }
            }
        }
    }

    fn shut_down(&mut self) {
        // Everything acknowledged goes out first, in order.
        self.sync_barrier();
        let agents: Vec<NodeId> =
            self.links.iter().filter(|(_, l)| l.conn.is_some()).map(|(&n, _)| n).collect();
        for node in agents {
            self.send_to_node(node, &ToAgent::Shutdown);
        }
        for w in std::mem::take(&mut self.waiters) {
            self.error(w.conn, ErrorKind::ShuttingDown, "the picloud server is shutting down");
        }
        self.send_outbox();
        // A clean stop leaves a snapshot, so that the next start reads no
        // journal; not after a failed write, whose batch is not on disk.
        self.reap_snapshot();
        if self.failed.is_none() && self.journal.as_ref().is_some_and(|j| !j.is_empty()) {
            self.snapshot(false);
        }
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
    /// Starts a core thread with no jobs and no nodes, and no journal.
    pub fn spawn(config: &ServerConfig) -> Self {
        let (out, from_core) = crossbeam_channel::unbounded();
        Self::start(CoreLoop::new(config, out, || {}), from_core)
    }

    /// Starts a core thread on the journal of `config` (see [`CoreLoop::open`]).
    pub fn open(config: &ServerConfig) -> Result<Self, JournalError> {
        let (out, from_core) = crossbeam_channel::unbounded();
        Ok(Self::start(CoreLoop::open(config, out, || {})?, from_core))
    }

    fn start(core: CoreLoop, from_core: Receiver<Outbound>) -> Self {
        let (to_core, inbox) = crossbeam_channel::unbounded();
        let snapshots = core.snapshots();
        let thread = std::thread::Builder::new()
            .name("core".into())
            .spawn(move || {
                if let Err(e) = core.run(inbox) {
                    tracing::error!("the core thread stopped: {e}");
                }
            })
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

/// What a submission asks of the scheduling core.
fn request_of(spec: &JobSpec, uid: u32) -> Result<Request, String> {
    let (gpus, placement) = gpus_and_placement(&spec.resources.other)?;
    Ok(Request {
        user: uid,
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
    })
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
