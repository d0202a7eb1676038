//! Opaque byte relaying between two sockets.
//!
//! Each direction reads into its own buffer that starts small (an idle
//! distribution connection costs little) and doubles on full reads up to
//! [`MAX_BUF`] (bulk transfers get large reads). Buffers are reused, so there
//! is no allocation per read. EOF in one direction is propagated as a write
//! shutdown (half-close) while the other direction keeps flowing; an error in
//! either direction ends both.

use std::io;

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub const INITIAL_BUF: usize = 4 * 1024;
pub const MAX_BUF: usize = 256 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// From the remote peer to the local node.
    pub rx: u64,
    /// From the local node to the remote peer.
    pub tx: u64,
}

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions reached EOF.
    Closed(RelayStats),
    /// An I/O error in one direction.
    Failed(RelayStats, io::Error),
    /// The hard-stop token fired (shutdown grace expired).
    Stopped(RelayStats),
}

impl RelayEnd {
    pub fn stats(&self) -> RelayStats {
        match self {
            RelayEnd::Closed(s) | RelayEnd::Failed(s, _) | RelayEnd::Stopped(s) => *s,
        }
    }
}

/// Copies `r` to `w` until EOF, then shuts `w` down for writing.
async fn copy_one_way<R, W>(
    mut r: R,
    mut w: W,
    counted: &Counter,
    total: &mut u64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; INITIAL_BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        // A no-op on TCP; on TLS it sends records a write left buffered
        // (tokio-rustls returns once the plaintext is taken, even if the
        // socket would block), which would otherwise wait for the next read.
        w.flush().await?;
        *total += n as u64;
        counted.increment(n as u64);
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// Relays between `peer` (remote side) and `node` (local node) until both
/// directions close, one fails, or `stop` fires.
pub async fn relay<P, N>(
    peer: P,
    node: N,
    rx_bytes: Counter,
    tx_bytes: Counter,
    stop: &CancellationToken,
) -> RelayEnd
where
    P: AsyncRead + AsyncWrite + Unpin,
    N: AsyncRead + AsyncWrite + Unpin,
{
    let (peer_r, peer_w) = tokio::io::split(peer);
    let (node_r, node_w) = tokio::io::split(node);
    let mut stats = RelayStats::default();
    let (mut rx, mut tx) = (0u64, 0u64);
    let result = {
        let to_node = copy_one_way(peer_r, node_w, &rx_bytes, &mut rx);
        let to_peer = copy_one_way(node_r, peer_w, &tx_bytes, &mut tx);
        tokio::select! {
            r = async { tokio::try_join!(to_node, to_peer) } => Some(r),
            _ = stop.cancelled() => None,
        }
    };
    stats.rx = rx;
    stats.tx = tx;
    match result {
        Some(Ok(_)) => RelayEnd::Closed(stats),
        Some(Err(e)) => RelayEnd::Failed(stats, e),
        None => RelayEnd::Stopped(stats),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (mut client, peer_side) = duplex(1 << 16);
        let (node_side, mut server) = duplex(1 << 16);
        let stop = CancellationToken::new();
        let h = tokio::spawn(async move {
            relay(
                peer_side,
                node_side,
                Counter::noop(),
                Counter::noop(),
                &stop,
            )
            .await
        });
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&p2).await.unwrap();
            client.shutdown().await.unwrap();
            // Still able to read after our half-close.
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        server.write_all(b"reply after half-close").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply after half-close");
        let end = h.await.unwrap();
        assert!(matches!(end, RelayEnd::Closed(_)), "{end:?}");
        assert_eq!(end.stats().rx, payload.len() as u64);
        assert_eq!(end.stats().tx, 22);
    }

    #[tokio::test]
    async fn stop_token_ends_an_idle_relay() {
        let (_client, peer_side) = duplex(64);
        let (node_side, _server) = duplex(64);
        let stop = CancellationToken::new();
        let s2 = stop.clone();
        let h = tokio::spawn(async move {
            relay(peer_side, node_side, Counter::noop(), Counter::noop(), &s2).await
        });
        stop.cancel();
        assert!(matches!(h.await.unwrap(), RelayEnd::Stopped(_)));
    }
}
