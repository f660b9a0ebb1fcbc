//! The journal with real processes: a `picloud server` killed with SIGKILL
//! at several moments (right after acknowledgements among them) and
//! started again loses no acknowledged job; a torn last record is cut; a
//! damaged record in the middle and a newer format refuse the start,
//! saying where and what to do, and change nothing.
//!
//! The agent outlives each killed server, keeps running its tasks and
//! reconnects to the next one, which keeps what it confirms: tasks run
//! once, except a task rerun after its node was lost, which its
//! `run_count` shows (`faults.rs` kills agents too).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use picloud_proto::{Client, ClientRequest, ServerReply};
use picloud_tests::{Site, wait_until};

const LONG: Duration = Duration::from_secs(180);

/// A job that appends `tag` (with the array index) to `file` as its last act.
fn appender<'a>(file: &'a str, tag: &'a str) -> Vec<String> {
    vec!["--".into(), "sh".into(), "-c".into(), format!("echo {tag}${{PBS_ARRAY_INDEX}} >> {file}")]
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn seq_of(id: &str) -> &str {
    id.split(['.', '[']).next().unwrap()
}

/// Asserts every index of `0..n` is in `lines` (with `tag`), and returns how
/// many extra lines there are.
fn check_indices(lines: &BTreeMap<String, usize>, tag: &str, n: u32) -> usize {
    for i in 0..n {
        assert!(lines.contains_key(&format!("{tag}{i}")), "task {tag}{i} never ran");
    }
    assert_eq!(lines.keys().filter(|k| k.starts_with(tag)).count(), n as usize, "unexpected lines");
    lines.iter().filter(|(k, _)| k.starts_with(tag)).map(|(_, &c)| c - 1).sum()
}

#[test]
fn killed_servers_lose_no_acknowledged_job() {
    let mut site = Site::new(&[]);
    site.start();
    let cores = match Client::connect(&site.addr()).unwrap().request(&ClientRequest::Nodes).unwrap() {
        ServerReply::Nodes(n) => n[0].info.cores.len(),
        other => panic!("{other:?}"),
    };
    let quiet = ["-j", "oe", "-o", "/dev/null"];
    // A plain job that fails, to see its status after the restarts.
    let failed = site.qsub(&["-o", "/dev/null", "-j", "oe", "--", "sh", "-c", "exit 3"]);
    site.wait_finished(&failed, LONG);
    let a = site.qsub(&[&quiet[..], &["-J", "0-1999"], &args(&appender("lines", "a"))[..]].concat());
    let held = site.qsub(&[&quiet[..], &["-h"], &args(&appender("lines", "h"))[..]].concat());
    let after_a = format!("depend=afterok:{a}");
    let dep = site.qsub(&[&quiet[..], &["-W", &after_a], &args(&appender("lines", "d"))[..]].concat());

    // 1. Kill while the array runs.
    wait_until("some tasks of the array to run", LONG, || site.lines("lines").len() >= 100);
    site.kill_server();
    let kills = 1;
    site.start();

    // 2. Kill right after an acknowledgement: the submission survives.
    let b = site.qsub(&[&quiet[..], &["-J", "0-299"], &args(&appender("lines", "b"))[..]].concat());
    site.kill_server();
    site.start();
    assert_eq!(site.job_json(&b)["job_state"].as_str().map(|_| ()), Some(()), "{b} survived");

    // 3. And again after a cancel: it stays cancelled.
    let c = site.qsub(&[&quiet[..], &["-h", "-J", "0-9"], &args(&appender("lines", "c"))[..]].concat());
    let out = site.run("qdel", &[&c]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    site.kill_server();
    let kills = kills + 2;
    site.start();

    // Everything acknowledged is there; finish it all.
    assert_eq!(site.job_json(&held)["job_state"], "H", "still held");
    let out = site.run("qrls", &[&held]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for id in [&a, &b, &dep, &held] {
        let job = site.wait_finished(id, LONG);
        assert_eq!(job["Exit_status"], 0, "{id}: {job}");
    }
    let lines = site.lines("lines");
    let extra = check_indices(&lines, "a", 2000);
    eprintln!("{extra} task(s) of the array ran again after a kill ({kills} kills, {cores} cores)");
    assert!(extra <= kills * cores, "{extra} tasks of the array ran twice");
    assert_eq!(check_indices(&lines, "b", 300), 0, "array b started after the first kill ran once each");
    assert_eq!(lines.get("h"), Some(&1), "the held job ran once");
    assert_eq!(lines.get("d"), Some(&1), "the dependent job ran once");
    assert!(!lines.keys().any(|k| k.starts_with('c')), "the cancelled array never ran");
    // Finished jobs keep their statuses through the restarts.
    let f = site.job_json(&failed);
    assert_eq!((f["job_state"].as_str(), f["Exit_status"].as_i64()), (Some("F"), Some(3)), "{f}");
    let cancelled = site.job_json(&c);
    assert_eq!(cancelled["job_state"], "F", "{cancelled}");
    // Sequence numbers go on from where they were.
    let next = site.qsub(&["-o", "/dev/null", "-j", "oe", "--", "true"]);
    assert_eq!(seq_of(&next).parse::<u64>().unwrap(), seq_of(&c).parse::<u64>().unwrap() + 1);
    assert_eq!(site.starts, 4);
}

#[test]
fn a_torn_last_record_is_cut_and_the_rest_kept() {
    let mut site = Site::new(&[]);
    site.start();
    let first = site.qsub(&["-h", "--", "true"]);
    let second = site.qsub(&["-h", "--", "true"]);
    site.kill_server();
    // Cut the last record (the second submission) in the middle.
    let seg = site.last_segment();
    let len = std::fs::metadata(&seg).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 10).unwrap();
    drop(f);
    site.start();
    assert_eq!(site.job_json(&first)["job_state"], "H");
    let out = site.run("qstat", &["-x", &second]);
    assert!(!out.status.success(), "the torn submission is gone");
    let log = std::fs::read_to_string(site.dir.path().join("server.log")).unwrap();
    assert!(log.contains("torn"), "the cut is logged: {log}");
    // The server goes on, numbering from the cut.
    let third = site.qsub(&["-h", "--", "true"]);
    assert_eq!(seq_of(&third), seq_of(&second));
}

/// Byte contents of every file of a directory.
fn snapshot_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect()
}

#[test]
fn a_damaged_middle_record_refuses_the_start_with_its_offset() {
    let mut site = Site::new(&[]);
    site.start();
    for _ in 0..3 {
        site.qsub(&["-h", "--", "true"]);
    }
    site.kill_server();
    let seg = site.last_segment();
    let mut bytes = std::fs::read(&seg).unwrap();
    // The first record starts after the 40-byte header; damage its payload.
    // (The agent's join is recorded first; the submissions follow.)
    bytes[40 + 24 + 2] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let before = snapshot_of(&site.journal_dir());
    let out = site.server_refuses();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("byte offset 40 of"), "{err}");
    assert!(err.contains(&seg.display().to_string()), "{err}");
    assert!(err.contains("truncate -s") && err.contains("Nothing was changed"), "{err}");
    assert_eq!(snapshot_of(&site.journal_dir()), before, "nothing changed");
    assert!(Client::connect(&site.addr()).is_err(), "no server listens");
}

#[test]
fn a_newer_journal_refuses_the_start() {
    let mut site = Site::new(&[]);
    site.start();
    site.qsub(&["-h", "--", "true"]);
    site.kill_server();
    let seg = site.last_segment();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    let before = snapshot_of(&site.journal_dir());
    let out = site.server_refuses();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("newer picloud") && err.contains("version 99"), "{err}");
    assert_eq!(snapshot_of(&site.journal_dir()), before);
}

#[test]
fn a_clean_stop_and_start_keeps_finished_jobs_and_results() {
    let mut site = Site::new(&[]);
    site.start();
    let id = site.qsub(&["-N", "hello", "--", "sh", "-c", "echo hi; exit 4"]);
    site.wait_finished(&id, LONG);
    // SIGTERM: a clean stop writes a snapshot.
    kill(site.server.pid(), Signal::SIGTERM).unwrap();
    site.server.wait_exit(Duration::from_secs(30));
    site.agent.wait_exit(Duration::from_secs(30));
    assert!(
        std::fs::read_dir(site.journal_dir()).unwrap().any(|e| e
            .unwrap()
            .path()
            .extension()
            .is_some_and(|e| e == "snap")),
        "a snapshot was written"
    );
    site.start();
    let job = site.job_json(&id);
    assert_eq!((job["job_state"].as_str(), job["Exit_status"].as_i64()), (Some("F"), Some(4)), "{job}");
    assert_eq!(std::fs::read_to_string(site.work.join(format!("hello.o{}", seq_of(&id)))).unwrap(), "hi\n");
}

/// A job in the site's work directory that appends `name` and its job id
/// to `lines`.
fn line_job(work: &str, name: &str) -> picloud_proto::JobSpec {
    use picloud_proto::{JobCommand, JobSpec, JoinStreams};
    JobSpec {
        stdout: Some("/dev/null".into()),
        join: JoinStreams::IntoOut,
        env: vec![("PATH".into(), std::env::var("PATH").unwrap())],
        ..JobSpec::new(
            name,
            JobCommand::Argv(vec!["sh".into(), "-c".into(), format!("echo {name} $PBS_JOBID >> lines")]),
            work,
        )
    }
}

#[test]
fn waited_submissions_across_a_killed_server_are_queued_once_each() {
    // `submit_reserved` (what libpicloud's Python submissions use) waits for
    // its reply; when the server is gone it connects again and sends the
    // job again under its reserved number.
    let mut site = Site::new(&[]);
    site.start();
    let work = site.work.to_str().unwrap().to_string();
    let job = move |i: usize| line_job(&work, &format!("w{i}"));
    let mut c = Client::connect(&site.addr()).unwrap();
    let mut seqs: Vec<u64> = (0..20).map(|i| c.submit_reserved(job(i)).unwrap()).collect();
    // Killed between two submissions: the next one finds the connection
    // broken and waits for the server to be back.
    site.kill_server();
    let submitter = std::thread::spawn(move || {
        let seqs: Vec<u64> = (20..40).map(|i| c.submit_reserved(job(i)).unwrap()).collect();
        (c, seqs)
    });
    std::thread::sleep(Duration::from_millis(300));
    site.start_server();
    let (mut c, more) = submitter.join().unwrap();
    seqs.extend(more);
    assert!(c.take_lost().is_empty() && c.take_answered().is_empty(), "each answered to its caller");
    let mut distinct = seqs.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), seqs.len(), "one number each: {seqs:?}");
    for seq in &seqs {
        site.wait_finished(&format!("{seq}.testsrv"), LONG);
    }
    let lines = site.lines("lines");
    for i in 0..40 {
        let n = lines.iter().filter(|(line, _)| line.starts_with(&format!("w{i} "))).count();
        assert_eq!(n, 1, "w{i} queued once: {lines:?}");
    }
    assert_eq!(lines.len(), 40, "{lines:?}");
}

/// A client in the middle of a burst of pipelined submissions (the Python
/// client's `call`) when the server is killed: it connects to the next
/// server and sends again what was not confirmed, which queues each job
/// once, also one the killed server had queued, and a connection left
/// idle across a restart names no job by its old numbers.
#[test]
fn pipelined_submissions_across_a_killed_server_are_queued_once_each() {
    let mut site = Site::new(&[]);
    site.start();
    let work = site.work.to_str().unwrap().to_string();
    let job = |i: usize| line_job(&work, &format!("p{i}"));
    let mut c = Client::connect(&site.addr()).unwrap();
    let mut seqs = Vec::new();
    const N: usize = 300;
    for i in 0..N {
        let seq = c.reserve_seq().unwrap();
        c.submit_pipelined(seq, job(i)).unwrap();
        seqs.push(seq);
        if i == 100 || i == 200 {
            // The server gets what was written so far, and dies before
            // (or while) it answers.
            c.send_buffered().unwrap();
            site.kill_server();
            site.start_server();
        }
    }
    c.flush_pipelined().unwrap();
    let answered = c.take_answered();
    assert!(c.take_lost().is_empty(), "nothing lost");
    assert_eq!(answered.len(), N, "one answer each");
    assert!(answered.iter().all(|(_, r)| r.is_ok()), "{answered:?}");
    // Idle across a restart: the next job is named by a fresh number.
    site.kill_server();
    site.start_server();
    let seq = c.reserve_seq().unwrap();
    assert!(seq > *seqs.iter().max().unwrap());
    c.submit_pipelined(seq, job(N)).unwrap();
    c.flush_pipelined().unwrap();
    assert_eq!(c.take_answered(), vec![(seq, Ok(()))]);
    seqs.push(seq);
    for seq in &seqs {
        site.wait_finished(&format!("{seq}.testsrv"), LONG);
    }
    // Each element by one job; a job may run twice only when a kill left
    // it running unconfirmed (as in the test above).
    let lines = site.lines("lines");
    let mut jobs_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in lines.keys() {
        let (element, job) = line.split_once(' ').unwrap();
        jobs_of.entry(element.to_string()).or_default().push(job.to_string());
    }
    for i in 0..=N {
        let jobs = jobs_of.get(&format!("p{i}")).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(jobs.len(), 1, "p{i} queued once: {jobs:?}");
    }
    assert_eq!(jobs_of.len(), N + 1);
    let reruns: usize = lines.values().map(|n| n - 1).sum();
    assert!(reruns <= 3 * 2, "{reruns} reruns");
}
