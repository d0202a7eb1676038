//! `distproxy remsh`'s check through the forward (`remsh::probe`) against
//! an in-process sidecar with fake nodes: what each failure is reported as.

use std::time::Duration;

use distproxy_testkit::prelude::*;
use distproxy_testkit::sut::config::{AclAction, AclRuleConfig};
use distproxy_testkit::sut::remsh::probe::{check, ProbeError};

const STEP: Duration = Duration::from_secs(5);

#[tokio::test]
async fn the_probe_tells_routed_refused_and_unreachable_apart() {
    let mut config = test_config();
    config.acl = vec![AclRuleConfig {
        name: Some("no-intruders".into()),
        action: AclAction::Deny,
        initiator: "intruder-*".into(),
        target: "*".into(),
        identity: None,
    }];
    let sidecar = start(config);
    let _pod = FakePod::start(epmd_addr(&sidecar), &["n1"]).await;
    let via = dist_addr(&sidecar);

    // Routed, and the node answered as itself.
    check(via, "n1@fake.host", "remsh-1@127.0.0.1", None, STEP)
        .await
        .unwrap();
    // Not registered there.
    let e = check(via, "n9@fake.host", "remsh-1@127.0.0.1", None, STEP)
        .await
        .unwrap_err();
    assert!(matches!(e, ProbeError::Refused { .. }), "{e}");
    assert!(
        e.to_string().contains("n9@fake.host is not registered"),
        "{e}"
    );
    // Refused by the pod's ACL.
    let e = check(via, "n1@fake.host", "intruder-1@127.0.0.1", None, STEP)
        .await
        .unwrap_err();
    assert!(matches!(e, ProbeError::Refused { .. }), "{e}");
    // The route went to a node that calls itself otherwise.
    let e = check(via, "n1@other.host", "remsh-1@127.0.0.1", None, STEP)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ProbeError::WrongNode { ref answered, .. } if answered == "n1@fake.host"),
        "{e}"
    );
    sidecar.shutdown(Duration::from_millis(100)).await;

    // Nothing listens any more.
    let e = check(via, "n1@fake.host", "remsh-1@127.0.0.1", None, STEP)
        .await
        .unwrap_err();
    assert!(matches!(e, ProbeError::Unreachable { .. }), "{e}");
    assert!(
        e.to_string().contains("is the port forward running?"),
        "{e}"
    );
}

/// A pod whose sidecar refuses the client's certificate (another CA)
/// answers with an alert after the client's TLS 1.3 handshake is over: the
/// probe reports a TLS failure naming the reason, as docs/remsh.md says,
/// not "unexpected answer".
#[tokio::test]
async fn a_refused_client_certificate_is_reported_as_a_tls_failure() {
    use distproxy_testkit::certs::{Ca, SecretDir};
    use distproxy_testkit::sut::tls::{ServerNameVerification, Tls, TlsSettings};
    let ca = Ca::new("dp-remsh-ca");
    let other = Ca::new("dp-remsh-other-ca");
    let dir = tempfile::tempdir().unwrap();
    for sub in ["pod", "client"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    let pod_leaf = ca.leaf(&["fake.host"], 1);
    let pod_secret = SecretDir::create(
        &dir.path().join("pod"),
        &pod_leaf.cert_pem,
        &pod_leaf.key_pem,
        &ca.pem,
    );
    let mut config = test_config();
    config.tls.cert_file = Some(pod_secret.cert_file());
    config.tls.key_file = Some(pod_secret.key_file());
    config.tls.ca_file = Some(pod_secret.ca_file());
    let sidecar = start(config);
    let _pod = FakePod::start(epmd_addr(&sidecar), &["n1"]).await;
    let via = dist_addr(&sidecar);

    let client_leaf = other.leaf(&["remsh.local"], 2);
    let client_secret = SecretDir::create(
        &dir.path().join("client"),
        &client_leaf.cert_pem,
        &client_leaf.key_pem,
        &ca.pem,
    );
    let tls = Tls::load(TlsSettings {
        cert_file: client_secret.cert_file(),
        key_file: client_secret.key_file(),
        ca_file: client_secret.ca_file(),
        verify_server_name: ServerNameVerification::Hostname,
        handshake_timeout: STEP,
        reload_interval: Duration::from_secs(1),
        max_handshakes: 4,
        ipv6_source_prefix_len: 128,
    })
    .unwrap();
    let e = check(via, "n1@fake.host", "remsh-1@127.0.0.1", Some(&tls), STEP)
        .await
        .unwrap_err();
    assert!(matches!(e, ProbeError::Tls { .. }), "{e}");
    assert!(
        e.to_string().contains("did not complete the TLS handshake")
            && e.to_string().contains("unknown_ca"),
        "{e}"
    );
}
