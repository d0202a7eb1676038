//! The kernel fast path's scenarios that more than one test file runs
//! (`tests/e2e_fast_path.rs` with the host's OTP, the OTP release matrix
//! with other releases).

use std::time::Duration;

use super::metrics::{metric_sum, metrics};
use super::otp::Otp;
use super::sidecar::SidecarOptions;
use super::wait::wait_until;
use super::Lab;

/// The fast path's configuration section.
pub const FAST: &str = "[relay]\nfast_path = \"sockmap\"\n";
/// Bytes sent each way in the fast-path scenarios.
pub const BLOB: usize = 16 * 1024 * 1024;

/// Node routes: pod B's sidecar has the fast path with node routes for
/// its own cgroup (where the test starts the nodes) and proxies loopback
/// lookups, so b1 → b2 goes through it with both ends local, and s1 → b1
/// comes from another pod with the acceptor local. 16 MiB arrive intact
/// each way on both connections; the metrics say which ends were routed
/// and count the bytes, which the sidecar's sockets never received;
/// when b1 goes, both connections close and are uncounted. B's nodes run
/// OTP release `otp`, S's the host's.
pub fn node_routes_carry_local_nodes_messages(otp: Otp) {
    let lab = Lab::new(&["s", "b"]);
    let (s, b) = (lab.pod("s"), lab.pod("b"));
    b.set_otp(otp);
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
    b1.assert_release(otp);
    b2.assert_release(otp);
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
