//! POSIX-style option words as PBS commands read them, shared by qsub and
//! qstat: clustered flags (`-hV`), values attached or in the next word
//! (`-Nname`, `-N name`), `--` ending the options, and operands anywhere.
//!
//! [`Getopt`] yields the words one by one; what each option means is the
//! caller's business, as is what follows `--` ([`Word::Rest`]).

/// One item of a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Word<'a> {
    /// An option without a value.
    Flag(char),
    /// An option and its value.
    Value(char, &'a str),
    /// A word that is no option.
    Operand(&'a str),
    /// Everything after `--` (possibly nothing); always the last item.
    Rest(&'a [String]),
}

/// A word that is not a valid option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum GetoptError {
    /// An option letter the command does not know.
    #[error("invalid option -- '{0}'")]
    Unknown(char),
    /// A `--word` option (PBS commands have none).
    #[error("unrecognized option '{0}'")]
    UnknownLong(String),
    /// An option that needs a value came last.
    #[error("option requires an argument -- '{0}'")]
    MissingArgument(char),
}

/// Whether an option letter is a flag (`Some(false)`), takes a value
/// (`Some(true)`), or is unknown (`None`).
pub(crate) type Arity = fn(char) -> Option<bool>;

/// The items of `words`, in order.
pub(crate) struct Getopt<'a> {
    words: &'a [String],
    next: usize,
    /// The rest of a flag cluster being read (`-hV` after `h`).
    cluster: &'a str,
    arity: Arity,
}

impl<'a> Getopt<'a> {
    /// Reads `words` (without the program name) with `arity` telling options apart.
    pub(crate) fn new(words: &'a [String], arity: Arity) -> Self {
        Getopt { words, next: 0, cluster: "", arity }
    }

    fn option(&mut self, cluster: &'a str) -> Result<Word<'a>, GetoptError> {
        let option = cluster.chars().next().expect("a non-empty cluster");
        let after = &cluster[option.len_utf8()..];
        match (self.arity)(option) {
            None => Err(GetoptError::Unknown(option)),
            Some(false) => {
                self.cluster = after;
                Ok(Word::Flag(option))
            }
            Some(true) if !after.is_empty() => Ok(Word::Value(option, after)),
            Some(true) => {
                let value = self.words.get(self.next).ok_or(GetoptError::MissingArgument(option))?;
                self.next += 1;
                Ok(Word::Value(option, value))
            }
        }
    }
}

impl<'a> Iterator for Getopt<'a> {
    type Item = Result<Word<'a>, GetoptError>;

    fn next(&mut self) -> Option<Self::Item> {
        if !self.cluster.is_empty() {
            let cluster = std::mem::take(&mut self.cluster);
            return Some(self.option(cluster));
        }
        let words = self.words;
        let word = words.get(self.next)?;
        self.next += 1;
        if word == "--" {
            let rest = &words[self.next..];
            self.next = words.len();
            return Some(Ok(Word::Rest(rest)));
        }
        Some(match word.strip_prefix('-').filter(|c| !c.is_empty()) {
            None => Ok(Word::Operand(word)),
            Some(c) if c.starts_with('-') => Err(GetoptError::UnknownLong(word.clone())),
            Some(cluster) => self.option(cluster),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arity(c: char) -> Option<bool> {
        match c {
            'a' | 'b' => Some(false),
            'N' => Some(true),
            _ => None,
        }
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn clusters_values_operands_and_rest() {
        let w = words("-ab -Nx op -N y -- cmd -a");
        let items: Vec<_> = Getopt::new(&w, arity).collect::<Result<_, _>>().unwrap();
        let rest = [String::from("cmd"), String::from("-a")];
        assert_eq!(
            items,
            vec![
                Word::Flag('a'),
                Word::Flag('b'),
                Word::Value('N', "x"),
                Word::Operand("op"),
                Word::Value('N', "y"),
                Word::Rest(&rest),
            ]
        );
        let w = words("-bN z");
        let items: Vec<_> = Getopt::new(&w, arity).collect::<Result<_, _>>().unwrap();
        assert_eq!(items, vec![Word::Flag('b'), Word::Value('N', "z")]);
    }

    #[test]
    fn errors() {
        let first = |s: &str| Getopt::new(&words(s), arity).find_map(Result::err);
        assert_eq!(first("-az"), Some(GetoptError::Unknown('z')));
        assert_eq!(first("--all"), Some(GetoptError::UnknownLong("--all".into())));
        assert_eq!(first("-a -N"), Some(GetoptError::MissingArgument('N')));
        assert_eq!(first("- -a"), None, "a lone dash is an operand");
    }
}
