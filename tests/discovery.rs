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
    let _serial = LOG_LINES.lock().await;
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

/// A sidecar in miniature: answers every pod-info request with `host` and
/// `nodes`. Aborting the handle closes its port (the pod went away).
async fn fake_sidecar(addr: SocketAddr, host: &str, nodes: &[&str]) -> tokio::task::AbortHandle {
    let nodes: Vec<Entry> = nodes
        .iter()
        .map(|n| Entry {
            name: n.to_string(),
            node_type: 77,
        })
        .collect();
    let mut reply = BytesMut::new();
    distproxy::discovery::wire::encode_pod_info(&mut reply, host, &nodes);
    raw_peer(addr, reply.to_vec()).await
}

/// Answers any request with `reply`, then closes.
async fn raw_peer(addr: SocketAddr, reply: Vec<u8>) -> tokio::task::AbortHandle {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut req = [0u8; 3];
                if s.read_exact(&mut req).await.is_ok() {
                    let _ = s.write_all(&reply).await;
                }
            });
        }
    })
    .abort_handle()
}

/// A port every address of 127.0.0.0/8 has free (probed on `probe`).
async fn free_port(probe: IpAddr) -> u16 {
    let l = TcpListener::bind(SocketAddr::new(probe, 0)).await.unwrap();
    l.local_addr().unwrap().port()
}

/// Waits (a little) until nothing listens on `addr` any more.
async fn wait_closed(addr: SocketAddr) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{addr} still accepts");
}

fn pod_of(s: &distproxy::discovery::Snapshot, ip: IpAddr) -> distproxy::discovery::PodState {
    s.pods
        .iter()
        .find(|p| p.addr == Some(ip))
        .cloned()
        .unwrap_or_else(|| panic!("pod {ip} in {:#?}", s.pods))
}

/// A node registering with this sidecar is a member at once, also while a
/// refresh waits for a pod that never answers: it used to be published only
/// when the refresh ended (up to `query_timeout_ms` later).
#[tokio::test]
async fn a_registration_is_published_while_a_refresh_waits_for_a_silent_pod() {
    let silent_ip = IpAddr::from([127, 0, 2, 1]);
    let port = free_port(silent_ip).await;
    let quiet = silent(SocketAddr::new(silent_ip, port)).await;
    let mut settings = settings(port);
    settings.service = Some(silent_ip.to_string()); // an address: no DNS
    settings.query_timeout = Duration::from_secs(60);
    let registry = Arc::new(Registry::new());
    let discovery = Discovery::new(settings, Arc::clone(&registry));
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(Arc::clone(&discovery).run(shutdown.clone()));
    // The first refresh is asking the silent pod.
    let (_held, _) = tokio::time::timeout(Duration::from_secs(10), quiet.accept())
        .await
        .expect("the refresh asks the pod")
        .unwrap();

    let _late = registry.register(spec("late", 40001), silent_ip).unwrap();
    let version = discovery.snapshot().version;
    let s = tokio::time::timeout(
        Duration::from_secs(10),
        discovery.wait_for_change(version, Duration::from_secs(30), &shutdown),
    )
    .await
    .unwrap();
    assert_eq!(names(&s.members), ["late@pod-0.test"]);
    assert_eq!(s.refreshes, 0, "published before the refresh ended");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), runner)
        .await
        .expect("shutdown ends a refresh in progress")
        .unwrap();
}

/// The service's addresses change between refreshes: a pod's address is
/// reused by a new pod, and a pod moves to another address while its old
/// one is still listed but dead. No node of the old pods stays a member.
#[tokio::test]
async fn a_reused_address_or_a_moved_pod_leaves_no_stale_member() {
    let _serial = LOG_LINES.lock().await;
    let ip = |last: u8| IpAddr::from([127, 0, 3, last]);
    let port = free_port(ip(1)).await;
    let at = |last: u8| SocketAddr::new(ip(last), port);
    let registry = Arc::new(Registry::new());
    let discovery = Discovery::new(settings(port), Arc::clone(&registry));

    let old_c = fake_sidecar(at(3), "pod-c.test", &["c1", "c2"]).await;
    let old_m = fake_sidecar(at(4), "pod-m.test", &["m1", "m2", "m3"]).await;
    discovery.refresh_from(Ok(vec![ip(3), ip(4)])).await;
    assert_eq!(
        names(&discovery.snapshot().members),
        [
            "c1@pod-c.test",
            "c2@pod-c.test",
            "m1@pod-m.test",
            "m2@pod-m.test",
            "m3@pod-m.test"
        ]
    );

    // pod-c goes and pod-d gets its address; pod-m restarts at a new
    // address with one node, its old address still in DNS.
    old_c.abort();
    old_m.abort();
    wait_closed(at(3)).await;
    wait_closed(at(4)).await;
    let _d = fake_sidecar(at(3), "pod-d.test", &["d1"]).await;
    let _m = fake_sidecar(at(5), "pod-m.test", &["m1"]).await;
    discovery.refresh_from(Ok(vec![ip(3), ip(4), ip(5)])).await;
    let s = discovery.snapshot();
    assert_eq!(
        names(&s.members),
        ["d1@pod-d.test", "m1@pod-m.test"],
        "{:#?}",
        s.pods
    );
    let dead = pod_of(&s, ip(4));
    assert!(dead.error.is_some() && dead.nodes.is_empty(), "{dead:#?}");
    assert_eq!(pod_of(&s, ip(3)).host, "pod-d.test");
    let version = s.version;

    // The same again: nothing changes.
    discovery.refresh_from(Ok(vec![ip(3), ip(4), ip(5)])).await;
    assert_eq!(discovery.snapshot().version, version);
    assert_eq!(discovery.snapshot().members, s.members);
}

/// Another pod's answer is untrusted: a host part that cannot follow an `@`
/// is a bad reply, and node names that would not form a node name (or would
/// start a false line in `distproxy members`) are left out.
#[tokio::test]
async fn names_and_hosts_a_node_name_cannot_hold_are_no_members() {
    let _serial = LOG_LINES.lock().await;
    let ip = |last: u8| IpAddr::from([127, 0, 4, last]);
    let port = free_port(ip(1)).await;
    let at = |last: u8| SocketAddr::new(ip(last), port);
    let _bad_host = fake_sidecar(at(1), "pod-x.test\nforged@line", &["x1"]).await;
    let _at_host = fake_sidecar(at(2), "a@pod-y.test", &["y1"]).await;
    let _odd_names = fake_sidecar(
        at(3),
        "pod-z.test",
        &["ok", "a@b", "two\nlines", "with space", "tab\there"],
    )
    .await;
    let registry = Arc::new(Registry::new());
    let discovery = Discovery::new(settings(port), Arc::clone(&registry));
    discovery.refresh_from(Ok(vec![ip(1), ip(2), ip(3)])).await;
    let s = discovery.snapshot();
    assert_eq!(names(&s.members), ["ok@pod-z.test"], "{:#?}", s.pods);
    for last in [1, 2] {
        let pod = pod_of(&s, ip(last));
        let error = pod.error.unwrap_or_default();
        assert!(error.starts_with("bad reply"), "{error}");
        assert!(pod.nodes.is_empty());
    }
}

/// Garbage, a reply past the size limit, a reply dripped byte by byte and
/// six silent pods: each ends within `query_timeout_ms` as a bad reply or
/// a timeout, and the twelve pods of three nodes beside them are all asked
/// at once, so the refresh takes about one timeout, not one per bad pod.
#[tokio::test]
async fn bad_peers_cost_one_timeout_and_twelve_pods_are_asked_at_once() {
    let _serial = LOG_LINES.lock().await;
    let ip = |last: u8| IpAddr::from([127, 0, 5, last]);
    let port = free_port(ip(1)).await;
    let at = |last: u8| SocketAddr::new(ip(last), port);
    let mut good = Vec::new();
    for i in 1..=12u8 {
        good.push(fake_sidecar(at(i), &format!("pod-{i}.test"), &["n1", "n2", "n3"]).await);
    }
    let _garbage = raw_peer(at(20), b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).await;
    let _huge = raw_peer(at(21), vec![b'i'; 2 << 20]).await;
    let dripping = TcpListener::bind(at(22)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = dripping.accept().await {
            tokio::spawn(async move {
                while s.write_all(b"i").await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
    });
    let mut _silent = Vec::new();
    for last in 23..=28 {
        _silent.push(silent(at(last)).await);
    }
    let mut settings = settings(port);
    settings.query_timeout = Duration::from_millis(1000);
    let registry = Arc::new(Registry::new());
    let discovery = Discovery::new(settings, Arc::clone(&registry));
    let addrs: Vec<IpAddr> = (1..=12).chain(20..=28).map(ip).collect();

    let started = std::time::Instant::now();
    discovery.refresh_from(Ok(addrs)).await;
    let took = started.elapsed();
    let s = discovery.snapshot();
    assert_eq!(s.members.len(), 12 * 3, "{:#?}", s.pods);
    let error = |last| pod_of(&s, ip(last)).error.unwrap_or_default();
    assert!(error(20).starts_with("bad reply"), "{}", error(20));
    assert!(error(21).contains("exceeds"), "{}", error(21));
    assert!(error(22).starts_with("timed out"), "{}", error(22));
    assert!(error(23).starts_with("timed out"), "{}", error(23));
    // Seven pods time out: one timeout (1 s), not seven after each other
    // (the bound leaves a loaded machine 3 s of slack).
    assert!(took >= Duration::from_millis(1000), "{took:?}");
    assert!(took < Duration::from_millis(4000), "{took:?}");
}

/// Held by the tests whose refreshes reach the failure log lines. `tracing`
/// caches each callsite's interest process-wide, computed by the first
/// thread to reach it: a sibling test with no subscriber could cache
/// "never" while the one capturing the lines runs.
static LOG_LINES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Log lines as written, for [`tracing_subscriber::fmt`].
#[derive(Clone, Default)]
struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    /// Captures this thread's `INFO` and higher lines while the guard lives.
    fn capture() -> (Lines, tracing::subscriber::DefaultGuard) {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let lines = lines.clone();
                move || lines.clone()
            })
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        (lines, guard)
    }

    fn matching(&self, level: &str, text: &str) -> usize {
        let all = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        all.lines()
            .filter(|l| l.contains(level) && l.contains(text))
            .count()
    }
}

/// A pod that stops answering, and a name server that fails, are counted on
/// every refresh but warned about once, when the failure begins (not once
/// per refresh for as long as the pod stays listed); their recovery is one
/// info line.
#[tokio::test]
async fn a_lasting_failure_is_one_warning_not_one_per_refresh() {
    let _serial = LOG_LINES.lock().await;
    let ip = IpAddr::from([127, 0, 6, 1]);
    let port = free_port(ip).await;
    let (lines, _log) = Lines::capture();
    let registry = Arc::new(Registry::new());
    let discovery = Discovery::new(settings(port), Arc::clone(&registry));

    let first = fake_sidecar(SocketAddr::new(ip, port), "pod-1.test", &["a1"]).await;
    discovery.refresh_from(Ok(vec![ip])).await;
    first.abort();
    wait_closed(SocketAddr::new(ip, port)).await;
    for _ in 0..3 {
        discovery.refresh_from(Ok(vec![ip])).await;
    }
    for _ in 0..3 {
        discovery.refresh_from(Err("name server down".into())).await;
    }
    let s = discovery.snapshot();
    assert_eq!(names(&s.members), ["a1@pod-1.test"], "kept");
    assert!(pod_of(&s, ip).error.is_some());
    assert_eq!(lines.matching("WARN", "pod did not answer"), 1);
    assert_eq!(lines.matching("WARN", "cannot resolve the service"), 1);

    let _back = fake_sidecar(SocketAddr::new(ip, port), "pod-1.test", &["a1", "a2"]).await;
    discovery.refresh_from(Ok(vec![ip])).await;
    assert_eq!(
        names(&discovery.snapshot().members),
        ["a1@pod-1.test", "a2@pod-1.test"]
    );
    assert_eq!(lines.matching("INFO", "pod answers again"), 1);
    assert_eq!(lines.matching("INFO", "the service resolves again"), 1);
    assert_eq!(lines.matching("WARN", ""), 2, "no other warning");
}

/// Every pod's `discovery.host` set to the Service name (a copy-paste
/// mistake): their nodes' names would name no single pod, and the pods
/// claiming this pod's host are taken for it. Warned about once, when it
/// begins, and again only for a host part newly shared.
#[tokio::test]
async fn pods_answering_with_one_host_part_are_warned_about_once() {
    let _serial = LOG_LINES.lock().await;
    let ip = |last: u8| IpAddr::from([127, 0, 7, last]);
    let port = free_port(ip(1)).await;
    let at = |last: u8| SocketAddr::new(ip(last), port);
    let (lines, _log) = Lines::capture();
    let _a = fake_sidecar(at(1), "svc.test", &["a1"]).await;
    let _b = fake_sidecar(at(2), "svc.test", &["b1"]).await;
    let _c = fake_sidecar(at(3), "pod-c.test", &["c1"]).await;
    let registry = Arc::new(Registry::new());
    let discovery = Discovery::new(settings(port), Arc::clone(&registry));
    for _ in 0..3 {
        discovery.refresh_from(Ok(vec![ip(1), ip(2), ip(3)])).await;
    }
    assert_eq!(lines.matching("WARN", "same host part"), 1);
    assert_eq!(lines.matching("WARN", "svc.test"), 1);

    // Two more pods claim this pod's host (pod-0.test).
    let _d = fake_sidecar(at(4), "pod-0.test", &["d1"]).await;
    let _e = fake_sidecar(at(5), "pod-0.test", &["e1"]).await;
    for _ in 0..2 {
        discovery.refresh_from(Ok((1..=5).map(ip).collect())).await;
    }
    assert_eq!(lines.matching("WARN", "same host part"), 2);
    assert_eq!(lines.matching("WARN", "pod-0.test"), 1);

    // A single pod per host part again: nothing more to say.
    discovery.refresh_from(Ok(vec![ip(1), ip(3)])).await;
    assert_eq!(
        names(&discovery.snapshot().members),
        ["a1@svc.test", "c1@pod-c.test"]
    );
    assert_eq!(lines.matching("WARN", "same host part"), 2);
}
