//! BEAM nodes driven through `dp_test_agent`.
//!
//! Each node runs the agent from `tests/erlang/dp_test_agent.erl`, compiled
//! per lab with `erlc`. The harness writes `{Id, Command}.` lines to the
//! node's stdin and reads `DPR <Id> <text>` lines from its stdout (see the
//! agent's module doc); a reader thread turns stdout into a channel so every
//! read has a deadline. Everything the node prints goes to log files in the
//! lab directory as well.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::lab::{EpmdKind, Pod};
use super::otp::{self, Otp};
use super::process::Proc;

/// Source of the agent.
const AGENT_SRC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/erlang/dp_test_agent.erl"
);
/// Startup of a node up to its `DPREADY` line (Elixir is the slow one).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline for one reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for a bulk transfer reply.
pub const BLOB_TIMEOUT: Duration = Duration::from_secs(50);
/// Lines of a node's logs quoted in a panic message.
const LOG_QUOTE_LINES: usize = 40;
/// Keep idle schedulers from spinning: many nodes share two cores.
const VM_FLAGS: &[&str] = &["+sbwt", "none", "+sbwtdcpu", "none", "+sbwtdio", "none"];

/// Compiles the agent into `ebin`.
pub(crate) fn compile_agent(ebin: &Path) {
    std::fs::create_dir_all(ebin).expect("create ebin directory");
    let out = Command::new("timeout")
        .args(["-k", "2", "300", "erlc", "-o"])
        .arg(ebin)
        .arg(AGENT_SRC)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run erlc: {e}"));
    assert!(
        out.status.success() && ebin.join("dp_test_agent.beam").is_file(),
        "erlc {AGENT_SRC} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compiles the agent with release `otp`'s `erlc` into `ebin`, from a
/// copy of its source in `dir` (the lab directory, which that release's
/// tree sees).
pub(crate) fn compile_agent_with(otp: Otp, dir: &Path, ebin: &Path) {
    let src = dir.join("dp_test_agent.erl");
    if !src.is_file() {
        std::fs::copy(AGENT_SRC, &src).expect("copy the agent source into the lab");
    }
    otp::erlc(otp, &[], &src, ebin);
    assert!(
        ebin.join("dp_test_agent.beam").is_file(),
        "erlc of {otp} wrote no dp_test_agent.beam into {}",
        ebin.display()
    );
}

/// Erlang or Elixir.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Erlang,
    Elixir,
}

enum AgentLine {
    Ready,
    Reply(u64, String),
}

/// A running BEAM node with the test agent. Killed on drop.
pub struct BeamNode {
    name: String,
    proc: Proc,
    stdin: ChildStdin,
    lines: Receiver<AgentLine>,
    /// Replies read while waiting for another one.
    stash: HashMap<u64, String>,
    /// Requests sent and not yet answered, for error messages.
    pending: HashMap<u64, String>,
    next_id: u64,
    ready: bool,
    out_log: PathBuf,
}

/// Non-default ways to start an Erlang node (added for tests/e2e_tunnel.rs,
/// see [`Pod::spawn_erlang_with`](super::lab::Pod::spawn_erlang_with)).
#[derive(Clone, Debug, Default)]
pub struct ErlangOptions {
    /// Full node name instead of `short@<pod host>`.
    pub name: Option<String>,
    /// Start with `-sname` instead of `-name`.
    pub short_names: bool,
    /// Start without a node name (no `-name`): distribution is started at
    /// run time (`net_kernel:start/2`, through [`BeamNode::eval`]). The
    /// node is ready when its agent is, not when it is registered.
    pub no_name: bool,
    /// Further `erl` arguments, e.g. `-pa DIR -epmd_module distproxy_epmd`
    /// (for Elixir nodes: appended to `--erl`).
    pub extra_args: Vec<String>,
    /// OTP release of the node instead of its pod's
    /// ([`Pod::set_otp`](super::lab::Pod::set_otp)).
    pub otp: Option<Otp>,
    /// Environment of the node, e.g. `ERL_FLAGS` or `ELIXIR_ERL_OPTIONS`
    /// the way a release's start script passes flags (the harness clears
    /// the Erlang variables of its own environment).
    pub env: Vec<(String, String)>,
}

impl ErlangOptions {
    /// A node of `-proto_dist inet6_tcp`: it registers with its pod's EPMD
    /// over `::1`, resolves host names to IPv6 addresses and listens on IPv6
    /// loopback only (behind a sidecar, as IPv4 nodes listen on 127.0.0.1).
    pub fn inet6() -> ErlangOptions {
        ErlangOptions {
            extra_args: ["-proto_dist", "inet6_tcp"]
                .into_iter()
                .chain(["-kernel", "inet_dist_use_interface", "{0,0,0,0,0,0,0,1}"])
                .map(String::from)
                .collect(),
            ..Default::default()
        }
    }
}

impl BeamNode {
    pub(crate) fn spawn(pod: &Pod, short: &str, kind: NodeKind, epmd: EpmdKind) -> BeamNode {
        Self::spawn_with(pod, short, kind, epmd, &ErlangOptions::default())
    }

    pub(crate) fn spawn_with(
        pod: &Pod,
        short: &str,
        kind: NodeKind,
        epmd: EpmdKind,
        options: &ErlangOptions,
    ) -> BeamNode {
        let lab = pod.lab();
        let otp = options.otp.unwrap_or_else(|| pod.otp());
        let ebin = lab.agent_ebin(otp);
        let name = options.name.clone().unwrap_or_else(|| pod.node_name(short));
        let name_flag = if options.short_names {
            "-sname"
        } else {
            "-name"
        };
        // Behind a sidecar the node listens on loopback only, so nothing can
        // reach it from another pod except through the sidecar.
        // (Unless the caller names the interface itself: `erl` takes the
        // first `-kernel inet_dist_use_interface`.)
        let loopback_only = epmd == EpmdKind::Sidecar
            && !options
                .extra_args
                .iter()
                .any(|a| a == "inet_dist_use_interface");
        let mut cmd = match kind {
            NodeKind::Erlang => {
                let mut cmd = pod.otp_command(otp, "erl");
                cmd.arg("-noshell");
                if !options.no_name {
                    cmd.args([name_flag, &name]);
                }
                cmd.args(["-setcookie", &lab.cookie]);
                cmd.args(["-start_epmd", "false"]);
                if loopback_only {
                    cmd.args(["-kernel", "inet_dist_use_interface", "{127,0,0,1}"]);
                }
                cmd.args(VM_FLAGS).arg("-pa").arg(&ebin);
                cmd.args(&options.extra_args);
                cmd.args(["-s", "dp_test_agent", "start"]);
                cmd
            }
            NodeKind::Elixir => {
                let mut erl = String::from("-start_epmd false");
                if loopback_only {
                    erl.push_str(" -kernel inet_dist_use_interface {127,0,0,1}");
                }
                let extra = options.extra_args.iter().map(String::as_str);
                for flag in VM_FLAGS.iter().copied().chain(extra) {
                    erl.push(' ');
                    erl.push_str(flag);
                }
                let mut cmd = pod.otp_command(otp, "elixir");
                let name_flag = if options.short_names {
                    "--sname"
                } else {
                    "--name"
                };
                cmd.args([name_flag, &name, "--cookie", &lab.cookie, "--erl", &erl]);
                cmd.arg("-pa").arg(&ebin);
                cmd.args(["-e", ":dp_test_agent.start(); Process.sleep(:infinity)"]);
                cmd
            }
        };
        cmd.envs(options.env.iter().map(|(k, v)| (k, v)));
        let err_log = lab.file(short, "stderr");
        let out_log = lab.file(short, "stdout");
        let err = std::fs::File::create(&err_log).expect("create node stderr log");
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err));
        let label = format!("{kind:?} node {name} ({otp})");
        let mut proc = Proc::spawn(&label, &mut cmd, &err_log);
        let stdin = proc.child_mut().stdin.take().expect("node stdin");
        let stdout = proc.child_mut().stdout.take().expect("node stdout");

        let (tx, lines) = mpsc::channel();
        let mut transcript = std::fs::File::create(&out_log).expect("create node stdout log");
        std::thread::Builder::new()
            .name(format!("stdout {name}"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(transcript, "{line}");
                    let parsed = if line.starts_with("DPREADY ") {
                        Some(AgentLine::Ready)
                    } else if let Some(rest) = line.strip_prefix("DPR ") {
                        let (id, text) = rest.split_once(' ').unwrap_or((rest, ""));
                        id.parse()
                            .ok()
                            .map(|id| AgentLine::Reply(id, text.trim().to_string()))
                    } else {
                        None
                    };
                    if let Some(parsed) = parsed {
                        if tx.send(parsed).is_err() {
                            break;
                        }
                    }
                }
            })
            .expect("spawn node stdout reader");

        BeamNode {
            name,
            proc,
            stdin,
            lines,
            stash: HashMap::new(),
            pending: HashMap::new(),
            next_id: 1,
            ready: false,
            out_log,
        }
    }

    /// Full node name (`a1@pod-a.dp.test`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's stderr and stdout so far, last lines of each.
    pub fn logs(&self) -> String {
        let tail = |path: &Path| {
            let text = std::fs::read(path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_QUOTE_LINES)..].join("\n")
        };
        format!(
            "--- {} stderr ---\n{}\n--- {} stdout ---\n{}",
            self.name,
            tail(self.proc.log_path()),
            self.name,
            tail(&self.out_log)
        )
    }

    /// Waits until the agent reports ready: distribution is up and the node
    /// is registered with its pod's EPMD.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.ready {
            match self.next_line(deadline) {
                Ok(AgentLine::Ready) => self.ready = true,
                Ok(AgentLine::Reply(id, text)) => {
                    self.stash.insert(id, text);
                }
                Err(why) => panic!(
                    "{} did not start within {READY_TIMEOUT:?}: {why}\n{}",
                    self.name,
                    self.logs()
                ),
            }
        }
    }

    /// Sends one request (an Erlang term, without the final dot); returns its
    /// id for [`recv`](Self::recv).
    pub fn send(&mut self, request: &str) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let line = format!("{{{id}, {request}}}.\n");
        if let Err(e) = self
            .stdin
            .write_all(line.as_bytes())
            .and_then(|()| self.stdin.flush())
        {
            panic!(
                "cannot send {request} to {}: {e}\n{}",
                self.name,
                self.logs()
            );
        }
        self.pending.insert(id, request.to_string());
        id
    }

    /// Waits up to `timeout` for the reply to request `id`.
    pub fn recv(&mut self, id: u64, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(text) = self.stash.remove(&id) {
                self.pending.remove(&id);
                return text;
            }
            match self.next_line(deadline) {
                Ok(AgentLine::Ready) => self.ready = true,
                Ok(AgentLine::Reply(got, text)) => {
                    self.stash.insert(got, text);
                }
                Err(why) => {
                    let request = self.pending.get(&id).cloned().unwrap_or_default();
                    panic!(
                        "{}: no reply to {request} within {timeout:?}: {why}\n{}",
                        self.name,
                        self.logs()
                    )
                }
            }
        }
    }

    fn next_line(&mut self, deadline: Instant) -> Result<AgentLine, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => Err("timed out".into()),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.proc.wait_exit(Duration::from_secs(2));
                Err(format!("the node's stdout closed (exit status {status:?})"))
            }
        }
    }

    /// Sends `request` and waits for its reply ([`REPLY_TIMEOUT`]).
    pub fn call(&mut self, request: &str) -> String {
        let id = self.send(request);
        self.recv(id, REPLY_TIMEOUT)
    }

    /// `net_adm:ping(Node)`: `"pong"` or `"pang"`.
    pub fn ping(&mut self, node: &str) -> String {
        self.call(&format!("{{ping, {}}}", atom(node)))
    }

    /// Starts pinging every node of `nodes` concurrently, at wall-clock time
    /// `start_at`; read the result with [`recv_pairs`](Self::recv_pairs).
    pub fn send_ping_all(&mut self, nodes: &[String], start_at: SystemTime) -> u64 {
        let at_ms = start_at
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis();
        self.send(&format!("{{ping_all, {}, {at_ms}}}", atom_list(nodes)))
    }

    /// Starts `rpc:call(N, erlang, node, [])` for every node concurrently.
    pub fn send_rpc_node_all(&mut self, nodes: &[String]) -> u64 {
        self.send(&format!("{{rpc_node_all, {}}}", atom_list(nodes)))
    }

    /// Reads a reply of the form `node=result node=result ...`.
    pub fn recv_pairs(&mut self, id: u64, timeout: Duration) -> Vec<(String, String)> {
        let text = self.recv(id, timeout);
        text.split_whitespace()
            .map(|pair| match pair.split_once('=') {
                Some((n, r)) => (n.to_string(), r.to_string()),
                None => panic!("{}: unexpected reply {text:?}", self.name),
            })
            .collect()
    }

    /// `rpc:call(Node, erlang, node, [])`: the node name, or the error term.
    pub fn rpc_node(&mut self, node: &str) -> String {
        self.call(&format!("{{rpc_node, {}}}", atom(node)))
    }

    /// `rpc:call(Node, M, F, A)` with an argument list written as Erlang
    /// terms (`"[]"`); the result printed with `~0p`.
    pub fn rpc(&mut self, node: &str, module: &str, function: &str, args: &str) -> String {
        self.call(&format!(
            "{{rpc, {}, {}, {}, {args}}}",
            atom(node),
            atom(module),
            atom(function)
        ))
    }

    /// Panics unless this node runs OTP release `otp`.
    pub fn assert_release(&mut self, otp: Otp) {
        let me = self.name().to_string();
        let release = self.rpc(&me, "erlang", "system_info", "[otp_release]");
        assert_eq!(release, format!("\"{}\"", otp.release()), "release of {me}");
    }

    /// Evaluates the Erlang expressions `src` (ending in a dot) on this
    /// node; the value printed with `~0p`, or the error.
    pub fn eval(&mut self, src: &str) -> String {
        let quoted = src.replace('\\', "\\\\").replace('"', "\\\"");
        self.call(&format!("{{eval, \"{quoted}\"}}"))
    }

    /// `nodes()`, sorted.
    pub fn nodes(&mut self) -> Vec<String> {
        self.call("nodes")
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// `erlang:system_info(creation)`.
    pub fn creation(&mut self) -> u32 {
        let text = self.call("creation");
        text.parse()
            .unwrap_or_else(|_| panic!("{}: bad creation reply {text:?}", self.name))
    }

    /// The creation this node decodes from a pid of `node`: which incarnation
    /// of `node` it is talking to.
    pub fn remote_pid_creation(&mut self, node: &str) -> u32 {
        let text = self.call(&format!("{{remote_pid_creation, {}}}", atom(node)));
        text.parse().unwrap_or_else(|_| {
            panic!(
                "{}: remote_pid_creation of {node} failed: {text}",
                self.name
            )
        })
    }

    /// `net_adm:names(Host)`: sorted `(name, port)` pairs, or the error.
    pub fn names(&mut self, host: &str) -> Result<Vec<(String, u16)>, String> {
        let text = self.call(&format!("{{names, {}}}", atom(host)));
        let Some(rest) = text.strip_prefix("ok") else {
            return Err(text);
        };
        Ok(rest
            .split_whitespace()
            .map(|entry| {
                let (name, port) = entry
                    .rsplit_once(':')
                    .unwrap_or_else(|| panic!("bad names entry {entry:?} in {text:?}"));
                (name.to_string(), port.parse().expect("names port"))
            })
            .collect())
    }

    /// Sends a random binary of `size` bytes to a new process on `node`,
    /// which computes its MD5 there.
    pub fn send_blob(&mut self, node: &str, size: usize) -> BlobResult {
        let id = self.send(&format!("{{send_blob, {}, {size}}}", atom(node)));
        let text = self.recv(id, BLOB_TIMEOUT);
        let fields: Vec<&str> = text.split_whitespace().collect();
        match fields[..] {
            [size, local, remote, remote_size, elapsed] if fields[0] != "error" => BlobResult {
                size: size.parse().expect("blob size"),
                local_md5: local.to_string(),
                remote_md5: remote.to_string(),
                remote_size: remote_size.parse().expect("blob remote size"),
                elapsed: Duration::from_millis(elapsed.parse().expect("blob elapsed")),
            },
            _ => panic!(
                "{}: sending {size} bytes to {node} failed: {text}",
                self.name
            ),
        }
    }

    /// Asks the node to halt and waits for it to exit.
    pub fn halt(mut self) {
        let id = self.send("halt");
        let _ = self.recv(id, REPLY_TIMEOUT);
        if self.proc.wait_exit(Duration::from_secs(15)).is_none() {
            panic!("{} did not exit after halt\n{}", self.name, self.logs());
        }
    }

    /// Sends the node's VM `signal` (`STOP`, `CONT`, ...).
    pub fn signal(&self, signal: &str) {
        self.proc.signal(signal);
    }

    /// Kills the node at once (SIGKILL).
    pub fn kill(mut self) {
        self.proc.kill();
    }
}

/// Outcome of [`BeamNode::send_blob`].
#[derive(Debug)]
pub struct BlobResult {
    pub size: usize,
    pub local_md5: String,
    pub remote_md5: String,
    pub remote_size: usize,
    pub elapsed: Duration,
}

/// An Erlang atom literal for `s` (always quoted).
pub fn atom(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// An Erlang list of atoms.
pub fn atom_list<S: AsRef<str>>(names: &[S]) -> String {
    let items: Vec<String> = names.iter().map(|n| atom(n.as_ref())).collect();
    format!("[{}]", items.join(", "))
}
