//! Fair shares of the TLS handshake slots between remote sources.
//!
//! Every incoming handshake holds one of `limits.max_tls_handshakes` slots
//! until it completes or its deadline passes (outgoing ones have slots of
//! their own). Without a share per source, one address that opens that
//! many connections and stalls each one mid-handshake (a ClientHello, then
//! nothing) holds every slot for a whole `tls.handshake_timeout_ms`, again
//! and again: every other pod's tunnel waits for a slot until its deadline
//! and fails. So an accepted handshake from a remote address first
//! takes one of that address's [`share`] slots; its further handshakes
//! queue there (counting against their deadline, as waiting for a global
//! slot does), not in the global queue. A burst from one pod (its sidecar
//! dialling for N nodes at once) still completes, a share at a time.
//! Loopback peers (port forwards) take global slots only.
//!
//! Outgoing handshakes are shared the same way by the address dialled
//! (`Tls::connect_to`): a remote sidecar that accepts connections but never
//! answers (stopped, frozen) holds at most its share of the outgoing
//! slots, not every tunnel this pod's nodes open to other pods.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The slots one remote address may hold at once out of `max`: a quarter,
/// at least one.
pub fn share(max: usize) -> usize {
    (max / 4).max(1)
}

/// The per-source semaphores with the number of handshakes holding or
/// waiting for one of their slots; an entry is dropped when that is 0.
type Sources = Arc<Mutex<HashMap<IpAddr, (Arc<Semaphore>, usize)>>>;

/// Every remote source's slots.
pub(super) struct SourceSlots {
    share: usize,
    /// IPv6 addresses count by this prefix ([`crate::net::source_key`]).
    ipv6_prefix_len: u8,
    sources: Sources,
}

/// A source's claim: dropping it frees the slot (or the place in the
/// queue) and forgets the source once nobody else of it holds or waits.
pub(super) struct SourceSlot {
    ip: IpAddr,
    permit: Option<OwnedSemaphorePermit>,
    sources: Sources,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SourceSlots {
    pub(super) fn new(max: usize, ipv6_prefix_len: u8) -> SourceSlots {
        SourceSlots {
            share: share(max),
            ipv6_prefix_len,
            sources: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Waits for one of `ip`'s slots.
    pub(super) async fn acquire(&self, ip: IpAddr) -> SourceSlot {
        let ip = crate::net::source_key(ip, self.ipv6_prefix_len);
        let semaphore = {
            let mut sources = lock(&self.sources);
            let (semaphore, users) = sources
                .entry(ip)
                .or_insert_with(|| (Arc::new(Semaphore::new(self.share)), 0));
            *users += 1;
            Arc::clone(semaphore)
        };
        // Made before waiting, so that a cancelled wait (the deadline)
        // counts itself out too.
        let mut slot = SourceSlot {
            ip,
            permit: None,
            sources: Arc::clone(&self.sources),
        };
        // Never closed.
        slot.permit = semaphore.acquire_owned().await.ok();
        slot
    }

    /// Sources with a handshake holding or waiting for a slot.
    pub(super) fn sources(&self) -> usize {
        lock(&self.sources).len()
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut sources = lock(&self.sources);
        if let Some((_, users)) = sources.get_mut(&self.ip) {
            *users -= 1;
            if *users == 0 {
                sources.remove(&self.ip);
            }
        }
    }
}
