//! A small EPMD client: what `distproxy names`, `distproxy members`, the
//! `epmd` drop-in's `-names`/`-dump`/`-kill`/`-stop` and the tests use to
//! talk to an EPMD server (ours or OTP's).

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
    /// A KILL or STOP answer that is none of the known ones (`epmd` closes
    /// without one when `relaxed_command_check` is off), lossily decoded.
    #[error("unexpected reply from epmd at {addr}: <{reply}>")]
    UnexpectedReply { addr: SocketAddr, reply: String },
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

/// Runs `request` against each of `addrs` in turn while the connection is
/// refused (a dual-stack name may list first an address the EPMD does not
/// listen on), and returns the address that answered, or the last one,
/// with its result. `addrs` must not be empty.
pub async fn each_address_while_refused<T, F, Fut>(
    addrs: &[SocketAddr],
    request: F,
) -> (SocketAddr, Result<T, ClientError>)
where
    F: Fn(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let (last, rest) = addrs.split_last().expect("at least one address");
    for &addr in rest {
        match request(addr).await {
            Err(ClientError::Connect { .. }) => {}
            other => return (addr, other),
        }
    }
    (*last, request(*last).await)
}

/// NAMES_REQ: the server's port and the text listing.
pub async fn names(addr: SocketAddr) -> Result<(u32, String), ClientError> {
    let reply = request_to_eof(addr, &Request::Names).await?;
    port_and_text(addr, &reply, "names")
}

/// DUMP_REQ (local peers only): the server's port and its dump text, as
/// sent: `epmd` NUL-terminates each entry, and `epmd -dump` prints the NULs.
pub async fn dump(addr: SocketAddr) -> Result<(u32, String), ClientError> {
    let reply = request_to_eof(addr, &Request::Dump).await?;
    port_and_text(addr, &reply, "dump")
}

/// The answer to KILL_REQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillReply {
    /// `OK`: the server stops.
    Killed,
    /// `NO`: refused (nodes are still registered; see
    /// `relaxed_command_check`).
    Refused,
}

/// KILL_REQ (local peers only).
pub async fn kill(addr: SocketAddr) -> Result<KillReply, ClientError> {
    match request_to_eof(addr, &Request::Kill).await?.as_slice() {
        b"OK" => Ok(KillReply::Killed),
        b"NO" => Ok(KillReply::Refused),
        other => Err(unexpected(addr, other)),
    }
}

/// The answer to STOP_REQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReply {
    Stopped,
    /// No such node, or not allowed.
    NoExist,
}

/// STOP_REQ (local peers only): unregisters `name`.
pub async fn stop(addr: SocketAddr, name: &str) -> Result<StopReply, ClientError> {
    let reply = request_to_eof(
        addr,
        &Request::Stop {
            name: name.as_bytes().to_vec(),
        },
    )
    .await?;
    // `epmd` goes on to send `STOPPED` after `NOEXIST` (epmd_srv.c falls
    // through); its own client reads the first seven bytes.
    match reply.get(..7) {
        Some(b"STOPPED") if reply.len() == 7 => Ok(StopReply::Stopped),
        Some(b"NOEXIST") => Ok(StopReply::NoExist),
        _ => Err(unexpected(addr, &reply)),
    }
}

/// A reply that starts with the server's port (4 bytes) and goes on with text.
fn port_and_text(addr: SocketAddr, reply: &[u8], what: &str) -> Result<(u32, String), ClientError> {
    let Some((port, text)) = reply.split_first_chunk::<4>() else {
        return Err(ClientError::BadReply {
            addr,
            reason: format!("{what} reply of {} bytes", reply.len()),
        });
    };
    Ok((
        u32::from_be_bytes(*port),
        String::from_utf8_lossy(text).into_owned(),
    ))
}

fn unexpected(addr: SocketAddr, reply: &[u8]) -> ClientError {
    ClientError::UnexpectedReply {
        addr,
        reply: String::from_utf8_lossy(reply).into_owned(),
    }
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
            "connection closed without a reply (not a distproxy sidecar, or a sidecar \
             of another host: members are answered to local peers only, run it in the pod)"
                .into()
        } else {
            e.to_string()
        },
    })
}
