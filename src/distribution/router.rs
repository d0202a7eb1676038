//! Lookup correlation: which local node an incoming connection is for.
//!
//! A distribution connection's first frame names only the initiator, so the
//! router relies on the lookup (`PORT_PLEASE2_REQ`) a stock BEAM makes right
//! before it connects:
//!
//! 1. A remote lookup from peer address P for node T is answered with one
//!    port of the advertised pool (the ports of `dist.listen`) and recorded
//!    as pending (P, port, T, deadline).
//! 2. A port is chosen whose pending entries for P all name T, else a port
//!    with no pending entry for P. When there is none, the lookup is held
//!    until an entry of P is consumed, cancelled or expires. So at any moment
//!    all unconsumed answers to P on one port point at one node.
//! 3. A raw connection from P on port X consumes P's oldest entry on X.
//!
//! An entry must never outlive the connection it announces, or it blocks
//! every other target from P until it expires. So the EPMD server watches
//! the requester while a lookup is held (a closed requester records
//! nothing), checks it again right before answering, and [cancels]
//! the entry when the requester is gone by then or the answer cannot be
//! written; the listener consumes an entry as soon as a raw connection
//! arrives, before anything else can fail. What is left (a setup killed
//! between reading the answer and connecting) is bounded by
//! `routing.lookup_ttl_ms`, and a late connection that then meets another
//! node is caught by the challenge check and closed.
//!
//! With one port, a peer's lookups of different nodes are serialised, each
//! costing one lookup→connect round trip. With a pool of K ports, up to K
//! different nodes can be pending for one peer at once; the preferred port
//! of a node is a stable hash of its name, so with K at least the number of
//! local nodes a node usually keeps its own port.
//!
//! [`CorrelationTable`] is the pure core (time is passed in);
//! [`Correlator`] adds waiting, with one FIFO gate per peer so a held lookup
//! cannot be starved by a stream of lookups for another node.
//!
//! One exception to the FIFO order: a lookup of the node a young batch
//! already names (its first entry recorded less than [`JOIN_WINDOW`] ago)
//! joins that batch at once, even past lookups held for other nodes. Any
//! connection from the peer on that port goes to that node anyway, so
//! nothing can be misrouted; when every node of one pod looks up every node
//! of another at once, this answers each target's lookups together instead
//! of one lookup→connect round trip each. The window bounds how long a
//! held lookup can be passed by.
//!
//! [cancels]: Correlator::cancel

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    id: u64,
    node: String,
    recorded: Instant,
    deadline: Instant,
}

/// A recorded lookup: the port it was answered with and its entry's id, to
/// [cancel](CorrelationTable::cancel) it if the answer never reaches the
/// requester.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub id: u64,
    pub port: u16,
}

/// An entry taken by an arriving connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    pub id: u64,
    pub node: String,
    /// Time from the answer to the connection.
    pub age: Duration,
}

/// Pending answered lookups, per (peer address, advertised port).
#[derive(Debug)]
pub struct CorrelationTable {
    ttl: Duration,
    next_id: u64,
    slots: HashMap<(IpAddr, u16), VecDeque<Pending>>,
}

/// Why a lookup cannot be answered yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    /// When the earliest conflicting entry expires.
    pub until: Instant,
}

/// A stable (process-independent) hash of a node name: FNV-1a.
fn name_hash(node: &str) -> u64 {
    node.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl CorrelationTable {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            next_id: 1,
            slots: HashMap::new(),
        }
    }

    fn purge(&mut self, key: (IpAddr, u16), now: Instant) {
        if let Some(q) = self.slots.get_mut(&key) {
            q.retain(|p| p.deadline > now);
            if q.is_empty() {
                self.slots.remove(&key);
            }
        }
    }

    /// Records a lookup of `node` by `peer` on a port of `ports` (which must
    /// not be empty) whose pending entries for the peer all name `node`, or
    /// that has none; otherwise reports until when it is blocked.
    pub fn try_record(
        &mut self,
        peer: IpAddr,
        node: &str,
        ports: &[u16],
        now: Instant,
    ) -> Result<Reservation, Blocked> {
        let ports = if ports.is_empty() { &[0][..] } else { ports };
        let start = (name_hash(node) % ports.len() as u64) as usize;
        let order = || ports.iter().cycle().skip(start).take(ports.len()).copied();
        for port in order() {
            self.purge((peer, port), now);
        }
        let joinable = order().find(|&port| {
            self.slots
                .get(&(peer, port))
                .is_some_and(|q| q.iter().all(|p| p.node == node))
        });
        let free = || order().find(|&port| !self.slots.contains_key(&(peer, port)));
        let Some(port) = joinable.or_else(free) else {
            let until = order()
                .filter_map(|port| self.slots.get(&(peer, port)))
                .filter_map(|q| q.iter().map(|p| p.deadline).min())
                .min()
                .unwrap_or(now);
            return Err(Blocked { until });
        };
        let id = self.next_id;
        self.next_id += 1;
        self.slots
            .entry((peer, port))
            .or_default()
            .push_back(Pending {
                id,
                node: node.to_string(),
                recorded: now,
                deadline: now + self.ttl,
            });
        Ok(Reservation { id, port })
    }

    /// Records a lookup of `node` by `peer` only if it can join a batch
    /// for `node` whose first entry was recorded less than `window` ago
    /// (every entry of the slot names `node`); `None` otherwise.
    pub fn try_join(
        &mut self,
        peer: IpAddr,
        node: &str,
        ports: &[u16],
        now: Instant,
        window: Duration,
    ) -> Option<Reservation> {
        let ports = if ports.is_empty() { &[0][..] } else { ports };
        let port = ports.iter().copied().find(|&port| {
            self.purge((peer, port), now);
            self.slots.get(&(peer, port)).is_some_and(|q| {
                q.iter().all(|p| p.node == node)
                    && q.front().is_some_and(|first| now < first.recorded + window)
            })
        })?;
        let id = self.next_id;
        self.next_id += 1;
        let q = self.slots.get_mut(&(peer, port))?;
        q.push_back(Pending {
            id,
            node: node.to_string(),
            recorded: now,
            deadline: now + self.ttl,
        });
        Some(Reservation { id, port })
    }

    /// Removes a recorded entry that no connection will follow; false if it
    /// is gone already (consumed or expired).
    pub fn cancel(&mut self, peer: IpAddr, reservation: Reservation) -> bool {
        let key = (peer, reservation.port);
        let Some(q) = self.slots.get_mut(&key) else {
            return false;
        };
        let before = q.len();
        q.retain(|p| p.id != reservation.id);
        let removed = q.len() != before;
        if q.is_empty() {
            self.slots.remove(&key);
        }
        removed
    }

    /// Consumes the peer's oldest live entry on `port`.
    pub fn consume(&mut self, peer: IpAddr, port: u16, now: Instant) -> Option<Consumed> {
        let key = (peer, port);
        self.purge(key, now);
        let q = self.slots.get_mut(&key)?;
        let taken = q.pop_front().map(|p| Consumed {
            id: p.id,
            node: p.node,
            age: now.saturating_duration_since(p.recorded),
        });
        if q.is_empty() {
            self.slots.remove(&key);
        }
        taken
    }

    /// Live entries of a peer on every port, oldest first per port, ports in
    /// ascending order (for tests and diagnostics).
    pub fn pending(&mut self, peer: IpAddr, now: Instant) -> Vec<String> {
        let mut keys: Vec<(IpAddr, u16)> = self
            .slots
            .keys()
            .filter(|(p, _)| *p == peer)
            .copied()
            .collect();
        keys.sort_unstable();
        for &key in &keys {
            self.purge(key, now);
        }
        keys.iter()
            .filter_map(|k| self.slots.get(k))
            .flat_map(|q| q.iter().map(|p| p.node.clone()))
            .collect()
    }

    /// Drops expired entries of every peer (bounded memory under churn).
    pub fn purge_all(&mut self, now: Instant) {
        self.slots.retain(|_, q| {
            q.retain(|p| p.deadline > now);
            !q.is_empty()
        });
    }

    /// Peers with at least one pending entry.
    pub fn peer_count(&self) -> usize {
        let mut peers: Vec<IpAddr> = self.slots.keys().map(|(p, _)| *p).collect();
        peers.sort_unstable();
        peers.dedup();
        peers.len()
    }
}

/// How a lookup ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupOutcome {
    /// Recorded. `held` is how long it was held back, `None` if it was
    /// answered without waiting.
    Recorded {
        reservation: Reservation,
        held: Option<Duration>,
    },
    /// Waited longer than the maximum hold; answer "not found".
    GaveUp { held: Duration },
}

/// How long after a batch's first lookup was answered other lookups of
/// the same node may join it past lookups held for other nodes. A few
/// lookup→connect round trips: long enough for the lookups of one burst,
/// short against `routing.max_hold_ms`, so a held lookup is passed by for
/// at most this long (plus the time the joined connections take).
pub const JOIN_WINDOW: Duration = Duration::from_millis(250);

/// One lookup held right now, in the `lookups_waiting` gauge while it
/// lives (a dropped lookup future drops it too).
struct Waiting(metrics::Gauge);

impl Waiting {
    fn start() -> Waiting {
        let gauge = metrics::gauge!(crate::metrics::LOOKUPS_WAITING);
        gauge.increment(1.0);
        Waiting(gauge)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Async front of the table: holds lookups until they may be answered.
pub struct Correlator {
    table: Mutex<CorrelationTable>,
    /// The advertised ports, in `dist.listen` order; never empty.
    ports: Vec<u16>,
    /// Woken whenever an entry is consumed or cancelled.
    released: Notify,
    /// Woken whenever a lookup is recorded (a batch others may join).
    recorded: Notify,
    /// One FIFO gate per peer; only the gate holder may wait on the table.
    gates: Mutex<HashMap<IpAddr, Arc<tokio::sync::Mutex<()>>>>,
    max_hold: Duration,
}

impl Correlator {
    /// A correlator answering with `ports` (the advertised pool; an empty
    /// list is taken as the single port 0, for tests).
    pub fn new(ttl: Duration, max_hold: Duration, ports: Vec<u16>) -> Self {
        let ports = if ports.is_empty() { vec![0] } else { ports };
        Self {
            table: Mutex::new(CorrelationTable::new(ttl)),
            ports,
            released: Notify::new(),
            recorded: Notify::new(),
            gates: Mutex::new(HashMap::new()),
            max_hold,
        }
    }

    /// The advertised ports.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The pool port a connection accepted on local port `local_port`
    /// belongs to (the first pool port when the pool is one advertised port
    /// that differs from the listener's, e.g. behind a Service).
    pub fn pool_port(&self, local_port: u16) -> u16 {
        if self.ports.contains(&local_port) {
            local_port
        } else {
            self.ports[0]
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

    /// Waits until a lookup of `node` by `peer` may be answered, and records
    /// it. Dropping the future before it completes records nothing (the
    /// EPMD server does so when the requester closes).
    pub async fn record_lookup(&self, peer: IpAddr, node: &str) -> LookupOutcome {
        let start = Instant::now();
        let give_up = start + self.max_hold;
        let gate = self.gate(peer);
        // Counted in `lookups_waiting` from the first wait until answered,
        // given up or dropped.
        let mut waiting: Option<Waiting> = None;
        let (_turn, mut waited) = match gate.try_lock() {
            Ok(turn) => (turn, false),
            Err(_) => {
                waiting = Some(Waiting::start());
                // Queued behind other lookups of this peer: join a young
                // batch for the same node as soon as there is one.
                let turn = gate.lock();
                tokio::pin!(turn);
                loop {
                    let recorded = self.recorded.notified();
                    tokio::pin!(recorded);
                    recorded.as_mut().enable();
                    if let Some(reservation) = self.join(peer, node) {
                        return LookupOutcome::Recorded {
                            reservation,
                            held: Some(start.elapsed()),
                        };
                    }
                    tokio::select! {
                        turn = &mut turn => break (turn, true),
                        _ = &mut recorded => {}
                        _ = tokio::time::sleep_until(give_up) => {
                            return LookupOutcome::GaveUp {
                                held: start.elapsed(),
                            };
                        }
                    }
                }
            }
        };
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register interest before checking, so a release between the
            // check and the wait is not missed.
            notified.as_mut().enable();
            let blocked = match self
                .table()
                .try_record(peer, node, &self.ports, Instant::now())
            {
                Ok(reservation) => {
                    self.recorded.notify_waiters();
                    return LookupOutcome::Recorded {
                        reservation,
                        held: waited.then(|| start.elapsed()),
                    };
                }
                Err(b) => b,
            };
            waited = true;
            waiting.get_or_insert_with(Waiting::start);
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

    /// Joins a young batch for `node` of `peer`, if there is one.
    fn join(&self, peer: IpAddr, node: &str) -> Option<Reservation> {
        let now = Instant::now();
        let joined = self
            .table()
            .try_join(peer, node, &self.ports, now, JOIN_WINDOW);
        if joined.is_some() {
            self.recorded.notify_waiters();
        }
        joined
    }

    /// Removes an entry whose answer never reached its requester.
    pub fn cancel(&self, peer: IpAddr, reservation: Reservation) -> bool {
        let removed = self.table().cancel(peer, reservation);
        if removed {
            self.released.notify_waiters();
        }
        removed
    }

    /// A raw connection from `peer` arrived on pool port `port`: the entry
    /// it takes, if any.
    pub fn consume(&self, peer: IpAddr, port: u16) -> Option<Consumed> {
        let taken = self.table().consume(peer, port, Instant::now());
        if taken.is_some() {
            self.released.notify_waiters();
        }
        taken
    }

    /// Pending node names of `peer` on every port.
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
    const PORT: u16 = 43691;
    const ONE: &[u16] = &[PORT];

    fn correlator(ttl: Duration, max_hold: Duration) -> Arc<Correlator> {
        Arc::new(Correlator::new(ttl, max_hold, vec![PORT]))
    }

    fn node_of(c: Option<Consumed>) -> Option<String> {
        c.map(|c| c.node)
    }

    #[tokio::test(start_paused = true)]
    async fn same_node_lookups_batch_and_are_consumed_in_order() {
        let mut t = CorrelationTable::new(TTL);
        let now = Instant::now();
        t.try_record(P, "a", ONE, now).unwrap();
        t.try_record(P, "a", ONE, now).unwrap();
        assert_eq!(t.pending(P, now), vec!["a", "a"]);
        assert_eq!(node_of(t.consume(P, PORT, now)).as_deref(), Some("a"));
        assert_eq!(node_of(t.consume(P, PORT, now)).as_deref(), Some("a"));
        assert_eq!(t.consume(P, PORT, now), None);
        assert_eq!(t.peer_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_different_node_is_blocked_until_consumption() {
        let mut t = CorrelationTable::new(TTL);
        let now = Instant::now();
        t.try_record(P, "a", ONE, now).unwrap();
        let b = t.try_record(P, "b", ONE, now).unwrap_err();
        assert_eq!(b.until, now + TTL);
        // Another peer is independent.
        t.try_record(Q, "b", ONE, now).unwrap();
        let later = now + Duration::from_millis(20);
        let a = t.consume(P, PORT, later).unwrap();
        assert_eq!((a.node.as_str(), a.age), ("a", Duration::from_millis(20)));
        t.try_record(P, "b", ONE, now).unwrap();
        assert_eq!(node_of(t.consume(P, PORT, now)).as_deref(), Some("b"));
        assert_eq!(node_of(t.consume(Q, PORT, now)).as_deref(), Some("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_the_ttl() {
        let mut t = CorrelationTable::new(TTL);
        let now = Instant::now();
        t.try_record(P, "a", ONE, now).unwrap();
        let later = now + TTL;
        assert_eq!(
            t.consume(P, PORT, later),
            None,
            "expired entry must not route"
        );
        t.try_record(P, "b", ONE, later).unwrap();
        t.purge_all(later + TTL);
        assert_eq!(t.peer_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_entry_unblocks_other_nodes_at_once() {
        let mut t = CorrelationTable::new(TTL);
        let now = Instant::now();
        let a1 = t.try_record(P, "a", ONE, now).unwrap();
        let a2 = t.try_record(P, "a", ONE, now).unwrap();
        assert!(t.cancel(P, a1));
        assert!(!t.cancel(P, a1), "cancelled twice");
        assert!(t.try_record(P, "b", ONE, now).is_err(), "a2 still pending");
        assert!(t.cancel(P, a2));
        t.try_record(P, "b", ONE, now).unwrap();
        assert_eq!(t.pending(P, now), vec!["b"]);
        // A consumed entry cannot be cancelled any more.
        let c = t.try_record(Q, "c", ONE, now).unwrap();
        t.consume(Q, PORT, now).unwrap();
        assert!(!t.cancel(Q, c));
    }

    #[tokio::test(start_paused = true)]
    async fn a_port_pool_answers_different_nodes_on_different_ports() {
        let ports = [5001, 5002, 5003];
        let mut t = CorrelationTable::new(TTL);
        let now = Instant::now();
        let a = t.try_record(P, "a", &ports, now).unwrap();
        let b = t.try_record(P, "b", &ports, now).unwrap();
        let c = t.try_record(P, "c", &ports, now).unwrap();
        let mut used = vec![a.port, b.port, c.port];
        used.sort_unstable();
        assert_eq!(used, ports, "each node got a port of its own");
        // A second lookup of b joins b's port; a fourth node must wait.
        assert_eq!(t.try_record(P, "b", &ports, now).unwrap().port, b.port);
        assert!(t.try_record(P, "d", &ports, now).is_err());
        // Each port routes to its own node, whatever the arrival order.
        assert_eq!(node_of(t.consume(P, c.port, now)).as_deref(), Some("c"));
        assert_eq!(node_of(t.consume(P, a.port, now)).as_deref(), Some("a"));
        assert_eq!(node_of(t.consume(P, b.port, now)).as_deref(), Some("b"));
        assert_eq!(node_of(t.consume(P, b.port, now)).as_deref(), Some("b"));
        // A node's preferred port is stable.
        assert_eq!(t.try_record(P, "a", &ports, now).unwrap().port, a.port);
    }

    #[tokio::test(start_paused = true)]
    async fn held_lookup_is_released_by_consumption() {
        let c = correlator(TTL, Duration::from_secs(5));
        assert!(matches!(
            c.record_lookup(P, "a").await,
            LookupOutcome::Recorded { held: None, .. }
        ));
        let c2 = Arc::clone(&c);
        let held = tokio::spawn(async move { c2.record_lookup(P, "b").await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!held.is_finished(), "lookup for b answered while a pending");
        assert_eq!(c.pending(P), vec!["a"]);
        assert_eq!(node_of(c.consume(P, PORT)).as_deref(), Some("a"));
        match held.await.unwrap() {
            LookupOutcome::Recorded { held, .. } => {
                assert_eq!(held, Some(Duration::from_millis(500)))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.pending(P), vec!["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn held_lookup_is_released_by_cancellation() {
        let c = correlator(TTL, Duration::from_secs(5));
        let LookupOutcome::Recorded { reservation, .. } = c.record_lookup(P, "a").await else {
            panic!("not recorded");
        };
        let c2 = Arc::clone(&c);
        let held = tokio::spawn(async move { c2.record_lookup(P, "b").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!held.is_finished());
        assert!(c.cancel(P, reservation));
        assert!(matches!(
            held.await.unwrap(),
            LookupOutcome::Recorded { held: Some(d), .. } if d == Duration::from_millis(100)
        ));
        assert_eq!(c.pending(P), vec!["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_held_lookup_records_nothing() {
        let c = correlator(TTL, Duration::from_secs(5));
        c.record_lookup(P, "a").await;
        let c2 = Arc::clone(&c);
        let abandoned = tokio::spawn(async move { c2.record_lookup(P, "b").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        abandoned.abort();
        let _ = abandoned.await;
        c.consume(P, PORT).unwrap();
        assert!(c.pending(P).is_empty(), "phantom entry: {:?}", c.pending(P));
        // c is answered at once: nothing blocks it.
        assert!(matches!(
            c.record_lookup(P, "c").await,
            LookupOutcome::Recorded { held: None, .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn held_lookup_is_released_by_expiry() {
        let c = correlator(TTL, Duration::from_secs(5));
        c.record_lookup(P, "a").await;
        let out = c.record_lookup(P, "b").await;
        assert!(matches!(out, LookupOutcome::Recorded { held: Some(h), .. } if h == TTL));
        assert_eq!(c.pending(P), vec!["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn held_lookup_gives_up_after_max_hold() {
        let c = correlator(Duration::from_secs(30), Duration::from_secs(2));
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
    async fn held_lookups_are_served_in_arrival_order_past_the_join_window() {
        // a pending; b waits. A lookup for a within the join window joins
        // a's batch; one after the window queues behind b instead of
        // extending a's batch forever.
        let c = correlator(TTL, Duration::from_secs(5));
        c.record_lookup(P, "a").await;
        let cb = Arc::clone(&c);
        let b = tokio::spawn(async move { cb.record_lookup(P, "b").await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let ca = Arc::clone(&c);
        let a2 = tokio::spawn(async move { ca.record_lookup(P, "a").await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(a2.is_finished(), "a2 joined a's young batch past b");
        assert_eq!(c.pending(P), vec!["a", "a"]);
        tokio::time::sleep(JOIN_WINDOW).await;
        let ca = Arc::clone(&c);
        let a3 = tokio::spawn(async move { ca.record_lookup(P, "a").await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!a3.is_finished(), "past the window, a3 queues behind b");
        assert_eq!(node_of(c.consume(P, PORT)).as_deref(), Some("a"));
        assert_eq!(node_of(c.consume(P, PORT)).as_deref(), Some("a"));
        b.await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!a3.is_finished(), "a answered while b pending");
        assert_eq!(node_of(c.consume(P, PORT)).as_deref(), Some("b"));
        a3.await.unwrap();
        assert_eq!(c.pending(P), vec!["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_young_batch_of_the_same_node_can_be_joined() {
        let mut t = CorrelationTable::new(TTL);
        let now = Instant::now();
        let window = Duration::from_millis(250);
        assert_eq!(t.try_join(P, "a", ONE, now, window), None, "no batch");
        t.try_record(P, "a", ONE, now).unwrap();
        assert_eq!(t.try_join(P, "b", ONE, now, window), None, "another node");
        assert!(t
            .try_join(P, "a", ONE, now + Duration::from_millis(100), window)
            .is_some());
        let late = now + window;
        assert_eq!(t.try_join(P, "a", ONE, late, window), None, "too old");
        assert_eq!(t.try_join(Q, "a", ONE, now, window), None, "another peer");
        assert_eq!(t.pending(P, now), vec!["a", "a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn never_two_nodes_pending_for_one_peer_and_port() {
        // Many concurrent lookups for alternating nodes: at every step the
        // peer's pending entries on each port name a single node.
        let ports = vec![1, 2];
        let c = Arc::new(Correlator::new(TTL, Duration::from_secs(60), ports.clone()));
        let mut tasks = Vec::new();
        for i in 0..12 {
            let c = Arc::clone(&c);
            let node = ["a", "b", "c"][i % 3];
            tasks.push(tokio::spawn(async move { c.record_lookup(P, node).await }));
        }
        let mut routed = Vec::new();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            for &port in &ports {
                let mut t = c.table();
                let key = (P, port);
                let mut names: Vec<String> = t
                    .slots
                    .get(&key)
                    .map(|q| q.iter().map(|p| p.node.clone()).collect())
                    .unwrap_or_default();
                names.dedup();
                assert!(names.len() <= 1, "port {port} names two nodes: {names:?}");
                if let Some(n) = t.consume(P, port, Instant::now()) {
                    routed.push(n.node);
                }
            }
            c.released.notify_waiters();
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap(), LookupOutcome::Recorded { .. }));
        }
        assert_eq!(routed.len(), 12);
    }
}
