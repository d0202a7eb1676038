//! Opaque byte relaying between two sockets.
//!
//! Two paths, chosen by [`relay`] from the stream types:
//!
//! - Two plaintext [`TcpStream`]s on Linux: bulk bytes go through a pipe
//!   with `splice(2)` and never enter user space; small messages are copied
//!   through a small buffer, which is cheaper for them; no buffer grows
//!   (see [`splice`](self::splice) for pipes, readiness, fallbacks).
//! - Anything else (TLS): each direction reads into a buffer that starts
//!   small, doubles on full reads up to [`MAX_BUF`] (bulk transfers get
//!   large reads) and falls back to [`INITIAL_BUF`] after a small read (a
//!   burst does not leave a large buffer behind).
//!
//! On both paths a direction holds a buffer only while bytes are in
//! flight: it is taken from a per-thread pool when a read is polled and
//! given back when the read is pending ([`pool`](self::pool)). An idle
//! relayed connection costs its two sockets and its task, no buffer and no
//! pipe; `benches/hold.rs` measures it at 10,000 connections.
//!
//! On both paths EOF in one direction is propagated as a write shutdown
//! (half-close) while the other direction keeps flowing; an error in either
//! direction ends both; bytes are counted once written. TCP_NODELAY is the
//! callers' duty (they set it on every leg when connecting or accepting);
//! the relay sets it again on TCP streams, as a relay that forgets it adds
//! 40 ms Nagle stalls to every small message.

use std::any::Any;
use std::io;
use std::time::Duration;

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

mod pool;
use crate::metrics as m;

// The raw system calls of the kernel fast path: the crate's only unsafe code.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod bpf;
#[cfg(target_os = "linux")]
mod btf;
#[cfg(target_os = "linux")]
pub mod node_routes;
/// Node routes need the kernel fast path (Linux only).
#[cfg(not(target_os = "linux"))]
pub mod node_routes {
    /// Never built off Linux.
    #[derive(Debug)]
    pub enum NodeRoutes {}
    impl NodeRoutes {
        pub fn add_relay_port(&self, _port: u16) -> std::io::Result<()> {
            match *self {}
        }
        pub fn remove_relay_port(&self, _port: u16) {
            match *self {}
        }
    }
}
#[cfg(target_os = "linux")]
pub mod sockmap;
#[cfg(target_os = "linux")]
mod splice;

#[cfg(target_os = "linux")]
pub use sockmap::FastPath;
/// The kernel fast path (Linux only).
#[cfg(not(target_os = "linux"))]
#[derive(Debug)]
pub enum FastPath {}

pub const INITIAL_BUF: usize = 4 * 1024;
pub const MAX_BUF: usize = 256 * 1024;
/// The splice path's reads: messages up to this size are copied, not
/// spliced (see [`splice`](self::splice)).
const SMALL_READ: usize = 2 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// From the remote peer to the local node.
    pub rx: u64,
    /// From the local node to the remote peer.
    pub tx: u64,
}

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions reached EOF.
    Closed(RelayStats),
    /// An I/O error in one direction.
    Failed(RelayStats, io::Error),
    /// The hard-stop token fired (shutdown grace expired).
    Stopped(RelayStats),
}

impl std::fmt::Display for RelayEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayEnd::Closed(_) => f.write_str("closed"),
            RelayEnd::Failed(_, e) => write!(f, "error: {e}"),
            RelayEnd::Stopped(_) => f.write_str("stopped at shutdown"),
        }
    }
}

impl RelayEnd {
    pub fn stats(&self) -> RelayStats {
        match self {
            RelayEnd::Closed(s) | RelayEnd::Failed(s, _) | RelayEnd::Stopped(s) => *s,
        }
    }
}

/// Copies `r` to `w` until EOF, then shuts `w` down for writing. A write
/// blocked while `source_closed` says `r`'s peer has gone fails after
/// `watch`'s linger.
async fn copy_one_way<R, W, C>(
    mut r: R,
    mut w: W,
    counted: &Counter,
    total: &mut u64,
    mut watch: Watch,
    source_closed: C,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    C: Fn() -> bool,
{
    let mut buf = pool::Slot::default();
    let mut len = INITIAL_BUF;
    loop {
        let n = buf.read(&mut r, len).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        // The flush is a no-op on TCP; on TLS it sends records a write left
        // buffered (tokio-rustls returns once the plaintext is taken, even
        // if the socket would block), which would otherwise wait for the
        // next read.
        let written = async {
            w.write_all(buf.filled(n)).await?;
            w.flush().await
        };
        watch.write(written, &source_closed).await?;
        *total += n as u64;
        counted.increment(n as u64);
        len = next_buf_len(buf.len(), n);
        if len != buf.len() {
            // The next read takes a buffer of the new size.
            buf.release();
        }
    }
}

/// How often a blocked write looks whether its source has closed.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// One direction's view of the half-close timeout while its writes are
/// blocked. A direction whose destination takes nothing (a stopped node,
/// a full window) reads nothing from its source meanwhile, so its source's
/// close would go unseen and [`both_ways`] would never start the timeout.
/// A blocked write therefore looks at its source's readiness every
/// [`WATCH_INTERVAL`]; once the source has closed, a destination
/// (`still_open`) that takes nothing for `linger` ends the relay, as one
/// that kept its side open after a half-close would. A destination that is
/// slow but takes bytes is never cut: each write that completes starts the
/// watch afresh.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Watch {
    linger: Option<Duration>,
    still_open: StillOpen,
    /// When the source was first seen closed during the current blocked
    /// write.
    closed_since: Option<tokio::time::Instant>,
}

impl Watch {
    pub(crate) fn new(linger: Option<Duration>, still_open: StillOpen) -> Watch {
        Watch {
            linger,
            still_open,
            closed_since: None,
        }
    }

    /// Never gives up (no half-close timeout).
    #[cfg(test)]
    pub(crate) fn off() -> Watch {
        Watch::new(None, StillOpen::Node)
    }

    /// Runs `write` to its end; while it is blocked, checks
    /// `source_closed` now and then, and fails once the source has been
    /// closed for the linger without the write completing.
    pub(crate) async fn write<T, F, C>(&mut self, write: F, source_closed: C) -> io::Result<T>
    where
        F: std::future::Future<Output = io::Result<T>>,
        C: Fn() -> bool,
    {
        use futures_util::FutureExt;
        let Some(linger) = self.linger else {
            return write.await;
        };
        // The destination took bytes since the last blocked write.
        self.closed_since = None;
        tokio::pin!(write);
        // The common case: the destination takes the bytes at once, and no
        // timer is set.
        if let Some(done) = (&mut write).now_or_never() {
            return done;
        }
        loop {
            let now = tokio::time::Instant::now();
            let wait = match self.closed_since {
                Some(since) if now >= since + linger => {
                    return Err(half_close_expired(self.still_open, linger));
                }
                Some(since) => since + linger - now,
                None => WATCH_INTERVAL,
            };
            tokio::select! {
                biased;
                done = &mut write => return done,
                () = tokio::time::sleep(wait) => {
                    if self.closed_since.is_none() && source_closed() {
                        self.closed_since = Some(tokio::time::Instant::now());
                    }
                }
            }
        }
    }
}

/// Whether the peer of `socket` has closed (FIN or reset), as far as the
/// reactor has seen; never waits. Bytes it sent before may still be unread.
pub(crate) fn tcp_read_closed(socket: &TcpStream) -> bool {
    use futures_util::FutureExt;
    match socket.ready(tokio::io::Interest::READABLE).now_or_never() {
        Some(Ok(ready)) => ready.is_read_closed(),
        Some(Err(_)) => true,
        None => false,
    }
}

/// The TCP socket under a relayed stream: itself, or the socket a TLS
/// stream runs over; `None` for other streams (tests' in-memory pipes).
fn tcp_under<S: 'static>(stream: &S) -> Option<&TcpStream> {
    let any = stream as &dyn Any;
    any.downcast_ref::<TcpStream>()
        .or_else(|| {
            any.downcast_ref::<tokio_rustls::server::TlsStream<TcpStream>>()
                .map(|tls| tls.get_ref().0)
        })
        .or_else(|| {
            any.downcast_ref::<tokio_rustls::client::TlsStream<TcpStream>>()
                .map(|tls| tls.get_ref().0)
        })
}

/// [`tcp_read_closed`] of the TCP socket under a relayed stream
/// ([`tcp_under`]); other streams never say closed.
fn stream_read_closed<S: 'static>(stream: &S) -> bool {
    tcp_under(stream).is_some_and(tcp_read_closed)
}

/// One direction's half of a stream shared by both directions of a relay
/// (as `tokio::io::split`, which leaves no way back to the stream while
/// split): each poll locks the stream for its duration, and a blocked
/// write of the other direction may look at the stream between polls
/// ([`stream_read_closed`]). Both directions run in one task, so the lock
/// is never contended.
struct Half<'a, S>(&'a std::sync::Mutex<S>);

impl<S> Half<'_, S> {
    fn lock(&self) -> std::sync::MutexGuard<'_, S> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Half<'_, S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Half<'_, S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut *self.lock()).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}

/// The buffer size after a read of `n` bytes into `len`: doubled after a
/// full read (up to [`MAX_BUF`]); back to [`INITIAL_BUF`] after a small one,
/// so that a connection idle after a burst does not keep a large buffer
/// (it shrinks at its next small message, e.g. a tick).
fn next_buf_len(len: usize, n: usize) -> usize {
    if n == len && len < MAX_BUF {
        len * 2
    } else if n <= len / 8 && len > INITIAL_BUF {
        INITIAL_BUF
    } else {
        len
    }
}

/// How a relay runs, besides its streams and counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayOptions<'a> {
    /// The kernel fast path, when it is on.
    pub fast: Option<&'a FastPath>,
    /// See [`Forwarder::relay`](super::forward::Forwarder::relay).
    pub node_routes: bool,
    /// How long one side may keep its direction open after the other side
    /// closed its own (`relay.half_close_timeout_ms`); `None` waits as long
    /// as it takes.
    pub half_close_timeout: Option<Duration>,
}

/// Relays between `peer` (remote side) and `node` (local node) until both
/// directions close, one fails, one stays open longer than
/// `half_close_timeout` after the other closed, or `stop` fires.
///
/// Two [`TcpStream`]s are handed to the kernel when `fast` is given and
/// takes them, else spliced on Linux; other streams are copied through
/// buffers. (`'static` is what lets the stream types be inspected; streams
/// owned by a spawned task are `'static` anyway.)
pub async fn relay<P, N>(
    peer: P,
    node: N,
    rx_bytes: Counter,
    tx_bytes: Counter,
    stop: &CancellationToken,
    options: RelayOptions<'_>,
) -> RelayEnd
where
    P: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    N: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rx, mut tx) = (0u64, 0u64);
    let result = copy_both_ways(
        peer,
        node,
        (&rx_bytes, &tx_bytes),
        (&mut rx, &mut tx),
        stop,
        options,
    )
    .await;
    let stats = RelayStats { rx, tx };
    match result {
        Some(Ok(())) => RelayEnd::Closed(stats),
        Some(Err(e)) => RelayEnd::Failed(stats, e),
        None => RelayEnd::Stopped(stats),
    }
}

/// A connection announced to node routes until dropped (Linux).
#[cfg(target_os = "linux")]
pub type Announced<'a> = node_routes::Expected<'a>;
/// A connection announced to node routes (Linux only).
#[cfg(not(target_os = "linux"))]
pub struct Announced<'a>(std::marker::PhantomData<&'a ()>);

/// Connects to a local node at `to`. With node routes on, the socket is
/// bound first and the connection announced (`announced`), so that the
/// node's end of it joins the node sockhash when it is established.
pub async fn connect_announced<'f>(
    to: std::net::SocketAddr,
    fast: Option<&'f FastPath>,
    announced: &mut Option<Announced<'f>>,
) -> io::Result<TcpStream> {
    #[cfg(target_os = "linux")]
    if let (Some(routes), true) = (fast.and_then(|f| f.node_routes()), to.is_ipv4()) {
        let sock = tokio::net::TcpSocket::new_v4()?;
        if sock.bind(std::net::SocketAddr::new(to.ip(), 0)).is_ok() {
            *announced = routes.expect(sock.local_addr()?, to);
            return sock.connect(to).await;
        }
    }
    let _ = (fast, announced);
    TcpStream::connect(to).await
}

/// Counts and logs the data path a connection takes.
fn path_taken(path: &'static str) {
    debug!(path, "relay data path");
    metrics::counter!(m::RELAY_CONNECTIONS, "path" => path).increment(1);
}

/// Both directions until they end (`Some`) or `stop` fires (`None`).
async fn copy_both_ways<P, N>(
    peer: P,
    node: N,
    (rx_bytes, tx_bytes): (&Counter, &Counter),
    (rx, tx): (&mut u64, &mut u64),
    stop: &CancellationToken,
    options: RelayOptions<'_>,
) -> Option<io::Result<()>>
where
    P: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    N: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Owned, as the fast path takes the sockets out of tokio's reactor.
    type Owned = Box<dyn Any + Send>;
    let (peer, node): (Owned, Owned) = (Box::new(peer), Box::new(node));
    let (peer, node) = match (peer.downcast::<TcpStream>(), node.downcast::<TcpStream>()) {
        (Ok(p), Ok(n)) => {
            // Dropped at the stop: both sockets close (FIN).
            return tokio::select! {
                r = tcp_both_ways(*p, *n, (rx_bytes, tx_bytes), rx, tx, options) => Some(r),
                _ = stop.cancelled() => None,
            };
        }
        (p, n) => (unbox::<P>(p), unbox::<N>(n)),
    };
    path_taken(m::relay_path::BUFFERED);
    let (peer, node) = (std::sync::Mutex::new(peer), std::sync::Mutex::new(node));
    let result = tokio::select! {
        r = buffered_both_ways(&peer, &node, (rx_bytes, tx_bytes), rx, tx, options.half_close_timeout) => Some(r),
        _ = stop.cancelled() => None,
    };
    if result.is_none() {
        // Closed deliberately: a TLS leg gets its close_notify, so the far
        // sidecar sees the end of a connection, not a truncation (it logged
        // `peer closed connection without sending TLS close_notify`).
        let (mut peer_w, mut node_w) = (Half(&peer), Half(&node));
        let _ = tokio::time::timeout(STOP_SHUTDOWN, async {
            let _ = tokio::join!(peer_w.shutdown(), node_w.shutdown());
        })
        .await;
    }
    result
}

/// Both directions through buffers ([`copy_one_way`]), each stream shared
/// by its two directions ([`Half`]).
async fn buffered_both_ways<P, N>(
    peer: &std::sync::Mutex<P>,
    node: &std::sync::Mutex<N>,
    (rx_bytes, tx_bytes): (&Counter, &Counter),
    rx: &mut u64,
    tx: &mut u64,
    linger: Option<Duration>,
) -> io::Result<()>
where
    P: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    N: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer_closed = || stream_read_closed(&*Half(peer).lock());
    let node_closed = || stream_read_closed(&*Half(node).lock());
    let to_node = copy_one_way(
        Half(peer),
        Half(node),
        rx_bytes,
        rx,
        Watch::new(linger, StillOpen::Node),
        peer_closed,
    );
    let to_peer = copy_one_way(
        Half(node),
        Half(peer),
        tx_bytes,
        tx,
        Watch::new(linger, StillOpen::Peer),
        node_closed,
    );
    let end = both_ways(to_node, to_peer, linger).await;
    if half_close_did_expire(&end) {
        reset_stream_when_closed(&*Half(peer).lock());
        reset_stream_when_closed(&*Half(node).lock());
    }
    end
}

/// How long the legs of a relay stopped by the hard stop may take to
/// close cleanly (TLS close_notify) before they are dropped.
const STOP_SHUTDOWN: Duration = Duration::from_millis(100);

/// Which side kept its direction open past `relay.half_close_timeout_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StillOpen {
    /// The peer closed; the local node did not (stopped, hung or gone
    /// without a FIN).
    Node,
    /// The local node closed; the remote peer did not.
    Peer,
}

impl StillOpen {
    fn label(self) -> &'static str {
        match self {
            StillOpen::Node => "node",
            StillOpen::Peer => "peer",
        }
    }
}

/// Ends a relay whose `still_open` side outlived the other's close by
/// `after`: logged by the caller, counted here.
pub(crate) fn half_close_expired(still_open: StillOpen, after: Duration) -> io::Error {
    metrics::counter!(m::RELAY_HALF_CLOSE_TIMEOUTS, "still_open" => still_open.label())
        .increment(1);
    io::Error::new(
        io::ErrorKind::TimedOut,
        HalfCloseExpired { still_open, after },
    )
}

/// The error of a relay ended by `relay.half_close_timeout_ms`.
#[derive(Debug)]
struct HalfCloseExpired {
    still_open: StillOpen,
    after: Duration,
}

impl std::fmt::Display for HalfCloseExpired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (closed, open) = match self.still_open {
            StillOpen::Node => ("peer", "node"),
            StillOpen::Peer => ("node", "peer"),
        };
        write!(
            f,
            "the {open} kept its side open {} ms after the {closed} closed (relay.half_close_timeout_ms)",
            self.after.as_millis()
        )
    }
}

impl std::error::Error for HalfCloseExpired {}

/// Whether `result` is a relay ended by `relay.half_close_timeout_ms`.
fn half_close_did_expire<T>(result: &io::Result<T>) -> bool {
    matches!(result, Err(e) if e.get_ref().is_some_and(|inner| inner.is::<HalfCloseExpired>()))
}

/// Makes closing `socket` send a reset instead of a FIN. A relay ended by
/// the half-close timeout has bytes queued for a side that stopped
/// reading; a FIN would wait behind them for as long as that side stays
/// stopped, so the far end (a node, or the other pod's sidecar relaying
/// to it) would never see the connection end.
fn reset_when_closed<S: std::os::fd::AsFd>(socket: &S) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// [`reset_when_closed`] for the TCP socket under a relayed stream
/// ([`tcp_under`]).
fn reset_stream_when_closed<S: 'static>(stream: &S) {
    if let Some(tcp) = tcp_under(stream) {
        reset_when_closed(tcp);
    }
}

/// Runs both directions to their end, as `try_join!` would, except that
/// once one has ended (its EOF passed on as a half-close) the other must
/// end within `linger`. BEAM nodes never half-close: a side that closed is
/// gone, and a node that never closes its own (stopped with SIGSTOP, hung)
/// would otherwise hold the connection, its descriptors and its
/// per-source permit until it wakes.
async fn both_ways<A, B>(to_node: A, to_peer: B, linger: Option<Duration>) -> io::Result<()>
where
    A: std::future::Future<Output = io::Result<()>>,
    B: std::future::Future<Output = io::Result<()>>,
{
    tokio::pin!(to_node, to_peer);
    let (mut node_bound_done, mut peer_bound_done) = (false, false);
    let mut deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        tokio::select! {
            r = &mut to_node, if !node_bound_done => {
                r?;
                node_bound_done = true;
            }
            r = &mut to_peer, if !peer_bound_done => {
                r?;
                peer_bound_done = true;
            }
            _ = async { deadline.as_mut().expect("guarded").await }, if deadline.is_some() => {
                let linger = linger.expect("a deadline is set only with a linger");
                let still_open = if node_bound_done { StillOpen::Node } else { StillOpen::Peer };
                return Err(half_close_expired(still_open, linger));
            }
        }
        if node_bound_done && peer_bound_done {
            return Ok(());
        }
        if let (None, Some(linger)) = (&deadline, linger) {
            deadline = Some(Box::pin(tokio::time::sleep(linger)));
        }
    }
}

/// The stream a downcast left: `T` itself, whichever way it went.
fn unbox<T: 'static>(r: Result<Box<TcpStream>, Box<dyn Any + Send>>) -> T {
    let any: Box<dyn Any + Send> = match r {
        Ok(tcp) => tcp,
        Err(other) => other,
    };
    *any.downcast::<T>()
        .unwrap_or_else(|_| unreachable!("a box holds the type it was made from"))
}

/// Two plaintext TCP streams: the kernel fast path when on and it takes
/// them, else splice (Linux) or buffers.
async fn tcp_both_ways(
    p: TcpStream,
    n: TcpStream,
    (rx_bytes, tx_bytes): (&Counter, &Counter),
    rx: &mut u64,
    tx: &mut u64,
    options: RelayOptions<'_>,
) -> io::Result<()> {
    let linger = options.half_close_timeout;
    let _ = p.set_nodelay(true);
    let _ = n.set_nodelay(true);
    #[cfg(target_os = "linux")]
    {
        let (mut p, mut n) = (p, n);
        if let Some(fp) = options.fast {
            let (ps, ns) = (p.into_std()?, n.into_std()?);
            let taken = || path_taken(m::relay_path::SOCKMAP);
            let counters = (rx_bytes, tx_bytes);
            let routes = options.node_routes;
            match sockmap::relay(fp, &ps, &ns, counters, (rx, tx), routes, linger, taken).await {
                Ok(end) => {
                    if half_close_did_expire(&end) {
                        reset_when_closed(&ps);
                        reset_when_closed(&ns);
                    }
                    return end;
                }
                Err(why) => {
                    let reason = match why {
                        sockmap::NotTaken::Full => m::relay_path::FULL,
                        sockmap::NotTaken::Refused => m::relay_path::REFUSED,
                    };
                    debug!(reason, "connection not handed to the kernel; splicing");
                    metrics::counter!(m::RELAY_FAST_PATH_FALLBACKS, "reason" => reason)
                        .increment(1);
                }
            }
            (p, n) = (TcpStream::from_std(ps)?, TcpStream::from_std(ns)?);
        }
        path_taken(m::relay_path::SPLICE);
        let ((peer_r, peer_w), (node_r, node_w)) = (p.split(), n.split());
        let to_node = splice::copy_one_way(
            peer_r,
            node_w,
            rx_bytes,
            rx,
            Watch::new(linger, StillOpen::Node),
        );
        let to_peer = splice::copy_one_way(
            node_r,
            peer_w,
            tx_bytes,
            tx,
            Watch::new(linger, StillOpen::Peer),
        );
        let end = both_ways(to_node, to_peer, linger).await;
        if half_close_did_expire(&end) {
            reset_when_closed(&p);
            reset_when_closed(&n);
        }
        end
    }
    #[cfg(not(target_os = "linux"))]
    {
        path_taken(m::relay_path::BUFFERED);
        let (p, n) = (std::sync::Mutex::new(p), std::sync::Mutex::new(n));
        buffered_both_ways(&p, &n, (rx_bytes, tx_bytes), rx, tx, linger).await
    }
}

#[cfg(test)]
mod tests {
    /// Relay options without a half-close limit.
    fn opts(fast: Option<&FastPath>, node_routes: bool) -> RelayOptions<'_> {
        RelayOptions {
            fast,
            node_routes,
            half_close_timeout: None,
        }
    }

    use super::*;
    use tokio::io::duplex;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (mut client, peer_side) = duplex(1 << 16);
        let (node_side, mut server) = duplex(1 << 16);
        let stop = CancellationToken::new();
        let h = tokio::spawn(async move {
            relay(
                peer_side,
                node_side,
                Counter::noop(),
                Counter::noop(),
                &stop,
                opts(None, false),
            )
            .await
        });
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&p2).await.unwrap();
            client.shutdown().await.unwrap();
            // Still able to read after our half-close.
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        server.write_all(b"reply after half-close").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after half-close");
        let end = h.await.unwrap();
        assert!(matches!(end, RelayEnd::Closed(_)), "{end:?}");
        assert_eq!(end.stats().rx, payload.len() as u64);
        assert_eq!(end.stats().tx, 22);
    }

    #[tokio::test]
    async fn stop_token_ends_an_idle_relay() {
        let (_client, peer_side) = duplex(64);
        let (node_side, _server) = duplex(64);
        let stop = CancellationToken::new();
        let s2 = stop.clone();
        let h = tokio::spawn(async move {
            relay(
                peer_side,
                node_side,
                Counter::noop(),
                Counter::noop(),
                &s2,
                opts(None, false),
            )
            .await
        });
        stop.cancel();
        assert!(matches!(h.await.unwrap(), RelayEnd::Stopped(_)));
    }

    #[test]
    fn buffers_grow_on_full_reads_and_shrink_after_small_ones() {
        assert_eq!(next_buf_len(INITIAL_BUF, INITIAL_BUF), 2 * INITIAL_BUF);
        assert_eq!(next_buf_len(MAX_BUF, MAX_BUF), MAX_BUF);
        assert_eq!(next_buf_len(MAX_BUF, MAX_BUF / 2), MAX_BUF);
        assert_eq!(next_buf_len(MAX_BUF, 4), INITIAL_BUF);
        assert_eq!(next_buf_len(INITIAL_BUF, 4), INITIAL_BUF);
    }

    /// A connected pair of loopback sockets.
    /// The kernel fast path for a test (root, a kernel with sockmap); `None`
    /// when the runner opted out with `DISTPROXY_SKIP_E2E`, said on stderr.
    #[cfg(target_os = "linux")]
    fn fast_path_or_skip(max: u32) -> Option<FastPath> {
        match FastPath::open(max) {
            Ok(fp) => Some(fp),
            Err(e) if std::env::var_os("DISTPROXY_SKIP_E2E").is_some() => {
                eprintln!("skipped (DISTPROXY_SKIP_E2E): no fast path here: {e}");
                None
            }
            Err(e) => panic!(
                "the fast path needs root (CAP_BPF, CAP_NET_ADMIN) and sockmap: {e}; \
                 DISTPROXY_SKIP_E2E=1 skips this test"
            ),
        }
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    fn counter() -> (Counter, std::sync::Arc<std::sync::atomic::AtomicU64>) {
        let n = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        (Counter::from_arc(n.clone()), n)
    }

    /// Over real sockets: both directions at once with more bytes than the
    /// socket and pipe buffers hold, then half-close each way in turn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_relay_moves_both_ways_with_half_close_and_counts() {
        both_ways_with_half_close(None).await;
    }

    /// The same over the kernel fast path (root, a kernel with sockmap):
    /// every byte, half-close each way, and the counts from the kernel.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sockmap_relay_moves_both_ways_with_half_close_and_counts() {
        let Some(fp) = fast_path_or_skip(16).map(std::sync::Arc::new) else {
            return;
        };
        let before = sockmap::HANDED_OVER.load(std::sync::atomic::Ordering::Relaxed);
        both_ways_with_half_close(Some(fp.clone())).await;
        let after = sockmap::HANDED_OVER.load(std::sync::atomic::Ordering::Relaxed);
        assert!(after > before, "handed to the kernel");
        bytes_queued_before_the_handover_are_relayed(fp).await;
    }

    /// The last map insert of a handover fails while the peer's bytes are
    /// already redirected to the node (the hook writes them at that
    /// moment): the bytes the kernel took reach the node, the rest is
    /// spliced after them, in order, and every byte is counted once.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_last_insert_takes_the_peer_back_without_losing_bytes() {
        use std::io::Write;
        let Some(fp) = fast_path_or_skip(16) else {
            return;
        };
        let (client, peer_side) = tcp_pair().await;
        let (node_side, mut server) = tcp_pair().await;
        let pattern = |from: usize, len: usize| -> Vec<u8> {
            (from..from + len).map(|i| (i % 251) as u8).collect()
        };
        let (during, after) = (256 * 1024, 64 * 1024);
        let client = client.into_std().unwrap();
        client.set_nonblocking(false).unwrap();
        let mut hook_writer = client.try_clone().unwrap();
        let first = pattern(0, during);
        *sockmap::FAIL_LAST_INSERT.lock().unwrap() = Some((
            client.local_addr().unwrap(),
            Box::new(move || hook_writer.write_all(&first).unwrap()),
        ));
        let (rx_c, rx_n) = counter();
        let stop = CancellationToken::new();
        let relay = tokio::spawn(async move {
            relay(
                peer_side,
                node_side,
                rx_c,
                Counter::noop(),
                &stop,
                opts(Some(&fp), false),
            )
            .await
        });
        let mut got = vec![0u8; during];
        let ten = std::time::Duration::from_secs(10);
        tokio::time::timeout(ten, server.read_exact(&mut got))
            .await
            .expect("every byte of the failed handover reaches the node")
            .unwrap();
        assert!(
            got == pattern(0, during),
            "bytes of the failed handover, in order"
        );
        let mut client = client;
        let rest = pattern(during, after);
        tokio::task::spawn_blocking(move || {
            client.write_all(&rest).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            client
        });
        let mut tail = Vec::new();
        tokio::time::timeout(ten, server.read_to_end(&mut tail))
            .await
            .expect("the spliced bytes reach the node")
            .unwrap();
        assert!(tail == pattern(during, after), "then the spliced bytes");
        drop(server);
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), relay)
            .await
            .expect("relay ends")
            .unwrap();
        let total = (during + after) as u64;
        assert_eq!(end.stats().rx, total, "{end:?}");
        assert_eq!(rx_n.load(std::sync::atomic::Ordering::Relaxed), total);
        assert!(
            sockmap::FAIL_LAST_INSERT.lock().unwrap().is_none(),
            "the hook ran"
        );
    }

    /// Bytes already in a socket's receive queue when it is handed over
    /// are relayed although nothing more arrives after them.
    #[cfg(target_os = "linux")]
    async fn bytes_queued_before_the_handover_are_relayed(fp: std::sync::Arc<FastPath>) {
        let (mut client, peer_side) = tcp_pair().await;
        let (node_side, mut server) = tcp_pair().await;
        client.write_all(&[7u8; 1000]).await.unwrap();
        server.write_all(&[9u8; 500]).await.unwrap();
        // Both queued on the relay's sockets before it starts.
        for s in [&peer_side, &node_side] {
            let mut b = [0u8; 1];
            assert_eq!(s.peek(&mut b).await.unwrap(), 1);
        }
        let stop = CancellationToken::new();
        let h = tokio::spawn(async move {
            let (rx, tx) = (Counter::noop(), Counter::noop());
            relay(peer_side, node_side, rx, tx, &stop, opts(Some(&fp), false)).await
        });
        let mut got = [0u8; 1000];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [7u8; 1000]);
        let mut back = [0u8; 500];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [9u8; 500]);
        drop(client);
        drop(server);
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), h)
            .await
            .expect("relay ends when both close")
            .unwrap();
        assert_eq!(end.stats(), RelayStats { rx: 1000, tx: 500 }, "{end:?}");
    }

    /// A fast path with node routes for this process's cgroup, and the
    /// two connections of a routed relay: node `a` dialled the sidecar's
    /// distribution port (`s1` its sidecar end), and the sidecar dialled
    /// node `b` (`s2`), announced. `None` when the runner opted out.
    #[cfg(target_os = "linux")]
    async fn routed_pair() -> Option<(
        std::sync::Arc<FastPath>,
        TcpStream,
        TcpStream,
        TcpStream,
        TcpStream,
    )> {
        let (fp, a, s1) = with_routed_node(fast_path_or_skip(16)?).await;
        let b_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut announced = None;
        let (s2, b) = tokio::join!(
            connect_announced(b_listener.local_addr().unwrap(), Some(&fp), &mut announced),
            b_listener.accept()
        );
        assert!(announced.is_some(), "the connection to b was announced");
        drop(announced);
        let (s2, b) = (s2.unwrap(), b.unwrap().0);
        Some((fp, a, s1, s2, b))
    }

    /// Enables node routes on `fp` for this process's cgroup and a new
    /// distribution port, which node `a` dials: `(fp, a, s1)`, `s1` the
    /// sidecar's end.
    #[cfg(target_os = "linux")]
    async fn with_routed_node(
        mut fp: FastPath,
    ) -> (std::sync::Arc<FastPath>, TcpStream, TcpStream) {
        let dist = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cgroup = node_routes::own_cgroup().expect("a cgroup v2 hierarchy");
        fp.enable_node_routes(&cgroup, &[dist.local_addr().unwrap().port()])
            .expect("node routes");
        let (a, s1) = tokio::join!(
            TcpStream::connect(dist.local_addr().unwrap()),
            dist.accept()
        );
        (std::sync::Arc::new(fp), a.unwrap(), s1.unwrap().0)
    }

    /// Node routes (root, cgroup v2): the "nodes" are this process's own
    /// sockets, so the `sock_ops` program goes on this process's cgroup.
    /// A node that dialled the sidecar's port and a node the sidecar
    /// dialled send straight out of the partner socket: every byte
    /// arrives, half-close works each way, the counts are right, and the
    /// sidecar's own sockets receive none of the routed bytes.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_routes_send_past_the_sidecar_sockets_with_half_close_and_counts() {
        use std::os::fd::AsFd;
        let Some((fp, mut a, s1, s2, mut b)) = routed_pair().await else {
            return;
        };
        let s1_fd = s1.as_fd().try_clone_to_owned().unwrap();
        let (rx_c, rx_n) = counter();
        let (tx_c, tx_n) = counter();
        let routed_before = sockmap::HANDED_OVER.load(std::sync::atomic::Ordering::Relaxed);
        let stop = CancellationToken::new();
        let fp2 = fp.clone();
        let h =
            tokio::spawn(
                async move { relay(s1, s2, rx_c, tx_c, &stop, opts(Some(&fp2), true)).await },
            );
        // The handshake's rule: b (the acceptor) waits for a's one frame.
        a.write_all(b"reply").await.unwrap();
        let mut reply = [0u8; 5];
        b.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");
        assert!(sockmap::HANDED_OVER.load(std::sync::atomic::Ordering::Relaxed) > routed_before);
        let received_at_handover = bpf::tcp_counts(s1_fd.as_fd()).unwrap().received;

        let (up, down) = exchange_with_half_close(a, b).await;
        // a's bytes never reached the sidecar's socket: only its FIN did.
        let received = bpf::tcp_counts(s1_fd.as_fd()).unwrap().received;
        assert!(
            received - received_at_handover <= 1,
            "{} bytes crossed into the sidecar's socket",
            received - received_at_handover
        );
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), h)
            .await
            .expect("relay ends")
            .unwrap();
        assert!(matches!(end, RelayEnd::Closed(_)), "{end:?}");
        let (rx, tx) = (up + 5, down);
        assert_eq!(end.stats(), RelayStats { rx, tx });
        assert_eq!(rx_n.load(std::sync::atomic::Ordering::Relaxed), rx);
        assert_eq!(tx_n.load(std::sync::atomic::Ordering::Relaxed), tx);
    }

    /// A sidecar socket established before node routes were enabled was
    /// never noted by the `sock_ops` program on the sidecar's cgroup, so
    /// it cannot be a route's target: the node's route is missed, with
    /// that reason, and all its bytes cross the sidecar's socket, each
    /// one delivered, half-close and counts as with a route.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_target_older_than_node_routes_misses_the_route_and_loses_nothing() {
        use std::os::fd::AsFd;
        let Some(fp) = fast_path_or_skip(16) else {
            return;
        };
        // The sidecar's connection to b, before the programs are attached.
        let (s2, b) = tcp_pair().await;
        let (fp, a, s1) = with_routed_node(fp).await;
        let s1 = s1.into_std().unwrap();
        let routes = fp.node_routes().expect("enabled");
        assert!(routes.has_node(&s1), "a's socket joined the node sockhash");
        let cookie = bpf::cookie(s2.as_fd()).unwrap();
        let target = routes.add_target(s2.as_fd(), cookie).unwrap();
        let missed = routes.arm(&s1, cookie, 0).err();
        assert_eq!(missed, Some(node_routes::Missed::TargetUnnoted));
        drop(target);

        let s1 = TcpStream::from_std(s1).unwrap();
        let s1_fd = s1.as_fd().try_clone_to_owned().unwrap();
        let at_start = bpf::tcp_counts(s1_fd.as_fd()).unwrap().received;
        let (rx_c, rx_n) = counter();
        let (tx_c, tx_n) = counter();
        let stop = CancellationToken::new();
        let fp2 = fp.clone();
        let h =
            tokio::spawn(
                async move { relay(s1, s2, rx_c, tx_c, &stop, opts(Some(&fp2), true)).await },
            );
        let (up, down) = exchange_with_half_close(a, b).await;
        let through_sidecar = bpf::tcp_counts(s1_fd.as_fd()).unwrap().received - at_start;
        assert!(
            through_sidecar >= up,
            "without a route every byte of a crosses the sidecar's socket: {through_sidecar} of {up}"
        );
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), h)
            .await
            .expect("relay ends")
            .unwrap();
        assert!(matches!(end, RelayEnd::Closed(_)), "{end:?}");
        assert_eq!(end.stats(), RelayStats { rx: up, tx: down });
        assert_eq!(rx_n.load(std::sync::atomic::Ordering::Relaxed), up);
        assert_eq!(tx_n.load(std::sync::atomic::Ordering::Relaxed), down);
    }

    /// Node routes under back-pressure (root, cgroup v2): a non-blocking
    /// sender (as every BEAM is) writes to a reader that stops reading
    /// for 2 s. A full target must make the sender sleep, as on a direct
    /// connection, not fail its `sendmsg` with `EAGAIN` while its socket
    /// stays writable (the program without its room check: 1,446
    /// refusals in this test; with it, about 20). Once the reader reads
    /// again, every byte arrives in order, nearly all of them routed past
    /// the sidecar's socket (about 1 % went through it).
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_routed_sender_sleeps_while_its_reader_stalls_and_loses_nothing() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        let Some((fp, a, s1, s2, b)) = routed_pair().await else {
            return;
        };
        let s1_fd = s1.as_fd().try_clone_to_owned().unwrap();
        let stop = CancellationToken::new();
        let fp2 = fp.clone();
        let relay = tokio::spawn(async move {
            relay(
                s1,
                s2,
                Counter::noop(),
                Counter::noop(),
                &stop,
                opts(Some(&fp2), true),
            )
            .await
        });
        let (a, b) = (a.into_std().unwrap(), b.into_std().unwrap());
        let at_start = bpf::tcp_counts(s1_fd.as_fd()).unwrap().received;
        let stalled = std::time::Duration::from_secs(2);
        let flowing = std::time::Duration::from_secs(1);
        // The sender: 64 KiB writes of a running pattern, waiting in poll
        // when a write would block, for the stall and a second after it.
        let sender = std::thread::spawn(move || {
            let mut a = a;
            let chunk = 64 * 1024;
            let (mut sent, mut refused_during_stall) = (0u64, 0u64);
            let start = std::time::Instant::now();
            while start.elapsed() < stalled + flowing {
                let buf: Vec<u8> = (sent..sent + chunk).map(|i| (i % 251) as u8).collect();
                match a.write(&buf) {
                    Ok(n) => sent += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if start.elapsed() < stalled {
                            refused_during_stall += 1;
                        }
                        let mut fds = [nix::poll::PollFd::new(
                            a.as_fd(),
                            nix::poll::PollFlags::POLLOUT,
                        )];
                        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)).unwrap();
                    }
                    Err(e) => panic!("sender: {e}"),
                }
            }
            a.set_nonblocking(false).unwrap();
            a.shutdown(std::net::Shutdown::Write).unwrap();
            (sent, refused_during_stall, a)
        });
        let reader = std::thread::spawn(move || {
            std::thread::sleep(stalled);
            let mut b = b;
            b.set_nonblocking(false).unwrap();
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        let (sent, refused, _a) = tokio::task::spawn_blocking(move || sender.join().unwrap())
            .await
            .unwrap();
        let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        let through_sidecar = bpf::tcp_counts(s1_fd.as_fd()).unwrap().received - at_start;
        assert_eq!(got.len() as u64, sent, "every byte the sender wrote");
        let wrong = got
            .iter()
            .enumerate()
            .position(|(i, &v)| v != (i % 251) as u8);
        assert_eq!(wrong, None, "in order");
        assert!(
            refused < 200,
            "the sender was refused {refused} times while its reader stalled: it spun"
        );
        assert!(
            through_sidecar < sent / 10,
            "{through_sidecar} of {sent} bytes went through the sidecar's socket"
        );
        tokio::time::timeout(std::time::Duration::from_secs(10), relay)
            .await
            .expect("relay ends")
            .unwrap();
    }

    /// What the half-close tests send: 3 MB from the client while 1 MB
    /// comes back, the client half-closes, then the server's reply after
    /// it. Checks every byte each way; returns the bytes (to the server,
    /// to the client).
    async fn exchange_with_half_close(mut client: TcpStream, mut server: TcpStream) -> (u64, u64) {
        const AFTER: &[u8] = b"reply after half-close";
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let client_task = tokio::spawn(async move {
            let (mut r, mut w) = client.split();
            let write = async {
                w.write_all(&up2).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut back = Vec::new();
            let (_, n) = tokio::join!(write, r.read_to_end(&mut back));
            n.unwrap();
            back
        });
        let (mut sr, mut sw) = server.split();
        let mut got = Vec::new();
        let (_, n) = tokio::join!(sw.write_all(&down2), sr.read_to_end(&mut got));
        n.unwrap();
        assert!(
            got == up,
            "client to server: {} bytes of {}",
            got.len(),
            up.len()
        );
        // The server may still write after the client's half-close.
        sw.write_all(AFTER).await.unwrap();
        sw.shutdown().await.unwrap();
        let back = client_task.await.unwrap();
        assert_eq!(back.len(), down.len() + AFTER.len());
        assert!(back[..down.len()] == down[..], "server to client");
        assert_eq!(&back[down.len()..], AFTER);
        (up.len() as u64, (down.len() + AFTER.len()) as u64)
    }

    async fn both_ways_with_half_close(fast: Option<std::sync::Arc<FastPath>>) {
        let (client, peer_side) = tcp_pair().await;
        let (node_side, server) = tcp_pair().await;
        let (rx_c, rx_n) = counter();
        let (tx_c, tx_n) = counter();
        #[cfg(target_os = "linux")]
        let spliced_before = splice::SPLICED.load(std::sync::atomic::Ordering::Relaxed);
        let stop = CancellationToken::new();
        let on_fast_path = fast.is_some();
        let h = tokio::spawn(async move {
            relay(
                peer_side,
                node_side,
                rx_c,
                tx_c,
                &stop,
                opts(fast.as_deref(), false),
            )
            .await
        });

        let (rx, tx) = exchange_with_half_close(client, server).await;

        let end = h.await.unwrap();
        assert!(matches!(end, RelayEnd::Closed(_)), "{end:?}");
        assert_eq!(end.stats(), RelayStats { rx, tx });
        assert_eq!(rx_n.load(std::sync::atomic::Ordering::Relaxed), rx);
        assert_eq!(tx_n.load(std::sync::atomic::Ordering::Relaxed), tx);
        // Bulk goes through splice (only the first bytes of each burst are
        // copied; other tests may splice at the same time, hence no upper bound).
        #[cfg(target_os = "linux")]
        if !on_fast_path {
            let spliced =
                splice::SPLICED.load(std::sync::atomic::Ordering::Relaxed) - spliced_before;
            assert!(
                spliced >= (rx + tx) / 2,
                "{spliced} of {} bytes spliced",
                rx + tx
            );
        }
    }

    /// Messages go out at once, whole (no Nagle, no MSG_MORE holding back
    /// the end of a spliced one): 64-byte ones (copied) and ones larger than
    /// the first read of a burst (the rest spliced).
    #[tokio::test]
    async fn tcp_relay_messages_are_not_held_back() {
        let (mut client, peer_side) = tcp_pair().await;
        let (node_side, mut server) = tcp_pair().await;
        client.set_nodelay(true).unwrap();
        server.set_nodelay(true).unwrap();
        let stop = CancellationToken::new();
        let s2 = stop.clone();
        let h = tokio::spawn(async move {
            relay(
                peer_side,
                node_side,
                Counter::noop(),
                Counter::noop(),
                &s2,
                opts(None, false),
            )
            .await
        });
        let echo = tokio::spawn(async move {
            let (mut r, mut w) = server.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
        });
        let big = 3 * 2048 + 5; // more than splice::SMALL
        let started = std::time::Instant::now();
        let mut moved = 0;
        for i in 0..200usize {
            let msg = vec![i as u8; if i % 2 == 0 { 64 } else { big }];
            client.write_all(&msg).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            client.read_exact(&mut back).await.unwrap();
            assert!(back == msg, "message {i} echoed intact");
            moved += msg.len() as u64;
        }
        // 200 round trips held back even 40 ms each would take 8 s.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        stop.cancel();
        let end = h.await.unwrap();
        assert!(
            matches!(end, RelayEnd::Stopped(s) if s.rx == moved && s.tx == moved),
            "{end:?}"
        );
        drop(client);
        echo.await.unwrap();
    }

    #[tokio::test]
    async fn tcp_relay_reports_a_reset() {
        reports_a_reset(None).await;
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn sockmap_relay_reports_a_reset() {
        if let Some(fp) = fast_path_or_skip(4) {
            reports_a_reset(Some(std::sync::Arc::new(fp))).await;
        }
    }

    /// A node that never closes its side after the peer closed (a stopped
    /// or hung BEAM) does not hold the relay past the half-close timeout,
    /// on each data path; the peer's bytes still reached it first.
    #[tokio::test]
    async fn tcp_relay_ends_when_the_node_outlives_the_peers_close() {
        outlives_a_close(None).await;
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn sockmap_relay_ends_when_the_node_outlives_the_peers_close() {
        if let Some(fp) = fast_path_or_skip(4) {
            outlives_a_close(Some(std::sync::Arc::new(fp))).await;
        }
    }

    #[tokio::test]
    async fn buffered_relay_ends_when_the_peer_outlives_the_nodes_close() {
        use tokio::io::AsyncReadExt;
        let (mut client, peer_side) = tokio::io::duplex(1024);
        let (node_side, mut server) = tokio::io::duplex(1024);
        let stop = CancellationToken::new();
        let linger = std::time::Duration::from_millis(300);
        let h = tokio::spawn(async move {
            let options = RelayOptions {
                half_close_timeout: Some(linger),
                ..RelayOptions::default()
            };
            relay(
                peer_side,
                node_side,
                Counter::noop(),
                Counter::noop(),
                &stop,
                options,
            )
            .await
        });
        server.write_all(b"last words").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = [0u8; 10];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"last words");
        // The peer neither writes nor closes.
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), h)
            .await
            .expect("the relay ends after the half-close timeout")
            .unwrap();
        match end {
            RelayEnd::Failed(_, e) => {
                assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
                assert!(e.to_string().contains("the peer kept its side open"), "{e}");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        drop(client);
    }

    /// A node that stops reading (SIGSTOP) while bytes to it are in
    /// flight: the direction towards it blocks in a write, and the peer's
    /// close (its FIN queued behind the bytes the relay has not read)
    /// must still end the relay after the half-close timeout, on each
    /// path that copies in user space, instead of when the node wakes.
    #[tokio::test]
    async fn splice_relay_ends_when_a_stopped_node_blocks_a_write_after_the_peers_close() {
        peer_closes_behind_a_blocked_write(false).await;
    }

    #[tokio::test]
    async fn buffered_relay_ends_when_a_stopped_node_blocks_a_write_after_the_peers_close() {
        peer_closes_behind_a_blocked_write(true).await;
    }

    /// A node that is slow but keeps reading is not cut off after the
    /// peer's close: it gets every byte, however long past the timeout.
    #[tokio::test]
    async fn a_slow_node_gets_every_byte_after_the_peers_close() {
        for buffered in [false, true] {
            use tokio::io::AsyncReadExt;
            let (mut client, peer_side) = tcp_pair().await;
            let (node_side, mut server) = small_buffered_pair().await;
            let linger = std::time::Duration::from_millis(300);
            let h = tokio::spawn(async move {
                let (mut rx, mut tx) = (0, 0);
                let counters = (&Counter::noop(), &Counter::noop());
                let both = (&mut rx, &mut tx);
                relay_with_linger(buffered, peer_side, node_side, counters, both, linger).await
            });
            let sent: Vec<u8> = (0..48u32 << 10).map(|i| (i % 251) as u8).collect();
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            // 4 KiB every 50 ms: about 0.6 s, twice the timeout.
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            while got.len() < sent.len() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let n = server.read(&mut chunk).await.unwrap();
                assert!(
                    n > 0,
                    "EOF after {} bytes (buffered: {buffered})",
                    got.len()
                );
                got.extend_from_slice(&chunk[..n]);
            }
            assert!(got == sent, "buffered: {buffered}");
            server.shutdown().await.unwrap();
            let end = tokio::time::timeout(std::time::Duration::from_secs(5), h)
                .await
                .expect("the relay ends once both closed")
                .unwrap();
            assert!(end.is_ok(), "buffered: {buffered}: {end:?}");
        }
    }

    /// Relays `peer` and `node` with a half-close timeout of `linger`, on
    /// the buffered path (as TLS streams are) or the splice path.
    async fn relay_with_linger(
        buffered: bool,
        peer: TcpStream,
        node: TcpStream,
        counters: (&Counter, &Counter),
        (rx, tx): (&mut u64, &mut u64),
        linger: std::time::Duration,
    ) -> io::Result<()> {
        if buffered {
            let (p, n) = (std::sync::Mutex::new(peer), std::sync::Mutex::new(node));
            buffered_both_ways(&p, &n, counters, rx, tx, Some(linger)).await
        } else {
            let options = RelayOptions {
                half_close_timeout: Some(linger),
                ..RelayOptions::default()
            };
            tcp_both_ways(peer, node, counters, rx, tx, options).await
        }
    }

    /// A connection whose accepting end ("the node") has small socket
    /// buffers: writes towards it block after about 14 KiB.
    async fn small_buffered_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpSocket::new_v4().unwrap();
        listener.set_recv_buffer_size(4096).unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listener.listen(1).unwrap();
        let connector = tokio::net::TcpSocket::new_v4().unwrap();
        connector.set_send_buffer_size(4096).unwrap();
        let (node_side, server) = tokio::join!(
            connector.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (node_side.unwrap(), server.unwrap().0)
    }

    async fn peer_closes_behind_a_blocked_write(buffered: bool) {
        use tokio::io::AsyncReadExt;
        let (mut client, peer_side) = tcp_pair().await;
        // The node never reads.
        let (node_side, mut server) = small_buffered_pair().await;
        let linger = std::time::Duration::from_millis(300);
        let (rx_c, rx_n) = counter();
        let h = tokio::spawn(async move {
            let (mut rx, mut tx) = (0, 0);
            let counters = (&rx_c, &Counter::noop());
            let both = (&mut rx, &mut tx);
            let done =
                relay_with_linger(buffered, peer_side, node_side, counters, both, linger).await;
            (done, rx)
        });
        // More than the node's leg takes (its buffers hold about 14 KiB),
        // less than the relay's receive window, so the client's FIN
        // reaches the relay.
        let sent = vec![5u8; 48 << 10];
        client.write_all(&sent).await.unwrap();
        client.shutdown().await.unwrap();
        let started = std::time::Instant::now();
        let (done, rx) = tokio::time::timeout(std::time::Duration::from_secs(5), h)
            .await
            .expect("the relay ends after the half-close timeout, not when the node reads")
            .unwrap();
        assert!(started.elapsed() >= linger, "not before the timeout");
        let e = done.expect_err("the node never took the bytes");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("the node kept its side open"), "{e}");
        assert!(rx > 0 && rx < sent.len() as u64, "{rx} bytes relayed");
        assert_eq!(rx_n.load(std::sync::atomic::Ordering::Relaxed), rx);
        // The node's leg was reset: a FIN would wait behind the bytes the
        // node never took, so a far end relaying to it (the other pod's
        // sidecar) would not see the connection end while the node stays
        // stopped. Once it reads, it gets at most what was relayed.
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match server.read(&mut chunk).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("the node's leg is closed");
        let e = end.expect_err("a reset, not a FIN behind the unsent bytes");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
        // (A buffered write cut short is not counted: up to one buffer.)
        let slack = if buffered { MAX_BUF as u64 } else { 0 };
        assert!(
            got.len() as u64 <= rx + slack,
            "{} bytes of {rx}",
            got.len()
        );
        assert!(got.iter().all(|&b| b == 5));
    }

    async fn outlives_a_close(fast: Option<std::sync::Arc<FastPath>>) {
        use tokio::io::AsyncReadExt;
        let (mut client, peer_side) = tcp_pair().await;
        let (node_side, mut server) = tcp_pair().await;
        let stop = CancellationToken::new();
        let linger = std::time::Duration::from_millis(300);
        let (rx_c, rx_n) = counter();
        let started = std::time::Instant::now();
        let h = tokio::spawn(async move {
            let options = RelayOptions {
                fast: fast.as_deref(),
                node_routes: false,
                half_close_timeout: Some(linger),
            };
            relay(peer_side, node_side, rx_c, Counter::noop(), &stop, options).await
        });
        client.write_all(b"send_name").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = [0u8; 9];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"send_name");
        // The node neither writes nor closes.
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), h)
            .await
            .expect("the relay ends after the half-close timeout")
            .unwrap();
        assert!(started.elapsed() >= linger, "not before the timeout");
        match &end {
            RelayEnd::Failed(_, e) => {
                assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
                assert!(e.to_string().contains("the node kept its side open"), "{e}");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert_eq!(end.stats().rx, 9);
        assert_eq!(rx_n.load(std::sync::atomic::Ordering::Relaxed), 9);
        // The node's leg is closed: it reads EOF.
        let mut rest = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            server.read_to_end(&mut rest),
        )
        .await
        .expect("the node's leg is closed")
        .unwrap();
        assert!(rest.is_empty());
    }

    async fn reports_a_reset(fast: Option<std::sync::Arc<FastPath>>) {
        let (client, peer_side) = tcp_pair().await;
        let (node_side, server) = tcp_pair().await;
        let stop = CancellationToken::new();
        let h = tokio::spawn(async move {
            relay(
                peer_side,
                node_side,
                Counter::noop(),
                Counter::noop(),
                &stop,
                opts(fast.as_deref(), false),
            )
            .await
        });
        // With SO_LINGER 0, closing sends a reset instead of a FIN.
        socket2::SockRef::from(&server)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(server);
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), h)
            .await
            .expect("relay ends after a reset")
            .unwrap();
        assert!(matches!(end, RelayEnd::Failed(..)), "{end:?}");
        drop(client);
    }
}
