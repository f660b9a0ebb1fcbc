//! Benches of the scheduling core as a whole (queue, priorities, backfill,
//! placement), as regression guards for the targets of the scheduler-core
//! issue:
//!
//! - `array_submit/full_cluster`: submitting a 1 000 000-task array to a core
//!   with [`NODES`] nodes, all busy: the array is one record, so this is
//!   O(1) however many tasks (target < 50 ms; it takes microseconds).
//!   `array_submit/idle_cluster` is the same on idle nodes, where the submit
//!   also starts one task per free core ([`NODES`] × [`CORES`]).
//! - `throughput/submit_start`: single-task submits that each start at once
//!   (events per second); `throughput/submit_finish_steady`: one submit and
//!   one end per iteration on a half-full cluster.
//! - `backlog/finish_starts_next`: with [`BACKLOG`] jobs queued behind a full
//!   cluster, each task end starts the next job; `backlog/submit`: a submit
//!   into that backlog; `backlog/behind_reservation`: task ends while a wide
//!   job holds the reservation and the backlog is scanned for backfill.
//!
//! Before the benches, `main` prints the memory a queued job and a queued
//! array task cost, measured with a counting global allocator (target ≤ 256
//! bytes per queued array task).
//!
//! Run: `cargo bench -p picloud-bench --bench core -- --warm-up-time 1 --measurement-time 3`

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput};
use picloud_proto::{ArrayIndices, JobRef, TaskId};
use picloud_scheduler::core::{
    Core, CoreConfig, Decision, Event, NodeId, NodeShape, Policy, Request, ResourceRequest,
};

/// Nodes of the benched cluster.
const NODES: u32 = 1_000;
/// Cores per node.
const CORES: u32 = 64;
/// Jobs queued in the backlog benches and the memory measurement.
const BACKLOG: u64 = 100_000;
/// Tasks of the big array.
const ARRAY_TASKS: u32 = 1_000_000;

/// Bytes currently allocated through the global allocator.
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting live bytes. `Relaxed` suffices: the
/// counter is read on the thread that allocates, and orders nothing else.
struct CountingAllocator;

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees are ours; the counter does not touch
// the memory.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` (through `alloc`) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn live_bytes() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// A one-core job with an hour's walltime.
fn one_core() -> Request {
    Request {
        user: 1000,
        resources: ResourceRequest::cores(1),
        walltime: Some(3_600_000),
        priority: 0,
        array: None,
        depend: Vec::new(),
        hold: false,
    }
}

/// The test harness: a core, the time, and its running tasks in start order.
struct Bench {
    core: Core,
    now: u64,
    next_seq: u64,
    running: VecDeque<TaskId>,
    out: Vec<Decision>,
}

impl Bench {
    /// [`NODES`] idle nodes of [`CORES`] cores, the default (multifactor) policy.
    fn new() -> Self {
        Self::with_policy(Policy::Multifactor)
    }

    /// [`NODES`] idle nodes of [`CORES`] cores.
    fn with_policy(policy: Policy) -> Self {
        let core = Core::with_config(CoreConfig::with_policy(policy));
        let mut b = Bench { core, now: 0, next_seq: 1, running: VecDeque::new(), out: Vec::new() };
        for n in 0..NODES {
            let shape = NodeShape::simple(CORES, u64::from(CORES) << 32);
            b.apply(Event::NodeJoined { node: NodeId(n), shape });
        }
        b
    }

    fn apply(&mut self, event: Event) {
        self.out.clear();
        self.core.apply(event, self.now, &mut self.out);
        for d in &self.out {
            if let Decision::Start { task, .. } = d {
                self.running.push_back(*task);
            }
        }
    }

    /// Submits; returns the sequence number.
    fn submit(&mut self, request: Request) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.apply(Event::Submit { seq, request });
        seq
    }

    /// Ends the oldest running task.
    fn finish_oldest(&mut self) {
        self.now += 1;
        let task = self.running.pop_front().expect("a task runs");
        self.apply(Event::TaskFinished { task, success: true });
    }

    /// Fills every core with one array.
    fn filled() -> Self {
        Self::filled_with(Policy::Multifactor)
    }

    fn filled_with(policy: Policy) -> Self {
        let mut b = Bench::with_policy(policy);
        let all = u64::from(NODES) * u64::from(CORES);
        b.submit(Request { array: Some(ArrayIndices::parse(&format!("1-{all}")).unwrap()), ..one_core() });
        assert_eq!(b.core.free_cores(), 0);
        b
    }

    /// A full cluster with [`BACKLOG`] single jobs queued.
    fn with_backlog() -> Self {
        let mut b = Bench::filled();
        for _ in 0..BACKLOG {
            b.submit(one_core());
        }
        b
    }
}

fn array(tasks: u32) -> Request {
    Request { array: Some(ArrayIndices::parse(&format!("1-{tasks}")).unwrap()), ..one_core() }
}

/// Arrays queued for the memory measurement.
const ARRAYS: u64 = 10_000;

/// Prints the bytes a queued job and a queued array task cost: the growth of
/// live heap bytes over [`BACKLOG`] single jobs, and over [`ARRAYS`] arrays of
/// [`ARRAY_TASKS`] tasks each, queued behind a full cluster (the requests'
/// own heap parts included, as the core keeps them).
fn report_memory() {
    let mut b = Bench::filled();
    let before = live_bytes();
    for _ in 0..BACKLOG {
        b.submit(one_core());
    }
    let per_job = (live_bytes() - before) as f64 / BACKLOG as f64;
    let before = live_bytes();
    for _ in 0..ARRAYS {
        b.submit(array(ARRAY_TASKS));
    }
    let per_array = (live_bytes() - before) as f64 / ARRAYS as f64;
    assert_eq!(b.core.queued_jobs() as u64, BACKLOG + ARRAYS);
    println!(
        "memory: {per_job:.0} bytes per queued single-task job ({BACKLOG} queued); \
         {per_array:.0} bytes per queued {ARRAY_TASKS}-task array ({ARRAYS} queued) = {:.6} bytes per queued array task",
        per_array / f64::from(ARRAY_TASKS)
    );
}

fn array_submit(c: &mut Criterion) {
    let mut g = c.benchmark_group("array_submit");
    g.sample_size(20);
    g.bench_function("full_cluster", |bench| {
        let mut b = Bench::filled();
        bench.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let request = array(ARRAY_TASKS);
                let t = Instant::now();
                let seq = b.submit(request);
                timed += t.elapsed();
                // Cancelled untimed, so that the queue does not grow.
                b.apply(Event::Cancel(JobRef::Array(seq)));
            }
            timed
        });
    });
    g.bench_function("idle_cluster", |bench| {
        bench.iter_batched(
            Bench::new,
            |mut b| {
                b.submit(array(ARRAY_TASKS));
                assert_eq!(b.core.free_cores(), 0);
                b
            },
            BatchSize::PerIteration,
        );
    });
    g.finish();
}

fn throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("throughput");
    const SUBMITS: u64 = 10_000;
    g.throughput(Throughput::Elements(SUBMITS));
    g.sample_size(20);
    g.bench_function("submit_start", |bench| {
        bench.iter_batched(
            Bench::new,
            |mut b| {
                for _ in 0..SUBMITS {
                    b.submit(one_core());
                }
                assert_eq!(b.running.len() as u64, SUBMITS);
                b
            },
            BatchSize::PerIteration,
        );
    });
    g.throughput(Throughput::Elements(2));
    g.sample_size(100);
    g.bench_function("submit_finish_steady", |bench| {
        let mut b = Bench::new();
        for _ in 0..(NODES * CORES / 2) {
            b.submit(one_core());
        }
        bench.iter(|| {
            b.submit(one_core());
            b.finish_oldest();
        });
    });
    g.finish();
}

fn backlog(c: &mut Criterion) {
    let mut g = c.benchmark_group("backlog");
    g.throughput(Throughput::Elements(1));
    g.bench_function("finish_starts_next", |bench| {
        let mut b = Bench::with_backlog();
        bench.iter(|| {
            b.finish_oldest();
            // Keep the backlog as deep as it was.
            b.submit(one_core());
        });
    });
    g.bench_function("submit", |bench| {
        let mut b = Bench::with_backlog();
        bench.iter(|| b.submit(one_core()));
    });
    g.bench_function("behind_reservation", |bench| {
        // Submission order (easy): a job asking for every node holds the
        // reservation at the head; the backlog behind it asks for 4 hours,
        // past the shadow time, so every end frees a core that only the wide
        // job may take, and the pass scans the backlog (up to the backfill
        // depth) for a job that could use it.
        let build = || {
            let mut b = Bench::filled_with(Policy::Easy);
            b.submit(Request {
                resources: ResourceRequest { chunks: NODES, ..ResourceRequest::cores(CORES) },
                ..one_core()
            });
            for _ in 0..BACKLOG {
                b.submit(Request { walltime: Some(4 * 3_600_000), ..one_core() });
            }
            b
        };
        let mut b = build();
        bench.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                if b.running.len() < 1_000 {
                    b = build();
                }
                let t = Instant::now();
                b.finish_oldest();
                timed += t.elapsed();
                assert!(b.out.is_empty() && b.core.reservation().is_some());
            }
            timed
        });
    });
    g.finish();
}

fn main() {
    report_memory();
    let mut c = Criterion::default().configure_from_args();
    array_submit(&mut c);
    throughput(&mut c);
    backlog(&mut c);
    c.final_summary();
}
