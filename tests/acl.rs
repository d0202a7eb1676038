//! The distribution ACLs in process: a sidecar on `127.0.0.1:0` with fake
//! nodes, judged connections on the raw and preamble paths, and the rules
//! reloaded when the configuration file changes (polled), with an
//! established connection relayed throughout.

use std::time::Duration;

use distproxy_testkit::prelude::*;
use distproxy_testkit::sut::{acl, Config, Preamble};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config_file(dir: &std::path::Path, toml: &str) -> std::path::PathBuf {
    let path = dir.join("distproxy.toml");
    // Write then rename: the watcher never reads half a file.
    let tmp = dir.join("distproxy.toml.new");
    std::fs::write(&tmp, toml).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// A sidecar whose `[[acl]]` come from `toml`, watching the file.
fn sidecar_from(dir: &std::path::Path, toml: &str) -> distproxy_testkit::sut::Sidecar {
    let path = config_file(dir, toml);
    let mut config = test_config();
    let file = Config::load(&path).unwrap();
    config.acl = file.acl;
    config.dist.acl_default = file.dist.acl_default;
    config.dist.acl_reload_interval_ms = Millis(50);
    let sidecar = start(config);
    sidecar.watch_config(&path);
    sidecar
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dp-acl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A connection that got through echoes (the fake node echoes after its
/// challenge).
async fn echoes(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"ping"
    )
}

/// Dials the distribution port as `initiator`: `Some(stream)` if the node
/// answered, `None` if the sidecar closed it without a byte.
async fn try_dial(dist: std::net::SocketAddr, initiator: &str) -> Option<TcpStream> {
    let mut s = TcpStream::connect(dist).await.unwrap();
    s.write_all(&frames::send_name(initiator)).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    loop {
        if frames::parse_node_answer(&buf).is_some() {
            return Some(s);
        }
        match tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(_)) => {}
            Err(_) => panic!("neither answered nor closed"),
        }
    }
}

#[tokio::test]
async fn raw_connections_are_judged_and_a_file_change_flips_the_rules() {
    let dir = temp_dir("raw");
    let sidecar = sidecar_from(
        &dir,
        "[[acl]]\nname = \"no-x\"\naction = \"deny\"\ninitiator = \"x*\"\ntarget = \"n1\"\n",
    );
    let _pod = FakePod::start(epmd_addr(&sidecar), &["n1"]).await;
    let dist = dist_addr(&sidecar);

    assert!(try_dial(dist, "x1@peer").await.is_none(), "x1 is denied");
    let mut established = try_dial(dist, "ok1@peer").await.expect("ok1 is allowed");
    assert!(echoes(&mut established).await);

    // The file now denies ok1 and allows x*: picked up by polling.
    config_file(
        &dir,
        "[[acl]]\nname = \"no-ok\"\naction = \"deny\"\ninitiator = \"ok*\"\n",
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            try_dial(dist, "x1@peer").await.is_some()
        })
        .await,
        "the new rules allow x1"
    );
    assert!(
        try_dial(dist, "ok2@peer").await.is_none(),
        "ok* is denied now"
    );
    assert!(
        echoes(&mut established).await,
        "the established connection of ok1 is still relayed"
    );

    // A broken file keeps the rules in force.
    config_file(&dir, "[[acl]]\naction = \"deny\"\ntarget = \"n1@host\"\n");
    assert!(matches!(
        sidecar.acl.reload("test"),
        acl::ReloadOutcome::Failed(_)
    ));
    assert!(try_dial(dist, "ok3@peer").await.is_none());
    assert!(try_dial(dist, "x2@peer").await.is_some());
    sidecar.shutdown(Duration::from_millis(100)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn preamble_connections_are_judged_by_the_full_initiator_name() {
    let dir = temp_dir("preamble");
    let sidecar = sidecar_from(
        &dir,
        "[dist]\nacl_default = \"deny\"\n[[acl]]\naction = \"allow\"\ninitiator = \"*@pod-b.test\"\ntarget = \"n?\"\n",
    );
    let _pod = FakePod::start(epmd_addr(&sidecar), &["n1", "m1"]).await;
    let dist = dist_addr(&sidecar);
    let through = |target: &'static str, initiator: &'static str| async move {
        let mut s = TcpStream::connect(dist).await.unwrap();
        let mut out = bytes::BytesMut::new();
        Preamble::new(target, initiator).unwrap().encode(&mut out);
        out.extend_from_slice(&frames::send_name(initiator));
        s.write_all(&out).await.unwrap();
        let mut buf = bytes::BytesMut::new();
        loop {
            if let Some((name, _)) = frames::parse_node_answer(&buf) {
                return Some(name);
            }
            match tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) => panic!("neither answered nor closed"),
            }
        }
    };
    assert_eq!(
        through("n1@here", "b1@pod-b.test").await.as_deref(),
        Some("n1@fake.host")
    );
    assert_eq!(
        through("m1@here", "b1@pod-b.test").await,
        None,
        "m1 is not n?"
    );
    assert_eq!(
        through("n1@here", "c1@pod-c.test").await,
        None,
        "default deny"
    );
    sidecar.shutdown(Duration::from_millis(100)).await;
    let _ = std::fs::remove_dir_all(&dir);
}
