//! Tests of the SWF parser and of replays whose schedules are computed by hand.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::core::Policy;

/// One SWF line: id, submit, run, processors, requested time, user.
fn line(id: i64, submit: i64, run: i64, procs: i64, req: i64, user: i64) -> String {
    format!("{id} {submit} -1 {run} {procs} -1 -1 {procs} {req} -1 1 {user} -1 -1 -1 -1 -1 -1\n")
}

fn trace(lines: &[(i64, i64, i64, i64, i64)]) -> Vec<SwfJob> {
    let text: String = lines.iter().map(|&(id, s, r, p, q)| line(id, s, r, p, q, 1)).collect();
    parse_swf(&format!("; a comment\n\n{text}")).unwrap()
}

fn cluster(nodes: u32, cores: u32) -> Cluster {
    Cluster { nodes, shape: NodeShape::simple(cores, 1 << 30) }
}

/// Start time (s) of each job id, with every invariant checked after every event.
fn starts(jobs: &[SwfJob], c: &Cluster, policy: Policy) -> BTreeMap<i64, u64> {
    let w = Workload::from_swf(jobs, c);
    let r = simulate_observed(&w, c, CoreConfig::with_policy(policy), |core, _, _| core.sanity_check());
    assert_eq!(r.metrics.never_started, 0);
    r.outcomes.iter().map(|o| (o.id, o.start / 1000)).collect()
}

/// 2 nodes of 1 core. Job 1 runs 0..100; job 2 needs both nodes and must
/// wait for it (shadow time 100, both nodes reserved, no extra). Job 3 would
/// run past 100 on a reserved node: it must not backfill. Job 4 ends by 100:
/// it backfills at once.
#[test]
fn easy_backfills_the_short_job_and_not_the_long_one() {
    let t = trace(&[(1, 0, 100, 1, 100), (2, 10, 50, 2, 50), (3, 20, 200, 1, 200), (4, 30, 60, 1, 70)]);
    let c = cluster(2, 1);
    let fcfs = starts(&t, &c, Policy::Fcfs);
    assert_eq!(fcfs, BTreeMap::from([(1, 0), (2, 100), (3, 150), (4, 150)]));
    let easy = starts(&t, &c, Policy::Easy);
    assert_eq!(easy, BTreeMap::from([(1, 0), (2, 100), (3, 150), (4, 30)]));
    // Shortest first sees the same schedule here: job 2 is also the shortest.
    assert_eq!(starts(&t, &c, Policy::SjfEasy), easy);
}

/// 2 nodes of 4 cores. Job 1 holds 2 cores of node 0 until 100, job 2 all of
/// node 1 until 300. Job 3 (3 cores) gets node 0 at 100 with 1 core of
/// extra. Job 4 (long, 1 core) backfills into the extra; job 5 (long) finds
/// none left and waits; job 6 (short) backfills because it ends by 100.
#[test]
fn easy_uses_the_extra_cores_of_the_reserved_node_once() {
    let t = trace(&[
        (1, 0, 100, 2, 100),
        (2, 0, 300, 4, 300),
        (3, 1, 10, 3, 10),
        (4, 2, 500, 1, 500),
        (5, 3, 500, 1, 500),
        (6, 4, 50, 1, 50),
    ]);
    let c = cluster(2, 4);
    let easy = starts(&t, &c, Policy::Easy);
    assert_eq!(easy, BTreeMap::from([(1, 0), (2, 0), (3, 100), (4, 2), (5, 110), (6, 4)]));
    let fcfs = starts(&t, &c, Policy::Fcfs);
    assert_eq!(fcfs, BTreeMap::from([(1, 0), (2, 0), (3, 100), (4, 100), (5, 110), (6, 110)]));
}

/// A job of 6 processors on nodes of 4 cores is two chunks of 4; its shadow
/// time is when two distinct nodes are free, not when 6 cores are.
///
/// 3 nodes of 4 cores: job 1 fills node A until 100, job 2 node B until 200,
/// job 3 takes 2 cores of node C until 300. Job 4 (6 processors) finds 6 free
/// cores at 100 but two whole nodes only at 200: A and B are reserved. Job 5
/// (short) backfills on C; job 6 (long) too, on C, which is not reserved; job
/// 7 (long) finds C full and may not use A's cores after 100: it waits for job
/// 5 to end.
#[test]
fn multi_chunk_jobs_wait_for_distinct_nodes() {
    let t = trace(&[
        (1, 0, 100, 4, 100),
        (2, 0, 200, 4, 200),
        (3, 0, 300, 2, 300),
        (4, 1, 10, 6, 10),
        (5, 2, 150, 1, 150),
        (6, 3, 500, 1, 500),
        (7, 4, 500, 1, 500),
    ]);
    let c = cluster(3, 4);
    let w = Workload::from_swf(&t, &c);
    assert_eq!(w.jobs[3].resources, ResourceRequest { chunks: 2, ..ResourceRequest::cores(4) });
    let mut shadow = None;
    let r = simulate_observed(&w, &c, CoreConfig::with_policy(Policy::Easy), |core, now, _| {
        core.sanity_check();
        if now == 1000 {
            shadow = core.reservation();
        }
    });
    assert_eq!(shadow, Some((4, 200_000)));
    let s: BTreeMap<i64, u64> = r.outcomes.iter().map(|o| (o.id, o.start / 1000)).collect();
    assert_eq!(s, BTreeMap::from([(1, 0), (2, 0), (3, 0), (4, 200), (5, 2), (6, 3), (7, 152)]));
}

#[test]
fn metrics_of_a_hand_computed_schedule() {
    let t = trace(&[(1, 0, 100, 1, 100), (2, 10, 50, 2, 50), (3, 20, 200, 1, 200), (4, 30, 60, 1, 70)]);
    let c = cluster(2, 1);
    let w = Workload::from_swf(&t, &c);
    let m = simulate(&w, &c, CoreConfig::with_policy(Policy::Easy)).metrics;
    assert_eq!(m.jobs, 4);
    // Waits 0, 90, 130, 0.
    assert_eq!(m.mean_wait, 55.0);
    assert_eq!(m.max_wait, 130.0);
    // Slowdowns 1, 140/50, 330/200, 1.
    let bsld = (1.0 + 140.0 / 50.0 + 330.0 / 200.0 + 1.0) / 4.0;
    assert!((m.mean_bounded_slowdown - bsld).abs() < 1e-12);
    // Job 3 ends last, at 350; busy 100 + 2*50 + 200 + 60 core-seconds.
    assert_eq!(m.makespan, 350.0);
    assert!((m.utilization - 460.0 / 700.0).abs() < 1e-12);
    // 2 node joins, 4 submits, 4 ends.
    assert_eq!(m.events, 10);
    assert_eq!(m.policy, "easy");
}

#[test]
fn workload_conversion_rules() {
    let text = [
        line(1, 0, 10, 3, -1, 1),  // one chunk of 3 cores; estimate from the run time
        line(2, 0, 10, 9, 20, 1),  // 9 > 4: 3 chunks of 4
        line(3, 0, -1, 1, 20, 1),  // no run time
        line(4, 0, 10, -1, 20, 1), // no processors
        line(5, 0, 10, 99, 20, 1), // more than 16 cores
        line(6, 0, 50, 1, 20, 1),  // asked for 20 s, ran 50: cut at 20
        "7 0 -1 10 2 -1 -1 -1 30 -1 1 1 -1 -1 -1 -1 -1 -1\n".to_string(), // field 5 stands in for 8
    ]
    .concat();
    let w = Workload::from_swf(&parse_swf(&text).unwrap(), &cluster(4, 4));
    let ids: Vec<i64> = w.jobs.iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![1, 2, 6, 7]);
    assert_eq!(w.jobs[0].resources, ResourceRequest::cores(3));
    assert_eq!(w.jobs[0].walltime, 10_000);
    assert_eq!(w.jobs[1].resources, ResourceRequest { chunks: 3, ..ResourceRequest::cores(4) });
    assert_eq!((w.jobs[2].run, w.jobs[2].walltime), (20_000, 20_000));
    assert_eq!(w.jobs[3].resources, ResourceRequest::cores(2));
    assert_eq!(w.skipped, Skipped { no_run_time: 1, no_processors: 1, too_large: 1 });
    assert_eq!(w.estimated_from_run, 1);
    assert_eq!(w.capped_at_walltime, 1);
}

#[test]
fn malformed_lines_name_the_line_and_the_problem() {
    let good = line(1, 0, 10, 1, 10, 1);
    let cases: [(&str, usize, &str); 6] = [
        ("1 0 -1 10 1 -1 -1 1 10 -1 1 1 -1 -1 -1 -1 -1\n", 3, "expected 18 fields, found 17"),
        (
            "1 0 -1 ten 1 -1 -1 1 10 -1 1 1 -1 -1 -1 -1 -1 -1\n",
            3,
            "field 4 (run time) is 'ten', not a number",
        ),
        ("1 0 -1 10 1.5 -1 -1 1 10 -1 1 1 -1 -1 -1 -1 -1 -1\n", 3, "field 5 (allocated processors) is '1.5'"),
        ("1 -1 -1 10 1 -1 -1 1 10 -1 1 1 -1 -1 -1 -1 -1 -1\n", 3, "field 2 (submit time) is -1"),
        ("1 0 -1 10 1 -1 -1 -7 10 -1 1 1 -1 -1 -1 -1 -1 -1\n", 3, "field 8 (requested processors) is -7"),
        ("1 0 -1 10 1 -1 -1 1 inf -1 1 1 -1 -1 -1 -1 -1 -1\n", 3, "field 9 (requested time) is 'inf'"),
    ];
    for (bad, at, says) in cases {
        let text = format!("; header\n{good}{bad}{good}");
        let err = parse_swf(&text).unwrap_err();
        assert_eq!(err.line, at, "{bad}");
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("line {at}: ")), "{msg}");
        assert!(msg.contains(says), "{msg} should say {says}");
    }
    // Fractional times are fine; comments and blank lines are skipped.
    let ok = parse_swf("; x\n\n  ; y\n1 0.5 -1 10.25 1 -1 -1 1 10 -1 1 1 -1 -1 -1 -1 -1 -1\n").unwrap();
    assert_eq!(ok.len(), 1);
    assert_eq!((ok[0].line, ok[0].submit, ok[0].run), (4, 0.5, 10.25));
}

#[test]
fn the_lublin_trace_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/traces/lublin_256.swf");
    let Ok(text) = std::fs::read_to_string(path) else { return };
    let jobs = parse_swf(&text).unwrap();
    assert_eq!(jobs.len(), 10_000);
    let w = Workload::from_swf(&jobs, &cluster(256, 1));
    assert_eq!(w.jobs.len() as u64 + w.skipped.total(), 10_000);
    assert_eq!(w.estimated_from_run, w.jobs.len() as u64, "lublin has no requested times");
}

/// Random small traces on small clusters.
fn arb_trace() -> impl Strategy<Value = (Vec<SwfJob>, Cluster)> {
    (1u32..4, 1u32..5).prop_flat_map(|(nodes, cores)| {
        let total = i64::from(nodes * cores);
        let job = (0i64..200, 1i64..150, 1..=total, 0i64..3);
        prop::collection::vec(job, 1..25).prop_map(move |jobs| {
            let text: String = jobs
                .iter()
                .enumerate()
                .map(|(i, &(submit, run, procs, user))| line(i as i64 + 1, submit, run, procs, run, user))
                .collect();
            (parse_swf(&text).unwrap(), cluster(nodes, cores))
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// With exact walltimes, EASY never delays the reserved job: it starts no
    /// later than the shadow time computed when it first blocked.
    #[test]
    fn backfill_never_delays_the_reservation((jobs, c) in arb_trace()) {
        let w = Workload::from_swf(&jobs, &c);
        let mut first_shadow: BTreeMap<u64, Millis> = BTreeMap::new();
        let r = simulate_observed(&w, &c, CoreConfig::with_policy(Policy::Easy), |core, _, _| {
            core.sanity_check();
            if let Some((seq, shadow)) = core.reservation() {
                first_shadow.entry(seq).or_insert(shadow);
            }
        });
        prop_assert_eq!(r.metrics.never_started, 0);
        let mut by_submit: Vec<&JobOutcome> = r.outcomes.iter().collect();
        by_submit.sort_by_key(|o| o.submit);
        for (seq, shadow) in first_shadow {
            let start = by_submit[(seq - 1) as usize].start;
            prop_assert!(start <= shadow, "job {} started at {} after its shadow time {}", seq, start, shadow);
        }
    }

    /// Every policy runs every job exactly once without breaking an invariant,
    /// and the same trace always gives the same schedule.
    #[test]
    fn every_policy_is_deterministic_and_sane((jobs, c) in arb_trace()) {
        let w = Workload::from_swf(&jobs, &c);
        for policy in Policy::ALL {
            let config = CoreConfig { recompute_interval: 0, ..CoreConfig::with_policy(policy) };
            let a = simulate_observed(&w, &c, config.clone(), |core, _, _| core.sanity_check());
            let b = simulate(&w, &c, config);
            prop_assert_eq!(&a.outcomes, &b.outcomes);
            prop_assert_eq!(a.outcomes.len(), w.jobs.len());
        }
    }
}
