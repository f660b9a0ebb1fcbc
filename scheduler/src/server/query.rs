//! The query thread: answers `Stat`, `Results`, `Nodes` and `ServerStatus` from the
//! latest published [`Snapshot`](super::Snapshot), so that a `qstat` of a
//! million jobs neither waits for the core thread nor holds it up, and does
//! not hold up the I/O thread while its reply is built.
//!
//! 1. Takes a query, and every other one queued behind it.
//! 2. Loads the latest snapshot, at least as new as the highest floor among
//!    them (see `snapshot.rs`).
//! 3. Answers and encodes each, hands the frames to the I/O thread as
//!    replies, and wakes it once.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use mio::Waker;
use picloud_proto::{ClientRequest, ErrorKind, ProtoError, ServerReply};

use super::snapshot::Snapshots;
use super::{ConnId, Outbound};

/// A query handed from the I/O thread to the query thread.
#[derive(Debug)]
pub(crate) struct QueryJob {
    pub(crate) conn: ConnId,
    pub(crate) request: ClientRequest,
    /// The caller's uid.
    pub(crate) uid: u32,
    /// The snapshot version the reply must reflect at least.
    pub(crate) floor: u64,
}

/// Runs until the I/O thread drops its sender.
pub(crate) fn run(
    queries: Receiver<QueryJob>,
    snapshots: Snapshots,
    out: Sender<Outbound>,
    waker: Arc<Waker>,
) {
    while let Ok(first) = queries.recv() {
        let batch: Vec<QueryJob> = std::iter::once(first).chain(queries.try_iter()).collect();
        let floor = batch.iter().map(|q| q.floor).max().unwrap_or(0);
        let snap = snapshots.load_at_least(floor);
        for q in batch {
            let reply = snap
                .answer_as(&q.request, q.uid)
                .unwrap_or_else(|| ServerReply::Error(ProtoError::new(ErrorKind::Invalid, "not a query")));
            let mut bytes = Vec::new();
            super::encode_reply_into(&reply, &mut bytes);
            let msg =
                Outbound::Send { conn: q.conn, bytes, answers: 1, version: snap.version(), close: false };
            if out.send(msg).is_err() {
                return;
            }
        }
        let _ = waker.wake();
    }
}
