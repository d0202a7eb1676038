//! The command line: check-config output, install-module, exit codes.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_distproxy");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/config/example-full.toml");
    let (code, stdout, stderr) = run(&["check-config", file]);
    assert_eq!(code, 0, "{stderr}");
    let printed: distproxy_testkit::sut::config::Config = toml::from_str(&stdout).unwrap();
    assert_eq!(
        printed,
        distproxy_testkit::sut::config::Config::load(file.as_ref()).unwrap()
    );
    assert_eq!(printed.dist.advertise_port, Some(443));
}

#[test]
fn config_errors_exit_64_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[routing]\nlookup_ttl_ms = 0\n").unwrap();
    let (code, _, stderr) = run(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(code, 64);
    assert!(stderr.contains("routing.lookup_ttl_ms"), "{stderr}");

    std::fs::write(&bad, "[dist]\nlisten = \"0.0.0.0:1\"\nbogus_key = 1\n").unwrap();
    let (code, _, stderr) = run(&["run", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 64);
    assert!(stderr.contains("bogus_key"), "{stderr}");

    let (code, _, stderr) = run(&["check-config", "/nonexistent/distproxy.toml"]);
    assert_eq!(code, 64);
    assert!(stderr.contains("/nonexistent/distproxy.toml"), "{stderr}");
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    assert_eq!(run(&["run", "--no-such-flag"]).0, 64);
    assert_eq!(run(&["run", "--dist-listen", "not-an-address"]).0, 64);
    assert_eq!(run(&["frobnicate"]).0, 64);
    assert_eq!(run(&["epmd", "-bogus"]).0, 64);
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("check-config"));
}

#[test]
fn names_reports_an_unreachable_epmd() {
    // A port nobody listens on (bound then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, _, stderr) = run(&["names", "--port", &port.to_string()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("Cannot connect"), "{stderr}");
    assert_eq!(
        stderr.matches("onnect to epmd").count(),
        1,
        "one message, said once: {stderr}"
    );
}

/// `remsh` refuses what it cannot use before starting anything: a name
/// without a host (64), no cookie (1), an unknown `--via` form (64).
#[test]
fn remsh_errors_are_clear_and_early() {
    let remsh = |args: &[&str], home: &str| {
        let out = Command::new(BIN)
            .arg("remsh")
            .args(args)
            .env("HOME", home)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = remsh(
        &["a1", "--via", "127.0.0.1:1", "--cookie", "c"],
        "/nonexistent",
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("not a full node name"), "{err}");

    let (code, err) = remsh(&["a1@pod-0.svc", "--via", "127.0.0.1:1"], "/nonexistent");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no cookie"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("cookie");
    let (code, err) = remsh(
        &[
            "a1@pod-0.svc",
            "--via",
            "127.0.0.1:1",
            "--cookie-file",
            missing.to_str().unwrap(),
        ],
        "/nonexistent",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot read the cookie file"), "{err}");

    let (code, err) = remsh(
        &["a1@pod-0.svc", "--via", "pod/My_Pod", "--cookie", "c"],
        "/nonexistent",
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("pod/NAME"), "{err}");
}

/// `install-module DIR` writes the embedded module, byte for byte the
/// committed `deploy/erlang/distproxy_epmd.beam`, and prints its path; it
/// creates DIR, replaces a stale file, and fails with exit 1 naming DIR
/// when it cannot write there.
#[test]
fn install_module_writes_the_committed_beam() {
    let committed = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/erlang/distproxy_epmd.beam"
    ))
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("distproxy");
    let path = dir.join("distproxy_epmd.beam");
    for round in 0..2 {
        let (code, stdout, stderr) = run(&["install-module", dir.to_str().unwrap()]);
        assert_eq!(code, 0, "round {round}: {stderr}");
        assert_eq!(stdout.trim(), path.display().to_string());
        assert!(std::fs::read(&path).unwrap() == committed, "round {round}");
        std::fs::write(&path, b"stale").unwrap();
    }
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(entries.len(), 1, "only the module in {}", dir.display());

    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let (code, _, stderr) = run(&["install-module", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains(file.to_str().unwrap()), "{stderr}");
    assert_eq!(run(&["install-module"]).0, 64, "DIR is required");
}
