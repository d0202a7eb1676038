//! Test certificates (rcgen) and Kubernetes-style secret directories.
//!
//! A [`SecretDir`] lays files out the way the kubelet mounts a Secret:
//!
//! ```text
//! dir/..2024_01_01_00_00_00.000000001/{tls.crt,tls.key,ca.crt}
//! dir/..data -> ..2024_01_01_00_00_00.000000001
//! dir/tls.crt -> ..data/tls.crt     (and tls.key, ca.crt)
//! ```
//!
//! and [`SecretDir::write`] updates it the same way: a new timestamped
//! directory, a temporary symlink, an atomic `rename` over `..data`, then
//! the old directory is removed. The configured paths never change.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};

/// A certificate authority.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for both server and client auth, with `sans` (DNS names or
    /// IP addresses) and the given serial number.
    pub fn leaf(&self, sans: &[&str], serial: u64) -> Leaf {
        self.leaf_with(sans, serial, |_| {})
    }

    /// Like [`Ca::leaf`], with a chance to change the parameters.
    pub fn leaf_with(
        &self,
        sans: &[&str],
        serial: u64,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, sans.first().copied().unwrap_or("leaf"));
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        edit(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        }
    }
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub serial: u64,
}

impl Leaf {
    /// The serial as `PeerIdentity::serial` renders it (hex bytes with `:`,
    /// leading zero bytes dropped as DER does).
    pub fn serial_string(&self) -> String {
        let bytes = self.serial.to_be_bytes();
        let start = bytes.iter().position(|&b| b != 0).unwrap_or(7);
        let mut v: Vec<u8> = bytes[start..].to_vec();
        if v[0] & 0x80 != 0 {
            v.insert(0, 0);
        }
        v.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// A directory laid out like a mounted Kubernetes Secret.
pub struct SecretDir {
    pub dir: PathBuf,
}

impl SecretDir {
    /// Creates the layout under `dir` (which must exist) with the files.
    pub fn create(dir: &Path, cert: &str, key: &str, ca: &str) -> SecretDir {
        let s = SecretDir {
            dir: dir.to_path_buf(),
        };
        s.write_raw(cert.as_bytes(), key.as_bytes(), ca.as_bytes());
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(Path::new("..data").join(name), dir.join(name)).unwrap();
        }
        s
    }

    pub fn cert_file(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }
    pub fn key_file(&self) -> PathBuf {
        self.dir.join("tls.key")
    }
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Replaces the three files at once, as the kubelet does.
    pub fn write(&self, cert: &str, key: &str, ca: &str) {
        self.write_raw(cert.as_bytes(), key.as_bytes(), ca.as_bytes());
    }

    pub fn write_raw(&self, cert: &[u8], key: &[u8], ca: &[u8]) {
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let name = format!("..2024_01_01_00_00_00.{generation:09}");
        let new_dir = self.dir.join(&name);
        std::fs::create_dir(&new_dir).unwrap();
        std::fs::write(new_dir.join("tls.crt"), cert).unwrap();
        std::fs::write(new_dir.join("tls.key"), key).unwrap();
        std::fs::write(new_dir.join("ca.crt"), ca).unwrap();
        let data = self.dir.join("..data");
        let old = std::fs::read_link(&data).ok();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, &data).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}
