//! Reserved sequence numbers (`Reserve`, `SubmitReserved`): a job takes the
//! number it names, once and in increasing order, only on the connection
//! that reserved it while it is open, and afterwards only for its user, on
//! any connection, once (a submission sent again is answered as queued); a
//! refusal changes nothing; a job under a low reserved number submitted
//! after higher ones still starts only once its own submission is synced,
//! and survives a restart, as the reservations do.

use picloud_proto::{MAX_RESERVED, ProtoError};

use super::durability::{joined, open, report};
use super::*;

const OTHER: ConnId = ConnId(11);

fn on(conn: ConnId, request: ClientRequest) -> Inbound {
    Inbound::Request { conn, caller: caller(), request }
}

fn reserve(conn: ConnId, count: u32) -> Inbound {
    on(conn, ClientRequest::Reserve { count })
}

fn submit_reserved(conn: ConnId, seq: u64, s: JobSpec) -> Inbound {
    on(conn, ClientRequest::SubmitReserved { seq, spec: Box::new(s) })
}

/// The same, from another user.
fn submit_reserved_by_bob(conn: ConnId, seq: u64) -> Inbound {
    let caller = Caller { uid: 1001, gid: 1001, user: "bob".into() };
    Inbound::Request {
        conn,
        caller,
        request: ClientRequest::SubmitReserved { seq, spec: Box::new(spec(None)) },
    }
}

/// The one reply of a batch.
fn reply(sent: &Sent) -> &ServerReply {
    match &sent.replies[..] {
        [(reply, _)] => reply,
        other => panic!("expected one reply, got {other:?}"),
    }
}

fn reserved(h: &mut Harness, conn: ConnId, count: u32) -> u64 {
    match reply(&h.batch(vec![reserve(conn, count)])) {
        ServerReply::Reserved { first, count: c } if *c == count => *first,
        other => panic!("expected Reserved, got {other:?}"),
    }
}

/// Submits under `seq` and returns the job's id.
fn accepted(h: &mut Harness, conn: ConnId, seq: u64, s: JobSpec) -> String {
    match reply(&h.batch(vec![submit_reserved(conn, seq, s)])) {
        ServerReply::Submitted { seq: got, id } if *got == seq => id.clone(),
        other => panic!("expected job {seq} submitted, got {other:?}"),
    }
}

/// Sends `msg`, expects an error, and checks that no job appeared.
fn refused(h: &mut Harness, msg: Inbound) -> ProtoError {
    let before = stat(&h.snapshot(), true);
    let next = h.core.next_seq;
    let sent = h.batch(vec![msg]);
    let ServerReply::Error(e) = reply(&sent) else { panic!("expected a refusal, got {:?}", sent.replies) };
    assert_eq!(stat(&h.snapshot(), true), before, "a refusal changes no job");
    assert_eq!(h.core.next_seq, next, "a refusal takes no number");
    e.clone()
}

fn not_reserved(h: &mut Harness, conn: ConnId, seq: u64) {
    not_reserved_for(h, submit_reserved(conn, seq, spec(None)), seq);
}

fn not_reserved_for(h: &mut Harness, msg: Inbound, seq: u64) {
    let e = refused(h, msg);
    assert_eq!(e.kind, ErrorKind::Invalid);
    assert!(e.message.contains(&format!("job number {seq} is not reserved by this connection")), "{e}");
}

/// A submission under `seq` sent again: answered as queued, changing nothing.
fn queued_already(h: &mut Harness, conn: ConnId, seq: u64) {
    let before = stat(&h.snapshot(), true);
    let sent = h.batch(vec![submit_reserved(conn, seq, spec(Some("1-5")))]);
    let ServerReply::Submitted { seq: got, id } = reply(&sent) else { panic!("{sent:?}") };
    assert_eq!(*got, seq);
    let id = id.strip_suffix(".srv").unwrap();
    assert!(id == seq.to_string() || id == format!("{seq}[]"), "the job's own id, not {id}");
    assert_eq!(stat(&h.snapshot(), true), before, "nothing changed");
}

/// A submission under `seq` sent again whose first one is not there.
fn not_again(h: &mut Harness, conn: ConnId, seq: u64) {
    let e = refused(h, submit_reserved(conn, seq, spec(None)));
    assert!(e.message.contains("refused or its job has ended and been forgotten"), "{e}");
}

fn seqs(h: &Harness) -> Vec<u64> {
    stat(&h.snapshot(), false).iter().map(|j| j.task.seq).collect()
}

#[test]
fn reserved_numbers_name_the_jobs_submitted_under_them() {
    let mut h = Harness::new();
    let (one, _) = h.submit(spec(None));
    assert_eq!(one, 1);
    let first = reserved(&mut h, CLIENT, 5);
    assert_eq!(first, 2, "the numbers after the last one given");
    // Gaps are allowed; the last number too.
    assert_eq!(accepted(&mut h, CLIENT, 3, spec(None)), "3.srv");
    assert_eq!(accepted(&mut h, CLIENT, 6, spec(Some("1-2"))), "6[].srv");
    // A plain submission takes the number after the reservation.
    let (next, _) = h.submit(spec(None));
    assert_eq!(next, 7);
    assert_eq!(seqs(&h), vec![1, 3, 6, 7]);
    assert_eq!(state_of(&h.snapshot(), "6[1].srv"), JobState::Queued);
    h.check_counts();
    h.core.core.sanity_check();
}

#[test]
fn numbers_not_reserved_by_the_connection_are_refused_and_change_nothing() {
    let mut h = Harness::new();
    // No reservation at all.
    not_reserved(&mut h, CLIENT, 1);
    // Counts out of range reserve nothing.
    for count in [0, MAX_RESERVED + 1] {
        let e = refused(&mut h, reserve(CLIENT, count));
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(e.message.contains(&count.to_string()), "{e}");
    }
    assert_eq!(reserved(&mut h, CLIENT, 3), 1, "the refused reservations took no number");
    // Outside the range, on either side.
    not_reserved(&mut h, CLIENT, 0);
    not_reserved(&mut h, CLIENT, 4);
    accepted(&mut h, CLIENT, 2, spec(None));
    // Used already, or lower than one used.
    not_reserved(&mut h, CLIENT, 2);
    not_reserved(&mut h, CLIENT, 1);
    // An invalid job uses up nothing: its number is still there.
    let e = refused(
        &mut h,
        submit_reserved(
            CLIENT,
            3,
            JobSpec { resources: picloud_proto::Resources { ncpus: 0, ..Default::default() }, ..spec(None) },
        ),
    );
    assert!(e.message.contains("ncpus"), "{e}");
    accepted(&mut h, CLIENT, 3, spec(None));
    not_reserved(&mut h, CLIENT, 3);
    // Another connection's numbers are its own.
    let other = reserved(&mut h, OTHER, 2);
    assert_eq!(other, 4);
    not_reserved(&mut h, CLIENT, other);
    accepted(&mut h, OTHER, other, spec(None));
    // A new reservation replaces the previous one.
    let first = reserved(&mut h, OTHER, 1);
    assert_eq!(first, 6);
    not_reserved(&mut h, OTHER, 5);
    assert_eq!(seqs(&h), vec![2, 3, 4]);
}

#[test]
fn a_reserved_job_queues_behind_jobs_submitted_before_it() {
    let mut h = Harness::new();
    let first = reserved(&mut h, CLIENT, 4);
    let (later, _) = h.submit(spec(None));
    assert!(later > first + 3);
    accepted(&mut h, CLIENT, first, spec(None));
    assert_eq!(h.core.core.queue_order().collect::<Vec<_>>(), vec![later, first]);
}

#[test]
fn numbers_of_a_closed_connection_stay_its_users_once_each() {
    let mut h = Harness::new();
    let first = reserved(&mut h, CLIENT, 4);
    accepted(&mut h, CLIENT, first + 1, spec(None));
    h.batch(vec![Inbound::Closed(CLIENT)]);
    // Not another user's, on any connection.
    not_reserved_for(&mut h, submit_reserved_by_bob(OTHER, first + 2), first + 2);
    // The user's own, sent again on a new connection: the one queued
    // already is answered as queued, the one skipped is not queued now.
    queued_already(&mut h, OTHER, first + 1);
    not_again(&mut h, OTHER, first);
    // One never sent is queued, once.
    accepted(&mut h, OTHER, first + 3, spec(None));
    queued_already(&mut h, OTHER, first + 3);
    not_again(&mut h, OTHER, first + 2);
    // And none is given to another job.
    let (next, _) = h.submit(spec(None));
    assert_eq!(next, first + 4);
    assert_eq!(seqs(&h), vec![first + 1, first + 3, first + 4]);
    h.check_counts();
    h.core.core.sanity_check();
}

/// Whether a job's start waits for the sync of its own submission, not of
/// the highest number given: a reserved number below a synced job's is
/// submitted in a batch whose write fails, so that what was held for the
/// sync never leaves.
#[test]
fn a_reserved_job_below_a_synced_one_starts_only_after_its_own_sync() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    h.batch(joined(2));
    let first = reserved(&mut h, CLIENT, 10);
    // A job numbered above the whole reservation, synced and started.
    let (above, _) = h.submit(spec(None));
    assert_eq!(above, first + 10);
    // Its start left with the reply, after the sync; nothing else is pending.
    assert!(h.core.unsynced_seqs.is_empty() && h.core.pending_agents.is_empty());
    assert_eq!(h.core.core.running_tasks(), 1);
    h.core.journal.as_mut().unwrap().fail_commits = true;
    let sent = h.batch(vec![submit_reserved(CLIENT, first + 3, spec(None))]);
    assert_eq!(h.core.core.running_tasks(), 2, "the core started it");
    assert!(starts(&sent).is_empty() && sent.replies.is_empty(), "{sent:?}");
    assert!(!sent.to_agent.iter().any(|m| matches!(m, ToAgent::Define(_))), "not even defined");
}

/// The same, with the sync succeeding: the job starts with the batch that
/// submitted it, once synced, and is then no longer waited for.
#[test]
fn a_reserved_job_is_synced_with_its_batch() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    h.batch(joined(2));
    let first = reserved(&mut h, CLIENT, 10);
    h.submit(spec(None));
    let sent = h.batch(vec![submit_reserved(CLIENT, first + 3, spec(Some("1-3")))]);
    assert!(matches!(reply(&sent), ServerReply::Submitted { seq, .. } if *seq == first + 3));
    assert_eq!(starts(&sent), vec![TaskId { seq: first + 3, index: Some(1) }]);
    assert!(h.core.unsynced.is_empty() && h.core.unsynced_seqs.is_empty());
}

#[test]
fn reserved_jobs_survive_a_restart_and_later_numbers_follow_them() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    h.batch(joined(1));
    let first = reserved(&mut h, CLIENT, 5);
    assert_eq!(first, 1);
    // Numbered after the reservation, submitted before the jobs under it.
    let (above, _) = h.submit(spec(None));
    assert_eq!(above, 6);
    h.batch(vec![report(vec![finished(above, None, 0)])]);
    // Jobs below it, one depending on it (held, so that it does not run).
    let after_it = JobSpec {
        depend: vec![Dependency { kind: DependKind::AfterOk, on: JobRef::Job(above) }],
        ..spec(None)
    };
    accepted(&mut h, CLIENT, 2, JobSpec { hold: true, ..after_it });
    accepted(&mut h, CLIENT, 4, JobSpec { hold: true, ..spec(None) });
    accepted(&mut h, CLIENT, 5, spec(Some("1-3")));
    // The highest number submitted is a reserved one.
    assert_eq!(reserved(&mut h, OTHER, 3), 7);
    accepted(&mut h, OTHER, 8, spec(None));
    let before = stat(&h.snapshot(), true);
    drop(h); // killed

    let mut h = open(state.path());
    assert_eq!(stat(&h.snapshot(), true), before, "qstat -x -t is the same after a restart");
    assert_eq!(seqs(&h), vec![2, 4, 5, 6, 8]);
    h.core.core.sanity_check();
    // The job it depends on had ended: released, it may run.
    h.batch(vec![request(ClientRequest::Release(vec![JobRef::Job(2)]))]);
    assert_eq!(state_of(&h.snapshot(), "2.srv"), JobState::Queued, "its dependency was met before the crash");
    // New numbers follow every number reserved, used or not (9 was not):
    // a client may have named a job by it.
    let (next, _) = h.submit(spec(None));
    assert_eq!(next, 10, "the first job after a restart");
    // Their user may send the submissions again, on any connection.
    queued_already(&mut h, OTHER, 5);
    not_again(&mut h, CLIENT, 3);
    accepted(&mut h, CLIENT, 9, spec(None));
    not_reserved_for(&mut h, submit_reserved_by_bob(OTHER, 9), 9);
}

/// A snapshot holds no reservation: they are recorded again after it, with
/// how far each was used; jobs submitted after it move that on.
#[test]
fn reservations_survive_a_snapshot_and_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let mut h = open(state.path());
    let first = reserved(&mut h, CLIENT, 10);
    accepted(&mut h, CLIENT, first + 2, spec(None));
    h.batch(vec![Inbound::Closed(CLIENT)]);
    let open_one = reserved(&mut h, OTHER, 5);
    accepted(&mut h, OTHER, open_one, spec(None));
    // A job that ended and was forgotten before the snapshot.
    h.batch(vec![request(ClientRequest::Cancel(vec![JobRef::Job(first + 2)]))]);
    h.core.jobs.remove(&[first + 2]);
    h.core.snapshot(false);
    accepted(&mut h, OTHER, open_one + 2, spec(None));
    drop(h); // killed

    let mut h = open(state.path());
    // Forgotten, or below the highest used: not queued again.
    not_again(&mut h, CLIENT, first + 2);
    not_again(&mut h, CLIENT, first + 1);
    accepted(&mut h, CLIENT, first + 3, spec(None));
    // The open connection's, used further after the snapshot.
    queued_already(&mut h, CLIENT, open_one + 2);
    not_again(&mut h, CLIENT, open_one + 1);
    accepted(&mut h, CLIENT, open_one + 4, spec(None));
    let (next, _) = h.submit(spec(None));
    assert_eq!(next, open_one + 5);
}

#[test]
fn jobs_are_restored_after_the_jobs_they_depend_on() {
    use crate::server::core_loop::restore::restore_order;
    use crate::server::jobs::{JobMap, JobRecord};
    let job = |seq: u64, on: &[u64]| {
        let depend =
            on.iter().map(|&s| Dependency { kind: DependKind::AfterAny, on: JobRef::Job(s) }).collect();
        (seq, Arc::new(JobRecord::new(seq, JobSpec { depend, ..spec(None) }, "alice".into(), 1000, 1000, 0)))
    };
    // 2 waits on 9, which waits on 7; 3 on 2 and on 1; 8 on 12, which is gone.
    let jobs: JobMap =
        [job(1, &[]), job(2, &[9]), job(3, &[2, 1]), job(7, &[]), job(8, &[12]), job(9, &[7]), job(10, &[3])]
            .into_iter()
            .collect();
    assert_eq!(restore_order(&jobs), vec![1, 7, 9, 2, 3, 8, 10]);
    let plain: JobMap = [job(1, &[]), job(2, &[1]), job(3, &[1, 2])].into_iter().collect();
    assert_eq!(restore_order(&plain), vec![1, 2, 3], "sequence order when nothing comes early");
    // Submission seconds come first: 4 was submitted under a number reserved
    // before 5 and 6, a second after them, and 6 depends on 4.
    let at = |second: u64, (seq, record): (u64, Arc<JobRecord>)| {
        (seq, Arc::new(JobRecord { ctime: second, ..(*record).clone() }))
    };
    let late: JobMap = [at(10, job(4, &[])), at(9, job(5, &[])), at(11, job(6, &[4])), at(9, job(7, &[]))]
        .into_iter()
        .collect();
    assert_eq!(restore_order(&late), vec![5, 7, 4, 6]);
}
