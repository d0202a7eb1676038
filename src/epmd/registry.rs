//! The registry of local nodes.
//!
//! A registration lives exactly as long as the node's ALIVE2 connection: the
//! connection task owns a [`Registration`] guard and dropping it unregisters
//! (also when the task ends through an error or a reset). Creation numbers
//! follow OTP's `epmd_srv.c`: a per-name counter that starts at a
//! pseudo-random value ≥ 4 and is bumped on every re-registration, so a
//! restarted node never reuses the creation of its previous incarnation.
//!
//! Both maps are bounded: at most `limits.max_registered_nodes` live
//! registrations (more are refused), and at most
//! [`MAX_REMEMBERED_CREATIONS`] remembered creations, the oldest name not
//! registered dropped first (OTP's `epmd` keeps 1,000 unused slots).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::proto::NodeSpec;
use crate::metrics as m;

/// A registered node as the router and EPMD server see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    pub spec: NodeSpec,
    /// The creation handed out (32-bit; see [`NodeEntry::reply_creation`]).
    pub creation: u32,
    /// The address the node registered from; the router connects to the
    /// node's port there (so a node registered over IPv6 is reached over IPv6).
    pub addr: IpAddr,
    /// Restored from the state file after a sidecar restart rather than
    /// registered over a live ALIVE2 connection; kept while its port answers.
    pub adopted: bool,
}

impl NodeEntry {
    /// The creation as sent in the ALIVE2 reply: nodes older than version 6
    /// get the old 1..=3 range, as `epmd` does.
    pub fn reply_creation(&self) -> u32 {
        if self.spec.highest_version >= 6 {
            self.creation
        } else {
            self.creation % 3 + 1
        }
    }
}

/// Creations remembered for names no longer registered, as `epmd`'s
/// `MAX_UNREG_COUNT`.
pub const MAX_REMEMBERED_CREATIONS: usize = 1000;

/// The default of `limits.max_registered_nodes`.
pub const DEFAULT_MAX_NODES: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegisterError {
    #[error("node name {0:?} is already registered")]
    Duplicate(String),
    #[error("registry full ({0} nodes registered)")]
    Full(usize),
}

struct Slot {
    entry: NodeEntry,
    id: u64,
    /// Cancelled by STOP_REQ to close the owning ALIVE2 connection.
    stop: CancellationToken,
}

#[derive(Default)]
struct Inner {
    live: HashMap<String, Slot>,
    /// Last creation counter per name, kept after unregistration, with the
    /// sequence number of its last update (the oldest is dropped first).
    creations: HashMap<String, (u32, u64)>,
    /// Names unregistered since start and not registered again, with their
    /// last port, oldest first: `epmd`'s "old/unused" list that `DUMP_REQ`
    /// shows, at most [`MAX_REMEMBERED_CREATIONS`] long.
    unregistered: VecDeque<(String, u16)>,
    next_id: u64,
    next_seq: u64,
}

impl Inner {
    /// Moves an unregistered node to the end of the "old/unused" list.
    fn forget(&mut self, entry: NodeEntry) {
        self.unregistered.retain(|(n, _)| *n != entry.spec.name);
        self.unregistered
            .push_back((entry.spec.name, entry.spec.port));
        while self.unregistered.len() > MAX_REMEMBERED_CREATIONS {
            self.unregistered.pop_front();
        }
    }

    /// Remembers `creation` for `name` (keeping the larger), then drops the
    /// oldest names not registered beyond [`MAX_REMEMBERED_CREATIONS`].
    fn remember(&mut self, name: &str, creation: u32, keep_max: bool) {
        self.next_seq += 1;
        let seq = self.next_seq;
        let slot = self
            .creations
            .entry(name.to_string())
            .or_insert((creation, seq));
        slot.0 = if keep_max {
            slot.0.max(creation)
        } else {
            creation
        };
        slot.1 = seq;
        while self.creations.len() > MAX_REMEMBERED_CREATIONS + self.live.len() {
            let oldest = self
                .creations
                .iter()
                .filter(|(n, _)| !self.live.contains_key(*n))
                .min_by_key(|(_, (_, seq))| *seq)
                .map(|(n, _)| n.clone());
            match oldest {
                Some(n) => {
                    self.creations.remove(&n);
                }
                None => break,
            }
        }
    }
}

/// Shared registry; cheap to clone through `Arc`.
pub struct Registry {
    inner: Mutex<Inner>,
    /// `limits.max_registered_nodes`.
    max_nodes: usize,
    /// Bumped on every change (readiness, state file, tests).
    version: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::with_max_nodes(DEFAULT_MAX_NODES)
    }

    /// A registry that refuses registrations beyond `max_nodes`.
    pub fn with_max_nodes(max_nodes: usize) -> Self {
        // Scrapes show the gauge from the start, not from the first ALIVE2.
        metrics::gauge!(m::REGISTERED_NODES).set(0.0);
        Self {
            inner: Mutex::new(Inner::default()),
            max_nodes,
            version: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters more than losing the registry; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self, inner: &Inner) {
        metrics::gauge!(m::REGISTERED_NODES).set(inner.live.len() as f64);
        self.version.send_modify(|v| *v += 1);
    }

    /// Registers `spec` from `addr`. The returned guard unregisters on drop.
    pub fn register(
        self: &Arc<Self>,
        spec: NodeSpec,
        addr: IpAddr,
    ) -> Result<Registration, RegisterError> {
        let mut inner = self.lock();
        if let Some(existing) = inner.live.get(&spec.name) {
            if !existing.entry.adopted {
                return Err(RegisterError::Duplicate(spec.name));
            }
            // A live registration supersedes one restored from the state
            // file: it is the node registering again (OTP 24 and later
            // reconnect about 2 s after losing their EPMD), its restart, or
            // its replacement.
            existing.stop.cancel();
            inner.live.remove(&spec.name);
        }
        if inner.live.len() >= self.max_nodes {
            return Err(RegisterError::Full(self.max_nodes));
        }
        let creation = match inner.creations.get(&spec.name) {
            Some(&(prev, _)) => bump_creation(prev),
            None => initial_creation(),
        };
        inner.remember(&spec.name, creation, false);
        inner.unregistered.retain(|(n, _)| *n != spec.name);
        inner.next_id += 1;
        let id = inner.next_id;
        let stop = CancellationToken::new();
        let entry = NodeEntry {
            spec,
            creation,
            addr,
            adopted: false,
        };
        Ok(self.insert(&mut inner, entry, id, stop))
    }

    fn insert(
        self: &Arc<Self>,
        inner: &mut Inner,
        entry: NodeEntry,
        id: u64,
        stop: CancellationToken,
    ) -> Registration {
        let name = entry.spec.name.clone();
        inner.live.insert(
            name.clone(),
            Slot {
                entry: entry.clone(),
                id,
                stop: stop.clone(),
            },
        );
        self.changed(inner);
        Registration {
            registry: Arc::clone(self),
            name,
            id,
            entry,
            stop,
        }
    }

    /// Re-creates a registration remembered from before a restart. The
    /// guard is owned by the task that keeps probing the node's port.
    pub fn adopt(self: &Arc<Self>, mut entry: NodeEntry) -> Result<Registration, RegisterError> {
        let mut inner = self.lock();
        if inner.live.contains_key(&entry.spec.name) {
            return Err(RegisterError::Duplicate(entry.spec.name));
        }
        if inner.live.len() >= self.max_nodes {
            return Err(RegisterError::Full(self.max_nodes));
        }
        entry.adopted = true;
        inner.remember(&entry.spec.name, entry.creation, true);
        inner.next_id += 1;
        let id = inner.next_id;
        Ok(self.insert(&mut inner, entry, id, CancellationToken::new()))
    }

    /// Remembers the last creation handed out for `name` (from the state
    /// file), so its next registration gets a different one.
    pub fn remember_creation(&self, name: &str, creation: u32) {
        self.lock().remember(name, creation, true);
    }

    /// Live nodes and remembered creations, for the state file.
    pub fn snapshot(&self) -> (Vec<NodeEntry>, Vec<(String, u32)>) {
        let inner = self.lock();
        let mut nodes: Vec<NodeEntry> = inner.live.values().map(|s| s.entry.clone()).collect();
        nodes.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        let mut creations: Vec<(String, u32)> = inner
            .creations
            .iter()
            .map(|(k, &(v, _))| (k.clone(), v))
            .collect();
        creations.sort();
        (nodes, creations)
    }

    pub fn get(&self, name: &str) -> Option<NodeEntry> {
        self.lock().live.get(name).map(|s| s.entry.clone())
    }

    /// All live nodes, most recently registered first (the order in which
    /// `epmd` lists them).
    pub fn list(&self) -> Vec<NodeEntry> {
        let inner = self.lock();
        let mut v: Vec<(u64, NodeEntry)> = inner
            .live
            .values()
            .map(|s| (s.id, s.entry.clone()))
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.0));
        v.into_iter().map(|(_, e)| e).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The only registered node, if exactly one is registered.
    pub fn single(&self) -> Option<NodeEntry> {
        let inner = self.lock();
        if inner.live.len() == 1 {
            inner.live.values().next().map(|s| s.entry.clone())
        } else {
            None
        }
    }

    /// STOP_REQ: unregisters `name` and closes its ALIVE2 connection.
    pub fn stop(&self, name: &str) -> bool {
        let mut inner = self.lock();
        match inner.live.remove(name) {
            Some(slot) => {
                slot.stop.cancel();
                inner.forget(slot.entry);
                self.changed(&inner);
                true
            }
            None => false,
        }
    }

    /// Names unregistered since start (and not registered again) with
    /// their last port, oldest first, as `epmd`'s `DUMP_REQ` lists them.
    pub fn unregistered(&self) -> Vec<(String, u16)> {
        self.lock().unregistered.iter().cloned().collect()
    }

    /// Subscribe to change notifications.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn unregister(&self, name: &str, id: u64) {
        let mut inner = self.lock();
        if inner.live.get(name).is_some_and(|s| s.id == id) {
            if let Some(slot) = inner.live.remove(name) {
                inner.forget(slot.entry);
            }
            self.changed(&inner);
        }
    }
}

/// Owned by the ALIVE2 connection; dropping it unregisters the node.
pub struct Registration {
    registry: Arc<Registry>,
    name: String,
    id: u64,
    entry: NodeEntry,
    stop: CancellationToken,
}

impl Registration {
    pub fn entry(&self) -> &NodeEntry {
        &self.entry
    }
    /// Resolves when STOP_REQ (or, for an adopted entry, a new live
    /// registration of the same name) ends this registration.
    pub fn stopped(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.unregister(&self.name, self.id);
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("name", &self.name)
            .field("creation", &self.entry.creation)
            .finish()
    }
}

/// `epmd_srv.c` `bump_creation`: increment, skipping 0..=3 (reserved for
/// old-style creations and "unknown").
pub fn bump_creation(prev: u32) -> u32 {
    let next = prev.wrapping_add(1);
    if next < 4 {
        4
    } else {
        next
    }
}

/// A pseudo-random starting creation ≥ 4, so that a restarted sidecar is
/// unlikely to hand out a creation a peer still remembers.
fn initial_creation() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(nanos);
    bump_creation((h.finish() as u32) | 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::net::Ipv4Addr;

    fn spec(name: &str, port: u16, version: u16) -> NodeSpec {
        NodeSpec {
            port,
            node_type: 77,
            protocol: 0,
            highest_version: version,
            lowest_version: 5,
            name: name.to_string(),
            extra: Bytes::new(),
        }
    }

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn remembered_creations_are_capped_oldest_unregistered_first() {
        let r = Arc::new(Registry::new());
        let live = r.register(spec("keeper", 1, 6), LO).unwrap();
        for i in 0..5000 {
            drop(r.register(spec(&format!("n{i}"), 1000, 6), LO).unwrap());
        }
        let (_, creations) = r.snapshot();
        assert_eq!(creations.len(), MAX_REMEMBERED_CREATIONS + 1);
        let names: std::collections::HashSet<_> = creations.iter().map(|c| c.0.as_str()).collect();
        assert!(names.contains("keeper"), "a live name's creation is kept");
        assert!(names.contains("n4999") && names.contains("n4000"));
        assert!(!names.contains("n3999") && !names.contains("n0"));
        // A remembered name still gets a new creation.
        let before = creations.iter().find(|c| c.0 == "n4999").unwrap().1;
        let again = r.register(spec("n4999", 1000, 6), LO).unwrap();
        assert_eq!(again.entry().creation, bump_creation(before));
        drop(live);
    }

    #[test]
    fn registrations_beyond_the_maximum_are_refused() {
        let r = Arc::new(Registry::with_max_nodes(2));
        let a = r.register(spec("a", 1, 6), LO).unwrap();
        let _b = r.register(spec("b", 2, 6), LO).unwrap();
        assert_eq!(
            r.register(spec("c", 3, 6), LO).unwrap_err(),
            RegisterError::Full(2)
        );
        drop(a);
        assert!(r.register(spec("c", 3, 6), LO).is_ok());
    }

    #[test]
    fn register_lookup_and_drop_unregisters() {
        let r = Arc::new(Registry::new());
        let g = r.register(spec("a", 1000, 6), LO).unwrap();
        assert_eq!(r.get("a").unwrap().spec.port, 1000);
        assert_eq!(r.single().unwrap().spec.name, "a");
        drop(g);
        assert!(r.get("a").is_none());
        assert!(r.is_empty());
    }

    #[test]
    fn duplicate_is_refused_and_does_not_disturb_the_first() {
        let r = Arc::new(Registry::new());
        let _g = r.register(spec("a", 1000, 6), LO).unwrap();
        let err = r.register(spec("a", 2000, 6), LO).unwrap_err();
        assert_eq!(err, RegisterError::Duplicate("a".into()));
        assert_eq!(r.get("a").unwrap().spec.port, 1000);
    }

    #[test]
    fn creation_changes_on_every_reregistration() {
        let r = Arc::new(Registry::new());
        let mut seen = Vec::new();
        for _ in 0..5 {
            let g = r.register(spec("a", 1000, 6), LO).unwrap();
            let c = g.entry().creation;
            assert!(c >= 4);
            assert!(!seen.contains(&c), "creation {c} reused");
            seen.push(c);
        }
    }

    #[test]
    fn old_nodes_get_small_creations_that_differ_from_the_previous_one() {
        let r = Arc::new(Registry::new());
        let c1 = r
            .register(spec("a", 1, 5), LO)
            .unwrap()
            .entry()
            .reply_creation();
        let c2 = r
            .register(spec("a", 1, 5), LO)
            .unwrap()
            .entry()
            .reply_creation();
        assert!((1..=3).contains(&c1) && (1..=3).contains(&c2));
        assert_ne!(c1, c2);
    }

    #[test]
    fn bump_skips_reserved_values() {
        assert_eq!(bump_creation(u32::MAX), 4);
        assert_eq!(bump_creation(4), 5);
        assert_eq!(bump_creation(0), 4);
    }

    #[test]
    fn stale_guard_does_not_remove_a_newer_registration() {
        let r = Arc::new(Registry::new());
        let g1 = r.register(spec("a", 1, 6), LO).unwrap();
        assert!(r.stop("a"));
        let _g2 = r.register(spec("a", 2, 6), LO).unwrap();
        drop(g1);
        assert_eq!(r.get("a").unwrap().spec.port, 2);
    }

    #[test]
    fn adopted_entries_keep_their_creation_and_yield_to_a_live_registration() {
        let r = Arc::new(Registry::new());
        let entry = NodeEntry {
            spec: spec("a", 1000, 6),
            creation: 777,
            addr: LO,
            adopted: false,
        };
        let adopted = r.adopt(entry).unwrap();
        assert!(r.get("a").unwrap().adopted);
        assert_eq!(r.get("a").unwrap().creation, 777);
        // The node restarted and registers again: it replaces the adopted
        // entry and gets a different creation.
        let live = r.register(spec("a", 2000, 6), LO).unwrap();
        assert_ne!(live.entry().creation, 777);
        assert!(!r.get("a").unwrap().adopted);
        // The adopted guard was told to stop and dropping it is harmless.
        drop(adopted);
        assert_eq!(r.get("a").unwrap().spec.port, 2000);
    }

    #[test]
    fn remembered_creations_are_not_reused() {
        let r = Arc::new(Registry::new());
        r.remember_creation("a", 4242);
        let g = r.register(spec("a", 1, 6), LO).unwrap();
        assert_eq!(g.entry().creation, 4243);
        let (nodes, creations) = r.snapshot();
        assert_eq!(nodes.len(), 1);
        assert_eq!(creations, vec![("a".to_string(), 4243)]);
    }

    #[test]
    fn unregistered_names_are_listed_oldest_first_until_registered_again() {
        let r = Arc::new(Registry::new());
        let a = r.register(spec("a", 1, 6), LO).unwrap();
        let b = r.register(spec("b", 2, 6), LO).unwrap();
        let _c = r.register(spec("c", 3, 6), LO).unwrap();
        drop(b);
        assert!(r.stop("c"));
        drop(a);
        let names = |r: &Registry| r.unregistered();
        assert_eq!(
            names(&r),
            vec![("b".into(), 2), ("c".into(), 3), ("a".into(), 1)]
        );
        let _b = r.register(spec("b", 4, 6), LO).unwrap();
        assert_eq!(names(&r), vec![("c".into(), 3), ("a".into(), 1)]);
        for i in 0..MAX_REMEMBERED_CREATIONS + 5 {
            drop(r.register(spec(&format!("n{i}"), 9, 6), LO).unwrap());
        }
        let list = names(&r);
        assert_eq!(list.len(), MAX_REMEMBERED_CREATIONS);
        assert_eq!(list[0].0, "n5");
    }

    #[tokio::test]
    async fn stop_cancels_the_owner() {
        let r = Arc::new(Registry::new());
        let g = r.register(spec("a", 1, 6), LO).unwrap();
        assert!(r.stop("a"));
        tokio::time::timeout(std::time::Duration::from_secs(1), g.stopped())
            .await
            .unwrap();
        assert!(!r.stop("a"));
    }
}
