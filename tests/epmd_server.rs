//! The EPMD server against real sockets, speaking raw protocol bytes.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use distproxy_testkit::prelude::*;
use distproxy_testkit::sut::client;
use distproxy_testkit::sut::proto::{Port2Reply, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SEC: Duration = Duration::from_secs(1);

#[tokio::test]
async fn alive2_port_please_echoes_everything_and_unregisters_on_close() {
    let sc = start(test_config());
    let epmd = epmd_addr(&sc);
    let mut s = spec("alpha", 40001);
    s.node_type = 72; // hidden
    s.extra = Bytes::from_static(b"\x01extra\x00bytes");
    let (conn, reply) = client::register(epmd, s.clone()).await.unwrap();
    assert_eq!(reply.result, 0);
    assert!(reply.extended, "version 6 node must get ALIVE2_X_RESP");
    assert!(reply.creation >= 4);

    // Loopback lookups are answered with the node's own port by default.
    match client::port_please(epmd, "alpha").await.unwrap() {
        Port2Reply::Found(found) => assert_eq!(found, s),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        client::port_please(epmd, "nobody").await.unwrap(),
        Port2Reply::NotFound { result } if result != 0
    ));

    drop(conn);
    assert!(
        eventually(SEC, || async {
            matches!(
                client::port_please(epmd, "alpha").await,
                Ok(Port2Reply::NotFound { .. })
            )
        })
        .await,
        "registration outlived its connection"
    );
}

#[tokio::test]
async fn old_nodes_get_the_old_reply_with_a_16_bit_creation() {
    let sc = start(test_config());
    let mut s = spec("old", 40002);
    s.highest_version = 5;
    let mut req = BytesMut::new();
    Request::Alive2(s).encode(&mut req);
    let mut conn = TcpStream::connect(epmd_addr(&sc)).await.unwrap();
    conn.write_all(&req).await.unwrap();
    let mut reply = [0u8; 4];
    conn.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[0], b'y');
    assert_eq!(reply[1], 0);
    let creation = u16::from_be_bytes([reply[2], reply[3]]);
    assert!((1..=3).contains(&creation), "creation {creation}");
}

#[tokio::test]
async fn reset_registration_is_unregistered() {
    let sc = start(test_config());
    let epmd = epmd_addr(&sc);
    let (conn, _) = client::register(epmd, spec("rst", 40003)).await.unwrap();
    let std = conn.into_std().unwrap();
    socket2::SockRef::from(&std)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(std); // RST
    assert!(
        eventually(SEC, || async {
            matches!(
                client::port_please(epmd, "rst").await,
                Ok(Port2Reply::NotFound { .. })
            )
        })
        .await
    );
    // The name can be registered again at once.
    let (_c, r) = client::register(epmd, spec("rst", 40004)).await.unwrap();
    assert_eq!(r.result, 0);
}

#[tokio::test]
async fn duplicate_is_refused_and_reregistration_changes_creation() {
    let sc = start(test_config());
    let epmd = epmd_addr(&sc);
    let (first, r1) = client::register(epmd, spec("dup", 40005)).await.unwrap();
    let (_second, r2) = client::register(epmd, spec("dup", 40006)).await.unwrap();
    assert_eq!(r2.result, 1, "duplicate name must be refused");
    match client::port_please(epmd, "dup").await.unwrap() {
        Port2Reply::Found(f) => assert_eq!(f.port, 40005, "first registration disturbed"),
        other => panic!("{other:?}"),
    }
    drop(first);
    let mut again = None;
    for _ in 0..50 {
        let (c, r) = client::register(epmd, spec("dup", 40007)).await.unwrap();
        if r.result == 0 {
            again = Some((c, r));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_c, r3) = again.expect("re-registration after close refused");
    assert_ne!(r3.creation, r1.creation);
}

#[tokio::test]
async fn names_lists_nodes_with_real_ports_locally_and_advertised_port_in_proxy_mode() {
    let sc = start(test_config());
    let epmd = epmd_addr(&sc);
    let _a = client::register(epmd, spec("a", 40010)).await.unwrap();
    let _b = client::register(epmd, spec("b", 40011)).await.unwrap();
    let (port, text) = client::names(epmd).await.unwrap();
    assert_eq!(port, u32::from(epmd.port()));
    // Most recent first, as epmd lists them.
    assert_eq!(text, "name b at port 40011\nname a at port 40010\n");

    let sc2 = start(proxy_config());
    let epmd2 = epmd_addr(&sc2);
    let _c = client::register(epmd2, spec("c", 40012)).await.unwrap();
    let (_, text) = client::names(epmd2).await.unwrap();
    assert_eq!(text, format!("name c at port {}\n", dist_addr(&sc2).port()));
}

#[tokio::test]
async fn dump_kill_and_stop_follow_epmd() {
    let sc = start(test_config());
    let epmd = epmd_addr(&sc);
    let (_a, _) = client::register(epmd, spec("a", 40020)).await.unwrap();

    let dump = raw_exchange(epmd, &[0, 1, b'd']).await;
    assert_eq!(&dump[..4], &u32::from(epmd.port()).to_be_bytes());
    let text = String::from_utf8_lossy(&dump[4..]);
    assert!(
        text.contains("active name     <a> at port 40020"),
        "{text:?}"
    );

    // KILL is refused while nodes are registered.
    assert_eq!(raw_exchange(epmd, &[0, 1, b'k']).await, b"NO");
    // STOP without relaxed_command_check: no reply, node stays.
    assert_eq!(raw_exchange(epmd, &[0, 2, b's', b'a']).await, b"");
    assert!(matches!(
        client::port_please(epmd, "a").await.unwrap(),
        Port2Reply::Found(_)
    ));
    assert!(!sc.shutdown.is_cancelled());
}

#[tokio::test]
async fn relaxed_stop_unregisters_and_closes_the_node_connection_and_kill_shuts_down() {
    let mut c = test_config();
    c.epmd.relaxed_command_check = true;
    let sc = start(c);
    let epmd = epmd_addr(&sc);
    let (mut conn, _) = client::register(epmd, spec("victim", 40030)).await.unwrap();
    assert_eq!(raw_exchange(epmd, b"\x00\x07svictim").await, b"STOPPED");
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(SEC, conn.read(&mut b))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "node connection must be closed by STOP_REQ");
    assert!(matches!(
        client::port_please(epmd, "victim").await.unwrap(),
        Port2Reply::NotFound { .. }
    ));
    // epmd falls through after NOEXIST and sends STOPPED too.
    assert_eq!(
        raw_exchange(epmd, b"\x00\x07snobody").await,
        b"NOEXISTSTOPPED"
    );

    assert_eq!(raw_exchange(epmd, &[0, 1, b'k']).await, b"OK");
    tokio::time::timeout(SEC, sc.shutdown_requested())
        .await
        .unwrap();
}

#[tokio::test]
async fn malformed_requests_close_the_connection_without_disturbing_registrations() {
    let sc = start(test_config());
    let epmd = epmd_addr(&sc);
    let (_keep, _) = client::register(epmd, spec("keeper", 40040)).await.unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zero length", vec![0, 0]),
        ("oversized length", vec![0xff, 0xff, b'z', b'a']),
        ("unknown tag", vec![0, 2, b'Q', b'x']),
        (
            "lying name length",
            vec![
                0, 15, b'x', 0x9c, 0x40, 77, 0, 0, 6, 0, 5, 0, 200, b'a', b'b', 0, 0,
            ],
        ),
        ("empty name lookup", vec![0, 1, b'z']),
        ("nul in name", vec![0, 4, b'z', b'a', 0, b'b']),
        ("invalid utf-8", vec![0, 3, b'z', 0xff, 0xfe]),
        ("http", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
    ];
    for (what, bytes) in cases {
        let reply = raw_exchange(epmd, &bytes).await;
        assert!(
            reply.is_empty(),
            "{what}: expected a silent close, got {reply:?}"
        );
    }
    // Truncated: half a request, then close.
    let mut s = TcpStream::connect(epmd).await.unwrap();
    s.write_all(&[0, 10, b'z', b'k']).await.unwrap();
    drop(s);

    match client::port_please(epmd, "keeper").await.unwrap() {
        Port2Reply::Found(f) => assert_eq!(f.port, 40040),
        other => panic!("registration disturbed: {other:?}"),
    }
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let mut c = test_config();
    c.epmd.idle_timeout_ms = Millis(200);
    let sc = start(c);
    let since = std::time::Instant::now();
    let mut s = TcpStream::connect(epmd_addr(&sc)).await.unwrap();
    s.write_all(&[0]).await.unwrap(); // half a length prefix, then silence
    closed_by_timeout(&mut s, since, Duration::from_millis(200), "idle").await;
}

#[tokio::test]
async fn registration_requires_no_more_bytes_after_the_request() {
    // epmd drops a registration whose connection sends anything further.
    let sc = start(test_config());
    let epmd = epmd_addr(&sc);
    let (mut conn, _) = client::register(epmd, spec("chatty", 40050)).await.unwrap();
    conn.write_all(b"junk").await.unwrap();
    assert!(
        eventually(SEC, || async {
            matches!(
                client::port_please(epmd, "chatty").await,
                Ok(Port2Reply::NotFound { .. })
            )
        })
        .await
    );
}

#[tokio::test]
async fn ipv6_listener_serves_epmd() {
    let mut c = test_config();
    c.epmd.listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
    let sc = start(c);
    let v6 = sc.epmd_addrs[1];
    assert!(v6.is_ipv6());
    let (_conn, r) = client::register(v6, spec("six", 40060)).await.unwrap();
    assert_eq!(r.result, 0);
    // Visible through the IPv4 listener too: one registry.
    assert!(matches!(
        client::port_please(sc.epmd_addrs[0], "six").await.unwrap(),
        Port2Reply::Found(_)
    ));
}

/// The client side of `distproxy epmd -dump/-kill/-stop`: the typed
/// replies of `client::{dump, kill, stop}` against the server.
#[tokio::test]
async fn the_epmd_commands_client_reads_every_reply() {
    let strict = start(test_config());
    let epmd = epmd_addr(&strict);
    let (_conn, _) = client::register(epmd, spec("d1", 40040)).await.unwrap();
    let (port, text) = client::dump(epmd).await.unwrap();
    assert_eq!(port, u32::from(epmd.port()));
    assert!(
        text.contains("active name     <d1> at port 40040"),
        "{text:?}"
    );
    // Each entry NUL-terminated, as epmd sends (and `epmd -dump` prints) it.
    assert!(text.ends_with("fd = -1\n\0"), "{text:?}");
    assert_eq!(
        client::kill(epmd).await.unwrap(),
        client::KillReply::Refused
    );
    // Without relaxed_command_check STOP gets no reply at all.
    assert!(matches!(
        client::stop(epmd, "d1").await,
        Err(client::ClientError::UnexpectedReply { .. })
    ));
    assert!(!strict.shutdown.is_cancelled());

    let mut c = test_config();
    c.epmd.relaxed_command_check = true;
    let relaxed = start(c);
    let epmd = epmd_addr(&relaxed);
    let (_conn, _) = client::register(epmd, spec("d2", 40041)).await.unwrap();
    assert_eq!(
        client::stop(epmd, "d2").await.unwrap(),
        client::StopReply::Stopped
    );
    assert_eq!(
        client::stop(epmd, "d2").await.unwrap(),
        client::StopReply::NoExist
    );
    assert_eq!(client::kill(epmd).await.unwrap(), client::KillReply::Killed);
    assert!(relaxed.shutdown.is_cancelled());
}

/// A pod may run more nodes than `limits.epmd_max_connections_per_source`:
/// every node holds its registration connection from loopback, and OTP's
/// `epmd` has no per-source cap. The cap is for floods from one remote
/// address; local peers are bounded by the totals (and their reserve).
#[tokio::test]
async fn more_local_nodes_than_the_per_source_cap_register_and_are_looked_up() {
    let mut config = test_config();
    config.limits.epmd_max_connections_per_source = 64;
    let per_source = config.limits.epmd_max_connections_per_source;
    let sc = start(config);
    let epmd = epmd_addr(&sc);
    let n = per_source + 36;
    let mut held = Vec::new();
    for i in 0..n {
        let name = format!("n{i}");
        let (c, r) = client::register(epmd, spec(&name, 40100 + i as u16))
            .await
            .unwrap_or_else(|e| panic!("registering node {i} of {n}: {e}"));
        assert_eq!(r.result, 0, "node {i}");
        held.push(c);
    }
    for i in [0, per_source, n - 1] {
        match client::port_please(epmd, &format!("n{i}")).await.unwrap() {
            Port2Reply::Found(f) => assert_eq!(f.port, 40100 + i as u16),
            other => panic!("n{i}: {other:?}"),
        }
    }
    let (_, text) = client::names(epmd).await.unwrap();
    assert_eq!(text.lines().count(), n);
}

/// Connections that send no request (from as many addresses as it takes to
/// pass the per-source cap) fill `limits.epmd_max_connections`: a lookup
/// is still answered, because the oldest connection without a whole
/// request is closed to make room. A registration, whose request is
/// whole, is never closed for room.
#[tokio::test]
async fn idle_connections_that_fill_the_limit_make_room_for_a_lookup() {
    let mut config = test_config();
    config.limits.epmd_max_connections = 4;
    // Loopback is a local peer, which the reserve would let past the total.
    config.limits.reserved_local_connections = 0;
    let sc = start(config);
    let epmd = epmd_addr(&sc);
    let (_reg, r) = client::register(epmd, spec("a", 40100)).await.unwrap();
    assert_eq!(r.result, 0);
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(epmd).await.unwrap());
        // Accepted in order: the first is the oldest.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match client::port_please(epmd, "a").await {
        Ok(Port2Reply::Found(f)) => assert_eq!(f.port, 40100),
        other => panic!("lookup while idle connections fill the limit: {other:?}"),
    }
    let mut buf = [0u8; 8];
    let first = tokio::time::timeout(Duration::from_secs(1), idle[0].read(&mut buf))
        .await
        .expect("the oldest idle connection is still open");
    assert!(matches!(first, Ok(0) | Err(_)), "{first:?}");
    for s in &mut idle[1..] {
        assert!(
            tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf))
                .await
                .is_err(),
            "a newer idle connection was closed too"
        );
    }
    // The registration outlived the evictions (NAMES itself takes a place).
    let (_, text) = client::names(epmd).await.unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("name a at port 40100"), "{text}");
}
