//! Operating distproxy with real OTP nodes: registrations survive a
//! `kill -9` of the sidecar through the state file.
//!
//! Needs root, iproute2 and erlang-nox; fails saying so otherwise, unless
//! `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::time::Duration;

use support::sidecar::ADMIN_PORT;
use support::wait::poll_until;
use support::{e2e_enabled, SidecarOptions};

/// OTP's EPMD client registers once and never again: after a stock EPMD
/// restart the pod's nodes are unreachable. With a state file they are not.
#[test]
fn registrations_survive_a_sidecar_kill_9() {
    if !e2e_enabled("registrations_survive_a_sidecar_kill_9", &[]) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let state = lab.dir().join("pod-a-registry.json");
    let config = format!(
        "[epmd]\nstate_file = {:?}\nprobe_interval_ms = 500\n",
        state.display().to_string()
    );
    let mut sidecar_a = a.spawn_sidecar_with(SidecarOptions::default().config(&config));
    let _sidecar_b = b.spawn_sidecar(&[]);

    let mut a1 = a.start_erlang("a1");
    let mut a2 = a.start_erlang("a2");
    let mut b1 = b.start_erlang("b1");
    let mut b2 = b.start_erlang("b2");
    let (a1_name, a2_name) = (a.node_name("a1"), a.node_name("a2"));

    // Two nodes of pod A connected to a node of pod B.
    assert_eq!(a1.ping(&b.node_name("b1")), "pong");
    assert_eq!(a2.ping(&b.node_name("b1")), "pong");
    let state_text = std::fs::read_to_string(&state).expect("state file written");
    assert!(
        state_text.contains("\"a1\"") && state_text.contains("\"a2\""),
        "{state_text}"
    );

    // kill -9 the sidecar; the nodes keep running and never re-register.
    sidecar_a.stop();
    let restarted = a.spawn_sidecar_with(SidecarOptions::default().config(&config));
    let adopted = a.http_get(ADMIN_PORT, "/nodes");
    assert!(adopted.contains("\"adopted\": true"), "{adopted}");

    // A node of pod B that was not connected before reaches both (fresh
    // lookups and connections through the restarted sidecar).
    assert!(b2.nodes().is_empty(), "b2 already connected");
    assert_eq!(
        b2.ping(&a1_name),
        "pong",
        "a1 unreachable after restart\n{}",
        restarted.log()
    );
    assert_eq!(
        b2.ping(&a2_name),
        "pong",
        "a2 unreachable after restart\n{}",
        restarted.log()
    );
    assert_eq!(b2.rpc_node(&a2_name), a2_name);

    // Stop a2: its adopted entry is dropped within the probe interval...
    let a2_creation = a2.creation();
    a2.halt();
    let mut names = Vec::new();
    let dropped = poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
        names = b1.names(a.host()).unwrap_or_default();
        !names.iter().any(|(n, _)| n == "a2")
    });
    assert!(dropped, "a2 still listed {:?} after it stopped", names);
    // ...and its name can be registered again, with a new creation.
    let mut a2_again = a.start_erlang("a2");
    assert_ne!(a2_again.creation(), a2_creation);
    assert_eq!(b1.ping(&a2_name), "pong");
    assert_eq!(b1.rpc_node(&a2_name), a2_name);
    assert_eq!(a1.ping(&b.node_name("b2")), "pong");
    drop(a2_again.nodes());
}
