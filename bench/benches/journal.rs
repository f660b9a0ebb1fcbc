//! The journal's cost: submission throughput with the journal on (and
//! `fdatasync` per batch) against the journal off, side by side; and the
//! time a server holding a million queued tasks and 100 000 finished jobs
//! takes to start again.
//!
//! Each bench runs a real `CoreLoop` on its own thread ([`CoreThread`]) and
//! plays the I/O thread, as `server.rs` does; the journal lives in a fresh
//! temporary directory (set `TMPDIR` to put it on another disk). No agent
//! joins the submission benches, so what is measured is accepting,
//! journaling and answering submissions.
//!
//! - `journal/submit_burst/{off,fsync}`: 10 000 single-task jobs sent at
//!   once (the core thread takes them in batches of up to 4 096: one sync
//!   per batch).
//! - `journal/submit_arrays/{off,fsync}`: 1 000 arrays of 1 000 tasks sent
//!   at once.
//! - `journal/submit_one_by_one/{off,fsync}`: 200 jobs, each sent once the
//!   previous one is answered, as separate `qsub` processes do: one batch,
//!   so one sync, per job.
//! - `journal/e2e_array/{off,fsync}`: real processes (`picloud up` with
//!   `--no-journal` or the default journal, `qsub`, `picloud wait`; the
//!   release binary must be built: `cargo build --release --bins`): one
//!   `qsub -J 1-2000 -- true` until `picloud wait` returns, every task
//!   started by the agent and its start and end journaled.
//! - `journal/e2e_qsub/{off,fsync}`: 400 `qsub -- true` from 4 clients at
//!   once (100 each, one after another), then `picloud wait` on all.
//! - `journal/restart/{snapshot,journal}`: `CoreLoop::open` of a state
//!   directory holding 100 000 finished jobs and 100 arrays of 10 000
//!   queued tasks: after a clean stop (a snapshot and an empty segment),
//!   and after a crash (everything in one journal segment).
//!
//! Run with `cargo bench -p picloud-bench --bench journal`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use picloud_proto::{
    AgentMsg, ArrayIndices, Client, ClientRequest, FrameReader, JobCommand, JobSpec, NodeInfo, ServerAddr,
    ServerReply, TaskEnd, ToAgent,
};
use picloud_scheduler::server::{
    Caller, ConnId, CoreLoop, CoreThread, FsyncMode, Inbound, JournalConfig, Outbound, ServerConfig,
};

const CLIENT: ConnId = ConnId(10);
const AGENT: ConnId = ConnId(20);

/// A job running `true` with an environment of 30 variables, as `server.rs` submits.
fn spec(array: Option<&str>) -> JobSpec {
    JobSpec {
        env: (0..30).map(|i| (format!("VAR{i}"), "x".repeat(40))).collect(),
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

fn config(state: &Path, journal: JournalConfig) -> ServerConfig {
    ServerConfig {
        state_dir: state.to_path_buf(),
        name: "bench".into(),
        tcp: None,
        keep_finished: Duration::from_secs(86_400),
        core: Default::default(),
        journal,
        threads: Default::default(),
    }
}

/// The two configurations compared.
fn modes() -> [(&'static str, JournalConfig); 2] {
    [
        ("off", JournalConfig::disabled()),
        ("fsync", JournalConfig { fsync: FsyncMode::Always, ..Default::default() }),
    ]
}

/// Waits for `n` replies, checking each is a `Submitted`.
fn replies(core: &CoreThread, mut n: usize) {
    while n > 0 {
        match core.from_core.recv().expect("core running") {
            Outbound::Send { bytes, answers, conn, .. } if conn == CLIENT => {
                debug_assert!(matches!(
                    picloud_proto::frame::decode(&bytes[4..]),
                    Ok(ServerReply::Submitted { .. })
                ));
                n -= answers as usize;
            }
            Outbound::Send { .. } => {}
            Outbound::Stopped => panic!("the core stopped"),
        }
    }
}

/// Times `n` submissions of `job`, all sent at once (`burst`) or one by one.
fn bench_submissions(c: &mut Criterion, name: &str, job: &JobSpec, n: usize, burst: bool) {
    let mut group = c.benchmark_group(format!("journal/{name}"));
    group.sample_size(10);
    group.throughput(Throughput::Elements(n as u64));
    for (mode, journal) in modes() {
        group.bench_with_input(BenchmarkId::from_parameter(mode), &journal, |b, journal| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let state = tempfile::tempdir().expect("tempdir");
                    let core =
                        CoreThread::open(&config(state.path(), journal.clone())).expect("a fresh journal");
                    let msgs: Vec<Inbound> = (0..n).map(|_| submit(job)).collect();
                    let t0 = Instant::now();
                    if burst {
                        for m in msgs {
                            core.to_core.send(m).expect("core running");
                        }
                        replies(&core, n);
                    } else {
                        for m in msgs {
                            core.to_core.send(m).expect("core running");
                            replies(&core, 1);
                        }
                    }
                    total += t0.elapsed();
                }
                total
            });
        });
    }
    group.finish();
}

fn submit_burst(c: &mut Criterion) {
    bench_submissions(c, "submit_burst", &spec(None), 10_000, true);
}

fn submit_arrays(c: &mut Criterion) {
    bench_submissions(c, "submit_arrays", &spec(Some("1-1000")), 1_000, true);
}

fn submit_one_by_one(c: &mut Criterion) {
    bench_submissions(c, "submit_one_by_one", &spec(None), 200, false);
}

/// Fills a state directory: 100 000 jobs run and finished on a fake agent
/// of 64 cores, the agent gone, then 100 arrays of 10 000 tasks queued.
/// Returns a copy of the journal taken before the clean stop (a crash image)
/// in `crash`, and leaves the clean stop's snapshot in `clean`.
fn fill(clean: &Path, crash: &Path) {
    let journal = JournalConfig {
        fsync: FsyncMode::Never,
        snapshot_bytes: u64::MAX,
        snapshot_changes: u64::MAX,
        ..Default::default()
    };
    let core = CoreThread::open(&config(clean, journal)).expect("a fresh journal");
    let info = NodeInfo {
        hostname: "node1".into(),
        cores: (0..64).map(|c| vec![c]).collect(),
        memory: 1 << 36,
        ..Default::default()
    };
    core.to_core.send(Inbound::AgentJoined { conn: AGENT, info }).expect("core running");
    let single = spec(None);
    let finished = 100_000;
    for _ in 0..finished {
        core.to_core.send(submit(&single)).expect("core running");
    }
    let (mut ended, mut answered) = (0, 0);
    let mut reader = FrameReader::new();
    while ended < finished || answered < finished {
        match core.from_core.recv().expect("core running") {
            Outbound::Send { conn, bytes, .. } if conn == AGENT => {
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
                        ended += ends.len();
                        let msg = Inbound::Agent { conn: AGENT, msg: AgentMsg::Finished(ends) };
                        core.to_core.send(msg).expect("core running");
                    }
                }
            }
            Outbound::Send { answers, .. } => answered += answers as usize,
            Outbound::Stopped => panic!("the core stopped"),
        }
    }
    core.to_core.send(Inbound::Closed(AGENT)).expect("core running");
    let array = spec(Some("1-10000"));
    for _ in 0..100 {
        core.to_core.send(submit(&array)).expect("core running");
    }
    replies(&core, 100);
    // Every batch is written (not synced, which a copy does not need).
    copy_dir(&clean.join("journal"), &crash.join("journal"));
    drop(core); // a clean stop: snapshot
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create");
    for e in std::fs::read_dir(from).expect("list") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir).expect("list").map(|e| e.expect("entry").metadata().expect("size").len()).sum()
}

fn restart(c: &mut Criterion) {
    let clean = tempfile::tempdir().expect("tempdir");
    let crash = tempfile::tempdir().expect("tempdir");
    fill(clean.path(), crash.path());
    eprintln!(
        "restart state: clean stop {} MB (snapshot), crash {} MB (journal)",
        dir_size(&clean.path().join("journal")) >> 20,
        dir_size(&crash.path().join("journal")) >> 20
    );
    let mut group = c.benchmark_group("journal/restart");
    group.sample_size(10);
    for (name, state) in [("snapshot", clean.path()), ("journal", crash.path())] {
        let config = config(state, JournalConfig::default());
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (out, _keep) = crossbeam_channel::unbounded();
                    let t0 = Instant::now();
                    let core = CoreLoop::open(&config, out, || {}).expect("the state opens");
                    total += t0.elapsed();
                    let snap = core.snapshots().load();
                    assert_eq!(snap.job_count(), 100_100);
                    drop(core);
                }
                total
            });
        });
    }
    group.finish();
}

/// The release `picloud` binary: `$PICLOUD_BIN`, else next to this bench's
/// directory (`target/release/picloud`).
fn picloud_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PICLOUD_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("picloud");
    bin.exists().then_some(bin)
}

/// A `picloud up` in a temporary directory, stopped when dropped.
struct Up {
    child: Child,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Up {
    fn start(bin: &Path, journal: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(bin);
        cmd.args(["up", "--name", "bench", "--kill-grace", "1", "--dir"]).arg(dir.path());
        if !journal {
            cmd.arg("--no-journal");
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("picloud up");
        let up = Up { child, dir, bin: bin.to_path_buf() };
        let addr = ServerAddr::of_state_dir(up.dir.path());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Client::connect(&addr).and_then(|mut c| c.request(&ClientRequest::Nodes));
            if matches!(ready, Ok(ServerReply::Nodes(n)) if n.iter().any(|n| n.state == "up")) {
                return up;
            }
            assert!(Instant::now() < deadline, "picloud up did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `picloud ARGS` (or `qsub` through `picloud submit`), returning stdout.
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new(&self.bin)
            .args(args)
            .current_dir(self.dir.path())
            .env("PICLOUD_DIR", self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run picloud");
        assert!(out.status.success(), "picloud {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Times `work` on a fresh `picloud up`, with and without the journal.
fn bench_e2e(c: &mut Criterion, name: &str, elements: u64, work: fn(&Up)) {
    let Some(bin) = picloud_bin() else {
        eprintln!("journal/{name}: skipped, build the release binary first (cargo build --release --bins)");
        return;
    };
    let mut group = c.benchmark_group(format!("journal/{name}"));
    group.sample_size(10);
    group.throughput(Throughput::Elements(elements));
    for (mode, journal) in [("off", false), ("fsync", true)] {
        group.bench_function(mode, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let up = Up::start(&bin, journal);
                    let t0 = Instant::now();
                    work(&up);
                    total += t0.elapsed();
                }
                total
            });
        });
    }
    group.finish();
}

fn e2e_array(c: &mut Criterion) {
    bench_e2e(c, "e2e_array", 2000, |up| {
        let id = up.run(&["submit", "-J", "1-2000", "-o", "/dev/null", "-j", "oe", "--", "true"]);
        up.run(&["wait", &id]);
    });
}

fn e2e_qsub(c: &mut Criterion) {
    bench_e2e(c, "e2e_qsub", 400, |up| {
        let ids: Vec<String> = std::thread::scope(|s| {
            let clients: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..100)
                            .map(|_| up.run(&["submit", "-o", "/dev/null", "-j", "oe", "--", "true"]))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            clients.into_iter().flat_map(|t| t.join().expect("a client")).collect()
        });
        let mut args = vec!["wait"];
        args.extend(ids.iter().map(String::as_str));
        up.run(&args);
    });
}

// `criterion_group!` makes an undocumented `pub fn benches`.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, submit_burst, submit_arrays, submit_one_by_one, e2e_array, e2e_qsub, restart);
}
criterion_main!(group::benches);
