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

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::config::{ResolverConfig, ResolverOpts};
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
            Ok(builder) => builder.build(),
            Err(e) => {
                warn!(error = %e,
                    "cannot read the system resolver configuration; resolving with /etc/hosts only");
                TokioResolver::builder_with_config(
                    ResolverConfig::new(),
                    TokioConnectionProvider::default(),
                )
                .with_options(ResolverOpts::default())
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

    /// Addresses of `host`, in the resolver's preference order (IPv4 first by
    /// default), within `timeout`.
    pub async fn resolve(
        &self,
        host: &str,
        timeout: Duration,
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
        let addrs: Vec<IpAddr> = lookup.iter().collect();
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

    #[tokio::test]
    async fn literals_need_no_lookup() {
        let r = Resolver::from_system_conf();
        let got = r
            .resolve("127.0.0.1", Duration::from_millis(1))
            .await
            .unwrap();
        assert_eq!(got, vec![IpAddr::from([127, 0, 0, 1])]);
    }

    #[tokio::test]
    async fn a_pinned_resolver_knows_one_host_only() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let r = Resolver::pinned_only("Pod-0.svc.test.", ip);
        let t = Duration::from_millis(1);
        assert_eq!(r.resolve("pod-0.svc.test", t).await.unwrap(), vec![ip]);
        assert_eq!(r.resolve("POD-0.svc.test.", t).await.unwrap(), vec![ip]);
        assert!(r.resolve("pod-1.svc.test", t).await.is_err());
        assert!(r.resolve("10.1.2.3", t).await.is_err(), "not even literals");
    }

    #[tokio::test]
    async fn localhost_comes_from_the_hosts_file() {
        // Every Linux /etc/hosts names localhost; no name server is asked.
        let r = Resolver::from_system_conf();
        let got = r
            .resolve("localhost", Duration::from_secs(5))
            .await
            .unwrap();
        assert!(got.iter().all(|ip| ip.is_loopback()), "{got:?}");
    }
}
