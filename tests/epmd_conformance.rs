//! Differential EPMD conformance: OTP's own `epmd` and distproxy's EPMD
//! server get the same scripted sessions, and their raw reply bytes and what
//! happens to the connection afterwards (closed, reset, kept open) are
//! compared.
//!
//! Only what legitimately differs is normalised, each at the place it is
//! done and with the reason: the creation an accepted `ALIVE2_REQ` gets
//! (both servers pick a start value of their own), the port each server
//! listens on (the first four bytes of `NAMES`/`DUMP` replies), and the
//! file descriptor numbers of `DUMP` (distproxy has none to show).
//! Where distproxy deliberately differs, the test asserts the difference
//! (`deliberate_differences`); `docs/otp-support.md` lists them.
//!
//! OTP's `epmd` runs with `-port P -address 127.0.0.1` on a free port (never
//! 4369); distproxy runs in the test's process on `127.0.0.1:0`. Needs
//! erlang-nox (`epmd`); fails saying so, unless `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use distproxy_testkit::ports::free_port;
use distproxy_testkit::prelude::*;
use distproxy_testkit::process::Proc;
use distproxy_testkit::sut::Sidecar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a connection must stay open after its last reply byte to
/// count as kept open. Every connection either server closes is closed
/// within a few milliseconds of its reply.
const OPEN_WAIT: Duration = Duration::from_millis(400);
/// How long a connection that got neither a byte nor a close must stay so
/// to count as kept open. Longer than [`OPEN_WAIT`]: on a loaded machine
/// a server may be descheduled for that long before it answers, and the
/// sessions that stay silent are few.
const SILENT_WAIT: Duration = Duration::from_secs(2);

/// What happened to a connection after its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// FIN after the reply (or without one).
    Closed,
    /// RST: closed with unread bytes.
    Reset,
    /// Still open after [`SILENT_WAIT`], or [`OPEN_WAIT`] after a reply.
    Open,
}

/// The reply bytes and the end of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    reply: Vec<u8>,
    end: End,
}

impl Seen {
    fn new(reply: &[u8], end: End) -> Seen {
        Seen {
            reply: reply.to_vec(),
            end,
        }
    }
}

/// OTP's `epmd` and a distproxy sidecar side by side.
struct Pair {
    otp: SocketAddr,
    ours: SocketAddr,
    sidecar: Sidecar,
    _epmd: Proc,
}

impl Pair {
    /// `None` when e2e tests are skipped explicitly.
    async fn start(test: &str, relaxed: bool) -> Option<Pair> {
        if !support::e2e_enabled(test, &[]) {
            return None;
        }
        let port = free_port();
        let mut cmd = Command::new("epmd");
        cmd.args(["-port", &port.to_string(), "-address", "127.0.0.1"]);
        if relaxed {
            cmd.arg("-relaxed_command_check");
        }
        let epmd = Proc::spawn_unlogged(
            "epmd",
            cmd.env_remove("ERL_EPMD_RELAXED_COMMAND_CHECK")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let otp = loopback(port);
        assert!(
            eventually(Duration::from_secs(5), || async {
                TcpStream::connect(otp).await.is_ok()
            })
            .await,
            "OTP's epmd did not start on {otp}"
        );
        let mut config = test_config();
        config.epmd.relaxed_command_check = relaxed;
        // The default (10 s), well past SILENT_WAIT: a request left
        // incomplete must still be open when a session stops waiting.
        config.epmd.idle_timeout_ms = Millis(10_000);
        let sidecar = start(config);
        Some(Pair {
            otp,
            ours: epmd_addr(&sidecar),
            sidecar,
            _epmd: epmd,
        })
    }

    /// Runs the same session against both; the connections are returned
    /// (open ones keep their registrations).
    async fn both(&self, bytes: &[u8]) -> [(TcpStream, Seen); 2] {
        let (a, b) = tokio::join!(session(self.otp, bytes), session(self.ours, bytes));
        [a, b]
    }

    /// [`Pair::both`], asserting the same outcome after `normalise`.
    async fn same(&self, what: &str, bytes: &[u8], normalise: fn(Seen) -> Seen) -> Vec<TcpStream> {
        let [(c1, otp), (c2, ours)] = self.both(bytes).await;
        assert_eq!(
            normalise(ours),
            normalise(otp),
            "{what}: distproxy (left) differs from epmd (right)"
        );
        vec![c1, c2]
    }
}

/// Sends `bytes` and reads until the server closes or keeps the
/// connection open ([`End::Open`]).
async fn session(addr: SocketAddr, bytes: &[u8]) -> (TcpStream, Seen) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let (reply, end) = read_reply(&mut s, SILENT_WAIT).await;
    (s, Seen { reply, end })
}

/// Reads until EOF, a reset, or an open end: `silent` without a byte, or
/// [`OPEN_WAIT`] after the last byte.
async fn read_reply(s: &mut TcpStream, silent: Duration) -> (Vec<u8>, End) {
    let mut deadline = tokio::time::Instant::now() + silent;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (reply, End::Open),
            Ok(Ok(0)) => return (reply, End::Closed),
            Ok(Ok(n)) => {
                reply.extend_from_slice(&buf[..n]);
                deadline = tokio::time::Instant::now() + OPEN_WAIT;
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (reply, End::Reset)
            }
            Ok(Err(e)) => panic!("read: {e}"),
        }
    }
}

/// As is.
fn exact(s: Seen) -> Seen {
    s
}

/// An accepted ALIVE2 reply with its creation zeroed: each server starts
/// its creations where it likes (epmd from the clock, distproxy from a
/// random value), so only the tag and result are compared here; the
/// creation's range and its change on re-registration are asserted apart.
fn any_creation(mut s: Seen) -> Seen {
    match s.reply.as_mut_slice() {
        [b'v', 0, c @ ..] if c.len() == 4 => c.fill(0),
        [b'y', 0, c @ ..] if c.len() == 2 => c.fill(0),
        _ => {}
    }
    s
}

/// A NAMES or DUMP reply without the server's own port (its first four
/// bytes, checked to be that port by [`Pair::listing`]) and with `fd = N`
/// replaced by `fd = FD`: distproxy has no per-node descriptor and shows -1.
fn listing_text(reply: &[u8]) -> String {
    listing_fds(&String::from_utf8_lossy(&reply[4..]))
}

impl Pair {
    /// Waits until neither server knows `name` any more.
    async fn wait_unregistered(&self, name: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let [(_, o), (_, d)] = self.both(&frame(b'z', name.as_bytes())).await;
            if o.reply == b"w\x01" && d.reply == b"w\x01" {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} not unregistered: {o:?} {d:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// NAMES (`n`) or DUMP (`d`) from both, compared after [`listing_text`];
    /// returns the text.
    async fn listing(&self, tag: u8) -> String {
        let [(_, otp), (_, ours)] = self.both(&[0, 1, tag]).await;
        assert_eq!((otp.end, ours.end), (End::Closed, End::Closed));
        assert_eq!(otp.reply[..4], u32::from(self.otp.port()).to_be_bytes());
        assert_eq!(ours.reply[..4], u32::from(self.ours.port()).to_be_bytes());
        let (o, d) = (listing_text(&otp.reply), listing_text(&ours.reply));
        assert_eq!(d, o, "{} reply differs", tag as char);
        o
    }
}

/// A request frame: length, tag, body.
fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = ((body.len() + 1) as u16).to_be_bytes().to_vec();
    v.push(tag);
    v.extend_from_slice(body);
    v
}

/// An ALIVE2_REQ with every field under the test's control.
struct Alive2<'a> {
    name: &'a [u8],
    port: u16,
    node_type: u8,
    protocol: u8,
    highest: u16,
    lowest: u16,
    extra: &'a [u8],
    /// Lie about the lengths.
    nlen: Option<u16>,
    elen: Option<u16>,
    trailing: &'a [u8],
}

impl<'a> Alive2<'a> {
    fn new(name: &'a [u8]) -> Self {
        Alive2 {
            name,
            port: 41000,
            node_type: 77,
            protocol: 0,
            highest: 6,
            lowest: 5,
            extra: b"",
            nlen: None,
            elen: None,
            trailing: b"",
        }
    }

    fn body(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.port.to_be_bytes());
        b.push(self.node_type);
        b.push(self.protocol);
        b.extend_from_slice(&self.highest.to_be_bytes());
        b.extend_from_slice(&self.lowest.to_be_bytes());
        let nlen = self.nlen.unwrap_or(self.name.len() as u16);
        b.extend_from_slice(&nlen.to_be_bytes());
        b.extend_from_slice(self.name);
        let elen = self.elen.unwrap_or(self.extra.len() as u16);
        b.extend_from_slice(&elen.to_be_bytes());
        b.extend_from_slice(self.extra);
        b.extend_from_slice(self.trailing);
        b
    }

    fn frame(&self) -> Vec<u8> {
        frame(b'x', &self.body())
    }
}

/// `v`/`y` with result 1 and creation 99: epmd's answer to any ALIVE2 it
/// refuses.
fn refused(extended: bool) -> Vec<u8> {
    if extended {
        vec![b'v', 1, 0, 0, 0, 99]
    } else {
        vec![b'y', 1, 0, 99]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alive2_registrations_and_lookups_match_epmd() {
    let Some(p) = Pair::start("alive2_registrations_and_lookups_match_epmd", false).await else {
        return;
    };
    let long_ascii = "n".repeat(255);
    let long_utf8 = "é".repeat(255);
    let too_long = "é".repeat(256);
    let too_long_ascii = "m".repeat(256);
    let extra_max = [b'z'; 1020];
    let extra_over = [b'z'; 1021];
    let mut keep = Vec::new();

    // Accepted: the connection stays open as long as the node lives.
    let accepted: Vec<(&str, Alive2)> = vec![
        ("v6", Alive2::new(b"v6node")),
        ("v5 (y reply, 16-bit creation)", {
            let mut a = Alive2::new(b"v5node");
            a.highest = 5;
            a
        }),
        ("with extra", {
            let mut a = Alive2::new(b"extra");
            a.extra = b"\x01\x02abc\x00";
            a
        }),
        ("255 ASCII characters", Alive2::new(long_ascii.as_bytes())),
        ("255 two-byte characters", Alive2::new(long_utf8.as_bytes())),
        ("1020 bytes of extra", {
            let mut a = Alive2::new(b"extramax");
            a.extra = &extra_max;
            a
        }),
        ("hidden, protocol 1, versions 7..1", {
            let mut a = Alive2::new(b"odd");
            a.node_type = 72;
            a.protocol = 1;
            a.highest = 7;
            a.lowest = 1;
            a
        }),
        ("bytes after the extra (ignored)", {
            let mut a = Alive2::new(b"trailing");
            a.trailing = b"\x00junk";
            a
        }),
        ("trailing bytes making a 3057-byte body", {
            let mut a = Alive2::new(b"biggest");
            a.extra = &extra_max;
            a.trailing = &[7; 3057 - 13 - 7 - 1020];
            a
        }),
    ];
    for (what, a) in &accepted {
        let [(c1, otp), (c2, ours)] = p.both(&a.frame()).await;
        assert_eq!(otp.end, End::Open, "{what}: epmd closed");
        assert_eq!(
            any_creation(ours.clone()),
            any_creation(otp.clone()),
            "{what}"
        );
        if a.highest < 6 {
            // The old reply's creation is 1..3 in both.
            for s in [&otp, &ours] {
                assert!((1..=3).contains(&s.reply[3]), "{what}: {s:?}");
            }
        }
        keep.extend([c1, c2]);
    }

    // Refused by node_reg2: result 1, creation 99, and the connection is
    // kept as for any ALIVE2 (until the peer closes or sends a byte).
    let mut v5_bad = Alive2::new(b"\xff");
    v5_bad.highest = 5;
    let refused_cases: Vec<(&str, Alive2, bool)> = vec![
        ("256 characters", Alive2::new(too_long.as_bytes()), true),
        ("256 ASCII", Alive2::new(too_long_ascii.as_bytes()), true),
        ("invalid UTF-8", Alive2::new(b"\xc3\x28"), true),
        ("invalid UTF-8, version 5", v5_bad, false),
        (
            "1021 bytes of extra",
            {
                let mut a = Alive2::new(b"extraover");
                a.extra = &extra_over;
                a
            },
            true,
        ),
        ("duplicate name", Alive2::new(b"v6node"), true),
    ];
    for (what, a, extended) in &refused_cases {
        let [(c1, otp), (c2, ours)] = p.both(&a.frame()).await;
        assert_eq!(
            otp,
            Seen::new(&refused(*extended), End::Open),
            "{what}: epmd"
        );
        assert_eq!(ours, otp, "{what}");
        keep.extend([c1, c2]);
    }

    // Malformed: closed without a reply.
    let mut nul = Alive2::new(b"a\x00b");
    nul.port = 1;
    let mut nlen_lies = Alive2::new(b"lie");
    nlen_lies.nlen = Some(40);
    let mut elen_lies = Alive2::new(b"elie");
    elen_lies.elen = Some(40);
    let mut nlen_eats_elen = Alive2::new(b"ab");
    nlen_eats_elen.nlen = Some(4);
    let mut empty_13 = Alive2::new(b"");
    empty_13.port = 2;
    for (what, bytes) in [
        ("NUL in the name", nul.frame()),
        ("name length beyond the body", nlen_lies.frame()),
        ("extra length beyond the body", elen_lies.frame()),
        (
            "name length eating the extra length",
            nlen_eats_elen.frame(),
        ),
        ("13-byte body (empty name)", empty_13.frame()),
        ("port only", frame(b'x', &[0x10, 0x00])),
        (
            "up to the versions",
            frame(b'x', &Alive2::new(b"t").body()[..8]),
        ),
        (
            "up to the name length",
            frame(b'x', &Alive2::new(b"t").body()[..10]),
        ),
    ] {
        p.same(what, &bytes, exact).await;
        let [(_, otp), _] = p.both(&bytes).await;
        assert_eq!(otp, Seen::new(b"", End::Closed), "{what}: epmd");
    }

    // Lookups of everything registered, and of what was not.
    let mut names: Vec<Vec<u8>> = accepted.iter().map(|(_, a)| a.name.to_vec()).collect();
    names.extend([
        b"nobody".to_vec(),
        b"v6node\0".to_vec(), // a trailing NUL is dropped
        b"extramax".to_vec(),
        too_long.as_bytes().to_vec(),
    ]);
    for name in &names {
        let what = format!(
            "PORT_PLEASE2 {}",
            String::from_utf8_lossy(&name[..name.len().min(12)])
        );
        p.same(&what, &frame(b'z', name), exact).await;
    }
    // The exact bytes of a miss, and of a hit.
    let [(_, miss), _] = p.both(&frame(b'z', b"nobody")).await;
    assert_eq!(miss, Seen::new(b"w\x01", End::Closed));
    let [(_, hit), _] = p.both(&frame(b'z', b"extra")).await;
    assert_eq!(
        hit,
        Seen::new(
            b"w\x00\xa0\x28\x4d\x00\x00\x06\x00\x05\x00\x05extra\x00\x06\x01\x02abc\x00",
            End::Closed
        )
    );
    // epmd counts the NUL after a looked-up name as a character: a name of
    // 255 characters is registered but cannot be looked up.
    let [(_, otp), _] = p.both(&frame(b'z', long_ascii.as_bytes())).await;
    assert_eq!(otp, Seen::new(b"", End::Closed));

    // NAMES and DUMP: the same lines in the same order (newest first).
    let names = p.listing(b'n').await;
    assert!(
        names.starts_with("name biggest at port 41000\nname trailing at port 41000\n"),
        "{names}"
    );
    let dump = p.listing(b'd').await;
    assert!(
        dump.starts_with("active name     <biggest> at port 41000, fd = FD\n\0"),
        "{dump:?}"
    );
    drop(keep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_reregistration_match_epmd() {
    let Some(p) = Pair::start("duplicates_and_reregistration_match_epmd", false).await else {
        return;
    };
    for highest in [6u16, 5] {
        let name = format!("again{highest}");
        let mut a = Alive2::new(name.as_bytes());
        a.highest = highest;
        let [(holder_otp, first_otp), (holder_ours, first_ours)] = p.both(&a.frame()).await;
        assert_eq!(
            any_creation(first_ours.clone()),
            any_creation(first_otp.clone())
        );

        // A duplicate is refused and kept open; closing it leaves the
        // holder registered.
        let [(dup_otp, d1), (dup_ours, d2)] = p.both(&a.frame()).await;
        assert_eq!(d1, Seen::new(&refused(highest >= 6), End::Open));
        assert_eq!(d2, d1);
        drop((dup_otp, dup_ours));
        p.same(
            "lookup after the duplicate closed",
            &frame(b'z', name.as_bytes()),
            exact,
        )
        .await;
        let [(_, still), _] = p.both(&frame(b'z', name.as_bytes())).await;
        assert_eq!(still.reply[1], 0, "holder unregistered by its duplicate");

        // The holder closes: the name is free again, with a new creation.
        drop((holder_otp, holder_ours));
        p.wait_unregistered(&name).await;
        let [(_k1, again_otp), (_k2, again_ours)] = p.both(&a.frame()).await;
        assert_eq!(
            any_creation(again_ours.clone()),
            any_creation(again_otp.clone())
        );
        for (first, again) in [(&first_otp, &again_otp), (&first_ours, &again_ours)] {
            assert_eq!(again.reply[1], 0);
            assert_ne!(
                first.reply, again.reply,
                "creation unchanged on re-registration"
            );
        }
        // Both list the name once more as active; DUMP lists the unused
        // names (oldest first) as epmd does.
        p.listing(b'n').await;
        p.listing(b'd').await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_dump_list_live_and_unused_names_as_epmd_does() {
    let Some(p) = Pair::start(
        "names_and_dump_list_live_and_unused_names_as_epmd_does",
        false,
    )
    .await
    else {
        return;
    };
    assert_eq!(p.listing(b'n').await, "");
    assert_eq!(p.listing(b'd').await, "");
    let mut held = std::collections::HashMap::new();
    for (i, name) in ["a", "b", "c", "d"].into_iter().enumerate() {
        let mut a = Alive2::new(name.as_bytes());
        a.port = 42000 + i as u16;
        held.insert(name, p.same(name, &a.frame(), any_creation).await);
    }
    // Unregister c, then a: the "old/unused" list is in that order. (Each
    // close is waited for: epmd handles closes seen in one select round in
    // the order of its connection slots.)
    for name in ["c", "a"] {
        drop(held.remove(name));
        p.wait_unregistered(name).await;
    }
    assert_eq!(
        p.listing(b'n').await,
        "name d at port 42003\nname b at port 42001\n"
    );
    assert_eq!(
        p.listing(b'd').await,
        "active name     <d> at port 42003, fd = FD\n\0\
         active name     <b> at port 42001, fd = FD\n\0\
         old/unused name <c>, port = 42002, fd = FD \n\0\
         old/unused name <a>, port = 42000, fd = FD \n\0"
    );
    // Bytes after a tag-only request's tag are ignored by both.
    let [(_, o), (_, d)] = p.both(&frame(b'n', b"junk")).await;
    assert_eq!(listing_text(&d.reply), listing_text(&o.reply));
    assert_eq!(o.end, End::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_stop_match_epmd_without_relaxed_checks() {
    let Some(p) = Pair::start("kill_and_stop_match_epmd_without_relaxed_checks", false).await
    else {
        return;
    };
    let _node = p
        .same("register", &Alive2::new(b"victim").frame(), any_creation)
        .await;
    for (what, bytes, want) in [
        ("KILL with a node", frame(b'k', b""), &b"NO"[..]),
        ("STOP", frame(b's', b"victim"), b""),
        ("STOP unknown", frame(b's', b"nobody"), b""),
        ("STOP empty", frame(b's', b""), b""),
    ] {
        let [(_, otp), (_, ours)] = p.both(&bytes).await;
        assert_eq!(otp, Seen::new(want, End::Closed), "{what}: epmd");
        assert_eq!(ours, otp, "{what}");
    }
    // Still registered in both.
    let [(_, o), (_, d)] = p.both(&frame(b'z', b"victim")).await;
    assert_eq!((o.reply[1], d.reply[1]), (0, 0));
    drop(_node);
    // With no node left, KILL is accepted by both.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !p.sidecar.registry.is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // epmd's select loop
    p.same("KILL without nodes", &frame(b'k', b""), exact).await;
    assert!(p.sidecar.shutdown.is_cancelled());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_stop_match_epmd_with_relaxed_checks() {
    let Some(p) = Pair::start("kill_and_stop_match_epmd_with_relaxed_checks", true).await else {
        return;
    };
    let mut nodes = Vec::new();
    for name in ["s1", "s2", "s3"] {
        nodes.push(
            p.same(name, &Alive2::new(name.as_bytes()).frame(), any_creation)
                .await,
        );
    }
    for (what, bytes, want) in [
        ("STOP s1", frame(b's', b"s1"), &b"STOPPED"[..]),
        // epmd_srv.c sends NOEXIST and falls through to STOPPED.
        ("STOP unknown", frame(b's', b"nobody"), b"NOEXISTSTOPPED"),
        ("STOP s1 again", frame(b's', b"s1"), b"NOEXISTSTOPPED"),
        // The name is a C string: it ends at the first NUL.
        (
            "STOP s2 with bytes after a NUL",
            frame(b's', b"s2\0junk"),
            b"STOPPED",
        ),
        (
            "STOP invalid UTF-8",
            frame(b's', b"\xff\xfe"),
            b"NOEXISTSTOPPED",
        ),
        ("STOP empty name", frame(b's', b"\0"), b"NOEXISTSTOPPED"),
        ("STOP without a name", frame(b's', b""), b""),
    ] {
        let [(_, otp), (_, ours)] = p.both(&bytes).await;
        assert_eq!(otp, Seen::new(want, End::Closed), "{what}: epmd");
        assert_eq!(ours, otp, "{what}");
    }
    // The stopped nodes' connections were closed by both servers.
    for (i, name) in ["s1", "s2"].iter().enumerate() {
        for conn in nodes[i].iter_mut() {
            let (bytes, end) = read_reply(conn, SILENT_WAIT).await;
            assert_eq!((bytes.as_slice(), end), (&b""[..], End::Closed), "{name}");
        }
    }
    let [(_, o), _] = p.both(&frame(b's', b"nobody")).await;
    assert_eq!(o, Seen::new(b"NOEXISTSTOPPED", End::Closed));
    assert_eq!(p.listing(b'n').await, "name s3 at port 41000\n");
    // KILL with a node left: accepted by both (epmd exits).
    p.same("KILL", &frame(b'k', b""), exact).await;
    assert!(p.sidecar.shutdown.is_cancelled());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_match_epmd() {
    let Some(p) = Pair::start("malformed_requests_match_epmd", false).await else {
        return;
    };
    let _keeper = p
        .same("register", &Alive2::new(b"keeper").frame(), any_creation)
        .await;
    let long_lookup = frame(b'z', &[b'a'; 3056]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zero length", vec![0, 0]),
        ("zero length then more", vec![0, 0, b'n']),
        ("unknown command", frame(b'Q', b"xx")),
        ("reply tag as command", frame(b'w', b"")),
        ("lookup, empty name", frame(b'z', b"")),
        ("lookup, NUL only", frame(b'z', b"\0")),
        ("lookup, NUL inside", frame(b'z', b"kee\0per")),
        ("lookup, two NULs", frame(b'z', b"keeper\0\0")),
        ("lookup, invalid UTF-8", frame(b'z', b"\xc3\x28")),
        ("lookup of 254 characters", frame(b'z', &[b'q'; 254])),
        ("lookup of 255 characters", frame(b'z', &[b'q'; 255])),
        (
            "lookup of 255 characters and a NUL",
            frame(b'z', &[&[b'q'; 255][..], b"\0"].concat()),
        ),
        ("body of 3057 bytes (the most epmd reads)", long_lookup),
        ("oversized length, no body", vec![0xff, 0xff, b'z']),
        (
            "lookup followed by junk in the same write",
            [frame(b'z', b"keeper"), b"JUNK".to_vec()].concat(),
        ),
        (
            "NAMES twice in one write",
            [frame(b'n', b""), frame(b'n', b"")].concat(),
        ),
        (
            "registration followed by a byte in the same write",
            [Alive2::new(b"eager").frame(), vec![0]].concat(),
        ),
        ("HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
    ];
    for (what, bytes) in &cases {
        p.same(what, bytes, exact).await;
    }
    // What epmd does in these cases, spelled out.
    let [(_, o), _] = p.both(&frame(b'z', &[b'q'; 254])).await;
    assert_eq!(o, Seen::new(b"w\x01", End::Closed));
    let [(_, o), _] = p
        .both(&[frame(b'z', b"keeper"), b"JUNK".to_vec()].concat())
        .await;
    assert_eq!(o, Seen::new(b"", End::Closed));

    // A length beyond the data: both wait for the rest (epmd for 60 s,
    // distproxy for epmd.idle_timeout_ms, 10 s).
    let [(_, o), (_, d)] = p.both(&[0, 16, b'z', b'a']).await;
    assert_eq!((o.end, d.end), (End::Open, End::Open));
    assert!(o.reply.is_empty() && d.reply.is_empty());

    // A length over 3057 is refused before the body is read. epmd closes
    // with the unread body in its receive queue, which the kernel answers
    // with a reset; distproxy may have read it already and end with FIN.
    // The peer sees the connection end without a reply in both.
    let oversized = [&[0x0b, 0xf2][..], &[b'z'; 3058]].concat();
    let [(_, o), (_, d)] = p.both(&oversized).await;
    assert!(o.reply.is_empty() && d.reply.is_empty());
    assert_ne!(o.end, End::Open);
    assert_ne!(d.end, End::Open);

    // The registration survived all of it in both.
    let [(_, o), (_, d)] = p.both(&frame(b'z', b"keeper")).await;
    assert_eq!((o.reply[1], d.reply[1]), (0, 0));
    assert_eq!(p.listing(b'n').await, "name keeper at port 41000\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_connection_that_sends_more_is_unregistered_as_by_epmd() {
    let Some(p) = Pair::start(
        "a_registered_connection_that_sends_more_is_unregistered_as_by_epmd",
        false,
    )
    .await
    else {
        return;
    };
    let mut conns = p
        .same("register", &Alive2::new(b"chatty").frame(), any_creation)
        .await;
    for c in conns.iter_mut() {
        c.write_all(b"more").await.unwrap();
        let (bytes, end) = read_reply(c, SILENT_WAIT).await;
        assert!(bytes.is_empty());
        assert_ne!(end, End::Open, "connection kept after extra bytes");
    }
    p.same("lookup after", &frame(b'z', b"chatty"), exact).await;
    let [(_, o), _] = p.both(&frame(b'z', b"chatty")).await;
    assert_eq!(o.reply, b"w\x01");
}

/// distproxy's own requests (`E`, `I`, `M`) are answered for local peers;
/// epmd closes on them (an unknown command), which is how the Erlang module
/// and discovery tell a stock epmd. An empty name padded by an extra is
/// registered by epmd and refused by distproxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliberate_differences() {
    let Some(p) = Pair::start("deliberate_differences", false).await else {
        return;
    };
    for (what, bytes) in [
        ("egress", frame(b'E', b"b1@pod-b")),
        ("pod info", frame(b'I', b"")),
        ("members", frame(b'M', b"")),
    ] {
        let [(_, otp), (_, ours)] = p.both(&bytes).await;
        assert_eq!(otp, Seen::new(b"", End::Closed), "{what}: epmd");
        assert!(!ours.reply.is_empty(), "{what}: distproxy did not answer");
        assert_eq!(ours.end, End::Closed);
    }
    let mut empty = Alive2::new(b"");
    empty.extra = b"x";
    let [(_c1, otp), (_c2, ours)] = p.both(&empty.frame()).await;
    assert_eq!(
        any_creation(otp),
        Seen::new(b"v\x00\x00\x00\x00\x00", End::Open)
    );
    assert_eq!(ours, Seen::new(&refused(true), End::Open));
}

/// The `epmd` drop-in (`distproxy epmd -port P …`) prints what OTP's `epmd`
/// prints for `-names`, `-dump`, `-stop` and `-kill`, byte for byte apart
/// from the port and the descriptor numbers, with and without relaxed checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drop_in_commands_print_what_epmd_prints() {
    for relaxed in [false, true] {
        drop_in_commands_print_what_epmd_prints(relaxed).await;
    }
}

async fn drop_in_commands_print_what_epmd_prints(relaxed: bool) {
    let Some(p) = Pair::start("the_drop_in_commands_print_what_epmd_prints", relaxed).await else {
        return;
    };
    let _live = p
        .same("register", &Alive2::new(b"live1").frame(), any_creation)
        .await;
    drop(
        p.same("register", &Alive2::new(b"gone1").frame(), any_creation)
            .await,
    );
    p.wait_unregistered("gone1").await;
    let bin = distproxy_testkit::distproxy_bin!();
    for args in [
        &["-names"][..],
        &["-dump"],
        &["-d", "-names"],
        &["-stop", "nobody"],
        &["-stop", "live1"],
        &["-kill"],
    ] {
        let run = |program: &str, pre: &[&str], port: u16| {
            let out = Command::new(program)
                .args(pre)
                .args(["-port", &port.to_string()])
                .args(args)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).replace(&port.to_string(), "PORT");
            (out.status.code(), listing_fds(&text))
        };
        let otp = tokio::task::block_in_place(|| run("epmd", &[], p.otp.port()));
        let ours = tokio::task::block_in_place(|| run(&bin, &["epmd"], p.ours.port()));
        assert_eq!(ours, otp, "epmd {args:?} (relaxed: {relaxed})");
    }
}

/// `fd = N` replaced by `fd = FD`.
fn listing_fds(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("fd = ") {
        out.push_str(&rest[..at + 5]);
        rest = rest[at + 5..].trim_start_matches(|c: char| c == '-' || c.is_ascii_digit());
        out.push_str("FD");
    }
    out.push_str(rest);
    out
}

/// With nothing listening, the drop-in's client commands fail with the
/// words and exit code of `epmd`'s (scripts and probes match them).
#[test]
fn the_drop_in_reports_an_unreachable_epmd_as_epmd_does() {
    if !support::e2e_enabled("the_drop_in_reports_an_unreachable_epmd_as_epmd_does", &[]) {
        return;
    }
    let port = free_port().to_string();
    let bin = distproxy_testkit::distproxy_bin!();
    for args in [&["-names"][..], &["-dump"], &["-kill"], &["-stop", "x"]] {
        let run = |program: &str, pre: &[&str]| {
            let out = Command::new(program)
                .args(pre)
                .args(["-port", &port])
                .args(args)
                .output()
                .unwrap();
            (out.status.code(), out.stdout, out.stderr)
        };
        let otp = run("epmd", &[]);
        assert_eq!(otp.2, b"epmd: Cannot connect to local epmd\n");
        assert_eq!(run(&bin, &["epmd"]), otp, "epmd {args:?}");
    }
}

/// One session over std sockets (for threads inside a lab pod): the reply
/// and the end, as [`session`].
fn std_session(addr: SocketAddr, bytes: &[u8]) -> (std::net::TcpStream, Seen) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    let mut deadline = std::time::Instant::now() + SILENT_WAIT;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break End::Open;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => break End::Closed,
            Ok(n) => {
                reply.extend_from_slice(&buf[..n]);
                deadline = std::time::Instant::now() + OPEN_WAIT;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break End::Reset,
            Err(_) => break End::Open,
        }
    };
    (s, Seen { reply, end })
}

/// Peers on other hosts, and the host's own address: OTP's `epmd` in pod E
/// and a sidecar in pod D, asked from pod X (remote) and from inside each
/// pod through the pod's address (local, as `epmd` counts the server's own
/// address). Remote ALIVE2, DUMP, KILL and STOP are closed without a reply
/// by both; remote lookups and NAMES differ on purpose (the advertised
/// port).
#[test]
fn remote_and_own_address_peers_are_told_apart_as_by_epmd() {
    if !support::e2e_enabled(
        "remote_and_own_address_peers_are_told_apart_as_by_epmd",
        &[],
    ) {
        return;
    }
    let lab = support::Lab::new(&["e", "d", "x"]);
    let (e, d, x) = (lab.pod("e"), lab.pod("d"), lab.pod("x"));
    let _epmd = e.spawn_stock_epmd();
    let _sidecar = d.spawn_sidecar(&[]);
    let otp = SocketAddr::from((e.addr(), support::EPMD_PORT));
    let ours = SocketAddr::from((d.addr(), support::EPMD_PORT));

    // Registered through the pod's own address: local for both.
    let register = |pod: &support::Pod, addr: SocketAddr| {
        let frame = Alive2::new(b"viaown").frame();
        pod.spawn_in(move || std_session(addr, &frame))
            .join()
            .unwrap()
    };
    let (_k1, o) = register(e, otp);
    let (_k2, d_seen) = register(d, ours);
    assert_eq!(o.end, End::Open);
    assert_eq!(any_creation(d_seen), any_creation(o));

    let from_x = |addr: SocketAddr, bytes: Vec<u8>| {
        x.spawn_in(move || std_session(addr, &bytes).1)
            .join()
            .unwrap()
    };
    for (what, bytes) in [
        ("ALIVE2", Alive2::new(b"remote").frame()),
        ("DUMP", frame(b'd', b"")),
        ("KILL", frame(b'k', b"")),
        ("STOP", frame(b's', b"viaown")),
    ] {
        let o = from_x(otp, bytes.clone());
        assert_eq!(o, Seen::new(b"", End::Closed), "remote {what}: epmd");
        assert_eq!(from_x(ours, bytes), o, "remote {what}");
    }
    // Nothing registered from afar, nothing stopped.
    for addr in [otp, ours] {
        let o = from_x(addr, frame(b'z', b"remote"));
        assert_eq!(o.reply, b"w\x01");
        let o = from_x(addr, frame(b'z', b"viaown"));
        assert_eq!(o.reply[..2], *b"w\x00");
    }
    // Remote lookups and NAMES: the same bytes but for the port, which is
    // the sidecar's distribution port (deliberate: it routes every
    // connection to the pod's nodes).
    let o = from_x(otp, frame(b'z', b"viaown"));
    let mut ours_seen = from_x(ours, frame(b'z', b"viaown"));
    assert_eq!(ours_seen.reply[2..4], support::DIST_PORT.to_be_bytes());
    ours_seen.reply[2..4].copy_from_slice(&o.reply[2..4]);
    assert_eq!(ours_seen, o);
    let o = from_x(otp, frame(b'n', b""));
    let ours_seen = from_x(ours, frame(b'n', b""));
    assert_eq!(
        String::from_utf8_lossy(&ours_seen.reply[4..]),
        format!("name viaown at port {}\n", support::DIST_PORT)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.reply[4..]),
        "name viaown at port 41000\n"
    );
    assert_eq!(o.reply[..4], ours_seen.reply[..4]);
}
