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
//! The timings of larger layouts, against stock epmd, are in
//! `benches/mesh.rs`.

mod support;

use support::mesh::{assert_full_mesh, start_mesh, MeshLayout, MeshMode, MeshReport};

const PODS: usize = 3;
const NODES: usize = 4;

fn check(mode: MeshMode) {
    let layout = MeshLayout {
        pods: PODS,
        nodes: NODES,
        mode,
        sidecar_config: None,
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
