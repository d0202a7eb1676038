//! A fake BEAM node's distribution listener, in the test's runtime.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::frames;

/// Answers the handshake's first two frames with its own full name
/// (`NAME@fake.host`), then echoes everything back and half-closes after EOF.
pub struct FakeNode {
    pub name: String,
    pub port: u16,
    pub task: tokio::task::JoinHandle<()>,
}

impl FakeNode {
    /// Binds `bind` (e.g. `127.0.0.1:0`, `[::1]:0`) and serves.
    pub async fn start(name: &str, bind: &str) -> FakeNode {
        let listener = TcpListener::bind(bind)
            .await
            .unwrap_or_else(|e| panic!("bind fake node {name} on {bind}: {e}"));
        let port = listener.local_addr().unwrap().port();
        let full = format!("{name}@fake.host");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let answer = frames::node_answer(&full);
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    while frames::parse_send_name(&buf).is_none() {
                        if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
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

/// Fake nodes registered with a sidecar's EPMD, as a pod's nodes are; the
/// registrations last as long as this value.
pub struct FakePod {
    pub nodes: Vec<FakeNode>,
    pub registrations: Vec<tokio::net::TcpStream>,
}

impl FakePod {
    /// Starts a [`FakeNode`] on 127.0.0.1 for each of `names` and registers
    /// it with the EPMD at `epmd` (each registration must succeed).
    pub async fn start(epmd: std::net::SocketAddr, names: &[&str]) -> FakePod {
        let mut pod = FakePod {
            nodes: Vec::new(),
            registrations: Vec::new(),
        };
        for name in names {
            let node = FakeNode::start(name, "127.0.0.1:0").await;
            let (conn, reply) =
                crate::sut::client::register(epmd, crate::sidecar::spec(name, node.port))
                    .await
                    .unwrap_or_else(|e| panic!("register {name} at {epmd}: {e}"));
            assert_eq!(reply.result, 0, "registration of {name} at {epmd}");
            pod.registrations.push(conn);
            pod.nodes.push(node);
        }
        pod
    }
}
