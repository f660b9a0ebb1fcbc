//! Python tasks on the agent: a task of a [`JobCommand::Python`] job goes to a
//! warm worker of the [`WorkerPool`] instead of being started as a command,
//! and the segments of the node's [`SegmentStore`] are handed out to workers
//! and to local clients (`agent.sock`).
//!
//! A running Python task is a [`Task`] like any other, keyed by its worker's
//! pid: walltime timers, `Kill` and shutdown terminate the worker's process
//! group, and the worker's death ends the task. A task that returns ends when
//! its worker's `DONE` arrives; the worker lives on.
//!
//! What a task used comes from its worker's `/proc` files and cgroup, read
//! through a [`Probe`] that keeps them open while the worker lives: for a
//! short task, opening a file (a path walk) and closing it again cost more than
//! reading it, and were most of the agent's work per task.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use picloud_proto::{JobCommand, PythonOutcome, PythonStatus, ResourcesUsed, StartTask, TaskEnd, TaskId};
use tracing::{debug, warn};

use super::{Agent, Event, human_bytes};
use crate::cgroup::{JobCgroup, Limits};
use crate::launcher::{SETUP_FAILED, pbs_exit_status};
use crate::local_wire::LocalMsg;
use crate::shm::{Holder, Owner, SegmentStore};
use crate::workers::{PoolKey, WorkerEvent, WorkerId, WorkerPool};
use std::time::{Duration, Instant};

/// Most bytes of a task's stdout or stderr kept in its outcome (the worker caps
/// them already; this bounds a misbehaving worker).
const OUTPUT_CAP: usize = 1 << 20;

/// Default most processes (and threads) in a Python worker's cgroup: a fork
/// bomb fails inside it while the node stays usable.
pub(crate) const WORKER_PIDS_MAX: u64 = 4096;

/// The agent's Python side.
pub(super) struct PythonSide {
    pub(super) pool: WorkerPool,
    /// The node's shared-memory segments, when `/dev/shm` is usable.
    pub(super) store: Option<SegmentStore>,
    /// Each worker's cgroup, when workers get one.
    cgroups: HashMap<WorkerId, JobCgroup>,
    /// Worker running each Python task.
    by_task: HashMap<TaskId, WorkerId>,
    /// Each worker's open `/proc` and cgroup files, from its first task on.
    probes: HashMap<WorkerId, Probe>,
    /// Why a worker's socket broke, for its task's comment.
    broken: HashMap<WorkerId, String>,
    /// Jobs whose argument segments could not be held here, with why.
    unusable: HashMap<u64, String>,
    /// Local clients (`agent.sock`) by connection number.
    pub(super) clients: HashMap<u64, (UnixStream, u32, u32)>,
    /// The key under which workers cache each job's function.
    functions: FunctionKeys,
    next_cgroup: u64,
}

/// Keys for the distinct function pickles of the Python jobs defined here.
/// Jobs whose pickles are equal byte for byte share a key, so a worker that
/// has loaded the function for one job (say one `cloud.call`) does not
/// unpickle it again for the next: the loaded function object is reused, as
/// it is between the tasks of one map. A pickle is hashed once per job; each
/// distinct one is kept once while a job uses it, and the last
/// [`IDLE_FUNCTIONS`] that no job uses any more (of at most
/// [`IDLE_FUNCTION_MAX_BYTES`]) keep their keys too: a loop
/// of `cloud.call`s, whose every job is forgotten before the next one
/// arrives, keeps one key.
#[derive(Debug, Default)]
struct FunctionKeys {
    /// Key and number of jobs using it, by pickle.
    keys: HashMap<Arc<[u8]>, (u64, usize)>,
    /// Each job's key and pickle.
    jobs: HashMap<u64, (u64, Arc<[u8]>)>,
    /// The pickles that no job uses, oldest first (at most
    /// [`IDLE_FUNCTIONS`]).
    idle: VecDeque<Arc<[u8]>>,
    next: u64,
}

/// Most function pickles that no job uses kept under their keys.
const IDLE_FUNCTIONS: usize = 32;
/// Larger pickles (a function capturing a large object) are dropped once no
/// job uses them, so that idle ones take at most 32 MiB.
const IDLE_FUNCTION_MAX_BYTES: usize = 1 << 20;

impl FunctionKeys {
    /// The key of job `seq`'s function `pickle`.
    fn key(&mut self, seq: u64, pickle: &[u8]) -> u64 {
        if let Some(&(key, _)) = self.jobs.get(&seq) {
            return key;
        }
        let shared = match self.keys.get_key_value(pickle) {
            Some((shared, _)) => Arc::clone(shared),
            None => {
                self.next += 1;
                let shared: Arc<[u8]> = Arc::from(pickle);
                self.keys.insert(Arc::clone(&shared), (self.next, 0));
                shared
            }
        };
        let (key, users) = self.keys.get_mut(&shared).expect("inserted above");
        if *users == 0 {
            // In use again: no longer idle (if it was ever released).
            self.idle.retain(|p| !Arc::ptr_eq(p, &shared));
        }
        *users += 1;
        let key = *key;
        self.jobs.insert(seq, (key, shared));
        key
    }

    /// Job `seq` is gone: once no job uses its pickle, the pickle is idle
    /// (or dropped, over [`IDLE_FUNCTION_MAX_BYTES`]), and the oldest idle
    /// one beyond [`IDLE_FUNCTIONS`] is dropped.
    fn forget(&mut self, seq: u64) {
        let Some((_, pickle)) = self.jobs.remove(&seq) else { return };
        let Some((_, users)) = self.keys.get_mut(&pickle) else { return };
        *users -= 1;
        if *users > 0 {
            return;
        }
        if pickle.len() > IDLE_FUNCTION_MAX_BYTES {
            self.keys.remove(&pickle);
            return;
        }
        self.idle.push_back(pickle);
        if self.idle.len() > IDLE_FUNCTIONS {
            let oldest = self.idle.pop_front().expect("longer than the bound");
            self.keys.remove(&oldest);
        }
    }
}

impl PythonSide {
    pub(super) fn new(pool: WorkerPool, store: Option<SegmentStore>) -> Self {
        Self {
            pool,
            store,
            cgroups: HashMap::new(),
            by_task: HashMap::new(),
            probes: HashMap::new(),
            broken: HashMap::new(),
            unusable: HashMap::new(),
            clients: HashMap::new(),
            functions: FunctionKeys::default(),
            next_cgroup: 0,
        }
    }
}

/// A local client's request, read by its connection thread.
#[derive(Debug)]
pub(super) enum LocalEvent {
    /// A client connected; `uid`, `gid` from `SO_PEERCRED`.
    Connected { conn: u64, stream: UnixStream, uid: u32, gid: u32 },
    /// It sent a message.
    Message { conn: u64, msg: LocalMsg },
    /// It is gone (or spoke nonsense).
    Closed { conn: u64, error: Option<String> },
}

impl Agent {
    /// A job was defined here: hold its argument segments.
    pub(super) fn define_python(&mut self, seq: u64) {
        let Some(job) = self.jobs.get(&seq) else { return };
        let JobCommand::Python(call) = &job.def.spec.command else { return };
        let uid = job.def.uid;
        let Some(store) = self.python.store.as_mut() else {
            if !call.segments.is_empty() {
                self.python.unusable.insert(seq, "this node has no shared-memory store".into());
            }
            return;
        };
        for name in &call.segments {
            if let Err(e) = store.hold(name, Holder::Job(seq), uid) {
                store.release_all(Holder::Job(seq));
                self.python.unusable.insert(seq, format!("argument segment {name}: {e}"));
                return;
            }
        }
    }

    /// The job is forgotten here: its argument segments are free.
    pub(super) fn forget_python(&mut self, seq: u64) {
        self.python.unusable.remove(&seq);
        self.python.functions.forget(seq);
        if let Some(store) = self.python.store.as_mut() {
            store.release_all(Holder::Job(seq));
        }
    }

    /// The server forgot these jobs: their results' segments are free.
    pub(super) fn purge_results(&mut self, seqs: &[u64]) {
        if let Some(store) = self.python.store.as_mut() {
            for &seq in seqs {
                store.release_all(Holder::Result(seq));
            }
        }
    }

    /// Starts a task of a Python job on a warm worker.
    pub(super) fn start_python_task(&mut self, start: &StartTask) {
        let fail = |comment: String| TaskEnd {
            task: start.task,
            exit_status: SETUP_FAILED,
            comment: Some(comment),
            used: ResourcesUsed::default(),
            outcome: None,
        };
        let seq = start.task.seq;
        let Some(job) = self.jobs.get(&seq) else { return };
        let JobCommand::Python(call) = &job.def.spec.command else { return };
        if let Some(why) = self.python.unusable.get(&seq) {
            let comment = format!("cannot run the task here: {why}");
            return self.finished.push(fail(comment));
        }
        // The same rule as for commands: the agent's own user, or (a root
        // agent) the job's owner with their groups.
        let owner = match self.launcher.owner_of(&job.def) {
            Ok(owner) => owner,
            Err(e) => return self.finished.push(fail(e.to_string())),
        };
        let Some(args) = call.args_of(start.task.index) else {
            return self.finished.push(fail("the job has no arguments for this task".into()));
        };
        let key = PoolKey {
            uid: job.def.uid,
            gid: job.def.gid,
            interpreter: call.interpreter.clone(),
            sys_path: call.sys_path.clone(),
            mem_limit: job.def.spec.resources.mem,
        };
        let acquired = {
            let _guard = self.spawn_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.python.pool.acquire(&key, &start.cpus, &mut |cmd| match &owner {
                // The worker changes directory per task, as its owner.
                Some(owner) => Ok(Box::new(crate::launcher::run_as_owner(cmd, owner, None)?)),
                None => Ok(Box::new(())),
            })
        };
        let (worker, fresh) = match acquired {
            Ok(w) => w,
            Err(e) => return self.finished.push(fail(e.to_string())),
        };
        let pid = self.python.pool.get(worker).map(|w| w.pid).unwrap_or(0);
        if fresh {
            // The reaper may be waiting for a first child.
            let _ = self.spawned.send(());
            if let Some(cgroups) = &self.cgroups {
                let name = format!("worker-{}", self.python.next_cgroup);
                self.python.next_cgroup += 1;
                let limits = Limits {
                    memory: key.mem_limit,
                    memory_and_swap: key.mem_limit,
                    pids: Some(cgroups.job_pids_max().unwrap_or(WORKER_PIDS_MAX)),
                    ..Limits::default()
                };
                match cgroups.adopt(&name, &limits, pid) {
                    Ok(cg) => {
                        self.python.cgroups.insert(worker, cg);
                    }
                    Err(e) => {
                        self.python.pool.kill(worker, nix::sys::signal::Signal::SIGKILL);
                        return self.finished.push(fail(format!("cannot create the worker's cgroup: {e}")));
                    }
                }
            }
        }
        let job = &self.jobs[&seq];
        let JobCommand::Python(call) = &job.def.spec.command else { return };
        let spec = &job.def.spec;
        let mut env = spec.env.clone();
        env.push(("PICLOUD_JOB_ID".into(), start.job_id.clone()));
        let cgroup = self.python.cgroups.get(&worker);
        let probe = self
            .python
            .probes
            .entry(worker)
            .or_insert_with(|| Probe::open(pid, cgroup.and_then(JobCgroup::open_pids_current)));
        probe.task_starts();
        let function_key = self.python.functions.key(seq, &call.function);
        let sent = self.python.pool.dispatch(
            worker,
            start.task,
            function_key,
            &call.function,
            args,
            &spec.workdir,
            &env,
            call.kill_process,
        );
        if let Err(e) = sent {
            self.python.pool.kill(worker, nix::sys::signal::Signal::SIGKILL);
            self.python.broken.insert(worker, format!("cannot send the task to its worker: {e}"));
        }
        let walltime_limit = spec.resources.walltime;
        self.jobs.get_mut(&seq).expect("looked up above").running += 1;
        self.track(pid, start.task, walltime_limit, None, key.mem_limit);
        self.python.by_task.insert(start.task, worker);
        debug!(task = %start.job_id, pid, worker = worker.0, cpus = ?start.cpus, "Python task dispatched");
    }

    /// Something read from a worker's socket (`WorkerPool::read`).
    pub(super) fn on_worker(&mut self, event: WorkerEvent) {
        match event {
            WorkerEvent::Message(id, LocalMsg::Ready { pid, .. }) => {
                debug!(worker = id.0, pid, "Python worker ready");
            }
            WorkerEvent::Message(
                id,
                LocalMsg::Done { tag, status, result, error, traceback, stdout, stderr, segments },
            ) => {
                self.on_done(id, tag, status, result, error, traceback, stdout, stderr, segments);
            }
            WorkerEvent::Message(id, LocalMsg::SegmentCreate { size }) => self.on_worker_segment(id, size),
            WorkerEvent::Message(id, other) => {
                let why = format!("the Python worker sent an unexpected message: {}", other.name());
                self.break_worker(id, why);
            }
            WorkerEvent::Closed(id, error) => {
                let why = match error {
                    Some(e) => format!("the Python worker broke its protocol: {e}"),
                    None => "the Python worker closed its connection".into(),
                };
                self.break_worker(id, why);
            }
        }
    }

    fn break_worker(&mut self, id: WorkerId, why: String) {
        if self.python.pool.get(id).is_some() {
            self.python.broken.entry(id).or_insert(why);
            // Its death, once reaped, ends its task.
            self.python.pool.kill(id, nix::sys::signal::Signal::SIGKILL);
        }
    }

    fn on_worker_segment(&mut self, id: WorkerId, size: u64) {
        let Some(worker) = self.python.pool.get(id) else { return };
        let Some(busy) = worker.busy.clone() else {
            return self.break_worker(id, "the Python worker asked for a segment between tasks".into());
        };
        let owner = Owner { uid: worker.key.uid, gid: worker.key.gid };
        let reply = match self.python.store.as_mut() {
            None => LocalMsg::Error { message: "this node has no shared-memory store".into() },
            Some(store) => match store.create(owner, size, Holder::Task(busy.tag)) {
                Ok(info) => LocalMsg::Segment {
                    name: info.name,
                    path: info.path.display().to_string(),
                    size: info.size,
                },
                Err(e) => LocalMsg::Error { message: e.to_string() },
            },
        };
        let worker = self.python.pool.get_mut(id).expect("looked up above");
        if let Err(e) = worker.send(&reply) {
            self.break_worker(id, format!("cannot answer the Python worker: {e}"));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_done(
        &mut self,
        id: WorkerId,
        tag: u64,
        status: u8,
        value: Vec<u8>,
        error: String,
        traceback: String,
        mut stdout: Vec<u8>,
        mut stderr: Vec<u8>,
        segments: Vec<String>,
    ) {
        let Some(worker) = self.python.pool.get(id) else { return };
        let pid = worker.pid;
        let Some(busy) = worker.busy.clone().filter(|b| b.tag == tag) else {
            return self.break_worker(
                id,
                format!("the Python worker finished task tag {tag}, which it was not running"),
            );
        };
        let status = match status {
            0 => PythonStatus::Returned,
            1 => PythonStatus::Raised,
            2 => PythonStatus::LoadFailed,
            other => return self.break_worker(id, format!("the Python worker sent status {other}")),
        };
        let load_failed = status == PythonStatus::LoadFailed;
        let ended = self.python.probes.get_mut(&id).map_or(TaskUse::UNKNOWN, Probe::task_ends);
        let used = ResourcesUsed {
            cput_ms: ended.cput_ms,
            walltime_ms: busy.started.elapsed().as_millis() as u64,
            mem: ended.peak_rss,
        };
        // Leftovers of the task (children it started) die with it.
        if let Some(cg) = self.python.cgroups.get(&id).filter(|_| ended.maybe_others) {
            for other in cg.processes().into_iter().filter(|&p| p != pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(other),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        self.python.pool.finish(id, load_failed);
        self.python.by_task.remove(&busy.task);
        if let Some(store) = self.python.store.as_mut() {
            let uid = self.python.pool.get(id).map_or(0, |w| w.key.uid);
            for name in &segments {
                if let Err(e) = store.hold(name, Holder::Result(busy.task.seq), uid) {
                    warn!(task = ?busy.task, "cannot keep result segment {name}: {e}");
                }
            }
            store.release_all(Holder::Task(tag));
        }
        stdout.truncate(OUTPUT_CAP);
        stderr.truncate(OUTPUT_CAP);
        let comment = match status {
            PythonStatus::Returned => None,
            PythonStatus::Raised => Some(format!("the function raised {error}")),
            PythonStatus::LoadFailed => Some(format!("cannot load the task on this node: {error}")),
        };
        let outcome = PythonOutcome { status, value, error, traceback, stdout, stderr, segments };
        if let Some(task) = self.tasks.remove(&pid) {
            self.pids.remove(&task.id);
            let comment = task.killing.or(comment);
            self.finished.push(TaskEnd {
                task: task.id,
                exit_status: status.exit_status(),
                comment,
                used,
                outcome: Some(Box::new(outcome)),
            });
            self.task_ended(task.id.seq);
        }
    }

    /// A reaped child that was a worker; returns false if it was none.
    pub(super) fn python_exit(&mut self, pid: i32, status: i32) -> bool {
        // What it said before it died comes first (a `DONE` ends its task
        // as it ran, not as a crash).
        if let Some(id) = self.python.pool.by_pid(pid) {
            for event in self.python.pool.read(id) {
                self.on_worker(event);
            }
        }
        let Some(worker) = self.python.pool.remove_pid(pid) else { return false };
        let broken = self.python.broken.remove(&worker.id);
        self.python.probes.remove(&worker.id);
        let cgroup = self.python.cgroups.remove(&worker.id);
        let oom = cgroup.as_ref().map(|cg| (cg.usage().oom_kills > 0, cg.usage().peak_memory));
        if let Some(cg) = &cgroup {
            if let Err(e) = cg.kill_all().and_then(|()| cg.remove()) {
                warn!(worker = worker.id.0, "cannot clean up the worker's cgroup: {e}");
            }
        }
        if let Some(store) = self.python.store.as_mut() {
            if let Some(busy) = &worker.busy {
                store.release_all(Holder::Task(busy.tag));
            }
        }
        let Some(busy) = worker.busy else {
            debug!(worker = worker.id.0, pid, "idle Python worker exited");
            return true;
        };
        self.python.by_task.remove(&busy.task);
        let Some(task) = self.tasks.remove(&pid) else { return true };
        self.pids.remove(&task.id);
        let mut exit_status = pbs_exit_status(status);
        let comment = match (task.killing, oom) {
            (Some(killing), _) => killing,
            (None, Some((true, peak))) => {
                exit_status = picloud_proto::EXIT_CANCELLED;
                let limit = task.mem_limit.map(human_bytes).unwrap_or_else(|| "the node".into());
                format!(
                    "job exceeded its memory limit of {limit}; peak {}",
                    human_bytes(peak.unwrap_or_default())
                )
            }
            (None, _) => {
                let death = describe_wait_status(status);
                match broken {
                    Some(why) if !why.ends_with("closed its connection") => format!("{why}; {death}"),
                    _ => format!("the Python worker running the task {death}"),
                }
            }
        };
        self.finished.push(TaskEnd {
            task: task.id,
            exit_status,
            comment: Some(comment),
            used: ResourcesUsed {
                walltime_ms: task.started.elapsed().as_millis() as u64,
                ..Default::default()
            },
            outcome: None,
        });
        self.task_ended(task.id.seq);
        true
    }

    /// Kills every worker and waits (a few seconds at most) until they are
    /// reaped, so that their cgroups can go.
    pub(super) fn stop_workers(&mut self, events: &crossbeam_channel::Receiver<Event>) {
        self.python.pool.kill_all();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.python.pool.is_empty() {
            match events.recv_deadline(deadline) {
                Ok(Event::Exited(exit)) => {
                    self.python_exit(exit.pid, exit.status);
                }
                Ok(_) => {}
                Err(_) => {
                    warn!(workers = self.python.pool.len(), "Python workers not reaped in time");
                    break;
                }
            }
        }
    }

    /// A local client's event.
    pub(super) fn on_local(&mut self, event: LocalEvent) {
        match event {
            LocalEvent::Connected { conn, stream, uid, gid } => {
                self.python.clients.insert(conn, (stream, uid, gid));
            }
            LocalEvent::Closed { conn, error } => {
                if let Some(e) = error {
                    debug!(conn, "local client broke its protocol: {e}");
                }
                if let Some((stream, ..)) = self.python.clients.remove(&conn) {
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                }
                if let Some(store) = self.python.store.as_mut() {
                    store.release_all(Holder::Client(conn));
                }
            }
            LocalEvent::Message { conn, msg } => {
                let Some(&(_, uid, gid)) =
                    self.python.clients.get(&conn).map(|(s, u, g)| (s, *u, *g)).as_ref()
                else {
                    return;
                };
                let reply = match (self.python.store.as_mut(), msg) {
                    (None, _) => LocalMsg::Error { message: "this node has no shared-memory store".into() },
                    (Some(store), LocalMsg::SegmentCreate { size }) => {
                        match store.create(Owner { uid, gid }, size, Holder::Client(conn)) {
                            Ok(info) => LocalMsg::Segment {
                                name: info.name,
                                path: info.path.display().to_string(),
                                size: info.size,
                            },
                            Err(e) => LocalMsg::Error { message: e.to_string() },
                        }
                    }
                    // Answered with where the segment is, as a creation is.
                    (Some(store), LocalMsg::SegmentHold { name }) => {
                        match store.hold(&name, Holder::Client(conn), uid).and_then(|()| store.info(&name)) {
                            Ok(info) => LocalMsg::Segment {
                                name: info.name,
                                path: info.path.display().to_string(),
                                size: info.size,
                            },
                            Err(e) => LocalMsg::Error { message: e.to_string() },
                        }
                    }
                    (Some(store), LocalMsg::SegmentRelease { name }) => {
                        match store.release(&name, Holder::Client(conn)) {
                            Ok(_) => LocalMsg::Ok,
                            Err(e) => LocalMsg::Error { message: e.to_string() },
                        }
                    }
                    (Some(_), other) => {
                        LocalMsg::Error { message: format!("unexpected message {}", other.name()) }
                    }
                };
                if let Some((stream, ..)) = self.python.clients.get_mut(&conn) {
                    if crate::local_wire::write_msg(stream, &reply).and_then(|()| stream.flush()).is_err() {
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                    }
                }
            }
        }
    }

    /// Bookkeeping once a task of job `seq` ended.
    pub(super) fn task_ended(&mut self, seq: u64) {
        if let Some(job) = self.jobs.get_mut(&seq) {
            job.running -= 1;
            if job.forgotten && job.running == 0 {
                self.jobs.remove(&seq);
                self.launcher.forget(seq);
                self.forget_python(seq);
            }
        }
    }
}

/// "exited with status 3", "was killed by signal 11 (SIGSEGV)".
fn describe_wait_status(status: i32) -> String {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("was killed by signal {sig} ({})", s.as_str()),
            Err(_) => format!("was killed by signal {sig}"),
        }
    } else {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    }
}

/// Largest `/proc/<pid>/status` expected (about 1.5 KiB; longer with many
/// cpus); a longer file is read again into a larger buffer.
const PROC_FILE_BUF: usize = 4096;

/// One worker's `/proc` files and its cgroup's `pids.current`, open while the
/// worker lives, and read afresh for each task with one `pread` at offset 0
/// (procfs and cgroupfs render a file again for a read at offset 0). A file
/// that could not be opened reads as nothing: 0 CPU time or memory, and
/// perhaps leftovers (so the cgroup is listed, as without a `pids.current`).
#[derive(Debug)]
struct Probe {
    /// `/proc/<pid>/stat`: CPU ticks and threads.
    stat: Option<File>,
    /// `/proc/<pid>/status`: peak resident set size (`VmHWM`).
    status: Option<File>,
    /// `/proc/<pid>/clear_refs`: resets `VmHWM` to the current size.
    clear_refs: Option<File>,
    /// The worker's cgroup's `pids.current`: its processes and threads.
    pids_current: Option<File>,
    /// CPU ticks when the worker's last task ended: the baseline of its next
    /// task, since an idle worker waits for the next task without running.
    /// `None` before its first task (or when they could not be read).
    cpu_ticks: Option<u64>,
    /// Reused for every read.
    buf: Vec<u8>,
}

/// What a task used, as its worker's [`Probe`] saw it when the task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TaskUse {
    /// CPU time of the worker and its waited-for children during the task.
    cput_ms: u64,
    /// Peak resident set size of the worker during the task, in bytes.
    peak_rss: u64,
    /// Whether the worker's cgroup may hold other processes than the worker
    /// (leftovers of the task): it holds more processes and threads than the
    /// worker has threads, or either count is unknown.
    maybe_others: bool,
}

impl TaskUse {
    /// Nothing could be read.
    const UNKNOWN: Self = Self { cput_ms: 0, peak_rss: 0, maybe_others: true };
}

impl Probe {
    /// Opens the files of worker process `pid`, and takes the `pids.current`
    /// of its cgroup (see [`JobCgroup::open_pids_current`]).
    fn open(pid: i32, pids_current: Option<File>) -> Self {
        let open = |name: &str| File::open(format!("/proc/{pid}/{name}")).ok();
        Self {
            stat: open("stat"),
            status: open("status"),
            clear_refs: OpenOptions::new().write(true).open(format!("/proc/{pid}/clear_refs")).ok(),
            pids_current,
            cpu_ticks: None,
            buf: vec![0; PROC_FILE_BUF],
        }
    }

    /// A task is about to be sent: takes the CPU baseline if the last task
    /// left none, and resets the peak resident set size.
    fn task_starts(&mut self) {
        if self.cpu_ticks.is_none() {
            self.cpu_ticks = read_fresh(self.stat.as_ref(), &mut self.buf)
                .and_then(|s| parse_stat(&s))
                .map(|s| s.cpu_ticks);
        }
        if let Some(file) = &self.clear_refs {
            // "5": reset the peak resident set size.
            let _ = file.write_at(b"5", 0);
        }
    }

    /// The task's `DONE` arrived: what it used. Its end is the next task's
    /// CPU baseline.
    fn task_ends(&mut self) -> TaskUse {
        // pids.current right after the thread count, so that both describe
        // nearly the same moment. The worker itself starts no threads, but a
        // thread the task left running may start or end between the two
        // reads: the counts then differ for nothing (a listing of the cgroup
        // too many), or match while a leftover process is there, which is
        // then killed when the worker's next task ends, or with the worker.
        let stat = read_fresh(self.stat.as_ref(), &mut self.buf).and_then(|s| parse_stat(&s));
        let pids =
            read_fresh(self.pids_current.as_ref(), &mut self.buf).and_then(|s| s.trim().parse::<u64>().ok());
        let peak_rss = read_fresh(self.status.as_ref(), &mut self.buf).and_then(|s| parse_peak_rss(&s));
        let before = std::mem::replace(&mut self.cpu_ticks, stat.map(|s| s.cpu_ticks));
        let ticks = before.zip(stat).map_or(0, |(before, now)| now.cpu_ticks.saturating_sub(before));
        TaskUse {
            cput_ms: ticks * 1000 / clock_ticks(),
            peak_rss: peak_rss.unwrap_or(0),
            maybe_others: !matches!((pids, stat), (Some(pids), Some(stat)) if pids == stat.threads),
        }
    }
}

/// The text of `file` as it is now: one `pread` at offset 0 into `buf`, again
/// into a larger `buf` while the text fills it. `None` when there is no file
/// or it cannot be read (the process is gone).
fn read_fresh<'b>(file: Option<&File>, buf: &'b mut Vec<u8>) -> Option<Cow<'b, str>> {
    let file = file?;
    loop {
        let n = file.read_at(buf, 0).ok()?;
        if n < buf.len() {
            return Some(String::from_utf8_lossy(&buf[..n]));
        }
        buf.resize(buf.len() * 2, 0);
    }
}

/// What [`Probe`] needs of `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    /// User plus system CPU time of the process and its waited-for children,
    /// in clock ticks.
    cpu_ticks: u64,
    /// Threads of the process.
    threads: u64,
}

/// Parses the text of `/proc/<pid>/stat`.
fn parse_stat(stat: &str) -> Option<ProcStat> {
    // The command name (field 2) may hold spaces and parentheses: count the
    // fields after its last ')'. Fields 14 to 17 (utime, stime, cutime,
    // cstime) are the 12th to 15th after it, field 20 (num_threads) the 18th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let mut cpu_ticks = 0u64;
    for _ in 0..4 {
        cpu_ticks += fields.next()?.parse::<u64>().ok()?;
    }
    let threads = fields.nth(2)?.parse().ok()?;
    Some(ProcStat { cpu_ticks, threads })
}

/// The peak resident set size (`VmHWM`) in the text of `/proc/<pid>/status`,
/// in bytes.
fn parse_peak_rss(status: &str) -> Option<u64> {
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kb| kb * 1024)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    #[test]
    fn equal_pickles_share_a_key_while_used_or_recently_used() {
        let mut keys = FunctionKeys::default();
        let (f, g) = (b"pickle of f".as_slice(), b"pickle of g".as_slice());
        let a = keys.key(1, f);
        assert_eq!(keys.key(2, f), a, "the same function, another job");
        assert_eq!(keys.key(1, f), a, "asked again for the same job");
        let b = keys.key(3, g);
        assert_ne!(a, b);
        keys.forget(1);
        assert_eq!(keys.key(4, f), a, "job 2 still uses it");
        keys.forget(2);
        keys.forget(4);
        keys.forget(4);
        assert_eq!(keys.key(5, f), a, "no job uses it, but it was used last: the same key");
        assert_eq!(keys.key(3, g), b);
    }

    #[test]
    fn only_the_latest_idle_pickles_keep_their_keys() {
        let mut keys = FunctionKeys::default();
        let pickles: Vec<Vec<u8>> =
            (0..=IDLE_FUNCTIONS).map(|i| format!("pickle {i}").into_bytes()).collect();
        let first = keys.key(0, &pickles[0]);
        // Used, released, used and released again: one idle entry is stale.
        keys.forget(0);
        assert_eq!(keys.key(1, &pickles[0]), first);
        keys.forget(1);
        let mut seq = 2;
        for p in &pickles[1..] {
            keys.key(seq, p);
            keys.forget(seq);
            seq += 1;
        }
        // IDLE_FUNCTIONS + 1 distinct pickles went idle: the oldest is gone.
        assert!(!keys.keys.contains_key(pickles[0].as_slice()), "the oldest idle pickle is dropped");
        assert_eq!(keys.keys.len(), IDLE_FUNCTIONS);
        let again = keys.key(seq, &pickles[0]);
        assert!(again > first, "a new key, never one a worker may still cache for another pickle");
        // One in use is never dropped, however many go idle after it.
        keys.key(seq + 1, b"in use");
        for i in 0..2 * IDLE_FUNCTIONS as u64 {
            keys.key(seq + 2 + i, format!("other {i}").as_bytes());
            keys.forget(seq + 2 + i);
        }
        assert!(keys.keys.contains_key(b"in use".as_slice()));
        assert!(keys.keys.len() <= IDLE_FUNCTIONS + 2);

        // A large pickle is not kept once idle.
        let large = vec![7u8; IDLE_FUNCTION_MAX_BYTES + 1];
        let first = keys.key(1_000, &large);
        assert_eq!(keys.key(1_001, &large), first, "shared while in use");
        keys.forget(1_000);
        keys.forget(1_001);
        assert!(!keys.keys.contains_key(large.as_slice()));
        assert!(keys.key(1_002, &large) > first, "a new key");
    }

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 900 0 0 0 \
                    150 25 7 3 20 -5 4 0 12345 10000000 2000 18446744073709551615";
        assert_eq!(parse_stat(stat), Some(ProcStat { cpu_ticks: 185, threads: 4 }));
        assert_eq!(parse_stat("42 (short) S 1 2"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn peak_rss_is_read_from_vmhwm() {
        let status = "Name:\tpython3\nVmPeak:\t  30000 kB\nVmHWM:\t    9216 kB\nVmRSS:\t 8000 kB\n";
        assert_eq!(parse_peak_rss(status), Some(9216 * 1024));
        assert_eq!(parse_peak_rss("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn a_file_longer_than_the_buffer_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let text = "x".repeat(10_000);
        std::fs::write(dir.path().join("f"), &text).unwrap();
        let file = File::open(dir.path().join("f")).unwrap();
        let mut buf = vec![0; 16];
        assert_eq!(read_fresh(Some(&file), &mut buf).as_deref(), Some(text.as_str()));
        assert_eq!(read_fresh(None, &mut buf), None);
    }

    #[test]
    fn a_kept_open_proc_file_is_rendered_afresh_at_offset_zero() {
        let stat = File::open("/proc/self/stat").unwrap();
        let mut buf = vec![0; PROC_FILE_BUF];
        let first = read_fresh(Some(&stat), &mut buf).and_then(|s| parse_stat(&s)).unwrap();
        assert!(first.threads >= 1);
        // Burn CPU until the kernel has counted a tick more (10 ms at 100 Hz).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut spin = 0u64;
        loop {
            for i in 0..100_000u64 {
                spin = std::hint::black_box(spin.wrapping_mul(31).wrapping_add(i));
            }
            let now = read_fresh(Some(&stat), &mut buf).and_then(|s| parse_stat(&s)).unwrap();
            if now.cpu_ticks > first.cpu_ticks {
                break;
            }
            assert!(Instant::now() < deadline, "the CPU ticks read through one handle never changed");
        }
    }

    /// A Python process that does one step per line it reads: `hog` touches
    /// 64 MiB and frees them, `burn` uses about 0.3 s of CPU, anything else
    /// nothing; it answers each line when done.
    struct Child {
        child: std::process::Child,
        out: BufReader<std::process::ChildStdout>,
    }

    impl Child {
        fn start() -> Option<Self> {
            let script = "\
import sys, time
print('ready', flush=True)
for line in sys.stdin:
    if line.strip() == 'hog':
        b = b'\\x01' * (64 << 20)
        del b
    elif line.strip() == 'burn':
        t = time.process_time()
        while time.process_time() - t < 0.3:
            pass
    print('done', flush=True)
";
            let mut child = Command::new("python3")
                .args(["-c", script])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .ok()?;
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert_eq!(line, "ready\n");
            Some(Self { child, out })
        }

        fn step(&mut self, what: &str) {
            writeln!(self.child.stdin.as_mut().unwrap(), "{what}").unwrap();
            let mut line = String::new();
            self.out.read_line(&mut line).unwrap();
            assert_eq!(line, "done\n");
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn a_probe_measures_each_task_of_a_process_on_its_own() {
        let Some(mut child) = Child::start() else {
            assert!(std::env::var_os("PICLOUD_REQUIRE_PYTHON").is_none(), "python3 is required here");
            return eprintln!("no python3 here: skipped");
        };
        let dir = tempfile::tempdir().unwrap();
        let pids_path = dir.path().join("pids.current");
        // The process alone in its "cgroup": one thread, one pid.
        std::fs::write(&pids_path, "1\n").unwrap();
        let mut probe = Probe::open(child.child.id() as i32, Some(File::open(&pids_path).unwrap()));

        probe.task_starts();
        child.step("hog");
        let hog = probe.task_ends();
        assert!(hog.peak_rss >= 64 << 20, "{hog:?}");
        assert!(!hog.maybe_others, "{hog:?}");

        probe.task_starts();
        child.step("burn");
        let burn = probe.task_ends();
        assert!(burn.peak_rss < 48 << 20, "the peak was reset: {burn:?}");
        assert!((200..=1000).contains(&burn.cput_ms), "{burn:?}");

        // Another process (or thread) joined: the cgroup must be listed.
        std::fs::write(&pids_path, "2\n").unwrap();
        probe.task_starts();
        child.step("nothing");
        let idle = probe.task_ends();
        assert!(idle.cput_ms < 100, "the last task's CPU time is not counted again: {idle:?}");
        assert!(idle.maybe_others, "{idle:?}");

        // Without a pids.current, or once the process is gone, leftovers may be.
        let mut blind = Probe::open(child.child.id() as i32, None);
        blind.task_starts();
        assert!(blind.task_ends().maybe_others);
        drop(child);
        probe.task_starts();
        assert_eq!(probe.task_ends(), TaskUse::UNKNOWN);
    }
}
