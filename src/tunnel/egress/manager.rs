//! The egress listeners: one loopback listener per remote node, created on
//! request, reused, limited, closed when idle (see the parent module).

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::TunnelConfig;
use crate::distribution::forward::Forwarder;
use crate::epmd::registry::Registry;
use crate::epmd::server::{EgressPorts, EgressRefused};
use crate::metrics::{self as m};
use crate::net::{accept_loop, ConnectionLimit, Stop, TotalOnly};
use crate::node_name::short_name;
use crate::tunnel::resolve::Resolver;
use crate::tunnel::tls::Tls;

use super::local_nodes::ListenerChecks;
use super::probe::{ProbeSettings, RemoteProbe};
use super::{lock, EgressError, RemoteNode};

/// One egress listener's shared state.
struct Egress {
    port: u16,
    remote: RemoteNode,
    /// Last request, accept or connection end: the idle clock.
    last_used: Mutex<Instant>,
    /// Connections accepted and not yet ended.
    open: AtomicUsize,
    /// Cancelled when the listener is evicted to make room for another.
    evicted: CancellationToken,
}

impl Egress {
    fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }

    fn idle_since(&self) -> Instant {
        *lock(&self.last_used)
    }
}

/// How long a listener must have been unused before it can be evicted to
/// make room at `tunnel.max_egress_listeners`: more than the helper
/// module's cache of egress answers (5 s), so no node still holds its port
/// without asking again (which would touch it).
const EVICTABLE_AFTER: Duration = Duration::from_secs(10);

/// Counts an open connection; dropping it ends the count and restarts the
/// idle clock.
struct OpenGuard(Arc<Egress>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The egress listeners, by remote node name, with everything they need:
/// settings, resolver, TLS, the connection limit and the relay context.
pub struct EgressManager {
    me: Weak<EgressManager>,
    pub(super) settings: TunnelConfig,
    /// Deadline for the local node's `send_name` (`dist.handshake_timeout_ms`).
    pub(super) handshake_timeout: Duration,
    pub(super) tls: Option<Arc<Tls>>,
    pub(super) forward: Forwarder,
    pub(super) limit: ConnectionLimit,
    pub(super) shutdown: CancellationToken,
    pub(super) tracker: TaskTracker,
    listeners: Mutex<HashMap<String, Arc<Egress>>>,
    pub(super) resolver: Arc<Resolver>,
    pub(super) probe: RemoteProbe,
    /// This pod's nodes: a node of this pod is answered with its own port.
    registry: Arc<Registry>,
    /// Whether each of them can be dialled on loopback.
    local_listeners: Arc<ListenerChecks>,
}

/// What an [`EgressManager`] is built from.
pub struct EgressSettings {
    pub tunnel: TunnelConfig,
    pub handshake_timeout: Duration,
    pub tls: Option<Arc<Tls>>,
    pub forward: Forwarder,
    /// Egress connections count against `dist.max_connections` too.
    pub limit: ConnectionLimit,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// The registry: egress requests for this pod's own nodes are answered
    /// with their loopback port.
    pub registry: Arc<Registry>,
    /// `distproxy remsh`: the one host every egress connection may reach,
    /// and the address it resolves to (see [`Resolver::pinned_only`]).
    pub pinned_host: Option<(String, std::net::IpAddr)>,
}

impl EgressManager {
    /// A manager with no listeners and a resolver from the system
    /// configuration.
    pub fn new(settings: EgressSettings) -> Arc<EgressManager> {
        let resolver = Arc::new(match &settings.pinned_host {
            Some((host, ip)) => Resolver::pinned_only(host, *ip),
            None => Resolver::from_system_conf(),
        });
        let probe = RemoteProbe::new(
            ProbeSettings::from_config(&settings.tunnel),
            Arc::clone(&resolver),
        );
        // Scrapes show the gauge from the start, not from the first listener.
        metrics::gauge!(m::EGRESS_LISTENERS).set(0.0);
        let local_listeners = Arc::new(ListenerChecks::default());
        settings.tracker.spawn(
            Arc::clone(&local_listeners)
                .read_on_registration(Arc::clone(&settings.registry), settings.shutdown.clone()),
        );
        Arc::new_cyclic(|me| EgressManager {
            me: me.clone(),
            settings: settings.tunnel,
            handshake_timeout: settings.handshake_timeout,
            tls: settings.tls,
            forward: settings.forward,
            limit: settings.limit,
            shutdown: settings.shutdown,
            tracker: settings.tracker,
            listeners: Mutex::new(HashMap::new()),
            resolver,
            probe,
            registry: settings.registry,
            local_listeners,
        })
    }

    /// Egress listeners open.
    pub fn len(&self) -> usize {
        lock(&self.listeners).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The egress port for `remote` (`Name@Host`), if one is open.
    pub fn port_of(&self, remote: &str) -> Option<u16> {
        lock(&self.listeners).get(remote).map(|e| e.port)
    }

    fn gauge(&self, n: usize) {
        metrics::gauge!(m::EGRESS_LISTENERS).set(n as f64);
    }

    /// Answers an egress request. A node of this very pod (its host
    /// resolves to an address of this pod) gets its own loopback port: no
    /// egress listener, no sidecar hop. Otherwise the remote is checked
    /// (with `tunnel.probe_remote`) and its listener's port handed out.
    pub async fn request(&self, remote: &str) -> Result<u16, EgressError> {
        if !self.settings.egress {
            return Err(EgressError::Disabled);
        }
        let node =
            RemoteNode::parse(remote).ok_or_else(|| EgressError::BadName(remote.to_owned()))?;
        let port = self.settings.remote_port;
        let this_pod = match self.probe.is_this_pod(&node.host).await {
            Ok(local) => local,
            // The probe would resolve the same host again and fail the
            // same way: answer now, within the module's reply timeout.
            Err(why) if self.settings.probe_remote => {
                let why = format!("cannot resolve: {why}");
                self.probe.remember_failure(&node.host, why.clone());
                return Err(EgressError::NoRemoteSidecar {
                    host: node.host,
                    port,
                    why,
                });
            }
            Err(_) => false,
        };
        if this_pod {
            return match self.registry.get(short_name(&node.full)) {
                Some(local) if local.addr.is_loopback() => {
                    // A node started with `inet_dist_use_interface` set to
                    // the pod's address registers over loopback but does
                    // not listen there: the caller, which would dial its
                    // loopback port, falls back to the stock way (a
                    // same-pod lookup, answered with the node's port).
                    match self
                        .local_listeners
                        .off_loopback(&local, &self.registry)
                        .await
                    {
                        Some(at) => Err(EgressError::LocalNotOnLoopback {
                            node: node.full,
                            at,
                        }),
                        None => Ok(local.spec.port),
                    }
                }
                _ => Err(EgressError::LocalNotRegistered(node.full)),
            };
        }
        // Before a listener's port is handed out (`probe`): from memory
        // while its host's answer is remembered; a host whose sidecar an
        // egress connection could not reach is probed again.
        if self.settings.probe_remote {
            if let Err(why) = self.probe.check(&node.host).await {
                return Err(EgressError::NoRemoteSidecar {
                    host: node.host,
                    port,
                    why,
                });
            }
        }
        self.egress_port(node)
    }
}
impl EgressPorts for EgressManager {
    fn egress_port<'a>(&'a self, remote: &'a str) -> BoxFuture<'a, Result<u16, EgressRefused>> {
        async move { self.request(remote).await.map_err(EgressRefused::from) }.boxed()
    }
}

impl EgressManager {
    /// Answers an egress request: the port of the listener for `remote`,
    /// creating it (and its task) if needed.
    fn egress_port(&self, node: RemoteNode) -> Result<u16, EgressError> {
        let config = &self.settings;
        let remote = node.full.clone();
        let remote = remote.as_str();
        let manager = self;
        let mut listeners = lock(&manager.listeners);
        if let Some(existing) = listeners.get(remote) {
            existing.touch();
            return Ok(existing.port);
        }
        if listeners.len() >= config.max_egress_listeners && !evict_one_unused(&mut listeners) {
            return Err(EgressError::TooMany(config.max_egress_listeners));
        }
        // Bound synchronously, under the lock, so two requests for the same
        // node can never open two listeners.
        let (listener, listener6) = bind_loopback_pair(remote)?;
        let port = listener.local_addr().map_err(EgressError::Bind)?.port();
        let egress = Arc::new(Egress {
            port,
            remote: node,
            last_used: Mutex::new(Instant::now()),
            open: AtomicUsize::new(0),
            evicted: CancellationToken::new(),
        });
        listeners.insert(remote.to_owned(), Arc::clone(&egress));
        manager.gauge(listeners.len());
        drop(listeners);
        info!(remote = %remote, port, "egress listener opened");
        if let Some(me) = self.me.upgrade() {
            self.tracker
                .spawn(serve_egress(listener, listener6, egress, me));
        }
        Ok(port)
    }
}

/// At the listener limit: closes the least recently used listener that has
/// no connection and has not been used for [`EVICTABLE_AFTER`], so nodes
/// that reach many remote nodes over time are not refused while old
/// listeners wait out their idle period. False when every listener is in
/// use (the limit then refuses).
fn evict_one_unused(listeners: &mut HashMap<String, Arc<Egress>>) -> bool {
    let victim = listeners
        .iter()
        .filter(|(_, e)| {
            e.open.load(Ordering::Acquire) == 0 && e.idle_since().elapsed() >= EVICTABLE_AFTER
        })
        .min_by_key(|(_, e)| e.idle_since())
        .map(|(name, _)| name.clone());
    let Some(victim) = victim else {
        return false;
    };
    if let Some(egress) = listeners.remove(&victim) {
        egress.evicted.cancel();
        info!(remote = %victim, port = egress.port,
            idle_ms = egress.idle_since().elapsed().as_millis() as u64,
            "egress listener closed to make room for another (tunnel.max_egress_listeners)");
    }
    true
}

/// How many times a fresh IPv4 port is tried when its IPv6 twin is taken.
const BIND_PAIR_ATTEMPTS: usize = 8;

/// The listeners of one egress port: `127.0.0.1:P`, as ever, and `[::1]:P`
/// with the same port, for nodes of `-proto_dist inet6_tcp` (whose
/// `distproxy_epmd` answers `::1`). The IPv4 port is the kernel's choice;
/// when `[::1]` has that port taken, another is chosen. Without IPv6
/// loopback (no IPv6 on the host), or when every attempt finds the IPv6
/// twin taken, the port is IPv4 only, as before.
fn bind_loopback_pair(remote: &str) -> Result<(TcpListener, Option<TcpListener>), EgressError> {
    let mut last_taken = None;
    for _ in 0..BIND_PAIR_ATTEMPTS {
        let v4 = crate::net::bind_tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .map_err(EgressError::Bind)?;
        let port = v4.local_addr().map_err(EgressError::Bind)?.port();
        match crate::net::bind_tcp(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
            Ok(v6) => return Ok((v4, Some(v6))),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last_taken = Some(e),
            Err(e) if crate::net::host_lacks_ipv6(&e) => {
                debug!(%remote, port, error = %e, "no IPv6 loopback; egress listener on 127.0.0.1 only");
                return Ok((v4, None));
            }
            Err(e) => {
                warn!(%remote, port, error = %e, "cannot listen on [::1]; egress listener on 127.0.0.1 only (inet6_tcp nodes cannot use it)");
                return Ok((v4, None));
            }
        }
    }
    let v4 = crate::net::bind_tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(EgressError::Bind)?;
    if let Some(e) = last_taken {
        warn!(%remote, error = %e, attempts = BIND_PAIR_ATTEMPTS, "no egress port free on both loopbacks; on 127.0.0.1 only (inet6_tcp nodes cannot use it)");
    }
    Ok((v4, None))
}

/// Accepts local connections for one remote node until idle or shutdown.
async fn serve_egress(
    listener: TcpListener,
    listener6: Option<TcpListener>,
    egress: Arc<Egress>,
    manager: Arc<EgressManager>,
) {
    let remote = egress.remote.full.clone();
    let accepting = futures_util::future::join(accept_egress(listener, &egress, &manager), async {
        if let Some(listener6) = listener6 {
            accept_egress(listener6, &egress, &manager).await;
        }
    });
    // The listener closes when either ends: shutdown, or the idle period;
    // or when it is evicted (already out of the map).
    tokio::select! {
        _ = accepting => {}
        _ = idle(&egress, &manager) => return,
        _ = egress.evicted.cancelled() => return,
    }
    // Shutdown: forget the listener so no request is answered with it.
    let mut listeners = lock(&manager.listeners);
    if listeners
        .get(&remote)
        .is_some_and(|e| Arc::ptr_eq(e, &egress))
    {
        listeners.remove(&remote);
    }
    manager.gauge(listeners.len());
}

/// Accepts on one of the (one or two) listeners of an egress port until
/// shutdown.
async fn accept_egress(listener: TcpListener, egress: &Arc<Egress>, manager: &Arc<EgressManager>) {
    let (egress, manager2) = (Arc::clone(egress), Arc::clone(manager));
    accept_loop(
        "egress",
        listener,
        Stop {
            accepting: manager.shutdown.clone(),
            connections: manager.forward.hard_stop.clone(),
        },
        manager.tracker.clone(),
        TotalOnly(manager.limit.clone()),
        move |stream, peer, permit| {
            egress.touch();
            egress.open.fetch_add(1, Ordering::AcqRel);
            let guard = OpenGuard(Arc::clone(&egress));
            let manager = Arc::clone(&manager2);
            let remote = egress.remote.clone();
            async move {
                manager.outbound(stream, peer, &remote, permit).await;
                drop(guard);
            }
        },
    )
    .await
}

/// Resolves once the listener has had no open connection and no request
/// for `tunnel.egress_idle_timeout_ms`, after removing it from the map.
async fn idle(egress: &Arc<Egress>, manager: &EgressManager) {
    let idle = manager.settings.egress_idle_timeout_ms.duration();
    let remote = &egress.remote.full;
    loop {
        // While connections are open the clock is not running: look again
        // one idle period from now (a connection's end restarts the clock).
        let since = if egress.open.load(Ordering::Acquire) > 0 {
            Instant::now()
        } else {
            egress.idle_since()
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(since + idle)).await;
        // Re-checked under the map lock, which egress_port holds while it
        // hands out (and touches) this port: once removed, the port is
        // never handed out again.
        let mut listeners = lock(&manager.listeners);
        if egress.open.load(Ordering::Acquire) == 0 && egress.idle_since().elapsed() >= idle {
            if listeners
                .get(remote)
                .is_some_and(|e| Arc::ptr_eq(e, egress))
            {
                listeners.remove(remote);
            }
            manager.gauge(listeners.len());
            drop(listeners);
            info!(%remote, port = egress.port, idle_ms = idle.as_millis() as u64, "egress listener closed after idle period");
            return;
        }
    }
}
