//! Checks over a whole set of nodes: everyone pings everyone at the same
//! instant, `nodes()` then lists exactly the others, and an rpc to a node
//! of another pod is answered by that node.
//!
//! Each check takes the nodes as anything that yields `&mut BeamNode`:
//! `&mut Vec<BeamNode>`, `&mut [BeamNode]` or `[&mut a1, &mut b1]`.

use std::time::{Duration, SystemTime};

use super::BeamNode;

/// Deadline for the concurrent pings (OTP gives up a connection after 7 s).
const PING_ALL_TIMEOUT: Duration = Duration::from_secs(40);
/// Deadline for the concurrent rpc calls of one node.
const RPC_ALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How far ahead the common start instant of the pings lies: time for
/// every node to receive its request first.
const PING_START_DELAY: Duration = Duration::from_millis(800);

/// All names but `me`.
pub fn others(names: &[String], me: &str) -> Vec<String> {
    names.iter().filter(|n| *n != me).cloned().collect()
}

/// The full names of `nodes`.
fn names_of(nodes: &[&mut BeamNode]) -> Vec<String> {
    nodes.iter().map(|n| n.name().to_string()).collect()
}

/// Every node pings every other node, all starting at the same wall-clock
/// instant (each node pings its peers in parallel); panics on any `pang`.
pub fn ping_everyone_at_once<'a>(nodes: impl IntoIterator<Item = &'a mut BeamNode>) {
    let mut nodes: Vec<&mut BeamNode> = nodes.into_iter().collect();
    let names = names_of(&nodes);
    let start_at = SystemTime::now() + PING_START_DELAY;
    let ids: Vec<u64> = nodes
        .iter_mut()
        .map(|node| {
            let others = others(&names, node.name());
            node.send_ping_all(&others, start_at)
        })
        .collect();
    let mut failures = Vec::new();
    let mut answered = 0;
    for (node, id) in nodes.iter_mut().zip(ids) {
        for (target, result) in node.recv_pairs(id, PING_ALL_TIMEOUT) {
            answered += 1;
            if result != "pong" {
                failures.push(format!("{} -> {target}: {result}", node.name()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "concurrent pings failed: {failures:#?}"
    );
    assert_eq!(
        answered,
        names.len() * (names.len() - 1),
        "every pair pinged"
    );
}

/// A full mesh: the `nodes()` of each node are all the others, no more.
pub fn assert_full_mesh<'a>(nodes: impl IntoIterator<Item = &'a mut BeamNode>) {
    let mut nodes: Vec<&mut BeamNode> = nodes.into_iter().collect();
    let names = names_of(&nodes);
    for node in &mut nodes {
        let mut expected = others(&names, node.name());
        expected.sort();
        assert_eq!(node.nodes(), expected, "nodes() of {}", node.name());
    }
}

/// `rpc:call(N, erlang, node, [])` from every node to every node `N` of
/// another pod (all at once) is answered by `N` itself.
pub fn assert_rpc_across_pods_answered_by_target<'a>(
    nodes: impl IntoIterator<Item = &'a mut BeamNode>,
) {
    let mut nodes: Vec<&mut BeamNode> = nodes.into_iter().collect();
    let names = names_of(&nodes);
    let pod_of = |name: &str| name.split_once('@').map(|(_, h)| h.to_string());
    let ids: Vec<(u64, Vec<String>)> = nodes
        .iter_mut()
        .map(|node| {
            let mine = pod_of(node.name());
            let targets: Vec<String> = names
                .iter()
                .filter(|n| pod_of(n) != mine)
                .cloned()
                .collect();
            (node.send_rpc_node_all(&targets), targets)
        })
        .collect();
    for (node, (id, targets)) in nodes.iter_mut().zip(ids) {
        let results = node.recv_pairs(id, RPC_ALL_TIMEOUT);
        assert_eq!(results.len(), targets.len());
        for (target, answer) in results {
            assert_eq!(answer, target, "rpc from {} to {target}", node.name());
        }
    }
}
