//! Length-prefixed framing: `u32` little-endian length, then a bincode payload.
//!
//! [`read_frame`]/[`write_frame`] serve blocking streams; [`FrameReader`] is the
//! incremental decoder used by the non-blocking server, fed with whatever bytes
//! arrived and yielding every complete frame.

use std::io::{self, Read, Write};

use serde::{Serialize, de::DeserializeOwned};

use crate::MAX_FRAME_LEN;

/// Why a frame could not be read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame above [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge {
        /// Announced payload length.
        len: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(#[source] bincode::Error),
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The stream ended cleanly between frames.
    #[error("connection closed")]
    Closed,
    /// The underlying stream failed.
    #[error("i/o error: {0}")]
    Io(#[source] io::Error),
}

/// Encodes `msg` as one frame (length prefix included) appended to `out`.
pub fn encode_into<T: Serialize>(msg: &T, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    bincode::serialize_into(&mut *out, msg).expect("serialising into a Vec cannot fail");
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(msg, &mut out);
    out
}

/// Decodes one frame payload (without its length prefix).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    bincode::deserialize(payload).map_err(FrameError::Malformed)
}

/// Writes `msg` as one frame to a blocking stream.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)).map_err(FrameError::Io)
}

/// Reads one frame from a blocking stream and decodes it.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    match read_full(r, &mut len)? {
        0 => return Err(FrameError::Closed),
        4 => {}
        _ => return Err(FrameError::Truncated),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    let mut payload = vec![0; len];
    if read_full(r, &mut payload)? != len {
        return Err(FrameError::Truncated);
    }
    decode(&payload)
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(filled)
}

/// Incremental frame decoder for non-blocking streams.
///
/// Bytes are read straight into its buffer by [`FrameReader::read_from`]
/// (or appended with [`FrameReader::push`]); complete payloads are taken with
/// [`FrameReader::next_payload`]. An oversized length is reported as soon as
/// its 4 bytes arrive, before any of the payload is buffered.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// Received bytes in `start..end`; the rest is room for the next reads,
    /// zeroed once when the buffer grows rather than before every read.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// The buffer's first size, and what it grows by at least.
const READ_CHUNK: usize = 64 * 1024;
/// The least room a read is offered.
const MIN_READ_ROOM: usize = 4 * 1024;

impl FrameReader {
    /// A reader with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads what `r` has available until it would block. Returns `Ok(false)`
    /// when the stream reached its end.
    pub fn read_from(&mut self, r: &mut impl Read) -> io::Result<bool> {
        loop {
            self.make_room(MIN_READ_ROOM);
            match r.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Appends bytes directly (for tests and for callers that read themselves).
    pub fn push(&mut self, bytes: &[u8]) {
        self.make_room(bytes.len());
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Returns the next complete payload, `Ok(None)` if more bytes are needed.
    pub fn next_payload(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(avail[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge { len });
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let begin = self.start + 4;
        self.start = begin + len;
        Ok(Some(&self.buf[begin..begin + len]))
    }

    /// The next complete payload, left in place for [`FrameReader::next_payload`]
    /// (None when it is incomplete or too large).
    pub fn peek_payload(&self) -> Option<&[u8]> {
        let avail = &self.buf[self.start..self.end];
        let len = u32::from_le_bytes(avail.get(..4)?.try_into().expect("4 bytes")) as usize;
        avail.get(4..4 + len.min(MAX_FRAME_LEN + 1)).filter(|p| p.len() == len)
    }

    /// Whether bytes of an incomplete frame are buffered.
    pub fn has_partial(&self) -> bool {
        self.end > self.start
    }

    /// Makes room for at least `want` more bytes (and [`READ_CHUNK`] when the
    /// buffer is new or full): consumed bytes are dropped first (the bytes
    /// kept move to the front), then the buffer grows.
    fn make_room(&mut self, want: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end >= want {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let need = self.end + want.max(READ_CHUNK);
        if self.buf.len() < need {
            self.buf.resize(need.max(self.buf.len() * 2), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peeked_payload_is_still_the_next_one() {
        use crate::msg::{ClientRequest, JobCommand, JobSpec};
        let spec = JobSpec::new("j", JobCommand::Argv(vec!["true".into()]), "/");
        let mut r = FrameReader::new();
        let mut wire = Vec::new();
        encode_into(&ClientRequest::SubmitReserved { seq: 3, spec: Box::new(spec.clone()) }, &mut wire);
        encode_into(&ClientRequest::Submit(Box::new(spec)), &mut wire);
        r.push(&wire[..wire.len() - 1]);
        let first = r.peek_payload().expect("complete").to_vec();
        assert!(ClientRequest::is_reserved_submission(&first));
        assert_eq!(r.next_payload().unwrap(), Some(&first[..]));
        // The second is incomplete: nothing to peek.
        assert_eq!(r.peek_payload(), None);
        r.push(&wire[wire.len() - 1..]);
        let second = r.peek_payload().expect("complete now").to_vec();
        assert!(!ClientRequest::is_reserved_submission(&second));
        assert!(matches!(decode::<ClientRequest>(&second).unwrap(), ClientRequest::Submit(_)));
    }

    #[test]
    fn round_trip_blocking() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &(7u32, "hello".to_string())).unwrap();
        write_frame(&mut wire, &vec![1u64, 2, 3]).unwrap();
        let mut r = &wire[..];
        let a: (u32, String) = read_frame(&mut r).unwrap();
        let b: Vec<u64> = read_frame(&mut r).unwrap();
        assert_eq!(a, (7, "hello".to_string()));
        assert_eq!(b, vec![1, 2, 3]);
        assert!(matches!(read_frame::<u32>(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn truncated_frame_is_reported() {
        let wire = encode(&"a long enough string".to_string());
        let mut r = &wire[..wire.len() - 3];
        assert!(matches!(read_frame::<String>(&mut r), Err(FrameError::Truncated)));
        let mut r = &wire[..2];
        assert!(matches!(read_frame::<String>(&mut r), Err(FrameError::Truncated)));
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_payload() {
        let wire = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes();
        let mut r = &wire[..];
        assert!(matches!(read_frame::<String>(&mut r), Err(FrameError::TooLarge { .. })));
        let mut fr = FrameReader::new();
        fr.push(&wire);
        assert!(matches!(fr.next_payload(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn incremental_reader_yields_frames_split_anywhere() {
        let mut wire = Vec::new();
        for i in 0..50u32 {
            encode_into(&(i, vec![i; i as usize]), &mut wire);
        }
        for chunk in [1usize, 3, 7, 64] {
            let mut fr = FrameReader::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                fr.push(piece);
                while let Some(p) = fr.next_payload().unwrap() {
                    got.push(decode::<(u32, Vec<u32>)>(p).unwrap());
                }
            }
            assert_eq!(got.len(), 50);
            assert!(got.iter().enumerate().all(|(i, (n, v))| *n == i as u32 && v.len() == i));
            assert!(!fr.has_partial());
        }
    }

    /// A reader that hands out `data` in pieces of at most `piece` bytes,
    /// then would block.
    struct Trickle<'a> {
        data: &'a [u8],
        piece: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.data.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.piece.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn reads_keep_frames_whole_across_compaction_and_growth() {
        // Frames from empty to about twice the first buffer, read in
        // pieces that do not line up with them, taken a few reads at a time:
        // consumed bytes are dropped and kept ones moved to the front while a
        // frame is incomplete.
        let sizes: Vec<usize> = (0..40).map(|i| (i * 3_331) % (2 * READ_CHUNK + 7)).collect();
        let mut wire = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            encode_into(&vec![i as u8; n], &mut wire);
        }
        for piece in [5usize, 4_093, 70_000] {
            let mut fr = FrameReader::new();
            let mut got = Vec::new();
            for slice in wire.chunks(150_001) {
                let mut src = Trickle { data: slice, piece };
                assert!(fr.read_from(&mut src).unwrap(), "would block, not closed");
                while let Some(p) = fr.next_payload().unwrap() {
                    got.push(decode::<Vec<u8>>(p).unwrap());
                }
            }
            assert_eq!(got.len(), sizes.len(), "pieces of {piece}");
            for (i, (v, &n)) in got.iter().zip(&sizes).enumerate() {
                assert!(v.len() == n && v.iter().all(|&b| b == i as u8), "frame {i}, pieces of {piece}");
            }
            assert!(!fr.has_partial());
        }
        // The end of the stream is told apart from a read that would block.
        let mut fr = FrameReader::new();
        assert!(!fr.read_from(&mut &b""[..]).unwrap());
    }

    #[test]
    fn garbage_payload_is_malformed() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&3u32.to_le_bytes());
        wire.extend_from_slice(&[0xff, 0xff, 0xff]);
        let mut r = &wire[..];
        assert!(matches!(read_frame::<String>(&mut r), Err(FrameError::Malformed(_))));
    }
}
