//! Listening TCP sockets of a network namespace, read from `/proc/net/tcp`
//! and `/proc/net/tcp6` (which show the namespace of the reading process).
//! Reading them has no side effect on the servers, unlike probing with a
//! connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP state `LISTEN` in `/proc/net/tcp*`.
const TCP_LISTEN: &str = "0A";

/// Parses the contents of `/proc/net/tcp` and/or `/proc/net/tcp6` (any
/// concatenation of them) and returns the local addresses in state LISTEN.
pub fn parse_listeners(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _slot = fields.next()?;
            let local = fields.next()?;
            let _remote = fields.next()?;
            let state = fields.next()?;
            if state != TCP_LISTEN {
                return None;
            }
            parse_addr(local)
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
        let text = "  sl  local_address rem_address   st tx_queue rx_queue\n\
           0: 00000000:1111 00000000:0000 0A 00000000:00000000 00:00000000\n\
           1: 0100007F:8CA3 00000000:0000 0A 00000000:00000000 00:00000000\n\
           2: 0B0012C6:1111 0C0012C6:D431 01 00000000:00000000 00:00000000\n\
           0: 00000000000000000000000001000000:AAAB 00000000000000000000000000000000:0000 0A 0\n";
        let got = parse_listeners(text);
        if cfg!(target_endian = "little") {
            assert_eq!(
                got,
                vec![
                    "0.0.0.0:4369".parse::<SocketAddr>().unwrap(),
                    "127.0.0.1:36003".parse().unwrap(),
                    "[::1]:43691".parse().unwrap(),
                ]
            );
        }
    }
}
