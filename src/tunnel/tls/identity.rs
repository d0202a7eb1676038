//! Certificate identities and node-name binding (no I/O).

use std::fmt;
use std::net::IpAddr;

use tokio_rustls::rustls;

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
    /// Start of validity as Unix time.
    pub not_before: i64,
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
            not_before: cert.validity().not_before.timestamp(),
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

    /// Why the certificate is not valid at `now` (Unix time): expired or
    /// not yet valid. Every peer refuses such a certificate.
    pub fn validity_problem(&self, now: i64) -> Option<String> {
        let date = |t: i64| {
            x509_parser::time::ASN1Time::from_timestamp(t)
                .map(|t| t.to_string())
                .unwrap_or_else(|_| format!("Unix time {t}"))
        };
        if now > self.not_after {
            Some(format!(
                "certificate (serial {}) expired on {}",
                self.serial,
                date(self.not_after)
            ))
        } else if now < self.not_before {
            Some(format!(
                "certificate (serial {}) is not valid before {}",
                self.serial,
                date(self.not_before)
            ))
        } else {
            None
        }
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
}
