//! End-to-end tests of the distproxy core with real OTP nodes.
//!
//! Pods are network namespaces on a private bridge (see `support::lab`).
//! Nodes in sidecar pods listen on 127.0.0.1 only, so every byte between
//! pods passes through a sidecar: a test that passes proves the sidecar
//! carried it. The harness itself is proven by the stock-epmd test at the end,
//! which needs no sidecar.
//!
//! Needs root, iproute2, erlang-nox and elixir; fails saying so otherwise,
//! unless `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::mesh::{
    assert_full_mesh, assert_rpc_across_pods_answered_by_target, ping_everyone_at_once,
};
use support::sidecar::ADMIN_PORT;
use support::wait::wait_until;
use support::{e2e_enabled, BeamNode, Daemon, Pod, DIST_PORT, EPMD_PORT};

/// Size of the bulk transfers.
const BLOB_SIZE: usize = 32 * 1024 * 1024;

/// Pod A: sidecar with a1 a2 a3. Pod B: sidecar with b1 b2. Pod S: stock epmd
/// with s1. Every node pings every other node at the same instant; rpc across
/// pods answers from the right node; 32 MiB cross pods intact both through a
/// sidecar from a stock pod and between two sidecar pods.
#[test]
fn every_node_reaches_every_other_node_through_the_sidecars() {
    if !e2e_enabled(
        "every_node_reaches_every_other_node_through_the_sidecars",
        &[],
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b", "s"]);
    let (a, b, s) = (lab.pod("a"), lab.pod("b"), lab.pod("s"));
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar(&[]);
    let _epmd_s = s.spawn_stock_epmd();

    let mut nodes = vec![
        a.spawn_erlang("a1"),
        a.spawn_erlang("a2"),
        a.spawn_erlang("a3"),
        b.spawn_erlang("b1"),
        b.spawn_erlang("b2"),
        s.spawn_erlang("s1"),
    ];
    for node in &mut nodes {
        node.wait_ready();
    }
    let names: Vec<String> = nodes.iter().map(|n| n.name().to_string()).collect();

    // Nothing but the sidecar is reachable from outside a sidecar pod.
    assert_only_the_sidecar_listens_beyond_loopback(a, &sidecar_a, 3);
    assert_only_the_sidecar_listens_beyond_loopback(b, &sidecar_b, 2);

    // No connection exists yet: every ping below sets one up (or finds the
    // one its peer is setting up at the same moment).
    for node in &mut nodes {
        let connected = node.nodes();
        assert!(
            connected.is_empty(),
            "{} already connected to {connected:?}",
            node.name()
        );
    }

    // Everyone pings everyone, all starting at the same instant.
    ping_everyone_at_once(&mut nodes);

    // A full mesh: each node is connected to all five others.
    assert_full_mesh(&mut nodes);

    // rpc:call(N, erlang, node, []) across pods is answered by N itself.
    assert_rpc_across_pods_answered_by_target(&mut nodes);

    // 32 MiB between two sidecar pods, and from the stock pod into one.
    let (a3, b2) = (names[2].clone(), names[4].clone());
    let blob = nodes[0].send_blob(&b2, BLOB_SIZE);
    assert_blob_intact(&blob, "a1", "b2");
    let blob = nodes[5].send_blob(&a3, BLOB_SIZE);
    assert_blob_intact(&blob, "s1", "a3");

    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}

/// A node that halts and starts again under the same name registers anew
/// (the old registration died with its connection), gets a new creation, and
/// is reached again from another pod, as its new incarnation.
#[test]
fn a_restarted_node_is_reachable_again_with_a_new_creation() {
    if !e2e_enabled(
        "a_restarted_node_is_reachable_again_with_a_new_creation",
        &[],
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let _sidecar_b = b.spawn_sidecar(&[]);
    let mut a1 = a.spawn_erlang("a1");
    let mut a2 = a.spawn_erlang("a2");
    let mut b1 = b.spawn_erlang("b1");
    for node in [&mut a1, &mut a2, &mut b1] {
        node.wait_ready();
    }
    let a2_name = a.node_name("a2");

    assert_eq!(b1.ping(&a2_name), "pong", "b1 -> a2 before the restart");
    let old_creation = a2.creation();
    assert_eq!(
        b1.remote_pid_creation(&a2_name),
        old_creation,
        "b1 talks to the first a2"
    );

    a2.halt();
    // The sidecar passes the close on: b1 sees a2 go down.
    wait_until(
        Duration::from_secs(10),
        "b1 to notice that a2 is down",
        || !b1.nodes().contains(&a2_name),
    );
    // And pod A's EPMD forgot the registration (the ALIVE2 connection's
    // close may be handled a moment after the distribution connection's).
    let only_a1 = vec![("a1".to_string(), DIST_PORT)];
    wait_until(Duration::from_secs(5), "pod A to list only a1", || {
        b1.names(a.host()).as_ref() == Ok(&only_a1)
    });

    let mut a2 = a.start_erlang("a2");
    let new_creation = a2.creation();
    assert_ne!(
        new_creation, old_creation,
        "a restarted node gets a new creation"
    );
    // Pod A's EPMD reports the creation it gave the new registration.
    let registry = a.http_get(ADMIN_PORT, "/nodes");
    assert_eq!(
        registered_creation(&registry, "a2"),
        Some(new_creation),
        "creation of a2 in pod A's registry (/nodes):\n{registry}"
    );

    assert_eq!(b1.ping(&a2_name), "pong", "b1 -> restarted a2");
    assert_eq!(b1.rpc_node(&a2_name), a2_name);
    assert_eq!(
        b1.remote_pid_creation(&a2_name),
        new_creation,
        "b1 talks to the new a2, with the creation pod A's EPMD gave it"
    );
    // The other node of pod A is unaffected and still reachable.
    assert_eq!(b1.ping(&a.node_name("a1")), "pong");
    assert_eq!(a2.ping(b1.name()), "pong", "restarted a2 -> b1");
    sidecar_a.assert_running();
}

/// An Elixir node behind the sidecar, next to an Erlang node, is reachable
/// from an Erlang node in another pod, and reaches it back.
#[test]
fn an_elixir_node_behind_the_sidecar_is_reachable_from_another_pod() {
    if !e2e_enabled(
        "an_elixir_node_behind_the_sidecar_is_reachable_from_another_pod",
        &["elixir"],
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let _sidecar_b = b.spawn_sidecar(&[]);
    let mut e1 = a.spawn_elixir("e1");
    let mut a1 = a.spawn_erlang("a1");
    let mut b1 = b.spawn_erlang("b1");
    for node in [&mut e1, &mut a1, &mut b1] {
        node.wait_ready();
    }
    let e1_name = a.node_name("e1");
    assert_eq!(e1.name(), e1_name);
    // The --erl flags took effect: e1 listens on loopback only.
    assert_only_the_sidecar_listens_beyond_loopback(a, &sidecar_a, 2);

    assert_eq!(b1.ping(&e1_name), "pong", "b1 -> e1");
    assert_eq!(b1.rpc_node(&e1_name), e1_name, "rpc b1 -> e1");
    let version = b1.rpc(&e1_name, "Elixir.System", "version", "[]");
    assert!(
        version.starts_with("<<\"1.") || version.starts_with("\"1."),
        "e1 runs Elixir: System.version() = {version}"
    );
    assert_eq!(e1.ping(b1.name()), "pong", "e1 -> b1");
    // The Erlang node next to it is still told apart.
    assert_eq!(b1.rpc_node(a1.name()), a1.name(), "rpc b1 -> a1");
    sidecar_a.assert_running();
}

/// Remote NAMES lists every node of a sidecar pod at the advertised port:
/// through `net_adm:names/1`, `distproxy names` from another pod, and `epmd
/// -names` inside the pod.
#[test]
fn names_of_a_sidecar_pod_list_all_its_nodes() {
    if !e2e_enabled("names_of_a_sidecar_pod_list_all_its_nodes", &[]) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _sidecar_a = a.spawn_sidecar(&[]);
    let _sidecar_b = b.spawn_sidecar(&[]);
    let mut pod_a_nodes: Vec<BeamNode> = ["a1", "a2", "a3"]
        .iter()
        .map(|n| a.spawn_erlang(n))
        .collect();
    let mut b1 = b.spawn_erlang("b1");
    for node in pod_a_nodes.iter_mut().chain([&mut b1]) {
        node.wait_ready();
    }
    let expected: BTreeSet<String> = ["a1", "a2", "a3"].iter().map(|s| s.to_string()).collect();

    let listed = b1.names(a.host()).expect("net_adm:names of pod A");
    let listed_names: BTreeSet<String> = listed.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(listed_names, expected, "net_adm:names from b1: {listed:?}");
    for (name, port) in &listed {
        assert_eq!(*port, DIST_PORT, "{name} is listed at the advertised port");
    }

    let pod_a_addr = a.addr().to_string();
    let out = b.run_ok(&support::distproxy_bin(), &["names", "--host", &pod_a_addr]);
    let listed = parse_epmd_names(&out);
    let listed_names: BTreeSet<String> = listed.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        listed_names, expected,
        "`distproxy names` from pod B:\n{out}"
    );
    for (name, port) in &listed {
        assert_eq!(
            *port, DIST_PORT,
            "`distproxy names` lists {name} at the advertised port"
        );
    }

    let out = a.epmd_names();
    assert!(
        out.contains("up and running on port 4369"),
        "epmd -names:\n{out}"
    );
    let listed_names: BTreeSet<String> =
        parse_epmd_names(&out).into_iter().map(|(n, _)| n).collect();
    assert_eq!(listed_names, expected, "`epmd -names` in pod A:\n{out}");
}

/// The harness on its own, without distproxy: two pods with stock epmd, nodes
/// listening on their pod address, one of them Elixir. Everything the sidecar
/// tests rely on (namespaces, hosts files, agent, Erlang and Elixir nodes,
/// concurrency, bulk transfer, names, restart) must work here, so a failure
/// above is the sidecar's.
#[test]
fn harness_works_with_stock_epmd_pods() {
    if !e2e_enabled("harness_works_with_stock_epmd_pods", &["elixir"]) {
        return;
    }
    let lab = support::Lab::new(&["p", "q"]);
    let (p, q) = (lab.pod("p"), lab.pod("q"));
    let _epmd_p = p.spawn_stock_epmd();
    let _epmd_q = q.spawn_stock_epmd();
    let mut p1 = p.spawn_erlang("p1");
    let mut p2 = p.spawn_erlang("p2");
    let mut q1 = q.spawn_erlang("q1");
    let mut qe = q.spawn_elixir("qe");
    for node in [&mut p1, &mut p2, &mut q1, &mut qe] {
        node.wait_ready();
    }
    // Each pod has its own sockets, and its hosts file resolves the other
    // pod's name to that pod's address.
    let listeners = p.listening_tcp();
    assert!(
        listeners.iter().any(|l| l.addr.port() == EPMD_PORT),
        "epmd listens in pod p: {listeners:?}"
    );
    let hosts = p.run_ok("getent", &["hosts", q.host()]);
    assert!(hosts.starts_with(&q.addr().to_string()), "getent: {hosts}");

    ping_everyone_at_once([&mut p1, &mut p2, &mut q1, &mut qe]);
    assert_eq!(q1.rpc_node(p2.name()), p2.name());
    assert_eq!(p1.rpc_node(qe.name()), qe.name());
    let blob = p1.send_blob(q1.name(), BLOB_SIZE);
    assert_blob_intact(&blob, "p1", "q1");

    let listed = q1.names(p.host()).expect("names of pod p");
    let listed: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(listed, ["p1", "p2"]);
    let local: BTreeSet<String> = parse_epmd_names(&p.epmd_names())
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(local, ["p1", "p2"].iter().map(|s| s.to_string()).collect());

    let p2_name = p2.name().to_string();
    let old_creation = p2.creation();
    p2.halt();
    wait_until(
        Duration::from_secs(10),
        "q1 to notice that p2 is down",
        || !q1.nodes().contains(&p2_name),
    );
    let mut p2 = p.start_erlang("p2");
    assert_ne!(p2.creation(), old_creation);
    assert_eq!(q1.ping(&p2_name), "pong");
    assert_eq!(q1.remote_pid_creation(&p2_name), p2.creation());
}

fn assert_blob_intact(blob: &support::BlobResult, from: &str, to: &str) {
    assert_eq!(blob.size, BLOB_SIZE);
    assert_eq!(
        blob.remote_size, BLOB_SIZE,
        "{from} -> {to}: size that arrived"
    );
    assert_eq!(
        blob.remote_md5, blob.local_md5,
        "{from} -> {to}: MD5 of the 32 MiB that arrived"
    );
    eprintln!("{from} -> {to}: 32 MiB intact in {:?}", blob.elapsed);
}

/// In a sidecar pod, every socket listening beyond loopback is the
/// sidecar's (EPMD, distribution, admin), and the nodes listen on loopback.
fn assert_only_the_sidecar_listens_beyond_loopback(pod: &Pod, sidecar: &Daemon, nodes: usize) {
    let listeners = pod.listening_tcp();
    let owned = sidecar.socket_inodes();
    let foreign: Vec<_> = listeners
        .iter()
        .filter(|l| !l.addr.ip().is_loopback() && !owned.contains(&l.inode))
        .collect();
    assert!(
        foreign.is_empty(),
        "pod {}: sockets listening beyond loopback that are not the sidecar's: \
         {foreign:?} (all: {listeners:?})",
        pod.name()
    );
    for port in [EPMD_PORT, DIST_PORT] {
        assert!(
            listeners
                .iter()
                .any(|l| l.addr.port() == port && owned.contains(&l.inode)),
            "pod {}: the sidecar listens on {port}: {listeners:?}",
            pod.name()
        );
    }
    let on_loopback = listeners
        .iter()
        .filter(|l| l.addr.ip().is_loopback() && !owned.contains(&l.inode))
        .count();
    assert!(
        on_loopback >= nodes,
        "pod {}: {nodes} nodes listen on loopback: {listeners:?}",
        pod.name()
    );
}

/// The `creation` of node `name` in the sidecar's `/nodes` JSON (an array of
/// flat objects with `"name"` and `"creation"` fields).
fn registered_creation(json: &str, name: &str) -> Option<u32> {
    let field = |object: &str, key: &str| -> Option<String> {
        let at = object.find(&format!("\"{key}\""))?;
        let value = object[at + key.len() + 2..]
            .trim_start()
            .strip_prefix(':')?;
        let value = value.trim_start();
        let end = value.find([',', '\n', '}']).unwrap_or(value.len());
        Some(value[..end].trim().trim_matches('"').to_string())
    };
    json.split('}')
        .find(|object| field(object, "name").as_deref() == Some(name))
        .and_then(|object| field(object, "creation")?.parse().ok())
}

/// Parses `epmd -names` output: `name <Name> at port <Port>` lines.
fn parse_epmd_names(out: &str) -> Vec<(String, u16)> {
    out.lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("name ")?;
            let (name, port) = rest.rsplit_once(" at port ")?;
            Some((name.to_string(), port.trim().parse().ok()?))
        })
        .collect()
}
