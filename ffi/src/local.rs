//! The client's half of the agent's local protocol (`agent.sock`,
//! docs/workers.md "The agent's local socket"): encoding the three requests
//! and reading the three replies.
//!
//! A frame is a `u32` little-endian length (of what follows), a `u8` kind and
//! the body; a `str` is a `u32` length and UTF-8 bytes. Requests:
//! `SEGMENT_CREATE` (10, `u64 size`), `SEGMENT_RELEASE` (12, `str name`),
//! `SEGMENT_HOLD` (15, `str name`). Replies: `SEGMENT` (11, `str name`,
//! `str path`, `u64 size`), `OK` (13), `ERROR` (14, `str message`).
//!
//! The agent's own codec (`picloud_nodeagent::local_wire`) is not used here
//! so that libpicloud does not link the agent and hwloc; `tests` below check
//! this one against it.

use std::io::{self, Read};

/// Largest frame either side sends (kind and body), as docs/workers.md says.
pub(crate) const MAX_FRAME: u32 = 64 << 20;

/// A request to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request<'a> {
    /// `SEGMENT_CREATE`.
    Create(u64),
    /// `SEGMENT_HOLD`.
    Hold(&'a str),
    /// `SEGMENT_RELEASE`.
    Release(&'a str),
}

/// A reply from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `SEGMENT`: a segment was created.
    Segment { name: String, path: String, size: u64 },
    /// `OK`.
    Ok,
    /// `ERROR`.
    Error(String),
}

/// Why a reply could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The socket failed or closed.
    Io(io::Error),
    /// The agent sent something that is not a valid reply.
    Malformed(String),
}

/// The frame of `req`. Names are short (the agent's), so a frame can only
/// exceed the limit for a name of 64 MiB, which is refused here.
pub(crate) fn encode(req: Request<'_>) -> Result<Vec<u8>, String> {
    let (kind, body) = match req {
        Request::Create(size) => (10u8, size.to_le_bytes().to_vec()),
        Request::Hold(name) | Request::Release(name) => {
            let kind = if matches!(req, Request::Hold(_)) { 15 } else { 12 };
            let len = u32::try_from(name.len()).map_err(|_| "segment name too long".to_string())?;
            let mut body = len.to_le_bytes().to_vec();
            body.extend_from_slice(name.as_bytes());
            (kind, body)
        }
    };
    let len = body.len() as u64 + 1;
    if len > u64::from(MAX_FRAME) {
        return Err("segment name too long".to_string());
    }
    let mut frame = Vec::with_capacity(4 + len as usize);
    frame.extend_from_slice(&(len as u32).to_le_bytes());
    frame.push(kind);
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Reads fields from a frame's body, failing on a short body.
struct Body<'a> {
    kind: &'static str,
    rest: &'a [u8],
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], ReadError> {
        if self.rest.len() < n {
            return Err(ReadError::Malformed(format!(
                "{} reply too short: field {field} needs {n} bytes, {} are left",
                self.kind,
                self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u32(&mut self, field: &str) -> Result<u32, ReadError> {
        let b = self.take(4, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, field: &str) -> Result<u64, ReadError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn str(&mut self, field: &str) -> Result<String, ReadError> {
        let n = self.u32(field)? as usize;
        let b = self.take(n, field)?;
        String::from_utf8(b.to_vec()).map_err(|e| {
            ReadError::Malformed(format!("{} reply: field {field} is not UTF-8: {e}", self.kind))
        })
    }

    fn end(self) -> Result<(), ReadError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ReadError::Malformed(format!(
                "{} reply has {} bytes after its last field",
                self.kind,
                self.rest.len()
            )))
        }
    }
}

/// Reads one reply from `r`.
pub(crate) fn read_reply(r: &mut impl Read) -> Result<Reply, ReadError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(ReadError::Io)?;
    let len = u32::from_le_bytes(len);
    if len == 0 || len > MAX_FRAME {
        return Err(ReadError::Malformed(format!("reply frame of length {len}")));
    }
    let mut frame = vec![0u8; len as usize];
    r.read_exact(&mut frame).map_err(ReadError::Io)?;
    let kind = frame[0];
    let reply = match kind {
        11 => {
            let mut b = Body { kind: "SEGMENT", rest: &frame[1..] };
            let name = b.str("name")?;
            let path = b.str("path")?;
            let size = b.u64("size")?;
            b.end()?;
            Reply::Segment { name, path, size }
        }
        13 => {
            Body { kind: "OK", rest: &frame[1..] }.end()?;
            Reply::Ok
        }
        14 => {
            let mut b = Body { kind: "ERROR", rest: &frame[1..] };
            let message = b.str("message")?;
            b.end()?;
            Reply::Error(message)
        }
        k => return Err(ReadError::Malformed(format!("unknown reply kind {k}"))),
    };
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use picloud_nodeagent::local_wire::{self, Direction, LocalMsg};

    use super::*;

    fn agent_decodes(frame: &[u8]) -> LocalMsg {
        let (msg, used) = local_wire::decode_frame(frame, Direction::ToAgent).unwrap().unwrap();
        assert_eq!(used, frame.len());
        msg
    }

    #[test]
    fn the_agent_reads_our_requests() {
        assert_eq!(
            agent_decodes(&encode(Request::Create(1 << 40)).unwrap()),
            LocalMsg::SegmentCreate { size: 1 << 40 }
        );
        assert_eq!(
            agent_decodes(&encode(Request::Hold("picloud-ab-1")).unwrap()),
            LocalMsg::SegmentHold { name: "picloud-ab-1".into() }
        );
        assert_eq!(
            agent_decodes(&encode(Request::Release("é")).unwrap()),
            LocalMsg::SegmentRelease { name: "é".into() }
        );
    }

    fn agent_says(msg: LocalMsg) -> Vec<u8> {
        let mut out = Vec::new();
        local_wire::encode(&msg, &mut out).unwrap();
        out
    }

    #[test]
    fn we_read_the_agents_replies() {
        let seg = LocalMsg::Segment { name: "n".into(), path: "/dev/shm/n".into(), size: 4096 };
        assert_eq!(
            read_reply(&mut &agent_says(seg)[..]).unwrap(),
            Reply::Segment { name: "n".into(), path: "/dev/shm/n".into(), size: 4096 }
        );
        assert_eq!(read_reply(&mut &agent_says(LocalMsg::Ok)[..]).unwrap(), Reply::Ok);
        let err = LocalMsg::Error { message: "quota".into() };
        assert_eq!(read_reply(&mut &agent_says(err)[..]).unwrap(), Reply::Error("quota".into()));
    }

    #[test]
    fn malformed_replies_are_refused() {
        let bad = |bytes: &[u8]| match read_reply(&mut &bytes[..]) {
            Err(ReadError::Malformed(m)) => m,
            other => panic!("{bytes:?}: {other:?}"),
        };
        assert!(bad(&[0, 0, 0, 0]).contains("length 0"));
        assert!(bad(&(MAX_FRAME + 1).to_le_bytes()).contains("length"));
        assert!(bad(&[1, 0, 0, 0, 99]).contains("kind 99"));
        assert!(bad(&[2, 0, 0, 0, 13, 0]).contains("after its last field"));
        assert!(bad(&[3, 0, 0, 0, 14, 9, 0]).contains("too short"));
        assert!(bad(&[6, 0, 0, 0, 14, 1, 0, 0, 0, 0xff]).contains("UTF-8"));
        // A reply cut short by a closed socket is an I/O error, not a reply.
        assert!(matches!(read_reply(&mut &[5u8, 0, 0, 0, 13][..]), Err(ReadError::Io(_))));
    }
}
