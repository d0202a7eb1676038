//! Glob patterns of the `[[acl]]` rules (pure, a leaf: `config` validates
//! with it).
//!
//! `*` matches any run of characters (also none, also `.` and `@`), `?`
//! exactly one character; every other character matches itself. Node names
//! compare exactly (they are Erlang atoms); certificate names compare ASCII
//! case-insensitively (DNS names are).

use std::fmt;

/// The longest pattern accepted (a node name is at most 255 characters).
pub const MAX_PATTERN_LEN: usize = 255;

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("pattern is empty (use \"*\" for any)")]
    Empty,
    #[error("pattern is longer than {MAX_PATTERN_LEN} characters")]
    TooLong,
    #[error("pattern contains {0:?}: whitespace and control characters never occur in names")]
    BadChar(char),
}

/// A compiled glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    chars: Vec<char>,
}

impl Pattern {
    /// Parses `text`: not empty, at most [`MAX_PATTERN_LEN`] characters, no
    /// whitespace or control characters.
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.chars().count() > MAX_PATTERN_LEN {
            return Err(PatternError::TooLong);
        }
        if let Some(c) = text.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(PatternError::BadChar(c));
        }
        Ok(Pattern {
            text: text.to_owned(),
            chars: text.chars().collect(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern is `*` (matches everything).
    pub fn is_any(&self) -> bool {
        self.chars.iter().all(|&c| c == '*')
    }

    /// Whether `s` matches, character for character.
    pub fn matches(&self, s: &str) -> bool {
        glob(&self.chars, s, false)
    }

    /// Whether `s` matches, ASCII letters compared case-insensitively.
    pub fn matches_ignore_ascii_case(&self, s: &str) -> bool {
        glob(&self.chars, s, true)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Glob match: on bytes when both sides are ASCII (node names nearly
/// always are; no allocation), else on characters.
fn glob(pattern: &[char], s: &str, fold: bool) -> bool {
    if s.is_ascii() && pattern.iter().all(char::is_ascii) {
        return glob_slices(pattern, s.as_bytes(), |pc: &char, b: &u8| {
            let c = *b as char;
            if fold {
                pc.eq_ignore_ascii_case(&c)
            } else {
                *pc == c
            }
        });
    }
    let chars: Vec<char> = s.chars().collect();
    glob_slices(pattern, &chars, |pc: &char, c: &char| {
        if fold {
            pc.eq_ignore_ascii_case(c)
        } else {
            pc == c
        }
    })
}

/// Iterative glob match with one backtrack point (the last `*`): linear in
/// practice, `O(p·s)` at worst, no recursion.
fn glob_slices<T>(pattern: &[char], s: &[T], eq: impl Fn(&char, &T) -> bool) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    // Position after the last `*`, and where in `s` it resumed.
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p + 1, i));
                p += 1;
            }
            Some(c) if *c == '?' || eq(c, &s[i]) => {
                p += 1;
                i += 1;
            }
            _ => match star {
                Some((after, from)) => {
                    p = after;
                    i = from + 1;
                    star = Some((after, from + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        Pattern::parse(p).unwrap().matches(s)
    }

    #[test]
    fn literals_match_exactly() {
        assert!(m("a1", "a1"));
        assert!(!m("a1", "a2"));
        assert!(!m("a1", "a1x"));
        assert!(!m("a1", "a"));
        assert!(!m("A1", "a1"), "node names are case-sensitive");
    }

    #[test]
    fn star_matches_any_run() {
        assert!(m("*", ""));
        assert!(m("*", "anything@at.all"));
        assert!(m("a*", "a"));
        assert!(m("a*", "a12"));
        assert!(!m("a*", "ba"));
        assert!(m("*@pod-a.dp.test", "a1@pod-a.dp.test"));
        assert!(!m("*@pod-a.dp.test", "a1@pod-b.dp.test"));
        assert!(m("remsh-*@*", "remsh-42@ops.example"));
        assert!(!m("remsh-*@*", "remsh-42"));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(m("a*b*c", "abc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("**x", "x"));
        // Backtracking past a partial match.
        assert!(m("*ab", "aab"));
        assert!(m("*aab", "aaab"));
        assert!(!m("*ab", "aba"));
    }

    #[test]
    fn question_mark_is_one_character() {
        assert!(m("a?", "a1"));
        assert!(!m("a?", "a"));
        assert!(!m("a?", "a12"));
        assert!(m("?", "é"), "one character, not one byte");
        assert!(m("a?c*", "aéc-x"), "non-ASCII input: matched by characters");
        assert!(m("a*é", "abcé") && !m("a*é", "abce"));
    }

    #[test]
    fn case_folding_is_ascii_only_and_explicit() {
        let p = Pattern::parse("*.OPS.example").unwrap();
        assert!(p.matches_ignore_ascii_case("laptop.ops.EXAMPLE"));
        assert!(!p.matches("laptop.ops.example"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        assert_eq!(Pattern::parse("a b"), Err(PatternError::BadChar(' ')));
        assert_eq!(Pattern::parse("a\0"), Err(PatternError::BadChar('\0')));
        assert_eq!(Pattern::parse(&"x".repeat(256)), Err(PatternError::TooLong));
        assert!(Pattern::parse(&"x".repeat(255)).is_ok());
    }

    #[test]
    fn any() {
        assert!(Pattern::parse("*").unwrap().is_any());
        assert!(!Pattern::parse("a*").unwrap().is_any());
    }
}
