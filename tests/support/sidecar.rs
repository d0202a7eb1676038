//! The pod's EPMD: the distproxy sidecar under test, or stock `epmd`.

use std::process::Stdio;
use std::time::Duration;

use super::lab::Pod;
use super::process::Proc;
use super::wait::poll_until;
use super::{distproxy_bin, DIST_PORT, EPMD_PORT};

/// The sidecar's admin endpoint port (default configuration).
pub const ADMIN_PORT: u16 = 9369;
/// The sidecar's log filter variable (tracing `EnvFilter` syntax).
const LOG_VAR: &str = "DISTPROXY_LOG";
/// How long a daemon may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How to run the sidecar.
#[derive(Clone, Debug)]
pub struct SidecarOptions {
    /// Arguments after `run`.
    pub args: Vec<String>,
    /// TOML configuration, written to a file and passed as `--config`.
    pub config: Option<String>,
    /// TCP ports that must be listening before the sidecar counts as started.
    pub wait_ports: Vec<u16>,
    /// Log filter for the sidecar (`DISTPROXY_LOG`; an outer one wins).
    pub log_filter: String,
    /// A program (and its arguments) that runs the sidecar, e.g. `setpriv`.
    pub wrapper: Vec<String>,
}

impl Default for SidecarOptions {
    fn default() -> Self {
        SidecarOptions {
            args: Vec::new(),
            config: None,
            wait_ports: vec![EPMD_PORT, DIST_PORT],
            log_filter: "info,distproxy=debug".into(),
            wrapper: Vec::new(),
        }
    }
}

impl SidecarOptions {
    pub fn with_args(args: &[&str]) -> Self {
        SidecarOptions {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
    }

    pub fn config(mut self, toml: &str) -> Self {
        self.config = Some(toml.to_string());
        self
    }

    /// Runs the sidecar through `wrapper` (program and arguments).
    pub fn wrapped(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|a| a.to_string()).collect();
        self
    }

    pub fn wait_ports(mut self, ports: &[u16]) -> Self {
        self.wait_ports = ports.to_vec();
        self
    }
}

/// A long-running server in a pod (sidecar or stock epmd), killed on drop.
/// Its stderr and stdout go to a log file, printed when the test fails.
pub struct Daemon {
    proc: Proc,
    /// The sidecar's `--config` file, if it was given one.
    config: Option<std::path::PathBuf>,
}

impl Daemon {
    pub(crate) fn sidecar(pod: &Pod, options: SidecarOptions) -> Daemon {
        let lab = pod.lab();
        let log = lab.file(&format!("{}-sidecar", pod.name()), "log");
        let mut cmd = match options.wrapper.split_first() {
            None => pod.command(&distproxy_bin()),
            Some((program, args)) => {
                let mut cmd = pod.command(program);
                cmd.args(args).arg(distproxy_bin());
                cmd
            }
        };
        cmd.arg("run");
        let mut config = None;
        if let Some(toml) = &options.config {
            let path = lab.file(&format!("{}-sidecar", pod.name()), "toml");
            std::fs::write(&path, toml).expect("write sidecar config");
            cmd.arg("--config").arg(&path);
            config = Some(path);
        }
        cmd.args(&options.args);
        if std::env::var_os(LOG_VAR).is_none() {
            cmd.env(LOG_VAR, &options.log_filter);
        }
        let mut proc = spawn_logged(
            &format!("distproxy sidecar in pod {}", pod.name()),
            cmd,
            &log,
        );
        for port in &options.wait_ports {
            pod.wait_listening(*port, START_TIMEOUT, Some(&mut proc));
        }
        Daemon { proc, config }
    }

    pub(crate) fn stock_epmd(pod: &Pod) -> Daemon {
        let log = pod.lab().file(&format!("{}-epmd", pod.name()), "log");
        // No -daemon: it stays in the foreground, in our process group.
        let cmd = pod.command("epmd");
        let mut proc = spawn_logged(&format!("stock epmd in pod {}", pod.name()), cmd, &log);
        pod.wait_epmd(&mut proc, START_TIMEOUT);
        Daemon { proc, config: None }
    }

    /// What the daemon wrote so far (stderr and stdout).
    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.proc.exited().is_none()
    }

    /// Panics with the log if the daemon has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.proc.exited() {
            panic!(
                "{} exited ({status}); its log:\n{}",
                self.proc.label(),
                self.log()
            );
        }
    }

    /// Process id.
    /// The `--config` file the sidecar was started with (rewrite it, then
    /// SIGHUP, to reload).
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config.as_deref()
    }

    /// Sends `signal` (`"HUP"`, `"TERM"`, …) to the daemon.
    pub fn signal(&self, signal: &str) {
        self.proc.signal(signal)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Inodes of the sockets the daemon holds open (compare with
    /// [`Listener::inode`](super::netstat::Listener)).
    pub fn socket_inodes(&self) -> std::collections::HashSet<u64> {
        super::netstat::socket_inodes(self.proc.pid())
    }

    /// Log lines containing `needle`.
    pub fn log_lines_containing(&self, needle: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Waits until the log has `n` lines containing `needle`; panics with
    /// the log after `within`.
    pub fn wait_log(&self, needle: &str, n: usize, within: Duration) {
        assert!(
            poll_until(within, Duration::from_millis(50), || {
                self.log_lines_containing(needle).len() >= n
            }),
            "no {n}× {needle:?} in the sidecar log within {within:?}:\n{}",
            self.log()
        );
    }

    /// Panics unless the sidecar still runs and has logged no misroute: it
    /// checks the name in each node's challenge against the node it routed
    /// to, and logs a mismatch with the marker `MISROUTE`.
    pub fn assert_no_misroute(&mut self) {
        self.assert_running();
        let misroutes = self.log_lines_containing("MISROUTE");
        assert!(
            misroutes.is_empty(),
            "misrouted connections: {misroutes:#?}"
        );
    }

    /// Waits up to `timeout` for the daemon to exit; its status, or `None`
    /// if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.proc.wait_exit(timeout)
    }

    /// Kills the daemon.
    pub fn stop(&mut self) {
        self.proc.kill();
    }
}

fn spawn_logged(label: &str, mut cmd: std::process::Command, log: &std::path::Path) -> Proc {
    let file = std::fs::File::create(log).expect("create daemon log");
    let file2 = file.try_clone().expect("clone daemon log handle");
    cmd.stdout(Stdio::from(file)).stderr(Stdio::from(file2));
    Proc::spawn(label, &mut cmd, log)
}
