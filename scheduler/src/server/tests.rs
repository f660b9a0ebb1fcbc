//! The whole server in-process (`run` on a thread of the test, real Unix
//! sockets): request order on a connection, read-your-writes across
//! connections, hang-ups, shutdown.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use picloud_proto::frame::encode_into;
use picloud_proto::{
    Client, ClientRequest, Hello, JobCommand, JobRef, JobSpec, Role, ServerAddr, ServerReply, StatRequest,
    read_frame,
};

use super::*;

struct TestServer {
    dir: tempfile::TempDir,
    thread: Option<std::thread::JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    fn start_with(threads: ServerThreads) -> Self {
        let dir = tempfile::Builder::new().prefix("picloud-server-test-").tempdir().unwrap();
        let config = ServerConfig {
            state_dir: dir.path().to_path_buf(),
            name: "srv".into(),
            tcp: None,
            keep_finished: Duration::from_secs(3600),
            core: Default::default(),
            journal: Default::default(),
            threads,
        };
        let thread = std::thread::spawn(move || run(config));
        let server = TestServer { dir, thread: Some(thread) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Client::connect(&server.addr()).is_err() {
            assert!(Instant::now() < deadline, "the server did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        server
    }

    fn addr(&self) -> ServerAddr {
        ServerAddr::of_state_dir(self.dir.path())
    }

    fn client(&self) -> Client {
        Client::connect(&self.addr()).unwrap()
    }

    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(self.dir.path().join(picloud_proto::SOCKET_NAME)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn stop(mut self) {
        let reply = self.client().request(&ClientRequest::Shutdown).unwrap();
        assert_eq!(reply, ServerReply::Ok);
        self.thread.take().unwrap().join().unwrap().expect("the server stops cleanly");
        assert!(!self.dir.path().join(picloud_proto::SOCKET_NAME).exists(), "the socket is removed");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            if let Ok(mut c) = Client::connect(&self.addr()) {
                let _ = c.request(&ClientRequest::Shutdown);
            }
        }
    }
}

fn spec() -> JobSpec {
    JobSpec {
        submit_host: "login".into(),
        ..JobSpec::new("job", JobCommand::Argv(vec!["true".into()]), "/tmp")
    }
}

fn stat_one(seq: u64) -> ClientRequest {
    ClientRequest::Stat(StatRequest { jobs: vec![JobRef::Job(seq)], ..Default::default() })
}

fn pipelined_requests_are_answered_in_order_and_see_earlier_ones(threads: ServerThreads) {
    let server = TestServer::start_with(threads);
    let mut s = server.raw();
    let mut wire = Vec::new();
    encode_into(&Hello::new(Role::Client), &mut wire);
    encode_into(&ClientRequest::Submit(Box::new(spec())), &mut wire);
    encode_into(&ClientRequest::Stat(StatRequest::default()), &mut wire);
    encode_into(&ClientRequest::ServerStatus, &mut wire);
    encode_into(&ClientRequest::Submit(Box::new(spec())), &mut wire);
    encode_into(&ClientRequest::Nodes, &mut wire);
    encode_into(&ClientRequest::Stat(StatRequest::default()), &mut wire);
    s.write_all(&wire).unwrap();
    assert!(matches!(read_frame(&mut s).unwrap(), ServerReply::Welcome { .. }));
    assert!(matches!(read_frame(&mut s).unwrap(), ServerReply::Submitted { seq: 1, .. }));
    assert!(matches!(read_frame(&mut s).unwrap(), ServerReply::Jobs { jobs, .. } if jobs.len() == 1));
    assert!(matches!(read_frame(&mut s).unwrap(), ServerReply::ServerStatus(st) if st.queued == 1));
    assert!(matches!(read_frame(&mut s).unwrap(), ServerReply::Submitted { seq: 2, .. }));
    assert!(matches!(read_frame(&mut s).unwrap(), ServerReply::Nodes(n) if n.is_empty()));
    assert!(matches!(read_frame(&mut s).unwrap(), ServerReply::Jobs { jobs, .. } if jobs.len() == 2));
    drop(s);
    server.stop();
}

fn a_submit_is_seen_by_the_next_query_of_another_client(threads: ServerThreads) {
    let server = TestServer::start_with(threads);
    let mut submitter = server.client();
    let mut asker = server.client();
    for _ in 0..200 {
        let ServerReply::Submitted { seq, .. } =
            submitter.request(&ClientRequest::Submit(Box::new(spec()))).unwrap()
        else {
            panic!("not submitted")
        };
        match asker.request(&stat_one(seq)).unwrap() {
            ServerReply::Jobs { jobs, unknown } => {
                assert!(unknown.is_empty(), "job {seq} unknown right after its submission");
                assert_eq!(jobs[0].task.seq, seq);
            }
            other => panic!("{other:?}"),
        }
    }
    server.stop();
}

fn a_request_sent_before_a_hang_up_is_still_carried_out(threads: ServerThreads) {
    let server = TestServer::start_with(threads);
    let mut s = server.raw();
    let mut wire = Vec::new();
    encode_into(&Hello::new(Role::Client), &mut wire);
    encode_into(&ClientRequest::Submit(Box::new(spec())), &mut wire);
    encode_into(&ClientRequest::Submit(Box::new(spec())), &mut wire);
    s.write_all(&wire).unwrap();
    drop(s);
    let mut c = server.client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let Ok(ServerReply::Jobs { jobs, .. }) = c.request(&ClientRequest::Stat(StatRequest::default()))
        else {
            panic!("stat failed")
        };
        if jobs.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the submissions were lost: {jobs:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.stop();
}

fn a_wait_times_out_and_the_connection_goes_on(threads: ServerThreads) {
    let server = TestServer::start_with(threads);
    let mut c = server.client();
    let mut held = spec();
    held.hold = true;
    let ServerReply::Submitted { seq, .. } = c.request(&ClientRequest::Submit(Box::new(held))).unwrap()
    else {
        panic!()
    };
    let wait = ClientRequest::wait_all(vec![JobRef::Job(seq)], Some(50));
    let t0 = Instant::now();
    match c.request(&wait) {
        Err(picloud_proto::ClientError::Server(e)) => assert_eq!(e.kind, picloud_proto::ErrorKind::Timeout),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert!(matches!(c.request(&stat_one(seq)).unwrap(), ServerReply::Jobs { jobs, .. } if jobs.len() == 1));
    server.stop();
}

fn reserved_numbers_are_the_core_threads_and_their_connections(threads: ServerThreads) {
    let server = TestServer::start_with(threads);
    let mut s = server.raw();
    let mut wire = Vec::new();
    let reserved = |seq| ClientRequest::SubmitReserved { seq, spec: Box::new(spec()) };
    encode_into(&Hello::new(Role::Client), &mut wire);
    encode_into(&ClientRequest::Reserve { count: 3 }, &mut wire);
    // Pipelined: each number is known before the reply to its reservation.
    encode_into(&reserved(2), &mut wire);
    encode_into(&stat_one(2), &mut wire);
    encode_into(&reserved(2), &mut wire);
    s.write_all(&wire).unwrap();
    assert!(matches!(read_frame(&mut s).unwrap(), ServerReply::Welcome { .. }));
    assert_eq!(read_frame::<ServerReply>(&mut s).unwrap(), ServerReply::Reserved { first: 1, count: 3 });
    assert!(matches!(read_frame(&mut s).unwrap(), ServerReply::Submitted { seq: 2, id } if id == "2.srv"));
    assert!(matches!(read_frame(&mut s).unwrap(), ServerReply::Jobs { jobs, .. } if jobs.len() == 1));
    assert!(
        matches!(read_frame(&mut s).unwrap(), ServerReply::Error(e) if e.message.contains("job number 2"))
    );
    // Another connection may not use them; its own job comes after them.
    let mut c = server.client();
    match c.request(&reserved(3)) {
        Err(picloud_proto::ClientError::Server(e)) => {
            assert_eq!(e.kind, picloud_proto::ErrorKind::Invalid);
            assert!(e.message.contains("job number 3 is not reserved by this connection"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.request(&ClientRequest::Submit(Box::new(spec()))).unwrap(),
        ServerReply::Submitted { seq: 4, .. }
    ));
    drop(s);
    server.stop();
}

fn pipelined_submissions_follow_one_another_and_are_answered_in_order(threads: ServerThreads) {
    let server = TestServer::start_with(threads);
    let mut s = server.raw();
    let mut wire = Vec::new();
    encode_into(&Hello::new(Role::Client), &mut wire);
    encode_into(&ClientRequest::Reserve { count: 300 }, &mut wire);
    // More than may be in flight at once, then a query that must see them all.
    for seq in 1..=300 {
        encode_into(&ClientRequest::SubmitReserved { seq, spec: Box::new(spec()) }, &mut wire);
    }
    encode_into(&ClientRequest::Stat(StatRequest::default()), &mut wire);
    encode_into(&ClientRequest::SubmitReserved { seq: 300, spec: Box::new(spec()) }, &mut wire);
    s.write_all(&wire).unwrap();
    assert!(matches!(read_frame(&mut s).unwrap(), ServerReply::Welcome { .. }));
    assert_eq!(read_frame::<ServerReply>(&mut s).unwrap(), ServerReply::Reserved { first: 1, count: 300 });
    for want in 1..=300 {
        match read_frame::<ServerReply>(&mut s).unwrap() {
            ServerReply::Submitted { seq, .. } => assert_eq!(seq, want),
            other => panic!("reply {want}: {other:?}"),
        }
    }
    assert!(matches!(read_frame(&mut s).unwrap(), ServerReply::Jobs { jobs, .. } if jobs.len() == 300));
    assert!(
        matches!(read_frame(&mut s).unwrap(), ServerReply::Error(e) if e.message.contains("job number 300"))
    );
    drop(s);
    server.stop();
}

/// Runs each test against a server whose core has a thread of its own and
/// against one whose I/O thread runs the core.
macro_rules! with_both_threads {
    ($($name:ident),* $(,)?) => {
        mod separate_core {
            $(#[test]
            fn $name() {
                super::$name(super::ServerThreads::Separate)
            })*
        }
        mod inline_core {
            $(#[test]
            fn $name() {
                super::$name(super::ServerThreads::Inline)
            })*
        }
    };
}

with_both_threads!(
    pipelined_requests_are_answered_in_order_and_see_earlier_ones,
    a_submit_is_seen_by_the_next_query_of_another_client,
    a_request_sent_before_a_hang_up_is_still_carried_out,
    a_wait_times_out_and_the_connection_goes_on,
    reserved_numbers_are_the_core_threads_and_their_connections,
    pipelined_submissions_follow_one_another_and_are_answered_in_order,
);
