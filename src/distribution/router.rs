//! Lookup correlation: which local node an incoming connection is for.
//!
//! A distribution connection's first frame names only the initiator, so the
//! router relies on the lookup (`PORT_PLEASE2_REQ`) a stock BEAM makes right
//! before it connects (DESIGN.md, "Routing an incoming distribution
//! connection"):
//!
//! 1. A remote lookup from peer address P for node T is answered with the
//!    proxy port and recorded as pending (P, T, deadline).
//! 2. It is answered at once only if every pending entry of P names T;
//!    otherwise it is held until P's entries are consumed or expire. So all
//!    unconsumed answers to P point at one node at any moment.
//! 3. A connection from P consumes P's oldest pending entry.
//!
//! [`CorrelationTable`] is the pure core (time is passed in);
//! [`Correlator`] adds waiting, with one FIFO gate per peer so a held lookup
//! cannot be starved by a stream of lookups for another node.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    node: String,
    deadline: Instant,
}

/// Pending answered lookups, per peer address.
#[derive(Debug)]
pub struct CorrelationTable {
    ttl: Duration,
    peers: HashMap<IpAddr, VecDeque<Pending>>,
}

/// Why a lookup cannot be answered yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    /// When the earliest conflicting entry expires.
    pub until: Instant,
}

impl CorrelationTable {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            peers: HashMap::new(),
        }
    }

    fn purge(&mut self, peer: IpAddr, now: Instant) {
        if let Some(q) = self.peers.get_mut(&peer) {
            q.retain(|p| p.deadline > now);
            if q.is_empty() {
                self.peers.remove(&peer);
            }
        }
    }

    /// Records a lookup of `node` by `peer` if every pending entry of the
    /// peer names the same node; otherwise reports until when it is blocked.
    pub fn try_record(&mut self, peer: IpAddr, node: &str, now: Instant) -> Result<(), Blocked> {
        self.purge(peer, now);
        let q = self.peers.entry(peer).or_default();
        if let Some(conflict) = q
            .iter()
            .filter(|p| p.node != node)
            .map(|p| p.deadline)
            .min()
        {
            return Err(Blocked { until: conflict });
        }
        q.push_back(Pending {
            node: node.to_string(),
            deadline: now + self.ttl,
        });
        Ok(())
    }

    /// Consumes the peer's oldest live entry.
    pub fn consume(&mut self, peer: IpAddr, now: Instant) -> Option<String> {
        self.purge(peer, now);
        let q = self.peers.get_mut(&peer)?;
        let node = q.pop_front().map(|p| p.node);
        if q.is_empty() {
            self.peers.remove(&peer);
        }
        node
    }

    /// Live entries of a peer, oldest first (for tests and diagnostics).
    pub fn pending(&mut self, peer: IpAddr, now: Instant) -> Vec<String> {
        self.purge(peer, now);
        self.peers
            .get(&peer)
            .map(|q| q.iter().map(|p| p.node.clone()).collect())
            .unwrap_or_default()
    }

    /// Drops expired entries of every peer (bounded memory under churn).
    pub fn purge_all(&mut self, now: Instant) {
        self.peers.retain(|_, q| {
            q.retain(|p| p.deadline > now);
            !q.is_empty()
        });
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }
}

/// How a lookup ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupOutcome {
    /// Recorded; `held` is how long it waited (zero if answered at once).
    Recorded { held: Duration },
    /// Waited longer than the maximum hold; answer "not found".
    GaveUp { held: Duration },
}

/// Async front of the table: holds lookups until they may be answered.
pub struct Correlator {
    table: Mutex<CorrelationTable>,
    /// Woken whenever an entry is consumed.
    consumed: Notify,
    /// One FIFO gate per peer; only the gate holder may wait on the table.
    gates: Mutex<HashMap<IpAddr, Arc<tokio::sync::Mutex<()>>>>,
    max_hold: Duration,
}

impl Correlator {
    pub fn new(ttl: Duration, max_hold: Duration) -> Self {
        Self {
            table: Mutex::new(CorrelationTable::new(ttl)),
            consumed: Notify::new(),
            gates: Mutex::new(HashMap::new()),
            max_hold,
        }
    }

    fn table(&self) -> MutexGuard<'_, CorrelationTable> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gate(&self, peer: IpAddr) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        // Forget gates nobody is queued on, so the map stays small.
        if gates.len() > 64 {
            gates.retain(|_, g| Arc::strong_count(g) > 1);
        }
        Arc::clone(gates.entry(peer).or_default())
    }

    /// Waits until a lookup of `node` by `peer` may be answered with the
    /// proxy port, and records it.
    pub async fn record_lookup(&self, peer: IpAddr, node: &str) -> LookupOutcome {
        let start = Instant::now();
        let give_up = start + self.max_hold;
        let gate = self.gate(peer);
        let Ok(_turn) = tokio::time::timeout_at(give_up, gate.lock()).await else {
            return LookupOutcome::GaveUp {
                held: start.elapsed(),
            };
        };
        loop {
            let notified = self.consumed.notified();
            tokio::pin!(notified);
            // Register interest before checking, so a consumption between the
            // check and the wait is not missed.
            notified.as_mut().enable();
            let blocked = match self.table().try_record(peer, node, Instant::now()) {
                Ok(()) => {
                    return LookupOutcome::Recorded {
                        held: start.elapsed(),
                    }
                }
                Err(b) => b,
            };
            if Instant::now() >= give_up {
                return LookupOutcome::GaveUp {
                    held: start.elapsed(),
                };
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(blocked.until.min(give_up)) => {}
            }
        }
    }

    /// A connection from `peer` arrived: the node it is for, if correlated.
    pub fn consume(&self, peer: IpAddr) -> Option<String> {
        let node = self.table().consume(peer, Instant::now());
        if node.is_some() {
            self.consumed.notify_waiters();
        }
        node
    }

    pub fn pending(&self, peer: IpAddr) -> Vec<String> {
        self.table().pending(peer, Instant::now())
    }

    pub fn purge_expired(&self) {
        self.table().purge_all(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const P: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    const Q: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3));
    const TTL: Duration = Duration::from_secs(3);

    #[tokio::test(start_paused = true)]
    async fn same_node_lookups_batch_and_are_consumed_in_order() {
        let mut t = CorrelationTable::new(TTL);
        let now = Instant::now();
        t.try_record(P, "a", now).unwrap();
        t.try_record(P, "a", now).unwrap();
        assert_eq!(t.pending(P, now), vec!["a", "a"]);
        assert_eq!(t.consume(P, now).as_deref(), Some("a"));
        assert_eq!(t.consume(P, now).as_deref(), Some("a"));
        assert_eq!(t.consume(P, now), None);
        assert_eq!(t.peer_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_different_node_is_blocked_until_consumption() {
        let mut t = CorrelationTable::new(TTL);
        let now = Instant::now();
        t.try_record(P, "a", now).unwrap();
        let b = t.try_record(P, "b", now).unwrap_err();
        assert_eq!(b.until, now + TTL);
        // Another peer is independent.
        t.try_record(Q, "b", now).unwrap();
        assert_eq!(t.consume(P, now).as_deref(), Some("a"));
        t.try_record(P, "b", now).unwrap();
        assert_eq!(t.consume(P, now).as_deref(), Some("b"));
        assert_eq!(t.consume(Q, now).as_deref(), Some("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_the_ttl() {
        let mut t = CorrelationTable::new(TTL);
        let now = Instant::now();
        t.try_record(P, "a", now).unwrap();
        let later = now + TTL;
        assert_eq!(t.consume(P, later), None, "expired entry must not route");
        t.try_record(P, "b", later).unwrap();
        t.purge_all(later + TTL);
        assert_eq!(t.peer_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn held_lookup_is_released_by_consumption() {
        let c = Arc::new(Correlator::new(TTL, Duration::from_secs(8)));
        assert_eq!(
            c.record_lookup(P, "a").await,
            LookupOutcome::Recorded {
                held: Duration::ZERO
            }
        );
        let c2 = Arc::clone(&c);
        let held = tokio::spawn(async move { c2.record_lookup(P, "b").await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!held.is_finished(), "lookup for b answered while a pending");
        assert_eq!(c.pending(P), vec!["a"]);
        assert_eq!(c.consume(P).as_deref(), Some("a"));
        match held.await.unwrap() {
            LookupOutcome::Recorded { held } => assert_eq!(held, Duration::from_millis(500)),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.pending(P), vec!["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn held_lookup_is_released_by_expiry() {
        let c = Arc::new(Correlator::new(TTL, Duration::from_secs(8)));
        c.record_lookup(P, "a").await;
        let out = c.record_lookup(P, "b").await;
        assert_eq!(out, LookupOutcome::Recorded { held: TTL });
        assert_eq!(c.pending(P), vec!["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn held_lookup_gives_up_after_max_hold() {
        let c = Arc::new(Correlator::new(
            Duration::from_secs(30),
            Duration::from_secs(2),
        ));
        c.record_lookup(P, "a").await;
        let out = c.record_lookup(P, "b").await;
        assert_eq!(
            out,
            LookupOutcome::GaveUp {
                held: Duration::from_secs(2)
            }
        );
        assert_eq!(c.pending(P), vec!["a"], "a gave-up lookup records nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn held_lookups_are_served_in_arrival_order() {
        // a pending; b waits; then a new lookup for a must queue behind b
        // instead of extending a's batch forever.
        let c = Arc::new(Correlator::new(TTL, Duration::from_secs(8)));
        c.record_lookup(P, "a").await;
        let cb = Arc::clone(&c);
        let b = tokio::spawn(async move { cb.record_lookup(P, "b").await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let ca = Arc::clone(&c);
        let a2 = tokio::spawn(async move { ca.record_lookup(P, "a").await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!a2.is_finished());
        assert_eq!(c.consume(P).as_deref(), Some("a"));
        b.await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!a2.is_finished(), "a answered while b pending");
        assert_eq!(c.consume(P).as_deref(), Some("b"));
        a2.await.unwrap();
        assert_eq!(c.pending(P), vec!["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn never_two_nodes_pending_for_one_peer() {
        // Many concurrent lookups for alternating nodes: at every step the
        // peer's pending entries name a single node.
        let c = Arc::new(Correlator::new(TTL, Duration::from_secs(60)));
        let mut tasks = Vec::new();
        for i in 0..10 {
            let c = Arc::clone(&c);
            let node = if i % 2 == 0 { "a" } else { "b" };
            tasks.push(tokio::spawn(async move { c.record_lookup(P, node).await }));
        }
        let mut routed = Vec::new();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let mut p = c.pending(P);
            p.dedup();
            assert!(p.len() <= 1, "pending names two nodes: {p:?}");
            if let Some(n) = c.consume(P) {
                routed.push(n);
            }
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap(), LookupOutcome::Recorded { .. }));
        }
        assert_eq!(routed.len(), 10);
    }
}
