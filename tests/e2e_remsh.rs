//! End-to-end tests of `distproxy remsh` (`src/remsh/`) with real OTP nodes
//! in the namespace lab, through a forwarded port that behaves as
//! `kubectl port-forward` does.
//!
//! The "laptop" is a namespace of its own with its link down (no route to
//! any pod) and a hosts file that knows only `localhost`, so no pod name
//! resolves there. The forward is a `socat` listening on the laptop's
//! loopback that, for each connection, starts a second `socat` inside the
//! pod's namespace (`ip netns exec`) connected to it over a pipe: the
//! forwarded connection reaches the pod's sidecar from the pod's own
//! loopback, as the kubelet's does. Shells are driven through a pty
//! (`script`), the way an operator types into them: OTP 25 only honours
//! `-remsh` with a terminal.
//!
//! Needs root, iproute2, erlang-nox, socat and util-linux `script`; fails
//! saying so otherwise, unless `DISTPROXY_SKIP_E2E=1`.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use distproxy_testkit::certs::{Ca, SecretDir};
use support::process::Proc;
use support::wait::poll_until;
use support::{distproxy_bin, e2e_enabled, Lab, Pod, SidecarOptions, DIST_PORT};

/// The laptop's end of the forward.
const FORWARD_PORT: u16 = 17001;
/// Deadline for a shell to come up, answer, or exit.
const SHELL_TIMEOUT: Duration = Duration::from_secs(30);

/// Cuts `laptop` off the lab: link down, no address, a hosts file that
/// names nothing but localhost.
fn isolate(laptop: &Pod) {
    for args in [
        vec!["-n", laptop.ns(), "link", "set", "eth0", "down"],
        vec!["-n", laptop.ns(), "addr", "flush", "dev", "eth0"],
    ] {
        let status = Command::new("ip").args(&args).status().unwrap();
        assert!(status.success(), "ip {args:?}");
    }
    let hosts = Path::new("/etc/netns").join(laptop.ns()).join("hosts");
    std::fs::write(hosts, "127.0.0.1 localhost\n::1 localhost\n").unwrap();
}

/// The forward: socat on the laptop's loopback `port`, one socat per
/// connection inside `pod` connected to its sidecar on 127.0.0.1 (through a
/// script: socat's EXEC would split the inner address at its colons).
fn forward_command(lab: &Lab, pod: &Pod, port: u16) -> String {
    use std::os::unix::fs::PermissionsExt;
    let relay = lab.dir().join(format!("relay-{}.sh", pod.name()));
    std::fs::write(
        &relay,
        format!(
            "#!/bin/sh\nexec ip netns exec {} socat STDIO TCP:127.0.0.1:{DIST_PORT}\n",
            pod.ns()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&relay, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "socat TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork EXEC:{}",
        relay.display()
    )
}

fn start_forward(lab: &Lab, laptop: &Pod, pod: &Pod, port: u16) -> Proc {
    let log = lab.dir().join(format!("forward-{port}.log"));
    let mut cmd = laptop.command("sh");
    cmd.args(["-c", &format!("exec {}", forward_command(lab, pod, port))])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut proc = Proc::spawn("socat forward", &mut cmd, &log);
    laptop.wait_listening(port, Duration::from_secs(10), Some(&mut proc));
    proc
}

fn cookie_file(lab: &Lab) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = lab.dir().join("cookie");
    std::fs::write(&path, format!("{}\n", lab.cookie())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// `distproxy remsh ARGS` in the laptop, behind a pty, its screen in a log.
struct Shell {
    proc: Proc,
    stdin: std::process::ChildStdin,
    label: String,
}

impl Shell {
    fn start(lab: &Lab, laptop: &Pod, label: &str, args: &[&str], path: Option<&str>) -> Shell {
        let log = lab.dir().join(format!("shell-{label}.log"));
        let line = std::iter::once(distproxy_bin())
            .chain(std::iter::once("remsh".to_string()))
            .chain(args.iter().map(|a| format!("'{a}'")))
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = laptop.command("script");
        cmd.args(["-qefc", &line, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            // A terminal the shell can drive: with a dumb one OTP 25 falls
            // back to a local shell and ignores -remsh.
            .env("TERM", "xterm");
        if let Some(path) = path {
            cmd.env("PATH", path);
        }
        let mut proc = Proc::spawn(&format!("remsh shell {label}"), &mut cmd, &log);
        let stdin = proc.child_mut().stdin.take().expect("piped stdin");
        Shell {
            proc,
            stdin,
            label: label.to_string(),
        }
    }

    fn screen(&self) -> String {
        self.proc.log_text()
    }

    /// Waits until the screen shows `needle`; panics with it otherwise.
    fn wait_for(&mut self, needle: &str) {
        let ok = poll_until(SHELL_TIMEOUT, Duration::from_millis(50), || {
            self.screen().contains(needle)
        });
        assert!(
            ok,
            "shell {}: no {needle:?} within {SHELL_TIMEOUT:?}; screen:\n{}",
            self.label,
            self.screen()
        );
    }

    fn type_line(&mut self, line: &str) {
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Evaluates an expression that prints the evaluating node's name
    /// reversed (so the typed line and the prompt cannot match it), and
    /// returns that node's name. `iex`: in Elixir syntax.
    fn evaluating_node(&mut self, tag: &str) -> String {
        self.evaluate_node(tag, false)
    }

    fn evaluate_node(&mut self, tag: &str, iex: bool) -> String {
        let (line, typed) = if iex {
            (
                format!("IO.puts(\"{tag}=\" <> String.reverse(Atom.to_string(node())) <> \"=\")"),
                "IO.puts",
            )
        } else {
            (
                format!("io:format(\"{tag}=~s=~n\", [lists:reverse(atom_to_list(node()))])."),
                "io:format",
            )
        };
        self.type_line(&line);
        let marker = format!("{tag}=");
        // The answer line, not the typed one (which holds `io:format`).
        let answer = |screen: &str| -> Option<String> {
            screen.lines().find_map(|l| {
                if l.contains(typed) {
                    return None;
                }
                let rest = &l[l.find(&marker)? + marker.len()..];
                let reversed = &rest[..rest.find('=')?];
                Some(reversed.chars().rev().collect())
            })
        };
        let mut found = None;
        let ok = poll_until(SHELL_TIMEOUT, Duration::from_millis(50), || {
            found = answer(&self.screen());
            found.is_some()
        });
        assert!(
            ok,
            "shell {}: no answer; screen:\n{}",
            self.label,
            self.screen()
        );
        found.unwrap()
    }

    /// ^G then `q`: the local node stops, the remote one stays.
    fn quit(mut self) -> ExitStatus {
        self.stdin.write_all(b"\x07").unwrap();
        self.stdin.flush().unwrap();
        self.wait_for("-->");
        self.type_line("q");
        self.wait_exit()
    }

    fn wait_exit(mut self) -> ExitStatus {
        let status = self.proc.wait_exit(SHELL_TIMEOUT);
        status.unwrap_or_else(|| {
            panic!(
                "shell {} still running after {SHELL_TIMEOUT:?}; screen:\n{}",
                self.label,
                self.screen()
            )
        })
    }
}

/// Two shells into two different nodes of one pod, through the same
/// forwarded port, at the same time; each evaluates on its node.
#[test]
fn two_shells_into_two_nodes_through_one_forwarded_port() {
    if !e2e_enabled(
        "two_shells_into_two_nodes_through_one_forwarded_port",
        &["socat", "script", "elixir"],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "l"]);
    let (pod, laptop) = (lab.pod("a"), lab.pod("l"));
    isolate(laptop);
    let sidecar = pod.spawn_sidecar(&[]);
    let mut a1 = pod.spawn_erlang("a1");
    let mut a2 = pod.spawn_erlang("a2");
    let mut e3 = pod.spawn_elixir("e3");
    a1.wait_ready();
    a2.wait_ready();
    e3.wait_ready();
    // The laptop cannot reach the pod but through the forward.
    let route = Command::new("ip")
        .args(["-n", laptop.ns(), "route", "get", &pod.addr().to_string()])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!route.success(), "the laptop has a route to the pod");
    let _forward = start_forward(&lab, laptop, pod, FORWARD_PORT);
    let cookie = cookie_file(&lab);
    let via = format!("127.0.0.1:{FORWARD_PORT}");
    let cookie = cookie.display().to_string();
    let (n1, n2) = (pod.node_name("a1"), pod.node_name("a2"));

    let mut s1 = Shell::start(
        &lab,
        laptop,
        "a1",
        &[&n1, "--via", &via, "--cookie-file", &cookie],
        None,
    );
    let mut s2 = Shell::start(
        &lab,
        laptop,
        "a2",
        &[&n2, "--via", &via, "--cookie-file", &cookie],
        None,
    );
    s1.wait_for(&format!("({n1})1>"));
    s2.wait_for(&format!("({n2})1>"));
    assert_eq!(s1.evaluating_node("ONE"), n1);
    assert_eq!(s2.evaluating_node("TWO"), n2);
    // Both at once: each node is connected to its own shell's node.
    let remsh_of = |nodes: Vec<String>| -> Vec<String> {
        nodes
            .into_iter()
            .filter(|n| n.starts_with("remsh-"))
            .collect()
    };
    let (r1, r2) = (remsh_of(a1.nodes()), remsh_of(a2.nodes()));
    assert_eq!(r1.len(), 1, "a1 nodes(): {r1:?}");
    assert_eq!(r2.len(), 1, "a2 nodes(): {r2:?}");
    assert_ne!(r1, r2, "two shells, two local nodes");
    // They came through the forward: from the pod's loopback, routed by
    // the preamble naming each target.
    let routed = sidecar.log_lines_containing("tunnel connection routed by preamble");
    for (target, local) in [(&n1, &r1[0]), (&n2, &r2[0])] {
        assert!(
            routed.iter().any(|l| l.contains("peer=127.0.0.1:")
                && l.contains(&format!("target={target}"))
                && l.contains(&format!("initiator={local}"))),
            "no preamble route of {local} to {target} from loopback:\n{routed:#?}"
        );
    }
    assert!(s1.quit().success());
    // The other shell is not disturbed by the first one leaving.
    assert_eq!(s2.evaluating_node("AGAIN"), n2);
    // An Elixir shell into the pod's Elixir node, while s2 stays open.
    let n3 = pod.node_name("e3");
    let mut s3 = Shell::start(
        &lab,
        laptop,
        "e3",
        &[&n3, "--via", &via, "--cookie-file", &cookie, "--iex"],
        None,
    );
    s3.wait_for(&format!("iex({n3})1>"));
    assert_eq!(s3.evaluate_node("IEX", true), n3);
    assert!(s3.quit().success());
    assert!(s2.quit().success());
    // The remote nodes live on.
    assert_eq!(a1.rpc_node(&n2), n2);
}

/// Clear errors, before any shell starts: nothing listening on --via, a
/// node not registered in the pod, erl not on PATH.
#[test]
fn clear_errors_before_the_shell() {
    if !e2e_enabled("clear_errors_before_the_shell", &["socat", "script"]) {
        return;
    }
    let lab = Lab::new(&["a", "l"]);
    let (pod, laptop) = (lab.pod("a"), lab.pod("l"));
    isolate(laptop);
    let _sidecar = pod.spawn_sidecar(&[]);
    let mut a1 = pod.spawn_erlang("a1");
    a1.wait_ready();
    let _forward = start_forward(&lab, laptop, pod, FORWARD_PORT);
    let cookie = cookie_file(&lab).display().to_string();
    let via = format!("127.0.0.1:{FORWARD_PORT}");
    let n1 = pod.node_name("a1");
    let remsh = |args: &[&str], path: Option<&str>| {
        // Through `env`: `ip netns exec` itself must still be found.
        let mut cmd = laptop.command("env");
        if let Some(p) = path {
            cmd.arg(format!("PATH={p}"));
        }
        cmd.arg(distproxy_bin()).arg("remsh").args(args);
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, err) = remsh(
        &[&n1, "--via", "127.0.0.1:17009", "--cookie-file", &cookie],
        None,
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot reach the pod at 127.0.0.1:17009"),
        "{err}"
    );

    let a9 = pod.node_name("a9");
    let (code, err) = remsh(&[&a9, "--via", &via, "--cookie-file", &cookie], None);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("{a9} is not registered in that pod")),
        "{err}"
    );

    let (code, err) = remsh(
        &[&n1, "--via", &via, "--cookie-file", &cookie],
        Some("/nonexistent"),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("erl is not on PATH"), "{err}");
}

/// A pod that requires TLS and lets shells in only with an operator's
/// certificate (`[[acl]]` by identity): a shell without TLS is refused with
/// a clear error and the rule in the pod's log; with the certificate, the
/// shell works, over TLS, through `--via pod/a` (a `kubectl` that runs the
/// same forward).
#[test]
fn a_shell_through_tls_with_an_operator_certificate() {
    if !e2e_enabled(
        "a_shell_through_tls_with_an_operator_certificate",
        &["socat", "script"],
    ) {
        return;
    }
    let lab = Lab::new(&["a", "l"]);
    let (pod, laptop) = (lab.pod("a"), lab.pod("l"));
    isolate(laptop);
    let ca = Ca::new("dp-remsh-ca");
    let pod_leaf = ca.leaf(&[pod.host(), &pod.addr().to_string()], 11);
    let ops_leaf = ca.leaf(&["laptop.ops.dp.test"], 12);
    let pod_dir = lab.dir().join("tls-pod");
    let ops_dir = lab.dir().join("tls-ops");
    std::fs::create_dir_all(&pod_dir).unwrap();
    std::fs::create_dir_all(&ops_dir).unwrap();
    let pod_secret = SecretDir::create(&pod_dir, &pod_leaf.cert_pem, &pod_leaf.key_pem, &ca.pem);
    let ops = SecretDir::create(&ops_dir, &ops_leaf.cert_pem, &ops_leaf.key_pem, &ca.pem);
    let toml = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n\
         require_tls = true\nbind_node_names = true\n\n\
         [[acl]]\nname = \"ops-over-tls\"\naction = \"allow\"\ninitiator = \"remsh-*\"\nidentity = \"*.ops.dp.test\"\n\n\
         [[acl]]\nname = \"no-plain-shells\"\naction = \"deny\"\ninitiator = \"remsh-*\"\n",
        pod_secret.cert_file().display(),
        pod_secret.key_file().display(),
        pod_secret.ca_file().display(),
    );
    let sidecar = pod.spawn_sidecar_with(SidecarOptions::default().config(&toml));
    let mut a1 = pod.spawn_erlang("a1");
    a1.wait_ready();
    let cookie = cookie_file(&lab).display().to_string();
    let n1 = pod.node_name("a1");

    // Without TLS: refused by the pod's policy, said clearly.
    let _forward = start_forward(&lab, laptop, pod, FORWARD_PORT);
    let out = laptop
        .command(&distproxy_bin())
        .args(["remsh", &n1, "--via", &format!("127.0.0.1:{FORWARD_PORT}")])
        .args(["--cookie-file", &cookie])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the pod's policy refused"), "{err}");
    sidecar.wait_log("rule=no-plain-shells", 1, Duration::from_secs(5));

    // A kubectl whose port-forward is the same relay on another port.
    let bin = lab.dir().join("kubectl-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let port = FORWARD_PORT + 1;
    let args_log = lab.dir().join("kubectl.args");
    let script = format!(
        "#!/bin/sh\n\
         echo \"$@\" > {args}\n\
         {forward} &\n\
         pid=$!\n\
         while ! grep -qi ':{port:04X} ' /proc/net/tcp; do sleep 0.05; done\n\
         echo 'Forwarding from 127.0.0.1:{port} -> {DIST_PORT}'\n\
         wait $pid\n",
        args = args_log.display(),
        forward = forward_command(&lab, pod, port),
    );
    let kubectl = bin.join("kubectl");
    std::fs::write(&kubectl, script).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&kubectl, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut shell = Shell::start(
        &lab,
        laptop,
        "tls",
        &[
            &n1,
            "--via",
            "pod/a.lab",
            "--cookie-file",
            &cookie,
            "--tls-cert",
            &ops.cert_file().display().to_string(),
            "--tls-key",
            &ops.key_file().display().to_string(),
            "--tls-ca",
            &ops.ca_file().display().to_string(),
        ],
        Some(&path),
    );
    shell.wait_for(&format!("({n1})1>"));
    assert_eq!(shell.evaluating_node("TLS"), n1);
    let args = std::fs::read_to_string(&args_log).unwrap();
    assert_eq!(
        args.trim(),
        format!("port-forward pod/a -n lab --address 127.0.0.1 :{DIST_PORT}")
    );
    // Over TLS, named after the certificate, let in by the identity rule.
    let local = "remsh-";
    let tls_routes: Vec<String> = sidecar
        .log_lines_containing("tunnel connection routed by preamble")
        .into_iter()
        .filter(|l| l.contains("transport=\"tls\"") && l.contains(local))
        .collect();
    assert!(
        tls_routes
            .iter()
            .any(|l| l.contains("@laptop.ops.dp.test") && l.contains("peer=127.0.0.1:")),
        "{tls_routes:#?}\n{}",
        sidecar.log()
    );
    assert!(shell.quit().success());
}

/// A node named by its pod's IPv6 address (a Deployment in an IPv6-only
/// cluster: `a6@fd00:…`, running `inet6_tcp`) through the forward. OTP's
/// `inet_tcp` calls such a host illegal, so the shell's node runs
/// `inet6_tcp` on `::1` and registers with the ephemeral sidecar there; it
/// used to run `inet_tcp` and the shell ended with `** Hostname … is
/// illegal **`.
#[test]
fn a_shell_into_a_node_named_by_an_ipv6_address() {
    if !e2e_enabled(
        "a_shell_into_a_node_named_by_an_ipv6_address",
        &["socat", "script"],
    ) {
        return;
    }
    let lab = Lab::new_dual_stack(&["a", "l"]);
    let (pod, laptop) = (lab.pod("a"), lab.pod("l"));
    isolate(laptop);
    let sidecar = pod.spawn_sidecar(&[]);
    let a6_name = format!("a6@{}", pod.addr6());
    let mut six = support::beam::ErlangOptions::inet6();
    six.name = Some(a6_name.clone());
    let mut a6 = pod.spawn_erlang_with("a6", &six);
    a6.wait_ready();
    let _forward = start_forward(&lab, laptop, pod, FORWARD_PORT);
    let cookie = cookie_file(&lab).display().to_string();
    let via = format!("127.0.0.1:{FORWARD_PORT}");
    let mut shell = Shell::start(
        &lab,
        laptop,
        "a6",
        &[&a6_name, "--via", &via, "--cookie-file", &cookie],
        None,
    );
    shell.wait_for(&format!("({a6_name})1>"));
    assert_eq!(shell.evaluating_node("SIX"), a6_name);
    let remsh: Vec<String> = a6
        .nodes()
        .into_iter()
        .filter(|n| n.starts_with("remsh-"))
        .collect();
    assert_eq!(remsh.len(), 1, "a6 nodes(): {remsh:?}");
    let routed = sidecar.log_lines_containing("tunnel connection routed by preamble");
    assert!(
        routed
            .iter()
            .any(|l| l.contains(&format!("target={a6_name}"))),
        "routed by preamble to {a6_name}:\n{routed:#?}"
    );
    assert!(shell.quit().success());
    assert_eq!(a6.rpc_node(&a6_name), a6_name, "a6 lives on");
}
