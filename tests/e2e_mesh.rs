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
