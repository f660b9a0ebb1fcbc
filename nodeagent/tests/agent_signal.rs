//! SIGTERM to the agent's process: its tasks are killed and reported, and the
//! agent returns `Ok`.
//!
//! This test has its own binary without libtest's harness: the signal is sent
//! to the whole process, so every thread of it must block SIGTERM, which only
//! holds when the test controls the main thread and every thread it starts.

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use picloud_nodeagent::agent::{self, AgentConfig};
use picloud_proto::{
    AgentMsg, Hello, JobCommand, JobDefinition, JobSpec, ServerAddr, StartTask, TaskId, ToAgent, read_frame,
    write_frame,
};

const TIMEOUT: Duration = Duration::from_secs(20);

fn main() {
    // Blocked before any thread exists, so that every thread inherits it.
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().unwrap();

    // Nothing may hang: a watchdog fails the test after a while.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(60));
        eprintln!("agent_signal: timed out");
        println!("test result: FAILED. 0 passed; 1 failed");
        std::process::exit(1);
    });

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("server.sock");
    let spool = dir.path().join("spool");
    let listener = UnixListener::bind(&sock).unwrap();
    let workdir = dir.path().display().to_string();
    let pid_file = dir.path().join("task.pid");
    let out = dir.path().join("out").display().to_string();
    let body = format!("echo $$ > {}\nexec sleep 30\n", pid_file.display());

    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        let _hello: Hello = read_frame(&mut conn).unwrap();
        write_frame(&mut conn, &ToAgent::Welcome { server_name: "srv".into() }).unwrap();
        let def = JobDefinition {
            seq: 1,
            spec: JobSpec {
                env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                rerunnable: false,
                submit_host: "here".into(),
                ..JobSpec::new("sleeper", JobCommand::Script { body }, workdir)
            },
            user: "me".into(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: 0,
        };
        write_frame(&mut conn, &ToAgent::Define(Box::new(def))).unwrap();
        let task = TaskId { seq: 1, index: None };
        let start = StartTask {
            task,
            job_id: "1.srv".into(),
            cpus: Vec::new(),
            gpus: Vec::new(),
            stdout_path: out.clone(),
            stderr_path: out,
        };
        write_frame(&mut conn, &ToAgent::Start(vec![start])).unwrap();
        match next_report(&mut conn) {
            AgentMsg::Started(ids) => assert_eq!(ids, vec![task]),
            other => panic!("expected Started, got {other:?}"),
        }
        let deadline = Instant::now() + TIMEOUT;
        let task_pid: i32 = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse().ok()) {
                break pid;
            }
            assert!(Instant::now() < deadline, "the task never wrote its pid");
            std::thread::sleep(Duration::from_millis(10));
        };

        // To the process, as `kill` from a shell or the init system would.
        nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM).unwrap();

        let end = match next_report(&mut conn) {
            AgentMsg::Finished(mut ends) => ends.pop().unwrap(),
            other => panic!("expected Finished, got {other:?}"),
        };
        assert_eq!(end.task, task);
        assert_eq!(end.exit_status, 256 + 15, "{end:?}");
        assert_eq!(end.comment.as_deref(), Some("job killed: node agent received SIGTERM"));
        task_pid
    });

    let config = AgentConfig {
        server: ServerAddr::Unix(sock),
        spool_dir: spool.clone(),
        kill_grace: Duration::from_millis(500),
        hostname: None,
        use_cgroups: false,
        local_socket: None,
        python_path: None,
        shm: None,
        started_report_delay: agent::STARTED_REPORT_DELAY,
    };
    let result = agent::run(config);
    let task_pid = server.join();
    let ok = match (&result, &task_pid) {
        (Ok(()), Ok(pid)) => {
            let gone = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')));
            let spool_empty = std::fs::read_dir(&spool).map_or(true, |mut d| d.next().is_none());
            if !gone {
                eprintln!("the task {pid} survived the agent");
            }
            if !spool_empty {
                eprintln!("spool files left behind");
            }
            gone && spool_empty
        }
        (r, _) => {
            eprintln!("agent result: {r:?}");
            false
        }
    };
    if ok {
        println!("test sigterm_stops_the_agent ... ok\n\ntest result: ok. 1 passed; 0 failed");
    } else {
        println!("test sigterm_stops_the_agent ... FAILED\n\ntest result: FAILED. 0 passed; 1 failed");
        std::process::exit(1);
    }
}

/// The agent's next report of a task, past what it says of itself (the list of
/// tasks it runs, sent when it connects, and heartbeats).
fn next_report(conn: &mut impl std::io::Read) -> AgentMsg {
    loop {
        match read_frame::<AgentMsg>(conn).unwrap() {
            AgentMsg::Running(_) | AgentMsg::Heartbeat => continue,
            other => return other,
        }
    }
}
