//! Flows real users run, with real nodes behind sidecars: an Elixir cluster
//! that connects with `Node.connect`, calls across pods with `:rpc.call`
//! and shares a `:global` name that every node (Erlang ones included) sees,
//! through the transitive connections `global` makes on its own; nodes
//! named with a Kubernetes-style FQDN (`-name`) next to one with a short
//! name (`--sname`); a node killed and restarted at once under the same name
//! while a peer is connected; nodes of `-proto_dist inet6_tcp`, which
//! register over IPv6, in one pod and across the pods of a dual-stack lab;
//! `erl_call`, a `-hidden` node, a node of `-dist_listen false`, one pinned
//! with `inet_dist_listen_min/max`, distribution started, stopped and
//! started again under another name at run time, `pg` and
//! `erlang:monitor_node/2` across sidecar and stock-`epmd` pods; sidecars
//! and nodes on another EPMD port (`ERL_EPMD_PORT`), with and without the
//! helper module; a pod whose nodes keep their stock flags (they start
//! `epmd` themselves and listen on every interface) behind the sidecar;
//! short names between a sidecar pod and a stock pod, both ways;
//! a real `mix release` and a rebar3 release with the helper module and
//! the base manifest's environment (`bin/app start`, `bin/app rpc`).
//!
//! Needs root, iproute2, erlang-nox, elixir (with `mix`) and rebar3; fails saying so otherwise,
//! unless `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::beam::atom;
use support::beam::ErlangOptions;
use support::metrics::{metric_sum, metrics};
use support::module;
use support::sidecar::ADMIN_PORT;
use support::wait::wait_until;
use support::{e2e_enabled, BeamNode, Pod, DIST_PORT};

/// Evaluates Elixir `code` on `on` (through its agent); the result as
/// `{Value, Binding}` printed by Erlang.
fn eval(on: &mut BeamNode, code: &str) -> String {
    let name = on.name().to_string();
    on.rpc(
        &name,
        "Elixir.Code",
        "eval_string",
        &format!("[<<\"{}\">>]", code.replace('"', "\\\"")),
    )
}

/// `name` as an Elixir atom literal.
fn ex(name: &str) -> String {
    format!(":\"{name}\"")
}

#[test]
fn an_elixir_cluster_connects_calls_and_shares_global_names_across_pods() {
    if !e2e_enabled(
        "an_elixir_cluster_connects_calls_and_shares_global_names_across_pods",
        &["elixir"],
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b", "c"]);
    let (a, b, c) = (lab.pod("a"), lab.pod("b"), lab.pod("c"));
    let mut sidecars = [a, b, c].map(|p| p.spawn_sidecar(&[]));
    let mut e1 = a.spawn_elixir("e1");
    let mut e2 = b.spawn_elixir("e2");
    let mut c1 = c.spawn_erlang("c1");
    for node in [&mut e1, &mut e2, &mut c1] {
        node.wait_ready();
    }
    let (e1_name, e2_name, c1_name) = (a.node_name("e1"), b.node_name("e2"), c.node_name("c1"));

    // Node.connect/1 and Node.list/0 on e1.
    assert_eq!(
        eval(&mut e1, &format!("Node.connect({})", ex(&e2_name))),
        "{true,[]}"
    );
    assert_eq!(
        eval(&mut e1, "Node.list()"),
        format!("{{[{}],[]}}", atom(&e2_name))
    );
    // :rpc.call from e1 to e2, and from e2 back.
    assert_eq!(
        eval(
            &mut e1,
            &format!(":rpc.call({}, :erlang, :node, [])", ex(&e2_name))
        ),
        format!("{{{},[]}}", atom(&e2_name))
    );
    assert_eq!(
        eval(
            &mut e2,
            &format!(
                ":rpc.call({}, System, :version, []) |> is_binary()",
                ex(&e1_name)
            )
        ),
        "{true,[]}"
    );

    // A :global name registered on e1 (for a process that lives: init).
    assert_eq!(
        eval(
            &mut e1,
            ":global.register_name(:dp_service, Process.whereis(:init))"
        ),
        "{yes,[]}"
    );
    // c1 (Erlang, pod C) joins through e1 only; global connects it to e2
    // as well (a lookup in pod B's EPMD, a handshake through its sidecar)
    // and gives it the name.
    assert_eq!(c1.ping(&e1_name), "pong");
    wait_until(
        Duration::from_secs(20),
        "c1 to be connected to e2 by global",
        || c1.nodes().contains(&e2_name),
    );
    wait_until(Duration::from_secs(20), "c1 to see :dp_service", || {
        c1.rpc(&c1_name, "global", "whereis_name", "[dp_service]") != "undefined"
    });
    let owner = |node: &mut BeamNode| eval(node, "node(:global.whereis_name(:dp_service))");
    let want = format!("{{{},[]}}", atom(&e1_name));
    assert_eq!(owner(&mut e2), want, "e2 sees the name on e1");
    // The name is one cluster-wide: registering it again elsewhere fails.
    assert_eq!(
        eval(
            &mut e2,
            ":global.register_name(:dp_service, Process.whereis(:init))"
        ),
        "{no,[]}"
    );
    // Unregistered on e1, it is gone everywhere.
    assert_eq!(
        eval(&mut e1, ":global.unregister_name(:dp_service)"),
        "{ok,[]}"
    );
    wait_until(Duration::from_secs(10), "the name to vanish on c1", || {
        c1.rpc(&c1_name, "global", "whereis_name", "[dp_service]") == "undefined"
    });
    for s in &mut sidecars {
        s.assert_running();
        s.assert_no_misroute();
    }
}

/// The host part of a StatefulSet pod's name behind a headless Service.
/// Limits (`timeout` seconds) on a build tool's run (`mix`, `rebar3`) and
/// on a release's command or node. Only a hang should reach them: on a
/// loaded 2-core CI machine `rebar3 as prod release` of a tiny release took
/// more than the 60 s it had, and a release node started under a 20 s limit
/// could be killed before the test's calls to it were done (each `rpc`
/// boots a VM of its own). A release node the test started is killed when
/// the test drops it.
const BUILD_TIMEOUT_SECS: &str = "300";
const RELEASE_TIMEOUT_SECS: &str = "180";
/// How long a release node may take to boot and register.
const RELEASE_BOOT: Duration = Duration::from_secs(90);

const FQDN: &str = "app-0.app-headless.my-namespace.svc.cluster.local";

/// An Erlang node named `app@<FQDN>` and one named after the pod's IP
/// (pod A), and an Elixir node started with
/// `--sname ex@pod-b` (pod B) reach each other through the sidecars; the
/// Elixir node, killed with SIGKILL and restarted at once under the same
/// name, is reached again as its new incarnation (a new creation).
#[test]
fn fqdn_and_short_names_and_an_immediate_restart_under_the_same_name() {
    if !e2e_enabled(
        "fqdn_and_short_names_and_an_immediate_restart_under_the_same_name",
        &["elixir"],
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    // Every pod resolves the FQDN to pod A, as cluster DNS would.
    for pod in [a, b] {
        let hosts = std::path::Path::new("/etc/netns")
            .join(pod.ns())
            .join("hosts");
        let mut text = std::fs::read_to_string(&hosts).unwrap();
        text.push_str(&format!("{} {FQDN}\n", a.addr()));
        std::fs::write(&hosts, text).unwrap();
    }
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar(&[]);
    let app_name = format!("app@{FQDN}");
    let mut app = a.spawn_erlang_with(
        "app",
        &ErlangOptions {
            name: Some(app_name.clone()),
            ..Default::default()
        },
    );
    let short = ErlangOptions {
        name: Some("ex@pod-b".into()),
        short_names: true,
        ..Default::default()
    };
    let mut ex1 = b.spawn_elixir_with("ex", &short);
    let mut b1 = {
        let mut o = short.clone();
        o.name = Some("b1@pod-b".into());
        b.spawn_erlang_with("b1", &o)
    };
    // `-name app@$(POD_IP)`, the other common Kubernetes naming.
    let ip_name = format!("ip1@{}", a.addr());
    let mut ip1 = a.spawn_erlang_with(
        "ip1",
        &ErlangOptions {
            name: Some(ip_name.clone()),
            ..Default::default()
        },
    );
    for node in [&mut app, &mut ex1, &mut b1, &mut ip1] {
        node.wait_ready();
    }
    assert_eq!(app.name(), app_name);
    assert_eq!(ex1.name(), "ex@pod-b");

    // Long and short names do not mix in one cluster (OTP refuses it), so
    // the FQDN node is checked against a long-named peer: pod B's sidecar
    // answers its lookup of pod A, which routes to app.
    let mut lb = b.spawn_erlang("lb");
    lb.wait_ready();
    assert_eq!(lb.ping(&app_name), "pong", "lb -> app@FQDN");
    assert_eq!(lb.rpc_node(&app_name), app_name);
    assert_eq!(app.ping(lb.name()), "pong", "app@FQDN -> lb");
    assert_eq!(lb.ping(&ip_name), "pong", "lb -> ip1@POD_IP");
    assert_eq!(lb.rpc_node(&ip_name), ip_name);
    assert_eq!(ip1.ping(lb.name()), "pong", "ip1@POD_IP -> lb");
    // Both of pod A's nodes are told apart through its one port.
    assert_eq!(lb.rpc_node(&app_name), app_name);

    // Short names within pod B, through its sidecar's EPMD, and from pod A
    // (`pod-b` resolves through the pods' hosts files).
    assert_eq!(b1.ping("ex@pod-b"), "pong", "b1 -> ex (sname)");
    let mut sa = {
        let mut o = short.clone();
        o.name = Some("sa@pod-a".into());
        a.spawn_erlang_with("sa", &o)
    };
    sa.wait_ready();
    assert_eq!(sa.ping("ex@pod-b"), "pong", "sa@pod-a -> ex@pod-b");
    assert_eq!(sa.rpc_node("b1@pod-b"), "b1@pod-b", "sa@pod-a -> b1@pod-b");
    assert_eq!(b1.ping("sa@pod-a"), "pong", "b1@pod-b -> sa@pod-a");
    let old = ex1.creation();
    assert_eq!(b1.remote_pid_creation("ex@pod-b"), old);

    // SIGKILL, then a new ex at once: it registers (the sidecar saw the old
    // registration's connection close) and b1 reaches the new one.
    ex1.kill();
    let mut ex2 = b.spawn_elixir_with("ex", &short);
    ex2.wait_ready();
    let new = ex2.creation();
    assert_ne!(new, old, "the restarted node kept its creation");
    wait_until(Duration::from_secs(10), "b1 to reach the new ex", || {
        b1.ping("ex@pod-b") == "pong" && b1.remote_pid_creation("ex@pod-b") == new
    });
    sidecar_a.assert_running();
    sidecar_b.assert_running();
    sidecar_a.assert_no_misroute();
    sidecar_b.assert_no_misroute();
}

/// Pods whose EPMD port is not 4369: the sidecars listen on 4370
/// (`--epmd-listen`) and every node runs with `ERL_EPMD_PORT=4370`, as
/// with a stock `epmd -port 4370`. Plain nodes register there and reach
/// each other across pods (lookups on 4370, connections on the one
/// distribution port); a node with the helper module asks that port for
/// its egress ports and tunnels, both ways; `epmd -port 4370 -names` lists
/// the pod's nodes, and nothing listens on 4369.
#[test]
fn nodes_and_sidecars_on_another_epmd_port_through_erl_epmd_port() {
    if !e2e_enabled(
        "nodes_and_sidecars_on_another_epmd_port_through_erl_epmd_port",
        &[],
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let sidecar = support::SidecarOptions::with_args(&[
        "--epmd-listen",
        "0.0.0.0:4370",
        "--epmd-listen",
        "[::]:4370",
    ])
    .wait_ports(&[4370, DIST_PORT]);
    let mut sidecar_a = a.spawn_sidecar_with(sidecar.clone());
    let mut sidecar_b = b.spawn_sidecar_with(sidecar);
    let env = vec![("ERL_EPMD_PORT".to_string(), "4370".to_string())];
    let plain = ErlangOptions {
        env: env.clone(),
        ..Default::default()
    };
    let tunnelled = ErlangOptions {
        env,
        ..module::with_module(&module::compile_module(&lab))
    };
    let mut a1 = a.spawn_erlang_with("a1", &plain);
    let mut a2 = a.spawn_erlang_with("a2", &plain);
    let mut b1 = b.spawn_erlang_with("b1", &plain);
    let mut bm = b.spawn_erlang_with("bm", &tunnelled);
    for node in [&mut a1, &mut a2, &mut b1, &mut bm] {
        node.wait_ready();
    }
    let (a1_name, a2_name, bm_name) = (a.node_name("a1"), a.node_name("a2"), b.node_name("bm"));
    for target in [&a2_name, &a1_name] {
        assert_eq!(b1.rpc_node(target), *target, "b1 -> {target}");
        assert_eq!(bm.rpc_node(target), *target, "bm -> {target}");
    }
    assert_eq!(a1.rpc_node(&bm_name), bm_name);
    let preamble = metric_sum(
        &metrics(a),
        "distproxy_routes_total",
        &[("method", "preamble")],
    );
    assert!(
        preamble >= 2.0,
        "bm's connections were not tunnelled: {preamble}"
    );
    let names = a.run_ok("epmd", &["-port", "4370", "-names"]);
    assert!(
        names.contains("name a1 at port") && names.contains("name a2 at port"),
        "{names}"
    );
    assert!(
        !a.listening_tcp().iter().any(|l| l.addr.port() == 4369),
        "something listens on 4369 in pod A"
    );
    for sidecar in [&mut sidecar_a, &mut sidecar_b] {
        sidecar.assert_running();
        sidecar.assert_no_misroute();
    }
}

/// A pod moved from stock `epmd` to the sidecar without touching its
/// nodes' flags: they start `epmd` themselves (`-start_epmd true`, which
/// finds the port taken and leaves the sidecar in place) and listen on
/// every interface. They register with the sidecar and are reached from
/// another sidecar pod, from a stock pod and from each other, and reach
/// the stock pod the stock way.
#[test]
fn a_pod_keeping_its_nodes_stock_flags_is_reached_behind_the_sidecar() {
    if !e2e_enabled(
        "a_pod_keeping_its_nodes_stock_flags_is_reached_behind_the_sidecar",
        &[],
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b", "s"]);
    let (a, b, s) = (lab.pod("a"), lab.pod("b"), lab.pod("s"));
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar(&[]);
    let _epmd_s = s.spawn_stock_epmd();
    // After the harness's `-start_epmd false`; the harness adds no
    // interface of its own when the caller names one.
    let stock_flags = ErlangOptions {
        extra_args: "-start_epmd true -kernel inet_dist_use_interface {0,0,0,0}"
            .split(' ')
            .map(String::from)
            .collect(),
        ..Default::default()
    };
    let mut a1 = a.spawn_erlang_with("a1", &stock_flags);
    let mut a2 = a.spawn_erlang_with("a2", &stock_flags);
    let mut b1 = b.spawn_erlang("b1");
    let mut s1 = s.spawn_erlang("s1");
    for node in [&mut a1, &mut a2, &mut b1, &mut s1] {
        node.wait_ready();
    }
    let (a1_name, a2_name, s1_name) = (a.node_name("a1"), a.node_name("a2"), s.node_name("s1"));
    let registered = a.epmd_names();
    assert!(
        registered.contains("name a1 at port") && registered.contains("name a2 at port"),
        "{registered}"
    );
    for target in [&a2_name, &a1_name] {
        assert_eq!(b1.rpc_node(target), *target, "b1 -> {target}");
        assert_eq!(s1.rpc_node(target), *target, "s1 -> {target}");
    }
    assert_eq!(a1.rpc_node(&a2_name), a2_name);
    assert_eq!(a2.rpc_node(&s1_name), s1_name);
    for sidecar in [&mut sidecar_a, &mut sidecar_b] {
        sidecar.assert_running();
        sidecar.assert_no_misroute();
    }
}

/// Short names (`-sname`) between a sidecar pod and a stock-`epmd` pod,
/// both ways: two plain nodes of the sidecar pod (told apart by
/// correlation) and one with the helper module (which falls back to the
/// stock way for the stock pod), and a node of the stock pod.
#[test]
fn short_names_between_a_sidecar_pod_and_a_stock_pod_both_ways() {
    if !e2e_enabled(
        "short_names_between_a_sidecar_pod_and_a_stock_pod_both_ways",
        &[],
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "s"]);
    let (a, s) = (lab.pod("a"), lab.pod("s"));
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let _epmd_s = s.spawn_stock_epmd();
    let short = |name: &str, base: ErlangOptions| ErlangOptions {
        name: Some(name.to_string()),
        short_names: true,
        ..base
    };
    let ebin = module::compile_module(&lab);
    let mut a1 = a.spawn_erlang_with("a1", &short("a1@pod-a", ErlangOptions::default()));
    let mut a2 = a.spawn_erlang_with("a2", &short("a2@pod-a", ErlangOptions::default()));
    let mut am = a.spawn_erlang_with("am", &short("am@pod-a", module::with_module(&ebin)));
    let mut s1 = s.spawn_erlang_with("s1", &short("s1@pod-s", ErlangOptions::default()));
    for node in [&mut a1, &mut a2, &mut am, &mut s1] {
        node.wait_ready();
    }
    for target in ["a2@pod-a", "a1@pod-a", "am@pod-a"] {
        assert_eq!(s1.rpc_node(target), target, "s1 -> {target}");
    }
    s1.halt();
    let mut s1 = s.spawn_erlang_with("s1", &short("s1@pod-s", ErlangOptions::default()));
    s1.wait_ready();
    for node in [&mut a1, &mut a2, &mut am] {
        assert_eq!(
            node.rpc_node("s1@pod-s"),
            "s1@pod-s",
            "{} -> s1",
            node.name()
        );
    }
    assert_eq!(s1.nodes().len(), 3);
    sidecar_a.assert_running();
    sidecar_a.assert_no_misroute();
}

/// What `erl` reports when started under a name already taken, with a stock
/// `epmd` (pod S) and with the sidecar (pod D): the node does not start, in
/// the same words, and the node holding the name is undisturbed.
#[test]
fn a_second_node_under_a_taken_name_fails_as_with_stock_epmd() {
    if !e2e_enabled(
        "a_second_node_under_a_taken_name_fails_as_with_stock_epmd",
        &[],
    ) {
        return;
    }
    let lab = support::Lab::new(&["s", "d"]);
    let (s, d) = (lab.pod("s"), lab.pod("d"));
    let _epmd = s.spawn_stock_epmd();
    let mut sidecar = d.spawn_sidecar(&[]);
    let mut holders: Vec<BeamNode> = [s, d].iter().map(|p| p.spawn_erlang("taken")).collect();
    for h in &mut holders {
        h.wait_ready();
    }
    let second = |pod: &support::Pod| {
        let name = pod.node_name("taken");
        let out = pod.run(
            "erl",
            &[
                "-name",
                &name,
                "-setcookie",
                lab.cookie(),
                "-noshell",
                "-eval",
                "halt(0).",
            ],
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .replace(pod.host(), "HOST");
        (out.status.success(), text)
    };
    let stock = second(s);
    assert!(
        !stock.0,
        "stock epmd let a second node take the name: {}",
        stock.1
    );
    assert!(
        stock
            .1
            .contains("seems to be in use by another Erlang node"),
        "{}",
        stock.1
    );
    let ours = second(d);
    assert!(
        !ours.0,
        "the sidecar let a second node take the name: {}",
        ours.1
    );
    assert!(
        ours.1
            .contains("the name taken@HOST seems to be in use by another Erlang node"),
        "{}",
        ours.1
    );
    // The holders still answer, and the sidecar still lists its one.
    for (h, pod) in holders.iter_mut().zip([s, d]) {
        assert_eq!(h.name(), pod.node_name("taken"));
        let me = h.name().to_string();
        assert_eq!(h.rpc_node(&me), me);
    }
    assert!(d
        .http_get(support::sidecar::ADMIN_PORT, "/nodes")
        .contains("\"taken\""));
    sidecar.assert_running();
}

/// OTP's own tools and ways to start distribution, against sidecar pods
/// from a sidecar pod and from a stock-`epmd` pod: `erl_call` (a C node:
/// EPMD lookup, then its own handshake) reaches each of two nodes of a
/// pod; a `-hidden` node is connected but hidden; a node of
/// `-dist_listen false` (outgoing only, never registered) and one pinned
/// to a port with `inet_dist_listen_min/max` are reached and reach others;
/// distribution started at run time (`net_kernel:start/2`), stopped and
/// started again under another name leaves only the new name listed and
/// reachable; `pg` groups span pods; `erlang:monitor_node/2` delivers
/// `nodedown` when the remote node halts.
#[test]
fn erl_call_hidden_outgoing_only_and_run_time_distribution_across_pods() {
    if !e2e_enabled(
        "erl_call_hidden_outgoing_only_and_run_time_distribution_across_pods",
        &["erl_call"],
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b", "s"]);
    let (a, b, s) = (lab.pod("a"), lab.pod("b"), lab.pod("s"));
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar(&[]);
    let _epmd_s = s.spawn_stock_epmd();
    let args = |a: &str| ErlangOptions {
        extra_args: a.split(' ').map(String::from).collect(),
        ..Default::default()
    };
    let mut a1 = a.spawn_erlang("a1");
    let mut a2 = a.spawn_erlang("a2");
    let mut pinned = a.spawn_erlang_with(
        "p1",
        &args("-kernel inet_dist_listen_min 45100 inet_dist_listen_max 45100"),
    );
    let mut hidden = b.spawn_erlang_with("h1", &args("-hidden"));
    let mut outgoing = b.spawn_erlang_with("o1", &args("-dist_listen false"));
    let mut late = b.spawn_erlang_with(
        "rt",
        &ErlangOptions {
            no_name: true,
            ..Default::default()
        },
    );
    let mut s1 = s.spawn_erlang("s1");
    for node in [
        &mut a1,
        &mut a2,
        &mut pinned,
        &mut hidden,
        &mut outgoing,
        &mut late,
        &mut s1,
    ] {
        node.wait_ready();
    }
    let (a1_name, a2_name, p1_name) = (a.node_name("a1"), a.node_name("a2"), a.node_name("p1"));
    let h1_name = b.node_name("h1");

    // erl_call from another sidecar pod and from a stock pod, to each node.
    for (from, target) in [(b, &a2_name), (b, &a1_name), (s, &a2_name), (s, &a1_name)] {
        let out = from.run_ok(
            "erl_call",
            &["-name", target, "-c", lab.cookie(), "-a", "erlang node"],
        );
        assert_eq!(
            out.trim(),
            atom(target),
            "erl_call from pod {}",
            from.name()
        );
    }

    assert_eq!(hidden.ping(&a2_name), "pong");
    assert_eq!(a2.eval("nodes(hidden)."), format!("[{}]", atom(&h1_name)));
    assert!(!a2.nodes().contains(&h1_name), "a hidden node in nodes()");

    assert_eq!(outgoing.ping(&a1_name), "pong");
    assert_eq!(outgoing.ping(s1.name()), "pong");
    assert_eq!(outgoing.rpc_node(&p1_name), p1_name);
    assert_eq!(s1.rpc_node(&p1_name), p1_name, "stock pod -> pinned port");
    let b_names = s1.names(b.host()).expect("names of pod B");
    assert!(
        !b_names.iter().any(|(n, _)| n == "o1"),
        "a node of -dist_listen false registered: {b_names:?}"
    );

    // Distribution started at run time, stopped, started under another name.
    let start = |node: &mut BeamNode, name: &str| {
        node.eval(&format!(
            "element(1, net_kernel:start(['{name}', longnames]))."
        ))
    };
    let (rt1, rt2) = (b.node_name("rt1"), b.node_name("rt2"));
    assert_eq!(start(&mut late, &rt1), "ok");
    assert_eq!(s1.rpc_node(&rt1), rt1);
    assert_eq!(a1.ping(&rt1), "pong");
    assert_eq!(late.eval("net_kernel:stop()."), "ok");
    assert_eq!(start(&mut late, &rt2), "ok");
    let names: Vec<String> = s1
        .names(b.host())
        .expect("names of pod B")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(
        names.contains(&"rt2".to_string()) && !names.contains(&"rt1".to_string()),
        "pod B lists {names:?}"
    );
    assert_eq!(a2.rpc_node(&rt2), rt2);
    assert_eq!(a1.ping(&rt1), "pang", "the old name is gone");

    // pg across pods: a group joined on a1 is seen from rt2 (pod B).
    assert_eq!(
        a1.eval("{ok, P} = pg:start(dp_scope), unlink(P), ok = pg:join(dp_scope, grp, whereis(init)), ok."),
        "ok"
    );
    assert_eq!(
        late.eval("{ok, P} = pg:start(dp_scope), unlink(P), ok."),
        "ok"
    );
    assert_eq!(late.ping(&a1_name), "pong");
    wait_until(Duration::from_secs(10), "rt2 to see a1's pg member", || {
        late.eval("[node(P) || P <- pg:get_members(dp_scope, grp)].")
            == format!("[{}]", atom(&a1_name))
    });

    // monitor_node: a2 halts, s1 (stock pod) gets nodedown.
    let wait_down = s1.send(&format!(
        "{{eval, \"erlang:monitor_node({}, true), receive {{nodedown, N}} -> N after 15000 -> timeout end.\"}}",
        atom(&a2_name)
    ));
    assert_eq!(s1.ping(&a2_name), "pong");
    std::thread::sleep(Duration::from_millis(200));
    a2.halt();
    assert_eq!(s1.recv(wait_down, Duration::from_secs(20)), atom(&a2_name));

    for sidecar in [&mut sidecar_a, &mut sidecar_b] {
        sidecar.assert_running();
        sidecar.assert_no_misroute();
    }
}

/// A node started with `inet_dist_use_interface` set to its pod's address
/// (a common way to keep it off other interfaces) registers over loopback
/// but listens only on the pod address. With stock epmd its peers dial
/// that address; the sidecar finds the node's listener there when loopback
/// refuses, so the node is reached from another pod and from its own,
/// also by a node of its own pod with the helper module (the module once
/// got the node's loopback port for it, where nothing listened: `pang`),
/// and with the module itself.
#[test]
fn a_node_that_listens_on_the_pod_address_only_is_reached() {
    if !e2e_enabled(
        "a_node_that_listens_on_the_pod_address_only_is_reached",
        &[],
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let _sidecar_b = b.spawn_sidecar(&[]);
    let [o1, o2, o3, o4] = a.addr().octets();
    let on_pod_address = ErlangOptions {
        extra_args: [
            "-kernel".to_string(),
            "inet_dist_use_interface".to_string(),
            format!("{{{o1},{o2},{o3},{o4}}}"),
        ]
        .into(),
        ..Default::default()
    };
    let ebin = module::compile_module(&lab);
    let on_pod_address_with_module = {
        let mut o = module::with_module(&ebin);
        o.extra_args
            .extend(on_pod_address.extra_args.iter().cloned());
        o
    };
    let mut a1 = a.spawn_erlang_with("a1", &on_pod_address);
    let mut a2 = a.spawn_erlang("a2");
    let mut am = a.spawn_erlang_with("am", &module::with_module(&ebin));
    let mut ap = a.spawn_erlang_with("ap", &on_pod_address_with_module);
    let mut b1 = b.spawn_erlang("b1");
    for n in [&mut a1, &mut a2, &mut am, &mut ap, &mut b1] {
        n.wait_ready();
    }
    let a1_name = a.node_name("a1");
    let port = registered_field(a, "a1", "port").expect("a1 registered");
    let listening = a.run_ok("ss", &["-Htln", &format!("sport = :{port}")]);
    assert!(
        listening.contains(&format!("{}:{port}", a.addr()))
            && !listening.contains(&format!("127.0.0.1:{port}")),
        "a1 listens on the pod address only: {listening}"
    );
    assert_eq!(b1.ping(&a1_name), "pong", "b1 -> a1 from another pod");
    assert_eq!(b1.rpc_node(&a1_name), a1_name);
    assert_eq!(a2.ping(&a1_name), "pong", "a2 -> a1 from its own pod");
    assert_eq!(a1.ping(&b.node_name("b1")), "pong", "a1 -> b1");
    let ap_name = a.node_name("ap");
    assert_eq!(
        am.rpc_node(&a1_name),
        a1_name,
        "module node -> a1, same pod"
    );
    assert_eq!(
        am.rpc_node(&ap_name),
        ap_name,
        "module node -> ap, same pod"
    );
    assert_eq!(ap.rpc_node(&a1_name), a1_name, "ap -> a1, same pod");
    assert_eq!(
        ap.rpc_node(&b.node_name("b1")),
        b.node_name("b1"),
        "ap -> b1"
    );
    assert_eq!(b1.rpc_node(&ap_name), ap_name, "b1 -> ap");
    // A plain node's same-pod lookup of am opens a mirror listener on the
    // pod address at am's port, next to am's own loopback listener: am is
    // still handed out to module nodes as a loopback node. (Both new nodes
    // without `connect_all`, so that `global` connects neither to am.)
    let am_name = a.node_name("am");
    let alone = |mut o: ErlangOptions| {
        o.extra_args
            .extend(["-connect_all", "false"].map(String::from));
        o
    };
    let mut a3 = a.spawn_erlang_with("a3", &alone(ErlangOptions::default()));
    let mut am2 = a.spawn_erlang_with("am2", &alone(module::with_module(&ebin)));
    a3.wait_ready();
    am2.wait_ready();
    assert_eq!(a3.rpc_node(&am_name), am_name);
    sidecar_a.wait_log(
        "same-pod mirror listener opened node=am ",
        1,
        Duration::from_secs(5),
    );
    let refused = || {
        metric_sum(
            &metrics(a),
            "distproxy_epmd_requests_total",
            &[("type", "egress"), ("result", "local_not_on_loopback")],
        )
    };
    let before = refused();
    assert!(
        before >= 2.0,
        "am -> a1 and am -> ap were not refused: {before}"
    );
    assert_eq!(am2.rpc_node(&am_name), am_name, "am2 -> am, same pod");
    assert_eq!(refused(), before, "am was refused as off loopback");
    let failed = sidecar_a.log_lines_containing("failed to connect to node");
    assert!(failed.is_empty(), "{failed:#?}");
    sidecar_a.assert_running();
}

/// Nodes started with `-proto_dist inet6_tcp` register with their EPMD over
/// `::1` and look each other up over IPv6. OTP's `epmd` listens on both
/// families, and so does the sidecar's default configuration: both nodes
/// register, are listed, and reach each other.
#[test]
fn ipv6_nodes_register_and_connect_with_the_default_configuration() {
    if !e2e_enabled(
        "ipv6_nodes_register_and_connect_with_the_default_configuration",
        &[],
    ) {
        return;
    }
    let lab = support::Lab::new(&["v"]);
    let v = lab.pod("v");
    // A host name that resolves to IPv6 loopback only, for the short names.
    let hosts = std::path::Path::new("/etc/netns")
        .join(v.ns())
        .join("hosts");
    let mut text = std::fs::read_to_string(&hosts).unwrap();
    text.push_str("::1 pod-v6\n");
    std::fs::write(&hosts, text).unwrap();
    let mut sidecar = v.spawn_sidecar(&[]);
    let six = |name: &str| ErlangOptions {
        name: Some(format!("{name}@pod-v6")),
        short_names: true,
        // Loopback only, as every node behind a sidecar: IPv6 loopback
        // here, instead of the lab's IPv4 one.
        extra_args: ["-proto_dist", "inet6_tcp"]
            .into_iter()
            .chain(["-kernel", "inet_dist_use_interface", "{0,0,0,0,0,0,0,1}"])
            .map(String::from)
            .collect(),
        ..Default::default()
    };
    let mut six1 = v.spawn_erlang_with("six1", &six("six1"));
    let mut six2 = v.spawn_erlang_with("six2", &six("six2"));
    for node in [&mut six1, &mut six2] {
        node.wait_ready();
    }
    let names = six1.names("pod-v6").expect("names over IPv6");
    for want in ["six1", "six2"] {
        assert!(names.iter().any(|(n, _)| n == want), "{want} in {names:?}");
    }
    assert_eq!(six1.ping("six2@pod-v6"), "pong", "six1 -> six2 over IPv6");
    assert_eq!(six2.rpc_node("six1@pod-v6"), "six1@pod-v6");
    sidecar.assert_running();
}

/// A dual-stack cluster (every pod's name resolves to an IPv4 and an IPv6
/// address) with the sidecars' default configuration, which listens on both
/// families. `inet6_tcp` nodes named `app@<pod FQDN>` look each other up in
/// the other pod's EPMD over IPv6 and connect to its sidecar's distribution
/// port over IPv6, in both directions; the sidecar relays to the node on
/// `::1`. IPv4 nodes of the same pods keep working next to them.
#[test]
fn ipv6_nodes_in_two_dual_stack_pods_connect_through_the_sidecars() {
    if !e2e_enabled(
        "ipv6_nodes_in_two_dual_stack_pods_connect_through_the_sidecars",
        &["ss"],
    ) {
        return;
    }
    let lab = support::Lab::new_dual_stack(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    // The lab gives what a dual-stack cluster's DNS gives: both families
    // for one name.
    for pod in [a, b] {
        let v6 = a.run_ok("getent", &["ahostsv6", pod.host()]);
        assert!(
            v6.starts_with(&format!("{} ", pod.addr6())),
            "{} resolves to {} over IPv6: {v6}",
            pod.host(),
            pod.addr6()
        );
        let v4 = a.run_ok("getent", &["ahostsv4", pod.host()]);
        assert!(v4.starts_with(&format!("{} ", pod.addr())), "{v4}");
    }
    let mut sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar(&[]);
    let six = ErlangOptions::inet6();
    let mut a6 = a.spawn_erlang_with("a6", &six);
    let mut b6 = b.spawn_erlang_with("b6", &six);
    let mut a4 = a.spawn_erlang("a4");
    let mut b4 = b.spawn_erlang("b4");
    for node in [&mut a6, &mut b6, &mut a4, &mut b4] {
        node.wait_ready();
    }
    let (a6_name, b6_name) = (a.node_name("a6"), b.node_name("b6"));
    assert_eq!(a6.name(), a6_name);
    // The IPv6 nodes registered over IPv6 loopback.
    for (pod, short) in [(a, "a6"), (b, "b6")] {
        assert_eq!(
            registered_field(pod, short, "addr").as_deref(),
            Some("\"::1\""),
            "{short} registered with pod {}'s sidecar over ::1",
            pod.name()
        );
    }
    assert!(a6.nodes().is_empty() && b6.nodes().is_empty());

    // NAMES of pod B, asked at its IPv6 address: b6 (and b4) at the
    // sidecar's port.
    let segments: Vec<String> = b
        .addr6()
        .segments()
        .iter()
        .map(|g| format!("16#{g:x}"))
        .collect();
    let names = a6.rpc(
        &a6_name,
        "erl_epmd",
        "names",
        &format!("[{{{}}}]", segments.join(",")),
    );
    let b4_entry = format!("{{\"b4\",{DIST_PORT}}}");
    let b6_entry = format!("{{\"b6\",{DIST_PORT}}}");
    assert!(
        [
            format!("{{ok,[{b4_entry},{b6_entry}]}}"),
            format!("{{ok,[{b6_entry},{b4_entry}]}}")
        ]
        .contains(&names),
        "pod B's EPMD, asked over IPv6: {names}"
    );

    // The same with `distproxy names`, the address in brackets.
    let out = a.run_ok(
        &support::distproxy_bin(),
        &["names", "--host", &format!("[{}]", b.addr6())],
    );
    for short in ["b4", "b6"] {
        assert!(
            out.contains(&format!("name {short} at port {DIST_PORT}")),
            "distproxy names --host [{}]:\n{out}",
            b.addr6()
        );
    }

    // a6 -> b6: a lookup in pod B's sidecar, a connection to its
    // distribution port, relayed to b6.
    assert_eq!(a6.ping(&b6_name), "pong", "a6 -> b6 across pods");
    assert_eq!(a6.rpc_node(&b6_name), b6_name, "rpc a6 -> b6");
    assert_eq!(
        a6.rpc(&b6_name, "init", "get_argument", "[proto_dist]"),
        "{ok,[[\"inet6_tcp\"]]}",
        "b6 runs inet6_tcp"
    );
    assert_relayed_over_ipv6(b, a, "b6");
    // b6 -> a fresh node of pod A: through pod A's sidecar this time.
    let mut a7 = a.spawn_erlang_with("a7", &six);
    a7.wait_ready();
    let a7_name = a.node_name("a7");
    assert_eq!(b6.rpc_node(&a7_name), a7_name, "rpc b6 -> a7 across pods");
    assert_relayed_over_ipv6(a, b, "a7");
    // a6 -> a7, both of pod A, by the pod's name (its IPv6 address): the
    // lookup is answered with a7's own port, mirrored on the pod's IPv6
    // address by the sidecar (a7 listens on ::1 only).
    assert_eq!(a6.rpc_node(&a7_name), a7_name, "rpc a6 -> a7 in pod A");
    let same_pod = metric_sum(
        &metrics(a),
        "distproxy_epmd_requests_total",
        &[("type", "port_please2"), ("result", "same_pod")],
    );
    // (global may have connected a7 and a6 already, after b6 -> a7.)
    assert!(same_pod >= 1.0, "a lookup of a7 answered as same-pod");
    let mirror = format!("[{}]:", a.addr6());
    assert!(
        a.listening_tcp()
            .iter()
            .any(|l| format!("{}", l.addr).starts_with(&mirror)),
        "a mirror listener on pod A's IPv6 address: {:?}",
        a.listening_tcp()
    );
    // The connection a6 opened is the one b6 uses back.
    assert_eq!(b6.rpc_node(&a6_name), a6_name, "rpc b6 -> a6");
    assert_eq!(b6.nodes(), {
        let mut v = vec![a6_name.clone(), a7_name.clone()];
        v.sort();
        v
    });

    // IPv4 nodes of the same pods, same names' A records, same sidecars.
    assert_eq!(a4.ping(b4.name()), "pong", "a4 -> b4 over IPv4");
    assert_eq!(
        metric_sum(
            &metrics(b),
            "distproxy_dist_connections_open",
            &[("node", "b4"), ("direction", "inbound")]
        ),
        1.0,
        "a4 -> b4 went through pod B's sidecar"
    );
    for s in [&mut sidecar_a, &mut sidecar_b] {
        s.assert_no_misroute();
    }
}

/// One field of node `short` in the pod's sidecar's `/nodes` (JSON text).
fn registered_field(pod: &Pod, short: &str, key: &str) -> Option<String> {
    let body = pod.http_get(ADMIN_PORT, "/nodes");
    let nodes: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/nodes is not JSON ({e}): {body}"));
    nodes
        .as_array()?
        .iter()
        .find(|n| n["name"] == short)
        .map(|n| n[key].to_string())
}

/// Pod `to`'s sidecar holds one inbound relayed connection for node
/// `short` (metrics and `/nodes`), and it came from pod `from`'s IPv6
/// address to the sidecar's distribution port on pod `to`'s IPv6 address.
fn assert_relayed_over_ipv6(to: &Pod, from: &Pod, short: &str) {
    let text = metrics(to);
    assert_eq!(
        metric_sum(
            &text,
            "distproxy_dist_connections_open",
            &[("node", short), ("direction", "inbound")]
        ),
        1.0,
        "pod {}'s sidecar relays one connection to {short}:\n{text}",
        to.name()
    );
    assert_eq!(
        registered_field(to, short, "open_connections").as_deref(),
        Some("1"),
        "/nodes of pod {} counts the connection to {short}",
        to.name()
    );
    let local = format!("[{}]:{DIST_PORT}", to.addr6());
    let peer = format!("[{}]:", from.addr6());
    let filter = format!("( sport = :{DIST_PORT} )");
    let sockets = to.run_ok("ss", &["-Htn", "state", "established", &filter]);
    assert!(
        sockets
            .lines()
            .any(|l| l.contains(&local) && l.contains(&peer)),
        "pod {}: no connection {peer}* -> {local} (the distribution port over IPv6):\n{sockets}",
        to.name()
    );
}

/// The manifests' Deployment, whose application container's environment
/// the release tests start releases with.
const MANIFEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/kubernetes/base/deployment.yaml"
);

/// The environment the manifests give the application container that
/// matters to a release, in this order: `ERL_FLAGS` (its `-pa /distproxy`,
/// the init container's volume, pointing at `dir` instead), then
/// `RELEASE_MODE` and `CODE_LOADING_MODE` where set, read from
/// [`MANIFEST`] (`- name:` / `value:` pairs).
fn manifest_env(dir: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(MANIFEST).expect("read the Deployment manifest");
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let value = |name: &str| {
        lines.windows(2).find_map(|w| {
            let declared = w[0].strip_prefix("- name:")?.split_whitespace().next()?;
            (declared == name).then_some(())?;
            w[1].strip_prefix("value:")
                .map(|v| v.trim().trim_matches('"').to_string())
        })
    };
    let flags = value("ERL_FLAGS").expect("the manifest's ERL_FLAGS");
    assert!(flags.contains("-pa /distproxy "), "{flags}");
    let flags = flags.replace("-pa /distproxy ", &format!("-pa {} ", dir.display()));
    let mut env = vec![("ERL_FLAGS".to_string(), flags)];
    for name in ["RELEASE_MODE", "CODE_LOADING_MODE"] {
        env.extend(value(name).map(|v| (name.to_string(), v)));
    }
    env
}

/// `(name, value)` pairs as the `&str` pairs `Command::envs` takes.
fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Runs a build tool (`mix`, `rebar3`) in `dir` on the host, offline,
/// with `HOME` in the lab; panics with its output unless it succeeds.
fn build(lab: &support::Lab, dir: &Path, program: &str, args: &[&str]) {
    let out = Command::new("timeout")
        .args(["-k", "2", BUILD_TIMEOUT_SECS, program])
        .args(args)
        .current_dir(dir)
        .env("HOME", lab.dir())
        .env("MIX_ENV", "prod")
        .env_remove("ERL_FLAGS")
        .env_remove("ELIXIR_ERL_OPTIONS")
        .env_remove("ERL_LIBS")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        output_text(&out)
    );
}

/// A tiny `mix release`, generated offline (`mix new`, no dependencies) in
/// the lab directory; returns the project directory. `module_in_src` puts
/// `distproxy_epmd.erl` into the project's `src/`, so the release carries
/// the helper module.
fn mix_release(lab: &support::Lab, project: &str, module_in_src: bool) -> PathBuf {
    build(lab, lab.dir(), "mix", &["new", project]);
    let root = lab.dir().join(project);
    if module_in_src {
        std::fs::create_dir_all(root.join("src")).unwrap();
        std::fs::copy(module::MODULE_SRC, root.join("src/distproxy_epmd.erl")).unwrap();
    }
    build(lab, &root, "mix", &["release", "--quiet"]);
    root
}

/// `bin/<project> ARGS` of the release in `root`, inside `pod`, with the
/// environment a Kubernetes user gives it: `RELEASE_DISTRIBUTION=name`,
/// `RELEASE_NODE`, `RELEASE_COOKIE`, the manifests' `ERL_FLAGS`, and
/// `extra` (e.g. `RELEASE_MODE`).
fn release_command(
    pod: &Pod,
    root: &Path,
    project: &str,
    node: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> Command {
    let bin = root.join(format!("_build/prod/rel/{project}/bin/{project}"));
    let mut cmd = pod.command("timeout");
    cmd.args(["-k", "2", RELEASE_TIMEOUT_SECS])
        .arg(bin)
        .args(args);
    cmd.env("RELEASE_DISTRIBUTION", "name")
        .env("RELEASE_NODE", node)
        .env("RELEASE_COOKIE", pod.lab().cookie.as_str())
        .env("RELEASE_TMP", root.join(format!("tmp-{}", pod.name())))
        // A node that cannot start writes no crash dump into the lab.
        .env("ERL_CRASH_DUMP_SECONDS", "0");
    cmd.envs(env.iter().copied());
    cmd
}

/// Output of a finished command, stdout and stderr.
fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Starts the release (`bin/<project> start`, in the foreground) in `pod`
/// and waits until its node is registered with the pod's sidecar.
fn start_release(
    pod: &Pod,
    root: &Path,
    project: &str,
    node: &str,
    env: &[(&str, &str)],
) -> support::process::Proc {
    let cmd = release_command(pod, root, project, node, env, &["start"]);
    spawn_registered(pod, cmd, node)
}

/// Spawns `cmd`, a release in the foreground whose node is `node`, its
/// output in a lab log, and waits until the node is registered with the
/// pod's sidecar; fails with the log if it exits first.
fn spawn_registered(pod: &Pod, mut cmd: Command, node: &str) -> support::process::Proc {
    let short = node.split_once('@').map_or(node, |(s, _)| s).to_string();
    let log = pod.lab().file(&short, "log");
    let file = std::fs::File::create(&log).unwrap();
    cmd.stdout(file.try_clone().unwrap()).stderr(file);
    let mut proc = support::process::Proc::spawn(&format!("release {node}"), &mut cmd, &log);
    wait_until(
        RELEASE_BOOT,
        &format!("release node {node} to register"),
        || {
            assert!(
                proc.exited().is_none(),
                "release {node} exited:\n{}",
                proc.log_text()
            );
            pod.epmd_names().contains(&format!("name {short} at port"))
        },
    );
    proc
}

/// Elixir releases as users deploy them behind the sidecar, with the
/// manifests' `ERL_FLAGS` (helper module from `-pa`, the init container's
/// directory), named after the pod's IP through `RELEASE_DISTRIBUTION=name`
/// and `RELEASE_NODE`, the cookie in `RELEASE_COOKIE`. A release boots in
/// embedded mode, which loads only the release's modules: with `ERL_FLAGS`
/// alone the module in the `-pa` directory is undefined and the node stops
/// at boot with the error deploy/README.md ("Releases") quotes. With the
/// manifests' whole environment (their `RELEASE_MODE`) it starts; so does a
/// release that carries the module in embedded mode. Each release node
/// reaches a node of another pod and is reached from it, and `bin/app rpc`
/// (as through `kubectl exec`) answers from it.
#[test]
fn a_mix_release_with_the_helper_module_boots_in_the_documented_ways() {
    if !e2e_enabled(
        "a_mix_release_with_the_helper_module_boots_in_the_documented_ways",
        &["elixir", "mix"],
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let mut sidecars = [a, b].map(|p| p.spawn_sidecar(&[]));
    let dir = module::install_module(&lab);
    let manifest = manifest_env(&dir);
    let env = pairs(&manifest);
    let flags = [env[0]];
    let mut a1 = a.spawn_erlang("a1");
    let plain = mix_release(&lab, "app", false);
    a1.wait_ready();
    let node = format!("app@{}", b.addr());

    // Embedded mode (the release's default): the node does not start.
    let out = release_command(b, &plain, "app", &node, &flags, &["start"])
        .output()
        .expect("run bin/app start");
    let text = output_text(&out);
    assert!(!out.status.success(), "the release started:\n{text}");
    assert!(
        text.contains("{undef,[{distproxy_epmd,start_link,[],[]}"),
        "not the documented error:\n{text}"
    );
    assert!(!b.epmd_names().contains("name app at"));

    // The manifests' environment (RELEASE_MODE=interactive): it starts and
    // loads the module from -pa.
    let release = start_release(b, &plain, "app", &node, &env);
    let check = format!(
        "IO.puts(inspect({{node(), :code.get_mode(), :net_kernel.epmd_module(), \
         :code.which(:distproxy_epmd), Node.ping(:\"{}\")}}))",
        a1.name()
    );
    let answer = |root: &Path, project: &str, node: &str| {
        let out = release_command(b, root, project, node, &env, &["rpc", &check])
            .output()
            .expect("run bin/app rpc");
        assert!(
            out.status.success(),
            "bin/{project} rpc:\n{}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let module_beam = dir.join("distproxy_epmd.beam");
    assert_eq!(
        answer(&plain, "app", &node),
        format!(
            "{{:\"{node}\", :interactive, :distproxy_epmd, '{}', :pong}}",
            module_beam.display()
        )
    );
    assert_eq!(a1.rpc_node(&node), node, "a1 -> the release node");
    drop(release);

    // The module compiled into the release, ERL_FLAGS alone: embedded mode
    // kept.
    let carried = mix_release(&lab, "app2", true);
    let node2 = format!("app2@{}", b.addr());
    let _release2 = start_release(b, &carried, "app2", &node2, &flags);
    // (The boot script loads the module from the first directory of the
    // code path that has it: the -pa one, the same module.)
    let got = answer(&carried, "app2", &node2);
    assert!(
        got.starts_with(&format!("{{:\"{node2}\", :embedded, :distproxy_epmd, '"))
            && got.ends_with("/distproxy_epmd.beam', :pong}"),
        "{got}"
    );
    assert_eq!(a1.rpc_node(&node2), node2, "a1 -> the second release node");
    for s in &mut sidecars {
        s.assert_running();
        s.assert_no_misroute();
    }
}

/// An Erlang release of rebar3 (relx), its node name and cookie in
/// `config/vm.args`: with the manifests' `ERL_FLAGS` alone, in embedded
/// mode (the start script's default), the node stops at boot with the
/// documented error; with the manifests' whole environment (their
/// `CODE_LOADING_MODE`) it loads the module from `-pa`, is reached from
/// another pod and reaches a node there through the tunnel.
#[test]
fn a_rebar3_release_with_the_helper_module_boots_with_interactive_loading() {
    if !e2e_enabled(
        "a_rebar3_release_with_the_helper_module_boots_with_interactive_loading",
        &["rebar3"],
    ) {
        return;
    }
    let lab = support::Lab::new(&["a", "b"]);
    let (a, b) = (lab.pod("a"), lab.pod("b"));
    let mut sidecars = [a, b].map(|p| p.spawn_sidecar(&[]));
    let dir = module::install_module(&lab);
    let manifest = manifest_env(&dir);
    let env = pairs(&manifest);
    let mut a1 = a.spawn_erlang("a1");
    let mut a2 = a.spawn_erlang("a2");
    build(&lab, lab.dir(), "rebar3", &["new", "release", "rapp"]);
    let root = lab.dir().join("rapp");
    let node = format!("rapp@{}", b.addr());
    std::fs::write(
        root.join("config/vm.args"),
        format!("-name {node}\n-setcookie {}\n", lab.cookie()),
    )
    .unwrap();
    build(&lab, &root, "rebar3", &["as", "prod", "release"]);
    let bin = root.join("_build/prod/rel/rapp/bin/rapp");
    let foreground = |env: &[(&str, &str)]| {
        let mut cmd = b.command("timeout");
        cmd.args(["-k", "2", RELEASE_TIMEOUT_SECS])
            .arg(&bin)
            .arg("foreground");
        cmd.env("ERL_CRASH_DUMP_SECONDS", "0")
            .envs(env.iter().copied());
        cmd
    };
    for node in [&mut a1, &mut a2] {
        node.wait_ready();
    }

    let out = foreground(&env[..1])
        .output()
        .expect("run bin/rapp foreground");
    let text = output_text(&out);
    assert!(!out.status.success(), "the release started:\n{text}");
    assert!(
        text.contains("{undef,[{distproxy_epmd,start_link,[],[]}"),
        "not the documented error:\n{text}"
    );

    let _release = spawn_registered(b, foreground(&env), &node);
    assert_eq!(a1.rpc_node(&node), node, "a1 -> the release node");
    assert_eq!(a1.rpc(&node, "code", "get_mode", "[]"), "interactive");
    assert_eq!(
        a1.rpc(&node, "net_kernel", "epmd_module", "[]"),
        "distproxy_epmd"
    );
    // Its own connection out, through the tunnel: pod A's sidecar routes
    // it by the preamble.
    let preamble = || {
        metric_sum(
            &metrics(a),
            "distproxy_routes_total",
            &[("method", "preamble")],
        )
    };
    let before = preamble();
    assert_eq!(
        a1.rpc(&node, "net_adm", "ping", &format!("[{}]", atom(a2.name()))),
        "pong",
        "the release node -> a2"
    );
    assert_eq!(
        preamble(),
        before + 1.0,
        "the release node -> a2 through the tunnel"
    );
    for s in &mut sidecars {
        s.assert_running();
        s.assert_no_misroute();
    }
}
