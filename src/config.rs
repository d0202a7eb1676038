//! Configuration: serde types, named defaults, loading and validation.
//!
//! The file format is TOML with `deny_unknown_fields` everywhere, so a typo
//! is an error naming the key rather than a silently ignored setting. Units
//! are part of the key names (`*_ms`). Loading never binds a socket; the
//! binary reads the configuration, then binds, then serves.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// The configuration `distproxy run` uses when no `--config` is given.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/default.toml");

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read configuration file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration in {origin}{}: {message}", key_suffix(.key))]
    Parse {
        origin: String,
        /// The dotted name of the key (or section) the error is at, when
        /// it can be told: `epmd.listen`.
        key: Option<String>,
        message: String,
    },
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn key_suffix(key: &Option<String>) -> String {
    key.as_ref()
        .map(|k| format!(", key `{k}`"))
        .unwrap_or_default()
}

/// The value of every `_ms` key: whole milliseconds in the file (units
/// are part of the key names), a [`Duration`] where it is used. One type
/// for all of them, so the unit is converted in one place and a duration
/// cannot be mistaken for a count; bounds are checked by [`check_ms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Millis(pub u64);

impl Millis {
    /// As a [`Duration`].
    pub const fn duration(self) -> Duration {
        Duration::from_millis(self.0)
    }

    /// As a [`Duration`], `None` for 0 (the keys where 0 turns a setting
    /// off).
    pub const fn nonzero(self) -> Option<Duration> {
        if self.0 == 0 {
            None
        } else {
            Some(self.duration())
        }
    }
}

impl From<Millis> for Duration {
    fn from(ms: Millis) -> Duration {
        ms.duration()
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The longest duration a `_ms` key takes: one hour.
const MAX_MS: u64 = 3_600_000;
/// The largest count a `[limits]` key (and any other connection or
/// listener count) takes: far above what one sidecar can hold, and small
/// enough that sizes computed from it (descriptors, semaphore permits)
/// never overflow.
const MAX_COUNT: usize = 1_000_000;

/// The one range check of the configuration: every bounded key goes
/// through it, so its errors read the same everywhere.
fn check_range<T>(key: &'static str, value: T, range: RangeInclusive<T>) -> Result<(), ConfigError>
where
    T: PartialOrd + fmt::Display,
{
    if range.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key,
        reason: format!(
            "is {value}; must be from {} to {}",
            range.start(),
            range.end()
        ),
    })
}

/// A duration in milliseconds: from `min` to [`MAX_MS`] (one hour).
fn check_ms(key: &'static str, value: Millis, min: u64) -> Result<(), ConfigError> {
    check_range(key, value.0, min..=MAX_MS)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub epmd: EpmdConfig,
    #[serde(default)]
    pub dist: DistConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub tunnel: TunnelConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub tcp: TcpConfig,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    #[serde(default)]
    pub relay: RelayConfig,
    /// Distribution ACL rules (`[[acl]]`), first match wins; no match:
    /// `dist.acl_default`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acl: Vec<AclRuleConfig>,
}

/// What an ACL rule (or the default) does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AclAction {
    #[default]
    Allow,
    Deny,
}

/// One `[[acl]]` rule: which initiators may (not) reach which local nodes.
/// Patterns are globs (`*`, `?`; see `acl::pattern`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRuleConfig {
    /// Label of the rule in logs and metrics; `acl-N` (1-based) if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `allow` or `deny`.
    pub action: AclAction,
    /// The initiator's node name: a pattern with `@` is matched against the
    /// full name, one without against the part before `@`.
    #[serde(default = "default_acl_pattern")]
    pub initiator: String,
    /// The local node's name (the part before `@`).
    #[serde(default = "default_acl_pattern")]
    pub target: String,
    /// A DNS or IP SAN of the peer's client certificate; a rule with an
    /// identity only matches TLS connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

fn default_acl_pattern() -> String {
    "*".into()
}

impl AclRuleConfig {
    /// The rule's label: its `name`, or `acl-N` for the N-th rule (1-based).
    pub fn label(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("acl-{}", index + 1))
    }
}

/// The label of decisions no rule matched (`dist.acl_default`).
pub const ACL_DEFAULT_LABEL: &str = "default";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpmdConfig {
    /// Addresses the EPMD server listens on (at least one).
    #[serde(default = "default_epmd_listen", deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// A connection without a complete request for this long is closed.
    #[serde(default = "default_epmd_idle_timeout_ms")]
    pub idle_timeout_ms: Millis,
    /// Like `epmd -relaxed_command_check`: allow STOP_REQ, and KILL_REQ
    /// while nodes are registered.
    #[serde(default)]
    pub relaxed_command_check: bool,
    /// Where the registry is persisted so registrations survive a sidecar
    /// restart (unset: not persisted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_file: Option<std::path::PathBuf>,
    /// How often adopted registrations (restored from `state_file`) are
    /// probed; one whose port stops answering is dropped.
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: Millis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    /// Addresses of the distribution port (at least one).
    #[serde(default = "default_dist_listen", deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// Port announced to remote lookups; the first listener's port if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_port: Option<u16>,
    /// Deadline for each handshake frame the router reads.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: Millis,
    /// Deadline for connecting to a local node.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: Millis,
    /// Connections relayed at once; more are closed on accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// On SIGTERM/SIGINT, established connections keep being relayed this
    /// long before they are closed.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: Millis,
    /// What connections no `[[acl]]` rule matches get.
    #[serde(default)]
    pub acl_default: AclAction,
    /// How often the configuration file is re-read for `[[acl]]` and
    /// `acl_default` changes (also on SIGHUP).
    #[serde(default = "default_acl_reload_interval_ms")]
    pub acl_reload_interval_ms: Millis,
    /// What happens to nodes' own TLS distribution (`inet_tls_dist`)
    /// arriving on the distribution port.
    #[serde(default)]
    pub beam_tls: BeamTls,
}

/// Nodes' own TLS distribution (`-proto_dist inet_tls`) on the
/// distribution port: a TLS connection that is not a sidecar's tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BeamTls {
    /// Routed by lookup correlation and relayed without decrypting it.
    #[default]
    Route,
    /// Closed (logged and counted).
    Refuse,
}

/// The admin HTTP endpoint: /metrics, /healthz, /readyz, /nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen addresses (one or a list); `""` or `[]` turns the endpoint
    /// off.
    #[serde(default = "default_admin_listen", deserialize_with = "addrs_or_off")]
    pub listen: Vec<SocketAddr>,
    /// /readyz answers 200 only once these node names are registered.
    #[serde(default)]
    pub ready_nodes: Vec<String>,
    /// How long the node-labelled series of a node that left
    /// (unregistered, no connection open) are still exported.
    #[serde(default = "default_node_series_retention_ms")]
    pub node_series_retention_ms: Millis,
}

fn default_node_series_retention_ms() -> Millis {
    Millis(600_000)
}

/// Where loopback lookups are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoopbackLookups {
    /// The node's own port: intra-pod traffic bypasses the proxy.
    #[default]
    Direct,
    /// The proxy's advertised port, routed like a remote lookup.
    Proxy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// How long an answered lookup waits for the connection it announces.
    #[serde(default = "default_lookup_ttl_ms")]
    pub lookup_ttl_ms: Millis,
    /// Longest hold of a serialised lookup before it is answered "not found".
    /// Keep it below OTP's setup timer (`net_setuptime`, 7,000 ms).
    #[serde(default = "default_max_hold_ms")]
    pub max_hold_ms: Millis,
    #[serde(default)]
    pub loopback_lookups: LoopbackLookups,
}

/// Both families, as OTP's `epmd` listens: a node started with
/// `-proto_dist inet6_tcp` registers over `::1`.
fn default_epmd_listen() -> Vec<SocketAddr> {
    dual_stack(4369)
}
fn default_epmd_idle_timeout_ms() -> Millis {
    Millis(10_000)
}
fn default_dist_listen() -> Vec<SocketAddr> {
    dual_stack(43691)
}
/// `0.0.0.0:port` and `[::]:port` (the IPv6 socket is IPv6-only; on a host
/// without IPv6 it is left out with a warning, see `sidecar::bind`).
fn dual_stack(port: u16) -> Vec<SocketAddr> {
    vec![
        SocketAddr::from(([0, 0, 0, 0], port)),
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
    ]
}
fn default_handshake_timeout_ms() -> Millis {
    Millis(5_000)
}
fn default_connect_timeout_ms() -> Millis {
    Millis(2_000)
}
fn default_max_connections() -> usize {
    4096
}
fn default_probe_interval_ms() -> Millis {
    Millis(5_000)
}
fn default_shutdown_grace_ms() -> Millis {
    Millis(20_000)
}
fn default_acl_reload_interval_ms() -> Millis {
    Millis(5_000)
}
/// Both families: the kubelet probes the pod's address, IPv6 in IPv6 and
/// dual-stack clusters.
fn default_admin_listen() -> Vec<SocketAddr> {
    dual_stack(9369)
}
fn default_lookup_ttl_ms() -> Millis {
    Millis(3_000)
}
/// Below OTP's connection setup timer (`net_setuptime`, 7 s by default,
/// started in `inet_tcp_dist:do_setup` before the lookup): a longer hold
/// would answer requesters that have given up.
fn default_max_hold_ms() -> Millis {
    Millis(5_000)
}

impl Default for EpmdConfig {
    fn default() -> Self {
        Self {
            listen: default_epmd_listen(),
            idle_timeout_ms: default_epmd_idle_timeout_ms(),
            relaxed_command_check: false,
            state_file: None,
            probe_interval_ms: default_probe_interval_ms(),
        }
    }
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            listen: default_dist_listen(),
            advertise_port: None,
            handshake_timeout_ms: default_handshake_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            max_connections: default_max_connections(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            acl_default: AclAction::Allow,
            acl_reload_interval_ms: default_acl_reload_interval_ms(),
            beam_tls: BeamTls::Route,
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            lookup_ttl_ms: default_lookup_ttl_ms(),
            max_hold_ms: default_max_hold_ms(),
            loopback_lookups: LoopbackLookups::Direct,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            ready_nodes: Vec::new(),
            node_series_retention_ms: default_node_series_retention_ms(),
        }
    }
}

/// Accepts `"addr"`, `["addr", ...]`, or `""` (as `[]`) for "off".
fn addrs_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<SocketAddr>),
    }
    let bad = |got: &str| {
        serde::de::Error::custom(format!(
            "expected a socket address like \"0.0.0.0:9369\", a list of them, \
             or \"\" to turn it off; got {got}"
        ))
    };
    match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(text)) if text.trim().is_empty() => Ok(Vec::new()),
        Ok(OneOrMany::One(text)) => text
            .trim()
            .parse()
            .map(|a| vec![a])
            .map_err(|_| bad(&format!("{text:?}"))),
        Ok(OneOrMany::Many(v)) => Ok(v),
        Err(_) => Err(bad("something else")),
    }
}

/// Accepts `"addr"` or `["addr", ...]`.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(SocketAddr),
        Many(Vec<SocketAddr>),
    }
    match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(a)) => Ok(vec![a]),
        Ok(OneOrMany::Many(v)) => Ok(v),
        Err(_) => Err(serde::de::Error::custom(
            "expected a socket address like \"0.0.0.0:4369\" or \"[::]:4369\", or a list of them",
        )),
    }
}

/// No two listen addresses (of one key or of two) can be bound at once:
/// the same port (not 0) and family, and the same address or a wildcard
/// of that family. `run` would fail to bind the second one (exit 1) after
/// `check-config` had found nothing wrong.
fn check_listeners_apart(lists: &[(&'static str, &Vec<SocketAddr>)]) -> Result<(), ConfigError> {
    let all: Vec<(&'static str, SocketAddr)> = lists
        .iter()
        .flat_map(|(key, addrs)| addrs.iter().map(move |a| (*key, *a)))
        .collect();
    for (i, (key, addr)) in all.iter().enumerate() {
        // IPv6 listeners are IPv6-only (`net::bind_tcp`), which refuses an
        // IPv4-mapped address at bind time (EINVAL, exit 1).
        if let IpAddr::V6(v6) = addr.ip() {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!(
                        "{addr} is an IPv4-mapped IPv6 address, which an IPv6 listener \
                         (IPv6 only) cannot bind; write {}",
                        SocketAddr::new(IpAddr::V4(v4), addr.port())
                    ),
                });
            }
        }
        for (earlier_key, earlier) in &all[..i] {
            let clash = addr.port() != 0
                && addr.port() == earlier.port()
                && addr.is_ipv4() == earlier.is_ipv4()
                && (addr.ip() == earlier.ip()
                    || addr.ip().is_unspecified()
                    || earlier.ip().is_unspecified());
            if clash {
                let which = if key == earlier_key {
                    "the same list".to_string()
                } else {
                    earlier_key.to_string()
                };
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!(
                        "{addr} overlaps {earlier} of {which}: one port can be bound by one listener"
                    ),
                });
            }
        }
    }
    Ok(())
}

impl Config {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        // serde_path_to_error tracks the key being deserialized, so a
        // wrong value is named with its section (`epmd.listen`,
        // `acl[1].action`): the TOML message alone quotes only the line.
        let deserializer = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Parse {
                origin: origin.to_string(),
                key: (path != ".").then_some(path),
                message: e.into_inner().to_string(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Config {
        Config::from_toml(DEFAULT_CONFIG_TOML, "embedded default configuration")
            .expect("the embedded default configuration is valid (tested)")
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Checks the invariants serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, reason: &str) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_string(),
            })
        }
        if self.epmd.listen.is_empty() {
            return invalid("epmd.listen", "at least one address is required");
        }
        if self.dist.listen.is_empty() {
            return invalid("dist.listen", "at least one address is required");
        }
        check_listeners_apart(&[
            ("epmd.listen", &self.epmd.listen),
            ("dist.listen", &self.dist.listen),
            ("admin.listen", &self.admin.listen),
        ])?;
        for (key, value) in [
            ("epmd.idle_timeout_ms", self.epmd.idle_timeout_ms),
            ("dist.handshake_timeout_ms", self.dist.handshake_timeout_ms),
            ("dist.connect_timeout_ms", self.dist.connect_timeout_ms),
            ("routing.lookup_ttl_ms", self.routing.lookup_ttl_ms),
            ("routing.max_hold_ms", self.routing.max_hold_ms),
            ("epmd.probe_interval_ms", self.epmd.probe_interval_ms),
            (
                "dist.acl_reload_interval_ms",
                self.dist.acl_reload_interval_ms,
            ),
        ] {
            check_ms(key, value, 1)?;
        }
        check_range(
            "dist.max_connections",
            self.dist.max_connections,
            1..=MAX_COUNT,
        )?;
        if let Some(port) = self.dist.advertise_port {
            check_range("dist.advertise_port", port, 1..=u16::MAX)?;
        }
        check_ms("dist.shutdown_grace_ms", self.dist.shutdown_grace_ms, 0)?;
        for name in &self.admin.ready_nodes {
            if crate::node_name::validate_name(name.as_bytes()).is_err() {
                return invalid(
                    "admin.ready_nodes",
                    &format!("{name:?} is not a valid node name"),
                );
            }
            // Nodes register the part before `@`: a full name would never
            // be registered, and /readyz would stay 503 for ever.
            if let Some((short, _)) = name.split_once('@') {
                return invalid(
                    "admin.ready_nodes",
                    &format!(
                        "{name:?} is a full node name; give the name the node registers, the part before '@' ({short:?})"
                    ),
                );
            }
        }
        if let Some(path) = &self.epmd.state_file {
            if path.as_os_str().is_empty() || path.file_name().is_none() {
                return invalid("epmd.state_file", "must name a file");
            }
        }
        self.tls.validate()?;
        self.tunnel.validate()?;
        self.limits.validate()?;
        self.tcp.validate()?;
        self.relay.validate()?;
        self.discovery.validate()?;
        validate_acl(&self.acl)?;
        Ok(())
    }

    /// The configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// The keys whose values differ between `self` and `other`, outside
    /// what a running sidecar reloads (`[[acl]]`, `dist.acl_default`):
    /// dotted names, sorted (`limits.write_timeout_ms`).
    pub fn changes_needing_restart(&self, other: &Config) -> Vec<String> {
        fn flat(c: &Config) -> std::collections::BTreeMap<String, String> {
            let mut c = c.clone();
            c.acl.clear();
            c.dist.acl_default = Default::default();
            let mut out = std::collections::BTreeMap::new();
            if let Ok(toml::Value::Table(sections)) = toml::Value::try_from(&c) {
                for (section, value) in sections {
                    match value {
                        toml::Value::Table(keys) => {
                            for (key, v) in keys {
                                out.insert(format!("{section}.{key}"), v.to_string());
                            }
                        }
                        other => {
                            out.insert(section, other.to_string());
                        }
                    }
                }
            }
            out
        }
        let (a, b) = (flat(self), flat(other));
        let mut keys: Vec<String> = a
            .keys()
            .chain(b.keys())
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

/// `[[acl]]`: patterns parse, labels are unique and usable as metric
/// labels, targets name local nodes (no `@`).
fn validate_acl(rules: &[AclRuleConfig]) -> Result<(), ConfigError> {
    use crate::acl::pattern::Pattern;
    let mut labels = std::collections::HashSet::new();
    for (i, rule) in rules.iter().enumerate() {
        let label = rule.label(i);
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            key,
            reason: format!("rule {} ({label:?}): {reason}", i + 1),
        };
        if let Some(name) = &rule.name {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
            if !ok {
                return Err(invalid(
                    "acl.name",
                    "use 1 to 64 letters, digits, '-', '_', '.' or ':'".into(),
                ));
            }
            if name == ACL_DEFAULT_LABEL {
                return Err(invalid(
                    "acl.name",
                    format!("{ACL_DEFAULT_LABEL:?} is the label of dist.acl_default"),
                ));
            }
        }
        if !labels.insert(label.clone()) {
            return Err(invalid("acl.name", "another rule has the same name".into()));
        }
        Pattern::parse(&rule.initiator).map_err(|e| invalid("acl.initiator", e.to_string()))?;
        Pattern::parse(&rule.target).map_err(|e| invalid("acl.target", e.to_string()))?;
        if rule.target.contains('@') {
            return Err(invalid(
                "acl.target",
                "the target is a local node's name without '@host'".into(),
            ));
        }
        if let Some(identity) = &rule.identity {
            Pattern::parse(identity).map_err(|e| invalid("acl.identity", e.to_string()))?;
        }
    }
    Ok(())
}

/// How the sidecar that dials checks the certificate of the sidecar it
/// reached (`tls.verify_server_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ServerNameVerification {
    /// The certificate must chain to `ca_file` **and** name the host that was
    /// dialled (the host part of the remote node's name) in a DNS or IP SAN.
    /// Proves "this is pod X"; needs certificates that carry the pods' names.
    #[default]
    Hostname,
    /// The certificate must chain to `ca_file` (signatures, validity and the
    /// server-auth usage are still checked); its names are not. Proves only
    /// "this is a pod holding a certificate of our CA": any such pod could
    /// answer for any other (e.g. after a DNS or IP mix-up). For workloads
    /// whose node names are pod IPs and that share one certificate.
    CaOnly,
}

/// `[tls]`: mutual TLS between sidecars. TLS is **enabled when `cert_file`,
/// `key_file` and `ca_file` are set** (all three or none); the other keys
/// need it enabled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: this sidecar's certificate, then any intermediates. Presented as
    /// server and as client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM: the private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
    /// PEM: the CA certificate(s) peers' certificates must chain to. Several
    /// may be listed (e.g. old and new CA while the CA is rotated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Refuse plaintext (preamble) and raw distribution connections from
    /// non-loopback peers: only TLS from other pods.
    #[serde(default)]
    pub require_tls: bool,
    #[serde(default)]
    pub verify_server_name: ServerNameVerification,
    /// The initiator node named in a TLS connection's preamble must have a
    /// host part that is a DNS (wildcards allowed) or IP SAN of the client
    /// certificate: one pod cannot speak as another pod's nodes.
    #[serde(default)]
    pub bind_node_names: bool,
    /// Deadline for a TLS handshake, in either direction.
    #[serde(default = "default_tls_handshake_timeout_ms")]
    pub handshake_timeout_ms: Millis,
    /// How often the three files are re-read; a change is loaded for new
    /// connections (established ones keep their session).
    #[serde(default = "default_tls_reload_interval_ms")]
    pub reload_interval_ms: Millis,
}

fn default_tls_handshake_timeout_ms() -> Millis {
    Millis(5_000)
}
fn default_tls_reload_interval_ms() -> Millis {
    Millis(1_000)
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            ca_file: None,
            require_tls: false,
            verify_server_name: ServerNameVerification::default(),
            bind_node_names: false,
            handshake_timeout_ms: default_tls_handshake_timeout_ms(),
            reload_interval_ms: default_tls_reload_interval_ms(),
        }
    }
}

impl TlsConfig {
    /// Whether TLS is configured (the three files are set; see `validate`).
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some() && self.ca_file.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| Err(ConfigError::Invalid { key, reason });
        let files = [
            ("tls.cert_file", &self.cert_file),
            ("tls.key_file", &self.key_file),
            ("tls.ca_file", &self.ca_file),
        ];
        let set: Vec<&str> = files
            .iter()
            .filter(|f| f.1.is_some())
            .map(|f| f.0)
            .collect();
        if !set.is_empty() && set.len() < files.len() {
            let (missing, _) = files.iter().find(|f| f.1.is_none()).expect("one is unset");
            return invalid(
                missing,
                format!(
                    "must be set together with {} (TLS needs a certificate, its key and a CA)",
                    set.join(" and ")
                ),
            );
        }
        for (key, path) in files {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return invalid(key, "must name a file".into());
            }
        }
        if !self.enabled() {
            if self.require_tls {
                return invalid(
                    "tls.require_tls",
                    "needs TLS: set tls.cert_file, tls.key_file and tls.ca_file".into(),
                );
            }
            if self.bind_node_names {
                return invalid(
                    "tls.bind_node_names",
                    "needs TLS: set tls.cert_file, tls.key_file and tls.ca_file".into(),
                );
            }
        }
        // A plaintext preamble carries a name nobody vouches for: binding
        // names only on TLS connections would let plaintext claim any name.
        if self.bind_node_names && !self.require_tls {
            return invalid(
                "tls.bind_node_names",
                "needs tls.require_tls = true (plaintext from other hosts cannot be bound to a \
                 certificate, so it must be refused)"
                    .into(),
            );
        }
        check_ms("tls.handshake_timeout_ms", self.handshake_timeout_ms, 1)?;
        check_ms("tls.reload_interval_ms", self.reload_interval_ms, 1)?;
        Ok(())
    }
}

/// `[tunnel]`: the sidecar-to-sidecar path. Outbound, local nodes started
/// with `-epmd_module distproxy_epmd` ask for a loopback egress port per
/// remote node; connections to it are carried to the remote pod's sidecar
/// with a preamble naming the target (`src/tunnel/`). Inbound preamble
/// connections need no configuration: they are always routed by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// Answer egress requests. When off, they get "refused" and the Erlang
    /// module falls back to stock `erl_epmd` behaviour.
    #[serde(default = "default_tunnel_egress")]
    pub egress: bool,
    /// The distribution port of remote sidecars (their `dist.listen` port,
    /// or what their Service maps to it).
    #[serde(default = "default_tunnel_remote_port")]
    pub remote_port: u16,
    /// An egress listener with no open connection and no request for this
    /// long is closed; the next request opens a new one.
    #[serde(default = "default_egress_idle_timeout_ms")]
    pub egress_idle_timeout_ms: Millis,
    /// Egress listeners (one per remote node) open at once; requests beyond
    /// get "unavailable" and fall back.
    #[serde(default = "default_max_egress_listeners")]
    pub max_egress_listeners: usize,
    /// Deadline for resolving a remote node's host.
    #[serde(default = "default_resolve_timeout_ms")]
    pub resolve_timeout_ms: Millis,
    /// Deadline for connecting to the remote sidecar (all of its addresses).
    #[serde(default = "default_tunnel_connect_timeout_ms")]
    pub connect_timeout_ms: Millis,
    /// Deadline for sending the preamble (outbound) and for receiving it
    /// (inbound, after the first byte).
    #[serde(default = "default_preamble_timeout_ms")]
    pub preamble_timeout_ms: Millis,
    /// Before an egress listener's port is handed out, check that something
    /// answers on the remote host's `remote_port`; if not, refuse the egress
    /// request so the node falls back to a direct connection (pods without
    /// distproxy stay reachable). Answers are remembered; a success is
    /// forgotten when an egress connection cannot reach that sidecar.
    #[serde(default = "default_probe_remote")]
    pub probe_remote: bool,
    /// Upper bound for one probe of a remote host (resolve and connect).
    #[serde(default = "default_probe_timeout_ms")]
    pub probe_timeout_ms: Millis,
    /// How long a host where a sidecar answered is remembered.
    #[serde(default = "default_probe_success_ttl_ms")]
    pub probe_success_ttl_ms: Millis,
    /// How long a host without a reachable sidecar is remembered.
    #[serde(default = "default_probe_failure_ttl_ms")]
    pub probe_failure_ttl_ms: Millis,
}

fn default_probe_timeout_ms() -> Millis {
    Millis(2_000)
}
fn default_probe_success_ttl_ms() -> Millis {
    Millis(30_000)
}
fn default_probe_failure_ttl_ms() -> Millis {
    Millis(5_000)
}
fn default_probe_remote() -> bool {
    true
}

fn default_tunnel_egress() -> bool {
    true
}
fn default_tunnel_remote_port() -> u16 {
    43691
}
fn default_egress_idle_timeout_ms() -> Millis {
    Millis(60_000)
}
fn default_max_egress_listeners() -> usize {
    1024
}
fn default_resolve_timeout_ms() -> Millis {
    Millis(5_000)
}
fn default_tunnel_connect_timeout_ms() -> Millis {
    Millis(3_000)
}
fn default_preamble_timeout_ms() -> Millis {
    Millis(5_000)
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            egress: default_tunnel_egress(),
            remote_port: default_tunnel_remote_port(),
            egress_idle_timeout_ms: default_egress_idle_timeout_ms(),
            max_egress_listeners: default_max_egress_listeners(),
            resolve_timeout_ms: default_resolve_timeout_ms(),
            connect_timeout_ms: default_tunnel_connect_timeout_ms(),
            preamble_timeout_ms: default_preamble_timeout_ms(),
            probe_remote: default_probe_remote(),
            probe_timeout_ms: default_probe_timeout_ms(),
            probe_success_ttl_ms: default_probe_success_ttl_ms(),
            probe_failure_ttl_ms: default_probe_failure_ttl_ms(),
        }
    }
}

impl TunnelConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_range("tunnel.remote_port", self.remote_port, 1..=u16::MAX)?;
        check_range(
            "tunnel.max_egress_listeners",
            self.max_egress_listeners,
            1..=MAX_COUNT,
        )?;
        for (key, value) in [
            ("tunnel.egress_idle_timeout_ms", self.egress_idle_timeout_ms),
            ("tunnel.resolve_timeout_ms", self.resolve_timeout_ms),
            ("tunnel.connect_timeout_ms", self.connect_timeout_ms),
            ("tunnel.preamble_timeout_ms", self.preamble_timeout_ms),
            ("tunnel.probe_timeout_ms", self.probe_timeout_ms),
        ] {
            check_ms(key, value, 1)?;
        }
        // 0 remembers nothing: every first request for a node probes.
        check_ms("tunnel.probe_success_ttl_ms", self.probe_success_ttl_ms, 0)?;
        check_ms("tunnel.probe_failure_ttl_ms", self.probe_failure_ttl_ms, 0)
    }
}

/// Caps on what peers can make the sidecar hold (see docs/security.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// EPMD connections open at once (per listener), local peers excepted
    /// up to `reserved_local_connections`.
    #[serde(default = "default_epmd_max_connections")]
    pub epmd_max_connections: usize,
    /// EPMD connections open at once from one source address.
    #[serde(default = "default_epmd_max_connections_per_source")]
    pub epmd_max_connections_per_source: usize,
    /// Admin requests served at once.
    #[serde(default = "default_admin_max_connections")]
    pub admin_max_connections: usize,
    /// Admin requests served at once for one source address.
    #[serde(default = "default_admin_max_connections_per_source")]
    pub admin_max_connections_per_source: usize,
    /// Distribution connections (inbound and egress) from one source
    /// address, out of `dist.max_connections`.
    #[serde(default = "default_dist_max_connections_per_source")]
    pub dist_max_connections_per_source: usize,
    /// Extra room on every listener, usable only by local peers (loopback
    /// or the listener's own address) once the cap is reached.
    #[serde(default = "default_reserved_local_connections")]
    pub reserved_local_connections: usize,
    /// Deadline for writing one reply (EPMD, admin) to a peer.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: Millis,
    /// Nodes registered at once.
    #[serde(default = "default_max_registered_nodes")]
    pub max_registered_nodes: usize,
    /// TLS handshakes in flight at once (inbound and outbound).
    #[serde(default = "default_max_tls_handshakes")]
    pub max_tls_handshakes: usize,
    /// IPv6 sources are counted by their first this many bits by every
    /// per-source cap (128: each address on its own, as IPv4 addresses are).
    #[serde(default = "default_ipv6_source_prefix_len")]
    pub ipv6_source_prefix_len: u8,
}

fn default_epmd_max_connections() -> usize {
    4096
}
fn default_epmd_max_connections_per_source() -> usize {
    512
}
fn default_admin_max_connections() -> usize {
    32
}
fn default_admin_max_connections_per_source() -> usize {
    8
}
fn default_dist_max_connections_per_source() -> usize {
    2048
}
fn default_reserved_local_connections() -> usize {
    64
}
fn default_write_timeout_ms() -> Millis {
    Millis(5_000)
}
fn default_max_registered_nodes() -> usize {
    1024
}
fn default_max_tls_handshakes() -> usize {
    64
}
/// Each address on its own: in most IPv6 clusters the pods of one
/// Kubernetes node share a /64 (the node's pod CIDR), so a shorter prefix
/// would make them share one pod's caps.
fn default_ipv6_source_prefix_len() -> u8 {
    128
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            epmd_max_connections: default_epmd_max_connections(),
            epmd_max_connections_per_source: default_epmd_max_connections_per_source(),
            admin_max_connections: default_admin_max_connections(),
            admin_max_connections_per_source: default_admin_max_connections_per_source(),
            dist_max_connections_per_source: default_dist_max_connections_per_source(),
            reserved_local_connections: default_reserved_local_connections(),
            write_timeout_ms: default_write_timeout_ms(),
            max_registered_nodes: default_max_registered_nodes(),
            max_tls_handshakes: default_max_tls_handshakes(),
            ipv6_source_prefix_len: default_ipv6_source_prefix_len(),
        }
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("limits.epmd_max_connections", self.epmd_max_connections),
            (
                "limits.epmd_max_connections_per_source",
                self.epmd_max_connections_per_source,
            ),
            ("limits.admin_max_connections", self.admin_max_connections),
            (
                "limits.admin_max_connections_per_source",
                self.admin_max_connections_per_source,
            ),
            (
                "limits.dist_max_connections_per_source",
                self.dist_max_connections_per_source,
            ),
            ("limits.max_registered_nodes", self.max_registered_nodes),
            ("limits.max_tls_handshakes", self.max_tls_handshakes),
        ] {
            check_range(key, value, 1..=MAX_COUNT)?;
        }
        check_range(
            "limits.reserved_local_connections",
            self.reserved_local_connections,
            0..=MAX_COUNT,
        )?;
        check_range(
            "limits.ipv6_source_prefix_len",
            self.ipv6_source_prefix_len,
            32..=128,
        )?;
        check_ms("limits.write_timeout_ms", self.write_timeout_ms, 1)
    }
}

/// `[discovery]`: find every node of every pod behind a headless Service
/// (`src/discovery/`). Off unless `service` is set; `host` alone makes this
/// pod discoverable by others without discovering itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// DNS name whose A/AAAA records are the pods' addresses (a headless
    /// Service, e.g. `myapp-headless.ns.svc.cluster.local`); empty: off.
    #[serde(default)]
    pub service: String,
    /// The host part of this pod's node names (`a1@HOST`), told to other
    /// pods; `${VAR}` is taken from the environment (e.g. `${POD_IP}` from
    /// the downward API). Required with `service`.
    #[serde(default)]
    pub host: String,
    /// Host part of the nodes of pods without distproxy (stock EPMD, asked
    /// with NAMES): `{ip}` or `{ip_dashed}` filled in with the pod's address.
    /// Empty: such pods are not discovered.
    #[serde(default)]
    pub host_template: String,
    /// How often the service is resolved and every pod asked.
    #[serde(default = "default_discovery_refresh_interval_ms")]
    pub refresh_interval_ms: Millis,
    /// The EPMD port of the other pods.
    #[serde(default = "default_discovery_epmd_port")]
    pub epmd_port: u16,
    /// Deadline for resolving the service name.
    #[serde(default = "default_discovery_resolve_timeout_ms")]
    pub resolve_timeout_ms: Millis,
    /// Deadline for asking one pod (connect, request, reply, any fallback).
    #[serde(default = "default_discovery_query_timeout_ms")]
    pub query_timeout_ms: Millis,
    /// Pods asked at once.
    #[serde(default = "default_discovery_max_concurrent_queries")]
    pub max_concurrent_queries: usize,
}

fn default_discovery_refresh_interval_ms() -> Millis {
    Millis(5_000)
}
fn default_discovery_epmd_port() -> u16 {
    4369
}
fn default_discovery_resolve_timeout_ms() -> Millis {
    Millis(2_000)
}
fn default_discovery_query_timeout_ms() -> Millis {
    Millis(2_000)
}
fn default_discovery_max_concurrent_queries() -> usize {
    32
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            service: String::new(),
            host: String::new(),
            host_template: String::new(),
            refresh_interval_ms: default_discovery_refresh_interval_ms(),
            epmd_port: default_discovery_epmd_port(),
            resolve_timeout_ms: default_discovery_resolve_timeout_ms(),
            query_timeout_ms: default_discovery_query_timeout_ms(),
            max_concurrent_queries: default_discovery_max_concurrent_queries(),
        }
    }
}

impl DiscoveryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        use crate::discovery::naming;
        let invalid = |key: &'static str, reason: String| Err(ConfigError::Invalid { key, reason });
        let service = self.service.trim_end_matches('.');
        if !self.service.is_empty()
            && (service.is_empty()
                || service.len() > 253
                || service.split('.').any(|l| {
                    l.is_empty()
                        || l.len() > 63
                        || !l
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                }))
            && self.service.parse::<std::net::IpAddr>().is_err()
        {
            return invalid(
                "discovery.service",
                format!("{:?} is not a DNS name (letters, digits, `-`, `_` in labels of 1 to 63 characters)", self.service),
            );
        }
        if !self.service.is_empty() && self.host.is_empty() {
            return invalid(
                "discovery.host",
                "is required with discovery.service: the host part of this pod's node names, e.g. \"${POD_IP}\"".into(),
            );
        }
        if !self.host.is_empty() {
            if let Err(e) = naming::check_env_syntax(&self.host) {
                return invalid("discovery.host", e.to_string());
            }
            let sample = naming::expand_env(&self.host, |_| Some("x".into())).unwrap_or_default();
            if let Err(e) = naming::check_host(&sample) {
                return invalid("discovery.host", e.to_string());
            }
        }
        if !self.host_template.is_empty() {
            if let Err(e) = naming::HostTemplate::parse(&self.host_template) {
                return invalid("discovery.host_template", e.to_string());
            }
        }
        check_ms(
            "discovery.refresh_interval_ms",
            self.refresh_interval_ms,
            100,
        )?;
        check_ms("discovery.resolve_timeout_ms", self.resolve_timeout_ms, 1)?;
        check_ms("discovery.query_timeout_ms", self.query_timeout_ms, 1)?;
        check_range("discovery.epmd_port", self.epmd_port, 1..=u16::MAX)?;
        check_range(
            "discovery.max_concurrent_queries",
            self.max_concurrent_queries,
            1..=1024,
        )
    }
}

#[cfg(test)]
mod discovery_tests {
    use super::*;

    #[test]
    fn discovery_defaults_and_values() {
        let c = Config::from_toml("", "t").unwrap();
        assert_eq!(c.discovery, DiscoveryConfig::default());
        assert!(c.discovery.service.is_empty());
        assert_eq!(c.discovery.refresh_interval_ms, Millis(5000));
        assert_eq!(c.discovery.epmd_port, 4369);
        let c = Config::from_toml(
            "[discovery]\nservice = \"myapp-headless.ns.svc.cluster.local\"\nhost = \"${POD_IP}\"\n\
             host_template = \"{ip_dashed}.ns.pod.cluster.local\"\nrefresh_interval_ms = 1000\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.discovery.host, "${POD_IP}");
        assert_eq!(Config::from_toml(&c.to_toml(), "rendered").unwrap(), c);
    }

    #[test]
    fn discovery_bad_values_name_the_key() {
        for (toml, key) in [
            ("service = \"svc\"\n", "discovery.host"),
            (
                "service = \"bad name\"\nhost = \"h\"\n",
                "discovery.service",
            ),
            ("service = \"a..b\"\nhost = \"h\"\n", "discovery.service"),
            ("host = \"${POD_IP\"\n", "discovery.host"),
            ("host = \"a@b\"\n", "discovery.host"),
            ("host_template = \"static\"\n", "discovery.host_template"),
            ("host_template = \"{pod}\"\n", "discovery.host_template"),
            (
                "refresh_interval_ms = 10\n",
                "discovery.refresh_interval_ms",
            ),
            ("query_timeout_ms = 0\n", "discovery.query_timeout_ms"),
            (
                "resolve_timeout_ms = 3600001\n",
                "discovery.resolve_timeout_ms",
            ),
            ("epmd_port = 0\n", "discovery.epmd_port"),
            (
                "max_concurrent_queries = 0\n",
                "discovery.max_concurrent_queries",
            ),
            ("servce = \"x\"\n", "servce"),
        ] {
            let err = Config::from_toml(&format!("[discovery]\n{toml}"), "t").unwrap_err();
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
    }
}

/// Dead-peer detection on both legs of every relayed connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    /// Idle time before the first keepalive probe (0: keepalive off).
    #[serde(default = "default_keepalive_idle_ms")]
    pub keepalive_idle_ms: Millis,
    /// Time between keepalive probes.
    #[serde(default = "default_keepalive_interval_ms")]
    pub keepalive_interval_ms: Millis,
    /// Unanswered probes before the connection is dropped.
    #[serde(default = "default_keepalive_count")]
    pub keepalive_count: u32,
    /// `TCP_USER_TIMEOUT`: sent data unacknowledged this long drops the
    /// connection (0: the kernel default, about 15 minutes).
    #[serde(default = "default_user_timeout_ms")]
    pub user_timeout_ms: Millis,
}

fn default_keepalive_idle_ms() -> Millis {
    Millis(10_000)
}
fn default_keepalive_interval_ms() -> Millis {
    Millis(5_000)
}
fn default_keepalive_count() -> u32 {
    3
}
fn default_user_timeout_ms() -> Millis {
    Millis(30_000)
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            keepalive_idle_ms: default_keepalive_idle_ms(),
            keepalive_interval_ms: default_keepalive_interval_ms(),
            keepalive_count: default_keepalive_count(),
            user_timeout_ms: default_user_timeout_ms(),
        }
    }
}

impl TcpConfig {
    /// The settings applied to both legs of a relayed connection.
    pub fn tuning(&self) -> crate::net::TcpTuning {
        crate::net::TcpTuning {
            keepalive_idle: self.keepalive_idle_ms.nonzero(),
            keepalive_interval: self.keepalive_interval_ms.duration(),
            keepalive_count: self.keepalive_count,
            user_timeout: self.user_timeout_ms.nonzero(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("tcp.keepalive_idle_ms", self.keepalive_idle_ms),
            ("tcp.user_timeout_ms", self.user_timeout_ms),
        ] {
            // 0 is off; else whole seconds (the kernel counts keepalive
            // time in seconds).
            if value.0 != 0 {
                check_ms(key, value, 1_000)?;
            }
        }
        check_ms(
            "tcp.keepalive_interval_ms",
            self.keepalive_interval_ms,
            1_000,
        )?;
        check_range("tcp.keepalive_count", self.keepalive_count, 1..=127)
    }
}

/// How relayed bytes move once a connection is routed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The kernel fast path for plain relayed connections.
    #[serde(default)]
    pub fast_path: FastPath,
    /// Most connections on the fast path at once (two sockmap entries
    /// each); more are spliced.
    #[serde(default = "default_fast_path_max_connections")]
    pub fast_path_max_connections: u32,
    /// Node routes on the fast path: `"off"`, `"auto"` (the sidecar's own
    /// cgroup v2), or the path of the cgroup v2 directory holding the BEAM
    /// nodes.
    #[serde(default = "default_fast_path_cgroup")]
    pub fast_path_cgroup: String,
    /// How long one side of a relayed connection may keep its direction
    /// open after the other side closed; 0 waits as long as it takes.
    #[serde(default = "default_half_close_timeout_ms")]
    pub half_close_timeout_ms: Millis,
}

fn default_half_close_timeout_ms() -> Millis {
    Millis(10_000)
}

fn default_fast_path_cgroup() -> String {
    "off".to_string()
}

/// The data path of plain relayed connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FastPath {
    /// `splice(2)` through a pipe (small messages copied), in the sidecar.
    #[default]
    Off,
    /// A sockmap with an `sk_skb` verdict program: the kernel redirects
    /// each socket's bytes to its partner (CAP_BPF and CAP_NET_ADMIN).
    Sockmap,
}

fn default_fast_path_max_connections() -> u32 {
    4096
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            fast_path: FastPath::Off,
            fast_path_max_connections: default_fast_path_max_connections(),
            fast_path_cgroup: default_fast_path_cgroup(),
            half_close_timeout_ms: default_half_close_timeout_ms(),
        }
    }
}

impl RelayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let cgroup = self.fast_path_cgroup.as_str();
        if !matches!(cgroup, "auto" | "off") && !cgroup.starts_with('/') {
            return Err(ConfigError::Invalid {
                key: "relay.fast_path_cgroup",
                reason: format!(
                    "{cgroup:?}: expected \"auto\", \"off\" or the absolute path of a cgroup v2 directory"
                ),
            });
        }
        if self.half_close_timeout_ms.0 != 0 {
            check_ms(
                "relay.half_close_timeout_ms",
                self.half_close_timeout_ms,
                100,
            )?;
        }
        check_range(
            "relay.fast_path_max_connections",
            self.fast_path_max_connections,
            1..=1_000_000,
        )
    }

    /// Where node routes look for nodes: None when off.
    pub fn node_routes_cgroup(&self) -> Option<NodeRoutesCgroup> {
        match self.fast_path_cgroup.as_str() {
            "off" => None,
            "auto" => Some(NodeRoutesCgroup::Own),
            path => Some(NodeRoutesCgroup::Path(PathBuf::from(path))),
        }
    }
}

/// The cgroup of `relay.fast_path_cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeRoutesCgroup {
    /// The sidecar's own cgroup v2.
    Own,
    Path(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_matches_code_defaults() {
        assert_eq!(Config::embedded_default(), Config::default());
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let c = Config::from_toml("", "test").unwrap();
        let both = |p: u16| -> Vec<SocketAddr> {
            vec![
                format!("0.0.0.0:{p}").parse().unwrap(),
                format!("[::]:{p}").parse().unwrap(),
            ]
        };
        assert_eq!(c.epmd.listen, both(4369));
        assert_eq!(c.dist.listen, both(43691));
        assert_eq!(c.routing.lookup_ttl_ms, Millis(3000));
        assert_eq!(c.routing.loopback_lookups, LoopbackLookups::Direct);
        assert_eq!(c.dist.beam_tls, BeamTls::Route);
        assert_eq!(c.epmd.idle_timeout_ms, Millis(10_000));
        assert!(!c.epmd.relaxed_command_check);
    }

    #[test]
    fn millis_keys_are_whole_milliseconds_and_become_durations() {
        let c = Config::from_toml(
            "[tcp]\nkeepalive_idle_ms = 0\nuser_timeout_ms = 45000\n",
            "t",
        )
        .unwrap();
        let t = c.tcp.tuning();
        assert_eq!(t.keepalive_idle, None, "0 turns keepalive off");
        assert_eq!(t.keepalive_interval, Duration::from_secs(5));
        assert_eq!(t.user_timeout, Some(Duration::from_secs(45)));
        assert_eq!(
            Config::default().tcp.tuning().keepalive_idle,
            Some(Duration::from_secs(10))
        );
        // Not a count, not a float, not negative: refused by the parser,
        // naming the key.
        for bad in ["-1", "1.5", "\"5s\""] {
            let err = Config::from_toml(&format!("[routing]\nlookup_ttl_ms = {bad}\n"), "t")
                .unwrap_err()
                .to_string();
            assert!(err.contains("lookup_ttl_ms"), "{bad}: {err}");
        }
    }

    #[test]
    fn listen_accepts_string_or_list_and_ipv6() {
        let c = Config::from_toml(
            "[epmd]\nlisten = [\"0.0.0.0:4369\", \"[::]:4369\"]\n[dist]\nlisten = \"[::1]:5000\"\n",
            "test",
        )
        .unwrap();
        assert_eq!(c.epmd.listen.len(), 2);
        assert!(c.epmd.listen[1].is_ipv6());
        assert_eq!(c.dist.listen, vec!["[::1]:5000".parse().unwrap()]);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::from_toml("[dist]\nlisten_port = 1\n", "test").unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
        let err = Config::from_toml("[nope]\n", "test").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    /// Errors of the TOML layer (a wrong type, a value no key accepts, an
    /// unknown key) name the key with its section, as `validate`'s do:
    /// the bare message only quoted the line (`listen = 5`), not which
    /// section's `listen` it was.
    #[test]
    fn parse_errors_name_the_key_with_its_section() {
        let cases = [
            ("[epmd]\nlisten = 5\n", "epmd.listen"),
            (
                "# c\n[dist]\nmax_connections = -1\n",
                "dist.max_connections",
            ),
            (
                "[dist]\nhandshake_timeout_ms = \"5s\"\n",
                "dist.handshake_timeout_ms",
            ),
            (
                "[admin]\nlisten = [\n  \"0.0.0.0:1\",\n  \"bad\",\n]\n",
                "admin.listen",
            ),
            ("[tunnel]\nbogus_key = 1\n", "tunnel.bogus_key"),
            // Which `[[acl]]` rule: the second.
            (
                "[[acl]]\naction = \"allow\"\n[[acl]]\naction = \"maybe\"\n",
                "acl[1].action",
            ),
            ("[relay]\n\"fast_path\" = \"bpf\"\n", "relay.fast_path"),
            ("[bogus]\nx = 1\n", "`bogus`"),
            ("x = 1\n", "`x`"),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(text, "t").unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
            assert!(err.contains("line"), "the location stays: {err}");
        }
    }

    #[test]
    fn changes_needing_restart_leave_out_what_a_reload_applies() {
        let base = Config::from_toml("[dist]\nmax_connections = 10\n", "t").unwrap();
        let acl_only = Config::from_toml(
            "[dist]\nmax_connections = 10\nacl_default = \"deny\"\n\
             [[acl]]\naction = \"allow\"\ntarget = \"a1\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            base.changes_needing_restart(&acl_only),
            Vec::<String>::new()
        );
        let more = Config::from_toml(
            "[dist]\nmax_connections = 11\n[limits]\nwrite_timeout_ms = 7\n\
             [tls]\nca_file = \"/x\"\ncert_file = \"/x\"\nkey_file = \"/x\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            base.changes_needing_restart(&more),
            [
                "dist.max_connections",
                "limits.write_timeout_ms",
                "tls.ca_file",
                "tls.cert_file",
                "tls.key_file"
            ]
        );
    }

    /// Listen addresses that cannot all be bound are a configuration
    /// error, not a bind failure at start (`check-config` passed them).
    #[test]
    fn overlapping_listen_addresses_are_refused() {
        let cases = [
            (
                "[dist]\nlisten = \"0.0.0.0:4369\"\n",
                "dist.listen",
                "epmd.listen",
            ),
            (
                "[epmd]\nlisten = \"0.0.0.0:5000\"\n[admin]\nlisten = \"127.0.0.1:5000\"\n",
                "admin.listen",
                "epmd.listen",
            ),
            (
                "[dist]\nlisten = [\"127.0.0.1:5000\", \"127.0.0.1:5000\"]\n",
                "dist.listen",
                "the same list",
            ),
            (
                "[admin]\nlisten = [\"[::1]:43691\"]\n",
                "admin.listen",
                "dist.listen",
            ),
            // IPv4-mapped: an IPv6-only socket cannot bind it.
            (
                "[epmd]\nlisten = \"[::ffff:127.0.0.1]:4369\"\n",
                "epmd.listen",
                "write 127.0.0.1:4369",
            ),
            (
                "[dist]\nlisten = [\"0.0.0.0:43691\", \"[::ffff:0.0.0.0]:43692\"]\n",
                "dist.listen",
                "write 0.0.0.0:43692",
            ),
        ];
        for (text, key, other) in cases {
            let err = Config::from_toml(text, "t").unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(other), "{text:?}: {err}");
        }
        for fine in [
            // The two families' wildcards (the defaults).
            "[epmd]\nlisten = [\"0.0.0.0:5000\", \"[::]:5000\"]\n",
            "[epmd]\nlisten = \"127.0.0.1:0\"\n[dist]\nlisten = \"127.0.0.1:0\"\n",
            "[epmd]\nlisten = \"127.0.0.1:5000\"\n[admin]\nlisten = \"127.0.0.2:5000\"\n",
        ] {
            Config::from_toml(fine, "t").unwrap_or_else(|e| panic!("{fine:?}: {e}"));
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::from_toml("[routing]\nlookup_ttl_ms = 0\n", "t").unwrap_err();
        assert!(err.to_string().contains("routing.lookup_ttl_ms"), "{err}");
        let err =
            Config::from_toml("[routing]\nloopback_lookups = \"sometimes\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("loopback_lookups"), "{err}");
        for bad in ["16", "129", "300"] {
            let text = format!("[limits]\nipv6_source_prefix_len = {bad}\n");
            let err = Config::from_toml(&text, "t").unwrap_err().to_string();
            assert!(
                err.contains("limits.ipv6_source_prefix_len"),
                "{bad}: {err}"
            );
        }
        let c = Config::from_toml("[limits]\nipv6_source_prefix_len = 64\n", "t").unwrap();
        assert_eq!(c.limits.ipv6_source_prefix_len, 64);
        assert_eq!(Config::default().limits.ipv6_source_prefix_len, 128);
        let err = Config::from_toml("[dist]\nbeam_tls = \"decrypt\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("beam_tls"), "{err}");
        let c = Config::from_toml("[dist]\nbeam_tls = \"refuse\"\n", "t").unwrap();
        assert_eq!(c.dist.beam_tls, BeamTls::Refuse);
        let err = Config::from_toml("[dist]\nlisten = \"nowhere\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let err = Config::from_toml("[epmd]\nlisten = []\n", "t").unwrap_err();
        assert!(err.to_string().contains("epmd.listen"), "{err}");
        let err = Config::from_toml("[dist]\nadvertise_port = 0\n", "t").unwrap_err();
        assert!(err.to_string().contains("dist.advertise_port"), "{err}");
        let err = Config::from_toml("[dist]\nmax_connections = 0\n", "t").unwrap_err();
        assert!(err.to_string().contains("dist.max_connections"), "{err}");
        // Accepted before, then `run` panicked sizing its descriptors.
        let err =
            Config::from_toml("[dist]\nmax_connections = 9223372036854775807\n", "t").unwrap_err();
        assert!(err.to_string().contains("dist.max_connections"), "{err}");
        assert!(err.to_string().contains("1000000"), "{err}");
        let c = Config::from_toml("[dist]\nmax_connections = 1000000\n", "t").unwrap();
        assert_eq!(c.dist.max_connections, 1_000_000);
        let err = Config::from_toml("[tunnel]\nmax_egress_listeners = 1000001\n", "t").unwrap_err();
        assert!(
            err.to_string().contains("tunnel.max_egress_listeners"),
            "{err}"
        );
    }

    #[test]
    fn admin_listen_can_be_turned_off_and_ready_nodes_are_checked() {
        let c = Config::from_toml("[admin]\nlisten = \"\"\n", "t").unwrap();
        assert_eq!(c.admin.listen, vec![]);
        let c = Config::from_toml("[admin]\nlisten = []\n", "t").unwrap();
        assert_eq!(c.admin.listen, vec![]);
        let c = Config::from_toml("[admin]\nlisten = [\"0.0.0.0:1\", \"[::]:1\"]\n", "t").unwrap();
        assert_eq!(c.admin.listen.len(), 2);
        assert_eq!(Config::default().admin.listen.len(), 2, "both families");
        let c = Config::from_toml(
            "[admin]\nlisten = \"127.0.0.1:9000\"\nready_nodes = [\"a\"]\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.admin.listen, vec!["127.0.0.1:9000".parse().unwrap()]);
        assert_eq!(c.admin.ready_nodes, vec!["a"]);
        let err = Config::from_toml("[admin]\nlisten = \"nope\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let err = Config::from_toml("[admin]\nready_nodes = [\"\"]\n", "t").unwrap_err();
        assert!(err.to_string().contains("admin.ready_nodes"), "{err}");
        // A full name never registers (nodes register the part before
        // `@`): refused, naming the key and the name to use.
        let err =
            Config::from_toml("[admin]\nready_nodes = [\"a1@pod-0.svc\"]\n", "t").unwrap_err();
        assert!(err.to_string().contains("admin.ready_nodes"), "{err}");
        assert!(err.to_string().contains("\"a1\""), "{err}");
        let mut off = Config::default();
        off.admin.listen = Vec::new();
        assert_eq!(Config::from_toml(&off.to_toml(), "t").unwrap(), off);
    }

    #[test]
    fn rendered_config_parses_back_to_itself() {
        let mut c = Config::default();
        c.dist.advertise_port = Some(4000);
        c.routing.loopback_lookups = LoopbackLookups::Proxy;
        c.epmd.state_file = Some("/var/lib/distproxy/registry.json".into());
        c.admin.ready_nodes = vec!["a".into()];
        let back = Config::from_toml(&c.to_toml(), "rendered").unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn tunnel_section_defaults_and_errors() {
        let c = Config::from_toml("", "t").unwrap();
        assert!(c.tunnel.egress);
        assert_eq!(c.tunnel.remote_port, 43691);
        assert_eq!(c.tunnel.egress_idle_timeout_ms, Millis(60_000));
        assert_eq!(c.tunnel.max_egress_listeners, 1024);
        let c = Config::from_toml(
            "[tunnel]\negress = false\nremote_port = 5000\nresolve_timeout_ms = 250\n",
            "t",
        )
        .unwrap();
        assert!(!c.tunnel.egress);
        assert_eq!(c.tunnel.remote_port, 5000);
        assert_eq!(
            c.tunnel.resolve_timeout_ms.duration(),
            Duration::from_millis(250)
        );
        for (toml, key) in [
            ("[tunnel]\nremote_port = 0\n", "tunnel.remote_port"),
            (
                "[tunnel]\nmax_egress_listeners = 0\n",
                "tunnel.max_egress_listeners",
            ),
            (
                "[tunnel]\negress_idle_timeout_ms = 0\n",
                "tunnel.egress_idle_timeout_ms",
            ),
            (
                "[tunnel]\nconnect_timeout_ms = 3600001\n",
                "tunnel.connect_timeout_ms",
            ),
            (
                "[tunnel]\npreamble_timeout_ms = 0\n",
                "tunnel.preamble_timeout_ms",
            ),
            (
                "[tunnel]\nresolve_timeout_ms = 0\n",
                "tunnel.resolve_timeout_ms",
            ),
            ("[tunnel]\nremote_prot = 1\n", "remote_prot"),
            ("[tunnel]\nremote_port = 70000\n", "remote_port"),
        ] {
            let err = Config::from_toml(toml, "t").unwrap_err();
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn every_file_in_config_dir_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) == Some("toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 1, "no configuration files in {}", dir.display());
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;

    const FILES: &str =
        "[tls]\ncert_file = \"/t/tls.crt\"\nkey_file = \"/t/tls.key\"\nca_file = \"/t/ca.crt\"\n";

    #[test]
    fn tls_is_off_by_default_and_on_with_the_three_files() {
        let c = Config::from_toml("", "t").unwrap();
        assert!(!c.tls.enabled());
        assert_eq!(c.tls, TlsConfig::default());
        assert_eq!(c.tls.verify_server_name, ServerNameVerification::Hostname);
        assert_eq!(c.tls.handshake_timeout_ms, Millis(5000));
        assert_eq!(c.tls.reload_interval_ms, Millis(1000));
        let c = Config::from_toml(
            &format!("{FILES}require_tls = true\nverify_server_name = \"ca_only\"\nbind_node_names = true\n"),
            "t",
        )
        .unwrap();
        assert!(c.tls.enabled());
        assert!(c.tls.require_tls && c.tls.bind_node_names);
        assert_eq!(c.tls.verify_server_name, ServerNameVerification::CaOnly);
        assert_eq!(c.tls.ca_file.as_deref(), Some(Path::new("/t/ca.crt")));
    }

    #[test]
    fn tls_files_must_come_together() {
        let err =
            Config::from_toml("[tls]\ncert_file = \"/c\"\nca_file = \"/a\"\n", "t").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("tls.key_file") && msg.contains("tls.cert_file"),
            "{msg}"
        );
        let err = Config::from_toml("[tls]\nkey_file = \"/k\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("tls.cert_file"), "{err}");
        let err = Config::from_toml(&FILES.replace("/t/ca.crt", ""), "t").unwrap_err();
        assert!(err.to_string().contains("tls.ca_file"), "{err}");
    }

    #[test]
    fn tls_policies_need_tls() {
        let err = Config::from_toml("[tls]\nrequire_tls = true\n", "t").unwrap_err();
        assert!(err.to_string().contains("tls.require_tls"), "{err}");
        let err = Config::from_toml("[tls]\nbind_node_names = true\n", "t").unwrap_err();
        assert!(err.to_string().contains("tls.bind_node_names"), "{err}");
    }

    #[test]
    fn tls_bad_values_name_the_key() {
        let err =
            Config::from_toml(&format!("{FILES}verify_server_name = \"sni\"\n"), "t").unwrap_err();
        assert!(err.to_string().contains("verify_server_name"), "{err}");
        let err =
            Config::from_toml(&format!("{FILES}handshake_timeout_ms = 0\n"), "t").unwrap_err();
        assert!(
            err.to_string().contains("tls.handshake_timeout_ms"),
            "{err}"
        );
        let err =
            Config::from_toml(&format!("{FILES}reload_interval_ms = 3600001\n"), "t").unwrap_err();
        assert!(err.to_string().contains("tls.reload_interval_ms"), "{err}");
        let err = Config::from_toml(&format!("{FILES}certfile = \"/x\"\n"), "t").unwrap_err();
        assert!(err.to_string().contains("certfile"), "{err}");
    }

    #[test]
    fn tls_config_renders_and_parses_back() {
        let c = Config::from_toml(
            &format!("{FILES}require_tls = true\nverify_server_name = \"ca_only\"\n"),
            "t",
        )
        .unwrap();
        let back = Config::from_toml(&c.to_toml(), "rendered").unwrap();
        assert_eq!(back, c);
        assert!(c.to_toml().contains("verify_server_name = \"ca_only\""));
    }

    #[test]
    fn relay_fast_path_is_off_by_default_and_checked() {
        let c = Config::from_toml("", "t").unwrap();
        assert_eq!(c.relay.fast_path, FastPath::Off);
        let c = Config::from_toml("[relay]\nfast_path = \"sockmap\"\n", "t").unwrap();
        assert_eq!(c.relay.fast_path, FastPath::Sockmap);
        assert!(Config::from_toml("[relay]\nfast_path = \"ebpf\"\n", "t").is_err());
        assert_eq!(c.relay.node_routes_cgroup(), None, "off by default");
        assert_eq!(Config::default().relay.node_routes_cgroup(), None);
        let c = Config::from_toml("[relay]\nfast_path_cgroup = \"auto\"\n", "t").unwrap();
        assert_eq!(c.relay.node_routes_cgroup(), Some(NodeRoutesCgroup::Own));
        let c =
            Config::from_toml("[relay]\nfast_path_cgroup = \"/sys/fs/cgroup/pod\"\n", "t").unwrap();
        assert_eq!(
            c.relay.node_routes_cgroup(),
            Some(NodeRoutesCgroup::Path(PathBuf::from("/sys/fs/cgroup/pod")))
        );
        let err = Config::from_toml("[relay]\nfast_path_cgroup = \"pod\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("relay.fast_path_cgroup"), "{err}");
        assert_eq!(
            Config::default().relay.half_close_timeout_ms.nonzero(),
            Some(Duration::from_secs(10))
        );
        let c = Config::from_toml("[relay]\nhalf_close_timeout_ms = 0\n", "t").unwrap();
        assert_eq!(c.relay.half_close_timeout_ms.nonzero(), None, "0 waits");
        let err = Config::from_toml("[relay]\nhalf_close_timeout_ms = 5\n", "t").unwrap_err();
        assert!(
            err.to_string().contains("relay.half_close_timeout_ms"),
            "{err}"
        );
        let err = Config::from_toml("[relay]\nfast_path_max_connections = 0\n", "t").unwrap_err();
        assert!(
            err.to_string().contains("relay.fast_path_max_connections"),
            "{err}"
        );
    }
}
