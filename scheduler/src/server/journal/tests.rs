//! Tests of the journal's files: round trips, torn tails cut at every byte,
//! damage in the middle refused with its offset, newer versions refused,
//! snapshots with the segments after them, and a full disk (on a small
//! tmpfs, when the tests run as root).

use std::path::Path;

use super::*;

fn config() -> JournalConfig {
    JournalConfig { preallocate: 64 << 10, ..JournalConfig::default() }
}

/// Appends one batch of `changes` (each a byte string) and commits it.
fn batch(j: &mut Journal, changes: &[&[u8]]) {
    for c in changes {
        j.append(|buf| buf.extend_from_slice(c));
    }
    j.commit_and_sync().unwrap();
}

/// The payloads of every replayed record, concatenated per record.
fn payloads(r: &Recovered) -> Vec<Vec<u8>> {
    r.segments
        .iter()
        .flat_map(|(_, bytes, recs)| recs.iter().map(move |rec| bytes[rec.payload.clone()].to_vec()))
        .collect()
}

/// Every file of the journal directory with its contents, to show that a
/// refused start changed nothing.
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// Sets the format version in the header of segment `n` (its checksum
/// made to match), as an older picloud would have written it.
pub(crate) fn set_segment_version(state: &Path, n: u64, version: u32) {
    let path = segment_path(&journal_dir(state), n);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    let c = crc(&[&bytes[0..32]]);
    bytes[32..36].copy_from_slice(&c.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
}

/// Every segment's number and the format version in its header.
pub(crate) fn segment_versions(state: &Path) -> Vec<(u64, u32)> {
    let dir = journal_dir(state);
    let mut found: Vec<(u64, u32)> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| match classify(e.ok()?.file_name().to_str()?) {
            Some(FileKind::Segment(n)) => Some(n),
            _ => None,
        })
        .map(|n| (n, u32_at(&std::fs::read(segment_path(&dir, n)).unwrap(), 8)))
        .collect();
    found.sort_unstable();
    found
}

fn seg1(state: &Path) -> PathBuf {
    segment_path(&journal_dir(state), 1)
}

#[test]
fn records_round_trip_in_order() {
    let state = tempfile::tempdir().unwrap();
    let (rec, mut j) = open(state.path(), &config()).unwrap();
    assert!(rec.snapshot.is_none() && payloads(&rec).is_empty() && rec.cut.is_none());
    assert!(j.is_empty());
    batch(&mut j, &[b"one", b"two"]);
    batch(&mut j, &[b"three"]);
    j.append(|buf| buf.extend_from_slice(b"never committed"));
    drop(j);
    let (rec, mut j) = open(state.path(), &config()).unwrap();
    assert_eq!(payloads(&rec), vec![b"onetwo".to_vec(), b"three".to_vec()]);
    assert!(rec.cut.is_none(), "a clean end is not a torn one");
    // Appending goes on after what was there, with the next batch number.
    batch(&mut j, &[b"four"]);
    drop(j);
    let (rec, _) = open(state.path(), &config()).unwrap();
    assert_eq!(payloads(&rec).len(), 3);
    let batches: Vec<u64> = rec.segments[0].2.iter().map(|r| r.batch).collect();
    assert_eq!(batches, vec![1, 2, 3]);
}

#[test]
fn a_torn_last_batch_is_cut_at_every_byte() {
    let state = tempfile::tempdir().unwrap();
    let (_, mut j) = open(state.path(), &config()).unwrap();
    batch(&mut j, &[b"first batch"]);
    batch(&mut j, &[b"second batch"]);
    let good_end = std::fs::metadata(seg1(state.path())).unwrap().len();
    batch(&mut j, &[b"the last batch, torn by a crash"]);
    drop(j);
    let whole = std::fs::read(seg1(state.path())).unwrap();
    for cut_at in good_end as usize..whole.len() {
        std::fs::write(seg1(state.path()), &whole[..cut_at]).unwrap();
        let (rec, _) = open(state.path(), &config()).unwrap();
        assert_eq!(
            payloads(&rec),
            vec![b"first batch".to_vec(), b"second batch".to_vec()],
            "cut at {cut_at}"
        );
        if cut_at as u64 > good_end {
            let (_, offset, bytes) = rec.cut.clone().expect("a torn tail is reported");
            assert_eq!((offset, bytes), (good_end, cut_at as u64 - good_end));
        }
        assert_eq!(std::fs::metadata(seg1(state.path())).unwrap().len(), good_end, "cut at {cut_at}");
    }
    // A flipped byte anywhere in the last record is a torn write too.
    for at in good_end as usize..whole.len() {
        let mut bytes = whole.clone();
        bytes[at] ^= 0x40;
        std::fs::write(seg1(state.path()), &bytes).unwrap();
        let (rec, _) = open(state.path(), &config()).unwrap();
        assert_eq!(payloads(&rec).len(), 2, "byte {at} flipped");
        assert_eq!(rec.cut.as_ref().map(|c| c.1), Some(good_end));
    }
}

#[test]
fn a_batch_of_several_records_is_cut_whole() {
    let state = tempfile::tempdir().unwrap();
    let (_, mut j) = open(state.path(), &config()).unwrap();
    batch(&mut j, &[b"small"]);
    let good_end = std::fs::metadata(seg1(state.path())).unwrap().len();
    let big = vec![7u8; RECORD_TARGET + 10];
    batch(&mut j, &[&big, b"second record of the batch"]);
    drop(j);
    let (rec, _) = open(state.path(), &config()).unwrap();
    assert_eq!(rec.segments[0].2.len(), 3, "the big batch is two records");
    // Its last record lost: the first one, though whole, goes with it.
    let whole = std::fs::read(seg1(state.path())).unwrap();
    std::fs::write(seg1(state.path()), &whole[..whole.len() - 3]).unwrap();
    let (rec, _) = open(state.path(), &config()).unwrap();
    assert_eq!(payloads(&rec), vec![b"small".to_vec()]);
    assert_eq!(rec.cut.unwrap().1, good_end);
    // After a power loss the second record may be on disk while a page of
    // the first is not: still a torn batch, not damage.
    let mut holed = whole.clone();
    holed[good_end as usize + 100] ^= 1;
    std::fs::write(seg1(state.path()), &holed).unwrap();
    let (rec, _) = open(state.path(), &config()).unwrap();
    assert_eq!(payloads(&rec), vec![b"small".to_vec()]);
}

#[test]
fn a_damaged_record_followed_by_valid_ones_is_refused_with_its_offset() {
    let state = tempfile::tempdir().unwrap();
    let (_, mut j) = open(state.path(), &config()).unwrap();
    batch(&mut j, &[b"first"]);
    let damaged_at = std::fs::metadata(seg1(state.path())).unwrap().len();
    batch(&mut j, &[b"second, to be damaged"]);
    batch(&mut j, &[b"third"]);
    drop(j);
    let mut bytes = std::fs::read(seg1(state.path())).unwrap();
    bytes[damaged_at as usize + RECORD_HEADER_LEN + 3] ^= 0xff;
    std::fs::write(seg1(state.path()), &bytes).unwrap();
    let before = contents(&journal_dir(state.path()));
    let err = open(state.path(), &config()).unwrap_err();
    match &err {
        JournalError::Corrupt { path, offset, .. } => {
            assert_eq!(path, &seg1(state.path()));
            assert_eq!(*offset, damaged_at);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&format!("byte offset {damaged_at}")), "{msg}");
    assert!(msg.contains(&seg1(state.path()).display().to_string()), "{msg}");
    assert!(msg.contains("truncate -s") && msg.contains("Nothing was changed"), "{msg}");
    assert_eq!(contents(&journal_dir(state.path())), before, "a refused start changes nothing");
}

#[test]
fn a_newer_format_is_refused_and_left_alone() {
    let state = tempfile::tempdir().unwrap();
    let (_, mut j) = open(state.path(), &config()).unwrap();
    batch(&mut j, &[b"x"]);
    drop(j);
    let mut bytes = std::fs::read(seg1(state.path())).unwrap();
    bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(seg1(state.path()), &bytes).unwrap();
    let before = contents(&journal_dir(state.path()));
    let err = open(state.path(), &config()).unwrap_err();
    assert!(
        matches!(err, JournalError::NewerVersion { found, .. } if found == FORMAT_VERSION + 1),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("newer picloud") && msg.contains(&format!("version {}", FORMAT_VERSION + 1)),
        "{msg}"
    );
    assert_eq!(contents(&journal_dir(state.path())), before);
    // A snapshot of a newer version too.
    let state = tempfile::tempdir().unwrap();
    let (_, mut j) = open(state.path(), &config()).unwrap();
    batch(&mut j, &[b"x"]);
    let n = j.rotate().unwrap();
    write_snapshot(j.dir(), n, FsyncMode::Always, |w| w.write_all(b"state").map_err(Into::into)).unwrap();
    drop(j);
    let snap = snapshot_path(&journal_dir(state.path()), n);
    let mut bytes = std::fs::read(&snap).unwrap();
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    std::fs::write(&snap, &bytes).unwrap();
    assert!(matches!(open(state.path(), &config()), Err(JournalError::NewerVersion { found: 7, .. })));
}

#[test]
fn snapshots_start_the_replay_and_old_segments_go() {
    let state = tempfile::tempdir().unwrap();
    let dir = journal_dir(state.path());
    let (_, mut j) = open(state.path(), &config()).unwrap();
    batch(&mut j, &[b"before snapshot 2"]);
    let n = j.rotate().unwrap();
    assert_eq!(n, 2);
    write_snapshot(&dir, n, FsyncMode::Always, |w| w.write_all(b"state at 2").map_err(Into::into)).unwrap();
    prune(&dir, 1).unwrap();
    batch(&mut j, &[b"after snapshot 2"]);
    let n = j.rotate().unwrap();
    write_snapshot(&dir, n, FsyncMode::Always, |w| w.write_all(b"state at 3").map_err(Into::into)).unwrap();
    // The snapshot before the last one and the segments after it stay.
    prune(&dir, 2).unwrap();
    batch(&mut j, &[b"after snapshot 3"]);
    drop(j);
    let names: Vec<String> = contents(&dir).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        vec![
            "segment-00000000000000000002.log",
            "segment-00000000000000000003.log",
            "snapshot-00000000000000000002.snap",
            "snapshot-00000000000000000003.snap",
        ]
    );
    let (rec, mut j) = open(state.path(), &config()).unwrap();
    assert_eq!(rec.snapshot_payload().unwrap().1, b"state at 3");
    assert_eq!(rec.snapshot_number, Some(3));
    assert_eq!(payloads(&rec), vec![b"after snapshot 3".to_vec()]);
    assert_eq!(j.segment(), 3);
    batch(&mut j, &[b"appended after a restart"]);
    drop(j);

    // A damaged newest snapshot: refused, pointing at the one before.
    let snap3 = snapshot_path(&dir, 3);
    let mut bytes = std::fs::read(&snap3).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&snap3, &bytes).unwrap();
    let err = open(state.path(), &config()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, JournalError::SnapshotCorrupt { .. }), "{err:?}");
    assert!(msg.contains(&snapshot_path(&dir, 2).display().to_string()), "{msg}");
    // Following the advice recovers from snapshot 2 and every segment since.
    std::fs::rename(&snap3, state.path().join("aside.snap")).unwrap();
    let (rec, _) = open(state.path(), &config()).unwrap();
    assert_eq!(rec.snapshot_payload().unwrap().1, b"state at 2");
    assert_eq!(
        payloads(&rec),
        vec![
            b"after snapshot 2".to_vec(),
            b"after snapshot 3".to_vec(),
            b"appended after a restart".to_vec()
        ]
    );
}

#[test]
fn a_missing_segment_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let dir = journal_dir(state.path());
    let (_, mut j) = open(state.path(), &config()).unwrap();
    batch(&mut j, &[b"1"]);
    j.rotate().unwrap();
    batch(&mut j, &[b"2"]);
    j.rotate().unwrap();
    batch(&mut j, &[b"3"]);
    drop(j);
    std::fs::remove_file(segment_path(&dir, 2)).unwrap();
    let err = open(state.path(), &config()).unwrap_err();
    assert!(matches!(err, JournalError::Incomplete { .. }), "{err:?}");
    assert!(err.to_string().contains("segment-00000000000000000002.log"), "{err}");
}

#[test]
fn a_segment_without_its_header_is_started_anew() {
    let state = tempfile::tempdir().unwrap();
    let dir = journal_dir(state.path());
    let (_, mut j) = open(state.path(), &config()).unwrap();
    batch(&mut j, &[b"kept"]);
    drop(j);
    // A crash right after creating segment 2.
    std::fs::write(segment_path(&dir, 2), &SEGMENT_MAGIC[..5]).unwrap();
    let (rec, mut j) = open(state.path(), &config()).unwrap();
    assert_eq!(payloads(&rec), vec![b"kept".to_vec()]);
    batch(&mut j, &[b"next"]);
    drop(j);
    let (rec, _) = open(state.path(), &config()).unwrap();
    assert_eq!(payloads(&rec), vec![b"kept".to_vec(), b"next".to_vec()]);
}

/// A tmpfs of `size` mounted on a fresh directory for the test's length;
/// `None` when this process may not mount (not root).
pub(crate) struct SmallDisk {
    pub(crate) dir: tempfile::TempDir,
}

impl SmallDisk {
    pub(crate) fn mount(size: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .ok()?;
        if !status.success() {
            eprintln!("skipped: cannot mount a tmpfs here");
            return None;
        }
        Some(SmallDisk { dir })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_refuses_room_and_keeps_what_was_committed() {
    let Some(disk) = SmallDisk::mount("1m") else { return };
    let state = disk.path().join("state");
    let (_, mut j) = open(&state, &config()).unwrap();
    let chunk = vec![0x5au8; 20 << 10];
    let mut committed = 0;
    let err = loop {
        match j.reserve(chunk.len() as u64) {
            Ok(()) => {
                batch(&mut j, &[&chunk]);
                committed += 1;
            }
            Err(e) => break e,
        }
        assert!(committed < 100, "1 MiB cannot hold 2 MiB");
    };
    assert_eq!(err.raw_os_error(), Some(libc_enospc()), "{err}");
    assert!(committed >= 30, "most of the disk was used: {committed} batches");
    drop(j);
    let (rec, _) = open(&state, &config()).unwrap();
    assert_eq!(payloads(&rec).len(), committed);
    assert!(rec.cut.is_none());
}

fn libc_enospc() -> i32 {
    nix::errno::Errno::ENOSPC as i32
}
