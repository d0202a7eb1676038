//! End-to-end tests of BEAM TLS passthrough: real OTP nodes started with
//! OTP's own TLS distribution (`-proto_dist inet_tls -ssl_dist_optfile F`)
//! in network-namespace pods behind distproxy. Their connections reach the
//! sidecar's distribution port as a TLS ClientHello that the sidecar cannot
//! read past; it routes them by lookup correlation and relays them without
//! decrypting, while the nodes' own certificates authenticate end to end.
//!
//! Certificates are made with rcgen (`support::beam_tls`, shared with the
//! OTP release matrix): one CA, and per pod a certificate whose SANs are
//! the pod's host name and address (OTP's client sends the host part of
//! the node name as SNI and checks the server's certificate against it),
//! used by the pod's nodes as server and client, with `verify_peer` on both
//! sides. A control test runs the same nodes with
//! stock `epmd` and no sidecar, so a failure elsewhere is distproxy's, not
//! the certificates'.
//!
//! Nodes in sidecar pods listen on 127.0.0.1 only (see `support::lab`), so
//! every connection from another pod passes through the sidecar.
//!
//! Needs root, iproute2, erlang-nox (with its `ssl` application), `ss`,
//! and a kernel with sockmap for the fast-path test; fails saying so
//! otherwise, unless `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::time::Duration;

use distproxy_testkit::certs::{Ca, SecretDir};
use support::beam::ErlangOptions;
use support::beam_tls::{
    beam_tls_count, by_address_tls, next_serial, pod_tls, start_tls_node, tls_options, BEAM_TLS,
};
use support::mesh::{assert_rpc_across_pods_answered_by_target, ping_everyone_at_once};
use support::metrics::{metric_sum, metrics};
use support::module::{compile_module, with_module};
use support::sidecar::ADMIN_PORT;
use support::wait::wait_until;
use support::{e2e_enabled, Daemon, Lab, Pod, SidecarOptions, DIST_PORT};

/// Size of the bulk transfer.
const BLOB_SIZE: usize = 4 * 1024 * 1024;

// ---------------------------------------------------------------------------
// Set-up helpers

/// `open_connections` of `node` (short name) in `pod`'s `/nodes`.
fn nodes_open_connections(pod: &Pod, short: &str) -> u64 {
    let body = pod.http_get(ADMIN_PORT, "/nodes");
    let nodes: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/nodes is not JSON ({e}): {body}"));
    let entry = nodes
        .as_array()
        .and_then(|list| list.iter().find(|n| n["name"] == short))
        .unwrap_or_else(|| panic!("{short} not in /nodes of pod {}: {body}", pod.name()));
    entry["open_connections"]
        .as_u64()
        .unwrap_or_else(|| panic!("open_connections of {short}: {entry}"))
}

/// Established TCP connections in `pod` with a peer in `peer` pod, as
/// `(local port, remote port, process)` (`ss -tnp`).
fn connections_to(pod: &Pod, peer: &Pod) -> Vec<(u16, u16, String)> {
    let filter = format!("dst {}", peer.addr());
    let out = pod.run_ok("ss", &["-Htnp", "state", "established", &filter]);
    let port = |addr: &str| -> u16 {
        let (_, port) = addr.rsplit_once(':').expect("ss address with a port");
        port.parse().expect("ss port")
    };
    out.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Recv-Q Send-Q Local Peer [Process]
            let (local, remote) = (fields.get(2)?, fields.get(3)?);
            let process = fields.get(4..).map(|p| p.join(" ")).unwrap_or_default();
            Some((port(local), port(remote), process))
        })
        .collect()
}

fn assert_blob_intact(blob: &support::BlobResult, what: &str) {
    assert_eq!(blob.size, BLOB_SIZE, "{what}");
    assert_eq!(blob.remote_size, BLOB_SIZE, "{what}: size that arrived");
    assert_eq!(
        blob.remote_md5, blob.local_md5,
        "{what}: MD5 at the receiver"
    );
}

/// Starts the pod's sidecar with `toml` as its configuration.
fn sidecar(pod: &Pod, toml: &str) -> Daemon {
    pod.spawn_sidecar_with(SidecarOptions::default().config(toml))
}

// ---------------------------------------------------------------------------
// Tests

/// Control: the certificates and option files of this suite let TLS nodes
/// of two pods with stock `epmd` (no sidecar) connect, both ways, and carry
/// a bulk transfer; and the client does check the server's certificate
/// against the host it dials (a node whose certificate names another host
/// is not reached); nodes named by address connect with theirs. A failure
/// of the tests below is therefore distproxy's.
#[test]
fn certificates_work_between_stock_epmd_pods() {
    if !e2e_enabled("certificates_work_between_stock_epmd_pods", &[]) {
        return;
    }
    let lab = Lab::new(&["p", "q"]);
    let (p, q) = (lab.pod("p"), lab.pod("q"));
    let _epmd_p = p.spawn_stock_epmd();
    let _epmd_q = q.spawn_stock_epmd();
    let ca = Ca::new("dp-e2e-beam-ca");
    let (tls_p, tls_q) = (pod_tls(&lab, &ca, p), pod_tls(&lab, &ca, q));
    let elsewhere = tls_options(&lab, &ca, "elsewhere", &["elsewhere.dp.test"]);
    let mut p1 = start_tls_node(p, "p1", &tls_p);
    let q1 = start_tls_node(q, "q1", &tls_q);
    let mut q2 = start_tls_node(q, "q2", &tls_q);
    let mut q3 = start_tls_node(q, "q3", &elsewhere);
    let [p1_name, q1_name, q3_name] = [&p1, &q1, &q3].map(|n| n.name().to_string());
    assert_eq!(p1.ping(&q1_name), "pong", "p1 -> q1");
    assert_eq!(p1.rpc_node(&q1_name), q1_name);
    assert_eq!(q2.ping(&p1_name), "pong", "q2 -> p1");
    assert_eq!(q2.rpc_node(&p1_name), p1_name);
    let blob = p1.send_blob(&q1_name, BLOB_SIZE);
    assert_blob_intact(&blob, "p1 -> q1");
    assert_eq!(
        p1.ping(&q3_name),
        "pang",
        "q3's certificate names another host"
    );
    assert!(!q3.nodes().contains(&p1_name));

    // Nodes named by address, with the certificates of `by_address_tls`.
    let by_ip = |pod: &Pod, short: &str| {
        let name = Some(format!("{short}@{}", pod.addr()));
        let options = by_address_tls(&lab, &ca, pod);
        start_tls_node(pod, short, &ErlangOptions { name, ..options })
    };
    let mut p5 = by_ip(p, "p5");
    let q5 = by_ip(q, "q5");
    let q5_name = q5.name().to_string();
    assert_eq!(p5.ping(&q5_name), "pong", "p5 -> q5, named by address");
    assert_eq!(p5.rpc_node(&q5_name), q5_name);
}

/// Pods A (a1 a2) and B (b1 b2) with default sidecars, every node of TLS
/// distribution. a1 reaches b1 and b2 (two nodes behind one port: only the
/// lookup correlation can tell them apart, and a wrong guess would answer
/// the rpc with the other name), b2 reaches a1 and a2, 4 MiB cross intact.
/// Pod B's sidecar counts the connections routed, and holds them open for
/// b1 and b2 in its gauge, `/nodes` and byte counters; pod A's sockets show
/// a1's connections going to pod B's distribution port. Then four nodes
/// ping each other at once, and a node that halts leaves nothing counted.
#[test]
fn tls_nodes_reach_the_right_node_of_another_pod() {
    if !e2e_enabled("tls_nodes_reach_the_right_node_of_another_pod", &["ss"]) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar(&[]);
    let ca = Ca::new("dp-e2e-beam-ca");
    let (tls_a, tls_b) = (pod_tls(&lab, &ca, a), pod_tls(&lab, &ca, b));
    let mut a1 = start_tls_node(a, "a1", &tls_a);
    let mut a2 = start_tls_node(a, "a2", &tls_a);
    let mut b1 = start_tls_node(b, "b1", &tls_b);
    let mut b2 = start_tls_node(b, "b2", &tls_b);
    let [a1_name, a2_name, b1_name, b2_name] = [&a1, &a2, &b1, &b2].map(|n| n.name().to_string());
    for node in [&mut a1, &mut a2, &mut b1, &mut b2] {
        assert!(node.nodes().is_empty(), "{} already connected", node.name());
    }

    assert_eq!(a1.ping(&b1_name), "pong", "a1 -> b1");
    assert_eq!(a1.rpc_node(&b1_name), b1_name, "rpc a1 -> b1");
    assert_eq!(a1.ping(&b2_name), "pong", "a1 -> b2");
    assert_eq!(a1.rpc_node(&b2_name), b2_name, "rpc a1 -> b2");
    assert_eq!(b2.ping(&a1_name), "pong", "b2 -> a1");
    assert_eq!(b2.ping(&a2_name), "pong", "b2 -> a2");
    assert_eq!(b2.rpc_node(&a2_name), a2_name, "rpc b2 -> a2");
    assert_eq!(b2.rpc_node(&a1_name), a1_name, "rpc b2 -> a1");
    let blob = a1.send_blob(&b2_name, BLOB_SIZE);
    assert_blob_intact(&blob, "a1 -> b2");

    let mb = metrics(b);
    let routed_b = metric_sum(&mb, BEAM_TLS, &[("outcome", "routed")]);
    assert!(
        routed_b >= 2.0,
        "pod B routed a1 -> b1 and a1 -> b2: {routed_b}\n{mb}"
    );
    let correlated = metric_sum(&mb, "distproxy_routes_total", &[("method", "correlated")]);
    assert!(
        correlated >= 2.0,
        "pod B chose by lookup correlation: {correlated}\n{mb}"
    );
    for short in ["b1", "b2"] {
        let open = metric_sum(
            &mb,
            "distproxy_dist_connections_open",
            &[("node", short), ("direction", "inbound")],
        );
        assert!(open >= 1.0, "pod B relays a connection to {short}\n{mb}");
        let listed = nodes_open_connections(b, short);
        assert!(listed >= 1, "/nodes of pod B: {short} has {listed} open");
    }
    // a2 was reached from b2 (or connected by `global`): routed by pod A.
    assert!(
        beam_tls_count(a, "routed") >= 1.0,
        "pod A routed b2 -> a2\n{}",
        metrics(a)
    );
    for (pod, text) in [("a", metrics(a)), ("b", mb)] {
        for outcome in ["refused", "unroutable"] {
            let n = metric_sum(&text, BEAM_TLS, &[("outcome", outcome)]);
            assert_eq!(n, 0.0, "pod {pod}: BEAM TLS connections {outcome}\n{text}");
        }
        // Except connections closed before their first byte (`empty`): a
        // node's attempt that OTP dropped between its TCP connect and its
        // ClientHello, when `global` had the two nodes connect to each
        // other at once and the other attempt won. Nothing was lost.
        let closed = metric_sum(&text, "distproxy_connections_closed_total", &[])
            - metric_sum(
                &text,
                "distproxy_connections_closed_total",
                &[("reason", "empty")],
            );
        assert_eq!(
            closed, 0.0,
            "pod {pod}: connections closed in setup\n{text}"
        );
    }
    // Every byte of the blob passed the sidecar on its way to b2.
    wait_until(Duration::from_secs(10), "b2's bytes counted", || {
        let rx = metric_sum(
            &metrics(b),
            "distproxy_relayed_bytes_total",
            &[("node", "b2"), ("direction", "rx")],
        );
        rx >= BLOB_SIZE as f64
    });

    // a1's own sockets: its connections to pod B go to the sidecar's port
    // (the nodes of pod B listen on loopback, so that is the only way in).
    let conns = connections_to(a, b);
    let to_dist_port: Vec<_> = conns.iter().filter(|c| c.1 == DIST_PORT).collect();
    assert!(
        to_dist_port.len() >= 2,
        "pod A: connections to pod B's port {DIST_PORT}: {conns:?}"
    );
    // A socket `global` is tearing down can show up with no process left
    // (OTP 25 disconnects pairs to prevent overlapping partitions), so the
    // check is on the owners that are there: nodes, never the sidecar.
    assert!(
        to_dist_port
            .iter()
            .filter(|c| c.2.contains("beam.smp"))
            .count()
            >= 2
            && !to_dist_port.iter().any(|c| c.2.contains("distproxy")),
        "pod A: the nodes themselves dial pod B's port {DIST_PORT}: {conns:?}"
    );
    assert!(
        conns.iter().all(|c| c.0 == DIST_PORT || c.1 == DIST_PORT),
        "pod A: a connection with pod B outside port {DIST_PORT}: {conns:?}"
    );

    // Two more nodes of pod A and the two of pod B ping each other all at
    // the same instant: lookups of b1 and b2 from one address at once,
    // which the sidecar must serialise, since the ClientHellos do not say
    // which node they are for.
    let mut a3 = start_tls_node(a, "a3", &tls_a);
    let mut a4 = start_tls_node(a, "a4", &tls_a);
    ping_everyone_at_once([&mut a3, &mut a4, &mut b1, &mut b2]);
    assert_rpc_across_pods_answered_by_target([&mut a3, &mut a4, &mut b1, &mut b2]);

    // b1 goes: pod B's sidecar ends its relayed connections and uncounts
    // them.
    b1.halt();
    wait_until(Duration::from_secs(10), "b1's connections closed", || {
        metric_sum(
            &metrics(b),
            "distproxy_dist_connections_open",
            &[("node", "b1")],
        ) == 0.0
    });
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}

/// `dist.beam_tls = "refuse"` on pod B's sidecar: a TLS node of pod A does
/// not reach b1, and the sidecar counts the refusal and relays nothing; b1
/// itself is fine: b2 reaches it from its own pod (through the sidecar's
/// same-pod mirror, not the distribution port).
#[test]
fn beam_tls_refused_by_configuration() {
    if !e2e_enabled("beam_tls_refused_by_configuration", &[]) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = sidecar(b, "[dist]\nbeam_tls = \"refuse\"\n");
    let ca = Ca::new("dp-e2e-beam-ca");
    let (tls_a, tls_b) = (pod_tls(&lab, &ca, a), pod_tls(&lab, &ca, b));
    let mut a1 = start_tls_node(a, "a1", &tls_a);
    let mut b1 = start_tls_node(b, "b1", &tls_b);
    let mut b2 = start_tls_node(b, "b2", &tls_b);
    let [a1_name, b1_name] = [&a1, &b1].map(|n| n.name().to_string());

    assert_eq!(a1.ping(&b1_name), "pang", "a1 -> b1 is refused");
    let mb = metrics(b);
    assert!(
        metric_sum(&mb, BEAM_TLS, &[("outcome", "refused")]) >= 1.0,
        "pod B counted the refusal\n{mb}"
    );
    assert_eq!(
        metric_sum(&mb, BEAM_TLS, &[("outcome", "routed")]),
        0.0,
        "pod B routed nothing\n{mb}"
    );
    assert_eq!(
        metric_sum(
            &mb,
            "distproxy_dist_connections_total",
            &[("direction", "inbound")]
        ),
        0.0,
        "pod B relayed nothing inbound\n{mb}"
    );
    assert!(!b1.nodes().contains(&a1_name), "b1 never saw a1");

    assert_eq!(b2.ping(&b1_name), "pong", "b2 -> b1 in pod B");
    assert_eq!(b2.rpc_node(&b1_name), b1_name, "rpc b2 -> b1");
    // b2 -> b1 went through the pod's mirror of b1's port (TLS too, but
    // not on the distribution port); nothing came in from pod A.
    let mb = metrics(b);
    let open = |direction| {
        metric_sum(
            &mb,
            "distproxy_dist_connections_open",
            &[("node", "b1"), ("direction", direction)],
        )
    };
    assert_eq!(open("inbound"), 0.0, "pod B: inbound for b1\n{mb}");
    assert_eq!(open("same_pod"), 1.0, "pod B: b2 -> b1 in the pod\n{mb}");
    sidecar_b.assert_no_misroute();
}

/// Both sidecars run the mutual-TLS tunnel (`[tls]`, plaintext from other
/// pods refused), and the TLS nodes use OTP's TLS distribution without the
/// distproxy EPMD module: their ClientHellos on the distribution port do
/// not offer the tunnel's ALPN, so the sidecar routes them to the node
/// instead of terminating them. The tunnel's certificates come from a CA
/// the nodes do not trust, so a pong also proves that nothing but the
/// nodes took part in their TLS. a5 and b5, named by address, send no SNI;
/// a6 has the distproxy EPMD module too, which leaves its TLS to the stock
/// way. Meanwhile a3 and b3 (plain distribution, a3 with the module) still
/// go through the tunnel, on the same port.
#[test]
fn beam_tls_passes_sidecars_that_run_the_tls_tunnel() {
    if !e2e_enabled("beam_tls_passes_sidecars_that_run_the_tls_tunnel", &[]) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let tunnel_ca = Ca::new("dp-e2e-tunnel-ca");
    let (mut sidecar_a, _sa) = tunnel_sidecar(&lab, a, &tunnel_ca);
    let (mut sidecar_b, _sb) = tunnel_sidecar(&lab, b, &tunnel_ca);
    let ca = Ca::new("dp-e2e-beam-ca");
    let (tls_a, tls_b) = (pod_tls(&lab, &ca, a), pod_tls(&lab, &ca, b));
    let mut a1 = start_tls_node(a, "a1", &tls_a);
    let b1 = start_tls_node(b, "b1", &tls_b);
    let mut b2 = start_tls_node(b, "b2", &tls_b);
    // Named by address, as releases often are in Kubernetes
    // (`app@$POD_IP`): an address is no host name for SNI, and without it
    // only the lookup tells this ClientHello from an older sidecar's
    // tunnel, which offers no ALPN either.
    let by_ip = |pod: &Pod, short: &str| {
        let name = Some(format!("{short}@{}", pod.addr()));
        let options = by_address_tls(&lab, &ca, pod);
        start_tls_node(pod, short, &ErlangOptions { name, ..options })
    };
    let mut a5 = by_ip(a, "a5");
    let b5 = by_ip(b, "b5");
    let module = with_module(&compile_module(&lab));
    // TLS distribution with the module as well: the module leaves such a
    // node to the stock way (the tunnel carries plain distribution only).
    let mut tls_module = tls_a.clone();
    tls_module
        .extra_args
        .extend(module.extra_args.iter().cloned());
    let mut a6 = start_tls_node(a, "a6", &tls_module);
    let mut a3 = a.spawn_erlang_with("a3", &module);
    let mut b3 = b.spawn_erlang("b3");
    a3.wait_ready();
    b3.wait_ready();
    let [a1_name, b1_name, b2_name, b3_name] = [&a1, &b1, &b2, &b3].map(|n| n.name().to_string());

    assert_eq!(a1.ping(&b1_name), "pong", "a1 -> b1");
    assert_eq!(a1.rpc_node(&b1_name), b1_name, "rpc a1 -> b1");
    assert_eq!(b2.ping(&a1_name), "pong", "b2 -> a1");
    assert_eq!(b2.rpc_node(&a1_name), a1_name, "rpc b2 -> a1");
    assert_eq!(a1.rpc_node(&b2_name), b2_name, "rpc a1 -> b2");
    let b5_name = b5.name().to_string();
    assert_eq!(a5.ping(&b5_name), "pong", "a5 -> b5, named by address");
    assert_eq!(a5.rpc_node(&b5_name), b5_name, "rpc a5 -> b5");
    assert_eq!(a6.ping(&b2_name), "pong", "a6 (inet_tls, module) -> b2");
    assert_eq!(a6.rpc_node(&b2_name), b2_name, "rpc a6 -> b2");
    assert_eq!(a3.ping(&b3_name), "pong", "a3 -> b3 through the tunnel");
    assert_eq!(a3.rpc_node(&b3_name), b3_name, "rpc a3 -> b3");

    for (pod, text) in [("a", metrics(a)), ("b", metrics(b))] {
        let routed = metric_sum(&text, BEAM_TLS, &[("outcome", "routed")]);
        assert!(routed >= 1.0, "pod {pod}: BEAM TLS routed\n{text}");
        assert_eq!(
            metric_sum(&text, "distproxy_tls_handshake_failures_total", &[]),
            0.0,
            "pod {pod}: the tunnel tried a node's TLS\n{text}"
        );
        // Except the module's probes ("does a sidecar answer there?"),
        // which connect and close without a byte: `empty`.
        let closed = metric_sum(&text, "distproxy_connections_closed_total", &[])
            - metric_sum(
                &text,
                "distproxy_connections_closed_total",
                &[("reason", "empty")],
            );
        assert_eq!(
            closed, 0.0,
            "pod {pod}: connections closed in setup\n{text}"
        );
    }
    let mb = metrics(b);
    assert!(
        metric_sum(&mb, "distproxy_routes_total", &[("method", "preamble")]) >= 1.0,
        "pod B: a3 -> b3 came through the tunnel\n{mb}"
    );
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}

/// Starts `pod`'s sidecar with the tunnel's `[tls]`: a certificate of `ca`
/// for the pod, in a Secret-like directory, plaintext from other pods
/// refused.
fn tunnel_sidecar(lab: &Lab, pod: &Pod, ca: &Ca) -> (Daemon, SecretDir) {
    let leaf = ca.leaf(
        &[pod.host(), &pod.addr().to_string()],
        0x7700 + next_serial(),
    );
    let dir = lab.dir().join(format!("tunnel-tls-{}", pod.name()));
    std::fs::create_dir_all(&dir).expect("create the tunnel's TLS directory");
    let secret = SecretDir::create(&dir, &leaf.cert_pem, &leaf.key_pem, &ca.pem);
    let toml = format!(
        "[tls]\n\
         cert_file = \"{}\"\n\
         key_file = \"{}\"\n\
         ca_file = \"{}\"\n\
         require_tls = true\n\
         verify_server_name = \"hostname\"\n",
        secret.cert_file().display(),
        secret.key_file().display(),
        secret.ca_file().display(),
    );
    (sidecar(pod, &toml), secret)
}

/// `routing.loopback_lookups = "proxy"`: nodes named `short@localhost`
/// (`-sname`) look each other up on the pod's loopback and are told the distribution
/// port, so a1 -> a2 passes through it (as `kubectl port-forward` traffic
/// does), TLS and all, and is routed by correlation from 127.0.0.1.
#[test]
fn beam_tls_between_nodes_of_one_pod_through_the_distribution_port() {
    if !e2e_enabled(
        "beam_tls_between_nodes_of_one_pod_through_the_distribution_port",
        &[],
    ) {
        return;
    }
    let lab = Lab::new(&["a"]);
    let a = lab.pod("a");
    let mut sidecar_a = sidecar(a, "[routing]\nloopback_lookups = \"proxy\"\n");
    let ca = Ca::new("dp-e2e-beam-ca");
    let local = tls_options(&lab, &ca, "localhost", &["localhost", "127.0.0.1"]);
    let named = |short: &str| ErlangOptions {
        name: Some(format!("{short}@localhost")),
        // OTP takes `localhost` for a short host name only.
        short_names: true,
        ..local.clone()
    };
    let mut a1 = start_tls_node(a, "a1", &named("a1"));
    let a2 = start_tls_node(a, "a2", &named("a2"));
    let a3 = start_tls_node(a, "a3", &named("a3"));
    let [a2_name, a3_name] = [&a2, &a3].map(|n| n.name().to_string());

    assert_eq!(a1.ping(&a2_name), "pong", "a1 -> a2");
    assert_eq!(a1.rpc_node(&a2_name), a2_name, "rpc a1 -> a2");
    assert_eq!(a1.ping(&a3_name), "pong", "a1 -> a3");
    assert_eq!(a1.rpc_node(&a3_name), a3_name, "rpc a1 -> a3");
    let text = metrics(a);
    assert!(
        metric_sum(&text, BEAM_TLS, &[("outcome", "routed")]) >= 2.0,
        "pod A routed a1 -> a2 and a1 -> a3\n{text}"
    );
    for short in ["a2", "a3"] {
        let open = metric_sum(&text, "distproxy_dist_connections_open", &[("node", short)]);
        assert!(open >= 1.0, "pod A relays a connection to {short}\n{text}");
    }
    sidecar_a.assert_no_misroute();
}

/// A TLS node that makes no EPMD lookup: c1, in a pod of its own, runs
/// without EPMD (`-erl_epmd_port 43691 -dist_listen false`: every node is
/// assumed to listen on the sidecars' port). With two nodes in pod B there
/// is nothing to tell which one c1 wants: unroutable, counted, pang. Once
/// b2 is gone, b1 is pod B's only node and gets the connection.
#[test]
fn beam_tls_without_a_lookup_goes_to_the_only_node() {
    if !e2e_enabled("beam_tls_without_a_lookup_goes_to_the_only_node", &[]) {
        return;
    }
    let lab = Lab::new(&["b", "c"]);
    let (b, c) = (lab.pod("b"), lab.pod("c"));
    let mut sidecar_b = b.spawn_sidecar(&[]);
    // Pod C's EPMD stays unused; the harness wants one per pod.
    let _epmd_c = c.spawn_stock_epmd();
    let ca = Ca::new("dp-e2e-beam-ca");
    let tls_b = pod_tls(&lab, &ca, b);
    let mut epmd_less = pod_tls(&lab, &ca, c);
    epmd_less.extra_args.extend(
        [
            "-erl_epmd_port",
            &DIST_PORT.to_string(),
            "-dist_listen",
            "false",
        ]
        .map(String::from),
    );
    let b1 = start_tls_node(b, "b1", &tls_b);
    let b2 = start_tls_node(b, "b2", &tls_b);
    let mut c1 = start_tls_node(c, "c1", &epmd_less);
    let b1_name = b1.name().to_string();

    assert_eq!(
        c1.ping(&b1_name),
        "pang",
        "c1 -> b1 with two nodes in pod B"
    );
    let mb = metrics(b);
    assert!(
        metric_sum(&mb, BEAM_TLS, &[("outcome", "unroutable")]) >= 1.0,
        "pod B: unroutable\n{mb}"
    );
    assert_eq!(
        metric_sum(&mb, BEAM_TLS, &[("outcome", "routed")]),
        0.0,
        "pod B: routed\n{mb}"
    );
    assert_eq!(
        metric_sum(
            &mb,
            "distproxy_epmd_requests_total",
            &[("type", "port_please2")]
        ),
        0.0,
        "c1 looked nothing up\n{mb}"
    );

    b2.halt();
    wait_until(Duration::from_secs(10), "b2 unregistered", || {
        metric_sum(&metrics(b), "distproxy_registered_nodes", &[]) == 1.0
    });
    assert_eq!(c1.ping(&b1_name), "pong", "c1 -> b1, pod B's only node");
    assert_eq!(c1.rpc_node(&b1_name), b1_name, "rpc c1 -> b1");
    let mb = metrics(b);
    assert!(
        metric_sum(&mb, BEAM_TLS, &[("outcome", "routed")]) >= 1.0,
        "pod B: routed\n{mb}"
    );
    sidecar_b.assert_no_misroute();
}

/// `[[acl]]` and BEAM TLS: the sidecar cannot read the initiator's name, so
/// it judges conservatively. A `deny` rule naming an initiator refuses every
/// BEAM TLS connection to its target (even though a1 is not the node it
/// names, and an `allow` for everyone follows); an `allow` naming an
/// initiator does not admit one (here `acl_default = "deny"` then refuses);
/// an `allow` for any initiator admits it.
#[test]
fn beam_tls_is_judged_conservatively_by_the_acl() {
    if !e2e_enabled("beam_tls_is_judged_conservatively_by_the_acl", &[]) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _sidecar_a = a.spawn_sidecar(&[]);
    let rules = "[dist]\nacl_default = \"deny\"\n\n\
                 [[acl]]\nname = \"not-x9-to-b1\"\naction = \"deny\"\ninitiator = \"x9\"\ntarget = \"b1\"\n\n\
                 [[acl]]\nname = \"all-to-b1\"\naction = \"allow\"\ntarget = \"b1\"\n\n\
                 [[acl]]\nname = \"a1-to-b2\"\naction = \"allow\"\ninitiator = \"a1\"\ntarget = \"b2\"\n\n\
                 [[acl]]\nname = \"all-to-b3\"\naction = \"allow\"\ntarget = \"b3\"\n";
    let mut sidecar_b = sidecar(b, rules);
    let ca = Ca::new("dp-e2e-beam-ca");
    let (tls_a, tls_b) = (pod_tls(&lab, &ca, a), pod_tls(&lab, &ca, b));
    let mut a1 = start_tls_node(a, "a1", &tls_a);
    let [b1, b2, b3] = ["b1", "b2", "b3"].map(|n| start_tls_node(b, n, &tls_b));
    let [b1_name, b2_name, b3_name] = [&b1, &b2, &b3].map(|n| n.name().to_string());

    assert_eq!(a1.ping(&b1_name), "pang", "a deny rule naming x9 -> b1");
    assert_eq!(a1.ping(&b2_name), "pang", "an allow rule naming a1 -> b2");
    let mb = metrics(b);
    let refused = metric_sum(&mb, BEAM_TLS, &[("outcome", "refused")]);
    assert!(refused >= 2.0, "pod B: refused {refused}\n{mb}");
    // Counted by the rule that decided: the deny rule for b1, the default
    // for b2 (the allow rule naming a1 was passed over).
    for rule in ["not-x9-to-b1", "default"] {
        let n = metric_sum(&mb, "distproxy_acl_denied_total", &[("rule", rule)]);
        assert!(n >= 1.0, "pod B: refused by rule {rule}\n{mb}");
    }
    assert_eq!(
        a1.ping(&b3_name),
        "pong",
        "an allow rule for everyone -> b3"
    );
    assert_eq!(a1.rpc_node(&b3_name), b3_name, "rpc a1 -> b3");
    assert!(beam_tls_count(b, "routed") >= 1.0, "{}", metrics(b));
    assert!(!a1.nodes().contains(&b1_name), "a1 is not connected to b1");
    sidecar_b.assert_no_misroute();
}

/// A dual-stack lab and nodes of `-proto_dist inet6_tls` (listening on
/// `::1`): they look each other up and connect over IPv6, and pod B's
/// sidecar routes their ClientHellos by the lookups from pod A's IPv6
/// address.
#[test]
fn inet6_tls_nodes_reach_the_right_node_of_another_pod() {
    if !e2e_enabled(
        "inet6_tls_nodes_reach_the_right_node_of_another_pod",
        &["ss"],
    ) {
        return;
    }
    let lab = Lab::new_dual_stack(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar(&[]);
    let ca = Ca::new("dp-e2e-beam-ca");
    // As `ErlangOptions::inet6` for inet6_tcp: listening on ::1 only.
    let six = |pod: &Pod| {
        let (v4, v6) = (pod.addr().to_string(), pod.addr6().to_string());
        let label = format!("pod-{}-inet6", pod.name());
        let mut options = tls_options(&lab, &ca, &label, &[pod.host(), &v4, &v6]);
        for arg in &mut options.extra_args {
            if arg == "inet_tls" {
                *arg = "inet6_tls".into();
            }
        }
        options
            .extra_args
            .extend(["-kernel", "inet_dist_use_interface", "{0,0,0,0,0,0,0,1}"].map(String::from));
        options
    };
    let (six_a, six_b) = (six(a), six(b));
    let start = |pod: &Pod, short: &str, options: &ErlangOptions| {
        let mut node = pod.spawn_erlang_with(short, options);
        node.wait_ready();
        node
    };
    let mut a1 = start(a, "a1", &six_a);
    let [b1, b2] = ["b1", "b2"].map(|n| start(b, n, &six_b));
    let [b1_name, b2_name] = [&b1, &b2].map(|n| n.name().to_string());
    let me = a1.name().to_string();
    assert_eq!(
        a1.rpc(&me, "init", "get_argument", "[proto_dist]"),
        "{ok,[[\"inet6_tls\"]]}"
    );

    for target in [&b1_name, &b2_name] {
        assert_eq!(a1.ping(target), "pong", "a1 -> {target}");
        assert_eq!(&a1.rpc_node(target), target, "rpc a1 -> {target}");
    }
    let mb = metrics(b);
    assert!(
        metric_sum(&mb, BEAM_TLS, &[("outcome", "routed")]) >= 2.0,
        "pod B routed a1 -> b1 and a1 -> b2\n{mb}"
    );
    // Over IPv6: pod B's sidecar holds them from pod A's IPv6 address.
    let filter = format!("( sport = :{DIST_PORT} )");
    let sockets = b.run_ok("ss", &["-Htn", "state", "established", &filter]);
    let from_a6 = format!("[{}]:", a.addr6());
    let n = sockets.lines().filter(|l| l.contains(&from_a6)).count();
    assert!(
        n >= 2,
        "pod B: connections from {from_a6}* on port {DIST_PORT}:\n{sockets}"
    );
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}

/// Pod B's sidecar relays through the kernel fast path
/// (`relay.fast_path = "sockmap"`). A BEAM TLS connection is handed over
/// before a byte of it is read, its ClientHello still queued on the
/// sidecar's socket: the node must get it all the same, and the bulk
/// after it.
#[test]
fn beam_tls_on_the_kernel_fast_path() {
    if !e2e_enabled("beam_tls_on_the_kernel_fast_path", &[]) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = sidecar(b, "[relay]\nfast_path = \"sockmap\"\n");
    let ca = Ca::new("dp-e2e-beam-ca");
    let (tls_a, tls_b) = (pod_tls(&lab, &ca, a), pod_tls(&lab, &ca, b));
    let mut a1 = start_tls_node(a, "a1", &tls_a);
    let [b1, b2] = ["b1", "b2"].map(|n| start_tls_node(b, n, &tls_b));
    let [b1_name, b2_name] = [&b1, &b2].map(|n| n.name().to_string());
    let text = metrics(b);
    assert_eq!(
        metric_sum(&text, "distproxy_relay_fast_path_available", &[]),
        1.0,
        "the fast path is on; the sidecar's log:\n{}",
        sidecar_b.log()
    );

    for target in [&b1_name, &b2_name] {
        assert_eq!(a1.ping(target), "pong", "a1 -> {target}");
        assert_eq!(&a1.rpc_node(target), target, "rpc a1 -> {target}");
    }
    let blob = a1.send_blob(&b2_name, BLOB_SIZE);
    assert_blob_intact(&blob, "a1 -> b2");
    let text = metrics(b);
    let on = |path| {
        metric_sum(
            &text,
            "distproxy_relay_connections_total",
            &[("path", path)],
        )
    };
    assert!(on("sockmap") >= 2.0, "relayed through the sockmap:\n{text}");
    assert_eq!(on("splice"), 0.0, "nothing spliced:\n{text}");
    assert!(
        metric_sum(&text, BEAM_TLS, &[("outcome", "routed")]) >= 2.0,
        "{text}"
    );
    sidecar_b.assert_no_misroute();
}

/// A plaintext connection that `tls.require_tls` refuses still takes the
/// lookup it was announced by: in pod B (stock `epmd`), bp (plain
/// distribution) looks a1 up and is refused; bt (TLS distribution), at the
/// same pod address, then looks a2 up and is answered at once, not held
/// behind bp's lookup until it expires (`routing.lookup_ttl_ms`).
#[test]
fn a_refused_plaintext_connection_leaves_no_lookup_behind() {
    if !e2e_enabled(
        "a_refused_plaintext_connection_leaves_no_lookup_behind",
        &[],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let (mut sidecar_a, _sa) = tunnel_sidecar(&lab, a, &Ca::new("dp-e2e-tunnel-ca"));
    let _epmd_b = b.spawn_stock_epmd();
    let ca = Ca::new("dp-e2e-beam-ca");
    let (tls_a, tls_b) = (pod_tls(&lab, &ca, a), pod_tls(&lab, &ca, b));
    let a1 = start_tls_node(a, "a1", &tls_a);
    let a2 = start_tls_node(a, "a2", &tls_a);
    let mut bt = start_tls_node(b, "bt", &tls_b);
    let mut bp = b.spawn_erlang("bp");
    bp.wait_ready();
    let [a1_name, a2_name] = [&a1, &a2].map(|n| n.name().to_string());

    assert_eq!(bp.ping(&a1_name), "pang", "plaintext from pod B is refused");
    assert_eq!(bt.ping(&a2_name), "pong", "bt -> a2 over its own TLS");
    assert_eq!(bt.rpc_node(&a2_name), a2_name, "rpc bt -> a2");
    let ma = metrics(a);
    assert!(
        metric_sum(
            &ma,
            "distproxy_connections_closed_total",
            &[("reason", "refused_by_policy")]
        ) >= 1.0,
        "pod A refused bp's plaintext\n{ma}"
    );
    assert_eq!(
        metric_sum(&ma, "distproxy_lookups_held_total", &[]),
        0.0,
        "bt's lookup waited behind the refused connection's\n{ma}"
    );
    sidecar_a.assert_no_misroute();
}
