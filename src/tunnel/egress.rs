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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::preamble::Preamble;
use super::resolve::Resolver;
use crate::dist::listener::{self, short_name};
use crate::dist::relay::{self, RelayEnd};
use crate::epmd::proto;
use crate::metrics::{self as m, reason};
use crate::server::Shared;

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
        let (_, host) = full.split_once('@')?;
        Some(RemoteNode {
            full: full.to_owned(),
            host: host.to_owned(),
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

/// The egress listeners, by remote node name, and the resolver they share.
pub struct EgressManager {
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

impl Default for EgressManager {
    fn default() -> Self {
        Self::new()
    }
}

impl EgressManager {
    /// A manager with no listeners and a resolver from the system
    /// configuration.
    pub fn new() -> EgressManager {
        EgressManager {
            listeners: Mutex::new(HashMap::new()),
            resolver: Resolver::from_system_conf(),
            no_sidecar: Mutex::new(HashMap::new()),
            sidecar_seen: Mutex::new(HashMap::new()),
            probing: Mutex::new(HashMap::new()),
            local_hosts: Mutex::new(HashMap::new()),
        }
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
}

/// Answers an egress request for `remote` (`Name@Host`): the port to
/// connect to and the distribution version.
///
/// A node of this very pod (its host resolves to an address of this pod) is
/// answered with its own loopback port: no egress listener, no sidecar hop.
/// Otherwise the remote sidecar is probed if configured ([`check_remote`])
/// and the egress listener's port is answered ([`egress_port`]).
pub async fn answer(shared: &Arc<Shared>, remote: &str) -> Result<(u16, u16), EgressError> {
    if !shared.config.tunnel.egress {
        return Err(EgressError::Disabled);
    }
    if let Some(node) = RemoteNode::parse(remote) {
        if is_this_pod(shared, &node.host).await {
            let short = short_name(&node.full);
            return match shared.registry.get(short) {
                Some(local) if local.addr.is_loopback() => {
                    Ok((local.spec.port, proto::EGRESS_DIST_VERSION))
                }
                _ => Err(EgressError::LocalNotRegistered(node.full)),
            };
        }
    }
    check_remote(shared, remote).await?;
    Ok((egress_port(shared, remote)?, proto::EGRESS_DIST_VERSION))
}

/// Whether `host` names this pod: it resolves to an address bound here that
/// is not loopback (sidecars sharing one host's loopback in tests stay
/// apart). Remembered per host for [`LOCAL_HOST_TTL`].
async fn is_this_pod(shared: &Shared, host: &str) -> bool {
    let manager = &shared.egress;
    if let Some(&(local, until)) = lock(&manager.local_hosts).get(host) {
        if until > Instant::now() {
            return local;
        }
    }
    let local = match manager
        .resolver
        .resolve(
            host,
            shared.config.tunnel.resolve_timeout().min(PROBE_TIMEOUT),
        )
        .await
    {
        Ok(addrs) => addrs.iter().any(|&ip| is_local_address(ip)),
        Err(_) => false,
    };
    let mut hosts = lock(&manager.local_hosts);
    hosts.retain(|_, (_, until)| *until > Instant::now());
    hosts.insert(host.to_owned(), (local, Instant::now() + LOCAL_HOST_TTL));
    local
}

/// A non-loopback, specified address that a socket can be bound to here.
fn is_local_address(ip: IpAddr) -> bool {
    !ip.is_loopback()
        && !ip.is_unspecified()
        && std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// With `tunnel.probe_remote`, checks before the first listener for
/// `remote` opens that a sidecar (anything) answers on the remote host's
/// tunnel port. A node whose egress request is refused falls back to stock
/// behaviour, so a pod without distproxy stays reachable from nodes that use
/// the tunnel module. The probe connection is closed without a byte.
pub async fn check_remote(shared: &Arc<Shared>, remote: &str) -> Result<(), EgressError> {
    let config = &shared.config.tunnel;
    if !config.egress || !config.probe_remote || shared.egress.port_of(remote).is_some() {
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
        let mut probing = lock(&shared.egress.probing);
        if probing.len() > 64 {
            probing.retain(|_, g| Arc::strong_count(g) > 1);
        }
        Arc::clone(probing.entry(node.host.clone()).or_default())
    };
    let _turn = gate.lock().await;
    if let Some((until, why)) = lock(&shared.egress.no_sidecar).get(&node.host) {
        if *until > Instant::now() {
            return Err(refused(why.clone()));
        }
    }
    if let Some(until) = lock(&shared.egress.sidecar_seen).get(&node.host) {
        if *until > Instant::now() {
            return Ok(());
        }
    }
    // The whole probe stays within PROBE_TIMEOUT: the Erlang module waits
    // 3 s for the reply before it falls back on its own.
    let probe = async {
        let addrs = shared
            .egress
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
    let mut cache = lock(&shared.egress.no_sidecar);
    match outcome {
        Ok(()) => {
            cache.remove(&node.host);
            drop(cache);
            let mut seen = lock(&shared.egress.sidecar_seen);
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
pub fn egress_port(shared: &Arc<Shared>, remote: &str) -> Result<u16, EgressError> {
    let config = &shared.config.tunnel;
    if !config.egress {
        return Err(EgressError::Disabled);
    }
    let node = RemoteNode::parse(remote).ok_or_else(|| EgressError::BadName(remote.to_owned()))?;
    let manager = &shared.egress;
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
    let listener = crate::server::bind_tcp(SocketAddr::from(([127, 0, 0, 1], 0)))
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
    shared
        .tracker
        .spawn(serve_egress(listener, egress, Arc::clone(shared)));
    Ok(port)
}

/// Accepts local connections for one remote node until idle or shutdown.
async fn serve_egress(listener: TcpListener, egress: Arc<Egress>, shared: Arc<Shared>) {
    let idle = shared.config.tunnel.egress_idle_timeout();
    let remote = egress.remote.full.clone();
    loop {
        // While connections are open the clock is not running: look again
        // one idle period from now (a connection's end restarts the clock).
        let since = if egress.open.load(Ordering::Acquire) > 0 {
            Instant::now()
        } else {
            egress.idle_since()
        };
        let idle_at = tokio::time::Instant::from_std(since + idle);
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    egress.touch();
                    egress.open.fetch_add(1, Ordering::AcqRel);
                    let guard = OpenGuard(Arc::clone(&egress));
                    let shared2 = Arc::clone(&shared);
                    let egress2 = Arc::clone(&egress);
                    shared.tracker.spawn(async move {
                        outbound(stream, peer, &egress2.remote, &shared2).await;
                        drop(guard);
                    });
                }
                Err(e) => {
                    warn!(%remote, port = egress.port, error = %e, "egress accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = tokio::time::sleep_until(idle_at) => {
                // Re-checked under the map lock, which egress_port holds
                // while it hands out (and touches) this port: once removed,
                // the port is never handed out again.
                let mut listeners = lock(&shared.egress.listeners);
                if egress.open.load(Ordering::Acquire) == 0 && egress.idle_since().elapsed() >= idle {
                    if listeners.get(&remote).is_some_and(|e| Arc::ptr_eq(e, &egress)) {
                        listeners.remove(&remote);
                    }
                    shared.egress.gauge(listeners.len());
                    drop(listeners);
                    info!(%remote, port = egress.port, idle_ms = idle.as_millis() as u64, "egress listener closed after idle period");
                    return;
                }
            }
        }
    }
    // Shutdown: forget the listener so no request is answered with it.
    let mut listeners = lock(&shared.egress.listeners);
    if listeners
        .get(&remote)
        .is_some_and(|e| Arc::ptr_eq(e, &egress))
    {
        listeners.remove(&remote);
    }
    shared.egress.gauge(listeners.len());
}

use crate::metrics::{record_closed as closed, record_phase as phase};

/// Why no connection to the remote sidecar could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("timed out connecting to {port} on {addrs:?}")]
    Timeout { addrs: Vec<IpAddr>, port: u16 },
    #[error("failed to connect to {addr}: {source}")]
    Failed {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Connects to `port` on each address in turn, within `deadline` in all.
pub async fn connect_any(
    addrs: &[IpAddr],
    port: u16,
    deadline: Duration,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let attempt = async {
        let mut last = None;
        for &ip in addrs {
            let addr = SocketAddr::new(ip, port);
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok((s, addr)),
                Err(source) => {
                    debug!(%addr, error = %source, "egress connect attempt failed");
                    last = Some(ConnectError::Failed { addr, source });
                }
            }
        }
        Err(last.unwrap_or(ConnectError::Timeout {
            addrs: Vec::new(),
            port,
        }))
    };
    tokio::time::timeout(deadline, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::Timeout {
                addrs: addrs.to_vec(),
                port,
            })
        })
}

/// One local connection to an egress listener: read the local node's
/// `send_name`, reach the remote sidecar, send the preamble, relay.
async fn outbound(
    mut local: TcpStream,
    local_peer: SocketAddr,
    remote: &RemoteNode,
    shared: &Shared,
) {
    let started = Instant::now();
    let _ = local.set_nodelay(true);
    let target = remote.full.as_str();

    let mut prefix = BytesMut::with_capacity(512);
    let send_name = match listener::read_send_name(
        &mut local,
        &mut prefix,
        shared.config.dist.handshake_timeout(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let why = e.reason();
            warn!(%local_peer, %target, error = %e, "closing egress connection before its handshake");
            closed(why);
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
    let addrs = match shared
        .egress
        .resolver
        .resolve(&remote.host, shared.config.tunnel.resolve_timeout())
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
    let port = shared.config.tunnel.remote_port;
    let (remote_stream, remote_addr) = match connect_any(
        &addrs,
        port,
        shared.config.tunnel.connect_timeout(),
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
    };
    if let Some(tls) = shared.tls.as_ref() {
        let tls_start = Instant::now();
        match tls.connect(remote_stream, &remote.host).await {
            Ok(remote_tls) => {
                phase("tls_handshake", tls_start);
                if let Some(Ok(server)) = super::tls::PeerIdentity::of_peer(remote_tls.get_ref().1)
                {
                    debug!(%target, %remote_addr, %server, "TLS to the remote sidecar established");
                }
                ctx.transport = super::Transport::Tls;
                send_and_relay(remote_tls, local, preamble, prefix, ctx, shared).await;
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
    send_and_relay(remote_stream, local, preamble, prefix, ctx, shared).await;
}

/// What [`send_and_relay`] logs and labels.
pub struct Outbound<'a> {
    pub local_peer: SocketAddr,
    pub remote_addr: SocketAddr,
    pub target: &'a str,
    pub initiator: &'a str,
    pub started: Instant,
    pub transport: super::Transport,
}

/// Sends the preamble and the replayed `send_name` to the remote sidecar,
/// then relays until either side closes. Generic over the remote stream so
/// that plain TCP and TLS share it.
pub async fn send_and_relay<R>(
    mut remote: R,
    local: TcpStream,
    preamble: Preamble,
    prefix: BytesMut,
    ctx: Outbound<'_>,
    shared: &Shared,
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
    } = ctx;
    let send_start = Instant::now();
    let mut head = BytesMut::with_capacity(super::preamble::HEADER_LEN + 64 + prefix.len());
    preamble.encode(&mut head);
    head.extend_from_slice(&prefix);
    let sent = async {
        remote.write_all(&head).await?;
        remote.flush().await
    };
    match tokio::time::timeout(shared.config.tunnel.preamble_timeout(), sent).await {
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

    let local_node = short_name(initiator).to_owned();
    let labels = [
        ("node", local_node.clone()),
        ("direction", "outbound".to_string()),
    ];
    metrics::counter!(m::DIST_CONNECTIONS, &labels).increment(1);
    // For the admin endpoint's /nodes: connections relayed for this node.
    let _counted = shared.open_connections.open(&local_node);
    let open = metrics::gauge!(m::DIST_CONNECTIONS_OPEN, &labels);
    open.increment(1.0);
    // rx: towards the local node; tx: from it (as on the inbound side).
    let rx = metrics::counter!(m::RELAYED_BYTES, "node" => local_node.clone(), "direction" => "rx");
    let tx = metrics::counter!(m::RELAYED_BYTES, "node" => local_node, "direction" => "tx");
    tx.increment(prefix.len() as u64);
    debug!(%local_peer, %initiator, %target, %remote_addr, transport = transport.label(), "egress relaying");
    let end = relay::relay(remote, local, rx, tx, &shared.hard_stop).await;
    open.decrement(1.0);
    let stats = end.stats();
    let outcome = match &end {
        RelayEnd::Closed(_) => "closed".to_string(),
        RelayEnd::Failed(_, e) => format!("error: {e}"),
        RelayEnd::Stopped(_) => "stopped at shutdown".to_string(),
    };
    info!(%initiator, %target, %remote_addr, transport = transport.label(),
        rx_bytes = stats.rx, tx_bytes = stats.tx + prefix.len() as u64,
        duration_ms = started.elapsed().as_millis() as u64, %outcome,
        "tunnel connection ended");
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

    #[tokio::test]
    async fn connect_any_tries_every_address_and_reports_the_last_failure() {
        let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = open.local_addr().unwrap().port();
        // 127.0.0.2 is loopback on Linux but nothing listens there on `port`.
        let addrs: Vec<IpAddr> = vec!["127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let (_s, addr) = connect_any(&addrs, port, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], port)));
        drop(open);
        let err = connect_any(&addrs[..1], port, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Failed { .. }), "{err}");
        let err = connect_any(&[], port, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Timeout { .. }), "{err}");
    }
}
