//! The sidecar ↔ sidecar tunnel: exact routing between pods that both run
//! distproxy (DESIGN.md, "Sidecar ↔ sidecar tunnel").
//!
//! ```text
//!  pod A                                             pod B
//!  a1 ──address_please(b1@pod-b)──► EPMD (egress request, 'E')
//!     ◄── {ok, {127,0,0,1}, EgressPort, 6} ──
//!  a1 ──dist──► 127.0.0.1:EgressPort ─┐
//!               egress.rs: read send_name, resolve pod-b,
//!               dial pod-b:43691, [TLS], preamble + send_name ──► dist port
//!                                                   first byte 'D': preamble,
//!                                                   route to b1 by name ──► b1
//! ```
//!
//! - [`preamble`]: the versioned preamble (no I/O).
//! - [`egress`]: per-remote-node loopback listeners and the outbound path.
//! - [`resolve`]: host resolution with hickory-resolver (pod resolv.conf,
//!   `/etc/hosts`, search domains, cache).
//! - [`tls`]: mutual TLS between sidecars.
//! - This module: the inbound side, entered from the distribution listener's
//!   first-byte dispatch ([`accept_preamble`], [`accept_tls`]).
//!
//! Streams are generic (`AsyncRead + AsyncWrite + Unpin + Send`) from the
//! point where TLS may wrap them, so the plain and the TLS paths share the
//! preamble and relay code, each monomorphised, with no boxing on the hot
//! path.

pub mod egress;
pub mod preamble;
pub mod resolve;
pub mod tls;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::dist::listener::{self, RouteMethod};
use crate::metrics::{self as m, reason, route};
use crate::server::Shared;
use preamble::{Preamble, PreambleError};

/// First byte of a TLS record carrying a handshake (the ClientHello).
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// How a tunnel connection reached us; for logs (and, with TLS, for the
/// peer's identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Preamble in clear text on TCP.
    Plain,
    /// Preamble inside a mutual-TLS session.
    Tls,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Plain => "plain",
            Transport::Tls => "tls",
        }
    }
}

use crate::metrics::{record_closed as closed, record_phase as phase};

/// A connection whose first byte is [`TLS_HANDSHAKE_BYTE`]: the server side
/// of mutual TLS (deadline `tls.handshake_timeout_ms`), then the preamble
/// inside it ([`accept_preamble_with`], with the client certificate's
/// identity for `tls.bind_node_names`). Without `[tls]`, closed.
pub async fn accept_tls(stream: TcpStream, peer: SocketAddr, started: Instant, shared: &Shared) {
    let Some(tls) = shared.tls.as_ref() else {
        warn!(%peer, "TLS connection on the distribution port, but [tls] is not configured; closing");
        closed(reason::REFUSED_BY_POLICY);
        return;
    };
    let tls_start = Instant::now();
    match tls.accept(stream).await {
        Ok((stream, identity)) => {
            phase("tls_handshake", tls_start);
            tracing::debug!(%peer, client = %identity, "TLS peer authenticated");
            accept_preamble_with(
                stream,
                peer,
                Transport::Tls,
                Some(&identity),
                started,
                shared,
            )
            .await;
        }
        Err(e) => {
            // Counted by reason in distproxy_tls_handshake_failures_total.
            warn!(%peer, reason = e.reason(), error = %e, "TLS handshake with a peer failed; closing");
            closed(reason::TLS_HANDSHAKE_FAILED);
        }
    }
}

/// Why a preamble could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadPreambleError {
    #[error("timed out waiting for the tunnel preamble")]
    Timeout,
    #[error("connection closed inside the tunnel preamble ({0} bytes read)")]
    Closed(usize),
    #[error(transparent)]
    Bad(#[from] PreambleError),
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

impl ReadPreambleError {
    /// The `reason` label when this ends a connection.
    pub fn reason(&self) -> &'static str {
        match self {
            ReadPreambleError::Timeout => reason::TIMEOUT,
            ReadPreambleError::Bad(_) => reason::BAD_FRAME,
            ReadPreambleError::Closed(_) | ReadPreambleError::Io(_) => reason::PEER_CLOSED,
        }
    }
}

/// Reads a preamble from `stream` within `deadline`. On success `buf` holds
/// the bytes read after the preamble (the start of the relayed stream).
pub async fn read_preamble<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    deadline: Duration,
) -> Result<Preamble, ReadPreambleError> {
    let read = async {
        loop {
            if let Some((p, used)) = preamble::parse(buf)? {
                let _ = buf.split_to(used);
                return Ok(p);
            }
            // parse() bounds the preamble, so this never grows past
            // HEADER_LEN + MAX_BODY_LEN plus one read.
            buf.reserve(512);
            if stream.read_buf(buf).await? == 0 {
                return Err(ReadPreambleError::Closed(buf.len()));
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .unwrap_or(Err(ReadPreambleError::Timeout))
}

/// An inbound tunnel connection: reads the preamble, routes to the named
/// node, checks that the replayed `send_name` names the preamble's
/// initiator, and relays. `stream` starts at the preamble's first byte
/// (plain TCP, or the decrypted TLS stream).
pub async fn accept_preamble<S>(
    stream: S,
    peer: SocketAddr,
    transport: Transport,
    started: Instant,
    shared: &Shared,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    accept_preamble_with(stream, peer, transport, None, started, shared).await
}

/// [`accept_preamble`] for a connection whose peer proved an identity (the
/// client certificate of a TLS connection): with `tls.bind_node_names`, the
/// preamble's initiator must be a node of a host the certificate names.
pub async fn accept_preamble_with<S>(
    mut stream: S,
    peer: SocketAddr,
    transport: Transport,
    identity: Option<&tls::PeerIdentity>,
    started: Instant,
    shared: &Shared,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(512);
    let preamble = match read_preamble(
        &mut stream,
        &mut buf,
        shared.config.tunnel.preamble_timeout(),
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            let why = e.reason();
            warn!(%peer, transport = transport.label(), error = %e,
                    "closing tunnel connection: no valid preamble");
            closed(why);
            return;
        }
    };
    phase("preamble", started);
    let Preamble { target, initiator } = &preamble;

    // Name binding: the initiator's host must be a SAN of the client
    // certificate. Plain connections carry no identity (`tls.require_tls`
    // refuses them from other hosts before this point).
    if shared.config.tls.bind_node_names {
        if let Some(identity) = identity {
            if let Err(e) = tls::check_node_binding(identity, initiator) {
                warn!(%peer, transport = transport.label(), %target, %initiator, error = %e,
                    "tunnel initiator not bound to the peer's certificate (tls.bind_node_names); closing");
                closed(reason::REFUSED_BY_POLICY);
                return;
            }
        }
    }

    let short = preamble.target_short_name();
    let Some(node) = shared.registry.get(short) else {
        warn!(%peer, transport = transport.label(), %target, %initiator,
            registered = shared.registry.len(),
            "tunnel connection for a node not registered here; closing");
        metrics::counter!(m::ROUTES, "method" => route::UNROUTABLE).increment(1);
        closed(reason::UNKNOWN_NODE);
        return;
    };

    // The send_name that follows must be the preamble's initiator: the
    // preamble is what policy (and TLS name binding) judged.
    let send_name = match listener::read_send_name(
        &mut stream,
        &mut buf,
        shared.config.dist.handshake_timeout(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let why = e.reason();
            warn!(%peer, transport = transport.label(), %target, %initiator, error = %e,
                "closing tunnel connection before its handshake");
            closed(why);
            return;
        }
    };
    if send_name.name != *initiator {
        warn!(%peer, transport = transport.label(), %target, preamble_initiator = %initiator,
            handshake_initiator = %send_name.name,
            "tunnel preamble and handshake name different initiators; closing");
        closed(reason::REFUSED_BY_POLICY);
        return;
    }
    metrics::counter!(m::ROUTES, "method" => route::PREAMBLE).increment(1);
    info!(%peer, transport = transport.label(), %target, %initiator, "tunnel connection routed by preamble");
    listener::relay_to_node(
        stream,
        peer,
        initiator,
        node,
        RouteMethod::Preamble,
        None,
        buf,
        started,
        shared,
    )
    .await;
}
