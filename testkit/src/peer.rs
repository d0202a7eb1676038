//! Playing the other side of the sidecar: a remote node dialling the
//! distribution port, a node asking its EPMD, a raw client.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::frames;
use crate::sut::{client, proto, EgressReply, Port2Reply, Request};

/// How long a peer waits for any one answer before the test fails.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(5);

/// Plays a remote initiator: connects to `dist`, sends `send_name`, returns
/// the stream and the name in the challenge it got back.
pub async fn dial_as(dist: SocketAddr, initiator: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(dist)
        .await
        .unwrap_or_else(|e| panic!("connect to {dist}: {e}"));
    s.write_all(&frames::send_name(initiator)).await.unwrap();
    let name = read_node_answer(&mut s).await;
    (s, name)
}

/// Reads a node's status and challenge from `s`: the challenge's name.
/// Fails when the connection closes first or nothing comes within
/// [`REPLY_DEADLINE`].
pub async fn read_node_answer(s: &mut TcpStream) -> String {
    let mut buf = BytesMut::new();
    loop {
        if let Some((name, _)) = frames::parse_node_answer(&buf) {
            return name;
        }
        let n = tokio::time::timeout(REPLY_DEADLINE, s.read_buf(&mut buf))
            .await
            .expect("no status and challenge from the node")
            .unwrap();
        assert!(n > 0, "connection closed before status and challenge");
    }
}

/// Sends raw bytes and reads until the server closes (at most
/// [`REPLY_DEADLINE`]).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(REPLY_DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("server did not close the connection")
        .ok();
    out
}

/// Reads until EOF (at most [`REPLY_DEADLINE`]); true if the peer closed
/// without sending a byte.
pub async fn closed_without_reply(s: &mut TcpStream) -> bool {
    let mut got = Vec::new();
    match tokio::time::timeout(REPLY_DEADLINE, s.read_to_end(&mut got)).await {
        Ok(_) => got.is_empty(),
        Err(_) => panic!("connection not closed within {REPLY_DEADLINE:?}"),
    }
}

/// Asserts that of `stalled` (oldest first), the oldest was closed to make
/// room for a newer connection and every other one is still open.
pub async fn assert_only_the_oldest_was_evicted(stalled: &mut [TcpStream]) {
    let mut buf = [0u8; 64];
    let first = tokio::time::timeout(Duration::from_secs(1), stalled[0].read(&mut buf))
        .await
        .expect("the oldest stalled connection is still open");
    assert!(matches!(first, Ok(0) | Err(_)), "{first:?}");
    for s in &mut stalled[1..] {
        assert!(
            tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf))
                .await
                .is_err(),
            "a newer stalled connection was closed too"
        );
    }
}

/// The encoded egress request for `remote`.
pub fn egress_request(remote: &str) -> BytesMut {
    let mut req = BytesMut::new();
    Request::Egress {
        node: remote.to_string(),
    }
    .encode(&mut req);
    req
}

/// Decodes a whole egress reply (nothing may follow it).
pub fn decode_egress_reply(remote: &str, reply: &[u8]) -> EgressReply {
    match proto::decode_egress_resp(reply) {
        Ok(Some((r, used))) => {
            assert_eq!(used, reply.len(), "bytes after the egress reply");
            r
        }
        other => panic!("egress reply for {remote}: {other:?} ({reply:?})"),
    }
}

/// Asks `epmd` for an egress port to `remote`, as `distproxy_epmd` does.
pub async fn egress(epmd: SocketAddr, remote: &str) -> EgressReply {
    let reply = raw_exchange(epmd, &egress_request(remote)).await;
    decode_egress_reply(remote, &reply)
}

/// Checks that an egress reply hands out a port, and returns it.
pub fn granted_port(remote: &str, r: &EgressReply) -> u16 {
    assert_eq!((r.result, r.version), (0, 6), "egress for {remote}: {r:?}");
    assert_ne!(r.port, 0, "egress for {remote}: {r:?}");
    r.port
}

/// The egress port `epmd` hands out for `remote` (the request must succeed).
pub async fn egress_port(epmd: SocketAddr, remote: &str) -> u16 {
    granted_port(remote, &egress(epmd, remote).await)
}

/// The port `epmd` answers for `name` (the node must be registered).
pub async fn lookup_port(epmd: SocketAddr, name: &str) -> u16 {
    match client::port_please(epmd, name).await {
        Ok(Port2Reply::Found(spec)) => spec.port,
        other => panic!("lookup of {name} at {epmd}: {other:?}"),
    }
}

/// Checks that the server closes `s` without sending a byte, no sooner than
/// `at_least` after `since` and within [`REPLY_DEADLINE`]. `since` must be
/// taken before the connection was made, so that the server's own timer
/// cannot have started earlier: a server that closes at once fails this.
pub async fn closed_by_timeout(
    s: &mut TcpStream,
    since: std::time::Instant,
    at_least: Duration,
    what: &str,
) {
    let mut got = Vec::new();
    let read = tokio::time::timeout(REPLY_DEADLINE, s.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| panic!("{what}: not closed within {REPLY_DEADLINE:?}"));
    assert!(read.is_err() || got.is_empty(), "{what}: got {got:?}");
    let waited = since.elapsed();
    assert!(
        waited >= at_least,
        "{what}: closed after {waited:?}, before its {at_least:?} timeout"
    );
}
