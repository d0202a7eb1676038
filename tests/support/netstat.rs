//! Listening TCP sockets of a network namespace, read from `/proc/net/tcp`
//! and `/proc/net/tcp6` (which show the namespace of the reading process).
//! Reading them has no side effect on the servers, unlike probing with a
//! connection.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP state `LISTEN` in `/proc/net/tcp*`.
const TCP_LISTEN: &str = "0A";

/// A listening TCP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    /// Socket inode: matches `socket:[inode]` in `/proc/<pid>/fd/`.
    pub inode: u64,
}

/// Parses the contents of `/proc/net/tcp` and/or `/proc/net/tcp6` (any
/// concatenation of them) and returns the sockets in state LISTEN.
pub fn parse_listeners(text: &str) -> Vec<Listener> {
    text.lines()
        .filter_map(|line| {
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != TCP_LISTEN {
                return None;
            }
            Some(Listener {
                addr: parse_addr(fields[1])?,
                inode: fields[9].parse().ok()?,
            })
        })
        .collect()
}

/// Inodes of the sockets process `pid` holds open.
pub fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    fds.filter_map(|fd| {
        let link = std::fs::read_link(fd.ok()?.path()).ok()?;
        let link = link.to_str()?;
        link.strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    })
    .collect()
}

/// `0100007F:1111` (IPv4) or 32 hex digits `:` port (IPv6). The kernel prints
/// each 32-bit word of the address as a native-endian integer.
fn parse_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = ip.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listeners_of_both_families() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 00000000:1111 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1001 1 0\n\
           1: 0100007F:8CA3 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1002 1 0\n\
           2: 0B0012C6:1111 0C0012C6:D431 01 00000000:00000000 00:00000000 00000000 0 0 1003 1 0\n\
           0: 00000000000000000000000001000000:AAAB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1004 1 0\n";
        let got: Vec<(SocketAddr, u64)> = parse_listeners(text)
            .into_iter()
            .map(|l| (l.addr, l.inode))
            .collect();
        if cfg!(target_endian = "little") {
            assert_eq!(
                got,
                vec![
                    ("0.0.0.0:4369".parse().unwrap(), 1001),
                    ("127.0.0.1:36003".parse().unwrap(), 1002),
                    ("[::1]:43691".parse().unwrap(), 1004),
                ]
            );
        }
    }
}
