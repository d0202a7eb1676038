//! The tunnel preamble: what a sidecar sends to another sidecar's
//! distribution port before relaying a node's handshake, so that the
//! receiving sidecar routes the connection **exactly**, by name, instead of
//! by lookup correlation. Bytes only, no I/O.
//!
//! # Wire format (version 1)
//!
//! ```text
//! offset  size  field
//!      0     3  magic      0x44 0x50 0x58  ("DPX")
//!      3     1  version    0x01
//!      4     2  body_len   u16 big-endian, at most MAX_BODY_LEN
//!      6  body_len body:
//!                 tlen      u16   length of target
//!                 target    tlen bytes, UTF-8: the full name of the node to
//!                           reach (`b1@pod-b.ns.svc`), as the initiating
//!                           BEAM asked for it
//!                 ilen      u16   length of initiator
//!                 initiator ilen bytes, UTF-8: the name in the initiator's
//!                           `send_name` (a full node name, or only a host
//!                           with `DFLAG_NAME_ME`)
//!                 ...       anything after `initiator` is ignored, so a
//!                           later version may append fields that version-1
//!                           receivers skip
//! ```
//!
//! The initiator's `send_name` follows the preamble unchanged (the egress
//! side replays the bytes it read from the BEAM), and from then on the bytes
//! are the distribution protocol, relayed opaquely.
//!
//! # Why these bytes
//!
//! The distribution port tells three kinds of connection apart by their
//! first byte: a TLS record (`0x16`, handshake), this magic (`0x44`), or a
//! raw distribution handshake, whose 2-byte length starts with a byte of at
//! most 8 (see [`crate::distribution::handshake::looks_like_dist_handshake`]). `0x44`
//! is neither a TLS content type (20..=24) nor a possible handshake length
//! byte, so the three can never be confused.
//!
//! Names follow the EPMD rules ([`crate::epmd::proto::validate_name`]): not
//! empty, no NUL, valid UTF-8, at most 255 characters; the target must be
//! `Name@Host` with both parts non-empty. Every length is checked as soon as
//! it arrives, before anything is buffered for it, and the whole body is
//! bounded by [`MAX_BODY_LEN`].

use bytes::{BufMut, BytesMut};

use crate::epmd::proto::{validate_name, NameError, MAX_NAME_BYTES};

/// The first three bytes of every preamble.
pub const MAGIC: [u8; 3] = *b"DPX";
/// The version this module writes and the only one it reads.
pub const VERSION: u8 = 1;
/// Bytes before the body: magic, version, body length.
pub const HEADER_LEN: usize = MAGIC.len() + 1 + 2;
/// The largest body accepted: two maximal names and their lengths, plus
/// room for fields a later version may append.
pub const MAX_BODY_LEN: usize = 4096;
/// The largest body a version-1 sender writes.
const V1_MAX_BODY_LEN: usize = 2 * (2 + MAX_NAME_BYTES);
const _: () = assert!(V1_MAX_BODY_LEN <= MAX_BODY_LEN);

/// Whether a connection whose first byte is `first` starts with a preamble.
pub fn starts_preamble(first: u8) -> bool {
    first == MAGIC[0]
}

/// A parsed (or to-be-sent) preamble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    /// Full name of the node to reach (`Name@Host`).
    pub target: String,
    /// The name in the initiator's `send_name`.
    pub initiator: String,
}

/// A preamble that cannot be parsed or built; the connection must be closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreambleError {
    #[error("not a distproxy preamble (byte {byte:#04x} at offset {offset})")]
    BadMagic { offset: usize, byte: u8 },
    #[error("unsupported preamble version {0}")]
    UnsupportedVersion(u8),
    #[error("preamble body of {0} bytes exceeds limit of {max}", max = MAX_BODY_LEN)]
    TooLong(usize),
    #[error("truncated preamble field {0}")]
    Truncated(&'static str),
    #[error("invalid {field} name in preamble: {error}")]
    InvalidName {
        field: &'static str,
        error: NameError,
    },
    #[error("preamble target {0:?} is not a full node name (Name@Host)")]
    NotFullName(String),
}

impl Preamble {
    /// Builds a preamble after checking both names as a receiver would.
    pub fn new(target: &str, initiator: &str) -> Result<Preamble, PreambleError> {
        check_target(target)?;
        validate_name(initiator.as_bytes()).map_err(|error| PreambleError::InvalidName {
            field: "initiator",
            error,
        })?;
        Ok(Preamble {
            target: target.to_owned(),
            initiator: initiator.to_owned(),
        })
    }

    /// The target's node name without the host (`b1`), as registered in EPMD.
    pub fn target_short_name(&self) -> &str {
        crate::node_name::short_name(&self.target)
    }

    /// Appends the encoded preamble to `dst`. Names longer than
    /// [`MAX_NAME_BYTES`] (which [`Preamble::new`] refuses) are cut so the
    /// frame stays well-formed.
    pub fn encode(&self, dst: &mut BytesMut) {
        let target = clamp(self.target.as_bytes());
        let initiator = clamp(self.initiator.as_bytes());
        let body_len = 2 + target.len() + 2 + initiator.len();
        dst.reserve(HEADER_LEN + body_len);
        dst.put_slice(&MAGIC);
        dst.put_u8(VERSION);
        // Both names are clamped, so body_len <= V1_MAX_BODY_LEN < u16::MAX.
        dst.put_u16(body_len as u16);
        dst.put_u16(target.len() as u16);
        dst.put_slice(target);
        dst.put_u16(initiator.len() as u16);
        dst.put_slice(initiator);
    }
}

fn clamp(bytes: &[u8]) -> &[u8] {
    bytes.get(..MAX_NAME_BYTES).unwrap_or(bytes)
}

/// Checks a target name: a valid node name of the form `Name@Host`.
pub fn check_target(target: &str) -> Result<(), PreambleError> {
    validate_name(target.as_bytes()).map_err(|error| PreambleError::InvalidName {
        field: "target",
        error,
    })?;
    crate::node_name::NodeName::parse(target)
        .map(drop)
        .map_err(|_| PreambleError::NotFullName(target.to_owned()))
}

/// Parses a preamble at the start of `buf`. `Ok(None)`: more bytes needed.
/// `Ok(Some((preamble, consumed)))`: the bytes after `consumed` belong to
/// the relayed stream. The magic, version and body length are judged as
/// soon as they arrive, so a stranger is refused after at most six bytes
/// and can never make the reader buffer more than
/// `HEADER_LEN + MAX_BODY_LEN` bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(Preamble, usize)>, PreambleError> {
    for (offset, (&byte, &want)) in buf.iter().zip(MAGIC.iter()).enumerate() {
        if byte != want {
            return Err(PreambleError::BadMagic { offset, byte });
        }
    }
    let Some(&version) = buf.get(MAGIC.len()) else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(PreambleError::UnsupportedVersion(version));
    }
    let Some(len) = buf.get(MAGIC.len() + 1..HEADER_LEN) else {
        return Ok(None);
    };
    let body_len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if body_len > MAX_BODY_LEN {
        return Err(PreambleError::TooLong(body_len));
    }
    let Some(mut body) = buf.get(HEADER_LEN..HEADER_LEN + body_len) else {
        return Ok(None);
    };
    // The body is complete: from here on, running out of bytes means a
    // length inside it lies.
    let target = field(&mut body, "target")?;
    let initiator = field(&mut body, "initiator")?;
    // Anything left in `body` is a later version's extension: ignored.
    let target = validate_name(target)
        .map_err(|error| PreambleError::InvalidName {
            field: "target",
            error,
        })?
        .to_owned();
    check_target(&target)?;
    let initiator = validate_name(initiator)
        .map_err(|error| PreambleError::InvalidName {
            field: "initiator",
            error,
        })?
        .to_owned();
    Ok(Some((
        Preamble { target, initiator },
        HEADER_LEN + body_len,
    )))
}

/// A u16 length and that many bytes from `body`.
fn field<'a>(body: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], PreambleError> {
    let (len, rest) = body
        .split_first_chunk::<2>()
        .ok_or(PreambleError::Truncated(what))?;
    let len = usize::from(u16::from_be_bytes(*len));
    let (value, rest) = rest
        .split_at_checked(len)
        .ok_or(PreambleError::Truncated(what))?;
    *body = rest;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `b1@pod-b` from `a1@pod-a`, written out byte by byte.
    const FIXTURE: &[u8] = &[
        0x44, 0x50, 0x58, // magic "DPX"
        0x01, // version
        0x00, 0x14, // body length 20
        0x00, 0x08, b'b', b'1', b'@', b'p', b'o', b'd', b'-', b'b', // target
        0x00, 0x08, b'a', b'1', b'@', b'p', b'o', b'd', b'-', b'a', // initiator
    ];

    fn fixture() -> Preamble {
        Preamble::new("b1@pod-b", "a1@pod-a").unwrap()
    }

    #[test]
    fn encodes_the_fixture() {
        let mut dst = BytesMut::new();
        fixture().encode(&mut dst);
        assert_eq!(&dst[..], FIXTURE);
    }

    #[test]
    fn parses_the_fixture_and_leaves_what_follows() {
        let mut wire = FIXTURE.to_vec();
        wire.extend_from_slice(b"\x00\x15N..."); // start of a send_name
        assert_eq!(parse(&wire), Ok(Some((fixture(), FIXTURE.len()))));
        assert_eq!(fixture().target_short_name(), "b1");
    }

    #[test]
    fn every_strict_prefix_needs_more() {
        for i in 0..FIXTURE.len() {
            assert_eq!(parse(&FIXTURE[..i]), Ok(None), "prefix of {i} bytes");
        }
    }

    #[test]
    fn first_byte_is_neither_tls_nor_a_handshake_length() {
        assert!(starts_preamble(FIXTURE[0]));
        assert_ne!(MAGIC[0], 0x16);
        assert_ne!(MAGIC[0], 0x00);
        assert!(!(20..=24).contains(&MAGIC[0]), "a TLS content type");
        assert!(!crate::distribution::handshake::looks_like_dist_handshake(
            &FIXTURE[..1]
        ));
        assert!(!crate::distribution::handshake::looks_like_dist_handshake(
            FIXTURE
        ));
    }

    #[test]
    fn wrong_magic_is_refused_at_the_first_wrong_byte() {
        let bad = |offset, byte| Err(PreambleError::BadMagic { offset, byte });
        assert_eq!(parse(&[0x16]), bad(0, 0x16));
        assert_eq!(parse(&[0x00, 0x10]), bad(0, 0x00));
        assert_eq!(parse(b"DQ"), bad(1, b'Q'));
        assert_eq!(parse(b"DPY\x01"), bad(2, b'Y'));
    }

    #[test]
    fn unknown_version_is_refused_before_the_body() {
        assert_eq!(parse(b"DPX\x02"), Err(PreambleError::UnsupportedVersion(2)));
        assert_eq!(
            parse(b"DPX\x00\x00\x00"),
            Err(PreambleError::UnsupportedVersion(0))
        );
    }

    #[test]
    fn oversized_body_is_refused_from_the_length_alone() {
        let len = (MAX_BODY_LEN + 1) as u16;
        let mut wire = b"DPX\x01".to_vec();
        wire.extend_from_slice(&len.to_be_bytes());
        assert_eq!(parse(&wire), Err(PreambleError::TooLong(MAX_BODY_LEN + 1)));
        let mut wire = b"DPX\x01".to_vec();
        wire.extend_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            parse(&wire),
            Err(PreambleError::TooLong(usize::from(u16::MAX)))
        );
    }

    #[test]
    fn longest_names_fit() {
        let target = format!("{}@{}", "é".repeat(127), "h".repeat(127));
        let initiator = "😀".repeat(255);
        let p = Preamble::new(&target, &initiator).unwrap();
        let mut dst = BytesMut::new();
        p.encode(&mut dst);
        assert!(dst.len() <= HEADER_LEN + MAX_BODY_LEN);
        assert_eq!(parse(&dst), Ok(Some((p, dst.len()))));
    }

    #[test]
    fn lying_lengths_inside_the_body_are_truncation() {
        let mut wire = FIXTURE.to_vec();
        wire[7] = 0x30; // target length 48, past the body
        assert_eq!(parse(&wire), Err(PreambleError::Truncated("target")));
        let mut wire = FIXTURE.to_vec();
        wire[17] = 0x09; // initiator length 9, one past the body
        assert_eq!(parse(&wire), Err(PreambleError::Truncated("initiator")));
        // A body too short to hold even the target length.
        assert_eq!(
            parse(b"DPX\x01\x00\x01\x00"),
            Err(PreambleError::Truncated("target"))
        );
    }

    #[test]
    fn trailing_body_bytes_are_a_later_versions_fields() {
        let mut wire = FIXTURE.to_vec();
        wire[5] += 3;
        wire.extend_from_slice(b"\x00\x01x");
        assert_eq!(parse(&wire), Ok(Some((fixture(), FIXTURE.len() + 3))));
    }

    #[test]
    fn bad_names_are_refused() {
        fn with(target: &[u8], initiator: &[u8]) -> Vec<u8> {
            let mut body = Vec::new();
            body.extend_from_slice(&(target.len() as u16).to_be_bytes());
            body.extend_from_slice(target);
            body.extend_from_slice(&(initiator.len() as u16).to_be_bytes());
            body.extend_from_slice(initiator);
            let mut wire = b"DPX\x01".to_vec();
            wire.extend_from_slice(&(body.len() as u16).to_be_bytes());
            wire.extend_from_slice(&body);
            wire
        }
        let invalid = |field, error| Err(PreambleError::InvalidName { field, error });
        assert_eq!(
            parse(&with(b"", b"a@h")),
            invalid("target", NameError::Empty)
        );
        assert_eq!(
            parse(&with(b"b\0@h", b"a@h")),
            invalid("target", NameError::NulByte)
        );
        assert_eq!(
            parse(&with(b"b@h", b"\xff")),
            invalid("initiator", NameError::NotUtf8)
        );
        assert_eq!(
            parse(&with(b"b@h", b"")),
            invalid("initiator", NameError::Empty)
        );
        for not_full in [&b"b"[..], b"@h", b"b@"] {
            assert!(
                matches!(
                    parse(&with(not_full, b"a@h")),
                    Err(PreambleError::NotFullName(_))
                ),
                "{not_full:?}"
            );
        }
        // DFLAG_NAME_ME initiators send only a host: allowed.
        assert!(parse(&with(b"b@h", b"pod-a")).unwrap().is_some());
        assert!(Preamble::new("b", "a@h").is_err());
        assert!(Preamble::new("b@h", "").is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x0dd5_eed5_u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        };
        for i in 0..50_000 {
            let mut input = FIXTURE.to_vec();
            let pos = usize::from(next()) % input.len();
            input[pos] = next();
            if i % 3 == 0 {
                input.truncate(usize::from(next()) % (input.len() + 1));
            }
            if let Ok(Some((_, used))) = parse(&input) {
                assert!(used <= input.len());
            }
        }
    }
}
