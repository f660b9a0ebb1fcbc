//! The journal's files: append-only segments of checksummed records, and
//! snapshots, in `<state dir>/journal/`. This module knows bytes and files;
//! what the records mean is `durable.rs`'s business.
//!
//! # Files
//!
//! - `segment-<N>.log` (N in 20 decimal digits): a 40-byte header, then
//!   records. Segment N+1 is started when snapshot N+1 is taken.
//! - `snapshot-<N>.snap`: the whole state as of the start of segment N
//!   (written as `snapshot-<N>.tmp`, synced, then renamed).
//!
//! Every file starts with an 8-byte magic and a little-endian `u32` format
//! version: those 12 bytes keep their meaning in every future version, so
//! that a newer journal is recognised and refused before anything else is
//! read.
//!
//! Segment header (40 bytes, little-endian): magic `PICLJRNL`, version,
//! reserved `u32`, segment number `u64`, number of its first batch `u64`,
//! CRC-32 of the preceding 32 bytes, reserved `u32`.
//!
//! Record (24-byte header, then `len` bytes of payload): magic
//! [`RECORD_MAGIC`], `len: u32`, `crc: u32` (CRC-32 of the 12 header bytes
//! after it and of the payload), `kind: u8` (what the payload holds:
//! [`RECORD_CHANGES`]), `flags: u8` ([`LAST_OF_BATCH`]), reserved `u16`,
//! `batch: u64`.
//!
//! Snapshot header (56 bytes): magic `PICLSNAP`, version, reserved `u32`,
//! snapshot number `u64`, payload length `u64`, payload CRC-32 `u32`,
//! reserved `u32`, header CRC-32 `u32` (of the preceding 40 bytes),
//! reserved `u32` and `u64`; then the payload.
//!
//! # Group commit
//!
//! The core thread appends every change of a batch to an in-memory buffer
//! ([`Journal::append`]); at the end of the batch, [`Journal::commit`] frames
//! the buffer as records of one batch number (the last one flagged
//! [`LAST_OF_BATCH`]) and writes them with one `pwrite`. The sync is the
//! [`Syncer`]'s: a thread that takes every batch written since its last
//! `fdatasync`, syncs once for all of them, and only then releases their
//! replies, in order. The core thread goes on with the next batch while the
//! disk syncs, so a slow sync makes the next sync cover more batches rather
//! than hold up scheduling. A batch is the unit of atomicity: on reading,
//! the records of a batch whose last record is missing are dropped together.
//!
//! # Reading: torn tails and corruption
//!
//! [`open`] checks every file before it changes any. In each segment it
//! reads records while they are whole, their CRC matches and their batch
//! numbers follow on. At the first one that does not (offset X):
//!
//! 1. if no valid record of another batch follows anywhere after X, the tail
//!    from the end of the last complete batch on is what a crash during
//!    that batch's write left (nothing of it was acknowledged: its sync had
//!    not returned). In the last segment it is cut off; in an earlier one
//!    (whose every batch was synced before the next segment began) it is
//!    corruption;
//! 2. otherwise the damage is followed by data that was synced and
//!    acknowledged: the server refuses to start, naming the file and X, and
//!    changes nothing.
//!
//! Rule 1 looks for records of *another* batch because after a power loss
//! the pages of the last write may have reached the disk in any order, so a
//! valid record of the torn batch may follow a hole in it.
//!
//! # Disk space
//!
//! Segments grow into space reserved ahead with `fallocate(KEEP_SIZE)`
//! ([`Journal::reserve`]): the core thread asks for room before it accepts a
//! request, so a full disk refuses requests instead of failing a write after
//! the batch has changed the state. Where the file system cannot reserve
//! space, writes may still fail; the core thread then stops (see
//! `core_loop.rs`).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

/// Format version of segments and snapshots written by this build.
///
/// 2: snapshots end with the node-loss reruns of tasks; segments record a
/// rerun with each `Requeued`. Version 1 files are read.
/// 3: segments may record `Reserved` (job numbers set aside for a client).
/// Version 2 files are read as they are.
/// 4: segments may record `ReservedFor` (the same, with the client's user
/// and how far it used them). Version 3 files are read as they are.
/// 5: segments may record `Usage` (fair-share usage by user). Version 4
/// files are read as they are.
pub const FORMAT_VERSION: u32 = 5;

/// Magic of a segment file.
const SEGMENT_MAGIC: [u8; 8] = *b"PICLJRNL";
/// Magic of a snapshot file.
const SNAPSHOT_MAGIC: [u8; 8] = *b"PICLSNAP";
/// Size of a segment's header.
pub(crate) const SEGMENT_HEADER_LEN: usize = 40;
/// Size of a snapshot's header.
const SNAPSHOT_HEADER_LEN: usize = 56;

/// First four bytes of every record ("REC1" read as little-endian bytes).
pub(crate) const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"REC1");
/// Size of a record's header.
pub(crate) const RECORD_HEADER_LEN: usize = 24;
/// Record kind: the payload is a sequence of bincode-encoded changes.
pub(crate) const RECORD_CHANGES: u8 = 1;
/// Record flag: the last record of its batch.
pub(crate) const LAST_OF_BATCH: u8 = 1;
/// A record's payload is closed once it reaches this size; a batch larger
/// than this is written as several records (all in one write and one sync).
const RECORD_TARGET: usize = 4 << 20;
/// Longest payload a reader accepts (a longer length is damage).
const MAX_RECORD: usize = 1 << 30;

/// When writes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncMode {
    /// `fdatasync` once per batch, before its replies go out (the default).
    #[default]
    Always,
    /// Never sync: a crash of the process loses nothing (the kernel has the
    /// data), a crash of the machine may lose the last seconds. For
    /// benchmarks and throw-away clusters.
    Never,
}

impl std::str::FromStr for FsyncMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncMode::Always),
            "never" => Ok(FsyncMode::Never),
            _ => Err(format!("'{s}': expected always or never")),
        }
    }
}

impl std::fmt::Display for FsyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FsyncMode::Always => "always",
            FsyncMode::Never => "never",
        })
    }
}

/// How the server keeps its state across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalConfig {
    /// Keep a journal (in `<state dir>/journal/`) and replay it at start.
    /// Without one the server starts empty and forgets everything when it stops.
    pub enabled: bool,
    /// When writes are synced.
    pub fsync: FsyncMode,
    /// Take a snapshot (and start a new segment) once the current segment
    /// holds this many bytes.
    pub snapshot_bytes: u64,
    /// ... or this many changes.
    pub snapshot_changes: u64,
    /// Space reserved ahead of the write position, in bytes (0: none).
    pub preallocate: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            enabled: true,
            fsync: FsyncMode::Always,
            snapshot_bytes: 64 << 20,
            snapshot_changes: 1_000_000,
            preallocate: 8 << 20,
        }
    }
}

impl JournalConfig {
    /// No journal: nothing is written, nothing survives a restart.
    pub fn disabled() -> Self {
        JournalConfig { enabled: false, ..Default::default() }
    }
}

/// Why the journal could not be read or written. Every variant that refuses
/// a start says what to do, and that nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file of a newer, incompatible format.
    #[error(
        "{} was written by a newer picloud (journal format version {found}; this picloud reads version \
         {FORMAT_VERSION} and older). Start the picloud that wrote it, or move the directory {} aside to start \
         with an empty queue. Nothing was changed.",
        path.display(), path.parent().map(|p| p.display().to_string()).unwrap_or_default()
    )]
    NewerVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// A file that is not a journal file of this format, or whose header is damaged.
    #[error("{} is not a readable picloud journal file: {why}. {recovery} Nothing was changed.", path.display())]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
        /// What the administrator can do.
        recovery: String,
    },
    /// Damage followed by valid data: not a torn write.
    #[error(
        "the journal is damaged at byte offset {offset} of {}: {why}, and valid records follow, so this is \
         not the torn end of a crash. {recovery} Nothing was changed.",
        path.display()
    )]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// What was found there.
        why: String,
        /// What the administrator can do.
        recovery: String,
    },
    /// A snapshot whose payload does not match its checksum.
    #[error("snapshot {} is damaged: {why}. {recovery} Nothing was changed.", path.display())]
    SnapshotCorrupt {
        /// The snapshot.
        path: PathBuf,
        /// What is wrong.
        why: String,
        /// What the administrator can do.
        recovery: String,
    },
    /// Segments missing between a snapshot and the last segment.
    #[error("the journal in {} is incomplete: {why}. {recovery} Nothing was changed.", dir.display())]
    Incomplete {
        /// The journal directory.
        dir: PathBuf,
        /// What is missing.
        why: String,
        /// What the administrator can do.
        recovery: String,
    },
    /// A record or snapshot with a valid checksum whose content cannot be decoded.
    #[error(
        "cannot decode {what} at byte offset {offset} of {}: {source}. It was probably written by another \
         picloud version. Nothing was changed.",
        path.display()
    )]
    Decode {
        /// What was decoded.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// The cause.
        #[source]
        source: bincode::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JournalError + 'a {
    move |source| JournalError::Io { what, path: path.to_path_buf(), source }
}

fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The journal directory of a state directory.
pub fn journal_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("journal")
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("segment-{n:020}.log"))
}

fn snapshot_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("snapshot-{n:020}.snap"))
}

fn snapshot_tmp_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("snapshot-{n:020}.tmp"))
}

/// What a file name in the journal directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Segment(u64),
    Snapshot(u64),
    SnapshotTmp(u64),
}

fn classify(name: &str) -> Option<FileKind> {
    let num = |s: &str| s.parse::<u64>().ok();
    if let Some(n) = name.strip_prefix("segment-").and_then(|s| s.strip_suffix(".log")) {
        return num(n).map(FileKind::Segment);
    }
    if let Some(n) = name.strip_prefix("snapshot-").and_then(|s| s.strip_suffix(".snap")) {
        return num(n).map(FileKind::Snapshot);
    }
    if let Some(n) = name.strip_prefix("snapshot-").and_then(|s| s.strip_suffix(".tmp")) {
        return num(n).map(FileKind::SnapshotTmp);
    }
    None
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("sync the directory", dir))
}

// ---------------------------------------------------------------------------
// Headers

fn segment_header(number: u64, first_batch: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&number.to_le_bytes());
    h[24..32].copy_from_slice(&first_batch.to_le_bytes());
    let c = crc(&[&h[0..32]]);
    h[32..36].copy_from_slice(&c.to_le_bytes());
    h
}

/// Checks magic and version (the 12 bytes every version keeps).
fn check_version(path: &Path, bytes: &[u8], magic: &[u8; 8], recovery: &str) -> Result<(), JournalError> {
    let bad =
        |why: String| JournalError::BadHeader { path: path.to_path_buf(), why, recovery: recovery.into() };
    if bytes.len() < 12 {
        return Err(bad(format!("only {} bytes long", bytes.len())));
    }
    if bytes[0..8] != magic[..] {
        return Err(bad("wrong magic number".into()));
    }
    let version = u32_at(bytes, 8);
    if version > FORMAT_VERSION {
        return Err(JournalError::NewerVersion { path: path.to_path_buf(), found: version });
    }
    if version == 0 {
        return Err(bad("format version 0".into()));
    }
    Ok(())
}

/// A segment's number and first batch, from its header.
fn read_segment_header(path: &Path, bytes: &[u8], recovery: &str) -> Result<(u64, u64), JournalError> {
    check_version(path, bytes, &SEGMENT_MAGIC, recovery)?;
    let bad = |why: &str| JournalError::BadHeader {
        path: path.to_path_buf(),
        why: why.into(),
        recovery: recovery.into(),
    };
    if bytes.len() < SEGMENT_HEADER_LEN {
        return Err(bad("its header is incomplete"));
    }
    if crc(&[&bytes[0..32]]) != u32_at(bytes, 32) {
        return Err(bad("its header's checksum does not match"));
    }
    Ok((u64_at(bytes, 16), u64_at(bytes, 24)))
}

// ---------------------------------------------------------------------------
// Records

/// One record as found in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecordRef {
    /// Byte offset of its header in the segment.
    pub(crate) offset: u64,
    /// Offsets of its payload.
    pub(crate) payload: std::ops::Range<usize>,
    pub(crate) kind: u8,
    pub(crate) flags: u8,
    pub(crate) batch: u64,
}

impl RecordRef {
    fn end(&self) -> usize {
        self.payload.end
    }
}

/// Why no record starts at an offset.
fn parse_record(bytes: &[u8], at: usize) -> Result<RecordRef, String> {
    if bytes.len() - at < RECORD_HEADER_LEN {
        return Err(format!("{} bytes, less than a record header", bytes.len() - at));
    }
    if u32_at(bytes, at) != RECORD_MAGIC {
        return Err("no record starts here (wrong magic number)".into());
    }
    let len = u32_at(bytes, at + 4) as usize;
    if len > MAX_RECORD {
        return Err(format!("a record length of {len} bytes"));
    }
    let start = at + RECORD_HEADER_LEN;
    if bytes.len() - start < len {
        return Err(format!("a record of {len} bytes of which only {} are present", bytes.len() - start));
    }
    let stored = u32_at(bytes, at + 8);
    if crc(&[&bytes[at + 12..start], &bytes[start..start + len]]) != stored {
        return Err("a record whose checksum does not match".into());
    }
    Ok(RecordRef {
        offset: at as u64,
        payload: start..start + len,
        kind: bytes[at + 12],
        flags: bytes[at + 13],
        batch: u64_at(bytes, at + 16),
    })
}

/// Writes a record header for `payload` (already at `buf[at + 24..]`).
fn fill_record_header(buf: &mut [u8], at: usize, kind: u8, flags: u8, batch: u64) {
    let len = buf.len() - at - RECORD_HEADER_LEN;
    let len32 = u32::try_from(len).expect("records are closed long before 4 GiB");
    buf[at..at + 4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    buf[at + 4..at + 8].copy_from_slice(&len32.to_le_bytes());
    buf[at + 12] = kind;
    buf[at + 13] = flags;
    buf[at + 14..at + 16].copy_from_slice(&[0, 0]);
    buf[at + 16..at + 24].copy_from_slice(&batch.to_le_bytes());
    let c = crc(&[&buf[at + 12..at + RECORD_HEADER_LEN], &buf[at + RECORD_HEADER_LEN..]]);
    buf[at + 8..at + 12].copy_from_slice(&c.to_le_bytes());
}

/// What reading one segment found.
#[derive(Debug)]
pub(crate) struct SegmentScan {
    /// Records of complete batches, in order.
    pub(crate) records: Vec<RecordRef>,
    /// End of the last complete batch.
    pub(crate) valid_end: u64,
    /// Number of the batch after the last complete one.
    pub(crate) next_batch: u64,
    /// The first bad offset and what was there, when the segment does not
    /// end cleanly after its last complete batch.
    pub(crate) torn: Option<(u64, String)>,
}

/// Reads a segment's records (see the module doc). Fails on damage that is
/// not a torn tail; a torn tail is reported in [`SegmentScan::torn`]
/// whether or not this is the last segment (the caller decides).
pub(crate) fn scan_segment(path: &Path, bytes: &[u8], recovery: &str) -> Result<SegmentScan, JournalError> {
    let (_, first_batch) = read_segment_header(path, bytes, recovery)?;
    let mut records = Vec::new();
    let mut pending: Vec<RecordRef> = Vec::new();
    let mut next_batch = first_batch;
    let mut valid_end = SEGMENT_HEADER_LEN;
    let mut at = SEGMENT_HEADER_LEN;
    let mut bad = None;
    while at < bytes.len() {
        match parse_record(bytes, at) {
            Ok(rec) if rec.batch == next_batch => {
                at = rec.end();
                let last = rec.flags & LAST_OF_BATCH != 0;
                pending.push(rec);
                if last {
                    records.append(&mut pending);
                    valid_end = at;
                    next_batch += 1;
                }
            }
            Ok(rec) => {
                bad = Some(format!("a record of batch {} where batch {next_batch} was expected", rec.batch));
                break;
            }
            Err(why) => {
                bad = Some(why);
                break;
            }
        }
    }
    let torn = match bad {
        None if pending.is_empty() => None,
        None => Some((at as u64, "a batch whose last record is missing".to_string())),
        Some(why) => {
            // Any valid record of another batch after the damage means the
            // damage is not the torn end of the last write.
            for (pos, _) in
                bytes[at + 1..].windows(4).enumerate().filter(|(_, w)| **w == RECORD_MAGIC.to_le_bytes())
            {
                let pos = at + 1 + pos;
                if let Ok(rec) = parse_record(bytes, pos) {
                    if rec.batch != next_batch {
                        return Err(JournalError::Corrupt {
                            path: path.to_path_buf(),
                            offset: at as u64,
                            why,
                            recovery: recovery.into(),
                        });
                    }
                }
            }
            Some((at as u64, why))
        }
    };
    Ok(SegmentScan { records, valid_end: valid_end as u64, next_batch, torn })
}

// ---------------------------------------------------------------------------
// Snapshots

/// Writes bytes through to a file while computing their CRC and length.
struct HashingWriter<W> {
    inner: W,
    hasher: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes snapshot `n` of the state `write` serializes: to a temporary file,
/// synced, renamed into place, and the directory synced. Returns its size.
pub(crate) fn write_snapshot(
    dir: &Path,
    n: u64,
    fsync: FsyncMode,
    write: impl FnOnce(&mut dyn Write) -> Result<(), bincode::Error>,
) -> Result<u64, JournalError> {
    let tmp = snapshot_tmp_path(dir, n);
    let file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    let result = (|| {
        let mut w = HashingWriter {
            inner: BufWriter::with_capacity(1 << 20, &file),
            hasher: crc32fast::Hasher::new(),
            len: 0,
        };
        w.inner.write_all(&[0u8; SNAPSHOT_HEADER_LEN]).map_err(io_err("write", &tmp))?;
        write(&mut w).map_err(|e| match *e {
            bincode::ErrorKind::Io(source) => JournalError::Io { what: "write", path: tmp.clone(), source },
            other => panic!("serializing a snapshot cannot fail: {other}"),
        })?;
        w.flush().map_err(io_err("write", &tmp))?;
        let mut h = [0u8; SNAPSHOT_HEADER_LEN];
        h[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&n.to_le_bytes());
        h[24..32].copy_from_slice(&w.len.to_le_bytes());
        h[32..36].copy_from_slice(&w.hasher.clone().finalize().to_le_bytes());
        let c = crc(&[&h[0..40]]);
        h[40..44].copy_from_slice(&c.to_le_bytes());
        file.write_all_at(&h, 0).map_err(io_err("write", &tmp))?;
        if fsync == FsyncMode::Always {
            file.sync_all().map_err(io_err("sync", &tmp))?;
        }
        Ok(SNAPSHOT_HEADER_LEN as u64 + w.len)
    })();
    let size = match result {
        Ok(size) => size,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let path = snapshot_path(dir, n);
    std::fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
    if fsync == FsyncMode::Always {
        sync_dir(dir)?;
    }
    Ok(size)
}

/// Checks a snapshot file and returns its payload's range in `bytes`.
fn check_snapshot(path: &Path, bytes: &[u8], recovery: &str) -> Result<std::ops::Range<usize>, JournalError> {
    check_version(path, bytes, &SNAPSHOT_MAGIC, recovery)?;
    let bad = |why: String| JournalError::SnapshotCorrupt {
        path: path.to_path_buf(),
        why,
        recovery: recovery.into(),
    };
    if bytes.len() < SNAPSHOT_HEADER_LEN {
        return Err(bad("its header is incomplete".into()));
    }
    if crc(&[&bytes[0..40]]) != u32_at(bytes, 40) {
        return Err(bad("its header's checksum does not match".into()));
    }
    let len = u64_at(bytes, 24);
    if (bytes.len() - SNAPSHOT_HEADER_LEN) as u64 != len {
        return Err(bad(format!(
            "{} bytes of payload where the header says {len}",
            bytes.len() - SNAPSHOT_HEADER_LEN
        )));
    }
    let payload = SNAPSHOT_HEADER_LEN..bytes.len();
    if crc(&[&bytes[payload.clone()]]) != u32_at(bytes, 32) {
        return Err(bad("its checksum does not match".into()));
    }
    Ok(payload)
}

// ---------------------------------------------------------------------------
// Opening: recovery

/// What [`open`] read: the snapshot to start from and the records after it.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// The newest snapshot: its path and whole file; the payload is at
    /// [`Recovered::snapshot_payload`].
    pub(crate) snapshot: Option<(PathBuf, Vec<u8>, std::ops::Range<usize>)>,
    /// That snapshot's number.
    pub(crate) snapshot_number: Option<u64>,
    /// The segments replayed after it, in order, with their contents and records.
    pub(crate) segments: Vec<(PathBuf, Vec<u8>, Vec<RecordRef>)>,
    /// A torn tail that was cut: file, offset, bytes removed.
    pub(crate) cut: Option<(PathBuf, u64, u64)>,
}

impl Recovered {
    /// The snapshot's payload, if there is a snapshot.
    pub(crate) fn snapshot_payload(&self) -> Option<(&Path, &[u8])> {
        self.snapshot.as_ref().map(|(p, b, r)| (p.as_path(), &b[r.clone()]))
    }

    /// The snapshot's format version (from its header, checked at open).
    pub(crate) fn snapshot_version(&self) -> Option<u32> {
        self.snapshot.as_ref().map(|(_, b, _)| u32_at(b, 8))
    }

    /// The format version of the last segment read (the one the server
    /// goes on writing to), if it has a header.
    pub(crate) fn last_segment_version(&self) -> Option<u32> {
        self.segments.last().filter(|(_, b, _)| b.len() >= 12).map(|(_, b, _)| u32_at(b, 8))
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, JournalError> {
    let mut bytes = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io_err("read", path))?;
    Ok(bytes)
}

/// Opens the journal of a state directory: reads and checks every file,
/// then (and only if all is well) cuts a torn tail, removes leftovers of an
/// interrupted snapshot, and opens the last segment for appending (creating
/// the directory and a first segment when there is none).
pub(crate) fn open(state_dir: &Path, config: &JournalConfig) -> Result<(Recovered, Journal), JournalError> {
    let dir = journal_dir(state_dir);
    if !dir.exists() {
        std::fs::create_dir_all(&dir).map_err(io_err("create the journal directory", &dir))?;
        sync_dir(state_dir)?;
    }
    let mut segments = Vec::new();
    let mut snapshots = Vec::new();
    let mut leftovers = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(io_err("list the journal directory", &dir))? {
        let entry = entry.map_err(io_err("list the journal directory", &dir))?;
        match entry.file_name().to_str().and_then(classify) {
            Some(FileKind::Segment(n)) => segments.push(n),
            Some(FileKind::Snapshot(n)) => snapshots.push(n),
            Some(FileKind::SnapshotTmp(_)) => leftovers.push(entry.path()),
            None => {}
        }
    }
    segments.sort_unstable();
    snapshots.sort_unstable();

    // 1. The snapshot to start from: the newest.
    let mut recovered = Recovered { snapshot: None, snapshot_number: None, segments: Vec::new(), cut: None };
    let first_segment = match snapshots.last() {
        Some(&n) => {
            let path = snapshot_path(&dir, n);
            let recovery = match snapshots.iter().rev().nth(1) {
                Some(&prev) => format!(
                    "To recover, move {} out of {} (keep it for inspection): the server then starts from the \
                     previous snapshot ({}) and replays the journal segments after it",
                    path.display(),
                    dir.display(),
                    snapshot_path(&dir, prev).display()
                ),
                None => format!(
                    "There is no older snapshot to fall back on; move {} aside to start with an empty queue",
                    dir.display()
                ),
            };
            let bytes = read_file(&path)?;
            let payload = check_snapshot(&path, &bytes, &recovery)?;
            recovered.snapshot = Some((path, bytes, payload));
            recovered.snapshot_number = Some(n);
            n
        }
        None => segments.first().copied().unwrap_or(1),
    };
    // Older segments are kept until the snapshot after next; check their
    // headers too, so that a newer version anywhere refuses the start.
    let no_recovery = "Move the directory aside to start with an empty queue.";
    for &n in segments.iter().filter(|&&n| n < first_segment) {
        let path = segment_path(&dir, n);
        let mut head = [0u8; 12];
        let got = File::open(&path).and_then(|f| f.read_at(&mut head, 0)).map_err(io_err("read", &path))?;
        check_version(&path, &head[..got], &SEGMENT_MAGIC, no_recovery)?;
    }

    // 2. The segments after it must all be there.
    let replay: Vec<u64> = segments.iter().copied().filter(|&n| n >= first_segment).collect();
    for (k, &n) in replay.iter().enumerate() {
        if n != first_segment + k as u64 {
            let missing = first_segment + k as u64;
            return Err(JournalError::Incomplete {
                dir: dir.clone(),
                why: format!("segment {} is missing", segment_path(&dir, missing).display()),
                recovery:
                    "Restore the missing file, or move the directory aside to start with an empty queue."
                        .into(),
            });
        }
    }
    if recovered.snapshot.is_none() && first_segment != 1 {
        return Err(JournalError::Incomplete {
            dir: dir.clone(),
            why: format!(
                "it starts at segment {first_segment} but no snapshot covers the segments before it"
            ),
            recovery: "Restore the snapshot file, or move the directory aside to start with an empty queue."
                .into(),
        });
    }

    // 3. Read every segment; only the last may end in a torn batch.
    let mut next_batch = 1;
    let mut cut = None;
    for (k, &n) in replay.iter().enumerate() {
        let path = segment_path(&dir, n);
        let is_last = k + 1 == replay.len();
        let bytes = read_file(&path)?;
        if is_last
            && bytes.len() < SEGMENT_HEADER_LEN
            && SEGMENT_MAGIC.starts_with(&bytes[..bytes.len().min(8)])
        {
            // Created but its header never reached the disk: an empty segment.
            cut = Some((path, 0, bytes.len() as u64));
            break;
        }
        let recovery = recovery_text(&dir, &path, recovered.snapshot.as_ref().map(|s| s.0.as_path()));
        let scan = scan_segment(&path, &bytes, &recovery)?;
        let (number, first_batch) = read_segment_header(&path, &bytes, &recovery)?;
        if number != n {
            return Err(JournalError::BadHeader {
                path: path.clone(),
                why: format!("its header says segment {number}"),
                recovery: recovery.clone(),
            });
        }
        if k > 0 && first_batch != next_batch {
            return Err(JournalError::Corrupt {
                path: path.clone(),
                offset: 0,
                why: format!("it starts at batch {first_batch} where batch {next_batch} was expected"),
                recovery,
            });
        }
        next_batch = scan.next_batch;
        if let Some((offset, why)) = &scan.torn {
            if !is_last {
                return Err(JournalError::Corrupt {
                    path: path.clone(),
                    offset: *offset,
                    why: format!("{why}, in a segment that is not the last one"),
                    recovery,
                });
            }
            cut = Some((path.clone(), scan.valid_end, bytes.len() as u64 - scan.valid_end));
        }
        recovered.segments.push((path, bytes, scan.records));
    }

    // 4. All is well: change what needs changing.
    for path in leftovers {
        let _ = std::fs::remove_file(path);
    }
    let last = replay.last().copied();
    let journal = match (&cut, last) {
        (Some((path, 0, _)), Some(n)) => {
            // A segment without a complete header: write it anew.
            let _ = std::fs::remove_file(path);
            Journal::create_segment(&dir, n, next_batch, config)?
        }
        (_, Some(n)) => {
            let path = segment_path(&dir, n);
            let file =
                OpenOptions::new().read(true).write(true).open(&path).map_err(io_err("open", &path))?;
            let end = match &cut {
                Some((_, offset, _)) => {
                    tracing::warn!(
                        file = %path.display(),
                        offset,
                        "cutting the torn end of the journal (the last batch of a crash, never acknowledged)"
                    );
                    file.set_len(*offset).map_err(io_err("cut the torn end of", &path))?;
                    file.sync_all().map_err(io_err("sync", &path))?;
                    *offset
                }
                None => file.metadata().map_err(io_err("read the size of", &path))?.len(),
            };
            Journal::with_segment(&dir, n, file, end, next_batch, config)
        }
        (_, None) => Journal::create_segment(&dir, first_segment, next_batch, config)?,
    };
    recovered.cut = cut;
    Ok((recovered, journal))
}

fn recovery_text(dir: &Path, segment: &Path, snapshot: Option<&Path>) -> String {
    let from = match snapshot {
        Some(s) => format!("the last snapshot ({})", s.display()),
        None => "an empty queue (there is no snapshot)".into(),
    };
    format!(
        "To recover, keep a copy of {dir}, then either truncate {seg} to the offset given (`truncate -s OFFSET \
         {seg}`), losing every change recorded after it, or move {seg} and the segments after it out of the \
         directory to start from {from}",
        dir = dir.display(),
        seg = segment.display(),
    )
}

// ---------------------------------------------------------------------------
// Writing

/// The journal's writer, owned by the core thread (see the module doc).
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    config: JournalConfig,
    segment: u64,
    path: PathBuf,
    file: Arc<File>,
    /// End of the committed records.
    pos: u64,
    /// Bytes of the file reserved with `fallocate`, from its start.
    reserved: u64,
    /// Whether the file system reserves space (else writes may fail).
    can_reserve: bool,
    next_batch: u64,
    /// The open batch: records with room for their headers.
    buf: Vec<u8>,
    /// Offsets in `buf` of its records' headers; the last one is open.
    records: Vec<usize>,
    /// Changes appended since the segment began.
    changes: u64,
    /// Tests: the next commits fail as a failing disk would.
    #[cfg(test)]
    pub(crate) fail_commits: bool,
}

impl Journal {
    fn create_segment(
        dir: &Path,
        n: u64,
        first_batch: u64,
        config: &JournalConfig,
    ) -> Result<Self, JournalError> {
        let path = segment_path(dir, n);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create the journal segment", &path))?;
        file.write_all_at(&segment_header(n, first_batch), 0).map_err(io_err("write", &path))?;
        if config.fsync == FsyncMode::Always {
            file.sync_data().map_err(io_err("sync", &path))?;
            sync_dir(dir)?;
        }
        Ok(Self::with_segment(dir, n, file, SEGMENT_HEADER_LEN as u64, first_batch, config))
    }

    fn with_segment(
        dir: &Path,
        n: u64,
        file: File,
        end: u64,
        next_batch: u64,
        config: &JournalConfig,
    ) -> Self {
        Journal {
            dir: dir.to_path_buf(),
            config: config.clone(),
            segment: n,
            path: segment_path(dir, n),
            file: Arc::new(file),
            pos: end,
            reserved: end,
            can_reserve: config.preallocate > 0,
            next_batch,
            buf: Vec::new(),
            records: Vec::new(),
            changes: 0,
            #[cfg(test)]
            fail_commits: false,
        }
    }

    /// The journal directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The current segment's number.
    #[cfg(test)]
    pub(crate) fn segment(&self) -> u64 {
        self.segment
    }

    /// The current segment's file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes and changes in the current segment, committed or not.
    pub(crate) fn size(&self) -> (u64, u64) {
        (self.pos + self.buf.len() as u64, self.changes)
    }

    /// Whether the current segment holds no record, committed or not.
    pub(crate) fn is_empty(&self) -> bool {
        self.pos <= SEGMENT_HEADER_LEN as u64 && self.records.is_empty()
    }

    /// Whether the current segment is due for a snapshot.
    pub(crate) fn snapshot_due(&self) -> bool {
        let (bytes, changes) = self.size();
        bytes >= self.config.snapshot_bytes || changes >= self.config.snapshot_changes
    }

    /// Appends one change to the open batch: `encode` writes its bytes.
    pub(crate) fn append(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        let open = self.records.last().copied();
        if open.is_none_or(|at| self.buf.len() - at >= RECORD_TARGET) {
            self.records.push(self.buf.len());
            self.buf.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
        }
        encode(&mut self.buf);
        self.changes += 1;
    }

    /// Makes sure `extra` more bytes (beyond the open batch) fit in space
    /// already reserved, reserving more if needed. Fails when the file
    /// system has no room. Always succeeds where space cannot be reserved.
    pub(crate) fn reserve(&mut self, extra: u64) -> Result<(), std::io::Error> {
        if !self.can_reserve {
            return Ok(());
        }
        let need = self.pos + self.buf.len() as u64 + RECORD_HEADER_LEN as u64 + extra;
        if need <= self.reserved {
            return Ok(());
        }
        use nix::fcntl::{FallocateFlags, fallocate};
        let short = need - self.reserved;
        let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        let at = self.reserved as i64;
        let want = short.max(self.config.preallocate);
        let result = match fallocate(fd, keep, at, want as i64) {
            Ok(()) => Ok(want),
            // A smaller reservation may still hold what is needed now.
            Err(nix::errno::Errno::ENOSPC) if want > short => {
                fallocate(fd, keep, at, short as i64).map(|()| short)
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(got) => {
                self.reserved += got;
                Ok(())
            }
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                tracing::warn!(file = %self.path.display(), "the file system cannot reserve space: a full disk will stop the server");
                self.can_reserve = false;
                Ok(())
            }
            Err(e) => Err(std::io::Error::from(e)),
        }
    }

    /// Writes the open batch with one write. Returns what must be synced
    /// before the batch may be told about ([`Syncer::after_sync`]), unless
    /// nothing was written or [`FsyncMode::Never`]. On failure the batch is
    /// lost and the segment may end in a torn batch, which the next start
    /// cuts: the caller must not go on.
    pub(crate) fn commit(&mut self) -> Result<Option<SyncTicket>, JournalError> {
        if self.records.is_empty() {
            return Ok(None);
        }
        #[cfg(test)]
        if self.fail_commits {
            let source = std::io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32);
            return Err(JournalError::Io { what: "write to the journal", path: self.path.clone(), source });
        }
        let batch = self.next_batch;
        let n = self.records.len();
        for (k, &at) in self.records.iter().enumerate().rev() {
            let flags = if k + 1 == n { LAST_OF_BATCH } else { 0 };
            // Each header covers its payload: the bytes up to the next header.
            let end = self.records.get(k + 1).copied().unwrap_or(self.buf.len());
            fill_record_header(&mut self.buf[..end], at, RECORD_CHANGES, flags, batch);
        }
        self.file.write_all_at(&self.buf, self.pos).map_err(io_err("write to the journal", &self.path))?;
        self.pos += self.buf.len() as u64;
        self.reserved = self.reserved.max(self.pos);
        self.next_batch += 1;
        self.buf.clear();
        self.records.clear();
        Ok((self.config.fsync == FsyncMode::Always)
            .then(|| SyncTicket { file: self.file.clone(), path: self.path.clone() }))
    }

    /// Writes and syncs the open batch here and now.
    #[cfg(test)]
    pub(crate) fn commit_and_sync(&mut self) -> Result<(), JournalError> {
        if let Some(ticket) = self.commit()? {
            ticket.sync()?;
        }
        Ok(())
    }

    /// Starts the next segment (the open batch must be committed). Returns
    /// its number, which is also the number of the snapshot to write next.
    /// Every earlier segment must be synced whole before a later one
    /// exists (the caller waits for its [`Syncer`] first): only the last
    /// segment may end torn.
    pub(crate) fn rotate(&mut self) -> Result<u64, JournalError> {
        debug_assert!(self.records.is_empty(), "rotating with an open batch");
        let next = Self::create_segment(&self.dir, self.segment + 1, self.next_batch, &self.config)?;
        // The old segment's reserved space beyond its end is given back.
        let _ = self.file.set_len(self.pos);
        *self = next;
        Ok(self.segment)
    }

    /// The configuration.
    pub(crate) fn config(&self) -> &JournalConfig {
        &self.config
    }
}

/// A segment written to and not synced yet.
#[derive(Debug)]
pub(crate) struct SyncTicket {
    file: Arc<File>,
    path: PathBuf,
}

impl SyncTicket {
    /// Syncs the segment.
    pub(crate) fn sync(&self) -> Result<(), JournalError> {
        self.file.sync_data().map_err(io_err("sync the journal", &self.path))
    }
}

/// What the syncer thread is asked to do, in order.
enum SyncJob {
    /// Sync the segment (if there is a ticket), then run `release`.
    Release { ticket: Option<SyncTicket>, release: Box<dyn FnOnce() + Send> },
    /// Answer once everything before is done.
    Barrier(Sender<()>),
}

/// The thread that syncs written batches and then releases what they may
/// tell (see the module doc). Once a sync fails it releases nothing more:
/// the core thread learns of the failure from [`Syncer::failure`] or
/// [`Syncer::barrier`] and stops.
pub(crate) struct Syncer {
    jobs: Option<Sender<SyncJob>>,
    errors: Receiver<JournalError>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Syncer")
    }
}

impl Syncer {
    /// Starts the thread (it inherits the caller's signal mask).
    pub(crate) fn spawn() -> Result<Self, std::io::Error> {
        let (jobs, inbox) = crossbeam_channel::unbounded::<SyncJob>();
        let (report, errors) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new().name("journal-sync".into()).spawn(move || {
            let mut failed = false;
            while let Ok(first) = inbox.recv() {
                let mut group = vec![first];
                group.extend(inbox.try_iter());
                if !failed {
                    // One sync per segment for the whole group (rotation
                    // waits for a barrier, so there is normally one).
                    let mut synced: Vec<*const File> = Vec::new();
                    for job in &group {
                        let SyncJob::Release { ticket: Some(ticket), .. } = job else { continue };
                        if synced.contains(&Arc::as_ptr(&ticket.file)) {
                            continue;
                        }
                        if let Err(e) = ticket.sync() {
                            failed = true;
                            let _ = report.send(e);
                            break;
                        }
                        synced.push(Arc::as_ptr(&ticket.file));
                    }
                }
                for job in group {
                    match job {
                        SyncJob::Release { release, .. } if !failed => release(),
                        SyncJob::Release { .. } => {}
                        SyncJob::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            }
        })?;
        Ok(Syncer { jobs: Some(jobs), errors, thread: Some(thread) })
    }

    /// Runs `release` once the batch written under `ticket` (if any) and
    /// every earlier one is synced, after every earlier release.
    pub(crate) fn after_sync(&self, ticket: Option<SyncTicket>, release: Box<dyn FnOnce() + Send>) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(SyncJob::Release { ticket, release });
        }
    }

    /// Waits until everything handed over so far is synced and released;
    /// fails if a sync failed.
    pub(crate) fn barrier(&self) -> Result<(), JournalError> {
        let (done, wait) = crossbeam_channel::bounded(1);
        if let Some(jobs) = &self.jobs {
            if jobs.send(SyncJob::Barrier(done)).is_ok() {
                let _ = wait.recv();
            }
        }
        self.failure().map_or(Ok(()), Err)
    }

    /// A sync that failed, if one did (reported once).
    pub(crate) fn failure(&self) -> Option<JournalError> {
        self.errors.try_recv().ok()
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Removes segments and snapshots older than `keep_from` (and leftovers of
/// interrupted snapshots older than it).
pub(crate) fn prune(dir: &Path, keep_from: u64) -> Result<(), JournalError> {
    for entry in std::fs::read_dir(dir).map_err(io_err("list the journal directory", dir))? {
        let entry = entry.map_err(io_err("list the journal directory", dir))?;
        let old = match entry.file_name().to_str().and_then(classify) {
            Some(FileKind::Segment(n) | FileKind::Snapshot(n) | FileKind::SnapshotTmp(n)) => n < keep_from,
            None => false,
        };
        if old {
            std::fs::remove_file(entry.path()).map_err(io_err("remove", &entry.path()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
