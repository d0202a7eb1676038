//! End-to-end tests of the kernel fast path (`relay.fast_path =
//! "sockmap"`) with real OTP nodes: a BEAM pair relayed through the
//! sockmap, node routes (`relay.fast_path_cgroup`) for nodes inside the
//! pod, and the fallback to splice when the sidecar lacks the
//! capabilities.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN), a kernel with sockmap, iproute2,
//! erlang-nox and `setpriv` (util-linux); fails saying so otherwise, unless
//! `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::time::Duration;

use support::e2e_enabled;
use support::metrics::{metric_sum, metrics};
use support::sidecar::SidecarOptions;
use support::wait::{poll_until, wait_until};

const FAST: &str = "[relay]\nfast_path = \"sockmap\"\n";
const BLOB: usize = 16 * 1024 * 1024;

/// Pod S (stock epmd) with s1, pod B (sidecar with the fast path) with b1:
/// s1 reaches b1 through B's distribution port, 16 MiB arrive intact both
/// ways, the metrics say the connection went through the sockmap and count
/// its bytes, and when s1 goes the connection is closed and uncounted as on
/// the splice path.
#[test]
fn beam_pair_is_relayed_through_the_kernel_fast_path() {
    if !e2e_enabled("beam_pair_is_relayed_through_the_kernel_fast_path", &[]) {
        return;
    }
    let lab = support::Lab::new(&["s", "b"]);
    let (s, b) = (lab.pod("s"), lab.pod("b"));
    let _epmd = s.spawn_stock_epmd();
    let mut sidecar = b.spawn_sidecar_with(SidecarOptions::default().config(FAST));
    let mut s1 = s.spawn_erlang("s1");
    let mut b1 = b.spawn_erlang("b1");
    s1.wait_ready();
    b1.wait_ready();
    let text = metrics(b);
    assert_eq!(
        metric_sum(&text, "distproxy_relay_fast_path_available", &[]),
        1.0,
        "the fast path is on; the sidecar's log:\n{}",
        sidecar.log()
    );

    let b1_name = b1.name().to_string();
    let s1_name = s1.name().to_string();
    assert_eq!(s1.ping(&b1_name), "pong");
    for (from, to, to_name) in [(&mut s1, "b1", &b1_name), (&mut b1, "s1", &s1_name)] {
        let r = from.send_blob(to_name, BLOB);
        assert_eq!(r.remote_size, BLOB, "{to} got every byte");
        assert_eq!(r.local_md5, r.remote_md5, "{to} got the bytes intact");
    }
    assert_eq!(s1.rpc_node(&b1_name), b1_name, "answered by b1");

    let text = metrics(b);
    let on = |path| {
        metric_sum(
            &text,
            "distproxy_relay_connections_total",
            &[("path", path)],
        )
    };
    assert!(on("sockmap") >= 1.0, "relayed through the sockmap:\n{text}");
    assert_eq!(on("splice"), 0.0, "nothing spliced:\n{text}");
    // Bytes moved by the kernel are counted from TCP_INFO (every 5 s).
    wait_until(
        Duration::from_secs(15),
        "the kernel's bytes counted",
        || {
            let text = metrics(b);
            let bytes = |dir| {
                metric_sum(
                    &text,
                    "distproxy_relayed_bytes_total",
                    &[("node", "b1"), ("direction", dir)],
                )
            };
            bytes("rx") >= BLOB as f64 && bytes("tx") >= BLOB as f64
        },
    );
    let open = |text: &str| {
        metric_sum(
            text,
            "distproxy_dist_connections_open",
            &[("node", "b1"), ("direction", "inbound")],
        )
    };
    assert_eq!(open(&metrics(b)), 1.0);

    // s1 goes: the relay sees both ends, and the connection is uncounted.
    s1.halt();
    wait_until(Duration::from_secs(15), "the connection closed", || {
        open(&metrics(b)) == 0.0
    });
    // The line is written once the relay has returned, a moment after the
    // gauge went down: waited for, not read at once.
    let ended = || sidecar.log_lines_containing("distribution connection ended");
    let closed = poll_until(Duration::from_secs(15), Duration::from_millis(100), || {
        ended().iter().any(|l| l.contains("outcome=closed"))
    });
    assert!(closed, "ended as closed: {:?}", ended());
    sidecar.assert_running();
}

/// Node routes: pod B's sidecar has the fast path with node routes for
/// its own cgroup (where the test starts the nodes) and proxies loopback
/// lookups, so b1 → b2 goes through it with both ends local, and s1 → b1
/// comes from another pod with the acceptor local. 16 MiB arrive intact
/// each way on both connections; the metrics say which ends were routed
/// and count the bytes, which the sidecar's sockets never received;
/// when b1 goes, both connections close and are uncounted.
#[test]
fn node_routes_carry_local_nodes_messages_past_the_sidecar() {
    if !e2e_enabled(
        "node_routes_carry_local_nodes_messages_past_the_sidecar",
        &[],
    ) {
        return;
    }
    let lab = support::Lab::new(&["s", "b"]);
    let (s, b) = (lab.pod("s"), lab.pod("b"));
    let _epmd = s.spawn_stock_epmd();
    let config =
        format!("{FAST}fast_path_cgroup = \"auto\"\n\n[routing]\nloopback_lookups = \"proxy\"\n");
    // `ip netns exec` gives the pod a fresh /sys; a container has its
    // cgroup file system mounted there, so the pod gets one too.
    let mount_cgroup = [
        "sh",
        "-c",
        "mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$0\" \"$@\"",
    ];
    let mut sidecar = b.spawn_sidecar_with(
        SidecarOptions::default()
            .config(&config)
            .wrapped(&mount_cgroup),
    );
    let mut s1 = s.spawn_erlang("s1");
    let mut b1 = b.spawn_erlang("b1");
    let mut b2 = b.spawn_erlang("b2");
    for n in [&mut s1, &mut b1, &mut b2] {
        n.wait_ready();
    }
    let text = metrics(b);
    assert_eq!(
        metric_sum(&text, "distproxy_relay_node_routes_available", &[]),
        1.0,
        "node routes are on (needs a cgroup v2 hierarchy); the sidecar's log:\n{}",
        sidecar.log()
    );
    let (b1_name, b2_name, s1_name) = (
        b1.name().to_string(),
        b2.name().to_string(),
        s1.name().to_string(),
    );
    assert_eq!(b1.ping(&b2_name), "pong");
    assert_eq!(s1.ping(&b1_name), "pong");
    for (from, to) in [
        (&mut b1, &b2_name),
        (&mut b2, &b1_name),
        (&mut s1, &b1_name),
    ] {
        let r = from.send_blob(to, BLOB);
        assert_eq!(r.remote_size, BLOB, "{to} got every byte");
        assert_eq!(r.local_md5, r.remote_md5, "{to} got the bytes intact");
    }
    let r = b1.send_blob(&s1_name, BLOB);
    assert_eq!(r.local_md5, r.remote_md5, "s1 got the bytes intact");
    assert_eq!(b1.rpc_node(&b2_name), b2_name, "answered by b2");

    let text = metrics(b);
    let routed = |side| {
        metric_sum(
            &text,
            "distproxy_relay_node_routes_total",
            &[("side", side)],
        )
    };
    // Every relayed connection's acceptor is a local node (s1 → b1, and
    // s1 → b2 when `global` connects it); b1 → b2 (a same-pod mirror) has
    // a local initiator too.
    let connections = |direction| {
        metric_sum(
            &text,
            "distproxy_dist_connections_total",
            &[("direction", direction)],
        )
    };
    assert_eq!(connections("same_pod"), 1.0, "b1 → b2 in the pod:\n{text}");
    assert!(connections("inbound") >= 1.0, "s1 → b1:\n{text}");
    assert_eq!(routed("initiator"), 1.0, "{text}");
    assert_eq!(
        routed("acceptor"),
        connections("same_pod") + connections("inbound"),
        "{text}"
    );
    assert_eq!(
        metric_sum(
            &text,
            "distproxy_relay_connections_total",
            &[("path", "splice")]
        ),
        0.0,
        "nothing spliced:\n{text}"
    );
    // The routed bytes are counted from the target sockets (every 5 s).
    wait_until(Duration::from_secs(15), "the routed bytes counted", || {
        let text = metrics(b);
        let bytes = |node, dir| {
            metric_sum(
                &text,
                "distproxy_relayed_bytes_total",
                &[("node", node), ("direction", dir)],
            )
        };
        ["b1", "b2"]
            .iter()
            .all(|n| bytes(n, "rx") >= BLOB as f64 && bytes(n, "tx") >= BLOB as f64)
    });

    // b1 goes: its connections (from s1, to b2) end and are uncounted.
    b1.halt();
    let open = |node, direction| {
        metric_sum(
            &metrics(b),
            "distproxy_dist_connections_open",
            &[("node", node), ("direction", direction)],
        )
    };
    wait_until(Duration::from_secs(15), "b1's connections closed", || {
        open("b1", "inbound") == 0.0 && open("b2", "same_pod") == 0.0
    });
    assert_eq!(s1.ping(&b2_name), "pong", "b2 is still reachable");
    sidecar.assert_running();
}

/// The same pair with the sidecar started without CAP_BPF, CAP_NET_ADMIN
/// and CAP_SYS_ADMIN: it says the fast path is unavailable and splices.
#[test]
fn without_the_capabilities_it_falls_back_to_splice() {
    if !e2e_enabled(
        "without_the_capabilities_it_falls_back_to_splice",
        &["setpriv"],
    ) {
        return;
    }
    let lab = support::Lab::new(&["s", "b"]);
    let (s, b) = (lab.pod("s"), lab.pod("b"));
    let _epmd = s.spawn_stock_epmd();
    let drop_caps = [
        "setpriv",
        "--inh-caps=-all",
        "--bounding-set=-bpf,-net_admin,-sys_admin,-perfmon",
    ];
    let mut sidecar =
        b.spawn_sidecar_with(SidecarOptions::default().config(FAST).wrapped(&drop_caps));
    let mut s1 = s.spawn_erlang("s1");
    let mut b1 = b.spawn_erlang("b1");
    s1.wait_ready();
    b1.wait_ready();
    let b1_name = b1.name().to_string();
    let r = s1.send_blob(&b1_name, BLOB);
    assert_eq!(r.local_md5, r.remote_md5, "b1 got the bytes intact");

    let text = metrics(b);
    assert_eq!(
        metric_sum(&text, "distproxy_relay_fast_path_available", &[]),
        0.0
    );
    let on = |path| {
        metric_sum(
            &text,
            "distproxy_relay_connections_total",
            &[("path", path)],
        )
    };
    assert_eq!(on("sockmap"), 0.0, "{text}");
    assert!(on("splice") >= 1.0, "spliced:\n{text}");
    assert!(
        !sidecar
            .log_lines_containing("kernel fast path unavailable")
            .is_empty(),
        "the log says why:\n{}",
        sidecar.log()
    );
    sidecar.assert_running();
}
