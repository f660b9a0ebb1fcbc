//! `picloud_agent` and `picloud_segment`: shared-memory segments of the node
//! agent's store, created or held through its local socket and mapped into
//! this process (docs/workers.md, "Shared-memory segments").
//!
//! An agent handle is a connection to `agent.sock`. Each segment object is
//! one mapping and keeps that connection alive, so the agent handle may be
//! freed before its segments. The agent counts a connection's references to a
//! segment as a set (holding twice is holding once), so the connection counts
//! them here: the first segment object of a name takes the agent's reference
//! (by `SEGMENT_CREATE` or `SEGMENT_HOLD`), further ones only count, and
//! freeing the last sends `SEGMENT_RELEASE`. Closing the connection (the last
//! segment and the agent handle freed, or the process gone) releases whatever
//! it still holds.
//!
//! Mappings are shared with every other process that maps the segment: the
//! memory can change under the caller (another writer of the same user), and
//! touching it after its file was truncated raises `SIGBUS`. libpicloud itself
//! never reads or writes a segment's bytes; it only hands out the pointer.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use memmap2::{MmapOptions, MmapRaw};

use crate::args::{check_out, opt_str, req_str, write_out, write_str};
use crate::error::{FfiError, boundary, picloud_error_code::*};
use crate::handle::Registry;
use picloud_proto::local_wire::{self, Direction, LocalMsg, LocalWireError};

/// How long a reply of the agent may take before the connection is given up:
/// the agent answers from its main loop, at once unless it is stuck.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// One connection to an agent's local socket.
struct AgentConn {
    stream: UnixStream,
    /// Segment objects alive per name; the agent holds each listed name once
    /// for this connection.
    held: HashMap<String, Held>,
    /// Why the connection can no longer be used.
    broken: Option<String>,
}

/// A segment this connection holds for its segment objects.
struct Held {
    /// How many segment objects use it.
    objects: usize,
    /// Its file, as the agent said.
    path: PathBuf,
}

impl AgentConn {
    /// Sends `req` and reads its reply.
    /// Fails once the connection broke: every later call does.
    fn usable(&self) -> Result<(), FfiError> {
        match &self.broken {
            Some(why) => Err(FfiError::new(
                PICLOUD_ERR_CONNECTION_LOST,
                format_args!("the connection to the agent was lost earlier ({why}); connect again"),
            )),
            None => Ok(()),
        }
    }

    fn call(&mut self, req: LocalMsg) -> Result<LocalMsg, FfiError> {
        self.usable()?;
        let result = local_wire::write_msg(&mut self.stream, &req)
            .map_err(|error| LocalWireError::Io { error })
            .and_then(|()| local_wire::read_msg_in(&mut self.stream, Direction::FromAgent));
        let err = match result {
            Ok(Some(reply)) => return Ok(reply),
            Ok(None) => FfiError::new(PICLOUD_ERR_CONNECTION_LOST, "the agent closed the connection"),
            Err(LocalWireError::Io { error })
                if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                FfiError::new(
                    PICLOUD_ERR_TIMEOUT,
                    format_args!("the agent did not answer within {REPLY_TIMEOUT:?}"),
                )
            }
            Err(LocalWireError::Io { error }) => FfiError::new(
                PICLOUD_ERR_CONNECTION_LOST,
                format_args!("lost the connection to the agent: {error}"),
            ),
            Err(e) => {
                FfiError::new(PICLOUD_ERR_PROTOCOL, format_args!("unreadable reply from the agent: {e}"))
            }
        };
        // A late or half-read reply would answer the next request. The
        // connection stays open while segment objects use it: closing it
        // would make the agent release segments still mapped here.
        self.broken = Some(err.message.clone());
        Err(err)
    }

    /// Takes a reference on `name` for a new segment object: from the agent
    /// unless this connection holds it already.
    fn hold(&mut self, name: &str) -> Result<PathBuf, FfiError> {
        self.usable()?;
        if let Some(held) = self.held.get_mut(name) {
            held.objects += 1;
            return Ok(held.path.clone());
        }
        match self.call(LocalMsg::SegmentHold { name: name.to_string() })? {
            LocalMsg::Segment { name: got, path, .. } if got == name => {
                let path = PathBuf::from(path);
                self.held.insert(name.to_string(), Held { objects: 1, path: path.clone() });
                Ok(path)
            }
            LocalMsg::Error { message } => Err(FfiError::new(
                PICLOUD_ERR_SERVER,
                format_args!("the agent refused to hold segment {name}: {message}"),
            )),
            other => Err(unexpected("SEGMENT_HOLD", &other)),
        }
    }

    /// Drops a segment object's reference on `name`; the last one releases
    /// the agent's.
    fn release(&mut self, name: &str) -> Result<(), FfiError> {
        match self.held.get_mut(name) {
            Some(held) if held.objects > 1 => {
                held.objects -= 1;
                return Ok(());
            }
            Some(_) => {
                self.held.remove(name);
            }
            None => return Ok(()),
        }
        if self.broken.is_some() {
            // The agent released everything when the connection broke.
            return Ok(());
        }
        match self.call(LocalMsg::SegmentRelease { name: name.to_string() })? {
            LocalMsg::Ok => Ok(()),
            LocalMsg::Error { message } => Err(FfiError::new(
                PICLOUD_ERR_SERVER,
                format_args!("the agent refused to release segment {name}: {message}"),
            )),
            other => Err(unexpected("SEGMENT_RELEASE", &other)),
        }
    }
}

fn unexpected(request: &str, reply: &LocalMsg) -> FfiError {
    FfiError::new(
        PICLOUD_ERR_PROTOCOL,
        format_args!("unexpected reply from the agent to {request}: {}", reply.name()),
    )
}

type SharedConn = Arc<Mutex<AgentConn>>;

fn lock(conn: &SharedConn) -> Result<std::sync::MutexGuard<'_, AgentConn>, FfiError> {
    conn.lock().map_err(|_| {
        FfiError::new(
            PICLOUD_ERR_CONNECTION_LOST,
            "this agent connection was in use when libpicloud panicked; connect again",
        )
    })
}

/// A connection to the node agent's local socket. Opaque; made by
/// `picloud_agent_connect`, freed by `picloud_agent_free`.
pub struct picloud_agent {
    conn: SharedConn,
}

/// A shared-memory segment mapped into this process. Opaque; made by
/// `picloud_segment_create` or `picloud_segment_map`, freed by
/// `picloud_segment_free`.
pub struct picloud_segment {
    conn: SharedConn,
    name: String,
    /// Its file, as the agent said.
    path: String,
    map: MmapRaw,
    writable: bool,
}

static AGENTS: Registry<picloud_agent> = Registry::new("picloud_agent");
static SEGMENTS: Registry<picloud_segment> = Registry::new("picloud_segment");

/// Connects to the agent of a state directory.
///
/// `state_dir` is NULL for this user's default (`$PICLOUD_DIR`, else
/// `~/.picloud`), a state directory (its `agent.sock` is used), or the path of
/// an agent's socket itself. Free `*out` with `picloud_agent_free`.
///
/// # Safety
/// `state_dir` is NULL or a NUL-terminated string; `out` points to writable
/// memory for a pointer.
#[no_mangle]
pub unsafe extern "C" fn picloud_agent_connect(
    state_dir: *const c_char,
    out: *mut *mut picloud_agent,
) -> c_int {
    boundary(|| {
        check_out(out, "out")?;
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        let given = unsafe { opt_str(state_dir, "state_dir") }?;
        let path = match given {
            Some("") => return Err(FfiError::invalid("state_dir is empty (pass NULL for the default)")),
            Some(p) if !Path::new(p).is_dir() => PathBuf::from(p),
            Some(dir) => Path::new(dir).join("agent.sock"),
            None => picloud_proto::client::default_state_dir().join("agent.sock"),
        };
        let stream = UnixStream::connect(&path).map_err(|e| {
            FfiError::new(
                PICLOUD_ERR_CONNECT,
                format_args!(
                    "no picloud agent answers at {} ({e}): is `picloud up` or `picloud agent` running?",
                    path.display()
                ),
            )
        })?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(|e| {
                FfiError::new(PICLOUD_ERR_IO, format_args!("cannot set timeouts on {}: {e}", path.display()))
            })?;
        let conn = AgentConn { stream, held: HashMap::new(), broken: None };
        let handle = AGENTS.insert(picloud_agent { conn: Arc::new(Mutex::new(conn)) });
        // SAFETY: checked by check_out; writable by the caller's promise.
        unsafe { write_out(out, handle) };
        Ok(())
    })
}

/// Frees the agent handle. Segments made through it stay mapped and held
/// until they are freed themselves. NULL does nothing.
#[no_mangle]
pub extern "C" fn picloud_agent_free(agent: *mut picloud_agent) -> c_int {
    boundary(|| AGENTS.remove(agent, "agent").map(drop))
}

/// Opens a segment file without following a symbolic link.
fn open(path: &Path, writable: bool) -> Result<File, FfiError> {
    OpenOptions::new().read(true).write(writable).custom_flags(libc::O_NOFOLLOW).open(path).map_err(|e| {
        FfiError::new(PICLOUD_ERR_IO, format_args!("cannot open segment file {}: {e}", path.display()))
    })
}

fn map_err(path: &Path) -> impl FnOnce(std::io::Error) -> FfiError + '_ {
    move |e| FfiError::new(PICLOUD_ERR_IO, format_args!("cannot map segment file {}: {e}", path.display()))
}

/// Undoes a reference taken for a segment object that could not be made; the
/// first error stays the one reported.
fn undo_hold(conn: &mut AgentConn, name: &str) {
    let _ = conn.release(name);
}

/// Asks the agent for a new segment of `size` bytes (owned by this user,
/// counted against their quota) and maps it read-write. `*out` is the new
/// segment; its memory comes from a pool of this user's released segments
/// when one fits, so it is not necessarily zeroed.
///
/// # Safety
/// `out` points to writable memory for a pointer.
#[no_mangle]
pub unsafe extern "C" fn picloud_segment_create(
    agent: *mut picloud_agent,
    size: u64,
    out: *mut *mut picloud_segment,
) -> c_int {
    boundary(|| {
        let a = AGENTS.get(agent, "agent")?;
        check_out(out, "out")?;
        if size == 0 {
            return Err(FfiError::invalid("size is 0: a segment holds at least one byte"));
        }
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l <= isize::MAX as usize)
            .ok_or_else(|| FfiError::invalid(format_args!("size {size} cannot be mapped")))?;
        let mut conn = lock(&a.conn)?;
        let (name, path) = match conn.call(LocalMsg::SegmentCreate { size })? {
            LocalMsg::Segment { name, path, size: got } if got == size => (name, path),
            LocalMsg::Segment { name, path, size: got } => {
                // Not ours to keep: a segment of another size than asked.
                conn.held.insert(name.clone(), Held { objects: 1, path: PathBuf::from(path) });
                undo_hold(&mut conn, &name);
                return Err(FfiError::new(
                    PICLOUD_ERR_PROTOCOL,
                    format_args!("asked the agent for {size} bytes, got a segment of {got}"),
                ));
            }
            LocalMsg::Error { message } => {
                return Err(FfiError::new(
                    PICLOUD_ERR_SERVER,
                    format_args!("the agent refused a segment of {size} bytes: {message}"),
                ));
            }
            other => return Err(unexpected("SEGMENT_CREATE", &other)),
        };
        // The agent holds it for this connection from now on.
        let path = PathBuf::from(path);
        conn.held.entry(name.clone()).or_insert(Held { objects: 0, path: path.clone() }).objects += 1;
        let mapped =
            open(&path, true).and_then(|f| MmapOptions::new().len(len).map_raw(&f).map_err(map_err(&path)));
        // SAFETY: checked by check_out above; writable by the caller's promise.
        unsafe { adopt_mapping(&a.conn, conn, name, path, mapped, true, out) }
    })
}

/// Ends `picloud_segment_create` and `picloud_segment_map`: the segment named
/// `name`, which `conn` now holds, becomes a handle written to `*out`; if it
/// could not be mapped, the hold is given back and the error returned.
///
/// # Safety
/// `out` has passed `check_out` and points to writable memory for a pointer.
unsafe fn adopt_mapping(
    shared: &SharedConn,
    mut conn: std::sync::MutexGuard<'_, AgentConn>,
    name: String,
    path: PathBuf,
    mapped: Result<MmapRaw, FfiError>,
    writable: bool,
    out: *mut *mut picloud_segment,
) -> Result<(), FfiError> {
    let map = match mapped {
        Ok(m) => m,
        Err(e) => {
            undo_hold(&mut conn, &name);
            return Err(e);
        }
    };
    drop(conn);
    // The agent sent the path as a string: nothing is lost.
    let path = path.to_string_lossy().into_owned();
    let handle = SEGMENTS.insert(picloud_segment { conn: Arc::clone(shared), name, path, map, writable });
    // SAFETY: the caller's promise.
    unsafe { write_out(out, handle) };
    Ok(())
}

/// Whether `name` can be a segment's file name in the segment directory.
fn check_name(name: &str) -> Result<(), FfiError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.len() > 255 {
        return Err(FfiError::invalid(format_args!("'{name}' is not a segment name")));
    }
    Ok(())
}

/// Maps an existing segment of this user read-only, by name (as a task's
/// result names it: `picloud_results_segment`). The agent is asked to hold it
/// (`SEGMENT_HOLD`), so that it outlives the job that made it, until
/// `picloud_segment_free`; its answer says where the file is (the agent's
/// `--shm-dir`: `picloud_segment_path`). Writing to a read-only mapping
/// crashes the process (`SIGSEGV`).
///
/// # Safety
/// `name` is a NUL-terminated string; `out` points to writable memory for a
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn picloud_segment_map(
    agent: *mut picloud_agent,
    name: *const c_char,
    out: *mut *mut picloud_segment,
) -> c_int {
    boundary(|| {
        let a = AGENTS.get(agent, "agent")?;
        check_out(out, "out")?;
        // SAFETY: the caller passes a NUL-terminated string.
        let name = unsafe { req_str(name, "name") }?.to_string();
        check_name(&name)?;
        let mut conn = lock(&a.conn)?;
        let path = conn.hold(&name)?;
        let mapped = open(&path, false).and_then(|f| {
            let len = f.metadata().map_err(map_err(&path))?.len();
            let len = usize::try_from(len)
                .map_err(|_| FfiError::invalid(format_args!("{} is too large to map", path.display())))?;
            if len == 0 {
                return Err(FfiError::new(
                    PICLOUD_ERR_IO,
                    format_args!("segment file {} is empty", path.display()),
                ));
            }
            MmapOptions::new().len(len).map_raw_read_only(&f).map_err(map_err(&path))
        });
        // SAFETY: checked by check_out above; writable by the caller's promise.
        unsafe { adopt_mapping(&a.conn, conn, name, path, mapped, false, out) }
    })
}

/// `*ptr_out` = the first byte of the segment's mapping and `*len_out` its
/// length in bytes (the segment's size). Valid until `picloud_segment_free`.
/// `*writable_out` (if `writable_out` is not NULL) = 1 for a segment from
/// `picloud_segment_create`, 0 for a read-only one from `picloud_segment_map`.
///
/// # Safety
/// `ptr_out` and `len_out` point to writable memory; `writable_out` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn picloud_segment_data(
    segment: *const picloud_segment,
    ptr_out: *mut *mut c_void,
    len_out: *mut u64,
    writable_out: *mut c_int,
) -> c_int {
    boundary(|| {
        let s = SEGMENTS.get(segment, "segment")?;
        check_out(ptr_out, "ptr_out")?;
        check_out(len_out, "len_out")?;
        if !writable_out.is_null() {
            check_out(writable_out, "writable_out")?;
        }
        // SAFETY (all three): checked by check_out; writable by the caller's
        // promise. The mapping lives as long as the segment object, which the
        // registry keeps until picloud_segment_free.
        unsafe {
            write_out(ptr_out, s.map.as_mut_ptr().cast::<c_void>());
            write_out(len_out, s.map.len() as u64);
            if !writable_out.is_null() {
                write_out(writable_out, c_int::from(s.writable));
            }
        }
        Ok(())
    })
}

/// Copies the segment's name and a NUL into `buf` (`cap` bytes): the name
/// to put in encoded values and `picloud_python_call.segments`. Names are
/// short (under 64 bytes for an agent's own); a smaller buffer fails with
/// `PICLOUD_ERR_BUFFER_TOO_SMALL` and an empty string.
///
/// # Safety
/// `buf` points to `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn picloud_segment_name(
    segment: *const picloud_segment,
    buf: *mut c_char,
    cap: usize,
) -> c_int {
    boundary(|| {
        let s = SEGMENTS.get(segment, "segment")?;
        // SAFETY: the caller promises cap writable bytes at buf.
        unsafe { write_str(buf, cap, &s.name, "buf") }
    })
}

/// Copies the path of the segment's file and a NUL into `buf` (`cap` bytes),
/// as its agent gave it (in the agent's `--shm-dir`, `/dev/shm` by default):
/// for a process that maps the file itself. A smaller buffer fails with
/// `PICLOUD_ERR_BUFFER_TOO_SMALL` and an empty string.
///
/// # Safety
/// `buf` points to `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn picloud_segment_path(
    segment: *const picloud_segment,
    buf: *mut c_char,
    cap: usize,
) -> c_int {
    boundary(|| {
        let s = SEGMENTS.get(segment, "segment")?;
        // SAFETY: the caller promises cap writable bytes at buf.
        unsafe { write_str(buf, cap, &s.path, "buf") }
    })
}

/// Unmaps the segment and drops this process's reference to it (the last
/// segment object of that name on its agent connection sends
/// `SEGMENT_RELEASE`). The pointer from `picloud_segment_data` becomes
/// invalid. The segment lives on while a job or another client holds it.
/// NULL does nothing.
#[no_mangle]
pub extern "C" fn picloud_segment_free(segment: *mut picloud_segment) -> c_int {
    boundary(|| {
        let Some(s) = SEGMENTS.remove(segment, "segment")? else { return Ok(()) };
        let released = lock(&s.conn).and_then(|mut conn| conn.release(&s.name));
        // The mapping goes with the last reference: here, or at the end of a
        // call in progress on another thread.
        drop(s);
        released
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_stay_in_the_directory() {
        for bad in ["", ".", "..", "../etc/passwd", "a/b"] {
            assert_eq!(check_name(bad).unwrap_err().code, PICLOUD_ERR_INVALID_ARGUMENT, "{bad}");
        }
        check_name("picloud-0a1b2c3d-7").unwrap();
    }
}
