//! Metric names and descriptions.
//!
//! Library code records through the `metrics` facade only; the Prometheus
//! recorder is installed by the binary (tests may install their own). Names
//! are constants so dashboards and code cannot drift apart.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const REGISTERED_NODES: &str = "distproxy_registered_nodes";
pub const EPMD_REQUESTS: &str = "distproxy_epmd_requests_total";
pub const LOOKUPS_HELD: &str = "distproxy_lookups_held_total";
pub const LOOKUP_HOLD_SECONDS: &str = "distproxy_lookup_hold_seconds";
/// Remote lookups being held back right now (waiting for their turn).
pub const LOOKUPS_WAITING: &str = "distproxy_lookups_waiting";
/// Recorded lookups dropped because their requester went away, by reason.
pub const LOOKUPS_DROPPED: &str = "distproxy_lookups_dropped_total";
pub const ROUTES: &str = "distproxy_routes_total";
// The node-labelled families are rendered by
// `distribution::node_stats`, which drops a node's series after it left.
pub const DIST_CONNECTIONS_OPEN: &str = "distproxy_dist_connections_open";
pub const DIST_CONNECTIONS_OPEN_HELP: &str =
    "Distribution connections being relayed, by local node and direction.";
pub const DIST_CONNECTIONS: &str = "distproxy_dist_connections_total";
pub const DIST_CONNECTIONS_HELP: &str =
    "Distribution connections relayed, by local node and direction.";
pub const RELAYED_BYTES: &str = "distproxy_relayed_bytes_total";
pub const RELAYED_BYTES_HELP: &str =
    "Bytes relayed, by local node and direction (rx: to the node, tx: from it).";
pub const HANDSHAKE_PHASE_SECONDS: &str = "distproxy_handshake_phase_seconds";
pub const CONNECTIONS_CLOSED: &str = "distproxy_connections_closed_total";
pub const MISROUTES: &str = "distproxy_misroutes_total";
/// Nodes' own TLS distribution connections on the distribution port, by
/// `outcome` (see [`beam_tls_outcome`]).
pub const BEAM_TLS_CONNECTIONS: &str = "distproxy_dist_beam_tls_connections_total";
/// Connections closed at accept by a limit (`listener`: epmd, admin,
/// distribution, egress; `limit`: total or per_source).
pub const CONNECTIONS_REFUSED: &str = "distproxy_connections_refused_total";
/// Accepts that failed, by `listener` (most often `EMFILE`: out of descriptors).
pub const ACCEPT_FAILURES: &str = "distproxy_accept_failures_total";
/// Replies abandoned because the peer did not read them in time.
pub const WRITE_TIMEOUTS: &str = "distproxy_write_timeouts_total";
/// Relayed connections by data path (`path`, see [`relay_path`]).
pub const RELAY_CONNECTIONS: &str = "distproxy_relay_connections_total";
/// 1 when the kernel fast path was asked for and works, else 0.
pub const RELAY_FAST_PATH_AVAILABLE: &str = "distproxy_relay_fast_path_available";
/// Connections the fast path did not take, by `reason`.
pub const RELAY_FAST_PATH_FALLBACKS: &str = "distproxy_relay_fast_path_fallbacks_total";
/// Fast-path connections whose local node's messages go straight out of
/// the partner socket (node routes), by `side` (initiator, acceptor).
pub const RELAY_NODE_ROUTES: &str = "distproxy_relay_node_routes_total";
/// Fast-path connections whose local node could be routed and was not,
/// by `side` and `reason` (see `node_routes::Missed`).
pub const RELAY_NODE_ROUTES_MISSED: &str = "distproxy_relay_node_routes_missed_total";
/// 1 when node routes are on (the `sock_ops` program is attached).
pub const RELAY_NODE_ROUTES_AVAILABLE: &str = "distproxy_relay_node_routes_available";
/// Relays ended because one side kept its direction open too long after
/// the other closed (`relay.half_close_timeout_ms`), by the side still open.
pub const RELAY_HALF_CLOSE_TIMEOUTS: &str = "distproxy_relay_half_close_timeouts_total";
pub const BUILD_INFO: &str = "distproxy_build_info";
/// Tunnel egress listeners open (one per remote node in use).
pub const EGRESS_LISTENERS: &str = "distproxy_egress_listeners";
/// Nodes of every pod known to discovery (this pod's included).
pub const DISCOVERY_MEMBERS: &str = "distproxy_discovery_members";
/// Pods known to discovery (this pod's included).
pub const DISCOVERY_PODS: &str = "distproxy_discovery_pods";
/// Discovery failures, by `reason` (see [`discovery_reason`]).
pub const DISCOVERY_REFRESH_ERRORS: &str = "distproxy_discovery_refresh_errors_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "distproxy_tls_handshake_failures_total";
pub const TLS_RELOADS: &str = "distproxy_tls_reloads_total";
pub const TLS_RELOAD_FAILURES: &str = "distproxy_tls_reload_failures_total";
/// Distribution connections refused by an ACL rule, by `rule` (the rule's
/// name, or `default` for `dist.acl_default`).
pub const ACL_DENIED: &str = "distproxy_acl_denied_total";
/// `[[acl]]` rules in force.
pub const ACL_RULES: &str = "distproxy_acl_rules";
pub const ACL_RELOADS: &str = "distproxy_acl_reloads_total";
pub const ACL_RELOAD_FAILURES: &str = "distproxy_acl_reload_failures_total";
pub const TLS_CERT_NOT_AFTER: &str = "distproxy_tls_certificate_not_after_timestamp_seconds";

/// Data paths (`path` label of [`RELAY_CONNECTIONS`]) and fast-path
/// fallback reasons (`reason` label of [`RELAY_FAST_PATH_FALLBACKS`]).
pub mod relay_path {
    /// Plain TCP, in the kernel (sockmap).
    pub const SOCKMAP: &str = "sockmap";
    /// Plain TCP, spliced by the sidecar.
    pub const SPLICE: &str = "splice";
    /// TLS on a leg: read and written through buffers.
    pub const BUFFERED: &str = "buffered";
    /// `relay.fast_path_max_connections` reached.
    pub const FULL: &str = "full";
    /// The kernel or a socket's state refused the handover.
    pub const REFUSED: &str = "refused";
}

/// Route methods (`method` label of [`ROUTES`]).
pub mod route {
    pub const CORRELATED: &str = "correlated";
    pub const SINGLE_NODE: &str = "single_node";
    pub const PREAMBLE: &str = "preamble";
    /// A same-pod connection on a mirror listener (exact by port).
    pub const SAME_POD: &str = "same_pod";
    pub const UNROUTABLE: &str = "unroutable";
}

/// Close reasons (`reason` label of [`CONNECTIONS_CLOSED`]).
pub mod reason {
    pub const TIMEOUT: &str = "timeout";
    pub const BAD_FRAME: &str = "bad_frame";
    pub const REFUSED_BY_POLICY: &str = "refused_by_policy";
    pub const NODE_GONE: &str = "node_gone";
    pub const UNROUTABLE: &str = "unroutable";
    pub const OVER_LIMIT: &str = "over_limit";
    pub const CONNECT_FAILED: &str = "connect_failed";
    pub const PEER_CLOSED: &str = "peer_closed";
    /// Closed before sending a byte, like a sidecar's reachability probe
    /// (`tunnel.probe_remote`); kept apart from `peer_closed`.
    pub const EMPTY: &str = "empty";
    /// The node's challenge named another node than the one routed to: the
    /// connection is closed, not relayed.
    pub const MISROUTED: &str = "misrouted";
    /// A tunnel preamble named a node not registered here.
    pub const UNKNOWN_NODE: &str = "unknown_node";
    /// The egress side could not resolve the remote node's host.
    pub const RESOLVE_FAILED: &str = "resolve_failed";
    /// The TLS handshake between sidecars failed (why: the `reason` label
    /// of `distproxy_tls_handshake_failures_total`).
    pub const TLS_HANDSHAKE_FAILED: &str = "tls_handshake_failed";
}

/// Outcomes of nodes' own TLS connections (`outcome` label of
/// [`BEAM_TLS_CONNECTIONS`]).
pub mod beam_tls_outcome {
    /// Routed to the looked-up (or only) node and relayed undecrypted.
    pub const ROUTED: &str = "routed";
    /// Closed by `dist.beam_tls = "refuse"` or an ACL rule.
    pub const REFUSED: &str = "refused";
    /// No lookup to correlate it with and not exactly one node registered.
    pub const UNROUTABLE: &str = "unroutable";
}

/// Discovery failure reasons (`reason` label of [`DISCOVERY_REFRESH_ERRORS`]).
pub mod discovery_reason {
    /// The service name could not be resolved (the previous list is kept).
    pub const RESOLVE: &str = "resolve";
    /// A pod did not answer within `discovery.query_timeout_ms`.
    pub const QUERY_TIMEOUT: &str = "query_timeout";
    /// A pod refused the connection or broke it.
    pub const QUERY_FAILED: &str = "query_failed";
    /// A pod's answer was malformed or too large.
    pub const BAD_REPLY: &str = "bad_reply";
    /// A pod without distproxy, and no `discovery.host_template`.
    pub const NO_HOST_TEMPLATE: &str = "no_host_template";
}

/// TLS handshake failure reasons (`reason` label of [`TLS_HANDSHAKE_FAILURES`];
/// its `side` label is `accept` or `connect`).
pub mod tls_reason {
    /// The peer's certificate does not chain to our CA, or the peer said so
    /// of ours (alert `unknown_ca`).
    pub const UNKNOWN_CA: &str = "unknown_ca";
    /// Expired, not yet valid, wrong usage, bad signature, unparsable.
    pub const BAD_CERT: &str = "bad_cert";
    /// The client presented no certificate (mutual TLS is mandatory).
    pub const NO_CLIENT_CERT: &str = "no_client_cert";
    /// The server's certificate does not name the host that was dialled.
    pub const NAME_MISMATCH: &str = "name_mismatch";
    pub const TIMEOUT: &str = "timeout";
    /// Anything else: not TLS, TLS 1.2 only, closed mid-handshake, ...
    pub const PROTOCOL: &str = "protocol";
}

/// Explicit histogram buckets (seconds) for handshake phases and lookup holds.
pub const PHASE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Counts a connection closed by distproxy, by reason (see [`reason`]).
pub fn record_closed(why: &'static str) {
    metrics::counter!(CONNECTIONS_CLOSED, "reason" => why).increment(1);
}

/// Records how long a set-up phase took.
pub fn record_phase(name: &'static str, since: std::time::Instant) {
    metrics::histogram!(HANDSHAKE_PHASE_SECONDS, "phase" => name)
        .record(since.elapsed().as_secs_f64());
}

/// A Prometheus builder with this crate's histogram buckets. Installing it
/// is left to the binary (and to tests).
pub fn prometheus_builder(
) -> Result<metrics_exporter_prometheus::PrometheusBuilder, metrics_exporter_prometheus::BuildError>
{
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    [HANDSHAKE_PHASE_SECONDS, LOOKUP_HOLD_SECONDS]
        .into_iter()
        .try_fold(PrometheusBuilder::new(), |b, name| {
            b.set_buckets_for_metric(Matcher::Full(name.to_string()), PHASE_BUCKETS)
        })
}

/// How often [`upkeep`] folds recorded histogram samples into their buckets.
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds the histograms' recorded samples into their buckets every
/// [`UPKEEP_INTERVAL`] until `stop`. The exporter keeps every sample
/// recorded since the last render (about 8 bytes each, several per
/// connection and one per held lookup) and only a render or this folds
/// them, so a sidecar that nobody scrapes (no Prometheus, or
/// `admin.listen` off) grew for as long as it ran.
pub async fn upkeep(
    handle: metrics_exporter_prometheus::PrometheusHandle,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

/// Registers descriptions with whatever recorder is installed.
pub fn describe() {
    describe_counter!(
        BEAM_TLS_CONNECTIONS,
        "Nodes' own TLS distribution connections on the distribution port, by outcome."
    );
    describe_counter!(
        RELAY_CONNECTIONS,
        "Relayed connections by data path: sockmap, splice or buffered."
    );
    describe_gauge!(
        RELAY_FAST_PATH_AVAILABLE,
        "1 when relay.fast_path is sockmap and the kernel accepted the program, else 0."
    );
    describe_counter!(
        RELAY_FAST_PATH_FALLBACKS,
        "Plain connections spliced although the fast path is on, by reason."
    );
    describe_counter!(
        RELAY_NODE_ROUTES,
        "Fast-path connections whose local node sends straight out of the partner socket, by side."
    );
    describe_counter!(
        RELAY_NODE_ROUTES_MISSED,
        "Fast-path connections whose local node could be routed and was not, by side and reason."
    );
    describe_counter!(
        RELAY_HALF_CLOSE_TIMEOUTS,
        "Relays ended because one side stayed open longer than relay.half_close_timeout_ms after the other closed, by the side still open (node, peer)."
    );
    describe_gauge!(
        RELAY_NODE_ROUTES_AVAILABLE,
        "1 when relay.fast_path_cgroup is not off and the sock_ops program is attached, else 0."
    );
    describe_gauge!(
        REGISTERED_NODES,
        "Nodes currently registered with the EPMD server."
    );
    describe_counter!(
        EPMD_REQUESTS,
        "EPMD requests handled, by request type and result."
    );
    describe_counter!(
        LOOKUPS_HELD,
        "Remote lookups held back by per-peer serialisation."
    );
    describe_counter!(
        LOOKUPS_DROPPED,
        "Lookups recorded or held and then dropped because the requester went away, by reason."
    );
    describe_histogram!(
        LOOKUP_HOLD_SECONDS,
        Unit::Seconds,
        "How long held lookups waited before being answered."
    );
    describe_counter!(
        ROUTES,
        "Routing decisions for incoming distribution connections, by method."
    );
    describe_histogram!(
        HANDSHAKE_PHASE_SECONDS,
        Unit::Seconds,
        "Duration of connection set-up phases (first_frame, connect_node, node_challenge; tunnel: preamble, egress_first_frame, resolve, connect_remote, send_preamble, tls_handshake)."
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Connections closed by distproxy before or instead of relaying, by reason."
    );
    describe_counter!(
        MISROUTES,
        "Connections whose node answered with a name other than the chosen target (must stay 0)."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed at accept by a connection limit, by listener and limit (total, per_source), and connections closed to make room for a newer one (evicted)."
    );
    describe_counter!(
        WRITE_TIMEOUTS,
        "Replies abandoned because the peer did not read them within limits.write_timeout_ms, by listener."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "Failed TLS handshakes between sidecars, by side (accept, connect) and reason."
    );
    describe_counter!(
        TLS_RELOADS,
        "Certificate, key or CA files changed and were loaded for new connections."
    );
    describe_counter!(
        ACL_DENIED,
        "Distribution connections refused by the ACL, by the rule that refused them (`default`: dist.acl_default)."
    );
    describe_gauge!(ACL_RULES, "ACL rules ([[acl]]) in force.");
    describe_counter!(
        ACL_RELOADS,
        "ACL rules reloaded from the configuration file (SIGHUP or a content change)."
    );
    describe_counter!(
        ACL_RELOAD_FAILURES,
        "ACL reloads refused because the configuration file could not be read or validated (the rules in force stay)."
    );
    describe_counter!(
        TLS_RELOAD_FAILURES,
        "Changed certificate, key or CA files that could not be loaded (the previous ones stay in use)."
    );
    describe_gauge!(
        TLS_CERT_NOT_AFTER,
        Unit::Seconds,
        "Expiry (Unix time) of the certificate this sidecar presents."
    );
    describe_gauge!(
        EGRESS_LISTENERS,
        "Tunnel egress listeners open on loopback, one per remote node in use."
    );
    describe_gauge!(
        DISCOVERY_MEMBERS,
        "Nodes of every pod known to discovery, this pod's included."
    );
    describe_gauge!(
        DISCOVERY_PODS,
        "Pods known to discovery, this pod included."
    );
    describe_counter!(
        DISCOVERY_REFRESH_ERRORS,
        "Discovery failures (service resolution, pod queries), by reason."
    );
    describe_counter!(
        ACCEPT_FAILURES,
        "Accepts that failed on a listener (epmd, distribution, admin, egress, mirror), most often out of open files (EMFILE); each is retried after 50 ms."
    );
    describe_gauge!(BUILD_INFO, "Build information; value is always 1.");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    describe_gauge!(
        LOOKUPS_WAITING,
        "Remote lookups being held back by per-peer serialisation right now."
    );
    metrics::gauge!(LOOKUPS_WAITING).set(0.0);
    export_rare_events_at_zero();
}

/// Exports the counters of rare events at 0 from the start. A counter
/// whose series first appears at 1 hides its first event from `rate()` and
/// `increase()` (Prometheus sees no step from 0), so a first misroute or a
/// first failed certificate reload was invisible on the dashboard and to
/// alerts built that way.
fn export_rare_events_at_zero() {
    for name in [
        MISROUTES,
        LOOKUPS_HELD,
        TLS_RELOADS,
        TLS_RELOAD_FAILURES,
        ACL_RELOADS,
        ACL_RELOAD_FAILURES,
    ] {
        metrics::counter!(name).increment(0);
    }
    for listener in ["epmd", "distribution", "admin"] {
        metrics::counter!(ACCEPT_FAILURES, "listener" => listener).increment(0);
    }
    for method in [
        route::CORRELATED,
        route::SINGLE_NODE,
        route::PREAMBLE,
        route::SAME_POD,
        route::UNROUTABLE,
    ] {
        metrics::counter!(ROUTES, "method" => method).increment(0);
    }
    for why in [
        reason::TIMEOUT,
        reason::BAD_FRAME,
        reason::REFUSED_BY_POLICY,
        reason::NODE_GONE,
        reason::UNROUTABLE,
        reason::OVER_LIMIT,
        reason::CONNECT_FAILED,
        reason::PEER_CLOSED,
        reason::EMPTY,
        reason::MISROUTED,
        reason::UNKNOWN_NODE,
        reason::RESOLVE_FAILED,
        reason::TLS_HANDSHAKE_FAILED,
    ] {
        metrics::counter!(CONNECTIONS_CLOSED, "reason" => why).increment(0);
    }
}

/// With `[tls]` on: every `side` and `reason` of
/// [`TLS_HANDSHAKE_FAILURES`] at 0 (see [`export_rare_events_at_zero`]).
pub fn export_tls_failures_at_zero() {
    for side in ["accept", "connect"] {
        for why in [
            tls_reason::UNKNOWN_CA,
            tls_reason::BAD_CERT,
            tls_reason::NO_CLIENT_CERT,
            tls_reason::NAME_MISMATCH,
            tls_reason::TIMEOUT,
            tls_reason::PROTOCOL,
        ] {
            metrics::counter!(TLS_HANDSHAKE_FAILURES, "side" => side, "reason" => why).increment(0);
        }
    }
}
