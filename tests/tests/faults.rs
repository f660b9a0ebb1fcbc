//! Fault injection with real processes: under a steady load (a job array
//! of short commands, each appending its index to a file as its last act,
//! and a map of Python tasks on warm workers doing the same and returning a
//! value),
//! the server is killed with SIGKILL at pseudo-random moments and started
//! again while its agent keeps running and reconnects, then the agent is
//! killed with SIGKILL and a new one started. After each run:
//!
//! - no job is lost: the array finishes, every task succeeded;
//! - every task ran exactly once, except a task that ran again after its
//!   node was lost (the agent killed under it), and such a task's
//!   `run_count` in `qstat -f -t` says so;
//! - the results (exit statuses) of tasks that ended before a kill are kept,
//!   and every Python task's value comes back.
//!
//! CI-sized: 5 scenarios of 2 000 tasks and 3 server kills each
//! (`PICLOUD_FAULT_TASKS`, `PICLOUD_FAULT_KILLS` and
//! `PICLOUD_FAULT_SCENARIOS` change that; `tests/fault_injection.sh`
//! runs the long form, 20 000 tasks). Server timeouts are short
//! (`--node-timeout 2`) so that a killed agent's node is lost quickly.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use picloud_tests::{Site, wait_until};

/// Python tasks in each scenario (a map, submitted beside the array).
const PYTHON_TASKS: u64 = 60;

/// Writes a cloudpickled function and one argument file per task into
/// `site.work` with the repository's Python package; returns the
/// interpreter to run workers with, or `None` when Python with cloudpickle
/// is missing (the Python part of the load is then skipped, loudly).
fn python_payloads(site: &Site, tasks: u64) -> Option<String> {
    let python_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("python");
    let script = format!(
        r#"
import sys
sys.path.insert(0, {python_dir:?})
import cloudpickle
from picloud import _payload
def task(i, path):
    import time
    time.sleep(0.02)
    with open(path, "a") as f:
        f.write(f"p{{i}}\n")
    return i * i
open("py-fn", "wb").write(cloudpickle.dumps(task, protocol=5))
for i in range({tasks}):
    open(f"py-args-{{i}}", "wb").write(_payload.encode_args((i, {lines:?}), {{}})[0])
print(sys.executable)
"#,
        python_dir = python_dir.display().to_string(),
        lines = site.work.join("lines").display().to_string(),
    );
    let out = Command::new("python3").arg("-c").arg(script).current_dir(&site.work).output().ok()?;
    if !out.status.success() {
        eprintln!("skipping the Python tasks: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    Some(String::from_utf8(out.stdout).ok()?.trim().to_string())
}

/// Checks every Python task returned `i * i`, decoding the values with the
/// repository's Python package.
fn check_python_values(site: &Site, id: &str, tasks: u64) {
    let out = site.run("picloud", &["python", "results", "--wait", "--timeout", "600", id]);
    assert!(out.status.success(), "python results: {}", String::from_utf8_lossy(&out.stderr));
    let python_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("python");
    let script = format!(
        r#"
import json, sys
sys.path.insert(0, {python_dir:?})
from picloud import _payload
results = json.load(sys.stdin)
assert len(results) == {tasks}, len(results)
for i, r in enumerate(results):
    assert r["exit_status"] == 0, r
    assert r["outcome"]["status"] == "returned", r
    assert _payload.decode(bytes.fromhex(r["outcome"]["value"])) == i * i, (i, r)
print("ok")
"#,
        python_dir = python_dir.display().to_string(),
    );
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let checked = child.wait_with_output().unwrap();
    assert!(
        checked.status.success() && checked.stdout.starts_with(b"ok"),
        "Python values: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
}

const LONG: Duration = Duration::from_secs(600);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A small deterministic generator (xorshift), so that a failing scenario
/// can be run again with its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One scenario; returns how many tasks ran again after a node loss.
fn scenario(seed: u64, tasks: u64, kills: u64) -> usize {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut site = Site::new(&["--node-timeout", "2"]);
    site.start();
    let last = tasks - 1;
    let range = format!("0-{last}");
    // Short, but long enough that kills land while tasks run.
    let body = "sleep 0.02; echo t${PBS_ARRAY_INDEX} >> lines";
    let array = site.qsub(&["-j", "oe", "-o", "/dev/null", "-J", &range, "--", "sh", "-c", body]);
    let python = python_payloads(&site, PYTHON_TASKS).map(|interpreter| {
        let python_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("python");
        let python_dir = python_dir.display().to_string();
        let mut args = vec![
            "python".to_string(),
            "submit".into(),
            "--function".into(),
            "py-fn".into(),
            "--interpreter".into(),
            interpreter,
            "--sys-path".into(),
            python_dir,
        ];
        for i in 0..PYTHON_TASKS {
            args.extend(["--args".into(), format!("py-args-{i}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = site.run("picloud", &args);
        assert!(out.status.success(), "python submit: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    });

    // Kill the server at pseudo-random moments while the array runs: the
    // k-th kill once about k/(kills + 2) of the tasks have run.
    let step = tasks / (kills + 2);
    let ran = |site: &Site| site.lines("lines").len() as u64;
    for k in 0..kills {
        let target = step * (k + 1) - step / 2 + rng.below(step.max(1));
        wait_until("more tasks to run", LONG, || ran(&site) >= target);
        std::thread::sleep(Duration::from_millis(rng.below(100)));
        eprintln!("seed {seed}: kill {k} of the server after {} task(s)", site.lines("lines").len());
        site.kill_server();
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        site.start();
    }

    // Kill the agent (its running tasks go on as orphans, their node is
    // lost: they run again), and start a new one.
    let target = step * (kills + 1) - step / 2 + rng.below(step.max(1));
    wait_until("more tasks to run", LONG, || ran(&site) >= target);
    if ran(&site) < tasks {
        eprintln!("seed {seed}: kill of the agent after {} task(s)", site.lines("lines").len());
        site.agent.kill9();
        site.start_agent();
        site.wait_node_up();
    }

    let job = site.wait_finished(&array, LONG);
    if let Some(id) = &python {
        site.wait_finished(id, LONG);
        check_python_values(&site, id, PYTHON_TASKS);
        let stat = site.stat_json(id, &["-t"]);
        let seq = id.split('[').next().unwrap();
        let lines = site.lines("lines");
        for i in 0..PYTHON_TASKS {
            let count = lines.get(&format!("p{i}")).copied().unwrap_or(0);
            assert!(count >= 1, "seed {seed}: Python task {i} never ran");
            if count > 1 {
                let task = &stat["Jobs"][format!("{seq}[{i}].testsrv")];
                let runs = task["run_count"].as_u64().unwrap_or(0);
                assert!(
                    runs >= count as u64,
                    "seed {seed}: Python task {i} ran {count} times, run_count {runs}"
                );
            }
        }
    } else {
        eprintln!("seed {seed}: NO Python tasks in this run (python3 with cloudpickle is missing)");
    }

    // Every task ran; those that ran twice say so.
    let lines = site.lines("lines");
    let stat = site.stat_json(&array, &["-t"]);
    let seq = array.split('[').next().unwrap();
    let mut reruns = 0;
    for i in 0..tasks {
        let count = lines.get(&format!("t{i}")).copied().unwrap_or(0);
        assert!(count >= 1, "seed {seed}: task {i} never ran");
        let task = &stat["Jobs"][format!("{seq}[{i}].testsrv")];
        if task["Exit_status"] != 0 {
            let log = std::fs::read_to_string(site.dir.path().join("server.log")).unwrap_or_default();
            eprintln!("server log:\n{log}");
        }
        assert_eq!(task["job_state"], "F", "seed {seed}: task {i}: {task}");
        assert_eq!(task["Exit_status"], 0, "seed {seed}: task {i}: {task}");
        let runs = task["run_count"].as_u64().unwrap_or(0);
        if count > 1 {
            reruns += 1;
            assert!(
                runs >= count as u64,
                "seed {seed}: task {i} ran {count} times but its run_count is {runs}: {task}"
            );
        }
    }
    let python_lines = if python.is_some() { PYTHON_TASKS } else { 0 };
    assert_eq!(lines.len() as u64, tasks + python_lines, "seed {seed}: lines of tasks that do not exist");
    assert_eq!(job["Exit_status"], 0, "seed {seed}: {job}");
    reruns
}

#[test]
fn kills_of_the_server_and_the_agent_lose_nothing_and_run_nothing_twice_unrecorded() {
    let tasks = env_or("PICLOUD_FAULT_TASKS", 2000);
    let kills = env_or("PICLOUD_FAULT_KILLS", 3);
    let scenarios = env_or("PICLOUD_FAULT_SCENARIOS", 5);
    let first_seed = env_or("PICLOUD_FAULT_SEED", 1);
    for seed in first_seed..first_seed + scenarios {
        let reruns = scenario(seed, tasks, kills);
        eprintln!("seed {seed}: {tasks} tasks, {kills} server kills and one agent kill: {reruns} rerun(s)");
    }
}
