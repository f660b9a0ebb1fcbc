//! `picloud up`: Ctrl-C (SIGINT) or SIGTERM stops the agent and the server
//! cleanly and kills running jobs.

use std::time::Duration;

use nix::sys::signal::Signal;
use picloud_tests::{Cluster, wait_until};

fn process_alive(pid: i32) -> bool {
    // A zombie counts as gone: its job is over.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

fn stops_and_kills_jobs(signal: Signal) {
    let mut c = Cluster::start();
    let id = c.qsub(&["--", "sh", "-c", "echo $$ > job.pid; exec sleep 300"]);
    let pid_file = c.work.join("job.pid");
    wait_until("the job to start", Duration::from_secs(30), || {
        std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n'))
    });
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(process_alive(pid));
    let status = c.stop_with(signal, Duration::from_secs(20));
    assert!(status.success(), "picloud up exited with {status}: {}", c.log());
    assert!(!process_alive(pid), "job {id} (pid {pid}) still runs after picloud up stopped");
    assert!(!c.dir.path().join("server.sock").exists(), "the server did not remove its socket:\n{}", c.log());
    // Nothing of the agent's spool is left behind.
    let spool = c.dir.path().join("spool");
    let leftovers: Vec<_> = std::fs::read_dir(&spool)
        .map(|d| {
            d.flatten().flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten()).collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "spool files left: {leftovers:?}");
}

#[test]
fn ctrl_c_stops_everything() {
    stops_and_kills_jobs(Signal::SIGINT);
}

#[test]
fn sigterm_stops_everything() {
    stops_and_kills_jobs(Signal::SIGTERM);
}
