//! Bad input on the wire: garbage, truncated and oversized frames, a wrong
//! protocol version. Each bad connection gets an error and is closed; the server
//! keeps serving everyone else.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use picloud_proto::frame::encode;
use picloud_proto::{ClientRequest, ErrorKind, Hello, Role, ServerReply, StatRequest, read_frame};
use picloud_tests::Cluster;

fn connect(c: &Cluster) -> UnixStream {
    let picloud_proto::ServerAddr::Unix(path) = c.addr() else { unreachable!() };
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads the server's error reply, then expects the connection to be closed.
fn expect_error_then_close(mut s: UnixStream) -> picloud_proto::ProtoError {
    let reply: ServerReply = read_frame(&mut s).expect("an error reply before closing");
    let ServerReply::Error(e) = reply else { panic!("expected an error, got {reply:?}") };
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).expect("connection closed cleanly");
    assert_eq!(n, 0, "nothing after the error");
    e
}

/// A healthy client can still talk to the server.
fn server_still_serves(c: &Cluster) {
    let mut client = c.client();
    let reply = client.request(&ClientRequest::Stat(StatRequest::default())).unwrap();
    assert!(matches!(reply, ServerReply::Jobs { .. }));
}

#[test]
fn garbage_bytes_get_an_error_and_a_closed_connection() {
    let c = Cluster::start();
    let mut healthy = c.client();
    let mut s = connect(&c);
    // A length of 5 then bytes that decode as no Hello.
    s.write_all(&[5, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0x99]).unwrap();
    let e = expect_error_then_close(s);
    assert_eq!(e.kind, ErrorKind::Malformed, "{e:?}");
    // A client connected before the garbage is unaffected.
    assert!(matches!(healthy.request(&ClientRequest::Nodes), Ok(ServerReply::Nodes(_))));
    server_still_serves(&c);
}

#[test]
fn oversized_frame_is_refused_before_its_payload() {
    let c = Cluster::start();
    let mut s = connect(&c);
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let e = expect_error_then_close(s);
    assert_eq!(e.kind, ErrorKind::Malformed);
    assert!(e.message.contains("exceeds the limit"), "{}", e.message);
    server_still_serves(&c);
}

#[test]
fn truncated_frame_then_hangup_leaves_the_server_healthy() {
    let c = Cluster::start();
    let mut s = connect(&c);
    let frame = encode(&Hello::new(Role::Client));
    s.write_all(&frame[..frame.len() - 2]).unwrap();
    drop(s);
    server_still_serves(&c);
}

#[test]
fn malformed_request_after_handshake_is_refused() {
    let c = Cluster::start();
    let mut s = connect(&c);
    s.write_all(&encode(&Hello::new(Role::Client))).unwrap();
    let welcome: ServerReply = read_frame(&mut s).unwrap();
    assert!(matches!(welcome, ServerReply::Welcome { .. }));
    s.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
    let e = expect_error_then_close(s);
    assert_eq!(e.kind, ErrorKind::Malformed);
    server_still_serves(&c);
}

#[test]
fn wrong_protocol_version_is_refused_with_both_versions_named() {
    let c = Cluster::start();
    let mut s = connect(&c);
    let mut hello = Hello::new(Role::Client);
    hello.version = picloud_proto::PROTOCOL_VERSION + 41;
    s.write_all(&encode(&hello)).unwrap();
    let e = expect_error_then_close(s);
    assert_eq!(e.kind, ErrorKind::VersionMismatch);
    assert!(e.message.contains(&(picloud_proto::PROTOCOL_VERSION + 41).to_string()), "{}", e.message);
    server_still_serves(&c);
}

#[test]
fn bad_magic_is_refused() {
    let c = Cluster::start();
    let mut s = connect(&c);
    let mut hello = Hello::new(Role::Client);
    hello.magic = 0x4745_5420; // "GET "
    s.write_all(&encode(&hello)).unwrap();
    let e = expect_error_then_close(s);
    assert_eq!(e.kind, ErrorKind::Malformed);
    server_still_serves(&c);
}

#[test]
fn second_server_on_the_same_state_directory_refuses() {
    let c = Cluster::start();
    let out = c.cmd("picloud").args(["server", "--dir"]).arg(c.dir.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    server_still_serves(&c);
}
