//! What queries read: an immutable [`Snapshot`] of the job table and the
//! nodes, published by the core thread after each batch that changed
//! something, and the code that answers `Stat`, `Nodes` and `ServerStatus`
//! from it.
//!
//! 1. The core thread builds a [`Snapshot`] from its persistent maps (a
//!    reference count each, see `jobs.rs`) and stores it in [`Snapshots`], an
//!    [`ArcSwap`], with a version one higher than the last.
//! 2. Only then does it hand that batch's replies to the I/O thread, each
//!    tagged with the version; the I/O thread remembers the highest version it
//!    has passed on (its *floor*).
//! 3. A query leaves the I/O thread for the query thread with the floor of
//!    that moment. The query thread loads the latest snapshot and, should it be
//!    older than the floor (it cannot be: the load happens after the store,
//!    through the channels), loads again. So a query never sees less than a
//!    reply already sent said: `qsub` then `qstat`, in any two processes,
//!    shows the job.
//! 4. The query thread answers from the snapshot alone, without messaging or
//!    waiting for the core thread; a snapshot it holds keeps only the nodes
//!    the core has copied since alive.

use std::sync::Arc;

use arc_swap::ArcSwap;
use picloud_proto::{
    ClientRequest, ErrorKind, JobInfo, JobRef, NodeInfo, NodeStatus, ProtoError, ServerReply, ServerStatus,
    StatRequest, TaskId,
};

use super::jobs::{Counts, JobMap, JobRecord};
use crate::core::NodeId;

/// What never changes while a server runs, shared by its threads.
#[derive(Debug)]
pub(crate) struct ServerFacts {
    pub(crate) name: String,
    pub(crate) state_dir: String,
    pub(crate) keep_finished_secs: u64,
}

/// A node as queries see it.
#[derive(Debug, Clone)]
pub(crate) struct NodeView {
    pub(crate) name: String,
    pub(crate) info: Arc<NodeInfo>,
    /// Whether its agent is connected.
    pub(crate) up: bool,
    /// Tasks running there.
    pub(crate) running: imbl::OrdSet<TaskId>,
}

/// The persistent map of nodes.
pub(crate) type NodeMap = imbl::OrdMap<NodeId, Arc<NodeView>>;

/// The server's state as of the end of one core batch: every job and node.
/// Immutable; cheap to hold (see the module doc).
#[derive(Debug)]
pub struct Snapshot {
    version: u64,
    facts: Arc<ServerFacts>,
    jobs: JobMap,
    nodes: NodeMap,
    counts: Counts,
}

impl Snapshot {
    pub(crate) fn new(
        version: u64,
        facts: Arc<ServerFacts>,
        jobs: JobMap,
        nodes: NodeMap,
        counts: Counts,
    ) -> Self {
        Snapshot { version, facts, jobs, nodes, counts }
    }

    /// Which publication this is: 0 for the empty state before the first
    /// batch, then one more for every batch that changed something.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Number of jobs remembered (queued, running, and finished but kept).
    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    /// Answers a query (`Stat`, `Nodes`, `ServerStatus`); `None` for requests
    /// that change state or wait, which only the core thread answers.
    pub fn answer(&self, request: &ClientRequest) -> Option<ServerReply> {
        self.answer_as(request, 0)
    }

    /// Answers a query of the user `uid` (`Results` are for their owner only).
    pub fn answer_as(&self, request: &ClientRequest, uid: u32) -> Option<ServerReply> {
        View { facts: &self.facts, jobs: &self.jobs, nodes: &self.nodes, counts: self.counts }
            .answer_as(request, uid)
    }
}

/// The latest [`Snapshot`], swapped in whole by the core thread and read
/// without locks by any number of readers.
#[derive(Debug, Clone)]
pub struct Snapshots(Arc<ArcSwap<Snapshot>>);

impl Snapshots {
    pub(crate) fn new(first: Snapshot) -> Self {
        Snapshots(Arc::new(ArcSwap::from_pointee(first)))
    }

    /// The latest snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        self.0.load_full()
    }

    /// The latest snapshot of at least version `floor`. Every version up to
    /// the highest one tagged on a message the caller has received is
    /// published already, so this returns at once; it loads again otherwise.
    pub fn load_at_least(&self, floor: u64) -> Arc<Snapshot> {
        loop {
            let snap = self.load();
            if snap.version >= floor {
                return snap;
            }
            std::thread::yield_now();
        }
    }

    pub(crate) fn store(&self, snap: Snapshot) {
        self.0.store(Arc::new(snap));
    }
}

/// The state queries read, borrowed from a [`Snapshot`] or from the core
/// thread's live maps (which answer `wait` and act as the queries' fallback).
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub(crate) facts: &'a ServerFacts,
    pub(crate) jobs: &'a JobMap,
    pub(crate) nodes: &'a NodeMap,
    pub(crate) counts: Counts,
}

impl View<'_> {
    /// See [`Snapshot::answer_as`].
    pub(crate) fn answer_as(&self, request: &ClientRequest, uid: u32) -> Option<ServerReply> {
        Some(match request {
            ClientRequest::Results(refs) => self.results(refs, uid),
            ClientRequest::Stat(req) => self.stat(req),
            ClientRequest::Nodes => ServerReply::Nodes(self.node_statuses()),
            ClientRequest::ServerStatus => ServerReply::ServerStatus(self.status()),
            _ => return None,
        })
    }

    fn job(&self, seq: u64) -> Option<&JobRecord> {
        self.jobs.get(&seq).map(|j| &**j)
    }

    /// Whether `r` names a job (array, task) the server remembers.
    pub(crate) fn exists(&self, r: &JobRef) -> bool {
        match (self.job(r.seq()), r) {
            (None, _) => false,
            (Some(job), JobRef::Task(_, i)) => job.has_task(*i),
            (Some(job), JobRef::Array(_)) => job.is_array(),
            (Some(_), JobRef::Job(_)) => true,
        }
    }

    fn node_name(&self, n: NodeId) -> String {
        self.nodes.get(&n).map(|n| n.name.clone()).unwrap_or_else(|| "?".into())
    }

    /// What `qstat` shows of `r`: the job, or the one task it names.
    pub(crate) fn infos_of(&self, r: &JobRef) -> Vec<JobInfo> {
        let Some(job) = self.job(r.seq()) else { return Vec::new() };
        let name = |n| self.node_name(n);
        match *r {
            JobRef::Task(_, i) => vec![job.task_info(i, &self.facts.name, &name)],
            _ => vec![job.info(&self.facts.name, &name)],
        }
    }

    fn stat(&self, req: &StatRequest) -> ServerReply {
        let server = &self.facts.name;
        let name = |n| self.node_name(n);
        let mut jobs = Vec::new();
        let mut unknown = Vec::new();
        let wanted: Vec<&JobRecord> = if req.jobs.is_empty() {
            // The map is ordered by sequence number.
            self.jobs
                .values()
                .filter(|j| req.include_finished || j.finished_at.is_none())
                .filter(|j| req.user.as_ref().is_none_or(|u| **u == *j.user))
                .map(|j| &**j)
                .collect()
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
            seqs.iter().filter_map(|&s| self.job(s)).collect()
        };
        for job in wanted {
            jobs.push(job.info(server, &name));
            if req.expand_arrays {
                if let Some(array) = &job.spec.array {
                    for i in array.iter() {
                        jobs.push(job.task_info(i, server, &name));
                    }
                }
            }
        }
        ServerReply::Jobs { jobs, unknown }
    }

    /// The outcomes of `refs`' tasks, for `uid`: their owner (or root) only,
    /// since a function's value is its owner's data.
    pub(crate) fn results(&self, refs: &[JobRef], uid: u32) -> ServerReply {
        let server = &self.facts.name;
        let name = |n| self.node_name(n);
        let mut results = Vec::new();
        let mut unknown = Vec::new();
        for r in refs {
            let Some(job) = self.job(r.seq()).filter(|_| self.exists(r)) else {
                unknown.push(*r);
                continue;
            };
            if let Some(refusal) = results_refused(job, uid, server) {
                return ServerReply::Error(refusal);
            }
            match (r, &job.spec.array) {
                (JobRef::Task(_, i), _) => results.push(job.task_result(Some(*i), server, &name)),
                (_, Some(array)) => {
                    results.extend(array.iter().map(|i| job.task_result(Some(i), server, &name)))
                }
                (_, None) => results.push(job.task_result(None, server, &name)),
            }
        }
        ServerReply::Results { results, unknown }
    }

    fn node_statuses(&self) -> Vec<NodeStatus> {
        let mut nodes: Vec<NodeStatus> = self
            .nodes
            .values()
            .map(|n| NodeStatus {
                name: n.name.clone(),
                state: if n.up { "up" } else { "down" }.to_string(),
                info: (*n.info).clone(),
                used_pus: {
                    let mut pus: Vec<u32> = n
                        .running
                        .iter()
                        .filter_map(|t| self.job(t.seq)?.tasks.get(&t.index))
                        .flat_map(|r| r.cpus.iter().copied())
                        .collect();
                    pus.sort_unstable();
                    pus
                },
                running: {
                    let mut ids: Vec<String> =
                        n.running.iter().map(|t| t.display_with(&self.facts.name)).collect();
                    ids.sort();
                    ids
                },
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    fn status(&self) -> ServerStatus {
        ServerStatus {
            name: self.facts.name.clone(),
            version: picloud_proto::PROTOCOL_VERSION,
            queued: self.counts.queued,
            running: self.counts.running,
            held: self.counts.held,
            finished: self.counts.finished,
            nodes_up: self.nodes.values().filter(|n| n.up).count() as u32,
            keep_finished_secs: self.facts.keep_finished_secs,
            state_dir: self.facts.state_dir.clone(),
        }
    }
}

/// Why `uid` may not read the outcomes of `job`, if it may not: only the
/// job's owner and root may.
pub(crate) fn results_refused(job: &JobRecord, uid: u32, server: &str) -> Option<ProtoError> {
    (uid != 0 && uid != job.uid).then(|| {
        ProtoError::new(
            ErrorKind::PermissionDenied,
            format!("the results of job {} belong to {}", job.id(server), job.user),
        )
    })
}
