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

/// `run` with `config`, all listeners on port 0, killed after 10 s if it
/// starts: (exit code, stderr).
fn run_config(config: &str, extra: &[&str]) -> (i32, String) {
    run_config_env(config, extra, None)
}

/// [`run_config`] with `DISTPROXY_LOG` set to `log` (`None`: unset).
fn run_config_env(config: &str, extra: &[&str], log: Option<&str>) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("distproxy.toml");
    let listeners = "[epmd]\nlisten = \"127.0.0.1:0\"\n[dist]\nlisten = \"127.0.0.1:0\"\n\
                     [admin]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(&file, format!("{listeners}{config}")).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.env_remove("DISTPROXY_LOG");
    if let Some(log) = log {
        cmd.env("DISTPROXY_LOG", log);
    }
    let mut child = cmd
        .args(extra)
        .args(["run", "--config"])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Errors `run` finds only when it loads what the configuration names:
/// TLS files that are missing or hold no certificate, an unset `${VAR}`
/// in `discovery.host`. They are configuration errors like the others
/// (exit 64, naming the key), not runtime failures (they exited 1, so a
/// supervisor or an alert on 64 took them for a crash to retry).
#[test]
fn run_exits_64_on_files_and_variables_the_configuration_names() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    for (file, says) in [(&missing, "No such file"), (&garbage, "no certificate")] {
        let f = file.display();
        let (code, stderr) = run_config(
            &format!("[tls]\ncert_file = \"{f}\"\nkey_file = \"{f}\"\nca_file = \"{f}\"\n"),
            &[],
        );
        assert_eq!(code, 64, "{stderr}");
        assert!(
            stderr.contains("tls.cert_file") && stderr.contains(says),
            "{stderr}"
        );
    }
    let (code, stderr) = run_config(
        "[discovery]\nservice = \"x.invalid\"\nhost = \"${DISTPROXY_TEST_UNSET_VAR}\"\n",
        &[],
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("discovery.host") && stderr.contains("DISTPROXY_TEST_UNSET_VAR"),
        "{stderr}"
    );
}

/// With `--log-format json`, a configuration error that stops `run` is a
/// JSON line too, naming the key: the container's output is read by a log
/// collector that expects nothing else.
#[test]
fn run_reports_configuration_errors_as_json_lines_with_log_format_json() {
    for config in [
        "[routing]\nlookup_ttl_ms = 0\n",
        "[tunnel]\nbogus_key = 1\n",
    ] {
        let (code, stderr) = run_config(config, &["--log-format", "json"]);
        assert_eq!(code, 64, "{stderr}");
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
            .collect();
        let error = lines
            .iter()
            .find(|l| l["level"] == "ERROR")
            .unwrap_or_else(|| panic!("no error line: {stderr}"));
        let text = error["fields"]["error"].as_str().unwrap();
        let key = if config.contains("lookup") {
            "routing.lookup_ttl_ms"
        } else {
            "bogus_key"
        };
        assert!(text.contains(key), "{text}");
    }
}

/// `DISTPROXY_LOG` filters as documented; empty, it is the default
/// (`info`), not a filter that drops everything but errors; invalid, it is
/// said in the log instead of being ignored silently.
#[test]
fn distproxy_log_filters_and_says_when_it_is_invalid() {
    // Fails at start after its first INFO line (`open files limit`).
    let failing = "[tls]\ncert_file = \"/nonexistent/c\"\nkey_file = \"/nonexistent/k\"\n\
                   ca_file = \"/nonexistent/a\"\n";
    let info = "open files limit";
    let (_, stderr) = run_config_env(failing, &[], None);
    assert!(stderr.contains(info), "default info: {stderr}");
    let (_, stderr) = run_config_env(failing, &[], Some(""));
    assert!(stderr.contains(info), "empty is the default: {stderr}");
    let (_, stderr) = run_config_env(failing, &[], Some("warn"));
    assert!(!stderr.contains(info), "warn drops info: {stderr}");
    assert!(
        stderr.contains("tls.cert_file"),
        "errors still pass: {stderr}"
    );
    let (_, stderr) = run_config_env(failing, &[], Some("distproxy=debug"));
    assert!(stderr.contains(info), "{stderr}");
    let (code, stderr) = run_config_env(failing, &[], Some("warn,distproxy=verbose"));
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("DISTPROXY_LOG is not a valid log filter")
            && stderr.contains("distproxy=verbose"),
        "{stderr}"
    );
    assert!(stderr.contains(info), "the default is used: {stderr}");
}

/// `epmd -daemon` (as `erl` starts it) with a bad `$DISTPROXY_CONFIG`
/// says so and exits 64 before it detaches; the detached daemon's output
/// goes nowhere, so it exited 0 and the daemon died unseen, leaving the
/// nodes without an EPMD and nobody told why.
#[test]
fn epmd_daemon_reports_a_bad_configuration_before_it_detaches() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[routing]\nlookup_ttl_ms = 0\n").unwrap();
    let port = distproxy_testkit::ports::free_ports::<1>()[0].to_string();
    let out = Command::new(BIN)
        .args(["epmd", "-daemon", "-port", &port, "-address", "127.0.0.1"])
        .env("DISTPROXY_CONFIG", &bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("routing.lookup_ttl_ms"), "{stderr}");
}

/// The global `--log-format` before the `epmd` command is honoured: the
/// drop-in serves and logs JSON lines. It set up logging twice and
/// panicked (exit 101) with any global option before `epmd`.
/// A valid file that `run` would still refuse here (an unset `${VAR}` in
/// `discovery.host`, `[tls]` files not present) passes `check-config` with
/// a note for each, so a pipeline checking the file learns it; with the
/// variable set and the files there, no note.
#[test]
fn check_config_notes_what_run_would_refuse_in_this_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    let write = |cert: &std::path::Path| {
        std::fs::write(
            &file,
            format!(
                "[discovery]\nservice = \"app-headless.ns.svc\"\nhost = \"${{DP_TEST_POD_IP}}\"\n\
                 [tls]\ncert_file = \"{0}\"\nkey_file = \"{0}\"\nca_file = \"{0}\"\n",
                cert.display()
            ),
        )
        .unwrap();
    };
    let missing = dir.path().join("absent.pem");
    write(&missing);
    let out = Command::new(BIN)
        .args(["check-config", file.to_str().unwrap()])
        .env_remove("DP_TEST_POD_IP")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("note:") && stderr.contains("DP_TEST_POD_IP"),
        "{stderr}"
    );
    for key in ["tls.cert_file", "tls.key_file", "tls.ca_file"] {
        assert!(
            stderr.contains(&format!("`{key}` {}", missing.display())),
            "{stderr}"
        );
    }

    let present = dir.path().join("present.pem");
    std::fs::write(&present, "x").unwrap();
    write(&present);
    let out = Command::new(BIN)
        .args(["check-config", file.to_str().unwrap()])
        .env("DP_TEST_POD_IP", "198.18.0.2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("note:"), "{stderr}");
}

/// A configuration for the `epmd` drop-in that binds nothing but its
/// EPMD port (distribution on port 0, no admin), in a temporary directory.
fn epmd_drop_in_config() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[dist]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n",
    )
    .unwrap();
    (dir, config)
}

/// Starts `distproxy [global] epmd -port P -address 127.0.0.1 [extra]`
/// with its log in `log`, and waits until it serves. A port another test
/// took first makes it exit (and a connection would reach that test's
/// server), so it tries another port.
fn spawn_serving_drop_in(
    global: &[&str],
    extra: &[&str],
    config: &std::path::Path,
    log: &std::path::Path,
) -> (std::process::Child, u16) {
    use std::time::{Duration, Instant};
    for _ in 0..5 {
        let port = distproxy_testkit::ports::free_ports::<1>()[0];
        let mut child = Command::new(BIN)
            .args(global)
            .args(["epmd", "-port", &port.to_string(), "-address", "127.0.0.1"])
            .args(extra)
            .env("DISTPROXY_CONFIG", config)
            .env_remove("DISTPROXY_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::fs::read_to_string(log).is_ok_and(|t| t.contains("distproxy serving")) {
                return (child, port);
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!(
        "the epmd drop-in never served:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn epmd_drop_in_serves_with_a_global_log_format() {
    let (dir, config) = epmd_drop_in_config();
    let log = dir.path().join("stderr.log");
    let (mut child, _) = spawn_serving_drop_in(&["--log-format", "json"], &[], &config, &log);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{text}");
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
    }
}

/// `epmd -packet_timeout N` is the idle deadline of an incomplete request,
/// as in `epmd`: with 1 s, a request that sends half its length is closed
/// after about a second; without it the default (10 s) still holds it at
/// 3 s.
#[test]
fn epmd_packet_timeout_closes_an_incomplete_request_sooner() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let (dir, config) = epmd_drop_in_config();
    let log = dir.path().join("packet-timeout.log");
    // How long a half-sent request stays open, at most `limit`.
    let held_for = |extra: &[&str], limit: Duration| -> Duration {
        let (mut child, port) = spawn_serving_drop_in(&[], extra, &config, &log);
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        // The high byte of a length: a request that never completes.
        conn.write_all(&[0]).unwrap();
        conn.set_read_timeout(Some(limit)).unwrap();
        let start = Instant::now();
        let mut buf = [0u8; 1];
        // Closed (0 or a reset), or still open when the timeout ends it.
        let _ = conn.read(&mut buf);
        let held = start.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        held
    };
    let with_option = held_for(&["-packet_timeout", "1"], Duration::from_secs(8));
    assert!(
        with_option >= Duration::from_millis(900) && with_option < Duration::from_secs(6),
        "closed after {with_option:?} with -packet_timeout 1"
    );
    let without = held_for(&[], Duration::from_secs(3));
    assert!(
        without >= Duration::from_millis(2900),
        "the default idle deadline closed it after {without:?}"
    );
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

/// `--host` with a port (`[fd00::1]:4369`, `10.0.0.1:4369`) is a usage
/// error that says to use `--port`, not "cannot resolve host".
#[test]
fn names_refuses_a_host_with_a_port_saying_to_use_port() {
    for host in ["[fd00:d157::2]:4369", "198.18.0.2:4369"] {
        let (code, _, stderr) = run(&["names", "--host", host]);
        assert_eq!(code, 64, "{host}: {stderr}");
        assert!(
            stderr.contains("--port") && stderr.contains(host),
            "{host}: {stderr}"
        );
    }
}

/// `remsh` refuses what it cannot use before starting anything: a name
/// without a host (64), no cookie (1), an unknown `--via` form (64), a
/// `--via` host that does not resolve (64, as `names --host`).
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

    // HOST:PORT whose host does not resolve: said so (it was called a
    // usage error, "expected HOST:PORT", about a HOST:PORT).
    let (code, err) = remsh(
        &[
            "a1@pod-0.svc",
            "--via",
            "no-such-host.invalid:43691",
            "--cookie",
            "c",
        ],
        "/nonexistent",
    );
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("cannot resolve") && err.contains("no-such-host.invalid"),
        "{err}"
    );
    let (code, err) = remsh(
        &["a1@pod-0.svc", "--via", "127.0.0.1", "--cookie", "c"],
        "/nonexistent",
    );
    assert_eq!(code, 64, "no port: {err}");
    assert!(err.contains("expected HOST:PORT"), "{err}");
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

/// A key that is not the certificate's (a Secret assembled from two
/// issuances) stops `run` with exit 64 and an error naming `tls.key_file`
/// and its path, and says what is wrong in words.
#[test]
fn run_refuses_a_key_of_another_certificate_and_names_it() {
    use distproxy_testkit::certs::{Ca, SecretDir};
    let ca = Ca::new("dp-cli-ca");
    let leaf = ca.leaf(&["pod-a.dp.test"], 1);
    let other = ca.leaf(&["pod-a.dp.test"], 2);
    let dir = tempfile::tempdir().unwrap();
    let secret = SecretDir::create(dir.path(), &leaf.cert_pem, &other.key_pem, &ca.pem);
    let tls = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
        secret.cert_file().display(),
        secret.key_file().display(),
        secret.ca_file().display()
    );
    let (code, stderr) = run_config(&tls, &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("tls.key_file")
            && stderr.contains(&secret.key_file().display().to_string())
            && stderr.contains("is not the private key of the certificate in"),
        "{stderr}"
    );
}
