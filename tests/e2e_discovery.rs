//! End-to-end tests of discovery (`[discovery]`, `src/discovery/`) with real
//! OTP nodes started with nothing but the module flags
//! (`-pa DIR -epmd_module distproxy_epmd -distproxy_epmd connect true`).
//!
//! The headless Service is a real name server: `dnsmasq` in a pod of its
//! own, answering `dp-headless.dp.test` from a hosts file it re-reads on
//! SIGHUP; every other pod's resolv.conf points at it. Adding or removing a
//! line is a pod becoming ready or going away.
//!
//! Needs root, iproute2, erlang-nox and dnsmasq (Debian `dnsmasq-base`);
//! fails saying so otherwise, unless `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::beam::ErlangOptions;
use support::metrics::{metric_sum, metrics};
use support::module::{compile_module, with_module};
use support::process::Proc;
use support::sidecar::{SidecarOptions, ADMIN_PORT};
use support::wait::wait_until;
use support::{e2e_enabled, BeamNode, Daemon, Lab, Pod};

/// The headless Service's name.
const SERVICE: &str = "dp-headless.dp.test";
/// Short enough for a quick test, long enough not to load two shared cores.
const REFRESH_MS: u64 = 2000;
/// Deadline for a whole cluster to form or change (many BEAMs on few cores).
const FORM_TIMEOUT: Duration = Duration::from_secs(90);

/// `dnsmasq` serving [`SERVICE`] from a hosts file, in its own pod.
struct Dns {
    proc: Proc,
    hosts: PathBuf,
    addr: Ipv4Addr,
}

impl Dns {
    /// Starts dnsmasq in `pod` (answering on its address, port 53) with no
    /// record for the service yet.
    fn start(pod: &Pod, dir: &Path) -> Dns {
        let hosts = dir.join("headless.hosts");
        std::fs::write(&hosts, "").unwrap();
        let log = dir.join("dnsmasq.log");
        let mut cmd = pod.command("dnsmasq");
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--port=53",
            "--local-ttl=0",
            "--log-queries",
        ])
        .arg(format!("--listen-address={}", pod.addr()))
        .arg(format!("--addn-hosts={}", hosts.display()));
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(file.try_clone().unwrap()).stderr(file);
        let mut proc = Proc::spawn(&format!("dnsmasq in pod {}", pod.name()), &mut cmd, &log);
        let listening = |p: &Pod| {
            let out = p.run("cat", &["/proc/net/udp"]);
            // Local address column: hex address:port; port 53 is 0035.
            String::from_utf8_lossy(&out.stdout).contains(":0035 ")
        };
        wait_until(Duration::from_secs(15), "dnsmasq to listen", || {
            if let Some(status) = proc.exited() {
                panic!("dnsmasq exited ({status}):\n{}", proc.log_text());
            }
            listening(pod)
        });
        Dns {
            proc,
            hosts,
            addr: pod.addr(),
        }
    }

    /// Makes `pod` resolve names through this server.
    fn serve(&self, pod: &Pod) {
        let conf = Path::new("/etc/netns").join(pod.ns()).join("resolv.conf");
        std::fs::write(
            conf,
            format!("nameserver {}\noptions timeout:1 attempts:2\n", self.addr),
        )
        .unwrap();
    }

    /// The service's records become the addresses of `pods`.
    fn set_records(&mut self, pods: &[&Pod]) {
        let text: String = pods
            .iter()
            .map(|p| format!("{} {SERVICE}\n", p.addr()))
            .collect();
        std::fs::write(&self.hosts, text).unwrap();
        let status = Command::new("kill")
            .args(["-s", "HUP", &self.proc.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "SIGHUP to dnsmasq");
    }
}

fn sidecar_config(pod: &Pod, extra: &str) -> String {
    format!(
        "[discovery]\nservice = \"{SERVICE}\"\nhost = \"{}\"\nrefresh_interval_ms = {REFRESH_MS}\n\
         query_timeout_ms = 1000\n{extra}",
        pod.host()
    )
}

fn start_sidecar(pod: &Pod, dns: &Dns, extra: &str) -> Daemon {
    dns.serve(pod);
    pod.spawn_sidecar_with(SidecarOptions::default().config(&sidecar_config(pod, extra)))
}

/// The documented flags plus `-distproxy_epmd connect true`.
fn connect_flags(ebin: &Path) -> ErlangOptions {
    let mut opts = with_module(ebin);
    opts.extra_args
        .extend(["-distproxy_epmd", "connect", "true"].map(String::from));
    opts
}

/// `/members` of the sidecar in `pod`.
fn members_json(pod: &Pod) -> serde_json::Value {
    let body = pod.http_get(ADMIN_PORT, "/members");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/members is not JSON ({e}):\n{body}"))
}

fn member_names(json: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = json["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn refreshes(json: &serde_json::Value) -> u64 {
    json["refreshes"].as_u64().unwrap_or(0)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Waits until every node's `nodes()` is exactly the other names.
fn wait_full_mesh(nodes: &mut [BeamNode], what: &str) {
    let names: Vec<String> = nodes.iter().map(|n| n.name().to_string()).collect();
    for node in nodes.iter_mut() {
        let me = node.name().to_string();
        let expected = sorted(names.iter().filter(|n| **n != me).cloned().collect());
        let mut last = Vec::new();
        let ok = support::wait::poll_until(FORM_TIMEOUT, Duration::from_millis(250), || {
            last = node.nodes();
            last == expected
        });
        assert!(
            ok,
            "{what}: nodes() of {me} is {last:?}, expected {expected:?}\n{}",
            node.logs()
        );
    }
}

/// Three pods of three nodes each, started with nothing but the module
/// flags, find each other through the headless Service; a fourth pod scaled
/// up later is in every sidecar's members by the first refresh after its
/// record appears and joins the mesh; when it goes away it leaves the
/// members, and the remaining nodes stop trying to reach it.
#[test]
fn nodes_of_every_pod_find_each_other_and_follow_scaling() {
    if !e2e_enabled(
        "nodes_of_every_pod_find_each_other_and_follow_scaling",
        &["dnsmasq"],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "b", "c", "d", "n"]);
    let mut dns = Dns::start(lab.pod("n"), lab.dir());
    let ebin = compile_module(&lab);
    let opts = connect_flags(&ebin);
    let abc = [lab.pod("a"), lab.pod("b"), lab.pod("c")];
    dns.set_records(&abc);

    let mut sidecars: Vec<Daemon> = abc.iter().map(|p| start_sidecar(p, &dns, "")).collect();
    let mut nodes: Vec<BeamNode> = Vec::new();
    for pod in abc {
        for i in 1..=3 {
            nodes.push(pod.spawn_erlang_with(&format!("{}{i}", pod.name()), &opts));
        }
    }
    for node in &mut nodes {
        node.wait_ready();
    }
    let nine: Vec<String> = sorted(nodes.iter().map(|n| n.name().to_string()).collect());

    // All nine find each other, without a single ping from the test.
    wait_full_mesh(&mut nodes, "3 pods x 3 nodes");
    // The mesh may have formed through other pods' discovery before this
    // pod's next refresh: wait for each sidecar's own list.
    for pod in abc {
        wait_until(FORM_TIMEOUT, "all nine in every sidecar's members", || {
            member_names(&members_json(pod)) == nine
        });
    }
    let me = nodes[0].name().to_string();
    let from_module = nodes[0].rpc(&me, "distproxy_epmd", "members", "[]");
    for name in &nine {
        assert!(
            from_module.contains(name.as_str()),
            "members() of {me}: {from_module}"
        );
    }
    let cli = abc[1].run_ok(&support::distproxy_bin(), &["members"]);
    assert_eq!(
        sorted(cli.lines().map(String::from).collect()),
        nine,
        "`distproxy members` in pod b"
    );
    let text = metrics(abc[2]);
    assert_eq!(metric_sum(&text, "distproxy_discovery_members", &[]), 9.0);
    assert_eq!(metric_sum(&text, "distproxy_discovery_pods", &[]), 3.0);

    // Scale up: pod d starts, then its record appears (it became ready).
    let d = lab.pod("d");
    let mut sidecar_d = start_sidecar(d, &dns, "");
    let mut d_nodes: Vec<BeamNode> = (1..=3)
        .map(|i| d.spawn_erlang_with(&format!("d{i}"), &opts))
        .collect();
    for node in &mut d_nodes {
        node.wait_ready();
    }
    let d_names: Vec<String> = d_nodes.iter().map(|n| n.name().to_string()).collect();
    let before: Vec<u64> = abc.iter().map(|p| refreshes(&members_json(p))).collect();
    let scaled_at = Instant::now();
    dns.set_records(&[abc[0], abc[1], abc[2], d]);
    let twelve = sorted(nine.iter().chain(&d_names).cloned().collect());
    for (pod, before) in abc.iter().zip(&before) {
        let mut json = members_json(pod);
        wait_until(FORM_TIMEOUT, "pod d in every sidecar's members", || {
            json = members_json(pod);
            member_names(&json) == twelve
        });
        // A refresh under way when the record appeared may have resolved the
        // name just before; the next one, at most one interval later, sees it.
        assert!(
            refreshes(&json) <= before + 2,
            "pod {}: pod d appeared only after {} refreshes",
            pod.name(),
            refreshes(&json) - before
        );
    }
    let in_members = scaled_at.elapsed();
    let mut all: Vec<BeamNode> = nodes.drain(..).chain(d_nodes.drain(..)).collect();
    wait_full_mesh(&mut all, "after scaling up to 4 pods");
    eprintln!(
        "scale-up: pod d in every sidecar's members after {in_members:.2?}, \
         12-node mesh after {:.2?} (refresh interval {REFRESH_MS} ms)",
        scaled_at.elapsed()
    );

    // Scale down: pod d goes away (its processes die, its record goes).
    let d_nodes: Vec<BeamNode> = all.drain(9..).collect();
    for node in d_nodes {
        node.kill();
    }
    sidecar_d.stop();
    dns.set_records(&abc);
    for pod in abc {
        wait_until(
            FORM_TIMEOUT,
            "pod d gone from every sidecar's members",
            || member_names(&members_json(pod)) == nine,
        );
    }
    wait_full_mesh(&mut all, "after pod d went away");
    // Forgotten: once pod d has left the members, nobody asks for a tunnel
    // to it any more (each connection attempt asks the sidecar for an
    // egress port first, answered or refused).
    let attempts = |sidecar: &Daemon| sidecar.log_lines_containing("@pod-d.dp.test").len();
    let settle = |pods: &[&Pod]| {
        let start: Vec<u64> = pods.iter().map(|p| refreshes(&members_json(p))).collect();
        for (pod, start) in pods.iter().zip(start) {
            wait_until(FORM_TIMEOUT, "two more refreshes", || {
                refreshes(&members_json(pod)) >= start + 2
            });
        }
    };
    settle(&abc);
    let counted: Vec<usize> = sidecars.iter().map(attempts).collect();
    settle(&abc);
    let later: Vec<usize> = sidecars.iter().map(attempts).collect();
    assert_eq!(
        counted, later,
        "egress requests for pod d's nodes after it left the members"
    );
    let text = metrics(abc[0]);
    assert_eq!(metric_sum(&text, "distproxy_discovery_members", &[]), 9.0);

    for sidecar in &mut sidecars {
        sidecar.assert_no_misroute();
    }
}

/// A pod running stock `epmd` (no distproxy) is discovered through NAMES and
/// `discovery.host_template`, and a node with the module connects to its
/// node directly (the egress request is refused: no sidecar there).
#[test]
fn pods_without_distproxy_are_found_through_names_and_the_host_template() {
    if !e2e_enabled(
        "pods_without_distproxy_are_found_through_names_and_the_host_template",
        &["dnsmasq"],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "s", "n"]);
    let mut dns = Dns::start(lab.pod("n"), lab.dir());
    let ebin = compile_module(&lab);
    let (a, s) = (lab.pod("a"), lab.pod("s"));
    dns.serve(s);
    dns.set_records(&[a, s]);
    let mut sidecar = start_sidecar(a, &dns, "host_template = \"{ip}\"\n");
    let _epmd = s.spawn_stock_epmd();
    let s1_name = format!("s1@{}", s.addr());
    let mut s1 = s.spawn_erlang_with(
        "s1",
        &ErlangOptions {
            name: Some(s1_name.clone()),
            ..Default::default()
        },
    );
    let mut a1 = a.spawn_erlang_with("a1", &connect_flags(&ebin));
    s1.wait_ready();
    a1.wait_ready();

    let expected = sorted(vec![a1.name().to_string(), s1_name.clone()]);
    let mut json = members_json(a);
    wait_until(FORM_TIMEOUT, "s1 in pod a's members", || {
        json = members_json(a);
        member_names(&json) == expected
    });
    let stock = json["pods"]
        .as_array()
        .and_then(|pods| pods.iter().find(|p| p["host"] == s.addr().to_string()))
        .unwrap_or_else(|| panic!("pod s in /members: {json:#}"));
    assert_eq!(stock["source"], "epmd", "{json:#}");
    wait_until(FORM_TIMEOUT, "a1 connected to s1", || {
        a1.nodes() == vec![s1_name.clone()]
    });
    // The acceptor marks the connection up on its own side, not
    // necessarily before the initiator does: waited for as well.
    let a1_name = a1.name().to_string();
    wait_until(FORM_TIMEOUT, "s1 connected to a1", || {
        s1.nodes() == vec![a1_name.clone()]
    });
    sidecar.assert_no_misroute();
}

/// A name server that answers every query with `rcode` (2 SERVFAIL, 5
/// REFUSED) on `addr`:53, from a thread in `pod`, until `stop` is set.
fn failing_name_server(
    pod: &Pod,
    addr: Ipv4Addr,
    rcode: u8,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    pod.spawn_in(move || {
        let socket = std::net::UdpSocket::bind((addr, 53)).expect("bind port 53");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut answered = 0;
        let mut buf = [0u8; 512];
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            if n < 12 {
                continue;
            }
            // The header and the question, nothing else.
            let mut end = 12;
            while end < n && buf[end] != 0 {
                end += usize::from(buf[end]) + 1;
            }
            end = (end + 5).min(n);
            let mut reply = buf[..end].to_vec();
            reply[2] = 0x80 | (buf[2] & 0x01); // QR, RD as asked
            reply[3] = 0x80 | rcode; // RA, the failure
            reply[6..12].fill(0); // no answer, authority or additional
            if socket.send_to(&reply, from).is_ok() {
                answered += 1;
            }
        }
        answered
    })
}

/// A name server that fails (SERVFAIL, then REFUSED) is a failure to
/// resolve, not an answer without records: the member list stays, the
/// error is counted as `resolve` and shown in `/members`.
#[test]
fn a_failing_name_server_keeps_the_members() {
    if !e2e_enabled("a_failing_name_server_keeps_the_members", &["dnsmasq"]) {
        return;
    }
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let lab = Lab::new(&["a", "b", "n"]);
    let mut dns = Dns::start(lab.pod("n"), lab.dir());
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    dns.set_records(&[a, b]);
    let _sidecar_a = start_sidecar(a, &dns, "");
    let _sidecar_b = start_sidecar(b, &dns, "");
    let mut a1 = a.spawn_erlang("a1");
    let mut b1 = b.spawn_erlang("b1");
    a1.wait_ready();
    b1.wait_ready();
    let expected = sorted(vec![a1.name().to_string(), b1.name().to_string()]);
    wait_until(FORM_TIMEOUT, "a1 and b1 in pod a's members", || {
        member_names(&members_json(a)) == expected
    });

    // The name server now fails every query.
    dns.proc.kill();
    for rcode in [2u8, 5] {
        let errors_before = metric_sum(
            &metrics(a),
            "distproxy_discovery_refresh_errors_total",
            &[("reason", "resolve")],
        );
        let stop = Arc::new(AtomicBool::new(false));
        let server = failing_name_server(lab.pod("n"), dns.addr, rcode, Arc::clone(&stop));
        let before = refreshes(&members_json(a));
        let mut json = members_json(a);
        wait_until(
            Duration::from_secs(20),
            "two refreshes with the failing name server",
            || {
                json = members_json(a);
                refreshes(&json) >= before + 2
            },
        );
        stop.store(true, Ordering::Release);
        let answered = server.join().unwrap();
        assert!(answered >= 1, "rcode {rcode}: the name server was asked");
        assert_eq!(
            member_names(&json),
            expected,
            "rcode {rcode}: members kept\n{json:#}"
        );
        assert!(
            json["dns_error"].as_str().is_some_and(|e| !e.is_empty()),
            "rcode {rcode}: /members shows the failure\n{json:#}"
        );
        let errors = metric_sum(
            &metrics(a),
            "distproxy_discovery_refresh_errors_total",
            &[("reason", "resolve")],
        );
        assert!(errors > errors_before, "rcode {rcode}: counted as resolve");
    }
}

/// ALIVE2 for `name` sent from inside `pod` to its sidecar: a node as far
/// as the member list goes, registered while the returned stream is open.
fn fake_node(pod: &Pod, name: &str, port: u16) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let name = name.to_string();
    pod.spawn_in(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", 4369)).expect("the pod's EPMD");
        let mut body = vec![b'x'];
        body.extend(port.to_be_bytes());
        body.extend([77, 0]); // normal node, TCP
        body.extend(6u16.to_be_bytes());
        body.extend(5u16.to_be_bytes());
        body.extend((name.len() as u16).to_be_bytes());
        body.extend(name.as_bytes());
        body.extend(0u16.to_be_bytes());
        let mut req = (body.len() as u16).to_be_bytes().to_vec();
        req.extend(body);
        s.write_all(&req).unwrap();
        let mut reply = [0u8; 2];
        s.read_exact(&mut reply).unwrap();
        assert!(
            matches!(reply, [b'v' | b'y', 0]),
            "ALIVE2 of {name}: {reply:?}"
        );
        s
    })
    .join()
    .unwrap()
}

/// A pod whose network is cut while it stays in DNS keeps its nodes in the
/// other pods' members (it may come back), marked with the error; the
/// others' refreshes go on at their pace, each failure is counted as
/// `query_timeout` but warned about once; `/members`, `distproxy members`
/// and the gauges agree; when its record goes, its nodes go by the next
/// refresh. Nodes are plain registrations: only the member list matters.
#[test]
fn a_pod_cut_off_is_kept_while_listed_and_delays_no_other_pod() {
    if !e2e_enabled(
        "a_pod_cut_off_is_kept_while_listed_and_delays_no_other_pod",
        &["dnsmasq", "iptables"],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "b", "c", "n"]);
    let mut dns = Dns::start(lab.pod("n"), lab.dir());
    let (a, b, c) = (lab.pod("a"), lab.pod("b"), lab.pod("c"));
    dns.set_records(&[a, b, c]);
    let mut sidecars: Vec<Daemon> = [a, b, c]
        .iter()
        .map(|p| {
            dns.serve(p);
            p.spawn_sidecar_with(SidecarOptions::default().config(&format!(
                "[discovery]\nservice = \"{SERVICE}\"\nhost = \"{}\"\n\
                 refresh_interval_ms = 500\nquery_timeout_ms = 1000\n",
                p.host()
            )))
        })
        .collect();
    let mut held = Vec::new();
    let mut expected = Vec::new();
    for pod in [a, b, c] {
        for i in 1..=3 {
            let short = format!("{}{i}", pod.name());
            held.push(fake_node(pod, &short, 40000 + i));
            expected.push(pod.node_name(&short));
        }
    }
    let expected = sorted(expected);
    wait_until(Duration::from_secs(15), "nine members in pod a", || {
        member_names(&members_json(a)) == expected
    });
    let cli = |pod: &Pod| {
        sorted(
            pod.run_ok(&support::distproxy_bin(), &["members"])
                .lines()
                .map(String::from)
                .collect(),
        )
    };
    let gauges = |pod: &Pod| {
        let text = metrics(pod);
        (
            metric_sum(&text, "distproxy_discovery_members", &[]),
            metric_sum(&text, "distproxy_discovery_pods", &[]),
        )
    };
    assert_eq!(gauges(a), (9.0, 3.0));
    let timeouts = |pod: &Pod| {
        metric_sum(
            &metrics(pod),
            "distproxy_discovery_refresh_errors_total",
            &[("reason", "query_timeout")],
        )
    };
    assert_eq!(timeouts(a), 0.0);

    // Pods starting together may have refused each other's first query.
    let warned_about_c = || {
        sidecars[0]
            .log_lines_containing("pod did not answer")
            .iter()
            .filter(|l| l.contains(&format!("pod={} ", c.addr())))
            .count()
    };
    let warned_before = warned_about_c();

    // Pod c's network is cut; a node registers in pod b.
    support::faults::isolate(c);
    let cut_at = refreshes(&members_json(a));
    held.push(fake_node(b, "b4", 40004));
    let with_b4 = sorted(
        expected
            .iter()
            .cloned()
            .chain([b.node_name("b4")])
            .collect(),
    );
    // Three refreshes, each about one query timeout (1 s) plus the
    // interval (0.5 s) even though pod c never answers (waited for with
    // room to spare on a loaded machine).
    let mut json = members_json(a);
    wait_until(Duration::from_secs(15), "three refreshes of pod a", || {
        json = members_json(a);
        refreshes(&json) >= cut_at + 4
    });
    assert_eq!(
        member_names(&json),
        with_b4,
        "b4 joined, c's nodes kept\n{json:#}"
    );
    let pod_c = json["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["addr"] == c.addr().to_string())
        .cloned()
        .unwrap_or_else(|| panic!("pod c in {json:#}"));
    assert!(
        pod_c["error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out")),
        "{pod_c:#}"
    );
    assert_eq!(
        pod_c["nodes"].as_array().map(Vec::len),
        Some(3),
        "{pod_c:#}"
    );
    assert!(timeouts(a) >= 3.0, "every failed refresh counted");
    assert_eq!(
        warned_about_c(),
        warned_before + 1,
        "one warning while it lasts:\n{}",
        sidecars[0].log()
    );
    assert_eq!(cli(a), with_b4, "`distproxy members` in pod a");
    assert_eq!(gauges(a), (10.0, 3.0));

    // Pod c leaves DNS: its nodes leave by the next refresh.
    dns.set_records(&[a, b]);
    let without_c: Vec<String> = with_b4
        .iter()
        .filter(|n| !n.starts_with('c'))
        .cloned()
        .collect();
    wait_until(
        Duration::from_secs(5),
        "pod c out of pod a's members",
        || member_names(&members_json(a)) == without_c,
    );
    assert_eq!(cli(a), without_c);
    assert_eq!(gauges(a), (7.0, 2.0));
    for sidecar in &mut sidecars[..2] {
        sidecar.assert_running();
    }
}
