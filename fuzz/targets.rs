//! The bodies of the fuzz targets, shared by the libFuzzer binaries in
//! `fuzz/fuzz_targets/` and by `tests/fuzz_corpus.rs`, which replays every
//! corpus file through them on the stable toolchain.
//!
//! Each target feeds arbitrary bytes to one parser that reads the network
//! or the disk and checks more than "no panic" where that is cheap: what
//! parses re-encodes to something that parses to the same value, a parse
//! consumes no more than its input, and every strict prefix of a frame that
//! parses is "incomplete", never an error (so a reader that gets the frame
//! a byte at a time neither fails early nor waits forever).

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use distproxy::admin::{self, HeadRequest};
use distproxy::config::Config;
use distproxy::distribution::handshake::{self, Status};
use distproxy::epmd::codec::RequestCodec;
use distproxy::epmd::proto::{self, Port2Reply, Request};
use distproxy::epmd::state;
use distproxy::tunnel::preamble::{self, Preamble};

/// A target body.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("epmd_codec", epmd_codec),
    ("epmd_request", epmd_request),
    ("epmd_reply", epmd_reply),
    ("dist_send_name", dist_send_name),
    ("dist_node_reply", dist_node_reply),
    ("preamble", preamble),
    ("admin_head", admin_head),
    ("state_file", state_file),
    ("config", config),
];

/// What decoding a request stream produced: the requests, then the error
/// that stopped it (as text) or the bytes left waiting for more.
#[derive(Debug, PartialEq)]
struct Decoded {
    requests: Vec<Request>,
    error: Option<String>,
    left: Vec<u8>,
}

/// Decodes `stream` delivered in reads of the given sizes (cycled), as the
/// EPMD server's framed reader would.
fn decode_stream(stream: &[u8], reads: &[usize]) -> Decoded {
    let mut codec = RequestCodec;
    let mut buf = BytesMut::new();
    let mut requests = Vec::new();
    let mut rest = stream;
    let mut sizes = reads.iter().copied().cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(request)) => requests.push(request),
                Ok(None) => break,
                Err(e) => {
                    return Decoded {
                        requests,
                        error: Some(e.to_string()),
                        left: Vec::new(),
                    }
                }
            }
        }
    }
    Decoded {
        requests,
        error: None,
        left: buf.to_vec(),
    }
}

/// EPMD request framing: the first byte picks how the stream is split into
/// reads, the rest is the stream. The result must not depend on the split,
/// and every decoded request must re-encode to a frame no longer than the
/// one it came from that decodes to the same request (the bare members
/// request, a tag alone, re-encodes with its two fields spelled out: 8
/// bytes more).
pub fn epmd_codec(data: &[u8]) {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let whole = decode_stream(stream, &[stream.len().max(1)]);
    // Reads of 1 to 8 bytes, then 1 to 32 (one byte at a time when 0).
    let reads = match split {
        0 => vec![1],
        _ => vec![usize::from(split & 7) + 1, usize::from(split >> 3) + 1],
    };
    assert_eq!(decode_stream(stream, &reads), whole, "reads of {reads:?}");

    let mut frames_len = 0;
    for request in &whole.requests {
        let mut wire = BytesMut::new();
        RequestCodec
            .encode(request.clone(), &mut wire)
            .expect("encoding into memory cannot fail");
        frames_len += wire.len();
        if matches!(request, Request::Members { .. }) {
            frames_len -= 8;
        }
        // STOP's name is re-encoded as a C string; the original may have
        // ended without the NUL.
        if matches!(request, Request::Stop { .. }) {
            frames_len -= 1;
        }
        let again = RequestCodec.decode(&mut wire).expect("re-encoded request");
        assert_eq!(again.as_ref(), Some(request));
        assert!(wire.is_empty());
    }
    assert!(frames_len + whole.left.len() <= stream.len());
    if whole.error.is_none() {
        // A stream that ends mid-request is truncated, not cleanly closed.
        let mut left = BytesMut::from(&whole.left[..]);
        let end = RequestCodec.decode_eof(&mut left);
        assert_eq!(end.is_err(), !whole.left.is_empty(), "{end:?}");
    }
}

/// One EPMD request body. What decodes re-encodes to the same bytes (a
/// `STOP_REQ` name longer than any node's aside), up to what `epmd`
/// tolerates and ignores: the one trailing NUL of a lookup,
/// the tail of tag-only requests, bytes after `ALIVE2_REQ`'s extra, and
/// everything after the NUL that ends `STOP_REQ`'s name.
pub fn epmd_request(data: &[u8]) {
    let Ok(request) = Request::decode(data) else {
        return;
    };
    // `STOP_REQ` takes any name, as `epmd` does (it answers NOEXIST); the
    // encoder, a client's, clamps names to what a node can have, so a
    // longer one does not round-trip.
    if matches!(&request, Request::Stop { name } if name.len() > proto::MAX_NAME_BYTES) {
        return;
    }
    let mut wire = BytesMut::new();
    request.encode(&mut wire);
    let body = &wire[2..];
    assert_eq!(
        usize::from(u16::from_be_bytes([wire[0], wire[1]])),
        body.len()
    );
    assert!(body.len() <= proto::MAX_REQUEST_LEN);
    assert_eq!(Request::decode(body).as_ref(), Ok(&request));
    match request {
        Request::Egress { .. } => assert_eq!(body, data),
        Request::Alive2(_) => assert!(data.starts_with(body)),
        Request::PortPlease2 { .. } => {
            assert!(data == body || data.strip_suffix(&[0]) == Some(body));
        }
        // Encoded as a C string.
        Request::Stop { .. } => {
            let name = &body[..body.len() - 1];
            assert!(data.starts_with(name) && matches!(data.get(name.len()), None | Some(0)));
        }
        Request::Names | Request::Dump | Request::Kill | Request::PodInfo => {
            assert_eq!(body, &data[..1])
        }
        // The bare tag is the members request with zeroes spelled out.
        Request::Members { .. } => {
            assert!(data == body || (data.len() == 1 && body == [data, &[0; 8]].concat()));
        }
    }
}

/// Checks a reply decoder's contract on `data`: a reply consumes no more
/// than the input, and every strict prefix of it is incomplete. Returns
/// the reply and its bytes.
fn complete_reply<T: std::fmt::Debug, E: std::fmt::Debug>(
    data: &[u8],
    decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, E>,
) -> Option<(T, &[u8])> {
    let (reply, used) = decode(data).ok()??;
    assert!(
        0 < used && used <= data.len(),
        "used {used} of {}",
        data.len()
    );
    for i in 0..used {
        assert!(
            matches!(decode(&data[..i]), Ok(None)),
            "prefix of {i} bytes: {:?}",
            decode(&data[..i])
        );
    }
    Some((reply, &data[..used]))
}

/// The replies the client side (`distproxy names`, tests) reads from an
/// EPMD: `PORT2_RESP`, `ALIVE2_(X_)RESP`, the egress reply and the text of
/// a `NAMES_REQ` reply.
pub fn epmd_reply(data: &[u8]) {
    if let Some((reply, bytes)) = complete_reply(data, proto::decode_port2_resp) {
        let mut wire = BytesMut::new();
        match &reply {
            Port2Reply::Found(spec) => proto::encode_port2_ok(&mut wire, spec, spec.port),
            Port2Reply::NotFound { result } => proto::encode_port2_err(&mut wire, *result),
        }
        // The encoder cuts extras longer than an ALIVE2_REQ can carry.
        let clamped =
            matches!(&reply, Port2Reply::Found(s) if s.extra.len() > proto::MAX_EXTRA_LEN);
        if !clamped {
            assert_eq!(&wire[..], bytes);
        }
    }
    if let Some((reply, bytes)) = complete_reply(data, proto::decode_alive2_resp) {
        let mut wire = BytesMut::new();
        proto::encode_alive2_resp(&mut wire, reply.result, reply.creation, reply.extended);
        assert_eq!(&wire[..], bytes);
    }
    if let Some((reply, bytes)) = complete_reply(data, proto::decode_egress_resp) {
        assert_eq!(bytes.len(), proto::EGRESS_RESP_LEN);
        let mut wire = BytesMut::new();
        proto::encode_egress_resp(&mut wire, reply.result, reply.port);
        let canonical = if reply.result == 0 {
            reply.version == proto::EGRESS_DIST_VERSION
        } else {
            reply.port == 0 && reply.version == 0
        };
        if canonical {
            assert_eq!(&wire[..], bytes);
        }
    }
    let text = String::from_utf8_lossy(data);
    let names = proto::parse_names(&text);
    assert!(names.len() <= text.lines().count());
    let mut rendered = BytesMut::new();
    for (name, port) in &names {
        proto::encode_names_line(&mut rendered, name, *port);
    }
    let rendered = std::str::from_utf8(&rendered).expect("names are UTF-8");
    assert_eq!(proto::parse_names(rendered), names);
}

/// Checks a handshake parser's contract on `data` (see [`complete_reply`])
/// and that the frame is no longer than the limit.
fn complete_frame<T: std::fmt::Debug>(
    data: &[u8],
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, handshake::HandshakeError>,
) -> Option<(T, &[u8])> {
    let (msg, frame) = complete_reply(data, &parse)?;
    assert!(frame.len() <= 2 + handshake::MAX_HANDSHAKE_FRAME);
    Some((msg, frame))
}

/// The initiator's `send_name`, the first frame on the distribution port
/// (and on an egress port). What parses re-encodes to a frame that parses
/// to the same message, and the listener's first-bytes check takes every
/// prefix of it for a handshake.
pub fn dist_send_name(data: &[u8]) {
    for i in 1..=data.len().min(4) {
        let looks = handshake::looks_like_dist_handshake(&data[..i]);
        if !looks {
            // Once ruled out, more bytes cannot make it a handshake...
            assert!(!handshake::looks_like_dist_handshake(data));
            // ...and the parser refuses it or it cannot be a send_name yet.
            assert!(!matches!(handshake::parse_send_name(data), Ok(Some(_))));
        }
    }
    let Some((msg, frame)) = complete_frame(data, handshake::parse_send_name) else {
        return;
    };
    for i in 0..=frame.len() {
        assert!(handshake::looks_like_dist_handshake(&frame[..i]) || i == 0);
    }
    let mut wire = BytesMut::new();
    handshake::encode_send_name(&mut wire, &msg);
    assert!(wire.len() <= frame.len(), "re-encoded frame grew");
    let again = handshake::parse_send_name(&wire);
    assert_eq!(again, Ok(Some((msg, wire.len()))));
}

/// What the router reads from the node it connected to: a status frame,
/// then the challenge (which names the node). Both parsers are run on the
/// stream in that order, as the listener does.
pub fn dist_node_reply(data: &[u8]) {
    let Some((status, frame)) = complete_frame(data, handshake::parse_status) else {
        // The same bytes can also be the challenge alone (fuzzing it directly).
        challenge(data);
        return;
    };
    let mut wire = BytesMut::new();
    handshake::encode_status(&mut wire, &status);
    let exact = match &status {
        // Only a valid UTF-8 text that the encoder does not cut round-trips.
        Status::Other(text) => std::str::from_utf8(&frame[3..]).is_ok() && text.len() <= 1024,
        _ => true,
    };
    if exact && wire.len() <= 2 + handshake::MAX_HANDSHAKE_FRAME {
        assert_eq!(
            handshake::parse_status(&wire),
            Ok(Some((status, wire.len())))
        );
    }
    challenge(&data[frame.len()..]);
}

fn challenge(data: &[u8]) {
    let Some((msg, frame)) = complete_frame(data, handshake::parse_challenge) else {
        return;
    };
    let mut wire = BytesMut::new();
    handshake::encode_challenge(&mut wire, &msg);
    assert!(wire.len() <= frame.len(), "re-encoded frame grew");
    assert_eq!(
        handshake::parse_challenge(&wire),
        Ok(Some((msg, wire.len())))
    );
}

/// The `DPX` preamble a peer sidecar sends before the handshake.
pub fn preamble(data: &[u8]) {
    let Some((parsed, bytes)) = complete_reply(data, preamble::parse) else {
        return;
    };
    assert!(bytes.len() <= preamble::HEADER_LEN + preamble::MAX_BODY_LEN);
    // A receiver accepts exactly what a sender may build.
    assert_eq!(
        Preamble::new(&parsed.target, &parsed.initiator).as_ref(),
        Ok(&parsed)
    );
    let mut wire = BytesMut::new();
    parsed.encode(&mut wire);
    assert!(wire.len() <= bytes.len(), "re-encoded preamble grew");
    assert_eq!(preamble::parse(&wire), Ok(Some((parsed, wire.len()))));
    assert!(!handshake::looks_like_dist_handshake(&wire));
}

/// The admin endpoint's request head, judged after every read.
pub fn admin_head(data: &[u8]) {
    let head = data.get(..admin::MAX_HEAD + 1024).unwrap_or(data);
    let verdict = admin::parse_request_head(head);
    let ends = head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n");
    match &verdict {
        None => assert!(!ends && head.len() < admin::MAX_HEAD),
        Some(HeadRequest::Oversized) => assert!(!ends && head.len() >= admin::MAX_HEAD),
        Some(HeadRequest::Incomplete) => panic!("a parse is never Incomplete"),
        Some(HeadRequest::Get { path, .. }) => {
            assert!(ends);
            assert!(!path.contains('?') && !path.chars().any(char::is_whitespace));
            let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
            assert!(String::from_utf8_lossy(line).contains(path.as_str()));
        }
        Some(HeadRequest::MethodNotAllowed | HeadRequest::Malformed) => assert!(ends),
    }
    // The server stops at the first verdict: a longer read of a complete
    // head keeps it.
    if verdict.is_some() && ends {
        let mut longer = head.to_vec();
        longer.extend_from_slice(b"X-More: 1\r\n\r\n");
        assert_eq!(admin::parse_request_head(&longer), verdict);
    }
}

/// The registry state file read at start-up. What loads saves to bytes
/// that load to the same state; every accepted `extra_hex` is hex.
pub fn state_file(data: &[u8]) {
    let Ok(loaded) = state::parse(data) else {
        return;
    };
    for node in &loaded.nodes {
        assert!(
            node.extra_hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "accepted extra_hex {:?}",
            node.extra_hex
        );
    }
    let saved = state::render(&loaded).expect("a loaded state renders");
    assert_eq!(state::parse(&saved), Ok(loaded));
}

/// The TOML configuration, parsed and validated. A configuration that is
/// accepted renders (`check-config`) to TOML that is accepted as the same
/// configuration.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml(text, "fuzz input") else {
        return;
    };
    let rendered = config.to_toml();
    match Config::from_toml(&rendered, "rendered configuration") {
        Ok(again) => assert_eq!(again, config, "rendered:\n{rendered}"),
        Err(e) => panic!("rendered configuration refused: {e}\n{rendered}"),
    }
}
