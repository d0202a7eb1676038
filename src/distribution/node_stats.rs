//! Per-node counts of relayed connections and bytes: `/nodes`'
//! `open_connections` and the node-labelled metric families
//! (`distproxy_dist_connections_open`, `distproxy_dist_connections_total`,
//! `distproxy_relayed_bytes_total`), which distproxy renders itself.
//!
//! The `metrics` facade cannot remove a series once recorded, so a pod whose
//! nodes come and go under new names (remote consoles, scripts run as
//! nodes, releases renamed) exported every name it ever saw until the
//! sidecar restarted: a memory and cardinality leak. Here a node's series
//! are dropped `admin.node_series_retention_ms` after it left:
//! unregistered, with no connection open. A scrape in between still sees
//! its final counts.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use metrics::Counter;

use crate::epmd::registry::Registry;
use crate::metrics as m;

/// How often opening a connection also looks for nodes to forget, so that
/// a sidecar nobody scrapes does not grow either.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Direction of a relayed connection, as labelled in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a peer to a local node.
    Inbound,
    /// From a local node to a remote sidecar.
    Outbound,
    /// From a node of this pod to another, through a mirror listener.
    SamePod,
}

impl Direction {
    const ALL: [Direction; 3] = [Direction::Inbound, Direction::Outbound, Direction::SamePod];

    pub fn label(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
            Direction::SamePod => "same_pod",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The counts of one local node.
struct NodeCounts {
    /// Connections relayed so far, by [`Direction`].
    opened: [u64; 3],
    /// Connections being relayed, by [`Direction`].
    open: [u64; 3],
    /// Bytes towards the node, shared with its relays.
    rx: Arc<AtomicU64>,
    /// Bytes from the node.
    tx: Arc<AtomicU64>,
    /// When it was last known to be here: registered, or with a
    /// connection open (updated as connections end and at each prune).
    seen: Instant,
}

impl NodeCounts {
    fn new() -> NodeCounts {
        NodeCounts {
            opened: [0; 3],
            open: [0; 3],
            rx: Arc::default(),
            tx: Arc::default(),
            seen: Instant::now(),
        }
    }
}

struct Inner {
    nodes: HashMap<String, NodeCounts>,
    next_prune: Instant,
}

/// The per-node counts of one sidecar.
pub struct NodeStats {
    inner: Mutex<Inner>,
    /// Whether a node is still registered (then its series stay).
    registry: Arc<Registry>,
    forget_after: Duration,
}

/// One counted connection's byte counters (`rx`: towards the node).
pub struct ByteCounters {
    pub rx: Counter,
    pub tx: Counter,
}

impl NodeStats {
    /// `forget_after`: how long the series of a node that left are kept
    /// (`admin.node_series_retention_ms`).
    pub fn new(registry: Arc<Registry>, forget_after: Duration) -> NodeStats {
        NodeStats {
            inner: Mutex::new(Inner {
                nodes: HashMap::new(),
                next_prune: Instant::now() + PRUNE_EVERY,
            }),
            registry,
            forget_after,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a connection relayed for `node` and returns the node's byte
    /// counters. [`NodeStats::closed`] must follow.
    pub fn opened(&self, node: &str, direction: Direction) -> ByteCounters {
        let now = Instant::now();
        let mut inner = self.lock();
        if now >= inner.next_prune {
            inner.next_prune = now + PRUNE_EVERY;
            self.prune(&mut inner, now);
        }
        let counts = inner
            .nodes
            .entry(node.to_string())
            .or_insert_with(NodeCounts::new);
        counts.opened[direction.index()] += 1;
        counts.open[direction.index()] += 1;
        counts.seen = now;
        ByteCounters {
            rx: Counter::from_arc(Arc::clone(&counts.rx)),
            tx: Counter::from_arc(Arc::clone(&counts.tx)),
        }
    }

    /// A connection counted by [`NodeStats::opened`] ended.
    pub fn closed(&self, node: &str, direction: Direction) {
        let mut inner = self.lock();
        if let Some(counts) = inner.nodes.get_mut(node) {
            let open = &mut counts.open[direction.index()];
            *open = open.saturating_sub(1);
            counts.seen = Instant::now();
        }
    }

    /// Connections relayed for `node` now, in every direction.
    pub fn open_connections(&self, node: &str) -> u64 {
        self.lock()
            .nodes
            .get(node)
            .map_or(0, |c| c.open.iter().sum())
    }

    /// Drops the nodes that left more than `forget_after` ago; notes the
    /// others as seen now.
    fn prune(&self, inner: &mut Inner, now: Instant) {
        inner.nodes.retain(|node, counts| {
            if counts.open.iter().any(|&n| n > 0) || self.registry.get(node).is_some() {
                counts.seen = now;
                true
            } else {
                now.duration_since(counts.seen) < self.forget_after
            }
        });
    }

    /// The node-labelled families in Prometheus text format (version
    /// 0.0.4), as the exporter writes its own; empty with no node seen.
    pub fn render(&self) -> String {
        let mut inner = self.lock();
        self.prune(&mut inner, Instant::now());
        let mut nodes: Vec<(&String, &NodeCounts)> = inner.nodes.iter().collect();
        nodes.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut out = String::new();
        if nodes.is_empty() {
            return out;
        }
        let by_direction = |out: &mut String, name: &str, value: fn(&NodeCounts, usize) -> u64| {
            for (node, counts) in &nodes {
                for direction in Direction::ALL {
                    if counts.opened[direction.index()] > 0 {
                        let _ = writeln!(
                            out,
                            "{name}{{node=\"{}\",direction=\"{}\"}} {}",
                            escape(node),
                            direction.label(),
                            value(counts, direction.index())
                        );
                    }
                }
            }
        };
        family(
            &mut out,
            m::DIST_CONNECTIONS_OPEN,
            "gauge",
            m::DIST_CONNECTIONS_OPEN_HELP,
        );
        by_direction(&mut out, m::DIST_CONNECTIONS_OPEN, |c, i| c.open[i]);
        out.push('\n');
        family(
            &mut out,
            m::DIST_CONNECTIONS,
            "counter",
            m::DIST_CONNECTIONS_HELP,
        );
        by_direction(&mut out, m::DIST_CONNECTIONS, |c, i| c.opened[i]);
        out.push('\n');
        family(&mut out, m::RELAYED_BYTES, "counter", m::RELAYED_BYTES_HELP);
        for (node, counts) in &nodes {
            for (label, bytes) in [("rx", &counts.rx), ("tx", &counts.tx)] {
                let _ = writeln!(
                    out,
                    "{}{{node=\"{}\",direction=\"{label}\"}} {}",
                    m::RELAYED_BYTES,
                    escape(node),
                    bytes.load(Ordering::Relaxed)
                );
            }
        }
        out.push('\n');
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the text format wants it: `\`, `"` and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epmd::proto::NodeSpec;

    fn spec(name: &str) -> NodeSpec {
        NodeSpec {
            name: name.to_string(),
            port: 40000,
            node_type: 77,
            protocol: 0,
            highest_version: 6,
            lowest_version: 5,
            extra: bytes::Bytes::new(),
        }
    }

    fn line<'a>(text: &'a str, name: &str, node: &str, direction: &str) -> Option<&'a str> {
        let key = format!("{name}{{node=\"{node}\",direction=\"{direction}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(key.as_str()))
    }

    #[test]
    fn counts_render_by_node_and_direction() {
        let stats = NodeStats::new(Arc::new(Registry::new()), Duration::from_secs(600));
        assert_eq!(stats.render(), "");
        let bytes = stats.opened("b1", Direction::Inbound);
        bytes.rx.increment(100);
        bytes.tx.increment(7);
        stats.opened("b1", Direction::SamePod);
        stats.closed("b1", Direction::SamePod);
        assert_eq!(stats.open_connections("b1"), 1);
        let text = stats.render();
        let open = m::DIST_CONNECTIONS_OPEN;
        assert_eq!(line(&text, open, "b1", "inbound"), Some("1"));
        assert_eq!(line(&text, open, "b1", "same_pod"), Some("0"));
        assert_eq!(line(&text, open, "b1", "outbound"), None, "never used");
        assert_eq!(
            line(&text, m::DIST_CONNECTIONS, "b1", "same_pod"),
            Some("1")
        );
        assert_eq!(line(&text, m::RELAYED_BYTES, "b1", "rx"), Some("100"));
        assert_eq!(line(&text, m::RELAYED_BYTES, "b1", "tx"), Some("7"));
        assert!(text.contains(&format!("# TYPE {open} gauge\n")));
        assert!(text.contains(&format!("# TYPE {} counter\n", m::RELAYED_BYTES)));
    }

    #[test]
    fn a_node_that_left_is_forgotten_after_the_retention_and_a_registered_one_is_not() {
        let registry = Arc::new(Registry::new());
        let stats = NodeStats::new(Arc::clone(&registry), Duration::from_millis(50));
        let _kept = registry
            .register(spec("stays"), "127.0.0.1".parse().unwrap())
            .unwrap();
        for node in ["stays", "left", "busy"] {
            stats.opened(node, Direction::Inbound);
        }
        stats.closed("stays", Direction::Inbound);
        stats.closed("left", Direction::Inbound);
        let text = stats.render();
        assert!(
            line(&text, m::DIST_CONNECTIONS, "left", "inbound").is_some(),
            "kept for a while"
        );
        std::thread::sleep(Duration::from_millis(80));
        let text = stats.render();
        assert_eq!(
            line(&text, m::DIST_CONNECTIONS, "left", "inbound"),
            None,
            "{text}"
        );
        assert_eq!(line(&text, m::RELAYED_BYTES, "left", "rx"), None);
        assert!(
            line(&text, m::DIST_CONNECTIONS, "stays", "inbound").is_some(),
            "registered"
        );
        assert_eq!(
            line(&text, m::DIST_CONNECTIONS_OPEN, "busy", "inbound"),
            Some("1"),
            "a connection still open"
        );
        // A node back under its old name starts again from zero.
        stats.opened("left", Direction::Outbound);
        let text = stats.render();
        assert_eq!(line(&text, m::DIST_CONNECTIONS, "left", "inbound"), None);
        assert_eq!(
            line(&text, m::DIST_CONNECTIONS, "left", "outbound"),
            Some("1")
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let stats = NodeStats::new(Arc::new(Registry::new()), Duration::from_secs(600));
        stats.opened("a\"b\\c\nd", Direction::Inbound);
        let text = stats.render();
        assert!(
            text.contains(r#"{node="a\"b\\c\nd",direction="inbound"} 1"#),
            "{text}"
        );
    }
}
