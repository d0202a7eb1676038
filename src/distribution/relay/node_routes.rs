//! Node routes: the second half of the kernel fast path. On the sockmap
//! path alone, a local node's bytes still cross a loopback TCP hop into
//! the sidecar's socket, where the `sk_skb` program moves them on from a
//! kernel work queue. With node routes, the node's own end of that hop
//! joins a second sockhash, and an `sk_msg` program sends each of its
//! messages straight out of the partner socket of the sidecar, inside the
//! node's `sendmsg`: no loopback hop, no work queue, no wake-up.
//!
//! **How node sockets get there.** The sidecar cannot hold the nodes'
//! sockets, so a `sock_ops` program attached to the nodes' cgroup
//! (`relay.fast_path_cgroup`) inserts them as their connections are
//! established ([`bpf::sock_ops_program`]), in the sidecar's network
//! namespace only: a node's connection to a port where the sidecar relays
//! distribution (its distribution ports and same-pod mirrors; same
//! address on both ends), and a connection the sidecar dialled to a node,
//! which the sidecar announces before dialling ([`NodeRoutes::expect`]).
//! IPv4 only; other sockets are not touched.
//!
//! **When a route is armed.** A route changes where a node's next
//! message goes, so it is armed only when no earlier byte of that node can
//! still be on the old way, which the handshake's turns guarantee at the
//! handover: on an inbound connection the node (the acceptor) has sent
//! its challenge, which the sidecar consumed, and waits for the
//! initiator's reply, and the initiator sends exactly one frame (the
//! reply) before it waits for the acknowledgement; on a same-pod mirror,
//! the relay starts before the handshake, the acceptor has sent nothing
//! and the initiator at most its `send_name`, after which it waits.
//! Either way, at most one frame is in flight, and it arrives before
//! anything the routes carry.
//!
//! **Everything else is the sockmap path's:** the sidecar's two sockets
//! stay in its sockhash (they are the routes' targets, and bytes from a
//! remote peer still arrive on them), ends are watched the same way, and
//! bytes are counted from the target sockets' `TCP_INFO` counters, which
//! include the routed bytes.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::bpf::{self, annotate, NodeKey};

/// The maps and programs of node routes; the `sock_ops` program stays
/// attached for as long as this lives.
pub struct NodeRoutes {
    /// Node sockets, under their [`NodeKey`]s (filled by `sock_ops`; the
    /// `sk_msg` program is attached here).
    nodes: OwnedFd,
    /// Connections the sidecar is about to dial, under the node end's key.
    expected: OwnedFd,
    /// The sidecar's ports that relay distribution (its distribution
    /// ports and same-pod mirrors), as `remote_port` fields.
    relay_ports: OwnedFd,
    /// Node key → cookie of the sidecar socket its messages go out of.
    routes: OwnedFd,
    _sock_ops: OwnedFd,
    _msg: OwnedFd,
    _link: OwnedFd,
    cgroup: PathBuf,
}

impl std::fmt::Debug for NodeRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRoutes")
            .field("cgroup", &self.cgroup)
            .finish()
    }
}

impl NodeRoutes {
    /// Creates the maps, loads both programs and attaches `sock_ops` to
    /// the cgroup v2 directory `cgroup`. `sockets` is the sidecar's
    /// sockhash (the routes' targets).
    pub fn open(
        cgroup: &Path,
        sockets: BorrowedFd<'_>,
        max_connections: u32,
    ) -> io::Result<NodeRoutes> {
        let entries = max_connections.saturating_mul(2);
        let netns = {
            let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
            bpf::netns_cookie(probe.as_fd()).map_err(|e| annotate(e, "SO_NETNS_COOKIE"))?
        };
        let nodes = bpf::create_node_sockhash(entries)
            .map_err(|e| annotate(e, "failed to create the node sockhash"))?;
        let hash = |k, v, n| {
            bpf::create_hash(k, v, n).map_err(|e| annotate(e, "failed to create a hash map"))
        };
        let expected = hash(16, 1, entries)?;
        let relay_ports = hash(4, 1, 4096)?;
        let routes = hash(16, 8, entries)?;
        let sock_ops =
            bpf::load_sock_ops(nodes.as_fd(), expected.as_fd(), relay_ports.as_fd(), netns)
                .map_err(|e| annotate(e, "failed to load the sock_ops program"))?;
        let msg = bpf::load_msg(routes.as_fd(), sockets)
            .map_err(|e| annotate(e, "failed to load the sk_msg program"))?;
        bpf::attach_msg(nodes.as_fd(), msg.as_fd())
            .map_err(|e| annotate(e, "failed to attach the sk_msg program"))?;
        let dir = std::fs::File::open(cgroup)
            .map_err(|e| annotate(e, &format!("cannot open cgroup {}", cgroup.display())))?;
        let link = bpf::link_sock_ops(dir.as_fd(), sock_ops.as_fd()).map_err(|e| {
            annotate(
                e,
                &format!("failed to attach sock_ops to cgroup {}", cgroup.display()),
            )
        })?;
        Ok(NodeRoutes {
            nodes,
            expected,
            relay_ports,
            routes,
            _sock_ops: sock_ops,
            _msg: msg,
            _link: link,
            cgroup: cgroup.to_path_buf(),
        })
    }

    /// The cgroup whose nodes' sockets can be routed.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// A port of the sidecar that relays distribution (a distribution
    /// port, a same-pod mirror): a local node's connection to it joins the
    /// node sockhash.
    pub fn add_relay_port(&self, port: u16) -> io::Result<()> {
        let key = bpf::remote_port_field(port).to_ne_bytes();
        bpf::hash_set(self.relay_ports.as_fd(), &key, &[1])
    }

    /// The port no longer relays (a mirror closed).
    pub fn remove_relay_port(&self, port: u16) {
        let key = bpf::remote_port_field(port).to_ne_bytes();
        let _ = bpf::hash_remove(self.relay_ports.as_fd(), &key);
    }

    /// Announces a connection from `from` (bound, not yet connected) to the
    /// node at `to`: the node's end joins the node sockhash when it is
    /// established. The announcement lasts as long as the guard.
    pub fn expect(&self, from: SocketAddr, to: SocketAddr) -> Option<Expected<'_>> {
        let key = NodeKey::new(to, from)?;
        bpf::hash_set(self.expected.as_fd(), &key.bytes(), &[1]).ok()?;
        Some(Expected { routes: self, key })
    }

    /// Routes the messages of the node at the other end of the sidecar's
    /// socket `sidecar_end` out of the sidecar socket `target` (its
    /// cookie), if that node's socket is in the node sockhash. The route
    /// lasts as long as the guard.
    pub fn arm(&self, sidecar_end: &std::net::TcpStream, target: u64) -> Option<Route<'_>> {
        let key = NodeKey::new(
            sidecar_end.peer_addr().ok()?,
            sidecar_end.local_addr().ok()?,
        )?;
        bpf::node_socket(self.nodes.as_fd(), &key).ok()??;
        bpf::hash_set(self.routes.as_fd(), &key.bytes(), &target.to_ne_bytes()).ok()?;
        Some(Route { routes: self, key })
    }
}

/// An announced connection; withdrawn on drop.
pub struct Expected<'a> {
    routes: &'a NodeRoutes,
    key: NodeKey,
}

impl Drop for Expected<'_> {
    fn drop(&mut self) {
        let _ = bpf::hash_remove(self.routes.expected.as_fd(), &self.key.bytes());
    }
}

/// An armed route; removed on drop, before the sidecar's sockets leave
/// their map.
pub struct Route<'a> {
    routes: &'a NodeRoutes,
    key: NodeKey,
}

impl Drop for Route<'_> {
    fn drop(&mut self) {
        let _ = bpf::hash_remove(self.routes.routes.as_fd(), &self.key.bytes());
    }
}

/// The cgroup v2 directory this process is in: its path from
/// `/proc/self/cgroup` under the cgroup2 mount of `/proc/self/mountinfo`.
pub fn own_cgroup() -> io::Result<PathBuf> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not in a cgroup v2 hierarchy"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mount = cgroup2_mount(&mounts)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 file system mounted"))?;
    Ok(Path::new(mount).join(rel.trim_start_matches('/')))
}

/// The mount point of the first cgroup2 file system in a mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<&str> {
    mountinfo.lines().find_map(|l| {
        let (fields, rest) = l.split_once(" - ")?;
        (rest.split_whitespace().next()? == "cgroup2").then(|| fields.split_whitespace().nth(4))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_mountinfo() {
        let hybrid = "25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount(hybrid), Some("/sys/fs/cgroup/unified"));
        let v1 = "27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount(v1), None);
    }
}
