//! Fault injection with real OTP nodes: lossy links, a partition that heals,
//! a pod that vanishes without a FIN, a node killed mid-transfer, a node
//! stopped (SIGSTOP) while others keep trying to reach it, and the sidecar
//! killed under load.
//!
//! After each fault has healed, [`assert_settled`] checks the same
//! invariants on every sidecar:
//!
//! - no leaked connections: the open-connections gauge equals the relayed
//!   connections `ss` shows the sidecar holding (one accepted peer leg and
//!   one node leg each, every peer leg established, no orphaned socket on the
//!   distribution port), and over all pods it equals the number of cross-pod
//!   node pairs that are connected;
//! - the registry (`/nodes`) lists exactly the pod's live nodes, each with
//!   its registration connection open;
//! - 0 misroutes (metric and log).
//!
//! The mesh re-forms (every node pings every other, `nodes()` is the full
//! set), an rpc to a node of another pod is answered by that node, and bulk
//! transfers arrive with the MD5 the sender computed: no data crossed a
//! wrong link.
//!
//! Faults are injected inside a pod's namespace (see `support::faults`):
//! `tc netem` where the kernel has it, otherwise `iptables -m statistic` loss
//! and a `tbf` queue; `iptables` DROP rules for partitions.
//!
//! Needs root, iproute2, iptables and erlang-nox; fails saying so otherwise,
//! unless `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::beam::{atom, ErlangOptions};
use support::faults::{self, sidecar_sockets};
use support::mesh::{
    assert_full_mesh, assert_rpc_across_pods_answered_by_target, ping_everyone_at_once,
};
use support::metrics::{metric_sum, metrics};
use support::sidecar::ADMIN_PORT;
use support::wait::{poll_until, wait_until};
use support::{e2e_enabled, BeamNode, Daemon, Pod, SidecarOptions};

/// Tools beyond the e2e basics.
const TOOLS: &[&str] = &["iptables", "tc", "ss"];
/// Sidecar configuration of every pod in this suite.
const SIDECAR_CONFIG: &str = "[epmd]\nprobe_interval_ms = 500\n";
/// The vanished-pod test's sidecars: keepalive and TCP_USER_TIMEOUT short
/// enough that a dead peer is noticed within [`DEAD_PEER_DEADLINE`] whether
/// the leg is idle (2 s + 3 × 1 s of probes) or carries a node's tick
/// (unacknowledged for 6 s). With the defaults (10 s + 3 × 5 s, 30 s) the
/// same happens in 25 to about 50 s: a tick sent just before the keepalive
/// verdict restarts the clock with the user timeout.
const DEAD_PEER_CONFIG: &str = "[epmd]\nprobe_interval_ms = 500\n\
    [tcp]\nkeepalive_idle_ms = 2000\nkeepalive_interval_ms = 1000\nkeepalive_count = 3\n\
    user_timeout_ms = 6000\n";
/// How long the sidecars get to settle after a fault healed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(40);
/// Bound on noticing a vanished peer with [`DEAD_PEER_CONFIG`] (keepalive
/// and TCP_USER_TIMEOUT on the sidecar's legs), well below the nodes' own
/// 60 s tick timeout.
const DEAD_PEER_DEADLINE: Duration = Duration::from_secs(30);
/// `net_ticktime` of the nodes that must notice a partition quickly.
const FAST_TICK_SECS: &str = "4";
/// Size of the checksummed transfers.
const BLOB: usize = 4 * 1024 * 1024;
/// Size of a transfer that a fault interrupts.
const BIG_BLOB: usize = 24 * 1024 * 1024;
/// Rate limit that keeps [`BIG_BLOB`] in flight for a few seconds.
const THROTTLE_MBIT: u32 = 40;

const OPEN: &str = "distproxy_dist_connections_open";
const RELAYED: &str = "distproxy_relayed_bytes_total";
const MISROUTES: &str = "distproxy_misroutes_total";

fn sidecar(pod: &Pod, config: &str) -> Daemon {
    pod.spawn_sidecar_with(SidecarOptions::default().config(config))
}

fn fast_tick() -> ErlangOptions {
    ErlangOptions {
        extra_args: ["-kernel", "net_ticktime", FAST_TICK_SECS]
            .map(str::to_string)
            .to_vec(),
        ..Default::default()
    }
}

/// Starts `shorts` in `pod` (with `options`) and waits until all are ready.
fn start_nodes(pod: &Pod, shorts: &[&str], options: &ErlangOptions) -> Vec<BeamNode> {
    let mut nodes: Vec<BeamNode> = shorts
        .iter()
        .map(|s| pod.spawn_erlang_with(s, options))
        .collect();
    for node in &mut nodes {
        node.wait_ready();
    }
    nodes
}

fn names(nodes: &[BeamNode]) -> Vec<String> {
    nodes.iter().map(|n| n.name().to_string()).collect()
}

fn host_of(name: &str) -> &str {
    name.split_once('@').map_or("", |(_, h)| h)
}

/// The distribution connections `nodes` have (each pair once, from both
/// ends' `nodes()`), and what is wrong with them: a node connected to a node
/// that is not live, or a connection only one end knows of. Every one of
/// them passes through exactly one sidecar, the target pod's: nodes dial
/// the pod address, within their own pod too.
fn connections(nodes: &mut [&mut BeamNode]) -> (BTreeSet<(String, String)>, Vec<String>) {
    let live: BTreeSet<String> = nodes.iter().map(|n| n.name().to_string()).collect();
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut problems = Vec::new();
    for node in nodes.iter_mut() {
        let me = node.name().to_string();
        for other in node.nodes() {
            if !live.contains(&other) {
                problems.push(format!("{me} is still connected to {other}"));
            }
            seen.push((me.clone(), other));
        }
    }
    let mut pairs = BTreeSet::new();
    for (x, y) in &seen {
        if live.contains(y) && !seen.contains(&(y.clone(), x.clone())) {
            problems.push(format!("{x} lists {y}, not the other way round"));
        }
        let pair = if x < y {
            (x.clone(), y.clone())
        } else {
            (y.clone(), x.clone())
        };
        pairs.insert(pair);
    }
    (pairs, problems)
}

/// The mesh re-forms and carries the right data: everyone pings everyone,
/// `nodes()` is complete, rpc across pods is answered by the target, and a
/// checksummed transfer between each pair of consecutive pods arrives intact.
fn assert_mesh_reformed(nodes: &mut [BeamNode]) {
    ping_everyone_at_once(nodes.iter_mut());
    assert_full_mesh(nodes.iter_mut());
    assert_rpc_across_pods_answered_by_target(nodes.iter_mut());
    let all = names(nodes);
    for i in 0..nodes.len() {
        let target = all
            .iter()
            .skip(i + 1)
            .find(|n| host_of(n) != host_of(&all[i]))
            .cloned();
        if let Some(target) = target {
            let result = blob(&mut nodes[i], &target, BLOB);
            assert_intact(&result, &all[i], &target);
        }
    }
}

/// Starts sending a random binary of `size` bytes from `from` to a new
/// process on `to`, which checksums it there.
fn start_blob(from: &mut BeamNode, to: &str, size: usize) -> u64 {
    from.send(&format!("{{send_blob, {}, {size}}}", atom(to)))
}

/// Outcome of a transfer: `(size, sender md5, receiver md5, received size)`
/// or the error the agent reported.
type Transfer = Result<(usize, String, String, usize), String>;

fn finish_blob(from: &mut BeamNode, id: u64) -> Transfer {
    let text = from.recv(id, support::beam::BLOB_TIMEOUT);
    let fields: Vec<&str> = text.split_whitespace().collect();
    match fields[..] {
        [size, local, remote, remote_size, _elapsed] if fields[0] != "error" => Ok((
            size.parse().map_err(|_| text.clone())?,
            local.to_string(),
            remote.to_string(),
            remote_size.parse().map_err(|_| text.clone())?,
        )),
        _ => Err(text),
    }
}

fn blob(from: &mut BeamNode, to: &str, size: usize) -> Transfer {
    let id = start_blob(from, to, size);
    finish_blob(from, id)
}

fn assert_intact(result: &Transfer, from: &str, to: &str) {
    match result {
        Ok((size, local, remote, remote_size)) => {
            assert_eq!(remote_size, size, "{from} -> {to}: size at the receiver");
            assert_eq!(remote, local, "{from} -> {to}: MD5 at the receiver");
        }
        Err(e) => panic!("{from} -> {to}: transfer failed: {e}"),
    }
}

/// Names registered with the pod's sidecar (`/nodes`), sorted.
fn registered(pod: &Pod) -> BTreeSet<String> {
    let body = pod.http_get(ADMIN_PORT, "/nodes");
    let nodes: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/nodes is not JSON ({e}): {body}"));
    nodes
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|n| n["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What is wrong with one sidecar now, against the live nodes (`None`: all
/// invariants hold). Returns its open-connections gauge as well.
fn sidecar_problems(pod: &Pod, daemon: &Daemon, live: &[String]) -> (usize, Vec<String>) {
    let mut problems = Vec::new();
    let text = metrics(pod);
    let open = metric_sum(&text, OPEN, &[]);
    let sockets = sidecar_sockets(pod, daemon.pid());
    let open_n = open.max(0.0) as usize;
    if open != open_n as f64 {
        problems.push(format!("gauge {OPEN} = {open}"));
    }
    if sockets.accepted_legs() != open_n || sockets.node_legs.len() != open_n {
        problems.push(format!(
            "gauge says {open_n} open, ss shows {} peer legs, {} mirror legs and {} node legs: \
             {:?} {:?} {:?}",
            sockets.peer_legs.len(),
            sockets.mirror_legs.len(),
            sockets.node_legs.len(),
            sockets.peer_legs,
            sockets.mirror_legs,
            sockets.node_legs
        ));
    }
    if sockets.peer_legs_not_established() > 0 {
        problems.push(format!(
            "peer legs not established: {:?}",
            sockets.peer_legs
        ));
    }
    if !sockets.orphans.is_empty() {
        problems.push(format!("orphaned sockets: {:?}", sockets.orphans));
    }
    let expected: BTreeSet<String> = live
        .iter()
        .filter(|n| host_of(n) == pod.host())
        .map(|n| n.split_once('@').map_or(n.as_str(), |(s, _)| s).to_string())
        .collect();
    let listed = registered(pod);
    if listed != expected {
        problems.push(format!(
            "registry lists {listed:?}, live nodes are {expected:?}"
        ));
    }
    if sockets.epmd.len() != expected.len() {
        problems.push(format!(
            "{} EPMD connections for {} live nodes: {:?}",
            sockets.epmd.len(),
            expected.len(),
            sockets.epmd
        ));
    }
    let misroutes = metric_sum(&text, MISROUTES, &[]);
    if misroutes != 0.0 {
        problems.push(format!("{MISROUTES} = {misroutes}"));
    }
    (open_n, problems)
}

/// Waits until every sidecar satisfies the invariants of the module docs
/// and together they relay exactly the connections the live `nodes` have;
/// panics with what is still wrong after [`SETTLE_TIMEOUT`]. Returns the
/// number of connections.
fn assert_settled(
    sidecars: &mut [(&Pod, &mut Daemon)],
    nodes: &mut [&mut BeamNode],
    what: &str,
) -> usize {
    let live: Vec<String> = nodes.iter().map(|n| n.name().to_string()).collect();
    let mut last = Vec::new();
    let mut links = 0;
    let settled = poll_until(SETTLE_TIMEOUT, Duration::from_millis(300), || {
        let (pairs, mut problems) = connections(nodes);
        links = pairs.len();
        let mut total = 0;
        for (pod, daemon) in sidecars.iter() {
            let (open, mine) = sidecar_problems(pod, daemon, &live);
            total += open;
            problems.extend(mine.into_iter().map(|p| format!("pod {}: {p}", pod.name())));
        }
        if total != links {
            problems.push(format!(
                "the sidecars relay {total} connections, the nodes have {links}: {pairs:?}"
            ));
        }
        last = problems;
        last.is_empty()
    });
    assert!(
        settled,
        "{what}: not settled within {SETTLE_TIMEOUT:?}:\n{}",
        last.join("\n")
    );
    for (_, daemon) in sidecars.iter_mut() {
        daemon.assert_no_misroute();
    }
    links
}

/// `&mut` to each node of `nodes`.
fn all(nodes: &mut [BeamNode]) -> Vec<&mut BeamNode> {
    nodes.iter_mut().collect()
}

/// Sum of the bytes all `pods`' sidecars relayed so far.
fn relayed_bytes(pods: &[&Pod]) -> f64 {
    pods.iter()
        .map(|p| metric_sum(&metrics(p), RELAYED, &[]))
        .sum()
}

/// Waits until the sidecars of `pods` relayed `bytes` more than `since`:
/// the transfer is under way.
fn wait_relayed(pods: &[&Pod], since: f64, bytes: f64) {
    wait_until(Duration::from_secs(30), "a transfer under way", || {
        relayed_bytes(pods) >= since + bytes
    });
}

/// 3 % of packets lost both ways on pod B's link, and delayed: every node
/// still reaches every other, transfers arrive intact; once the link is
/// clean again the sidecars hold exactly the live connections.
#[test]
fn lossy_delayed_links_carry_intact_data_and_leak_nothing() {
    if !e2e_enabled(
        "lossy_delayed_links_carry_intact_data_and_leak_nothing",
        TOOLS,
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let mut sidecar_a = sidecar(a, SIDECAR_CONFIG);
    let mut sidecar_b = sidecar(b, SIDECAR_CONFIG);
    let options = ErlangOptions::default();
    let mut nodes = start_nodes(a, &["a1", "a2"], &options);
    nodes.extend(start_nodes(b, &["b1", "b2"], &options));

    let how = faults::impair(b, 3, 40);
    eprintln!("pod b impaired with {how:?}");
    assert_mesh_reformed(&mut nodes);
    faults::clear_impairment(b);

    let links = assert_settled(
        &mut [(a, &mut sidecar_a), (b, &mut sidecar_b)],
        &mut all(&mut nodes),
        "after loss and delay",
    );
    assert_eq!(links, 6, "a full mesh of 4 nodes");
    assert_mesh_reformed(&mut nodes);
}

/// Pod B is cut off from pod A long enough for the nodes to declare each
/// other down (net_ticktime 4 s); the partition heals; the half-closed
/// connections are freed, the mesh re-forms and carries the right data.
#[test]
fn a_partition_heals_and_the_mesh_reforms() {
    if !e2e_enabled("a_partition_heals_and_the_mesh_reforms", TOOLS) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let mut sidecar_a = sidecar(a, SIDECAR_CONFIG);
    let mut sidecar_b = sidecar(b, SIDECAR_CONFIG);
    let options = fast_tick();
    let mut nodes = start_nodes(a, &["a1", "a2"], &options);
    nodes.extend(start_nodes(b, &["b1"], &options));
    let live = names(&nodes);
    assert_mesh_reformed(&mut nodes);
    let links = assert_settled(
        &mut [(a, &mut sidecar_a), (b, &mut sidecar_b)],
        &mut all(&mut nodes),
        "before the partition",
    );
    assert_eq!(links, 3, "a full mesh of 3 nodes");

    faults::partition(b, a.addr());
    let b1 = live[2].clone();
    wait_until(
        Duration::from_secs(30),
        "both sides of the partition to see the other down",
        || nodes[2].nodes().is_empty() && !nodes[0].nodes().contains(&b1),
    );
    faults::heal_partition(b, a.addr());

    // Nothing is left of the connections the partition broke: only a1-a2
    // (within pod A) remains...
    let links = assert_settled(
        &mut [(a, &mut sidecar_a), (b, &mut sidecar_b)],
        &mut all(&mut nodes),
        "after the partition healed",
    );
    assert_eq!(links, 1, "only a1-a2 survives the partition");
    // ...and the mesh forms again through the same sidecars.
    assert_mesh_reformed(&mut nodes);
    let links = assert_settled(
        &mut [(a, &mut sidecar_a), (b, &mut sidecar_b)],
        &mut all(&mut nodes),
        "after the mesh re-formed",
    );
    assert_eq!(links, 3, "a full mesh of 3 nodes");
}

/// Pod B vanishes: its link drops everything, then its sidecar and node are
/// killed, so no FIN or RST ever leaves it. The sidecars of pods A and C
/// must notice on their own (keepalive, TCP_USER_TIMEOUT) well before the
/// nodes' 60 s tick would: the connections b1 opened are freed, a1 and c1
/// see b1 down, and what is left between A and C still works.
#[test]
fn a_vanished_pod_is_noticed_and_its_connections_freed() {
    if !e2e_enabled("a_vanished_pod_is_noticed_and_its_connections_freed", TOOLS) {
        return;
    }
    let lab = support::Lab::new(&["a", "b", "c"]);
    let (a, b, c) = (lab.pod("a"), lab.pod("b"), lab.pod("c"));
    let mut sidecar_a = sidecar(a, DEAD_PEER_CONFIG);
    let mut sidecar_b = sidecar(b, DEAD_PEER_CONFIG);
    let mut sidecar_c = sidecar(c, DEAD_PEER_CONFIG);
    let options = ErlangOptions::default();
    let mut a1 = start_nodes(a, &["a1"], &options).remove(0);
    let mut b1 = start_nodes(b, &["b1"], &options).remove(0);
    let mut c1 = start_nodes(c, &["c1"], &options).remove(0);
    let (a1_name, b1_name, c1_name) = (
        a1.name().to_string(),
        b1.name().to_string(),
        c1.name().to_string(),
    );
    // b1 dials both others, so pods A and C each hold a connection from B.
    assert_eq!(b1.ping(&a1_name), "pong");
    assert_eq!(b1.ping(&c1_name), "pong");
    assert_eq!(a1.ping(&c1_name), "pong");
    let links = assert_settled(
        &mut [
            (a, &mut sidecar_a),
            (b, &mut sidecar_b),
            (c, &mut sidecar_c),
        ],
        &mut [&mut a1, &mut b1, &mut c1],
        "before pod B vanished",
    );
    assert_eq!(links, 3, "a full mesh of 3 nodes");

    faults::isolate(b);
    b1.kill();
    sidecar_b.stop();

    let gone = |pod: &Pod, daemon: &Daemon| {
        sidecar_sockets(pod, daemon.pid())
            .peer_legs
            .iter()
            .all(|s| s.peer.ip() != b.addr())
    };
    let noticed = poll_until(DEAD_PEER_DEADLINE, Duration::from_millis(500), || {
        gone(a, &sidecar_a)
            && gone(c, &sidecar_c)
            && !a1.nodes().contains(&b1_name)
            && !c1.nodes().contains(&b1_name)
    });
    assert!(
        noticed,
        "the sidecars still hold pod B's connections {DEAD_PEER_DEADLINE:?} after it vanished \
         (pod A: {:?}; pod C: {:?}); nodes() of a1: {:?}, of c1: {:?}",
        sidecar_sockets(a, sidecar_a.pid()).peer_legs,
        sidecar_sockets(c, sidecar_c.pid()).peer_legs,
        a1.nodes(),
        c1.nodes()
    );

    let links = assert_settled(
        &mut [(a, &mut sidecar_a), (c, &mut sidecar_c)],
        &mut [&mut a1, &mut c1],
        "after pod B vanished",
    );
    assert_eq!(links, 1, "a1-c1 survives pod B");
    let result = blob(&mut a1, &c1_name, BLOB);
    assert_intact(&result, &a1_name, &c1_name);
    assert_eq!(c1.rpc_node(&a1_name), a1_name);
}

/// A 24 MiB transfer from a1 to b1 is cut by killing b1 half-way: the
/// transfer fails (it is not delivered elsewhere), pod B forgets b1, the
/// sidecar frees the connection, and a restarted b1 receives intact data.
#[test]
fn a_node_killed_mid_transfer_leaves_nothing_behind() {
    if !e2e_enabled("a_node_killed_mid_transfer_leaves_nothing_behind", TOOLS) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let mut sidecar_a = sidecar(a, SIDECAR_CONFIG);
    let mut sidecar_b = sidecar(b, SIDECAR_CONFIG);
    let options = ErlangOptions::default();
    let mut a1 = start_nodes(a, &["a1"], &options).remove(0);
    let mut pod_b = start_nodes(b, &["b1", "b2"], &options);
    let (a1_name, b1_name, b2_name) = (
        a1.name().to_string(),
        pod_b[0].name().to_string(),
        pod_b[1].name().to_string(),
    );
    // a1 dials b1 and b2: pod B's sidecar carries the transfer.
    assert_eq!(a1.ping(&b1_name), "pong");
    assert_eq!(a1.ping(&b2_name), "pong");
    assert_settled(
        &mut [(a, &mut sidecar_a), (b, &mut sidecar_b)],
        &mut std::iter::once(&mut a1)
            .chain(pod_b.iter_mut())
            .collect::<Vec<_>>(),
        "before the transfer",
    );

    faults::throttle(a, THROTTLE_MBIT);
    let before = relayed_bytes(&[b]);
    let transfer = start_blob(&mut a1, &b1_name, BIG_BLOB);
    wait_relayed(&[b], before, 2.0 * 1024.0 * 1024.0);
    let b1 = pod_b.remove(0);
    b1.kill();
    let mut b2 = pod_b.remove(0);
    let outcome = finish_blob(&mut a1, transfer);
    assert!(
        outcome.is_err(),
        "the transfer to the killed b1 succeeded: {outcome:?}"
    );
    faults::unthrottle(a);

    let links = assert_settled(
        &mut [(a, &mut sidecar_a), (b, &mut sidecar_b)],
        &mut [&mut a1, &mut b2],
        "after b1 was killed",
    );
    assert_eq!(links, 1, "only a1-b2 is left");
    let result = blob(&mut a1, &b2_name, BLOB);
    assert_intact(&result, &a1_name, &b2_name);

    let mut b1 = start_nodes(b, &["b1"], &options).remove(0);
    let result = blob(&mut a1, &b1_name, BLOB);
    assert_intact(&result, &a1_name, &b1_name);
    assert_eq!(b1.rpc_node(&a1_name), a1_name);
    assert_settled(
        &mut [(a, &mut sidecar_a), (b, &mut sidecar_b)],
        &mut [&mut a1, &mut b1, &mut b2],
        "after b1 restarted",
    );
}

/// A node stopped with SIGSTOP (a hung VM): its kernel still accepts
/// connections, so each attempt to reach it is relayed once the node's
/// challenge is overdue (`dist.handshake_timeout_ms`). When the initiator
/// gives up (its `net_setuptime`), the sidecar closes the node's leg after
/// `relay.half_close_timeout_ms` instead of holding both legs, their
/// descriptors and the source's permit until the node wakes. Woken, the
/// node is reachable again.
#[test]
fn attempts_to_reach_a_stopped_node_do_not_pile_up() {
    if !e2e_enabled("attempts_to_reach_a_stopped_node_do_not_pile_up", TOOLS) {
        return;
    }
    const CONFIG: &str = "[epmd]\nprobe_interval_ms = 500\n\
        [dist]\nhandshake_timeout_ms = 1000\n[relay]\nhalf_close_timeout_ms = 1000\n";
    const ATTEMPTS: usize = 3;
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let mut sidecar_a = sidecar(a, CONFIG);
    let mut sidecar_b = sidecar(b, CONFIG);
    let quick_setup = ErlangOptions {
        extra_args: ["-kernel", "net_setuptime", "2"]
            .map(str::to_string)
            .to_vec(),
        ..Default::default()
    };
    let mut a1 = start_nodes(a, &["a1"], &quick_setup).remove(0);
    let mut b1 = start_nodes(b, &["b1"], &ErlangOptions::default()).remove(0);
    let b1_name = b1.name().to_string();

    b1.signal("STOP");
    for attempt in 1..=ATTEMPTS {
        assert_eq!(
            a1.ping(&b1_name),
            "pang",
            "attempt {attempt} reached a stopped node"
        );
    }
    let relayed = metric_sum(
        &metrics(b),
        "distproxy_dist_connections_total",
        &[("node", "b1")],
    );
    assert!(
        relayed >= ATTEMPTS as f64,
        "the attempts were not relayed to the stopped node ({relayed}), so this tests nothing"
    );
    // Each attempt ended at a1 after 2 s; its legs go 1 s later.
    let freed = poll_until(Duration::from_secs(10), Duration::from_millis(250), || {
        let text = metrics(b);
        metric_sum(&text, OPEN, &[]) == 0.0
            && sidecar_sockets(b, sidecar_b.pid()).node_legs.is_empty()
    });
    let text = metrics(b);
    assert!(
        freed,
        "pod B still holds the attempts' connections while b1 is stopped: open gauge {}, node legs {:?}",
        metric_sum(&text, OPEN, &[]),
        sidecar_sockets(b, sidecar_b.pid()).node_legs
    );
    let expired = metric_sum(
        &text,
        "distproxy_relay_half_close_timeouts_total",
        &[("still_open", "node")],
    );
    assert!(expired >= 1.0, "no half-close timeout counted: {expired}");
    // Logged in the connection's end line, written once the relay has
    // returned: a moment after the gauge went down and the legs closed.
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
            !sidecar_b
                .log_lines_containing("relay.half_close_timeout_ms")
                .is_empty()
        }),
        "the timeout is not logged"
    );

    b1.signal("CONT");
    let woke = poll_until(Duration::from_secs(15), Duration::from_millis(500), || {
        a1.ping(&b1_name) == "pong"
    });
    assert!(woke, "b1 unreachable after SIGCONT\n{}", b1.logs());
    assert_eq!(b1.rpc_node(a1.name()), a1.name());
    assert_settled(
        &mut [(a, &mut sidecar_a), (b, &mut sidecar_b)],
        &mut [&mut a1, &mut b1],
        "after b1 woke",
    );
}

/// Pod A's sidecar is killed (SIGKILL) while it relays two 24 MiB transfers
/// and restarted with its state file: whatever the transfers delivered is
/// intact, the registry lists a1 and a2 again, the mesh re-forms, and
/// nothing of the killed sidecar's connections is left.
#[test]
fn the_sidecar_killed_under_load_recovers_from_its_state_file() {
    if !e2e_enabled(
        "the_sidecar_killed_under_load_recovers_from_its_state_file",
        TOOLS,
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let state = lab.dir().join("pod-a-registry.json");
    let config_a = format!(
        "{SIDECAR_CONFIG}state_file = {:?}\n",
        state.display().to_string()
    );
    let mut sidecar_a = sidecar(a, &config_a);
    let mut sidecar_b = sidecar(b, SIDECAR_CONFIG);
    let options = ErlangOptions::default();
    let mut nodes = start_nodes(a, &["a1", "a2"], &options);
    nodes.extend(start_nodes(b, &["b1", "b2"], &options));
    let live = names(&nodes);
    // Pod B's nodes dial pod A's: pod A's sidecar carries every cross link.
    for i in 2..4 {
        for target in &live[0..2] {
            assert_eq!(nodes[i].ping(target), "pong", "{} -> {target}", live[i]);
        }
    }
    assert_settled(
        &mut [(a, &mut sidecar_a), (b, &mut sidecar_b)],
        &mut all(&mut nodes),
        "before the kill",
    );

    faults::throttle(b, THROTTLE_MBIT);
    let before = relayed_bytes(&[a]);
    let (a1, a2) = (live[0].clone(), live[1].clone());
    let t1 = start_blob(&mut nodes[2], &a1, BIG_BLOB);
    let t2 = start_blob(&mut nodes[3], &a2, BIG_BLOB);
    wait_relayed(&[a], before, 2.0 * 1024.0 * 1024.0);
    sidecar_a.stop();
    let mut sidecar_a = sidecar(a, &config_a);
    for (i, (id, target)) in [(t1, &a1), (t2, &a2)].into_iter().enumerate() {
        // Cut mid-way the transfer fails; if it got through, it is intact.
        let outcome = finish_blob(&mut nodes[2 + i], id);
        if outcome.is_ok() {
            assert_intact(&outcome, &live[2 + i], target);
        }
    }
    faults::unthrottle(b);

    assert_settled(
        &mut [(a, &mut sidecar_a), (b, &mut sidecar_b)],
        &mut all(&mut nodes),
        "after the sidecar restarted",
    );
    assert_mesh_reformed(&mut nodes);
    let links = assert_settled(
        &mut [(a, &mut sidecar_a), (b, &mut sidecar_b)],
        &mut all(&mut nodes),
        "after the mesh re-formed",
    );
    assert_eq!(links, 6, "a full mesh of 4 nodes");
}
