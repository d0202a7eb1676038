//! Port discovery for processes that must be told their ports up front.

use std::net::TcpListener;

/// A port the kernel just handed out on 127.0.0.1 (never 4369: a real EPMD
/// may run on this machine). Another process may take it before the caller
/// binds it; tests that can bind port 0 themselves should.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("pick a free port")
            .port();
        if port != 4369 {
            return port;
        }
    }
}

/// `N` distinct free ports.
pub fn free_ports<const N: usize>() -> [u16; N] {
    loop {
        let ports: [u16; N] = std::array::from_fn(|_| free_port());
        let distinct = ports
            .iter()
            .enumerate()
            .all(|(i, p)| !ports[..i].contains(p));
        if distinct {
            return ports;
        }
    }
}
