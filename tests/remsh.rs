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
