//! Many idle relayed connections through one sidecar: memory and file
//! descriptors per connection, and the connection setup rate, against
//! direct connections to the node in the same run.
//!
//! A full mesh of 100 pods × 10 nodes puts about 10,000 relayed connections
//! on each sidecar, nearly all idle between ticks; this bench holds that
//! many. The sidecar is the real binary (`distproxy run`, release build,
//! `loopback_lookups = "proxy"`, limits raised to the connection count), the
//! node is the test kit's fake node in a child process (async, one task per
//! connection), the client is this process (a tokio runtime, 64 concurrent
//! setups). Every proxied connection is set up as a BEAM sets one up:
//! `PORT_PLEASE2_REQ` to the sidecar's EPMD, connect to the announced port,
//! `send_name`, read status and challenge (checked to come from the node),
//! then one 64-byte message echoed through the node; then it is held idle.
//! A direct connection does the same minus the lookup, straight to the node.
//!
//! Columns: `direct` (the baseline: what setting up a connection costs this
//! client and node without a relay), `old proxy` (another distproxy build,
//! `--old PATH` or `HOLD_BENCH_OLD_BIN`, to measure a change before and
//! after in one run) and `proxy` (the build under test, or
//! `HOLD_BENCH_PROXY_BIN`). Each column gets a fresh node and sidecar
//! process in each round; rounds interleave the columns and the table shows
//! medians. Rows, for the sidecar process (from `/proc/<pid>/status` and
//! `/proc/<pid>/fd`):
//! - setups/s: N connections (lookup, connect, handshake, one message) over
//!   the time to set them all up;
//! - RSS per idle connection: (VmRSS holding N idle − VmRSS before) / N;
//!   kernel socket buffers are not in RSS;
//! - RSS per connection after one more message on every connection at once
//!   (what a relay keeps after it was busy);
//! - open files per connection;
//! - the time until every file descriptor is released after the client
//!   closes all connections (the bench fails if they are not, within 30 s).
//!
//! Usage (the bench raises its limit on open files, which the sidecar and
//! the node inherit, to 2N + 100, as root; where the hard limit cannot be
//! raised, it holds as many connections as the limit allows and says so):
//!   cargo bench --bench hold                   10,000 connections
//!   cargo bench --bench hold -- 2000           another count
//!   cargo bench --bench hold -- --old /tmp/distproxy-before
//!   cargo bench --bench hold -- --rounds 5     rounds (3 by default)
//! Without `--bench` (as `cargo test --benches` runs it): a smoke run of
//! 200 connections, to check that it works.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use distproxy_testkit::bench::*;
use distproxy_testkit::frames;
use distproxy_testkit::process::Proc;
use distproxy_testkit::sut::client;
use distproxy_testkit::sut::proto::Port2Reply;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FULL_CONNS: usize = 10_000;
const SMOKE_CONNS: usize = 200;
/// Descriptors the sidecar needs besides two per connection.
const FD_MARGIN: u64 = 100;
/// Connections being set up at once.
const CONCURRENCY: usize = 64;
const MSG: usize = 64;
/// Deadline of each step of a setup and of each echo.
const STEP: Duration = Duration::from_secs(20);
/// Overrides the distproxy binary under test.
const BIN_VAR: &str = "HOLD_BENCH_PROXY_BIN";
/// Another build to measure in the same run.
const OLD_VAR: &str = "HOLD_BENCH_OLD_BIN";

// ---------------------------------------------------------------- fake node

/// Runs as the fake node: `hold-bench --fake-node` serves the test kit's
/// [`FakeNode`](distproxy_testkit::node::FakeNode) (answers the handshake
/// with `bench@fake.host`, then echoes) on 127.0.0.1, prints its port and
/// exits when its standard input closes.
fn fake_node_main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let node = distproxy_testkit::node::FakeNode::start(NODE, "127.0.0.1:0").await;
        println!("{}", node.port);
        let mut stdin = tokio::io::stdin();
        let mut sink = [0u8; 64];
        while stdin.read(&mut sink).await.unwrap_or(0) > 0 {}
    });
}

/// The fake node process, killed on drop.
struct NodeProc {
    _proc: Proc,
    port: u16,
}

fn start_node() -> NodeProc {
    let mut proc = Proc::spawn_unlogged(
        "fake node",
        Command::new(std::env::current_exe().expect("bench executable"))
            .arg("--fake-node")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(proc.child_mut().stdout.take().unwrap()),
        &mut line,
    )
    .expect("fake node port");
    let port = line.trim().parse().expect("fake node port");
    NodeProc { _proc: proc, port }
}

// ------------------------------------------------------------------ client

/// Where a column's connections go.
#[derive(Clone, Copy)]
enum Target {
    Direct(SocketAddr),
    /// A sidecar: lookup at `epmd`, then the port it announces.
    Proxy {
        epmd: SocketAddr,
    },
}

async fn step<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> T {
    match tokio::time::timeout(STEP, f).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: no answer within {STEP:?}"),
    }
}

/// Sets up one connection as a BEAM does and sends one message through it.
async fn setup_one(target: Target) -> TcpStream {
    let addr = match target {
        Target::Direct(addr) => addr,
        Target::Proxy { epmd } => match step("lookup", client::port_please(epmd, NODE)).await {
            Port2Reply::Found(spec) => SocketAddr::from(([127, 0, 0, 1], spec.port)),
            other => panic!("lookup of {NODE}: {other:?}"),
        },
    };
    let mut s = step("connect", TcpStream::connect(addr)).await;
    s.set_nodelay(true).unwrap();
    step(
        "send_name",
        s.write_all(&frames::send_name(Mode::Echo.initiator())),
    )
    .await;
    let mut buf = bytes::BytesMut::new();
    loop {
        if let Some((name, n)) = frames::parse_node_answer(&buf) {
            assert_eq!(name, format!("{NODE}@fake.host"), "answered by the node");
            assert_eq!(n, buf.len(), "nothing after the challenge");
            break;
        }
        let n = step("status and challenge", s.read_buf(&mut buf)).await;
        assert!(n > 0, "closed during the handshake ({addr})");
    }
    echo(&mut s, 1).await;
    s
}

/// One `MSG`-byte message, echoed back intact.
async fn echo(s: &mut TcpStream, tag: u8) {
    let msg = [tag; MSG];
    step("write a message", s.write_all(&msg)).await;
    let mut back = [0u8; MSG];
    step("read the echo", s.read_exact(&mut back)).await;
    assert_eq!(back, msg, "echoed intact");
}

/// Sets up `n` connections, `CONCURRENCY` at a time; returns them and the
/// seconds it took.
fn open_all(rt: &tokio::runtime::Runtime, target: Target, n: usize) -> (Vec<TcpStream>, f64) {
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let held = rt.block_on(async {
        let workers: Vec<_> = (0..CONCURRENCY.min(n))
            .map(|_| {
                let next = Arc::clone(&next);
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        mine.push(setup_one(target).await);
                    }
                    mine
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for w in workers {
            all.extend(w.await.expect("setup worker"));
        }
        all
    });
    (held, t0.elapsed().as_secs_f64())
}

/// One more message on every held connection, `CONCURRENCY` at a time.
fn echo_all(rt: &tokio::runtime::Runtime, held: Vec<TcpStream>) -> Vec<TcpStream> {
    rt.block_on(async {
        let chunk = held.len().div_ceil(CONCURRENCY).max(1);
        let mut held = held;
        let mut workers = Vec::new();
        while !held.is_empty() {
            let mut part = held.split_off(held.len().saturating_sub(chunk));
            workers.push(tokio::spawn(async move {
                for s in part.iter_mut() {
                    echo(s, 2).await;
                }
                part
            }));
        }
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.expect("echo worker"));
        }
        all
    })
}

// ----------------------------------------------------------------- figures

/// What one column measured.
#[derive(Default, Clone, Copy)]
struct Figures {
    setups_per_s: f64,
    /// KiB per connection; None for the direct column (no relay).
    rss_idle_kib: Option<f64>,
    rss_after_msg_kib: Option<f64>,
    fds: Option<f64>,
    release_s: Option<f64>,
    rss_before_mib: Option<f64>,
    rss_held_mib: Option<f64>,
}

/// The median of each figure over rounds.
fn median_figures(runs: &[Figures]) -> Figures {
    let med = |get: &dyn Fn(&Figures) -> Option<f64>| {
        let mut v: Vec<f64> = runs.iter().filter_map(get).collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    Figures {
        setups_per_s: med(&|f| Some(f.setups_per_s)).unwrap_or(0.0),
        rss_idle_kib: med(&|f| f.rss_idle_kib),
        rss_after_msg_kib: med(&|f| f.rss_after_msg_kib),
        fds: med(&|f| f.fds),
        release_s: med(&|f| f.release_s),
        rss_before_mib: med(&|f| f.rss_before_mib),
        rss_held_mib: med(&|f| f.rss_held_mib),
    }
}

fn rss_kb(pid: u32) -> u64 {
    proc_status_kb(pid, "VmRSS:")
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Lets a process's memory settle after a burst of work (freed pages
/// returned, relays gone idle) before reading its RSS.
const SETTLE: Duration = Duration::from_millis(500);

fn run_direct(rt: &tokio::runtime::Runtime, n: usize) -> Figures {
    let node = start_node();
    let target = Target::Direct(SocketAddr::from(([127, 0, 0, 1], node.port)));
    let (held, secs) = open_all(rt, target, n);
    let held = echo_all(rt, held);
    drop(held);
    Figures {
        setups_per_s: n as f64 / secs,
        ..Figures::default()
    }
}

fn run_proxy(rt: &tokio::runtime::Runtime, bin: &str, label: &'static str, n: usize) -> Figures {
    let node = start_node();
    let limit = n + 1000;
    let extra = format!(
        "[routing]\nloopback_lookups = \"proxy\"\n\n\
         [limits]\ndist_max_connections_per_source = {limit}\n\
         epmd_max_connections = 1024\nepmd_max_connections_per_source = 1024\n"
    );
    // An older build (`--old`) may predate `[limits]`, and with it the
    // per-source limits the section raises: it runs without it.
    let (extra, dropped) = config_accepted_by(bin, &extra, &["limits"]);
    if !dropped.is_empty() {
        println!(
            "{label}: {bin} refuses {}, started without it",
            dropped.join(", ")
        );
    }
    let sidecar = start_sidecar_with(
        bin,
        label,
        "warn",
        // A generous connect deadline: a load spike from other processes
        // slows the setup rate, it does not fail the run.
        &format!("max_connections = {limit}\nconnect_timeout_ms = 10000\n"),
        &extra,
    );
    let pid = sidecar.pid();
    let registration = rt
        .block_on(client::register(
            sidecar.epmd,
            distproxy_testkit::sidecar::spec(NODE, node.port),
        ))
        .expect("register the fake node");
    thread::sleep(SETTLE);
    let (rss0, fds0) = (rss_kb(pid), open_fds(pid));

    let (held, secs) = open_all(rt, Target::Proxy { epmd: sidecar.epmd }, n);
    // Every connection is relayed: two descriptors each.
    let relayed = wait_for(Duration::from_secs(10), || open_fds(pid) >= fds0 + 2 * n);
    assert!(
        relayed,
        "{label}: {} descriptors open, want {} + 2 x {n}",
        open_fds(pid),
        fds0
    );
    thread::sleep(SETTLE);
    let (rss1, fds1) = (rss_kb(pid), open_fds(pid));

    let held = echo_all(rt, held);
    thread::sleep(SETTLE);
    let rss2 = rss_kb(pid);

    let t0 = Instant::now();
    drop(held);
    let released = wait_for(Duration::from_secs(30), || open_fds(pid) <= fds0);
    assert!(
        released,
        "{label}: {} descriptors still open 30 s after the client closed, {fds0} before",
        open_fds(pid)
    );
    let release_s = t0.elapsed().as_secs_f64();
    drop(registration);
    let per_conn = |kb: u64| Some(kb.saturating_sub(rss0) as f64 / n as f64);
    Figures {
        setups_per_s: n as f64 / secs,
        rss_idle_kib: per_conn(rss1),
        rss_after_msg_kib: per_conn(rss2),
        fds: Some((fds1 - fds0) as f64 / n as f64),
        release_s: Some(release_s),
        rss_before_mib: Some(rss0 as f64 / 1024.0),
        rss_held_mib: Some(rss1 as f64 / 1024.0),
    }
}

fn print_table(n: usize, columns: &[(&str, Figures)]) {
    let names: Vec<&str> = columns.iter().map(|c| c.0).collect();
    print!("{:<44}", format!("{n} connections"));
    for name in &names {
        print!(" {name:>10}");
    }
    println!("  notes");
    println!("{}", "-".repeat(44 + 11 * names.len() + 40));
    let row = |what: &str, get: &dyn Fn(&Figures) -> Option<f64>, prec: usize, note: &str| {
        print!("{what:<44}");
        for (_, f) in columns {
            match get(f) {
                Some(v) => print!(" {v:>10.prec$}"),
                None => print!(" {:>10}", "-"),
            }
        }
        println!("  {note}");
    };
    row(
        "setups/s",
        &|f| Some(f.setups_per_s),
        0,
        "lookup (proxy only), connect, handshake, one echo; 64 at once",
    );
    row(
        "sidecar RSS per idle connection (KiB)",
        &|f| f.rss_idle_kib,
        2,
        "(RSS holding N idle - RSS before) / N; kernel buffers not in RSS",
    );
    row(
        "sidecar RSS per connection after 1 msg (KiB)",
        &|f| f.rss_after_msg_kib,
        2,
        "after one more message on every connection",
    );
    row("sidecar open files per connection", &|f| f.fds, 2, "");
    row(
        "sidecar RSS before / holding N (MiB)",
        &|f| f.rss_before_mib,
        1,
        "before",
    );
    row("", &|f| f.rss_held_mib, 1, "holding N idle");
    row(
        "all descriptors released after close (s)",
        &|f| f.release_s,
        2,
        "the bench fails if not within 30 s",
    );
    if let [(_, direct), .., (_, proxy)] = columns {
        println!(
            "\nsetup rate, proxy / direct: {:.2}x",
            proxy.setups_per_s / direct.setups_per_s
        );
    }
    if let Some((_, old)) = columns.iter().find(|c| c.0 == "old proxy") {
        let new = columns.last().unwrap().1;
        println!(
            "proxy / old proxy: setups/s {:.2}x, RSS per idle connection {:.2}x",
            new.setups_per_s / old.setups_per_s,
            new.rss_idle_kib.unwrap_or(0.0) / old.rss_idle_kib.unwrap_or(1.0)
        );
    }
}

/// The goal, for a run at the full size.
fn print_target(columns: &[(&str, Figures)]) {
    if let Some(v) = columns.last().and_then(|c| c.1.rss_idle_kib) {
        let met = if v <= 8.0 { "met" } else { "MISSED" };
        println!("target: <= 8 KiB RSS per idle relayed connection: {v:.2} KiB {met}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--fake-node") {
        return fake_node_main();
    }
    let benching = args.iter().any(|a| a == "--bench");
    let n = args
        .iter()
        .enumerate()
        .filter(|(i, _)| *i == 0 || args[i - 1] != "--rounds")
        .find_map(|(_, a)| a.parse::<usize>().ok())
        .unwrap_or(if benching { FULL_CONNS } else { SMOKE_CONNS });
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1)?.parse::<usize>().ok())
        .unwrap_or(if benching { 3 } else { 1 })
        .max(1);
    let old = args
        .iter()
        .position(|a| a == "--old")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var(OLD_VAR).ok().filter(|v| !v.is_empty()));
    // The sidecar holds two descriptors per connection, plus its listeners,
    // epoll and the like (about 30).
    let want = 2 * n as u64 + FD_MARGIN;
    let limit = raise_nofile(want);
    let asked = n;
    let n = if limit >= want {
        n
    } else {
        (limit.saturating_sub(FD_MARGIN) / 2) as usize
    };
    assert!(
        n >= CONCURRENCY,
        "open-file limit {limit}: too low for this bench (raise the hard limit, ulimit -Hn)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bin = distproxy_testkit::distproxy_bin!(BIN_VAR);
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let (started, load_before) = (Instant::now(), loadavg());
    println!("hold bench: {n} idle relayed connections through one sidecar, loopback, {cpus} CPUs");
    println!("proxy = {bin}");
    if let Some(old) = &old {
        println!("old proxy = {old}");
    }
    if n < asked {
        println!(
            "{n} connections, not {asked}: the hard limit on open files is {limit} and cannot \
             be raised here (root without CAP_SYS_RESOURCE?)"
        );
    }
    // Rounds interleave the columns, so that load from other processes
    // falls on each; every figure is the median over the rounds.
    let mut runs: Vec<(&str, Vec<Figures>)> = vec![("direct", Vec::new())];
    if old.is_some() {
        runs.push(("old proxy", Vec::new()));
    }
    runs.push(("proxy", Vec::new()));
    for round in 0..rounds {
        eprintln!("hold bench: round {} of {rounds}", round + 1);
        for (label, figures) in runs.iter_mut() {
            figures.push(match *label {
                "direct" => run_direct(&rt, n),
                "old proxy" => run_proxy(&rt, old.as_deref().unwrap(), "old proxy", n),
                _ => run_proxy(&rt, &bin, "proxy", n),
            });
        }
    }
    let columns: Vec<(&str, Figures)> = runs
        .iter()
        .map(|(label, figures)| (*label, median_figures(figures)))
        .collect();
    println!();
    if rounds > 1 {
        println!("medians of {rounds} rounds (columns interleaved)");
    }
    print_table(n, &columns);
    if benching {
        print_target(&columns);
    } else {
        println!("smoke run: {n} connections, too few for the figures to mean much");
    }
    println!(
        "elapsed {:.1} s; 1-min load average {load_before} before, {} after",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
}
