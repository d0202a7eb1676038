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

/// Status line and body of `GET path` on the sidecar's admin port inside
/// `pod`, as a kubelet probe sees it; `None` when nothing answers.
fn probe(pod: &support::Pod, path: &str) -> Option<(u16, String)> {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{ADMIN_PORT} && \
         printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
    );
    let out = pod.run("bash", &["-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    Some((status, body.to_string()))
}

/// What Kubernetes' probes see through a sidecar's life, with real nodes:
/// `/readyz` waits for `admin.ready_nodes`, fails when such a node dies
/// and passes when it is back; on SIGTERM it fails at once (the pod
/// leaves the Service) while `/healthz` still passes (no restart during
/// the drain), an established connection keeps carrying rpc, a new one is
/// refused, and the sidecar exits 0 once `dist.shutdown_grace_ms` is over.
#[test]
fn probes_follow_a_sidecars_life_with_real_nodes() {
    if !e2e_enabled("probes_follow_a_sidecars_life_with_real_nodes", &[]) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let _sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar_with(
        SidecarOptions::default()
            .config("[admin]\nready_nodes = [\"b1\"]\n[dist]\nshutdown_grace_ms = 5000\n"),
    );
    let waiting = Some((503, "not ready: waiting for nodes b1".to_string()));
    assert_eq!(probe(b, "/readyz"), waiting);
    assert_eq!(probe(b, "/healthz"), Some((200, "ok".into())));

    let b1 = b.start_erlang("b1");
    assert_eq!(probe(b, "/readyz"), Some((200, "ready".into())));
    // A node of ready_nodes that dies makes the pod unready until it is back.
    b1.kill();
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            probe(b, "/readyz") == waiting
        }),
        "{:?}",
        probe(b, "/readyz")
    );
    let _b1 = b.start_erlang("b1");
    assert_eq!(probe(b, "/readyz"), Some((200, "ready".into())));

    let b1_name = b.node_name("b1");
    let mut a1 = a.start_erlang("a1");
    let mut a2 = a.start_erlang("a2");
    assert_eq!(a1.ping(&b1_name), "pong");
    sidecar_b.signal("TERM");
    assert!(
        poll_until(Duration::from_secs(2), Duration::from_millis(20), || {
            probe(b, "/readyz") == Some((503, "not ready: shutting down".into()))
        }),
        "readiness did not fail on SIGTERM: {:?}",
        probe(b, "/readyz")
    );
    assert_eq!(probe(b, "/healthz"), Some((200, "ok".into())));
    assert_eq!(a1.rpc_node(&b1_name), b1_name, "the drain cut a1 -> b1");
    assert_eq!(
        a2.ping(&b1_name),
        "pang",
        "a new connection during the drain"
    );
    let status = sidecar_b
        .wait_exit(Duration::from_secs(10))
        .expect("the sidecar did not exit after its grace period");
    assert_eq!(status.code(), Some(0), "{}", sidecar_b.log());
    assert_eq!(probe(b, "/healthz"), None, "nothing answers once it exited");
}
