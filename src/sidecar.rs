//! Wiring: bind the listeners, build one narrow context per service
//! ([`EpmdCtx`], [`DistCtx`], [`AdminCtx`], the [`EgressManager`]), serve
//! until shutdown. Nothing but `main.rs` and tests imports this module.
//!
//! Binding is separate from serving (`bind` then `serve`), so tests bind
//! port 0 and the binary reports bind errors before anything runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::acl::{Acl, AclHandle, ReloadOutcome};
use crate::admin::AdminCtx;
use crate::config::Config;
use crate::discovery::Discovery;
use crate::distribution::forward::Forwarder;
use crate::distribution::listener::DistCtx;
use crate::distribution::node_stats::NodeStats;
use crate::distribution::router::Correlator;
use crate::epmd::registry::Registry;
use crate::epmd::server::EpmdCtx;
use crate::net::{bind_tcp, host_lacks_ipv6, ConnectionLimit, DEFAULT_DIST_PORT};
use crate::tunnel::egress::{EgressManager, EgressSettings};
use crate::tunnel::inbound::Inbound;
use crate::tunnel::tls::Tls;

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

    /// The configuration cannot be used (TLS files named by `[tls]` that
    /// cannot be loaded, an unset variable in `[discovery]`), as opposed to
    /// a listener that cannot be bound here and now.
    pub fn is_config_error(&self) -> bool {
        matches!(self, BindError::Tls(_) | BindError::Discovery(_))
    }
}

/// Bound listeners, ready to serve.
pub struct Listeners {
    pub epmd: Vec<TcpListener>,
    pub dist: Vec<TcpListener>,
    /// Empty when the admin endpoint is off.
    pub admin: Vec<TcpListener>,
    /// The TLS files of `[tls]`, loaded (and checked) before binding.
    pub tls: Option<Arc<crate::tunnel::tls::Tls>>,
    /// `[discovery]` with its environment variables expanded.
    pub discovery: crate::discovery::Settings,
    /// `distproxy remsh`: the only host egress connections may reach, and
    /// its address (`None` for a sidecar: the system resolver).
    pub pinned_host: Option<(String, std::net::IpAddr)>,
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
    pub fn admin_addrs(&self) -> Vec<SocketAddr> {
        self.admin
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }
}

/// Loads the TLS files of `[tls]` (if configured), then binds every
/// listener named in the configuration.
pub fn bind(config: &Config) -> Result<Listeners, BindError> {
    let tls = match crate::tunnel::tls::TlsSettings::from_config(&config.tls, &config.limits) {
        Some(settings) => Some(crate::tunnel::tls::Tls::load(settings)?),
        None => None,
    };
    let discovery = crate::discovery::Settings::from_env(&config.discovery)?;
    let bind_all = |what: &'static str, addrs: &[SocketAddr]| {
        let mut bound = Vec::new();
        let mut no_ipv6 = Vec::new();
        for &addr in addrs {
            match bind_tcp(addr) {
                Ok(l) => bound.push(l),
                Err(e) if is_ipv6_wildcard(addr) && host_lacks_ipv6(&e) => no_ipv6.push((addr, e)),
                Err(source) => return Err(BindError::Bind { what, addr, source }),
            }
        }
        // The IPv6 wildcard of a dual-stack list is optional on a host
        // without IPv6, as long as the listener has another address.
        for (addr, source) in no_ipv6 {
            if bound.is_empty() {
                return Err(BindError::Bind { what, addr, source });
            }
            warn!(listener = what, %addr, error = %source, "no IPv6 on this host; not listening there");
        }
        Ok(bound)
    };
    Ok(Listeners {
        epmd: bind_all("EPMD", &config.epmd.listen)?,
        dist: bind_all("distribution", &config.dist.listen)?,
        admin: bind_all("admin", &config.admin.listen)?,
        tls,
        discovery,
        pinned_host: None,
    })
}

fn is_ipv6_wildcard(addr: SocketAddr) -> bool {
    matches!(addr.ip(), std::net::IpAddr::V6(ip) if ip.is_unspecified())
}

/// A running sidecar, with handles on its parts for the binary and tests.
pub struct Sidecar {
    pub epmd_addrs: Vec<SocketAddr>,
    pub dist_addrs: Vec<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    /// Port announced to remote lookups.
    pub advertise_port: u16,
    pub registry: Arc<Registry>,
    pub correlator: Arc<Correlator>,
    pub egress: Arc<EgressManager>,
    /// Mutual TLS between sidecars; `None` when `[tls]` is not configured.
    pub tls: Option<Arc<Tls>>,
    /// Discovery of every node in every pod (`[discovery]`).
    pub discovery: Arc<Discovery>,
    /// The `[[acl]]` rules in force (reloaded by [`Sidecar::watch_config`]
    /// and SIGHUP).
    pub acl: Arc<AclHandle>,
    acl_reload_interval: Duration,
    /// Stops accepting (graceful shutdown starts).
    pub shutdown: CancellationToken,
    /// Ends relays (grace period over).
    hard_stop: CancellationToken,
    tracker: TaskTracker,
}

impl Sidecar {
    /// Starts serving on already-bound listeners. Call [`Sidecar::shutdown`]
    /// (or cancel `shutdown`) to stop.
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
        let admin_addrs = listeners.admin_addrs();
        let admin_addr = admin_addrs.first().copied();
        let advertise_port = config
            .dist
            .advertise_port
            .or_else(|| dist_addrs.first().map(|a| a.port()))
            .unwrap_or(DEFAULT_DIST_PORT);
        let limits = &config.limits;
        let registry = Arc::new(Registry::with_max_nodes(limits.max_registered_nodes));
        // The advertised pool: the listeners' ports, unless one port is
        // advertised (a Service in front maps it).
        let mut pool = Vec::new();
        if config.dist.advertise_port.is_some() {
            pool.push(advertise_port);
        } else {
            for port in dist_addrs.iter().map(|a| a.port()) {
                if !pool.contains(&port) {
                    pool.push(port);
                }
            }
        }
        let discovery = Discovery::new(listeners.discovery, Arc::clone(&registry));
        let correlator = Arc::new(Correlator::new(
            config.routing.lookup_ttl_ms.duration(),
            config.routing.max_hold_ms.duration(),
            pool,
        ));
        let shutdown = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        // One source gets at most its share of `dist.max_connections`, so a
        // misbehaving pod cannot lock the others out; once it is full, the
        // oldest connection not yet relayed makes room for a new one, so
        // several addresses that open connections and stall them cannot
        // either.
        let limit = ConnectionLimit::with(
            "distribution",
            config.dist.max_connections,
            limits.dist_max_connections_per_source,
            limits.reserved_local_connections,
        )
        .grouping_ipv6(limits.ipv6_source_prefix_len)
        .evicting();
        let node_stats = Arc::new(NodeStats::new(
            Arc::clone(&registry),
            config.admin.node_series_retention_ms.duration(),
        ));
        // Validated with the rest of the configuration; compiling cannot fail.
        let acl = AclHandle::new(Acl::from_config(&config).unwrap_or_else(|e| {
            warn!(error = %e, "invalid [[acl]] rules; refusing every connection");
            Acl::deny_all()
        }));
        let forward = Forwarder {
            connect_timeout: config.dist.connect_timeout_ms.duration(),
            handshake_timeout: config.dist.handshake_timeout_ms.duration(),
            node_stats: Arc::clone(&node_stats),
            hard_stop: hard_stop.clone(),
            tcp: config.tcp.tuning(),
            fast_path: open_fast_path(&config.relay, &dist_addrs),
            half_close_timeout: config.relay.half_close_timeout_ms.nonzero(),
        };
        let tls = listeners.tls;
        let egress = EgressManager::new(EgressSettings {
            registry: Arc::clone(&registry),
            tunnel: config.tunnel.clone(),
            handshake_timeout: config.dist.handshake_timeout_ms.duration(),
            tls: tls.clone(),
            forward: forward.clone(),
            limit: limit.clone(),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            pinned_host: listeners.pinned_host.clone(),
        });
        let mirrors = Arc::new(crate::distribution::mirror::Mirrors::new(
            Arc::clone(&registry),
            forward.clone(),
            limit.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
        let epmd = Arc::new(EpmdCtx {
            registry: Arc::clone(&registry),
            correlator: Arc::clone(&correlator),
            advertise_port,
            idle_timeout: config.epmd.idle_timeout_ms.duration(),
            relaxed_command_check: config.epmd.relaxed_command_check,
            probe_interval: config.epmd.probe_interval_ms.duration(),
            loopback_lookups: config.routing.loopback_lookups,
            egress: Arc::clone(&egress) as _,
            // Full, it closes the oldest connection without a whole request
            // to make room, so idle floods from several addresses cannot
            // keep lookups out.
            limit: ConnectionLimit::with(
                "epmd",
                limits.epmd_max_connections,
                limits.epmd_max_connections_per_source,
                limits.reserved_local_connections,
            )
            .grouping_ipv6(limits.ipv6_source_prefix_len)
            .evicting(),
            write_timeout: limits.write_timeout_ms.duration(),
            mirrors,
            discovery: Arc::clone(&discovery) as _,
            shutdown: shutdown.clone(),
            hard_stop: hard_stop.clone(),
            tracker: tracker.clone(),
        });
        let inbound = Inbound {
            registry: Arc::clone(&registry),
            tls: tls.clone(),
            bind_node_names: config.tls.bind_node_names,
            preamble_timeout: config.tunnel.preamble_timeout_ms.duration(),
            handshake_timeout: config.dist.handshake_timeout_ms.duration(),
            forward: forward.clone(),
            acl: Arc::clone(&acl),
        };
        let dist = Arc::new(DistCtx {
            registry: Arc::clone(&registry),
            correlator: Arc::clone(&correlator),
            handshake_timeout: config.dist.handshake_timeout_ms.duration(),
            require_tls: config.tls.require_tls,
            forward,
            limit,
            tunnel: Arc::new(inbound),
            acl: Arc::clone(&acl),
            beam_tls: config.dist.beam_tls,
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        });

        if let Some(tls) = &tls {
            tracker.spawn(tls.reloader().run(shutdown.clone()));
        }
        tracker.spawn(Arc::clone(&discovery).run(shutdown.clone()));
        if let Some(path) = config.epmd.state_file.clone() {
            // Before the EPMD server accepts: a node registering again at
            // once gets the next creation, not a random one.
            let state = crate::epmd::state::prepare(&registry, &path);
            tracker.spawn(crate::epmd::state::start(Arc::clone(&epmd), path, state));
        }
        // Also without an admin endpoint: the recorder is installed anyway.
        if let Some(handle) = &prometheus {
            tokio::spawn(crate::metrics::upkeep(handle.clone(), hard_stop.clone()));
        }
        if !listeners.admin.is_empty() {
            let admin = Arc::new(AdminCtx {
                registry: Arc::clone(&registry),
                prometheus,
                shutdown: shutdown.clone(),
                hard_stop: hard_stop.clone(),
                ready_nodes: config.admin.ready_nodes.clone(),
                node_stats,
                // Full, it closes the oldest connection still sending its
                // request to make room: a slowloris cannot keep the
                // kubelet's probes out.
                limit: ConnectionLimit::with(
                    "admin",
                    limits.admin_max_connections,
                    limits.admin_max_connections_per_source,
                    limits
                        .reserved_local_connections
                        .min(limits.admin_max_connections),
                )
                .grouping_ipv6(limits.ipv6_source_prefix_len)
                .evicting(),
                write_timeout: limits.write_timeout_ms.duration(),
                members_json: {
                    let discovery = Arc::clone(&discovery);
                    Arc::new(move || discovery.to_json())
                },
            });
            for l in listeners.admin {
                tokio::spawn(crate::admin::serve(l, Arc::clone(&admin)));
            }
        }
        for l in listeners.epmd {
            tracker.spawn(crate::epmd::server::serve(l, Arc::clone(&epmd)));
        }
        for l in listeners.dist {
            tracker.spawn(crate::distribution::listener::serve(l, Arc::clone(&dist)));
        }
        // Expired correlation entries are purged lazily per peer; this sweep
        // bounds memory for peers that never come back.
        let (sweeper, stop) = (Arc::clone(&correlator), shutdown.clone());
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => sweeper.purge_expired(),
                }
            }
        });
        info!(epmd = ?epmd_addrs, dist = ?dist_addrs, admin = ?admin_addrs, advertise_port, "distproxy serving");
        Sidecar {
            epmd_addrs,
            dist_addrs,
            admin_addr,
            advertise_port,
            registry,
            correlator,
            egress,
            tls,
            discovery,
            acl,
            acl_reload_interval: config.dist.acl_reload_interval_ms.duration(),
            shutdown,
            hard_stop,
            tracker,
        }
    }

    /// Reads `[[acl]]` and `dist.acl_default` again from `path` (the file
    /// the configuration came from) whenever its content changes, and on
    /// [`Sidecar::reload`].
    pub fn watch_config(&self, path: &std::path::Path) {
        self.acl.set_source(path);
        self.tracker
            .spawn(Arc::clone(&self.acl).watch(self.acl_reload_interval, self.shutdown.clone()));
    }

    /// SIGHUP: reload what can be reloaded (the ACL rules) now.
    pub async fn reload(&self) {
        let acl = Arc::clone(&self.acl);
        match tokio::task::spawn_blocking(move || acl.reload("SIGHUP")).await {
            Ok(ReloadOutcome::Unchanged) => {
                info!("SIGHUP: the ACL rules in the file are the ones in force")
            }
            Ok(ReloadOutcome::NoSource) => info!("SIGHUP: no configuration file to reload"),
            // Logged by reload; a SIGHUP reads the file once (the operator
            // sends it after writing), so it is never unsettled.
            Ok(
                ReloadOutcome::Reloaded { .. }
                | ReloadOutcome::Failed(_)
                | ReloadOutcome::Unsettled,
            ) => {}
            Err(e) => warn!(error = %e, "ACL reload task failed"),
        }
    }

    /// Stops accepting, lets relays run for up to `grace`, then ends them
    /// and waits for every task.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                grace_ms = grace.as_millis() as u64,
                "grace period over; closing remaining connections"
            );
            self.hard_stop.cancel();
            self.tracker.wait().await;
        }
    }

    /// Resolves when shutdown has been requested (signal, KILL_REQ).
    pub async fn shutdown_requested(&self) {
        self.shutdown.cancelled().await
    }
}

/// Node routes on the fast path, unless `relay.fast_path_cgroup` is off;
/// without them the fast path goes on, said in the log and the gauge.
#[cfg(target_os = "linux")]
fn open_node_routes(
    fp: &mut crate::distribution::relay::FastPath,
    relay: &crate::config::RelayConfig,
    dist_addrs: &[SocketAddr],
) {
    use crate::config::NodeRoutesCgroup;
    let available = metrics::gauge!(crate::metrics::RELAY_NODE_ROUTES_AVAILABLE);
    available.set(0.0);
    let cgroup = match relay.node_routes_cgroup() {
        None => return,
        Some(NodeRoutesCgroup::Path(p)) => Ok(p),
        Some(NodeRoutesCgroup::Own) => crate::distribution::relay::node_routes::own_cgroup(),
    };
    // The same port on both families is one entry of the map.
    let ports: Vec<u16> = dist_addrs.iter().map(|a| a.port()).collect();
    match cgroup.and_then(|c| fp.enable_node_routes(&c, &ports).map(|()| c)) {
        Ok(cgroup) => {
            tracing::info!(cgroup = %cgroup.display(),
                "node routes on: local nodes' messages skip the loopback hop");
            available.set(1.0);
        }
        Err(e) => tracing::warn!(error = %e,
            "node routes unavailable (relay.fast_path_cgroup); the fast path goes on without them"),
    }
}

/// The kernel fast path when `relay.fast_path` asks for it and the kernel
/// and privileges allow it; else the splice path, said once in the log.
fn open_fast_path(
    relay: &crate::config::RelayConfig,
    dist_addrs: &[SocketAddr],
) -> Option<Arc<crate::distribution::relay::FastPath>> {
    use crate::config::FastPath as Wanted;
    let available = metrics::gauge!(crate::metrics::RELAY_FAST_PATH_AVAILABLE);
    // 0 unless node routes are attached below: without the fast path they
    // are off too, and a scrape shows 0, not an absent series.
    metrics::gauge!(crate::metrics::RELAY_NODE_ROUTES_AVAILABLE).set(0.0);
    if relay.fast_path == Wanted::Off {
        available.set(0.0);
        return None;
    }
    #[cfg(target_os = "linux")]
    {
        match crate::distribution::relay::FastPath::open(relay.fast_path_max_connections) {
            Ok(mut fp) => {
                tracing::info!(
                    max_connections = relay.fast_path_max_connections,
                    "kernel fast path on: plain relayed connections go through a sockmap"
                );
                available.set(1.0);
                open_node_routes(&mut fp, relay, dist_addrs);
                Some(Arc::new(fp))
            }
            Err(e) => {
                tracing::warn!(error = %e,
                    "kernel fast path unavailable (needs CAP_BPF and CAP_NET_ADMIN and sockmap); splicing");
                available.set(0.0);
                None
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        tracing::warn!("kernel fast path is Linux only; splicing");
        available.set(0.0);
        None
    }
}
