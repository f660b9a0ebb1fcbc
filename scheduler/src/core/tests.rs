//! Tests of the FIFO core through its public event interface.

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

fn node(core: &mut Core, id: u32, ncores: u32) {
    let shape = NodeShape::simple(ncores, 1 << 30);
    core.apply(Event::NodeJoined { node: NodeId(id), shape }, 0, &mut Vec::new());
}

fn run(core: &mut Core, e: Event) -> Vec<Decision> {
    let mut out = Vec::new();
    core.apply(e, 0, &mut out);
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
    let mut c = Core::new();
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
