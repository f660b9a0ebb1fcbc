//! Starting command jobs: one child process per task, in its own process group,
//! pinned to the cpus the server chose, with the PBS environment, as the job's
//! owner.
//!
//! For each [`StartTask`] the [`Launcher`]:
//!
//! 1. decides whom the task runs as ([`Launcher::owner_of`]). An agent running
//!    as root starts every job of another user as that user: the [`Owner`] is
//!    the job's user name looked up on this node (its uid must be the job's),
//!    with the job's primary gid and the name's supplementary groups
//!    (`getgrouplist`), cached per uid for [`OWNER_TTL`]. An agent that is not
//!    root cannot switch users: it runs its own user's jobs, as itself (a
//!    personal cluster), and refuses the others ([`LaunchError::OtherUser`]);
//! 2. writes the job's script once per job (`<seq>.sh`), shared by every task
//!    of an array; a script starting with `#!` is executed directly, any other
//!    is run by `/bin/sh`; an `Argv` command is looked up in the job's own
//!    `PATH`. Node files (`PBS_NODEFILE`) are written once per cpu count;
//! 3. builds the environment: the job's, as the client composed it, plus the
//!    `PBS_*` variables of this task (see [`Launcher::spawn`]);
//! 4. starts the child, by one of two paths:
//!    - *as the agent itself* (the agent's own jobs): the agent opens the
//!      task's stdout and stderr (created or truncated, mode 0644; one shared
//!      file when both paths are equal, so lines interleave as written) and
//!      std starts the child with `posix_spawn`, a vfork-style clone that
//!      copies no page tables, several times cheaper than fork for the agent.
//!      No `pre_exec` hook is used, since one would force the fork path
//!      (except on cgroup v2, where the child must join its cgroup itself:
//!      the one step of [`ChildSetup`] it then takes), and the agent keeps an
//!      empty signal mask so that jobs start with one;
//!    - *as the owner*: std's fork path, with one `pre_exec` hook
//!      ([`ChildSetup`]) that in the child, in this order, joins the task's
//!      cgroup (v2; this needs root), takes the owner's groups, gid and uid,
//!      enters the working directory, and opens stdout and stderr. So the
//!      agent never opens a path a user named, the output files are created
//!      by the job's user as in PBS, and a user cannot use a directory they
//!      could not enter themselves. A failure there comes back as the spawn's
//!      error code, tagged with the step ([`ChildStep`]), and ends the task
//!      with a message such as `cannot open the stdout file /x as user ann:
//!      Permission denied`;
//!
//!    either way inside the task's cgroup (see [`crate::cgroup`]) and pinned
//!    to its cpus by inheritance: the launching thread is pinned (a pooled
//!    cgroup's spawner thread for good, else the calling thread for the
//!    duration of the spawn) and the child inherits its affinity.
//!
//! Pinning by inheritance rather than in the child: a child that changes its
//! own affinity migrates to another cpu between fork and exec, while the
//! parent waits for the exec; measured on 2 cores, that doubled the time
//! [`Launcher::spawn`] takes (about 300 µs against 650 µs per `true` task).
//!
//! # Where a job of another user finds its files
//!
//! Such a job reads its script and its node file as its user, by path: `$0`
//! and `PBS_NODEFILE` are real files, as in PBS. They live in the *shared
//! spool*: the configured spool directory when every directory above it may be
//! searched by others (it is then made 0711: others may reach a file whose name
//! they know, never list them), else a fresh `/run/picloud/spool-XXXXXX`
//! (0711, below a root-owned 0711 `/run/picloud`), made when the first such
//! job comes and removed by [`Launcher::cleanup`]. The default state directory
//! of root is `/root/.picloud`, and `/root` is 0700: that is the case the
//! second location is for. Scripts there belong to their job's owner, mode
//! 0500, so no other user reads them; node files (this host's name, repeated)
//! are 0644. Handing the child a descriptor of a root-only file and running
//! `/dev/fd/N` instead was not taken: opening `/dev/fd/N` again checks the
//! file's own permissions anyway, `$0` would name a descriptor that leaks into
//! every process of the job, and `PBS_NODEFILE` must stay a path that a job's
//! programs can open again and again.
//!
//! A task that cannot start yields a [`LaunchError`] whose
//! [`exit_status`](LaunchError::exit_status) and message become the task's
//! end: 127 (or 126) when the program cannot be executed, as a shell would
//! say, and [`SETUP_FAILED`] when the task failed before that.
//!
//! The launcher does not wait for its children: the caller reaps them.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sched::CpuSet;
use nix::unistd::Pid;
use picloud_proto::{JobCommand, JobDefinition, StartTask};

use crate::cgroup::{CgroupError, JobCgroup, PooledCgroup};

/// Exit status of a task that failed before its program could be executed
/// (spool or output file trouble): PBS's `JOB_EXEC_FAIL1`, "never ran".
pub const SETUP_FAILED: i32 = picloud_proto::EXIT_NEVER_RAN;

/// Exit status when the program was not found (as shells report it).
pub const EXIT_NOT_FOUND: i32 = 127;

/// Exit status when the program exists but cannot be executed.
pub const EXIT_NOT_EXECUTABLE: i32 = 126;

/// Queue name reported in `PBS_QUEUE` when the job named none (the server's default).
pub use picloud_proto::submit_env::DEFAULT_QUEUE;

/// How long a looked-up [`Owner`] is reused before it is looked up again (so
/// that a user added to a group gets it in jobs started a minute later).
pub const OWNER_TTL: Duration = Duration::from_secs(60);

/// Where a root agent makes its shared spool when the configured spool
/// directory cannot be reached by other users (see the module documentation).
const RUN_SPOOL: &str = "/run/picloud";

/// How many times a spawn is retried when the fresh script is momentarily
/// "text file busy": another thread's fork may hold its write descriptor until
/// that child execs (a Linux race; in the agent only one spawn runs at a time).
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
    /// No spool directory that other users can reach could be made.
    #[error("cannot make a spool directory that the job's user can reach: {0}")]
    SharedSpool(String),
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
    Cgroup(CgroupError),
    /// The agent is not root and the job belongs to another user.
    #[error(
        "this node agent runs as uid {agent_uid} and does not run jobs of other users \
         (this job belongs to {user}, uid {uid})"
    )]
    OtherUser {
        /// The agent's effective uid.
        agent_uid: u32,
        /// The job's owner.
        user: String,
        /// The owner's uid.
        uid: u32,
    },
    /// The job's owner cannot be found on this node (or is someone else here).
    #[error("cannot run the job as {user} (uid {uid}): {reason}")]
    Owner {
        /// The job's owner.
        user: String,
        /// The owner's uid, as the server knows it.
        uid: u32,
        /// What is wrong.
        reason: String,
    },
    /// A step of the child between fork and exec failed (see [`ChildSetup`]).
    #[error("{what}: {}", errno.desc())]
    ChildSetup {
        /// The step, e.g. `cannot open the stdout file /x/out as user ann`.
        what: String,
        /// Which step.
        step: ChildStep,
        /// The error the child met.
        errno: Errno,
    },
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

// ---------------------------------------------------------------------------
// Owners

/// A Unix user whom a job runs as, looked up on this node: what a child
/// needs to become them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    name: String,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl Owner {
    /// Looks up user `name` on this node: it must exist and have uid `uid`.
    /// The owner gets primary group `gid` and the supplementary groups
    /// `getgrouplist` gives for the name.
    pub fn lookup(name: &str, uid: u32, gid: u32) -> Result<Self, LaunchError> {
        let fail = |reason: String| LaunchError::Owner { user: name.to_string(), uid, reason };
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| fail(format!("cannot look the user up: {}", e.desc())))?
            .ok_or_else(|| fail("there is no such user on this node".into()))?;
        if user.uid.as_raw() != uid {
            return Err(fail(format!("the user has uid {} on this node", user.uid)));
        }
        let c_name = CString::new(name).map_err(|_| fail("the name holds a NUL byte".into()))?;
        let groups = nix::unistd::getgrouplist(&c_name, nix::unistd::Gid::from_raw(gid))
            .map_err(|e| fail(format!("cannot list the user's groups: {}", e.desc())))?;
        Ok(Self {
            name: name.to_string(),
            uid,
            gid,
            groups: groups.into_iter().map(|g| g.as_raw()).collect(),
        })
    }

    /// The user name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The uid.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The primary gid.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// Every group the owner's processes have (the primary one included).
    pub fn groups(&self) -> &[u32] {
        &self.groups
    }
}

// ---------------------------------------------------------------------------
// The child's steps between fork and exec

/// A step of [`ChildSetup`], as tagged in the error code a failed spawn returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ChildStep {
    /// Writing itself into the cgroup's `cgroup.procs`.
    JoinCgroup = 1,
    /// `setgroups`.
    Groups = 2,
    /// `setgid`.
    Gid = 3,
    /// `setuid`.
    Uid = 4,
    /// `chdir` into the working directory.
    Workdir = 5,
    /// Opening the stdout file.
    Stdout = 6,
    /// Opening the stderr file.
    Stderr = 7,
}

impl ChildStep {
    const ALL: [ChildStep; 7] = [
        ChildStep::JoinCgroup,
        ChildStep::Groups,
        ChildStep::Gid,
        ChildStep::Uid,
        ChildStep::Workdir,
        ChildStep::Stdout,
        ChildStep::Stderr,
    ];
}

/// The step is carried in the bits of the error code above this shift; errno
/// values are far below `1 << 16`. std hands the code a `pre_exec` hook fails
/// with back to the parent unchanged ("an I/O error whose OS error code will
/// be communicated back to the parent").
const STEP_SHIFT: u32 = 16;

/// The failed step and the errno, from the error a spawn returned; `None`
/// when the error did not come from a [`ChildSetup`] step (e.g. exec's).
pub fn child_step_error(err: &io::Error) -> Option<(ChildStep, Errno)> {
    let code = err.raw_os_error()?;
    let step = ChildStep::ALL.into_iter().find(|s| *s as i32 == code >> STEP_SHIFT)?;
    Some((step, Errno::from_raw(code & ((1 << STEP_SHIFT) - 1))))
}

/// What a child does between fork and exec, prepared before the fork: the
/// child then only makes system calls on data that is ready, with no
/// allocation and no lock (it is a forked copy of a multi-threaded process,
/// where another thread may have held the allocator's lock at the fork).
///
/// Installed with [`ChildSetup::install`], it runs, in this order: join a
/// cgroup, `setgroups`, `setgid`, `setuid` (the cgroup first, while the child
/// is still root), `chdir`, then open stdout and stderr (as the user, on
/// descriptors 1 and 2). Any step may be left out. A std `current_dir` would
/// be entered *before* the hook, as root: set the directory here instead.
#[derive(Debug, Default)]
pub struct ChildSetup {
    /// `cgroup.procs` files to write "0" (the writer itself) to, opened before the fork.
    join: Vec<File>,
    /// (uid, gid, supplementary groups).
    owner: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    workdir: Option<CString>,
    stdout: Option<CString>,
    /// `None` with `stdout` set: stderr goes to the stdout file.
    stderr: Option<CString>,
    /// What the messages of failed steps name.
    context: SetupContext,
}

/// What a [`ChildSetup`] was to do, to explain a failed step after the spawn.
#[derive(Debug, Clone, Default)]
pub struct SetupContext {
    cgroup: Option<PathBuf>,
    user: Option<(String, u32, u32)>,
    workdir: Option<PathBuf>,
    stdout: Option<PathBuf>,
    stderr: Option<PathBuf>,
}

impl SetupContext {
    /// The task error for a spawn error, when it came from a failed step.
    pub fn error(&self, err: &io::Error) -> Option<LaunchError> {
        let (step, errno) = child_step_error(err)?;
        let as_user = self.user.as_ref().map(|(name, ..)| format!(" as user {name}")).unwrap_or_default();
        let shown = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let what = match step {
            ChildStep::JoinCgroup => format!("cannot join the task's cgroup {}", shown(&self.cgroup)),
            ChildStep::Groups | ChildStep::Gid | ChildStep::Uid => {
                let (name, uid, gid) = self.user.clone().unwrap_or_default();
                format!("cannot switch to user {name} (uid {uid}, gid {gid})")
            }
            ChildStep::Workdir => {
                format!("cannot use the working directory {}{as_user}", shown(&self.workdir))
            }
            ChildStep::Stdout => format!("cannot open the stdout file {}{as_user}", shown(&self.stdout)),
            ChildStep::Stderr => format!("cannot open the stderr file {}{as_user}", shown(&self.stderr)),
        };
        Some(LaunchError::ChildSetup { what, step, errno })
    }
}

/// A path as a C string for the child; a path with a NUL byte is refused.
fn c_path(path: &Path) -> Result<CString, io::Error> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl ChildSetup {
    /// A setup that does nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether it has nothing to do (then no hook is needed).
    pub fn is_empty(&self) -> bool {
        self.join.is_empty() && self.owner.is_none() && self.workdir.is_none() && self.stdout.is_none()
    }

    /// Makes the child join `cgroup` (each of its `cgroup.procs` files) first,
    /// while still root: on v2, where the agent cannot start a child inside a
    /// cgroup otherwise, or for a cgroup of a long-lived process.
    pub fn join_cgroup(&mut self, cgroup: &JobCgroup) -> Result<&mut Self, CgroupError> {
        for path in cgroup.procs_files() {
            let file = OpenOptions::new().write(true).open(&path).map_err(|source| CgroupError {
                op: "open",
                path: path.clone(),
                data: None,
                source,
            })?;
            self.context.cgroup.get_or_insert(path);
            self.join.push(file);
        }
        Ok(self)
    }

    /// Makes the child drop to `owner`: its groups, gid, then uid.
    pub fn run_as(&mut self, owner: &Owner) -> &mut Self {
        self.owner = Some((owner.uid, owner.gid, owner.groups.clone()));
        self.context.user = Some((owner.name.clone(), owner.uid, owner.gid));
        self
    }

    /// Makes the child enter `dir` (after dropping privileges).
    pub fn workdir(&mut self, dir: &Path) -> io::Result<&mut Self> {
        self.workdir = Some(c_path(dir)?);
        self.context.workdir = Some(dir.to_path_buf());
        Ok(self)
    }

    /// Makes the child open `stdout` and `stderr` (created or truncated, mode
    /// 0644 less the umask; one shared file when the paths are equal) on
    /// descriptors 1 and 2, after dropping privileges.
    pub fn outputs(&mut self, stdout: &Path, stderr: &Path) -> io::Result<&mut Self> {
        self.stdout = Some(c_path(stdout)?);
        self.stderr = if stderr == stdout { None } else { Some(c_path(stderr)?) };
        self.context.stdout = Some(stdout.to_path_buf());
        self.context.stderr = Some(stderr.to_path_buf());
        Ok(self)
    }

    /// Adds the hook to `cmd` (which makes std fork), and returns what
    /// explains a failed step: pass the spawn's error to [`SetupContext::error`].
    pub fn install(self, cmd: &mut Command) -> SetupContext {
        let context = self.context.clone();
        // SAFETY: `apply` is async-signal-safe: it makes system calls on
        // buffers built before the fork (C strings, the group list, open
        // descriptors), allocates nothing and takes no lock; the error values
        // it returns hold a raw OS error code, which needs no allocation.
        unsafe {
            cmd.pre_exec(move || self.apply());
        }
        context
    }

    /// The steps, in the child. An error carries its step in its code (see [`STEP_SHIFT`]).
    fn apply(&self) -> io::Result<()> {
        let failed = |step: ChildStep| {
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL);
            io::Error::from_raw_os_error(errno | (step as i32) << STEP_SHIFT)
        };
        for file in &self.join {
            // SAFETY: a write(2) of a static one-byte buffer on a descriptor
            // that is open for as long as `self` lives.
            if unsafe { libc::write(file.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
                return Err(failed(ChildStep::JoinCgroup));
            }
        }
        if let Some((uid, gid, groups)) = &self.owner {
            // SAFETY: the pointer and length describe the live `groups` vector.
            if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
                return Err(failed(ChildStep::Groups));
            }
            // SAFETY: plain system calls on integers. The gid goes first: once
            // the uid is not 0 any more the gid can no longer change. Only one
            // thread exists in the child, so the per-thread credentials glibc
            // would otherwise broadcast are the process's.
            if unsafe { libc::setgid(*gid) } != 0 {
                return Err(failed(ChildStep::Gid));
            }
            // SAFETY: as above.
            if unsafe { libc::setuid(*uid) } != 0 {
                return Err(failed(ChildStep::Uid));
            }
        }
        if let Some(dir) = &self.workdir {
            // SAFETY: `dir` is a NUL-terminated string that `self` owns.
            if unsafe { libc::chdir(dir.as_ptr()) } != 0 {
                return Err(failed(ChildStep::Workdir));
            }
        }
        if let Some(stdout) = &self.stdout {
            redirect(stdout, 1).map_err(|()| failed(ChildStep::Stdout))?;
            match &self.stderr {
                Some(stderr) => redirect(stderr, 2).map_err(|()| failed(ChildStep::Stderr))?,
                // SAFETY: dup2 on two descriptor numbers.
                None if unsafe { libc::dup2(1, 2) } == -1 => return Err(failed(ChildStep::Stderr)),
                None => {}
            }
        }
        Ok(())
    }
}

/// In the child: opens `path` for writing (created or truncated) onto
/// descriptor `target`. `Err(())` leaves the cause in errno.
fn redirect(path: &CString, target: libc::c_int) -> Result<(), ()> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_NOCTTY;
    // SAFETY: `path` is a NUL-terminated string; the mode is the variadic argument O_CREAT needs.
    let fd = unsafe { libc::open(path.as_ptr(), flags, 0o644 as libc::c_uint) };
    if fd == -1 {
        return Err(());
    }
    // Descriptors 0-2 are taken (std put /dev/null there), so `fd` is above
    // them; dup2 clears close-on-exec on the copy, and the original closes at
    // exec. (No assertion here: a panic in the child would allocate.)
    let kept = if fd == target {
        // SAFETY: fcntl on a descriptor number: the file stays open at exec.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }
    } else {
        // SAFETY: dup2 on two descriptor numbers.
        unsafe { libc::dup2(fd, target) }
    };
    if kept == -1 { Err(()) } else { Ok(()) }
}

/// Makes `cmd` start as `owner`, in `workdir` if given (entered as the owner),
/// with the groups `owner` has: the public way to drop privileges for any
/// process the agent starts (e.g. a Python worker). Needs a root agent. Set no
/// `current_dir` on `cmd` (std would enter it as root). A failed spawn's error
/// is explained by the returned [`SetupContext`].
pub fn run_as_owner(cmd: &mut Command, owner: &Owner, workdir: Option<&Path>) -> io::Result<SetupContext> {
    let mut setup = ChildSetup::new();
    setup.run_as(owner);
    if let Some(dir) = workdir {
        setup.workdir(dir)?;
    }
    Ok(setup.install(cmd))
}

// ---------------------------------------------------------------------------
// The launcher

/// Where the files that jobs of other users read go (a root agent only).
#[derive(Debug)]
enum SharedSpool {
    /// Not root: no job of another user is started.
    NotRoot,
    /// The spool directory itself: every user can reach it.
    Spool,
    /// To be made below [`RUN_SPOOL`] when first needed.
    Pending,
    /// Made below [`RUN_SPOOL`]; removed by [`Launcher::cleanup`].
    Made(PathBuf),
    /// Could not be made, for this reason.
    Failed(String),
}

/// Starts the tasks of jobs; owns the files it writes in the spool directories.
#[derive(Debug)]
pub struct Launcher {
    spool_dir: PathBuf,
    hostname: String,
    /// The agent's effective uid: jobs of this uid run as the agent itself.
    euid: u32,
    shared: SharedSpool,
    /// Script file of each job seen, by sequence number.
    scripts: HashMap<u64, PathBuf>,
    /// Node file for each (in the shared spool?, cpu count) used.
    node_files: HashMap<(bool, u32), PathBuf>,
    /// Owners looked up, by uid, with when.
    owners: HashMap<u32, (Instant, Arc<Owner>)>,
}

impl Launcher {
    /// A launcher writing into `spool_dir` (created if missing: mode 0700, or
    /// 0711 for a root agent, whose jobs of other users may need to reach it)
    /// for a node called `hostname` (the name listed in node files).
    pub fn new(spool_dir: impl Into<PathBuf>, hostname: impl Into<String>) -> Result<Self, LaunchError> {
        let spool_dir = spool_dir.into();
        let euid = nix::unistd::geteuid().as_raw();
        let spool_err = |error| LaunchError::Spool { path: spool_dir.clone(), error };
        DirBuilder::new()
            .recursive(true)
            .mode(if euid == 0 { 0o711 } else { 0o700 })
            .create(&spool_dir)
            .map_err(spool_err)?;
        let shared = if euid != 0 {
            tracing::info!(
                "this node agent runs as uid {euid}, not root: it runs every job as itself, \
                 and only jobs of its own user (a personal cluster)"
            );
            SharedSpool::NotRoot
        } else if searchable_by_all_above(&spool_dir) {
            std::fs::set_permissions(&spool_dir, std::fs::Permissions::from_mode(0o711))
                .map_err(spool_err)?;
            SharedSpool::Spool
        } else {
            SharedSpool::Pending
        };
        Ok(Self {
            spool_dir,
            hostname: hostname.into(),
            euid,
            shared,
            scripts: HashMap::new(),
            node_files: HashMap::new(),
            owners: HashMap::new(),
        })
    }

    /// The spool directory.
    pub fn spool_dir(&self) -> &Path {
        &self.spool_dir
    }

    /// Whether this launcher starts jobs of other users, as them (the agent is root).
    pub fn runs_jobs_as_owners(&self) -> bool {
        self.euid == 0
    }

    /// Whom `job` runs as: `None` for the agent itself (the job is the agent's
    /// own user's), else its owner, looked up on this node (cached). Fails for
    /// a job of another user when the agent is not root, or when the owner
    /// does not exist here.
    pub fn owner_of(&mut self, job: &JobDefinition) -> Result<Option<Arc<Owner>>, LaunchError> {
        if job.uid == self.euid {
            return Ok(None);
        }
        if self.euid != 0 {
            return Err(LaunchError::OtherUser {
                agent_uid: self.euid,
                user: job.user.clone(),
                uid: job.uid,
            });
        }
        let now = Instant::now();
        if let Some((at, owner)) = self.owners.get(&job.uid) {
            if now.duration_since(*at) < OWNER_TTL && owner.name == job.user && owner.gid == job.gid {
                return Ok(Some(owner.clone()));
            }
        }
        let owner = Arc::new(Owner::lookup(&job.user, job.uid, job.gid)?);
        self.owners.insert(job.uid, (now, owner.clone()));
        Ok(Some(owner))
    }

    /// Starts one task of `job`. The child runs in its own process group (its
    /// pid is the group id); the caller must reap it. Without a `cgroup` the
    /// calling thread's cpu affinity changes for the duration of the call.
    ///
    /// Its environment is `job.spec.env`, then: `PBS_JOBID` and `PICLOUD_JOB_ID`
    /// (= `start.job_id`), `PBS_JOBNAME`, `PBS_O_WORKDIR` (unless set),
    /// `PBS_NODEFILE`, `PBS_QUEUE`, `PBS_ENVIRONMENT=PBS_BATCH`, `NCPUS` and
    /// `OMP_NUM_THREADS` (the job's `ncpus`), `TMPDIR` (unless set), and for array
    /// tasks `PBS_ARRAY_INDEX`, `PBS_ARRAYID`, `PICLOUD_TASK_INDEX` and `PBS_ARRAY_ID`
    /// (`<seq>[].<server>`).
    ///
    /// With a pooled `cgroup` (made for `start.cpus`) the child starts inside
    /// it: on v1 its spawner thread, already in the cgroup and pinned, starts
    /// the child; on v2 the child writes itself into `cgroup.procs` between
    /// fork and exec.
    pub fn spawn(
        &mut self,
        job: &JobDefinition,
        start: &StartTask,
        cgroup: Option<&PooledCgroup>,
    ) -> Result<Child, LaunchError> {
        let owner = self.owner_of(job)?;
        let spec = &job.spec;
        let workdir = Path::new(&spec.workdir);
        if owner.is_none() {
            match std::fs::metadata(workdir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    let error = io::Error::from_raw_os_error(libc::ENOTDIR);
                    return Err(LaunchError::Workdir { path: workdir.to_path_buf(), error });
                }
                Err(error) => return Err(LaunchError::Workdir { path: workdir.to_path_buf(), error }),
            }
        }

        let mut cmd = match &spec.command {
            JobCommand::Script { body } => {
                let script = self.script_for(job.seq, body, owner.as_deref())?;
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
        let node_file = self.node_file_for(ncpus, owner.is_some())?;
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

        cmd.stdin(Stdio::null()).process_group(0);
        let mut setup = ChildSetup::new();
        let spawner = cgroup.and_then(PooledCgroup::spawner);
        if let (Some(cgroup), None) = (cgroup, spawner) {
            setup.join_cgroup(cgroup.cgroup()).map_err(LaunchError::Cgroup)?;
        }
        match &owner {
            None => {
                let (stdout, stderr) = open_outputs(&start.stdout_path, &start.stderr_path)?;
                cmd.current_dir(workdir).stdout(stdout).stderr(stderr);
            }
            Some(owner) => {
                // Descriptors 0-2 hold /dev/null until the child opens the outputs.
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
                let bad_path = |path: &str| LaunchError::Output {
                    stream: "stdout or stderr",
                    path: PathBuf::from(path),
                    error: io::Error::from_raw_os_error(libc::EINVAL),
                };
                setup.run_as(owner);
                setup
                    .workdir(workdir)
                    .map_err(|error| LaunchError::Workdir { path: workdir.into(), error })?;
                setup
                    .outputs(Path::new(&start.stdout_path), Path::new(&start.stderr_path))
                    .map_err(|_| bad_path(&start.stdout_path))?;
            }
        }
        let context = (!setup.is_empty()).then(|| setup.install(&mut cmd));
        let script = self.scripts.get(&job.seq);
        let launch = Launch {
            cmd,
            cpus: start.cpus.clone(),
            context,
            what_missing: describe_program(job, script, Errno::ENOENT),
            what_other: describe_program(job, script, Errno::EACCES),
        };
        match spawner {
            Some(spawner) => {
                debug_assert_eq!(cgroup.map(PooledCgroup::cpus), Some(&start.cpus[..]));
                spawner.run(move || launch.start(false)).map_err(LaunchError::Cgroup)?
            }
            None => launch.start(true),
        }
    }

    /// Drops the job's script from the spool directory (its tasks have ended).
    pub fn forget(&mut self, seq: u64) {
        if let Some(path) = self.scripts.remove(&seq) {
            remove_quietly(&path);
        }
    }

    /// Removes every file this launcher wrote, and the shared spool directory
    /// it made, if it made one.
    pub fn cleanup(&mut self) {
        for path in self.scripts.drain().map(|(_, p)| p).chain(self.node_files.drain().map(|(_, p)| p)) {
            remove_quietly(&path);
        }
        if let SharedSpool::Made(dir) = &self.shared {
            if let Err(e) = std::fs::remove_dir(dir) {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
            self.shared = SharedSpool::Pending;
        }
    }

    /// The directory for files that jobs of other users read, made when first needed.
    fn shared_dir(&mut self) -> Result<PathBuf, LaunchError> {
        if let SharedSpool::Pending = self.shared {
            self.shared = match make_run_spool(Path::new(RUN_SPOOL)) {
                Ok(dir) => {
                    tracing::info!(
                        "the spool directory {} is out of other users' reach: their jobs' files go to {}",
                        self.spool_dir.display(),
                        dir.display()
                    );
                    SharedSpool::Made(dir)
                }
                Err(e) => {
                    let why = format!("{RUN_SPOOL}: {e}");
                    tracing::warn!("jobs of other users cannot run: {why}");
                    SharedSpool::Failed(why)
                }
            };
        }
        match &self.shared {
            SharedSpool::Spool => Ok(self.spool_dir.clone()),
            SharedSpool::Made(dir) => Ok(dir.clone()),
            SharedSpool::Failed(why) => Err(LaunchError::SharedSpool(why.clone())),
            SharedSpool::NotRoot | SharedSpool::Pending => {
                Err(LaunchError::SharedSpool("the node agent is not root".into()))
            }
        }
    }

    /// The job's script file, written on first use: in the spool directory for
    /// the agent's own jobs (mode 0700), in the shared spool for another
    /// user's (theirs, mode 0500).
    fn script_for(&mut self, seq: u64, body: &str, owner: Option<&Owner>) -> Result<PathBuf, LaunchError> {
        if let Some(path) = self.scripts.get(&seq) {
            return Ok(path.clone());
        }
        let (dir, mode, chown) = match owner {
            None => (self.spool_dir.clone(), 0o700, None),
            Some(owner) => (self.shared_dir()?, 0o500, Some((owner.uid, owner.gid))),
        };
        let path = dir.join(format!("{seq}.sh"));
        write_file(&path, body.as_bytes(), mode, chown)
            .map_err(|error| LaunchError::Script { path: path.clone(), error })?;
        self.scripts.insert(seq, path.clone());
        Ok(path)
    }

    /// The node file listing this host `ncpus` times, written on first use
    /// (mode 0644), in the shared spool when `shared`.
    fn node_file_for(&mut self, ncpus: u32, shared: bool) -> Result<PathBuf, LaunchError> {
        let shared = shared && !matches!(self.shared, SharedSpool::Spool);
        if let Some(path) = self.node_files.get(&(shared, ncpus)) {
            return Ok(path.clone());
        }
        let dir = if shared { self.shared_dir()? } else { self.spool_dir.clone() };
        let path = dir.join(format!("nodefile.{ncpus}"));
        let line = format!("{}\n", self.hostname);
        write_file(&path, line.repeat(ncpus as usize).as_bytes(), 0o644, None)
            .map_err(|error| LaunchError::NodeFile { path: path.clone(), error })?;
        self.node_files.insert((shared, ncpus), path.clone());
        Ok(path)
    }
}

/// Whether every directory above `dir` may be searched by any user.
fn searchable_by_all_above(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else { return false };
    dir.ancestors().skip(1).all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// Makes a fresh shared spool directory below `run` (`run` is made if missing):
/// `run` must be root's, searchable by all and writable by root alone.
fn make_run_spool(run: &Path) -> io::Result<PathBuf> {
    match DirBuilder::new().mode(0o711).create(run) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(run)?;
    let mode = meta.permissions().mode();
    if !meta.is_dir() || meta.uid() != 0 || mode & 0o022 != 0 || mode & 0o001 == 0 {
        let why = format!(
            "{} must be a directory of root's, searchable by all, writable by root alone",
            run.display()
        );
        return Err(io::Error::other(why));
    }
    let dir = nix::unistd::mkdtemp(&run.join("spool-XXXXXX"))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
    if !searchable_by_all_above(&dir) {
        let _ = std::fs::remove_dir(&dir);
        return Err(io::Error::other(format!(
            "a directory above {} is closed to other users",
            dir.display()
        )));
    }
    Ok(dir)
}

/// A task ready to start: its command and what explains a failure.
struct Launch {
    cmd: Command,
    cpus: Vec<u32>,
    context: Option<SetupContext>,
    /// What failed to execute, when it was not found / otherwise.
    what_missing: String,
    what_other: String,
}

impl Launch {
    /// Spawns the child, pinning the calling thread to the task's cpus around
    /// the spawn when `pin` (else the thread is pinned already).
    fn start(mut self, pin: bool) -> Result<Child, LaunchError> {
        let _pinned = if pin { PinnedThread::to(&self.cpus)? } else { PinnedThread { old: None } };
        let mut attempt = 0;
        let spawned = loop {
            match self.cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < ETXTBSY_RETRIES => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => break other,
            }
        };
        spawned.map_err(|e| {
            if let Some(error) = self.context.as_ref().and_then(|c| c.error(&e)) {
                return error;
            }
            let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL));
            let what = if errno == Errno::ENOENT { self.what_missing } else { self.what_other };
            LaunchError::Exec { what, errno }
        })
    }
}

/// Writes a whole file with the given mode (and owner), replacing any older one.
fn write_file(path: &Path, contents: &[u8], mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    // Remove first: an existing file keeps its old mode when truncated.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    f.write_all(contents)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    }
    Ok(())
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
    use crate::cgroup::{Cgroups, Limits};
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
        write_file(&bin.join("hello"), b"#!/bin/sh\necho from-path\n", 0o755, None).unwrap();
        write_file(&bin.join("plain"), b"not executable", 0o644, None).unwrap();
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

    #[test]
    fn child_steps_travel_in_the_error_code() {
        let tagged = io::Error::from_raw_os_error(libc::EACCES | (ChildStep::Stdout as i32) << STEP_SHIFT);
        assert_eq!(child_step_error(&tagged), Some((ChildStep::Stdout, Errno::EACCES)));
        assert_eq!(child_step_error(&io::Error::from_raw_os_error(libc::EACCES)), None, "an exec error");
        let context = SetupContext {
            user: Some(("ann".into(), 1001, 100)),
            stdout: Some(PathBuf::from("/x/out")),
            ..SetupContext::default()
        };
        let err = context.error(&tagged).unwrap();
        assert_eq!(err.to_string(), "cannot open the stdout file /x/out as user ann: Permission denied");
        assert_eq!(err.exit_status(), SETUP_FAILED);
        let uid = io::Error::from_raw_os_error(libc::EPERM | (ChildStep::Uid as i32) << STEP_SHIFT);
        assert_eq!(
            context.error(&uid).unwrap().to_string(),
            "cannot switch to user ann (uid 1001, gid 100): Operation not permitted"
        );
    }

    #[test]
    fn an_agent_that_is_not_root_refuses_other_users_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let mut launcher = Launcher::new(dir.path().join("spool"), "n").unwrap();
        // As an agent of uid 4242 would be.
        launcher.euid = 4242;
        let mut theirs = job(1, sh("echo ran > ran.txt"), dir.path());
        theirs.uid = 4243;
        theirs.user = "someone-else".into();
        let err = launcher.spawn(&theirs, &start(1, None, dir.path()), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "this node agent runs as uid 4242 and does not run jobs of other users \
             (this job belongs to someone-else, uid 4243)"
        );
        assert_eq!(err.exit_status(), SETUP_FAILED);
        assert!(!dir.path().join("ran.txt").exists());
        theirs.uid = 4242;
        assert!(launcher.owner_of(&theirs).unwrap().is_none(), "its own jobs run as itself");
    }

    /// The `nobody` user, for the tests of jobs of another user, which need
    /// root; `None` (the test is skipped, and says so) otherwise.
    fn nobody() -> Option<nix::unistd::User> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: starting jobs as another user needs root");
            return None;
        }
        let user = nix::unistd::User::from_name("nobody").ok().flatten();
        if user.is_none() {
            eprintln!("skipped: this machine has no user `nobody`");
        }
        user
    }

    fn job_of(user: &nix::unistd::User, seq: u64, command: JobCommand, workdir: &Path) -> JobDefinition {
        JobDefinition {
            user: user.name.clone(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            ..job(seq, command, workdir)
        }
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A temporary directory that every user may enter, with a `work`
    /// directory every user may write to (sticky, as /tmp).
    fn open_tempdir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        chmod(&work, 0o1777);
        (dir, work)
    }

    #[test]
    fn jobs_of_other_users_run_as_their_owner() {
        let Some(nobody) = nobody() else { return };
        let (dir, work) = open_tempdir();
        let spool = dir.path().join("spool");
        let mut launcher = Launcher::new(&spool, "node7").unwrap();
        assert!(matches!(launcher.shared, SharedSpool::Spool), "{:?}", launcher.shared);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&spool), 0o711);

        let body = "id -u\nid -G\npwd\necho \"$0\"\ncat \"$PBS_NODEFILE\"\necho to-stderr >&2\n";
        let def = job_of(&nobody, 3, sh(body), &work);
        let mut st = start(3, None, &work);
        st.stderr_path = work.join("err").display().to_string();
        let (status, out, err) = run(&mut launcher, &def, &st);
        assert_eq!(status, 0, "{err}");
        assert_eq!(err, "to-stderr\n");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], nobody.uid.to_string());
        let name = CString::new(nobody.name.clone()).unwrap();
        let mut want: Vec<u32> =
            nix::unistd::getgrouplist(&name, nobody.gid).unwrap().into_iter().map(|g| g.as_raw()).collect();
        let mut got: Vec<u32> = lines[1].split_whitespace().map(|g| g.parse().unwrap()).collect();
        want.sort_unstable();
        want.dedup();
        got.sort_unstable();
        assert_eq!(got, want, "the owner's groups, and no group of root's");
        assert_eq!(lines[2], work.display().to_string());
        let script = spool.join("3.sh");
        assert_eq!(lines[3], script.display().to_string());
        assert_eq!(lines[4], "node7", "the node file is readable by the job");
        // The script and the output files belong to the job's owner.
        for file in [&script, &work.join("out"), &work.join("err")] {
            assert_eq!(std::fs::metadata(file).unwrap().uid(), nobody.uid.as_raw(), "{}", file.display());
        }
        assert_eq!(mode(&script), 0o500);
        assert_eq!(mode(&work.join("out")) & 0o777, 0o644 & !umask(), "as the agent's own outputs");

        // Joined output still interleaves; a #! script runs under its interpreter.
        let def = job_of(&nobody, 4, sh("#!/bin/sh\necho one\necho two >&2\nexit 3\n"), &work);
        let mut joined = start(4, None, &work);
        joined.stdout_path = work.join("joined").display().to_string();
        joined.stderr_path = joined.stdout_path.clone();
        let (status, out, _) = run(&mut launcher, &def, &joined);
        assert_eq!((status, out.as_str()), (3, "one\ntwo\n"));

        // The exec error of a missing interpreter is reported as before.
        let def = job_of(&nobody, 5, sh("#!/no/such/shell\n"), &work);
        let err = launcher.spawn(&def, &start(5, None, &work), None).unwrap_err();
        assert_eq!(err.exit_status(), EXIT_NOT_FOUND);
        assert!(err.to_string().contains("interpreter '/no/such/shell'"), "{err}");

        launcher.cleanup();
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    }

    /// The process's umask (read without changing it for good).
    fn umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line.split_whitespace().last().unwrap(), 8).unwrap()
    }

    #[test]
    fn a_spool_out_of_other_users_reach_moves_their_files_under_run() {
        let Some(nobody) = nobody() else { return };
        let (dir, work) = open_tempdir();
        let closed = dir.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        chmod(&closed, 0o700);
        let spool = closed.join("spool");
        let mut launcher = Launcher::new(&spool, "n").unwrap();
        assert!(matches!(launcher.shared, SharedSpool::Pending), "{:?}", launcher.shared);
        let def = job_of(&nobody, 1, sh("echo \"$0\" \"$PBS_NODEFILE\"\n"), &work);
        let (status, out, err) = run(&mut launcher, &def, &start(1, None, &work));
        assert_eq!(status, 0, "{err}");
        let SharedSpool::Made(shared) = &launcher.shared else { panic!("{:?}", launcher.shared) };
        let shared = shared.clone();
        assert!(shared.starts_with(RUN_SPOOL), "{}", shared.display());
        assert_eq!(out, format!("{0}/1.sh {0}/nodefile.1\n", shared.display()));
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0, "nothing of theirs in the closed spool");
        // The agent's own jobs keep using the configured spool.
        let mine = job(2, sh("echo \"$0\""), &work);
        let (_, out, _) = run(&mut launcher, &mine, &start(2, None, &work));
        assert_eq!(out.trim(), spool.join("2.sh").display().to_string());
        launcher.cleanup();
        assert!(!shared.exists(), "the shared spool is removed");
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    }

    #[test]
    fn other_users_cannot_use_what_they_could_not_reach() {
        let Some(nobody) = nobody() else { return };
        let (dir, work) = open_tempdir();
        let mut launcher = Launcher::new(dir.path().join("spool"), "n").unwrap();
        let root_only = dir.path().join("root-only");
        std::fs::create_dir(&root_only).unwrap();
        chmod(&root_only, 0o700);
        let def = job_of(&nobody, 1, sh("echo ran > ran.txt"), &work);

        // Output into a directory only root may write: nothing is created.
        let mut st = start(1, None, &work);
        st.stdout_path = root_only.join("out").display().to_string();
        let err = launcher.spawn(&def, &st, None).unwrap_err();
        let want =
            format!("cannot open the stdout file {} as user nobody: Permission denied", st.stdout_path);
        assert_eq!(err.to_string(), want);
        assert_eq!(err.exit_status(), SETUP_FAILED);
        assert!(!root_only.join("out").exists());
        let mut st = start(1, None, &work);
        st.stderr_path = root_only.join("err").display().to_string();
        let err = launcher.spawn(&def, &st, None).unwrap_err();
        assert!(
            matches!(err, LaunchError::ChildSetup { step: ChildStep::Stderr, errno: Errno::EACCES, .. }),
            "{err}"
        );
        assert!(!root_only.join("err").exists());

        // A working directory the user may not enter.
        let def_closed = job_of(&nobody, 2, sh("echo ran > ran.txt"), &root_only);
        let err = launcher.spawn(&def_closed, &start(2, None, &work), None).unwrap_err();
        let want = format!(
            "cannot use the working directory {} as user nobody: Permission denied",
            root_only.display()
        );
        assert_eq!(err.to_string(), want);
        assert!(!root_only.join("ran.txt").exists() && !work.join("ran.txt").exists(), "the job ran");

        // Users this node does not know as the server does.
        let mut unknown = def.clone();
        unknown.user = "picloud-no-such-user".into();
        let err = launcher.spawn(&unknown, &start(1, None, &work), None).unwrap_err();
        assert!(err.to_string().ends_with("there is no such user on this node"), "{err}");
        let mut other_uid = def.clone();
        other_uid.uid += 1;
        let err = launcher.spawn(&other_uid, &start(1, None, &work), None).unwrap_err();
        let want = format!(
            "cannot run the job as nobody (uid {}): the user has uid {} on this node",
            other_uid.uid, nobody.uid
        );
        assert_eq!(err.to_string(), want);
    }

    /// A real v1 hierarchy for the launcher's tests (root, v1 mounted); the
    /// pool and its base are removed on drop.
    struct RealPool(Cgroups);

    impl Drop for RealPool {
        fn drop(&mut self) {
            self.0.remove_base();
        }
    }

    fn real_pool(test: &str) -> Option<RealPool> {
        let leaf = format!("picloud-test-{}-{test}", std::process::id());
        match Cgroups::detect(&leaf) {
            Ok(Some(cg)) if !cg.is_v2() && cg.prepare().is_ok() => Some(RealPool(cg)),
            _ => {
                eprintln!("skipped: no writable cgroup v1 hierarchy on this machine");
                None
            }
        }
    }

    #[test]
    fn tasks_start_inside_their_pooled_cgroup() {
        let Some(pool) = real_pool("launch") else { return };
        let (_dir, work) = open_tempdir();
        let spool = work.join("spool");
        let mut launcher = Launcher::new(&spool, "n").unwrap();
        let cpu = {
            let set = nix::sched::sched_getaffinity(Pid::from_raw(0)).unwrap();
            (0..CpuSet::count()).rev().find(|&c| set.is_set(c).unwrap()).unwrap() as u32
        };
        let body = "cat /proc/self/cgroup; grep Cpus_allowed_list /proc/self/status; id -u\n";
        let mut jobs = vec![job(1, sh(body), &work)];
        jobs.extend(nobody().map(|u| job_of(&u, 2, sh(body), &work)));
        for def in &jobs {
            let limits = Limits { cpus: vec![cpu], pids: Some(16), ..Limits::default() };
            let pooled = pool.0.acquire(&limits).unwrap();
            let mut st = start(def.seq, None, &work);
            st.cpus = vec![cpu];
            st.stdout_path = work.join(format!("out.{}", def.seq)).display().to_string();
            st.stderr_path = work.join(format!("err.{}", def.seq)).display().to_string();
            let before = nix::sched::sched_getaffinity(Pid::from_raw(0)).unwrap();
            let mut child = launcher.spawn(def, &st, Some(&pooled)).unwrap();
            assert_eq!(pbs_exit_status(wait_bounded(&mut child).into_raw()), 0);
            assert_eq!(
                nix::sched::sched_getaffinity(Pid::from_raw(0)).unwrap(),
                before,
                "the caller was not pinned"
            );
            let out = std::fs::read_to_string(&st.stdout_path).unwrap();
            let memory = out.lines().find(|l| l.split(':').nth(1) == Some("memory")).unwrap();
            assert!(memory.ends_with(&format!("/{}", pooled.name())), "{out}");
            assert!(out.contains(&format!("Cpus_allowed_list:\t{cpu}\n")), "{out}");
            assert_eq!(out.lines().last(), Some(def.uid.to_string().as_str()));
            let usage = pool.0.release(pooled);
            assert!(usage.cpu_ns.is_some_and(|ns| ns > 0), "{usage:?}");
        }
        launcher.cleanup();
    }

    #[test]
    fn on_v2_the_child_joins_its_cgroup_itself() {
        // A fixture: the child's write of "0" lands in the file.
        let dir = tempfile::tempdir().unwrap();
        let cg = Cgroups::v2_at(dir.path().join("base"));
        let pooled = cg.acquire(&Limits::default()).unwrap();
        let procs = pooled.cgroup().procs_files().remove(0);
        std::fs::write(&procs, "").unwrap();
        let mut launcher = Launcher::new(dir.path().join("spool"), "n").unwrap();
        let def = job(1, sh("echo ran"), dir.path());
        let st = start(1, None, dir.path());
        let mut child = launcher.spawn(&def, &st, Some(&pooled)).unwrap();
        assert_eq!(pbs_exit_status(wait_bounded(&mut child).into_raw()), 0);
        assert_eq!(std::fs::read_to_string(&procs).unwrap(), "0");
        assert_eq!(std::fs::read_to_string(&st.stdout_path).unwrap(), "ran\n");
        // A cgroup that cannot be joined fails the task, and says which.
        std::fs::remove_file(&procs).unwrap();
        std::fs::create_dir(&procs).unwrap();
        let err = launcher.spawn(&def, &st, Some(&pooled)).unwrap_err();
        assert!(matches!(err, LaunchError::Cgroup(_)), "{err}");
        cg.release(pooled);
        cg.remove_base();
    }
}
