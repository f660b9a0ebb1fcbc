//! The server's record of every job: what was submitted, which tasks started
//! where, how each ended. The core decides; this table remembers, and answers
//! `qstat` with [`JobInfo`]s.
//!
//! The table is a persistent (structurally shared) map, so that the core
//! thread can publish it to query threads after every batch in O(1) and keep
//! changing its own copy at O(log n) per change:
//!
//! 1. [`JobTable`] is an [`imbl::OrdMap`] from sequence number to
//!    `Arc<JobRecord>`; a job's task records are again an `OrdMap` of
//!    `Arc<TaskRecord>`, and its submission (script, environment) sits in an
//!    `Arc<JobSpec>` that no change ever copies.
//! 2. Publishing clones the map: one reference count on its root.
//! 3. The first change to a job after a publish copies the path from the root
//!    to that job (`OrdMap::get_mut`, nodes of at most 16 entries, see imbl's
//!    `ORD_CHUNK_SIZE`) and the job record itself ([`Arc::make_mut`]: a few
//!    scalars and reference counts); a changed task record is copied the same
//!    way inside the job. Later changes in the same batch find the copies
//!    unshared and change them in place.
//!
//! So a batch costs O(changes × log n) whatever the number of jobs, and a
//! snapshot held by a slow `qstat` costs only the nodes changed since.
//!
//! Nothing here reads the scheduling core: where a job stands in the queue
//! ([`Phase`]) is copied into its record by the core thread after each batch,
//! so that a published record answers queries on its own.
//!
//! The records' serde form (everything but the phase) is the snapshots'
//! format (`durable.rs`): a change of their fields needs a new
//! `journal::FORMAT_VERSION`.

use picloud_proto::{EXIT_CANCELLED, EXIT_NEVER_RAN};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use picloud_proto::{
    ArrayCounts, DependKind, JobCommand, JobInfo, JobRef, JobSpec, JobSpecSummary, JobState, JoinStreams,
    PythonOutcome, ResourcesUsed, TaskEnd, TaskId, TaskResult,
};

use serde::{Deserialize, Serialize};

use crate::core::{EndReason, NodeId, Phase};

/// One started or ended task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TaskRecord {
    pub(crate) node: Option<NodeId>,
    pub(crate) cpus: Vec<u32>,
    pub(crate) stime: Option<u64>,
    pub(crate) end_time: Option<u64>,
    pub(crate) exit_status: Option<i32>,
    pub(crate) comment: Option<String>,
    pub(crate) used: ResourcesUsed,
    /// A cancel was sent to the agent; the end is reported as a deletion.
    pub(crate) cancelled_by: Option<String>,
    /// What a Python task's function returned or raised.
    pub(crate) outcome: Option<Arc<PythonOutcome>>,
}

impl TaskRecord {
    fn ended(exit_status: i32, comment: String, now: u64) -> Self {
        TaskRecord {
            node: None,
            cpus: Vec::new(),
            stime: None,
            end_time: Some(now),
            exit_status: Some(exit_status),
            comment: Some(comment),
            used: ResourcesUsed::default(),
            cancelled_by: None,
            outcome: None,
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.exit_status.is_some()
    }
}

fn unknown_phase() -> Phase {
    Phase::Unknown
}

/// One submitted job or array. Cheap to clone: the submission is shared and
/// the task records are a persistent map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    pub(crate) seq: u64,
    pub(crate) spec: Arc<JobSpec>,
    pub(crate) user: Arc<str>,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) ctime: u64,
    /// Where the job stands in the core's queue, as of the last batch.
    /// Not saved: the core is rebuilt after a restart, and tells it again.
    #[serde(skip, default = "unknown_phase")]
    pub(crate) phase: Phase,
    /// Held by a user (`qsub -h`), until released.
    pub(crate) held: bool,
    /// Tasks that started or ended individually (key `None` for a plain job).
    pub(crate) tasks: imbl::OrdMap<Option<u32>, Arc<TaskRecord>>,
    /// How the array tasks that never started ended, when they ended together.
    pub(crate) rest_ended: Option<Arc<TaskRecord>>,
    pub(crate) total: u64,
    pub(crate) ended: u64,
    pub(crate) running: u64,
    /// When the last task ended (Unix seconds).
    pub(crate) finished_at: Option<u64>,
    /// Tasks queued again after their node was lost (or no agent confirmed
    /// them after a restart), with how many times. Saved in snapshots apart
    /// from the records (`durable::SavedState::reruns`), so that snapshots
    /// of format 1, which have none, still read.
    #[serde(skip)]
    pub(crate) reruns: imbl::OrdMap<Option<u32>, u32>,
}

impl JobRecord {
    pub(crate) fn new(
        seq: u64,
        spec: impl Into<Arc<JobSpec>>,
        user: Arc<str>,
        uid: u32,
        gid: u32,
        now: u64,
    ) -> Self {
        let spec = spec.into();
        let total = spec.array.as_ref().map_or(1, |a| a.len());
        JobRecord {
            seq,
            held: spec.hold,
            spec,
            user,
            uid,
            gid,
            ctime: now,
            phase: Phase::Unknown,
            tasks: imbl::OrdMap::new(),
            rest_ended: None,
            total,
            ended: 0,
            running: 0,
            finished_at: None,
            reruns: imbl::OrdMap::new(),
        }
    }

    pub(crate) fn is_array(&self) -> bool {
        self.spec.array.is_some()
    }

    /// Held by a user or waiting on a dependency: shown as `H`.
    pub(crate) fn is_held(&self) -> bool {
        matches!(self.phase, Phase::Held | Phase::WaitingDependencies)
    }

    /// The id qsub printed: `12.srv` or `12[].srv`.
    pub(crate) fn id(&self, server: &str) -> String {
        if self.is_array() { format!("{}[].{server}", self.seq) } else { format!("{}.{server}", self.seq) }
    }

    /// Records that `task` started on `node`.
    pub(crate) fn start(&mut self, index: Option<u32>, node: NodeId, cpus: Vec<u32>, now: u64) {
        self.running += 1;
        let rec = TaskRecord {
            node: Some(node),
            cpus,
            stime: Some(now),
            end_time: None,
            exit_status: None,
            comment: None,
            used: ResourcesUsed::default(),
            cancelled_by: None,
            outcome: None,
        };
        self.tasks.insert(index, Arc::new(rec));
    }

    /// Whether task `index` was started and has not ended.
    pub(crate) fn is_running(&self, index: Option<u32>) -> bool {
        self.tasks.get(&index).is_some_and(|t| !t.is_finished())
    }

    /// Tasks started and not ended, in index order.
    pub(crate) fn running_tasks(&self) -> impl Iterator<Item = (Option<u32>, &TaskRecord)> + '_ {
        self.tasks.iter().filter(|(_, t)| !t.is_finished()).map(|(&i, t)| (i, &**t))
    }

    /// Puts a running task back in the queue: it is again a task that has
    /// not started (its node was lost and it may run again).
    pub(crate) fn requeue(&mut self, index: Option<u32>) {
        if self.is_running(index) {
            self.tasks.remove(&index);
            self.running -= 1;
            *self.reruns.entry(index).or_insert(0) += 1;
        }
    }

    /// How many times task `index` was queued again after a node loss.
    pub(crate) fn reruns_of(&self, index: Option<u32>) -> u32 {
        self.reruns.get(&index).copied().unwrap_or(0)
    }

    /// `run_count` of a task: its starts (see [`JobInfo::run_count`]).
    fn run_count(&self, index: Option<u32>, rec: Option<&TaskRecord>) -> u32 {
        let started = rec.is_some_and(|t| t.stime.is_some());
        self.reruns_of(index) + u32::from(started)
    }

    /// Records that a kill was sent for task `index` on behalf of `by`.
    pub(crate) fn mark_cancelled(&mut self, index: Option<u32>, by: &str) {
        if let Some(rec) = self.tasks.get_mut(&index) {
            Arc::make_mut(rec).cancelled_by = Some(by.to_string());
        }
    }

    /// Records an agent's report of a task's end. Returns whether the task
    /// counts as a success for dependencies, or `None` if the task was not running.
    pub(crate) fn finish(&mut self, end: &TaskEnd, now: u64) -> Option<bool> {
        if !self.is_running(end.task.index) {
            return None;
        }
        let rec = Arc::make_mut(self.tasks.get_mut(&end.task.index)?);
        let mut status = end.exit_status;
        let mut comment = end.comment.clone();
        if let Some(by) = &rec.cancelled_by {
            status = EXIT_CANCELLED;
            comment = Some(format!("Job deleted by {by} while running"));
        }
        rec.exit_status = Some(status);
        rec.comment = comment;
        rec.used = end.used;
        rec.outcome = end.outcome.as_deref().cloned().map(Arc::new);
        rec.end_time = Some(now);
        self.running -= 1;
        self.ended += 1;
        self.mark_if_done(now);
        Some(status == 0)
    }

    /// Records tasks that ended without running on their own.
    pub(crate) fn end(
        &mut self,
        index: Option<u32>,
        reason: &EndReason,
        by: &str,
        node_name: &str,
        now: u64,
    ) {
        let (status, comment) = match reason {
            EndReason::Cancelled => (EXIT_CANCELLED, format!("Job deleted by {by} before it ran")),
            EndReason::DependencyNeverSatisfied(why) => {
                (EXIT_NEVER_RAN, format!("Job not run: dependency {why}"))
            }
            EndReason::NodeLost => {
                let runs = self.reruns_of(index) + 1;
                let comment = if self.spec.rerunnable && runs > 1 {
                    format!(
                        "Job failed: node {node_name} was lost while it ran; it ran {runs} times, each on a node that \
                         was lost, and is not retried again (node-loss retry limit reached)"
                    )
                } else {
                    format!("Job failed: node {node_name} was lost while it ran")
                };
                (EXIT_NEVER_RAN, comment)
            }
        };
        match (index, self.is_array()) {
            (None, true) => {
                // Every array task not started yet.
                // Tasks with a record started or ended on their own already.
                self.ended += self.total - self.tasks.len() as u64;
                self.rest_ended = Some(Arc::new(TaskRecord::ended(status, comment, now)));
            }
            (index, _) => {
                if let Some(rec) = self.tasks.get_mut(&index) {
                    if rec.exit_status.is_none() {
                        // A running task whose node was lost.
                        let rec = Arc::make_mut(rec);
                        rec.exit_status = Some(status);
                        rec.comment = Some(comment);
                        rec.end_time = Some(now);
                        self.running -= 1;
                        self.ended += 1;
                    }
                } else {
                    self.tasks.insert(index, Arc::new(TaskRecord::ended(status, comment, now)));
                    self.ended += 1;
                }
            }
        }
        self.mark_if_done(now);
    }

    fn mark_if_done(&mut self, now: u64) {
        if self.ended == self.total && self.finished_at.is_none() {
            self.finished_at = Some(now);
        }
    }

    /// Whether `r` (which names this job) has ended.
    pub(crate) fn ref_ended(&self, r: &JobRef) -> bool {
        match *r {
            JobRef::Task(_, i) => self.task_record(i).is_some_and(|t| t.is_finished()),
            _ => self.finished_at.is_some(),
        }
    }

    /// The exit status of array task `i`, once it has ended.
    pub(crate) fn task_end(&self, i: u32) -> Option<i32> {
        self.task_record(i).and_then(|t| t.exit_status)
    }

    /// Whether array task `i` exists.
    pub(crate) fn has_task(&self, i: u32) -> bool {
        self.spec.array.as_ref().is_some_and(|a| a.contains(i))
    }

    /// The record of array task `i`, including one that ended with the rest.
    ///
    /// A task without a record of its own never started and was not cancelled
    /// alone (both leave a record). Once the unstarted rest has ended together
    /// nothing more starts, so such a task is one of that rest.
    fn task_record(&self, i: u32) -> Option<&TaskRecord> {
        if let Some(t) = self.tasks.get(&Some(i)) {
            return Some(t);
        }
        if self.has_task(i) {
            return self.rest_ended.as_deref();
        }
        None
    }

    /// Output paths of a task: `(stdout, stderr)`, defaults and `-j` applied.
    pub(crate) fn output_paths(&self, index: Option<u32>) -> (String, String) {
        let spec = &self.spec;
        let resolve = |given: &Option<String>, letter: char| {
            let file = match index {
                None => format!("{}.{letter}{}", spec.name, self.seq),
                Some(i) => format!("{}.{letter}{}.{i}", spec.name, self.seq),
            };
            let path = match given {
                None => Path::new(&spec.workdir).join(file),
                Some(p) if p.ends_with('/') || Path::new(p).is_dir() => Path::new(p).join(file),
                Some(p) => Path::new(&spec.workdir).join(p),
            };
            let path = path.to_string_lossy().into_owned();
            match index {
                Some(i) => path.replace("^array_index^", &i.to_string()),
                None => path,
            }
        };
        let out = resolve(&spec.stdout, 'o');
        let err = resolve(&spec.stderr, 'e');
        match spec.join {
            JoinStreams::No => (out, err),
            JoinStreams::IntoOut => (out.clone(), out),
            JoinStreams::IntoErr => (err.clone(), err),
        }
    }

    fn summary(&self, server: &str) -> JobSpecSummary {
        let spec = &self.spec;
        let depend = (!spec.depend.is_empty()).then(|| {
            let mut by_kind: Vec<(DependKind, Vec<String>)> = Vec::new();
            for d in &spec.depend {
                let id = format!("{}.{server}", d.on);
                match by_kind.iter_mut().find(|(k, _)| *k == d.kind) {
                    Some((_, ids)) => ids.push(id),
                    None => by_kind.push((d.kind, vec![id])),
                }
            }
            by_kind
                .iter()
                .map(|(k, ids)| format!("{}:{}", k.as_str(), ids.join(":")))
                .collect::<Vec<_>>()
                .join(",")
        });
        JobSpecSummary {
            name: spec.name.clone(),
            queue: spec.queue.clone().unwrap_or_else(|| "workq".to_string()),
            account: spec.account.clone(),
            project: spec.project.clone(),
            resources: spec.resources.clone(),
            array: spec.array.as_ref().map(|a| a.to_string()),
            depend,
            workdir: spec.workdir.clone(),
            submit_host: spec.submit_host.clone(),
            submit_args: spec.submit_args.clone(),
            rerunnable: spec.rerunnable,
            priority: spec.priority,
            join: spec.join,
            hold: spec.hold,
        }
    }

    fn queued_state(&self) -> JobState {
        if self.is_held() { JobState::Held } else { JobState::Queued }
    }

    /// What `qstat` shows of the job or array as a whole.
    pub(crate) fn info(&self, server: &str, node_name: &dyn Fn(NodeId) -> String) -> JobInfo {
        let (out, err) = self.output_paths(None);
        let mut info = JobInfo {
            id: self.id(server),
            task: TaskId { seq: self.seq, index: None },
            is_array: self.is_array(),
            spec: self.summary(server),
            user: self.user.to_string(),
            state: self.queued_state(),
            exit_status: None,
            comment: None,
            exec_host: None,
            cpus: Vec::new(),
            ctime: self.ctime,
            etime: Some(self.ctime),
            stime: None,
            end_time: self.finished_at,
            used: ResourcesUsed::default(),
            stdout_path: out,
            stderr_path: err,
            array_counts: None,
            run_count: 0,
        };
        if self.is_array() {
            info.array_counts = Some(ArrayCounts {
                queued: self.total - self.ended - self.running,
                running: self.running,
                finished: self.ended,
            });
            info.stime = self.tasks.values().filter_map(|t| t.stime).min();
            for t in self.tasks.values() {
                info.used.cput_ms += t.used.cput_ms;
                info.used.mem = info.used.mem.max(t.used.mem);
                info.used.walltime_ms = info.used.walltime_ms.max(t.used.walltime_ms);
            }
            if self.finished_at.is_some() {
                info.state = JobState::Finished;
                // PBS Pro: 0 when every task succeeded, 1 when one failed, 2 when one never ran.
                let all = self.tasks.values().chain(self.rest_ended.as_ref());
                let statuses: Vec<i32> = all.filter_map(|t| t.exit_status).collect();
                info.exit_status = Some(if statuses.iter().any(|&s| s < 0 || s == EXIT_CANCELLED) {
                    2
                } else if statuses.iter().any(|&s| s != 0) {
                    1
                } else {
                    0
                });
                info.comment = self.rest_ended.as_ref().and_then(|t| t.comment.clone());
            } else if self.running > 0 || self.ended > 0 {
                info.state = JobState::Begun;
            }
        } else if let Some(t) = self.tasks.get(&None) {
            fill_task(&mut info, t, node_name);
        }
        info.run_count = if self.is_array() {
            self.reruns.values().sum()
        } else {
            self.run_count(None, self.tasks.get(&None).map(|t| &**t))
        };
        info
    }

    /// What `qstat -t` shows of array task `i`.
    pub(crate) fn task_info(&self, i: u32, server: &str, node_name: &dyn Fn(NodeId) -> String) -> JobInfo {
        let mut info = self.info(server, node_name);
        info.id = format!("{}[{i}].{server}", self.seq);
        info.task.index = Some(i);
        info.is_array = false;
        info.array_counts = None;
        info.exit_status = None;
        info.comment = None;
        info.stime = None;
        info.end_time = None;
        info.used = ResourcesUsed::default();
        (info.stdout_path, info.stderr_path) = self.output_paths(Some(i));
        info.state = self.queued_state();
        let rec = self.task_record(i);
        if let Some(t) = rec {
            fill_task(&mut info, t, node_name);
        }
        info.run_count = self.run_count(Some(i), rec);
        info
    }

    /// Whether this is a Python call rather than a command.
    pub(crate) fn is_python(&self) -> bool {
        matches!(self.spec.command, JobCommand::Python(_))
    }

    /// Where task `index` stands (`None` for a plain job) and what it returned.
    pub(crate) fn task_result(
        &self,
        index: Option<u32>,
        server: &str,
        node_name: &dyn Fn(NodeId) -> String,
    ) -> TaskResult {
        let id = match index {
            Some(i) => format!("{}[{i}].{server}", self.seq),
            None => format!("{}.{server}", self.seq),
        };
        let record = match index {
            Some(i) => self.task_record(i),
            None => self.tasks.get(&None).map(|t| &**t),
        };
        let mut result = TaskResult {
            id,
            task: TaskId { seq: self.seq, index },
            state: self.queued_state(),
            exit_status: None,
            comment: None,
            node: None,
            used: ResourcesUsed::default(),
            outcome: None,
        };
        if let Some(t) = record {
            result.state = if t.is_finished() { JobState::Finished } else { JobState::Running };
            result.exit_status = t.exit_status;
            result.comment = t.comment.clone();
            result.node = t.node.map(node_name);
            result.used = t.used;
            result.outcome = t.outcome.as_deref().cloned().map(Box::new);
        }
        result
    }

    /// What this job adds to the server's totals.
    fn counts(&self) -> Counts {
        if self.finished_at.is_some() {
            return Counts { finished: 1, ..Counts::default() };
        }
        let mut c = Counts { running: self.running, ..Counts::default() };
        if self.is_held() {
            c.held = 1;
        } else {
            c.queued = self.total - self.ended - self.running;
        }
        c
    }
}

fn fill_task(info: &mut JobInfo, t: &TaskRecord, node_name: &dyn Fn(NodeId) -> String) {
    info.state = if t.is_finished() { JobState::Finished } else { JobState::Running };
    info.exit_status = t.exit_status;
    info.comment = t.comment.clone();
    info.stime = t.stime;
    info.end_time = t.end_time;
    info.used = t.used;
    info.cpus = t.cpus.clone();
    info.exec_host =
        t.node.map(|n| format!("{}/{}*{}", node_name(n), t.cpus.first().copied().unwrap_or(0), t.cpus.len()));
}

/// Totals over the job table, as `qstat -B` shows them: tasks queued (of jobs
/// not held) and running, jobs held, jobs finished and still remembered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) queued: u64,
    pub(crate) running: u64,
    pub(crate) held: u64,
    pub(crate) finished: u64,
}

impl Counts {
    fn add(&mut self, c: Counts) {
        self.queued += c.queued;
        self.running += c.running;
        self.held += c.held;
        self.finished += c.finished;
    }

    fn sub(&mut self, c: Counts) {
        self.queued -= c.queued;
        self.running -= c.running;
        self.held -= c.held;
        self.finished -= c.finished;
    }
}

/// The persistent map of jobs, as the core thread owns and publishes it.
pub(crate) type JobMap = imbl::OrdMap<u64, Arc<JobRecord>>;

/// Every job the server remembers, with totals kept up to date as jobs change.
///
/// Every change goes through [`JobTable::update`], which keeps [`Counts`] exact
/// (so `qstat -B` costs O(1), not a walk over a million jobs) and notes when a
/// job finishes, for [`JobTable::purge`].
#[derive(Debug, Default)]
pub(crate) struct JobTable {
    map: JobMap,
    counts: Counts,
    /// Finished jobs as `(finished_at, seq)`, in the order they finished. The
    /// times do not decrease unless the clock is stepped back, which only
    /// delays a purge.
    finished: VecDeque<(u64, u64)>,
    /// Changed since [`JobTable::take_changed`].
    changed: bool,
}

impl JobTable {
    /// The job `seq`.
    pub(crate) fn get(&self, seq: u64) -> Option<&JobRecord> {
        self.map.get(&seq).map(|j| &**j)
    }

    /// The map, to publish (clone) or read.
    pub(crate) fn map(&self) -> &JobMap {
        &self.map
    }

    /// Totals over all jobs.
    pub(crate) fn counts(&self) -> Counts {
        self.counts
    }

    /// Adds a new job.
    pub(crate) fn insert(&mut self, job: JobRecord) {
        debug_assert!(job.finished_at.is_none(), "a new job has not finished");
        self.counts.add(job.counts());
        if let Some(old) = self.map.insert(job.seq, Arc::new(job)) {
            self.counts.sub(old.counts());
        }
        self.changed = true;
    }

    /// Changes job `seq` with `f`; `None` if there is no such job.
    ///
    /// Copies what a published snapshot still shares (see the module doc);
    /// callers that may change nothing should check with [`JobTable::get`] first.
    pub(crate) fn update<R>(&mut self, seq: u64, f: impl FnOnce(&mut JobRecord) -> R) -> Option<R> {
        let job = Arc::make_mut(self.map.get_mut(&seq)?);
        let before = job.counts();
        let was_finished = job.finished_at.is_some();
        let r = f(job);
        self.counts.sub(before);
        self.counts.add(job.counts());
        if let (false, Some(t)) = (was_finished, job.finished_at) {
            self.finished.push_back((t, seq));
        }
        self.changed = true;
        Some(r)
    }

    /// Removes the jobs that finished at or before `cutoff` (Unix seconds);
    /// returns their sequence numbers.
    /// Returns the sequence numbers removed, and those of them that were Python calls.
    pub(crate) fn purge(&mut self, cutoff: u64) -> (Vec<u64>, Vec<u64>) {
        let mut gone = Vec::new();
        let mut python = Vec::new();
        while let Some(&(t, seq)) = self.finished.front() {
            if t > cutoff {
                break;
            }
            self.finished.pop_front();
            if let Some(job) = self.map.remove(&seq) {
                self.counts.sub(job.counts());
                gone.push(seq);
                if job.is_python() {
                    python.push(seq);
                }
            }
        }
        self.changed |= !gone.is_empty();
        (gone, python)
    }

    /// Adds a job as it was saved, finished or not (a restart).
    pub(crate) fn restore(&mut self, job: Arc<JobRecord>) {
        self.counts.add(job.counts());
        if let Some(t) = job.finished_at {
            self.finished.push_back((t, job.seq));
        }
        if let Some(old) = self.map.insert(job.seq, job) {
            self.counts.sub(old.counts());
        }
        self.changed = true;
    }

    /// Puts the finished jobs in the order they finished, for [`JobTable::purge`]
    /// (after a restart restored them in another order).
    pub(crate) fn sort_finished(&mut self) {
        self.finished.make_contiguous().sort_unstable();
    }

    /// Removes these jobs (a replayed purge).
    pub(crate) fn remove(&mut self, seqs: &[u64]) {
        for seq in seqs {
            if let Some(job) = self.map.remove(seq) {
                self.counts.sub(job.counts());
                self.changed = true;
            }
        }
    }

    /// Whether anything changed since the last call.
    pub(crate) fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Totals recomputed from scratch, to check the running ones (tests).
    #[cfg(test)]
    pub(crate) fn recount(&self) -> Counts {
        let mut c = Counts::default();
        for job in self.map.values() {
            c.add(job.counts());
        }
        c
    }
}
