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

use std::fmt;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    ServerConfig, SignatureScheme,
};

pub use crate::config::ServerNameVerification;
use crate::config::TlsConfig;
use crate::metrics::{self as m, tls_reason};

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
    /// Policy for the distribution port (see `config::TlsConfig`).
    pub require_tls: bool,
    /// Policy for the distribution port (see [`check_node_binding`]).
    pub bind_node_names: bool,
    pub handshake_timeout: Duration,
    pub reload_interval: Duration,
}

impl TlsSettings {
    /// `None` when TLS is not configured (the files are not set). Expects a
    /// validated configuration.
    pub fn from_config(config: &TlsConfig) -> Option<TlsSettings> {
        Some(TlsSettings {
            cert_file: config.cert_file.clone()?,
            key_file: config.key_file.clone()?,
            ca_file: config.ca_file.clone()?,
            verify_server_name: config.verify_server_name,
            require_tls: config.require_tls,
            bind_node_names: config.bind_node_names,
            handshake_timeout: config.handshake_timeout(),
            reload_interval: config.reload_interval(),
        })
    }
}

// ---------------------------------------------------------------------------
// Identities and node-name binding (no I/O)

/// The names a certificate carries: its SANs, plus serial and subject for
/// logs. For an accepted connection, the client certificate's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerIdentity {
    /// DNS SANs as written in the certificate (may start with `*.`).
    pub dns_names: Vec<String>,
    pub ip_addrs: Vec<IpAddr>,
    /// Serial number, hex bytes separated by `:`.
    pub serial: String,
    pub subject: String,
    /// Expiry as Unix time.
    pub not_after: i64,
}

impl PeerIdentity {
    /// Parses a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<PeerIdentity, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("bad certificate: {e}"))?;
        let mut id = PeerIdentity {
            serial: cert.raw_serial_as_string(),
            subject: cert.subject().to_string(),
            not_after: cert.validity().not_after.timestamp(),
            ..PeerIdentity::default()
        };
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("bad subjectAltName extension: {e}"))?;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            match name {
                GeneralName::DNSName(d) => id.dns_names.push(d.to_string()),
                GeneralName::IPAddress(b) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                        id.ip_addrs.push(IpAddr::from(v4));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                        id.ip_addrs.push(IpAddr::from(v6));
                    }
                }
                _ => {}
            }
        }
        Ok(id)
    }

    /// The identity of the peer of an established TLS connection (its
    /// end-entity certificate); `None` if it presented none.
    pub fn of_peer(conn: &rustls::CommonState) -> Option<Result<PeerIdentity, String>> {
        let certs = conn.peer_certificates()?;
        Some(PeerIdentity::from_der(certs.first()?.as_ref()))
    }

    /// Whether `host` (a node name's host part) is one of the SANs: an IP SAN
    /// equal to it, a DNS SAN equal to it (ASCII case-insensitive, trailing
    /// dot ignored), or a wildcard DNS SAN `*.rest` where `host` is one more
    /// label followed by `rest`.
    pub fn matches_host(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty() {
            return false;
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self
                .ip_addrs
                .iter()
                .any(|a| a.to_canonical() == ip.to_canonical());
        }
        self.dns_names.iter().any(|san| dns_name_matches(san, host))
    }
}

fn dns_name_matches(san: &str, host: &str) -> bool {
    let san = san.strip_suffix('.').unwrap_or(san);
    match san.strip_prefix("*.") {
        Some(suffix) => {
            !suffix.is_empty()
                && !suffix.contains('*')
                && host.split_once('.').is_some_and(|(label, rest)| {
                    !label.is_empty() && rest.eq_ignore_ascii_case(suffix)
                })
        }
        None => !san.contains('*') && san.eq_ignore_ascii_case(host),
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "serial {} SANs [", self.serial)?;
        let mut first = true;
        for d in &self.dns_names {
            write!(f, "{}DNS:{d}", if first { "" } else { ", " })?;
            first = false;
        }
        for ip in &self.ip_addrs {
            write!(f, "{}IP:{ip}", if first { "" } else { ", " })?;
            first = false;
        }
        write!(f, "]")
    }
}

/// Why an initiator's node name is not bound to the peer's certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error("node name {node:?} has no host part")]
    NoHost { node: String },
    #[error("host {host:?} of node {node:?} is not a name of the peer certificate ({identity})")]
    NotInCertificate {
        node: String,
        host: String,
        identity: String,
    },
}

/// With `bind_node_names`: the host part of `node_name` (`name@host`) must be
/// a DNS or IP SAN of the certificate the peer presented.
pub fn check_node_binding(identity: &PeerIdentity, node_name: &str) -> Result<(), BindingError> {
    let host = match crate::node_name::host_of(node_name) {
        Some(host) => host,
        None => {
            return Err(BindingError::NoHost {
                node: node_name.to_string(),
            })
        }
    };
    if identity.matches_host(host) {
        Ok(())
    } else {
        Err(BindingError::NotInCertificate {
            node: node_name.to_string(),
            host: host.to_string(),
            identity: identity.to_string(),
        })
    }
}

// ---------------------------------------------------------------------------
// Errors

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

/// Why certificates, key or CA could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsLoadError {
    #[error("failed to read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("invalid PEM in {what} {path}: {message}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{what} {path} contains no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{what} {path}: {message}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
}

// ---------------------------------------------------------------------------
// Building configurations from PEM

/// The contents of the three files, as read together.
struct PemFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl PemFiles {
    fn read(s: &TlsSettings) -> Result<PemFiles, TlsLoadError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| TlsLoadError::Read {
                what,
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(PemFiles {
            cert: read("tls.cert_file", &s.cert_file)?,
            key: read("tls.key_file", &s.key_file)?,
            ca: read("tls.ca_file", &s.ca_file)?,
        })
    }

    fn digest(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&self.cert, &self.key, &self.ca).hash(&mut h);
        h.finish()
    }
}

/// One generation of configurations, built from one set of file contents.
struct Generation {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// This sidecar's own certificate.
    local: PeerIdentity,
    /// Digest of the file contents it was built from.
    digest: u64,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(
    s: &TlsSettings,
    provider: &Arc<CryptoProvider>,
    files: &PemFiles,
) -> Result<Generation, TlsLoadError> {
    let pem_err = |what, path: &Path, e: rustls::pki_types::pem::Error| TlsLoadError::Pem {
        what,
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let invalid = |what, path: &Path, message: String| TlsLoadError::Invalid {
        what,
        path: path.to_path_buf(),
        message,
    };

    let chain = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err("tls.cert_file", &s.cert_file, e))?;
    let Some(leaf) = chain.first() else {
        return Err(TlsLoadError::Empty {
            what: "tls.cert_file",
            path: s.cert_file.clone(),
            expected: "certificate",
        });
    };
    let local = PeerIdentity::from_der(leaf.as_ref())
        .map_err(|e| invalid("tls.cert_file", &s.cert_file, e))?;

    let key = match PrivateKeyDer::from_pem_slice(&files.key) {
        Ok(k) => k,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsLoadError::Empty {
                what: "tls.key_file",
                path: s.key_file.clone(),
                expected: "private key",
            })
        }
        Err(e) => return Err(pem_err("tls.key_file", &s.key_file, e)),
    };

    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&files.ca) {
        let ca = ca.map_err(|e| pem_err("tls.ca_file", &s.ca_file, e))?;
        roots.add(ca).map_err(|e| {
            invalid(
                "tls.ca_file",
                &s.ca_file,
                format!("bad CA certificate: {e}"),
            )
        })?;
    }
    if roots.is_empty() {
        return Err(TlsLoadError::Empty {
            what: "tls.ca_file",
            path: s.ca_file.clone(),
            expected: "CA certificate",
        });
    }
    let roots = Arc::new(roots);

    let versions = &[&rustls::version::TLS13];
    let key_err = |e: rustls::Error| {
        invalid(
            "tls.key_file",
            &s.key_file,
            format!("unusable with {}: {e}", s.cert_file.display()),
        )
    };

    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(provider))
            .build()
            .map_err(|e| invalid("tls.ca_file", &s.ca_file, e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(versions)
        .map_err(|e| invalid("tls", &s.cert_file, e.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(key_err)?;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;

    let server_verifier: Arc<dyn ServerCertVerifier> = match s.verify_server_name {
        ServerNameVerification::Hostname => {
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::clone(&roots),
                Arc::clone(provider),
            )
            .build()
            .map_err(|e| invalid("tls.ca_file", &s.ca_file, e.to_string()))?
        }
        ServerNameVerification::CaOnly => Arc::new(CaOnlyVerifier {
            roots: Arc::clone(&roots),
            algorithms: provider.signature_verification_algorithms,
        }),
    };
    let mut client = ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(versions)
        .map_err(|e| invalid("tls", &s.cert_file, e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier)
        .with_client_auth_cert(chain, key)
        .map_err(key_err)?;
    client.enable_sni = false;
    client.resumption = rustls::client::Resumption::disabled();

    Ok(Generation {
        server: Arc::new(server),
        client: Arc::new(client),
        local,
        digest: files.digest(),
    })
}

/// `verify_server_name = "ca_only"`: WebPKI verification of the chain
/// (trust anchor, intermediates, validity, server-auth usage) and of the
/// handshake signature, without the name check.
#[derive(Debug)]
struct CaOnlyVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for CaOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------
// The handle

/// Which side of a handshake (`side` label of the failure counter).
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
        info!(cert = %settings.cert_file.display(), identity = %generation.local,
            verify_server_name = ?settings.verify_server_name, "TLS certificate loaded");
        Ok(Arc::new(Tls {
            settings,
            provider,
            current: ArcSwap::from_pointee(generation),
        }))
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// The certificate this sidecar presents now.
    pub fn local_identity(&self) -> PeerIdentity {
        self.current.load().local.clone()
    }

    /// A watcher that reloads the files when they change.
    pub fn reloader(self: &Arc<Self>) -> TlsReloader {
        TlsReloader {
            tls: Arc::clone(self),
            last_failed: None,
        }
    }

    /// Server side of a handshake (the `0x16` branch of the distribution
    /// port), with the "TLS handshake" deadline. Returns the stream and the
    /// client certificate's identity. Failures are counted by reason; the
    /// caller logs them with the peer's address.
    pub async fn accept<IO>(&self, io: IO) -> Result<(ServerTlsStream<IO>, PeerIdentity), TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&self.current.load().server));
        let deadline = self.settings.handshake_timeout;
        let result = match tokio::time::timeout(deadline, acceptor.accept(io)).await {
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
    pub async fn connect<IO>(
        &self,
        io: IO,
        server_name: &str,
    ) -> Result<ClientTlsStream<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let result = self.connect_inner(io, server_name).await;
        if let Err(e) = &result {
            count_failure(Side::Connect, e);
        }
        result
    }

    async fn connect_inner<IO>(
        &self,
        io: IO,
        server_name: &str,
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
        match tokio::time::timeout(deadline, connector.connect(name, io)).await {
            Err(_) => Err(TlsError::Timeout(deadline)),
            Ok(Err(e)) => Err(TlsError::handshake(e)),
            Ok(Ok(stream)) => Ok(stream),
        }
    }
}

// ---------------------------------------------------------------------------
// Reloading

/// What one look at the files found.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// Same contents as loaded (or the same bad contents as last time).
    Unchanged,
    /// New contents loaded; new handshakes use them.
    Reloaded(PeerIdentity),
    /// New contents that cannot be used; the previous ones stay.
    Failed(TlsLoadError),
}

/// Watches the three files and swaps in new configurations when their
/// contents change (see the module documentation).
pub struct TlsReloader {
    tls: Arc<Tls>,
    /// Digest of the last state that failed, so it is reported once.
    last_failed: Option<u64>,
}

impl TlsReloader {
    /// One look at the files (blocking file I/O: small reads).
    pub fn poll(&mut self) -> ReloadOutcome {
        let settings = &self.tls.settings;
        let files = PemFiles::read(settings);
        let digest = match &files {
            Ok(f) => f.digest(),
            Err(e) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                e.to_string().hash(&mut h);
                h.finish()
            }
        };
        if digest == self.tls.current.load().digest {
            self.last_failed = None;
            return ReloadOutcome::Unchanged;
        }
        if self.last_failed == Some(digest) {
            return ReloadOutcome::Unchanged;
        }
        match files.and_then(|f| build(settings, &self.tls.provider, &f)) {
            Ok(generation) => {
                let identity = generation.local.clone();
                info!(cert = %settings.cert_file.display(),
                    resolved = %resolved(&settings.cert_file).display(),
                    identity = %identity, "TLS files changed; new connections use the new certificate");
                metrics::gauge!(m::TLS_CERT_NOT_AFTER).set(identity.not_after as f64);
                metrics::counter!(m::TLS_RELOADS).increment(1);
                self.tls.current.store(Arc::new(generation));
                self.last_failed = None;
                ReloadOutcome::Reloaded(identity)
            }
            Err(e) => {
                warn!(error = %e, current = %self.tls.current.load().local,
                    "TLS files changed but cannot be loaded; keeping the current certificate");
                metrics::counter!(m::TLS_RELOAD_FAILURES).increment(1);
                self.last_failed = Some(digest);
                ReloadOutcome::Failed(e)
            }
        }
    }

    /// Polls every `reload_interval` until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.tls.settings.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the files were just loaded
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            self = match tokio::task::spawn_blocking(move || {
                self.poll();
                self
            })
            .await
            {
                Ok(me) => me,
                Err(e) => {
                    warn!(error = %e, "TLS reload task failed; reloading stops");
                    break;
                }
            };
        }
    }
}

/// The file a path finally points at (for logs), or the path itself.
fn resolved(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(dns: &[&str], ips: &[&str]) -> PeerIdentity {
        PeerIdentity {
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
            ip_addrs: ips.iter().map(|s| s.parse().unwrap()).collect(),
            ..PeerIdentity::default()
        }
    }

    #[test]
    fn exact_dns_names_match_case_insensitively() {
        let id = identity(&["pod-a.dp.test"], &[]);
        assert!(id.matches_host("pod-a.dp.test"));
        assert!(id.matches_host("POD-A.dp.test"));
        assert!(id.matches_host("pod-a.dp.test."));
        assert!(!id.matches_host("pod-b.dp.test"));
        assert!(!id.matches_host("x.pod-a.dp.test"));
        assert!(!id.matches_host("pod-a"));
        assert!(!id.matches_host(""));
    }

    #[test]
    fn wildcards_cover_exactly_one_label() {
        let id = identity(&["*.svc.test"], &[]);
        assert!(id.matches_host("pod-0.svc.test"));
        assert!(!id.matches_host("svc.test"));
        assert!(!id.matches_host("a.pod-0.svc.test"));
        assert!(!id.matches_host(".svc.test"));
        // A wildcard anywhere else is not a wildcard.
        assert!(!identity(&["pod-*.svc.test"], &[]).matches_host("pod-0.svc.test"));
        assert!(!identity(&["*."], &[]).matches_host("a."));
    }

    #[test]
    fn ip_hosts_match_ip_sans_only() {
        let id = identity(&["10.0.0.5"], &["10.0.0.7", "fd00::1"]);
        assert!(id.matches_host("10.0.0.7"));
        assert!(id.matches_host("fd00::1"));
        assert!(
            !id.matches_host("10.0.0.5"),
            "an IP is never matched by a DNS SAN"
        );
        assert!(!id.matches_host("10.0.0.8"));
        let mapped = identity(&[], &["::ffff:10.0.0.7"]);
        assert!(mapped.matches_host("10.0.0.7"));
    }

    #[test]
    fn node_binding_uses_the_host_part() {
        let id = identity(&["pod-a.dp.test"], &["10.1.0.2"]);
        assert_eq!(check_node_binding(&id, "x@pod-a.dp.test"), Ok(()));
        assert_eq!(check_node_binding(&id, "y@10.1.0.2"), Ok(()));
        assert!(matches!(
            check_node_binding(&id, "x@pod-b.dp.test"),
            Err(BindingError::NotInCertificate { ref host, .. }) if host == "pod-b.dp.test"
        ));
        assert!(matches!(
            check_node_binding(&id, "x"),
            Err(BindingError::NoHost { .. })
        ));
        assert!(matches!(
            check_node_binding(&id, "x@"),
            Err(BindingError::NoHost { .. })
        ));
        let err = check_node_binding(&id, "x@pod-b.dp.test")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pod-b.dp.test") && err.contains("DNS:pod-a.dp.test"),
            "{err}"
        );
    }

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
        assert_eq!(TlsSettings::from_config(&c), None);
        c.cert_file = Some("/c".into());
        c.key_file = Some("/k".into());
        assert_eq!(TlsSettings::from_config(&c), None);
        c.ca_file = Some("/ca".into());
        c.verify_server_name = ServerNameVerification::CaOnly;
        let s = TlsSettings::from_config(&c).unwrap();
        assert_eq!(s.ca_file, PathBuf::from("/ca"));
        assert_eq!(s.verify_server_name, ServerNameVerification::CaOnly);
        assert_eq!(s.handshake_timeout, Duration::from_millis(5000));
    }
}
