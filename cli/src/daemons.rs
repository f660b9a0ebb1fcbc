//! The long-running commands: `picloud server`, `picloud agent`, `picloud up`
//! (a server and an agent on this machine in one command), and
//! `picloud install-pbs-commands`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;
use picloud_proto::client::default_state_dir;
use picloud_proto::{Client, ClientRequest, ServerAddr, ServerReply};
use picloud_scheduler::core::policy::{CoreConfig, Policy};
use picloud_scheduler::server::ServerThreads;

/// Arguments of `picloud server`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServerArgs {
    /// State directory [default: $PICLOUD_DIR, else ~/.picloud].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Server name, the suffix of job ids [default: the short host name].
    #[arg(long)]
    name: Option<String>,
    /// Also accept agents on this TCP address (e.g. 0.0.0.0:7878).
    #[arg(long, value_name = "ADDR")]
    listen_tcp: Option<std::net::SocketAddr>,
    /// How long finished jobs stay visible to `qstat -x` (e.g. 3600, 90s, 30m, 1h).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    keep_finished: Duration,
    /// Queue policy: fcfs, easy (FCFS with EASY backfill), sjf-easy, multifactor.
    #[arg(long, default_value = "multifactor")]
    policy: Policy,
    /// How long an agent may be silent (agents send a heartbeat every
    /// second) before its node counts as lost; also how long after a restart
    /// agents have to report the tasks they still run (e.g. 10, 2.5s, 1m).
    #[arg(long, default_value = "10", value_parser = parse_duration)]
    node_timeout: Duration,
    /// How many times a rerunnable task is queued again after its node was
    /// lost; the next loss fails it.
    #[arg(long, default_value = "3")]
    node_loss_retries: u32,
    /// Run the scheduling core on the I/O thread instead of a thread of its
    /// own: fewer thread switches per request, for a cluster of one machine
    /// with few cores (`picloud up` uses it). A long scheduling pass then
    /// delays the sockets.
    #[arg(long)]
    inline_core: bool,
    #[command(flatten)]
    journal: JournalArgs,
}

/// The journal's options, shared by `picloud server` and `picloud up`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct JournalArgs {
    /// Keep no journal: start with an empty queue and forget every job when
    /// the server stops (for benchmarks and throw-away clusters).
    #[arg(long)]
    no_journal: bool,
    /// When journal writes are synced to disk: `always` (before each reply)
    /// or `never` (a crash of the machine may lose the last acknowledged jobs).
    #[arg(long, default_value = "always", value_name = "WHEN")]
    fsync: picloud_scheduler::server::FsyncMode,
}

impl JournalArgs {
    fn config(&self) -> picloud_scheduler::server::JournalConfig {
        picloud_scheduler::server::JournalConfig {
            enabled: !self.no_journal,
            fsync: self.fsync,
            ..Default::default()
        }
    }

    /// The same options as arguments of `picloud server`.
    fn to_args(&self) -> Vec<String> {
        let mut args = vec!["--fsync".to_string(), self.fsync.to_string()];
        if self.no_journal {
            args.push("--no-journal".into());
        }
        args
    }
}

/// Arguments of `picloud agent`.
#[derive(Debug, clap::Args)]
pub(crate) struct AgentArgs {
    /// State directory, for the agent's spool [default: $PICLOUD_DIR, else ~/.picloud].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Server to join: a socket path, a state directory, or host:port
    /// [default: the server of the state directory].
    #[arg(long, value_name = "ADDR")]
    server: Option<String>,
    /// Seconds between SIGTERM and SIGKILL when a job is killed.
    #[arg(long, default_value = "5", value_parser = parse_duration)]
    kill_grace: Duration,
    /// Node name to report [default: the host name].
    #[arg(long)]
    hostname: Option<String>,
    /// Do not put jobs in cgroups (no memory limits, no cgroup accounting).
    #[arg(long)]
    no_cgroups: bool,
    /// Socket for clients on this node (shared-memory segments) [default: DIR/agent.sock].
    #[arg(long, value_name = "PATH")]
    local_socket: Option<PathBuf>,
    /// Directory put first on Python workers' import path, holding the
    /// `picloud` package [default: $PICLOUD_PYTHONPATH].
    #[arg(long, value_name = "DIR")]
    python_path: Option<String>,
    /// Directory of shared-memory segments.
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    shm_dir: PathBuf,
    /// No shared-memory store on this node.
    #[arg(long)]
    no_shm: bool,
}

/// Arguments of `picloud up`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// State directory [default: $PICLOUD_DIR, else ~/.picloud].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Server name, the suffix of job ids [default: the short host name].
    #[arg(long)]
    name: Option<String>,
    /// How long finished jobs stay visible to `qstat -x`.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    keep_finished: Duration,
    /// Queue policy: fcfs, easy (FCFS with EASY backfill), sjf-easy, multifactor.
    #[arg(long, default_value = "multifactor")]
    policy: Policy,
    /// Seconds between SIGTERM and SIGKILL when a job is killed.
    #[arg(long, default_value = "5", value_parser = parse_duration)]
    kill_grace: Duration,
    /// The agent's directory of shared-memory segments [default: /dev/shm].
    #[arg(long, value_name = "DIR")]
    shm_dir: Option<PathBuf>,
    #[command(flatten)]
    journal: JournalArgs,
}

/// Parses `3600`, `90s`, `30m`, `2h`, `1d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a duration (e.g. 3600, 90s, 30m, 1h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return Err(format!("unknown unit '{unit}' in '{s}' (use s, m, h or d)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PICLOUD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: logs that go to files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

fn short_hostname() -> String {
    let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    let short = host.split('.').next().unwrap_or_default();
    if short.is_empty() { "localhost".to_string() } else { short.to_string() }
}

/// Runs the server in the foreground.
pub(crate) fn server(a: ServerArgs) -> anyhow::Result<()> {
    init_logging();
    let config = picloud_scheduler::server::ServerConfig {
        state_dir: a.dir.unwrap_or_else(default_state_dir),
        name: a.name.unwrap_or_else(short_hostname),
        tcp: a.listen_tcp,
        keep_finished: a.keep_finished,
        core: CoreConfig {
            policy: a.policy,
            node_timeout: a.node_timeout.as_millis() as u64,
            node_loss_retries: a.node_loss_retries,
            ..CoreConfig::default()
        },
        journal: a.journal.config(),
        threads: if a.inline_core { ServerThreads::Inline } else { ServerThreads::Separate },
    };
    picloud_scheduler::server::run(config)?;
    Ok(())
}

/// Runs an agent in the foreground.
pub(crate) fn agent(a: AgentArgs) -> anyhow::Result<()> {
    init_logging();
    let dir = a.dir.unwrap_or_else(default_state_dir);
    let server = match a.server {
        Some(s) => ServerAddr::parse(&s),
        None => ServerAddr::of_state_dir(&dir),
    };
    let shm = if a.no_shm {
        None
    } else {
        // Stable across restarts of this agent, so a restart removes what a
        // crashed run left; distinct for agents of other state directories.
        let canonical = dir.canonicalize().unwrap_or_else(|_| dir.clone());
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&canonical, &mut hasher);
        let id = std::hash::Hasher::finish(&hasher) as u32;
        let prefix = format!("picloud-{:08x}-", id);
        match picloud_nodeagent::shm::StoreConfig::for_dir(&a.shm_dir, prefix) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("no shared-memory store: {e}");
                None
            }
        }
    };
    let config = picloud_nodeagent::agent::AgentConfig {
        server,
        spool_dir: dir.join("spool").join(format!("agent-{}", std::process::id())),
        kill_grace: a.kill_grace,
        hostname: a.hostname,
        use_cgroups: !a.no_cgroups,
        local_socket: Some(a.local_socket.unwrap_or_else(|| dir.join("agent.sock"))),
        python_path: a.python_path.or_else(|| std::env::var("PICLOUD_PYTHONPATH").ok()),
        shm,
        started_report_delay: picloud_nodeagent::agent::STARTED_REPORT_DELAY,
    };
    picloud_nodeagent::agent::run(config)?;
    Ok(())
}

/// Starts `picloud <args>` as a child in its own process group, so that a
/// Ctrl-C reaches only `up`, which then stops the children in order. The child
/// also gets SIGTERM should `up` die without stopping it.
fn spawn_child(args: &[&str], dir: &Path) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the picloud executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(args).arg("--dir").arg(dir).process_group(0);
    // Built before the fork: the child may not allocate.
    let no_signals = SigSet::empty();
    // SAFETY: prctl(PR_SET_PDEATHSIG) and pthread_sigmask are single system
    // calls, safe between fork and exec; the closure allocates nothing and takes
    // no lock. The mask is cleared because `up` blocks the signals it waits for,
    // and a blocked mask survives exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)?;
            no_signals.thread_set_mask().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("cannot start `picloud {}`", args.join(" ")))
}

/// Stops a child with SIGTERM, escalating to SIGKILL after `grace`.
fn stop_child(child: &mut Child, grace: Duration) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits until `ready` says yes, failing if `child` exits first or time runs out.
fn wait_ready(child: &mut Child, what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the {what} exited during start-up ({status}); see its messages above");
        }
        if Instant::now() > deadline {
            bail!("the {what} did not become ready within 30 seconds");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a server and one agent on this machine until Ctrl-C or SIGTERM.
pub(crate) fn up(a: UpArgs) -> anyhow::Result<()> {
    let dir = a.dir.unwrap_or_else(default_state_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let addr = ServerAddr::of_state_dir(&dir);
    if Client::connect(&addr).is_ok() {
        bail!("a picloud server is already running at {addr}; stop it first or choose another --dir");
    }
    // Block the signals before any child exists, so none is missed; children
    // start with an empty mask (std resets it before exec).
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD] {
        signals.add(s);
    }
    signals.thread_block()?;

    let keep = format!("{}", a.keep_finished.as_secs());
    let policy = a.policy.to_string();
    let journal_args = a.journal.to_args();
    // One machine: the core runs on the server's I/O thread.
    let mut server_args = vec!["server", "--inline-core", "--keep-finished", &keep, "--policy", &policy];
    server_args.extend(journal_args.iter().map(String::as_str));
    if let Some(name) = &a.name {
        server_args.extend(["--name", name]);
    }
    let mut server = spawn_child(&server_args, &dir)?;
    if let Err(e) = wait_ready(&mut server, "server", || Client::connect(&addr).is_ok()) {
        stop_child(&mut server, Duration::from_secs(5));
        return Err(e);
    }
    let grace = format!("{}", a.kill_grace.as_secs_f64());
    let shm_dir = a.shm_dir.as_ref().map(|d| d.to_string_lossy().into_owned());
    let mut agent_args = vec!["agent", "--kill-grace", &grace];
    if let Some(d) = &shm_dir {
        agent_args.extend(["--shm-dir", d]);
    }
    let mut agent = match spawn_child(&agent_args, &dir) {
        Ok(c) => c,
        Err(e) => {
            stop_child(&mut server, Duration::from_secs(5));
            return Err(e);
        }
    };
    let nodes_up = || -> Option<(String, usize)> {
        let mut c = Client::connect(&addr).ok()?;
        match c.request(&ClientRequest::Nodes).ok()? {
            ServerReply::Nodes(n) => {
                n.iter().find(|n| n.state == "up").map(|n| (n.name.clone(), n.info.cores.len()))
            }
            _ => None,
        }
    };
    let mut node = None;
    if let Err(e) = wait_ready(&mut agent, "agent", || {
        node = nodes_up();
        node.is_some()
    }) {
        stop_child(&mut agent, Duration::from_secs(5));
        stop_child(&mut server, Duration::from_secs(5));
        return Err(e);
    }
    let (node, cores) = node.expect("ready");
    let server_name = Client::connect(&addr).map(|c| c.server_name().to_string()).unwrap_or_default();
    eprintln!(
        "picloud is up: server '{server_name}' at {addr}, agent on '{node}' with {cores} cores.\n\
         Submit with `picloud submit` or `qsub` (PICLOUD_DIR={}); Ctrl-C stops.",
        dir.display()
    );
    let failure = loop {
        match signals.wait()? {
            Signal::SIGCHLD => {
                if let Some(status) = server.try_wait()? {
                    break Some(format!("the server exited unexpectedly ({status})"));
                }
                if let Some(status) = agent.try_wait()? {
                    break Some(format!("the agent exited unexpectedly ({status})"));
                }
            }
            sig => {
                eprintln!("picloud: {sig} received, stopping the agent (and its jobs) and the server");
                break None;
            }
        }
    };
    // The agent first, so that it kills its jobs and reports them; then the server.
    stop_child(&mut agent, a.kill_grace + Duration::from_secs(5));
    stop_child(&mut server, Duration::from_secs(5));
    match failure {
        Some(f) => bail!(f),
        None => Ok(()),
    }
}

/// Creates `qsub`, `qstat`, `qdel` and `qrls` links to this executable in `dir`.
pub(crate) fn install_pbs_commands(dir: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the picloud executable")?;
    let exe = exe.canonicalize().unwrap_or(exe);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for name in ["qsub", "qstat", "qdel", "qrls"] {
        let link = dir.join(name);
        match std::fs::symlink_metadata(&link) {
            Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(&link)?,
            Ok(_) => bail!("{} exists and is not a link; remove it first", link.display()),
            Err(_) => {}
        }
        std::os::unix::fs::symlink(&exe, &link)
            .with_context(|| format!("cannot create {}", link.display()))?;
        println!("{}", link.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3600"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
