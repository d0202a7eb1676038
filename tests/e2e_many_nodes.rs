//! Many real nodes in one pod behind one sidecar: more nodes than the EPMD
//! per-source connection cap, every one of which holds its registration
//! connection from loopback. They all register, `epmd -names` in the pod
//! lists them all, and a node of another pod reaches the first, the middle
//! and the last one through the sidecar.
//!
//! The node count is `DISTPROXY_E2E_MANY_NODES` (default 70); the nodes are
//! started in parallel batches of [`BATCH`] with one scheduler each.
//!
//! Needs root, iproute2 and erlang-nox; fails saying so otherwise, unless
//! `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::collections::BTreeSet;
use std::time::Instant;

use support::beam::ErlangOptions;
use support::metrics::{metric_sum, metrics};
use support::{e2e_enabled, BeamNode, SidecarOptions, DIST_PORT};

/// Number of nodes in the crowded pod, unless the environment says.
const DEFAULT_NODES: usize = 70;
/// The environment variable that overrides [`DEFAULT_NODES`].
const NODES_VAR: &str = "DISTPROXY_E2E_MANY_NODES";
/// Nodes started at once (each waited for before the next batch).
const BATCH: usize = 10;
/// Keep each VM small: one scheduler of each kind, one async thread.
/// (Not `-noinput`: the agent reads its requests from stdin, and its end
/// halts the node.)
const SMALL_VM: &[&str] = &["+S", "1:1", "+SDcpu", "1:1", "+SDio", "1", "+A", "1"];

fn node_count() -> usize {
    match std::env::var(NODES_VAR) {
        Ok(v) => {
            let n: usize = v
                .parse()
                .unwrap_or_else(|_| panic!("{NODES_VAR}={v:?} is not a number"));
            assert!(n >= 3, "{NODES_VAR} must be at least 3");
            n
        }
        Err(_) => DEFAULT_NODES,
    }
}

/// `n` nodes in pod A behind a sidecar whose EPMD per-source cap is half
/// of `n` (the default, 512, is above any count this test starts; the bug
/// this guards against, the cap applied to loopback, stopped the 65th node
/// when the default was 64): all register and are listed by `epmd -names`
/// in the pod and by `/nodes`, nothing is refused, and b1 in pod B pings
/// nodes 1, n/2 and n through pod A's sidecar.
#[test]
fn more_nodes_than_the_per_source_cap_register_in_one_pod_and_are_reached() {
    if !e2e_enabled(
        "more_nodes_than_the_per_source_cap_register_in_one_pod_and_are_reached",
        &[],
    ) {
        return;
    }
    let n = node_count();
    let cap = n / 2;
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let mut sidecar_a = a.spawn_sidecar_with(SidecarOptions::default().config(&format!(
        "[limits]\nepmd_max_connections_per_source = {cap}\n"
    )));
    let mut sidecar_b = b.spawn_sidecar(&[]);

    let small = ErlangOptions {
        extra_args: SMALL_VM.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let shorts: Vec<String> = (1..=n).map(|i| format!("n{i:03}")).collect();
    let started = Instant::now();
    let mut nodes: Vec<BeamNode> = Vec::with_capacity(n);
    for batch in shorts.chunks(BATCH) {
        let mut spawned: Vec<BeamNode> = batch
            .iter()
            .map(|s| a.spawn_erlang_with(s, &small))
            .collect();
        for node in &mut spawned {
            node.wait_ready();
        }
        nodes.extend(spawned);
    }
    eprintln!(
        "{n} nodes started and registered in pod A in {:.1?}",
        started.elapsed()
    );

    // `epmd -names` in pod A asks the sidecar (the pod's port 4369), from
    // loopback, with every registration connection open; a local asker is
    // told the nodes' own ports (`routing.loopback_lookups = "direct"`).
    let out = a.epmd_names();
    assert!(
        out.contains("up and running on port 4369"),
        "epmd -names:\n{out}"
    );
    let listed: BTreeSet<String> = out
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("name ")?;
            let (name, _port) = rest.rsplit_once(" at port ")?;
            Some(name.to_string())
        })
        .collect();
    let want: BTreeSet<String> = shorts.iter().cloned().collect();
    assert_eq!(
        listed, want,
        "epmd -names in pod A lists all {n} nodes:\n{out}"
    );
    let text = metrics(a);
    assert_eq!(
        metric_sum(&text, "distproxy_registered_nodes", &[]),
        n as f64,
        "registered nodes gauge:\n{text}"
    );
    assert_eq!(
        metric_sum(&text, "distproxy_connections_refused_total", &[]),
        0.0,
        "nothing refused:\n{text}"
    );

    let mut b1 = b.spawn_erlang("b1");
    b1.wait_ready();
    // From another pod, every node is listed at the sidecar's port.
    let remote = b1.names(a.host()).expect("net_adm:names of pod A");
    let remote_names: BTreeSet<String> = remote.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(remote_names, want, "net_adm:names of pod A from b1");
    assert!(
        remote.iter().all(|(_, port)| *port == DIST_PORT),
        "every node of pod A at the sidecar's port: {remote:?}"
    );
    for i in [1, n / 2, n] {
        let target = a.node_name(&shorts[i - 1]);
        assert_eq!(b1.ping(&target), "pong", "b1 -> node {i} ({target})");
        assert_eq!(b1.rpc_node(&target), target, "rpc b1 -> node {i}");
        let open = metric_sum(
            &metrics(a),
            "distproxy_dist_connections_open",
            &[("node", &shorts[i - 1]), ("direction", "inbound")],
        );
        assert_eq!(open, 1.0, "pod A's sidecar relays b1 -> node {i}");
    }
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_running();
    eprintln!("whole test body in {:.1?}", started.elapsed());
}
