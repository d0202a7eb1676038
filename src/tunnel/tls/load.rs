//! Building rustls configurations from the PEM files.

use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

pub use crate::config::ServerNameVerification;

use super::{PeerIdentity, TlsSettings, TUNNEL_ALPN};

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

/// The contents of the three files, as read together.
pub(super) struct PemFiles {
    pub(super) cert: Vec<u8>,
    pub(super) key: Vec<u8>,
    pub(super) ca: Vec<u8>,
}

impl PemFiles {
    pub(super) fn read(s: &TlsSettings) -> Result<PemFiles, TlsLoadError> {
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

    pub(super) fn digest(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&self.cert, &self.key, &self.ca).hash(&mut h);
        h.finish()
    }
}

/// One generation of configurations, built from one set of file contents.
pub(super) struct Generation {
    pub(super) server: Arc<ServerConfig>,
    pub(super) client: Arc<ClientConfig>,
    /// This sidecar's own certificate.
    pub(super) local: PeerIdentity,
    /// Digest of the file contents it was built from.
    pub(super) digest: u64,
}

pub(super) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(super) fn build(
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

    if is_encrypted_key(&files.key) {
        return Err(invalid(
            "tls.key_file",
            &s.key_file,
            "is an encrypted private key; distproxy reads unencrypted keys only \
             (PKCS#8, PKCS#1 or SEC1 PEM, as cert-manager writes them)"
                .to_string(),
        ));
    }
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
        let message = match e {
            // A Secret put together from two issuances (or a half-done
            // manual rotation): say so, not rustls' "keys may not be
            // consistent".
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => format!(
                "is not the private key of the certificate in {} (a key and certificate of different issuances?)",
                s.cert_file.display()
            ),
            e => format!("unusable with {}: {e}", s.cert_file.display()),
        };
        invalid("tls.key_file", &s.key_file, message)
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
    // What tells the tunnel from nodes' own TLS on the distribution port
    // (`distribution::beam_tls`); a client offering none is still served.
    server.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
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
    client.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
    client.resumption = rustls::client::Resumption::disabled();

    Ok(Generation {
        server: Arc::new(server),
        client: Arc::new(client),
        local,
        digest: files.digest(),
    })
}

/// A PEM private key protected by a passphrase, which rustls skips as an
/// unknown section ("contains no private key" would send the user looking
/// for a missing key): PKCS#8 `ENCRYPTED PRIVATE KEY`, or OpenSSL's
/// traditional `Proc-Type: 4,ENCRYPTED` header.
fn is_encrypted_key(pem: &[u8]) -> bool {
    let has = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    has(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || has(b"Proc-Type: 4,ENCRYPTED")
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
