//! Warm Python workers: processes running `python -m picloud.worker` that the
//! agent starts once and hands task after task (see `docs/workers.md`).
//!
//! A [`WorkerPool`] owns the workers of every user and interpreter on this
//! node. It is driven by one thread (the agent's main loop), which also
//! reads what the workers say: it polls the sockets of
//! [`WorkerPool::readable`] and calls [`WorkerPool::read`] for each that has
//! something, which decodes whole frames into [`WorkerEvent`]s without
//! blocking (no thread per worker, so a message costs no thread switch).
//!
//! 1. [`WorkerPool::acquire`] finds an idle worker of the task's
//!    [`PoolKey`], preferring one already pinned to the task's cpus (another is
//!    re-pinned with `sched_setaffinity`), or starts a new one, first stopping
//!    the least recently used idle worker when the node's cap is reached.
//! 2. [`WorkerPool::dispatch`] writes the task; a worker that already holds the
//!    task's function is sent only its key ([`FUNCTION_CACHE`] mirrors the
//!    worker's own cache).
//! 3. The worker answers `DONE`, after perhaps asking for shared-memory
//!    segments on the way; [`WorkerPool::finish`] makes it idle again, or
//!    retires it when the task asked for a fresh process.
//! 4. A worker that dies is reaped by the agent's reaper like any child;
//!    [`WorkerPool::remove_pid`] forgets it and says which task it was running.
//!
//! The pool starts processes but never waits for them: the agent's reaper
//! does, under the spawn lock the caller holds around [`WorkerPool::acquire`].

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sched::{CpuSet, sched_setaffinity};
use nix::sys::signal::{Signal, killpg};
use nix::sys::socket::{MsgFlags, recv};
use nix::unistd::Pid;
use picloud_proto::TaskId;
use tracing::{debug, warn};

use crate::local_wire::{Direction, LocalMsg, decode_frame, write_msg};

/// How many functions a worker keeps loaded; the same number as the worker's
/// own cache (`python/picloud/worker.py`, `FUNCTION_CACHE_SIZE`).
pub const FUNCTION_CACHE: usize = 16;

/// How long a write to a worker may block before the worker counts as hung.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The file descriptor of the worker's end of its socket.
const WORKER_FD: i32 = 3;

/// Workers are interchangeable only within one key: same user, interpreter,
/// import path and memory limit (a worker's cgroup carries the limit).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The user the worker runs as.
    pub uid: u32,
    /// Their primary group.
    pub gid: u32,
    /// The interpreter (`sys.executable` of the client).
    pub interpreter: String,
    /// `PYTHONPATH` entries.
    pub sys_path: Vec<String>,
    /// Memory limit of the worker's cgroup, in bytes.
    pub mem_limit: Option<u64>,
}

/// Identifies a worker for its lifetime (pids are reused; these are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u64);

/// What [`WorkerPool::read`] finds.
#[derive(Debug)]
pub enum WorkerEvent {
    /// A message from the worker.
    Message(WorkerId, LocalMsg),
    /// The worker's socket closed (`None`) or carried something unreadable.
    Closed(WorkerId, Option<String>),
}

/// Sets up a worker's process before it runs: the user it runs as, its
/// cgroup. Called with the command before it is spawned; what it returns is
/// kept until the spawn is over (e.g. a guard holding the calling thread in a
/// cgroup).
pub type Prepare<'a> = &'a mut dyn FnMut(&mut Command) -> io::Result<Box<dyn std::any::Any>>;

/// A task a worker is running.
#[derive(Debug, Clone)]
pub struct Busy {
    /// The task.
    pub task: TaskId,
    /// Its tag in the worker protocol.
    pub tag: u64,
    /// When it was sent.
    pub started: Instant,
    /// Replace the worker afterwards.
    pub kill_process: bool,
    /// The key its function was sent under.
    pub function_key: u64,
}

/// One worker process.
#[derive(Debug)]
pub struct Worker {
    /// Its id.
    pub id: WorkerId,
    /// Its pid, also its process group.
    pub pid: i32,
    /// The pool it belongs to.
    pub key: PoolKey,
    /// The cpus it is pinned to.
    pub cpus: Vec<u32>,
    /// What it runs now.
    pub busy: Option<Busy>,
    /// Function keys it holds, least recently used first.
    functions: VecDeque<u64>,
    /// The agent's end of its socket: blocking writes (with a timeout),
    /// reads that never block (`MSG_DONTWAIT`).
    stream: UnixStream,
    /// Bytes read from the worker that do not make a whole frame yet.
    inbox: Vec<u8>,
    /// Its socket ended or carried garbage: nothing more is read.
    closed: bool,
    /// When it last finished a task (or started).
    idle_since: Instant,
    /// Told to exit; no more tasks.
    retiring: bool,
}

impl Worker {
    /// Sends a message; a worker that cannot take it is broken.
    pub fn send(&mut self, msg: &LocalMsg) -> io::Result<()> {
        write_msg(&mut self.stream, msg)
    }
}

/// Every worker on the node.
pub struct WorkerPool {
    workers: HashMap<WorkerId, Worker>,
    by_pid: HashMap<i32, WorkerId>,
    idle: HashMap<PoolKey, Vec<WorkerId>>,
    next_id: u64,
    next_tag: u64,
    /// Most workers alive at once.
    cap: usize,
    /// Prepended to every worker's `PYTHONPATH` (where `picloud` itself lives).
    extra_path: Option<String>,
    /// The directory of the node's segments, told to workers as `PICLOUD_SHM_DIR`.
    shm_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").field("workers", &self.workers.len()).field("cap", &self.cap).finish()
    }
}

/// Why a worker could not be had.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// The socket pair could not be made.
    #[error("cannot create a socket for a Python worker: {0}")]
    Socket(io::Error),
    /// The interpreter could not be started.
    #[error("cannot start the Python interpreter '{interpreter}': {error}")]
    Spawn {
        /// The interpreter.
        interpreter: String,
        /// The cause.
        error: io::Error,
    },
    /// The worker could not be pinned.
    #[error("cannot pin a Python worker to cpus {cpus:?}: {error}")]
    Pin {
        /// The cpus.
        cpus: Vec<u32>,
        /// The cause.
        error: nix::Error,
    },
}

impl WorkerPool {
    /// A pool of at most `cap` workers (at least one), delivering worker
    /// messages to `sink`. `extra_path` is put first on every worker's import
    /// path: the directory holding the `picloud` package, when the client's
    /// own path may lack it.
    pub fn new(cap: usize, extra_path: Option<String>) -> Self {
        Self {
            workers: HashMap::new(),
            by_pid: HashMap::new(),
            idle: HashMap::new(),
            next_id: 0,
            next_tag: 0,
            cap: cap.max(1),
            extra_path,
            shm_dir: None,
        }
    }

    /// Tells workers started from now on where the node's segments are.
    pub fn set_shm_dir(&mut self, dir: std::path::PathBuf) {
        self.shm_dir = Some(dir);
    }

    /// The worker `id`, if alive.
    pub fn get(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id)
    }

    /// The worker `id`, if alive.
    pub fn get_mut(&mut self, id: WorkerId) -> Option<&mut Worker> {
        self.workers.get_mut(&id)
    }

    /// The worker with this pid.
    pub fn by_pid(&self, pid: i32) -> Option<WorkerId> {
        self.by_pid.get(&pid).copied()
    }

    /// Live workers.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether no worker is alive.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Pids of every live worker.
    pub fn pids(&self) -> impl Iterator<Item = i32> + '_ {
        self.workers.values().map(|w| w.pid)
    }

    /// Step 1: an idle worker of `key` pinned to `cpus`, started if need be.
    /// `prepare` sets up a new worker's process (see [`Prepare`]); the caller
    /// holds the spawn lock.
    pub fn acquire(
        &mut self,
        key: &PoolKey,
        cpus: &[u32],
        prepare: Prepare<'_>,
    ) -> Result<(WorkerId, bool), AcquireError> {
        if let Some(id) = self.take_idle(key, cpus) {
            let worker = self.workers.get_mut(&id).expect("idle workers are alive");
            if worker.cpus != cpus {
                pin(worker.pid, cpus).map_err(|error| AcquireError::Pin { cpus: cpus.to_vec(), error })?;
                worker.cpus = cpus.to_vec();
            }
            return Ok((id, false));
        }
        while self.workers.len() >= self.cap {
            let Some(oldest) = self.oldest_idle() else { break };
            self.retire(oldest);
        }
        self.start(key, cpus, prepare).map(|id| (id, true))
    }

    fn take_idle(&mut self, key: &PoolKey, cpus: &[u32]) -> Option<WorkerId> {
        let idle = self.idle.get_mut(key)?;
        let at = idle.iter().rposition(|id| self.workers[id].cpus == cpus).or(idle.len().checked_sub(1))?;
        Some(idle.swap_remove(at))
    }

    fn oldest_idle(&self) -> Option<WorkerId> {
        self.idle.values().flatten().min_by_key(|id| self.workers[*id].idle_since).copied()
    }

    fn start(&mut self, key: &PoolKey, cpus: &[u32], prepare: Prepare<'_>) -> Result<WorkerId, AcquireError> {
        let (ours, theirs) = UnixStream::pair().map_err(AcquireError::Socket)?;
        let theirs: OwnedFd = theirs.into();
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&key.interpreter);
        cmd.args(["-m", "picloud.worker"]);
        let path = self.extra_path.iter().chain(&key.sys_path).filter(|p| !p.is_empty());
        let path = path.cloned().collect::<Vec<_>>().join(":");
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("PYTHONPATH", path)
            .env("PICLOUD_WORKER_FD", WORKER_FD.to_string())
            .stdin(Stdio::null())
            .process_group(0);
        if let Some(dir) = &self.shm_dir {
            cmd.env("PICLOUD_SHM_DIR", dir);
        }
        // SAFETY: dup2 and fcntl are async-signal-safe and touch only file
        // descriptors; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if fd == WORKER_FD {
                    // Already in place: only the close-on-exec flag must go.
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, WORKER_FD) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawn_err = |error| AcquireError::Spawn { interpreter: key.interpreter.clone(), error };
        let guard = prepare(&mut cmd).map_err(spawn_err)?;
        let child = cmd.spawn().map_err(spawn_err)?;
        drop(guard);
        drop(theirs);
        let pid = child.id() as i32;
        // The agent's reaper reaps it; dropping the handle neither waits nor kills.
        drop(child);
        if let Err(error) = pin(pid, cpus) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(AcquireError::Pin { cpus: cpus.to_vec(), error });
        }
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        if let Err(e) = ours.set_write_timeout(Some(WRITE_TIMEOUT)) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(AcquireError::Socket(e));
        }
        debug!(worker = id.0, pid, interpreter = %key.interpreter, ?cpus, "Python worker started");
        self.workers.insert(
            id,
            Worker {
                id,
                pid,
                key: key.clone(),
                cpus: cpus.to_vec(),
                busy: None,
                functions: VecDeque::new(),
                stream: ours,
                inbox: Vec::new(),
                closed: false,
                idle_since: Instant::now(),
                retiring: false,
            },
        );
        self.by_pid.insert(pid, id);
        Ok(id)
    }

    /// Step 2: sends worker `id` its task. `function` is sent only when the
    /// worker does not hold `function_key` yet. On error the worker is broken:
    /// the caller should kill it.
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch(
        &mut self,
        id: WorkerId,
        task: TaskId,
        function_key: u64,
        function: &[u8],
        args: &[u8],
        workdir: &str,
        env: &[(String, String)],
        kill_process: bool,
    ) -> io::Result<u64> {
        let tag = self.next_tag;
        self.next_tag += 1;
        let worker = self.workers.get_mut(&id).ok_or_else(|| io::Error::other("no such worker"))?;
        let known = match worker.functions.iter().position(|&k| k == function_key) {
            Some(at) => {
                worker.functions.remove(at);
                true
            }
            None => false,
        };
        worker.functions.push_back(function_key);
        if worker.functions.len() > FUNCTION_CACHE {
            worker.functions.pop_front();
        }
        worker.busy = Some(Busy { task, tag, started: Instant::now(), kill_process, function_key });
        let msg = LocalMsg::Task {
            tag,
            function_key,
            function: if known { Vec::new() } else { function.to_vec() },
            args: args.to_vec(),
            workdir: workdir.to_string(),
            env: env.to_vec(),
        };
        worker.send(&msg)?;
        Ok(tag)
    }

    /// Step 3: worker `id` finished its task; returns it. The worker goes back
    /// to its pool, or is retired if the task asked for that. A task whose
    /// function did not load leaves the function out of the worker's cache.
    pub fn finish(&mut self, id: WorkerId, function_failed: bool) -> Option<Busy> {
        let worker = self.workers.get_mut(&id)?;
        let busy = worker.busy.take()?;
        if function_failed {
            worker.functions.retain(|&k| k != busy.function_key);
        }
        worker.idle_since = Instant::now();
        if busy.kill_process || worker.retiring {
            self.retire(id);
        } else {
            self.idle.entry(worker.key.clone()).or_default().push(id);
        }
        Some(busy)
    }

    /// Asks worker `id` to exit (it leaves the pool now, and is reaped later).
    pub fn retire(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.get_mut(&id) else { return };
        if let Some(idle) = self.idle.get_mut(&worker.key) {
            idle.retain(|&w| w != id);
        }
        worker.retiring = true;
        if worker.send(&LocalMsg::Exit).is_err() {
            let _ = killpg(Pid::from_raw(worker.pid), Signal::SIGKILL);
        }
    }

    /// Kills worker `id`'s whole process group now.
    pub fn kill(&mut self, id: WorkerId, signal: Signal) {
        if let Some(worker) = self.workers.get_mut(&id) {
            if let Some(idle) = self.idle.get_mut(&worker.key) {
                idle.retain(|&w| w != id);
            }
            worker.retiring = true;
            let _ = killpg(Pid::from_raw(worker.pid), signal);
        }
    }

    /// Step 4: the process `pid` is gone; forgets its worker and returns it.
    pub fn remove_pid(&mut self, pid: i32) -> Option<Worker> {
        let id = self.by_pid.remove(&pid)?;
        let worker = self.workers.remove(&id)?;
        if let Some(idle) = self.idle.get_mut(&worker.key) {
            idle.retain(|&w| w != id);
        }
        // Its socket closes with it (dropped by the caller).
        let _ = worker.stream.shutdown(std::net::Shutdown::Both);
        Some(worker)
    }

    /// Tells every worker to exit (the agent is stopping).
    pub fn retire_all(&mut self) {
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.retire(id);
        }
    }

    /// The workers whose sockets may still say something, to poll for reading.
    pub fn readable(&self) -> impl Iterator<Item = (WorkerId, BorrowedFd<'_>)> + '_ {
        self.workers.values().filter(|w| !w.closed).map(|w| (w.id, w.stream.as_fd()))
    }

    /// Reads, without blocking, what worker `id` has sent, and returns every
    /// whole message in order; then `Closed` if its socket ended (`None`: a
    /// clean end or a reset, the worker's exit status says why) or carried
    /// something unreadable. Nothing for a worker gone or closed.
    pub fn read(&mut self, id: WorkerId) -> Vec<WorkerEvent> {
        let mut out = Vec::new();
        let Some(worker) = self.workers.get_mut(&id).filter(|w| !w.closed) else { return out };
        let end = match read_available(worker.stream.as_fd(), |bytes| worker.inbox.extend_from_slice(bytes)) {
            Ok(false) => None,
            // A reset is the worker dying: its exit status says why.
            Ok(true) | Err(Errno::ECONNRESET) => Some(None),
            Err(e) => Some(Some(format!("cannot read from the Python worker: {e}"))),
        };
        let mut used = 0;
        loop {
            match decode_frame(&worker.inbox[used..], Direction::ToAgent) {
                Ok(Some((msg, n))) => {
                    used += n;
                    out.push(WorkerEvent::Message(id, msg));
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(worker = id.0, "unreadable message from a Python worker: {e}");
                    worker.closed = true;
                    worker.inbox = Vec::new();
                    out.push(WorkerEvent::Closed(id, Some(e.to_string())));
                    return out;
                }
            }
        }
        worker.inbox.drain(..used);
        if let Some(why) = end {
            worker.closed = true;
            let why = why.or_else(|| {
                (!worker.inbox.is_empty())
                    .then(|| "the worker closed its socket in the middle of a frame".into())
            });
            out.push(WorkerEvent::Closed(id, why));
        }
        out
    }

    /// Waits up to `timeout` until worker `id` has something to say, then
    /// reads it as [`WorkerPool::read`] does (nothing on a timeout). For
    /// callers that drive one worker alone; the agent polls all at once.
    pub fn wait(&mut self, id: WorkerId, timeout: Duration) -> io::Result<Vec<WorkerEvent>> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let ready = {
            let Some((_, fd)) = self.readable().find(|(w, _)| *w == id) else { return Ok(Vec::new()) };
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::NONE);
            poll(&mut fds, ms).map_err(io::Error::from)?
        };
        Ok(if ready > 0 { self.read(id) } else { Vec::new() })
    }

    /// SIGKILLs every worker.
    pub fn kill_all(&mut self) {
        for worker in self.workers.values() {
            let _ = killpg(Pid::from_raw(worker.pid), Signal::SIGKILL);
        }
    }
}

/// Reads from socket `fd`, without blocking, what has arrived (up to a read
/// that does not fill the buffer: callers poll, level-triggered, and come
/// back for the rest), passing it to `push`; returns whether the stream
/// ended (the peer closed it).
pub(crate) fn read_available(fd: BorrowedFd<'_>, push: impl FnMut(&[u8])) -> Result<bool, Errno> {
    READ_BUFFER.with_borrow_mut(|buf| read_available_into(fd, buf, push))
}

thread_local! {
    /// The buffer of [`read_available`], zeroed once per thread rather than
    /// before every read (64 KiB of zeroes per read cost more than the read
    /// of a short message, and pushed the caller's data out of the cache).
    static READ_BUFFER: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; 64 * 1024].into_boxed_slice());
}

fn read_available_into(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    mut push: impl FnMut(&[u8]),
) -> Result<bool, Errno> {
    loop {
        match recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return Ok(true),
            // A short read emptied the socket for now; `poll` says when
            // more comes (a read until EAGAIN would cost one more call).
            Ok(n) if n < buf.len() => {
                push(&buf[..n]);
                return Ok(false);
            }
            Ok(n) => push(&buf[..n]),
            Err(Errno::EAGAIN) => return Ok(false),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Pins every thread the process `pid` starts from now on, and its main
/// thread, to `cpus`; an empty list leaves it alone.
fn pin(pid: i32, cpus: &[u32]) -> nix::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu as usize)?;
    }
    sched_setaffinity(Pid::from_raw(pid), &set)
}
