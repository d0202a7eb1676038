//! The first frames of an Erlang distribution handshake, as bytes, with no
//! I/O.
//!
//! The format is "Distribution Handshake" in OTP's [Distribution Protocol
//! guide] (`erts/doc/guides/erl_dist_protocol.md`), checked against
//! `lib/kernel/src/dist_util.erl` (its OTP 23/24 and its current versions;
//! the current one documents the OTP 25.3 change). The router reads the
//! initiator's `send_name` to log who is connecting, and the node's
//! `challenge` to check that the connection reached the node it was routed
//! to; everything after that is relayed without parsing. Every handshake
//! frame is a 2-byte big-endian length and a body (`{packet, 2}`); frames
//! are small, so anything longer than [`MAX_HANDSHAKE_FRAME`] is refused as
//! soon as its length is read.
//!
//! What `dist_util.erl` actually does, where the guide does not say:
//!
//! - Names in `send_name` and `challenge` are written with
//!   `atom_to_binary(Node, latin1)` and read back with `list_to_atom/1` of
//!   the bytes: they are Latin-1, not UTF-8. We decode them as Latin-1 (one
//!   byte, one character), which can never fail and yields the same `String`
//!   as the node's UTF-8 EPMD name. Only `named:` carries UTF-8
//!   (`atom_to_binary(Node, utf8)`).
//! - `recv_name_new` and `recv_challenge_new` split `Nlen` bytes off the rest
//!   and ignore what follows ("any extra data after the node Name must be
//!   accepted and ignored"); an `Nlen` longer than the rest makes
//!   `lists:split/2` fail and the connection is dropped. So do we: trailing
//!   bytes are ignored, a lying `Nlen` is [`HandshakeError::Truncated`].
//! - OTP 25 and later always send the new `'N'` `send_name` and `challenge`.
//!   OTP 23 and 24 send the old `'n'` `send_name` (with `DFLAG_HANDSHAKE_23`)
//!   when they did not learn the peer's version from EPMD; OTP 25.0 to 25.2
//!   refuse it, 25.3 and later accept it again. The old `'n'` challenge is
//!   sent only by OTP 24 and older, to peers without `DFLAG_HANDSHAKE_23`.
//! - With `DFLAG_NAME_ME` (a node started as `undefined@Host`) `send_name`
//!   carries only the host, without `@`, and creation 0; the acceptor answers
//!   with the `named:` status, giving the full name and a creation. So a
//!   `send_name` name need not contain `@`, and we do not require it.
//!
//! [Distribution Protocol guide]: https://github.com/erlang/otp/blob/master/erts/doc/guides/erl_dist_protocol.md

use bytes::{BufMut, BytesMut};

/// The largest handshake frame we accept: an `'N'` challenge with the
/// longest name is 19 + 255 bytes, so this leaves room for extra data and
/// for a UTF-8 `named:` name, and still bounds what a stranger can make the
/// router buffer.
pub const MAX_HANDSHAKE_FRAME: usize = 2048;

/// The node supports the OTP 23 handshake (mandatory from OTP 25).
pub const DFLAG_HANDSHAKE_23: u64 = 0x0100_0000;
/// The initiator asks the acceptor to name it (see the module docs).
pub const DFLAG_NAME_ME: u64 = 1 << 33;

/// A node name is an atom: at most 255 characters, here one byte each.
const MAX_NAME_LEN: usize = 255;
/// Encoders cut longer names so that their frames stay well-formed.
const ENCODE_NAME_LIMIT: usize = 1024;
/// The smallest `send_name`: the old `'n'` with a one-byte name.
const MIN_SEND_NAME_LEN: usize = 1 + 2 + 4 + 1;

/// The initiator's first frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendName {
    /// The initiator's full name, or only its host with [`DFLAG_NAME_ME`].
    pub name: String,
    /// Capability flags; only the low 32 bits in an old `'n'` frame.
    pub flags: u64,
    /// `Some` in the new `'N'` frame.
    pub creation: Option<u32>,
    /// `Some` in the old `'n'` frame (always 5).
    pub version: Option<u16>,
}

/// A handshake frame that cannot be parsed; the connection must be closed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("not a distribution handshake (unexpected tag {0:#04x})")]
    NotHandshake(u8),
    #[error("empty handshake frame")]
    EmptyFrame,
    #[error("handshake frame too large: {len} > {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("truncated field {0}")]
    Truncated(&'static str),
    #[error("invalid node name: {0}")]
    InvalidName(&'static str),
}

type Parsed<T> = Result<Option<(T, usize)>, HandshakeError>;

/// Parse the initiator's first frame from the start of `buf`. `Ok(None)` =
/// need more bytes. `Ok(Some((msg, consumed)))` where consumed = 2 + frame
/// length. The length and the tag are checked as soon as they arrive.
pub fn parse_send_name(buf: &[u8]) -> Parsed<SendName> {
    let Some(Frame {
        tag,
        body: mut b,
        consumed,
    }) = frame(buf, b"Nn")?
    else {
        return Ok(None);
    };
    let msg = if tag == b'N' {
        let flags = u64::from_be_bytes(take_array(&mut b, "flags")?);
        let creation = u32::from_be_bytes(take_array(&mut b, "creation")?);
        let nlen = u16::from_be_bytes(take_array(&mut b, "name length")?);
        let name = latin1_name(take(&mut b, nlen.into(), "name")?)?;
        SendName {
            name,
            flags,
            creation: Some(creation),
            version: None,
        }
    } else {
        let version = u16::from_be_bytes(take_array(&mut b, "version")?);
        let flags = u32::from_be_bytes(take_array(&mut b, "flags")?);
        SendName {
            name: latin1_name(b)?,
            flags: flags.into(),
            creation: None,
            version: Some(version),
        }
    };
    Ok(Some((msg, consumed)))
}

/// The acceptor's answer to `send_name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    OkSimultaneous,
    Nok,
    NotAllowed,
    Alive,
    /// The answer to [`DFLAG_NAME_ME`]: the initiator's new name and creation.
    Named {
        name: String,
        creation: u32,
    },
    /// Anything else, e.g. the initiator's `true`/`false` after `alive`.
    Other(String),
}

/// Parse a status frame (`'s'` + status) from the start of `buf`.
pub fn parse_status(buf: &[u8]) -> Parsed<Status> {
    let Some(Frame { body, consumed, .. }) = frame(buf, b"s")? else {
        return Ok(None);
    };
    let status = match body {
        b"ok" => Status::Ok,
        b"ok_simultaneous" => Status::OkSimultaneous,
        b"nok" => Status::Nok,
        b"not_allowed" => Status::NotAllowed,
        b"alive" => Status::Alive,
        _ => match body.strip_prefix(b"named:") {
            Some(mut b) => {
                let nlen = u16::from_be_bytes(take_array(&mut b, "name length")?);
                let name = take(&mut b, nlen.into(), "name")?;
                let creation = u32::from_be_bytes(take_array(&mut b, "creation")?);
                // Data after the creation must be accepted and ignored.
                Status::Named {
                    name: utf8_name(name)?,
                    creation,
                }
            }
            None => Status::Other(String::from_utf8_lossy(body).into_owned()),
        },
    };
    Ok(Some((status, consumed)))
}

/// The acceptor's challenge, which carries its own name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The acceptor's full node name.
    pub name: String,
    /// Capability flags; only the low 32 bits in an old `'n'` frame.
    pub flags: u64,
    pub challenge: u32,
    /// `Some` in the new `'N'` frame.
    pub creation: Option<u32>,
}

/// Parse a challenge frame from the start of `buf`.
pub fn parse_challenge(buf: &[u8]) -> Parsed<Challenge> {
    let Some(Frame {
        tag,
        body: mut b,
        consumed,
    }) = frame(buf, b"Nn")?
    else {
        return Ok(None);
    };
    let msg = if tag == b'N' {
        let flags = u64::from_be_bytes(take_array(&mut b, "flags")?);
        let challenge = u32::from_be_bytes(take_array(&mut b, "challenge")?);
        let creation = u32::from_be_bytes(take_array(&mut b, "creation")?);
        let nlen = u16::from_be_bytes(take_array(&mut b, "name length")?);
        Challenge {
            name: latin1_name(take(&mut b, nlen.into(), "name")?)?,
            flags,
            challenge,
            creation: Some(creation),
        }
    } else {
        let _version = take_array::<2>(&mut b, "version")?;
        let flags = u32::from_be_bytes(take_array(&mut b, "flags")?);
        let challenge = u32::from_be_bytes(take_array(&mut b, "challenge")?);
        Challenge {
            name: latin1_name(b)?,
            flags: flags.into(),
            challenge,
            creation: None,
        }
    };
    Ok(Some((msg, consumed)))
}

/// Cheap check on the first byte(s) of a connection: a raw dist handshake
/// starts with a u16 length whose high byte is small (frames are small).
///
/// Judges only the bytes present and returns `false` as soon as one rules a
/// handshake out: the high length byte must be at most
/// `MAX_HANDSHAKE_FRAME >> 8` (8), not only 0, because a `send_name` with a
/// long name is longer than 255 bytes; the length must fit a `send_name`;
/// the tag must be `'N'` or `'n'`. A TLS record (0x16) or a preamble whose
/// first byte is above 8 is never taken for a handshake.
pub fn looks_like_dist_handshake(first: &[u8]) -> bool {
    match first {
        [] => false,
        [hi] => usize::from(*hi) <= MAX_HANDSHAKE_FRAME >> 8,
        [hi, lo, rest @ ..] => {
            let len = usize::from(u16::from_be_bytes([*hi, *lo]));
            (MIN_SEND_NAME_LEN..=MAX_HANDSHAKE_FRAME).contains(&len)
                && rest.first().is_none_or(|tag| matches!(tag, b'N' | b'n'))
        }
    }
}

/// Writes a `send_name` frame: the new `'N'` unless `m` has a version and no
/// creation. The name is written as Latin-1, as OTP does; a character above
/// U+00FF (which OTP could not send) becomes `?`.
pub fn encode_send_name(dst: &mut BytesMut, m: &SendName) {
    put_frame(dst, |dst| match (m.version, m.creation) {
        (Some(version), None) => {
            dst.put_u8(b'n');
            dst.put_u16(version);
            dst.put_u32(m.flags as u32);
            put_latin1(dst, &m.name);
        }
        (_, creation) => {
            dst.put_u8(b'N');
            dst.put_u64(m.flags);
            dst.put_u32(creation.unwrap_or(0));
            put_latin1_field(dst, &m.name);
        }
    });
}

/// Writes a status frame.
pub fn encode_status(dst: &mut BytesMut, s: &Status) {
    put_frame(dst, |dst| {
        dst.put_u8(b's');
        match s {
            Status::Ok => dst.put_slice(b"ok"),
            Status::OkSimultaneous => dst.put_slice(b"ok_simultaneous"),
            Status::Nok => dst.put_slice(b"nok"),
            Status::NotAllowed => dst.put_slice(b"not_allowed"),
            Status::Alive => dst.put_slice(b"alive"),
            Status::Named { name, creation } => {
                dst.put_slice(b"named:");
                let name = name.as_bytes();
                let name = name.get(..ENCODE_NAME_LIMIT).unwrap_or(name);
                dst.put_u16(name.len() as u16);
                dst.put_slice(name);
                dst.put_u32(*creation);
            }
            Status::Other(other) => {
                let other = other.as_bytes();
                dst.put_slice(other.get(..ENCODE_NAME_LIMIT).unwrap_or(other));
            }
        }
    });
}

/// Writes a challenge frame: the new `'N'` when it has a creation, else the
/// old `'n'` with version 5.
pub fn encode_challenge(dst: &mut BytesMut, c: &Challenge) {
    put_frame(dst, |dst| match c.creation {
        Some(creation) => {
            dst.put_u8(b'N');
            dst.put_u64(c.flags);
            dst.put_u32(c.challenge);
            dst.put_u32(creation);
            put_latin1_field(dst, &c.name);
        }
        None => {
            dst.put_u8(b'n');
            dst.put_u16(5);
            dst.put_u32(c.flags as u32);
            dst.put_u32(c.challenge);
            put_latin1(dst, &c.name);
        }
    });
}

/// One complete handshake frame.
struct Frame<'a> {
    tag: u8,
    /// The bytes after the tag.
    body: &'a [u8],
    /// 2 + the frame length.
    consumed: usize,
}

/// The first frame in `buf`, `Ok(None)` while it is incomplete. The length
/// and the tag are judged as soon as they are there.
fn frame<'a>(buf: &'a [u8], tags: &[u8]) -> Result<Option<Frame<'a>>, HandshakeError> {
    let Some((len, rest)) = buf.split_first_chunk::<2>() else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes(*len));
    if len > MAX_HANDSHAKE_FRAME {
        return Err(HandshakeError::FrameTooLarge {
            len,
            max: MAX_HANDSHAKE_FRAME,
        });
    }
    if len == 0 {
        return Err(HandshakeError::EmptyFrame);
    }
    let Some(&tag) = rest.first() else {
        return Ok(None);
    };
    if !tags.contains(&tag) {
        return Err(HandshakeError::NotHandshake(tag));
    }
    Ok(rest.get(1..len).map(|body| Frame {
        tag,
        body,
        consumed: 2 + len,
    }))
}

fn take<'a>(b: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], HandshakeError> {
    let (head, rest) = b
        .split_at_checked(n)
        .ok_or(HandshakeError::Truncated(what))?;
    *b = rest;
    Ok(head)
}

fn take_array<const N: usize>(
    b: &mut &[u8],
    what: &'static str,
) -> Result<[u8; N], HandshakeError> {
    let (head, rest) = b
        .split_first_chunk::<N>()
        .ok_or(HandshakeError::Truncated(what))?;
    *b = rest;
    Ok(*head)
}

fn check_name(bytes: &[u8]) -> Result<(), HandshakeError> {
    if bytes.is_empty() {
        Err(HandshakeError::InvalidName("empty"))
    } else if bytes.contains(&0) {
        Err(HandshakeError::InvalidName("contains a NUL byte"))
    } else {
        Ok(())
    }
}

/// A name from `send_name` or `challenge`: Latin-1, at most 255 bytes.
fn latin1_name(bytes: &[u8]) -> Result<String, HandshakeError> {
    check_name(bytes)?;
    if bytes.len() > MAX_NAME_LEN {
        return Err(HandshakeError::InvalidName("longer than 255 characters"));
    }
    Ok(bytes.iter().copied().map(char::from).collect())
}

/// A name from `named:`: UTF-8, at most 255 characters.
fn utf8_name(bytes: &[u8]) -> Result<String, HandshakeError> {
    check_name(bytes)?;
    let name =
        std::str::from_utf8(bytes).map_err(|_| HandshakeError::InvalidName("not valid UTF-8"))?;
    if name.chars().count() > MAX_NAME_LEN {
        return Err(HandshakeError::InvalidName("longer than 255 characters"));
    }
    Ok(name.to_owned())
}

fn latin1_chars(s: &str) -> impl Iterator<Item = u8> + '_ {
    s.chars()
        .take(ENCODE_NAME_LIMIT)
        .map(|c| u8::try_from(c).unwrap_or(b'?'))
}

fn put_latin1(dst: &mut BytesMut, s: &str) {
    dst.extend(latin1_chars(s));
}

fn put_latin1_field(dst: &mut BytesMut, s: &str) {
    dst.put_u16(latin1_chars(s).count() as u16);
    put_latin1(dst, s);
}

/// Writes a length-prefixed frame; `body` writes at most a few kilobytes.
fn put_frame(dst: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let start = dst.len();
    dst.put_u16(0);
    body(dst);
    let len = u16::try_from(dst.len() - start - 2).unwrap_or(u16::MAX);
    if let Some(prefix) = dst.get_mut(start..start + 2) {
        prefix.copy_from_slice(&len.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `send_name` of an OTP 25 node `a@h`, from the guide's table.
    const SEND_NAME_N: &[u8] = &[
        0x00, 0x12, // length 18
        b'N', // tag
        0x00, 0x00, 0x00, 0x0d, 0x07, 0xdf, 0x7f, 0xbd, // Flags
        0x65, 0x43, 0x21, 0x00, // Creation
        0x00, 0x03, // Nlen
        b'a', b'@', b'h', // Name
    ];

    /// The old `send_name` of an OTP 23/24 node that skipped EPMD.
    const SEND_NAME_OLD: &[u8] = &[
        0x00, 0x0a, // length 10
        b'n', // tag
        0x00, 0x05, // Version 5
        0x01, 0x07, 0x7f, 0xbd, // Flags (with DFLAG_HANDSHAKE_23)
        b'a', b'@', b'h', // Name: the rest of the frame
    ];

    const CHALLENGE_N: &[u8] = &[
        0x00, 0x16, // length 22
        b'N', // tag
        0x00, 0x00, 0x00, 0x0d, 0x07, 0xdf, 0x7f, 0xbd, // Flags
        0xde, 0xad, 0xbe, 0xef, // Challenge
        0x00, 0x00, 0x00, 0x02, // Creation
        0x00, 0x03, // Nlen
        b'b', b'@', b'h', // Name
    ];

    const CHALLENGE_OLD: &[u8] = &[
        0x00, 0x0e, // length 14
        b'n', // tag
        0x00, 0x05, // Version
        0x00, 0x00, 0x7f, 0xbd, // Flags
        0xde, 0xad, 0xbe, 0xef, // Challenge
        b'b', b'@', b'h', // Name
    ];

    const NAMED: &[u8] = &[
        0x00, 0x12, // length 18
        b's', b'n', b'a', b'm', b'e', b'd', b':', // tag, "named:"
        0x00, 0x05, // Nlen
        b'x', b'@', b'h', b'.', b'c', // Name
        0x00, 0x00, 0x00, 0x09, // Creation
    ];

    fn send_name_n() -> SendName {
        SendName {
            name: "a@h".into(),
            flags: 0x0000_000d_07df_7fbd,
            creation: Some(0x6543_2100),
            version: None,
        }
    }

    fn send_name_old() -> SendName {
        SendName {
            name: "a@h".into(),
            flags: 0x0107_7fbd,
            creation: None,
            version: Some(5),
        }
    }

    fn challenge_n() -> Challenge {
        Challenge {
            name: "b@h".into(),
            flags: 0x0000_000d_07df_7fbd,
            challenge: 0xdead_beef,
            creation: Some(2),
        }
    }

    fn challenge_old() -> Challenge {
        Challenge {
            name: "b@h".into(),
            flags: 0x7fbd,
            challenge: 0xdead_beef,
            creation: None,
        }
    }

    fn named() -> Status {
        Status::Named {
            name: "x@h.c".into(),
            creation: 9,
        }
    }

    /// Every strict prefix of `frame` is incomplete, and the frame itself
    /// parses to `want`, also with more bytes behind it.
    fn check_frame<T: PartialEq + std::fmt::Debug>(
        parse: fn(&[u8]) -> Parsed<T>,
        frame: &[u8],
        want: T,
    ) {
        for i in 0..frame.len() {
            assert_eq!(parse(&frame[..i]), Ok(None), "prefix of {i} bytes");
        }
        let mut more = frame.to_vec();
        more.extend_from_slice(b"\x00\x05next");
        assert_eq!(parse(&more), Ok(Some((want, frame.len()))));
    }

    #[test]
    fn parses_send_name_fixtures() {
        check_frame(parse_send_name, SEND_NAME_N, send_name_n());
        check_frame(parse_send_name, SEND_NAME_OLD, send_name_old());
    }

    #[test]
    fn parses_status_fixtures() {
        let cases: [(&[u8], Status); 6] = [
            (b"\x00\x03sok", Status::Ok),
            (b"\x00\x10sok_simultaneous", Status::OkSimultaneous),
            (b"\x00\x04snok", Status::Nok),
            (b"\x00\x0csnot_allowed", Status::NotAllowed),
            (b"\x00\x06salive", Status::Alive),
            (b"\x00\x05strue", Status::Other("true".into())),
        ];
        for (frame, want) in cases {
            check_frame(parse_status, frame, want);
        }
        check_frame(parse_status, NAMED, named());
    }

    #[test]
    fn parses_challenge_fixtures() {
        check_frame(parse_challenge, CHALLENGE_N, challenge_n());
        check_frame(parse_challenge, CHALLENGE_OLD, challenge_old());
    }

    #[test]
    fn round_trips() {
        let mut dst = BytesMut::new();
        for m in [send_name_n(), send_name_old()] {
            dst.clear();
            encode_send_name(&mut dst, &m);
            assert_eq!(parse_send_name(&dst), Ok(Some((m, dst.len()))));
        }
        for c in [challenge_n(), challenge_old()] {
            dst.clear();
            encode_challenge(&mut dst, &c);
            assert_eq!(parse_challenge(&dst), Ok(Some((c, dst.len()))));
        }
        for s in [
            Status::Ok,
            Status::OkSimultaneous,
            Status::Nok,
            Status::NotAllowed,
            Status::Alive,
            named(),
            Status::Other("false".into()),
        ] {
            dst.clear();
            encode_status(&mut dst, &s);
            assert_eq!(parse_status(&dst), Ok(Some((s, dst.len()))));
        }
        // The encoders write the guide's bytes.
        dst.clear();
        encode_send_name(&mut dst, &send_name_n());
        assert_eq!(&dst[..], SEND_NAME_N);
        dst.clear();
        encode_challenge(&mut dst, &challenge_old());
        assert_eq!(&dst[..], CHALLENGE_OLD);
        dst.clear();
        encode_status(&mut dst, &named());
        assert_eq!(&dst[..], NAMED);
    }

    #[test]
    fn names_are_latin1_as_otp_writes_them() {
        // atom_to_binary('café@h', latin1) is <<"caf", 16#e9, "@h">>.
        let mut frame = SEND_NAME_OLD[..9].to_vec();
        frame.extend_from_slice(b"caf\xe9@h");
        frame[1] = (frame.len() - 2) as u8;
        let (m, _) = parse_send_name(&frame).unwrap().unwrap();
        assert_eq!(m.name, "café@h");
        let mut dst = BytesMut::new();
        encode_send_name(&mut dst, &m);
        assert_eq!(&dst[..], &frame[..]);
    }

    #[test]
    fn extra_data_after_the_name_is_ignored() {
        let mut frame = SEND_NAME_N.to_vec();
        frame.extend_from_slice(b"future");
        frame[1] += 6;
        assert_eq!(
            parse_send_name(&frame),
            Ok(Some((send_name_n(), frame.len())))
        );
        let mut frame = CHALLENGE_N.to_vec();
        frame.push(0);
        frame[1] += 1;
        assert_eq!(
            parse_challenge(&frame),
            Ok(Some((challenge_n(), frame.len())))
        );
    }

    #[test]
    fn lying_name_length_is_truncated() {
        let mut frame = SEND_NAME_N.to_vec();
        frame[16] = 4;
        assert_eq!(
            parse_send_name(&frame),
            Err(HandshakeError::Truncated("name"))
        );
        let mut frame = CHALLENGE_N.to_vec();
        frame[20] = 0xff;
        assert_eq!(
            parse_challenge(&frame),
            Err(HandshakeError::Truncated("name"))
        );
        // A complete frame too short for its fixed fields.
        assert_eq!(
            parse_send_name(b"\x00\x05N\x00\x00\x00\x00"),
            Err(HandshakeError::Truncated("flags"))
        );
        assert_eq!(
            parse_status(b"\x00\x08snamed:\x00"),
            Err(HandshakeError::Truncated("name length"))
        );
        assert_eq!(
            parse_status(b"\x00\x0asnamed:\x00\x01a"),
            Err(HandshakeError::Truncated("creation"))
        );
    }

    #[test]
    fn bad_names_are_refused() {
        let old = |name: &[u8]| {
            let mut f = ((7 + name.len()) as u16).to_be_bytes().to_vec();
            f.extend_from_slice(b"n\x00\x05\x00\x00\x00\x00");
            f.extend_from_slice(name);
            parse_send_name(&f)
        };
        assert_eq!(old(b""), Err(HandshakeError::InvalidName("empty")));
        assert_eq!(
            old(b"a\0@h"),
            Err(HandshakeError::InvalidName("contains a NUL byte"))
        );
        assert!(old(&[b'a'; 255]).is_ok());
        assert_eq!(
            old(&[b'a'; 256]),
            Err(HandshakeError::InvalidName("longer than 255 characters"))
        );
        let mut named = NAMED.to_vec();
        named[11] = 0xff;
        assert_eq!(
            parse_status(&named),
            Err(HandshakeError::InvalidName("not valid UTF-8"))
        );
    }

    #[test]
    fn oversized_and_empty_frames_are_refused_before_buffering() {
        for hdr in [[0x08, 0x01], [0xff, 0xff], [0x16, 0x03]] {
            let len = usize::from(u16::from_be_bytes(hdr));
            let want = HandshakeError::FrameTooLarge {
                len,
                max: MAX_HANDSHAKE_FRAME,
            };
            assert_eq!(parse_send_name(&hdr), Err(want.clone()));
            assert_eq!(parse_status(&hdr), Err(want.clone()));
            assert_eq!(parse_challenge(&hdr), Err(want));
        }
        assert_eq!(
            parse_send_name(b"\x00\x00"),
            Err(HandshakeError::EmptyFrame)
        );
        assert_eq!(
            parse_status(b"\x00\x00sok"),
            Err(HandshakeError::EmptyFrame)
        );
        // The limit itself waits for the body.
        assert_eq!(parse_send_name(b"\x08\x00N"), Ok(None));
    }

    #[test]
    fn unknown_tags_are_refused_as_soon_as_seen() {
        assert_eq!(
            parse_send_name(b"\x00\x10G"),
            Err(HandshakeError::NotHandshake(b'G'))
        );
        assert_eq!(
            parse_send_name(b"\x00\x03sok"),
            Err(HandshakeError::NotHandshake(b's'))
        );
        assert_eq!(
            parse_status(SEND_NAME_N),
            Err(HandshakeError::NotHandshake(b'N'))
        );
        assert_eq!(
            parse_challenge(b"\x00\x03sok"),
            Err(HandshakeError::NotHandshake(b's'))
        );
        assert_eq!(
            HandshakeError::NotHandshake(0x16).to_string(),
            "not a distribution handshake (unexpected tag 0x16)"
        );
    }

    #[test]
    fn recognises_handshakes_by_their_first_bytes() {
        for frame in [SEND_NAME_N, SEND_NAME_OLD] {
            for i in 1..=frame.len() {
                assert!(looks_like_dist_handshake(&frame[..i]), "prefix {i}");
            }
        }
        // A 255-character name makes a frame longer than 255 bytes.
        let mut dst = BytesMut::new();
        let mut m = send_name_n();
        m.name = format!("{}@h", "a".repeat(253));
        encode_send_name(&mut dst, &m);
        assert_eq!(dst[0], 0x01);
        assert!(looks_like_dist_handshake(&dst));

        assert!(!looks_like_dist_handshake(b""));
        assert!(!looks_like_dist_handshake(b"\x16\x03\x01\x02\x00")); // TLS
        assert!(!looks_like_dist_handshake(b"GET / HTTP/1.1"));
        assert!(!looks_like_dist_handshake(b"\x09"));
        assert!(!looks_like_dist_handshake(b"\x00\x03sok")); // too short
        assert!(!looks_like_dist_handshake(b"\x00\x10x")); // wrong tag
        assert!(!looks_like_dist_handshake(b"\x08\x01N")); // too long
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x0dd_ba11_u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        };
        let seeds = [
            SEND_NAME_N,
            SEND_NAME_OLD,
            CHALLENGE_N,
            CHALLENGE_OLD,
            NAMED,
        ];
        for i in 0..50_000 {
            let mut input: Vec<u8> = if i % 2 == 0 {
                let len = next() % 40;
                // A plausible length prefix, then noise.
                let mut v = vec![0, len, b"Nns"[usize::from(next() % 3)]];
                v.extend((0..len).map(|_| next()));
                v
            } else {
                let mut v = seeds[i % seeds.len()].to_vec();
                let pos = usize::from(next()) % v.len();
                v[pos] = next();
                v
            };
            input.truncate(usize::from(next()) % (input.len() + 1));
            let _ = looks_like_dist_handshake(&input);
            for parse in [
                |b: &[u8]| parse_send_name(b).map(|o| o.map(|(_, n)| n)),
                |b: &[u8]| parse_status(b).map(|o| o.map(|(_, n)| n)),
                |b: &[u8]| parse_challenge(b).map(|o| o.map(|(_, n)| n)),
            ] {
                if let Ok(Some(used)) = parse(&input) {
                    assert!(used <= input.len());
                }
            }
        }
    }
}
