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

use crate::net::ConnPermit;
use crate::warn_throttled;
use bytes::BytesMut;
use futures_util::future::BoxFuture;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::beam_tls::{self, Destination};
use super::forward::{self, Forwarder, ToNode};
use super::router::Correlator;
use crate::acl::{AclHandle, AclPath, AclRequest};
use crate::config::BeamTls;
use crate::epmd::registry::Registry;
use crate::metrics::{self as m, reason, record_closed as closed, record_phase as phase, route};
use crate::net::{accept_loop, ConnectionLimit, Stop};

/// First byte of a TLS record carrying a handshake (the ClientHello).
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// First bytes of a tunnel preamble (`DPX`).
pub const PREAMBLE_FIRST_BYTE: u8 = b'D';

/// The tunnel's inbound side, as the listener sees it: connections whose
/// first byte is [`TLS_HANDSHAKE_BYTE`] or [`PREAMBLE_FIRST_BYTE`].
pub trait TunnelInbound: Send + Sync {
    /// Whether `[tls]` is on (a TLS server takes tunnel connections).
    fn tls_configured(&self) -> bool;
    /// A TLS connection (the first byte was peeked, not read).
    fn accept_tls<'a>(
        &'a self,
        stream: TcpStream,
        peer: SocketAddr,
        started: Instant,
        permit: ConnPermit,
    ) -> BoxFuture<'a, ()>;
    /// A plain-text preamble (the first byte was peeked, not read).
    fn accept_preamble<'a>(
        &'a self,
        stream: TcpStream,
        peer: SocketAddr,
        started: Instant,
        permit: ConnPermit,
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
    /// `[[acl]]`: judged once the target is chosen, before the node is
    /// contacted.
    pub acl: Arc<AclHandle>,
    /// `dist.beam_tls`: nodes' own TLS distribution.
    pub beam_tls: BeamTls,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// Accepts distribution connections until shutdown.
pub async fn serve(listener: TcpListener, ctx: Arc<DistCtx>) {
    let (tracker, limit) = (ctx.tracker.clone(), ctx.limit.clone());
    let stop = Stop {
        accepting: ctx.shutdown.clone(),
        connections: ctx.forward.hard_stop.clone(),
    };
    accept_loop(
        "distribution",
        listener,
        stop,
        tracker,
        limit,
        move |stream, peer, permit| {
            let ctx = Arc::clone(&ctx);
            async move { handle(stream, peer, permit, &ctx).await }
        },
    )
    .await
}

async fn handle(stream: TcpStream, peer: SocketAddr, permit: ConnPermit, ctx: &DistCtx) {
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started) + ctx.handshake_timeout;
    let peer_ip: IpAddr = peer.ip().to_canonical();
    let _ = stream.set_nodelay(true);
    ctx.forward.tcp.apply(&stream);

    // First-byte dispatch: the byte is peeked, not read, so each path sees
    // the connection from its start.
    let first = match forward::peek_first_byte(&stream, deadline).await {
        Ok(byte) => byte,
        Err(e) => {
            // Closed with nothing sent: a reachability probe (a Service's
            // TCP check), not a failure. A peer silent until the deadline
            // or failing holds a connection slot: a warning, rate-limited.
            if e.is_empty() {
                debug!(%peer, error = %e, "closing distribution connection before its first byte");
                closed(reason::EMPTY);
            } else {
                warn_throttled!(%peer, error = %e, "closing distribution connection before its first byte");
                closed(e.reason());
            }
            return;
        }
    };
    // TLS: a sidecar's tunnel, or a node's own TLS distribution, told
    // apart by the ClientHello (peeked, not read).
    // The pending lookup this connection answers (peer address and the
    // advertised port it came in on), taken once its kind is known.
    let take_entry = || {
        let port = stream
            .local_addr()
            .map(|a| ctx.correlator.pool_port(a.port()))
            .unwrap_or_else(|_| ctx.correlator.ports()[0]);
        ctx.correlator.consume(peer_ip, port)
    };
    if first == TLS_HANDSHAKE_BYTE {
        let tls = ctx.tunnel.tls_configured();
        let hello = match beam_tls::peek_hello(&stream, deadline).await {
            Ok(hello) => hello,
            Err(e) => {
                warn_throttled!(%peer, error = %e, "closing TLS connection before its ClientHello was complete");
                // Without a tunnel TLS server it can only have been a node's:
                // its lookup must not hold the peer's others until it expires.
                if !tls {
                    take_entry();
                }
                closed(e.reason());
                return;
            }
        };
        match beam_tls::destination(&hello, tls, take_entry) {
            Destination::Tunnel => ctx.tunnel.accept_tls(stream, peer, started, permit).await,
            Destination::Node(entry) => {
                let route = beam_tls::Ctx {
                    policy: ctx.beam_tls,
                    registry: &ctx.registry,
                    acl: &ctx.acl,
                    forward: &ctx.forward,
                };
                beam_tls::relay_to_node(stream, peer, entry, started, permit, route).await
            }
            Destination::Invalid => {
                warn_throttled!(%peer, "TLS record on the distribution port that is not a ClientHello; closing");
                closed(reason::BAD_FRAME);
            }
        }
        return;
    }
    // `tls.require_tls`: from other hosts, only TLS. Loopback is exempt
    // (local nodes, `kubectl port-forward`).
    if ctx.require_tls && !peer_ip.is_loopback() {
        warn_throttled!(%peer, first_byte = first,
            "plaintext distribution connection from another host refused (tls.require_tls)");
        // A raw handshake was announced by a lookup: take it, so that the
        // peer's next lookup is not held behind it until it expires.
        if first != PREAMBLE_FIRST_BYTE {
            take_entry();
        }
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
    // garbage that read_send_name refuses): routed by correlation. The entry
    // is taken now, before anything can fail: this connection is the one it
    // announced even if it dies before its first frame.
    let entry = take_entry();
    let mut stream = stream;
    let mut buf = BytesMut::with_capacity(512);
    let send_name = match forward::read_send_name(&mut stream, &mut buf, deadline).await {
        Ok(s) => s,
        Err(e) => {
            warn_throttled!(%peer, error = %e, entry = ?entry.as_ref().map(|c| (c.id, &c.node)),
                "closing distribution connection before routing");
            closed(e.reason());
            return;
        }
    };
    phase("first_frame", started);
    let initiator = send_name.name;

    // Choose the target: the peer's oldest pending lookup, else the only node.
    let Some((target, method)) = forward::correlated_or_single(entry.as_ref(), &ctx.registry)
    else {
        warn_throttled!(%peer, %initiator, registered = ctx.registry.len(),
            "unroutable distribution connection: no pending lookup from this peer and not exactly one node registered");
        metrics::counter!(m::ROUTES, "method" => route::UNROUTABLE).increment(1);
        closed(reason::UNROUTABLE);
        return;
    };
    let request = AclRequest {
        initiator: &initiator,
        target: &target,
        identity: None,
    };
    if !ctx.acl.admit(&request, peer, AclPath::Raw) {
        closed(reason::REFUSED_BY_POLICY);
        return;
    }
    metrics::counter!(m::ROUTES, "method" => method.label()).increment(1);
    let Some(node) = ctx.registry.get(&target) else {
        warn_throttled!(%peer, %initiator, %target, "target node is no longer registered; closing");
        closed(reason::NODE_GONE);
        return;
    };
    let to = ToNode {
        peer,
        initiator,
        node,
        method,
        entry,
        prefix: buf,
        started,
        permit,
    };
    forward::relay_to_node(stream, to, &ctx.forward).await;
}
