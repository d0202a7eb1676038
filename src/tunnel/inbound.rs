//! The tunnel's inbound side: connections the distribution listener hands
//! over by their first byte — mutual TLS, then the preamble, or the
//! preamble in clear text — routed to the node the preamble names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::net::ConnPermit;
use crate::warn_throttled;
use bytes::BytesMut;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::info;

use super::preamble::{self, Preamble};
use super::tls::{self, PeerIdentity, Tls};
use super::Transport;
use crate::acl::{AclHandle, AclPath, AclRequest};
use crate::distribution::forward::{self, Forwarder, Phase, RouteMethod, ToNode};
use crate::distribution::listener::{TunnelInbound, PREAMBLE_FIRST_BYTE};
use crate::epmd::registry::Registry;
use crate::metrics::{self as m, reason, record_closed as closed, record_phase as phase, route};

const _: () = assert!(preamble::MAGIC[0] == PREAMBLE_FIRST_BYTE);

/// What the inbound side needs.
pub struct Inbound {
    pub registry: Arc<Registry>,
    /// Mutual TLS; `None` when `[tls]` is not configured.
    pub tls: Option<Arc<Tls>>,
    /// `tls.bind_node_names`.
    pub bind_node_names: bool,
    /// Deadline for the preamble (`tunnel.preamble_timeout_ms`), from
    /// accept (plain) or the end of the TLS handshake.
    pub preamble_timeout: Duration,
    /// Deadline for the `send_name` after it (`dist.handshake_timeout_ms`,
    /// from the same start, and never before the preamble's).
    pub handshake_timeout: Duration,
    pub forward: Forwarder,
    /// `[[acl]]`: judged after the preamble, before the node is contacted.
    pub acl: Arc<AclHandle>,
}

impl TunnelInbound for Inbound {
    fn tls_configured(&self) -> bool {
        self.tls.is_some()
    }

    fn accept_tls<'a>(
        &'a self,
        stream: TcpStream,
        peer: SocketAddr,
        started: Instant,
        permit: ConnPermit,
    ) -> BoxFuture<'a, ()> {
        self.tls_then_preamble(stream, peer, started, permit)
            .boxed()
    }

    fn accept_preamble<'a>(
        &'a self,
        stream: TcpStream,
        peer: SocketAddr,
        started: Instant,
        permit: ConnPermit,
    ) -> BoxFuture<'a, ()> {
        let conn = Conn {
            peer,
            transport: Transport::Plain,
            identity: None,
            started,
            permit,
        };
        self.preamble(stream, conn).boxed()
    }
}

/// One inbound tunnel connection, as far as it got.
pub struct Conn {
    pub peer: SocketAddr,
    pub transport: Transport,
    /// The client certificate's identity, for `tls.bind_node_names`.
    pub identity: Option<PeerIdentity>,
    pub started: Instant,
    pub permit: ConnPermit,
}

impl Inbound {
    /// The server side of mutual TLS (deadline `tls.handshake_timeout_ms`),
    /// then the preamble inside it. Without `[tls]`, closed.
    async fn tls_then_preamble(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        started: Instant,
        permit: ConnPermit,
    ) {
        let Some(tls) = self.tls.as_ref() else {
            warn_throttled!(%peer, "TLS connection on the distribution port, but [tls] is not configured; closing");
            closed(reason::REFUSED_BY_POLICY);
            return;
        };
        let tls_start = Instant::now();
        match tls.accept_from(stream, peer.ip()).await {
            Ok((stream, identity)) => {
                phase("tls_handshake", tls_start);
                tracing::debug!(%peer, client = %identity, "TLS peer authenticated");
                let conn = Conn {
                    peer,
                    transport: Transport::Tls,
                    identity: Some(identity),
                    started,
                    permit,
                };
                self.preamble(stream, conn).await;
            }
            Err(e) => {
                // Counted by reason in distproxy_tls_handshake_failures_total.
                warn_throttled!(%peer, reason = e.reason(), error = %e, "TLS handshake with a peer failed; closing");
                closed(reason::TLS_HANDSHAKE_FAILED);
            }
        }
    }

    /// Reads the preamble, routes to the named node, checks that the
    /// replayed `send_name` names the preamble's initiator, and relays.
    /// `stream` starts at the preamble's first byte (plain TCP, or the
    /// decrypted TLS stream).
    pub async fn preamble<S>(&self, mut stream: S, conn: Conn)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            peer,
            transport,
            identity,
            started,
            permit,
        } = conn;
        // The preamble and the `send_name` after it are one phase, with
        // deadlines absolute from its start: the accept for a plain
        // connection (whose first byte was waited for within it), the end
        // of the TLS handshake (a phase with a deadline of its own) inside
        // TLS. The egress side sends both at once, so the `send_name` is
        // due by the later of the two; a peer trickling bytes no longer
        // gets a fresh wait for each step.
        let phase_start = match transport {
            Transport::Plain => tokio::time::Instant::from_std(started),
            Transport::Tls => tokio::time::Instant::now(),
        };
        let preamble_deadline = phase_start + self.preamble_timeout;
        let send_name_deadline = preamble_deadline.max(phase_start + self.handshake_timeout);
        let mut buf = BytesMut::with_capacity(512);
        let read = forward::read_until(
            &mut stream,
            &mut buf,
            Phase::Preamble,
            preamble_deadline,
            |b| {
                Ok::<_, preamble::PreambleError>(preamble::parse(b)?.map(|(p, used)| {
                    let _ = b.split_to(used);
                    p
                }))
            },
        )
        .await;
        let preamble = match read {
            Ok(p) => p,
            Err(e) => {
                warn_throttled!(%peer, transport = transport.label(), error = %e,
                    "closing tunnel connection: no valid preamble");
                closed(e.reason());
                return;
            }
        };
        // From the phase's start: inside TLS, not the handshake before it
        // (timed as `tls_handshake`).
        phase("preamble", phase_start.into_std());
        let Preamble { target, initiator } = &preamble;

        // Name binding: the initiator's host must be a SAN of the client
        // certificate. Plain connections carry no identity (`tls.require_tls`
        // refuses them from other hosts before this point).
        if self.bind_node_names {
            if let Some(identity) = &identity {
                if let Err(e) = tls::check_node_binding(identity, initiator) {
                    warn_throttled!(%peer, transport = transport.label(), %target, %initiator, error = %e,
                        "tunnel initiator not bound to the peer's certificate (tls.bind_node_names); closing");
                    closed(reason::REFUSED_BY_POLICY);
                    return;
                }
            }
        }

        let short = preamble.target_short_name();
        let sans: Option<Vec<String>> = identity.as_ref().map(|id| {
            id.dns_names
                .iter()
                .cloned()
                .chain(id.ip_addrs.iter().map(|ip| ip.to_string()))
                .collect()
        });
        let request = AclRequest {
            initiator,
            target: short,
            identity: sans.as_deref(),
        };
        let path = match transport {
            Transport::Tls => AclPath::Tls,
            Transport::Plain => AclPath::Preamble,
        };
        if !self.acl.admit(&request, peer, path) {
            closed(reason::REFUSED_BY_POLICY);
            return;
        }
        let Some(node) = self.registry.get(short) else {
            warn_throttled!(%peer, transport = transport.label(), %target, %initiator,
                registered = self.registry.len(),
                "tunnel connection for a node not registered here; closing");
            metrics::counter!(m::ROUTES, "method" => route::UNROUTABLE).increment(1);
            closed(reason::UNKNOWN_NODE);
            return;
        };

        // The send_name that follows must be the preamble's initiator: the
        // preamble is what policy (and TLS name binding) judged.
        let send_name = match forward::read_send_name(&mut stream, &mut buf, send_name_deadline)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                warn_throttled!(%peer, transport = transport.label(), %target, %initiator, error = %e,
                    "closing tunnel connection before its handshake");
                closed(e.reason());
                return;
            }
        };
        if send_name.name != *initiator {
            warn_throttled!(%peer, transport = transport.label(), %target, preamble_initiator = %initiator,
                handshake_initiator = %send_name.name,
                "tunnel preamble and handshake name different initiators; closing");
            closed(reason::REFUSED_BY_POLICY);
            return;
        }
        metrics::counter!(m::ROUTES, "method" => route::PREAMBLE).increment(1);
        info!(%peer, transport = transport.label(), %target, %initiator, "tunnel connection routed by preamble");
        let to = ToNode {
            peer,
            initiator: initiator.clone(),
            node,
            method: RouteMethod::Preamble,
            entry: None,
            prefix: buf,
            started,
            permit,
        };
        forward::relay_to_node(stream, to, &self.forward).await;
    }
}
