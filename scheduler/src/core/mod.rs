//! The scheduling core: a deterministic state machine with no I/O, no threads
//! and no clock.
//!
//! Everything that happens is an [`Event`] given to [`Core::apply`] together
//! with the current time; the core answers with [`Decision`]s for the caller to
//! carry out. The same core runs in the server and can be replayed in a
//! simulator.
//!
//! Policy (for now): strict FIFO in submission order with first-fit onto whole
//! free cores. A job that is held or waits on a dependency is skipped; the
//! first eligible job that does not fit stops the pass, so large jobs are not
//! starved by small ones behind them.

pub mod resources;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use picloud_proto::{ArrayIndices, DependKind, JobRef, TaskId};

pub use resources::{Allocation, NodeAllocation, NodeId, NodeShape, Placement, ResourceRequest, Resources};

/// Milliseconds on the caller's clock. The core never reads a clock itself.
pub type Millis = u64;

/// What a job asks of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The submitting user (uid), for fair share.
    pub user: u32,
    /// What each task needs.
    pub resources: ResourceRequest,
    /// Requested wall-clock limit of each task.
    pub walltime: Option<Millis>,
    /// Explicit priority, -1024..=1023.
    pub priority: i32,
    /// Array indices, for an array; `None` for a single task.
    pub array: Option<ArrayIndices>,
    /// Dependencies on other jobs, arrays or tasks.
    pub depend: Vec<(DependKind, JobRef)>,
    /// Submitted on hold.
    pub hold: bool,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A job or array was submitted as `seq` (increasing with every submission).
    Submit {
        /// Sequence number.
        seq: u64,
        /// What it asks for.
        request: Request,
    },
    /// A user cancelled a job, an array or one task.
    Cancel(JobRef),
    /// A user released a held job.
    Release(JobRef),
    /// A node offers its resources.
    NodeJoined {
        /// Node.
        node: NodeId,
        /// Its hardware.
        shape: NodeShape,
    },
    /// A node is gone; whatever ran there is lost.
    NodeLost(NodeId),
    /// A task ended; `success` is exit status 0.
    TaskFinished {
        /// Task.
        task: TaskId,
        /// Whether it succeeded.
        success: bool,
    },
    /// Time passed.
    Tick,
}

/// Why a task ended without finishing on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// Cancelled by a user before it started.
    Cancelled,
    /// A dependency can never be met; the text says which.
    DependencyNeverSatisfied(String),
    /// Its node was lost while it ran.
    NodeLost,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start the task with exactly these resources.
    Start {
        /// Task.
        task: TaskId,
        /// Nodes, cores, PUs, memory and GPUs.
        allocation: Allocation,
    },
    /// Kill a running task; its end will be reported as a [`Event::TaskFinished`].
    Kill {
        /// Task.
        task: TaskId,
        /// Nodes it runs on.
        nodes: Vec<NodeId>,
    },
    /// Tasks that end without (further) running. `index: None` on an array
    /// means every task of it that has not started.
    End {
        /// Sequence number.
        seq: u64,
        /// Array index, or `None` for a plain job or all unstarted array tasks.
        index: Option<u32>,
        /// Why.
        reason: EndReason,
    },
}

/// Where a queued job stands, for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Held by a user.
    Held,
    /// Waiting for dependencies.
    WaitingDependencies,
    /// Eligible to run.
    Eligible,
    /// Every task has started or ended.
    Dispatched,
    /// Every task has ended.
    Done,
    /// The core does not know this job.
    Unknown,
}

#[derive(Debug)]
struct Job {
    request: Request,
    held: bool,
    /// Dependencies not yet satisfied.
    waiting_on: Vec<(DependKind, JobRef)>,
    /// Next array index to consider, as a position in the index iterator
    /// (0 or 1 for a plain job).
    cursor: u64,
    /// Total tasks.
    total: u64,
    /// Unstarted array indices cancelled individually.
    skipped: BTreeSet<u32>,
    /// Tasks started and still running, with what they hold.
    running: BTreeMap<Option<u32>, Allocation>,
    /// Tasks ended so far.
    ended: u64,
    /// Whether any task failed (non-zero exit, cancelled, never ran).
    any_failed: bool,
    /// Ended tasks of arrays that others depend on individually, with success.
    task_outcomes: HashMap<u32, bool>,
}

impl Job {
    fn unstarted(&self) -> u64 {
        self.total - self.cursor
    }

    fn is_done(&self) -> bool {
        self.ended == self.total
    }
}

/// The scheduling state.
#[derive(Debug, Default)]
pub struct Core {
    nodes: Resources,
    /// Jobs not yet done, by sequence number (FIFO order).
    jobs: BTreeMap<u64, Job>,
    /// Outcome of every finished job: `true` when every task succeeded.
    finished: HashMap<u64, bool>,
    /// Jobs waiting on a job, by the job waited on.
    dependents: HashMap<u64, Vec<u64>>,
}

impl Core {
    /// An empty core with no nodes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks that some node could ever run `request`. With no node known yet
    /// every request is accepted.
    pub fn check_fits(&self, request: &Request) -> Result<(), String> {
        self.nodes.check_fits(&request.resources)
    }

    /// Applies one event at time `now`, appending decisions to `out`.
    pub fn apply(&mut self, event: Event, _now: Millis, out: &mut Vec<Decision>) {
        match event {
            Event::Submit { seq, request } => self.submit(seq, request, out),
            Event::Cancel(target) => self.cancel(target, out),
            Event::Release(target) => {
                if let Some(job) = self.jobs.get_mut(&target.seq()) {
                    job.held = false;
                }
            }
            Event::NodeJoined { node, shape } => self.nodes.add_node(node, shape),
            Event::NodeLost(node) => self.node_lost(node, out),
            Event::TaskFinished { task, success } => self.task_finished(task, success, out),
            Event::Tick => {}
        }
        self.schedule(out);
    }

    /// Where a job stands.
    pub fn phase(&self, seq: u64) -> Phase {
        match self.jobs.get(&seq) {
            None if self.finished.contains_key(&seq) => Phase::Done,
            None => Phase::Unknown,
            Some(j) if j.unstarted() == 0 => Phase::Dispatched,
            Some(j) if j.held => Phase::Held,
            Some(j) if !j.waiting_on.is_empty() => Phase::WaitingDependencies,
            Some(_) => Phase::Eligible,
        }
    }

    /// Whether array task `index` of `seq` has not started yet (and will not be
    /// skipped).
    pub fn is_unstarted(&self, seq: u64, index: u32) -> bool {
        let Some(job) = self.jobs.get(&seq) else { return false };
        let Some(array) = &job.request.array else { return false };
        array.contains(index) && !job.skipped.contains(&index) && position_of(array, index) >= job.cursor
    }

    /// Forgets the outcome of a finished job (it can no longer be depended on).
    pub fn forget(&mut self, seq: u64) {
        self.finished.remove(&seq);
    }

    /// Number of free cores across all nodes.
    pub fn free_cores(&self) -> u64 {
        self.nodes.free_cores()
    }

    /// The cluster's resources.
    pub fn resources(&self) -> &Resources {
        &self.nodes
    }

    fn submit(&mut self, seq: u64, request: Request, out: &mut Vec<Decision>) {
        let total = request.array.as_ref().map_or(1, ArrayIndices::len);
        let mut job = Job {
            held: request.hold,
            waiting_on: Vec::new(),
            cursor: 0,
            total,
            skipped: BTreeSet::new(),
            running: BTreeMap::new(),
            ended: 0,
            any_failed: false,
            task_outcomes: HashMap::new(),
            request,
        };
        let mut never = None;
        for &(kind, on) in &job.request.depend {
            match self.dependency_outcome(on) {
                Some(success) => {
                    if let Err(why) = satisfied(kind, on, success) {
                        never = Some(why);
                    }
                }
                None => {
                    job.waiting_on.push((kind, on));
                    self.dependents.entry(on.seq()).or_default().push(seq);
                }
            }
        }
        self.jobs.insert(seq, job);
        if let Some(why) = never {
            self.end_unstarted(seq, EndReason::DependencyNeverSatisfied(why), out);
        }
    }

    /// `Some(success)` once `on` has ended, `None` while it has not.
    fn dependency_outcome(&self, on: JobRef) -> Option<bool> {
        let seq = on.seq();
        if let Some(&ok) = self.finished.get(&seq) {
            return Some(ok);
        }
        let job = self.jobs.get(&seq)?;
        match on {
            JobRef::Task(_, i) => job.task_outcomes.get(&i).copied(),
            _ => None,
        }
    }

    fn cancel(&mut self, target: JobRef, out: &mut Vec<Decision>) {
        let seq = target.seq();
        let Some(job) = self.jobs.get_mut(&seq) else { return };
        match target {
            JobRef::Task(_, i) => {
                if let Some(alloc) = job.running.get(&Some(i)) {
                    let nodes = alloc.nodes.iter().map(|a| a.node).collect();
                    out.push(Decision::Kill { task: TaskId { seq, index: Some(i) }, nodes });
                } else if self.is_unstarted(seq, i) {
                    self.jobs.get_mut(&seq).expect("present").skipped.insert(i);
                    out.push(Decision::End { seq, index: Some(i), reason: EndReason::Cancelled });
                    self.tasks_ended(seq, 1, Some(i), false, out);
                }
            }
            JobRef::Job(_) | JobRef::Array(_) => {
                for (&index, alloc) in &job.running {
                    let nodes = alloc.nodes.iter().map(|a| a.node).collect();
                    out.push(Decision::Kill { task: TaskId { seq, index }, nodes });
                }
                self.end_unstarted(seq, EndReason::Cancelled, out);
            }
        }
    }

    /// Ends every task of `seq` that has not started.
    fn end_unstarted(&mut self, seq: u64, reason: EndReason, out: &mut Vec<Decision>) {
        let Some(job) = self.jobs.get_mut(&seq) else { return };
        let remaining = job.unstarted() - job.skipped.len() as u64;
        job.cursor = job.total;
        job.skipped.clear();
        if remaining == 0 {
            return;
        }
        out.push(Decision::End { seq, index: None, reason });
        self.tasks_ended(seq, remaining, None, false, out);
    }

    fn node_lost(&mut self, node: NodeId, out: &mut Vec<Decision>) {
        let lost: Vec<TaskId> = self
            .jobs
            .iter()
            .flat_map(|(&seq, job)| {
                job.running
                    .iter()
                    .filter(move |(_, alloc)| alloc.nodes.iter().any(|a| a.node == node))
                    .map(move |(&index, _)| TaskId { seq, index })
            })
            .collect();
        self.nodes.remove_node(node);
        for task in lost {
            if let Some(alloc) = self.jobs.get_mut(&task.seq).and_then(|job| job.running.remove(&task.index))
            {
                // Whatever it held on other nodes is free again.
                self.nodes.release(&alloc);
            }
            out.push(Decision::End { seq: task.seq, index: task.index, reason: EndReason::NodeLost });
            self.tasks_ended(task.seq, 1, task.index, false, out);
        }
    }

    fn task_finished(&mut self, task: TaskId, success: bool, out: &mut Vec<Decision>) {
        let Some(job) = self.jobs.get_mut(&task.seq) else { return };
        let Some(alloc) = job.running.remove(&task.index) else { return };
        self.nodes.release(&alloc);
        self.tasks_ended(task.seq, 1, task.index, success, out);
    }

    /// Records that `n` tasks of `seq` ended (`index`: the one array task, when
    /// it is one), all with the same `success`, and finishes the job when none is left.
    fn tasks_ended(&mut self, seq: u64, n: u64, index: Option<u32>, success: bool, out: &mut Vec<Decision>) {
        let Some(job) = self.jobs.get_mut(&seq) else { return };
        job.ended += n;
        job.any_failed |= !success;
        if let Some(i) = index {
            if self.dependents.contains_key(&seq) {
                job.task_outcomes.insert(i, success);
                self.wake_dependents(seq, out);
            }
        }
        self.finish_if_done(seq, out);
    }

    fn finish_if_done(&mut self, seq: u64, out: &mut Vec<Decision>) {
        if !self.jobs.get(&seq).is_some_and(Job::is_done) {
            return;
        }
        let job = self.jobs.remove(&seq).expect("checked above");
        self.finished.insert(seq, !job.any_failed);
        self.wake_dependents(seq, out);
    }

    /// Re-evaluates the jobs waiting on `seq`.
    fn wake_dependents(&mut self, seq: u64, out: &mut Vec<Decision>) {
        let Some(waiting) = self.dependents.get(&seq).cloned() else { return };
        let mut still = Vec::new();
        for dep in waiting {
            let Some(job) = self.jobs.get(&dep) else { continue };
            let mut pending = Vec::new();
            let mut never = None;
            for &(kind, on) in &job.waiting_on {
                if on.seq() != seq {
                    pending.push((kind, on));
                    continue;
                }
                match self.dependency_outcome(on) {
                    None => pending.push((kind, on)),
                    Some(success) => {
                        if let Err(why) = satisfied(kind, on, success) {
                            never = Some(why);
                        }
                    }
                }
            }
            if pending.iter().any(|(_, on)| on.seq() == seq) {
                still.push(dep);
            }
            self.jobs.get_mut(&dep).expect("present").waiting_on = pending;
            if let Some(why) = never {
                self.end_unstarted(dep, EndReason::DependencyNeverSatisfied(why), out);
            }
        }
        if still.is_empty() {
            self.dependents.remove(&seq);
        } else {
            self.dependents.insert(seq, still);
        }
    }

    /// Starts what fits, in FIFO order.
    fn schedule(&mut self, out: &mut Vec<Decision>) {
        if self.nodes.free_cores() == 0 {
            return;
        }
        for (&seq, job) in self.jobs.iter_mut() {
            if job.held || !job.waiting_on.is_empty() || job.unstarted() == 0 {
                continue;
            }
            while job.cursor < job.total {
                let index = match &job.request.array {
                    None => None,
                    Some(a) => {
                        let i = nth_index(a, job.cursor);
                        if job.skipped.remove(&i) {
                            job.cursor += 1;
                            continue;
                        }
                        Some(i)
                    }
                };
                let Some(allocation) = self.nodes.allocate(&job.request.resources) else {
                    return; // strict FIFO: nothing behind the first job that does not fit
                };
                job.cursor += 1;
                job.running.insert(index, allocation.clone());
                out.push(Decision::Start { task: TaskId { seq, index }, allocation });
                if self.nodes.free_cores() == 0 {
                    return;
                }
            }
        }
    }
}

/// Whether a dependency of `kind` on a job that ended with `success` is met;
/// the error says why it never will be.
fn satisfied(kind: DependKind, on: JobRef, success: bool) -> Result<(), String> {
    match (kind, success) {
        (DependKind::AfterAny, _) | (DependKind::AfterOk, true) | (DependKind::AfterNotOk, false) => Ok(()),
        (DependKind::AfterOk, false) => Err(format!("afterok:{on} can never be satisfied: {on} failed")),
        (DependKind::AfterNotOk, true) => {
            Err(format!("afternotok:{on} can never be satisfied: {on} succeeded"))
        }
    }
}

/// The `n`th index of an array, in increasing order.
fn nth_index(a: &ArrayIndices, mut n: u64) -> u32 {
    for r in a.ranges() {
        if n < r.len() {
            return r.start + (n as u32) * r.step;
        }
        n -= r.len();
    }
    unreachable!("position beyond the array")
}

/// The position of index `i` (which must belong to the array).
fn position_of(a: &ArrayIndices, i: u32) -> u64 {
    let mut pos = 0;
    for r in a.ranges() {
        if r.contains(i) {
            return pos + u64::from((i - r.start) / r.step);
        }
        pos += r.len();
    }
    u64::MAX
}

#[cfg(test)]
mod tests;
