//! The client subcommands of `picloud`: `submit`, `stat`, `cancel`,
//! `release`, `wait` and `nodes`.
//!
//! `submit`, `cancel` and `release` are qsub, qdel and qrls under another name
//! (same parsing, same outcomes and exit codes, messages prefixed
//! `picloud <command>:`). `stat`, `wait` and `nodes` print modern tables with
//! words instead of PBS letters, or JSON with `--json` (the wire types
//! serialize directly). Tables and parsing are pure functions, tested below.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use picloud_proto::{
    ClientRequest, ErrorKind, JobInfo, JobRef, JobState, NodeStatus, ServerReply, StatRequest,
};

use crate::pbs::refs::{self, RefAction};
use crate::pbs::resources::format_duration;
use crate::pbs::{self, EXIT_FAILURE, EXIT_UNKNOWN_JOB, EXIT_USAGE};

/// Options of `picloud stat`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatArgs {
    /// Include finished jobs the server still remembers.
    #[arg(short, long)]
    all: bool,
    /// Print the jobs as JSON.
    #[arg(long)]
    json: bool,
    /// Only jobs of this user.
    #[arg(short, long)]
    user: Option<String>,
    /// List each array task as well as the array.
    #[arg(short, long)]
    tasks: bool,
    /// Only these jobs (N, N.server, N[] or N[i]); finished ones included.
    ids: Vec<String>,
}

/// Job ids for `picloud cancel` and `picloud release`.
#[derive(Debug, clap::Args)]
pub(crate) struct CancelArgs {
    /// Job ids: N, N.server, N[] (an array) or N[i] (one task).
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Options of `picloud wait`.
#[derive(Debug, clap::Args)]
pub(crate) struct WaitArgs {
    /// Give up after this many seconds (exit status 2).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    timeout: Option<f64>,
    /// Job ids: N, N.server, N[] (an array) or N[i] (one task).
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Options of `picloud nodes`.
#[derive(Debug, clap::Args)]
pub(crate) struct NodesArgs {
    /// Print the nodes as JSON.
    #[arg(long)]
    json: bool,
}

/// Exit status of `picloud wait` when it timed out or was given unknown ids.
const EXIT_WAIT_INCOMPLETE: u8 = 2;

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Ok(secs),
        _ => Err(format!("'{s}' is not a number of seconds")),
    }
}

/// `picloud submit`: qsub under another name.
pub(crate) fn submit_main(args: Vec<OsString>) -> ExitCode {
    pbs::qsub::run("picloud submit", args)
}

/// `picloud cancel`: qdel under another name.
pub(crate) fn cancel(a: CancelArgs) -> ExitCode {
    refs::run("picloud cancel", RefAction::Cancel, &a.ids)
}

/// `picloud release`: qrls under another name.
pub(crate) fn release(a: CancelArgs) -> ExitCode {
    refs::run("picloud release", RefAction::Release, &a.ids)
}

/// A job's state in words.
pub(crate) fn state_word(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Held => "held",
        JobState::Running => "running",
        JobState::Exiting => "exiting",
        JobState::Finished => "finished",
        JobState::Begun => "begun",
    }
}

/// Left-aligned columns two spaces apart, sized to their contents; the last
/// column is not padded.
pub(crate) fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (k, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if k + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        text.truncate(text.trim_end().len());
        text.push('\n');
        text
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Where a job runs, or why it does not.
fn where_or_why(job: &JobInfo) -> String {
    let running = matches!(job.state, JobState::Running | JobState::Exiting);
    let text = if running {
        job.exec_host.clone().or_else(|| job.comment.clone())
    } else {
        job.comment.clone().or_else(|| job.exec_host.clone())
    };
    text.unwrap_or_default()
}

/// `picloud stat`'s table.
pub(crate) fn format_stat(jobs: &[JobInfo]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.spec.name.clone(),
                j.user.clone(),
                state_word(j.state).to_string(),
                j.spec.resources.ncpus.to_string(),
                if j.stime.is_some() { format_duration(j.used.walltime_ms / 1000) } else { "-".into() },
                j.exit_status.map_or_else(|| "-".into(), |s| s.to_string()),
                where_or_why(j),
            ]
        })
        .collect();
    render_table(&["ID", "NAME", "USER", "STATE", "CPUS", "ELAPSED", "EXIT", "NODE/COMMENT"], &rows)
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("wire types serialize to JSON");
    text.push('\n');
    text
}

/// Parses ids for `prog`, printing the malformed ones.
fn parse_refs(prog: &str, ids: &[String]) -> Result<Vec<(String, JobRef)>, ()> {
    let mut bad = false;
    let mut refs = Vec::new();
    for id in ids {
        match id.parse::<JobRef>() {
            Ok(r) => refs.push((id.clone(), r)),
            Err(e) => {
                eprintln!("{prog}: {e}");
                bad = true;
            }
        }
    }
    if bad { Err(()) } else { Ok(refs) }
}

/// `picloud stat`.
pub(crate) fn stat(a: StatArgs) -> ExitCode {
    const PROG: &str = "picloud stat";
    let Ok(asked) = parse_refs(PROG, &a.ids) else {
        return ExitCode::from(EXIT_USAGE);
    };
    let request = StatRequest {
        jobs: asked.iter().map(|(_, r)| *r).collect(),
        include_finished: a.all || !asked.is_empty(),
        user: a.user,
        expand_arrays: a.tasks,
    };
    let reply = pbs::connect().and_then(|mut c| c.request(&ClientRequest::Stat(request)));
    let (jobs, unknown) = match reply {
        Ok(ServerReply::Jobs { jobs, unknown }) => (jobs, unknown),
        Ok(other) => return pbs::fail(PROG, &pbs::unexpected(&other)),
        Err(e) => return pbs::fail(PROG, &e),
    };
    pbs::emit(&if a.json { to_json(&jobs) } else { format_stat(&jobs) });
    for r in &unknown {
        eprintln!("{PROG}: unknown job id {}", refs::as_typed(&asked, r));
    }
    if unknown.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_UNKNOWN_JOB) }
}

/// `<id> <state> exit=<n> [comment]` for each job waited for.
pub(crate) fn format_wait(jobs: &[JobInfo]) -> String {
    let mut out = String::new();
    for j in jobs {
        let exit = j.exit_status.map_or_else(|| "-".into(), |s| s.to_string());
        out.push_str(&format!("{} {} exit={exit}", j.id, state_word(j.state)));
        if let Some(c) = &j.comment {
            out.push(' ');
            out.push_str(c);
        }
        out.push('\n');
    }
    out
}

/// `picloud wait`'s exit status: 0 when every job finished with status 0, 1
/// otherwise, 2 when some id was unknown.
pub(crate) fn wait_status(jobs: &[JobInfo], unknown: usize) -> u8 {
    if unknown > 0 {
        EXIT_WAIT_INCOMPLETE
    } else if jobs.iter().all(|j| j.state == JobState::Finished && j.exit_status == Some(0)) {
        0
    } else {
        EXIT_FAILURE
    }
}

/// `picloud wait`.
pub(crate) fn wait(a: WaitArgs) -> ExitCode {
    const PROG: &str = "picloud wait";
    let Ok(asked) = parse_refs(PROG, &a.ids) else {
        return ExitCode::from(EXIT_WAIT_INCOMPLETE);
    };
    // Saturates for absurd values: `as` from f64 clamps.
    let timeout = a.timeout.map(|secs| Duration::from_millis((secs * 1000.0).round() as u64));
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    let jobs: Vec<JobRef> = asked.iter().map(|(_, r)| *r).collect();
    // A wait changes nothing: across a restart of the server it is sent
    // again once the server is back.
    let reply = pbs::connect().and_then(|mut c| {
        c.request_reconnecting(picloud_proto::client::RECONNECT_WINDOW, deadline, |left| {
            ClientRequest::wait_all(jobs.clone(), left.map(|t| t.as_millis() as u64))
        })
    });
    match reply {
        Ok(ServerReply::Jobs { jobs, unknown }) => {
            pbs::emit(&format_wait(&jobs));
            for r in &unknown {
                eprintln!("{PROG}: unknown job id {}", refs::as_typed(&asked, r));
            }
            ExitCode::from(wait_status(&jobs, unknown.len()))
        }
        Ok(other) => pbs::fail(PROG, &pbs::unexpected(&other)),
        Err(picloud_proto::ClientError::Server(e)) if e.kind == ErrorKind::Timeout => {
            eprintln!("{PROG}: {e}");
            ExitCode::from(EXIT_WAIT_INCOMPLETE)
        }
        Err(picloud_proto::ClientError::Server(e)) if e.kind == ErrorKind::UnknownJob => {
            eprintln!("{PROG}: {e}");
            ExitCode::from(EXIT_WAIT_INCOMPLETE)
        }
        Err(e) => pbs::fail(PROG, &e),
    }
}

/// Bytes in binary units with one decimal: `15.5 GiB`, `512 MiB`.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() < 0.05 || value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Running job ids, at most three named.
fn jobs_cell(running: &[String]) -> String {
    const SHOWN: usize = 3;
    match running.len() {
        0 => "-".into(),
        n if n <= SHOWN => running.join(","),
        n => format!("{} +{}", running[..SHOWN].join(","), n - SHOWN),
    }
}

/// `picloud nodes`' table.
pub(crate) fn format_nodes(nodes: &[NodeStatus]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.state.clone(),
                format!("{}/{}", n.used_pus.len(), n.info.pus().count()),
                n.info.numa_nodes.len().to_string(),
                human_bytes(n.info.memory),
                n.info.gpus.len().to_string(),
                jobs_cell(&n.running),
                n.info.limits.clone(),
            ]
        })
        .collect();
    render_table(&["NAME", "STATE", "CPUS", "NUMA", "MEMORY", "GPUS", "JOBS", "LIMITS"], &rows)
}

/// `picloud nodes`.
pub(crate) fn nodes(a: NodesArgs) -> ExitCode {
    const PROG: &str = "picloud nodes";
    let reply = pbs::connect().and_then(|mut c| c.request(&ClientRequest::Nodes));
    match reply {
        Ok(ServerReply::Nodes(nodes)) => {
            pbs::emit(&if a.json { to_json(&nodes) } else { format_nodes(&nodes) });
            ExitCode::SUCCESS
        }
        Ok(other) => pbs::fail(PROG, &pbs::unexpected(&other)),
        Err(e) => pbs::fail(PROG, &e),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use picloud_proto::{NodeInfo, NumaNode, Resources};

    use super::*;

    fn job(id: &str, state: JobState, exit: Option<i32>) -> JobInfo {
        let mut j = crate::pbs::qstat::tests::queued_job(1, "job.sh", "alice");
        j.id = id.into();
        j.state = state;
        j.exit_status = exit;
        j.spec.resources = Resources { ncpus: 4, ..Resources::default() };
        j
    }

    #[test]
    fn stat_table() {
        let mut running = job("1.head", JobState::Running, None);
        running.exec_host = Some("node1/0*4".into());
        running.stime = Some(10);
        running.used.walltime_ms = 65_000;
        let mut held = job("2.head", JobState::Held, None);
        held.comment = Some("waiting for 1.head".into());
        let mut done = job("3.head", JobState::Finished, Some(265));
        done.comment = Some("cancelled".into());
        done.spec.name = "a-longer-name".into();
        let want = "\
ID      NAME           USER   STATE     CPUS  ELAPSED   EXIT  NODE/COMMENT
1.head  job.sh         alice  running   4     00:01:05  -     node1/0*4
2.head  job.sh         alice  held      4     -         -     waiting for 1.head
3.head  a-longer-name  alice  finished  4     -         265   cancelled
";
        assert_eq!(format_stat(&[running, held, done]), want);
        assert_eq!(format_stat(&[]), "ID  NAME  USER  STATE  CPUS  ELAPSED  EXIT  NODE/COMMENT\n");
    }

    #[test]
    fn wait_lines_and_status() {
        let ok = job("1.head", JobState::Finished, Some(0));
        let mut failed = job("2.head", JobState::Finished, Some(3));
        failed.comment = Some("exited with 3".into());
        assert_eq!(
            format_wait(&[ok.clone(), failed.clone()]),
            "1.head finished exit=0\n2.head finished exit=3 exited with 3\n"
        );
        assert_eq!(wait_status(std::slice::from_ref(&ok), 0), 0);
        assert_eq!(wait_status(&[ok.clone(), failed], 0), 1);
        assert_eq!(wait_status(&[job("4.head", JobState::Finished, None)], 0), 1);
        assert_eq!(wait_status(&[ok], 1), 2);
        assert_eq!(format_wait(&[job("5.head", JobState::Running, None)]), "5.head running exit=-\n");
    }

    #[test]
    fn nodes_table() {
        let node = |name: &str, used: Vec<u32>, running: Vec<String>| NodeStatus {
            name: name.into(),
            state: "up".into(),
            info: NodeInfo {
                hostname: name.into(),
                numa_nodes: vec![
                    NumaNode { os_index: 0, pus: vec![0, 1], memory: 8 << 30 },
                    NumaNode { os_index: 1, pus: vec![2, 3], memory: 8 << 30 },
                ],
                cores: vec![vec![0], vec![1], vec![2], vec![3]],
                memory: 16 << 30,
                packages: 1,
                limits: "cgroup v2".into(),
                ..NodeInfo::default()
            },
            used_pus: used,
            running,
        };
        let many: Vec<String> = (1..=5).map(|i| format!("{i}.head")).collect();
        let text =
            format_nodes(&[node("node1", vec![0, 1], vec!["7.head".into()]), node("node2", vec![], many)]);
        let want = "\
NAME   STATE  CPUS  NUMA  MEMORY  GPUS  JOBS                     LIMITS
node1  up     2/4   2     16 GiB  0     7.head                   cgroup v2
node2  up     0/4   2     16 GiB  0     1.head,2.head,3.head +2  cgroup v2
";
        assert_eq!(text, want);
    }

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(15_872 << 20), "15.5 GiB");
        assert_eq!(human_bytes(1 << 40), "1 TiB");
    }

    #[test]
    fn table_layout() {
        let t = render_table(&["A", "LONGER"], &[vec!["xyz".into(), "".into()], vec!["".into(), "v".into()]]);
        assert_eq!(t, "A    LONGER\nxyz\n     v\n");
    }

    /// A stand-in for `main.rs`'s parser, to check the argument structs.
    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(subcommand)]
        command: TestCommand,
    }

    #[derive(Debug, clap::Subcommand)]
    enum TestCommand {
        Stat(StatArgs),
        Cancel(CancelArgs),
        Wait(WaitArgs),
        Nodes(NodesArgs),
    }

    #[test]
    fn argument_structs() {
        let parse = |s: &str| TestCli::try_parse_from(s.split_whitespace());
        match parse("p stat --all --json -u bob -t 1 2.head").unwrap().command {
            TestCommand::Stat(a) => {
                assert!(a.all && a.json && a.tasks);
                assert_eq!(a.user.as_deref(), Some("bob"));
                assert_eq!(a.ids, vec!["1", "2.head"]);
            }
            other => panic!("{other:?}"),
        }
        match parse("p wait --timeout 1.5 3").unwrap().command {
            TestCommand::Wait(a) => {
                assert_eq!((a.timeout, a.ids), (Some(1.5), vec!["3".to_string()]))
            }
            other => panic!("{other:?}"),
        }
        assert!(parse("p wait --timeout -1 3").is_err());
        assert!(parse("p wait").is_err(), "ids are required");
        assert!(parse("p cancel").is_err(), "ids are required");
        assert!(matches!(
            parse("p nodes --json").unwrap().command,
            TestCommand::Nodes(NodesArgs { json: true })
        ));
        assert!(matches!(parse("p cancel 1 2").unwrap().command, TestCommand::Cancel(a) if a.ids.len() == 2));
    }
}
