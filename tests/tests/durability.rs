//! The journal with real processes: a `picloud server` killed with SIGKILL
//! at several moments (right after acknowledgements among them) and
//! started again loses no acknowledged job; a torn last record is cut; a
//! damaged record in the middle and a newer format refuse the start,
//! saying where and what to do, and change nothing.
//!
//! Agents do not reconnect to a restarted server yet: an agent stops (and
//! kills its tasks) when its server dies, so each restart starts a new
//! agent, and a task that ran at a kill runs again (it is rerunnable). Such
//! a task may have written its line just before the kill, so a duplicate
//! is allowed for at most one task per core and kill; everything else runs
//! exactly once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use picloud_proto::{Client, ClientRequest, ServerAddr, ServerReply};
use picloud_tests::{picloud_bin, wait_until};

const LONG: Duration = Duration::from_secs(180);

/// A process killed (SIGKILL) when dropped, so a failing test leaves nothing.
struct Proc(Option<Child>);

impl Proc {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.0.as_ref().expect("running").id() as i32)
    }

    /// Waits for the process to exit on its own.
    fn wait_exit(&mut self, timeout: Duration) {
        let child = self.0.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "process {} did not exit", child.id());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.0 = None;
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A server and an agent started separately in one state directory, so
/// that the server can be killed alone and started again.
struct Site {
    dir: tempfile::TempDir,
    work: PathBuf,
    server: Proc,
    agent: Proc,
    starts: u32,
}

impl Site {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("picloud-durability-").tempdir().unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let bin_dir = dir.path().join("bin");
        let status = Command::new(picloud_bin())
            .arg("install-pbs-commands")
            .arg(&bin_dir)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        Site { dir, work, server: Proc(None), agent: Proc(None), starts: 0 }
    }

    fn addr(&self) -> ServerAddr {
        ServerAddr::of_state_dir(self.dir.path())
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(name)).unwrap()
    }

    /// Runs `picloud server` to completion (for a start that must fail).
    fn server_refuses(&self) -> Output {
        Command::new(picloud_bin())
            .args(["server", "--name", "testsrv", "--dir"])
            .arg(self.dir.path())
            .env("PICLOUD_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Starts the server and a new agent, and waits until the agent has joined.
    fn start(&mut self) {
        self.starts += 1;
        let child = Command::new(picloud_bin())
            .args(["server", "--name", "testsrv", "--dir"])
            .arg(self.dir.path())
            .env("PICLOUD_LOG", "info")
            .stdout(self.log("server.log"))
            .stderr(self.log("server.log"))
            .spawn()
            .unwrap();
        self.server = Proc(Some(child));
        let addr = self.addr();
        wait_until("the server to listen", Duration::from_secs(60), || Client::connect(&addr).is_ok());
        let child = Command::new(picloud_bin())
            .args(["agent", "--kill-grace", "1", "--no-shm", "--dir"])
            .arg(self.dir.path())
            .env("PICLOUD_LOG", "info")
            .stdout(self.log("agent.log"))
            .stderr(self.log("agent.log"))
            .spawn()
            .unwrap();
        self.agent = Proc(Some(child));
        wait_until("the agent to join", Duration::from_secs(60), || {
            matches!(Client::connect(&addr).and_then(|mut c| c.request(&ClientRequest::Nodes)),
                     Ok(ServerReply::Nodes(n)) if n.iter().any(|n| n.state == "up"))
        });
    }

    /// SIGKILL to the server; its agent then stops by itself.
    fn kill_server(&mut self) {
        kill(self.server.pid(), Signal::SIGKILL).unwrap();
        self.server.wait_exit(Duration::from_secs(10));
        self.agent.wait_exit(Duration::from_secs(30));
    }

    fn run(&self, name: &str, args: &[&str]) -> Output {
        let path = if name == "picloud" { picloud_bin() } else { self.dir.path().join("bin").join(name) };
        Command::new(path)
            .args(args)
            .current_dir(&self.work)
            .env("PICLOUD_DIR", self.dir.path())
            .env_remove("PICLOUD_SERVER")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn qsub(&self, args: &[&str]) -> String {
        let out = self.run("qsub", args);
        assert!(out.status.success(), "qsub {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn job_json(&self, id: &str) -> serde_json::Value {
        let out = self.run("qstat", &["-f", "-F", "json", "-x", id]);
        assert!(out.status.success(), "qstat {id}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["Jobs"][id].clone()
    }

    fn wait_finished(&self, id: &str) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        wait_until(&format!("{id} to finish"), LONG, || {
            last = self.job_json(id);
            last["job_state"] == "F"
        });
        last
    }

    /// Lines of a file in the work directory, counted.
    fn lines(&self, name: &str) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for line in std::fs::read_to_string(self.work.join(name)).unwrap_or_default().lines() {
            *counts.entry(line.to_string()).or_default() += 1;
        }
        counts
    }

    fn journal_dir(&self) -> PathBuf {
        self.dir.path().join("journal")
    }

    /// The newest journal segment.
    fn last_segment(&self) -> PathBuf {
        let mut segs: Vec<PathBuf> = std::fs::read_dir(self.journal_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        segs.sort();
        segs.pop().expect("a segment")
    }
}

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
    let mut site = Site::new();
    site.start();
    let cores = match Client::connect(&site.addr()).unwrap().request(&ClientRequest::Nodes).unwrap() {
        ServerReply::Nodes(n) => n[0].info.cores.len(),
        other => panic!("{other:?}"),
    };
    let quiet = ["-j", "oe", "-o", "/dev/null"];
    // A plain job that fails, to see its status after the restarts.
    let failed = site.qsub(&["-o", "/dev/null", "-j", "oe", "--", "sh", "-c", "exit 3"]);
    site.wait_finished(&failed);
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
        let job = site.wait_finished(id);
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
    let mut site = Site::new();
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
    let mut site = Site::new();
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
    let mut site = Site::new();
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
    let mut site = Site::new();
    site.start();
    let id = site.qsub(&["-N", "hello", "--", "sh", "-c", "echo hi; exit 4"]);
    site.wait_finished(&id);
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
