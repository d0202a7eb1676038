//! What the relay and tunnel benches share: a fake BEAM node, the binary
//! under test, and the arithmetic of the tables.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;

use bytes::BytesMut;
use distproxy::distribution::handshake::{self, Challenge, Status};

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
    let mut out = BytesMut::new();
    handshake::encode_status(&mut out, &Status::Ok);
    handshake::encode_challenge(
        &mut out,
        &Challenge {
            name: format!("{NODE}@fake.host"),
            flags: 0x000d_07df_7fbd,
            challenge: 0x1234_5678,
            creation: Some(77),
        },
    );
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

pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("pick a free port")
            .port();
        // Never 4369: a real EPMD may be running on this machine.
        if port != 4369 {
            return port;
        }
    }
}

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

/// The distproxy binary built with this bench, or `$override_var` (to
/// compare builds, e.g. before and after a relay change).
pub fn proxy_bin(override_var: &str) -> String {
    std::env::var(override_var)
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_distproxy").to_string())
}

/// Sends the `send_name` frame of `mode`'s initiator on `s` and reads the
/// node's status and challenge, checking it was answered by the fake node
/// and that nothing followed. `what` names the path in failure messages.
pub fn complete_handshake(s: &mut TcpStream, mode: Mode, what: &str) {
    use distproxy::distribution::handshake::SendName;
    s.set_nodelay(true).unwrap();
    let mut out = BytesMut::new();
    handshake::encode_send_name(
        &mut out,
        &SendName {
            name: mode.initiator().to_string(),
            flags: 0x000d_07df_7fbd,
            creation: Some(1234),
            version: None,
        },
    );
    s.write_all(&out).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut buf = BytesMut::new();
    let mut tmp = [0u8; 512];
    let mut status_len = None;
    loop {
        if status_len.is_none() {
            if let Ok(Some((_, n))) = handshake::parse_status(&buf) {
                status_len = Some(n);
            }
        }
        if let Some(sl) = status_len {
            if let Ok(Some((c, n))) = handshake::parse_challenge(&buf[sl..]) {
                assert_eq!(c.name, format!("{NODE}@fake.host"), "answered by the node");
                assert_eq!(sl + n, buf.len(), "no bytes after the challenge");
                return;
            }
        }
        let n = s.read(&mut tmp).expect("handshake reply");
        assert!(n > 0, "closed during the handshake ({what})");
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// A distproxy process, killed on drop.
pub struct Sidecar {
    pub label: &'static str,
    pub child: std::process::Child,
    pub epmd: std::net::SocketAddr,
    pub dist: std::net::SocketAddr,
    _config: tempfile::NamedTempFile,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Starts the distproxy binary (`$bin_var` overrides it) on 127.0.0.1 with
/// free EPMD and distribution ports (never 4369), the admin endpoint off and
/// `extra` appended to its configuration; waits until it serves.
pub fn start_sidecar(bin_var: &str, label: &'static str, log: &str, extra: &str) -> Sidecar {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let (epmd_port, dist_port) = loop {
        let (a, b) = (free_port(), free_port());
        if a != b {
            break (a, b);
        }
    };
    let epmd: std::net::SocketAddr = ([127, 0, 0, 1], epmd_port).into();
    let dist: std::net::SocketAddr = ([127, 0, 0, 1], dist_port).into();
    let mut config = tempfile::NamedTempFile::new().expect("temp config");
    write!(
        config,
        "[epmd]\nlisten = \"{epmd}\"\n\n[dist]\nlisten = \"{dist}\"\n\n\
         [admin]\nlisten = \"\"\n\n{extra}"
    )
    .unwrap();
    config.flush().unwrap();
    let child = Command::new(proxy_bin(bin_var))
        .arg("run")
        .arg("--config")
        .arg(config.path())
        .env("DISTPROXY_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start distproxy");
    let mut sidecar = Sidecar {
        label,
        child,
        epmd,
        dist,
        _config: config,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    // Both listeners are bound before either serves: a NAMES_REQ answered
    // means the distribution port is ready too.
    while block_on(distproxy::client::names(epmd)).is_err() {
        if let Ok(Some(status)) = sidecar.child.try_wait() {
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
