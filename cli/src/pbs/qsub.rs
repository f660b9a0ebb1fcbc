//! qsub (and `picloud submit`): turn a command line and a job script into a
//! [`JobSpec`], then queue it.
//!
//! Everything up to the request is pure: [`prepare`] takes the arguments, the
//! submitter's directory, environment and host name ([`SubmitEnv`]) and a way
//! to read files ([`Files`]), and either returns the complete submission or
//! says what is wrong, so that nothing is queued from a faulty submission.
//!
//! 1. The command line is parsed getopt-style (`-hV`, `-Nname`, `-N name`);
//!    options may follow the script operand. After `--` come a command and its
//!    arguments, run instead of a script.
//! 2. The script is read (a file, or standard input when neither a script nor
//!    a command is given) and its `#PBS` directives are parsed with the same
//!    option parser; an error names the script, the line and the option.
//! 3. The two are merged: an option on the command line replaces the same
//!    option of a directive. `-l` resources merge item by item (the command
//!    line's `walltime` replaces the script's, the script's `mem` stays) and
//!    `-v` variables add up; flags (`-h`, `-V`, `-z`) hold if either gives them.
//! 4. The job's environment, paths and defaults are filled in.

use super::getopt::{Getopt, GetoptError, Word};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use picloud_proto::{
    ArrayIndices, ClientRequest, DependKind, Dependency, JobCommand, JobRef, JobSpec, JoinStreams,
    ParseJobRefError, ServerReply,
};

use super::directives::{self, DEFAULT_PREFIX, DirectiveError};
use super::resources::{self, ResourceError, ResourceItem};

pub(crate) use picloud_proto::submit_env::{self, DEFAULT_QUEUE};

/// Longest job name PBS accepts.
const MAX_NAME_LEN: usize = 236;

/// The submitter's side of a submission.
#[derive(Debug, Clone)]
pub(crate) struct SubmitEnv {
    /// Absolute current directory: the job's working directory.
    pub(crate) cwd: PathBuf,
    /// The submitter's environment.
    pub(crate) vars: BTreeMap<String, String>,
    /// This host's name.
    pub(crate) hostname: String,
}

impl SubmitEnv {
    /// The environment of this process.
    pub(crate) fn current() -> std::io::Result<Self> {
        let cwd = std::env::current_dir()?;
        let vars = submit_env::current_vars();
        // Prefer $PWD when it names the same directory: it keeps the symbolic
        // links the user sees (e.g. /home/alice rather than /export/home/alice).
        let cwd = match vars.get("PWD") {
            Some(pwd) if Path::new(pwd).is_absolute() && same_file(Path::new(pwd), &cwd) => {
                PathBuf::from(pwd)
            }
            _ => cwd,
        };
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".to_string());
        Ok(Self { cwd, vars, hostname })
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// How [`prepare`] reads the script and looks at output paths.
pub(crate) trait Files {
    /// Reads a whole file.
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>>;
    /// Reads all of standard input.
    fn read_stdin(&self) -> std::io::Result<Vec<u8>>;
    /// Whether `path` is an existing directory.
    fn is_dir(&self, path: &Path) -> bool;
}

/// The real file system and standard input.
pub(crate) struct RealFiles;

impl Files for RealFiles {
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn read_stdin(&self) -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        std::io::stdin().lock().read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
}

/// A submission ready to send.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Submission {
    /// The job.
    pub(crate) spec: JobSpec,
    /// `-z`: do not print the job id.
    pub(crate) quiet: bool,
    /// `-W block=true`: wait for the job and exit with its status.
    pub(crate) block: bool,
}

/// Why a submission is refused before anything is sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QsubError {
    /// A bad option on the command line.
    #[error("{0}")]
    Option(#[from] OptionError),
    /// A bad option in a `#PBS` line.
    #[error("{file}:{line}: {error}")]
    Directive {
        /// The script as named on the command line, or `STDIN`.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        error: OptionError,
    },
    /// A `#PBS` line that cannot be split into words.
    #[error("{file}:{}: {error}", error.line)]
    DirectiveSyntax {
        /// The script.
        file: String,
        /// What is wrong, with the line.
        error: DirectiveError,
    },
    /// The script does not exist.
    #[error("script file '{0}' does not exist")]
    ScriptMissing(String),
    /// The script is a directory.
    #[error("'{0}' is a directory, not a job script")]
    ScriptIsDirectory(String),
    /// The script cannot be read.
    #[error("cannot read script '{path}': {reason}")]
    ScriptUnreadable {
        /// The script.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The script is empty or only whitespace.
    #[error("script '{0}' is empty")]
    ScriptEmpty(String),
    /// The script is not UTF-8 text.
    #[error("script '{0}' is not a text file")]
    ScriptNotText(String),
    /// Standard input cannot be read.
    #[error("cannot read the job script from standard input: {0}")]
    StdinUnreadable(String),
    /// Standard input held no script.
    #[error("the job script read from standard input is empty")]
    StdinEmpty,
    /// Both a script and `-- CMD` were given.
    #[error("give either a script or `-- CMD ARGS...`, not both")]
    ScriptAndCommand,
}

impl QsubError {
    /// Whether the error is one of usage (an unknown option), answered with the usage text.
    pub(crate) fn is_usage(&self) -> bool {
        matches!(self, QsubError::Option(OptionError::Getopt(_)))
    }
}

/// A bad option, wherever it was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OptionError {
    /// A word that is not a valid option.
    #[error(transparent)]
    Getopt(#[from] GetoptError),
    /// An option's value is invalid.
    #[error("-{option} {value}: {problem}")]
    BadValue {
        /// The option letter.
        option: char,
        /// The value, or for `-l` the offending item.
        value: String,
        /// What is wrong with it.
        problem: ValueProblem,
    },
    /// A known PBS option picloud does not implement.
    #[error("-{0}: {1}")]
    Unsupported(char, &'static str),
    /// A word that is not an option inside a directive.
    #[error("unexpected argument '{0}' in a directive")]
    ArgumentInDirective(String),
    /// A second operand after the script.
    #[error(
        "unexpected argument '{extra}' after the script '{script}' (to run a command with arguments, use `-- CMD ARGS...`)"
    )]
    ExtraArgument {
        /// The script.
        script: String,
        /// The extra word.
        extra: String,
    },
    /// `--` with nothing after it.
    #[error("`--` must be followed by a command")]
    EmptyCommand,
    /// `--` inside a directive.
    #[error("`-- CMD` can only be given on the command line")]
    CommandInDirective,
}

/// What is wrong with an option's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ValueProblem {
    /// A bad `-l` item.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// A bad `-J`/`-t` range (the reason from the range parser).
    #[error("{0}")]
    Array(String),
    /// An array slot limit (`-t 1-10%2`).
    #[error("array slot limits (%) are not supported")]
    SlotLimit,
    /// A bad job id in a dependency.
    #[error(transparent)]
    JobId(#[from] ParseJobRefError),
    /// A bad `-N`.
    #[error("a job name must be 1 to {MAX_NAME_LEN} characters, without whitespace or '/'")]
    Name,
    /// A bad `-j`.
    #[error("expected oe, eo or n")]
    Join,
    /// A bad `-r`.
    #[error("expected y or n")]
    YesNo,
    /// A bad `-W block=`.
    #[error("expected true or false")]
    TrueFalse,
    /// A bad `-p`.
    #[error("priority must be a whole number from -1024 to 1023")]
    Priority,
    /// An empty value.
    #[error("must not be empty")]
    Empty,
    /// A `-W` value that is not `attr=value`.
    #[error("expected ATTRIBUTE=VALUE")]
    AttributeFormat,
    /// A `-W` attribute picloud does not know.
    #[error("unsupported -W attribute '{0}' (picloud supports depend and block)")]
    Attribute(String),
    /// A dependency kind picloud does not know.
    #[error("unsupported dependency type '{0}' (picloud supports afterok, afterany and afternotok)")]
    DependKind(String),
    /// A dependency without job ids.
    #[error("dependency '{0}' names no job (expected TYPE:JOBID[:JOBID...])")]
    DependNoJob(String),
    /// A bad variable name in `-v`.
    #[error("'{0}' is not a valid environment variable name")]
    VarName(String),
}

/// Where an option was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    CommandLine,
    Directive,
}

/// The options of one source (the command line, or the directives), each
/// parsed and checked but not yet merged or resolved.
#[derive(Debug, Default)]
struct Options {
    name: Option<String>,
    stdout: Option<String>,
    stderr: Option<String>,
    join: Option<JoinStreams>,
    queue: Option<String>,
    account: Option<String>,
    project: Option<String>,
    export_all: bool,
    vars: Vec<(String, Option<String>)>,
    hold: bool,
    resources: Vec<ResourceItem>,
    array: Option<ArrayIndices>,
    depend: Option<Vec<Dependency>>,
    block: Option<bool>,
    rerunnable: Option<bool>,
    priority: Option<i32>,
    shell: Option<String>,
    quiet: bool,
    prefix: Option<String>,
    script: Option<String>,
    argv: Option<Vec<String>>,
}

impl Options {
    /// Merges directive options (`self`) under command-line options (`cli`).
    fn overridden_by(self, cli: Options) -> Options {
        Options {
            name: cli.name.or(self.name),
            stdout: cli.stdout.or(self.stdout),
            stderr: cli.stderr.or(self.stderr),
            join: cli.join.or(self.join),
            queue: cli.queue.or(self.queue),
            account: cli.account.or(self.account),
            project: cli.project.or(self.project),
            export_all: cli.export_all || self.export_all,
            vars: self.vars.into_iter().chain(cli.vars).collect(),
            hold: cli.hold || self.hold,
            resources: self.resources.into_iter().chain(cli.resources).collect(),
            array: cli.array.or(self.array),
            depend: cli.depend.or(self.depend),
            block: cli.block.or(self.block),
            rerunnable: cli.rerunnable.or(self.rerunnable),
            priority: cli.priority.or(self.priority),
            shell: cli.shell.or(self.shell),
            quiet: cli.quiet || self.quiet,
            prefix: cli.prefix,
            script: cli.script,
            argv: cli.argv,
        }
    }
}

/// Whether an option letter takes a value (`Some(true)`), is a flag
/// (`Some(false)`), or is not qsub's (`None`).
fn arity(option: char) -> Option<bool> {
    match option {
        'h' | 'V' | 'z' | 'f' | 'I' | 'X' | 'G' => Some(false),
        'N' | 'o' | 'e' | 'j' | 'q' | 'A' | 'P' | 'v' | 'l' | 'J' | 't' | 'W' | 'r' | 'p' | 'm' | 'M'
        | 'S' | 'C' | 'c' | 'k' | 'a' | 'F' | 'u' | 'R' => Some(true),
        _ => None,
    }
}

/// Parses getopt-style words into `opts`; later options replace earlier ones,
/// except `-l` and `-v`, which accumulate.
fn parse_words(words: &[String], origin: Origin, opts: &mut Options) -> Result<(), OptionError> {
    for word in Getopt::new(words, arity) {
        match word? {
            Word::Rest(argv) => {
                if origin == Origin::Directive {
                    return Err(OptionError::CommandInDirective);
                }
                if argv.is_empty() {
                    return Err(OptionError::EmptyCommand);
                }
                opts.argv = Some(argv.to_vec());
            }
            // An operand: the script.
            Word::Operand(operand) if origin == Origin::Directive => {
                return Err(OptionError::ArgumentInDirective(operand.to_string()));
            }
            Word::Operand(script) => {
                if let Some(first) = &opts.script {
                    return Err(OptionError::ExtraArgument {
                        script: first.clone(),
                        extra: script.to_string(),
                    });
                }
                opts.script = Some(script.to_string());
            }
            Word::Flag(option) => apply_flag(option, opts)?,
            Word::Value(option, value) => apply_value(option, value, origin, opts)?,
        }
    }
    Ok(())
}

fn apply_flag(option: char, opts: &mut Options) -> Result<(), OptionError> {
    match option {
        'h' => opts.hold = true,
        'V' => opts.export_all = true,
        'z' => opts.quiet = true,
        // `-f` keeps qsub in the foreground; it always is.
        'f' => {}
        'I' | 'X' | 'G' => {
            return Err(OptionError::Unsupported(option, "interactive jobs are not supported"));
        }
        _ => unreachable!("arity() lists every flag handled here"),
    }
    Ok(())
}

fn apply_value(option: char, value: &str, origin: Origin, opts: &mut Options) -> Result<(), OptionError> {
    let bad = |problem: ValueProblem| OptionError::BadValue { option, value: value.to_string(), problem };
    let non_empty = || -> Result<String, OptionError> {
        if value.trim().is_empty() { Err(bad(ValueProblem::Empty)) } else { Ok(value.to_string()) }
    };
    match option {
        'N' => {
            if !is_valid_name(value) {
                return Err(bad(ValueProblem::Name));
            }
            opts.name = Some(value.to_string());
        }
        'o' | 'e' => {
            let path = strip_host(value);
            if path.is_empty() {
                return Err(bad(ValueProblem::Empty));
            }
            let slot = if option == 'o' { &mut opts.stdout } else { &mut opts.stderr };
            *slot = Some(path.to_string());
        }
        'j' => {
            opts.join = Some(match value {
                "oe" => JoinStreams::IntoOut,
                "eo" => JoinStreams::IntoErr,
                "n" => JoinStreams::No,
                _ => return Err(bad(ValueProblem::Join)),
            });
        }
        'q' => {
            // `queue@server`: picloud has one server; keep the queue name.
            let queue = value.split('@').next().unwrap_or_default().trim();
            opts.queue = (!queue.is_empty()).then(|| queue.to_string());
        }
        'A' => opts.account = Some(non_empty()?),
        'P' => opts.project = Some(non_empty()?),
        'v' => opts.vars.extend(parse_var_list(value).map_err(bad)?),
        'l' => {
            let items = resources::parse_list(value).map_err(|(item, e)| OptionError::BadValue {
                option,
                value: item,
                problem: ValueProblem::Resource(e),
            })?;
            opts.resources.extend(items);
        }
        'J' | 't' => {
            if value.contains('%') {
                return Err(bad(ValueProblem::SlotLimit));
            }
            let array = ArrayIndices::parse(value).map_err(|e| bad(ValueProblem::Array(e.reason)))?;
            opts.array = Some(array);
        }
        'W' => parse_w_attributes(value, opts).map_err(bad)?,
        'r' => {
            opts.rerunnable = Some(match value {
                "y" | "Y" => true,
                "n" | "N" => false,
                _ => return Err(bad(ValueProblem::YesNo)),
            });
        }
        'p' => {
            let p: i32 = value.trim().parse().map_err(|_| bad(ValueProblem::Priority))?;
            if !(-1024..=1023).contains(&p) {
                return Err(bad(ValueProblem::Priority));
            }
            opts.priority = Some(p);
        }
        'S' => {
            // `path[@host][,path@host...]`: the first path serves every host.
            let first = value.split(',').next().unwrap_or_default();
            let shell = first.split('@').next().unwrap_or_default().trim();
            if shell.is_empty() {
                return Err(bad(ValueProblem::Empty));
            }
            opts.shell = Some(shell.to_string());
        }
        'C' => {
            // PBS ignores `-C` inside a script: the prefix is needed to read it.
            if origin == Origin::CommandLine {
                opts.prefix = Some(value.to_string());
            }
        }
        // Mail (-m, -M), checkpointing (-c) and keeping files on the execution
        // host (-k) do not apply to picloud: accepted and ignored.
        'm' | 'M' | 'c' | 'k' => {}
        'a' => return Err(OptionError::Unsupported(option, "deferred start times are not supported")),
        'F' => {
            return Err(OptionError::Unsupported(
                option,
                "script arguments are not supported; submit `-- CMD ARGS...` instead",
            ));
        }
        'u' => return Err(OptionError::Unsupported(option, "jobs always run as the submitting user")),
        'R' => return Err(OptionError::Unsupported(option, "removing output files is not supported")),
        _ => unreachable!("arity() lists every option handled here"),
    }
    Ok(())
}

/// A name PBS accepts for `-N`.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= MAX_NAME_LEN
        && !name.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/')
}

/// `host:path` → `path` (PBS output paths may name the host to copy to; picloud
/// writes directly where the job runs).
fn strip_host(value: &str) -> &str {
    match value.split_once(':') {
        Some((host, path)) if !host.is_empty() && !host.contains('/') => path,
        _ => value,
    }
}

/// Splits a `-v` list at commas outside quotes, removing the quotes:
/// `A=1,B='x,y'` → `A=1`, `B=x,y`.
fn split_unquoted(value: &str) -> Vec<String> {
    let mut items = vec![String::new()];
    let mut quote: Option<char> = None;
    for c in value.chars() {
        let current = items.last_mut().expect("items is never empty");
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => current.push(c),
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == ',' => items.push(String::new()),
            None => current.push(c),
        }
    }
    items
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `-v VAR[=value],VAR2...`; a variable without a value takes the
/// submitter's (resolved later).
fn parse_var_list(value: &str) -> Result<Vec<(String, Option<String>)>, ValueProblem> {
    let mut vars = Vec::new();
    for item in split_unquoted(value) {
        if item.trim().is_empty() {
            continue;
        }
        let (name, val) = match item.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.to_string())),
            None => (item.trim(), None),
        };
        if !is_env_name(name) {
            return Err(ValueProblem::VarName(name.to_string()));
        }
        vars.push((name.to_string(), val));
    }
    if vars.is_empty() {
        return Err(ValueProblem::Empty);
    }
    Ok(vars)
}

/// Parses `-W attr=value[,attr=value]`. A dependency list has commas of its
/// own (`depend=afterok:1,afterany:2`), so a comma-separated piece starts a new
/// attribute only when it has an `=` before any `:`.
fn parse_w_attributes(value: &str, opts: &mut Options) -> Result<(), ValueProblem> {
    let mut attrs: Vec<(String, String)> = Vec::new();
    for piece in value.split(',') {
        let starts_attribute = match (piece.find('='), piece.find(':')) {
            (Some(eq), Some(colon)) => eq < colon,
            (Some(_), None) => true,
            _ => false,
        };
        if starts_attribute {
            let (name, v) = piece.split_once('=').expect("piece has an '='");
            attrs.push((name.trim().to_string(), v.trim().to_string()));
        } else if let Some((_, v)) = attrs.last_mut() {
            v.push(',');
            v.push_str(piece.trim());
        } else {
            return Err(ValueProblem::AttributeFormat);
        }
    }
    for (name, v) in attrs {
        match name.to_ascii_lowercase().as_str() {
            "depend" => opts.depend.get_or_insert_with(Vec::new).extend(parse_depend(&v)?),
            "block" => {
                opts.block = Some(match v.to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(ValueProblem::TrueFalse),
                });
            }
            _ => return Err(ValueProblem::Attribute(name)),
        }
    }
    Ok(())
}

/// Parses `afterok:ID[:ID...][,afterany:ID...]`.
fn parse_depend(value: &str) -> Result<Vec<Dependency>, ValueProblem> {
    let mut deps = Vec::new();
    for group in value.split(',') {
        let mut parts = group.split(':');
        let kind_text = parts.next().unwrap_or_default().trim();
        let kind = match kind_text.to_ascii_lowercase().as_str() {
            "afterok" => DependKind::AfterOk,
            "afterany" => DependKind::AfterAny,
            "afternotok" => DependKind::AfterNotOk,
            _ => return Err(ValueProblem::DependKind(kind_text.to_string())),
        };
        let before = deps.len();
        for id in parts {
            deps.push(Dependency { kind, on: id.parse::<JobRef>()? });
        }
        if deps.len() == before {
            return Err(ValueProblem::DependNoJob(group.to_string()));
        }
    }
    Ok(deps)
}

/// Resolves an output path against the submit directory. A directory (written
/// with a trailing `/`, or existing) is returned with a trailing `/`, so that
/// the server puts the default file name inside it.
fn resolve_output_path(path: &str, cwd: &Path, files: &dyn Files) -> String {
    let full = cwd.join(path);
    let mut text = full.to_string_lossy().into_owned();
    if (path.ends_with('/') || files.is_dir(&full)) && !text.ends_with('/') {
        text.push('/');
    }
    text
}

/// Makes a script run under `shell` (`-S`): its `#!` line is replaced, or one
/// is added.
fn with_shell(body: &str, shell: &str) -> String {
    match body.strip_prefix("#!") {
        Some(rest) => {
            let after_first = rest.find('\n').map_or("", |nl| &rest[nl..]);
            format!("#!{shell}{after_first}")
        }
        None => format!("#!{shell}\n{body}"),
    }
}

/// What the job runs, where it came from (for error messages), and its default name.
struct Loaded {
    command: JobCommand,
    label: String,
    default_name: String,
}

fn base_name(path: &str) -> String {
    Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.to_string())
}

fn load_command(cli: &Options, env: &SubmitEnv, files: &dyn Files) -> Result<Loaded, QsubError> {
    if let Some(argv) = &cli.argv {
        if cli.script.is_some() {
            return Err(QsubError::ScriptAndCommand);
        }
        return Ok(Loaded {
            command: JobCommand::Argv(argv.clone()),
            label: argv[0].clone(),
            default_name: base_name(&argv[0]),
        });
    }
    let Some(path) = &cli.script else {
        let bytes = files.read_stdin().map_err(|e| QsubError::StdinUnreadable(e.to_string()))?;
        let body = String::from_utf8(bytes).map_err(|_| QsubError::ScriptNotText("STDIN".into()))?;
        if body.trim().is_empty() {
            return Err(QsubError::StdinEmpty);
        }
        return Ok(Loaded {
            command: JobCommand::Script { body },
            label: "STDIN".into(),
            default_name: "STDIN".into(),
        });
    };
    let full = env.cwd.join(path);
    if files.is_dir(&full) {
        return Err(QsubError::ScriptIsDirectory(path.clone()));
    }
    let bytes = files.read(&full).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => QsubError::ScriptMissing(path.clone()),
        std::io::ErrorKind::PermissionDenied => {
            QsubError::ScriptUnreadable { path: path.clone(), reason: "permission denied".into() }
        }
        _ => QsubError::ScriptUnreadable { path: path.clone(), reason: e.to_string() },
    })?;
    let body = String::from_utf8(bytes).map_err(|_| QsubError::ScriptNotText(path.clone()))?;
    if body.trim().is_empty() {
        return Err(QsubError::ScriptEmpty(path.clone()));
    }
    Ok(Loaded { command: JobCommand::Script { body }, label: path.clone(), default_name: base_name(path) })
}

/// Parses and checks a whole submission: `args` are qsub's arguments (without
/// the program name).
pub(crate) fn prepare(args: &[String], env: &SubmitEnv, files: &dyn Files) -> Result<Submission, QsubError> {
    let mut cli = Options::default();
    parse_words(args, Origin::CommandLine, &mut cli)?;
    let loaded = load_command(&cli, env, files)?;

    let mut from_script = Options::default();
    if let JobCommand::Script { body } = &loaded.command {
        let prefix = cli
            .prefix
            .clone()
            .or_else(|| env.vars.get("PBS_DPREFIX").cloned())
            .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        let found = directives::scan(body, &prefix)
            .map_err(|error| QsubError::DirectiveSyntax { file: loaded.label.clone(), error })?;
        for d in found {
            parse_words(&d.words, Origin::Directive, &mut from_script)
                .map_err(|error| QsubError::Directive { file: loaded.label.clone(), line: d.line, error })?;
        }
    }
    let opts = from_script.overridden_by(cli);
    Ok(build(opts, loaded, args, env, files))
}

/// The job's environment, as PBS builds it ([`submit_env::job_env`]).
fn job_env(opts: &Options, env: &SubmitEnv) -> Vec<(String, String)> {
    let workdir = env.cwd.to_string_lossy();
    let queue = opts.queue.as_deref().unwrap_or(DEFAULT_QUEUE);
    let origin = submit_env::Origin { workdir: &workdir, host: &env.hostname, queue };
    submit_env::job_env(&env.vars, opts.export_all, &opts.vars, origin)
}

fn build(opts: Options, loaded: Loaded, args: &[String], env: &SubmitEnv, files: &dyn Files) -> Submission {
    let command = match (loaded.command, &opts.shell) {
        (JobCommand::Script { body }, Some(shell)) => JobCommand::Script { body: with_shell(&body, shell) },
        (command, _) => command,
    };
    let spec = JobSpec {
        name: opts.name.clone().unwrap_or(loaded.default_name),
        command,
        workdir: env.cwd.to_string_lossy().into_owned(),
        env: job_env(&opts, env),
        stdout: opts.stdout.as_deref().map(|p| resolve_output_path(p, &env.cwd, files)),
        stderr: opts.stderr.as_deref().map(|p| resolve_output_path(p, &env.cwd, files)),
        join: opts.join.unwrap_or_default(),
        queue: opts.queue,
        account: opts.account,
        project: opts.project,
        hold: opts.hold,
        resources: resources::fold(&opts.resources),
        array: opts.array,
        depend: opts.depend.unwrap_or_default(),
        rerunnable: opts.rerunnable.unwrap_or(true),
        priority: opts.priority.unwrap_or(0),
        submit_host: env.hostname.clone(),
        submit_args: join_args(args),
    };
    Submission { spec, quiet: opts.quiet, block: opts.block.unwrap_or(false) }
}

/// The arguments as one line for `Submit_arguments`: a word with spaces,
/// quotes or shell operators is quoted so the line reads back as typed.
fn join_args(args: &[String]) -> String {
    const SPECIAL: &[char] = &['\'', '"', '\\', '$', '`', ';', '&', '|', '<', '>', '(', ')', '#'];
    let words: Vec<std::borrow::Cow<'_, str>> = args
        .iter()
        .map(|w| {
            if w.is_empty() || w.contains(|c: char| c.is_whitespace() || SPECIAL.contains(&c)) {
                shlex::try_quote(w).unwrap_or_else(|_| w.as_str().into())
            } else {
                w.as_str().into()
            }
        })
        .collect();
    words.join(" ")
}

/// Usage text of qsub and `picloud submit`, after `usage: <prog>`.
const USAGE: &str = "\
 [-A account] [-e path] [-h] [-j oe|eo|n] [-J range] [-l resource_list]
    [-N name] [-o path] [-p priority] [-P project] [-q queue] [-r y|n]
    [-S shell] [-t range] [-v variable_list] [-V] [-W depend=...|block=true]
    [-z] [-C prefix] [script | -- command [args...]]
   -l takes ncpus=N, mem=SIZE, walltime=[[HH:]MM:]SS, select=1:ncpus=N:mem=SIZE,
      nodes=1:ppn=N; other resources are kept as given.
   Without a script or command, the script is read from standard input.";

/// qsub's main: `prog` prefixes messages (`qsub`, `picloud submit`).
pub(crate) fn run(prog: &str, args: Vec<OsString>) -> ExitCode {
    let args = match super::utf8_args(args) {
        Ok(a) => a,
        Err(e) => return super::fail(prog, &e),
    };
    let before_command = args.iter().take_while(|a| *a != "--");
    for a in before_command {
        match a.as_str() {
            "--help" => {
                super::emit(&format!("usage: {prog}{USAGE}\n"));
                return ExitCode::SUCCESS;
            }
            "--version" => {
                super::emit(&format!("pbs_version = {}\n", super::PICLOUD_VERSION));
                return ExitCode::SUCCESS;
            }
            _ => {}
        }
    }
    let env = match SubmitEnv::current() {
        Ok(env) => env,
        Err(e) => {
            eprintln!("{prog}: cannot determine the current directory: {e}");
            return ExitCode::from(super::EXIT_FAILURE);
        }
    };
    let submission = match prepare(&args, &env, &RealFiles) {
        Ok(s) => s,
        Err(e) if e.is_usage() => {
            eprintln!("{prog}: {e}\nusage: {prog}{USAGE}");
            return ExitCode::from(super::EXIT_USAGE);
        }
        Err(e) => return super::fail(prog, &e),
    };
    let mut client = match super::connect() {
        Ok(c) => c,
        Err(e) => return super::fail(prog, &e),
    };
    let is_array = submission.spec.array.is_some();
    let seq = match client.request(&ClientRequest::Submit(Box::new(submission.spec))) {
        Ok(ServerReply::Submitted { seq, id }) => {
            if !submission.quiet {
                super::emit(&format!("{id}\n"));
            }
            seq
        }
        Ok(other) => return super::fail(prog, &super::unexpected(&other)),
        Err(e) => return super::fail(prog, &e),
    };
    if !submission.block {
        return ExitCode::SUCCESS;
    }
    // `-W block=true`: wait for the job and exit with its exit status.
    let job = if is_array { JobRef::Array(seq) } else { JobRef::Job(seq) };
    match client.request(&ClientRequest::wait_all(vec![job], None)) {
        Ok(ServerReply::Jobs { jobs, .. }) => {
            let status = jobs.first().and_then(|j| j.exit_status).unwrap_or(1);
            ExitCode::from(u8::try_from(status).unwrap_or(super::EXIT_FAILURE))
        }
        Ok(other) => super::fail(prog, &super::unexpected(&other)),
        Err(e) => super::fail(prog, &e),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use picloud_proto::Resources;

    use super::*;

    /// An in-memory file system with a fixed standard input.
    #[derive(Default)]
    struct FakeFiles {
        files: HashMap<PathBuf, Vec<u8>>,
        dirs: HashSet<PathBuf>,
        stdin: Vec<u8>,
    }

    impl FakeFiles {
        fn with(mut self, path: &str, body: &str) -> Self {
            self.files.insert(PathBuf::from(path), body.as_bytes().to_vec());
            self
        }
        fn dir(mut self, path: &str) -> Self {
            self.dirs.insert(PathBuf::from(path));
            self
        }
        fn stdin(mut self, body: &str) -> Self {
            self.stdin = body.as_bytes().to_vec();
            self
        }
    }

    impl Files for FakeFiles {
        fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
            self.files.get(path).cloned().ok_or_else(|| std::io::ErrorKind::NotFound.into())
        }
        fn read_stdin(&self) -> std::io::Result<Vec<u8>> {
            Ok(self.stdin.clone())
        }
        fn is_dir(&self, path: &Path) -> bool {
            self.dirs.contains(path)
        }
    }

    fn env() -> SubmitEnv {
        let vars = [
            ("HOME", "/home/alice"),
            ("USER", "alice"),
            ("LOGNAME", "alice"),
            ("SHELL", "/bin/bash"),
            ("PATH", "/opt/sw/bin:/usr/bin:/bin"),
            ("LANG", "en_US.UTF-8"),
            ("MAIL", "/var/mail/alice"),
            ("OMP_NUM_THREADS", "4"),
            ("EDITOR", "vi"),
        ];
        SubmitEnv {
            cwd: PathBuf::from("/home/alice/work"),
            vars: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            hostname: "login1".into(),
        }
    }

    fn argv(s: &str) -> Vec<String> {
        shlex::split(s).unwrap()
    }

    fn submit(args: &str, files: &FakeFiles) -> Result<Submission, QsubError> {
        prepare(&argv(args), &env(), files)
    }

    fn spec(args: &str, files: &FakeFiles) -> JobSpec {
        submit(args, files).unwrap().spec
    }

    fn error(args: &str, files: &FakeFiles) -> String {
        submit(args, files).unwrap_err().to_string()
    }

    fn script(body: &str) -> FakeFiles {
        FakeFiles::default().with("/home/alice/work/job.sh", body)
    }

    fn env_of(spec: &JobSpec) -> BTreeMap<&str, &str> {
        spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn plain_script_gets_defaults() {
        let body = "#!/bin/sh\necho hi\n";
        let s = submit("job.sh", &script(body)).unwrap();
        assert!(!s.quiet && !s.block);
        let spec = s.spec;
        assert_eq!(spec.name, "job.sh");
        assert_eq!(spec.command, JobCommand::Script { body: body.into() });
        assert_eq!(spec.workdir, "/home/alice/work");
        assert_eq!(spec.stdout, None);
        assert_eq!(spec.stderr, None);
        assert_eq!(spec.join, JoinStreams::No);
        assert_eq!(spec.queue, None);
        assert!(!spec.hold);
        assert_eq!(spec.resources, Resources::default());
        assert_eq!(spec.array, None);
        assert!(spec.depend.is_empty());
        assert!(spec.rerunnable);
        assert_eq!(spec.priority, 0);
        assert_eq!(spec.submit_host, "login1");
        assert_eq!(spec.submit_args, "job.sh");
    }

    #[test]
    fn clean_environment_and_pbs_o_variables() {
        let spec = spec("job.sh", &script("true\n"));
        let env = env_of(&spec);
        assert_eq!(env["HOME"], "/home/alice");
        assert_eq!(env["USER"], "alice");
        assert_eq!(env["LOGNAME"], "alice");
        assert_eq!(env["SHELL"], "/bin/bash");
        assert_eq!(env["LANG"], "en_US.UTF-8");
        assert_eq!(env["PATH"], submit_env::CLEAN_PATH);
        assert_eq!(env["PBS_O_HOME"], "/home/alice");
        assert_eq!(env["PBS_O_PATH"], "/opt/sw/bin:/usr/bin:/bin");
        assert_eq!(env["PBS_O_WORKDIR"], "/home/alice/work");
        assert_eq!(env["PBS_O_HOST"], "login1");
        assert_eq!(env["PBS_O_LOGNAME"], "alice");
        assert_eq!(env["PBS_O_SHELL"], "/bin/bash");
        assert_eq!(env["PBS_O_QUEUE"], "workq");
        assert_eq!(env["PBS_O_LANG"], "en_US.UTF-8");
        assert_eq!(env["PBS_O_MAIL"], "/var/mail/alice");
        assert!(!env.contains_key("EDITOR") && !env.contains_key("OMP_NUM_THREADS"));
        assert!(!env.contains_key("MAIL"));
    }

    #[test]
    fn export_all_and_selected_variables() {
        let files = script("true\n");
        let all = spec("-V job.sh", &files);
        let env = env_of(&all);
        assert_eq!(env["EDITOR"], "vi");
        assert_eq!(env["PATH"], "/opt/sw/bin:/usr/bin:/bin");
        assert_eq!(env["PBS_O_WORKDIR"], "/home/alice/work");

        let s = spec("-v OMP_NUM_THREADS,FOO=bar,UNSET_VAR -v 'LIST=\"a,b\",X=1' job.sh", &files);
        let env = env_of(&s);
        assert_eq!(env["OMP_NUM_THREADS"], "4");
        assert_eq!(env["FOO"], "bar");
        assert_eq!(env["UNSET_VAR"], "");
        assert_eq!(env["LIST"], "a,b");
        assert_eq!(env["X"], "1");
        assert!(!env.contains_key("EDITOR"));

        assert_eq!(
            error("-v 1BAD=2 job.sh", &files),
            "-v 1BAD=2: '1BAD' is not a valid environment variable name"
        );
        assert_eq!(error("-v , job.sh", &files), "-v ,: must not be empty");
    }

    #[test]
    fn directives_and_command_line_precedence() {
        let body = "#!/bin/bash\n\
                    #PBS -N from_script\n\
                    #PBS -l select=1:ncpus=4:mem=2gb\n\
                    #PBS -l walltime=1:00:00\n\
                    # just a comment\n\
                    \n\
                    #PBS -j oe -q long -v A=script,B=script\n\
                    #PBS -W depend=afterok:7\n\
                    echo start\n\
                    #PBS -N ignored_after_command\n";
        let files = script(body);
        let spec = spec("job.sh", &files);
        assert_eq!(spec.name, "from_script");
        assert_eq!(spec.resources.ncpus, 4);
        assert_eq!(spec.resources.mem, Some(2 << 30));
        assert_eq!(spec.resources.walltime, Some(3600));
        assert_eq!(spec.join, JoinStreams::IntoOut);
        assert_eq!(spec.queue.as_deref(), Some("long"));
        assert_eq!(env_of(&spec)["PBS_O_QUEUE"], "long");
        assert_eq!(spec.depend, vec![Dependency { kind: DependKind::AfterOk, on: JobRef::Job(7) }]);

        let over = super::tests::spec(
            "-N cli -l walltime=2:00:00 -j n -v B=cli -W depend=afterany:9 job.sh",
            &files,
        );
        assert_eq!(over.name, "cli");
        assert_eq!(over.resources.walltime, Some(7200), "the command line wins");
        assert_eq!(over.resources.ncpus, 4, "script resources not overridden stay");
        assert_eq!(over.resources.mem, Some(2 << 30));
        assert_eq!(over.join, JoinStreams::No);
        let env = env_of(&over);
        assert_eq!((env["A"], env["B"]), ("script", "cli"));
        assert_eq!(over.depend, vec![Dependency { kind: DependKind::AfterAny, on: JobRef::Job(9) }]);
        assert_eq!(over.submit_args, "-N cli -l walltime=2:00:00 -j n -v B=cli -W depend=afterany:9 job.sh");
    }

    #[test]
    fn options_after_the_script_and_combined_flags() {
        let files = script("true\n");
        let s = submit("job.sh -hz -Nnamed -lncpus=2", &files).unwrap();
        assert!(s.spec.hold && s.quiet);
        assert_eq!(s.spec.name, "named");
        assert_eq!(s.spec.resources.ncpus, 2);
        assert_eq!(
            error("job.sh other", &files),
            "unexpected argument 'other' after the script 'job.sh' (to run a command with arguments, use `-- CMD ARGS...`)"
        );
    }

    #[test]
    fn directive_errors_name_file_and_line() {
        let files = script("#!/bin/sh\n#PBS -N ok\n#PBS -l walltime=abc\necho\n");
        assert_eq!(error("job.sh", &files), "job.sh:3: -l walltime=abc: walltime must be [[HH:]MM:]SS");
        // The command line does not excuse a bad directive.
        assert!(submit("-l walltime=1:00 job.sh", &files).is_err());

        let cases = [
            (
                "#PBS -l mem=4xb\n",
                "job.sh:1: -l mem=4xb: mem must be a whole number with a unit b, kb, mb, gb or tb (e.g. 4gb)",
            ),
            (
                "#PBS -N 'a b'\n",
                "job.sh:1: -N a b: a job name must be 1 to 236 characters, without whitespace or '/'",
            ),
            ("\n\n#PBS -q x 'stray'\n", "job.sh:3: unexpected argument 'stray' in a directive"),
            ("#PBS -- /bin/true\n", "job.sh:1: `-- CMD` can only be given on the command line"),
            ("#PBS -Y\n", "job.sh:1: invalid option -- 'Y'"),
            ("#PBS -N\n", "job.sh:1: option requires an argument -- 'N'"),
            ("#PBS -N \"x\n", "job.sh:1: unbalanced quotes in directive '-N \"x'"),
            ("#PBS -I\n", "job.sh:1: -I: interactive jobs are not supported"),
        ];
        for (body, want) in cases {
            assert_eq!(error("job.sh", &script(body)), want, "{body:?}");
        }
        // A directive error is not a usage error: no usage text is due.
        assert!(!submit("job.sh", &script("#PBS -Y\n")).unwrap_err().is_usage());
        assert!(submit("-Y job.sh", &script("true")).unwrap_err().is_usage());
    }

    #[test]
    fn script_problems() {
        let files = FakeFiles::default()
            .with("/home/alice/work/empty.sh", "")
            .with("/home/alice/work/blank.sh", "  \n\t\n")
            .with("/abs/job.sh", "true\n")
            .dir("/home/alice/work/sub");
        assert_eq!(error("x.sh", &files), "script file 'x.sh' does not exist");
        assert_eq!(error("empty.sh", &files), "script 'empty.sh' is empty");
        assert_eq!(error("blank.sh", &files), "script 'blank.sh' is empty");
        assert_eq!(error("sub", &files), "'sub' is a directory, not a job script");
        assert_eq!(spec("/abs/job.sh", &files).name, "job.sh");
        let mut binary = FakeFiles::default();
        binary.files.insert("/home/alice/work/a.out".into(), vec![0x7f, b'E', 0xff, 0xfe]);
        assert_eq!(error("a.out", &binary), "script 'a.out' is not a text file");
    }

    #[test]
    fn stdin_scripts() {
        let files = FakeFiles::default().stdin("#PBS -l ncpus=3\nhostname\n");
        let spec = spec("-q workq", &files);
        assert_eq!(spec.name, "STDIN");
        assert_eq!(spec.resources.ncpus, 3);
        assert_eq!(spec.command, JobCommand::Script { body: "#PBS -l ncpus=3\nhostname\n".into() });
        assert_eq!(
            error("", &FakeFiles::default().stdin(" \n")),
            "the job script read from standard input is empty"
        );
        assert_eq!(
            error("", &FakeFiles::default().stdin("#PBS -p 5000\n")),
            "STDIN:1: -p 5000: priority must be a whole number from -1024 to 1023"
        );
    }

    #[test]
    fn command_mode() {
        let files = FakeFiles::default().stdin("#PBS -N never_read\n");
        let spec = spec("-l ncpus=2 -- /usr/bin/python3 -c 'print(1)' -N x", &files);
        assert_eq!(spec.name, "python3");
        assert_eq!(
            spec.command,
            JobCommand::Argv(vec![
                "/usr/bin/python3".into(),
                "-c".into(),
                "print(1)".into(),
                "-N".into(),
                "x".into()
            ])
        );
        assert_eq!(spec.resources.ncpus, 2);
        assert_eq!(spec.submit_args, "-l ncpus=2 -- /usr/bin/python3 -c 'print(1)' -N x");
        assert_eq!(join_args(&["".into(), "a b".into(), "it's".into()]), "'' 'a b' \"it's\"");
        assert_eq!(super::tests::spec("-N mine -- sleep 10", &files).name, "mine");
        assert_eq!(error("--", &files), "`--` must be followed by a command");
        assert_eq!(
            error("job.sh -- true", &script("true")),
            "give either a script or `-- CMD ARGS...`, not both"
        );
    }

    #[test]
    fn output_paths() {
        let files = script("true").dir("/home/alice/work/logs").dir("/tmp");
        let s = spec("-o out.txt -e /tmp job.sh", &files);
        assert_eq!(s.stdout.as_deref(), Some("/home/alice/work/out.txt"));
        assert_eq!(s.stderr.as_deref(), Some("/tmp/"));
        let s = spec("-o logs -e newdir/ job.sh", &files);
        assert_eq!(s.stdout.as_deref(), Some("/home/alice/work/logs/"));
        assert_eq!(s.stderr.as_deref(), Some("/home/alice/work/newdir/"));
        let s = spec("-o login1:/data/o.txt -e node:rel/e.txt job.sh", &files);
        assert_eq!(s.stdout.as_deref(), Some("/data/o.txt"));
        assert_eq!(s.stderr.as_deref(), Some("/home/alice/work/rel/e.txt"));
        let s = spec("-o out_^array_index^.txt job.sh", &files);
        assert_eq!(s.stdout.as_deref(), Some("/home/alice/work/out_^array_index^.txt"));
        assert_eq!(error("-o host: job.sh", &files), "-o host:: must not be empty");
    }

    #[test]
    fn scalar_options() {
        let files = script("true");
        let s =
            spec("-j eo -q long@head -A acct -P proj -r n -p -5 -m abe -M a@b.c -c n -k oe job.sh", &files);
        assert_eq!(s.join, JoinStreams::IntoErr);
        assert_eq!(s.queue.as_deref(), Some("long"));
        assert_eq!(s.account.as_deref(), Some("acct"));
        assert_eq!(s.project.as_deref(), Some("proj"));
        assert!(!s.rerunnable);
        assert_eq!(s.priority, -5);
        assert_eq!(spec("-p 1023 -r y job.sh", &files).priority, 1023);
        assert_eq!(
            error("-p 1024 job.sh", &files),
            "-p 1024: priority must be a whole number from -1024 to 1023"
        );
        assert_eq!(error("-p x job.sh", &files), "-p x: priority must be a whole number from -1024 to 1023");
        assert_eq!(error("-j oo job.sh", &files), "-j oo: expected oe, eo or n");
        assert_eq!(error("-r maybe job.sh", &files), "-r maybe: expected y or n");
        assert_eq!(error("-A '' job.sh", &files), "-A : must not be empty");
        assert_eq!(
            error("-N a/b job.sh", &files),
            "-N a/b: a job name must be 1 to 236 characters, without whitespace or '/'"
        );
        let long = "n".repeat(237);
        assert!(error(&format!("-N {long} job.sh"), &files).contains("1 to 236"));
        assert_eq!(spec(&format!("-N {} job.sh", "n".repeat(236)), &files).name.len(), 236);
        assert_eq!(spec("-q @head job.sh", &files).queue, None);
    }

    #[test]
    fn unknown_and_unsupported_options() {
        let files = script("true");
        assert_eq!(error("-Y job.sh", &files), "invalid option -- 'Y'");
        assert_eq!(error("--frobnicate job.sh", &files), "unrecognized option '--frobnicate'");
        assert_eq!(error("job.sh -N", &files), "option requires an argument -- 'N'");
        assert_eq!(error("-I", &files), "-I: interactive jobs are not supported");
        assert_eq!(error("-X job.sh", &files), "-X: interactive jobs are not supported");
        assert!(error("-a 1200 job.sh", &files).starts_with("-a: "));
        assert!(error("-F 'x y' job.sh", &files).contains("-- CMD ARGS"));
    }

    #[test]
    fn arrays() {
        let files = script("true");
        assert_eq!(spec("-J 1-100 job.sh", &files).array.unwrap().len(), 100);
        assert_eq!(spec("-t 1-100:2 job.sh", &files).array.unwrap().len(), 50);
        assert_eq!(spec("-t 1,3,5 job.sh", &files).array.unwrap().iter().collect::<Vec<_>>(), vec![1, 3, 5]);
        assert_eq!(error("-J 5-1 job.sh", &files), "-J 5-1: range 5-1 runs backwards");
        assert_eq!(error("-t 1-10%2 job.sh", &files), "-t 1-10%2: array slot limits (%) are not supported");
        let d = script("#PBS -J 1-10\ntrue\n");
        assert_eq!(spec("job.sh", &d).array.unwrap().len(), 10);
        assert_eq!(spec("-J 1-3 job.sh", &d).array.unwrap().len(), 3);
    }

    #[test]
    fn dependencies_and_w_attributes() {
        let files = script("true");
        let s = submit("-W depend=afterok:12.head:13,afternotok:14[],afterany:15[2].head job.sh", &files)
            .unwrap();
        assert_eq!(
            s.spec.depend,
            vec![
                Dependency { kind: DependKind::AfterOk, on: JobRef::Job(12) },
                Dependency { kind: DependKind::AfterOk, on: JobRef::Job(13) },
                Dependency { kind: DependKind::AfterNotOk, on: JobRef::Array(14) },
                Dependency { kind: DependKind::AfterAny, on: JobRef::Task(15, 2) },
            ]
        );
        assert!(!s.block);
        let s = submit("-W depend=afterok:1,block=true -W depend=afterany:2 job.sh", &files).unwrap();
        assert!(s.block);
        assert_eq!(s.spec.depend.len(), 2, "several -W depend add up");
        assert_eq!(
            error("-W depend=before:1 job.sh", &files),
            "-W depend=before:1: unsupported dependency type 'before' (picloud supports afterok, afterany and afternotok)"
        );
        assert_eq!(
            error("-W depend=afterok job.sh", &files),
            "-W depend=afterok: dependency 'afterok' names no job (expected TYPE:JOBID[:JOBID...])"
        );
        assert_eq!(
            error("-W depend=afterok:x1 job.sh", &files),
            "-W depend=afterok:x1: 'x1' is not a job id (expected N, N.server, N[] or N[i])"
        );
        assert_eq!(
            error("-W umask=022 job.sh", &files),
            "-W umask=022: unsupported -W attribute 'umask' (picloud supports depend and block)"
        );
        assert_eq!(error("-W block=maybe job.sh", &files), "-W block=maybe: expected true or false");
        assert_eq!(error("-W afterok:1 job.sh", &files), "-W afterok:1: expected ATTRIBUTE=VALUE");
    }

    #[test]
    fn shells_and_prefixes() {
        let files = FakeFiles::default()
            .with("/home/alice/work/a.sh", "#!/bin/sh\n#PBS -N a\necho $0\n")
            .with("/home/alice/work/b.sh", "#PBS -N b\necho\n")
            .with("/home/alice/work/c.sh", "#PBS -N pbs\n#MY -N mine\necho\n");
        let a = spec("-S /bin/bash a.sh", &files);
        assert_eq!(a.command, JobCommand::Script { body: "#!/bin/bash\n#PBS -N a\necho $0\n".into() });
        let b = submit("-S /bin/zsh@host b.sh", &files).unwrap().spec;
        assert_eq!(b.name, "b");
        assert_eq!(b.command, JobCommand::Script { body: "#!/bin/zsh\n#PBS -N b\necho\n".into() });
        assert_eq!(spec("-C '#MY' c.sh", &files).name, "mine");
        let mut env = env();
        env.vars.insert("PBS_DPREFIX".into(), "#MY".into());
        assert_eq!(prepare(&argv("c.sh"), &env, &files).unwrap().spec.name, "mine");
        assert_eq!(spec("-C '' c.sh", &files).name, "c.sh");
    }

    #[test]
    fn var_list_splitting() {
        assert_eq!(split_unquoted("A=1,B='x,y',C=\"p q\""), vec!["A=1", "B=x,y", "C=p q"]);
        assert_eq!(split_unquoted(""), vec![""]);
        assert!(is_env_name("_A1") && !is_env_name("1A") && !is_env_name("A-B") && !is_env_name(""));
        assert_eq!(strip_host("/abs:odd"), "/abs:odd");
        assert_eq!(with_shell("#!/bin/sh", "/bin/bash"), "#!/bin/bash");
    }
}
