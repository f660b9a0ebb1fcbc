//! Finding the `#PBS` directives of a job script.
//!
//! PBS reads directives from the top of the script until the first executable
//! line: a `#!` first line, blank lines and other comment lines are skipped; a
//! line whose first word is the prefix (`#PBS`, or `qsub -C`'s, or
//! `$PBS_DPREFIX`) is a directive; any other line ends the scan. The rest of a
//! directive line is split into words the way a shell would (quotes, and a
//! word starting with `#` begins a comment) with the `shlex` crate, then parsed
//! as qsub options by the caller.

/// One directive line, split into words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Directive {
    /// 1-based line number in the script.
    pub(crate) line: usize,
    /// The words after the prefix.
    pub(crate) words: Vec<String>,
}

/// A directive line that cannot be split into words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unbalanced quotes in directive '{text}'")]
pub(crate) struct DirectiveError {
    /// 1-based line number in the script.
    pub(crate) line: usize,
    /// The directive text after the prefix.
    pub(crate) text: String,
}

/// The directive prefix PBS uses when neither `-C` nor `$PBS_DPREFIX` says otherwise.
pub(crate) const DEFAULT_PREFIX: &str = "#PBS";

/// Returns the directives at the top of `script`. An empty `prefix` disables them.
pub(crate) fn scan(script: &str, prefix: &str) -> Result<Vec<Directive>, DirectiveError> {
    let mut found = Vec::new();
    for (i, raw) in script.lines().enumerate() {
        let line = i + 1;
        // Scripts edited on Windows end lines with CR LF.
        let text = raw.strip_suffix('\r').unwrap_or(raw).trim_start();
        if line == 1 && text.starts_with("#!") {
            continue;
        }
        if text.is_empty() {
            continue;
        }
        if !prefix.is_empty() {
            if let Some(rest) = text.strip_prefix(prefix) {
                // `#PBS -N x` is a directive, `#PBSX` a comment.
                if rest.is_empty() || rest.starts_with(char::is_whitespace) {
                    let words = shlex::split(rest)
                        .ok_or_else(|| DirectiveError { line, text: rest.trim().to_string() })?;
                    if !words.is_empty() {
                        found.push(Directive { line, words });
                    }
                    continue;
                }
            }
        }
        if text.starts_with('#') {
            continue;
        }
        break;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(d: &Directive) -> Vec<&str> {
        d.words.iter().map(String::as_str).collect()
    }

    #[test]
    fn reads_until_first_command() {
        let script = "#!/bin/bash\n\
                      #PBS -N first\n\
                      \n\
                      # a comment\n\
                      #PBS -l walltime=1:00:00,mem=1gb\n\
                      #PBSX -N ignored\n\
                      \t#PBS -q indented\n\
                      echo hello\n\
                      #PBS -N too_late\n";
        let d = scan(script, DEFAULT_PREFIX).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!((d[0].line, words(&d[0])), (2, vec!["-N", "first"]));
        assert_eq!((d[1].line, words(&d[1])), (5, vec!["-l", "walltime=1:00:00,mem=1gb"]));
        assert_eq!((d[2].line, words(&d[2])), (7, vec!["-q", "indented"]));
    }

    #[test]
    fn shell_like_words_and_comments() {
        let d = scan("#PBS -N 'my job' -v \"A=x y\"  # trailing comment\n", "#PBS").unwrap();
        assert_eq!(words(&d[0]), vec!["-N", "my job", "-v", "A=x y"]);
        let e = scan("true\n", "#PBS").unwrap();
        assert!(e.is_empty());
        let err = scan("#!/bin/sh\n#PBS -N ok\n#PBS -N 'open\n", "#PBS").unwrap_err();
        assert_eq!(err.line, 3);
        assert_eq!(err.to_string(), "unbalanced quotes in directive '-N 'open'");
    }

    #[test]
    fn shebang_only_skipped_on_first_line_and_crlf() {
        let d = scan("#PBS -N a\r\n#!not-a-shebang\r\n#PBS -j oe\r\nrun\r\n", "#PBS").unwrap();
        assert_eq!(d.len(), 2, "a later #! line is just a comment");
        assert_eq!(words(&d[1]), vec!["-j", "oe"]);
        assert_eq!(d[1].line, 3);
    }

    #[test]
    fn other_prefixes() {
        let script = "#PBS -N pbs\n#MY -N mine\nrun\n";
        let d = scan(script, "#MY").unwrap();
        assert_eq!(words(&d[0]), vec!["-N", "mine"]);
        assert_eq!(d[0].line, 2);
        assert!(scan(script, "").unwrap().is_empty(), "an empty prefix disables directives");
        assert!(scan("#PBS\n#PBS   \nrun", "#PBS").unwrap().is_empty());
    }
}
