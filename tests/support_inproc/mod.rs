//! In-process helpers for integration tests: a sidecar on 127.0.0.1:0,
//! raw EPMD exchanges, and fake distribution nodes.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use distproxy::config::{Config, LoopbackLookups};
use distproxy::distribution::handshake::{self, Challenge, SendName, Status};
use distproxy::epmd::proto::NodeSpec;
use distproxy::sidecar::{self, Sidecar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub fn test_config() -> Config {
    let mut c = Config::default();
    c.epmd.listen = vec!["127.0.0.1:0".parse().unwrap()];
    c.dist.listen = vec!["127.0.0.1:0".parse().unwrap()];
    c.epmd.idle_timeout_ms = 2000;
    c.dist.handshake_timeout_ms = 2000;
    c.admin.listen = None;
    c
}

/// Loopback lookups routed like remote ones, so a test on 127.0.0.1 can
/// play a remote peer.
pub fn proxy_config() -> Config {
    let mut c = test_config();
    c.routing.loopback_lookups = LoopbackLookups::Proxy;
    c
}

pub fn start(config: Config) -> Sidecar {
    let listeners = sidecar::bind(&config).expect("bind test listeners");
    Sidecar::start(config, listeners)
}

pub fn epmd_addr(s: &Sidecar) -> SocketAddr {
    s.epmd_addrs[0]
}

pub fn dist_addr(s: &Sidecar) -> SocketAddr {
    s.dist_addrs[0]
}

pub fn spec(name: &str, port: u16) -> NodeSpec {
    NodeSpec {
        port,
        node_type: 77,
        protocol: 0,
        highest_version: 6,
        lowest_version: 5,
        name: name.to_string(),
        extra: Bytes::new(),
    }
}

/// Sends raw bytes and reads until the server closes (or 5 s pass).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("server did not close the connection")
        .ok();
    out
}

/// Polls `f` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fake BEAM node's distribution listener: answers the handshake's first
/// two frames with its own full name, then echoes everything back.
pub struct FakeNode {
    pub name: String,
    pub port: u16,
    pub task: tokio::task::JoinHandle<()>,
}

impl FakeNode {
    pub async fn start(name: &str, bind: &str) -> FakeNode {
        let listener = TcpListener::bind(bind).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let full = format!("{name}@fake.host");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let full = full.clone();
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    // Wait for a complete send_name.
                    loop {
                        if let Ok(Some(_)) = handshake::parse_send_name(&buf) {
                            break;
                        }
                        if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                    let mut out = BytesMut::new();
                    handshake::encode_status(&mut out, &Status::Ok);
                    handshake::encode_challenge(
                        &mut out,
                        &Challenge {
                            name: full,
                            flags: 0x000d_07df_7fbd,
                            challenge: 0x1234_5678,
                            creation: Some(77),
                        },
                    );
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                    // Echo until EOF, then half-close.
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        FakeNode {
            name: name.to_string(),
            port,
            task,
        }
    }
}

/// Plays a remote initiator: connects to the dist port, sends `send_name`,
/// returns the stream and the name in the challenge it got back.
pub async fn dial_as(dist: SocketAddr, initiator: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(dist).await.unwrap();
    let mut out = BytesMut::new();
    handshake::encode_send_name(
        &mut out,
        &SendName {
            name: initiator.to_string(),
            flags: 0x000d_07df_7fbd,
            creation: Some(1234),
            version: None,
        },
    );
    s.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let status_len = loop {
        if let Ok(Some((_, n))) = handshake::parse_status(&buf) {
            break n;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf))
            .await
            .expect("no status from node")
            .unwrap();
        assert!(n > 0, "connection closed before status");
    };
    loop {
        if let Ok(Some((c, _))) = handshake::parse_challenge(&buf[status_len..]) {
            return (s, c.name);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf))
            .await
            .expect("no challenge from node")
            .unwrap();
        assert!(n > 0, "connection closed before challenge");
    }
}
