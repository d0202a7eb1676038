//! End-to-end tests of the sidecar ↔ sidecar tunnel (plain) with real OTP
//! nodes started with `-pa DIR -epmd_module distproxy_epmd`.
//!
//! Nodes listen on 127.0.0.1 only (see `support::lab`), so every byte
//! between pods passes through the sidecars. The sidecars' own metrics
//! (`/metrics` on the admin port, read from inside the pod) then show *how*
//! each connection was routed: through the tunnel preamble, with no EPMD
//! lookup at all, or by correlation for a node started without the module.
//!
//! Needs root, iproute2 and erlang-nox (and `ss` and `iptables` for the
//! dual-stack tests); fails saying so otherwise, unless
//! `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use support::mesh::{
    assert_full_mesh, assert_rpc_across_pods_answered_by_target, ping_everyone_at_once,
};
use support::metrics::{metric_sum, metric_sum_pods, metrics};
use support::module::{compile_erl, compile_module, with_module};
use support::process::Proc;
use support::wait::poll_until;
use support::{e2e_enabled, Lab, Pod};

/// Pod A: a1 a2 a3, pod B: b1 b2, all with the helper module. Every node
/// pings every other at the same instant, rpc answers from the right node
/// across pods, 8 MiB cross intact. The sidecars' metrics prove the path:
/// every cross-pod connection was routed by preamble (intra-pod ones go
/// straight to the node's loopback port), no EPMD lookup was made at all, nothing was
/// routed by correlation. Then a node without the module (a9) reaches b1 on
/// the same distribution port by correlation, as before.
#[test]
fn tunnel_carries_every_pair_exactly_between_two_sidecar_pods() {
    if !e2e_enabled(
        "tunnel_carries_every_pair_exactly_between_two_sidecar_pods",
        &[],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let ebin = compile_module(&lab);
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar(&[]);

    let opts = with_module(&ebin);
    let mut nodes = vec![
        a.spawn_erlang_with("a1", &opts),
        a.spawn_erlang_with("a2", &opts),
        a.spawn_erlang_with("a3", &opts),
        b.spawn_erlang_with("b1", &opts),
        b.spawn_erlang_with("b2", &opts),
    ];
    for node in &mut nodes {
        node.wait_ready();
    }
    let names: Vec<String> = nodes.iter().map(|n| n.name().to_string()).collect();
    for node in &mut nodes {
        let me = node.name().to_string();
        assert_eq!(
            node.rpc(&me, "net_kernel", "epmd_module", "[]"),
            "distproxy_epmd",
            "{me} runs with the helper module"
        );
        assert!(node.nodes().is_empty(), "{me} already connected");
    }

    ping_everyone_at_once(&mut nodes);
    assert_full_mesh(&mut nodes);

    // rpc across pods is answered by the node named.
    assert_rpc_across_pods_answered_by_target(&mut nodes);

    // Bulk data through the tunnel, relayed opaquely.
    let blob = nodes[0].send_blob(&names[4], 8 * 1024 * 1024);
    assert_eq!(blob.remote_size, blob.size, "a1 -> b2 size");
    assert_eq!(blob.remote_md5, blob.local_md5, "a1 -> b2 MD5");

    // How it was routed.
    let (ma, mb) = (metrics(a), metrics(b));
    for (pod, text) in [("a", &ma), ("b", &mb)] {
        let lookups = metric_sum(
            text,
            "distproxy_epmd_requests_total",
            &[("type", "port_please2")],
        );
        assert_eq!(lookups, 0.0, "pod {pod}: no EPMD lookup with the module");
        for method in ["correlated", "single_node", "unroutable"] {
            let n = metric_sum(text, "distproxy_routes_total", &[("method", method)]);
            assert_eq!(n, 0.0, "pod {pod}: routes by {method}");
        }
        let egress_ok = metric_sum(
            text,
            "distproxy_epmd_requests_total",
            &[("type", "egress"), ("result", "ok")],
        );
        assert!(egress_ok >= 1.0, "pod {pod}: egress requests answered");
    }
    // Every connection routed by preamble left through its initiator's
    // sidecar. (Not necessarily some from each pod: when a pair dials each
    // other at once, OTP keeps the connection of the node with the greater
    // name, here b's, and a's may be given up before it reached a sidecar.)
    let outbound = metric_sum_pods(
        &[&ma, &mb],
        "distproxy_dist_connections_total",
        &[("direction", "outbound")],
    );
    // 6 cross-pod pairs among 5 nodes: each set up at least one connection,
    // each routed by preamble by the target's sidecar. The 4 same-pod pairs
    // were answered with the node's own loopback port: they never reach a
    // sidecar's distribution port.
    let preamble = metric_sum_pods(
        &[&ma, &mb],
        "distproxy_routes_total",
        &[("method", "preamble")],
    );
    assert!(
        preamble >= 6.0,
        "connections routed by preamble: {preamble}\npod a:\n{ma}\npod b:\n{mb}"
    );
    assert!(
        outbound >= preamble,
        "tunnel connections out ({outbound}) fewer than routed by preamble ({preamble})"
    );
    eprintln!(
        "routed by preamble: {preamble} (pod a {}, pod b {}); tunnel connections out: \
         pod a {}, pod b {}",
        metric_sum(&ma, "distproxy_routes_total", &[("method", "preamble")]),
        metric_sum(&mb, "distproxy_routes_total", &[("method", "preamble")]),
        metric_sum(
            &ma,
            "distproxy_dist_connections_total",
            &[("direction", "outbound")]
        ),
        metric_sum(
            &mb,
            "distproxy_dist_connections_total",
            &[("direction", "outbound")]
        ),
    );

    // A node without the module uses the same distribution port by
    // correlation.
    let mut a9 = a.start_erlang("a9");
    let a9_name = a9.name().to_string();
    assert_eq!(
        a9.rpc(&a9_name, "net_kernel", "epmd_module", "[]"),
        "erl_epmd"
    );
    assert_eq!(a9.ping(&names[3]), "pong");
    assert_eq!(a9.rpc_node(&names[3]), names[3]);
    let mb = metrics(b);
    assert!(metric_sum(&mb, "distproxy_routes_total", &[("method", "correlated")]) >= 1.0);
    assert!(
        metric_sum(
            &mb,
            "distproxy_epmd_requests_total",
            &[("type", "port_please2")]
        ) >= 1.0
    );

    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}

/// A tiny authoritative DNS server (UDP, 127.0.0.1:53 in a pod) answering A
/// queries from a fixed table and NXDOMAIN otherwise; prints each query.
const DNS_SERVER_SRC: &str = r#"
-module(dp_test_dns).
-export([start/1]).

%% erl -noshell -run dp_test_dns start Name=Ip ...
start(Args) ->
    Table = [parse(A) || A <- Args],
    {ok, S} = gen_udp:open(53, [binary, {ip, {127, 0, 0, 1}}, {active, false}]),
    io:format("DNSREADY~n"),
    loop(S, Table).

parse(Arg) ->
    [Name, IpString] = string:split(Arg, "="),
    {ok, Ip} = inet:parse_ipv4_address(IpString),
    {string:lowercase(Name), Ip}.

loop(S, Table) ->
    {ok, {Ip, Port, Packet}} = gen_udp:recv(S, 0),
    case reply(Packet, Table) of
        {ok, Name, Type, Reply} ->
            io:format("QUERY ~s ~b~n", [Name, Type]),
            ok = gen_udp:send(S, Ip, Port, Reply);
        error ->
            io:format("BAD ~p~n", [Packet])
    end,
    loop(S, Table).

reply(<<Id:16, Flags:16, 1:16, _:16, _:16, _:16, Rest/binary>>, Table) ->
    case qname(Rest, []) of
        {ok, Name, <<Type:16, Class:16, _/binary>> = Tail} ->
            QLen = byte_size(Rest) - byte_size(Tail) + 4,
            <<Question:QLen/binary, _/binary>> = Rest,
            %% QR, AA, RA, and RD echoed.
            F = 16#8480 bor (Flags band 16#0100),
            case lists:keyfind(string:lowercase(Name), 1, Table) of
                {_, {A, B, C, D}} when Type =:= 1, Class =:= 1 ->
                    Answer = <<16#c00c:16, 1:16, 1:16, 60:32, 4:16, A, B, C, D>>,
                    {ok, Name, Type,
                     <<Id:16, F:16, 1:16, 1:16, 0:16, 0:16, Question/binary, Answer/binary>>};
                {_, _} ->
                    {ok, Name, Type, <<Id:16, F:16, 1:16, 0:16, 0:16, 0:16, Question/binary>>};
                false ->
                    {ok, Name, Type,
                     <<Id:16, (F bor 3):16, 1:16, 0:16, 0:16, 0:16, Question/binary>>}
            end;
        error ->
            error
    end;
reply(_, _) ->
    error.

qname(<<0, Rest/binary>>, Acc) ->
    {ok, lists:flatten(lists:join(".", lists:reverse(Acc))), Rest};
qname(<<L, Label:L/binary, Rest/binary>>, Acc) when L > 0, L < 64 ->
    qname(Rest, [binary_to_list(Label) | Acc]);
qname(_, _) ->
    error.
"#;

/// The DNS server running in a pod; killed on drop.
struct DnsServer {
    proc: Proc,
    log: PathBuf,
}

impl DnsServer {
    fn start(lab: &Lab, pod: &Pod, table: &[(&str, &str)]) -> DnsServer {
        let src = lab.dir().join("dp_test_dns.erl");
        std::fs::write(&src, DNS_SERVER_SRC).unwrap();
        let ebin = lab.dir().join("dns-ebin");
        compile_erl(&src, &ebin);
        let log = lab.dir().join(format!("dns-{}.log", pod.name()));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = pod.command("erl");
        cmd.args(["-noshell", "-start_epmd", "false", "-pa"])
            .arg(&ebin)
            .args(["-run", "dp_test_dns", "start"])
            .args(table.iter().map(|(n, ip)| format!("{n}={ip}")))
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file));
        let proc = Proc::spawn(&format!("DNS server in pod {}", pod.name()), &mut cmd, &log);
        let server = DnsServer { proc, log };
        let ready = poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
            server.log_text().contains("DNSREADY")
        });
        assert!(ready, "DNS server did not start: {}", server.log_text());
        server
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `(name, type)` of every query received so far.
    fn queries(&self) -> Vec<(String, u16)> {
        self.log_text()
            .lines()
            .filter_map(|l| {
                let mut f = l.strip_prefix("QUERY ")?.split_whitespace();
                Some((f.next()?.to_string(), f.next()?.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

/// Writes a pod's `/etc/hosts` and `/etc/resolv.conf` (as `ip netns exec`
/// shows them to every process started in the pod afterwards).
fn set_pod_resolver(pod: &Pod, hosts: &str, resolv_conf: &str) {
    let etc = Path::new("/etc/netns").join(pod.ns());
    std::fs::write(etc.join("hosts"), hosts).unwrap();
    std::fs::write(etc.join("resolv.conf"), resolv_conf).unwrap();
}

/// Nodes named with short host names (`-sname a1@pod-a`), which only the
/// pods' search domain `dp.test` turns into resolvable names:
///
/// - pod A's hosts file knows no `pod-b` at all; its resolv.conf has
///   `search dp.test` and a name server (a tiny one, inside pod A) that
///   knows `pod-b.dp.test`. a1 → b1 works, and the server saw the query for
///   `pod-b.dp.test`: hickory applied the search domain and asked DNS.
/// - pod B has no reachable name server; its hosts file has only the full
///   name `pod-a.dp.test`. b2 → a1 works: hickory applies search domains to
///   hosts-file lookups too (glibc's `files` backend would not).
/// - a host that resolves nowhere gives `pang` and a logged resolve failure.
#[test]
fn tunnel_resolves_short_host_names_through_the_pod_search_domain() {
    if !e2e_enabled(
        "tunnel_resolves_short_host_names_through_the_pod_search_domain",
        &[],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let (ip_a, ip_b) = (a.addr().to_string(), b.addr().to_string());
    set_pod_resolver(
        a,
        &format!("127.0.0.1 localhost\n{ip_a} pod-a.dp.test\n"),
        "search dp.test\nnameserver 127.0.0.1\noptions ndots:1 timeout:2 attempts:2\n",
    );
    set_pod_resolver(
        b,
        &format!("127.0.0.1 localhost\n{ip_b} pod-b.dp.test\n{ip_a} pod-a.dp.test\n"),
        "search dp.test\nnameserver 127.0.0.1\noptions ndots:1 timeout:1 attempts:1\n",
    );
    // The bare names resolve nowhere (checked with the pods' own libc).
    for (pod, other) in [(a, "pod-b"), (b, "pod-a")] {
        let out = pod.run("getent", &["hosts", other]);
        assert!(
            !out.status.success(),
            "pod {}: `getent hosts {other}` must fail without the search domain: {}",
            pod.name(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let dns = DnsServer::start(&lab, a, &[("pod-b.dp.test", &ip_b)]);

    let ebin = compile_module(&lab);
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar(&[]);
    let short = |name: &str| {
        let mut o = with_module(&ebin);
        o.name = Some(name.to_string());
        o.short_names = true;
        // One connection per ping: no transitive connections by global.
        o.extra_args.extend(["-connect_all".into(), "false".into()]);
        o
    };
    let mut a1 = a.spawn_erlang_with("a1", &short("a1@pod-a"));
    let mut b1 = b.spawn_erlang_with("b1", &short("b1@pod-b"));
    let mut b2 = b.spawn_erlang_with("b2", &short("b2@pod-b"));
    for node in [&mut a1, &mut b1, &mut b2] {
        node.wait_ready();
    }

    // Pod A resolves pod-b through DNS with the search domain.
    assert_eq!(a1.ping("b1@pod-b"), "pong");
    assert_eq!(a1.rpc_node("b1@pod-b"), "b1@pod-b");
    let queries = dns.queries();
    assert!(
        queries.contains(&("pod-b.dp.test".to_string(), 1)),
        "the DNS server saw no A query for pod-b.dp.test: {queries:?}"
    );

    // Pod B resolves pod-a through its hosts file with the search domain.
    assert_eq!(b2.ping("a1@pod-a"), "pong");
    assert_eq!(b2.rpc_node("a1@pod-a"), "a1@pod-a");
    assert!(b2.nodes().contains(&"a1@pod-a".to_string()));

    // Unresolvable: the egress request is refused (the probe of the remote
    // sidecar cannot resolve the host), logged, and the node falls back to
    // stock resolution, which fails too.
    assert_eq!(b2.ping("x1@pod-zz"), "pang");
    sidecar_b.wait_log("cannot resolve", 1, std::time::Duration::from_secs(10));
    let failures = sidecar_b.log_lines_containing("cannot resolve");
    assert!(
        failures.iter().any(|l| l.contains("pod-zz")),
        "no resolve failure logged for pod-zz: {failures:#?}"
    );

    let (ma, mb) = (metrics(a), metrics(b));
    let preamble = metric_sum_pods(
        &[&ma, &mb],
        "distproxy_routes_total",
        &[("method", "preamble")],
    );
    assert!(preamble >= 2.0, "routed by preamble: {preamble}");
    assert!(
        metric_sum(
            &mb,
            "distproxy_epmd_requests_total",
            &[("type", "egress"), ("result", "no_remote_sidecar")]
        ) >= 1.0
    );
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
    drop(b1);
}

/// A node started with the helper module still reaches a pod without
/// distproxy: its sidecar finds no sidecar answering on the remote host's
/// tunnel port, refuses the egress request, and the module falls back to a
/// direct connection through the remote pod's stock epmd.
#[test]
fn module_falls_back_to_a_direct_connection_for_a_pod_without_sidecar() {
    if !e2e_enabled(
        "module_falls_back_to_a_direct_connection_for_a_pod_without_sidecar",
        &[],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "s"]);
    let (a, s) = (lab.pod("a"), lab.pod("s"));
    let ebin = compile_module(&lab);
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let _epmd_s = s.spawn_stock_epmd();
    let mut a1 = a.spawn_erlang_with("a1", &with_module(&ebin));
    let mut s1 = s.spawn_erlang("s1");
    a1.wait_ready();
    s1.wait_ready();
    let (a1_name, s1_name) = (a1.name().to_string(), s1.name().to_string());

    assert_eq!(a1.ping(&s1_name), "pong", "module node -> stock pod");
    assert_eq!(a1.rpc_node(&s1_name), s1_name);
    let ma = metrics(a);
    let refused = metric_sum(
        &ma,
        "distproxy_epmd_requests_total",
        &[("type", "egress"), ("result", "no_remote_sidecar")],
    );
    assert!(
        refused >= 1.0,
        "egress was not refused for the stock pod:\n{ma}"
    );
    assert_eq!(
        metric_sum(
            &ma,
            "distproxy_dist_connections_total",
            &[("direction", "outbound")]
        ),
        0.0,
        "nothing may go through the tunnel to a pod without sidecar"
    );
    // And the other way round, by correlation.
    s1.halt();
    let mut s2 = s.start_erlang("s2");
    assert_eq!(s2.ping(&a1_name), "pong", "stock pod -> sidecar pod");
    sidecar_a.assert_no_misroute();
}

/// A pod rolled back from distproxy to stock `epmd` under the same host
/// name (a StatefulSet pod, or a mixed deployment's pod replaced): a node
/// with the helper module that reached its node through the tunnel reaches
/// the new incarnation the stock way within the remembered failure and the
/// module's cache (5 s each), as the docs promise for pods without
/// distproxy. The egress listener opened for the node outlived the remote
/// sidecar, and an open listener was handed out without a probe, each
/// attempt keeping it from going idle: every attempt failed for as long as
/// the node kept trying.
#[test]
fn module_node_reaches_a_pod_that_dropped_its_sidecar() {
    if !e2e_enabled("module_node_reaches_a_pod_that_dropped_its_sidecar", &[]) {
        return;
    }
    let lab = Lab::new(&["a", "s"]);
    let (a, s) = (lab.pod("a"), lab.pod("s"));
    let ebin = compile_module(&lab);
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_s = s.spawn_sidecar(&[]);
    let mut a1 = a.spawn_erlang_with("a1", &with_module(&ebin));
    let mut s1 = s.spawn_erlang("s1");
    a1.wait_ready();
    s1.wait_ready();
    let s1_name = s1.name().to_string();
    assert_eq!(a1.ping(&s1_name), "pong", "through the tunnel");
    let outbound = |pod: &Pod| {
        metric_sum(
            &metrics(pod),
            "distproxy_dist_connections_total",
            &[("direction", "outbound")],
        )
    };
    assert!(outbound(a) >= 1.0, "a1 -> s1 did not use the tunnel");

    // Pod S now runs stock epmd, and s1 again, the stock way.
    s1.halt();
    sidecar_s.stop();
    let _epmd_s = s.spawn_stock_epmd();
    let mut s1 = s.start_erlang("s1");
    let mut attempts = Vec::new();
    let reached = poll_until(Duration::from_secs(20), Duration::from_millis(500), || {
        let answer = a1.ping(&s1_name);
        attempts.push(answer.clone());
        answer == "pong"
    });
    assert!(
        reached,
        "a1 never reached s1 after pod S dropped its sidecar: {attempts:?}\n{}",
        sidecar_a.log()
    );
    assert_eq!(a1.rpc_node(&s1_name), s1_name);
    assert!(
        metric_sum(
            &metrics(a),
            "distproxy_epmd_requests_total",
            &[("type", "egress"), ("result", "no_remote_sidecar")],
        ) >= 1.0,
        "the egress request was not refused once pod S had no sidecar"
    );
    assert_eq!(s1.ping(a1.name()), "pong", "stock pod -> sidecar pod");
    sidecar_a.assert_no_misroute();
}

/// A node of the pod restarts (SIGKILL, then the same name at once, on a
/// new port): its neighbour with the helper module reaches the new
/// incarnation at its first attempt, as a stock node would. The sidecar
/// answers an egress request for a node of its own pod with that node's
/// own port, so the module must not reuse an answer it cached for the old
/// incarnation: with the cached (closed) port every attempt failed for
/// 5 s, and in a 3 × 20 mesh `global` then disconnected the neighbour from
/// the whole cluster for good (prevent_overlapping_partitions).
#[test]
fn module_node_reaches_a_restarted_node_of_its_own_pod_at_once() {
    if !e2e_enabled(
        "module_node_reaches_a_restarted_node_of_its_own_pod_at_once",
        &[],
    ) {
        return;
    }
    let lab = Lab::new(&["a"]);
    let a = lab.pod("a");
    let ebin = compile_module(&lab);
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let opts = with_module(&ebin);
    let mut a1 = a.spawn_erlang_with("a1", &opts);
    let mut a2 = a.spawn_erlang_with("a2", &opts);
    a1.wait_ready();
    a2.wait_ready();
    let a2_name = a2.name().to_string();
    assert_eq!(a1.ping(&a2_name), "pong", "a1 -> a2");
    let old_creation = a2.creation();

    a2.kill();
    let mut a2 = a.spawn_erlang_with("a2", &opts);
    a2.wait_ready();
    let new_creation = a2.creation();
    assert_ne!(new_creation, old_creation, "a2 restarted");
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
            !a1.nodes().contains(&a2_name)
        }),
        "a1 never saw the old a2 go down"
    );
    assert_eq!(
        a1.ping(&a2_name),
        "pong",
        "a1 -> restarted a2, first attempt"
    );
    assert_eq!(a1.remote_pid_creation(&a2_name), new_creation);
    sidecar_a.assert_no_misroute();
}

/// The pod's sidecar restarts (its state file keeps the registrations):
/// every egress listener is gone, and a module node's next connection to a
/// node of another pod must not go to the port it was told before the
/// restart.
#[test]
fn module_node_reaches_a_remote_node_at_once_after_its_sidecar_restarted() {
    if !e2e_enabled(
        "module_node_reaches_a_remote_node_at_once_after_its_sidecar_restarted",
        &[],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let ebin = compile_module(&lab);
    let state = lab.dir().join("pod-a-registry.json");
    let config = format!("[epmd]\nstate_file = {:?}\n", state.display().to_string());
    let mut sidecar_a = a.spawn_sidecar_with(support::SidecarOptions::default().config(&config));
    let _sidecar_b = b.spawn_sidecar(&[]);
    let opts = with_module(&ebin);
    let mut a1 = a.spawn_erlang_with("a1", &opts);
    let mut b1 = b.spawn_erlang_with("b1", &opts);
    a1.wait_ready();
    b1.wait_ready();
    let b1_name = b1.name().to_string();
    assert_eq!(a1.ping(&b1_name), "pong", "a1 -> b1");

    sidecar_a.stop();
    let mut sidecar_a = a.spawn_sidecar_with(support::SidecarOptions::default().config(&config));
    assert!(
        poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
            !a1.nodes().contains(&b1_name)
        }),
        "a1 never saw the connection through the old sidecar go"
    );
    let started = std::time::Instant::now();
    assert_eq!(
        a1.ping(&b1_name),
        "pong",
        "a1 -> b1 after the restart, first attempt ({:?})\n{}",
        started.elapsed(),
        sidecar_a.log()
    );
    sidecar_a.assert_no_misroute();
}

/// A dual-stack cluster where pod A's sidecar takes distribution over IPv6
/// only (`--dist-listen [::]:43691`, as where only IPv6 is open between
/// pods) and EPMD over IPv4 only (`--epmd-listen 0.0.0.0:4369`). Pod A's
/// name resolves to both families. `distproxy names --host` (and
/// `members --host`) tries each address while the connection is refused (glibc puts the IPv6 one
/// first; it used to try that one only and fail). Pod B's sidecar must try
/// both: an IPv4 node (`inet_tcp`) and an IPv6 node (`inet6_tcp`) of pod
/// B, both with the helper module, reach pod A's node through the tunnel,
/// over IPv6. The tunnel used to resolve A records only (hickory's default
/// `Ipv4thenIpv6` asks for AAAA only when there is no A record): it found
/// no sidecar at pod A's IPv4 address, refused the egress requests, and
/// the nodes fell back to direct connections, refused for the IPv4 node
/// (pang) and outside the tunnel (so outside mutual TLS) for the IPv6 one.
#[test]
fn tunnel_and_names_reach_a_dual_stack_pod_on_the_family_it_listens_on() {
    if !e2e_enabled(
        "tunnel_and_names_reach_a_dual_stack_pod_on_the_family_it_listens_on",
        &["ss"],
    ) {
        return;
    }
    let lab = Lab::new_dual_stack(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let ebin = compile_module(&lab);
    let mut sidecar_a = a.spawn_sidecar_with(support::SidecarOptions::with_args(&[
        "--epmd-listen",
        "0.0.0.0:4369",
        "--dist-listen",
        "[::]:43691",
    ]));
    let mut sidecar_b = b.spawn_sidecar(&[]);
    let mut six = support::beam::ErlangOptions::inet6();
    six.extra_args.extend(with_module(&ebin).extra_args);
    let mut a1 = a.spawn_erlang("a1");
    let mut b4 = b.spawn_erlang_with("b4", &with_module(&ebin));
    let mut b6 = b.spawn_erlang_with("b6", &six);
    for node in [&mut a1, &mut b4, &mut b6] {
        node.wait_ready();
    }
    let a1_name = a1.name().to_string();
    let names = b.run_ok(&support::distproxy_bin(), &["names", "--host", a.host()]);
    assert!(
        names.contains("name a1 at port 43691"),
        "distproxy names --host {} from pod B:\n{names}",
        a.host()
    );
    // `members --host` too: it is answered to local peers only, and the
    // refusal from pod A's IPv4 address means it got past the IPv6 one
    // (where it used to stop with "Cannot connect").
    let out = b.run(&support::distproxy_bin(), &["members", "--host", a.host()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("bad reply from epmd at {}:4369", a.addr())),
        "distproxy members --host {} from pod B:\n{stderr}",
        a.host()
    );
    assert_eq!(b4.ping(&a1_name), "pong", "IPv4 node b4 -> a1");
    assert_eq!(b6.ping(&a1_name), "pong", "IPv6 node b6 -> a1");
    assert_eq!(b6.rpc_node(&a1_name), a1_name, "rpc b6 -> a1");

    let mb = metrics(b);
    assert_eq!(
        metric_sum(
            &mb,
            "distproxy_epmd_requests_total",
            &[("type", "egress"), ("result", "no_remote_sidecar")]
        ),
        0.0,
        "pod B's sidecar found pod A's sidecar:\n{mb}"
    );
    assert_eq!(
        metric_sum(
            &mb,
            "distproxy_dist_connections_total",
            &[("direction", "outbound")]
        ),
        2.0,
        "b4's and b6's connections went out through pod B's sidecar:\n{mb}"
    );
    // Both arrived at pod A's distribution port over IPv6, from pod B.
    let local = format!("[{}]:43691", a.addr6());
    let peer = format!("[{}]:", b.addr6());
    let sockets = a.run_ok(
        "ss",
        &["-Htn", "state", "established", "( sport = :43691 )"],
    );
    assert_eq!(
        sockets
            .lines()
            .filter(|l| l.contains(&local) && l.contains(&peer))
            .count(),
        2,
        "pod A: two tunnel connections {peer}* -> {local}:\n{sockets}"
    );
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}

/// A dual-stack pod whose IPv4 distribution port drops packets (a network
/// policy or firewall that lets IPv6 through only): SYNs to it go
/// unanswered, unlike a closed port's reset. An IPv4 node of pod B with the
/// module still reaches pod A's node through the tunnel, over IPv6: the
/// probe gives each address a share of its own bound
/// (`tunnel.probe_timeout_ms`, 2 s) and the tunnel a share of its connect
/// deadline (`tunnel.connect_timeout_ms`, 5 s here), so the IPv4 attempt's
/// silence cannot use up the time of the IPv6 one. (The probe used to
/// share the connect deadline instead: half of 5 s for the IPv4 address,
/// more than the probe's own 2 s bound, so the probe failed, the egress
/// request was refused, and the node's direct connection over IPv4 was
/// dropped too: pang.)
#[test]
fn tunnel_reaches_a_dual_stack_pod_over_ipv6_when_ipv4_drops_packets() {
    if !e2e_enabled(
        "tunnel_reaches_a_dual_stack_pod_over_ipv6_when_ipv4_drops_packets",
        &["iptables"],
    ) {
        return;
    }
    let lab = Lab::new_dual_stack(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let ebin = compile_module(&lab);
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar_with(
        support::SidecarOptions::default().config("[tunnel]\nconnect_timeout_ms = 5000\n"),
    );
    let mut a1 = a.spawn_erlang("a1");
    let mut b4 = b.spawn_erlang_with("b4", &with_module(&ebin));
    for node in [&mut a1, &mut b4] {
        node.wait_ready();
    }
    a.run_ok(
        "iptables",
        &["-A", "INPUT", "-p", "tcp", "--dport", "43691", "-j", "DROP"],
    );
    let a1_name = a1.name().to_string();
    assert_eq!(b4.ping(&a1_name), "pong", "IPv4 node b4 -> a1 over IPv6");
    assert_eq!(b4.rpc_node(&a1_name), a1_name, "rpc b4 -> a1");
    let mb = metrics(b);
    assert_eq!(
        metric_sum(
            &mb,
            "distproxy_epmd_requests_total",
            &[("type", "egress"), ("result", "no_remote_sidecar")]
        ),
        0.0,
        "pod B's probe found pod A's sidecar over IPv6:\n{mb}"
    );
    let local = format!("[{}]:43691", a.addr6());
    let sockets = a.run_ok(
        "ss",
        &["-Htn", "state", "established", "( sport = :43691 )"],
    );
    assert!(
        sockets.lines().any(|l| l.contains(&local)),
        "pod A: a tunnel connection to {local}:\n{sockets}"
    );
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}
