//! The outbound side of the tunnel: one loopback **egress listener** per
//! remote node, handed to local BEAM nodes by the egress request
//! ([`crate::epmd::proto::DISTPROXY_EGRESS_REQ`], sent by
//! `deploy/erlang/distproxy_epmd.erl` from `address_please/3`).
//!
//! A listener on `127.0.0.1:0` is created when a remote node is first asked
//! for, reused for every later request for it, and closed when it has had no
//! open connection and no request for `tunnel.egress_idle_timeout_ms` (the
//! next request opens a new one; a BEAM asks before every connection
//! attempt, so a closed listener costs one bind, never a failure).
//! Connections already relayed outlive their listener.
//!
//! Each accepted connection goes through these phases, each with its own
//! deadline: `egress_first_frame` (the local node's `send_name`,
//! `dist.handshake_timeout_ms`), `resolve` (the remote host,
//! `tunnel.resolve_timeout_ms`), `connect_remote` (the remote sidecar's
//! distribution port `tunnel.remote_port`, every resolved address in turn,
//! `tunnel.connect_timeout_ms` in all), `send_preamble` (preamble and the
//! replayed `send_name`, `tunnel.preamble_timeout_ms`); then opaque relaying.
//!
//! - [`manager`]: the listeners: create on request, reuse, limit, idle close.
//! - [`probe`]: is there a sidecar on that host, is that host this pod.
//! - [`local_nodes`]: can a node of this pod be dialled on loopback.
//! - [`outbound`]: one egress connection, from `send_name` to relaying.

mod local_nodes;
mod manager;
mod outbound;
mod probe;

use std::sync::{Mutex, MutexGuard};

use crate::epmd::proto;
use crate::epmd::server::EgressRefused;
use crate::node_name::NodeName;

pub use manager::{EgressManager, EgressSettings};
pub use probe::{ProbeSettings, RemoteProbe};

/// Why an egress request was not answered with a port; maps to the reply's
/// result code.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("egress is switched off (tunnel.egress = false)")]
    Disabled,
    #[error("{0:?} is not a remote node name of the form Name@Host")]
    BadName(String),
    #[error("egress listener limit of {0} reached")]
    TooMany(usize),
    #[error("failed to bind an egress listener on 127.0.0.1: {0}")]
    Bind(std::io::Error),
    #[error("{0} is a node of this pod, but it is not registered here")]
    LocalNotRegistered(String),
    #[error("{node} is a node of this pod that listens on {at} only, not on loopback: it is reached the stock way")]
    LocalNotOnLoopback { node: String, at: std::net::IpAddr },
    #[error("no sidecar answers at {host} port {port}: {why}")]
    NoRemoteSidecar {
        host: String,
        port: u16,
        why: String,
    },
}

impl EgressError {
    /// The result code of the egress reply.
    pub fn result(&self) -> u8 {
        match self {
            EgressError::Disabled => proto::EGRESS_REFUSED,
            EgressError::BadName(_) => proto::EGRESS_BAD_NAME,
            EgressError::TooMany(_)
            | EgressError::Bind(_)
            | EgressError::LocalNotRegistered(_)
            | EgressError::LocalNotOnLoopback { .. } => proto::EGRESS_UNAVAILABLE,
            EgressError::NoRemoteSidecar { .. } => proto::EGRESS_NO_REMOTE_SIDECAR,
        }
    }

    /// The `result` label of the EPMD request counter.
    pub fn label(&self) -> &'static str {
        match self {
            EgressError::Disabled => "refused",
            EgressError::BadName(_) => "bad_name",
            EgressError::TooMany(_) => "limit_reached",
            EgressError::Bind(_) => "bind_failed",
            EgressError::LocalNotRegistered(_) => "local_not_registered",
            EgressError::LocalNotOnLoopback { .. } => "local_not_on_loopback",
            EgressError::NoRemoteSidecar { .. } => "no_remote_sidecar",
        }
    }
}

impl From<EgressError> for EgressRefused {
    fn from(e: EgressError) -> EgressRefused {
        EgressRefused {
            code: e.result(),
            label: e.label(),
            message: e.to_string(),
        }
    }
}

/// The remote node an egress listener leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteNode {
    /// `Name@Host`, as the BEAM asked for it; sent in the preamble.
    pub full: String,
    /// The host part, resolved on every connection.
    pub host: String,
}

impl RemoteNode {
    /// Splits `Name@Host` at the first `@`; both parts must be non-empty.
    pub fn parse(full: &str) -> Option<RemoteNode> {
        crate::tunnel::preamble::check_target(full).ok()?;
        let name = NodeName::parse(full).ok()?;
        Some(RemoteNode {
            full: full.to_owned(),
            host: name.host,
        })
    }
}

/// A poisoned lock only means another task panicked mid-update of a plain
/// value; the value is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_node_names() {
        let n = RemoteNode::parse("b1@pod-b.dp.test").unwrap();
        assert_eq!(n.host, "pod-b.dp.test");
        assert_eq!(n.full, "b1@pod-b.dp.test");
        assert_eq!(RemoteNode::parse("b1@10.0.0.7").unwrap().host, "10.0.0.7");
        for bad in ["b1", "@h", "b1@", "", "b\0@h"] {
            assert!(RemoteNode::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn error_codes() {
        assert_eq!(EgressError::Disabled.result(), proto::EGRESS_REFUSED);
        assert_eq!(
            EgressError::BadName("x".into()).result(),
            proto::EGRESS_BAD_NAME
        );
        assert_eq!(EgressError::TooMany(1).result(), proto::EGRESS_UNAVAILABLE);
    }
}
