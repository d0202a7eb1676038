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

// ---------------------------------------------------------------------------
// Mesh formation at scale: P pods × N nodes started at once, every node
// pinging every other at the same instant (`-connect_all false`, so only
// those pings connect), one immediate retry of the pairs that failed.
// Shared by tests/e2e_mesh.rs (a small layout) and benches/mesh.rs.

use std::time::Instant;

use super::lab::Lab;
use super::metrics::{metric_sum, metrics};
use super::sidecar::{Daemon, SidecarOptions};
use super::wait::poll_until;

/// How the pods of a mesh run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshMode {
    /// Stock `epmd` per pod, every node on its own port, reachable from
    /// everywhere: the reference.
    Reference,
    /// distproxy sidecars; stock nodes (lookup correlation).
    StockPeers,
    /// distproxy sidecars; nodes with the `distproxy_epmd` module (tunnel).
    ModulePeers,
}

impl MeshMode {
    pub fn label(self) -> &'static str {
        match self {
            MeshMode::Reference => "reference (stock epmd)",
            MeshMode::StockPeers => "distproxy, stock peers",
            MeshMode::ModulePeers => "distproxy, module peers",
        }
    }
}

/// A mesh to form.
#[derive(Clone, Debug)]
pub struct MeshLayout {
    pub pods: usize,
    pub nodes: usize,
    pub mode: MeshMode,
    /// Sidecar configuration (TOML); the default configuration if `None`.
    pub sidecar_config: Option<String>,
    /// OTP's default `-connect_all true` (global connects every node it
    /// learns of), for [`MeshLab::join_via_seed`]; `false` for
    /// [`MeshLab::form`], where only the pings connect.
    pub connect_all: bool,
}

/// One round of concurrent pings.
#[derive(Clone, Debug, Default)]
pub struct Round {
    /// From the common start instant to the last answer.
    pub elapsed: Duration,
    /// Pings made.
    pub pings: usize,
    /// `(from, to)` pairs that answered `pang`.
    pub failed: Vec<(String, String)>,
}

/// What forming the mesh gave.
#[derive(Clone, Debug)]
pub struct MeshReport {
    pub mode: MeshMode,
    pub first: Round,
    /// The retry of `first.failed` (empty when nothing failed).
    pub retry: Round,
    /// Misroutes the sidecars counted (`distproxy_misroutes_total`).
    pub misroutes: f64,
}

/// A running mesh lab. Dropping it kills every node and sidecar.
pub struct MeshLab {
    pub nodes: Vec<BeamNode>,
    pub daemons: Vec<Daemon>,
    pub lab: Lab,
    pub layout: MeshLayout,
}

/// Pod names: a, b, c, ...
fn pod_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let c = (b'a' + (i % 26) as u8) as char;
            if i < 26 {
                c.to_string()
            } else {
                format!("{c}{}", i / 26)
            }
        })
        .collect()
}

/// Builds the lab, starts every sidecar (or stock epmd), then every node at
/// once, and waits until all are ready.
pub fn start_mesh(layout: &MeshLayout) -> MeshLab {
    let names = pod_names(layout.pods);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let lab = Lab::new(&refs);
    let ebin = match layout.mode {
        MeshMode::ModulePeers => Some(super::module::compile_module(&lab)),
        _ => None,
    };
    let mut daemons = Vec::new();
    for pod in lab.pods() {
        daemons.push(match layout.mode {
            MeshMode::Reference => pod.spawn_stock_epmd(),
            MeshMode::StockPeers | MeshMode::ModulePeers => {
                // Debug logs of 48 nodes would slow the sidecar down.
                let mut options = SidecarOptions {
                    log_filter: "info".into(),
                    ..Default::default()
                };
                if let Some(toml) = &layout.sidecar_config {
                    options = options.config(toml);
                }
                pod.spawn_sidecar_with(options)
            }
        });
    }
    let mut options = match &ebin {
        Some(ebin) => super::module::with_module(ebin),
        None => super::beam::ErlangOptions::default(),
    };
    if !layout.connect_all {
        options
            .extra_args
            .extend(["-connect_all".to_string(), "false".to_string()]);
    }
    let mut nodes = Vec::new();
    for pod in lab.pods() {
        for i in 1..=layout.nodes {
            nodes.push(pod.spawn_erlang_with(&format!("{}{i}", pod.name()), &options));
        }
    }
    for node in &mut nodes {
        node.wait_ready();
    }
    MeshLab {
        nodes,
        daemons,
        lab,
        layout: layout.clone(),
    }
}

/// Every node in `plan` pings its targets, all starting at one instant.
fn ping_round(nodes: &mut [BeamNode], plan: &[Vec<String>]) -> Round {
    let start_at = SystemTime::now() + PING_START_DELAY;
    let ids: Vec<Option<u64>> = nodes
        .iter_mut()
        .zip(plan)
        .map(|(node, targets)| (!targets.is_empty()).then(|| node.send_ping_all(targets, start_at)))
        .collect();
    let mut round = Round::default();
    for (node, id) in nodes.iter_mut().zip(ids) {
        let Some(id) = id else { continue };
        for (target, result) in node.recv_pairs(id, PING_ALL_TIMEOUT) {
            round.pings += 1;
            if result != "pong" {
                round.failed.push((node.name().to_string(), target));
            }
        }
    }
    round.elapsed = SystemTime::now()
        .duration_since(start_at)
        .unwrap_or_default();
    round
}

impl MeshLab {
    /// Forms the full mesh: everyone pings everyone at once, then the
    /// failed pairs retry once, immediately.
    pub fn form(&mut self) -> MeshReport {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name().to_string()).collect();
        let plan: Vec<Vec<String>> = names.iter().map(|me| others(&names, me)).collect();
        let first = ping_round(&mut self.nodes, &plan);
        let retry_plan: Vec<Vec<String>> = names
            .iter()
            .map(|me| {
                first
                    .failed
                    .iter()
                    .filter(|(from, _)| from == me)
                    .map(|(_, to)| to.clone())
                    .collect()
            })
            .collect();
        let retry = if first.failed.is_empty() {
            Round::default()
        } else {
            ping_round(&mut self.nodes, &retry_plan)
        };
        MeshReport {
            mode: self.layout.mode,
            first,
            retry,
            misroutes: self.metric_total("distproxy_misroutes_total", &[]),
        }
    }

    /// Joins the cluster as users do: every node but the first pings the
    /// first (all at once), and OTP's `global` (with `connect_all`) then
    /// connects every other pair itself. Returns the time from the pings'
    /// start until every `nodes()` lists all the others, or which nodes
    /// still miss whom at `deadline`.
    pub fn join_via_seed(&mut self, deadline: Duration) -> Result<Duration, String> {
        assert!(self.layout.connect_all, "a seeded join needs connect_all");
        let names: Vec<String> = self.nodes.iter().map(|n| n.name().to_string()).collect();
        let seed = names[0].clone();
        let plan: Vec<Vec<String>> = names
            .iter()
            .map(|me| {
                if *me == seed {
                    vec![]
                } else {
                    vec![seed.clone()]
                }
            })
            .collect();
        let started = Instant::now();
        let pings = ping_round(&mut self.nodes, &plan);
        if !pings.failed.is_empty() {
            return Err(format!("pings of the seed failed: {:?}", pings.failed));
        }
        let mut missing = Vec::new();
        let full = poll_until(deadline, Duration::from_millis(250), || {
            missing.clear();
            for node in &mut self.nodes {
                let known = node.nodes();
                let lacking: Vec<String> = others(&names, node.name())
                    .into_iter()
                    .filter(|n| !known.contains(n))
                    .collect();
                if !lacking.is_empty() {
                    missing.push(format!("{} lacks {lacking:?}", node.name()));
                }
            }
            missing.is_empty()
        });
        if full {
            Ok(started.elapsed())
        } else {
            Err(format!("no full mesh after {deadline:?}: {missing:#?}"))
        }
    }

    fn has_sidecars(&self) -> bool {
        self.layout.mode != MeshMode::Reference
    }

    /// Sum of a metric over every pod's sidecar (0 for the reference).
    pub fn metric_total(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        if !self.has_sidecars() {
            return 0.0;
        }
        self.lab
            .pods()
            .iter()
            .map(|pod| metric_sum(&metrics(pod), name, labels))
            .sum()
    }

    /// Per sidecar: (relayed connections by the open gauge, established
    /// TCP sockets the sidecar process holds, per `ss`).
    pub fn open_connections(&self) -> Vec<(f64, usize)> {
        self.lab
            .pods()
            .iter()
            .zip(&self.daemons)
            .map(|(pod, daemon)| {
                let gauge = metric_sum(&metrics(pod), "distproxy_dist_connections_open", &[]);
                let ss = pod.run_ok("ss", &["-Htnp", "state", "established"]);
                let needle = format!("pid={},", daemon.pid());
                let sockets = ss.lines().filter(|l| l.contains(&needle)).count();
                (gauge, sockets)
            })
            .collect()
    }

    /// Panics unless every sidecar's open gauge comes to match the sockets
    /// it holds: two per relayed connection, plus one per registered node.
    /// Waited for (up to 15 s), not one snapshot: the gauge and `ss` are
    /// read one after the other, and a connection OTP drops after forming
    /// the mesh (the loser of a simultaneous connect, a `global`
    /// disconnect) can be between the two; a miscount or a leak stays.
    pub fn assert_open_matches_live(&self) {
        let mut last = Vec::new();
        let matches = poll_until(Duration::from_secs(15), Duration::from_millis(250), || {
            last = self.open_connections();
            last.iter()
                .all(|&(gauge, sockets)| sockets == 2 * gauge as usize + self.layout.nodes)
        });
        for (pod, (gauge, sockets)) in self.lab.pods().iter().zip(last) {
            let expected = 2 * gauge as usize + self.layout.nodes;
            assert!(
                matches || sockets == expected,
                "pod {}: sidecar holds {sockets} established sockets; the open gauge says {gauge} relayed connections (+{} registrations)",
                pod.name(),
                self.layout.nodes
            );
        }
    }

    /// Kills every node, then waits until every sidecar's open gauge is 0
    /// and it holds no established socket; panics otherwise.
    pub fn kill_nodes_and_assert_nothing_leaks(&mut self) {
        for node in self.nodes.drain(..) {
            node.kill();
        }
        let mut last = Vec::new();
        let settled = poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
            last = self.open_connections();
            last.iter()
                .all(|&(gauge, sockets)| gauge == 0.0 && sockets == 0)
        });
        assert!(
            settled,
            "connections left after every node died (gauge, sockets per pod): {last:?}"
        );
    }
}

/// Formats a duration in seconds with two decimals.
pub fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// Elapsed wall time of `f`.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}
