//! Wiring: bind the listeners, build the shared state, serve until shutdown.
//!
//! Binding is separate from serving (`bind` then `serve`), so tests bind
//! port 0 and the binary reports bind errors before anything runs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::dist::router::Correlator;
use crate::epmd::registry::Registry;

/// State shared by every task.
pub struct Shared {
    pub config: Config,
    pub registry: Arc<Registry>,
    pub correlator: Correlator,
    /// Port announced to remote lookups.
    pub advertise_port: u16,
    /// Stops accepting (graceful shutdown starts).
    pub shutdown: CancellationToken,
    /// Ends relays (grace period over).
    pub hard_stop: CancellationToken,
    pub tracker: TaskTracker,
    pub dist_permits: Arc<Semaphore>,
    /// Renders `/metrics`; `None` when no Prometheus recorder is installed.
    pub prometheus: Option<PrometheusHandle>,
    pub open_connections: Arc<OpenConnections>,
    /// Tunnel egress listeners (one per remote node) and their resolver.
    pub egress: crate::tunnel::egress::EgressManager,
    /// Mutual TLS between sidecars; `None` when `[tls]` is not configured.
    pub tls: Option<Arc<crate::tunnel::tls::Tls>>,
    /// Discovery of every node in every pod (`[discovery]`).
    pub discovery: Arc<crate::discovery::Discovery>,
}

/// Relayed connections per local node, for `/nodes`.
#[derive(Default)]
pub struct OpenConnections(Mutex<HashMap<String, u64>>);

impl OpenConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a connection to `node` until the guard drops.
    pub fn open(self: &Arc<Self>, node: &str) -> OpenConnection {
        *self.lock().entry(node.to_string()).or_default() += 1;
        OpenConnection {
            counts: Arc::clone(self),
            node: node.to_string(),
        }
    }

    pub fn get(&self, node: &str) -> u64 {
        self.lock().get(node).copied().unwrap_or(0)
    }
}

pub struct OpenConnection {
    counts: Arc<OpenConnections>,
    node: String,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let mut map = self.counts.lock();
        if let Some(n) = map.get_mut(&self.node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.node);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("failed to bind {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot load TLS files: {0}")]
    Tls(#[from] crate::tunnel::tls::TlsLoadError),
    #[error(transparent)]
    Discovery(#[from] crate::discovery::SettingsError),
}

impl BindError {
    pub fn is_addr_in_use(&self) -> bool {
        match self {
            BindError::Bind { source, .. } => source.kind() == std::io::ErrorKind::AddrInUse,
            BindError::Tls(_) | BindError::Discovery(_) => false,
        }
    }
}

/// Bound listeners, ready to serve.
pub struct Listeners {
    pub epmd: Vec<TcpListener>,
    pub dist: Vec<TcpListener>,
    pub admin: Option<TcpListener>,
    /// The TLS files of `[tls]`, loaded (and checked) before binding.
    pub tls: Option<Arc<crate::tunnel::tls::Tls>>,
    /// `[discovery]` with its environment variables expanded.
    pub discovery: crate::discovery::Settings,
}

impl Listeners {
    pub fn epmd_addrs(&self) -> Vec<SocketAddr> {
        self.epmd
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }
    pub fn dist_addrs(&self) -> Vec<SocketAddr> {
        self.dist
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }
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

/// Loads the TLS files of `[tls]` (if configured), then binds every
/// listener named in the configuration.
pub fn bind(config: &Config) -> Result<Listeners, BindError> {
    let tls = match crate::tunnel::tls::TlsSettings::from_config(&config.tls) {
        Some(settings) => Some(crate::tunnel::tls::Tls::load(settings)?),
        None => None,
    };
    let discovery = crate::discovery::Settings::from_env(&config.discovery)?;
    let bind_all = |what: &'static str, addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|&addr| bind_tcp(addr).map_err(|source| BindError::Bind { what, addr, source }))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Listeners {
        epmd: bind_all("EPMD", &config.epmd.listen)?,
        dist: bind_all("distribution", &config.dist.listen)?,
        admin: match config.admin.listen {
            Some(addr) => Some(bind_all("admin", &[addr])?.remove(0)),
            None => None,
        },
        tls,
        discovery,
    })
}

/// A running sidecar.
pub struct Sidecar {
    pub shared: Arc<Shared>,
    pub epmd_addrs: Vec<SocketAddr>,
    pub dist_addrs: Vec<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
}

impl Sidecar {
    /// Starts serving on already-bound listeners. Call [`Sidecar::shutdown`]
    /// (or cancel `shared.shutdown`) to stop.
    pub fn start(config: Config, listeners: Listeners) -> Sidecar {
        Sidecar::start_with(config, listeners, None)
    }

    /// Like [`Sidecar::start`], with a Prometheus handle for `/metrics`.
    pub fn start_with(
        config: Config,
        listeners: Listeners,
        prometheus: Option<PrometheusHandle>,
    ) -> Sidecar {
        let epmd_addrs = listeners.epmd_addrs();
        let dist_addrs = listeners.dist_addrs();
        let admin_addr = listeners.admin.as_ref().and_then(|l| l.local_addr().ok());
        let advertise_port = config
            .dist
            .advertise_port
            .or_else(|| dist_addrs.first().map(|a| a.port()))
            .unwrap_or(43691);
        let registry = Arc::new(Registry::new());
        let discovery = crate::discovery::Discovery::new(listeners.discovery, Arc::clone(&registry));
        let shared = Arc::new(Shared {
            discovery: Arc::clone(&discovery),
            registry,
            correlator: Correlator::new(config.routing.lookup_ttl(), config.routing.max_hold()),
            advertise_port,
            shutdown: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            dist_permits: Arc::new(Semaphore::new(config.dist.max_connections)),
            prometheus,
            open_connections: Arc::default(),
            egress: crate::tunnel::egress::EgressManager::new(),
            tls: listeners.tls,
            config,
        });
        if let Some(tls) = &shared.tls {
            shared
                .tracker
                .spawn(tls.reloader().run(shared.shutdown.clone()));
        }
        shared
            .tracker
            .spawn(discovery.run(shared.shutdown.clone()));
        if let Some(path) = shared.config.epmd.state_file.clone() {
            shared
                .tracker
                .spawn(crate::epmd::state::start(Arc::clone(&shared), path));
        }
        if let Some(l) = listeners.admin {
            tokio::spawn(crate::admin::serve(l, Arc::clone(&shared)));
        }
        for l in listeners.epmd {
            shared
                .tracker
                .spawn(crate::epmd::server::serve(l, Arc::clone(&shared)));
        }
        for l in listeners.dist {
            shared
                .tracker
                .spawn(crate::dist::listener::serve(l, Arc::clone(&shared)));
        }
        // Expired correlation entries are purged lazily per peer; this sweep
        // bounds memory for peers that never come back.
        let sweeper = Arc::clone(&shared);
        shared.tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = sweeper.shutdown.cancelled() => break,
                    _ = tick.tick() => sweeper.correlator.purge_expired(),
                }
            }
        });
        info!(epmd = ?epmd_addrs, dist = ?dist_addrs, admin = ?admin_addr, advertise_port, "distproxy serving");
        Sidecar {
            shared,
            epmd_addrs,
            dist_addrs,
            admin_addr,
        }
    }

    /// Stops accepting, lets relays run for up to `grace`, then ends them
    /// and waits for every task.
    pub async fn shutdown(&self, grace: Duration) {
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        if tokio::time::timeout(grace, self.shared.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                grace_ms = grace.as_millis() as u64,
                "grace period over; closing remaining connections"
            );
            self.shared.hard_stop.cancel();
            self.shared.tracker.wait().await;
        }
    }

    /// Resolves when shutdown has been requested (signal, KILL_REQ).
    pub async fn shutdown_requested(&self) {
        self.shared.shutdown.cancelled().await
    }
}
