//! Where this pod's own nodes can be dialled by a node of the pod.
//!
//! An egress request for a node of this pod is answered with the node's
//! loopback port. A node started with `inet_dist_use_interface` set to the
//! pod's address registers over loopback but listens on that address only;
//! its loopback port would get the asking node `pang`, so it is refused
//! instead and the module looks the node up the stock way.
//!
//! Where a node listens is read from `/proc/net/tcp` and `tcp6`, which costs
//! milliseconds in a pod holding thousands of connections: too much for
//! every request of a forming mesh (a 4 × 12 mesh of module nodes once took
//! four times as long with a read per request). It is read once per
//! registration (name, creation and port), off the runtime, as soon as the
//! node registers; a request that comes first waits for that read. A node
//! cannot move its listener without registering again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use crate::epmd::registry::{NodeEntry, Registry};

use super::lock;

/// How many checks are kept beyond the nodes registered before those of
/// nodes that left are forgotten.
const SLACK: usize = 16;

/// The result of one registration's check, shared by the requests that
/// wait for it.
struct Check {
    creation: u32,
    port: u16,
    off_loopback: Arc<OnceCell<Option<IpAddr>>>,
}

/// One check per registered node of this pod.
pub(super) struct ListenerChecks {
    checks: Mutex<HashMap<String, Check>>,
    /// Reads where a port is listened on (procfs; another in tests).
    read: fn(u16) -> Option<IpAddr>,
}

impl Default for ListenerChecks {
    fn default() -> Self {
        ListenerChecks {
            checks: Mutex::default(),
            read: crate::net::listens_off_loopback_only,
        }
    }
}

impl ListenerChecks {
    /// The pod address `node` listens on when nothing of it listens on
    /// loopback or a wildcard address; `None` for a node reached on
    /// loopback (and when procfs cannot tell).
    pub(super) async fn off_loopback(
        &self,
        node: &NodeEntry,
        registry: &Registry,
    ) -> Option<IpAddr> {
        let port = node.spec.port;
        let cell = {
            let mut checks = lock(&self.checks);
            if checks.len() > registry.len() + SLACK {
                checks.retain(|name, c| {
                    registry
                        .get(name)
                        .is_some_and(|e| e.creation == c.creation && e.spec.port == c.port)
                });
            }
            let check = checks
                .entry(node.spec.name.clone())
                .or_insert_with(|| Check::new(node));
            if check.creation != node.creation || check.port != port {
                *check = Check::new(node);
            }
            Arc::clone(&check.off_loopback)
        };
        let read = self.read;
        *cell
            .get_or_init(|| async move {
                tokio::task::spawn_blocking(move || read(port))
                    .await
                    .unwrap_or(None)
            })
            .await
    }

    /// Reads where each node of the pod listens as soon as it registers,
    /// until `stop`: a module node's first egress request for it then
    /// finds the answer ready instead of waiting for the read.
    pub(super) async fn read_on_registration(
        self: Arc<Self>,
        registry: Arc<Registry>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut changes = registry.subscribe();
        loop {
            for node in registry.list() {
                if node.addr.is_loopback() && !self.has_check(&node) {
                    let (checks, registry) = (Arc::clone(&self), Arc::clone(&registry));
                    tokio::spawn(async move {
                        checks.off_loopback(&node, &registry).await;
                    });
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Whether `node`'s registration is read or being read.
    fn has_check(&self, node: &NodeEntry) -> bool {
        lock(&self.checks)
            .get(&node.spec.name)
            .is_some_and(|c| c.creation == node.creation && c.port == node.spec.port)
    }

    /// Checks held (for tests: bounded by the nodes registered).
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.checks).len()
    }
}

impl Check {
    fn new(node: &NodeEntry) -> Check {
        Check {
            creation: node.creation,
            port: node.spec.port,
            off_loopback: Arc::new(OnceCell::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epmd::proto::NodeSpec;
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The port the fake procfs shows on the pod's address only.
    const OFF_LOOPBACK_PORT: u16 = 4001;
    const POD_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2));
    static READS: AtomicUsize = AtomicUsize::new(0);

    fn fake_read(port: u16) -> Option<IpAddr> {
        READS.fetch_add(1, Ordering::SeqCst);
        (port == OFF_LOOPBACK_PORT).then_some(POD_IP)
    }

    fn spec(name: &str, port: u16) -> NodeSpec {
        NodeSpec {
            port,
            node_type: 77,
            protocol: 0,
            highest_version: 6,
            lowest_version: 5,
            name: name.into(),
            extra: bytes::Bytes::new(),
        }
    }

    /// Each registration is read once however many requests ask at once,
    /// a node registered again (a new creation, maybe a new port) is read
    /// again, and the checks of nodes that left are forgotten.
    #[tokio::test]
    async fn each_registration_is_read_once_and_forgotten_after_it_left() {
        let registry = Arc::new(Registry::new());
        let checks = ListenerChecks {
            checks: Mutex::default(),
            read: fake_read,
        };
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let a1 = registry.register(spec("a1", 4000), loopback).unwrap();
        let ap = registry
            .register(spec("ap", OFF_LOOPBACK_PORT), loopback)
            .unwrap();
        let asks = (0..20).map(|i| {
            let entry = if i % 2 == 0 { a1.entry() } else { ap.entry() };
            checks.off_loopback(entry, &registry)
        });
        let answers = futures_util::future::join_all(asks).await;
        for (i, answer) in answers.iter().enumerate() {
            let expected = (i % 2 == 1).then_some(POD_IP);
            assert_eq!(*answer, expected, "request {i}");
        }
        assert_eq!(READS.load(Ordering::SeqCst), 2, "one read per registration");

        // Read as soon as registered, before any request asks.
        let ready = registry.register(spec("a2", 4003), loopback).unwrap();
        let before = READS.load(Ordering::SeqCst);
        let checks = Arc::new(checks);
        let stop = tokio_util::sync::CancellationToken::new();
        let watcher = tokio::spawn(
            Arc::clone(&checks).read_on_registration(Arc::clone(&registry), stop.clone()),
        );
        for _ in 0..100 {
            if checks.has_check(ready.entry()) && READS.load(Ordering::SeqCst) > before {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            READS.load(Ordering::SeqCst),
            before + 1,
            "a2 read on registration"
        );
        assert_eq!(checks.off_loopback(ready.entry(), &registry).await, None);
        assert_eq!(READS.load(Ordering::SeqCst), before + 1, "and not again");
        stop.cancel();
        watcher.await.unwrap();
        drop(ready);

        // ap restarts on loopback: its new registration is read again.
        drop(ap);
        let ap = registry.register(spec("ap", 4002), loopback).unwrap();
        let reads = READS.load(Ordering::SeqCst);
        assert_eq!(checks.off_loopback(ap.entry(), &registry).await, None);
        assert_eq!(READS.load(Ordering::SeqCst), reads + 1);

        // Nodes that come and go leave no checks behind.
        drop((a1, ap));
        for i in 0..100 {
            let reg = registry
                .register(spec(&format!("n{i}"), 5000 + i), loopback)
                .unwrap();
            checks.off_loopback(reg.entry(), &registry).await;
        }
        assert!(checks.len() <= SLACK + 1, "{} checks kept", checks.len());
    }
}
