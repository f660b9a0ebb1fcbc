//! qstat: show jobs, the queue or the server the way PBS Pro does.
//!
//! Displays, chosen by option:
//! - the default table (`Job id  Name  User  Time Use S Queue`), nothing at all
//!   when there is no job;
//! - the alternate table (`-a`, and `-n`, `-s`, `-i`, `-r`, `-H` which imply it);
//! - `-f`: `Job Id:` blocks of `name = value` lines, long lines wrapped at 79
//!   columns with tab-indented continuations unless `-1`; `-F json` gives the
//!   same attributes as PBS Pro's JSON document;
//! - `-B` (server) and `-Q` (the one queue, `workq`), as tables or with `-f`.
//!
//! A job's attributes are built once ([`job_attributes`]) and then written as
//! text or JSON, so the two never disagree. Times are local, ctime style
//! ([`super::timefmt`]), passed in as a function so tests can fix them.

use super::getopt::{Getopt, GetoptError, Word};
use std::ffi::OsString;
use std::process::ExitCode;

use picloud_proto::{
    ClientRequest, JobInfo, JobRef, JobState, JoinStreams, ServerReply, ServerStatus, StatRequest,
};
use serde_json::{Map, Value};

use super::qsub::DEFAULT_QUEUE;
use super::resources::{format_duration, format_kb, format_size};
use super::{EXIT_UNKNOWN_JOB, EXIT_UNKNOWN_QUEUE, EXIT_USAGE, PICLOUD_VERSION};

/// Lines of `qstat -f` are wrapped to this many columns (PBS's width).
pub(crate) const WRAP_COLUMNS: usize = 79;
/// Columns a tab takes at the start of a continuation line.
const TAB_COLUMNS: usize = 8;

/// qstat's options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct QstatArgs {
    /// `-f`.
    pub(crate) full: bool,
    /// `-F json`.
    pub(crate) json: bool,
    /// `-1`: never wrap, and `-n` on the job's line.
    pub(crate) one_line: bool,
    /// `-x`: include finished jobs.
    pub(crate) finished: bool,
    /// `-H`: only finished jobs.
    pub(crate) history: bool,
    /// `-u USER`.
    pub(crate) user: Option<String>,
    /// `-t`: list array tasks too.
    pub(crate) tasks: bool,
    /// `-J`: only arrays (and, with `-t`, their tasks).
    pub(crate) arrays_only: bool,
    /// `-w`: wide columns.
    pub(crate) wide: bool,
    /// `-a` (also implied by `-n -s -i -r -H`).
    pub(crate) alternate: bool,
    /// `-n`: nodes under each job.
    pub(crate) nodes: bool,
    /// `-s`: comment under each job.
    pub(crate) comments: bool,
    /// `-i`: only queued and held jobs.
    pub(crate) idle: bool,
    /// `-r`: only running jobs.
    pub(crate) running: bool,
    /// `-B`: the server.
    pub(crate) server: bool,
    /// `-Q`: the queues.
    pub(crate) queues: bool,
    /// Job ids, queue names or `@server` destinations.
    pub(crate) operands: Vec<String>,
}

/// A usage error in qstat's arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum QstatUsageError {
    /// A word that is not a valid option.
    #[error(transparent)]
    Getopt(#[from] GetoptError),
    /// `-F` with another format.
    #[error("-F {0}: only the json format is supported")]
    Format(String),
}

/// Usage text.
pub(crate) const USAGE: &str = "\
usage: qstat [-f [-F json] [-1]] [-x | -H] [-t] [-J] [-u user] [-w] [job_identifier... | destination...]
       qstat -a [-n] [-s] [-i | -r] [-1] [-w] [-x | -H] [-u user] [job_identifier... | destination...]
       qstat -Q [-f [-F json]] [destination...]
       qstat -B [-f [-F json]]";

/// Parses qstat's arguments (without the program name), getopt style.
pub(crate) fn parse_args(args: &[String]) -> Result<QstatArgs, QstatUsageError> {
    fn arity(c: char) -> Option<bool> {
        match c {
            'f' | '1' | 'x' | 'H' | 't' | 'J' | 'w' | 'a' | 'n' | 's' | 'i' | 'r' | 'B' | 'Q' => Some(false),
            'F' | 'u' => Some(true),
            _ => None,
        }
    }
    let mut a = QstatArgs::default();
    for word in Getopt::new(args, arity) {
        match word? {
            Word::Operand(o) => a.operands.push(o.to_string()),
            Word::Rest(rest) => a.operands.extend(rest.iter().cloned()),
            Word::Value('u', user) => a.user = Some(user.to_string()),
            Word::Value(_, format) if format.eq_ignore_ascii_case("json") => a.json = true,
            Word::Value(_, format) => return Err(QstatUsageError::Format(format.to_string())),
            Word::Flag(c) => {
                let flag = match c {
                    'f' => &mut a.full,
                    '1' => &mut a.one_line,
                    'x' => &mut a.finished,
                    'H' => &mut a.history,
                    't' => &mut a.tasks,
                    'J' => &mut a.arrays_only,
                    'w' => &mut a.wide,
                    'a' => &mut a.alternate,
                    'n' => &mut a.nodes,
                    's' => &mut a.comments,
                    'i' => &mut a.idle,
                    'r' => &mut a.running,
                    'B' => &mut a.server,
                    _ => &mut a.queues,
                };
                *flag = true;
            }
        }
    }
    // `-F json` only makes sense for the full display; asking for it means that.
    a.full |= a.json;
    a.alternate |= a.nodes || a.comments || a.idle || a.running || a.history;
    Ok(a)
}

/// How jobs are written: the server's name and a time formatter.
pub(crate) struct View<'a> {
    /// The server's name.
    pub(crate) server: &'a str,
    /// Unix seconds to ctime-style text.
    pub(crate) time: &'a dyn Fn(u64) -> String,
}

/// The value of one attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AttrValue {
    /// Text.
    Str(String),
    /// A number (a JSON number).
    Int(i64),
    /// `True` / `False` (a JSON boolean).
    Bool(bool),
    /// `Variable_List`: `K=V,K=V` (a JSON object).
    Vars(Vec<(String, String)>),
}

impl AttrValue {
    fn text(&self) -> String {
        match self {
            AttrValue::Str(s) => s.clone(),
            AttrValue::Int(n) => n.to_string(),
            AttrValue::Bool(true) => "True".into(),
            AttrValue::Bool(false) => "False".into(),
            AttrValue::Vars(vars) => {
                vars.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
            }
        }
    }

    fn json(&self) -> Value {
        match self {
            AttrValue::Str(s) => Value::from(s.as_str()),
            AttrValue::Int(n) => Value::from(*n),
            AttrValue::Bool(b) => Value::from(*b),
            AttrValue::Vars(vars) => {
                Value::Object(vars.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect())
            }
        }
    }
}

/// One `name = value` line; a dotted name (`Resource_List.ncpus`) nests in JSON.
pub(crate) type Attr = (String, AttrValue);

fn s(name: &str, value: impl Into<String>) -> Attr {
    (name.to_string(), AttrValue::Str(value.into()))
}

fn int(name: &str, value: impl Into<i64>) -> Attr {
    (name.to_string(), AttrValue::Int(value.into()))
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The requested resources, sorted by name as PBS lists them.
fn resource_list(job: &JobInfo) -> Vec<Attr> {
    let r = &job.spec.resources;
    let mut chunk = format!("1:ncpus={}", r.ncpus);
    let mut list = vec![int("ncpus", r.ncpus), int("nodect", 1)];
    if let Some(mem) = r.mem {
        chunk.push_str(&format!(":mem={}", format_size(mem)));
        list.push(s("mem", format_size(mem)));
    }
    if let Some(w) = r.walltime {
        list.push(s("walltime", format_duration(w)));
    }
    list.push(s("select", chunk));
    list.extend(r.other.iter().map(|(k, v)| s(k, v.clone())));
    list.sort_by(|a, b| a.0.cmp(&b.0));
    list.into_iter().map(|(k, v)| (format!("Resource_List.{k}"), v)).collect()
}

/// Every attribute `qstat -f` shows of `job`, in PBS's order.
pub(crate) fn job_attributes(job: &JobInfo, view: &View<'_>) -> Vec<Attr> {
    let spec = &job.spec;
    let host = &spec.submit_host;
    let started = job.stime.is_some();
    let mut a = vec![s("Job_Name", spec.name.clone()), s("Job_Owner", format!("{}@{host}", job.user))];
    if started {
        a.push(s("resources_used.cput", format_duration(job.used.cput_ms / 1000)));
        a.push(s("resources_used.mem", format_kb(job.used.mem)));
        a.push(int("resources_used.ncpus", spec.resources.ncpus));
        a.push(s("resources_used.walltime", format_duration(job.used.walltime_ms / 1000)));
    }
    a.push(s("job_state", job.state.letter().to_string()));
    a.push(s("queue", spec.queue.clone()));
    a.push(s("server", view.server));
    if let Some(account) = &spec.account {
        a.push(s("Account_Name", account.clone()));
    }
    a.push(s("ctime", (view.time)(job.ctime)));
    if !job.stderr_path.is_empty() {
        a.push(s("Error_Path", format!("{host}:{}", job.stderr_path)));
    }
    if let Some(exec) = &job.exec_host {
        a.push(s("exec_host", exec.clone()));
    }
    let held_by_user = spec.hold && job.state == JobState::Held;
    a.push(s("Hold_Types", if held_by_user { "u" } else { "n" }));
    a.push(s(
        "Join_Path",
        match spec.join {
            JoinStreams::No => "n",
            JoinStreams::IntoOut => "oe",
            JoinStreams::IntoErr => "eo",
        },
    ));
    a.push(s("Keep_Files", "n"));
    if !job.stdout_path.is_empty() {
        a.push(s("Output_Path", format!("{host}:{}", job.stdout_path)));
    }
    a.push(int("Priority", spec.priority));
    a.push(s("qtime", (view.time)(job.ctime)));
    a.push(("Rerunable".into(), AttrValue::Bool(spec.rerunnable)));
    a.extend(resource_list(job));
    if let Some(t) = job.stime {
        a.push(s("stime", (view.time)(t)));
    }
    if let Some(t) = job.end_time {
        a.push(s("obittime", (view.time)(t)));
    }
    a.push((
        "Variable_List".into(),
        AttrValue::Vars(vec![
            ("PBS_O_HOST".into(), host.clone()),
            ("PBS_O_QUEUE".into(), spec.queue.clone()),
            ("PBS_O_WORKDIR".into(), spec.workdir.clone()),
        ]),
    ));
    if let Some(comment) = &job.comment {
        a.push(s("comment", comment.clone()));
    }
    if let Some(t) = job.etime {
        a.push(s("etime", (view.time)(t)));
    }
    if job.run_count > 0 {
        a.push(int("run_count", job.run_count));
    }
    if let Some(status) = job.exit_status {
        a.push(int("Exit_status", status));
    }
    a.push(s("Submit_arguments", spec.submit_args.clone()));
    if job.is_array {
        a.push(("array".into(), AttrValue::Bool(true)));
        if let Some(indices) = &spec.array {
            a.push(s("array_indices_submitted", indices.clone()));
        }
        let c = job.array_counts.unwrap_or_default();
        a.push(s(
            "array_state_count",
            format!("Queued:{} Running:{} Exiting:0 Expired:{}", c.queued, c.running, c.finished),
        ));
    }
    if let Some(index) = job.task.index {
        a.push(s("array_id", format!("{}[].{}", job.task.seq, view.server)));
        a.push(int("array_index", index));
    }
    if let Some(depend) = &spec.depend {
        a.push(s("depend", depend.clone()));
    }
    if let Some(project) = &spec.project {
        a.push(s("project", project.clone()));
    }
    a.push(s("Submit_Host", host.clone()));
    a
}

/// `    name = value`, wrapped like PBS unless `one_line`: at [`WRAP_COLUMNS`],
/// after the last comma that fits (else mid-word), continuing after a tab.
pub(crate) fn attr_line(name: &str, value: &str, one_line: bool) -> String {
    let head = format!("    {name} = ");
    if one_line {
        return format!("{head}{value}\n");
    }
    let chars: Vec<char> = value.chars().collect();
    let mut out = head.clone();
    let mut column = head.chars().count();
    let mut pos = 0;
    loop {
        let room = WRAP_COLUMNS.saturating_sub(column).max(1);
        if chars.len() - pos <= room {
            out.extend(&chars[pos..]);
            break;
        }
        let window = &chars[pos..pos + room];
        let cut = window.iter().rposition(|&c| c == ',').map_or(room, |p| p + 1);
        out.extend(&chars[pos..pos + cut]);
        pos += cut;
        out.push_str("\n\t");
        column = TAB_COLUMNS;
    }
    out.push('\n');
    out
}

/// `qstat -f`: a `Job Id:` block per job, each followed by a blank line.
pub(crate) fn format_full(jobs: &[JobInfo], view: &View<'_>, one_line: bool) -> String {
    let mut out = String::new();
    for job in jobs {
        out.push_str(&format!("Job Id: {}\n", job.id));
        for (name, value) in job_attributes(job, view) {
            out.push_str(&attr_line(&name, &value.text(), one_line));
        }
        out.push('\n');
    }
    out
}

/// Attributes as a JSON object, dotted names nested (`Resource_List.ncpus`).
fn attrs_json(attrs: Vec<Attr>) -> Value {
    let mut obj = Map::new();
    for (name, value) in attrs {
        match name.split_once('.') {
            Some((group, key)) => {
                let slot = obj.entry(group.to_string()).or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(inner) = slot {
                    inner.insert(key.to_string(), value.json());
                }
            }
            None => {
                obj.insert(name, value.json());
            }
        }
    }
    Value::Object(obj)
}

/// Pretty-prints with PBS's four-space indentation.
fn to_json_text(value: &Value) -> String {
    let mut buf = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, formatter);
    serde::Serialize::serialize(value, &mut ser).expect("a JSON value always serializes");
    let mut text = String::from_utf8(buf).expect("serde_json writes UTF-8");
    text.push('\n');
    text
}

fn json_document(view: &View<'_>, now: u64, key: &str, body: Map<String, Value>) -> String {
    let mut doc = Map::new();
    doc.insert("timestamp".into(), Value::from(now));
    doc.insert("pbs_version".into(), Value::from(PICLOUD_VERSION));
    doc.insert("pbs_server".into(), Value::from(view.server));
    doc.insert(key.into(), Value::Object(body));
    to_json_text(&Value::Object(doc))
}

/// `qstat -f -F json`. `now` is the document's timestamp (Unix seconds).
pub(crate) fn format_json(jobs: &[JobInfo], view: &View<'_>, now: u64) -> String {
    let body = jobs.iter().map(|j| (j.id.clone(), attrs_json(job_attributes(j, view)))).collect();
    json_document(view, now, "Jobs", body)
}

/// Shortens `text` to `width` characters, marking a cut with `*` as PBS does.
pub(crate) fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('*');
    cut
}

/// `Time Use`: cput, or `0` for a job that never ran.
fn time_use(job: &JobInfo) -> String {
    if job.stime.is_none() && job.used.cput_ms == 0 {
        "0".into()
    } else {
        format_duration(job.used.cput_ms / 1000)
    }
}

/// The default display. Empty when there is no job.
pub(crate) fn format_table(jobs: &[JobInfo], wide: bool) -> String {
    if jobs.is_empty() {
        return String::new();
    }
    let rows: Vec<[String; 3]> =
        jobs.iter().map(|j| [j.id.clone(), j.spec.name.clone(), j.user.clone()]).collect();
    let (id_w, name_w, user_w) = if wide {
        let widest =
            |k: usize, min: usize| rows.iter().map(|r| r[k].chars().count()).max().unwrap_or(0).max(min);
        (widest(0, 17), widest(1, 16), widest(2, 16))
    } else {
        (17, 16, 16)
    };
    let mut out = format!(
        "{:<id_w$} {:<name_w$} {:<user_w$}  Time Use S Queue\n{:<id_w$} {} {}  -------- - -----\n",
        "Job id",
        "Name",
        "User",
        "-".repeat(id_w - 1),
        "-".repeat(name_w),
        "-".repeat(user_w),
    );
    for (job, [id, name, user]) in jobs.iter().zip(rows) {
        out.push_str(&format!(
            "{:<id_w$} {:<name_w$} {:<user_w$}  {:>8} {} {}\n",
            fit(&id, id_w),
            fit(&name, name_w),
            fit(&user, user_w),
            time_use(job),
            job.state.letter(),
            job.spec.queue,
        ));
    }
    out
}

fn hours_minutes(secs: u64) -> String {
    format!("{:02}:{:02}", secs / 3600, secs / 60 % 60)
}

/// Options of the alternate display.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AltOptions {
    /// `-n`.
    pub(crate) nodes: bool,
    /// `-s`.
    pub(crate) comments: bool,
    /// `-1`.
    pub(crate) one_line: bool,
    /// `-w`.
    pub(crate) wide: bool,
}

/// The alternate display (`qstat -a`). Empty when there is no job.
pub(crate) fn format_alternate(jobs: &[JobInfo], server: &str, opts: AltOptions) -> String {
    if jobs.is_empty() {
        return String::new();
    }
    let (id_w, user_w, queue_w, name_w) = if opts.wide { (30, 15, 15, 15) } else { (15, 8, 8, 10) };
    let mut out = format!("\n{server}: \n");
    let lead = id_w + user_w + queue_w + name_w + 4 + 7 + 4 + 4;
    out.push_str(&format!("{:lead$}Req'd  Req'd   Elap\n", ""));
    out.push_str(&format!(
        "{:<id_w$} {:<user_w$} {:<queue_w$} {:<name_w$} SessID NDS TSK Memory Time  S Time\n",
        "Job ID", "Username", "Queue", "Jobname"
    ));
    out.push_str(&format!(
        "{} {} {} {} ------ --- --- ------ ----- - -----\n",
        "-".repeat(id_w),
        "-".repeat(user_w),
        "-".repeat(queue_w),
        "-".repeat(name_w)
    ));
    for job in jobs {
        let r = &job.spec.resources;
        let elapsed =
            if job.stime.is_some() { hours_minutes(job.used.walltime_ms / 1000) } else { "--".into() };
        out.push_str(&format!(
            "{:<id_w$} {:<user_w$} {:<queue_w$} {:<name_w$} {:>6} {:>3} {:>3} {:>6} {:>5} {} {:>5}",
            fit(&job.id, id_w),
            fit(&job.user, user_w),
            fit(&job.spec.queue, queue_w),
            fit(&job.spec.name, name_w),
            "--",
            1,
            r.ncpus,
            r.mem.map_or_else(|| "--".into(), format_size),
            r.walltime.map_or_else(|| "--".into(), hours_minutes),
            job.state.letter(),
            elapsed,
        ));
        let exec = job.exec_host.clone().unwrap_or_else(|| "--".into());
        if opts.nodes && opts.one_line {
            out.push_str(&format!(" {exec}"));
        }
        out.push('\n');
        if opts.nodes && !opts.one_line {
            out.push_str(&format!("   {exec}\n"));
        }
        if opts.comments {
            if let Some(c) = &job.comment {
                out.push_str(&format!("   {c}\n"));
            }
        }
    }
    out
}

fn state_count(st: &ServerStatus) -> String {
    format!(
        "Transit:0 Queued:{} Held:{} Waiting:0 Running:{} Exiting:0 Begun:0",
        st.queued, st.held, st.running
    )
}

fn live_jobs(st: &ServerStatus) -> u64 {
    st.queued + st.running + st.held
}

/// What `qstat -B -f` shows.
pub(crate) fn server_attributes(st: &ServerStatus) -> Vec<Attr> {
    vec![
        s("server_state", "Active"),
        s("server_host", st.name.clone()),
        int("total_jobs", count(live_jobs(st))),
        s("state_count", state_count(st)),
        s("default_queue", DEFAULT_QUEUE),
        s("pbs_version", PICLOUD_VERSION),
        ("job_history_enable".into(), AttrValue::Bool(true)),
        s("job_history_duration", format_duration(st.keep_finished_secs)),
        int("finished_jobs", count(st.finished)),
        int("nodes_up", st.nodes_up),
        int("protocol_version", st.version),
        s("state_dir", st.state_dir.clone()),
    ]
}

/// What `qstat -Q -f` shows of `workq`.
pub(crate) fn queue_attributes(st: &ServerStatus) -> Vec<Attr> {
    vec![
        s("queue_type", "Execution"),
        int("total_jobs", count(live_jobs(st))),
        s("state_count", state_count(st)),
        ("enabled".into(), AttrValue::Bool(true)),
        ("started".into(), AttrValue::Bool(true)),
    ]
}

fn format_attr_block(title: &str, attrs: Vec<Attr>, one_line: bool) -> String {
    let mut out = format!("{title}\n");
    for (name, value) in attrs {
        out.push_str(&attr_line(&name, &value.text(), one_line));
    }
    out.push('\n');
    out
}

/// `qstat -B`, `-B -f`, `-B -f -F json`.
pub(crate) fn format_server(s: &ServerStatus, args: &QstatArgs, now: u64) -> String {
    if args.json {
        let view = View { server: &s.name, time: &|_| String::new() };
        let body = std::iter::once((s.name.clone(), attrs_json(server_attributes(s)))).collect();
        return json_document(&view, now, "Server", body);
    }
    if args.full {
        return format_attr_block(&format!("Server: {}", s.name), server_attributes(s), args.one_line);
    }
    format!(
        "Server             Max   Tot   Que   Run   Hld   Wat   Trn   Ext Status\n\
         ---------------- ----- ----- ----- ----- ----- ----- ----- ----- -----------\n\
         {:<16} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} Active\n",
        fit(&s.name, 16),
        0,
        live_jobs(s),
        s.queued,
        s.running,
        s.held,
        0,
        0,
        0
    )
}

/// `qstat -Q`, `-Q -f`, `-Q -f -F json`.
pub(crate) fn format_queue(s: &ServerStatus, args: &QstatArgs, now: u64) -> String {
    if args.json {
        let view = View { server: &s.name, time: &|_| String::new() };
        let body = std::iter::once((DEFAULT_QUEUE.to_string(), attrs_json(queue_attributes(s)))).collect();
        return json_document(&view, now, "Queue", body);
    }
    if args.full {
        return format_attr_block(&format!("Queue: {DEFAULT_QUEUE}"), queue_attributes(s), args.one_line);
    }
    format!(
        "Queue              Max   Tot Ena Str   Que   Run   Hld   Wat   Trn   Ext Type\n\
         ---------------- ----- ----- --- --- ----- ----- ----- ----- ----- ----- ----\n\
         {:<16} {:>5} {:>5} yes yes {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} Exec\n",
        DEFAULT_QUEUE,
        0,
        live_jobs(s),
        s.queued,
        s.running,
        s.held,
        0,
        0,
        0
    )
}

/// Whether `job` passes the client-side filters (`-J -i -r -H -u`).
pub(crate) fn wanted(job: &JobInfo, args: &QstatArgs) -> bool {
    let state = job.state;
    (!args.arrays_only || job.is_array || job.task.index.is_some())
        && (!args.idle || matches!(state, JobState::Queued | JobState::Held))
        && (!args.running || matches!(state, JobState::Running | JobState::Exiting | JobState::Begun))
        && (!args.history || state == JobState::Finished)
        && match &args.user {
            Some(u) => &job.user == u,
            None => true,
        }
}

/// What the operands ask for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Targets {
    /// Job ids, with their text as typed.
    pub(crate) ids: Vec<(String, JobRef)>,
    /// Operands that are neither ids nor this server's queue.
    pub(crate) bad_destinations: Vec<String>,
    /// Malformed job ids (operands starting with a digit).
    pub(crate) bad_ids: Vec<String>,
}

/// Sorts operands into job ids and destinations (`workq`, `@server`, `workq@server`).
pub(crate) fn classify_operands(operands: &[String]) -> Targets {
    let mut t = Targets::default();
    for op in operands {
        if let Ok(r) = op.parse::<JobRef>() {
            t.ids.push((op.clone(), r));
        } else if op.starts_with(|c: char| c.is_ascii_digit()) {
            t.bad_ids.push(op.clone());
        } else {
            let queue = op.split('@').next().unwrap_or_default();
            if !(queue.is_empty() || queue == DEFAULT_QUEUE) {
                t.bad_destinations.push(op.clone());
            }
        }
    }
    t
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// qstat's main.
pub(crate) fn run(args: Vec<OsString>) -> ExitCode {
    const PROG: &str = "qstat";
    let args = match super::utf8_args(args) {
        Ok(a) => a,
        Err(e) => return super::fail(PROG, &e),
    };
    if args.iter().any(|a| a == "--version") {
        super::emit(&format!("pbs_version = {PICLOUD_VERSION}\n"));
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--help") {
        super::emit(&format!("{USAGE}\n"));
        return ExitCode::SUCCESS;
    }
    let args = match parse_args(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{PROG}: {e}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut client = match super::connect() {
        Ok(c) => c,
        Err(e) => return super::fail(PROG, &e),
    };
    if args.server || args.queues {
        let status = match client.request(&ClientRequest::ServerStatus) {
            Ok(ServerReply::ServerStatus(s)) => s,
            Ok(other) => return super::fail(PROG, &super::unexpected(&other)),
            Err(e) => return super::fail(PROG, &e),
        };
        if args.server {
            super::emit(&format_server(&status, &args, now_secs()));
            return ExitCode::SUCCESS;
        }
        let unknown: Vec<&String> = args
            .operands
            .iter()
            .filter(|q| !matches!(q.split('@').next(), Some("" | DEFAULT_QUEUE)))
            .collect();
        if unknown.is_empty() || unknown.len() < args.operands.len() {
            super::emit(&format_queue(&status, &args, now_secs()));
        }
        for q in &unknown {
            eprintln!("{PROG}: Unknown queue {q}");
        }
        return if unknown.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_UNKNOWN_QUEUE) };
    }

    let targets = classify_operands(&args.operands);
    let mut exit = 0u8;
    for id in &targets.bad_ids {
        eprintln!("{PROG}: illegally formed job identifier: {id}");
        exit = super::EXIT_FAILURE;
    }
    for d in &targets.bad_destinations {
        eprintln!("{PROG}: Unknown queue destination {d}");
        exit = EXIT_UNKNOWN_QUEUE;
    }
    let only_bad = targets.ids.is_empty()
        && !args.operands.is_empty()
        && targets.bad_ids.len() + targets.bad_destinations.len() == args.operands.len();
    if only_bad {
        return ExitCode::from(exit);
    }
    let named = !targets.ids.is_empty() && targets.ids.len() == args.operands.len();
    let request = StatRequest {
        jobs: if named { targets.ids.iter().map(|(_, r)| *r).collect() } else { Vec::new() },
        // Jobs asked for by id are shown even when finished, as PBS Pro does.
        include_finished: args.finished || args.history || named,
        user: args.user.clone(),
        expand_arrays: args.tasks,
    };
    let (jobs, unknown) = match client.request(&ClientRequest::Stat(request)) {
        Ok(ServerReply::Jobs { jobs, unknown }) => (jobs, unknown),
        Ok(other) => return super::fail(PROG, &super::unexpected(&other)),
        Err(e) => return super::fail(PROG, &e),
    };
    let jobs: Vec<JobInfo> = jobs.into_iter().filter(|j| wanted(j, &args)).collect();
    let server = client.server_name().to_string();
    let view = View { server: &server, time: &super::timefmt::local_ctime };
    let text = if args.json {
        format_json(&jobs, &view, now_secs())
    } else if args.full {
        format_full(&jobs, &view, args.one_line)
    } else if args.alternate {
        let opts = AltOptions {
            nodes: args.nodes,
            comments: args.comments,
            one_line: args.one_line,
            wide: args.wide,
        };
        format_alternate(&jobs, &server, opts)
    } else {
        format_table(&jobs, args.wide)
    };
    super::emit(&text);
    for r in &unknown {
        eprintln!("{PROG}: Unknown Job Id {}", super::refs::as_typed(&targets.ids, r));
        exit = EXIT_UNKNOWN_JOB;
    }
    ExitCode::from(exit)
}

#[cfg(test)]
pub(crate) mod tests {
    use picloud_proto::{ArrayCounts, JobSpecSummary, Resources, ResourcesUsed, TaskId};

    use super::*;

    fn strings(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn fake_time(secs: u64) -> String {
        format!("T{secs}")
    }

    fn view() -> View<'static> {
        View { server: "head", time: &fake_time }
    }

    /// A finished two-core job, as in the PBS examples.
    fn finished_job() -> JobInfo {
        JobInfo {
            id: "12.head".into(),
            task: TaskId { seq: 12, index: None },
            is_array: false,
            spec: JobSpecSummary {
                name: "job.sh".into(),
                queue: "workq".into(),
                account: None,
                project: None,
                resources: Resources {
                    ncpus: 2,
                    mem: Some(1 << 30),
                    walltime: Some(600),
                    other: vec![("foo".into(), "bar".into())],
                },
                array: None,
                depend: Some("afterok:11.head".into()),
                workdir: "/home/alice".into(),
                submit_host: "head".into(),
                submit_args: "-l ncpus=2 job.sh".into(),
                rerunnable: true,
                priority: 0,
                join: JoinStreams::No,
                hold: false,
            },
            user: "alice".into(),
            state: JobState::Finished,
            exit_status: Some(0),
            comment: Some("Job run on head".into()),
            exec_host: Some("head/0*2".into()),
            cpus: vec![0, 1],
            ctime: 100,
            etime: Some(100),
            stime: Some(101),
            end_time: Some(102),
            used: ResourcesUsed { cput_ms: 1500, walltime_ms: 1000, mem: 2048 },
            stdout_path: "/home/alice/job.sh.o12".into(),
            stderr_path: "/home/alice/job.sh.e12".into(),
            array_counts: None,
            run_count: 1,
        }
    }

    /// A queued job (shared with the tests of `picloud stat`).
    pub(crate) fn queued_job(seq: u64, name: &str, user: &str) -> JobInfo {
        let mut j = finished_job();
        j.id = format!("{seq}.head");
        j.task.seq = seq;
        j.spec.name = name.into();
        j.user = user.into();
        j.state = JobState::Queued;
        j.exit_status = None;
        j.comment = None;
        j.exec_host = None;
        j.stime = None;
        j.end_time = None;
        j.used = ResourcesUsed::default();
        j.run_count = 0;
        j
    }

    fn array_job() -> JobInfo {
        let mut j = queued_job(20, "sweep", "bob");
        j.id = "20[].head".into();
        j.is_array = true;
        j.state = JobState::Begun;
        j.spec.array = Some("1-100".into());
        j.array_counts = Some(ArrayCounts { queued: 90, running: 2, finished: 8 });
        j
    }

    fn array_task() -> JobInfo {
        let mut j = array_job();
        j.id = "20[3].head".into();
        j.is_array = false;
        j.task.index = Some(3);
        j.state = JobState::Running;
        j.array_counts = None;
        j.stime = Some(150);
        j
    }

    #[test]
    fn options() {
        let a = parse_args(&strings("-fx1 -F json -u alice 12 13.head")).unwrap();
        assert!(a.full && a.finished && a.one_line && a.json);
        assert_eq!(a.user.as_deref(), Some("alice"));
        assert_eq!(a.operands, strings("12 13.head"));
        let b = parse_args(&strings("-Fjson")).unwrap();
        assert!(b.json && b.full, "-F json implies -f");
        let c = parse_args(&strings("-n -t -w -J")).unwrap();
        assert!(c.alternate && c.nodes && c.tasks && c.wide && c.arrays_only);
        assert!(parse_args(&strings("-Bf")).unwrap().server);
        assert!(parse_args(&strings("-Q")).unwrap().queues);
        assert!(parse_args(&strings("-H")).unwrap().alternate);
        assert_eq!(parse_args(&strings("-F dsv")), Err(QstatUsageError::Format("dsv".into())));
        assert_eq!(parse_args(&strings("-u")), Err(GetoptError::MissingArgument('u').into()));
        assert_eq!(parse_args(&strings("-fz")), Err(GetoptError::Unknown('z').into()));
        assert_eq!(parse_args(&strings("--all")), Err(GetoptError::UnknownLong("--all".into()).into()));
        assert_eq!(parse_args(&strings("-- -5")).unwrap().operands, vec!["-5"]);
    }

    #[test]
    fn operands() {
        let t = classify_operands(&strings("12 13[].head workq @head workq@head long 1x"));
        assert_eq!(
            t.ids.iter().map(|(_, r)| *r).collect::<Vec<_>>(),
            vec![JobRef::Job(12), JobRef::Array(13)]
        );
        assert_eq!(t.bad_destinations, vec!["long"]);
        assert_eq!(t.bad_ids, vec!["1x"]);
    }

    #[test]
    fn default_table() {
        let mut running = finished_job();
        running.state = JobState::Running;
        let jobs = vec![running, queued_job(13, "a_rather_long_job_name", "someone_with_a_long_name")];
        let want = "\
Job id            Name             User              Time Use S Queue
----------------  ---------------- ----------------  -------- - -----
12.head           job.sh           alice             00:00:01 R workq
13.head           a_rather_long_j* someone_with_a_*         0 Q workq
";
        assert_eq!(format_table(&jobs, false), want);
        assert_eq!(format_table(&[], false), "", "no jobs, no header");
        let wide = format_table(&jobs, true);
        assert!(wide.contains("a_rather_long_job_name someone_with_a_long_name"), "{wide}");
        assert!(wide.lines().all(|l| !l.contains('*')), "{wide}");
    }

    #[test]
    fn truncation() {
        assert_eq!(fit("short", 8), "short");
        assert_eq!(fit("exactly8", 8), "exactly8");
        assert_eq!(fit("ninechars", 8), "ninecha*");
        assert_eq!(fit("ééééééééé", 4), "ééé*");
    }

    #[test]
    fn full_display() {
        let text = format_full(&[finished_job()], &view(), false);
        let want = "\
Job Id: 12.head
    Job_Name = job.sh
    Job_Owner = alice@head
    resources_used.cput = 00:00:01
    resources_used.mem = 2kb
    resources_used.ncpus = 2
    resources_used.walltime = 00:00:01
    job_state = F
    queue = workq
    server = head
    ctime = T100
    Error_Path = head:/home/alice/job.sh.e12
    exec_host = head/0*2
    Hold_Types = n
    Join_Path = n
    Keep_Files = n
    Output_Path = head:/home/alice/job.sh.o12
    Priority = 0
    qtime = T100
    Rerunable = True
    Resource_List.foo = bar
    Resource_List.mem = 1gb
    Resource_List.ncpus = 2
    Resource_List.nodect = 1
    Resource_List.select = 1:ncpus=2:mem=1gb
    Resource_List.walltime = 00:10:00
    stime = T101
    obittime = T102
    Variable_List = PBS_O_HOST=head,PBS_O_QUEUE=workq,PBS_O_WORKDIR=/home/alice
    comment = Job run on head
    etime = T100
    run_count = 1
    Exit_status = 0
    Submit_arguments = -l ncpus=2 job.sh
    depend = afterok:11.head
    Submit_Host = head

";
        assert_eq!(text, want);
        assert_eq!(format_full(&[], &view(), false), "");
    }

    #[test]
    fn full_display_of_arrays_and_tasks() {
        let text = format_full(&[array_job(), array_task()], &view(), true);
        assert!(text.contains("Job Id: 20[].head\n"));
        assert!(text.contains("    job_state = B\n"));
        assert!(text.contains("    array = True\n"));
        assert!(text.contains("    array_indices_submitted = 1-100\n"));
        assert!(text.contains("    array_state_count = Queued:90 Running:2 Exiting:0 Expired:8\n"));
        assert!(text.contains("Job Id: 20[3].head\n"));
        assert!(text.contains("    array_id = 20[].head\n"));
        assert!(text.contains("    array_index = 3\n"));
        assert!(!text.contains("Exit_status"), "no exit status before the end");
        let held = {
            let mut j = queued_job(5, "h", "alice");
            j.state = JobState::Held;
            j.spec.hold = true;
            j
        };
        assert!(format_full(&[held], &view(), true).contains("    Hold_Types = u\n"));
    }

    #[test]
    fn wrapping() {
        let value = "PBS_O_HOME=/home/user,PBS_O_LANG=en_US.UTF-8,PBS_O_LOGNAME=user,\
                     PBS_O_PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/opt/very/long/path/bin,\
                     PBS_O_SHELL=/bin/bash";
        let text = attr_line("Variable_List", value, false);
        let want = "    Variable_List = PBS_O_HOME=/home/user,PBS_O_LANG=en_US.UTF-8,\n\
                    \tPBS_O_LOGNAME=user,\n\
                    \tPBS_O_PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/opt/\n\
                    \tvery/long/path/bin,PBS_O_SHELL=/bin/bash\n";
        assert_eq!(text, want);
        for line in text.lines() {
            let columns = line.chars().count() + if line.starts_with('\t') { TAB_COLUMNS - 1 } else { 0 };
            assert!(columns <= WRAP_COLUMNS, "{line:?} is {columns} columns");
        }
        assert_eq!(attr_line("Variable_List", value, true), format!("    Variable_List = {value}\n"));
        assert_eq!(attr_line("a", "short", false), "    a = short\n");
        let exact = "x".repeat(WRAP_COLUMNS - 8);
        assert_eq!(attr_line("a", &exact, false), format!("    a = {exact}\n"), "79 columns fit");
        assert_eq!(attr_line("a", &format!("{exact}y"), false), format!("    a = {exact}\n\ty\n"));
    }

    #[test]
    fn json_display() {
        let text = format_json(&[finished_job(), array_task()], &view(), 1234);
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["timestamp"], 1234);
        assert_eq!(doc["pbs_server"], "head");
        assert_eq!(doc["pbs_version"], PICLOUD_VERSION);
        let j = &doc["Jobs"]["12.head"];
        assert_eq!(j["Job_Name"], "job.sh");
        assert_eq!(j["Job_Owner"], "alice@head");
        assert_eq!(j["job_state"], "F");
        assert_eq!(j["Exit_status"], 0);
        assert_eq!(j["Rerunable"], true);
        assert_eq!(j["Resource_List"]["ncpus"], 2);
        assert_eq!(j["Resource_List"]["mem"], "1gb");
        assert_eq!(j["Resource_List"]["walltime"], "00:10:00");
        assert_eq!(j["Resource_List"]["foo"], "bar");
        assert_eq!(j["resources_used"]["cput"], "00:00:01");
        assert_eq!(j["resources_used"]["mem"], "2kb");
        assert_eq!(j["Variable_List"]["PBS_O_WORKDIR"], "/home/alice");
        assert_eq!(j["ctime"], "T100");
        assert_eq!(j["depend"], "afterok:11.head");
        let t = &doc["Jobs"]["20[3].head"];
        assert_eq!(t["array_index"], 3);
        assert_eq!(t["array_id"], "20[].head");
        assert!(t.get("Exit_status").is_none());
        assert!(text.contains("\n    \"Jobs\": {"), "four-space indentation: {text}");
        let empty: Value = serde_json::from_str(&format_json(&[], &view(), 1)).unwrap();
        assert_eq!(empty["Jobs"], Value::Object(Map::new()));
    }

    #[test]
    fn alternate_display() {
        let mut running = finished_job();
        running.state = JobState::Running;
        let opts = AltOptions { nodes: true, comments: true, ..AltOptions::default() };
        let text = format_alternate(&[running.clone(), queued_job(13, "q", "bob")], "head", opts);
        let want = "
head: 
                                                            Req'd  Req'd   Elap
Job ID          Username Queue    Jobname    SessID NDS TSK Memory Time  S Time
--------------- -------- -------- ---------- ------ --- --- ------ ----- - -----
12.head         alice    workq    job.sh         --   1   2    1gb 00:10 R 00:00
   head/0*2
   Job run on head
13.head         bob      workq    q              --   1   2    1gb 00:10 Q    --
   --
";
        assert_eq!(text, want);
        let one = format_alternate(
            &[running],
            "head",
            AltOptions { nodes: true, one_line: true, ..AltOptions::default() },
        );
        assert!(one.ends_with("R 00:00 head/0*2\n"), "{one}");
        assert_eq!(format_alternate(&[], "head", AltOptions::default()), "");
    }

    #[test]
    fn filters() {
        let all = |s: &str| parse_args(&strings(s)).unwrap();
        let (f, q, a, t) = (finished_job(), queued_job(1, "x", "bob"), array_job(), array_task());
        assert!(wanted(&f, &all("")) && wanted(&q, &all("")));
        assert!(!wanted(&q, &all("-J")) && wanted(&a, &all("-J")) && wanted(&t, &all("-J")));
        assert!(wanted(&q, &all("-i")) && !wanted(&t, &all("-i")));
        assert!(wanted(&t, &all("-r")) && !wanted(&q, &all("-r")));
        assert!(wanted(&f, &all("-H")) && !wanted(&q, &all("-H")));
        assert!(wanted(&f, &all("-u alice")) && !wanted(&q, &all("-u alice")));
    }

    fn status() -> ServerStatus {
        ServerStatus {
            name: "head".into(),
            version: 1,
            queued: 2,
            running: 3,
            held: 1,
            finished: 7,
            nodes_up: 1,
            keep_finished_secs: 3600,
            state_dir: "/var/lib/picloud".into(),
        }
    }

    #[test]
    fn server_and_queue_displays() {
        let plain = QstatArgs::default();
        assert_eq!(
            format_server(&status(), &plain, 0),
            "Server             Max   Tot   Que   Run   Hld   Wat   Trn   Ext Status\n\
             ---------------- ----- ----- ----- ----- ----- ----- ----- ----- -----------\n\
             head                 0     6     2     3     1     0     0     0 Active\n"
        );
        let full = QstatArgs { full: true, one_line: true, ..QstatArgs::default() };
        let text = format_server(&status(), &full, 0);
        assert!(
            text.starts_with("Server: head\n    server_state = Active\n    server_host = head\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "    state_count = Transit:0 Queued:2 Held:1 Waiting:0 Running:3 Exiting:0 Begun:0\n"
            )
        );
        assert!(text.contains("    job_history_duration = 01:00:00\n"));
        assert!(text.contains(&format!("    pbs_version = {PICLOUD_VERSION}\n")));
        let json = QstatArgs { full: true, json: true, ..QstatArgs::default() };
        let doc: Value = serde_json::from_str(&format_server(&status(), &json, 9)).unwrap();
        assert_eq!(doc["Server"]["head"]["total_jobs"], 6);
        assert_eq!(doc["Server"]["head"]["job_history_enable"], true);

        assert_eq!(
            format_queue(&status(), &plain, 0),
            "Queue              Max   Tot Ena Str   Que   Run   Hld   Wat   Trn   Ext Type\n\
             ---------------- ----- ----- --- --- ----- ----- ----- ----- ----- ----- ----\n\
             workq                0     6 yes yes     2     3     1     0     0     0 Exec\n"
        );
        let q = format_queue(&status(), &full, 0);
        assert!(q.starts_with("Queue: workq\n    queue_type = Execution\n    total_jobs = 6\n"), "{q}");
        let doc: Value = serde_json::from_str(&format_queue(&status(), &json, 9)).unwrap();
        assert_eq!(doc["Queue"]["workq"]["enabled"], true);
    }
}
