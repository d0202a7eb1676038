//! Distribution ACLs: who may connect to which local node (`[[acl]]`,
//! `dist.acl_default`; user guide `docs/acl.md`).
//!
//! A connection is judged once, after its initiator and target are known
//! and before the node is contacted: on the distribution port (correlated
//! and single-node routes) and on the tunnel's inbound side (preamble
//! routes, plain or TLS). Rules are tried in order; the first one whose
//! patterns all match decides; no match takes `dist.acl_default`.
//!
//! The rules in force live in an [`AclHandle`]: connections read the current
//! [`Acl`] without locking; a reload (SIGHUP, or the configuration file's
//! content changing, polled every `dist.acl_reload_interval_ms`) swaps in
//! new rules for the connections that arrive next. Established connections
//! were judged when they started and are never dropped by a reload. A file
//! that no longer parses or validates keeps the current rules (logged and
//! counted).

pub mod pattern;

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::warn_throttled;
use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AclAction, Config, ConfigError, ACL_DEFAULT_LABEL};
use crate::metrics as m;
use pattern::Pattern;

/// One compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    label: Arc<str>,
    action: AclAction,
    initiator: Pattern,
    /// Whether `initiator` is matched against the full name (it has `@`).
    initiator_full: bool,
    target: Pattern,
    identity: Option<Pattern>,
}

/// A set of rules and the default: a pure decision function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<Rule>,
    default: AclAction,
    default_label: Arc<str>,
}

/// What a connection is judged on.
#[derive(Debug, Clone, Copy)]
pub struct AclRequest<'a> {
    /// The initiator's node name as it sent it (`name@host`).
    pub initiator: &'a str,
    /// The local node's name (without `@host`).
    pub target: &'a str,
    /// The client certificate's DNS and IP SANs; `None` without TLS.
    pub identity: Option<&'a [String]>,
}

/// The outcome, with the label of the rule that decided (`default` when
/// none matched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub rule: Arc<str>,
}

impl Acl {
    /// Everything allowed, no rules (the behaviour without `[[acl]]`).
    pub fn allow_all() -> Acl {
        Acl {
            rules: Vec::new(),
            default: AclAction::Allow,
            default_label: ACL_DEFAULT_LABEL.into(),
        }
    }

    /// Everything refused (what invalid rules fall back to).
    pub fn deny_all() -> Acl {
        Acl {
            default: AclAction::Deny,
            ..Acl::allow_all()
        }
    }

    /// Compiles the rules of a validated configuration.
    pub fn from_config(config: &Config) -> Result<Acl, ConfigError> {
        let invalid = |key, i: usize, e: pattern::PatternError| ConfigError::Invalid {
            key,
            reason: format!("rule {}: {e}", i + 1),
        };
        let mut rules = Vec::with_capacity(config.acl.len());
        for (i, r) in config.acl.iter().enumerate() {
            rules.push(Rule {
                label: r.label(i).into(),
                action: r.action,
                initiator: Pattern::parse(&r.initiator)
                    .map_err(|e| invalid("acl.initiator", i, e))?,
                initiator_full: r.initiator.contains('@'),
                target: Pattern::parse(&r.target).map_err(|e| invalid("acl.target", i, e))?,
                identity: match &r.identity {
                    // An IP address is compared in the form the SANs are
                    // written in (`IpAddr`'s display: RFC 5952 for IPv6,
                    // the IPv4 form of a mapped address), so any spelling
                    // of it matches (`fd00:d157:0:0::3`, `FD00:D157::3`).
                    Some(p) => Some(
                        Pattern::parse(&canonical_ip(p))
                            .map_err(|e| invalid("acl.identity", i, e))?,
                    ),
                    None => None,
                },
            });
        }
        Ok(Acl {
            rules,
            default: config.dist.acl_default,
            default_label: ACL_DEFAULT_LABEL.into(),
        })
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first matching rule decides; else the default.
    pub fn decide(&self, req: &AclRequest<'_>) -> Decision {
        let short = req.initiator.split('@').next().unwrap_or(req.initiator);
        for rule in &self.rules {
            let initiator = if rule.initiator_full {
                req.initiator
            } else {
                short
            };
            if !rule.initiator.matches(initiator) || !rule.target.matches(req.target) {
                continue;
            }
            if let Some(identity) = &rule.identity {
                let Some(sans) = req.identity else { continue };
                if !sans.iter().any(|s| identity.matches_ignore_ascii_case(s)) {
                    continue;
                }
            }
            return Decision {
                allow: rule.action == AclAction::Allow,
                rule: Arc::clone(&rule.label),
            };
        }
        Decision {
            allow: self.default == AclAction::Allow,
            rule: Arc::clone(&self.default_label),
        }
    }

    /// Judges a connection whose initiator cannot be read (a node's own
    /// TLS distribution, relayed without decrypting it): a rule decides
    /// only if it would decide for every initiator. So a rule for this
    /// target whose initiator pattern is `*` decides; a `deny` rule naming
    /// particular initiators refuses (the hidden initiator may be one of
    /// them); an `allow` rule naming particular initiators is passed over
    /// (it cannot be shown to apply). Identity rules never match (there is
    /// no sidecar certificate); then the default.
    pub fn decide_unknown_initiator(&self, target: &str) -> Decision {
        for rule in &self.rules {
            if !rule.target.matches(target) || rule.identity.is_some() {
                continue;
            }
            let every_initiator = rule.initiator.is_any();
            if every_initiator || rule.action == AclAction::Deny {
                return Decision {
                    allow: rule.action == AclAction::Allow,
                    rule: Arc::clone(&rule.label),
                };
            }
        }
        Decision {
            allow: self.default == AclAction::Allow,
            rule: Arc::clone(&self.default_label),
        }
    }
}

/// Where a connection was judged (the `path` field of the refusal log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclPath {
    /// A raw handshake on the distribution port (correlated or single node).
    Raw,
    /// A tunnel preamble, plain text.
    Preamble,
    /// A tunnel preamble inside mutual TLS.
    Tls,
    /// A node's own TLS distribution (`inet_tls_dist`), not decrypted: the
    /// initiator is unknown.
    BeamTls,
}

impl AclPath {
    fn label(self) -> &'static str {
        match self {
            AclPath::Raw => "raw",
            AclPath::Preamble => "preamble",
            AclPath::Tls => "tls",
            AclPath::BeamTls => "beam_tls",
        }
    }
}

/// The result of a reload.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// New rules are in force.
    Reloaded { rules: usize },
    /// The file's rules are the ones in force.
    Unchanged,
    /// The file cannot be read, parsed or validated; the rules in force stay.
    Failed(ConfigError),
    /// No configuration file to reload from.
    NoSource,
    /// The file changed and was still changing when looked at again; it
    /// is looked at again at the next poll.
    Unsettled,
}

struct Source {
    path: PathBuf,
    /// Digest of the file content last looked at.
    digest: Option<u64>,
    /// The file's configuration when the sidecar started (`None` if it
    /// could not be read then): what a reload compares the rest of the
    /// file with, to say which changes wait for a restart.
    started_with: Option<Config>,
}

/// The rules in force, shared by every service that judges connections.
pub struct AclHandle {
    current: ArcSwap<Acl>,
    source: Mutex<Option<Source>>,
}

impl AclHandle {
    pub fn new(acl: Acl) -> Arc<AclHandle> {
        metrics::gauge!(m::ACL_RULES).set(acl.len() as f64);
        Arc::new(AclHandle {
            current: ArcSwap::from_pointee(acl),
            source: Mutex::new(None),
        })
    }

    /// The rules in force now.
    pub fn current(&self) -> Arc<Acl> {
        self.current.load_full()
    }

    /// Puts `acl` in force for the connections that arrive next.
    pub fn set(&self, acl: Acl) {
        metrics::gauge!(m::ACL_RULES).set(acl.len() as f64);
        self.current.store(Arc::new(acl));
    }

    /// Judges a connection: `true` lets it through. A refusal is logged
    /// with the rule that decided and counted
    /// (`distproxy_acl_denied_total{rule}`); the caller closes the
    /// connection and counts it as `refused_by_policy`.
    pub fn admit(&self, req: &AclRequest<'_>, peer: SocketAddr, path: AclPath) -> bool {
        let decision = self.current.load().decide(req);
        if !decision.allow {
            warn_throttled!(%peer, path = path.label(), initiator = req.initiator, target = req.target,
                identity = ?req.identity, rule = %decision.rule,
                "distribution connection refused by ACL rule; closing");
            metrics::counter!(m::ACL_DENIED, "rule" => decision.rule.to_string()).increment(1);
        }
        decision.allow
    }

    /// Judges a connection whose initiator is unknown (see
    /// [`Acl::decide_unknown_initiator`]); refusals are logged and counted
    /// as by [`AclHandle::admit`].
    pub fn admit_unknown_initiator(&self, target: &str, peer: SocketAddr, path: AclPath) -> bool {
        let decision = self.current.load().decide_unknown_initiator(target);
        if !decision.allow {
            warn_throttled!(%peer, path = path.label(), initiator = "(unknown: encrypted)", target,
                rule = %decision.rule,
                "distribution connection refused by ACL rule; closing");
            metrics::counter!(m::ACL_DENIED, "rule" => decision.rule.to_string()).increment(1);
        }
        decision.allow
    }

    /// Remembers the file the configuration came from: [`AclHandle::reload`]
    /// and [`AclHandle::watch`] read the rules from it.
    pub fn set_source(&self, path: &Path) {
        let bytes = std::fs::read(path).ok();
        let digest = bytes.as_ref().map(|b| digest(b));
        let started_with = bytes.and_then(|b| {
            Config::from_toml(&String::from_utf8_lossy(&b), &path.display().to_string()).ok()
        });
        *lock(&self.source) = Some(Source {
            path: path.to_path_buf(),
            digest,
            started_with,
        });
    }

    /// Re-reads the configuration file and puts its `[[acl]]` rules and
    /// `dist.acl_default` in force (blocking file I/O: one small read).
    /// Other sections are not applied (they need a restart). `why` names
    /// the trigger in the log (`SIGHUP`, `file changed`).
    pub fn reload(&self, why: &str) -> ReloadOutcome {
        let Some(path) = lock(&self.source).as_ref().map(|s| s.path.clone()) else {
            return ReloadOutcome::NoSource;
        };
        self.reload_from(&path, std::fs::read(&path), why)
    }

    /// [`AclHandle::reload`] with the file's contents read already.
    fn reload_from(
        &self,
        path: &Path,
        bytes: std::io::Result<Vec<u8>>,
        why: &str,
    ) -> ReloadOutcome {
        if let Some(source) = lock(&self.source).as_mut() {
            source.digest = bytes.as_ref().ok().map(|b| digest(b));
        }
        let origin = path.display().to_string();
        let parsed = bytes
            .map_err(|source| ConfigError::Read {
                path: origin.clone(),
                source,
            })
            .and_then(|b| Config::from_toml(&String::from_utf8_lossy(&b), &origin))
            .and_then(|c| {
                self.warn_of_changes_needing_restart(&c, &origin, why);
                Acl::from_config(&c)
            });
        match parsed {
            Ok(acl) if *self.current.load_full() == acl => ReloadOutcome::Unchanged,
            // In force and counted before the line that says so: whoever
            // reads the log line (an operator, a test) can connect at once
            // and be judged by the new rules, and finds the reload counted.
            Ok(acl) => {
                let (rules, default) = (acl.len(), acl.default);
                self.set(acl);
                metrics::counter!(m::ACL_RELOADS).increment(1);
                info!(file = %origin, trigger = why, rules, ?default,
                    "ACL rules reloaded; new connections are judged by them, established ones stay");
                ReloadOutcome::Reloaded { rules }
            }
            Err(e) => {
                metrics::counter!(m::ACL_RELOAD_FAILURES).increment(1);
                warn!(file = %origin, trigger = why, error = %e,
                    "cannot reload ACL rules; the rules in force stay");
                ReloadOutcome::Failed(e)
            }
        }
    }

    /// Says which keys of the file changed since the start outside
    /// `[[acl]]` and `dist.acl_default`: they are not applied until a
    /// restart, and an operator who edited one and sent SIGHUP would
    /// otherwise be told only that the ACL rules are unchanged.
    fn warn_of_changes_needing_restart(&self, file: &Config, origin: &str, why: &str) {
        let keys = match lock(&self.source)
            .as_ref()
            .and_then(|s| s.started_with.as_ref())
        {
            Some(started) => started.changes_needing_restart(file),
            None => return,
        };
        if !keys.is_empty() {
            warn!(file = %origin, trigger = why, keys = %keys.join(", "),
                "configuration changed outside [[acl]] and dist.acl_default; not applied until a restart");
        }
    }

    /// Whether the source file's content differs from the last look.
    #[cfg(test)]
    fn source_changed(&self) -> bool {
        let guard = lock(&self.source);
        let Some(source) = guard.as_ref() else {
            return false;
        };
        let now = std::fs::read(&source.path).ok().map(|b| digest(&b));
        now != source.digest
    }

    /// Reloads from the source file if its content changed and then held
    /// still for `settle`. A file rewritten in place (an editor saving
    /// over it, `cp`, `cat >`) is truncated before it is written, and a
    /// look in between reads an empty or cut file: valid TOML with fewer
    /// rules, perhaps none, which would put `acl_default` alone in force.
    /// Two reads `settle` apart must agree; a file still changing is
    /// looked at again at the next poll. `Unchanged` when nothing changed.
    fn reload_if_settled(&self, settle: Duration) -> ReloadOutcome {
        let Some((path, last)) = lock(&self.source)
            .as_ref()
            .map(|s| (s.path.clone(), s.digest))
        else {
            return ReloadOutcome::NoSource;
        };
        let first = std::fs::read(&path).ok();
        if first.as_deref().map(digest) == last {
            return ReloadOutcome::Unchanged;
        }
        std::thread::sleep(settle);
        let bytes = std::fs::read(&path);
        if bytes.as_ref().ok() != first.as_ref() {
            return ReloadOutcome::Unsettled;
        }
        self.reload_from(&path, bytes, "file changed")
    }

    /// Polls the source file every `interval` until `shutdown`, reloading
    /// when its content changes (a ConfigMap update through its `..data`
    /// symlink included).
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let me = Arc::clone(&self);
            let settle = SETTLE.min(interval);
            let polled = tokio::task::spawn_blocking(move || me.reload_if_settled(settle)).await;
            if let Err(e) = polled {
                warn!(error = %e, "ACL reload task failed; file watching stops");
                break;
            }
        }
    }
}

/// How long a changed configuration file must hold still before its rules
/// are taken (at most the poll interval).
const SETTLE: Duration = Duration::from_millis(200);

fn digest(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// A poisoned lock only means another thread panicked mid-update of a
/// plain value; the value is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `pattern` in canonical form when it is one IP address (no glob), as
/// the peer's IP SANs are written; anything else as it is.
fn canonical_ip(pattern: &str) -> String {
    match pattern.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_canonical().to_string(),
        Err(_) => pattern.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(toml: &str) -> Acl {
        let config = Config::from_toml(toml, "test").unwrap();
        Acl::from_config(&config).unwrap()
    }

    fn req<'a>(initiator: &'a str, target: &'a str) -> AclRequest<'a> {
        AclRequest {
            initiator,
            target,
            identity: None,
        }
    }

    fn decide(acl: &Acl, r: AclRequest<'_>) -> (bool, String) {
        let d = acl.decide(&r);
        (d.allow, d.rule.to_string())
    }

    #[test]
    fn no_rules_allow_everything() {
        let a = acl("");
        assert_eq!(decide(&a, req("x@h", "a1")), (true, "default".to_string()));
        assert_eq!(a, Acl::allow_all());
    }

    #[test]
    fn first_matching_rule_decides() {
        let a = acl(r#"
            [dist]
            acl_default = "deny"
            [[acl]]
            name = "no-b-to-a1"
            action = "deny"
            initiator = "b*"
            target = "a1"
            [[acl]]
            action = "allow"
            initiator = "*@pod-b.dp.test"
        "#);
        assert_eq!(
            decide(&a, req("b1@pod-b.dp.test", "a1")),
            (false, "no-b-to-a1".into())
        );
        assert_eq!(
            decide(&a, req("b1@pod-b.dp.test", "a2")),
            (true, "acl-2".into())
        );
        assert_eq!(
            decide(&a, req("c1@pod-c.dp.test", "a2")),
            (false, "default".into())
        );
    }

    #[test]
    fn an_unknown_initiator_is_judged_only_by_rules_that_hold_for_every_initiator() {
        let a = acl(r#"
            [[acl]]
            name = "allow-ops"
            action = "allow"
            initiator = "ops-*"
            target = "a1"
            [[acl]]
            name = "no-b"
            action = "deny"
            initiator = "*@pod-b.*"
            target = "a2"
            [[acl]]
            name = "open-a3"
            action = "allow"
            target = "a3"
            [[acl]]
            name = "tls-ops"
            action = "deny"
            initiator = "*"
            identity = "ops.*"
            target = "a4"
            [[acl]]
            name = "rest"
            action = "deny"
            initiator = "*"
            target = "a*"
        "#);
        let d = |t: &str| {
            let d = a.decide_unknown_initiator(t);
            (d.allow, d.rule.to_string())
        };
        // An allow rule for some initiators cannot admit an unknown one.
        assert_eq!(d("a1"), (false, "rest".into()));
        // A deny rule for some initiators refuses: it may be one of them.
        assert_eq!(d("a2"), (false, "no-b".into()));
        assert_eq!(d("a3"), (true, "open-a3".into()));
        // Identity rules need a sidecar certificate.
        assert_eq!(d("a4"), (false, "rest".into()));
        assert_eq!(d("b1"), (true, "default".into()));
        // A known initiator is judged as before.
        assert!(a.decide(&req("ops-1@x", "a1")).allow);
        assert_eq!(&*a.decide(&req("x@pod-b.dp.test", "a2")).rule, "no-b");
        assert_eq!(&*a.decide(&req("x@pod-c.dp.test", "a2")).rule, "rest");
    }

    #[test]
    fn initiator_without_at_matches_the_name_part() {
        let a = acl(r#"
            [[acl]]
            action = "deny"
            initiator = "remsh-*"
        "#);
        assert!(!a.decide(&req("remsh-1@laptop", "a1")).allow);
        assert!(!a.decide(&req("remsh-1", "a1")).allow);
        assert!(a.decide(&req("a2@remsh-1", "a1")).allow);
        // With '@', the whole name.
        let a = acl(r#"
            [[acl]]
            action = "deny"
            initiator = "*@pod-b.*"
        "#);
        assert!(!a.decide(&req("x@pod-b.dp.test", "a1")).allow);
        assert!(a.decide(&req("pod-b@x", "a1")).allow);
    }

    #[test]
    fn identity_rules_match_only_tls_peers_with_a_matching_san() {
        let a = acl(r#"
            [dist]
            acl_default = "deny"
            [[acl]]
            name = "ops"
            action = "allow"
            initiator = "remsh-*"
            identity = "*.ops.DP.test"
        "#);
        fn with(sans: &[String]) -> AclRequest<'_> {
            AclRequest {
                initiator: "remsh-1@laptop.ops.dp.test",
                target: "a1",
                identity: Some(sans),
            }
        }
        let ops = ["laptop.ops.dp.test".to_string(), "10.0.0.9".to_string()];
        let other = ["pod-b.dp.test".to_string()];
        assert_eq!(decide(&a, with(&ops)), (true, "ops".into()));
        assert_eq!(decide(&a, with(&other)), (false, "default".into()));
        assert_eq!(
            decide(&a, req("remsh-1@laptop.ops.dp.test", "a1")),
            (false, "default".into()),
            "no TLS, no identity"
        );
        let ip = acl(r#"
            [[acl]]
            action = "deny"
            identity = "10.0.0.*"
        "#);
        assert!(!ip.decide(&with(&ops)).allow);
        // An IPv6 SAN is written as `IpAddr` displays it (inbound.rs); a
        // rule may spell the address any way.
        let six = ["fd00:d157::3".to_string()];
        for spelling in ["fd00:d157::3", "FD00:D157:0:0::3", "fd00:d157:0:0:0:0:0:3"] {
            let rule = acl(&format!(
                "[[acl]]\nname = \"six\"\naction = \"allow\"\nidentity = \"{spelling}\"\n"
            ));
            assert_eq!(
                decide(&rule, with(&six)),
                (true, "six".into()),
                "{spelling}"
            );
        }
        let other = ["fd00:d157::4".to_string()];
        let rule =
            acl("[[acl]]\nname = \"six\"\naction = \"allow\"\nidentity = \"fd00:d157:0::3\"\n");
        assert_eq!(decide(&rule, with(&other)), (true, "default".into()));
    }

    #[test]
    fn bad_rules_are_refused_naming_the_key() {
        let err = |toml: &str| Config::from_toml(toml, "t").unwrap_err().to_string();
        let e = err("[[acl]]\naction = \"deny\"\ninitiator = \"a b\"\n");
        assert!(e.contains("`acl.initiator`") && e.contains("rule 1"), "{e}");
        let e = err("[[acl]]\naction = \"deny\"\ntarget = \"a1@pod-a\"\n");
        assert!(e.contains("`acl.target`"), "{e}");
        let e = err("[[acl]]\naction = \"deny\"\nidentity = \"\"\n");
        assert!(e.contains("`acl.identity`"), "{e}");
        let e = err(
            "[[acl]]\nname = \"x\"\naction = \"deny\"\n[[acl]]\nname = \"x\"\naction = \"allow\"\n",
        );
        assert!(e.contains("`acl.name`") && e.contains("rule 2"), "{e}");
        let e = err("[[acl]]\nname = \"default\"\naction = \"deny\"\n");
        assert!(e.contains("`acl.name`"), "{e}");
        let e = err("[[acl]]\nname = \"a b\"\naction = \"deny\"\n");
        assert!(e.contains("`acl.name`"), "{e}");
        let e = err("[[acl]]\ninitiator = \"a\"\n");
        assert!(e.contains("action"), "{e}");
        let e = err("[[acl]]\naction = \"maybe\"\n");
        assert!(e.contains("maybe") || e.contains("variant"), "{e}");
        let e = err("[dist]\nacl_reload_interval_ms = 0\n");
        assert!(e.contains("`dist.acl_reload_interval_ms`"), "{e}");
    }

    #[test]
    fn rules_render_and_parse_back() {
        let c = Config::from_toml(
            "[dist]\nacl_default = \"deny\"\n[[acl]]\nname = \"r\"\naction = \"allow\"\ninitiator = \"a*\"\nidentity = \"*.x\"\n",
            "t",
        )
        .unwrap();
        let again = Config::from_toml(&c.to_toml(), "rendered").unwrap();
        assert_eq!(c, again);
    }

    /// Held by the tests that reach `reload`'s log lines. `tracing` caches
    /// each callsite's interest process-wide, computed by the first thread
    /// to reach it: a test reloading with no subscriber at the same moment
    /// as the one capturing the line could cache "never" and hide it.
    static RELOAD_LINES: Mutex<()> = Mutex::new(());

    #[test]
    fn reload_swaps_rules_and_keeps_them_on_a_bad_file() {
        let _serial = lock(&RELOAD_LINES);
        let dir = std::env::temp_dir().join(format!("dp-acl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "").unwrap();
        let handle = AclHandle::new(Acl::allow_all());
        assert!(matches!(handle.reload("test"), ReloadOutcome::NoSource));
        handle.set_source(&file);
        assert!(!handle.source_changed());
        assert!(matches!(handle.reload("test"), ReloadOutcome::Unchanged));

        std::fs::write(&file, "[[acl]]\naction = \"deny\"\ntarget = \"a1\"\n").unwrap();
        assert!(handle.source_changed());
        assert!(matches!(
            handle.reload("test"),
            ReloadOutcome::Reloaded { rules: 1 }
        ));
        assert!(!handle.source_changed());
        assert!(!handle.current().decide(&req("b1@x", "a1")).allow);

        std::fs::write(&file, "[[acl]]\naction = \"deny\"\ntarget = \"a 1\"\n").unwrap();
        assert!(matches!(handle.reload("test"), ReloadOutcome::Failed(_)));
        assert!(
            !handle.current().decide(&req("b1@x", "a1")).allow,
            "a bad file keeps the rules in force"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file rewritten in place is read only once it holds still: while
    /// a writer has truncated it (an empty file is valid TOML with no
    /// rules) and not yet written the rest, the rules in force stay.
    #[test]
    fn a_file_being_rewritten_in_place_is_taken_only_once_it_settles() {
        let _serial = lock(&RELOAD_LINES);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let deny = "[[acl]]\naction = \"deny\"\ntarget = \"a1\"\n";
        std::fs::write(&file, deny).unwrap();
        let handle = AclHandle::new(Acl::allow_all());
        handle.set_source(&file);
        handle.reload("test");
        assert!(!handle.current().decide(&req("b1@x", "a1")).allow);
        let settle = Duration::from_millis(300);
        assert!(matches!(
            handle.reload_if_settled(settle),
            ReloadOutcome::Unchanged
        ));

        // Truncated, the rest written 50 ms later: not taken.
        std::fs::write(&file, "").unwrap();
        let (path, rest) = (
            file.clone(),
            format!("{deny}[[acl]]\naction = \"deny\"\ntarget = \"a2\"\n"),
        );
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(path, rest).unwrap();
        });
        assert!(matches!(
            handle.reload_if_settled(settle),
            ReloadOutcome::Unsettled
        ));
        writer.join().unwrap();
        assert!(
            !handle.current().decide(&req("b1@x", "a1")).allow,
            "the half-written file was not put in force"
        );
        // Settled: taken whole.
        assert!(matches!(
            handle.reload_if_settled(settle),
            ReloadOutcome::Reloaded { rules: 2 }
        ));
        assert!(!handle.current().decide(&req("b1@x", "a2")).allow);
    }

    /// Records, at each INFO event, whether `b1 -> a1` is allowed by the
    /// rules in force at that instant.
    struct RulesAtLogLine {
        handle: Arc<AclHandle>,
        seen: Arc<Mutex<Vec<bool>>>,
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RulesAtLogLine {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if *event.metadata().level() == tracing::Level::INFO {
                let allowed = self.handle.current().decide(&req("b1@x", "a1")).allow;
                lock(&self.seen).push(allowed);
            }
        }
    }

    /// "ACL rules reloaded; new connections are judged by them" is true
    /// when it is written: a connection made as soon as the line appears
    /// (as the e2e test does) is judged by the new rules. It was logged
    /// before the rules were swapped in.
    #[test]
    fn the_reload_line_is_written_once_the_new_rules_are_in_force() {
        use tracing_subscriber::layer::SubscriberExt;
        let _serial = lock(&RELOAD_LINES);
        let dir = std::env::temp_dir().join(format!("dp-acl-line-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "").unwrap();
        let handle = AclHandle::new(Acl::allow_all());
        handle.set_source(&file);
        std::fs::write(&file, "[[acl]]\naction = \"deny\"\ntarget = \"a1\"\n").unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let probe = RulesAtLogLine {
            handle: Arc::clone(&handle),
            seen: Arc::clone(&seen),
        };
        let subscriber = tracing_subscriber::registry().with(probe);
        let outcome = tracing::subscriber::with_default(subscriber, || {
            // The line's interest may have been cached as "never" by the
            // other test, which ran with no subscriber.
            tracing::callsite::rebuild_interest_cache();
            handle.reload("test")
        });
        assert!(matches!(outcome, ReloadOutcome::Reloaded { rules: 1 }));
        assert_eq!(
            *lock(&seen),
            vec![false],
            "b1 -> a1 still allowed when the reload was logged"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
