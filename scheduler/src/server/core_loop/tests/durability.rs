//! The core thread on a journal: a server "killed" (its `CoreLoop` dropped
//! without stopping, so that only what was committed remains) and opened
//! again shows every job as it was; tasks running at the crash are queued
//! again or failed; Python outcomes survive; a full disk refuses requests
//! and loses nothing.

use std::path::Path;

use picloud_proto::{EXIT_CANCELLED, PythonOutcome, PythonStatus};

use super::*;
use crate::server::journal::tests::SmallDisk;
use crate::server::{JournalConfig, journal};

fn jconfig(state: &Path) -> ServerConfig {
    ServerConfig {
        state_dir: state.to_path_buf(),
        journal: JournalConfig { preallocate: 64 << 10, ..JournalConfig::default() },
        threads: Default::default(),
        ..config()
    }
}

pub(super) fn open(state: &Path) -> Harness {
    let (tx, rx) = unbounded();
    let core = CoreLoop::open(&jconfig(state), tx, || {}).expect("the journal opens");
    Harness { core, out: rx }
}

fn outcome(text: &str) -> PythonOutcome {
    PythonOutcome {
        status: PythonStatus::Returned,
        value: text.as_bytes().to_vec(),
        error: String::new(),
        traceback: String::new(),
        stdout: b"printed\n".to_vec(),
        stderr: Vec::new(),
        segments: Vec::new(),
    }
}

pub(super) fn report(ends: Vec<TaskEnd>) -> Inbound {
    Inbound::Agent { conn: AGENT, msg: AgentMsg::Finished(ends) }
}

pub(super) fn joined(cores: u32) -> Vec<Inbound> {
    join(AGENT, node_info(cores), vec![])
}

/// Builds a history with every kind of change and nothing running at the
/// end; `snapshot_midway` takes a snapshot in the middle of it.
fn history(h: &mut Harness, snapshot_midway: bool) {
    h.batch(joined(1));
    let (p, _) = h.submit(spec(None));
    let mut end = finished(p, None, 0);
    end.outcome = Some(Box::new(outcome("forty-two")));
    h.batch(vec![report(vec![end])]);
    let (r, _) = h.submit(spec(Some("1-3")));
    h.batch(vec![report(vec![finished(r, Some(1), 1)])]);
    if snapshot_midway {
        h.core.snapshot(false);
        assert!(h.core.last_snapshot.is_some(), "the snapshot was written");
    }
    h.batch(vec![report(vec![finished(r, Some(2), 0)])]);
    // Task 3 runs: cancel the array; the agent reports the kill.
    h.batch(vec![request(ClientRequest::Cancel(vec![JobRef::Array(r)]))]);
    h.batch(vec![report(vec![finished(r, Some(3), 256 + 15)])]);
    let (held, _) = h.submit(JobSpec { hold: true, ..spec(None) });
    h.submit(JobSpec {
        depend: vec![Dependency { kind: DependKind::AfterOk, on: JobRef::Job(held) }],
        ..spec(None)
    });
    // Never satisfiable: the array failed.
    h.submit(JobSpec {
        depend: vec![Dependency { kind: DependKind::AfterOk, on: JobRef::Array(r) }],
        ..spec(None)
    });
    // A job that starts, then loses its node with the agent.
    h.submit(spec(None));
    h.batch(vec![Inbound::Closed(AGENT)]);
    h.agent_stays_away();
    // Queued with no node; one of them held, then released.
    h.submit(spec(Some("5-9:2")));
    let (released, _) = h.submit(JobSpec { hold: true, ..spec(None) });
    h.batch(vec![request(ClientRequest::Release(vec![JobRef::Job(released)]))]);
    assert_eq!(state_of(&h.snapshot(), &format!("{released}.srv")), JobState::Queued);
    assert_eq!(h.core.core.running_tasks(), 0, "nothing runs at the crash");
}

fn restart_shows_the_same_jobs(snapshot_midway: bool) {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    history(&mut h, snapshot_midway);
    let before = stat(&h.snapshot(), true);
    let next = h.core.next_seq;
    drop(h); // killed: no clean stop, no final snapshot

    let mut h = open(state.path());
    assert_eq!(stat(&h.snapshot(), true), before, "qstat -x -t is the same after a restart");
    assert_eq!(h.core.next_seq, next, "sequence numbers go on");
    h.check_counts();
    h.core.core.sanity_check();
    // The restarted server goes on: a new agent runs the queued jobs; the
    // held job and the one depending on it wait.
    let sent = h.batch(joined(1));
    let first = starts(&sent);
    assert_eq!(first.len(), 1);
    let snap = h.snapshot();
    let held = before.iter().find(|j| j.state == JobState::Held && j.spec.depend.is_none()).unwrap().task.seq;
    assert_eq!(state_of(&snap, &format!("{held}.srv")), JobState::Held);
    assert_eq!(state_of(&snap, &format!("{}.srv", held + 1)), JobState::Held, "waits on the held job");
    let (seq, _) = h.submit(spec(None));
    assert_eq!(seq, next, "the first new job takes the next number");
}

#[test]
fn a_restart_from_the_journal_shows_every_job_as_it_was() {
    restart_shows_the_same_jobs(false);
}

#[test]
fn a_restart_from_a_snapshot_and_the_journal_shows_every_job_as_it_was() {
    restart_shows_the_same_jobs(true);
}

#[test]
fn a_clean_stop_leaves_a_snapshot_and_a_segment_with_the_usage_alone() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    history(&mut h, false);
    let before = stat(&h.snapshot(), true);
    h.core.shut_down();
    drop(h);
    let (recovered, _) = journal::open(state.path(), &jconfig(state.path()).journal).unwrap();
    assert!(recovered.snapshot.is_some());
    let replayed = crate::server::durable::replay(&recovered).unwrap();
    assert_eq!(replayed.changes, 1, "nothing to replay but the fair-share usage");
    assert!(replayed.usage.is_some_and(|(_, users)| users.len() == 1));
    drop(recovered);
    let h = open(state.path());
    assert_eq!(stat(&h.snapshot(), true), before);
}

#[test]
fn python_outcomes_survive_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    history(&mut h, false);
    drop(h);
    let h = open(state.path());
    let reply = h.snapshot().answer_as(&ClientRequest::Results(vec![JobRef::Job(1)]), 1000).unwrap();
    match reply {
        ServerReply::Results { results, .. } => {
            assert_eq!(results.len(), 1);
            assert_eq!(results[0].state, JobState::Finished);
            assert_eq!(results[0].outcome.as_deref(), Some(&outcome("forty-two")));
            assert_eq!(results[0].node.as_deref(), Some("node1"), "the node is still named");
        }
        other => panic!("expected results, got {other:?}"),
    }
}

#[test]
fn tasks_running_at_a_crash_are_queued_again_or_failed() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    h.batch(joined(4));
    let (r, _) = h.submit(spec(Some("1-3")));
    let (n, _) = h.submit(JobSpec { rerunnable: false, ..spec(None) });
    assert_eq!(h.core.core.running_tasks(), 4);
    h.batch(vec![report(vec![finished(r, Some(1), 0)])]);
    h.batch(vec![request(ClientRequest::Cancel(vec![JobRef::Task(r, 2)]))]);
    drop(h);

    let mut h = open(state.path());
    // No agent reports the tasks within the grace period.
    assert_eq!(h.core.core.unconfirmed().count(), 3);
    h.core.grace_until = Some(Instant::now());
    h.batch(vec![]);
    let snap = h.snapshot();
    let jobs = stat(&snap, true);
    let get = |id: &str| jobs.iter().find(|j| j.id == id).unwrap_or_else(|| panic!("{id}")).clone();
    assert_eq!(get(&format!("{r}[1].srv")).exit_status, Some(0), "a finished task stays finished");
    let cancelled = get(&format!("{r}[2].srv"));
    assert_eq!((cancelled.state, cancelled.exit_status), (JobState::Finished, Some(EXIT_CANCELLED)));
    assert!(cancelled.comment.unwrap().contains("deleted"), "being killed, it ends as deleted");
    let requeued = get(&format!("{r}[3].srv"));
    assert_eq!(requeued.state, JobState::Queued, "a rerunnable task is queued again");
    assert!(requeued.exec_host.is_none());
    let lost = get(&format!("{n}.srv"));
    assert_eq!((lost.state, lost.exit_status), (JobState::Finished, Some(picloud_proto::EXIT_NEVER_RAN)));
    assert!(lost.comment.as_deref().unwrap_or("").contains("node1 was lost"), "{:?}", lost.comment);
    h.check_counts();
    h.core.core.sanity_check();

    // A new agent runs task 3 again, and only it; then the array finishes.
    let sent = h.batch(joined(4));
    assert_eq!(starts(&sent), vec![TaskId { seq: r, index: Some(3) }]);
    h.batch(vec![report(vec![finished(r, Some(3), 0)])]);
    assert_eq!(state_of(&h.snapshot(), &format!("{r}[].srv")), JobState::Finished);

    // And that too survives the next crash, whose replay decides nothing new.
    let before = stat(&h.snapshot(), true);
    drop(h);
    let h = open(state.path());
    assert_eq!(stat(&h.snapshot(), true), before);
}

#[test]
fn dependencies_met_or_failed_before_a_crash_are_honoured_after_it() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    h.batch(joined(1));
    let (a, _) = h.submit(spec(Some("1-4")));
    let on_task = |i| Dependency { kind: DependKind::AfterOk, on: JobRef::Task(a, i) };
    let on_array = Dependency { kind: DependKind::AfterNotOk, on: JobRef::Array(a) };
    // Held so that they do not take the core: they wait on `a` or its tasks.
    let (t1, _) = h.submit(JobSpec { depend: vec![on_task(1)], hold: true, ..spec(None) });
    let (t3, _) = h.submit(JobSpec { depend: vec![on_task(3)], ..spec(None) });
    let (any, _) = h.submit(JobSpec { depend: vec![on_array], ..spec(None) });
    h.batch(vec![report(vec![finished(a, Some(1), 0)])]);
    h.batch(vec![report(vec![finished(a, Some(2), 9)])]);
    drop(h); // task 3 was running

    let mut h = open(state.path());
    h.core.core.sanity_check();
    let snap = h.snapshot();
    assert_eq!(state_of(&snap, &format!("{t1}.srv")), JobState::Held, "held, its dependency met");
    assert_eq!(state_of(&snap, &format!("{t3}.srv")), JobState::Held, "waits on task 3, queued again");
    h.batch(joined(1));
    h.batch(vec![report(vec![finished(a, Some(3), 0)])]);
    h.batch(vec![report(vec![finished(a, Some(4), 0)])]);
    // Task 2 failed before the crash: afternotok on the array is met.
    let snap = h.snapshot();
    assert_ne!(state_of(&snap, &format!("{any}.srv")), JobState::Held);
    assert_ne!(state_of(&snap, &format!("{t3}.srv")), JobState::Held);
    h.batch(vec![request(ClientRequest::Release(vec![JobRef::Job(t1)]))]);
    assert_ne!(state_of(&h.snapshot(), &format!("{t1}.srv")), JobState::Held);
    h.core.core.sanity_check();
}

#[test]
fn a_full_disk_refuses_submissions_and_loses_nothing() {
    let Some(disk) = SmallDisk::mount("1m") else { return };
    let state = disk.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    // Room to give back later.
    let filler = disk.path().join("filler");
    std::fs::write(&filler, vec![1u8; 300 << 10]).unwrap();
    let mut h = open(&state);
    h.batch(joined(1));
    let big = |k: usize| JobSpec { env: vec![(format!("BIG{k}"), "x".repeat(40 << 10))], ..spec(None) };
    let mut accepted = Vec::new();
    let refusal = loop {
        let sent = h.batch(vec![submit(big(accepted.len()))]);
        match &sent.replies[..] {
            [(ServerReply::Submitted { seq, .. }, _)] => accepted.push(*seq),
            [(ServerReply::Error(e), _)] => break e.clone(),
            other => panic!("unexpected {other:?}"),
        }
        assert!(accepted.len() < 40, "1 MiB cannot hold 40 submissions of 40 KiB");
    };
    assert!(refusal.message.contains("no room"), "{}", refusal.message);
    assert!(refusal.message.contains("Nothing was changed"), "{}", refusal.message);
    assert!(accepted.len() >= 5, "{} accepted", accepted.len());
    let listed: Vec<u64> = stat(&h.snapshot(), false).iter().map(|j| j.task.seq).collect();
    assert_eq!(listed, accepted, "the refused job is not queued");
    // The agent's reports are still recorded.
    h.batch(vec![report(vec![finished(accepted[0], None, 0)])]);
    assert_eq!(state_of(&h.snapshot(), &format!("{}.srv", accepted[0])), JobState::Finished);
    // Space freed: submissions are accepted again.
    std::fs::remove_file(&filler).unwrap();
    let (seq, _) = h.submit(spec(None));
    accepted.push(seq);
    let before = stat(&h.snapshot(), true);
    drop(h);
    let h = open(&state);
    let after = stat(&h.snapshot(), true);
    let seqs = |jobs: &[JobInfo]| jobs.iter().map(|j| j.task.seq).collect::<Vec<_>>();
    assert_eq!(seqs(&after), seqs(&before));
    assert_eq!(seqs(&after), accepted, "every acknowledged job, and only those");
}

#[test]
fn agents_hear_of_committed_jobs_before_the_sync_and_of_new_ones_after_it() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    h.batch(joined(1));
    let (a, _) = h.submit(spec(Some("1-3")));
    // A batch whose sync fails: the next task of the array (a job on disk
    // already) was handed to the agent before the sync; the new job's
    // reply and start never leave, and the loop stops.
    h.core.journal.as_mut().unwrap().fail_commits = true;
    let sent = h.batch(vec![report(vec![finished(a, Some(1), 0)]), submit(spec(None))]);
    assert_eq!(starts(&sent), vec![TaskId { seq: a, index: Some(2) }]);
    assert!(sent.replies.is_empty(), "no reply before the sync: {:?}", sent.replies);
    assert!(h.core.stopping && h.core.failed.is_some());
    drop(h);
    // What was acknowledged is there; the unacknowledged job is not.
    let h = open(state.path());
    let jobs = stat(&h.snapshot(), false);
    assert_eq!(jobs.iter().map(|j| j.task.seq).collect::<Vec<_>>(), vec![a]);
}

#[test]
fn a_new_job_starts_only_after_its_submission_is_synced() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    h.batch(joined(1));
    h.core.journal.as_mut().unwrap().fail_commits = true;
    let sent = h.batch(vec![submit(spec(None))]);
    assert!(starts(&sent).is_empty() && sent.replies.is_empty(), "{sent:?}");
    assert!(!sent.to_agent.iter().any(|m| matches!(m, ToAgent::Define(_))), "not even defined");
}

#[test]
fn a_dependency_on_a_task_of_a_failed_array_is_judged_by_that_task() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    h.batch(joined(1));
    let (a, _) = h.submit(spec(Some("1-2")));
    let (d, _) = h.submit(JobSpec {
        depend: vec![Dependency { kind: DependKind::AfterOk, on: JobRef::Task(a, 1) }],
        hold: true,
        ..spec(None)
    });
    h.batch(vec![report(vec![finished(a, Some(1), 0)])]);
    h.batch(vec![report(vec![finished(a, Some(2), 1)])]);
    assert_eq!(state_of(&h.snapshot(), &format!("{a}[].srv")), JobState::Finished);
    drop(h);
    // Task 1 succeeded though the array failed: still only held.
    let mut h = open(state.path());
    assert_eq!(state_of(&h.snapshot(), &format!("{d}.srv")), JobState::Held);
    h.batch(vec![request(ClientRequest::Release(vec![JobRef::Job(d)]))]);
    let sent = h.batch(joined(1));
    assert_eq!(starts(&sent), vec![TaskId { seq: d, index: None }]);
}

#[test]
fn fair_share_usage_survives_a_crash_and_a_clean_stop() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    h.batch(joined(2));
    let (seq, _) = h.submit(spec(None));
    std::thread::sleep(Duration::from_millis(300));
    h.batch(vec![report(vec![finished(seq, None, 0)])]);
    let uid = caller().uid;
    let before = h.core.core.usage(uid);
    assert!(before >= 0.29, "one core for 0.3 s: {before}");
    // Recorded once a minute has passed; then killed.
    h.core.last_usage -= USAGE_EVERY;
    h.batch(Vec::new());
    drop(h);
    let mut h = open(state.path());
    let after = h.core.core.usage(uid);
    assert!((after - before).abs() <= 1e-3 * before, "{before} before the crash, {after} after");
    // A snapshot carries it too (the segments before it are gone).
    h.core.snapshot(false);
    h.core.snapshot(false);
    drop(h);
    let h = open(state.path());
    let again = h.core.core.usage(uid);
    assert!((again - before).abs() <= 1e-3 * before, "{before} before, {again} after a snapshot");
}

#[test]
fn a_journal_of_an_older_version_goes_on_in_a_new_segment() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    let (seq, _) = h.submit(spec(None));
    drop(h);
    let last = journal::tests::segment_versions(state.path()).last().unwrap().0;
    journal::tests::set_segment_version(state.path(), last, journal::FORMAT_VERSION - 1);
    let mut h = open(state.path());
    assert_eq!(state_of(&h.snapshot(), &format!("{seq}.srv")), JobState::Queued);
    h.submit(spec(None));
    // What this version writes is in a segment of this version, after a
    // snapshot: an older picloud refuses the directory instead of failing
    // on a change it does not know.
    let versions = journal::tests::segment_versions(state.path());
    assert_eq!(versions.last(), Some(&(last + 1, journal::FORMAT_VERSION)), "{versions:?}");
    assert_eq!(h.core.last_snapshot, Some(last + 1));
}

#[test]
fn restored_usage_orders_the_restored_queue() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    h.batch(joined(1));
    let (ran, _) = h.submit(spec(None));
    std::thread::sleep(Duration::from_millis(100));
    h.batch(vec![report(vec![finished(ran, None, 0)])]);
    h.core.last_usage -= USAGE_EVERY;
    h.batch(vec![Inbound::Closed(AGENT)]);
    h.agent_stays_away();
    // Queued with no node: alice's job first, then bob's.
    let (alices, _) = h.submit(spec(None));
    let bob = Caller { uid: 1001, gid: 1001, user: "bob".into() };
    let sent = h.batch(vec![Inbound::Request {
        conn: CLIENT,
        caller: bob,
        request: ClientRequest::Submit(Box::new(spec(None))),
    }]);
    let bobs = match &sent.replies[..] {
        [(ServerReply::Submitted { seq, .. }, _)] => *seq,
        other => panic!("{other:?}"),
    };
    drop(h);
    // Alice has used the cluster and bob has not: his job goes first, from
    // the restart on.
    let h = open(state.path());
    assert!(h.core.core.usage(caller().uid) > 0.0);
    assert_eq!(h.core.core.queue_order().collect::<Vec<_>>(), [bobs, alices]);
}

#[test]
fn after_a_restart_an_agent_that_drops_before_its_report_does_not_lose_its_tasks() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    h.batch(joined(1));
    let (seq, _) = h.submit(spec(None));
    let task = TaskId { seq, index: None };
    let cpus = stat(&h.snapshot(), false).into_iter().find(|j| j.task == task).unwrap().cpus;
    drop(h);
    let mut h = open(state.path());
    // Its first connection breaks before it says what it runs: the task
    // waits for the grace period, and the next connection keeps it.
    h.batch(vec![Inbound::AgentJoined { conn: AGENT, info: node_info(1) }, Inbound::Closed(AGENT)]);
    assert_eq!(state_of(&h.snapshot(), &format!("{seq}.srv")), JobState::Running);
    h.batch(join(ConnId(21), node_info(1), vec![TaskRunning { task, cpus, gpus: Vec::new() }]));
    assert!(h.core.core.is_running(task));
    let job = stat(&h.snapshot(), false).into_iter().find(|j| j.task == task).unwrap();
    assert_eq!(job.run_count, 1, "{job:?}");
}
