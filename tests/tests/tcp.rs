//! A server and an agent started separately, the agent joining over TCP from
//! its own state directory, as on a cluster (here both on loopback).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
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
