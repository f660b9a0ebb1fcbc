//! libpicloud's functions, called as C would call them, against a real
//! `picloud up` (`picloud_tests::Cluster`; build the binaries first:
//! `cargo build --workspace`).
//!
//! The Python tests need `python3` with cloudpickle (the workers import it):
//! they make the pickles with it, submit them through
//! `picloud_client_submit_python`, and decode the values that come back.
//! Without it they are skipped with a loud message, unless
//! `PICLOUD_REQUIRE_PYTHON=1`.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::ptr::{null, null_mut};
use std::time::{Duration, Instant};

use picloud::*;
use picloud_tests::Cluster;

fn last_error() -> String {
    // SAFETY: picloud_last_error returns a NUL-terminated string valid until
    // the next failing call on this thread.
    unsafe { CStr::from_ptr(picloud_last_error()) }.to_string_lossy().into_owned()
}

#[track_caller]
fn ok(code: c_int) {
    assert_eq!(code, 0, "libpicloud failed: {}", last_error());
}

#[track_caller]
fn fails(code: c_int, want: picloud_error_code) -> String {
    assert_eq!(code, want as c_int, "expected {want:?}; last error: {}", last_error());
    last_error()
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// A client handle that tests may send to other threads (libpicloud's handles
/// are usable from any thread).
#[derive(Clone, Copy)]
struct Client(*mut picloud_client);
// SAFETY: libpicloud looks handles up in a locked registry and serialises
// calls on one client; the pointer itself is never dereferenced here.
unsafe impl Send for Client {}

fn connect(c: &Cluster) -> Client {
    let dir = cstr(c.dir.path().to_str().unwrap());
    let mut client = null_mut();
    // SAFETY: a valid string and a valid out pointer.
    ok(unsafe { picloud_client_connect(dir.as_ptr(), &mut client) });
    Client(client)
}

fn options() -> picloud_job_options {
    picloud_job_options {
        struct_size: std::mem::size_of::<picloud_job_options>() as u32,
        flags: 0,
        ncpus: 0,
        priority: 0,
        mem_bytes: 0,
        walltime_secs: 0,
        name: null(),
        array: null(),
        workdir: null(),
        stdout_path: null(),
        stderr_path: null(),
        env: null(),
        env_len: 0,
        depend_on: null(),
        depend_len: 0,
        depend_mode: 0,
    }
}

/// Submits a command in the cluster's work directory; returns its seq.
fn submit(c: &Cluster, client: Client, argv: &[&str], opts: Option<&picloud_job_options>) -> u64 {
    let args: Vec<CString> = argv.iter().map(|a| cstr(a)).collect();
    let ptrs: Vec<*const c_char> = args.iter().map(|a| a.as_ptr()).collect();
    let workdir = cstr(c.work.to_str().unwrap());
    let mut o = opts.copied().unwrap_or_else(options);
    o.workdir = workdir.as_ptr();
    let mut seq = 0;
    // SAFETY: argv holds argc valid strings, o's pointers live until the call
    // returns, seq is writable, no id buffer.
    ok(unsafe {
        picloud_client_submit_command(client.0, ptrs.as_ptr(), ptrs.len(), &o, &mut seq, null_mut(), 0)
    });
    seq
}

fn wait(client: Client, seqs: &[u64], timeout_ms: i64, mode: c_int) -> (c_int, Vec<u8>) {
    let mut ended = vec![9u8; seqs.len()];
    // SAFETY: seqs and ended hold seqs.len() entries each.
    let code = unsafe {
        picloud_client_wait(client.0, seqs.as_ptr(), seqs.len(), timeout_ms, mode, ended.as_mut_ptr())
    };
    (code, ended)
}

fn status(client: Client, seq: u64, index: i32) -> picloud_task_status {
    // SAFETY: all-zero is a valid picloud_task_status: integers, and a state
    // enum whose 0 is PICLOUD_STATE_UNKNOWN.
    let mut st: picloud_task_status = unsafe { std::mem::zeroed() };
    st.struct_size = std::mem::size_of::<picloud_task_status>() as u32;
    // SAFETY: a writable struct with its size set.
    ok(unsafe { picloud_client_status(client.0, seq, index, &mut st) });
    st
}

/// A fetched `picloud_results`, freed on drop.
struct Results(*mut picloud_results);

impl Results {
    fn fetch(client: Client, seq: u64, index: i32) -> Self {
        let mut r = null_mut();
        // SAFETY: a writable out pointer.
        ok(unsafe { picloud_client_results(client.0, seq, index, &mut r) });
        Results(r)
    }

    fn len(&self) -> usize {
        let mut n = 0;
        // SAFETY: a writable size_t.
        ok(unsafe { picloud_results_len(self.0, &mut n) });
        n
    }

    fn get(&self, i: usize) -> picloud_task_result {
        // SAFETY: all-zero is a valid picloud_task_result: integers, NULL
        // pointers, and enums whose 0 is a variant (UNKNOWN, NONE).
        let mut t: picloud_task_result = unsafe { std::mem::zeroed() };
        t.struct_size = std::mem::size_of::<picloud_task_result>() as u32;
        // SAFETY: a writable struct with its size set.
        ok(unsafe { picloud_results_get(self.0, i, &mut t) });
        t
    }

    fn segment(&self, i: usize, j: usize) -> String {
        let mut name = null();
        // SAFETY: a writable out pointer; the name lives as long as self.
        ok(unsafe { picloud_results_segment(self.0, i, j, &mut name) });
        // SAFETY: a NUL-terminated string inside self.
        unsafe { CStr::from_ptr(name) }.to_str().unwrap().to_string()
    }
}

impl Drop for Results {
    fn drop(&mut self) {
        ok(picloud_results_free(self.0));
    }
}

/// The bytes of a (pointer, length) field of a task result.
///
/// # Safety
/// `p` is valid for `len` bytes while the results it came from live.
unsafe fn bytes<'a>(p: *const u8, len: usize) -> &'a [u8] {
    // SAFETY: the caller's contract; libpicloud never gives NULL for these.
    unsafe { std::slice::from_raw_parts(p, len) }
}

// ---------------------------------------------------------------- command jobs

#[test]
fn an_array_has_a_status_as_a_whole_and_per_task() {
    let c = Cluster::start();
    let client = connect(&c);
    let spec = cstr("0-2");
    let mut o = options();
    o.array = spec.as_ptr();
    let seq = submit(&c, client, &["sh", "-c", "exit $PBS_ARRAY_INDEX"], Some(&o));
    assert!(status(client, seq, -1).is_array == 1);
    let (code, ended) = wait(client, &[seq], 30_000, PICLOUD_WAIT_ALL);
    ok(code);
    assert_eq!(ended, [1]);
    let whole = status(client, seq, -1);
    assert_eq!(whole.state, picloud_state::PICLOUD_STATE_FINISHED);
    assert_eq!((whole.array_finished, whole.array_queued, whole.array_running), (3, 0, 0));
    for i in 0..3 {
        let t = status(client, seq, i);
        assert_eq!((t.is_array, t.has_exit_status, t.exit_status), (0, 1, i), "task {i}");
        assert!(t.end_time >= t.stime && t.stime > 0);
    }
    let r = Results::fetch(client, seq, -1);
    assert_eq!(r.len(), 3);
    let t = r.get(2);
    assert_eq!((t.seq, t.index, t.exit_status), (seq, 2, 2));
    // SAFETY: id is NUL-terminated inside r.
    assert_eq!(unsafe { CStr::from_ptr(t.id) }.to_str().unwrap(), format!("{seq}[2].testsrv"));
    assert_eq!(Results::fetch(client, seq, 1).len(), 1, "one task");
    ok(picloud_client_free(client.0));
}

#[test]
fn wait_any_returns_when_the_first_job_ends_and_tells_which() {
    let c = Cluster::start();
    let client = connect(&c);
    let slow = submit(&c, client, &["sleep", "30"], None);
    let quick = submit(&c, client, &["true"], None);
    let started = Instant::now();
    let (code, ended) = wait(client, &[slow, quick], 30_000, PICLOUD_WAIT_ANY);
    ok(code);
    assert_eq!(ended, [0, 1]);
    assert!(started.elapsed() < Duration::from_secs(10));
    // ALL with a timeout reports the same, and the slow job goes on.
    let (code, ended) = wait(client, &[slow, quick], 200, PICLOUD_WAIT_ALL);
    fails(code, picloud_error_code::PICLOUD_ERR_TIMEOUT);
    assert_eq!(ended, [0, 1]);
    ok(picloud_client_cancel(client.0, slow, -1));
    let (code, ended) = wait(client, &[slow, quick], 30_000, PICLOUD_WAIT_ALL);
    ok(code);
    assert_eq!(ended, [1, 1]);
    assert_eq!(status(client, slow, -1).exit_status, 265, "cancelled as PBS reports it");
    ok(picloud_client_free(client.0));
}

#[test]
fn one_client_serves_many_threads_and_can_be_freed_during_a_wait() {
    let c = Cluster::start();
    let client = connect(&c);
    let seqs: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = &c;
                s.spawn(move || {
                    let seq = submit(c, client, &["true"], None);
                    let _ = status(client, seq, -1);
                    seq
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 4, "four distinct jobs: {seqs:?}");
    ok(wait(client, &seqs, 30_000, PICLOUD_WAIT_ALL).0);

    // Freed while another thread waits: the wait runs to its end, then the
    // handle is gone.
    let slow = submit(&c, client, &["sleep", "30"], None);
    let waiter = std::thread::spawn(move || wait(client, &[slow], 1_000, PICLOUD_WAIT_ALL).0);
    std::thread::sleep(Duration::from_millis(200));
    ok(picloud_client_free(client.0));
    assert_eq!(waiter.join().unwrap(), picloud_error_code::PICLOUD_ERR_TIMEOUT as c_int);
    fails(picloud_client_cancel(client.0, slow, -1), picloud_error_code::PICLOUD_ERR_INVALID_HANDLE);
}

#[test]
fn a_server_going_away_ends_a_wait_with_an_error_and_the_client_says_so_after() {
    let mut c = Cluster::start();
    let client = connect(&c);
    // Held, so that stopping the agent (which kills running jobs, ending
    // their waits normally) does not end it: only the server going away does.
    let mut held = options();
    held.flags = PICLOUD_JOB_HOLD;
    let slow = submit(&c, client, &["true"], Some(&held));
    assert_eq!(status(client, slow, -1).state, picloud_state::PICLOUD_STATE_HELD);
    let waiter = std::thread::spawn(move || {
        let code = wait(client, &[slow], -1, PICLOUD_WAIT_ALL).0;
        (code, last_error())
    });
    std::thread::sleep(Duration::from_millis(300));
    c.stop_with(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(20));
    let (code, message) = waiter.join().unwrap();
    // The server fails pending waits as it stops ("shutting down"); on a
    // machine slow enough that the wait was sent only after that, the
    // connection is simply gone.
    let server = picloud_error_code::PICLOUD_ERR_SERVER as c_int;
    let lost = picloud_error_code::PICLOUD_ERR_CONNECTION_LOST as c_int;
    assert!(
        (code == server && message.contains("shutting down")) || code == lost,
        "wait ended with {code}: {message}"
    );
    // The next call finds the connection gone, and says so again after.
    let code = picloud_client_cancel(client.0, slow, -1);
    fails(code, picloud_error_code::PICLOUD_ERR_CONNECTION_LOST);
    let msg =
        fails(picloud_client_cancel(client.0, slow, -1), picloud_error_code::PICLOUD_ERR_CONNECTION_LOST);
    assert!(msg.contains("connect again"), "{msg}");
    // A flush too, with nothing left to confirm.
    fails(picloud_client_flush(client.0), picloud_error_code::PICLOUD_ERR_CONNECTION_LOST);
    ok(picloud_client_free(client.0));
    // And connecting now fails cleanly.
    let dir = cstr(c.dir.path().to_str().unwrap());
    let mut again = null_mut();
    // SAFETY: a valid string and out pointer.
    fails(
        unsafe { picloud_client_connect(dir.as_ptr(), &mut again) },
        picloud_error_code::PICLOUD_ERR_CONNECT,
    );
}

// ---------------------------------------------------------------- Python calls

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("python")
}

/// Whether python3 with cloudpickle is here; skips loudly when not.
fn have_python() -> bool {
    let found = Command::new("python3")
        .args(["-c", "import cloudpickle"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        let message = "python3 with cloudpickle is missing: Python calls through libpicloud NOT TESTED";
        if std::env::var_os("PICLOUD_REQUIRE_PYTHON").is_some_and(|v| v != "0") {
            panic!("{message} (and PICLOUD_REQUIRE_PYTHON is set)");
        }
        eprintln!("\n*** {message} ***\n");
    }
    found
}

/// Runs a Python script (with `picloud` importable) and returns its stdout.
fn python(script: &str, stdin: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .env("PYTHONPATH", python_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// `cloudpickle.dumps(EXPR)`.
fn pickled(expr: &str) -> Vec<u8> {
    let script =
        "import sys, cloudpickle, operator; sys.stdout.buffer.write(cloudpickle.dumps(EXPR, protocol=5))";
    python(&script.replace("EXPR", expr), b"")
}

/// Encoded arguments (docs/workers.md) of the tuple `ARGS` (no segments).
fn encoded_args(args: &str) -> Vec<u8> {
    python(
        &format!(
            "import sys; from picloud import _payload; data, names = _payload.encode_args({args}, {{}}); \
             assert not names; sys.stdout.buffer.write(data)"
        ),
        b"",
    )
}

/// `repr()` of an encoded value without segments.
fn decoded(value: &[u8]) -> String {
    let out = python(
        "import sys; from picloud import _payload; print(repr(_payload.decode(sys.stdin.buffer.read())))",
        value,
    );
    String::from_utf8(out).unwrap().trim().to_string()
}

/// The interpreter the workers run: this python3's own path, as a client's
/// `sys.executable` (a bare `python3` may be another Python where the agent
/// looks it up).
fn interpreter() -> CString {
    let out = python("import sys; print(sys.executable)", b"");
    cstr(String::from_utf8(out).unwrap().trim())
}

/// Submits `function` once per argument set; returns the seq.
fn submit_python(client: Client, function: &[u8], args: &[Vec<u8>], segments: &[&str]) -> u64 {
    let interpreter = interpreter();
    let path = cstr(python_dir().to_str().unwrap());
    let sys_path = [path.as_ptr()];
    let arg_bufs: Vec<picloud_bytes> =
        args.iter().map(|a| picloud_bytes { data: a.as_ptr(), len: a.len() }).collect();
    let seg_names: Vec<CString> = segments.iter().map(|s| cstr(s)).collect();
    let seg_ptrs: Vec<*const c_char> = seg_names.iter().map(|s| s.as_ptr()).collect();
    let call = picloud_python_call {
        struct_size: std::mem::size_of::<picloud_python_call>() as u32,
        kill_process: 0,
        interpreter: interpreter.as_ptr(),
        sys_path: sys_path.as_ptr(),
        sys_path_len: 1,
        function: picloud_bytes { data: function.as_ptr(), len: function.len() },
        args: arg_bufs.as_ptr(),
        args_len: arg_bufs.len(),
        segments: seg_ptrs.as_ptr(),
        segments_len: seg_ptrs.len(),
        array: 0,
    };
    let mut seq = 0;
    // SAFETY: every pointer in call lives until the call returns; seq is writable.
    ok(unsafe { picloud_client_submit_python(client.0, &call, null(), &mut seq) });
    seq
}

/// A call of `function` on one argument set, with no interpreter, import
/// path or segments; the buffers must outlive its use.
fn bare_call(function: &[u8], args: &[picloud_bytes]) -> picloud_python_call {
    picloud_python_call {
        struct_size: std::mem::size_of::<picloud_python_call>() as u32,
        kill_process: 0,
        interpreter: null(),
        sys_path: null(),
        sys_path_len: 0,
        function: picloud_bytes { data: function.as_ptr(), len: function.len() },
        args: args.as_ptr(),
        args_len: args.len(),
        segments: null(),
        segments_len: 0,
        array: 0,
    }
}

#[test]
fn a_python_call_of_the_size_before_array_is_still_accepted() {
    let c = Cluster::start();
    let client = connect(&c);
    let function = b"not unpickled at submission".to_vec();
    let arg = b"args".to_vec();
    let args = [picloud_bytes { data: arg.as_ptr(), len: arg.len() }];
    let mut call = picloud_python_call {
        struct_size: std::mem::offset_of!(picloud_python_call, array) as u32,
        // What a caller of the earlier header never wrote: must not be read.
        array: 0xdead_beef,
        ..bare_call(&function, &args)
    };
    let mut seq = 0;
    // SAFETY: every pointer in call is valid for its length; seq is writable.
    ok(unsafe { picloud_client_submit_python(client.0, &call, null(), &mut seq) });
    assert!(seq > 0);
    call.struct_size += 4; // neither this version's size nor an earlier one
    // SAFETY: as above.
    let code = unsafe { picloud_client_submit_python(client.0, &call, null(), &mut seq) };
    let msg = fails(code, picloud_error_code::PICLOUD_ERR_INVALID_ARGUMENT);
    assert!(msg.contains("struct_size"), "{msg}");
}

#[test]
fn a_python_call_over_the_frame_limit_is_refused_before_it_is_sent() {
    let c = Cluster::start();
    let client = connect(&c);
    let function = vec![0u8; 40 << 20];
    let arg = vec![0u8; 30 << 20];
    let args = [picloud_bytes { data: arg.as_ptr(), len: arg.len() }];
    let call = bare_call(&function, &args);
    let mut seq = 0;
    // SAFETY: every pointer in call is valid for its length; seq is writable.
    let code = unsafe { picloud_client_submit_python(client.0, &call, null(), &mut seq) };
    let msg = fails(code, picloud_error_code::PICLOUD_ERR_INVALID_ARGUMENT);
    assert!(msg.contains("over the limit") && msg.contains("segments"), "{msg}");
    // Nothing was sent: the connection is as good as before.
    let seq = submit(&c, client, &["true"], None);
    ok(wait(client, &[seq], 30_000, PICLOUD_WAIT_ALL).0);
    ok(picloud_client_free(client.0));
}

#[test]
fn a_command_over_the_frame_limit_is_refused_before_it_is_sent() {
    let c = Cluster::start();
    let client = connect(&c);
    let huge = cstr(&"x".repeat(65 << 20));
    let argv = [c"echo".as_ptr(), huge.as_ptr()];
    let mut seq = 0;
    // SAFETY: argv holds two valid strings; seq is writable; no id buffer.
    let code =
        unsafe { picloud_client_submit_command(client.0, argv.as_ptr(), 2, null(), &mut seq, null_mut(), 0) };
    let msg = fails(code, picloud_error_code::PICLOUD_ERR_INVALID_ARGUMENT);
    assert!(msg.contains("over the limit") && msg.contains("nothing was submitted"), "{msg}");
    // Nothing was sent: the connection is as good as before.
    let seq = submit(&c, client, &["true"], None);
    ok(wait(client, &[seq], 30_000, PICLOUD_WAIT_ALL).0);
    ok(picloud_client_free(client.0));
}

#[test]
fn a_python_map_returns_values_and_errors_through_the_c_abi() {
    if !have_python() {
        return;
    }
    let c = Cluster::start();
    let client = connect(&c);
    let add = pickled("operator.add");
    let args: Vec<Vec<u8>> = (0..3).map(|i| encoded_args(&format!("({i}, 10)"))).collect();
    let seq = submit_python(client, &add, &args, &[]);
    ok(wait(client, &[seq], 60_000, PICLOUD_WAIT_ALL).0);
    let r = Results::fetch(client, seq, -1);
    assert_eq!(r.len(), 3);
    for i in 0..3 {
        let t = r.get(i);
        assert_eq!(t.outcome, picloud_outcome::PICLOUD_OUTCOME_RETURNED, "task {i}: {}", c.log());
        assert_eq!((t.index, t.exit_status), (i as i32, 0));
        // SAFETY: value is valid for value_len bytes while r lives.
        assert_eq!(decoded(unsafe { bytes(t.value, t.value_len) }), format!("{}", 10 + i));
    }

    // A raising call: the exception's type, message and traceback come back.
    let div = pickled("operator.truediv");
    let seq = submit_python(client, &div, &[encoded_args("(1, 0)")], &[]);
    ok(wait(client, &[seq], 60_000, PICLOUD_WAIT_ALL).0);
    let r = Results::fetch(client, seq, -1);
    let t = r.get(0);
    assert_eq!((t.outcome, t.exit_status, t.index), (picloud_outcome::PICLOUD_OUTCOME_RAISED, 1, -1));
    // SAFETY: error and traceback are NUL-terminated inside r.
    let (error, traceback) = unsafe { (CStr::from_ptr(t.error), CStr::from_ptr(t.traceback)) };
    assert!(error.to_str().unwrap().starts_with("ZeroDivisionError"), "{error:?}");
    assert!(traceback.to_str().unwrap().contains("Traceback"), "{traceback:?}");
    assert_eq!(t.error_len, error.to_bytes().len());
    ok(picloud_client_free(client.0));
}

fn agent(c: &Cluster) -> *mut picloud_agent {
    let dir = cstr(c.dir.path().to_str().unwrap());
    let mut a = null_mut();
    // SAFETY: a valid string and out pointer.
    ok(unsafe { picloud_agent_connect(dir.as_ptr(), &mut a) });
    a
}

/// The bytes of a segment's mapping, valid until it is freed.
fn segment_bytes<'a>(seg: *mut picloud_segment) -> (&'a mut [u8], bool) {
    let mut ptr: *mut c_void = null_mut();
    let mut len = 0u64;
    let mut writable = 0;
    // SAFETY: writable out pointers.
    ok(unsafe { picloud_segment_data(seg, &mut ptr, &mut len, &mut writable) });
    // SAFETY: the mapping is len bytes and lives until picloud_segment_free;
    // the tests write only to writable ones, and nothing else writes meanwhile.
    (unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len as usize) }, writable == 1)
}

fn segment_name(seg: *mut picloud_segment) -> String {
    let mut buf = [0 as c_char; 128];
    // SAFETY: buf holds 128 bytes.
    ok(unsafe { picloud_segment_name(seg, buf.as_mut_ptr(), buf.len()) });
    // SAFETY: NUL-terminated by the call.
    unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap().to_string()
}

/// Reads the header of an encoded value: its out-of-band buffers.
fn buffers_of(value: &[u8]) -> Vec<(String, u64, u64)> {
    let u32_at = |at: usize| u32::from_le_bytes(value[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(value[at..at + 8].try_into().unwrap());
    let mut at = 4;
    (0..u32_at(0))
        .map(|_| {
            let n = u32_at(at) as usize;
            let name = String::from_utf8(value[at + 4..at + 4 + n].to_vec()).unwrap();
            at += 4 + n;
            let entry = (name, u64_at(at), u64_at(at + 8));
            at += 16;
            entry
        })
        .collect()
}

/// Encoded arguments `(view,)` where `view` is bytes 100 to 400 of segment
/// NAME, passed out of band (docs/workers.md, "Encoded values").
const SEGMENT_ARGS: &str = r#"
import sys, pickle, struct
name = b"NAME"
body = pickle.dumps(
    ((pickle.PickleBuffer(bytearray(300)),), {}), protocol=5, buffer_callback=lambda b: False)
head = struct.pack("<II", 1, len(name)) + name + struct.pack("<QQ", 100, 300)
sys.stdout.buffer.write(head + struct.pack("<I", len(body)) + body)
"#;

#[test]
fn segments_carry_arguments_in_and_results_out() {
    if !have_python() {
        return;
    }
    let c = Cluster::start();
    let client = connect(&c);
    let a = agent(&c);

    // An argument written into a new segment, passed out of band: the task
    // gets a memoryview of the segment and returns bytes(view).
    let mut seg = null_mut();
    // SAFETY: a writable out pointer.
    ok(unsafe { picloud_segment_create(a, 1000, &mut seg) });
    let (data, writable) = segment_bytes(seg);
    assert!(writable && data.len() == 1000);
    data.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8);
    let name = segment_name(seg);
    let args = python(&SEGMENT_ARGS.replace("NAME", &name), b"");
    let seq = submit_python(client, &pickled("bytes"), &[args], &[&name]);
    // The job holds the segment only once it is started on the node: ours
    // stays until then (here, until the end).
    ok(wait(client, &[seq], 60_000, PICLOUD_WAIT_ALL).0);
    ok(picloud_segment_free(seg));
    let r = Results::fetch(client, seq, -1);
    let t = r.get(0);
    assert_eq!(t.outcome, picloud_outcome::PICLOUD_OUTCOME_RETURNED, "{}", c.log());
    let expected: Vec<u8> = (100..400).map(|i| (i % 251) as u8).collect();
    // SAFETY: value is valid for value_len bytes while r lives.
    let got = decoded(unsafe { bytes(t.value, t.value_len) });
    let want =
        String::from_utf8(python("import sys; print(repr(sys.stdin.buffer.read()))", &expected)).unwrap();
    assert_eq!(got, want.trim());

    // A large result comes back in a segment, mapped here read-only.
    let seq = submit_python(client, &pickled("operator.mul"), &[encoded_args("(b'ab', 50000)")], &[]);
    ok(wait(client, &[seq], 60_000, PICLOUD_WAIT_ALL).0);
    let r = Results::fetch(client, seq, -1);
    let t = r.get(0);
    assert_eq!(t.outcome, picloud_outcome::PICLOUD_OUTCOME_RETURNED, "{}", c.log());
    assert_eq!(t.segments_len, 1, "a 100 kB result travels in a segment");
    let result_segment = r.segment(0, 0);
    // SAFETY: value is valid for value_len bytes while r lives.
    let buffers = buffers_of(unsafe { bytes(t.value, t.value_len) });
    assert_eq!(buffers.len(), 1);
    let (buf_segment, offset, len) = buffers[0].clone();
    assert_eq!((buf_segment.as_str(), len), (result_segment.as_str(), 100_000));
    let name = cstr(&result_segment);
    let mut view = null_mut();
    // SAFETY: a valid name and out pointer.
    ok(unsafe { picloud_segment_map(a, name.as_ptr(), &mut view) });
    let (data, writable) = segment_bytes(view);
    assert!(!writable);
    let part = &data[offset as usize..(offset + len) as usize];
    assert!(part.chunks(2).all(|p| p == b"ab"), "the result's bytes, read in place");
    drop(r);
    ok(picloud_segment_free(view));
    ok(picloud_agent_free(a));
    ok(picloud_client_free(client.0));
}
