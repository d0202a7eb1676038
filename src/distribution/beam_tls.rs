//! Nodes' own TLS distribution (`-proto_dist inet_tls`) on the distribution
//! port: told apart from a sidecar's tunnel by the ClientHello, routed by
//! lookup correlation like a plain connection, and relayed without
//! decrypting it (`dist.beam_tls`; user guide `docs/tunnel-tls.md`).
//!
//! A sidecar's tunnel client offers the ALPN protocol [`TUNNEL_ALPN`]; OTP's
//! `inet_tls_dist` offers none and sends the node's host as SNI (a sidecar
//! never sends SNI). The ClientHello is peeked, not read, so whichever side
//! takes the connection sees it from its first byte: the tunnel's TLS
//! server, or the node, which then runs its TLS handshake with the remote
//! node through the relay. The sidecar never sees the initiator's name, so
//! there is no challenge check (OTP's initiator itself refuses a challenge
//! from another node) and the ACL judges an unknown initiator.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::warn_throttled;
use futures_util::FutureExt;
use rustls::server::Acceptor;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::forward::{
    self, ConnectionGuard, Direction, Forwarder, Phase, SetupError, SetupErrorKind,
};
use super::relay::RelayStats;
use super::router::Consumed;
use crate::acl::{AclHandle, AclPath};
use crate::config::BeamTls;
use crate::epmd::registry::Registry;
use crate::metrics::{
    self as m, beam_tls_outcome as outcome, reason, record_closed as closed, route,
};
use crate::net::ConnPermit;
use crate::tunnel::tls::TUNNEL_ALPN;

/// Most bytes peeked for a ClientHello (one TLS record holds 16 KiB; a
/// ClientHello split over a few records still fits).
const MAX_HELLO: usize = 64 * 1024;

/// The first peek buffer: a usual ClientHello (OTP's, a sidecar's) is well
/// below it, so a peer that stalls mid-hello holds only this much.
const FIRST_PEEK: usize = 4 * 1024;

/// First pause between peeks while a ClientHello is still arriving (it
/// almost always comes in one segment, its rest within a round trip). A
/// peek cannot wait for more bytes (it returns at once while any byte is
/// queued), so the pause doubles while nothing arrives, up to
/// [`PEEK_RETRY_MAX`], and starts again from here when bytes do: a peer
/// that stalls mid-hello until the deadline costs a few dozen wake-ups,
/// not one every 2 ms (2,500 per stalled connection with the default 5 s
/// deadline, which a few hundred such connections turned into most of a
/// core).
const PEEK_RETRY: Duration = Duration::from_millis(2);

/// Longest pause between peeks of a stalled ClientHello.
const PEEK_RETRY_MAX: Duration = Duration::from_millis(64);

/// The pause after `pause` while no byte arrives.
fn next_pause(pause: Duration) -> Duration {
    (pause * 2).min(PEEK_RETRY_MAX)
}

/// What the ClientHello says about the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// It offers [`TUNNEL_ALPN`]: a sidecar's tunnel.
    Tunnel,
    /// It offers no tunnel ALPN; `sni` is the server name it asks for, if
    /// any (OTP's nodes send their peer's host).
    Other { sni: Option<String> },
    /// Not a ClientHello rustls can parse; left to the tunnel's TLS
    /// server, which refuses it with a TLS error when `[tls]` is on.
    Unparsed,
}

/// Classifies a complete ClientHello in `bytes`; `None` when more bytes
/// are needed.
pub fn classify(bytes: &[u8]) -> Option<Hello> {
    let mut acceptor = Acceptor::default();
    let mut rest = bytes;
    loop {
        if !rest.is_empty() && acceptor.read_tls(&mut rest).is_err() {
            return Some(Hello::Unparsed);
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                let tunnel = hello
                    .alpn()
                    .is_some_and(|mut offered| offered.any(|p| p == TUNNEL_ALPN));
                return Some(if tunnel {
                    Hello::Tunnel
                } else {
                    Hello::Other {
                        sni: hello.server_name().map(str::to_owned),
                    }
                });
            }
            Ok(None) if rest.is_empty() => return None,
            Ok(None) => continue,
            Err(_) => return Some(Hello::Unparsed),
        }
    }
}

/// Peeks at the ClientHello until it is complete (or `deadline`). A peer
/// that closes mid-hello ends the peek as closed when its end arrives (a
/// peek keeps returning the queued bytes, never the end, so the end is
/// read from the socket's readiness).
pub async fn peek_hello(
    stream: &TcpStream,
    deadline: tokio::time::Instant,
) -> Result<Hello, SetupError> {
    let err = |kind| SetupError {
        phase: Phase::FirstFrame,
        kind,
    };
    let mut buf = vec![0u8; FIRST_PEEK];
    let mut seen = 0;
    let mut pause = PEEK_RETRY;
    loop {
        // Taken before the peek: an end seen here comes after every byte
        // the peek below returns.
        let ended = stream
            .ready(Interest::READABLE)
            .now_or_never()
            .is_some_and(|r| r.is_ok_and(|r| r.is_read_closed()));
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => return Err(err(SetupErrorKind::Timeout)),
            Ok(Ok(0)) => return Err(err(SetupErrorKind::Closed(seen))),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(err(SetupErrorKind::Io(e))),
        };
        if n > seen {
            seen = n;
            pause = PEEK_RETRY;
            if let Some(hello) = classify(&buf[..n]) {
                return Ok(hello);
            }
            if n == buf.len() {
                if n >= MAX_HELLO {
                    return Ok(Hello::Unparsed);
                }
                // A large hello: peek again at once with room for more.
                buf.resize((n * 4).min(MAX_HELLO), 0);
                continue;
            }
        }
        if ended {
            return Err(err(SetupErrorKind::Closed(seen)));
        }
        // A peek returns at once while any byte is queued: wait for more.
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(err(SetupErrorKind::Timeout));
        }
        tokio::time::sleep_until((now + pause).min(deadline)).await;
        pause = next_pause(pause);
    }
}

/// Where a TLS connection on the distribution port goes.
pub enum Destination {
    /// The tunnel's TLS server.
    Tunnel,
    /// A local node, chosen by a pending lookup (`Some`) or being the only
    /// one (`None`).
    Node(Option<Consumed>),
    /// Nobody: not a ClientHello, and no TLS server to refuse it.
    Invalid,
}

/// Chooses between the tunnel and a node. A ClientHello offering the
/// tunnel's ALPN goes to the tunnel. Any other takes the peer's oldest
/// pending lookup on this port, as a plain connection would; without one,
/// it goes to the tunnel when `[tls]` is on and it sends no SNI (a sidecar
/// of a version before the ALPN), else to the only node. What does not
/// parse goes to the tunnel's TLS server, or nowhere without one.
pub fn destination(
    hello: &Hello,
    tunnel_tls: bool,
    consume: impl FnOnce() -> Option<Consumed>,
) -> Destination {
    match hello {
        Hello::Tunnel => Destination::Tunnel,
        Hello::Unparsed if tunnel_tls => Destination::Tunnel,
        Hello::Other { sni } => match consume() {
            Some(entry) => Destination::Node(Some(entry)),
            None if tunnel_tls && sni.is_none() => Destination::Tunnel,
            None => Destination::Node(None),
        },
        Hello::Unparsed => Destination::Invalid,
    }
}

/// What routing a node's own TLS connection needs from the listener.
pub struct Ctx<'a> {
    /// `dist.beam_tls`.
    pub policy: BeamTls,
    pub registry: &'a Registry,
    pub acl: &'a AclHandle,
    pub forward: &'a Forwarder,
}

/// Routes a node's own TLS connection (the ClientHello still unread) to
/// the node `entry` names, or the only node, and relays it undecrypted.
pub async fn relay_to_node(
    stream: TcpStream,
    peer: SocketAddr,
    entry: Option<Consumed>,
    started: Instant,
    permit: ConnPermit,
    ctx: Ctx<'_>,
) {
    let refused = || {
        metrics::counter!(m::BEAM_TLS_CONNECTIONS, "outcome" => outcome::REFUSED).increment(1);
        closed(reason::REFUSED_BY_POLICY);
    };
    if ctx.policy == BeamTls::Refuse {
        warn_throttled!(%peer, lookup = ?entry.as_ref().map(|c| &c.node),
            "a node's own TLS distribution (inet_tls_dist) refused (dist.beam_tls = \"refuse\"); closing");
        refused();
        return;
    }
    let Some((target, method)) = forward::correlated_or_single(entry.as_ref(), ctx.registry) else {
        warn_throttled!(%peer, registered = ctx.registry.len(),
            "unroutable TLS distribution connection: no pending lookup from this peer and not exactly one node registered");
        metrics::counter!(m::BEAM_TLS_CONNECTIONS, "outcome" => outcome::UNROUTABLE).increment(1);
        metrics::counter!(m::ROUTES, "method" => route::UNROUTABLE).increment(1);
        closed(reason::UNROUTABLE);
        return;
    };
    if !ctx
        .acl
        .admit_unknown_initiator(&target, peer, AclPath::BeamTls)
    {
        refused();
        return;
    }
    let Some(node) = ctx.registry.get(&target) else {
        warn_throttled!(%peer, %target, "target node is no longer registered; closing");
        closed(reason::NODE_GONE);
        return;
    };
    let fwd = ctx.forward;
    let node_addr = SocketAddr::new(node.addr, node.spec.port);
    // Not announced to node routes: they are armed only at a verified
    // handover, which an undecrypted handshake never has.
    let (node_stream, _) = match fwd.connect_node(node_addr, false).await {
        Ok(connected) => connected,
        Err(e) => {
            warn_throttled!(%peer, %target, %node_addr, error = %e, "failed to connect to node");
            return;
        }
    };
    metrics::counter!(m::ROUTES, "method" => method.label()).increment(1);
    metrics::counter!(m::BEAM_TLS_CONNECTIONS, "outcome" => outcome::ROUTED).increment(1);
    let guard = ConnectionGuard::open(permit, &fwd.node_stats, &target, Direction::Inbound);
    debug!(%peer, %target, method = method.label(), "relaying a node's own TLS distribution");
    // Nothing was read: the node sees the ClientHello first, and the fast
    // path may take the pair at once (no node routes: the handshake has
    // not even started).
    let (stats, outcome, _guard) = fwd
        .relay(guard, stream, node_stream, RelayStats::default(), false)
        .await;
    info!(%peer, %target, route = method.label(), transport = "beam_tls",
        rx_bytes = stats.rx, tx_bytes = stats.tx,
        duration_ms = started.elapsed().as_millis() as u64, %outcome,
        "distribution connection ended");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The first flight of a real rustls client offering `alpn`, with SNI
    /// for `server` when it is a DNS name.
    fn client_hello(alpn: &[&[u8]], server: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(server.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn the_tunnel_alpn_tells_a_sidecar_from_a_node() {
        let tunnel = client_hello(&[b"h2", TUNNEL_ALPN], "198.18.0.2");
        assert_eq!(classify(&tunnel), Some(Hello::Tunnel));
        // As OTP's inet_tls_dist connects: no ALPN, SNI = the peer's host.
        let node = client_hello(&[], "pod-b.dp.test");
        assert_eq!(
            classify(&node),
            Some(Hello::Other {
                sni: Some("pod-b.dp.test".into())
            })
        );
        let by_ip = client_hello(&[b"h2"], "198.18.0.2");
        assert_eq!(classify(&by_ip), Some(Hello::Other { sni: None }));
    }

    #[test]
    fn a_partial_hello_asks_for_more_and_garbage_is_unparsed() {
        let hello = client_hello(&[TUNNEL_ALPN], "198.18.0.2");
        for cut in [1, 5, 6, hello.len() / 2, hello.len() - 1] {
            assert_eq!(classify(&hello[..cut]), None, "cut at {cut}");
        }
        // A record header that announces a handshake, then junk.
        let mut junk = vec![0x16, 0x03, 0x01, 0x00, 0x08];
        junk.extend_from_slice(&[0xff; 8]);
        assert_eq!(classify(&junk), Some(Hello::Unparsed));
        // Not a handshake record at all (the dispatcher only passes 0x16,
        // but nothing here relies on it).
        assert_eq!(classify(b"\x17\x03\x03\x00\x01x"), Some(Hello::Unparsed));
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (client, listener.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn peeking_waits_for_a_hello_sent_in_pieces_and_leaves_it_unread() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Larger than the first peek buffer: 600 ALPN names, then ours.
        let names: Vec<Vec<u8>> = (0..600)
            .map(|i| format!("proto-{i:04}").into_bytes())
            .collect();
        let mut alpn: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
        alpn.push(TUNNEL_ALPN);
        let hello = client_hello(&alpn, "198.18.0.2");
        assert!(hello.len() > FIRST_PEEK, "{} bytes", hello.len());
        let (mut client, server) = pair().await;
        let second = hello[100..].to_vec();
        client.write_all(&hello[..100]).await.unwrap();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(&second).await.unwrap();
            client
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        assert_eq!(peek_hello(&server, deadline).await.unwrap(), Hello::Tunnel);
        let _client = sender.await.unwrap();
        // Nothing was consumed: whoever takes the connection reads it all.
        let mut server = server;
        let mut read = vec![0u8; hello.len()];
        server.read_exact(&mut read).await.unwrap();
        assert_eq!(read, hello);
    }

    #[tokio::test]
    async fn a_stalled_hello_ends_the_peek_at_the_deadline() {
        use tokio::io::AsyncWriteExt;
        let hello = client_hello(&[], "pod-b.dp.test");
        let (mut client, server) = pair().await;
        client.write_all(&hello[..20]).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        let err = peek_hello(&server, deadline).await.unwrap_err();
        assert_eq!(err.reason(), reason::TIMEOUT);
    }

    #[tokio::test]
    async fn a_hello_closed_midway_ends_the_peek_when_the_end_arrives() {
        use tokio::io::AsyncWriteExt;
        let hello = client_hello(&[], "pod-b.dp.test");
        // Closed with the first bytes, and closed after a pause.
        for pause in [None, Some(Duration::from_millis(100))] {
            let (mut client, server) = pair().await;
            client.write_all(&hello[..20]).await.unwrap();
            let closer = tokio::spawn(async move {
                if let Some(pause) = pause {
                    tokio::time::sleep(pause).await;
                }
                drop(client);
            });
            // A peek keeps returning the 20 queued bytes, never the end:
            // without the socket's read-closed readiness the peek would
            // last until this deadline and call it a timeout.
            let started = tokio::time::Instant::now();
            let deadline = started + Duration::from_secs(10);
            let err = peek_hello(&server, deadline).await.unwrap_err();
            assert_eq!(err.reason(), reason::PEER_CLOSED, "{pause:?}");
            assert!(
                matches!(err.kind, SetupErrorKind::Closed(20)),
                "{:?}",
                err.kind
            );
            assert!(started.elapsed() < Duration::from_secs(5), "{pause:?}");
            closer.await.unwrap();
        }
    }

    #[test]
    fn a_stalled_hello_is_peeked_a_few_dozen_times_per_deadline() {
        // Pauses until the default 5 s handshake deadline: few wake-ups
        // (one every 2 ms was 2,500), and a hello's rest that arrives is
        // still seen within PEEK_RETRY_MAX.
        let (mut pause, mut waited, mut peeks) = (PEEK_RETRY, Duration::ZERO, 0);
        while waited < Duration::from_secs(5) {
            waited += pause;
            peeks += 1;
            assert!(pause <= PEEK_RETRY_MAX);
            pause = next_pause(pause);
        }
        assert!(peeks <= 100, "{peeks} peeks");
        assert_eq!(next_pause(PEEK_RETRY), PEEK_RETRY * 2);
    }

    fn consumed(node: &str) -> Option<Consumed> {
        Some(Consumed {
            id: 7,
            node: node.into(),
            age: Duration::ZERO,
        })
    }

    #[test]
    fn the_destination_follows_alpn_then_lookups_then_sni() {
        let node = |d: Destination| match d {
            Destination::Node(c) => Some(c.map(|c| c.node)),
            Destination::Tunnel => None,
            Destination::Invalid => panic!("invalid"),
        };
        let other = |sni: Option<&str>| Hello::Other {
            sni: sni.map(str::to_owned),
        };
        // The tunnel's ALPN never consumes a lookup.
        let d = destination(&Hello::Tunnel, false, || panic!("consumed"));
        assert!(node(d).is_none());
        // A pending lookup routes to its node, with or without [tls].
        for tls in [false, true] {
            let d = destination(&other(Some("pod-a")), tls, || consumed("a1"));
            assert_eq!(node(d), Some(Some("a1".into())));
            let d = destination(&other(None), tls, || consumed("a2"));
            assert_eq!(node(d), Some(Some("a2".into())));
        }
        // No lookup: an older sidecar (no ALPN, no SNI) with [tls] on.
        assert!(node(destination(&other(None), true, || None)).is_none());
        // A node's hello (SNI) or no [tls]: the only node, if one.
        assert_eq!(
            node(destination(&other(Some("pod-a")), true, || None)),
            Some(None)
        );
        assert_eq!(node(destination(&other(None), false, || None)), Some(None));
        // Unparsable: the tunnel's TLS server refuses it when [tls] is on.
        assert!(node(destination(&Hello::Unparsed, true, || panic!("consumed"))).is_none());
        // Without it, nobody takes it, and it takes no lookup.
        assert!(matches!(
            destination(&Hello::Unparsed, false, || panic!("consumed")),
            Destination::Invalid
        ));
    }
}
