//! Parsing cost per connection: the EPMD requests and replies every lookup
//! goes through, and the handshake frames the router reads before relaying;
//! and the ACL decision every incoming connection gets (`[[acl]]`), with
//! one rule and with 64 rules none of which matches (the worst case).

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

/// `rules` deny rules whose initiator pattern (two `*`) matches the
/// request and whose target does not, one identity rule, then the default:
/// every pattern of every rule is tried.
fn acl_of(rules: usize) -> distproxy_testkit::sut::acl::Acl {
    use std::fmt::Write;
    let mut toml = String::from("[dist]\nacl_default = \"allow\"\n");
    for i in 0..rules {
        let _ = write!(
            toml,
            "[[acl]]\naction = \"deny\"\ninitiator = \"*@*.myapp-headless.prod.svc.cluster.local\"\ntarget = \"billing-{i}\"\n"
        );
    }
    toml.push_str(
        "[[acl]]\naction = \"allow\"\ninitiator = \"remsh-*\"\nidentity = \"*.ops.example.com\"\n",
    );
    let config = distproxy_testkit::sut::Config::from_toml(&toml, "bench").unwrap();
    distproxy_testkit::sut::acl::Acl::from_config(&config).unwrap()
}

fn acl(c: &mut Criterion) {
    use distproxy_testkit::sut::acl::AclRequest;
    let mut g = c.benchmark_group("acl");
    let request = AclRequest {
        initiator: "a17@myapp-3.myapp-headless.prod.svc.cluster.local",
        target: "payments2",
        identity: None,
    };
    for rules in [1, 64] {
        let acl = acl_of(rules);
        g.bench_function(format!("decide, {rules} rules + 1, no match"), |b| {
            b.iter(|| acl.decide(black_box(&request)))
        });
    }
    g.finish();
}

criterion_group!(benches, epmd, handshake, acl);
criterion_main!(benches);
