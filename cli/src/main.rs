//! The `picloud` command. Called as `qsub`, `qstat`, `qdel` or `qrls` (through
//! a link, see `picloud install-pbs-commands`) it behaves as the PBS command of
//! that name; otherwise it dispatches on its subcommand.

mod commands;
mod daemons;
mod pbs;
mod python_cmds;
mod simulate;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// picloud: a batch system for the cluster you have.
#[derive(Debug, Parser)]
#[command(
    name = "picloud",
    version,
    about = "picloud: a batch system for the cluster you have",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the scheduler server (one per cluster).
    Server(daemons::ServerArgs),
    /// Run a node agent (one per compute node).
    Agent(daemons::AgentArgs),
    /// Run a server and one agent on this machine, in the foreground.
    Up(daemons::UpArgs),
    /// Submit a job script or a command (takes qsub's options).
    #[command(disable_help_flag = true)]
    Submit {
        /// qsub options, then SCRIPT or `-- CMD ARGS...`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Show jobs.
    Stat(commands::StatArgs),
    /// Cancel jobs.
    Cancel(commands::CancelArgs),
    /// Wait until jobs have ended.
    Wait(commands::WaitArgs),
    /// Show the nodes and their use.
    Nodes(commands::NodesArgs),
    /// Release held jobs.
    Release(commands::CancelArgs),
    /// Replay a workload trace (SWF) through the scheduler in virtual time.
    Simulate(simulate::SimulateArgs),
    /// Submit pickled Python calls and read their outcomes (the door the
    /// Python library uses, for tests and debugging).
    #[command(subcommand)]
    Python(python_cmds::PythonCmd),
    /// Create qsub, qstat, qdel and qrls links to this binary in DIR.
    InstallPbsCommands {
        /// Directory for the links (e.g. ~/.local/bin).
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let called_as = args
        .first()
        .and_then(|a| PathBuf::from(a).file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    match called_as.as_str() {
        "qsub" => return pbs::qsub_main(args.split_off(1)),
        "qstat" => return pbs::qstat_main(args.split_off(1)),
        "qdel" => return pbs::qdel_main(args.split_off(1)),
        "qrls" => return pbs::qrls_main(args.split_off(1)),
        _ => {}
    }
    // `submit` takes qsub's options verbatim, `--` included, which clap would eat.
    if args.get(1).is_some_and(|a| a == "submit") {
        return commands::submit_main(args.split_off(2));
    }
    let cli = Cli::parse_from(args);
    let result = match cli.command {
        Command::Server(a) => daemons::server(a),
        Command::Agent(a) => daemons::agent(a),
        Command::Up(a) => daemons::up(a),
        Command::Submit { args } => return commands::submit_main(args),
        Command::Stat(a) => return commands::stat(a),
        Command::Cancel(a) => return commands::cancel(a),
        Command::Wait(a) => return commands::wait(a),
        Command::Nodes(a) => return commands::nodes(a),
        Command::Release(a) => return commands::release(a),
        Command::Simulate(a) => simulate::simulate(a),
        Command::Python(cmd) => return python_cmds::run(cmd),
        Command::InstallPbsCommands { dir } => daemons::install_pbs_commands(&dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("picloud: {e:#}");
            ExitCode::FAILURE
        }
    }
}
