//! The sidecar ↔ sidecar tunnel, measured in one run on loopback: raw
//! bytes through every path, and real BEAM-to-BEAM
//! distribution through the TLS sidecar pair against OTP's own
//! `inet_tls_dist` between the same kind of nodes, with the same
//! certificates.
//!
//! **Part 1, raw bytes.** A fake node (blocking sockets, one thread per
//! connection; it answers the handshake's first frames, then sinks or
//! echoes) is reached four ways, each connection set up as a BEAM would set
//! it up:
//!
//! - `direct`: connect to the node's own port;
//! - `one hop`: `PORT_PLEASE2_REQ` to sidecar B (`loopback_lookups =
//!   "proxy"`), connect to its distribution port; B routes and splices (what
//!   `benches/relay.rs` measures);
//! - `plain pair`: egress request (`'E'`, as `distproxy_epmd` sends it) to
//!   sidecar A, connect to the egress port; A reads `send_name`, dials B,
//!   sends the preamble, B routes by name to the node;
//! - `TLS pair`: the same between sidecars AT and BT with `[tls]` (mutual
//!   TLS 1.3, rcgen certificates with IP SANs, `verify_server_name =
//!   "hostname"`).
//!
//! Bulk one way (the client writes N bytes and half-closes; the node answers
//! with the count) and 64-byte ping-pong (p50/p99), paths interleaved run by
//! run so drift falls on every column. Each sidecar is the real binary
//! (`distproxy run --config <tmp>`), so the load generator and the proxies do
//! not share a runtime; the sidecars' CPU time per GiB relayed is reported.
//!
//! **Part 2, BEAM to BEAM.** Pairs of real OTP nodes (`erl` on PATH), a
//! helper module compiled with `erlc` into a temp dir: the sending node
//! sends 1 MiB binaries to a registered process on the receiving node for a
//! fixed time, then waits for the receiver's count (which must match). MB/s
//! is bytes over the time until that answer; median of several runs, modes
//! interleaved. Modes:
//!
//! - (c) `inet_tcp_dist` directly between the nodes (the baseline);
//! - (b) OTP's `inet_tls_dist` directly between the nodes
//!   (`-proto_dist inet_tls -ssl_dist_optfile`, TLS 1.3 only, `verify_peer`
//!   and `fail_if_no_peer_cert` on the server, `verify_peer` and a server
//!   name check against the IP SAN on the client, the sidecars'
//!   certificates and CA); on OTP 25 its figure varies several-fold from
//!   one bench run to the next on a busy machine, which the ratio shows;
//! - (a) `inet_tcp_dist` with `-epmd_module distproxy_epmd` through the TLS
//!   sidecar pair AT → BT;
//! - (d) the same through the plain pair A → B (what TLS costs in the tunnel);
//! - (e) (b)'s nodes through one sidecar, B, which routes their own TLS by
//!   lookup correlation without decrypting it (`dist.beam_tls`): what a
//!   cluster that keeps `inet_tls_dist` pays for the sidecar.
//!
//! Every node is on 127.0.0.1 with `-start_epmd false`; (c) and (b) register
//! with sidecar A (loopback lookups answered with the node's own port, so
//! they connect directly), (a) and (d) with their pod's sidecar, (e) with B
//! (loopback lookups answered with B's distribution port). Port 4369 is
//! never used. The bench checks that each connection took the intended path
//! (the peer port the sending node connected to is the egress port, B's
//! distribution port, or the receiving node's own port).
//!
//! Child processes (sidecars and nodes) are killed when their guards drop,
//! including on panic; nodes also halt when their stdin closes, so they go
//! away with this process however it ends.
//!
//! **Baseline.** `--baseline BIN` (or `TUNNEL_BENCH_BASELINE=BIN`) adds two
//! rows to part 1: the plain and the TLS pair again, through sidecars of
//! another distproxy build started beside the others, interleaved with them
//! run by run, so a change is measured against the build before it in one
//! run. A section that build refuses is left out, and the run says so.
//!
//! Usage:
//!   cargo bench --bench tunnel               full run (about a minute on 2 CPUs)
//!   cargo bench --bench tunnel -- --quick    shorter (or TUNNEL_BENCH_QUICK=1)
//!   cargo bench --bench tunnel -- --baseline /tmp/distproxy-before
//! Without `--bench` (as `cargo test --benches` runs it) it does a smoke run
//! of part 1 with tiny sizes, well under a second, and skips part 2.
//! TUNNEL_BENCH_ONLY=raw or =beam runs one part; TUNNEL_BENCH_PROXY_BIN=<path>
//! measures another distproxy build; TUNNEL_BENCH_MSG_KIB=<n> changes the
//! size of the BEAM messages; TUNNEL_BENCH_VERBOSE=1 prints every BEAM run.
//! Without `erl`/`erlc`, part 2 is skipped with the reason printed.

use distproxy_testkit::bench::*;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use distproxy_testkit::sut::client;
use distproxy_testkit::sut::proto::NodeSpec;

/// Its full name as an egress request names it (the host part is what the
/// sidecar resolves and dials, and what BT's certificate must name).
const NODE_FULL: &str = "bench@127.0.0.1";
const MSG: usize = 64;

/// Sizes for one kind of run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    label: &'static str,
    bulk_bytes: u64,
    bulk_runs: usize,
    pingpong_iters: usize,
    pingpong_blocks: usize,
    beam: Option<BeamPlan>,
}

#[derive(Debug, Clone, Copy)]
struct BeamPlan {
    /// Sending time of one run.
    run_ms: u64,
    runs: usize,
    msg_bytes: usize,
}

const FULL: Plan = Plan {
    label: "full",
    bulk_bytes: 512 << 20,
    bulk_runs: 5,
    pingpong_iters: 20_000,
    pingpong_blocks: 5,
    beam: Some(BeamPlan {
        run_ms: 2000,
        runs: 5,
        msg_bytes: 1 << 20,
    }),
};

const QUICK: Plan = Plan {
    label: "quick",
    bulk_bytes: 128 << 20,
    bulk_runs: 3,
    pingpong_iters: 8_000,
    pingpong_blocks: 4,
    beam: Some(BeamPlan {
        run_ms: 1000,
        runs: 3,
        msg_bytes: 1 << 20,
    }),
};

const SMOKE: Plan = Plan {
    label: "smoke (run with --bench for figures)",
    bulk_bytes: 4 << 20,
    bulk_runs: 1,
    pingpong_iters: 200,
    pingpong_blocks: 1,
    beam: None,
};

// ---------------------------------------------------------------- fake node

// ----------------------------------------------------------------- sidecars

/// Every sidecar of the bench.
struct Sidecars {
    /// Pod B, plain: the one hop (lookups from loopback answered with the
    /// proxy port) and the far end of the plain pair.
    b: Sidecar,
    /// Pod A, plain: egress to B; also the EPMD of the direct BEAM pairs.
    a: Sidecar,
    /// Pod B with TLS.
    bt: Sidecar,
    /// Pod A with TLS: egress to BT.
    at: Sidecar,
    /// The two pairs of the baseline build (`--baseline BIN`).
    baseline: Option<Pairs>,
}

/// A plain pair (A → B) and a TLS pair (AT → BT) of one build.
struct Pairs {
    b: Sidecar,
    a: Sidecar,
    bt: Sidecar,
    at: Sidecar,
}

impl Pairs {
    /// Starts the pairs from `bin`; `adapt` turns each configuration into
    /// one the binary accepts.
    fn start(bin: &str, pki: &Pki, adapt: &dyn Fn(&str) -> String) -> Pairs {
        let b = start_sidecar(
            bin,
            "B",
            "error",
            &adapt("[routing]\nloopback_lookups = \"proxy\"\n"),
        );
        let a = start_sidecar(
            bin,
            "A",
            "error",
            &adapt(&format!("[tunnel]\nremote_port = {}\n", b.dist.port())),
        );
        let bt = start_sidecar(bin, "BT", "error", &adapt(&tls_section(pki, &pki.b)));
        let at = start_sidecar(
            bin,
            "AT",
            "error",
            &adapt(&format!(
                "[tunnel]\nremote_port = {}\n\n{}",
                bt.dist.port(),
                tls_section(pki, &pki.a)
            )),
        );
        Pairs { b, a, bt, at }
    }
}

fn start_sidecars(pki: &Pki, baseline: Option<&str>) -> Sidecars {
    let bin = distproxy_testkit::distproxy_bin!("TUNNEL_BENCH_PROXY_BIN");
    let Pairs { b, a, bt, at } = Pairs::start(&bin, pki, &|extra| extra.to_string());
    let baseline = baseline.map(|base| {
        let adapt = |extra: &str| {
            let (config, dropped) = config_accepted_by(base, extra, &["limits"]);
            if !dropped.is_empty() {
                println!("baseline {base}: started without {}", dropped.join(", "));
            }
            config
        };
        Pairs::start(base, pki, &adapt)
    });
    Sidecars {
        b,
        a,
        bt,
        at,
        baseline,
    }
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| cpu_secs(p)).sum()
}

// ------------------------------------------------------- part 1: raw bytes

/// How the client reaches the fake node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Direct,
    Hop,
    PlainPair,
    TlsPair,
    /// The pairs of the baseline build.
    BasePlainPair,
    BaseTlsPair,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Hop => "one hop (router, splice)",
            Route::PlainPair => "plain sidecar pair",
            Route::TlsPair => "TLS sidecar pair",
            Route::BasePlainPair => "plain pair, baseline",
            Route::BaseTlsPair => "TLS pair, baseline",
        }
    }
}

/// The routes of this run, in row order.
fn routes(sc: &Sidecars) -> Vec<Route> {
    let mut all = vec![Route::Direct, Route::Hop, Route::PlainPair, Route::TlsPair];
    if sc.baseline.is_some() {
        all.extend([Route::BasePlainPair, Route::BaseTlsPair]);
    }
    all
}

struct Raw<'a> {
    node_port: u16,
    sc: &'a Sidecars,
    /// Keep the fake node registered with B and BT.
    _registrations: Vec<tokio::net::TcpStream>,
}

impl<'a> Raw<'a> {
    fn new(sc: &'a Sidecars) -> Raw<'a> {
        let node_port = start_fake_node();
        let spec = NodeSpec {
            port: node_port,
            node_type: 77,
            protocol: 0,
            highest_version: 6,
            lowest_version: 5,
            name: NODE.to_string(),
            extra: Bytes::new(),
        };
        let base = sc.baseline.iter().flat_map(|p| [&p.b, &p.bt]);
        let registrations = [&sc.b, &sc.bt]
            .into_iter()
            .chain(base)
            .map(|s| {
                let (conn, reply) = block_on(client::register(s.epmd, spec.clone()))
                    .unwrap_or_else(|e| panic!("register the fake node with {}: {e}", s.label));
                assert_eq!(reply.result, 0, "registration with {}", s.label);
                conn
            })
            .collect();
        Raw {
            node_port,
            sc,
            _registrations: registrations,
        }
    }

    /// The sidecars a route goes through (their CPU time is charged to it).
    fn pids(&self, route: Route) -> Vec<u32> {
        match route {
            Route::Direct => vec![],
            Route::Hop => vec![self.sc.b.pid()],
            Route::PlainPair => vec![self.sc.a.pid(), self.sc.b.pid()],
            Route::TlsPair => vec![self.sc.at.pid(), self.sc.bt.pid()],
            Route::BasePlainPair => vec![self.base().a.pid(), self.base().b.pid()],
            Route::BaseTlsPair => vec![self.base().at.pid(), self.base().bt.pid()],
        }
    }

    fn base(&self) -> &Pairs {
        self.sc.baseline.as_ref().expect("a baseline build")
    }

    /// A connection to the node with the handshake's first frames done.
    fn connect(&self, route: Route, mode: Mode) -> TcpStream {
        let port = match route {
            Route::Direct => self.node_port,
            Route::Hop => {
                let port = lookup_port(self.sc.b.epmd, NODE);
                assert_eq!(
                    port,
                    self.sc.b.dist.port(),
                    "lookup answered the proxy port"
                );
                port
            }
            Route::PlainPair => egress_port(self.sc.a.epmd, NODE_FULL),
            Route::TlsPair => egress_port(self.sc.at.epmd, NODE_FULL),
            Route::BasePlainPair => egress_port(self.base().a.epmd, NODE_FULL),
            Route::BaseTlsPair => egress_port(self.base().at.epmd, NODE_FULL),
        };
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        complete_handshake(&mut s, mode, &format!("{route:?}"));
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// One-way bulk transfer; seconds from first write to the node's count.
    fn bulk(&self, route: Route, bytes: u64) -> f64 {
        let mut s = self.connect(route, Mode::Sink);
        bulk_to_sink(&mut s, bytes, &format!("{route:?}"))
    }

    /// Round-trip times in nanoseconds of `iters` 64-byte ping-pongs.
    fn ping_pong(&self, route: Route, iters: usize, out: &mut Vec<u64>) {
        let mut s = self.connect(route, Mode::Echo);
        let what = format!("{route:?}");
        distproxy_testkit::bench::ping_pong(&mut s, &mut [0u8; MSG], iters, out, &what);
    }
}

/// Figures of one route.
#[derive(Default)]
struct RawRow {
    mbs: Vec<f64>,
    /// Sidecar CPU seconds spent during the bulk runs.
    bulk_cpu: f64,
    rtt_ns: Vec<u64>,
    pp_cpu: f64,
}

fn run_raw(sc: &Sidecars, plan: &Plan) -> Vec<(Route, RawRow)> {
    let raw = Raw::new(sc);
    let routes = routes(sc);
    let mut rows: Vec<(Route, RawRow)> = routes.iter().map(|&p| (p, RawRow::default())).collect();
    // Warm-up: one connection per route (egress listeners, TLS setup, pipes).
    for &p in &routes {
        raw.bulk(p, 1 << 20);
    }
    for _ in 0..plan.bulk_runs {
        for (p, row) in rows.iter_mut() {
            let pids = raw.pids(*p);
            let c0 = cpu_of(&pids);
            let secs = raw.bulk(*p, plan.bulk_bytes);
            row.bulk_cpu += cpu_of(&pids) - c0;
            row.mbs.push(mb_per_s(plan.bulk_bytes, secs));
        }
    }
    let block = plan.pingpong_iters.div_ceil(plan.pingpong_blocks);
    for _ in 0..plan.pingpong_blocks {
        for (p, row) in rows.iter_mut() {
            let pids = raw.pids(*p);
            let c0 = cpu_of(&pids);
            raw.ping_pong(*p, block, &mut row.rtt_ns);
            row.pp_cpu += cpu_of(&pids) - c0;
        }
    }
    rows
}

fn print_raw(rows: &mut [(Route, RawRow)], plan: &Plan) -> Option<f64> {
    println!(
        "Part 1: raw bytes, fake node ({} runs of {} MiB one way; {} x 64 B ping-pongs per path)",
        plan.bulk_runs,
        plan.bulk_bytes >> 20,
        plan.pingpong_iters
    );
    println!(
        "{:<26} {:>9} {:>6} {:>13} {:>9} {:>6} {:>9} {:>6} {:>10} {:>9}",
        "path",
        "bulk MB/s",
        "ratio",
        "runs",
        "p50 us",
        "ratio",
        "p99 us",
        "ratio",
        "CPU s/GiB",
        "CPU us/rt"
    );
    println!("{}", "-".repeat(113));
    let mut direct = (0.0, 0.0, 0.0);
    let mut tls_ratio = None;
    for (route, row) in rows.iter_mut() {
        row.rtt_ns.sort_unstable();
        let mbs = median(&mut row.mbs);
        let p50 = percentile_us(&row.rtt_ns, 0.50);
        let p99 = percentile_us(&row.rtt_ns, 0.99);
        if *route == Route::Direct {
            direct = (mbs, p50, p99);
        }
        if *route == Route::TlsPair {
            tls_ratio = Some(mbs / direct.0);
        }
        let gib = plan.bulk_bytes as f64 * plan.bulk_runs as f64 / (1u64 << 30) as f64;
        let (cpu_gib, cpu_rt) = if *route == Route::Direct {
            ("-".to_string(), "-".to_string())
        } else {
            (
                format!("{:.2}", row.bulk_cpu / gib),
                format!("{:.1}", row.pp_cpu * 1e6 / row.rtt_ns.len() as f64),
            )
        };
        println!(
            "{:<26} {:>9.0} {:>5.2}x {:>13} {:>9.1} {:>5.2}x {:>9.1} {:>5.2}x {:>10} {:>9}",
            route.label(),
            mbs,
            mbs / direct.0,
            spread(&row.mbs),
            p50,
            p50 / direct.1,
            p99,
            p99 / direct.2,
            cpu_gib,
            cpu_rt
        );
    }
    println!(
        "(CPU: user+system time of the sidecars on the path, per GiB relayed in the bulk runs \
         and per round trip in the ping-pongs)"
    );
    tls_ratio
}

// ---------------------------------------------------- part 2: BEAM to BEAM

/// The Erlang side of part 2. `sink/0` on the receiving node, `control/0` on
/// the sending node (commands on stdin, one answer line each on stdout);
/// both halt when stdin closes.
const HELPER_ERL: &str = r#"-module(tunnel_bench).
-export([sink/0, control/0, match_ip/2]).

%% For inet_tls_dist's server name check: a node's IP host (checked as a
%% DNS name) matches an equal IP SAN; anything else is checked as usual.
match_ip({dns_id, Host}, {iPAddress, Bytes}) ->
    case inet:parse_strict_address(Host) of
        {ok, Ip} -> tuple_to_list(Ip) =:= Bytes;
        _ -> default
    end;
match_ip(_, _) ->
    default.

sink() ->
    true = register(tunnel_bench_sink, spawn(fun() -> sink_loop(0, 0) end)),
    io:format("ready~n"),
    wait_eof().

sink_loop(Msgs, Bytes) ->
    receive
        Bin when is_binary(Bin) -> sink_loop(Msgs + 1, Bytes + byte_size(Bin));
        {done, From, Ref} -> From ! {Ref, Msgs, Bytes}, sink_loop(0, 0)
    end.

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

%% Connects and answers with the port the connection went to.
command(["connect", NodeS]) ->
    Node = list_to_atom(NodeS),
    case net_kernel:connect_node(Node) of
        true ->
            Sink = rpc:call(Node, erlang, whereis, [tunnel_bench_sink]),
            true = is_pid(Sink),
            {ok, Info} = net_kernel:node_info(Node),
            {address, Address} = lists:keyfind(address, 1, Info),
            {_Ip, Port} = element(2, Address),
            io_lib:format("connected ~b", [Port]);
        false ->
            "error connect_failed"
    end;
%% Sends Size-byte binaries for Ms milliseconds, then waits for the count.
command(["send", NodeS, MsS, SizeS]) ->
    Node = list_to_atom(NodeS),
    Size = list_to_integer(SizeS),
    Bin = rand:bytes(Size),
    Dest = {tunnel_bench_sink, Node},
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
    end.

send_loop(Dest, Bin, Deadline, N) ->
    send_n(Dest, Bin, 8),
    case erlang:monotonic_time(microsecond) >= Deadline of
        true -> N + 8;
        false -> send_loop(Dest, Bin, Deadline, N + 8)
    end.

send_n(_, _, 0) -> ok;
send_n(Dest, Bin, K) -> Dest ! Bin, send_n(Dest, Bin, K - 1).
"#;

const MODULE_SRC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/erlang/distproxy_epmd.erl"
);

const COOKIE: &str = "distproxy_tunnel_bench";

/// Why part 2 cannot run here, if it cannot.
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

/// Compiles the helper and `distproxy_epmd` into a temp dir.
fn compile_erlang() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir for Erlang");
    let helper = dir.path().join("tunnel_bench.erl");
    std::fs::write(&helper, HELPER_ERL).unwrap();
    let out = Command::new("erlc")
        .arg("-o")
        .arg(dir.path())
        .arg(&helper)
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

/// The `-ssl_dist_optfile` of one node: its pod's certificate, the CA,
/// TLS 1.3 only, peers verified both ways.
fn ssl_dist_optfile(
    dir: &Path,
    pki: &Pki,
    (cert, key): &(PathBuf, PathBuf),
    name: &str,
) -> PathBuf {
    let opts = format!(
        "[{{certfile, \"{c}\"}}, {{keyfile, \"{k}\"}}, {{cacertfile, \"{ca}\"}}, \
         {{verify, verify_peer}}, {{versions, ['tlsv1.3']}}",
        c = cert.display(),
        k = key.display(),
        ca = pki.ca.display()
    );
    // OTP 25's inet_tls_dist checks the host part of the node name (here
    // "127.0.0.1", given as the server name) as a DNS name, which no IP SAN
    // matches: `tunnel_bench:match_ip/2` matches it against the IP SANs,
    // the check the sidecars make. (The file is evaluated, so a fun works.)
    let text = format!(
        "[{{server, {opts}, {{fail_if_no_peer_cert, true}}]}},\n \
         {{client, {opts}, {{customize_hostname_check, \
         [{{match_fun, fun tunnel_bench:match_ip/2}}]}}]}}].\n"
    );
    let path = dir.join(format!("{name}.ssl_dist.conf"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The answers of the helper start with one of these.
const ANSWERS: &[&str] = &["ready", "connected ", "sent ", "error"];

/// A running node of the bench's helper module (killed on drop).
type Beam = BenchNode;

/// Starts node `name@127.0.0.1` running `tunnel_bench:Role()` with `args`.
fn start_beam(name: &str, role: &str, epmd_port: u16, ebin: &Path, args: &[&str]) -> Beam {
    let mut flags: Vec<String> = vec!["-setcookie".into(), COOKIE.into()];
    flags.extend(args.iter().map(|a| a.to_string()));
    BenchNode::start(
        name,
        ("tunnel_bench", role),
        epmd_port,
        ebin,
        &flags,
        ANSWERS,
    )
}

/// How the two nodes of a pair are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dist {
    /// (c) inet_tcp_dist, directly.
    Tcp,
    /// (b) inet_tls_dist, directly.
    Tls,
    /// (a) inet_tcp_dist through the TLS sidecar pair.
    TlsTunnel,
    /// (d) inet_tcp_dist through the plain sidecar pair.
    PlainTunnel,
    /// (e) inet_tls_dist through one sidecar, which routes the nodes' own
    /// TLS undecrypted (`dist.beam_tls`).
    TlsHop,
}

const DISTS: [Dist; 5] = [
    Dist::Tcp,
    Dist::Tls,
    Dist::TlsTunnel,
    Dist::PlainTunnel,
    Dist::TlsHop,
];

impl Dist {
    fn label(self) -> &'static str {
        match self {
            Dist::Tcp => "(c) inet_tcp_dist direct",
            Dist::Tls => "(b) inet_tls_dist direct",
            Dist::TlsTunnel => "(a) tcp via TLS sidecar pair",
            Dist::PlainTunnel => "(d) tcp via plain sidecar pair",
            Dist::TlsHop => "(e) inet_tls_dist via one sidecar",
        }
    }

    fn rx_short(self) -> String {
        format!("{}_rx", self.prefix())
    }

    fn prefix(self) -> &'static str {
        match self {
            Dist::Tcp => "tcp",
            Dist::Tls => "tls",
            Dist::TlsTunnel => "tun",
            Dist::PlainTunnel => "ptun",
            Dist::TlsHop => "tlsh",
        }
    }
}

/// A sending and a receiving node, connected.
struct Pair {
    dist: Dist,
    tx: Beam,
    rx: Beam,
    sidecar_pids: Vec<u32>,
}

fn start_pairs(sc: &Sidecars, pki: &Pki, ebin: &Path) -> Vec<Pair> {
    let mut pairs = Vec::new();
    let module = ["-epmd_module", "distproxy_epmd"];
    for dist in DISTS {
        let p = dist.prefix();
        let (tx_name, rx_name) = (format!("{p}_tx"), format!("{p}_rx"));
        let (tx, rx, sidecar_pids) = match dist {
            Dist::Tcp => (
                start_beam(&tx_name, "control", sc.a.epmd.port(), ebin, &[]),
                start_beam(&rx_name, "sink", sc.a.epmd.port(), ebin, &[]),
                vec![],
            ),
            Dist::Tls | Dist::TlsHop => {
                // (e): both registered with B, which answers loopback
                // lookups with its distribution port.
                let (epmd, pids) = match dist {
                    Dist::TlsHop => (sc.b.epmd.port(), vec![sc.b.pid()]),
                    _ => (sc.a.epmd.port(), vec![]),
                };
                let tx_opts = ssl_dist_optfile(ebin, pki, &pki.a, &tx_name);
                let rx_opts = ssl_dist_optfile(ebin, pki, &pki.b, &rx_name);
                let args = |f: &Path| {
                    vec![
                        "-proto_dist".to_string(),
                        "inet_tls".to_string(),
                        "-ssl_dist_optfile".to_string(),
                        f.display().to_string(),
                    ]
                };
                let (ta, ra) = (args(&tx_opts), args(&rx_opts));
                let ta: Vec<&str> = ta.iter().map(String::as_str).collect();
                let ra: Vec<&str> = ra.iter().map(String::as_str).collect();
                (
                    start_beam(&tx_name, "control", epmd, ebin, &ta),
                    start_beam(&rx_name, "sink", epmd, ebin, &ra),
                    pids,
                )
            }
            Dist::TlsTunnel => (
                start_beam(&tx_name, "control", sc.at.epmd.port(), ebin, &module),
                start_beam(&rx_name, "sink", sc.bt.epmd.port(), ebin, &module),
                vec![sc.at.pid(), sc.bt.pid()],
            ),
            Dist::PlainTunnel => (
                start_beam(&tx_name, "control", sc.a.epmd.port(), ebin, &module),
                start_beam(&rx_name, "sink", sc.b.epmd.port(), ebin, &module),
                vec![sc.a.pid(), sc.b.pid()],
            ),
        };
        pairs.push(Pair {
            dist,
            tx,
            rx,
            sidecar_pids,
        });
    }
    for pair in &mut pairs {
        pair.tx.answer("start-up", Duration::from_secs(60));
        pair.rx.answer("start-up", Duration::from_secs(60));
    }
    for pair in &mut pairs {
        let line = pair.tx.command(
            &format!("connect {}", pair.rx.name()),
            Duration::from_secs(30),
        );
        let port: u16 = line["connected ".len()..].trim().parse().expect("port");
        // The path taken: the egress port of the sending pod's sidecar for
        // the tunnels, the receiving node's own port otherwise.
        let (epmd, expected) = match pair.dist {
            Dist::Tcp | Dist::Tls => (sc.a.epmd, lookup_port(sc.a.epmd, &pair.dist.rx_short())),
            Dist::TlsTunnel => (sc.at.epmd, egress_port(sc.at.epmd, pair.rx.name())),
            Dist::PlainTunnel => (sc.a.epmd, egress_port(sc.a.epmd, pair.rx.name())),
            Dist::TlsHop => (sc.b.epmd, sc.b.dist.port()),
        };
        assert_eq!(
            port,
            expected,
            "{}: connected to port {port}, expected {expected} (from {epmd})",
            pair.dist.label()
        );
    }
    pairs
}

/// One run: MB/s, checking the receiver's count.
fn beam_run(pair: &mut Pair, run_ms: u64, msg_bytes: usize) -> f64 {
    let line = pair.tx.command(
        &format!("send {} {run_ms} {msg_bytes}", pair.rx.name()),
        Duration::from_millis(run_ms + 120_000),
    );
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().expect("number"))
        .collect();
    let (sent, msgs, bytes, us) = (f[0], f[1], f[2], f[3]);
    if std::env::var_os("TUNNEL_BENCH_VERBOSE").is_some() {
        eprintln!(
            "{}: {sent} messages in {:.2} s",
            pair.dist.label(),
            us as f64 / 1e6
        );
    }
    assert_eq!(msgs, sent, "{}: every message arrived", pair.dist.label());
    assert_eq!(
        bytes,
        sent * msg_bytes as u64,
        "{}: every byte arrived",
        pair.dist.label()
    );
    bytes as f64 / us as f64
}

#[derive(Default)]
struct BeamRow {
    mbs: Vec<f64>,
    bytes: f64,
    node_cpu: f64,
    sidecar_cpu: f64,
}

fn run_beam(sc: &Sidecars, pki: &Pki, plan: &BeamPlan) -> Vec<(Dist, BeamRow)> {
    let ebin = compile_erlang();
    let mut pairs = start_pairs(sc, pki, ebin.path());
    // Warm-up: one short run each.
    for pair in &mut pairs {
        beam_run(pair, 300, plan.msg_bytes);
    }
    let mut rows: Vec<(Dist, BeamRow)> = DISTS.iter().map(|&d| (d, BeamRow::default())).collect();
    for _ in 0..plan.runs {
        for (pair, (_, row)) in pairs.iter_mut().zip(rows.iter_mut()) {
            let nodes = [pair.tx.pid(), pair.rx.pid()];
            let (n0, s0) = (cpu_of(&nodes), cpu_of(&pair.sidecar_pids));
            let t0 = Instant::now();
            let mbs = beam_run(pair, plan.run_ms, plan.msg_bytes);
            row.bytes += mbs * 1e6 * t0.elapsed().as_secs_f64();
            row.node_cpu += cpu_of(&nodes) - n0;
            row.sidecar_cpu += cpu_of(&pair.sidecar_pids) - s0;
            row.mbs.push(mbs);
        }
    }
    drop(pairs);
    rows
}

fn print_beam(rows: &mut [(Dist, BeamRow)], plan: &BeamPlan) -> (f64, f64) {
    println!(
        "Part 2: BEAM to BEAM distribution, {} KiB binaries to a process on the other node, \
         {} runs of {} ms each, median",
        plan.msg_bytes >> 10,
        plan.runs,
        plan.run_ms
    );
    println!(
        "{:<32} {:>8} {:>13} {:>9} {:>9} {:>13} {:>13}",
        "mode", "MB/s", "runs", "vs (c)", "vs (b)", "nodes s/GiB", "sidecars s/GiB"
    );
    println!("{}", "-".repeat(104));
    let medians: Vec<f64> = rows.iter_mut().map(|(_, r)| median(&mut r.mbs)).collect();
    let at = |d: Dist| medians[DISTS.iter().position(|&x| x == d).unwrap()];
    let (tcp, tls) = (at(Dist::Tcp), at(Dist::Tls));
    for ((dist, row), m) in rows.iter().zip(&medians) {
        let gib = row.bytes / (1u64 << 30) as f64;
        let sidecars = if row.sidecar_cpu > 0.0 || !matches!(dist, Dist::Tcp | Dist::Tls) {
            format!("{:.2}", row.sidecar_cpu / gib)
        } else {
            "-".into()
        };
        println!(
            "{:<32} {:>8.0} {:>13} {:>8.2}x {:>8.2}x {:>13.2} {:>13}",
            dist.label(),
            m,
            spread(&row.mbs),
            m / tcp,
            m / tls,
            row.node_cpu / gib,
            sidecars
        );
    }
    println!(
        "(CPU: user+system time of both nodes, and of the two sidecars on the path, per GiB moved)"
    );
    (at(Dist::TlsTunnel) / tls, at(Dist::TlsTunnel) / tcp)
}

// ------------------------------------------------------------------ figures

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benching = args.iter().any(|a| a == "--bench");
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("TUNNEL_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let mut plan = match (benching, quick) {
        (false, _) => SMOKE,
        (true, true) => QUICK,
        (true, false) => FULL,
    };
    if let (Some(beam), Some(kib)) = (
        plan.beam.as_mut(),
        std::env::var("TUNNEL_BENCH_MSG_KIB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&k| k > 0),
    ) {
        beam.msg_bytes = kib << 10;
    }
    let only = std::env::var("TUNNEL_BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|s| s.trim() == name);
    let started = Instant::now();
    let load_before = loadavg();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "tunnel bench, {} run: loopback, {cpus} CPUs, sidecars = {}",
        plan.label,
        distproxy_testkit::distproxy_bin!("TUNNEL_BENCH_PROXY_BIN")
    );
    let pki = make_pki();
    let baseline = baseline_arg(&args, "TUNNEL_BENCH_BASELINE");
    if let Some(b) = &baseline {
        println!("baseline build: {b}");
    }
    let sc = start_sidecars(&pki, baseline.as_deref());
    let mut targets = Vec::new();

    if wanted("raw") {
        let mut rows = run_raw(&sc, &plan);
        println!();
        if let Some(r) = print_raw(&mut rows, &plan) {
            let met = if r >= 0.2 { "met" } else { "MISSED" };
            targets.push(format!(
                "TLS pair >= 0.2x direct on raw bytes: {r:.2}x {met}"
            ));
        }
    }
    if wanted("beam") {
        println!();
        let beam = match (plan.beam, otp_missing()) {
            (None, _) => Err("smoke run (use --bench)".to_string()),
            (Some(_), Some(why)) => Err(why),
            (Some(beam), None) => Ok(beam),
        };
        match beam {
            Err(why) => println!("Part 2 (BEAM to BEAM) skipped: {why}"),
            Ok(beam) => {
                let mut rows = run_beam(&sc, &pki, &beam);
                let (vs_tls, vs_tcp) = print_beam(&mut rows, &beam);
                let met = if vs_tls >= 1.5 { "met" } else { "MISSED" };
                targets.push(format!(
                    "TLS pair >= 1.5x inet_tls_dist: {vs_tls:.2}x {met} \
                     ({vs_tcp:.2}x plain inet_tcp_dist)"
                ));
            }
        }
    }
    drop(sc);
    println!();
    if benching && !targets.is_empty() {
        println!("targets: {}", targets.join("; "));
    }
    println!(
        "elapsed {:.1} s; 1-min load average {} before, {} after (other processes on the machine skew figures)",
        started.elapsed().as_secs_f64(),
        load_before,
        loadavg()
    );
}
