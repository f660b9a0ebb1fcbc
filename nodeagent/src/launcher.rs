//! Starting command jobs: one child process per task, in its own process group,
//! pinned to the cpus the server chose, with the PBS environment.
//!
//! For each [`StartTask`] the [`Launcher`]:
//!
//! 1. writes the job's script once per job into the spool directory
//!    (`<spool>/<seq>.sh`, mode 0700), shared by every task of an array; a
//!    script starting with `#!` is executed directly, any other is run by
//!    `/bin/sh`; an `Argv` command is looked up in the job's own `PATH`;
//! 2. opens the task's stdout and stderr files (created or truncated, mode
//!    0644); when both streams go to the same path the file is opened once and
//!    shared, so that lines interleave as written;
//! 3. builds the environment: the job's, as the client composed it, plus the
//!    `PBS_*` variables of this task (see [`Launcher::spawn`]);
//! 4. pins the calling thread to the task's cpus, so that the child inherits
//!    that affinity, and starts it with [`std::process::Command`] (own process
//!    group, working directory, absolute program path), which std does with
//!    `posix_spawn`: a vfork-style clone that copies no page tables, several
//!    times cheaper than fork for the agent; then restores the thread's affinity.
//!    No `pre_exec` hook is used, since one would force the fork path; the
//!    agent keeps an empty signal mask so that jobs start with one.
//!
//! Pinning by inheritance rather than in the child: a child that changes its
//! own affinity migrates to another cpu between fork and exec, while the
//! parent waits for the exec; measured on 2 cores, that doubled the time
//! [`Launcher::spawn`] takes (about 300 µs against 650 µs per `true` task).
//!
//! Nothing else is written per task: node files (`PBS_NODEFILE`) are cached in
//! the spool directory, one per cpu count. A task that cannot start yields a
//! [`LaunchError`] whose [`exit_status`](LaunchError::exit_status) and message
//! become the task's end: 127 (or 126) when the program cannot be executed, as
//! a shell would say, and [`SETUP_FAILED`] when the task failed before that.
//!
//! The launcher does not wait for its children: the caller reaps them.

use std::collections::HashMap;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;

use crate::cgroup::{Cgroups, JobCgroup};
use nix::sched::CpuSet;
use nix::unistd::Pid;
use picloud_proto::{JobCommand, JobDefinition, StartTask};

/// Exit status of a task that failed before its program could be executed
/// (spool or output file trouble): PBS's `JOB_EXEC_FAIL1`, "never ran".
pub const SETUP_FAILED: i32 = picloud_proto::EXIT_NEVER_RAN;

/// Exit status when the program was not found (as shells report it).
pub const EXIT_NOT_FOUND: i32 = 127;

/// Exit status when the program exists but cannot be executed.
pub const EXIT_NOT_EXECUTABLE: i32 = 126;

/// Queue name reported in `PBS_QUEUE` when the job named none (the server's default).
pub const DEFAULT_QUEUE: &str = "workq";

/// How many times a spawn is retried when the fresh script is momentarily
/// "text file busy": another thread's fork may hold its write descriptor until
/// that child execs (a Linux race; in the agent only one thread forks).
const ETXTBSY_RETRIES: u32 = 3;

/// Why a task could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The spool directory could not be created.
    #[error("cannot create the spool directory {}: {error}", path.display())]
    Spool {
        /// The directory.
        path: PathBuf,
        /// The cause.
        error: io::Error,
    },
    /// The job's script could not be written to the spool directory.
    #[error("cannot write the job script {}: {error}", path.display())]
    Script {
        /// The script file.
        path: PathBuf,
        /// The cause.
        error: io::Error,
    },
    /// The node file (`PBS_NODEFILE`) could not be written.
    #[error("cannot write the node file {}: {error}", path.display())]
    NodeFile {
        /// The node file.
        path: PathBuf,
        /// The cause.
        error: io::Error,
    },
    /// The task's stdout or stderr file could not be opened.
    #[error("cannot open the {stream} file {}: {error}", path.display())]
    Output {
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        error: io::Error,
    },
    /// The working directory is missing or not a directory.
    #[error("cannot use the working directory {}: {error}", path.display())]
    Workdir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        error: io::Error,
    },
    /// A cpu index is beyond what the kernel's affinity mask can hold.
    #[error("cannot pin to cpu {cpu}: the affinity mask holds cpus 0-{}", CpuSet::count() - 1)]
    Cpu {
        /// The offending index.
        cpu: u32,
    },
    /// The kernel refused the affinity (e.g. cpus outside the agent's cpuset).
    #[error("cannot pin to cpus {cpus:?}: {}", errno.desc())]
    Pin {
        /// The cpus asked for.
        cpus: Vec<u32>,
        /// The kernel's answer.
        errno: Errno,
    },
    /// The job's argument vector is empty.
    #[error("the job has an empty command")]
    EmptyCommand,
    /// The task could not be placed in its cgroup.
    #[error("cannot place the task in its cgroup: {0}")]
    Cgroup(crate::cgroup::CgroupError),
    /// The program could not be executed (fork or exec failed).
    #[error("cannot execute {what}: {}", errno.desc())]
    Exec {
        /// What was to be executed, quoted (`'nosuchcmd'`, or the script's interpreter).
        what: String,
        /// The error the child reported.
        errno: Errno,
    },
}

impl LaunchError {
    /// The PBS exit status the task ends with.
    pub fn exit_status(&self) -> i32 {
        match self {
            LaunchError::Exec { errno: Errno::EACCES | Errno::ENOEXEC | Errno::EISDIR, .. } => {
                EXIT_NOT_EXECUTABLE
            }
            LaunchError::Exec { .. } | LaunchError::EmptyCommand => EXIT_NOT_FOUND,
            _ => SETUP_FAILED,
        }
    }
}

/// The PBS exit status of a raw wait status: the exit code, or 256 + the
/// number of the signal that killed the process.
pub fn pbs_exit_status(wait_status: i32) -> i32 {
    let status = ExitStatus::from_raw(wait_status);
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 256 + sig,
        // Stopped or continued: not an end; report the raw value.
        (None, None) => wait_status,
    }
}

/// `PATH` for jobs whose environment has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Finds `program` as `execvp` would in the job's `path`, so that the child is
/// started with an absolute path. (With a `PATH` of its own in the child's
/// environment and a bare program name, std would fall back from `posix_spawn`
/// to the much dearer fork.)
fn resolve_program(program: &str, path: &str) -> Result<PathBuf, Errno> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    if program.is_empty() {
        return Err(Errno::ENOENT);
    }
    let mut denied = false;
    for dir in path.split(':') {
        // An empty entry means the current directory, as in execvp.
        let candidate = Path::new(if dir.is_empty() { "." } else { dir }).join(program);
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(candidate),
            Ok(_) => denied = true,
            Err(_) => {}
        }
    }
    Err(if denied { Errno::EACCES } else { Errno::ENOENT })
}

/// Starts the tasks of jobs; owns the files it writes in the spool directory.
#[derive(Debug)]
pub struct Launcher {
    spool_dir: PathBuf,
    hostname: String,
    /// Script file of each job seen, by sequence number.
    scripts: HashMap<u64, PathBuf>,
    /// Node file for each cpu count used.
    node_files: HashMap<u32, PathBuf>,
}

impl Launcher {
    /// A launcher writing into `spool_dir` (created, mode 0700, if missing) for a
    /// node called `hostname` (the name listed in node files).
    pub fn new(spool_dir: impl Into<PathBuf>, hostname: impl Into<String>) -> Result<Self, LaunchError> {
        let spool_dir = spool_dir.into();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&spool_dir)
            .map_err(|error| LaunchError::Spool { path: spool_dir.clone(), error })?;
        Ok(Self { spool_dir, hostname: hostname.into(), scripts: HashMap::new(), node_files: HashMap::new() })
    }

    /// The spool directory.
    pub fn spool_dir(&self) -> &Path {
        &self.spool_dir
    }

    /// Starts one task of `job`. The child runs in its own process group (its
    /// pid is the group id); the caller must reap it. The calling thread's cpu
    /// affinity changes for the duration of the call.
    ///
    /// Its environment is `job.spec.env`, then: `PBS_JOBID` and `PICLOUD_JOB_ID`
    /// (= `start.job_id`), `PBS_JOBNAME`, `PBS_O_WORKDIR` (unless set),
    /// `PBS_NODEFILE`, `PBS_QUEUE`, `PBS_ENVIRONMENT=PBS_BATCH`, `NCPUS` and
    /// `OMP_NUM_THREADS` (the job's `ncpus`), `TMPDIR` (unless set), and for array
    /// tasks `PBS_ARRAY_INDEX`, `PBS_ARRAYID`, `PICLOUD_TASK_INDEX` and `PBS_ARRAY_ID`
    /// (`<seq>[].<server>`).
    ///
    /// With a `cgroup`, the child starts inside it: on v1 the calling thread
    /// joins the cgroup around the spawn (the child inherits it, as it
    /// inherits the affinity); on v2, where only whole processes move, the
    /// child writes itself into `cgroup.procs` between fork and exec.
    pub fn spawn(
        &mut self,
        job: &JobDefinition,
        start: &StartTask,
        cgroup: Option<(&Cgroups, &JobCgroup)>,
    ) -> Result<Child, LaunchError> {
        let spec = &job.spec;
        let workdir = Path::new(&spec.workdir);
        match std::fs::metadata(workdir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                let error = io::Error::from_raw_os_error(libc::ENOTDIR);
                return Err(LaunchError::Workdir { path: workdir.to_path_buf(), error });
            }
            Err(error) => return Err(LaunchError::Workdir { path: workdir.to_path_buf(), error }),
        }

        let mut cmd = match &spec.command {
            JobCommand::Script { body } => {
                let script = self.script_for(job.seq, body)?;
                if body.starts_with("#!") {
                    Command::new(script)
                } else {
                    let mut cmd = Command::new("/bin/sh");
                    cmd.arg(script);
                    cmd
                }
            }
            JobCommand::Argv(argv) => {
                let (program, args) = argv.split_first().ok_or(LaunchError::EmptyCommand)?;
                let path = spec.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str());
                let resolved = resolve_program(program, path.unwrap_or(DEFAULT_PATH))
                    .map_err(|errno| LaunchError::Exec { what: format!("'{program}'"), errno })?;
                let mut cmd = Command::new(resolved);
                cmd.args(args);
                cmd
            }
            // Python calls go to the worker pool, never through here.
            JobCommand::Python(_) => return Err(LaunchError::EmptyCommand),
        };

        let ncpus = spec.resources.ncpus.max(1);
        let node_file = self.node_file_for(ncpus)?;
        let has = |key: &str| spec.env.iter().any(|(k, _)| k == key);
        cmd.env_clear().envs(spec.env.iter().map(|(k, v)| (k, v)));
        if !has("PBS_O_WORKDIR") {
            cmd.env("PBS_O_WORKDIR", &spec.workdir);
        }
        if !has("TMPDIR") {
            cmd.env("TMPDIR", "/tmp");
        }
        let ncpus = ncpus.to_string();
        cmd.env("PBS_JOBID", &start.job_id)
            .env("PICLOUD_JOB_ID", &start.job_id)
            .env("PBS_JOBNAME", &spec.name)
            .env("PBS_NODEFILE", node_file)
            .env("PBS_QUEUE", spec.queue.as_deref().unwrap_or(DEFAULT_QUEUE))
            .env("PBS_ENVIRONMENT", "PBS_BATCH")
            .env("NCPUS", &ncpus)
            .env("OMP_NUM_THREADS", &ncpus);
        if let Some(index) = start.task.index {
            let index = index.to_string();
            cmd.env("PBS_ARRAY_INDEX", &index)
                .env("PBS_ARRAYID", &index)
                .env("PICLOUD_TASK_INDEX", &index)
                .env("PBS_ARRAY_ID", array_id(&start.job_id, job.seq));
        }

        if !start.gpus.is_empty() {
            let gpus = start.gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            cmd.env("CUDA_VISIBLE_DEVICES", &gpus).env("PICLOUD_GPUS", &gpus);
        }

        let (stdout, stderr) = open_outputs(&start.stdout_path, &start.stderr_path)?;
        cmd.current_dir(workdir).stdin(Stdio::null()).stdout(stdout).stderr(stderr).process_group(0);

        // Both guards are dropped after the spawn: the thread's cgroups and
        // affinity come back.
        let mut _procs_file = None;
        let _in_cgroup = match cgroup {
            None => None,
            Some((cgroups, job_cgroup)) => match cgroups
                .enter_thread(job_cgroup)
                .map_err(LaunchError::Cgroup)?
            {
                Some(guard) => Some(guard),
                None => {
                    let path =
                        job_cgroup.procs_files().into_iter().next().expect("a v2 cgroup has one directory");
                    let file = OpenOptions::new().write(true).open(&path).map_err(|source| {
                        LaunchError::Cgroup(crate::cgroup::CgroupError {
                            op: "open",
                            path,
                            data: None,
                            source,
                        })
                    })?;
                    let fd = file.as_raw_fd();
                    // SAFETY: the hook makes one write(2) on a descriptor opened
                    // before the fork (and kept open until the spawn returns), from
                    // a static buffer: async-signal-safe, no allocation, no lock.
                    // Writing "0" moves the calling process, the child, into the cgroup.
                    unsafe {
                        cmd.pre_exec(move || {
                            if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                                Ok(())
                            } else {
                                Err(io::Error::last_os_error())
                            }
                        });
                    }
                    _procs_file = Some(file);
                    None
                }
            },
        };
        let _pinned = PinnedThread::to(&start.cpus)?;

        let mut attempt = 0;
        let spawned = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < ETXTBSY_RETRIES => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => break other,
            }
        };
        spawned.map_err(|e| {
            let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL));
            LaunchError::Exec { what: describe_program(job, self.scripts.get(&job.seq), errno), errno }
        })
    }

    /// Drops the job's script from the spool directory (its tasks have ended).
    pub fn forget(&mut self, seq: u64) {
        if let Some(path) = self.scripts.remove(&seq) {
            remove_quietly(&path);
        }
    }

    /// Removes every file this launcher wrote in the spool directory.
    pub fn cleanup(&mut self) {
        for path in self.scripts.drain().map(|(_, p)| p).chain(self.node_files.drain().map(|(_, p)| p)) {
            remove_quietly(&path);
        }
    }

    /// The job's script file, written on first use.
    fn script_for(&mut self, seq: u64, body: &str) -> Result<PathBuf, LaunchError> {
        if let Some(path) = self.scripts.get(&seq) {
            return Ok(path.clone());
        }
        let path = self.spool_dir.join(format!("{seq}.sh"));
        write_file(&path, body.as_bytes(), 0o700)
            .map_err(|error| LaunchError::Script { path: path.clone(), error })?;
        self.scripts.insert(seq, path.clone());
        Ok(path)
    }

    /// The node file listing this host `ncpus` times, written on first use.
    fn node_file_for(&mut self, ncpus: u32) -> Result<&Path, LaunchError> {
        if !self.node_files.contains_key(&ncpus) {
            let path = self.spool_dir.join(format!("nodefile.{ncpus}"));
            let line = format!("{}\n", self.hostname);
            write_file(&path, line.repeat(ncpus as usize).as_bytes(), 0o644)
                .map_err(|error| LaunchError::NodeFile { path: path.clone(), error })?;
            self.node_files.insert(ncpus, path);
        }
        Ok(&self.node_files[&ncpus])
    }
}

/// Writes a whole file with the given mode, replacing any older one.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    // Remove first: an existing file keeps its old mode when truncated.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    f.write_all(contents)
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// Opens the task's output files; one shared file when both paths are equal.
fn open_outputs(stdout_path: &str, stderr_path: &str) -> Result<(File, File), LaunchError> {
    let open = |stream: &'static str, path: &str| {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(path)
            .map_err(|error| LaunchError::Output { stream, path: PathBuf::from(path), error })
    };
    let stdout = open("stdout", stdout_path)?;
    let stderr = if stderr_path == stdout_path {
        stdout.try_clone().map_err(|error| LaunchError::Output {
            stream: "stderr",
            path: PathBuf::from(stderr_path),
            error,
        })?
    } else {
        open("stderr", stderr_path)?
    };
    Ok((stdout, stderr))
}

/// The calling thread pinned to some cpus; its former affinity comes back on drop.
struct PinnedThread {
    /// The affinity to restore; `None` when nothing was changed.
    old: Option<CpuSet>,
}

impl PinnedThread {
    /// Pins the calling thread to `cpus`; does nothing when the list is empty.
    fn to(cpus: &[u32]) -> Result<Self, LaunchError> {
        if cpus.is_empty() {
            return Ok(Self { old: None });
        }
        let mut set = CpuSet::new();
        for &cpu in cpus {
            set.set(cpu as usize).map_err(|_| LaunchError::Cpu { cpu })?;
        }
        let this_thread = Pid::from_raw(0);
        let pin_err = |errno| LaunchError::Pin { cpus: cpus.to_vec(), errno };
        let old = nix::sched::sched_getaffinity(this_thread).map_err(pin_err)?;
        nix::sched::sched_setaffinity(this_thread, &set).map_err(pin_err)?;
        Ok(Self { old: Some(old) })
    }
}

impl Drop for PinnedThread {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            if let Err(e) = nix::sched::sched_setaffinity(Pid::from_raw(0), old) {
                tracing::warn!("cannot restore the agent thread's cpu affinity: {e}");
            }
        }
    }
}

/// `PBS_ARRAY_ID` of an array task: its id with the index removed
/// (`12[3].srv` becomes `12[].srv`).
fn array_id(job_id: &str, seq: u64) -> String {
    match (job_id.find('['), job_id.find(']')) {
        (Some(open), Some(close)) if open < close => {
            format!("{}[]{}", &job_id[..open], &job_id[close + 1..])
        }
        _ => format!("{seq}[]"),
    }
}

/// Names what failed to execute, for the task's comment.
fn describe_program(job: &JobDefinition, script: Option<&PathBuf>, errno: Errno) -> String {
    match &job.spec.command {
        JobCommand::Argv(argv) => format!("'{}'", argv.first().map_or("", String::as_str)),
        JobCommand::Python(call) => format!("the Python interpreter '{}'", call.interpreter),
        JobCommand::Script { body } => {
            let interpreter = body
                .strip_prefix("#!")
                .and_then(|rest| rest.lines().next())
                .and_then(|line| line.split_whitespace().next());
            match interpreter {
                // The script exists (we wrote it): ENOENT means its interpreter is missing.
                Some(interp) if errno == Errno::ENOENT => {
                    format!("the job script's interpreter '{interp}'")
                }
                Some(_) => {
                    format!("the job script '{}'", script.map_or(String::new(), |p| p.display().to_string()))
                }
                None => "'/bin/sh'".to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use picloud_proto::{JobSpec, TaskId};

    /// A job definition running `command` in `workdir` with a small environment.
    pub(crate) fn job(seq: u64, command: JobCommand, workdir: &Path) -> JobDefinition {
        JobDefinition {
            seq,
            spec: JobSpec {
                env: vec![
                    ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
                    ("PBS_O_HOST".into(), "submithost".into()),
                    ("MY_VAR".into(), "my value".into()),
                ],
                rerunnable: false,
                submit_host: "submithost".into(),
                ..JobSpec::new("testjob", command, workdir.display().to_string())
            },
            user: "user".into(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        }
    }

    fn start(seq: u64, index: Option<u32>, dir: &Path) -> StartTask {
        let task = TaskId { seq, index };
        StartTask {
            task,
            job_id: task.display_with("srv"),
            cpus: Vec::new(),
            gpus: Vec::new(),
            stdout_path: dir.join("out").display().to_string(),
            stderr_path: dir.join("err").display().to_string(),
        }
    }

    fn sh(body: &str) -> JobCommand {
        JobCommand::Script { body: body.to_string() }
    }

    /// Runs one task to its end; returns (PBS exit status, stdout, stderr).
    fn run(launcher: &mut Launcher, job: &JobDefinition, st: &StartTask) -> (i32, String, String) {
        let mut child = launcher.spawn(job, st, None).unwrap();
        let status = wait_bounded(&mut child);
        let out = std::fs::read_to_string(&st.stdout_path).unwrap();
        let err = std::fs::read_to_string(&st.stderr_path).unwrap();
        (pbs_exit_status(status.into_raw()), out, err)
    }

    /// Waits for a child, killing it if it runs for more than 20 seconds.
    fn wait_bounded(child: &mut Child) -> ExitStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                panic!("child {} did not end in time", child.id());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn env_of(out: &str) -> HashMap<String, String> {
        out.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn environment_and_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let mut launcher = Launcher::new(&spool, "node7").unwrap();
        let mut job = job(12, sh("pwd >&2\nenv\n"), dir.path());
        job.spec.resources.ncpus = 3;
        job.spec.env.push(("TMPDIR".into(), "/scratch".into()));
        let st = start(12, None, dir.path());
        let (status, out, err) = run(&mut launcher, &job, &st);
        assert_eq!(status, 0, "{err}");
        assert_eq!(err.trim(), dir.path().canonicalize().unwrap().display().to_string());
        let env = env_of(&out);
        assert_eq!(env["PBS_JOBID"], "12.srv");
        assert_eq!(env["PICLOUD_JOB_ID"], "12.srv");
        assert_eq!(env["PBS_JOBNAME"], "testjob");
        assert_eq!(env["PBS_O_WORKDIR"], job.spec.workdir);
        assert_eq!(env["PBS_O_HOST"], "submithost");
        assert_eq!(env["MY_VAR"], "my value");
        assert_eq!(env["PBS_QUEUE"], DEFAULT_QUEUE);
        assert_eq!(env["PBS_ENVIRONMENT"], "PBS_BATCH");
        assert_eq!(env["NCPUS"], "3");
        assert_eq!(env["OMP_NUM_THREADS"], "3");
        assert_eq!(env["TMPDIR"], "/scratch", "a TMPDIR given by the job is kept");
        assert_eq!(std::fs::read_to_string(&env["PBS_NODEFILE"]).unwrap(), "node7\nnode7\nnode7\n");
        for absent in ["PBS_ARRAY_INDEX", "PBS_ARRAYID", "PBS_ARRAY_ID", "PICLOUD_TASK_INDEX"] {
            assert!(!env.contains_key(absent), "{absent} is set for a plain job");
        }
        // The environment was cleared: nothing leaks from the agent's own.
        let mut expected: Vec<&str> = job.spec.env.iter().map(|(k, _)| k.as_str()).collect();
        expected.extend([
            "PBS_JOBID",
            "PICLOUD_JOB_ID",
            "PBS_JOBNAME",
            "PBS_O_WORKDIR",
            "PBS_NODEFILE",
            "PBS_QUEUE",
            "PBS_ENVIRONMENT",
            "NCPUS",
            "OMP_NUM_THREADS",
        ]);
        // What the shell itself exports.
        expected.extend(["PWD", "OLDPWD", "SHLVL", "_"]);
        for key in env.keys() {
            assert!(expected.contains(&key.as_str()), "unexpected variable {key} in the job");
        }
    }

    #[test]
    fn array_task_environment_and_shared_script() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let mut launcher = Launcher::new(&spool, "node7").unwrap();
        let job = job(5, sh("env"), dir.path());
        for index in [1, 2] {
            let mut st = start(5, Some(index), dir.path());
            st.stdout_path = dir.path().join(format!("out.{index}")).display().to_string();
            let (status, out, _) = run(&mut launcher, &job, &st);
            assert_eq!(status, 0);
            let env = env_of(&out);
            assert_eq!(env["PBS_JOBID"], format!("5[{index}].srv"));
            assert_eq!(env["PBS_ARRAY_INDEX"], index.to_string());
            assert_eq!(env["PBS_ARRAYID"], index.to_string());
            assert_eq!(env["PICLOUD_TASK_INDEX"], index.to_string());
            assert_eq!(env["PBS_ARRAY_ID"], "5[].srv");
            assert_eq!(env["TMPDIR"], "/tmp");
        }
        // One script for the job and one node file, whatever the number of tasks.
        let mut files: Vec<String> = std::fs::read_dir(&spool)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, vec!["5.sh", "nodefile.1"]);
        launcher.forget(5);
        assert!(!spool.join("5.sh").exists());
        launcher.cleanup();
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    }

    #[test]
    fn separate_and_joined_output() {
        let dir = tempfile::tempdir().unwrap();
        let mut launcher = Launcher::new(dir.path().join("spool"), "n").unwrap();
        let job = job(1, sh("echo one\necho two >&2\necho three\n"), dir.path());
        let st = start(1, None, dir.path());
        std::fs::write(&st.stdout_path, "old contents that must be truncated away\n").unwrap();
        let (status, out, err) = run(&mut launcher, &job, &st);
        assert_eq!(status, 0);
        assert_eq!(out, "one\nthree\n");
        assert_eq!(err, "two\n");

        let mut joined = start(1, None, dir.path());
        joined.stdout_path = dir.path().join("joined").display().to_string();
        joined.stderr_path = joined.stdout_path.clone();
        let (_, out, _) = run(&mut launcher, &job, &joined);
        assert_eq!(out, "one\ntwo\nthree\n", "lines interleave in order");
        let mode = std::fs::metadata(&joined.stdout_path).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o644);
    }

    #[test]
    fn argv_and_shebang_scripts() {
        let dir = tempfile::tempdir().unwrap();
        let mut launcher = Launcher::new(dir.path().join("spool"), "n").unwrap();
        // Looked up in the job's PATH, arguments passed as they are.
        let argv = job(
            1,
            JobCommand::Argv(vec!["printf".into(), "%s|%s".into(), "a b".into(), "c".into()]),
            dir.path(),
        );
        let (status, out, _) = run(&mut launcher, &argv, &start(1, None, dir.path()));
        assert_eq!((status, out.as_str()), (0, "a b|c"));
        // A #! script runs under its interpreter.
        let script = job(2, sh("#!/bin/sh -e\necho \"$0\"\nfalse\necho not reached\n"), dir.path());
        let (status, out, _) = run(&mut launcher, &script, &start(2, None, dir.path()));
        assert_eq!(status, 1);
        assert!(out.trim().ends_with("2.sh"), "{out}");
        // The exit code is passed through.
        let code = job(3, sh("exit 42"), dir.path());
        assert_eq!(run(&mut launcher, &code, &start(3, None, dir.path())).0, 42);
        // Death by a signal is 256 + signal.
        let killed = job(4, sh("kill -9 $$"), dir.path());
        assert_eq!(run(&mut launcher, &killed, &start(4, None, dir.path())).0, 256 + 9);
    }

    #[test]
    fn exec_failures_end_the_task_with_127_or_126() {
        let dir = tempfile::tempdir().unwrap();
        let mut launcher = Launcher::new(dir.path().join("spool"), "n").unwrap();
        let st = start(1, None, dir.path());

        let missing = job(1, JobCommand::Argv(vec!["nosuchcmd".into()]), dir.path());
        let err = launcher.spawn(&missing, &st, None).unwrap_err();
        assert_eq!(err.exit_status(), 127);
        assert_eq!(err.to_string(), "cannot execute 'nosuchcmd': No such file or directory");

        let interp = job(2, sh("#!/no/such/interpreter -x\necho hi\n"), dir.path());
        let err = launcher.spawn(&interp, &st, None).unwrap_err();
        assert_eq!(err.exit_status(), 127);
        assert_eq!(
            err.to_string(),
            "cannot execute the job script's interpreter '/no/such/interpreter': No such file or directory"
        );

        let not_exec = dir.path().join("data.txt");
        std::fs::write(&not_exec, "data").unwrap();
        let denied = job(3, JobCommand::Argv(vec![not_exec.display().to_string()]), dir.path());
        let err = launcher.spawn(&denied, &st, None).unwrap_err();
        assert_eq!(err.exit_status(), 126, "{err}");
        assert!(err.to_string().contains("Permission denied"), "{err}");

        let empty = job(4, JobCommand::Argv(Vec::new()), dir.path());
        assert!(matches!(launcher.spawn(&empty, &st, None), Err(LaunchError::EmptyCommand)));
    }

    #[test]
    fn unopenable_output_or_workdir_fails_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let mut launcher = Launcher::new(dir.path().join("spool"), "n").unwrap();
        let job1 = job(1, sh("true"), dir.path());
        let mut st = start(1, None, dir.path());
        st.stderr_path = dir.path().join("no/such/dir/err").display().to_string();
        let err = launcher.spawn(&job1, &st, None).unwrap_err();
        assert_eq!(err.exit_status(), SETUP_FAILED);
        let msg = err.to_string();
        assert!(msg.starts_with("cannot open the stderr file ") && msg.contains("no/such/dir/err"), "{msg}");
        assert!(msg.ends_with("No such file or directory (os error 2)"), "{msg}");

        let gone = job(2, sh("true"), &dir.path().join("vanished"));
        let err = launcher.spawn(&gone, &start(2, None, dir.path()), None).unwrap_err();
        assert!(matches!(err, LaunchError::Workdir { .. }), "{err}");
        assert!(err.to_string().contains("vanished"), "{err}");
    }

    #[test]
    fn pinning_follows_the_cpus() {
        let dir = tempfile::tempdir().unwrap();
        let mut launcher = Launcher::new(dir.path().join("spool"), "n").unwrap();
        let job = job(1, sh("grep Cpus_allowed_list /proc/self/status"), dir.path());
        let allowed_list = |status: &str| {
            let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap();
            line.split_whitespace().last().unwrap().to_string()
        };
        let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
        let ours: Vec<u32> =
            (0..CpuSet::count()).filter(|&c| allowed.is_set(c).unwrap()).map(|c| c as u32).collect();
        let mut st = start(1, None, dir.path());

        // Pinned to one cpu: the last one we may use.
        let last = *ours.last().unwrap();
        st.cpus = vec![last];
        let (status, out, _) = run(&mut launcher, &job, &st);
        assert_eq!(status, 0);
        assert_eq!(allowed_list(&out), last.to_string());

        // Pinned to two cpus, when we have two.
        if let [a, .., b] = ours[..] {
            st.cpus = vec![a, b];
            let (_, out, _) = run(&mut launcher, &job, &st);
            let sep = if b == a + 1 { '-' } else { ',' };
            assert_eq!(allowed_list(&out), format!("{a}{sep}{b}"));
        }

        // No cpus: not pinned, the job inherits our own affinity.
        st.cpus.clear();
        let (_, out, _) = run(&mut launcher, &job, &st);
        let own = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert_eq!(allowed_list(&out), allowed_list(&own));

        // A cpu beyond the mask fails before forking.
        st.cpus = vec![u32::MAX];
        let err = launcher.spawn(&job, &st, None).unwrap_err();
        assert!(matches!(err, LaunchError::Cpu { cpu: u32::MAX }), "{err}");
        // A cpu this process may not use is refused by the kernel.
        if let Some(outside) = (0..CpuSet::count() as u32).find(|&c| !ours.contains(&c)) {
            st.cpus = vec![outside];
            let err = launcher.spawn(&job, &st, None).unwrap_err();
            assert!(matches!(err, LaunchError::Pin { .. }), "{err}");
            assert_eq!(err.exit_status(), SETUP_FAILED);
        }
        // The calling thread got its affinity back after each spawn.
        let after = nix::sched::sched_getaffinity(Pid::from_raw(0)).unwrap();
        assert_eq!(after, allowed);
    }

    #[test]
    fn sigpipe_is_not_inherited_as_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut launcher = Launcher::new(dir.path().join("spool"), "n").unwrap();
        // Executed directly, not through a shell that might reset it itself.
        let argv = ["grep", "-E", "^SigIgn", "/proc/self/status"];
        let job = job(1, JobCommand::Argv(argv.iter().map(|a| a.to_string()).collect()), dir.path());
        let st = start(1, None, dir.path());
        let (status, out, err) = run(&mut launcher, &job, &st);
        assert_eq!(status, 0, "{err}");
        let ignored = u64::from_str_radix(out.split_whitespace().last().unwrap(), 16).unwrap();
        let sigpipe_bit = 1u64 << (libc::SIGPIPE - 1);
        assert_eq!(ignored & sigpipe_bit, 0, "SIGPIPE is ignored in the job: {out}");
    }

    #[test]
    fn argv_programs_are_resolved_in_the_jobs_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        write_file(&bin.join("hello"), b"#!/bin/sh\necho from-path\n", 0o755).unwrap();
        write_file(&bin.join("plain"), b"not executable", 0o644).unwrap();
        let path = format!("{}:/usr/bin:/bin", bin.display());
        assert_eq!(resolve_program("hello", &path), Ok(bin.join("hello")));
        assert_eq!(resolve_program("sh", "/nonexistent:/bin"), Ok(PathBuf::from("/bin/sh")));
        assert_eq!(resolve_program("./x", "/bin"), Ok(PathBuf::from("./x")));
        assert_eq!(resolve_program("plain", &path), Err(Errno::EACCES));
        assert_eq!(resolve_program("no-such-program", &path), Err(Errno::ENOENT));
    }

    #[test]
    fn gpus_are_named_in_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let mut launcher = Launcher::new(dir.path().join("spool"), "n").unwrap();
        let job = job(1, sh("echo ${CUDA_VISIBLE_DEVICES:-none} ${PICLOUD_GPUS:-none}"), dir.path());
        let mut st = start(1, None, dir.path());
        let (_, out, _) = run(&mut launcher, &job, &st);
        assert_eq!(out, "none none\n", "no GPUs given, none named");
        st.gpus = vec![1, 3];
        let (status, out, err) = run(&mut launcher, &job, &st);
        assert_eq!(status, 0, "{err}");
        assert_eq!(out, "1,3 1,3\n");
    }

    #[test]
    fn own_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut launcher = Launcher::new(dir.path().join("spool"), "n").unwrap();
        // Field 5 of /proc/PID/stat is the process group.
        let job = job(1, sh("echo $$; cut -d' ' -f5 /proc/$$/stat"), dir.path());
        let st = start(1, None, dir.path());
        let (status, out, _) = run(&mut launcher, &job, &st);
        assert_eq!(status, 0);
        let mut words = out.split_whitespace();
        let (pid, pgid) = (words.next().unwrap(), words.next().unwrap());
        assert_eq!(pid, pgid, "the task leads its own process group");
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(pbs_exit_status(0), 0);
        assert_eq!(pbs_exit_status(3 << 8), 3);
        assert_eq!(pbs_exit_status(libc::SIGKILL), 265);
        assert_eq!(pbs_exit_status(libc::SIGTERM), 271);
        assert_eq!(array_id("12[3].srv", 12), "12[].srv");
        assert_eq!(array_id("12[3]", 12), "12[]");
        assert_eq!(array_id("weird", 12), "12[]");
    }
}
