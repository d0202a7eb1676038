//! The sidecar ↔ sidecar tunnel in process: two sidecars on 127.0.0.1 with
//! different ports, fake nodes behind the "remote" one, egress requests to
//! the "local" one, and connections made as a BEAM would make them. Also the
//! Erlang helper module, compiled with `erlc +warnings_as_errors` and run
//! against a sidecar.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use distproxy_testkit::prelude::*;
use distproxy_testkit::sut::config::Config;
use distproxy_testkit::sut::handshake;
use distproxy_testkit::sut::preamble::Preamble;
use distproxy_testkit::sut::proto;
use distproxy_testkit::sut::sidecar::Sidecar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long the test's sidecar remembers that no sidecar answered on a host
/// (`tunnel.probe_failure_ttl_ms`, 5 s by default): short, so the test
/// waits it out quickly, and long enough to see it hold.
const NO_SIDECAR_TTL: Duration = Duration::from_millis(800);

/// The in-process test configuration, without the admin endpoint (several
/// sidecars run in one process).
fn config() -> Config {
    let mut c = test_config();
    c.admin.listen = Vec::new();
    c
}

/// A remote pod (sidecar and fake nodes `names`, all registered) and a local
/// sidecar whose tunnel dials the remote one.
struct Pair {
    remote: Sidecar,
    local: Sidecar,
    _nodes: FakePod,
}

async fn pair(names: &[&str], tweak: impl FnOnce(&mut Config)) -> Pair {
    let remote = start(config());
    let nodes = FakePod::start(epmd_addr(&remote), names).await;
    let mut config = config();
    config.tunnel.remote_port = dist_addr(&remote).port();
    tweak(&mut config);
    let local = start(config);
    Pair {
        remote,
        local,
        _nodes: nodes,
    }
}

#[tokio::test]
async fn egress_reaches_the_named_node_exactly_without_any_lookup() {
    let p = pair(&["b", "c", "d"], |_| {}).await;
    let local_epmd = epmd_addr(&p.local);
    // Three nodes are registered on the remote side and nobody looked any of
    // them up: correlation could not route these connections; only the
    // preamble can.
    for target in ["c", "b", "d", "d", "b", "c"] {
        let port = egress_port(local_epmd, &format!("{target}@127.0.0.1")).await;
        let (mut s, answered) = dial_as(loopback(port), "a1@pod-a").await;
        assert_eq!(answered, format!("{target}@fake.host"), "wrong node");
        s.write_all(b"after-handshake").await.unwrap();
        let mut back = [0u8; 15];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"after-handshake");
    }
    assert!(
        p.remote
            .correlator
            .pending("127.0.0.1".parse().unwrap())
            .is_empty(),
        "the tunnel must not use lookup correlation"
    );
}

/// An egress port listens on IPv6 loopback too, with the same number, for
/// nodes of `-proto_dist inet6_tcp` (whose `distproxy_epmd` answers `::1`):
/// a connection to `[::1]:port` reaches the named node exactly as one to
/// `127.0.0.1:port` does. (On a host without IPv6 loopback the port is
/// IPv4 only, which this test then checks instead.)
#[tokio::test]
async fn an_egress_port_listens_on_both_loopbacks_with_one_number() {
    let has_ipv6_loopback = std::net::TcpListener::bind("[::1]:0").is_ok();
    let p = pair(&["b", "c"], |_| {}).await;
    let local_epmd = epmd_addr(&p.local);
    for target in ["b", "c", "b"] {
        let port = egress_port(local_epmd, &format!("{target}@127.0.0.1")).await;
        let (_s, answered) = dial_as(loopback(port), "a1@pod-a").await;
        assert_eq!(answered, format!("{target}@fake.host"), "over 127.0.0.1");
        let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
        if has_ipv6_loopback {
            let (mut s, answered) = dial_as(v6, "a6@pod-a").await;
            assert_eq!(answered, format!("{target}@fake.host"), "over ::1");
            s.write_all(b"after-handshake").await.unwrap();
            let mut back = [0u8; 15];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"after-handshake");
        } else {
            eprintln!("no IPv6 loopback on this host: checking the port is IPv4 only");
            assert!(TcpStream::connect(v6).await.is_err());
        }
    }
    assert_eq!(p.local.egress.len(), 2, "one egress port per remote node");
}

#[tokio::test]
async fn one_egress_port_per_remote_node_reused_and_used_concurrently() {
    let p = pair(&["b", "c"], |_| {}).await;
    let local_epmd = epmd_addr(&p.local);
    let pb = egress_port(local_epmd, "b@127.0.0.1").await;
    let pc = egress_port(local_epmd, "c@127.0.0.1").await;
    assert_ne!(pb, pc);
    assert_eq!(egress_port(local_epmd, "b@127.0.0.1").await, pb);
    assert_eq!(p.local.egress.len(), 2);
    assert_eq!(p.local.egress.port_of("c@127.0.0.1"), Some(pc));

    // Twenty connections at once, alternating targets, from distinct
    // initiators.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (port, want) = if i % 2 == 0 { (pb, "b") } else { (pc, "c") };
        tasks.push(tokio::spawn(async move {
            let (mut s, answered) = dial_as(loopback(port), &format!("i{i}@pod-a")).await;
            assert_eq!(answered, format!("{want}@fake.host"));
            let msg = format!("payload {i}");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg.as_bytes());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn unknown_target_is_closed_cleanly() {
    let p = pair(&["b", "c"], |_| {}).await;
    let port = egress_port(epmd_addr(&p.local), "zz@127.0.0.1").await;
    let mut s = TcpStream::connect(loopback(port)).await.unwrap();
    s.write_all(&frames::send_name("a1@pod-a")).await.unwrap();
    assert!(closed_without_reply(&mut s).await);
    // The other nodes are still reachable.
    let port = egress_port(epmd_addr(&p.local), "b@127.0.0.1").await;
    let (_s, answered) = dial_as(loopback(port), "a1@pod-a").await;
    assert_eq!(answered, "b@fake.host");
}

#[tokio::test]
async fn inbound_preamble_routes_by_name_and_checks_the_initiator() {
    let p = pair(&["b", "c"], |_| {}).await;
    let dist = dist_addr(&p.remote);

    // Matching preamble and send_name: routed to c.
    let mut s = TcpStream::connect(dist).await.unwrap();
    let mut out = BytesMut::new();
    Preamble::new("c@pod-r", "x@pod-a")
        .unwrap()
        .encode(&mut out);
    s.write_all(&out).await.unwrap();
    // The send_name may come in a later segment.
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(&frames::send_name("x@pod-a")).await.unwrap();
    let mut buf = BytesMut::new();
    let challenge = loop {
        assert!(s.read_buf(&mut buf).await.unwrap() > 0, "closed");
        if let Ok(Some((_, n))) = handshake::parse_status(&buf) {
            if let Ok(Some((c, _))) = handshake::parse_challenge(&buf[n..]) {
                break c;
            }
        }
    };
    assert_eq!(challenge.name, "c@fake.host");

    // A send_name naming someone else than the preamble: closed.
    let mut s = TcpStream::connect(dist).await.unwrap();
    let mut out = BytesMut::new();
    Preamble::new("c@pod-r", "x@pod-a")
        .unwrap()
        .encode(&mut out);
    out.extend_from_slice(&frames::send_name("y@pod-a"));
    s.write_all(&out).await.unwrap();
    assert!(closed_without_reply(&mut s).await);

    // A preamble of an unknown version: closed.
    let mut s = TcpStream::connect(dist).await.unwrap();
    s.write_all(b"DPX\x09\x00\x00").await.unwrap();
    assert!(closed_without_reply(&mut s).await);

    // A raw handshake still goes through correlation: with two nodes and no
    // lookup it is unroutable.
    let mut s = TcpStream::connect(dist).await.unwrap();
    s.write_all(&frames::send_name("x@pod-a")).await.unwrap();
    assert!(closed_without_reply(&mut s).await);

    // TLS is not wired in yet: a ClientHello is closed.
    let mut s = TcpStream::connect(dist).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 0, 0, 1, 0])
        .await
        .unwrap();
    assert!(closed_without_reply(&mut s).await);
}

#[tokio::test]
async fn a_silent_preamble_connection_times_out() {
    let mut config = config();
    config.tunnel.preamble_timeout_ms = Millis(200);
    let sc = start(config);
    let since = std::time::Instant::now();
    let mut s = TcpStream::connect(dist_addr(&sc)).await.unwrap();
    s.write_all(b"DPX\x01").await.unwrap();
    closed_by_timeout(&mut s, since, Duration::from_millis(200), "silent preamble").await;
}

/// The preamble and the `send_name` after it are due by deadlines from the
/// accept, not by a fresh wait for each step: a peer that sends its first
/// byte just before the first-byte deadline, then trickles the preamble, or
/// sends the preamble and then trickles the `send_name`, is closed
/// `max(preamble, handshake)` after it connected. It was closed only after
/// the first-byte wait plus each step's full timeout (up to 3 times as long).
#[tokio::test]
async fn a_trickled_preamble_or_send_name_is_closed_at_the_deadline_from_accept() {
    const TIMEOUT: Duration = Duration::from_millis(1000);
    let mut config = config();
    config.tunnel.preamble_timeout_ms = Millis(TIMEOUT.as_millis() as u64);
    config.dist.handshake_timeout_ms = Millis(TIMEOUT.as_millis() as u64);
    let sc = start(config);
    let _pod = FakePod::start(epmd_addr(&sc), &["b"]).await;
    let dist = dist_addr(&sc);
    let mut preamble = BytesMut::new();
    Preamble::new("b@pod-r", "x@pod-a")
        .unwrap()
        .encode(&mut preamble);
    let send_name = frames::send_name("x@pod-a").to_vec();
    // (bytes sent at once after the first-byte wait, bytes trickled)
    let cases = [
        (
            "trickled preamble",
            preamble[..1].to_vec(),
            [&preamble[1..], &send_name[..]].concat(),
        ),
        ("trickled send_name", preamble.to_vec(), send_name.clone()),
    ];
    for (what, at_once, trickled) in cases {
        let since = std::time::Instant::now();
        let s = TcpStream::connect(dist).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(TIMEOUT - Duration::from_millis(100)).await;
            if wr.write_all(&at_once).await.is_err() {
                return;
            }
            for b in trickled {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if wr.write_all(&[b]).await.is_err() {
                    return;
                }
            }
        });
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut got)).await;
        let closed_after = since.elapsed();
        writer.abort();
        assert!(got.is_empty(), "{what}: got {got:?}");
        assert!(
            closed_after >= TIMEOUT - Duration::from_millis(50)
                && closed_after < TIMEOUT + Duration::from_millis(500),
            "{what}: closed after {closed_after:?}, deadline {TIMEOUT:?} from accept"
        );
    }
}

#[tokio::test]
async fn egress_listener_closes_when_idle_and_reopens_on_request() {
    let p = pair(&["b", "c"], |c| {
        c.tunnel.egress_idle_timeout_ms = Millis(300)
    })
    .await;
    let local_epmd = epmd_addr(&p.local);
    let port = egress_port(local_epmd, "b@127.0.0.1").await;

    // An open connection keeps the listener, however long it lasts.
    let (mut s, _) = dial_as(loopback(port), "a1@pod-a").await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(p.local.egress.port_of("b@127.0.0.1"), Some(port));
    s.write_all(b"still").await.unwrap();
    let mut back = [0u8; 5];
    s.read_exact(&mut back).await.unwrap();
    drop(s);

    // Idle: closed, and the port refuses connections.
    let egress = &p.local.egress;
    assert!(
        eventually(Duration::from_secs(3), || async { egress.is_empty() }).await,
        "egress listener still open"
    );
    assert!(TcpStream::connect(loopback(port)).await.is_err());

    // The next request opens a new listener that works.
    let port = egress_port(local_epmd, "b@127.0.0.1").await;
    let (_s, answered) = dial_as(loopback(port), "a1@pod-a").await;
    assert_eq!(answered, "b@fake.host");
}

#[tokio::test]
async fn egress_request_errors_have_result_codes() {
    let p = pair(&["b"], |c| c.tunnel.max_egress_listeners = 1).await;
    let epmd = epmd_addr(&p.local);
    for bad in ["nohost", "@h", "b@"] {
        let r = egress(epmd, bad).await;
        assert_eq!(
            (r.result, r.port, r.version),
            (proto::EGRESS_BAD_NAME, 0, 0),
            "{bad}"
        );
    }
    egress_port(epmd, "b@127.0.0.1").await;
    let r = egress(epmd, "c@127.0.0.1").await;
    assert_eq!(r.result, proto::EGRESS_UNAVAILABLE);
    // The one that exists is still handed out.
    egress_port(epmd, "b@127.0.0.1").await;

    let mut config = config();
    config.tunnel.egress = false;
    let off = start(config);
    let r = egress(epmd_addr(&off), "b@127.0.0.1").await;
    assert_eq!(r.result, proto::EGRESS_REFUSED);
    assert!(off.egress.is_empty());
}

/// At `tunnel.max_egress_listeners`, a request for another remote node
/// closes the least recently used listener that has no connection and has
/// not been used for 10 s, instead of being refused until it idles out
/// (60 s by default). A listener carrying a connection, or used within the
/// helper module's cache time, is never taken.
#[tokio::test]
async fn at_the_listener_limit_an_unused_listener_makes_room() {
    let p = pair(&["b", "c", "d"], |c| c.tunnel.max_egress_listeners = 2).await;
    let epmd = epmd_addr(&p.local);
    let listeners = &p.local.egress;
    let port_b = egress_port(epmd, "b@127.0.0.1").await;
    let (mut busy, answered) = dial_as(loopback(port_b), "a1@pod-a").await;
    assert_eq!(answered, "b@fake.host");
    let port_c = egress_port(epmd, "c@127.0.0.1").await;
    // c was just handed out (a node may be connecting), b is in use.
    let r = egress(epmd, "d@127.0.0.1").await;
    assert_eq!(
        r.result,
        proto::EGRESS_UNAVAILABLE,
        "a fresh listener was taken"
    );

    tokio::time::sleep(Duration::from_millis(10_300)).await;
    let port_d = egress_port(epmd, "d@127.0.0.1").await;
    let (_sd, answered) = dial_as(loopback(port_d), "a1@pod-a").await;
    assert_eq!(answered, "d@fake.host");
    assert_eq!(listeners.port_of("c@127.0.0.1"), None, "c was not evicted");
    assert_eq!(
        listeners.port_of("b@127.0.0.1"),
        Some(port_b),
        "b is in use"
    );
    assert_eq!(listeners.len(), 2);
    assert!(
        eventually(Duration::from_secs(2), || async {
            TcpStream::connect(loopback(port_c)).await.is_err()
        })
        .await,
        "the evicted listener still accepts"
    );
    // The connection through b was not disturbed.
    busy.write_all(b"still").await.unwrap();
    let mut back = [0u8; 5];
    busy.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still");
}

#[tokio::test]
async fn unreachable_remote_closes_the_local_connection() {
    // Nothing listens on the remote port.
    let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_port = unused.local_addr().unwrap().port();
    drop(unused);
    let mut config = config();
    config.tunnel.remote_port = dead_port;
    config.tunnel.probe_remote = false;
    let sc = start(config);
    // (Resolution failures are exercised in the e2e suite, whose pods have
    // no reachable name server: a test here must not query this machine's.)
    let port = egress_port(epmd_addr(&sc), "b@127.0.0.1").await;
    let mut s = TcpStream::connect(loopback(port)).await.unwrap();
    s.write_all(&frames::send_name("a1@pod-a")).await.unwrap();
    assert!(closed_without_reply(&mut s).await);
}

/// With `probe_remote` (the default), a remote host where no sidecar answers
/// gets "no remote sidecar" so the node falls back to a direct connection;
/// once a sidecar answers there (and the negative answer has expired), the
/// egress port is handed out.
#[tokio::test]
async fn egress_is_refused_for_a_host_without_sidecar_so_the_node_falls_back() {
    let spare = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let remote_port = spare.local_addr().unwrap().port();
    drop(spare);
    let mut config = config();
    config.tunnel.remote_port = remote_port;
    config.tunnel.probe_failure_ttl_ms = Millis(NO_SIDECAR_TTL.as_millis() as u64);
    let sc = start(config);
    let since = std::time::Instant::now();
    let r = egress(epmd_addr(&sc), "b@127.0.0.1").await;
    assert_eq!(r.result, proto::EGRESS_NO_REMOTE_SIDECAR, "{r:?}");
    assert_eq!(r.port, 0);
    // Remembered for a while: no new probe, same answer, until the answer
    // expires (`tunnel.probe_failure_ttl_ms`): polled, and not sooner.
    let remote = TcpListener::bind(("127.0.0.1", remote_port)).await.unwrap();
    let r = egress(epmd_addr(&sc), "b@127.0.0.1").await;
    assert_eq!(r.result, proto::EGRESS_NO_REMOTE_SIDECAR, "{r:?}");
    let deadline = since + 3 * NO_SIDECAR_TTL;
    let granted = loop {
        let r = egress(epmd_addr(&sc), "b@127.0.0.1").await;
        if r.result != proto::EGRESS_NO_REMOTE_SIDECAR {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the negative answer never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        since.elapsed() >= NO_SIDECAR_TTL,
        "the negative answer expired after {:?}, before {NO_SIDECAR_TTL:?}",
        since.elapsed()
    );
    let port = granted_port("b@127.0.0.1", &granted);
    assert_ne!(port, remote_port);
    // The probe connected and closed without sending a byte.
    let (mut probe, _) = remote.accept().await.unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(probe.read(&mut buf).await.unwrap(), 0);
}

// ---------------------------------------------------------------------------
// The Erlang helper module.

const MODULE_SRC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/erlang/distproxy_epmd.erl"
);

/// The opt-out for tests that need OTP, shared with the e2e suite.
const SKIP_VAR: &str = "DISTPROXY_SKIP_E2E";

/// True when `erl`/`erlc` can be run; panics with the reason otherwise,
/// unless `DISTPROXY_SKIP_E2E=1`.
fn otp_available(test: &str) -> bool {
    let found = |tool: &str| {
        std::process::Command::new(tool)
            .arg("-version")
            .stdin(std::process::Stdio::null())
            .output()
            .is_ok()
    };
    let missing: Vec<&str> = ["erlc", "erl"].into_iter().filter(|t| !found(t)).collect();
    if std::env::var(SKIP_VAR).as_deref() == Ok("1") {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {SKIP_VAR}=1");
        return false;
    }
    assert!(
        missing.is_empty(),
        "{test} needs OTP (Debian package erlang-nox); missing: {missing:?}. \
         Set {SKIP_VAR}=1 to skip tests that need OTP explicitly."
    );
    true
}

/// Compiles the module with warnings as errors into a fresh directory.
fn compile_module() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("erlc")
        .args(["+warnings_as_errors", "-o"])
        .arg(dir.path())
        .arg(MODULE_SRC)
        .output()
        .expect("run erlc");
    assert!(
        out.status.success(),
        "erlc +warnings_as_errors {MODULE_SRC} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let beam = dir.path().join("distproxy_epmd.beam");
    assert!(beam.is_file());
    let ebin = dir.path().to_path_buf();
    (dir, ebin)
}

/// Runs `expr` (an Erlang expression) in a fresh `erl` with the module on
/// the path and `ERL_EPMD_PORT=epmd_port`; returns what it printed.
async fn erl_eval(ebin: &Path, epmd_port: u16, expr: &str) -> String {
    let eval = format!("io:format(\"~0p~n\", [{expr}]), halt().");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("erl")
            .args(["-noshell", "-start_epmd", "false", "-pa"])
            .arg(ebin)
            .args(["-eval", &eval])
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            .env_remove("ERL_FLAGS")
            .env_remove("ERL_AFLAGS")
            .env_remove("ERL_ZFLAGS")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("erl did not finish within 60 s")
    .expect("run erl");
    assert!(
        out.status.success(),
        "erl -eval {expr} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn erlang_module_compiles_without_warnings() {
    if !otp_available("erlang_module_compiles_without_warnings") {
        return;
    }
    let (_dir, ebin) = compile_module();
    // It exports the erl_epmd callbacks of OTP 25.
    let exports = std::process::Command::new("erl")
        .args(["-noshell", "-pa"])
        .arg(&ebin)
        .args([
            "-eval",
            "io:format(\"~0p~n\", [lists:sort(distproxy_epmd:module_info(exports))]), halt().",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&exports.stdout);
    for f in [
        "{start_link,0}",
        "{register_node,2}",
        "{register_node,3}",
        "{port_please,2}",
        "{port_please,3}",
        "{listen_port_please,2}",
        "{address_please,3}",
        "{names,0}",
        "{names,1}",
    ] {
        assert!(text.contains(f), "{f} not exported: {text}");
    }
}

#[tokio::test]
async fn erlang_module_asks_the_sidecar_and_falls_back_without_one() {
    if !otp_available("erlang_module_asks_the_sidecar_and_falls_back_without_one") {
        return;
    }
    let (_dir, ebin) = compile_module();
    let p = pair(&["b"], |_| {}).await;
    let local_epmd = epmd_addr(&p.local).port();

    // With the sidecar: the egress port, on loopback, version 6.
    let got = erl_eval(
        &ebin,
        local_epmd,
        "distproxy_epmd:address_please(\"b\", \"127.0.0.1\", inet)",
    )
    .await;
    let port = p
        .local
        .egress
        .port_of("b@127.0.0.1")
        .expect("the module's request opened an egress listener");
    assert_eq!(got, format!("{{ok,{{127,0,0,1}},{port},6}}"));
    // An IP tuple host and an atom name are formatted as OTP would.
    let got = erl_eval(
        &ebin,
        local_epmd,
        "distproxy_epmd:address_please(b, {127,0,0,1}, inet)",
    )
    .await;
    assert_eq!(got, format!("{{ok,{{127,0,0,1}},{port},6}}"));
    // The port leads to the node.
    let (_s, answered) = dial_as(loopback(port), "a1@pod-a").await;
    assert_eq!(answered, "b@fake.host");

    // inet6 distribution is not tunnelled: stock behaviour.
    let got = erl_eval(
        &ebin,
        local_epmd,
        "distproxy_epmd:address_please(\"b\", \"::1\", inet6)",
    )
    .await;
    assert_eq!(got, "{ok,{0,0,0,0,0,0,0,1}}");

    // Egress switched off: refused, so erl_epmd's answer (the address only).
    let mut config = config();
    config.tunnel.egress = false;
    let off = start(config);
    let got = erl_eval(
        &ebin,
        epmd_addr(&off).port(),
        "distproxy_epmd:address_please(\"b\", \"127.0.0.1\", inet)",
    )
    .await;
    assert_eq!(got, "{ok,{127,0,0,1}}");
    let got = erl_eval(
        &ebin,
        epmd_addr(&off).port(),
        "distproxy_epmd:egress_port(\"b\", \"127.0.0.1\")",
    )
    .await;
    assert_eq!(got, "{error,{refused,1}}");

    // A stock epmd closes the connection on the unknown request: fallback.
    let stock = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stock_port = stock.local_addr().unwrap().port();
    let stock_task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = stock.accept().await else {
                return;
            };
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            // epmd_srv.c: "Incorrect request" -> close.
        }
    });
    let got = erl_eval(
        &ebin,
        stock_port,
        "distproxy_epmd:egress_port(\"b\", \"127.0.0.1\")",
    )
    .await;
    assert_eq!(got, "{error,closed}");
    let got = erl_eval(
        &ebin,
        stock_port,
        "distproxy_epmd:address_please(\"b\", \"localhost\", inet)",
    )
    .await;
    assert_eq!(got, "{ok,{127,0,0,1}}");
    stock_task.abort();

    // No EPMD at all: fallback too.
    let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = unused.local_addr().unwrap().port();
    drop(unused);
    let got = erl_eval(
        &ebin,
        dead,
        "distproxy_epmd:address_please(\"b\", \"localhost\", inet)",
    )
    .await;
    assert_eq!(got, "{ok,{127,0,0,1}}");
}
