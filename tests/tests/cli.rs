//! The PBS-compatible commands against a real server: `qstat` formats, holds,
//! `picloud wait`/`nodes`, and every bad input a shell user can give.

use std::process::Stdio;
use std::time::Duration;

use picloud_proto::{ClientRequest, ServerReply, StatRequest};
use picloud_tests::Cluster;

const LONG: Duration = Duration::from_secs(60);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every job the server knows, finished ones included.
fn job_count(c: &Cluster) -> usize {
    let req = StatRequest { include_finished: true, ..Default::default() };
    match c.client().request(&ClientRequest::Stat(req)).unwrap() {
        ServerReply::Jobs { jobs, .. } => jobs.len(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn qstat_full_formats() {
    let c = Cluster::start();
    let long = "x".repeat(150);
    let id = c.qsub(&[
        "-N",
        "fmt",
        "-l",
        "walltime=1:00:00,mem=64mb,foo=bar",
        "-v",
        &format!("LONGVAR={long}"),
        "--",
        "true",
    ]);
    c.wait_finished(&id, LONG);

    // -f -1: `Job Id:` then indented `key = value` lines, never wrapped.
    let out = stdout(&c.run("qstat", &["-f", "-1", "-x", &id]));
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(format!("Job Id: {id}").as_str()));
    let attrs: Vec<&str> = out.lines().skip(1).take_while(|l| !l.is_empty()).collect();
    assert!(attrs.iter().all(|l| l.starts_with("    ") && l.contains(" = ")), "{out}");
    for expected in [
        "    Job_Name = fmt",
        "    job_state = F",
        "    Exit_status = 0",
        "    queue = workq",
        "    Resource_List.walltime = 01:00:00",
        "    Resource_List.mem = 64mb",
        "    Resource_List.foo = bar",
    ] {
        assert!(attrs.contains(&expected), "missing {expected:?} in:\n{out}");
    }
    assert!(attrs.iter().any(|l| l.starts_with("    Submit_arguments = ") && l.contains(&long)), "{out}");

    // Without -1, lines longer than 79 columns continue on tab-indented lines.
    let wrapped = stdout(&c.run("qstat", &["-f", "-x", &id]));
    assert!(wrapped.lines().all(|l| l.len() <= 80), "{wrapped}");
    assert!(wrapped.lines().any(|l| l.starts_with('\t')), "{wrapped}");
    let rejoined = wrapped.replace("\n\t", "");
    assert!(rejoined.contains(&long), "wrapping loses nothing");

    // -f -F json -x: the document PBS tools parse.
    let json: serde_json::Value =
        serde_json::from_slice(&c.run("qstat", &["-f", "-F", "json", "-x", &id]).stdout).unwrap();
    assert_eq!(json["pbs_server"], "testsrv");
    let job = &json["Jobs"][&id];
    assert_eq!(job["Job_Name"], "fmt");
    assert_eq!(job["job_state"], "F");
    assert_eq!(job["Exit_status"], 0);
    assert_eq!(job["queue"], "workq");
    assert_eq!(job["Resource_List"]["walltime"], "01:00:00");
    assert_eq!(job["Resource_List"]["ncpus"], 1);

    // Finished jobs are hidden without -x (unless named), and shown with it.
    let table = stdout(&c.run("qstat", &[]));
    assert!(!table.contains(&id), "{table}");
    let table = stdout(&c.run("qstat", &["-x"]));
    let mut rows = table.lines();
    assert!(rows.next().unwrap().starts_with("Job id            Name             User"));
    assert!(rows.next().unwrap().starts_with("----------------  ----------------"));
    let row = rows.find(|l| l.starts_with(&id)).unwrap();
    assert_eq!(row.split_whitespace().nth(4), Some("F"), "{row}");

    // -B -f names the server.
    let server = stdout(&c.run("qstat", &["-B", "-f"]));
    assert!(server.starts_with("Server: testsrv\n"), "{server}");

    // Unknown ids: an error naming the id, non-zero exit.
    let out = c.run("qstat", &["424242"]);
    assert!(!out.status.success());
    assert_eq!(stderr(&out).trim(), "qstat: Unknown Job Id 424242");
}

#[test]
fn qstat_user_filter_and_array_tasks() {
    let c = Cluster::start();
    let n = match c.client().request(&ClientRequest::Nodes).unwrap() {
        ServerReply::Nodes(n) => n[0].info.cores.len(),
        other => panic!("{other:?}"),
    };
    let blocker = c.qsub(&["-l", &format!("ncpus={n}"), "--", "sleep", "30"]);
    let array = c.qsub(&["-J", "1-3", "--", "true"]);
    let me = String::from_utf8(std::process::Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    let mine = stdout(&c.run("qstat", &["-u", me.trim()]));
    assert!(mine.contains(&blocker) && mine.contains(&array), "{mine}");
    let nobody = stdout(&c.run("qstat", &["-u", "no-such-user-here"]));
    assert!(!nobody.contains(&blocker), "{nobody}");
    // -t lists each task of the array.
    let seq = array.split('[').next().unwrap();
    let tasks = stdout(&c.run("qstat", &["-t"]));
    for i in 1..=3 {
        assert!(tasks.contains(&format!("{seq}[{i}].testsrv")), "{tasks}");
    }
    assert!(c.run("qdel", &[&blocker]).status.success());
    let job = c.wait_finished(&array, LONG);
    assert_eq!(job["Exit_status"], 0);
}

#[test]
fn exclusive_placement_gets_the_whole_node() {
    let c = Cluster::start();
    let n = match c.client().request(&ClientRequest::Nodes).unwrap() {
        ServerReply::Nodes(n) => n[0].info.pus().count(),
        other => panic!("{other:?}"),
    };
    let id = c.qsub(&["-l", "place=excl", "--", "grep", "Cpus_allowed_list", "/proc/self/status"]);
    let job = c.wait_finished(&id, LONG);
    assert_eq!(job["Exit_status"], 0);
    let out =
        std::fs::read_to_string(c.work.join(format!("grep.o{}", id.split('.').next().unwrap()))).unwrap();
    let list = out.split_whitespace().last().unwrap();
    let count: usize = list
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum();
    assert_eq!(count, n, "an exclusive job is pinned to every PU of the node: {out}");
}

#[test]
fn hold_and_release() {
    let c = Cluster::start();
    let id = c.qsub(&["-h", "--", "sh", "-c", "echo released > held.txt"]);
    assert_eq!(c.job_json(&id)["job_state"], "H");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!c.work.join("held.txt").exists(), "a held job does not run");
    let out = c.run("qrls", &[&id]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.wait_finished(&id, LONG);
    assert_eq!(std::fs::read_to_string(c.work.join("held.txt")).unwrap(), "released\n");
}

#[test]
fn picloud_commands() {
    let c = Cluster::start();
    let ok = stdout(&c.run("picloud", &["submit", "--", "true"])).trim().to_string();
    let bad = stdout(&c.run("picloud", &["submit", "--", "sh", "-c", "exit 4"])).trim().to_string();
    let waited = c.run("picloud", &["wait", &ok]);
    assert!(waited.status.success(), "{}", stderr(&waited));
    let waited = c.run("picloud", &["wait", &ok, &bad]);
    assert_eq!(waited.status.code(), Some(1), "a failed job makes wait fail");
    assert!(stdout(&waited).contains("exit=4"), "{}", stdout(&waited));
    let timeout = c.run(
        "picloud",
        &["wait", "--timeout", "0.2", stdout(&c.run("picloud", &["submit", "--", "sleep", "30"])).trim()],
    );
    assert_eq!(timeout.status.code(), Some(2));

    let nodes: serde_json::Value =
        serde_json::from_slice(&c.run("picloud", &["nodes", "--json"]).stdout).unwrap();
    assert_eq!(nodes[0]["state"], "up");
    assert!(!nodes[0]["info"]["cores"].as_array().unwrap().is_empty());
    let stat: serde_json::Value =
        serde_json::from_slice(&c.run("picloud", &["stat", "--all", "--json"]).stdout).unwrap();
    assert!(stat.as_array().unwrap().iter().any(|j| j["id"] == ok));
}

#[test]
fn qsub_reads_a_script_from_stdin() {
    let c = Cluster::start();
    let mut child = c.cmd("qsub").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"#PBS -N fromstdin\necho via-stdin\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let id = stdout(&out).trim().to_string();
    c.wait_finished(&id, LONG);
    let seq = id.split('.').next().unwrap();
    assert_eq!(std::fs::read_to_string(c.work.join(format!("fromstdin.o{seq}"))).unwrap(), "via-stdin\n");
}

#[test]
fn bad_submissions_are_refused_and_queue_nothing() {
    let c = Cluster::start();
    c.script("bad.sh", "#!/bin/sh\n#PBS -N fine\n#PBS -l walltime=abc\necho never\n");
    c.script("empty.sh", "  \n\n");
    std::fs::create_dir(c.work.join("adir")).unwrap();
    let cases: [(&[&str], &str); 7] = [
        (&["bad.sh"], "bad.sh:3: -l walltime=abc"),
        (&["missing.sh"], "missing.sh"),
        (&["adir"], "adir"),
        (&["empty.sh"], "empty"),
        (&["-l", "select=2:ncpus=1", "--", "true"], "select"),
        (&["-J", "5-1", "--", "true"], "5-1"),
        (&["-W", "depend=afterok:777", "--", "true"], "777"),
    ];
    for (args, needle) in cases {
        let out = c.run("qsub", args);
        let err = stderr(&out);
        assert!(!out.status.success(), "qsub {args:?} must fail");
        assert!(stdout(&out).is_empty(), "qsub {args:?} printed an id");
        assert!(err.starts_with("qsub: ") && err.contains(needle), "qsub {args:?}: {err}");
    }
    for never in [&["-l", "ncpus=100000", "--", "true"][..], &["-l", "ngpus=1", "--", "true"][..]] {
        let out = c.run("qsub", never);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("largest node"), "{never:?}: {}", stderr(&out));
    }
    let out = c.run("qsub", &["-l", "place=sideways", "--", "true"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("sideways"), "{}", stderr(&out));
    assert_eq!(job_count(&c), 0, "nothing was queued");
    let out = c.run("qdel", &["not-an-id"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not-an-id"));
}

#[test]
fn every_command_says_when_no_server_runs() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let status = std::process::Command::new(picloud_tests::picloud_bin())
        .arg("install-pbs-commands")
        .arg(&bin)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let socket = dir.path().join("server.sock");
    let runs: [(&str, &[&str]); 6] = [
        ("qsub", &["--", "true"]),
        ("qstat", &[]),
        ("qdel", &["1"]),
        ("picloud", &["stat"]),
        ("picloud", &["nodes"]),
        ("picloud", &["wait", "1"]),
    ];
    for (name, args) in runs {
        let path = if name == "picloud" { picloud_tests::picloud_bin() } else { bin.join(name) };
        let out = std::process::Command::new(path)
            .args(args)
            .env("PICLOUD_DIR", dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!out.status.success(), "{name} {args:?}");
        assert!(err.contains(&socket.display().to_string()) && err.contains("picloud up"), "{name}: {err}");
    }
}
