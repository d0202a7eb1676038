//! `distproxy remsh`'s check before the shell starts: through the forwarded
//! port, does the pod's sidecar route a connection to the node, and does
//! the node answer as itself?
//!
//! It speaks exactly what the egress side will: (TLS,) the `DPX` preamble
//! naming the target and the local node, then a `send_name`. The node's
//! status and challenge prove the route; the connection is then closed
//! (the node drops the unfinished handshake). A sidecar that will not route
//! (node not registered there, ACL, TLS name binding) closes the connection
//! without a byte, which is what [`ProbeError::Refused`] reports.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::distribution::handshake::{self, SendName, Status};
use crate::tunnel::preamble::Preamble;
use crate::tunnel::tls::{Tls, TlsError};

/// The capability flags of an OTP 25 node (what `erl` will announce).
const OTP25_FLAGS: u64 = 0x000d_07df_7fbd;

/// Why the node cannot be reached through `--via`.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot reach the pod at {via}: {source} (is the port forward running?)")]
    Unreachable {
        via: SocketAddr,
        source: std::io::Error,
    },
    #[error("the pod at {via} did not complete the TLS handshake: {source}")]
    Tls { via: SocketAddr, source: TlsError },
    #[error(
        "the pod at {via} closed the connection for {node}: {node} is not registered in that pod, \
         or the pod's policy refused {local} (an [[acl]] rule, or TLS name binding); \
         its sidecar's log says which"
    )]
    Refused {
        via: SocketAddr,
        node: String,
        local: String,
    },
    #[error(
        "the node behind {via} answered {status:?} to {local} \
         (not_allowed: the node refuses this name; alive/nok: a node of that name is connected already)"
    )]
    NodeRefused {
        via: SocketAddr,
        local: String,
        status: String,
    },
    #[error("the connection through {via} was answered by {answered}, not {node}")]
    WrongNode {
        via: SocketAddr,
        node: String,
        answered: String,
    },
    #[error("no answer from {node} through {via} within {} ms (the pod does not speak distproxy's tunnel?)", .timeout.as_millis())]
    Timeout {
        via: SocketAddr,
        node: String,
        timeout: Duration,
    },
    #[error("unexpected answer through {via}: {reason}")]
    Protocol { via: SocketAddr, reason: String },
    #[error("invalid node name: {0}")]
    Name(String),
}

/// Checks that `node` answers through `via` to a connection from `local`
/// (TLS when `tls` is given), within `timeout` for each step.
pub async fn check(
    via: SocketAddr,
    node: &str,
    local: &str,
    tls: Option<&Tls>,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let preamble = Preamble::new(node, local).map_err(|e| ProbeError::Name(e.to_string()))?;
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(via)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(ProbeError::Unreachable { via, source }),
        Err(_) => {
            return Err(ProbeError::Unreachable {
                via,
                source: std::io::ErrorKind::TimedOut.into(),
            })
        }
    };
    let _ = tcp.set_nodelay(true);
    match tls {
        Some(tls) => {
            let host = node.split_once('@').map(|(_, h)| h).unwrap_or("");
            let stream = tls
                .connect(tcp, host)
                .await
                .map_err(|source| ProbeError::Tls { via, source })?;
            exchange(stream, via, &preamble, timeout).await
        }
        None => exchange(tcp, via, &preamble, timeout).await,
    }
}

async fn exchange<S>(
    mut stream: S,
    via: SocketAddr,
    preamble: &Preamble,
    timeout: Duration,
) -> Result<(), ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    preamble.encode(&mut out);
    handshake::encode_send_name(
        &mut out,
        &SendName {
            name: preamble.initiator.clone(),
            flags: OTP25_FLAGS,
            creation: Some(1),
            version: None,
        },
    );
    let node = preamble.target.clone();
    let local = preamble.initiator.clone();
    /// What came back before the deadline.
    enum Answer {
        /// Status ok and a challenge naming this node.
        Node(String),
        /// Another status (`nok`, `not_allowed`, `alive`, …).
        Status(String),
        /// Closed without a byte: the sidecar would not route.
        Closed,
        /// Anything else.
        Bad(String),
    }
    let io = async {
        stream.write_all(&out).await?;
        stream.flush().await?;
        let mut buf = BytesMut::with_capacity(512);
        // The status, then (for ok) the challenge naming the node.
        loop {
            match handshake::parse_status(&buf) {
                Ok(Some((Status::Ok | Status::OkSimultaneous, used))) => {
                    match handshake::parse_challenge(&buf[used..]) {
                        Ok(Some((c, _))) => return Ok(Answer::Node(c.name)),
                        Ok(None) => {}
                        Err(e) => return Ok(Answer::Bad(e.to_string())),
                    }
                }
                Ok(Some((status, _))) => return Ok(Answer::Status(format!("{status:?}"))),
                Ok(None) => {}
                Err(e) => return Ok(Answer::Bad(e.to_string())),
            }
            if buf.len() > 4096 {
                return Ok(Answer::Bad("oversize answer".into()));
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(if buf.is_empty() {
                    Answer::Closed
                } else {
                    Answer::Bad("closed mid-frame".into())
                });
            }
        }
    };
    let answer: std::io::Result<Answer> = match tokio::time::timeout(timeout, io).await {
        Ok(r) => r,
        Err(_) => return Err(ProbeError::Timeout { via, node, timeout }),
    };
    match answer {
        Ok(Answer::Node(answered)) if answered == node => Ok(()),
        Ok(Answer::Node(answered)) => Err(ProbeError::WrongNode {
            via,
            node,
            answered,
        }),
        Ok(Answer::Closed) => Err(ProbeError::Refused { via, node, local }),
        Ok(Answer::Status(status)) => Err(ProbeError::NodeRefused { via, local, status }),
        Ok(Answer::Bad(reason)) => Err(ProbeError::Protocol { via, reason }),
        // A reset before any answer is a refusal as well.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            Err(ProbeError::Refused { via, node, local })
        }
        // The pod's alert refusing this client's certificate: in TLS 1.3 it
        // comes after the client's handshake is over, on the first read.
        Err(e) if crate::tunnel::tls::is_alert(&e) => Err(ProbeError::Tls {
            via,
            source: TlsError::Handshake {
                reason: crate::tunnel::tls::classify_io_error(&e),
                source: e,
            },
        }),
        Err(e) => Err(ProbeError::Protocol {
            via,
            reason: e.to_string(),
        }),
    }
}
