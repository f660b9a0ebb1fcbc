//! Python tasks on the agent: a task of a [`JobCommand::Python`] job goes to a
//! warm worker of the [`WorkerPool`] instead of being started as a command,
//! and the segments of the node's [`SegmentStore`] are handed out to workers
//! and to local clients (`agent.sock`).
//!
//! A running Python task is a [`Task`] like any other, keyed by its worker's
//! pid: walltime timers, `Kill` and shutdown terminate the worker's process
//! group, and the worker's death ends the task. A task that returns ends when
//! its worker's `DONE` arrives; the worker lives on.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;

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
    /// Baselines taken when a task was dispatched: worker CPU ticks.
    cpu_before: HashMap<WorkerId, u64>,
    /// Why a worker's socket broke, for its task's comment.
    broken: HashMap<WorkerId, String>,
    /// Jobs whose argument segments could not be held here, with why.
    unusable: HashMap<u64, String>,
    /// Local clients (`agent.sock`) by connection number.
    pub(super) clients: HashMap<u64, (UnixStream, u32, u32)>,
    next_cgroup: u64,
}

impl PythonSide {
    pub(super) fn new(pool: WorkerPool, store: Option<SegmentStore>) -> Self {
        Self {
            pool,
            store,
            cgroups: HashMap::new(),
            by_task: HashMap::new(),
            cpu_before: HashMap::new(),
            broken: HashMap::new(),
            unusable: HashMap::new(),
            clients: HashMap::new(),
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
        self.python.cpu_before.insert(worker, proc_cpu_ticks(pid));
        reset_peak_rss(pid);
        let sent = self.python.pool.dispatch(
            worker,
            start.task,
            seq,
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

    /// A worker's reader thread reported something.
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
        let failed_key = (status == PythonStatus::LoadFailed).then_some(busy.task.seq);
        let cpu_before = self.python.cpu_before.remove(&id).unwrap_or(0);
        let used = ResourcesUsed {
            cput_ms: proc_cpu_ticks(pid).saturating_sub(cpu_before) * 1000 / clock_ticks(),
            walltime_ms: busy.started.elapsed().as_millis() as u64,
            mem: peak_rss(pid),
        };
        // Leftovers of the task (children it started) die with it.
        if let Some(cg) = self.python.cgroups.get(&id) {
            for other in cg.processes().into_iter().filter(|&p| p != pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(other),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        self.python.pool.finish(id, failed_key);
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
        let Some(worker) = self.python.pool.remove_pid(pid) else { return false };
        let broken = self.python.broken.remove(&worker.id);
        self.python.cpu_before.remove(&worker.id);
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
                    (Some(store), LocalMsg::SegmentHold { name }) => {
                        match store.hold(&name, Holder::Client(conn), uid) {
                            Ok(_) => LocalMsg::Ok,
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

/// Forwards worker events into the agent's event channel.
pub(super) fn sink(events: crossbeam_channel::Sender<Event>) -> crate::workers::Sink {
    std::sync::Arc::new(move |e| {
        let _ = events.send(Event::Worker(e));
    })
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

/// User plus system CPU time of process `pid` and its waited-for children, in
/// clock ticks; 0 when it cannot be read.
fn proc_cpu_ticks(pid: i32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // The command name (field 2) may hold spaces: count fields after its ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return 0 };
    // Fields 14 to 17 (utime, stime, cutime, cstime) are the 12th to 15th after it.
    rest.split_whitespace().skip(11).take(4).filter_map(|f| f.parse::<u64>().ok()).sum()
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// Resets the peak resident set size of `pid` (`VmHWM`) to its current size.
fn reset_peak_rss(pid: i32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Peak resident set size of `pid` since the last reset, in bytes.
fn peak_rss(pid: i32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
