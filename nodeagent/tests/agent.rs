//! The agent against a fake server: a Unix socket in a tempdir speaking the
//! protocol, driven step by step by each test.
//!
//! The agent's reaper waits for any child of the process, so two agents in one
//! process would reap each other's tasks: the tests here run one at a time.

use std::collections::HashMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use picloud_nodeagent::agent::{self, AgentConfig, AgentError};
use picloud_proto::{
    AgentMsg, ErrorKind, Hello, JobCommand, JobDefinition, JobSpec, ProtoError, Role, ServerAddr,
    ServerReply, StartTask, TaskEnd, TaskId, ToAgent, read_frame, write_frame,
};

/// Serialises the tests of this file (see the module doc).
static ONE_AGENT_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Upper bound on any single wait of a test.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A running agent and the server side of its connection.
struct Harness {
    dir: tempfile::TempDir,
    spool: PathBuf,
    conn: UnixStream,
    agent: crossbeam_channel::Receiver<Result<(), AgentError>>,
    started: Vec<TaskId>,
    finished: HashMap<TaskId, TaskEnd>,
    /// Frames of `Finished` received, to check batching.
    finished_frames: usize,
}

/// Starts an agent against a fresh listener and accepts its connection.
/// Returns the listener's stream before the handshake.
fn start_agent(
    grace: Duration,
    started_report_delay: Duration,
) -> (tempfile::TempDir, PathBuf, UnixStream, crossbeam_channel::Receiver<Result<(), AgentError>>) {
    start_agent_with(grace, started_report_delay, false)
}

/// [`start_agent`]; with `local_socket`, the agent listens on `agent.sock`
/// in the tempdir.
fn start_agent_with(
    grace: Duration,
    started_report_delay: Duration,
    local_socket: bool,
) -> (tempfile::TempDir, PathBuf, UnixStream, crossbeam_channel::Receiver<Result<(), AgentError>>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("server.sock");
    let spool = dir.path().join("spool");
    let listener = UnixListener::bind(&sock).unwrap();
    let config = AgentConfig {
        server: ServerAddr::Unix(sock),
        spool_dir: spool.clone(),
        kill_grace: grace,
        hostname: Some("testnode".into()),
        use_cgroups: false,
        local_socket: local_socket.then(|| dir.path().join("agent.sock")),
        python_path: None,
        shm: None,
        started_report_delay,
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(agent::run(config));
    });
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Ok(result) = rx.try_recv() {
                    panic!("the agent ended before connecting: {result:?}");
                }
                assert!(Instant::now() < deadline, "the agent did not connect");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    (dir, spool, conn, rx)
}

impl Harness {
    /// An agent that has been welcomed.
    fn new(grace: Duration) -> Self {
        Self::with_report_delay(grace, agent::STARTED_REPORT_DELAY)
    }

    /// An agent that has been welcomed, reporting starts up to `delay` late.
    fn with_report_delay(grace: Duration, delay: Duration) -> Self {
        let (dir, spool, mut conn, agent) = start_agent(grace, delay);
        let hello: Hello = read_frame(&mut conn).unwrap();
        assert_eq!(hello.magic, picloud_proto::HELLO_MAGIC);
        let Role::Agent(node) = hello.role else { panic!("not an agent: {hello:?}") };
        assert_eq!(node.hostname, "testnode");
        assert!(!node.cores.is_empty());
        write_frame(&mut conn, &ToAgent::Welcome { server_name: "srv".into() }).unwrap();
        Self { dir, spool, conn, agent, started: Vec::new(), finished: HashMap::new(), finished_frames: 0 }
    }

    fn send(&mut self, msg: &ToAgent) {
        write_frame(&mut self.conn, msg).unwrap();
    }

    fn define(&mut self, def: JobDefinition) {
        self.send(&ToAgent::Define(Box::new(def)));
    }

    /// Reads agent messages until `done` holds.
    fn read_until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            match read_frame::<AgentMsg>(&mut self.conn) {
                Ok(AgentMsg::Started(ids)) => self.started.extend(ids),
                Ok(AgentMsg::Heartbeat | AgentMsg::Running(_)) => {}
                Ok(AgentMsg::Finished(ends)) => {
                    self.finished_frames += 1;
                    for end in ends {
                        assert!(self.finished.insert(end.task, end.clone()).is_none(), "{end:?} twice");
                    }
                }
                Err(e) => panic!("while waiting for {what}: {e}"),
            }
        }
    }

    fn wait_finished(&mut self, tasks: &[TaskId]) {
        self.read_until("task ends", |h| tasks.iter().all(|t| h.finished.contains_key(t)));
    }

    fn wait_started(&mut self, tasks: &[TaskId]) {
        self.read_until("task starts", |h| tasks.iter().all(|t| h.started.contains(t)));
    }

    /// Waits for the agent to return.
    fn agent_result(&self) -> Result<(), AgentError> {
        self.agent.recv_timeout(TIMEOUT).expect("the agent did not stop")
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

fn job(seq: u64, command: JobCommand, workdir: &Path) -> JobDefinition {
    JobDefinition {
        seq,
        spec: JobSpec {
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            rerunnable: false,
            submit_host: "here".into(),
            ..JobSpec::new(format!("job{seq}"), command, workdir.display().to_string())
        },
        user: "me".into(),
        uid: nix::unistd::geteuid().as_raw(),
        gid: 0,
    }
}

fn script(body: &str) -> JobCommand {
    JobCommand::Script { body: body.into() }
}

fn task(seq: u64, index: Option<u32>, h: &Harness) -> StartTask {
    let id = TaskId { seq, index };
    let name = match index {
        None => format!("{seq}"),
        Some(i) => format!("{seq}-{i}"),
    };
    StartTask {
        task: id,
        job_id: id.display_with("srv"),
        cpus: Vec::new(),
        gpus: Vec::new(),
        stdout_path: h.path(&format!("{name}.out")),
        stderr_path: h.path(&format!("{name}.err")),
    }
}

/// Whether a process is gone (or a zombie waiting for its new parent).
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name in parentheses.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + TIMEOUT;
    while !process_gone(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still alive");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read_pid(path: &str) -> i32 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse() {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "no pid in {path}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AGENT_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner)
}

#[test]
fn a_start_is_reported_with_the_end_of_a_short_task_and_alone_for_a_long_one() {
    let _one = serial();
    // With a day to wait, a start can only go out with its task's end.
    let mut h = Harness::with_report_delay(Duration::from_millis(500), Duration::from_secs(86_400));
    let workdir = h.dir.path().to_path_buf();
    h.define(job(1, script("exit 0\n"), &workdir));
    let short = task(1, None, &h);
    h.send(&ToAgent::Start(vec![short.clone()]));
    let first = loop {
        match read_frame::<AgentMsg>(&mut h.conn) {
            Ok(AgentMsg::Running(_) | AgentMsg::Heartbeat) => {}
            other => break other,
        }
    };
    match first {
        Ok(AgentMsg::Started(ids)) => assert_eq!(ids, vec![short.task]),
        other => panic!("expected Started, got {other:?}"),
    }
    // Written together: the end is there already.
    h.conn.set_nonblocking(true).unwrap();
    let end = read_frame::<AgentMsg>(&mut h.conn);
    h.conn.set_nonblocking(false).unwrap();
    match end {
        Ok(AgentMsg::Finished(ends)) => {
            assert_eq!(ends.iter().map(|e| e.task).collect::<Vec<_>>(), vec![short.task])
        }
        other => panic!("expected Finished in the same write, got {other:?}"),
    }
    drop(h);

    // With 50 ms, a long task's start is reported while it runs.
    let mut h = Harness::with_report_delay(Duration::from_millis(200), Duration::from_millis(50));
    let workdir = h.dir.path().to_path_buf();
    h.define(job(2, script("sleep 30\n"), &workdir));
    let long = task(2, None, &h);
    h.send(&ToAgent::Start(vec![long.clone()]));
    h.wait_started(&[long.task]);
    assert!(h.finished.is_empty());
    h.send(&ToAgent::Kill { task: long.task, reason: "done".into() });
    h.wait_finished(&[long.task]);
}

#[test]
fn runs_tasks_and_reports_their_ends() {
    let _one = serial();
    let mut h = Harness::new(Duration::from_millis(500));
    let workdir = h.dir.path().to_path_buf();

    // An array of three tasks with their own exit codes, a CPU-burning job, and
    // a job that cannot be executed.
    h.define(job(
        1,
        script("echo \"task $PBS_ARRAY_INDEX of $PBS_ARRAY_ID\"\nexit $PBS_ARRAY_INDEX\n"),
        &workdir,
    ));
    h.define(job(2, script("i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; echo $PBS_JOBID"), &workdir));
    h.define(job(3, JobCommand::Argv(vec!["nosuchcmd".into(), "arg".into()]), &workdir));
    let starts: Vec<StartTask> = vec![
        task(1, Some(1), &h),
        task(1, Some(2), &h),
        task(1, Some(3), &h),
        task(2, None, &h),
        task(3, None, &h),
    ];
    let ids: Vec<TaskId> = starts.iter().map(|s| s.task).collect();
    h.send(&ToAgent::Start(starts.clone()));
    h.wait_finished(&ids);

    for i in 1..=3 {
        let end = &h.finished[&TaskId { seq: 1, index: Some(i) }];
        assert_eq!(end.exit_status, i as i32);
        assert_eq!(end.comment, None);
        let out = std::fs::read_to_string(h.path(&format!("1-{i}.out"))).unwrap();
        assert_eq!(out, format!("task {i} of 1[].srv\n"));
    }
    let burner = &h.finished[&TaskId { seq: 2, index: None }];
    assert_eq!(burner.exit_status, 0);
    assert!(burner.used.cput_ms > 0, "{burner:?}");
    assert!(burner.used.walltime_ms > 0, "{burner:?}");
    assert!(burner.used.mem > 0, "{burner:?}");
    assert_eq!(std::fs::read_to_string(h.path("2.out")).unwrap(), "2.srv\n");

    let failed = &h.finished[&TaskId { seq: 3, index: None }];
    assert_eq!(failed.exit_status, 127);
    assert_eq!(failed.comment.as_deref(), Some("cannot execute 'nosuchcmd': No such file or directory"));
    // A task that never ran is not reported as started.
    assert!(!h.started.contains(&failed.task));
    for id in &ids[..4] {
        assert!(h.started.contains(id), "{id:?} not reported started");
    }

    // A start for a job never defined fails with a comment.
    let undefined = task(9, None, &h);
    h.send(&ToAgent::Start(vec![undefined.clone()]));
    h.wait_finished(&[undefined.task]);
    let end = &h.finished[&undefined.task];
    assert!(
        end.exit_status < 0 && end.comment.as_deref().unwrap().contains("no definition of job 9"),
        "{end:?}"
    );

    // Forget drops the job's script.
    assert!(h.spool.join("1.sh").exists());
    h.send(&ToAgent::Forget { seq: 1 });
    h.send(&ToAgent::Start(vec![task(1, Some(4), &h)]));
    h.wait_finished(&[TaskId { seq: 1, index: Some(4) }]);
    assert!(!h.spool.join("1.sh").exists());
    assert!(
        h.finished[&TaskId { seq: 1, index: Some(4) }].comment.as_deref().unwrap().contains("no definition")
    );

    // The server says stop: the agent stops cleanly and removes its spool
    // files. (A server that hangs up is reconnected to, see
    // `a_lost_server_is_reconnected_to_with_the_ends_kept`.)
    h.send(&ToAgent::Shutdown);
    h.agent.recv_timeout(TIMEOUT).expect("the agent did not stop").unwrap();
    assert_eq!(std::fs::read_dir(&h.spool).unwrap().count(), 0, "spool files left behind");
}

#[test]
fn jobs_start_with_an_empty_signal_mask() {
    let _one = serial();
    // The agent thread inherits this thread's mask, as an agent inherits the
    // mask of whatever started it; its jobs must not.
    let mut blocked = nix::sys::signal::SigSet::empty();
    use nix::sys::signal::Signal;
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        blocked.add(sig);
    }
    let old = blocked.thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK).unwrap();
    let mut h = Harness::new(Duration::from_millis(500));
    old.thread_set_mask().unwrap();
    let workdir = h.dir.path().to_path_buf();
    let argv = ["grep", "^SigBlk", "/proc/self/status"].iter().map(|a| a.to_string()).collect();
    h.define(job(1, JobCommand::Argv(argv), &workdir));
    let t = task(1, None, &h);
    h.send(&ToAgent::Start(vec![t.clone()]));
    h.wait_finished(&[t.task]);
    assert_eq!(h.finished[&t.task].exit_status, 0);
    let out = std::fs::read_to_string(h.path("1.out")).unwrap();
    assert_eq!(out.split_whitespace().last(), Some("0000000000000000"), "{out}");
    h.send(&ToAgent::Shutdown);
    h.agent.recv_timeout(TIMEOUT).expect("the agent did not stop").unwrap();
}

#[test]
fn jobs_of_users_unknown_here_or_of_others_when_not_root_are_refused() {
    let _one = serial();
    let mut h = Harness::new(Duration::from_millis(500));
    let workdir = h.dir.path().to_path_buf();
    let mut def = job(1, script("echo ran > ran.txt"), &workdir);
    def.uid += 1;
    def.user = "someone-else".into();
    h.define(def);
    let t = task(1, None, &h);
    h.send(&ToAgent::Start(vec![t.clone()]));
    h.wait_finished(&[t.task]);
    let end = &h.finished[&t.task];
    assert!(end.exit_status < 0, "{end:?}");
    let comment = end.comment.as_deref().unwrap();
    if nix::unistd::geteuid().is_root() {
        // A root agent runs jobs as their owner, who must exist on the node.
        assert!(
            comment.contains("cannot run the job as someone-else") && comment.contains("no such user"),
            "{end:?}"
        );
    } else {
        assert!(comment.contains("does not run jobs of other users"), "{end:?}");
    }
    assert!(!workdir.join("ran.txt").exists(), "the job must not run");
    h.send(&ToAgent::Shutdown);
    h.agent.recv_timeout(TIMEOUT).expect("the agent did not stop").unwrap();
}

#[test]
fn many_ends_share_frames() {
    let _one = serial();
    let mut h = Harness::new(Duration::from_millis(500));
    let workdir = h.dir.path().to_path_buf();
    let mut def = job(1, JobCommand::Argv(vec!["true".into()]), &workdir);
    def.spec.env.push(("X".into(), "y".into()));
    h.define(def);
    let n = 200;
    let starts: Vec<StartTask> = (0..n)
        .map(|i| {
            let mut st = task(1, Some(i), &h);
            st.stdout_path = "/dev/null".into();
            st.stderr_path = "/dev/null".into();
            st
        })
        .collect();
    let ids: Vec<TaskId> = starts.iter().map(|s| s.task).collect();
    h.send(&ToAgent::Start(starts));
    h.wait_finished(&ids);
    assert!(h.finished.values().all(|e| e.exit_status == 0));
    assert!(h.finished_frames < n as usize, "{} frames for {n} ends", h.finished_frames);
    h.send(&ToAgent::Shutdown);
    h.agent.recv_timeout(TIMEOUT).unwrap().unwrap();
}

#[test]
fn walltime_and_kill_terminate_process_groups() {
    let _one = serial();
    let grace = Duration::from_millis(300);
    let mut h = Harness::new(grace);
    let workdir = h.dir.path().to_path_buf();

    // 1: walltime of 1 s on a long sleep; the sleep dies of SIGTERM.
    let mut long = job(1, script("exec sleep 30"), &workdir);
    long.spec.resources.walltime = Some(1);
    h.define(long);
    // 2: ignores SIGTERM, so only the SIGKILL after the grace period ends it;
    //    its background child must die with it.
    let stubborn = format!("trap '' TERM\nsleep 30 &\necho $! > {}\nwait\n", h.path("child.pid"));
    h.define(job(2, script(&stubborn), &workdir));
    // 3: leaves a process behind when it exits: it is killed with the task.
    let leaver = format!("sleep 30 &\necho $! > {}\n", h.path("straggler.pid"));
    h.define(job(3, script(&leaver), &workdir));

    let t1 = task(1, None, &h);
    let t2 = task(2, None, &h);
    let t3 = task(3, None, &h);
    let began = Instant::now();
    h.send(&ToAgent::Start(vec![t1.clone(), t2.clone(), t3.clone()]));
    h.wait_started(&[t1.task, t2.task, t3.task]);
    let child = read_pid(&h.path("child.pid"));

    h.wait_finished(&[t3.task]);
    assert_eq!(h.finished[&t3.task].exit_status, 0);
    wait_gone(read_pid(&h.path("straggler.pid")));

    h.send(&ToAgent::Kill { task: t2.task, reason: "Job deleted by alice".into() });
    h.wait_finished(&[t2.task]);
    let end = &h.finished[&t2.task];
    assert_eq!(end.exit_status, 256 + 9, "{end:?}");
    assert_eq!(end.comment.as_deref(), Some("Job deleted by alice"));
    assert!(end.used.walltime_ms >= grace.as_millis() as u64, "{end:?}");
    wait_gone(child);

    h.wait_finished(&[t1.task]);
    let end = &h.finished[&t1.task];
    assert_eq!(end.exit_status, 256 + 15, "{end:?}");
    // The walltime shown is the time used, rounded up: 2 s unless the machine is very busy.
    let comment = end.comment.as_deref().unwrap();
    let used = comment
        .strip_prefix("job killed: walltime 00:00:")
        .and_then(|rest| rest.strip_suffix(" exceeded limit 00:00:01"))
        .unwrap_or_else(|| panic!("unexpected comment {comment:?}"));
    assert!((2..10).contains(&used.parse::<u32>().unwrap()), "{comment}");
    assert!(end.used.walltime_ms >= 1000, "{end:?}");
    assert!(began.elapsed() < Duration::from_secs(10));

    // A kill for a task that already ended is ignored.
    h.send(&ToAgent::Kill { task: t1.task, reason: "late".into() });
    h.send(&ToAgent::Shutdown);
    h.agent_result().unwrap();
}

#[test]
fn shutdown_kills_running_tasks_and_cleans_up() {
    let _one = serial();
    let mut h = Harness::new(Duration::from_millis(300));
    let workdir = h.dir.path().to_path_buf();
    let body = format!("echo $$ > {}\nexec sleep 30\n", h.path("sleeper.pid"));
    h.define(job(1, script(&body), &workdir));
    let t = task(1, None, &h);
    h.send(&ToAgent::Start(vec![t.clone()]));
    h.wait_started(&[t.task]);
    let pid = read_pid(&h.path("sleeper.pid"));

    h.send(&ToAgent::Shutdown);
    h.wait_finished(&[t.task]);
    let end = &h.finished[&t.task];
    assert_eq!(end.exit_status, 256 + 15);
    assert_eq!(end.comment.as_deref(), Some("job killed: the server is shutting down"));
    h.agent_result().unwrap();
    wait_gone(pid);
    assert_eq!(std::fs::read_dir(&h.spool).unwrap().count(), 0, "spool files left behind");
}

#[test]
fn a_lost_server_is_reconnected_to_with_the_ends_kept() {
    let _one = serial();
    let mut h = Harness::new(Duration::from_millis(300));
    let workdir = h.dir.path().to_path_buf();
    // Job 1 ends while the server is away; job 2 still runs when it is back.
    h.define(job(1, script("sleep 0.5\n"), &workdir));
    let body = format!("echo $$ > {}\nwhile :; do sleep 1; done\n", h.path("sleeper.pid"));
    h.define(job(2, script(&body), &workdir));
    let (t1, mut t2) = (task(1, None, &h), task(2, None, &h));
    t2.cpus = vec![0];
    h.send(&ToAgent::Start(vec![t1.clone(), t2.clone()]));
    h.wait_started(&[t1.task, t2.task]);
    let pid = read_pid(&h.path("sleeper.pid"));

    // The server goes away; a new one listens at the same place later.
    let sock = h.dir.path().join("server.sock");
    drop(std::mem::replace(&mut h.conn, UnixStream::pair().unwrap().0));
    std::fs::remove_file(&sock).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(h.agent.try_recv().is_err(), "the agent must not stop");
    assert!(!process_gone(pid), "its tasks go on");
    let listener = UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    h.conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the agent did not connect again");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    h.conn.set_nonblocking(false).unwrap();
    h.conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    let hello: Hello = read_frame(&mut h.conn).unwrap();
    assert!(matches!(hello.role, Role::Agent(ref n) if n.hostname == "testnode"));
    write_frame(&mut h.conn, &ToAgent::Welcome { server_name: "srv".into() }).unwrap();

    // First the kept end, then what runs (with its cpus).
    let mut kept = Vec::new();
    let running = loop {
        match read_frame::<AgentMsg>(&mut h.conn).unwrap() {
            AgentMsg::Finished(ends) => kept.extend(ends),
            AgentMsg::Running(r) => break r,
            AgentMsg::Started(_) | AgentMsg::Heartbeat => {}
        }
    };
    assert_eq!(kept.iter().map(|e| (e.task, e.exit_status)).collect::<Vec<_>>(), vec![(t1.task, 0)]);
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!((running[0].task, running[0].cpus.clone()), (t2.task, vec![0]));

    // Idle, it sends heartbeats.
    assert!(matches!(read_frame::<AgentMsg>(&mut h.conn).unwrap(), AgentMsg::Heartbeat));

    // The new server kills the task and stops the agent.
    h.send(&ToAgent::Kill { task: t2.task, reason: "moved".into() });
    h.wait_finished(&[t2.task]);
    wait_gone(pid);
    h.send(&ToAgent::Shutdown);
    h.agent_result().unwrap();
}

#[test]
fn refused_handshake_is_reported() {
    let _one = serial();
    let (_dir, _spool, mut conn, agent) =
        start_agent(Duration::from_millis(100), agent::STARTED_REPORT_DELAY);
    let _hello: Hello = read_frame(&mut conn).unwrap();
    let refusal =
        ServerReply::Error(ProtoError::new(ErrorKind::VersionMismatch, "protocol version 7 expected"));
    write_frame(&mut conn, &refusal).unwrap();
    let err = agent.recv_timeout(TIMEOUT).unwrap().unwrap_err();
    assert!(matches!(err, AgentError::Refused(_)), "{err:?}");
    assert_eq!(err.to_string(), "server refused the agent: protocol version 7 expected");
}

#[test]
fn server_hanging_up_during_handshake_is_reported() {
    let _one = serial();
    let (_dir, _spool, mut conn, agent) =
        start_agent(Duration::from_millis(100), agent::STARTED_REPORT_DELAY);
    let _hello: Hello = read_frame(&mut conn).unwrap();
    drop(conn);
    let err = agent.recv_timeout(TIMEOUT).unwrap().unwrap_err();
    assert!(matches!(err, AgentError::Handshake { .. }), "{err:?}");
}

#[test]
fn agent_sock_answers_before_the_server_welcomes_the_node() {
    let _one = serial();
    let (dir, _spool, mut conn, agent) =
        start_agent_with(Duration::from_secs(1), agent::STARTED_REPORT_DELAY, true);
    let _: Hello = read_frame(&mut conn).unwrap();
    // The welcome is held back: the server has not shown the node up yet,
    // and a local client can already connect (it is answered once the
    // agent's main loop runs).
    let local = UnixStream::connect(dir.path().join("agent.sock"));
    assert!(local.is_ok(), "agent.sock does not answer before the welcome: {local:?}");
    write_frame(&mut conn, &ToAgent::Welcome { server_name: "srv".into() }).unwrap();
    write_frame(&mut conn, &ToAgent::Shutdown).unwrap();
    agent.recv_timeout(TIMEOUT).expect("the agent did not stop").unwrap();
}

#[test]
fn no_server_is_a_connect_error() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = AgentConfig {
        server: ServerAddr::Unix(dir.path().join("nobody.sock")),
        spool_dir: dir.path().join("spool"),
        kill_grace: Duration::from_secs(1),
        hostname: None,
        use_cgroups: false,
        local_socket: None,
        python_path: None,
        shm: None,
        started_report_delay: agent::STARTED_REPORT_DELAY,
    };
    let err = agent::run(config).unwrap_err();
    assert!(matches!(err, AgentError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("nobody.sock"), "{err}");
}

/// Throughput guard (run with `cargo test --release -p picloud-nodeagent -- --ignored`):
/// 10 000 `true` array tasks, as many in flight as the machine has cpus (as the
/// server would place them), each pinned and with its two output files, against
/// `seq 10000 | xargs -P<cpus> -n1 true`. The agent must reach half the floor.
#[test]
#[ignore = "benchmark: run in release"]
fn throughput_of_true_tasks() {
    let _one = serial();
    let n: u32 = 10_000;
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get()) as u32;

    let t0 = Instant::now();
    let floor = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("seq {n} | xargs -P{cpus} -n1 true"))
        .status()
        .unwrap();
    assert!(floor.success());
    let floor_rate = f64::from(n) / t0.elapsed().as_secs_f64();

    let mut h = Harness::new(Duration::from_millis(500));
    let workdir = h.dir.path().to_path_buf();
    h.define(job(1, JobCommand::Argv(vec!["true".into()]), &workdir));
    let out_dir = h.dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let start_of = |i: u32| {
        let id = TaskId { seq: 1, index: Some(i) };
        StartTask {
            task: id,
            job_id: id.display_with("srv"),
            cpus: vec![i % cpus],
            gpus: Vec::new(),
            stdout_path: out_dir.join(format!("job1.o1.{i}")).display().to_string(),
            stderr_path: out_dir.join(format!("job1.e1.{i}")).display().to_string(),
        }
    };
    let t0 = Instant::now();
    let mut next = 1;
    let first: Vec<StartTask> = (0..cpus.min(n)).map(|k| start_of(next + k)).collect();
    next += first.len() as u32;
    h.send(&ToAgent::Start(first));
    let mut ended = 0;
    while ended < n {
        match read_frame::<AgentMsg>(&mut h.conn).unwrap() {
            AgentMsg::Started(_) | AgentMsg::Heartbeat | AgentMsg::Running(_) => {}
            AgentMsg::Finished(ends) => {
                ended += ends.len() as u32;
                assert!(ends.iter().all(|e| e.exit_status == 0), "{ends:?}");
                // Refill the freed cpus, as the server does.
                let refill: Vec<StartTask> =
                    (0..ends.len() as u32).map(|k| next + k).take_while(|&i| i <= n).map(start_of).collect();
                next += refill.len() as u32;
                if !refill.is_empty() {
                    h.send(&ToAgent::Start(refill));
                }
            }
        }
    }
    let rate = f64::from(n) / t0.elapsed().as_secs_f64();
    println!("floor {floor_rate:.0}/s, agent {rate:.0}/s ({:.0}%)", 100.0 * rate / floor_rate);
    h.send(&ToAgent::Shutdown);
    h.agent.recv_timeout(TIMEOUT).unwrap().unwrap();
    assert!(rate >= floor_rate / 2.0, "agent {rate:.0}/s is below half the floor {floor_rate:.0}/s");
}
