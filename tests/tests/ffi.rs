//! The C ABI as C programs use it: `ffi/examples/submit_and_wait.c` and the
//! bad-input program `ffi/tests/c/bad_input.c` are compiled with the system C
//! compiler (`$CC`, else `cc`) against the libpicloud of this build and run
//! against a real `picloud up`.
//!
//! The bad-input program runs under valgrind when it is installed, else it is
//! built with AddressSanitizer; a memory error reported by either fails the
//! test even when every return code was right. `PICLOUD_REQUIRE_VALGRIND=1`
//! makes a missing valgrind an error instead (for CI, which installs it).
//!
//! libpicloud is (re)built first with `cargo build -p picloud-ffi --lib`, in
//! the profile of this test, so that the test never runs against a stale
//! library.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use picloud_tests::Cluster;

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace")
}

/// `target/<profile>`: where this test binary, `picloud` and libpicloud are.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

/// Builds libpicloud (once per test binary) and returns the directory holding
/// `libpicloud.so` and `libpicloud.a`.
fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = profile_dir();
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev".to_string(),
            Some(p) => p.to_string(),
            None => panic!("cannot tell the cargo profile from {}", dir.display()),
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "-p", "picloud-ffi", "--lib", "--profile", &profile])
            .current_dir(workspace())
            .output()
            .expect("run cargo build");
        assert!(
            out.status.success(),
            "building libpicloud failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for lib in ["libpicloud.so", "libpicloud.a"] {
            assert!(dir.join(lib).exists(), "{} was not built in {}", lib, dir.display());
        }
        dir
    })
}

fn c_compiler() -> String {
    std::env::var("CC").ok().filter(|c| !c.is_empty()).unwrap_or_else(|| "cc".into())
}

enum Link {
    Dynamic,
    Static,
}

/// Compiles `source` (a path in the workspace) to `out`; panics with the
/// compiler's messages if it fails.
fn compile(source: &str, out: &Path, link: Link, extra: &[&str]) {
    let lib = lib_dir();
    let mut cmd = Command::new(c_compiler());
    cmd.args(["-std=c11", "-g", "-Wall", "-Wextra", "-Werror"])
        .args(extra)
        .arg("-I")
        .arg(workspace().join("ffi/include"))
        .arg(workspace().join(source))
        .arg("-o")
        .arg(out);
    match link {
        Link::Dynamic => {
            cmd.arg("-L").arg(lib).arg("-lpicloud").arg(format!("-Wl,-rpath,{}", lib.display()));
        }
        Link::Static => {
            // The system libraries a Rust staticlib needs (`--print native-static-libs`).
            cmd.arg(lib.join("libpicloud.a")).args([
                "-lgcc_s",
                "-lutil",
                "-lrt",
                "-lpthread",
                "-lm",
                "-ldl",
                "-lc",
            ]);
        }
    }
    let result = cmd.output().unwrap_or_else(|e| panic!("cannot run the C compiler {}: {e}", c_compiler()));
    assert!(
        result.status.success(),
        "compiling {source} failed:\n{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
}

/// Runs a compiled program in the cluster's work directory, with the
/// cluster as this user's default (`PICLOUD_DIR`).
fn run(c: &Cluster, program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(&c.work)
        .env("PICLOUD_DIR", c.dir.path())
        .env_remove("PICLOUD_SERVER")
        .output()
        .expect("run the C program")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks one run of submit_and_wait and the job's output file.
fn check_example(c: &Cluster, out: &Output) {
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "submit_and_wait failed: {stdout}{}\n{}", text(&out.stderr), c.log());
    let seq: u64 = stdout
        .split("sequence number ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no sequence number in {stdout:?}"));
    assert!(stdout.contains(&format!("submitted {seq}.testsrv")), "{stdout}");
    assert!(stdout.contains(&format!("job {seq}.testsrv ended with exit status 0")), "{stdout}");
    let output =
        std::fs::read_to_string(c.work.join(format!("hello.o{seq}"))).expect("the job's stdout file");
    assert_eq!(output, "hi\n");
}

#[test]
fn the_c_example_submits_waits_and_prints_the_exit_status() {
    let c = Cluster::start();
    let bin = c.dir.path().join("submit_and_wait");
    compile("ffi/examples/submit_and_wait.c", &bin, Link::Dynamic, &["-pedantic"]);
    // The default server ($PICLOUD_DIR), then an explicit state directory.
    check_example(&c, &run(&c, &bin, &[]));
    check_example(&c, &run(&c, &bin, &[c.dir.path().to_str().unwrap()]));
    // No server at the address: an error naming it, exit 1.
    let out = run(&c, &bin, &["/nonexistent/picloud"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("PICLOUD_ERR_CONNECT") && stderr.contains("/nonexistent/picloud"), "{stderr}");
}

#[test]
fn the_c_example_links_statically_too() {
    let c = Cluster::start();
    let bin = c.dir.path().join("submit_and_wait_static");
    compile("ffi/examples/submit_and_wait.c", &bin, Link::Static, &[]);
    check_example(&c, &run(&c, &bin, &[]));
}

fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn bad_input_from_c_gets_error_codes_and_no_memory_errors() {
    let c = Cluster::start();
    let dir = c.dir.path().to_str().unwrap().to_string();
    let bin = c.dir.path().join("bad_input");
    let out = if have("valgrind") {
        compile("ffi/tests/c/bad_input.c", &bin, Link::Dynamic, &[]);
        Command::new("valgrind")
            .args(["-q", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite"])
            .arg(&bin)
            .arg(&dir)
            .current_dir(&c.work)
            .output()
            .expect("run valgrind")
    } else {
        assert!(
            std::env::var_os("PICLOUD_REQUIRE_VALGRIND").is_none(),
            "PICLOUD_REQUIRE_VALGRIND is set but valgrind is not installed"
        );
        eprintln!(
            "\n*** valgrind is not installed: checking bad_input.c with AddressSanitizer instead \
             (which sees the C side only) ***\n"
        );
        compile(
            "ffi/tests/c/bad_input.c",
            &bin,
            Link::Dynamic,
            &["-fsanitize=address", "-fno-omit-frame-pointer"],
        );
        run(&c, &bin, &[&dir])
    };
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "bad_input failed (exit {:?}; 99 is a valgrind error):\n{stdout}\n{stderr}\n{}",
        out.status.code(),
        c.log()
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    assert!(stderr.trim().is_empty(), "nothing on stderr (valgrind or ASan reports go there): {stderr}");
}
