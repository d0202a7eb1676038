//! Socket primitives shared by every service: binding, the one accept loop,
//! and dialling a list of addresses.
//!
//! Every listener in distproxy runs [`accept_loop`]: it stops on its
//! shutdown token, asks the listener's [`Admission`] whether to take each
//! connection (the hook for connection limits), spawns the handler on the
//! service's task tracker, and logs accept errors at most once a second
//! (an accept error such as `EMFILE` repeats as fast as the loop spins).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// The port a BEAM expects EPMD on.
pub const DEFAULT_EPMD_PORT: u16 = 4369;
/// The distribution port distproxy owns unless configured otherwise.
pub const DEFAULT_DIST_PORT: u16 = 43691;

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

/// Decides, at accept time, whether a connection is taken. What it returns
/// travels with the connection (a permit released when the connection ends).
pub trait Admission: Send + Sync + 'static {
    type Permit: Send + 'static;
    /// `None`: the connection is closed at once (the implementation logs
    /// and counts why).
    fn admit(&self, peer: SocketAddr) -> Option<Self::Permit>;
}

/// Takes every connection.
pub struct AdmitAll;

impl Admission for AdmitAll {
    type Permit = ();
    fn admit(&self, _peer: SocketAddr) -> Option<()> {
        Some(())
    }
}

/// A global cap on connections open at once, shared by every listener that
/// holds a clone (`dist.max_connections`: inbound and egress connections).
#[derive(Clone)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> ConnectionLimit {
        ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A permit, if fewer than the maximum are out.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.permits).try_acquire_owned().ok()
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

impl Admission for ConnectionLimit {
    type Permit = OwnedSemaphorePermit;
    fn admit(&self, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        let permit = self.try_acquire();
        if permit.is_none() {
            warn!(%peer, limit = self.max, "connection limit reached; closing");
            crate::metrics::record_closed(crate::metrics::reason::OVER_LIMIT);
        }
        permit
    }
}

/// Logs repeated errors at most once per period, with the number skipped.
struct RateLimitedLog {
    period: Duration,
    last: Option<Instant>,
    skipped: u64,
}

impl RateLimitedLog {
    fn new(period: Duration) -> RateLimitedLog {
        RateLimitedLog {
            period,
            last: None,
            skipped: 0,
        }
    }

    fn accept_failed(&mut self, what: &str, local: Option<SocketAddr>, e: &std::io::Error) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.period)
        {
            self.skipped += 1;
            return;
        }
        warn!(listener = ?local, error = %e, skipped = self.skipped, "{what} accept failed");
        self.last = Some(now);
        self.skipped = 0;
    }
}

/// Accepts connections until `shutdown`, spawning `handler(stream, peer,
/// permit)` on `tracker` for each one `admission` takes. Accept errors are
/// logged (rate-limited) and the loop goes on after a short pause.
pub async fn accept_loop<A, H, F>(
    what: &'static str,
    listener: TcpListener,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    admission: A,
    handler: H,
) where
    A: Admission,
    H: Fn(TcpStream, SocketAddr, A::Permit) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    let mut errors = RateLimitedLog::new(Duration::from_secs(1));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(permit) = admission.admit(peer) else {
                    continue;
                };
                tracker.spawn(handler(stream, peer, permit));
            }
            Err(e) => {
                errors.accept_failed(what, local, &e);
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
pub async fn connect_any(
    addrs: &[IpAddr],
    port: u16,
    deadline: Duration,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let attempt = async {
        let mut last = None;
        for &ip in addrs {
            let addr = SocketAddr::new(ip, port);
            match TcpStream::connect(addr).await {
                Ok(s) => return Ok((s, addr)),
                Err(source) => {
                    debug!(%addr, error = %source, "connect attempt failed");
                    last = Some(ConnectError::Failed { addr, source });
                }
            }
        }
        Err(last.unwrap_or(ConnectError::Timeout {
            addrs: Vec::new(),
            port,
        }))
    };
    tokio::time::timeout(deadline, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::Timeout {
                addrs: addrs.to_vec(),
                port,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let first = limit.admit(peer).expect("first admitted");
        assert!(limit.admit(peer).is_none());
        drop(first);
        assert!(limit.admit(peer).is_some());
    }
}
