//! A sidecar in the test's process, on `127.0.0.1:0`, and its configurations.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::sut::{sidecar, Config, LoopbackLookups, Millis, NodeSpec, Sidecar};

/// EPMD and distribution listeners on `127.0.0.1:0`, 2 s EPMD idle and
/// handshake timeouts, no admin endpoint (several sidecars share a process).
pub fn test_config() -> Config {
    let mut c = Config::default();
    c.epmd.listen = vec!["127.0.0.1:0".parse().unwrap()];
    c.dist.listen = vec!["127.0.0.1:0".parse().unwrap()];
    c.epmd.idle_timeout_ms = Millis(2000);
    c.dist.handshake_timeout_ms = Millis(2000);
    c.admin.listen = Vec::new();
    c
}

/// [`test_config`] with loopback lookups routed like remote ones, so a test
/// on 127.0.0.1 can play a remote peer.
pub fn proxy_config() -> Config {
    let mut c = test_config();
    c.routing.loopback_lookups = LoopbackLookups::Proxy;
    c
}

/// Binds `config`'s listeners and starts serving.
pub fn start(config: Config) -> Sidecar {
    let listeners = sidecar::bind(&config).expect("bind test listeners");
    Sidecar::start(config, listeners)
}

/// The first EPMD listener's address.
pub fn epmd_addr(s: &Sidecar) -> SocketAddr {
    s.epmd_addrs[0]
}

/// The first distribution listener's address.
pub fn dist_addr(s: &Sidecar) -> SocketAddr {
    s.dist_addrs[0]
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// An ALIVE2 registration of `name` on `port`, as OTP 25 sends it.
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
