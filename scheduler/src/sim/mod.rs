//! A trace simulator: replays a workload through the very same scheduling
//! [`Core`] the server runs, in virtual time.
//!
//! 1. [`Workload::from_swf`] turns a parsed [`swf`] trace into jobs for a
//!    cluster of identical nodes: a job of `P` processors is one chunk of `P`
//!    cores when `P` fits a node, else `ceil(P/C)` chunks of `C` cores; its
//!    walltime is the requested time, or its run time when the trace has none
//!    (counted in [`Workload::estimated_from_run`]).
//! 2. [`simulate`] joins the nodes at time 0, then feeds the core every event
//!    in time order: a submit at the job's submit time, a task's end at its
//!    start plus its run time (ends before submits at the same instant).
//! 3. It returns every job's start and end and the [`Metrics`]: utilization,
//!    waits, bounded slowdown, makespan and the number of events.
//!
//! Nothing here reads a clock: the caller measures wall time if it wants the
//! simulator's speed.

pub mod swf;

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use picloud_proto::TaskId;
use serde::Serialize;

use crate::core::{Core, CoreConfig, Decision, Event, Millis, NodeId, NodeShape, Request, ResourceRequest};
pub use swf::{SwfError, SwfJob, SwfProblem, parse_swf};

/// Bounded slowdown counts runs shorter than this as this long (10 s, the
/// usual threshold since Feitelson et al., "Theory and practice in parallel
/// job scheduling", JSSPP 1997).
pub const SLOWDOWN_BOUND: Millis = 10_000;

/// A cluster of identical nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Number of nodes.
    pub nodes: u32,
    /// Every node's hardware.
    pub shape: NodeShape,
}

impl Cluster {
    /// Total cores.
    pub fn cores(&self) -> u64 {
        u64::from(self.nodes) * u64::from(self.shape.cores())
    }
}

/// One job to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimJob {
    /// Job number in the trace.
    pub id: i64,
    /// Submit time.
    pub submit: Millis,
    /// How long it runs once started (capped at its walltime, where the real
    /// system would kill it).
    pub run: Millis,
    /// Requested walltime: what the scheduler plans with.
    pub walltime: Millis,
    /// What each task needs.
    pub resources: ResourceRequest,
    /// Submitting user.
    pub user: u32,
}

/// Jobs of a trace left out of the replay, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Run time unknown or not positive.
    pub no_run_time: u64,
    /// Processor count unknown or not positive.
    pub no_processors: u64,
    /// More processors than the cluster has.
    pub too_large: u64,
}

impl Skipped {
    /// All skipped jobs.
    pub fn total(&self) -> u64 {
        self.no_run_time + self.no_processors + self.too_large
    }
}

/// Jobs ready to replay on a given cluster.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    /// Jobs in trace order.
    pub jobs: Vec<SimJob>,
    /// Jobs left out.
    pub skipped: Skipped,
    /// Jobs without a requested time whose run time serves as the estimate.
    pub estimated_from_run: u64,
    /// Jobs that ran longer than they asked for, cut at their walltime.
    pub capped_at_walltime: u64,
}

/// Seconds (possibly fractional) to milliseconds.
fn ms(seconds: f64) -> Millis {
    (seconds * 1000.0).round() as Millis
}

impl Workload {
    /// Converts a trace for `cluster`; see the module documentation for the
    /// rules.
    pub fn from_swf(trace: &[SwfJob], cluster: &Cluster) -> Self {
        let per_node = u64::from(cluster.shape.cores().max(1));
        let mut w = Workload::default();
        for j in trace {
            let Some(procs) = j.processors() else {
                w.skipped.no_processors += 1;
                continue;
            };
            if j.run <= 0.0 || ms(j.run) == 0 {
                w.skipped.no_run_time += 1;
                continue;
            }
            if procs > cluster.cores() {
                w.skipped.too_large += 1;
                continue;
            }
            let resources = if procs <= per_node {
                ResourceRequest::cores(procs as u32)
            } else {
                ResourceRequest {
                    chunks: procs.div_ceil(per_node) as u32,
                    ..ResourceRequest::cores(per_node as u32)
                }
            };
            let mut run = ms(j.run);
            let walltime = if j.requested_time > 0.0 && ms(j.requested_time) > 0 {
                ms(j.requested_time)
            } else {
                w.estimated_from_run += 1;
                run
            };
            if run > walltime {
                w.capped_at_walltime += 1;
                run = walltime;
            }
            let user = u32::try_from(j.user).unwrap_or(0);
            w.jobs.push(SimJob { id: j.id, submit: ms(j.submit), run, walltime, resources, user });
        }
        w
    }
}

/// When one job ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobOutcome {
    /// Job number in the trace.
    pub id: i64,
    /// Submit time.
    pub submit: Millis,
    /// Start time.
    pub start: Millis,
    /// End time.
    pub end: Millis,
    /// Cores it held.
    pub cores: u64,
}

impl JobOutcome {
    /// Time queued.
    pub fn wait(&self) -> Millis {
        self.start - self.submit
    }

    /// Bounded slowdown: `max(1, (wait + run) / max(run, 10 s))`.
    pub fn bounded_slowdown(&self) -> f64 {
        let run = self.end - self.start;
        ((self.wait() + run) as f64 / run.max(SLOWDOWN_BOUND) as f64).max(1.0)
    }
}

/// Summary of a replay. Times in seconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// The policy replayed.
    pub policy: String,
    /// Jobs replayed.
    pub jobs: u64,
    /// Jobs of the trace left out.
    pub skipped: Skipped,
    /// Jobs whose run time served as their requested time.
    pub estimated_from_run: u64,
    /// Jobs cut at their requested time.
    pub capped_at_walltime: u64,
    /// Cores of the cluster.
    pub cores: u64,
    /// Busy core-seconds over cores × makespan.
    pub utilization: f64,
    /// Mean wait.
    pub mean_wait: f64,
    /// Longest wait.
    pub max_wait: f64,
    /// Mean bounded slowdown (10 s threshold).
    pub mean_bounded_slowdown: f64,
    /// From the first submit to the last end.
    pub makespan: f64,
    /// Events given to the core.
    pub events: u64,
    /// Jobs that never started (only when nodes cannot hold them).
    pub never_started: u64,
}

/// The result of a replay.
#[derive(Debug, Clone)]
pub struct SimResult {
    /// Every job that ran, in trace order.
    pub outcomes: Vec<JobOutcome>,
    /// The summary.
    pub metrics: Metrics,
}

/// What is due in virtual time. Ends sort before submits at the same time,
/// so that freed resources are seen by the submit's pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    End(TaskId),
    Submit(usize),
}

/// Replays `workload` on `cluster` under `config`. Jobs are numbered
/// (`seq`) in order of submission, not of the trace.
pub fn simulate(workload: &Workload, cluster: &Cluster, config: CoreConfig) -> SimResult {
    simulate_observed(workload, cluster, config, |_, _, _| {})
}

/// [`simulate`], calling `observe(core, now, decisions)` after every event
/// (tests check invariants and reservations with it).
pub fn simulate_observed(
    workload: &Workload,
    cluster: &Cluster,
    config: CoreConfig,
    mut observe: impl FnMut(&Core, Millis, &[Decision]),
) -> SimResult {
    let policy = config.policy.to_string();
    let mut core = Core::with_config(config);
    let mut decisions = Vec::new();
    let mut events = 0u64;
    for n in 0..cluster.nodes {
        core.apply(Event::NodeJoined { node: NodeId(n), shape: cluster.shape.clone() }, 0, &mut decisions);
        events += 1;
    }
    // Sequence numbers follow submission order, as in a live system: the
    // job submitted `k`th (ties in trace order) is `seq = k + 1`.
    let mut by_submit: Vec<usize> = (0..workload.jobs.len()).collect();
    by_submit.sort_by_key(|&i| (workload.jobs[i].submit, i));
    let mut due: BinaryHeap<Reverse<(Millis, Due)>> =
        by_submit.iter().map(|&i| Reverse((workload.jobs[i].submit, Due::Submit(i)))).collect();
    let mut seq_of = vec![0u64; workload.jobs.len()];
    for (k, &i) in by_submit.iter().enumerate() {
        seq_of[i] = k as u64 + 1;
    }
    let mut starts: Vec<Option<(Millis, u64)>> = vec![None; workload.jobs.len()];
    while let Some(Reverse((now, what))) = due.pop() {
        decisions.clear();
        let event = match what {
            Due::Submit(i) => {
                let j = &workload.jobs[i];
                let request = Request {
                    user: j.user,
                    resources: j.resources.clone(),
                    walltime: Some(j.walltime),
                    priority: 0,
                    array: None,
                    depend: Vec::new(),
                    hold: false,
                };
                Event::Submit { seq: seq_of[i], request }
            }
            Due::End(task) => Event::TaskFinished { task, success: true },
        };
        core.apply(event, now, &mut decisions);
        events += 1;
        for d in &decisions {
            if let Decision::Start { task, allocation } = d {
                let i = by_submit[(task.seq - 1) as usize];
                let cores = allocation.nodes.iter().map(|a| a.cores.len() as u64).sum();
                starts[i] = Some((now, cores));
                due.push(Reverse((now + workload.jobs[i].run, Due::End(*task))));
            }
        }
        observe(&core, now, &decisions);
    }
    let outcomes: Vec<JobOutcome> = workload
        .jobs
        .iter()
        .zip(&starts)
        .filter_map(|(j, s)| {
            s.map(|(start, cores)| JobOutcome {
                id: j.id,
                submit: j.submit,
                start,
                end: start + j.run,
                cores,
            })
        })
        .collect();
    let metrics = summarize(workload, cluster, &outcomes, policy, events);
    SimResult { outcomes, metrics }
}

fn summarize(
    workload: &Workload,
    cluster: &Cluster,
    outcomes: &[JobOutcome],
    policy: String,
    events: u64,
) -> Metrics {
    let n = outcomes.len() as f64;
    let first = outcomes.iter().map(|o| o.submit).min().unwrap_or(0);
    let last = outcomes.iter().map(|o| o.end).max().unwrap_or(0);
    let makespan = last.saturating_sub(first);
    let busy: f64 = outcomes.iter().map(|o| (o.end - o.start) as f64 * o.cores as f64).sum();
    let mean =
        |f: &dyn Fn(&JobOutcome) -> f64| if n == 0.0 { 0.0 } else { outcomes.iter().map(f).sum::<f64>() / n };
    Metrics {
        policy,
        jobs: outcomes.len() as u64,
        skipped: workload.skipped,
        estimated_from_run: workload.estimated_from_run,
        capped_at_walltime: workload.capped_at_walltime,
        cores: cluster.cores(),
        utilization: if makespan == 0 { 0.0 } else { busy / (cluster.cores() as f64 * makespan as f64) },
        mean_wait: mean(&|o| o.wait() as f64) / 1000.0,
        max_wait: outcomes.iter().map(|o| o.wait()).max().unwrap_or(0) as f64 / 1000.0,
        mean_bounded_slowdown: mean(&|o| o.bounded_slowdown()),
        makespan: makespan as f64 / 1000.0,
        events,
        never_started: (workload.jobs.len() - outcomes.len()) as u64,
    }
}

#[cfg(test)]
mod tests;
