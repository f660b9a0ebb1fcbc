//! Rebuilding the core thread's state after a restart, from the job table
//! that the snapshot and the journal gave back (`durable.rs`):
//!
//! 1. the table, the next sequence number and the next node number are
//!    taken over as they were, and the host names of the nodes (an agent
//!    that joins again gets its number back);
//! 2. nodes that tasks in the table ran on come back as nodes that are
//!    down, so that `qstat -f` still names them, with the tasks the table
//!    says run there;
//! 3. every task the table says was running stays so, *unconfirmed*: its
//!    agent keeps running it while the server is away and reports it when
//!    it reconnects (`nodes.rs`); those no agent reports within the node
//!    timeout get their fate from [`fate_of_running`], the one place that
//!    decides it, and the decision is recorded like any other change;
//! 4. the scheduling core is rebuilt with every job after the jobs it
//!    depends on, and otherwise in submission order ([`restore_order`]: by
//!    submission second, then sequence number, which a job submitted under
//!    a reserved number does not follow), since the core ranks jobs that
//!    tie by the order it was given them: finished jobs by their outcome,
//!    unfinished ones as a submission of the tasks still to start plus
//!    their unconfirmed tasks, held as they were, waiting only on
//!    dependencies not yet met;
//! 5. whatever the core decides at once (a dependency that can never be met
//!    now) is carried out, and the first batch records, publishes and
//!    sends it all.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use picloud_proto::{ArrayIndices, JobRef, NodeInfo, TaskId};
use tracing::{info, warn};

use super::{CoreLoop, LiveChange, request_of, unix_now};
use crate::core::{NodeId, RestoredJob};
use crate::server::durable::{Replayed, SavedEndReason};
use crate::server::jobs::{JobMap, JobRecord, JobTable, TaskRecord};
use crate::server::snapshot::NodeView;

/// What becomes of a task that the journal says was running when the
/// server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunningFate {
    /// It is queued again: it has not run, as far as anyone can tell.
    Requeue,
    /// It ends as failed: its node was lost.
    Lost,
    /// A kill had been sent for it: it ends as deleted.
    Cancelled,
}

/// Decides what becomes of a task that ran on a node that was lost, or
/// that no agent confirmed after a restart (see the module doc): one that
/// was being killed ends as deleted; one of a rerunnable job (`qsub -r y`,
/// the default, and every Python task) whose array is not ending is queued
/// again, unless it was queued again `retries` times already; any other
/// fails with its node lost.
pub(crate) fn fate_of_running(
    job: &JobRecord,
    index: Option<u32>,
    task: &TaskRecord,
    retries: u32,
) -> RunningFate {
    if task.cancelled_by.is_some() {
        RunningFate::Cancelled
    } else if job.spec.rerunnable && job.rest_ended.is_none() && job.reruns_of(index) < retries {
        RunningFate::Requeue
    } else {
        RunningFate::Lost
    }
}

impl CoreLoop {
    /// Steps 1 to 5 of the module doc.
    pub(super) fn restore(&mut self, replayed: Replayed) {
        self.jobs = replayed.jobs;
        self.next_seq = self.next_seq.max(replayed.next_seq);
        self.next_node = self.next_node.max(replayed.next_node);
        for (&node, name) in &replayed.nodes {
            self.names.insert(name.clone(), node);
        }
        let now = std::time::Instant::now();
        for r in replayed.reservations.values() {
            self.reservations.orphan(*r, now);
        }
        self.restore_nodes(&replayed.nodes);
        if let Some((time_ms, users)) = &replayed.usage {
            // Decayed over the time the server was away; before the jobs,
            // whose priorities it sets as they are queued.
            let half_life = self.core.config().usage_half_life;
            let away = super::unix_now_ms().saturating_sub(*time_ms) as f64;
            let decay = if half_life == 0 { 1.0 } else { (-away / half_life as f64).exp2() };
            for &(user, usage) in users {
                self.core.restore_usage(user, usage * decay);
            }
            info!(users = users.len(), "fair-share usage restored");
        }
        self.rebuild_core();
        let unconfirmed = self.core.unconfirmed().count();
        if unconfirmed > 0 {
            info!(
                tasks = unconfirmed,
                "tasks ran when the server stopped: waiting for their agents to report them"
            );
            self.grace_until = Some(std::time::Instant::now() + self.node_timeout());
        }
    }

    /// Step 2.
    fn restore_nodes(&mut self, names: &std::collections::BTreeMap<NodeId, String>) {
        let mut used = BTreeSet::new();
        let mut running: HashMap<NodeId, imbl::OrdSet<TaskId>> = HashMap::new();
        for job in self.jobs.map().values() {
            used.extend(job.tasks.values().filter_map(|t| t.node));
            for (index, t) in job.running_tasks() {
                if let Some(node) = t.node {
                    running.entry(node).or_default().insert(TaskId { seq: job.seq, index });
                }
            }
        }
        for node in used {
            let name = names.get(&node).cloned().unwrap_or_else(|| format!("node{}", node.0));
            let info = NodeInfo { hostname: name.clone(), ..Default::default() };
            let running = running.remove(&node).unwrap_or_default();
            let view = NodeView { name, info: Arc::new(info), up: false, running };
            self.nodes.insert(node, Arc::new(view));
            self.nodes_changed = true;
        }
    }

    /// Steps 4 and 5.
    fn rebuild_core(&mut self) {
        // Array tasks that unfinished jobs depend on one by one.
        let mut by_task: HashMap<u64, Vec<u32>> = HashMap::new();
        for job in self.jobs.map().values().filter(|j| j.finished_at.is_none()) {
            for d in &job.spec.depend {
                if let JobRef::Task(s, i) = d.on {
                    by_task.entry(s).or_default().push(i);
                }
            }
        }
        let seqs = restore_order(self.jobs.map());
        let mut decisions = Vec::new();
        let mut unrestorable = Vec::new();
        for &seq in &seqs {
            let job = self.jobs.get(seq).expect("listed");
            if job.finished_at.is_some() {
                self.core.restore_finished(seq, succeeded(job));
                continue;
            }
            match restored_job(job, &self.jobs, by_task.get(&seq)) {
                Ok(Some(restored)) => self.core.restore_job(seq, restored, &mut decisions),
                Ok(None) => warn!(seq, "an unfinished job with no task left to start or running"),
                Err(why) => unrestorable.push((seq, why)),
            }
            for d in &job.spec.depend {
                let on = d.on.seq();
                if self.jobs.get(on).is_some_and(|j| j.finished_at.is_none()) {
                    let deps = self.dependents.entry(on).or_default();
                    if !deps.contains(&seq) {
                        deps.push(seq);
                    }
                }
            }
        }
        self.acting_user = "the server".into();
        for d in decisions {
            self.carry_out(d);
        }
        for (seq, why) in unrestorable {
            warn!(seq, "cannot queue a job again after the restart: {why}");
            self.record(LiveChange::Ended {
                seq,
                index: None,
                reason: SavedEndReason::Cancelled,
                by: format!("the server, which could not queue it again after a restart ({why}),"),
                node_name: String::new(),
                time: unix_now(),
            });
        }
        self.touched.extend(seqs);
    }
}

/// The jobs of `jobs` in an order where each comes after the jobs it
/// depends on: the order they were submitted in, as far as the table knows
/// it (by submission second, then sequence number), except that a job comes
/// after every job it depends on. The core judges a dependency when it adds
/// the job, from what it knows of the job depended on then, and ranks jobs
/// that tie by the order it was given them. O(jobs log jobs +
/// dependencies); dependencies form no cycle (a job may depend only on jobs
/// that existed when it was submitted).
pub(crate) fn restore_order(jobs: &JobMap) -> Vec<u64> {
    let mut roots: Vec<(u64, u64)> = jobs.iter().map(|(&seq, job)| (job.ctime, seq)).collect();
    roots.sort_unstable();
    let mut order = Vec::with_capacity(jobs.len());
    let mut placed = HashSet::with_capacity(jobs.len());
    // Depth-first, iterative (chains of dependencies may be long): each job
    // with the position of its next dependency to look at. A job is marked
    // placed when it is pushed, so that it is pushed once.
    let mut stack: Vec<(u64, usize)> = Vec::new();
    for (_, root) in roots {
        if !placed.insert(root) {
            continue;
        }
        stack.push((root, 0));
        while let Some((seq, next)) = stack.last_mut() {
            match jobs.get(seq).and_then(|j| j.spec.depend.get(*next)) {
                Some(d) => {
                    *next += 1;
                    let on = d.on.seq();
                    if jobs.contains_key(&on) && placed.insert(on) {
                        stack.push((on, 0));
                    }
                }
                None => {
                    order.push(*seq);
                    stack.pop();
                }
            }
        }
    }
    order
}

/// Whether a dependency of `kind` on a task that ended with `success` is met.
fn dependency_met(kind: picloud_proto::DependKind, success: bool) -> bool {
    use picloud_proto::DependKind::*;
    matches!((kind, success), (AfterAny, _) | (AfterOk, true) | (AfterNotOk, false))
}

/// Whether every task of a finished job succeeded (what dependencies on it see).
fn succeeded(job: &JobRecord) -> bool {
    job.tasks.values().map(|t| &**t).chain(job.rest_ended.as_deref()).all(|t| t.exit_status == Some(0))
}

/// What the core needs of an unfinished job; `None` if no task is left to
/// start or running (cannot happen for an unfinished job).
fn restored_job(
    job: &JobRecord,
    table: &JobTable,
    by_task: Option<&Vec<u32>>,
) -> Result<Option<RestoredJob>, String> {
    let mut request = request_of(&job.spec, job.uid)?;
    // A dependency on a job purged since was met long ago (else this job
    // would have ended with it); so was one on an array task that ended
    // as it asked (the core would judge a task of a finished array by the
    // whole array).
    request.depend.retain(|&(kind, on)| {
        let Some(target) = table.get(on.seq()) else { return false };
        match on {
            JobRef::Task(_, i) => match target.task_end(i) {
                Some(status) => !dependency_met(kind, status == 0),
                None => true,
            },
            _ => true,
        }
    });
    request.hold = job.held;
    let unconfirmed: Vec<Option<u32>> = job.running_tasks().map(|(i, _)| i).collect();
    let mut nothing_to_start = false;
    request.array = match &job.spec.array {
        // A plain job's task record means it started.
        None if job.tasks.contains_key(&None) => {
            nothing_to_start = true;
            None
        }
        None => None,
        Some(array) => match to_start(array, job) {
            Some(a) => Some(a),
            None => {
                nothing_to_start = true;
                Some(array.clone())
            }
        },
    };
    if nothing_to_start && unconfirmed.is_empty() {
        return Ok(None);
    }
    let any_failed = job
        .tasks
        .values()
        .map(|t| &**t)
        .chain(job.rest_ended.as_deref())
        .any(|t| t.exit_status.is_some_and(|s| s != 0));
    let task_outcomes = by_task
        .into_iter()
        .flatten()
        .filter_map(|&i| Some((i, job.tasks.get(&Some(i))?.exit_status? == 0)))
        .collect();
    Ok(Some(RestoredJob {
        request,
        held: job.held,
        any_failed,
        task_outcomes,
        unconfirmed,
        nothing_to_start,
    }))
}

/// The indices of an array that have not started: those without a task
/// record (of a task that ended or runs), unless the unstarted rest has
/// ended together. Ranges are split around
/// records, so this costs O(records + ranges), not O(indices).
pub(crate) fn to_start(array: &ArrayIndices, job: &JobRecord) -> Option<ArrayIndices> {
    if job.rest_ended.is_some() {
        return None;
    }
    if job.tasks.is_empty() {
        return Some(array.clone());
    }
    let mut parts = Vec::new();
    let mut emit = |from: u32, to: u32, step: u32| {
        parts.push(match (from == to, step) {
            (true, _) => format!("{from}"),
            (false, 1) => format!("{from}-{to}"),
            (false, _) => format!("{from}-{to}:{step}"),
        })
    };
    for r in array.ranges() {
        // The first index of the range not yet emitted or skipped.
        let mut next = Some(r.start);
        for (&key, _) in job.tasks.range(Some(r.start)..=Some(r.end)) {
            let (Some(i), Some(from)) = (key, next) else { continue };
            if !r.contains(i) {
                continue;
            }
            if i > from {
                emit(from, i - r.step, r.step);
            }
            next = i.checked_add(r.step);
        }
        if let Some(from) = next.filter(|&f| f <= r.end) {
            emit(from, r.end, r.step);
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(ArrayIndices::parse(&parts.join(",")).expect("sub-ranges of a valid array are valid"))
}
