//! Discovery of every node in every pod: the sidecar knows all nodes of its
//! own pod, so it can tell the cluster about them and learn the others'.
//!
//! Every `discovery.refresh_interval_ms` the sidecar resolves the headless
//! Service name `discovery.service` (its A/AAAA records are the pods'
//! addresses; the resolver's cache is capped at zero so every refresh asks
//! the name server) and asks each pod, concurrently and each within
//! `discovery.query_timeout_ms` ([`query`]), which nodes it runs:
//!
//! - a pod with distproxy answers the pod-info request (`'I'`, an EPMD
//!   extension served to remote peers) with its host part
//!   (`discovery.host`, e.g. `${POD_IP}`) and its registered nodes;
//! - a pod with stock EPMD closes that connection; it is asked `NAMES_REQ`
//!   and its host part is `discovery.host_template` filled in with its
//!   address ([`naming`]).
//!
//! The member list — this pod's registered nodes plus every other pod's,
//! as full names — is served to local nodes by the members request (`'M'`,
//! long-polled by `deploy/erlang/distproxy_epmd.erl`, which can keep its
//! node connected to every member), `distproxy members` and `/members`.
//!
//! Failure rules: a DNS failure keeps the previous list (a name-server blip
//! must not dissolve the cluster); an empty answer empties it. A pod listed
//! in DNS that does not answer keeps its previous nodes until it leaves DNS
//! or another address answers for its host part. Each failure counts in
//! `distproxy_discovery_refresh_errors_total` and is warned about when it
//! begins. Other pods' answers are untrusted: a name that cannot be a node
//! name (`@`, white space, control characters) is no member.
//!
//! Layers: [`wire`] and [`naming`] are pure (core); the rest is a service
//! that knows the EPMD registry and wire format, answers the EPMD server
//! through [`DiscoveryAnswers`], and knows nothing of the distribution port,
//! the tunnel or the admin endpoint.

pub mod naming;
pub mod query;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use futures_util::future::{BoxFuture, FutureExt};
use hickory_resolver::config::{ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::DiscoveryConfig;
use crate::epmd::registry::Registry;
use crate::epmd::server::DiscoveryAnswers;
use crate::metrics as m;
use crate::warn_throttled;
use naming::{HostTemplate, NamingError};
use query::{PodAnswer, Source};
use wire::Entry;

/// The longest a members request is held waiting for a change.
pub const MAX_MEMBERS_WAIT: Duration = Duration::from_secs(60);

/// `[discovery]` after environment expansion: what the sidecar runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Headless Service name; `None`: this sidecar does not discover (it
    /// still answers pod-info requests when `host` is set).
    pub service: Option<String>,
    /// This pod's host part, expanded.
    pub host: Option<String>,
    pub host_template: Option<HostTemplate>,
    pub refresh_interval: Duration,
    pub epmd_port: u16,
    pub resolve_timeout: Duration,
    pub query_timeout: Duration,
    pub max_concurrent_queries: usize,
}

/// Why `[discovery]` cannot be used (an unset environment variable).
#[derive(Debug, thiserror::Error)]
#[error("invalid value for `discovery.{key}`: {source}")]
pub struct SettingsError {
    pub key: &'static str,
    pub source: NamingError,
}

impl Settings {
    /// Expands `${VAR}` in `discovery.host` with `env` and parses the host
    /// template. The syntax was checked by `Config::validate`; what can fail
    /// here is an unset variable.
    pub fn from_config(
        config: &DiscoveryConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, SettingsError> {
        let host = if config.host.is_empty() {
            None
        } else {
            let host = naming::expand_env(&config.host, env).map_err(|source| SettingsError {
                key: "host",
                source,
            })?;
            naming::check_host(&host).map_err(|source| SettingsError {
                key: "host",
                source,
            })?;
            Some(host)
        };
        let host_template = if config.host_template.is_empty() {
            None
        } else {
            Some(
                HostTemplate::parse(&config.host_template).map_err(|source| SettingsError {
                    key: "host_template",
                    source,
                })?,
            )
        };
        Ok(Settings {
            service: (!config.service.is_empty()).then(|| config.service.clone()),
            host,
            host_template,
            refresh_interval: config.refresh_interval_ms.duration(),
            epmd_port: config.epmd_port,
            resolve_timeout: config.resolve_timeout_ms.duration(),
            query_timeout: config.query_timeout_ms.duration(),
            max_concurrent_queries: config.max_concurrent_queries,
        })
    }

    /// [`Settings::from_config`] with the process environment.
    pub fn from_env(config: &DiscoveryConfig) -> Result<Settings, SettingsError> {
        Settings::from_config(config, |k| std::env::var(k).ok())
    }
}

/// One pod as last seen.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PodState {
    /// Its address from DNS (`None` for this pod).
    pub addr: Option<IpAddr>,
    /// Host part of its nodes' names.
    pub host: String,
    pub source: Source,
    pub nodes: Vec<Entry>,
    /// Why the last query failed (its nodes are then the previous answer's).
    pub error: Option<String>,
}

/// The member list as served; replaced as a whole on every change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Changes whenever `members` does; starts at 1 after the first refresh
    /// (0: nothing known yet).
    pub version: u32,
    /// Completed refreshes (DNS and pods), for tests and `/members`.
    pub refreshes: u64,
    pub last_refresh: Option<SystemTime>,
    /// Why the last DNS resolution failed, if it did.
    pub dns_error: Option<String>,
    /// Other pods by address, then this pod.
    pub pods: Vec<PodState>,
    /// Full names of every node of every pod, sorted, without duplicates.
    pub members: Vec<Entry>,
}

/// The discovery service: state, refresher, answers to requests.
pub struct Discovery {
    settings: Settings,
    registry: Arc<Registry>,
    state: watch::Sender<Arc<Snapshot>>,
    /// Host parts last seen answered by more than one address (warned about
    /// once, when they appear).
    shared_hosts: std::sync::Mutex<BTreeSet<String>>,
}

impl Discovery {
    pub fn new(settings: Settings, registry: Arc<Registry>) -> Arc<Discovery> {
        Arc::new(Discovery {
            settings,
            registry,
            state: watch::channel(Arc::new(Snapshot::default())).0,
            shared_hosts: std::sync::Mutex::default(),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether this sidecar discovers (has `discovery.service`).
    pub fn enabled(&self) -> bool {
        self.settings.service.is_some()
    }

    /// The current member list.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.borrow().clone()
    }

    /// The member list once its version differs from `known`, or the
    /// current one after `wait` (or at `shutdown`).
    pub async fn wait_for_change(
        &self,
        known: u32,
        wait: Duration,
        shutdown: &CancellationToken,
    ) -> Arc<Snapshot> {
        let mut rx = self.state.subscribe();
        let changed = rx.wait_for(|s| s.version != known);
        tokio::select! {
            _ = tokio::time::timeout(wait, changed) => {}
            _ = shutdown.cancelled() => {}
        }
        self.snapshot()
    }

    /// The reply to a pod-info request: this pod's host part and nodes, or
    /// `None` when `discovery.host` is not set.
    pub fn pod_info(&self) -> Option<(String, Vec<Entry>)> {
        let host = self.settings.host.clone()?;
        Some((host, local_entries(&self.registry)))
    }

    /// Encodes the reply to a pod-info request (`'I'`) into `out`.
    pub fn encode_pod_info_reply(&self, out: &mut BytesMut) -> &'static str {
        match self.pod_info() {
            Some((host, nodes)) => {
                wire::encode_pod_info(out, &host, &nodes);
                "ok"
            }
            None => {
                wire::encode_pod_info_err(out, wire::POD_INFO_NO_HOST);
                "no_host"
            }
        }
    }

    /// Encodes the reply to a members request (`'M'`) into `out`, waiting up
    /// to `wait_ms` (at most [`MAX_MEMBERS_WAIT`]) for a version other than
    /// `known_version`.
    pub async fn encode_members_reply(
        &self,
        known_version: u32,
        wait_ms: u32,
        shutdown: &CancellationToken,
        out: &mut BytesMut,
    ) -> &'static str {
        if !self.enabled() {
            wire::encode_members_err(out, wire::MEMBERS_DISABLED);
            return "disabled";
        }
        let wait = Duration::from_millis(wait_ms.into()).min(MAX_MEMBERS_WAIT);
        let snapshot = self.wait_for_change(known_version, wait, shutdown).await;
        let refresh_ms =
            u32::try_from(self.settings.refresh_interval.as_millis()).unwrap_or(u32::MAX);
        wire::encode_members(out, snapshot.version, refresh_ms, &snapshot.members);
        "ok"
    }

    /// Runs refreshes until `shutdown`: a full one (DNS and every pod) every
    /// `refresh_interval`, and a local one (no network) whenever a node of
    /// this pod registers or leaves. Does nothing without a service name.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(service) = self.settings.service.clone() else {
            return;
        };
        let resolver = service_resolver();
        let mut registry = self.registry.subscribe();
        let mut tick = tokio::time::interval(self.settings.refresh_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(%service, interval_ms = self.settings.refresh_interval.as_millis() as u64,
            host = ?self.settings.host, "discovery started");
        'run: loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    // A refresh can wait up to resolve_timeout and
                    // query_timeout for a dead pod; this pod's own changes
                    // are published meanwhile, not after it.
                    let refresh = self.refresh(&resolver, &service);
                    tokio::pin!(refresh);
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => break 'run,
                            _ = &mut refresh => break,
                            changed = registry.changed() => {
                                if changed.is_err() {
                                    break 'run;
                                }
                                self.publish_local();
                            }
                        }
                    }
                }
                changed = registry.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.publish_local();
                }
            }
        }
    }

    /// Publishes a change of this pod's registry: the other pods as they
    /// were last seen.
    fn publish_local(&self) {
        let previous = self.snapshot();
        self.publish(
            &previous,
            previous.pods.clone(),
            previous.dns_error.clone(),
            false,
        );
    }

    /// One full refresh.
    async fn refresh(&self, resolver: &TokioResolver, service: &str) {
        let addrs = resolve(resolver, service, self.settings.resolve_timeout).await;
        self.refresh_from(addrs).await;
    }

    /// One full refresh from the service's addresses (or why they could not
    /// be had): asks every pod and publishes the result.
    ///
    /// A failure is counted every time but logged as a warning only when it
    /// begins (a pod listed for hours without answering is one line, not one
    /// per refresh); its repeats are debug lines.
    pub async fn refresh_from(&self, addrs: Result<Vec<IpAddr>, String>) {
        let addrs = match addrs {
            Ok(addrs) => addrs,
            Err(e) => {
                let previous = self.snapshot();
                count_error(m::discovery_reason::RESOLVE);
                if previous.dns_error.is_none() {
                    warn!(error = %e, "discovery: cannot resolve the service; keeping the previous members");
                } else {
                    debug!(error = %e, "discovery: still cannot resolve the service");
                }
                self.publish(&previous, previous.pods.clone(), Some(e), true);
                return;
            }
        };
        let answers = self.query_all(&addrs).await;
        // Read after the queries: this pod's changes may have been
        // published while they ran.
        let previous = self.snapshot();
        if previous.dns_error.is_some() {
            info!("discovery: the service resolves again");
        }
        let mut pods = Vec::with_capacity(answers.len());
        for (ip, answer) in answers {
            let before = previous.pods.iter().find(|p| p.addr == Some(ip));
            match answer {
                Ok(a) => {
                    if before.is_some_and(|b| b.error.is_some()) {
                        info!(pod = %ip, host = %a.host, "discovery: pod answers again");
                    }
                    pods.push(PodState {
                        addr: Some(ip),
                        host: a.host,
                        source: a.source,
                        nodes: a.nodes,
                        error: None,
                    })
                }
                Err(e) => {
                    count_error(e.label());
                    let kept = before.is_some_and(|b| !b.nodes.is_empty());
                    if before.is_none_or(|b| b.error.is_none()) {
                        // Many pods can fail at once (a partition).
                        warn_throttled!(pod = %ip, error = %e, kept, "discovery: pod did not answer");
                    } else {
                        debug!(pod = %ip, error = %e, kept, "discovery: pod still does not answer");
                    }
                    if let Some(before) = before {
                        pods.push(PodState {
                            error: Some(e.to_string()),
                            ..before.clone()
                        });
                    } else {
                        pods.push(PodState {
                            addr: Some(ip),
                            host: String::new(),
                            source: Source::Sidecar,
                            nodes: Vec::new(),
                            error: Some(e.to_string()),
                        });
                    }
                }
            }
        }
        // A host part names one pod: what an address that no longer answers
        // last said is superseded by another address answering for the same
        // host now (the pod moved), so none of its old nodes linger.
        let answered: BTreeSet<String> = pods
            .iter()
            .filter(|p| p.error.is_none())
            .map(|p| p.host.clone())
            .collect();
        for pod in pods.iter_mut() {
            if pod.error.is_some() && answered.contains(&pod.host) {
                pod.nodes.clear();
            }
        }
        self.warn_shared_hosts(&pods);
        self.publish(&previous, pods, None, true);
    }

    /// Warns when pods begin to answer with one host part (every pod's
    /// `discovery.host` set to the Service name, say): their nodes' names
    /// then name no single pod, and those claiming this pod's host are
    /// taken for this pod and left out.
    fn warn_shared_hosts(&self, pods: &[PodState]) {
        let mut seen = BTreeSet::new();
        let shared: BTreeSet<String> = pods
            .iter()
            .filter(|p| p.error.is_none())
            .filter(|p| !seen.insert(p.host.as_str()))
            .map(|p| p.host.clone())
            .collect();
        let mut last = self.shared_hosts.lock().unwrap_or_else(|e| e.into_inner());
        let new: Vec<&String> = shared.difference(&last).collect();
        if !new.is_empty() {
            warn!(hosts = ?new, "discovery: more than one pod answers with the same host part; each pod's discovery.host must name that pod alone");
        }
        *last = shared;
    }

    /// Asks every pod, at most `max_concurrent_queries` at once, each within
    /// `query_timeout`: a slow pod delays nobody else's answer.
    async fn query_all(
        &self,
        addrs: &[IpAddr],
    ) -> Vec<(IpAddr, Result<PodAnswer, query::QueryError>)> {
        let permits = Arc::new(Semaphore::new(self.settings.max_concurrent_queries.max(1)));
        let mut set = JoinSet::new();
        for &ip in addrs {
            let permits = Arc::clone(&permits);
            let template = self.settings.host_template.clone();
            let (port, timeout) = (self.settings.epmd_port, self.settings.query_timeout);
            set.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let addr = query::epmd_addr(ip, port);
                (ip, query::query_pod(addr, timeout, template.as_ref()).await)
            });
        }
        let mut answers = Vec::with_capacity(addrs.len());
        while let Some(joined) = set.join_next().await {
            if let Ok(answer) = joined {
                answers.push(answer);
            }
        }
        answers.sort_by_key(|(ip, _)| *ip);
        answers
    }

    /// Builds the member list from `pods` and this pod's registry and
    /// publishes it; the version changes only if the members did.
    fn publish(
        &self,
        previous: &Snapshot,
        pods: Vec<PodState>,
        dns_error: Option<String>,
        full: bool,
    ) {
        let own = self.settings.host.clone().unwrap_or_default();
        // This pod's entry comes from its registry, not from the network.
        let mut pods: Vec<PodState> = pods
            .into_iter()
            .filter(|p| p.addr.is_some() && p.host != own)
            .collect();
        pods.push(PodState {
            addr: None,
            host: own.clone(),
            source: Source::Local,
            nodes: local_entries(&self.registry),
            error: None,
        });
        let mut members = BTreeMap::new();
        for pod in &pods {
            if pod.host.is_empty() {
                continue;
            }
            for node in &pod.nodes {
                if let Some(full_name) = member_name(&node.name, &pod.host) {
                    members.entry(full_name).or_insert(node.node_type);
                }
            }
        }
        let members: Vec<Entry> = members
            .into_iter()
            .map(|(name, node_type)| Entry { name, node_type })
            .collect();
        let version = if members == previous.members && previous.version != 0 {
            previous.version
        } else {
            previous.version.wrapping_add(1).max(1)
        };
        if version != previous.version {
            let before: BTreeSet<&str> = previous.members.iter().map(|e| e.name.as_str()).collect();
            let after: BTreeSet<&str> = members.iter().map(|e| e.name.as_str()).collect();
            let joined: Vec<&&str> = after.difference(&before).collect();
            let left: Vec<&&str> = before.difference(&after).collect();
            info!(
                version,
                members = members.len(),
                ?joined,
                ?left,
                "discovery: members changed"
            );
        }
        metrics::gauge!(m::DISCOVERY_MEMBERS).set(members.len() as f64);
        metrics::gauge!(m::DISCOVERY_PODS).set(pods.len() as f64);
        let snapshot = Snapshot {
            version,
            refreshes: previous.refreshes + u64::from(full),
            last_refresh: if full {
                Some(SystemTime::now())
            } else {
                previous.last_refresh
            },
            dns_error,
            pods,
            members,
        };
        self.state.send_replace(Arc::new(snapshot));
    }

    /// `/members`: the list and how it was formed.
    pub fn to_json(&self) -> serde_json::Value {
        let s = self.snapshot();
        serde_json::json!({
            "enabled": self.enabled(),
            "service": self.settings.service,
            "host": self.settings.host,
            "refresh_interval_ms": self.settings.refresh_interval.as_millis() as u64,
            "version": s.version,
            "refreshes": s.refreshes,
            "last_refresh_unix_ms": s.last_refresh
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64),
            "dns_error": s.dns_error,
            "members": s.members.iter().map(|e| serde_json::json!({
                "name": e.name,
                "hidden": e.hidden(),
            })).collect::<Vec<_>>(),
            "pods": s.pods,
        })
    }
}

impl DiscoveryAnswers for Discovery {
    fn pod_info(&self, out: &mut BytesMut) -> &'static str {
        self.encode_pod_info_reply(out)
    }

    fn members<'a>(
        &'a self,
        known_version: u32,
        wait_ms: u32,
        shutdown: &'a CancellationToken,
        out: &'a mut BytesMut,
    ) -> BoxFuture<'a, &'static str> {
        self.encode_members_reply(known_version, wait_ms, shutdown, out)
            .boxed()
    }
}

/// The full name `short@host` of a member, or `None` when the two cannot
/// form one: a short name with `@`, white space or a control character
/// (EPMD registers such names, but they would split wrongly, or start a
/// false line in `distproxy members`), a host part
/// [`naming::check_host`] refuses, or a name too long for EPMD.
fn member_name(short: &str, host: &str) -> Option<String> {
    if short
        .chars()
        .any(|c| c == '@' || c.is_whitespace() || c.is_control())
        || naming::check_host(host).is_err()
    {
        return None;
    }
    let full = format!("{short}@{host}");
    crate::epmd::proto::validate_name(full.as_bytes()).ok()?;
    Some(full)
}

/// This pod's registered nodes, sorted by name.
fn local_entries(registry: &Registry) -> Vec<Entry> {
    let mut nodes: Vec<Entry> = registry
        .list()
        .into_iter()
        .map(|n| Entry {
            name: n.spec.name,
            node_type: n.spec.node_type,
        })
        .collect();
    nodes.sort();
    nodes
}

fn count_error(reason: &'static str) {
    metrics::counter!(m::DISCOVERY_REFRESH_ERRORS, "reason" => reason).increment(1);
}

/// A resolver from the system configuration whose cache never outlives a
/// refresh: every refresh asks the name server again, so the refresh
/// interval is the effective TTL.
fn service_resolver() -> TokioResolver {
    let mut opts = ResolverOpts::default();
    match TokioResolver::builder_tokio() {
        Ok(mut builder) => {
            opts.clone_from(builder.options_mut());
            opts.positive_max_ttl = Some(Duration::ZERO);
            opts.negative_max_ttl = Some(Duration::ZERO);
            *builder.options_mut() = opts;
            builder.build()
        }
        Err(e) => {
            warn!(error = %e, "discovery: cannot read the system resolver configuration; using /etc/hosts only");
            opts.positive_max_ttl = Some(Duration::ZERO);
            opts.negative_max_ttl = Some(Duration::ZERO);
            TokioResolver::builder_with_config(
                ResolverConfig::new(),
                TokioConnectionProvider::default(),
            )
            .with_options(opts)
            .build()
        }
    }
}

/// Whether the name server answered that the name has no records: "no such
/// name" (NXDOMAIN) or no data (NOERROR, no answer). hickory reports a
/// SERVFAIL or REFUSED answer as "no records found" too, but those say the
/// server could not answer: a failure, which keeps the previous members.
fn no_such_records(e: &hickory_resolver::ResolveError) -> bool {
    use hickory_resolver::proto::op::ResponseCode;
    use hickory_resolver::proto::ProtoErrorKind;
    match e.proto().map(|p| p.kind()) {
        Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) => {
            matches!(
                *response_code,
                ResponseCode::NXDomain | ResponseCode::NoError
            )
        }
        _ => false,
    }
}

/// The service's addresses, deduplicated and sorted. "No such name" or "no
/// records" is an empty list (no pod is ready); any other failure is an
/// error.
async fn resolve(
    resolver: &TokioResolver,
    service: &str,
    timeout: Duration,
) -> Result<Vec<IpAddr>, String> {
    if let Ok(ip) = service.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    match tokio::time::timeout(timeout, resolver.lookup_ip(service)).await {
        Err(_) => Err(format!(
            "timed out resolving {service} after {} ms",
            timeout.as_millis()
        )),
        Ok(Err(e)) if no_such_records(&e) => Ok(Vec::new()),
        Ok(Err(e)) => Err(format!("failed to resolve {service}: {e}")),
        Ok(Ok(lookup)) => {
            let set: BTreeSet<IpAddr> = lookup.iter().map(|ip| ip.to_canonical()).collect();
            Ok(set.into_iter().collect())
        }
    }
}
