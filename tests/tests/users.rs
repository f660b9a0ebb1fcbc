//! Several Unix users on one cluster (run as root; skipped otherwise): the
//! server knows each client from the kernel, users control only their own
//! jobs, and an agent does not run one user's job as another.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use picloud_tests::Cluster;

const USER: &str = "picloud-test-user";

/// The uid and gid of the test user, created if missing; `None` when not root.
fn other_user() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: creating a second user needs root");
        return None;
    }
    let lookup = || nix::unistd::User::from_name(USER).ok().flatten();
    if lookup().is_none() {
        let status = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/bin/sh", USER])
            .status();
        // Another test may have created it meanwhile.
        if !status.is_ok_and(|s| s.success()) && lookup().is_none() {
            eprintln!("skipped: cannot create the user {USER}");
            return None;
        }
    }
    let user = lookup()?;
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

#[test]
fn users_are_kept_apart() {
    let Some((uid, gid)) = other_user() else { return };
    let c = Cluster::start();
    for dir in [c.dir.path(), c.work.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The build directory may be closed to other users (a checkout in a
    // mode-0700 directory): give them a copy of the binary and its PBS links.
    let bin = c.dir.path().join("shared-bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::copy(picloud_tests::picloud_bin(), bin.join("picloud")).unwrap();
    let status =
        Command::new(bin.join("picloud")).arg("install-pbs-commands").arg(&bin).output().unwrap().status;
    assert!(status.success());
    let as_other = |name: &str, args: &[&str]| {
        Command::new(bin.join(name))
            .args(args)
            .current_dir(&c.work)
            .env("PICLOUD_DIR", c.dir.path())
            .env("HOME", "/tmp")
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap()
    };

    // root's job: the other user sees it but may not delete it.
    let mine = c.qsub(&["--", "sleep", "30"]);
    let out = as_other("qdel", &[&mine]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthorized"), "{out:?}");
    let out = as_other("qstat", &[&mine]);
    assert!(out.status.success(), "{out:?}");

    // The other user's job: owned by them, and not run as root by this root agent.
    let out = as_other("qsub", &["--", "sh", "-c", "id -u > ran-as.txt"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let job = c.wait_finished(&theirs, Duration::from_secs(60));
    assert_eq!(job["Job_Owner"].as_str().unwrap().split('@').next(), Some(USER), "{job}");
    assert!(job["comment"].as_str().is_some_and(|c| c.contains("does not run jobs of other users")), "{job}");
    assert!(job["Exit_status"].as_i64().unwrap() < 0, "{job}");
    assert!(!c.work.join("ran-as.txt").exists(), "the job ran");
    assert!(c.run("qdel", &[&mine]).status.success(), "root may delete its own job");
}
