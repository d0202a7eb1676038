//! Erlang node names: `Name@Host`, as registered (`Name`) and as dialled
//! (`Host`). A leaf module: every other module that needs the parts of a
//! node name asks this one instead of splitting strings itself.

/// A node name is an atom: at most 255 characters.
pub const MAX_NAME_CHARS: usize = 255;

/// Why a node name was refused (the rules of `epmd_srv.c`).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name has {chars} characters, more than {max}", max = MAX_NAME_CHARS)]
    TooLong { chars: usize },
    #[error("name contains a NUL byte")]
    NulByte,
    #[error("name is not valid UTF-8")]
    NotUtf8,
}

/// Checks a node name as `epmd` does: not empty, no NUL, valid UTF-8
/// (Rust's check refuses the same overlong forms and surrogates as
/// `verify_utf8`), at most [`MAX_NAME_CHARS`] characters.
pub fn validate_name(bytes: &[u8]) -> Result<&str, NameError> {
    if bytes.is_empty() {
        return Err(NameError::Empty);
    }
    if bytes.contains(&0) {
        return Err(NameError::NulByte);
    }
    let name = std::str::from_utf8(bytes).map_err(|_| NameError::NotUtf8)?;
    let chars = name.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(NameError::TooLong { chars });
    }
    Ok(name)
}

/// A full node name split at its first `@`; both parts are non-empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeName {
    /// The name registered in EPMD (`a1` of `a1@pod-a`).
    pub short: String,
    /// The host part, resolved to reach the node's pod.
    pub host: String,
}

/// Why a string is not a full node name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a node name of the form Name@Host")]
pub struct NodeNameError(pub String);

impl NodeName {
    /// Parses `Name@Host`; both parts must be non-empty.
    pub fn parse(full: &str) -> Result<NodeName, NodeNameError> {
        match full.split_once('@') {
            Some((short, host)) if !short.is_empty() && !host.is_empty() => Ok(NodeName {
                short: short.to_owned(),
                host: host.to_owned(),
            }),
            _ => Err(NodeNameError(full.to_owned())),
        }
    }
}

impl std::fmt::Display for NodeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.short, self.host)
    }
}

/// The registered name of a full node name (`a1@host` -> `a1`); a name
/// without `@` is returned whole.
pub fn short_name(full: &str) -> &str {
    full.split_once('@').map_or(full, |(n, _)| n)
}

/// The host part of `Name@Host`, if it is non-empty.
pub fn host_of(full: &str) -> Option<&str> {
    full.split_once('@')
        .map(|(_, host)| host)
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_names_only() {
        let n = NodeName::parse("b1@pod-b.dp.test").unwrap();
        assert_eq!((n.short.as_str(), n.host.as_str()), ("b1", "pod-b.dp.test"));
        assert_eq!(n.to_string(), "b1@pod-b.dp.test");
        for bad in ["b1", "@h", "b1@", ""] {
            assert!(NodeName::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(host_of("@h"), Some("h"));
        assert!(host_of("b1@").is_none());
        assert_eq!(host_of("a@b@c"), Some("b@c"));
    }

    #[test]
    fn short_names() {
        assert_eq!(short_name("a1@pod-a.example"), "a1");
        assert_eq!(short_name("plain"), "plain");
    }
}
