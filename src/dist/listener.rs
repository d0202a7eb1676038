//! The distribution port: accept, read the first handshake frame, choose the
//! target node, connect to it, replay the bytes read, and relay.
//!
//! Phases, each with its own deadline: `first_frame` (the initiator's
//! `send_name`), `connect_node`, `node_challenge` (the node's status and
//! challenge, read as they pass to check the node's name against the chosen
//! target), then opaque relaying.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::handshake::{self, HandshakeError, SendName};
use super::relay::{self, RelayEnd};
use crate::epmd::registry::NodeEntry;
use crate::metrics::{self as m, reason, route};
use crate::server::Shared;

/// Accepts distribution connections until shutdown.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = Arc::clone(&shared.dist_permits).try_acquire_owned() else {
                    warn!(%peer, limit = shared.config.dist.max_connections,
                        "distribution connection limit reached; closing");
                    closed(reason::OVER_LIMIT);
                    continue;
                };
                let shared2 = Arc::clone(&shared);
                shared.tracker.spawn(async move {
                    handle(stream, peer, &shared2).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(listener = ?local, error = %e, "distribution accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

use crate::metrics::{record_closed as closed, record_phase as phase};

/// Why the first frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FirstFrameError {
    #[error("timed out waiting for the first handshake frame")]
    Timeout,
    #[error("connection closed before a complete handshake frame ({0} bytes read)")]
    Closed(usize),
    #[error("not a distribution handshake: {0}")]
    Bad(#[from] HandshakeError),
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

impl FirstFrameError {
    /// The `reason` label when this ends a connection.
    pub fn reason(&self) -> &'static str {
        match self {
            FirstFrameError::Timeout => reason::TIMEOUT,
            FirstFrameError::Bad(_) => reason::BAD_FRAME,
            FirstFrameError::Closed(_) | FirstFrameError::Io(_) => reason::PEER_CLOSED,
        }
    }
}

/// Reads until the initiator's `send_name` frame is complete. Every byte
/// read stays in `buf`, to be replayed to the node.
pub async fn read_send_name<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    deadline: Duration,
) -> Result<SendName, FirstFrameError> {
    let read = async {
        loop {
            if let Some((msg, _len)) = handshake::parse_send_name(buf)? {
                return Ok(msg);
            }
            if buf.len() >= 2 + handshake::MAX_HANDSHAKE_FRAME {
                // parse_send_name rejects oversize lengths; this is a backstop.
                return Err(FirstFrameError::Closed(buf.len()));
            }
            buf.reserve(256);
            if stream.read_buf(buf).await? == 0 {
                return Err(FirstFrameError::Closed(buf.len()));
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .unwrap_or(Err(FirstFrameError::Timeout))
}

/// Waits for the connection's first byte without consuming it.
async fn peek_first_byte(stream: &TcpStream, deadline: Duration) -> Result<u8, FirstFrameError> {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(deadline, stream.peek(&mut byte)).await {
        Err(_) => Err(FirstFrameError::Timeout),
        Ok(Ok(0)) => Err(FirstFrameError::Closed(0)),
        Ok(Ok(_)) => Ok(byte[0]),
        Ok(Err(e)) => Err(FirstFrameError::Io(e)),
    }
}

/// Short name of a full node name (`a1@host` → `a1`), as registered in EPMD.
pub fn short_name(full: &str) -> &str {
    full.split_once('@').map_or(full, |(n, _)| n)
}

/// How the target node was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMethod {
    Correlated,
    SingleNode,
    /// Named by a sidecar's tunnel preamble (`crate::tunnel`).
    Preamble,
}

impl RouteMethod {
    pub fn label(self) -> &'static str {
        match self {
            RouteMethod::Correlated => route::CORRELATED,
            RouteMethod::SingleNode => route::SINGLE_NODE,
            RouteMethod::Preamble => route::PREAMBLE,
        }
    }
}

async fn handle(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let started = Instant::now();
    let peer_ip: IpAddr = peer.ip().to_canonical();
    let _ = stream.set_nodelay(true);

    // First-byte dispatch (DESIGN.md, "Sidecar ↔ sidecar tunnel"): the byte
    // is peeked, not read, so each path sees the connection from its start.
    let first = match peek_first_byte(&stream, shared.config.dist.handshake_timeout()).await {
        Ok(byte) => byte,
        Err(e) => {
            let why = match e {
                FirstFrameError::Timeout => reason::TIMEOUT,
                // Nothing sent at all: a reachability probe, not a failure.
                FirstFrameError::Closed(0) => reason::EMPTY,
                _ => reason::PEER_CLOSED,
            };
            debug!(%peer, error = %e, "closing distribution connection before its first byte");
            closed(why);
            return;
        }
    };
    if first == crate::tunnel::TLS_HANDSHAKE_BYTE {
        crate::tunnel::accept_tls(stream, peer, started, shared).await;
        return;
    }
    // `tls.require_tls`: from other hosts, only TLS. Loopback is exempt
    // (local nodes, `kubectl port-forward`).
    if shared.config.tls.require_tls && !peer_ip.is_loopback() {
        warn!(%peer, first_byte = first,
            "plaintext distribution connection from another host refused (tls.require_tls)");
        closed(reason::REFUSED_BY_POLICY);
        return;
    }
    if crate::tunnel::preamble::starts_preamble(first) {
        crate::tunnel::accept_preamble(
            stream,
            peer,
            crate::tunnel::Transport::Plain,
            started,
            shared,
        )
        .await;
        return;
    }
    // Otherwise a raw distribution handshake (first byte 0x00..=0x08, or
    // garbage that read_send_name refuses): routed by correlation. The entry
    // is taken now, before anything can fail: this connection is the one it
    // announced even if it dies before its first frame.
    let pool_port = stream
        .local_addr()
        .map(|a| shared.correlator.pool_port(a.port()))
        .unwrap_or_else(|_| shared.correlator.ports()[0]);
    let entry = shared.correlator.consume(peer_ip, pool_port);

    let mut buf = BytesMut::with_capacity(512);
    let send_name = match read_send_name(
        &mut stream,
        &mut buf,
        shared.config.dist.handshake_timeout(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let why = e.reason();
            warn!(%peer, error = %e, entry = ?entry.as_ref().map(|c| (c.id, &c.node)),
                "closing distribution connection before routing");
            closed(why);
            return;
        }
    };
    phase("first_frame", started);
    let initiator = send_name.name.clone();

    // Choose the target: the peer's oldest pending lookup, else the only node.
    let (target, method) = match entry.as_ref() {
        Some(c) => (c.node.clone(), RouteMethod::Correlated),
        None => match shared.registry.single() {
            Some(only) => (only.spec.name, RouteMethod::SingleNode),
            None => {
                warn!(%peer, %initiator, registered = shared.registry.len(),
                    "unroutable distribution connection: no pending lookup from this peer and not exactly one node registered");
                metrics::counter!(m::ROUTES, "method" => route::UNROUTABLE).increment(1);
                closed(reason::UNROUTABLE);
                return;
            }
        },
    };
    metrics::counter!(m::ROUTES, "method" => method.label()).increment(1);
    let Some(node) = shared.registry.get(&target) else {
        warn!(%peer, %initiator, %target, "target node is no longer registered; closing");
        closed(reason::NODE_GONE);
        return;
    };
    relay_to_node(
        stream,
        peer,
        &initiator,
        node,
        method,
        entry.as_ref(),
        buf,
        started,
        shared,
    )
    .await;
}

/// Connects to `node`, replays `prefix`, checks the node's name in its
/// challenge, and relays until either side closes. A challenge naming
/// another node is a misroute: both connections are closed (the initiator
/// would abort anyway), counted, and logged with the correlation `entry`
/// that chose the node, if any.
#[allow(clippy::too_many_arguments)]
pub async fn relay_to_node<P>(
    mut peer_stream: P,
    peer: SocketAddr,
    initiator: &str,
    node: NodeEntry,
    method: RouteMethod,
    entry: Option<&super::router::Consumed>,
    prefix: BytesMut,
    started: Instant,
    shared: &Shared,
) where
    P: AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let target = node.spec.name.clone();
    let node_addr = SocketAddr::new(node.addr, node.spec.port);
    let connect_start = Instant::now();
    let mut node_stream = match tokio::time::timeout(
        shared.config.dist.connect_timeout(),
        TcpStream::connect(node_addr),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(%peer, %initiator, %target, %node_addr, error = %e, "failed to connect to node");
            closed(reason::CONNECT_FAILED);
            return;
        }
        Err(_) => {
            warn!(%peer, %initiator, %target, %node_addr, "timed out connecting to node");
            closed(reason::TIMEOUT);
            return;
        }
    };
    phase("connect_node", connect_start);
    let _ = node_stream.set_nodelay(true);
    if let Err(e) = node_stream.write_all(&prefix).await {
        warn!(%peer, %initiator, %target, error = %e, "failed to replay handshake to node");
        closed(reason::NODE_GONE);
        return;
    }

    // Read the node's status and challenge as they pass, to verify the name.
    let challenge_start = Instant::now();
    let mut from_node = BytesMut::with_capacity(512);
    let answered = check_node_name(
        &mut node_stream,
        &mut from_node,
        &target,
        shared.config.dist.handshake_timeout(),
    )
    .await;
    phase("node_challenge", challenge_start);
    match &answered {
        NameCheck::Matches => {}
        NameCheck::Misrouted(actual) => {
            metrics::counter!(m::MISROUTES).increment(1);
            let (entry_id, entry_age_ms) =
                entry.map_or((0, 0), |c| (c.id, c.age.as_millis() as u64));
            warn!(%peer, %initiator, %target, node_answered = %actual, route = method.label(),
                entry_id, entry_age_ms, "MISROUTE: node answered with another name; closing");
            closed(reason::MISROUTED);
            return;
        }
        NameCheck::Unknown(why) => {
            debug!(%peer, %initiator, %target, why = %why, "node challenge not checked");
        }
    }
    if !from_node.is_empty() {
        // Flushed: on a TLS stream the records may otherwise stay buffered.
        let replied = async {
            peer_stream.write_all(&from_node).await?;
            peer_stream.flush().await
        };
        if let Err(e) = replied.await {
            debug!(%peer, error = %e, "peer gone before handshake reply");
            closed(reason::PEER_CLOSED);
            return;
        }
    }

    let labels = [
        ("node", target.clone()),
        ("direction", "inbound".to_string()),
    ];
    metrics::counter!(m::DIST_CONNECTIONS, &labels).increment(1);
    let open = metrics::gauge!(m::DIST_CONNECTIONS_OPEN, &labels);
    open.increment(1.0);
    let _counted = shared.open_connections.open(&target);
    let rx = metrics::counter!(m::RELAYED_BYTES, "node" => target.clone(), "direction" => "rx");
    let tx = metrics::counter!(m::RELAYED_BYTES, "node" => target.clone(), "direction" => "tx");
    rx.increment(prefix.len() as u64);
    tx.increment(from_node.len() as u64);
    debug!(%peer, %initiator, %target, method = method.label(), "relaying");
    let end = relay::relay(peer_stream, node_stream, rx, tx, &shared.hard_stop).await;
    open.decrement(1.0);
    let stats = end.stats();
    let outcome = match &end {
        RelayEnd::Closed(_) => "closed".to_string(),
        RelayEnd::Failed(_, e) => format!("error: {e}"),
        RelayEnd::Stopped(_) => "stopped at shutdown".to_string(),
    };
    info!(%peer, %initiator, %target, route = method.label(),
        rx_bytes = stats.rx + prefix.len() as u64, tx_bytes = stats.tx + from_node.len() as u64,
        duration_ms = started.elapsed().as_millis() as u64, %outcome, "distribution connection ended");
}

/// Result of watching the node's first handshake frames.
#[derive(Debug, PartialEq, Eq)]
pub enum NameCheck {
    Matches,
    Misrouted(String),
    Unknown(String),
}

/// Reads the node's `recv_status` and `recv_challenge` frames into `buf`
/// (everything read stays there, to be forwarded) and compares the name in
/// the challenge with `target`.
pub async fn check_node_name<S: AsyncRead + Unpin>(
    node: &mut S,
    buf: &mut BytesMut,
    target: &str,
    deadline: Duration,
) -> NameCheck {
    let read = async {
        // Status frame first.
        let status_len = loop {
            match handshake::parse_status(buf) {
                Ok(Some((status, len))) => {
                    if !matches!(
                        status,
                        handshake::Status::Ok
                            | handshake::Status::OkSimultaneous
                            | handshake::Status::Named { .. }
                    ) {
                        return NameCheck::Unknown(format!("node answered status {status:?}"));
                    }
                    break len;
                }
                Ok(None) => {}
                Err(e) => return NameCheck::Unknown(format!("unexpected status frame: {e}")),
            }
            buf.reserve(256);
            match node.read_buf(buf).await {
                Ok(0) => return NameCheck::Unknown("node closed during handshake".into()),
                Ok(_) => {}
                Err(e) => return NameCheck::Unknown(format!("read error: {e}")),
            }
        };
        loop {
            match handshake::parse_challenge(&buf[status_len..]) {
                Ok(Some((challenge, _))) => {
                    return if short_name(&challenge.name) == target {
                        NameCheck::Matches
                    } else {
                        NameCheck::Misrouted(challenge.name)
                    };
                }
                Ok(None) => {}
                Err(e) => return NameCheck::Unknown(format!("unexpected challenge frame: {e}")),
            }
            buf.reserve(256);
            match node.read_buf(buf).await {
                Ok(0) => return NameCheck::Unknown("node closed during handshake".into()),
                Ok(_) => {}
                Err(e) => return NameCheck::Unknown(format!("read error: {e}")),
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .unwrap_or_else(|_| NameCheck::Unknown("timed out waiting for the node's challenge".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names() {
        assert_eq!(short_name("a1@pod-a.example"), "a1");
        assert_eq!(short_name("plain"), "plain");
    }

    fn node_reply(name: &str) -> BytesMut {
        let mut out = BytesMut::new();
        handshake::encode_status(&mut out, &handshake::Status::Ok);
        handshake::encode_challenge(
            &mut out,
            &handshake::Challenge {
                name: name.to_string(),
                flags: 0x000d_07df_7fbd,
                challenge: 42,
                creation: Some(7),
            },
        );
        out
    }

    #[tokio::test]
    async fn name_check_detects_a_misroute_and_keeps_every_byte() {
        for (answered, want) in [
            ("a1@pod", NameCheck::Matches),
            ("a2@pod", NameCheck::Misrouted("a2@pod".into())),
        ] {
            let mut reply = node_reply(answered).to_vec();
            reply.extend_from_slice(b"trailing bytes after the challenge");
            let (mut node_side, mut ours) = tokio::io::duplex(4096);
            node_side.write_all(&reply).await.unwrap();
            let mut buf = BytesMut::new();
            let got = check_node_name(&mut ours, &mut buf, "a1", Duration::from_secs(1)).await;
            assert_eq!(got, want);
            // Everything read so far is kept for forwarding.
            assert!(reply.starts_with(&buf), "bytes lost");
            assert!(buf.len() >= node_reply(answered).len());
        }
    }

    #[tokio::test]
    async fn name_check_gives_up_on_a_refusing_or_silent_node() {
        let (mut node_side, mut ours) = tokio::io::duplex(4096);
        let mut out = BytesMut::new();
        handshake::encode_status(&mut out, &handshake::Status::NotAllowed);
        node_side.write_all(&out).await.unwrap();
        let mut buf = BytesMut::new();
        let got = check_node_name(&mut ours, &mut buf, "a1", Duration::from_secs(1)).await;
        assert!(matches!(got, NameCheck::Unknown(_)), "{got:?}");
        assert_eq!(&buf[..], &out[..]);

        let (_silent, mut ours) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let got = check_node_name(&mut ours, &mut buf, "a1", Duration::from_millis(50)).await;
        assert!(matches!(got, NameCheck::Unknown(_)), "{got:?}");
    }
}
