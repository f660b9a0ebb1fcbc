//! Job identifiers as users write them and as the wire carries them.
//!
//! A job is numbered by its sequence number `seq`. Its PBS-style id is
//! `<seq>.<server>`; an array is `<seq>[].<server>` and its task `i` is
//! `<seq>[i].<server>`. [`JobRef`] parses any of these, with or without the
//! server suffix; [`TaskId`] names one runnable unit (a job, or one array task).

use std::fmt;

use serde::{Deserialize, Serialize};

/// One runnable unit: a plain job (`index == None`) or one task of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId {
    /// Sequence number of the job or array.
    pub seq: u64,
    /// Array index, for array tasks.
    pub index: Option<u32>,
}

impl TaskId {
    /// The PBS-style id of this unit on `server`: `12.srv` or `12[3].srv`.
    pub fn display_with(&self, server: &str) -> String {
        match self.index {
            None => format!("{}.{server}", self.seq),
            Some(i) => format!("{}[{i}].{server}", self.seq),
        }
    }
}

/// What a user's job id refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobRef {
    /// `12` or `12.server`: a plain job, or an array as a whole when written without brackets.
    Job(u64),
    /// `12[]`: an array as a whole.
    Array(u64),
    /// `12[3]`: one task of an array.
    Task(u64, u32),
}

impl JobRef {
    /// The sequence number referred to.
    pub fn seq(&self) -> u64 {
        match *self {
            JobRef::Job(s) | JobRef::Array(s) | JobRef::Task(s, _) => s,
        }
    }
}

/// Why a job id could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a job id (expected N, N.server, N[] or N[i])")]
pub struct ParseJobRefError(pub String);

impl std::str::FromStr for JobRef {
    type Err = ParseJobRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseJobRefError(s.to_string());
        let s = s.trim();
        // The server suffix starts at the first '.' after any bracket.
        let head_end = match s.find(']') {
            Some(close) => close + 1,
            None => s.find('.').unwrap_or(s.len()),
        };
        let (head, rest) = s.split_at(head_end);
        if !(rest.is_empty() || (rest.starts_with('.') && rest.len() > 1)) {
            return Err(err());
        }
        let parse_seq = |t: &str| -> Result<u64, ParseJobRefError> {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            t.parse().map_err(|_| err())
        };
        match head.find('[') {
            None => Ok(JobRef::Job(parse_seq(head)?)),
            Some(open) => {
                let seq = parse_seq(&head[..open])?;
                let inner = head[open + 1..].strip_suffix(']').ok_or_else(err)?;
                if inner.is_empty() {
                    Ok(JobRef::Array(seq))
                } else if inner.bytes().all(|b| b.is_ascii_digit()) {
                    Ok(JobRef::Task(seq, inner.parse().map_err(|_| err())?))
                } else {
                    Err(err())
                }
            }
        }
    }
}

impl fmt::Display for JobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobRef::Job(s) => write!(f, "{s}"),
            JobRef::Array(s) => write!(f, "{s}[]"),
            JobRef::Task(s, i) => write!(f, "{s}[{i}]"),
        }
    }
}

/// An inclusive range of array indices with a step: `1-100:2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRange {
    /// First index.
    pub start: u32,
    /// Last index (inclusive); `end >= start`.
    pub end: u32,
    /// Step, at least 1.
    pub step: u32,
}

impl IndexRange {
    /// Number of indices in the range.
    pub fn len(&self) -> u64 {
        u64::from((self.end - self.start) / self.step) + 1
    }

    /// Always false: a range holds at least its start.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `i` belongs to the range.
    pub fn contains(&self, i: u32) -> bool {
        i >= self.start && i <= self.end && (i - self.start).is_multiple_of(self.step)
    }
}

/// The indices of a job array: a union of ranges, held compactly however many
/// tasks it names. Ranges are sorted by start and do not overlap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayIndices {
    ranges: Vec<IndexRange>,
}

/// Why an array specification is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid array range '{spec}': {reason}")]
pub struct ArraySpecError {
    /// The text given.
    pub spec: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ArrayIndices {
    /// Parses `1-100`, `1-100:2`, `1,3,5`, `0-9,20-29:3` (PBS `-J` and Torque `-t`).
    pub fn parse(spec: &str) -> Result<Self, ArraySpecError> {
        let fail = |reason: &str| ArraySpecError { spec: spec.to_string(), reason: reason.to_string() };
        let num = |t: &str| -> Result<u32, ArraySpecError> {
            let t = t.trim();
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(fail(&format!("'{t}' is not a non-negative integer")));
            }
            t.parse().map_err(|_| fail(&format!("'{t}' is too large")))
        };
        let mut ranges = Vec::new();
        for part in spec.split(',') {
            let (span, step) = match part.split_once(':') {
                Some((span, step)) => (span, num(step)?),
                None => (part, 1),
            };
            if step == 0 {
                return Err(fail("step must be at least 1"));
            }
            let (start, end) = match span.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => {
                    let n = num(span)?;
                    (n, n)
                }
            };
            if end < start {
                return Err(fail(&format!("range {start}-{end} runs backwards")));
            }
            // Normalise the end onto the step so `len` and `contains` agree.
            let end = start + (end - start) / step * step;
            ranges.push(IndexRange { start, end, step });
        }
        ranges.sort_by_key(|r| r.start);
        for pair in ranges.windows(2) {
            if pair[1].start <= pair[0].end {
                return Err(fail("ranges overlap"));
            }
        }
        Ok(Self { ranges })
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> &[IndexRange] {
        &self.ranges
    }

    /// Total number of indices.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(IndexRange::len).sum()
    }

    /// Whether the array has no index (never true for a parsed spec).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether `i` is one of the indices.
    pub fn contains(&self, i: u32) -> bool {
        self.ranges.iter().any(|r| r.contains(i))
    }

    /// All indices in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|r| (r.start..=r.end).step_by(r.step as usize))
    }
}

impl fmt::Display for ArrayIndices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, r) in self.ranges.iter().enumerate() {
            if k > 0 {
                f.write_str(",")?;
            }
            if r.start == r.end {
                write!(f, "{}", r.start)?;
            } else if r.step == 1 {
                write!(f, "{}-{}", r.start, r.end)?;
            } else {
                write!(f, "{}-{}:{}", r.start, r.end, r.step)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_job_id_form() {
        assert_eq!("12".parse(), Ok(JobRef::Job(12)));
        assert_eq!("12.head".parse(), Ok(JobRef::Job(12)));
        assert_eq!("12.head.example.org".parse(), Ok(JobRef::Job(12)));
        assert_eq!("12[]".parse(), Ok(JobRef::Array(12)));
        assert_eq!("12[].head".parse(), Ok(JobRef::Array(12)));
        assert_eq!("12[7].head".parse(), Ok(JobRef::Task(12, 7)));
        for bad in ["", "x", "12.", "12[", "12[x]", "12]", "-1", "12[1]x", "[3]"] {
            assert!(bad.parse::<JobRef>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn array_specs() {
        let a = ArrayIndices::parse("1-100").unwrap();
        assert_eq!(a.len(), 100);
        let b = ArrayIndices::parse("1-100:2").unwrap();
        assert_eq!(b.len(), 50);
        assert!(b.contains(99) && !b.contains(100));
        assert_eq!(b.to_string(), "1-99:2");
        let c = ArrayIndices::parse("5,1,3").unwrap();
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![1, 3, 5]);
        assert_eq!(ArrayIndices::parse("0-9").unwrap().iter().count(), 10);
        let huge = ArrayIndices::parse("1-1000000").unwrap();
        assert_eq!(huge.len(), 1_000_000);
        for bad in ["", "a-b", "5-1", "1-10:0", "1-5,3-8", "1--2"] {
            assert!(ArrayIndices::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn task_display() {
        assert_eq!(TaskId { seq: 3, index: None }.display_with("h"), "3.h");
        assert_eq!(TaskId { seq: 3, index: Some(4) }.display_with("h"), "3[4].h");
    }
}
