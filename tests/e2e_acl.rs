//! End-to-end tests of the distribution ACLs (`[[acl]]`, `src/acl/`) with
//! real OTP nodes in the namespace lab: a denied pair gets `pang`, an
//! allowed pair `pong`, on the raw (correlated) path and on the tunnel's
//! preamble path; refusals are counted by rule and logged with it; a
//! SIGHUP reload flips the decisions without dropping an established
//! connection the new rules would refuse.
//!
//! Needs root, iproute2 and erlang-nox; fails saying so otherwise, unless
//! `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::time::Duration;

use support::beam::ErlangOptions;
use support::metrics::{metric_sum, metrics};
use support::module::{compile_module, with_module};
use support::{e2e_enabled, SidecarOptions};

/// Pod a's rules: b1 may not reach a1 (raw path: b runs stock nodes that
/// look a1 up in a's EPMD), nodes of pod c may not reach a2 (preamble path:
/// c's nodes use the module and c's sidecar). Everything else is allowed.
fn first_rules(b: &str, c: &str) -> String {
    format!(
        "[dist]\nacl_reload_interval_ms = 3600000\n\n\
         [[acl]]\nname = \"b1-not-to-a1\"\naction = \"deny\"\ninitiator = \"b1@{b}\"\ntarget = \"a1\"\n\n\
         [[acl]]\nname = \"c-not-to-a2\"\naction = \"deny\"\ninitiator = \"*@{c}\"\ntarget = \"a2\"\n"
    )
}

/// After the reload: only b2 is refused, towards a1.
fn second_rules() -> String {
    "[dist]\nacl_reload_interval_ms = 3600000\n\n\
     [[acl]]\nname = \"b2-not-to-a1\"\naction = \"deny\"\ninitiator = \"b2\"\ntarget = \"a1\"\n"
        .to_string()
}

/// No transitive meshing (`global`'s connect_all): every connection in
/// these tests is one the test asked for.
fn alone() -> ErlangOptions {
    ErlangOptions {
        extra_args: vec!["-connect_all".into(), "false".into()],
        ..Default::default()
    }
}

fn alone_with_module(ebin: &std::path::Path) -> ErlangOptions {
    let mut opts = with_module(ebin);
    opts.extra_args.extend(alone().extra_args);
    opts
}

#[test]
fn denied_pairs_get_pang_allowed_pairs_pong_and_a_reload_flips_them() {
    if !e2e_enabled(
        "denied_pairs_get_pang_allowed_pairs_pong_and_a_reload_flips_them",
        &[],
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b", "c"]);
    let (a, b, c) = (lab.pod("a"), lab.pod("b"), lab.pod("c"));
    let ebin = compile_module(&lab);
    let sidecar_a =
        a.spawn_sidecar_with(SidecarOptions::default().config(&first_rules(b.host(), c.host())));
    let _sidecar_b = b.spawn_sidecar(&[]);
    let _sidecar_c = c.spawn_sidecar(&[]);
    let mut a1 = a.spawn_erlang_with("a1", &alone());
    let mut a2 = a.spawn_erlang_with("a2", &alone());
    let mut b1 = b.spawn_erlang_with("b1", &alone());
    let mut b2 = b.spawn_erlang_with("b2", &alone());
    let mut c1 = c.spawn_erlang_with("c1", &alone_with_module(&ebin));
    for n in [&mut a1, &mut a2, &mut b1, &mut b2, &mut c1] {
        n.wait_ready();
    }
    let (a1n, a2n) = (a.node_name("a1"), a.node_name("a2"));

    // Raw path (correlated): b1 -> a1 refused, b2 -> a1 and b1 -> a2 allowed.
    assert_eq!(b1.ping(&a1n), "pang", "b1 -> a1 is denied");
    assert_eq!(b2.ping(&a1n), "pong", "b2 -> a1 is allowed");
    assert_eq!(b1.ping(&a2n), "pong", "b1 -> a2 is allowed");
    // Preamble path (c's nodes use the tunnel): c1 -> a2 refused, c1 -> a1 allowed.
    assert_eq!(c1.ping(&a2n), "pang", "c1 -> a2 is denied");
    assert_eq!(c1.ping(&a1n), "pong", "c1 -> a1 is allowed");
    // The refused ones were refused by the sidecar, not by the nodes: each
    // is logged with its rule and the path, and counted.
    sidecar_a.wait_log("rule=b1-not-to-a1", 1, Duration::from_secs(5));
    sidecar_a.wait_log("rule=c-not-to-a2", 1, Duration::from_secs(5));
    let refused = sidecar_a.log_lines_containing("refused by ACL rule");
    assert!(
        refused
            .iter()
            .any(|l| l.contains("path=\"raw\"") && l.contains("b1-not-to-a1")),
        "{refused:#?}"
    );
    assert!(
        refused
            .iter()
            .any(|l| l.contains("path=\"preamble\"") && l.contains("c-not-to-a2")),
        "{refused:#?}"
    );
    let text = metrics(a);
    let denied = |rule: &str| metric_sum(&text, "distproxy_acl_denied_total", &[("rule", rule)]);
    assert!(denied("b1-not-to-a1") >= 1.0, "{text}");
    assert!(denied("c-not-to-a2") >= 1.0, "{text}");
    assert_eq!(denied("default"), 0.0, "default allow refuses nothing");
    let by_policy = metric_sum(
        &text,
        "distproxy_connections_closed_total",
        &[("reason", "refused_by_policy")],
    );
    assert!(by_policy >= 2.0, "refused_by_policy {by_policy}\n{text}");
    assert_eq!(metric_sum(&text, "distproxy_acl_rules", &[]), 2.0);
    // Nothing refused reached a node.
    assert!(!a1.nodes().contains(&b.node_name("b1")));
    assert!(!a2.nodes().contains(&c.node_name("c1")));

    // Reload on SIGHUP: now only b2 -> a1 is refused.
    let config = sidecar_a
        .config_path()
        .expect("a config file")
        .to_path_buf();
    std::fs::write(&config, second_rules()).unwrap();
    sidecar_a.signal("HUP");
    sidecar_a.wait_log("ACL rules reloaded", 1, Duration::from_secs(10));
    assert!(sidecar_a.log_lines_containing("trigger=\"SIGHUP\"").len() == 1);
    assert_eq!(
        b1.ping(&a1n),
        "pong",
        "b1 -> a1 is allowed after the reload"
    );
    assert_eq!(
        c1.ping(&a2n),
        "pong",
        "c1 -> a2 is allowed after the reload"
    );
    // b2 <-> a1 was established before: the reload does not drop it.
    assert!(b2.nodes().contains(&a1n), "b2 still connected to a1");
    assert_eq!(
        b2.rpc_node(&a1n),
        a1n,
        "the established connection still works"
    );
    // A new connection of that pair is refused.
    let b2n = b.node_name("b2");
    assert_eq!(
        b2.rpc(&b2n, "erlang", "disconnect_node", &format!("['{a1n}']")),
        "true"
    );
    assert_eq!(b2.ping(&a1n), "pang", "b2 -> a1 is denied after the reload");
    sidecar_a.wait_log("rule=b2-not-to-a1", 1, Duration::from_secs(5));
    let text = metrics(a);
    assert_eq!(metric_sum(&text, "distproxy_acl_reloads_total", &[]), 1.0);
    assert_eq!(metric_sum(&text, "distproxy_acl_rules", &[]), 1.0);

    // A file that does not validate keeps the rules in force.
    std::fs::write(
        &config,
        "[[acl]]\naction = \"deny\"\ninitiator = \"has space\"\n",
    )
    .unwrap();
    sidecar_a.signal("HUP");
    sidecar_a.wait_log("cannot reload ACL rules", 1, Duration::from_secs(10));
    assert_eq!(b1.ping(&a2n), "pong", "the previous rules stay in force");
    let text = metrics(a);
    assert_eq!(
        metric_sum(&text, "distproxy_acl_reload_failures_total", &[]),
        1.0
    );
}

/// `dist.acl_default = "deny"` with one allow rule: only the allowed pair
/// connects, and every other attempt is counted against `default`.
#[test]
fn default_deny_lets_only_allowed_pairs_through() {
    if !e2e_enabled("default_deny_lets_only_allowed_pairs_through", &[]) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let toml = "[dist]\nacl_default = \"deny\"\n\n[[acl]]\nname = \"b1-only\"\naction = \"allow\"\ninitiator = \"b1\"\n";
    let sidecar_a = a.spawn_sidecar_with(SidecarOptions::default().config(toml));
    let _sidecar_b = b.spawn_sidecar(&[]);
    let mut a1 = a.spawn_erlang_with("a1", &alone());
    let mut b1 = b.spawn_erlang_with("b1", &alone());
    let mut b2 = b.spawn_erlang_with("b2", &alone());
    for n in [&mut a1, &mut b1, &mut b2] {
        n.wait_ready();
    }
    let a1n = a.node_name("a1");
    assert_eq!(b2.ping(&a1n), "pang");
    assert_eq!(b1.ping(&a1n), "pong");
    sidecar_a.wait_log("rule=default", 1, Duration::from_secs(5));
    let text = metrics(a);
    assert!(metric_sum(&text, "distproxy_acl_denied_total", &[("rule", "default")]) >= 1.0);
    assert_eq!(
        metric_sum(&text, "distproxy_acl_denied_total", &[("rule", "b1-only")]),
        0.0
    );
    assert_eq!(a1.nodes(), vec![b.node_name("b1")]);
}

/// Between sidecars over mutual TLS, rules by certificate identity: pod a
/// admits pod b's certificate and refuses everyone else by default, so
/// b1 gets `pong` and c1 (same CA, pod c's certificate) `pang`; the
/// refusal is on the TLS path, counted against `default`.
#[test]
fn identity_rules_judge_the_peer_sidecars_certificate() {
    if !e2e_enabled("identity_rules_judge_the_peer_sidecars_certificate", &[]) {
        return;
    }
    use distproxy_testkit::certs::{Ca, SecretDir};
    let lab = support::Lab::new(&["a", "b", "c"]);
    let ebin = compile_module(&lab);
    let ca = Ca::new("dp-acl-ca");
    let tls_config = |pod: &support::Pod, serial: u64, extra: &str| {
        let leaf = ca.leaf(&[pod.host(), &pod.addr().to_string()], serial);
        let dir = lab.dir().join(format!("tls-{}", pod.name()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = SecretDir::create(&dir, &leaf.cert_pem, &leaf.key_pem, &ca.pem);
        format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n\
             require_tls = true\nbind_node_names = true\n{extra}",
            secret.cert_file().display(),
            secret.key_file().display(),
            secret.ca_file().display(),
        )
    };
    let (a, b, c) = (lab.pod("a"), lab.pod("b"), lab.pod("c"));
    let rules = format!(
        "\n[dist]\nacl_default = \"deny\"\n\n\
         [[acl]]\nname = \"pod-b-cert\"\naction = \"allow\"\nidentity = \"{}\"\n",
        b.host()
    );
    let sidecar_a =
        a.spawn_sidecar_with(SidecarOptions::default().config(&tls_config(a, 1, &rules)));
    let _sidecar_b = b.spawn_sidecar_with(SidecarOptions::default().config(&tls_config(b, 2, "")));
    let _sidecar_c = c.spawn_sidecar_with(SidecarOptions::default().config(&tls_config(c, 3, "")));
    let opts = alone_with_module(&ebin);
    let mut a1 = a.spawn_erlang_with("a1", &opts);
    let mut b1 = b.spawn_erlang_with("b1", &opts);
    let mut c1 = c.spawn_erlang_with("c1", &opts);
    for n in [&mut a1, &mut b1, &mut c1] {
        n.wait_ready();
    }
    let a1n = a.node_name("a1");
    assert_eq!(b1.ping(&a1n), "pong", "pod b's certificate is admitted");
    assert_eq!(c1.ping(&a1n), "pang", "pod c's certificate is not");
    sidecar_a.wait_log("rule=default", 1, Duration::from_secs(5));
    let refused = sidecar_a.log_lines_containing("refused by ACL rule");
    assert!(
        refused.iter().any(|l| l.contains("path=\"tls\"")
            && l.contains(c.host())
            && l.contains("rule=default")),
        "{refused:#?}"
    );
    let routed = sidecar_a.log_lines_containing("tunnel connection routed by preamble");
    assert!(
        routed
            .iter()
            .any(|l| l.contains("transport=\"tls\"") && l.contains(&b.node_name("b1"))),
        "{routed:#?}"
    );
    let text = metrics(a);
    assert!(metric_sum(&text, "distproxy_acl_denied_total", &[("rule", "default")]) >= 1.0);
    assert_eq!(a1.nodes(), vec![b.node_name("b1")]);
}

/// A same-pod mirror listener (`distribution::mirror`) listens on the pod
/// address, so another pod can reach it: a node of pod b that dials a2's
/// port on pod a's address directly (`-erl_epmd_port`, no lookup) must not
/// get past the rules that refuse it on the distribution port. Nodes of pod
/// a keep using the mirror.
#[test]
fn a_same_pod_mirror_refuses_other_pods() {
    if !e2e_enabled("a_same_pod_mirror_refuses_other_pods", &[]) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let rules = format!(
        "[[acl]]\nname = \"b-not-to-a2\"\naction = \"deny\"\ninitiator = \"*@{}\"\ntarget = \"a2\"\n",
        b.host()
    );
    let sidecar_a = a.spawn_sidecar_with(SidecarOptions::default().config(&rules));
    let _sidecar_b = b.spawn_sidecar(&[]);
    let mut a1 = a.spawn_erlang_with("a1", &alone());
    let mut a2 = a.spawn_erlang_with("a2", &alone());
    for n in [&mut a1, &mut a2] {
        n.wait_ready();
    }
    let a2n = a.node_name("a2");
    // a1 -> a2 by the pod's name: answered with a2's own port, served by a
    // mirror listener on pod a's address.
    assert_eq!(a1.ping(&a2n), "pong", "same-pod a1 -> a2");
    sidecar_a.wait_log("same-pod mirror listener opened", 1, Duration::from_secs(5));
    let names = a.epmd_names();
    let a2_port = names
        .lines()
        .find_map(|l| l.strip_prefix("name a2 at port "))
        .unwrap_or_else(|| panic!("a2 in `epmd -names`: {names}"))
        .trim()
        .to_string();

    // b1 through the distribution port: refused by the rule.
    let mut b1 = b.spawn_erlang_with("b1", &alone());
    b1.wait_ready();
    assert_eq!(b1.ping(&a2n), "pang", "b1 -> a2 is denied");
    // b3 dials a2's port on pod a's address, where the mirror listens.
    let mut direct = alone();
    direct.extra_args.extend(["-erl_epmd_port".into(), a2_port]);
    let mut b3 = b.spawn_erlang_with("b3", &direct);
    b3.wait_ready();
    assert_eq!(
        b3.ping(&a2n),
        "pang",
        "b3 reached a2 through the same-pod mirror"
    );
    sidecar_a.wait_log(
        "same-pod mirror: connection from another host refused",
        1,
        Duration::from_secs(5),
    );
    assert!(
        !a2.nodes().iter().any(|n| n.ends_with(b.host())),
        "{:?}",
        a2.nodes()
    );
    let text = metrics(a);
    assert!(
        metric_sum(
            &text,
            "distproxy_connections_closed_total",
            &[("reason", "refused_by_policy")]
        ) >= 2.0,
        "{text}"
    );
    // The pod's own nodes still use the mirror.
    let a1n = a.node_name("a1");
    assert_eq!(
        a1.rpc(&a1n, "erlang", "disconnect_node", &format!("['{a2n}']")),
        "true"
    );
    assert_eq!(a1.ping(&a2n), "pong", "same-pod a1 -> a2 again");
}
