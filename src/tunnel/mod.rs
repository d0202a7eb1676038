//! The sidecar ↔ sidecar tunnel: exact routing between pods that both run
//! distproxy .
//!
//! ```text
//!  pod A                                             pod B
//!  a1 ──address_please(b1@pod-b)──► EPMD (egress request, 'E')
//!     ◄── {ok, {127,0,0,1}, EgressPort, 6} ──
//!  a1 ──dist──► 127.0.0.1:EgressPort ─┐
//!               egress.rs: read send_name, resolve pod-b,
//!               dial pod-b:43691, [TLS], preamble + send_name ──► dist port
//!                                                   first byte 'D': preamble,
//!                                                   route to b1 by name ──► b1
//! ```
//!
//! - [`preamble`]: the versioned preamble (no I/O).
//! - [`egress`]: per-remote-node loopback listeners and the outbound path.
//! - [`resolve`]: host resolution with hickory-resolver (pod resolv.conf,
//!   `/etc/hosts`, search domains, cache).
//! - [`tls`]: mutual TLS between sidecars.
//! - [`inbound`]: the inbound side, entered from the distribution
//!   listener's first-byte dispatch through
//!   [`crate::distribution::listener::TunnelInbound`].
//!
//! Streams are generic (`AsyncRead + AsyncWrite + Unpin + Send`) from the
//! point where TLS may wrap them, so the plain and the TLS paths share the
//! preamble and relay code, each monomorphised, with no boxing on the hot
//! path.

pub mod egress;
pub mod inbound;
pub mod preamble;
pub mod resolve;
pub mod tls;

/// How a tunnel connection travels; for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Preamble in clear text on TCP.
    Plain,
    /// Preamble inside a mutual-TLS session.
    Tls,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Plain => "plain",
            Transport::Tls => "tls",
        }
    }
}
