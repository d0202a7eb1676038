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
//! **Order and back-pressure.** A route may send a node's message past
//! bytes the node wrote earlier, and a full target would refuse it: the
//! kernel then fails the node's `sendmsg` with `EAGAIN` while the node's
//! own socket stays writable, so a non-blocking sender (every BEAM) would
//! retry at once, spinning. So the `sk_msg` program
//! ([`bpf::msg_program`]) routes a message only when every byte the node
//! wrote to its own socket has been relayed to the target already (the
//! node's `write_seq`, from its first sequence number that `sock_ops`
//! noted, against the count the sidecar publishes in the route) and
//! when the target's send buffer has room for it (read from the target's
//! `struct sock`, whose address a second `sock_ops` program, on the
//! sidecar's own cgroup, notes as the sidecar's sockets are established);
//! otherwise the message passes into the node's own socket. The sidecar
//! reads that socket's other end and writes the bytes to the target as
//! the splice path would, publishing each write. While the target is
//! full the sidecar does not read, so the node's own socket fills and the
//! node sleeps, as it would on a direct connection; once the sidecar has
//! caught up and the target has room, routes resume. Order holds at any
//! moment, the handover included: a message is routed only when nothing
//! of the node's is still on the other way.
//!
//! **Everything else is the sockmap path's:** the sidecar's two sockets
//! are the routes' targets (in a sockhash without programs), a side
//! whose node has no route has its bytes moved by the `sk_skb` program,
//! ends are watched the same way, and bytes are counted from the target
//! sockets' `TCP_INFO` counters, which include the routed bytes.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::bpf::{self, annotate, NodeKey, RouteValue};

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
    /// Node key → [`RouteValue`].
    routes: OwnedFd,
    /// Node key → the node socket's first sequence number (`sock_ops`).
    bases: OwnedFd,
    /// The sidecar's sockets that routes send out of, under their cookies
    /// (no program attached).
    targets: OwnedFd,
    /// Cookie → kernel address of the sidecar's sockets (the second
    /// `sock_ops` program fills it).
    addresses: OwnedFd,
    _sock_ops: OwnedFd,
    _msg: OwnedFd,
    _link: OwnedFd,
    _addresses_prog: OwnedFd,
    _addresses_link: OwnedFd,
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
    /// Creates the maps, loads the programs, attaches the nodes' `sock_ops`
    /// to the cgroup v2 directory `cgroup` and the one noting socket
    /// addresses to the sidecar's own cgroup. Needs the kernel's BTF and
    /// CAP_PERFMON besides the fast path's capabilities.
    pub fn open(cgroup: &Path, max_connections: u32) -> io::Result<NodeRoutes> {
        let own = own_cgroup().map_err(|e| annotate(e, "cannot find the sidecar's own cgroup"))?;
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
        let routes = bpf::create_rcu_hash(16, RouteValue::SIZE, entries)
            .map_err(|e| annotate(e, "failed to create the routes map"))?;
        // Bases outlive their sockets (nothing removes them): the oldest go.
        let bases = bpf::create_lru_hash(16, 4, entries.saturating_mul(2))
            .map_err(|e| annotate(e, "failed to create the bases map"))?;
        let targets = bpf::create_sockhash(entries)
            .map_err(|e| annotate(e, "failed to create the targets sockhash"))?;
        // Every socket of the sidecar's cgroup is noted: the oldest go.
        let addresses = bpf::create_lru_hash(8, 8, max_connections.saturating_mul(ADDRESS_SLOTS))
            .map_err(|e| annotate(e, "failed to create the socket addresses map"))?;
        let offsets = super::btf::sock_offsets()
            .map_err(|e| annotate(e, "cannot read the kernel's socket layout"))?;
        let sock_ops = bpf::load_sock_ops(
            nodes.as_fd(),
            expected.as_fd(),
            relay_ports.as_fd(),
            bases.as_fd(),
            netns,
        )
        .map_err(|e| annotate(e, "failed to load the sock_ops program"))?;
        let msg = bpf::load_msg(routes.as_fd(), targets.as_fd(), &offsets)
            .map_err(|e| annotate(e, "failed to load the sk_msg program (CAP_PERFMON?)"))?;
        bpf::attach_msg(nodes.as_fd(), msg.as_fd())
            .map_err(|e| annotate(e, "failed to attach the sk_msg program"))?;
        let addresses_prog = bpf::load_socket_addresses(addresses.as_fd(), netns).map_err(|e| {
            annotate(
                e,
                "failed to load the socket addresses program (CAP_PERFMON?)",
            )
        })?;
        let nodes_link = link(cgroup, sock_ops.as_fd())?;
        let addresses_link = link(&own, addresses_prog.as_fd())?;
        Ok(NodeRoutes {
            nodes,
            expected,
            relay_ports,
            routes,
            bases,
            targets,
            addresses,
            _sock_ops: sock_ops,
            _msg: msg,
            _link: nodes_link,
            _addresses_prog: addresses_prog,
            _addresses_link: addresses_link,
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

    /// Whether the node at the other end of the sidecar's socket
    /// `sidecar_end` can get a route: its socket is in the node sockhash.
    pub fn has_node(&self, sidecar_end: &std::net::TcpStream) -> bool {
        node_key(sidecar_end)
            .is_some_and(|key| matches!(bpf::node_socket(self.nodes.as_fd(), &key), Ok(Some(_))))
    }

    /// Makes the sidecar socket `s` (cookie `cookie`) a target routes can
    /// send out of, for as long as the guard lives.
    pub fn add_target(&self, s: BorrowedFd<'_>, cookie: u64) -> io::Result<Target<'_>> {
        bpf::map_insert(self.targets.as_fd(), cookie, s)?;
        Ok(Target {
            routes: self,
            cookie,
        })
    }

    /// Routes the messages of the node at the other end of the sidecar's
    /// socket `sidecar_end` out of the target `target` (a cookie passed
    /// to [`NodeRoutes::add_target`]), if that node's socket is in the
    /// node sockhash. `relayed` is how many of the node's bytes the
    /// sidecar has written on so far. The route lasts as long as the
    /// guard; [`Route::relayed`] tells it of every later write. Without a
    /// route, the node's bytes all take the way passed messages take.
    pub fn arm(
        &self,
        sidecar_end: &std::net::TcpStream,
        target: u64,
        relayed: u64,
    ) -> Result<Route<'_>, Missed> {
        let key = node_key(sidecar_end).ok_or(Missed::NodeGone)?;
        found(bpf::node_socket(self.nodes.as_fd(), &key), Missed::NodeGone)?;
        let base = found(
            bpf::hash_get_u32(self.bases.as_fd(), &key.bytes()),
            Missed::NodeUnnoted,
        )?;
        let target_sock = found(
            bpf::hash_get_u64(self.addresses.as_fd(), &target.to_ne_bytes()),
            Missed::TargetUnnoted,
        )?;
        let value = RouteValue {
            target,
            base,
            relayed: relayed as u32,
            target_sock,
        };
        bpf::hash_set(self.routes.as_fd(), &key.bytes(), &value.bytes())
            .map_err(|_| Missed::Kernel)?;
        Ok(Route {
            routes: self,
            key,
            value,
        })
    }
}

/// Why a node that can be routed got no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// Its socket left the node sockhash (closed) after the handover
    /// began.
    NodeGone,
    /// Its socket's first sequence number is no longer noted (the oldest
    /// go when the map is full).
    NodeUnnoted,
    /// The address of the sidecar socket it would send out of is not
    /// noted: established before the program was attached, or evicted
    /// by [`ADDRESS_SLOTS`] × `fast_path_max_connections` newer sockets.
    TargetUnnoted,
    /// The kernel refused a map read or the route's insert.
    Kernel,
}

/// A map read's value, or why there is none.
fn found<T>(read: io::Result<Option<T>>, missing: Missed) -> Result<T, Missed> {
    read.map_err(|_| Missed::Kernel)?.ok_or(missing)
}

impl Missed {
    /// The `reason` label of `distproxy_relay_node_routes_missed_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Missed::NodeGone => "node_gone",
            Missed::NodeUnnoted => "node_unnoted",
            Missed::TargetUnnoted => "target_unnoted",
            Missed::Kernel => "kernel",
        }
    }
}

/// Entries of the socket addresses map per fast-path connection: every
/// socket of the sidecar's cgroup is noted, not only relayed ones.
pub const ADDRESS_SLOTS: u32 = 8;

/// Attaches the `sock_ops` program `prog` to the cgroup v2 directory
/// `cgroup` for as long as the returned link is open.
fn link(cgroup: &Path, prog: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let dir = std::fs::File::open(cgroup)
        .map_err(|e| annotate(e, &format!("cannot open cgroup {}", cgroup.display())))?;
    bpf::link_sock_ops(dir.as_fd(), prog).map_err(|e| {
        annotate(
            e,
            &format!("failed to attach sock_ops to cgroup {}", cgroup.display()),
        )
    })
}

/// The node key of the node at the other end of the sidecar's socket.
fn node_key(sidecar_end: &std::net::TcpStream) -> Option<NodeKey> {
    NodeKey::new(
        sidecar_end.peer_addr().ok()?,
        sidecar_end.local_addr().ok()?,
    )
}

/// A target socket; leaves the targets map on drop.
pub struct Target<'a> {
    routes: &'a NodeRoutes,
    cookie: u64,
}

impl Drop for Target<'_> {
    fn drop(&mut self) {
        let _ = bpf::map_remove(self.routes.targets.as_fd(), self.cookie);
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
    value: RouteValue,
}

impl Route<'_> {
    /// Tells the program that the sidecar has now written `relayed` bytes
    /// of the node's own socket to the target (from the start of the
    /// connection; never ahead of the target). Messages are routed again
    /// once the node has written no more than `relayed`.
    pub fn update(&mut self, relayed: u64) -> io::Result<()> {
        if self.value.relayed == relayed as u32 {
            return Ok(());
        }
        self.value.relayed = relayed as u32;
        let key = self.key.bytes();
        bpf::hash_set(self.routes.routes.as_fd(), &key, &self.value.bytes())
    }
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
