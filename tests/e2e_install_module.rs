//! The helper module as the manifests deploy it: `distproxy install-module
//! DIR` writes the `.beam` the binary carries, and a node whose only
//! distproxy setting is `ERL_FLAGS="-pa DIR -epmd_module distproxy_epmd"`
//! (besides the flags every node here gets) sends its connections through
//! the sidecar's tunnel. Also: the committed `.beam` is the compiled source.
//!
//! Needs root, iproute2 and erlang-nox (OTP 25, whose `erlc` compiled the
//! committed `.beam`); fails saying so otherwise, unless
//! `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::process::{Command, Stdio};

use support::beam::ErlangOptions;
use support::metrics::{metric_sum, metrics};
use support::module::{install_module, MODULE_SRC};
use support::{e2e_enabled, Lab};

const COMMITTED_BEAM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/erlang/distproxy_epmd.beam"
);

/// The OTP release of the host's `erl`.
fn host_otp_release() -> String {
    let out = Command::new("erl")
        .args([
            "-noshell",
            "-eval",
            "io:put_chars(erlang:system_info(otp_release)), halt().",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run erl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `deploy/erlang/distproxy_epmd.beam` (what the binary embeds) is
/// byte for byte what OTP 25's `erlc +deterministic` makes of the source:
/// an edit of the `.erl` without recompiling fails here.
#[test]
fn committed_beam_is_the_compiled_source() {
    if !e2e_enabled("committed_beam_is_the_compiled_source", &["erlc"]) {
        return;
    }
    let release = host_otp_release();
    assert_eq!(
        release, "25",
        "the committed .beam is compiled by OTP 25 (the oldest supported release); \
         this host's erlc is OTP {release}, so it cannot check it"
    );
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .args([
            "-k",
            "2",
            "60",
            "erlc",
            "+deterministic",
            "+warnings_as_errors",
            "-o",
        ])
        .arg(out_dir.path())
        .arg(MODULE_SRC)
        .stdin(Stdio::null())
        .output()
        .expect("run erlc");
    assert!(
        out.status.success(),
        "erlc failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let compiled = std::fs::read(out_dir.path().join("distproxy_epmd.beam")).unwrap();
    let committed = std::fs::read(COMMITTED_BEAM).unwrap();
    assert!(
        compiled == committed,
        "deploy/erlang/distproxy_epmd.beam is not the compiled source; regenerate it with\n  \
         erlc +deterministic +warnings_as_errors -o deploy/erlang deploy/erlang/distproxy_epmd.erl\n\
         (OTP 25) and commit it"
    );
}

/// Pods A and B with sidecars (tunnel egress on by default). The module is
/// installed with `distproxy install-module`; a1 gets it through
/// `ERL_FLAGS` alone, b1 is a plain node. a1 reaches b1 through the
/// tunnel: pod A's sidecar answered its egress request and pod B's routed
/// the connection by preamble, with no EPMD lookup and no correlation. b1
/// reaches a2 (plain) by correlation as before.
#[test]
fn a_node_with_only_erl_flags_uses_the_installed_module() {
    if !e2e_enabled("a_node_with_only_erl_flags_uses_the_installed_module", &[]) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let dir = install_module(&lab);
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar(&[]);
    let release_style = ErlangOptions {
        env: vec![(
            "ERL_FLAGS".into(),
            format!("-pa {} -epmd_module distproxy_epmd", dir.display()),
        )],
        ..Default::default()
    };
    let mut a1 = a.spawn_erlang_with("a1", &release_style);
    let mut b1 = b.spawn_erlang("b1");
    for node in [&mut a1, &mut b1] {
        node.wait_ready();
    }
    let (a1_name, b1_name) = (a1.name().to_string(), b1.name().to_string());
    assert_eq!(
        a1.rpc(&a1_name, "net_kernel", "epmd_module", "[]"),
        "distproxy_epmd",
        "a1 loaded the installed module"
    );
    let loaded_from = a1.rpc(&a1_name, "code", "which", "[distproxy_epmd]");
    assert!(
        loaded_from.contains(&dir.join("distproxy_epmd.beam").display().to_string()),
        "a1 loaded {loaded_from}, not the installed file"
    );

    assert_eq!(a1.ping(&b1_name), "pong", "a1 -> b1 through the tunnel");
    let (ma, mb) = (metrics(a), metrics(b));
    let egress_ok = metric_sum(
        &ma,
        "distproxy_epmd_requests_total",
        &[("type", "egress"), ("result", "ok")],
    );
    assert!(
        egress_ok >= 1.0,
        "pod A's sidecar answered a1's egress request:\n{ma}"
    );
    assert!(
        metric_sum(
            &ma,
            "distproxy_dist_connections_total",
            &[("direction", "outbound")]
        ) >= 1.0,
        "pod A's sidecar carried a1's connection out:\n{ma}"
    );
    assert!(
        metric_sum(&mb, "distproxy_routes_total", &[("method", "preamble")]) >= 1.0,
        "pod B's sidecar routed a1's connection by preamble:\n{mb}"
    );
    assert_eq!(
        metric_sum(
            &mb,
            "distproxy_epmd_requests_total",
            &[("type", "port_please2")]
        ),
        0.0,
        "a1 made no EPMD lookup in pod B"
    );
    assert_eq!(
        metric_sum(&mb, "distproxy_routes_total", &[("method", "correlated")]),
        0.0,
        "nothing correlated in pod B"
    );

    // A plain node in the same cluster still works by correlation.
    let mut a2 = a.spawn_erlang("a2");
    a2.wait_ready();
    let a2_name = a2.name().to_string();
    assert_eq!(b1.ping(&a2_name), "pong", "b1 -> a2 by correlation");
    let ma = metrics(a);
    assert!(
        metric_sum(&ma, "distproxy_routes_total", &[("method", "correlated")]) >= 1.0,
        "b1 -> a2 routed by correlation in pod A:\n{ma}"
    );
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}
