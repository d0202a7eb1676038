//! Mutual TLS between sidecars: configuration from PEM files, handshakes
//! with deadlines and classified failures, node-name binding, and reloading
//! of the files while connections stay up.
//!
//! # What is checked
//!
//! - **TLS 1.3 only**, rustls with the `ring` provider. Both sides present a
//!   certificate; both check the other's chain against `ca_file` (mutual TLS
//!   is mandatory: a client without a certificate is refused).
//! - The dialling side checks the server's certificate according to
//!   [`ServerNameVerification`]: `hostname` also requires the host it dialled
//!   (the host part of the remote node's name) in the certificate's DNS or IP
//!   SANs; `ca_only` accepts any certificate of the CA. `ca_only` still
//!   verifies the chain, validity, the server-auth usage and the handshake
//!   signature — it only skips the name, so it proves "a pod of this CA", not
//!   "pod X". That is what a workload with IP-named nodes and one shared
//!   certificate can prove; a StatefulSet with DNS names should use
//!   `hostname`.
//! - With `bind_node_names`, [`check_node_binding`] compares the initiator
//!   node named inside the tunnel with the client certificate's SANs
//!   ([`PeerIdentity`]), so a pod cannot speak as another pod's nodes.
//!
//! # Choices
//!
//! - **No SNI** is sent: the server presents one certificate anyway, and SNI
//!   would put the remote host name on the wire in clear text.
//! - **No session resumption** (no tickets, no session cache): every
//!   connection does a full handshake with a fresh certificate check, so a
//!   CA or certificate rotation applies to every new connection. Distribution
//!   connections are long-lived; the cost is negligible.
//! - In TLS 1.3 the client finishes its handshake before the server has
//!   checked the client's certificate. [`Tls::connect`] succeeding therefore
//!   means *the server's* certificate was accepted; a server that refuses
//!   ours answers with an alert that surfaces as an error on the first read
//!   ([`classify_io_error`] names it).
//!
//! # Reloading
//!
//! Kubernetes updates a mounted Secret by writing a new directory and
//! atomically re-pointing the `..data` symlink, so the configured paths
//! (symlinks) never change while their targets do. [`TlsReloader`] re-reads
//! the three files through their paths every `reload_interval_ms` and
//! compares their contents (a hash) with what is loaded — robust against
//! symlink swaps, in-place rewrites and inode reuse alike. On a change it
//! builds new configurations and swaps them in atomically ([`ArcSwap`]):
//! new handshakes use them, established sessions keep theirs. A file that
//! cannot be read or a bad certificate/key/CA keeps the previous
//! configuration, is logged with the reason, and is counted in
//! `distproxy_tls_reload_failures_total` once per distinct bad state.
#![forbid(unsafe_code)]

mod identity;
mod load;
mod reload;
mod slots;

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;
use tracing::info;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError};

pub use crate::config::ServerNameVerification;
use crate::config::{LimitsConfig, TlsConfig};
use crate::metrics::{self as m, tls_reason};

pub use identity::{check_node_binding, BindingError, PeerIdentity};
pub use load::TlsLoadError;
use load::{build, provider, Generation, PemFiles};

/// The ALPN protocol a sidecar's tunnel client offers and its server
/// accepts: what tells the tunnel from nodes' own TLS distribution on the
/// distribution port (`distribution::beam_tls`). A server still serves a
/// client that offers none (a sidecar of an earlier version).
pub const TUNNEL_ALPN: &[u8] = b"distproxy-tunnel/1";
pub use reload::{ReloadOutcome, TlsReloader};
pub use slots::share as per_source_share;

/// The accepting side's stream.
pub type ServerTlsStream<IO> = tokio_rustls::server::TlsStream<IO>;
/// The dialling side's stream.
pub type ClientTlsStream<IO> = tokio_rustls::client::TlsStream<IO>;

/// TLS settings taken from `[tls]`, for a configuration with TLS enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
    pub verify_server_name: ServerNameVerification,
    pub handshake_timeout: Duration,
    pub reload_interval: Duration,
    /// Handshakes in flight at once, each side (`limits.max_tls_handshakes`):
    /// each costs tens of KiB until it completes. Waiting for a slot counts
    /// against the handshake's deadline.
    pub max_handshakes: usize,
    /// Incoming handshakes from IPv6 addresses share a source's slots by
    /// this prefix (`limits.ipv6_source_prefix_len`; 128: per address).
    pub ipv6_source_prefix_len: u8,
}

impl TlsSettings {
    /// `None` when TLS is not configured (the files are not set). Expects a
    /// validated configuration. The distribution port's policies
    /// (`require_tls`, `bind_node_names`) are not here: the listener and the
    /// tunnel's inbound side apply them.
    pub fn from_config(config: &TlsConfig, limits: &LimitsConfig) -> Option<TlsSettings> {
        Some(TlsSettings {
            cert_file: config.cert_file.clone()?,
            key_file: config.key_file.clone()?,
            ca_file: config.ca_file.clone()?,
            verify_server_name: config.verify_server_name,
            handshake_timeout: config.handshake_timeout_ms.duration(),
            reload_interval: config.reload_interval_ms.duration(),
            max_handshakes: limits.max_tls_handshakes,
            ipv6_source_prefix_len: limits.ipv6_source_prefix_len,
        })
    }
}

/// A failed handshake, classified for metrics and logs.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS handshake timed out after {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("TLS handshake failed ({reason}): {source}")]
    Handshake {
        reason: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("peer certificate unusable: {0}")]
    PeerCertificate(String),
    #[error("cannot verify a server by the name {0:?} (not a DNS name or IP address)")]
    ServerName(String),
}

impl TlsError {
    /// The `reason` label ([`crate::metrics::tls_reason`]).
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::Timeout(_) => tls_reason::TIMEOUT,
            TlsError::Handshake { reason, .. } => reason,
            TlsError::PeerCertificate(_) => tls_reason::BAD_CERT,
            TlsError::ServerName(_) => tls_reason::NAME_MISMATCH,
        }
    }

    /// True when the peer closed or reset the connection during the
    /// handshake without a TLS alert: on the connecting side, a sidecar
    /// without `[tls]` (it closes a TLS connection at once) or one that
    /// refused this connection before TLS (a limit); its own log says which.
    pub fn closed_by_peer(&self) -> bool {
        matches!(self, TlsError::Handshake { source, .. }
        if source.get_ref().is_none_or(|i| i.downcast_ref::<rustls::Error>().is_none())
            && matches!(
                source.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ))
    }

    fn handshake(source: io::Error) -> TlsError {
        TlsError::Handshake {
            reason: classify_io_error(&source),
            source,
        }
    }
}

/// Classifies an I/O error of a TLS stream — during the handshake, or on the
/// first read after [`Tls::connect`], where a server's refusal of our
/// certificate shows up in TLS 1.3.
pub fn classify_io_error(e: &io::Error) -> &'static str {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(e) => classify(e),
        None => tls_reason::PROTOCOL,
    }
}

/// Classifies a rustls error.
pub fn classify(e: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match e {
        E::NoCertificatesPresented => tls_reason::NO_CLIENT_CERT,
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => tls_reason::UNKNOWN_CA,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                tls_reason::NAME_MISMATCH
            }
            _ => tls_reason::BAD_CERT,
        },
        E::AlertReceived(a) => match a {
            AlertDescription::UnknownCA => tls_reason::UNKNOWN_CA,
            AlertDescription::CertificateRequired => tls_reason::NO_CLIENT_CERT,
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown => tls_reason::BAD_CERT,
            _ => tls_reason::PROTOCOL,
        },
        _ => tls_reason::PROTOCOL,
    }
}

/// Which side of a handshake (`side` label of the failure counter).
/// For an outgoing tunnel whose first read failed before a byte came
/// back: the `reason` label when that failure is the remote sidecar's alert
/// refusing this sidecar's certificate. In TLS 1.3 the client's handshake
/// ends before the server has judged the client certificate, so the
/// server's refusal (unknown CA, expired, wrong usage) arrives as an alert
/// on the first read, not from the handshake. Counts it in
/// `distproxy_tls_handshake_failures_total{side="connect"}` like a failed
/// handshake; `None` (nothing counted) for any other error.
pub fn count_refusal_after_handshake(e: &io::Error) -> Option<&'static str> {
    if !is_alert(e) {
        return None;
    }
    let reason = classify_io_error(e);
    metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "side" => Side::Connect.label(), "reason" => reason)
        .increment(1);
    Some(reason)
}

/// Whether `e` is a TLS alert the peer sent (a refusal, after the
/// handshake in TLS 1.3 when it is of this side's certificate).
pub fn is_alert(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::AlertReceived(_)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Accept,
    Connect,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Accept => "accept",
            Side::Connect => "connect",
        }
    }
}

fn count_failure(side: Side, e: &TlsError) {
    metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "side" => side.label(), "reason" => e.reason())
        .increment(1);
}

/// The TLS configurations in force, shared by every connection task. Cheap
/// to use concurrently: each handshake takes the current generation.
pub struct Tls {
    settings: TlsSettings,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Generation>,
    /// Bounds the incoming handshakes in flight
    /// (`TlsSettings::max_handshakes`).
    handshakes: Arc<tokio::sync::Semaphore>,
    /// Bounds the outgoing ones, as many: slots of their own, so incoming
    /// handshakes stalled by remote peers (from as many addresses as it
    /// takes to pass the per-address share) never hold up this sidecar's
    /// own tunnels, which its local nodes asked for.
    dialled: tokio::sync::Semaphore,
    /// Each remote source's share of the incoming slots (see [`slots`]).
    sources: slots::SourceSlots,
    /// Each remote address's share of the outgoing slots: handshakes with
    /// a sidecar that accepts connections but never answers (stopped,
    /// frozen, overloaded) wait in their address's share, so the tunnels
    /// this pod's nodes open to other pods still get slots.
    destinations: slots::SourceSlots,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("settings", &self.settings)
            .field("certificate", &self.current.load().local.to_string())
            .finish()
    }
}

impl Tls {
    /// Reads and checks the three files. Start-up fails on an error here;
    /// later changes go through [`TlsReloader`].
    pub fn load(settings: TlsSettings) -> Result<Arc<Tls>, TlsLoadError> {
        let provider = provider();
        let files = PemFiles::read(&settings)?;
        let generation = build(&settings, &provider, &files)?;
        metrics::gauge!(m::TLS_CERT_NOT_AFTER).set(generation.local.not_after as f64);
        m::export_tls_failures_at_zero();
        info!(cert = %settings.cert_file.display(), identity = %generation.local,
            verify_server_name = ?settings.verify_server_name, "TLS certificate loaded");
        // Start anyway (the pod's nodes still register, and a renewed file is
        // picked up by the reloader), but say why every peer will refuse it.
        if let Some(problem) = generation.local.validity_problem(reload::unix_now()) {
            tracing::error!(cert = %settings.cert_file.display(), %problem,
                "TLS certificate is not valid now; every peer will refuse this sidecar's tunnels until it is replaced");
        }
        Ok(Arc::new(Tls {
            handshakes: Arc::new(tokio::sync::Semaphore::new(settings.max_handshakes)),
            dialled: tokio::sync::Semaphore::new(settings.max_handshakes),
            sources: slots::SourceSlots::new(
                settings.max_handshakes,
                settings.ipv6_source_prefix_len,
            ),
            // Other pods, each on its own address even where they share a
            // prefix (the pods of one Kubernetes node share its /64).
            destinations: slots::SourceSlots::new(settings.max_handshakes, 128),
            settings,
            provider,
            current: ArcSwap::from_pointee(generation),
        }))
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// Incoming handshakes holding a slot now (at most `max_handshakes`).
    pub fn handshakes_in_flight(&self) -> usize {
        self.settings.max_handshakes - self.handshakes.available_permits()
    }

    /// Remote sources with an accepted handshake holding or waiting for a
    /// slot.
    pub fn handshake_sources(&self) -> usize {
        self.sources.sources()
    }

    /// Outgoing handshakes holding a slot now (at most `max_handshakes`).
    pub fn dials_in_flight(&self) -> usize {
        self.settings.max_handshakes - self.dialled.available_permits()
    }

    /// The certificate this sidecar presents now.
    pub fn local_identity(&self) -> PeerIdentity {
        self.current.load().local.clone()
    }

    /// A watcher that reloads the files when they change.
    pub fn reloader(self: &Arc<Self>) -> TlsReloader {
        TlsReloader::new(Arc::clone(self))
    }

    /// Server side of a handshake (the `0x16` branch of the distribution
    /// port), with the "TLS handshake" deadline. Returns the stream and the
    /// client certificate's identity. Failures are counted by reason; the
    /// caller logs them with the peer's address. Takes a global slot only:
    /// connections from the network go through [`Tls::accept_from`].
    pub async fn accept<IO>(&self, io: IO) -> Result<(ServerTlsStream<IO>, PeerIdentity), TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        self.accept_inner(io, None).await
    }

    /// [`Tls::accept`] for a connection from `peer`: unless `peer` is
    /// loopback, the handshake first takes one of that address's share of
    /// the slots ([`per_source_share`] of `limits.max_tls_handshakes`), so
    /// stalled handshakes from one address cannot hold every slot.
    pub async fn accept_from<IO>(
        &self,
        io: IO,
        peer: IpAddr,
    ) -> Result<(ServerTlsStream<IO>, PeerIdentity), TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let source = (!peer.to_canonical().is_loopback()).then_some(peer);
        self.accept_inner(io, source).await
    }

    async fn accept_inner<IO>(
        &self,
        io: IO,
        source: Option<IpAddr>,
    ) -> Result<(ServerTlsStream<IO>, PeerIdentity), TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.current.load().server));
        let deadline = self.settings.handshake_timeout;
        let handshake = async {
            let _source_slot = match source {
                Some(ip) => Some(self.sources.acquire(ip).await),
                None => None,
            };
            let _slot = self.handshakes.acquire().await;
            acceptor.accept(io).await
        };
        let result = match tokio::time::timeout(deadline, handshake).await {
            Err(_) => Err(TlsError::Timeout(deadline)),
            Ok(Err(e)) => Err(TlsError::handshake(e)),
            Ok(Ok(stream)) => match PeerIdentity::of_peer(stream.get_ref().1) {
                Some(Ok(identity)) => Ok((stream, identity)),
                Some(Err(e)) => Err(TlsError::PeerCertificate(e)),
                // The verifier makes a client certificate mandatory.
                None => Err(TlsError::Handshake {
                    reason: tls_reason::NO_CLIENT_CERT,
                    source: io::Error::other("no client certificate"),
                }),
            },
        };
        if let Err(e) = &result {
            count_failure(Side::Accept, e);
        }
        result
    }

    /// Client side of a handshake, with the "TLS handshake" deadline.
    /// `server_name` is the host that was dialled (the host part of the
    /// remote node's name, a DNS name or an IP address); with
    /// `verify_server_name = "hostname"` the server's certificate must name
    /// it. It is not sent (no SNI).
    /// Takes a global outgoing slot only: connections to another pod's
    /// sidecar go through [`Tls::connect_to`].
    pub async fn connect<IO>(
        &self,
        io: IO,
        server_name: &str,
    ) -> Result<ClientTlsStream<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let result = self.connect_inner(io, server_name, None).await;
        if let Err(e) = &result {
            count_failure(Side::Connect, e);
        }
        result
    }

    /// [`Tls::connect`] over a connection to `remote`: the handshake first
    /// takes one of that address's share of the outgoing slots
    /// ([`per_source_share`] of `limits.max_tls_handshakes`), so handshakes
    /// with a sidecar that accepts but never answers (a stopped or frozen
    /// pod) cannot hold every slot while tunnels to other pods wait for
    /// one until their deadline.
    pub async fn connect_to<IO>(
        &self,
        io: IO,
        server_name: &str,
        remote: IpAddr,
    ) -> Result<ClientTlsStream<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let result = self.connect_inner(io, server_name, Some(remote)).await;
        if let Err(e) = &result {
            count_failure(Side::Connect, e);
        }
        result
    }

    async fn connect_inner<IO>(
        &self,
        io: IO,
        server_name: &str,
        remote: Option<IpAddr>,
    ) -> Result<ClientTlsStream<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let bare = server_name.strip_suffix('.').unwrap_or(server_name);
        let name = match ServerName::try_from(bare.to_string()) {
            Ok(n) => n,
            // Not checked with ca_only: any syntactically valid placeholder.
            Err(_) if self.settings.verify_server_name == ServerNameVerification::CaOnly => {
                ServerName::try_from("distproxy.invalid").expect("valid DNS name")
            }
            Err(_) => return Err(TlsError::ServerName(server_name.to_string())),
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.current.load().client));
        let deadline = self.settings.handshake_timeout;
        let handshake = async {
            let _destination_slot = match remote {
                Some(ip) => Some(self.destinations.acquire(ip).await),
                None => None,
            };
            let _slot = self.dialled.acquire().await;
            connector.connect(name, io).await
        };
        match tokio::time::timeout(deadline, handshake).await {
            Err(_) => Err(TlsError::Timeout(deadline)),
            Ok(Err(e)) => Err(TlsError::handshake(e)),
            Ok(Ok(stream)) => Ok(stream),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified() {
        use rustls::Error as E;
        assert_eq!(
            classify(&E::NoCertificatesPresented),
            tls_reason::NO_CLIENT_CERT
        );
        assert_eq!(
            classify(&E::InvalidCertificate(CertificateError::UnknownIssuer)),
            tls_reason::UNKNOWN_CA
        );
        assert_eq!(
            classify(&E::InvalidCertificate(CertificateError::NotValidForName)),
            tls_reason::NAME_MISMATCH
        );
        assert_eq!(
            classify(&E::InvalidCertificate(CertificateError::Expired)),
            tls_reason::BAD_CERT
        );
        assert_eq!(
            classify(&E::AlertReceived(AlertDescription::UnknownCA)),
            tls_reason::UNKNOWN_CA
        );
        assert_eq!(
            classify(&E::AlertReceived(AlertDescription::CertificateRequired)),
            tls_reason::NO_CLIENT_CERT
        );
        assert_eq!(
            classify(&E::AlertReceived(AlertDescription::BadCertificate)),
            tls_reason::BAD_CERT
        );
        assert_eq!(
            classify(&E::AlertReceived(AlertDescription::ProtocolVersion)),
            tls_reason::PROTOCOL
        );
        let wrapped = io::Error::new(io::ErrorKind::InvalidData, E::NoCertificatesPresented);
        assert_eq!(classify_io_error(&wrapped), tls_reason::NO_CLIENT_CERT);
        let plain = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(classify_io_error(&plain), tls_reason::PROTOCOL);
        assert_eq!(
            TlsError::Timeout(Duration::from_secs(1)).reason(),
            tls_reason::TIMEOUT
        );
    }

    #[test]
    fn settings_only_when_the_files_are_set() {
        let mut c = TlsConfig::default();
        assert_eq!(TlsSettings::from_config(&c, &LimitsConfig::default()), None);
        c.cert_file = Some("/c".into());
        c.key_file = Some("/k".into());
        assert_eq!(TlsSettings::from_config(&c, &LimitsConfig::default()), None);
        c.ca_file = Some("/ca".into());
        c.verify_server_name = ServerNameVerification::CaOnly;
        let s = TlsSettings::from_config(&c, &LimitsConfig::default()).unwrap();
        assert_eq!(s.ca_file, PathBuf::from("/ca"));
        assert_eq!(s.verify_server_name, ServerNameVerification::CaOnly);
        assert_eq!(s.handshake_timeout, Duration::from_millis(5000));
    }
}
