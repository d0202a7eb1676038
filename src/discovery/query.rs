//! Asking one pod which nodes it runs: the pod-info request to its sidecar,
//! or, when its EPMD is stock `epmd` (which closes the connection on the
//! unknown request) or a sidecar that was not told its host part,
//! `NAMES_REQ` plus the host template.
//!
//! The whole exchange with one pod has one deadline (`discovery
//! .query_timeout_ms`), and a reply is read to EOF but never beyond
//! [`MAX_REPLY_BYTES`]: another pod's answer is untrusted input.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::naming::{self, HostTemplate};
use super::wire::{self, Entry, PodInfo, MAX_REPLY_BYTES};
use crate::epmd::proto::{self, Request, NODE_TYPE_NORMAL};

/// How a pod's nodes were learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// This pod's own registry.
    Local,
    /// The pod's sidecar said its host part and nodes.
    Sidecar,
    /// `NAMES_REQ` to the pod's EPMD and `discovery.host_template`.
    Epmd,
}

/// What one pod answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAnswer {
    pub host: String,
    pub source: Source,
    /// Short names and node types (stock EPMD does not say the type: normal).
    pub nodes: Vec<Entry>,
}

/// Why a pod could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("timed out asking the EPMD at {addr} after {ms} ms", ms = .timeout.as_millis())]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("cannot connect to the EPMD at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("i/o error talking to the EPMD at {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reply from {addr} exceeds {MAX_REPLY_BYTES} bytes")]
    TooLarge { addr: SocketAddr },
    #[error("bad reply from {addr}: {reason}")]
    BadReply { addr: SocketAddr, reason: String },
    #[error("the pod at {addr} runs no distproxy that knows its host, and discovery.host_template is not set")]
    NoHostTemplate { addr: SocketAddr },
}

impl QueryError {
    /// The `reason` label of the refresh error counter.
    pub fn label(&self) -> &'static str {
        use crate::metrics::discovery_reason as r;
        match self {
            QueryError::Timeout { .. } => r::QUERY_TIMEOUT,
            QueryError::Connect { .. } | QueryError::Io { .. } => r::QUERY_FAILED,
            QueryError::TooLarge { .. } | QueryError::BadReply { .. } => r::BAD_REPLY,
            QueryError::NoHostTemplate { .. } => r::NO_HOST_TEMPLATE,
        }
    }
}

/// Asks the EPMD at `addr` which pod it is, within `timeout` in all.
pub async fn query_pod(
    addr: SocketAddr,
    timeout: Duration,
    template: Option<&HostTemplate>,
) -> Result<PodAnswer, QueryError> {
    tokio::time::timeout(timeout, query(addr, template))
        .await
        .map_err(|_| QueryError::Timeout { addr, timeout })?
}

async fn query(addr: SocketAddr, template: Option<&HostTemplate>) -> Result<PodAnswer, QueryError> {
    let reply = exchange(addr, &Request::PodInfo).await?;
    if !reply.is_empty() {
        match wire::decode_pod_info(&reply) {
            Ok(PodInfo::Known { host, nodes }) => {
                // The host part becomes part of every member's name.
                naming::check_host(&host).map_err(|e| QueryError::BadReply {
                    addr,
                    reason: e.to_string(),
                })?;
                return Ok(PodAnswer {
                    host,
                    source: Source::Sidecar,
                    nodes,
                });
            }
            Ok(PodInfo::Unknown { .. }) => {} // a sidecar without discovery.host
            Err(e) => {
                return Err(QueryError::BadReply {
                    addr,
                    reason: e.to_string(),
                })
            }
        }
    }
    // Closed without a reply: stock epmd (or an older distproxy).
    let template = template.ok_or(QueryError::NoHostTemplate { addr })?;
    let reply = exchange(addr, &Request::Names).await?;
    let text = reply.get(4..).ok_or_else(|| QueryError::BadReply {
        addr,
        reason: format!("NAMES reply of {} bytes", reply.len()),
    })?;
    let nodes = proto::parse_names(&String::from_utf8_lossy(text))
        .into_iter()
        .filter(|(name, _)| proto::validate_name(name.as_bytes()).is_ok())
        .map(|(name, _)| Entry {
            name,
            node_type: NODE_TYPE_NORMAL,
        })
        .collect();
    Ok(PodAnswer {
        host: template.render(addr.ip()),
        source: Source::Epmd,
        nodes,
    })
}

/// One request, its reply read to EOF (at most [`MAX_REPLY_BYTES`]). A
/// connection reset before any byte counts as "closed without a reply".
async fn exchange(addr: SocketAddr, req: &Request) -> Result<Vec<u8>, QueryError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|source| QueryError::Connect { addr, source })?;
    let mut out = BytesMut::new();
    req.encode(&mut out);
    let io = |source| QueryError::Io { addr, source };
    stream.write_all(&out).await.map_err(io)?;
    let mut reply = Vec::new();
    let mut limited = (&mut stream).take(MAX_REPLY_BYTES as u64 + 1);
    match limited.read_to_end(&mut reply).await {
        Ok(_) => {}
        Err(e) if reply.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => return Err(io(e)),
    }
    if reply.len() > MAX_REPLY_BYTES {
        return Err(QueryError::TooLarge { addr });
    }
    Ok(reply)
}

/// The EPMD address of the pod at `ip`.
pub fn epmd_addr(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.to_canonical(), port)
}
