//! Several Unix users on one cluster (run as root; skipped otherwise): the
//! server knows each client from the kernel, users control only their own
//! jobs, and a root agent runs each job as its owner: with the owner's uid and
//! groups, output files created by the owner, and no more rights than the
//! owner has.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use picloud_tests::{Cluster, wait_until};

const USER: &str = "picloud-test-user";

/// A supplementary group of [`USER`], so that its groups are more than its primary one.
const GROUP: &str = "picloud-test-group";

const LONG: Duration = Duration::from_secs(60);

/// The test user: uid, primary gid, and every group it has (from
/// `getgrouplist`), created if missing with a supplementary group; `None`
/// (the test is skipped, and says so) when not root or when it cannot be made.
fn other_user() -> Option<(u32, u32, Vec<u32>)> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: creating a second user needs root");
        return None;
    }
    let ran =
        |program: &str, args: &[&str]| Command::new(program).args(args).status().is_ok_and(|s| s.success());
    let group = || nix::unistd::Group::from_name(GROUP).ok().flatten();
    // Another test may create them meanwhile: look again before giving up.
    if group().is_none() && !ran("groupadd", &["--system", GROUP]) && group().is_none() {
        eprintln!("skipped: cannot create the group {GROUP}");
        return None;
    }
    let lookup = || nix::unistd::User::from_name(USER).ok().flatten();
    if lookup().is_none()
        && !ran("useradd", &["--system", "--no-create-home", "--shell", "/bin/sh", "--groups", GROUP, USER])
        && lookup().is_none()
    {
        eprintln!("skipped: cannot create the user {USER}");
        return None;
    }
    // A user made by an older version of this test lacks the group.
    if !ran("usermod", &["--append", "--groups", GROUP, USER]) {
        eprintln!("skipped: cannot add {USER} to {GROUP}");
        return None;
    }
    let user = lookup()?;
    let name = CString::new(USER).unwrap();
    let mut groups: Vec<u32> =
        nix::unistd::getgrouplist(&name, user.gid).ok()?.into_iter().map(|g| g.as_raw()).collect();
    groups.sort_unstable();
    groups.dedup();
    Some((user.uid.as_raw(), user.gid.as_raw(), groups))
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The sequence number of a job id (`12.srv` is 12).
fn seq_of(id: &str) -> &str {
    id.split(['.', '[']).next().unwrap()
}

/// A cluster that the other user can use: the state directory can be
/// entered, the binary and its PBS links are copied where the user can run
/// them, and the user has a work directory of its own.
struct Shared {
    c: Cluster,
    bin: PathBuf,
    /// The other user's work directory (theirs, 0755).
    work: PathBuf,
    uid: u32,
    gid: u32,
}

impl Shared {
    fn start(uid: u32, gid: u32) -> Self {
        let c = Cluster::start();
        for dir in [c.dir.path(), c.work.as_path()] {
            chmod(dir, 0o755);
        }
        // The build directory may be closed to other users (a checkout in a
        // mode-0700 directory): give them a copy of the binary and its PBS links.
        let bin = c.dir.path().join("shared-bin");
        std::fs::create_dir(&bin).unwrap();
        chmod(&bin, 0o755);
        std::fs::copy(picloud_tests::picloud_bin(), bin.join("picloud")).unwrap();
        let status =
            Command::new(bin.join("picloud")).arg("install-pbs-commands").arg(&bin).output().unwrap().status;
        assert!(status.success());
        let work = c.dir.path().join("work-other");
        std::fs::create_dir(&work).unwrap();
        std::os::unix::fs::chown(&work, Some(uid), Some(gid)).unwrap();
        chmod(&work, 0o755);
        Self { c, bin, work, uid, gid }
    }

    /// Runs a PBS command as the other user, in their work directory.
    fn as_other(&self, name: &str, args: &[&str]) -> Output {
        Command::new(self.bin.join(name))
            .args(args)
            .current_dir(&self.work)
            .env("PICLOUD_DIR", self.c.dir.path())
            .env("HOME", "/tmp")
            .uid(self.uid)
            .gid(self.gid)
            .output()
            .unwrap()
    }

    /// `qsub ARGS` as the other user; returns the job id.
    fn qsub_as_other(&self, args: &[&str]) -> String {
        let out = self.as_other("qsub", args);
        assert!(out.status.success(), "qsub {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Waits for a job of the other user to end with status 0; returns its stdout.
    fn output_of(&self, id: &str, name: &str) -> String {
        let job = self.c.wait_finished(id, LONG);
        assert_eq!(job["Exit_status"], 0, "{job}");
        assert_eq!(job["Job_Owner"].as_str().unwrap().split('@').next(), Some(USER), "{job}");
        std::fs::read_to_string(self.work.join(format!("{name}.o{}", seq_of(id)))).unwrap()
    }
}

#[test]
fn users_are_kept_apart() {
    let Some((uid, gid, groups)) = other_user() else { return };
    let s = Shared::start(uid, gid);
    let c = &s.c;

    // root's job, which says its pid: the other user sees it but may not delete it.
    let pid_file = c.work.join("root-sleep.pid");
    let mine = c.qsub(&["--", "sh", "-c", &format!("echo $$ > {}; exec sleep 30", pid_file.display())]);
    let out = s.as_other("qdel", &[&mine]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthorized"), "{out:?}");
    let out = s.as_other("qstat", &[&mine]);
    assert!(out.status.success(), "{out:?}");

    // The other user's job runs as them: their uid and groups (none of root's).
    let theirs = s.qsub_as_other(&["-N", "who", "--", "sh", "-c", "id -u; id -G"]);
    let out = s.output_of(&theirs, "who");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some(uid.to_string().as_str()), "{out}");
    let mut got: Vec<u32> = lines.next().unwrap().split_whitespace().map(|g| g.parse().unwrap()).collect();
    got.sort_unstable();
    got.dedup();
    assert_eq!(got, groups, "{out}");
    assert!(groups.len() >= 2, "the test user has a supplementary group: {groups:?}");
    // Its output files were created by the user.
    for stream in ["o", "e"] {
        let file = s.work.join(format!("who.{stream}{}", seq_of(&theirs)));
        assert_eq!(std::fs::metadata(&file).unwrap().uid(), uid, "{}", file.display());
    }

    // It cannot write into a directory only root may write: the job fails
    // before running, saying why, and nothing is created.
    let closed = c.dir.path().join("root-only");
    std::fs::create_dir(&closed).unwrap();
    chmod(&closed, 0o700);
    let target = closed.join("out.txt");
    let target_arg = target.display().to_string();
    let denied = s.qsub_as_other(&["-o", &target_arg, "--", "sh", "-c", "echo written"]);
    let job = c.wait_finished(&denied, LONG);
    assert!(job["Exit_status"].as_i64().unwrap() < 0, "{job}");
    let want = format!("cannot open the stdout file {target_arg} as user {USER}: Permission denied");
    assert_eq!(job["comment"].as_str(), Some(want.as_str()), "{job}");
    assert!(!target.exists(), "the output file was created");

    // It cannot signal a process of another user: root's job.
    wait_until("root's job to write its pid", LONG, || {
        std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n'))
    });
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_string();
    let script = format!("kill -0 {pid} 2>&1; echo \"rc=$?\"");
    let signal = s.qsub_as_other(&["-N", "signal", "--", "sh", "-c", &script]);
    let out = s.output_of(&signal, "signal");
    assert!(out.contains("Operation not permitted") && out.ends_with("rc=1\n"), "{out}");
    // The process was there to be signalled: root may.
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid.parse().unwrap()), None);
    assert_eq!(alive, Ok(()), "root's job ended too early for the check to mean anything");

    assert!(c.run("qdel", &[&mine]).status.success(), "root may delete its own job");
}
