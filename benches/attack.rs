//! Attack load bench: pod B's sidecar under an EPMD request flood, a
//! slowloris on each of its ports (EPMD, distribution, admin) and a
//! connection storm on its distribution port, all at once, from an attacker
//! pod, while a1 (pod A) keeps pinging b1 (pod B) over a connection that
//! pod B's sidecar relays.
//!
//! Reports the ping round trip (p50, p99, max, failures) before and during
//! the attack, what each attacker achieved, and the sidecar's peak RSS and
//! open fds (sampled from `/proc` every 100 ms, and `VmHWM`).
//!
//! Run by hand, as root (network namespaces; real OTP nodes):
//!
//! ```text
//! cargo bench --bench attack                  # 20 s of attack
//! ATTACK_SECS=40 cargo bench --bench attack   # longer
//! ```
//!
//! Everything stays inside the namespace lab (198.18.0.0/24, see
//! `tests/support/lab.rs`); every attacker is bounded in connections and
//! stops after `ATTACK_SECS`. The attackers are this binary re-executed in
//! the attacker pod (`attack-role ...` arguments).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::beam::atom;
use support::sidecar::ADMIN_PORT;
use support::{BeamNode, DIST_PORT, EPMD_PORT};

/// Pings per measurement window and the pause between two pings.
const PING_INTERVAL_MS: u64 = 10;
const BASELINE_PINGS: usize = 500;
/// Default attack length (`ATTACK_SECS`).
const DEFAULT_ATTACK_SECS: u64 = 20;
/// Time the attack gets to build up before the pings during it start.
const RAMP: Duration = Duration::from_secs(3);
/// Worker threads of the EPMD flood and of the connection storm.
const FLOOD_THREADS: usize = 8;
const STORM_THREADS: usize = 8;
/// Connections each slowloris keeps open (one attacker process per port).
const SLOWLORIS_CONNS: usize = 800;
/// Deadline on every attacker connect, read and write.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("attack-role") {
        attacker(&args[1..]);
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // useful: only an explicit bench run starts the lab.
    if !args.iter().any(|a| a == "--bench") {
        println!("attack bench: run with `cargo bench --bench attack` (as root)");
        return;
    }
    if !support::e2e_enabled("attack bench", &[]) {
        return;
    }
    run_bench();
}

fn run_bench() {
    let attack_secs: u64 = std::env::var("ATTACK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_ATTACK_SECS);
    let lab = support::Lab::new(&["a", "b", "x"]);
    let (a, b, x) = (lab.pod("a"), lab.pod("b"), lab.pod("x"));
    let _sidecar_a = a.spawn_sidecar(&[]);
    let mut sidecar_b = b.spawn_sidecar(&[]);
    let mut a1 = a.start_erlang("a1");
    let _b1 = b.start_erlang("b1");
    let b1 = b.node_name("b1");
    // a1 dials b1: the connection is accepted and relayed by pod B's sidecar.
    assert_eq!(a1.ping(&b1), "pong", "a1 -> b1");
    let pid = sidecar_b.pid();
    let idle = proc_sample(pid);

    let before = ping_times(&mut a1, &b1, BASELINE_PINGS);

    let target = b.addr().to_string();
    let secs = attack_secs.to_string();
    let exe = std::env::current_exe().expect("bench executable path");
    let exe = exe.to_str().expect("utf-8 executable path");
    let mut roles: Vec<Vec<String>> = vec![
        vec!["flood".into(), target.clone(), EPMD_PORT.to_string()],
        vec!["storm".into(), target.clone(), DIST_PORT.to_string()],
    ];
    for port in [EPMD_PORT, DIST_PORT, ADMIN_PORT] {
        roles.push(vec!["slowloris".into(), target.clone(), port.to_string()]);
    }
    let attackers: Vec<(String, std::process::Child)> = roles
        .into_iter()
        .map(|role| {
            let label = role.join(" ");
            let mut cmd = x.command(exe);
            cmd.arg("attack-role")
                .args(&role)
                .arg(&secs)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start attacker {label}: {e}"));
            (label, child)
        })
        .collect();

    // Sample the sidecar while the attack runs.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = ProcSample::default();
            while !stop.load(Ordering::Relaxed) {
                let s = proc_sample(pid);
                peak.rss_kib = peak.rss_kib.max(s.rss_kib);
                peak.hwm_kib = peak.hwm_kib.max(s.hwm_kib);
                peak.fds = peak.fds.max(s.fds);
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };

    std::thread::sleep(RAMP);
    let window = Duration::from_secs(attack_secs).saturating_sub(RAMP + Duration::from_secs(2));
    let during_pings = (window.as_millis() as u64 / (PING_INTERVAL_MS + 1)).max(50) as usize;
    let during = ping_times(&mut a1, &b1, during_pings);

    let mut reports = Vec::new();
    for (label, mut child) in attackers {
        let mut out = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        let _ = child.wait();
        reports.push((label, out.trim().to_string()));
    }
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.join().expect("sampler thread");
    let after = proc_sample(pid);
    sidecar_b.assert_running();
    let after_attack = ping_times(&mut a1, &b1, 100);

    println!();
    println!("attack bench: sidecar of pod B, {attack_secs} s attack from pod X");
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>7} {:>6}",
        "ping a1 -> b1 (us)", "p50", "p99", "max", "n", "fail"
    );
    for (label, t) in [
        ("before the attack", &before),
        ("during the attack", &during),
        ("after the attack", &after_attack),
    ] {
        let s = t.summary();
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>7} {:>6}",
            label, s.p50, s.p99, s.max, s.n, t.failures
        );
    }
    println!();
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "sidecar B", "RSS KiB", "peak KiB", "fds"
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "idle", idle.rss_kib, idle.hwm_kib, idle.fds
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "peak during the attack", peak.rss_kib, peak.hwm_kib, peak.fds
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "after", after.rss_kib, after.hwm_kib, after.fds
    );
    println!("sidecar fd limit: {}", fd_limit(pid));
    println!();
    for (label, report) in reports {
        println!("attacker {label}: {report}");
    }
}

/// Round trips (microseconds) of successful pings, and the failures.
struct Pings {
    micros: Vec<u64>,
    failures: usize,
}

struct Summary {
    p50: u64,
    p99: u64,
    max: u64,
    n: usize,
}

impl Pings {
    fn summary(&self) -> Summary {
        let mut v = self.micros.clone();
        v.sort_unstable();
        let pick = |q: f64| -> u64 {
            if v.is_empty() {
                return 0;
            }
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            v[i]
        };
        Summary {
            p50: pick(0.50),
            p99: pick(0.99),
            max: v.last().copied().unwrap_or(0),
            n: v.len(),
        }
    }
}

/// `count` pings from `node` to `target`, timed inside the VM.
fn ping_times(node: &mut BeamNode, target: &str, count: usize) -> Pings {
    let id = node.send(&format!(
        "{{ping_times, {}, {count}, {PING_INTERVAL_MS}}}",
        atom(target)
    ));
    let budget =
        Duration::from_millis(count as u64 * (PING_INTERVAL_MS + 100)) + Duration::from_secs(30);
    let text = node.recv(id, budget);
    let mut pings = Pings {
        micros: Vec::new(),
        failures: 0,
    };
    for field in text.split_whitespace() {
        match field.parse::<i64>() {
            Ok(t) if t >= 0 => pings.micros.push(t as u64),
            _ => pings.failures += 1,
        }
    }
    pings
}

#[derive(Clone, Copy, Debug, Default)]
struct ProcSample {
    rss_kib: u64,
    hwm_kib: u64,
    fds: usize,
}

fn proc_sample(pid: u32) -> ProcSample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    ProcSample {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0),
    }
}

fn fd_limit(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().nth(3).unwrap_or("?").to_string())
        .unwrap_or_else(|| "?".into())
}

// --- Attackers (run inside the attacker pod) ---------------------------------

/// `attack-role ROLE HOST PORT SECS`: runs one attacker until SECS have
/// passed, then prints one summary line.
fn attacker(args: &[String]) {
    let [role, host, port, secs] = args else {
        eprintln!("usage: attack-role flood|storm|slowloris HOST PORT SECS");
        std::process::exit(64);
    };
    let addr: SocketAddr = format!("{host}:{port}").parse().expect("attack address");
    let secs: u64 = secs.parse().expect("attack seconds");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let report = match role.as_str() {
        "flood" => flood(addr, deadline),
        "storm" => storm(addr, deadline),
        "slowloris" => slowloris(addr, deadline),
        other => {
            eprintln!("unknown attacker role {other}");
            std::process::exit(64);
        }
    };
    println!("{report}");
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// EPMD requests as fast as the sidecar answers them: PORT_PLEASE2 for b1
/// and NAMES, one per connection, from several threads.
fn flood(addr: SocketAddr, deadline: Instant) -> String {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..FLOOD_THREADS)
        .map(|i| {
            let (ok, failed) = (ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let port_please: &[u8] = &[0, 3, 122, b'b', b'1'];
                let names: &[u8] = &[0, 1, 110];
                let mut n = i;
                while Instant::now() < deadline {
                    n += 1;
                    let request = if n % 2 == 0 { port_please } else { names };
                    let done = connect(addr).and_then(|mut s| {
                        s.write_all(request)?;
                        let mut reply = Vec::new();
                        s.read_to_end(&mut reply)?;
                        Ok(reply.len())
                    });
                    match done {
                        Ok(len) if len > 0 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    format!(
        "{} requests answered, {} failed",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    )
}

/// Connections opened and dropped at once on the distribution port, half of
/// them after sending the start of a handshake frame.
fn storm(addr: SocketAddr, deadline: Instant) -> String {
    let opened = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..STORM_THREADS)
        .map(|i| {
            let (opened, failed) = (opened.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut n = i;
                while Instant::now() < deadline {
                    n += 1;
                    match connect(addr) {
                        Ok(mut s) => {
                            if n % 2 == 0 {
                                // Length 20, then a few bytes of a send_name.
                                let _ = s.write_all(&[0, 20, b'N', 0, 0]);
                            }
                            opened.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    format!(
        "{} connections opened and dropped, {} connects failed",
        opened.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    )
}

/// Up to [`SLOWLORIS_CONNS`] connections, each sending one byte of a request
/// that never completes every second; closed ones are replaced.
fn slowloris(addr: SocketAddr, deadline: Instant) -> String {
    // A request head that is never finished: a 2-byte length announcing a
    // 40-byte request (EPMD, distribution) or an HTTP request line (admin).
    let prefix: &[u8] = if addr.port() == ADMIN_PORT {
        b"GET /metrics HTTP/1.1\r\nX-Slow: "
    } else {
        &[0, 40]
    };
    let mut conns: Vec<(TcpStream, usize)> = Vec::new();
    let (mut opened, mut closed_by_peer, mut max_open) = (0u64, 0u64, 0usize);
    while Instant::now() < deadline {
        while conns.len() < SLOWLORIS_CONNS && Instant::now() < deadline {
            match connect(addr) {
                Ok(s) => {
                    opened += 1;
                    conns.push((s, 0));
                }
                Err(_) => break,
            }
        }
        max_open = max_open.max(conns.len());
        let before = conns.len();
        conns.retain_mut(|(s, sent)| {
            let byte = prefix.get(*sent).copied().unwrap_or(b'a');
            *sent += 1;
            s.write_all(&[byte]).is_ok()
        });
        closed_by_peer += (before - conns.len()) as u64;
        std::thread::sleep(
            Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now())),
        );
    }
    format!(
        "{opened} opened, at most {max_open} open at once, {closed_by_peer} closed by the sidecar"
    )
}
