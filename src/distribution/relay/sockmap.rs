//! The kernel fast path (`relay.fast_path = "sockmap"`): both sockets of a
//! plain relayed connection go into a sockhash whose `sk_skb` stream-verdict
//! program ([`bpf::verdict_program`]) redirects the bytes arriving on each
//! socket to its partner's send side inside the kernel. Bytes no longer
//! wake the sidecar; it only watches for the ends.
//!
//! **Handover.** Called where the splice relay would start, so the sidecar
//! has nothing buffered and reads nothing more. Before inserting, each
//! socket's position is noted: bytes the sidecar consumed
//! (`tcpi_bytes_received` − unread) and bytes written to it
//! (`tcpi_bytes_acked` + unacknowledged). Bytes that arrived before the
//! insertion are still in the receive queue; the first peek after it makes
//! the kernel run them through the verdict program, in order, before
//! anything newer.
//!
//! **Ends.** EOF on one socket is propagated as a write shutdown of the
//! other, as on the splice path, but only once every byte the first socket
//! received has been written to the second: the kernel sends redirected
//! bytes from a work queue, so the sidecar compares the counters (polling
//! every millisecond, as no event says so) before shutting down. An error
//! on either socket ends both. Bytes that reach the sidecar anyway (the
//! program keeps a socket's bytes when its partner has left the map) are
//! read and written on by the sidecar.
//!
//! **Counting.** Bytes moved by the kernel are counted from the sockets'
//! `TCP_INFO` counters every [`COUNT_EVERY`] and at the end, so
//! `relayed_bytes_total` and `/nodes` lag by at most that.
//!
//! Any refusal before the handover (no room, a socket no longer
//! established, the kernel refusing an insert) leaves both sockets as they
//! were, and the caller splices. Only the last of the four inserts can fail
//! after bytes moved (the peer's are redirected from the third on): the
//! peer then leaves the map and the sidecar waits until the node has been
//! sent every byte the kernel took, before the splice path goes on from
//! there.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use std::net::TcpStream;

use metrics::Counter;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::io::unix::AsyncFd;

use super::bpf::{self, annotate, Ends};
use super::node_routes::{NodeRoutes, Route};
use super::StillOpen;

/// How often bytes moved by the kernel are added to the counters.
pub const COUNT_EVERY: Duration = Duration::from_secs(5);
/// `SO_SNDBUF` of both sockets on the fast path (the kernel doubles it).
/// The kernel sends redirected bytes from a work queue that backs off when
/// the partner's send buffer is full; with the autotuned default the
/// BEAM bench measured 0.35x direct for bulk, with this 0.41x (16 MiB:
/// 0.46x). Memory is only used while a slow reader lets bytes queue.
/// Set with `SO_SNDBUFFORCE` (the fast path holds CAP_NET_ADMIN), as
/// `SO_SNDBUF` is capped by `net.core.wmem_max`, 208 KiB by default.
const SEND_BUFFER: usize = 4 << 20;
/// A shutdown waits for the partner's queue at most this long without
/// progress.
const DRAIN_STALL: Duration = Duration::from_secs(30);

/// The sockhash and its attached program, shared by every connection.
pub struct FastPath {
    /// The sockets whose bytes are redirected, each under its own cookie;
    /// the verdict program is attached to this map.
    verdict: OwnedFd,
    /// Each socket's partner, under the socket's cookie: where the program
    /// looks up the target (no program attached).
    partners: OwnedFd,
    _prog: OwnedFd,
    in_use: AtomicU32,
    max_connections: u32,
    /// Node routes, when the `sock_ops` program could be attached.
    routes: Option<NodeRoutes>,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("in_use", &self.in_use.load(Ordering::Relaxed))
            .field("max_connections", &self.max_connections)
            .field("routes", &self.routes)
            .finish()
    }
}

impl FastPath {
    /// Creates the map, loads and attaches the program. Fails without
    /// CAP_BPF and CAP_NET_ADMIN, or on a kernel without sockmap.
    pub fn open(max_connections: u32) -> io::Result<FastPath> {
        let entries = max_connections.saturating_mul(2);
        let create = || {
            bpf::create_sockhash(entries).map_err(|e| annotate(e, "failed to create a sockhash"))
        };
        let (verdict, partners) = (create()?, create()?);
        let prog = bpf::load_verdict(partners.as_fd())
            .map_err(|e| annotate(e, "failed to load the verdict program"))?;
        bpf::attach_verdict(verdict.as_fd(), prog.as_fd())
            .map_err(|e| annotate(e, "failed to attach the verdict program"))?;
        Ok(FastPath {
            verdict,
            partners,
            _prog: prog,
            in_use: AtomicU32::new(0),
            max_connections,
            routes: None,
        })
    }

    /// Adds node routes ([`super::node_routes`]) for the nodes of the
    /// cgroup v2 directory `cgroup`, whose connections to the sidecar's
    /// `dist_ports` can then skip the loopback hop. On error the fast path
    /// goes on without them.
    pub fn enable_node_routes(
        &mut self,
        cgroup: &std::path::Path,
        dist_ports: &[u16],
    ) -> io::Result<()> {
        let routes = NodeRoutes::open(cgroup, self.max_connections)?;
        for &port in dist_ports {
            routes.add_relay_port(port)?;
        }
        self.routes = Some(routes);
        Ok(())
    }

    /// Node routes, when enabled.
    pub fn node_routes(&self) -> Option<&NodeRoutes> {
        self.routes.as_ref()
    }
}

/// `SO_SNDBUF` of `s`: forced past `net.core.wmem_max` where the
/// capability allows, else as far as the cap lets it.
fn set_send_buffer(s: &TcpStream, size: usize) {
    if setsockopt(s, sockopt::SndBufForce, &size).is_err() {
        let _ = socket2::SockRef::from(s).set_send_buffer_size(size);
    }
}

/// Whether `s` is writable as poll counts it (for TCP: a third of its
/// send buffer free); if not, its next room wakes its epoll watchers.
fn writable(s: &TcpStream) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLOUT)];
    poll(&mut fds, PollTimeout::ZERO)?;
    Ok(fds[0]
        .revents()
        .is_some_and(|r| r.contains(PollFlags::POLLOUT)))
}

/// Why a connection was not handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotTaken {
    /// `relay.fast_path_max_connections` reached.
    Full,
    /// The kernel or a socket's state refused it.
    Refused,
}

/// One socket's position when it was handed over.
#[derive(Debug, Clone, Copy)]
struct Mark {
    /// Bytes the sidecar had read from it.
    consumed: u64,
    /// Bytes the sidecar had written to it.
    written: u64,
}

/// Bytes written to `fd` so far (acknowledged + still queued). Read in
/// that order, the sum never exceeds the true figure.
fn written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let acked = bpf::tcp_counts(fd)?.acked;
    Ok(acked + bpf::outq(fd)?)
}

fn mark(fd: BorrowedFd<'_>) -> io::Result<Mark> {
    let c = bpf::tcp_counts(fd)?;
    if c.state != bpf::TCP_ESTABLISHED {
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "not established",
        ));
    }
    // Bytes may arrive between the two reads: retry until stable.
    let mut consumed = None;
    for _ in 0..8 {
        let before = bpf::inq(fd)?;
        let received = bpf::tcp_counts(fd)?.received;
        if bpf::inq(fd)? == before {
            consumed = Some(received.saturating_sub(before));
            break;
        }
    }
    let consumed =
        consumed.ok_or_else(|| io::Error::new(io::ErrorKind::WouldBlock, "receive queue busy"))?;
    Ok(Mark {
        consumed,
        written: written(fd)?,
    })
}

/// The map entries of one connection; removed on drop, however the relay
/// ends (including when its task is dropped at shutdown).
struct Entries<'a> {
    fp: &'a FastPath,
    /// (map, key) in insertion order; removed in the reverse order.
    keys: Vec<(BorrowedFd<'a>, u64)>,
}

impl Drop for Entries<'_> {
    fn drop(&mut self) {
        for &(map, k) in self.keys.iter().rev() {
            let _ = bpf::map_remove(map, k);
        }
        self.fp.in_use.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One direction: bytes from `src` to `dst`.
struct Way<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    src_mark: Mark,
    dst_mark: Mark,
    counted: &'a Counter,
    /// Bytes of this direction already counted.
    total: &'a mut u64,
    /// Bytes counted before the handover.
    base: u64,
    /// Until `src` reached EOF and `dst` was shut down (after which `dst`'s
    /// FIN counts as one acknowledged byte).
    open: bool,
    /// When `src` faces a node with a route: the sidecar moves what
    /// arrives on `src` itself (see [`super::node_routes`]).
    pump: Option<Pump<'a>>,
}

/// What the sidecar relays of a routed node's own socket.
struct Pump<'a> {
    /// Told of every write, so the node's messages can be routed again
    /// once the sidecar has caught up (None: the route was not armed,
    /// everything comes this way).
    route: Option<Route<'a>>,
    buf: Box<[u8]>,
    /// Peeked (still queued on `src`) and not yet written:
    /// `buf[start..end]`.
    start: usize,
    end: usize,
    /// Bytes of `src` written to `dst` from the start of the connection.
    relayed: u64,
    eof: bool,
}

/// The pump's buffer: how much it peeks and writes at a time.
const PUMP_BUFFER: usize = 64 * 1024;
/// `SO_RCVBUF` of a sidecar socket facing a routed node: what the node
/// can pass before it waits for the sidecar, so a passing spell ends
/// soon after the target has room. Not below two loopback segments
/// (64 KiB each), or the receive window closes to zero between reads.
const PASS_RECV_BUFFER: usize = 128 * 1024;

impl<'a> Pump<'a> {
    fn new(route: Option<Route<'a>>, relayed: u64) -> Pump<'a> {
        Pump {
            route,
            buf: vec![0u8; PUMP_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            relayed,
            eof: false,
        }
    }
}

impl Way<'_> {
    /// Adds the bytes written to `dst` since the handover to the counters.
    fn count(&mut self) {
        if let Ok(w) = written(self.dst.as_fd()) {
            let fin = u64::from(!self.open);
            let moved = self.base + w.saturating_sub(self.dst_mark.written + fin);
            if moved > *self.total {
                self.counted.increment(moved - *self.total);
                *self.total = moved;
            }
        }
    }

    /// Bytes received on `src` since the handover (a FIN not counted).
    fn received(&self) -> io::Result<u64> {
        let r = bpf::tcp_counts(self.src.as_fd())?.received;
        Ok(r.saturating_sub(self.src_mark.consumed + 1))
    }

    /// Something happened on `src` or `dst` (or it is the first look):
    /// bytes to pump, EOF, an error, or nothing.
    async fn check(&mut self) -> io::Result<()> {
        if !self.open {
            return Ok(());
        }
        if self.pump.is_some() {
            return self.pump();
        }
        if let Some(e) = self.src.take_error()? {
            return Err(e);
        }
        match bpf::peek(self.src.as_fd()) {
            Ok(0) => {
                self.drain().await?;
                self.count();
                self.open = false;
                self.dst.shutdown(std::net::Shutdown::Write)
            }
            // The program left bytes to the sidecar: the partner has left
            // the map, which only a failing socket does.
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the partner socket left the sockmap",
            )),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Moves what `src` has to `dst` until one of them would block; on
    /// EOF (once everything is written), shuts `dst` down. Bytes are
    /// peeked, written, and only then consumed from `src`, after the
    /// route has been told how far the sidecar got: the node's socket
    /// does not drain, so the node does not wake to write more, before
    /// its next message can be routed (a node woken earlier would race
    /// the sidecar's update, and its message would pass again).
    fn pump(&mut self) -> io::Result<()> {
        use std::io::Write;
        let p = self.pump.as_mut().expect("a pumped way");
        loop {
            // A target short of room (less than a third free, as poll
            // counts) waits for more: meanwhile the node's bytes fill its
            // socket and the node sleeps, instead of the sidecar relaying
            // a trickle of its messages at the edge of a full target.
            let mut blocked = p.start < p.end && !writable(self.dst)?;
            let written_from = p.start;
            while p.start < p.end && !blocked {
                match (&mut &*self.dst).write(&p.buf[p.start..p.end]) {
                    Ok(n) => {
                        p.start += n;
                        p.relayed += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        blocked = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if p.start > written_from {
                if p.start == p.end {
                    if let Some(route) = p.route.as_mut() {
                        // Unpublished, the node's messages keep coming this
                        // way: slower, never out of order.
                        let _ = route.update(p.relayed);
                    }
                }
                bpf::discard(self.src.as_fd(), &mut p.buf[written_from..p.start])?;
            }
            if blocked {
                return Ok(());
            }
            if p.eof {
                self.open = false;
                return self.dst.shutdown(std::net::Shutdown::Write);
            }
            match bpf::peek_into(self.src.as_fd(), &mut p.buf) {
                Ok(0) => p.eof = true,
                Ok(n) => (p.start, p.end) = (0, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until every byte `src` received has been written to `dst`.
    async fn drain(&mut self) -> io::Result<()> {
        let target = self.received()?;
        let stalled = "redirected bytes not sent before shutdown";
        wait_written(self.dst, self.dst_mark.written, target, stalled).await
    }
}

/// Waits until `target` bytes have been written to `dst` since it was
/// marked at `mark`: the kernel sends redirected bytes from a work queue,
/// and no event says when it is done, so this polls every millisecond.
/// Gives up (`stalled`) after [`DRAIN_STALL`] without progress.
async fn wait_written(
    dst: &TcpStream,
    mark: u64,
    target: u64,
    stalled: &'static str,
) -> io::Result<()> {
    let mut last = 0;
    let mut since = tokio::time::Instant::now();
    loop {
        let sent = written(dst.as_fd())?.saturating_sub(mark);
        if sent >= target {
            return Ok(());
        }
        if let Some(e) = dst.take_error()? {
            return Err(e);
        }
        if sent != last {
            (last, since) = (sent, tokio::time::Instant::now());
        } else if since.elapsed() > DRAIN_STALL {
            return Err(io::Error::new(io::ErrorKind::TimedOut, stalled));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `bpf::map_insert` of an entry of the handover of `peer`'s connection.
/// In tests, the node's verdict insert (`last`) fails when
/// [`FAIL_LAST_INSERT`] holds a hook for `peer`'s remote address, after
/// running the hook.
fn insert(
    last: bool,
    map: BorrowedFd<'_>,
    key: u64,
    sock: BorrowedFd<'_>,
    peer: &TcpStream,
) -> io::Result<()> {
    #[cfg(test)]
    if last {
        let mut slot = FAIL_LAST_INSERT.lock().unwrap();
        if slot.as_ref().map(|(a, _)| *a) == peer.peer_addr().ok() {
            let (_, hook) = slot.take().unwrap();
            drop(slot);
            hook();
            return Err(io::Error::other("failed by the test"));
        }
    }
    #[cfg(not(test))]
    let _ = (last, peer);
    bpf::map_insert(map, key, sock)
}

/// The last insert of a handover failed while the peer's bytes were
/// already redirected to the node. Stops that (the peer leaves the map
/// with the program), then waits until every byte the kernel took from
/// the peer has been written to the node: the node's queue of redirected
/// bytes is dropped with its map entry, and the splice path that takes
/// over must start exactly where the kernel stopped. Returns the bytes
/// the kernel moved; an error if the node stopped taking them.
async fn take_back(
    entries: &mut Entries<'_>,
    peer: &TcpStream,
    node: &TcpStream,
    peer_mark: Mark,
    node_mark: Mark,
) -> io::Result<u64> {
    if let Some((map, key)) = entries.keys.pop() {
        bpf::map_remove(map, key)?;
    }
    let taken = {
        let received = bpf::tcp_counts(peer.as_fd())?.received;
        received.saturating_sub(bpf::inq(peer.as_fd())? + peer_mark.consumed)
    };
    let stalled = "bytes redirected before a failed handover were not sent";
    wait_written(node, node_mark.written, taken, stalled).await?;
    Ok(taken)
}

/// An epoll set that wakes for the ends of both sockets only (peer closed
/// its side, error, hang-up), never for data: the kernel wakes readers
/// after each redirected message, which is what the fast path avoids.
/// With a pumped way (`pumps`), also when data arrives or room appears:
/// only a routed node's passed bytes arrive that way.
fn watch_ends(socks: [&TcpStream; 2], pumps: bool) -> io::Result<AsyncFd<Ends>> {
    let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (i, s) in socks.into_iter().enumerate() {
        let mut flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        if pumps {
            flags |= EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT;
        }
        ep.add(s, EpollEvent::new(flags, i as u64))?;
    }
    bpf::register(ep)
}

/// Relays `peer` ↔ `node` through the kernel (both non-blocking, out of
/// tokio's reactor). `Err(NotTaken)` when the connection was not handed
/// over (nothing changed: splice it); otherwise how the relay ended, with
/// the bytes counted as on the splice path. `on_handover` runs once the
/// kernel has the connection. With `node_routes`, a local node at either
/// end gets a route ([`super::node_routes`]), and what it still writes to
/// its own socket is moved by the sidecar instead of the verdict program.
#[allow(clippy::too_many_arguments)]
pub async fn relay(
    fp: &FastPath,
    peer: &TcpStream,
    node: &TcpStream,
    (rx_bytes, tx_bytes): (&Counter, &Counter),
    (rx, tx): (&mut u64, &mut u64),
    node_routes: bool,
    half_close_timeout: Option<Duration>,
    on_handover: impl FnOnce(),
) -> Result<io::Result<()>, NotTaken> {
    if fp.in_use.fetch_add(1, Ordering::Relaxed) >= fp.max_connections {
        fp.in_use.fetch_sub(1, Ordering::Relaxed);
        return Err(NotTaken::Full);
    }
    let mut entries = Entries {
        fp,
        keys: Vec::with_capacity(4),
    };
    let routes = fp.routes.as_ref().filter(|_| node_routes);
    // A side whose node can get a route: the sidecar moves its bytes.
    let peer_routed = routes.is_some_and(|r| r.has_node(peer));
    let node_routed = routes.is_some_and(|r| r.has_node(node));
    let ready = (|| {
        let (p, n) = (peer.as_fd(), node.as_fd());
        let ends = watch_ends([peer, node], peer_routed || node_routed)?;
        Ok::<_, io::Error>((mark(p)?, mark(n)?, bpf::cookie(p)?, bpf::cookie(n)?, ends))
    })();
    let Ok((peer_mark, node_mark, peer_cookie, node_cookie, ends)) = ready else {
        return Err(NotTaken::Refused);
    };
    for s in [peer, node] {
        set_send_buffer(s, SEND_BUFFER);
    }
    for (routed, s) in [(peer_routed, peer), (node_routed, node)] {
        if routed {
            let _ = socket2::SockRef::from(s).set_recv_buffer_size(PASS_RECV_BUFFER);
        }
    }
    let (p, n) = (peer.as_fd(), node.as_fd());
    // The routes' targets: each routed node's messages go out of the
    // other socket.
    let mut targets = Vec::with_capacity(2);
    if let Some(r) = routes {
        for (routed, sock, cookie) in [(peer_routed, n, node_cookie), (node_routed, p, peer_cookie)]
        {
            if routed {
                match r.add_target(sock, cookie) {
                    Ok(t) => targets.push(t),
                    Err(_) => return Err(NotTaken::Refused),
                }
            }
        }
    }
    // Partners first (no program there), then the sockets themselves into
    // the map with the program: a socket's bytes are redirected from the
    // moment they are, and its partner is already there to be found.
    let (partners, verdict) = (fp.partners.as_fd(), fp.verdict.as_fd());
    let mut inserts = vec![(partners, peer_cookie, n), (partners, node_cookie, p)];
    if !peer_routed {
        inserts.push((verdict, peer_cookie, p));
    }
    if !node_routed {
        inserts.push((verdict, node_cookie, n));
    }
    let last = inserts.len() - 1;
    for (i, (map, key, sock)) in inserts.into_iter().enumerate() {
        let node_verdict = i == last && !node_routed;
        if insert(node_verdict, map, key, sock, peer).is_err() {
            if node_verdict && !peer_routed {
                // The peer's bytes have been redirected since its insert:
                // take the peer back before splicing.
                match take_back(&mut entries, peer, node, peer_mark, node_mark).await {
                    Ok(moved) => {
                        *rx += moved;
                        rx_bytes.increment(moved);
                    }
                    Err(e) => return Ok(Err(e)),
                }
            }
            return Err(NotTaken::Refused);
        }
        entries.keys.push((map, key));
    }
    // Routes last: their targets are in place now. A route starts from
    // the bytes the sidecar has already written on for its node.
    let (mut peer_pump, mut node_pump) = (None, None);
    if let Some(r) = routes {
        for (routed, end, target, mark, pump, side) in [
            (
                peer_routed,
                peer,
                node_cookie,
                peer_mark,
                &mut peer_pump,
                "initiator",
            ),
            (
                node_routed,
                node,
                peer_cookie,
                node_mark,
                &mut node_pump,
                "acceptor",
            ),
        ] {
            if routed {
                let route = match r.arm(end, target, mark.consumed) {
                    Ok(route) => {
                        metrics::counter!(crate::metrics::RELAY_NODE_ROUTES, "side" => side)
                            .increment(1);
                        Some(route)
                    }
                    Err(missed) => {
                        tracing::info!(
                            side,
                            reason = missed.reason(),
                            "node route not armed: this node's bytes go through the sidecar"
                        );
                        metrics::counter!(
                            crate::metrics::RELAY_NODE_ROUTES_MISSED,
                            "side" => side,
                            "reason" => missed.reason()
                        )
                        .increment(1);
                        None
                    }
                };
                *pump = Some(Pump::new(route, mark.consumed));
            }
        }
    }
    #[cfg(test)]
    HANDED_OVER.fetch_add(1, Ordering::Relaxed);
    on_handover();
    let mut to_node = Way {
        src: peer,
        dst: node,
        src_mark: peer_mark,
        dst_mark: node_mark,
        counted: rx_bytes,
        base: *rx,
        total: rx,
        open: true,
        pump: peer_pump,
    };
    let mut to_peer = Way {
        src: node,
        dst: peer,
        src_mark: node_mark,
        dst_mark: peer_mark,
        counted: tx_bytes,
        base: *tx,
        total: tx,
        open: true,
        pump: node_pump,
    };
    let result = watch(&ends, &mut to_node, &mut to_peer, half_close_timeout).await;
    to_node.count();
    to_peer.count();
    // Routes before their targets, targets before the sockets leave.
    drop(to_node.pump.take());
    drop(to_peer.pump.take());
    drop(targets);
    drop(entries);
    Ok(result)
}

async fn watch<'a>(
    ends: &AsyncFd<Ends>,
    to_node: &mut Way<'a>,
    to_peer: &mut Way<'a>,
    half_close_timeout: Option<Duration>,
) -> io::Result<()> {
    // The first look at each socket also makes the kernel pass what arrived
    // before the handover through the program (a read on a socket in a
    // sockmap runs its receive queue through the verdict first).
    to_node.check().await?;
    to_peer.check().await?;
    let mut tick = tokio::time::interval(COUNT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = [EpollEvent::empty(); 4];
    // Set when one direction has closed (as `relay::both_ways` does).
    let mut deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    while to_node.open || to_peer.open {
        if let (None, Some(linger), false) =
            (&deadline, half_close_timeout, to_node.open && to_peer.open)
        {
            deadline = Some(Box::pin(tokio::time::sleep(linger)));
        }
        tokio::select! {
            _ = async { deadline.as_mut().expect("guarded").await }, if deadline.is_some() => {
                let still_open = if to_node.open { StillOpen::Peer } else { StillOpen::Node };
                let linger = half_close_timeout.expect("a deadline is set only with a linger");
                return Err(super::half_close_expired(still_open, linger));
            }
            guard = ends.readable() => {
                let mut guard = guard?;
                let n = match ends.get_ref().0.wait(&mut events, EpollTimeout::ZERO) {
                    Ok(n) => n,
                    Err(e) => return Err(e.into()),
                };
                if n == 0 {
                    guard.clear_ready();
                }
                for ev in &events[..n] {
                    // A socket is the source of one way and the target of
                    // the other: room on it lets that one's pump go on.
                    let (src_of, dst_of) = match ev.data() {
                        0 => (&mut *to_node, &mut *to_peer),
                        _ => (&mut *to_peer, &mut *to_node),
                    };
                    src_of.check().await?;
                    if dst_of.pump.is_some() {
                        dst_of.check().await?;
                    }
                }
            }
            _ = tick.tick() => {
                to_node.count();
                to_peer.count();
            }
        }
    }
    Ok(())
}

/// Connections handed to the kernel in this process (tests check the path).
#[cfg(test)]
pub(super) static HANDED_OVER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A hook that makes the last map insert of the handover of the peer at
/// this address fail after it ran (tests of the take-back).
#[cfg(test)]
#[allow(clippy::type_complexity)]
pub(super) static FAIL_LAST_INSERT: std::sync::Mutex<
    Option<(std::net::SocketAddr, Box<dyn FnOnce() + Send>)>,
> = std::sync::Mutex::new(None);

#[cfg(test)]
mod tests {
    use super::*;

    /// With CAP_NET_ADMIN (the fast path's), the send buffer goes past
    /// `net.core.wmem_max`; the kernel doubles what it is given.
    #[test]
    fn send_buffer_is_forced_past_wmem_max() {
        let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .expect("net.core.wmem_max")
            .trim()
            .parse()
            .unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let size = wmem_max * 2;
        set_send_buffer(&s, size);
        let got = socket2::SockRef::from(&s).send_buffer_size().unwrap();
        if effective_uid() == 0 {
            assert_eq!(got, size * 2, "forced: twice what was asked");
        } else {
            assert_eq!(got, wmem_max * 2, "capped without the capability");
        }
    }

    /// From /proc: the crate's only `unsafe` code is `bpf.rs`.
    fn effective_uid() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    }
}
