//! Cgroups for jobs on either cgroup version, and a pool of them that tasks
//! reuse one after another.
//!
//! [`Cgroups::detect`] reads `/proc/self/mountinfo` and `/proc/self/cgroup` and
//! finds where the agent may create cgroups: below its own cgroup in the
//! unified (v2) hierarchy when that has the memory controller, else below its
//! own cgroup in each v1 controller hierarchy (memory, cpuset, cpu, cpuacct,
//! pids). Every path is taken from those files, so tests point the same code
//! at fixture directories with [`Cgroups::v1_at`] and [`Cgroups::v2_at`].
//!
//! | limit | v2 file | v1 file |
//! |---|---|---|
//! | memory | `memory.max` | `memory.limit_in_bytes` |
//! | memory + swap | `memory.swap.max` (the swap part) | `memory.memsw.limit_in_bytes` |
//! | cpus, NUMA nodes | `cpuset.cpus`, `cpuset.mems` | same names |
//! | CPU quota | `cpu.max` | `cpu.cfs_quota_us`, `cpu.cfs_period_us` |
//! | processes | `pids.max` | `pids.max` |
//!
//! # One cgroup per process: [`Cgroups::create`]
//!
//! A cgroup is created with its limits written before any process joins it
//! ([`Cgroups::create`], or [`Cgroups::adopt`] which also moves a running
//! process in); its owner reads its peak memory, CPU time and OOM kills
//! ([`JobCgroup::usage`]), kills whatever is left ([`JobCgroup::kill_all`]) and
//! removes it ([`JobCgroup::remove`]). Fine for long-lived processes; too dear
//! for every task (below).
//!
//! # The pool: a cgroup for every task
//!
//! Creating and removing a cgroup per task, and moving the launching thread in
//! and out of it (on v1 every move takes the kernel's cgroup threadgroup
//! rwsem), cost more than starting a short task: an array of 10 000 `true`
//! tasks fell to 35 % of the fork+exec floor. So command tasks run in *pooled*
//! cgroups, kept when their task ends and reused by the next task on the same
//! cpus:
//!
//! 1. [`Cgroups::acquire`] takes an idle cgroup made for the same cpus, or
//!    makes one (`slot-N`); of the limits it writes only those that differ
//!    from its previous task's.
//! 2. On v1 each pooled cgroup has a *spawner thread*: an agent thread that
//!    wrote itself into the cgroup's `tasks` files and pinned itself to its
//!    cpus once, when the cgroup was made. [`Spawner::run`] hands that thread a
//!    closure (the launcher's spawn) and waits for its result, so a child
//!    starts inside the cgroup and pinned from its first instruction, with no
//!    cgroup move, affinity change, `mkdir` or `rmdir` per task. On v2 a
//!    domain cgroup holds whole processes, never a single thread of the agent,
//!    so there is no spawner: the child writes itself into `cgroup.procs`
//!    between fork and exec (the launcher's `ChildSetup::join_cgroup`).
//! 3. [`Cgroups::release`], once the task's main process is reaped, kills what
//!    the task left in the cgroup and waits until it is empty, reads what the
//!    task used, and readies the cgroup for the next task: counters that can
//!    be reset are (v1: `memory.max_usage_in_bytes`, `cpuacct.usage`; v2:
//!    `memory.peak` through the descriptor that read it, on kernels from 6.12),
//!    the others get a baseline (OOM kills; v2's `cpu.stat`). The counter files
//!    stay open, and are read with one `pread` each (cgroupfs renders a file
//!    afresh for a read at offset 0). A cgroup that cannot be emptied is never
//!    reused; at most [`idle_max`] idle cgroups are kept, any more are removed.
//! 4. [`Cgroups::remove_base`] stops the spawner threads and removes every
//!    pooled cgroup and the base directories: nothing is left behind.
//!
//! An agent killed before it could do step 4 leaves its cgroups: the next
//! agent started beside them removes those of agents that are gone and that
//! hold no process any more ([`Cgroups::sweep_stale`]).
//!
//! The spawner thread is a member of its cgroup, and shows: it counts in
//! `pids.current` (so `pids.max` is written one higher than the job's limit),
//! the agent's pid is listed in its `cgroup.procs` (so [`JobCgroup::processes`]
//! never lists the agent itself, and the kills never reach it), and the CPU time
//! of the fork that starts a task is charged to that task. Being in the task's
//! cpuset, it shares the task's cpus: after the spawn it must still run to hand
//! the child back, and at the same weight as the fresh task it would wait
//! for the task's time slice (for a short task, its end), leaving the agent's
//! main loop blocked. So it runs at nice `SPAWNER_NICE` (-10), with
//! `SCHED_RESET_ON_FORK` so that its children start at nice 0 like any job.
//! That boost counts only against its own task: each pooled cgroup is in the
//! `cpu` controller too, where it competes with the rest of the machine as
//! one group. (Measured with `bench/throughput.sh`, see `bench/README.md`:
//! with the pooled cgroups out of the `cpu` controller, and the spawner
//! threads boosted against every process of the node, arrays ran about 4 %
//! faster but separate `qsub` calls 10 to 14 % slower.)
//!
//! Memory: a pooled cgroup keeps the page cache its earlier tasks left
//! charged to it (reclaiming it with `memory.force_empty` would evict input
//! files the next tasks are about to read again), so a task's peak is the
//! cgroup's peak *above* its use when the task started. That undercounts a
//! task only by what of that cache the kernel reclaimed to make room for it.
//! On v2 without a resettable `memory.peak` (kernels before 6.12) the peak
//! reported is the cgroup's highest so far: an upper bound.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Period of the CPU quota, in microseconds (the kernel's default, 100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Most processes and threads of one job at once (its cgroup's `pids.max`)
/// unless the agent is told otherwise ([`Cgroups::with_job_pids_max`]): room
/// for a parallel build on many cores, while a fork bomb stays inside its job.
pub const DEFAULT_JOB_PIDS_MAX: u64 = 4096;

/// Stack of a spawner thread: it only calls `Command::spawn`.
const SPAWNER_STACK: usize = 256 * 1024;

/// Nice value of the spawner threads (their children start at 0: see
/// [`Spawner::start`]).
const SPAWNER_NICE: libc::c_int = -10;

/// Largest counter file read (v2's `cpu.stat` is the longest, about 200 bytes).
const COUNTER_FILE_MAX: usize = 1024;

/// How many times [`JobCgroup::kill_all`] and [`Cgroups::release`] look for
/// processes left in a cgroup, [`KILL_PAUSE`] apart, before giving up.
const KILL_ATTEMPTS: u32 = 100;

/// Pause between two attempts to empty a cgroup.
const KILL_PAUSE: Duration = Duration::from_millis(2);

/// How long the removal of a cgroup (all its directories) waits for the
/// kernel to let go of processes that have just exited.
const REMOVE_PATIENCE: Duration = Duration::from_secs(2);

/// Most idle pooled cgroups kept (each with its spawner thread on v1): two per
/// cpu of this machine, plus a few for tasks on several cpus. (Worked out once:
/// `available_parallelism` reads several files.)
pub fn idle_max() -> usize {
    static IDLE_MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *IDLE_MAX.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()) * 2 + 4)
}

/// A cgroup file operation that failed, with the path and the data.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}{}", path.display(), data.as_ref().map(|d| format!(" (writing {d:?})")).unwrap_or_default())]
pub struct CgroupError {
    /// What was being done: "create", "write", "read", "remove".
    pub op: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// What was being written, if anything.
    pub data: Option<String>,
    /// The cause.
    #[source]
    pub source: io::Error,
}

fn err(op: &'static str, path: &Path, data: Option<&str>, source: io::Error) -> CgroupError {
    CgroupError { op, path: path.to_path_buf(), data: data.map(str::to_string), source }
}

fn write(path: &Path, data: &str) -> Result<(), CgroupError> {
    fs::write(path, data).map_err(|e| err("write", path, Some(data), e))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|e| err("read", path, None, e))
}

/// A file holding one number; `None` when it is missing or holds something else.
fn read_number(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok())
}

/// The value of `key` in a flat keyed file such as `cpu.stat` (`key value` lines).
fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Limits of one job's cgroup. `None` leaves a limit unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory in bytes.
    pub memory: Option<u64>,
    /// Memory plus swap in bytes (at least `memory`).
    pub memory_and_swap: Option<u64>,
    /// CPUs (OS indices) the job may run on.
    pub cpus: Vec<u32>,
    /// NUMA nodes (OS indices) it may allocate from.
    pub mems: Vec<u32>,
    /// CPU time per period, in microseconds of [`CPU_PERIOD_US`].
    pub cpu_quota_us: Option<u64>,
    /// Most processes and threads at once.
    pub pids: Option<u64>,
}

/// What a job's cgroup measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Peak memory in bytes, where the kernel records it.
    pub peak_memory: Option<u64>,
    /// CPU time in nanoseconds.
    pub cpu_ns: Option<u64>,
    /// Times the kernel's OOM killer killed a process of the job.
    pub oom_kills: u64,
}

/// Which cgroup version the agent uses, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// The unified hierarchy: the directory below which job cgroups are made.
    V2 { base: PathBuf },
    /// One directory per v1 controller below which job cgroups are made.
    V1 {
        memory: Option<PathBuf>,
        cpuset: Option<PathBuf>,
        cpu: Option<PathBuf>,
        cpuacct: Option<PathBuf>,
        pids: Option<PathBuf>,
    },
}

/// Where job cgroups are made, and the pool of cgroups tasks reuse (shared by
/// clones of this value).
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
    job_pids_max: Option<u64>,
    pool: Arc<Mutex<Pool>>,
}

impl PartialEq for Cgroups {
    fn eq(&self, other: &Self) -> bool {
        self.layout == other.layout && self.job_pids_max == other.job_pids_max
    }
}

impl Eq for Cgroups {}

/// Splits a line of `/proc/self/mountinfo` into (mount point, fs type, super options).
fn mount_fields(line: &str) -> Option<(&str, &str, &str)> {
    let mut halves = line.splitn(2, " - ");
    let left: Vec<&str> = halves.next()?.split(' ').collect();
    let right: Vec<&str> = halves.next()?.split(' ').collect();
    Some((left.get(4)?, right.first()?, right.get(2)?))
}

impl Cgroups {
    fn with_layout(layout: Layout) -> Self {
        Self { layout, job_pids_max: Some(DEFAULT_JOB_PIDS_MAX), pool: Arc::default() }
    }

    /// Finds the hierarchy this process may use: v2 when the unified hierarchy
    /// has controllers, else v1. `Ok(None)` when neither is mounted.
    pub fn detect(leaf: &str) -> Result<Option<Self>, CgroupError> {
        let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
        let own = read(Path::new("/proc/self/cgroup"))?;
        Ok(Self::from_proc(&mountinfo, &own, leaf))
    }

    /// [`Cgroups::detect`] on the given contents of `/proc/self/mountinfo` and
    /// `/proc/self/cgroup`; job cgroups go into `<own cgroup>/<leaf>`.
    pub fn from_proc(mountinfo: &str, own_cgroups: &str, leaf: &str) -> Option<Self> {
        // `/proc/self/cgroup`: `ID:controllers:path`, with `0::path` for v2.
        let own_path = |controller: &str| {
            own_cgroups.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
                let matches = if controller.is_empty() {
                    list.is_empty()
                } else {
                    list.split(',').any(|c| c == controller)
                };
                matches.then(|| path.trim_start_matches('/').to_string())
            })
        };
        let mounts: Vec<(&str, &str, &str)> = mountinfo.lines().filter_map(mount_fields).collect();
        if let Some(&(point, _, _)) = mounts.iter().find(|(_, fs, _)| *fs == "cgroup2") {
            let own = own_path("").unwrap_or_default();
            let dir = Path::new(point).join(&own);
            // A hybrid system may enable only a few controllers (hugetlb, say)
            // in the unified hierarchy: it is used only when it has memory.
            let has_memory = fs::read_to_string(dir.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|name| name == "memory"));
            if has_memory {
                return Some(Self::with_layout(Layout::V2 { base: dir.join(leaf) }));
            }
        }
        let v1 = |name: &str| {
            let (point, _, _) =
                mounts.iter().find(|(_, fs, opts)| *fs == "cgroup" && opts.split(',').any(|o| o == name))?;
            Some(Path::new(point).join(own_path(name)?).join(leaf))
        };
        let layout = Layout::V1 {
            memory: v1("memory"),
            cpuset: v1("cpuset"),
            cpu: v1("cpu"),
            cpuacct: v1("cpuacct"),
            pids: v1("pids"),
        };
        match &layout {
            Layout::V1 { memory: None, cpuset: None, cpu: None, cpuacct: None, pids: None } => None,
            _ => Some(Self::with_layout(layout)),
        }
    }

    /// Job cgroups in a v2 hierarchy below `base` (e.g. a fixture directory).
    pub fn v2_at(base: impl Into<PathBuf>) -> Self {
        Self::with_layout(Layout::V2 { base: base.into() })
    }

    /// Job cgroups in v1 hierarchies: each controller's directory below which
    /// job cgroups are made.
    pub fn v1_at(
        memory: Option<PathBuf>,
        cpuset: Option<PathBuf>,
        cpu: Option<PathBuf>,
        cpuacct: Option<PathBuf>,
        pids: Option<PathBuf>,
    ) -> Self {
        Self::with_layout(Layout::V1 { memory, cpuset, cpu, cpuacct, pids })
    }

    /// Sets the `pids.max` that [`Cgroups::job_pids_max`] proposes for each
    /// job (`None`: no limit beyond the node's).
    pub fn with_job_pids_max(mut self, max: Option<u64>) -> Self {
        self.job_pids_max = max;
        self
    }

    /// Most processes and threads a job may have at once, for [`Limits::pids`].
    pub fn job_pids_max(&self) -> Option<u64> {
        self.job_pids_max
    }

    /// `"cgroup v2 (...)"` or `"cgroup v1 (memory, cpuset, ...)"`, for `picloud nodes`.
    pub fn describe(&self) -> String {
        match &self.layout {
            Layout::V2 { base } => format!("cgroup v2 ({})", base.display()),
            Layout::V1 { memory, cpuset, cpu, cpuacct, pids } => {
                let names: Vec<&str> = [
                    ("memory", memory),
                    ("cpuset", cpuset),
                    ("cpu", cpu),
                    ("cpuacct", cpuacct),
                    ("pids", pids),
                ]
                .iter()
                .filter(|(_, p)| p.is_some())
                .map(|(n, _)| *n)
                .collect();
                format!("cgroup v1 ({})", names.join(", "))
            }
        }
    }

    /// Whether this is the unified hierarchy.
    pub fn is_v2(&self) -> bool {
        matches!(self.layout, Layout::V2 { .. })
    }

    /// Creates the parent directories and makes them usable: on v2 the
    /// controllers are enabled for children; on v1 the cpuset parent inherits
    /// its parent's cpus and mems (an empty cpuset admits no process).
    pub fn prepare(&self) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V2 { base } => {
                create_dir(base)?;
                let available = read(&base.join("cgroup.controllers")).unwrap_or_default();
                let wanted: Vec<String> = ["cpuset", "cpu", "memory", "pids"]
                    .iter()
                    .filter(|c| available.split_whitespace().any(|a| a == **c))
                    .map(|c| format!("+{c}"))
                    .collect();
                if !wanted.is_empty() {
                    write(&base.join("cgroup.subtree_control"), &wanted.join(" "))?;
                }
            }
            Layout::V1 { memory, cpuset, cpu, cpuacct, pids } => {
                for dir in [memory, cpu, cpuacct, pids].into_iter().flatten() {
                    create_dir(dir)?;
                }
                if let Some(dir) = cpuset {
                    create_dir(dir)?;
                    inherit_cpuset(dir)?;
                }
            }
        }
        Ok(())
    }

    /// Creates the cgroup `name` with `limits` written, and nothing in it yet.
    /// On failure nothing of it is left.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<JobCgroup, CgroupError> {
        let job = match &self.layout {
            Layout::V2 { base } => JobCgroup { v2: Some(base.join(name)), ..JobCgroup::default() },
            Layout::V1 { memory, cpuset, cpu, cpuacct, pids } => {
                let sub = |d: &Option<PathBuf>| d.as_ref().map(|d| d.join(name));
                JobCgroup {
                    v2: None,
                    memory: sub(memory),
                    cpuset: sub(cpuset),
                    cpu: sub(cpu),
                    cpuacct: sub(cpuacct),
                    pids: sub(pids),
                }
            }
        };
        let made = job.dirs().try_for_each(|dir| create_dir(dir)).and_then(|()| {
            // A new cgroup has no limits: every one asked for differs from that.
            let unset = Limits { cpus: limits.cpus.clone(), mems: limits.mems.clone(), ..Limits::default() };
            self.write_limits(&job, &unset, limits, true)
        });
        match made {
            Ok(()) => Ok(job),
            Err(e) => {
                let _ = job.remove();
                Err(e)
            }
        }
    }

    /// Creates the cgroup `name` with `limits` and moves the running process
    /// `pid` into it: for a long-lived process such as a Python worker (a
    /// process that should start inside its cgroup goes through the pool
    /// instead, or joins with the launcher's `ChildSetup::join_cgroup`). On
    /// failure nothing of the cgroup is left. The process keeps running
    /// wherever it was when this fails.
    pub fn adopt(&self, name: &str, limits: &Limits, pid: i32) -> Result<JobCgroup, CgroupError> {
        let job = self.create(name, limits)?;
        match job.add_process(pid) {
            Ok(()) => Ok(job),
            Err(e) => {
                let _ = job.remove();
                Err(e)
            }
        }
    }

    /// Writes the limits of `new` that differ from `old` (what is written now)
    /// into `job`. `fresh`: the cgroup was just made, so that on v1 its cpuset
    /// must be filled even where `new` names no cpus (an empty cpuset admits no
    /// process).
    fn write_limits(
        &self,
        job: &JobCgroup,
        old: &Limits,
        new: &Limits,
        fresh: bool,
    ) -> Result<(), CgroupError> {
        let cpus = join_list(&new.cpus);
        let mems = join_list(&new.mems);
        let number_or = |n: Option<u64>, none: &str| n.map_or_else(|| none.to_string(), |n| n.to_string());
        match (&self.layout, &job.v2) {
            (Layout::V2 { .. }, Some(dir)) => {
                if (old.memory, old.memory_and_swap) != (new.memory, new.memory_and_swap) {
                    write(&dir.join("memory.max"), &number_or(new.memory, "max"))?;
                    // The swap part of memory + swap; unlimited when either is.
                    let swap = new.memory.zip(new.memory_and_swap).map(|(m, total)| total.saturating_sub(m));
                    if swap.is_some() || old.memory_and_swap.is_some() {
                        write(&dir.join("memory.swap.max"), &number_or(swap, "max"))?;
                    }
                }
                // An empty list gives the parent's cpus (or mems) back.
                if old.cpus != new.cpus || (fresh && !cpus.is_empty()) {
                    write(&dir.join("cpuset.cpus"), &cpus)?;
                }
                if old.mems != new.mems || (fresh && !mems.is_empty()) {
                    write(&dir.join("cpuset.mems"), &mems)?;
                }
                if old.cpu_quota_us != new.cpu_quota_us {
                    let quota = number_or(new.cpu_quota_us, "max");
                    write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
                if old.pids != new.pids {
                    write(&dir.join("pids.max"), &number_or(new.pids, "max"))?;
                }
            }
            _ => {
                if let Some(dir) = &job.memory {
                    if (old.memory, old.memory_and_swap) != (new.memory, new.memory_and_swap) {
                        // memory + swap may never be below memory: lift it,
                        // set memory, then set it (absent without swap accounting).
                        let memsw = dir.join("memory.memsw.limit_in_bytes");
                        let has_memsw = memsw.exists();
                        if has_memsw && old.memory.is_some() {
                            write(&memsw, "-1")?;
                        }
                        write(&dir.join("memory.limit_in_bytes"), &number_or(new.memory, "-1"))?;
                        if let (true, Some(m)) = (has_memsw, new.memory) {
                            write(&memsw, &new.memory_and_swap.unwrap_or(m).max(m).to_string())?;
                        }
                    }
                }
                if let Some(dir) = &job.cpuset {
                    // Both must be set before a process may join.
                    let parent = |file: &str| read(&dir.with_file_name(file)).unwrap_or_default();
                    if fresh || old.cpus != new.cpus {
                        let value =
                            if cpus.is_empty() { parent("cpuset.cpus").trim().to_string() } else { cpus };
                        write(&dir.join("cpuset.cpus"), &value)?;
                    }
                    if fresh || old.mems != new.mems {
                        let value =
                            if mems.is_empty() { parent("cpuset.mems").trim().to_string() } else { mems };
                        write(&dir.join("cpuset.mems"), &value)?;
                    }
                }
                if let (Some(dir), true) = (&job.cpu, old.cpu_quota_us != new.cpu_quota_us) {
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &number_or(new.cpu_quota_us, "-1"))?;
                }
                if let (Some(dir), true) = (&job.pids, old.pids != new.pids) {
                    write(&dir.join("pids.max"), &number_or(new.pids, "max"))?;
                }
            }
        }
        Ok(())
    }

    /// A pooled cgroup for one task with `limits` (its cpus choose the pool
    /// entry): an idle one made for the same cpus, with the limits that differ
    /// rewritten, or a new one. Give it back with [`Cgroups::release`].
    pub fn acquire(&self, limits: &Limits) -> Result<PooledCgroup, CgroupError> {
        let (reused, number) = {
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            match pool.idle.get_mut(&limits.cpus).and_then(Vec::pop) {
                Some(slot) => {
                    pool.idle_count -= 1;
                    (Some(slot), 0)
                }
                None => {
                    pool.next += 1;
                    (None, pool.next - 1)
                }
            }
        };
        let slot = match reused {
            Some(mut slot) => {
                // On failure the slot is dropped, which removes it.
                let (old, new) = (self.written(&slot.limits, &slot), self.written(limits, &slot));
                self.write_limits(&slot.cgroup, &old, &new, false)?;
                slot.limits = limits.clone();
                slot
            }
            None => self.new_slot(number, limits)?,
        };
        Ok(PooledCgroup { slot })
    }

    /// The limits as written for a slot: `pids.max` counts the spawner thread too.
    fn written(&self, limits: &Limits, slot: &Slot) -> Limits {
        let mut limits = limits.clone();
        if slot.spawner.is_some() {
            limits.pids = limits.pids.map(|p| p.saturating_add(1));
        }
        limits
    }

    /// Makes pooled cgroup number `number`, with its spawner thread on v1.
    fn new_slot(&self, number: u64, limits: &Limits) -> Result<Slot, CgroupError> {
        let name = format!("slot-{number}");
        let v1 = !self.is_v2();
        let mut written = limits.clone();
        if v1 {
            written.pids = written.pids.map(|p| p.saturating_add(1));
        }
        let cgroup = self.create(&name, &written)?;
        let mut slot = Slot {
            name,
            cgroup,
            limits: limits.clone(),
            spawner: None,
            files: CounterFiles::default(),
            oom_kills_before: 0,
            cpu_ns_before: 0,
            memory_before: 0,
            peak: PeakKind::Unknown,
        };
        if v1 {
            // On failure the slot is dropped, which removes its directories.
            slot.spawner = Some(Spawner::start(&slot.name, slot.cgroup.tasks_files(), &limits.cpus)?);
        }
        Ok(slot)
    }

    /// Takes back a pooled cgroup whose task has ended: kills what the task
    /// left in it, returns what the task used, and readies it for the next
    /// task (or removes it, when it cannot be emptied or enough are idle).
    /// Problems are logged: the task's end does not wait for them.
    pub fn release(&self, cgroup: PooledCgroup) -> Usage {
        let mut slot = cgroup.slot;
        let emptied = slot.empty_quickly() || slot.cgroup.kill_until_empty();
        let (usage, raw) = slot.usage(&self.layout);
        if slot.spawner.as_ref().is_some_and(|s| !s.is_alive()) {
            tracing::warn!(cgroup = %slot.name, "the spawner thread of a task's cgroup ended: the cgroup is removed");
            return usage;
        }
        if !emptied {
            tracing::warn!(cgroup = %slot.name, "processes left in a task's cgroup did not die: it is not reused");
            self.pool.lock().unwrap_or_else(PoisonError::into_inner).stuck.push(slot);
            return usage;
        }
        if let Err(e) = slot.reset(&self.layout, raw) {
            tracing::warn!(cgroup = %slot.name, "cannot reset the counters of a task's cgroup, so it is removed: {e}");
            return usage;
        }
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.idle_count < idle_max() {
            pool.idle.entry(slot.limits.cpus.clone()).or_default().push(slot);
            pool.idle_count += 1;
        } else {
            drop(pool);
            // Dropped here, outside the lock: it stops its thread and removes itself.
            drop(slot);
        }
        usage
    }

    /// Removes what agents killed before they could clean up left beside this
    /// agent's base directories: the trees named `<prefix><pid>` (the agent
    /// names its base `<prefix><its pid>`) whose process no longer exists and
    /// in which no process or thread is left. A tree that still holds one
    /// (a task that outlived its agent, or an agent of another pid namespace)
    /// is left alone. Returns how many trees were removed.
    pub fn sweep_stale(&self, prefix: &str) -> usize {
        let mut removed = 0;
        for base in self.base_dirs() {
            let (Some(parent), Some(own)) = (base.parent(), base.file_name()) else { continue };
            let Ok(entries) = fs::read_dir(parent) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let pid =
                    name.to_str().and_then(|n| n.strip_prefix(prefix)).and_then(|p| p.parse::<u32>().ok());
                let Some(pid) = pid else { continue };
                let dir = entry.path();
                if name == own || Path::new(&format!("/proc/{pid}")).exists() || !dir.is_dir() {
                    continue;
                }
                if tree_is_empty(&dir) && remove_tree(&dir).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// The directories below which this agent's cgroups are made.
    fn base_dirs(&self) -> Vec<&PathBuf> {
        match &self.layout {
            Layout::V2 { base } => vec![base],
            Layout::V1 { memory, cpuset, cpu, cpuacct, pids } => {
                [memory, cpuset, cpu, cpuacct, pids].into_iter().flatten().collect()
            }
        }
    }

    /// Pooled cgroups idle now, for tests and logs.
    pub fn idle_count(&self) -> usize {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner).idle_count
    }

    /// Stops the pool (its spawner threads, its idle cgroups) and removes the
    /// (then empty) directories below which job cgroups were made.
    pub fn remove_base(&self) {
        let slots: Vec<Slot> = {
            let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
            pool.idle_count = 0;
            let idle: Vec<Slot> = pool.idle.drain().flat_map(|(_, slots)| slots).collect();
            idle.into_iter().chain(pool.stuck.drain(..)).collect()
        };
        drop(slots);
        let dirs = self.base_dirs();
        let deadline = std::time::Instant::now() + REMOVE_PATIENCE;
        for dir in dirs {
            // An ordinary file in a fixture's base is the test's: leave it.
            let removed = match fs::remove_dir(dir) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Err(err("remove", dir, None, e)),
                _ => remove_dir(dir, deadline),
            };
            if let Err(e) = removed {
                tracing::warn!("{e}: {}", e.source);
            }
        }
    }
}

/// The pool's state; see the module documentation.
#[derive(Debug, Default)]
struct Pool {
    /// Number of the next cgroup made (`slot-N`).
    next: u64,
    /// Idle cgroups by the cpus they were made for; the last released is reused first.
    idle: HashMap<Vec<u32>, Vec<Slot>>,
    idle_count: usize,
    /// Cgroups that could not be emptied: removed, if they can be, at the end.
    stuck: Vec<Slot>,
}

/// One pooled cgroup. Dropping it stops its spawner thread, kills what is
/// left in it and removes it.
#[derive(Debug)]
struct Slot {
    name: String,
    cgroup: JobCgroup,
    /// The limits of its last task (as asked for, without the spawner's pid).
    limits: Limits,
    spawner: Option<Spawner>,
    /// Counter files, kept open.
    files: CounterFiles,
    /// OOM kills counted before its current task (the counter cannot be reset).
    oom_kills_before: u64,
    /// v2: CPU time before its current task, in nanoseconds.
    cpu_ns_before: u64,
    /// Memory charged to it when its current task started, in bytes.
    memory_before: u64,
    /// v2: how `memory.peak` can be read.
    peak: PeakKind,
}

/// v2: what a pooled cgroup's `memory.peak` gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeakKind {
    /// Not known yet.
    Unknown,
    /// Open for writing too: from Linux 6.12 a write resets the peak seen
    /// through that descriptor.
    Resettable,
    /// The cgroup's lifetime peak.
    Lifetime,
    /// No such file (before Linux 5.19): `memory.current` stands in.
    Missing,
}

/// Counter files opened once and read (or written) with one `pread` (or
/// `pwrite`) each.
#[derive(Debug, Default)]
struct CounterFiles(HashMap<PathBuf, Option<CounterFile>>);

/// An open counter file.
#[derive(Debug)]
struct CounterFile {
    file: File,
    writable: bool,
    /// Not on a cgroup file system (a test fixture): a write must also cut
    /// what the file held, as the kernel's files hold only the latest value.
    ordinary: bool,
}

impl CounterFiles {
    /// The file at `path`, opened on first use, and opened again for
    /// writing when a write needs it (`None` if it cannot be opened).
    fn file(&mut self, path: PathBuf, write: bool) -> Option<&CounterFile> {
        let entry = self.0.entry(path);
        let path = entry.key().clone();
        let slot = entry.or_insert(None);
        if slot.as_ref().is_none_or(|c| write && !c.writable) {
            // A cgroupfs file without a write handler cannot even be opened for writing.
            *slot = OpenOptions::new().read(true).write(write).open(&path).ok().map(|file| {
                use nix::sys::statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, fstatfs};
                let kind = fstatfs(&file).map(|s| s.filesystem_type());
                let ordinary = !matches!(kind, Ok(k) if k == CGROUP_SUPER_MAGIC || k == CGROUP2_SUPER_MAGIC);
                CounterFile { file, writable: write, ordinary }
            });
        }
        slot.as_ref()
    }

    /// The text of the file at `path`.
    fn text(&mut self, path: PathBuf) -> Option<String> {
        let counter = self.file(path, false)?;
        let mut buf = [0u8; COUNTER_FILE_MAX];
        let n = counter.file.read_at(&mut buf, 0).ok()?;
        std::str::from_utf8(&buf[..n]).ok().map(str::to_string)
    }

    /// Writes `data` to the file at `path`.
    fn write(&mut self, path: PathBuf, data: &str) -> Result<(), CgroupError> {
        let fail = |path: &Path, e| err("write", path, Some(data), e);
        let Some(counter) = self.file(path.clone(), true) else {
            // Cannot be opened: the plain write says why.
            return write(&path, data);
        };
        counter.file.write_at(data.as_bytes(), 0).map_err(|e| fail(&path, e))?;
        if counter.ordinary {
            counter.file.set_len(data.len() as u64).map_err(|e| fail(&path, e))?;
        }
        Ok(())
    }

    /// The number held in the file at `path`.
    fn number(&mut self, path: PathBuf) -> Option<u64> {
        self.text(path)?.trim().parse().ok()
    }

    /// The value of `key` in the flat keyed file at `path`.
    fn keyed(&mut self, path: PathBuf, key: &str) -> Option<u64> {
        self.text(path)?.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    }
}

/// Counters as read when a task ended, from which the next baselines are taken.
#[derive(Debug, Clone, Copy, Default)]
struct RawCounters {
    oom_kills: u64,
    cpu_ns: u64,
}

impl Slot {
    /// Whether the cgroup holds no process but the agent's spawner thread:
    /// the cheap check made after every task. With the pids controller,
    /// `pids.current` (which counts the spawner thread); else the
    /// `cgroup.procs` of one directory, read afresh (v1 keeps the pid list of
    /// an open `cgroup.procs` for a second), enough since a task's processes
    /// start in every controller at once.
    fn empty_quickly(&mut self) -> bool {
        let own = u64::from(self.spawner.is_some());
        let pids = self.cgroup.v2.as_ref().or(self.cgroup.pids.as_ref()).map(|d| d.join("pids.current"));
        match pids.and_then(|p| self.files.number(p)) {
            Some(n) => n <= own,
            None => {
                let me = std::process::id() as i32;
                self.cgroup.dirs().next().is_none_or(|d| procs_in(d).into_iter().all(|p| p == me))
            }
        }
    }

    /// What the cgroup measured for its current task, and the raw counters.
    fn usage(&mut self, layout: &Layout) -> (Usage, RawCounters) {
        match (layout, self.cgroup.v2.clone()) {
            (Layout::V2 { .. }, Some(dir)) => {
                let cpu =
                    self.files.keyed(dir.join("cpu.stat"), "usage_usec").map(|us| us.saturating_mul(1000));
                let oom = self.files.keyed(dir.join("memory.events"), "oom_kill").unwrap_or(0);
                let peak_file = dir.join("memory.peak");
                if self.peak == PeakKind::Unknown {
                    // A kernel without the reset refuses to open the file for writing.
                    self.peak = if self.files.file(peak_file.clone(), true).is_some() {
                        PeakKind::Resettable
                    } else if File::open(&peak_file).is_ok() {
                        self.files.0.remove(&peak_file);
                        PeakKind::Lifetime
                    } else {
                        PeakKind::Missing
                    };
                }
                let peak = match self.peak {
                    PeakKind::Resettable => {
                        self.files.number(peak_file).map(|p| p.saturating_sub(self.memory_before))
                    }
                    PeakKind::Lifetime => self.files.number(peak_file),
                    PeakKind::Unknown | PeakKind::Missing => self.files.number(dir.join("memory.current")),
                };
                let usage = Usage {
                    peak_memory: peak,
                    cpu_ns: cpu.map(|ns| ns.saturating_sub(self.cpu_ns_before)),
                    oom_kills: oom.saturating_sub(self.oom_kills_before),
                };
                (usage, RawCounters { oom_kills: oom, cpu_ns: cpu.unwrap_or(0) })
            }
            _ => {
                let (memory, cpuacct) = (self.cgroup.memory.clone(), self.cgroup.cpuacct.clone());
                let peak =
                    memory.as_ref().and_then(|d| self.files.number(d.join("memory.max_usage_in_bytes")));
                // `oom_kill` in memory.oom_control exists from Linux 4.13.
                let oom =
                    memory.as_ref().and_then(|d| self.files.keyed(d.join("memory.oom_control"), "oom_kill"));
                let usage = Usage {
                    peak_memory: peak.map(|p| p.saturating_sub(self.memory_before)),
                    cpu_ns: cpuacct.and_then(|d| self.files.number(d.join("cpuacct.usage"))),
                    oom_kills: oom.unwrap_or(0).saturating_sub(self.oom_kills_before),
                };
                (usage, RawCounters { oom_kills: oom.unwrap_or(0), cpu_ns: 0 })
            }
        }
    }

    /// Readies the (empty) cgroup for its next task: resets what can be
    /// reset, and takes `raw` and the memory charged now as the baselines.
    fn reset(&mut self, layout: &Layout, raw: RawCounters) -> Result<(), CgroupError> {
        self.oom_kills_before = raw.oom_kills;
        self.cpu_ns_before = raw.cpu_ns;
        match (layout, self.cgroup.v2.clone()) {
            (Layout::V2 { .. }, Some(dir)) => {
                let peak_file = dir.join("memory.peak");
                if self.peak == PeakKind::Resettable
                    && self.files.write(peak_file.clone(), "reset\n").is_err()
                {
                    tracing::debug!(cgroup = %dir.display(), "memory.peak cannot be reset on this kernel");
                    self.files.0.remove(&peak_file);
                    self.peak = PeakKind::Lifetime;
                }
                self.memory_before = self.files.number(dir.join("memory.current")).unwrap_or(0);
            }
            _ => {
                if let Some(dir) = self.cgroup.memory.clone() {
                    // Writing 0 restarts the peak from the memory charged now,
                    // which becomes the next task's baseline.
                    let max_usage = dir.join("memory.max_usage_in_bytes");
                    self.files.write(max_usage.clone(), "0")?;
                    self.memory_before = self.files.number(max_usage).unwrap_or(0);
                }
                if let Some(dir) = self.cgroup.cpuacct.clone() {
                    self.files.write(dir.join("cpuacct.usage"), "0")?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The spawner thread is a member: it must be gone before the removal.
        if let Some(spawner) = &mut self.spawner {
            spawner.stop();
        }
        self.files.0.clear();
        let _ = self.cgroup.kill_all();
        if let Err(e) = self.cgroup.remove() {
            tracing::warn!("cannot remove the pooled cgroup {}: {e}", self.name);
        }
    }
}

/// A cgroup of the pool, lent to one task by [`Cgroups::acquire`]; give it back
/// with [`Cgroups::release`]. Dropped instead, it kills what is in it and is removed.
#[derive(Debug)]
pub struct PooledCgroup {
    slot: Slot,
}

impl PooledCgroup {
    /// The cgroup itself.
    pub fn cgroup(&self) -> &JobCgroup {
        &self.slot.cgroup
    }

    /// The cpus it was made for.
    pub fn cpus(&self) -> &[u32] {
        &self.slot.limits.cpus
    }

    /// Its name below the base directory (`slot-N`).
    pub fn name(&self) -> &str {
        &self.slot.name
    }

    /// On v1, the thread that sits in this cgroup, pinned to its cpus: a child
    /// that [`Spawner::run`] starts begins life inside. `None` on v2, where the
    /// child must join by itself.
    pub fn spawner(&self) -> Option<&Spawner> {
        self.slot.spawner.as_ref()
    }
}

/// Work for a spawner thread.
type SpawnJob = Box<dyn FnOnce() + Send>;

/// Work waiting for a spawner thread, behind a mutex and a condition variable:
/// they sleep without spinning, where crossbeam's channels spin and yield
/// first, and a spawner thread that spins takes cpu time from the task it has
/// just started on the same cpus.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    changed: Condvar,
}

#[derive(Default)]
struct InboxState {
    jobs: VecDeque<SpawnJob>,
    /// No more work will come: the thread ends.
    closed: bool,
}

/// Where one answer is left for a waiting thread.
struct Answer<R> {
    /// `Some(None)`: the work panicked, there is no answer.
    value: Mutex<Option<Option<R>>>,
    given: Condvar,
}

impl<R> Answer<R> {
    fn new() -> Arc<Self> {
        Arc::new(Self { value: Mutex::new(None), given: Condvar::new() })
    }

    fn give(&self, value: Option<R>) {
        *self.value.lock().unwrap_or_else(PoisonError::into_inner) = Some(value);
        self.given.notify_one();
    }

    fn wait(&self) -> Option<R> {
        let mut value = self.value.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match value.take() {
                Some(answer) => return answer,
                None => value = self.given.wait(value).unwrap_or_else(PoisonError::into_inner),
            }
        }
    }
}

/// A thread that moved itself into a v1 cgroup and pinned itself to its cpus
/// once, and then runs what it is handed: a process it starts inherits both.
pub struct Spawner {
    inbox: Arc<Inbox>,
    thread: Option<JoinHandle<()>>,
    /// The cgroup's name, for errors.
    name: String,
}

impl std::fmt::Debug for Spawner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawner").field("cgroup", &self.name).finish_non_exhaustive()
    }
}

impl Spawner {
    /// Starts the thread, which writes its id into each of `tasks_files`, pins
    /// itself to `cpus` (none: it keeps the caller's affinity) and raises its
    /// priority (see the module documentation; where that is not allowed it
    /// runs at the agent's), and returns once it has.
    fn start(name: &str, tasks_files: Vec<PathBuf>, cpus: &[u32]) -> Result<Self, CgroupError> {
        let mut set = nix::sched::CpuSet::new();
        for &cpu in cpus {
            set.set(cpu as usize).map_err(|e| {
                err("pin a spawner thread to", Path::new(name), Some(&cpu.to_string()), e.into())
            })?;
        }
        let pin = !cpus.is_empty();
        let ready = Answer::<Result<(), CgroupError>>::new();
        let inbox = Arc::new(Inbox::default());
        let (thread_ready, thread_inbox) = (ready.clone(), inbox.clone());
        let thread_name = format!("agent-{name}");
        let spawned = std::thread::Builder::new()
            .name(thread_name.clone())
            .stack_size(SPAWNER_STACK)
            .spawn(move || {
                let tid = nix::unistd::gettid().as_raw().to_string();
                let mut ready = tasks_files.iter().try_for_each(|file| write(file, &tid));
                if ready.is_ok() && pin {
                    ready = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                        .map_err(|e| err("pin the spawner thread", Path::new(&thread_name), None, e.into()));
                }
                raise_priority();
                let ok = ready.is_ok();
                thread_ready.give(Some(ready));
                if ok {
                    serve(&thread_inbox);
                }
            })
            .map_err(|e| err("start a thread for", Path::new(name), None, e))?;
        let mut spawner = Self { inbox, thread: Some(spawned), name: name.to_string() };
        let ready = ready.wait().unwrap_or_else(|| {
            Err(err("start a thread for", Path::new(name), None, io::Error::other("the thread died")))
        });
        match ready {
            Ok(()) => Ok(spawner),
            Err(e) => {
                spawner.stop();
                Err(e)
            }
        }
    }

    /// Runs `f` on the thread, waits for it, and returns its result: a child
    /// `f` starts is in the cgroup and pinned from its first instruction. The
    /// calling thread is blocked meanwhile, so a caller that holds a lock (the
    /// agent's spawn lock) holds it for the whole spawn.
    pub fn run<R, F>(&self, f: F) -> Result<R, CgroupError>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let gone = |why: &str| {
            err("use the spawner thread of", Path::new(&self.name), None, io::Error::other(why.to_string()))
        };
        let answer = Answer::new();
        let given = answer.clone();
        let job: SpawnJob = Box::new(move || {
            // A panic stays in the work: the thread lives on, the caller learns of it.
            given.give(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok());
        });
        {
            let mut state = self.inbox.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.closed {
                return Err(gone("it has ended"));
            }
            state.jobs.push_back(job);
        }
        self.inbox.changed.notify_one();
        answer.wait().ok_or_else(|| gone("the work panicked"))
    }

    /// Whether the thread still runs (it ends only when stopped).
    fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Ends the thread and waits for it.
    fn stop(&mut self) {
        self.inbox.state.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        self.inbox.changed.notify_one();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!(cgroup = %self.name, "a spawner thread panicked");
            }
        }
    }
}

/// A spawner thread's loop: runs the work it is handed until it is told to end.
fn serve(inbox: &Inbox) {
    loop {
        let job = {
            let mut state = inbox.state.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(job) = state.jobs.pop_front() {
                    break job;
                }
                if state.closed {
                    return;
                }
                state = inbox.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
        };
        job();
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Gives the calling thread nice [`SPAWNER_NICE`], with `SCHED_RESET_ON_FORK`
/// so that the processes it starts begin at nice 0 (the kernel resets a
/// negative nice value in the children of such a thread). Best effort.
fn raise_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the normal policy; pid 0 is the calling thread.
    let reset = unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER | libc::SCHED_RESET_ON_FORK, &param) };
    if reset != 0 {
        tracing::debug!("cannot set SCHED_RESET_ON_FORK: {}", io::Error::last_os_error());
        return;
    }
    let tid = nix::unistd::gettid().as_raw() as libc::id_t;
    // SAFETY: a system call on integers; for PRIO_PROCESS Linux takes a thread id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, SPAWNER_NICE) } != 0 {
        tracing::debug!("cannot raise a spawner thread's priority: {}", io::Error::last_os_error());
    }
}

fn create_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) => Err(err("create", dir, None, e)),
    }
}

/// Copies `cpuset.cpus` and `cpuset.mems` from the parent of `dir` where `dir`'s are empty.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(file);
        if read(&own).map(|s| s.trim().is_empty()).unwrap_or(true) {
            if let Some(parent) = dir.parent() {
                let value = read(&parent.join(file))?;
                write(&own, value.trim())?;
            }
        }
    }
    Ok(())
}

/// `0,2,5`-style list.
fn join_list(items: &[u32]) -> String {
    items.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// One job's cgroup: a directory in the unified hierarchy, or one per v1 controller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobCgroup {
    v2: Option<PathBuf>,
    memory: Option<PathBuf>,
    cpuset: Option<PathBuf>,
    cpu: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
    pids: Option<PathBuf>,
}

impl JobCgroup {
    fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.v2, &self.memory, &self.cpuset, &self.cpu, &self.cpuacct, &self.pids].into_iter().flatten()
    }

    /// The `cgroup.procs` files a process id is written to so it joins the job's cgroup.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs().map(|d| d.join("cgroup.procs")).collect()
    }

    /// v1: the `tasks` files a thread id is written to so that one thread joins.
    fn tasks_files(&self) -> Vec<PathBuf> {
        self.dirs().map(|d| d.join("tasks")).collect()
    }

    /// Moves process `pid` into the cgroup.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for file in self.procs_files() {
            write(&file, &pid.to_string())?;
        }
        Ok(())
    }

    /// Processes in the cgroup now, except the agent itself (a spawner thread
    /// of a pooled cgroup is listed under the agent's pid).
    pub fn processes(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        let mut pids: Vec<i32> = self.dirs().flat_map(|d| procs_in(d)).filter(|&p| p != me).collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The cgroup's `pids.current` (how many processes and threads it holds)
    /// opened for reading, to be read again with a `pread` at offset 0;
    /// `None` without the pids controller.
    pub fn open_pids_current(&self) -> Option<File> {
        let dir = self.v2.as_ref().or(self.pids.as_ref())?;
        File::open(dir.join("pids.current")).ok()
    }

    /// What the cgroup measured. Files that do not exist give `None`.
    pub fn usage(&self) -> Usage {
        match &self.v2 {
            Some(dir) => Usage {
                // memory.peak exists from Linux 5.19.
                peak_memory: read_number(&dir.join("memory.peak"))
                    .or_else(|| read_number(&dir.join("memory.current"))),
                cpu_ns: read_keyed(&dir.join("cpu.stat"), "usage_usec").map(|us| us * 1000),
                oom_kills: read_keyed(&dir.join("memory.events"), "oom_kill").unwrap_or(0),
            },
            None => Usage {
                peak_memory: self
                    .memory
                    .as_ref()
                    .and_then(|d| read_number(&d.join("memory.max_usage_in_bytes"))),
                cpu_ns: self.cpuacct.as_ref().and_then(|d| read_number(&d.join("cpuacct.usage"))),
                // `oom_kill` in memory.oom_control exists from Linux 4.13.
                oom_kills: self
                    .memory
                    .as_ref()
                    .and_then(|d| read_keyed(&d.join("memory.oom_control"), "oom_kill"))
                    .unwrap_or(0),
            },
        }
    }

    /// Kills every process in the cgroup: through `cgroup.kill` on v2 where the
    /// kernel has it, else by signalling each listed process until none is left.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if let Some(dir) = &self.v2 {
            let kill = dir.join("cgroup.kill");
            if kill.exists() && write(&kill, "1").is_ok() {
                return Ok(());
            }
        }
        self.kill_until_empty();
        Ok(())
    }

    /// Kills every process in the cgroup and waits until none is left (or
    /// [`KILL_ATTEMPTS`] have passed: `false`).
    fn kill_until_empty(&self) -> bool {
        let kill_file = self.v2.as_ref().map(|d| d.join("cgroup.kill")).filter(|f| f.exists());
        for attempt in 0..KILL_ATTEMPTS {
            // A process may fork while we kill: repeat until the list stays empty.
            let pids = self.processes();
            if pids.is_empty() {
                return true;
            }
            let killed_at_once = attempt == 0 && kill_file.as_ref().is_some_and(|f| write(f, "1").is_ok());
            if !killed_at_once {
                for pid in pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            std::thread::sleep(KILL_PAUSE);
        }
        self.processes().is_empty()
    }

    /// Removes the cgroup's directories (each one it can, whatever happens to
    /// the others), waiting for the kernel to release processes that have
    /// just died (for up to `REMOVE_PATIENCE` in all).
    pub fn remove(&self) -> Result<(), CgroupError> {
        let deadline = std::time::Instant::now() + REMOVE_PATIENCE;
        let mut first_error = None;
        for dir in self.dirs() {
            if let Err(e) = remove_dir(dir, deadline) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Removes one cgroup directory. The kernel refuses (`EBUSY`) while a
/// process or thread that has left it has not yet finished exiting, which
/// on a loaded machine takes a while: this retries until `deadline`, pausing
/// a little longer each time.
fn remove_dir(dir: &Path, deadline: std::time::Instant) -> Result<(), CgroupError> {
    let mut pause = Duration::from_millis(1);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            // A fixture directory holds ordinary files: remove them too.
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && !dir.starts_with("/sys/") => {
                return fs::remove_dir_all(dir).map_err(|e| err("remove", dir, None, e));
            }
            Err(e) => return Err(err("remove", dir, None, e)),
        }
    }
}

/// Whether no process or thread is in the cgroup `dir` or any cgroup below it
/// (its `cgroup.procs` files are empty; one that cannot be read counts as not
/// empty, except in a fixture, which has none).
fn tree_is_empty(dir: &Path) -> bool {
    let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(text) => text.trim().is_empty(),
        Err(e) => e.kind() == io::ErrorKind::NotFound && !dir.starts_with("/sys/"),
    };
    procs
        && fs::read_dir(dir).is_ok_and(|entries| {
            entries.flatten().filter(|e| e.path().is_dir()).all(|e| tree_is_empty(&e.path()))
        })
}

/// Removes the cgroup `dir` and the cgroups below it, deepest first.
fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    let children = fs::read_dir(dir).map_err(|e| err("read", dir, None, e))?;
    for child in children.flatten() {
        if child.path().is_dir() {
            remove_tree(&child.path())?;
        }
    }
    remove_dir(dir, std::time::Instant::now() + REMOVE_PATIENCE)
}

/// The pids listed in `dir/cgroup.procs` (none when it cannot be read).
fn procs_in(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / UNIFIED rw,relatime - cgroup2 cgroup2 rw
";
    const OWN_V1: &str = "8:pids:/\n4:memory:/sandbox/abc\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    #[test]
    fn detects_v1_below_the_agents_own_cgroups() {
        // A hybrid system: the unified hierarchy has only hugetlb, so v1 is chosen.
        let unified = tempfile::tempdir().unwrap();
        fs::write(unified.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        let mountinfo = MOUNTINFO_V1.replace("UNIFIED", &unified.path().display().to_string());
        let c = Cgroups::from_proc(&mountinfo, OWN_V1, "picloud").unwrap();
        assert!(!c.is_v2());
        let Layout::V1 { memory, cpuset, pids, .. } = &c.layout else { unreachable!() };
        assert_eq!(memory.as_deref(), Some(Path::new("/sys/fs/cgroup/memory/sandbox/abc/picloud")));
        assert_eq!(cpuset.as_deref(), Some(Path::new("/sys/fs/cgroup/cpuset/picloud")));
        assert_eq!(pids.as_deref(), Some(Path::new("/sys/fs/cgroup/pids/picloud")));
        assert_eq!(c.describe(), "cgroup v1 (memory, cpuset, cpu, cpuacct, pids)");
    }

    #[test]
    fn detects_v2_when_the_unified_hierarchy_has_controllers() {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("user.slice/agent");
        fs::create_dir_all(&own).unwrap();
        fs::write(own.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        let mountinfo = format!("30 20 0:26 / {} rw - cgroup2 cgroup2 rw\n", root.path().display());
        let c = Cgroups::from_proc(&mountinfo, "0::/user.slice/agent\n", "picloud").unwrap();
        assert!(c.is_v2());
        assert_eq!(c.layout, Layout::V2 { base: own.join("picloud") });
        assert!(Cgroups::from_proc("", "", "picloud").is_none(), "nothing mounted");
    }

    /// A v2 fixture: the parent with its controllers file, as the kernel shows it.
    fn v2_fixture() -> (tempfile::TempDir, Cgroups) {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("picloud");
        fs::create_dir_all(&base).unwrap();
        fs::write(base.join("cgroup.controllers"), "cpuset cpu memory pids").unwrap();
        (root, Cgroups::v2_at(base))
    }

    #[test]
    fn v2_limits_are_written_to_the_v2_files() {
        let (_root, cg) = v2_fixture();
        cg.prepare().unwrap();
        let Layout::V2 { base } = &cg.layout else { unreachable!() };
        assert_eq!(
            fs::read_to_string(base.join("cgroup.subtree_control")).unwrap(),
            "+cpuset +cpu +memory +pids"
        );
        let limits = Limits {
            memory: Some(1 << 30),
            memory_and_swap: Some(3 << 29),
            cpus: vec![2, 3],
            mems: vec![1],
            cpu_quota_us: Some(150_000),
            pids: Some(64),
        };
        let job = cg.create("job-7", &limits).unwrap();
        let dir = base.join("job-7");
        let file = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(file("memory.max"), "1073741824");
        assert_eq!(file("memory.swap.max"), (1u64 << 29).to_string());
        assert_eq!(file("cpuset.cpus"), "2,3");
        assert_eq!(file("cpuset.mems"), "1");
        assert_eq!(file("cpu.max"), "150000 100000");
        assert_eq!(file("pids.max"), "64");
        assert_eq!(job.procs_files(), vec![dir.join("cgroup.procs")]);
        job.add_process(4242).unwrap();
        assert_eq!(file("cgroup.procs"), "4242");
    }

    #[test]
    fn v2_usage_and_oom_kills_are_read_from_the_v2_files() {
        let (_root, cg) = v2_fixture();
        let job = cg.create("job-1", &Limits::default()).unwrap();
        let Layout::V2 { base } = &cg.layout else { unreachable!() };
        let dir = base.join("job-1");
        assert!(!dir.join("memory.max").exists(), "unset limits are not written");
        fs::write(dir.join("memory.peak"), "1048576\n").unwrap();
        fs::write(dir.join("cpu.stat"), "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n").unwrap();
        fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        assert_eq!(job.usage(), Usage { peak_memory: Some(1 << 20), cpu_ns: Some(2_500_000), oom_kills: 1 });
        // Older kernels have no memory.peak: the current use stands in.
        fs::remove_file(dir.join("memory.peak")).unwrap();
        fs::write(dir.join("memory.current"), "4096\n").unwrap();
        assert_eq!(job.usage().peak_memory, Some(4096));
        job.remove().unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn pids_current_is_opened_where_the_pids_controller_has_it() {
        let (_root, cg) = v2_fixture();
        let job = cg.create("job-3", &Limits::default()).unwrap();
        assert!(job.open_pids_current().is_none(), "no such file");
        let Layout::V2 { base } = &cg.layout else { unreachable!() };
        fs::write(base.join("job-3/pids.current"), "2\n").unwrap();
        let file = job.open_pids_current().expect("opened");
        let mut buf = [0u8; 8];
        let n = file.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..n], b"2\n");
        // v1: the pids controller's directory; none without that controller.
        let root = tempfile::tempdir().unwrap();
        let (memory, pids) = (root.path().join("memory"), root.path().join("pids"));
        fs::create_dir_all(&pids).unwrap();
        fs::write(pids.join("pids.current"), "1\n").unwrap();
        let v1 = JobCgroup { memory: Some(memory.clone()), pids: Some(pids), ..JobCgroup::default() };
        assert!(v1.open_pids_current().is_some());
        assert!(JobCgroup { memory: Some(memory), ..JobCgroup::default() }.open_pids_current().is_none());
    }

    #[test]
    fn v2_kill_uses_cgroup_kill() {
        let (_root, cg) = v2_fixture();
        let job = cg.create("job-2", &Limits::default()).unwrap();
        let Layout::V2 { base } = &cg.layout else { unreachable!() };
        fs::write(base.join("job-2/cgroup.kill"), "0").unwrap();
        job.kill_all().unwrap();
        assert_eq!(fs::read_to_string(base.join("job-2/cgroup.kill")).unwrap(), "1");
    }

    /// A real v1 hierarchy below this process's own cgroups, when this machine
    /// has one that we may write (root, v1 mounted); removed again on drop,
    /// job cgroups included, whether the test passed or not.
    struct RealV1(Cgroups);

    impl Drop for RealV1 {
        fn drop(&mut self) {
            self.0.remove_base();
            if let Layout::V1 { memory, cpuset, cpu, cpuacct, pids } = &self.0.layout {
                for dir in [memory, cpuset, cpu, cpuacct, pids].into_iter().flatten() {
                    for job in fs::read_dir(dir).into_iter().flatten().flatten() {
                        if job.path().is_dir() {
                            let _ = fs::remove_dir(job.path());
                        }
                    }
                    let _ = fs::remove_dir(dir);
                }
            }
        }
    }

    fn real_v1(test: &str) -> Option<RealV1> {
        let name = format!("picloud-test-{}-{test}", std::process::id());
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let own = fs::read_to_string("/proc/self/cgroup").ok()?;
        let cg = Cgroups::from_proc(&mountinfo, &own, &name)?;
        if cg.is_v2() || cg.prepare().is_err() {
            eprintln!("skipped: no writable cgroup v1 hierarchy on this machine");
            return None;
        }
        Some(RealV1(cg))
    }

    #[test]
    fn v1_for_real_limits_usage_kill_and_removal() {
        let Some(real) = real_v1("limits") else { return };
        let cg = &real.0;
        let limits = Limits { memory: Some(64 << 20), pids: Some(16), cpus: vec![0], ..Limits::default() };
        let job = cg.create("job-1", &limits).unwrap();
        let Layout::V1 { memory: Some(mem), .. } = &cg.layout else { panic!("no memory controller") };
        let limit = fs::read_to_string(mem.join("job-1/memory.limit_in_bytes")).unwrap();
        assert_eq!(limit.trim(), (64u64 << 20).to_string());
        // A process that fills a 16 MiB buffer, says so, then waits to be killed.
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "read x; dd if=/dev/zero of=/dev/null bs=16M count=1 2>/dev/null; echo done; sleep 60",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        job.add_process(child.id() as i32).unwrap();
        assert_eq!(job.processes(), vec![child.id() as i32]);
        drop(child.stdin.take()); // `read` returns: the work starts inside the cgroup
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line, "done\n");
        let usage = job.usage();
        assert!(usage.peak_memory.unwrap() >= 16 << 20, "{usage:?}");
        assert!(usage.cpu_ns.is_some(), "{usage:?}");
        assert_eq!(usage.oom_kills, 0);
        job.kill_all().unwrap();
        let _ = child.wait();
        assert!(job.processes().is_empty());
        job.remove().unwrap();
        assert!(!mem.join("job-1").exists());
    }

    #[test]
    fn v1_for_real_memory_limit_triggers_an_oom_kill() {
        let Some(real) = real_v1("oom") else { return };
        let cg = &real.0;
        let limits = Limits { memory: Some(32 << 20), memory_and_swap: Some(32 << 20), ..Limits::default() };
        let job = cg.create("job-oom", &limits).unwrap();
        let mut child = std::process::Command::new("python3")
            .args(["-c", "import sys; sys.stdin.read(); b = bytearray(256 << 20); print(len(b))"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        job.add_process(child.id() as i32).unwrap();
        drop(child.stdin.take());
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        let usage = job.usage();
        assert!(usage.oom_kills >= 1, "{usage:?}");
        job.remove().unwrap();
    }

    /// The cpus this test may run on (OS indices).
    fn own_cpus() -> Vec<u32> {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
        (0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap()).map(|c| c as u32).collect()
    }

    /// Whether process `pid` has ended (gone, or a zombie waiting for its parent).
    fn ended(pid: i32) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
        }
    }

    #[test]
    fn adopt_leaves_nothing_behind_when_the_process_cannot_join() {
        let (_root, cg) = v2_fixture();
        let Layout::V2 { base } = cg.layout.clone() else { unreachable!() };
        let job = cg.adopt("worker-1", &Limits { pids: Some(5), ..Limits::default() }, 4242).unwrap();
        assert_eq!(fs::read_to_string(base.join("worker-1/cgroup.procs")).unwrap(), "4242");
        assert_eq!(fs::read_to_string(base.join("worker-1/pids.max")).unwrap(), "5");
        job.remove().unwrap();
        // A cgroup.procs that cannot be written (here a directory): no cgroup is left.
        fs::create_dir_all(base.join("worker-2/cgroup.procs")).unwrap();
        let e = cg.adopt("worker-2", &Limits::default(), 4242).unwrap_err();
        assert_eq!(e.op, "write", "{e}");
        assert!(!base.join("worker-2").exists());
    }

    #[test]
    fn v2_pool_reuses_cgroups_and_counts_each_task_from_zero() {
        let (_root, cg) = v2_fixture();
        cg.prepare().unwrap();
        let Layout::V2 { base } = cg.layout.clone() else { unreachable!() };
        let limits = Limits {
            memory: Some(64 << 20),
            memory_and_swap: Some(64 << 20),
            cpus: vec![1],
            pids: Some(100),
            ..Limits::default()
        };
        let first = cg.acquire(&limits).unwrap();
        assert!(first.spawner().is_none(), "on v2 children join by themselves");
        let dir = base.join(first.name());
        let file = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(file("memory.max"), (64u64 << 20).to_string());
        assert_eq!(file("memory.swap.max"), "0");
        assert_eq!(file("cpuset.cpus"), "1");
        assert_eq!(file("pids.max"), "100", "no spawner thread to count on v2");
        // The first task used 2.5 ms of CPU, peaked at 1 MiB, and had a process OOM-killed.
        fs::write(dir.join("cpu.stat"), "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n").unwrap();
        fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n").unwrap();
        fs::write(dir.join("memory.peak"), "1048576\n").unwrap();
        fs::write(dir.join("cgroup.kill"), "0").unwrap();
        // What stays charged (page cache the task left) is the next task's baseline.
        fs::write(dir.join("memory.current"), "65536\n").unwrap();
        let usage = cg.release(first);
        assert_eq!(usage, Usage { peak_memory: Some(1 << 20), cpu_ns: Some(2_500_000), oom_kills: 1 });
        assert_eq!(file("cgroup.kill"), "0", "nothing was left to kill");
        assert_eq!(cg.idle_count(), 1);

        // The next task on the same cpus gets the same cgroup, with only the
        // limits that changed rewritten.
        fs::remove_file(dir.join("pids.max")).unwrap();
        let unlimited = Limits { memory: None, memory_and_swap: None, ..limits.clone() };
        let second = cg.acquire(&unlimited).unwrap();
        assert_eq!(base.join(second.name()), dir);
        assert_eq!(cg.idle_count(), 0);
        assert_eq!(file("memory.max"), "max");
        assert_eq!(file("memory.swap.max"), "max");
        assert!(!dir.join("pids.max").exists(), "an unchanged limit is not rewritten");
        // Its CPU time, OOM kills and memory count from where the first task's ended.
        fs::write(dir.join("cpu.stat"), "usage_usec 4000\n").unwrap();
        fs::write(dir.join("memory.peak"), (65536 + 4096).to_string()).unwrap();
        let usage = cg.release(second);
        assert_eq!(usage, Usage { peak_memory: Some(4096), cpu_ns: Some(1_500_000), oom_kills: 0 });

        // Other cpus, another cgroup, without the first one's limits.
        let other = cg.acquire(&Limits { cpus: vec![0], ..Limits::default() }).unwrap();
        assert_ne!(base.join(other.name()), dir);
        assert!(!base.join(other.name()).join("memory.max").exists());
        cg.release(other);
        assert_eq!(cg.idle_count(), 2);
        cg.remove_base();
        let left: Vec<_> = fs::read_dir(&base).unwrap().flatten().filter(|e| e.path().is_dir()).collect();
        assert!(left.is_empty(), "pooled cgroups left: {left:?}");
    }

    /// A v1 fixture: a directory per controller, with the parent's cpuset files.
    fn v1_fixture() -> (tempfile::TempDir, Cgroups) {
        let root = tempfile::tempdir().unwrap();
        let dir = |c: &str| {
            let d = root.path().join(c).join("picloud");
            fs::create_dir_all(&d).unwrap();
            d
        };
        let (memory, cpuset, cpu, cpuacct, pids) =
            (dir("memory"), dir("cpuset"), dir("cpu"), dir("cpuacct"), dir("pids"));
        let cpus = join_list(&own_cpus());
        fs::write(root.path().join("cpuset/cpuset.cpus"), &cpus).unwrap();
        fs::write(root.path().join("cpuset/cpuset.mems"), "0").unwrap();
        let cg = Cgroups::v1_at(Some(memory), Some(cpuset), Some(cpu), Some(cpuacct), Some(pids));
        cg.prepare().unwrap();
        (root, cg)
    }

    #[test]
    fn v1_pool_has_a_pinned_spawner_thread_and_resets_counters() {
        let (_root, cg) = v1_fixture();
        let Layout::V1 {
            memory: Some(mem),
            cpuset: Some(cpuset),
            cpu: Some(cpu_dir),
            cpuacct: Some(acct),
            pids: Some(pids),
        } = cg.layout.clone()
        else {
            unreachable!()
        };
        let cpu = *own_cpus().last().unwrap();
        let limits = Limits { memory: Some(32 << 20), cpus: vec![cpu], pids: Some(10), ..Limits::default() };
        let pooled = cg.acquire(&limits).unwrap();
        let name = pooled.name().to_string();
        let file = |base: &Path, f: &str| fs::read_to_string(base.join(&name).join(f)).unwrap();
        assert_eq!(file(&mem, "memory.limit_in_bytes"), (32u64 << 20).to_string());
        assert_eq!(file(&cpuset, "cpuset.cpus"), cpu.to_string());
        assert_eq!(file(&cpuset, "cpuset.mems"), "0", "the parent's NUMA nodes");
        assert_eq!(file(&pids, "pids.max"), "11", "one more for the spawner thread");
        assert!(!cpu_dir.join(&name).join("cpu.cfs_quota_us").exists(), "no quota asked for, none written");

        // The spawner thread wrote itself into every controller and runs pinned;
        // a child it starts inherits the pinning.
        let spawner = pooled.spawner().expect("v1 has a spawner thread");
        let tid = spawner.run(|| nix::unistd::gettid().as_raw()).unwrap();
        assert_ne!(tid, nix::unistd::gettid().as_raw());
        for base in [&mem, &cpuset, &acct, &pids] {
            assert_eq!(file(base, "tasks"), tid.to_string());
        }
        let out = spawner
            .run(|| {
                std::process::Command::new("grep").args(["Cpus_allowed_list", "/proc/self/status"]).output()
            })
            .unwrap()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("Cpus_allowed_list:\t{cpu}\n"));

        // What the task used is read, then reset for the next task. Only the
        // spawner thread is left (pids.current counts it).
        let set = |base: &Path, f: &str, v: &str| fs::write(base.join(&name).join(f), v).unwrap();
        set(&pids, "pids.current", "1");
        set(&mem, "memory.max_usage_in_bytes", "2097152");
        set(&mem, "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n");
        set(&acct, "cpuacct.usage", "7000000");
        let usage = cg.release(pooled);
        assert_eq!(usage, Usage { peak_memory: Some(2 << 20), cpu_ns: Some(7_000_000), oom_kills: 3 });
        assert_eq!(file(&mem, "memory.max_usage_in_bytes"), "0");
        assert_eq!(file(&acct, "cpuacct.usage"), "0");
        assert!(!mem.join(&name).join("memory.force_empty").exists(), "page cache is not thrown away");

        // Reused: OOM kills count from the first task's, and a lower limit is written.
        let again = cg.acquire(&Limits { memory: Some(16 << 20), ..limits.clone() }).unwrap();
        assert_eq!(again.name(), name);
        assert_eq!(file(&mem, "memory.limit_in_bytes"), (16u64 << 20).to_string());
        assert_eq!(file(&pids, "pids.max"), "11");
        set(&mem, "memory.max_usage_in_bytes", "8388608");
        let usage = cg.release(again);
        assert_eq!(usage, Usage { peak_memory: Some(8 << 20), cpu_ns: Some(0), oom_kills: 0 });
        assert_eq!(cg.idle_count(), 1);

        // A CPU quota is written for the task that asks for one, and lifted after it.
        let quota = cg.acquire(&Limits { cpu_quota_us: Some(50_000), ..limits.clone() }).unwrap();
        assert_eq!(quota.name(), name);
        assert_eq!(file(&cpu_dir, "cpu.cfs_quota_us"), "50000");
        assert_eq!(file(&cpu_dir, "cpu.cfs_period_us"), CPU_PERIOD_US.to_string());
        cg.release(quota);
        let unlimited = cg.acquire(&limits).unwrap();
        assert_eq!(file(&cpu_dir, "cpu.cfs_quota_us"), "-1");
        cg.release(unlimited);
        assert_eq!(cg.idle_count(), 1);
        cg.remove_base();
        for base in [&mem, &cpuset, &cpu_dir, &acct, &pids] {
            assert!(!base.join(&name).exists(), "{} is left", base.join(&name).display());
        }
    }

    #[test]
    fn v1_for_real_pooled_cgroups_start_tasks_inside_and_kill_leftovers() {
        let Some(real) = real_v1("pool") else { return };
        let cg = &real.0;
        let cpu = *own_cpus().last().unwrap();
        let limits = Limits {
            memory: Some(64 << 20),
            memory_and_swap: Some(64 << 20),
            cpus: vec![cpu],
            pids: Some(8),
            ..Limits::default()
        };
        let pooled = cg.acquire(&limits).unwrap();
        let name = pooled.name().to_string();
        // A task that shows its cgroups and cpus, and leaves a process running
        // in a session of its own, out of reach of its process group.
        let script = "cat /proc/self/cgroup; grep Cpus_allowed_list /proc/self/status; \
                      setsid sleep 60 >/dev/null 2>&1 & echo $!";
        let child = pooled
            .spawner()
            .unwrap()
            .run(move || {
                std::process::Command::new("sh")
                    .args(["-c", script])
                    .stdout(std::process::Stdio::piped())
                    .spawn()
            })
            .unwrap()
            .unwrap();
        let out = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
        for controller in ["memory", "cpuset", "cpu", "cpuacct", "pids"] {
            let in_slot = out.lines().any(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, list, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                list.split(',').any(|c| c == controller) && path.ends_with(&format!("/{name}"))
            });
            assert!(in_slot, "not in the pooled {controller} cgroup: {out}");
        }
        assert!(out.contains(&format!("Cpus_allowed_list:\t{cpu}\n")), "{out}");
        let leftover: i32 = out.lines().last().unwrap().trim().parse().unwrap();
        let listed = pooled.cgroup().processes();
        assert!(listed.contains(&leftover), "{listed:?}");
        assert!(!listed.contains(&(std::process::id() as i32)), "the agent itself is never listed");

        let usage = cg.release(pooled);
        assert!(usage.cpu_ns.is_some_and(|ns| ns > 0), "{usage:?}");
        assert!(usage.peak_memory.is_some_and(|b| b > 0), "{usage:?}");
        assert_eq!(usage.oom_kills, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !ended(leftover) {
            assert!(std::time::Instant::now() < deadline, "the leftover process {leftover} still runs");
            std::thread::sleep(Duration::from_millis(10));
        }

        // The same cgroup serves the next task, its CPU counter restarted.
        let again = cg.acquire(&limits).unwrap();
        assert_eq!(again.name(), name);
        let Layout::V1 { memory: Some(mem), cpuacct: Some(acct), .. } = &cg.layout else {
            panic!("no memory or cpuacct controller")
        };
        let cpu_now = read_number(&acct.join(&name).join("cpuacct.usage")).unwrap();
        assert!(cpu_now < usage.cpu_ns.unwrap(), "cpuacct.usage was not reset: {cpu_now}");
        cg.release(again);
        cg.remove_base();
        assert!(!mem.join(&name).exists(), "the pooled cgroup is left");
        assert!(!mem.exists(), "the base is left");
    }

    #[test]
    fn stale_trees_of_dead_agents_are_swept_and_others_kept() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join(format!("picloud-agent-{}", std::process::id()));
        fs::create_dir_all(&base).unwrap();
        let cg = Cgroups::v2_at(&base);
        // Pids above pid_max never belong to a live process.
        let pid_max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
        let tree = |pid: u32, procs: &str| {
            let dir = root.path().join(format!("picloud-agent-{pid}"));
            fs::create_dir_all(dir.join("slot-0")).unwrap();
            fs::write(dir.join("cgroup.procs"), "").unwrap();
            fs::write(dir.join("slot-0/cgroup.procs"), procs).unwrap();
            dir
        };
        let dead = tree(pid_max + 1, "");
        let outlived = tree(pid_max + 2, "4242\n");
        let alive = tree(1, "");
        let other = root.path().join("someone-else-1");
        fs::create_dir_all(&other).unwrap();
        assert_eq!(cg.sweep_stale("picloud-agent-"), 1);
        assert!(!dead.exists(), "a dead agent's empty tree is removed");
        assert!(outlived.join("slot-0").exists(), "a tree with a process left is kept");
        assert!(alive.exists(), "a live process's tree is kept");
        assert!(base.exists() && other.exists());
    }
}
