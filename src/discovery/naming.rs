//! How node names are formed: this pod's host part (`discovery.host`, with
//! `${VAR}` taken from the environment, e.g. `POD_IP` from the Kubernetes
//! downward API) and the host part of pods without distproxy
//! (`discovery.host_template`, filled in from the pod's address).
//!
//! Pure functions; the environment is passed in, so tests need none.

use std::net::IpAddr;

/// Why a host or host template is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamingError {
    #[error("unterminated `${{` in {0:?}")]
    Unterminated(String),
    #[error("empty or invalid variable name in `${{{0}}}`")]
    BadVariable(String),
    #[error("environment variable {0} is not set (or empty)")]
    Unset(String),
    #[error("unknown placeholder {{{0}}}; use {{ip}} or {{ip_dashed}}")]
    UnknownPlaceholder(String),
    #[error("unmatched brace in {0:?}")]
    UnmatchedBrace(String),
    #[error("{0:?} is not a usable host part: {1}")]
    BadHost(String, &'static str),
}

/// Replaces each `${VAR}` with the variable's value from `env`; `$$` is a
/// literal `$`. An unset or empty variable is an error: a node name with an
/// empty host part would name no pod.
pub fn expand_env(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<String, NamingError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find('}')
                .ok_or_else(|| NamingError::Unterminated(text.to_string()))?;
            let var = &tail[..end];
            if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(NamingError::BadVariable(var.to_string()));
            }
            match env(var) {
                Some(v) if !v.is_empty() => out.push_str(&v),
                _ => return Err(NamingError::Unset(var.to_string())),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks the syntax of `${VAR}` references without an environment (for
/// `check-config`, which may run where the variables are not set).
pub fn check_env_syntax(text: &str) -> Result<(), NamingError> {
    match expand_env(text, |_| Some("x".into())) {
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Checks a host part (after expansion): what may follow the `@` of a node
/// name that other pods resolve.
pub fn check_host(host: &str) -> Result<(), NamingError> {
    let bad = |why| Err(NamingError::BadHost(host.to_string(), why));
    if host.is_empty() {
        return bad("empty");
    }
    if host.len() > 253 {
        return bad("longer than 253 characters");
    }
    if host
        .chars()
        .any(|c| c == '@' || c.is_whitespace() || c.is_control())
    {
        return bad("contains `@`, white space or a control character");
    }
    Ok(())
}

/// A host template: text with `{ip}` (`10.1.2.3`, or `fd00::5` for IPv6)
/// and `{ip_dashed}` (`10-1-2-3`, `fd00--5`: the form of Kubernetes pod DNS
/// names, `10-1-2-3.ns.pod.cluster.local`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Ip,
    IpDashed,
}

impl HostTemplate {
    /// Parses a template; it must use the address at least once.
    pub fn parse(text: &str) -> Result<HostTemplate, NamingError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(i) if rest.as_bytes().get(i) == Some(&b'{') => {
                    if i > 0 {
                        parts.push(Part::Text(rest[..i].to_string()));
                    }
                    let tail = &rest[i + 1..];
                    let end = tail
                        .find('}')
                        .ok_or_else(|| NamingError::UnmatchedBrace(text.to_string()))?;
                    parts.push(match &tail[..end] {
                        "ip" => Part::Ip,
                        "ip_dashed" => Part::IpDashed,
                        other => return Err(NamingError::UnknownPlaceholder(other.to_string())),
                    });
                    rest = &tail[end + 1..];
                }
                Some(_) => return Err(NamingError::UnmatchedBrace(text.to_string())),
                None => {
                    parts.push(Part::Text(rest.to_string()));
                    rest = "";
                }
            }
        }
        if !parts.iter().any(|p| matches!(p, Part::Ip | Part::IpDashed)) {
            return Err(NamingError::BadHost(
                text.to_string(),
                "a host template must contain {ip} or {ip_dashed}",
            ));
        }
        let template = HostTemplate { parts };
        check_host(&template.render("198.18.0.1".parse().expect("literal")))?;
        Ok(template)
    }

    /// The host part of the pod at `ip`.
    pub fn render(&self, ip: IpAddr) -> String {
        let ip = ip.to_canonical();
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Ip => out.push_str(&ip.to_string()),
                Part::IpDashed => out.push_str(&ip.to_string().replace(['.', ':'], "-")),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(var: &str) -> Option<String> {
        match var {
            "POD_IP" => Some("10.1.2.3".into()),
            "POD_NAME" => Some("myapp-0".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn env_expansion() {
        assert_eq!(expand_env("${POD_IP}", env).unwrap(), "10.1.2.3");
        assert_eq!(
            expand_env("${POD_NAME}.myapp-headless.ns.svc", env).unwrap(),
            "myapp-0.myapp-headless.ns.svc"
        );
        assert_eq!(expand_env("plain.host", env).unwrap(), "plain.host");
        assert_eq!(expand_env("a$$b$c", env).unwrap(), "a$b$c");
        assert_eq!(
            expand_env("${NOPE}", env),
            Err(NamingError::Unset("NOPE".into()))
        );
        assert_eq!(
            expand_env("${EMPTY}", env),
            Err(NamingError::Unset("EMPTY".into()))
        );
        assert_eq!(
            expand_env("${POD_IP", env),
            Err(NamingError::Unterminated("${POD_IP".into()))
        );
        assert_eq!(
            expand_env("${A-B}", env),
            Err(NamingError::BadVariable("A-B".into()))
        );
        assert!(check_env_syntax("${ANYTHING}.x").is_ok());
        assert!(check_env_syntax("${}").is_err());
    }

    #[test]
    fn hosts() {
        assert!(check_host("pod-a.dp.test").is_ok());
        assert!(check_host("10.1.2.3").is_ok());
        assert!(check_host("").is_err());
        assert!(check_host("a@b").is_err());
        assert!(check_host("a b").is_err());
        assert!(check_host(&"a".repeat(254)).is_err());
    }

    #[test]
    fn templates() {
        let ip4: IpAddr = "10.1.2.3".parse().unwrap();
        let ip6: IpAddr = "fd00::5".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        let t = HostTemplate::parse("{ip}").unwrap();
        assert_eq!(t.render(ip4), "10.1.2.3");
        assert_eq!(t.render(mapped), "10.1.2.3");
        assert_eq!(t.render(ip6), "fd00::5");
        let t = HostTemplate::parse("{ip_dashed}.ns.pod.cluster.local").unwrap();
        assert_eq!(t.render(ip4), "10-1-2-3.ns.pod.cluster.local");
        assert_eq!(t.render(ip6), "fd00--5.ns.pod.cluster.local");
        let t = HostTemplate::parse("h-{ip_dashed}-{ip}").unwrap();
        assert_eq!(t.render(ip4), "h-10-1-2-3-10.1.2.3");
        for bad in ["", "static.host", "{ip", "ip}", "{pod}", "{ip} x", "a@{ip}"] {
            assert!(HostTemplate::parse(bad).is_err(), "{bad:?}");
        }
    }
}
