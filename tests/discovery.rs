//! Discovery against real sockets on loopback: the pod-info and members
//! requests of a running sidecar, and refreshes over pods of every kind
//! (distproxy, stock EPMD, dead, silent) without DNS (the e2e test in
//! `e2e_discovery.rs` covers the name server).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use distproxy::client;
use distproxy::config::DiscoveryConfig;
use distproxy::discovery::query::{self, Source};
use distproxy::discovery::wire::{Entry, MembersReply};
use distproxy::discovery::{Discovery, Settings};
use distproxy::epmd::registry::Registry;
use distproxy::epmd::server::DiscoveryAnswers;
use distproxy_testkit::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn names(entries: &[Entry]) -> Vec<&str> {
    entries.iter().map(|e| e.name.as_str()).collect()
}

#[tokio::test]
async fn pod_info_names_this_pod_and_its_nodes_and_members_needs_discovery() {
    let mut config = test_config();
    config.discovery.host = "pod-1.test".into();
    let sc = start(config);
    let epmd = epmd_addr(&sc);
    let (_a1, _) = client::register(epmd, spec("a1", 40001)).await.unwrap();
    let mut hidden = spec("remsh", 40002);
    hidden.node_type = 72;
    let (_r, _) = client::register(epmd, hidden).await.unwrap();

    let answer = query::query_pod(epmd, Duration::from_secs(5), None)
        .await
        .unwrap();
    assert_eq!(answer.source, Source::Sidecar);
    assert_eq!(answer.host, "pod-1.test");
    assert_eq!(
        answer.nodes,
        vec![
            Entry {
                name: "a1".into(),
                node_type: 77
            },
            Entry {
                name: "remsh".into(),
                node_type: 72
            }
        ]
    );
    // No `discovery.service`: the members request says discovery is off.
    assert!(matches!(
        client::members(epmd, 0, 0).await.unwrap(),
        MembersReply::Disabled { .. }
    ));
}

#[tokio::test]
async fn a_sidecar_without_host_falls_back_to_names_and_the_template() {
    let sc = start(test_config()); // no discovery.host
    let epmd = epmd_addr(&sc);
    let (_b1, _) = client::register(epmd, spec("b1", 40003)).await.unwrap();
    let err = query::query_pod(epmd, Duration::from_secs(5), None)
        .await
        .unwrap_err();
    assert_eq!(err.label(), "no_host_template", "{err}");
    let template = distproxy::discovery::naming::HostTemplate::parse("h-{ip_dashed}").unwrap();
    let answer = query::query_pod(epmd, Duration::from_secs(5), Some(&template))
        .await
        .unwrap();
    assert_eq!(answer.source, Source::Epmd);
    assert_eq!(answer.host, "h-127-0-0-1");
    assert_eq!(names(&answer.nodes), ["b1"]);
}

/// A stock `epmd` in miniature: closes the connection on any request but
/// NAMES, which it answers with `s1`.
async fn stock_epmd(addr: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut req = [0u8; 3];
                if s.read_exact(&mut req).await.is_ok() && req[2] == b'n' {
                    let _ = s.write_all(b"\x00\x00\x11\x11name s1 at port 5000\n").await;
                }
            });
        }
    });
    addr
}

/// Accepts and never answers.
async fn silent(addr: SocketAddr) -> TcpListener {
    TcpListener::bind(addr).await.unwrap()
}

fn settings(port: u16) -> Settings {
    let config = DiscoveryConfig {
        service: "svc.test".into(),
        host: "${POD_HOST}".into(),
        host_template: "{ip}".into(),
        epmd_port: port,
        query_timeout_ms: Millis(300),
        refresh_interval_ms: Millis(1000),
        ..Default::default()
    };
    Settings::from_config(&config, |v| (v == "POD_HOST").then(|| "pod-0.test".into())).unwrap()
}

#[tokio::test]
async fn refresh_merges_every_kind_of_pod_and_survives_failures() {
    // Pod 1 (127.0.0.1): a sidecar. Its EPMD port is the port every pod
    // uses here, on its own loopback address.
    let mut config = test_config();
    config.discovery.host = "pod-1.test".into();
    let sc = start(config);
    let port = epmd_addr(&sc).port();
    let (_a1, _) = client::register(epmd_addr(&sc), spec("a1", 40001))
        .await
        .unwrap();
    let ip = |last: u8| IpAddr::from([127, 0, 0, last]);
    stock_epmd(SocketAddr::new(ip(2), port)).await; // pod 2: stock epmd
    let _quiet = silent(SocketAddr::new(ip(4), port)).await; // pod 4: never answers
                                                             // pod 3: nothing listens.

    // This pod: host from the environment, one node.
    let registry = Arc::new(Registry::new());
    let _z = registry.register(spec("z", 40009), ip(1)).unwrap();
    let discovery = Discovery::new(settings(port), Arc::clone(&registry));
    assert_eq!(discovery.snapshot().version, 0);

    discovery
        .refresh_from(Ok(vec![ip(1), ip(2), ip(3), ip(4)]))
        .await;
    let s = discovery.snapshot();
    assert_eq!(
        names(&s.members),
        ["a1@pod-1.test", "s1@127.0.0.2", "z@pod-0.test"]
    );
    assert_eq!(s.version, 1);
    let pod = |s: &distproxy::discovery::Snapshot, last: u8| {
        s.pods
            .iter()
            .find(|p| p.addr == Some(ip(last)))
            .cloned()
            .unwrap_or_else(|| panic!("pod {last} in {:#?}", s.pods))
    };
    assert_eq!(pod(&s, 1).source, Source::Sidecar);
    assert_eq!(pod(&s, 2).source, Source::Epmd);
    assert!(pod(&s, 3).error.is_some(), "refused");
    let slow = pod(&s, 4).error.unwrap();
    assert!(slow.contains("timed out"), "{slow}");

    // The same answers: the version stays.
    discovery
        .refresh_from(Ok(vec![ip(1), ip(2), ip(3), ip(4)]))
        .await;
    assert_eq!(discovery.snapshot().version, 1);
    assert_eq!(discovery.snapshot().refreshes, 2);

    // DNS fails: the members stay.
    discovery.refresh_from(Err("name server down".into())).await;
    let s = discovery.snapshot();
    assert_eq!(s.members.len(), 3);
    assert_eq!(s.dns_error.as_deref(), Some("name server down"));

    // A member-list request waiting for a change gets one when the service
    // loses every pod but this one.
    let shutdown = CancellationToken::new();
    let waiter = {
        let (discovery, shutdown) = (Arc::clone(&discovery), shutdown.clone());
        tokio::spawn(async move {
            let mut out = BytesMut::new();
            let result = discovery.members(1, 30_000, &shutdown, &mut out).await;
            (result, out)
        })
    };
    discovery.refresh_from(Ok(Vec::new())).await;
    let (result, out) = waiter.await.unwrap();
    assert_eq!(result, "ok");
    match distproxy::discovery::wire::decode_members(&out).unwrap() {
        MembersReply::List {
            version,
            refresh_ms,
            members,
        } => {
            assert_eq!(version, 2);
            assert_eq!(refresh_ms, 1000);
            assert_eq!(names(&members), ["z@pod-0.test"]);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_members_request_waits_for_a_change_and_ends_at_shutdown() {
    let registry = Arc::new(Registry::new());
    let discovery = Discovery::new(settings(1), Arc::clone(&registry));
    discovery.refresh_from(Ok(Vec::new())).await;
    let version = discovery.snapshot().version;
    let shutdown = CancellationToken::new();
    let waiter = {
        let (discovery, shutdown) = (Arc::clone(&discovery), shutdown.clone());
        tokio::spawn(async move {
            let mut out = BytesMut::new();
            discovery
                .members(version, 60_000, &shutdown, &mut out)
                .await;
            out
        })
    };
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished(), "answered without a change");
    shutdown.cancel();
    let out = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("shutdown ends the wait")
        .unwrap();
    assert!(matches!(
        distproxy::discovery::wire::decode_members(&out).unwrap(),
        MembersReply::List { version: v, .. } if v == version
    ));
}

#[test]
fn an_unset_variable_in_the_host_is_an_error_naming_it() {
    let config = DiscoveryConfig {
        host: "${NOT_SET_ANYWHERE}".into(),
        ..Default::default()
    };
    let err = Settings::from_config(&config, |_| None).unwrap_err();
    assert!(err.to_string().contains("discovery.host"), "{err}");
    assert!(err.to_string().contains("NOT_SET_ANYWHERE"), "{err}");
}
