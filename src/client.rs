//! A small EPMD client: what `distproxy names` and the tests use to talk to
//! an EPMD server (ours or OTP's).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::epmd::proto::{self, Alive2Reply, NodeSpec, Port2Reply, Request};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to epmd at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("epmd at {addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("i/o error talking to epmd at {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bad reply from epmd at {addr}: {reason}")]
    BadReply { addr: SocketAddr, reason: String },
}

const TIMEOUT: Duration = Duration::from_secs(10);

async fn connect(addr: SocketAddr) -> Result<TcpStream, ClientError> {
    match tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(ClientError::Connect { addr, source }),
        Err(_) => Err(ClientError::Timeout { addr }),
    }
}

/// Sends `req` and reads until the server closes the connection.
pub async fn request_to_eof(addr: SocketAddr, req: &Request) -> Result<Vec<u8>, ClientError> {
    let mut s = connect(addr).await?;
    let mut out = BytesMut::new();
    req.encode(&mut out);
    let io = |source| ClientError::Io { addr, source };
    let exchange = async {
        s.write_all(&out).await.map_err(io)?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.map_err(io)?;
        Ok(reply)
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout { addr })?
}

/// NAMES_REQ: the server's port and the text listing.
pub async fn names(addr: SocketAddr) -> Result<(u32, String), ClientError> {
    let reply = request_to_eof(addr, &Request::Names).await?;
    if reply.len() < 4 {
        return Err(ClientError::BadReply {
            addr,
            reason: format!("names reply of {} bytes", reply.len()),
        });
    }
    let port = u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]);
    Ok((port, String::from_utf8_lossy(&reply[4..]).into_owned()))
}

/// PORT_PLEASE2_REQ.
pub async fn port_please(addr: SocketAddr, name: &str) -> Result<Port2Reply, ClientError> {
    let reply = request_to_eof(
        addr,
        &Request::PortPlease2 {
            name: name.to_string(),
        },
    )
    .await?;
    let bad = |reason: String| ClientError::BadReply { addr, reason };
    match proto::decode_port2_resp(&reply) {
        Ok(Some((r, _))) => Ok(r),
        Ok(None) => Err(bad(format!("truncated PORT2_RESP ({} bytes)", reply.len()))),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// ALIVE2_REQ: registers `spec`; the registration lasts as long as the
/// returned stream stays open.
pub async fn register(
    addr: SocketAddr,
    spec: NodeSpec,
) -> Result<(TcpStream, Alive2Reply), ClientError> {
    let mut s = connect(addr).await?;
    let mut out = BytesMut::new();
    Request::Alive2(spec).encode(&mut out);
    let io = |source| ClientError::Io { addr, source };
    let exchange = async {
        s.write_all(&out).await.map_err(io)?;
        let mut buf = BytesMut::with_capacity(16);
        loop {
            match proto::decode_alive2_resp(&buf) {
                Ok(Some((reply, _))) => return Ok(reply),
                Ok(None) => {}
                Err(e) => {
                    return Err(ClientError::BadReply {
                        addr,
                        reason: e.to_string(),
                    })
                }
            }
            if s.read_buf(&mut buf).await.map_err(io)? == 0 {
                return Err(ClientError::BadReply {
                    addr,
                    reason: "connection closed before ALIVE2 reply".into(),
                });
            }
        }
    };
    let reply = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout { addr })??;
    Ok((s, reply))
}

/// The members request (`'M'`, [`crate::discovery`]): every node of every
/// pod, as the local sidecar knows them. `wait_ms` 0 answers at once.
pub async fn members(
    addr: SocketAddr,
    known_version: u32,
    wait_ms: u32,
) -> Result<crate::discovery::wire::MembersReply, ClientError> {
    let reply = request_to_eof(
        addr,
        &Request::Members {
            known_version,
            wait_ms,
        },
    )
    .await?;
    crate::discovery::wire::decode_members(&reply).map_err(|e| ClientError::BadReply {
        addr,
        reason: if reply.is_empty() {
            "connection closed without a reply (not a distproxy sidecar?)".into()
        } else {
            e.to_string()
        },
    })
}
