//! Whether an end-to-end test can run here.
//!
//! An e2e test never passes silently: when the machine lacks something the
//! test needs, the test fails and says what. The only way around that is the
//! explicit opt-out `DISTPROXY_SKIP_E2E=1`, which skips e2e tests and says so
//! on the real stderr (not the captured test output).

use std::io::Write;

/// Tools every e2e test needs, with the Debian package that provides each.
const BASE_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("erl", "erlang-nox"),
    ("erlc", "erlang-nox (erlang-dev)"),
    ("epmd", "erlang-nox"),
    ("bash", "bash"),
    ("timeout", "coreutils"),
    ("kill", "procps"),
];

/// The opt-out variable.
pub const SKIP_VAR: &str = "DISTPROXY_SKIP_E2E";

/// Returns `true` when `test` should run. Returns `false` (after printing
/// that the test was skipped) only when `DISTPROXY_SKIP_E2E=1`. Panics with
/// the reason when a prerequisite is missing.
///
/// `extra_tools` are further programs this test needs (e.g. `elixir`).
pub fn e2e_enabled(test: &str, extra_tools: &[&str]) -> bool {
    let missing = missing_prerequisites(extra_tools);
    if std::env::var(SKIP_VAR).as_deref() == Ok("1") {
        let why = if missing.is_empty() {
            String::new()
        } else {
            format!(" (this machine also lacks: {})", missing.join("; "))
        };
        // Written to the process's stderr directly so the skip is visible
        // even though the test harness captures test output.
        let line = format!("SKIPPED e2e test {test}: {SKIP_VAR}=1{why}\n");
        let _ = std::io::stderr().write_all(line.as_bytes());
        return false;
    }
    if !missing.is_empty() {
        panic!(
            "e2e test {test} cannot run on this machine: {}. It needs root and \
             Debian packages erlang-nox, elixir and iproute2; set {SKIP_VAR}=1 \
             to skip the end-to-end tests explicitly.",
            missing.join("; ")
        );
    }
    true
}

fn missing_prerequisites(extra_tools: &[&str]) -> Vec<String> {
    let mut missing = Vec::new();
    match effective_uid() {
        Some(0) => {}
        Some(uid) => missing.push(format!(
            "not running as root (euid {uid}); network namespaces, bridges \
             and /etc/netns need root"
        )),
        None => missing.push("cannot read the effective uid from /proc/self/status".into()),
    }
    for (tool, package) in BASE_TOOLS {
        if !in_path(tool) {
            missing.push(format!("`{tool}` not found in PATH (package {package})"));
        }
    }
    for tool in extra_tools {
        if !in_path(tool) {
            missing.push(format!("`{tool}` not found in PATH"));
        }
    }
    missing
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // Uid: real effective saved fs
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Whether `tool` is an executable file in some `PATH` directory.
pub fn in_path(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(tool))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}
