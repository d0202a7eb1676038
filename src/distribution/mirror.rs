//! Same-pod lookups of stock nodes: exact by port, no correlation.
//!
//! A node looking up another node of its own pod by the pod's name reaches
//! the EPMD server from the pod address (the peer address equals the EPMD
//! socket's local address). The nodes listen on loopback only, so their own
//! port is not reachable on the pod address; correlation would work but
//! serialises every target behind every other of that peer, and the whole
//! pod shares one peer address.
//!
//! Instead the lookup is answered with the node's own port, and a **mirror
//! listener** is bound on `pod address:node port` that relays every
//! connection to `127.0.0.1:node port`. The port names the node, so routing
//! is exact, concurrent lookups never wait for each other, and the bytes are
//! relayed once (as for any cross-pod connection). When the port on the pod
//! address is already taken (the node itself listens on every address), the
//! node's port is answered without a mirror. When binding fails otherwise,
//! the lookup falls back to correlation.
//!
//! A mirror lives while a node with its port is registered (checked every
//! [`CHECK_INTERVAL`]); connections already relayed outlive it.
//!
//! A mirror takes connections from the pod only (the pod address itself, or
//! loopback): it listens on the pod address, where other pods can reach it
//! too, and what it relays is not judged by the rules of the distribution
//! port (`[[acl]]`, `tls.require_tls`, the per-source limit). A connection
//! from another host is closed before the node is contacted, logged and
//! counted as `refused_by_policy`.
//!
//! Measured alternative: correlating same-pod lookups like remote ones; see
//! the README's mesh bench.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::warn_throttled;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::forward::{ConnectionGuard, Direction, Forwarder};
use super::relay::RelayStats;
use crate::epmd::registry::{NodeEntry, Registry};
use crate::metrics::{self as m, reason};
use crate::net::ConnectionLimit;

/// How often a mirror checks that its node is still registered.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Mirror listeners by (pod address, port), and what their connections
/// need.
pub struct Mirrors {
    open: Mutex<HashMap<SocketAddr, u64>>,
    next: Mutex<u64>,
    registry: Arc<Registry>,
    forward: Forwarder,
    limit: ConnectionLimit,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Mirrors {
    pub fn new(
        registry: Arc<Registry>,
        forward: Forwarder,
        limit: ConnectionLimit,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Mirrors {
        Mirrors {
            open: Mutex::new(HashMap::new()),
            next: Mutex::new(0),
            registry,
            forward,
            limit,
            shutdown,
            tracker,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, u64>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mirror listeners open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The port to answer a same-pod lookup of `node` with (opening its
    /// mirror on `pod_ip` if needed), or `None` to fall back to correlation.
    pub fn same_pod_port(self: &Arc<Self>, node: &NodeEntry, pod_ip: IpAddr) -> Option<u16> {
        let port = node.spec.port;
        if !node.addr.is_loopback() || pod_ip.is_loopback() {
            return None;
        }
        let at = SocketAddr::new(pod_ip, port);
        let mut open = self.lock();
        if open.contains_key(&at) {
            return Some(port);
        }
        match crate::net::bind_tcp(at) {
            Ok(listener) => {
                let generation = {
                    let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
                    *next += 1;
                    *next
                };
                open.insert(at, generation);
                drop(open);
                // Before the port is answered: local nodes' connections to
                // the mirror join node routes as they are established.
                if let Some(r) = self.forward.node_routes() {
                    if let Err(e) = r.add_relay_port(port) {
                        debug!(%at, error = %e, "mirror port not added to node routes");
                    }
                }
                info!(node = %node.spec.name, %at, "same-pod mirror listener opened");
                let target = SocketAddr::new(node.addr, port);
                self.tracker
                    .spawn(Arc::clone(self).serve(listener, at, target, generation));
                Some(port)
            }
            // The node (or something) already listens there: the port is
            // reachable as it is.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Some(port),
            Err(e) => {
                warn!(node = %node.spec.name, %at, error = %e,
                    "cannot open a same-pod mirror listener; correlating instead");
                None
            }
        }
    }

    /// Whether a node with this port is still registered.
    fn port_registered(&self, port: u16) -> bool {
        self.registry.list().iter().any(|n| n.spec.port == port)
    }

    async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        at: SocketAddr,
        target: SocketAddr,
        generation: u64,
    ) {
        let routes = self.forward.node_routes();
        let mut check = tokio::time::interval(CHECK_INTERVAL);
        check.tick().await;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = check.tick() => {
                    if !self.port_registered(target.port()) {
                        break;
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if !crate::net::is_local_peer(peer.ip(), Some(at)) {
                            warn_throttled!(%peer, %at, "same-pod mirror: connection from another host refused");
                            m::record_closed(reason::REFUSED_BY_POLICY);
                            continue;
                        }
                        let mirrors = Arc::clone(&self);
                        self.tracker.spawn(async move {
                            mirrors.connection(stream, peer, target).await;
                        });
                    }
                    Err(e) => {
                        metrics::counter!(m::ACCEPT_FAILURES, "listener" => "mirror").increment(1);
                        warn_throttled!(%at, error = %e, "mirror accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        let mut open = self.lock();
        if open.get(&at) == Some(&generation) {
            open.remove(&at);
            if let Some(r) = routes {
                r.remove_relay_port(at.port());
            }
        }
        drop(open);
        info!(%at, "same-pod mirror listener closed");
    }

    async fn connection(&self, stream: TcpStream, peer: SocketAddr, target: SocketAddr) {
        let started = Instant::now();
        let Some(permit) = self.limit.try_acquire() else {
            warn_throttled!(%peer, %target, "same-pod mirror: connection limit reached; closing");
            m::record_closed(reason::OVER_LIMIT);
            return;
        };
        let _ = stream.set_nodelay(true);
        // Announced to node routes: a mirror arms them before the handshake
        // (the acceptor has sent nothing yet).
        let (node_stream, announced) = match self.forward.connect_node(target, true).await {
            Ok(connected) => connected,
            Err(e) => {
                warn_throttled!(%peer, %target, error = %e, "same-pod mirror: failed to connect to node");
                return;
            }
        };
        let node = self
            .registry
            .list()
            .into_iter()
            .find(|n| n.spec.port == target.port())
            .map(|n| n.spec.name)
            .unwrap_or_else(|| "unknown".to_string());
        metrics::counter!(m::ROUTES, "method" => m::route::SAME_POD).increment(1);
        let guard =
            ConnectionGuard::open(permit, &self.forward.node_stats, &node, Direction::SamePod);
        // The relay starts before the handshake: the node (the acceptor)
        // has sent nothing, the initiator at most its `send_name`.
        let (stats, outcome, _guard) = self
            .forward
            .relay(guard, stream, node_stream, RelayStats::default(), true)
            .await;
        drop(announced);
        debug!(%peer, %target, %node, rx_bytes = stats.rx, tx_bytes = stats.tx,
            duration_ms = started.elapsed().as_millis() as u64, %outcome, "same-pod connection ended");
    }
}
