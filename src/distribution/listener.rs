//! The distribution port: accept, dispatch on the first byte, read the
//! initiator's `send_name`, choose the target node, and hand the connection
//! to [`super::forward`].
//!
//! One deadline, `dist.handshake_timeout_ms` from accept, covers the whole
//! first-frame phase (waiting for the first byte and reading `send_name`).
//! Connections whose first byte starts TLS or a tunnel preamble go to the
//! [`TunnelInbound`] the sidecar wired in.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::future::BoxFuture;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::forward::{self, Forwarder, RouteMethod, ToNode};
use super::router::Correlator;
use crate::epmd::registry::Registry;
use crate::metrics::{self as m, reason, record_closed as closed, record_phase as phase, route};
use crate::net::{accept_loop, ConnectionLimit};

/// First byte of a TLS record carrying a handshake (the ClientHello).
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// First bytes of a tunnel preamble (`DPX`).
pub const PREAMBLE_FIRST_BYTE: u8 = b'D';

/// The tunnel's inbound side, as the listener sees it: connections whose
/// first byte is [`TLS_HANDSHAKE_BYTE`] or [`PREAMBLE_FIRST_BYTE`].
pub trait TunnelInbound: Send + Sync {
    /// A TLS connection (the first byte was peeked, not read).
    fn accept_tls<'a>(
        &'a self,
        stream: TcpStream,
        peer: SocketAddr,
        started: Instant,
        permit: OwnedSemaphorePermit,
    ) -> BoxFuture<'a, ()>;
    /// A plain-text preamble (the first byte was peeked, not read).
    fn accept_preamble<'a>(
        &'a self,
        stream: TcpStream,
        peer: SocketAddr,
        started: Instant,
        permit: OwnedSemaphorePermit,
    ) -> BoxFuture<'a, ()>;
}

/// What the distribution listener needs.
pub struct DistCtx {
    pub registry: Arc<Registry>,
    pub correlator: Arc<Correlator>,
    /// Deadline of the first-frame phase (`dist.handshake_timeout_ms`).
    pub handshake_timeout: Duration,
    /// `tls.require_tls`: from other hosts, only TLS.
    pub require_tls: bool,
    pub forward: Forwarder,
    /// `dist.max_connections`, shared with the egress listeners.
    pub limit: ConnectionLimit,
    pub tunnel: Arc<dyn TunnelInbound>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// Accepts distribution connections until shutdown.
pub async fn serve(listener: TcpListener, ctx: Arc<DistCtx>) {
    let (shutdown, tracker, limit) = (ctx.shutdown.clone(), ctx.tracker.clone(), ctx.limit.clone());
    accept_loop(
        "distribution",
        listener,
        shutdown,
        tracker,
        limit,
        move |stream, peer, permit| {
            let ctx = Arc::clone(&ctx);
            async move { handle(stream, peer, permit, &ctx).await }
        },
    )
    .await
}

async fn handle(stream: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit, ctx: &DistCtx) {
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started) + ctx.handshake_timeout;
    let peer_ip: IpAddr = peer.ip().to_canonical();
    let _ = stream.set_nodelay(true);

    // First-byte dispatch: the byte is peeked, not read, so each path sees
    // the connection from its start.
    let first = match forward::peek_first_byte(&stream, deadline).await {
        Ok(byte) => byte,
        Err(e) => {
            debug!(%peer, error = %e, "closing distribution connection before its first byte");
            closed(e.reason());
            return;
        }
    };
    if first == TLS_HANDSHAKE_BYTE {
        ctx.tunnel.accept_tls(stream, peer, started, permit).await;
        return;
    }
    // `tls.require_tls`: from other hosts, only TLS. Loopback is exempt
    // (local nodes, `kubectl port-forward`).
    if ctx.require_tls && !peer_ip.is_loopback() {
        warn!(%peer, first_byte = first,
            "plaintext distribution connection from another host refused (tls.require_tls)");
        closed(reason::REFUSED_BY_POLICY);
        return;
    }
    if first == PREAMBLE_FIRST_BYTE {
        ctx.tunnel
            .accept_preamble(stream, peer, started, permit)
            .await;
        return;
    }
    // Otherwise a raw distribution handshake (first byte 0x00..=0x08, or
    // garbage that read_send_name refuses): routed by correlation.
    let mut stream = stream;
    let mut buf = BytesMut::with_capacity(512);
    let send_name = match forward::read_send_name(&mut stream, &mut buf, deadline).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%peer, error = %e, "closing distribution connection before routing");
            closed(e.reason());
            return;
        }
    };
    phase("first_frame", started);
    let initiator = send_name.name;

    // Choose the target: the peer's oldest pending lookup, else the only node.
    let (target, method) = match ctx.correlator.consume(peer_ip) {
        Some(node) => (node, RouteMethod::Correlated),
        None => match ctx.registry.single() {
            Some(only) => (only.spec.name, RouteMethod::SingleNode),
            None => {
                warn!(%peer, %initiator, registered = ctx.registry.len(),
                    "unroutable distribution connection: no pending lookup from this peer and not exactly one node registered");
                metrics::counter!(m::ROUTES, "method" => route::UNROUTABLE).increment(1);
                closed(reason::UNROUTABLE);
                return;
            }
        },
    };
    metrics::counter!(m::ROUTES, "method" => method.label()).increment(1);
    let Some(node) = ctx.registry.get(&target) else {
        warn!(%peer, %initiator, %target, "target node is no longer registered; closing");
        closed(reason::NODE_GONE);
        return;
    };
    let to = ToNode {
        peer,
        initiator,
        node,
        method,
        prefix: buf,
        started,
        permit,
    };
    forward::relay_to_node(stream, to, &ctx.forward).await;
}
