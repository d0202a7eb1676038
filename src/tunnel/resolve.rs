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
//!   IPv4 is filtered between the pods. Its `Ipv4AndIpv6` waits for both
//!   answers, so a name found in `/etc/hosts` for one family waits for a
//!   name server's answer (or timeout) for the other. We run an IPv4-only
//!   and an IPv6-only resolver side by side instead ([`Resolver::resolve`])
//!   and order the answer ourselves ([`Family`]): the caller tries each
//!   address in turn.
//!
//! A host's addresses are remembered for [`RECENT_TTL`] once found: when a
//! pod's nodes all connect to another pod's nodes at once (a cluster
//! forming), hundreds of egress connections resolve the same host within
//! a few seconds. A name found only in `/etc/hosts` still made each of them wait
//! for the other family's name server ([`RESOLUTION_DELAY`], longer under
//! load: 0.5 s on average per connection in a 6 × 10 mesh of debug
//! sidecars), which hickory does not remember. An egress connection that
//! cannot reach an address forgets its host ([`Resolver::forget`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// Resolves remote hosts; cheap to share (the caches are inside).
pub struct Resolver {
    /// A records only, and AAAA records only: two lookups run side by
    /// side, so one family's slow or dead name server cannot hold up the
    /// other's answer (see [`Resolver::resolve`]).
    v4: TokioResolver,
    v6: TokioResolver,
    /// `distproxy remsh`: this one host resolves to this address, every
    /// other host to nothing (connections go through one forwarded port).
    pinned: Option<(String, IpAddr)>,
    /// Answers found, per (host, family), and until when they are used.
    recent: Mutex<HashMap<Key, (Instant, Vec<IpAddr>)>>,
}

/// A host (ASCII lowercase, no trailing dot) and the family asked first.
type Key = (String, Family);

/// How long a host's addresses are used without resolving it again.
pub const RECENT_TTL: Duration = Duration::from_secs(2);
/// Hosts remembered before expired answers are swept.
const SWEEP_ABOVE: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn key(host: &str, family: Family) -> Key {
    let bare = host.strip_suffix('.').unwrap_or(host);
    (bare.to_ascii_lowercase(), family)
}

/// Once one family has answered with addresses, how long the other one is
/// waited for (RFC 8305's "Resolution Delay"): a name server that does not
/// answer AAAA queries (or A queries, in an IPv6-only cluster) costs this,
/// not the resolve deadline.
const RESOLUTION_DELAY: Duration = Duration::from_millis(50);

impl Resolver {
    /// A resolver from the system configuration. If it cannot be read, logs
    /// why and uses one with no name servers (IP literals and `/etc/hosts`
    /// still work), rather than querying servers the pod was never given.
    pub fn from_system_conf() -> Resolver {
        let (config, opts) = match hickory_resolver::system_conf::read_system_conf() {
            Ok(conf) => conf,
            Err(e) => {
                warn!(error = %e,
                    "cannot read the system resolver configuration; resolving with /etc/hosts only");
                (ResolverConfig::new(), ResolverOpts::default())
            }
        };
        Resolver::from_config(config, opts)
    }

    /// A resolver of this configuration (one per family).
    fn from_config(config: ResolverConfig, opts: ResolverOpts) -> Resolver {
        let build = |strategy| {
            let mut opts = opts.clone();
            opts.ip_strategy = strategy;
            TokioResolver::builder_with_config(config.clone(), TokioConnectionProvider::default())
                .with_options(opts)
                .build()
        };
        Resolver::with(
            build(LookupIpStrategy::Ipv4Only),
            build(LookupIpStrategy::Ipv6Only),
        )
    }

    fn with(v4: TokioResolver, v6: TokioResolver) -> Resolver {
        Resolver {
            v4,
            v6,
            pinned: None,
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Forgets `host`'s remembered addresses (an egress connection could
    /// not reach them): the next lookup resolves it again.
    pub fn forget(&self, host: &str) {
        lock(&self.recent).retain(|(h, _), _| *h != key(host, Family::V4First).0);
    }

    fn remembered(&self, key: &Key) -> Option<Vec<IpAddr>> {
        match lock(&self.recent).get(key) {
            Some((until, addrs)) if *until > Instant::now() => Some(addrs.clone()),
            _ => None,
        }
    }

    /// A resolver that knows one host only: `host` (ASCII case-insensitive,
    /// trailing dot ignored) is `ip`; anything else, IP literals included,
    /// resolves to no address. Used by `distproxy remsh`, where every
    /// connection must go through the forwarded port.
    pub fn pinned_only(host: &str, ip: IpAddr) -> Resolver {
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let mut resolver = Resolver::from_system_conf();
        resolver.pinned = Some((host, ip));
        resolver
    }

    /// Addresses of `host` of both families, `family`'s first, within
    /// `timeout`. A and AAAA are looked up side by side; once one family
    /// has addresses, the other gets [`RESOLUTION_DELAY`] more, so a name
    /// that has one family only, or a name server that never answers for
    /// the other, costs no more than that. An error is the first family's
    /// (`family`'s) when neither has an address.
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
        let key = key(host, family);
        if let Some(addrs) = self.remembered(&key) {
            return Ok(addrs);
        }
        // Lookups of one host started before the first answer each ask
        // (none waits for another: a queue of waiters, each woken in turn,
        // took longer than the deadline under load).
        let found = self.lookup(host, timeout, family).await;
        if let Ok(addrs) = &found {
            let mut recent = lock(&self.recent);
            if recent.len() > SWEEP_ABOVE {
                let now = Instant::now();
                recent.retain(|_, (until, _)| *until > now);
            }
            recent.insert(key, (Instant::now() + RECENT_TTL, addrs.clone()));
        }
        found
    }

    /// [`Resolver::resolve`] without the memory: both families asked.
    async fn lookup(
        &self,
        host: &str,
        timeout: Duration,
        family: Family,
    ) -> Result<Vec<IpAddr>, ResolveError> {
        let (first, second) = match family {
            Family::V4First => (&self.v4, &self.v6),
            Family::V6First => (&self.v6, &self.v4),
        };
        let (first, second) = (
            lookup_family(first, host, timeout),
            lookup_family(second, host, timeout),
        );
        tokio::pin!(first, second);
        let has_addrs =
            |r: &Result<Vec<IpAddr>, ResolveError>| r.as_ref().is_ok_and(|a| !a.is_empty());
        // Whichever answers first; the other then waits at most the
        // resolution delay if the first had addresses.
        let (a, b) = tokio::select! {
            a = &mut first => {
                let b = if has_addrs(&a) {
                    tokio::time::timeout(RESOLUTION_DELAY, &mut second).await.ok()
                } else {
                    Some((&mut second).await)
                };
                (Some(a), b)
            }
            b = &mut second => {
                let a = if has_addrs(&b) {
                    tokio::time::timeout(RESOLUTION_DELAY, &mut first).await.ok()
                } else {
                    Some((&mut first).await)
                };
                (a, Some(b))
            }
        };
        let mut addrs = Vec::new();
        let mut error = None;
        for result in [a, b].into_iter().flatten() {
            match result {
                Ok(found) => addrs.extend(found),
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        let addrs = family.order(&addrs);
        if !addrs.is_empty() {
            return Ok(addrs);
        }
        Err(error.unwrap_or(ResolveError::NoAddress {
            host: host.to_owned(),
        }))
    }
}

/// `host`'s addresses from one single-family resolver, within `timeout`.
async fn lookup_family(
    resolver: &TokioResolver,
    host: &str,
    timeout: Duration,
) -> Result<Vec<IpAddr>, ResolveError> {
    match tokio::time::timeout(timeout, resolver.lookup_ip(host)).await {
        Err(_) => Err(ResolveError::Timeout {
            host: host.to_owned(),
            timeout,
        }),
        Ok(Err(source)) => Err(ResolveError::Lookup {
            host: host.to_owned(),
            source,
        }),
        Ok(Ok(found)) => Ok(found.iter().collect()),
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
    use std::sync::Arc;

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

    /// A name server on 127.0.0.1 that answers A queries with 10.1.2.3
    /// (TTL 0: hickory keeps nothing) and never AAAA ones, as a pod
    /// without IPv6 whose name server is slow to say so; counts both.
    fn fake_name_server() -> (
        u16,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        let (a, aaaa) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a2, aaaa2) = (Arc::clone(&a), Arc::clone(&aaaa));
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                // Header (12 bytes), then the question: labels, type, class.
                let mut i = 12;
                while i < n && buf[i] != 0 {
                    i += 1 + buf[i] as usize;
                }
                let qend = i + 5;
                if qend > n {
                    continue;
                }
                let qtype = u16::from_be_bytes([buf[i + 1], buf[i + 2]]);
                if qtype != 1 {
                    aaaa2.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                a2.fetch_add(1, Ordering::SeqCst);
                let mut reply = buf[..qend].to_vec();
                reply[2] = 0x81; // response, recursion desired
                reply[3] = 0x80; // recursion available, no error
                reply[6..8].copy_from_slice(&1u16.to_be_bytes()); // one answer
                reply[8..12].fill(0);
                reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 10, 1, 2, 3]);
                let _ = sock.send_to(&reply, from);
            }
        });
        (port, a, aaaa)
    }

    #[tokio::test]
    async fn a_host_found_is_not_asked_for_again_at_once() {
        use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts};
        use std::sync::atomic::Ordering;
        let (port, a, aaaa) = fake_name_server();
        let config = ResolverConfig::from_parts(
            None,
            vec![],
            NameServerConfigGroup::from_ips_clear(&[IpAddr::from([127, 0, 0, 1])], port, true),
        );
        let mut opts = ResolverOpts::default();
        opts.use_hosts_file = ResolveHosts::Never;
        opts.timeout = Duration::from_secs(1);
        opts.attempts = 0;
        let r = Arc::new(Resolver::from_config(config, opts));
        let expected = vec![IpAddr::from([10, 1, 2, 3])];
        let t = Duration::from_secs(5);
        let first = r.resolve("pod-b.dp.test", t, Family::V4First).await;
        assert_eq!(first.unwrap(), expected);
        let burst: Vec<_> = (0..20)
            .map(|_| {
                let r = Arc::clone(&r);
                tokio::spawn(async move { r.resolve("pod-b.dp.test", t, Family::V4First).await })
            })
            .collect();
        for lookup in burst {
            assert_eq!(lookup.await.unwrap().unwrap(), expected);
        }
        for _ in 0..5 {
            let got = r.resolve("POD-B.dp.test.", t, Family::V4First).await;
            assert_eq!(got.unwrap(), expected);
        }
        assert_eq!(a.load(Ordering::SeqCst), 1, "A queries");
        assert_eq!(aaaa.load(Ordering::SeqCst), 1, "AAAA queries");
        // Forgotten (an egress connection could not reach it): asked again.
        r.forget("pod-b.dp.test");
        let got = r.resolve("pod-b.dp.test", t, Family::V4First).await;
        assert_eq!(got.unwrap(), expected);
        assert_eq!(a.load(Ordering::SeqCst), 2, "A queries after forget");
    }
}
