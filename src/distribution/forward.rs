//! The connection-setup layer under the distribution listener and the
//! tunnel: reading first frames within a deadline, the one setup error
//! type, connecting to a local node, and relaying with every open
//! connection counted by one [`ConnectionGuard`].
//!
//! Nothing here knows how a connection was routed; callers (the listener,
//! the tunnel's inbound and outbound paths) pass what they decided.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::net::ConnPermit;
use crate::warn_throttled;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::handshake::{self, SendName};
pub use super::node_stats::Direction;
use super::node_stats::{ByteCounters, NodeStats};
use super::relay::{self, RelayEnd, RelayStats};
use crate::epmd::registry::{NodeEntry, Registry};
use crate::metrics::{self as m, reason, record_closed as closed, record_phase as phase, route};
use crate::node_name::short_name;

/// The most bytes any setup phase buffers before giving up: a maximal
/// handshake frame plus room for a tunnel preamble (whose parser bounds it
/// to a few KiB). The parsers refuse oversize lengths long before; this is
/// a backstop.
const MAX_SETUP_BYTES: usize = 2 + handshake::MAX_HANDSHAKE_FRAME + 8 * 1024;

/// The setup phase a connection was in when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The initiator's `send_name` (and, before it, the first byte).
    FirstFrame,
    /// The tunnel preamble.
    Preamble,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::FirstFrame => "first handshake frame",
            Phase::Preamble => "tunnel preamble",
        })
    }
}

/// What went wrong in a setup phase.
#[derive(Debug)]
pub enum SetupErrorKind {
    Timeout,
    /// The peer closed after this many bytes.
    Closed(usize),
    /// The bytes are not what the phase expects.
    Bad(String),
    Io(std::io::Error),
}

/// A connection that could not be set up, by phase and kind.
#[derive(Debug, thiserror::Error)]
pub struct SetupError {
    pub phase: Phase,
    pub kind: SetupErrorKind,
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = self.phase;
        match &self.kind {
            SetupErrorKind::Timeout => write!(f, "timed out waiting for the {phase}"),
            SetupErrorKind::Closed(n) => {
                write!(f, "connection closed inside the {phase} ({n} bytes read)")
            }
            SetupErrorKind::Bad(e) => write!(f, "invalid {phase}: {e}"),
            SetupErrorKind::Io(e) => write!(f, "read failed in the {phase}: {e}"),
        }
    }
}

impl SetupError {
    /// The peer closed without sending a single byte.
    pub fn is_empty(&self) -> bool {
        matches!(self.kind, SetupErrorKind::Closed(0))
    }

    /// The `reason` label when this ends a connection (metrics and logs).
    pub fn reason(&self) -> &'static str {
        match self.kind {
            SetupErrorKind::Timeout => reason::TIMEOUT,
            SetupErrorKind::Bad(_) => reason::BAD_FRAME,
            // Inside TLS, a record that does not decrypt or parse (rustls
            // reports it as `InvalidData`): the peer sent garbage, it did
            // not go away.
            SetupErrorKind::Io(ref e) if e.kind() == std::io::ErrorKind::InvalidData => {
                reason::BAD_FRAME
            }
            SetupErrorKind::Closed(_) | SetupErrorKind::Io(_) => reason::PEER_CLOSED,
        }
    }
}

/// Reads into `buf` until `parse` returns a value, an error, or `deadline`
/// passes. `parse` sees everything read so far (it may split off what it
/// consumed); bytes it leaves stay in `buf`, to be replayed.
pub async fn read_until<S, T, E, P>(
    stream: &mut S,
    buf: &mut BytesMut,
    phase: Phase,
    deadline: tokio::time::Instant,
    mut parse: P,
) -> Result<T, SetupError>
where
    S: AsyncRead + Unpin,
    E: fmt::Display,
    P: FnMut(&mut BytesMut) -> Result<Option<T>, E>,
{
    let err = |kind| SetupError { phase, kind };
    let read = async {
        loop {
            match parse(buf) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => return Err(err(SetupErrorKind::Bad(e.to_string()))),
            }
            if buf.len() >= MAX_SETUP_BYTES {
                return Err(err(SetupErrorKind::Closed(buf.len())));
            }
            buf.reserve(512);
            match stream.read_buf(buf).await {
                Ok(0) => return Err(err(SetupErrorKind::Closed(buf.len()))),
                Ok(_) => {}
                Err(e) => return Err(err(SetupErrorKind::Io(e))),
            }
        }
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .unwrap_or_else(|_| Err(err(SetupErrorKind::Timeout)))
}

/// Reads until the initiator's `send_name` frame is complete, by
/// `deadline`. Every byte read stays in `buf`, to be replayed to the node.
pub async fn read_send_name<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
) -> Result<SendName, SetupError> {
    read_until(stream, buf, Phase::FirstFrame, deadline, |b| {
        handshake::parse_send_name(b).map(|o| o.map(|(msg, _)| msg))
    })
    .await
}

/// Waits for the connection's first byte without consuming it.
pub async fn peek_first_byte(
    stream: &TcpStream,
    deadline: tokio::time::Instant,
) -> Result<u8, SetupError> {
    let err = |kind| SetupError {
        phase: Phase::FirstFrame,
        kind,
    };
    let mut byte = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut byte)).await {
        Err(_) => Err(err(SetupErrorKind::Timeout)),
        Ok(Ok(0)) => Err(err(SetupErrorKind::Closed(0))),
        Ok(Ok(_)) => Ok(byte[0]),
        Ok(Err(e)) => Err(err(SetupErrorKind::Io(e))),
    }
}

/// How the target node was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMethod {
    Correlated,
    SingleNode,
    /// Named by a sidecar's tunnel preamble.
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

/// The target of a connection that names none (a raw handshake, a node's
/// own TLS): the node of the peer's pending lookup, else the only
/// registered node; `None` when neither exists (unroutable).
pub fn correlated_or_single(
    entry: Option<&super::router::Consumed>,
    registry: &Registry,
) -> Option<(String, RouteMethod)> {
    match entry {
        Some(c) => Some((c.node.clone(), RouteMethod::Correlated)),
        None => registry
            .single()
            .map(|only| (only.spec.name, RouteMethod::SingleNode)),
    }
}

/// One relayed connection, counted: holds the connection-limit permit and
/// the node's counts ([`NodeStats`]: `/nodes` and the node-labelled
/// metrics) until dropped.
pub struct ConnectionGuard {
    _permit: ConnPermit,
    stats: Arc<NodeStats>,
    node: String,
    direction: Direction,
    bytes: ByteCounters,
}

impl ConnectionGuard {
    /// Starts counting a connection relayed for local node `node`.
    pub fn open(
        permit: ConnPermit,
        stats: &Arc<NodeStats>,
        node: &str,
        direction: Direction,
    ) -> ConnectionGuard {
        // Set up: a newer connection can no longer take its place.
        let mut permit = permit;
        permit.claim();
        let bytes = stats.opened(node, direction);
        ConnectionGuard {
            _permit: permit,
            stats: Arc::clone(stats),
            node: node.to_string(),
            direction,
            bytes,
        }
    }

    /// The local node this connection is relayed for.
    pub fn node(&self) -> &str {
        &self.node
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.stats.closed(&self.node, self.direction);
    }
}

/// What relaying needs from the sidecar: deadlines, the `/nodes` counts and
/// the hard-stop signal. Cheap to clone.
#[derive(Clone)]
pub struct Forwarder {
    /// Deadline for connecting to a local node (`dist.connect_timeout_ms`).
    pub connect_timeout: Duration,
    /// Deadline for the node's status and challenge
    /// (`dist.handshake_timeout_ms`).
    pub handshake_timeout: Duration,
    /// Per-node counts: `/nodes` and the node-labelled metrics.
    pub node_stats: Arc<NodeStats>,
    /// Ends relays (grace period over).
    pub hard_stop: CancellationToken,
    /// Keepalive and `TCP_USER_TIMEOUT` for both legs (`[tcp]`).
    pub tcp: crate::net::TcpTuning,
    /// The kernel fast path, when on and available (`[relay]`).
    pub fast_path: Option<Arc<relay::FastPath>>,
    /// How long a relay's side may stay open after the other closed
    /// (`relay.half_close_timeout_ms`; `None`: as long as it takes).
    pub half_close_timeout: Option<Duration>,
}

impl Forwarder {
    /// Node routes of the fast path, when on (Linux only).
    pub fn node_routes(&self) -> Option<&relay::node_routes::NodeRoutes> {
        #[cfg(target_os = "linux")]
        return self.fast_path.as_deref().and_then(|f| f.node_routes());
        #[cfg(not(target_os = "linux"))]
        None
    }

    /// Connects to a local node at `addr` (deadline
    /// `dist.connect_timeout_ms`, phase `connect_node`) and sets the node
    /// leg's socket options. With `announce` and node routes on, the
    /// connection is announced to them for as long as the returned
    /// announcement is held. A failure is counted as closed; the caller
    /// logs it with its own fields.
    pub async fn connect_node(
        &self,
        addr: SocketAddr,
        announce: bool,
    ) -> Result<(TcpStream, Option<relay::Announced<'_>>), NodeConnectError> {
        let started = Instant::now();
        let mut announced = None;
        let fast = self.fast_path.as_deref().filter(|_| announce);
        let mut connected = self.connect_once(addr, fast, &mut announced).await;
        // A node registers over loopback, but one started with
        // `inet_dist_use_interface` set to the pod's address listens only
        // there (as stock epmd's peers would reach it): dial that instead.
        if let Err(NodeConnectError::Io(e)) = &connected {
            let elsewhere = (e.kind() == std::io::ErrorKind::ConnectionRefused
                && addr.ip().is_loopback())
            .then(|| crate::net::bound_listener_address(addr.port()))
            .flatten();
            if let Some(ip) = elsewhere {
                debug!(node = %addr, at = %ip, "node listens on a pod address only; connecting there");
                let at = SocketAddr::new(ip, addr.port());
                connected = self.connect_once(at, fast, &mut announced).await;
            }
        }
        let stream = connected.inspect_err(|e| closed(e.reason()))?;
        phase("connect_node", started);
        let _ = stream.set_nodelay(true);
        self.tcp.apply(&stream);
        Ok((stream, announced))
    }

    async fn connect_once<'f>(
        &self,
        addr: SocketAddr,
        fast: Option<&'f relay::FastPath>,
        announced: &mut Option<relay::Announced<'f>>,
    ) -> Result<TcpStream, NodeConnectError> {
        let connect = relay::connect_announced(addr, fast, announced);
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(NodeConnectError::Io(e)),
            Err(_) => Err(NodeConnectError::Timeout(self.connect_timeout)),
        }
    }

    /// Relays `a` (the remote side) and `b` (the local node's side) until
    /// either closes or the hard stop, counting the bytes in `pre` that were
    /// forwarded during setup; `rx` is towards the local node. Returns the
    /// totals, how it ended and the guard: the caller logs the end first
    /// and then lets the guard go, so whoever sees the open gauge fall can
    /// already read the connection's end in the log.
    /// `node_routes`: the relay starts where the node has just sent its
    /// challenge and `a` sends one frame (its reply) before it waits, so
    /// the fast path may route local nodes' messages past the sidecar's
    /// sockets (`relay::node_routes`).
    pub async fn relay<A, B>(
        &self,
        guard: ConnectionGuard,
        a: A,
        b: B,
        pre: RelayStats,
        node_routes: bool,
    ) -> (RelayStats, RelayEnd, ConnectionGuard)
    where
        A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rx, tx) = (guard.bytes.rx.clone(), guard.bytes.tx.clone());
        rx.increment(pre.rx);
        tx.increment(pre.tx);
        let options = relay::RelayOptions {
            fast: self.fast_path.as_deref(),
            node_routes,
            half_close_timeout: self.half_close_timeout,
        };
        let end = relay::relay(a, b, rx, tx, &self.hard_stop, options).await;
        let stats = end.stats();
        (
            RelayStats {
                rx: stats.rx + pre.rx,
                tx: stats.tx + pre.tx,
            },
            end,
            guard,
        )
    }
}

/// Why a local node could not be connected to.
#[derive(Debug, thiserror::Error)]
pub enum NodeConnectError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(std::io::Error),
}

impl NodeConnectError {
    /// The `reason` label of the closed connection: `connect_failed` either
    /// way; a node that does not accept in time (hung, its accept queue
    /// full) is the node's failure, not the peer's `timeout`.
    pub fn reason(&self) -> &'static str {
        reason::CONNECT_FAILED
    }
}

/// A routed connection on its way to a local node.
pub struct ToNode {
    pub peer: SocketAddr,
    /// The initiator's full node name, from its `send_name`.
    pub initiator: String,
    pub node: NodeEntry,
    pub method: RouteMethod,
    /// The correlation entry that chose the node, if any (logged on a
    /// misroute).
    pub entry: Option<super::router::Consumed>,
    /// Bytes read from the peer so far, replayed to the node.
    pub prefix: BytesMut,
    /// When the connection was accepted.
    pub started: Instant,
    pub permit: ConnPermit,
}

/// Connects to the routed node, replays the prefix, checks the node's name
/// in its challenge, and relays until either side closes. A challenge
/// naming another node is a misroute: both connections are closed (the
/// initiator would abort anyway), counted, and logged with the correlation
/// entry that chose the node.
pub async fn relay_to_node<P>(mut peer_stream: P, to: ToNode, fwd: &Forwarder)
where
    P: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ToNode {
        peer,
        initiator,
        node,
        method,
        entry,
        prefix,
        started,
        permit,
    } = to;
    let target = node.spec.name.clone();
    let who = Who {
        peer,
        initiator: &initiator,
        target: &target,
        method,
    };
    // The setup's state (connect, deadlines, the node's frames) is boxed:
    // it is freed once the relay starts instead of sizing the connection's
    // task, which lives as long as the connection (benches/hold.rs).
    let setup = Box::pin(connect_and_verify(
        &mut peer_stream,
        &who,
        &node,
        entry,
        &prefix,
        fwd,
    ));
    let Some((node_stream, pre, announced)) = setup.await else {
        return;
    };
    // A local initiator sends one frame (its challenge reply) before it
    // waits, as OTP 23+ do with the new `send_name` ('N'); an older
    // initiator may also send a `complement` frame.
    let node_routes = prefix.get(2) == Some(&b'N');
    // What setup needed is freed before relaying: an idle relayed
    // connection holds only its sockets and counts.
    drop((prefix, node));
    let guard = ConnectionGuard::open(permit, &fwd.node_stats, &target, Direction::Inbound);
    debug!(%peer, %initiator, %target, method = method.label(), "relaying");
    let (stats, outcome, _guard) = fwd
        .relay(guard, peer_stream, node_stream, pre, node_routes)
        .await;
    drop(announced);
    info!(%peer, %initiator, %target, route = method.label(),
        rx_bytes = stats.rx, tx_bytes = stats.tx,
        duration_ms = started.elapsed().as_millis() as u64, %outcome, "distribution connection ended");
}

/// Who a connection being set up is, for logs.
struct Who<'a> {
    peer: SocketAddr,
    initiator: &'a str,
    target: &'a str,
    method: RouteMethod,
}

/// Connects to `node`, replays `prefix`, checks the node's name in its
/// challenge and passes its frames on to the peer. Returns the node's
/// stream and the bytes forwarded each way (and the connection's
/// announcement to node routes), or None when the connection was closed
/// (logged and counted here).
async fn connect_and_verify<'f, P>(
    peer_stream: &mut P,
    who: &Who<'_>,
    node: &NodeEntry,
    entry: Option<super::router::Consumed>,
    prefix: &[u8],
    fwd: &'f Forwarder,
) -> Option<(TcpStream, RelayStats, Option<relay::Announced<'f>>)>
where
    P: AsyncWrite + Unpin,
{
    let Who {
        peer,
        initiator,
        target,
        method,
    } = *who;
    let node_addr = SocketAddr::new(node.addr, node.spec.port);
    let (mut node_stream, announced) = match fwd.connect_node(node_addr, true).await {
        Ok(connected) => connected,
        Err(e) => {
            warn_throttled!(%peer, %initiator, %target, %node_addr, error = %e, "failed to connect to node");
            return None;
        }
    };
    let replay = tokio::time::timeout(fwd.handshake_timeout, node_stream.write_all(prefix));
    if let Err(e) = replay
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    {
        warn_throttled!(%peer, %initiator, %target, error = %e, "failed to replay handshake to node");
        closed(reason::NODE_GONE);
        return None;
    }

    // Read the node's status and challenge as they pass, to verify the name.
    let challenge_start = Instant::now();
    let mut from_node = BytesMut::with_capacity(512);
    let answered = check_node_name(
        &mut node_stream,
        &mut from_node,
        target,
        fwd.handshake_timeout,
    )
    .await;
    phase("node_challenge", challenge_start);
    match &answered {
        NameCheck::Matches => {}
        NameCheck::Misrouted(actual) => {
            metrics::counter!(m::MISROUTES).increment(1);
            let (entry_id, entry_age_ms) = entry
                .as_ref()
                .map_or((0, 0), |c| (c.id, c.age.as_millis() as u64));
            warn_throttled!(%peer, %initiator, %target, node_answered = %actual, route = method.label(),
                entry_id, entry_age_ms, "MISROUTE: node answered with another name; closing");
            closed(reason::MISROUTED);
            return None;
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
        let replied = tokio::time::timeout(fwd.handshake_timeout, replied);
        if let Err(e) = replied
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        {
            debug!(%peer, error = %e, "peer gone before handshake reply");
            closed(reason::PEER_CLOSED);
            return None;
        }
    }
    let pre = RelayStats {
        rx: prefix.len() as u64,
        tx: from_node.len() as u64,
    };
    Some((node_stream, pre, announced))
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
    timeout: Duration,
) -> NameCheck {
    let deadline = tokio::time::Instant::now() + timeout;
    let unknown = |e: SetupError| match e.kind {
        SetupErrorKind::Timeout => "timed out waiting for the node's challenge".to_string(),
        SetupErrorKind::Closed(_) => "node closed during handshake".to_string(),
        SetupErrorKind::Bad(why) => why,
        SetupErrorKind::Io(e) => format!("read error: {e}"),
    };
    let status = read_until(node, buf, Phase::FirstFrame, deadline, |b| {
        handshake::parse_status(b).map_err(|e| format!("unexpected status frame: {e}"))
    })
    .await;
    let status_len = match status {
        Ok((
            handshake::Status::Ok
            | handshake::Status::OkSimultaneous
            | handshake::Status::Named { .. },
            len,
        )) => len,
        Ok((status, _)) => return NameCheck::Unknown(format!("node answered status {status:?}")),
        Err(e) => return NameCheck::Unknown(unknown(e)),
    };
    let challenge = read_until(node, buf, Phase::FirstFrame, deadline, |b| {
        handshake::parse_challenge(&b[status_len..])
            .map_err(|e| format!("unexpected challenge frame: {e}"))
    })
    .await;
    match challenge {
        Ok((challenge, _)) if short_name(&challenge.name) == target => NameCheck::Matches,
        Ok((challenge, _)) => NameCheck::Misrouted(challenge.name),
        Err(e) => NameCheck::Unknown(unknown(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn read_until_keeps_one_deadline_and_maps_errors_to_reasons() {
        let (_silent, mut ours) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(30);
        let e = read_send_name(&mut ours, &mut buf, deadline)
            .await
            .unwrap_err();
        assert_eq!(e.reason(), reason::TIMEOUT);
        let (mut peer, mut ours) = tokio::io::duplex(64);
        peer.write_all(b"\x00\x03xyz").await.unwrap();
        let e = read_send_name(&mut ours, &mut buf, deadline + Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), reason::BAD_FRAME, "{e}");
    }
}
