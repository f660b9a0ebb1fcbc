//! Lost nodes, retries and agents that come back (`nodes.rs`): a silent
//! agent is lost and its tasks run elsewhere, counted; the retry limit
//! fails a task whose node losses follow it; an agent that comes back is
//! told to kill what was moved elsewhere; a restarted server keeps the
//! tasks its agents still run, takes the ends they kept, and adopts a task
//! whose start it never recorded.

use std::path::Path;

use picloud_proto::{EXIT_NEVER_RAN, JobInfo, TaskRunning};

use super::*;
use crate::server::JournalConfig;

const AGENT2: ConnId = ConnId(21);
const AGENT3: ConnId = ConnId(22);

fn host(name: &str, cores: u32) -> NodeInfo {
    NodeInfo { hostname: name.into(), ..node_info(cores) }
}

fn running(seq: u64, index: Option<u32>, cpus: Vec<u32>) -> TaskRunning {
    TaskRunning { task: TaskId { seq, index }, cpus, gpus: Vec::new() }
}

fn info(h: &Harness, id: &str) -> JobInfo {
    stat(&h.snapshot(), true).into_iter().find(|j| j.id == id).unwrap_or_else(|| panic!("{id} not listed"))
}

fn kills(sent: &Sent, conn: ConnId) -> Vec<TaskId> {
    sent.to_agents
        .iter()
        .filter_map(|(c, m)| match m {
            ToAgent::Kill { task, .. } if *c == conn => Some(*task),
            _ => None,
        })
        .collect()
}

fn starts_on(sent: &Sent, conn: ConnId) -> Vec<TaskId> {
    sent.to_agents
        .iter()
        .filter(|(c, _)| *c == conn)
        .flat_map(|(_, m)| match m {
            ToAgent::Start(s) => s.iter().map(|s| s.task).collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// Makes the agent of `node` look silent past the node timeout.
fn silence(h: &mut Harness, name: &str) {
    let node = h.core.names[name];
    h.core.links.get_mut(&node).unwrap().last_heard = Instant::now() - Duration::from_secs(3600);
}

#[test]
fn a_silent_agent_is_lost_and_its_task_runs_elsewhere_once_more() {
    let mut h = Harness::new();
    h.batch(join(AGENT, host("node1", 1), vec![]));
    let (seq, _) = h.submit(spec(None));
    let id = format!("{seq}.srv");
    assert_eq!(info(&h, &id).run_count, 1);
    h.batch(join(AGENT2, host("node2", 1), vec![]));

    // node1 falls silent: its connection is closed, the job runs on node2.
    silence(&mut h, "node1");
    let sent = h.batch(vec![]);
    assert_eq!(sent.closed, vec![AGENT]);
    assert_eq!(starts_on(&sent, AGENT2), vec![TaskId { seq, index: None }]);
    let job = info(&h, &id);
    assert_eq!((job.state, job.run_count), (JobState::Running, 2));
    assert!(job.exec_host.unwrap().starts_with("node2"));
    h.core.core.sanity_check();

    // node1's agent was only slow: it comes back still running the job,
    // is told to kill it, and its late report of that end changes nothing.
    let sent = h.batch(join(AGENT3, host("node1", 1), vec![running(seq, None, vec![0])]));
    assert_eq!(kills(&sent, AGENT3), vec![TaskId { seq, index: None }]);
    assert!(starts_on(&sent, AGENT3).is_empty());
    h.batch(vec![Inbound::Agent { conn: AGENT3, msg: AgentMsg::Finished(vec![finished(seq, None, 265)]) }]);
    assert_eq!(info(&h, &id).state, JobState::Running, "the end of the killed copy is not the job's");
    h.core.core.sanity_check();

    h.batch(vec![Inbound::Agent { conn: AGENT2, msg: AgentMsg::Finished(vec![finished(seq, None, 0)]) }]);
    let job = info(&h, &id);
    assert_eq!((job.state, job.exit_status, job.run_count), (JobState::Finished, Some(0), 2));
    h.check_counts();
    h.core.core.sanity_check();
}

#[test]
fn a_new_agent_on_a_lost_node_is_told_every_definition_again() {
    let mut h = Harness::new();
    h.batch(join(AGENT, host("node1", 1), vec![]));
    let (seq, _) = h.submit(spec(Some("1-3")));
    h.batch(vec![Inbound::Closed(AGENT)]);
    let sent = h.batch(join(AGENT2, host("node1", 1), vec![]));
    assert!(matches!(sent.to_agent.first(), Some(ToAgent::Define(d)) if d.seq == seq), "{:?}", sent.to_agent);
    assert_eq!(starts_on(&sent, AGENT2), vec![TaskId { seq, index: Some(1) }]);
}

#[test]
fn node_losses_are_retried_up_to_the_limit_then_the_task_fails_saying_why() {
    let mut h = Harness::new();
    let (seq, _) = h.submit(spec(None));
    let (fixed, _) = h.submit(JobSpec { rerunnable: false, ..spec(None) });
    let limit = h.core.core.config().node_loss_retries;
    assert_eq!(limit, 3, "the default");
    // Each agent runs the rerunnable job, then its connection closes.
    for round in 0..=limit {
        let conn = ConnId(AGENT.0 + 10 + round as usize);
        let sent = h.batch(join(conn, host("node1", 1), vec![]));
        assert_eq!(starts_on(&sent, conn), vec![TaskId { seq, index: None }], "round {round}");
        h.batch(vec![Inbound::Closed(conn)]);
        h.agent_stays_away();
        h.core.core.sanity_check();
    }
    let job = info(&h, &format!("{seq}.srv"));
    assert_eq!((job.state, job.exit_status), (JobState::Finished, Some(EXIT_NEVER_RAN)));
    assert_eq!(job.run_count, limit + 1);
    let comment = job.comment.unwrap();
    assert!(comment.contains("node1 was lost") && comment.contains("not retried again"), "{comment}");

    // A job that is not rerunnable fails at its first loss.
    let conn = ConnId(AGENT.0 + 50);
    let sent = h.batch(join(conn, host("node1", 1), vec![]));
    assert_eq!(starts_on(&sent, conn), vec![TaskId { seq: fixed, index: None }]);
    h.batch(vec![Inbound::Closed(conn)]);
    h.agent_stays_away();
    let job = info(&h, &format!("{fixed}.srv"));
    assert_eq!((job.exit_status, job.run_count), (Some(EXIT_NEVER_RAN), 1));
    assert!(!job.comment.unwrap().contains("not retried"));
    h.check_counts();
    h.core.core.sanity_check();
}

#[test]
fn a_queued_task_an_agent_already_runs_is_adopted_not_started_again() {
    // The server lost the start (its record was not on disk when it died):
    // the agent's report makes it running where it runs.
    let mut h = Harness::new();
    let (seq, _) = h.submit(spec(Some("1-3")));
    let sent = h.batch(join(AGENT, host("node1", 2), vec![running(seq, Some(2), vec![1])]));
    assert_eq!(starts(&sent), vec![TaskId { seq, index: Some(1) }], "only the free core takes a task");
    let task = info(&h, &format!("{seq}[2].srv"));
    assert_eq!((task.state, task.cpus, task.run_count), (JobState::Running, vec![1], 1));
    h.core.core.sanity_check();
    let ends = vec![finished(seq, Some(1), 0), finished(seq, Some(2), 0)];
    let sent = h.batch(vec![Inbound::Agent { conn: AGENT, msg: AgentMsg::Finished(ends) }]);
    assert_eq!(starts(&sent), vec![TaskId { seq, index: Some(3) }]);
    h.core.core.sanity_check();
}

fn jopen(state: &Path) -> Harness {
    let config = ServerConfig {
        state_dir: state.to_path_buf(),
        journal: JournalConfig { preallocate: 64 << 10, ..JournalConfig::default() },
        threads: Default::default(),
        ..config()
    };
    let (tx, rx) = unbounded();
    Harness { core: CoreLoop::open(&config, tx, || {}).expect("the journal opens"), out: rx }
}

#[test]
fn a_restarted_server_keeps_what_its_agents_still_run() {
    let state = tempfile::tempdir().unwrap();
    let mut h = jopen(state.path());
    h.batch(join(AGENT, host("node1", 4), vec![]));
    let (seq, _) = h.submit(spec(Some("1-4")));
    assert_eq!(h.core.core.running_tasks(), 4);
    let cpus = |i: u32| info(&h, &format!("{seq}[{i}].srv")).cpus;
    let (cpus2, cpus4) = (cpus(2), cpus(4));
    drop(h); // killed: the agent keeps running its tasks

    let mut h = jopen(state.path());
    assert_eq!(h.core.core.unconfirmed().count(), 4);
    // The agent reconnects: task 1 ended while the server was away (its
    // end was kept), tasks 2 and 4 run, task 3 is gone; it also runs a task
    // this server never heard of, which it is told to kill.
    let mut msgs = vec![
        Inbound::AgentJoined { conn: AGENT2, info: host("node1", 4) },
        Inbound::Agent { conn: AGENT2, msg: AgentMsg::Finished(vec![finished(seq, Some(1), 0)]) },
    ];
    let report =
        vec![running(seq, Some(2), cpus2), running(seq, Some(4), cpus4), running(999, None, vec![0])];
    msgs.push(Inbound::Agent { conn: AGENT2, msg: AgentMsg::Running(report) });
    let sent = h.batch(msgs);
    assert_eq!(kills(&sent, AGENT2), vec![TaskId { seq: 999, index: None }]);
    assert_eq!(info(&h, &format!("{seq}[1].srv")).exit_status, Some(0), "the kept end is taken");
    for i in [2, 4] {
        let t = info(&h, &format!("{seq}[{i}].srv"));
        assert_eq!((t.state, t.run_count), (JobState::Running, 1), "task {i} keeps running");
    }
    // Task 3 is not reported: the agent does not run it, so it runs
    // again at once (its rerun counted); nothing else starts.
    assert_eq!(h.core.core.unconfirmed().count(), 0);
    assert_eq!(starts(&sent), vec![TaskId { seq, index: Some(3) }]);
    assert_eq!(info(&h, &format!("{seq}[3].srv")).run_count, 2);
    h.core.core.sanity_check();

    let ends = (2..=4).map(|i| finished(seq, Some(i), 0)).collect();
    h.batch(vec![Inbound::Agent { conn: AGENT2, msg: AgentMsg::Finished(ends) }]);
    let array = info(&h, &format!("{seq}[].srv"));
    assert_eq!((array.state, array.exit_status, array.run_count), (JobState::Finished, Some(0), 1));
    h.check_counts();

    // The reruns survive the next restart, from the journal and from a snapshot.
    let before = stat(&h.snapshot(), true);
    h.core.snapshot(false);
    drop(h);
    let h = jopen(state.path());
    assert_eq!(stat(&h.snapshot(), true), before);
}
