//! The lab: an isolated network of pods.
//!
//! ```text
//!   netns <lab>            (bridge namespace, one per lab)
//!     br0 ── v0 ── v1 ── v2 ...
//!            │     │     │            veth pairs
//!   netns <lab>a  <lab>b  <lab>s      (one per pod)
//!     lo, eth0 198.18.0.11/24, .12, .13 ...
//!     (dual-stack labs: also fd00:d157::11/64, ::12, ::13 ...)
//!     /etc/netns/<ns>/hosts           pod-a.dp.test → 198.18.0.11, ...
//!                                     (dual-stack: and → fd00:d157::11)
//! ```
//!
//! Every lab has its own bridge namespace, so labs never see each other; the
//! root namespace gets no interface at all. `ip netns exec` bind-mounts the
//! files of `/etc/netns/<ns>/` over `/etc/`, which gives each pod its own
//! hosts file (and a resolv.conf pointing nowhere, so nothing leaves the lab).
//! Only addresses of 198.18.0.0/15 (RFC 2544 benchmarking range) are used,
//! and, in a lab built with [`Lab::new_dual_stack`], the unique local IPv6
//! prefix fd00:d157::/64 (RFC 4193), added with `nodad` so it is usable at
//! once. A dual-stack pod's name resolves to both addresses, as a pod's name
//! in a dual-stack Kubernetes cluster does (an A and an AAAA record): an
//! IPv4 node (`inet_tcp`) gets the IPv4 address, an `inet6_tcp` node the
//! IPv6 one. Labs built with [`Lab::new`] are IPv4 only.
//!
//! Namespace names are `dpe<pid>x<lab><pod>`: unique per process and lab, and
//! recognisable, so a later run can remove what a killed run left behind.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixSocketAddr, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use super::beam::{self, BeamNode, NodeKind};
use super::netstat::{self, Listener};
use super::otp::Otp;
use super::process::Proc;
use super::sidecar::{Daemon, SidecarOptions};
use super::EPMD_PORT;

/// Prefix of every namespace, /etc/netns directory and temp directory.
const PREFIX: &str = "dpe";
/// DNS domain of the pods' hostnames.
pub const DOMAIN: &str = "dp.test";
/// Pods get 198.18.0.11, .12, ...
const FIRST_HOST: u8 = 11;
/// Dual-stack pods also get fd00:d157::11, ::12, ... (the IPv4 host number
/// written as the last group).
const IPV6_PREFIX: &str = "fd00:d157::";
/// Bound on every `ip` (and other short) command the harness runs.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of each log printed when a test fails.
const LOG_TAIL_LINES: usize = 120;

/// Serialises labs across the test threads of one process.
static SERIAL: Mutex<()> = Mutex::new(());
/// Abstract Unix socket bound while a lab exists: serialises labs across
/// processes too (e.g. two e2e test binaries started at once). The kernel
/// frees the name when its holder dies, so a killed run never leaves it taken.
const HOST_LOCK: &[u8] = b"distproxy-e2e-lab";
/// How long a lab waits for another process's lab to finish.
const HOST_LOCK_WAIT: Duration = Duration::from_secs(900);
static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

/// State shared by a lab and everything started in it.
pub(crate) struct LabShared {
    /// Logs, configs, compiled agent; removed on success.
    pub dir: PathBuf,
    /// Compiled `dp_test_agent`.
    pub ebin: PathBuf,
    pub cookie: String,
    seq: AtomicU32,
    /// The agent compiled by each release other than the host's (see
    /// [`agent_ebin`](Self::agent_ebin)).
    release_ebins: Mutex<HashMap<Otp, PathBuf>>,
}

impl LabShared {
    /// A fresh path in the lab directory: `<stem>.<n>.<ext>`.
    pub fn file(&self, stem: &str, ext: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{stem}.{n:02}.{ext}"))
    }

    /// The directory of the agent `.beam` for nodes of release `otp`: the
    /// host's [`ebin`](Self::ebin), or the agent compiled once per lab by
    /// that release's `erlc`.
    pub fn agent_ebin(&self, otp: Otp) -> PathBuf {
        if otp.rootfs().is_none() {
            return self.ebin.clone();
        }
        let mut ebins = self
            .release_ebins
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        ebins
            .entry(otp)
            .or_insert_with(|| {
                let ebin = self.dir.join(format!("ebin-{}", otp.release()));
                beam::compile_agent_with(otp, &self.dir, &ebin);
                ebin
            })
            .clone()
    }
}

/// An isolated network of pods. See the module docs.
pub struct Lab {
    shared: Arc<LabShared>,
    pods: Vec<Pod>,
    /// Every namespace created so far, bridge first: deleted on drop.
    namespaces: Vec<String>,
    started: Instant,
    // Declared last: released only after the cleanup in `drop`.
    _host_lock: UnixListener,
    _serial: MutexGuard<'static, ()>,
}

impl Lab {
    /// Builds a lab with one pod per name (`["a", "b", "s"]` gives pods
    /// `pod-a.dp.test`, ...). Waits for any other lab, of this process or
    /// another, to be dropped first. Panics, after cleaning up, if anything
    /// fails. IPv4 only.
    pub fn new(pod_names: &[&str]) -> Lab {
        Lab::build(pod_names, false)
    }

    /// Like [`new`](Self::new), and every pod also gets an IPv6 address
    /// ([`Pod::addr6`], in fd00:d157::/64) that its hostname resolves to
    /// as well, for `inet6_tcp` nodes: a dual-stack cluster.
    pub fn new_dual_stack(pod_names: &[&str]) -> Lab {
        Lab::build(pod_names, true)
    }

    fn build(pod_names: &[&str], dual_stack: bool) -> Lab {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let host_lock = host_lock();
        STALE_CLEANUP.call_once(remove_stale);

        let pid = std::process::id();
        let id = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{PREFIX}-{pid}-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create lab directory {}: {e}", dir.display()));
        let ebin = dir.join("ebin");
        let shared = Arc::new(LabShared {
            dir,
            ebin,
            cookie: format!("dpcookie{pid}x{id}"),
            seq: AtomicU32::new(0),
            release_ebins: Mutex::new(HashMap::new()),
        });

        let mut lab = Lab {
            shared: shared.clone(),
            pods: Vec::new(),
            namespaces: Vec::new(),
            started: Instant::now(),
            _host_lock: host_lock,
            _serial: serial,
        };

        beam::compile_agent(&shared.ebin);

        let bridge = format!("{PREFIX}{pid}x{id}");
        lab.add_namespace(&bridge);
        ip(&["-n", &bridge, "link", "set", "lo", "up"]);
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"]);
        if dual_stack {
            // Neighbour discovery is multicast: without an MLD querier on the
            // bridge, snooping could drop it; flood it to every port instead.
            ip(&[
                "-n",
                &bridge,
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ]);
        }
        ip(&["-n", &bridge, "link", "set", "br0", "up"]);

        let names: HashSet<&str> = pod_names.iter().copied().collect();
        assert_eq!(names.len(), pod_names.len(), "duplicate pod names");
        for (i, name) in pod_names.iter().enumerate() {
            assert!(
                !name.is_empty()
                    && name.len() <= 3
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
                "pod name {name:?}: use 1-3 lowercase letters or digits"
            );
            let ns = format!("{bridge}{name}");
            assert!(ns.len() <= 15, "namespace name {ns} too long");
            let addr = Ipv4Addr::new(198, 18, 0, FIRST_HOST + i as u8);
            let port = format!("v{i}");
            lab.add_namespace(&ns);
            ip(&[
                "-n", &bridge, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            ip(&["-n", &bridge, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &bridge, "link", "set", &port, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            let addr6 = dual_stack.then(|| {
                let addr6: Ipv6Addr = format!("{IPV6_PREFIX}{}", FIRST_HOST + i as u8)
                    .parse()
                    .expect("pod IPv6 address");
                // `nodad`: usable at once, not tentative during duplicate
                // address detection (nothing else on the bridge has it).
                ip(&[
                    "-n",
                    &ns,
                    "-6",
                    "addr",
                    "add",
                    &format!("{addr6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ]);
                addr6
            });
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            lab.pods.push(Pod {
                name: name.to_string(),
                ns,
                host: format!("pod-{name}.{DOMAIN}"),
                addr,
                addr6,
                epmd: Cell::new(None),
                otp: Cell::new(Otp::default()),
                lab: shared.clone(),
            });
        }

        let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
        for pod in &lab.pods {
            let _ = writeln!(hosts, "{} {} pod-{}", pod.addr, pod.host, pod.name);
            if let Some(addr6) = pod.addr6 {
                let _ = writeln!(hosts, "{addr6} {} pod-{}", pod.host, pod.name);
            }
        }
        for pod in &lab.pods {
            let etc = netns_etc(&pod.ns);
            std::fs::create_dir_all(&etc)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", etc.display()));
            std::fs::write(etc.join("hosts"), &hosts).expect("write pod hosts file");
            // Nothing may leave the lab: no reachable name server.
            std::fs::write(
                etc.join("resolv.conf"),
                "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
            )
            .expect("write pod resolv.conf");
        }
        lab
    }

    fn add_namespace(&mut self, ns: &str) {
        // Recorded before creation, so a half-made namespace is removed too.
        self.namespaces.push(ns.to_string());
        ip(&["netns", "add", ns]);
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name:?} in this lab"))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Directory holding this lab's logs.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn cookie(&self) -> &str {
        &self.shared.cookie
    }

    fn print_logs(&self) {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.shared.dir)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.is_file());
        files.sort();
        eprintln!(
            "==== lab {} failed after {:.1?}; logs kept in {} ====",
            self.namespaces.first().map(String::as_str).unwrap_or("?"),
            self.started.elapsed(),
            self.shared.dir.display()
        );
        for file in files {
            let text = std::fs::read(&file)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
            eprintln!(
                "---- {} ({} lines{}) ----",
                file.file_name().unwrap_or_default().to_string_lossy(),
                lines.len(),
                if skip > 0 { ", tail" } else { "" }
            );
            for line in &lines[skip..] {
                eprintln!("{line}");
            }
        }
        eprintln!("==== end of lab logs ====");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if failed {
            self.print_logs();
        }
        // Pods first (their processes), bridge last.
        for ns in self.namespaces.iter().rev() {
            destroy_namespace(ns);
        }
        let keep = failed || std::env::var_os("DISTPROXY_E2E_KEEP").is_some();
        if !keep {
            let _ = std::fs::remove_dir_all(&self.shared.dir);
        }
    }
}

/// Which EPMD a pod runs; decides how its nodes bind their listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpmdKind {
    /// distproxy: nodes listen on 127.0.0.1 only, so every cross-pod byte
    /// passes through the sidecar.
    Sidecar,
    /// Stock `epmd`: nodes listen on all addresses, as without distproxy.
    Stock,
}

/// One pod: a network namespace with an address, a hostname and a hosts file.
pub struct Pod {
    name: String,
    ns: String,
    host: String,
    addr: Ipv4Addr,
    /// Only in a dual-stack lab.
    addr6: Option<Ipv6Addr>,
    epmd: Cell<Option<EpmdKind>>,
    /// Release of the nodes started here unless a node's options say
    /// otherwise.
    otp: Cell<Otp>,
    lab: Arc<LabShared>,
}

impl Pod {
    /// Short name (`a`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Network namespace name.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Hostname (`pod-a.dp.test`).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The pod's IPv6 address; panics unless the lab is dual-stack
    /// ([`Lab::new_dual_stack`]).
    pub fn addr6(&self) -> Ipv6Addr {
        self.addr6.unwrap_or_else(|| {
            panic!(
                "pod {} has no IPv6 address: build the lab with Lab::new_dual_stack",
                self.name
            )
        })
    }

    /// Full node name of `short` in this pod (`a1@pod-a.dp.test`).
    pub fn node_name(&self, short: &str) -> String {
        format!("{short}@{}", self.host)
    }

    pub(crate) fn lab(&self) -> &LabShared {
        &self.lab
    }

    /// Runs `f` on a new thread that has entered this pod's network
    /// namespace: the sockets it opens are the pod's. For peers written in
    /// Rust (raw protocol bytes, attackers) that must come from inside the
    /// lab, where the root namespace has no interface.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns(2) with a descriptor we own; CLONE_NEWNET moves
            // only the calling thread (this new one) to the namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// A command running `program` inside this pod, with a clean Erlang
    /// environment and `HOME` in the lab directory.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]);
        self.clean_command(cmd)
    }

    /// Like [`command`](Self::command), with `program` of OTP release `otp`
    /// (`erl`, `elixir`, ...; see [`Otp::command`]).
    pub fn otp_command(&self, otp: Otp, program: &str) -> Command {
        self.clean_command(otp.command(Some(&self.ns), program))
    }

    /// The OTP release of the nodes started in this pod from now on (by
    /// default [`Otp::V25`], the host's).
    pub fn otp(&self) -> Otp {
        self.otp.get()
    }

    /// Sets the release of the nodes started in this pod from now on (a
    /// node's [`ErlangOptions::otp`](beam::ErlangOptions) overrides it).
    /// Running nodes are not affected: restart them to change release.
    pub fn set_otp(&self, otp: Otp) {
        self.otp.set(otp);
    }

    fn clean_command(&self, mut cmd: Command) -> Command {
        for var in [
            "ERL_EPMD_ADDRESS",
            "ERL_EPMD_PORT",
            "ERL_FLAGS",
            "ERL_AFLAGS",
            "ERL_ZFLAGS",
            "ERL_LIBS",
            "ELIXIR_ERL_OPTIONS",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("HOME", &self.lab.dir);
        cmd.current_dir(&self.lab.dir);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `program args` in the pod to completion (killed after 20 s) and
    /// returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let secs = COMMAND_TIMEOUT.as_secs().to_string();
        let mut cmd = self.command("timeout");
        cmd.args(["-k", "2", &secs, program]).args(args);
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {program} in pod {}: {e}", self.name))
    }

    /// Like [`run`](Self::run), panicking unless it exits 0; returns stdout.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "`{program} {}` in pod {} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// TCP sockets listening in this pod.
    pub fn listening_tcp(&self) -> Vec<Listener> {
        let out = self.run("cat", &["/proc/net/tcp", "/proc/net/tcp6"]);
        netstat::parse_listeners(&String::from_utf8_lossy(&out.stdout))
    }

    /// Waits until something listens on TCP `port` in this pod. Fails early,
    /// with its log, if `watch` exits meanwhile.
    pub fn wait_listening(&self, port: u16, timeout: Duration, mut watch: Option<&mut Proc>) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.listening_tcp().iter().any(|l| l.addr.port() == port) {
                return;
            }
            if let Some(proc) = watch.as_deref_mut() {
                if let Some(status) = proc.exited() {
                    panic!(
                        "{} in pod {} exited ({status}) before listening on port {port}; its log:\n{}",
                        proc.label(),
                        self.name,
                        proc.log_text()
                    );
                }
            }
            if Instant::now() >= deadline {
                let log = watch.map(|p| p.log_text()).unwrap_or_default();
                panic!(
                    "nothing listens on port {port} in pod {} after {timeout:?}; log:\n{log}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts distproxy (`run` plus `args`) in this pod; returns once EPMD
    /// and the distribution port are listening.
    pub fn spawn_sidecar(&self, args: &[&str]) -> Daemon {
        self.spawn_sidecar_with(SidecarOptions::with_args(args))
    }

    /// Starts distproxy with full options (config file, ports to wait for).
    pub fn spawn_sidecar_with(&self, options: SidecarOptions) -> Daemon {
        let daemon = Daemon::sidecar(self, options);
        self.epmd.set(Some(EpmdKind::Sidecar));
        daemon
    }

    /// Starts stock `epmd` in the foreground in this pod; returns once it
    /// listens on 4369.
    pub fn spawn_stock_epmd(&self) -> Daemon {
        let daemon = Daemon::stock_epmd(self);
        self.epmd.set(Some(EpmdKind::Stock));
        daemon
    }

    pub fn epmd_kind(&self) -> EpmdKind {
        self.epmd.get().unwrap_or_else(|| {
            panic!(
                "pod {} runs no EPMD: start a sidecar or stock epmd before its nodes",
                self.name
            )
        })
    }

    /// Starts an Erlang node `short@pod-x.dp.test` running the test agent;
    /// does not wait for it (see [`BeamNode::wait_ready`]).
    pub fn spawn_erlang(&self, short: &str) -> BeamNode {
        BeamNode::spawn(self, short, NodeKind::Erlang, self.epmd_kind())
    }

    /// Starts an Erlang node with non-default options (node name, `-sname`,
    /// extra `erl` arguments); does not wait for it. Added for
    /// tests/e2e_tunnel.rs.
    pub fn spawn_erlang_with(&self, short: &str, options: &beam::ErlangOptions) -> BeamNode {
        BeamNode::spawn_with(self, short, NodeKind::Erlang, self.epmd_kind(), options)
    }

    /// Starts an Erlang node and waits until it is registered and ready.
    pub fn start_erlang(&self, short: &str) -> BeamNode {
        let mut node = self.spawn_erlang(short);
        node.wait_ready();
        node
    }

    /// Starts an Elixir node (`elixir --name ... --erl "..."`) running the
    /// same agent; does not wait for it.
    pub fn spawn_elixir(&self, short: &str) -> BeamNode {
        BeamNode::spawn(self, short, NodeKind::Elixir, self.epmd_kind())
    }

    /// Starts an Elixir node with non-default options (release, extra `erl`
    /// arguments given to `--erl`, environment such as
    /// `ELIXIR_ERL_OPTIONS`); does not wait for it.
    pub fn spawn_elixir_with(&self, short: &str, options: &beam::ErlangOptions) -> BeamNode {
        BeamNode::spawn_with(self, short, NodeKind::Elixir, self.epmd_kind(), options)
    }

    /// Starts an Elixir node and waits until it is ready.
    pub fn start_elixir(&self, short: &str) -> BeamNode {
        let mut node = self.spawn_elixir(short);
        node.wait_ready();
        node
    }

    /// `GET path` (HTTP/1.0) from `127.0.0.1:port` inside this pod, e.g. the
    /// sidecar's admin endpoint. Panics unless the status is 200; returns the
    /// body.
    pub fn http_get(&self, port: u16, path: &str) -> String {
        let script = "exec 3<>\"/dev/tcp/127.0.0.1/$1\" && \
                      printf 'GET %s HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' \"$2\" >&3 && \
                      cat <&3";
        let port = port.to_string();
        let response = self.run_ok("bash", &["-c", script, "http_get", &port, path]);
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head.lines().next().unwrap_or_default();
        assert!(
            status.split_whitespace().nth(1) == Some("200"),
            "GET {path} on port {port} in pod {}: {status}\n{body}",
            self.name
        );
        body.to_string()
    }

    /// Runs `epmd -names` in this pod (it asks the local port 4369).
    pub fn epmd_names(&self) -> String {
        self.run_ok("epmd", &["-names"])
    }

    /// Waits for EPMD of this pod to listen (used by the daemons).
    pub(crate) fn wait_epmd(&self, proc: &mut Proc, timeout: Duration) {
        self.wait_listening(EPMD_PORT, timeout, Some(proc));
    }
}

/// Takes the cross-process lab lock ([`HOST_LOCK`]), waiting for it.
fn host_lock() -> UnixListener {
    let addr = UnixSocketAddr::from_abstract_name(HOST_LOCK).expect("abstract socket name");
    let start = Instant::now();
    let mut told = false;
    loop {
        match UnixListener::bind_addr(&addr) {
            Ok(listener) => return listener,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if !told && start.elapsed() > Duration::from_secs(2) {
                    // Past the test harness's capture: say why nothing happens.
                    let _ = writeln!(
                        std::io::stderr(),
                        "e2e: waiting for another process's lab to finish"
                    );
                    told = true;
                }
                assert!(
                    start.elapsed() < HOST_LOCK_WAIT,
                    "another process held the e2e lab lock for {HOST_LOCK_WAIT:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("cannot take the e2e lab lock (abstract Unix socket): {e}"),
        }
    }
}

/// Runs `ip args`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("timeout")
        .args(["-k", "2", &COMMAND_TIMEOUT.as_secs().to_string(), "ip"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn netns_etc(ns: &str) -> PathBuf {
    Path::new("/etc/netns").join(ns)
}

/// Kills every process in `ns`, deletes it and its /etc/netns directory.
/// Best effort: used on drop and for stale namespaces.
fn destroy_namespace(ns: &str) {
    for _ in 0..50 {
        let pids = netns_pids(ns);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = Command::new("kill")
                .args(["-s", "KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("ip")
        .args(["netns", "delete", ns])
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(netns_etc(ns));
}

fn netns_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The pid encoded in a namespace name (`dpe<pid>x...`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// True when `name` belongs to a harness process that no longer runs.
fn is_stale(name: &str) -> bool {
    match owner_pid(name) {
        Some(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

/// Removes namespaces and /etc/netns directories left by an earlier run that
/// was killed before its labs were dropped. (Its temp directories stay: they
/// may hold the logs of a failure.)
fn remove_stale() {
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut stale: Vec<String> = listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| is_stale(ns))
        .map(str::to_string)
        .collect();
    // Pod namespaces (longer names) before their bridge.
    stale.sort_by_key(|ns| std::cmp::Reverse(ns.len()));
    for ns in &stale {
        destroy_namespace(ns);
    }
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for entry in entries.filter_map(|e| e.ok()) {
            if is_stale(&entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}
