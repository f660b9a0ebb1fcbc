//! Python tasks through the agent's worker pool, without server or client:
//! the round trip of a no-op task to a warm worker (tasks/s, latency), and
//! `arr.sum()` of a 1 GiB float64 array that the worker maps from a
//! shared-memory segment, against the same sum in one Python process.
//!
//! Payloads come from `bench/python/make_payloads.py` (cloudpickle, numpy);
//! run with `cargo bench -p picloud-bench --bench workers`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_main};
use picloud_nodeagent::workers::{PoolKey, WorkerEvent, WorkerId, WorkerPool};
use picloud_proto::TaskId;
use picloud_proto::local_wire::LocalMsg;

const ARRAY_BYTES: u64 = 1 << 30;

struct Bench {
    pool: WorkerPool,
    worker: WorkerId,
    seq: u64,
}

impl Bench {
    /// Sends one task and waits for its `DONE`; returns the encoded result.
    fn round_trip(&mut self, function_key: u64, function: &[u8], args: &[u8]) -> Vec<u8> {
        self.seq += 1;
        let task = TaskId { seq: self.seq, index: None };
        let tag =
            self.pool.dispatch(self.worker, task, function_key, function, args, "/", &[], false).unwrap();
        loop {
            for event in self.pool.wait(self.worker, Duration::from_secs(60)).expect("poll") {
                match event {
                    WorkerEvent::Message(_, LocalMsg::Done { tag: t, status, result, error, .. })
                        if t == tag =>
                    {
                        assert_eq!(status, 0, "task failed: {error}");
                        self.pool.finish(self.worker, false);
                        return result;
                    }
                    WorkerEvent::Message(_, LocalMsg::Ready { .. }) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }
}

fn workers(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let segment = format!("picloud-bench-{}-1", std::process::id());
    let python3 = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python3)
        .arg(root.join("bench/python/make_payloads.py"))
        .arg(dir.path())
        .arg(&segment)
        .arg(ARRAY_BYTES.to_string())
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "make_payloads.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let interpreter = lines.next().expect("the interpreter").to_string();
    let in_process: f64 = lines.next().expect("the reference time").trim().parse().unwrap();
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    let (noop, sum, noargs, array) =
        (read("noop.pkl"), read("sum.pkl"), read("noargs.bin"), read("array.bin"));

    let python = root.join("python").canonicalize().unwrap().display().to_string();
    let mut pool = WorkerPool::new(1, Some(python));
    let key = PoolKey {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        interpreter,
        sys_path: Vec::new(),
        mem_limit: None,
    };
    let (worker, _) = pool.acquire(&key, &[0], &mut |_| Ok(Box::new(()))).unwrap();
    let mut b = Bench { pool, worker, seq: 0 };
    // Warm up: the worker loads both functions once.
    b.round_trip(1, &noop, &noargs);
    b.round_trip(2, &sum, &array);

    let mut g = c.benchmark_group("python_worker");
    g.throughput(Throughput::Elements(1));
    g.bench_function("noop_round_trip", |bench| bench.iter(|| b.round_trip(1, &noop, &noargs)));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Bytes(ARRAY_BYTES));
    g.bench_function("sum_1gib_segment", |bench| bench.iter(|| b.round_trip(2, &sum, &array)));
    g.finish();

    // Side by side, in this run: the dispatch-to-result time of the sum
    // against the in-process sum measured by make_payloads.py.
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            b.round_trip(2, &sum, &array);
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "sum of 1 GiB float64: worker via segment {:.4} s, in one process {:.4} s, ratio {:.2}x",
        median,
        in_process,
        median / in_process
    );
    b.pool.kill_all();
    let _ = std::fs::remove_file(Path::new("/dev/shm").join(&segment));
}

// `criterion_group!` makes an undocumented `pub fn benches`.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::workers);
}
use group::benches;
criterion_main!(benches);
