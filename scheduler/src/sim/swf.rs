//! A parser for the Standard Workload Format (SWF) of the Parallel Workloads
//! Archive (Feitelson et al., "Experience with using the Parallel Workloads
//! Archive", JPDC 2014; format at <https://www.cs.huji.ac.il/labs/parallel/workload/swf.html>).
//!
//! One job per line, 18 whitespace-separated numeric fields; `-1` means
//! unknown; lines starting with `;` are header comments and blank lines are
//! ignored. The first malformed line stops the parse with an [`SwfError`]
//! naming the line and the problem.

use std::fmt;

/// Names of the 18 fields, for error messages (index 0 is field 1).
pub const FIELD_NAMES: [&str; 18] = [
    "job number",
    "submit time",
    "wait time",
    "run time",
    "allocated processors",
    "average CPU time",
    "used memory",
    "requested processors",
    "requested time",
    "requested memory",
    "status",
    "user id",
    "group id",
    "executable number",
    "queue number",
    "partition number",
    "preceding job number",
    "think time",
];

/// Fields that may hold a fraction (times and memory); the others must be
/// integers. 1-based field numbers.
const FRACTIONAL_FIELDS: [usize; 8] = [2, 3, 4, 6, 7, 9, 10, 18];

/// One job of a trace. Times are in seconds; `-1` (or `-1.0`) is unknown.
#[derive(Debug, Clone, PartialEq)]
pub struct SwfJob {
    /// 1-based line number in the file.
    pub line: usize,
    /// Field 1: job number.
    pub id: i64,
    /// Field 2: submit time.
    pub submit: f64,
    /// Field 3: wait time in the original system.
    pub wait: f64,
    /// Field 4: run time.
    pub run: f64,
    /// Field 5: allocated processors.
    pub allocated_procs: i64,
    /// Field 6: average CPU time used.
    pub avg_cpu: f64,
    /// Field 7: used memory (KB per processor).
    pub used_mem: f64,
    /// Field 8: requested processors.
    pub requested_procs: i64,
    /// Field 9: requested time (the user's runtime estimate).
    pub requested_time: f64,
    /// Field 10: requested memory (KB per processor).
    pub requested_mem: f64,
    /// Field 11: status (1 completed, 0 failed, 5 cancelled, ...).
    pub status: i64,
    /// Field 12: user id.
    pub user: i64,
    /// Field 13: group id.
    pub group: i64,
    /// Field 14: executable (application) number.
    pub executable: i64,
    /// Field 15: queue number.
    pub queue: i64,
    /// Field 16: partition number.
    pub partition: i64,
    /// Field 17: preceding job number.
    pub preceding_job: i64,
    /// Field 18: think time from the preceding job.
    pub think_time: f64,
}

impl SwfJob {
    /// Processors the job asked for: field 8, else field 5; `None` if both
    /// are unknown or not positive.
    pub fn processors(&self) -> Option<u64> {
        [self.requested_procs, self.allocated_procs].into_iter().find(|&p| p > 0).map(|p| p as u64)
    }
}

/// What is wrong with a line.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SwfProblem {
    /// Not 18 fields.
    FieldCount {
        /// Fields found.
        found: usize,
    },
    /// A field that is not a number.
    NotANumber {
        /// 1-based field number.
        field: usize,
        /// The text found.
        text: String,
    },
    /// A fraction in a field that counts things.
    NotAnInteger {
        /// 1-based field number.
        field: usize,
        /// The text found.
        text: String,
    },
    /// A negative value other than -1 (unknown), or an unknown submit time.
    OutOfRange {
        /// 1-based field number.
        field: usize,
        /// The value found.
        value: f64,
    },
}

impl fmt::Display for SwfProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |field: usize| FIELD_NAMES[field - 1];
        match self {
            SwfProblem::FieldCount { found } => write!(f, "expected 18 fields, found {found}"),
            SwfProblem::NotANumber { field, text } => {
                write!(f, "field {field} ({}) is '{text}', not a number", name(*field))
            }
            SwfProblem::NotAnInteger { field, text } => {
                write!(f, "field {field} ({}) is '{text}', not an integer", name(*field))
            }
            SwfProblem::OutOfRange { field: 2, value } => {
                write!(f, "field 2 (submit time) is {value}; it must be known and not negative")
            }
            SwfProblem::OutOfRange { field, value } => write!(
                f,
                "field {field} ({}) is {value}; values must be non-negative or -1 (unknown)",
                name(*field)
            ),
        }
    }
}

/// A malformed line in an SWF trace.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct SwfError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub problem: SwfProblem,
}

/// Parses a whole trace; stops at the first malformed line.
pub fn parse_swf(text: &str) -> Result<Vec<SwfJob>, SwfError> {
    let mut jobs = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with(';') {
            continue;
        }
        jobs.push(parse_line(line, trimmed).map_err(|problem| SwfError { line, problem })?);
    }
    Ok(jobs)
}

fn parse_line(line: usize, text: &str) -> Result<SwfJob, SwfProblem> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() != 18 {
        return Err(SwfProblem::FieldCount { found: words.len() });
    }
    let mut values = [0f64; 18];
    for (i, word) in words.iter().enumerate() {
        let field = i + 1;
        let value: f64 = word
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| SwfProblem::NotANumber { field, text: word.to_string() })?;
        if !FRACTIONAL_FIELDS.contains(&field) && value.fract() != 0.0 {
            return Err(SwfProblem::NotAnInteger { field, text: word.to_string() });
        }
        // Non-negative, or -1 (unknown) except for the submit time.
        let known_or_unknown = value >= 0.0 || value == -1.0 && field != 2;
        if !known_or_unknown {
            return Err(SwfProblem::OutOfRange { field, value });
        }
        values[i] = value;
    }
    let int = |field: usize| values[field - 1] as i64;
    let real = |field: usize| values[field - 1];
    Ok(SwfJob {
        line,
        id: int(1),
        submit: real(2),
        wait: real(3),
        run: real(4),
        allocated_procs: int(5),
        avg_cpu: real(6),
        used_mem: real(7),
        requested_procs: int(8),
        requested_time: real(9),
        requested_mem: real(10),
        status: int(11),
        user: int(12),
        group: int(13),
        executable: int(14),
        queue: int(15),
        partition: int(16),
        preceding_job: int(17),
        think_time: real(18),
    })
}
