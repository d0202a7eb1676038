//! One egress connection: read the local node's `send_name`, resolve the
//! remote host, dial its sidecar (TLS when configured), send the preamble
//! and the replayed `send_name`, then relay.

use std::net::SocketAddr;
use std::time::Instant;

use crate::net::ConnPermit;
use crate::warn_throttled;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::distribution::forward::{self, ConnectionGuard, Direction};
use crate::distribution::listener::TLS_HANDSHAKE_BYTE;
use crate::distribution::relay::{RelayEnd, RelayStats};
use crate::metrics::{reason, record_closed as closed, record_phase as phase};
use crate::net::{connect_any, ConnectError};
use crate::node_name::short_name;
use crate::tunnel::preamble::Preamble;
use crate::tunnel::resolve::Family;

use super::{EgressManager, RemoteNode};

impl EgressManager {
    /// One local connection to an egress listener: read the local node's
    /// `send_name`, reach the remote sidecar, send the preamble, relay.
    pub(super) async fn outbound(
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
                // A TLS record: the node runs its own TLS distribution,
                // which the tunnel does not carry (this release's module
                // connects such nodes the stock way).
                if prefix.first() == Some(&TLS_HANDSHAKE_BYTE) {
                    warn_throttled!(%local_peer, %target, error = %e,
                        "closing egress connection: the node uses its own TLS distribution (inet_tls_dist), which egress ports do not carry; update the distproxy_epmd module, which connects such nodes the stock way");
                } else {
                    warn_throttled!(%local_peer, %target, error = %e, "closing egress connection before its handshake");
                }
                closed(e.reason());
                return;
            }
        };
        phase("egress_first_frame", started);
        let initiator = send_name.name;
        let preamble = match Preamble::new(target, &initiator) {
            Ok(p) => p,
            Err(e) => {
                warn_throttled!(%local_peer, %target, %initiator, error = %e, "cannot build a tunnel preamble; closing");
                closed(reason::BAD_FRAME);
                return;
            }
        };

        let resolve_start = Instant::now();
        let addrs = match self
            .resolver
            .resolve(
                &remote.host,
                self.settings.resolve_timeout_ms.duration(),
                // The family the node would have dialled itself: an
                // `inet6_tcp` node reaches its egress port over `::1`.
                Family::of(local_peer.ip()),
            )
            .await
        {
            Ok(a) => a,
            Err(e) => {
                warn_throttled!(%initiator, %target, error = %e, "egress: cannot resolve the remote host; closing");
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
            self.settings.connect_timeout_ms.duration(),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                let why = match e {
                    ConnectError::Timeout { .. } => reason::TIMEOUT,
                    ConnectError::Failed { .. } => reason::CONNECT_FAILED,
                };
                warn_throttled!(%initiator, %target, error = %e, "egress: cannot reach the remote sidecar; closing");
                closed(why);
                // The host's sidecar may be gone (a pod rolled back, or
                // replaced by one without distproxy under the same name):
                // the next egress request probes it again, and is refused
                // (the node falls back to the stock way) if nothing answers.
                self.probe.forget_success(&remote.host);
                // And its addresses: the pod may have moved.
                self.resolver.forget(&remote.host);
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
            transport: crate::tunnel::Transport::Plain,
            permit,
        };
        if let Some(tls) = self.tls.as_ref() {
            let tls_start = Instant::now();
            match tls
                .connect_to(remote_stream, &remote.host, remote_addr.ip())
                .await
            {
                Ok(remote_tls) => {
                    phase("tls_handshake", tls_start);
                    if let Some(Ok(server)) =
                        crate::tunnel::tls::PeerIdentity::of_peer(remote_tls.get_ref().1)
                    {
                        debug!(%target, %remote_addr, %server, "TLS to the remote sidecar established");
                    }
                    ctx.transport = crate::tunnel::Transport::Tls;
                    self.send_and_relay(remote_tls, local, preamble, prefix, ctx)
                        .await;
                }
                Err(e) if e.closed_by_peer() => {
                    // Counted by reason in distproxy_tls_handshake_failures_total.
                    warn_throttled!(%initiator, %target, %remote_addr, reason = e.reason(), error = %e,
                    "egress: the remote sidecar closed the TLS handshake; it may have no [tls] (a rollout in the wrong order: its log says 'TLS connection on the distribution port, but [tls] is not configured') or have refused the connection (its log says why); closing");
                    closed(reason::TLS_HANDSHAKE_FAILED);
                }
                Err(e) => {
                    // Counted by reason in distproxy_tls_handshake_failures_total.
                    warn_throttled!(%initiator, %target, %remote_addr, reason = e.reason(), error = %e,
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
    pub transport: crate::tunnel::Transport,
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
        let mut head =
            BytesMut::with_capacity(crate::tunnel::preamble::HEADER_LEN + 64 + prefix.len());
        preamble.encode(&mut head);
        head.extend_from_slice(&prefix);
        let sent = async {
            remote.write_all(&head).await?;
            remote.flush().await
        };
        match tokio::time::timeout(self.settings.preamble_timeout_ms.duration(), sent).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn_throttled!(%initiator, %target, %remote_addr, error = %e, "egress: failed to send the preamble; closing");
                closed(reason::PEER_CLOSED);
                return;
            }
            Err(_) => {
                warn_throttled!(%initiator, %target, %remote_addr, "egress: timed out sending the preamble; closing");
                closed(reason::TIMEOUT);
                return;
            }
        }
        phase("send_preamble", send_start);

        let local_node = short_name(initiator);
        let guard = ConnectionGuard::open(
            permit,
            &self.forward.node_stats,
            local_node,
            Direction::Outbound,
        );
        debug!(%local_peer, %initiator, %target, %remote_addr, transport = transport.label(), "egress relaying");
        // rx: towards the local node; tx: from it (as on the inbound side).
        let pre = RelayStats {
            rx: 0,
            tx: prefix.len() as u64,
        };
        // Freed before relaying: an idle connection holds no setup buffer.
        drop((head, prefix, preamble));
        let (stats, outcome, _guard) = self.forward.relay(guard, remote, local, pre, false).await;
        if stats.rx == 0 {
            if let RelayEnd::Failed(_, e) = &outcome {
                if let Some(why) = crate::tunnel::tls::count_refusal_after_handshake(e) {
                    warn_throttled!(%initiator, %target, %remote_addr, reason = why, error = %e,
                        "egress: the remote sidecar ended the TLS session with an alert before its node answered: it refused this sidecar's certificate (tls.cert_file expired, not valid yet, of a CA it does not trust, or not for client use; its log says which); closing");
                    closed(reason::TLS_HANDSHAKE_FAILED);
                    return;
                }
            }
            // Not even the node's handshake status came back: the remote
            // sidecar most likely closed the tunnel before routing it, and
            // only its log says why.
            warn_throttled!(%initiator, %target, %remote_addr, transport = transport.label(),
                tx_bytes = stats.tx, %outcome,
                "tunnel connection ended before the remote node answered: the remote sidecar closes a connection for a node not registered there or one its policy refuses (tls.require_tls against a sidecar without [tls], an ACL rule, tls.bind_node_names; its log says which)");
            return;
        }
        info!(%initiator, %target, %remote_addr, transport = transport.label(),
        rx_bytes = stats.rx, tx_bytes = stats.tx,
        duration_ms = started.elapsed().as_millis() as u64, %outcome,
        "tunnel connection ended");
    }
}
