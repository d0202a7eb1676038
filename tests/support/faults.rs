//! Network and process faults injected into lab pods, and what a sidecar
//! holds afterwards.
//!
//! Faults act inside one pod's namespace, on its `eth0` (never on `lo`, so a
//! pod's own nodes keep reaching their sidecar):
//!
//! - [`impair`]: packet loss and delay. `tc netem` when the kernel has it;
//!   otherwise (kernels built without `sch_netem`) loss comes from an
//!   `iptables -m statistic` rule in both directions and delay from a `tbf`
//!   shaper whose queue delays what exceeds its rate. [`Impairment`] says
//!   which one was used.
//! - [`throttle`]: a `tbf` rate limit on what the pod sends, so a transfer
//!   lasts long enough to be interrupted half-way.
//! - [`partition`] / [`heal_partition`]: `iptables` DROP of everything
//!   between this pod and another address, both ways.
//! - [`isolate`]: DROP of everything on `eth0`, both ways: once the pod's
//!   processes are then killed, not one FIN or RST leaves it — to the other
//!   pods it vanished.
//!
//! [`sidecar_sockets`] reads `ss` inside the pod and sorts the TCP sockets
//! the sidecar process holds by role, to compare with its metrics.

use std::net::{Ipv4Addr, SocketAddr};

use super::lab::Pod;
use super::{DIST_PORT, EPMD_PORT};

/// How [`impair`] degraded the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impairment {
    /// `tc qdisc ... netem loss L% delay D`.
    Netem,
    /// `iptables -m statistic` loss both ways, `tbf` queueing delay.
    StatisticAndTbf,
}

/// Drops `loss_pct` % of the packets the pod sends and receives on `eth0`
/// and delays its traffic by about `delay_ms`. Undo with [`clear_impairment`].
pub fn impair(pod: &Pod, loss_pct: u32, delay_ms: u32) -> Impairment {
    let netem = pod.run(
        "tc",
        &[
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "netem",
            "loss",
            &format!("{loss_pct}%"),
            "delay",
            &format!("{delay_ms}ms"),
            &format!("{}ms", delay_ms / 4),
        ],
    );
    if netem.status.success() {
        // netem drops on egress only: drop on ingress as well.
        statistic_loss(pod, "INPUT", "-i", loss_pct);
        return Impairment::Netem;
    }
    statistic_loss(pod, "INPUT", "-i", loss_pct);
    statistic_loss(pod, "OUTPUT", "-o", loss_pct);
    // A bucket of 30 kB at 20 Mbit/s: bursts beyond it wait in a queue of up
    // to `delay_ms`.
    pod.run_ok(
        "tc",
        &[
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            "20mbit",
            "burst",
            "30kb",
            "latency",
            &format!("{}ms", delay_ms.max(1)),
        ],
    );
    Impairment::StatisticAndTbf
}

/// Removes what [`impair`] added.
pub fn clear_impairment(pod: &Pod) {
    let _ = pod.run("tc", &["qdisc", "del", "dev", "eth0", "root"]);
    pod.run_ok("iptables", &["-F", "INPUT"]);
    pod.run_ok("iptables", &["-F", "OUTPUT"]);
}

fn statistic_loss(pod: &Pod, chain: &str, dir: &str, loss_pct: u32) {
    let probability = format!("{:.4}", f64::from(loss_pct) / 100.0);
    pod.run_ok(
        "iptables",
        &[
            "-A",
            chain,
            dir,
            "eth0",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            &probability,
            "-j",
            "DROP",
        ],
    );
}

/// Limits what the pod sends on `eth0` to `mbit` Mbit/s. Undo with
/// [`unthrottle`].
pub fn throttle(pod: &Pod, mbit: u32) {
    pod.run_ok(
        "tc",
        &[
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            &format!("{mbit}mbit"),
            "burst",
            "32kb",
            "latency",
            "2000ms",
        ],
    );
}

pub fn unthrottle(pod: &Pod) {
    pod.run_ok("tc", &["qdisc", "del", "dev", "eth0", "root"]);
}

/// The two rules of a partition from `other`, without the `-I`/`-D`.
fn partition_rules(other: Ipv4Addr) -> [Vec<String>; 2] {
    let other = other.to_string();
    let rule = |words: [&str; 5]| words.iter().map(|w| w.to_string()).collect();
    [
        rule(["INPUT", "-s", &other, "-j", "DROP"]),
        rule(["OUTPUT", "-d", &other, "-j", "DROP"]),
    ]
}

fn iptables_rules(pod: &Pod, op: &str, other: Ipv4Addr) {
    for rule in partition_rules(other) {
        let mut args = vec![op];
        args.extend(rule.iter().map(String::as_str));
        pod.run_ok("iptables", &args);
    }
}

/// Drops every packet between `pod` and `other`, both ways.
pub fn partition(pod: &Pod, other: Ipv4Addr) {
    iptables_rules(pod, "-I", other);
}

/// Removes the rules of [`partition`].
pub fn heal_partition(pod: &Pod, other: Ipv4Addr) {
    iptables_rules(pod, "-D", other);
}

/// Drops everything the pod sends or receives on `eth0`.
pub fn isolate(pod: &Pod) {
    pod.run_ok("iptables", &["-I", "INPUT", "-i", "eth0", "-j", "DROP"]);
    pod.run_ok("iptables", &["-I", "OUTPUT", "-o", "eth0", "-j", "DROP"]);
}

/// One TCP socket as `ss -tan` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub state: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Process that holds it (`None` for orphans the kernel still owns,
    /// e.g. FIN-WAIT after close, and TIME-WAIT).
    pub pid: Option<u32>,
}

/// Every TCP socket of the pod, IPv4 and IPv6 (`ss -Htanp`).
pub fn tcp_sockets(pod: &Pod) -> Vec<TcpSocket> {
    parse_ss(&pod.run_ok("ss", &["-Htanp"]))
}

/// Parses `ss -Htanp` lines: `STATE RECVQ SENDQ LOCAL PEER [users:((..,pid=N,..))]`.
pub fn parse_ss(text: &str) -> Vec<TcpSocket> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 5 {
                return None;
            }
            let addr = |s: &str| -> Option<SocketAddr> {
                let (host, port) = s.rsplit_once(':')?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let host = host.split('%').next()?;
                let host = if host == "*" { "0.0.0.0" } else { host };
                let host = host.strip_prefix("::ffff:").unwrap_or(host);
                let port = if port == "*" { 0 } else { port.parse().ok()? };
                Some(SocketAddr::new(host.parse().ok()?, port))
            };
            let pid = fields[5..].iter().find_map(|f| {
                let rest = &f[f.find("pid=")? + 4..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            });
            Some(TcpSocket {
                state: fields[0].to_string(),
                local: addr(fields[3])?,
                peer: addr(fields[4])?,
                pid,
            })
        })
        .collect()
}

/// The TCP sockets a sidecar holds, by role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarSockets {
    /// Accepted on the distribution port, by state (`ESTAB`, `FIN-WAIT-1`...).
    pub peer_legs: Vec<TcpSocket>,
    /// Accepted on a same-pod mirror listener (a node's port on the pod
    /// address, `distribution::mirror`): from the pod's own address.
    pub mirror_legs: Vec<TcpSocket>,
    /// Dialled to a local node (127.0.0.1, not EPMD).
    pub node_legs: Vec<TcpSocket>,
    /// Accepted on the EPMD port (a local node's registration, a lookup).
    pub epmd: Vec<TcpSocket>,
    /// Anything else the sidecar holds, listeners excepted.
    pub other: Vec<TcpSocket>,
    /// Sockets on the distribution port no process holds any more, in a
    /// state other than TIME-WAIT: closed by the sidecar but still retrying.
    pub orphans: Vec<TcpSocket>,
}

impl SidecarSockets {
    /// Relayed connections as the sidecar accepted them: on the
    /// distribution port and on mirror listeners.
    pub fn accepted_legs(&self) -> usize {
        self.peer_legs.len() + self.mirror_legs.len()
    }

    /// Peer legs in a state other than ESTAB.
    pub fn peer_legs_not_established(&self) -> usize {
        self.peer_legs.iter().filter(|s| s.state != "ESTAB").count()
    }
}

/// Sorts the pod's TCP sockets held by process `pid` (the sidecar).
pub fn sidecar_sockets(pod: &Pod, pid: u32) -> SidecarSockets {
    let mut out = SidecarSockets::default();
    for socket in tcp_sockets(pod) {
        if socket.state == "LISTEN" {
            continue;
        }
        if socket.pid != Some(pid) {
            if socket.pid.is_none()
                && socket.local.port() == DIST_PORT
                && socket.state != "TIME-WAIT"
            {
                out.orphans.push(socket);
            }
            continue;
        }
        if socket.local.port() == DIST_PORT {
            out.peer_legs.push(socket);
        } else if socket.local.port() == EPMD_PORT {
            out.epmd.push(socket);
        } else if socket.peer.ip().is_loopback() && socket.peer.port() != EPMD_PORT {
            out.node_legs.push(socket);
        } else if !socket.local.ip().is_loopback() && socket.peer.ip() == socket.local.ip() {
            out.mirror_legs.push(socket);
        } else {
            out.other.push(socket);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ss_lines() {
        let text = "LISTEN 0 1024 0.0.0.0:43691 0.0.0.0:* users:((\"distproxy\",pid=41,fd=9))\n\
ESTAB 0 0 198.18.0.12:43691 198.18.0.11:40123 users:((\"distproxy\",pid=41,fd=12))\n\
FIN-WAIT-1 0 1 198.18.0.12:43691 198.18.0.11:40125\n\
ESTAB 0 0 [::ffff:127.0.0.1]:36001 [::ffff:127.0.0.1]:4369 users:((\"beam.smp\",pid=77,fd=17))\n";
        let got = parse_ss(text);
        assert_eq!(got.len(), 4);
        assert_eq!(got[1].state, "ESTAB");
        assert_eq!(got[1].pid, Some(41));
        assert_eq!(got[1].peer, "198.18.0.11:40123".parse().unwrap());
        assert_eq!(got[2].pid, None);
        assert_eq!(got[3].local, "127.0.0.1:36001".parse().unwrap());
    }
}
