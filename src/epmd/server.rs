//! The EPMD server: one task per connection, speaking the protocol as OTP's
//! `epmd` does (`erts/epmd/src/epmd_srv.c`), with the proxy's twists:
//! remote lookups are answered with the advertised distribution port and
//! recorded for correlation, and remote NAMES lists nodes at that port.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::warn_throttled;
use bytes::BytesMut;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::codec::{CodecError, RequestCodec};
use super::proto::{self, NodeSpec, ProtoError, Request};
use super::registry::{RegisterError, Registry};
use crate::config::LoopbackLookups;
use crate::distribution::router::{Correlator, LookupOutcome};
use crate::metrics as m;
use crate::net::{accept_loop, write_all_within, ConnectionLimit, Stop, DEFAULT_EPMD_PORT};

/// What the EPMD side needs from the tunnel: a loopback egress port per
/// remote node (`distproxy_epmd:address_please/3`).
pub trait EgressPorts: Send + Sync {
    /// The egress port for `remote` (`Name@Host`), opening it if needed.
    fn egress_port<'a>(&'a self, remote: &'a str) -> BoxFuture<'a, Result<u16, EgressRefused>>;
}

/// What the EPMD side needs from discovery (`src/discovery/`): the answers
/// to its two requests, written as reply bytes into `out`; each returns the
/// `result` label of the request counter.
pub trait DiscoveryAnswers: Send + Sync {
    /// Pod info (`'I'`, from other pods' sidecars): this pod's host part and
    /// nodes.
    fn pod_info(&self, out: &mut BytesMut) -> &'static str;
    /// Members (`'M'`, from local nodes): every node of every pod, once the
    /// list's version differs from `known_version` or after `wait_ms`.
    fn members<'a>(
        &'a self,
        known_version: u32,
        wait_ms: u32,
        shutdown: &'a CancellationToken,
        out: &'a mut BytesMut,
    ) -> BoxFuture<'a, &'static str>;
}

/// An egress request answered without a port.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct EgressRefused {
    /// The reply's result code (`proto::EGRESS_*`).
    pub code: u8,
    /// The `result` label of the request counter.
    pub label: &'static str,
    pub message: String,
}

/// What the EPMD server needs.
pub struct EpmdCtx {
    pub registry: Arc<Registry>,
    pub correlator: Arc<Correlator>,
    /// Port announced to remote lookups.
    pub advertise_port: u16,
    /// `epmd.idle_timeout_ms`.
    pub idle_timeout: Duration,
    /// `epmd.relaxed_command_check`.
    pub relaxed_command_check: bool,
    /// `epmd.probe_interval_ms` (adopted registrations, see `state`).
    pub probe_interval: Duration,
    /// `routing.loopback_lookups`.
    pub loopback_lookups: LoopbackLookups,
    pub egress: Arc<dyn EgressPorts>,
    /// `limits.epmd_max_connections` and its per-source cap, with room
    /// reserved for local peers (registrations and local lookups).
    pub limit: ConnectionLimit,
    /// `limits.write_timeout_ms`: deadline for writing a reply.
    pub write_timeout: Duration,
    /// Same-pod mirror listeners (`crate::distribution::mirror`).
    pub mirrors: Arc<crate::distribution::mirror::Mirrors>,
    pub discovery: Arc<dyn DiscoveryAnswers>,
    /// Stops accepting; KILL_REQ cancels it.
    pub shutdown: CancellationToken,
    /// Ends every EPMD connection (grace period over).
    pub hard_stop: CancellationToken,
    pub tracker: TaskTracker,
}

/// Accepts EPMD connections until shutdown. Accept errors are logged and
/// the loop goes on; a connection's error ends only that connection.
pub async fn serve(listener: TcpListener, ctx: Arc<EpmdCtx>) {
    let stop = Stop {
        accepting: ctx.shutdown.clone(),
        connections: ctx.hard_stop.clone(),
    };
    let (tracker, limit) = (ctx.tracker.clone(), ctx.limit.clone());
    accept_loop(
        "epmd",
        listener,
        stop,
        tracker,
        limit,
        move |stream, peer, permit| {
            let ctx = Arc::clone(&ctx);
            async move { handle_connection(stream, peer, ctx, permit).await }
        },
    )
    .await
}

fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn request_type(req: &Request) -> &'static str {
    match req {
        Request::Alive2(_) => "alive2",
        Request::PortPlease2 { .. } => "port_please2",
        Request::Names => "names",
        Request::Dump => "dump",
        Request::Kill => "kill",
        Request::Stop { .. } => "stop",
        Request::Egress { .. } => "egress",
        Request::PodInfo => "pod_info",
        Request::Members { .. } => "members",
    }
}

fn count(req_type: &'static str, result: &'static str) {
    metrics::counter!(m::EPMD_REQUESTS, "type" => req_type, "result" => result).increment(1);
}

async fn handle_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<EpmdCtx>,
    mut permit: crate::net::ConnPermit,
) {
    let peer_ip = canonical(peer.ip());
    let local = stream.local_addr().ok();
    // `epmd` treats 127.0.0.0/8 and the server's own address as local.
    let local_peer = crate::net::is_local_peer(peer_ip, local);
    let idle = shared.idle_timeout;

    let mut framed = FramedRead::new(stream, RequestCodec);
    let next = tokio::time::timeout(idle, framed.next()).await;
    // `epmd` closes a connection that sent more than one request's bytes
    // before it read the request ("got N bytes in packet, expected M"),
    // without a reply; bytes that arrive after it are never read.
    let leftover = !framed.read_buffer().is_empty();
    let request = match next {
        Err(_) => {
            // A peer silent (or too slow) until the deadline holds a
            // connection slot: a warning, rate-limited.
            warn_throttled!(%peer, "epmd request timed out; closing");
            count("unknown", "timeout");
            return;
        }
        Ok(None) => return, // closed without a request
        Ok(Some(Err(CodecError::Proto(ProtoError::RefusedAlive2 { extended, reason }))))
            if local_peer && !leftover =>
        {
            // Well-formed, but a name or extra `epmd` refuses to register:
            // result 1, like a duplicate name.
            warn_throttled!(%peer, error = %reason, "ALIVE2_REQ refused");
            count("alive2", "bad_request");
            refuse_alive2(framed.into_inner(), peer, extended, &shared).await;
            return;
        }
        Ok(Some(Err(e))) => {
            log_bad_request(peer, &e);
            count("unknown", "bad_request");
            return;
        }
        Ok(Some(Ok(req))) => req,
    };
    // A whole request: its connection can no longer be closed to make room
    // for a newer one (a registration, an answer being written). A lookup
    // is claimed when its hold is over: lookups held from a few addresses
    // would otherwise fill the limit with places no newcomer may take.
    if !matches!(request, Request::PortPlease2 { .. }) {
        permit.claim();
    }
    let stream = framed.into_inner();
    let req_type = request_type(&request);
    if leftover {
        warn_throttled!(%peer, request = req_type, "bytes after the epmd request; closing without a reply");
        count(req_type, "bad_request");
        return;
    }

    if matches!(
        request,
        Request::Alive2(_)
            | Request::Dump
            | Request::Kill
            | Request::Stop { .. }
            | Request::Egress { .. }
            | Request::Members { .. }
    ) && !local_peer
    {
        warn_throttled!(%peer, request = req_type, "epmd request only allowed from local peers; closing");
        count(req_type, "refused_non_local");
        return;
    }

    match request {
        Request::Alive2(spec) => {
            serve_alive2(stream, peer, peer_ip, spec, &shared).await;
        }
        Request::PortPlease2 { name } => {
            let local_ip = local.map(|a| canonical(a.ip()));
            serve_port_please(stream, peer, peer_ip, local_ip, &name, &shared, permit).await;
        }
        request => {
            let epmd_port = local.map_or(DEFAULT_EPMD_PORT, |a| a.port());
            let response = respond(request, peer, peer_ip, epmd_port, &shared).await;
            send(stream, peer, req_type, response, &shared).await;
        }
    }
}

/// The answer to a one-shot request (everything but ALIVE2, which holds
/// its connection, and PORT_PLEASE2, which may be held): the reply bytes,
/// the `result` label, and what follows.
struct Response {
    /// `None`: close without a reply (as `epmd` does for a refused STOP).
    reply: Option<BytesMut>,
    result: &'static str,
    /// KILL_REQ accepted: stop serving once the reply is out.
    then_shutdown: bool,
}

impl Response {
    fn reply(reply: BytesMut, result: &'static str) -> Response {
        Response {
            reply: Some(reply),
            result,
            then_shutdown: false,
        }
    }
}

/// Answers a one-shot request; no I/O on the requester's connection.
async fn respond(
    request: Request,
    peer: SocketAddr,
    peer_ip: IpAddr,
    epmd_port: u16,
    shared: &EpmdCtx,
) -> Response {
    let mut out = BytesMut::new();
    match request {
        Request::Names => {
            proto::encode_names_header(&mut out, u32::from(epmd_port));
            let remote = advertise_to(shared, peer_ip);
            for node in shared.registry.list() {
                let port = if remote {
                    shared.correlator.ports()[0]
                } else {
                    node.spec.port
                };
                proto::encode_names_line(&mut out, &node.spec.name, port);
            }
            Response::reply(out, "ok")
        }
        Request::Dump => {
            proto::encode_names_header(&mut out, u32::from(epmd_port));
            for node in shared.registry.list() {
                proto::encode_dump_line(&mut out, &node.spec.name, node.spec.port, -1);
            }
            for (name, port) in shared.registry.unregistered() {
                proto::encode_dump_unused_line(&mut out, &name, port, -1);
            }
            Response::reply(out, "ok")
        }
        Request::Kill => {
            if !shared.registry.is_empty() && !shared.relaxed_command_check {
                out.extend_from_slice(b"NO");
                return Response::reply(out, "refused");
            }
            info!(%peer, "KILL_REQ accepted; shutting down");
            out.extend_from_slice(b"OK");
            Response {
                reply: Some(out),
                result: "ok",
                then_shutdown: true,
            }
        }
        Request::Egress { node } => {
            // distproxy's own request, from `distproxy_epmd:address_please/3`.
            match shared.egress.egress_port(&node).await {
                Ok(port) => {
                    debug!(%peer, remote = %node, port, "egress port handed out");
                    proto::encode_egress_resp(&mut out, 0, port);
                    Response::reply(out, "ok")
                }
                Err(e) => {
                    warn_throttled!(%peer, remote = %node, error = %e, "egress request refused");
                    proto::encode_egress_resp(&mut out, e.code, 0);
                    Response::reply(out, e.label)
                }
            }
        }
        // Discovery (src/discovery/): pod info is for other pods' sidecars,
        // members for local nodes.
        Request::PodInfo => {
            let result = shared.discovery.pod_info(&mut out);
            Response::reply(out, result)
        }
        Request::Members {
            known_version,
            wait_ms,
        } => {
            let result = shared
                .discovery
                .members(known_version, wait_ms, &shared.shutdown, &mut out)
                .await;
            Response::reply(out, result)
        }
        Request::Stop { name } => {
            let name = String::from_utf8_lossy(&name);
            if !shared.relaxed_command_check {
                warn_throttled!(%peer, node = %name, "STOP_REQ refused: relaxed_command_check is off");
                return Response {
                    reply: None,
                    result: "refused",
                    then_shutdown: false,
                };
            }
            // Only a valid name can be registered, so a lossy one (with
            // U+FFFD for invalid bytes) must not be looked up.
            if matches!(name, std::borrow::Cow::Borrowed(_)) && shared.registry.stop(&name) {
                info!(%peer, node = %name, "node stopped by STOP_REQ");
                out.extend_from_slice(b"STOPPED");
                Response::reply(out, "ok")
            } else {
                // `epmd_srv.c` falls through after NOEXIST and sends
                // STOPPED as well; its client reads the first 7 bytes.
                out.extend_from_slice(b"NOEXISTSTOPPED");
                Response::reply(out, "not_found")
            }
        }
        // Served on their own (they hold the connection); never sent here.
        Request::Alive2(_) | Request::PortPlease2 { .. } => Response {
            reply: None,
            result: "bad_request",
            then_shutdown: false,
        },
    }
}

/// Counts `response`, writes its reply within the write deadline and closes
/// (the OTP client reads until the socket closes).
async fn send(
    mut stream: TcpStream,
    peer: SocketAddr,
    req_type: &'static str,
    response: Response,
    shared: &EpmdCtx,
) {
    count(req_type, response.result);
    if let Some(reply) = &response.reply {
        let _ = write_reply(&mut stream, peer, reply, shared.write_timeout).await;
    }
    if response.then_shutdown {
        shared.shutdown.cancel();
    }
}

/// Writes `out` within `timeout`; false (logged, a timeout counted) when the
/// peer did not take it.
async fn write_reply(
    stream: &mut TcpStream,
    peer: SocketAddr,
    out: &[u8],
    timeout: Duration,
) -> bool {
    match write_all_within(stream, out, timeout, "epmd reply").await {
        Ok(()) => true,
        Err(e @ crate::net::WriteError::Timeout { .. }) => {
            metrics::counter!(m::WRITE_TIMEOUTS, "listener" => "epmd").increment(1);
            debug!(%peer, error = %e, "closing epmd connection");
            false
        }
        Err(e) => {
            debug!(%peer, error = %e, "epmd reply not delivered");
            false
        }
    }
}

fn log_bad_request(peer: SocketAddr, e: &CodecError) {
    match e {
        CodecError::Io(err) => debug!(%peer, error = %err, "epmd connection error"),
        other => warn_throttled!(%peer, error = %other, "malformed epmd request; closing"),
    }
}

/// Whether `peer` is answered with the advertised port (remote peers, and
/// loopback peers in `proxy` mode).
fn advertise_to(shared: &EpmdCtx, peer: IpAddr) -> bool {
    !peer.is_loopback() || shared.loopback_lookups == LoopbackLookups::Proxy
}

/// Answers a PORT_PLEASE2_REQ on `stream` and closes it.
///
/// A remote lookup is recorded for correlation, and the entry must not
/// outlive its requester: while the lookup is held the socket is watched (a
/// requester that closes records nothing), it is checked again right before
/// the answer, and the entry is cancelled when the requester is gone by then
/// or the answer cannot be written. A requester that closed its side is
/// still answered (it may only have half-closed, and read on).
///
/// While held, the lookup's place under `limits.epmd_max_connections` may
/// be taken by a newer connection (the task is then dropped, which records
/// nothing); it is claimed once the hold is over, before the answer.
async fn serve_port_please(
    mut stream: TcpStream,
    peer: SocketAddr,
    peer_ip: IpAddr,
    local_ip: Option<IpAddr>,
    name: &str,
    shared: &Arc<EpmdCtx>,
    mut permit: crate::net::ConnPermit,
) {
    const REQ: &str = "port_please2";
    let mut out = BytesMut::new();
    let Some(node) = shared.registry.get(name) else {
        proto::encode_port2_err(&mut out, 1);
        count(REQ, "not_found");
        answer(shared, stream, peer, &out).await;
        return;
    };
    if !advertise_to(shared, peer_ip) {
        proto::encode_port2_ok(&mut out, &node.spec, node.spec.port);
        count(REQ, "direct");
        answer(shared, stream, peer, &out).await;
        return;
    }
    // A node of this pod asking through the pod address: no routing needed.
    // Not when NAT inside the pod redirected the lookup (conntrack knows
    // another original destination): the node will dial that address, where
    // the node's own port need not be forwarded. (A Service's hairpin is
    // masqueraded by kube-proxy, so it arrives from another address.)
    if Some(peer_ip) == local_ip && !crate::net::redirected(&stream) {
        if let Some(port) = shared.mirrors.same_pod_port(&node, peer_ip) {
            proto::encode_port2_ok(&mut out, &node.spec, port);
            count(REQ, "same_pod");
            answer(shared, stream, peer, &out).await;
            return;
        }
    }
    // A requester that closed its side may only have half-closed (`nc`,
    // `socat` and scripts send their request, then EOF, then read): it is
    // still answered, as by `epmd`, but nothing is recorded for it, since
    // no node setup half-closes.
    let outcome = tokio::select! {
        // A lookup answered at once wins over an EOF already there.
        biased;
        o = shared.correlator.record_lookup(peer_ip, name) => o,
        () = requester_closed(&stream) => {
            // Dropping record_lookup's future recorded nothing.
            metrics::counter!(m::LOOKUPS_DROPPED, "reason" => "requester_closed").increment(1);
            debug!(%peer, node = name, "requester closed while its lookup was held; dropped");
            count(REQ, "requester_closed");
            let port = shared.correlator.ports()[0];
            proto::encode_port2_ok(&mut out, &node.spec, port);
            answer(shared, stream, peer, &out).await;
            return;
        }
    };
    if !permit.claim() {
        // Its place was taken as the hold ended: the task is being ended.
        if let LookupOutcome::Recorded { reservation, .. } = outcome {
            shared.correlator.cancel(peer_ip, reservation);
        }
        return;
    }
    match outcome {
        LookupOutcome::Recorded { reservation, held } => {
            if let Some(held) = held {
                metrics::counter!(m::LOOKUPS_HELD).increment(1);
                metrics::histogram!(m::LOOKUP_HOLD_SECONDS).record(held.as_secs_f64());
                debug!(%peer, node = name, held_ms = held.as_millis() as u64, "lookup held by serialisation");
            }
            // The node may have re-registered while we waited.
            let spec = shared
                .registry
                .get(name)
                .map(|n| n.spec)
                .unwrap_or(node.spec);
            proto::encode_port2_ok(&mut out, &spec, reservation.port);
            if requester_gone_now(&stream) {
                shared.correlator.cancel(peer_ip, reservation);
                metrics::counter!(m::LOOKUPS_DROPPED, "reason" => "requester_closed").increment(1);
                debug!(%peer, node = name, "requester closed as its lookup was answered; entry cancelled");
                count(REQ, "requester_closed");
                answer(shared, stream, peer, &out).await;
                return;
            }
            if !write_reply(&mut stream, peer, &out, shared.write_timeout).await {
                shared.correlator.cancel(peer_ip, reservation);
                metrics::counter!(m::LOOKUPS_DROPPED, "reason" => "write_failed").increment(1);
                debug!(%peer, node = name, "failed to answer a lookup; entry cancelled");
                count(REQ, "write_failed");
                return;
            }
            count(REQ, "proxied");
            let _ = stream.shutdown().await;
        }
        LookupOutcome::GaveUp { held } => {
            metrics::counter!(m::LOOKUPS_HELD).increment(1);
            metrics::histogram!(m::LOOKUP_HOLD_SECONDS).record(held.as_secs_f64());
            warn_throttled!(%peer, node = name, held_ms = held.as_millis() as u64,
                "lookup held too long behind lookups for another node; answering not found");
            proto::encode_port2_err(&mut out, 1);
            count(REQ, "held_too_long");
            answer(shared, stream, peer, &out).await;
        }
    }
}

/// Writes a reply within `shared.write_timeout` and closes (the OTP client
/// reads until the socket closes).
async fn answer(shared: &EpmdCtx, mut stream: TcpStream, peer: SocketAddr, out: &[u8]) {
    write_reply(&mut stream, peer, out, shared.write_timeout).await;
    let _ = stream.shutdown().await;
}

/// Resolves when the client closes its side (EOF or an error). A client that
/// sends more bytes is not closing: then this never resolves.
async fn requester_closed(stream: &TcpStream) {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Whether the client has closed, asked of the kernel right now (no wait).
fn requester_gone_now(stream: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    // The socket is non-blocking (tokio), so this never waits.
    match socket2::SockRef::from(stream).peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

async fn serve_alive2(
    mut stream: TcpStream,
    peer: SocketAddr,
    peer_ip: IpAddr,
    spec: NodeSpec,
    shared: &EpmdCtx,
) {
    let extended = spec.highest_version >= 6;
    let name = spec.name.clone();
    let mut out = BytesMut::with_capacity(8);
    let registration = match shared.registry.register(spec, peer_ip) {
        Ok(r) => r,
        Err(RegisterError::Duplicate(_)) => {
            warn_throttled!(%peer, node = %name, "ALIVE2_REQ for a name already registered; refused");
            count("alive2", "duplicate");
            refuse_alive2(stream, peer, extended, shared).await;
            return;
        }
        Err(RegisterError::Full(max)) => {
            warn_throttled!(%peer, node = %name, max, "ALIVE2_REQ refused: registry full (limits.max_registered_nodes)");
            count("alive2", "registry_full");
            refuse_alive2(stream, peer, extended, shared).await;
            return;
        }
    };
    let entry = registration.entry().clone();
    proto::encode_alive2_resp(&mut out, 0, entry.reply_creation(), extended);
    let sent = tokio::time::timeout(shared.write_timeout, stream.write_all(&out)).await;
    if let Err(e) = sent.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())) {
        // `registration` drops here: the node is unregistered at once.
        warn_throttled!(%peer, node = %name, error = %e, "failed to send ALIVE2 reply; unregistered");
        count("alive2", "write_failed");
        return;
    }
    count("alive2", "ok");
    info!(node = %name, port = entry.spec.port, creation = entry.creation,
        version = entry.spec.highest_version, addr = %peer_ip, "node registered");

    // The registration lives as long as this connection. Any byte, EOF or
    // error ends it (as in epmd); so do STOP_REQ and shutdown.
    let mut probe = [0u8; 64];
    let why = tokio::select! {
        r = stream.read(&mut probe) => match r {
            Ok(0) => "connection closed".to_string(),
            Ok(n) => format!("unexpected {n} bytes on registration connection"),
            Err(e) => format!("connection error: {e}"),
        },
        _ = registration.stopped() => "STOP_REQ".to_string(),
        _ = shared.shutdown.cancelled() => "shutdown".to_string(),
    };
    drop(registration);
    info!(node = %name, reason = %why, "node unregistered");
}

/// Answers a refused ALIVE2_REQ (result 1, creation 99, as `epmd`), then
/// keeps the connection as `epmd` keeps every ALIVE2 connection: until the
/// peer closes it or sends anything, or the server shuts down. The
/// connection limits bound how many can be held.
async fn refuse_alive2(mut stream: TcpStream, peer: SocketAddr, extended: bool, shared: &EpmdCtx) {
    let mut out = BytesMut::with_capacity(8);
    proto::encode_alive2_resp(&mut out, 1, 99, extended);
    // Not `write_reply`: that half-closes, and the connection stays open.
    let sent = tokio::time::timeout(shared.write_timeout, stream.write_all(&out)).await;
    if let Err(e) = sent.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())) {
        debug!(%peer, error = %e, "refused ALIVE2 reply not delivered");
        return;
    }
    let mut probe = [0u8; 64];
    tokio::select! {
        _ = stream.read(&mut probe) => {}
        _ = shared.shutdown.cancelled() => {}
    }
}
