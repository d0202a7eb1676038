//! The admin endpoint over real HTTP, with `/metrics` parsed as Prometheus
//! text by a parser crate and checked against the traffic the test made.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use distproxy_testkit::prelude::*;
use distproxy_testkit::sut::client;
use distproxy_testkit::sut::sidecar::{self, Sidecar};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Parsed samples: (name, sorted labels) → value.
type Samples = HashMap<(String, Vec<(String, String)>), f64>;

/// One recorder per test process (the `metrics` facade is global).
fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let h = distproxy_testkit::sut::metrics::prometheus_builder()
                .unwrap()
                .install_recorder()
                .unwrap();
            distproxy_testkit::sut::metrics::describe();
            h
        })
        .clone()
}

fn start_with_admin(mut config: distproxy_testkit::sut::config::Config) -> Sidecar {
    config.admin.listen = vec!["127.0.0.1:0".parse().unwrap()];
    let listeners = sidecar::bind(&config).unwrap();
    Sidecar::start_with(config, listeners, Some(prometheus()))
}

/// Held shared by most tests of this file, alone by those that must see
/// nothing else happen meanwhile: `histogram_samples_are_folded_without_a_scrape`
/// (no scrape, which folds the samples, and a quiet heap) and exact counts.
static ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Scrapes and parses `/metrics`: (name, sorted labels) → value.
async fn scrape(addr: SocketAddr) -> Samples {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
    let mut out = HashMap::new();
    for s in parsed.samples {
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let mut labels: Vec<(String, String)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.sort();
        out.insert((s.metric, labels), value);
    }
    out
}

/// Admin connections closed to make room for a newer one.
async fn admin_evictions(admin: SocketAddr) -> f64 {
    get(
        &scrape(admin).await,
        "distproxy_connections_refused_total",
        &[("listener", "admin"), ("limit", "evicted")],
    )
}

fn get(m: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    m.get(&(name.to_string(), l)).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_follow_the_traffic() {
    let _shared = ALONE.read().await;
    let sc = start_with_admin(proxy_config());
    let admin = sc.admin_addr.unwrap();
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    let node = FakeNode::start("metrics_node", "127.0.0.1:0").await;
    let other = FakeNode::start("metrics_other", "127.0.0.1:0").await;
    let _r1 = client::register(epmd, spec("metrics_node", node.port))
        .await
        .unwrap();
    let _r2 = client::register(epmd, spec("metrics_other", other.port))
        .await
        .unwrap();

    let before = scrape(admin).await;
    let correlated_before = get(
        &before,
        "distproxy_routes_total",
        &[("method", "correlated")],
    );
    let bad_before = get(
        &before,
        "distproxy_connections_closed_total",
        &[("reason", "bad_frame")],
    );
    let unroutable_before = get(
        &before,
        "distproxy_routes_total",
        &[("method", "unroutable")],
    );

    // One correlated connection carrying a known payload.
    client::port_please(epmd, "metrics_node").await.unwrap();
    let (mut s, answered) = dial_as(dist, "peer@remote").await;
    assert_eq!(answered, "metrics_node@fake.host");
    let payload = vec![7u8; 100_000];
    s.write_all(&payload).await.unwrap();
    let mut echo = vec![0u8; payload.len()];
    s.read_exact(&mut echo).await.unwrap();

    // While open, /nodes shows the connection.
    let (status, nodes) = http_get(admin, "/nodes").await;
    assert_eq!(status, 200);
    let nodes: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    let entry = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "metrics_node")
        .expect("node listed");
    assert_eq!(entry["port"], node.port);
    assert_eq!(entry["open_connections"], 1);
    assert_eq!(entry["highest_version"], 6);

    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    drop(s);

    // A bad first frame and an unroutable connection (two nodes, no lookup).
    let mut bad = TcpStream::connect(dist).await.unwrap();
    bad.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let _ = bad.read_to_end(&mut Vec::new()).await;
    let (mut lost, _) = (TcpStream::connect(dist).await.unwrap(), ());
    let mut frame = bytes::BytesMut::new();
    distproxy_testkit::sut::handshake::encode_send_name(
        &mut frame,
        &distproxy_testkit::sut::handshake::SendName {
            name: "lost@remote".into(),
            flags: 0x000d_07df_7fbd,
            creation: Some(1),
            version: None,
        },
    );
    lost.write_all(&frame).await.unwrap();
    let _ = lost.read_to_end(&mut Vec::new()).await;

    // Counters are updated as the relay ends; poll briefly.
    let mut after = scrape(admin).await;
    for _ in 0..50 {
        let open = get(
            &after,
            "distproxy_dist_connections_open",
            &[("node", "metrics_node"), ("direction", "inbound")],
        );
        if open == 0.0
            && get(
                &after,
                "distproxy_routes_total",
                &[("method", "unroutable")],
            ) > unroutable_before
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = scrape(admin).await;
    }
    assert_eq!(
        get(
            &after,
            "distproxy_routes_total",
            &[("method", "correlated")]
        ),
        correlated_before + 1.0
    );
    assert_eq!(
        get(
            &after,
            "distproxy_routes_total",
            &[("method", "unroutable")]
        ),
        unroutable_before + 1.0
    );
    assert_eq!(
        get(
            &after,
            "distproxy_connections_closed_total",
            &[("reason", "bad_frame")]
        ),
        bad_before + 1.0
    );
    assert_eq!(
        get(
            &after,
            "distproxy_dist_connections_total",
            &[("node", "metrics_node"), ("direction", "inbound")]
        ),
        1.0
    );
    assert_eq!(
        get(
            &after,
            "distproxy_dist_connections_open",
            &[("node", "metrics_node"), ("direction", "inbound")]
        ),
        0.0
    );
    // rx: the replayed send_name frame plus the payload; tx: the node's
    // status and challenge frames plus the echo.
    let send_name_len = frame.len() as f64;
    assert_eq!(
        get(
            &after,
            "distproxy_relayed_bytes_total",
            &[("node", "metrics_node"), ("direction", "rx")]
        ),
        send_name_len + payload.len() as f64
    );
    let tx = get(
        &after,
        "distproxy_relayed_bytes_total",
        &[("node", "metrics_node"), ("direction", "tx")],
    );
    assert!(
        tx > payload.len() as f64 && tx < payload.len() as f64 + 200.0,
        "tx {tx}"
    );
    assert!(
        get(
            &after,
            "distproxy_epmd_requests_total",
            &[("type", "port_please2"), ("result", "proxied")]
        ) >= 1.0
    );
    assert_eq!(get(&after, "distproxy_misroutes_total", &[]), 0.0);
    assert_eq!(
        get(
            &after,
            "distproxy_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // Histograms are exported with their buckets.
    let (_, text) = http_get(admin, "/metrics").await;
    assert!(text.contains("distproxy_handshake_phase_seconds_bucket{phase=\"first_frame\""));
    assert!(text.contains("# HELP distproxy_routes_total"));
}

#[tokio::test]
async fn health_readiness_and_unknown_paths() {
    let _shared = ALONE.read().await;
    let mut cfg = proxy_config();
    cfg.admin.ready_nodes = vec!["needed".into()];
    let sc = start_with_admin(cfg);
    let admin = sc.admin_addr.unwrap();
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("needed"), "{body}");
    let node = FakeNode::start("needed", "127.0.0.1:0").await;
    let _r = client::register(epmd_addr(&sc), spec("needed", node.port))
        .await
        .unwrap();
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    assert_eq!(http_get(admin, "/nope").await.0, 404);

    // Not ready once shutdown starts (Kubernetes stops routing to us).
    sc.shutdown.cancel();
    assert_eq!(http_get(admin, "/readyz").await.0, 503);

    // Garbage is answered 400, not a hang or a crash.
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"\x00\x01\x02\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
}

/// Connections that never finish their request (a slowloris, from as many
/// addresses as it takes to pass the per-source cap) fill the admin limit:
/// a probe still gets its answer, because the oldest connection without a
/// complete request is closed to make room, and counted.
#[tokio::test]
async fn a_probe_is_answered_while_unfinished_requests_fill_the_limit() {
    let _shared = ALONE.read().await;
    let mut cfg = proxy_config();
    cfg.limits.admin_max_connections = 4;
    cfg.limits.reserved_local_connections = 0;
    let sc = start_with_admin(cfg);
    let admin = sc.admin_addr.unwrap();
    let before = admin_evictions(admin).await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(admin).await.unwrap();
        s.write_all(b"GET /he").await.unwrap();
        stalled.push(s);
    }
    // Every slot is held once the server has taken the four.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(2), http_get(admin, "/healthz"))
        .await
        .expect("the probe waited for a slowloris to time out");
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "the probe was refused"
    );
    // The oldest stalled connection made room: closed without a response;
    // the others are still open.
    distproxy_testkit::peer::assert_only_the_oldest_was_evicted(&mut stalled).await;
    let after = admin_evictions(admin).await;
    assert!(
        after >= before + 1.0,
        "evictions counted: {before} -> {after}"
    );
}

/// `distproxy_lookups_waiting` shows a lookup held behind another node's
/// pending answer while it waits, and drops back when it is answered.
#[tokio::test]
async fn a_held_lookup_is_in_the_waiting_gauge_until_answered() {
    let _shared = ALONE.read().await;
    let sc = start_with_admin(proxy_config());
    let admin = sc.admin_addr.unwrap();
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    let a = FakeNode::start("waiting_a", "127.0.0.1:0").await;
    let b = FakeNode::start("waiting_b", "127.0.0.1:0").await;
    let _ra = client::register(epmd, spec("waiting_a", a.port))
        .await
        .unwrap();
    let _rb = client::register(epmd, spec("waiting_b", b.port))
        .await
        .unwrap();
    let waiting = |m: &Samples| get(m, "distproxy_lookups_waiting", &[]);
    assert!(
        scrape(admin)
            .await
            .contains_key(&("distproxy_lookups_waiting".to_string(), vec![])),
        "the gauge is exported before any lookup"
    );

    client::port_please(epmd, "waiting_a").await.unwrap();
    // From the same peer, a lookup of another node waits for a's connection.
    let held = tokio::spawn(async move { client::port_please(epmd, "waiting_b").await });
    let mut seen = 0.0;
    for _ in 0..100 {
        seen = waiting(&scrape(admin).await);
        if seen >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen >= 1.0, "held lookup not in the gauge: {seen}");
    assert!(!held.is_finished(), "the lookup of b was not held");

    let (_sa, answered) = dial_as(dist, "peer@remote").await;
    assert_eq!(answered, "waiting_a@fake.host");
    held.await.unwrap().unwrap();
    let mut left = seen;
    for _ in 0..100 {
        left = waiting(&scrape(admin).await);
        if left == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left, 0.0, "an answered lookup is still counted as waiting");
}

/// A node that left (unregistered, its connection closed) keeps its
/// node-labelled series for `admin.node_series_retention_ms`, so a scrape
/// sees its final counts, and then they are gone: a pod whose nodes come
/// and go under new names does not export every name it ever saw. A node
/// still registered keeps its series however long it stays idle.
#[tokio::test]
async fn a_node_that_left_has_its_series_dropped_after_the_retention() {
    let _shared = ALONE.read().await;
    // Long enough that the scrapes before and just after the node leaves
    // fall inside it on a loaded machine.
    const RETENTION_MS: u64 = 3_000;
    let mut config = proxy_config();
    config.admin.node_series_retention_ms = distproxy_testkit::sut::config::Millis(RETENTION_MS);
    let sc = start_with_admin(config);
    let admin = sc.admin_addr.unwrap();
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    let node = FakeNode::start("leaving_node", "127.0.0.1:0").await;
    let registration = client::register(epmd, spec("leaving_node", node.port))
        .await
        .unwrap();
    client::port_please(epmd, "leaving_node").await.unwrap();
    let (mut s, answered) = dial_as(dist, "peer@remote").await;
    assert_eq!(answered, "leaving_node@fake.host");
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = s.read_to_end(&mut Vec::new()).await;
    drop(s);

    let series = |m: &Samples| {
        let mut found: Vec<String> = m
            .keys()
            .filter(|(_, labels)| {
                labels
                    .iter()
                    .any(|(k, v)| k == "node" && v == "leaving_node")
            })
            .map(|(name, labels)| format!("{name}{labels:?}"))
            .collect();
        found.sort();
        found
    };
    // Registered: kept past the retention, idle.
    tokio::time::sleep(Duration::from_millis(RETENTION_MS + 500)).await;
    let registered = scrape(admin).await;
    assert_eq!(
        series(&registered).len(),
        4,
        "open, total, rx, tx: {:?}",
        series(&registered)
    );
    assert_eq!(
        get(
            &registered,
            "distproxy_dist_connections_total",
            &[("node", "leaving_node"), ("direction", "inbound")]
        ),
        1.0
    );

    // Gone: still there at once, with its final counts...
    drop(registration);
    assert!(
        eventually(Duration::from_secs(2), || async {
            sc.registry.get("leaving_node").is_none()
        })
        .await
    );
    let just_left = scrape(admin).await;
    assert_eq!(series(&just_left), series(&registered));
    assert!(
        get(
            &just_left,
            "distproxy_relayed_bytes_total",
            &[("node", "leaving_node"), ("direction", "tx")]
        ) >= 4.0
    );
    // ...and dropped once the retention has passed.
    assert!(
        eventually(Duration::from_millis(RETENTION_MS + 5_000), || async {
            series(&scrape(admin).await).is_empty()
        })
        .await,
        "still exported: {:?}",
        series(&scrape(admin).await)
    );
}

/// Bytes the allocator has handed out and not got back (every arena).
fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2() }.uordblks
}

/// The exporter keeps every histogram sample recorded since its last
/// render until something folds them into their buckets: a sidecar nobody
/// scrapes (no Prometheus, or `admin.listen` off) grew by about 8 bytes per
/// handshake phase and held lookup for as long as it ran. The sidecar folds
/// them itself every `UPKEEP_INTERVAL`.
#[tokio::test(flavor = "multi_thread")]
async fn histogram_samples_are_folded_without_a_scrape() {
    const SAMPLES: usize = 1_000_000;
    let handle = prometheus();
    let config = proxy_config(); // no admin endpoint: nothing scrapes it
    let listeners = sidecar::bind(&config).unwrap();
    let _sc = Sidecar::start_with(config, listeners, Some(handle));
    // No other test of this file renders /metrics or allocates meanwhile.
    let _alone = ALONE.write().await;
    let phase = metrics::histogram!(
        distproxy_testkit::sut::metrics::HANDSHAKE_PHASE_SECONDS,
        "phase" => "upkeep_test"
    );
    // Kept, they take about 16 bytes each (16 MB); folded, nothing.
    let before = heap_in_use();
    for _ in 0..SAMPLES {
        phase.record(0.001);
    }
    let recorded = heap_in_use();
    let deadline =
        tokio::time::Instant::now() + distproxy_testkit::sut::metrics::UPKEEP_INTERVAL * 3;
    let mut now = recorded;
    while tokio::time::Instant::now() < deadline {
        // A sample now and then lets the folded blocks' deferred frees run.
        phase.record(0.001);
        now = heap_in_use();
        if now < before + SAMPLES * 4 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "samples not folded without a scrape: heap {before} -> {recorded} after recording, {now} after {:?}",
        distproxy_testkit::sut::metrics::UPKEEP_INTERVAL * 3
    );
}

/// Connections that send a whole request and never read its answer (one
/// larger than the socket buffers), from as many addresses as it takes to
/// pass the per-source cap, held every admin place until
/// `limits.write_timeout_ms`: the kubelet's liveness probe was refused at
/// accept for as long as they kept coming, and the sidecar restarted. Such
/// a connection now makes room for a new one as one still sending its
/// request does.
#[tokio::test]
async fn a_probe_is_answered_while_unread_responses_fill_the_limit() {
    let _shared = ALONE.read().await;
    let mut cfg = proxy_config();
    cfg.limits.admin_max_connections = 4;
    cfg.limits.reserved_local_connections = 0;
    cfg.limits.write_timeout_ms = distproxy_testkit::sut::config::Millis(60_000);
    cfg.limits.max_registered_nodes = NODES.into();
    cfg.limits.epmd_max_connections = usize::from(NODES) + 64;
    let sc = start_with_admin(cfg);
    let admin = sc.admin_addr.unwrap();
    let epmd = epmd_addr(&sc);
    // A /nodes answer of about 4 MB, more than the socket buffers of a
    // peer that does not read take (on loopback, whose large segments let
    // the send buffer grow past a megabyte).
    const NODES: u16 = 6000;
    let mut registrations = Vec::new();
    for i in 0..NODES {
        let name = format!("{}{i}", "unread_response_node_".repeat(10));
        registrations.push(
            client::register(epmd, spec(&name, 20_000 + (i % 1000)))
                .await
                .unwrap(),
        );
    }
    let before = admin_evictions(admin).await;
    let mut unread = Vec::new();
    for _ in 0..4 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(1).unwrap();
        let mut s = socket.connect(admin).await.unwrap();
        s.write_all(b"GET /nodes HTTP/1.1\r\n\r\n").await.unwrap();
        unread.push(s);
    }
    // Every place is taken once the server is stuck writing the four.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probe = async {
        let mut s = TcpStream::connect(admin).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let answer = tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .expect("the probe waited for a response nobody reads");
    assert!(
        matches!(&answer, Ok(out) if out.starts_with("HTTP/1.1 200") && out.ends_with("\r\n\r\nok\n")),
        "the probe was refused: {answer:?}"
    );
    let after = admin_evictions(admin).await;
    assert!(
        after >= before + 1.0,
        "evictions counted: {before} -> {after}"
    );
}

/// A node that does not accept within `dist.connect_timeout_ms` (its
/// accept queue full, a hung node) is a connection to the node that
/// failed: counted as `connect_failed`, as operations.md says ("timed out
/// connecting to node"), not as `timeout`, the peer's own slowness.
#[tokio::test]
async fn a_node_that_does_not_accept_in_time_counts_as_connect_failed() {
    // Exact counts: no other test's connections meanwhile.
    let _alone = ALONE.write().await;
    let mut cfg = proxy_config();
    cfg.dist.connect_timeout_ms = distproxy_testkit::sut::config::Millis(300);
    let sc = start_with_admin(cfg);
    let admin = sc.admin_addr.unwrap();
    let (epmd, dist) = (epmd_addr(&sc), dist_addr(&sc));
    // A "node" that never accepts: once its accept queue is full, the
    // kernel drops further SYNs.
    let hung = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hung.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    hung.listen(0).unwrap();
    let hung_addr = hung.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    while let Ok(Ok(s)) =
        tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(hung_addr)).await
    {
        queued.push(s);
        assert!(queued.len() < 64, "the accept queue never filled");
    }
    let _r = client::register(epmd, spec("hung_node", hung_addr.port()))
        .await
        .unwrap();
    let closed =
        |m: &Samples, why: &str| get(m, "distproxy_connections_closed_total", &[("reason", why)]);
    let before = scrape(admin).await;
    client::port_please(epmd, "hung_node").await.unwrap();
    let mut s = TcpStream::connect(dist).await.unwrap();
    s.write_all(&distproxy_testkit::frames::send_name("peer@remote"))
        .await
        .unwrap();
    assert!(
        distproxy_testkit::peer::closed_without_reply(&mut s).await,
        "relayed to a node that never accepted"
    );
    let after = scrape(admin).await;
    assert_eq!(
        closed(&after, "connect_failed") - closed(&before, "connect_failed"),
        1.0,
        "not counted as connect_failed"
    );
    assert_eq!(
        closed(&after, "timeout"),
        closed(&before, "timeout"),
        "counted as the peer's timeout"
    );
}
