//! `picloud_client`: a connection to the server, and the calls made over it
//! (submit, wait, status, cancel; results are in `results.rs`).
//!
//! A client wraps one blocking [`picloud_proto::Client`] behind a mutex: calls
//! from several threads on one client take turns (a `wait` holds it until it
//! returns), and threads that want to wait independently connect a client
//! each. When the connection breaks, or a reply cannot be read, the client is
//! marked broken and every later call says so
//! (`PICLOUD_ERR_CONNECTION_LOST`): a reply may have been lost, so the
//! connection can no longer pair requests with replies. Free it and connect
//! again.
//!
//! `picloud_client_submit_python_async` pipelines: the job is named from a
//! block of sequence numbers the server reserved for the connection, written
//! into the connection's buffer, and sent with the client's next request (or
//! by the thread of `pipeline.rs` a millisecond later). Refusals come back
//! with later replies and are kept per job: every call naming a refused job
//! fails with the refusal.

use std::collections::HashMap;
use std::ffi::{c_char, c_int};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use picloud_proto::client::RECONNECT_WINDOW;
use picloud_proto::submit_env;
use picloud_proto::{
    ArrayIndices, Client, ClientRequest, DependKind, Dependency, JobCommand, JobInfo, JobRef, JobSpec,
    JobState, PythonCall, RefOutcome, ServerAddr, ServerReply, StatRequest, WaitReply, WaitUntil,
};

use crate::args::{
    CStruct, check_buffer, check_out, check_sized_out, opt_str, read_sized, slice, str_array, write_out,
    write_str,
};
use crate::error::{FfiError, boundary, picloud_error_code::*};
use crate::handle::Registry;
use crate::pipeline::Flusher;

/// A connection to a picloud server. Opaque; made by
/// `picloud_client_connect`, freed by `picloud_client_free`.
pub struct picloud_client {
    conn: Mutex<Conn>,
    /// Pipelined submissions the server refused, by sequence number.
    refused: Mutex<HashMap<u64, FfiError>>,
    /// Sends pipelined submissions that no request sends.
    flusher: Arc<Flusher>,
    /// Set while pipelined submissions wait for the server's replies
    /// ([`Client::unconfirmed_flag`]). Read without the connection's lock,
    /// which a wait holds for long.
    unconfirmed: Arc<AtomicBool>,
}

impl Drop for picloud_client {
    fn drop(&mut self) {
        self.flusher.stop();
        // Submissions still in the buffer go out before the connection
        // closes; nobody is left to hear a refusal.
        if let Ok(Conn::Ready(client)) = self.conn.get_mut() {
            let _ = client.send_buffered();
        }
    }
}

enum Conn {
    Ready(Box<Client>),
    /// Why it can no longer be used.
    Broken(String),
}

static CLIENTS: Registry<picloud_client> = Registry::new("picloud_client");

/// Looks up a client handle.
pub(crate) fn client_of(p: *const picloud_client) -> Result<std::sync::Arc<picloud_client>, FfiError> {
    CLIENTS.get(p, "client")
}

impl picloud_client {
    /// Runs `f` with the connection, marking it broken when `f` fails in a way
    /// that leaves the connection out of step.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Client) -> Result<R, FfiError>) -> Result<R, FfiError> {
        let mut conn = self.conn.lock().map_err(|_| poisoned())?;
        self.run_on(&mut conn, f)
    }

    /// Runs `f` with the connection its caller has locked (see
    /// [`picloud_client::with`]), and notes what the server said of
    /// pipelined submissions meanwhile.
    fn run_on<R>(
        &self,
        conn: &mut Conn,
        f: impl FnOnce(&mut Client) -> Result<R, FfiError>,
    ) -> Result<R, FfiError> {
        let client = match conn {
            Conn::Ready(c) => c,
            Conn::Broken(why) => return Err(broken(why)),
        };
        let result = f(client);
        let (answered, lost) = (client.take_answered(), client.take_lost());
        if !answered.is_empty() || !lost.is_empty() {
            let mut refused = self.refused();
            for (seq, outcome) in answered {
                if let Err(e) = outcome {
                    let e = FfiError::from(picloud_proto::ClientError::Server(e));
                    refused.insert(
                        seq,
                        FfiError::new(e.code, format_args!("job {seq} was not queued: {}", e.message)),
                    );
                }
            }
            for seq in lost {
                let e = FfiError::new(
                    PICLOUD_ERR_UNKNOWN_JOB,
                    format_args!(
                        "the connection to the server was lost before it confirmed job {seq}; \
                         it may not have been queued"
                    ),
                );
                refused.insert(seq, e);
            }
        }
        if let Err(e) = &result {
            if e.breaks_connection() {
                *conn = Conn::Broken(e.message.clone());
            }
        }
        result
    }

    /// As [`picloud_client::with`], for a call about jobs `seqs`: fails with
    /// the refusal of the first of them the server refused to queue (a
    /// pipelined submission), before or after `f`.
    pub(crate) fn with_jobs<R>(
        &self,
        seqs: &[u64],
        f: impl FnOnce(&mut Client) -> Result<R, FfiError>,
    ) -> Result<R, FfiError> {
        self.check_queued(seqs)?;
        let result = self.with(f);
        self.check_queued(seqs)?;
        result
    }

    fn refused(&self) -> std::sync::MutexGuard<'_, HashMap<u64, FfiError>> {
        // Nothing panics while the map is locked; should it, the map is intact.
        self.refused.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_queued(&self, seqs: &[u64]) -> Result<(), FfiError> {
        let refused = self.refused();
        if refused.is_empty() {
            return Ok(());
        }
        match seqs.iter().find_map(|s| refused.get(s)) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Makes sure the server has queued (or refused) every pipelined
    /// submission of this client, without waiting for a call in progress on
    /// another thread: such a call reads the replies owed before it waits
    /// for its own, so it is enough to wait until they are read or the
    /// connection is free.
    /// The holder may be connecting again after a restart of the server,
    /// which takes up to seconds: the pauses between looks grow to 1 ms.
    pub(crate) fn confirm_pipelined(&self) -> Result<(), FfiError> {
        let mut pause = Duration::from_micros(20);
        loop {
            if !self.unconfirmed.load(Ordering::Acquire) {
                // Nothing to confirm; but a broken client says so (a call
                // in progress elsewhere holds a connection that works).
                return match self.conn.try_lock().as_deref() {
                    Ok(Conn::Broken(why)) => Err(broken(why)),
                    Err(TryLockError::Poisoned(_)) => Err(poisoned()),
                    _ => Ok(()),
                };
            }
            match self.conn.try_lock() {
                Ok(mut conn) => return self.run_on(&mut conn, |client| Ok(client.flush_pipelined()?)),
                Err(TryLockError::Poisoned(_)) => return Err(poisoned()),
                Err(TryLockError::WouldBlock) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(1));
                }
            }
        }
    }
}

/// The error of every call on a client whose connection broke.
fn broken(why: &str) -> FfiError {
    FfiError::new(
        PICLOUD_ERR_CONNECTION_LOST,
        format_args!("this picloud_client lost its connection earlier ({why}); free it and connect again"),
    )
}

/// The error of a client whose lock a panic poisoned.
fn poisoned() -> FfiError {
    FfiError::new(
        PICLOUD_ERR_CONNECTION_LOST,
        "this picloud_client was in use when libpicloud panicked; free it and connect again",
    )
}

/// The error for a reply that does not answer the request.
pub(crate) fn unexpected(request: &str, reply: &ServerReply) -> FfiError {
    let mut text = format!("{reply:?}");
    if text.len() > 200 {
        let mut end = 200;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    FfiError::new(PICLOUD_ERR_PROTOCOL, format_args!("unexpected reply to {request}: {text}"))
}

/// The reference `(seq, index)` names: the job (or array as a whole) for
/// index -1, else one array task.
pub(crate) fn job_ref(seq: u64, index: i32) -> Result<JobRef, FfiError> {
    match index {
        -1 => Ok(JobRef::Job(seq)),
        i if i >= 0 => Ok(JobRef::Task(seq, i as u32)),
        i => {
            Err(FfiError::invalid(format_args!("index {i}: use -1 for the whole job or an array index >= 0")))
        }
    }
}

/// Where `picloud_client_connect` connects for `address`.
fn address_of(address: Option<&str>) -> Result<ServerAddr, FfiError> {
    match address.map(str::trim) {
        Some("") => Err(FfiError::invalid("address is empty (pass NULL for the default server)")),
        Some(a) => Ok(ServerAddr::parse(a)),
        None => match std::env::var("PICLOUD_SERVER").ok().filter(|s| !s.trim().is_empty()) {
            Some(a) => Ok(ServerAddr::parse(a.trim())),
            None => Ok(ServerAddr::of_state_dir(&picloud_proto::client::default_state_dir())),
        },
    }
}

/// Connects to a picloud server.
///
/// `address` is NULL for the server this user's commands use (`$PICLOUD_SERVER`
/// if set, else the state directory `$PICLOUD_DIR`, else `~/.picloud`), or a
/// state directory, a server socket path, or `host:port` (which the server
/// refuses for now with `PICLOUD_ERR_PERMISSION_DENIED`: its TCP port is for
/// agents). On success `*out` is a new client; free it with
/// `picloud_client_free`.
///
/// # Safety
/// `address` is NULL or a NUL-terminated string; `out` points to writable
/// memory for a pointer.
#[no_mangle]
pub unsafe extern "C" fn picloud_client_connect(
    address: *const c_char,
    out: *mut *mut picloud_client,
) -> c_int {
    boundary(|| {
        check_out(out, "out")?;
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        let addr = address_of(unsafe { opt_str(address, "address") }?)?;
        let client = Client::connect(&addr)?;
        let unconfirmed = client.unconfirmed_flag();
        let handle = CLIENTS.insert(picloud_client {
            conn: Mutex::new(Conn::Ready(Box::new(client))),
            refused: Mutex::new(HashMap::new()),
            flusher: Arc::default(),
            unconfirmed,
        });
        // SAFETY: checked by check_out; the caller promises it is writable.
        unsafe { write_out(out, handle) };
        Ok(())
    })
}

/// Frees the client and closes its connection. NULL does nothing. A call
/// still in progress on another thread (a wait) keeps the connection until it
/// returns; this call does not wait for it.
#[no_mangle]
pub extern "C" fn picloud_client_free(client: *mut picloud_client) -> c_int {
    boundary(|| {
        // The connection closes when the last reference goes: here, or at the
        // end of a call in progress.
        CLIENTS.remove(client, "client")?;
        Ok(())
    })
}

// ---------------------------------------------------------------- options

/// `flags` bit: submit the job held (`qsub -h`); it runs once released.
pub const PICLOUD_JOB_HOLD: u32 = 1;
/// `flags` bit: do not rerun the job after a node failure (`qsub -r n`).
pub const PICLOUD_JOB_NO_RERUN: u32 = 2;
/// `flags` bit: give the job this process's whole environment (`qsub -V`).
pub const PICLOUD_JOB_EXPORT_ENV: u32 = 4;
const KNOWN_FLAGS: u32 = PICLOUD_JOB_HOLD | PICLOUD_JOB_NO_RERUN | PICLOUD_JOB_EXPORT_ENV;

/// `depend_mode`: run after every job in `depend_on` succeeded (`afterok`).
pub const PICLOUD_DEPEND_AFTEROK: u32 = 0;
/// `depend_mode`: run after every job in `depend_on` ended, however (`afterany`).
pub const PICLOUD_DEPEND_AFTERANY: u32 = 1;
/// `depend_mode`: run after every job in `depend_on` failed (`afternotok`).
pub const PICLOUD_DEPEND_AFTERNOTOK: u32 = 2;

/// Options of a submission. Set `struct_size` to
/// `sizeof(picloud_job_options)` and leave every field you do not need zero
/// (or NULL): zero always means the default. A NULL `picloud_job_options *`
/// means all defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct picloud_job_options {
    /// `sizeof(picloud_job_options)`.
    pub struct_size: u32,
    /// `PICLOUD_JOB_*` bits, ORed.
    pub flags: u32,
    /// Cores per task; 0 means 1.
    pub ncpus: u32,
    /// Explicit priority, -1024 to 1023 (`qsub -p`).
    pub priority: i32,
    /// Memory limit per task in bytes; 0 for none.
    pub mem_bytes: u64,
    /// Wall-clock limit per task in seconds; 0 for none.
    pub walltime_secs: u64,
    /// Job name; NULL for the default (the program's name for a command,
    /// `python` for a Python call).
    pub name: *const c_char,
    /// Command jobs only: array indices in PBS syntax (`0-9`, `1-100:2`,
    /// `1,3,5`); NULL for a plain job. Must be NULL for Python calls.
    pub array: *const c_char,
    /// Working directory; NULL for the current one. Relative paths are taken
    /// from the current directory.
    pub workdir: *const c_char,
    /// Command jobs only: stdout file (`qsub -o`); NULL for `NAME.oSEQ` in the
    /// working directory.
    pub stdout_path: *const c_char,
    /// Command jobs only: stderr file (`qsub -e`); NULL for `NAME.eSEQ`.
    pub stderr_path: *const c_char,
    /// `env_len` environment variables as `NAME=VALUE`. A command job gets them
    /// on top of a clean environment (`HOME`, `USER`, `LOGNAME`, `SHELL`,
    /// `LANG`, a standard `PATH`, the `PBS_O_*` variables), or of this
    /// process's whole environment with `PICLOUD_JOB_EXPORT_ENV`; a Python
    /// task gets them set around the call (see docs/workers.md).
    pub env: *const *const c_char,
    /// Number of entries in `env`.
    pub env_len: usize,
    /// `depend_len` job sequence numbers this job waits for (arrays count as
    /// a whole).
    pub depend_on: *const u64,
    /// Number of entries in `depend_on`.
    pub depend_len: usize,
    /// `PICLOUD_DEPEND_*`: how the jobs in `depend_on` must end.
    pub depend_mode: u32,
}

// SAFETY: repr(C), starts with struct_size, integers and pointers only.
unsafe impl CStruct for picloud_job_options {
    const NAME: &'static str = "picloud_job_options";
}

/// What a submission's options say, read and checked.
#[derive(Debug, Default)]
struct Options {
    flags: u32,
    ncpus: u32,
    priority: i32,
    mem: Option<u64>,
    walltime: Option<u64>,
    name: Option<String>,
    array: Option<ArrayIndices>,
    workdir: Option<String>,
    stdout: Option<String>,
    stderr: Option<String>,
    env: Vec<(String, String)>,
    depend: Vec<Dependency>,
}

/// Reads and checks options; NULL gives the defaults.
///
/// # Safety
/// `p` is NULL or points to a `picloud_job_options` whose pointers are valid
/// as its fields' docs say.
unsafe fn read_options(p: *const picloud_job_options) -> Result<Options, FfiError> {
    if p.is_null() {
        return Ok(Options::default());
    }
    // SAFETY: non-NULL, the caller's struct.
    let o = unsafe { read_sized(p, "options") }?;
    if o.flags & !KNOWN_FLAGS != 0 {
        return Err(FfiError::invalid(format_args!(
            "options->flags has unknown bits {:#x}",
            o.flags & !KNOWN_FLAGS
        )));
    }
    if !(-1024..=1023).contains(&o.priority) {
        return Err(FfiError::invalid(format_args!(
            "options->priority {} is not in -1024..1023",
            o.priority
        )));
    }
    let kind = match o.depend_mode {
        PICLOUD_DEPEND_AFTEROK => DependKind::AfterOk,
        PICLOUD_DEPEND_AFTERANY => DependKind::AfterAny,
        PICLOUD_DEPEND_AFTERNOTOK => DependKind::AfterNotOk,
        m => {
            return Err(FfiError::invalid(format_args!(
                "options->depend_mode {m} is not a PICLOUD_DEPEND_*"
            )));
        }
    };
    // SAFETY (each of the reads below): the caller promises that the struct's
    // pointers are NULL or valid for the lengths given beside them.
    let string = |p, what| unsafe { opt_str(p, what) }.map(|s| s.map(str::to_owned));
    let array = match string(o.array, "options->array")? {
        None => None,
        Some(spec) => {
            let indices = ArrayIndices::parse(&spec).map_err(FfiError::invalid)?;
            // Tasks are named by an int32_t index in this API.
            if indices.ranges().iter().any(|r| r.end > i32::MAX as u32) {
                return Err(FfiError::invalid(format_args!(
                    "options->array '{spec}': indices above {} cannot be named through the C API",
                    i32::MAX
                )));
            }
            Some(indices)
        }
    };
    // SAFETY: as above.
    let env = unsafe { str_array(o.env, o.env_len, "options->env") }?
        .into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(FfiError::invalid(format_args!("options->env entry '{kv}' is not NAME=VALUE"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    // SAFETY: as above.
    let depend = unsafe { slice(o.depend_on, o.depend_len, "options->depend_on") }?
        .iter()
        .map(|&seq| Dependency { kind, on: JobRef::Job(seq) })
        .collect();
    Ok(Options {
        flags: o.flags,
        ncpus: o.ncpus,
        priority: o.priority,
        mem: (o.mem_bytes > 0).then_some(o.mem_bytes),
        walltime: (o.walltime_secs > 0).then_some(o.walltime_secs),
        name: string(o.name, "options->name")?,
        array,
        workdir: string(o.workdir, "options->workdir")?,
        stdout: string(o.stdout_path, "options->stdout_path")?,
        stderr: string(o.stderr_path, "options->stderr_path")?,
        env,
        depend,
    })
}

fn hostname() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default()
}

fn absolute(path: &str, base: &std::path::Path) -> String {
    base.join(path).to_string_lossy().into_owned()
}

/// Builds the job of a submission: options applied to `command`.
fn job_spec(command: JobCommand, default_name: &str, o: Options) -> Result<JobSpec, FfiError> {
    let cwd = std::env::current_dir()
        .map_err(|e| FfiError::new(PICLOUD_ERR_IO, format_args!("cannot read the current directory: {e}")))?;
    let workdir = o.workdir.as_deref().map_or_else(|| cwd.clone(), |w| cwd.join(w));
    let export_all = o.flags & PICLOUD_JOB_EXPORT_ENV != 0;
    let host = hostname();
    let env = if matches!(command, JobCommand::Python(_)) {
        // A Python task gets only what was asked for: its worker has the
        // environment it was started with.
        let mut env = if export_all { submit_env::current_vars() } else { Default::default() };
        env.extend(o.env);
        env.into_iter().collect()
    } else {
        // As qsub builds it.
        let named: Vec<(String, Option<String>)> = o.env.into_iter().map(|(k, v)| (k, Some(v))).collect();
        let workdir = cwd.to_string_lossy();
        let origin = submit_env::Origin { workdir: &workdir, host: &host, queue: submit_env::DEFAULT_QUEUE };
        submit_env::job_env(&submit_env::current_vars(), export_all, &named, origin)
    };
    let submit_args = match &command {
        JobCommand::Argv(argv) => argv.join(" "),
        _ => String::new(),
    };
    let name = o.name.unwrap_or_else(|| default_name.to_string());
    let mut spec = JobSpec::new(name, command, workdir.to_string_lossy().into_owned());
    spec.env = env;
    spec.stdout = o.stdout.as_deref().map(|p| absolute(p, &workdir));
    spec.stderr = o.stderr.as_deref().map(|p| absolute(p, &workdir));
    spec.hold = o.flags & PICLOUD_JOB_HOLD != 0;
    spec.rerunnable = o.flags & PICLOUD_JOB_NO_RERUN == 0;
    spec.resources.ncpus = o.ncpus.max(1);
    spec.resources.mem = o.mem;
    spec.resources.walltime = o.walltime;
    spec.array = o.array;
    spec.depend = o.depend;
    spec.priority = o.priority;
    spec.submit_host = host;
    spec.submit_args = submit_args;
    Ok(spec)
}

/// Sends a submission; returns its sequence number and id.
/// Refuses a submission of `size` bytes on the wire over the frame limit,
/// before a byte is sent: the server would refuse the frame and close the
/// connection. `hint` says what to do instead.
fn check_frame_size(size: u64, hint: &str) -> Result<(), FfiError> {
    if size > picloud_proto::MAX_FRAME_LEN as u64 {
        return Err(FfiError::invalid(format_args!(
            "the submission takes {size} bytes on the wire, over the limit of {} bytes of a frame; \
             nothing was submitted{hint}",
            picloud_proto::MAX_FRAME_LEN
        )));
    }
    Ok(())
}

fn submit(client: &mut Client, spec: JobSpec) -> Result<(u64, String), FfiError> {
    let request = ClientRequest::Submit(Box::new(spec));
    check_frame_size(bincode::serialized_size(&request).unwrap_or(u64::MAX), "")?;
    match client.request(&request)? {
        ServerReply::Submitted { seq, id } => Ok((seq, id)),
        other => Err(unexpected("a submission", &other)),
    }
}

/// Submits a command job: `argv[0]` (looked up in the job's `PATH`) with its
/// arguments, in the working directory of `options` (default: the current
/// one). With `options->array` set it is a job array.
///
/// On success, `*seq_out` (if `seq_out` is not NULL) is the job's sequence
/// number, the handle every other call takes, and `id_out` (if not NULL)
/// receives its full id (`12.server`, `12[].server` for an array) and a NUL.
/// `id_cap` must leave room for the longest id this server can give (20
/// digits, `[]`, `.`, the server's name, the NUL; 256 is plenty for any usual
/// name): a smaller buffer fails with `PICLOUD_ERR_BUFFER_TOO_SMALL` before
/// anything is submitted.
///
/// # Safety
/// `argv` points to `argc` NUL-terminated strings; `options` is NULL or valid
/// as its type says; `seq_out` is NULL or writable; `id_out` is NULL or points
/// to `id_cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn picloud_client_submit_command(
    client: *mut picloud_client,
    argv: *const *const c_char,
    argc: usize,
    options: *const picloud_job_options,
    seq_out: *mut u64,
    id_out: *mut c_char,
    id_cap: usize,
) -> c_int {
    boundary(|| {
        let c = client_of(client)?;
        if !seq_out.is_null() {
            check_out(seq_out, "seq_out")?;
        }
        if argc == 0 {
            return Err(FfiError::invalid("argc is 0: a command needs at least a program"));
        }
        // SAFETY: the caller promises argc strings at argv.
        let argv = unsafe { str_array(argv, argc, "argv") }?;
        if argv[0].is_empty() {
            return Err(FfiError::invalid("argv[0] is empty"));
        }
        // SAFETY: the caller promises NULL or a valid struct.
        let options = unsafe { read_options(options) }?;
        let default_name = argv[0].rsplit('/').next().unwrap_or("job").to_string();
        let spec = job_spec(JobCommand::Argv(argv), &default_name, options)?;
        let (seq, id) = c.with(|client| {
            if !id_out.is_null() {
                let longest = 20 + 2 + 1 + client.server_name().len();
                if let Err(e) = check_buffer(id_out, id_cap, longest, "id_out") {
                    // SAFETY: id_out holds id_cap bytes (the caller's promise).
                    let _ = unsafe { write_str(id_out, id_cap, "", "id_out") };
                    return Err(FfiError::new(e.code, format_args!("{}; nothing was submitted", e.message)));
                }
            }
            submit(client, spec)
        })?;
        if !seq_out.is_null() {
            // SAFETY: checked above; the caller promises it is writable.
            unsafe { write_out(seq_out, seq) };
        }
        if !id_out.is_null() {
            // SAFETY: id_cap writable bytes, checked large enough for any id.
            unsafe { write_str(id_out, id_cap, &id, "id_out") }?;
        }
        Ok(())
    })
}

/// A byte buffer: `len` bytes at `data` (`data` may be NULL when `len` is 0).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct picloud_bytes {
    /// The first byte.
    pub data: *const u8,
    /// How many bytes.
    pub len: usize,
}

/// A Python function call (see docs/workers.md): one task per entry of
/// `args`; more than one (or `array` set) makes a map, an array with indices
/// 0 to `args_len - 1` whose task `i` gets `args[i]`. Set `struct_size` to
/// `sizeof(picloud_python_call)`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct picloud_python_call {
    /// `sizeof(picloud_python_call)`.
    pub struct_size: u32,
    /// Non-zero: replace the worker after each task instead of keeping it
    /// warm (PiCloud's `_kill_process`).
    pub kill_process: u32,
    /// The interpreter workers run, normally the caller's `sys.executable`;
    /// NULL for `python3`.
    pub interpreter: *const c_char,
    /// The caller's import path (`sys.path`), `sys_path_len` entries: the
    /// workers' `PYTHONPATH`.
    pub sys_path: *const *const c_char,
    /// Number of entries in `sys_path`.
    pub sys_path_len: usize,
    /// The function, pickled with cloudpickle.
    pub function: picloud_bytes,
    /// `args_len` encoded argument sets (format of docs/workers.md).
    pub args: *const picloud_bytes,
    /// Number of tasks: at least 1.
    pub args_len: usize,
    /// Names of the shared-memory segments the arguments refer to. The job
    /// holds them on its node from when it is first started there until it
    /// is forgotten, not from its submission: keep a reference of your own
    /// until its tasks have started (simplest: until it has ended).
    pub segments: *const *const c_char,
    /// Number of entries in `segments`.
    pub segments_len: usize,
    /// Non-zero: the job is an array (indices 0 to `args_len - 1`) even with
    /// one task, as a map of one element is; zero: an array only with more
    /// than one task.
    pub array: u32,
}

// SAFETY: repr(C), starts with struct_size, integers and pointers only.
unsafe impl CStruct for picloud_python_call {
    const NAME: &'static str = "picloud_python_call";
    // Before `array`.
    const EARLIER_SIZES: &'static [usize] = &[std::mem::offset_of!(picloud_python_call, array)];
}

/// The job a `picloud_python_call` and its options describe, checked.
///
/// # Safety
/// As for `picloud_client_submit_python`.
unsafe fn python_spec(
    call: *const picloud_python_call,
    options: *const picloud_job_options,
) -> Result<JobSpec, FfiError> {
    // SAFETY: the caller promises a valid struct.
    let raw = unsafe { read_sized(call, "call") }?;
    if raw.args_len == 0 {
        return Err(FfiError::invalid("call->args_len is 0: a call needs at least one argument set"));
    }
    if raw.args_len > u32::MAX as usize {
        return Err(FfiError::invalid(format_args!("call->args_len {} is too many tasks", raw.args_len)));
    }
    // SAFETY (this and the next three reads): the caller promises that the
    // struct's pointers are NULL or valid for the lengths beside them.
    let interpreter = unsafe { opt_str(raw.interpreter, "call->interpreter") }?.unwrap_or("python3");
    // SAFETY: as above.
    let sys_path = unsafe { str_array(raw.sys_path, raw.sys_path_len, "call->sys_path") }?;
    // SAFETY: as above.
    let segments = unsafe { str_array(raw.segments, raw.segments_len, "call->segments") }?;
    // SAFETY: as above.
    let function = unsafe { slice(raw.function.data, raw.function.len, "call->function") }?;
    if function.is_empty() {
        return Err(FfiError::invalid("call->function is empty"));
    }
    // SAFETY: as above.
    let arg_bufs = unsafe { slice(raw.args, raw.args_len, "call->args") }?;
    // SAFETY: options NULL or valid, as promised.
    let options = unsafe { read_options(options) }?;
    if options.array.is_some() || options.stdout.is_some() || options.stderr.is_some() {
        return Err(FfiError::invalid(
            "options->array, stdout_path and stderr_path are for command jobs: a Python call's \
             tasks are its argument sets, and their output comes back with the results",
        ));
    }
    let tasks = arg_bufs.len();
    let payload = arg_bufs.iter().fold(function.len() as u64, |n, b| n.saturating_add(b.len as u64));
    let python = PythonCall {
        interpreter: interpreter.to_string(),
        sys_path,
        function: Vec::new(),
        args: vec![Vec::new(); tasks],
        segments,
        kill_process: raw.kill_process != 0,
    };
    let mut spec = job_spec(JobCommand::Python(Box::new(python)), "python", options)?;
    if tasks > 1 || raw.array != 0 {
        spec.array = Some(ArrayIndices::parse(&format!("0-{}", tasks - 1)).map_err(FfiError::invalid)?);
    }
    // The frame's size, before copying the payload: bincode writes a
    // Vec<u8> as a u64 length and its bytes, and the empty vectors above
    // already count their lengths.
    // Measured as a pipelined submission, the larger of the two.
    let request = ClientRequest::SubmitReserved { seq: 0, spec: Box::new(spec) };
    let frame = bincode::serialized_size(&request).unwrap_or(u64::MAX).saturating_add(payload);
    check_frame_size(frame, ": pass large arguments in shared-memory segments")?;
    let mut args = Vec::with_capacity(tasks);
    for (i, b) in arg_bufs.iter().enumerate() {
        // SAFETY: as above, for each argument set.
        args.push(unsafe { slice(b.data, b.len, &format!("call->args[{i}]")) }?.to_vec());
    }
    let ClientRequest::SubmitReserved { mut spec, .. } = request else { unreachable!("built just above") };
    if let JobCommand::Python(call) = &mut spec.command {
        call.function = function.to_vec();
        call.args = args;
    }
    Ok(*spec)
}

/// Checks a Python submission's arguments, builds its job and hands it to
/// `submit`, writing the sequence number it returns to `*seq_out`.
///
/// # Safety
/// As for `picloud_client_submit_python`.
unsafe fn submit_python_with(
    client: *mut picloud_client,
    call: *const picloud_python_call,
    options: *const picloud_job_options,
    seq_out: *mut u64,
    submit: impl FnOnce(&Arc<picloud_client>, JobSpec) -> Result<u64, FfiError>,
) -> c_int {
    boundary(|| {
        let c = client_of(client)?;
        check_out(seq_out, "seq_out")?;
        // SAFETY: passed on from the caller, whose promises are ours.
        let spec = unsafe { python_spec(call, options) }?;
        let seq = submit(&c, spec)?;
        // SAFETY: checked above; the caller promises it is writable.
        unsafe { write_out(seq_out, seq) };
        Ok(())
    })
}

/// Submits a Python function call: one task, or a map of `call->args_len`
/// tasks sharing the function. `*seq_out` is the job's sequence number. A
/// submission is one protocol frame of at most 64 MiB: pass larger data in
/// shared-memory segments (`picloud_segment_create`).
///
/// It returns once the server has queued the job. The job is named by a
/// number the server reserved for this client, so a server that went away
/// (a crash, a restart) does not lose it or queue it twice: the client
/// connects again for up to 30 s and sends it again, and the server queues
/// it once. If no server answers within those 30 s, the call fails and the
/// job may or may not have been queued. Pipelined submissions of this client
/// (`picloud_client_submit_python_async`) are sent and confirmed first.
///
/// # Safety
/// `call` points to a valid `picloud_python_call`, `options` is NULL or valid,
/// `seq_out` is writable.
#[no_mangle]
pub unsafe extern "C" fn picloud_client_submit_python(
    client: *mut picloud_client,
    call: *const picloud_python_call,
    options: *const picloud_job_options,
    seq_out: *mut u64,
) -> c_int {
    // SAFETY: passed on from the caller, whose promises are ours.
    unsafe {
        submit_python_with(client, call, options, seq_out, |c, spec| {
            c.with(|client| Ok(client.submit_reserved(spec)?))
        })
    }
}

/// Submits a Python function call as `picloud_client_submit_python` does,
/// but without waiting for the server: the job gets its sequence number from
/// a block the server reserved for this client (`*seq_out`, at once), and
/// its submission is sent with this client's next call, or by a thread of
/// this client at most a millisecond later. Submissions from one client
/// reach the server in the order they were made.
///
/// What is checked here fails here, as for `picloud_client_submit_python`
/// (bad arguments, a lost connection). A refusal by the server (a job no
/// node can hold, a dependency on an unknown job, a full journal) comes
/// later: every later call of this client that names the job (wait,
/// results, status, cancel) fails with it. Other clients see no such job.
/// Call `picloud_client_flush` before another client (another thread's)
/// names the job.
///
/// # Safety
/// As for `picloud_client_submit_python`.
#[no_mangle]
pub unsafe extern "C" fn picloud_client_submit_python_async(
    client: *mut picloud_client,
    call: *const picloud_python_call,
    options: *const picloud_job_options,
    seq_out: *mut u64,
) -> c_int {
    // SAFETY: passed on from the caller, whose promises are ours.
    unsafe {
        submit_python_with(client, call, options, seq_out, |c, spec| {
            let seq = c.with(|client| {
                let seq = client.reserve_seq()?;
                client.submit_pipelined(seq, spec)?;
                Ok(seq)
            })?;
            if !c.flusher.schedule(c) {
                // No thread to send it later: now. The job is named either
                // way; a broken connection is for the next call to report.
                let _ = c.confirm_pipelined();
            }
            Ok(seq)
        })
    }
}

/// Sends this client's pipelined submissions
/// (`picloud_client_submit_python_async`) and waits until the server has
/// queued them, so that a request another client sends afterwards finds the
/// jobs. Safe to call from any thread, also while this client is in a long
/// wait on another (that call has already had the server's replies; this
/// one does not wait for it), and it returns at once when nothing is
/// unconfirmed. Fails only when the connection does; the server's refusals
/// of single jobs are reported by this client's calls that name them.
#[no_mangle]
pub extern "C" fn picloud_client_flush(client: *mut picloud_client) -> c_int {
    boundary(|| client_of(client)?.confirm_pipelined())
}

// ---------------------------------------------------------------- wait

/// `mode` of `picloud_client_wait`: return when every job has ended.
pub const PICLOUD_WAIT_ALL: c_int = 0;
/// `mode` of `picloud_client_wait`: return when at least one job has ended.
pub const PICLOUD_WAIT_ANY: c_int = 1;

/// Which of `seqs` have ended (arrays: every task), by one `Stat`.
fn ended(client: &mut Client, seqs: &[u64]) -> Result<Vec<bool>, FfiError> {
    let request = ClientRequest::Stat(StatRequest {
        jobs: seqs.iter().map(|&s| JobRef::Job(s)).collect(),
        include_finished: true,
        user: None,
        expand_arrays: false,
    });
    // A query changes nothing: across a restart of the server it is sent
    // again once the server is back.
    let reply = client.request_reconnecting(RECONNECT_WINDOW, None, |_| request.clone())?;
    match reply {
        ServerReply::Jobs { jobs, unknown } if unknown.is_empty() => finished_of(seqs, &jobs),
        ServerReply::Jobs { unknown, .. } => {
            let ids: Vec<String> = unknown.iter().map(|r| r.to_string()).collect();
            Err(FfiError::new(PICLOUD_ERR_UNKNOWN_JOB, format_args!("Unknown Job Id {}", ids.join(", "))))
        }
        other => Err(unexpected("a status request", &other)),
    }
}

/// Whether each of `seqs` is finished, by the jobs' states.
fn finished_of(seqs: &[u64], jobs: &[JobInfo]) -> Result<Vec<bool>, FfiError> {
    let finished: std::collections::HashMap<u64, bool> = jobs
        .iter()
        .filter(|j| j.task.index.is_none())
        .map(|j| (j.task.seq, j.state == JobState::Finished))
        .collect();
    seqs.iter()
        .map(|s| {
            finished.get(s).copied().ok_or_else(|| {
                FfiError::new(PICLOUD_ERR_PROTOCOL, format_args!("the server's status reply has no job {s}"))
            })
        })
        .collect()
}

/// Whether each of `seqs` had ended when a wait was answered: a job missing
/// from the answer was forgotten meanwhile, so it ended too.
fn ended_by_wait(seqs: &[u64], jobs: &[JobInfo]) -> Vec<bool> {
    seqs.iter()
        .map(|s| {
            jobs.iter()
                .find(|j| j.task.seq == *s && j.task.index.is_none())
                .is_none_or(|j| j.state == JobState::Finished)
        })
        .collect()
}

/// A wait's `timeout_ms`: -1 for no limit, else milliseconds.
pub(crate) fn timeout_of(timeout_ms: i64) -> Result<Option<Duration>, FfiError> {
    match timeout_ms {
        -1 => Ok(None),
        t if t >= 0 => Ok(Some(Duration::from_millis(t as u64))),
        t => Err(FfiError::invalid(format_args!("timeout_ms {t}: use -1 (no limit) or >= 0"))),
    }
}

/// The checked arguments of a wait.
struct WaitArgs {
    seqs: Vec<u64>,
    timeout: Option<Duration>,
    until: WaitUntil,
    ended_out: *mut u8,
}

impl WaitArgs {
    /// Checks what `picloud_client_wait` and `picloud_client_wait_results` were given.
    ///
    /// # Safety
    /// As for those functions.
    unsafe fn new(
        seqs: *const u64,
        n: usize,
        timeout_ms: i64,
        mode: c_int,
        ended_out: *mut u8,
    ) -> Result<Self, FfiError> {
        // SAFETY: the caller promises n values at seqs.
        let seqs = unsafe { slice(seqs, n, "seqs") }?.to_vec();
        if n > 0 && !ended_out.is_null() {
            check_out(ended_out, "ended_out")?;
        }
        let timeout = timeout_of(timeout_ms)?;
        let until = match mode {
            PICLOUD_WAIT_ALL => WaitUntil::All,
            PICLOUD_WAIT_ANY if seqs.is_empty() => {
                return Err(FfiError::invalid("PICLOUD_WAIT_ANY of no job would never return"));
            }
            PICLOUD_WAIT_ANY => WaitUntil::Any,
            m => {
                return Err(FfiError::invalid(format_args!(
                    "mode {m} is not PICLOUD_WAIT_ALL or PICLOUD_WAIT_ANY"
                )));
            }
        };
        let args = Self { seqs, timeout, until, ended_out };
        // Defined on every path: a wait that fails before learning which
        // jobs ended says none did.
        args.report(&vec![false; n]);
        Ok(args)
    }

    /// Writes the ended flags, when the caller wants them.
    fn report(&self, ended: &[bool]) {
        if !self.ended_out.is_null() {
            for (i, &e) in ended.iter().enumerate() {
                // SAFETY: ended_out holds n bytes (the caller's promise), and
                // ended has one entry per seq, n in all.
                unsafe { self.ended_out.add(i).write(u8::from(e)) };
            }
        }
    }

    /// Sends the wait (again, with the time left, if the server restarts)
    /// and returns its reply; on a timeout, reports which jobs had ended.
    fn run(&self, client: &mut Client, reply: WaitReply) -> Result<ServerReply, FfiError> {
        let jobs: Vec<JobRef> = self.seqs.iter().map(|&s| JobRef::Job(s)).collect();
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let request = |left: Option<Duration>| ClientRequest::Wait {
            jobs: jobs.clone(),
            timeout_ms: left.map(|t| t.as_millis() as u64),
            until: self.until,
            reply,
        };
        client.request_reconnecting(RECONNECT_WINDOW, deadline, request).map_err(|e| {
            let e = FfiError::from(e);
            if e.code == PICLOUD_ERR_TIMEOUT {
                // Which ones did end, for the caller's bookkeeping; the
                // timeout is the error reported either way.
                if let Ok(done) = ended(client, &self.seqs) {
                    self.report(&done);
                }
            }
            e
        })
    }
}

/// Waits for jobs (arrays as a whole) to end.
///
/// `mode` is `PICLOUD_WAIT_ALL` (the server answers once all have ended) or
/// `PICLOUD_WAIT_ANY` (once at least one has). `timeout_ms` is -1 to wait for
/// ever, 0 to only look, else a limit in milliseconds, after which the call
/// fails with `PICLOUD_ERR_TIMEOUT` and the jobs go on.
///
/// `ended_out` is NULL or an array of `n` bytes: on success and on a
/// timeout, entry `i` is set to 1 if `seqs[i]` had ended, else 0. `n` may be 0
/// with `PICLOUD_WAIT_ALL` (returns at once), not with `PICLOUD_WAIT_ANY`.
/// The client is busy for the whole wait. If the server goes away during
/// the wait without a word (a crash and restart), the client connects again
/// (every 50 ms at first, backing off to every 2 s, for at most 30 s) and
/// goes on waiting; only then does the call fail. A server stopped on
/// purpose fails the wait at once (`PICLOUD_ERR_SERVER`).
///
/// # Safety
/// `seqs` points to `n` values; `ended_out` is NULL or points to `n`
/// writable bytes.
#[no_mangle]
pub unsafe extern "C" fn picloud_client_wait(
    client: *mut picloud_client,
    seqs: *const u64,
    n: usize,
    timeout_ms: i64,
    mode: c_int,
    ended_out: *mut u8,
) -> c_int {
    boundary(|| {
        let c = client_of(client)?;
        // SAFETY: passed on from the caller, whose promises are ours.
        let args = unsafe { WaitArgs::new(seqs, n, timeout_ms, mode, ended_out) }?;
        if args.seqs.is_empty() {
            return c.with(|_| Ok(()));
        }
        c.with_jobs(&args.seqs, |client| match args.run(client, WaitReply::States)? {
            ServerReply::Jobs { jobs, .. } => {
                args.report(&ended_by_wait(&args.seqs, &jobs));
                Ok(())
            }
            other => Err(unexpected("a wait", &other)),
        })
    })
}

/// Waits as `picloud_client_wait` does and, in the same request, fetches
/// the outcomes of every task of the jobs that have ended (all of them with
/// `PICLOUD_WAIT_ALL`; at least one with `PICLOUD_WAIT_ANY`), in the order of
/// `seqs`, as `picloud_client_results` would: a wait and its results cost one
/// round trip. Only the jobs' owner (or root) may do this
/// (`PICLOUD_ERR_PERMISSION_DENIED`, at once). On success `*out` holds the
/// results (free it with `picloud_results_free`); on a timeout it is left
/// alone and `ended_out` says which jobs had ended. Results that would not
/// fit one reply (64 MiB) are left out, all of them: `*out` is then empty
/// although `ended_out` says the jobs ended, and `picloud_client_results`
/// fetches them job by job. A job forgotten by the server during the wait
/// counts as ended, with no results.
///
/// # Safety
/// As `picloud_client_wait`; `out` points to writable memory for a pointer.
#[no_mangle]
pub unsafe extern "C" fn picloud_client_wait_results(
    client: *mut picloud_client,
    seqs: *const u64,
    n: usize,
    timeout_ms: i64,
    mode: c_int,
    ended_out: *mut u8,
    out: *mut *mut crate::results::picloud_results,
) -> c_int {
    boundary(|| {
        let c = client_of(client)?;
        check_out(out, "out")?;
        // SAFETY: passed on from the caller, whose promises are ours.
        let args = unsafe { WaitArgs::new(seqs, n, timeout_ms, mode, ended_out) }?;
        let (results, ended) = if args.seqs.is_empty() {
            c.with(|_| Ok((Vec::new(), Vec::new())))?
        } else {
            c.with_jobs(&args.seqs, |client| match args.run(client, WaitReply::Results)? {
                ServerReply::Results { results, unknown } => {
                    // Forgotten meanwhile (`unknown`) counts as ended.
                    let ended = args
                        .seqs
                        .iter()
                        .map(|s| {
                            results.iter().any(|r| r.task.seq == *s) || unknown.iter().any(|r| r.seq() == *s)
                        })
                        .collect();
                    Ok((results, ended))
                }
                // Outcomes too large for one reply: the jobs' states instead.
                ServerReply::Jobs { jobs, .. } => Ok((Vec::new(), ended_by_wait(&args.seqs, &jobs))),
                other => Err(unexpected("a wait for results", &other)),
            })?
        };
        args.report(&ended);
        // SAFETY: checked by check_out; writable by the caller's promise.
        unsafe { write_out(out, crate::results::stored(results)) };
        Ok(())
    })
}

// ---------------------------------------------------------------- status

/// State of a job or task, as `qstat` shows it.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum picloud_state {
    /// Never reported: the value of a zeroed struct before libpicloud fills it.
    PICLOUD_STATE_UNKNOWN = 0,
    /// Waiting for resources (`Q`).
    PICLOUD_STATE_QUEUED = 1,
    /// Held, or waiting for its dependencies (`H`).
    PICLOUD_STATE_HELD = 2,
    /// Running (`R`).
    PICLOUD_STATE_RUNNING = 3,
    /// Its processes ended; being cleaned up (`E`).
    PICLOUD_STATE_EXITING = 4,
    /// Ended (`F`).
    PICLOUD_STATE_FINISHED = 5,
    /// An array with at least one task started (`B`).
    PICLOUD_STATE_BEGUN = 6,
}

impl From<JobState> for picloud_state {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Queued => picloud_state::PICLOUD_STATE_QUEUED,
            JobState::Held => picloud_state::PICLOUD_STATE_HELD,
            JobState::Running => picloud_state::PICLOUD_STATE_RUNNING,
            JobState::Exiting => picloud_state::PICLOUD_STATE_EXITING,
            JobState::Finished => picloud_state::PICLOUD_STATE_FINISHED,
            JobState::Begun => picloud_state::PICLOUD_STATE_BEGUN,
        }
    }
}

/// Where a job, an array or one array task stands. Set `struct_size` to
/// `sizeof(picloud_task_status)` before the call; libpicloud fills the rest.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct picloud_task_status {
    /// `sizeof(picloud_task_status)`, set by the caller.
    pub struct_size: u32,
    /// The state.
    pub state: picloud_state,
    /// Exit status when `has_exit_status` is 1: the exit code, 256 + the
    /// signal when killed by one (265 after a cancel), negative when the job
    /// never ran.
    pub exit_status: i32,
    /// 1 when `exit_status` holds a value (the job has ended), else 0.
    pub has_exit_status: u32,
    /// 1 for an array as a whole, else 0.
    pub is_array: u32,
    /// CPU time used, user plus system, in milliseconds.
    pub cput_ms: u64,
    /// Wall-clock time used in milliseconds.
    pub walltime_ms: u64,
    /// Peak resident memory in bytes.
    pub mem_bytes: u64,
    /// Submission time (Unix seconds).
    pub ctime: u64,
    /// Start time (Unix seconds); 0 before it started.
    pub stime: u64,
    /// End time (Unix seconds); 0 before it ended.
    pub end_time: u64,
    /// Arrays: tasks waiting.
    pub array_queued: u64,
    /// Arrays: tasks running.
    pub array_running: u64,
    /// Arrays: tasks ended.
    pub array_finished: u64,
}

// SAFETY: repr(C), starts with struct_size; only ever written as a whole
// (never read with read_sized).
unsafe impl CStruct for picloud_task_status {
    const NAME: &'static str = "picloud_task_status";
}

fn status_of(info: &JobInfo) -> picloud_task_status {
    let counts = info.array_counts.unwrap_or_default();
    picloud_task_status {
        struct_size: std::mem::size_of::<picloud_task_status>() as u32,
        state: info.state.into(),
        exit_status: info.exit_status.unwrap_or(0),
        has_exit_status: u32::from(info.exit_status.is_some()),
        is_array: u32::from(info.is_array),
        cput_ms: info.used.cput_ms,
        walltime_ms: info.used.walltime_ms,
        mem_bytes: info.used.mem,
        ctime: info.ctime,
        stime: info.stime.unwrap_or(0),
        end_time: info.end_time.unwrap_or(0),
        array_queued: counts.queued,
        array_running: counts.running,
        array_finished: counts.finished,
    }
}

/// The status of job `seq` (`index` -1), or of task `index` of array `seq`.
/// Set `out->struct_size` first.
///
/// # Safety
/// `out` points to a writable `picloud_task_status` whose `struct_size` is set.
#[no_mangle]
pub unsafe extern "C" fn picloud_client_status(
    client: *mut picloud_client,
    seq: u64,
    index: i32,
    out: *mut picloud_task_status,
) -> c_int {
    boundary(|| {
        let c = client_of(client)?;
        // SAFETY: the caller promises a writable struct with struct_size set.
        unsafe { check_sized_out(out, "out") }?;
        let r = job_ref(seq, index)?;
        let request = ClientRequest::Stat(StatRequest {
            jobs: vec![r],
            include_finished: true,
            user: None,
            expand_arrays: false,
        });
        // A query changes nothing: across a restart of the server it is sent
        // again once the server is back.
        let reply =
            |client: &mut Client| client.request_reconnecting(RECONNECT_WINDOW, None, |_| request.clone());
        let status = c.with_jobs(&[seq], |client| match reply(client)? {
            ServerReply::Jobs { unknown, .. } if !unknown.is_empty() => {
                Err(FfiError::new(PICLOUD_ERR_UNKNOWN_JOB, format_args!("Unknown Job Id {r}")))
            }
            ServerReply::Jobs { jobs, .. } => match jobs.first() {
                Some(info) => Ok(status_of(info)),
                None => Err(FfiError::new(
                    PICLOUD_ERR_PROTOCOL,
                    format_args!("the server's reply has no job {r}"),
                )),
            },
            other => Err(unexpected("a status request", &other)),
        })?;
        // SAFETY: checked by check_sized_out; writable by the caller's promise.
        unsafe { write_out(out, status) };
        Ok(())
    })
}

// ---------------------------------------------------------------- cancel

/// Cancels job `seq` (`index` -1: the whole job or array) or one array task.
/// Running tasks are killed; cancelling a job that has already ended
/// succeeds and does nothing.
#[no_mangle]
pub extern "C" fn picloud_client_cancel(client: *mut picloud_client, seq: u64, index: i32) -> c_int {
    boundary(|| {
        let c = client_of(client)?;
        let r = job_ref(seq, index)?;
        c.with_jobs(&[seq], |client| match client.request(&ClientRequest::Cancel(vec![r]))? {
            ServerReply::Cancelled(outcomes) => match outcomes.first().map(|(_, o)| *o) {
                Some(RefOutcome::Done | RefOutcome::AlreadyFinished) => Ok(()),
                Some(RefOutcome::Unknown) => {
                    Err(FfiError::new(PICLOUD_ERR_UNKNOWN_JOB, format_args!("Unknown Job Id {r}")))
                }
                Some(RefOutcome::PermissionDenied) => Err(FfiError::new(
                    PICLOUD_ERR_PERMISSION_DENIED,
                    format_args!("job {r} belongs to another user"),
                )),
                Some(RefOutcome::NotApplicable) => Err(FfiError::new(
                    PICLOUD_ERR_SERVER,
                    format_args!("job {r} cannot be cancelled in its state"),
                )),
                None => Err(FfiError::new(PICLOUD_ERR_PROTOCOL, "the server's cancel reply is empty")),
            },
            other => Err(unexpected("a cancel", &other)),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(address_of(Some("  ")).is_err());
        assert_eq!(address_of(Some("host:1234")).unwrap(), ServerAddr::Tcp("host:1234".into()));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            address_of(dir.path().to_str()).unwrap(),
            ServerAddr::Unix(dir.path().join(picloud_proto::SOCKET_NAME))
        );
    }

    #[test]
    fn job_refs() {
        assert_eq!(job_ref(3, -1).unwrap(), JobRef::Job(3));
        assert_eq!(job_ref(3, 0).unwrap(), JobRef::Task(3, 0));
        assert_eq!(job_ref(3, -2).unwrap_err().code, PICLOUD_ERR_INVALID_ARGUMENT);
    }

    fn options() -> picloud_job_options {
        picloud_job_options {
            struct_size: std::mem::size_of::<picloud_job_options>() as u32,
            flags: 0,
            ncpus: 0,
            priority: 0,
            mem_bytes: 0,
            walltime_secs: 0,
            name: std::ptr::null(),
            array: std::ptr::null(),
            workdir: std::ptr::null(),
            stdout_path: std::ptr::null(),
            stderr_path: std::ptr::null(),
            env: std::ptr::null(),
            env_len: 0,
            depend_on: std::ptr::null(),
            depend_len: 0,
            depend_mode: 0,
        }
    }

    #[test]
    fn zeroed_options_are_the_defaults() {
        let o = options();
        // SAFETY: a valid struct with NULL pointers.
        let read = unsafe { read_options(&o) }.unwrap();
        let spec = job_spec(JobCommand::Argv(vec!["true".into()]), "true", read).unwrap();
        assert_eq!(spec.resources.ncpus, 1);
        assert_eq!(spec.resources.mem, None);
        assert!(spec.rerunnable && !spec.hold);
        assert_eq!(spec.workdir, std::env::current_dir().unwrap().to_string_lossy());
        let env: std::collections::HashMap<_, _> = spec.env.into_iter().collect();
        assert_eq!(env["PATH"], submit_env::CLEAN_PATH);
        assert!(env.contains_key("PBS_O_WORKDIR"));
    }

    #[test]
    fn options_are_applied() {
        let env = [c"A=1".as_ptr(), c"B=x=y".as_ptr()];
        let deps = [4u64, 5];
        let mut o = options();
        o.flags = PICLOUD_JOB_HOLD | PICLOUD_JOB_NO_RERUN;
        o.ncpus = 2;
        o.mem_bytes = 1 << 20;
        o.walltime_secs = 60;
        o.name = c"n".as_ptr();
        o.array = c"1-3".as_ptr();
        o.workdir = c"/tmp".as_ptr();
        o.stdout_path = c"out.txt".as_ptr();
        o.env = env.as_ptr();
        o.env_len = 2;
        o.depend_on = deps.as_ptr();
        o.depend_len = 2;
        o.depend_mode = PICLOUD_DEPEND_AFTERANY;
        // SAFETY: every pointer in o is valid for its length.
        let read = unsafe { read_options(&o) }.unwrap();
        let spec = job_spec(JobCommand::Argv(vec!["true".into()]), "true", read).unwrap();
        assert_eq!(spec.name, "n");
        assert!(spec.hold && !spec.rerunnable);
        assert_eq!(
            (spec.resources.ncpus, spec.resources.mem, spec.resources.walltime),
            (2, Some(1 << 20), Some(60))
        );
        assert_eq!(spec.array.unwrap().len(), 3);
        assert_eq!(spec.workdir, "/tmp");
        assert_eq!(spec.stdout.as_deref(), Some("/tmp/out.txt"));
        assert!(spec.env.contains(&("B".into(), "x=y".into())));
        assert_eq!(spec.depend.len(), 2);
        assert_eq!(spec.depend[1], Dependency { kind: DependKind::AfterAny, on: JobRef::Job(5) });
    }

    #[test]
    fn bad_options_are_refused() {
        let check = |o: picloud_job_options, needle: &str| {
            // SAFETY: every pointer in o is NULL or valid.
            let err = unsafe { read_options(&o) }.unwrap_err();
            assert_eq!(err.code, PICLOUD_ERR_INVALID_ARGUMENT);
            assert!(err.message.contains(needle), "{}", err.message);
        };
        let mut o = options();
        o.struct_size -= 8;
        check(o, "struct_size");
        let mut o = options();
        o.flags = 1 << 30;
        check(o, "unknown bits");
        let mut o = options();
        o.depend_mode = 9;
        check(o, "depend_mode");
        let mut o = options();
        o.array = c"5-1".as_ptr();
        check(o, "5-1");
        let env = [c"NOEQUALS".as_ptr()];
        let mut o = options();
        o.env = env.as_ptr();
        o.env_len = 1;
        check(o, "NAME=VALUE");
        let mut o = options();
        o.priority = 5000;
        check(o, "priority");
        let mut o = options();
        o.depend_len = 1;
        // SAFETY: the NULL pointer is refused before anything is read.
        let err = unsafe { read_options(&o) }.unwrap_err();
        assert_eq!(err.code, PICLOUD_ERR_NULL_POINTER);
    }
}
