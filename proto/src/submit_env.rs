//! The environment a command job is submitted with, built as PBS builds it:
//! the submitter's whole environment (`qsub -V`) or a clean one (a few of
//! the submitter's variables and a standard `PATH`), then the variables the
//! user named (`qsub -v`), then the `PBS_O_*` variables saying where the job
//! came from. `qsub` and libpicloud both submit through [`job_env`].

use std::collections::BTreeMap;

/// `PATH` of a job submitted without `-V`, as PBS gives a clean environment.
pub const CLEAN_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Variables copied from the submitter into the clean environment of a job
/// submitted without `-V` (`PATH` is set to [`CLEAN_PATH`] instead).
pub const CLEAN_ENV_VARS: [&str; 5] = ["HOME", "USER", "LOGNAME", "SHELL", "LANG"];

/// The queue PBS submits to when none is named; picloud has only this one.
pub const DEFAULT_QUEUE: &str = "workq";

/// Where a submission comes from, for the `PBS_O_*` variables.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The submitter's working directory (`PBS_O_WORKDIR`).
    pub workdir: &'a str,
    /// The submitting host (`PBS_O_HOST`).
    pub host: &'a str,
    /// The queue (`PBS_O_QUEUE`).
    pub queue: &'a str,
}

/// The submitter's environment as a map, leaving out what is not UTF-8.
pub fn current_vars() -> BTreeMap<String, String> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect()
}

/// A job's environment: `submitter`'s whole environment with `export_all`,
/// else a clean one; then `named`, each with its value or, for `None`, the
/// submitter's (empty if the submitter has none: the user asked for it by
/// name); then the `PBS_O_*` variables.
pub fn job_env(
    submitter: &BTreeMap<String, String>,
    export_all: bool,
    named: &[(String, Option<String>)],
    origin: Origin<'_>,
) -> Vec<(String, String)> {
    let mut vars: BTreeMap<String, String> = if export_all {
        submitter.clone()
    } else {
        let mut clean: BTreeMap<String, String> = CLEAN_ENV_VARS
            .iter()
            .filter_map(|k| submitter.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        clean.insert("PATH".into(), CLEAN_PATH.into());
        clean
    };
    for (name, value) in named {
        let value = value.clone().or_else(|| submitter.get(name).cloned()).unwrap_or_default();
        vars.insert(name.clone(), value);
    }
    let from = |k: &str| submitter.get(k).cloned();
    let pbs_origin = [
        ("PBS_O_HOME", from("HOME")),
        ("PBS_O_PATH", from("PATH")),
        ("PBS_O_WORKDIR", Some(origin.workdir.to_string())),
        ("PBS_O_HOST", Some(origin.host.to_string())),
        ("PBS_O_LOGNAME", from("LOGNAME").or_else(|| from("USER"))),
        ("PBS_O_SHELL", from("SHELL")),
        ("PBS_O_QUEUE", Some(origin.queue.to_string())),
        ("PBS_O_LANG", from("LANG")),
        ("PBS_O_MAIL", from("MAIL")),
    ];
    for (name, value) in pbs_origin {
        if let Some(value) = value {
            vars.insert(name.to_string(), value);
        }
    }
    vars.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submitter() -> BTreeMap<String, String> {
        [
            ("HOME", "/home/alice"),
            ("USER", "alice"),
            ("PATH", "/opt/sw/bin:/usr/bin"),
            ("SECRET", "s3cret"),
            ("EDITOR", "vi"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    const ORIGIN: Origin<'static> =
        Origin { workdir: "/home/alice/work", host: "login1", queue: DEFAULT_QUEUE };

    #[test]
    fn a_clean_environment_keeps_only_a_few_variables_and_says_where_the_job_came_from() {
        let named = [("EDITOR".to_string(), None), ("MODE".to_string(), Some("fast".to_string()))];
        let env: BTreeMap<_, _> = job_env(&submitter(), false, &named, ORIGIN).into_iter().collect();
        assert_eq!(env["PATH"], CLEAN_PATH);
        assert_eq!(env["HOME"], "/home/alice");
        assert!(!env.contains_key("SECRET"));
        assert_eq!((env["EDITOR"].as_str(), env["MODE"].as_str()), ("vi", "fast"));
        assert_eq!(env["PBS_O_PATH"], "/opt/sw/bin:/usr/bin");
        assert_eq!(env["PBS_O_WORKDIR"], "/home/alice/work");
        assert_eq!(env["PBS_O_HOST"], "login1");
        assert_eq!(env["PBS_O_LOGNAME"], "alice", "USER stands in for a missing LOGNAME");
        assert_eq!(env["PBS_O_QUEUE"], "workq");
        assert!(!env.contains_key("PBS_O_MAIL"), "the submitter has no MAIL");
    }

    #[test]
    fn export_all_keeps_everything_and_a_named_variable_the_submitter_lacks_is_empty() {
        let named = [("MISSING".to_string(), None)];
        let env: BTreeMap<_, _> = job_env(&submitter(), true, &named, ORIGIN).into_iter().collect();
        assert_eq!(env["SECRET"], "s3cret");
        assert_eq!(env["PATH"], "/opt/sw/bin:/usr/bin");
        assert_eq!(env["MISSING"], "");
    }
}
