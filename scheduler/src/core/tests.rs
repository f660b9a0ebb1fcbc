//! Tests of the core through its public event interface. Every event goes
//! through [`run_at`], which checks every invariant after it.

use proptest::prelude::*;

use super::policy::{DAY, HOUR};
use super::*;

fn req(ncpus: u32) -> Request {
    Request {
        user: 0,
        resources: ResourceRequest::cores(ncpus),
        walltime: None,
        priority: 0,
        array: None,
        depend: Vec::new(),
        hold: false,
    }
}

fn fcfs() -> Core {
    Core::with_config(CoreConfig::with_policy(Policy::Fcfs))
}

fn node(core: &mut Core, id: u32, ncores: u32) {
    let shape = NodeShape::simple(ncores, 1 << 30);
    run(core, Event::NodeJoined { node: NodeId(id), shape });
}

/// Applies `e` at time 0 (or the latest time seen) and checks every invariant.
fn run(core: &mut Core, e: Event) -> Vec<Decision> {
    run_at(core, 0, e)
}

/// Applies `e` at `now` and checks every invariant.
fn run_at(core: &mut Core, now: Millis, e: Event) -> Vec<Decision> {
    let mut out = Vec::new();
    core.apply(e, now, &mut out);
    core.sanity_check();
    out
}

fn started(d: &[Decision]) -> Vec<TaskId> {
    d.iter()
        .filter_map(|d| match d {
            Decision::Start { task, .. } => Some(*task),
            _ => None,
        })
        .collect()
}

fn job(seq: u64) -> TaskId {
    TaskId { seq, index: None }
}

#[test]
fn fifo_first_fit_and_release() {
    let mut c = fcfs();
    node(&mut c, 0, 2);
    assert_eq!(started(&run(&mut c, Event::Submit { seq: 1, request: req(1) })), vec![job(1)]);
    assert_eq!(started(&run(&mut c, Event::Submit { seq: 2, request: req(2) })), vec![]);
    // Job 3 fits, but strict FIFO keeps it behind job 2.
    assert_eq!(started(&run(&mut c, Event::Submit { seq: 3, request: req(1) })), vec![]);
    let d = run(&mut c, Event::TaskFinished { task: job(1), success: true });
    assert_eq!(started(&d), vec![job(2)]);
    let d = run(&mut c, Event::TaskFinished { task: job(2), success: true });
    assert_eq!(started(&d), vec![job(3)]);
    assert_eq!(c.phase(1), Phase::Done);
}

#[test]
fn pins_to_distinct_cores() {
    let mut c = Core::new();
    node(&mut c, 0, 4);
    let d = run(
        &mut c,
        Event::Submit {
            seq: 1,
            request: Request { array: Some(ArrayIndices::parse("1-4").unwrap()), ..req(1) },
        },
    );
    let mut cpus: Vec<u32> = d
        .iter()
        .flat_map(|d| match d {
            Decision::Start { allocation, .. } => allocation.nodes[0].pus.clone(),
            _ => vec![],
        })
        .collect();
    cpus.sort();
    assert_eq!(cpus, vec![0, 1, 2, 3]);
    assert_eq!(c.free_cores(), 0);
}

#[test]
fn array_runs_every_index_once() {
    let mut c = Core::new();
    node(&mut c, 0, 2);
    let array = ArrayIndices::parse("1-9:2,20").unwrap();
    let mut pending =
        started(&run(&mut c, Event::Submit { seq: 5, request: Request { array: Some(array), ..req(1) } }));
    let mut seen = Vec::new();
    while let Some(t) = pending.pop() {
        seen.push(t.index.unwrap());
        pending.extend(started(&run(&mut c, Event::TaskFinished { task: t, success: true })));
    }
    seen.sort();
    assert_eq!(seen, vec![1, 3, 5, 7, 9, 20]);
    assert_eq!(c.phase(5), Phase::Done);
}

#[test]
fn afterok_chain_runs_in_order_and_failure_ends_dependents() {
    let mut c = Core::new();
    node(&mut c, 0, 4);
    run(&mut c, Event::Submit { seq: 1, request: req(1) });
    let dep = |kind, on| Request { depend: vec![(kind, JobRef::Job(on))], ..req(1) };
    assert!(started(&run(&mut c, Event::Submit { seq: 2, request: dep(DependKind::AfterOk, 1) })).is_empty());
    assert!(started(&run(&mut c, Event::Submit { seq: 3, request: dep(DependKind::AfterOk, 2) })).is_empty());
    assert_eq!(c.phase(2), Phase::WaitingDependencies);
    let d = run(&mut c, Event::TaskFinished { task: job(1), success: true });
    assert_eq!(started(&d), vec![job(2)]);
    let d = run(&mut c, Event::TaskFinished { task: job(2), success: false });
    assert!(started(&d).is_empty());
    assert!(
        d.iter().any(|d| matches!(
            d,
            Decision::End { seq: 3, reason: EndReason::DependencyNeverSatisfied(_), .. }
        ))
    );
    assert_eq!(c.phase(3), Phase::Done);
}

#[test]
fn afternotok_runs_only_after_failure() {
    let mut c = Core::new();
    node(&mut c, 0, 4);
    run(&mut c, Event::Submit { seq: 1, request: req(1) });
    run(
        &mut c,
        Event::Submit {
            seq: 2,
            request: Request { depend: vec![(DependKind::AfterNotOk, JobRef::Job(1))], ..req(1) },
        },
    );
    let d = run(&mut c, Event::TaskFinished { task: job(1), success: false });
    assert_eq!(started(&d), vec![job(2)]);
    // On an already finished successful job, afternotok can never be met.
    run(&mut c, Event::Submit { seq: 3, request: req(1) });
    run(&mut c, Event::TaskFinished { task: job(3), success: true });
    let d = run(
        &mut c,
        Event::Submit {
            seq: 4,
            request: Request { depend: vec![(DependKind::AfterNotOk, JobRef::Job(3))], ..req(1) },
        },
    );
    assert!(d.iter().any(|d| matches!(d, Decision::End { seq: 4, .. })));
}

#[test]
fn cancel_queued_and_running() {
    let mut c = Core::new();
    node(&mut c, 0, 1);
    run(&mut c, Event::Submit { seq: 1, request: req(1) });
    run(&mut c, Event::Submit { seq: 2, request: req(1) });
    let d = run(&mut c, Event::Cancel(JobRef::Job(2)));
    assert_eq!(d, vec![Decision::End { seq: 2, index: None, reason: EndReason::Cancelled }]);
    let d = run(&mut c, Event::Cancel(JobRef::Job(1)));
    assert_eq!(d, vec![Decision::Kill { task: job(1), nodes: vec![NodeId(0)] }]);
    run(&mut c, Event::TaskFinished { task: job(1), success: false });
    assert_eq!(c.phase(1), Phase::Done);
    assert_eq!(c.free_cores(), 1);
}

#[test]
fn cancel_one_array_task_skips_it() {
    let mut c = Core::new();
    node(&mut c, 0, 1);
    let mut pending = started(&run(
        &mut c,
        Event::Submit {
            seq: 1,
            request: Request { array: Some(ArrayIndices::parse("1-3").unwrap()), ..req(1) },
        },
    ));
    assert!(c.is_unstarted(1, 2));
    run(&mut c, Event::Cancel(JobRef::Task(1, 2)));
    assert!(!c.is_unstarted(1, 2));
    let mut seen = Vec::new();
    while let Some(t) = pending.pop() {
        seen.push(t.index.unwrap());
        pending.extend(started(&run(&mut c, Event::TaskFinished { task: t, success: true })));
    }
    assert_eq!(seen, vec![1, 3]);
    assert_eq!(c.phase(1), Phase::Done);
}

#[test]
fn hold_and_release() {
    let mut c = Core::new();
    node(&mut c, 0, 1);
    assert!(
        started(&run(&mut c, Event::Submit { seq: 1, request: Request { hold: true, ..req(1) } })).is_empty()
    );
    assert_eq!(c.phase(1), Phase::Held);
    assert_eq!(started(&run(&mut c, Event::Release(JobRef::Job(1)))), vec![job(1)]);
}

#[test]
fn node_loss_ends_its_tasks() {
    let mut c = Core::new();
    node(&mut c, 0, 1);
    node(&mut c, 1, 1);
    run(&mut c, Event::Submit { seq: 1, request: req(1) });
    run(&mut c, Event::Submit { seq: 2, request: req(1) });
    let d = run(&mut c, Event::NodeLost(NodeId(0)));
    assert!(d.iter().any(|d| matches!(d, Decision::End { seq: 1, reason: EndReason::NodeLost, .. })));
    assert_eq!(c.phase(1), Phase::Done);
    assert_eq!(c.free_cores(), 0);
}

#[test]
fn requests_no_node_can_hold_are_refused() {
    let mut c = Core::new();
    assert!(c.check_fits(&req(64)).is_ok(), "no nodes yet: accept");
    node(&mut c, 0, 2);
    let err = c.check_fits(&req(3)).unwrap_err();
    assert!(err.contains("largest node has 2 cores"), "{err}");
    let mut big = req(1);
    big.resources.mem = 1 << 40;
    assert!(c.check_fits(&big).is_err());
}

fn with(policy: Policy) -> Core {
    Core::with_config(CoreConfig::with_policy(policy))
}

fn timed(ncpus: u32, walltime_s: u64) -> Request {
    Request { walltime: Some(walltime_s * 1000), ..req(ncpus) }
}

fn of_user(user: u32, request: Request) -> Request {
    Request { user, ..request }
}

#[test]
fn default_policy_backfills_where_fcfs_waits() {
    // The same events as `fifo_first_fit_and_release`: under the default
    // policy job 3 ends (default walltime) no later than job 2's reservation.
    let mut c = Core::new();
    assert_eq!(c.config().policy, Policy::Multifactor);
    node(&mut c, 0, 2);
    assert_eq!(started(&run(&mut c, Event::Submit { seq: 1, request: req(1) })), vec![job(1)]);
    assert_eq!(started(&run(&mut c, Event::Submit { seq: 2, request: req(2) })), vec![]);
    assert_eq!(c.reservation(), Some((2, HOUR)));
    assert_eq!(started(&run(&mut c, Event::Submit { seq: 3, request: req(1) })), vec![job(3)]);
    // A job asking for more than the default walltime may not.
    assert_eq!(started(&run(&mut c, Event::Submit { seq: 4, request: timed(1, 7200) })), vec![]);
}

#[test]
fn easy_backfill_respects_the_reservation_on_one_node() {
    let mut c = with(Policy::Easy);
    node(&mut c, 0, 4);
    run_at(&mut c, 0, Event::Submit { seq: 1, request: timed(2, 100) });
    // Needs the whole node: shadow at 100 s, extra 0.
    assert!(started(&run_at(&mut c, 1000, Event::Submit { seq: 2, request: timed(4, 10) })).is_empty());
    assert_eq!(c.reservation(), Some((2, 100_000)));
    // Ends at 51 s: before the shadow time.
    assert_eq!(started(&run_at(&mut c, 1000, Event::Submit { seq: 3, request: timed(1, 50) })), vec![job(3)]);
    // Ends at 101 s: would delay job 2.
    assert!(started(&run_at(&mut c, 1000, Event::Submit { seq: 4, request: timed(1, 100) })).is_empty());
    let d = run_at(&mut c, 51_000, Event::TaskFinished { task: job(3), success: true });
    assert!(started(&d).is_empty(), "job 4 still may not start");
    let d = run_at(&mut c, 100_000, Event::TaskFinished { task: job(1), success: true });
    assert_eq!(started(&d), vec![job(2)]);
    let d = run_at(&mut c, 110_000, Event::TaskFinished { task: job(2), success: true });
    assert_eq!(started(&d), vec![job(4)]);
}

#[test]
fn an_overdue_task_counts_as_ending_now() {
    // Job 1 should have ended at 10 s; at 50 s it still runs. The
    // reservation is "now", so only what fits beside it may start.
    let mut c = with(Policy::Easy);
    node(&mut c, 0, 2);
    run_at(&mut c, 0, Event::Submit { seq: 1, request: timed(1, 10) });
    run_at(&mut c, 50_000, Event::Submit { seq: 2, request: timed(2, 10) });
    assert_eq!(c.reservation(), Some((2, 50_000)));
    assert!(started(&run_at(&mut c, 50_000, Event::Submit { seq: 3, request: timed(1, 1) })).is_empty());
}

#[test]
fn a_job_the_usable_nodes_cannot_hold_gets_no_reservation() {
    let mut c = with(Policy::Easy);
    node(&mut c, 0, 1);
    node(&mut c, 1, 1);
    run(&mut c, Event::Submit { seq: 1, request: timed(1, 100) });
    run(&mut c, Event::NodeLeft(NodeId(1)));
    // Node 0 runs job 1, node 1 drains: two chunks can never fit now.
    let wide =
        Request { resources: ResourceRequest { chunks: 2, ..ResourceRequest::cores(1) }, ..timed(1, 10) };
    assert!(started(&run(&mut c, Event::Submit { seq: 2, request: wide })).is_empty());
    assert_eq!(c.reservation(), None);
    assert_eq!(c.free_cores(), 0, "node 1 was idle and is gone");
}

#[test]
fn ties_go_to_the_job_that_arrived_first_not_to_the_lower_number() {
    let mut c = fcfs();
    node(&mut c, 0, 1);
    run(&mut c, Event::Submit { seq: 1, request: req(1) });
    run(&mut c, Event::Submit { seq: 9, request: req(1) });
    // A number reserved before job 9 was submitted, used after it.
    run(&mut c, Event::Submit { seq: 4, request: req(1) });
    assert_eq!(c.queue_order().collect::<Vec<_>>(), vec![9, 4]);
    let d = run(&mut c, Event::TaskFinished { task: job(1), success: true });
    assert_eq!(started(&d), vec![job(9)]);
}

#[test]
fn sjf_orders_the_queue_by_walltime() {
    let mut c = with(Policy::SjfEasy);
    node(&mut c, 0, 1);
    run(&mut c, Event::Submit { seq: 1, request: timed(1, 10) });
    run(&mut c, Event::Submit { seq: 2, request: timed(1, 100) });
    run(&mut c, Event::Submit { seq: 3, request: timed(1, 5) });
    run(&mut c, Event::Submit { seq: 4, request: req(1) }); // default: an hour
    run(&mut c, Event::Submit { seq: 5, request: timed(1, 5) });
    assert_eq!(c.queue_order().collect::<Vec<_>>(), vec![3, 5, 2, 4]);
    let d = run(&mut c, Event::TaskFinished { task: job(1), success: true });
    assert_eq!(started(&d), vec![job(3)]);
}

/// Multifactor with only the given weights.
fn weighted(fair_share: u32, age: u32, job_size: u32, explicit: u32) -> Core {
    Core::with_config(CoreConfig {
        weights: PriorityWeights { fair_share, age, job_size, explicit },
        ..CoreConfig::default()
    })
}

#[test]
fn fair_share_puts_the_user_with_less_usage_first() {
    let mut c = weighted(1000, 0, 0, 0);
    node(&mut c, 0, 1);
    run_at(&mut c, 0, Event::Submit { seq: 1, request: of_user(1, req(1)) });
    run_at(&mut c, 10_000, Event::Submit { seq: 2, request: of_user(1, req(1)) });
    run_at(&mut c, 10_000, Event::Submit { seq: 3, request: of_user(2, req(1)) });
    // User 1 used 10 core-seconds, user 2 nothing.
    let f2 = c.priority_factors(2).unwrap().fair_share;
    let f3 = c.priority_factors(3).unwrap().fair_share;
    assert_eq!(f3, 1.0);
    assert!((f2 - 0.25).abs() < 1e-9, "all usage against a half share: 2^-2, got {f2}");
    assert_eq!(c.queue_order().collect::<Vec<_>>(), vec![3, 2]);
    assert_eq!(c.priority(3), Some(1000));
    let d = run_at(&mut c, 20_000, Event::TaskFinished { task: job(1), success: true });
    assert_eq!(started(&d), vec![job(3)]);
}

#[test]
fn a_task_queued_again_keeps_its_place_before_its_users_later_jobs() {
    let mut c = weighted(1000, 0, 0, 0);
    node(&mut c, 0, 1);
    run_at(&mut c, 0, Event::Submit { seq: 1, request: of_user(1, req(1)) });
    run_at(&mut c, 0, Event::Submit { seq: 2, request: of_user(1, req(1)) });
    // Job 1 runs for 10 s, then is queued again (as when the agent that ran
    // it went away). Its user's usage since would lower a fresh priority of
    // either job alike; job 2's stays as computed until the next recompute,
    // and so does job 1's, which starts again first.
    let d = run_at(&mut c, 10_000, Event::Requeue(job(1)));
    assert_eq!(started(&d), vec![job(1)]);
    assert_eq!(c.queue_order().collect::<Vec<_>>(), vec![2]);
}

#[test]
fn usage_decays_with_the_half_life() {
    let mut c = Core::with_config(CoreConfig { usage_half_life: 1000 * 1000, ..CoreConfig::default() });
    node(&mut c, 0, 2);
    run_at(&mut c, 0, Event::Submit { seq: 1, request: of_user(5, req(2)) });
    run_at(&mut c, 10_000, Event::TaskFinished { task: job(1), success: true });
    let used = c.usage(5);
    // 2 cores for 10 s, decaying a little meanwhile.
    assert!(used > 19.8 && used < 20.0, "{used}");
    run_at(&mut c, 1_010_000, Event::Tick);
    assert!((c.usage(5) - used / 2.0).abs() < 1e-9);
    run_at(&mut c, 2_010_000, Event::Tick);
    assert!((c.usage(5) - used / 4.0).abs() < 1e-9);
}

#[test]
fn explicit_priority_and_size_order_the_queue() {
    let mut c = weighted(0, 0, 0, 1000);
    node(&mut c, 0, 1);
    run(&mut c, Event::Submit { seq: 1, request: req(1) });
    run(&mut c, Event::Submit { seq: 2, request: Request { priority: -100, ..req(1) } });
    run(&mut c, Event::Submit { seq: 3, request: Request { priority: 500, ..req(1) } });
    run(&mut c, Event::Submit { seq: 4, request: req(1) });
    assert_eq!(c.queue_order().collect::<Vec<_>>(), vec![3, 4, 2]);

    let mut c = weighted(0, 0, 1000, 0);
    node(&mut c, 0, 4);
    run(&mut c, Event::Submit { seq: 1, request: req(4) });
    run(&mut c, Event::Submit { seq: 2, request: timed(4, 3600) });
    run(&mut c, Event::Submit { seq: 3, request: timed(1, 3600) });
    run(&mut c, Event::Submit { seq: 4, request: timed(1, 60) });
    assert_eq!(c.queue_order().collect::<Vec<_>>(), vec![4, 3, 2]);
    let f = c.priority_factors(2).unwrap();
    assert!((f.job_size - 0.5 * (1.0 - 1.0 / 24.0)).abs() < 1e-12, "whole cluster, an hour: {f:?}");
}

#[test]
fn age_grows_and_priorities_are_recomputed_on_tick() {
    let config = CoreConfig {
        weights: PriorityWeights { fair_share: 0, age: 2000, job_size: 0, explicit: 1000 },
        recompute_interval: 365 * DAY,
        ..CoreConfig::default()
    };
    let max_age = config.max_age;
    let mut c = Core::with_config(config);
    node(&mut c, 0, 1);
    run_at(&mut c, 0, Event::Submit { seq: 1, request: req(1) });
    run_at(&mut c, 0, Event::Submit { seq: 2, request: Request { priority: -1024, ..req(1) } });
    run_at(&mut c, max_age / 4 * 3, Event::Submit { seq: 3, request: Request { priority: 1023, ..req(1) } });
    // At submission job 3 beats job 2, whose age has not been recomputed.
    assert_eq!(c.queue_order().collect::<Vec<_>>(), vec![3, 2]);
    assert_eq!((c.priority(2), c.priority(3)), (Some(0), Some(1000)));
    run_at(&mut c, max_age, Event::Tick);
    // Job 2: age 1 → 2000; job 3: age 1/4 → 500 + 1000.
    assert_eq!((c.priority(2), c.priority(3)), (Some(2000), Some(1500)));
    assert_eq!(c.queue_order().collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(c.priority_factors(2).unwrap().age, 1.0);
}

#[test]
fn hold_keeps_a_queued_job_from_starting() {
    let mut c = Core::new();
    node(&mut c, 0, 1);
    run(&mut c, Event::Submit { seq: 1, request: req(1) });
    run(&mut c, Event::Submit { seq: 2, request: req(1) });
    run(&mut c, Event::Hold(JobRef::Job(2)));
    assert_eq!(c.phase(2), Phase::Held);
    assert_eq!(c.queued_jobs(), 0);
    assert!(started(&run(&mut c, Event::TaskFinished { task: job(1), success: true })).is_empty());
    assert_eq!(started(&run(&mut c, Event::Release(JobRef::Job(2)))), vec![job(2)]);
}

#[test]
fn holding_an_array_lets_its_running_tasks_finish() {
    let mut c = Core::new();
    node(&mut c, 0, 2);
    let array = Request { array: Some(ArrayIndices::parse("0-9").unwrap()), ..req(1) };
    let first = started(&run(&mut c, Event::Submit { seq: 1, request: array }));
    assert_eq!(first.len(), 2);
    run(&mut c, Event::Hold(JobRef::Task(1, 5)));
    assert_eq!(c.phase(1), Phase::Held);
    assert!(started(&run(&mut c, Event::TaskFinished { task: first[0], success: true })).is_empty());
    assert_eq!(c.running_tasks(), 1);
    let d = run(&mut c, Event::Release(JobRef::Array(1)));
    assert_eq!(started(&d).len(), 1);
}

#[test]
fn a_node_that_left_takes_no_new_tasks_and_goes_when_idle() {
    let mut c = Core::new();
    node(&mut c, 0, 1);
    node(&mut c, 1, 1);
    run(&mut c, Event::Submit { seq: 1, request: req(1) });
    run(&mut c, Event::Submit { seq: 2, request: req(1) });
    assert!(run(&mut c, Event::NodeLeft(NodeId(0))).is_empty(), "running tasks continue");
    assert_eq!(c.running_tasks(), 2);
    assert!(started(&run(&mut c, Event::TaskFinished { task: job(1), success: true })).is_empty());
    assert!(c.resources().shape(NodeId(0)).is_none(), "drained node removed");
    run(&mut c, Event::Submit { seq: 3, request: req(1) });
    assert_eq!(c.phase(3), Phase::Eligible);
    let d = run(&mut c, Event::TaskFinished { task: job(2), success: true });
    assert_eq!(started(&d), vec![job(3)]);
    // A drained node that comes back takes tasks again.
    node(&mut c, 0, 1);
    assert_eq!(c.free_cores(), 1);
}

#[test]
fn a_draining_node_that_rejoins_keeps_its_tasks() {
    let mut c = Core::new();
    node(&mut c, 0, 2);
    run(&mut c, Event::Submit { seq: 1, request: req(1) });
    run(&mut c, Event::NodeLeft(NodeId(0)));
    run(&mut c, Event::Submit { seq: 2, request: req(1) });
    assert_eq!(c.phase(2), Phase::Eligible, "nothing starts on a draining node");
    let d = run(&mut c, Event::NodeJoined { node: NodeId(0), shape: NodeShape::simple(2, 1 << 30) });
    assert_eq!(started(&d), vec![job(2)]);
    assert_eq!(c.running_tasks(), 2);
}

#[test]
fn a_million_task_array_is_one_queue_entry() {
    let mut c = Core::new();
    node(&mut c, 0, 2);
    let array = Request { array: Some(ArrayIndices::parse("1-1000000").unwrap()), ..req(1) };
    let d = run(&mut c, Event::Submit { seq: 1, request: array });
    assert_eq!(started(&d).len(), 2);
    assert_eq!(c.queued_jobs(), 1);
    assert!(c.is_unstarted(1, 1_000_000));
    run(&mut c, Event::Cancel(JobRef::Task(1, 500_000)));
    assert!(!c.is_unstarted(1, 500_000));
    let d = run(&mut c, Event::Cancel(JobRef::Array(1)));
    assert_eq!(d.iter().filter(|d| matches!(d, Decision::Kill { .. })).count(), 2);
    assert!(d.contains(&Decision::End { seq: 1, index: None, reason: EndReason::Cancelled }));
    assert_eq!(c.queued_jobs(), 0);
    assert_eq!(started(&run(&mut c, Event::Tick)), vec![], "nothing starts after the cancel");
}

#[test]
fn cancelling_the_next_array_task_moves_the_cursor() {
    let mut c = with(Policy::Fcfs);
    node(&mut c, 0, 1);
    let array = Request { array: Some(ArrayIndices::parse("1-3").unwrap()), ..req(1) };
    run(&mut c, Event::Submit { seq: 1, request: array });
    run(&mut c, Event::Cancel(JobRef::Task(1, 2)));
    run(&mut c, Event::Cancel(JobRef::Task(1, 3)));
    assert_eq!(c.phase(1), Phase::Dispatched);
    assert_eq!(c.queued_jobs(), 0);
    run(&mut c, Event::TaskFinished { task: TaskId { seq: 1, index: Some(1) }, success: true });
    assert_eq!(c.phase(1), Phase::Done);
}

/// One step of a random scenario; numbers pick among what exists.
#[derive(Debug, Clone)]
enum Action {
    Submit {
        user: u8,
        cores: u8,
        chunks: u8,
        wall: Option<u16>,
        array: Option<u8>,
        hold: bool,
        prio: i16,
        dep: Option<(u8, u8)>,
    },
    Finish(u8, bool),
    Cancel(u8, Option<u8>),
    Hold(u8),
    Release(u8),
    Join(u8),
    Lost(u8),
    Left(u8),
    Tick,
    Advance(u16),
}

fn arb_action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0u8..3, 1u8..5, 1u8..3, prop::option::of(1u16..200), prop::option::of(1u8..6), prop::bool::weighted(0.1), -1024i16..1024, prop::option::weighted(0.2, (0u8..3, 0u8..8)))
            .prop_map(|(user, cores, chunks, wall, array, hold, prio, dep)| Action::Submit { user, cores, chunks, wall, array, hold, prio, dep }),
        4 => (any::<u8>(), prop::bool::weighted(0.8)).prop_map(|(k, ok)| Action::Finish(k, ok)),
        1 => (any::<u8>(), prop::option::of(0u8..6)).prop_map(|(k, t)| Action::Cancel(k, t)),
        1 => any::<u8>().prop_map(Action::Hold),
        1 => any::<u8>().prop_map(Action::Release),
        1 => (1u8..5).prop_map(Action::Join),
        1 => any::<u8>().prop_map(Action::Lost),
        1 => any::<u8>().prop_map(Action::Left),
        1 => Just(Action::Tick),
        2 => (1u16..300).prop_map(Action::Advance),
    ]
}

/// Plays `actions` on a fresh core of `policy`, checking every invariant after
/// every event; returns every decision made.
fn play(policy: Policy, actions: &[Action]) -> Vec<Decision> {
    let mut c =
        Core::with_config(CoreConfig { recompute_interval: 5_000, ..CoreConfig::with_policy(policy) });
    let mut log = Vec::new();
    let (mut now, mut next_seq, mut next_node) = (0u64, 1u64, 0u32);
    let mut running: Vec<TaskId> = Vec::new();
    let mut nodes: Vec<u32> = Vec::new();
    for n in 0..2 {
        run(&mut c, Event::NodeJoined { node: NodeId(n), shape: NodeShape::simple(4, 1 << 30) });
        nodes.push(n);
        next_node += 1;
    }
    let pick = |k: u8, len: usize| (len > 0).then(|| k as usize % len);
    for a in actions {
        let event = match a.clone() {
            Action::Submit { user, cores, chunks, wall, array, hold, prio, dep } => {
                let depend = match dep {
                    Some((kind, back)) if next_seq > 1 => {
                        let on = next_seq - 1 - u64::from(back) % (next_seq - 1);
                        let kind = [DependKind::AfterOk, DependKind::AfterAny, DependKind::AfterNotOk]
                            [kind as usize];
                        vec![(kind, JobRef::Job(on))]
                    }
                    _ => Vec::new(),
                };
                let request = Request {
                    user: u32::from(user),
                    resources: ResourceRequest {
                        chunks: u32::from(chunks),
                        ..ResourceRequest::cores(u32::from(cores))
                    },
                    walltime: wall.map(|w| u64::from(w) * 1000),
                    priority: i32::from(prio),
                    array: array.map(|n| ArrayIndices::parse(&format!("0-{n}")).unwrap()),
                    depend,
                    hold,
                };
                next_seq += 1;
                Event::Submit { seq: next_seq - 1, request }
            }
            Action::Finish(k, ok) => match pick(k, running.len()) {
                Some(i) => Event::TaskFinished { task: running.swap_remove(i), success: ok },
                None => Event::Tick,
            },
            Action::Cancel(k, task) => {
                let seq = 1 + u64::from(k) % next_seq;
                Event::Cancel(match task {
                    Some(i) => JobRef::Task(seq, u32::from(i)),
                    None => JobRef::Job(seq),
                })
            }
            Action::Hold(k) => Event::Hold(JobRef::Job(1 + u64::from(k) % next_seq)),
            Action::Release(k) => Event::Release(JobRef::Job(1 + u64::from(k) % next_seq)),
            Action::Join(cores) => {
                next_node += 1;
                nodes.push(next_node - 1);
                Event::NodeJoined {
                    node: NodeId(next_node - 1),
                    shape: NodeShape::simple(u32::from(cores), 1 << 30),
                }
            }
            Action::Lost(k) => match pick(k, nodes.len()) {
                Some(i) => Event::NodeLost(NodeId(nodes.swap_remove(i))),
                None => Event::Tick,
            },
            Action::Left(k) => match pick(k, nodes.len()) {
                Some(i) => Event::NodeLeft(NodeId(nodes[i])),
                None => Event::Tick,
            },
            Action::Tick => Event::Tick,
            Action::Advance(s) => {
                now += u64::from(s) * 1000;
                Event::Tick
            }
        };
        let d = run_at(&mut c, now, event);
        for decision in &d {
            match decision {
                Decision::Start { task, .. } => running.push(*task),
                Decision::End { seq, index, reason: EndReason::NodeLost } => {
                    running.retain(|t| *t != TaskId { seq: *seq, index: *index });
                }
                _ => {}
            }
        }
        log.extend(d);
    }
    log
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]

    /// The same events always give the same decisions, under every policy, and
    /// no invariant breaks (in particular nothing is double-booked).
    #[test]
    fn same_events_same_decisions(actions in prop::collection::vec(arb_action(), 1..120)) {
        for policy in Policy::ALL {
            let first = play(policy, &actions);
            let second = play(policy, &actions);
            prop_assert_eq!(first, second);
        }
    }

    /// Two users with equal shares submitting the same stream of jobs, one
    /// user's all before the other's, end up with equal usage: at every event
    /// until one runs out of queued jobs, usages differ by no more than what
    /// a node's worth of the longest job adds.
    #[test]
    fn equal_users_converge_to_equal_usage(
        cores in 1u32..5,
        runs in prop::collection::vec(1u64..10, 20..40),
    ) {
        let cluster = crate::sim::Cluster { nodes: 1, shape: NodeShape::simple(cores, 1 << 30) };
        let mut jobs = Vec::new();
        for user in [1, 2] {
            for &run in &runs {
                jobs.push(crate::sim::SimJob {
                    id: jobs.len() as i64 + 1,
                    submit: 0,
                    run: run * 1000,
                    walltime: run * 1000,
                    resources: ResourceRequest::cores(1),
                    user,
                });
            }
        }
        let workload = crate::sim::Workload { jobs, ..Default::default() };
        let config = CoreConfig { recompute_interval: 0, usage_half_life: 0, ..CoreConfig::default() };
        let bound = f64::from(cores) * 10.0 + 1e-6;
        let mut worst: f64 = 0.0;
        crate::sim::simulate_observed(&workload, &cluster, config, |core, _, _| {
            core.sanity_check();
            if core.queued_jobs() >= runs.len() / 2 {
                worst = worst.max((core.usage(1) - core.usage(2)).abs());
            }
        });
        prop_assert!(worst <= bound, "usage differed by {} core-seconds (bound {})", worst, bound);
    }
}

#[test]
fn an_exclusive_job_reserves_its_whole_node() {
    let mut c = with(Policy::Easy);
    node(&mut c, 0, 4);
    run_at(&mut c, 0, Event::Submit { seq: 1, request: timed(2, 100) });
    let exclusive = Request {
        resources: ResourceRequest { placement: Placement::Exclusive, ..ResourceRequest::cores(1) },
        ..timed(1, 10)
    };
    assert!(started(&run_at(&mut c, 0, Event::Submit { seq: 2, request: exclusive })).is_empty());
    assert_eq!(c.reservation(), Some((2, 100_000)));
    // No extra on a node reserved whole: a long task may not start...
    assert!(started(&run_at(&mut c, 0, Event::Submit { seq: 3, request: timed(1, 200) })).is_empty());
    // ...a short one may.
    assert_eq!(started(&run_at(&mut c, 0, Event::Submit { seq: 4, request: timed(2, 100) })), vec![job(4)]);
    run_at(&mut c, 100_000, Event::TaskFinished { task: job(4), success: true });
    let d = run_at(&mut c, 100_000, Event::TaskFinished { task: job(1), success: true });
    assert_eq!(started(&d), vec![job(2)]);
}
