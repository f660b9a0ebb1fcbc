//! The PBS-compatible commands `qsub`, `qstat`, `qdel` and `qrls`, and what the
//! `picloud` subcommands share with them: the server connection, output that
//! survives a closed pipe, and PBS exit codes.
//!
//! Each command parses its arguments with pure functions (tested without a
//! server), sends one request, and formats the reply with pure functions.
//! Messages go to stderr prefixed with the command's name (`qsub: ...`).
//!
//! Exit codes follow PBS Pro, whose commands exit with the batch error number
//! modulo 256: see the `EXIT_*` constants.

mod directives;
mod getopt;
pub(crate) mod qstat;
pub(crate) mod qsub;
pub(crate) mod refs;
pub(crate) mod resources;
pub(crate) mod timefmt;

use std::ffi::OsString;
use std::fmt::Display;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use picloud_proto::{Client, ClientError, ServerAddr, ServerReply};

/// A failure that has no more specific code (PBS commands use 1 too).
pub(crate) const EXIT_FAILURE: u8 = 1;
/// A usage error (unknown option, missing operand), as getopt-based PBS commands.
pub(crate) const EXIT_USAGE: u8 = 2;
/// An unknown job id: PBSE_UNKJOBID (15001) modulo 256, as PBS Pro.
pub(crate) const EXIT_UNKNOWN_JOB: u8 = 153;
/// Not the caller's job: PBSE_PERM (15007) modulo 256.
pub(crate) const EXIT_PERMISSION: u8 = 159;
/// A request invalid for the job's state: PBSE_BADSTATE (15016) modulo 256.
pub(crate) const EXIT_BAD_STATE: u8 = 168;
/// An unknown queue: PBSE_UNKQUE (15018) modulo 256.
pub(crate) const EXIT_UNKNOWN_QUEUE: u8 = 170;

/// This build's version, shown as `pbs_version`.
pub(crate) const PICLOUD_VERSION: &str = env!("CARGO_PKG_VERSION");

/// `qsub`.
pub(crate) fn qsub_main(args: Vec<OsString>) -> ExitCode {
    qsub::run("qsub", args)
}

/// `qstat`.
pub(crate) fn qstat_main(args: Vec<OsString>) -> ExitCode {
    qstat::run(args)
}

/// `qdel`.
pub(crate) fn qdel_main(args: Vec<OsString>) -> ExitCode {
    refs::pbs_main(refs::RefAction::Cancel, args)
}

/// `qrls`.
pub(crate) fn qrls_main(args: Vec<OsString>) -> ExitCode {
    refs::pbs_main(refs::RefAction::Release, args)
}

/// The server to talk to: `$PICLOUD_SERVER` (any form [`ServerAddr::parse`]
/// accepts) when set, else the socket of the state directory (`$PICLOUD_DIR`,
/// else `~/.picloud`).
pub(crate) fn server_addr(picloud_server: Option<&str>, state_dir: &Path) -> ServerAddr {
    match picloud_server.map(str::trim).filter(|s| !s.is_empty()) {
        Some(addr) => ServerAddr::parse(addr),
        None => ServerAddr::of_state_dir(state_dir),
    }
}

/// Connects to the server this process should use (see [`server_addr`]).
pub(crate) fn connect() -> Result<Client, ClientError> {
    let env_addr = std::env::var("PICLOUD_SERVER").ok();
    let addr = server_addr(env_addr.as_deref(), &picloud_proto::client::default_state_dir());
    Client::connect(&addr)
}

/// Prints `prog: err` on stderr and returns the generic failure code.
pub(crate) fn fail(prog: &str, err: &dyn Display) -> ExitCode {
    eprintln!("{prog}: {err}");
    ExitCode::from(EXIT_FAILURE)
}

/// The error for a reply that does not answer the request.
pub(crate) fn unexpected(reply: &ServerReply) -> ClientError {
    ClientError::Unexpected(format!("{reply:?}"))
}

/// Writes `text` to stdout. A closed pipe (`qstat | head`) is not an error
/// worth a panic: the reader has seen what it wanted.
pub(crate) fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Converts arguments to strings, naming the first that is not UTF-8.
pub(crate) fn utf8_args(args: Vec<OsString>) -> Result<Vec<String>, String> {
    args.into_iter()
        .map(|a| {
            a.into_string().map_err(|a| format!("argument '{}' is not valid UTF-8", a.to_string_lossy()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn server_address_choice() {
        let dir = Path::new("/var/lib/picloud");
        assert_eq!(server_addr(None, dir), ServerAddr::Unix(PathBuf::from("/var/lib/picloud/server.sock")));
        assert_eq!(
            server_addr(Some(""), dir),
            ServerAddr::Unix(PathBuf::from("/var/lib/picloud/server.sock"))
        );
        assert_eq!(server_addr(Some("head:7070"), dir), ServerAddr::Tcp("head:7070".into()));
        assert_eq!(server_addr(Some("/run/p.sock"), dir), ServerAddr::Unix(PathBuf::from("/run/p.sock")));
    }

    #[test]
    fn exit_codes_are_pbs_errors_mod_256() {
        assert_eq!(u32::from(EXIT_UNKNOWN_JOB), 15001 % 256);
        assert_eq!(u32::from(EXIT_PERMISSION), 15007 % 256);
        assert_eq!(u32::from(EXIT_BAD_STATE), 15016 % 256);
        assert_eq!(u32::from(EXIT_UNKNOWN_QUEUE), 15018 % 256);
    }
}
