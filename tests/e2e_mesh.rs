//! The cluster forms all at once: 3 pods × 4 nodes start together and every
//! node pings every other at the same instant (`-connect_all false`, so
//! only those pings connect), behind distproxy sidecars, with stock nodes
//! (lookup correlation; same-pod pairs through mirror listeners) and with
//! nodes using the `distproxy_epmd` module (tunnel; same-pod pairs direct).
//!
//! After one immediate retry of the pairs that answered `pang`, every pair
//! must be connected, no sidecar may have counted a misroute, and no
//! connection may leak: each sidecar's open gauge matches the sockets it
//! holds (`ss`), and both drop to zero once every node is killed.
//!
//! The same layout also joins as users' clusters do: OTP's defaults
//! (`connect_all`), every node pinging one seed, `global` connecting the
//! rest.
//!
//! A node with the module keeps taking incoming connections while the
//! sidecar is slow to answer one of its egress requests (net_kernel asks
//! the epmd module about every node it connects to).
//!
//! The timings of larger layouts, against stock epmd, are in
//! `benches/mesh.rs`.

mod support;

use std::time::Duration;

use support::mesh::{assert_full_mesh, start_mesh, MeshLayout, MeshMode, MeshReport};
use support::module::{compile_module, with_module};
use support::wait::poll_until;
use support::{Lab, SidecarOptions, DIST_PORT};

const PODS: usize = 3;
const NODES: usize = 4;

fn check(mode: MeshMode) {
    let layout = MeshLayout {
        pods: PODS,
        nodes: NODES,
        mode,
        sidecar_config: None,
        connect_all: false,
    };
    let mut mesh = start_mesh(&layout);
    let report: MeshReport = mesh.form();
    eprintln!(
        "{}: first round {} pang of {} in {:?}; retry {} pang of {}",
        mode.label(),
        report.first.failed.len(),
        report.first.pings,
        report.first.elapsed,
        report.retry.failed.len(),
        report.retry.pings
    );
    let n = PODS * NODES;
    assert_eq!(report.first.pings, n * (n - 1), "every pair pinged");
    assert!(
        report.retry.failed.is_empty(),
        "pairs still failing after one retry: {:#?} (first round: {:#?})",
        report.retry.failed,
        report.first.failed
    );
    assert_eq!(report.misroutes, 0.0, "misroutes counted by the sidecars");
    for daemon in &mut mesh.daemons {
        daemon.assert_no_misroute();
    }
    assert_full_mesh(&mut mesh.nodes);
    mesh.assert_open_matches_live();
    mesh.kill_nodes_and_assert_nothing_leaks();
}

#[test]
fn mesh_of_stock_nodes_forms_all_at_once() {
    if !support::e2e_enabled("mesh_of_stock_nodes_forms_all_at_once", &["ss"]) {
        return;
    }
    check(MeshMode::StockPeers);
}

#[test]
fn mesh_of_module_nodes_forms_all_at_once() {
    if !support::e2e_enabled("mesh_of_module_nodes_forms_all_at_once", &["ss"]) {
        return;
    }
    check(MeshMode::ModulePeers);
}

/// What users do: nodes with OTP's defaults (`connect_all`, `global`) each
/// join by pinging one seed node, all at once; `global` then connects every
/// other pair itself, from both sides and many at once across pods.
fn seeded_join(mode: MeshMode) {
    let layout = MeshLayout {
        pods: PODS,
        nodes: NODES,
        mode,
        sidecar_config: None,
        connect_all: true,
    };
    let mut mesh = start_mesh(&layout);
    let took = mesh
        .join_via_seed(std::time::Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{}: {e}", mode.label()));
    eprintln!("{}: full mesh {took:?} after the seed pings", mode.label());
    for daemon in &mut mesh.daemons {
        daemon.assert_no_misroute();
    }
    assert_full_mesh(&mut mesh.nodes);
    mesh.assert_open_matches_live();
    mesh.kill_nodes_and_assert_nothing_leaks();
}

#[test]
fn stock_nodes_joining_through_one_seed_form_the_full_mesh() {
    if !support::e2e_enabled(
        "stock_nodes_joining_through_one_seed_form_the_full_mesh",
        &["ss"],
    ) {
        return;
    }
    seeded_join(MeshMode::StockPeers);
}

#[test]
fn module_nodes_joining_through_one_seed_form_the_full_mesh() {
    if !support::e2e_enabled(
        "module_nodes_joining_through_one_seed_form_the_full_mesh",
        &["ss"],
    ) {
        return;
    }
    seeded_join(MeshMode::ModulePeers);
}

/// An address of the lab's subnet that no pod has: a SYN to it gets no
/// answer (ARP fails), so the sidecar's probe of a host there lasts until
/// its deadline.
const SILENT_ADDR: &str = "198.18.0.250";

/// OTP's net_kernel asks the epmd module about every node it is about to
/// connect to (`inet_tcp_dist:select/1`), in its own process. The module
/// answered that with the sidecar's egress request, so while the sidecar
/// was probing a remote host (up to `tunnel.probe_timeout_ms`), or only
/// busy, the whole node's distribution waited: no incoming handshake was
/// answered. In a large mesh all connecting at once, that left many nodes
/// answering nobody for seconds (1,297 of 3,540 pings of a 6 × 10 mesh
/// failed in the first round). Here a1 connects to a node of a host whose
/// probe hangs, and b1 pings a1 meanwhile: b1 must get `pong` while that
/// probe is still waiting.
#[test]
fn a_slow_egress_answer_does_not_stop_a_module_node_accepting() {
    if !support::e2e_enabled(
        "a_slow_egress_answer_does_not_stop_a_module_node_accepting",
        &["ss"],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    // A host name that resolves, in pod A, to an address nothing answers
    // on; added before the sidecar starts (it reads the hosts file then).
    let hosts = std::path::Path::new("/etc/netns")
        .join(a.ns())
        .join("hosts");
    let mut text = std::fs::read_to_string(&hosts).expect("read pod A's hosts file");
    text.push_str(&format!("{SILENT_ADDR} pod-z.dp.test\n"));
    std::fs::write(&hosts, text).expect("write pod A's hosts file");
    let _sidecar_a = a.spawn_sidecar_with(
        SidecarOptions::default()
            .config("[tunnel]\nprobe_timeout_ms = 2900\nconnect_timeout_ms = 5000\n"),
    );
    let _sidecar_b = b.spawn_sidecar(&[]);
    let ebin = compile_module(&lab);
    let mut a1 = a.spawn_erlang_with("a1", &with_module(&ebin));
    let mut b1 = b.spawn_erlang("b1");
    a1.wait_ready();
    b1.wait_ready();

    let silent = a1.send("{ping, 'z1@pod-z.dp.test'}");
    // The sidecar's probe: a connection to the tunnel port being opened
    // (a1's own fallback, to EPMD's port there, comes after it).
    let probe_dst = format!("{SILENT_ADDR}:{DIST_PORT}");
    let probing = || {
        a.run_ok("ss", &["-Htn", "state", "syn-sent", "dst", &probe_dst])
            .lines()
            .count()
            > 0
    };
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(20), probing),
        "pod A's sidecar never probed pod-z (no SYN to {SILENT_ADDR})"
    );
    assert_eq!(
        b1.ping(a1.name()),
        "pong",
        "b1 -> a1 while a1 waits for pod-z"
    );
    assert!(
        probing(),
        "b1 was answered only after the probe of pod-z ended: a1's net_kernel waited for the sidecar's egress answer"
    );
    assert_eq!(
        a1.recv(silent, Duration::from_secs(30)),
        "pang",
        "a1 -> z1 (nothing there)"
    );
    assert_eq!(a1.nodes(), vec![b1.name().to_string()]);
}
