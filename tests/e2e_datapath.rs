//! The relayed data path under real BEAM traffic: bulk transfers to a
//! receiver that stops reading, through the plain relay (splice) and
//! through the TLS tunnel between two pods' sidecars.
//!
//! What each test holds the sidecars to, with real OTP nodes in
//! network-namespace pods (`support::lab`):
//!
//! - **Backpressure, not memory.** A node sends 64 MiB messages to a node
//!   stopped with SIGSTOP for a few seconds: the sender is suspended on
//!   `busy_dist_port` (its sends wait) as with a direct connection, every sidecar on the
//!   path keeps its peak RSS (`VmHWM`) within a few MiB of what it was,
//!   and once the receiver resumes every message arrives, in order and
//!   intact; `distproxy_relayed_bytes_total` counts what crossed.
//! - **A receiver stopped past `net_ticktime`.** The sender sees the
//!   receiver down within its tick time, as directly; the sidecars then let
//!   the connection go (the node's leg is dropped by `tcp.user_timeout_ms`
//!   as its window stays shut, the rest by `relay.half_close_timeout_ms`),
//!   log one `distribution connection ended` line for it, and hold no
//!   connection, socket or `/nodes` count afterwards; the woken receiver
//!   sees the sender down and both can talk again. When the sender's close
//!   reaches the sidecar behind bytes the stopped node cannot take, the
//!   connection ends `relay.half_close_timeout_ms` after it (the sidecar
//!   used to miss that close while its write to the node was blocked).
//! - **Many streams at once.** Eight node pairs stream through one sidecar
//!   at the same time: every pair finishes, none far behind the others, and
//!   the bytes counted match the bytes sent.
//!
//! Heavier variants (more data, longer stops) are manual commands in
//! docs/benchmarks.md.
//!
//! Needs root, iproute2, ss and erlang-nox; fails saying so otherwise,
//! unless `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::time::{Duration, Instant};

use distproxy_testkit::certs::{Ca, SecretDir};
use support::beam::{atom, ErlangOptions};
use support::faults::sidecar_sockets;
use support::metrics::{metric_sum, metrics};
use support::module::{compile_module, with_module};
use support::sidecar::ADMIN_PORT;
use support::wait::poll_until;
use support::{e2e_enabled, BeamNode, Daemon, Lab, Pod, SidecarOptions};

const OPEN: &str = "distproxy_dist_connections_open";
const RELAYED: &str = "distproxy_relayed_bytes_total";
const MIB: usize = 1024 * 1024;
/// Growth of a sidecar's peak RSS allowed while it relays hundreds of MiB
/// to a stopped node: a few buffers, nothing proportional to the data.
const RSS_GROWTH_KIB: u64 = 16 * 1024;
/// `net_ticktime` of the stopped-receiver tests.
const TICK_SECS: u64 = 4;
/// Sidecar settings of the stopped-receiver tests: the node's leg, whose
/// window a stopped node keeps shut, is dropped after 5 s (default 30 s).
const STOP_CONFIG: &str = "[tcp]\nuser_timeout_ms = 5000\n[relay]\nhalf_close_timeout_ms = 1000\n";

/// (VmRSS, VmHWM) of process `pid`, in KiB.
fn rss(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn start(pod: &Pod, short: &str, options: &ErlangOptions) -> BeamNode {
    let mut node = pod.spawn_erlang_with(short, options);
    node.wait_ready();
    node
}

/// `options` plus `-kernel K V` pairs.
fn with_kernel(options: &ErlangOptions, settings: &[(&str, &str)]) -> ErlangOptions {
    let mut options = options.clone();
    for (k, v) in settings {
        options
            .extra_args
            .extend(["-kernel", k, v].map(str::to_string));
    }
    options
}

/// Result of the agent's `stream`: `count` copies of one random binary of
/// `size` bytes sent to a receiver that checks their order and MD5.
#[derive(Debug)]
struct Stream {
    received: usize,
    bytes: u64,
    in_order: bool,
    intact: bool,
    /// How long the sends took (a send waits while the connection's
    /// queue is over its busy limit).
    send_ms: u64,
    total_ms: u64,
}

fn start_stream(from: &mut BeamNode, to: &str, count: usize, size: usize) -> u64 {
    from.send(&format!("{{stream, {}, {count}, {size}, 0}}", atom(to)))
}

/// The stream's outcome, or the agent's error line.
fn finish_stream(from: &mut BeamNode, id: u64) -> Result<Stream, String> {
    let text = from.recv(id, Duration::from_secs(130));
    let f: Vec<&str> = text.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    match (f.first(), num(1), num(2), num(5), num(6)) {
        (Some(&"ok"), Some(received), Some(bytes), Some(send_ms), Some(total_ms)) => Ok(Stream {
            received: received as usize,
            bytes,
            in_order: f[3] == "true",
            intact: f[4] == "true",
            send_ms,
            total_ms,
        }),
        _ => Err(text),
    }
}

fn relayed(pod: &Pod, direction: &str) -> f64 {
    metric_sum(&metrics(pod), RELAYED, &[("direction", direction)])
}

/// What `pod`'s sidecar relayed towards its nodes since `since`, once it
/// reaches `payload` or 5 s have passed: a relay counts a write once it
/// returns, which may be just after the node has read the bytes.
fn relayed_since(pod: &Pod, since: f64, payload: f64) -> f64 {
    poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
        relayed(pod, "rx") - since >= payload
    });
    relayed(pod, "rx") - since
}

/// Waits until `pod`'s sidecar relayed `bytes` more towards its nodes than
/// `since`: the transfer is under way.
fn wait_relayed(pod: &Pod, since: f64, bytes: usize) {
    let under_way = poll_until(Duration::from_secs(30), Duration::from_millis(20), || {
        relayed(pod, "rx") >= since + bytes as f64
    });
    assert!(under_way, "the transfer did not start");
}

/// `/nodes`' `open_connections` summed over the pod's nodes.
fn nodes_open(pod: &Pod) -> u64 {
    let body = pod.http_get(ADMIN_PORT, "/nodes");
    let nodes: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/nodes is not JSON ({e}): {body}"));
    nodes
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|n| n["open_connections"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

/// What one sidecar holds of relayed connections: the gauge, `/nodes`,
/// its sockets (fds), its node legs.
#[derive(Debug, PartialEq)]
struct Held {
    gauge: f64,
    nodes_open: u64,
    sockets: usize,
    node_legs: usize,
}

fn held(pod: &Pod, daemon: &Daemon) -> Held {
    Held {
        gauge: metric_sum(&metrics(pod), OPEN, &[]),
        nodes_open: nodes_open(pod),
        sockets: daemon.socket_inodes().len(),
        node_legs: sidecar_sockets(pod, daemon.pid()).node_legs.len(),
    }
}

/// Samples the peak RSS of `pids` every 20 ms until dropped.
struct RssWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<u64>>>,
}

impl RssWatch {
    fn start(pids: Vec<u32>) -> RssWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = vec![0; pids.len()];
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                for (p, pid) in peak.iter_mut().zip(&pids) {
                    *p = (*p).max(rss(*pid).0);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        RssWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// Peak VmRSS of each pid, in KiB.
    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// A pod's sidecar with the TLS tunnel on (certificate for its host name
/// and address from `ca`) and `extra` configuration.
fn tls_sidecar(lab: &Lab, pod: &Pod, ca: &Ca, serial: u64, extra: &str) -> (Daemon, SecretDir) {
    let leaf = ca.leaf(&[pod.host(), &pod.addr().to_string()], serial);
    let dir = lab.dir().join(format!("tls-{}", pod.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = SecretDir::create(&dir, &leaf.cert_pem, &leaf.key_pem, &ca.pem);
    let toml = format!(
        "{extra}[tls]\ncert_file = {:?}\nkey_file = {:?}\nca_file = {:?}\nrequire_tls = true\n",
        secret.cert_file().display().to_string(),
        secret.key_file().display().to_string(),
        secret.ca_file().display().to_string(),
    );
    (
        pod.spawn_sidecar_with(SidecarOptions::default().config(&toml)),
        secret,
    )
}

/// Pods A and B with sidecars (`extra` configuration; with the TLS tunnel
/// when `tls`), nodes a1 and b1 with `options`, a1 connected to b1.
struct Pair {
    lab: Lab,
    sidecars: Vec<Daemon>,
    a1: BeamNode,
    b1: BeamNode,
    _secrets: Vec<SecretDir>,
}

impl Pair {
    fn new(tls: bool, extra: &str, options: &ErlangOptions) -> Pair {
        let lab = Lab::new(&["a", "b"]);
        let (a, b) = (lab.pod("a"), lab.pod("b"));
        let (sidecars, secrets, options) = if tls {
            let ca = Ca::new("dp-e2e-datapath-ca");
            let (da, sa) = tls_sidecar(&lab, a, &ca, 0xa1, extra);
            let (db, sb) = tls_sidecar(&lab, b, &ca, 0xb1, extra);
            let ebin = compile_module(&lab);
            let mut opts = options.clone();
            opts.extra_args.extend(with_module(&ebin).extra_args);
            (vec![da, db], vec![sa, sb], opts)
        } else {
            let cfg = SidecarOptions::default().config(extra);
            let da = a.spawn_sidecar_with(cfg.clone());
            let db = b.spawn_sidecar_with(cfg);
            (vec![da, db], vec![], options.clone())
        };
        let mut a1 = start(a, "a1", &options);
        let b1 = start(b, "b1", &options);
        let b1_name = b1.name().to_string();
        assert_eq!(a1.ping(&b1_name), "pong");
        Pair {
            lab,
            sidecars,
            a1,
            b1,
            _secrets: secrets,
        }
    }
}

/// The pods whose sidecars carry a1's connection to b1: B's, and A's too
/// through the tunnel.
fn on_path<'a>(lab: &'a Lab, sidecars: &'a [Daemon], tls: bool) -> Vec<(&'a Pod, &'a Daemon)> {
    let b = (lab.pod("b"), &sidecars[1]);
    if tls {
        vec![(lab.pod("a"), &sidecars[0]), b]
    } else {
        vec![b]
    }
}

/// a1 streams 4 x 64 MiB to b1 (`DISTPROXY_E2E_STREAM_MESSAGES`), which is
/// stopped for 3 s (`DISTPROXY_E2E_STOP_SECS`) once the
/// transfer is under way (net_ticktime at its default, 60 s): a1's sends
/// wait (busy_dist_port), the sidecars on the path keep their memory, and
/// b1 gets every message in order and intact once it resumes.
fn stopped_receiver_gets_backpressure(tls: bool) {
    const SIZE: usize = 64 * MIB;
    // Heavier by hand (docs/benchmarks.md): more messages, a longer stop.
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .map(|v| v.parse::<u64>().unwrap_or_else(|_| panic!("{name}={v}")))
            .unwrap_or(default)
    };
    let count = env("DISTPROXY_E2E_STREAM_MESSAGES", 4) as usize;
    let stop_secs = env("DISTPROXY_E2E_STOP_SECS", 3);
    let Pair {
        lab,
        sidecars,
        mut a1,
        b1,
        _secrets,
    } = Pair::new(tls, "", &ErlangOptions::default());
    let b1_name = b1.name().to_string();
    let path = on_path(&lab, &sidecars, tls);
    let pids: Vec<u32> = path.iter().map(|(_, d)| d.pid()).collect();
    let before: Vec<u64> = pids.iter().map(|&p| rss(p).1).collect();
    let b = lab.pod("b");
    let rx_before = relayed(b, "rx");

    let watch = RssWatch::start(pids.clone());
    let id = start_stream(&mut a1, &b1_name, count, SIZE);
    wait_relayed(b, rx_before, 8 * MIB);
    b1.signal("STOP");
    std::thread::sleep(Duration::from_secs(stop_secs));
    b1.signal("CONT");
    let outcome = finish_stream(&mut a1, id);
    let peaks = watch.finish();
    let after: Vec<u64> = pids.iter().map(|&p| rss(p).1).collect();
    eprintln!(
        "stream: {outcome:?}; VmHWM before {before:?} KiB, after {after:?}; peak VmRSS {peaks:?}"
    );

    let s = outcome.unwrap_or_else(|e| panic!("the stream to b1 failed: {e}"));
    assert_eq!(s.received, count, "{s:?}");
    assert_eq!(s.bytes, (count * SIZE) as u64, "{s:?}");
    assert!(s.in_order && s.intact, "reordered or corrupted: {s:?}");
    // The last sends wait for the queue to drain, which b1 does not while
    // stopped.
    assert!(
        s.send_ms + 1_000 >= stop_secs * 1_000,
        "a1 was not held back while b1 was stopped: {s:?}"
    );
    for ((pod, _), (b, a)) in path.iter().zip(before.iter().zip(&after)) {
        assert!(
            a - b < RSS_GROWTH_KIB,
            "pod {}'s sidecar grew from {b} to {a} KiB (VmHWM) relaying {} MiB",
            pod.name(),
            count * SIZE / MIB
        );
    }
    // Every byte is counted once on B's side, with the distribution
    // protocol's framing on top (a header per 64 KiB fragment: 0.03 %).
    let payload = (count * SIZE) as f64;
    let counted = relayed_since(b, rx_before, payload);
    assert!(
        counted >= payload && counted < payload * 1.001,
        "relayed rx {counted} for a payload of {payload}"
    );
    eprintln!("{} MiB in {} ms", count * SIZE / MIB, s.total_ms);
}

#[test]
fn a_stopped_receiver_holds_the_sender_back_not_the_sidecars_memory() {
    if !e2e_enabled(
        "a_stopped_receiver_holds_the_sender_back_not_the_sidecars_memory",
        &["ss"],
    ) {
        return;
    }
    stopped_receiver_gets_backpressure(false);
}

#[test]
fn a_stopped_receiver_holds_the_sender_back_through_the_tls_tunnel() {
    if !e2e_enabled(
        "a_stopped_receiver_holds_the_sender_back_through_the_tls_tunnel",
        &["ss"],
    ) {
        return;
    }
    stopped_receiver_gets_backpressure(true);
}

/// b1 is stopped in the middle of a 4 x 64 MiB transfer and stays stopped
/// past net_ticktime (4 s): a1 sees b1 down within its tick time, as with
/// a direct connection; the sidecars on the path end the connection
/// ([`STOP_CONFIG`]), log one end line for it and hold nothing of it
/// afterwards. Woken, b1 sees a1 down; both talk again.
fn receiver_stopped_past_ticktime(tls: bool) {
    let tick = TICK_SECS.to_string();
    let options = with_kernel(
        &ErlangOptions::default(),
        &[("net_ticktime", &tick), ("net_setuptime", "2")],
    );
    let Pair {
        lab,
        sidecars,
        mut a1,
        mut b1,
        _secrets,
    } = Pair::new(tls, STOP_CONFIG, &options);
    let (a1_name, b1_name) = (a1.name().to_string(), b1.name().to_string());
    let path = on_path(&lab, &sidecars, tls);
    let b = lab.pod("b");
    let rx_before = relayed(b, "rx");
    // The sockets the sidecars hold with a1 and b1 registered and not
    // connected (each relayed connection has two).
    let idle: Vec<usize> = path
        .iter()
        .map(|(pod, d)| held(pod, d).sockets - 2)
        .collect();
    let watch = RssWatch::start(path.iter().map(|(_, d)| d.pid()).collect());
    let before: Vec<u64> = path.iter().map(|(_, d)| rss(d.pid()).1).collect();

    let id = start_stream(&mut a1, &b1_name, 4, 64 * MIB);
    wait_relayed(b, rx_before, 8 * MIB);
    b1.signal("STOP");
    let stopped = Instant::now();
    let down = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        !a1.nodes().contains(&b1_name)
    });
    let noticed = stopped.elapsed();
    assert!(down, "a1 still lists the stopped b1 after {noticed:?}");
    // Direct: net_ticktime to 1.25 x net_ticktime.
    assert!(
        noticed < Duration::from_secs(TICK_SECS * 2),
        "a1 took {noticed:?} to see b1 down (net_ticktime {TICK_SECS} s)"
    );
    let outcome = finish_stream(&mut a1, id);
    assert!(
        outcome.is_err(),
        "the stream to a stopped node succeeded: {outcome:?}"
    );

    // The connection goes: 5 s of a shut window on b1's leg; a1's later
    // attempts (net_setuptime 2 s) 1 s after a1 gives up on them.
    let mut last = Vec::new();
    let freed = poll_until(Duration::from_secs(25), Duration::from_millis(250), || {
        last = path.iter().map(|(pod, d)| held(pod, d)).collect();
        last.iter().zip(&idle).all(|(h, &sockets)| {
            h.gauge == 0.0 && h.nodes_open == 0 && h.node_legs == 0 && h.sockets <= sockets
        })
    });
    let took = stopped.elapsed();
    let peaks = watch.finish();
    assert!(
        freed,
        "{took:?} after b1 stopped the sidecars still hold {last:?} (idle sockets: {idle:?})"
    );
    eprintln!(
        "a1 saw b1 down after {noticed:?}; sidecars freed after {took:?}; peak VmRSS {peaks:?} KiB"
    );
    for ((pod, d), b) in path.iter().zip(&before) {
        let a = rss(d.pid()).1;
        assert!(
            a - b < RSS_GROWTH_KIB,
            "pod {}'s sidecar grew from {b} to {a} KiB (VmHWM)",
            pod.name()
        );
        // One end line for the transfer's connection, with its bytes.
        let ends: Vec<String> = d
            .log_lines_containing("distribution connection ended")
            .into_iter()
            .chain(d.log_lines_containing("tunnel connection ended"))
            .filter(|l| {
                // The transfer's bytes are rx on B's side, tx on A's.
                let bytes = |key: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(key))
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                bytes("rx_bytes=") + bytes("tx_bytes=") > 8 * MIB as u64
            })
            .collect();
        assert_eq!(ends.len(), 1, "pod {}: {ends:#?}", pod.name());
        eprintln!("pod {}: {}", pod.name(), ends[0]);
        let sensible = [
            "timed out",
            "relay.half_close_timeout_ms",
            "reset",
            "closed",
        ];
        assert!(
            sensible.iter().any(|s| ends[0].contains(s)),
            "pod {}: {}",
            pod.name(),
            ends[0]
        );
    }

    b1.signal("CONT");
    let gone = poll_until(Duration::from_secs(15), Duration::from_millis(250), || {
        !b1.nodes().contains(&a1_name)
    });
    assert!(gone, "the woken b1 still lists a1: {:?}", b1.nodes());
    let again = poll_until(Duration::from_secs(15), Duration::from_millis(500), || {
        a1.ping(&b1_name) == "pong"
    });
    assert!(again, "a1 cannot reach b1 after it woke\n{}", b1.logs());
    let id = start_stream(&mut a1, &b1_name, 2, 4 * MIB);
    let s = finish_stream(&mut a1, id).expect("a stream after b1 woke");
    assert!(s.received == 2 && s.in_order && s.intact, "{s:?}");
}

#[test]
fn a_receiver_stopped_past_net_ticktime_is_let_go() {
    if !e2e_enabled("a_receiver_stopped_past_net_ticktime_is_let_go", &["ss"]) {
        return;
    }
    receiver_stopped_past_ticktime(false);
}

#[test]
fn a_receiver_stopped_past_net_ticktime_is_let_go_through_the_tls_tunnel() {
    if !e2e_enabled(
        "a_receiver_stopped_past_net_ticktime_is_let_go_through_the_tls_tunnel",
        &["ss"],
    ) {
        return;
    }
    receiver_stopped_past_ticktime(true);
}

/// Eight node pairs (a1..a4 each to b1 and b2) stream 16 x 2 MiB at the
/// same time through pod B's sidecar: every transfer arrives in order and
/// intact, none takes much longer than the others (no pair is starved
/// while the rest run), and `distproxy_relayed_bytes_total` counts the
/// payload plus the protocol's framing, nothing less and little more.
#[test]
fn eight_pairs_streaming_at_once_share_the_sidecar_and_are_counted() {
    if !e2e_enabled(
        "eight_pairs_streaming_at_once_share_the_sidecar_and_are_counted",
        &["ss"],
    ) {
        return;
    }
    const COUNT: usize = 16;
    const SIZE: usize = 2 * MIB;
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _sa = a.spawn_sidecar_with(SidecarOptions::default());
    let sb = b.spawn_sidecar_with(SidecarOptions::default());
    let options = ErlangOptions::default();
    let mut senders: Vec<BeamNode> = ["a1", "a2", "a3", "a4"]
        .iter()
        .map(|s| a.spawn_erlang_with(s, &options))
        .collect();
    let mut receivers: Vec<BeamNode> = ["b1", "b2"]
        .iter()
        .map(|s| b.spawn_erlang_with(s, &options))
        .collect();
    for node in senders.iter_mut().chain(receivers.iter_mut()) {
        node.wait_ready();
    }
    let targets: Vec<String> = receivers.iter().map(|n| n.name().to_string()).collect();
    for sender in &mut senders {
        for target in &targets {
            assert_eq!(sender.ping(target), "pong");
        }
    }
    // Inbound only: OTP's `global` (connect_all) may also connect b1 and
    // b2 to each other through the same-pod mirror, when it likes.
    assert_eq!(
        metric_sum(&metrics(b), OPEN, &[("direction", "inbound")]),
        8.0,
        "8 connections from pod A"
    );
    let before = rss(sb.pid()).1;
    let rx_before = relayed(b, "rx");

    let mut started = Vec::new();
    for (i, sender) in senders.iter_mut().enumerate() {
        for target in &targets {
            started.push((i, target.clone(), start_stream(sender, target, COUNT, SIZE)));
        }
    }
    let mut times = Vec::new();
    for (i, target, id) in started {
        let s = finish_stream(&mut senders[i], id)
            .unwrap_or_else(|e| panic!("{} -> {target}: {e}", senders[i].name()));
        assert!(
            s.received == COUNT && s.in_order && s.intact,
            "{} -> {target}: {s:?}",
            senders[i].name()
        );
        times.push(s.total_ms);
    }
    let after = rss(sb.pid()).1;
    times.sort_unstable();
    eprintln!(
        "8 x {} MiB: times {times:?} ms; VmHWM {before} -> {after} KiB",
        COUNT * SIZE / MIB
    );
    // Started together on one link: a pair far behind the median was
    // starved while the others ran.
    let median = times[times.len() / 2];
    assert!(
        times[times.len() - 1] <= 3 * median + 2_000,
        "a pair took far longer than the others: {times:?} ms"
    );
    assert!(
        after - before < RSS_GROWTH_KIB,
        "pod B's sidecar grew from {before} to {after} KiB"
    );
    let payload = (8 * COUNT * SIZE) as f64;
    let counted = relayed_since(b, rx_before, payload);
    assert!(
        counted >= payload && counted < payload * 1.001,
        "relayed rx {counted} for a payload of {payload}"
    );
}

/// b1 is stopped, then a1 sends it one 4.5 MiB message, which the relay
/// cannot hand on in full, and gives up on b1 after net_ticktime; a1's
/// close reaches the sidecar behind those bytes. (b1's socket takes about
/// 4 MB while it is stopped, and the sidecar's side about 2 MB more: a
/// message past their sum would keep a1's close in a1's own socket, the
/// documented case that `tcp.user_timeout_ms` ends.) The sidecar ends the connection
/// `relay.half_close_timeout_ms` (1 s) later, with the default
/// `tcp.user_timeout_ms` (30 s), as its end line says. (It used to miss
/// the close while its write to b1 was blocked and hold the connection
/// until the user timeout dropped b1's leg.)
fn receiver_stopped_with_bytes_in_flight(tls: bool) {
    let tick = TICK_SECS.to_string();
    let options = with_kernel(
        &ErlangOptions::default(),
        &[("net_ticktime", &tick), ("net_setuptime", "2")],
    );
    let config = "[relay]\nhalf_close_timeout_ms = 1000\n";
    let Pair {
        lab,
        sidecars,
        mut a1,
        mut b1,
        _secrets,
    } = Pair::new(tls, config, &options);
    let b1_name = b1.name().to_string();
    let (b, sidecar_b) = (lab.pod("b"), &sidecars[1]);

    // The receiver is spawned on b1, then b1 is stopped, then a1 sends.
    const PAUSE_MS: u64 = 3_000;
    const IN_FLIGHT: usize = 9 * MIB / 2;
    let asked = Instant::now();
    let id = a1.send(&format!(
        "{{stream, {}, 1, {IN_FLIGHT}, 0, {PAUSE_MS}}}",
        atom(&b1_name)
    ));
    let spawned = poll_until(Duration::from_secs(2), Duration::from_millis(20), || {
        b1.rpc(&b1_name, "erlang", "whereis", "[dp_stream_receiver]") != "undefined"
    });
    assert!(spawned, "the receiver did not start on b1");
    b1.signal("STOP");
    let stopped = Instant::now();
    assert!(
        asked.elapsed() < Duration::from_millis(PAUSE_MS - 500),
        "b1 stopped too late to test anything ({:?} after the request)",
        asked.elapsed()
    );
    let outcome = finish_stream(&mut a1, id);
    assert!(
        outcome.is_err(),
        "a stopped node took a message: {outcome:?}"
    );
    let mut line = None;
    let ended = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        // The connection that carried the message (the attempts a1 makes
        // afterwards carry a few bytes).
        line = sidecar_b
            .log_lines_containing("distribution connection ended")
            .into_iter()
            .find(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("rx_bytes="))
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|rx| rx > 64 * 1024)
            });
        line.is_some()
    });
    let took = stopped.elapsed();
    assert!(
        ended,
        "the connection to the stopped b1 is still relayed after {took:?}"
    );
    let line = line.unwrap();
    eprintln!("ended {took:?} after b1 stopped: {line}");
    assert!(
        line.contains("the node kept its side open 1000 ms after the peer closed"),
        "{line}"
    );
    // a1's tick time and the pause, then the half-close timeout: well
    // before the 30 s of the user timeout.
    assert!(took < Duration::from_secs(TICK_SECS * 2 + 6), "{took:?}");
    let freed = poll_until(Duration::from_secs(15), Duration::from_millis(250), || {
        let h = held(b, sidecar_b);
        h.gauge == 0.0 && h.nodes_open == 0 && h.node_legs == 0
    });
    assert!(freed, "pod B holds {:?}", held(b, sidecar_b));
    b1.signal("CONT");
}

#[test]
fn a_receiver_stopped_with_bytes_in_flight_is_let_go_after_the_half_close_timeout() {
    if !e2e_enabled(
        "a_receiver_stopped_with_bytes_in_flight_is_let_go_after_the_half_close_timeout",
        &["ss"],
    ) {
        return;
    }
    receiver_stopped_with_bytes_in_flight(false);
}

#[test]
fn a_receiver_stopped_with_bytes_in_flight_is_let_go_through_the_tls_tunnel() {
    if !e2e_enabled(
        "a_receiver_stopped_with_bytes_in_flight_is_let_go_through_the_tls_tunnel",
        &["ss"],
    ) {
        return;
    }
    receiver_stopped_with_bytes_in_flight(true);
}
