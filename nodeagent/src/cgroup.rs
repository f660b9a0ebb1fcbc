//! Per-job cgroups on either cgroup version.
//!
//! [`Cgroups::detect`] reads `/proc/self/mountinfo` and `/proc/self/cgroup` and
//! finds where the agent may create cgroups: below its own cgroup in the
//! unified (v2) hierarchy when that has the memory controller, else below its
//! own cgroup in each v1 controller hierarchy (memory, cpuset, cpu, cpuacct,
//! pids). Every path is taken from those files, so tests point the same code
//! at fixture directories with [`Cgroups::v1_at`] and [`Cgroups::v2_at`].
//!
//! A job's cgroup is created with its limits written before any process joins
//! it ([`Cgroups::create`]); the launcher then places the job's first process
//! in it ([`JobCgroup::procs_files`]); when the job has ended the agent reads
//! its peak memory, CPU time and OOM kills ([`JobCgroup::usage`]), kills
//! whatever is left ([`JobCgroup::kill_all`]) and removes it
//! ([`JobCgroup::remove`]).
//!
//! | limit | v2 file | v1 file |
//! |---|---|---|
//! | memory | `memory.max` | `memory.limit_in_bytes` |
//! | memory + swap | `memory.swap.max` (the swap part) | `memory.memsw.limit_in_bytes` |
//! | cpus, NUMA nodes | `cpuset.cpus`, `cpuset.mems` | same names |
//! | CPU quota | `cpu.max` | `cpu.cfs_quota_us`, `cpu.cfs_period_us` |
//! | processes | `pids.max` | `pids.max` |

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Period of the CPU quota, in microseconds (the kernel's default, 100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

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

/// Where job cgroups are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroups {
    layout: Layout,
}

/// Splits a line of `/proc/self/mountinfo` into (mount point, fs type, super options).
fn mount_fields(line: &str) -> Option<(&str, &str, &str)> {
    let mut halves = line.splitn(2, " - ");
    let left: Vec<&str> = halves.next()?.split(' ').collect();
    let right: Vec<&str> = halves.next()?.split(' ').collect();
    Some((left.get(4)?, right.first()?, right.get(2)?))
}

impl Cgroups {
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
                return Some(Self { layout: Layout::V2 { base: dir.join(leaf) } });
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
            _ => Some(Self { layout }),
        }
    }

    /// Job cgroups in a v2 hierarchy below `base` (e.g. a fixture directory).
    pub fn v2_at(base: impl Into<PathBuf>) -> Self {
        Self { layout: Layout::V2 { base: base.into() } }
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
        Self { layout: Layout::V1 { memory, cpuset, cpu, cpuacct, pids } }
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
    pub fn create(&self, name: &str, limits: &Limits) -> Result<JobCgroup, CgroupError> {
        let cpus = join_list(&limits.cpus);
        let mems = join_list(&limits.mems);
        let job = match &self.layout {
            Layout::V2 { base } => {
                let dir = base.join(name);
                create_dir(&dir)?;
                let job = JobCgroup { v2: Some(dir.clone()), ..JobCgroup::default() };
                if let Some(m) = limits.memory {
                    write(&dir.join("memory.max"), &m.to_string())?;
                    if let Some(total) = limits.memory_and_swap {
                        write(&dir.join("memory.swap.max"), &total.saturating_sub(m).to_string())?;
                    }
                }
                if !cpus.is_empty() {
                    write(&dir.join("cpuset.cpus"), &cpus)?;
                }
                if !mems.is_empty() {
                    write(&dir.join("cpuset.mems"), &mems)?;
                }
                if let Some(q) = limits.cpu_quota_us {
                    write(&dir.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
                }
                if let Some(p) = limits.pids {
                    write(&dir.join("pids.max"), &p.to_string())?;
                }
                job
            }
            Layout::V1 { memory, cpuset, cpu, cpuacct, pids } => {
                let sub = |d: &Option<PathBuf>| d.as_ref().map(|d| d.join(name));
                let job = JobCgroup {
                    v2: None,
                    memory: sub(memory),
                    cpuset: sub(cpuset),
                    cpu: sub(cpu),
                    cpuacct: sub(cpuacct),
                    pids: sub(pids),
                };
                for dir in job.dirs() {
                    create_dir(dir)?;
                }
                if let Some(dir) = &job.memory {
                    if let Some(m) = limits.memory {
                        write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
                        // Without swap accounting the file is absent: memory alone is limited.
                        let memsw = dir.join("memory.memsw.limit_in_bytes");
                        if memsw.exists() {
                            write(&memsw, &limits.memory_and_swap.unwrap_or(m).max(m).to_string())?;
                        }
                    }
                }
                if let Some(dir) = &job.cpuset {
                    // Both must be set before a process may join.
                    let parent_cpus = read(&dir.with_file_name("cpuset.cpus")).unwrap_or_default();
                    let parent_mems = read(&dir.with_file_name("cpuset.mems")).unwrap_or_default();
                    write(
                        &dir.join("cpuset.cpus"),
                        if cpus.is_empty() { parent_cpus.trim() } else { &cpus },
                    )?;
                    write(
                        &dir.join("cpuset.mems"),
                        if mems.is_empty() { parent_mems.trim() } else { &mems },
                    )?;
                }
                if let (Some(dir), Some(q)) = (&job.cpu, limits.cpu_quota_us) {
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(&dir.join("cpu.cfs_quota_us"), &q.to_string())?;
                }
                if let (Some(dir), Some(p)) = (&job.pids, limits.pids) {
                    write(&dir.join("pids.max"), &p.to_string())?;
                }
                job
            }
        };
        Ok(job)
    }
}

/// Moves the calling thread into a job's v1 cgroups for as long as it lives,
/// so that a child it spawns starts there; the thread goes back on drop.
///
/// Only v1 lets a single thread move (its `tasks` files); a v2 domain cgroup
/// takes whole processes, so there the launcher has the child join by itself.
#[derive(Debug)]
pub struct ThreadInCgroup {
    tid: String,
    home: Vec<PathBuf>,
}

impl Drop for ThreadInCgroup {
    fn drop(&mut self) {
        for dir in &self.home {
            if let Err(e) = write(&dir.join("tasks"), &self.tid) {
                tracing::warn!("cannot move the agent thread back: {e}");
            }
        }
    }
}

impl Cgroups {
    /// Moves the calling thread into `job`'s cgroups (v1 only; `Ok(None)` on v2).
    pub fn enter_thread(&self, job: &JobCgroup) -> Result<Option<ThreadInCgroup>, CgroupError> {
        let Layout::V1 { memory, cpuset, cpu, cpuacct, pids } = &self.layout else { return Ok(None) };
        let tid = nix::unistd::gettid().as_raw().to_string();
        let mut guard = ThreadInCgroup { tid: tid.clone(), home: Vec::new() };
        let pairs = [
            (memory, &job.memory),
            (cpuset, &job.cpuset),
            (cpu, &job.cpu),
            (cpuacct, &job.cpuacct),
            (pids, &job.pids),
        ];
        for (base, dir) in pairs {
            let (Some(base), Some(dir)) = (base, dir) else { continue };
            // The agent's own cgroup is the parent of the base: the thread goes back there.
            let home = base.parent().unwrap_or(base).to_path_buf();
            write(&dir.join("tasks"), &tid)?;
            guard.home.push(home);
        }
        Ok(Some(guard))
    }

    /// Removes the (empty) directories below which job cgroups were made.
    pub fn remove_base(&self) {
        let dirs: Vec<&PathBuf> = match &self.layout {
            Layout::V2 { base } => vec![base],
            Layout::V1 { memory, cpuset, cpu, cpuacct, pids } => {
                [memory, cpuset, cpu, cpuacct, pids].into_iter().flatten().collect()
            }
        };
        for dir in dirs {
            if let Err(e) = fs::remove_dir(dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", dir.display());
                }
            }
        }
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

    /// Moves process `pid` into the cgroup.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for file in self.procs_files() {
            write(&file, &pid.to_string())?;
        }
        Ok(())
    }

    /// Processes in the cgroup now.
    pub fn processes(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<i32>>())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// What the cgroup measured. Files that do not exist give `None`.
    pub fn usage(&self) -> Usage {
        let number = |p: PathBuf| fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
        let keyed = |p: PathBuf, key: &str| {
            fs::read_to_string(p).ok().and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse::<u64>().ok()))
            })
        };
        match &self.v2 {
            Some(dir) => Usage {
                // memory.peak exists from Linux 5.19.
                peak_memory: number(dir.join("memory.peak")).or_else(|| number(dir.join("memory.current"))),
                cpu_ns: keyed(dir.join("cpu.stat"), "usage_usec ").map(|us| us * 1000),
                oom_kills: keyed(dir.join("memory.events"), "oom_kill ").unwrap_or(0),
            },
            None => Usage {
                peak_memory: self.memory.as_ref().and_then(|d| number(d.join("memory.max_usage_in_bytes"))),
                cpu_ns: self.cpuacct.as_ref().and_then(|d| number(d.join("cpuacct.usage"))),
                // `oom_kill` in memory.oom_control exists from Linux 4.13.
                oom_kills: self
                    .memory
                    .as_ref()
                    .and_then(|d| keyed(d.join("memory.oom_control"), "oom_kill "))
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
        // A process may fork while we kill: repeat until the list stays empty.
        for _ in 0..100 {
            let pids = self.processes();
            if pids.is_empty() {
                return Ok(());
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Removes the cgroup's directories, waiting briefly for the kernel to
    /// release processes that have just died.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            let mut attempt = 0;
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if attempt < 50 && e.raw_os_error() == Some(libc::EBUSY) => {
                        attempt += 1;
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    // A fixture directory holds ordinary files: remove them too.
                    Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && !dir.starts_with("/sys/") => {
                        fs::remove_dir_all(dir).map_err(|e| err("remove", dir, None, e))?;
                        break;
                    }
                    Err(e) => return Err(err("remove", dir, None, e)),
                }
            }
        }
        Ok(())
    }
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
}
