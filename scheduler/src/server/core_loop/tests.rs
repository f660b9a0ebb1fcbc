//! Tests of the core thread through its channels: snapshot publication and
//! versions, read-your-writes, per-agent batching, the running totals.
//!
//! Most tests play the I/O thread synchronously (`handle` then `end_batch`);
//! the `stress_*` tests run the real loop on its own thread.

use std::time::Duration;

use crossbeam_channel::{Receiver, unbounded};
use picloud_proto::{
    ArrayIndices, DependKind, Dependency, JobCommand, JobInfo, JobSpec, JobState, StatRequest, TaskEnd,
    TaskId,
};

use picloud_proto::NodeInfo;

use super::*;

const CLIENT: ConnId = ConnId(10);
const AGENT: ConnId = ConnId(20);

fn config() -> ServerConfig {
    ServerConfig {
        state_dir: std::env::temp_dir().join("picloud-core-loop-tests"),
        name: "srv".into(),
        tcp: None,
        keep_finished: Duration::from_secs(3600),
        core: Default::default(),
        journal: crate::server::JournalConfig::disabled(),
        threads: Default::default(),
    }
}

fn caller() -> Caller {
    Caller { uid: 1000, gid: 1000, user: "alice".into() }
}

fn spec(array: Option<&str>) -> JobSpec {
    JobSpec {
        env: vec![("HOME".into(), "/home/alice".into())],
        array: array.map(|a| ArrayIndices::parse(a).unwrap()),
        submit_host: "login".into(),
        ..JobSpec::new("job", JobCommand::Argv(vec!["true".into()]), "/tmp")
    }
}

/// An agent's handshake and its report of the tasks it runs.
fn join(conn: ConnId, info: NodeInfo, running: Vec<TaskRunning>) -> Vec<Inbound> {
    vec![Inbound::AgentJoined { conn, info }, Inbound::Agent { conn, msg: AgentMsg::Running(running) }]
}

fn node_info(cores: u32) -> NodeInfo {
    NodeInfo {
        hostname: "node1".into(),
        cores: (0..cores).map(|c| vec![c]).collect(),
        memory: 1 << 34,
        ..Default::default()
    }
}

fn request(request: ClientRequest) -> Inbound {
    Inbound::Request { conn: CLIENT, caller: caller(), request }
}

fn submit(s: JobSpec) -> Inbound {
    request(ClientRequest::Submit(Box::new(s)))
}

fn finished(seq: u64, index: Option<u32>, exit_status: i32) -> TaskEnd {
    TaskEnd {
        task: TaskId { seq, index },
        exit_status,
        comment: None,
        used: Default::default(),
        outcome: None,
    }
}

/// What one batch sent, decoded.
#[derive(Debug, Default)]
struct Sent {
    replies: Vec<(ServerReply, u64)>,
    /// What every agent was sent.
    to_agent: Vec<ToAgent>,
    /// The same, with the agent's connection.
    to_agents: Vec<(ConnId, ToAgent)>,
    /// Connections closed after their output.
    closed: Vec<ConnId>,
    stopped: bool,
}

/// A core loop driven synchronously, batch by batch.
struct Harness {
    core: CoreLoop,
    out: Receiver<Outbound>,
}

impl Harness {
    fn new() -> Self {
        let (tx, rx) = unbounded();
        Harness { core: CoreLoop::new(&config(), tx, || {}), out: rx }
    }

    fn with_agent(cores: u32) -> Self {
        let mut h = Self::new();
        h.batch(join(AGENT, node_info(cores), vec![]));
        h
    }

    fn batch(&mut self, msgs: Vec<Inbound>) -> Sent {
        for m in msgs {
            self.core.handle(m);
        }
        self.core.end_batch();
        self.core.sync_barrier();
        let mut sent = Sent::default();
        for msg in self.out.try_iter() {
            match msg {
                Outbound::Send { conn, bytes, answers, version, close } => {
                    // Connections from AGENT on are agents'.
                    let agent = conn.0 >= AGENT.0;
                    let mut reader = picloud_proto::FrameReader::new();
                    reader.push(&bytes);
                    while let Some(p) = reader.next_payload().unwrap() {
                        if agent {
                            sent.to_agent.push(picloud_proto::frame::decode(p).unwrap());
                            sent.to_agents.push((conn, picloud_proto::frame::decode(p).unwrap()));
                        } else {
                            sent.replies.push((picloud_proto::frame::decode(p).unwrap(), version));
                        }
                    }
                    if close {
                        sent.closed.push(conn);
                    }
                    let replies = if agent { 0 } else { reader_count(&bytes) };
                    assert_eq!(answers as usize, replies, "client frames are replies, agent frames are not");
                }
                Outbound::Stopped => sent.stopped = true,
            }
        }
        sent
    }

    /// Submits and returns the sequence number and the reply's version.
    fn submit(&mut self, s: JobSpec) -> (u64, u64) {
        let sent = self.batch(vec![submit(s)]);
        match &sent.replies[..] {
            [(ServerReply::Submitted { seq, .. }, v)] => (*seq, *v),
            other => panic!("expected one Submitted, got {other:?}"),
        }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.core.snapshots().load()
    }

    /// The closed connections' agents stayed away for the node timeout:
    /// the next batch finds their nodes lost.
    fn agent_stays_away(&mut self) {
        let timeout = self.core.node_timeout();
        for link in self.core.links.values_mut().filter(|l| l.away) {
            link.last_heard = link.last_heard.checked_sub(timeout).expect("a clock past the timeout");
        }
        self.batch(Vec::new());
    }

    fn check_counts(&self) {
        assert_eq!(self.core.jobs.counts(), self.core.jobs.recount(), "running totals drifted");
    }
}

fn reader_count(bytes: &[u8]) -> usize {
    let mut reader = picloud_proto::FrameReader::new();
    reader.push(bytes);
    std::iter::from_fn(|| reader.next_payload().unwrap().map(|_| ())).count()
}

fn stat(snap: &Snapshot, expand: bool) -> Vec<JobInfo> {
    let req = StatRequest { include_finished: true, expand_arrays: expand, ..Default::default() };
    match snap.answer(&ClientRequest::Stat(req)) {
        Some(ServerReply::Jobs { jobs, .. }) => jobs,
        other => panic!("expected jobs, got {other:?}"),
    }
}

fn state_of(snap: &Snapshot, id: &str) -> JobState {
    stat(snap, true).into_iter().find(|j| j.id == id).unwrap_or_else(|| panic!("{id} not listed")).state
}

fn starts(sent: &Sent) -> Vec<TaskId> {
    sent.to_agent
        .iter()
        .flat_map(|m| match m {
            ToAgent::Start(s) => s.iter().map(|s| s.task).collect(),
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn a_reply_is_sent_after_the_snapshot_that_shows_it() {
    let mut h = Harness::new();
    assert_eq!(h.snapshot().version(), 0);
    assert!(stat(&h.snapshot(), false).is_empty());
    let (seq, version) = h.submit(spec(None));
    let snap = h.snapshot();
    assert_eq!(snap.version(), version, "the reply carries the version published with it");
    assert!(version > 0);
    let jobs = stat(&snap, false);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].task.seq, seq);
    assert_eq!(jobs[0].state, JobState::Queued);
}

#[test]
fn a_batch_that_changes_nothing_publishes_nothing() {
    let mut h = Harness::new();
    let (_, v) = h.submit(spec(None));
    let sent = h.batch(vec![request(ClientRequest::Stat(StatRequest::default()))]);
    assert_eq!(sent.replies.len(), 1);
    assert_eq!(sent.replies[0].1, v, "a query answered by the core thread changes no version");
    assert_eq!(h.snapshot().version(), v);
    h.batch(Vec::new());
    assert_eq!(h.snapshot().version(), v, "an empty batch (a timeout) publishes nothing");
}

#[test]
fn one_batch_one_publication() {
    let mut h = Harness::new();
    let sent = h.batch((0..100).map(|_| submit(spec(None))).collect());
    assert_eq!(sent.replies.len(), 100);
    assert!(sent.replies.iter().all(|(_, v)| *v == 1), "all replies of the batch share one version");
    assert_eq!(h.snapshot().version(), 1);
    assert_eq!(h.snapshot().job_count(), 100);
}

#[test]
fn a_held_snapshot_does_not_change() {
    let mut h = Harness::new();
    let (seq, _) = h.submit(spec(Some("1-4")));
    let before = h.snapshot();
    let sent = h.batch(join(AGENT, node_info(2), vec![]));
    assert_eq!(starts(&sent).len(), 2);
    let after = h.snapshot();
    let id = format!("{seq}[].srv");
    assert_eq!(state_of(&before, &id), JobState::Queued);
    assert_eq!(state_of(&before, &format!("{seq}[1].srv")), JobState::Queued);
    assert_eq!(state_of(&after, &id), JobState::Begun);
    assert_eq!(state_of(&after, &format!("{seq}[1].srv")), JobState::Running);
    assert!(matches!(before.answer(&ClientRequest::Nodes), Some(ServerReply::Nodes(n)) if n.is_empty()));
}

#[test]
fn starts_are_batched_per_agent_after_one_definition() {
    let mut h = Harness::with_agent(4);
    let sent = h.batch(vec![submit(spec(Some("1-10")))]);
    let seq = match &sent.replies[..] {
        [(ServerReply::Submitted { seq, .. }, _)] => *seq,
        other => panic!("{other:?}"),
    };
    // The submit's batch carries the definition, then four starts in one frame.
    assert_eq!(sent.to_agent.len(), 2, "{:?}", sent.to_agent);
    assert!(matches!(&sent.to_agent[0], ToAgent::Define(d) if d.seq == seq));
    assert!(matches!(&sent.to_agent[1], ToAgent::Start(s) if s.len() == 4));
    // Four ends in one report: four starts in one frame, no new definition.
    let ends = (1..=4).map(|i| finished(seq, Some(i), 0)).collect();
    let sent = h.batch(vec![Inbound::Agent { conn: AGENT, msg: AgentMsg::Finished(ends) }]);
    assert_eq!(sent.to_agent.len(), 1);
    assert_eq!(starts(&sent).len(), 4);
    h.check_counts();
}

#[test]
fn the_agent_forgets_a_finished_job_and_wait_replies() {
    let mut h = Harness::with_agent(2);
    let (seq, _) = h.submit(spec(None));
    let sent = h.batch(vec![request(ClientRequest::wait_all(vec![JobRef::Job(seq)], None))]);
    assert!(sent.replies.is_empty(), "the job has not ended yet");
    let sent =
        h.batch(vec![Inbound::Agent { conn: AGENT, msg: AgentMsg::Finished(vec![finished(seq, None, 3)]) }]);
    assert!(matches!(&sent.to_agent[..], [ToAgent::Forget { seq: s }] if *s == seq));
    match &sent.replies[..] {
        [(ServerReply::Jobs { jobs, .. }, v)] => {
            assert_eq!(jobs[0].exit_status, Some(3));
            assert_eq!(*v, h.snapshot().version());
        }
        other => panic!("expected the wait's reply, got {other:?}"),
    }
    let status = match h.snapshot().answer(&ClientRequest::ServerStatus) {
        Some(ServerReply::ServerStatus(s)) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!((status.queued, status.running, status.finished, status.nodes_up), (0, 0, 1, 1));
}

fn wait(jobs: &[u64], until: WaitUntil, reply: WaitReply) -> ClientRequest {
    ClientRequest::Wait {
        jobs: jobs.iter().map(|&s| JobRef::Job(s)).collect(),
        timeout_ms: None,
        until,
        reply,
    }
}

#[test]
fn a_wait_for_any_replies_once_one_job_has_ended() {
    let mut h = Harness::with_agent(2);
    let (a, _) = h.submit(spec(None));
    let (b, _) = h.submit(spec(None));
    let sent = h.batch(vec![request(wait(&[a, b], WaitUntil::Any, WaitReply::States))]);
    assert!(sent.replies.is_empty(), "neither has ended yet");
    let sent =
        h.batch(vec![Inbound::Agent { conn: AGENT, msg: AgentMsg::Finished(vec![finished(b, None, 0)]) }]);
    match &sent.replies[..] {
        [(ServerReply::Jobs { jobs, .. }, _)] => {
            let state = |seq| jobs.iter().find(|j| j.task.seq == seq).map(|j| j.state);
            assert_eq!((state(a), state(b)), (Some(JobState::Running), Some(JobState::Finished)));
        }
        other => panic!("expected the wait's reply, got {other:?}"),
    }
}

#[test]
fn a_wait_for_results_carries_the_outcomes_of_the_ended_jobs() {
    let mut h = Harness::with_agent(2);
    let (a, _) = h.submit(spec(None));
    let (b, _) = h.submit(spec(Some("0-2")));
    let sent = h.batch(vec![request(wait(&[a, b], WaitUntil::Any, WaitReply::Results))]);
    assert!(sent.replies.is_empty());
    let mut end = finished(a, None, 0);
    end.outcome = Some(Box::new(picloud_proto::PythonOutcome {
        status: picloud_proto::PythonStatus::Returned,
        value: b"forty-two".to_vec(),
        error: String::new(),
        traceback: String::new(),
        stdout: Vec::new(),
        stderr: Vec::new(),
        segments: Vec::new(),
    }));
    let sent = h.batch(vec![Inbound::Agent { conn: AGENT, msg: AgentMsg::Finished(vec![end]) }]);
    match &sent.replies[..] {
        // Only the job that ended; the array is still running.
        [(ServerReply::Results { results, unknown }, _)] => {
            assert!(unknown.is_empty());
            assert_eq!(results.len(), 1, "{results:?}");
            assert_eq!(results[0].task, TaskId { seq: a, index: None });
            assert_eq!(results[0].outcome.as_ref().map(|o| o.value.as_slice()), Some(&b"forty-two"[..]));
        }
        other => panic!("expected the wait's reply, got {other:?}"),
    }
    // Waiting for all: every task of both jobs, in the order asked.
    h.batch(vec![request(wait(&[b, a], WaitUntil::All, WaitReply::Results))]);
    let ends = (0..3).map(|i| finished(b, Some(i), 1)).collect();
    let sent = h.batch(vec![Inbound::Agent { conn: AGENT, msg: AgentMsg::Finished(ends) }]);
    match &sent.replies[..] {
        [(ServerReply::Results { results, .. }, _)] => {
            let tasks: Vec<TaskId> = results.iter().map(|r| r.task).collect();
            let want: Vec<TaskId> = (0..3)
                .map(|i| TaskId { seq: b, index: Some(i) })
                .chain([TaskId { seq: a, index: None }])
                .collect();
            assert_eq!(tasks, want);
            assert!(results[..3].iter().all(|r| r.exit_status == Some(1)));
        }
        other => panic!("expected the wait's reply, got {other:?}"),
    }
}

/// The outcome of a Python task that returned `len` bytes.
fn returned(len: usize) -> Box<picloud_proto::PythonOutcome> {
    Box::new(picloud_proto::PythonOutcome {
        status: picloud_proto::PythonStatus::Returned,
        value: vec![7; len],
        error: String::new(),
        traceback: String::new(),
        stdout: Vec::new(),
        stderr: Vec::new(),
        segments: Vec::new(),
    })
}

#[test]
fn outcomes_too_large_for_one_reply_are_replaced_by_the_states() {
    let mut h = Harness::with_agent(2);
    let (seq, _) = h.submit(spec(None));
    h.batch(vec![request(wait(&[seq], WaitUntil::All, WaitReply::Results))]);
    let mut end = finished(seq, None, 0);
    end.outcome = Some(returned(RESULTS_IN_A_WAIT + 1));
    let sent = h.batch(vec![Inbound::Agent { conn: AGENT, msg: AgentMsg::Finished(vec![end]) }]);
    match &sent.replies[..] {
        [(ServerReply::Jobs { jobs, .. }, _)] => {
            assert_eq!(jobs[0].task.seq, seq);
            assert_eq!(jobs[0].state, JobState::Finished);
        }
        other => panic!("expected the states, got {} replies", other.len()),
    }
}

#[test]
fn a_query_whose_reply_would_not_fit_a_frame_gets_an_error() {
    let mut h = Harness::with_agent(2);
    let (seq, _) = h.submit(spec(None));
    let mut end = finished(seq, None, 0);
    end.outcome = Some(returned(picloud_proto::MAX_FRAME_LEN + 1));
    h.batch(vec![Inbound::Agent { conn: AGENT, msg: AgentMsg::Finished(vec![end]) }]);
    // The query thread, as the server runs it.
    let poll = mio::Poll::new().unwrap();
    let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
    let (to_query, queries) = crossbeam_channel::unbounded();
    let (to_io, from_query) = crossbeam_channel::unbounded();
    let snapshots = h.core.snapshots();
    let thread = std::thread::spawn(move || crate::server::query::run(queries, snapshots, to_io, waker));
    let request = ClientRequest::Results(vec![JobRef::Job(seq)]);
    to_query.send(crate::server::query::QueryJob { conn: CLIENT, request, uid: 1000, floor: 0 }).unwrap();
    let Outbound::Send { bytes, answers, .. } = from_query.recv().unwrap() else { panic!("no reply") };
    assert_eq!(answers, 1);
    assert!(bytes.len() < 1 << 20, "{} bytes sent", bytes.len());
    match picloud_proto::frame::decode::<ServerReply>(&bytes[4..]).unwrap() {
        ServerReply::Error(e) => {
            assert_eq!(e.kind, ErrorKind::Invalid);
            assert!(e.message.contains("over the limit"), "{}", e.message);
        }
        other => panic!("expected an error, got {other:?}"),
    }
    drop(to_query);
    thread.join().unwrap();
}

#[test]
fn a_wait_for_another_users_results_is_refused_at_once() {
    let mut h = Harness::with_agent(2);
    let (seq, _) = h.submit(spec(None));
    let bob = Caller { uid: 1001, gid: 1001, user: "bob".into() };
    let ask = |request| Inbound::Request { conn: CLIENT, caller: bob.clone(), request };
    let sent = h.batch(vec![ask(wait(&[seq], WaitUntil::All, WaitReply::Results))]);
    match &sent.replies[..] {
        [(ServerReply::Error(e), _)] => {
            assert_eq!(e.kind, ErrorKind::PermissionDenied);
            assert!(e.message.contains("belong to alice"), "{}", e.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Their states are anyone's to wait for; a wait for any of nothing is refused.
    let sent = h.batch(vec![ask(wait(&[seq], WaitUntil::All, WaitReply::States))]);
    assert!(sent.replies.is_empty(), "waits like any other");
    let sent = h.batch(vec![ask(wait(&[], WaitUntil::Any, WaitReply::States))]);
    assert!(matches!(&sent.replies[..], [(ServerReply::Error(e), _)] if e.kind == ErrorKind::Invalid));
}

#[test]
fn held_and_dependent_jobs_show_as_held_until_they_may_run() {
    let mut h = Harness::new();
    let (first, _) = h.submit(spec(None));
    let mut dependent = spec(None);
    dependent.depend = vec![Dependency { kind: DependKind::AfterOk, on: JobRef::Job(first) }];
    let (second, _) = h.submit(dependent);
    let mut held = spec(None);
    held.hold = true;
    let (third, _) = h.submit(held);
    let snap = h.snapshot();
    assert_eq!(state_of(&snap, &format!("{first}.srv")), JobState::Queued);
    assert_eq!(state_of(&snap, &format!("{second}.srv")), JobState::Held);
    assert_eq!(state_of(&snap, &format!("{third}.srv")), JobState::Held);
    h.check_counts();

    h.batch(vec![request(ClientRequest::Release(vec![JobRef::Job(third)]))]);
    assert_eq!(state_of(&h.snapshot(), &format!("{third}.srv")), JobState::Queued);

    // The first job runs and succeeds: the dependent becomes eligible and,
    // with two cores, starts at once.
    h.batch(join(AGENT, node_info(2), vec![]));
    assert_eq!(state_of(&h.snapshot(), &format!("{first}.srv")), JobState::Running);
    let sent = h
        .batch(vec![Inbound::Agent { conn: AGENT, msg: AgentMsg::Finished(vec![finished(first, None, 0)]) }]);
    assert!(starts(&sent).contains(&TaskId { seq: second, index: None }));
    let snap = h.snapshot();
    assert_eq!(state_of(&snap, &format!("{first}.srv")), JobState::Finished);
    assert_eq!(state_of(&snap, &format!("{second}.srv")), JobState::Running);
    h.check_counts();
}

#[test]
fn totals_follow_cancels_node_loss_and_purges() {
    let mut h = Harness::with_agent(2);
    let (array, _) = h.submit(spec(Some("1-6")));
    let (single, _) = h.submit(spec(None));
    h.check_counts();
    assert_eq!(h.core.jobs.counts().running, 2);
    assert_eq!(h.core.jobs.counts().queued, 4 + 1);
    h.batch(vec![request(ClientRequest::Cancel(vec![JobRef::Task(array, 6)]))]);
    h.check_counts();
    assert_eq!(h.core.jobs.counts().queued, 3 + 1);
    // The agent's connection closes: its node is down, its two tasks
    // wait for it to come back; it does not, and they end, the rest run
    // nowhere.
    h.batch(vec![Inbound::Closed(AGENT)]);
    h.check_counts();
    assert_eq!(h.core.jobs.counts().running, 2);
    assert_eq!(node_states(&h), ["down"]);
    h.agent_stays_away();
    h.check_counts();
    assert_eq!(h.core.jobs.counts().running, 0);
    assert_eq!(node_states(&h), ["down"]);
    h.batch(vec![request(ClientRequest::Cancel(vec![JobRef::Array(array), JobRef::Job(single)]))]);
    h.check_counts();
    assert_eq!(h.core.jobs.counts().finished, 2);
    assert_eq!(state_of(&h.snapshot(), &format!("{array}[3].srv")), JobState::Finished);
    // Purge everything finished.
    h.core.keep_finished = Duration::ZERO;
    h.core.last_purge -= PURGE_EVERY;
    h.batch(Vec::new());
    assert_eq!(h.snapshot().job_count(), 0);
    h.check_counts();
    assert_eq!(h.core.jobs.counts(), Default::default());
}

fn node_states(h: &Harness) -> Vec<String> {
    match h.snapshot().answer(&ClientRequest::Nodes) {
        Some(ServerReply::Nodes(n)) => n.into_iter().map(|n| n.state).collect(),
        other => panic!("{other:?}"),
    }
}

fn running(task: TaskId, cpus: Vec<u32>) -> TaskRunning {
    TaskRunning { task, cpus, gpus: Vec::new() }
}

#[test]
fn an_agent_that_reconnects_keeps_the_tasks_it_still_runs() {
    let mut h = Harness::with_agent(2);
    let (array, _) = h.submit(spec(Some("1-4")));
    let started = h.snapshot();
    let pus = |i: u32| -> Vec<u32> {
        let info = stat(&started, true).into_iter().find(|j| j.id == format!("{array}[{i}].srv")).unwrap();
        info.cpus
    };
    let (one, two) = (TaskId { seq: array, index: Some(1) }, TaskId { seq: array, index: Some(2) });
    let (pus1, pus2) = (pus(1), pus(2));
    h.batch(vec![Inbound::Closed(AGENT)]);
    // Away: nothing new starts, a kill waits for the agent.
    h.batch(vec![request(ClientRequest::Cancel(vec![JobRef::Task(array, 2)]))]);
    assert_eq!(h.core.jobs.counts().running, 2);
    // Back on a new connection, still running task 1 and task 2; task 2
    // is killed again, nothing is queued again, and the node takes work.
    const BACK: ConnId = ConnId(21);
    let sent = h.batch(join(BACK, node_info(2), vec![running(one, pus1), running(two, pus2)]));
    assert!(
        sent.to_agents
            .iter()
            .any(|(c, m)| *c == BACK && matches!(m, ToAgent::Kill { task, .. } if *task == two)),
        "{sent:?}"
    );
    assert!(starts(&sent).is_empty(), "no core is free: {sent:?}");
    assert_eq!(node_states(&h), ["up"]);
    h.check_counts();
    let sent = h.batch(vec![Inbound::Agent {
        conn: BACK,
        msg: AgentMsg::Finished(vec![finished(array, Some(1), 0)]),
    }]);
    assert_eq!(starts(&sent), [TaskId { seq: array, index: Some(3) }]);
    let stat = stat(&h.snapshot(), true);
    let task1 = stat.iter().find(|j| j.id == format!("{array}[1].srv")).unwrap();
    assert_eq!(task1.run_count, 1, "ran once: {task1:?}");
    h.check_counts();
}

#[test]
fn an_agent_back_from_away_is_told_to_forget_the_jobs_it_kept() {
    let mut h = Harness::with_agent(1);
    let (seq, _) = h.submit(spec(None));
    let task = TaskId { seq, index: None };
    h.batch(vec![Inbound::Closed(AGENT)]);
    const BACK: ConnId = ConnId(21);
    let cpus = stat(&h.snapshot(), false).into_iter().find(|j| j.task == task).unwrap().cpus;
    h.batch(join(BACK, node_info(1), vec![running(task, cpus)]));
    let sent =
        h.batch(vec![Inbound::Agent { conn: BACK, msg: AgentMsg::Finished(vec![finished(seq, None, 0)]) }]);
    assert!(
        sent.to_agents
            .iter()
            .any(|(c, m)| *c == BACK && matches!(m, ToAgent::Forget { seq: s } if *s == seq)),
        "{sent:?}"
    );
}

#[test]
fn a_node_back_with_another_shape_does_not_keep_tasks_on_the_old_one() {
    let mut h = Harness::with_agent(2);
    h.submit(spec(Some("1-2")));
    let cpus: Vec<(TaskId, Vec<u32>)> = stat(&h.snapshot(), true)
        .into_iter()
        .filter(|j| j.task.index.is_some())
        .map(|j| (j.task, j.cpus))
        .collect();
    assert_eq!(cpus.len(), 2);
    h.batch(vec![Inbound::Closed(AGENT)]);
    // The same host with four cores now, still running both.
    let back = cpus.iter().map(|(t, c)| running(*t, c.clone())).collect();
    h.batch(join(ConnId(21), node_info(4), back));
    h.core.core.sanity_check();
    h.check_counts();
    assert_eq!(h.core.core.running_tasks(), 2, "taken back on the new shape");
    assert_eq!(h.core.core.free_cores(), 2);
}

#[test]
fn an_agent_that_comes_back_without_its_tasks_loses_them_at_once() {
    let mut h = Harness::with_agent(2);
    let (array, _) = h.submit(spec(Some("1-2")));
    h.batch(vec![Inbound::Closed(AGENT)]);
    assert_eq!(h.core.jobs.counts().running, 2);
    // A new agent process: it runs none of them. Both are queued again and
    // start on it.
    let sent = h.batch(join(ConnId(21), node_info(2), vec![]));
    let mut again = starts(&sent);
    again.sort();
    assert_eq!(again, [TaskId { seq: array, index: Some(1) }, TaskId { seq: array, index: Some(2) }]);
    h.check_counts();
}

#[test]
fn stop_tells_agents_and_waiters() {
    let mut h = Harness::with_agent(1);
    let (seq, _) = h.submit(spec(None));
    h.batch(vec![request(ClientRequest::wait_all(vec![JobRef::Job(seq)], None))]);
    h.core.handle(Inbound::Stop);
    h.core.end_batch();
    h.core.shut_down();
    let sent = h.batch(Vec::new());
    assert!(sent.to_agent.contains(&ToAgent::Shutdown));
    assert!(matches!(&sent.replies[..], [(ServerReply::Error(e), _)] if e.kind == ErrorKind::ShuttingDown));
}

/// Counts of the read-your-writes stress tests.
const COUNT: usize = if cfg!(miri) { 50 } else { 2_000 };

/// The real loop on its thread, a reader on another: every reply's version is
/// published when the reply arrives, and the snapshot of that version shows
/// the job the reply names.
#[test]
fn stress_read_your_writes() {
    let (to_core, inbox) = unbounded();
    let (out, from_core) = unbounded();
    let core = CoreLoop::new(&config(), out, || {});
    let snapshots = core.snapshots();
    let thread = std::thread::spawn(move || core.run(inbox));
    for msg in join(AGENT, node_info(2), vec![]) {
        to_core.send(msg).unwrap();
    }
    let mut answered = 0;
    let mut last_version = 0;
    let mut sent = 0;
    while answered < COUNT {
        // Keep a few submissions in flight so that batches form.
        while sent < COUNT && sent - answered < 8 {
            to_core.send(submit(spec(Some("1-3")))).unwrap();
            sent += 1;
        }
        match from_core.recv_timeout(Duration::from_secs(10)).expect("the core answers") {
            Outbound::Send { conn, bytes, version, .. } if conn == CLIENT => {
                assert!(version >= last_version, "versions only grow");
                last_version = version;
                let snap = snapshots.load();
                assert!(snap.version() >= version, "a reply never runs ahead of its snapshot");
                let mut reader = picloud_proto::FrameReader::new();
                reader.push(&bytes);
                while let Some(p) = reader.next_payload().unwrap() {
                    let reply: ServerReply = picloud_proto::frame::decode(p).unwrap();
                    let ServerReply::Submitted { seq, .. } = reply else { panic!("{reply:?}") };
                    let reply = snap.answer(&ClientRequest::Stat(StatRequest {
                        jobs: vec![JobRef::Array(seq)],
                        ..Default::default()
                    }));
                    assert!(matches!(reply, Some(ServerReply::Jobs { jobs, .. }) if jobs.len() == 1));
                    answered += 1;
                }
            }
            Outbound::Send { .. } => {}
            Outbound::Stopped => panic!("stopped early"),
        }
    }
    to_core.send(Inbound::Stop).unwrap();
    thread.join().unwrap().unwrap();
    assert!(from_core.iter().any(|m| matches!(m, Outbound::Stopped)));
}

/// A reader thread loads snapshots while the core thread changes them: every
/// snapshot it sees is whole (its totals match its jobs) and versions only grow.
#[test]
fn stress_snapshots_are_consistent() {
    let (to_core, inbox) = unbounded();
    let (out, from_core) = unbounded();
    let core = CoreLoop::new(&config(), out, || {});
    let snapshots = core.snapshots();
    let thread = std::thread::spawn(move || core.run(inbox));
    let reader = std::thread::spawn(move || {
        let mut last = 0;
        loop {
            let snap = snapshots.load();
            assert!(snap.version() >= last);
            last = snap.version();
            let Some(ServerReply::ServerStatus(s)) = snap.answer(&ClientRequest::ServerStatus) else {
                panic!()
            };
            let jobs = stat(&snap, false);
            let queued: u64 = jobs.iter().map(|j| j.array_counts.map_or(1, |c| c.queued)).sum();
            assert_eq!(s.queued, queued);
            if jobs.len() == COUNT {
                return;
            }
        }
    });
    for _ in 0..COUNT {
        to_core.send(submit(spec(Some("1-5")))).unwrap();
    }
    reader.join().unwrap();
    to_core.send(Inbound::Stop).unwrap();
    thread.join().unwrap().unwrap();
    drop(from_core);
}

#[test]
fn ngpus_and_place_become_the_core_request() {
    use crate::core::Placement;
    let other = |pairs: &[(&str, &str)]| {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>()
    };
    assert_eq!(super::gpus_and_placement(&[]), Ok((0, Placement::Compact)));
    assert_eq!(super::gpus_and_placement(&other(&[("ngpus", "2")])), Ok((2, Placement::Compact)));
    assert_eq!(super::gpus_and_placement(&other(&[("place", "scatter")])), Ok((0, Placement::Scatter)));
    assert_eq!(super::gpus_and_placement(&other(&[("place", "pack")])), Ok((0, Placement::Compact)));
    assert_eq!(super::gpus_and_placement(&other(&[("place", "excl")])), Ok((0, Placement::Exclusive)));
    assert_eq!(
        super::gpus_and_placement(&other(&[("place", "scatter:excl")])),
        Ok((0, Placement::Exclusive))
    );
    let err = super::gpus_and_placement(&other(&[("place", "sideways")])).unwrap_err();
    assert!(err.contains("sideways"), "{err}");
    assert!(super::gpus_and_placement(&other(&[("ngpus", "many")])).is_err());
}

mod durability;
mod faults;
mod reserve;
