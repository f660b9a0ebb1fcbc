//! The scheduling pass: starts what may start, in queue order.
//!
//! Under [`Policy::Fcfs`] the pass stops at the first task that does not fit.
//! Under every other policy it is EASY backfilling (see [`super::backfill`]):
//!
//! 1. Walk the queue; start each job's tasks while they fit.
//! 2. The first job that does not fit gets the reservation (a job that the
//!    usable nodes could never hold is passed over).
//! 3. Every later job (up to [`CoreConfig::backfill_depth`] of them) may
//!    start tasks that fit now and either end by the shadow time or stay out
//!    of the reservation.
//!
//! The pass stops early when no usable core is free. A task is passed over
//! without trying to place it when it needs more cores than are free (or, past
//! the shadow time, than are free outside the reservation), or when a request
//! no larger failed earlier in the same pass.

use super::backfill::Reservation;
use super::queue::QueueKey;
use super::{Allocation, Core, Decision, ResourceRequest, RunningTask, TaskId};
#[cfg(doc)]
use super::{CoreConfig, Policy};

impl Core {
    /// Cores free on nodes that take new tasks.
    fn usable_free_cores(&self) -> u64 {
        let draining: u64 =
            self.draining.iter().filter_map(|&n| self.nodes.node_free(n)).map(|(c, _, _)| u64::from(c)).sum();
        self.nodes.free_cores() - draining
    }

    /// Starts what may start now.
    pub(super) fn schedule(&mut self, out: &mut Vec<Decision>) {
        self.reservation = None;
        let mut free = self.usable_free_cores();
        if free == 0 || self.queue.len() == 0 {
            return;
        }
        let now = self.now;
        let strict = !self.config.policy.backfills();
        let depth = self.config.backfill_depth;
        let Core { queue, jobs, nodes, table, draining, running, fair_share, .. } = self;
        let mut dispatched: Vec<QueueKey> = Vec::new();
        let mut window: Option<Window> = None;
        let mut failed = Failures::default();
        let mut examined_after_reservation = 0usize;
        'queue: for (key, entry) in queue.iter() {
            if free == 0 {
                break;
            }
            if window.is_some() {
                examined_after_reservation += 1;
                if examined_after_reservation > depth {
                    break;
                }
            }
            // A task that runs past the shadow time must stay out of the
            // reservation. (The window only appears between jobs.)
            let long =
                window.as_ref().is_some_and(|w| now.saturating_add(entry.walltime) > w.reservation.shadow);
            // Pass over a job too large for what is left without looking it up.
            if entry.cores > free || long && window.as_ref().is_some_and(|w| entry.cores > w.long_free) {
                if strict {
                    break;
                }
                if window.is_some() {
                    continue;
                }
            }
            let seq = key.seq;
            let job = jobs.get_mut(&seq).expect("queued job exists");
            while let Some(index) = job.next_task() {
                let req = &job.request.resources;
                let hopeless = entry.cores > free
                    || long && window.as_ref().is_some_and(|w| entry.cores > w.long_free)
                    || failed.dominate(req, long);
                let allocation = match &mut window {
                    _ if hopeless => None,
                    Some(w) if long => {
                        let r = &w.reservation;
                        let a = nodes.allocate_with(req, |n| !draining.contains(&n) && r.admits(n, req));
                        if let Some(a) = &a {
                            w.reservation.consume(a);
                        }
                        a
                    }
                    _ => nodes.allocate_with(req, |n| !draining.contains(&n)),
                };
                let Some(allocation) = allocation else {
                    if !hopeless {
                        failed.record(req, long);
                    }
                    if strict {
                        break 'queue;
                    }
                    if window.is_none() {
                        window = Reservation::plan(seq, req, now, table)
                            .map(|(reservation, long_free)| Window { reservation, long_free });
                    }
                    continue 'queue;
                };
                if let Some(w) = &mut window {
                    w.started(&allocation, long);
                }
                let task = TaskId { seq, index };
                let expected_end = now.saturating_add(entry.walltime);
                table.take(task, expected_end, &allocation);
                let cores: u64 = allocation.nodes.iter().map(|a| a.cores.len() as u64).sum();
                free = free.saturating_sub(cores);
                job.advance();
                job.running += 1;
                fair_share.change_running(job.request.user, cores as i64, now);
                running.insert(
                    task,
                    RunningTask {
                        allocation: allocation.clone(),
                        user: job.request.user,
                        cores,
                        expected_end,
                    },
                );
                out.push(Decision::Start { task, allocation });
                if free == 0 {
                    break;
                }
            }
            if job.next_task().is_none() {
                dispatched.push(*key);
            }
        }
        for key in dispatched {
            queue.remove(&key);
            if let Some(job) = jobs.get_mut(&key.seq) {
                job.queued = None;
            }
        }
        self.reservation = window.map(|w| (w.reservation.seq, w.reservation.shadow));
    }
}

/// The reservation of a pass and what is left around it.
struct Window {
    reservation: Reservation,
    /// At least the cores a task running past the shadow time can still get
    /// (free on non-reserved nodes, plus the extra of reserved ones), so that
    /// larger tasks are passed over without trying to place them.
    long_free: u64,
}

impl Window {
    /// Accounts for a task just started.
    fn started(&mut self, allocation: &Allocation, long: bool) {
        let taken: u64 = allocation
            .nodes
            .iter()
            // A short task on a reserved node may not lower what long tasks
            // can get there (the extra may be smaller than the free cores).
            .filter(|a| long || !self.reservation.is_reserved(a.node))
            .map(|a| a.cores.len() as u64)
            .sum();
        self.long_free = self.long_free.saturating_sub(taken);
    }
}

/// Requests that did not fit in this pass. Resources only shrink during a
/// pass, so a request at least as large as one of them cannot fit either.
#[derive(Default)]
struct Failures {
    /// Failed on any usable node.
    anywhere: Vec<ResourceRequest>,
    /// Failed outside the reservation (tasks running past the shadow time).
    around_reservation: Vec<ResourceRequest>,
}

/// Most failed requests remembered per kind; a pass with more distinct
/// shapes than this only loses the shortcut.
const MAX_FAILURES: usize = 16;

impl Failures {
    fn dominate(&self, req: &ResourceRequest, long: bool) -> bool {
        let covers = |f: &ResourceRequest| {
            f.placement == req.placement
                && f.chunks <= req.chunks
                && f.cores <= req.cores
                && f.mem <= req.mem
                && f.gpus <= req.gpus
        };
        self.anywhere.iter().any(covers) || long && self.around_reservation.iter().any(covers)
    }

    fn record(&mut self, req: &ResourceRequest, long: bool) {
        let list = if long { &mut self.around_reservation } else { &mut self.anywhere };
        if list.len() < MAX_FAILURES {
            list.push(req.clone());
        }
    }
}
