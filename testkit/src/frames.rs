//! The distribution handshake frames a test plays: what an initiator sends
//! first, and what a node answers.

use bytes::BytesMut;

use crate::sut::handshake::{self, Challenge, SendName, Status};

/// The capability flags every fake peer and node announces (those of OTP 25).
pub const FLAGS: u64 = 0x000d_07df_7fbd;

/// The `send_name` frame of an initiator called `initiator`.
pub fn send_name(initiator: &str) -> BytesMut {
    let mut out = BytesMut::new();
    handshake::encode_send_name(
        &mut out,
        &SendName {
            name: initiator.to_string(),
            flags: FLAGS,
            creation: Some(42),
            version: None,
        },
    );
    out
}

/// A node's answer to a `send_name`: status `ok` and a challenge carrying
/// `full_name`.
pub fn node_answer(full_name: &str) -> BytesMut {
    let mut out = BytesMut::new();
    handshake::encode_status(&mut out, &Status::Ok);
    handshake::encode_challenge(
        &mut out,
        &Challenge {
            name: full_name.to_string(),
            flags: FLAGS,
            challenge: 0x1234_5678,
            creation: Some(77),
        },
    );
    out
}

/// Parses a node's answer (status, then challenge) from the start of `buf`:
/// the challenge's name and the bytes both frames took, or None while
/// incomplete (also when the frames are malformed: the caller's read loop
/// then fails on its deadline or on EOF, naming what it waited for).
pub fn parse_node_answer(buf: &[u8]) -> Option<(String, usize)> {
    let Ok(Some((_, status_len))) = handshake::parse_status(buf) else {
        return None;
    };
    match handshake::parse_challenge(&buf[status_len..]) {
        Ok(Some((c, n))) => Some((c.name, status_len + n)),
        _ => None,
    }
}

/// The initiator's name in a complete `send_name` at the start of `buf`.
pub fn parse_send_name(buf: &[u8]) -> Option<String> {
    match handshake::parse_send_name(buf) {
        Ok(Some((m, _))) => Some(m.name),
        _ => None,
    }
}
