//! Reading one short frame from a socket, the way the server and the agent
//! take each message: a non-blocking read until the socket is empty, then
//! the frame out of the buffer.
//!
//! - `frames/read_small/frame_reader`: [`FrameReader::read_from`], which
//!   reads into room it keeps (zeroed once, when the buffer grows).
//! - `frames/read_small/zeroed_chunk`: the same bytes read through a 64 KiB
//!   stack buffer zeroed before every read and copied into the frame
//!   buffer, which is how the reader used to work; the ratio of the two is
//!   what that zeroing cost per message.
//!
//! Run with `cargo bench -p picloud-bench --bench frames`.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

use criterion::{Criterion, criterion_group, criterion_main};
use picloud_proto::FrameReader;

/// A frame of a 200-byte payload, about the size of a task's end report.
fn frame() -> Vec<u8> {
    let mut wire = Vec::new();
    picloud_proto::frame::encode_into(&vec![7u8; 200], &mut wire);
    wire
}

fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("a socket pair");
    b.set_nonblocking(true).expect("non-blocking");
    (a, b)
}

/// Reads until the socket would block, through a zeroed 64 KiB chunk.
fn read_zeroed_chunk(r: &mut UnixStream, out: &mut Vec<u8>) {
    loop {
        let mut chunk = [0u8; 64 * 1024];
        match r.read(std::hint::black_box(&mut chunk)) {
            Ok(0) => return,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

fn read_small(c: &mut Criterion) {
    let wire = frame();
    let mut group = c.benchmark_group("frames/read_small");
    group.bench_function("frame_reader", |b| {
        let (mut w, mut r) = pair();
        let mut frames = FrameReader::new();
        b.iter(|| {
            w.write_all(&wire).expect("write");
            assert!(frames.read_from(&mut r).expect("read"));
            let payload = frames.next_payload().expect("a frame").expect("whole");
            assert_eq!(payload.len(), wire.len() - 4);
        });
    });
    group.bench_function("zeroed_chunk", |b| {
        let (mut w, mut r) = pair();
        let mut buf = Vec::new();
        b.iter(|| {
            w.write_all(&wire).expect("write");
            read_zeroed_chunk(&mut r, &mut buf);
            assert_eq!(buf.len(), wire.len());
            buf.clear();
        });
    });
    group.finish();
}

// `criterion_group!` makes an undocumented `pub fn benches`.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, read_small);
}
criterion_main!(group::benches);
