//! A server and an agent started separately, the agent joining over TCP from
//! its own state directory, as on a cluster (here both on loopback).

use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use picloud_proto::{Client, ClientRequest, ServerAddr, ServerReply};
use picloud_tests::{picloud_bin, wait_until};

/// Kills the process when dropped, so a failing test leaves nothing behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

/// A TCP relay between agents and the server whose connections a test can
/// cut, as a network failure would, while both processes go on.
struct Relay {
    addr: String,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    /// Relays each connection made to it to `to`.
    fn start(to: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let open = Arc::new(Mutex::new(Vec::new()));
        let kept = open.clone();
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { return };
                let Ok(outbound) = TcpStream::connect(&to) else { continue };
                kept.lock().unwrap().extend([inbound.try_clone().unwrap(), outbound.try_clone().unwrap()]);
                pipe(inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                pipe(outbound, inbound);
            }
        });
        Relay { addr, open }
    }

    /// Cuts every connection relayed so far: both ends see it close.
    fn cut(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` on a thread of its own until either closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// The state of node `name` as the server shows it.
fn node_state(socket: &ServerAddr, name: &str) -> Option<String> {
    match Client::connect(socket).ok()?.request(&ClientRequest::Nodes) {
        Ok(ServerReply::Nodes(n)) => n.into_iter().find(|n| n.name == name).map(|n| n.state),
        _ => None,
    }
}

/// Runs `picloud ARGS` against the server of `head`; its stdout.
fn picloud(head: &Path, args: &[&str]) -> String {
    let out =
        Command::new(picloud_bin()).args(args).current_dir(head).env("PICLOUD_DIR", head).output().unwrap();
    assert!(out.status.success(), "picloud {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_job_survives_a_cut_in_its_agents_connection() {
    let head = tempfile::tempdir().unwrap();
    let node = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(head.path().join("server.log")).unwrap();
    let _server = Running(
        Command::new(picloud_bin())
            .args(["server", "--name", "head", "--listen-tcp", &addr, "--node-timeout", "60", "--dir"])
            .arg(head.path())
            .env("PICLOUD_LOG", "info")
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let socket = ServerAddr::of_state_dir(head.path());
    wait_until("the server", Duration::from_secs(30), || Client::connect(&socket).is_ok());
    let relay = Relay::start(addr);
    let _agent = Running(
        Command::new(picloud_bin())
            .args(["agent", "--server", &relay.addr, "--hostname", "node7", "--dir"])
            .arg(node.path())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let up = || node_state(&socket, "node7").as_deref() == Some("up");
    wait_until("the agent to join", Duration::from_secs(30), up);
    // Not rerunnable: a job that lost its node would fail.
    let script = "touch started; while [ ! -e go ]; do sleep 0.05; done; echo $PBS_JOBID >> ran";
    let id = picloud(head.path(), &["submit", "-r", "n", "--", "sh", "-c", script]).trim().to_string();
    wait_until("the job to start", Duration::from_secs(30), || head.path().join("started").exists());

    relay.cut();
    let server_log = || std::fs::read_to_string(head.path().join("server.log")).unwrap();
    wait_until("the server to see the agent go", Duration::from_secs(30), || {
        server_log().contains("agent disconnected")
    });
    wait_until("the agent to come back", Duration::from_secs(30), up);
    std::fs::write(head.path().join("go"), "").unwrap();
    picloud(head.path(), &["wait", &id]);
    let stat: serde_json::Value =
        serde_json::from_str(&picloud(head.path(), &["stat", "--json", &id])).unwrap();
    assert_eq!(stat[0]["exit_status"], 0, "{stat}");
    assert_eq!(stat[0]["run_count"], 1, "kept, not queued again: {stat}");
    let ran = std::fs::read_to_string(head.path().join("ran")).unwrap();
    assert_eq!(ran, format!("{id}\n"), "ran once");
    // The node takes new work.
    let next = picloud(head.path(), &["submit", "--", "true"]).trim().to_string();
    picloud(head.path(), &["wait", &next]);
    assert!(!server_log().contains("node lost"), "{}", server_log());
}

#[test]
fn an_agent_joins_over_tcp_and_runs_jobs() {
    let head = tempfile::tempdir().unwrap();
    let node = tempfile::tempdir().unwrap();
    // A free port on loopback.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let quiet = || Stdio::null();
    let _server = Running(
        Command::new(picloud_bin())
            .args(["server", "--name", "head", "--listen-tcp", &addr, "--dir"])
            .arg(head.path())
            .stderr(quiet())
            .spawn()
            .unwrap(),
    );
    let socket = ServerAddr::of_state_dir(head.path());
    wait_until("the server", Duration::from_secs(30), || Client::connect(&socket).is_ok());
    let _agent = Running(
        Command::new(picloud_bin())
            .args(["agent", "--server", &addr, "--hostname", "node7", "--dir"])
            .arg(node.path())
            .stderr(quiet())
            .spawn()
            .unwrap(),
    );
    wait_until("the agent to join over TCP", Duration::from_secs(30), || {
        matches!(Client::connect(&socket).unwrap().request(&ClientRequest::Nodes),
                 Ok(ServerReply::Nodes(n)) if n.iter().any(|n| n.name == "node7" && n.state == "up"))
    });
    let out = Command::new(picloud_bin())
        .args(["submit", "--", "sh", "-c", "echo $PBS_JOBID on $(cat $PBS_NODEFILE)"])
        .current_dir(head.path())
        .env("PICLOUD_DIR", head.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(id, "1.head");
    let waited =
        Command::new(picloud_bin()).args(["wait", &id]).env("PICLOUD_DIR", head.path()).output().unwrap();
    assert!(waited.status.success(), "{}", String::from_utf8_lossy(&waited.stdout));
    let output = std::fs::read_to_string(head.path().join("sh.o1")).unwrap();
    assert_eq!(output, "1.head on node7\n");
    // A client may not use the agents' TCP port.
    let err = Client::connect(&ServerAddr::Tcp(addr)).err().expect("TCP clients are refused");
    assert!(err.to_string().contains("Unix socket"), "{err}");
}
