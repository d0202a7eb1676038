//! BEAM to BEAM through the sidecar, against a direct connection and
//! HAProxy, in one run on loopback: what users of distribution feel.
//!
//! Three real OTP nodes (`erl`, `erlc` on PATH): a sending node `tx`, and
//! two receiving nodes `rx` and `rxt`, each running a sink (counts 1 MiB
//! binaries) and an echo process. `tx` uses a small `-epmd_module`
//! (`beam_bench_epmd`, compiled here) that answers `address_please/3` with
//! the port the bench chose for the target, or delegates to
//! `distproxy_epmd` (egress through the tunnel). Switching a path means
//! disconnecting `rx` and connecting again through the new port; the bench
//! checks the port the connection went to. Paths to `rx`:
//!
//! - `direct`: `rx`'s own listen port;
//! - `sidecar (splice)`: the distribution port of sidecar S (plain), where
//!   the bench registered `rx` (ALIVE2 from the bench) as S's only node, so
//!   S routes it (`single_node`), checks the challenge and relays with the
//!   default data path;
//! - `sidecar (sockmap)`: the same through sidecar F with
//!   `[relay] fast_path = "sockmap"` (needs root; left out when the binary
//!   or the kernel cannot, with the reason printed);
//! - `sidecar (sockmap+routes)`: the same through sidecar G, which also has
//!   node routes for its own cgroup (`fast_path_cgroup = "auto"`; the nodes
//!   are children of the bench, in the same cgroup): both nodes' messages
//!   skip the sidecar's sockets; the bench checks that both ends of every
//!   connection were routed;
//! - `haproxy`: HAProxy in TCP mode (Debian's `haproxy`, default settings
//!   but `nbthread 1`, as the sidecar's relay is one task per connection);
//!   left out with a message when not installed (`apt-get install haproxy`).
//!
//! And `TLS sidecar pair`: `tx` → its EPMD sidecar AT (egress request) →
//! mutual TLS → sidecar BT → `rxt`, as `benches/tunnel.rs` sets it up.
//!
//! Each round runs every path in turn (3 rounds; medians): 1 MiB binaries
//! sent for a fixed time to the sink, MB/s up to the sink's count (which
//! must match); then 100-byte echo round trips `{self(), Bin}` → `Bin`,
//! timed in the sending node, p50/p99. For the proxy on the path (sidecars,
//! HAProxy): user+system CPU seconds from `/proc/PID/stat` per GB relayed
//! in the bulk runs and per 100k messages in the echo runs (a round trip is
//! two messages). Ratios are against `direct` in the same run; the
//! `paired` columns compare each path with `direct` round by round (the
//! two measured seconds apart) and give the median of those, which the
//! machine's drift between rounds moves less.
//!
//! Usage:
//!   cargo bench --bench beam                 full run (about 1.5 min on 2 CPUs)
//!   cargo bench --bench beam -- --quick      shorter
//! BEAM_BENCH_PROXY_BIN=<path> measures another distproxy build;
//! BEAM_BENCH_ONLY=direct,splice,sockmap,routes,haproxy,tls runs some paths; BEAM_BENCH_ROUNDS=N.
//! Without `--bench` (as `cargo test --benches` runs it) it only says so.

use distproxy_testkit::bench::*;
use distproxy_testkit::process::Proc;
use distproxy_testkit::sut::client;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const COOKIE: &str = "distproxy_beam_bench";

#[derive(Debug, Clone, Copy)]
struct Plan {
    label: &'static str,
    rounds: usize,
    bulk_ms: u64,
    msg_bytes: usize,
    echo_iters: usize,
    echo_bytes: usize,
}

const FULL: Plan = Plan {
    label: "full",
    rounds: 3,
    bulk_ms: 2000,
    msg_bytes: 1 << 20,
    echo_iters: 20_000,
    echo_bytes: 100,
};

const QUICK: Plan = Plan {
    label: "quick",
    rounds: 3,
    bulk_ms: 700,
    msg_bytes: 1 << 20,
    echo_iters: 5_000,
    echo_bytes: 100,
};

const BENCH_EPMD_ERL: &str = r#"-module(beam_bench_epmd).
%% distproxy_epmd, except that address_please/3 answers a port chosen by
%% the bench for a node name (route/2), when there is one.
-export([start_link/0, register_node/2, register_node/3, port_please/2,
         port_please/3, listen_port_please/2, address_please/3, names/0,
         names/1, route/2]).

start_link() -> distproxy_epmd:start_link().
register_node(N, P) -> distproxy_epmd:register_node(N, P).
register_node(N, P, F) -> distproxy_epmd:register_node(N, P, F).
port_please(N, H) -> distproxy_epmd:port_please(N, H).
port_please(N, H, T) -> distproxy_epmd:port_please(N, H, T).
listen_port_please(N, H) -> distproxy_epmd:listen_port_please(N, H).
names() -> distproxy_epmd:names().
names(H) -> distproxy_epmd:names(H).

route(Name, Route) -> persistent_term:put({?MODULE, Name}, Route).

address_please(Name, Host, Family) ->
    case persistent_term:get({?MODULE, Name}, egress) of
        egress -> distproxy_epmd:address_please(Name, Host, Family);
        Port when is_integer(Port) -> {ok, {127,0,0,1}, Port, 6}
    end.
"#;

const HELPER_ERL: &str = r#"-module(beam_bench).
-export([sink/0, control/0]).

sink() ->
    true = register(beam_bench_sink, spawn(fun() -> sink_loop(0, 0) end)),
    true = register(beam_bench_echo, spawn(fun echo_loop/0)),
    io:format("ready~n"),
    wait_eof().

sink_loop(Msgs, Bytes) ->
    receive
        Bin when is_binary(Bin) -> sink_loop(Msgs + 1, Bytes + byte_size(Bin));
        {done, From, Ref} -> From ! {Ref, Msgs, Bytes}, sink_loop(0, 0)
    end.

echo_loop() ->
    receive {From, Bin} -> From ! Bin end,
    echo_loop().

wait_eof() ->
    case io:get_line("") of
        eof -> erlang:halt(0);
        {error, _} -> erlang:halt(0);
        _ -> wait_eof()
    end.

control() ->
    io:format("ready~n"),
    control_loop().

control_loop() ->
    case io:get_line("") of
        eof -> erlang:halt(0);
        {error, _} -> erlang:halt(0);
        Line ->
            Reply = try command(string:lexemes(string:trim(Line), " "))
                    catch C:R -> io_lib:format("error ~0p:~0p", [C, R])
                    end,
            io:format("~s~n", [Reply]),
            control_loop()
    end.

%% Disconnects NodeS, routes it through Route (a port or "egress") and
%% connects again; answers with the port the connection went to.
command(["via", NodeS, RouteS]) ->
    Node = list_to_atom(NodeS),
    [Name, _] = string:split(NodeS, "@"),
    Route = case RouteS of "egress" -> egress; _ -> list_to_integer(RouteS) end,
    disconnect(Node, 200),
    beam_bench_epmd:route(Name, Route),
    connect(Node, 50);
%% Sends Size-byte binaries for Ms milliseconds, then waits for the count.
command(["send", NodeS, MsS, SizeS]) ->
    Node = list_to_atom(NodeS),
    Size = list_to_integer(SizeS),
    Bin = rand:bytes(Size),
    Dest = {beam_bench_sink, Node},
    T0 = erlang:monotonic_time(microsecond),
    Sent = send_loop(Dest, Bin, T0 + 1000 * list_to_integer(MsS), 0),
    Ref = make_ref(),
    Dest ! {done, self(), Ref},
    receive
        {Ref, Msgs, Bytes} ->
            T1 = erlang:monotonic_time(microsecond),
            io_lib:format("sent ~b ~b ~b ~b", [Sent, Msgs, Bytes, T1 - T0])
    after 120000 ->
        "error no_count"
    end;
%% N timed round trips of a Size-byte binary (after a warm-up), p50 and
%% p99 in nanoseconds.
command(["echo", NodeS, NS, SizeS]) ->
    Node = list_to_atom(NodeS),
    N = list_to_integer(NS),
    Bin = rand:bytes(list_to_integer(SizeS)),
    Echo = {beam_bench_echo, Node},
    _ = rtts(Echo, Bin, max(100, N div 10), []),
    Ts = list_to_tuple(lists:sort(rtts(Echo, Bin, N, []))),
    P = fun(Q) -> element(1 + round((N - 1) * Q), Ts) end,
    io_lib:format("rtt ~b ~b ~b", [N, P(0.5), P(0.99)]).

disconnect(Node, Tries) ->
    erlang:disconnect_node(Node),
    case lists:member(Node, nodes(connected)) of
        false -> ok;
        true when Tries > 0 -> timer:sleep(5), disconnect(Node, Tries - 1);
        true -> error(still_connected)
    end.

%% The receiving node may not have seen the old connection go yet, and
%% refuses a new one until it has: try again for a while.
connect(Node, Tries) ->
    case net_kernel:connect_node(Node) of
        true ->
            {ok, Info} = net_kernel:node_info(Node),
            {address, Address} = lists:keyfind(address, 1, Info),
            {_Ip, Port} = element(2, Address),
            io_lib:format("connected ~b", [Port]);
        false when Tries > 0 -> timer:sleep(20), connect(Node, Tries - 1);
        false -> "error connect_failed"
    end.

send_loop(Dest, Bin, Deadline, N) ->
    send_n(Dest, Bin, 8),
    case erlang:monotonic_time(microsecond) >= Deadline of
        true -> N + 8;
        false -> send_loop(Dest, Bin, Deadline, N + 8)
    end.

send_n(_, _, 0) -> ok;
send_n(Dest, Bin, K) -> Dest ! Bin, send_n(Dest, Bin, K - 1).

rtts(_, _, 0, Acc) -> Acc;
rtts(Echo, Bin, K, Acc) ->
    T0 = erlang:monotonic_time(nanosecond),
    Echo ! {self(), Bin},
    receive Bin -> ok after 10000 -> error(no_echo) end,
    T1 = erlang:monotonic_time(nanosecond),
    rtts(Echo, Bin, K - 1, [T1 - T0 | Acc]).
"#;

const MODULE_SRC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/erlang/distproxy_epmd.erl"
);

fn otp_missing() -> Option<String> {
    let missing: Vec<&str> = ["erl", "erlc"]
        .into_iter()
        .filter(|tool| {
            Command::new(tool)
                .arg("-version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .collect();
    (!missing.is_empty()).then(|| format!("{} not found on PATH", missing.join(" and ")))
}

fn compile_erlang() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir for Erlang");
    let mut files = vec![];
    for (name, text) in [
        ("beam_bench.erl", HELPER_ERL),
        ("beam_bench_epmd.erl", BENCH_EPMD_ERL),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        files.push(p);
    }
    let out = Command::new("erlc")
        .arg("-o")
        .arg(dir.path())
        .args(&files)
        .arg(MODULE_SRC)
        .output()
        .expect("run erlc");
    assert!(
        out.status.success(),
        "erlc failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// The answers of the helper start with one of these.
const ANSWERS: &[&str] = &["ready", "connected ", "sent ", "rtt ", "error"];

/// A running node of the bench's helper module (killed on drop).
type Beam = BenchNode;

/// Starts node `name@127.0.0.1` running `beam_bench:Role()` with `args`.
fn start_beam(name: &str, role: &str, epmd_port: u16, ebin: &Path, args: &[String]) -> Beam {
    let mut flags: Vec<String> = vec![
        "-setcookie".into(),
        COOKIE.into(),
        "-connect_all".into(),
        "false".into(),
    ];
    flags.extend(args.iter().map(|a| a.to_string()));
    BenchNode::start(name, ("beam_bench", role), epmd_port, ebin, &flags, ANSWERS)
}

/// The numbers after the first word of an answer.
fn numbers(line: &str) -> Vec<u64> {
    line.split_whitespace()
        .skip(1)
        .map(|x| x.parse().expect("number"))
        .collect()
}

/// HAProxy in TCP mode from a free port to `to`, killed on drop.
struct Haproxy {
    proc: Proc,
    port: u16,
    _config: tempfile::NamedTempFile,
}

fn start_haproxy(to: u16) -> Result<Haproxy, String> {
    let bin = std::env::var("BEAM_BENCH_HAPROXY").unwrap_or_else(|_| "haproxy".into());
    if Command::new(&bin)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Err(format!(
            "{bin} not found (apt-get install haproxy, or BEAM_BENCH_HAPROXY=<path>)"
        ));
    }
    let port = free_port();
    let mut config = tempfile::NamedTempFile::new().expect("temp config");
    write!(
        config,
        "global\n  nbthread 1\n  maxconn 1000\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
         listen dist\n  bind 127.0.0.1:{port}\n  server rx 127.0.0.1:{to}\n"
    )
    .unwrap();
    config.flush().unwrap();
    let proc = Proc::spawn_unlogged(
        "haproxy",
        Command::new(&bin)
            .arg("-db")
            .arg("-f")
            .arg(config.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err("haproxy did not start listening".into());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(Haproxy {
        proc,
        port,
        _config: config,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    Direct,
    Splice,
    Sockmap,
    Routes,
    Haproxy,
    TlsPair,
}

impl Hop {
    fn label(self) -> &'static str {
        match self {
            Hop::Direct => "direct",
            Hop::Splice => "sidecar (default path)",
            Hop::Sockmap => "sidecar (sockmap)",
            Hop::Routes => "sidecar (sockmap+routes)",
            Hop::Haproxy => "haproxy",
            Hop::TlsPair => "TLS sidecar pair",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Hop::Direct => "direct",
            Hop::Splice => "splice",
            Hop::Sockmap => "sockmap",
            Hop::Routes => "routes",
            Hop::Haproxy => "haproxy",
            Hop::TlsPair => "tls",
        }
    }
}

/// One path: where `tx` connects, what to check, whose CPU counts.
struct Route {
    path: Hop,
    target: String,
    via: String,
    expect_port: u16,
    pids: Vec<u32>,
}

#[derive(Default)]
struct Row {
    mbs: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    bulk_bytes: f64,
    bulk_cpu: f64,
    msgs: f64,
    msg_cpu: f64,
    msg_switches: f64,
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| cpu_secs(p)).sum()
}

fn switches_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| ctx_switches(p) as f64).sum()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("beam bench: run with `cargo bench --bench beam` (needs erl; root for sockmap)");
        return;
    }
    if let Some(why) = otp_missing() {
        println!("beam bench skipped: {why}");
        return;
    }
    let mut plan = if args.iter().any(|a| a == "--quick") {
        QUICK
    } else {
        FULL
    };
    if let Some(r) = std::env::var("BEAM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        plan.rounds = r;
    }
    let only = std::env::var("BEAM_BENCH_ONLY").unwrap_or_default();
    let wanted = |p: Hop| {
        p == Hop::Direct || only.is_empty() || only.split(',').any(|s| s.trim() == p.short())
    };
    let started = Instant::now();
    let load_before = loadavg();
    let bin = distproxy_testkit::distproxy_bin!("BEAM_BENCH_PROXY_BIN");
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "beam bench, {} run: loopback, {cpus} CPUs, OTP nodes, sidecars = {bin}",
        plan.label
    );

    let pki = make_pki();
    let bt = start_sidecar(&bin, "BT", "error", &tls_section(&pki, &pki.b));
    let at = start_sidecar(
        &bin,
        "AT",
        "error",
        &format!(
            "[tunnel]\nremote_port = {}\n\n{}",
            bt.dist.port(),
            tls_section(&pki, &pki.a)
        ),
    );
    let s = start_sidecar(&bin, "S", "error", "");
    let fast = if wanted(Hop::Sockmap) {
        start_sockmap_sidecar(&bin, "F", false)
    } else {
        Err("not asked for".into())
    };
    let routed = if wanted(Hop::Routes) {
        start_sockmap_sidecar(&bin, "G", true)
    } else {
        Err("not asked for".into())
    };

    let ebin = compile_erlang();
    let rx_port = free_port();
    let pinned = |p: u16| {
        vec![
            "-kernel".to_string(),
            "inet_dist_listen_min".to_string(),
            p.to_string(),
            "inet_dist_listen_max".to_string(),
            p.to_string(),
        ]
    };
    let module = ["-epmd_module", "beam_bench_epmd"].map(String::from);
    let mut tx = start_beam("tx", "control", at.epmd.port(), ebin.path(), &module);
    let mut rx = start_beam("rx", "sink", at.epmd.port(), ebin.path(), &pinned(rx_port));
    let mut rxt = start_beam("rxt", "sink", bt.epmd.port(), ebin.path(), &[]);
    for b in [&mut tx, &mut rx, &mut rxt] {
        b.answer("start-up", Duration::from_secs(60));
    }
    // rx, as S's (and F's) only node: routed `single_node`.
    let mut registrations = Vec::new();
    let mut register = |epmd| {
        let (conn, reply) = block_on(async {
            let (c, r) = client::register(epmd, distproxy_testkit::sidecar::spec("rx", rx_port))
                .await
                .expect("register rx");
            (c.into_std().unwrap(), r)
        });
        assert_eq!(reply.result, 0, "rx registered with {epmd}");
        registrations.push(conn);
    };
    register(s.epmd);
    for (f, _) in [&fast, &routed].into_iter().flatten() {
        register(f.epmd);
    }
    let haproxy = if wanted(Hop::Haproxy) {
        start_haproxy(rx_port)
    } else {
        Err("not asked for".into())
    };

    let mut routes = vec![Route {
        path: Hop::Direct,
        target: rx.name().to_string(),
        via: rx_port.to_string(),
        expect_port: rx_port,
        pids: vec![],
    }];
    if wanted(Hop::Splice) {
        routes.push(Route {
            path: Hop::Splice,
            target: rx.name().to_string(),
            via: s.dist.port().to_string(),
            expect_port: s.dist.port(),
            pids: vec![s.pid()],
        });
    }
    match &fast {
        Ok((f, _)) => routes.push(Route {
            path: Hop::Sockmap,
            target: rx.name().to_string(),
            via: f.dist.port().to_string(),
            expect_port: f.dist.port(),
            pids: vec![f.pid()],
        }),
        Err(why) => println!("sidecar (sockmap) left out: {why}"),
    }
    match &routed {
        Ok((g, _)) => routes.push(Route {
            path: Hop::Routes,
            target: rx.name().to_string(),
            via: g.dist.port().to_string(),
            expect_port: g.dist.port(),
            pids: vec![g.pid()],
        }),
        Err(why) => println!("sidecar (sockmap+routes) left out: {why}"),
    }
    match &haproxy {
        Ok(h) => routes.push(Route {
            path: Hop::Haproxy,
            target: rx.name().to_string(),
            via: h.port.to_string(),
            expect_port: h.port,
            pids: vec![h.proc.pid()],
        }),
        Err(why) => println!("haproxy left out: {why}"),
    }
    if wanted(Hop::TlsPair) {
        let egress = egress_port(at.epmd, rxt.name());
        routes.push(Route {
            path: Hop::TlsPair,
            target: rxt.name().to_string(),
            via: "egress".into(),
            expect_port: egress,
            pids: vec![at.pid(), bt.pid()],
        });
    }

    let mut rows: Vec<Row> = routes.iter().map(|_| Row::default()).collect();
    let long = Duration::from_millis(plan.bulk_ms + 120_000);
    // Warm-up: each path once, briefly.
    for r in &routes {
        connect(&mut tx, r);
        tx.command(&format!("send {} 200 {}", r.target, plan.msg_bytes), long);
        tx.command(&format!("echo {} 500 {}", r.target, plan.echo_bytes), long);
    }
    for round in 0..plan.rounds {
        for (r, row) in routes.iter().zip(rows.iter_mut()) {
            connect(&mut tx, r);
            let c0 = cpu_of(&r.pids);
            let line = tx.command(
                &format!("send {} {} {}", r.target, plan.bulk_ms, plan.msg_bytes),
                long,
            );
            let (c1, w1) = (cpu_of(&r.pids), switches_of(&r.pids));
            let f = numbers(&line);
            let (sent, msgs, bytes, us) = (f[0], f[1], f[2], f[3]);
            assert_eq!(msgs, sent, "{}: every message arrived", r.path.label());
            assert_eq!(bytes, sent * plan.msg_bytes as u64, "{}", r.path.label());
            row.mbs.push(bytes as f64 / us as f64);
            row.bulk_bytes += bytes as f64;
            row.bulk_cpu += c1 - c0;

            let line = tx.command(
                &format!("echo {} {} {}", r.target, plan.echo_iters, plan.echo_bytes),
                long,
            );
            let (c2, w2) = (cpu_of(&r.pids), switches_of(&r.pids));
            row.msg_switches += w2 - w1;
            let f = numbers(&line);
            row.p50.push(f[1] as f64 / 1000.0);
            row.p99.push(f[2] as f64 / 1000.0);
            row.msgs += 2.0 * f[0] as f64;
            row.msg_cpu += c2 - c1;
            if std::env::var_os("BEAM_BENCH_VERBOSE").is_some() {
                eprintln!(
                    "round {round} {}: {:.0} MB/s, p50 {:.1} us",
                    r.path.label(),
                    row.mbs.last().unwrap(),
                    row.p50.last().unwrap()
                );
            }
        }
    }
    drop(tx);
    for (_, admin) in [&fast, &routed].into_iter().flatten() {
        let text = scrape(*admin).expect("metrics of F");
        let n = sample(&text, "distproxy_relay_connections_total{path=\"sockmap\"}").unwrap_or(0.0);
        assert!(n >= 1.0, "{admin} relayed through the sockmap:\n{text}");
    }
    if let Ok((_, admin)) = &routed {
        // Both nodes' messages skipped the sidecar's sockets.
        let text = scrape(*admin).expect("metrics of G");
        let connections =
            sample(&text, "distproxy_relay_connections_total{path=\"sockmap\"}").unwrap_or(0.0);
        let mut routed = Vec::new();
        for side in ["initiator", "acceptor"] {
            let series = format!("distproxy_relay_node_routes_total{{side=\"{side}\"}}");
            let n = sample(&text, &series).unwrap_or(0.0);
            assert_eq!(n, connections, "G routed every {side}:\n{text}");
            routed.push(format!("{side} {n}"));
        }
        println!(
            "sidecar (sockmap+routes): {connections} connections, routed ends: {}",
            routed.join(", ")
        );
    }

    println!();
    println!(
        "BEAM to BEAM: {} KiB binaries for {} ms, {}-byte echo x {}; {} rounds, paths alternated, median",
        plan.msg_bytes >> 10,
        plan.bulk_ms,
        plan.echo_bytes,
        plan.echo_iters,
        plan.rounds
    );
    println!(
        "{:<24} {:>7} {:>11} {:>6} {:>7} {:>8} {:>8} {:>9} {:>8} {:>9} {:>10} {:>8}",
        "path",
        "MB/s",
        "runs",
        "vs dir",
        "paired",
        "p50 us",
        "+p50 us",
        "paired +",
        "p99 us",
        "CPU s/GB",
        "CPU s/100k",
        "cs/msg"
    );
    println!("{}", "-".repeat(128));
    // Each round measures every path within seconds, so a path against
    // direct in the same round cancels the machine's drift between rounds.
    let paired: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| {
            let mut ratio: Vec<f64> = r.mbs.iter().zip(&rows[0].mbs).map(|(m, d)| m / d).collect();
            let mut added: Vec<f64> = r.p50.iter().zip(&rows[0].p50).map(|(p, d)| p - d).collect();
            (median(&mut ratio), median(&mut added))
        })
        .collect();
    let med: Vec<(f64, f64, f64)> = rows
        .iter_mut()
        .map(|r| (median(&mut r.mbs), median(&mut r.p50), median(&mut r.p99)))
        .collect();
    let (d_mbs, d_p50, _) = med[0];
    for (((r, row), (mbs, p50, p99)), (ratio, added)) in
        routes.iter().zip(&rows).zip(&med).zip(&paired)
    {
        let (gb, k) = (row.bulk_bytes / 1e9, row.msgs / 1e5);
        let cpu = |c: f64, per: f64| {
            if r.pids.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}", c / per)
            }
        };
        println!(
            "{:<24} {:>7.0} {:>11} {:>5.2}x {:>6.2}x {:>8.1} {:>8.1} {:>9.1} {:>8.1} {:>9} {:>10} {:>8}",
            r.path.label(),
            mbs,
            spread(&row.mbs),
            mbs / d_mbs,
            ratio,
            p50,
            p50 - d_p50,
            added,
            p99,
            cpu(row.bulk_cpu, gb),
            cpu(row.msg_cpu, k),
            cpu(row.msg_switches, row.msgs),
        );
    }
    println!(
        "(paired: the median over rounds of the path against direct in the same round; \
         CPU: user+system seconds of the proxies on the path (both sidecars for the pair) \
         per GB relayed and per 100k echo messages, /proc ticks are 10 ms; cs/msg: their \
         context switches per echo message)"
    );
    drop(registrations);
    println!(
        "elapsed {:.1} s; 1-min load average {} before, {} after",
        started.elapsed().as_secs_f64(),
        load_before,
        loadavg()
    );
}

fn connect(tx: &mut Beam, r: &Route) {
    let line = tx.command(
        &format!("via {} {}", r.target, r.via),
        Duration::from_secs(30),
    );
    let port: u16 = line["connected ".len()..].trim().parse().expect("port");
    assert_eq!(
        port,
        r.expect_port,
        "{}: connected to port {port}",
        r.path.label()
    );
}

/// Sidecar `label` with the kernel fast path, with or without node routes
/// (the nodes are in the sidecar's cgroup), when this binary and machine
/// can.
fn start_sockmap_sidecar(
    bin: &str,
    label: &'static str,
    routes: bool,
) -> Result<(Sidecar, SocketAddr), String> {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cgroup = if routes { "auto" } else { "off" };
    let extra = format!(
        "[admin]\nlisten = \"{admin}\"\n\n[relay]\nfast_path = \"sockmap\"\nfast_path_cgroup = \"{cgroup}\"\n"
    );
    let probe = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    std::fs::write(probe.path(), &extra).map_err(|e| e.to_string())?;
    let out = Command::new(bin)
        .arg("check-config")
        .arg(probe.path())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "this build has no fast path: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let f = start_sidecar(bin, label, "error", &extra);
    let text = scrape(admin).map_err(|e| format!("metrics of {label}: {e}"))?;
    let routes_on = sample(&text, "distproxy_relay_node_routes_available") == Some(1.0);
    match sample(&text, "distproxy_relay_fast_path_available") {
        Some(1.0) if routes_on || !routes => Ok((f, admin)),
        Some(1.0) => Err(format!("{label}: node routes refused (see its log)")),
        _ => Err(format!(
            "{label}: the kernel or the privileges refused it (see its log)"
        )),
    }
}
