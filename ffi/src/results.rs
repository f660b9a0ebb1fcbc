//! `picloud_results`: the outcomes of a job's tasks, fetched once and read
//! in place.
//!
//! `picloud_client_results` asks the server for the outcomes
//! (`ClientRequest::Results`) and keeps the reply in an opaque object; C reads
//! each task through `picloud_results_get`, whose `picloud_task_result`
//! points into that object's memory: nothing is copied again, and every
//! pointer stays valid until `picloud_results_free`. Each buffer is followed
//! by a NUL byte that its length does not count, so text prints with `%s`
//! (binary values may hold NULs of their own: use the lengths).

use std::ffi::{c_char, c_int};

use picloud_proto::{
    ClientRequest, JobRef, JobState, PythonStatus, ResourcesUsed, ServerReply, TaskResult, WaitReply,
    WaitUntil,
};

use crate::args::{CStruct, check_out, check_sized_out, write_out};
use crate::client::{client_of, job_ref, picloud_client, picloud_state, timeout_of, unexpected};
use crate::error::{FfiError, boundary, picloud_error_code::*};
use crate::handle::Registry;

/// How a Python task's function call ended.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum picloud_outcome {
    /// No outcome: not a Python task, not ended yet, or it never ran to the
    /// end (killed, crashed worker; see `comment`).
    PICLOUD_OUTCOME_NONE = 0,
    /// The function returned; `value` is the encoded value.
    PICLOUD_OUTCOME_RETURNED = 1,
    /// It raised; `error` is `Type: message`, `traceback` the remote
    /// traceback, `value` the pickled exception when it pickles.
    PICLOUD_OUTCOME_RAISED = 2,
    /// The function or its arguments could not be loaded on the worker (a
    /// module missing there, ...); `error` says why.
    PICLOUD_OUTCOME_LOAD_FAILED = 3,
}

/// The outcomes of the tasks of one job. Opaque; made by
/// `picloud_client_results`, freed by `picloud_results_free`.
pub struct picloud_results {
    tasks: Vec<Stored>,
}

/// One task's outcome, each buffer with a NUL after its end.
struct Stored {
    seq: u64,
    index: i32,
    state: JobState,
    exit_status: Option<i32>,
    used: ResourcesUsed,
    outcome: picloud_outcome,
    id: Vec<u8>,
    node: Option<Vec<u8>>,
    comment: Option<Vec<u8>>,
    value: Vec<u8>,
    error: Vec<u8>,
    traceback: Vec<u8>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    segments: Vec<Vec<u8>>,
}

/// `bytes` with a NUL after them.
fn terminated(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.push(0);
    bytes
}

/// The start and length (without the NUL) of a buffer made by [`terminated`].
fn parts<T>(b: &[u8]) -> (*const T, usize) {
    debug_assert_eq!(b.last(), Some(&0));
    (b.as_ptr().cast(), b.len() - 1)
}

impl Stored {
    fn new(r: TaskResult) -> Self {
        let (outcome, value, error, traceback, stdout, stderr, segments) = match r.outcome {
            None => (picloud_outcome::PICLOUD_OUTCOME_NONE, vec![], vec![], vec![], vec![], vec![], vec![]),
            Some(o) => {
                let o = *o;
                let kind = match o.status {
                    PythonStatus::Returned => picloud_outcome::PICLOUD_OUTCOME_RETURNED,
                    PythonStatus::Raised => picloud_outcome::PICLOUD_OUTCOME_RAISED,
                    PythonStatus::LoadFailed => picloud_outcome::PICLOUD_OUTCOME_LOAD_FAILED,
                };
                (
                    kind,
                    o.value,
                    o.error.into_bytes(),
                    o.traceback.into_bytes(),
                    o.stdout,
                    o.stderr,
                    o.segments,
                )
            }
        };
        Stored {
            seq: r.task.seq,
            index: r.task.index.map_or(-1, |i| i as i32),
            state: r.state,
            exit_status: r.exit_status,
            used: r.used,
            outcome,
            id: terminated(r.id.into_bytes()),
            node: r.node.map(|n| terminated(n.into_bytes())),
            comment: r.comment.map(|c| terminated(c.into_bytes())),
            value: terminated(value),
            error: terminated(error),
            traceback: terminated(traceback),
            stdout: terminated(stdout),
            stderr: terminated(stderr),
            segments: segments.into_iter().map(|s| terminated(s.into_bytes())).collect(),
        }
    }

    fn view(&self) -> picloud_task_result {
        let opt = |b: &Option<Vec<u8>>| b.as_deref().map_or((std::ptr::null(), 0), parts::<c_char>);
        let (id, id_len) = parts(&self.id);
        let (node, node_len) = opt(&self.node);
        let (comment, comment_len) = opt(&self.comment);
        let (value, value_len) = parts(&self.value);
        let (error, error_len) = parts(&self.error);
        let (traceback, traceback_len) = parts(&self.traceback);
        let (stdout_data, stdout_len) = parts(&self.stdout);
        let (stderr_data, stderr_len) = parts(&self.stderr);
        picloud_task_result {
            struct_size: std::mem::size_of::<picloud_task_result>() as u32,
            state: self.state.into(),
            exit_status: self.exit_status.unwrap_or(0),
            has_exit_status: u32::from(self.exit_status.is_some()),
            outcome: self.outcome,
            index: self.index,
            seq: self.seq,
            id,
            id_len,
            node,
            node_len,
            comment,
            comment_len,
            value,
            value_len,
            error,
            error_len,
            traceback,
            traceback_len,
            stdout_data,
            stdout_len,
            stderr_data,
            stderr_len,
            segments_len: self.segments.len(),
            cput_ms: self.used.cput_ms,
            walltime_ms: self.used.walltime_ms,
            mem_bytes: self.used.mem,
        }
    }
}

/// One task's outcome. Set `struct_size` to `sizeof(picloud_task_result)`
/// before `picloud_results_get`. Every pointer points into the
/// `picloud_results` it came from and is valid until that is freed; each
/// buffer is followed by a NUL not counted in its length. Empty buffers are
/// empty strings, not NULL; only `node` and `comment` are NULL when absent.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct picloud_task_result {
    /// `sizeof(picloud_task_result)`, set by the caller.
    pub struct_size: u32,
    /// The task's state (`PICLOUD_STATE_FINISHED` once it ended).
    pub state: picloud_state,
    /// Exit status when `has_exit_status` is 1 (0 returned, 1 raised, 2 not
    /// loaded; 256 + signal, or negative, when the task did not end by itself).
    pub exit_status: i32,
    /// 1 when `exit_status` holds a value.
    pub has_exit_status: u32,
    /// How the function call ended.
    pub outcome: picloud_outcome,
    /// The array index, or -1 for a job of one task.
    pub index: i32,
    /// The job's sequence number.
    pub seq: u64,
    /// The task's full id (`12.srv`, `12[3].srv`).
    pub id: *const c_char,
    /// Length of `id`.
    pub id_len: usize,
    /// The node it ran on; NULL if none.
    pub node: *const c_char,
    /// Length of `node`.
    pub node_len: usize,
    /// Why it ended as it did, when abnormally; NULL if nothing to say.
    pub comment: *const c_char,
    /// Length of `comment`.
    pub comment_len: usize,
    /// The encoded return value (or pickled exception); see docs/workers.md.
    pub value: *const u8,
    /// Length of `value`.
    pub value_len: usize,
    /// `Type: message` of the exception; empty if none.
    pub error: *const c_char,
    /// Length of `error`.
    pub error_len: usize,
    /// The remote traceback; empty if none.
    pub traceback: *const c_char,
    /// Length of `traceback`.
    pub traceback_len: usize,
    /// What the task wrote to stdout (capped, see docs/workers.md).
    pub stdout_data: *const u8,
    /// Length of `stdout_data`.
    pub stdout_len: usize,
    /// What the task wrote to stderr (capped).
    pub stderr_data: *const u8,
    /// Length of `stderr_data`.
    pub stderr_len: usize,
    /// Number of shared-memory segments `value` refers to; their names come
    /// from `picloud_results_segment`.
    pub segments_len: usize,
    /// CPU time used, in milliseconds.
    pub cput_ms: u64,
    /// Wall-clock time used, in milliseconds.
    pub walltime_ms: u64,
    /// Peak resident memory in bytes.
    pub mem_bytes: u64,
}

// SAFETY: repr(C), starts with struct_size; only ever written as a whole.
unsafe impl CStruct for picloud_task_result {
    const NAME: &'static str = "picloud_task_result";
}

static RESULTS: Registry<picloud_results> = Registry::new("picloud_results");

/// Fetches the outcomes of job `seq`: every task of an array (`index` -1), or
/// the one task `index`. Tasks that have not ended are included, with
/// `PICLOUD_OUTCOME_NONE`. Only the job's owner (or root) may read them
/// (`PICLOUD_ERR_PERMISSION_DENIED`). Free `*out` with `picloud_results_free`.
///
/// # Safety
/// `out` points to writable memory for a pointer.
#[no_mangle]
pub unsafe extern "C" fn picloud_client_results(
    client: *mut picloud_client,
    seq: u64,
    index: i32,
    out: *mut *mut picloud_results,
) -> c_int {
    boundary(|| {
        let c = client_of(client)?;
        check_out(out, "out")?;
        let r = job_ref(seq, index)?;
        let tasks = c.with_jobs(&[seq], |client| fetch(client, r))?;
        // SAFETY: checked by check_out; writable by the caller's promise.
        unsafe { write_out(out, stored(tasks)) };
        Ok(())
    })
}

/// Waits until task `index` of job `seq` has ended (the whole job, every
/// task of an array, with `index` -1) and fetches its outcome in the same
/// request, as `picloud_client_results` would after the wait: a map's
/// elements can be read one by one as they end, without polling. Only the
/// job's owner (or root) may (`PICLOUD_ERR_PERMISSION_DENIED`, at once).
/// `timeout_ms` is -1 to wait for ever, else a limit in milliseconds
/// (`PICLOUD_ERR_TIMEOUT`; the job goes on, `*out` is left alone). A job the
/// server forgot meanwhile is `PICLOUD_ERR_UNKNOWN_JOB`. Free `*out` with
/// `picloud_results_free`.
///
/// # Safety
/// `out` points to writable memory for a pointer.
#[no_mangle]
pub unsafe extern "C" fn picloud_client_wait_task(
    client: *mut picloud_client,
    seq: u64,
    index: i32,
    timeout_ms: i64,
    out: *mut *mut picloud_results,
) -> c_int {
    boundary(|| {
        let c = client_of(client)?;
        check_out(out, "out")?;
        let r = job_ref(seq, index)?;
        let deadline = timeout_of(timeout_ms)?.map(|t| std::time::Instant::now() + t);
        let request = |left: Option<std::time::Duration>| ClientRequest::Wait {
            jobs: vec![r],
            timeout_ms: left.map(|t| t.as_millis() as u64),
            until: WaitUntil::All,
            reply: WaitReply::Results,
        };
        let tasks = c.with_jobs(&[seq], |client| {
            match client.request_reconnecting(picloud_proto::client::RECONNECT_WINDOW, deadline, request)? {
                ServerReply::Results { unknown, .. } if !unknown.is_empty() => Err(FfiError::new(
                    PICLOUD_ERR_UNKNOWN_JOB,
                    format_args!("job {r} was forgotten by the server"),
                )),
                ServerReply::Results { results, .. } => Ok(results),
                // Too large for the wait's reply: fetched on its own.
                ServerReply::Jobs { .. } => fetch(client, r),
                other => Err(unexpected("a wait for results", &other)),
            }
        })?;
        // SAFETY: checked by check_out; writable by the caller's promise.
        unsafe { write_out(out, stored(tasks)) };
        Ok(())
    })
}

/// The outcomes of the tasks `r` names, by a `Results` request.
fn fetch(client: &mut picloud_proto::Client, r: JobRef) -> Result<Vec<TaskResult>, FfiError> {
    let request = |_| ClientRequest::Results(vec![r]);
    match client.request_reconnecting(picloud_proto::client::RECONNECT_WINDOW, None, request)? {
        ServerReply::Results { unknown, .. } if !unknown.is_empty() => {
            Err(FfiError::new(PICLOUD_ERR_UNKNOWN_JOB, format_args!("Unknown Job Id {r}")))
        }
        ServerReply::Results { results, .. } => Ok(results),
        other => Err(unexpected("a results request", &other)),
    }
}

/// A new `picloud_results` handle holding `tasks`.
pub(crate) fn stored(tasks: Vec<TaskResult>) -> *mut picloud_results {
    RESULTS.insert(picloud_results { tasks: tasks.into_iter().map(Stored::new).collect() })
}

/// `*len_out` = the number of tasks in `results`.
///
/// # Safety
/// `len_out` points to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn picloud_results_len(results: *const picloud_results, len_out: *mut usize) -> c_int {
    boundary(|| {
        let r = RESULTS.get(results, "results")?;
        check_out(len_out, "len_out")?;
        // SAFETY: checked by check_out; writable by the caller's promise.
        unsafe { write_out(len_out, r.tasks.len()) };
        Ok(())
    })
}

fn task(r: &picloud_results, i: usize) -> Result<&Stored, FfiError> {
    r.tasks.get(i).ok_or_else(|| {
        FfiError::invalid(format_args!(
            "task {i} is out of range: these results hold {} task(s)",
            r.tasks.len()
        ))
    })
}

/// Fills `*out` with task `i` (0 to len - 1, in task order) of `results`.
/// Set `out->struct_size` first.
///
/// # Safety
/// `out` points to a writable `picloud_task_result` whose `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn picloud_results_get(
    results: *const picloud_results,
    i: usize,
    out: *mut picloud_task_result,
) -> c_int {
    boundary(|| {
        let r = RESULTS.get(results, "results")?;
        // SAFETY: the caller promises a writable struct with struct_size set.
        unsafe { check_sized_out(out, "out") }?;
        let view = task(&r, i)?.view();
        // SAFETY: checked by check_sized_out; writable by the caller's promise.
        // The pointers in `view` point into `r`'s buffers, which the registry
        // keeps until picloud_results_free.
        unsafe { write_out(out, view) };
        Ok(())
    })
}

/// `*name_out` = the name of segment `j` (0 to `segments_len - 1`) of task
/// `i`, NUL-terminated, valid until `results` is freed. Map it with
/// `picloud_segment_map`.
///
/// # Safety
/// `name_out` points to writable memory for a pointer.
#[no_mangle]
pub unsafe extern "C" fn picloud_results_segment(
    results: *const picloud_results,
    i: usize,
    j: usize,
    name_out: *mut *const c_char,
) -> c_int {
    boundary(|| {
        let r = RESULTS.get(results, "results")?;
        check_out(name_out, "name_out")?;
        let t = task(&r, i)?;
        let name = t.segments.get(j).ok_or_else(|| {
            FfiError::invalid(format_args!("segment {j} is out of range: task {i} has {}", t.segments.len()))
        })?;
        // SAFETY: checked by check_out; writable by the caller's promise. The
        // name lives in `r`, kept by the registry until picloud_results_free.
        unsafe { write_out(name_out, name.as_ptr().cast::<c_char>()) };
        Ok(())
    })
}

/// Frees `results`; every pointer obtained from it becomes invalid. NULL does
/// nothing.
#[no_mangle]
pub extern "C" fn picloud_results_free(results: *mut picloud_results) -> c_int {
    boundary(|| RESULTS.remove(results, "results").map(drop))
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use picloud_proto::{PythonOutcome, TaskId};

    use super::*;

    fn sample() -> TaskResult {
        TaskResult {
            id: "7[1].srv".into(),
            task: TaskId { seq: 7, index: Some(1) },
            state: JobState::Finished,
            exit_status: Some(1),
            comment: None,
            node: Some("n1".into()),
            used: ResourcesUsed { cput_ms: 5, walltime_ms: 6, mem: 7 },
            outcome: Some(Box::new(PythonOutcome {
                status: PythonStatus::Raised,
                value: vec![1, 0, 2],
                error: "ValueError: x".into(),
                traceback: "Traceback...".into(),
                stdout: b"hi\n".to_vec(),
                stderr: Vec::new(),
                segments: vec!["seg-1".into()],
            })),
        }
    }

    #[test]
    fn the_view_points_into_the_stored_buffers() {
        let stored = Stored::new(sample());
        let v = stored.view();
        assert_eq!((v.seq, v.index, v.exit_status, v.has_exit_status), (7, 1, 1, 1));
        assert_eq!(v.outcome, picloud_outcome::PICLOUD_OUTCOME_RAISED);
        assert_eq!(v.state, picloud_state::PICLOUD_STATE_FINISHED);
        assert!(v.comment.is_null() && v.comment_len == 0);
        // SAFETY: the pointers point into `stored`, alive here, NUL-terminated.
        unsafe {
            assert_eq!(CStr::from_ptr(v.id).to_str().unwrap(), "7[1].srv");
            assert_eq!(CStr::from_ptr(v.node).to_str().unwrap(), "n1");
            assert_eq!(std::slice::from_raw_parts(v.value, v.value_len), [1, 0, 2]);
            assert_eq!(*v.value.add(3), 0, "a NUL after the value");
            assert_eq!(CStr::from_ptr(v.error).to_str().unwrap(), "ValueError: x");
            assert_eq!(std::slice::from_raw_parts(v.stdout_data, v.stdout_len), b"hi\n");
            assert_eq!(v.stderr_len, 0);
            assert_eq!(*v.stderr_data, 0, "empty buffers are empty strings, not NULL");
        }
        assert_eq!(v.segments_len, 1);
        assert_eq!((v.cput_ms, v.walltime_ms, v.mem_bytes), (5, 6, 7));
    }
}
