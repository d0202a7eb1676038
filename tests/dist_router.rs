//! The distribution router against real sockets: correlation, fallback,
//! rejection of bad first frames, relaying, IPv6 nodes.

use std::time::Duration;

use bytes::BytesMut;
use distproxy_testkit::prelude::*;
use distproxy_testkit::sut::client;
use distproxy_testkit::sut::handshake::{self, SendName};
use distproxy_testkit::sut::proto::{Port2Reply, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn lookup_port(epmd: std::net::SocketAddr, name: &str) -> u16 {
    match client::port_please(epmd, name).await.unwrap() {
        Port2Reply::Found(spec) => spec.port,
        other => panic!("lookup of {name}: {other:?}"),
    }
}

#[tokio::test]
async fn lookups_route_each_connection_to_the_node_looked_up() {
    let sc = start(proxy_config());
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    let a = FakeNode::start("a", "127.0.0.1:0").await;
    let b = FakeNode::start("b", "127.0.0.1:0").await;
    let c = FakeNode::start("c", "127.0.0.1:0").await;
    let _ra = client::register(epmd, spec("a", a.port)).await.unwrap();
    let _rb = client::register(epmd, spec("b", b.port)).await.unwrap();
    let _rc = client::register(epmd, spec("c", c.port)).await.unwrap();

    for target in ["b", "a", "c", "c", "a", "b"] {
        assert_eq!(
            lookup_port(epmd, target).await,
            dist.port(),
            "advertised port"
        );
        let (mut s, answered) = dial_as(dist, "initiator@remote").await;
        assert_eq!(
            answered,
            format!("{target}@fake.host"),
            "routed to the wrong node"
        );
        // Opaque relaying after the handshake frames, both ways.
        s.write_all(b"ping-bytes").await.unwrap();
        let mut back = [0u8; 10];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping-bytes");
    }
}

#[tokio::test]
async fn single_node_is_the_fallback_and_two_nodes_without_lookup_are_unroutable() {
    let sc = start(proxy_config());
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    let a = FakeNode::start("a", "127.0.0.1:0").await;
    let _ra = client::register(epmd, spec("a", a.port)).await.unwrap();
    let (_s, answered) = dial_as(dist, "x@remote").await;
    assert_eq!(answered, "a@fake.host");

    let b = FakeNode::start("b", "127.0.0.1:0").await;
    let _rb = client::register(epmd, spec("b", b.port)).await.unwrap();
    let mut s = TcpStream::connect(dist).await.unwrap();
    let mut out = BytesMut::new();
    handshake::encode_send_name(
        &mut out,
        &SendName {
            name: "x@remote".into(),
            flags: 0x000d_07df_7fbd,
            creation: Some(1),
            version: None,
        },
    );
    s.write_all(&out).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest))
        .await
        .expect("unroutable connection must be closed");
    assert!(
        n.is_err() || rest.is_empty(),
        "unroutable connection got bytes: {rest:?}"
    );
}

#[tokio::test]
async fn non_dist_oversized_and_silent_first_frames_are_closed() {
    let mut cfg = proxy_config();
    cfg.dist.handshake_timeout_ms = Millis(300);
    let sc = start(cfg);
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    let a = FakeNode::start("a", "127.0.0.1:0").await;
    let _ra = client::register(epmd, spec("a", a.port)).await.unwrap();

    for (what, bytes) in [
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("oversized frame", vec![0x0f, 0xff, b'N', 0, 0]),
        ("wrong tag", vec![0, 5, b'Z', 1, 2, 3, 4]),
        ("silence", vec![0, 30, b'N']),
    ] {
        let since = std::time::Instant::now();
        let mut s = TcpStream::connect(dist).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        if what == "silence" {
            // Closed by the handshake deadline, not before it.
            closed_by_timeout(&mut s, since, Duration::from_millis(300), what).await;
            continue;
        }
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("{what}: connection not closed"));
        assert!(r.is_err() || rest.is_empty(), "{what}: got {rest:?}");
    }
    // The node is still reachable afterwards.
    let (_s, answered) = dial_as(dist, "x@remote").await;
    assert_eq!(answered, "a@fake.host");
}

/// The heart of exact routing: one peer asks for two different nodes at
/// once; the second answer must wait until the first has been consumed by a
/// connection, so the next connection can only mean the first node.
#[tokio::test]
async fn two_concurrent_lookups_for_different_nodes_are_never_both_answered_before_connecting() {
    let mut cfg = proxy_config();
    cfg.routing.lookup_ttl_ms = Millis(5000);
    let sc = start(cfg);
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    let a = FakeNode::start("a", "127.0.0.1:0").await;
    let b = FakeNode::start("b", "127.0.0.1:0").await;
    let _ra = client::register(epmd, spec("a", a.port)).await.unwrap();
    let _rb = client::register(epmd, spec("b", b.port)).await.unwrap();

    let send = |name: &'static str| async move {
        let mut s = TcpStream::connect(epmd).await.unwrap();
        let mut out = BytesMut::new();
        Request::PortPlease2 { name: name.into() }.encode(&mut out);
        s.write_all(&out).await.unwrap();
        s
    };
    // The answer to "a" means its lookup is recorded; only then ask for "b".
    let mut first = send("a").await;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut reply))
        .await
        .expect("lookup for a not answered")
        .unwrap();
    assert_eq!(reply[..2], [b'w', 0]);
    let mut second = send("b").await;

    // The second lookup stays unanswered while "a" is pending.
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(700), second.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "lookup for b answered while the lookup for a was unconsumed"
    );

    // Connecting consumes "a"; then "b" is answered and routes exactly.
    let (_sa, answered_a) = dial_as(dist, "x@remote").await;
    assert_eq!(answered_a, "a@fake.host");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), second.read_to_end(&mut reply))
        .await
        .expect("held lookup not released after consumption")
        .unwrap();
    assert_eq!(reply[..2], [b'w', 0]);
    let (_sb, answered_b) = dial_as(dist, "x@remote").await;
    assert_eq!(answered_b, "b@fake.host");
}

#[tokio::test]
async fn node_registered_over_ipv6_is_reached_over_ipv6() {
    let mut cfg = proxy_config();
    cfg.epmd.listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
    let sc = start(cfg);
    let (epmd4, epmd6, dist) = (sc.epmd_addrs[0], sc.epmd_addrs[1], dist_addr(&sc));
    // The fake nodes listen on ::1 only: reaching them over IPv4 would fail.
    let six = FakeNode::start("six", "[::1]:0").await;
    let seven = FakeNode::start("seven", "[::1]:0").await;
    let _r6 = client::register(epmd6, spec("six", six.port))
        .await
        .unwrap();
    let _r7 = client::register(epmd6, spec("seven", seven.port))
        .await
        .unwrap();
    // Looked up and dialled over IPv4 (peer 127.0.0.1 both times).
    lookup_port(epmd4, "seven").await;
    let (_s, answered) = dial_as(dist, "x@remote").await;
    assert_eq!(answered, "seven@fake.host");
}

/// Sends a PORT_PLEASE2 for `name` and leaves the connection open.
async fn send_lookup(epmd: std::net::SocketAddr, name: &str) -> TcpStream {
    let mut s = TcpStream::connect(epmd).await.unwrap();
    let mut out = BytesMut::new();
    Request::PortPlease2 { name: name.into() }.encode(&mut out);
    s.write_all(&out).await.unwrap();
    s
}

/// OTP kills a connection setup that loses a simultaneous connect, often
/// while its lookup is held: the abandoned lookup must record nothing, or
/// it would block every other target from that peer for the TTL.
#[tokio::test]
async fn a_held_lookup_whose_requester_closes_leaves_no_phantom_entry() {
    let mut cfg = proxy_config();
    cfg.routing.lookup_ttl_ms = Millis(60_000);
    let sc = start(cfg);
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    let a = FakeNode::start("a", "127.0.0.1:0").await;
    let b = FakeNode::start("b", "127.0.0.1:0").await;
    let c = FakeNode::start("c", "127.0.0.1:0").await;
    let _ra = client::register(epmd, spec("a", a.port)).await.unwrap();
    let _rb = client::register(epmd, spec("b", b.port)).await.unwrap();
    let _rc = client::register(epmd, spec("c", c.port)).await.unwrap();
    let peer: std::net::IpAddr = "127.0.0.1".parse().unwrap();

    let mut first = send_lookup(epmd, "a").await;
    let mut reply = Vec::new();
    first.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply[..2], [b'w', 0]);
    // b is held behind a; its requester gives up.
    let abandoned = send_lookup(epmd, "b").await;
    assert!(
        eventually(Duration::from_secs(2), || {
            let sc = &sc;
            async move { sc.correlator.pending(peer) == vec!["a".to_string()] }
        })
        .await
    );
    drop(abandoned);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // a's connection arrives; nothing may be left for b.
    let (_sa, answered) = dial_as(dist, "x@remote").await;
    assert_eq!(answered, "a@fake.host");
    assert!(
        sc.correlator.pending(peer).is_empty(),
        "phantom entry left by an abandoned lookup: {:?}",
        sc.correlator.pending(peer)
    );
    // So c is answered at once and routed exactly.
    let mut third = send_lookup(epmd, "c").await;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), third.read_to_end(&mut reply))
        .await
        .expect("lookup for c held by a phantom entry")
        .unwrap();
    assert_eq!(reply[..2], [b'w', 0]);
    let (_sc, answered) = dial_as(dist, "x@remote").await;
    assert_eq!(answered, "c@fake.host");
}

/// A requester that half-closes after its lookup (`nc`, `socat`, a script
/// reading after EOF) is answered as by `epmd`, at once or after a hold,
/// and leaves no entry behind. It got nothing: its EOF was taken for its
/// going away.
#[tokio::test]
async fn a_requester_that_half_closes_is_answered_and_records_nothing() {
    let mut cfg = proxy_config();
    cfg.routing.lookup_ttl_ms = Millis(60_000);
    let sc = start(cfg);
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    let a = FakeNode::start("a", "127.0.0.1:0").await;
    let b = FakeNode::start("b", "127.0.0.1:0").await;
    let _ra = client::register(epmd, spec("a", a.port)).await.unwrap();
    let _rb = client::register(epmd, spec("b", b.port)).await.unwrap();
    let peer: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let advertised = sc.correlator.ports()[0];
    let half_closed_lookup = |name: &'static str| async move {
        let mut s = send_lookup(epmd, name).await;
        s.shutdown().await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply))
            .await
            .expect("no answer within 5 s")
            .unwrap();
        reply
    };
    // Answered at once: the port, and no entry.
    let reply = half_closed_lookup("a").await;
    assert_eq!(reply[..2], [b'w', 0], "reply {reply:?}");
    assert_eq!(u16::from_be_bytes([reply[2], reply[3]]), advertised);
    assert!(
        sc.correlator.pending(peer).is_empty(),
        "entry left: {:?}",
        sc.correlator.pending(peer)
    );
    // Held behind a real lookup of a: answered too, nothing recorded.
    let mut first = send_lookup(epmd, "a").await;
    let mut reply = Vec::new();
    first.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply[..2], [b'w', 0]);
    let reply = half_closed_lookup("b").await;
    assert_eq!(reply[..2], [b'w', 0], "reply {reply:?}");
    assert_eq!(u16::from_be_bytes([reply[2], reply[3]]), advertised);
    assert_eq!(sc.correlator.pending(peer), vec!["a".to_string()]);
    let (_sa, answered) = dial_as(dist, "x@remote").await;
    assert_eq!(answered, "a@fake.host");
    assert!(sc.correlator.pending(peer).is_empty());
}

/// A connection that dies before its first frame still takes its entry.
#[tokio::test]
async fn a_connection_closed_before_its_handshake_consumes_its_entry() {
    let mut cfg = proxy_config();
    cfg.routing.lookup_ttl_ms = Millis(60_000);
    let sc = start(cfg);
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    let a = FakeNode::start("a", "127.0.0.1:0").await;
    let b = FakeNode::start("b", "127.0.0.1:0").await;
    let _ra = client::register(epmd, spec("a", a.port)).await.unwrap();
    let _rb = client::register(epmd, spec("b", b.port)).await.unwrap();
    let peer: std::net::IpAddr = "127.0.0.1".parse().unwrap();

    lookup_port(epmd, "a").await;
    // A first byte of a raw handshake, then the initiator is gone.
    let mut s = TcpStream::connect(dist).await.unwrap();
    s.write_all(&[0]).await.unwrap();
    drop(s);
    assert!(
        eventually(Duration::from_secs(2), || {
            let sc = &sc;
            async move { sc.correlator.pending(peer).is_empty() }
        })
        .await,
        "entry of a dead connection still pending"
    );
    lookup_port(epmd, "b").await;
    let (_sb, answered) = dial_as(dist, "x@remote").await;
    assert_eq!(answered, "b@fake.host");
}

/// So does a TLS connection (a node's own TLS distribution) that dies
/// before its ClientHello is complete, when no tunnel TLS server could
/// have been its destination.
#[tokio::test]
async fn a_tls_connection_closed_inside_its_client_hello_consumes_its_entry() {
    let mut cfg = proxy_config();
    cfg.routing.lookup_ttl_ms = Millis(60_000);
    cfg.dist.handshake_timeout_ms = Millis(300);
    let sc = start(cfg);
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    let a = FakeNode::start("a", "127.0.0.1:0").await;
    let b = FakeNode::start("b", "127.0.0.1:0").await;
    let _ra = client::register(epmd, spec("a", a.port)).await.unwrap();
    let _rb = client::register(epmd, spec("b", b.port)).await.unwrap();
    let peer: std::net::IpAddr = "127.0.0.1".parse().unwrap();

    lookup_port(epmd, "a").await;
    // A TLS record header announcing a ClientHello, then nothing more.
    let mut s = TcpStream::connect(dist).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0xf0, 0x01])
        .await
        .unwrap();
    drop(s);
    assert!(
        eventually(Duration::from_secs(3), || {
            let sc = &sc;
            async move { sc.correlator.pending(peer).is_empty() }
        })
        .await,
        "entry of a dead TLS connection still pending"
    );
    lookup_port(epmd, "b").await;
    let (_sb, answered) = dial_as(dist, "x@remote").await;
    assert_eq!(answered, "b@fake.host");
}

/// With several distribution ports, lookups of different nodes from one
/// peer are answered at once on different ports, and each port routes to
/// its own node whatever the order the connections arrive in.
#[tokio::test]
async fn a_port_pool_routes_concurrent_lookups_of_different_nodes_exactly() {
    let mut cfg = proxy_config();
    cfg.dist.listen = vec!["127.0.0.1:0".parse().unwrap(); 3];
    cfg.routing.lookup_ttl_ms = Millis(60_000);
    let sc = start(cfg);
    let epmd = epmd_addr(&sc);
    let a = FakeNode::start("a", "127.0.0.1:0").await;
    let b = FakeNode::start("b", "127.0.0.1:0").await;
    let c = FakeNode::start("c", "127.0.0.1:0").await;
    let _ra = client::register(epmd, spec("a", a.port)).await.unwrap();
    let _rb = client::register(epmd, spec("b", b.port)).await.unwrap();
    let _rc = client::register(epmd, spec("c", c.port)).await.unwrap();

    let mut ports = Vec::new();
    for name in ["a", "b", "c"] {
        let port = tokio::time::timeout(Duration::from_secs(2), lookup_port(epmd, name))
            .await
            .expect("a lookup of another node was held despite a free port");
        ports.push((name, port));
    }
    let mut distinct: Vec<u16> = ports.iter().map(|p| p.1).collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "one port per node: {ports:?}");
    for (name, port) in ports.iter().rev() {
        let (_s, answered) = dial_as(([127, 0, 0, 1], *port).into(), "x@remote").await;
        assert_eq!(answered, format!("{name}@fake.host"));
    }
}

/// Connects to `dist` as a remote initiator: the challenge's name, or None
/// when the sidecar closes the connection first (over its limit).
async fn try_dial(dist: std::net::SocketAddr) -> Option<(TcpStream, String)> {
    let mut s = TcpStream::connect(dist).await.ok()?;
    s.write_all(&frames::send_name("many@remote")).await.ok()?;
    let mut buf = BytesMut::new();
    loop {
        if let Some((name, _)) = frames::parse_node_answer(&buf) {
            return Some((s, name));
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf))
            .await
            .expect("no answer and no close within 5 s")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
    }
}

/// One more message through `s`, echoed by the node.
async fn echo_once(s: &mut TcpStream, i: usize) {
    let msg = (i as u64).to_be_bytes();
    s.write_all(&msg).await.unwrap();
    let mut back = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .expect("echo within 5 s")
        .unwrap();
    assert_eq!(back, msg, "connection {i} relays");
}

/// A short version of `benches/hold.rs`: with `dist.max_connections` = N,
/// N connections set up by lookup are all relayed and stay relayed while
/// idle (one more is refused: every one holds its place), and when the
/// client closes them all, every place is given back (N new connections
/// are relayed again). A relay that leaked its task, its permit or a
/// socket would fail the second round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_idle_connections_are_all_relayed_and_all_released() {
    const N: usize = 200;
    // Four descriptors per connection in this process (client, both legs
    // in the sidecar, the fake node's side).
    distproxy_testkit::bench::raise_nofile(8 * N as u64 + 256);
    let mut config = proxy_config();
    config.dist.max_connections = N;
    config.limits.dist_max_connections_per_source = N;
    // Loopback is a local peer, which the reserve would let past the total.
    config.limits.reserved_local_connections = 0;
    let sc = start(config);
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    let node = FakeNode::start("a", "127.0.0.1:0").await;
    let _reg = client::register(epmd, spec("a", node.port)).await.unwrap();

    for round in 0..2 {
        let mut held = Vec::with_capacity(N);
        for i in 0..N {
            assert_eq!(lookup_port(epmd, "a").await, dist.port());
            // In the second round, places are given back as the sidecar
            // sees the first round's connections close.
            let mut got = None;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while got.is_none() {
                got = try_dial(dist).await;
                if got.is_none() {
                    assert!(
                        round == 1 && tokio::time::Instant::now() < deadline,
                        "round {round}: connection {i} refused: places not given back"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let (mut s, answered) = got.unwrap();
            assert_eq!(answered, "a@fake.host", "round {round}: connection {i}");
            echo_once(&mut s, i).await;
            held.push(s);
        }
        // Every place is taken by a relayed connection: one more is refused.
        assert!(
            try_dial(dist).await.is_none(),
            "round {round}: connection {N} + 1 accepted over dist.max_connections = {N}"
        );
        for (i, s) in held.iter_mut().enumerate() {
            echo_once(s, i).await;
        }
        drop(held);
    }
}

/// Connections that never send their handshake (from as many addresses as
/// it takes to pass the per-source cap) fill `dist.max_connections`: a
/// node's connection still goes through, because the oldest connection
/// not yet relayed is closed to make room. Relayed connections are never
/// closed for room (`many_idle_connections_are_all_relayed_and_all_released`).
#[tokio::test]
async fn stalled_connections_that_fill_the_limit_make_room_for_a_node() {
    let mut config = proxy_config();
    config.dist.max_connections = 4;
    // Loopback is a local peer, which the reserve would let past the total.
    config.limits.reserved_local_connections = 0;
    let sc = start(config);
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    let node = FakeNode::start("a", "127.0.0.1:0").await;
    let _reg = client::register(epmd, spec("a", node.port)).await.unwrap();

    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(TcpStream::connect(dist).await.unwrap());
        // Accepted in order: the first is the oldest.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lookup_port(epmd, "a").await, dist.port());
    let (mut s, answered) = try_dial(dist)
        .await
        .expect("the node's connection was refused: stalled connections hold every place");
    assert_eq!(answered, "a@fake.host");
    echo_once(&mut s, 0).await;
    // The oldest stalled connection made room; the others are still open.
    distproxy_testkit::peer::assert_only_the_oldest_was_evicted(&mut stalled).await;
    // The relayed connection keeps its place while newcomers take the
    // stalled ones'.
    for _ in 0..6 {
        let _ = TcpStream::connect(dist).await.unwrap();
    }
    echo_once(&mut s, 1).await;
}
