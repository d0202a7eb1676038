//! Rollouts with real OTP nodes: a pod's sidecar restarted (SIGTERM and its
//! drain) while the nodes of another pod keep talking to the pod's nodes
//! through the mutual-TLS tunnel.
//!
//! Needs root, iproute2 and erlang-nox; fails saying so otherwise, unless
//! `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::time::Duration;

use distproxy_testkit::certs::{Ca, SecretDir};
use support::metrics::{metric_sum, metrics};
use support::module::{compile_module, with_module};
use support::sidecar::ADMIN_PORT;
use support::wait::poll_until;
use support::{e2e_enabled, Daemon, Lab, Pod, SidecarOptions};

/// `[tls]` with `require_tls` for `pod` (a certificate for its host name
/// and address, in a Secret-like directory of the lab), then `extra`.
fn tls_config(lab: &Lab, ca: &Ca, pod: &Pod, extra: &str) -> (String, SecretDir) {
    let serial = u64::from(pod.addr().octets()[3]);
    let leaf = ca.leaf(&[pod.host(), &pod.addr().to_string()], serial);
    let dir = lab.dir().join(format!("tls-{}", pod.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = SecretDir::create(&dir, &leaf.cert_pem, &leaf.key_pem, &ca.pem);
    let toml = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\nrequire_tls = true\n{extra}",
        secret.cert_file().display(),
        secret.key_file().display(),
        secret.ca_file().display(),
    );
    (toml, secret)
}

/// Log lines of `daemon` with every one of `needles`.
fn lines_with(daemon: &Daemon, needles: &[&str]) -> Vec<String> {
    daemon
        .log()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// Pod A's sidecar (TLS, state file) gets SIGTERM while b1 of pod B is
/// connected to a1 through the tunnel, as in a rollout of pod A's sidecar:
/// during the drain the established connection still carries rpc; at the
/// end of the grace period A closes it cleanly (TLS close_notify), logs it
/// (`stopped at shutdown`), and pod B's sidecar sees a closed connection,
/// not a truncated one. The restarted sidecar adopts a1 and a2 from its
/// state file, b1 reaches both at once, and both pods' gauges count the new
/// connections only.
#[test]
fn a_draining_tls_sidecar_closes_its_tunnels_cleanly_and_its_pod_is_reached_after_the_restart() {
    if !e2e_enabled(
        "a_draining_tls_sidecar_closes_its_tunnels_cleanly_and_its_pod_is_reached_after_the_restart",
        &[],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let opts = with_module(&compile_module(&lab));
    let ca = Ca::new("dp-e2e-ca");
    let state = lab.dir().join("pod-a-registry.json");
    let (config_a, _secret_a) = tls_config(
        &lab,
        &ca,
        a,
        &format!(
            "[epmd]\nstate_file = {:?}\nprobe_interval_ms = 500\n[dist]\nshutdown_grace_ms = 4000\n",
            state.display().to_string()
        ),
    );
    let (config_b, _secret_b) = tls_config(&lab, &ca, b, "");
    let mut sidecar_a = a.spawn_sidecar_with(SidecarOptions::default().config(&config_a));
    let mut sidecar_b = b.spawn_sidecar_with(SidecarOptions::default().config(&config_b));
    let mut a1 = a.spawn_erlang_with("a1", &opts);
    let mut a2 = a.spawn_erlang_with("a2", &opts);
    let mut b1 = b.spawn_erlang_with("b1", &opts);
    a1.wait_ready();
    a2.wait_ready();
    b1.wait_ready();
    let (a1_name, a2_name) = (a.node_name("a1"), a.node_name("a2"));
    assert_eq!(b1.ping(&a1_name), "pong");
    assert_eq!(b1.rpc_node(&a1_name), a1_name);

    sidecar_a.signal("TERM");
    sidecar_a.wait_log(
        "signal received; draining connections",
        1,
        Duration::from_secs(5),
    );
    // The drain: the established connection goes on carrying rpc.
    assert_eq!(b1.rpc_node(&a1_name), a1_name);
    let status = sidecar_a
        .wait_exit(Duration::from_secs(10))
        .expect("sidecar A did not exit after its grace period");
    assert_eq!(status.code(), Some(0), "{status}");
    let cut = lines_with(
        &sidecar_a,
        &[
            "distribution connection ended",
            "target=a1",
            "stopped at shutdown",
        ],
    );
    assert_eq!(cut.len(), 1, "{}", sidecar_a.log());
    // Pod B's side of the tunnel ended as a closed connection.
    assert!(
        poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
            !lines_with(&sidecar_b, &["tunnel connection ended", "target=a1@"]).is_empty()
        }),
        "{}",
        sidecar_b.log()
    );
    let ended = lines_with(&sidecar_b, &["tunnel connection ended", "target=a1@"]);
    assert!(
        ended.iter().all(|l| l.ends_with("outcome=closed")),
        "pod B saw the drained connection end badly: {ended:#?}"
    );

    // The new sidecar: a1 and a2 adopted from the state file, reachable at once.
    let _sidecar_a = a.spawn_sidecar_with(SidecarOptions::default().config(&config_a));
    let mut listed = String::new();
    let adopted = poll_until(Duration::from_secs(5), Duration::from_millis(50), || {
        listed = a.http_get(ADMIN_PORT, "/nodes");
        listed.contains("\"a1\"") && listed.contains("\"a2\"")
    });
    assert!(adopted, "{listed}");
    assert_eq!(b1.ping(&a1_name), "pong");
    assert_eq!(b1.ping(&a2_name), "pong");
    assert_eq!(b1.rpc_node(&a2_name), a2_name);
    // Only the two new connections are counted open, on both pods.
    for (pod, direction) in [(a, "inbound"), (b, "outbound")] {
        let counted = poll_until(Duration::from_secs(5), Duration::from_millis(100), || {
            metric_sum(
                &metrics(pod),
                "distproxy_dist_connections_open",
                &[("direction", direction)],
            ) == 2.0
        });
        assert!(counted, "pod {}:\n{}", pod.name(), metrics(pod));
    }
    assert_eq!(a2.ping(&b.node_name("b1")), "pong");
    sidecar_b.assert_no_misroute();
}

/// Mid-rollout, a pod whose sidecar has `[tls]` (not required yet) and
/// nodes with the helper module meets a pod still on the old
/// configuration, without `[tls]` (the upgrade done in the wrong order):
/// its nodes' tunnels to the old pod are refused at once (no handshake left
/// to time out), counted on both sides, and both logs say why; the old
/// pod's nodes still reach it, through their plaintext tunnel and through
/// plain distribution.
#[test]
fn a_tls_pod_meeting_a_pod_without_tls_fails_fast_and_says_why() {
    if !e2e_enabled(
        "a_tls_pod_meeting_a_pod_without_tls_fails_fast_and_says_why",
        &[],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let opts = with_module(&compile_module(&lab));
    let ca = Ca::new("dp-e2e-ca");
    let (config_a, _secret_a) = tls_config(&lab, &ca, a, "");
    let config_a = config_a.replace("require_tls = true", "require_tls = false");
    let sidecar_a = a.spawn_sidecar_with(SidecarOptions::default().config(&config_a));
    let sidecar_b = b.spawn_sidecar(&[]);
    let mut a1 = a.spawn_erlang_with("a1", &opts);
    let mut b1 = b.spawn_erlang_with("b1", &opts);
    let mut b2 = b.spawn_erlang("b2");
    a1.wait_ready();
    b1.wait_ready();
    b2.wait_ready();

    assert_eq!(a1.ping(&b.node_name("b1")), "pang");
    // Refused at once, not left to time out (which would count `timeout`).
    let ma = metrics(a);
    let failures = |reason| {
        metric_sum(
            &ma,
            "distproxy_tls_handshake_failures_total",
            &[("side", "connect"), ("reason", reason)],
        )
    };
    assert!(
        failures("protocol") >= 1.0 && failures("timeout") == 0.0,
        "{ma}"
    );
    let mb = metrics(b);
    assert!(
        metric_sum(
            &mb,
            "distproxy_connections_closed_total",
            &[("reason", "refused_by_policy")]
        ) >= 1.0,
        "{mb}"
    );
    sidecar_b.wait_log(
        "TLS connection on the distribution port, but [tls] is not configured",
        1,
        Duration::from_secs(5),
    );
    sidecar_a.wait_log(
        "the remote sidecar closed the TLS handshake; it may have no [tls]",
        1,
        Duration::from_secs(5),
    );

    // The old pod's nodes reach the new one (require_tls is off there).
    assert_eq!(b1.ping(&a.node_name("a1")), "pong");
    assert_eq!(b2.ping(&a.node_name("a1")), "pong");
    assert_eq!(b2.rpc_node(&a.node_name("a1")), a.node_name("a1"));
}
