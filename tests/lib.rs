//! Shared helpers of the cross-process integration tests: a [`Cluster`] is a
//! real `picloud up` (server and agent processes) in a temporary state
//! directory, with `qsub`/`qstat`/`qdel`/`qrls` links to the real binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use picloud_proto::{Client, ClientRequest, ServerAddr, ServerReply};

/// The `picloud` binary under test: `$PICLOUD_BIN`, else the one cargo built
/// next to this test executable (`target/<profile>/picloud`).
pub fn picloud_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PICLOUD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("picloud");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build --bins`) or set PICLOUD_BIN",
        bin.display()
    );
    bin
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A server and one agent, started with `picloud up` in a temporary directory.
pub struct Cluster {
    /// State directory (`PICLOUD_DIR`).
    pub dir: tempfile::TempDir,
    /// A scratch directory to submit from.
    pub work: PathBuf,
    bin_dir: PathBuf,
    up: Option<Child>,
}

impl Cluster {
    /// Starts `picloud up` and waits until its agent has joined.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts `picloud up` with extra arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new().prefix("picloud-test-").tempdir().expect("tempdir");
        let work = dir.path().join("work");
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir_all(&work).unwrap();
        let bin = picloud_bin();
        let status = Command::new(&bin)
            .arg("install-pbs-commands")
            .arg(&bin_dir)
            .stdout(Stdio::null())
            .status()
            .expect("install-pbs-commands");
        assert!(status.success());
        let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
        let up = Command::new(&bin)
            .args(["up", "--name", "testsrv", "--kill-grace", "1"])
            .args(extra)
            .arg("--dir")
            .arg(dir.path())
            .env("PICLOUD_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("picloud up");
        let mut cluster = Cluster { dir, work, bin_dir, up: Some(up) };
        let addr = cluster.addr();
        wait_until("the agent to join", Duration::from_secs(30), || {
            if let Some(status) = cluster.up.as_mut().unwrap().try_wait().unwrap() {
                panic!("picloud up exited early ({status}): {}", cluster.log());
            }
            let Ok(mut c) = Client::connect(&addr) else { return false };
            matches!(c.request(&ClientRequest::Nodes), Ok(ServerReply::Nodes(n)) if n.iter().any(|n| n.state == "up"))
        });
        cluster
    }

    /// The server's socket.
    pub fn addr(&self) -> ServerAddr {
        ServerAddr::of_state_dir(self.dir.path())
    }

    /// A connected protocol client.
    pub fn client(&self) -> Client {
        Client::connect(&self.addr()).expect("connect to the test server")
    }

    /// Sends `signal` to `picloud up` and waits (at most `timeout`) for it to exit.
    pub fn stop_with(
        &mut self,
        signal: nix::sys::signal::Signal,
        timeout: Duration,
    ) -> std::process::ExitStatus {
        let mut up = self.up.take().expect("picloud up is running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(up.id() as i32), signal).unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = up.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = up.kill();
                panic!("picloud up did not stop within {timeout:?} after {signal}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What `picloud up` has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    /// A command (`qsub`, `qstat`, `qdel`, `qrls`, or `picloud`) for this
    /// cluster, run in the work directory.
    pub fn cmd(&self, name: &str) -> Command {
        let path = if name == "picloud" { picloud_bin() } else { self.bin_dir.join(name) };
        let mut cmd = Command::new(path);
        cmd.current_dir(&self.work).env("PICLOUD_DIR", self.dir.path()).env_remove("PICLOUD_SERVER");
        cmd
    }

    /// Runs a command with `args` to completion.
    pub fn run(&self, name: &str, args: &[&str]) -> Output {
        self.cmd(name).args(args).stdin(Stdio::null()).output().expect("run command")
    }

    /// Writes a script into the work directory and returns its path.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.work.join(name);
        std::fs::write(&path, body).unwrap();
        path
    }

    /// `qsub ARGS`, asserting success; returns the printed job id.
    pub fn qsub(&self, args: &[&str]) -> String {
        let out = self.run("qsub", args);
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "qsub {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(stdout.lines().count(), 1, "qsub must print exactly one line: {stdout:?}");
        stdout.trim().to_string()
    }

    /// `qstat -f -F json -x IDS`, parsed; returns the job's object.
    pub fn job_json(&self, id: &str) -> serde_json::Value {
        let out = self.run("qstat", &["-f", "-F", "json", "-x", id]);
        assert!(out.status.success(), "qstat failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qstat JSON");
        v["Jobs"][id].clone()
    }

    /// Waits until the job is finished (state F) and returns its JSON.
    pub fn wait_finished(&self, id: &str, timeout: Duration) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        wait_until(&format!("job {id} to finish"), timeout, || {
            last = self.job_json(id);
            last["job_state"] == "F"
        });
        last
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut up) = self.up.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(up.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = up.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = up.kill();
            let _ = up.wait();
        }
    }
}

/// A process killed (SIGKILL) when dropped, so that a failing test leaves
/// nothing behind.
pub struct Proc(Option<Child>);

impl Proc {
    /// No process.
    pub fn none() -> Self {
        Proc(None)
    }

    /// Its pid.
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0.as_ref().expect("running").id() as i32)
    }

    /// Whether it was started and has not exited.
    pub fn is_running(&mut self) -> bool {
        self.0.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) {
        let child = self.0.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "process {} did not exit", child.id());
            std::thread::sleep(Duration::from_millis(20));
        }
        self.0 = None;
    }

    /// SIGKILL, and reaps it.
    pub fn kill9(&mut self) {
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

/// A `picloud server` and a `picloud agent` started separately in one state
/// directory, so that either can be killed alone and started again. The
/// agent outlives a killed server and reconnects to the next one.
pub struct Site {
    /// State directory.
    pub dir: tempfile::TempDir,
    /// A scratch directory to submit from.
    pub work: PathBuf,
    /// The server, while it runs.
    pub server: Proc,
    /// The agent, while it runs.
    pub agent: Proc,
    /// Extra arguments of every `picloud server`.
    pub server_args: Vec<String>,
    /// Servers started so far.
    pub starts: u32,
}

impl Site {
    /// An empty site (nothing started) with `qsub`... links in `<dir>/bin`.
    pub fn new(server_args: &[&str]) -> Self {
        let dir = tempfile::Builder::new().prefix("picloud-site-").tempdir().unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let status = Command::new(picloud_bin())
            .arg("install-pbs-commands")
            .arg(dir.path().join("bin"))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        Site {
            dir,
            work,
            server: Proc(None),
            agent: Proc(None),
            server_args: server_args.iter().map(|s| s.to_string()).collect(),
            starts: 0,
        }
    }

    /// The server's socket.
    pub fn addr(&self) -> ServerAddr {
        ServerAddr::of_state_dir(self.dir.path())
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(name)).unwrap()
    }

    /// Runs `picloud server` to completion (for a start that must fail).
    pub fn server_refuses(&self) -> Output {
        Command::new(picloud_bin())
            .args(["server", "--name", "testsrv", "--dir"])
            .arg(self.dir.path())
            .env("PICLOUD_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Starts the server and waits until it listens.
    pub fn start_server(&mut self) {
        self.starts += 1;
        let child = Command::new(picloud_bin())
            .args(["server", "--name", "testsrv", "--dir"])
            .arg(self.dir.path())
            .args(&self.server_args)
            .env("PICLOUD_LOG", "info")
            .stdout(self.log("server.log"))
            .stderr(self.log("server.log"))
            .spawn()
            .unwrap();
        self.server = Proc(Some(child));
        let addr = self.addr();
        wait_until("the server to listen", Duration::from_secs(60), || Client::connect(&addr).is_ok());
    }

    /// Starts an agent (it connects to the server, now or once it runs).
    pub fn start_agent(&mut self) {
        let child = Command::new(picloud_bin())
            .args(["agent", "--kill-grace", "1", "--no-shm", "--dir"])
            .arg(self.dir.path())
            .env("PICLOUD_LOG", "info")
            .stdout(self.log("agent.log"))
            .stderr(self.log("agent.log"))
            .spawn()
            .unwrap();
        self.agent = Proc(Some(child));
    }

    /// Starts the server, and an agent unless one runs; waits until the
    /// node is up.
    pub fn start(&mut self) {
        self.start_server();
        if !self.agent.is_running() {
            self.start_agent();
        }
        self.wait_node_up();
    }

    /// Waits until a node is up (its agent joined or came back).
    pub fn wait_node_up(&self) {
        let addr = self.addr();
        wait_until("the agent to join", Duration::from_secs(60), || {
            matches!(Client::connect(&addr).and_then(|mut c| c.request(&ClientRequest::Nodes)),
                     Ok(ServerReply::Nodes(n)) if n.iter().any(|n| n.state == "up"))
        });
    }

    /// SIGKILL to the server; the agent goes on and will reconnect.
    pub fn kill_server(&mut self) {
        nix::sys::signal::kill(self.server.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
        self.server.wait_exit(Duration::from_secs(10));
    }

    /// Runs `picloud` or a PBS command of the site in its work directory.
    pub fn run(&self, name: &str, args: &[&str]) -> Output {
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

    /// `qsub ARGS`; panics unless it succeeds. Returns the job id.
    pub fn qsub(&self, args: &[&str]) -> String {
        let out = self.run("qsub", args);
        assert!(out.status.success(), "qsub {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// `qstat -f -F json -x` of one job (`extra` adds options, e.g. `-t`).
    pub fn stat_json(&self, id: &str, extra: &[&str]) -> serde_json::Value {
        let out = self.run("qstat", &[&["-f", "-F", "json", "-x"], extra, &[id]].concat());
        assert!(out.status.success(), "qstat {id}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `qstat -f` of one job as JSON.
    pub fn job_json(&self, id: &str) -> serde_json::Value {
        self.stat_json(id, &[])["Jobs"][id].clone()
    }

    /// Waits (up to `timeout`) until the job has finished; returns it.
    pub fn wait_finished(&self, id: &str, timeout: Duration) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        wait_until(&format!("{id} to finish"), timeout, || {
            last = self.job_json(id);
            last["job_state"] == "F"
        });
        last
    }

    /// Lines of a file in the work directory, counted.
    pub fn lines(&self, name: &str) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for line in std::fs::read_to_string(self.work.join(name)).unwrap_or_default().lines() {
            *counts.entry(line.to_string()).or_default() += 1;
        }
        counts
    }

    /// The journal's directory.
    pub fn journal_dir(&self) -> PathBuf {
        self.dir.path().join("journal")
    }

    /// The newest journal segment.
    pub fn last_segment(&self) -> PathBuf {
        let mut segs: Vec<PathBuf> = std::fs::read_dir(self.journal_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        segs.sort();
        segs.pop().expect("a segment")
    }
}
