//! "Does a sidecar answer on that host?" and "is that host this pod?",
//! asked before an egress listener's port is handed out, with remembered
//! answers.
//!
//! With `tunnel.probe_remote`, a node whose egress request is refused falls
//! back to stock behaviour, so a pod without distproxy stays reachable from
//! nodes that use the tunnel module. One probe per host runs at a time;
//! concurrent requests for nodes of that host wait for it and read its
//! result. A success is remembered for `tunnel.probe_success_ttl_ms`, a
//! failure for `tunnel.probe_failure_ttl_ms`; a success is forgotten when
//! an egress connection cannot reach the host's sidecar (a pod that dropped
//! it), so the next request probes again; a probe never takes longer
//! than `tunnel.probe_timeout_ms` (the Erlang module waits 3 s for the egress
//! reply before it falls back on its own). The probe connection is closed
//! without a byte.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::TunnelConfig;
use crate::net::connect_any;
use crate::tunnel::resolve::{Family, Resolver};

use super::lock;

/// How long "this host is (not) this pod" is remembered.
const LOCAL_HOST_TTL: Duration = Duration::from_secs(30);
/// Hosts remembered per cache before expired entries are swept.
const SWEEP_ABOVE: usize = 64;

/// The probe's settings, from `[tunnel]`.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    /// `tunnel.remote_port`: where a remote sidecar listens.
    pub port: u16,
    pub resolve_timeout: Duration,
    pub connect_timeout: Duration,
    /// Upper bound for one probe, resolution included.
    pub timeout: Duration,
    pub success_ttl: Duration,
    pub failure_ttl: Duration,
}

impl ProbeSettings {
    pub fn from_config(config: &TunnelConfig) -> ProbeSettings {
        ProbeSettings {
            port: config.remote_port,
            resolve_timeout: config.resolve_timeout_ms.duration(),
            connect_timeout: config.connect_timeout_ms.duration(),
            timeout: config.probe_timeout_ms.duration(),
            success_ttl: config.probe_success_ttl_ms.duration(),
            failure_ttl: config.probe_failure_ttl_ms.duration(),
        }
    }
}

/// Remembered answers about remote hosts.
pub struct RemoteProbe {
    settings: ProbeSettings,
    resolver: Arc<Resolver>,
    /// Hosts found without a sidecar, until when, and why.
    no_sidecar: Mutex<HashMap<String, (Instant, String)>>,
    /// Hosts where a sidecar answered, and until when that is believed.
    sidecar_seen: Mutex<HashMap<String, Instant>>,
    /// One probe per host at a time; concurrent requests wait for it.
    probing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Whether a host is this pod, and until when that is believed.
    local_hosts: Mutex<HashMap<String, (bool, Instant)>>,
}

impl RemoteProbe {
    pub fn new(settings: ProbeSettings, resolver: Arc<Resolver>) -> RemoteProbe {
        RemoteProbe {
            settings,
            resolver,
            no_sidecar: Mutex::new(HashMap::new()),
            sidecar_seen: Mutex::new(HashMap::new()),
            probing: Mutex::new(HashMap::new()),
            local_hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `host` names this pod: it resolves to an address bound here
    /// that is not loopback (sidecars sharing one host's loopback in tests
    /// stay apart). Remembered per host for [`LOCAL_HOST_TTL`]. The error is
    /// why the host could not be resolved.
    pub async fn is_this_pod(&self, host: &str) -> Result<bool, String> {
        if let Some(&(local, until)) = lock(&self.local_hosts).get(host) {
            if until > Instant::now() {
                return Ok(local);
            }
        }
        let deadline = self.settings.resolve_timeout.min(self.settings.timeout);
        let local = match self.resolver.resolve(host, deadline, Family::V4First).await {
            Ok(addrs) => addrs.iter().any(|&ip| is_local_address(ip)),
            Err(e) => return Err(e.to_string()),
        };
        let mut hosts = lock(&self.local_hosts);
        hosts.retain(|_, (_, until)| *until > Instant::now());
        hosts.insert(host.to_owned(), (local, Instant::now() + LOCAL_HOST_TTL));
        Ok(local)
    }

    /// Remembers that `host` has no reachable sidecar (for the failure TTL).
    pub fn remember_failure(&self, host: &str, why: String) {
        let mut cache = lock(&self.no_sidecar);
        cache.retain(|_, (until, _)| *until > Instant::now());
        cache.insert(
            host.to_owned(),
            (Instant::now() + self.settings.failure_ttl, why),
        );
    }

    /// Forgets that a sidecar answered on `host` (an egress connection could
    /// not reach it): the next [`check`](Self::check) probes again.
    pub fn forget_success(&self, host: &str) {
        lock(&self.sidecar_seen).remove(host);
    }

    /// The remembered answer about `host`, while it is believed.
    fn remembered(&self, host: &str) -> Option<Result<(), String>> {
        if let Some((until, why)) = lock(&self.no_sidecar).get(host) {
            if *until > Instant::now() {
                return Some(Err(why.clone()));
            }
        }
        if let Some(until) = lock(&self.sidecar_seen).get(host) {
            if *until > Instant::now() {
                return Some(Ok(()));
            }
        }
        None
    }

    /// Checks that something answers on `host`'s tunnel port, from memory
    /// when it can. The error is why not, for the egress reply's log.
    pub async fn check(&self, host: &str) -> Result<(), String> {
        // From memory without queueing: every node of a pod asking for the
        // nodes of one host at once would otherwise pass the gate one after
        // the other, and under load the last ones waited past the module's
        // reply deadline and fell back to a direct connection.
        if let Some(remembered) = self.remembered(host) {
            return remembered;
        }
        let gate = {
            let mut probing = lock(&self.probing);
            if probing.len() > SWEEP_ABOVE {
                probing.retain(|_, g| Arc::strong_count(g) > 1);
            }
            Arc::clone(probing.entry(host.to_owned()).or_default())
        };
        let _turn = gate.lock().await;
        if let Some(remembered) = self.remembered(host) {
            return remembered;
        }
        let s = &self.settings;
        let started = Instant::now();
        let probe = async {
            let addrs = self
                .resolver
                .resolve(host, s.resolve_timeout, Family::V4First)
                .await
                .map_err(|e| format!("cannot resolve: {e}"))?;
            // The addresses share what is left of the probe's bound, not
            // the longer connect deadline: with a dual-stack host whose
            // IPv4 address drops the SYN, the IPv6 one must still get its
            // turn before the bound ends the probe.
            let left = s.timeout.saturating_sub(started.elapsed());
            connect_any(&addrs, s.port, s.connect_timeout.min(left))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        let outcome = tokio::time::timeout(s.timeout, probe)
            .await
            .unwrap_or_else(|_| Err(format!("cannot resolve or connect within {:?}", s.timeout)));
        match outcome {
            Ok(()) => {
                lock(&self.no_sidecar).remove(host);
                let mut seen = lock(&self.sidecar_seen);
                seen.retain(|_, until| *until > Instant::now());
                seen.insert(host.to_owned(), Instant::now() + s.success_ttl);
                Ok(())
            }
            Err(why) => {
                self.remember_failure(host, why.clone());
                self.resolver.forget(host);
                Err(why)
            }
        }
    }
}

/// A non-loopback, specified address that a socket can be bound to here.
fn is_local_address(ip: IpAddr) -> bool {
    !ip.is_loopback()
        && !ip.is_unspecified()
        && std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bound_non_loopback_addresses_are_this_pod() {
        assert!(!is_local_address("127.0.0.1".parse().unwrap()));
        assert!(!is_local_address("0.0.0.0".parse().unwrap()));
        // TEST-NET-2: never an address of this machine.
        assert!(!is_local_address("198.51.100.7".parse().unwrap()));
    }

    fn probe(port: u16, success_ttl: Duration) -> RemoteProbe {
        RemoteProbe::new(
            ProbeSettings {
                port,
                resolve_timeout: Duration::from_secs(1),
                connect_timeout: Duration::from_secs(1),
                timeout: Duration::from_secs(2),
                success_ttl,
                failure_ttl: Duration::from_secs(60),
            },
            Arc::new(Resolver::from_system_conf()),
        )
    }

    #[tokio::test]
    async fn answers_are_remembered_for_their_ttl() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = probe(port, Duration::from_secs(60));
        assert_eq!(p.check("127.0.0.1").await, Ok(()));
        // Remembered: answered without connecting, even with the port closed.
        drop(listener);
        assert_eq!(p.check("127.0.0.1").await, Ok(()));
        // A zero TTL forgets at once: the closed port now fails...
        let p = probe(port, Duration::ZERO);
        let why = p.check("127.0.0.1").await.unwrap_err();
        assert!(!why.is_empty());
        // ...and the failure is remembered.
        let reopened = tokio::net::TcpListener::bind(("127.0.0.1", port)).await;
        if reopened.is_ok() {
            assert_eq!(p.check("127.0.0.1").await, Err(why));
        }
    }

    /// A remembered answer does not queue behind the host's gate (held here
    /// as by a probe in progress, or by the many requests of a pod's nodes
    /// all asking at once).
    #[tokio::test]
    async fn remembered_answers_do_not_wait_for_the_gate() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = probe(port, Duration::from_secs(60));
        assert_eq!(p.check("127.0.0.1").await, Ok(()));
        let gate = Arc::clone(lock(&p.probing).entry("127.0.0.1".into()).or_default());
        let _held = gate.lock().await;
        let answer = tokio::time::timeout(Duration::from_secs(1), p.check("127.0.0.1")).await;
        assert_eq!(
            answer,
            Ok(Ok(())),
            "a remembered success waited for the gate"
        );
        p.remember_failure("127.0.0.1", "gone".into());
        let answer = tokio::time::timeout(Duration::from_secs(1), p.check("127.0.0.1")).await;
        assert_eq!(
            answer,
            Ok(Err("gone".into())),
            "a remembered failure waited for the gate"
        );
    }
}
