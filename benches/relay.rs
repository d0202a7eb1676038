//! Relay throughput and latency: a direct TCP connection to a (fake) node
//! against the same traffic through distproxy's router, measured in one run
//! on loopback and reported as ratios to direct.
//!
//! The router runs as the real binary (`distproxy run --config <tmp>`, with
//! `loopback_lookups = "proxy"`), so the client and the proxy do not share a
//! runtime or a process. The fake node and the client use blocking sockets,
//! one thread per connection, identical for every path: whatever they cost
//! is in every column, and the difference is the relay. Every proxied
//! connection is set up as a BEAM would: `PORT_PLEASE2_REQ` to the proxy's
//! EPMD, connect to the announced port, `send_name`, read status and
//! challenge. A direct connection connects to the node's own port and does
//! the same handshake.
//!
//! A third column, "bare relay", goes through a minimal read/write relay
//! (tokio `copy_bidirectional`, 256 KiB buffers) in another process: what
//! one more hop costs on this machine at the least, so that a target missed
//! by the proxy can be told apart from one no relay can meet here.
//!
//! A fourth column, "baseline" (`--baseline BIN`), goes through another
//! distproxy build exactly as "proxy" does, started alongside it with the
//! same configuration, so that a change is measured before and after in
//! one run; ratios against direct, and proxy/baseline, are printed for it.
//! A binary other than the one built with the bench is first asked
//! (`BIN check-config FILE`) whether it accepts the configuration; builds
//! from before the per-source limit refuse `[limits]` and are started
//! without it (they have no such limit to raise), which the run says.
//!
//! Measured (paths interleaved run by run, so drift and noise from other
//! processes fall on every column):
//! - bulk one way: the client writes N bytes and half-closes; the node counts
//!   them and answers with the count; time from first write to answer.
//!   Median of several runs. Also the relay process's CPU time per GiB.
//! - bulk both ways: the node echoes; the client writes N bytes on one thread
//!   and reads the N echoed bytes on another (N each way at once).
//! - ping-pong: one 64-byte message, echoed, read back; per-round-trip times,
//!   p50 and p99, in blocks.
//! - idle connections: RSS and open files of the proxy process before and
//!   after opening many relayed connections that have each carried one
//!   ping-pong (kernel socket and pipe buffers are not in RSS); and RSS per
//!   connection left idle after echoing 1 MiB (buffers a relay kept). One
//!   run per distproxy build, proxy first.
//!
//! Usage:
//!   cargo bench --bench relay                full run (about 20 s on 2 CPUs)
//!   cargo bench --bench relay -- --quick     shorter (or RELAY_BENCH_QUICK=1)
//!   cargo bench --bench relay -- --baseline /tmp/distproxy-before
//!                                            adds the baseline column (or
//!                                            RELAY_BENCH_BASELINE_BIN=<path>)
//! Without `--bench` (as `cargo test --benches` runs it) it does a smoke run
//! of about a second with tiny sizes, to check that it works.
//! RELAY_BENCH_ONLY=bulk,bidir,pingpong,idle runs only those sections;
//! RELAY_BENCH_PROXY_BIN=<path> measures another distproxy build in the
//! proxy column. Copy a release binary away before rebuilding to keep it as
//! a baseline (`cargo bench` rebuilds `target/release/distproxy`).
//!
//! Loopback figures on a small VM move with CPU placement and other load
//! (direct bulk throughput alone can double from one run to the next); the
//! run prints the load average, and the bare-relay column is the anchor.

use distproxy_testkit::bench::*;
use distproxy_testkit::process::Proc;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use distproxy_testkit::sut::client;
use distproxy_testkit::sut::proto::{NodeSpec, Port2Reply};

const MSG: usize = 64;

/// Sizes for one kind of run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    label: &'static str,
    bulk_bytes: u64,
    bulk_runs: usize,
    bidir_bytes: u64,
    bidir_runs: usize,
    pingpong_iters: usize,
    pingpong_blocks: usize,
    idle_conns: usize,
    burst_conns: usize,
}

const FULL: Plan = Plan {
    label: "full",
    bulk_bytes: 512 << 20,
    bulk_runs: 5,
    bidir_bytes: 256 << 20,
    bidir_runs: 3,
    pingpong_iters: 50_000,
    pingpong_blocks: 5,
    idle_conns: 1000,
    burst_conns: 100,
};

const QUICK: Plan = Plan {
    label: "quick",
    bulk_bytes: 128 << 20,
    bulk_runs: 3,
    bidir_bytes: 64 << 20,
    bidir_runs: 3,
    pingpong_iters: 20_000,
    pingpong_blocks: 4,
    idle_conns: 200,
    burst_conns: 50,
};

const SMOKE: Plan = Plan {
    label: "smoke (run with --bench for figures)",
    bulk_bytes: 4 << 20,
    bulk_runs: 1,
    bidir_bytes: 1 << 20,
    bidir_runs: 1,
    pingpong_iters: 400,
    pingpong_blocks: 2,
    idle_conns: 10,
    burst_conns: 4,
};

// ---------------------------------------------------------------- fake node

// ------------------------------------------------------------------- proxy

/// Overrides the distproxy binary under test.
const BIN_VAR: &str = "RELAY_BENCH_PROXY_BIN";
/// Another distproxy build measured in the same run (as `--baseline BIN`).
const BASELINE_VAR: &str = "RELAY_BENCH_BASELINE_BIN";

/// What every distproxy in the bench runs with. Every connection comes from
/// 127.0.0.1: the idle section holds more than the default per-source
/// limit. Builds from before that limit refuse `[limits]` and are started
/// without it (see [`Build::new`]).
const PROXY_CONFIG: &str = "[routing]\nloopback_lookups = \"proxy\"\n\n\
                            [limits]\ndist_max_connections_per_source = 4096\n";

/// A distproxy process, killed on drop.
type Proxy = Sidecar;

/// A distproxy binary and the configuration it accepts.
struct Build {
    label: &'static str,
    bin: String,
    config: String,
    /// Said once at the start when the configuration had to be cut down.
    note: Option<String>,
}

impl Build {
    /// `bin` with [`PROXY_CONFIG`]; unless it is the binary built with this
    /// bench, the configuration is first put to `bin check-config`, and a
    /// `[limits]` section it refuses is left out.
    fn new(label: &'static str, bin: String) -> Build {
        if bin == env!("CARGO_BIN_EXE_distproxy") {
            return Build {
                label,
                bin,
                config: PROXY_CONFIG.to_string(),
                note: None,
            };
        }
        let (config, dropped) = config_accepted_by(&bin, PROXY_CONFIG, &["limits"]);
        let note = (!dropped.is_empty()).then(|| {
            format!(
                "{label}: {bin} refuses {}, started without it (no per-source limit to raise)",
                dropped.join(", ")
            )
        });
        Build {
            label,
            bin,
            config,
            note,
        }
    }

    fn start(&self) -> Proxy {
        start_sidecar(&self.bin, self.label, "warn", &self.config)
    }
}

// ------------------------------------------------------- reference relay

/// Runs as the reference relay: `relay-bench --bare-relay PORT` accepts on
/// 127.0.0.1 (port printed on stdout) and joins each connection to the node
/// at 127.0.0.1:PORT with `tokio::io::copy_bidirectional` (256 KiB buffers),
/// on tokio's default multi-thread runtime as distproxy uses. No EPMD, no
/// routing, no handshake inspection, no splice: the cost of one more hop
/// through a minimal read/write relay on this machine, to judge the proxy's
/// figures against. Exits when its standard input closes.
fn bare_relay_main(node_port: u16) {
    thread::spawn(|| {
        let _ = io::copy(&mut io::stdin(), &mut io::sink());
        std::process::exit(0);
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", l.local_addr().unwrap().port());
        io::stdout().flush().unwrap();
        loop {
            let Ok((mut a, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = a.set_nodelay(true);
                let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", node_port)).await
                else {
                    return;
                };
                let _ = b.set_nodelay(true);
                let _ =
                    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, CHUNK, CHUNK).await;
            });
        }
    });
}

/// The reference relay process, killed on drop.
struct BareRelay {
    proc: Proc,
    port: u16,
}

impl BareRelay {
    fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

fn start_bare_relay(node_port: u16) -> BareRelay {
    let mut proc = Proc::spawn_unlogged(
        "reference relay",
        Command::new(std::env::current_exe().expect("bench executable"))
            .arg("--bare-relay")
            .arg(node_port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let mut line = String::new();
    io::BufRead::read_line(
        &mut io::BufReader::new(proc.child_mut().stdout.take().unwrap()),
        &mut line,
    )
    .expect("reference relay port");
    let port = line.trim().parse().expect("reference relay port");
    BareRelay { proc, port }
}

/// Registers the fake node with `proxy`; the registration lasts as long as
/// the returned stream.
fn register(rt: &tokio::runtime::Runtime, proxy: &Proxy, node_port: u16) -> tokio::net::TcpStream {
    let spec = NodeSpec {
        port: node_port,
        node_type: 77,
        protocol: 0,
        highest_version: 6,
        lowest_version: 5,
        name: NODE.to_string(),
        extra: Bytes::new(),
    };
    rt.block_on(client::register(proxy.epmd, spec))
        .expect("register the fake node with distproxy")
        .0
}

// ------------------------------------------------------------------ client

/// How the client reaches the node (the discriminant is the column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct = 0,
    /// Through the reference relay.
    Bare = 1,
    /// Through distproxy: lookup, then its distribution port.
    Proxy = 2,
    /// The same through the baseline build (`--baseline BIN`).
    Baseline = 3,
}

const PATHS: [Path; 4] = [Path::Direct, Path::Bare, Path::Proxy, Path::Baseline];

struct Setup {
    rt: tokio::runtime::Runtime,
    node_port: u16,
    build: Build,
    proxy: Proxy,
    baseline: Option<(Build, Proxy)>,
    bare: BareRelay,
    /// Keep the node registered.
    _registrations: Vec<tokio::net::TcpStream>,
}

impl Setup {
    fn new(build: Build, baseline: Option<Build>) -> Setup {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let node_port = start_fake_node();
        let proxy = build.start();
        let baseline = baseline.map(|b| {
            let p = b.start();
            (b, p)
        });
        let bare = start_bare_relay(node_port);
        let mut registrations = vec![register(&rt, &proxy, node_port)];
        if let Some((_, p)) = &baseline {
            registrations.push(register(&rt, p, node_port));
        }
        Setup {
            rt,
            node_port,
            build,
            proxy,
            baseline,
            bare,
            _registrations: registrations,
        }
    }

    /// The paths measured in this run, in column order.
    fn paths(&self) -> Vec<Path> {
        PATHS
            .into_iter()
            .filter(|&p| p != Path::Baseline || self.baseline.is_some())
            .collect()
    }

    /// The baseline process (only asked for when there is one).
    fn baseline(&self) -> &Proxy {
        &self.baseline.as_ref().expect("a baseline build").1
    }

    /// The distproxy builds in this run: (column, build, process).
    fn proxies(&self) -> Vec<(usize, &Build, &Proxy)> {
        let mut v = vec![(Path::Proxy as usize, &self.build, &self.proxy)];
        if let Some((b, p)) = &self.baseline {
            v.push((Path::Baseline as usize, b, p));
        }
        v
    }

    /// A connection through `proxy` (not necessarily the main one).
    fn connect_through(&self, proxy: &Proxy, mode: Mode) -> TcpStream {
        let port = match self.rt.block_on(client::port_please(proxy.epmd, NODE)) {
            Ok(Port2Reply::Found(spec)) => spec.port,
            other => panic!("lookup of {NODE} through distproxy: {other:?}"),
        };
        assert_eq!(port, proxy.dist.port(), "lookup answered the proxy port");
        self.dial(([127, 0, 0, 1], port).into(), mode)
    }

    /// The relay process a path goes through.
    fn relay_pid(&self, path: Path) -> Option<u32> {
        match path {
            Path::Direct => None,
            Path::Bare => Some(self.bare.pid()),
            Path::Proxy => Some(self.proxy.pid()),
            Path::Baseline => Some(self.baseline().pid()),
        }
    }

    /// A connection to the node with the handshake's first frames done.
    fn connect(&self, path: Path, mode: Mode) -> TcpStream {
        match path {
            Path::Direct => self.dial(([127, 0, 0, 1], self.node_port).into(), mode),
            Path::Bare => self.dial(([127, 0, 0, 1], self.bare.port).into(), mode),
            Path::Proxy => self.connect_through(&self.proxy, mode),
            Path::Baseline => self.connect_through(self.baseline(), mode),
        }
    }

    /// Connects to `addr` and does the handshake's first frames.
    fn dial(&self, addr: SocketAddr, mode: Mode) -> TcpStream {
        let mut s = TcpStream::connect(addr).expect("connect");
        complete_handshake(&mut s, mode, &addr.to_string());
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }
}

/// One-way bulk transfer; seconds from first write to the node's count.
fn bulk_one_way(setup: &Setup, path: Path, bytes: u64) -> f64 {
    let mut s = setup.connect(path, Mode::Sink);
    bulk_to_sink(&mut s, bytes, &format!("{path:?}"))
}

/// `bytes` each way at once through an echoing node; seconds until the
/// last echoed byte and EOF.
fn bulk_both_ways(setup: &Setup, path: Path, bytes: u64) -> f64 {
    let s = setup.connect(path, Mode::Echo);
    let mut w = s.try_clone().unwrap();
    let mut r = s;
    let t0 = Instant::now();
    let writer = thread::spawn(move || {
        write_n(&mut w, bytes, &pattern());
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf).expect("echo read");
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    writer.join().unwrap();
    assert_eq!(got, bytes, "every byte echoed ({path:?})");
    secs
}

/// Round-trip times in nanoseconds of `iters` 64-byte ping-pongs.
fn ping_pong(setup: &Setup, path: Path, iters: usize, out: &mut Vec<u64>) {
    let mut s = setup.connect(path, Mode::Echo);
    distproxy_testkit::bench::ping_pong(&mut s, &mut [0u8; MSG], iters, out, &format!("{path:?}"));
}

/// RSS (bytes) and open files of `proxy` per idle relayed connection,
/// over `conns` connections that each carried `burst` bytes each way (a
/// 64-byte ping-pong when `burst` is 0) before going idle.
fn idle_cost(setup: &Setup, proxy: &Proxy, conns: usize, burst: u64) -> (f64, f64) {
    let pid = proxy.pid();
    thread::sleep(Duration::from_millis(200));
    let (rss0, fds0) = (proc_status_kb(pid, "VmRSS:"), open_fds(pid));
    let mut held = Vec::with_capacity(conns);
    let mut msg = [7u8; MSG];
    let mut buf = vec![0u8; CHUNK];
    for _ in 0..conns {
        let mut s = setup.connect_through(proxy, Mode::Echo);
        if burst == 0 {
            s.write_all(&msg).unwrap();
            s.read_exact(&mut msg).unwrap();
        } else {
            let mut w = s.try_clone().unwrap();
            let writer = thread::spawn(move || write_n(&mut w, burst, &pattern()));
            let mut left = burst as usize;
            while left > 0 {
                let n = left.min(buf.len());
                s.read_exact(&mut buf[..n]).unwrap();
                left -= n;
            }
            writer.join().unwrap();
        }
        held.push(s);
    }
    thread::sleep(Duration::from_millis(300));
    let (rss1, fds1) = (proc_status_kb(pid, "VmRSS:"), open_fds(pid));
    drop(held);
    let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / conns as f64;
    (per(rss0, rss1) * 1024.0, per(fds0 as u64, fds1 as u64))
}

// ----------------------------------------------------------------- figures

/// One line of the table: a figure per path, indexed by `Path as usize`
/// (None: not measured).
struct Row {
    what: String,
    values: [Option<f64>; 4],
    /// Print proxy / direct (and baseline / direct, proxy / baseline).
    ratio: bool,
    note: String,
}

fn print_table(rows: &[Row], with_baseline: bool) {
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let ratio =
        |r: &Row, num: Path, den: Path| match (r.values[den as usize], r.values[num as usize]) {
            (Some(d), Some(n)) if r.ratio && d > 0.0 => format!("{:.2}x", n / d),
            _ => "-".to_string(),
        };
    let mut header = format!(
        "{:<42} {:>9} {:>10} {:>9} {:>12}",
        "metric", "direct", "bare relay", "proxy", "proxy/direct"
    );
    if with_baseline {
        header += &format!(
            " {:>9} {:>11} {:>10}",
            "baseline", "base/direct", "proxy/base"
        );
    }
    println!("{header}  notes");
    println!("{}", "-".repeat(if with_baseline { 134 } else { 100 }));
    for r in rows {
        let mut line = format!(
            "{:<42} {:>9} {:>10} {:>9} {:>12}",
            r.what,
            cell(r.values[0]),
            cell(r.values[1]),
            cell(r.values[2]),
            ratio(r, Path::Proxy, Path::Direct),
        );
        if with_baseline {
            line += &format!(
                " {:>9} {:>11} {:>10}",
                cell(r.values[3]),
                ratio(r, Path::Baseline, Path::Direct),
                ratio(r, Path::Proxy, Path::Baseline),
            );
        }
        println!("{line}  {}", r.note);
    }
}

/// Runs `f` for each path in turn, `runs` times (interleaved, so drift and
/// noise from other processes fall on every column); also returns the CPU
/// seconds each path's relay process spent during its runs. A path not in
/// this run has no results.
fn interleaved<T>(
    setup: &Setup,
    runs: usize,
    mut f: impl FnMut(Path) -> T,
) -> ([Vec<T>; 4], [f64; 4]) {
    let mut out = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let mut cpu = [0.0; 4];
    let paths = setup.paths();
    for _ in 0..runs {
        for &path in &paths {
            let i = path as usize;
            let pid = setup.relay_pid(path);
            let c0 = pid.map_or(0.0, cpu_secs);
            out[i].push(f(path));
            cpu[i] += pid.map_or(0.0, cpu_secs) - c0;
        }
    }
    (out, cpu)
}

/// Figures of one run.
#[derive(Default)]
struct Results {
    rows: Vec<Row>,
    bulk_ratio: Option<f64>,
    added_p50_us: Option<f64>,
}

fn bulk_row(what: String, runs: usize, mbs: [Vec<f64>; 4], cpu: [f64; 4], gib: f64) -> Row {
    let base = !mbs[3].is_empty();
    let mut note = format!("median of {runs}; proxy {}", spread(&mbs[2]));
    if base {
        note += &format!(", baseline {}", spread(&mbs[3]));
    }
    note += &format!(
        " MB/s; relay CPU s/GiB: bare {:.2}, proxy {:.2}",
        cpu[1] / gib,
        cpu[2] / gib
    );
    if base {
        note += &format!(", baseline {:.2}", cpu[3] / gib);
    }
    Row {
        what,
        values: mbs.map(|mut v| (!v.is_empty()).then(|| median(&mut v))),
        ratio: true,
        note,
    }
}

fn run_bulk_one_way(setup: &Setup, plan: &Plan, res: &mut Results) {
    let bytes = plan.bulk_bytes;
    let (mbs, cpu) = interleaved(setup, plan.bulk_runs, |p| {
        mb_per_s(bytes, bulk_one_way(setup, p, bytes))
    });
    let gib = (bytes * plan.bulk_runs as u64) as f64 / (1u64 << 30) as f64;
    let row = bulk_row(
        format!("bulk one way {} MiB (MB/s)", bytes >> 20),
        plan.bulk_runs,
        mbs,
        cpu,
        gib,
    );
    res.bulk_ratio = Some(row.values[2].unwrap() / row.values[0].unwrap());
    res.rows.push(row);
}

fn run_bulk_both_ways(setup: &Setup, plan: &Plan, res: &mut Results) {
    let bytes = plan.bidir_bytes;
    let (mbs, cpu) = interleaved(setup, plan.bidir_runs, |p| {
        mb_per_s(bytes, bulk_both_ways(setup, p, bytes))
    });
    let gib = (2 * bytes * plan.bidir_runs as u64) as f64 / (1u64 << 30) as f64;
    res.rows.push(bulk_row(
        format!("bulk both ways {} MiB each (MB/s each)", bytes >> 20),
        plan.bidir_runs,
        mbs,
        cpu,
        gib,
    ));
}

fn run_ping_pong(setup: &Setup, plan: &Plan, res: &mut Results) {
    let block = plan.pingpong_iters.div_ceil(plan.pingpong_blocks);
    let (blocks, cpu) = interleaved(setup, plan.pingpong_blocks, |p| {
        let mut v = Vec::with_capacity(block);
        ping_pong(setup, p, block, &mut v);
        v
    });
    // The p50 of each block, lowest to highest: the run-to-run spread.
    let block_p50s = |i: usize| {
        let p50s: Vec<f64> = blocks[i]
            .iter()
            .map(|b| {
                let mut b = b.clone();
                b.sort_unstable();
                percentile_us(&b, 0.50)
            })
            .collect();
        let lo = p50s.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = p50s.iter().cloned().fold(0.0, f64::max);
        format!("{lo:.1}..{hi:.1}")
    };
    let base = !blocks[3].is_empty();
    let mut rtts = blocks.each_ref().map(|b| b.concat());
    for v in rtts.iter_mut() {
        v.sort_unstable();
    }
    let n = rtts[0].len();
    let pct = |p: f64| {
        rtts.each_ref()
            .map(|v| (!v.is_empty()).then(|| percentile_us(v, p)))
    };
    let (p50, p99) = (pct(0.50), pct(0.99));
    let per_rt = |c: f64| c * 1e6 / n as f64;
    let mut note = format!(
        "{n} round trips per path in {} blocks; relay CPU us/round trip: bare {:.1}, proxy {:.1}",
        plan.pingpong_blocks,
        per_rt(cpu[1]),
        per_rt(cpu[2]),
    );
    if base {
        note += &format!(", baseline {:.1}", per_rt(cpu[3]));
    }
    res.rows.push(Row {
        what: format!("ping-pong {MSG} B p50 (us)"),
        values: p50,
        ratio: true,
        note,
    });
    let mut note = format!("block p50s: proxy {}", block_p50s(2));
    if base {
        note += &format!(", baseline {}", block_p50s(3));
    }
    res.rows.push(Row {
        what: format!("ping-pong {MSG} B p99 (us)"),
        values: p99,
        ratio: true,
        note,
    });
    let direct = p50[0].unwrap();
    let added = p50.map(|v| v.map(|v| v - direct));
    res.added_p50_us = added[2];
    res.rows.push(Row {
        what: "added p50 latency (us)".into(),
        values: [None, added[1], added[2], added[3]],
        ratio: false,
        note: "p50 - direct p50".into(),
    });
}

fn run_idle(setup: &Setup, plan: &Plan, res: &mut Results) {
    let mut rss = [None; 4];
    let mut fds = [None; 4];
    for (i, _, proxy) in setup.proxies() {
        let (r, f) = idle_cost(setup, proxy, plan.idle_conns, 0);
        rss[i] = Some(r / 1024.0);
        fds[i] = Some(f);
    }
    res.rows.push(Row {
        what: "proxy RSS per idle conn (KiB)".into(),
        values: rss,
        ratio: false,
        note: format!(
            "{} conns, each after one ping-pong; kernel buffers not included",
            plan.idle_conns
        ),
    });
    res.rows.push(Row {
        what: "proxy open files per idle conn".into(),
        values: fds,
        ratio: false,
        note: String::new(),
    });
    // In a fresh proxy, so that memory freed by the connections above is
    // not reused and hidden.
    let burst = 1 << 20;
    let mut rss = [None; 4];
    for (i, build, _) in setup.proxies() {
        let fresh = build.start();
        let _registration = register(&setup.rt, &fresh, setup.node_port);
        let (r, _) = idle_cost(setup, &fresh, plan.burst_conns, burst);
        rss[i] = Some(r / 1024.0);
    }
    res.rows.push(Row {
        what: "proxy RSS per idle conn after 1 MiB (KiB)".into(),
        values: rss,
        ratio: false,
        note: format!(
            "{} conns, each idle after echoing {} MiB; fresh proxy process",
            plan.burst_conns,
            burst >> 20
        ),
    });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, port, ..] = args.as_slice() {
        if flag == "--bare-relay" {
            return bare_relay_main(port.parse().expect("--bare-relay PORT"));
        }
    }
    let benching = args.iter().any(|a| a == "--bench");
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("RELAY_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let plan = match (benching, quick) {
        (false, _) => SMOKE,
        (true, true) => QUICK,
        (true, false) => FULL,
    };
    let only = std::env::var("RELAY_BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|s| s.trim() == name);
    let started = Instant::now();
    let load_before = loadavg();
    let build = Build::new("proxy", distproxy_testkit::distproxy_bin!(BIN_VAR));
    let baseline = baseline_arg(&args, BASELINE_VAR).map(|bin| Build::new("baseline", bin));
    let setup = Setup::new(build, baseline);
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "relay bench, {} run: loopback, {cpus} CPUs, proxy = {} (pid {})",
        plan.label,
        setup.build.bin,
        setup.proxy.pid()
    );
    if let Some((b, p)) = &setup.baseline {
        println!("baseline = {} (pid {})", b.bin, p.pid());
    }
    for (_, b, _) in setup.proxies() {
        if let Some(note) = &b.note {
            println!("{note}");
        }
    }
    println!(
        "direct: client to node; bare relay: through a minimal read/write relay in another \
         process (tokio copy_bidirectional, 256 KiB buffers); proxy: lookup, then distproxy{}",
        if setup.baseline.is_some() {
            "; baseline: the same through the baseline build"
        } else {
            ""
        }
    );
    let mut res = Results::default();
    if wanted("bulk") {
        run_bulk_one_way(&setup, &plan, &mut res);
    }
    if wanted("bidir") {
        run_bulk_both_ways(&setup, &plan, &mut res);
    }
    if wanted("pingpong") {
        run_ping_pong(&setup, &plan, &mut res);
    }
    if wanted("idle") {
        run_idle(&setup, &plan, &mut res);
    }
    println!();
    print_table(&res.rows, setup.baseline.is_some());
    println!();
    let mut targets = Vec::new();
    if let Some(r) = res.bulk_ratio {
        let met = if r >= 0.5 { "met" } else { "MISSED" };
        targets.push(format!("bulk throughput >= 0.5x direct: {r:.2}x {met}"));
    }
    if let Some(a) = res.added_p50_us {
        let met = if a <= 15.0 { "met" } else { "MISSED" };
        targets.push(format!("added p50 latency <= 15 us: {a:.1} us {met}"));
    }
    if !benching {
        println!("smoke run: sizes too small for the figures to mean anything");
    } else if !targets.is_empty() {
        println!("targets: {}", targets.join("; "));
    }
    println!(
        "elapsed {:.1} s; 1-min load average {} before, {} after (other processes skew figures)",
        started.elapsed().as_secs_f64(),
        load_before,
        loadavg()
    );
}
