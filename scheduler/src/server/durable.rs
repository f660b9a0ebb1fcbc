//! What the journal records, and how the job table is rebuilt from it.
//!
//! The journal records *effects on the job table*, not requests: every
//! change of a [`JobRecord`] the core thread makes is one [`Change`], and the
//! same [`apply`] carries it out live and on replay, so that a replayed table
//! equals the one the server had (tested in `core_loop/tests.rs`). What the
//! scheduling core knows (queue order, cursors of arrays, dependencies still
//! waited on) is not recorded: it is derived from the table after a restart
//! (`core_loop/restore.rs`).
//!
//! A snapshot ([`SavedState`]) is the job table itself in its serde form,
//! with the sequence numbers to continue from and the names of the nodes
//! that tasks in it ran on.
//!
//! Changes are bincode-encoded one after the other into a record's payload
//! (`journal.rs`); variants are only ever appended, and a change of their
//! fields needs a new `journal::FORMAT_VERSION`.

use std::borrow::Borrow;
use std::path::Path;
use std::sync::Arc;

use picloud_proto::{JobSpec, TaskEnd, TaskId};
use serde::{Deserialize, Serialize};

use super::core_loop::Reservation;
use super::jobs::{JobMap, JobRecord, JobTable};
use super::journal::{JournalError, RECORD_CHANGES, Recovered};
use crate::core::{EndReason, NodeId};

/// Why tasks ended without running to their end, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SavedEndReason {
    /// Cancelled before it started.
    Cancelled,
    /// A dependency can never be met; the text says which.
    DependencyNeverSatisfied(String),
    /// Its node was lost while it ran.
    NodeLost,
}

impl From<&EndReason> for SavedEndReason {
    fn from(r: &EndReason) -> Self {
        match r {
            EndReason::Cancelled => SavedEndReason::Cancelled,
            EndReason::DependencyNeverSatisfied(why) => SavedEndReason::DependencyNeverSatisfied(why.clone()),
            EndReason::NodeLost => SavedEndReason::NodeLost,
        }
    }
}

impl From<&SavedEndReason> for EndReason {
    fn from(r: &SavedEndReason) -> Self {
        match r {
            SavedEndReason::Cancelled => EndReason::Cancelled,
            SavedEndReason::DependencyNeverSatisfied(why) => EndReason::DependencyNeverSatisfied(why.clone()),
            SavedEndReason::NodeLost => EndReason::NodeLost,
        }
    }
}

/// One change of the job table. `E` is a [`TaskEnd`], owned when read back
/// and borrowed when written (an end may carry a large Python outcome).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Change<E> {
    /// A job was accepted (`JobRecord::new`).
    Submitted {
        /// Sequence number.
        seq: u64,
        /// The whole submission.
        spec: Arc<JobSpec>,
        /// Owner.
        user: Arc<str>,
        /// Owner's uid.
        uid: u32,
        /// Owner's primary gid.
        gid: u32,
        /// Submission time (Unix seconds).
        ctime: u64,
    },
    /// A task was sent to a node (`JobRecord::start`).
    Started {
        /// The task.
        task: TaskId,
        /// The node.
        node: NodeId,
        /// PUs it is pinned to.
        cpus: Vec<u32>,
        /// Unix seconds.
        time: u64,
    },
    /// A kill was sent for a running task (`JobRecord::mark_cancelled`).
    KillSent {
        /// The task.
        task: TaskId,
        /// Who cancelled it.
        by: String,
    },
    /// Tasks ended without running to their end (`JobRecord::end`).
    Ended {
        /// Sequence number.
        seq: u64,
        /// The task, or every unstarted task of an array (`None`).
        index: Option<u32>,
        /// Why.
        reason: SavedEndReason,
        /// Who cancelled, for a cancel.
        by: String,
        /// The node lost, for a lost node.
        node_name: String,
        /// Unix seconds.
        time: u64,
    },
    /// An agent reported a task's end (`JobRecord::finish`), with the
    /// outcome of a Python task.
    Finished {
        /// The report.
        end: E,
        /// Unix seconds.
        time: u64,
    },
    /// A held job was released.
    Released {
        /// Sequence number.
        seq: u64,
    },
    /// A job was held.
    Held {
        /// Sequence number.
        seq: u64,
    },
    /// A task that was running is queued again (`JobRecord::requeue`).
    Requeued {
        /// The task.
        task: TaskId,
    },
    /// Finished jobs were forgotten.
    Purged {
        /// Their sequence numbers.
        seqs: Vec<u64>,
    },
    /// An agent joined as `node`: remembered so that `exec_host` still
    /// names it after a restart.
    NodeJoined {
        /// Its number.
        node: NodeId,
        /// Its host name.
        name: String,
    },
    /// Job numbers below `end` were set aside for a client
    /// (`ClientRequest::Reserve`): never given to another job, also after a
    /// restart, since the client may already have named jobs by them.
    Reserved {
        /// One past the last number reserved.
        end: u64,
    },
    /// Job numbers `first..end` were set aside for a client of user `uid`,
    /// those below `next` used: recorded when reserved, and again after
    /// each snapshot while the reservation lives, so that a restart gives
    /// the client its numbers back (`core_loop/reservations.rs`) and never
    /// gives them to another job.
    ReservedFor {
        /// First number reserved.
        first: u64,
        /// Numbers below it were used.
        next: u64,
        /// One past the last number reserved.
        end: u64,
        /// The user it was reserved for.
        uid: u32,
    },
    /// Every user's fair-share usage: recorded every minute while tasks
    /// run, and after each snapshot, so that a restart gives it back.
    Usage {
        /// When, in Unix milliseconds: the usage decays from then on.
        time_ms: u64,
        /// Decayed usage in core-seconds at `time_ms`, by uid.
        users: Vec<(u32, f64)>,
    },
}

/// What a change did: `None` if it found nothing to change; for a
/// [`Change::Finished`], whether the task succeeded.
pub(crate) type Applied = Option<bool>;

/// Carries out a change on the table (live and on replay alike).
/// [`Change::NodeJoined`], [`Change::Reserved`], [`Change::ReservedFor`]
/// and [`Change::Usage`] change no job and return `None`.
pub(crate) fn apply<E: Borrow<TaskEnd>>(jobs: &mut JobTable, change: &Change<E>) -> Applied {
    match change {
        Change::Submitted { seq, spec, user, uid, gid, ctime } => {
            jobs.insert(JobRecord::new(*seq, spec.clone(), user.clone(), *uid, *gid, *ctime));
            Some(true)
        }
        Change::Started { task, node, cpus, time } => {
            jobs.update(task.seq, |j| j.start(task.index, *node, cpus.clone(), *time)).map(|()| true)
        }
        Change::KillSent { task, by } => {
            if !jobs.get(task.seq).is_some_and(|j| j.tasks.contains_key(&task.index)) {
                return None;
            }
            jobs.update(task.seq, |j| j.mark_cancelled(task.index, by)).map(|()| true)
        }
        Change::Ended { seq, index, reason, by, node_name, time } => {
            jobs.update(*seq, |j| j.end(*index, &reason.into(), by, node_name, *time)).map(|()| true)
        }
        Change::Finished { end, time } => {
            let end = end.borrow();
            if !jobs.get(end.task.seq).is_some_and(|j| j.is_running(end.task.index)) {
                return None;
            }
            jobs.update(end.task.seq, |j| j.finish(end, *time)).flatten()
        }
        Change::Released { seq } => jobs.update(*seq, |j| j.held = false).map(|()| true),
        Change::Held { seq } => jobs.update(*seq, |j| j.held = true).map(|()| true),
        Change::Requeued { task } => {
            if !jobs.get(task.seq).is_some_and(|j| j.is_running(task.index)) {
                return None;
            }
            jobs.update(task.seq, |j| j.requeue(task.index)).map(|()| true)
        }
        Change::Purged { seqs } => {
            jobs.remove(seqs);
            Some(true)
        }
        Change::NodeJoined { .. }
        | Change::Reserved { .. }
        | Change::ReservedFor { .. }
        | Change::Usage { .. } => None,
    }
}

/// Encodes a change onto the end of `buf`.
pub(crate) fn encode<E: Borrow<TaskEnd> + Serialize>(change: &Change<E>, buf: &mut Vec<u8>) {
    bincode::serialize_into(buf, change).expect("encoding into memory cannot fail");
}

/// Encoded size of a value, to reserve journal space before accepting it.
pub(crate) fn encoded_size<T: Serialize>(value: &T) -> u64 {
    bincode::serialized_size(value).unwrap_or(u64::MAX / 4)
}

/// The snapshot's payload as written: borrowed from the core thread's
/// published maps (the snapshot thread serializes them while the core goes on).
#[derive(Debug, Serialize)]
pub(crate) struct SavedStateRef<'a> {
    /// The next sequence number to give.
    pub(crate) next_seq: u64,
    /// The next node number to give.
    pub(crate) next_node: u32,
    /// Names of the nodes that tasks in `jobs` ran on.
    pub(crate) nodes: Vec<(NodeId, String)>,
    /// Every job.
    pub(crate) jobs: &'a JobMap,
    /// Node-loss reruns of tasks (`JobRecord::reruns`): (job, task, count).
    /// Since format version 2.
    pub(crate) reruns: Vec<(u64, Option<u32>, u32)>,
}

/// The reruns of every job of `jobs`, as a snapshot saves them.
pub(crate) fn reruns_of(jobs: &JobMap) -> Vec<(u64, Option<u32>, u32)> {
    jobs.values()
        .filter(|j| !j.reruns.is_empty())
        .flat_map(|j| j.reruns.iter().map(move |(&i, &n)| (j.seq, i, n)))
        .collect()
}

/// The snapshot's payload as read back (format version 1: without reruns).
#[derive(Debug, Deserialize)]
pub(crate) struct SavedStateV1 {
    /// The next sequence number to give.
    pub(crate) next_seq: u64,
    /// The next node number to give.
    pub(crate) next_node: u32,
    /// Names of the nodes that tasks in `jobs` ran on.
    pub(crate) nodes: Vec<(NodeId, String)>,
    /// Every job.
    pub(crate) jobs: JobMap,
}

/// The snapshot's payload as read back.
#[derive(Debug, Deserialize)]
pub(crate) struct SavedState {
    /// The next sequence number to give.
    pub(crate) next_seq: u64,
    /// The next node number to give.
    pub(crate) next_node: u32,
    /// Names of the nodes that tasks in `jobs` ran on.
    pub(crate) nodes: Vec<(NodeId, String)>,
    /// Every job.
    pub(crate) jobs: JobMap,
    /// Node-loss reruns of tasks: (job, task, count).
    pub(crate) reruns: Vec<(u64, Option<u32>, u32)>,
}

/// The job table and counters rebuilt from a snapshot and the journal.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    pub(crate) jobs: JobTable,
    pub(crate) next_seq: u64,
    pub(crate) next_node: u32,
    /// Every node ever named, by number.
    pub(crate) nodes: std::collections::BTreeMap<NodeId, String>,
    /// Changes replayed after the snapshot.
    pub(crate) changes: u64,
    /// Reservations of job numbers recorded after the snapshot, by first
    /// number, each used up to the last job submitted under it.
    pub(crate) reservations: std::collections::BTreeMap<u64, Reservation>,
    /// The last fair-share usage recorded (`Change::Usage`): when (Unix
    /// milliseconds), and each user's.
    pub(crate) usage: Option<(u64, Vec<(u32, f64)>)>,
}

/// Rebuilds the job table from what [`journal::open`](super::journal::open) read.
pub(crate) fn replay(recovered: &Recovered) -> Result<Replayed, JournalError> {
    let mut out = Replayed { next_seq: 1, ..Default::default() };
    if let Some((path, payload)) = recovered.snapshot_payload() {
        let decode_error = |source| JournalError::Decode {
            what: "the snapshot",
            path: path.to_path_buf(),
            offset: 0,
            source,
        };
        let state: SavedState = if recovered.snapshot_version() == Some(1) {
            let v1: SavedStateV1 = bincode::deserialize(payload).map_err(decode_error)?;
            SavedState {
                next_seq: v1.next_seq,
                next_node: v1.next_node,
                nodes: v1.nodes,
                jobs: v1.jobs,
                reruns: Vec::new(),
            }
        } else {
            bincode::deserialize(payload).map_err(decode_error)?
        };
        let mut reruns: std::collections::HashMap<u64, Vec<(Option<u32>, u32)>> = Default::default();
        for (seq, index, n) in state.reruns {
            reruns.entry(seq).or_default().push((index, n));
        }
        out.next_seq = state.next_seq;
        out.next_node = state.next_node;
        out.nodes.extend(state.nodes);
        for job in state.jobs.values() {
            let mut job = job.clone();
            if let Some(r) = reruns.remove(&job.seq) {
                Arc::make_mut(&mut job).reruns = r.into_iter().collect();
            }
            out.jobs.restore(job);
        }
    }
    for (path, bytes, records) in &recovered.segments {
        for rec in records {
            if rec.kind != RECORD_CHANGES {
                return Err(newer_record(path, rec.offset, rec.kind));
            }
            let mut payload = &bytes[rec.payload.clone()];
            while !payload.is_empty() {
                let change: Change<TaskEnd> =
                    bincode::deserialize_from(&mut payload).map_err(|source| JournalError::Decode {
                        what: "a journal record",
                        path: path.clone(),
                        offset: rec.offset,
                        source,
                    })?;
                replay_one(&mut out, &change);
            }
        }
    }
    out.jobs.sort_finished();
    out.jobs.take_changed();
    Ok(out)
}

fn replay_one(out: &mut Replayed, change: &Change<TaskEnd>) {
    out.changes += 1;
    match change {
        Change::Submitted { seq, uid, .. } => {
            out.next_seq = out.next_seq.max(seq + 1);
            if let Some((_, r)) = out.reservations.range_mut(..=*seq).next_back() {
                if *seq < r.end && r.uid == *uid {
                    r.next = r.next.max(seq + 1);
                }
            }
        }
        Change::Reserved { end } => out.next_seq = out.next_seq.max(*end),
        &Change::ReservedFor { first, next, end, uid } => {
            out.next_seq = out.next_seq.max(end);
            let r = out.reservations.entry(first).or_insert(Reservation { first, next, end, uid });
            r.next = r.next.max(next);
        }
        Change::NodeJoined { node, name } => {
            out.next_node = out.next_node.max(node.0 + 1);
            out.nodes.insert(*node, name.clone());
        }
        Change::Usage { time_ms, users } => out.usage = Some((*time_ms, users.clone())),
        _ => {}
    }
    apply(&mut out.jobs, change);
}

fn newer_record(path: &Path, offset: u64, kind: u8) -> JournalError {
    JournalError::BadHeader {
        path: path.to_path_buf(),
        why: format!(
            "the record at byte offset {offset} is of kind {kind}, which this picloud does not know (written by a \
             newer picloud?)"
        ),
        recovery: "Start the picloud that wrote it.".into(),
    }
}
