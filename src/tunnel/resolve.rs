//! Resolving a remote node's host the way the pod would, with
//! [hickory-resolver](https://docs.rs/hickory-resolver).
//!
//! The resolver is built from the system configuration
//! (`TokioResolver::builder_tokio`): `/etc/resolv.conf` gives the name
//! servers, `search`/`domain` and `options ndots/timeout/attempts`, and
//! `/etc/hosts` is consulted first. So in Kubernetes a node named
//! `b1@pod-b.svc-headless` resolves through the pod's search list
//! (`<ns>.svc.cluster.local`, ...), as `getaddrinfo` would.
//!
//! What hickory 0.25 does, from its source (`Resolver::build_names`,
//! `LookupIpFuture`, `Hosts::lookup_static_host`), where it matters:
//!
//! - A name with fewer dots than `ndots` (default 1) is tried with each
//!   search domain appended first, then as given; otherwise as given first.
//! - **Each candidate** is looked up in `/etc/hosts` before DNS. So, unlike
//!   glibc's `files` backend, search domains apply to hosts-file entries too:
//!   `pod-b` finds a hosts line for `pod-b.dp.test` under `search dp.test`.
//! - `/etc/hosts` is read once, when the resolver is built (at start-up);
//!   DNS answers are cached for their TTL.
//! - IP literals are answered without any lookup. We short-circuit them
//!   ourselves too (also in `[...]` brackets), so they never depend on the
//!   resolver's configuration.
//! - Its default strategy (`Ipv4thenIpv6`) asks for AAAA records only when
//!   a name has no A record, so in a dual-stack cluster a pod would be
//!   reached over IPv4 only, even when its sidecar listens on IPv6 only or
//!   IPv4 is filtered between the pods. We ask for both (`Ipv4AndIpv6`)
//!   and order the answer ourselves ([`Family`]): the caller tries each
//!   address in turn.

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use tracing::warn;

/// Why a host could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("timed out resolving {host} after {ms} ms", ms = .timeout.as_millis())]
    Timeout { host: String, timeout: Duration },
    #[error("failed to resolve {host}: {source}")]
    Lookup {
        host: String,
        source: hickory_resolver::ResolveError,
    },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
}

/// Which address family to try first when a host has both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 addresses first (what `getaddrinfo` does for unique local
    /// IPv6 addresses, and what the node of `inet_tcp` would dial).
    V4First,
    /// IPv6 addresses first (what a node of `inet6_tcp` would dial).
    V6First,
}

impl Family {
    /// The family a local peer at `ip` speaks: IPv6 first for an IPv6
    /// peer (an `inet6_tcp` node on `::1`), IPv4 first otherwise.
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => Family::V6First,
            _ => Family::V4First,
        }
    }

    /// `addrs` with this family's addresses first, each family in the
    /// order given, duplicates dropped.
    pub fn order(self, addrs: &[IpAddr]) -> Vec<IpAddr> {
        let first_v6 = self == Family::V6First;
        let mut out: Vec<IpAddr> = Vec::with_capacity(addrs.len());
        for pass_v6 in [first_v6, !first_v6] {
            for ip in addrs.iter().map(|ip| ip.to_canonical()) {
                if ip.is_ipv6() == pass_v6 && !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
        out
    }
}

/// Resolves remote hosts; cheap to share (the cache is inside).
pub struct Resolver {
    inner: TokioResolver,
    /// `distproxy remsh`: this one host resolves to this address, every
    /// other host to nothing (connections go through one forwarded port).
    pinned: Option<(String, IpAddr)>,
}

impl Resolver {
    /// A resolver from the system configuration. If it cannot be read, logs
    /// why and uses one with no name servers (IP literals and `/etc/hosts`
    /// still work), rather than querying servers the pod was never given.
    pub fn from_system_conf() -> Resolver {
        let inner = match TokioResolver::builder_tokio() {
            Ok(mut builder) => {
                builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
                builder.build()
            }
            Err(e) => {
                warn!(error = %e,
                    "cannot read the system resolver configuration; resolving with /etc/hosts only");
                TokioResolver::builder_with_config(
                    ResolverConfig::new(),
                    TokioConnectionProvider::default(),
                )
                .with_options({
                    let mut opts = ResolverOpts::default();
                    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
                    opts
                })
                .build()
            }
        };
        Resolver {
            inner,
            pinned: None,
        }
    }

    /// A resolver that knows one host only: `host` (ASCII case-insensitive,
    /// trailing dot ignored) is `ip`; anything else, IP literals included,
    /// resolves to no address. Used by `distproxy remsh`, where every
    /// connection must go through the forwarded port.
    pub fn pinned_only(host: &str, ip: IpAddr) -> Resolver {
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        Resolver {
            pinned: Some((host, ip)),
            ..Resolver::from_system_conf()
        }
    }

    /// Addresses of `host` of both families, `family`'s first, within
    /// `timeout`.
    pub async fn resolve(
        &self,
        host: &str,
        timeout: Duration,
        family: Family,
    ) -> Result<Vec<IpAddr>, ResolveError> {
        if let Some((pinned, ip)) = &self.pinned {
            let bare = host.strip_suffix('.').unwrap_or(host);
            return if bare.eq_ignore_ascii_case(pinned) {
                Ok(vec![*ip])
            } else {
                Err(ResolveError::NoAddress {
                    host: host.to_owned(),
                })
            };
        }
        if let Some(ip) = ip_literal(host) {
            return Ok(vec![ip]);
        }
        let lookup = tokio::time::timeout(timeout, self.inner.lookup_ip(host))
            .await
            .map_err(|_| ResolveError::Timeout {
                host: host.to_owned(),
                timeout,
            })?
            .map_err(|source| ResolveError::Lookup {
                host: host.to_owned(),
                source,
            })?;
        let addrs = family.order(&lookup.iter().collect::<Vec<_>>());
        if addrs.is_empty() {
            return Err(ResolveError::NoAddress {
                host: host.to_owned(),
            });
        }
        Ok(addrs)
    }
}

/// `host` as an IP address, if it is one (`10.1.2.3`, `::1`, `[::1]`).
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals() {
        assert_eq!(ip_literal("10.1.2.3"), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(ip_literal("::1"), Some("::1".parse().unwrap()));
        assert_eq!(ip_literal("[fd00::5]"), Some("fd00::5".parse().unwrap()));
        assert_eq!(ip_literal("pod-b.dp.test"), None);
        assert_eq!(ip_literal("10.1.2"), None);
        assert_eq!(ip_literal("[10.1.2.3"), None);
    }

    #[test]
    fn addresses_are_ordered_by_the_family_asked_for() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let got = [ip("fd00::2"), ip("10.0.0.2"), ip("fd00::3"), ip("10.0.0.3")];
        assert_eq!(
            Family::V4First.order(&got),
            [ip("10.0.0.2"), ip("10.0.0.3"), ip("fd00::2"), ip("fd00::3")]
        );
        assert_eq!(
            Family::V6First.order(&got),
            [ip("fd00::2"), ip("fd00::3"), ip("10.0.0.2"), ip("10.0.0.3")]
        );
        // An IPv4-mapped answer is the IPv4 address, once.
        assert_eq!(
            Family::V6First.order(&[ip("::ffff:10.0.0.2"), ip("10.0.0.2")]),
            [ip("10.0.0.2")]
        );
        assert_eq!(Family::of(ip("::1")), Family::V6First);
        assert_eq!(Family::of(ip("127.0.0.1")), Family::V4First);
        assert_eq!(Family::of(ip("::ffff:127.0.0.1")), Family::V4First);
    }

    #[tokio::test]
    async fn literals_need_no_lookup() {
        let r = Resolver::from_system_conf();
        let got = r
            .resolve("127.0.0.1", Duration::from_millis(1), Family::V6First)
            .await
            .unwrap();
        assert_eq!(got, vec![IpAddr::from([127, 0, 0, 1])]);
    }

    #[tokio::test]
    async fn a_pinned_resolver_knows_one_host_only() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let r = Resolver::pinned_only("Pod-0.svc.test.", ip);
        let t = Duration::from_millis(1);
        assert_eq!(
            r.resolve("pod-0.svc.test", t, Family::V4First)
                .await
                .unwrap(),
            vec![ip]
        );
        assert_eq!(
            r.resolve("POD-0.svc.test.", t, Family::V4First)
                .await
                .unwrap(),
            vec![ip]
        );
        assert!(r
            .resolve("pod-1.svc.test", t, Family::V4First)
            .await
            .is_err());
        assert!(
            r.resolve("10.1.2.3", t, Family::V4First).await.is_err(),
            "not even literals"
        );
    }

    #[tokio::test]
    async fn localhost_comes_from_the_hosts_file() {
        // Every Linux /etc/hosts names localhost; no name server is asked.
        let r = Resolver::from_system_conf();
        let got = r
            .resolve("localhost", Duration::from_secs(5), Family::V4First)
            .await
            .unwrap();
        assert!(got.iter().all(|ip| ip.is_loopback()), "{got:?}");
    }
}
