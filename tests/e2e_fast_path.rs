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
use support::otp::Otp;
use support::sidecar::SidecarOptions;
use support::wait::{poll_until, wait_until};

use support::fast_path::{BLOB, FAST};

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

/// Node routes with the host's OTP 25 nodes
/// ([`support::fast_path::node_routes_carry_local_nodes_messages`]; the
/// OTP release matrix runs the same with OTP 29).
#[test]
fn node_routes_carry_local_nodes_messages_past_the_sidecar() {
    if !e2e_enabled(
        "node_routes_carry_local_nodes_messages_past_the_sidecar",
        &[],
    ) {
        return;
    }
    support::fast_path::node_routes_carry_local_nodes_messages(Otp::V25);
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
