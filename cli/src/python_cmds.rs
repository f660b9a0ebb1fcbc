//! `picloud python submit|results`: the low-level door to Python tasks from
//! the shell. A client that has pickled a function and its arguments (see
//! `docs/workers.md`) submits them as files and reads the outcomes back as
//! JSON, byte strings in hex. The Python library does the same through the C
//! ABI; tests and debugging use this.

use std::path::PathBuf;
use std::process::ExitCode;

use picloud_proto::{
    ArrayIndices, ClientRequest, ErrorKind, JobCommand, JobRef, JobSpec, PythonCall, PythonStatus,
    ServerReply, TaskResult,
};

use crate::commands::state_word;
use crate::pbs::{self, EXIT_FAILURE, EXIT_UNKNOWN_JOB};

/// `picloud python ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum PythonCmd {
    /// Submit a pickled function with one set of encoded arguments per task.
    Submit(SubmitArgs),
    /// Print the outcomes of Python tasks as JSON (waiting for them with --wait).
    Results(ResultsArgs),
}

/// Arguments of `picloud python submit`.
#[derive(Debug, clap::Args)]
pub(crate) struct SubmitArgs {
    /// File holding the function, pickled with cloudpickle.
    #[arg(long, value_name = "FILE")]
    function: PathBuf,
    /// Files holding encoded arguments, one per task (several make a map).
    #[arg(long = "args", value_name = "FILE", required = true)]
    args: Vec<PathBuf>,
    /// The interpreter workers run.
    #[arg(long, default_value = "python3")]
    interpreter: String,
    /// Import path entries for the workers (repeatable).
    #[arg(long = "sys-path", value_name = "DIR")]
    sys_path: Vec<String>,
    /// Shared-memory segments the arguments refer to (repeatable).
    #[arg(long = "segment", value_name = "NAME")]
    segments: Vec<String>,
    /// Job name.
    #[arg(long, default_value = "python")]
    name: String,
    /// Cores per task.
    #[arg(long, default_value = "1")]
    cores: u32,
    /// Memory limit per task (e.g. 512mb, 2gb).
    #[arg(long)]
    mem: Option<String>,
    /// Walltime limit per task (seconds or HH:MM:SS).
    #[arg(long)]
    walltime: Option<String>,
    /// Start a fresh worker for each task.
    #[arg(long)]
    kill_process: bool,
    /// Environment variables for the tasks (NAME=VALUE, repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
}

/// Arguments of `picloud python results`.
#[derive(Debug, clap::Args)]
pub(crate) struct ResultsArgs {
    /// Job ids (`12`, `12[]`, `12[3]`, with or without the server suffix).
    #[arg(required = true)]
    ids: Vec<String>,
    /// Wait until the jobs have ended.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
}

pub(crate) fn run(cmd: PythonCmd) -> ExitCode {
    match cmd {
        PythonCmd::Submit(a) => submit(a),
        PythonCmd::Results(a) => results(a),
    }
}

fn submit(a: SubmitArgs) -> ExitCode {
    const PROG: &str = "picloud python submit";
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let call = (|| -> Result<PythonCall, String> {
        Ok(PythonCall {
            interpreter: a.interpreter.clone(),
            sys_path: a.sys_path.clone(),
            function: read(&a.function)?,
            args: a.args.iter().map(read).collect::<Result<_, _>>()?,
            segments: a.segments.clone(),
            kill_process: a.kill_process,
        })
    })();
    let call = match call {
        Ok(c) => c,
        Err(e) => return pbs::fail(PROG, &e),
    };
    let workdir = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_else(|_| "/".into());
    let tasks = call.args.len() as u32;
    let mut spec = JobSpec::new(&a.name, JobCommand::Python(Box::new(call)), workdir);
    spec.resources.ncpus = a.cores;
    if let Some(mem) = &a.mem {
        match crate::pbs::resources::parse_mem("mem", mem) {
            Ok(bytes) => spec.resources.mem = Some(bytes),
            Err(e) => return pbs::fail(PROG, &e),
        }
    }
    if let Some(w) = &a.walltime {
        match crate::pbs::resources::parse_walltime(w) {
            Ok(secs) => spec.resources.walltime = Some(secs),
            Err(e) => return pbs::fail(PROG, &e),
        }
    }
    for kv in &a.env {
        match kv.split_once('=') {
            Some((k, v)) => spec.env.push((k.into(), v.into())),
            None => return pbs::fail(PROG, &format!("--env wants NAME=VALUE, not '{kv}'")),
        }
    }
    if tasks > 1 {
        match ArrayIndices::parse(&format!("0-{}", tasks - 1)) {
            Ok(array) => spec.array = Some(array),
            Err(e) => return pbs::fail(PROG, &e),
        }
    }
    match pbs::connect().and_then(|mut c| c.request(&ClientRequest::Submit(Box::new(spec)))) {
        Ok(ServerReply::Submitted { id, .. }) => {
            println!("{id}");
            ExitCode::SUCCESS
        }
        Ok(other) => pbs::fail(PROG, &pbs::unexpected(&other)),
        Err(e) => pbs::fail(PROG, &e),
    }
}

fn results(a: ResultsArgs) -> ExitCode {
    const PROG: &str = "picloud python results";
    let mut refs = Vec::new();
    for id in &a.ids {
        match id.parse::<JobRef>() {
            Ok(r) => refs.push(r),
            Err(e) => {
                eprintln!("{PROG}: illegally formed job identifier: {id} ({e})");
                return ExitCode::from(EXIT_UNKNOWN_JOB);
            }
        }
    }
    let mut client = match pbs::connect() {
        Ok(c) => c,
        Err(e) => return pbs::fail(PROG, &e),
    };
    if a.wait {
        let timeout_ms = a.timeout.map(|s| (s * 1000.0).round() as u64);
        match client.request(&ClientRequest::wait_all(refs.clone(), timeout_ms)) {
            Ok(_) => {}
            Err(picloud_proto::ClientError::Server(e)) if e.kind == ErrorKind::Timeout => {
                eprintln!("{PROG}: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
            Err(e) => return pbs::fail(PROG, &e),
        }
    }
    match client.request(&ClientRequest::Results(refs)) {
        Ok(ServerReply::Results { results, unknown }) => {
            let json: Vec<serde_json::Value> = results.iter().map(result_json).collect();
            println!("{}", serde_json::Value::Array(json));
            for r in &unknown {
                eprintln!("{PROG}: Unknown Job Id {r}");
            }
            if unknown.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_UNKNOWN_JOB) }
        }
        Ok(other) => pbs::fail(PROG, &pbs::unexpected(&other)),
        Err(e) => pbs::fail(PROG, &e),
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// One task's outcome as JSON.
fn result_json(r: &TaskResult) -> serde_json::Value {
    let outcome = r.outcome.as_ref().map(|o| {
        serde_json::json!({
            "status": match o.status {
                PythonStatus::Returned => "returned",
                PythonStatus::Raised => "raised",
                PythonStatus::LoadFailed => "load_failed",
            },
            "value": hex(&o.value),
            "error": o.error,
            "traceback": o.traceback,
            "stdout": String::from_utf8_lossy(&o.stdout),
            "stderr": String::from_utf8_lossy(&o.stderr),
            "segments": o.segments,
        })
    });
    serde_json::json!({
        "id": r.id,
        "state": state_word(r.state),
        "exit_status": r.exit_status,
        "comment": r.comment,
        "node": r.node,
        "resources_used": {
            "cput_ms": r.used.cput_ms,
            "walltime_ms": r.used.walltime_ms,
            "mem": r.used.mem,
        },
        "outcome": outcome,
    })
}
