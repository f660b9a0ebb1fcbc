//! Commands that act on job ids one by one: `qdel` and `qrls`, and their
//! `picloud cancel` and `picloud release` twins.
//!
//! Every id is handled on its own, as PBS does: a malformed id is reported and
//! skipped, the others go to the server in one request, and each outcome the
//! server returns is reported. Deleting a job that already finished is a
//! success with nothing to do; releasing a job that is not held too. The exit
//! status is 0 when every id succeeded, else the code of the last failure
//! (PBS Pro's rule): 153 unknown job, 159 not yours, 168 invalid for the job's
//! state, 1 a malformed id.

use std::ffi::OsString;
use std::process::ExitCode;

use picloud_proto::{ClientRequest, JobRef, RefOutcome, ServerReply};

use super::{EXIT_BAD_STATE, EXIT_FAILURE, EXIT_PERMISSION, EXIT_UNKNOWN_JOB, EXIT_USAGE};

/// What to do with the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefAction {
    /// `qdel`: cancel (kill if running).
    Cancel,
    /// `qrls`: release a hold.
    Release,
}

impl RefAction {
    fn pbs_name(self) -> &'static str {
        match self {
            RefAction::Cancel => "qdel",
            RefAction::Release => "qrls",
        }
    }

    fn usage(self) -> &'static str {
        match self {
            RefAction::Cancel => "usage: qdel [-W force|suppress_email=N] [-x] job_identifier...",
            RefAction::Release => "usage: qrls [-h hold_list] job_identifier...",
        }
    }

    fn request(self, jobs: Vec<JobRef>) -> ClientRequest {
        match self {
            RefAction::Cancel => ClientRequest::Cancel(jobs),
            RefAction::Release => ClientRequest::Release(jobs),
        }
    }
}

/// Messages for stderr and the exit status of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Report {
    /// Lines to print on stderr, without the program prefix.
    pub(crate) messages: Vec<String>,
    /// The exit status.
    pub(crate) exit: u8,
}

impl Report {
    fn failure(&mut self, code: u8, message: String) {
        self.messages.push(message);
        self.exit = code;
    }
}

/// Parses ids as typed; a malformed one becomes a message in `report`.
pub(crate) fn parse_ids(ids: &[String], report: &mut Report) -> Vec<(String, JobRef)> {
    let mut good = Vec::new();
    for id in ids {
        match id.parse::<JobRef>() {
            Ok(r) => good.push((id.clone(), r)),
            Err(_) => report.failure(EXIT_FAILURE, format!("illegally formed job identifier: {id}")),
        }
    }
    good
}

/// The text the user typed for `r` (the first match), else `r` written out.
pub(crate) fn as_typed(asked: &[(String, JobRef)], r: &JobRef) -> String {
    asked.iter().find(|(_, sent)| sent == r).map_or_else(|| r.to_string(), |(text, _)| text.clone())
}

/// Adds the server's outcomes to `report`. `asked` are the ids as typed, in the
/// order sent; the server answers one entry per id, in that order.
pub(crate) fn add_outcomes(
    action: RefAction,
    asked: &[(String, JobRef)],
    outcomes: &[(JobRef, RefOutcome)],
    report: &mut Report,
) {
    for (k, (r, outcome)) in outcomes.iter().enumerate() {
        let typed = match asked.get(k) {
            Some((text, sent)) if sent == r => text.clone(),
            _ => as_typed(asked, r),
        };
        match (outcome, action) {
            (RefOutcome::Done | RefOutcome::AlreadyFinished, _) => {}
            // Releasing a job that is not held leaves it as wanted.
            (RefOutcome::NotApplicable, RefAction::Release) => {}
            (RefOutcome::NotApplicable, RefAction::Cancel) => {
                report.failure(EXIT_BAD_STATE, format!("Request invalid for state of job {typed}"));
            }
            (RefOutcome::Unknown, _) => report.failure(EXIT_UNKNOWN_JOB, format!("Unknown Job Id {typed}")),
            // PBS's message has the two spaces.
            (RefOutcome::PermissionDenied, _) => {
                report.failure(EXIT_PERMISSION, format!("Unauthorized Request  {typed}"));
            }
        }
    }
}

/// Runs the action on `ids` and reports each failure as `prog: message`.
pub(crate) fn run(prog: &str, action: RefAction, ids: &[String]) -> ExitCode {
    let mut report = Report::default();
    let asked = parse_ids(ids, &mut report);
    if !asked.is_empty() {
        let reply = super::connect()
            .and_then(|mut client| client.request(&action.request(asked.iter().map(|(_, r)| *r).collect())));
        match reply {
            Ok(ServerReply::Cancelled(outcomes) | ServerReply::Released(outcomes)) => {
                add_outcomes(action, &asked, &outcomes, &mut report);
            }
            Ok(other) => report.failure(EXIT_FAILURE, super::unexpected(&other).to_string()),
            Err(e) => report.failure(EXIT_FAILURE, e.to_string()),
        }
    }
    for m in &report.messages {
        eprintln!("{prog}: {m}");
    }
    ExitCode::from(report.exit)
}

/// Splits `qdel`/`qrls` arguments into ids, accepting and ignoring PBS's
/// options (`qdel -W force`, `-x`; `qrls -h u`).
fn parse_pbs_args(action: RefAction, args: &[String]) -> Result<Vec<String>, String> {
    let mut ids = Vec::new();
    let mut i = 0;
    let value_option = match action {
        RefAction::Cancel => 'W',
        RefAction::Release => 'h',
    };
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            ids.extend(args[i..].iter().cloned());
            break;
        }
        match a.strip_prefix('-').filter(|o| !o.is_empty()) {
            None => ids.push(a.clone()),
            Some(opt) if opt.starts_with(value_option) => {
                if opt.len() == 1 {
                    args.get(i).ok_or_else(|| format!("option requires an argument -- '{value_option}'"))?;
                    i += 1;
                }
            }
            Some("x") if action == RefAction::Cancel => {}
            Some(opt) => return Err(format!("invalid option -- '{}'", opt.chars().next().unwrap_or('-'))),
        }
    }
    if ids.is_empty() {
        return Err("no job identifier given".into());
    }
    Ok(ids)
}

/// `qdel` or `qrls` with PBS arguments.
pub(crate) fn pbs_main(action: RefAction, args: Vec<OsString>) -> ExitCode {
    let prog = action.pbs_name();
    let parsed = super::utf8_args(args).and_then(|a| parse_pbs_args(action, &a));
    match parsed {
        Ok(ids) => run(prog, action, &ids),
        Err(e) => {
            eprintln!("{prog}: {e}\n{}", action.usage());
            ExitCode::from(EXIT_USAGE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ids_in_every_form() {
        let mut report = Report::default();
        let ids =
            parse_ids(&strings(&["12", "12.head", "13[]", "13[4].head", "x12", "12.", ""]), &mut report);
        assert_eq!(
            ids.iter().map(|(_, r)| *r).collect::<Vec<_>>(),
            vec![JobRef::Job(12), JobRef::Job(12), JobRef::Array(13), JobRef::Task(13, 4)]
        );
        assert_eq!(
            report.messages,
            vec![
                "illegally formed job identifier: x12",
                "illegally formed job identifier: 12.",
                "illegally formed job identifier: ",
            ]
        );
        assert_eq!(report.exit, EXIT_FAILURE);
    }

    #[test]
    fn outcomes_of_a_cancel() {
        let asked = vec![
            ("1.head".to_string(), JobRef::Job(1)),
            ("2".to_string(), JobRef::Job(2)),
            ("3".to_string(), JobRef::Job(3)),
            ("4[]".to_string(), JobRef::Array(4)),
        ];
        let outcomes = vec![
            (JobRef::Job(1), RefOutcome::Done),
            (JobRef::Job(2), RefOutcome::AlreadyFinished),
            (JobRef::Job(3), RefOutcome::PermissionDenied),
            (JobRef::Array(4), RefOutcome::Unknown),
        ];
        let mut report = Report::default();
        add_outcomes(RefAction::Cancel, &asked, &outcomes, &mut report);
        assert_eq!(report.messages, vec!["Unauthorized Request  3", "Unknown Job Id 4[]"]);
        assert_eq!(report.exit, EXIT_UNKNOWN_JOB, "the last failure decides");

        let mut ok = Report::default();
        add_outcomes(RefAction::Cancel, &asked[..2], &outcomes[..2], &mut ok);
        assert_eq!(ok, Report::default(), "deleting a finished job is a success");
    }

    #[test]
    fn outcomes_of_a_release() {
        let asked = vec![("5".to_string(), JobRef::Job(5)), ("6".to_string(), JobRef::Job(6))];
        let mut report = Report::default();
        add_outcomes(
            RefAction::Release,
            &asked,
            &[(JobRef::Job(5), RefOutcome::NotApplicable), (JobRef::Job(6), RefOutcome::Done)],
            &mut report,
        );
        assert_eq!(report, Report::default());
        let mut cancel = Report::default();
        add_outcomes(
            RefAction::Cancel,
            &asked[..1],
            &[(JobRef::Job(5), RefOutcome::NotApplicable)],
            &mut cancel,
        );
        assert_eq!(cancel.messages, vec!["Request invalid for state of job 5"]);
        assert_eq!(cancel.exit, EXIT_BAD_STATE);
        // Outcomes out of order still name the id as typed.
        let mut swapped = Report::default();
        add_outcomes(RefAction::Release, &asked, &[(JobRef::Job(6), RefOutcome::Unknown)], &mut swapped);
        assert_eq!(swapped.messages, vec!["Unknown Job Id 6"]);
    }

    #[test]
    fn pbs_options_are_accepted() {
        let a = |v: &[&str], action| parse_pbs_args(action, &strings(v));
        assert_eq!(a(&["-W", "force", "1", "2"], RefAction::Cancel), Ok(strings(&["1", "2"])));
        assert_eq!(a(&["-Wforce", "-x", "3"], RefAction::Cancel), Ok(strings(&["3"])));
        assert_eq!(a(&["-h", "u", "4"], RefAction::Release), Ok(strings(&["4"])));
        assert_eq!(a(&["--", "-5"], RefAction::Release), Ok(strings(&["-5"])));
        assert_eq!(a(&[], RefAction::Cancel), Err("no job identifier given".into()));
        assert_eq!(a(&["-q", "1"], RefAction::Cancel), Err("invalid option -- 'q'".into()));
        assert_eq!(a(&["-x", "1"], RefAction::Release), Err("invalid option -- 'x'".into()));
        assert_eq!(a(&["1", "-W"], RefAction::Cancel), Err("option requires an argument -- 'W'".into()));
    }
}
