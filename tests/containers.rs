//! The container path, for real: the image built from
//! `deploy/docker/Dockerfile`, podman pods (one per Kubernetes pod: the
//! distproxy container next to BEAM application containers sharing its
//! network namespace), the rendered kustomize overlays played with
//! `podman kube play`, and a Service emulated the way kube-proxy does it.
//!
//! Setup (`scripts/containers-setup.sh`, run by every test; idempotent):
//! podman with runc, and local stand-ins for the Dockerfile's base images
//! built from Debian packages and tagged with the exact FROM names, so the
//! Dockerfile builds unchanged with `podman build --pull=never`.
//!
//! The Rust stage: the named build context `build` replaces the Dockerfile's
//! `build` stage with the release binary of this very test build
//! (`CARGO_BIN_EXE_distproxy`, stripped like the stage strips it), laid out
//! as the stage leaves it (`/out/distproxy`, `/out/lib/distproxy/`).
//! Fetching crates and compiling inside a container would take most of CI's
//! budget on a two-core machine and test rustc, not the image. Every other
//! stage (the `.beam`, the demo application, the runtime) is built as
//! written.
//!
//! What `podman kube play` (4.3) lacks is transformed by
//! `tests/containers/kube2podman.py`, and only that (see its doc): replicas
//! become Pods, native sidecars become the first containers (the test
//! starts them in order and waits on the sidecar's startupProbe like the
//! kubelet), unsupported downward API fields and Secrets become literals
//! and hostPath directories laid out like the kubelet's Secret mounts, and
//! a StatefulSet's pod DNS names become host aliases. The base, mTLS and
//! production overlays are played; every overlay is rendered and
//! transformed.
//!
//! Network: one podman network in 198.19.10.0/24; the emulated Service's
//! virtual IP is 198.19.11.10. Everything the suite creates is named `dpc-*`
//! (pods of played manifests: `distproxy-demo-*`) and removed when a test
//! ends, also on failure, and at the start of the next run.
//!
//! Fails saying why when the machine cannot run it, unless
//! `DISTPROXY_SKIP_CONTAINERS=1`.

use distproxy_testkit::certs;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const SKIP_VAR: &str = "DISTPROXY_SKIP_CONTAINERS";
const PODMAN: &[&str] = &[
    "podman",
    "--runtime",
    "runc",
    "--cgroup-manager",
    "cgroupfs",
];
const NET: &str = "dpc-net";
const SUBNET: &str = "198.19.10.0/24";
const GATEWAY: &str = "198.19.10.1";
/// The emulated Service's virtual IP: routed to the host by the pods'
/// default route, on no interface.
const VIP: &str = "198.19.11.10";
/// The seed Service's DNS name, as cluster DNS would publish it.
const SEED_DNS: &str = "distproxy-seed.default.svc.cluster.local";
const IMAGE: &str = "localhost/distproxy:test";
const DEMO_IMAGE: &str = "localhost/distproxy-demo-app:test";
/// The names the rendered manifests use (kustomization `images`), a
/// placeholder registry: replaced with the images built here.
const MANIFEST_IMAGE: &str = "ghcr.io/CHANGE-ME/distproxy:0.1.0";
const MANIFEST_DEMO_IMAGE: &str = "ghcr.io/CHANGE-ME/distproxy-demo-app:0.1.0";
/// The flags the base manifest gives every BEAM node.
const ERL_FLAGS: &str = "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}";
const COOKIE: &str = "dpc-cookie-not-secret";
/// Deadline for a pod's sidecar to pass its startup probe, and for its
/// nodes to register.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of one probe node run (mesh, transfer).
const PROBE_TIMEOUT_S: &str = "150";
/// The large transfer across pods, in MiB.
const TRANSFER_MB: &str = "64";
const IPT_CHAINS: &[(&str, &str, &str)] = &[
    ("nat", "PREROUTING", "DPC-SVC"),
    ("nat", "POSTROUTING", "DPC-MASQ"),
    ("filter", "FORWARD", "DPC-FWD"),
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cache() -> PathBuf {
    std::env::var_os("DISTPROXY_CONTAINERS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/containers"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---- running things ---------------------------------------------------------

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn must(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn podman_out(args: &[&str]) -> Output {
    let mut all: Vec<&str> = PODMAN[1..].to_vec();
    all.extend_from_slice(args);
    run(PODMAN[0], &all)
}

fn podman(args: &[&str]) -> String {
    let mut all: Vec<&str> = PODMAN[1..].to_vec();
    all.extend_from_slice(args);
    must(PODMAN[0], &all)
}

/// Runs `podman exec -i CONTAINER ARGS` with `input` on stdin.
fn podman_exec_stdin(container: &str, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(PODMAN[0])
        .args(&PODMAN[1..])
        .args(["exec", "-i", container])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn podman exec");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn ipt(args: &[&str]) -> Output {
    let mut all = vec!["-w", "5"];
    all.extend_from_slice(args);
    run("iptables", &all)
}

/// GET `path` from `addr` with a deadline on every step; (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = addr.parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// Polls `cond` until it returns `Some`, or panics naming `what`.
fn wait_for<T>(what: &str, deadline: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---- prerequisites and the shared fixture -----------------------------------

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Whether the test runs; panics with the reason when it cannot, unless
/// `DISTPROXY_SKIP_CONTAINERS=1`.
fn enabled(test: &str) -> bool {
    let mut missing = Vec::new();
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        });
    if euid.as_deref() != Some("0") {
        missing.push("not running as root (rootful podman and iptables need it)".to_string());
    }
    for (tool, pkg) in [
        ("podman", "podman"),
        ("mmdebstrap", "mmdebstrap"),
        ("runc", "runc"),
        ("catatonit", "catatonit"),
        ("iptables", "iptables"),
        ("erlc", "erlang-nox"),
        ("strip", "binutils"),
        ("python3", "python3"),
    ] {
        if !in_path(tool) {
            missing.push(format!("`{tool}` not found (package {pkg})"));
        }
    }
    if std::env::var(SKIP_VAR).as_deref() == Ok("1") {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED container test {test}: {SKIP_VAR}=1{}",
            if missing.is_empty() {
                String::new()
            } else {
                format!(" (missing: {})", missing.join("; "))
            }
        );
        return false;
    }
    assert!(
        missing.is_empty(),
        "container test {test} cannot run on this machine: {}. Run scripts/containers-setup.sh \
         as root (scripts/test-all.sh does), or set {SKIP_VAR}=1 to skip the container tests \
         explicitly.",
        missing.join("; ")
    );
    true
}

struct Fixture {
    /// The deployment tools' bin directory (kubectl, the venv's python).
    tools: PathBuf,
    /// Directory holding dp_container_probe.beam.
    probe_beam: Vec<u8>,
}

static SERIAL: Mutex<()> = Mutex::new(());
static FIXTURE: OnceLock<Fixture> = OnceLock::new();

/// One container test at a time (they share the network and names), and
/// the images built once per test binary.
fn setup() -> (MutexGuard<'static, ()>, &'static Fixture) {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fixture = FIXTURE.get_or_init(build_fixture);
    (guard, fixture)
}

fn build_fixture() -> Fixture {
    let started = Instant::now();
    let setup = repo().join("scripts/containers-setup.sh");
    must("bash", &[setup.to_str().unwrap()]);
    let tools = must(
        "bash",
        &[repo()
            .join("scripts/install-deploy-tools.sh")
            .to_str()
            .unwrap()],
    );
    let tools = PathBuf::from(tools.lines().last().expect("tools bin directory").trim());

    // The `build` stage's output, from the host's release binary.
    let ctx = cache().join("prebuilt");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(ctx.join("out/lib/distproxy")).unwrap();
    must(
        "chmod",
        &["0775", ctx.join("out/lib/distproxy").to_str().unwrap()],
    );
    let bin = ctx.join("out/distproxy");
    std::fs::copy(env!("CARGO_BIN_EXE_distproxy"), &bin).unwrap();
    must("strip", &["--strip-debug", bin.to_str().unwrap()]);

    let dockerfile = repo().join("deploy/docker/Dockerfile");
    let context = format!("build={}", ctx.display());
    for (target, tag) in [("runtime", IMAGE), ("demo-app", DEMO_IMAGE)] {
        podman(&[
            "build",
            "--quiet",
            "--pull=never",
            "--build-context",
            &context,
            "--target",
            target,
            "-f",
            dockerfile.to_str().unwrap(),
            "-t",
            tag,
            repo().to_str().unwrap(),
        ]);
    }

    let probe_dir = cache().join("probe");
    std::fs::create_dir_all(&probe_dir).unwrap();
    must(
        "erlc",
        &[
            "-Werror",
            "-o",
            probe_dir.to_str().unwrap(),
            repo()
                .join("tests/containers/dp_container_probe.erl")
                .to_str()
                .unwrap(),
        ],
    );
    let probe_beam = std::fs::read(probe_dir.join("dp_container_probe.beam")).unwrap();
    eprintln!(
        "container fixture (setup, images) ready in {:?}",
        started.elapsed()
    );
    Fixture { tools, probe_beam }
}

// ---- the lab: network, pods, Service; cleaned up on drop --------------------

struct Lab {
    dir: tempfile::TempDir,
    pods: Vec<String>,
    service: bool,
}

/// Pods a run may have left behind (fixed names, all ours).
const KNOWN_PODS: &[&str] = &[
    "dpc-img",
    "dpc-p1",
    "dpc-p2",
    "distproxy-demo-0",
    "distproxy-demo-1",
];

impl Lab {
    fn new() -> Lab {
        for pod in KNOWN_PODS {
            remove_pod(pod);
        }
        remove_service();
        let _ = podman_out(&["network", "rm", "-f", NET]);
        podman(&[
            "network",
            "create",
            "--subnet",
            SUBNET,
            "--gateway",
            GATEWAY,
            NET,
        ]);
        let dir = tempfile::Builder::new().prefix("dpc-").tempdir().unwrap();
        must("chmod", &["0755", dir.path().to_str().unwrap()]);
        Lab {
            dir,
            pods: Vec::new(),
            service: false,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A pod on the lab network with a static address; cluster DNS is
    /// emulated with hosts entries.
    fn pod(&mut self, name: &str, ip: &str) {
        podman(&[
            "pod",
            "create",
            "--name",
            name,
            "--network",
            NET,
            "--ip",
            ip,
            "--add-host",
            &format!("{SEED_DNS}:{VIP}"),
        ]);
        self.pods.push(name.to_string());
    }

    /// Service `seed` with one endpoint, as kube-proxy (iptables mode)
    /// programs it: DNAT of the virtual IP for the declared ports only, and
    /// masquerade when the endpoint reaches itself (hairpin). Anything else
    /// sent to the virtual IP is rejected here, so it never leaves the host.
    fn service(&mut self, ports: &[u16], endpoint: &str) {
        self.service = true;
        // The kubelet's `--hairpin-mode=hairpin-veth`: a pod's bridge port
        // may send a frame back where it came from. With br_netfilter loaded
        // the DNAT of a pod's own Service address keeps the frame bridged,
        // and without hairpin mode the bridge drops it.
        let bridge = text(
            &podman_out(&[
                "network",
                "inspect",
                NET,
                "--format",
                "{{.NetworkInterface}}",
            ])
            .stdout,
        )
        .trim()
        .to_string();
        let ports_dir = format!("/sys/class/net/{bridge}/brif");
        let brif = std::fs::read_dir(&ports_dir)
            .unwrap_or_else(|e| panic!("bridge ports of {NET} ({ports_dir}): {e}"));
        for port in brif.flatten() {
            let knob = port.path().join("hairpin_mode");
            std::fs::write(&knob, "1")
                .unwrap_or_else(|e| panic!("hairpin mode on {}: {e}", knob.display()));
        }
        for (table, hook, chain) in IPT_CHAINS {
            assert!(
                ipt(&["-t", table, "-N", chain]).status.success(),
                "iptables -N {chain}"
            );
            assert!(
                ipt(&["-t", table, "-I", hook, "1", "-j", chain])
                    .status
                    .success(),
                "iptables jump to {chain}"
            );
        }
        for port in ports {
            let p = port.to_string();
            let to = format!("{endpoint}:{port}");
            let out = ipt(&[
                "-t",
                "nat",
                "-A",
                "DPC-SVC",
                "-d",
                VIP,
                "-p",
                "tcp",
                "--dport",
                &p,
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ]);
            assert!(out.status.success(), "DNAT rule: {}", text(&out.stderr));
        }
        let out = ipt(&[
            "-t",
            "nat",
            "-A",
            "DPC-MASQ",
            "-s",
            endpoint,
            "-d",
            endpoint,
            "-p",
            "tcp",
            "-j",
            "MASQUERADE",
        ]);
        assert!(out.status.success(), "hairpin rule: {}", text(&out.stderr));
        let out = ipt(&[
            "-t",
            "filter",
            "-A",
            "DPC-FWD",
            "-d",
            VIP,
            "-p",
            "tcp",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]);
        assert!(out.status.success(), "reject rule: {}", text(&out.stderr));
        let out = ipt(&["-t", "filter", "-A", "DPC-FWD", "-d", VIP, "-j", "DROP"]);
        assert!(out.status.success(), "drop rule: {}", text(&out.stderr));
    }

    /// Logs of every container of the lab's pods, for a failure message.
    fn logs(&self) -> String {
        let mut all = String::new();
        for pod in &self.pods {
            let names = podman_out(&[
                "ps",
                "-a",
                "--filter",
                &format!("pod={pod}"),
                "--format",
                "{{.Names}}",
            ]);
            for c in text(&names.stdout).lines() {
                let out = podman_out(&["logs", "--tail", "40", c]);
                all += &format!("--- {c}\n{}{}", text(&out.stdout), text(&out.stderr));
            }
        }
        all
    }
}

/// Removes `pod` with its containers and their volumes (`podman kube play`
/// makes a named volume of every emptyDir; it would outlive the pod).
fn remove_pod(pod: &str) {
    let names = podman_out(&[
        "ps",
        "-a",
        "--filter",
        &format!("pod={pod}"),
        "--format",
        "{{.Names}}",
    ]);
    let mut volumes = Vec::new();
    for c in text(&names.stdout).lines() {
        let out = podman_out(&[
            "inspect",
            "--format",
            "{{range .Mounts}}{{.Name}} {{end}}",
            c,
        ]);
        volumes.extend(text(&out.stdout).split_whitespace().map(str::to_string));
    }
    let _ = podman_out(&["pod", "rm", "-f", "-t", "0", pod]);
    for v in volumes {
        let _ = podman_out(&["volume", "rm", "-f", &v]);
    }
}

fn remove_service() {
    for (table, hook, chain) in IPT_CHAINS {
        while ipt(&["-t", table, "-D", hook, "-j", chain])
            .status
            .success()
        {}
        let _ = ipt(&["-t", table, "-F", chain]);
        let _ = ipt(&["-t", table, "-X", chain]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("container logs:\n{}", self.logs());
        }
        for pod in &self.pods {
            remove_pod(pod);
        }
        if self.service {
            remove_service();
        }
        let _ = podman_out(&["network", "rm", "-f", NET]);
    }
}

// ---- pods of the demo application ------------------------------------------

/// The shell of an application container: the cookie into $HOME, one node
/// per name in $NODES, exit when one exits (like the manifest's command).
const APP_SCRIPT: &str = r#"set -eu
umask 077
printf '%s' "$ERLANG_COOKIE" > "$HOME/.erlang.cookie"
for node in $BEAM_NODES; do erl -noinput -name "$node@$NODE_HOST" & done
wait -n"#;

/// Starts the distproxy container of `pod` with `config` mounted where the
/// ConfigMap goes, and the state directory on the lab's `<pod>-state`,
/// world-writable and kept across container restarts like an emptyDir. (A
/// `--tmpfs` is not one: runc gives it the mode of the image's directory,
/// 0775, but root as owner, so user 65532 could not write the state file.)
fn start_sidecar(lab: &Lab, pod: &str, config: &Path) {
    let name = format!("{pod}-distproxy");
    let mount = format!("{}:/etc/distproxy/distproxy.toml:ro", config.display());
    let state = lab.path(&format!("{pod}-state"));
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let state = format!("{}:/var/lib/distproxy", state.display());
    podman(&[
        "run",
        "-d",
        "--pod",
        pod,
        "--name",
        &name,
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-v",
        &mount,
        "-v",
        &state,
        "-e",
        "DISTPROXY_LOG=info,distproxy=debug",
        IMAGE,
    ]);
}

/// An application container running `nodes` named after `host`.
fn start_app(pod: &str, name: &str, nodes: &str, host: &str) {
    let cname = format!("{pod}-{name}");
    let envs = [
        format!("ERL_FLAGS={ERL_FLAGS}"),
        format!("ERLANG_COOKIE={COOKIE}"),
        format!("BEAM_NODES={nodes}"),
        format!("NODE_HOST={host}"),
        "HOME=/tmp".to_string(),
    ];
    let mut args = vec![
        "run",
        "-d",
        "--pod",
        pod,
        "--name",
        &cname,
        "--read-only",
        "--tmpfs",
        "/tmp:mode=1777",
        "--user",
        "65532:65532",
        "--cap-drop",
        "ALL",
        "-w",
        "/tmp",
    ];
    for e in &envs {
        args.extend(["-e", e.as_str()]);
    }
    args.extend([DEMO_IMAGE, "bash", "-c", APP_SCRIPT]);
    podman(&args);
}

/// What the kubelet does for a native sidecar before it starts the
/// application containers: poll the startup probe until it passes.
fn wait_startup_probe(ip: &str, port: u16, path: &str) {
    wait_for(
        &format!("startup probe http://{ip}:{port}{path}"),
        START_TIMEOUT,
        || http_get(&format!("{ip}:{port}"), path).and_then(|(s, _)| (s == 200).then_some(())),
    );
}

/// Waits until the sidecar at `ip` lists every one of `names` in /nodes.
fn wait_registered(ip: &str, names: &[&str]) -> serde_json::Value {
    wait_for(
        &format!("nodes {names:?} registered with {ip}"),
        START_TIMEOUT,
        || {
            let (status, body) = http_get(&format!("{ip}:9369"), "/nodes")?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let have: Vec<&str> = v
                .as_array()?
                .iter()
                .filter_map(|n| n["name"].as_str())
                .collect();
            (status == 200 && names.iter().all(|n| have.contains(n))).then_some(v.clone())
        },
    )
}

/// Runs the probe node in `container` (named probe@`host`) with `args`;
/// returns its `DPC` line, panicking with the output when it failed.
fn probe(fx: &Fixture, lab: &Lab, container: &str, host: &str, args: &[&str]) -> String {
    let out = podman_exec_stdin(
        container,
        &["bash", "-c", "cat > /tmp/dp_container_probe.beam"],
        &fx.probe_beam,
    );
    assert!(
        out.status.success(),
        "copy probe into {container}: {}",
        text(&out.stderr)
    );
    let name = format!("probe@{host}");
    let mut cmd = vec![
        "exec",
        container,
        "timeout",
        PROBE_TIMEOUT_S,
        "erl",
        "-noinput",
        "-hidden",
        "-name",
        &name,
        "-pa",
        "/tmp",
        "-s",
        "dp_container_probe",
        "main",
    ];
    cmd.extend_from_slice(args);
    let out = podman_out(&cmd);
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("DPC "))
        .unwrap_or("")
        .to_string();
    assert!(
        out.status.success() && !line.is_empty(),
        "probe {args:?} in {container} failed ({}):\n{stdout}{}\n{}",
        out.status,
        text(&out.stderr),
        lab.logs()
    );
    line
}

/// Whether a TCP connection from inside `container` to `addr:port` opens.
fn connects_from(container: &str, addr: &str, port: u16) -> bool {
    let script = format!("exec 3<>/dev/tcp/{addr}/{port}");
    podman_out(&["exec", container, "timeout", "5", "bash", "-c", &script])
        .status
        .success()
}

fn render(fx: &Fixture, overlay: &str, out: &Path) {
    let kubectl = fx.tools.join("kubectl");
    let dir = repo().join("deploy/kubernetes").join(overlay);
    let rendered = must(
        kubectl.to_str().unwrap(),
        &["kustomize", dir.to_str().unwrap()],
    );
    std::fs::write(out, rendered).unwrap();
}

fn kube2podman(fx: &Fixture, args: &[&str]) -> String {
    let script = repo().join("tests/containers/kube2podman.py");
    let mut all = vec![script.to_str().unwrap()];
    all.extend_from_slice(args);
    must(fx.tools.join("python").to_str().unwrap(), &all)
}

fn startup_probe(fx: &Fixture, rendered: &Path) -> (u16, String) {
    let out = kube2podman(fx, &["probe", rendered.to_str().unwrap(), "distproxy-demo"]);
    let (port, path) = out.trim().split_once(' ').expect("probe: PORT PATH");
    (port.parse().unwrap(), path.to_string())
}

// ---- the tests ----------------------------------------------------------------

#[test]
fn image_runs_as_users_rely_on() {
    if !enabled("image_runs_as_users_rely_on") {
        return;
    }
    let (_serial, _fx) = setup();

    // Entrypoint, default command, user, ports.
    let inspect = podman(&["image", "inspect", IMAGE]);
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let config = &v[0]["Config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/distproxy"])
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["run", "--config", "/etc/distproxy/distproxy.toml"])
    );
    assert_eq!(config["User"], "65532:65532");
    for port in ["4369/tcp", "43691/tcp", "9369/tcp"] {
        assert!(
            config["ExposedPorts"].get(port).is_some(),
            "port {port} not exposed"
        );
    }
    let size = v[0]["Size"].as_u64().unwrap();
    eprintln!("image {IMAGE}: {:.1} MB", size as f64 / 1e6);
    let demo = podman(&["image", "inspect", "--format", "{{.Size}}", DEMO_IMAGE]);
    eprintln!(
        "image {DEMO_IMAGE}: {:.1} MB",
        demo.trim().parse::<f64>().unwrap() / 1e6
    );

    // The default command reads /etc/distproxy/distproxy.toml: without it,
    // it fails naming that path (exit 64, a configuration error).
    let out = podman_out(&["run", "--rm", IMAGE]);
    assert_eq!(out.status.code(), Some(64), "run without a config: {out:?}");
    assert!(
        text(&out.stderr).contains("/etc/distproxy/distproxy.toml"),
        "the error names the config path: {}",
        text(&out.stderr)
    );

    // An arbitrary UID with GID 0 (OpenShift's restricted SCC), the image's
    // own /var/lib/distproxy (no volume), a config file of ours: the admin
    // port moved to 9400 shows the file is the one read.
    let mut lab = Lab::new();
    let base =
        std::fs::read_to_string(repo().join("deploy/kubernetes/base/distproxy.toml")).unwrap();
    let admin = "listen = [\"0.0.0.0:9369\", \"[::]:9369\"]";
    assert!(base.contains(admin), "the base's admin listen line");
    let conf = lab.path("distproxy.toml");
    let moved = base.replace(admin, "listen = [\"0.0.0.0:9400\", \"[::]:9400\"]");
    std::fs::write(&conf, moved).unwrap();
    std::fs::set_permissions(&conf, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let ip = "198.19.10.20";
    lab.pod("dpc-img", ip);
    let mount = format!("{}:/etc/distproxy/distproxy.toml:ro", conf.display());
    podman(&[
        "run",
        "-d",
        "--pod",
        "dpc-img",
        "--name",
        "dpc-img-distproxy",
        "--user",
        "1000770000:0",
        "-v",
        &mount,
        IMAGE,
    ]);
    wait_startup_probe(ip, 9400, "/readyz");
    assert!(
        http_get(&format!("{ip}:9369"), "/readyz").is_none(),
        "admin still on 9369"
    );

    // A node registers; the state file lands in /var/lib/distproxy.
    start_app("dpc-img", "app", "x", ip);
    wait_for("registration of x", START_TIMEOUT, || {
        let (_, body) = http_get(&format!("{ip}:9400"), "/nodes")?;
        body.contains("\"x\"").then_some(())
    });
    let state = lab.path("registry.json");
    wait_for(
        "state file written by UID 1000770000",
        START_TIMEOUT,
        || {
            let out = podman_out(&[
                "cp",
                "dpc-img-distproxy:/var/lib/distproxy/registry.json",
                state.to_str().unwrap(),
            ]);
            (out.status.success() && std::fs::read_to_string(&state).ok()?.contains("\"x\""))
                .then_some(())
        },
    );

    // The helper module: the demo application's OTP loads the .beam at
    // /opt/distproxy/ebin, and it is the distproxy image's own file (what
    // `COPY --from=<distproxy image> /opt/distproxy/ebin` gives an app).
    let out = podman_out(&[
        "run",
        "--rm",
        DEMO_IMAGE,
        "erl",
        "-noinput",
        "-pa",
        "/opt/distproxy/ebin",
        "-eval",
        "io:format(\"~p ~s~n\", [code:ensure_loaded(distproxy_epmd), \
         erlang:system_info(otp_release)]), halt().",
    ]);
    let loaded = text(&out.stdout);
    assert!(
        loaded.starts_with("{module,distproxy_epmd}"),
        "{loaded}{}",
        text(&out.stderr)
    );
    eprintln!(
        "distproxy_epmd loads in the demo image's OTP {}",
        loaded.split_whitespace().nth(1).unwrap_or("?")
    );
    let from_image = lab.path("from-image.beam");
    let from_demo = lab.path("from-demo.beam");
    podman(&["create", "--name", "dpc-img-beam", IMAGE]);
    let copied = podman_out(&[
        "cp",
        "dpc-img-beam:/opt/distproxy/ebin/distproxy_epmd.beam",
        from_image.to_str().unwrap(),
    ]);
    let _ = podman_out(&["rm", "-f", "dpc-img-beam"]);
    assert!(copied.status.success(), "{}", text(&copied.stderr));
    podman(&["create", "--name", "dpc-img-beam", DEMO_IMAGE]);
    let copied = podman_out(&[
        "cp",
        "dpc-img-beam:/opt/distproxy/ebin/distproxy_epmd.beam",
        from_demo.to_str().unwrap(),
    ]);
    let _ = podman_out(&["rm", "-f", "dpc-img-beam"]);
    assert!(copied.status.success(), "{}", text(&copied.stderr));
    assert_eq!(
        std::fs::read(&from_image).unwrap(),
        std::fs::read(&from_demo).unwrap()
    );
}

#[test]
fn pods_mesh_transfer_and_service() {
    if !enabled("pods_mesh_transfer_and_service") {
        return;
    }
    let (_serial, fx) = setup();
    let mut lab = Lab::new();
    let rendered = lab.path("base.yaml");
    render(fx, "base", &rendered);
    let (probe_port, probe_path) = startup_probe(fx, &rendered);
    let ports: Vec<u16> = kube2podman(
        fx,
        &[
            "service-ports",
            rendered.to_str().unwrap(),
            "distproxy-demo",
        ],
    )
    .split_whitespace()
    .map(|p| p.parse().unwrap())
    .collect();
    let config = repo().join("deploy/kubernetes/base/distproxy.toml");
    let (ip1, ip2) = ("198.19.10.11", "198.19.10.12");

    for (pod, ip) in [("dpc-p1", ip1), ("dpc-p2", ip2)] {
        lab.pod(pod, ip);
        start_sidecar(&lab, pod, &config);
        // Gating: the application containers start only once the
        // sidecar's startup probe passes, as with a native sidecar.
        wait_startup_probe(ip, probe_port, &probe_path);
        start_app(pod, "app1", "a b", ip);
        start_app(pod, "app2", "c", ip);
    }
    // The seed: a node named after a Service's DNS name, in pod 2.
    start_app("dpc-p2", "seed", "seed", SEED_DNS);
    wait_registered(ip1, &["a", "b", "c"]);
    wait_registered(ip2, &["a", "b", "c", "seed"]);
    // The sidecar, user 65532 on a read-only root, keeps its registry in the
    // state directory (what a restarted sidecar adopts).
    let state = lab.path("dpc-p2-state/registry.json");
    wait_for("the state file lists seed", START_TIMEOUT, || {
        std::fs::read_to_string(&state)
            .ok()?
            .contains("\"seed\"")
            .then_some(())
    });

    let mut nodes: Vec<String> = Vec::new();
    for ip in [ip1, ip2] {
        for n in ["a", "b", "c"] {
            nodes.push(format!("{n}@{ip}"));
        }
    }
    let refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let mut mesh = vec!["mesh"];
    mesh.extend(&refs);
    assert_eq!(probe(fx, &lab, "dpc-p1-app1", ip1, &mesh), "DPC mesh ok");
    let a1 = format!("a@{ip1}");
    let c2 = format!("c@{ip2}");
    let line = probe(
        fx,
        &lab,
        "dpc-p1-app1",
        ip1,
        &["transfer", &a1, &c2, TRANSFER_MB],
    );
    assert_eq!(line, format!("DPC transfer ok {}", 64 * 1024 * 1024));

    // The Service, kube-proxy style, with pod 2 as its one endpoint.
    lab.service(&ports, ip2);
    let seed = format!("seed@{SEED_DNS}");
    // From pod 1 through the virtual IP: declared ports only.
    assert!(
        connects_from("dpc-p1-app1", VIP, 43691),
        "declared port through the VIP"
    );
    assert!(
        !connects_from("dpc-p1-app1", VIP, 4370),
        "an undeclared port must not be forwarded"
    );
    assert_eq!(
        probe(fx, &lab, "dpc-p1-app1", ip1, &["ping", &seed]),
        "DPC ping pong"
    );
    // Hairpin: pod 2 reaches its own node through its own Service.
    assert_eq!(
        probe(fx, &lab, "dpc-p2-app1", ip2, &["ping", &seed]),
        "DPC ping pong"
    );
    let b2 = format!("b@{ip2}");
    let line = probe(fx, &lab, "dpc-p2-app1", ip2, &["transfer", &b2, &seed, "8"]);
    assert_eq!(line, format!("DPC transfer ok {}", 8 * 1024 * 1024));
}

/// Renders `overlay`, plays its workload as two pods and checks the mesh of
/// the manifest's nodes; returns the lab for overlay-specific checks.
fn play_overlay(
    fx: &Fixture,
    overlay: &str,
    secrets: &[(&str, &Path)],
    host: fn(usize, &str) -> String,
) -> (Lab, [&'static str; 2]) {
    let mut lab = Lab::new();
    let rendered = lab.path("rendered.yaml");
    render(fx, overlay, &rendered);
    let (probe_port, probe_path) = startup_probe(fx, &rendered);
    let pods_yaml = lab.path("pods.yaml");
    let cms_yaml = lab.path("configmaps.yaml");
    let cookie_dir = lab.path("cookie");
    std::fs::create_dir_all(&cookie_dir).unwrap();
    std::fs::write(cookie_dir.join("cookie"), COOKIE).unwrap();
    let ips = ["198.19.10.31", "198.19.10.32"];
    let mut args: Vec<String> = vec![
        "pods".into(),
        rendered.display().to_string(),
        pods_yaml.display().to_string(),
        cms_yaml.display().to_string(),
    ];
    for (i, ip) in ips.iter().enumerate() {
        args.push(format!("--pod=distproxy-demo-{i}={ip}"));
    }
    args.push(format!(
        "--secret=distproxy-demo-cookie={}",
        cookie_dir.display()
    ));
    args.push(format!("--image={MANIFEST_IMAGE}={IMAGE}"));
    args.push(format!("--image={MANIFEST_DEMO_IMAGE}={DEMO_IMAGE}"));
    for (name, dir) in secrets {
        args.push(format!("--secret={name}={}", dir.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    kube2podman(fx, &args);
    let docs = std::fs::read_to_string(&pods_yaml).unwrap();
    for (i, (doc, ip)) in docs.split("\n---\n").zip(ips).enumerate() {
        let file = lab.path(&format!("pod-{i}.yaml"));
        std::fs::write(&file, doc).unwrap();
        let pod = format!("distproxy-demo-{i}");
        lab.pods.push(pod.clone());
        podman(&[
            "kube",
            "play",
            "--start=false",
            "--network",
            NET,
            "--ip",
            ip,
            "--configmap",
            cms_yaml.to_str().unwrap(),
            file.to_str().unwrap(),
        ]);
        // The kubelet's order for a native sidecar: sidecar, startup probe,
        // then the plain init containers to completion (install-module),
        // then the application.
        podman(&["start", &format!("{pod}-distproxy")]);
        wait_startup_probe(ip, probe_port, &probe_path);
        for init in plain_init_containers(&pod) {
            let out = podman_out(&["start", "--attach", &init]);
            assert!(
                out.status.success(),
                "init container {init} failed: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        podman(&["start", &format!("{pod}-app")]);
    }
    for ip in ips {
        wait_registered(ip, &["a", "b", "c"]);
    }
    let hosts: Vec<String> = ips.iter().enumerate().map(|(i, ip)| host(i, ip)).collect();
    let mut nodes = vec!["mesh".to_string()];
    for h in &hosts {
        for n in ["a", "b", "c"] {
            nodes.push(format!("{n}@{h}"));
        }
    }
    let refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
    assert_eq!(
        probe(fx, &lab, "distproxy-demo-0-app", &hosts[0], &refs),
        "DPC mesh ok"
    );
    let from = format!("a@{}", hosts[0]);
    let to = format!("b@{}", hosts[1]);
    let line = probe(
        fx,
        &lab,
        "distproxy-demo-0-app",
        &hosts[0],
        &["transfer", &from, &to, "16"],
    );
    assert_eq!(line, format!("DPC transfer ok {}", 16 * 1024 * 1024));
    (lab, ips)
}

/// The containers `kube play` made for a pod's plain init containers: all
/// but its infra container, the sidecar and the application.
fn plain_init_containers(pod: &str) -> Vec<String> {
    let out = podman_out(&[
        "ps",
        "-a",
        "--filter",
        &format!("pod={pod}"),
        "--format",
        "{{.Names}} {{.IsInfra}}",
    ]);
    assert!(out.status.success(), "podman ps: {}", text(&out.stderr));
    let (sidecar, app) = (format!("{pod}-distproxy"), format!("{pod}-app"));
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, infra)| *infra != "true" && *name != sidecar && *name != app)
        .map(|(name, _)| name.to_string())
        .collect()
}

/// Node host of a Deployment's pod: its IP.
fn pod_ip_host(_: usize, ip: &str) -> String {
    ip.to_string()
}

/// Node host of a StatefulSet's pod: its name under the headless Service.
fn stateful_host(i: usize, _: &str) -> String {
    format!("distproxy-demo-{i}.distproxy-demo-headless.default.svc.cluster.local")
}

#[test]
fn every_overlay_renders_for_podman() {
    if !enabled("every_overlay_renders_for_podman") {
        return;
    }
    let (_serial, fx) = setup();
    let dir = tempfile::tempdir().unwrap();
    for overlay in [
        "base",
        "overlays/mtls",
        "overlays/statefulset",
        "overlays/monitoring",
        "overlays/production",
    ] {
        let rendered = dir.path().join("r.yaml");
        render(fx, overlay, &rendered);
        // The transformation podman needs applies to every overlay's
        // workload, and keeps its sidecar probe.
        let tls = dir.path().join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        let cookie = dir.path().join("cookie");
        std::fs::create_dir_all(&cookie).unwrap();
        std::fs::write(cookie.join("cookie"), COOKIE).unwrap();
        let out = dir.path().join("pods.yaml");
        let cms = dir.path().join("cms.yaml");
        kube2podman(
            fx,
            &[
                "pods",
                rendered.to_str().unwrap(),
                out.to_str().unwrap(),
                cms.to_str().unwrap(),
                "--pod=distproxy-demo-0=198.19.10.31",
                &format!("--secret=distproxy-demo-cookie={}", cookie.display()),
                &format!("--secret=distproxy-demo-tls={}", tls.display()),
            ],
        );
        let pods = std::fs::read_to_string(&out).unwrap();
        assert!(
            pods.contains("name: distproxy\n"),
            "{overlay}: sidecar container kept"
        );
        assert!(
            !pods.contains("restartPolicy: Always"),
            "{overlay}: native sidecar transformed"
        );
        assert!(!pods.contains("valueFrom"), "{overlay}: env made literal");
        assert_eq!(
            startup_probe(fx, &rendered),
            (9369, "/readyz".to_string()),
            "{overlay}"
        );
    }
}

#[test]
fn kube_play_base_overlay() {
    if !enabled("kube_play_base_overlay") {
        return;
    }
    let (_serial, fx) = setup();
    let (lab, ips) = play_overlay(fx, "base", &[], pod_ip_host);
    // The base overlay loads the helper module that its install-module init
    // container put into the shared volume (ERL_FLAGS alone): the nodes ask
    // their sidecar for egress ports, and the other pod routes those
    // connections by their preamble, plain TCP.
    let (_, metrics) = http_get(&format!("{}:9369", ips[1]), "/metrics").expect("metrics");
    assert!(preamble_routes(&metrics) > 0.0, "{metrics}");
    let (_, metrics) = http_get(&format!("{}:9369", ips[0]), "/metrics").expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("distproxy_epmd_requests_total{type=\"egress\",result=\"ok\"}")),
        "{metrics}"
    );
    drop(lab);
}

/// `distproxy_routes_total{method="preamble"}` in a `/metrics` text (0
/// when absent; the series is exported at 0 from the start).
fn preamble_routes(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("distproxy_routes_total") && l.contains("\"preamble\""))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

#[test]
fn kube_play_mtls_overlay() {
    if !enabled("kube_play_mtls_overlay") {
        return;
    }
    let (_serial, fx) = setup();
    // What cert-manager would put in Secret distproxy-demo-tls, laid out the
    // way the kubelet mounts a Secret (..data symlinks).
    let ca = certs::Ca::new("distproxy-demo-ca");
    let leaf = ca.leaf(&["*.distproxy-demo-headless.default.svc.cluster.local"], 2);
    let tls = tempfile::Builder::new()
        .prefix("dpc-tls-")
        .tempdir()
        .unwrap();
    must("chmod", &["0755", tls.path().to_str().unwrap()]);
    certs::SecretDir::create(tls.path(), &leaf.cert_pem, &leaf.key_pem, &ca.pem);
    must("chmod", &["-R", "a+rX", tls.path().to_str().unwrap()]);
    let (lab, ips) = play_overlay(
        fx,
        "overlays/mtls",
        &[("distproxy-demo-tls", tls.path())],
        pod_ip_host,
    );
    // require_tls is on: the mesh above only works through the TLS tunnel.
    // Nodes of one pod reach each other on loopback, so a pod whose nodes
    // dialled every cross-pod connection routes none in: each pod carries
    // tunnelled connections one way or the other, and some pod routed in.
    let mut routed_inbound = false;
    for ip in ips {
        let (_, metrics) = http_get(&format!("{ip}:9369"), "/metrics").expect("metrics");
        let preamble = preamble_routes(&metrics);
        let outbound = metrics.lines().any(|l| {
            l.starts_with("distproxy_dist_connections_total")
                && l.contains("direction=\"outbound\"")
        });
        assert!(
            preamble > 0.0 || outbound,
            "{ip}: no tunnelled connection either way:\n{metrics}"
        );
        routed_inbound |= preamble > 0.0;
    }
    assert!(routed_inbound, "no pod routed a tunnelled connection in");
    drop(lab);
}

#[test]
fn kube_play_production_overlay() {
    if !enabled("kube_play_production_overlay") {
        return;
    }
    let (_serial, fx) = setup();
    // The StatefulSet with stable DNS node names, mutual TLS with host name
    // checks and node names bound to the certificate: one wildcard
    // certificate for the headless Service's names, as certificate.yaml asks.
    let ca = certs::Ca::new("distproxy-demo-ca");
    let leaf = ca.leaf(&["*.distproxy-demo-headless.default.svc.cluster.local"], 3);
    let tls = tempfile::Builder::new()
        .prefix("dpc-tls-")
        .tempdir()
        .unwrap();
    certs::SecretDir::create(tls.path(), &leaf.cert_pem, &leaf.key_pem, &ca.pem);
    must("chmod", &["-R", "a+rX", tls.path().to_str().unwrap()]);
    let (lab, ips) = play_overlay(
        fx,
        "overlays/production",
        &[("distproxy-demo-tls", tls.path())],
        stateful_host,
    );
    // Nodes of one pod reach each other on loopback (no sidecar hop), so a
    // pod whose nodes dialled every connection routes no inbound tunnel:
    // every pod must carry tunnelled connections one way or the other, and
    // together they must have routed some inbound.
    let mut routed_inbound = false;
    for ip in ips {
        let (_, metrics) = http_get(&format!("{ip}:9369"), "/metrics").expect("metrics");
        // The series is exported at 0 from the start: its value says.
        let inbound = preamble_routes(&metrics) > 0.0;
        let outbound = metrics.lines().any(|l| {
            l.starts_with("distproxy_dist_connections_total")
                && l.contains("direction=\"outbound\"")
        });
        assert!(
            inbound || outbound,
            "{ip}: no tunnelled connection either way:\n{metrics}"
        );
        routed_inbound |= inbound;
    }
    assert!(routed_inbound, "no pod routed a tunnelled connection in");
    drop(lab);
}
