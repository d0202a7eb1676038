//! Parsing cost per connection: the EPMD requests and replies every lookup
//! goes through, and the handshake frames the router reads before relaying.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion};
use distproxy_testkit::sut::handshake::{
    encode_challenge, encode_send_name, parse_challenge, parse_send_name, Challenge, SendName,
    DFLAG_HANDSHAKE_23,
};
use distproxy_testkit::sut::proto::{encode_port2_ok, NodeSpec, Request};

fn spec() -> NodeSpec {
    NodeSpec {
        port: 38911,
        node_type: 77,
        protocol: 0,
        highest_version: 6,
        lowest_version: 6,
        name: "worker-1".into(),
        extra: Bytes::new(),
    }
}

fn epmd(c: &mut Criterion) {
    let mut g = c.benchmark_group("epmd");

    let mut alive2 = BytesMut::new();
    Request::Alive2(spec()).encode(&mut alive2);
    g.bench_function("decode ALIVE2_REQ", |b| {
        b.iter(|| Request::decode(black_box(&alive2[2..])))
    });

    let mut port_please = BytesMut::new();
    Request::PortPlease2 {
        name: "worker-1".into(),
    }
    .encode(&mut port_please);
    g.bench_function("decode PORT_PLEASE2_REQ", |b| {
        b.iter(|| Request::decode(black_box(&port_please[2..])))
    });

    let spec = spec();
    let mut dst = BytesMut::with_capacity(256);
    g.bench_function("encode PORT2_RESP", |b| {
        b.iter(|| {
            dst.clear();
            encode_port2_ok(&mut dst, black_box(&spec), 43691);
            black_box(dst.len())
        })
    });
    g.finish();
}

fn handshake(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    let name = "worker-1@pod-a.svc.cluster.local".to_owned();

    let mut new = BytesMut::new();
    encode_send_name(
        &mut new,
        &SendName {
            name: name.clone(),
            flags: 0x0000_000d_07df_7fbd,
            creation: Some(0x6543_2100),
            version: None,
        },
    );
    g.bench_function("parse send_name N", |b| {
        b.iter(|| parse_send_name(black_box(&new)))
    });

    let mut old = BytesMut::new();
    encode_send_name(
        &mut old,
        &SendName {
            name: name.clone(),
            flags: DFLAG_HANDSHAKE_23 | 0x0007_7fbd,
            creation: None,
            version: Some(5),
        },
    );
    g.bench_function("parse send_name n", |b| {
        b.iter(|| parse_send_name(black_box(&old)))
    });

    let mut challenge = BytesMut::new();
    encode_challenge(
        &mut challenge,
        &Challenge {
            name,
            flags: 0x0000_000d_07df_7fbd,
            challenge: 0xdead_beef,
            creation: Some(2),
        },
    );
    g.bench_function("parse challenge", |b| {
        b.iter(|| parse_challenge(black_box(&challenge)))
    });
    g.finish();
}

criterion_group!(benches, epmd, handshake);
criterion_main!(benches);
