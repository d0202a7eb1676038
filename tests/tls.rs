//! Mutual TLS between sidecars (`src/tunnel/tls.rs`) over real loopback
//! sockets, with certificates made here (rcgen) and written like a mounted
//! Kubernetes Secret (symlinks through `..data`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use distproxy_testkit::certs::{Ca, Leaf, SecretDir};
use distproxy_testkit::sut::metrics::tls_reason;
use distproxy_testkit::sut::tls::{
    check_node_binding, classify_io_error, BindingError, PeerIdentity, ReloadOutcome,
    ServerNameVerification, Tls, TlsError, TlsSettings,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

const POD_A: &str = "pod-a.dp.test";
const POD_B: &str = "pod-b.dp.test";

/// One pod's certificate files and loaded TLS.
struct Pod {
    _tmp: tempfile::TempDir,
    secret: SecretDir,
    tls: Arc<Tls>,
}

fn settings(secret: &SecretDir, verify: ServerNameVerification) -> TlsSettings {
    TlsSettings {
        cert_file: secret.cert_file(),
        key_file: secret.key_file(),
        ca_file: secret.ca_file(),
        verify_server_name: verify,
        handshake_timeout: Duration::from_secs(5),
        reload_interval: Duration::from_millis(50),
        max_handshakes: 2,
        ipv6_source_prefix_len: 128,
    }
}

fn pod(ca: &Ca, leaf: &Leaf, verify: ServerNameVerification) -> Pod {
    pod_trusting(&ca.pem, leaf, verify)
}

/// A pod with `max_handshakes` TLS handshake slots (hostname verification).
fn pod_with_slots(ca: &Ca, leaf: &Leaf, max_handshakes: usize) -> Pod {
    let tmp = tempfile::tempdir().unwrap();
    let secret = SecretDir::create(tmp.path(), &leaf.cert_pem, &leaf.key_pem, &ca.pem);
    let tls = Tls::load(TlsSettings {
        max_handshakes,
        ..settings(&secret, ServerNameVerification::Hostname)
    })
    .unwrap();
    Pod {
        _tmp: tmp,
        secret,
        tls,
    }
}

fn pod_trusting(ca_pem: &str, leaf: &Leaf, verify: ServerNameVerification) -> Pod {
    let tmp = tempfile::tempdir().unwrap();
    let secret = SecretDir::create(tmp.path(), &leaf.cert_pem, &leaf.key_pem, ca_pem);
    let tls = Tls::load(settings(&secret, verify)).unwrap();
    Pod {
        _tmp: tmp,
        secret,
        tls,
    }
}

/// Accepts one TCP connection and runs the server handshake on it; on
/// success, echoes what it reads until the client closes.
async fn serve_once(
    tls: Arc<Tls>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<PeerIdentity, TlsError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut stream, identity) = tls.accept(tcp).await?;
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(identity)
    });
    (addr, task)
}

async fn dial(
    tls: &Tls,
    addr: std::net::SocketAddr,
    name: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TlsError> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tls.connect(tcp, name).await
}

/// Writes `msg` and expects it echoed back.
async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &[u8],
) -> std::io::Result<()> {
    stream.write_all(msg).await?;
    stream.flush().await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::other("echo timed out"))??;
    assert_eq!(back, msg);
    Ok(())
}

/// The identity of the server as the client saw it.
fn server_identity(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> PeerIdentity {
    PeerIdentity::of_peer(stream.get_ref().1)
        .expect("server presented a certificate")
        .unwrap()
}

/// After a successful client handshake, the server's verdict on our
/// certificate arrives with the first read (TLS 1.3): the reason it gives.
async fn refusal_seen_by_client(
    mut stream: tokio_rustls::client::TlsStream<TcpStream>,
) -> &'static str {
    let _ = stream.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
        Ok(Err(e)) => classify_io_error(&e),
        Ok(Ok(n)) => panic!("server accepted a refused client: read {n} bytes"),
        Err(_) => panic!("no verdict from the server"),
    }
}

fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("install recorder")
    })
}

/// Value of a counter with the given labels in the Prometheus text, 0 if absent.
fn counter(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn mutual_handshake_over_loopback() {
    let ca = Ca::new("dp-test-ca");
    let a_leaf = ca.leaf(&[POD_A], 0x0a01);
    let b_leaf = ca.leaf(&[POD_B, "10.99.0.2"], 0x0b01);
    let a = pod(&ca, &a_leaf, ServerNameVerification::Hostname);
    let b = pod(&ca, &b_leaf, ServerNameVerification::Hostname);

    let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
    let mut client = dial(&b.tls, addr, POD_A).await.expect("client handshake");
    echo(&mut client, b"distribution bytes").await.unwrap();
    let seen_by_server = server.await.unwrap().expect("server handshake");
    assert_eq!(seen_by_server.dns_names, vec![POD_B.to_string()]);
    assert_eq!(
        seen_by_server.ip_addrs,
        vec!["10.99.0.2".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(seen_by_server.serial, b_leaf.serial_string());
    let seen_by_client = server_identity(&client);
    assert_eq!(seen_by_client.dns_names, vec![POD_A.to_string()]);
    assert_eq!(seen_by_client.serial, a_leaf.serial_string());
    assert_eq!(a.tls.local_identity().serial, a_leaf.serial_string());

    let (_, conn) = client.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

/// Stalled handshakes never hold more than `max_handshakes` slots (2 here),
/// and a slot frees when its handshake ends: a third peer completes once a
/// stalled one is gone.
#[tokio::test]
async fn handshakes_in_flight_are_bounded() {
    let ca = Ca::new("dp-test-ca");
    let a = pod(&ca, &ca.leaf(&[POD_A], 1), ServerNameVerification::Hostname);
    let b = pod(&ca, &ca.leaf(&[POD_B], 2), ServerNameVerification::Hostname);
    // Three silent "clients": duplex pipes nobody writes to.
    let mut stalled = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..3 {
        let (ours, theirs) = tokio::io::duplex(1024);
        let tls = Arc::clone(&a.tls);
        stalled.push(tokio::spawn(
            async move { tls.accept(ours).await.map(|_| ()) },
        ));
        peers.push(theirs);
    }
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        a.tls.handshakes_in_flight(),
        2,
        "the third waits for a slot"
    );
    // A real handshake now waits too; ending one stalled handshake frees a
    // slot for the waiting ones.
    let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
    let client = tokio::spawn({
        let tls = Arc::clone(&b.tls);
        async move { dial(&tls, addr, POD_A).await.map(|_| ()) }
    });
    stalled.remove(0).abort();
    drop(peers.remove(0));
    stalled.remove(0).abort();
    drop(peers.remove(0));
    client
        .await
        .unwrap()
        .expect("client handshake once slots free");
    server
        .await
        .unwrap()
        .expect("server handshake once slots free");
    assert!(a.tls.handshakes_in_flight() <= 2);
}

/// Incoming handshakes that stall in every slot (from any number of
/// addresses) never hold up this sidecar's own outgoing ones: they have
/// slots of their own.
#[tokio::test]
async fn stalled_incoming_handshakes_do_not_hold_up_outgoing_ones() {
    let ca = Ca::new("dp-test-ca");
    let a = pod(&ca, &ca.leaf(&[POD_A], 1), ServerNameVerification::Hostname);
    let b = pod(&ca, &ca.leaf(&[POD_B], 2), ServerNameVerification::Hostname);
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let (ours, theirs) = tokio::io::duplex(1024);
        let tls = Arc::clone(&a.tls);
        stalled.push((
            tokio::spawn(async move { tls.accept(ours).await.map(|_| ()) }),
            theirs,
        ));
    }
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(a.tls.handshakes_in_flight(), 2, "every incoming slot held");
    let (addr, server) = serve_once(Arc::clone(&b.tls)).await;
    let dialled = tokio::time::timeout(Duration::from_secs(2), dial(&a.tls, addr, POD_B))
        .await
        .expect("the outgoing handshake waited for the stalled incoming ones");
    dialled.expect("outgoing handshake");
    server.await.unwrap().expect("server side");
    assert_eq!(a.tls.handshakes_in_flight(), 2, "still held");
}

/// A peer that opens as many TLS connections as there are slots and stalls
/// each one mid-handshake (slowloris) holds only its address's share: other
/// pods' handshakes still complete at once, not after the stalled ones'
/// deadline. Its own further handshakes queue behind its share.
#[tokio::test]
async fn stalled_handshakes_from_one_address_leave_slots_for_others() {
    use distproxy_testkit::sut::tls::per_source_share;
    let ca = Ca::new("dp-test-ca");
    let pod_a = pod_with_slots(&ca, &ca.leaf(&[POD_A], 1), 8);
    let a = Arc::clone(&pod_a.tls);
    let b = pod(&ca, &ca.leaf(&[POD_B], 2), ServerNameVerification::Hostname);
    let attacker: std::net::IpAddr = "198.18.0.66".parse().unwrap();
    let share = per_source_share(8);
    assert_eq!(share, 2);
    let mut stalled = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..8 {
        let (ours, theirs) = tokio::io::duplex(1024);
        let tls = Arc::clone(&a);
        stalled.push(tokio::spawn(async move {
            tls.accept_from(ours, attacker).await.map(|_| ())
        }));
        peers.push(theirs);
    }
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        a.handshakes_in_flight(),
        share,
        "one address holds its share only"
    );
    assert_eq!(a.handshake_sources(), 1);
    // Another pod's sidecar handshakes at once (well within the 5 s deadline
    // the stalled ones hold their slots for).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn({
        let tls = Arc::clone(&a);
        async move {
            let (tcp, _) = listener.accept().await.unwrap();
            tls.accept_from(tcp, "198.18.0.2".parse().unwrap())
                .await
                .map(|(_, identity)| identity)
        }
    });
    let started = std::time::Instant::now();
    let client = dial(&b.tls, addr, POD_A).await;
    let identity = server.await.unwrap().expect("other pod's handshake");
    assert!(client.is_ok(), "{:?}", client.err());
    assert!(identity.to_string().contains(POD_B), "{identity}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited {:?} behind stalled handshakes",
        started.elapsed()
    );
    // Ending the attacker's handshakes forgets the address.
    for task in &stalled {
        task.abort();
    }
    for task in stalled {
        let _ = task.await;
    }
    drop(peers);
    assert_eq!(a.handshakes_in_flight(), 0);
    assert_eq!(a.handshake_sources(), 0);
}

#[tokio::test]
async fn server_refuses_plaintext_where_a_client_hello_belongs() {
    let ca = Ca::new("dp-test-ca");
    let a = pod(&ca, &ca.leaf(&[POD_A], 1), ServerNameVerification::Hostname);
    let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // A raw distribution handshake (send_name) where a ClientHello should be.
    tcp.write_all(b"\x00\x0dN\x00\x00\x00\x00\x00\x00\x00\x00a@b")
        .await
        .unwrap();
    let err = server.await.unwrap().unwrap_err();
    assert_eq!(err.reason(), tls_reason::PROTOCOL, "{err}");
}

fn pem_cert(pem: &str) -> rustls::pki_types::CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let ca = Ca::new("dp-test-ca");
    let other = Ca::new("other-ca");
    let a = pod(&ca, &ca.leaf(&[POD_A], 1), ServerNameVerification::Hostname);
    // The intruder trusts our CA (so it accepts the server) but holds a
    // certificate from another CA.
    let intruder = pod_trusting(
        &ca.pem,
        &other.leaf(&[POD_B], 2),
        ServerNameVerification::Hostname,
    );

    let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
    let client = dial(&intruder.tls, addr, POD_A).await;
    let err = server.await.unwrap().unwrap_err();
    assert_eq!(err.reason(), tls_reason::UNKNOWN_CA, "{err}");
    // TLS 1.3: the client's handshake may complete before the server has
    // judged its certificate; the refusal then arrives on the first read.
    if let Ok(stream) = client {
        assert_eq!(refusal_seen_by_client(stream).await, tls_reason::UNKNOWN_CA);
    }
}

#[tokio::test]
async fn server_from_another_ca_is_refused_in_both_modes() {
    let ca = Ca::new("dp-test-ca");
    let other = Ca::new("other-ca");
    for verify in [
        ServerNameVerification::Hostname,
        ServerNameVerification::CaOnly,
    ] {
        let impostor = pod_trusting(&ca.pem, &other.leaf(&[POD_A], 1), verify);
        let b = pod(&ca, &ca.leaf(&[POD_B], 2), verify);
        let (addr, server) = serve_once(Arc::clone(&impostor.tls)).await;
        let err = dial(&b.tls, addr, POD_A).await.unwrap_err();
        assert_eq!(err.reason(), tls_reason::UNKNOWN_CA, "{verify:?}: {err}");
        // The server hears why.
        let server_err = server.await.unwrap().unwrap_err();
        assert_eq!(server_err.reason(), tls_reason::UNKNOWN_CA, "{server_err}");
    }
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let ca = Ca::new("dp-test-ca");
    let a = pod(&ca, &ca.leaf(&[POD_A], 1), ServerNameVerification::Hostname);
    let (addr, server) = serve_once(Arc::clone(&a.tls)).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(pem_cert(&ca.pem)).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(POD_A).unwrap();
    let client = connector.connect(name, tcp).await;

    let err = server.await.unwrap().unwrap_err();
    assert_eq!(err.reason(), tls_reason::NO_CLIENT_CERT, "{err}");
    if let Ok(stream) = client {
        assert_eq!(
            refusal_seen_by_client(stream).await,
            tls_reason::NO_CLIENT_CERT
        );
    }
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let ca = Ca::new("dp-test-ca");
    let a = pod(&ca, &ca.leaf(&[POD_A], 1), ServerNameVerification::Hostname);
    let expired = ca.leaf_with(&[POD_B], 2, |p| {
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    });
    let b = pod(&ca, &expired, ServerNameVerification::Hostname);
    let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
    let _client = dial(&b.tls, addr, POD_A).await;
    let err = server.await.unwrap().unwrap_err();
    assert_eq!(err.reason(), tls_reason::BAD_CERT, "{err}");
}

#[tokio::test]
async fn hostname_verification_checks_the_dialled_name_ca_only_does_not() {
    let ca = Ca::new("dp-test-ca");
    let a_leaf = ca.leaf(&[POD_A, "127.0.0.1"], 1);
    let b_leaf = ca.leaf(&[POD_B], 2);
    let a = pod(&ca, &a_leaf, ServerNameVerification::Hostname);

    // hostname: pod A's certificate does not name pod B.
    let b = pod(&ca, &b_leaf, ServerNameVerification::Hostname);
    let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
    let err = dial(&b.tls, addr, POD_B).await.unwrap_err();
    assert_eq!(err.reason(), tls_reason::NAME_MISMATCH, "{err}");
    let server_err = server.await.unwrap().unwrap_err();
    assert_eq!(server_err.reason(), tls_reason::BAD_CERT, "{server_err}");

    // hostname: the right name, and an IP SAN, pass.
    for name in [POD_A, "POD-A.dp.test.", "127.0.0.1"] {
        let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
        let mut c = dial(&b.tls, addr, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        echo(&mut c, b"ok").await.unwrap();
        server.await.unwrap().unwrap();
    }

    // ca_only: the wrong name passes (the chain is what counts) ...
    let b_ca_only = pod(&ca, &b_leaf, ServerNameVerification::CaOnly);
    let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
    let mut c = dial(&b_ca_only.tls, addr, POD_B)
        .await
        .expect("ca_only ignores the name");
    echo(&mut c, b"ok").await.unwrap();
    assert_eq!(server_identity(&c).serial, a_leaf.serial_string());
    server.await.unwrap().unwrap();
    // ... and so does something that is no name at all.
    let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
    dial(&b_ca_only.tls, addr, "not a host name!")
        .await
        .expect("ca_only with an unusable name");
    server.await.unwrap().unwrap();
    // hostname mode cannot verify such a name.
    let (addr, _server) = serve_once(Arc::clone(&a.tls)).await;
    let err = dial(&b.tls, addr, "not a host name!").await.unwrap_err();
    assert!(matches!(err, TlsError::ServerName(_)), "{err}");
}

#[tokio::test]
async fn node_names_are_bound_to_the_client_certificate() {
    let ca = Ca::new("dp-test-ca");
    let a = pod(&ca, &ca.leaf(&[POD_A], 1), ServerNameVerification::Hostname);
    let b = pod(&ca, &ca.leaf(&[POD_B], 2), ServerNameVerification::Hostname);
    // Pod A dials pod B: B's server sees A's client certificate.
    let (addr, server) = serve_once(Arc::clone(&b.tls)).await;
    let mut c = dial(&a.tls, addr, POD_B).await.unwrap();
    echo(&mut c, b"x").await.unwrap();
    let identity = server.await.unwrap().unwrap();
    assert_eq!(check_node_binding(&identity, "x@pod-a.dp.test"), Ok(()));
    assert_eq!(check_node_binding(&identity, "a2@POD-A.dp.test"), Ok(()));
    let err = check_node_binding(&identity, "x@pod-b.dp.test").unwrap_err();
    assert!(
        matches!(err, BindingError::NotInCertificate { ref host, .. } if host == POD_B),
        "{err}"
    );
    assert!(check_node_binding(&identity, "x@pod-a").is_err());
    assert!(check_node_binding(&identity, "x").is_err());

    // A wildcard certificate binds any single label under it.
    let w = pod(
        &ca,
        &ca.leaf(&["*.dp-headless.test"], 3),
        ServerNameVerification::Hostname,
    );
    let (addr, server) = serve_once(Arc::clone(&b.tls)).await;
    let mut c = dial(&w.tls, addr, POD_B).await.unwrap();
    echo(&mut c, b"x").await.unwrap();
    let identity = server.await.unwrap().unwrap();
    assert_eq!(
        check_node_binding(&identity, "n@web-0.dp-headless.test"),
        Ok(())
    );
    assert!(check_node_binding(&identity, "n@pod-a.dp.test").is_err());
}

#[tokio::test]
async fn handshake_has_a_deadline() {
    let ca = Ca::new("dp-test-ca");
    let leaf = ca.leaf(&[POD_A], 1);
    let tmp = tempfile::tempdir().unwrap();
    let secret = SecretDir::create(tmp.path(), &leaf.cert_pem, &leaf.key_pem, &ca.pem);
    let mut s = settings(&secret, ServerNameVerification::Hostname);
    s.handshake_timeout = Duration::from_millis(200);
    let tls = Tls::load(s).unwrap();

    // A client that connects and says nothing.
    let (addr, server) = serve_once(Arc::clone(&tls)).await;
    let started = std::time::Instant::now();
    let _silent = TcpStream::connect(addr).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(3), server)
        .await
        .expect("server handshake without a deadline")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.reason(), tls_reason::TIMEOUT, "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "server gave up after {:?}, before its deadline",
        started.elapsed()
    );

    // A server that accepts TCP and never answers the ClientHello.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(tcp);
    });
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(3), dial(&tls, addr, POD_A))
        .await
        .expect("client handshake without a deadline")
        .unwrap_err();
    assert_eq!(err.reason(), tls_reason::TIMEOUT, "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "client gave up after {:?}, before its deadline",
        started.elapsed()
    );
}

/// A CA rotation done in steps: both pods trust a bundle of the old and the
/// new CA, and one of them already holds a certificate of the new CA while
/// the other still holds the old one. Tunnels work both ways.
#[tokio::test]
async fn a_bundle_of_two_cas_accepts_certificates_of_either() {
    let old = Ca::new("dp-test-ca-old");
    let new = Ca::new("dp-test-ca-new");
    let bundle = format!("{}{}", old.pem, new.pem);
    let a = pod_trusting(
        &bundle,
        &new.leaf(&[POD_A], 0x4001),
        ServerNameVerification::Hostname,
    );
    let b = pod_trusting(
        &bundle,
        &old.leaf(&[POD_B], 0x4002),
        ServerNameVerification::Hostname,
    );
    for (from, to, name) in [(&b, &a, POD_A), (&a, &b, POD_B)] {
        let (addr, server) = serve_once(Arc::clone(&to.tls)).await;
        let mut c = dial(&from.tls, addr, name).await.expect("client handshake");
        echo(&mut c, b"rotation")
            .await
            .expect("server accepted the client");
        server.await.unwrap().expect("server handshake");
    }
    // A pod that trusts the new CA alone refuses the old certificate.
    let c = pod_trusting(
        &new.pem,
        &new.leaf(&[POD_A], 0x4003),
        ServerNameVerification::Hostname,
    );
    let (addr, server) = serve_once(Arc::clone(&c.tls)).await;
    let _ = dial(&b.tls, addr, POD_A).await;
    let err = server.await.unwrap().unwrap_err();
    assert_eq!(err.reason(), tls_reason::UNKNOWN_CA, "{err}");
}

/// Records the pod's certificate serial at each INFO event.
struct SerialAtLogLine {
    tls: Arc<Tls>,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SerialAtLogLine {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::INFO {
            let serial = self.tls.local_identity().serial;
            self.seen.lock().unwrap().push(serial);
        }
    }
}

/// Held by the tests that reach the reloader's log lines. `tracing` caches
/// each callsite's interest process-wide, computed by the first thread to
/// reach it: a test reloading with no subscriber at the same moment as the
/// one capturing the line could cache "never" and hide it.
static RELOAD_LINES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// "TLS files changed; new connections use the new certificate" is true
/// when it is written: a connection made as soon as the line appears uses
/// the new certificate. It was logged before the new one was swapped in.
#[test]
fn the_reload_line_is_written_once_the_new_certificate_is_in_force() {
    use tracing_subscriber::layer::SubscriberExt;
    let _serial = RELOAD_LINES.blocking_lock();
    let ca = Ca::new("dp-test-ca");
    let old = ca.leaf(&[POD_A], 0x1101);
    let new = ca.leaf(&[POD_A], 0x1102);
    let a = pod(&ca, &old, ServerNameVerification::Hostname);
    let mut reloader = a.tls.reloader();
    a.secret.write(&new.cert_pem, &new.key_pem, &ca.pem);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let probe = SerialAtLogLine {
        tls: Arc::clone(&a.tls),
        seen: Arc::clone(&seen),
    };
    let subscriber = tracing_subscriber::registry().with(probe);
    let outcome = tracing::subscriber::with_default(subscriber, || {
        // The line's interest may have been cached as "never" by a test
        // that reloaded with no subscriber.
        tracing::callsite::rebuild_interest_cache();
        reloader.poll()
    });
    assert!(matches!(outcome, ReloadOutcome::Reloaded(_)), "{outcome:?}");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![new.serial_string()],
        "the certificate in force when the reload was logged"
    );
}

#[tokio::test]
async fn rotation_through_a_symlink_swap_keeps_open_connections() {
    let _serial = RELOAD_LINES.lock().await;
    let ca = Ca::new("dp-test-ca");
    let a_old = ca.leaf(&[POD_A], 0x1001);
    let a_new = ca.leaf(&[POD_A, "rotated.pod-a.dp.test"], 0x1002);
    let b_old = ca.leaf(&[POD_B], 0x2001);
    let b_new = ca.leaf(&[POD_B], 0x2002);
    let a = pod(&ca, &a_old, ServerNameVerification::Hostname);
    let b = pod(&ca, &b_old, ServerNameVerification::Hostname);
    let mut a_reloader = a.tls.reloader();
    let mut b_reloader = b.tls.reloader();
    assert!(matches!(a_reloader.poll(), ReloadOutcome::Unchanged));

    // A connection established with the old certificates.
    let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
    let mut old_conn = dial(&b.tls, addr, POD_A).await.unwrap();
    echo(&mut old_conn, b"before rotation").await.unwrap();
    assert_eq!(server.await.unwrap().unwrap().serial, b_old.serial_string());
    assert_eq!(server_identity(&old_conn).serial, a_old.serial_string());

    // Both pods' secrets are rotated the way the kubelet does it.
    let target_before = std::fs::canonicalize(a.secret.cert_file()).unwrap();
    a.secret.write(&a_new.cert_pem, &a_new.key_pem, &ca.pem);
    b.secret.write(&b_new.cert_pem, &b_new.key_pem, &ca.pem);
    assert_ne!(
        std::fs::canonicalize(a.secret.cert_file()).unwrap(),
        target_before,
        "the symlink now resolves elsewhere"
    );
    match a_reloader.poll() {
        ReloadOutcome::Reloaded(id) => assert_eq!(id.serial, a_new.serial_string()),
        other => panic!("expected a reload, got {other:?}"),
    }
    assert!(matches!(b_reloader.poll(), ReloadOutcome::Reloaded(_)));
    assert!(matches!(a_reloader.poll(), ReloadOutcome::Unchanged));

    // The old connection is untouched, in both directions.
    for i in 0..10 {
        echo(&mut old_conn, format!("after rotation {i}").as_bytes())
            .await
            .unwrap();
    }
    // A new connection sees the new certificates on both sides.
    let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
    let mut new_conn = dial(&b.tls, addr, "rotated.pod-a.dp.test").await.unwrap();
    echo(&mut new_conn, b"new").await.unwrap();
    let seen = server_identity(&new_conn);
    assert_eq!(seen.serial, a_new.serial_string());
    assert!(seen
        .dns_names
        .contains(&"rotated.pod-a.dp.test".to_string()));
    assert_eq!(server.await.unwrap().unwrap().serial, b_new.serial_string());
    assert_eq!(a.tls.local_identity().serial, a_new.serial_string());
    echo(&mut old_conn, b"still there").await.unwrap();
}

#[tokio::test]
async fn bad_new_files_keep_the_old_certificate() {
    let _serial = RELOAD_LINES.lock().await;
    let handle = prometheus();
    let ca = Ca::new("dp-test-ca");
    let a_leaf = ca.leaf(&[POD_A], 0x3001);
    let a = pod(&ca, &a_leaf, ServerNameVerification::Hostname);
    let b = pod(
        &ca,
        &ca.leaf(&[POD_B], 0x3002),
        ServerNameVerification::Hostname,
    );
    let mut reloader = a.tls.reloader();
    let failures_before = counter(&handle.render(), "distproxy_tls_reload_failures_total", &[]);

    let fresh = ca.leaf(&[POD_A], 0x3003);
    let other_key = ca.leaf(&[POD_A], 0x3004).key_pem;
    // A user restoring last year's Secret: its own key, but expired.
    let expired = ca.leaf_with(&[POD_A], 0x3005, |p| {
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    });
    // (what, cert, key, CA)
    type Case = (&'static str, Vec<u8>, Vec<u8>, Vec<u8>);
    let cases: Vec<Case> = vec![
        (
            "corrupt certificate",
            b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n"
                .to_vec(),
            fresh.key_pem.clone().into_bytes(),
            ca.pem.clone().into_bytes(),
        ),
        (
            "empty certificate file",
            Vec::new(),
            fresh.key_pem.clone().into_bytes(),
            ca.pem.clone().into_bytes(),
        ),
        (
            "key of another certificate",
            fresh.cert_pem.clone().into_bytes(),
            other_key.into_bytes(),
            ca.pem.clone().into_bytes(),
        ),
        (
            "expired certificate",
            expired.cert_pem.clone().into_bytes(),
            expired.key_pem.clone().into_bytes(),
            ca.pem.clone().into_bytes(),
        ),
        (
            "no CA",
            fresh.cert_pem.clone().into_bytes(),
            fresh.key_pem.clone().into_bytes(),
            b"# nothing here\n".to_vec(),
        ),
    ];
    for (what, cert, key, ca_pem) in &cases {
        a.secret.write_raw(cert, key, ca_pem);
        match reloader.poll() {
            ReloadOutcome::Failed(e) => {
                eprintln!("{what}: {e}");
                if *what == "expired certificate" {
                    assert!(e.to_string().contains("expired on"), "{e}");
                }
            }
            other => panic!("{what}: expected a failure, got {other:?}"),
        }
        // Reported once, not on every poll.
        assert!(
            matches!(reloader.poll(), ReloadOutcome::Unchanged),
            "{what}"
        );
        // New connections still get the old certificate.
        let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
        let mut c = dial(&b.tls, addr, POD_A).await.unwrap();
        echo(&mut c, b"x").await.unwrap();
        assert_eq!(server_identity(&c).serial, a_leaf.serial_string(), "{what}");
        server.await.unwrap().unwrap();
    }
    let failures_after = counter(&handle.render(), "distproxy_tls_reload_failures_total", &[]);
    assert!(
        failures_after - failures_before >= cases.len() as f64,
        "{failures_before} -> {failures_after}"
    );

    // A missing file (deleted target) is a failure too, and keeps the old.
    std::fs::remove_file(a.secret.key_file()).unwrap();
    assert!(matches!(reloader.poll(), ReloadOutcome::Failed(_)));
    std::os::unix::fs::symlink("..data/tls.key", a.secret.key_file()).unwrap();

    // Good files again: loaded.
    a.secret.write(&fresh.cert_pem, &fresh.key_pem, &ca.pem);
    match reloader.poll() {
        ReloadOutcome::Reloaded(id) => assert_eq!(id.serial, fresh.serial_string()),
        other => panic!("expected a reload, got {other:?}"),
    }
}

/// A rotation written file by file, in place (`cp` of the certificate,
/// then of its key, as a hand-made volume or a script may do, unlike a
/// Kubernetes Secret volume), passes through a certificate without its
/// key. The reloader looks again once the files have settled: one
/// reload, no failure reported or counted. A state that stays broken is
/// still reported once.
#[tokio::test]
async fn a_rotation_written_file_by_file_is_one_reload_without_a_failure() {
    let _serial = RELOAD_LINES.lock().await;
    let handle = prometheus();
    let ca = Ca::new("dp-test-ca");
    let tmp = tempfile::tempdir().unwrap();
    let old = ca.leaf(&[POD_A], 0x3101);
    let secret = SecretDir::create(tmp.path(), &old.cert_pem, &old.key_pem, &ca.pem);
    // At a 1 s interval the reloader waits 200 ms for a broken state to change.
    let tls = Tls::load(TlsSettings {
        reload_interval: Duration::from_secs(1),
        ..settings(&secret, ServerNameVerification::Hostname)
    })
    .unwrap();
    let mut reloader = tls.reloader();
    let failures_before = counter(&handle.render(), "distproxy_tls_reload_failures_total", &[]);

    let new = ca.leaf(&[POD_A], 0x3102);
    std::fs::write(secret.cert_file(), &new.cert_pem).unwrap();
    let (key_file, key) = (secret.key_file(), new.key_pem.clone());
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(key_file, key).unwrap();
    });
    let outcome = tokio::task::spawn_blocking(move || (reloader.poll(), reloader))
        .await
        .unwrap();
    writer.join().unwrap();
    let (outcome, mut reloader) = outcome;
    match outcome {
        ReloadOutcome::Reloaded(id) => assert_eq!(id.serial, new.serial_string()),
        other => panic!("expected one reload, got {other:?}"),
    }
    let failures = counter(&handle.render(), "distproxy_tls_reload_failures_total", &[]);
    assert_eq!(failures, failures_before, "no failure counted");

    // Only the certificate, and no key after it: a failure, reported once.
    let newer = ca.leaf(&[POD_A], 0x3103);
    std::fs::write(secret.cert_file(), &newer.cert_pem).unwrap();
    assert!(matches!(reloader.poll(), ReloadOutcome::Failed(_)));
    assert!(matches!(reloader.poll(), ReloadOutcome::Unchanged));
    let failures = counter(&handle.render(), "distproxy_tls_reload_failures_total", &[]);
    assert!(failures > failures_before, "the broken state is counted");
}

/// A renewal issued by a clock a little ahead of this one is not valid
/// yet: the current certificate stays in force until the new one's
/// `notBefore`, then the new one is taken, so peers never see a gap; and
/// when the current one is outside its validity too, the new one is taken
/// at once.
#[tokio::test]
async fn a_renewal_not_valid_yet_waits_while_the_current_certificate_is_valid() {
    let _serial = RELOAD_LINES.lock().await;
    let handle = prometheus();
    let ca = Ca::new("dp-test-ca");
    let a_leaf = ca.leaf(&[POD_A], 0x3101);
    let a = pod(&ca, &a_leaf, ServerNameVerification::Hostname);
    let b = pod(
        &ca,
        &ca.leaf(&[POD_B], 0x3102),
        ServerNameVerification::Hostname,
    );
    let mut reloader = a.tls.reloader();
    let failures_before = counter(&handle.render(), "distproxy_tls_reload_failures_total", &[]);
    // Whole seconds, as X.509 keeps them.
    let valid_from = (time::OffsetDateTime::now_utc() + time::Duration::seconds(3))
        .replace_nanosecond(0)
        .unwrap();
    let early = ca.leaf_with(&[POD_A], 0x3103, |p| p.not_before = valid_from);
    a.secret.write(&early.cert_pem, &early.key_pem, &ca.pem);
    for _ in 0..2 {
        match reloader.poll() {
            ReloadOutcome::Waiting(id) => assert_eq!(id.serial, early.serial_string()),
            other => panic!("expected a wait for notBefore, got {other:?}"),
        }
        let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
        let mut c = dial(&b.tls, addr, POD_A).await.unwrap();
        echo(&mut c, b"x").await.unwrap();
        assert_eq!(server_identity(&c).serial, a_leaf.serial_string());
        server.await.unwrap().unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match reloader.poll() {
            ReloadOutcome::Reloaded(id) => {
                assert_eq!(id.serial, early.serial_string());
                break;
            }
            ReloadOutcome::Waiting(_) => {
                assert!(std::time::Instant::now() < deadline, "still waiting");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("expected the wait to end in a reload, got {other:?}"),
        }
    }
    assert!(time::OffsetDateTime::now_utc() >= valid_from);
    let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
    let mut c = dial(&b.tls, addr, POD_A).await.unwrap();
    echo(&mut c, b"x").await.unwrap();
    assert_eq!(server_identity(&c).serial, early.serial_string());
    server.await.unwrap().unwrap();
    let failures_after = counter(&handle.render(), "distproxy_tls_reload_failures_total", &[]);
    assert_eq!(failures_after, failures_before, "a wait is no failure");

    // A pod whose certificate has expired takes a not-yet-valid renewal
    // at once: it is the one that will work first.
    let expired = ca.leaf_with(&[POD_A], 0x3104, |p| {
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    });
    let c = pod(&ca, &expired, ServerNameVerification::Hostname);
    let mut reloader = c.tls.reloader();
    let early = ca.leaf_with(&[POD_A], 0x3105, |p| {
        p.not_before = time::OffsetDateTime::now_utc() + time::Duration::minutes(10)
    });
    c.secret.write(&early.cert_pem, &early.key_pem, &ca.pem);
    match reloader.poll() {
        ReloadOutcome::Reloaded(id) => assert_eq!(id.serial, early.serial_string()),
        other => panic!("expected the renewal taken at once, got {other:?}"),
    }
}

#[tokio::test]
async fn the_reloader_task_picks_up_changes_by_itself() {
    let _serial = RELOAD_LINES.lock().await;
    let ca = Ca::new("dp-test-ca");
    let a = pod(
        &ca,
        &ca.leaf(&[POD_A], 0x4001),
        ServerNameVerification::Hostname,
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(a.tls.reloader().run(shutdown.clone()));
    let next = ca.leaf(&[POD_A], 0x4002);
    a.secret.write(&next.cert_pem, &next.key_pem, &ca.pem);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while a.tls.local_identity().serial != next.serial_string() {
        assert!(
            std::time::Instant::now() < deadline,
            "not reloaded within 5 s (interval 50 ms)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("reloader stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn handshake_failures_are_counted_by_reason() {
    let handle = prometheus();
    let name = "distproxy_tls_handshake_failures_total";
    let before = counter(
        &handle.render(),
        name,
        &[("side", "accept"), ("reason", "unknown_ca")],
    );
    let before_connect = counter(
        &handle.render(),
        name,
        &[("side", "connect"), ("reason", "name_mismatch")],
    );
    let ca = Ca::new("dp-test-ca");
    let other = Ca::new("other-ca");
    let a = pod(&ca, &ca.leaf(&[POD_A], 1), ServerNameVerification::Hostname);
    let intruder = pod_trusting(
        &ca.pem,
        &other.leaf(&[POD_B], 2),
        ServerNameVerification::Hostname,
    );
    let (addr, server) = serve_once(Arc::clone(&a.tls)).await;
    let _ = dial(&intruder.tls, addr, POD_A).await;
    assert!(server.await.unwrap().is_err());
    let b = pod(&ca, &ca.leaf(&[POD_B], 3), ServerNameVerification::Hostname);
    let (addr, _server) = serve_once(Arc::clone(&a.tls)).await;
    assert!(dial(&b.tls, addr, "pod-c.dp.test").await.is_err());

    let text = handle.render();
    assert!(
        counter(&text, name, &[("side", "accept"), ("reason", "unknown_ca")]) >= before + 1.0,
        "{text}"
    );
    assert!(
        counter(
            &text,
            name,
            &[("side", "connect"), ("reason", "name_mismatch")]
        ) >= before_connect + 1.0,
        "{text}"
    );
}

#[test]
fn loading_reports_which_file_is_wrong() {
    let ca = Ca::new("dp-test-ca");
    let leaf = ca.leaf(&[POD_A], 1);
    let tmp = tempfile::tempdir().unwrap();
    let secret = SecretDir::create(tmp.path(), &leaf.cert_pem, "garbage", &ca.pem);
    let err = Tls::load(settings(&secret, ServerNameVerification::Hostname)).unwrap_err();
    assert!(err.to_string().contains("tls.key_file"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let secret = SecretDir::create(tmp.path(), &leaf.cert_pem, &leaf.key_pem, "");
    let err = Tls::load(settings(&secret, ServerNameVerification::Hostname)).unwrap_err();
    assert!(err.to_string().contains("tls.ca_file"), "{err}");

    let mut s = settings(&secret, ServerNameVerification::Hostname);
    s.cert_file = tmp.path().join("missing.crt");
    let err = Tls::load(s).unwrap_err();
    assert!(
        err.to_string().contains("tls.cert_file") && err.to_string().contains("missing.crt"),
        "{err}"
    );
}

/// A key protected by a passphrase (`openssl pkcs8 -topk8 -v2 aes256`, or
/// `genrsa -aes256`) is named as encrypted: it was reported as a file that
/// "contains no private key".
#[test]
fn an_encrypted_key_is_named_as_such() {
    let ca = Ca::new("dp-test-ca");
    let leaf = ca.leaf(&[POD_A], 1);
    for key in [
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0wQTApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n",
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00112233445566778899AABBCCDDEEFF\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let secret = SecretDir::create(tmp.path(), &leaf.cert_pem, key, &ca.pem);
        let err = Tls::load(settings(&secret, ServerNameVerification::Hostname))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tls.key_file") && err.contains("encrypted private key"),
            "{err}"
        );
    }
}

#[test]
fn serial_strings_match_the_certificates() {
    let ca = Ca::new("dp-test-ca");
    for serial in [1u64, 0x7f, 0x80, 0x1001, 0xdead_beef] {
        let leaf = ca.leaf(&[POD_A], serial);
        let der = {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()
        };
        let id = PeerIdentity::from_der(der.as_ref()).unwrap();
        assert_eq!(id.serial, leaf.serial_string(), "serial {serial:#x}");
    }
}

// ---------------------------------------------------------------------------
// The tunnel with TLS, in process: two sidecars on 127.0.0.1, fake nodes
// behind the remote one, a tap between them that records what crosses.

mod tunnel_tls {
    use super::*;
    use distproxy_testkit::prelude::*;
    use distproxy_testkit::sut::config::Config;
    use distproxy_testkit::sut::sidecar::Sidecar;
    use std::net::SocketAddr;
    use std::sync::Mutex;

    fn tls_config(secret: &SecretDir, tweak: impl FnOnce(&mut Config)) -> Config {
        let mut c = test_config();
        c.tls.cert_file = Some(secret.cert_file());
        c.tls.key_file = Some(secret.key_file());
        c.tls.ca_file = Some(secret.ca_file());
        c.tls.reload_interval_ms = Millis(50);
        tweak(&mut c);
        c.validate().unwrap();
        c
    }

    /// A TCP forwarder to `to` that records the bytes sent towards it.
    async fn tap(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let seen = Arc::clone(&seen2);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(to).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let mut buf = [0u8; 4096];
                        loop {
                            match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                                    if sw.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        (addr, seen)
    }

    struct TlsPair {
        remote: Sidecar,
        local: Sidecar,
        seen: Arc<Mutex<Vec<u8>>>,
        local_secret: SecretDir,
        _dirs: Vec<tempfile::TempDir>,
        _nodes: FakePod,
    }

    /// Remote pod (nodes `b`, `c`) with `remote_leaf`; local pod with
    /// `local_leaf`; the local sidecar's tunnel goes through a tap.
    async fn tls_pair(
        ca_pem: &str,
        remote_leaf: &Leaf,
        local_leaf: &Leaf,
        tweak_remote: impl FnOnce(&mut Config),
    ) -> TlsPair {
        let (rdir, ldir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let rsecret = SecretDir::create(
            rdir.path(),
            &remote_leaf.cert_pem,
            &remote_leaf.key_pem,
            ca_pem,
        );
        let lsecret = SecretDir::create(
            ldir.path(),
            &local_leaf.cert_pem,
            &local_leaf.key_pem,
            ca_pem,
        );
        let remote = start(tls_config(&rsecret, tweak_remote));
        let nodes = FakePod::start(epmd_addr(&remote), &["b", "c"]).await;
        let (tap_addr, seen) = tap(dist_addr(&remote)).await;
        let local = start(tls_config(&lsecret, |c| {
            c.tunnel.remote_port = tap_addr.port();
        }));
        TlsPair {
            remote,
            local,
            seen,
            local_secret: lsecret,
            _dirs: vec![rdir, ldir],
            _nodes: nodes,
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn the_tunnel_carries_preamble_and_payload_inside_tls() {
        let ca = Ca::new("dp-test-ca");
        let p = tls_pair(
            &ca.pem,
            &ca.leaf(&["127.0.0.1"], 0x5001),
            &ca.leaf(&["127.0.0.1", "pod-a.dp.test"], 0x5002),
            |c| {
                c.tls.bind_node_names = true;
                c.tls.require_tls = true;
            },
        )
        .await;
        let local_epmd = epmd_addr(&p.local);
        for target in ["c", "b", "c"] {
            let port = egress_port(local_epmd, &format!("{target}@127.0.0.1")).await;
            let (mut s, answered) =
                dial_as(SocketAddr::from(([127, 0, 0, 1], port)), "a1@pod-a.dp.test").await;
            assert_eq!(answered, format!("{target}@fake.host"));
            let marker = b"MARKER-7f3a-payload-through-tls";
            s.write_all(marker).await.unwrap();
            let mut back = vec![0u8; marker.len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, marker);
        }
        let seen = p.seen.lock().unwrap().clone();
        assert!(seen.len() > 1000, "the tap saw {} bytes", seen.len());
        assert_eq!(
            seen[0], 0x16,
            "the tunnel starts with a TLS handshake record"
        );
        for needle in [
            &b"a1@pod-a.dp.test"[..],
            b"pod-a.dp.test",
            b"c@127.0.0.1",
            b"DPX",
            b"MARKER-7f3a",
        ] {
            assert!(
                !contains(&seen, needle),
                "{:?} crossed in clear text",
                String::from_utf8_lossy(needle)
            );
        }
        drop(p.remote);
    }

    #[tokio::test]
    async fn name_binding_refuses_a_node_of_another_pod() {
        let ca = Ca::new("dp-test-ca");
        let p = tls_pair(
            &ca.pem,
            &ca.leaf(&["127.0.0.1"], 0x6001),
            &ca.leaf(&["127.0.0.1", "pod-a.dp.test"], 0x6002),
            |c| {
                c.tls.bind_node_names = true;
                c.tls.require_tls = true;
            },
        )
        .await;
        let port = egress_port(epmd_addr(&p.local), "b@127.0.0.1").await;
        let egress = SocketAddr::from(([127, 0, 0, 1], port));
        // Pod A's certificate carrying a node of pod B: refused.
        let mut s = TcpStream::connect(egress).await.unwrap();
        s.write_all(&frames::send_name("x@pod-b.dp.test"))
            .await
            .unwrap();
        assert!(closed_without_reply(&mut s).await);
        // Its own node: routed.
        let (_s, answered) = dial_as(egress, "x@pod-a.dp.test").await;
        assert_eq!(answered, "b@fake.host");
    }

    #[tokio::test]
    async fn a_sidecar_with_a_certificate_of_another_ca_is_refused() {
        let ca = Ca::new("dp-test-ca");
        let other = Ca::new("other-ca");
        let p = tls_pair(
            &ca.pem,
            &ca.leaf(&["127.0.0.1"], 0x7001),
            &other.leaf(&["127.0.0.1"], 0x7002),
            |_| {},
        )
        .await;
        // The refused side sees the remote's alert and counts it too.
        egress_is_refused_and_counted_on_the_connect_side(&p, prometheus(), "unknown_ca").await;
    }

    /// A peer that completes the mutual handshake and then sends a record
    /// that does not decrypt is counted as `bad_frame` (it was counted as
    /// `peer_closed`, which sent operators looking for a peer that left); a
    /// close_notify at once is a peer closing. Neither touches a tunnel set
    /// up next to them.
    #[tokio::test]
    async fn garbage_or_close_notify_right_after_the_handshake_is_closed_and_counted() {
        let handle = prometheus();
        let ca = Ca::new("dp-test-ca");
        let p = tls_pair(
            &ca.pem,
            &ca.leaf(&["127.0.0.1"], 0x8101),
            &ca.leaf(&["127.0.0.1"], 0x8102),
            |c| c.tls.require_tls = true,
        )
        .await;
        let peer = pod(
            &ca,
            &ca.leaf(&["127.0.0.1"], 0x8103),
            ServerNameVerification::Hostname,
        );
        let closed = |reason: &str| {
            counter(
                &handle.render(),
                "distproxy_connections_closed_total",
                &[("reason", reason)],
            )
        };
        let remote = dist_addr(&p.remote);
        // A tunnel set up before, relaying throughout.
        let port = egress_port(epmd_addr(&p.local), "b@127.0.0.1").await;
        let (mut good, answered) =
            dial_as(SocketAddr::from(([127, 0, 0, 1], port)), "x@127.0.0.1").await;
        assert_eq!(answered, "b@fake.host");

        let bad_before = closed("bad_frame");
        let mut s = dial(&peer.tls, remote, "127.0.0.1").await.unwrap();
        // An application-data record of the right shape that no key opens.
        let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x40];
        record.extend((0..0x40u8).map(|i| i.wrapping_mul(37)));
        s.get_mut().0.write_all(&record).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let end = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed, not left open");
        assert!(!matches!(end, Ok(n) if n > 0), "{end:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "closed at once, not at the preamble deadline ({:?})",
            started.elapsed()
        );
        assert!(
            eventually(Duration::from_secs(5), || async {
                closed("bad_frame") >= bad_before + 1.0
            })
            .await,
            "a record that does not decrypt is a bad frame: {}",
            handle.render()
        );

        let gone_before = closed("peer_closed");
        let mut s = dial(&peer.tls, remote, "127.0.0.1").await.unwrap();
        s.shutdown().await.unwrap();
        assert!(
            eventually(Duration::from_secs(5), || async {
                closed("peer_closed") >= gone_before + 1.0
            })
            .await,
            "{}",
            handle.render()
        );

        // The tunnel next to them still relays.
        good.write_all(b"still here").await.unwrap();
        let mut back = [0u8; 10];
        good.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"still here");
    }

    /// In TLS 1.3 the client's handshake is over before the server has
    /// judged the client certificate: a remote sidecar that refuses this
    /// one's certificate (expired here; another CA or a missing client-auth
    /// usage alike) answers with an alert on the first read. The dialling
    /// side counts that as a failed handshake on its side (it counted
    /// nothing, and logged that the remote node did not answer, blaming
    /// policy), so the pod whose certificate is wrong shows it in its own
    /// metrics.
    #[tokio::test]
    async fn a_remote_refusing_this_sidecars_certificate_is_counted_on_the_connect_side() {
        let handle = prometheus();
        let ca = Ca::new("dp-test-ca");
        let expired = ca.leaf_with(&["127.0.0.1"], 0x8202, |p| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        });
        let p = tls_pair(&ca.pem, &ca.leaf(&["127.0.0.1"], 0x8201), &expired, |_| {}).await;
        egress_is_refused_and_counted_on_the_connect_side(&p, handle, "bad_cert").await;
    }

    /// A node's egress connection through `p.local` to `b@127.0.0.1` is
    /// closed without a reply, and `p.local` counts the remote's refusal in
    /// `tls_handshake_failures_total{side="connect", reason}`.
    async fn egress_is_refused_and_counted_on_the_connect_side(
        p: &TlsPair,
        handle: &metrics_exporter_prometheus::PrometheusHandle,
        reason: &str,
    ) {
        let refused = || {
            counter(
                &handle.render(),
                "distproxy_tls_handshake_failures_total",
                &[("side", "connect"), ("reason", reason)],
            )
        };
        let before = refused();
        let port = egress_port(epmd_addr(&p.local), "b@127.0.0.1").await;
        let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap();
        s.write_all(&frames::send_name("x@127.0.0.1"))
            .await
            .unwrap();
        assert!(closed_without_reply(&mut s).await);
        assert!(
            eventually(Duration::from_secs(5), || async {
                refused() >= before + 1.0
            })
            .await,
            "{}",
            handle.render()
        );
    }

    #[tokio::test]
    async fn without_tls_configured_the_remote_refuses_a_client_hello_and_plain_works() {
        // The remote has TLS; a local sidecar without it still reaches it in
        // plain text from loopback (require_tls exempts loopback).
        let ca = Ca::new("dp-test-ca");
        let p = tls_pair(
            &ca.pem,
            &ca.leaf(&["127.0.0.1"], 0x8001),
            &ca.leaf(&["127.0.0.1"], 0x8002),
            |c| c.tls.require_tls = true,
        )
        .await;
        let mut plain = test_config();
        plain.tunnel.remote_port = dist_addr(&p.remote).port();
        let plain = start(plain);
        let port = egress_port(epmd_addr(&plain), "c@127.0.0.1").await;
        let (_s, answered) = dial_as(SocketAddr::from(([127, 0, 0, 1], port)), "x@127.0.0.1").await;
        assert_eq!(answered, "c@fake.host");
    }

    #[tokio::test]
    async fn rotation_of_the_dialling_sidecar_applies_to_new_tunnels() {
        let ca = Ca::new("dp-test-ca");
        let p = tls_pair(
            &ca.pem,
            &ca.leaf(&["127.0.0.1"], 0x9001),
            &ca.leaf(&["127.0.0.1", "pod-a.dp.test"], 0x9002),
            |c| {
                c.tls.bind_node_names = true;
                c.tls.require_tls = true;
            },
        )
        .await;
        let port = egress_port(epmd_addr(&p.local), "b@127.0.0.1").await;
        let egress = SocketAddr::from(([127, 0, 0, 1], port));
        let (mut old, _) = dial_as(egress, "x@pod-a.dp.test").await;

        // The local pod's certificate now names pod-z instead of pod-a.
        let next = ca.leaf(&["127.0.0.1", "pod-z.dp.test"], 0x9003);
        p.local_secret.write(&next.cert_pem, &next.key_pem, &ca.pem);
        let tls = p.local.tls.as_ref().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while tls.local_identity().serial != next.serial_string() {
            assert!(std::time::Instant::now() < deadline, "not reloaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The established tunnel keeps working ...
        old.write_all(b"still-up").await.unwrap();
        let mut back = [0u8; 8];
        old.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"still-up");
        // ... new tunnels present the new certificate: pod-a is no longer
        // bound to it, pod-z is.
        let mut s = TcpStream::connect(egress).await.unwrap();
        s.write_all(&frames::send_name("x@pod-a.dp.test"))
            .await
            .unwrap();
        assert!(closed_without_reply(&mut s).await);
        let (_s, answered) = dial_as(egress, "x@pod-z.dp.test").await;
        assert_eq!(answered, "b@fake.host");
    }
}

/// Outgoing handshakes to a sidecar that accepts connections but never
/// answers (stopped with SIGSTOP, frozen) hold only that address's share of
/// the outgoing slots: a tunnel to another pod still gets one at once, not
/// after the stalled handshakes' deadline (with 200 stalled dials to a
/// frozen pod, a lab ping to a healthy pod took 5.2 s instead of 50 ms).
#[tokio::test]
async fn stalled_outgoing_handshakes_to_one_address_leave_slots_for_others() {
    use distproxy_testkit::sut::tls::per_source_share;
    let ca = Ca::new("dp-test-ca");
    let pod_a = pod_with_slots(&ca, &ca.leaf(&[POD_A], 1), 8);
    let a = Arc::clone(&pod_a.tls);
    let b = pod(&ca, &ca.leaf(&[POD_B], 2), ServerNameVerification::Hostname);
    let frozen: std::net::IpAddr = "198.18.0.66".parse().unwrap();
    let share = per_source_share(8);
    // Every outgoing slot's worth of dials to the frozen pod: pipes whose
    // other end never answers.
    let mut stalled = Vec::new();
    let mut ends = Vec::new();
    for _ in 0..8 {
        let (ours, theirs) = tokio::io::duplex(4096);
        let tls = Arc::clone(&a);
        stalled.push(tokio::spawn(async move {
            tls.connect_to(ours, "pod-c.dp.test", frozen)
                .await
                .map(|_| ())
        }));
        ends.push(theirs);
    }
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        a.dials_in_flight(),
        share,
        "one address holds its share only"
    );
    // A tunnel to another pod handshakes at once (well within the 5 s
    // deadline the stalled ones hold their slots for).
    let (addr, server) = serve_once(Arc::clone(&b.tls)).await;
    let started = std::time::Instant::now();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let dialled = tokio::time::timeout(Duration::from_secs(2), a.connect_to(tcp, POD_B, addr.ip()))
        .await
        .expect("the tunnel to another pod waited for the frozen pod's handshakes");
    dialled.expect("outgoing handshake");
    server.await.unwrap().expect("server side");
    assert!(started.elapsed() < Duration::from_secs(2));
    for task in &stalled {
        task.abort();
    }
    for task in stalled {
        let _ = task.await;
    }
    assert_eq!(a.dials_in_flight(), 0, "slots freed when the dials end");
}
