//! Submit-to-decision throughput through the server's queues: a regression
//! guard for the core thread and its channels.
//!
//! Each bench runs a real `CoreLoop` on its own thread ([`CoreThread`]) and plays the I/O
//! thread around it in-process, with the same messages the server's I/O
//! thread exchanges: client requests and agent reports in through the
//! [`Inbound`] channel, encoded frames out through the [`Outbound`] channel. A
//! fake agent decodes every `Start` frame and reports those tasks finished at
//! once, in one `Finished` report per frame, as the real agent batches them.
//! No sockets, no processes: what is measured is decoding nothing but the
//! agent's frames, the core's batches, snapshot publication and encoding.
//!
//! - `server/submit_to_start/N`: N single-task jobs submitted in one burst
//!   onto a node of 64 cores, until every one has started and ended: each
//!   job is one `Submit`, one `Start` decision and one end report.
//! - `server/array_round_trip/N`: one array of N tasks on a node of 2 cores
//!   (the shape of `bench/throughput.sh`): after the first two starts, every
//!   task end goes to the core and comes back as the next start.
//! - `server/submit_with_backlog/B`: the cost of one submission, sent alone
//!   and answered (a batch and a snapshot of its own), while B held jobs are
//!   queued before the measurement starts; the measurement's own submissions
//!   (some 10^5) add to both. Publishing a snapshot shares the job table
//!   instead of copying it, so the two must stay close; a copy per batch
//!   would make the second some hundred times slower.
//!
//! Run with `cargo bench -p picloud-bench --bench server`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use picloud_proto::{
    AgentMsg, ArrayIndices, ClientRequest, FrameReader, JobCommand, JobSpec, NodeInfo, ServerReply, TaskEnd,
    ToAgent,
};
use picloud_scheduler::server::{Caller, ConnId, CoreThread, Inbound, Outbound, ServerConfig};

const CLIENT: ConnId = ConnId(10);
const AGENT: ConnId = ConnId(20);

/// A job running `true`, with an environment of `env` variables.
fn spec(array: Option<&str>, hold: bool, env: usize) -> JobSpec {
    JobSpec {
        env: (0..env).map(|i| (format!("VAR{i}"), "x".repeat(40))).collect(),
        hold,
        array: array.map(|a| ArrayIndices::parse(a).expect("a valid range")),
        submit_host: "login".into(),
        ..JobSpec::new("bench", JobCommand::Argv(vec!["true".into()]), "/tmp")
    }
}

fn submit(spec: &JobSpec) -> Inbound {
    Inbound::Request {
        conn: CLIENT,
        caller: Caller { uid: 1000, gid: 1000, user: Arc::from("bench") },
        request: ClientRequest::Submit(Box::new(spec.clone())),
    }
}

/// A core thread with one agent of `cores` cores joined.
struct Running(CoreThread);

impl Running {
    fn start(cores: u32) -> Self {
        let config = ServerConfig {
            state_dir: std::env::temp_dir(),
            name: "bench".into(),
            tcp: None,
            keep_finished: Duration::from_secs(3600),
            core: Default::default(),
            journal: picloud_scheduler::server::JournalConfig::disabled(),
            threads: Default::default(),
        };
        let core = CoreThread::spawn(&config);
        let info = NodeInfo {
            hostname: "node1".into(),
            cores: (0..cores).map(|c| vec![c]).collect(),
            memory: 1 << 36,
            ..Default::default()
        };
        core.to_core.send(Inbound::AgentJoined { conn: AGENT, info }).expect("core running");
        Running(core)
    }

    fn send(&self, msg: Inbound) {
        self.0.to_core.send(msg).expect("core running");
    }

    /// Plays the I/O thread and the agent until `tasks` tasks have ended and
    /// `replies` replies have come back.
    fn serve(&self, mut tasks: usize, mut replies: usize) {
        let mut reader = FrameReader::new();
        while tasks > 0 || replies > 0 {
            match self.0.from_core.recv().expect("core running") {
                Outbound::Send { conn, bytes, answers, .. } if conn == AGENT => {
                    debug_assert_eq!(answers, 0);
                    reader.push(&bytes);
                    while let Some(p) = reader.next_payload().expect("whole frames") {
                        if let ToAgent::Start(starts) = picloud_proto::frame::decode(p).expect("a message") {
                            let ends: Vec<TaskEnd> = starts
                                .iter()
                                .map(|s| TaskEnd {
                                    task: s.task,
                                    exit_status: 0,
                                    comment: None,
                                    used: Default::default(),
                                    outcome: None,
                                })
                                .collect();
                            tasks -= ends.len();
                            let msg = AgentMsg::Finished(ends);
                            self.send(Inbound::Agent { conn: AGENT, msg });
                        }
                    }
                }
                Outbound::Send { bytes, answers, .. } => {
                    debug_assert!(matches!(
                        picloud_proto::frame::decode(&bytes[4..]),
                        Ok(ServerReply::Submitted { .. })
                    ));
                    replies -= answers as usize;
                }
                Outbound::Stopped => panic!("the core stopped"),
            }
        }
    }
}

fn submit_to_start(c: &mut Criterion) {
    let mut group = c.benchmark_group("server/submit_to_start");
    group.sample_size(10);
    let job = spec(None, false, 30);
    for n in [1_000usize, 10_000] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let running = Running::start(64);
                    let msgs: Vec<Inbound> = (0..n).map(|_| submit(&job)).collect();
                    let t0 = Instant::now();
                    for m in msgs {
                        running.send(m);
                    }
                    running.serve(n, n);
                    total += t0.elapsed();
                }
                total
            });
        });
    }
    group.finish();
}

fn array_round_trip(c: &mut Criterion) {
    let mut group = c.benchmark_group("server/array_round_trip");
    group.sample_size(10);
    let n = 10_000usize;
    let job = spec(Some(&format!("1-{n}")), false, 30);
    group.throughput(Throughput::Elements(n as u64));
    group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let running = Running::start(2);
                let msg = submit(&job);
                let t0 = Instant::now();
                running.send(msg);
                running.serve(n, 1);
                total += t0.elapsed();
            }
            total
        });
    });
    group.finish();
}

fn submit_with_backlog(c: &mut Criterion) {
    let mut group = c.benchmark_group("server/submit_with_backlog");
    group.sample_size(20);
    let held = spec(None, true, 2);
    for backlog in [0usize, 200_000] {
        let running = Running::start(2);
        for _ in 0..backlog {
            running.send(submit(&held));
        }
        running.serve(0, backlog);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(backlog), &backlog, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let msg = submit(&held);
                    let t0 = Instant::now();
                    // One at a time, as separate `qsub` processes submit:
                    // each is a batch of its own, and publishes a snapshot.
                    running.send(msg);
                    running.serve(0, 1);
                    total += t0.elapsed();
                }
                total
            });
        });
    }
    group.finish();
}

// `criterion_group!` makes an undocumented `pub fn benches`.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, submit_to_start, array_round_trip, submit_with_backlog);
}
criterion_main!(group::benches);
