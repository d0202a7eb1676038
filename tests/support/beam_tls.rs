//! Nodes of OTP's own TLS distribution (`-proto_dist inet_tls
//! -ssl_dist_optfile F`): certificates made with rcgen, written with an
//! `ssl_dist_optfile` into the lab directory, and the options that start a
//! node with them.
//!
//! The files live in the lab directory, which a node of another release
//! sees at the same path inside its root filesystem (see `support::otp`),
//! so one set of options serves every release. Each certificate is used by
//! a pod's nodes as server and client, with `verify_peer` on both sides;
//! OTP's client checks the server's certificate against the host part of
//! the node name it dials (and sends it as SNI when it is a host name).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use distproxy_testkit::certs::{Ca, Leaf};

use super::beam::{BeamNode, ErlangOptions};
use super::lab::{Lab, Pod};
use super::metrics::{metric_sum, metrics};

/// The counter of BEAM TLS connections on the distribution port.
pub const BEAM_TLS: &str = "distproxy_dist_beam_tls_connections_total";

/// The options that start a node of `pod` with OTP's TLS distribution and
/// a certificate of `ca` for the pod: SANs its host name and address.
pub fn pod_tls(lab: &Lab, ca: &Ca, pod: &Pod) -> ErlangOptions {
    let addr = pod.addr().to_string();
    tls_options(
        lab,
        ca,
        &format!("pod-{}", pod.name()),
        &[pod.host(), &addr],
    )
}

/// Writes a certificate of `ca` with `sans`, its key, the CA and an
/// `ssl_dist_optfile` into the lab directory `beam-tls-<label>`, and returns
/// the options that start a node of OTP's TLS distribution with them.
pub fn tls_options(lab: &Lab, ca: &Ca, label: &str, sans: &[&str]) -> ErlangOptions {
    node_tls(lab, ca, label, &ca.leaf(sans, 0x5e00 + next_serial()))
}

/// Options for a node named by address (`short@198.18.0.12`), with a
/// certificate whose SAN is that address written as a DNS name: OTP 25
/// checks a node's host against DNS names only, so an IP SAN fails its
/// check (`hostname_check_failed`).
pub fn by_address_tls(lab: &Lab, ca: &Ca, pod: &Pod) -> ErlangOptions {
    let addr = pod.addr().to_string();
    let leaf = ca.leaf_with(&[&addr], 0x5e00 + next_serial(), |params| {
        let name = addr.clone().try_into().expect("an address as a DNS name");
        params.subject_alt_names = vec![rcgen::SanType::DnsName(name)];
    });
    node_tls(lab, ca, &format!("pod-{}-by-address", pod.name()), &leaf)
}

/// Writes `leaf` and an `ssl_dist_optfile` into `beam-tls-<label>` (see
/// [`tls_options`]).
pub fn node_tls(lab: &Lab, ca: &Ca, label: &str, leaf: &Leaf) -> ErlangOptions {
    // A directory of its own: the lab prints its top-level files on failure.
    let dir = lab.dir().join(format!("beam-tls-{label}"));
    std::fs::create_dir_all(&dir).expect("create the BEAM TLS directory");
    let optfile = write_optfile(&dir, leaf, &ca.pem);
    ErlangOptions {
        extra_args: vec![
            "-proto_dist".into(),
            "inet_tls".into(),
            "-ssl_dist_optfile".into(),
            optfile,
        ],
        ..Default::default()
    }
}

/// A new certificate serial number.
pub fn next_serial() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Writes `leaf`, its key and `ca_pem` into `dir`, and an
/// `ssl_dist_optfile` using them for both sides of a connection: the server
/// demands and checks the client's certificate, the client checks the
/// server's (against the host it dials, by default). Returns its path.
pub fn write_optfile(dir: &Path, leaf: &Leaf, ca_pem: &str) -> String {
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a BEAM TLS file");
        erlang_string(&path.to_string_lossy())
    };
    let (cert, key, ca) = (
        file("cert.pem", &leaf.cert_pem),
        file("key.pem", &leaf.key_pem),
        file("ca.pem", ca_pem),
    );
    let files = format!("{{certfile,{cert}}},{{keyfile,{key}}},{{cacertfile,{ca}}}");
    let text = format!(
        "[{{server,[{files},{{verify,verify_peer}},{{fail_if_no_peer_cert,true}}]}},\n \
         {{client,[{files},{{verify,verify_peer}}]}}].\n"
    );
    let path = dir.join("ssl_dist.conf");
    std::fs::write(&path, text).expect("write the ssl_dist_optfile");
    path.to_string_lossy().into_owned()
}

/// An Erlang string literal.
pub fn erlang_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Starts `short` in `pod` with `options` and waits until it is ready;
/// checks that it really runs OTP's TLS distribution.
pub fn start_tls_node(pod: &Pod, short: &str, options: &ErlangOptions) -> BeamNode {
    let mut node = pod.spawn_erlang_with(short, options);
    node.wait_ready();
    assert_runs_inet_tls(&mut node);
    node
}

/// Panics unless `node` was started with `-proto_dist inet_tls`.
pub fn assert_runs_inet_tls(node: &mut BeamNode) {
    let me = node.name().to_string();
    assert_eq!(
        node.rpc(&me, "init", "get_argument", "[proto_dist]"),
        "{ok,[[\"inet_tls\"]]}",
        "{me} runs inet_tls"
    );
}

/// `distproxy_dist_beam_tls_connections_total{outcome}` of `pod`'s sidecar.
pub fn beam_tls_count(pod: &Pod, outcome: &str) -> f64 {
    metric_sum(&metrics(pod), BEAM_TLS, &[("outcome", outcome)])
}

/// `from` reaches `to` over TLS distribution (pong, rpc answered by `to`),
/// and `pod`, the target's pod, counted the connection as routed BEAM TLS.
pub fn assert_routed_tls_hop(from: &mut BeamNode, to: &str, pod: &Pod, what: &str) {
    let before = beam_tls_count(pod, "routed");
    assert_eq!(from.ping(to), "pong", "{what}");
    assert_eq!(from.rpc_node(to), to, "{what}: rpc answered by {to}");
    let after = beam_tls_count(pod, "routed");
    assert!(
        after > before,
        "{what}: routed as BEAM TLS by pod {} ({before} -> {after})\n{}",
        pod.name(),
        metrics(pod)
    );
}
