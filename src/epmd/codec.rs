//! Framing of EPMD requests: a 2-byte big-endian length, then the body.
//!
//! See "EPMD Protocol" in OTP's [Distribution Protocol guide]
//! (`erts/doc/guides/erl_dist_protocol.md`). The length is checked as soon
//! as its two bytes arrive, before any of the body is buffered, so a peer
//! cannot make the server reserve more than [`MAX_REQUEST_LEN`] bytes; `epmd`
//! likewise refuses a length of zero or one that exceeds its input buffer
//! (the same 3057 bytes).
//!
//! [Distribution Protocol guide]: https://github.com/erlang/otp/blob/master/erts/doc/guides/erl_dist_protocol.md

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::proto::{ProtoError, Request, MAX_REQUEST_LEN};

/// Frames EPMD requests: u16 BE length + body. Rejects zero length and
/// length > [`MAX_REQUEST_LEN`] *before* buffering the body.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestCodec;

/// A request stream that cannot be decoded; the connection must be closed.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("zero-length epmd request")]
    ZeroLength,
    #[error("epmd request of {0} bytes exceeds limit of {1}")]
    TooLong(usize, usize),
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Decoder for RequestCodec {
    type Item = Request;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Request>, CodecError> {
        let Some(prefix) = src.first_chunk::<2>() else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes(*prefix));
        if len == 0 {
            return Err(CodecError::ZeroLength);
        }
        if len > MAX_REQUEST_LEN {
            return Err(CodecError::TooLong(len, MAX_REQUEST_LEN));
        }
        if src.len() < 2 + len {
            src.reserve(2 + len - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(2 + len);
        frame.advance(2);
        Ok(Some(Request::decode(&frame)?))
    }

    /// A connection closed in the middle of a request is an error, not a
    /// clean end.
    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Request>, CodecError> {
        match self.decode(src)? {
            Some(request) => Ok(Some(request)),
            None if src.is_empty() => Ok(None),
            None => Err(ProtoError::Truncated("epmd request").into()),
        }
    }
}

/// For the client side (`distproxy names`) and tests.
impl Encoder<Request> for RequestCodec {
    type Error = CodecError;

    fn encode(&mut self, request: Request, dst: &mut BytesMut) -> Result<(), CodecError> {
        request.encode(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epmd::proto::{NameError, NodeSpec, MAX_ALIVE2_LEN, MAX_EXTRA_LEN};
    use bytes::Bytes;

    fn requests() -> Vec<Request> {
        vec![
            Request::Alive2(NodeSpec {
                port: 4000,
                node_type: 77,
                protocol: 0,
                highest_version: 6,
                lowest_version: 6,
                name: "a1".into(),
                extra: Bytes::from_static(b"xy"),
            }),
            Request::PortPlease2 { name: "a1".into() },
            Request::Names,
            Request::Dump,
            Request::Kill,
            Request::Stop { name: "zz".into() },
        ]
    }

    #[test]
    fn decodes_a_stream_fed_one_byte_at_a_time() {
        let mut wire = BytesMut::new();
        for r in requests() {
            RequestCodec.encode(r, &mut wire).unwrap();
        }
        // A PORT_PLEASE2 written by hand, with the NUL old clients send.
        wire.extend_from_slice(b"\x00\x04zb2\x00");

        let mut codec = RequestCodec;
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &byte in wire.iter() {
            buf.extend_from_slice(&[byte]);
            if let Some(r) = codec.decode(&mut buf).unwrap() {
                got.push(r);
            }
        }
        let mut want = requests();
        want.push(Request::PortPlease2 { name: "b2".into() });
        assert_eq!(got, want);
        assert!(buf.is_empty());
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());
    }

    #[test]
    fn several_requests_in_one_read() {
        let mut buf = BytesMut::from(&b"\x00\x01n\x00\x01d\x00"[..]);
        assert_eq!(RequestCodec.decode(&mut buf).unwrap(), Some(Request::Names));
        assert_eq!(RequestCodec.decode(&mut buf).unwrap(), Some(Request::Dump));
        assert_eq!(RequestCodec.decode(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"\x00");
    }

    #[test]
    fn zero_length_is_refused() {
        let mut buf = BytesMut::from(&b"\x00\x00"[..]);
        assert!(matches!(
            RequestCodec.decode(&mut buf),
            Err(CodecError::ZeroLength)
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        for len in [MAX_REQUEST_LEN + 1, 0xffff] {
            let mut buf = BytesMut::from(&(len as u16).to_be_bytes()[..]);
            let err = RequestCodec.decode(&mut buf).unwrap_err();
            assert!(
                matches!(err, CodecError::TooLong(l, MAX_REQUEST_LEN) if l == len),
                "{err}"
            );
            assert!(buf.capacity() < 64, "reserved {} bytes", buf.capacity());
        }
        // The limit itself is accepted and buffered for.
        let mut buf = BytesMut::from(&(MAX_REQUEST_LEN as u16).to_be_bytes()[..]);
        assert!(RequestCodec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() >= MAX_REQUEST_LEN + 2);
    }

    #[test]
    fn largest_valid_request_fits() {
        let spec = NodeSpec {
            port: 1,
            node_type: 72,
            protocol: 0,
            highest_version: 6,
            lowest_version: 6,
            name: "😀".repeat(255),
            extra: Bytes::from(vec![0; MAX_EXTRA_LEN]),
        };
        let mut buf = BytesMut::new();
        RequestCodec
            .encode(Request::Alive2(spec.clone()), &mut buf)
            .unwrap();
        assert_eq!(buf.len(), 2 + MAX_ALIVE2_LEN);
        assert_eq!(
            RequestCodec.decode(&mut buf).unwrap(),
            Some(Request::Alive2(spec))
        );
    }

    #[test]
    fn every_strict_prefix_waits_and_eof_is_truncated() {
        let mut wire = BytesMut::new();
        for r in requests() {
            wire.clear();
            r.encode(&mut wire);
            for i in 1..wire.len() {
                let mut buf = BytesMut::from(&wire[..i]);
                assert!(RequestCodec.decode(&mut buf).unwrap().is_none());
                let err = RequestCodec.decode_eof(&mut buf).unwrap_err();
                assert!(err.to_string().contains("truncated"), "{err}");
            }
        }
    }

    #[test]
    fn malformed_bodies_are_proto_errors() {
        let mut buf = BytesMut::from(&b"\x00\x02q1"[..]);
        assert!(matches!(
            RequestCodec.decode(&mut buf),
            Err(CodecError::Proto(ProtoError::UnknownTag(b'q')))
        ));
        let mut buf = BytesMut::from(&b"\x00\x01z"[..]);
        let err = RequestCodec.decode(&mut buf).unwrap_err();
        assert_eq!(err.to_string(), "invalid node name: name is empty");
        assert!(matches!(
            err,
            CodecError::Proto(ProtoError::InvalidName(NameError::Empty))
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x1234_5678_9abc_def0_u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        };
        for _ in 0..20_000 {
            let len = usize::from(next() % 48);
            // A small alphabet, so that frames complete and tags match now
            // and then.
            const ALPHABET: &[u8] = &[0, 1, 2, 3, 5, 0xff, b'x', b'z', b'n', b'a'];
            let mut buf: BytesMut = (0..len)
                .map(|_| ALPHABET[usize::from(next()) % ALPHABET.len()])
                .collect();
            let mut codec = RequestCodec;
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
            let _ = codec.decode_eof(&mut buf);
        }
    }
}
