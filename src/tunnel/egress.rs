//! The outbound side of the tunnel: one loopback **egress listener** per
//! remote node, handed to local BEAM nodes by the egress request
//! ([`crate::epmd::proto::DISTPROXY_EGRESS_REQ`], sent by
//! `deploy/erlang/distproxy_epmd.erl` from `address_please/3`).
//!
//! A listener on `127.0.0.1:0` is created when a remote node is first asked
//! for, reused for every later request for it, and closed when it has had no
//! open connection and no request for `tunnel.egress_idle_timeout_ms` (the
//! next request opens a new one; a BEAM asks before every connection
//! attempt, so a closed listener costs one bind, never a failure).
//! Connections already relayed outlive their listener.
//!
//! Each accepted connection goes through these phases, each with its own
//! deadline: `egress_first_frame` (the local node's `send_name`,
//! `dist.handshake_timeout_ms`), `resolve` (the remote host,
//! `tunnel.resolve_timeout_ms`), `connect_remote` (the remote sidecar's
//! distribution port `tunnel.remote_port`, every resolved address in turn,
//! `tunnel.connect_timeout_ms` in all), `send_preamble` (preamble and the
//! replayed `send_name`, `tunnel.preamble_timeout_ms`); then opaque relaying.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::net::ConnPermit;
use bytes::BytesMut;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::preamble::Preamble;
use super::resolve::Resolver;
use super::tls::Tls;
use crate::config::TunnelConfig;
use crate::distribution::forward::{self, ConnectionGuard, Direction, Forwarder};
use crate::distribution::relay::RelayStats;
use crate::epmd::proto;
use crate::epmd::registry::Registry;
use crate::epmd::server::{EgressPorts, EgressRefused};
use crate::metrics::{self as m, reason, record_closed as closed, record_phase as phase};
use crate::net::{accept_loop, connect_any, ConnectError, ConnectionLimit, Stop, TotalOnly};
use crate::node_name::{short_name, NodeName};

/// Why an egress request was not answered with a port; maps to the reply's
/// result code.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("egress is switched off (tunnel.egress = false)")]
    Disabled,
    #[error("{0:?} is not a remote node name of the form Name@Host")]
    BadName(String),
    #[error("egress listener limit of {0} reached")]
    TooMany(usize),
    #[error("failed to bind an egress listener on 127.0.0.1: {0}")]
    Bind(std::io::Error),
    #[error("{0} is a node of this pod, but it is not registered here")]
    LocalNotRegistered(String),
    #[error("no sidecar answers at {host} port {port}: {why}")]
    NoRemoteSidecar {
        host: String,
        port: u16,
        why: String,
    },
}

impl EgressError {
    /// The result code of the egress reply.
    pub fn result(&self) -> u8 {
        match self {
            EgressError::Disabled => proto::EGRESS_REFUSED,
            EgressError::BadName(_) => proto::EGRESS_BAD_NAME,
            EgressError::TooMany(_) | EgressError::Bind(_) | EgressError::LocalNotRegistered(_) => {
                proto::EGRESS_UNAVAILABLE
            }
            EgressError::NoRemoteSidecar { .. } => proto::EGRESS_NO_REMOTE_SIDECAR,
        }
    }

    /// The `result` label of the EPMD request counter.
    pub fn label(&self) -> &'static str {
        match self {
            EgressError::Disabled => "refused",
            EgressError::BadName(_) => "bad_name",
            EgressError::TooMany(_) => "limit_reached",
            EgressError::Bind(_) => "bind_failed",
            EgressError::LocalNotRegistered(_) => "local_not_registered",
            EgressError::NoRemoteSidecar { .. } => "no_remote_sidecar",
        }
    }
}

impl From<EgressError> for EgressRefused {
    fn from(e: EgressError) -> EgressRefused {
        EgressRefused {
            code: e.result(),
            label: e.label(),
            message: e.to_string(),
        }
    }
}

/// The remote node an egress listener leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    /// `Name@Host`, as the BEAM asked for it; sent in the preamble.
    pub full: String,
    /// The host part, resolved on every connection.
    pub host: String,
}

impl RemoteNode {
    /// Splits `Name@Host` at the first `@`; both parts must be non-empty.
    pub fn parse(full: &str) -> Option<RemoteNode> {
        super::preamble::check_target(full).ok()?;
        let name = NodeName::parse(full).ok()?;
        Some(RemoteNode {
            full: full.to_owned(),
            host: name.host,
        })
    }
}

/// One egress listener's shared state.
struct Egress {
    port: u16,
    remote: RemoteNode,
    /// Last request, accept or connection end: the idle clock.
    last_used: Mutex<Instant>,
    /// Connections accepted and not yet ended.
    open: AtomicUsize,
}

impl Egress {
    fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }

    fn idle_since(&self) -> Instant {
        *lock(&self.last_used)
    }
}

/// Counts an open connection; dropping it ends the count and restarts the
/// idle clock.
struct OpenGuard(Arc<Egress>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A poisoned lock only means another task panicked mid-update of a plain
/// value; the value is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The egress listeners, by remote node name, with everything they need:
/// settings, resolver, TLS, the connection limit and the relay context.
pub struct EgressManager {
    me: Weak<EgressManager>,
    settings: TunnelConfig,
    /// Deadline for the local node's `send_name` (`dist.handshake_timeout_ms`).
    handshake_timeout: Duration,
    tls: Option<Arc<Tls>>,
    forward: Forwarder,
    limit: ConnectionLimit,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    listeners: Mutex<HashMap<String, Arc<Egress>>>,
    resolver: Resolver,
    /// Hosts found without a sidecar, and until when that is believed.
    no_sidecar: Mutex<HashMap<String, (Instant, String)>>,
    /// Hosts where a sidecar answered, and until when that is believed.
    sidecar_seen: Mutex<HashMap<String, Instant>>,
    /// One probe per host at a time; concurrent requests wait for it.
    probing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Whether a host is this pod (resolves to a local, non-loopback
    /// address), and until when that is believed.
    local_hosts: Mutex<HashMap<String, (bool, Instant)>>,
    /// This pod's nodes: a node of this pod is answered with its own port.
    registry: Arc<Registry>,
}

/// How long a failed remote-sidecar probe is remembered.
const NO_SIDECAR_TTL: Duration = Duration::from_secs(5);
/// How long a successful probe is remembered: one probe per remote host in
/// this period, not one per remote node.
const SIDECAR_SEEN_TTL: Duration = Duration::from_secs(30);
/// How long "this host is (not) this pod" is remembered.
const LOCAL_HOST_TTL: Duration = Duration::from_secs(30);
/// Upper bound for one probe (resolve and connect).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

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
            resolver: match &settings.pinned_host {
                Some((host, ip)) => Resolver::pinned_only(host, *ip),
                None => Resolver::from_system_conf(),
            },
            no_sidecar: Mutex::new(HashMap::new()),
            sidecar_seen: Mutex::new(HashMap::new()),
            probing: Mutex::new(HashMap::new()),
            local_hosts: Mutex::new(HashMap::new()),
            registry: settings.registry,
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
        if let Some(node) = RemoteNode::parse(remote) {
            let this_pod = match self.is_this_pod(&node.host).await {
                Ok(local) => local,
                // The probe would resolve the same host again and fail the
                // same way: answer now, within the module's reply timeout.
                Err(why) if self.settings.probe_remote => {
                    let why = format!("cannot resolve: {why}");
                    lock(&self.no_sidecar).insert(
                        node.host.clone(),
                        (Instant::now() + NO_SIDECAR_TTL, why.clone()),
                    );
                    return Err(EgressError::NoRemoteSidecar {
                        host: node.host,
                        port: self.settings.remote_port,
                        why,
                    });
                }
                Err(_) => false,
            };
            if this_pod {
                return match self.registry.get(short_name(&node.full)) {
                    Some(local) if local.addr.is_loopback() => Ok(local.spec.port),
                    _ => Err(EgressError::LocalNotRegistered(node.full)),
                };
            }
        }
        self.check_remote(remote).await?;
        self.egress_port(remote)
    }

    /// Whether `host` names this pod: it resolves to an address bound here
    /// that is not loopback (sidecars sharing one host's loopback in tests
    /// stay apart). Remembered per host for [`LOCAL_HOST_TTL`].
    async fn is_this_pod(&self, host: &str) -> Result<bool, String> {
        if let Some(&(local, until)) = lock(&self.local_hosts).get(host) {
            if until > Instant::now() {
                return Ok(local);
            }
        }
        let deadline = self.settings.resolve_timeout().min(PROBE_TIMEOUT);
        let local = match self.resolver.resolve(host, deadline).await {
            Ok(addrs) => addrs.iter().any(|&ip| is_local_address(ip)),
            Err(e) => return Err(e.to_string()),
        };
        let mut hosts = lock(&self.local_hosts);
        hosts.retain(|_, (_, until)| *until > Instant::now());
        hosts.insert(host.to_owned(), (local, Instant::now() + LOCAL_HOST_TTL));
        Ok(local)
    }
}

/// A non-loopback, specified address that a socket can be bound to here.
fn is_local_address(ip: IpAddr) -> bool {
    !ip.is_loopback()
        && !ip.is_unspecified()
        && std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

impl EgressPorts for EgressManager {
    fn egress_port<'a>(&'a self, remote: &'a str) -> BoxFuture<'a, Result<u16, EgressRefused>> {
        async move { self.request(remote).await.map_err(EgressRefused::from) }.boxed()
    }
}

impl EgressManager {
    /// With `tunnel.probe_remote`, checks before the first listener for
    /// `remote` opens that a sidecar (anything) answers on the remote host's
    /// tunnel port. A node whose egress request is refused falls back to stock
    /// behaviour, so a pod without distproxy stays reachable from nodes that use
    /// the tunnel module. The probe connection is closed without a byte.
    async fn check_remote(&self, remote: &str) -> Result<(), EgressError> {
        let config = &self.settings;
        if !config.egress || !config.probe_remote || self.port_of(remote).is_some() {
            return Ok(());
        }
        let Some(node) = RemoteNode::parse(remote) else {
            return Ok(()); // egress_port reports the bad name
        };
        let port = config.remote_port;
        let refused = |why: String| EgressError::NoRemoteSidecar {
            host: node.host.clone(),
            port,
            why,
        };
        // One probe per host at a time; whoever waited reads its result.
        let gate = {
            let mut probing = lock(&self.probing);
            if probing.len() > 64 {
                probing.retain(|_, g| Arc::strong_count(g) > 1);
            }
            Arc::clone(probing.entry(node.host.clone()).or_default())
        };
        let _turn = gate.lock().await;
        if let Some((until, why)) = lock(&self.no_sidecar).get(&node.host) {
            if *until > Instant::now() {
                return Err(refused(why.clone()));
            }
        }
        if let Some(until) = lock(&self.sidecar_seen).get(&node.host) {
            if *until > Instant::now() {
                return Ok(());
            }
        }
        // The whole probe stays within PROBE_TIMEOUT: the Erlang module waits
        // 3 s for the reply before it falls back on its own.
        let probe = async {
            let addrs = self
                .resolver
                .resolve(&node.host, config.resolve_timeout())
                .await
                .map_err(|e| format!("cannot resolve: {e}"))?;
            connect_any(&addrs, port, config.connect_timeout())
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, probe)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "cannot resolve or connect within {PROBE_TIMEOUT:?}"
                ))
            });
        let mut cache = lock(&self.no_sidecar);
        match outcome {
            Ok(()) => {
                cache.remove(&node.host);
                drop(cache);
                let mut seen = lock(&self.sidecar_seen);
                seen.retain(|_, until| *until > Instant::now());
                seen.insert(node.host.clone(), Instant::now() + SIDECAR_SEEN_TTL);
                Ok(())
            }
            Err(why) => {
                cache.retain(|_, (until, _)| *until > Instant::now());
                cache.insert(
                    node.host.clone(),
                    (Instant::now() + NO_SIDECAR_TTL, why.clone()),
                );
                Err(refused(why))
            }
        }
    }

    /// Answers an egress request: the port of the listener for `remote`,
    /// creating it (and its task) if needed.
    fn egress_port(&self, remote: &str) -> Result<u16, EgressError> {
        let config = &self.settings;
        if !config.egress {
            return Err(EgressError::Disabled);
        }
        let node =
            RemoteNode::parse(remote).ok_or_else(|| EgressError::BadName(remote.to_owned()))?;
        let manager = self;
        let mut listeners = lock(&manager.listeners);
        if let Some(existing) = listeners.get(remote) {
            existing.touch();
            return Ok(existing.port);
        }
        if listeners.len() >= config.max_egress_listeners {
            return Err(EgressError::TooMany(config.max_egress_listeners));
        }
        // Bound synchronously, under the lock, so two requests for the same
        // node can never open two listeners.
        let listener = crate::net::bind_tcp(SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(EgressError::Bind)?;
        let port = listener.local_addr().map_err(EgressError::Bind)?.port();
        let egress = Arc::new(Egress {
            port,
            remote: node,
            last_used: Mutex::new(Instant::now()),
            open: AtomicUsize::new(0),
        });
        listeners.insert(remote.to_owned(), Arc::clone(&egress));
        manager.gauge(listeners.len());
        drop(listeners);
        info!(remote = %remote, port, "egress listener opened");
        if let Some(me) = self.me.upgrade() {
            self.tracker.spawn(serve_egress(listener, egress, me));
        }
        Ok(port)
    }
}

/// Accepts local connections for one remote node until idle or shutdown.
async fn serve_egress(listener: TcpListener, egress: Arc<Egress>, manager: Arc<EgressManager>) {
    let remote = egress.remote.full.clone();
    let accepting = {
        let (egress, manager2) = (Arc::clone(&egress), Arc::clone(&manager));
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
    };
    // The listener closes when either ends: shutdown, or the idle period.
    tokio::select! {
        _ = accepting => {}
        _ = idle(&egress, &manager) => return,
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

/// Resolves once the listener has had no open connection and no request
/// for `tunnel.egress_idle_timeout_ms`, after removing it from the map.
async fn idle(egress: &Arc<Egress>, manager: &EgressManager) {
    let idle = manager.settings.egress_idle_timeout();
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

impl EgressManager {
    /// One local connection to an egress listener: read the local node's
    /// `send_name`, reach the remote sidecar, send the preamble, relay.
    async fn outbound(
        &self,
        mut local: TcpStream,
        local_peer: SocketAddr,
        remote: &RemoteNode,
        permit: ConnPermit,
    ) {
        let started = Instant::now();
        let _ = local.set_nodelay(true);
        self.forward.tcp.apply(&local);
        let target = remote.full.as_str();

        let mut prefix = BytesMut::with_capacity(512);
        let deadline = tokio::time::Instant::from_std(started) + self.handshake_timeout;
        let send_name = match forward::read_send_name(&mut local, &mut prefix, deadline).await {
            Ok(s) => s,
            Err(e) => {
                warn!(%local_peer, %target, error = %e, "closing egress connection before its handshake");
                closed(e.reason());
                return;
            }
        };
        phase("egress_first_frame", started);
        let initiator = send_name.name;
        let preamble = match Preamble::new(target, &initiator) {
            Ok(p) => p,
            Err(e) => {
                warn!(%local_peer, %target, %initiator, error = %e, "cannot build a tunnel preamble; closing");
                closed(reason::BAD_FRAME);
                return;
            }
        };

        let resolve_start = Instant::now();
        let addrs = match self
            .resolver
            .resolve(&remote.host, self.settings.resolve_timeout())
            .await
        {
            Ok(a) => a,
            Err(e) => {
                warn!(%initiator, %target, error = %e, "egress: cannot resolve the remote host; closing");
                closed(reason::RESOLVE_FAILED);
                return;
            }
        };
        phase("resolve", resolve_start);

        let connect_start = Instant::now();
        let port = self.settings.remote_port;
        let (remote_stream, remote_addr) = match connect_any(
            &addrs,
            port,
            self.settings.connect_timeout(),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                let why = match e {
                    ConnectError::Timeout { .. } => reason::TIMEOUT,
                    ConnectError::Failed { .. } => reason::CONNECT_FAILED,
                };
                warn!(%initiator, %target, error = %e, "egress: cannot reach the remote sidecar; closing");
                closed(why);
                return;
            }
        };
        phase("connect_remote", connect_start);
        let _ = remote_stream.set_nodelay(true);
        self.forward.tcp.apply(&remote_stream);

        // With `[tls]`: mutual TLS first (deadline `tls.handshake_timeout_ms`;
        // the server's certificate is checked against the host dialled, unless
        // `verify_server_name = "ca_only"`), then the preamble inside it.
        let mut ctx = Outbound {
            local_peer,
            remote_addr,
            target,
            initiator: &initiator,
            started,
            transport: super::Transport::Plain,
            permit,
        };
        if let Some(tls) = self.tls.as_ref() {
            let tls_start = Instant::now();
            match tls.connect(remote_stream, &remote.host).await {
                Ok(remote_tls) => {
                    phase("tls_handshake", tls_start);
                    if let Some(Ok(server)) =
                        super::tls::PeerIdentity::of_peer(remote_tls.get_ref().1)
                    {
                        debug!(%target, %remote_addr, %server, "TLS to the remote sidecar established");
                    }
                    ctx.transport = super::Transport::Tls;
                    self.send_and_relay(remote_tls, local, preamble, prefix, ctx)
                        .await;
                }
                Err(e) => {
                    // Counted by reason in distproxy_tls_handshake_failures_total.
                    warn!(%initiator, %target, %remote_addr, reason = e.reason(), error = %e,
                    "egress: TLS handshake with the remote sidecar failed; closing");
                    closed(reason::TLS_HANDSHAKE_FAILED);
                }
            }
            return;
        }
        self.send_and_relay(remote_stream, local, preamble, prefix, ctx)
            .await;
    }
}

/// What [`EgressManager::send_and_relay`] logs and labels.
struct Outbound<'a> {
    pub local_peer: SocketAddr,
    pub remote_addr: SocketAddr,
    pub target: &'a str,
    pub initiator: &'a str,
    pub started: Instant,
    pub transport: super::Transport,
    pub permit: ConnPermit,
}

impl EgressManager {
    /// Sends the preamble and the replayed `send_name` to the remote sidecar,
    /// then relays until either side closes. Generic over the remote stream so
    /// that plain TCP and TLS share it.
    async fn send_and_relay<R>(
        &self,
        mut remote: R,
        local: TcpStream,
        preamble: Preamble,
        prefix: BytesMut,
        ctx: Outbound<'_>,
    ) where
        R: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Outbound {
            local_peer,
            remote_addr,
            target,
            initiator,
            started,
            transport,
            permit,
        } = ctx;
        let send_start = Instant::now();
        let mut head = BytesMut::with_capacity(super::preamble::HEADER_LEN + 64 + prefix.len());
        preamble.encode(&mut head);
        head.extend_from_slice(&prefix);
        let sent = async {
            remote.write_all(&head).await?;
            remote.flush().await
        };
        match tokio::time::timeout(self.settings.preamble_timeout(), sent).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(%initiator, %target, %remote_addr, error = %e, "egress: failed to send the preamble; closing");
                closed(reason::PEER_CLOSED);
                return;
            }
            Err(_) => {
                warn!(%initiator, %target, %remote_addr, "egress: timed out sending the preamble; closing");
                closed(reason::TIMEOUT);
                return;
            }
        }
        phase("send_preamble", send_start);

        let local_node = short_name(initiator);
        let guard = ConnectionGuard::open(
            permit,
            &self.forward.open_connections,
            local_node,
            Direction::Outbound,
        );
        debug!(%local_peer, %initiator, %target, %remote_addr, transport = transport.label(), "egress relaying");
        // rx: towards the local node; tx: from it (as on the inbound side).
        let pre = RelayStats {
            rx: 0,
            tx: prefix.len() as u64,
        };
        let (stats, outcome) = self.forward.relay(guard, remote, local, pre).await;
        info!(%initiator, %target, %remote_addr, transport = transport.label(),
        rx_bytes = stats.rx, tx_bytes = stats.tx,
        duration_ms = started.elapsed().as_millis() as u64, %outcome,
        "tunnel connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_node_names() {
        let n = RemoteNode::parse("b1@pod-b.dp.test").unwrap();
        assert_eq!(n.host, "pod-b.dp.test");
        assert_eq!(n.full, "b1@pod-b.dp.test");
        assert_eq!(RemoteNode::parse("b1@10.0.0.7").unwrap().host, "10.0.0.7");
        for bad in ["b1", "@h", "b1@", "", "b\0@h"] {
            assert!(RemoteNode::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn only_bound_non_loopback_addresses_are_this_pod() {
        assert!(!is_local_address("127.0.0.1".parse().unwrap()));
        assert!(!is_local_address("0.0.0.0".parse().unwrap()));
        // TEST-NET-2: never an address of this machine.
        assert!(!is_local_address("198.51.100.7".parse().unwrap()));
    }

    #[test]
    fn error_codes() {
        assert_eq!(EgressError::Disabled.result(), proto::EGRESS_REFUSED);
        assert_eq!(
            EgressError::BadName("x".into()).result(),
            proto::EGRESS_BAD_NAME
        );
        assert_eq!(EgressError::TooMany(1).result(), proto::EGRESS_UNAVAILABLE);
    }
}
