//! The scheduling core: a deterministic state machine with no I/O, no threads
//! and no clock.
//!
//! Everything that happens is an [`Event`] given to [`Core::apply`] together
//! with the current time; the core answers with [`Decision`]s for the caller to
//! carry out. The same core runs in the server and can be replayed in a
//! simulator.
//!
//! Jobs that may start (not held, dependencies met) wait in a queue
//! (`queue.rs`) kept in the order the [`Policy`] gives: submission order,
//! shortest walltime first, or multifactor priority (fair share from
//! [`fairshare`], age, job size, explicit priority; see [`policy`]). A pass
//! after every event (`pass.rs`) starts tasks in that order; under every
//! policy but `fcfs` the first job that does not fit gets a reservation and
//! later jobs are backfilled around it (`backfill.rs`). An array is one record
//! with a cursor over its index ranges: a task costs memory only once it
//! starts. [`Core::sanity_check`] (`invariants.rs`) walks every invariant.
//!
//! `docs/scheduling.md` describes the policies, their settings and the
//! simulator.

mod backfill;
pub mod fairshare;
mod invariants;
mod pass;
pub mod policy;
mod queue;
pub mod resources;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use picloud_proto::{ArrayIndices, DependKind, JobRef, TaskId};

pub use fairshare::FairShare;
pub use policy::{CoreConfig, ParsePolicyError, Policy, PriorityFactors, PriorityWeights};
pub use resources::{Allocation, NodeAllocation, NodeId, NodeShape, Placement, ResourceRequest, Resources};

use backfill::NodeTable;
use queue::{Queue, QueueEntry, QueueKey};

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
    /// A user held a job: none of its tasks starts until it is released;
    /// running ones continue. Holding one array task holds the whole array.
    Hold(JobRef),
    /// A node offers its resources.
    NodeJoined {
        /// Node.
        node: NodeId,
        /// Its hardware.
        shape: NodeShape,
    },
    /// A node is gone; whatever ran there is lost.
    NodeLost(NodeId),
    /// A node is being drained: it takes no new tasks, the running ones
    /// continue, and it is removed once they have ended.
    NodeLeft(NodeId),
    /// A task ended; `success` is exit status 0.
    TaskFinished {
        /// Task.
        task: TaskId,
        /// Whether it succeeded.
        success: bool,
    },
    /// Time passed; multifactor priorities are recomputed.
    Tick,
    /// A task that runs on a node that was lost (or that no agent confirmed
    /// after a restart) is queued again: its resources are free, and it
    /// starts again like a task that never ran.
    Requeue(TaskId),
    /// A task that runs on a node that was lost (or that no agent confirmed
    /// after a restart) ends as failed ([`EndReason::NodeLost`]).
    Lost(TaskId),
    /// An agent reports a task running with exactly these resources: a task
    /// the core has as unconfirmed (restored after a restart) or as not
    /// started (its start was sent, its record was lost with the server).
    /// It runs from now on, as if started here. Any other task is left
    /// alone (see [`Core::adoptable`]).
    Adopt {
        /// The node it runs on.
        node: NodeId,
        /// The task and its resources.
        task: Adopted,
    },
    /// A node's agent (re)joined and reported what it runs: the node offers
    /// its resources (as [`Event::NodeJoined`]), after the tasks it runs
    /// are adopted (as [`Event::Adopt`]), so that none of them is started
    /// there again. A node the core still knows with this shape keeps its
    /// running tasks.
    Rejoined {
        /// Node.
        node: NodeId,
        /// Its hardware.
        shape: NodeShape,
        /// Tasks its agent runs that the core should adopt.
        running: Vec<Adopted>,
    },
}

/// A task an agent runs, with what it was given: see [`Event::Adopt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// Task.
    pub task: TaskId,
    /// OS indices of the PUs it is pinned to.
    pub pus: Vec<u32>,
    /// GPUs it holds.
    pub gpus: Vec<u32>,
}

/// A job as a restarted server rebuilds it: see [`Core::restore_job`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredJob {
    /// What it asks for, except that `array` holds only the indices still
    /// to start (a plain job is restored only while its task is to start),
    /// and `depend` only the dependencies not known to be met.
    pub request: Request,
    /// Held by a user.
    pub held: bool,
    /// Whether a task of it that already ended failed.
    pub any_failed: bool,
    /// Outcomes of ended array tasks that other jobs depend on one by one.
    pub task_outcomes: BTreeMap<u32, bool>,
    /// Tasks that ran when the server stopped, outside `request.array`:
    /// neither running nor to start until an agent confirms them
    /// ([`Event::Adopt`]) or they are settled ([`Event::Requeue`],
    /// [`Event::Lost`], [`Event::TaskFinished`]).
    pub unconfirmed: Vec<Option<u32>>,
    /// No task of `request` is left to start (`request.array` is then not
    /// read; a plain job whose task is unconfirmed sets this).
    pub nothing_to_start: bool,
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

/// A job or array not yet done.
#[derive(Debug)]
struct Job {
    request: Request,
    held: bool,
    /// Dependencies not yet satisfied.
    waiting_on: Vec<(DependKind, JobRef)>,
    /// Next array index to start, as a position in the index order (0 or 1 for
    /// a plain job). The index at the cursor is never in `skipped`.
    cursor: u64,
    /// Total tasks.
    total: u64,
    /// Unstarted array indices cancelled individually (all beyond the cursor).
    skipped: BTreeSet<u32>,
    /// Tasks started and still running.
    running: u64,
    /// Tasks ended so far.
    ended: u64,
    /// Whether any task failed (non-zero exit, cancelled, never ran).
    any_failed: bool,
    /// Ended tasks of arrays that others depend on individually, with success.
    task_outcomes: BTreeMap<u32, bool>,
    /// Tasks that started and were queued again (their node was lost):
    /// started before any task at the cursor.
    requeued: BTreeSet<Option<u32>>,
    /// Tasks restored as unconfirmed ([`RestoredJob::unconfirmed`]) and not
    /// settled yet.
    unconfirmed: u64,
    /// Tasks outside the positions of `request.array` that the job still
    /// counts (the unconfirmed tasks of a restored job): it is done once
    /// `ended == total + extra`.
    extra: u64,
    /// When it last became eligible (entered the queue), for the age factor.
    eligible_since: Millis,
    /// Multifactor priority as last computed.
    priority: u64,
    /// Its key while it is in the queue.
    queued: Option<QueueKey>,
    /// When it reached the core, among all jobs (see [`Core::next_arrival`]).
    arrival: u64,
}

impl Job {
    fn unstarted(&self) -> u64 {
        self.total - self.cursor + self.requeued.len() as u64
    }

    fn is_done(&self) -> bool {
        self.ended == self.total + self.extra
    }

    /// Whether a task of it may start now.
    fn is_eligible(&self) -> bool {
        !self.held && self.waiting_on.is_empty() && (self.cursor < self.total || !self.requeued.is_empty())
    }

    /// The next task to start: a requeued one, else the task at the cursor.
    fn next_task(&self) -> Option<Option<u32>> {
        if let Some(&t) = self.requeued.first() {
            return Some(t);
        }
        if self.cursor >= self.total {
            return None;
        }
        Some(self.request.array.as_ref().map(|a| nth_index(a, self.cursor)))
    }

    /// Moves past the task just started: out of the requeued ones, else
    /// the cursor past it and any cancelled ones.
    fn advance(&mut self) {
        if self.requeued.pop_first().is_some() {
            return;
        }
        self.cursor += 1;
        self.skip_cancelled();
    }

    /// Moves the cursor past cancelled indices.
    fn skip_cancelled(&mut self) {
        if self.skipped.is_empty() {
            return;
        }
        while let Some(Some(i)) = self.next_task() {
            if !self.skipped.remove(&i) {
                break;
            }
            self.cursor += 1;
        }
    }

    /// Cores one task takes over all its chunks.
    fn task_cores(&self) -> u64 {
        u64::from(self.request.resources.cores) * u64::from(self.request.resources.chunks)
    }

    /// The walltime a task is planned with: requested, else the default.
    fn walltime(&self, config: &CoreConfig) -> Millis {
        self.request.walltime.unwrap_or(config.default_walltime)
    }

    /// Its multifactor priority factors at `now`.
    fn factors(
        &self,
        config: &CoreConfig,
        fair_share: &FairShare,
        cluster_cores: u64,
        now: Millis,
    ) -> PriorityFactors {
        PriorityFactors::compute(
            config,
            now.saturating_sub(self.eligible_since),
            fair_share.factor(self.request.user, now),
            self.task_cores(),
            cluster_cores,
            self.walltime(config),
            self.request.priority,
        )
    }

    /// Its rank in the queue under the policy (lower first), from its
    /// stored priority.
    fn rank(&self, config: &CoreConfig) -> u64 {
        match config.policy {
            Policy::Fcfs | Policy::Easy => 0,
            Policy::SjfEasy => self.walltime(config),
            Policy::Multifactor => u64::MAX - self.priority,
        }
    }
}

/// A task that runs.
#[derive(Debug)]
struct RunningTask {
    allocation: Allocation,
    /// Its job's user, for fair share.
    user: u32,
    /// Cores it holds, over all nodes.
    cores: u64,
    /// When it is expected to end: start + walltime (requested or default).
    expected_end: Millis,
}

/// Running tasks by id.
#[derive(Debug, Default)]
struct Running {
    tasks: BTreeMap<TaskId, RunningTask>,
}

impl Running {
    fn insert(&mut self, task: TaskId, running: RunningTask) {
        let old = self.tasks.insert(task, running);
        debug_assert!(old.is_none(), "{task:?} started twice");
    }

    fn remove(&mut self, task: &TaskId) -> Option<RunningTask> {
        self.tasks.remove(task)
    }

    /// Running tasks of job `seq`.
    fn of_job(&self, seq: u64) -> impl Iterator<Item = (&TaskId, &RunningTask)> + '_ {
        self.tasks.range(TaskId { seq, index: None }..=TaskId { seq, index: Some(u32::MAX) })
    }
}

/// The scheduling state. See the module documentation.
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    nodes: Resources,
    /// Sizes and free resources of the nodes, for planning reservations.
    table: NodeTable,
    /// Nodes that left: no new tasks; removed once idle.
    draining: BTreeSet<NodeId>,
    /// Cores of every node, for the job-size factor.
    cluster_cores: u64,
    /// Jobs not yet done, by sequence number.
    jobs: BTreeMap<u64, Job>,
    /// Eligible jobs in scheduling order.
    queue: Queue,
    running: Running,
    /// Outcome of every finished job: `true` when every task succeeded.
    finished: HashMap<u64, bool>,
    /// Jobs waiting on a job, by the job waited on.
    dependents: HashMap<u64, Vec<u64>>,
    fair_share: FairShare,
    /// The latest time seen; time never goes back for the core.
    now: Millis,
    /// When priorities were last recomputed.
    last_recompute: Millis,
    /// The reservation made by the last pass: (job, shadow time).
    reservation: Option<(u64, Millis)>,
    /// Tasks restored as unconfirmed (see [`RestoredJob::unconfirmed`]).
    unconfirmed: BTreeSet<TaskId>,
    /// The arrival number of the next job added: jobs tie in the queue by
    /// the order they reached the core, which a job submitted under a
    /// number reserved earlier does not share with its sequence number.
    next_arrival: u64,
}

impl Default for Core {
    fn default() -> Self {
        Self::new()
    }
}

impl Core {
    /// An empty core with no nodes and the default configuration
    /// ([`Policy::Multifactor`]).
    pub fn new() -> Self {
        Self::with_config(CoreConfig::default())
    }

    /// An empty core with no nodes.
    pub fn with_config(config: CoreConfig) -> Self {
        Self {
            fair_share: FairShare::new(config.usage_half_life),
            config,
            nodes: Resources::new(),
            table: NodeTable::default(),
            draining: BTreeSet::new(),
            cluster_cores: 0,
            jobs: BTreeMap::new(),
            queue: Queue::default(),
            running: Running::default(),
            finished: HashMap::new(),
            dependents: HashMap::new(),
            now: 0,
            last_recompute: 0,
            reservation: None,
            unconfirmed: BTreeSet::new(),
            next_arrival: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Checks that some node could ever run `request`. With no node known yet
    /// every request is accepted.
    pub fn check_fits(&self, request: &Request) -> Result<(), String> {
        self.nodes.check_fits(&request.resources)
    }

    /// Applies one event at time `now`, appending decisions to `out`.
    ///
    /// Time never goes back for the core: an earlier `now` than one seen
    /// before counts as the latest one.
    pub fn apply(&mut self, event: Event, now: Millis, out: &mut Vec<Decision>) {
        let now = now.max(self.now);
        self.now = now;
        let tick = matches!(event, Event::Tick);
        match event {
            Event::Submit { seq, request } => self.submit(seq, request, out),
            Event::Cancel(target) => self.cancel(target, out),
            Event::Release(target) => self.set_held(target.seq(), false),
            Event::Hold(target) => self.set_held(target.seq(), true),
            Event::NodeJoined { node, shape } => self.node_joined(node, shape, out),
            Event::NodeLost(node) => self.node_lost(node, out),
            Event::NodeLeft(node) => self.node_left(node),
            Event::TaskFinished { task, success } => self.task_finished(task, success, out),
            Event::Tick => {}
            Event::Requeue(task) => self.requeue(task),
            Event::Lost(task) => {
                if self.stop_task(task) {
                    out.push(Decision::End { seq: task.seq, index: task.index, reason: EndReason::NodeLost });
                    self.tasks_ended(task.seq, 1, task.index, false, out);
                }
            }
            Event::Adopt { node, task } => {
                // A task it refuses is left to the caller (`is_running`).
                let _ = self.adopt(node, task);
            }
            Event::Rejoined { node, shape, running } => {
                if self.nodes.shape(node) != Some(&shape) {
                    self.node_joined(node, shape, out);
                } else if self.draining.remove(&node) {
                    self.table.set_usable(node, true);
                }
                for task in running {
                    let _ = self.adopt(node, task);
                }
            }
        }
        if self.config.policy == Policy::Multifactor
            && (tick || now >= self.last_recompute.saturating_add(self.config.recompute_interval))
        {
            self.recompute_priorities();
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
        if job.requeued.contains(&Some(index)) {
            return true;
        }
        let Some(array) = &job.request.array else { return false };
        array.contains(index)
            && !job.skipped.contains(&index)
            && job.cursor < job.total
            && position_of(array, index) >= job.cursor
    }

    /// Whether [`Event::Adopt`] would adopt `task` (given resources that
    /// are free): it is unconfirmed, or has not started (a requeued task
    /// included).
    pub fn adoptable(&self, task: TaskId) -> bool {
        if self.unconfirmed.contains(&task) {
            return true;
        }
        let Some(job) = self.jobs.get(&task.seq) else { return false };
        match task.index {
            _ if job.requeued.contains(&task.index) => true,
            None => job.request.array.is_none() && job.cursor < job.total,
            Some(i) => self.is_unstarted(task.seq, i),
        }
    }

    /// Whether `task` runs (started or adopted here).
    pub fn is_running(&self, task: TaskId) -> bool {
        self.running.tasks.contains_key(&task)
    }

    /// Tasks restored as unconfirmed and not settled yet.
    pub fn unconfirmed(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.unconfirmed.iter().copied()
    }

    /// Rebuilds a job after a restart of the server: like a submission of
    /// the tasks still to start, with what the job's ended tasks decided
    /// (see [`RestoredJob`]). Jobs are restored after every job they
    /// depend on (finished ones by [`Core::restore_finished`]).
    /// A dependency that can never be met now ends the job at once (its
    /// decisions go to `out`). Nothing starts until [`Core::apply`] runs.
    pub fn restore_job(&mut self, seq: u64, job: RestoredJob, out: &mut Vec<Decision>) {
        let RestoredJob { request, held, any_failed, task_outcomes, unconfirmed, nothing_to_start } = job;
        if self.jobs.contains_key(&seq) || self.finished.contains_key(&seq) {
            return;
        }
        let extra = unconfirmed.len() as u64;
        for &index in &unconfirmed {
            self.unconfirmed.insert(TaskId { seq, index });
        }
        self.add_job_with(seq, request, held, any_failed, task_outcomes, (nothing_to_start, extra), out);
    }

    /// Remembers a job that finished before a restart of the server, so
    /// that jobs depending on it can be restored: `success` is whether
    /// every task of it succeeded.
    pub fn restore_finished(&mut self, seq: u64, success: bool) {
        if !self.jobs.contains_key(&seq) {
            self.finished.insert(seq, success);
        }
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

    /// Number of jobs in the queue (eligible, with a task left to start).
    pub fn queued_jobs(&self) -> usize {
        self.queue.len()
    }

    /// Number of tasks running.
    pub fn running_tasks(&self) -> usize {
        self.running.tasks.len()
    }

    /// Queued jobs in the order the next pass considers them.
    pub fn queue_order(&self) -> impl Iterator<Item = u64> + '_ {
        self.queue.iter().map(|(k, _)| k.seq)
    }

    /// The reservation the last pass made, as (job, shadow time): the job
    /// will start by then if every task ends by its walltime.
    pub fn reservation(&self) -> Option<(u64, Millis)> {
        self.reservation
    }

    /// The multifactor priority of a job as last computed (0 under other
    /// policies, or for a job not queued since it was submitted).
    pub fn priority(&self, seq: u64) -> Option<u64> {
        self.jobs.get(&seq).map(|j| j.priority)
    }

    /// A job's priority factors now (what Slurm's `sprio` shows).
    pub fn priority_factors(&self, seq: u64) -> Option<PriorityFactors> {
        let job = self.jobs.get(&seq)?;
        Some(self.factors_of(job))
    }

    /// A user's decayed usage in core-seconds at the latest time seen.
    pub fn usage(&self, user: u32) -> f64 {
        self.fair_share.usage(user, self.now)
    }

    /// Every user's decayed usage in core-seconds at `now` (or the latest
    /// time seen, if later), by uid: what a restarted server gives back with
    /// [`Core::restore_usage`].
    pub fn usages(&self, now: Millis) -> Vec<(u32, f64)> {
        self.fair_share.usages(now.max(self.now))
    }

    /// Gives `user` back `core_seconds` of usage as of the latest time seen
    /// (after a restart of the server, decayed over the time it was away).
    pub fn restore_usage(&mut self, user: u32, core_seconds: f64) {
        self.fair_share.restore_usage(user, core_seconds, self.now);
    }

    fn factors_of(&self, job: &Job) -> PriorityFactors {
        job.factors(&self.config, &self.fair_share, self.cluster_cores, self.now)
    }

    /// Puts `seq` into the queue or takes it out, as its state says.
    fn update_queue(&mut self, seq: u64) {
        self.update_queue_aged(seq, false);
    }

    /// [`Core::update_queue`]; `keep_age`: a job that enters the queue
    /// keeps the age it had and the priority it was last given (a task
    /// queued again after its node was lost does not go to the back, nor
    /// behind the jobs its own usage since then would put it after, until
    /// priorities are next recomputed for every queued job alike).
    fn update_queue_aged(&mut self, seq: u64, keep_age: bool) {
        let Core { jobs, queue, config, fair_share, cluster_cores, now, .. } = self;
        let Some(job) = jobs.get_mut(&seq) else { return };
        match (job.is_eligible(), job.queued) {
            (true, None) => {
                if !keep_age {
                    job.eligible_since = *now;
                }
                if config.policy == Policy::Multifactor && !keep_age {
                    job.priority =
                        job.factors(config, fair_share, *cluster_cores, *now).priority(&config.weights);
                }
                let key = QueueKey { rank: job.rank(config), arrival: job.arrival, seq };
                job.queued = Some(key);
                queue.insert(key, QueueEntry { cores: job.task_cores(), walltime: job.walltime(config) });
            }
            (false, Some(key)) => {
                queue.remove(&key);
                job.queued = None;
            }
            _ => {}
        }
    }

    /// Recomputes every queued job's priority and reorders the queue.
    fn recompute_priorities(&mut self) {
        self.last_recompute = self.now;
        self.fair_share.accrue_all(self.now);
        let seqs: Vec<u64> = self.queue.iter().map(|(k, _)| k.seq).collect();
        for seq in seqs {
            let priority = self.factors_of(&self.jobs[&seq]).priority(&self.config.weights);
            self.jobs.get_mut(&seq).expect("queued job exists").priority = priority;
        }
        let (jobs, config) = (&mut self.jobs, &self.config);
        self.queue.rebuild(|old| {
            let job = jobs.get_mut(&old.seq).expect("queued job exists");
            let key = QueueKey { rank: job.rank(config), arrival: job.arrival, seq: old.seq };
            job.queued = Some(key);
            key
        });
    }

    fn set_held(&mut self, seq: u64, held: bool) {
        if let Some(job) = self.jobs.get_mut(&seq) {
            job.held = held;
            self.update_queue(seq);
        }
    }

    fn submit(&mut self, seq: u64, request: Request, out: &mut Vec<Decision>) {
        let held = request.hold;
        self.add_job(seq, request, held, false, BTreeMap::new(), out);
    }

    fn add_job(
        &mut self,
        seq: u64,
        request: Request,
        held: bool,
        any_failed: bool,
        task_outcomes: BTreeMap<u32, bool>,
        out: &mut Vec<Decision>,
    ) {
        self.add_job_with(seq, request, held, any_failed, task_outcomes, (false, 0), out);
    }

    /// [`Core::add_job`], for a restored job too: `(nothing_to_start,
    /// extra)` as in [`RestoredJob`] (`extra`: its unconfirmed tasks).
    #[allow(clippy::too_many_arguments)]
    fn add_job_with(
        &mut self,
        seq: u64,
        request: Request,
        held: bool,
        any_failed: bool,
        task_outcomes: BTreeMap<u32, bool>,
        (nothing_to_start, extra): (bool, u64),
        out: &mut Vec<Decision>,
    ) {
        if self.jobs.contains_key(&seq) || self.finished.contains_key(&seq) {
            return; // a sequence number is used once
        }
        self.fair_share.add_user(request.user, self.now);
        let total = if nothing_to_start { 0 } else { request.array.as_ref().map_or(1, ArrayIndices::len) };
        let mut job = Job {
            requeued: BTreeSet::new(),
            unconfirmed: extra,
            extra,
            held,
            waiting_on: Vec::new(),
            cursor: 0,
            total,
            skipped: BTreeSet::new(),
            running: 0,
            ended: 0,
            any_failed,
            task_outcomes,
            eligible_since: self.now,
            priority: 0,
            queued: None,
            arrival: self.next_arrival,
            request,
        };
        self.next_arrival += 1;
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
        } else {
            self.update_queue(seq);
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
        if !self.jobs.contains_key(&seq) {
            return;
        }
        match target {
            JobRef::Task(_, i) => {
                let task = TaskId { seq, index: Some(i) };
                if let Some(running) = self.running.tasks.get(&task) {
                    let nodes = running.allocation.nodes.iter().map(|a| a.node).collect();
                    out.push(Decision::Kill { task, nodes });
                } else if self.unconfirmed.contains(&task) {
                    // Killed if an agent confirms it; else it ends as deleted.
                    out.push(Decision::Kill { task, nodes: Vec::new() });
                } else if self.jobs[&seq].requeued.contains(&Some(i)) {
                    self.jobs.get_mut(&seq).expect("present").requeued.remove(&Some(i));
                    self.update_queue(seq);
                    out.push(Decision::End { seq, index: Some(i), reason: EndReason::Cancelled });
                    self.tasks_ended(seq, 1, Some(i), false, out);
                } else if self.is_unstarted(seq, i) {
                    let job = self.jobs.get_mut(&seq).expect("present");
                    job.skipped.insert(i);
                    job.skip_cancelled();
                    self.update_queue(seq);
                    out.push(Decision::End { seq, index: Some(i), reason: EndReason::Cancelled });
                    self.tasks_ended(seq, 1, Some(i), false, out);
                }
            }
            JobRef::Job(_) | JobRef::Array(_) => {
                for (&task, running) in self.running.of_job(seq) {
                    let nodes = running.allocation.nodes.iter().map(|a| a.node).collect();
                    out.push(Decision::Kill { task, nodes });
                }
                let first = TaskId { seq, index: None };
                let last = TaskId { seq, index: Some(u32::MAX) };
                for &task in self.unconfirmed.range(first..=last) {
                    out.push(Decision::Kill { task, nodes: Vec::new() });
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
        job.requeued.clear();
        self.update_queue(seq);
        if remaining == 0 {
            return;
        }
        out.push(Decision::End { seq, index: None, reason });
        self.tasks_ended(seq, remaining, None, false, out);
    }

    fn node_joined(&mut self, node: NodeId, shape: NodeShape, out: &mut Vec<Decision>) {
        if let Some(old) = self.nodes.shape(node) {
            if self.draining.contains(&node) && *old == shape {
                // A draining node came back as it was: it takes tasks again.
                self.draining.remove(&node);
                self.table.set_usable(node, true);
                return;
            }
            // Anything else running there is gone with the old node.
            self.node_lost(node, out);
        }
        self.cluster_cores += u64::from(shape.cores());
        self.table.add(node, &shape);
        self.nodes.add_node(node, shape);
    }

    fn remove_node(&mut self, node: NodeId) {
        if let Some(shape) = self.nodes.shape(node) {
            self.cluster_cores -= u64::from(shape.cores());
        }
        self.nodes.remove_node(node);
        self.table.remove(node);
        self.draining.remove(&node);
    }

    fn node_left(&mut self, node: NodeId) {
        if self.nodes.shape(node).is_none() {
            return;
        }
        self.draining.insert(node);
        self.table.set_usable(node, false);
        self.remove_if_drained(node);
    }

    /// Removes a draining node once nothing runs on it.
    fn remove_if_drained(&mut self, node: NodeId) {
        if !self.draining.contains(&node) {
            return;
        }
        let idle = match (self.nodes.shape(node), self.nodes.node_free(node)) {
            (Some(shape), Some((cores, mem, _))) => cores == shape.cores() && mem == shape.memory(),
            _ => true,
        };
        if idle {
            self.remove_node(node);
        }
    }

    fn node_lost(&mut self, node: NodeId, out: &mut Vec<Decision>) {
        let lost: Vec<TaskId> = self
            .running
            .tasks
            .iter()
            .filter(|(_, r)| r.allocation.nodes.iter().any(|a| a.node == node))
            .map(|(&task, _)| task)
            .collect();
        self.remove_node(node);
        for task in lost {
            // Whatever it held on other nodes is free again.
            self.stop_task(task);
            out.push(Decision::End { seq: task.seq, index: task.index, reason: EndReason::NodeLost });
            self.tasks_ended(task.seq, 1, task.index, false, out);
        }
    }

    /// Takes a task out of the running set and returns its resources (or
    /// out of the unconfirmed ones).
    fn stop_task(&mut self, task: TaskId) -> bool {
        if self.unconfirmed.remove(&task) {
            if let Some(job) = self.jobs.get_mut(&task.seq) {
                job.unconfirmed -= 1;
            }
            return true;
        }
        let Some(running) = self.running.remove(&task) else { return false };
        self.nodes.release(&running.allocation);
        self.table.give_back(task, running.expected_end, &running.allocation);
        self.fair_share.change_running(running.user, -(running.cores as i64), self.now);
        if let Some(job) = self.jobs.get_mut(&task.seq) {
            job.running -= 1;
        }
        for a in &running.allocation.nodes {
            self.remove_if_drained(a.node);
        }
        true
    }

    /// [`Event::Requeue`].
    fn requeue(&mut self, task: TaskId) {
        if !self.stop_task(task) {
            return;
        }
        if let Some(job) = self.jobs.get_mut(&task.seq) {
            job.requeued.insert(task.index);
        }
        self.update_queue_aged(task.seq, true);
    }

    /// [`Event::Adopt`]; the error says why a task is not adopted.
    fn adopt(&mut self, node: NodeId, adopted: Adopted) -> Result<(), String> {
        let task = adopted.task;
        if !self.adoptable(task) {
            return Err("neither unconfirmed nor waiting to start".into());
        }
        let mem = self.jobs.get(&task.seq).map_or(0, |j| j.request.resources.mem);
        let allocation = self
            .nodes
            .allocation_of(node, &adopted.pus, mem, &adopted.gpus)
            .ok_or_else(|| format!("node {} or its PUs {:?} are unknown", node.0, adopted.pus))?;
        self.nodes.take(&allocation)?;
        let job = self.jobs.get_mut(&task.seq).expect("adoptable tasks have a job");
        if self.unconfirmed.remove(&task) {
            job.unconfirmed -= 1;
        } else if job.requeued.remove(&task.index) {
            // Started again where it ran.
        } else if let Some(i) = task.index {
            let array = job.request.array.as_ref().expect("an array task");
            if position_of(array, i) == job.cursor {
                job.advance();
            } else {
                // Out of order: passed over like a cancelled task, but it
                // runs rather than ended.
                job.skipped.insert(i);
            }
        } else {
            job.advance();
        }
        let cores: u64 = allocation.nodes.iter().map(|a| a.cores.len() as u64).sum();
        let expected_end = self.now.saturating_add(job.walltime(&self.config));
        job.running += 1;
        let user = job.request.user;
        self.fair_share.change_running(user, cores as i64, self.now);
        self.table.take(task, expected_end, &allocation);
        self.running.insert(task, RunningTask { allocation, user, cores, expected_end });
        self.update_queue(task.seq);
        Ok(())
    }

    fn task_finished(&mut self, task: TaskId, success: bool, out: &mut Vec<Decision>) {
        if self.stop_task(task) {
            self.tasks_ended(task.seq, 1, task.index, success, out);
        }
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
        if let Some(key) = job.queued {
            self.queue.remove(&key);
        }
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
            } else {
                self.update_queue(dep);
            }
        }
        if still.is_empty() {
            self.dependents.remove(&seq);
        } else {
            self.dependents.insert(seq, still);
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
