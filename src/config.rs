//! Configuration: serde types, named defaults, loading and validation.
//!
//! The file format is TOML with `deny_unknown_fields` everywhere, so a typo
//! is an error naming the key rather than a silently ignored setting. Units
//! are part of the key names (`*_ms`). Loading never binds a socket; the
//! binary reads the configuration, then binds, then serves.

use std::net::SocketAddr;
use std::path::Path;
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
    #[error("invalid configuration in {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpmdConfig {
    /// Addresses the EPMD server listens on (at least one).
    #[serde(default = "default_epmd_listen", deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// A connection without a complete request for this long is closed.
    #[serde(default = "default_epmd_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Like `epmd -relaxed_command_check`: allow STOP_REQ, and KILL_REQ
    /// while nodes are registered.
    #[serde(default)]
    pub relaxed_command_check: bool,
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
    pub handshake_timeout_ms: u64,
    /// Deadline for connecting to a local node.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Connections relayed at once; more are closed on accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
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
    pub lookup_ttl_ms: u64,
    /// Longest hold of a serialised lookup before it is answered "not found".
    #[serde(default = "default_max_hold_ms")]
    pub max_hold_ms: u64,
    #[serde(default)]
    pub loopback_lookups: LoopbackLookups,
}

fn default_epmd_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], 4369))]
}
fn default_epmd_idle_timeout_ms() -> u64 {
    10_000
}
fn default_dist_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], 43691))]
}
fn default_handshake_timeout_ms() -> u64 {
    5_000
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_max_connections() -> usize {
    4096
}
fn default_lookup_ttl_ms() -> u64 {
    3_000
}
fn default_max_hold_ms() -> u64 {
    8_000
}

impl Default for EpmdConfig {
    fn default() -> Self {
        Self {
            listen: default_epmd_listen(),
            idle_timeout_ms: default_epmd_idle_timeout_ms(),
            relaxed_command_check: false,
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

impl Config {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
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
        for (key, value) in [
            ("epmd.idle_timeout_ms", self.epmd.idle_timeout_ms),
            ("dist.handshake_timeout_ms", self.dist.handshake_timeout_ms),
            ("dist.connect_timeout_ms", self.dist.connect_timeout_ms),
            ("routing.lookup_ttl_ms", self.routing.lookup_ttl_ms),
            ("routing.max_hold_ms", self.routing.max_hold_ms),
        ] {
            if value == 0 {
                return invalid(key, "must be greater than 0");
            }
            if value > 3_600_000 {
                return invalid(key, "must be at most 3600000 (one hour)");
            }
        }
        if self.dist.max_connections == 0 {
            return invalid("dist.max_connections", "must be greater than 0");
        }
        if self.dist.advertise_port == Some(0) {
            return invalid(
                "dist.advertise_port",
                "must be a port number from 1 to 65535",
            );
        }
        if self.dist.advertise_port.is_none() && self.dist.listen[0].port() == 0 {
            // Allowed (tests bind port 0): the bound port is advertised.
        }
        Ok(())
    }

    /// The configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

impl EpmdConfig {
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

impl DistConfig {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

impl RoutingConfig {
    pub fn lookup_ttl(&self) -> Duration {
        Duration::from_millis(self.lookup_ttl_ms)
    }
    pub fn max_hold(&self) -> Duration {
        Duration::from_millis(self.max_hold_ms)
    }
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
        assert_eq!(c.epmd.listen, vec!["0.0.0.0:4369".parse().unwrap()]);
        assert_eq!(c.dist.listen, vec!["0.0.0.0:43691".parse().unwrap()]);
        assert_eq!(c.routing.lookup_ttl_ms, 3000);
        assert_eq!(c.routing.loopback_lookups, LoopbackLookups::Direct);
        assert_eq!(c.epmd.idle_timeout_ms, 10_000);
        assert!(!c.epmd.relaxed_command_check);
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

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::from_toml("[routing]\nlookup_ttl_ms = 0\n", "t").unwrap_err();
        assert!(err.to_string().contains("routing.lookup_ttl_ms"), "{err}");
        let err =
            Config::from_toml("[routing]\nloopback_lookups = \"sometimes\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("loopback_lookups"), "{err}");
        let err = Config::from_toml("[dist]\nlisten = \"nowhere\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let err = Config::from_toml("[epmd]\nlisten = []\n", "t").unwrap_err();
        assert!(err.to_string().contains("epmd.listen"), "{err}");
        let err = Config::from_toml("[dist]\nadvertise_port = 0\n", "t").unwrap_err();
        assert!(err.to_string().contains("dist.advertise_port"), "{err}");
        let err = Config::from_toml("[dist]\nmax_connections = 0\n", "t").unwrap_err();
        assert!(err.to_string().contains("dist.max_connections"), "{err}");
    }

    #[test]
    fn rendered_config_parses_back_to_itself() {
        let mut c = Config::default();
        c.dist.advertise_port = Some(4000);
        c.routing.loopback_lookups = LoopbackLookups::Proxy;
        let back = Config::from_toml(&c.to_toml(), "rendered").unwrap();
        assert_eq!(back, c);
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
