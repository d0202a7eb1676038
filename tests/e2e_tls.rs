//! End-to-end tests of the sidecar ↔ sidecar tunnel over mutual TLS, with
//! real OTP nodes (started with `-pa DIR -epmd_module distproxy_epmd`) in
//! network-namespace pods, and certificates made here with rcgen, written
//! the way Kubernetes mounts a Secret (symlinks through `..data`).
//!
//! Nodes listen on 127.0.0.1 only (see `support::lab`), so every byte
//! between pods passes through the sidecars; a packet capture on the lab's
//! bridge shows what crossed. The sidecars' metrics and logs show how.
//!
//! Needs root, iproute2, erlang-nox and tcpdump; fails saying so otherwise,
//! unless `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use distproxy_testkit::certs::{Ca, Leaf, SecretDir};
use support::beam::ErlangOptions;
use support::mesh::ping_everyone_at_once;
use support::metrics::{metric_sum, metric_sum_pods, metrics};
use support::module::{compile_module, with_module};
use support::process::Proc;
use support::wait::{poll_until, wait_until};
use support::{e2e_enabled, Daemon, Lab, Pod, SidecarOptions, DIST_PORT};

/// A string sent as message payload; it must never cross in clear text.
const MARKER: &str = "DP-MARKER-5c1e-payload-that-must-stay-encrypted";

// ---------------------------------------------------------------------------
// Set-up helpers

/// TLS settings of one pod's sidecar.
struct TlsPod {
    require_tls: bool,
    bind_node_names: bool,
}

impl Default for TlsPod {
    fn default() -> Self {
        TlsPod {
            require_tls: true,
            bind_node_names: true,
        }
    }
}

/// Writes `leaf` and `ca_pem` as a Secret-like directory in the lab and
/// starts the pod's sidecar with `[tls]` pointing at it.
fn spawn_tls_sidecar(
    lab: &Lab,
    pod: &Pod,
    leaf: &Leaf,
    ca_pem: &str,
    opts: TlsPod,
) -> (Daemon, SecretDir) {
    let dir = lab.dir().join(format!("tls-{}", pod.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = SecretDir::create(&dir, &leaf.cert_pem, &leaf.key_pem, ca_pem);
    let toml = format!(
        "[tls]\n\
         cert_file = \"{}\"\n\
         key_file = \"{}\"\n\
         ca_file = \"{}\"\n\
         require_tls = {}\n\
         verify_server_name = \"hostname\"\n\
         bind_node_names = {}\n\
         reload_interval_ms = 200\n",
        secret.cert_file().display(),
        secret.key_file().display(),
        secret.ca_file().display(),
        opts.require_tls,
        opts.bind_node_names,
    );
    let daemon = pod.spawn_sidecar_with(SidecarOptions::default().config(&toml));
    (daemon, secret)
}

/// A certificate for a pod: its host name and address.
fn pod_leaf(ca: &Ca, pod: &Pod, serial: u64) -> Leaf {
    ca.leaf(&[pod.host(), &pod.addr().to_string()], serial)
}

/// A certificate for a pod of a dual-stack lab: its host name and both
/// addresses.
fn dual_stack_leaf(ca: &Ca, pod: &Pod, serial: u64) -> Leaf {
    let (v4, v6) = (pod.addr().to_string(), pod.addr6().to_string());
    ca.leaf(&[pod.host(), &v4, &v6], serial)
}

// ---------------------------------------------------------------------------
// Packet capture on the lab's bridge

/// tcpdump on the lab's bridge (every packet between the pods
/// crosses it once), writing a pcap file; stopped with SIGINT so it flushes.
struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    fn start(lab: &Lab) -> Capture {
        // Pod namespaces are `<bridge namespace><pod name>`.
        let pod = &lab.pods()[0];
        let bridge = pod
            .ns()
            .strip_suffix(pod.name())
            .expect("pod namespace = bridge namespace + pod name");
        let file = lab.dir().join("bridge.pcap");
        let log = lab.dir().join("tcpdump.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", bridge, "tcpdump", "-i", "br0", "-n", "-U"])
            // One interface (every packet once) and a large buffer, so a
            // loaded machine does not drop the bulk transfer's segments.
            .args(["-B", "65536"])
            .args(["-s", "0", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out));
        let mut proc = Proc::spawn("tcpdump on the lab bridge", &mut cmd, &log);
        let started = poll_until(Duration::from_secs(15), Duration::from_millis(50), || {
            if proc.log_text().contains("listening on") {
                return true;
            }
            if let Some(status) = proc.exited() {
                panic!("tcpdump exited ({status}): {}", proc.log_text());
            }
            false
        });
        assert!(started, "tcpdump did not start: {}", proc.log_text());
        Capture { proc, file }
    }

    /// Stops the capture and returns the pcap file's bytes.
    fn stop(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_secs(1));
        let _ = Command::new("kill")
            .args(["-s", "INT", &self.proc.pid().to_string()])
            .status();
        if self.proc.wait_exit(Duration::from_secs(10)).is_none() {
            self.proc.kill();
        }
        let bytes = std::fs::read(&self.file).expect("read the capture");
        // Not left in the lab directory, whose files are printed on failure.
        let _ = std::fs::remove_file(&self.file);
        bytes
    }
}

/// A TCP flow direction: (source, destination) as `ip:port`.
type FlowKey = (String, u16, String, u16);

/// Minimal pcap reader: per flow direction, the TCP payload in sequence
/// order (retransmissions and the duplicate seen on the second veth port
/// dropped).
fn tcp_streams(pcap: &[u8]) -> BTreeMap<FlowKey, Vec<u8>> {
    assert!(pcap.len() >= 24, "capture too short");
    let magic = u32::from_le_bytes(pcap[0..4].try_into().unwrap());
    assert!(
        magic == 0xa1b2c3d4 || magic == 0xa1b23c4d,
        "not a little-endian pcap file (magic {magic:#x})"
    );
    let linktype = u32::from_le_bytes(pcap[20..24].try_into().unwrap());
    let mut segments: BTreeMap<FlowKey, Vec<(u32, bool, Vec<u8>)>> = BTreeMap::new();
    let mut pos = 24;
    while pos + 16 <= pcap.len() {
        let incl = u32::from_le_bytes(pcap[pos + 8..pos + 12].try_into().unwrap()) as usize;
        let frame = &pcap[pos + 16..(pos + 16 + incl).min(pcap.len())];
        pos += 16 + incl;
        // Link layer -> IPv4.
        let (proto, ip) = match linktype {
            1 if frame.len() >= 14 => (u16::from_be_bytes([frame[12], frame[13]]), &frame[14..]),
            113 if frame.len() >= 16 => (u16::from_be_bytes([frame[14], frame[15]]), &frame[16..]),
            276 if frame.len() >= 20 => (u16::from_be_bytes([frame[0], frame[1]]), &frame[20..]),
            1 | 113 | 276 => continue,
            other => panic!("unexpected pcap link type {other}"),
        };
        if proto != 0x0800 || ip.len() < 20 || ip[9] != 6 {
            continue;
        }
        let ihl = (ip[0] & 0x0f) as usize * 4;
        let total = (u16::from_be_bytes([ip[2], ip[3]]) as usize).min(ip.len());
        if total < ihl + 20 {
            continue;
        }
        let src = format!("{}.{}.{}.{}", ip[12], ip[13], ip[14], ip[15]);
        let dst = format!("{}.{}.{}.{}", ip[16], ip[17], ip[18], ip[19]);
        let tcp = &ip[ihl..total];
        let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        let seq = u32::from_be_bytes(tcp[4..8].try_into().unwrap());
        let syn = tcp[13] & 0x02 != 0;
        let off = (tcp[12] >> 4) as usize * 4;
        let payload = tcp.get(off..).unwrap_or_default().to_vec();
        segments
            .entry((src, sport, dst, dport))
            .or_default()
            .push((seq, syn, payload));
    }
    segments
        .into_iter()
        .map(|(key, segs)| {
            // Sequence numbers relative to the SYN (captured: the capture
            // starts before any connection).
            let isn = segs
                .iter()
                .find(|s| s.1)
                .map(|s| s.0.wrapping_add(1))
                .unwrap_or_else(|| segs.iter().map(|s| s.0).min().unwrap_or(0));
            let mut data: Vec<(u32, Vec<u8>)> = segs
                .into_iter()
                .filter(|s| !s.2.is_empty())
                .map(|s| (s.0.wrapping_sub(isn), s.2))
                .collect();
            data.sort_by_key(|d| d.0);
            let mut stream = Vec::new();
            for (rel, bytes) in data {
                let rel = rel as usize;
                if rel > stream.len() {
                    break; // a gap: the rest cannot be interpreted
                }
                let skip = stream.len() - rel;
                if skip < bytes.len() {
                    stream.extend_from_slice(&bytes[skip..]);
                }
            }
            (key, stream)
        })
        .collect()
}

/// Walks `stream` as TLS records; `Err` describes the first thing that is
/// not one. A final partial record is accepted (the capture may end there).
fn tls_records(stream: &[u8]) -> Result<usize, String> {
    let mut pos = 0;
    let mut records = 0;
    while pos + 5 <= stream.len() {
        let (ty, major, minor) = (stream[pos], stream[pos + 1], stream[pos + 2]);
        let len = u16::from_be_bytes([stream[pos + 3], stream[pos + 4]]) as usize;
        if !(20..=23).contains(&ty) || major != 3 || !(1..=3).contains(&minor) || len > 16384 + 256
        {
            return Err(format!(
                "offset {pos}: {:02x?} is not a TLS record header",
                &stream[pos..pos + 5]
            ));
        }
        if records == 0 && ty != 22 {
            return Err(format!("first record has type {ty}, not handshake (22)"));
        }
        pos += 5 + len;
        records += 1;
    }
    Ok(records)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------
// Tests

/// Pods A (a1 a2) and B (b1 b2), TLS required, host names verified, node
/// names bound to certificates. Every node pings every other at the same
/// instant, rpc crosses both ways carrying a marker string, 4 MiB cross
/// intact. A capture of everything that crossed the bridge holds only TLS
/// records on the distribution port: no node or host name, no marker.
#[test]
fn tls_pods_carry_every_pair_and_only_tls_crosses_the_bridge() {
    if !e2e_enabled(
        "tls_pods_carry_every_pair_and_only_tls_crosses_the_bridge",
        &["tcpdump"],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let ebin = compile_module(&lab);
    let ca = Ca::new("dp-e2e-ca");
    let (mut sidecar_a, _sa) =
        spawn_tls_sidecar(&lab, a, &pod_leaf(&ca, a, 0xa1), &ca.pem, TlsPod::default());
    let (mut sidecar_b, _sb) =
        spawn_tls_sidecar(&lab, b, &pod_leaf(&ca, b, 0xb1), &ca.pem, TlsPod::default());
    let capture = Capture::start(&lab);

    let opts = with_module(&ebin);
    let mut nodes = vec![
        a.spawn_erlang_with("a1", &opts),
        a.spawn_erlang_with("a2", &opts),
        b.spawn_erlang_with("b1", &opts),
        b.spawn_erlang_with("b2", &opts),
    ];
    for node in &mut nodes {
        node.wait_ready();
    }
    let names: Vec<String> = nodes.iter().map(|n| n.name().to_string()).collect();
    ping_everyone_at_once(&mut nodes);

    // rpc both ways across pods, answered by the node named, with the
    // marker as message payload (in the call and in the reply).
    let marker_arg = format!("[\"{MARKER}\"]");
    let expected = format!("<<\"{MARKER}\">>");
    for (from, to) in [(0, 2), (3, 1), (1, 3), (2, 0)] {
        let target = names[to].clone();
        assert_eq!(nodes[from].rpc_node(&target), target);
        assert_eq!(
            nodes[from].rpc(&target, "erlang", "list_to_binary", &marker_arg),
            expected,
            "{} -> {target}",
            names[from]
        );
    }
    let blob = nodes[0].send_blob(&names[3], 4 * 1024 * 1024);
    assert_eq!(
        (blob.remote_size, &blob.remote_md5),
        (blob.size, &blob.local_md5),
        "a1 -> b2 blob"
    );

    let pcap = capture.stop();
    for needle in [
        MARKER.as_bytes(),
        b"DP-MARKER",
        b"dp.test",
        b"pod-a",
        b"pod-b",
        lab.cookie().as_bytes(),
    ] {
        assert!(
            !contains(&pcap, needle),
            "{:?} crossed the bridge in clear text",
            String::from_utf8_lossy(needle)
        );
    }
    let streams = tcp_streams(&pcap);
    let mut tls_streams = 0;
    let mut tls_bytes = 0;
    for ((src, sport, dst, dport), stream) in &streams {
        if stream.is_empty() {
            continue;
        }
        assert!(
            *sport == DIST_PORT || *dport == DIST_PORT,
            "{src}:{sport} -> {dst}:{dport}: {} bytes outside the distribution port",
            stream.len()
        );
        match tls_records(stream) {
            Ok(records) => {
                assert!(records >= 1);
                tls_streams += 1;
                tls_bytes += stream.len();
            }
            Err(e) => panic!("{src}:{sport} -> {dst}:{dport}: not TLS: {e}"),
        }
    }
    // a1/a2 <-> b1/b2: at least 4 connections, 2 directions each.
    assert!(
        tls_streams >= 8,
        "TLS stream directions seen: {tls_streams}"
    );
    // The blob's stream is verified as TLS records up to the first segment
    // the capture missed (offloaded super-segments can exceed the snapshot
    // length, and the tail may still be in tcpdump's buffer at SIGINT).
    assert!(
        tls_bytes > 1_000_000,
        "the capture holds only {tls_bytes} bytes verified as TLS records"
    );
    eprintln!(
        "capture: {} bytes, {tls_streams} TLS stream directions, {tls_bytes} TLS bytes",
        pcap.len()
    );

    let (ma, mb) = (metrics(a), metrics(b));
    for (pod, text) in [("a", &ma), ("b", &mb)] {
        let failures = metric_sum(text, "distproxy_tls_handshake_failures_total", &[]);
        assert_eq!(failures, 0.0, "pod {pod}: TLS handshake failures\n{text}");
        let refused = metric_sum(
            text,
            "distproxy_connections_closed_total",
            &[("reason", "refused_by_policy")],
        );
        assert_eq!(refused, 0.0, "pod {pod}: refused connections\n{text}");
        for method in ["correlated", "single_node", "unroutable"] {
            let n = metric_sum(text, "distproxy_routes_total", &[("method", method)]);
            assert_eq!(n, 0.0, "pod {pod}: routes by {method}");
        }
    }
    // Each of the 4 cross-pod pairs kept at least one connection, routed
    // by preamble at its target's sidecar. Not more: when a pair dials each
    // other at once, OTP keeps the connection of the node with the greater
    // name, and the other may be given up before it reached a sidecar.
    let preamble = metric_sum_pods(
        &[&ma, &mb],
        "distproxy_routes_total",
        &[("method", "preamble")],
    );
    assert!(
        preamble >= 4.0,
        "connections routed by preamble: {preamble}\npod a:\n{ma}\npod b:\n{mb}"
    );
    // Every connection routed by preamble left through its initiator's
    // sidecar, over TLS.
    let outbound = metric_sum_pods(
        &[&ma, &mb],
        "distproxy_dist_connections_total",
        &[("direction", "outbound")],
    );
    assert!(
        outbound >= preamble,
        "tunnel connections out ({outbound}) fewer than routed by preamble ({preamble})"
    );
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}

/// `require_tls`: a node in a pod without a sidecar (stock epmd, plain
/// distribution) cannot reach a node of pod A, which requires TLS; it does
/// reach pod D, whose sidecar has TLS but allows raw connections. A and D
/// talk TLS to each other.
#[test]
fn require_tls_refuses_a_pod_without_sidecar_that_a_permissive_pod_accepts() {
    if !e2e_enabled(
        "require_tls_refuses_a_pod_without_sidecar_that_a_permissive_pod_accepts",
        &[],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "c", "d"]);
    let (a, c, d) = (lab.pod("a"), lab.pod("c"), lab.pod("d"));
    let ebin = compile_module(&lab);
    let ca = Ca::new("dp-e2e-ca");
    let (mut sidecar_a, _sa) =
        spawn_tls_sidecar(&lab, a, &pod_leaf(&ca, a, 0xa1), &ca.pem, TlsPod::default());
    // Binding names needs require_tls (check-config refuses it otherwise).
    let permissive = TlsPod {
        require_tls: false,
        bind_node_names: false,
    };
    let (mut sidecar_d, _sd) =
        spawn_tls_sidecar(&lab, d, &pod_leaf(&ca, d, 0xd1), &ca.pem, permissive);
    let _epmd_c = c.spawn_stock_epmd();

    let opts = with_module(&ebin);
    let mut a1 = a.spawn_erlang_with("a1", &opts);
    let mut d1 = d.spawn_erlang_with("d1", &opts);
    let mut c1 = c.spawn_erlang("c1");
    for node in [&mut a1, &mut d1, &mut c1] {
        node.wait_ready();
    }
    let (a1_name, d1_name) = (a1.name().to_string(), d1.name().to_string());

    assert_eq!(
        c1.ping(&a1_name),
        "pang",
        "plain distribution into a require_tls pod"
    );
    let ma = metrics(a);
    assert!(
        metric_sum(
            &ma,
            "distproxy_connections_closed_total",
            &[("reason", "refused_by_policy")]
        ) >= 1.0,
        "pod a counts the refusal\n{ma}"
    );
    assert!(!sidecar_a
        .log_lines_containing("refused (tls.require_tls)")
        .is_empty());

    assert_eq!(
        c1.ping(&d1_name),
        "pong",
        "plain distribution into a permissive pod"
    );
    assert_eq!(c1.rpc_node(&d1_name), d1_name);

    // The two sidecar pods talk TLS.
    assert_eq!(a1.ping(&d1_name), "pong");
    assert_eq!(d1.rpc_node(&a1_name), a1_name);
    let md = metrics(d);
    assert_eq!(
        metric_sum(&md, "distproxy_tls_handshake_failures_total", &[]),
        0.0
    );
    sidecar_a.assert_no_misroute();
    sidecar_d.assert_no_misroute();
}

/// A sidecar whose certificate comes from another CA is refused in both
/// directions; with `bind_node_names`, a sidecar holding pod A's
/// certificate can carry nodes named for pod A but not a node named for
/// pod B.
#[test]
fn another_ca_and_unbound_node_names_are_refused() {
    if !e2e_enabled("another_ca_and_unbound_node_names_are_refused", &[]) {
        return;
    }
    let lab = Lab::new(&["a", "e", "f"]);
    let (a, e, f) = (lab.pod("a"), lab.pod("e"), lab.pod("f"));
    let ebin = compile_module(&lab);
    let ca = Ca::new("dp-e2e-ca");
    let other = Ca::new("some-other-ca");
    let a_leaf = pod_leaf(&ca, a, 0xa1);
    let (mut sidecar_a, _sa) = spawn_tls_sidecar(&lab, a, &a_leaf, &ca.pem, TlsPod::default());
    // Pod E: a certificate for its own name, but from another CA (it trusts
    // ours, so the refusal is the server's).
    let (_sidecar_e, _se) = spawn_tls_sidecar(
        &lab,
        e,
        &pod_leaf(&other, e, 0xe1),
        &ca.pem,
        TlsPod::default(),
    );
    // Pod F: holds pod A's certificate.
    let (_sidecar_f, _sf) = spawn_tls_sidecar(&lab, f, &a_leaf, &ca.pem, TlsPod::default());

    let mut a1 = a.spawn_erlang_with("a1", &with_module(&ebin));
    let mut e1 = e.spawn_erlang_with("e1", &with_module(&ebin));
    let named = |name: &str| ErlangOptions {
        name: Some(name.to_string()),
        ..with_module(&ebin)
    };
    let mut fb = f.spawn_erlang_with("fb", &named("x@pod-b.dp.test"));
    let mut fa = f.spawn_erlang_with("fa", &named("y@pod-a.dp.test"));
    for node in [&mut a1, &mut e1, &mut fb, &mut fa] {
        node.wait_ready();
    }
    let a1_name = a1.name().to_string();
    let e1_name = e1.name().to_string();

    assert_eq!(
        e1.ping(&a1_name),
        "pang",
        "client certificate of another CA"
    );
    assert_eq!(
        a1.ping(&e1_name),
        "pang",
        "server certificate of another CA"
    );
    let ma = metrics(a);
    assert!(
        metric_sum(
            &ma,
            "distproxy_tls_handshake_failures_total",
            &[("side", "accept"), ("reason", "unknown_ca")]
        ) >= 1.0,
        "pod a refused e's client certificate\n{ma}"
    );
    assert!(
        metric_sum(
            &ma,
            "distproxy_tls_handshake_failures_total",
            &[("side", "connect"), ("reason", "unknown_ca")]
        ) >= 1.0,
        "pod a refused e's server certificate\n{ma}"
    );
    // Pod E sees its own certificate refused: in TLS 1.3 that is an alert
    // after its handshake, counted on its connect side all the same.
    let me = metrics(e);
    assert!(
        metric_sum(
            &me,
            "distproxy_tls_handshake_failures_total",
            &[("side", "connect"), ("reason", "unknown_ca")]
        ) >= 1.0,
        "pod e counts the refusal of its own certificate\n{me}"
    );

    let refused_before = metric_sum(
        &ma,
        "distproxy_connections_closed_total",
        &[("reason", "refused_by_policy")],
    );
    assert_eq!(
        fb.ping(&a1_name),
        "pang",
        "pod A's certificate carrying a node of pod B"
    );
    let ma = metrics(a);
    assert!(
        metric_sum(
            &ma,
            "distproxy_connections_closed_total",
            &[("reason", "refused_by_policy")]
        ) > refused_before
    );
    assert!(
        !sidecar_a
            .log_lines_containing("not bound to the peer's certificate")
            .is_empty(),
        "{}",
        sidecar_a.log()
    );
    // The same certificate carrying a node of pod A's host is accepted.
    assert_eq!(fa.ping(&a1_name), "pong");
    assert_eq!(fa.rpc_node(&a1_name), a1_name);
    sidecar_a.assert_no_misroute();
}

/// Certificates (and the CA) are rotated on both pods through a Secret-like
/// symlink swap while a bulk transfer runs: the established connection
/// carries on untouched, and a connection made afterwards uses the new
/// certificates (it can only: both sides now trust the new CA alone).
#[test]
fn certificate_rotation_during_traffic() {
    if !e2e_enabled("certificate_rotation_during_traffic", &[]) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let ebin = compile_module(&lab);
    let ca1 = Ca::new("dp-e2e-ca-1");
    let ca2 = Ca::new("dp-e2e-ca-2");
    let (mut sidecar_a, secret_a) = spawn_tls_sidecar(
        &lab,
        a,
        &pod_leaf(&ca1, a, 0xa1),
        &ca1.pem,
        TlsPod::default(),
    );
    let (mut sidecar_b, secret_b) = spawn_tls_sidecar(
        &lab,
        b,
        &pod_leaf(&ca1, b, 0xb1),
        &ca1.pem,
        TlsPod::default(),
    );

    let opts = with_module(&ebin);
    let mut a1 = a.spawn_erlang_with("a1", &opts);
    let mut b1 = b.spawn_erlang_with("b1", &opts);
    a1.wait_ready();
    b1.wait_ready();
    let b1_name = b1.name().to_string();
    assert_eq!(a1.ping(&b1_name), "pong");
    let connections = |pod: &Pod| {
        metric_sum(
            &metrics(pod),
            "distproxy_dist_connections_total",
            &[("direction", "inbound")],
        )
    };
    let inbound_b = connections(b);

    // Bulk transfers back to back (8 MiB each) on the a1-b1 connection
    // while both pods rotate to CA 2, and until after both have reloaded.
    // Synchronised on the transfers themselves: two have started before the
    // rotation, and one started after both sidecars reloaded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started_count = || started.load(std::sync::atomic::Ordering::SeqCst);
    let traffic = {
        let stop = std::sync::Arc::clone(&stop);
        let started = std::sync::Arc::clone(&started);
        let b1_name = b1_name.clone();
        std::thread::spawn(move || {
            let mut blobs = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let at = Instant::now();
                started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                blobs.push((at, a1.send_blob(&b1_name, 8 * 1024 * 1024)));
            }
            (a1, blobs)
        })
    };
    let transfers = Duration::from_secs(120);
    wait_until(transfers, "two transfers before the rotation", || {
        started_count() >= 2 || traffic.is_finished()
    });
    let a_new = pod_leaf(&ca2, a, 0xa2);
    let b_new = pod_leaf(&ca2, b, 0xb2);
    secret_a.write(&a_new.cert_pem, &a_new.key_pem, &ca2.pem);
    secret_b.write(&b_new.cert_pem, &b_new.key_pem, &ca2.pem);
    let reloaded = "new connections use the new certificate";
    sidecar_a.wait_log(reloaded, 1, Duration::from_secs(10));
    sidecar_b.wait_log(reloaded, 1, Duration::from_secs(10));
    let reloaded_at = Instant::now();
    // The transfer running now may have started before `reloaded_at`; the
    // one after it cannot have.
    let running = started_count();
    wait_until(transfers, "a transfer after the reload", || {
        started_count() >= running + 2 || traffic.is_finished()
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut a1, blobs) = traffic.join().expect("traffic thread");

    // The established connection carried every transfer, across the reload.
    for (_, blob) in &blobs {
        assert_eq!(
            (blob.remote_size, &blob.remote_md5),
            (blob.size, &blob.local_md5),
            "blob across the rotation"
        );
    }
    let before = blobs.iter().filter(|(t, _)| *t < reloaded_at).count();
    let after = blobs.len() - before;
    eprintln!("transfers: {before} started before both reloads, {after} after");
    assert!(
        before >= 2 && after >= 1,
        "traffic spans the reload: {before} before, {after} after"
    );
    for _ in 0..5 {
        assert_eq!(a1.rpc_node(&b1_name), b1_name);
    }
    assert_eq!(
        connections(b),
        inbound_b,
        "the a1-b1 connection was not re-established"
    );
    assert!(a1.nodes().contains(&b1_name));

    // A new connection uses the new certificates on both sides.
    let mut a2 = a.spawn_erlang_with("a2", &opts);
    a2.wait_ready();
    assert_eq!(a2.ping(&b1_name), "pong");
    assert_eq!(a2.rpc_node(&b1_name), b1_name);
    let a_serial = format!("serial {}", a_new.serial_string());
    let b_serial = format!("serial {}", b_new.serial_string());
    assert!(
        sidecar_b
            .log_lines_containing("TLS peer authenticated")
            .iter()
            .any(|l| l.contains(&a_serial)),
        "pod b saw pod a's new certificate ({a_serial}):\n{}",
        sidecar_b.log()
    );
    assert!(
        sidecar_a
            .log_lines_containing("TLS to the remote sidecar established")
            .iter()
            .any(|l| l.contains(&b_serial)),
        "pod a saw pod b's new certificate ({b_serial})"
    );
    for (pod, text) in [("a", metrics(a)), ("b", metrics(b))] {
        assert_eq!(
            metric_sum(&text, "distproxy_tls_handshake_failures_total", &[]),
            0.0,
            "pod {pod}\n{text}"
        );
        assert!(metric_sum(&text, "distproxy_tls_reloads_total", &[]) >= 1.0);
    }
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}

/// A dual-stack cluster whose sidecars require mutual TLS, and nodes of
/// `-proto_dist inet6_tcp` started with the helper module. Their
/// connections to another pod go through the local sidecar's egress port on
/// `::1` and the TLS tunnel (a plaintext connection from another pod would
/// be refused): ping, rpc and a 4 MiB blob cross in both directions, and a
/// node of the same pod is reached on its own `::1` port. The metrics prove
/// the path: egress requests answered, connections out of pod A's sidecar
/// for the initiating node, routed by preamble at pod B, every relay
/// buffered (TLS; a plaintext pair of sockets would be spliced), no EPMD
/// lookup, nothing refused, no TLS failure.
#[test]
fn inet6_nodes_use_the_tls_tunnel_between_dual_stack_pods() {
    if !e2e_enabled(
        "inet6_nodes_use_the_tls_tunnel_between_dual_stack_pods",
        &["ss"],
    ) {
        return;
    }
    let lab = Lab::new_dual_stack(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let ebin = compile_module(&lab);
    let ca = Ca::new("dp-e2e-ca");
    let leaf = |pod: &Pod, serial| dual_stack_leaf(&ca, pod, serial);
    let (mut sidecar_a, _sa) =
        spawn_tls_sidecar(&lab, a, &leaf(a, 0xa6), &ca.pem, TlsPod::default());
    let (mut sidecar_b, _sb) =
        spawn_tls_sidecar(&lab, b, &leaf(b, 0xb6), &ca.pem, TlsPod::default());

    // `-proto_dist inet6_tcp`, listening on ::1, plus the module.
    let mut six = ErlangOptions::inet6();
    six.extra_args.extend(with_module(&ebin).extra_args);
    let mut a6 = a.spawn_erlang_with("a6", &six);
    let mut a7 = a.spawn_erlang_with("a7", &six);
    let mut b6 = b.spawn_erlang_with("b6", &six);
    for node in [&mut a6, &mut a7, &mut b6] {
        node.wait_ready();
    }
    let (a6_name, a7_name, b6_name) = (a.node_name("a6"), a.node_name("a7"), b.node_name("b6"));
    for node in [&mut a6, &mut a7, &mut b6] {
        let me = node.name().to_string();
        assert_eq!(
            node.rpc(&me, "net_kernel", "epmd_module", "[]"),
            "distproxy_epmd",
            "{me} runs with the helper module"
        );
        assert_eq!(
            node.rpc(&me, "init", "get_argument", "[proto_dist]"),
            "{ok,[[\"inet6_tcp\"]]}",
            "{me} runs inet6_tcp"
        );
        assert!(node.nodes().is_empty(), "{me} already connected");
    }

    // a6 -> b6 through pod A's egress port and the TLS tunnel.
    assert_eq!(a6.ping(&b6_name), "pong", "a6 -> b6 across pods");
    assert_eq!(a6.rpc_node(&b6_name), b6_name, "rpc a6 -> b6");
    let marker_arg = format!("[\"{MARKER}\"]");
    assert_eq!(
        a6.rpc(&b6_name, "erlang", "list_to_binary", &marker_arg),
        format!("<<\"{MARKER}\">>"),
        "rpc a6 -> b6 with a payload"
    );
    let blob = a6.send_blob(&b6_name, 4 * 1024 * 1024);
    assert_eq!(
        (blob.remote_size, &blob.remote_md5),
        (blob.size, &blob.local_md5),
        "a6 -> b6 blob"
    );

    // The module answers ::1 for inet6, and a6's connection is on pod A's
    // egress port there: [::1]:* -> [::1]:<egress port>.
    let answer = a6.rpc(
        &a6_name,
        "distproxy_epmd",
        "address_please",
        &format!("[\"b6\", \"{}\", inet6]", b.host()),
    );
    let port: u16 = answer
        .strip_prefix("{ok,{0,0,0,0,0,0,0,1},")
        .and_then(|rest| rest.strip_suffix(",6}"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("address_please of b6 for inet6: {answer}"));
    let listening: Vec<String> = a
        .listening_tcp()
        .iter()
        .map(|l| l.addr.to_string())
        .collect();
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        assert!(
            listening.contains(&addr),
            "pod A's egress port for b6 listens on {addr}: {listening:?}"
        );
    }
    let filter = format!("( sport = :{port} )");
    let sockets = a.run_ok("ss", &["-Htn", "state", "established", &filter]);
    assert!(
        sockets
            .lines()
            .any(|l| l.contains(&format!("[::1]:{port}")) && l.matches("[::1]:").count() == 2),
        "pod A: no connection [::1]:* -> [::1]:{port} (the egress port over IPv6):\n{sockets}"
    );

    // b6 -> a7: the other direction, through pod B's egress port.
    assert_eq!(b6.rpc_node(&a7_name), a7_name, "rpc b6 -> a7 across pods");
    // a6 -> a7, both of pod A: the sidecar answers a7's own port, on ::1.
    assert_eq!(a6.rpc_node(&a7_name), a7_name, "rpc a6 -> a7 in pod A");

    let (ma, mb) = (metrics(a), metrics(b));
    for (pod, text) in [("a", &ma), ("b", &mb)] {
        let egress_ok = metric_sum(
            text,
            "distproxy_epmd_requests_total",
            &[("type", "egress"), ("result", "ok")],
        );
        assert!(
            egress_ok >= 1.0,
            "pod {pod}: egress requests answered\n{text}"
        );
        let lookups = metric_sum(
            text,
            "distproxy_epmd_requests_total",
            &[("type", "port_please2")],
        );
        assert_eq!(
            lookups, 0.0,
            "pod {pod}: no EPMD lookup with the module\n{text}"
        );
        assert_eq!(
            metric_sum(text, "distproxy_tls_handshake_failures_total", &[]),
            0.0,
            "pod {pod}: TLS handshake failures\n{text}"
        );
        assert_eq!(
            metric_sum(
                text,
                "distproxy_connections_closed_total",
                &[("reason", "refused_by_policy")]
            ),
            0.0,
            "pod {pod}: refused connections\n{text}"
        );
        for method in ["correlated", "single_node", "unroutable"] {
            let n = metric_sum(text, "distproxy_routes_total", &[("method", method)]);
            assert_eq!(n, 0.0, "pod {pod}: routes by {method}\n{text}");
        }
        assert!(
            metric_sum(text, "distproxy_routes_total", &[("method", "preamble")]) >= 1.0,
            "pod {pod}: a connection came in by the tunnel\n{text}"
        );
        // Every relay had a TLS side: buffered, never spliced.
        assert!(
            metric_sum(
                text,
                "distproxy_relay_connections_total",
                &[("path", "buffered")]
            ) >= 2.0,
            "pod {pod}: TLS relays\n{text}"
        );
        for path in ["splice", "sockmap"] {
            let n = metric_sum(text, "distproxy_relay_connections_total", &[("path", path)]);
            assert_eq!(n, 0.0, "pod {pod}: plaintext relays ({path})\n{text}");
        }
    }
    // Out of pod A's sidecar for a6 (a6 -> b6), out of pod B's for b6
    // (b6 -> a7).
    for (pod, text, short) in [("a", &ma, "a6"), ("b", &mb, "b6")] {
        let outbound = metric_sum(
            text,
            "distproxy_dist_connections_total",
            &[("node", short), ("direction", "outbound")],
        );
        assert!(
            outbound >= 1.0,
            "pod {pod}: tunnel connections out for {short}\n{text}"
        );
    }
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}

/// A peer in pod C that opens TLS connections to pod A's distribution port,
/// sends a tunnel ClientHello on each and then nothing (slowloris on the
/// handshake), keeping about `held` of them open (the sidecar ends each one
/// at its handshake deadline; they are replaced) until `stop` is set.
/// Counts the connections it opened in `opened`.
fn stall_tls_handshakes(
    c: &Pod,
    target: std::net::SocketAddr,
    ca_pem: &str,
    held: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    opened: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use tokio_rustls::rustls;
    let ca_pem = ca_pem.to_string();
    c.spawn_in(move || {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"distproxy-tunnel/1".to_vec()];
        let config = Arc::new(config);
        let mut open: Vec<(Instant, std::net::TcpStream)> = Vec::new();
        while !stop.load(Ordering::Acquire) {
            // The sidecar has ended those older than its deadline (5 s).
            open.retain(|(at, _)| at.elapsed() < Duration::from_secs(6));
            while open.len() < held {
                let Ok(mut tcp) =
                    std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1))
                else {
                    break;
                };
                let name = rustls::pki_types::ServerName::try_from("pod-a.dp.test").unwrap();
                let mut hello = rustls::ClientConnection::new(Arc::clone(&config), name).unwrap();
                // The ClientHello, then silence.
                if hello.write_tls(&mut tcp).is_ok() {
                    open.push((Instant::now(), tcp));
                    opened.fetch_add(1, Ordering::AcqRel);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

/// One address stalling TLS handshakes on pod A's distribution port, more
/// of them than `limits.max_tls_handshakes`, does not keep other pods'
/// sidecars out: their nodes still connect at once; the stalled ones end at
/// the handshake deadline, counted as `timeout` and logged.
#[test]
fn stalled_tls_handshakes_from_one_address_do_not_keep_other_pods_out() {
    if !e2e_enabled(
        "stalled_tls_handshakes_from_one_address_do_not_keep_other_pods_out",
        &[],
    ) {
        return;
    }
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let lab = Lab::new(&["a", "b", "c"]);
    let (a, b, c) = (lab.pod("a"), lab.pod("b"), lab.pod("c"));
    let ebin = compile_module(&lab);
    let ca = Ca::new("dp-e2e-ca");
    let (sidecar_a, _sa) =
        spawn_tls_sidecar(&lab, a, &pod_leaf(&ca, a, 0xa1), &ca.pem, TlsPod::default());
    let (_sidecar_b, _sb) =
        spawn_tls_sidecar(&lab, b, &pod_leaf(&ca, b, 0xb1), &ca.pem, TlsPod::default());
    let opts = with_module(&ebin);
    let mut a1 = a.spawn_erlang_with("a1", &opts);
    let mut b1 = b.spawn_erlang_with("b1", &opts);
    a1.wait_ready();
    b1.wait_ready();

    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    // 200 stalled handshakes held, against 64 slots (the default).
    let attacker = stall_tls_handshakes(
        c,
        std::net::SocketAddr::from((a.addr(), DIST_PORT)),
        &ca.pem,
        200,
        Arc::clone(&stop),
        Arc::clone(&opened),
    );
    let held = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        opened.load(Ordering::Acquire) >= 200
    });
    assert!(
        held,
        "pod C opened {} connections",
        opened.load(Ordering::Acquire)
    );
    // Let the sidecar take them to the handshake.
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let pong = b1.ping(a1.name());
    let took = started.elapsed();
    assert_eq!(pong, "pong", "b1 -> a1 while pod C stalls handshakes");
    assert!(
        took < Duration::from_secs(3),
        "b1 waited {took:?} behind pod C's stalled handshakes"
    );
    // The stalled ones end at the deadline: counted and logged, with pod
    // C's address.
    let timed_out = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        metric_sum(
            &metrics(a),
            "distproxy_tls_handshake_failures_total",
            &[("side", "accept"), ("reason", "timeout")],
        ) >= 1.0
    });
    stop.store(true, Ordering::Release);
    attacker.join().unwrap();
    assert!(timed_out, "no handshake timeout counted\n{}", metrics(a));
    // Logged once the handshake has returned, a moment after it was
    // counted: waited for, not read at once.
    let c_addr = c.addr().to_string();
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
            sidecar_a
                .log_lines_containing("TLS handshake with a peer failed")
                .iter()
                .any(|l| l.contains(&c_addr) && l.contains("timed out"))
        }),
        "{}",
        sidecar_a.log()
    );
    // The established pair was never disturbed.
    assert_eq!(b1.ping(a1.name()), "pong");
}

/// A pod whose sidecar has no `[tls]` (a rollout done in the wrong order)
/// talks to a pod that requires TLS: its plaintext tunnel is refused,
/// counted and logged on the receiving side, and the sending side's log
/// says that the remote sidecar closed it and where to look.
#[test]
fn a_sidecar_without_tls_is_refused_by_a_pod_that_requires_it_and_says_so() {
    if !e2e_enabled(
        "a_sidecar_without_tls_is_refused_by_a_pod_that_requires_it_and_says_so",
        &[],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let ebin = compile_module(&lab);
    let ca = Ca::new("dp-e2e-ca");
    let (sidecar_a, _sa) =
        spawn_tls_sidecar(&lab, a, &pod_leaf(&ca, a, 0xa1), &ca.pem, TlsPod::default());
    let sidecar_b = b.spawn_sidecar(&[]);
    let opts = with_module(&ebin);
    let mut a1 = a.spawn_erlang_with("a1", &opts);
    let mut b1 = b.spawn_erlang_with("b1", &opts);
    a1.wait_ready();
    b1.wait_ready();

    assert_eq!(
        b1.ping(a1.name()),
        "pang",
        "plaintext tunnel into require_tls"
    );
    let ma = metrics(a);
    assert!(
        metric_sum(
            &ma,
            "distproxy_connections_closed_total",
            &[("reason", "refused_by_policy")]
        ) >= 1.0,
        "{ma}"
    );
    let b_addr = b.addr().to_string();
    assert!(
        sidecar_a
            .log_lines_containing("refused (tls.require_tls)")
            .iter()
            .any(|l| l.contains(&b_addr)),
        "{}",
        sidecar_a.log()
    );
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
            !sidecar_b
                .log_lines_containing("tunnel connection ended before the remote node answered")
                .is_empty()
        }),
        "{}",
        sidecar_b.log()
    );
    // Pod A's own nodes are undisturbed.
    let mut a2 = a.spawn_erlang_with("a2", &opts);
    a2.wait_ready();
    assert_eq!(a2.ping(a1.name()), "pong");
}

/// What a Deployment's nodes are called in an IPv6-only cluster: the pod
/// IP is an IPv6 address, so the names are `a6@fd00:d157::…`, and the
/// nodes run `inet6_tcp` with the helper module (OTP's `inet_tcp` calls
/// such a host illegal). Between two dual-stack pods whose sidecars
/// require mutual TLS and bind node names to certificates: the egress
/// request, the preamble and `bind_node_names` take the IPv6 literal host
/// (matched against the certificate's IP SAN, also when written in
/// another form, `fd00:d157:0:0::…`), and an `inet6_tcp` node reaches an
/// `inet_tcp` node of the other pod by its DNS name through the tunnel. A
/// node of pod B that names itself with pod A's address is refused by pod
/// A: its certificate does not carry that address.
#[test]
fn nodes_named_by_ipv6_addresses_use_the_tls_tunnel_with_bound_names() {
    if !e2e_enabled(
        "nodes_named_by_ipv6_addresses_use_the_tls_tunnel_with_bound_names",
        &[],
    ) {
        return;
    }
    let lab = Lab::new_dual_stack(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let ebin = compile_module(&lab);
    let ca = Ca::new("dp-e2e-ca");
    let leaf = |pod: &Pod, serial| dual_stack_leaf(&ca, pod, serial);
    let (mut sidecar_a, _sa) =
        spawn_tls_sidecar(&lab, a, &leaf(a, 0xa61), &ca.pem, TlsPod::default());
    let (mut sidecar_b, _sb) =
        spawn_tls_sidecar(&lab, b, &leaf(b, 0xb61), &ca.pem, TlsPod::default());
    let six = |name: String| {
        let mut o = ErlangOptions::inet6();
        o.name = Some(name);
        o.extra_args.extend(with_module(&ebin).extra_args);
        o
    };
    let a6_name = format!("a6@{}", a.addr6());
    let b6_name = format!("b6@{}", b.addr6());
    // Pod B's address written with its zeros: the same address.
    let segments = b.addr6().segments();
    let b7_name = format!(
        "b7@{:x}:{:x}:0:0::{:x}",
        segments[0], segments[1], segments[7]
    );
    assert_eq!(segments[2..7], [0; 5], "the lab's prefix is fd00:d157::/64");
    let mut a6 = a.spawn_erlang_with("a6", &six(a6_name.clone()));
    let mut b6 = b.spawn_erlang_with("b6", &six(b6_name.clone()));
    let mut b7 = b.spawn_erlang_with("b7", &six(b7_name.clone()));
    let mut b4 = b.spawn_erlang_with("b4", &with_module(&ebin));
    let evil_name = format!("evil@{}", a.addr6());
    let mut evil = b.spawn_erlang_with("evil", &six(evil_name));
    for node in [&mut a6, &mut b6, &mut b7, &mut b4, &mut evil] {
        node.wait_ready();
    }
    assert_eq!(a6.name(), a6_name);

    assert_eq!(a6.ping(&b6_name), "pong", "a6 -> b6, both named by address");
    assert_eq!(b6.rpc_node(&a6_name), a6_name, "rpc b6 -> a6");
    assert_eq!(b7.rpc_node(&a6_name), a6_name, "rpc b7 -> a6");
    let b4_name = b.node_name("b4");
    assert_eq!(
        a6.rpc_node(&b4_name),
        b4_name,
        "rpc a6 (inet6) -> b4 (inet)"
    );
    assert_eq!(evil.ping(&a6_name), "pang", "evil names itself after pod A");

    let (ma, mb) = (metrics(a), metrics(b));
    for (pod, text) in [("a", &ma), ("b", &mb)] {
        assert_eq!(
            metric_sum(
                text,
                "distproxy_epmd_requests_total",
                &[("type", "port_please2")]
            ),
            0.0,
            "pod {pod}: no EPMD lookup with the module\n{text}"
        );
        assert_eq!(
            metric_sum(text, "distproxy_tls_handshake_failures_total", &[]),
            0.0,
            "pod {pod}: TLS handshake failures\n{text}"
        );
        assert!(
            metric_sum(text, "distproxy_routes_total", &[("method", "preamble")]) >= 1.0,
            "pod {pod}: a connection came in by the tunnel\n{text}"
        );
    }
    // Pod A took b6's and b7's connections, and refused evil's.
    assert!(
        metric_sum(
            &ma,
            "distproxy_connections_closed_total",
            &[("reason", "refused_by_policy")]
        ) >= 1.0,
        "pod A refused evil\n{ma}"
    );
    let refused = sidecar_a.log_lines_containing("not bound to the peer's certificate");
    assert!(
        refused.iter().any(|l| l.contains("evil@")),
        "pod A refused evil for its name: {refused:#?}"
    );
    assert!(
        refused.iter().all(|l| l.contains("evil@")),
        "pod A refused only evil: {refused:#?}"
    );
    assert_eq!(
        metric_sum(
            &mb,
            "distproxy_connections_closed_total",
            &[("reason", "refused_by_policy")]
        ),
        0.0,
        "pod B refused nothing\n{mb}"
    );
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}
