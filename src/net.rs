//! Socket primitives shared by every service: binding, the one accept loop,
//! and dialling a list of addresses.
//!
//! Every listener in distproxy runs [`accept_loop`]: it stops on its
//! shutdown token, asks the listener's [`Admission`] whether to take each
//! connection (the hook for connection limits), spawns the handler on the
//! service's task tracker, and logs accept errors rate-limited
//! (an accept error such as `EMFILE` repeats as fast as the loop spins).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::log_safe::Throttle;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// The port a BEAM expects EPMD on.
pub const DEFAULT_EPMD_PORT: u16 = 4369;
/// The distribution port distproxy owns unless configured otherwise.
pub const DEFAULT_DIST_PORT: u16 = 43691;

/// Raises this process's soft limit on open files to its hard limit (Linux;
/// elsewhere nothing changes) and returns the soft limit now in force.
/// Every relayed connection holds two descriptors (the peer's socket and
/// the node's); container runtimes may start processes with a soft limit of
/// 1,024 (containerd 2 does), far below what `dist.max_connections` needs,
/// while the hard limit is much higher.
#[cfg(target_os = "linux")]
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(soft.max(hard))
}

/// See the Linux version: elsewhere the limit is left as it is.
#[cfg(not(target_os = "linux"))]
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    Ok(u64::MAX)
}

/// Descriptors a sidecar may need at once: two per relayed connection, one
/// per EPMD connection, two per egress listener (loopback IPv4 and IPv6),
/// and a margin for the other listeners, the registry's ALIVE2 connections
/// (counted as EPMD connections), logs and the runtime.
pub fn open_files_needed(
    max_dist_connections: usize,
    max_epmd_connections: usize,
    max_egress_listeners: usize,
) -> u64 {
    2 * max_dist_connections as u64
        + max_epmd_connections as u64
        + 2 * max_egress_listeners as u64
        + 64
}

/// Binds a TCP listener; IPv6 sockets are IPv6-only so that `0.0.0.0:P`
/// and `[::]:P` can both be listed.
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The errors of binding an IPv6 socket where the kernel or the network
/// namespace has no IPv6 (`ipv6.disable=1`, or IPv6 turned off).
pub fn host_lacks_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
    )
}

/// Decides, at accept time, whether a connection is taken. What it returns
/// travels with the connection (a permit released when the connection ends).
pub trait Admission: Send + Sync + 'static {
    type Permit: Send + 'static;
    /// `None`: the connection is closed at once (the implementation logs
    /// and counts why). `local` is the address the connection arrived on
    /// (a specific one even under a wildcard listener).
    fn admit(&self, peer: SocketAddr, local: Option<SocketAddr>) -> Option<Self::Permit>;
    /// Cancelled when the connection holding `permit` must end to make
    /// room for a newer one (`None`: never).
    fn evicted(_permit: &Self::Permit) -> Option<CancellationToken> {
        None
    }
}

/// Takes every connection.
pub struct AdmitAll;

impl Admission for AdmitAll {
    type Permit = ();
    fn admit(&self, _peer: SocketAddr, _local: Option<SocketAddr>) -> Option<()> {
        Some(())
    }
}

/// Whether `peer` is inside the pod: loopback, or the listener's own
/// address (as `epmd` decides who may register).
pub fn is_local_peer(peer: IpAddr, local: Option<SocketAddr>) -> bool {
    let peer = peer.to_canonical();
    peer.is_loopback() || local.is_some_and(|l| l.ip().to_canonical() == peer)
}

/// The specific address a TCP listener of this network namespace on `port`
/// is bound to, when it is neither a wildcard nor loopback: a node started
/// with `inet_dist_use_interface` set to the pod's address registers over
/// loopback but listens only there. Read from `/proc/net/tcp` and
/// `/proc/net/tcp6`; `None` when there is no such listener or no procfs.
pub fn bound_listener_address(port: u16) -> Option<IpAddr> {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        listeners_on(&text, port)
            .into_iter()
            .find(|ip| !ip.is_loopback() && !ip.is_unspecified())
    })
}

/// The specific address a node on `port` listens on when nothing listens
/// on that port on loopback or a wildcard address: a node that registered
/// over loopback but cannot be dialled there. (A same-pod mirror listener
/// on the pod's address, next to the node's loopback one, is not such a
/// case.) `None` also when there is no procfs.
pub fn listens_off_loopback_only(port: u16) -> Option<IpAddr> {
    let mut all = Vec::new();
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        // No tcp6 file on a kernel without IPv6.
        if let Ok(text) = std::fs::read_to_string(path) {
            all.extend(listeners_on(&text, port));
        }
    }
    if all.iter().any(|ip| ip.is_loopback() || ip.is_unspecified()) {
        return None;
    }
    all.first().copied()
}

/// The local addresses of the listening sockets on `port` in the text of
/// `/proc/net/tcp` or `/proc/net/tcp6`.
fn listeners_on(text: &str, port: u16) -> Vec<IpAddr> {
    const LISTEN: &str = "0A";
    // The kernel prints each 32-bit word of an address as a host-order
    // number, and the port as a number.
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let address = |hex: &str| -> Option<IpAddr> {
        match hex.len() {
            8 => Some(IpAddr::from(word(hex)?)),
            32 => {
                let mut bytes = [0u8; 16];
                for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                    chunk.copy_from_slice(&word(hex.get(i * 8..i * 8 + 8)?)?);
                }
                Some(IpAddr::from(bytes).to_canonical())
            }
            _ => None,
        }
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let (local, _remote, state) = (fields.next()?, fields.next()?, fields.next()?);
            let (ip, p) = local.split_once(':')?;
            (state == LISTEN && u16::from_str_radix(p, 16).ok()? == port)
                .then(|| address(ip))
                .flatten()
        })
        .collect()
}

/// Whether the connection was redirected to this socket by NAT (a
/// kube-proxy-style Service DNAT): the destination the peer dialled, as
/// conntrack remembers it, is not the socket's local address. False when
/// that cannot be told (no conntrack entry, IPVS, not Linux).
pub fn redirected(stream: &TcpStream) -> bool {
    #[cfg(target_os = "linux")]
    {
        let socket = socket2::SockRef::from(stream);
        let Ok(local) = stream.local_addr() else {
            return false;
        };
        let original = if local.is_ipv4() || local.ip().to_canonical().is_ipv4() {
            socket.original_dst()
        } else {
            socket.original_dst_ipv6()
        };
        match original.ok().and_then(|a| a.as_socket()) {
            Some(dialled) => {
                dialled.ip().to_canonical() != local.ip().to_canonical()
                    || dialled.port() != local.port()
            }
            None => false,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = stream;
        false
    }
}

/// What a per-source cap counts `peer` under: its canonical address (an
/// IPv4-mapped IPv6 address is the IPv4 one), and for IPv6 only its first
/// `ipv6_prefix_len` bits, so that a peer holding a whole prefix (a /64 is
/// the usual smallest allocation) can be counted as one source.
pub fn source_key(peer: IpAddr, ipv6_prefix_len: u8) -> IpAddr {
    match peer.to_canonical() {
        IpAddr::V6(v6) if ipv6_prefix_len < 128 => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(ipv6_prefix_len))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
        ip => ip,
    }
}

/// Caps on connections open at once: `max` in all, `per_source` from one
/// address, and `reserved` more usable only by local peers once `max` is
/// reached (so a flood from outside never keeps a local node from
/// registering or a lookup from being answered). Every listener holding a
/// clone shares the counts (`dist.max_connections` covers inbound and
/// egress connections).
#[derive(Clone)]
pub struct ConnectionLimit {
    listener: &'static str,
    permits: Arc<Semaphore>,
    reserved: Arc<Semaphore>,
    max: usize,
    per_source: usize,
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// IPv6 sources count by this prefix ([`source_key`]).
    ipv6_prefix_len: u8,
    /// With [`ConnectionLimit::evicting`]: connections still being set up,
    /// whose places a new connection may take when the limit is full.
    pending: Option<Arc<PendingQueue>>,
    /// Refusals are counted one by one but logged rate-limited:
    /// a peer opening connections in a loop must not make a log line of
    /// each.
    refusals: Arc<Throttle>,
}

/// A connection's place under a [`ConnectionLimit`]; dropping it frees it.
///
/// Under a limit that [evicts](ConnectionLimit::evicting), the place is
/// held by the limit's queue of connections still being set up until the
/// connection [claims](ConnPermit::claim) it: until then, a new connection
/// that finds the limit full may take it (the oldest first), and the
/// connection is ended ([`Admission::evicted`]).
pub struct ConnPermit {
    held: Option<Held>,
    pending: Option<PendingTicket>,
}

/// The semaphore permit and per-source slot behind a [`ConnPermit`].
struct Held {
    _permit: OwnedSemaphorePermit,
    _source: Option<SourceSlot>,
}

impl ConnPermit {
    /// The connection is set up (about to be relayed): its place can no
    /// longer be taken by a newer connection. False if it was taken
    /// already (the connection is being ended).
    pub fn claim(&mut self) -> bool {
        match self.pending.take() {
            None => self.held.is_some(),
            Some(ticket) => {
                self.held = ticket.queue.take(ticket.id);
                self.held.is_some()
            }
        }
    }
}

/// Connections of an evicting limit still being set up, oldest first, with
/// their places.
#[derive(Default)]
struct Pending {
    next_id: u64,
    queue: std::collections::VecDeque<PendingEntry>,
    /// Entries of the queue per source, and whether that source is local.
    by_source: HashMap<IpAddr, (usize, bool)>,
}

struct PendingEntry {
    id: u64,
    held: Held,
    evicted: CancellationToken,
    /// Its peer is inside the pod.
    local: bool,
    /// Its source ([`source_key`]).
    source: IpAddr,
}

impl Pending {
    fn remove(&mut self, at: usize) -> Option<PendingEntry> {
        let entry = self.queue.remove(at)?;
        if let Some((n, _)) = self.by_source.get_mut(&entry.source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&entry.source);
            }
        }
        Some(entry)
    }
}

#[derive(Default)]
struct PendingQueue(Mutex<Pending>);

impl PendingQueue {
    fn push(self: &Arc<Self>, held: Held, local: bool, source: IpAddr) -> PendingTicket {
        let mut p = lock(&self.0);
        p.next_id += 1;
        let id = p.next_id;
        let evicted = CancellationToken::new();
        p.queue.push_back(PendingEntry {
            id,
            held,
            evicted: evicted.clone(),
            local,
            source,
        });
        p.by_source.entry(source).or_insert((0, local)).0 += 1;
        PendingTicket {
            queue: Arc::clone(self),
            id,
            evicted,
        }
    }

    fn take(&self, id: u64) -> Option<Held> {
        let mut p = lock(&self.0);
        let at = p.queue.iter().position(|e| e.id == id)?;
        p.remove(at).map(|e| e.held)
    }

    /// Ends a connection still being set up and frees its place; false if
    /// there is none. The one ended is the oldest of the source holding
    /// the most such places: stalled connections from a few addresses
    /// take each other's places, not that of a peer with one connection
    /// setting up (a node's, which a storm of newer connections would
    /// otherwise end before it is routed). For a remote newcomer
    /// (`for_local` false) only remote peers' connections are candidates:
    /// a local peer's place (perhaps from the reserve, which a remote peer
    /// cannot use) is never taken from outside the pod.
    fn evict_oldest(&self, for_local: bool) -> bool {
        let oldest = {
            let mut p = lock(&self.0);
            let most = p
                .by_source
                .values()
                .filter(|(_, local)| for_local || !local)
                .map(|(n, _)| *n)
                .max();
            let at = most.and_then(|most| {
                p.queue.iter().position(|e| {
                    (for_local || !e.local) && p.by_source.get(&e.source).map(|s| s.0) == Some(most)
                })
            });
            at.and_then(|at| p.remove(at))
        };
        match oldest {
            Some(entry) => {
                entry.evicted.cancel();
                drop(entry.held);
                true
            }
            None => false,
        }
    }
}

/// A place held by a [`PendingQueue`]; dropping it frees the place.
struct PendingTicket {
    queue: Arc<PendingQueue>,
    id: u64,
    evicted: CancellationToken,
}

impl Drop for PendingTicket {
    fn drop(&mut self) {
        drop(self.queue.take(self.id));
    }
}

struct SourceSlot {
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut sources = lock(&self.sources);
        if let Some(n) = sources.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                sources.remove(&self.ip);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why [`ConnectionLimit::acquire`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitRefused {
    #[error("connection limit reached")]
    Total,
    #[error("per-source connection limit reached")]
    PerSource,
}

impl LimitRefused {
    /// The `limit` label of `distproxy_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            LimitRefused::Total => "total",
            LimitRefused::PerSource => "per_source",
        }
    }
}

impl ConnectionLimit {
    /// A global cap only (no per-source cap, no reserved room).
    pub fn new(max: usize) -> ConnectionLimit {
        ConnectionLimit::with("distribution", max, max, 0)
    }

    /// `listener` names the listener in logs and metrics.
    pub fn with(
        listener: &'static str,
        max: usize,
        per_source: usize,
        reserved: usize,
    ) -> ConnectionLimit {
        ConnectionLimit {
            listener,
            permits: Arc::new(Semaphore::new(max)),
            reserved: Arc::new(Semaphore::new(reserved)),
            max,
            per_source,
            sources: Arc::default(),
            ipv6_prefix_len: 128,
            pending: None,
            refusals: Arc::new(Throttle::new()),
        }
    }

    /// This limit, making room when it is full by ending the oldest
    /// connection not yet set up ([`ConnPermit::claim`]) of the source
    /// holding the most such connections, for the new one:
    /// peers that open connections and stall them (from as many addresses
    /// as it takes to pass the per-source cap) cannot keep out a peer whose
    /// connection sets up at once. Connections that claimed their place are
    /// never ended for room, and a local peer's connection never for a
    /// remote peer's.
    pub fn evicting(mut self) -> ConnectionLimit {
        self.pending = Some(Arc::default());
        self
    }

    /// This limit, counting IPv6 sources by their first `prefix_len` bits
    /// (`limits.ipv6_source_prefix_len`; 128, every address on its own, by
    /// default).
    pub fn grouping_ipv6(mut self, prefix_len: u8) -> ConnectionLimit {
        self.ipv6_prefix_len = prefix_len.min(128);
        self
    }

    /// A permit for a connection from `peer` (`local`: inside the pod).
    ///
    /// Local peers are not capped per source: every node of the pod holds
    /// its registration connection from loopback (OTP's `epmd` caps nothing
    /// per source), so the cap would stop the pod's node beyond it from
    /// registering and every local lookup once that many nodes live. They
    /// are bounded by the total and the reserve.
    pub fn acquire(&self, peer: IpAddr, local: bool) -> Result<ConnPermit, LimitRefused> {
        let ip = source_key(peer, self.ipv6_prefix_len);
        let mut sources = lock(&self.sources);
        let held = sources.get(&ip).copied().unwrap_or(0);
        if held >= self.per_source && !local {
            return Err(LimitRefused::PerSource);
        }
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) if local => Arc::clone(&self.reserved)
                .try_acquire_owned()
                .map_err(|_| LimitRefused::Total)?,
            Err(_) => return Err(LimitRefused::Total),
        };
        sources.insert(ip, held + 1);
        let held = Held {
            _permit: permit,
            _source: Some(SourceSlot {
                sources: Arc::clone(&self.sources),
                ip,
            }),
        };
        Ok(match &self.pending {
            Some(queue) => ConnPermit {
                held: None,
                pending: Some(queue.push(held, local, ip)),
            },
            None => ConnPermit {
                held: Some(held),
                pending: None,
            },
        })
    }

    /// A permit counted against the total only (a local node's connection
    /// on an egress listener, whose source is always loopback).
    /// Under an evicting limit that is full, the oldest connection not
    /// yet set up is ended to make room.
    pub fn try_acquire(&self) -> Option<ConnPermit> {
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) if self.make_room(None, true) => {
                Arc::clone(&self.permits).try_acquire_owned().ok()?
            }
            Err(_) => return None,
        };
        Some(ConnPermit {
            held: Some(Held {
                _permit: permit,
                _source: None,
            }),
            pending: None,
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn per_source(&self) -> usize {
        self.per_source
    }

    /// Under an evicting limit, ends the oldest connection not yet set up
    /// (counted, and logged at warn level with the refusals' rate limit:
    /// a full limit means a flood or a limit too low) so that `for_peer`
    /// can take its place; false when there is none. A remote peer
    /// (`local` false) only ends remote peers' connections.
    fn make_room(&self, for_peer: Option<SocketAddr>, local: bool) -> bool {
        if !self.pending.as_ref().is_some_and(|q| q.evict_oldest(local)) {
            return false;
        }
        if let Some(skipped) = self.refusals.allow() {
            warn!(peer = ?for_peer, listener = self.listener, limit = self.max, skipped,
                "connection limit reached; ended the oldest connection not yet set up to make room \
                 (rate-limited with the refusals; `skipped`: lines not logged since the previous one)");
        }
        self.count_refused(EVICTED);
        true
    }

    /// Counts a connection closed by this limit (`limit` label); on the
    /// distribution port also as closed `over_limit`.
    fn count_refused(&self, limit: &'static str) {
        metrics::counter!(crate::metrics::CONNECTIONS_REFUSED,
            "listener" => self.listener, "limit" => limit)
        .increment(1);
        if self.listener == "distribution" {
            crate::metrics::record_closed(crate::metrics::reason::OVER_LIMIT);
        }
    }

    /// Logs (rate-limited) and counts a connection from `peer`
    /// closed at accept because of `why`.
    pub fn refused(&self, peer: SocketAddr, why: LimitRefused) {
        if let Some(skipped) = self.refusals.allow() {
            warn!(%peer, listener = self.listener, limit = self.max,
                per_source = self.per_source, skipped,
                "{why}; closing (rate-limited; `skipped`: refusals not logged since the previous line)");
        }
        self.count_refused(why.label());
    }
}

impl Admission for ConnectionLimit {
    type Permit = ConnPermit;
    fn admit(&self, peer: SocketAddr, local: Option<SocketAddr>) -> Option<ConnPermit> {
        let local = is_local_peer(peer.ip(), local);
        let refused = match self.acquire(peer.ip(), local) {
            Ok(p) => return Some(p),
            Err(LimitRefused::Total) if self.make_room(Some(peer), local) => {
                match self.acquire(peer.ip(), local) {
                    Ok(p) => return Some(p),
                    Err(why) => why,
                }
            }
            Err(why) => why,
        };
        self.refused(peer, refused);
        None
    }

    fn evicted(permit: &ConnPermit) -> Option<CancellationToken> {
        permit.pending.as_ref().map(|t| t.evicted.clone())
    }
}

/// The `limit` label of `distproxy_connections_refused_total` for a
/// connection ended to make room for a newer one
/// ([`ConnectionLimit::evicting`]).
pub const EVICTED: &str = "evicted";

/// Admits against a [`ConnectionLimit`]'s total only: for listeners whose
/// every peer is the same local address (egress listeners, where the local
/// nodes connect from loopback).
pub struct TotalOnly(pub ConnectionLimit);

impl Admission for TotalOnly {
    type Permit = ConnPermit;
    fn admit(&self, peer: SocketAddr, _local: Option<SocketAddr>) -> Option<ConnPermit> {
        let permit = self.0.try_acquire();
        if permit.is_none() {
            crate::warn_throttled!(%peer, listener = "egress", limit = self.0.max, "connection limit reached; closing");
            metrics::counter!(crate::metrics::CONNECTIONS_REFUSED,
                "listener" => "egress", "limit" => LimitRefused::Total.label())
            .increment(1);
            crate::metrics::record_closed(crate::metrics::reason::OVER_LIMIT);
        }
        permit
    }
}

/// Why a write to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{what} not written within {} ms (peer not reading)", .timeout.as_millis())]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("failed to write {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Writes `bytes` and shuts the write side down, within `timeout` in all:
/// a peer that does not read cannot hold the connection (or its buffer).
pub async fn write_all_within<W: AsyncWrite + Unpin>(
    stream: &mut W,
    bytes: &[u8],
    timeout: Duration,
    what: &'static str,
) -> Result<(), WriteError> {
    let write = async {
        stream.write_all(bytes).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(timeout, write).await {
        Err(_) => Err(WriteError::Timeout { what, timeout }),
        Ok(Err(source)) => Err(WriteError::Io { what, source }),
        Ok(Ok(())) => Ok(()),
    }
}

/// Keepalive and `TCP_USER_TIMEOUT` for relayed connections (`[tcp]`), so
/// a peer that vanished without FIN or RST is noticed in bounded time.
/// Built from the configuration by `TcpConfig::tuning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpTuning {
    /// `None`: keepalive off.
    pub keepalive_idle: Option<Duration>,
    pub keepalive_interval: Duration,
    pub keepalive_count: u32,
    /// `None`: the kernel default.
    pub user_timeout: Option<Duration>,
}

impl TcpTuning {
    /// Applies the settings; a failure is logged, never fatal.
    pub fn apply(&self, stream: &TcpStream) {
        let sock = socket2::SockRef::from(stream);
        if let Some(idle) = self.keepalive_idle {
            let ka = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(self.keepalive_interval)
                .with_retries(self.keepalive_count);
            if let Err(e) = sock.set_tcp_keepalive(&ka) {
                debug!(error = %e, "cannot set TCP keepalive");
            }
        }
        if let Some(t) = self.user_timeout {
            if let Err(e) = sock.set_tcp_user_timeout(Some(t)) {
                debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
            }
        }
    }
}

/// When an accept loop and its connections stop.
#[derive(Clone, Default)]
pub struct Stop {
    /// Stops accepting.
    pub accepting: CancellationToken,
    /// Ends every connection task the loop spawned, wherever it waits (the
    /// grace period is over).
    pub connections: CancellationToken,
}

/// How long a connection task may take to end by itself once the hard stop
/// fired (a relay logs its end and closes its legs) before it is dropped.
const HARD_STOP_LINGER: Duration = Duration::from_millis(200);

/// Accepts connections until `stop.accepting`, spawning `handler(stream,
/// peer, permit)` on `tracker` for each one `admission` takes; each
/// handler is dropped at the latest [`HARD_STOP_LINGER`] after
/// `stop.connections` is cancelled, so the hard stop reaches every task
/// (relays, which watch it, end themselves first and log their end). Accept errors are logged (rate-limited) and
/// the loop goes on after a short pause.
pub async fn accept_loop<A, H, F>(
    what: &'static str,
    listener: TcpListener,
    stop: Stop,
    tracker: TaskTracker,
    admission: A,
    handler: H,
) where
    A: Admission,
    H: Fn(TcpStream, SocketAddr, A::Permit) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    let errors = Throttle::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.accepting.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                // The address the connection arrived on, not the
                // listener's (a wildcard): a peer at the pod's own address
                // is inside the pod, as the handlers judge it too.
                let arrived_on = stream.local_addr().ok().or(local);
                let Some(permit) = admission.admit(peer, arrived_on) else {
                    continue;
                };
                let evicted = A::evicted(&permit);
                let task = handler(stream, peer, permit);
                let hard_stop = stop.connections.clone();
                tracker.spawn(async move {
                    let evicted = async {
                        match evicted {
                            Some(token) => token.cancelled().await,
                            None => std::future::pending().await,
                        }
                    };
                    let mut task = std::pin::pin!(task);
                    tokio::select! {
                        // The task first: a relay that sees the hard stop
                        // itself ends with its line (`stopped at shutdown`);
                        // dropped in a race with it, it ended unlogged.
                        biased;
                        _ = &mut task => {}
                        _ = evicted => {}
                        _ = hard_stop.cancelled() => {
                            // A task that watches the hard stop finishes
                            // within this; one waiting elsewhere (a stalled
                            // handshake) is dropped after it.
                            let _ = tokio::time::timeout(HARD_STOP_LINGER, task).await;
                        }
                    }
                });
            }
            Err(e) => {
                metrics::counter!(crate::metrics::ACCEPT_FAILURES, "listener" => what).increment(1);
                if let Some(skipped) = errors.allow() {
                    warn!(listener = ?local, error = %e, skipped, "{what} accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Why no connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("timed out connecting to {port} on {addrs:?}")]
    Timeout { addrs: Vec<IpAddr>, port: u16 },
    #[error("failed to connect to {addr}: {source}")]
    Failed {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Connects to `port` on each address in turn, within `deadline` in all.
///
/// Each attempt gets an equal share of what is left of the deadline, so an
/// address that drops the SYN (IPv4 filtered between dual-stack pods, say)
/// cannot use it all up before the next address (the other family) is
/// tried; an address that refuses at once leaves its share to the others.
pub async fn connect_any(
    addrs: &[IpAddr],
    port: u16,
    deadline: Duration,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let end = tokio::time::Instant::now() + deadline;
    let timed_out = || ConnectError::Timeout {
        addrs: addrs.to_vec(),
        port,
    };
    let mut last = None;
    for (i, &ip) in addrs.iter().enumerate() {
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        let share = left / (addrs.len() - i) as u32;
        let addr = SocketAddr::new(ip, port);
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok((s, addr)),
            Ok(Err(source)) => {
                debug!(%addr, error = %source, "connect attempt failed");
                last = Some(ConnectError::Failed { addr, source });
            }
            Err(_) => {
                debug!(%addr, timeout_ms = share.as_millis() as u64, "connect attempt timed out");
                last = Some(timed_out());
            }
        }
    }
    Err(last.unwrap_or_else(timed_out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_read_from_proc_net_tcp() {
        // As this (little-endian) kernel prints them: 198.18.0.11:39109 and
        // 127.0.0.1:45353 listening, an established connection from
        // 198.18.0.11:39109, and [fd00:d157::b]:39109 listening.
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0B0012C6:98C5 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:B129 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0B0012C6:98C5 0C0012C6:D82E 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
";
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 57D100FD00000000000000000B000000:98C5 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1 0 100 0 0 10 0
";
        if cfg!(target_endian = "little") {
            assert_eq!(
                listeners_on(tcp, 39109),
                vec!["198.18.0.11".parse::<IpAddr>().unwrap()]
            );
            assert_eq!(
                listeners_on(tcp, 45353),
                vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
            );
            assert_eq!(
                listeners_on(tcp6, 39109),
                vec!["fd00:d157::b".parse::<IpAddr>().unwrap()]
            );
        }
        assert!(listeners_on(tcp, 1).is_empty());
        // And as the running kernel prints a real listener.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
        assert_eq!(
            listeners_on(&text, port),
            vec![IpAddr::from([127, 0, 0, 1])]
        );
        assert_eq!(
            bound_listener_address(port),
            None,
            "loopback is not a specific address"
        );
        assert!(listeners_on("garbage\n 0: zz:zz 0 0A", 1).is_empty());
    }

    #[test]
    fn open_files_needed_counts_two_per_relayed_connection() {
        assert_eq!(open_files_needed(4096, 1024, 0), 8192 + 1024 + 64);
        assert_eq!(
            open_files_needed(4096, 1024, 1024),
            8192 + 1024 + 2048 + 64,
            "egress listeners are two sockets each"
        );
    }

    #[tokio::test]
    async fn connect_any_tries_every_address_and_reports_the_last_failure() {
        let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = open.local_addr().unwrap().port();
        // 127.0.0.2 is loopback on Linux but nothing listens there on `port`.
        let addrs: Vec<IpAddr> = vec!["127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let (_s, addr) = connect_any(&addrs, port, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], port)));
        drop(open);
        let err = connect_any(&addrs[..1], port, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Failed { .. }), "{err}");
        let err = connect_any(&[], port, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn the_limit_refuses_beyond_its_maximum_and_frees_on_drop() {
        let limit = ConnectionLimit::new(1);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let first = limit.admit(peer, None).expect("first admitted");
        assert!(limit.admit(peer, None).is_none());
        drop(first);
        assert!(limit.admit(peer, None).is_some());
    }

    /// By default every IPv6 address is a source of its own, so a peer
    /// holding a /64 gets the per-source share once per address; grouped
    /// by /64 (`limits.ipv6_source_prefix_len = 64`), the whole prefix
    /// shares one, while another /64 and IPv4 peers keep theirs.
    #[test]
    fn ipv6_sources_are_counted_by_the_configured_prefix() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a1, a2) = (ip("fd00:d157::b:1"), ip("fd00:d157::b:2"));
        let other = ip("fd00:d157:0:1::5");
        let per_address = ConnectionLimit::with("test", 100, 2, 0);
        let _held: Vec<_> = [a1, a1, a2, a2]
            .into_iter()
            .map(|p| per_address.acquire(p, false).expect("own share"))
            .collect();
        let grouped = ConnectionLimit::with("test", 100, 2, 0).grouping_ipv6(64);
        let _g1 = grouped.acquire(a1, false).expect("first of the /64");
        let _g2 = grouped.acquire(a2, false).expect("second of the /64");
        assert_eq!(
            grouped.acquire(ip("fd00:d157::ffff:9"), false).err(),
            Some(LimitRefused::PerSource),
            "a third address of the same /64"
        );
        let _o = grouped.acquire(other, false).expect("another /64");
        let _v4 = grouped.acquire(ip("198.18.0.9"), false).expect("IPv4");
        let _m = grouped
            .acquire(ip("::ffff:198.18.0.9"), false)
            .expect("IPv4-mapped is the IPv4 source");
        assert_eq!(
            grouped.acquire(ip("198.18.0.9"), false).err(),
            Some(LimitRefused::PerSource),
            "the mapped form counted with the IPv4 address"
        );
        assert_eq!(source_key(a2, 64), ip("fd00:d157::"));
        assert_eq!(source_key(a2, 128), a2);
        assert_eq!(source_key(ip("fd00:d157::b:2"), 112), ip("fd00:d157::b:0"));
        assert_eq!(source_key(ip("10.1.2.3"), 64), ip("10.1.2.3"));
    }

    #[test]
    fn one_source_cannot_take_every_slot_and_local_peers_have_reserved_room() {
        let limit = ConnectionLimit::with("test", 4, 2, 1);
        let own: SocketAddr = "10.0.0.9:4369".parse().unwrap();
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1000".parse().unwrap();
        let c: SocketAddr = "10.0.0.3:1000".parse().unwrap();
        let a1 = limit.admit(a, Some(own)).expect("a 1");
        let a2 = limit.admit(a, Some(own)).expect("a 2");
        assert_eq!(
            limit.acquire(a.ip(), false).err(),
            Some(LimitRefused::PerSource)
        );
        let _b1 = limit.admit(b, Some(own)).expect("b 1 (a is at its share)");
        let _c1 = limit.admit(c, Some(own)).expect("c 1");
        // The total is reached: another source is refused...
        assert_eq!(
            limit.acquire(b.ip(), false).err(),
            Some(LimitRefused::Total)
        );
        // ...but a local peer (loopback, or the listener's own address) gets
        // the reserved room, once.
        let lo: SocketAddr = "127.0.0.1:5".parse().unwrap();
        let own_peer: SocketAddr = "10.0.0.9:6".parse().unwrap();
        let l1 = limit
            .admit(lo, Some(own))
            .expect("loopback uses the reserve");
        assert!(
            limit.admit(own_peer, Some(own)).is_none(),
            "reserve used up"
        );
        drop(l1);
        assert!(
            limit.admit(own_peer, Some(own)).is_some(),
            "own address is local"
        );
        // Local peers have no per-source share: the pod's nodes all come
        // from loopback.
        let wide = ConnectionLimit::with("test", 10, 2, 0);
        let many: Vec<_> = (0..5)
            .map(|i| {
                wide.admit(lo, Some(own))
                    .unwrap_or_else(|| panic!("loopback {i}"))
            })
            .collect();
        assert_eq!(many.len(), 5);
        assert_eq!(
            wide.acquire(a.ip(), false).map(|_| ()).err(),
            None,
            "a remote source keeps its own share"
        );
        // Dropping a permit frees both the total and the source's share.
        drop(a1);
        drop(a2);
        let _a3 = limit.admit(a, Some(own)).expect("a again");
        assert_eq!(lock(&limit.sources).get(&a.ip()).copied(), Some(1));
    }

    #[test]
    fn a_full_evicting_limit_ends_the_oldest_unclaimed_connection_for_a_new_one() {
        let limit = ConnectionLimit::with("test", 2, 2, 0).evicting();
        let own: SocketAddr = "10.0.0.9:43691".parse().unwrap();
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1000".parse().unwrap();
        let c: SocketAddr = "10.0.0.3:1000".parse().unwrap();
        let first = limit.admit(a, Some(own)).expect("a");
        let mut second = limit.admit(b, Some(own)).expect("b");
        let (first_evicted, second_evicted) = (
            ConnectionLimit::evicted(&first).expect("evictable"),
            ConnectionLimit::evicted(&second).expect("evictable"),
        );
        // Full: c takes the place of the oldest, a.
        let mut third = limit.admit(c, Some(own)).expect("c takes a's place");
        assert!(first_evicted.is_cancelled());
        assert!(!second_evicted.is_cancelled());
        assert_eq!(lock(&limit.sources).get(&a.ip()), None, "a's slot freed");
        // Claimed places are never taken: with both claimed, a newcomer is
        // refused.
        assert!(second.claim() && third.claim());
        assert!(limit.admit(a, Some(own)).is_none());
        assert!(!second_evicted.is_cancelled());
        // An ended connection's permit frees nothing twice.
        drop(first);
        assert!(limit.admit(a, Some(own)).is_none());
        drop(third);
        assert!(limit.admit(a, Some(own)).is_some());
    }

    /// When the limit is full, a newcomer takes a place of the source
    /// holding the most connections still being set up, not the oldest
    /// connection overall: a node's connection, alone from its address,
    /// outlives a storm of stalled ones from fewer addresses than places,
    /// however many arrive after it.
    #[test]
    fn a_newcomer_takes_a_place_of_the_source_holding_the_most() {
        let limit = ConnectionLimit::with("test", 4, 4, 0).evicting();
        let node: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let storm: SocketAddr = "10.0.0.2:1000".parse().unwrap();
        let node_conn = limit.admit(node, None).expect("the node's");
        let node_evicted = ConnectionLimit::evicted(&node_conn).unwrap();
        let stalled: Vec<_> = (0..3)
            .map(|_| limit.admit(storm, None).expect("within the per-source cap"))
            .collect();
        let tokens: Vec<_> = stalled
            .iter()
            .map(|p| ConnectionLimit::evicted(p).unwrap())
            .collect();
        let mut newer = Vec::new();
        // The storm goes on from its address and a second one.
        for i in 0..40u8 {
            let from = SocketAddr::from(([10, 0, 0, 2 + i % 2], 1000));
            newer.push(limit.admit(from, None).expect("a place made"));
            assert!(
                !node_evicted.is_cancelled(),
                "newcomer {i} ended the node's connection"
            );
        }
        assert!(
            tokens.iter().all(|t| t.is_cancelled()),
            "the storm's places went first"
        );
    }

    /// A storm from outside ends the oldest remote connections still being
    /// set up, never a local one: a local lookup or registration that has
    /// not sent its request yet (perhaps on the reserve, which the remote
    /// newcomer could not use anyway) was ended, and the newcomer refused.
    #[test]
    fn a_remote_newcomer_never_takes_a_local_peers_place() {
        let limit = ConnectionLimit::with("test", 1, 1, 1).evicting();
        let own: SocketAddr = "10.0.0.200:4369".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let remote = |i: u8| SocketAddr::from(([10, 0, 0, i], 1000));
        let first = limit.admit(remote(1), Some(own)).expect("first remote");
        let first_evicted = ConnectionLimit::evicted(&first).unwrap();
        let lookup = limit.admit(local, Some(own)).expect("the reserve");
        let lookup_evicted = ConnectionLimit::evicted(&lookup).unwrap();
        let mut storm = Vec::new();
        for i in 2..10 {
            let permit = limit.admit(remote(i), Some(own));
            assert!(permit.is_some(), "remote {i} takes the oldest remote place");
            storm.push(permit);
            assert!(first_evicted.is_cancelled());
            assert!(
                !lookup_evicted.is_cancelled(),
                "remote {i} ended the local lookup"
            );
        }
        // Another local peer may still take the local one's place.
        let _second = limit.admit(local, Some(own)).expect("a local newcomer");
        assert!(lookup_evicted.is_cancelled());
    }

    #[test]
    fn a_local_nodes_connection_takes_the_place_of_one_not_yet_set_up() {
        // Egress and same-pod mirror connections (`try_acquire`) come
        // from the pod's nodes: a flood of stalled connections from outside
        // must not keep them out either.
        let limit = ConnectionLimit::with("test", 1, 1, 0).evicting();
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let stalled = limit.admit(a, None).expect("a");
        let token = ConnectionLimit::evicted(&stalled).expect("evictable");
        let mut egress = limit.try_acquire().expect("a place made for the node");
        assert!(token.is_cancelled());
        assert!(egress.claim());
        assert!(limit.try_acquire().is_none(), "claimed places stay");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_to_a_peer_that_does_not_read_ends_at_its_deadline() {
        let (mut ours, theirs) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        let err = write_all_within(&mut ours, &[0u8; 4096], Duration::from_secs(5), "reply")
            .await
            .unwrap_err();
        let took = start.elapsed();
        assert!(matches!(err, WriteError::Timeout { .. }), "{err}");
        assert!(took >= Duration::from_secs(5), "closed early: {took:?}");
        assert!(took < Duration::from_millis(5_100), "closed late: {took:?}");
        drop(theirs);
        // A reader that reads gets everything.
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut v = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut theirs, &mut v)
                .await
                .unwrap();
            v.len()
        });
        write_all_within(&mut ours, &[1u8; 4096], Duration::from_secs(5), "reply")
            .await
            .unwrap();
        drop(ours);
        assert_eq!(reader.await.unwrap(), 4096);
    }

    #[tokio::test]
    async fn tuning_sets_keepalive_and_user_timeout_on_the_socket() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        TcpTuning {
            keepalive_idle: Some(Duration::from_secs(10)),
            keepalive_interval: Duration::from_secs(5),
            keepalive_count: 3,
            user_timeout: Some(Duration::from_secs(30)),
        }
        .apply(&s);
        let sock = socket2::SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(10));
        assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(5));
        assert_eq!(sock.keepalive_retries().unwrap(), 3);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(30))
        );
    }
}
