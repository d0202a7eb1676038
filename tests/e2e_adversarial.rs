//! Adversarial peers against a sidecar with real OTP nodes registered.
//!
//! Pod B's sidecar serves b1; a1 in pod A keeps pinging b1 through it while
//! an attacker in pod X plays one hostile peer at a time: a slowloris on the
//! distribution and EPMD ports (one byte a second), 2,000 connections that
//! send nothing (each port), a valid `send_name` that then stalls before the
//! challenge reply, 64 KiB length prefixes, a garbage TLS ClientHello on the
//! plain port, resets in the middle of handshakes, and 1,000 lookups of
//! names that do not exist. Each round of a1's pinging drops the connection
//! first, so every ping needs a fresh lookup and handshake through the
//! attacked sidecar.
//!
//! After each attack: no ping failed, the attacker's connections were ended
//! by the sidecar in bounded time, `/metrics` counts the refusals, and the
//! sidecar's open file descriptors are back to their level before.
//!
//! Also: per-source caps by IPv6 prefix, held lookups from a few addresses
//! that fill the EPMD total, and a peer at the pod's own
//! address admitted as local (no per-source cap).
//!
//! Needs root, iproute2 and erlang-nox; fails saying so otherwise, unless
//! `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use distproxy_testkit::frames;
use support::beam::atom;
use support::metrics::{metric_sum, metrics};
use support::wait::poll_until;
use support::{e2e_enabled, BeamNode, Daemon, Pod, SidecarOptions, DIST_PORT, EPMD_PORT};

/// Short deadlines so that the attacks end quickly: a peer gets 2 s for
/// its first handshake frame or its EPMD request. The per-source limits
/// are set (below the defaults) so that the floods cross them.
const SIDECAR_CONFIG: &str =
    "[epmd]\nidle_timeout_ms = 2000\n[dist]\nhandshake_timeout_ms = 2000\n\
     [limits]\ndist_max_connections_per_source = 512\nepmd_max_connections_per_source = 64\n";
/// The deadline above, and how much later than it a close may come.
const PEER_DEADLINE: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_secs(3);
/// Connections of the idle floods.
const IDLE_CONNECTIONS: usize = 2000;
/// The sidecar's per-source limits (`SIDECAR_CONFIG`).
const DIST_PER_SOURCE: usize = 512;
const EPMD_PER_SOURCE: usize = 64;

const CLOSED: &str = "distproxy_connections_closed_total";
const REFUSED: &str = "distproxy_connections_refused_total";
const EPMD_REQUESTS: &str = "distproxy_epmd_requests_total";

/// Open file descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

struct Scene<'a> {
    b: &'a Pod,
    sidecar_b: Daemon,
    a1: BeamNode,
    a1_name: String,
    b1_name: String,
    /// The attacker's view of pod B's ports.
    dist: SocketAddr,
    epmd: SocketAddr,
    x: &'a Pod,
}

impl Scene<'_> {
    /// Pings b1 from a1 while `attack` runs (at least once, however short
    /// the attack), dropping the connection before each ping so that every
    /// round looks b1 up and handshakes anew. Every ping must be answered.
    /// Returns what the attack returned.
    fn ping_through<T>(&mut self, what: &str, attack: JoinHandle<T>) -> T {
        let mut rounds = 0;
        loop {
            let disconnect = format!("[{}]", atom(&self.b1_name));
            self.a1
                .rpc(&self.a1_name, "erlang", "disconnect_node", &disconnect);
            let pong = self.a1.ping(&self.b1_name);
            assert_eq!(
                pong, "pong",
                "{what}: ping {rounds} failed during the attack"
            );
            rounds += 1;
            if attack.is_finished() {
                break;
            }
        }
        assert_eq!(self.a1.ping(&self.b1_name), "pong", "{what}: after");
        eprintln!("{what}: {rounds} pings answered during the attack");
        match attack.join() {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e),
        }
    }

    /// Waits until the sidecar's open descriptors are back to `level`.
    fn assert_fds_back(&self, what: &str, level: usize) {
        let pid = self.sidecar_b.pid();
        assert!(
            poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
                fds(pid) <= level
            }),
            "{what}: the sidecar holds {} descriptors, {level} before",
            fds(pid)
        );
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&metrics(self.b), name, labels)
    }
}

/// Whether the peer has closed `s` (EOF or reset), asked without waiting
/// more than a millisecond.
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Reads until EOF or reset within `within`: the bytes, and whether it ended.
fn read_to_close(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (out, false);
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut b) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&b[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (out, false)
            }
            Err(_) => return (out, true),
        }
    }
}

/// Slowloris: `conns` connections, each sending `frame` one byte a second.
/// Returns, per connection, how many bytes it got out before the server
/// closed it and when.
fn slowloris(addr: SocketAddr, frame: Vec<u8>, conns: usize) -> Vec<(usize, Duration)> {
    let start = Instant::now();
    let mut open: Vec<(TcpStream, usize)> = (0..conns)
        .map(|_| (TcpStream::connect(addr).unwrap(), 0))
        .collect();
    let mut done = Vec::new();
    while !open.is_empty() && start.elapsed() < Duration::from_secs(30) {
        let mut still = Vec::new();
        for (mut s, sent) in open {
            if closed_by_peer(&mut s) {
                done.push((sent, start.elapsed()));
                continue;
            }
            if sent < frame.len() && s.write_all(&frame[sent..=sent]).is_ok() {
                still.push((s, sent + 1));
            } else if sent < frame.len() {
                done.push((sent, start.elapsed()));
            } else {
                still.push((s, sent));
            }
        }
        open = still;
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        open.is_empty(),
        "{} slowloris connections never closed",
        open.len()
    );
    done
}

/// Opens `n` connections that send nothing and holds each until the server
/// ends it. Returns how many were ended at once (refused at accept) and
/// how many later; panics on one still open after 20 s.
fn idle_flood(addr: SocketAddr, n: usize) -> (usize, usize) {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        match TcpStream::connect(addr) {
            Ok(s) => conns.push(s),
            Err(e) => panic!("connect {addr}: {e}"),
        }
    }
    let opened = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let (mut at_once, mut later) = (0, 0);
    let mut left: Vec<TcpStream> = Vec::new();
    for mut s in conns {
        if closed_by_peer(&mut s) {
            at_once += 1;
        } else {
            left.push(s);
        }
    }
    while !left.is_empty() {
        assert!(
            opened.elapsed() < PEER_DEADLINE + SLACK + Duration::from_secs(15),
            "{} idle connections still open",
            left.len()
        );
        std::thread::sleep(Duration::from_millis(100));
        let before = left.len();
        left.retain_mut(|s| !closed_by_peer(s));
        later += before - left.len();
    }
    (at_once, later)
}

/// Raises this process's soft limit on open files to the hard one: the
/// idle floods hold 2,000 sockets at once.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(
        hard >= 3 * IDLE_CONNECTIONS as u64,
        "hard limit on open files {hard}"
    );
}

#[test]
fn hostile_peers_are_refused_counted_and_cleaned_up_while_nodes_keep_talking() {
    if !e2e_enabled(
        "hostile_peers_are_refused_counted_and_cleaned_up_while_nodes_keep_talking",
        &[],
    ) {
        return;
    }
    raise_nofile();
    let lab = support::Lab::new(&["a", "b", "x"]);
    let (a, b, x) = (lab.pod("a"), lab.pod("b"), lab.pod("x"));
    let _sidecar_a = a.spawn_sidecar_with(SidecarOptions::default().config(SIDECAR_CONFIG));
    let sidecar_b = b.spawn_sidecar_with(SidecarOptions::default().config(SIDECAR_CONFIG));
    let mut a1 = a.start_erlang("a1");
    let _b1 = b.start_erlang("b1");
    let (a1_name, b1_name) = (a.node_name("a1"), b.node_name("b1"));
    assert_eq!(a1.ping(&b1_name), "pong");
    let mut s = Scene {
        dist: SocketAddr::from((b.addr(), DIST_PORT)),
        epmd: SocketAddr::from((b.addr(), EPMD_PORT)),
        b,
        sidecar_b,
        a1,
        a1_name,
        b1_name,
        x,
    };
    // Let the start-up settle (discovery, the first connection), then take
    // the descriptor level with a1 and b1 connected.
    std::thread::sleep(Duration::from_secs(1));
    let level = fds(s.sidecar_b.pid());
    let before = metrics(s.b);
    let m0 = |name: &str, labels: &[(&str, &str)]| metric_sum(&before, name, labels);

    // 1. Slowloris on the distribution port: a valid send_name, one byte a
    // second. Closed at the handshake deadline, long before it is complete.
    let (dist, epmd) = (s.dist, s.epmd);
    let send_name = frames::send_name("x1@pod-x.dp.test").to_vec();
    let name_len = send_name.len();
    let done = s.ping_through(
        "dist slowloris",
        s.x.spawn_in(move || slowloris(dist, send_name, 20)),
    );
    for (sent, at) in &done {
        assert!(
            *sent < name_len,
            "the whole send_name went out ({sent} bytes)"
        );
        assert!(*at < PEER_DEADLINE + SLACK, "closed after {at:?}");
    }
    // ... and on the EPMD port: a lookup one byte a second.
    let lookup = [&[0, 5, b'z'][..], b"b1xx"].concat();
    let done = s.ping_through(
        "epmd slowloris",
        s.x.spawn_in(move || slowloris(epmd, lookup, 20)),
    );
    for (sent, at) in &done {
        assert!(*sent < 7, "the whole lookup went out");
        assert!(*at < PEER_DEADLINE + SLACK, "closed after {at:?}");
    }
    s.assert_fds_back("slowloris", level);

    // 2. 2,000 connections that send nothing, on each port: beyond the
    // per-source limit they are closed at accept, the rest at the deadline.
    for (what, addr, per_source) in [
        ("dist idle flood", dist, DIST_PER_SOURCE),
        ("epmd idle flood", epmd, EPMD_PER_SOURCE),
    ] {
        let (at_once, later) = s.ping_through(
            what,
            s.x.spawn_in(move || idle_flood(addr, IDLE_CONNECTIONS)),
        );
        assert_eq!(at_once + later, IDLE_CONNECTIONS);
        assert!(
            at_once >= IDLE_CONNECTIONS - per_source,
            "{what}: {at_once} refused at accept"
        );
        s.assert_fds_back(what, level);
    }
    // Silent until the deadline: a warning (rate-limited) on each port, not
    // only a debug line as for a connection closed with nothing sent.
    let log = s.sidecar_b.log();
    for line in [
        "closing distribution connection before its first byte",
        "epmd request timed out; closing",
    ] {
        assert!(
            log.lines().any(|l| l.contains("WARN") && l.contains(line)),
            "no warning {line:?} for the silent connections:\n{log}"
        );
    }

    // 3. A valid send_name, then silence instead of the challenge reply: the
    // sidecar routes it to b1 (its only node), b1 answers, and b1's own
    // handshake timer (net_setuptime, 7 s) ends it; both legs are freed.
    let answers = s.ping_through(
        "stalled handshake",
        s.x.spawn_in(move || {
            let stalled: Vec<_> = (0..5)
                .map(|i| {
                    let mut c = TcpStream::connect(dist).unwrap();
                    c.write_all(&frames::send_name(&format!("x{i}@pod-x.dp.test")))
                        .unwrap();
                    c
                })
                .collect();
            stalled
                .into_iter()
                .map(|mut c| read_to_close(&mut c, Duration::from_secs(20)))
                .collect::<Vec<_>>()
        }),
    );
    for (reply, closed) in &answers {
        assert!(*closed, "stalled handshake never closed");
        let (name, _) = frames::parse_node_answer(reply)
            .unwrap_or_else(|| panic!("no status and challenge: {reply:?}"));
        assert_eq!(name, s.b1_name, "routed to the wrong node");
    }
    s.assert_fds_back("stalled handshake", level);

    // 4. Length prefixes of 64 KiB (and just over the 2048-byte limit):
    // closed as soon as the length is read, nothing buffered for it.
    let closes = s.ping_through(
        "big length prefixes",
        s.x.spawn_in(move || {
            let mut out = Vec::new();
            for (addr, prefix) in [
                (dist, [0xff, 0xff]),
                (dist, [0x08, 0x01]),
                (epmd, [0xff, 0xff]),
                (epmd, [0x0b, 0xf2]),
            ] {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(&prefix).unwrap();
                out.push(read_to_close(&mut c, PEER_DEADLINE / 2));
            }
            out
        }),
    );
    for (reply, closed) in &closes {
        assert!(*closed && reply.is_empty(), "{reply:?} closed={closed}");
    }

    // 5. A TLS ClientHello of garbage on the plain distribution port (this
    // sidecar has no TLS), and plain garbage.
    let closes = s.ping_through(
        "garbage ClientHello",
        s.x.spawn_in(move || {
            let mut out = Vec::new();
            let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
            hello.extend((0..508u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
            for bytes in [hello, b"GET / HTTP/1.1\r\n\r\n".to_vec()] {
                for _ in 0..10 {
                    let mut c = TcpStream::connect(dist).unwrap();
                    let _ = c.write_all(&bytes);
                    out.push(read_to_close(&mut c, PEER_DEADLINE + SLACK));
                }
            }
            out
        }),
    );
    for (reply, closed) in &closes {
        assert!(*closed && reply.is_empty(), "{reply:?} closed={closed}");
    }

    // 6. Resets in the middle: half a send_name, or a whole one and at once
    // RST while the sidecar connects to b1; half an EPMD request.
    s.ping_through(
        "resets mid-handshake",
        s.x.spawn_in(move || {
            let send_name = frames::send_name("x9@pod-x.dp.test").to_vec();
            for i in 0..60 {
                // Paced over half a second, so that pings overlap it (60
                // resets at once take a few milliseconds).
                std::thread::sleep(Duration::from_millis(8));
                let (addr, bytes) = match i % 3 {
                    0 => (dist, &send_name[..send_name.len() / 2]),
                    1 => (dist, &send_name[..]),
                    _ => (epmd, &b"\x00\x05zb1"[..]),
                };
                let c = TcpStream::connect(addr).unwrap();
                socket2::SockRef::from(&c)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                (&c).write_all(bytes).unwrap();
                drop(c); // RST
            }
        }),
    );
    s.assert_fds_back("resets", level);

    // 7. 1,000 lookups of names that do not exist: `w` 1 each.
    let misses = s.ping_through(
        "lookups of unknown names",
        s.x.spawn_in(move || {
            (0..1000)
                .filter(|i| {
                    let mut c = TcpStream::connect(epmd).unwrap();
                    let name = format!("nobody{i}");
                    let mut req = ((name.len() + 1) as u16).to_be_bytes().to_vec();
                    req.push(b'z');
                    req.extend_from_slice(name.as_bytes());
                    c.write_all(&req).unwrap();
                    let _ = c.shutdown(Shutdown::Write);
                    read_to_close(&mut c, Duration::from_secs(2)) == (b"w\x01".to_vec(), true)
                })
                .count()
        }),
    );
    assert_eq!(misses, 1000);
    s.assert_fds_back("lookups", level);

    // What /metrics counted.
    let grew = |name: &str, labels: &[(&str, &str)]| s.metric(name, labels) - m0(name, labels);
    let refused_dist = grew(
        REFUSED,
        &[("listener", "distribution"), ("limit", "per_source")],
    );
    assert!(
        refused_dist >= (IDLE_CONNECTIONS - DIST_PER_SOURCE) as f64,
        "dist refusals counted: {refused_dist}"
    );
    let refused_epmd = grew(REFUSED, &[("listener", "epmd"), ("limit", "per_source")]);
    assert!(
        refused_epmd >= (IDLE_CONNECTIONS - EPMD_PER_SOURCE) as f64,
        "epmd refusals counted: {refused_epmd}"
    );
    let timeouts = grew(CLOSED, &[("reason", "timeout")]);
    assert!(
        timeouts >= (20 + DIST_PER_SOURCE) as f64,
        "dist timeouts counted: {timeouts}"
    );
    let bad = grew(CLOSED, &[("reason", "bad_frame")]);
    assert!(bad >= 2.0 + 10.0, "bad frames counted: {bad}");
    let epmd_timeouts = grew(EPMD_REQUESTS, &[("type", "unknown"), ("result", "timeout")]);
    assert!(
        epmd_timeouts >= (20 + EPMD_PER_SOURCE) as f64,
        "epmd timeouts counted: {epmd_timeouts}"
    );
    let epmd_bad = grew(
        EPMD_REQUESTS,
        &[("type", "unknown"), ("result", "bad_request")],
    );
    assert!(epmd_bad >= 2.0, "bad epmd requests counted: {epmd_bad}");
    let not_found = grew(
        EPMD_REQUESTS,
        &[("type", "port_please2"), ("result", "not_found")],
    );
    assert!(not_found >= 1000.0, "unknown lookups counted: {not_found}");
    eprintln!(
        "counted: refused dist {refused_dist}, epmd {refused_epmd}; timeouts dist {timeouts}, \
         epmd {epmd_timeouts}; bad frames {bad}, bad epmd requests {epmd_bad}; not found {not_found}"
    );
    assert_eq!(s.metric("distproxy_misroutes_total", &[]), 0.0);
    s.sidecar_b.assert_running();
}

/// An attacker that holds many IPv6 addresses of one /64 (here three of
/// the lab's prefix) opens idle admin connections from each. By default
/// every address is a source of its own and gets the per-source cap (4
/// here) once per address: pod D keeps all 12. With
/// `limits.ipv6_source_prefix_len = 64`, pod G counts the /64 as one
/// source: it keeps 4 and refuses 8 as `per_source`.
#[test]
fn per_source_caps_group_ipv6_addresses_by_the_configured_prefix() {
    if !e2e_enabled(
        "per_source_caps_group_ipv6_addresses_by_the_configured_prefix",
        &[],
    ) {
        return;
    }
    const PER_SOURCE: usize = 4;
    let lab = support::Lab::new_dual_stack(&["d", "g", "x"]);
    let (d, g, x) = (lab.pod("d"), lab.pod("g"), lab.pod("x"));
    let config = |prefix: u8| {
        format!(
            "[limits]\nadmin_max_connections = 32\n\
             admin_max_connections_per_source = {PER_SOURCE}\n\
             ipv6_source_prefix_len = {prefix}\n"
        )
    };
    let _sidecar_d = d.spawn_sidecar_with(SidecarOptions::default().config(&config(128)));
    let _sidecar_g = g.spawn_sidecar_with(SidecarOptions::default().config(&config(64)));
    let sources: Vec<std::net::Ipv6Addr> = (1..=3)
        .map(|i| format!("fd00:d157::ad:{i}").parse().unwrap())
        .collect();
    for ip in &sources {
        x.run_ok(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
    }
    for pod in [d, g] {
        let to = SocketAddr::from((pod.addr6(), support::sidecar::ADMIN_PORT));
        let from = sources.clone();
        // Open 4 idle connections from each address; keep them until the
        // sidecar has counted every accept.
        let conns = x
            .spawn_in(move || {
                let mut open = Vec::new();
                for ip in from {
                    for _ in 0..PER_SOURCE {
                        let s = socket2::Socket::new(
                            socket2::Domain::IPV6,
                            socket2::Type::STREAM,
                            None,
                        )
                        .unwrap();
                        s.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
                        s.connect(&to.into()).unwrap();
                        open.push(TcpStream::from(s));
                    }
                }
                open
            })
            .join()
            .unwrap();
        assert_eq!(conns.len(), 3 * PER_SOURCE);
        let refused = || {
            metric_sum(
                &metrics(pod),
                REFUSED,
                &[("listener", "admin"), ("limit", "per_source")],
            )
        };
        let want = if pod.name() == "g" { 2 * PER_SOURCE } else { 0 } as f64;
        if want > 0.0 {
            poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
                refused() >= want
            });
        }
        // The refused ones are closed by the sidecar; the others stay open.
        let mut kept = 0;
        for mut s in conns.iter() {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Ok(0) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    kept += 1
                }
                other => panic!("pod {}: unexpected read {other:?}", pod.name()),
            }
        }
        assert_eq!(refused(), want, "pod {}: per_source refusals", pod.name());
        let expected = if pod.name() == "g" {
            PER_SOURCE
        } else {
            3 * PER_SOURCE
        };
        assert_eq!(kept, expected, "pod {}: idle connections kept", pod.name());
    }
}

/// A peer at the pod's own address is inside the pod (the rule of OTP's
/// `epmd`, and the docs'): a node of the pod looking up another through the
/// pod's hostname connects from it. Admission judged it by the listener's
/// wildcard address instead, so such a peer got the per-source cap of a
/// remote one (here: 4 of 8 lookups closed at accept), no reserved room, and
/// could be ended to make room for connections from outside.
#[test]
fn a_peer_at_the_pods_own_address_is_admitted_as_local() {
    if !e2e_enabled("a_peer_at_the_pods_own_address_is_admitted_as_local", &[]) {
        return;
    }
    const PER_SOURCE: usize = 4;
    const LOOKUPS: usize = 2 * PER_SOURCE;
    let lab = support::Lab::new(&["l"]);
    let l = lab.pod("l");
    let _sidecar = l.spawn_sidecar_with(SidecarOptions::default().config(&format!(
        "[limits]\nepmd_max_connections = 64\n\
         epmd_max_connections_per_source = {PER_SOURCE}\n"
    )));
    let epmd = SocketAddr::from((l.addr(), EPMD_PORT));
    // Open them all first, as nodes asking at once do, then ask NAMES on
    // each.
    let replies = l
        .spawn_in(move || {
            let conns: Vec<TcpStream> = (0..LOOKUPS)
                .map(|_| TcpStream::connect(epmd).unwrap())
                .collect();
            std::thread::sleep(Duration::from_millis(300));
            conns
                .into_iter()
                .map(|mut c| {
                    let _ = c.write_all(&[0, 1, b'n']);
                    read_to_close(&mut c, Duration::from_secs(5)).0
                })
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap();
    let answered = replies
        .iter()
        .filter(|r| r.starts_with(&u32::from(EPMD_PORT).to_be_bytes()))
        .count();
    assert_eq!(answered, LOOKUPS, "NAMES answered from the pod's address");
    let refused = metric_sum(
        &metrics(l),
        REFUSED,
        &[("listener", "epmd"), ("limit", "per_source")],
    );
    assert_eq!(refused, 0.0, "per_source refusals of a local peer");
}

/// `PORT_PLEASE2_REQ` for `name`.
fn port_please(name: &str) -> Vec<u8> {
    let mut req = ((name.len() + 1) as u16).to_be_bytes().to_vec();
    req.push(122);
    req.extend_from_slice(name.as_bytes());
    req
}

/// Lookups held by correlation keep their EPMD connections open. An
/// attacker on a few addresses that looks up one node (and never connects)
/// and then another holds every later lookup for up to
/// `routing.max_hold_ms`; those places could not be taken by a newcomer, so
/// with the total full a real peer's lookup was closed at accept. A held
/// lookup's place can now be taken, from the source holding the most.
#[test]
fn held_lookups_from_a_few_addresses_do_not_keep_a_real_lookup_out() {
    if !e2e_enabled(
        "held_lookups_from_a_few_addresses_do_not_keep_a_real_lookup_out",
        &[],
    ) {
        return;
    }
    const ATTACKERS: u8 = 4;
    /// Held lookups per attacker address.
    const HELD_EACH: usize = 2;
    const HELD: usize = ATTACKERS as usize * HELD_EACH;
    const PER_SOURCE: usize = 4;
    /// The whole EPMD total: the held lookups and the two nodes'
    /// registrations.
    const TOTAL: usize = HELD + 2;
    let lab = support::Lab::new(&["l", "p", "x"]);
    let (l, p, x) = (lab.pod("l"), lab.pod("p"), lab.pod("x"));
    // Long enough that no hold or answered lookup ends during the test.
    let _sidecar = l.spawn_sidecar_with(SidecarOptions::default().config(&format!(
        "[routing]\nlookup_ttl_ms = 20000\nmax_hold_ms = 15000\n\
         [limits]\nepmd_max_connections = {TOTAL}\n\
         epmd_max_connections_per_source = {PER_SOURCE}\n"
    )));
    let mut l1 = l.spawn_erlang("l1");
    let mut l2 = l.spawn_erlang("l2");
    l1.wait_ready();
    l2.wait_ready();
    let epmd = SocketAddr::from((l.addr(), EPMD_PORT));
    let sources: Vec<std::net::Ipv4Addr> = (0..ATTACKERS)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(u32::from(x.addr()) + 100 + u32::from(i));
            x.run_ok("ip", &["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
            ip
        })
        .collect();
    // From each address: one lookup of l1, answered (its entry waits for a
    // connection that never comes), then lookups of l2, held behind it.
    let mut held = x
        .spawn_in(move || {
            let connect_from = |ip: std::net::Ipv4Addr| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                s.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
                s.connect(&epmd.into()).unwrap();
                TcpStream::from(s)
            };
            for &ip in &sources {
                let mut first = connect_from(ip);
                first.write_all(&port_please("l1")).unwrap();
                let (answer, closed) = read_to_close(&mut first, Duration::from_secs(5));
                assert!(
                    closed && answer.starts_with(&[119, 0]),
                    "{ip}: l1 answered: {answer:?}"
                );
            }
            // Every answered lookup's place is free again before the holds.
            std::thread::sleep(Duration::from_millis(300));
            let mut held = Vec::new();
            for &ip in &sources {
                for _ in 0..HELD_EACH {
                    let mut s = connect_from(ip);
                    let _ = s.write_all(&port_please("l2"));
                    held.push(s);
                }
            }
            held
        })
        .join()
        .unwrap();
    let held_metric = || metric_sum(&metrics(l), "distproxy_lookups_waiting", &[]);
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            held_metric() >= HELD as f64
        }),
        "lookups held: {}\n{}",
        held_metric(),
        metrics(l)
            .lines()
            .filter(|l| l.contains("epmd") || l.contains("lookup"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // A real peer in another pod looks l2 up: answered, in place of one of
    // the attacker's held lookups.
    let answer = p
        .spawn_in(move || {
            let mut s = TcpStream::connect(epmd).unwrap();
            let _ = s.write_all(&port_please("l2"));
            read_to_close(&mut s, Duration::from_secs(5))
        })
        .join()
        .unwrap();
    assert!(
        answer.1 && answer.0.starts_with(&[119, 0]),
        "the real peer's lookup was not answered: {answer:?}"
    );
    let evicted = metric_sum(
        &metrics(l),
        REFUSED,
        &[("listener", "epmd"), ("limit", "evicted")],
    );
    assert_eq!(evicted, 1.0, "one held lookup's place taken");
    let closed = held.iter_mut().map(closed_by_peer).filter(|c| *c).count();
    assert_eq!(closed, 1, "one held lookup ended");
    drop(held);
    // The pod's own registrations and lookups were never in the way.
    assert_eq!(l1.ping(&l.node_name("l2")), "pong");
}
