//! The OTP release matrix: the end-to-end paths with OTP 25 (the host's,
//! Debian 12), 27 (Debian trixie) and 29 (Debian sid), and pods of
//! different releases side by side.
//!
//! Releases other than the host's run from Debian root filesystems built by
//! `scripts/otp-rootfs.sh` under `target/otp-rootfs/` and entered with
//! `chroot` inside the pod's network namespace (see `support::otp`), with
//! the agent and the helper module compiled by that release's `erlc`.
//!
//! - [`otp25_every_path`], [`otp27_every_path`], [`otp29_every_path`]: one
//!   scenario per release, [`every_path_on`]: correlation and the module's
//!   tunnel over mutual TLS, Erlang and Elixir nodes (started with
//!   `elixir --name ... --erl ...`, and the release way through `ERL_FLAGS`
//!   and `ELIXIR_ERL_OPTIONS`), an all-at-once mesh, rpc, bulk transfer,
//!   remote NAMES, a restart; and OTP's own TLS distribution (`-proto_dist
//!   inet_tls`, certificates from `support::beam_tls`) through default
//!   sidecars, with and without the module.
//! - [`otp25_and_otp29_pods_talk_through_both_paths`]: pods of different
//!   releases; the module `distproxy install-module` writes (compiled on
//!   25) loaded by 25 and 29; TLS distribution nodes of 25 and 29.
//! - [`rolling_upgrade_from_otp25_to_otp29_while_pinging`]: pods change
//!   release one by one while the others keep talking.
//! - [`otp29_node_routes`]: the kernel fast path's node routes with OTP 29
//!   nodes.
//!
//! Needs root, iproute2, erlang-nox (with its `ssl` application), elixir
//! and the root filesystems (`scripts/otp-rootfs.sh` installs erlang-nox,
//! `ssl` included, in each); fails saying so otherwise, unless
//! `DISTPROXY_SKIP_E2E=1` (all e2e tests) or `DISTPROXY_SKIP_OTP_MATRIX=1`
//! (this file only) is set.

mod support;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use distproxy_testkit::certs::{Ca, SecretDir};
use support::beam::ErlangOptions;
use support::beam_tls::{assert_routed_tls_hop, assert_runs_inet_tls, pod_tls, BEAM_TLS};
use support::mesh::{
    assert_full_mesh, assert_rpc_across_pods_answered_by_target, others, ping_everyone_at_once,
};
use support::metrics::{metric_sum, metrics};
use support::module::{compile_module_with, install_module, with_module};
use support::wait::wait_until;
use support::{e2e_enabled, BeamNode, Daemon, Lab, Otp, Pod, SidecarOptions, DIST_PORT};

/// Skips only the tests of this file (e.g. on a machine without the root
/// filesystems and no access to deb.debian.org to build them).
const SKIP_MATRIX_VAR: &str = "DISTPROXY_SKIP_OTP_MATRIX";
/// Bulk transfer size, each path.
const BLOB_SIZE: usize = 8 * 1024 * 1024;
/// Deadline for the pings sent while a pod changes release.
const PING_WHILE_UPGRADING_TIMEOUT: Duration = Duration::from_secs(40);

/// Whether `test` runs: the e2e prerequisites (see `support::prereq`) and
/// a root filesystem for each release of `releases`. Panics saying what is
/// missing, unless an opt-out variable is set.
fn matrix_enabled(test: &str, releases: &[Otp]) -> bool {
    if std::env::var(SKIP_MATRIX_VAR).as_deref() == Ok("1") {
        let line = format!("SKIPPED e2e test {test}: {SKIP_MATRIX_VAR}=1\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
        return false;
    }
    if !e2e_enabled(test, &["elixir", "chroot", "unshare", "mount"]) {
        return false;
    }
    let missing: Vec<String> = releases.iter().filter_map(|r| r.check().err()).collect();
    assert!(
        missing.is_empty(),
        "e2e test {test} cannot run on this machine: {}; set {SKIP_MATRIX_VAR}=1 to \
         skip the OTP matrix explicitly",
        missing.join("; ")
    );
    true
}

/// Node routes (the opt-in kernel fast path) with OTP 29 nodes in the
/// routed pod: the `sock_ops` and `sk_msg` programs and the handover see
/// that release's handshake and sockets as they see OTP 25's
/// ([`support::fast_path::node_routes_carry_local_nodes_messages`]).
#[test]
fn otp29_node_routes() {
    if matrix_enabled("otp29_node_routes", &[Otp::V29]) {
        support::fast_path::node_routes_carry_local_nodes_messages(Otp::V29);
    }
}

// ---------------------------------------------------------------------------
// One release, every path

#[test]
fn otp25_every_path() {
    if matrix_enabled("otp25_every_path", &[Otp::V25]) {
        every_path_on(Otp::V25);
    }
}

#[test]
fn otp27_every_path() {
    if matrix_enabled("otp27_every_path", &[Otp::V27]) {
        every_path_on(Otp::V27);
    }
}

#[test]
fn otp29_every_path() {
    if matrix_enabled("otp29_every_path", &[Otp::V29]) {
        every_path_on(Otp::V29);
    }
}

/// Pods A and B, sidecars with mutual TLS for the tunnel (plain
/// correlation still allowed), every node of release `otp`:
///
/// - a1 a2 b1: plain `erl`, routed by correlation;
/// - am: `erl -pa DIR -epmd_module distproxy_epmd`, the module compiled by
///   this release with warnings as errors;
/// - bm: the same flags through `ERL_FLAGS`, as a release start script;
/// - ae: Elixir, `elixir --name ... --erl "..."`, plain;
/// - be: Elixir with the module through `ELIXIR_ERL_OPTIONS`.
///
/// Each node runs the release asked for. b1 → a1 is routed by correlation,
/// bm → am by preamble over TLS. Then all seven ping each other at the same
/// instant, form a full mesh and answer rpc across pods; 8 MiB cross each
/// path intact; net_adm:names lists pod A's nodes at the advertised port; a2
/// restarts with a new creation and is reached again as its new
/// incarnation.
///
/// In the same lab, pods C and D with default sidecars run nodes of OTP's
/// own TLS distribution of that release (see [`own_tls_distribution`]),
/// started with the others to share their start-up time.
fn every_path_on(otp: Otp) {
    let lab = Lab::new(&["a", "b", "c", "d"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let (c, d) = (lab.pod("c"), lab.pod("d"));
    for pod in [a, b, c, d] {
        pod.set_otp(otp);
    }
    let ebin = compile_module_with(&lab, otp);
    let ca = Ca::new("dp-otp-ca");
    let (mut sidecar_a, _secret_a) = spawn_tls_sidecar(&lab, a, &ca, 0xa1);
    let (mut sidecar_b, _secret_b) = spawn_tls_sidecar(&lab, b, &ca, 0xb1);
    let mut sidecar_c = c.spawn_sidecar(&[]);
    let mut sidecar_d = d.spawn_sidecar(&[]);
    let mut tls_nodes = spawn_own_tls_nodes(&lab, c, d, &ebin);

    let module_flags = with_module(&ebin).extra_args.join(" ");
    let release_style = |var: &str| ErlangOptions {
        env: vec![(var.to_string(), module_flags.clone())],
        ..Default::default()
    };
    let mut nodes = vec![
        a.spawn_erlang("a1"),
        a.spawn_erlang("a2"),
        a.spawn_erlang_with("am", &with_module(&ebin)),
        a.spawn_elixir("ae"),
        b.spawn_erlang("b1"),
        b.spawn_erlang_with("bm", &release_style("ERL_FLAGS")),
        b.spawn_elixir_with("be", &release_style("ELIXIR_ERL_OPTIONS")),
    ];
    for node in nodes.iter_mut().chain(&mut tls_nodes) {
        node.wait_ready();
    }
    let name = |short: &str| a.node_name(short);
    let (a1, a2, am) = (name("a1"), name("a2"), name("am"));
    let (b1, bm) = (b.node_name("b1"), b.node_name("bm"));

    for node in &mut nodes {
        node.assert_release(otp);
        let with_module = ["am", "bm", "be"].contains(&short(node.name()));
        let expected = if with_module {
            "distproxy_epmd"
        } else {
            "erl_epmd"
        };
        let me = node.name().to_string();
        assert_eq!(
            node.rpc(&me, "net_kernel", "epmd_module", "[]"),
            expected,
            "epmd module of {me}"
        );
        if me.starts_with("ae@") || me.starts_with("be@") {
            let version = node.rpc(&me, "Elixir.System", "version", "[]");
            assert!(version.contains("\"1."), "{me} runs Elixir: {version}");
            eprintln!("{otp}: {me} runs Elixir {version}");
        }
    }

    // Correlation: a plain node looks a1 up in pod A's EPMD, then connects.
    assert_eq!(node(&mut nodes, &b1).ping(&a1), "pong", "b1 -> a1");
    let ma = metrics(a);
    assert!(
        metric_sum(&ma, "distproxy_routes_total", &[("method", "correlated")]) >= 1.0,
        "b1 -> a1 routed by correlation in pod A:\n{ma}"
    );
    // The tunnel: bm asks its sidecar for an egress port, which carries the
    // connection to pod A's sidecar over TLS.
    assert_eq!(node(&mut nodes, &bm).ping(&am), "pong", "bm -> am");
    let ma = metrics(a);
    assert!(
        metric_sum(&ma, "distproxy_routes_total", &[("method", "preamble")]) >= 1.0,
        "bm -> am routed by preamble in pod A:\n{ma}"
    );
    let tunnelled = sidecar_b.log_lines_containing("egress relaying");
    assert!(
        tunnelled
            .iter()
            .any(|l| l.contains(&format!("target={am}")) && l.contains("transport=\"tls\"")),
        "pod B's sidecar relayed bm -> am over TLS: {tunnelled:#?}"
    );

    ping_everyone_at_once(&mut nodes);
    assert_full_mesh(&mut nodes);
    assert_rpc_across_pods_answered_by_target(&mut nodes);

    let blob = node(&mut nodes, &b1).send_blob(&a1, BLOB_SIZE);
    assert_blob_intact(&blob, "b1 -> a1 (correlation)");
    let blob = node(&mut nodes, &bm).send_blob(&am, BLOB_SIZE);
    assert_blob_intact(&blob, "bm -> am (TLS tunnel)");

    // Remote NAMES: pod A's EPMD lists its nodes at the advertised port.
    let listed = node(&mut nodes, &b1)
        .names(a.host())
        .expect("net_adm:names of pod A");
    let expected: BTreeSet<&str> = ["a1", "a2", "am", "ae"].into();
    assert_eq!(
        listed
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<BTreeSet<_>>(),
        expected,
        "names of pod A: {listed:?}"
    );
    assert!(
        listed.iter().all(|(_, port)| *port == DIST_PORT),
        "{listed:?}"
    );

    // Restart: a2 halts and starts again under the same name.
    let old_creation = node(&mut nodes, &a2).creation();
    let at = nodes.iter().position(|n| n.name() == a2).expect("a2");
    nodes.remove(at).halt();
    wait_until(
        Duration::from_secs(10),
        "b1 to notice that a2 is down",
        || !node(&mut nodes, &b1).nodes().contains(&a2),
    );
    let mut new_a2 = a.start_erlang("a2");
    new_a2.assert_release(otp);
    let new_creation = new_a2.creation();
    assert_ne!(
        new_creation, old_creation,
        "a restarted node gets a new creation"
    );
    let b1_node = node(&mut nodes, &b1);
    assert_eq!(b1_node.ping(&a2), "pong", "b1 -> restarted a2");
    assert_eq!(
        b1_node.remote_pid_creation(&a2),
        new_creation,
        "b1 talks to the new a2"
    );
    // OTP 25+'s `global` (prevent_overlapping_partitions) may drop the
    // restarted node's first connections while the others still settle
    // its old incarnation's disconnection (a2's log then says so); the
    // node must be reachable once that is over, as with stock epmd.
    wait_until(
        Duration::from_secs(15),
        "restarted a2 -> bm to answer pong",
        || new_a2.ping(&bm) == "pong",
    );

    for (pod, text) in [("a", metrics(a)), ("b", metrics(b))] {
        let failures = metric_sum(&text, "distproxy_tls_handshake_failures_total", &[]);
        assert_eq!(failures, 0.0, "pod {pod}: TLS handshake failures\n{text}");
    }
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();

    own_tls_distribution(otp, c, d, &mut tls_nodes);
    sidecar_c.assert_no_misroute();
    sidecar_d.assert_no_misroute();
}

/// Starts the nodes of OTP's own TLS distribution (`-proto_dist inet_tls`,
/// certificates of one CA for each pod's host name and address, checked on
/// both sides) for [`own_tls_distribution`], without waiting for them: c1
/// c2 in pod C, d1 d2 in pod D, and cm in pod C with the helper module
/// from `ebin` as well. `-connect_all false`: one connection per ping, so
/// each ping sets up the connection it checks.
fn spawn_own_tls_nodes(lab: &Lab, c: &Pod, d: &Pod, ebin: &Path) -> Vec<BeamNode> {
    let ca = Ca::new("dp-otp-beam-ca");
    let tls = |pod: &Pod| no_connect_all(pod_tls(lab, &ca, pod));
    let (tls_c, tls_d) = (tls(c), tls(d));
    let mut tls_module = tls_c.clone();
    tls_module.extra_args.extend(with_module(ebin).extra_args);
    vec![
        c.spawn_erlang_with("c1", &tls_c),
        c.spawn_erlang_with("c2", &tls_c),
        c.spawn_erlang_with("cm", &tls_module),
        d.spawn_erlang_with("d1", &tls_d),
        d.spawn_erlang_with("d2", &tls_d),
    ]
}

/// OTP's own TLS distribution of release `otp` through default sidecars,
/// with the nodes of [`spawn_own_tls_nodes`] (ready): c1 reaches d1 and d2
/// (two nodes behind one port, one initiator address: only the lookup
/// correlation tells them apart, and a wrong guess would answer the rpc
/// with the other name), d1 reaches c2 and cm, and cm, whose module leaves
/// its TLS to the stock way, reaches d2; each routed as BEAM TLS by the
/// target's sidecar. 8 MiB cross c1 → d2 intact.
fn own_tls_distribution(otp: Otp, c: &Pod, d: &Pod, nodes: &mut [BeamNode]) {
    for node in nodes.iter_mut() {
        node.assert_release(otp);
        assert_runs_inet_tls(node);
    }
    let cm = c.node_name("cm");
    assert_eq!(
        node(nodes, &cm).rpc(&cm, "net_kernel", "epmd_module", "[]"),
        "distproxy_epmd",
        "cm runs with the helper module"
    );
    let (c1, c2, d1, d2) = (
        c.node_name("c1"),
        c.node_name("c2"),
        d.node_name("d1"),
        d.node_name("d2"),
    );
    for (from, to, target_pod) in [
        (&c1, &d1, d),
        (&c1, &d2, d),
        (&d1, &c2, c),
        (&d1, &cm, c),
        (&cm, &d2, d),
    ] {
        let what = format!("{otp} TLS: {from} -> {to}");
        assert_routed_tls_hop(node(nodes, from), to, target_pod, &what);
    }
    let blob = node(nodes, &c1).send_blob(&d2, BLOB_SIZE);
    assert_blob_intact(&blob, &format!("c1 -> d2 ({otp} TLS distribution)"));

    for pod in [c, d] {
        let text = metrics(pod);
        for outcome in ["refused", "unroutable"] {
            let n = metric_sum(&text, BEAM_TLS, &[("outcome", outcome)]);
            assert_eq!(n, 0.0, "pod {}: BEAM TLS {outcome}\n{text}", pod.name());
        }
        // Nothing closed in set-up, except the module's probes of a
        // sidecar, which connect and close without a byte (`empty`).
        let closed = metric_sum(&text, "distproxy_connections_closed_total", &[])
            - metric_sum(
                &text,
                "distproxy_connections_closed_total",
                &[("reason", "empty")],
            );
        assert_eq!(closed, 0.0, "pod {}: closed in set-up\n{text}", pod.name());
    }
    // cm's connection was no tunnel: pod D saw no preamble.
    let md = metrics(d);
    assert_eq!(
        metric_sum(&md, "distproxy_routes_total", &[("method", "preamble")]),
        0.0,
        "pod D: cm -> d2 came the stock way\n{md}"
    );
}

// ---------------------------------------------------------------------------
// Releases side by side

/// Pod A runs OTP 25, pod B OTP 29 (plain sidecars). a1, b1 are plain;
/// am and bm run the `.beam` that `distproxy install-module` writes (the
/// one the binary carries, compiled on 25; loaded by 25 and by 29). Both
/// ways, each path: 25 → 29 and 29 → 25 by correlation, and through the
/// tunnel; then everyone at once, rpc, and 8 MiB each way across the
/// releases. Beside them, at (25) and bt (29) run OTP's own TLS
/// distribution: at reaches bt, they disconnect, and bt reaches at, each
/// routed as BEAM TLS by the target's sidecar, with rpc and 8 MiB.
#[test]
fn otp25_and_otp29_pods_talk_through_both_paths() {
    let test = "otp25_and_otp29_pods_talk_through_both_paths";
    if !matrix_enabled(test, &[Otp::V25, Otp::V29]) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    a.set_otp(Otp::V25);
    b.set_otp(Otp::V29);
    let ebin25 = install_module(&lab);
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar(&[]);
    // One connection per ping (no transitive connections by global), so
    // each ping below sets up the connection it checks.
    let plain = no_connect_all(ErlangOptions::default());
    let module = no_connect_all(with_module(&ebin25));
    let mut nodes = vec![
        a.spawn_erlang_with("a1", &plain),
        a.spawn_erlang_with("am", &module),
        b.spawn_erlang_with("b1", &plain),
        b.spawn_erlang_with("bm", &module),
    ];
    let beam_ca = Ca::new("dp-otp-beam-ca");
    let tls = |pod: &Pod| no_connect_all(pod_tls(&lab, &beam_ca, pod));
    let mut at = a.spawn_erlang_with("at", &tls(a));
    let mut bt = b.spawn_erlang_with("bt", &tls(b));
    for node in nodes.iter_mut().chain([&mut at, &mut bt]) {
        node.wait_ready();
    }
    let names: Vec<String> = nodes.iter().map(|n| n.name().to_string()).collect();
    for (node, otp) in nodes
        .iter_mut()
        .zip([Otp::V25, Otp::V25, Otp::V29, Otp::V29])
    {
        node.assert_release(otp);
    }
    let beam25 = format!("\"{}\"", ebin25.join("distproxy_epmd.beam").display());
    for i in [1, 3] {
        let me = names[i].clone();
        assert_eq!(
            nodes[i].rpc(&me, "net_kernel", "epmd_module", "[]"),
            "distproxy_epmd",
            "{me} runs with the helper module"
        );
        assert_eq!(
            nodes[i].rpc(&me, "code", "which", "[distproxy_epmd]"),
            beam25,
            "{me} loaded the module compiled on OTP 25"
        );
    }

    // Each path both ways, on four distinct pairs; the target's sidecar
    // shows how it routed the new connection. A plain initiator is routed
    // by correlation (whatever the target runs), a module initiator by
    // preamble.
    let (a1, am, b1, bm) = (0, 1, 2, 3);
    for (from, to, target_pod, method) in [
        (b1, a1, a, "correlated"),
        (a1, bm, b, "correlated"),
        (bm, am, a, "preamble"),
        (am, b1, b, "preamble"),
    ] {
        let before = routes(target_pod, method);
        let (from_name, to_name) = (names[from].clone(), names[to].clone());
        assert_eq!(
            nodes[from].ping(&to_name),
            "pong",
            "{from_name} -> {to_name}"
        );
        assert!(
            routes(target_pod, method) > before,
            "{from_name} -> {to_name}: routed by {method} in pod {}",
            target_pod.name()
        );
        assert_eq!(nodes[from].rpc_node(&to_name), to_name);
    }

    ping_everyone_at_once(&mut nodes);
    assert_full_mesh(&mut nodes);
    assert_rpc_across_pods_answered_by_target(&mut nodes);
    let blob = nodes[0].send_blob(&names[2], BLOB_SIZE);
    assert_blob_intact(&blob, "a1 (25) -> b1 (29)");
    let blob = nodes[3].send_blob(&names[1], BLOB_SIZE);
    assert_blob_intact(&blob, "bm (29) -> am (25)");

    // OTP's own TLS distribution across the releases, each way on a fresh
    // connection.
    for (node, otp) in [(&mut at, Otp::V25), (&mut bt, Otp::V29)] {
        node.assert_release(otp);
        assert_runs_inet_tls(node);
    }
    let (at_name, bt_name) = (at.name().to_string(), bt.name().to_string());
    assert_routed_tls_hop(&mut at, &bt_name, b, "at (25) -> bt (29), TLS");
    let blob = at.send_blob(&bt_name, BLOB_SIZE);
    assert_blob_intact(&blob, "at (25) -> bt (29), TLS distribution");
    let disconnect = format!("['{bt_name}']");
    assert_eq!(
        at.rpc(&at_name, "erlang", "disconnect_node", &disconnect),
        "true"
    );
    wait_until(Duration::from_secs(10), "bt to see at disconnect", || {
        !bt.nodes().contains(&at_name)
    });
    assert_routed_tls_hop(&mut bt, &at_name, a, "bt (29) -> at (25), TLS");
    let blob = bt.send_blob(&at_name, BLOB_SIZE);
    assert_blob_intact(&blob, "bt (29) -> at (25), TLS distribution");
    for pod in [a, b] {
        let text = metrics(pod);
        for outcome in ["refused", "unroutable"] {
            let n = metric_sum(&text, BEAM_TLS, &[("outcome", outcome)]);
            assert_eq!(n, 0.0, "pod {}: BEAM TLS {outcome}\n{text}", pod.name());
        }
    }
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}

/// Pods A, B and C each run a plain node and a module node on OTP 25. One
/// pod after the other halts its nodes and starts them on OTP 29 (27 on
/// the way for pod B); while a pod's new nodes start, the other pods' nodes
/// ping each other (all `pong`); once they run, everyone pings everyone at
/// once, across old and new releases, through both paths.
#[test]
fn rolling_upgrade_from_otp25_to_otp29_while_pinging() {
    let test = "rolling_upgrade_from_otp25_to_otp29_while_pinging";
    if !matrix_enabled(test, &Otp::ALL) {
        return;
    }
    let lab = Lab::new(&["a", "b", "c"]);
    let pods: Vec<&Pod> = ["a", "b", "c"].iter().map(|p| lab.pod(p)).collect();
    let mut sidecars: Vec<Daemon> = pods.iter().map(|p| p.spawn_sidecar(&[])).collect();
    let ebins: Vec<_> = Otp::ALL
        .iter()
        .map(|otp| (*otp, compile_module_with(&lab, *otp)))
        .collect();
    let ebin_of = |otp: Otp| ebins.iter().find(|(o, _)| *o == otp).unwrap().1.clone();

    // (pod index, node) per running node; each pod: "<pod>1" plain and
    // "<pod>m" with the module of its release.
    let start_pod = |pod: &Pod| -> Vec<BeamNode> {
        let ebin = ebin_of(pod.otp());
        vec![
            pod.spawn_erlang(&format!("{}1", pod.name())),
            pod.spawn_erlang_with(&format!("{}m", pod.name()), &with_module(&ebin)),
        ]
    };
    let mut running: Vec<Vec<BeamNode>> = pods.iter().map(|p| start_pod(p)).collect();
    for node in running.iter_mut().flatten() {
        node.wait_ready();
    }
    ping_everyone_at_once(running.iter_mut().flatten());

    for (step, new_otp) in [(0, Otp::V29), (1, Otp::V27), (1, Otp::V29), (2, Otp::V29)] {
        let pod = pods[step];
        for node in running[step].drain(..) {
            node.halt();
        }
        pod.set_otp(new_otp);
        let mut fresh = start_pod(pod);

        // While they start, the nodes of the other pods keep talking.
        let mut staying: Vec<&mut BeamNode> = running.iter_mut().flatten().collect();
        let staying_names: Vec<String> = staying.iter().map(|n| n.name().to_string()).collect();
        let now = SystemTime::now();
        let ids: Vec<u64> = staying
            .iter_mut()
            .map(|n| {
                let peers = others(&staying_names, n.name());
                n.send_ping_all(&peers, now)
            })
            .collect();
        for (node, id) in staying.iter_mut().zip(ids) {
            for (peer, result) in node.recv_pairs(id, PING_WHILE_UPGRADING_TIMEOUT) {
                assert_eq!(
                    result,
                    "pong",
                    "{} -> {peer} while pod {} moves to {new_otp}",
                    node.name(),
                    pod.name()
                );
            }
        }

        for node in &mut fresh {
            node.wait_ready();
            node.assert_release(new_otp);
        }
        running[step] = fresh;
        ping_everyone_at_once(running.iter_mut().flatten());
        assert_full_mesh(running.iter_mut().flatten());
        eprintln!(
            "rolling upgrade: pod {} now runs {new_otp}; releases {:?}",
            pod.name(),
            pods.iter().map(|p| p.otp().release()).collect::<Vec<_>>()
        );
    }
    assert_rpc_across_pods_answered_by_target(running.iter_mut().flatten());
    let total = |method: &str| pods.iter().map(|p| routes(p, method)).sum::<f64>();
    assert!(
        total("correlated") >= 1.0 && total("preamble") >= 1.0,
        "both paths used: {} by correlation, {} by preamble",
        total("correlated"),
        total("preamble")
    );
    for sidecar in &mut sidecars {
        sidecar.assert_no_misroute();
    }
}

// ---------------------------------------------------------------------------
// Helpers

/// Starts pod `pod`'s sidecar with mutual TLS for the tunnel (certificate
/// for its host name and address from `ca`); plain distribution
/// connections from other pods stay allowed, so plain nodes are routed by
/// correlation next to module nodes (and names are not bound to
/// certificates: `check-config` allows that only with `require_tls`).
fn spawn_tls_sidecar(lab: &Lab, pod: &Pod, ca: &Ca, serial: u64) -> (Daemon, SecretDir) {
    let leaf = ca.leaf(&[pod.host(), &pod.addr().to_string()], serial);
    let dir = lab.dir().join(format!("tls-{}", pod.name()));
    std::fs::create_dir_all(&dir).expect("create TLS secret directory");
    let secret = SecretDir::create(&dir, &leaf.cert_pem, &leaf.key_pem, &ca.pem);
    let toml = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n\
         require_tls = false\nverify_server_name = \"hostname\"\n",
        secret.cert_file().display(),
        secret.key_file().display(),
        secret.ca_file().display(),
    );
    let daemon = pod.spawn_sidecar_with(SidecarOptions::default().config(&toml));
    (daemon, secret)
}

/// `o` with `-connect_all false`: no transitive connections by `global`,
/// so a ping sets up exactly the connection it names.
fn no_connect_all(mut o: ErlangOptions) -> ErlangOptions {
    o.extra_args.extend(["-connect_all".into(), "false".into()]);
    o
}

/// The node called `name` among `nodes`.
fn node<'a>(nodes: &'a mut [BeamNode], name: &str) -> &'a mut BeamNode {
    nodes
        .iter_mut()
        .find(|n| n.name() == name)
        .unwrap_or_else(|| panic!("no node {name} here"))
}

/// `a1` of `a1@pod-a.dp.test`.
fn short(name: &str) -> &str {
    name.split_once('@').map_or(name, |(s, _)| s)
}

/// Connections the pod's sidecar routed by `method` (`correlated`,
/// `preamble`, ...) so far.
fn routes(pod: &Pod, method: &str) -> f64 {
    metric_sum(
        &metrics(pod),
        "distproxy_routes_total",
        &[("method", method)],
    )
}

fn assert_blob_intact(blob: &support::BlobResult, what: &str) {
    assert_eq!(blob.remote_size, blob.size, "{what}: size that arrived");
    assert_eq!(
        blob.remote_md5, blob.local_md5,
        "{what}: MD5 of what arrived"
    );
    eprintln!("{what}: {} bytes intact in {:?}", blob.size, blob.elapsed);
}
