//! The replies of distproxy's discovery requests, as bytes, with no I/O.
//!
//! Both requests are EPMD requests (`'I'` [`DISTPROXY_POD_INFO_REQ`] and
//! `'M'` [`DISTPROXY_MEMBERS_REQ`], decoded in [`crate::epmd::proto`]); like
//! every EPMD reply, theirs carry no length prefix and the server closes the
//! connection after sending one. All integers are big-endian.
//!
//! ```text
//! pod info: 'i' | Result u8 | HostLen u16 | Host | Count u16 | Count × Entry
//! members:  'm' | Result u8 | Version u32 | RefreshMs u32 | Count u16 | Count × Entry
//! Entry:    NodeType u8 | NameLen u16 | Name
//! ```
//!
//! Pod info: `Host` is the host part this pod's nodes use (`a1@Host`),
//! `Name` a short name (`a1`). Members: `Name` is a full name
//! (`a1@pod-a.ns.svc`), `Version` changes whenever the list does, and
//! `RefreshMs` is the discovery refresh interval. `NodeType` is the EPMD
//! node type (77 normal, 72 hidden). A nonzero `Result` ends the reply
//! after the result byte: [`POD_INFO_NO_HOST`] (the sidecar was not told
//! its host part) or [`MEMBERS_DISABLED`] (discovery is not configured).
//!
//! Decoding checks every length against what is left **and** against the
//! protocol's limits before slicing, and validates names as EPMD does; an
//! answer from another pod is untrusted input.
//!
//! [`DISTPROXY_POD_INFO_REQ`]: crate::epmd::proto::DISTPROXY_POD_INFO_REQ
//! [`DISTPROXY_MEMBERS_REQ`]: crate::epmd::proto::DISTPROXY_MEMBERS_REQ

use bytes::{BufMut, BytesMut};

use crate::epmd::proto::{validate_name, ProtoError, MAX_NAME_BYTES, MAX_NAME_CHARS};

/// Reply tag of the pod-info request.
pub const POD_INFO_RESP: u8 = b'i';
/// Reply tag of the members request.
pub const MEMBERS_RESP: u8 = b'm';
/// Pod info result: this sidecar has no `discovery.host`.
pub const POD_INFO_NO_HOST: u8 = 1;
/// Members result: discovery is not configured (`discovery.service`).
pub const MEMBERS_DISABLED: u8 = 1;
/// At most this many entries in one reply (the count is a u16).
pub const MAX_ENTRIES: usize = u16::MAX as usize;
/// A host part is at most this long: a DNS name has at most 253 characters,
/// and a node name (`Name@Host`) at most 255.
pub const MAX_HOST_BYTES: usize = MAX_NAME_BYTES;
/// The largest reply a client reads (enough for 1000 nodes with 255-character
/// names of 4-byte characters); beyond that the answer is refused.
pub const MAX_REPLY_BYTES: usize = 1 << 20;

/// One node in a reply.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Entry {
    /// Short name (pod info) or full name (members).
    pub name: String,
    /// EPMD node type: 77 normal, 72 hidden.
    pub node_type: u8,
}

impl Entry {
    pub fn hidden(&self) -> bool {
        self.node_type == crate::epmd::proto::NODE_TYPE_HIDDEN
    }
}

/// A decoded pod-info reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodInfo {
    /// The pod's host part and its registered nodes.
    Known { host: String, nodes: Vec<Entry> },
    /// The sidecar answered with a nonzero result (e.g. no host configured).
    Unknown { result: u8 },
}

/// A decoded members reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembersReply {
    List {
        version: u32,
        refresh_ms: u32,
        members: Vec<Entry>,
    },
    Disabled {
        result: u8,
    },
}

/// Encodes a successful pod-info reply. Entries beyond [`MAX_ENTRIES`] are
/// left out so the reply stays well-formed.
pub fn encode_pod_info(dst: &mut BytesMut, host: &str, nodes: &[Entry]) {
    dst.put_u8(POD_INFO_RESP);
    dst.put_u8(0);
    put_str16(dst, host, MAX_HOST_BYTES);
    put_entries(dst, nodes);
}

/// Encodes a failed pod-info reply.
pub fn encode_pod_info_err(dst: &mut BytesMut, result: u8) {
    dst.put_u8(POD_INFO_RESP);
    dst.put_u8(result.max(1));
}

/// Encodes a successful members reply.
pub fn encode_members(dst: &mut BytesMut, version: u32, refresh_ms: u32, members: &[Entry]) {
    dst.put_u8(MEMBERS_RESP);
    dst.put_u8(0);
    dst.put_u32(version);
    dst.put_u32(refresh_ms);
    put_entries(dst, members);
}

/// Encodes a failed members reply.
pub fn encode_members_err(dst: &mut BytesMut, result: u8) {
    dst.put_u8(MEMBERS_RESP);
    dst.put_u8(result.max(1));
}

fn put_entries(dst: &mut BytesMut, entries: &[Entry]) {
    let entries = entries.get(..MAX_ENTRIES).unwrap_or(entries);
    dst.put_u16(u16::try_from(entries.len()).unwrap_or(u16::MAX));
    for e in entries {
        dst.put_u8(e.node_type);
        put_str16(dst, &e.name, MAX_NAME_BYTES);
    }
}

/// A u16 length and the string, cut (at a character boundary) to `max`
/// bytes and [`MAX_NAME_CHARS`] characters, so the decoder accepts it.
fn put_str16(dst: &mut BytesMut, s: &str, max: usize) {
    let chars_end = s
        .char_indices()
        .nth(MAX_NAME_CHARS)
        .map_or(s.len(), |(i, _)| i);
    let mut end = chars_end.min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let bytes = s.as_bytes().get(..end).unwrap_or_default();
    dst.put_u16(u16::try_from(bytes.len()).unwrap_or(0));
    dst.put_slice(bytes);
}

/// Decodes a complete pod-info reply (the whole reply, read to EOF).
pub fn decode_pod_info(buf: &[u8]) -> Result<PodInfo, ProtoError> {
    let mut b = buf;
    let [tag, result] = take_array(&mut b, "pod info header")?;
    if tag != POD_INFO_RESP {
        return Err(ProtoError::UnknownReplyTag(tag));
    }
    if result != 0 {
        return Ok(PodInfo::Unknown { result });
    }
    let host = take_str16(&mut b, MAX_HOST_BYTES, "host")?;
    let nodes = take_entries(&mut b)?;
    if !b.is_empty() {
        return Err(ProtoError::TrailingBytes("pod info"));
    }
    Ok(PodInfo::Known { host, nodes })
}

/// Decodes a complete members reply (the whole reply, read to EOF).
pub fn decode_members(buf: &[u8]) -> Result<MembersReply, ProtoError> {
    let mut b = buf;
    let [tag, result] = take_array(&mut b, "members header")?;
    if tag != MEMBERS_RESP {
        return Err(ProtoError::UnknownReplyTag(tag));
    }
    if result != 0 {
        return Ok(MembersReply::Disabled { result });
    }
    let version = u32::from_be_bytes(take_array(&mut b, "version")?);
    let refresh_ms = u32::from_be_bytes(take_array(&mut b, "refresh interval")?);
    let members = take_entries(&mut b)?;
    if !b.is_empty() {
        return Err(ProtoError::TrailingBytes("members"));
    }
    Ok(MembersReply::List {
        version,
        refresh_ms,
        members,
    })
}

fn take_entries(b: &mut &[u8]) -> Result<Vec<Entry>, ProtoError> {
    let count = usize::from(u16::from_be_bytes(take_array(b, "count")?));
    // Each entry takes at least 4 bytes: refuse a count the rest cannot
    // hold before reserving anything for it.
    if count.saturating_mul(4) > b.len() {
        return Err(ProtoError::Truncated("entries"));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let [node_type] = take_array(b, "node type")?;
        let name = take_str16(b, MAX_NAME_BYTES, "name")?;
        entries.push(Entry { name, node_type });
    }
    Ok(entries)
}

fn take_str16(b: &mut &[u8], max: usize, what: &'static str) -> Result<String, ProtoError> {
    let len = usize::from(u16::from_be_bytes(take_array(b, what)?));
    if len > max {
        return Err(ProtoError::Truncated(what));
    }
    let (head, rest) = b.split_at_checked(len).ok_or(ProtoError::Truncated(what))?;
    *b = rest;
    Ok(validate_name(head)?.to_owned())
}

fn take_array<const N: usize>(b: &mut &[u8], what: &'static str) -> Result<[u8; N], ProtoError> {
    let (head, rest) = b
        .split_first_chunk::<N>()
        .ok_or(ProtoError::Truncated(what))?;
    *b = rest;
    Ok(*head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epmd::proto::NameError;

    fn entry(name: &str, node_type: u8) -> Entry {
        Entry {
            name: name.into(),
            node_type,
        }
    }

    /// Pod info of `pod-a` with `a1` (normal) and `r` (hidden), field by field.
    const POD_INFO_A: &[u8] = &[
        b'i', 0, // tag, result
        0, 5, b'p', b'o', b'd', b'-', b'a', // host
        0, 2, // count
        77, 0, 2, b'a', b'1', // a1, normal
        72, 0, 1, b'r', // r, hidden
    ];

    #[test]
    fn pod_info_fixture_round_trips() {
        let nodes = vec![entry("a1", 77), entry("r", 72)];
        let mut dst = BytesMut::new();
        encode_pod_info(&mut dst, "pod-a", &nodes);
        assert_eq!(&dst[..], POD_INFO_A);
        assert_eq!(
            decode_pod_info(POD_INFO_A),
            Ok(PodInfo::Known {
                host: "pod-a".into(),
                nodes: nodes.clone()
            })
        );
        assert!(nodes[1].hidden() && !nodes[0].hidden());
        for i in 0..POD_INFO_A.len() {
            assert!(
                matches!(
                    decode_pod_info(&POD_INFO_A[..i]),
                    Err(ProtoError::Truncated(_))
                ),
                "prefix {i}: {:?}",
                decode_pod_info(&POD_INFO_A[..i])
            );
        }
        let mut more = POD_INFO_A.to_vec();
        more.push(0);
        assert_eq!(
            decode_pod_info(&more),
            Err(ProtoError::TrailingBytes("pod info"))
        );
    }

    #[test]
    fn pod_info_errors_and_bad_input() {
        let mut dst = BytesMut::new();
        encode_pod_info_err(&mut dst, POD_INFO_NO_HOST);
        assert_eq!(&dst[..], b"i\x01");
        assert_eq!(
            decode_pod_info(&dst),
            Ok(PodInfo::Unknown {
                result: POD_INFO_NO_HOST
            })
        );
        assert_eq!(
            decode_pod_info(b"m\x00"),
            Err(ProtoError::UnknownReplyTag(b'm'))
        );
        // A count the rest cannot hold is refused before allocating.
        assert_eq!(
            decode_pod_info(b"i\x00\x00\x01h\xff\xff\x4d\x00\x01a"),
            Err(ProtoError::Truncated("entries"))
        );
        // Names follow EPMD's rules.
        assert_eq!(
            decode_pod_info(b"i\x00\x00\x01h\x00\x01\x4d\x00\x01\x00"),
            Err(ProtoError::InvalidName(NameError::NulByte))
        );
        assert_eq!(
            decode_pod_info(b"i\x00\x00\x00\x00\x00"),
            Err(ProtoError::InvalidName(NameError::Empty))
        );
        // A name length beyond the protocol's limit is refused as such.
        let mut long = b"i\x00\x04\x00".to_vec();
        long.extend(std::iter::repeat_n(b'h', 1024));
        long.extend_from_slice(b"\x00\x00");
        assert_eq!(decode_pod_info(&long), Err(ProtoError::Truncated("host")));
    }

    #[test]
    fn members_round_trip() {
        let members = vec![entry("a1@pod-a.dp.test", 77), entry("ñ@10.0.0.1", 72)];
        let mut dst = BytesMut::new();
        encode_members(&mut dst, 9, 5000, &members);
        assert_eq!(&dst[..12], b"m\x00\x00\x00\x00\x09\x00\x00\x13\x88\x00\x02");
        assert_eq!(
            decode_members(&dst),
            Ok(MembersReply::List {
                version: 9,
                refresh_ms: 5000,
                members: members.clone()
            })
        );
        for i in 0..dst.len() {
            assert!(matches!(
                decode_members(&dst[..i]),
                Err(ProtoError::Truncated(_))
            ));
        }
        let mut dst = BytesMut::new();
        encode_members_err(&mut dst, MEMBERS_DISABLED);
        assert_eq!(
            decode_members(&dst),
            Ok(MembersReply::Disabled {
                result: MEMBERS_DISABLED
            })
        );
    }

    #[test]
    fn encoder_keeps_oversized_input_well_formed() {
        let host = "é".repeat(600); // 1200 bytes: cut at a character boundary
        let many: Vec<Entry> = (0..MAX_ENTRIES + 3)
            .map(|i| entry(&format!("n{i}"), 77))
            .collect();
        let mut dst = BytesMut::new();
        encode_pod_info(&mut dst, &host, &many);
        let Ok(PodInfo::Known { host: got, nodes }) = decode_pod_info(&dst) else {
            panic!("not decoded");
        };
        assert_eq!(got.chars().count(), MAX_NAME_CHARS);
        assert_eq!(nodes.len(), MAX_ENTRIES);
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x5eed;
        let mut next = || {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        };
        for i in 0..20_000 {
            let mut input = POD_INFO_A.to_vec();
            if i % 2 == 1 {
                input[0] = b'm';
            }
            let pos = usize::from(next()) % input.len();
            input[pos] = next();
            input.truncate(usize::from(next()) % (input.len() + 1));
            let _ = decode_pod_info(&input);
            let _ = decode_members(&input);
        }
    }
}
