//! The messages of the protocol, grouped by who sends them.
//!
//! 1. A peer connects and sends a [`Hello`] naming its role.
//! 2. The server answers [`ServerReply::Welcome`], or [`ServerReply::Error`]
//!    and closes (wrong magic, wrong version, malformed frame).
//! 3. A client then sends [`ClientRequest`]s; each gets exactly one
//!    [`ServerReply`], in order. (`Wait` replies when its jobs have ended.)
//! 4. An agent sends [`AgentMsg`]s and receives [`ToAgent`] messages.
//!
//! Variants are only ever appended, so that [`ServerReply::Error`] stays
//! decodable by peers of another version when the handshake refuses them.

use serde::{Deserialize, Serialize};

use crate::ids::{ArrayIndices, JobRef, TaskId};

/// First frame on every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`crate::HELLO_MAGIC`].
    pub magic: u32,
    /// The sender's [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// Who is connecting.
    pub role: Role,
}

impl Hello {
    /// A hello of this build for `role`.
    pub fn new(role: Role) -> Self {
        Self { magic: crate::HELLO_MAGIC, version: crate::PROTOCOL_VERSION, role }
    }
}

/// The role a peer announces in its [`Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Role {
    /// A command-line tool or library client.
    Client,
    /// A node agent offering its node.
    Agent(NodeInfo),
}

// ---------------------------------------------------------------------------
// Resources and topology

/// A node's hardware as the agent discovered it (hwloc).
///
/// Fields after `limits` were added with protocol version 2; [`Default`] gives
/// an empty node, so that code building one can name only what it knows
/// (`NodeInfo { cores, ..Default::default() }`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Host name of the node.
    pub hostname: String,
    /// NUMA nodes with their processing units and memory.
    pub numa_nodes: Vec<NumaNode>,
    /// Physical cores, each as the OS indices of its PUs (hardware threads).
    pub cores: Vec<Vec<u32>>,
    /// Total memory of the node in bytes.
    pub memory: u64,
    /// Processor packages (sockets).
    pub packages: u32,
    /// Which resource limits this agent can enforce, in words (e.g. "cgroup v1"),
    /// or why it cannot.
    pub limits: String,
    /// Processor packages (sockets), each as the OS indices of its PUs.
    /// Empty when unknown.
    pub package_pus: Vec<Vec<u32>>,
    /// L3 caches, each as the OS indices of the PUs sharing it. Empty when the
    /// machine has no L3 cache or hwloc does not know it.
    pub l3: Vec<Vec<u32>>,
    /// GPUs, one per physical device, in PCI bus order. Their position in
    /// this list is the GPU index the scheduler allocates.
    pub gpus: Vec<GpuInfo>,
}

impl NodeInfo {
    /// OS indices of every PU of the node, in core order.
    pub fn pus(&self) -> impl Iterator<Item = u32> + '_ {
        self.cores.iter().flatten().copied()
    }
}

/// One NUMA node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NumaNode {
    /// OS index of the NUMA node.
    pub os_index: u32,
    /// OS indices of the PUs local to it.
    pub pus: Vec<u32>,
    /// Local memory in bytes.
    pub memory: u64,
}

/// One GPU (a physical device, however many APIs such as CUDA, NVML or
/// OpenCL expose it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// The device's name in its preferred API, e.g. `cuda0` (CUDA), else
    /// `nvml0`, `rsmi0`, `opencl0d0`.
    pub name: String,
    /// The model, e.g. `Tesla P100-SXM2-16GB`, when known.
    pub model: Option<String>,
    /// PCI bus id (`domain:bus:device.function`), when the device is on PCI.
    pub pci: Option<String>,
    /// OS index of the NUMA node the device is local to; `None` when it is
    /// attached to several NUMA nodes or its locality is unknown.
    pub numa: Option<u32>,
}

/// Resources a job asks for (`qsub -l`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU cores (`ncpus`, `ppn`). At least 1.
    pub ncpus: u32,
    /// Memory limit in bytes (`mem`).
    pub mem: Option<u64>,
    /// Wall-clock limit in seconds (`walltime`).
    pub walltime: Option<u64>,
    /// Resources picloud does not interpret, kept and shown as given.
    pub other: Vec<(String, String)>,
}

impl Default for Resources {
    fn default() -> Self {
        Self { ncpus: 1, mem: None, walltime: None, other: Vec::new() }
    }
}

// ---------------------------------------------------------------------------
// Submission

/// What a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobCommand {
    /// A script, copied at submission: run by its `#!` interpreter, else `/bin/sh`.
    Script {
        /// Full text of the script.
        body: String,
    },
    /// An executable with its arguments (`qsub -- CMD ARGS`), looked up in `PATH`.
    Argv(Vec<String>),
    /// A Python function call, run by a warm worker (see `docs/workers.md`).
    Python(Box<PythonCall>),
}

/// A Python function and the arguments of each of its tasks: `cloud.call` is a
/// job of one task, `cloud.map` an array `0-(n-1)` whose task `i` gets `args[i]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PythonCall {
    /// The interpreter the client runs (`sys.executable`); its workers run the same.
    pub interpreter: String,
    /// The client's import path (`sys.path`): the workers' `PYTHONPATH`.
    pub sys_path: Vec<String>,
    /// The function, pickled with cloudpickle.
    pub function: Vec<u8>,
    /// Encoded arguments of each task, in the format of `docs/workers.md`.
    pub args: Vec<Vec<u8>>,
    /// Shared-memory segments the arguments refer to; the job holds them on
    /// its node until it is forgotten there.
    pub segments: Vec<String>,
    /// Replace the worker after each task instead of keeping it warm
    /// (PiCloud's `_kill_process`).
    pub kill_process: bool,
}

impl PythonCall {
    /// The encoded arguments of the task with this array index (`None` for a plain job).
    pub fn args_of(&self, index: Option<u32>) -> Option<&[u8]> {
        self.args.get(index.unwrap_or(0) as usize).map(Vec::as_slice)
    }
}

/// How stdout and stderr are joined (`qsub -j`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum JoinStreams {
    /// Separate files.
    #[default]
    No,
    /// stderr goes into the stdout file (`-j oe`).
    IntoOut,
    /// stdout goes into the stderr file (`-j eo`).
    IntoErr,
}

/// Kinds of job dependency (`qsub -W depend=KIND:ID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DependKind {
    /// Run after the job succeeded (exit status 0).
    AfterOk,
    /// Run after the job ended, however it ended.
    AfterAny,
    /// Run after the job failed (non-zero exit, killed, never ran).
    AfterNotOk,
}

impl DependKind {
    /// The PBS spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            DependKind::AfterOk => "afterok",
            DependKind::AfterAny => "afterany",
            DependKind::AfterNotOk => "afternotok",
        }
    }
}

/// One dependency of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    /// When the dependent job may run.
    pub kind: DependKind,
    /// The job depended upon (a job, an array or an array task).
    pub on: JobRef,
}

/// Everything a submission says about a job. Paths are absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Job name (`-N`, default the script's file name or `STDIN`).
    pub name: String,
    /// What to run.
    pub command: JobCommand,
    /// Directory the job starts in (the submit directory).
    pub workdir: String,
    /// The job's environment, complete: the submitter's (`-V`) or a clean one,
    /// plus `-v` variables and the `PBS_O_*` variables.
    pub env: Vec<(String, String)>,
    /// stdout file or directory (`-o`); `None` means `<name>.o<seq>` in `workdir`.
    /// `^array_index^` is replaced by the task's index.
    pub stdout: Option<String>,
    /// stderr file or directory (`-e`); `None` means `<name>.e<seq>` in `workdir`.
    pub stderr: Option<String>,
    /// `-j`.
    pub join: JoinStreams,
    /// Queue name (`-q`); informational.
    pub queue: Option<String>,
    /// Account (`-A`); informational.
    pub account: Option<String>,
    /// Project (`-P`); informational.
    pub project: Option<String>,
    /// Submitted in the held state (`-h`).
    pub hold: bool,
    /// Requested resources (`-l`).
    pub resources: Resources,
    /// Array indices (`-J`, `-t`), for a job array.
    pub array: Option<ArrayIndices>,
    /// Dependencies (`-W depend=`).
    pub depend: Vec<Dependency>,
    /// Whether the job may be rerun after a node failure (`-r`).
    pub rerunnable: bool,
    /// Explicit priority (`-p`), -1024..=1023.
    pub priority: i32,
    /// Host the job was submitted from.
    pub submit_host: String,
    /// The submit command line as typed, for `qstat -f` (`Submit_arguments`).
    pub submit_args: String,
}

impl JobSpec {
    /// A job named `name` running `command` in `workdir`, with everything else
    /// as qsub leaves it by default: an empty environment, default output
    /// files, one core, no limits, rerunnable, priority 0, not held.
    pub fn new(name: impl Into<String>, command: JobCommand, workdir: impl Into<String>) -> Self {
        JobSpec {
            name: name.into(),
            command,
            workdir: workdir.into(),
            env: Vec::new(),
            stdout: None,
            stderr: None,
            join: JoinStreams::No,
            queue: None,
            account: None,
            project: None,
            hold: false,
            resources: Resources::default(),
            array: None,
            depend: Vec::new(),
            rerunnable: true,
            priority: 0,
            submit_host: String::new(),
            submit_args: String::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// Client requests and server replies

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Queue a job or array. Replied with [`ServerReply::Submitted`].
    Submit(Box<JobSpec>),
    /// List jobs. Replied with [`ServerReply::Jobs`].
    Stat(StatRequest),
    /// Cancel jobs, arrays or tasks. Replied with [`ServerReply::Cancelled`].
    Cancel(Vec<JobRef>),
    /// Release held jobs. Replied with [`ServerReply::Released`].
    Release(Vec<JobRef>),
    /// Wait until every referenced job (or, with [`WaitUntil::Any`], one of
    /// them) has ended. Replied as [`WaitReply`] says, or with an error on
    /// timeout.
    Wait {
        /// Jobs to wait for.
        jobs: Vec<JobRef>,
        /// Give up after this many milliseconds.
        timeout_ms: Option<u64>,
        /// Until all or any of them have ended.
        until: WaitUntil,
        /// What the reply carries.
        reply: WaitReply,
    },
    /// List nodes. Replied with [`ServerReply::Nodes`].
    Nodes,
    /// Server facts. Replied with [`ServerReply::ServerStatus`].
    ServerStatus,
    /// Ask the server to stop (its owner or root only). Replied with `Ok`.
    Shutdown,
    /// The outcomes of Python tasks (every task of an array given as a whole).
    /// Replied with [`ServerReply::Results`].
    Results(Vec<JobRef>),
    /// Set aside `count` sequence numbers (at most [`MAX_RESERVED`]) for this
    /// connection's [`ClientRequest::SubmitReserved`], so that a client can
    /// name a job before the server has seen it. Replied with
    /// [`ServerReply::Reserved`]. A new reservation replaces the previous
    /// one; numbers left unused when the connection closes are never given
    /// to another job.
    Reserve {
        /// How many numbers.
        count: u32,
    },
    /// Queue a job under a sequence number of this connection's reservation,
    /// higher than any it submitted before. Replied with
    /// [`ServerReply::Submitted`], as [`ClientRequest::Submit`] is.
    SubmitReserved {
        /// The job's sequence number.
        seq: u64,
        /// The job.
        spec: Box<JobSpec>,
    },
}

/// Most sequence numbers one [`ClientRequest::Reserve`] may set aside.
pub const MAX_RESERVED: u32 = 1 << 16;

/// When a [`ClientRequest::Wait`] is answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitUntil {
    /// Once every job has ended.
    #[default]
    All,
    /// Once at least one has ended.
    Any,
}

/// What answers a [`ClientRequest::Wait`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitReply {
    /// [`ServerReply::Jobs`]: the state of every job waited for.
    #[default]
    States,
    /// [`ServerReply::Results`]: the outcomes of every task of the jobs
    /// that have ended (their owner or root only), saving a
    /// [`ClientRequest::Results`] after the wait.
    Results,
}

/// The first four bytes of every encoded [`ClientRequest::SubmitReserved`]:
/// bincode's variant index.
const SUBMIT_RESERVED_TAG: [u8; 4] = 10u32.to_le_bytes();

impl ClientRequest {
    /// Whether `payload` (a frame's, not decoded) holds a
    /// [`ClientRequest::SubmitReserved`]: the server lets such frames follow
    /// one another without waiting for each reply.
    pub fn is_reserved_submission(payload: &[u8]) -> bool {
        payload.get(..4) == Some(&SUBMIT_RESERVED_TAG[..])
    }

    /// A wait for all of `jobs`, answered with their states.
    pub fn wait_all(jobs: Vec<JobRef>, timeout_ms: Option<u64>) -> Self {
        ClientRequest::Wait { jobs, timeout_ms, until: WaitUntil::All, reply: WaitReply::States }
    }
}

/// Which jobs a [`ClientRequest::Stat`] lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatRequest {
    /// Only these jobs; all when empty. Unknown ids give an error entry.
    pub jobs: Vec<JobRef>,
    /// Include finished jobs still remembered (`qstat -x`).
    pub include_finished: bool,
    /// Only jobs of this user (`qstat -u`).
    pub user: Option<String>,
    /// List each array task as well as the array (`qstat -t`).
    pub expand_arrays: bool,
}

/// A reply from the server; exactly one per request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerReply {
    /// The request failed; nothing was changed.
    Error(ProtoError),
    /// Handshake accepted.
    Welcome {
        /// The server's name, the suffix of every job id.
        server_name: String,
        /// The server's protocol version.
        version: u32,
    },
    /// A job was queued under this id (`12.server` or `12[].server`).
    Submitted {
        /// Sequence number.
        seq: u64,
        /// Full PBS-style id.
        id: String,
    },
    /// Jobs, plus the ids that matched nothing.
    Jobs {
        /// The jobs.
        jobs: Vec<JobInfo>,
        /// Ids given that name no job the server knows.
        unknown: Vec<JobRef>,
    },
    /// Outcome of a cancel, one entry per reference given.
    Cancelled(Vec<(JobRef, RefOutcome)>),
    /// Outcome of a release, one entry per reference given.
    Released(Vec<(JobRef, RefOutcome)>),
    /// The nodes.
    Nodes(Vec<NodeStatus>),
    /// Server facts.
    ServerStatus(ServerStatus),
    /// Done.
    Ok,
    /// Outcomes of tasks, plus the ids that matched nothing.
    Results {
        /// One entry per task, in task order.
        results: Vec<TaskResult>,
        /// Ids given that name no job the server knows.
        unknown: Vec<JobRef>,
    },
    /// Sequence numbers `first` to `first + count - 1` are this
    /// connection's, for [`ClientRequest::SubmitReserved`].
    Reserved {
        /// The first number.
        first: u64,
        /// How many.
        count: u32,
    },
}

/// Where one task stands and, once a Python task has ended, what it returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The task's full id (`12.srv` or `12[3].srv`).
    pub id: String,
    /// The task.
    pub task: TaskId,
    /// Its state.
    pub state: JobState,
    /// Exit status, once ended.
    pub exit_status: Option<i32>,
    /// Why it ended as it did, when abnormally.
    pub comment: Option<String>,
    /// The node it ran on.
    pub node: Option<String>,
    /// Resources it used.
    pub used: ResourcesUsed,
    /// What the function returned or raised (Python tasks that ran to the end).
    pub outcome: Option<Box<PythonOutcome>>,
}

/// What happened to one id of a cancel or release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefOutcome {
    /// Acted upon.
    Done,
    /// Already finished: nothing to do, not an error.
    AlreadyFinished,
    /// Not in the state the request needs (e.g. releasing a job not held).
    NotApplicable,
    /// No such job.
    Unknown,
    /// The job belongs to another user.
    PermissionDenied,
}

/// An error sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ProtoError {
    /// Machine-readable kind.
    pub kind: ErrorKind,
    /// Human-readable explanation.
    pub message: String,
}

impl ProtoError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

/// Kinds of [`ProtoError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// A frame could not be decoded.
    Malformed,
    /// The request is understood but invalid (e.g. a job no node can ever run).
    Invalid,
    /// An id names no job.
    UnknownJob,
    /// The caller may not do this.
    PermissionDenied,
    /// A wait ran out of time.
    Timeout,
    /// The server is shutting down.
    ShuttingDown,
}

/// State of a job as PBS shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Waiting for resources (`Q`).
    Queued,
    /// Held by the user or waiting on a dependency (`H`).
    Held,
    /// Running (`R`).
    Running,
    /// Its processes ended; being cleaned up (`E`).
    Exiting,
    /// Ended (`F`).
    Finished,
    /// An array with at least one task started (`B`).
    Begun,
}

impl JobState {
    /// The PBS state letter.
    pub fn letter(&self) -> char {
        match self {
            JobState::Queued => 'Q',
            JobState::Held => 'H',
            JobState::Running => 'R',
            JobState::Exiting => 'E',
            JobState::Finished => 'F',
            JobState::Begun => 'B',
        }
    }
}

/// Exit status of a deleted job: signal 9 plus 256, as PBS Pro reports it.
pub const EXIT_CANCELLED: i32 = 256 + 9;

/// Exit status of a task that never ran (a dependency never met, a node lost,
/// a task the agent could not set up); its comment says why.
pub const EXIT_NEVER_RAN: i32 = -1;

/// Everything `qstat -f` shows of one job, array or array task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Full PBS-style id.
    pub id: String,
    /// Which unit this is (`index` set for an array task).
    pub task: TaskId,
    /// Whether this entry is an array as a whole.
    pub is_array: bool,
    /// The submission.
    pub spec: JobSpecSummary,
    /// Owner's user name.
    pub user: String,
    /// Current state.
    pub state: JobState,
    /// Exit status once finished: the exit code, 256 + signal when killed by a
    /// signal, or negative when the job never ran.
    pub exit_status: Option<i32>,
    /// Why the job is in its state (failed to start, dependency, walltime...).
    pub comment: Option<String>,
    /// Node and cores it ran on (`exec_host`, e.g. `node1/0*2`).
    pub exec_host: Option<String>,
    /// OS indices of the PUs it was pinned to.
    pub cpus: Vec<u32>,
    /// Submission time (Unix seconds).
    pub ctime: u64,
    /// Time it became eligible to run (Unix seconds).
    pub etime: Option<u64>,
    /// Start time (Unix seconds).
    pub stime: Option<u64>,
    /// End time (Unix seconds).
    pub end_time: Option<u64>,
    /// Resources used so far or in total.
    pub used: ResourcesUsed,
    /// Resolved stdout path.
    pub stdout_path: String,
    /// Resolved stderr path.
    pub stderr_path: String,
    /// For an array: counts of its tasks by state.
    pub array_counts: Option<ArrayCounts>,
    /// How many times the task was started (`run_count` of `qstat -f`):
    /// 1 for a task that ran once, more when it was queued again after its
    /// node was lost; 0 before it started. For an array, the sum over its
    /// tasks that started again (0 when none did).
    pub run_count: u32,
}

/// Counts of an array's tasks by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayCounts {
    /// Waiting.
    pub queued: u64,
    /// Running.
    pub running: u64,
    /// Ended.
    pub finished: u64,
}

/// The parts of a [`JobSpec`] worth showing, without the script and environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpecSummary {
    /// Job name.
    pub name: String,
    /// Queue name.
    pub queue: String,
    /// Account.
    pub account: Option<String>,
    /// Project.
    pub project: Option<String>,
    /// Requested resources.
    pub resources: Resources,
    /// Array indices, for arrays and their tasks.
    pub array: Option<String>,
    /// Dependencies as PBS writes them (`afterok:12.srv`).
    pub depend: Option<String>,
    /// Working directory.
    pub workdir: String,
    /// Submit host.
    pub submit_host: String,
    /// Submit arguments.
    pub submit_args: String,
    /// Rerunnable.
    pub rerunnable: bool,
    /// Explicit priority.
    pub priority: i32,
    /// `-j`.
    pub join: JoinStreams,
    /// Held at submission.
    pub hold: bool,
}

/// Resources a job used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourcesUsed {
    /// CPU time, user plus system, in milliseconds.
    pub cput_ms: u64,
    /// Wall-clock time in milliseconds.
    pub walltime_ms: u64,
    /// Peak resident memory in bytes.
    pub mem: u64,
}

/// A node as `picloud nodes` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node name (its host name).
    pub name: String,
    /// `up`, or `down` once its agent has gone.
    pub state: String,
    /// Hardware.
    pub info: NodeInfo,
    /// PUs in use by jobs.
    pub used_pus: Vec<u32>,
    /// Jobs running there.
    pub running: Vec<String>,
}

/// Server facts for `qstat -B`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    /// Server name.
    pub name: String,
    /// Protocol version.
    pub version: u32,
    /// Jobs queued (tasks not yet started), running and held.
    pub queued: u64,
    /// Tasks running.
    pub running: u64,
    /// Jobs held.
    pub held: u64,
    /// Jobs remembered as finished.
    pub finished: u64,
    /// Nodes up.
    pub nodes_up: u32,
    /// Seconds a finished job stays queryable.
    pub keep_finished_secs: u64,
    /// State directory.
    pub state_dir: String,
}

// ---------------------------------------------------------------------------
// Server <-> agent

/// A message from the server to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToAgent {
    /// Handshake accepted; the agent is known as `node`.
    Welcome {
        /// Server name, the suffix of job ids.
        server_name: String,
    },
    /// The full description of a job whose tasks will be started on this agent.
    /// Sent once per job and agent, before its first [`ToAgent::Start`].
    Define(Box<JobDefinition>),
    /// Start these tasks.
    Start(Vec<StartTask>),
    /// Kill a running task (its whole process group), reporting it as ended.
    Kill {
        /// The task.
        task: TaskId,
        /// Why, for the job's comment.
        reason: String,
    },
    /// The job will start no more tasks here; forget its definition.
    Forget {
        /// Sequence number.
        seq: u64,
    },
    /// Stop: kill every running task and exit.
    Shutdown,
    /// These jobs are gone from the server: free what their results hold here
    /// (shared-memory segments).
    Purged(Vec<u64>),
}

/// What an agent needs to run every task of one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDefinition {
    /// Sequence number.
    pub seq: u64,
    /// The submission.
    pub spec: JobSpec,
    /// Owner's user name.
    pub user: String,
    /// Owner's uid.
    pub uid: u32,
    /// Owner's primary gid.
    pub gid: u32,
}

/// Start one task with the cores the server chose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartTask {
    /// The task.
    pub task: TaskId,
    /// Its full id (`PBS_JOBID`), exactly as qsub printed it (or the task form).
    pub job_id: String,
    /// OS indices of the PUs to pin to.
    pub cpus: Vec<u32>,
    /// Indices of the node's GPUs given to the task (`CUDA_VISIBLE_DEVICES`).
    pub gpus: Vec<u32>,
    /// Resolved stdout path.
    pub stdout_path: String,
    /// Resolved stderr path.
    pub stderr_path: String,
}

/// A message from an agent to the server.
///
/// After each `Welcome` (its first connection and every reconnection), an
/// agent sends the ends it kept while it had no server (`Finished`), then
/// one `Running` listing every task it runs; until `Running` arrives the
/// server starts nothing on the node. While nothing else is sent, it sends
/// a `Heartbeat` every second or so; a server that hears nothing from an
/// agent for its node timeout counts the node as lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// Tasks that started (their processes exist).
    Started(Vec<TaskId>),
    /// Tasks that ended.
    Finished(Vec<TaskEnd>),
    /// The agent is alive (nothing else to say).
    Heartbeat,
    /// Every task the agent runs now, with its resources: sent once after
    /// each `Welcome`, after the ends the agent kept while it had no server.
    /// The server keeps the tasks it expects there, adopts those it lost
    /// track of (a restart), and kills the others (they were moved
    /// elsewhere or ended while the agent was away).
    Running(Vec<TaskRunning>),
}

/// One task an agent runs, as it reports it in [`AgentMsg::Running`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRunning {
    /// The task.
    pub task: TaskId,
    /// OS indices of the PUs it is pinned to (as its `StartTask` said).
    pub cpus: Vec<u32>,
    /// The GPUs it was given.
    pub gpus: Vec<u32>,
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEnd {
    /// The task.
    pub task: TaskId,
    /// PBS exit status: exit code, or 256 + signal number.
    pub exit_status: i32,
    /// Why it ended abnormally, if it did (could not start, walltime, killed).
    pub comment: Option<String>,
    /// Resources it used.
    pub used: ResourcesUsed,
    /// What a Python task's function returned or raised.
    pub outcome: Option<Box<PythonOutcome>>,
}

/// How a Python task's function call ended, as its worker reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PythonStatus {
    /// It returned; the value is in [`PythonOutcome::value`] (exit status 0).
    Returned,
    /// It raised (exit status 1).
    Raised,
    /// The function or its arguments could not be loaded on the worker, e.g. a
    /// module missing there (exit status 2).
    LoadFailed,
}

impl PythonStatus {
    /// The PBS exit status a task with this outcome ends with.
    pub fn exit_status(self) -> i32 {
        match self {
            PythonStatus::Returned => 0,
            PythonStatus::Raised => 1,
            PythonStatus::LoadFailed => 2,
        }
    }
}

/// The outcome of one Python task (see `docs/workers.md`, message `DONE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PythonOutcome {
    /// Returned, raised, or could not load.
    pub status: PythonStatus,
    /// The encoded return value, or the pickled exception when it pickles.
    pub value: Vec<u8>,
    /// `Type: message` of the exception.
    pub error: String,
    /// The remote traceback, formatted.
    pub traceback: String,
    /// What the task wrote to stdout (capped).
    pub stdout: Vec<u8>,
    /// What the task wrote to stderr (capped).
    pub stderr: Vec<u8>,
    /// Shared-memory segments (on the task's node) the value refers to.
    pub segments: Vec<String>,
}
