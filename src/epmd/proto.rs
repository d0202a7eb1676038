//! EPMD requests and replies as bytes, with no I/O.
//!
//! The wire format is the "EPMD Protocol" part of OTP's [Distribution
//! Protocol guide] (`erts/doc/guides/erl_dist_protocol.md` in `erlang/otp`).
//! Where the guide is vague, the reference server `erts/epmd/src/epmd_srv.c`
//! and the client `lib/kernel/src/erl_epmd.erl` decide, because distproxy
//! *is* the pod's EPMD: `erl`, `epmd -names` and `net_adm:names/1` must get
//! the very bytes OTP's `epmd` would send them.
//!
//! Every request is a 2-byte big-endian length and a body whose first byte
//! is the tag; framing lives in [`super::codec`], this module sees bodies
//! only. Replies carry no length prefix.
//!
//! Decoding follows `epmd_srv.c` where it is lenient too: bytes after
//! `ALIVE2_REQ`'s `Extra` are ignored, `STOP_REQ`'s name ends at its first
//! NUL, and an `ALIVE2_REQ` whose name or extra `node_reg2` refuses is a
//! [`ProtoError::RefusedAlive2`], which the server answers with an error
//! result where a malformed one is closed without a reply.
//! `tests/epmd_conformance.rs` compares the server with OTP's `epmd` byte
//! for byte.
//!
//! [Distribution Protocol guide]: https://github.com/erlang/otp/blob/master/erts/doc/guides/erl_dist_protocol.md

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};

/// Register a node (`'x'`); the connection stays open while it lives.
pub const ALIVE2_REQ: u8 = b'x';
/// Reply to `ALIVE2_REQ` with a 16-bit creation, for nodes older than version 6.
pub const ALIVE2_RESP: u8 = b'y';
/// Reply to `ALIVE2_REQ` with a 32-bit creation (`HighestVersion >= 6`).
pub const ALIVE2_X_RESP: u8 = b'v';
/// Look up a node's distribution port.
pub const PORT_PLEASE2_REQ: u8 = b'z';
/// Reply to `PORT_PLEASE2_REQ`.
pub const PORT2_RESP: u8 = b'w';
/// List registered names (`net_adm:names/1`, `epmd -names`).
pub const NAMES_REQ: u8 = b'n';
/// Debug dump of registered names (`epmd -d -names`).
pub const DUMP_REQ: u8 = b'd';
/// Ask EPMD to exit (`epmd -kill`).
pub const KILL_REQ: u8 = b'k';
/// Unregister a node by name (`epmd -stop`).
pub const STOP_REQ: u8 = b's';

/// distproxy's own request (`'E'`, 0x45): "give me a loopback egress port
/// for the remote node `Name@Host`". Sent by `deploy/erlang/distproxy_epmd.erl`
/// from `address_please/3`, from local peers only (like `ALIVE2_REQ`).
///
/// Request body: the tag, then the remote node's full name (UTF-8, the rest
/// of the body, the rules of [`validate_name`]). Reply (no length prefix,
/// always six bytes, then the connection is closed):
///
/// ```text
/// 'e' (0x65) | Result u8 | EgressPort u16 | Version u16
/// ```
///
/// Result 0: connect to `127.0.0.1:EgressPort` and speak distribution
/// version `Version` (6); otherwise port and version are 0 and the result is
/// one of [`EGRESS_REFUSED`], [`EGRESS_BAD_NAME`], [`EGRESS_UNAVAILABLE`],
/// [`EGRESS_NO_REMOTE_SIDECAR`].
///
/// Neither tag is used by OTP: `epmd_int.h` and `erl_epmd.hrl` define
/// `a Y p n d k s x z y w v` (the last also in the Wireshark dissector), all
/// lowercase except the long-gone `ALIVE_OK_RESP` `'Y'`. Stock `epmd` closes
/// the connection on an unknown tag, which is how the Erlang module knows to
/// fall back to `erl_epmd`.
pub const DISTPROXY_EGRESS_REQ: u8 = b'E';
/// Reply to [`DISTPROXY_EGRESS_REQ`].
pub const DISTPROXY_EGRESS_RESP: u8 = b'e';
/// Egress result: tunnelling is switched off (`tunnel.egress = false`).
pub const EGRESS_REFUSED: u8 = 1;
/// Egress result: the name is not `Name@Host` with both parts non-empty.
pub const EGRESS_BAD_NAME: u8 = 2;
/// Egress result: no egress listener could be had (limit reached, bind failed).
pub const EGRESS_UNAVAILABLE: u8 = 3;
/// Egress result: nothing answers on the remote host's tunnel port (a pod
/// without distproxy); the node falls back to a direct connection.
pub const EGRESS_NO_REMOTE_SIDECAR: u8 = 4;
/// distproxy's own request (`'I'`, 0x49): "which pod are you?". Sent by
/// another pod's sidecar during discovery (`src/discovery/`), so unlike the
/// other distproxy requests it is answered for remote peers. No body (bytes
/// after the tag are ignored, as for `NAMES_REQ`). Reply
/// ([`crate::discovery::wire`]): this pod's host part and its registered
/// nodes. Stock `epmd` closes the connection instead, which tells the asking
/// sidecar to fall back to `NAMES_REQ` and its host template.
pub const DISTPROXY_POD_INFO_REQ: u8 = b'I';
/// distproxy's own request (`'M'`, 0x4d): "every node of every pod", from a
/// local node (`distproxy_epmd:members/0`, `distproxy members`). Body: the
/// member-list version the asker already has (u32) and how long it is
/// willing to wait for a newer one (u32, milliseconds), or nothing (0, 0).
/// Reply: [`crate::discovery::wire`].
pub const DISTPROXY_MEMBERS_REQ: u8 = b'M';

/// The distribution version an egress reply announces: 6, the only one OTP 25
/// and later speak (the tunnel relays whatever the two nodes negotiate).
pub const EGRESS_DIST_VERSION: u16 = 6;
/// Length of a [`DISTPROXY_EGRESS_RESP`].
pub const EGRESS_RESP_LEN: usize = 6;

/// `NodeType` of a normal (visible) Erlang node.
pub const NODE_TYPE_NORMAL: u8 = 77;
/// `NodeType` of a hidden node or C node.
pub const NODE_TYPE_HIDDEN: u8 = 72;
/// `Protocol` 0: TCP/IPv4 (the only value OTP sends, also for IPv6).
pub const PROTOCOL_TCP: u8 = 0;

pub use crate::node_name::{validate_name, NameError, MAX_NAME_CHARS};
/// 255 characters of UTF-8: `MAXSYMLEN` in `epmd_int.h`.
pub const MAX_NAME_BYTES: usize = 4 * MAX_NAME_CHARS;
/// `epmd`'s `node_reg2` refuses an `Extra` longer than `MAXSYMLEN`.
pub const MAX_EXTRA_LEN: usize = 4 * MAX_NAME_CHARS;
/// The largest `ALIVE2_REQ` body without ignored trailing bytes: the
/// longest name and extra (13 fixed bytes + 1020 + 1020 = 2053).
pub const MAX_ALIVE2_LEN: usize = 13 + MAX_NAME_BYTES + MAX_EXTRA_LEN;
/// The largest request body `epmd` reads: 3057 bytes (`INBUF_SIZE - 3`);
/// a longer length closes the connection before the body is read. Between
/// [`MAX_ALIVE2_LEN`] and this, an `ALIVE2_REQ` with trailing bytes is
/// still served (they are ignored, as by `epmd`).
pub const MAX_REQUEST_LEN: usize = 3057;

/// What a node registers (`ALIVE2_REQ` body) and what `PORT2_RESP` echoes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// The node's own distribution port.
    pub port: u16,
    /// [`NODE_TYPE_NORMAL`] or [`NODE_TYPE_HIDDEN`]; echoed, never interpreted.
    pub node_type: u8,
    /// [`PROTOCOL_TCP`]; echoed, never interpreted.
    pub protocol: u8,
    /// Highest distribution version: 6 from OTP 23 on, 5 before.
    pub highest_version: u16,
    /// Lowest distribution version: 6 from OTP 25 on.
    pub lowest_version: u16,
    /// The part before `@`; valid per [`validate_name`].
    pub name: String,
    /// Opaque, at most [`MAX_EXTRA_LEN`] bytes; OTP sends none.
    pub extra: Bytes,
}

/// One EPMD request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Alive2(NodeSpec),
    PortPlease2 {
        name: String,
    },
    Names,
    Dump,
    Kill,
    /// `name`: the bytes before the first NUL, not necessarily a valid
    /// name (then it matches no registered node).
    Stop {
        name: Vec<u8>,
    },
    /// [`DISTPROXY_EGRESS_REQ`]: the full name of a node in another pod.
    Egress {
        node: String,
    },
    /// [`DISTPROXY_POD_INFO_REQ`].
    PodInfo,
    /// [`DISTPROXY_MEMBERS_REQ`]: answer when the member list's version
    /// differs from `known_version`, or after `wait_ms` at the latest.
    Members {
        known_version: u32,
        wait_ms: u32,
    },
}

/// A request or reply that cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("empty request")]
    Empty,
    #[error("unknown request tag {0:#04x}")]
    UnknownTag(u8),
    #[error("unknown reply tag {0:#04x}")]
    UnknownReplyTag(u8),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("trailing bytes after {0}")]
    TrailingBytes(&'static str),
    #[error("invalid node name: {0}")]
    InvalidName(#[from] NameError),
    #[error("extra field of {0} bytes exceeds limit of {max}", max = MAX_EXTRA_LEN)]
    ExtraTooLong(usize),
    /// A well-formed `ALIVE2_REQ` that `epmd`'s `node_reg2` refuses: it
    /// answers result 1 (creation 99) and keeps the connection, as for a
    /// duplicate name. `extended`: the reply is `ALIVE2_X_RESP`.
    #[error("ALIVE2_REQ refused: {reason}")]
    RefusedAlive2 {
        extended: bool,
        reason: Box<ProtoError>,
    },
    /// A lookup of a name of 255 characters: `epmd_srv.c` counts the NUL
    /// after the name as a character, so it closes such a lookup without a
    /// reply, and so do we.
    #[error("lookup of a name of {0} characters (epmd answers at most 254)")]
    LookupTooLong(usize),
}

impl Request {
    /// Decode a request body (the bytes after the 2-byte length prefix).
    pub fn decode(body: &[u8]) -> Result<Request, ProtoError> {
        let (&tag, rest) = body.split_first().ok_or(ProtoError::Empty)?;
        match tag {
            ALIVE2_REQ => decode_alive2(rest).map(Request::Alive2),
            PORT_PLEASE2_REQ => {
                let name = name_to_end(rest)?;
                let chars = name.chars().count();
                if chars >= MAX_NAME_CHARS {
                    return Err(ProtoError::LookupTooLong(chars));
                }
                Ok(Request::PortPlease2 { name })
            }
            // `epmd_srv.c` reads the name as a C string: up to the first
            // NUL, whatever follows; any bytes, since it only compares them
            // with registered names. At least one byte must follow the tag.
            STOP_REQ => {
                if rest.is_empty() {
                    return Err(ProtoError::InvalidName(NameError::Empty));
                }
                let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
                Ok(Request::Stop {
                    name: rest[..end].to_vec(),
                })
            }
            // `epmd_srv.c` looks at nothing but the tag of these three and
            // ignores the rest of the body. We tolerate it too: nothing
            // depends on it, and refusing would break a client epmd serves.
            NAMES_REQ => Ok(Request::Names),
            DUMP_REQ => Ok(Request::Dump),
            KILL_REQ => Ok(Request::Kill),
            DISTPROXY_EGRESS_REQ => Ok(Request::Egress {
                node: validate_name(rest)?.to_owned(),
            }),
            DISTPROXY_POD_INFO_REQ => Ok(Request::PodInfo),
            DISTPROXY_MEMBERS_REQ => match rest {
                [] => Ok(Request::Members {
                    known_version: 0,
                    wait_ms: 0,
                }),
                [v0, v1, v2, v3, w0, w1, w2, w3] => Ok(Request::Members {
                    known_version: u32::from_be_bytes([*v0, *v1, *v2, *v3]),
                    wait_ms: u32::from_be_bytes([*w0, *w1, *w2, *w3]),
                }),
                _ if rest.len() < 8 => Err(ProtoError::Truncated("members request")),
                _ => Err(ProtoError::TrailingBytes("members request")),
            },
            other => Err(ProtoError::UnknownTag(other)),
        }
    }

    /// Encode with the 2-byte length prefix (client side: `distproxy names`,
    /// tests). A name longer than [`MAX_NAME_BYTES`] or an extra longer than
    /// [`MAX_EXTRA_LEN`] is cut so that the frame stays well-formed; a value
    /// that came from [`Request::decode`] never is.
    pub fn encode(&self, dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_u16(0);
        match self {
            Request::Alive2(spec) => {
                dst.put_u8(ALIVE2_REQ);
                dst.put_u16(spec.port);
                dst.put_u8(spec.node_type);
                dst.put_u8(spec.protocol);
                dst.put_u16(spec.highest_version);
                dst.put_u16(spec.lowest_version);
                put_field16(dst, clamp(spec.name.as_bytes(), MAX_NAME_BYTES));
                put_field16(dst, clamp(&spec.extra, MAX_EXTRA_LEN));
            }
            Request::PortPlease2 { name } => {
                dst.put_u8(PORT_PLEASE2_REQ);
                dst.put_slice(clamp(name.as_bytes(), MAX_NAME_BYTES));
            }
            Request::Names => dst.put_u8(NAMES_REQ),
            Request::Dump => dst.put_u8(DUMP_REQ),
            Request::Kill => dst.put_u8(KILL_REQ),
            Request::Stop { name } => {
                // A C string, so that an empty name is still a request.
                dst.put_u8(STOP_REQ);
                dst.put_slice(clamp(name, MAX_NAME_BYTES));
                dst.put_u8(0);
            }
            Request::Egress { node } => {
                dst.put_u8(DISTPROXY_EGRESS_REQ);
                dst.put_slice(clamp(node.as_bytes(), MAX_NAME_BYTES));
            }
            Request::PodInfo => dst.put_u8(DISTPROXY_POD_INFO_REQ),
            Request::Members {
                known_version,
                wait_ms,
            } => {
                dst.put_u8(DISTPROXY_MEMBERS_REQ);
                dst.put_u32(*known_version);
                dst.put_u32(*wait_ms);
            }
        }
        // The body is at most MAX_REQUEST_LEN bytes, so it fits.
        let len = u16::try_from(dst.len() - start - 2).unwrap_or(u16::MAX);
        if let Some(prefix) = dst.get_mut(start..start + 2) {
            prefix.copy_from_slice(&len.to_be_bytes());
        }
    }
}

/// `ALIVE2_REQ` in `epmd_srv.c`'s order: a body of 13 bytes or less, a
/// name or extra length past the body, or a NUL in the name close the
/// connection; then `node_reg2` refuses (with a reply) a name that is not
/// UTF-8 or longer than 255 characters, and an extra of more than 1020
/// bytes. Bytes after the extra are ignored.
fn decode_alive2(mut b: &[u8]) -> Result<NodeSpec, ProtoError> {
    let body_len = 1 + b.len();
    let port = u16::from_be_bytes(take_array(&mut b, "port")?);
    let [node_type] = take_array(&mut b, "node type")?;
    let [protocol] = take_array(&mut b, "protocol")?;
    let highest_version = u16::from_be_bytes(take_array(&mut b, "highest version")?);
    let lowest_version = u16::from_be_bytes(take_array(&mut b, "lowest version")?);
    let nlen = u16::from_be_bytes(take_array(&mut b, "name length")?);
    let name = take(&mut b, nlen.into(), "name")?;
    let elen = usize::from(u16::from_be_bytes(take_array(&mut b, "extra length")?));
    let extra = take(&mut b, elen, "extra")?;
    // Lengths first, contents second: a lying length is reported as such.
    if body_len <= 13 {
        // `epmd`: "at least one character for the node name".
        return Err(ProtoError::Truncated("name"));
    }
    if name.contains(&0) {
        return Err(NameError::NulByte.into());
    }
    let refused = |reason: ProtoError| ProtoError::RefusedAlive2 {
        extended: highest_version >= 6,
        reason: Box::new(reason),
    };
    // `epmd` registers an empty name here (a body padded by an extra or
    // trailing bytes); distproxy refuses it like any invalid name.
    let name = validate_name(name)
        .map_err(|e| refused(e.into()))?
        .to_owned();
    if elen > MAX_EXTRA_LEN {
        return Err(refused(ProtoError::ExtraTooLong(elen)));
    }
    let extra = Bytes::copy_from_slice(extra);
    Ok(NodeSpec {
        port,
        node_type,
        protocol,
        highest_version,
        lowest_version,
        name,
        extra,
    })
}

/// `PORT_PLEASE2_REQ` and `STOP_REQ`: the name is the rest of the body. One
/// trailing NUL is dropped, as `epmd_srv.c` does (clients of R3A and later
/// sent C strings); OTP's `erl_epmd` sends none.
fn name_to_end(rest: &[u8]) -> Result<String, ProtoError> {
    let name = rest.strip_suffix(&[0]).unwrap_or(rest);
    Ok(validate_name(name)?.to_owned())
}

fn take<'a>(b: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
    let (head, rest) = b.split_at_checked(n).ok_or(ProtoError::Truncated(what))?;
    *b = rest;
    Ok(head)
}

fn take_array<const N: usize>(b: &mut &[u8], what: &'static str) -> Result<[u8; N], ProtoError> {
    let (head, rest) = b
        .split_first_chunk::<N>()
        .ok_or(ProtoError::Truncated(what))?;
    *b = rest;
    Ok(*head)
}

fn clamp(bytes: &[u8], max: usize) -> &[u8] {
    bytes.get(..max).unwrap_or(bytes)
}

/// A u16 length and the bytes (which callers clamp to far below `u16::MAX`).
fn put_field16(dst: &mut BytesMut, bytes: &[u8]) {
    let bytes = clamp(bytes, usize::from(u16::MAX));
    dst.put_u16(u16::try_from(bytes.len()).unwrap_or(u16::MAX));
    dst.put_slice(bytes);
}

/// `ALIVE2_X_RESP` (`'v'`, result, u32 creation) when `extended`, else
/// `ALIVE2_RESP` (`'y'`, result, u16 creation: the low 16 bits).
pub fn encode_alive2_resp(dst: &mut BytesMut, result: u8, creation: u32, extended: bool) {
    if extended {
        dst.put_u8(ALIVE2_X_RESP);
        dst.put_u8(result);
        dst.put_u32(creation);
    } else {
        dst.put_u8(ALIVE2_RESP);
        dst.put_u8(result);
        dst.put_u16(creation as u16);
    }
}

/// A successful `PORT2_RESP` echoing `spec`, but with `port` instead of
/// `spec.port` (the proxy may advertise its own port).
pub fn encode_port2_ok(dst: &mut BytesMut, spec: &NodeSpec, port: u16) {
    dst.put_u8(PORT2_RESP);
    dst.put_u8(0);
    dst.put_u16(port);
    dst.put_u8(spec.node_type);
    dst.put_u8(spec.protocol);
    dst.put_u16(spec.highest_version);
    dst.put_u16(spec.lowest_version);
    put_field16(dst, clamp(spec.name.as_bytes(), MAX_NAME_BYTES));
    put_field16(dst, clamp(&spec.extra, MAX_EXTRA_LEN));
}

/// A failed `PORT2_RESP`: `'w'` and a nonzero result (`epmd` sends 1).
pub fn encode_port2_err(dst: &mut BytesMut, result: u8) {
    dst.put_u8(PORT2_RESP);
    dst.put_u8(result);
}

/// The first four bytes of a `NAMES_REQ` or `DUMP_REQ` reply: EPMD's port as
/// a u32. `erl_epmd` closes the connection if it differs from the port it
/// dialled.
pub fn encode_names_header(dst: &mut BytesMut, epmd_port: u32) {
    dst.put_u32(epmd_port);
}

/// One `NAMES_REQ` line, exactly as `epmd_srv.c` writes it.
pub fn encode_names_line(dst: &mut BytesMut, name: &str, port: u16) {
    // Writing to a BytesMut cannot fail: it grows.
    let _ = writeln!(dst, "name {name} at port {port}");
}

/// One `DUMP_REQ` line for an active name, as `epmd_srv.c` writes it. The
/// guide shows no angle brackets, but `epmd` writes them, and its
/// `len += r + 1` sends the NUL that `snprintf` put after the newline.
pub fn encode_dump_line(dst: &mut BytesMut, name: &str, port: u16, fd: i64) {
    let _ = write!(
        dst,
        "active name     <{name}> at port {port}, fd = {fd}\n\0"
    );
}

/// One `DUMP_REQ` line for a name no longer registered (`epmd`'s
/// "old/unused" list), as `epmd_srv.c` writes it: a space before the
/// newline, and the NUL after it.
pub fn encode_dump_unused_line(dst: &mut BytesMut, name: &str, port: u16, fd: i64) {
    let _ = write!(
        dst,
        "old/unused name <{name}>, port = {port}, fd = {fd} \n\0"
    );
}

/// A [`DISTPROXY_EGRESS_RESP`]: `result` 0 with the egress port and
/// [`EGRESS_DIST_VERSION`], or a nonzero result with port and version 0.
pub fn encode_egress_resp(dst: &mut BytesMut, result: u8, port: u16) {
    let (port, version) = if result == 0 {
        (port, EGRESS_DIST_VERSION)
    } else {
        (0, 0)
    };
    dst.put_u8(DISTPROXY_EGRESS_RESP);
    dst.put_u8(result);
    dst.put_u16(port);
    dst.put_u16(version);
}

/// A decoded [`DISTPROXY_EGRESS_RESP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressReply {
    pub result: u8,
    pub port: u16,
    pub version: u16,
}

/// Decodes a [`DISTPROXY_EGRESS_RESP`] at the start of `buf`: `Ok(None)`
/// while it is incomplete.
pub fn decode_egress_resp(buf: &[u8]) -> Result<Option<(EgressReply, usize)>, ProtoError> {
    complete(buf, |b| {
        let [tag] = take_array(b, "reply tag")?;
        if tag != DISTPROXY_EGRESS_RESP {
            return Err(ProtoError::UnknownReplyTag(tag));
        }
        let [result] = take_array(b, "result")?;
        let port = u16::from_be_bytes(take_array(b, "egress port")?);
        let version = u16::from_be_bytes(take_array(b, "version")?);
        Ok(EgressReply {
            result,
            port,
            version,
        })
    })
}

/// A decoded `PORT2_RESP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Port2Reply {
    Found(NodeSpec),
    NotFound { result: u8 },
}

/// Decodes a `PORT2_RESP` at the start of `buf`: `Ok(None)` while it is
/// incomplete, else the reply and the number of bytes it took.
pub fn decode_port2_resp(buf: &[u8]) -> Result<Option<(Port2Reply, usize)>, ProtoError> {
    complete(buf, |b| {
        let [tag] = take_array(b, "reply tag")?;
        if tag != PORT2_RESP {
            return Err(ProtoError::UnknownReplyTag(tag));
        }
        let [result] = take_array(b, "result")?;
        if result != 0 {
            return Ok(Port2Reply::NotFound { result });
        }
        let port = u16::from_be_bytes(take_array(b, "port")?);
        let [node_type] = take_array(b, "node type")?;
        let [protocol] = take_array(b, "protocol")?;
        let highest_version = u16::from_be_bytes(take_array(b, "highest version")?);
        let lowest_version = u16::from_be_bytes(take_array(b, "lowest version")?);
        let nlen = u16::from_be_bytes(take_array(b, "name length")?);
        let name = validate_name(take(b, nlen.into(), "name")?)?.to_owned();
        let elen = u16::from_be_bytes(take_array(b, "extra length")?);
        let extra = Bytes::copy_from_slice(take(b, elen.into(), "extra")?);
        Ok(Port2Reply::Found(NodeSpec {
            port,
            node_type,
            protocol,
            highest_version,
            lowest_version,
            name,
            extra,
        }))
    })
}

/// A decoded `ALIVE2_RESP` or `ALIVE2_X_RESP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alive2Reply {
    pub result: u8,
    pub creation: u32,
    /// `true` for `ALIVE2_X_RESP` (32-bit creation).
    pub extended: bool,
}

/// Decodes an `ALIVE2_RESP` or `ALIVE2_X_RESP` at the start of `buf`:
/// `Ok(None)` while it is incomplete.
pub fn decode_alive2_resp(buf: &[u8]) -> Result<Option<(Alive2Reply, usize)>, ProtoError> {
    complete(buf, |b| {
        let [tag] = take_array(b, "reply tag")?;
        let extended = match tag {
            ALIVE2_X_RESP => true,
            ALIVE2_RESP => false,
            other => return Err(ProtoError::UnknownReplyTag(other)),
        };
        let [result] = take_array(b, "result")?;
        let creation = if extended {
            u32::from_be_bytes(take_array(b, "creation")?)
        } else {
            u16::from_be_bytes(take_array(b, "creation")?).into()
        };
        Ok(Alive2Reply {
            result,
            creation,
            extended,
        })
    })
}

/// Runs a reply decoder; running out of bytes means "incomplete", not an
/// error, since a reply has no length prefix to lie with.
fn complete<T>(
    buf: &[u8],
    decode: impl FnOnce(&mut &[u8]) -> Result<T, ProtoError>,
) -> Result<Option<(T, usize)>, ProtoError> {
    let mut b = buf;
    match decode(&mut b) {
        Ok(reply) => Ok(Some((reply, buf.len() - b.len()))),
        Err(ProtoError::Truncated(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parses the text of a `NAMES_REQ` reply (after the 4-byte port), keeping
/// the lines `name <Name> at port <Port>` and skipping others, as
/// `erl_epmd:names/1` does.
pub fn parse_names(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|line| {
            let (name, port) = line.strip_prefix("name ")?.rsplit_once(" at port ")?;
            Some((name.to_owned(), port.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ALIVE2_REQ` body of an OTP 25 node `a1` on port 38911, written out
    /// field by field from the guide's table.
    const ALIVE2_A1: &[u8] = &[
        120, // ALIVE2_REQ
        0x97, 0xff, // PortNo 38911
        77,   // NodeType: normal
        0,    // Protocol: TCP/IPv4
        0x00, 0x06, // HighestVersion 6
        0x00, 0x06, // LowestVersion 6
        0x00, 0x02, // Nlen
        b'a', b'1', // NodeName
        0x00, 0x00, // Elen
    ];

    fn a1() -> NodeSpec {
        NodeSpec {
            port: 38911,
            node_type: 77,
            protocol: 0,
            highest_version: 6,
            lowest_version: 6,
            name: "a1".into(),
            extra: Bytes::new(),
        }
    }

    fn alive2_body(name: &[u8], extra: &[u8]) -> Vec<u8> {
        let mut v = vec![b'x', 0x10, 0x00, 77, 0, 0, 6, 0, 5];
        v.extend_from_slice(&(name.len() as u16).to_be_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&(extra.len() as u16).to_be_bytes());
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn decodes_alive2_fixture() {
        assert_eq!(Request::decode(ALIVE2_A1), Ok(Request::Alive2(a1())));
    }

    #[test]
    fn decodes_alive2_with_extra() {
        let body = alive2_body(b"n", b"\x01\x02\x03");
        let Ok(Request::Alive2(spec)) = Request::decode(&body) else {
            panic!("not decoded: {:?}", Request::decode(&body));
        };
        assert_eq!(spec.port, 0x1000);
        assert_eq!((spec.highest_version, spec.lowest_version), (6, 5));
        assert_eq!(&spec.extra[..], b"\x01\x02\x03");
    }

    #[test]
    fn every_strict_prefix_of_alive2_is_truncated() {
        assert_eq!(Request::decode(&[]), Err(ProtoError::Empty));
        for i in 1..ALIVE2_A1.len() {
            assert!(
                matches!(
                    Request::decode(&ALIVE2_A1[..i]),
                    Err(ProtoError::Truncated(_))
                ),
                "prefix of {i} bytes: {:?}",
                Request::decode(&ALIVE2_A1[..i])
            );
        }
    }

    #[test]
    fn alive2_with_lying_lengths_is_refused() {
        let mut nlen_lies = ALIVE2_A1.to_vec();
        nlen_lies[10] = 40;
        assert_eq!(
            Request::decode(&nlen_lies),
            Err(ProtoError::Truncated("name"))
        );

        let mut nlen_huge = ALIVE2_A1.to_vec();
        nlen_huge[9] = 0xff;
        assert_eq!(
            Request::decode(&nlen_huge),
            Err(ProtoError::Truncated("name"))
        );

        let mut elen_lies = ALIVE2_A1.to_vec();
        elen_lies[14] = 1;
        assert_eq!(
            Request::decode(&elen_lies),
            Err(ProtoError::Truncated("extra"))
        );

        // Nlen swallowing Elen: no room left for the extra length.
        let mut nlen_eats_elen = ALIVE2_A1.to_vec();
        nlen_eats_elen[10] = 4;
        assert_eq!(
            Request::decode(&nlen_eats_elen),
            Err(ProtoError::Truncated("extra length"))
        );

        // Bytes after the extra are ignored, as by epmd.
        let mut trailing = ALIVE2_A1.to_vec();
        trailing.extend_from_slice(b"\0junk");
        assert_eq!(Request::decode(&trailing), Ok(Request::Alive2(a1())));

        // The shortest body epmd reads is 14 bytes, even with an empty name.
        assert_eq!(
            Request::decode(&alive2_body(b"", b"")),
            Err(ProtoError::Truncated("name"))
        );

        // An extra that is too long is refused with a reply.
        let big = alive2_body(b"a", &[7; MAX_EXTRA_LEN + 1]);
        assert_eq!(
            Request::decode(&big),
            Err(ProtoError::RefusedAlive2 {
                extended: true,
                reason: Box::new(ProtoError::ExtraTooLong(MAX_EXTRA_LEN + 1))
            })
        );
        let max = alive2_body(b"a", &[7; MAX_EXTRA_LEN]);
        assert!(Request::decode(&max).is_ok());
    }

    #[test]
    fn alive2_validates_the_name() {
        // A NUL closes the connection...
        assert_eq!(
            Request::decode(&alive2_body(b"a\0b", b"")),
            Err(ProtoError::InvalidName(NameError::NulByte))
        );
        // ...what node_reg2 refuses gets a reply, `v` or `y` by version.
        let long = "é".repeat(256);
        let cases: [(&[u8], &[u8], NameError); 3] = [
            (b"", b"x", NameError::Empty),
            (b"\xff", b"", NameError::NotUtf8),
            (long.as_bytes(), b"", NameError::TooLong { chars: 256 }),
        ];
        for (name, extra, err) in cases {
            let mut body = alive2_body(name, extra);
            assert_eq!(
                Request::decode(&body),
                Err(ProtoError::RefusedAlive2 {
                    extended: true,
                    reason: Box::new(ProtoError::InvalidName(err.clone()))
                })
            );
            body[6] = 5; // HighestVersion 5
            assert_eq!(
                Request::decode(&body),
                Err(ProtoError::RefusedAlive2 {
                    extended: false,
                    reason: Box::new(ProtoError::InvalidName(err))
                })
            );
        }
    }

    #[test]
    fn names_rules() {
        assert_eq!(validate_name(b"a1"), Ok("a1"));
        assert_eq!(validate_name(b""), Err(NameError::Empty));
        assert_eq!(validate_name(b"a\0"), Err(NameError::NulByte));
        // 255 characters of 2- and 4-byte UTF-8 are fine...
        let e = "é".repeat(255);
        assert_eq!(validate_name(e.as_bytes()), Ok(e.as_str()));
        let emoji = "😀".repeat(255);
        assert_eq!(emoji.len(), MAX_NAME_BYTES);
        assert_eq!(validate_name(emoji.as_bytes()), Ok(emoji.as_str()));
        // ...256 are not.
        let long = "é".repeat(256);
        assert_eq!(
            validate_name(long.as_bytes()),
            Err(NameError::TooLong { chars: 256 })
        );
        for bad in [
            &b"\xc0\x80"[..],    // overlong NUL
            b"\xe0\x80\xaf",     // overlong '/'
            b"\xed\xa0\x80",     // surrogate
            b"\xf4\x90\x80\x80", // above U+10FFFF
            b"a\xc3",            // cut short
            b"\xff",
        ] {
            assert_eq!(validate_name(bad), Err(NameError::NotUtf8), "{bad:?}");
        }
        // The longest ALIVE2 body without trailing bytes is MAX_ALIVE2_LEN.
        let body = alive2_body(emoji.as_bytes(), &[0; MAX_EXTRA_LEN]);
        assert_eq!(body.len(), MAX_ALIVE2_LEN);
        assert!(Request::decode(&body).is_ok());
    }

    #[test]
    fn port_please2() {
        let name = |n: &str| Ok(Request::PortPlease2 { name: n.into() });
        assert_eq!(Request::decode(b"za1"), name("a1"));
        // One trailing NUL is tolerated, as epmd does; not two.
        assert_eq!(Request::decode(b"za1\0"), name("a1"));
        assert_eq!(
            Request::decode(b"za1\0\0"),
            Err(ProtoError::InvalidName(NameError::NulByte))
        );
        assert_eq!(
            Request::decode(b"z"),
            Err(ProtoError::InvalidName(NameError::Empty))
        );
        assert_eq!(
            Request::decode(b"z\0"),
            Err(ProtoError::InvalidName(NameError::Empty))
        );
        assert_eq!(
            Request::decode(b"z\xc3\x28"),
            Err(ProtoError::InvalidName(NameError::NotUtf8))
        );
        let mut long = b"z".to_vec();
        long.extend_from_slice("ü".repeat(256).as_bytes());
        assert_eq!(
            Request::decode(&long),
            Err(ProtoError::InvalidName(NameError::TooLong { chars: 256 }))
        );
        // epmd counts the NUL after the name: 254 characters are looked
        // up, 255 are closed without a reply (with or without a NUL sent).
        let mut ok = b"z".to_vec();
        ok.extend_from_slice("ü".repeat(254).as_bytes());
        assert!(Request::decode(&ok).is_ok());
        ok.extend_from_slice("ü".as_bytes());
        assert_eq!(Request::decode(&ok), Err(ProtoError::LookupTooLong(255)));
        ok.push(0);
        assert_eq!(Request::decode(&ok), Err(ProtoError::LookupTooLong(255)));
    }

    #[test]
    fn stop_and_tag_only_requests() {
        assert_eq!(
            Request::decode(b"sa1\0"),
            Ok(Request::Stop { name: "a1".into() })
        );
        assert_eq!(
            Request::decode(b"s"),
            Err(ProtoError::InvalidName(NameError::Empty))
        );
        // A C string: up to the first NUL, any bytes.
        assert_eq!(
            Request::decode(b"sa1\0junk\0"),
            Ok(Request::Stop { name: "a1".into() })
        );
        assert_eq!(
            Request::decode(b"s\0"),
            Ok(Request::Stop { name: Vec::new() })
        );
        assert_eq!(
            Request::decode(b"s\xff"),
            Ok(Request::Stop { name: vec![0xff] })
        );
        assert_eq!(Request::decode(b"n"), Ok(Request::Names));
        assert_eq!(Request::decode(b"d"), Ok(Request::Dump));
        assert_eq!(Request::decode(b"k"), Ok(Request::Kill));
        // Trailing bytes after a tag-only request are ignored, as by epmd.
        assert_eq!(Request::decode(b"n\0junk"), Ok(Request::Names));
    }

    #[test]
    fn unknown_tags() {
        for tag in [b'A', b'y', b'w', 0, 0xff, b'a', b'e'] {
            assert_eq!(Request::decode(&[tag]), Err(ProtoError::UnknownTag(tag)));
        }
        assert_eq!(
            ProtoError::UnknownTag(0x41).to_string(),
            "unknown request tag 0x41"
        );
    }

    #[test]
    fn encodes_requests_with_length_prefix() {
        let mut dst = BytesMut::new();
        Request::Alive2(a1()).encode(&mut dst);
        assert_eq!(&dst[..2], &[0, ALIVE2_A1.len() as u8]);
        assert_eq!(&dst[2..], ALIVE2_A1);

        let mut dst = BytesMut::new();
        Request::PortPlease2 { name: "a1".into() }.encode(&mut dst);
        Request::Names.encode(&mut dst);
        assert_eq!(&dst[..], b"\x00\x03za1\x00\x01n");
    }

    #[test]
    fn requests_round_trip() {
        let mut spec = a1();
        spec.extra = Bytes::from_static(b"\0extra\xff");
        spec.name = "ñødé".into();
        for req in [
            Request::Alive2(spec),
            Request::PortPlease2 { name: "b2".into() },
            Request::Names,
            Request::Dump,
            Request::Kill,
            Request::Stop { name: "c3".into() },
            Request::Egress {
                node: "b1@pod-b.dp.test".into(),
            },
            Request::PodInfo,
            Request::Members {
                known_version: 7,
                wait_ms: 30_000,
            },
        ] {
            let mut dst = BytesMut::new();
            req.encode(&mut dst);
            let len = u16::from_be_bytes([dst[0], dst[1]]) as usize;
            assert_eq!(len, dst.len() - 2);
            assert_eq!(Request::decode(&dst[2..]), Ok(req));
        }
    }

    #[test]
    fn encoder_keeps_oversized_fields_well_formed() {
        let mut spec = a1();
        spec.name = "x".repeat(70_000);
        spec.extra = Bytes::from(vec![1; 70_000]);
        let mut dst = BytesMut::new();
        Request::Alive2(spec).encode(&mut dst);
        assert_eq!(dst.len() - 2, MAX_ALIVE2_LEN);
        assert_eq!(
            u16::from_be_bytes([dst[0], dst[1]]) as usize,
            MAX_ALIVE2_LEN
        );
    }

    #[test]
    fn alive2_replies() {
        let mut dst = BytesMut::new();
        encode_alive2_resp(&mut dst, 0, 0x0001_2345, true);
        assert_eq!(&dst[..], &[118, 0, 0x00, 0x01, 0x23, 0x45]);
        let mut dst = BytesMut::new();
        encode_alive2_resp(&mut dst, 1, 0x0001_2345, false);
        assert_eq!(&dst[..], &[121, 1, 0x23, 0x45]);

        let x = [118, 0, 0, 0, 0, 5, 0xaa];
        let reply = Alive2Reply {
            result: 0,
            creation: 5,
            extended: true,
        };
        assert_eq!(decode_alive2_resp(&x), Ok(Some((reply, 6))));
        for i in 0..6 {
            assert_eq!(decode_alive2_resp(&x[..i]), Ok(None));
        }
        let y = [121, 1, 0, 99];
        let reply = Alive2Reply {
            result: 1,
            creation: 99,
            extended: false,
        };
        assert_eq!(decode_alive2_resp(&y), Ok(Some((reply, 4))));
        for i in 0..4 {
            assert_eq!(decode_alive2_resp(&y[..i]), Ok(None));
        }
        assert_eq!(
            decode_alive2_resp(b"w"),
            Err(ProtoError::UnknownReplyTag(b'w'))
        );
    }

    /// `PORT2_RESP` for `a1`, written out from the guide's table.
    const PORT2_A1: &[u8] = &[
        119, // PORT2_RESP
        0,   // Result: ok
        0xaa, 0xab, // PortNo 43691
        77,   // NodeType
        0,    // Protocol
        0x00, 0x06, // HighestVersion
        0x00, 0x06, // LowestVersion
        0x00, 0x02, // Nlen
        b'a', b'1', // NodeName
        0x00, 0x01, // Elen
        0x2a, // Extra
    ];

    #[test]
    fn port2_replies() {
        let mut spec = a1();
        spec.extra = Bytes::from_static(b"*");
        let mut dst = BytesMut::new();
        encode_port2_ok(&mut dst, &spec, 43691);
        assert_eq!(&dst[..], PORT2_A1);

        let mut with_more = PORT2_A1.to_vec();
        with_more.push(0xee);
        let mut found = spec.clone();
        found.port = 43691;
        assert_eq!(
            decode_port2_resp(&with_more),
            Ok(Some((Port2Reply::Found(found), PORT2_A1.len())))
        );
        for i in 0..PORT2_A1.len() {
            assert_eq!(decode_port2_resp(&PORT2_A1[..i]), Ok(None), "prefix {i}");
        }

        let mut dst = BytesMut::new();
        encode_port2_err(&mut dst, 1);
        assert_eq!(&dst[..], &[119, 1]);
        assert_eq!(
            decode_port2_resp(&[119, 1]),
            Ok(Some((Port2Reply::NotFound { result: 1 }, 2)))
        );
        assert_eq!(decode_port2_resp(&[119]), Ok(None));
        assert_eq!(
            decode_port2_resp(b"v"),
            Err(ProtoError::UnknownReplyTag(b'v'))
        );
        let mut bad_name = PORT2_A1.to_vec();
        bad_name[12] = 0;
        assert_eq!(
            decode_port2_resp(&bad_name),
            Err(ProtoError::InvalidName(NameError::NulByte))
        );
    }

    #[test]
    fn egress_request_fixture() {
        let wire = b"\x00\x09Eb1@pod-b";
        let mut dst = BytesMut::new();
        Request::Egress {
            node: "b1@pod-b".into(),
        }
        .encode(&mut dst);
        assert_eq!(&dst[..], wire);
        assert_eq!(
            Request::decode(&wire[2..]),
            Ok(Request::Egress {
                node: "b1@pod-b".into()
            })
        );
        // The name rules of every other request apply; the `@` is the
        // server's business (it answers EGRESS_BAD_NAME).
        assert_eq!(
            Request::decode(b"E"),
            Err(ProtoError::InvalidName(NameError::Empty))
        );
        assert_eq!(
            Request::decode(b"Eb\0@h"),
            Err(ProtoError::InvalidName(NameError::NulByte))
        );
        assert_eq!(
            Request::decode(b"E\xc3"),
            Err(ProtoError::InvalidName(NameError::NotUtf8))
        );
        let mut long = b"E".to_vec();
        long.extend(std::iter::repeat_n(b'x', 256));
        assert_eq!(
            Request::decode(&long),
            Err(ProtoError::InvalidName(NameError::TooLong { chars: 256 }))
        );
        assert_eq!(
            Request::decode(b"Eno-host"),
            Ok(Request::Egress {
                node: "no-host".into()
            })
        );
    }

    #[test]
    fn discovery_requests() {
        assert_eq!(Request::decode(b"I"), Ok(Request::PodInfo));
        assert_eq!(Request::decode(b"Ijunk"), Ok(Request::PodInfo));
        assert_eq!(
            Request::decode(b"M"),
            Ok(Request::Members {
                known_version: 0,
                wait_ms: 0
            })
        );
        assert_eq!(
            Request::decode(b"M\0\0\0\x05\0\0\x03\xe8"),
            Ok(Request::Members {
                known_version: 5,
                wait_ms: 1000
            })
        );
        for i in 2..9 {
            assert_eq!(
                Request::decode(&b"M\0\0\0\x05\0\0\x03\xe8"[..i]),
                Err(ProtoError::Truncated("members request")),
                "prefix {i}"
            );
        }
        assert_eq!(
            Request::decode(b"M\0\0\0\x05\0\0\x03\xe8\0"),
            Err(ProtoError::TrailingBytes("members request"))
        );
        let mut dst = BytesMut::new();
        Request::Members {
            known_version: 5,
            wait_ms: 1000,
        }
        .encode(&mut dst);
        assert_eq!(&dst[..], b"\0\x09M\0\0\0\x05\0\0\x03\xe8");
    }

    #[test]
    fn egress_replies() {
        let mut dst = BytesMut::new();
        encode_egress_resp(&mut dst, 0, 40001);
        assert_eq!(&dst[..], &[b'e', 0, 0x9c, 0x41, 0, 6]);
        let ok = EgressReply {
            result: 0,
            port: 40001,
            version: 6,
        };
        assert_eq!(decode_egress_resp(&dst), Ok(Some((ok, EGRESS_RESP_LEN))));
        for i in 0..EGRESS_RESP_LEN {
            assert_eq!(decode_egress_resp(&dst[..i]), Ok(None), "prefix {i}");
        }
        let mut dst = BytesMut::new();
        encode_egress_resp(&mut dst, EGRESS_BAD_NAME, 40001);
        assert_eq!(&dst[..], &[b'e', 2, 0, 0, 0, 0]);
        assert_eq!(
            decode_egress_resp(b"w\x01"),
            Err(ProtoError::UnknownReplyTag(b'w'))
        );
    }

    #[test]
    fn names_and_dump_text() {
        let mut dst = BytesMut::new();
        encode_names_header(&mut dst, 4369);
        encode_names_line(&mut dst, "a1", 38911);
        encode_names_line(&mut dst, "b2", 43691);
        assert_eq!(
            &dst[..],
            b"\x00\x00\x11\x11name a1 at port 38911\nname b2 at port 43691\n"
        );
        let text = std::str::from_utf8(&dst[4..]).unwrap();
        assert_eq!(
            parse_names(text),
            vec![("a1".to_owned(), 38911), ("b2".to_owned(), 43691)]
        );

        let mut dst = BytesMut::new();
        encode_dump_line(&mut dst, "a1", 38911, 7);
        assert_eq!(&dst[..], b"active name     <a1> at port 38911, fd = 7\n\0");
    }

    #[test]
    fn parse_names_skips_garbage() {
        let text = "name a1 at port 1\r\njunk\nname  at port x\nname b at port 70000\n\
                    name c d at port 3\nname e at port 4";
        assert_eq!(
            parse_names(text),
            vec![("a1".into(), 1), ("c d".into(), 3), ("e".into(), 4)]
        );
    }

    /// Deterministic pseudo-random bytes (Knuth's MMIX LCG).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u8 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 56) as u8
        }
        fn bytes(&mut self, max: u8) -> Vec<u8> {
            let len = self.next() % max;
            (0..len).map(|_| self.next()).collect()
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Lcg(0x5eed);
        let seeds = [
            ALIVE2_A1,
            PORT2_A1,
            b"za1",
            b"n",
            b"\x76\x00\x00\x00\x00\x01",
            b"Eb1@pod-b",
            b"e\x00\x9c\x41\x00\x06",
        ];
        for i in 0..50_000 {
            let mut input = rng.bytes(64);
            if i % 2 == 0 {
                // Mutate a valid message so that decoders get past the tag.
                input = seeds[i % seeds.len()].to_vec();
                let pos = usize::from(rng.next()) % input.len();
                input[pos] = rng.next();
                input.truncate(usize::from(rng.next()) % (input.len() + 1));
            }
            let _ = Request::decode(&input);
            let _ = validate_name(&input);
            if let Ok(Some((_, used))) = decode_port2_resp(&input) {
                assert!(used <= input.len());
            }
            if let Ok(Some((_, used))) = decode_alive2_resp(&input) {
                assert!(used <= input.len());
            }
            if let Ok(Some((_, used))) = decode_egress_resp(&input) {
                assert!(used <= input.len());
            }
            let _ = parse_names(&String::from_utf8_lossy(&input));
        }
    }
}
