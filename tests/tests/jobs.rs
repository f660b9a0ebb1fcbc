//! Command jobs end to end through real `qsub`, `qstat`, `qdel` and a real
//! `picloud up`: arrays, dependencies, cancellation, walltime, output files,
//! exit statuses and the job environment.

use std::time::Duration;

use picloud_proto::{ClientRequest, ServerReply};
use picloud_tests::{Cluster, wait_until};

const LONG: Duration = Duration::from_secs(60);

fn cores(c: &Cluster) -> usize {
    match c.client().request(&ClientRequest::Nodes).unwrap() {
        ServerReply::Nodes(n) => n[0].info.cores.len(),
        other => panic!("{other:?}"),
    }
}

fn seq_of(id: &str) -> &str {
    id.split(['.', '[']).next().unwrap()
}

#[test]
fn array_of_100_runs_every_task_once() {
    let c = Cluster::start();
    let id = c.qsub(&["-J", "1-100", "-N", "arr", "--", "sh", "-c", "echo $PBS_ARRAY_INDEX $PBS_JOBID"]);
    let seq = seq_of(&id).to_string();
    assert_eq!(id, format!("{seq}[].testsrv"));
    let job = c.wait_finished(&id, LONG);
    assert_eq!(job["Exit_status"], 0, "{job}");
    for i in 1..=100 {
        let out = std::fs::read_to_string(c.work.join(format!("arr.o{seq}.{i}"))).unwrap();
        assert_eq!(out, format!("{i} {seq}[{i}].testsrv\n"));
        let err = std::fs::read_to_string(c.work.join(format!("arr.e{seq}.{i}"))).unwrap();
        assert_eq!(err, "");
    }
    // One task is queryable on its own.
    let task = c.job_json(&format!("{seq}[42].testsrv"));
    assert_eq!(task["job_state"], "F");
    assert_eq!(task["Exit_status"], 0);
}

#[test]
fn afterok_chain_runs_in_order() {
    let c = Cluster::start();
    let a = c.qsub(&["--", "sh", "-c", "sleep 0.5; echo A >> order"]);
    let b = c.qsub(&["-W", &format!("depend=afterok:{a}"), "--", "sh", "-c", "echo B >> order"]);
    let cc = c.qsub(&["-W", &format!("depend=afterok:{}", seq_of(&b)), "--", "sh", "-c", "echo C >> order"]);
    c.wait_finished(&cc, LONG);
    assert_eq!(std::fs::read_to_string(c.work.join("order")).unwrap(), "A\nB\nC\n");
    for id in [&a, &b, &cc] {
        assert_eq!(c.job_json(id)["Exit_status"], 0);
    }
}

#[test]
fn afternotok_runs_after_a_failure_and_afterok_never_does() {
    let c = Cluster::start();
    let x = c.qsub(&["--", "sh", "-c", "exit 1"]);
    let y = c.qsub(&["-W", &format!("depend=afternotok:{x}"), "--", "sh", "-c", "echo ran > y.txt"]);
    let z = c.qsub(&["-W", &format!("depend=afterok:{x}"), "--", "sh", "-c", "echo ran > z.txt"]);
    let yj = c.wait_finished(&y, LONG);
    assert_eq!(yj["Exit_status"], 0);
    let zj = c.wait_finished(&z, LONG);
    assert!(zj["comment"].as_str().unwrap().contains("can never be satisfied"), "{zj}");
    assert_ne!(zj["Exit_status"], 0);
    assert!(c.work.join("y.txt").exists());
    assert!(!c.work.join("z.txt").exists(), "the afterok job must never run");
    assert_eq!(c.job_json(&x)["Exit_status"], 1);
}

#[test]
fn cancel_a_queued_and_a_running_job() {
    let c = Cluster::start();
    let n = cores(&c).to_string();
    let running = c.qsub(&["-l", &format!("ncpus={n}"), "--", "sleep", "60"]);
    wait_until("the first job to run", LONG, || c.job_json(&running)["job_state"] == "R");
    let queued = c.qsub(&["--", "sh", "-c", "echo should-not-run > q.txt"]);
    assert_eq!(c.job_json(&queued)["job_state"], "Q");

    let out = c.run("qdel", &[seq_of(&queued)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let q = c.wait_finished(&queued, LONG);
    assert_eq!(q["Exit_status"], 265);

    let out = c.run("qdel", &[&running]);
    assert!(out.status.success());
    let r = c.wait_finished(&running, Duration::from_secs(20));
    assert_eq!(r["Exit_status"], 265, "{r}");
    assert!(!c.work.join("q.txt").exists());

    // Deleting a finished job is a quiet success; an unknown one is an error.
    let again = c.run("qdel", &[&running]);
    assert!(again.status.success());
    let unknown = c.run("qdel", &["99999.testsrv"]);
    assert!(!unknown.status.success());
    assert_eq!(String::from_utf8_lossy(&unknown.stderr).trim(), "qdel: Unknown Job Id 99999.testsrv");
}

#[test]
fn walltime_kills_the_job_and_says_so() {
    let c = Cluster::start();
    let id = c.qsub(&["-l", "walltime=00:00:01", "--", "sh", "-c", "sleep 60; echo survived"]);
    let job = c.wait_finished(&id, Duration::from_secs(20));
    let status = job["Exit_status"].as_i64().unwrap();
    assert!(status > 256, "killed by a signal: {job}");
    assert!(job["comment"].as_str().unwrap().contains("walltime"), "{job}");
    let out = std::fs::read_to_string(c.work.join(format!("sh.o{}", seq_of(&id)))).unwrap();
    assert!(!out.contains("survived"));
}

#[test]
fn output_files_follow_pbs_names_and_join() {
    let c = Cluster::start();
    let script = c.script("hello.sh", "#!/bin/sh\necho to-out\necho to-err >&2\n");
    let plain = c.qsub(&[script.to_str().unwrap()]);
    let named = c.qsub(&["-N", "named", "-j", "oe", "hello.sh"]);
    std::fs::create_dir(c.work.join("logs")).unwrap();
    let into_dir = c.qsub(&["-o", "logs/", "-e", "custom.err", "hello.sh"]);
    for id in [&plain, &named, &into_dir] {
        c.wait_finished(id, LONG);
    }
    let read =
        |name: String| std::fs::read_to_string(c.work.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let s = seq_of(&plain);
    assert_eq!(read(format!("hello.sh.o{s}")), "to-out\n");
    assert_eq!(read(format!("hello.sh.e{s}")), "to-err\n");
    let s = seq_of(&named);
    let joined = read(format!("named.o{s}"));
    assert!(joined.contains("to-out") && joined.contains("to-err"), "{joined}");
    assert!(!c.work.join(format!("named.e{s}")).exists(), "-j oe writes no error file");
    let s = seq_of(&into_dir);
    assert_eq!(read(format!("logs/hello.sh.o{s}")), "to-out\n");
    assert_eq!(read("custom.err".to_string()), "to-err\n");
}

#[test]
fn exit_statuses_follow_pbs() {
    let c = Cluster::start();
    let ok = c.qsub(&["--", "true"]);
    let three = c.qsub(&["--", "sh", "-c", "exit 3"]);
    let killed = c.qsub(&["--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(c.wait_finished(&ok, LONG)["Exit_status"], 0);
    assert_eq!(c.wait_finished(&three, LONG)["Exit_status"], 3);
    assert_eq!(c.wait_finished(&killed, LONG)["Exit_status"], 256 + 9);
}

#[test]
fn missing_executable_fails_with_127_and_a_reason() {
    let c = Cluster::start();
    let id = c.qsub(&["--", "/nonexistent/program", "arg"]);
    let job = c.wait_finished(&id, LONG);
    assert_eq!(job["Exit_status"], 127);
    let comment = job["comment"].as_str().unwrap();
    assert!(comment.contains("/nonexistent/program"), "{comment}");
    let script = c.script("badshebang.sh", "#!/nonexistent/interpreter\necho hi\n");
    let id = c.qsub(&[script.to_str().unwrap()]);
    assert_eq!(c.wait_finished(&id, LONG)["Exit_status"], 127);
}

#[test]
fn job_environment() {
    let c = Cluster::start();
    let script = c.script(
        "env.sh",
        "#!/bin/sh\n#PBS -N envjob\n#PBS -l ncpus=1\n\
         echo JOBID=$PBS_JOBID\necho NAME=$PBS_JOBNAME\necho WORKDIR=$PBS_O_WORKDIR\necho PWD=$(pwd)\n\
         echo NCPUS=$NCPUS\necho NODES=$(wc -l < $PBS_NODEFILE)\necho PICLOUD=$PICLOUD_JOB_ID\n\
         echo FOO=$FOO\necho MARKER=${PICLOUD_TEST_MARKER:-unset}\necho INDEX=${PBS_ARRAY_INDEX:-none}\n\
         grep Cpus_allowed_list /proc/self/status\n",
    );
    let id = c
        .cmd("qsub")
        .args(["-v", "FOO=bar", script.to_str().unwrap()])
        .env("PICLOUD_TEST_MARKER", "present")
        .output()
        .unwrap();
    assert!(id.status.success(), "{}", String::from_utf8_lossy(&id.stderr));
    let id = String::from_utf8(id.stdout).unwrap().trim().to_string();
    c.wait_finished(&id, LONG);
    let out = std::fs::read_to_string(c.work.join(format!("envjob.o{}", seq_of(&id)))).unwrap();
    let work = c.work.canonicalize().unwrap();
    for expected in [
        format!("JOBID={id}"),
        "NAME=envjob".to_string(),
        format!("WORKDIR={}", work.display()),
        format!("PWD={}", work.display()),
        "NCPUS=1".to_string(),
        "NODES=1".to_string(),
        format!("PICLOUD={id}"),
        "FOO=bar".to_string(),
        "MARKER=unset".to_string(),
        "INDEX=none".to_string(),
    ] {
        assert!(out.lines().any(|l| l == expected), "missing {expected:?} in:\n{out}");
    }
    // Pinned to exactly one CPU.
    let allowed = out.lines().find(|l| l.starts_with("Cpus_allowed_list")).unwrap();
    let list = allowed.split_whitespace().last().unwrap();
    assert!(!list.contains(',') && !list.contains('-'), "pinned to one CPU: {allowed}");

    // -V exports the submitter's environment; array tasks get their index.
    let out = c
        .cmd("qsub")
        .args([
            "-V",
            "-J",
            "3-4",
            "-N",
            "withv",
            "--",
            "sh",
            "-c",
            "echo $PICLOUD_TEST_MARKER $PBS_ARRAY_INDEX $PBS_ARRAYID",
        ])
        .env("PICLOUD_TEST_MARKER", "present")
        .output()
        .unwrap();
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    c.wait_finished(&id, LONG);
    let s = seq_of(&id);
    assert_eq!(std::fs::read_to_string(c.work.join(format!("withv.o{s}.3"))).unwrap(), "present 3 3\n");
    assert_eq!(std::fs::read_to_string(c.work.join(format!("withv.o{s}.4"))).unwrap(), "present 4 4\n");
}

#[test]
fn a_job_over_its_memory_limit_is_killed_with_a_clear_reason() {
    let c = Cluster::start();
    let limits = match c.client().request(&ClientRequest::Nodes).unwrap() {
        ServerReply::Nodes(n) => n[0].info.limits.clone(),
        other => panic!("{other:?}"),
    };
    if limits.starts_with("none") {
        eprintln!("skipped: this node enforces no limits ({limits})");
        return;
    }
    let hog =
        c.qsub(&["-l", "mem=32mb", "--", "python3", "-c", "b = bytearray(256 << 20); print('survived')"]);
    let fine = c.qsub(&["-l", "mem=256mb", "--", "python3", "-c", "b = bytearray(64 << 20); print(len(b))"]);
    let job = c.wait_finished(&hog, LONG);
    assert_eq!(job["Exit_status"], 256 + 9, "{job}");
    let comment = job["comment"].as_str().unwrap();
    assert!(comment.contains("exceeded its memory limit of 32.0 MiB"), "{comment}");
    let out = std::fs::read_to_string(c.work.join(format!("python3.o{}", seq_of(&hog)))).unwrap();
    assert!(!out.contains("survived"));
    // A job within its limit runs normally, and its peak memory is measured by its cgroup.
    let job = c.wait_finished(&fine, LONG);
    assert_eq!(job["Exit_status"], 0, "{job}");
    let mem = job["resources_used"]["mem"].as_str().unwrap();
    let kb: u64 = mem.trim_end_matches("kb").parse().unwrap();
    assert!((64 * 1024..256 * 1024).contains(&kb), "peak {mem}");
}
