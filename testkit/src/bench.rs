//! What the relay and tunnel benches share: a threaded fake BEAM node, the
//! binary under test, ping-pong, and the arithmetic of the tables.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::frames;
use crate::process::Proc;
use crate::sut::{client, handshake};

/// What the fake node does after the handshake, chosen by the initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Read to EOF, then answer with the byte count (u64, big-endian).
    Sink,
    /// Echo everything; half-close after EOF.
    Echo,
}

impl Mode {
    pub fn initiator(self) -> &'static str {
        match self {
            Mode::Sink => "sink@bench.client",
            Mode::Echo => "echo@bench.client",
        }
    }
}

/// A fake BEAM node: answers the first two handshake frames with its name,
/// then sinks or echoes. Threads live until the process exits.
pub fn start_fake_node() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake node");
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { continue };
            thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let _ = serve_node_conn(s);
                })
                .expect("spawn node thread");
        }
    });
    port
}

pub fn serve_node_conn(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(512);
    let mut tmp = [0u8; 512];
    let send_name = loop {
        if let Ok(Some((m, _))) = handshake::parse_send_name(&buf) {
            break m;
        }
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let mode = if send_name.name.starts_with("sink@") {
        Mode::Sink
    } else {
        Mode::Echo
    };
    let out = frames::node_answer(&format!("{NODE}@fake.host"));
    s.write_all(&out)?;
    let mut data = vec![0u8; CHUNK];
    match mode {
        Mode::Sink => {
            let mut total = 0u64;
            loop {
                let n = s.read(&mut data)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            s.write_all(&total.to_be_bytes())?;
        }
        Mode::Echo => loop {
            let n = s.read(&mut data)?;
            if n == 0 {
                break;
            }
            s.write_all(&data[..n])?;
        },
    }
    s.shutdown(Shutdown::Write)
}

pub use crate::ports::free_port;

/// User plus system CPU time of a process, in seconds (Linux only).
pub fn cpu_secs(pid: u32) -> f64 {
    // Fields 14 and 15 of /proc/<pid>/stat, in USER_HZ (100 on Linux),
    // counted after the parenthesised command name.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    let idx = ((sorted_ns.len() as f64 - 1.0) * p).round() as usize;
    sorted_ns[idx] as f64 / 1000.0
}

pub fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

pub fn spread(v: &[f64]) -> String {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(0.0, f64::max);
    format!("{lo:.0}..{hi:.0}")
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The fake node's name, registered with B and BT.
pub const NODE: &str = "bench";

pub const CHUNK: usize = 256 * 1024;

/// Sends the `send_name` frame of `mode`'s initiator on `s` and reads the
/// node's status and challenge, checking it was answered by the fake node
/// and that nothing followed. `what` names the path in failure messages.
pub fn complete_handshake(s: &mut TcpStream, mode: Mode, what: &str) {
    s.set_nodelay(true).unwrap();
    s.write_all(&frames::send_name(mode.initiator())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = BytesMut::new();
    let mut tmp = [0u8; 512];
    loop {
        if let Some((name, n)) = frames::parse_node_answer(&buf) {
            assert_eq!(name, format!("{NODE}@fake.host"), "answered by the node");
            assert_eq!(n, buf.len(), "no bytes after the challenge");
            return;
        }
        let n = s.read(&mut tmp).expect("handshake reply");
        assert!(n > 0, "closed during the handshake ({what})");
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// A distproxy process, killed on drop.
pub struct Sidecar {
    pub label: &'static str,
    pub proc: Proc,
    pub epmd: SocketAddr,
    pub dist: SocketAddr,
    _config: tempfile::NamedTempFile,
}

impl Sidecar {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// Runs a future on a fresh current-thread runtime (for the few EPMD client
/// calls the benches make).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime")
        .block_on(f)
}

/// Starts the distproxy binary `bin` (see `distproxy_bin!`) on 127.0.0.1
/// with free EPMD and distribution ports (never 4369), the admin endpoint off
/// (unless `extra` has an `[admin]` section) and `extra` appended to its configuration; waits until it serves.
pub fn start_sidecar(bin: &str, label: &'static str, log: &str, extra: &str) -> Sidecar {
    start_sidecar_with(bin, label, log, "", extra)
}

/// [`start_sidecar`] with `dist_extra` added to the `[dist]` section (e.g.
/// `max_connections = 12000\n`).
pub fn start_sidecar_with(
    bin: &str,
    label: &'static str,
    log: &str,
    dist_extra: &str,
    extra: &str,
) -> Sidecar {
    let [epmd_port, dist_port] = crate::ports::free_ports();
    let epmd = SocketAddr::from(([127, 0, 0, 1], epmd_port));
    let dist = SocketAddr::from(([127, 0, 0, 1], dist_port));
    let config = sidecar_config(epmd, dist, dist_extra, extra);
    let proc = Proc::spawn_unlogged(
        label,
        Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config.path())
            .env("DISTPROXY_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    let mut sidecar = Sidecar {
        label,
        proc,
        epmd,
        dist,
        _config: config,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    // Both listeners are bound before either serves: a NAMES_REQ answered
    // means the distribution port is ready too.
    while block_on(client::names(epmd)).is_err() {
        if let Some(status) = sidecar.proc.exited() {
            panic!("sidecar {label} exited at start-up: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "sidecar {label} did not start listening"
        );
        thread::sleep(Duration::from_millis(20));
    }
    sidecar
}

/// The configuration file [`start_sidecar_with`] hands the sidecar.
fn sidecar_config(
    epmd: SocketAddr,
    dist: SocketAddr,
    dist_extra: &str,
    extra: &str,
) -> tempfile::NamedTempFile {
    let mut config = tempfile::NamedTempFile::new().expect("temp config");
    // The admin endpoint is off unless `extra` sets it.
    let admin = if extra.contains("[admin]") {
        ""
    } else {
        "[admin]\nlisten = \"\"\n\n"
    };
    write!(
        config,
        "[epmd]\nlisten = \"{epmd}\"\n\n[dist]\nlisten = \"{dist}\"\n{dist_extra}\n\
         {admin}{extra}"
    )
    .unwrap();
    config.flush().unwrap();
    config
}

/// Another distproxy build to measure in the same run: `--baseline BIN` (or
/// `--baseline=BIN`) among the bench's arguments, else the variable `var`.
pub fn baseline_arg(args: &[String], var: &str) -> Option<String> {
    let from_args = args.iter().enumerate().find_map(|(i, a)| {
        if a == "--baseline" {
            Some(args.get(i + 1).expect("--baseline BIN").clone())
        } else {
            a.strip_prefix("--baseline=").map(str::to_string)
        }
    });
    from_args
        .or_else(|| std::env::var(var).ok())
        .filter(|b| !b.is_empty())
}

/// `extra` (as [`start_sidecar`] takes it) in a form the distproxy binary
/// `bin` accepts, for measuring an older build with the same bench: the
/// whole configuration is put to `bin check-config` (exit 64 on a refused
/// key); if refused, each section named in `droppable` (e.g. `"limits"`, which
/// builds before the per-source limit do not know) is left out in turn until
/// it is accepted. Returns the configuration and the sections left out;
/// panics with the binary's message if no such form is accepted.
pub fn config_accepted_by(bin: &str, extra: &str, droppable: &[&str]) -> (String, Vec<String>) {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let check = |extra: &str| -> Result<(), String> {
        let config = sidecar_config(any, any, "", extra);
        let out = Command::new(bin)
            .arg("check-config")
            .arg(config.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("failed to run {bin} check-config: {e}"));
        match out.status.code() {
            Some(0) => Ok(()),
            Some(64) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
            _ => panic!(
                "{bin} check-config failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    };
    let Err(first) = check(extra) else {
        return (extra.to_string(), Vec::new());
    };
    let mut config = extra.to_string();
    let mut dropped = Vec::new();
    for section in droppable {
        let without = drop_section(&config, section);
        if without == config {
            continue;
        }
        config = without;
        dropped.push(format!("[{section}]"));
        if check(&config).is_ok() {
            return (config, dropped);
        }
    }
    panic!("{bin} refuses the bench's configuration: {first}");
}

/// `toml` without the section `[name]` (its header and every line up to the
/// next header).
fn drop_section(toml: &str, name: &str) -> String {
    let header = format!("[{name}]");
    let mut inside = false;
    let mut out = String::new();
    for line in toml.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            inside = t == header;
        }
        if !inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Round-trip times in nanoseconds of `iters` ping-pongs of `msg.len()`
/// bytes on `s` (an echoing peer), after a warm-up of a tenth as many (at
/// least 100). `what` names the path in failure messages.
pub fn ping_pong(s: &mut TcpStream, msg: &mut [u8], iters: usize, out: &mut Vec<u64>, what: &str) {
    let mut back = vec![0u8; msg.len()];
    for i in 0..(iters / 10).max(100) {
        msg[0] = i as u8;
        s.write_all(msg).unwrap();
        s.read_exact(&mut back).unwrap();
    }
    for i in 0..iters {
        msg[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let t0 = Instant::now();
        s.write_all(msg).unwrap();
        s.read_exact(&mut back).unwrap();
        out.push(t0.elapsed().as_nanos() as u64);
    }
    assert_eq!(*msg, back[..], "echoed intact ({what})");
}

/// Asks `epmd` for the egress port of `remote`, as `distproxy_epmd` does
/// (blocking).
pub fn egress_port(epmd: SocketAddr, remote: &str) -> u16 {
    let reply = block_on(client::request_to_eof(
        epmd,
        &crate::sut::Request::Egress {
            node: remote.to_string(),
        },
    ))
    .unwrap_or_else(|e| panic!("egress request for {remote} to {epmd}: {e}"));
    let r = crate::peer::decode_egress_reply(remote, &reply);
    crate::peer::granted_port(remote, &r)
}

/// The port `epmd` answers for `name` (blocking).
pub fn lookup_port(epmd: SocketAddr, name: &str) -> u16 {
    block_on(crate::peer::lookup_port(epmd, name))
}

/// The bytes the benches send: `CHUNK` bytes of a pattern.
pub fn pattern() -> Vec<u8> {
    (0..CHUNK).map(|i| (i % 251) as u8).collect()
}

/// Writes `total` bytes of `data`, repeated, on `s`.
pub fn write_n(s: &mut TcpStream, total: u64, data: &[u8]) {
    let mut left = total;
    while left > 0 {
        let n = left.min(data.len() as u64) as usize;
        s.write_all(&data[..n]).expect("bulk write");
        left -= n as u64;
    }
}

/// One-way bulk transfer of `bytes` to a [`Mode::Sink`] node on `s`:
/// seconds from the first write to the node's count, which must be `bytes`,
/// followed by EOF. `what` names the path in failure messages.
pub fn bulk_to_sink(s: &mut TcpStream, bytes: u64, what: &str) -> f64 {
    let data = pattern();
    let t0 = Instant::now();
    write_n(s, bytes, &data);
    s.shutdown(Shutdown::Write).unwrap();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).expect("count from the node");
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(
        u64::from_be_bytes(count),
        bytes,
        "node got every byte ({what})"
    );
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "EOF after the count ({what})");
    secs
}

/// Raises this process's limit on open files (soft and, as root, hard) to
/// at least `want`, so that children started afterwards inherit it. Returns
/// the soft limit now in force (lower than `want` when the hard limit could
/// not be raised).
#[cfg(target_os = "linux")]
pub fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= want {
        return soft;
    }
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return want;
    }
    let soft = want.min(hard);
    let _ = setrlimit(Resource::RLIMIT_NOFILE, soft, hard);
    getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(s, _)| s)
}

#[cfg(not(target_os = "linux"))]
pub fn raise_nofile(_want: u64) -> u64 {
    0
}

/// A field of `/proc/<pid>/status` in kB (Linux only; 0 elsewhere).
pub fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Open file descriptors of a process (Linux only; 0 elsewhere).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Certificates for the two "pods" (both sidecars and, for `inet_tls_dist`,
/// both nodes): one CA, one leaf each with the IP SAN 127.0.0.1 and the DNS
/// SAN localhost.
pub struct Pki {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    /// (certificate, key) of pod A and pod B.
    pub a: (PathBuf, PathBuf),
    pub b: (PathBuf, PathBuf),
}

pub fn make_pki() -> Pki {
    let dir = tempfile::tempdir().expect("temp dir for certificates");
    let ca = crate::certs::Ca::new("distproxy bench CA");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write PEM");
        p
    };
    let ca_file = write("ca.crt", &ca.pem);
    let leaf = |pod: &str, serial| {
        let l = ca.leaf(&["127.0.0.1", "localhost"], serial);
        (
            write(&format!("{pod}.crt"), &l.cert_pem),
            write(&format!("{pod}.key"), &l.key_pem),
        )
    };
    let a = leaf("pod-a", 1);
    let b = leaf("pod-b", 2);
    Pki {
        ca: ca_file,
        a,
        b,
        _dir: dir,
    }
}

pub fn tls_section(pki: &Pki, (cert, key): &(PathBuf, PathBuf)) -> String {
    format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n\
         verify_server_name = \"hostname\"\nrequire_tls = true\n",
        cert.display(),
        key.display(),
        pki.ca.display()
    )
}

/// Context switches (voluntary and not) of every thread of a process so
/// far (Linux only): each one is a wake-up or a preemption.
pub fn ctx_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// The text of `GET /metrics` from an admin endpoint (blocking).
pub fn scrape(admin: SocketAddr) -> io::Result<String> {
    let mut s = TcpStream::connect(admin)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// The value of the sample `series` (name with labels, as printed) in
/// Prometheus text, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// A real `erl` node driven by a bench's Erlang helper over stdin/stdout:
/// node `name@127.0.0.1` (listening on 127.0.0.1 only) running
/// `Module:Role()`, registered with the EPMD at `epmd_port`. Lines starting
/// with one of `answers` are the helper's answers; anything else it prints
/// (logger reports) goes to stderr. `args` carry the cookie and the rest
/// of the node's flags. Killed on drop, after its stdin is
/// closed, which halts it (fields drop in declaration order).
pub struct BenchNode {
    name: String,
    stdin: Option<std::process::ChildStdin>,
    proc: Proc,
    lines: std::sync::mpsc::Receiver<String>,
}

impl BenchNode {
    pub fn start(
        name: &str,
        (module, role): (&str, &str),
        epmd_port: u16,
        ebin: &std::path::Path,
        args: &[String],
        answers: &'static [&'static str],
    ) -> BenchNode {
        use std::io::BufRead;
        let full = format!("{name}@127.0.0.1");
        let mut cmd = Command::new("erl");
        cmd.args(["-noshell", "-name", &full])
            .args(["-start_epmd", "false"])
            .args(["-kernel", "inet_dist_use_interface", "{127,0,0,1}"])
            .arg("-pa")
            .arg(ebin)
            .args(args)
            .args(["-run", module, role])
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            .env_remove("ERL_FLAGS")
            .env_remove("ERL_AFLAGS")
            .env_remove("ERL_ZFLAGS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut proc = Proc::spawn_unlogged(&full, &mut cmd);
        let stdin = proc.child_mut().stdin.take();
        let stdout = proc.child_mut().stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        let tag = full.clone();
        thread::spawn(move || {
            for line in io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if answers.iter().any(|a| line.starts_with(a)) {
                    if tx.send(line).is_err() {
                        break;
                    }
                } else {
                    eprintln!("[{tag}] {line}");
                }
            }
        });
        BenchNode {
            name: full,
            proc,
            stdin,
            lines,
        }
    }

    /// The helper's next answer; panics after `timeout`.
    pub fn answer(&mut self, what: &str, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => line,
            Err(e) => {
                let status = self.proc.exited();
                panic!(
                    "node {}: no answer to {what} ({e}); process: {status:?}",
                    self.name
                )
            }
        }
    }

    /// Sends one command line and returns its answer, which must not be an
    /// error.
    pub fn command(&mut self, cmd: &str, timeout: Duration) -> String {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{cmd}").expect("write to erl");
        stdin.flush().expect("flush to erl");
        let line = self.answer(cmd, timeout);
        assert!(
            !line.starts_with("error"),
            "node {}: {cmd}: {line}",
            self.name
        );
        line
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The node's full name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_section_leaves_out_one_section_and_keeps_the_rest() {
        let toml = "[routing]\nloopback_lookups = \"proxy\"\n\n\
                    [limits]\ndist_max_connections_per_source = 4096\n\
                    reserved = 1\n\n[[acl]]\nallow = true\n";
        assert_eq!(
            drop_section(toml, "limits"),
            "[routing]\nloopback_lookups = \"proxy\"\n\n[[acl]]\nallow = true\n"
        );
        assert_eq!(drop_section(toml, "tls"), toml);
    }

    #[test]
    fn baseline_comes_from_the_arguments_first() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let var = "DISTPROXY_TESTKIT_NO_SUCH_VARIABLE";
        assert_eq!(
            baseline_arg(&args(&["--bench", "--baseline", "/a"]), var).as_deref(),
            Some("/a")
        );
        assert_eq!(
            baseline_arg(&args(&["--baseline=/b"]), var).as_deref(),
            Some("/b")
        );
        assert_eq!(baseline_arg(&args(&["--bench"]), var), None);
    }
}
