//! The checked-in `include/picloud.h` is what cbindgen makes of the sources
//! now, and it compiles as C and as C++.
//!
//! The staleness check needs the cbindgen pinned in `cbindgen.toml`
//! (`cbindgen-version = ...`), found as `$CBINDGEN` or on `PATH`. Without it
//! (or with another version, whose output may differ) the check is skipped
//! with a loud message, unless `PICLOUD_REQUIRE_CBINDGEN=1`, which makes that
//! a failure (CI sets it after installing cbindgen). To update the header:
//!
//! ```sh
//! cd ffi && cbindgen --config cbindgen.toml --output include/picloud.h
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn header() -> PathBuf {
    crate_dir().join("include/picloud.h")
}

/// The version pinned in `cbindgen.toml`.
fn pinned_version() -> String {
    let config = std::fs::read_to_string(crate_dir().join("cbindgen.toml")).unwrap();
    config
        .split("cbindgen-version = ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(|v| v.trim_end_matches(|c: char| !c.is_ascii_digit()).to_string())
        .expect("cbindgen.toml names the pinned version as `cbindgen-version = X.Y.Z`")
}

/// Skips (or, when cbindgen is required, fails) with a message that cannot be missed.
fn skip(why: &str) {
    let message = format!("header staleness check NOT RUN: {why}");
    if std::env::var_os("PICLOUD_REQUIRE_CBINDGEN").is_some_and(|v| v != "0") {
        panic!("{message} (and PICLOUD_REQUIRE_CBINDGEN is set)");
    }
    eprintln!("\n{0}\n*** {message} ***\n{0}\n", "*".repeat(message.len() + 8));
}

#[test]
fn the_header_matches_the_sources() {
    let pinned = pinned_version();
    let cbindgen = std::env::var_os("CBINDGEN").unwrap_or_else(|| "cbindgen".into());
    let version = match Command::new(&cbindgen).arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        _ => {
            return skip(&format!(
                "cbindgen is not installed (cargo install cbindgen --version {pinned} --locked)"
            ));
        }
    };
    if version != format!("cbindgen {pinned}") {
        return skip(&format!(
            "found {version}, but the header is made with cbindgen {pinned} \
             (cargo install cbindgen --version {pinned} --locked)"
        ));
    }
    let fresh = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(&cbindgen)
        .args(["--config", "cbindgen.toml", "--quiet", "--output"])
        .arg(fresh.path())
        .current_dir(crate_dir())
        .output()
        .expect("run cbindgen");
    assert!(out.status.success(), "cbindgen failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let fresh = std::fs::read(fresh.path()).unwrap();
    let checked_in = std::fs::read(header()).unwrap();
    assert!(
        fresh == checked_in,
        "ffi/include/picloud.h is stale: regenerate it with\n    \
         cd ffi && cbindgen --config cbindgen.toml --output include/picloud.h\nand commit it"
    );
}

/// Compiles a file that includes the header with `compiler` and `flags`.
fn compiles(compiler: &str, flags: &[&str], source: &str, ext: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("use_header.{ext}"));
    std::fs::write(&file, source).unwrap();
    let out = Command::new(compiler)
        .args(flags)
        .arg("-fsyntax-only")
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(
        out.status.success(),
        "{compiler} {flags:?} rejects picloud.h:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Uses every type, so that a broken declaration cannot hide.
const USE_HEADER: &str = r#"
#include "picloud.h"
int use_everything(void) {
    picloud_job_options o = {0};
    picloud_python_call c = {0};
    picloud_task_status s = {0};
    picloud_task_result r = {0};
    picloud_bytes b = {0};
    picloud_client *client = 0;
    picloud_results *results = 0;
    picloud_agent *agent = 0;
    picloud_segment *segment = 0;
    picloud_state st = PICLOUD_STATE_FINISHED;
    picloud_outcome oc = PICLOUD_OUTCOME_RAISED;
    picloud_error_code e = PICLOUD_ERR_PANIC;
    (void)o; (void)c; (void)s; (void)r; (void)b; (void)client; (void)results;
    (void)agent; (void)segment; (void)st; (void)oc; (void)e;
    return picloud_version()[0] + PICLOUD_WAIT_ANY + PICLOUD_JOB_HOLD;
}
"#;

#[test]
fn the_header_compiles_as_c_and_cxx() {
    let cc = std::env::var("CC").ok().filter(|c| !c.is_empty()).unwrap_or_else(|| "cc".into());
    for std in ["-std=c99", "-std=c11"] {
        compiles(&cc, &[std, "-Wall", "-Wextra", "-pedantic", "-Werror"], USE_HEADER, "c");
    }
    let cxx = std::env::var("CXX").ok().filter(|c| !c.is_empty()).unwrap_or_else(|| "c++".into());
    if Command::new(&cxx).arg("--version").output().is_ok_and(|o| o.status.success()) {
        compiles(&cxx, &["-std=c++11", "-Wall", "-Werror"], USE_HEADER, "cpp");
    } else {
        eprintln!("*** no C++ compiler ({cxx}): picloud.h not checked as C++ ***");
    }
}
